import Foundation
@testable import TopiaryPrune
import TopiaryTensor
import TopiaryTestSupport
import XCTest

/// U made by all replicas (`SpreadInverseFactor`) against the one-process factorisation, bit for
/// bit, and its failures: a matrix that is not positive definite, a bad tile from a peer.
final class SpreadInverseFactorTests: XCTestCase {
    func spd(_ n: Int, seed: UInt64) -> Matrix {
        var rng = SplitMix(seed: seed)
        let x = Matrix(rows: 2 * n + 3, cols: n) { p in for i in p.indices { p[i] = rng.uniform() } }
        var h = Linalg.matmul(x, .transposed, x, .none)
        for i in 0..<n { h[i, i] += 0.05 }
        return h
    }

    /// Runs `compute` on every replica of an in-process hub, each on its own thread.
    func spread(_ a: Matrix, replicas: Int, owner: Int) -> [Result<Matrix, any Error>] {
        let hub = InProcessReplicaHub(count: replicas)
        final class Results: @unchecked Sendable {
            var values: [Result<Matrix, any Error>?]
            let lock = NSLock()
            init(_ n: Int) { values = Array(repeating: nil, count: n) }
        }
        let results = Results(replicas)
        // Each on its own thread: they wait on one another.
        let group = DispatchGroup()
        for r in 0..<replicas {
            group.enter()
            Thread.detachNewThread {
                let exchange = hub.exchange(rank: r)
                let result = Result {
                    try SpreadInverseFactor.compute(exchange, block: 2, name: "mlp.down_proj", owner: owner, damped: r == owner ? a : nil,
                                                    order: a.rows, what: "mlp.down_proj: damped Hessian")
                }
                // As BlockPruner.prune does: a replica that throws fails the exchange.
                if case .failure(let e) = result { exchange.fail("\(e)") }
                results.lock.lock(); results.values[r] = result; results.lock.unlock()
                group.leave()
            }
        }
        group.wait()
        return results.values.map { $0! }
    }

    func testEveryReplicaGetsOneProcesssBitsAtAnyReplicaCountAndOrder() throws {
        // Orders below a tile, at a tile's edge, and of several tiles with a short last one.
        for (n, seed) in [(1, 1 as UInt64), (100, 2), (128, 3), (300, 4), (520, 5), (1000, 6)] {
            let a = spd(n, seed: seed)
            let reference = try Linalg.inverseCholeskyUpper(a, what: "reference")
            for replicas in [2, 3, 4, 5] {
                for owner in Set([0, replicas - 1, 1 % replicas]) {
                    for (r, result) in spread(a, replicas: replicas, owner: owner).enumerated() {
                        let u = try result.get()
                        XCTAssertEqual(u.rows, n)
                        XCTAssertTrue(u.values == reference.values, "n \(n), \(replicas) replicas, owner \(owner): replica \(r)'s U differs")
                    }
                }
            }
        }
    }

    func testAMatrixThatIsNotPositiveDefiniteFailsEveryReplicaWithOneProcesssError() throws {
        // Positive definite but for one direction deep in the factorisation (the third panel of
        // JAJ, so a replica other than the owner finds it).
        var a = spd(400, seed: 9)
        let bad = 400 - 1 - 300     // JAJ's row 300
        for j in 0..<400 { a[bad, j] = 0; a[j, bad] = 0 }
        a[bad, bad] = -1
        var expected = ""
        XCTAssertThrowsError(try SparseGPTPruner.factor(CPUBackend().upload(a), options: SparseGPTPruner.Options(percentDamp: 0),
                                                        what: "mlp.down_proj", on: CPUBackend())) { expected = "\($0)" }
        XCTAssertTrue(expected.contains("not positive definite") || expected.contains("minor"), expected)
        // With relays in the tree (4, 5) a replica may fail on the failed exchange before the error
        // panel reaches it: every replica's error still names the cause.
        for replicas in [2, 3, 4, 5] {
            for (r, result) in spread(a, replicas: replicas, owner: 0).enumerated() {
                XCTAssertThrowsError(try result.get()) { error in
                    XCTAssertTrue("\(error)".contains(expected), "replica \(r) of \(replicas): \(error)")
                }
            }
        }
    }

    func testABadTileFromAPeerIsAnErrorNamingItsKindAndTile() throws {
        // Replica 1 of 2 holds tile column 1 of a 300 x 300 matrix (rows 128..<300, 128 wide).
        for value in [ReplicaValue.matrix(Matrix(rows: 3, cols: 3)), .absent, .bytes([1, 2])] {
            let hub = InProcessReplicaHub(count: 2)
            try hub.exchange(rank: 0).send(ReplicaKey(block: 2, kind: .factorColumn, name: "w", index: 1), value, to: 1)
            XCTAssertThrowsError(try SpreadInverseFactor.compute(hub.exchange(rank: 1), block: 2, name: "w", owner: 0, damped: nil,
                                                                 order: 300, what: "w")) { error in
                let text = "\(error)"
                XCTAssertTrue(text.contains("block 2") && text.contains("factorColumn 1") && text.contains("172x128"), text)
            }
        }
        // A panel with the wrong shape, once the tile columns came right.
        let hub = InProcessReplicaHub(count: 2)
        let zero = hub.exchange(rank: 0)
        try zero.send(ReplicaKey(block: 2, kind: .factorColumn, name: "w", index: 1), .matrix(Matrix(rows: 172, cols: 128)), to: 1)
        try zero.send(ReplicaKey(block: 2, kind: .factorPanel, name: "w", index: 0), .matrix(Matrix(rows: 300, cols: 1)), to: 1)
        XCTAssertThrowsError(try SpreadInverseFactor.compute(hub.exchange(rank: 1), block: 2, name: "w", owner: 0, damped: nil,
                                                             order: 300, what: "w")) { error in
            XCTAssertTrue("\(error)".contains("factorPanel 0 (from replica 0)") && "\(error)".contains("300x128"), "\(error)")
        }
    }
}
