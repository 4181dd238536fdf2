import Foundation
import XCTest
import TopiaryModel
import TopiaryPrune
import TopiaryTensor
import TopiaryTestSupport
@testable import TopiaryCluster

/// ADMM's rounds: the stopping rules, the round kept (the smallest loss on the calibration windows of the model
/// its weights make), its weights as the output, and a resumed run's bytes.
final class ADMMTests: XCTestCase {
    func round(_ r: Int, _ residuals: [Double], model: Double?, output: Double = 0.1) -> ADMMRound {
        ADMMRound(round: r, residuals: residuals, outputError: output, modelError: model)
    }

    func testStopRulesAndTheKeptRound() {
        let options = ADMMOptions(rounds: 5)
        XCTAssertNil(options.stop(after: []))
        XCTAssertNil(options.stop(after: [round(1, [0.5, 0.5], model: 0.5)]))
        // Every residual at most the tolerance (0): converged.
        XCTAssertEqual(options.stop(after: [round(1, [0.5, 0.5], model: 0.5), round(2, [0, 0], model: 0.6)]), .converged)
        // One partition: no boundary, converged after its one round.
        XCTAssertEqual(options.stop(after: [round(1, [], model: 0.5)]), .converged)
        // The round limit.
        XCTAssertEqual(ADMMOptions(rounds: 1).stop(after: [round(1, [0.5], model: 0.5)]), .roundLimit)
        // Residuals that fall by less than 5% in a round whose model is no better: stalled.
        let r1 = round(1, [0.5, 0.5], model: 0.5)
        XCTAssertEqual(options.stop(after: [r1, round(2, [0.49, 0.5], model: 0.5)]), .stalled)
        XCTAssertEqual(options.stop(after: [r1, round(2, [0.6, 0.5], model: 0.7)]), .stalled)
        // ... but not while the model gets better, or the residuals fall by 5% or more.
        XCTAssertNil(options.stop(after: [r1, round(2, [0.49, 0.5], model: 0.4)]))
        XCTAssertNil(options.stop(after: [r1, round(2, [0.45, 0.5], model: 0.7)]))
        // --min-improvement 0: never stalled.
        XCTAssertNil(ADMMOptions(rounds: 5, minImprovement: 0).stop(after: [r1, round(2, [0.6, 0.5], model: 0.7)]))

        // Kept: the smallest model error, the later of equal ones; or the last round.
        let rounds = [round(1, [0.5], model: 0.3), round(2, [0.2], model: 0.2), round(3, [0.1], model: 0.25), round(4, [0.05], model: 0.2)]
        XCTAssertEqual(options.kept(among: rounds)?.round, 4)
        XCTAssertEqual(options.kept(among: Array(rounds.prefix(3)))?.round, 2)
        XCTAssertEqual(ADMMOptions(rounds: 5, keep: .last).kept(among: Array(rounds.prefix(3)))?.round, 3)
        XCTAssertNil(options.kept(among: []))
        // A round recorded without a model error (an earlier Topiary's log) is scored by its objective.
        XCTAssertEqual(round(1, [0.5, 0.25], model: nil, output: 0.125).score, 0.875)
        // The loss on the calibration windows comes first.
        XCTAssertEqual(ADMMRound(round: 1, residuals: [0.5], outputError: 0.1, modelError: 0.3, calibrationLoss: 2.5).score, 2.5)
    }

    // MARK: Runs on stories260K

    struct Setup {
        let model: LanguageModel
        let job: PruneJob
        let dir: String
        var pruned: [Int] { (0..<model.config.layerCount).filter { job.prunes($0) } }

        func blocks(_ store: BlockFileStore) throws -> [[String: Matrix]] {
            let overlaid = model.overlaid(with: try store.sources(pruned))
            return try pruned.map { try overlaid.loadBlock($0).tensors }
        }

        func workers(_ n: Int = 3) -> [WorkerLink] { (0..<n).map { InProcessWorker(model: model, name: "w\($0)") } }
    }

    /// SparseGPT 70% over 3 partitions of stories260K, ρ = ∞: the model that round 1's weights make
    /// (each partition pruned from the dense activations) is closer to the dense model on these
    /// calibration windows than the sequential chain of round 3, so a run keeps an earlier round than
    /// its last and has to put its blocks back.
    func setup() throws -> Setup {
        let model = try LanguageModel.open(path: TestPaths.asset("stories260K/stories260K.bin"),
                                           tokenizerPath: TestPaths.asset("stories260K/tok512.bin"))
        let text = try String(contentsOfFile: TestPaths.asset("public-domain-text/wizard_of_oz.txt"), encoding: .utf8)
        let windows = try Calibration.windows(tokens: model.tokenizer!.encode(text, addBOS: nil), samples: 8, sequenceLength: 128, seed: 0)
        let dir = try makeTemporaryDirectory("admm").path
        let job = PruneJob(plan: PrunePlan(method: .sparsegpt, pattern: .unstructured(0.7)), calibration: windows,
                           sequenceLength: 128, layers: nil, memoryBudget: 1 << 30, workDirectory: dir)
        return Setup(model: model, job: job, dir: dir)
    }

    /// The dense pass in micro-batches, the partitions working at once: the same boundaries, bit
    /// for bit, for any number of micro-batches (each window's forward is its own).
    func testThePipelinedDensePassGivesTheSameBoundariesForAnyMicroBatches() throws {
        let s = try setup()
        let store = try BlockFileStore(directory: s.dir + "/dense")
        let start = try PrunePipeline(model: s.model, job: s.job, store: store).embed()
        let plan = [0..<2, 2..<4, 4..<5]
        func boundaries(_ micro: Int?) throws -> [[Matrix]] {
            let c = Coordinator(model: s.model, job: s.job, store: store, workers: s.workers(2))   // the third partition in process
            c.denseMicroBatches = micro
            return try c.densePass(plan, from: start.inputs).map { d in try (0..<d.count).map { try d.get($0) } }
        }
        let serial = try boundaries(1)
        XCTAssertEqual(serial.count, 3)
        XCTAssertTrue(serial.allSatisfy { $0.count == s.job.samples })
        XCTAssertNotEqual(serial[0], serial[1], "the partitions change the activations")
        for micro in [nil, 3, 8, 100] {
            XCTAssertEqual(try boundaries(micro), serial, "\(micro.map(String.init) ?? "default") micro-batches")
        }
    }

    func testTheKeptRoundHasTheSmallestModelErrorAndItsWeightsAreTheOutput() throws {
        let s = try setup()
        let store = try BlockFileStore(directory: s.dir + "/best")
        let outcome = try Coordinator(model: s.model, job: s.job, store: store, workers: s.workers())
            .runADMM(options: ADMMOptions(rounds: 3), progress: { _, _ in })
        let rounds = outcome.rounds
        XCTAssertFalse(rounds.isEmpty)
        XCTAssertTrue(rounds.allSatisfy { $0.modelError != nil && $0.calibrationLoss != nil })
        let smallest = rounds.map(\.score).min()!
        XCTAssertEqual(outcome.kept, rounds.last { $0.score == smallest }!.round, "\(rounds)")
        XCTAssertNotEqual(outcome.kept, rounds.last!.round, "this setup is chosen so that an earlier round is kept: \(rounds)")
        XCTAssertEqual(outcome.stop, ADMMOptions(rounds: 3).stop(after: rounds))
        XCTAssertTrue(outcome.keptReason.contains("round \(outcome.kept)"), outcome.keptReason)
        // Nothing of the kept round is left beside the blocks (no run directory to resume from).
        XCTAssertFalse(try FileManager.default.contentsOfDirectory(atPath: store.directory).contains { $0.hasPrefix("kept-") })

        // The weights and reports are those of a run that stopped at the kept round.
        let stopped = try BlockFileStore(directory: s.dir + "/stopped")
        let at = try Coordinator(model: s.model, job: s.job, store: stopped, workers: s.workers())
            .runADMM(options: ADMMOptions(rounds: outcome.kept, minImprovement: 0, keep: .last), progress: { _, _ in })
        XCTAssertEqual(at.kept, outcome.kept)
        XCTAssertEqual(at.stop, .roundLimit)
        XCTAssertEqual(try s.blocks(store), try s.blocks(stopped))
        XCTAssertEqual(outcome.reports.map(\.outputError), at.reports.map(\.outputError))
        XCTAssertEqual(at.rounds.map(\.modelError), Array(rounds.prefix(outcome.kept)).map(\.modelError))

        // --keep-round last with ρ = ∞ and as many rounds as partitions: the sequential weights, the
        // chain's error equal to the last partition's output error (every residual zero).
        let last = try BlockFileStore(directory: s.dir + "/last")
        let sequential = try BlockFileStore(directory: s.dir + "/sequential")
        let l = try Coordinator(model: s.model, job: s.job, store: last, workers: s.workers())
            .runADMM(options: ADMMOptions(rounds: 3, minImprovement: 0, keep: .last), progress: { _, _ in })
        _ = try Coordinator(model: s.model, job: s.job, store: sequential, workers: s.workers()).run { _, _ in }
        XCTAssertEqual(l.stop, .converged)
        XCTAssertEqual(l.rounds.last?.residuals, [0, 0])
        XCTAssertEqual(l.rounds.last?.modelError, l.rounds.last?.outputError)
        XCTAssertEqual(try s.blocks(last), try s.blocks(sequential))
    }

    /// An in-process worker that stops the run (an error no failover catches, as a killed
    /// coordinator) once `budget` blocks of all workers sharing it have arrived.
    final class Interrupting: WorkerLink {
        final class Budget { var left: Int; init(_ n: Int) { left = n } }
        struct Stop: Error {}
        let inner: InProcessWorker
        let budget: Budget
        var name: String { inner.name }
        init(_ inner: InProcessWorker, budget: Budget) {
            self.inner = inner
            self.budget = budget
        }
        func start(_ range: Range<Int>, job: PruneJob, from boundary: Boundary) throws { try inner.start(range, job: job, from: boundary) }
        func finish(onBlock: (Int, DecoderBlock?, BlockReport?) throws -> Void) throws -> Boundary {
            try inner.finish { i, b, r in
                if budget.left <= 0 { throw Stop() }
                budget.left -= 1
                try onBlock(i, b, r)
            }
        }
    }

    func manifest(_ s: Setup) -> RunManifest {
        RunManifest(toolVersion: "test", created: "2026-12-02T00:00:00Z", model: .init(path: s.model.path, fingerprint: "f"),
                    calibration: .init(path: "calib", sha256: "c"), options: ["coordination": "admm"], flags: [], plan: [])
    }

    /// Runs ADMM in a run directory, stopped after `budget` block results when given; returns the outcome when it ended.
    func attempt(_ s: Setup, _ path: String, budget: Int?, resume: Bool, plan: [Range<Int>]) throws -> ADMMOutcome? {
        let run = resume ? try RunDirectory.open(existing: path) : try RunDirectory.create(path: path)
        if resume { _ = try run.readManifest() } else { try run.writeManifest(manifest(s)) }
        let shared = Interrupting.Budget(budget ?? .max)
        let workers: [WorkerLink] = (0..<3).map { Interrupting(InProcessWorker(model: s.model, name: "w\($0)"), budget: shared) }
        let coordinator = Coordinator(model: s.model, job: s.job, store: run.store, workers: workers, runDirectory: run)
        coordinator.fixedPlan = plan
        if resume {
            coordinator.resumesADMM = true
            coordinator.finished = try run.verifiedBlocks()
        }
        do {
            return try coordinator.runADMM(options: ADMMOptions(rounds: 3), progress: { _, _ in })
        } catch is Interrupting.Stop {
            return nil
        }
    }

    func testAResumedRunKeepsTheSameRoundAndWritesTheSameBytes() throws {
        let s = try setup()
        let plan = PartitionPlanner.plan(costs: Coordinator(model: s.model, job: s.job, store: try BlockFileStore(directory: s.dir + "/plan"),
                                                            workers: s.workers()).blockCosts(), workers: 3)
        let whole = try XCTUnwrap(try attempt(s, s.dir + "/whole", budget: nil, resume: false, plan: plan))
        let expected = try s.blocks(try BlockFileStore(directory: s.dir + "/whole/blocks"))
        let blocks = s.model.config.layerCount
        // Stopped in round 1, in round 2, in the last round (after the kept round's event), and
        // each resumed once (a second stop in the resumed attempt for the first).
        for (budget, again) in [(blocks + 2, Optional(3)), (2 * blocks + 1, nil), (3 * blocks + 3, nil)] {
            let path = s.dir + "/stopped-\(budget)"
            XCTAssertNil(try attempt(s, path, budget: budget, resume: false, plan: plan), "budget \(budget)")
            if let again { XCTAssertNil(try attempt(s, path, budget: again, resume: true, plan: plan)) }
            let resumed = try XCTUnwrap(try attempt(s, path, budget: nil, resume: true, plan: plan))
            XCTAssertEqual(resumed.kept, whole.kept, "budget \(budget)")
            XCTAssertEqual(resumed.stop, whole.stop)
            XCTAssertEqual(resumed.rounds.map(\.round), whole.rounds.map(\.round))
            XCTAssertEqual(resumed.rounds.map(\.modelError), whole.rounds.map(\.modelError))
            XCTAssertEqual(resumed.rounds.map(\.calibrationLoss), whole.rounds.map(\.calibrationLoss))
            XCTAssertEqual(resumed.reports.map(\.outputError), whole.reports.map(\.outputError))
            XCTAssertEqual(try s.blocks(try BlockFileStore(directory: path + "/blocks")), expected, "budget \(budget)")
            let names = try EventLog.records(path: path + "/events.jsonl").map(\.event.name)
            XCTAssertFalse(names.contains { $0 == "checkpoint_corrupt" || $0 == "checkpoint_refused" }, "\(names)")
        }
        // Resuming a run whose rounds are all done (stopped before its output was written) puts
        // nothing back twice and gives the same blocks: each block's latest record is the kept round's.
        var recorded = 0
        do {
            let run = try RunDirectory.open(existing: s.dir + "/whole")
            XCTAssertTrue(try run.verifiedBlocks().values.allSatisfy { $0.round == whole.kept })
            recorded = try run.events.records().count
        }
        let done = try XCTUnwrap(try attempt(s, s.dir + "/whole", budget: nil, resume: true, plan: plan))
        XCTAssertEqual(done.kept, whole.kept)
        XCTAssertEqual(try s.blocks(try BlockFileStore(directory: s.dir + "/whole/blocks")), expected)
        XCTAssertEqual(try RunDirectory.open(existing: s.dir + "/whole").events.records().count, recorded, "nothing was redone or put back again")
    }
}
