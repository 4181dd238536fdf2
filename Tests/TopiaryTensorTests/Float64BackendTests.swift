import XCTest
import Synchronization
@testable import TopiaryTensor

/// Float64Backend against CPUBackend: every operation of the protocol on small random inputs,
/// the results within Float32 rounding of each other (the CPU's error, not the Float64 one's),
/// and a case where Float32's rounding is visible and Float64's is not.
final class Float64BackendTests: XCTestCase {
    let cpu = CPUBackend()
    let f64 = Float64Backend()
    var both: [any ComputeBackend] { [cpu, f64] }

    /// Both backends' results of `body` on the same host inputs, within `tolerance` of each other
    /// relative to the largest magnitude (1 at least).
    func agree(_ what: String, tolerance: Float = 1e-5, _ body: (any ComputeBackend) throws -> Matrix) rethrows {
        let (a, b) = (try body(cpu), try body(f64))
        XCTAssertEqual(a.rows, b.rows, what)
        XCTAssertEqual(a.cols, b.cols, what)
        let scale = max(1, a.values.map { Swift.abs($0) }.max() ?? 0)
        XCTAssertLessThanOrEqual(a.maxAbsDifference(b), tolerance * scale, what)
    }

    func agree(_ what: String, tolerance: Double = 1e-5, scalar body: (any ComputeBackend) -> Double) {
        let (a, b) = (body(cpu), body(f64))
        XCTAssertEqual(a, b, accuracy: tolerance * max(1, Swift.abs(a)), what)
    }

    func testTransfersAndDType() {
        let m = Matrix(rows: 2, cols: 3, values: [1, 2, 3, 4, 5, 0.1])
        let t = f64.upload(m)
        XCTAssertEqual(t.dtype, .float64)
        XCTAssertEqual(t.byteCount, 48)
        XCTAssertEqual(f64.download(t), m)
        XCTAssertEqual(f64.downloadValues(t)[5], Double(Float(0.1)))
        let c = f64.copy(t)
        f64.scale(c, by: 0)
        XCTAssertEqual(f64.download(t), m)
        let checking = CheckingBackend(f64)
        XCTAssertEqual(checking.download(checking.matmul(checking.upload(m), .none, checking.upload(m), .transposed))[0, 0], 14)
        XCTAssertEqual(checking.violations, [])
    }

    func testDenseLinearAlgebra() throws {
        var rng = TestRandom(seed: 21)
        let a = rng.matrix(9, 7), b = rng.matrix(8, 10), c0 = rng.matrix(6, 12)
        agree("gemm on regions") { k in
            let c = k.upload(c0)
            k.gemm(k.upload(a).region(rows: 2..<6, cols: 1..<6), .none, k.upload(b).region(rows: 1..<7, cols: 3..<8), .transposed,
                   alpha: 0.5, beta: 2, into: c.region(rows: 1..<5, cols: 2..<8))
            return k.download(c)
        }
        agree("gemm transposed A") { k in k.download(k.matmul(k.upload(a), .transposed, k.upload(a), .none)) }
        let x = rng.matrix(300, 140)   // more than one 128 tile
        func hessian(_ k: any ComputeBackend) -> Tensor {
            let h = k.zeros(rows: 140, cols: 140)
            k.syrkAccumulate(k.upload(x), alpha: 0.5, into: h)
            k.syrkAccumulate(k.upload(x), alpha: 0.5, into: h)
            k.addToDiagonal(h, 1)
            return h
        }
        agree("syrk") { k in k.download(hessian(k)) }
        for upper in [true, false] {
            try agree("cholesky upper \(upper)", tolerance: 1e-4) { k in k.download(try k.cholesky(hessian(k), upper: upper, what: "t")) }
        }
        try agree("inverseSPD", tolerance: 1e-4) { k in k.download(try k.inverseSPD(hessian(k), what: "t")) }
        try agree("inverseSPDDouble", tolerance: 1e-4) { k in k.download(try k.inverseSPDDouble(hessian(k), what: "t")) }
        let rhs = rng.matrix(140, 3)
        try agree("solveSPDDouble", tolerance: 1e-4) { k in k.download(try k.solveSPDDouble(hessian(k), k.upload(rhs), what: "t")) }
        for (upper, transpose) in [(true, false), (true, true), (false, false), (false, true)] {
            try agree("solveTriangular \(upper) \(transpose)", tolerance: 1e-4) { k in
                let factor = try k.cholesky(hessian(k), upper: upper, what: "t")
                return k.download(k.solveTriangular(factor, k.upload(rhs), upper: upper, transpose: transpose))
            }
        }
        agree("transpose") { k in k.download(k.transpose(k.upload(b))) }
        XCTAssertThrowsError(try f64.cholesky(f64.upload(Matrix(rows: 2, cols: 2, values: [1, 2, 2, 1])), upper: false, what: "indefinite")) { e in
            XCTAssertEqual(e as? LinalgError, .notPositiveDefinite(what: "indefinite", minor: 2))
        }
        XCTAssertThrowsError(try f64.inverseSPD(f64.upload(Matrix(rows: 2, cols: 2, values: [1, 2, 2, 1])), what: "indefinite"))
    }

    func testElementwiseReductionsAndSelections() {
        var rng = TestRandom(seed: 22)
        let x = rng.matrix(5, 37), y = rng.matrix(5, 37), v = rng.matrix(1, 37)
        let positive = Matrix(rows: 1, cols: 37, values: v.values.map { Swift.abs($0) + 0.5 })
        agree("scale") { k in let t = k.upload(x); k.scale(t, by: 0.3); return k.download(t) }
        agree("scaleAdd") { k in let t = k.upload(y); k.scaleAdd(t, beta: 0.7, k.upload(x), alpha: -1.5); return k.download(t) }
        agree("axpy") { k in let t = k.upload(y); k.axpy(2.5, k.upload(x), t); return k.download(t) }
        for f in [ElementwiseFunction.abs, .square, .negate, .relu, .silu, .geluTanh, .nonZero] {
            agree("map \(f)") { k in k.download(k.map(k.upload(x), f)) }
        }
        agree("map squareRoot") { k in k.download(k.map(k.upload(positive), .squareRoot)) }
        agree("multiplyColumns") { k in k.download(k.multiplyColumns(k.upload(x), by: k.upload(v))) }
        agree("divideColumns") { k in k.download(k.divideColumns(k.upload(x), by: k.upload(positive))) }
        agree("multiply") { k in k.download(k.multiply(k.upload(x), k.upload(y))) }
        agree("addRowVector") { k in k.download(k.addRowVector(k.upload(x), k.upload(v))) }
        agree("addRowVector into") { k in let t = k.upload(x); k.addRowVector(k.upload(v), into: t); return k.download(t) }
        agree("add into") { k in let t = k.upload(x); k.add(k.upload(y), into: t); return k.download(t) }
        agree("reshaped") { k in k.download(k.reshaped(k.upload(x), rows: 37, cols: 5)) }
        let square = rng.matrix(6, 6)
        agree("diagonal") { k in k.download(k.diagonal(k.upload(square))) }
        agree("addToDiagonal") { k in let t = k.upload(square); k.addToDiagonal(t, 3); return k.download(t) }
        agree("columnSquaredSums") { k in k.download(k.columnSquaredSums(k.upload(x))) }
        agree("sum", scalar: { k in k.sum(k.upload(x)) })
        agree("dot", scalar: { k in k.dot(k.upload(x), k.upload(y)) })
        agree("chunkedDot", scalar: { k in k.chunkedDot(k.upload(x), k.upload(y)) })
        agree("chunkedSquaredDistance", scalar: { k in k.chunkedSquaredDistance(k.upload(x), k.upload(y)) })
        agree("chunkedSquaredDistanceToProduct", scalar: { k in k.chunkedSquaredDistanceToProduct(k.upload(x), k.upload(y), k.upload(x)) })
        agree("addScaledRows") { k in
            let t = k.upload(y)
            k.addScaledRows(t, k.upload(x), scales: (0..<x.rows).map { Float($0) * 0.5 - 1 })
            return k.download(t)
        }
        let dots = (cpu.rowDots(cpu.upload(x), cpu.upload(y)), f64.rowDots(f64.upload(x), f64.upload(y)))
        XCTAssertEqual(dots.0.count, x.rows)
        for (a, b) in zip(dots.0, dots.1) { XCTAssertEqual(a, b, accuracy: 1e-4 * max(1, abs(b))) }
        XCTAssertTrue(f64.allFinite(f64.upload(x)))
        XCTAssertFalse(f64.allFinite(f64.upload(Matrix(rows: 1, cols: 2, values: [1, .nan]))))
        // Selections, ties included: the same masks.
        let tied = Matrix(rows: 3, cols: 8, values: (0..<24).map { Float($0 % 5) * 0.25 })
        for scores in [x, tied] {
            agree("selectAtMostKthSmallest", tolerance: 0) { k in k.download(k.selectAtMostKthSmallest(k.upload(scores), k: 9)) }
            agree("selectSmallestInRows", tolerance: 0) { k in k.download(k.selectSmallestInRows(k.upload(scores), count: 3)) }
            let counts = (0..<scores.rows).map { [0, 3, scores.cols, 1][$0 % 4] }
            agree("selectSmallestInRows counts", tolerance: 0) { k in k.download(k.selectSmallestInRows(k.upload(scores), counts: counts)) }
            agree("selectNOfM", tolerance: 0) { k in k.download(k.selectNOfM(k.upload(scores), n: 2, m: 3)) }
            agree("rankRows", tolerance: 0) { k in k.download(k.rankRows(k.upload(scores))) }
        }
        agree("zeroMasked") { k in
            let t = k.upload(x)
            k.zeroMasked(t, mask: k.selectSmallestInRows(k.upload(y), count: 10))
            return k.download(t)
        }
    }

    /// rankRows orders each row by value, ties by column, as a comparison sort on (value,
    /// column) does: negative values, both zeros (equal), repeated values, infinities.
    func testRankRowsOrdersByValueThenColumn() {
        var rng = TestRandom(seed: 41)
        let special: [Float] = [0, -0.0, 1, -1, 0.5, -0.5, .infinity, -.infinity, 1e-40, -1e-40]
        let scores = Matrix(rows: 7, cols: 37, values: (0..<(7 * 37)).map { i in
            i % 3 == 0 ? special[(i / 3) % special.count] : Float(Int(rng.uniform() * 8) - 4) * 0.25
        })
        let order = cpu.download(cpu.rankRows(cpu.upload(scores)))
        for r in 0..<scores.rows {
            let expected = (0..<scores.cols).sorted { a, b in
                scores[r, a] < scores[r, b] || (scores[r, a] == scores[r, b] && a < b)
            }
            XCTAssertEqual((0..<scores.cols).map { Int(order[r, $0]) }, expected, "row \(r)")
        }
    }

    /// The attention's backward gives the same bits at 1, 2 and 3 threads, with query heads that
    /// share key/value heads (their dK and dV summed head by head), several sequences, and a soft
    /// cap (a third scratch buffer a worker).
    func testAttentionBackwardBitsDoNotDependOnThreads() {
        let saved = CPUBackend.threadCount
        defer { CPUBackend.setThreadCount(saved) }
        var rng = TestRandom(seed: 43)
        for (t, heads, kvHeads, softcap) in [(300, 6, 2, nil), (40, 3, 3, nil), (40, 4, 1, nil), (70, 4, 2, Float(3))] {
            let (d, sequences) = (8, 3)
            let q = rng.matrix(sequences * t, heads * d), k = rng.matrix(sequences * t, kvHeads * d)
            let v = rng.matrix(sequences * t, kvHeads * d), dOut = rng.matrix(sequences * t, heads * d)
            let shape = AttentionShape(sequenceLength: t, heads: heads, kvHeads: kvHeads, headDim: d)
            var results: [[Float]] = []
            for threads in [1, 2, 3] {
                CPUBackend.setThreadCount(threads)
                let options = AttentionOptions(scale: 1 / Float(d).squareRoot(), softcap: softcap)
                let g = cpu.attentionBackward(q: cpu.upload(q), k: cpu.upload(k), v: cpu.upload(v), outputGradient: cpu.upload(dOut),
                                              shape: shape, options: options)
                results.append([g.dq, g.dk, g.dv].flatMap { cpu.download($0).values })
            }
            for i in 1..<results.count {
                let differing = zip(results[0], results[i]).filter { $0.bitPattern != $1.bitPattern }.count
                XCTAssertEqual(differing, 0, "\(heads)/\(kvHeads) heads, softcap \(softcap.map { "\($0)" } ?? "none"), \([1, 2, 3][i]) threads")
            }
        }
    }

    /// The forward attention over many query and key tiles (sequences of 700 and 300: six and
    /// three query tiles, up to three key tiles, a diagonal tile at every offset), with query
    /// heads sharing key/value heads, a head width that is not a multiple of the products' 16
    /// columns, a sliding window and a soft cap: it agrees with Float64 within 1e-5 and gives
    /// the same bits at 1, 2 and 3 threads.
    func testTiledAttentionAgreesWithFloat64AndNotWithThreads() {
        let saved = CPUBackend.threadCount
        defer { CPUBackend.setThreadCount(saved) }
        var rng = TestRandom(seed: 44)
        for (t, sequences, heads, kvHeads, d) in [(700, 1, 6, 2, 20), (300, 2, 3, 3, 64), (300, 1, 4, 1, 8)] {
            let q = rng.matrix(sequences * t, heads * d), k = rng.matrix(sequences * t, kvHeads * d)
            let v = rng.matrix(sequences * t, kvHeads * d)
            let shape = AttentionShape(sequenceLength: t, heads: heads, kvHeads: kvHeads, headDim: d)
            for options in [AttentionOptions.standard(headDim: d), AttentionOptions(scale: 0.3, window: 290, softcap: 2)] {
                let what = "t \(t), \(heads)/\(kvHeads) heads of \(d), \(options)"
                var results: [[Float]] = []
                for threads in [1, 2, 3] {
                    CPUBackend.setThreadCount(threads)
                    results.append(cpu.download(cpu.attention(q: cpu.upload(q), k: cpu.upload(k), v: cpu.upload(v), shape: shape, options: options)).values)
                }
                for i in 1..<results.count {
                    XCTAssertEqual(zip(results[0], results[i]).filter { $0.bitPattern != $1.bitPattern }.count, 0, "\(what), \([1, 2, 3][i]) threads")
                }
                agree(what) { b in b.download(b.attention(q: b.upload(q), k: b.upload(k), v: b.upload(v), shape: shape, options: options)) }
            }
        }
    }

    /// `forEachTask` runs every task once, and never two at once with the same worker index
    /// (the attention's per-worker scratch relies on it).
    func testForEachTaskWorkersAreExclusive() {
        let saved = CPUBackend.threadCount
        defer { CPUBackend.setThreadCount(saved) }
        for threads in [1, 2, 3] {
            CPUBackend.setThreadCount(threads)
            let tasks = 200
            XCTAssertEqual(Parallel.workers(for: tasks), threads)
            XCTAssertEqual(Parallel.workers(for: 1), 1)
            struct Seen { var busy: [Bool]; var runs: [Int]; var clashes = 0 }
            let seen = Mutex(Seen(busy: Array(repeating: false, count: threads), runs: Array(repeating: 0, count: tasks)))
            Parallel.forEachTask(tasks) { worker, task in
                seen.withLock { s in
                    if s.busy[worker] { s.clashes += 1 }
                    s.busy[worker] = true
                    s.runs[task] += 1
                }
                seen.withLock { $0.busy[worker] = false }
            }
            let result = seen.withLock { $0 }
            XCTAssertEqual(result.clashes, 0, "\(threads) threads: two tasks at once on one worker")
            XCTAssertEqual(result.runs, Array(repeating: 1, count: tasks), "\(threads) threads")
        }
    }

    func testSolverKernels() throws {
        var rng = TestRandom(seed: 23)
        let x = rng.matrix(64, 24), w = rng.matrix(10, 24)
        var hessianHost = referenceProduct(x.transposed(), x)
        for j in 0..<24 { hessianHost[j, j] += 0.5 }
        for j in 0..<10 { hessianHost[3, j] = 0 }   // keep it SPD below: only used by zeroDeadInputs
        let spd = referenceProduct(x.transposed(), x)
        func factor(_ k: any ComputeBackend) throws -> Tensor {
            let h = k.upload(spd)
            k.addToDiagonal(h, 0.5)
            return try k.cholesky(try k.inverseSPD(h, what: "t"), upper: true, what: "t")
        }
        for nOfM in [nil, (n: 2, m: 4)] as [(n: Int, m: Int)?] {
            // The mask from magnitudes with distinct values, so both backends choose the same weights.
            try agree("sparseGPTBlock weights \(nOfM.map { "\($0.n):\($0.m)" } ?? "unstructured")", tolerance: 1e-4) { k in
                let weight = k.upload(w)
                let mask = nOfM == nil ? k.selectSmallestInRows(k.map(weight, .abs), count: 12) : k.zeros(rows: 10, cols: 24)
                let error = k.zeros(rows: 10, cols: 24)
                _ = k.sparseGPTBlock(weight: weight, inverseFactor: try factor(k), mask: mask, nOfM: nOfM, error: error)
                return k.download(k.vstack([weight, mask, error]))
            }
            let losses = try both.map { (k: any ComputeBackend) -> Double in
                let weight = k.upload(w)
                let mask = nOfM == nil ? k.selectSmallestInRows(k.map(weight, .abs), count: 12) : k.zeros(rows: 10, cols: 24)
                return k.sparseGPTBlock(weight: weight, inverseFactor: try factor(k), mask: mask, nOfM: nOfM, error: k.zeros(rows: 10, cols: 24))
            }
            XCTAssertEqual(losses[0], losses[1], accuracy: 1e-4 * losses[1])
        }
        agree("zeroDeadInputs") { k in
            let (h, weight) = (k.upload(hessianHost), k.upload(w))
            let hz = k.copy(h)
            k.scale(hz, by: 0)
            k.copy(h.region(rows: 0..<24, cols: 0..<3), into: hz.region(rows: 0..<24, cols: 0..<3))
            k.zeroDeadInputs(hessian: hz, weight: weight)
            return k.download(k.vstack([hz, weight]))
        }
        let (z0, m, s, p, g) = (rng.matrix(4, 9), rng.matrix(4, 9), rng.matrix(4, 9), rng.matrix(4, 9), rng.matrix(4, 9))
        agree("sparseLLMLlamaZ") { k in let z = k.upload(z0); k.sparseLLMLlamaZ(z, m: k.upload(m), sigma: k.upload(s), p: k.upload(p), alpha: 5, gamma: 2); return k.download(z) }
        agree("sparseLLMOPTZ") { k in let z = k.upload(z0); k.sparseLLMOPTZ(z, m: k.upload(m), p: k.upload(p), alpha: 0.1, gamma: 0.3); return k.download(z) }
        for act in [GatedActivation.silu, .geluTanh, .relu] {
            agree("sparseLLMGate \(act)", tolerance: 1e-4) { k in
                let gate = k.upload(g)
                k.sparseLLMGate(gate, g: k.upload(g), z: k.upload(z0), p: k.upload(p), alpha: 5, gamma: 5, steps: 8, activation: act)
                return k.download(gate)
            }
        }
        // BESA's kernels.
        let order = cpu.download(cpu.rankRows(cpu.upload(w)))
        agree("rankedMask", tolerance: 0) { k in k.download(k.rankedMask(order: k.upload(order), counts: (0..<10).map { $0 * 2 })) }
        // A mask moved in place (rows whose count grows, shrinks or stays) is the mask made afresh.
        let (from, to) = ((0..<10).map { ($0 * 7) % 25 }, (0..<10).map { $0 == 4 ? 3 : ($0 * 11 + 3) % 25 })
        func moved(_ k: any ComputeBackend) -> Matrix {
            let (weight, ranked) = (k.upload(w), k.upload(order))
            let masked = k.rankedMasked(weight, order: ranked, counts: from)
            k.updateRankedMasked(masked, weight: weight, order: ranked, from: from, to: to)
            return k.download(masked)
        }
        agree("updateRankedMasked", tolerance: 0) { k in moved(k) }
        XCTAssertEqual(moved(cpu), cpu.download(cpu.rankedMasked(cpu.upload(w), order: cpu.upload(order), counts: to)))
        let gradient = rng.matrix(10, 24)
        let counts = [0, 3, 12, 24]
        let sums = both.map { $0.rankedPrefixSums($0.upload(gradient), $0.upload(w), order: $0.upload(order), at: counts) }
        for (a, b) in zip(sums[0], sums[1]) { XCTAssertEqual(a, b, accuracy: 1e-6) }
        // On the CPU each row's sums are the one-by-one sums in ranked order, to the bit, for an odd
        // number of rows (rows go two at a time) and repeated counts.
        let (g11, w11) = (rng.matrix(11, 24), rng.matrix(11, 24))
        let order11 = cpu.download(cpu.rankRows(cpu.upload(w11)))
        let counts11 = [0, 0, 5, 5, 17, 24]
        let got = cpu.rankedPrefixSums(cpu.upload(g11), cpu.upload(w11), order: cpu.upload(order11), at: counts11)
        for r in 0..<11 {
            var sum = 0.0
            var expected: [Double] = []
            for j in 0...24 {
                for n in counts11 where n == j { _ = n; expected.append(sum) }
                if j < 24 { let c = Int(order11[r, j]); sum += Double(g11[r, c]) * Double(w11[r, c]) }
            }
            XCTAssertEqual(Array(got[(r * counts11.count)..<((r + 1) * counts11.count)]), expected, "row \(r)")
        }
        let prediction = rng.matrix(8, 5), target = rng.matrix(8, 5)
        agree("channelNormalizedError", scalar: { k in k.channelNormalizedError(target: k.upload(target), prediction: k.upload(prediction)).loss })
        agree("channelNormalizedError gradient") { k in k.download(k.channelNormalizedError(target: k.upload(target), prediction: k.upload(prediction)).gradient) }
    }

    func testModelKernels() {
        var rng = TestRandom(seed: 24)
        let (heads, kvHeads, headDim, t) = (4, 2, 8, 12)
        let q = rng.matrix(2 * t, heads * headDim), kk = rng.matrix(2 * t, kvHeads * headDim), v = rng.matrix(2 * t, kvHeads * headDim)
        let dOut = rng.matrix(2 * t, heads * headDim)
        let weight = rng.matrix(1, 32), bias = rng.matrix(1, 32), dy = rng.matrix(2 * t, 32)
        agree("rmsNorm") { k in k.download(k.rmsNorm(k.upload(q), weight: k.upload(weight), eps: 1e-5)) }
        agree("layerNorm") { k in k.download(k.layerNorm(k.upload(q), weight: k.upload(weight), bias: k.upload(bias), eps: 1e-5)) }
        agree("rmsNormBackward") { k in k.download(k.rmsNormBackward(input: k.upload(q), weight: k.upload(weight), eps: 1e-5, outputGradient: k.upload(dy))) }
        agree("layerNormBackward", tolerance: 1e-4) { k in k.download(k.layerNormBackward(input: k.upload(q), weight: k.upload(weight), eps: 1e-5, outputGradient: k.upload(dy))) }
        let table = Kernels.RopeTable(rotaryDim: headDim, theta: 10000, positions: t)
        for layout in [RopeLayout.adjacentPairs, .rotateHalf] {
            for inverse in [false, true] {
                agree("rope \(layout) inverse \(inverse)") { k in
                    let x = k.upload(q)
                    k.rope(x, heads: heads, headDim: headDim, sequenceLength: t, table: table, layout: layout, inverse: inverse)
                    return k.download(x)
                }
            }
        }
        let shape = AttentionShape(sequenceLength: t, heads: heads, kvHeads: kvHeads, headDim: headDim)
        for options in [AttentionOptions.standard(headDim: headDim), AttentionOptions(scale: 0.3, window: 5, softcap: 2)] {
            agree("attention \(options)") { k in k.download(k.attention(q: k.upload(q), k: k.upload(kk), v: k.upload(v), shape: shape, options: options)) }
            agree("attentionBackward \(options)", tolerance: 1e-4) { k in
                let g = k.attentionBackward(q: k.upload(q), k: k.upload(kk), v: k.upload(v), outputGradient: k.upload(dOut), shape: shape, options: options)
                return k.download(k.vstack([g.dq, k.reshaped(k.vstack([g.dk, g.dv]), rows: 2 * t, cols: heads * headDim)]))
            }
        }
        let (gate, up, d) = (rng.matrix(6, 10), rng.matrix(6, 10), rng.matrix(6, 10))
        for act in [GatedActivation.silu, .geluTanh, .relu] {
            agree("gatedActivation \(act)") { k in k.download(k.gatedActivation(gate: k.upload(gate), up: k.upload(up), act)) }
            agree("gatedActivationBackward \(act)") { k in
                let r = k.gatedActivationBackward(k.upload(d), gate: k.upload(gate), up: k.upload(up), act)
                return k.download(k.vstack([r.gate, r.up]))
            }
        }
        agree("reluBackward") { k in let t = k.upload(d); k.reluBackward(t, input: k.upload(gate)); return k.download(t) }
        agree("softcap") { k in let t = k.upload(gate); k.softcap(t, cap: 0.7); return k.download(t) }
        // Routing: 6 tokens over 5 experts, top 2.
        let logits = rng.matrix(6, 5)
        for normalize in [true, false] {
            let routes = both.map { $0.route($0.upload(logits), topK: 2, normalize: normalize) }
            XCTAssertEqual(routes[0].chosen, routes[1].chosen)
            for (a, b) in zip(routes[0].weights, routes[1].weights) { XCTAssertEqual(a, b, accuracy: 1e-6) }
            agree("route probabilities") { k in k.download(k.route(k.upload(logits), topK: 2, normalize: normalize).probabilities) }
            let dw = rng.matrix(6, 2)
            agree("routerLogitGradient normalize \(normalize)") { k in
                k.download(k.routerLogitGradient(k.upload(dw), routing: k.route(k.upload(logits), topK: 2, normalize: normalize), normalize: normalize))
            }
        }
        let rows = [4, 0, 4, 2]
        agree("gatherRows") { k in k.download(k.gatherRows(k.upload(gate), rows)) }
        agree("scatterAddRows") { k in let out = k.upload(d); k.scatterAddRows(k.gatherRows(k.upload(gate), [0, 1, 2, 3]), rows: rows, scales: [0.5, 2, -1, 0.25], into: out); return k.download(out) }
        agree("scaleRows") { k in let t = k.upload(gate); k.scaleRows(t, by: [1, 2, 3, 4, 5, 6]); return k.download(t) }
        agree("accumulateRoutingGradient") { k in
            let dWeights = k.zeros(rows: 6, cols: 2)
            k.accumulateRoutingGradient(outputGradient: k.upload(d.rows(0..<4)), expertOutput: k.upload(up.rows(0..<4)), rows: rows, slots: [0, 1, 1, 0], into: dWeights)
            return k.download(dWeights)
        }
    }

    func testRopeFrequenciesInFloat64() {
        let table = Kernels.RopeTable(rotaryDim: 64, theta: 100_000, positions: 4)
        for i in 0..<32 {
            XCTAssertEqual(table.frequencies[i], 1 / pow(100_000.0, Double(2 * i) / 64), accuracy: 1e-15 * table.frequencies[i])
        }
        // A checkpoint's 16-bit rounding of the frequencies is the model's definition: kept exactly.
        let rounded = Kernels.RopeTable(rotaryDim: 64, theta: 100_000, positions: 4, frequencyRounding: .bfloat16)
        for i in 0..<32 {
            let f = 1 / powf(100_000, Float(2 * i) / 64)
            XCTAssertEqual(rounded.frequencies[i], Double(HalfPrecision.bf16ToFloat(HalfPrecision.floatToBF16(f))))
        }
        // Scaling applies as the ratio the Float32 formula gives.
        let scaled = Kernels.RopeTable(rotaryDim: 64, theta: 100_000, positions: 4) { $0 / 8 }
        for i in 0..<32 { XCTAssertEqual(scaled.frequencies[i], table.frequencies[i] / 8, accuracy: 1e-7 * table.frequencies[i]) }
        // With the table's Float32 cos/sin, the Float64 rotation is the CPU's to Float64 rounding of the products.
        var rng = TestRandom(seed: 26)
        let x = rng.matrix(8, 64)
        let big = Kernels.RopeTable(rotaryDim: 16, theta: 10000, positions: 8)
        let angles32 = Float64Backend(ropeAngles: .float32Table)
        let results = ([cpu, angles32, f64] as [any ComputeBackend]).map { k -> Matrix in
            let t = k.upload(x)
            k.rope(t, heads: 4, headDim: 16, sequenceLength: 8, table: big, layout: .rotateHalf, inverse: false)
            return k.download(t)
        }
        XCTAssertLessThanOrEqual(results[0].maxAbsDifference(results[1]), 3e-7)
        XCTAssertLessThanOrEqual(results[0].maxAbsDifference(results[2]), 1e-5)
    }

    /// Data far from zero: Float32's accumulation loses the small spread around the offset, Float64's does not.
    func testFloat64IsVisiblyMoreAccurateOnLargeOffsets() throws {
        // A column of 4096 values 1000 + small noise; the centred Hessian from H = XᵀX − n·μμᵀ needs
        // about 11 more bits than the noise carries.
        var rng = TestRandom(seed: 25)
        let n = 4096
        let x = Matrix(rows: n, cols: 2, values: (0..<(2 * n)).map { i in i % 2 == 0 ? 1000 + 0.01 * rng.uniform() : rng.uniform() })
        var exact = 0.0
        x.withUnsafeBufferPointer { p in for r in 0..<n { exact += Double(p[2 * r]) * Double(p[2 * r]) } }
        func h00(_ k: any ComputeBackend) -> Double {
            let h = k.zeros(rows: 2, cols: 2)
            k.syrkAccumulate(k.upload(x), alpha: 1, into: h)
            return k.dot(k.copy(h.region(rows: 0..<1, cols: 0..<1)), k.upload(Matrix(rows: 1, cols: 1, values: [1])))
        }
        let errorF32 = Swift.abs(h00(cpu) - exact) / exact, errorF64 = Swift.abs(h00(f64) - exact) / exact
        XCTAssertLessThan(errorF64, 1e-12)
        XCTAssertGreaterThan(errorF32, 1e-9)
        XCTAssertGreaterThan(errorF32, 1000 * errorF64)
        // A long sum of squares in the norm: rmsNorm of a wide row of offset values.
        let wide = Matrix(rows: 1, cols: 1 << 16, values: (0..<(1 << 16)).map { _ in 100 + rng.uniform() })
        var ss = 0.0
        for v in wide.values { ss += Double(v) * Double(v) }
        let expected = Double(wide.values[0]) / (ss / Double(1 << 16) + 1e-5).squareRoot()
        let one = Matrix(rows: 1, cols: 1 << 16, repeating: 1)
        let f64Out = f64.downloadValues(f64.rmsNorm(f64.upload(wide), weight: f64.upload(one), eps: 1e-5))[0]
        XCTAssertEqual(f64Out, expected, accuracy: 1e-13)
    }
}
