import XCTest
@testable import TopiaryPrune

/// Expected values printed by CPython 3.11's `random` module.
final class PythonRandomTests: XCTestCase {
    func testSeedZeroCalibrationStartsMatchCPython() {
        var r = PythonRandom(seed: 0)
        // random.seed(0); [random.randint(0, 304829 - 512 - 1) for _ in range(8)]
        XCTAssertEqual((0..<8).map { _ in r.randint(0, 304_829 - 512 - 1) },
                       [201979, 220500, 21225, 135746, 268055, 254766, 212302, 159023])
    }

    func testGetrandbitsMatchesCPython() {
        var r = PythonRandom(seed: 0)
        XCTAssertEqual((0..<3).map { _ in r.getrandbits(32) }, [3626764237, 1654615998, 3255389356])
    }

    func testOtherSeedsAndWideRanges() {
        var a = PythonRandom(seed: 42)
        XCTAssertEqual((0..<5).map { _ in a.randint(0, 1000) }, [654, 114, 25, 759, 281])
        // A seed wider than 32 bits and a range needing two 32-bit words.
        var b = PythonRandom(seed: 1_234_567_890_123)
        XCTAssertEqual((0..<3).map { _ in b.randint(0, 1 << 40) }, [327144995363, 722760460723, 921007755591])
    }
}
