import XCTest
@testable import TopiaryTensor

/// The backend protocol against small dense references, on the CPU backend seen through a
/// CheckingBackend (shapes, finiteness and transfers checked on every call).
final class BackendTests: XCTestCase {
    let cpu = CPUBackend()

    func testUploadDownloadRoundTripIsCounted() {
        let checking = CheckingBackend()
        let m = Matrix(rows: 2, cols: 3, values: [1, 2, 3, 4, 5, 6])
        let t = checking.upload(m)
        XCTAssertEqual(t.rows, 2)
        XCTAssertEqual(t.cols, 3)
        XCTAssertEqual(t.dtype, .float32)
        XCTAssertEqual(checking.download(t), m)
        let c = checking.counts
        XCTAssertEqual([c.uploads, c.uploadBytes, c.downloads, c.downloadBytes], [1, 24, 1, 24])
        XCTAssertEqual(checking.violations, [])
    }

    func testWritesDoNotReachTheUploadedOrDownloadedMatrix() {
        let m = Matrix(rows: 1, cols: 3, values: [1, 2, 3])
        let t = cpu.upload(m)
        let before = cpu.download(t)
        cpu.scale(t, by: 2)
        XCTAssertEqual(m.values, [1, 2, 3])
        XCTAssertEqual(before.values, [1, 2, 3])
        XCTAssertEqual(cpu.download(t).values, [2, 4, 6])
        let copy = cpu.copy(t)
        cpu.scale(copy, by: 0)
        XCTAssertEqual(cpu.download(t).values, [2, 4, 6])
    }

    func testGemmOnRegionsWithTransposesAndAccumulation() {
        var rng = TestRandom(seed: 11)
        let a = rng.matrix(9, 7), b = rng.matrix(8, 10), c0 = rng.matrix(6, 12)
        let checking = CheckingBackend()
        let (ta, tb, tc) = (checking.upload(a), checking.upload(b), checking.upload(c0))
        // C[1..<5, 2..<8] = 0.5 · A[2..<6, 1..<6] · B[1..<7, 3..<8]ᵀ + 2 · C[1..<5, 2..<8]; the rest of C untouched.
        let ar = ta.region(rows: 2..<6, cols: 1..<6), br = tb.region(rows: 1..<7, cols: 3..<8)
        checking.gemm(ar, .none, br, .transposed, alpha: 0.5, beta: 2, into: tc.region(rows: 1..<5, cols: 2..<8))
        let product = referenceProduct(a.rows(2..<6).columns(1..<6), b.rows(1..<7).columns(3..<8).transposed())
        let out = checking.download(tc)
        for i in 0..<6 { for j in 0..<12 {
            let inside = (1..<5).contains(i) && (2..<8).contains(j)
            let expected = inside ? 0.5 * product[i - 1, j - 2] + 2 * c0[i, j] : c0[i, j]
            XCTAssertEqual(out[i, j], expected, accuracy: 1e-5, "(\(i), \(j))")
        } }
        XCTAssertEqual(checking.counts.flops, 2 * 4 * 6 * 5)
        XCTAssertEqual(checking.violations, [])
        // Whole tensors: the same bits as Linalg.
        let x = rng.matrix(130, 70), y = rng.matrix(90, 70)
        XCTAssertEqual(cpu.download(cpu.matmul(cpu.upload(x), .none, cpu.upload(y), .transposed)), Linalg.matmul(x, .none, y, .transposed))
    }

    func testSyrkCholeskyInverseAndTriangularSolve() throws {
        var rng = TestRandom(seed: 12)
        let x = rng.matrix(40, 9)
        let checking = CheckingBackend()
        let h = checking.zeros(rows: 9, cols: 9)
        checking.syrkAccumulate(checking.upload(x), alpha: 0.5, into: h)
        let expected = referenceProduct(x.transposed(), x)
        let hm = checking.download(h)
        for i in 0..<9 { for j in 0..<9 { XCTAssertEqual(hm[i, j], 0.5 * expected[i, j], accuracy: 1e-4) } }
        checking.addToDiagonal(h, 1)
        let u = try checking.cholesky(h, upper: true, what: "test")
        let um = checking.download(u)
        XCTAssertLessThan(referenceProduct(um.transposed(), um).maxAbsDifference(checking.download(h)), 1e-4)
        let inverse = checking.download(try checking.inverseSPD(h, what: "test"))
        XCTAssertLessThan(referenceProduct(inverse, checking.download(h)).maxAbsDifference(.identity(9)), 1e-4)
        let b = rng.matrix(9, 3)
        let solved = checking.download(checking.solveTriangular(u, checking.upload(b), upper: true, transpose: false))
        XCTAssertLessThan(referenceProduct(um, solved).maxAbsDifference(b), 1e-4)
        XCTAssertThrowsError(try checking.cholesky(checking.upload(Matrix(rows: 2, cols: 2, values: [1, 2, 2, 1])), upper: false, what: "indefinite"))
        XCTAssertEqual(checking.violations, [])
    }

    func testElementwiseAndReductions() {
        let x = cpu.upload(Matrix(rows: 2, cols: 3, values: [-1, 2, -3, 4, -5, 6]))
        XCTAssertEqual(cpu.download(cpu.map(x, .abs)).values, [1, 2, 3, 4, 5, 6])
        XCTAssertEqual(cpu.download(cpu.map(x, .square)).values, [1, 4, 9, 16, 25, 36])
        XCTAssertEqual(cpu.download(cpu.map(cpu.map(x, .square), .squareRoot)).values, [1, 2, 3, 4, 5, 6])
        XCTAssertEqual(cpu.download(cpu.map(cpu.upload(Matrix(vector: [0, -0.0, 2, -1, .nan])), .nonZero)).values, [0, 0, 1, 1, 1])
        let v = cpu.upload(Matrix(vector: [1, 2, 4]))
        XCTAssertEqual(cpu.download(cpu.multiplyColumns(x, by: v)).values, [-1, 4, -12, 4, -10, 24])
        XCTAssertEqual(cpu.download(cpu.divideColumns(x, by: v)).values, [-1, 1, -0.75, 4, -2.5, 1.5])
        XCTAssertEqual(cpu.download(cpu.columnSquaredSums(x)).values, [17, 29, 45])
        XCTAssertEqual(cpu.sum(x), 3)
        XCTAssertEqual(cpu.dot(x, x), 91)
        let y = cpu.upload(Matrix(rows: 2, cols: 3, repeating: 1))
        cpu.axpy(2, x, y)
        XCTAssertEqual(cpu.download(y).values, [-1, 5, -5, 9, -9, 13])
        cpu.scaleAdd(y, beta: 0.5, x, alpha: -1)
        XCTAssertEqual(cpu.download(y).values, [0.5, 0.5, 0.5, 0.5, 0.5, 0.5])
        let sq = cpu.upload(Matrix(rows: 2, cols: 2, values: [1, 2, 3, 4]))
        cpu.addToDiagonal(sq, 10)
        XCTAssertEqual(cpu.download(cpu.diagonal(sq)).values, [11, 14])
        XCTAssertTrue(cpu.allFinite(sq))
        cpu.scale(sq, by: .infinity)
        XCTAssertFalse(cpu.allFinite(sq))
    }

    func testRowSelectionIsAStableSortsPrefix() {
        // Many ties, signed zeros and negatives: the k smallest of each row must be the first k
        // of a stable sort by score (torch.sort(stable=True)'s order).
        var rng = TestRandom(seed: 17)
        let levels: [Float] = [-1, -0.0, 0, 0.5, 1, 2, 3.25]
        let (rows, cols) = (9, 301)
        let values = (0..<(rows * cols)).map { _ in levels[Int(abs(rng.uniform()) * Float(levels.count)) % levels.count] }
        let scores = cpu.upload(Matrix(rows: rows, cols: cols, values: values))
        for k in [0, 1, 2, 150, 299, 300, 301, 400] {
            let got = cpu.download(cpu.selectSmallestInRows(scores, count: k)).values
            for r in 0..<rows {
                let order = (0..<cols).sorted { a, b in
                    values[r * cols + a] < values[r * cols + b] || (values[r * cols + a] == values[r * cols + b] && a < b)
                }
                var want = [Float](repeating: 0, count: cols)
                for c in order.prefix(k) { want[c] = 1 }
                XCTAssertEqual(Array(got[(r * cols)..<((r + 1) * cols)]), want, "row \(r), k \(k)")
            }
        }
    }

    func testUpperSyrkUpdateHasTheBitsOfScaleThenAccumulate() {
        // LayerStatistics' running average: H ← decay·H + alpha·XᵀX on the upper triangle, the
        // lower one mirrored when read, must give the bits of scaling H and then syrkAccumulate.
        var rng = TestRandom(seed: 5)
        for d in [7, 130, 300] {
            let backends: [any ComputeBackend] = [cpu, Float64Backend()]
            for backend in backends {
                let fused = backend.zeros(rows: d, cols: d), reference = backend.zeros(rows: d, cols: d)
                for (window, rows) in [40, 0, 129, 3].enumerated() {
                    let x = backend.upload(rng.matrix(rows, d))
                    let n = Float(window), decay = n / (n + 1), alpha = 2 / (n + 1)
                    backend.scale(reference, by: decay)
                    backend.syrkAccumulate(x, alpha: alpha, into: reference)
                    backend.syrkUpperUpdate(x, alpha: alpha, beta: decay, into: fused)
                }
                backend.mirrorUpper(fused)
                let (got, want) = (backend.download(fused).values, backend.download(reference).values)
                XCTAssertEqual(got.map(\.bitPattern), want.map(\.bitPattern), "d \(d) on \(type(of: backend))")
            }
        }
    }

    /// The statistics chain passes a Hessian from replica to replica in pieces of its upper
    /// triangle, each held apart and updated in batches: every piece gets the bits the whole
    /// update gives its entries, however H is cut and batched.
    func testUpperSyrkUpdateOfPiecesHasTheWholeUpdatesBits() throws {
        var rng = TestRandom(seed: 6)
        // More threads than blocks in some batches, so that windows' tasks wait on their blocks.
        let saved = Linalg.threadCount
        Linalg.setThreadCount(5)
        defer { Linalg.setThreadCount(saved) }
        XCTAssertNil(Float64Backend().statisticsTile(columns: 300))
        for (d, heights, maxColumns) in [(300, [40, 0, 600, 3], 128), (300, [7, 5], 4096), (520, [40, 0, 600, 3], 256),
                                         (4100, [9, 0, 5], 1024), (4100, [9, 5], 4096)] {
            let tile = try XCTUnwrap(cpu.statisticsTile(columns: d))
            let shapes = cpu.statisticsPieces(columns: d, maxColumns: maxColumns)
            // The pieces cover the upper triangle once, strip by strip, none wider than asked
            // unless one block is.
            var covered = [Int](repeating: 0, count: d)
            for s in shapes {
                XCTAssertTrue(s.rows.lowerBound % tile == 0 && (s.rows.count == tile || s.rows.upperBound == d), "\(s)")
                XCTAssertTrue(s.columns.count <= max(maxColumns, 2 * tile) && s.columns.lowerBound >= s.rows.lowerBound, "\(s)")
                XCTAssertGreaterThan(s.blocks, 0)
                for i in s.rows { covered[i] += s.columns.count }
            }
            XCTAssertEqual(covered, (0..<d).map { d - $0 / tile * tile }, "d \(d): pieces leave out or repeat columns")
            let whole = cpu.zeros(rows: d, cols: d)
            let pieces = shapes.map { UpperPiece(rows: $0.rows, columns: $0.columns, values: cpu.zeros(rows: $0.rows.count, cols: $0.columns.count)) }
            // Batches of 1, 3 and the rest; the windows given one at a time, or all but the first
            // at once (a block's windows then run as soon as its previous one is done).
            let cuts = [0, 1, min(4, pieces.count), pieces.count]
            var windows: [(x: Tensor, alpha: Float, beta: Float)] = []
            for (window, rows) in heights.enumerated() {
                let x = cpu.upload(rng.matrix(rows, d))
                let n = Float(window), decay = n / (n + 1), alpha = 2 / (n + 1)
                cpu.syrkUpperUpdate(x, alpha: alpha, beta: decay, into: whole)
                windows.append((x, alpha, decay))
            }
            for k in 0..<cuts.count - 1 where cuts[k] < cuts[k + 1] {
                let batch = Array(pieces[cuts[k]..<cuts[k + 1]])
                if k == 1 {
                    for w in windows { cpu.syrkUpperUpdate([w], pieces: batch) }
                } else {
                    cpu.syrkUpperUpdate([windows[0]], pieces: batch)
                    cpu.syrkUpperUpdate(Array(windows.dropFirst()), pieces: batch)
                }
            }
            let w = cpu.download(whole)
            for piece in pieces {
                let p = cpu.download(piece.values)
                for i in piece.rows {
                    for j in max(i, piece.columns.lowerBound)..<piece.columns.upperBound
                    where p[i - piece.rows.lowerBound, j - piece.columns.lowerBound].bitPattern != w[i, j].bitPattern {
                        XCTFail("d \(d), piece \(piece.rows) x \(piece.columns), (\(i), \(j)): \(p[i - piece.rows.lowerBound, j - piece.columns.lowerBound]) against \(w[i, j])")
                        return
                    }
                }
            }
        }
        // Without tiles, a backend takes all of C at once as one piece.
        let f = Float64Backend()
        XCTAssertEqual(f.statisticsPieces(columns: 10, maxColumns: 4), [UpperPieceShape(rows: 0..<10, columns: 0..<10, blocks: 1)])
        let x = f.upload(rng.matrix(6, 10))
        let (whole, piece) = (f.zeros(rows: 10, cols: 10), f.zeros(rows: 10, cols: 10))
        f.syrkUpperUpdate(x, alpha: 0.5, beta: 0, into: whole)
        f.syrkUpperUpdate([(x, 0.5, 0)], pieces: [UpperPiece(rows: 0..<10, columns: 0..<10, values: piece)])
        XCTAssertEqual(f.download(piece), f.download(whole))
    }

    /// Wanda's fused step on the CPU: the bits of the composition it replaces (|W| · scale, the
    /// row selection with ties by column, zeros on a copy), with ties, signed zeros, and counts of
    /// 0, all and in between, over enough rows for several chunks of threads.
    func testZeroSmallestInRowsIsTheComposedSelection() {
        var rng = TestRandom(seed: 9)
        let rows = 37, cols = 53
        // Values on a coarse grid so that equal scores (and -0, +0) are common.
        let w = Matrix(rows: rows, cols: cols) { p in for i in p.indices { p[i] = Float(Int(rng.uniform() * 9) - 4) * 0.25 } }
        var m = w
        m[0, 0] = -0.0
        m[0, 1] = 0.0
        let scale = cpu.upload(Matrix(rows: 1, cols: cols) { p in for i in p.indices { p[i] = i % 7 == 0 ? 1 : Float(Int(rng.uniform() * 3) + 1) * 0.5 } })
        let counts = (0..<rows).map { r in r == 0 ? 0 : r == 1 ? cols : r == 2 ? cols - 1 : (r * 17) % (cols + 1) }
        let weight = cpu.upload(m)
        let fused = cpu.download(cpu.zeroSmallestInRows(weight, scale: scale, counts: counts))
        let composedMask = cpu.selectSmallestInRows(cpu.multiplyColumns(cpu.map(weight, .abs), by: scale), counts: counts)
        let composed = cpu.copy(weight)
        cpu.zeroMasked(composed, mask: composedMask)
        XCTAssertEqual(fused.values.map(\.bitPattern), cpu.download(composed).values.map(\.bitPattern))
        for r in 0..<rows {
            let zeroed = (0..<cols).filter { fused[r, $0] == 0 && m[r, $0] != 0 }.count
            let wasZero = (0..<cols).filter { m[r, $0] == 0 }.count
            XCTAssertGreaterThanOrEqual(zeroed + wasZero, counts[r], "row \(r)")
        }
        // The protocol's default (Float64Backend) agrees in value.
        let f = Float64Backend()
        let viaDefault = f.download(f.zeroSmallestInRows(f.upload(m), scale: f.upload(cpu.download(scale)), counts: counts))
        XCTAssertEqual(viaDefault.values.map { $0 == 0 }, fused.values.map { $0 == 0 })
    }

    /// SparseLLM's fused pass over a chunk of tokens gives, bit for bit, what the five calls it
    /// replaces give (act(s), the product, the gated activation and the three chunked
    /// distances) for each gated activation, over several `Parallel` chunks and a ragged last
    /// one, at one thread and at three; the protocol's default (Float64Backend) agrees in value.
    func testSparseLLMLlamaPassHasTheBitsOfTheCallsItReplaces() {
        var rng = TestRandom(seed: 31)
        let rows = 97, cols = 2029                     // 3 x 65,536 + 205 elements
        func signed() -> Matrix {
            Matrix(rows: rows, cols: cols) { p in for i in p.indices { p[i] = (rng.uniform() - 0.5) * 8 } }
        }
        let (s, z, p, g, m) = (signed(), signed(), signed(), signed(), signed())
        let saved = Linalg.threadCount
        defer { Linalg.setThreadCount(saved) }
        for act in [GatedActivation.silu, .geluTanh, .relu] {
            for threads in [1, 3] {
                Linalg.setThreadCount(threads)
                let (ts, tz, tp, tg, tm) = (cpu.upload(s), cpu.upload(z), cpu.upload(p), cpu.upload(g), cpu.upload(m))
                let pass = cpu.sparseLLMLlamaPass(s: ts, z: tz, p: tp, g: tg, m: tm, activation: act)
                let sigma = cpu.map(ts, ElementwiseFunction(act))
                func bits(_ t: Tensor) -> [UInt32] { cpu.download(t).values.map(\.bitPattern) }
                let what = "\(act), \(threads) threads"
                XCTAssertEqual(bits(pass.sigma), bits(sigma), "act(s), \(what)")
                XCTAssertEqual(bits(pass.activation), bits(cpu.multiply(sigma, tz)), "act(s)·z, \(what)")
                XCTAssertEqual(bits(pass.gated), bits(cpu.gatedActivation(gate: tg, up: tm, act)), "act(g)·m, \(what)")
                XCTAssertEqual(pass.gateDistance.bitPattern, cpu.chunkedSquaredDistance(ts, tg).bitPattern, "‖s − g‖², \(what)")
                XCTAssertEqual(pass.upDistance.bitPattern, cpu.chunkedSquaredDistance(tz, tm).bitPattern, "‖z − m‖², \(what)")
                XCTAssertEqual(pass.productDistance.bitPattern, cpu.chunkedSquaredDistanceToProduct(tp, sigma, tz).bitPattern,
                               "‖p − σz‖², \(what)")
            }
            let f = Float64Backend()
            let viaDefault = f.sparseLLMLlamaPass(s: f.upload(s), z: f.upload(z), p: f.upload(p), g: f.upload(g), m: f.upload(m), activation: act)
            let pass = cpu.sparseLLMLlamaPass(s: cpu.upload(s), z: cpu.upload(z), p: cpu.upload(p), g: cpu.upload(g), m: cpu.upload(m),
                                              activation: act)
            XCTAssertEqual(viaDefault.productDistance, pass.productDistance, accuracy: 1e-4 * pass.productDistance, "\(act)")
            XCTAssertLessThan(f.download(viaDefault.gated).maxAbsDifference(cpu.download(pass.gated)), 1e-4, "\(act)")
            XCTAssertLessThan(f.download(viaDefault.sigma).maxAbsDifference(cpu.download(pass.sigma)), 1e-5, "\(act)")
        }
        // The activations differ, so each case above compared its own.
        let silu = cpu.download(cpu.map(cpu.upload(s), .silu)), gelu = cpu.download(cpu.map(cpu.upload(s), .geluTanh))
        XCTAssertGreaterThan(silu.maxAbsDifference(gelu), 0.1)
        XCTAssertEqual(Double(gelu[0, 0]), 0.5 * Double(s[0, 0]) * (1 + tanh(0.7978845608 * (Double(s[0, 0]) + 0.044715 * pow(Double(s[0, 0]), 3)))),
                       accuracy: 1e-5)
    }

    func testSelections() {
        // The reference's rule: everything at or below the k-th smallest, ties included.
        let scores = cpu.upload(Matrix(rows: 2, cols: 4, values: [3, 1, 2, 2, 5, 2, 7, 0]))
        XCTAssertEqual(cpu.download(cpu.selectAtMostKthSmallest(scores, k: 2)).values, [0, 1, 1, 1, 0, 1, 0, 1])
        XCTAssertEqual(cpu.download(cpu.selectAtMostKthSmallest(scores, k: 0)).values, [0, 0, 0, 0, 0, 0, 0, 1])
        // Per row, stable: equal scores go by column.
        XCTAssertEqual(cpu.download(cpu.selectSmallestInRows(scores, count: 2)).values, [0, 1, 1, 0, 0, 1, 0, 1])
        // 1 of every 3 (the last group narrower), ties by column.
        let groups = cpu.upload(Matrix(rows: 1, cols: 5, values: [4, 4, 9, 2, 1]))
        XCTAssertEqual(cpu.download(cpu.selectNOfM(groups, n: 1, m: 3)).values, [1, 0, 0, 0, 1])
        XCTAssertEqual(cpu.download(cpu.selectNOfM(groups, n: 2, m: 3)).values, [1, 1, 0, 1, 1])
        let w = cpu.upload(Matrix(rows: 1, cols: 5, values: [1, 2, 3, 4, 5]))
        cpu.zeroMasked(w, mask: cpu.selectNOfM(groups, n: 1, m: 3))
        XCTAssertEqual(cpu.download(w).values, [0, 2, 3, 4, 0])
    }

    /// With a unit inverse factor the OBS loop removes exactly the masked weights and updates
    /// nothing else; with a general factor it matches a direct implementation of the updates.
    func testSparseGPTBlockAgainstDirectUpdates() {
        let w0 = Matrix(rows: 2, cols: 3, values: [1, -2, 3, 4, 5, -6])
        let w = cpu.upload(w0)
        let mask = cpu.upload(Matrix(rows: 2, cols: 3, values: [1, 0, 1, 0, 1, 0]))
        let err = cpu.zeros(rows: 2, cols: 3)
        let loss = cpu.sparseGPTBlock(weight: w, inverseFactor: cpu.upload(.identity(3)), mask: mask, nOfM: nil, error: err)
        XCTAssertEqual(cpu.download(w).values, [0, -2, 0, 4, 0, -6])
        XCTAssertEqual(cpu.download(err).values, [1, 0, 3, 0, 5, 0])
        XCTAssertEqual(loss, (1 + 9 + 25) / 2)

        let u = Matrix(rows: 3, cols: 3, values: [2, 0.5, -1, 0, 1, 0.25, 0, 0, 4])
        var expected = w0.values
        var expectedLoss = 0.0
        let maskValues: [Float] = [1, 0, 1, 0, 1, 0]
        for r in 0..<2 { for i in 0..<3 {
            let v = expected[r * 3 + i], d = u[i, i]
            guard maskValues[r * 3 + i] != 0 else { continue }
            let e = v / d
            expectedLoss += Double(v * v / (d * d)) / 2
            expected[r * 3 + i] = 0
            for j in (i + 1)..<3 { expected[r * 3 + j] -= e * u[i, j] }
        } }
        let w2 = cpu.upload(w0)
        let loss2 = cpu.sparseGPTBlock(weight: w2, inverseFactor: cpu.upload(u), mask: cpu.upload(Matrix(rows: 2, cols: 3, values: maskValues)),
                                       nOfM: nil, error: cpu.zeros(rows: 2, cols: 3))
        let got = cpu.download(w2).values
        for i in 0..<6 { XCTAssertEqual(got[i], expected[i], accuracy: 1e-6) }
        XCTAssertEqual(loss2, expectedLoss, accuracy: 1e-6)

        // 1:2 chosen inside the loop: the smaller w²/d² of each pair goes.
        let w3 = cpu.upload(Matrix(rows: 1, cols: 4, values: [3, 1, -1, 2]))
        let m3 = cpu.zeros(rows: 1, cols: 4)
        _ = cpu.sparseGPTBlock(weight: w3, inverseFactor: cpu.upload(.identity(4)), mask: m3, nOfM: (1, 2), error: cpu.zeros(rows: 1, cols: 4))
        XCTAssertEqual(cpu.download(m3).values, [0, 1, 1, 0])
        XCTAssertEqual(cpu.download(w3).values, [3, 0, 0, 2])
    }

    func testCheckingBackendRecordsForbiddenTransfersAndNonFiniteResults() {
        let checking = CheckingBackend()
        let t = checking.upload(Matrix(rows: 1, cols: 2, values: [1, 2]))
        checking.forbidTransfers("solve") {
            checking.scale(t, by: 3)
            _ = checking.download(t)
        }
        XCTAssertEqual(checking.violations, ["download of 8 bytes inside 'solve', where transfers are forbidden"])
        checking.reset()
        checking.scale(t, by: .infinity)
        XCTAssertEqual(checking.violations, ["scale: Tensor(1x2 float32) has non-finite values"])
        XCTAssertEqual(checking.counts.calls["scale"], 1)
        XCTAssertEqual(checking.counts.transfers, 0)
    }

    func testDeviceParsingAndUnavailableCUDA() throws {
        XCTAssertEqual(try ComputeDevice.parse("cpu"), .cpu)
        XCTAssertEqual(try ComputeDevice.parse("cuda"), .cuda(index: 0))
        XCTAssertEqual(try ComputeDevice.parse("cuda:3"), .cuda(index: 3))
        for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1", "cuda:64", "cuda:1:2", "CPU", ""] {
            XCTAssertThrowsError(try ComputeDevice.parse(bad), bad) { error in
                XCTAssertTrue("\(error)".contains("--device"), "\(error)")
            }
        }
        XCTAssertTrue(try ComputeDevices.backend(for: .cpu) is CPUBackend)
        if ComputeDevices.cudaDriverFound { return }
        XCTAssertThrowsError(try ComputeDevices.backend(for: .cuda(index: 1))) { error in
            let text = "\(error)"
            XCTAssertTrue(text.hasPrefix("cuda:1: "), text)
            XCTAssertTrue(text.contains("libcuda.so.1"), text)
            XCTAssertFalse(text.contains("\n"))
        }
        guard !ComputeDevices.cudaDriverFound else { return }   // a machine with a GPU: scripts/cuda-check tests it
        let devices = ComputeDevices.describe()
        XCTAssertEqual(devices.map(\.device), ["cpu", "cuda"])
        XCTAssertEqual(devices.map(\.available), [true, false])
    }
}
