import Foundation
import XCTest
import TopiaryModel
import TopiaryPrune
import TopiaryTensor
import TopiaryTestSupport
@testable import TopiaryCluster

/// The coordinator's check of a remote worker's boundary runs only the first
/// `BoundaryProbe.tokens` tokens of window 0: every family's blocks are causal and token-wise
/// outside attention (sliding windows and expert routing included), so that prefix gives the
/// first rows of the whole window's output. A boundary that differs there, or is not finite
/// anywhere in window 0, is refused.
final class BoundaryProbeTests: XCTestCase {
    func boundary(_ model: LanguageModel, windows: Int, length: Int, seed: UInt64, directory: String) throws -> Boundary {
        var rng = SplitMix64(seed: seed)
        let embedding = try model.loadEmbedding()
        let store = ActivationStore(count: windows, rows: length, cols: model.config.hiddenSize, budgetBytes: 1 << 30, spillDirectory: directory)
        for w in 0..<windows {
            let tokens = (0..<length).map { _ in Int(rng.next() % UInt64(model.config.vocabularySize)) }
            try store.set(w, embedding.embed(tokens, sequenceLength: length))
        }
        return Boundary(inputs: store, targets: nil)
    }

    func testThePrefixGivesTheFirstRowsOfTheWholeWindowInEveryFamily() throws {
        let dir = try makeTemporaryDirectory("boundary-probe").path
        for fixture in ["tiny-llama3", "tiny-qwen3", "tiny-gemma2", "tiny-mistral", "tiny-phi3", "tiny-opt", "tiny-mixtral"] {
            let model = try LanguageModel.open(path: TestPaths.fixture(fixture))
            let length = min(96, model.config.maxPositions)
            XCTAssertGreaterThan(length, BoundaryProbe.tokens, fixture)
            let start = try boundary(model, windows: 2, length: length, seed: 5, directory: dir)
            var probe = try BoundaryProbe(start, config: model.config, sequenceLength: length)
            XCTAssertEqual(probe.inputs.rows, BoundaryProbe.tokens)
            let rope = model.config.ropeTable(positions: length)
            var whole = try start.inputs.get(0)
            for i in 0..<model.config.layerCount {
                let block = try model.loadBlock(i)
                whole = block.forward(whole, sequenceLength: length, rope: rope)
                try probe.advance(through: nil, block: i, model: model)
                XCTAssertTrue(Coordinator.agrees(whole.rows(0..<BoundaryProbe.tokens), probe.inputs), "\(fixture) block \(i)")
            }

            // The coordinator's check: the true boundary passes; one token changed early in
            // window 0, or a NaN past the prefix, is refused.
            let layers = 0..<model.config.layerCount
            let (coordinator, job) = try coordinator(model, length: length, directory: dir + "/\(fixture)")
            let end = RangePruner.store(job: job, config: model.config, backend: CPUBackend())
            try end.set(0, whole)
            try end.set(1, try start.inputs.get(1))
            XCTAssertNoThrow(try coordinator.checkBoundary(Boundary(inputs: end, targets: nil), after: layers, probe: probe, job: job, worker: "w"), fixture)
            for (row, value, message) in [(3, Float(7), "window 0 differs from the same window run here"), (length - 1, Float.nan, "is not finite (window 0)")] {
                var bad = whole
                bad[row, 1] = value
                try end.set(0, bad)
                XCTAssertThrowsError(try coordinator.checkBoundary(Boundary(inputs: end, targets: nil), after: layers, probe: probe, job: job, worker: "w")) {
                    XCTAssertTrue("\($0)".contains("the boundary after block \(layers.upperBound - 1)") && "\($0)".contains(message), "\(fixture): \($0)")
                }
            }
            // A prefix that disagrees with a true boundary (rounding, a near tie in routing) is
            // settled by running the whole window: accepted.
            var off = probe
            off.inputs[0, 0] += 1
            try end.set(0, whole)
            XCTAssertNoThrow(try coordinator.checkBoundary(Boundary(inputs: end, targets: nil), after: layers, probe: off, job: job, worker: "w"), fixture)
        }
    }

    /// Windows shorter than the prefix (the probe is the whole window), and targets (SparseLLM's
    /// and BESA's dense stream): checked on the same rule, refused when they differ.
    func testShortWindowsAndTargets() throws {
        let dir = try makeTemporaryDirectory("boundary-probe-targets").path
        let model = try LanguageModel.open(path: TestPaths.fixture("tiny-llama3"))
        for length in [32, 96] {
            let start = try boundary(model, windows: 2, length: length, seed: 9, directory: dir)
            let targetsStart = try boundary(model, windows: 2, length: length, seed: 10, directory: dir)
            var probe = try BoundaryProbe(Boundary(inputs: start.inputs, targets: targetsStart.inputs), config: model.config, sequenceLength: length)
            XCTAssertEqual(probe.inputs.rows, min(length, BoundaryProbe.tokens))
            let rope = model.config.ropeTable(positions: length)
            var inputs = try start.inputs.get(0), targets = try targetsStart.inputs.get(0)
            for i in 0..<model.config.layerCount {
                let block = try model.loadBlock(i)
                inputs = block.forward(inputs, sequenceLength: length, rope: rope)
                targets = block.forward(targets, sequenceLength: length, rope: rope)
                try probe.advance(through: nil, block: i, model: model)
            }
            let (coordinator, job) = try coordinator(model, length: length, directory: dir + "/\(length)")
            let layers = 0..<model.config.layerCount
            func ends(_ x: Matrix, _ t: Matrix) throws -> Boundary {
                let a = RangePruner.store(job: job, config: model.config, backend: CPUBackend())
                let b = RangePruner.store(job: job, config: model.config, backend: CPUBackend())
                for w in 0..<2 {
                    try a.set(w, x)
                    try b.set(w, t)
                }
                return Boundary(inputs: a, targets: b)
            }
            XCTAssertNoThrow(try coordinator.checkBoundary(try ends(inputs, targets), after: layers, probe: probe, job: job, worker: "w"), "\(length)")
            var bad = targets
            bad[1, 2] += 5
            XCTAssertThrowsError(try coordinator.checkBoundary(try ends(inputs, bad), after: layers, probe: probe, job: job, worker: "w")) {
                XCTAssertTrue("\($0)".contains("has targets that the dense blocks do not give"), "\(length): \($0)")
            }
        }
    }

    /// A coordinator over `model` whose job prunes nothing (a dense pass), so that running a
    /// window whole reads the model's own blocks.
    func coordinator(_ model: LanguageModel, length: Int, directory: String) throws -> (Coordinator, PruneJob) {
        var job = PruneJob(plan: PrunePlan(method: .wanda, pattern: .unstructured(0.5)), calibration: [[Int]](repeating: [], count: 2),
                           sequenceLength: length, layers: nil, memoryBudget: 1 << 30, workDirectory: directory)
        job.denseOnly = true
        return (Coordinator(model: model, job: job, store: try BlockFileStore(directory: directory), workers: []), job)
    }
}
