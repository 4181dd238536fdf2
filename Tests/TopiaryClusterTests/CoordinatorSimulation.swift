import Foundation
import XCTest
import TopiaryModel
import TopiaryPrune
import TopiaryTensor
import TopiaryTestSupport
@testable import TopiaryCluster

// A deterministic simulation of the coordinator against workers that fail, in the manner of
// TigerBeetle's VOPR: one seed gives the run's setup and every worker's faults; the coordinator,
// the workers and the pruning are all in this thread, so a seed replays exactly. Every schedule
// must end with the undisturbed run's output or with a clean error, and no block may be committed
// twice (docs/run-directory.md, "Simulation").

// MARK: Faults

/// What a simulated worker can do wrong, by the point of the protocol where it can happen.
enum SimulatedFault: String, CaseIterable, Sendable {
    // At start (the assignment).
    /// Connection refused: the worker is dead from now on.
    case refuse
    /// The assignment's send times out (the worker stopped reading).
    case stallAtStart
    // Instead of a block result.
    /// Connection reset.
    case die
    /// Nothing (no block, no heartbeat) for the connection's timeout.
    case stall
    /// The worker says the job failed: the run ends with that error.
    case jobError
    /// A missing, extra or mis-shaped tensor, a NaN weight, another index, a wrong or missing report.
    case corruptBlock
    /// The block, then the same block again.
    case duplicateBlock
    /// An index already committed (or the dense weights of this block after its result).
    case staleBlock
    /// An index past the range.
    case outOfRangeBlock
    /// The next block before this one.
    case reorder
    /// The next block without this one.
    case skip
    /// The boundary now, before the range's last block.
    case short
    // Instead of the boundary.
    /// Connection lost during the boundary's transfer.
    case dieAtBoundary
    /// The boundary the range started from, or one it returned for an earlier assignment.
    case staleBoundary
    /// Wrong window count or width, targets missing or extra, NaN activations.
    case corruptBoundary

    static let atStart: [SimulatedFault] = [.refuse, .stallAtStart]
    /// A job error ends the run, so it is drawn a third as often as the others.
    static let atBlock: [SimulatedFault] = [.die, .stall, .corruptBlock, .duplicateBlock, .staleBlock, .outOfRangeBlock, .reorder, .skip, .short]
    static let atBoundary: [SimulatedFault] = [.dieAtBoundary, .staleBoundary, .corruptBoundary]
}

/// Where in an assignment a worker decides what to do.
enum SimulationStep: Hashable, Sendable {
    case start
    /// Before the result of the range's j-th block (from 0).
    case block(Int)
    case boundary
}

/// A worker's faults: drawn at random, or written out by hand (assignment number, from 0, and step).
enum FaultPlan {
    /// Each step faults with probability `rate`, the fault drawn from those possible there (of `allowed`).
    case random(rate: Double, allowed: Set<SimulatedFault>)
    case scripted([ScriptedFault])
    static let none = FaultPlan.scripted([])
}

struct ScriptedFault: Hashable, Sendable {
    var assignment: Int
    var step: SimulationStep
    var fault: SimulatedFault
    /// Which variant of a corruption or stale result (corruptBlock, corruptBoundary, staleBoundary).
    var variant: Int = 0
}

extension SplitMix {
    mutating func below(_ n: Int) -> Int { Int(next() % UInt64(n)) }
    mutating func chance(_ p: Double) -> Bool { Double(next() >> 11) / Double(1 << 53) < p }
}

/// Stops a schedule that no longer makes sense (a livelock, a protocol misuse already recorded).
struct SimulationAbort: Error, CustomStringConvertible {
    let description: String
}

// MARK: Ledger

/// What the simulation saw: each block's commits (the coordinator's progress callback), the
/// faults injected, and the invariants the workers saw broken.
final class SimulationLedger {
    let layerCount: Int
    /// The ADMM round being run (0 for sequential coordination and the dense pass).
    var round = 0
    var commits: [Int: [Int: Int]] = [:]
    var violations: [String] = []
    var injected: [SimulatedFault: Int] = [:]
    var injectedJobError: WorkerJobError?
    var starts = 0
    /// The faults injected and the coordinator's log, in order (printed for a replayed seed).
    var trace: [String] = [] {
        didSet { if echo, let line = trace.last { FileHandle.standardError.write(Data(("  " + line + "\n").utf8)) } }
    }
    /// Print the trace as it happens (a replayed seed that traps still shows its way there).
    var echo = false
    static let maxStarts = 500

    init(layerCount: Int) { self.layerCount = layerCount }

    func violation(_ text: String) { violations.append(text) }

    func commit(_ block: Int) {
        commits[round, default: [:]][block, default: 0] += 1
        if commits[round]![block]! > 1 { violation("block \(block) was committed \(commits[round]![block]!) times in round \(round)") }
    }

    func isCommitted(_ block: Int) -> Bool { commits[round]?[block] != nil }

    /// A range handed to a worker: inside the model, and no block of it already committed this round.
    func checkAssignment(_ range: Range<Int>, job: PruneJob, worker: String) throws {
        starts += 1
        if starts > Self.maxStarts { throw SimulationAbort(description: "more than \(Self.maxStarts) assignments: the coordinator does not converge") }
        guard !range.isEmpty, range.lowerBound >= 0, range.upperBound <= layerCount else {
            violation("\(worker) was handed blocks \(range), not a range of the model's \(layerCount) blocks")
            return
        }
        let again = range.filter { job.prunes($0) && isCommitted($0) }
        if !again.isEmpty { violation("blocks \(again) were committed in round \(round) and handed to \(worker) to prune again") }
    }
}

// MARK: Worker

/// A remote worker as the coordinator sees it (a `WorkerLink` that can be lost), run in this
/// thread: `finish` prunes the range for real (RangePruner, as a worker process does), then hands
/// the results over, or fails in the way its fault plan says.
final class SimulatedWorker: WorkerLink {
    let name: String
    let model: LanguageModel
    let ledger: SimulationLedger
    let plan: FaultPlan
    var rng: SplitMix
    var isRemote: Bool { true }

    private var pending: (range: Range<Int>, job: PruneJob, boundary: Boundary)?
    private var assignments = 0
    /// Refuses every call from now on (it died or stalled).
    private var dead = false
    private(set) var abandoned = false
    /// Boundaries it returned before: what a stale result hands in.
    private var earlier: [Boundary] = []
    /// The variant of the fault being applied (scripted, or drawn).
    private var variant = 0

    init(name: String, model: LanguageModel, ledger: SimulationLedger, plan: FaultPlan, seed: UInt64) {
        self.name = name
        self.model = model
        self.ledger = ledger
        self.plan = plan
        self.rng = SplitMix(seed: seed)
    }

    func decide(_ step: SimulationStep, among faults: [SimulatedFault]) -> SimulatedFault? {
        let fault: SimulatedFault?
        switch plan {
        case .random(let rate, let allowed):
            guard rng.chance(rate) else { return nil }
            // One draw in 28 at a block is a job error (a third as often as each other fault).
            let drawn: SimulatedFault
            if case .block = step, rng.below(28) == 0 { drawn = .jobError } else { drawn = faults[rng.below(faults.count)] }
            variant = rng.below(16)
            guard allowed.contains(drawn) else { return nil }
            fault = drawn
        case .scripted(let script):
            let s = script.first { $0.assignment == assignments - 1 && $0.step == step }
            fault = s?.fault
            variant = s?.variant ?? 0
        }
        if let fault {
            ledger.injected[fault, default: 0] += 1
            ledger.trace.append("\(name), assignment \(assignments - 1), \(step): \(fault) (variant \(variant))")
        }
        return fault
    }

    func start(_ range: Range<Int>, job: PruneJob, from boundary: Boundary) throws {
        assignments += 1
        ledger.trace.append("\(name), assignment \(assignments - 1): blocks \(range)\(job.denseOnly ? " (dense pass)" : "") in round \(ledger.round)")
        if abandoned { ledger.violation("\(name) was handed blocks \(range) after the coordinator abandoned it") }
        if let p = pending { ledger.violation("\(name) was handed blocks \(range) while blocks \(p.range) were in progress on it") }
        try ledger.checkAssignment(range, job: job, worker: name)
        if dead { throw WireError.connection("\(name): connection refused") }
        switch decide(.start, among: SimulatedFault.atStart) {
        case .refuse?:
            dead = true
            throw WireError.connection("\(name): connection refused")
        case .stallAtStart?:
            dead = true
            throw WireError.during(peer: name, phase: "assignment of blocks \(range)",
                                   .connection("\(name): no progress for 60 s sending: the peer is not reading"))
        default:
            pending = (range, job, boundary)
        }
    }

    func finish(onBlock: (Int, DecoderBlock?, BlockReport?) throws -> Void) throws -> Boundary {
        guard let (range, job, start) = pending else {
            ledger.violation("finish on \(name) without a range started")
            throw SimulationAbort(description: "finish without start")
        }
        pending = nil
        if abandoned { ledger.violation("\(name) was asked for results after the coordinator abandoned it") }
        if dead { throw WireError.connection("\(name): connection closed") }
        // The work, as a worker process does it; a failure is the worker's error message.
        var results: [(index: Int, block: DecoderBlock?, report: BlockReport?)] = []
        let end: Boundary
        do {
            end = try RangePruner(model: model, job: job).run(range, from: start) { results.append(($0, $1, $2)) }
        } catch {
            throw WorkerJobError(worker: name, message: "\(error)")
        }
        var j = 0
        while j < results.count {
            let (i, block, report) = results[j]
            guard let fault = decide(.block(j), among: SimulatedFault.atBlock) else {
                try onBlock(i, block, report)
                j += 1
                continue
            }
            switch fault {
            case .die:
                dead = true
                throw WireError.connection("\(name): connection reset by peer")
            case .stall:
                dead = true
                throw WireError.during(peer: name, phase: "computing block \(i) (waiting for its result or a heartbeat)",
                                       .connection("\(name): no data for 60 s (waiting for a frame header)"))
            case .jobError:
                let e = WorkerJobError(worker: name, message: "simulated failure of the job at block \(i)")
                ledger.injectedJobError = e
                throw e
            case .corruptBlock:
                let (b, r) = corrupted(i, block, report, job: job)
                try onBlock(i, b, r)
            case .duplicateBlock:
                try onBlock(i, block, report)
                try onBlock(i, block, report)
            case .staleBlock:
                // An index already committed: the one before, by this worker or the one before it.
                let k = j > 0 ? results[j - 1].index : range.lowerBound - 1
                if k >= 0 {
                    try onBlock(k, try staleBlock(k, job: job), staleReport(k, template: report, job: job))
                } else {
                    try onBlock(i, block, report)
                    try onBlock(i, try staleBlock(i, job: job), staleReport(i, template: report, job: job))
                }
            case .outOfRangeBlock:
                let k = range.upperBound + variant % 2
                let b = k < model.config.layerCount ? try staleBlock(k, job: job) : block.map { DecoderBlock(config: $0.config, index: k, tensors: $0.tensors) }
                try onBlock(k, b, staleReport(k, template: report, job: job))
            case .reorder where j + 1 < results.count, .skip where j + 1 < results.count:
                let (n, nb, nr) = results[j + 1]
                try onBlock(n, nb, nr)
                if fault == .reorder { try onBlock(i, block, report) }
                j += 1
            case .reorder:
                try onBlock(i, block, report)
            case .skip, .short:
                earlier.append(end)
                return end
            default:
                preconditionFailure("\(fault) is not a block fault")
            }
            j += 1
        }
        switch decide(.boundary, among: SimulatedFault.atBoundary) {
        case .dieAtBoundary?:
            dead = true
            throw WireError.during(peer: name, phase: "transfer of the boundary after blocks \(range)",
                                   .truncated(what: "tensor data from \(name) (connection closed)", needed: 4096, available: 100))
        case .staleBoundary?:
            let stale = variant % 2 == 0 || earlier.isEmpty ? start : earlier[variant % earlier.count]
            earlier.append(end)
            return stale
        case .corruptBoundary?:
            earlier.append(end)
            return try corrupted(end)
        default:
            earlier.append(end)
            return end
        }
    }

    func abandon() {
        abandoned = true
        pending = nil
    }

    // MARK: Bad results

    /// The dense weights of block `k` as an old result for it (nil where the job only runs it).
    func staleBlock(_ k: Int, job: PruneJob) throws -> DecoderBlock? {
        job.prunes(k) ? try model.loadBlock(k) : nil
    }

    func staleReport(_ k: Int, template: BlockReport?, job: PruneJob) -> BlockReport? {
        guard job.prunes(k), var r = template else { return nil }
        r.block = k
        r.outputError += 1
        return r
    }

    /// Block `i`'s result with one thing wrong.
    func corrupted(_ i: Int, _ block: DecoderBlock?, _ report: BlockReport?, job: PruneJob) -> (DecoderBlock?, BlockReport?) {
        let c = model.config
        guard let block, var report else {
            // Only run: weights where none belong.
            let dense = try? model.loadBlock(i)
            return (dense, nil)
        }
        var tensors = block.tensors
        let names = tensors.keys.sorted()
        let name = names[variant % names.count]
        let m = tensors[name]!
        switch variant % 8 {
        case 0:
            tensors[name] = nil
        case 1:
            let other = c.family.blockTensors(c, block: (i + 1) % c.layerCount)[0]
            tensors[other.name] = Matrix(rows: other.rows, cols: other.cols, repeating: 0.5)
        case 2:
            tensors[name] = Matrix(rows: m.rows, cols: m.cols + 1, repeating: 0.25)
        case 3:
            var values = m.values
            values[variant % values.count] = .nan
            tensors[name] = Matrix(rows: m.rows, cols: m.cols, values: values)
        case 4:
            return (DecoderBlock(config: c, index: (i + 1) % c.layerCount, tensors: tensors), report)
        case 5:
            return (nil, report)
        case 6:
            return (block, nil)
        default:
            report.block = i + 1
            return (block, report)
        }
        return (DecoderBlock(config: c, index: i, tensors: tensors), report)
    }

    /// The boundary with one thing wrong.
    func corrupted(_ b: Boundary) throws -> Boundary {
        let x = b.inputs
        func store(count: Int, cols: Int, nan: Bool = false) throws -> ActivationStore {
            let s = ActivationStore(count: count, rows: x.rows, cols: cols, budgetBytes: x.budgetBytes, spillDirectory: x.spillDirectory)
            for w in 0..<count {
                if w < x.count && cols == x.cols && !nan { try s.set(w, try x.get(w)) } else {
                    try s.set(w, Matrix(rows: x.rows, cols: cols, repeating: nan ? .nan : 0.5))
                }
            }
            return s
        }
        switch variant % 4 {
        case 0: return Boundary(inputs: try store(count: x.count + (x.count > 1 && variant % 8 < 4 ? -1 : 1), cols: x.cols), targets: b.targets)
        case 1: return Boundary(inputs: try store(count: x.count, cols: x.cols + 1), targets: b.targets)
        case 2: return Boundary(inputs: x, targets: b.targets == nil ? x : nil)
        default: return Boundary(inputs: try store(count: x.count, cols: x.cols, nan: true), targets: b.targets)
        }
    }
}

// MARK: Schedules

/// One run's setup, drawn from its seed.
struct SimulationSetup: Hashable, CustomStringConvertible {
    var coordination: Coordination
    /// Wanda (the weights depend on the activations, so a wrong boundary changes the output) or
    /// SparseLLM with dense targets (boundaries carry targets too).
    var method: PruneMethod
    var layers: ClosedRange<Int>?
    /// Workers the blocks are planned over, and idle ones beside them (failover candidates).
    var workers: Int
    var spares: Int
    var rounds = 2
    var rho = Double.infinity
    var keep = ADMMKeep.best
    var minImprovement = ADMMOptions.defaultMinImprovement
    var runDirectory = false
    var faultRate = 0.0

    /// What the undisturbed output depends on.
    var resultKey: String {
        "\(coordination) \(method) \(layers.map { "\($0)" } ?? "all") \(workers) \(coordination == .admm ? "\(rounds) \(rho) \(keep) \(minImprovement)" : "")"
    }

    var description: String {
        var s = "\(coordination.rawValue), \(method.rawValue), layers \(layers.map { "\($0.lowerBound)-\($0.upperBound)" } ?? "all"), "
        s += "\(workers) workers + \(spares) spare, fault rate \(faultRate)"
        if coordination == .admm { s += ", \(rounds) rounds, rho \(rho)" }
        if runDirectory { s += ", run directory" }
        return s
    }

    static func draw(_ r: inout SplitMix) -> SimulationSetup {
        var s = SimulationSetup(coordination: r.chance(0.6) ? .sequential : .admm,
                                method: r.chance(0.85) ? .wanda : .sparsellm,
                                layers: r.chance(0.7) ? nil : 1...4,
                                workers: 1 + r.below(4), spares: r.below(3))
        if s.coordination == .admm {
            s.rounds = 1 + r.below(3)
            s.rho = r.chance(0.5) ? .infinity : 2
        }
        s.runDirectory = r.chance(0.06)
        s.faultRate = [0.02, 0.05, 0.1, 0.2, 0.35][r.below(5)]
        return s
    }
}

/// What a run produced: the digest of every pruned block's tensors (in block order), the
/// reports' blocks and output errors, and ADMM's rounds.
struct SimulationOutput: Equatable {
    var digest: String
    var reports: [String]
    var rounds: [String]
}

/// How one schedule ended.
struct ScheduleResult {
    var seed: UInt64?
    var setup: SimulationSetup
    var output: SimulationOutput?
    var error: Error?
    /// Invariants broken: empty when the schedule passed.
    var failures: [String]
    var injected: [SimulatedFault: Int]
    var trace: [String] = []
    /// The workers the coordinator gave up on.
    var abandoned: [String] = []
    var cleanError: Bool { error != nil && failures.isEmpty }

    var reproduction: String {
        let s = seed.map { String(format: "seed 0x%016llx", $0) } ?? "hand-written schedule"
        return "\(s) (\(setup)): " + failures.joined(separator: "; ")
    }
}

/// The model, calibration and undisturbed outputs the schedules share.
final class CoordinatorSimulation {
    static let layerCount = 6
    let model: LanguageModel
    let calibration: [[Int]]
    let sequenceLength = 8
    let root: String
    private var undisturbed: [String: SimulationOutput] = [:]
    private var runs = 0
    /// Print every schedule's trace as it runs.
    var echoTrace = false
    /// ADMM's dense pass in this many micro-batches (nil: the coordinator's default, pipelined).
    /// The regression seeds were found with the dense pass one partition after another (1): their
    /// schedules number the assignments as then.
    var denseMicroBatches: Int?

    /// A small LLaMA with random weights (seeded), six blocks of width 16: a block prunes in
    /// microseconds. `root`: where the runs' block stores go (tmpfs when there is one).
    init(root: String) {
        var c = ModelConfig(architecture: .llama, hiddenSize: 16, intermediateSize: 32, layerCount: Self.layerCount, headCount: 4,
                            kvHeadCount: 2, vocabularySize: 32, maxPositions: 64, normEps: 1e-5, tieWordEmbeddings: true)
        c.ropeTheta = 10000
        var r = SplitMix(seed: 0x5eed_c0de)
        var tensors: [String: Matrix] = [:]
        tensors[c.family.tokenEmbedding] = Matrix(rows: c.vocabularySize, cols: c.hiddenSize) { p in for i in p.indices { p[i] = r.uniform() } }
        for n in c.family.finalNorm { tensors[n] = Matrix(rows: 1, cols: c.hiddenSize, repeating: 1) }
        for b in 0..<c.layerCount {
            for spec in c.family.blockTensors(c, block: b) {
                let isNorm = spec.name.contains("norm")
                tensors[spec.name] = Matrix(rows: spec.rows, cols: spec.cols) { p in
                    for i in p.indices { p[i] = isNorm ? 1 + 0.2 * r.uniform() : 0.5 * r.uniform() }
                }
            }
        }
        model = LanguageModel(path: "(simulation model)", format: .huggingFace, config: c,
                              weights: MemoryTensorSource(path: "(simulation model)", tensors: tensors), tokenizer: nil)
        calibration = (0..<2).map { _ in (0..<8).map { _ in r.below(c.vocabularySize) } }
        self.root = root
    }

    func job(_ setup: SimulationSetup, directory: String) -> PruneJob {
        var sparseLLM: SparseLLM.Options?
        if setup.method == .sparsellm { sparseLLM = SparseLLM.Options(alpha: 5, beta: 5, gamma: 5, iterations: 1) }
        let plan = PrunePlan(method: setup.method, pattern: .unstructured(0.5), sparseLLM: sparseLLM,
                             targets: setup.method == .sparsellm ? .dense : .sequential)
        return PruneJob(plan: plan, calibration: calibration, sequenceLength: sequenceLength, layers: setup.layers,
                        memoryBudget: 1 << 24, workDirectory: directory)
    }

    /// The undisturbed output of `setup`'s kind of run (computed once).
    func expected(_ setup: SimulationSetup) throws -> SimulationOutput {
        if let o = undisturbed[setup.resultKey] { return o }
        var calm = setup
        calm.faultRate = 0
        calm.spares = 0
        calm.runDirectory = false
        let r = run(calm, plans: Array(repeating: .none, count: calm.workers), seed: nil, expected: nil)
        guard let output = r.output, r.failures.isEmpty else {
            throw SimulationAbort(description: "the undisturbed run of \(setup) failed: \(r.error.map { "\($0)" } ?? "") \(r.failures)")
        }
        undisturbed[setup.resultKey] = output
        return output
    }

    /// Runs the schedule of `seed`: its setup and every worker's faults are drawn from it (faults
    /// outside `allowed` are drawn, then not injected, so a seed keeps its other faults).
    func run(seed: UInt64, allowed: Set<SimulatedFault> = Set(SimulatedFault.allCases)) -> ScheduleResult {
        var r = SplitMix(seed: seed)
        let setup = SimulationSetup.draw(&r)
        let plans = (0..<(setup.workers + setup.spares)).map { _ in FaultPlan.random(rate: setup.faultRate, allowed: allowed) }
        let seeds = plans.map { _ in r.next() }
        do {
            return run(setup, plans: plans, seed: seed, workerSeeds: seeds, expected: try expected(setup))
        } catch {
            return ScheduleResult(seed: seed, setup: setup, failures: ["\(error)"], injected: [:])
        }
    }

    /// Runs `setup` with these workers' fault plans (the first `setup.workers` get the ranges),
    /// and checks the invariants: the undisturbed output or a clean error, each block committed
    /// once (per ADMM round), no finished block handed out again, no busy or abandoned worker used.
    func run(_ setup: SimulationSetup, plans: [FaultPlan], seed: UInt64?, workerSeeds: [UInt64]? = nil,
             expected: SimulationOutput?) -> ScheduleResult {
        runs += 1
        let directory = (root as NSString).appendingPathComponent("run-\(runs)")
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let ledger = SimulationLedger(layerCount: Self.layerCount)
        ledger.echo = echoTrace && expected != nil
        var result = ScheduleResult(seed: seed, setup: setup, failures: [], injected: [:])
        do {
            try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
            let job = self.job(setup, directory: directory)
            var runDirectory: RunDirectory?
            let store: BlockFileStore
            if setup.runDirectory {
                let run = try RunDirectory.create(path: directory + "/run")
                try run.writeManifest(RunManifest(toolVersion: "simulation", created: "", model: .init(path: "", fingerprint: ""),
                                                  calibration: .init(path: "", sha256: ""),
                                                  options: ["simulation": seed.map { String($0) } ?? "hand-written"], flags: [], plan: []))
                runDirectory = run
                store = run.store
            } else {
                store = try BlockFileStore(directory: directory + "/blocks")
            }
            let workers = plans.enumerated().map { k, plan in
                SimulatedWorker(name: "w\(k)", model: model, ledger: ledger, plan: plan, seed: workerSeeds?[k] ?? UInt64(k))
            }
            defer { result.abandoned = workers.filter(\.abandoned).map(\.name) }
            let coordinator = Coordinator(model: model, job: job, store: store, workers: workers, runDirectory: runDirectory)
            coordinator.log = { ledger.trace.append("coordinator: " + $0) }
            coordinator.denseMicroBatches = denseMicroBatches
            coordinator.fixedPlan = PartitionPlanner.plan(costs: coordinator.blockCosts(), workers: setup.workers)
            var reports: [BlockReport] = []
            var rounds: [ADMMRound] = []
            do {
                if setup.coordination == .admm {
                    ledger.round = 1
                    let outcome = try coordinator.runADMM(options: ADMMOptions(rounds: setup.rounds, rho: setup.rho, minImprovement: setup.minImprovement, keep: setup.keep),
                                                          progress: { block, _ in ledger.commit(block) },
                                                          round: { ledger.round = $0.round + 1 })
                    (reports, rounds) = (outcome.reports, outcome.rounds)
                } else {
                    reports = try coordinator.run { block, _ in ledger.commit(block) }
                }
                let output = SimulationOutput(digest: try digest(store, job: job),
                                              reports: reports.map { "\($0.block): \($0.outputError)" },
                                              rounds: rounds.map { "\($0.round): \($0.residuals) \($0.outputError)" })
                result.output = output
                if let expected, output != expected {
                    result.failures.append(output.digest != expected.digest ? "output digest \(output.digest.prefix(16)) differs from the undisturbed \(expected.digest.prefix(16))"
                                                                            : "reports or rounds differ from the undisturbed run's: \(output) vs \(expected)")
                }
                // Every block exactly once (per round).
                let roundsRun = setup.coordination == .admm ? Array(1...max(1, rounds.count)) : [0]
                for r in roundsRun {
                    let missing = (0..<Self.layerCount).filter { ledger.commits[r]?[$0] == nil }
                    if !missing.isEmpty { result.failures.append("blocks \(missing) never committed in round \(r)") }
                }
            } catch let e as SimulationAbort {
                result.failures.append("\(e)")
            } catch {
                result.error = error
                if let injected = ledger.injectedJobError, let e = error as? WorkerJobError, e.description == injected.description {
                    // The clean end of a run whose worker said its job failed.
                } else {
                    result.failures.append("ended with an error no injected fault explains: \(error)")
                }
            }
            if let runDirectory {
                var done: [String: Int] = [:]
                for e in try runDirectory.events.read() where e["event"] as? String == "block_done" {
                    // A kept ADMM round's block put back at the end is recorded again (worker "kept round R"), once.
                    let restored = (e["worker"] as? String ?? "").hasPrefix("kept round ") ? " (put back)" : ""
                    let key = "block \(e["block"] as? Int ?? -1) round \(e["round"] as? Int ?? 0)" + restored
                    done[key, default: 0] += 1
                }
                for (key, n) in done.sorted(by: { $0.key < $1.key }) where n > 1 { result.failures.append("\(key) recorded \(n) times in events.jsonl") }
            }
        } catch {
            result.failures.append("the simulation itself failed: \(error)")
        }
        result.failures += ledger.violations
        result.injected = ledger.injected
        result.trace = ledger.trace
        return result
    }

    /// SHA-256 over every pruned block's tensor data, in block order: each block file's bytes after
    /// its safetensors header (the header's metadata names the run, which differs between runs).
    func digest(_ store: BlockFileStore, job: PruneJob) throws -> String {
        var d = SHA256Digest()
        for i in 0..<Self.layerCount where job.prunes(i) {
            guard let bytes = FileManager.default.contents(atPath: store.path(i)), bytes.count >= 8 else {
                throw SimulationAbort(description: "block \(i) was never written to the store")
            }
            let headerLength = bytes.prefix(8).enumerated().reduce(0) { $0 | Int($1.element) << (8 * $1.offset) }
            guard 8 + headerLength <= bytes.count else { throw SimulationAbort(description: "block \(i)'s file is truncated") }
            d.update(bytes.dropFirst(8 + headerLength))
        }
        return d.finish()
    }
}

// MARK: Crash reports

/// The schedule running now, written where a signal handler can reach it: a schedule that traps
/// (a precondition in the coordinator) still names its seed.
enum CrashNote {
    nonisolated(unsafe) static let buffer: UnsafeMutablePointer<CChar> = {
        let b = UnsafeMutablePointer<CChar>.allocate(capacity: 1024)
        b.initialize(repeating: 0, count: 1024)
        return b
    }()
    nonisolated(unsafe) static var length = 0

    static func set(_ text: String) {
        let bytes = Array(("\n" + text + "\n").utf8.prefix(1023))
        for (i, b) in bytes.enumerated() { buffer[i] = CChar(bitPattern: b) }
        length = bytes.count
    }

    static func clear() { length = 0 }

    static func install() {
        for sig in [SIGILL, SIGTRAP, SIGSEGV, SIGABRT, SIGBUS] {
            signal(sig) { s in
                _ = write(2, CrashNote.buffer, CrashNote.length)
                signal(s, SIG_DFL)
                raise(s)
            }
        }
    }
}
