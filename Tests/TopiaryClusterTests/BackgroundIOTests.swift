import Foundation
import XCTest
import TopiaryModel
import TopiaryTestSupport
@testable import TopiaryCluster

/// Issue 16, item 5: checkpoints written while the next block computes, the next block's bytes
/// read ahead while this one computes.
final class BackgroundIOTests: XCTestCase {
    struct Refused: Error, Equatable { let block: Int }

    /// Writes run in the order submitted, one at a time; a failed one fails the next submit and
    /// every wait after it, and nothing submitted after it runs.
    func testCheckpointWriterKeepsOrderAndReportsAFailure() throws {
        let writer = CheckpointWriter()
        let lock = NSLock()
        var done: [Int] = []
        for i in 0..<5 {
            try writer.submit {
                Thread.sleep(forTimeInterval: 0.01 * Double(5 - i))
                lock.withLock { done.append(i) }
            }
        }
        try writer.wait()
        XCTAssertEqual(lock.withLock { done }, [0, 1, 2, 3, 4])

        try writer.submit { throw Refused(block: 5) }
        XCTAssertThrowsError(try writer.submit { lock.withLock { done.append(6) } }) { XCTAssertEqual($0 as? Refused, Refused(block: 5)) }
        XCTAssertThrowsError(try writer.wait()) { XCTAssertEqual($0 as? Refused, Refused(block: 5)) }
        XCTAssertEqual(lock.withLock { done }, [0, 1, 2, 3, 4])
    }

    /// Prefetching every block of SmolLM2 maps nothing into the process (its resident set grows
    /// by far less than the bytes asked for), ignores names and blocks that do not exist, and
    /// changes no tensor that is loaded afterwards.
    func testPrefetchHoldsNothingAndChangesNoLoad() throws {
        let path = TestPaths.asset("smollm2-135m-instruct-q4_1/SmolLM2-135M-Instruct.Q4_1.gguf")
        let model = try LanguageModel.open(path: path)
        let c = model.config
        let bytes = (0..<c.layerCount).flatMap { c.family.blockTensors(c, block: $0) }
            .compactMap { model.weights.entry($0.name)?.byteCount }.reduce(0, +)
        XCTAssertGreaterThan(bytes, 50 << 20)
        let before = try XCTUnwrap(ProcessResources.residentBytes)
        for b in -1...c.layerCount { model.prefetchBlock(b) }
        model.weights.prefetch("no.such.tensor")
        let after = try XCTUnwrap(ProcessResources.residentBytes)
        XCTAssertLessThan(after - before, bytes / 4, "resident set grew by \(after - before) bytes for \(bytes) prefetched")
        let fresh = try LanguageModel.open(path: path)
        XCTAssertEqual(try model.loadBlock(7).tensors, try fresh.loadBlock(7).tensors)
    }
}
