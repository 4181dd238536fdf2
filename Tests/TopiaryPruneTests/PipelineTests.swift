import Foundation
import XCTest
import TopiaryModel
import TopiaryTensor
import TopiaryTestSupport
@testable import TopiaryPrune

/// The streaming driver on stories260K (llama2.c) and the OPT fixture.
final class PipelineTests: XCTestCase {
    static func shared(_ p: String) -> String { TestPaths.shared.appendingPathComponent(p).path }

    func temporaryDirectory() throws -> String { try makeTemporaryDirectory("topiary-prune").path }

    func stories() throws -> (LanguageModel, [Int]) {
        let model = try LanguageModel.open(path: Self.shared("assets/stories260K/stories260K.bin"),
                                           tokenizerPath: Self.shared("assets/stories260K/tok512.bin"))
        let text = try String(contentsOfFile: Self.shared("assets/public-domain-text/wizard_of_oz.txt"), encoding: .utf8)
        return (model, model.tokenizer!.encode(text, addBOS: nil))
    }

    func run(_ model: LanguageModel, tokens: [Int], plan: PrunePlan, layers: ClosedRange<Int>? = nil, budget: Int = 1 << 30) throws -> (PrunePipeline, [BlockReport]) {
        let dir = try temporaryDirectory()
        let windows = try Calibration.windows(tokens: tokens, samples: 8, sequenceLength: 128, seed: 0)
        let job = PruneJob(plan: plan, calibration: windows, sequenceLength: 128, layers: layers, memoryBudget: budget, workDirectory: dir)
        let pipeline = PrunePipeline(model: model, job: job, store: try BlockFileStore(directory: dir + "/blocks"))
        let reports = try pipeline.run { _, _ in }
        return (pipeline, reports)
    }

    func testEveryMethodReachesItsSparsityAndSparseGPTReconstructsBest() throws {
        let (model, tokens) = try stories()
        var outputErrors: [PruneMethod: Double] = [:]
        // BESA allocates sparsity unevenly over linears by design; BESATests checks its total.
        for method in PruneMethod.allCases where method != .besa {
            let (pipeline, reports) = try run(model, tokens: tokens, plan: PrunePlan(method: method, pattern: .unstructured(0.5)))
            XCTAssertEqual(reports.count, 5)
            for r in reports { for l in r.linears { XCTAssertEqual(l.sparsity, 0.5, accuracy: 0.01, "\(method) \(l.name)") } }
            let pruned = try pipeline.prunedModel()
            let block = try pruned.loadBlock(2)
            for name in block.linearNames { XCTAssertEqual(Double(block.weight(name).zeroCount) / Double(block.weight(name).count), 0.5, accuracy: 0.01) }
            XCTAssertEqual(try pruned.loadBlock(2).tensors["model.layers.2.input_layernorm.weight"], try model.loadBlock(2).tensors["model.layers.2.input_layernorm.weight"])
            outputErrors[method] = reports[0].outputError
        }
        XCTAssertLessThan(outputErrors[.sparsegpt]!, outputErrors[.wanda]!)
        XCTAssertLessThan(outputErrors[.wanda]!, outputErrors[.magnitude]!)
    }

    /// Wanda, magnitude and BESA without its refit build no Hessian unless the linear errors are
    /// asked for; the weights and the block errors are the same either way, and the methods
    /// whose solve reads the Hessian always measure them.
    func testLinearErrorsOnlyWhereMeasuredAndWeightsUnchanged() throws {
        let (model, tokens) = try stories()
        for method in PruneMethod.allCases {
            XCTAssertEqual(PrunePlan(method: method, pattern: .unstructured(0.5)).collectsHessian, method == .sparsegpt || method == .sparsellm, "\(method)")
        }
        var refit = PrunePlan(method: .besa, pattern: .unstructured(0.5))
        refit.besa = BESA.Options(reconstruct: true)
        XCTAssertTrue(refit.collectsHessian && refit.measuresLinearErrors)
        for method in [PruneMethod.wanda, .magnitude, .besa] {
            XCTAssertFalse(PrunePlan(method: method, pattern: .unstructured(0.5)).collectsHessian)
            var asked = PrunePlan(method: method, pattern: .unstructured(0.5))
            asked.linearErrors = true
            XCTAssertTrue(asked.collectsHessian)
            let (plain, plainReports) = try run(model, tokens: tokens, plan: PrunePlan(method: method, pattern: .unstructured(0.5)), layers: 0...1)
            let (measured, measuredReports) = try run(model, tokens: tokens, plan: asked, layers: 0...1)
            for (p, m) in zip(plainReports, measuredReports) {
                XCTAssertEqual(p.outputError, m.outputError, "\(method) block \(p.block)")
                XCTAssertEqual(p.linears.map(\.sparsity), m.linears.map(\.sparsity))
                XCTAssertTrue(p.linears.allSatisfy { $0.errorBefore == nil && $0.errorAfter == nil }, "\(method): errors without --linear-errors")
                for l in m.linears {
                    let (before, after) = (try XCTUnwrap(l.errorBefore), try XCTUnwrap(l.errorAfter))
                    XCTAssertGreaterThan(before, 0, "\(method) \(l.name)")
                    XCTAssertEqual(before, after, accuracy: 1e-9 * max(1, before), "\(method) \(l.name): no weight update, so the final error is the mask's")
                }
            }
            XCTAssertEqual(try plain.prunedModel().loadBlock(1).tensors, try measured.prunedModel().loadBlock(1).tensors, "\(method)")
        }
        XCTAssertTrue(PrunePlan(method: .sparsegpt, pattern: .unstructured(0.5)).measuresLinearErrors)
        let (_, reports) = try run(model, tokens: tokens, plan: PrunePlan(method: .sparsegpt, pattern: .unstructured(0.5)), layers: 0...0)
        XCTAssertTrue(reports[0].linears.allSatisfy { $0.errorAfter != nil && $0.errorBefore != nil })
    }

    /// SparseGPT, Wanda and magnitude read the dense block output only for the output error,
    /// measured on 4 of the 8 windows (0, 2, 4, 6): the other windows' dense pass skips the
    /// feed-forward's last product. The weights are those of a run that measures every window,
    /// and the error is the one the dense and pruned blocks give on those 4 windows.
    func testOutputErrorOnItsSampleOfWindowsLeavesTheWeightsAlone() throws {
        let (model, tokens) = try stories()
        XCTAssertEqual(BlockPruner.outputErrorWindows(8, plan: PrunePlan(method: .sparsegpt, pattern: .unstructured(0.5))), [0, 2, 4, 6])
        XCTAssertEqual(BlockPruner.outputErrorWindows(3, plan: PrunePlan(method: .wanda, pattern: .unstructured(0.5))), [0, 1, 2])
        XCTAssertEqual(BlockPruner.outputErrorWindows(8, plan: PrunePlan(method: .besa, pattern: .unstructured(0.5))), Array(0..<8))
        XCTAssertEqual(BlockPruner.outputErrorWindows(8, plan: PrunePlan(method: .sparsellm, pattern: .unstructured(0.5))), Array(0..<8))
        let windows = try Calibration.windows(tokens: tokens, samples: 8, sequenceLength: 128, seed: 0)
        for method in [PruneMethod.sparsegpt, .wanda, .magnitude] {
            let plan = PrunePlan(method: method, pattern: .unstructured(0.5))
            var every = plan
            every.outputErrorSample = 8
            let (sampled, sampledReports) = try run(model, tokens: tokens, plan: plan, layers: 0...1)
            let (all, allReports) = try run(model, tokens: tokens, plan: every, layers: 0...1)
            for (s, a) in zip(sampledReports, allReports) {
                XCTAssertEqual(s.outputErrorWindows, 4, "\(method)")
                XCTAssertNil(a.outputErrorWindows, "\(method)")
                XCTAssertEqual(s.linears.map(\.errorAfter), a.linears.map(\.errorAfter), "\(method) block \(s.block)")
                XCTAssertNotEqual(s.outputError, a.outputError, "\(method) block \(s.block): 4 windows of 8 give another mean")
            }
            for b in 0...1 {
                XCTAssertEqual(try sampled.prunedModel().loadBlock(b).tensors, try all.prunedModel().loadBlock(b).tensors, "\(method) block \(b)")
            }
            // Block 0's error by hand: its dense and pruned outputs on the embeddings of windows 0, 2, 4 and 6.
            let (dense, pruned) = (try model.loadBlock(0), try sampled.prunedModel().loadBlock(0))
            let rope = dense.config.ropeTable(positions: 128)
            let embedding = try model.loadEmbedding()
            var (num, den) = (0.0, 0.0)
            for w in [0, 2, 4, 6] {
                let x = embedding.embed(windows[w], sequenceLength: 128)
                let (yd, yp) = (dense.forward(x, sequenceLength: 128, rope: rope), pruned.forward(x, sequenceLength: 128, rope: rope))
                for (d, p) in zip(yd.values, yp.values) {
                    num += Double(d - p) * Double(d - p)
                    den += Double(d) * Double(d)
                }
            }
            XCTAssertEqual(sampledReports[0].outputError, num / den, accuracy: 1e-9 * num / den, "\(method)")
        }
    }

    func testLayerRangeLeavesOtherBlocksDense() throws {
        let (model, tokens) = try stories()
        let (pipeline, reports) = try run(model, tokens: tokens, plan: PrunePlan(method: .wanda, pattern: .nOfM(n: 2, m: 4)), layers: 1...2)
        XCTAssertEqual(reports.map(\.block), [1, 2])
        let pruned = try pipeline.prunedModel()
        XCTAssertEqual(try pruned.loadBlock(0).tensors, try model.loadBlock(0).tensors)
        XCTAssertEqual(try pruned.loadBlock(4).tensors, try model.loadBlock(4).tensors)
        XCTAssertNotEqual(try pruned.loadBlock(1).tensors, try model.loadBlock(1).tensors)
    }

    /// Spilling activations to disk changes nothing, and runs are deterministic.
    func testSpilledActivationsGiveIdenticalResults() throws {
        let (model, tokens) = try stories()
        let plan = PrunePlan(method: .sparsegpt, pattern: .unstructured(0.6))
        let (a, _) = try run(model, tokens: tokens, plan: plan)
        let (b, _) = try run(model, tokens: tokens, plan: plan, budget: 0)
        let (c, _) = try run(model, tokens: tokens, plan: plan)
        for i in 0..<5 {
            XCTAssertEqual(try a.prunedModel().loadBlock(i).tensors, try b.prunedModel().loadBlock(i).tensors, "block \(i)")
            XCTAssertEqual(try a.prunedModel().loadBlock(i).tensors, try c.prunedModel().loadBlock(i).tensors, "block \(i)")
        }
    }

    func testOPTFixtureIsPrunedWithBiasesKept() throws {
        let model = try LanguageModel.open(path: Self.shared("fixtures/tiny-opt"))
        let tokens = (0..<2000).map { ($0 * 7919) % 512 }
        let (pipeline, reports) = try run(model, tokens: tokens, plan: PrunePlan(method: .sparsegpt, pattern: .unstructured(0.5)))
        XCTAssertEqual(reports.count, 2)
        XCTAssertEqual(reports[0].linears.map(\.name).last, "model.decoder.layers.0.fc2")
        let block = try pipeline.prunedModel().loadBlock(0)
        XCTAssertEqual(block.tensors["model.decoder.layers.0.fc1.bias"], try model.loadBlock(0).tensors["model.decoder.layers.0.fc1.bias"])
    }

    func testCalibrationErrors() {
        XCTAssertThrowsError(try Calibration.windows(tokens: Array(0..<100), samples: 4, sequenceLength: 100, seed: 0))
        XCTAssertNoThrow(try Calibration.windows(tokens: Array(0..<101), samples: 4, sequenceLength: 100, seed: 0))
        XCTAssertEqual(try Calibration.tokenIDs(fromFile: Data("[1, 2, 3]".utf8), path: "x"), [1, 2, 3])
        XCTAssertEqual(try Calibration.tokenIDs(fromFile: Data("1 2\n3,4".utf8), path: "x"), [1, 2, 3, 4])
        XCTAssertNil(try Calibration.tokenIDs(fromFile: Data("Once upon a time".utf8), path: "x"))
    }

    /// A JSON array of token ids holds integers that fit in Int, nothing else: booleans are not 1
    /// and 0, and a number too large is shown as written with its index, never wrapped; a file
    /// that starts with '[' but is not JSON is an error, not calibration text.
    func testTokenIDFileRefusesWhatIsNotAnInteger() throws {
        func refused(_ text: String, _ mentions: [String], line: UInt = #line) {
            XCTAssertThrowsError(try Calibration.tokenIDs(fromFile: Data(text.utf8), path: "ids.json"), line: line) { error in
                let message = "\(error)"
                XCTAssertFalse(message.contains("calibration"), message, line: line)
                XCTAssertFalse(message.contains("\n"), message, line: line)
                for m in ["ids.json"] + mentions { XCTAssertTrue(message.contains(m), "'\(m)' not in: \(message)", line: line) }
            }
        }
        refused("[true, 2]", ["holds 'true'", "index 0", "not an integer"])
        refused("[1, false]", ["holds 'false'", "index 1", "not an integer"])
        refused("[1, null]", ["holds 'null'", "index 1"])
        refused("[1, \"a, b\", 3]", ["holds '\"a, b\"'", "index 1"])
        refused("[5, 2.5]", ["holds '2.5'", "index 1", "not an integer"])
        refused("[1, 2, 99999999999999999999999]", ["holds '99999999999999999999999'", "index 2", "does not fit"])
        refused("[9223372036854775808]", ["holds '9223372036854775808'", "index 0", "does not fit"])
        refused("[ 1e30 ]", ["holds '1e30'", "index 0", "does not fit"])
        refused("[1,2,3", ["looks like a JSON array of token ids but is not valid JSON"])
        refused("  [1, 2] and then text", ["not valid JSON"])
        XCTAssertEqual(try Calibration.tokenIDs(fromFile: Data("[9223372036854775807, -1, 1.0, 1e3, 4]".utf8), path: "x"),
                       [Int.max, -1, 1, 1000, 4])
        XCTAssertEqual(try Calibration.tokenIDs(fromFile: Data(" [] ".utf8), path: "x"), [])
        // Integers separated by white space or commas: one too large is an error, not text.
        refused("1 2\n99999999999999999999999, 4", ["holds '99999999999999999999999'", "index 2", "does not fit"])
        XCTAssertNil(try Calibration.tokenIDs(fromFile: Data("1 2 3 4 -".utf8), path: "x"))
        XCTAssertNil(try Calibration.tokenIDs(fromFile: Data("12 monkeys".utf8), path: "x"))
    }
}
