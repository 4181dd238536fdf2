import Foundation
import XCTest
import TopiaryTestSupport
@testable import TopiaryCluster

/// A run that stopped after sampling its calibration (--calib generate) and before writing
/// run.json leaves run.lock and calibration-generated.json: still a run directory, not foreign.
final class GeneratedCalibrationRunDirectoryTests: XCTestCase {
    func testALockAndAGeneratedCalibrationAreAStartedRun() throws {
        let dir = try makeTemporaryDirectory()
        try Data("pid 1 host h\n".utf8).write(to: dir.appendingPathComponent(RunDirectory.lockName))
        try Data("{}".utf8).write(to: dir.appendingPathComponent(RunDirectory.generatedCalibrationName))
        XCTAssertEqual(try RunDirectory.state(of: dir.path), .started)
        XCTAssertNoThrow(try RunDirectory.checkForNewRun(dir.path))
        // Anything else beside them is still someone else's file.
        try Data("x".utf8).write(to: dir.appendingPathComponent("notes.txt"))
        XCTAssertEqual(try RunDirectory.state(of: dir.path), .foreign("notes.txt"))
    }
}
