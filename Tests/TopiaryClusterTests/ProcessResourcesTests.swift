import XCTest
@testable import TopiaryCluster

final class ProcessResourcesTests: XCTestCase {
    // The kernel pads /proc/PID/status numbers to 8 characters: from 10^7 kB (9.5 GiB) on, the
    // digits follow the tab directly. A 70B block's prune peaks at 13.8 GiB, which the old parser
    // (split on spaces) read as no value, so report.json said peak_rss_bytes 0.
    func testStatusValuesOfEveryWidth() {
        let text = "Name:\ttopiary\nVmPeak:\t17700000 kB\nVmHWM:\t14463048 kB\nVmRSS:\t  969260 kB\nThreads:\t5\n"
        XCTAssertEqual(ProcessResources.statusBytes(text, key: "VmHWM"), 14_463_048 * 1024)
        XCTAssertEqual(ProcessResources.statusBytes(text, key: "VmRSS"), 969_260 * 1024)
        XCTAssertEqual(ProcessResources.statusBytes(text, key: "Threads"), 5)
        XCTAssertNil(ProcessResources.statusBytes(text, key: "VmSwap"))
        XCTAssertNil(ProcessResources.statusBytes(nil, key: "VmHWM"))
    }

    func testIOBytes() {
        let text = "rchar: 816119264\nwchar: 809538470\nsyscr: 199056\nsyscw: 19\nread_bytes: 10057646080\nwrite_bytes: 809644032\ncancelled_write_bytes: 0\n"
        let io = ProcessResources.ioBytes(text)
        XCTAssertEqual(io?.read, 10_057_646_080)
        XCTAssertEqual(io?.write, 809_644_032)
        XCTAssertNil(ProcessResources.ioBytes("rchar: 1\n"))
    }

    func testThisProcess() throws {
        #if os(Linux)
        XCTAssertGreaterThan(try XCTUnwrap(ProcessResources.residentBytes), 0)
        XCTAssertGreaterThan(try XCTUnwrap(ProcessResources.peakResidentBytes), 0)
        // Peak and now from one snapshot (other tests allocate between two reads of the file).
        let status = try String(contentsOfFile: "/proc/self/status", encoding: .utf8)
        let now = try XCTUnwrap(ProcessResources.statusBytes(status, key: "VmRSS"))
        XCTAssertGreaterThanOrEqual(try XCTUnwrap(ProcessResources.statusBytes(status, key: "VmHWM")), now)
        #endif
    }
}
