import XCTest
import TopiaryTensor
@testable import TopiaryPrune

/// The calibration stream's store: windows kept in memory within the budget, in a spill file
/// past it; a released window's memory goes back while the others stay readable.
final class ActivationStoreTests: XCTestCase {
    func testReleaseFreesOneWindowAndKeepsTheOthers() throws {
        let cpu = CPUBackend()
        let store = ActivationStore(count: 3, rows: 4, cols: 5, budgetBytes: 1 << 20, spillDirectory: NSTemporaryDirectory(), backend: cpu)
        for i in 0..<3 { try store.set(i, Matrix(rows: 4, cols: 5, values: (0..<20).map { Float($0 + 100 * i) })) }
        weak let window: AnyObject? = try store.tensor(1).storage
        XCTAssertNotNil(window, "the store holds window 1")
        store.release(1)
        XCTAssertNil(window, "a released window's memory is freed")
        XCTAssertEqual(try store.get(0).values.first, 0)
        XCTAssertEqual(try store.get(2).values.first, 200)
        // Written again after release, the window reads back as written.
        try store.set(1, Matrix(rows: 4, cols: 5, values: Array(repeating: 7, count: 20)))
        XCTAssertEqual(try store.get(1).values, Array(repeating: 7, count: 20))
    }

    func testReleaseOfASpilledStoreKeepsItsWindows() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("store-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        addTeardownBlock { try? FileManager.default.removeItem(atPath: dir) }
        let store = ActivationStore(count: 3, rows: 4, cols: 5, budgetBytes: 100, spillDirectory: dir, backend: CPUBackend())
        for i in 0..<3 { try store.set(i, Matrix(rows: 4, cols: 5, values: Array(repeating: Float(i), count: 20))) }
        XCTAssertTrue(store.isSpilled)
        store.release(1)      // nothing in memory to free; the file keeps it
        XCTAssertEqual(try store.get(1).values, Array(repeating: 1, count: 20))
    }
}
