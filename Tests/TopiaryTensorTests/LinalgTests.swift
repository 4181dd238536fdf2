import XCTest
import TopiaryTestSupport
@testable import TopiaryTensor

/// Deterministic test data.
struct TestRandom {
    var generator: SplitMix
    init(seed: UInt64) { generator = SplitMix(seed: seed) }
    mutating func uniform() -> Float { generator.uniform() }
    mutating func matrix(_ r: Int, _ c: Int) -> Matrix {
        Matrix(rows: r, cols: c, values: (0..<(r * c)).map { _ in uniform() })
    }
}

/// Naive reference product in Double.
func referenceProduct(_ a: Matrix, _ b: Matrix) -> Matrix {
    var c = Matrix(rows: a.rows, cols: b.cols)
    for i in 0..<a.rows {
        for j in 0..<b.cols {
            var s = 0.0
            for k in 0..<a.cols { s += Double(a[i, k]) * Double(b[k, j]) }
            c[i, j] = Float(s)
        }
    }
    return c
}

final class LinalgTests: XCTestCase {
    func testMirrorUpperToLowerMatchesTheElementwiseDefinition() {
        for n in [1, 2, 31, 32, 33, 65, 100] {
            var rng = TestRandom(seed: UInt64(n))
            var values = (0..<(n * n)).map { _ in rng.uniform() }
            let before = values
            values.withUnsafeMutableBufferPointer { Linalg.mirrorUpperToLower($0.baseAddress!, n: n) }
            for i in 0..<n {
                for j in 0..<n {
                    let want = j >= i ? before[i * n + j] : before[j * n + i]
                    XCTAssertEqual(values[i * n + j], want, "n \(n) (\(i), \(j))")
                }
            }
        }
    }

    func testGemmMatchesReferenceForAllTransposes() {
        var rng = TestRandom(seed: 1)
        let a = rng.matrix(7, 5), b = rng.matrix(5, 9)
        let expected = referenceProduct(a, b)
        XCTAssertLessThan(Linalg.matmul(a, .none, b, .none).maxAbsDifference(expected), 1e-5)
        XCTAssertLessThan(Linalg.matmul(a.transposed(), .transposed, b, .none).maxAbsDifference(expected), 1e-5)
        XCTAssertLessThan(Linalg.matmul(a, .none, b.transposed(), .transposed).maxAbsDifference(expected), 1e-5)
        XCTAssertLessThan(Linalg.linear(a, b.transposed()).maxAbsDifference(expected), 1e-5)
    }

    /// A real model's products are cut into enough tiles for a many-core node's threads (they were
    /// 8 at every size, so 8 threads); SmolLM2's block products keep their 8 tiles.
    func testLargeProductsHaveTilesForManyThreads() {
        func tiles(_ m: Int, _ n: Int, _ k: Int) -> Int {
            let (rows, cols) = Linalg.gemmTiles(m: m, n: n, k: k)
            return ((m + rows - 1) / rows) * ((n + cols - 1) / cols)
        }
        XCTAssertGreaterThanOrEqual(tiles(2048, 4096, 4096), 64, "a 7B's q_proj over 2048 tokens")
        XCTAssertGreaterThanOrEqual(tiles(2048, 28672, 8192), 256, "a 70B's gate_proj over 2048 tokens")
        for (m, n, k) in [(512, 576, 576), (512, 1536, 576), (512, 576, 1536), (2048, 1536, 576), (2048, 576, 1536)] {
            XCTAssertEqual(tiles(m, n, k), 8, "SmolLM2 \(m)x\(n)x\(k)")
        }
    }

    func testGemmAccumulatesWithBeta() {
        var rng = TestRandom(seed: 2)
        let a = rng.matrix(4, 3), b = rng.matrix(3, 4)
        var c = Matrix(rows: 4, cols: 4, repeating: 1)
        Linalg.gemm(a, b, alpha: 2, beta: 1, into: &c)
        let ref = referenceProduct(a, b)
        for i in 0..<4 { for j in 0..<4 { XCTAssertEqual(c[i, j], 1 + 2 * ref[i, j], accuracy: 1e-5) } }
    }

    func testSyrkAccumulatesXTransposeXInBothTriangles() {
        var rng = TestRandom(seed: 3)
        let x = rng.matrix(20, 6)
        var h = Matrix(rows: 6, cols: 6)
        Linalg.syrkAccumulate(x, alpha: 0.5, into: &h)
        Linalg.syrkAccumulate(x, alpha: 0.5, into: &h)
        let ref = referenceProduct(x.transposed(), x)
        XCTAssertLessThan(h.maxAbsDifference(ref), 1e-4)
        for i in 0..<6 { for j in 0..<6 { XCTAssertEqual(h[i, j], h[j, i]) } }
    }

    func spd(_ n: Int, seed: UInt64) -> Matrix {
        var rng = TestRandom(seed: seed)
        let x = rng.matrix(3 * n, n)
        var h = Linalg.matmul(x, .transposed, x, .none)
        for i in 0..<n { h[i, i] += 0.1 }
        return h
    }

    func testCholeskyFactorsReproduceTheMatrix() throws {
        let h = spd(12, seed: 4)
        let u = try Linalg.cholesky(h, upper: true)
        XCTAssertLessThan(Linalg.matmul(u, .transposed, u, .none).maxAbsDifference(h), 1e-3)
        for i in 0..<12 { for j in 0..<i { XCTAssertEqual(u[i, j], 0) } }
        let l = try Linalg.cholesky(h, upper: false)
        XCTAssertLessThan(Linalg.matmul(l, .none, l, .transposed).maxAbsDifference(h), 1e-3)
    }

    func testInverseAndSolves() throws {
        let h = spd(10, seed: 5)
        let inv = try Linalg.inverseSPD(h)
        XCTAssertLessThan(Linalg.matmul(h, inv).maxAbsDifference(.identity(10)), 1e-3)
        let inv64 = try Linalg.inverseSPDDouble(h)
        XCTAssertLessThan(Linalg.matmul(h, inv64).maxAbsDifference(.identity(10)), 1e-4)
        var rng = TestRandom(seed: 6)
        let b = rng.matrix(10, 3)
        let x = try Linalg.solveSPD(h, b)
        XCTAssertLessThan(Linalg.matmul(h, x).maxAbsDifference(b), 1e-3)
        let u = try Linalg.cholesky(h, upper: true)
        let y = Linalg.solveTriangular(u, b, upper: true)
        XCTAssertLessThan(Linalg.matmul(u, y).maxAbsDifference(b), 1e-3)
        let z = Linalg.solveTriangular(u, b, upper: true, transpose: true)
        XCTAssertLessThan(Linalg.matmul(u, .transposed, z, .none).maxAbsDifference(b), 1e-3)
    }

    /// U with A⁻¹ = UᵀU from one Cholesky of the reversed matrix and a triangular inverse: the
    /// same factor (unique with a positive diagonal) as the Cholesky of the explicit inverse, on
    /// a matrix of several tiles whose conditioning (about 10⁴) is a damped Hessian's.
    func testInverseCholeskyFactorIsTheCholeskyOfTheInverse() throws {
        var rng = TestRandom(seed: 21)
        var x = rng.matrix(600, 300)
        x.withUnsafeMutableBufferPointer { p in for i in p.indices { p[i] -= 0.5 } }
        var h = Matrix(rows: 300, cols: 300)
        Linalg.syrkAccumulate(x, alpha: 2 / 600, into: &h)
        for i in 0..<300 { h[i, i] += 0.01 * h[i, i] }
        let u = try Linalg.inverseCholeskyUpper(h)
        for i in 0..<300 {
            XCTAssertGreaterThan(u[i, i], 0)
            for j in 0..<i { XCTAssertEqual(u[i, j], 0, "U[\(i), \(j)] below the diagonal") }
        }
        let viaInverse = try Linalg.cholesky(try Linalg.inverseSPDDouble(h), upper: true)
        let scale = viaInverse.values.map { abs($0) }.max()!
        XCTAssertLessThan(u.maxAbsDifference(viaInverse) / scale, 1e-3)
        // UᵀU H = I.
        let product = Linalg.matmul(Linalg.matmul(u, .transposed, u, .none), h)
        XCTAssertLessThan(product.maxAbsDifference(.identity(300)), 1e-2)
        // The backends' in-place form (SparseGPT's: A's memory becomes U) gives their U's bits: on
        // the CPU (which factors A's own memory), through the checking wrapper, and through the
        // protocol's default (Float64's: U computed apart, then copied).
        for backend in [CPUBackend(), CheckingBackend(), Float64Backend()] as [any ComputeBackend] {
            let a = backend.upload(h)
            let kept = backend.upload(h)
            try backend.inverseCholeskyFactorInPlace(a, what: "test")
            XCTAssertEqual(backend.download(a), backend.download(try backend.inverseCholeskyFactor(backend.upload(h), what: "test")), "\(backend.name)")
            XCTAssertEqual(backend.download(kept), h, "\(backend.name): another tensor of A's values is left as it was")
        }
        var m = Matrix.identity(4)
        m[2, 2] = -1
        XCTAssertThrowsError(try Linalg.inverseCholeskyUpper(m, what: "test")) { error in
            // The reversed matrix's second leading minor: A's last two rows and columns.
            XCTAssertEqual(error as? LinalgError, .notPositiveDefinite(what: "test (factored from its last row: minor 2 is its last 2 rows and columns)", minor: 2))
        }
    }

    /// The statistics' XᵀX: however its rows are split into whole tiles (replicas each sum some),
    /// each element has the bits of the whole update, at the side SmolLM2 uses and at a 70B's.
    /// (Across sides the bits are not the same on every kernel: Haswell's differ.)
    func testSyrkBitsDoNotDependOnHowItsRowsAreSplit() {
        XCTAssertEqual(Linalg.syrkTile(1536), 128)
        XCTAssertEqual(Linalg.syrkTile(28672), 256)
        let n = 1300, k = 96
        var rng = TestRandom(seed: 31)
        let a = rng.matrix(k, n)
        func upper(side: Int, splits: [Range<Int>]? = nil) -> [Float] {
            var c = [Float](repeating: 0.5, count: n * n)
            a.withUnsafeBufferPointer { pa in
                c.withUnsafeMutableBufferPointer { pc in
                    for rows in splits ?? [0..<n] {
                        Linalg.syrkUpper(n: n, k: k, alpha: 0.25, a: pa.baseAddress!, lda: n, c: pc.baseAddress!, ldc: n,
                                         rows: rows, side: side)
                    }
                }
            }
            return (0..<n).flatMap { i in (i..<n).map { c[i * n + $0] } }
        }
        for (side, splits) in [(128, [0..<256, 256..<384, 384..<1300]), (256, [0..<512, 512..<768, 768..<1300])] {
            let whole = upper(side: side)
            let parts = upper(side: side, splits: splits)
            let differing = zip(whole, parts).filter { $0.bitPattern != $1.bitPattern }.count
            XCTAssertEqual(differing, 0, "side \(side), rows \(splits): \(differing) elements differ")
            // Against the definition.
            var worst: Float = 0
            for i in stride(from: 0, to: n, by: 37) {
                for j in stride(from: i, to: n, by: 41) {
                    var sum = 0.0
                    for r in 0..<k { sum += Double(a[r, i]) * Double(a[r, j]) }
                    let index = i * n - i * (i - 1) / 2 + (j - i)
                    worst = max(worst, abs(whole[index] - Float(0.5 + 0.25 * sum)))
                }
            }
            XCTAssertLessThan(worst, 1e-3, "side \(side)")
        }
    }

    func testCholeskyOfIndefiniteMatrixThrows() {
        var m = Matrix.identity(3)
        m[1, 1] = -1
        XCTAssertThrowsError(try Linalg.cholesky(m, upper: true, what: "test")) { error in
            XCTAssertEqual(error as? LinalgError, .notPositiveDefinite(what: "test", minor: 2))
        }
    }

    func testMatrixValueSemantics() {
        var a = Matrix(rows: 2, cols: 2, values: [1, 2, 3, 4])
        let b = a
        a[0, 0] = 9
        XCTAssertEqual(b[0, 0], 1)
        XCTAssertEqual(a.transposed().values, [9, 3, 2, 4])
        XCTAssertEqual(Matrix.vstack([a.rows(0..<1), b.rows(1..<2)]).values, [9, 2, 3, 4])
        XCTAssertEqual(a.columns(1..<2).values, [2, 4])
        XCTAssertEqual(Matrix(rows: 2, cols: 3).zeroCount, 6)
    }
    /// Bits, not tolerances: every routine gives the same bits at 1, 2 and 3 threads, on shapes
    /// large enough to be cut into several tiles and panels (issue 12: output bytes may not
    /// depend on --threads). Accuracy is checked against the definitions as well.
    /// C·A⁻¹ with C's rows as the right-hand sides as they lie, in chunks over the threads: the
    /// bits of one row-major `dposv` of the transposes at 1, 2 and 3 threads (a chunk boundary
    /// inside the rows, a short last chunk, fewer rows than a chunk), and the solve itself.
    func testRightSolveGivesTheBitsOfOneSolveOfTheTransposes() throws {
        let saved = Linalg.threadCount
        defer { Linalg.setThreadCount(saved) }
        var rng = TestRandom(seed: 21)
        for (n, k) in [(300, 517), (97, 256), (64, 5), (1, 3)] {
            let x = rng.matrix(n + 40, n)
            var a = Matrix(rows: n, cols: n)
            Linalg.syrkAccumulate(x, alpha: 1, into: &a)
            for i in 0..<n { a[i, i] += 0.05 }
            let c = rng.matrix(k, n)
            let reference = try Linalg.solveSPDDouble(a, c.transposed()).transposed()
            for threads in [1, 2, 3] {
                Linalg.setThreadCount(threads)
                let right = try Linalg.solveSPDDoubleRight(a, c)
                let differing = zip(right.values, reference.values).filter { $0.bitPattern != $1.bitPattern }.count
                XCTAssertEqual(differing, 0, "\(n) x \(n), \(k) rows, \(threads) threads: \(differing) elements differ")
            }
            XCTAssertLessThan(referenceProduct(reference, a).maxAbsDifference(c), 1e-3, "\(n) x \(n)")
        }
        var indefinite = Matrix.identity(4)
        indefinite[2, 2] = -1
        XCTAssertThrowsError(try Linalg.solveSPDDoubleRight(indefinite, Matrix(rows: 2, cols: 4), what: "refit")) { error in
            XCTAssertTrue("\(error)".contains("refit"), "\(error)")
        }
    }

    /// The fp64 solves take their Float64 working space from the cache of mappings behind
    /// tensors: while one runs, its copies of A and C are counted as in use there, and the second
    /// of two solves of the same shapes maps nothing new.
    func testFloat64SolvesTakeTheirWorkingSpaceFromTheMappingCache() throws {
        var rng = TestRandom(seed: 23)
        let n = 300, k = 200                           // 720 KB and 480 KB as Float64
        let x = rng.matrix(n + 40, n)
        var a = Matrix(rows: n, cols: n)
        Linalg.syrkAccumulate(x, alpha: 1, into: &a)
        for i in 0..<n { a[i, i] += 0.05 }
        let c = rng.matrix(k, n)
        let idle = MappedBuffers.shared.live
        let inUse = Linalg.withDoubles(of: a) { d in
            Linalg.withDoubles(of: c) { e in
                XCTAssertEqual(d[n + 1], Double(a[1, 1]))
                XCTAssertEqual(e[k * n - 1], Double(c[k - 1, n - 1]))
                return MappedBuffers.shared.live - idle
            }
        }
        XCTAssertGreaterThanOrEqual(inUse, 8 * (n * n + k * n), "the Float64 copies are not in the mapping cache")
        func solves() throws {
            _ = try Linalg.solveSPDDoubleRight(a, c)
            _ = try Linalg.solveSPDDouble(a, c.transposed())
            _ = try Linalg.inverseSPDDouble(a)
        }
        try solves()
        let mapped = MappedBuffers.shared.mappings
        try solves()
        XCTAssertEqual(MappedBuffers.shared.mappings, mapped, "a repeated solve mapped new memory")
    }

    func testEveryRoutineGivesTheSameBitsAtAnyThreadCount() throws {
        let saved = Linalg.threadCount
        defer { Linalg.setThreadCount(saved) }
        var rng = TestRandom(seed: 12)
        let a = rng.matrix(700, 300), b = rng.matrix(300, 620), bt = b.transposed()
        var x = rng.matrix(900, 300)
        x.withUnsafeMutableBufferPointer { p in for i in p.indices { p[i] -= 0.5 } }
        var spd = Matrix(rows: 300, cols: 300)
        Linalg.syrkAccumulate(x, alpha: 1 / 900, into: &spd)
        for i in 0..<300 { spd[i, i] += 0.01 }

        func results() throws -> [Matrix] {
            var acc = Matrix(rows: 300, cols: 300, values: Array(repeating: 0.25, count: 300 * 300))
            Linalg.syrkAccumulate(x, alpha: 0.5, into: &acc)
            var c = Matrix(rows: 700, cols: 620, values: Array(repeating: 1, count: 700 * 620))
            Linalg.gemm(a, .none, bt, .transposed, alpha: -0.5, beta: 1, into: &c)
            return [Linalg.matmul(a, b), Linalg.matmul(a.transposed(), .transposed, bt, .transposed), c, acc,
                    try Linalg.cholesky(spd, upper: true), try Linalg.cholesky(spd, upper: false), try Linalg.inverseSPD(spd),
                    try Linalg.inverseCholeskyUpper(spd)]
        }
        Linalg.setThreadCount(1)
        let one = try results()
        for threads in [2, 3] {
            Linalg.setThreadCount(threads)
            let other = try results()
            for (k, (p, q)) in zip(one, other).enumerated() {
                let differing = zip(p.values, q.values).filter { $0.bitPattern != $1.bitPattern }.count
                XCTAssertEqual(differing, 0, "result \(k): \(differing) elements differ between 1 and \(threads) threads")
            }
        }
        let reference = referenceProduct(a, b)
        XCTAssertLessThan(one[0].maxAbsDifference(reference), 1e-3)
        XCTAssertLessThan(one[1].maxAbsDifference(reference), 1e-3)
        let u = one[4], l = one[5], inverse = one[6]
        XCTAssertLessThan(Linalg.matmul(u, .transposed, u, .none).maxAbsDifference(spd), 1e-5)
        XCTAssertLessThan(Linalg.matmul(l, .none, l, .transposed).maxAbsDifference(spd), 1e-5)
        for i in 0..<300 { for j in 0..<i { XCTAssertEqual(u[i, j], 0); XCTAssertEqual(l[j, i], 0) } }
        var identity = Matrix(rows: 300, cols: 300)
        for i in 0..<300 { identity[i, i] = 1 }
        XCTAssertLessThan(Linalg.matmul(spd, inverse).maxAbsDifference(identity), 1e-3)
        XCTAssertEqual(inverse.maxAbsDifference(inverse.transposed()), 0)
        // A matrix that is not positive definite names the leading minor past the first panel.
        var bad = spd
        bad[200, 200] = -1
        XCTAssertThrowsError(try Linalg.cholesky(bad, upper: false)) { error in
            XCTAssertEqual(error as? LinalgError, .notPositiveDefinite(what: "cholesky", minor: 201))
        }
    }
}
