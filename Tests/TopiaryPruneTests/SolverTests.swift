import XCTest
import TopiaryTensor
import TopiaryTestSupport
@testable import TopiaryPrune

/// Deterministic test data (SplitMix64 → uniform in [-1, 1)).
struct Random {
    var generator: SplitMix64
    init(_ seed: UInt64) { generator = SplitMix64(seed: seed) }
    mutating func next() -> Float { generator.uniform() }
    mutating func matrix(_ r: Int, _ c: Int) -> Matrix { Matrix(rows: r, cols: c, values: (0..<(r * c)).map { _ in next() }) }
}

/// A calibration problem with correlated, unevenly scaled input features, like real activations.
struct Problem {
    let weight: Matrix
    let inputs: Matrix        // [tokens x cols]
    let stats: LayerStatistics

    init(rows: Int, cols: Int, tokens: Int, seed: UInt64) {
        var rng = Random(seed)
        weight = rng.matrix(rows, cols)
        let latent = rng.matrix(tokens, cols / 2)
        let mix = rng.matrix(cols / 2, cols)
        var x = HostMath.matmul(latent, mix)
        let noise = rng.matrix(tokens, cols)
        x.withUnsafeMutableBufferPointer { p in
            noise.withUnsafeBufferPointer { n in
                for t in 0..<tokens { for j in 0..<cols {
                    // Feature scales from 0.1 to 3: outlier features as in LLM activations.
                    p[t * cols + j] = (p[t * cols + j] + 0.3 * n[t * cols + j]) * (0.1 + 2.9 * Float(j % 7) / 6)
                } }
            }
        }
        inputs = x
        stats = LayerStatistics(columns: cols)
        // Four "sequences" of the tokens.
        let per = tokens / 4
        for s in 0..<4 { stats.add(x.rows((s * per)..<((s + 1) * per))) }
    }

    /// ‖W Xᵀ − Ŵ Xᵀ‖² / ‖W Xᵀ‖² computed directly from the inputs.
    func error(_ pruned: Matrix) -> Double {
        let dense = HostMath.linear(inputs, weight)
        let approx = HostMath.linear(inputs, pruned)
        var num = 0.0
        dense.withUnsafeBufferPointer { a in approx.withUnsafeBufferPointer { b in
            for i in 0..<a.count { let d = Double(a[i] - b[i]); num += d * d }
        } }
        return num / dense.squaredNorm
    }
}

final class SolverTests: XCTestCase {
    func testSparseGPTBeatsWandaAndMagnitudeOnReconstruction() throws {
        let problem = Problem(rows: 48, cols: 256, tokens: 1024, seed: 7)
        for pattern in [SparsityPattern.unstructured(0.5), .unstructured(0.7), .nOfM(n: 2, m: 4)] {
            let magnitude = MagnitudePruner.prune(problem.weight, pattern: pattern)
            let wanda = WandaPruner.prune(problem.weight, inputSquaredNorms: problem.stats.squaredNorms, pattern: pattern)
            let sparsegpt = try SparseGPTPruner.prune(problem.weight, hessian: problem.stats.hessian, pattern: pattern).weight
            let (em, ew, es) = (problem.error(magnitude), problem.error(wanda), problem.error(sparsegpt))
            XCTAssertLessThan(es, ew, "\(pattern): SparseGPT \(es) vs Wanda \(ew)")
            XCTAssertLessThan(ew, em, "\(pattern): Wanda \(ew) vs magnitude \(em)")
            // The Hessian-based error in the report agrees with the direct one.
            var delta = problem.weight
            delta.withUnsafeMutableBufferPointer { d in sparsegpt.withUnsafeBufferPointer { s in for i in d.indices { d[i] -= s[i] } } }
            XCTAssertEqual(problem.stats.quadraticForm(delta) / problem.stats.quadraticForm(problem.weight), es, accuracy: es * 1e-3)
        }
    }

    func testNOfMMasksAreExactInEveryGroup() throws {
        let problem = Problem(rows: 16, cols: 128, tokens: 256, seed: 3)
        for (n, m) in [(2, 4), (4, 8), (1, 4)] {
            let pattern = SparsityPattern.nOfM(n: n, m: m)
            let results = [
                MagnitudePruner.prune(problem.weight, pattern: pattern),
                WandaPruner.prune(problem.weight, inputSquaredNorms: problem.stats.squaredNorms, pattern: pattern),
                try SparseGPTPruner.prune(problem.weight, hessian: problem.stats.hessian, pattern: pattern).weight,
            ]
            for (k, w) in results.enumerated() {
                for r in 0..<w.rows {
                    for g in stride(from: 0, to: w.cols, by: m) {
                        let zeros = (g..<(g + m)).filter { w[r, $0] == 0 }.count
                        XCTAssertEqual(zeros, n, "solver \(k), \(n):\(m), row \(r), group \(g)")
                    }
                }
            }
        }
    }

    /// Reference rules: magnitude prunes |W| <= sorted(|W|)[int(numel·s)]: int(numel·s)+1 weights
    /// when values are distinct; Wanda prunes exactly int(cols·s) per row where cols·s is whole
    /// (and round(rows·cols·s) in all, spread over the rows, where it is not); SparseGPT prunes
    /// int(rows·count·s)+1 per 128-column block.
    func testPrunedCountsFollowTheReferenceRules() throws {
        let problem = Problem(rows: 20, cols: 300, tokens: 512, seed: 5)
        let s = 0.6
        let w = problem.weight
        XCTAssertEqual(MagnitudePruner.prune(w, pattern: .unstructured(s)).zeroCount, Int(Double(w.count) * s) + 1)
        let wanda = WandaPruner.prune(w, inputSquaredNorms: problem.stats.squaredNorms, pattern: .unstructured(s))
        for r in 0..<w.rows { XCTAssertEqual(wanda.rows(r..<(r + 1)).zeroCount, Int(300 * s)) }
        // 0.7 of 300 columns is 210 (whole); 0.7013 is 210.39 a row, 4207.8 over 20 rows: 4208
        // in all, rows of 210 and 211 (8 of them), the extra rows spread out.
        let owl = WandaPruner.prune(w, inputSquaredNorms: problem.stats.squaredNorms, pattern: .unstructured(0.7013))
        XCTAssertEqual(owl.zeroCount, 4208)
        let perRow = (0..<w.rows).map { owl.rows($0..<($0 + 1)).zeroCount }
        XCTAssertEqual(perRow, WandaPruner.rowCounts(rows: 20, cols: 300, fraction: 0.7013))
        XCTAssertEqual(Set(perRow), [210, 211])
        XCTAssertEqual(perRow.filter { $0 == 211 }.count, 8)
        XCTAssertFalse(perRow[0..<10].allSatisfy { $0 == 211 } || perRow[10...].allSatisfy { $0 == 211 }, "extra rows spread: \(perRow)")
        // The extra weights of a row are its next-smallest scores: the 210 of the floor are kept.
        let floor = WandaPruner.prune(w, inputSquaredNorms: problem.stats.squaredNorms, pattern: .unstructured(0.7))
        for i in 0..<w.count where floor.values[i] == 0 { XCTAssertEqual(owl.values[i], 0) }
        let sgpt = try SparseGPTPruner.prune(w, hessian: problem.stats.hessian, pattern: .unstructured(s)).weight
        var expected = 0
        for start in stride(from: 0, to: 300, by: 128) {
            let count = min(128, 300 - start)
            expected += Int(Double(20 * count) * s) + 1
            XCTAssertEqual(sgpt.columns(start..<(start + count)).zeroCount, Int(Double(20 * count) * s) + 1, "block at \(start)")
        }
        XCTAssertEqual(sgpt.zeroCount, expected)
    }

    /// With one weight removed from column 0, the OBS update is the exact least-squares optimum of
    /// the remaining weights: compare with a direct solve of the reduced normal equations.
    func testSparseGPTSingleRemovalIsTheLeastSquaresOptimum() throws {
        let cols = 12
        let problem = Problem(rows: 1, cols: cols, tokens: 400, seed: 11)
        var w = problem.weight
        w[0, 0] = 1e-3   // the smallest score, so column 0 is the one pruned
        // int(12 * 0.05) = 0: exactly one weight (the smallest score) is pruned.
        let result = try SparseGPTPruner.prune(w, hessian: problem.stats.hessian, pattern: .unstructured(0.05),
                                               options: .init(blockSize: 128, percentDamp: 0))
        XCTAssertEqual(result.weight[0, 0], 0)
        XCTAssertEqual(result.weight.zeroCount, 1)
        // Least squares: minimise (w − v) H (w − v)ᵀ over v with v0 = 0:
        // H[1:,1:] v[1:] = (w H)[1:], computed in Double.
        let h = problem.stats.hessian
        var a = [[Double]](repeating: [Double](repeating: 0, count: cols - 1), count: cols - 1)
        var b = [Double](repeating: 0, count: cols - 1)
        for i in 1..<cols {
            for j in 1..<cols { a[i - 1][j - 1] = Double(h[i, j]) }
            b[i - 1] = (0..<cols).reduce(0.0) { $0 + Double(w[0, $1]) * Double(h[$1, i]) }
        }
        let v = Self.solve(a, b)
        for i in 1..<cols { XCTAssertEqual(Double(result.weight[0, i]), v[i - 1], accuracy: 1e-3 * max(1, abs(v[i - 1]))) }
    }

    /// Gaussian elimination with partial pivoting (small dense reference).
    static func solve(_ a0: [[Double]], _ b0: [Double]) -> [Double] {
        var a = a0, b = b0
        let n = b.count
        for k in 0..<n {
            let p = (k..<n).max { abs(a[$0][k]) < abs(a[$1][k]) }!
            a.swapAt(k, p); b.swapAt(k, p)
            for i in (k + 1)..<n {
                let f = a[i][k] / a[k][k]
                for j in k..<n { a[i][j] -= f * a[k][j] }
                b[i] -= f * b[k]
            }
        }
        var x = [Double](repeating: 0, count: n)
        for i in stride(from: n - 1, through: 0, by: -1) {
            x[i] = (b[i] - ((i + 1)..<n).reduce(0.0) { $0 + a[i][$1] * x[$1] }) / a[i][i]
        }
        return x
    }

    func testDeadInputsAndDampingLeaveTheHessianUntouched() throws {
        let problem = Problem(rows: 8, cols: 64, tokens: 128, seed: 13)
        var h = problem.stats.hessian
        // Input 5 never active: zero row and column.
        h.withUnsafeMutableBufferPointer { p in for j in 0..<64 { p[5 * 64 + j] = 0; p[j * 64 + 5] = 0 } }
        let copy = h
        let result = try SparseGPTPruner.prune(problem.weight, hessian: h, pattern: .unstructured(0.5))
        XCTAssertEqual(h, copy)
        for r in 0..<8 { XCTAssertEqual(result.weight[r, 5], 0) }
    }

    func testPatternParsingRejectsBadValues() {
        XCTAssertEqual(try SparsityPattern.parse(sparsity: "0.7", pattern: nil), .unstructured(0.7))
        XCTAssertEqual(try SparsityPattern.parse(sparsity: nil, pattern: "2:4"), .nOfM(n: 2, m: 4))
        for (s, p) in [("0", nil), ("1", nil), ("1.5", nil), ("-0.1", nil), ("abc", nil), (nil, "4:4"), (nil, "5:4"), (nil, "0:4"), (nil, "2-4"), ("0.5", "2:4")] as [(String?, String?)] {
            XCTAssertThrowsError(try SparsityPattern.parse(sparsity: s, pattern: p), "\(String(describing: s)) \(String(describing: p))")
        }
        XCTAssertThrowsError(try SparsityPattern.parse(sparsity: nil, pattern: nil))
    }

    func testKthSmallestAgreesWithSorting() {
        var rng = Random(17)
        for n in [1, 2, 7, 100, 1001] {
            let values = (0..<n).map { _ in (rng.next() * 10).rounded() }   // many ties
            let sorted = values.sorted()
            for k in [0, n / 3, n / 2, n - 1] {
                var copy = values
                XCTAssertEqual(Selection.kthSmallest(&copy, k), sorted[k])
                XCTAssertEqual(values.withUnsafeBufferPointer { Selection.kthSmallest($0, k) }, sorted[k])
            }
        }
        // The radix selection over the whole float order: signs, zeros of both signs,
        // subnormals, infinities, values that share their high bits, k out of range.
        var mixed: [Float] = [-.infinity, .infinity, -0.0, 0.0, -.leastNonzeroMagnitude, .leastNonzeroMagnitude,
                              -1, 1, 1.0000001, 0.99999994, -.greatestFiniteMagnitude, .greatestFiniteMagnitude, 2, 2, 2]
        for _ in 0..<500 { mixed.append(rng.next() * Float(1 << Int(abs(rng.next()) * 30))) }
        let sorted = mixed.sorted()
        for k in 0..<mixed.count {
            let t = mixed.withUnsafeBufferPointer { Selection.kthSmallest($0, k) }
            XCTAssertTrue(t == sorted[k], "k \(k): \(t) against \(sorted[k])")
        }
        XCTAssertEqual(mixed.withUnsafeBufferPointer { Selection.kthSmallest($0, -5) }, sorted[0])
        XCTAssertEqual(mixed.withUnsafeBufferPointer { Selection.kthSmallest($0, 10_000) }, sorted.last!)
    }
}

/// Our SparseGPT against a literal, unoptimised transcription of the reference `fasterprune`
/// (research A1) in Double: whole-block outer-product updates, full sort for the threshold.
final class SparseGPTReferenceTests: XCTestCase {
    func referenceFasterPrune(_ w0: Matrix, _ h0: Matrix, sparsity: Double, n: Int = 0, m: Int = 0, blocksize: Int = 128) throws -> [[Double]] {
        let rows = w0.rows, cols = w0.cols
        var w = (0..<rows).map { r in (0..<cols).map { Double(w0[r, $0]) } }
        var h = (0..<cols).map { i in (0..<cols).map { Double(h0[i, $0]) } }
        for j in 0..<cols where h[j][j] == 0 { h[j][j] = 1; for r in 0..<rows { w[r][j] = 0 } }
        let damp = 0.01 * (0..<cols).reduce(0.0) { $0 + h[$1][$1] } / Double(cols)
        for j in 0..<cols { h[j][j] += damp }
        // U = upper Cholesky factor of H⁻¹ (through LAPACK in Double, via Float matrices of the same values).
        let hm = Matrix(rows: cols, cols: cols, values: h.flatMap { $0.map(Float.init) })
        let inv = try HostMath.inverseSPDDouble(hm)
        let uf = try HostMath.cholesky(inv, upper: true)
        let u = (0..<cols).map { i in (0..<cols).map { Double(uf[i, $0]) } }
        var i1 = 0
        while i1 < cols {
            let i2 = min(i1 + blocksize, cols), count = i2 - i1
            var w1 = w.map { Array($0[i1..<i2]) }
            var err1 = [[Double]](repeating: [Double](repeating: 0, count: count), count: rows)
            var mask = [[Bool]](repeating: [Bool](repeating: false, count: count), count: rows)
            if n == 0 {
                var scores: [Double] = []
                for r in 0..<rows { for c in 0..<count { scores.append(w1[r][c] * w1[r][c] / (u[i1 + c][i1 + c] * u[i1 + c][i1 + c])) } }
                let threshold = scores.sorted()[Int(Double(scores.count) * sparsity)]
                for r in 0..<rows { for c in 0..<count { mask[r][c] = scores[r * count + c] <= threshold } }
            }
            for i in 0..<count {
                let d = u[i1 + i][i1 + i]
                if n > 0 && i % m == 0 {
                    for r in 0..<rows {
                        let group = (i..<min(i + m, count)).sorted { a, b in
                            let sa = w1[r][a] * w1[r][a] / pow(u[i1 + a][i1 + a], 2), sb = w1[r][b] * w1[r][b] / pow(u[i1 + b][i1 + b], 2)
                            return sa < sb || (sa == sb && a < b)
                        }
                        for c in group.prefix(n) { mask[r][c] = true }
                    }
                }
                for r in 0..<rows {
                    let q = mask[r][i] ? 0 : w1[r][i]
                    let e = (w1[r][i] - q) / d
                    for j in i..<count { w1[r][j] -= e * u[i1 + i][i1 + j] }
                    w1[r][i] = q
                    err1[r][i] = e
                }
            }
            for r in 0..<rows {
                for c in 0..<count { w[r][i1 + c] = w1[r][c] }
                for j in i2..<cols { for c in 0..<count { w[r][j] -= err1[r][c] * u[i1 + c][j] } }
            }
            i1 = i2
        }
        return w
    }

    func testAgreesWithTheReferenceAlgorithm() throws {
        let problem = Problem(rows: 24, cols: 300, tokens: 1200, seed: 31)
        for (pattern, n, m) in [(SparsityPattern.unstructured(0.7), 0, 0), (.unstructured(0.5), 0, 0), (.nOfM(n: 2, m: 4), 2, 4)] {
            let ours = try SparseGPTPruner.prune(problem.weight, hessian: problem.stats.hessian, pattern: pattern).weight
            let reference = try referenceFasterPrune(problem.weight, problem.stats.hessian, sparsity: pattern.fraction, n: n, m: m)
            var agree = 0
            var largest = 0.0, scale = 0.0
            for r in 0..<24 {
                for c in 0..<300 {
                    if (ours[r, c] == 0) == (reference[r][c] == 0) { agree += 1 }
                    largest = max(largest, abs(Double(ours[r, c]) - reference[r][c]))
                    scale = max(scale, abs(reference[r][c]))
                }
            }
            // Masks may differ only where two scores tie to within fp32 rounding.
            XCTAssertGreaterThanOrEqual(Double(agree) / Double(24 * 300), 0.999, "\(pattern)")
            XCTAssertLessThan(largest, 1e-3 * scale, "\(pattern)")
        }
    }
}
