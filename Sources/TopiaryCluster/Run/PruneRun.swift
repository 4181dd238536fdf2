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
    /// What `run` delivers after pruning (nil: `execute` only, as the tests run it).
    public var delivery: PruneDelivery?

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
    /// Every block is pruned (`run`: the evaluation and the output follow).
    case pruned(PruneOutcome)
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

/// What a run delivers once its blocks are pruned: the dense and the pruned model's perplexity,
/// the Hugging Face directory (staged under a temporary name, then renamed into place),
/// report.json (in the output and in the run directory) and the run's `complete` event.
public struct PruneDelivery {
    /// The directory to write, its weights' dtype, and whether a directory Topiary wrote there
    /// may be replaced (`OutputDirectory`).
    public var output: String
    public var dtype: TensorDType
    public var overwrite: Bool
    /// Perplexity on these tokens after pruning, and before unless `skipDense`.
    public var evaluation: Evaluation?
    /// `prune --profile`: the sgemm rate measured before pruning; report.json gets the profile.
    public var sgemmRate: Double?
    /// report.json's fields that only the caller knows (the calibration's source and how it was
    /// read, the precision; the allocation it applied, else run.json's), written as given.
    public var fields: [String: Any]
    /// When the command started (report.json's `seconds`).
    public var started: Date
    /// The command the output marker names.
    public var command: String

    public struct Evaluation {
        public var tokens: [Int]
        /// The text the tokens came from (report.json's `evaluation.file`).
        public var source: String
        public var sequenceLength: Int
        /// nil: every window of the text.
        public var windows: Int?
        public var skipDense: Bool

        public init(tokens: [Int], source: String, sequenceLength: Int, windows: Int?, skipDense: Bool) {
            self.tokens = tokens
            self.source = source
            self.sequenceLength = sequenceLength
            self.windows = windows
            self.skipDense = skipDense
        }
    }

    public init(output: String, dtype: TensorDType, overwrite: Bool, evaluation: Evaluation?, sgemmRate: Double?,
                fields: [String: Any], started: Date, command: String = "prune") {
        self.output = output
        self.dtype = dtype
        self.overwrite = overwrite
        self.evaluation = evaluation
        self.sgemmRate = sgemmRate
        self.fields = fields
        self.started = started
        self.command = command
    }
}

/// A delivered run: the pruning's outcome, the output's weights sha256, the sparsity of the
/// pruned linears, the perplexities, and report.json as written (`summary` is it without
/// `blocks` and `profile`: what `prune --json` prints).
public struct PruneResult {
    public var outcome: PruneOutcome
    public var outputSHA256: String
    public var sparsity: Double
    public var perplexityDense: Double?
    public var perplexity: Double?
    public var summary: [String: Any]
    public var report: [String: Any]
}

public enum PruneDeliveryError: Error, CustomStringConvertible {
    case noDelivery
    public var description: String { "the prune request has no delivery (output directory); set PruneRequest.delivery" }
}

extension PruneRun {
    /// The dense model's perplexity when the delivery asks for it (nil otherwise). `run` measures
    /// it before pruning, so a run that fails later has still said it.
    public func evaluateDense() throws -> Double? {
        guard let e = request.delivery?.evaluation, !e.skipDense else { return nil }
        coordinator.log("evaluating the dense model ...")
        return try Perplexity.evaluate(model: request.model, tokens: e.tokens, sequenceLength: e.sequenceLength, windows: e.windows,
                                       stateBudget: request.job.memoryBudget).perplexity
    }

    /// The whole run after `prepare()`: the dense evaluation, the pruning (`execute`), then
    /// `deliver`.
    public func run(_ event: (PruneRunEvent) -> Void) throws -> PruneResult {
        guard request.delivery != nil else { throw PruneDeliveryError.noDelivery }
        let dense = try evaluateDense()
        let outcome = try execute(event)
        event(.pruned(outcome))
        return try deliver(outcome, perplexityDense: dense)
    }

    /// After `execute`: evaluates the pruned model, writes the output directory and report.json
    /// (nothing half-written appears under the output's name), records `complete` and removes
    /// the run's checkpoints.
    public func deliver(_ outcome: PruneOutcome, perplexityDense: Double?) throws -> PruneResult {
        guard let d = request.delivery else { throw PruneDeliveryError.noDelivery }
        let r = request
        let pipeline = PrunePipeline(model: r.model, job: r.job, store: r.runDirectory.store)
        let pruned = try pipeline.prunedModel()
        var perplexity: Double?
        if let e = d.evaluation {
            coordinator.log("evaluating the pruned model ...")
            perplexity = try Perplexity.evaluate(model: pruned, tokens: e.tokens, sequenceLength: e.sequenceLength, windows: e.windows,
                                                 stateBudget: r.job.memoryBudget).perplexity
        }

        // Written into a staging directory, then renamed.
        let staging = OutputDirectory.stagingPath(for: d.output)
        try? FileManager.default.removeItem(atPath: staging)
        // The weights' SHA-256 is taken as they are written (SHA256Digest.files of the same
        // files, without reading them back from disk).
        let digest = SHA256Stream()
        do {
            try OutputDirectory.createStaging(staging, for: d.output)
            try HuggingFaceExport.write(model: pruned, to: staging, dtype: d.dtype, weightsDigest: digest)
        } catch {
            try? FileManager.default.removeItem(atPath: staging)
            throw error
        }
        let sha = digest.finish()
        let sparsity = PruneReport.sparsity(outcome.reports)
        var summary = summaryFields(outcome, delivery: d)
        summary["sparsity"] = sparsity
        summary["output_sha256"] = sha
        summary["perplexity_dense"] = perplexityDense.map { $0 as Any } ?? NSNull()
        summary["perplexity"] = perplexity.map { $0 as Any } ?? NSNull()
        summary["peak_rss_bytes"] = ProcessResources.peakResidentBytes ?? 0
        var report = summary
        report["blocks"] = outcome.reports.map(PruneReport.blockJSON)
        if let rate = d.sgemmRate { report["profile"] = ProfileReport.json(outcome.reports, sgemmRate: rate, pruneSeconds: outcome.pruneSeconds) }
        report["seconds"] = Date().timeIntervalSince(d.started)
        do {
            let data = try JSONSerialization.data(withJSONObject: report, options: [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]) + Data("\n".utf8)
            try AtomicFile.write(data, to: (staging as NSString).appendingPathComponent("report.json"))
            try AtomicFile.write(data, to: r.runDirectory.reportPath)
            if r.job.plan.method == .besa {
                try AtomicFile.write(Data(PruneReport.besaHeatmap(outcome.reports, target: r.job.plan.pattern.fraction).utf8),
                                     to: (staging as NSString).appendingPathComponent("besa-sparsity.svg"))
            }
            try OutputDirectory.install(staging: staging, output: d.output, overwrite: d.overwrite, command: d.command, log: coordinator.log)
        } catch {
            try? FileManager.default.removeItem(atPath: staging)
            throw error
        }
        let absoluteOutput = d.output.hasPrefix("/") ? d.output : URL(fileURLWithPath: d.output).standardizedFileURL.path
        try r.runDirectory.events.append(.complete(output: absoluteOutput, outputSHA256: sha))
        r.runDirectory.removeCheckpoints()
        summary["seconds"] = Date().timeIntervalSince(d.started)
        summary["peak_rss_bytes"] = ProcessResources.peakResidentBytes ?? 0
        return PruneResult(outcome: outcome, outputSHA256: sha, sparsity: sparsity, perplexityDense: perplexityDense,
                           perplexity: perplexity, summary: summary, report: report)
    }

    /// report.json's description of the run: the caller's fields, then what the request says
    /// (model, method and its settings, allocation, layers, plan, coordination) and the time the
    /// pruning took.
    func summaryFields(_ outcome: PruneOutcome, delivery d: PruneDelivery) -> [String: Any] {
        let r = request
        let plan = r.job.plan
        var s = d.fields
        s["tool_version"] = ToolVersion.string
        s["command"] = d.command
        s["model"] = r.model.path
        s["method"] = plan.method.rawValue
        s["pattern"] = PruneReport.patternJSON(plan.pattern)
        s["target_sparsity"] = plan.pattern.fraction
        let manifest: RunManifest
        switch r.start { case .new(let m), .resume(let m): manifest = m }
        // The caller's record of the allocation it applied, or the manifest's.
        s["allocation"] = d.fields["allocation"] ?? manifest.allocation?.json ?? ["method": AllocationMethod.uniform.rawValue]
        s["layers"] = r.job.layers.map { "\($0.lowerBound)-\($0.upperBound)" } ?? "all"
        s["plan"] = zip(partitions, r.workers).map { ["first": $0.lowerBound, "last": $0.upperBound - 1, "worker": $1.name] as [String: Any] }
        s["coordination"] = r.coordination.rawValue
        s["prune_seconds"] = outcome.pruneSeconds
        s["output"] = d.output
        if r.coordination == .admm {
            var admm: [String: Any] = [
                "rho": (r.rho ?? .infinity).isInfinite ? "inf" as Any : r.rho! as Any, "tolerance": r.tolerance ?? 0,
                "min_improvement": r.minImprovement ?? ADMMOptions.defaultMinImprovement, "keep_round": (r.keepRound ?? .best).rawValue,
                "rounds": outcome.rounds.map { ["round": $0.round, "residuals": $0.residuals, "output_error": $0.outputError,
                                                "model_error": $0.modelError.map { $0 as Any } ?? NSNull(),
                                                "calibration_loss": $0.calibrationLoss.map { $0 as Any } ?? NSNull(),
                                                "objective": $0.objective] as [String: Any] }]
            if let o = outcome.admm {
                admm["kept"] = o.kept
                admm["kept_reason"] = o.keptReason
                admm["stopped"] = o.stop.rawValue
            }
            s["admm"] = admm
        }
        // SparseGPT's settings where its solver runs: sparsegpt, sparsellm's attention, BESA's reconstruction.
        if plan.method == .sparsegpt || plan.method == .sparsellm || (plan.besa?.reconstruct ?? false) {
            var settings: [String: Any] = ["blocksize": plan.sparseGPT.blockSize, "percdamp": plan.sparseGPT.percentDamp]
            if let a = plan.sparseGPT.admm {
                settings["weight_update"] = ["method": "admm", "iterations": a.iterations, "rho": a.rho, "rho_growth": a.rhoGrowth, "rho_step": a.rhoStep]
            }
            s["sparsegpt"] = settings
        }
        if let o = plan.sparseLLM {
            s["sparsellm"] = ["alpha": o.alpha, "beta": o.beta, "gamma": o.gamma, "iterations": o.iterations,
                              "targets": plan.targets.rawValue, "ridge": o.ridge]
        }
        if let besa = plan.besa { s["besa"] = PruneReport.besaSettings(besa, targets: plan.targets) }
        if let e = d.evaluation {
            s["evaluation"] = ["file": e.source, "seqlen": e.sequenceLength, "windows": e.windows.map { $0 as Any } ?? "all"]
        }
        return s
    }
}
