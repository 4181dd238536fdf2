import Foundation
import TopiaryModel
import TopiaryPrune

/// What a prune run is to do, checked: the model, the job (plan, calibration windows, layers,
/// memory), how the workers coordinate, the workers, and the run directory it records into
/// (a new run's manifest, or the manifest of the run it resumes).
public struct PruneRequest {
    public var model: LanguageModel
    public var job: PruneJob
    public var coordination: Coordination
    /// ADMM's settings as given (nil: the defaults; rounds default to the number of partitions).
    public var rounds: Int?
    public var rho: Double?
    public var tolerance: Double?
    public var minImprovement: Double?
    public var keepRound: ADMMKeep?
    /// The workers, and the process ids of those this run started (in order, the first ones).
    public var workers: [WorkerLink]
    public var workerPIDs: [Int32]
    public var runDirectory: RunDirectory
    /// How the run starts: a new run writes this manifest (its plan filled in) and a `start`
    /// event; a resumed run carries the manifest it read, keeps its finished blocks and, under
    /// ADMM, its recorded partitions.
    public enum Start {
        case new(RunManifest)
        case resume(RunManifest)
    }
    public var start: Start
    /// ADMM's dense pass in this many micro-batches (nil: the coordinator's choice). Workers
    /// sent their weights with each assignment (`--weights send`) would get them once per
    /// micro-batch, so `prune` sets 1 for them.
    public var denseMicroBatches: Int?

    public init(model: LanguageModel, job: PruneJob, coordination: Coordination, rounds: Int? = nil, rho: Double? = nil,
                tolerance: Double? = nil, minImprovement: Double? = nil, keepRound: ADMMKeep? = nil,
                workers: [WorkerLink], workerPIDs: [Int32] = [], runDirectory: RunDirectory, start: Start) {
        self.model = model
        self.job = job
        self.coordination = coordination
        self.rounds = rounds
        self.rho = rho
        self.tolerance = tolerance
        self.minImprovement = minImprovement
        self.keepRound = keepRound
        self.workers = workers
        self.workerPIDs = workerPIDs
        self.runDirectory = runDirectory
        self.start = start
    }
}

/// What a prune run tells its caller as it goes.
public enum PruneRunEvent {
    /// A message of the coordinator's (a lost worker, a reassignment, a resumed ADMM round).
    case log(String)
    /// ADMM starts with these settings (a dense pass first).
    case admmStarting(ADMMOptions)
    /// A block is done: pruned (with its report), or run forward only.
    case block(Int, BlockReport?)
    /// An ADMM round ended.
    case admmRound(ADMMRound)
}

/// The pruned blocks' reports, ADMM's rounds, and how long the pruning took.
public struct PruneOutcome {
    public var reports: [BlockReport]
    public var rounds: [ADMMRound]
    /// ADMM: the round kept, why, and why the rounds stopped.
    public var admm: ADMMOutcome?
    public var pruneSeconds: Double
}

/// Executes a `PruneRequest` through the coordinator, recording it in its run directory:
/// `prepare()` fixes the plan and writes run.json and the `start` event (or, resuming, checks
/// the finished blocks and writes `resume`); `execute` prunes, reporting each block and round
/// through its callback.
public final class PruneRun {
    public let request: PruneRequest
    public let coordinator: Coordinator
    /// The ranges of blocks, one per worker, and the plan as run.json and the events record it.
    public private(set) var partitions: [Range<Int>] = []
    public private(set) var plan: [PlanEntry] = []
    /// Blocks finished by an earlier attempt (resume).
    public private(set) var finishedBlocks: Set<Int> = []

    public init(_ request: PruneRequest, log: @escaping (String) -> Void) throws {
        self.request = request
        coordinator = Coordinator(model: request.model, job: request.job, store: request.runDirectory.store,
                                  workers: request.workers, runDirectory: request.runDirectory)
        coordinator.log = log
        coordinator.denseMicroBatches = request.denseMicroBatches
        if case .resume(let manifest) = request.start, request.coordination == .admm {
            // ADMM's result depends on the partitions: a resumed run keeps the recorded ones.
            let plan = manifest.plan ?? []
            let ranges = plan.compactMap { $0.blocks.map { $0.lowerBound..<($0.upperBound + 1) } }
            guard !ranges.isEmpty, ranges.count == plan.count else {
                throw RunDirectoryError("\(request.runDirectory.manifestPath): field 'plan' is missing or malformed")
            }
            coordinator.fixedPlan = ranges
            coordinator.resumesADMM = true
        }
    }

    /// Plans the ranges and records the start (or the resume) in the run directory.
    public func prepare() throws {
        let r = request
        partitions = coordinator.plan()
        // Process ids are listed per worker process, in link order (a stage's replicas together).
        var next = 0
        let costs = coordinator.blockCosts()
        plan = zip(partitions, r.workers).map { range, link in
            let members = (link as? ReplicaGroup)?.members.map(\.name)
            let count = members?.count ?? 1
            let pids = (next..<(next + count)).map { $0 < r.workerPIDs.count ? Int(r.workerPIDs[$0]) : nil }
            next += count
            var entry = PlanEntry(first: range.lowerBound, last: range.upperBound - 1, worker: link.name, pid: pids[0],
                                  replicas: members, replicaPIDs: members != nil && pids.allSatisfy({ $0 != nil }) ? pids.map { $0! } : nil)
            entry.modelledFLOPs = range.reduce(0.0) { $0 + costs[$1] }
            entry.machines = count
            return entry
        }
        switch r.start {
        case .new(var manifest):
            manifest.plan = plan
            try r.runDirectory.writeManifest(manifest)
            try r.runDirectory.events.append(.start(plan: plan, blocks: r.model.config.layerCount))
        case .resume:
            let finished = try r.runDirectory.verifiedBlocks()
            finishedBlocks = Set(finished.keys)
            coordinator.finished = finished
            try r.runDirectory.events.append(.resume(plan: plan, finishedBlocks: finished.keys.sorted()))
        }
    }

    /// Blocks that are only run forward (finished before a resume, or outside --layers): not work
    /// (ADMM rounds prune every block again).
    public var replayedBlocks: Set<Int> {
        request.coordination == .admm ? [] : Set((0..<request.model.config.layerCount).filter { !request.job.prunes($0) || finishedBlocks.contains($0) })
    }

    /// Prunes every block of the plan (after `prepare()`).
    public func execute(_ event: (PruneRunEvent) -> Void) throws -> PruneOutcome {
        let r = request
        let start = Date()
        if r.coordination == .admm {
            let options = ADMMOptions(rounds: r.rounds ?? partitions.count, rho: r.rho ?? .infinity, tolerance: r.tolerance ?? 0,
                                      minImprovement: r.minImprovement ?? ADMMOptions.defaultMinImprovement, keep: r.keepRound ?? .best)
            event(.admmStarting(options))
            let outcome = try coordinator.runADMM(options: options, progress: { block, report in
                event(.block(block, report))
            }, round: { event(.admmRound($0)) })
            return PruneOutcome(reports: outcome.reports, rounds: outcome.rounds, admm: outcome, pruneSeconds: Date().timeIntervalSince(start))
        }
        let reports = try coordinator.run { block, report in event(.block(block, report)) }
        return PruneOutcome(reports: reports, rounds: [], admm: nil, pruneSeconds: Date().timeIntervalSince(start))
    }
}
