import Foundation
import XCTest
import TopiaryModel
import TopiaryTensor
import TopiaryTestSupport
@testable import TopiaryPrune

final class BESATests: XCTestCase {
    func stories() throws -> (LanguageModel, [Int]) {
        let model = try LanguageModel.open(path: PipelineTests.shared("assets/stories260K/stories260K.bin"),
                                           tokenizerPath: PipelineTests.shared("assets/stories260K/tok512.bin"))
        let text = try String(contentsOfFile: PipelineTests.shared("assets/public-domain-text/wizard_of_oz.txt"), encoding: .utf8)
        return (model, model.tokenizer!.encode(text, addBOS: nil))
    }

    /// The whole model through the streaming driver; returns the reports and the fraction of zeros
    /// over every pruned linear of the written blocks.
    func runPipeline(_ model: LanguageModel, tokens: [Int], plan: PrunePlan, samples: Int = 8, seqlen: Int = 128) throws -> ([BlockReport], Double) {
        let dir = try makeTemporaryDirectory("besa-pipeline").path
        let windows = try Calibration.windows(tokens: tokens, samples: samples, sequenceLength: seqlen, seed: 0)
        let job = PruneJob(plan: plan, calibration: windows, sequenceLength: seqlen, layers: nil, memoryBudget: 1 << 30, workDirectory: dir)
        let pipeline = PrunePipeline(model: model, job: job, store: try BlockFileStore(directory: dir + "/blocks"))
        let reports = try pipeline.run { _, _ in }
        let pruned = try pipeline.prunedModel()
        var zeros = 0, total = 0
        for b in 0..<model.config.layerCount {
            let block = try pruned.loadBlock(b)
            for name in block.linearNames { zeros += block.weight(name).zeroCount; total += block.weight(name).count }
        }
        return (reports, Double(zeros) / Double(total))
    }

    /// The start: the largest-entropy distribution over the candidates with the target's mean
    /// (the reference's uniform start at 50%).
    /// The cosine schedule starts at --besa-lr, is half of it midway and nearly 0 at the last
    /// step; constant (and no schedule, as older run.json files have it) keeps it.
    func testLearningRateSchedules() {
        var o = BESA.Options(learningRate: 0.08)
        XCTAssertEqual(o.learningRate(step: 1, of: 64), 0.08)
        XCTAssertEqual(o.learningRate(step: 64, of: 64), 0.08)
        o.schedule = .cosine
        XCTAssertEqual(o.learningRate(step: 1, of: 64), 0.08, accuracy: 1e-12)
        XCTAssertEqual(o.learningRate(step: 33, of: 64), 0.04, accuracy: 1e-12)
        XCTAssertEqual(o.learningRate(step: 64, of: 64), 0.08 * 0.5 * (1 + cos(Double.pi * 63 / 64)), accuracy: 1e-12)
        XCTAssertLessThan(o.learningRate(step: 64, of: 64), 0.0001)
        let old = try! JSONDecoder().decode(BESA.Options.self, from: Data(#"{"epochs":1,"learningRate":0.05,"penalty":5,"granularity":"row","reconstruct":false}"#.utf8))
        XCTAssertNil(old.schedule)
    }

    func testStartHasTheTargetMean() {
        for target in [0.5, 0.7, 0.9, 0.13] {
            let p = BESA.softmax(BESA.maximumEntropyLogits(mean: target))
            let mean = p.enumerated().reduce(0.0) { $0 + $1.element * Double($1.offset) / Double(BESA.steps) }
            XCTAssertEqual(mean, target, accuracy: 1e-9)
            if target == 0.5 { XCTAssertEqual(p.max()! - p.min()!, 0, accuracy: 1e-12) }
        }
    }

    /// ∂/∂θ of the straight-through surrogate Σ_rj (G⊙W)_rj q_rj(θ) + c·Σ_r s̄_r(θ), where q is the
    /// expected keep-mask over the Wanda order, against central differences (row and layer groups).
    func testLogitGradientIsTheGradientOfTheExpectedMask() {
        var rng = SplitMix(seed: 7)
        let (rows, cols) = (5, 37)
        let w = Matrix(rows: rows, cols: cols) { p in for i in p.indices { p[i] = rng.uniform() } }
        let g = Matrix(rows: rows, cols: cols) { p in for i in p.indices { p[i] = rng.uniform() } }
        let norms = (0..<cols).map { _ in 0.5 + abs(rng.uniform()) }
        let slope = 0.3
        for granularity in BESA.Granularity.allCases {
            let backend = CheckingBackend()
            let learner = RowLearner(name: "w", weight: backend.upload(w), inputSquaredNorms: backend.upload(Matrix(rows: 1, cols: cols, values: norms)),
                                     granularity: granularity, target: 0.6, on: backend)
            let order = backend.download(learner.order)
            // Move θ off the start so every candidate matters.
            for i in learner.logits.indices { learner.logits[i] += Double(rng.uniform()) }
            learner.refresh()
            let analytic = learner.logitGradient(weightGradient: backend.upload(g), penaltySlope: slope)
            func surrogate(_ l: RowLearner) -> Double {
                var f = 0.0
                for r in 0..<rows {
                    let base = l.group(r) * (BESA.steps + 1)
                    for j in 0..<cols {
                        // Rank of column order[j] is j: q = 1 − Σ_k p_k [j < N_k].
                        var q = 1.0
                        for k in 0...BESA.steps where j < l.candidateCounts[k] { q -= l.probabilities[base + k] }
                        let c = Int(order[r, j])
                        f += Double(g[r, c]) * Double(w[r, c]) * q
                    }
                    f += slope * l.groupSparsity[l.group(r)]
                }
                return f
            }
            let h = 1e-6
            for i in stride(from: 0, to: learner.logits.count, by: 3) {
                let saved = learner.logits[i]
                learner.logits[i] = saved + h; learner.refresh()
                let plus = surrogate(learner)
                learner.logits[i] = saved - h; learner.refresh()
                let minus = surrogate(learner)
                learner.logits[i] = saved; learner.refresh()
                let fd = (plus - minus) / (2 * h)
                XCTAssertEqual(analytic[i], fd, accuracy: 1e-6 + 1e-5 * abs(fd), "\(granularity) logit \(i)")
            }
        }
    }

    /// The realised sparsity over all linears of stories260K is the target's, at 50, 70 and 90%.
    func testRealisedSparsityIsTheTarget() throws {
        let (model, tokens) = try stories()
        for target in [0.5, 0.7, 0.9] {
            let (reports, sparsity) = try runPipeline(model, tokens: tokens, plan: PrunePlan(method: .besa, pattern: .unstructured(target)))
            XCTAssertEqual(sparsity, target, accuracy: 0.005, "target \(target)")
            XCTAssertEqual(reports.count, model.config.layerCount)
            for r in reports {
                let summary = try XCTUnwrap(r.besa)
                XCTAssertEqual(summary.linears.map(\.name), r.linears.map(\.name))
                // The summary's allocation is the written weights'.
                for (a, l) in zip(summary.linears, r.linears) { XCTAssertEqual(a.sparsity, l.sparsity, accuracy: 1e-9, a.name) }
                XCTAssertEqual(summary.steps, 8)
                XCTAssertTrue(summary.epochLosses.allSatisfy(\.isFinite))
            }
        }
    }

    /// On a stories260K block, the learned allocation reconstructs the block's output better than
    /// Wanda's uniform rows at the same sparsity, and --besa-reconstruct better still.
    func testBeatsWandaAndReconstructionHelps() throws {
        let (model, tokens) = try stories()
        let (block, inputs) = try calibratedBlock(model, tokens: tokens, block: 1, samples: 8, seqlen: 128)
        for target in [0.5, 0.7] {
            let wanda = try BlockPruner(plan: PrunePlan(method: .wanda, pattern: .unstructured(target))).prune(block: block, inputs: inputs, sequenceLength: 128)
            var options = BESA.Options(epochs: 2)
            let besa = try BlockPruner(plan: PrunePlan(method: .besa, pattern: .unstructured(target), besa: options)).prune(block: block, inputs: inputs, sequenceLength: 128)
            options.reconstruct = true
            let rebuilt = try BlockPruner(plan: PrunePlan(method: .besa, pattern: .unstructured(target), besa: options)).prune(block: block, inputs: inputs, sequenceLength: 128)
            XCTAssertLessThan(besa.report.outputError, wanda.report.outputError, "target \(target)")
            XCTAssertLessThan(rebuilt.report.outputError, besa.report.outputError, "target \(target)")
            // Reconstruction keeps the learned masks and changes only kept weights.
            for name in block.linearNames {
                let (a, b) = (besa.block.weight(name), rebuilt.block.weight(name))
                XCTAssertEqual(a.values.map { $0 == 0 }, b.values.map { $0 == 0 }, name)
            }
            XCTAssertEqual(besa.report.besa, rebuilt.report.besa)
        }
    }

    /// One distribution per layer: every row of a linear ends equally sparse.
    func testLayerGranularityGivesUniformRows() throws {
        let (model, tokens) = try stories()
        let (block, inputs) = try calibratedBlock(model, tokens: tokens, block: 2, samples: 4, seqlen: 64)
        let plan = PrunePlan(method: .besa, pattern: .unstructured(0.7), besa: BESA.Options(granularity: .layer))
        let r = try BlockPruner(plan: plan).prune(block: block, inputs: inputs, sequenceLength: 64)
        let summary = try XCTUnwrap(r.report.besa)
        for a in summary.linears { XCTAssertEqual(a.rowSparsityMin, a.rowSparsityMax, a.name) }
        let total = r.report.linears.reduce(0.0) { $0 + $1.sparsity * Double($1.rows * $1.columns) }
        XCTAssertEqual(total / Double(r.report.linears.reduce(0) { $0 + $1.rows * $1.columns }), 0.7, accuracy: 0.005)
    }

    /// OPT (biases, LayerNorm), pre-LN and post-LN, with targets from the dense model's stream.
    func testOPTFixturesWithDenseTargets() throws {
        for fixture in ["fixtures/tiny-opt", "fixtures/tiny-opt-postln"] {
            let model = try LanguageModel.open(path: PipelineTests.shared(fixture))
            let tokens = (0..<3000).map { ($0 * 7919 + 13) % 512 }
            for targets in TargetMode.allCases {
                let plan = PrunePlan(method: .besa, pattern: .unstructured(0.7), targets: targets)
                let (reports, sparsity) = try runPipeline(model, tokens: tokens, plan: plan, samples: 4, seqlen: 64)
                XCTAssertEqual(reports.count, 2)
                XCTAssertEqual(sparsity, 0.7, accuracy: 0.005, "\(fixture) \(targets)")
                for r in reports { XCTAssertTrue(r.outputError.isFinite) }
            }
        }
    }

    /// N:M patterns are not what BESA learns: refused, naming the option.
    func testPatternIsRefused() throws {
        let (model, tokens) = try stories()
        let (block, inputs) = try calibratedBlock(model, tokens: tokens, block: 0, samples: 2, seqlen: 32)
        XCTAssertThrowsError(try BlockPruner(plan: PrunePlan(method: .besa, pattern: .nOfM(n: 2, m: 4))).prune(block: block, inputs: inputs, sequenceLength: 32)) { error in
            XCTAssertTrue("\(error)".contains("--sparsity"), "\(error)")
        }
    }
}
