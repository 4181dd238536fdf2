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

    /// Spill I/O runs on the store's own thread (writes behind, reads ahead): whatever the order of
    /// writes and reads, a read gives the window's latest write. Reads in order, in strides, at
    /// random, and rewrites of the window a read ahead is fetching, against an in-memory model.
    func testSpilledWindowsReadBackTheirLatestWriteInAnyOrder() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("store-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        addTeardownBlock { try? FileManager.default.removeItem(atPath: dir) }
        let (count, rows, cols) = (9, 64, 33)
        let store = ActivationStore(count: count, rows: rows, cols: cols, budgetBytes: 1000, spillDirectory: dir, backend: CPUBackend())
        var model: [Float] = Array(repeating: 0, count: count)
        var version: Float = 0
        func write(_ i: Int) throws {
            version += 1
            model[i] = version
            try store.set(i, Matrix(rows: rows, cols: cols, values: (0..<(rows * cols)).map { version * 10_000 + Float($0 % 97) }))
        }
        func check(_ i: Int, _ what: String) throws {
            let m = try store.get(i)
            XCTAssertEqual(m.values.first, model[i] * 10_000, "\(what): window \(i)")
            XCTAssertEqual(m.values.last, model[i] * 10_000 + Float((rows * cols - 1) % 97), "\(what): window \(i)")
        }
        for i in 0..<count { try write(i) }
        XCTAssertTrue(store.isSpilled)
        for i in 0..<count { try check(i, "in order") }
        for i in stride(from: 1, to: count, by: 3) { try check(i, "stride 3") }
        // Reading 3 starts the read of 4 ahead; 4 written again before it is read.
        try check(2, "before a rewrite")
        try check(3, "before a rewrite")
        try write(4)
        try check(4, "rewritten while read ahead")
        var rng = SplitMix64(seed: 12345)
        func next(_ n: Int) -> Int { Int(rng.next() % UInt64(n)) }
        for step in 0..<400 {
            let i = next(count)
            if next(3) == 0 { try write(i) } else { try check(i, "random step \(step)") }
        }
    }

    /// Stores made, used and dropped on several threads at once, in memory and spilled (replicas
    /// in one process do this): nothing crashes, every read gives its write, and a spilled
    /// store's file is gone once the store is (its queue closes it after the last I/O).
    func testStoresComeAndGoOnSeveralThreadsAtOnce() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("store-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        addTeardownBlock { try? FileManager.default.removeItem(atPath: dir) }
        let failures = Failures()
        DispatchQueue.concurrentPerform(iterations: 8) { t in
            for round in 0..<25 {
                let store = ActivationStore(count: 4, rows: 16, cols: 8, budgetBytes: (t + round) % 2 == 0 ? 1 << 20 : 64,
                                            spillDirectory: dir, backend: CPUBackend())
                do {
                    for i in 0..<4 { try store.set(i, Matrix(rows: 16, cols: 8, values: Array(repeating: Float(t * 100 + i), count: 128))) }
                    for i in 0..<4 where try store.get(i).values.first != Float(t * 100 + i) { failures.add("thread \(t) round \(round) window \(i)") }
                } catch {
                    failures.add("thread \(t) round \(round): \(error)")
                }
            }
        }
        XCTAssertEqual(failures.all, [])
        // The last stores' queues close their files shortly after the stores go.
        var left: [String] = []
        for _ in 0..<100 {
            left = try FileManager.default.contentsOfDirectory(atPath: dir)
            if left.isEmpty { break }
            Thread.sleep(forTimeInterval: 0.01)
        }
        XCTAssertEqual(left, [], "spill files left behind")
    }

    final class Failures: @unchecked Sendable {
        private let lock = NSLock()
        private var list: [String] = []
        func add(_ s: String) { lock.withLock { list.append(s) } }
        var all: [String] { lock.withLock { list } }
    }
}
