import Foundation
import XCTest
import TopiaryModel
import TopiaryTensor
import TopiaryTestSupport
@testable import TopiaryPrune

/// Every ported method through a CheckingBackend: the same bits as the plain CPU backend, no
/// violation (shapes, finiteness, transfers inside a solve), and the transfers counted.
final class BackendSolverTests: XCTestCase {
    func testMagnitudeRunsOnTheBackendWithoutTransfers() {
        let problem = Problem(rows: 16, cols: 40, tokens: 64, seed: 21)
        for pattern in [SparsityPattern.unstructured(0.6), .nOfM(n: 2, m: 4)] {
            let checking = CheckingBackend()
            let w = checking.upload(problem.weight)
            let pruned = checking.forbidTransfers("magnitude") { MagnitudePruner.prune(w, pattern: pattern, on: checking) }
            XCTAssertEqual(checking.download(pruned), MagnitudePruner.prune(problem.weight, pattern: pattern), "\(pattern)")
            XCTAssertEqual(checking.violations, [])
            XCTAssertEqual([checking.counts.uploads, checking.counts.downloads], [1, 1])
            XCTAssertEqual(checking.counts.calls[pattern == .unstructured(0.6) ? "selectAtMostKthSmallest" : "selectNOfM"], 1)
        }
    }

    func testWandaRunsOnTheBackendWithoutTransfers() {
        let problem = Problem(rows: 16, cols: 40, tokens: 64, seed: 22)
        for pattern in [SparsityPattern.unstructured(0.5), .nOfM(n: 2, m: 4)] {
            let checking = CheckingBackend()
            let stats = LayerStatistics(columns: 40, backend: checking)
            let per = 16
            for s in 0..<4 { stats.add(problem.inputs.rows((s * per)..<((s + 1) * per))) }
            XCTAssertEqual([checking.counts.uploads, checking.counts.downloads], [4, 0], "one upload per calibration sequence")
            let w = checking.upload(problem.weight)
            let pruned = checking.forbidTransfers("wanda") {
                WandaPruner.prune(w, inputSquaredNorms: stats.squaredNormsTensor, pattern: pattern, on: checking)
            }
            let expected = WandaPruner.prune(problem.weight, inputSquaredNorms: problem.stats.squaredNorms, pattern: pattern)
            XCTAssertEqual(checking.download(pruned), expected, "\(pattern)")
            XCTAssertEqual(checking.violations, [])
            XCTAssertEqual([checking.counts.uploads, checking.counts.downloads], [5, 1])
        }
    }

    /// Statistics accumulate on the backend: the Hessian and norms equal the CPU's bit for bit.
    func testLayerStatisticsOnTheBackend() {
        let problem = Problem(rows: 8, cols: 24, tokens: 48, seed: 23)
        let checking = CheckingBackend()
        let stats = LayerStatistics(columns: 24, backend: checking)
        for s in 0..<4 { stats.add(problem.inputs.rows((s * 12)..<((s + 1) * 12))) }
        XCTAssertEqual(checking.counts.calls["syrkUpperUpdate"], 4)
        // Per window: the upper triangle's syrk and scaling, the squared sums and their update.
        XCTAssertEqual(checking.counts.flops, 4 * (24 * 25 * 12 + 24 * 25 / 2 + 2 * 12 * 24 + 3 * 24))
        XCTAssertEqual(stats.hessian, problem.stats.hessian)
        XCTAssertEqual(stats.squaredNorms, problem.stats.squaredNorms)
        XCTAssertEqual(stats.quadraticForm(problem.weight), problem.stats.quadraticForm(problem.weight))
        XCTAssertEqual(checking.violations, [])
    }

    /// SparseGPT's whole solve stays on the backend: between the upload of the weight and the
    /// Hessian and the download of the result, nothing crosses.
    func testSparseGPTSolveDoesNoTransfer() throws {
        let problem = Problem(rows: 24, cols: 300, tokens: 600, seed: 24)
        for pattern in [SparsityPattern.unstructured(0.5), .nOfM(n: 2, m: 4)] {
            let checking = CheckingBackend()
            let w = checking.upload(problem.weight)
            let h = checking.upload(problem.stats.hessian)
            let result = try checking.forbidTransfers("SparseGPT solve") {
                try SparseGPTPruner.prune(w, hessian: h, pattern: pattern, options: .init(blockSize: 128), on: checking)
            }
            let pruned = checking.download(result.weight)
            let expected = try SparseGPTPruner.prune(problem.weight, hessian: problem.stats.hessian, pattern: pattern)
            XCTAssertEqual(pruned, expected.weight, "\(pattern)")
            XCTAssertEqual(result.loss, expected.loss)
            XCTAssertEqual(checking.violations, [])
            XCTAssertEqual(checking.counts.uploads, 2)
            XCTAssertEqual(checking.counts.downloads, 1)
            XCTAssertEqual(checking.counts.uploadBytes, (24 * 300 + 300 * 300) * 4)
            // Three blocks of 128, 128 and 44 columns; two lazy updates.
            XCTAssertEqual(checking.counts.calls["sparseGPTBlock"], 3)
            // Two lazy updates (after the first two of three column blocks), one product per row chunk.
            let chunks = (24 + SparseGPTPruner.rowChunk(rows: 24) - 1) / SparseGPTPruner.rowChunk(rows: 24)
            XCTAssertEqual(checking.counts.calls["gemm"], 2 * chunks)
            // U from one factorisation (no explicit inverse).
            XCTAssertEqual(checking.counts.calls["inverseCholeskyFactor"], 1)
            XCTAssertNil(checking.counts.calls["inverseSPD"])
            XCTAssertNil(checking.counts.calls["cholesky"])
        }
        // A fixed mask (BESA's) is uploaded once, with the weight and the Hessian.
        let checking = CheckingBackend()
        var mask = [Bool](repeating: false, count: 24 * 300)
        for i in stride(from: 0, to: mask.count, by: 3) { mask[i] = true }
        let fixed = try SparseGPTPruner.prune(problem.weight, hessian: problem.stats.hessian, pattern: .unstructured(0),
                                              fixedMask: mask, backend: checking)
        XCTAssertEqual(fixed.weight, try SparseGPTPruner.prune(problem.weight, hessian: problem.stats.hessian, pattern: .unstructured(0),
                                                               fixedMask: mask).weight)
        XCTAssertEqual(fixed.weight.zeroCount, mask.filter { $0 }.count)
        XCTAssertEqual([checking.counts.uploads, checking.counts.downloads], [3, 1])
        XCTAssertEqual(checking.violations, [])
    }

    /// The block pruner on stories260K through a CheckingBackend: the same block, outputs and
    /// report as on the plain CPU backend; the block's tensors go up once, the pruned weights come
    /// down once, and nothing crosses in between (the pruner's `withoutTransfers` window).
    func testBlockPrunerThroughCheckingBackend() throws {
        let model = try LanguageModel.open(path: TestPaths.shared.appendingPathComponent("assets/stories260K/stories260K.bin").path,
                                           tokenizerPath: TestPaths.shared.appendingPathComponent("assets/stories260K/tok512.bin").path)
        let text = try String(contentsOfFile: TestPaths.shared.appendingPathComponent("assets/public-domain-text/wizard_of_oz.txt").path, encoding: .utf8)
        let tokens = model.tokenizer!.encode(text, addBOS: nil)
        let samples = 4
        let (block, inputs) = try calibratedBlock(model, tokens: tokens, block: 1, samples: samples, seqlen: 64)
        let linears = block.linearNames.count
        let tensors = block.tensors.count
        for method in [PruneMethod.magnitude, .wanda, .sparsegpt, .sparsellm] {
            for pattern in [SparsityPattern.unstructured(0.5), .nOfM(n: 2, m: 4)] {
                let plan = PrunePlan(method: method, pattern: pattern)
                let checking = CheckingBackend()
                let viaChecking = try BlockPruner(plan: plan, backend: checking).prune(block: block, inputs: inputs, sequenceLength: 64)
                let plain = try BlockPruner(plan: plan).prune(block: block, inputs: inputs, sequenceLength: 64)
                for name in block.linearNames { XCTAssertEqual(viaChecking.block.weight(name), plain.block.weight(name), "\(method) \(pattern) \(name)") }
                for s in 0..<samples { XCTAssertEqual(try viaChecking.outputs.get(s), try plain.outputs.get(s)) }
                XCTAssertEqual(viaChecking.report.outputError, plain.report.outputError)
                XCTAssertEqual(viaChecking.report.linears.map(\.errorAfter), plain.report.linears.map(\.errorAfter))
                XCTAssertEqual(checking.violations, [], "\(method) \(pattern)")
                XCTAssertEqual(checking.counts.uploads, tensors, "\(method) \(pattern)")
                XCTAssertEqual(checking.counts.downloads, linears, "\(method) \(pattern)")
                // The forward, the statistics and the solves all ran on the checking backend; the
                // Hessian (syrk, mirror) only for the methods that use it (PrunePlan.collectsHessian).
                for op in ["rmsNorm", "attention", "gatedActivation", "columnSquaredSums", "gemm"] {
                    XCTAssertGreaterThan(checking.counts.calls[op] ?? 0, 0, "\(method) \(pattern) \(op)")
                }
                for op in ["syrkUpperUpdate", "mirrorUpper"] {
                    if plan.collectsHessian {
                        XCTAssertGreaterThan(checking.counts.calls[op] ?? 0, 0, "\(method) \(pattern) \(op)")
                    } else {
                        XCTAssertEqual(checking.counts.calls[op] ?? 0, 0, "\(method) \(pattern) \(op): no Hessian for \(method)")
                    }
                }
                XCTAssertEqual(plan.collectsHessian, method == .sparsegpt || method == .sparsellm)
            }
        }
    }
}

/// SparseLLM's alternating solve through a CheckingBackend: inputs and weights up once, the
/// chosen weights down once, nothing in between.
final class BackendSparseLLMTests: XCTestCase {
    func testSparseLLMSolvesWithoutTransfers() throws {
        let model = try LanguageModel.open(path: TestPaths.shared.appendingPathComponent("assets/stories260K/stories260K.bin").path,
                                           tokenizerPath: TestPaths.shared.appendingPathComponent("assets/stories260K/tok512.bin").path)
        let text = try String(contentsOfFile: TestPaths.shared.appendingPathComponent("assets/public-domain-text/wizard_of_oz.txt").path, encoding: .utf8)
        let (block, inputs) = try calibratedBlock(model, tokens: model.tokenizer!.encode(text, addBOS: nil), block: 2, samples: 4, seqlen: 64)
        // The FFN's input: the post-attention norm of the block's inputs, recorded by the forward.
        guard case .gated(let gate, let up, let down) = block.feedForwards[0] else { return XCTFail("stories260K has a gated FFN") }
        var parts: [Matrix] = []
        let cpu = CPUBackend()
        for s in 0..<inputs.count {
            _ = block.on(cpu).forward(cpu.upload(try inputs.get(s)), sequenceLength: 64, rope: block.config.ropeTable(positions: 64)) { name, x in
                if name == gate { parts.append(cpu.download(x)) }
            }
        }
        let x = Matrix.vstack(parts)
        for pattern in [SparsityPattern.unstructured(0.7), .nOfM(n: 2, m: 4)] {
            let checking = CheckingBackend()
            let tensors = [x, block.weight(gate), block.weight(up), block.weight(down)].map(checking.upload)
            let r = try checking.forbidTransfers("SparseLLM solve") {
                try SparseLLM.pruneLlama(x: tensors[0], gate: tensors[1], up: tensors[2], down: tensors[3], pattern: pattern, on: checking)
            }
            let expected = try SparseLLM.pruneLlama(x: x, gate: block.weight(gate), up: block.weight(up), down: block.weight(down), pattern: pattern)
            XCTAssertEqual(checking.download(r.gate), expected.gate, "\(pattern)")
            XCTAssertEqual(checking.download(r.up), expected.up, "\(pattern)")
            XCTAssertEqual(checking.download(r.down), expected.down, "\(pattern)")
            XCTAssertEqual(r.iterations, expected.iterations)
            XCTAssertEqual(checking.violations, [], "\(pattern)")
            XCTAssertEqual([checking.counts.uploads, checking.counts.downloads], [4, 3])
            XCTAssertEqual(checking.counts.calls["sparseLLMGate"], 3, "one s step between each pair of the 4 iterations")
        }
    }

    /// The profile's count of a SparseLLM solve (`SparseLLM.llamaFLOPs`, `optFLOPs`) against the
    /// products, Gram matrices, solves and inverses the solve actually makes, as the
    /// CheckingBackend records them: widths under SparseGPT's 128-column block, so that SparseGPT
    /// itself makes none of these calls, and rows in several chunks.
    func testSparseLLMFLOPCountMatchesTheCallsItMakes() throws {
        var rng = SplitMix(seed: 5)
        func random(_ rows: Int, _ cols: Int, scale: Float = 1) -> Matrix {
            Matrix(rows: rows, cols: cols) { p in for i in p.indices { p[i] = scale * (rng.uniform() - 0.5) } }
        }
        let products = ["gemm", "syrkAccumulate", "solveSPDDouble", "inverseSPDDouble"]
        func gramOf(_ a: Matrix) -> Matrix { Linalg.matmul(a, .transposed, a, .none) }
        let (n, d, f) = (100, 24, 56)
        for iterations in [1, 2, 4] {
            var options = SparseLLM.Options.llama
            options.iterations = iterations
            let checking = CheckingBackend()
            let t = [random(n, d), random(f, d, scale: 0.4), random(f, d, scale: 0.4), random(d, f, scale: 0.3)].map(checking.upload)
            _ = try SparseLLM.pruneLlama(x: t[0], gate: t[1], up: t[2], down: t[3], pattern: .unstructured(0.5), options: options,
                                         chunkRows: 40, on: checking)
            let counted = products.reduce(0) { $0 + (checking.counts.flopsByCall[$1] ?? 0) }
            XCTAssertEqual(counted, SparseLLM.llamaFLOPs(tokens: n, width: d, intermediate: f, iterations: iterations).products,
                           "LLaMA, \(iterations) iterations")
            XCTAssertEqual(checking.counts.calls["sparseGPTBlock"], 3 * iterations, "one column block per SparseGPT solve")
            // With the Gram matrices given (BlockPruner's statistics), XᵀX and the first pᵀp are not made.
            let given = CheckingBackend()
            let g = [random(n, d), random(f, d, scale: 0.4), random(f, d, scale: 0.4), random(d, f, scale: 0.3)].map(given.upload)
            let grams = SparseLLM.Grams(input: given.upload(gramOf(given.download(g[0]))),
                                        activation: given.upload(gramOf(random(n, f))))
            given.reset()
            _ = try SparseLLM.pruneLlama(x: g[0], gate: g[1], up: g[2], down: g[3], pattern: .unstructured(0.5), options: options,
                                         grams: grams, chunkRows: 40, on: given)
            XCTAssertEqual(products.reduce(0) { $0 + (given.counts.flopsByCall[$1] ?? 0) },
                           SparseLLM.llamaFLOPs(tokens: n, width: d, intermediate: f, iterations: iterations, gramsGiven: true).products,
                           "LLaMA with its Gram matrices given, \(iterations) iterations")

            options = SparseLLM.Options.opt
            options.iterations = iterations
            let opt = CheckingBackend()
            let o = [random(n, d), random(f, d, scale: 0.4), random(1, f, scale: 0.1), random(d, f, scale: 0.3), random(1, d, scale: 0.1)]
                .map(opt.upload)
            _ = try SparseLLM.pruneOPT(x: o[0], fc1: o[1], bias1: o[2], fc2: o[3], bias2: o[4], pattern: .unstructured(0.5), options: options,
                                       on: opt)
            let countedOPT = products.reduce(0) { $0 + (opt.counts.flopsByCall[$1] ?? 0) }
            XCTAssertEqual(countedOPT, SparseLLM.optFLOPs(tokens: n, width: d, intermediate: f, iterations: iterations).products,
                           "OPT, \(iterations) iterations")
            let givenOPT = CheckingBackend()
            let q = [random(n, d), random(f, d, scale: 0.4), random(1, f, scale: 0.1), random(d, f, scale: 0.3), random(1, d, scale: 0.1)]
                .map(givenOPT.upload)
            let gramsOPT = SparseLLM.Grams(input: givenOPT.upload(gramOf(givenOPT.download(q[0]))),
                                           activation: givenOPT.upload(gramOf(random(n, f))))
            givenOPT.reset()
            _ = try SparseLLM.pruneOPT(x: q[0], fc1: q[1], bias1: q[2], fc2: q[3], bias2: q[4], pattern: .unstructured(0.5), options: options,
                                       grams: gramsOPT, on: givenOPT)
            XCTAssertEqual(products.reduce(0) { $0 + (givenOPT.counts.flopsByCall[$1] ?? 0) },
                           SparseLLM.optFLOPs(tokens: n, width: d, intermediate: f, iterations: iterations, gramsGiven: true).products,
                           "OPT with its Gram matrices given, \(iterations) iterations")
        }
    }

    func testSparseLLMBlockThroughCheckingBackend() throws {
        let model = try LanguageModel.open(path: TestPaths.shared.appendingPathComponent("assets/stories260K/stories260K.bin").path,
                                           tokenizerPath: TestPaths.shared.appendingPathComponent("assets/stories260K/tok512.bin").path)
        let text = try String(contentsOfFile: TestPaths.shared.appendingPathComponent("assets/public-domain-text/wizard_of_oz.txt").path, encoding: .utf8)
        let samples = 4
        let (block, inputs) = try calibratedBlock(model, tokens: model.tokenizer!.encode(text, addBOS: nil), block: 1, samples: samples, seqlen: 64)
        let plan = PrunePlan(method: .sparsellm, pattern: .unstructured(0.6), sparseLLM: .llama)
        let checking = CheckingBackend()
        let viaChecking = try BlockPruner(plan: plan, backend: checking).prune(block: block, inputs: inputs, sequenceLength: 64)
        let plain = try BlockPruner(plan: plan).prune(block: block, inputs: inputs, sequenceLength: 64)
        for name in block.linearNames { XCTAssertEqual(viaChecking.block.weight(name), plain.block.weight(name), name) }
        XCTAssertEqual(viaChecking.report.sparseLLM, plain.report.sparseLLM)
        XCTAssertEqual(checking.violations, [])
        // The block's tensors up once (the FFN's input is stacked on the backend), every pruned weight down once.
        let (linears, tensors) = (block.linearNames.count, block.tensors.count)
        XCTAssertEqual(checking.counts.uploads, tensors)
        XCTAssertEqual(checking.counts.downloads, linears)
    }
}

/// BESA through a CheckingBackend: the learning (the block's forward and backward, the masks,
/// the ranked sums) and the reconstruction run on the backend, so the block's tensors go up
/// once and the pruned weights come down once, with nothing in between.
final class BackendBESATests: XCTestCase {
    func testBESABlockThroughCheckingBackend() throws {
        let model = try LanguageModel.open(path: TestPaths.shared.appendingPathComponent("assets/stories260K/stories260K.bin").path,
                                           tokenizerPath: TestPaths.shared.appendingPathComponent("assets/stories260K/tok512.bin").path)
        let text = try String(contentsOfFile: TestPaths.shared.appendingPathComponent("assets/public-domain-text/wizard_of_oz.txt").path, encoding: .utf8)
        let samples = 4
        let (block, inputs) = try calibratedBlock(model, tokens: model.tokenizer!.encode(text, addBOS: nil), block: 1, samples: samples, seqlen: 64)
        let (linears, tensors) = (block.linearNames.count, block.tensors.count)
        for reconstruct in [false, true] {
            var options = BESA.Options(epochs: 1)
            options.reconstruct = reconstruct
            let plan = PrunePlan(method: .besa, pattern: .unstructured(0.6), besa: options)
            let checking = CheckingBackend()
            let viaChecking = try BlockPruner(plan: plan, backend: checking).prune(block: block, inputs: inputs, sequenceLength: 64)
            let plain = try BlockPruner(plan: plan).prune(block: block, inputs: inputs, sequenceLength: 64)
            for name in block.linearNames { XCTAssertEqual(viaChecking.block.weight(name), plain.block.weight(name), "\(reconstruct) \(name)") }
            XCTAssertEqual(viaChecking.report.besa, plain.report.besa)
            XCTAssertEqual(checking.violations, [])
            XCTAssertEqual(checking.counts.uploads, tensors, "\(reconstruct)")
            XCTAssertEqual(checking.counts.downloads, linears, "\(reconstruct)")
            // One Adam step per sample: the block's backward once, each linear's ranked sums once.
            for op in ["attentionBackward", "gatedActivationBackward", "channelNormalizedError"] {
                XCTAssertEqual(checking.counts.calls[op], samples, "\(reconstruct) \(op)")
            }
            XCTAssertEqual(checking.counts.calls["rankedPrefixSums"], samples * linears, "\(reconstruct)")
            XCTAssertEqual(checking.counts.calls["sparseGPTBlock"] != nil, reconstruct)
        }
    }
}
