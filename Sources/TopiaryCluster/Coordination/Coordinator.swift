import Foundation
import TopiaryModel
import TopiaryPrune
import TopiaryTensor

/// Something that prunes a range of blocks: this process (`InProcessWorker`) or a worker
/// process over TCP (`RemoteWorker`). Both run `RangePruner`, so results are identical.
public protocol WorkerLink: AnyObject {
    var name: String { get }
    /// Hands the worker `range` and the activations at its start; returns at once for a remote
    /// worker, which then computes while the coordinator starts the others.
    func start(_ range: Range<Int>, job: PruneJob, from boundary: Boundary) throws
    /// Collects the started range's blocks (each reported as it arrives: in order, each once) and
    /// the boundary after the last. The coordinator checks what a remote link hands over
    /// (`WorkerResultError`).
    func finish(onBlock: (_ index: Int, _ pruned: DecoderBlock?, _ report: BlockReport?) throws -> Void) throws -> Boundary
    /// Whether the link can be lost (a process elsewhere); an in-process worker cannot.
    var isRemote: Bool { get }
    /// Gives the link up after it failed: closes its connection; it is never used again.
    func abandon()
}

extension WorkerLink {
    public var isRemote: Bool { false }
    public func abandon() {}

    /// Runs `range` from `boundary`, reporting each block as it finishes; returns the boundary after it.
    public func run(_ range: Range<Int>, job: PruneJob, from boundary: Boundary,
                    onBlock: (_ index: Int, _ pruned: DecoderBlock?, _ report: BlockReport?) throws -> Void) throws -> Boundary {
        try start(range, job: job, from: boundary)
        return try finish(onBlock: onBlock)
    }
}

/// Runs ranges in this process (when `finish` is called).
public final class InProcessWorker: WorkerLink {
    public let model: LanguageModel
    public let name: String
    private var pending: (Range<Int>, PruneJob, Boundary)?

    public init(model: LanguageModel, name: String = "in-process") {
        self.model = model
        self.name = name
    }

    public func start(_ range: Range<Int>, job: PruneJob, from boundary: Boundary) throws {
        pending = (range, job, boundary)
    }

    public func finish(onBlock: (Int, DecoderBlock?, BlockReport?) throws -> Void) throws -> Boundary {
        guard let (range, job, boundary) = pending else { preconditionFailure("finish without start") }
        pending = nil
        let delay = DebugHooks.blockDelay
        return try RangePruner(model: model, job: job).run(range, from: boundary) { index, pruned, report in
            try onBlock(index, pruned, report)
            if delay > 0 { Thread.sleep(forTimeInterval: delay) }
        }
    }
}

/// Testing aids, read from the environment once.
public enum DebugHooks {
    /// TOPIARY_DEBUG_BLOCK_DELAY: seconds every worker (in-process or remote) waits after each
    /// block, so that tests can kill a process in the middle of a run on a small model.
    public static let blockDelay: Double = ProcessInfo.processInfo.environment["TOPIARY_DEBUG_BLOCK_DELAY"].flatMap(Double.init) ?? 0
}

/// How partitions are coordinated.
public enum Coordination: String, Sendable, CaseIterable {
    /// Worker k starts from worker k−1's pruned boundary activations: the single-process result, bit for bit.
    case sequential
    /// All workers prune in parallel each round from boundary auxiliaries that the coordinator
    /// updates between rounds (ADMM-style message passing between neighbouring partitions).
    case admm
}

/// Settings of ADMM coordination.
public struct ADMMOptions: Sendable {
    /// The most rounds.
    public var rounds: Int
    /// Weight of agreement with the left neighbour's pruned output against the dense target;
    /// infinity (the default) passes the neighbour's output on unchanged.
    public var rho: Double
    /// Stop when every boundary's relative residual is at most this (converged).
    public var tolerance: Double
    /// Stop when the sum of the boundary residuals fell by less than this fraction of the previous
    /// round's (the residual stopped improving); 0 never stops for that.
    public var minImprovement: Double
    /// Which round's weights the run ends with.
    public var keep: ADMMKeep

    public init(rounds: Int, rho: Double = .infinity, tolerance: Double = 0, minImprovement: Double = ADMMOptions.defaultMinImprovement,
                keep: ADMMKeep = .best) {
        self.rounds = rounds
        self.rho = rho
        self.tolerance = tolerance
        self.minImprovement = minImprovement
        self.keep = keep
    }

    public static let defaultMinImprovement = 0.05

    /// Why the rounds recorded so far end the run, or nil when another round is to run. Rules, in
    /// order: every residual at most `tolerance` (converged: with ρ = ∞ another round would prune
    /// every partition from the inputs it already had, and give the same weights); the round limit;
    /// stalled: the sum of the residuals fell by less than `minImprovement` of the previous
    /// round's, and the round's model was no better on the calibration windows (`score`) than the
    /// best of the rounds before. So rounds go on while the boundaries come closer or the model
    /// gets better.
    public func stop(after rounds: [ADMMRound]) -> ADMMStop? {
        guard let last = rounds.last else { return nil }
        if last.residuals.allSatisfy({ $0 <= tolerance }) { return .converged }
        if last.round >= self.rounds { return .roundLimit }
        if rounds.count >= 2 && minImprovement > 0 {
            let earlier = rounds.dropLast()
            let before = earlier.last!.residuals.reduce(0, +), now = last.residuals.reduce(0, +)
            let best = earlier.map(\.score).min()!
            if now > (1 - minImprovement) * before && !(last.score < best) { return .stalled }
        }
        return nil
    }

    /// The round whose weights the run keeps among `rounds` (nil when none): with `.best` the one
    /// with the smallest `score` (the latest of equal ones), with `.last` the last.
    public func kept(among rounds: [ADMMRound]) -> ADMMRound? {
        switch keep {
        case .last: return rounds.last
        case .best: return rounds.reduce(nil as ADMMRound?) { best, r in best.map { r.score <= $0.score ? r : $0 } ?? r }
        }
    }
}

/// Which ADMM round's weights a run keeps.
public enum ADMMKeep: String, Sendable, CaseIterable {
    /// The round whose model has the smallest language-model loss on the calibration windows (`ADMMRound.score`).
    case best
    /// The last round run (Topiary before 2026-12-02).
    case last
}

/// Why the ADMM rounds ended.
public enum ADMMStop: String, Sendable, Codable {
    /// Every boundary residual at most the tolerance.
    case converged
    /// The sum of the boundary residuals fell by less than --min-improvement of the round before's,
    /// and the round's model was no better on the calibration windows than the best before.
    case stalled = "residual_stalled"
    /// --rounds rounds were run.
    case roundLimit = "round_limit"
}

/// One ADMM round: the relative residual ‖h_k − o_{k−1}‖²/‖o_{k−1}‖² of each boundary k ≥ 1
/// (the input partition k used against what its left neighbour produced this round), the relative
/// error of the last partition's output against the dense model's (from the input it was given),
/// and, of the model this round's weights make (what they would give if the run ended with them):
/// `modelError`, the relative error of its last hidden state against the dense model's on the
/// calibration windows, and `calibrationLoss`, its language-model loss (mean cross-entropy, as
/// `Perplexity` computes it) on the calibration windows.
public struct ADMMRound: Sendable, Codable {
    public var round: Int
    public var residuals: [Double]
    public var outputError: Double
    public var modelError: Double?
    public var calibrationLoss: Double?

    public init(round: Int, residuals: [Double], outputError: Double, modelError: Double? = nil, calibrationLoss: Double? = nil) {
        self.round = round
        self.residuals = residuals
        self.outputError = outputError
        self.modelError = modelError
        self.calibrationLoss = calibrationLoss
    }

    public var objective: Double { residuals.reduce(0, +) + outputError }
    /// What picks the kept round: the model's loss on the calibration windows; for a round recorded
    /// without one (an earlier Topiary's log), its hidden-state error, or else the objective.
    public var score: Double { calibrationLoss ?? modelError ?? objective }
}

/// How ADMM coordination ended: each block's report (of the kept round), every round, the round
/// kept and why the rounds stopped.
public struct ADMMOutcome {
    public var reports: [BlockReport]
    public var rounds: [ADMMRound]
    public var kept: Int
    public var stop: ADMMStop
    /// Why the kept round was kept, in words.
    public var keptReason: String
}

/// A remote worker's result that breaks what `WorkerLink` promises: each block of the range once
/// and in order, with the tensors its family defines (finite) and its report, then the boundary
/// after the range's last block, of the job's shape, that those blocks give. The worker is treated
/// as lost and the rest of its range is redone elsewhere; nothing refused is recorded.
public struct WorkerResultError: Error, CustomStringConvertible {
    public let worker: String
    public let detail: String
    public var description: String { "worker \(worker): \(detail)" }
}

/// The first tokens of window 0 of a remote worker's range, carried through each block as its
/// result arrives (the pruned weights in hand; the dense block for blocks only run and for the
/// targets): what the boundary the worker returns must hold in those rows of window 0. Every block
/// is causal and token-wise outside attention (routing included), so a prefix of a window gives
/// the first rows of the whole window's output; the probe costs `tokens` tokens' forward pass per
/// block (not a whole window's, which on a coordinator sharing a node with a worker took CPU from
/// it), and reading the dense block where the range carries targets or runs blocks it does not
/// prune.
struct BoundaryProbe {
    /// The prefix the probe carries (or the whole window when shorter).
    static let tokens = 64
    var inputs: Matrix
    var targets: Matrix?
    let sequenceLength: Int
    let rope: Kernels.RopeTable
    /// Window 0 of the range's start, whole: when the prefix disagrees, the whole window is run
    /// before the boundary is refused (`Coordinator.wholeWindow`), since the prefix's GEMMs
    /// round differently from the worker's whole-window ones and, in a mixture of experts, a token
    /// whose routing is a near tie may take other experts.
    let start: Matrix
    let startTargets: Matrix?

    init(_ start: Boundary, config: ModelConfig, sequenceLength: Int) throws {
        let n = min(Self.tokens, sequenceLength)
        self.start = try start.inputs.get(0)
        startTargets = try start.targets?.get(0)
        inputs = self.start.rows(0..<n)
        targets = startTargets?.rows(0..<n)
        self.sequenceLength = n
        rope = config.ropeTable(positions: n)
    }

    mutating func advance(through pruned: DecoderBlock?, block index: Int, model: LanguageModel) throws {
        let dense = pruned == nil || targets != nil ? try model.loadBlock(index) : nil
        inputs = (pruned ?? dense!).forward(inputs, sequenceLength: sequenceLength, rope: rope)
        if let t = targets { targets = dense!.forward(t, sequenceLength: sequenceLength, rope: rope) }
    }
}

/// The coordinator: plans contiguous block ranges over the workers and runs them. The local run is
/// this with one in-process worker.
///
/// Faults: a remote worker that fails (its connection drops, or it sends nothing, not even a
/// heartbeat, for the connection's timeout) or sends a result that breaks the link's promises
/// (`WorkerResultError`) is abandoned; the blocks it finished stay, the activations after them are
/// recomputed here by replaying those blocks, and the rest of its range goes to another live, idle
/// worker (spares first), or to this process when none is left. A block is recorded once: a result
/// for any block but the next one of the range is refused before it is written. With a run directory
/// every block is checkpointed as it arrives, and a resumed run replays finished blocks instead of
/// pruning them again; the result is the same bytes either way.
public final class Coordinator {
    public let model: LanguageModel
    public let job: PruneJob
    public let store: BlockFileStore
    public let workers: [WorkerLink]
    /// Checkpoints and events; nil runs without (blocks still go to `store`).
    public let runDirectory: RunDirectory?
    /// Blocks finished by an earlier attempt of the same run (resume), with their reports.
    public var finished: [Int: FinishedBlock] = [:]
    /// The partitions to use instead of planning them (a resumed ADMM run keeps its plan).
    public var fixedPlan: [Range<Int>]?
    /// Continue an ADMM run from its last checkpointed round (in `runDirectory`).
    public var resumesADMM = false
    /// ADMM's dense pass: the calibration windows go through the partitions in this many
    /// micro-batches, partition k working on micro-batch m while k + 1 works on m − 1 (nil: two
    /// a partition, at most one a window). Each window's forward is its own, so the dense
    /// boundaries have the same bits for any number.
    public var denseMicroBatches: Int?
    /// Progress messages (worker lost, reassignment, replay).
    public var log: (String) -> Void = { _ in }

    private var dead = Set<ObjectIdentifier>()
    /// Writes the sequential run's blocks while the next one computes. Everything that reads the
    /// store or appends another event waits for it first (`event`, `replay`, the end of `run`).
    private let writer = CheckpointWriter()

    public init(model: LanguageModel, job: PruneJob, store: BlockFileStore, workers: [WorkerLink], runDirectory: RunDirectory? = nil) {
        self.model = model
        self.job = job
        self.store = store
        self.workers = workers
        self.runDirectory = runDirectory
    }

    /// Modelled FLOPs of each block for planning: a block the job prunes costs its dense and pruned
    /// forward passes (2 x linear MACs x calibration tokens each) plus, per linear, the statistics,
    /// the method's solve and the error report (`ReplicaWork.cost`); a block only run (outside
    /// `--layers`) costs one forward pass.
    public func blockCosts() -> [Double] {
        let c = model.config
        let tokens = job.samples * job.sequenceLength
        let forward = 2 * Double(c.family.linearMACsPerToken(c)) * Double(tokens)
        return (0..<c.layerCount).map { i in
            guard job.prunes(i) else { return forward }
            let linears = Set(c.family.linears(c, block: i))
            let solve = c.family.blockTensors(c, block: i).reduce(0.0) { sum, spec in
                guard spec.name.hasSuffix(".weight"), linears.contains(String(spec.name.dropLast(".weight".count))) else { return sum }
                return sum + ReplicaWork.cost(rows: spec.rows, cols: spec.cols, tokens: tokens, plan: job.plan, statistics: true)
            }
            return 2 * forward + solve
        }
    }

    /// How many machines each worker link is: a stage of R replicas counts as R.
    public var capacities: [Double] { workers.map { Double(($0 as? ReplicaGroup)?.members.count ?? 1) } }

    /// Ranges over the workers by cost: a stage of R replicas counts as R machines.
    public func plan() -> [Range<Int>] {
        fixedPlan ?? PartitionPlanner.plan(costs: blockCosts(), capacities: capacities)
    }

    /// Appends an event after the block checkpoints in flight (so events.jsonl keeps their order).
    func event(_ event: RunEvent) throws {
        try writer.wait()
        try runDirectory?.events.append(event)
    }

    /// Writes a block the moment it arrives: to the run directory (checksummed, with an event) or
    /// the store. A sequential run's block is written on the writer's thread while the next block
    /// computes; an ADMM round's (`round`) at once, since the round reads its blocks back.
    func record(_ block: DecoderBlock, report: BlockReport?, worker: String, round: Int? = nil) throws {
        let (runDirectory, store) = (self.runDirectory, self.store)
        let write = {
            if let runDirectory {
                try runDirectory.recordBlock(block, report: report, worker: worker, round: round)
            } else {
                try store.write(block)
            }
        }
        if round == nil {
            try writer.submit(write)
        } else {
            try writer.wait()
            try write()
        }
    }

    /// Recomputes the activations after `range` from those before it, through the blocks as they
    /// were pruned (read back from the store).
    func replay(_ range: Range<Int>, from boundary: Boundary, job: PruneJob? = nil) throws -> Boundary {
        guard !range.isEmpty else { return boundary }
        try writer.wait()
        return try RangePruner(model: model, job: job ?? self.job).replay(range, from: boundary) { i in
            try model.overlaid(with: try store.sources([i])).loadBlock(i)
        }
    }

    func isLive(_ link: WorkerLink) -> Bool { !dead.contains(ObjectIdentifier(link)) }

    /// A worker in this process. Each range run here gets its own, so that one never holds two
    /// ranges (ADMM starts every partition before it collects any).
    func inProcessWorker() -> WorkerLink { InProcessWorker(model: model, name: "coordinator (in-process)") }

    /// A live link other than `lost` with no work in progress (not in `busy`), the spares (links
    /// beyond the plan's partitions) first; or a new in-process worker.
    func replacement(for lost: WorkerLink, busy: Set<ObjectIdentifier>) -> WorkerLink {
        // A stage of replicas that lost one: the others carry on (the same bytes at any count).
        if let group = lost as? ReplicaGroup, let rest = group.survivors() { return rest }
        let planned = plan().count
        let candidates = workers.dropFirst(planned) + workers.prefix(planned)
        return candidates.first { $0 !== lost && isLive($0) && !busy.contains(ObjectIdentifier($0)) } ?? inProcessWorker()
    }

    /// Checks a block result before it is recorded: the next block of `range` (`expected`), with
    /// weights and a report exactly when the job prunes it, and the weights its family defines, finite.
    func checkBlock(_ index: Int, _ pruned: DecoderBlock?, _ report: BlockReport?, expected: Int, range: Range<Int>,
                    job: PruneJob, worker: String) throws {
        func refuse(_ detail: String) -> WorkerResultError { WorkerResultError(worker: worker, detail: "block \(index): " + detail) }
        guard index == expected, range.contains(index) else {
            let wanted = range.contains(expected) ? "block \(expected)" : "none (all of blocks \(range.lowerBound)-\(range.upperBound - 1) arrived)"
            throw WorkerResultError(worker: worker, detail: "sent block \(index), expected \(wanted)")
        }
        let prunes = job.prunes(index)
        guard (pruned != nil) == prunes, (report != nil) == prunes else {
            throw refuse(prunes ? "is pruned: expected its weights and report, found \(pruned == nil ? "no weights" : "weights") and \(report == nil ? "no report" : "a report")"
                                : "is only run: expected no weights and no report")
        }
        guard let pruned, let report else { return }
        guard report.block == index else { throw refuse("the report is block \(report.block)'s") }
        guard pruned.index == index else { throw refuse("the weights are block \(pruned.index)'s") }
        let specs = model.config.family.blockTensors(model.config, block: index)
        if let extra = pruned.tensors.keys.sorted().first(where: { name in !specs.contains { $0.name == name } }) {
            throw refuse("'\(extra)' is not one of its tensors")
        }
        for spec in specs {
            guard let m = pruned.tensors[spec.name] else { throw refuse("tensor '\(spec.name)' is missing") }
            guard m.rows == spec.rows, m.cols == spec.cols else {
                throw refuse("tensor '\(spec.name)' is \(m.rows)x\(m.cols), expected \(spec.rows)x\(spec.cols)")
            }
            guard m.allFinite else { throw refuse("tensor '\(spec.name)' is not finite") }
        }
    }

    /// Checks the boundary a remote worker returned after `range`: the job's windows and shape,
    /// targets exactly when it was sent targets, window 0 finite and its first tokens what `probe`
    /// (those tokens carried here through the range's blocks as they arrived) gives. So a stale
    /// boundary, a non-finite one, or one its blocks do not give is refused.
    func checkBoundary(_ b: Boundary, after range: Range<Int>, probe: BoundaryProbe, job: PruneJob, worker: String) throws {
        func refuse(_ detail: String) -> WorkerResultError {
            WorkerResultError(worker: worker, detail: "the boundary after block \(range.upperBound - 1) " + detail)
        }
        guard (b.targets != nil) == (probe.targets != nil) else {
            throw refuse(probe.targets == nil ? "has targets; none were sent" : "has no targets; they were sent")
        }
        let hidden = model.config.hiddenSize
        for (what, s) in [("inputs", b.inputs)] + (b.targets.map { [("targets", $0)] } ?? []) {
            guard s.count == job.samples, s.rows == job.sequenceLength, s.cols == hidden else {
                throw refuse("has \(what) of \(s.count) windows of \(s.rows)x\(s.cols), expected \(job.samples) of \(job.sequenceLength)x\(hidden)")
            }
        }
        let n = probe.sequenceLength
        let first = try b.inputs.get(0)
        let firstTargets = try b.targets?.get(0)
        guard first.allFinite else { throw refuse("is not finite (window 0)") }
        if let firstTargets, !firstTargets.allFinite { throw refuse("has targets that are not finite (window 0)") }
        let prefixAgrees = Self.agrees(first.rows(0..<n), probe.inputs)
        var targetsAgree = true
        if let firstTargets, let r = probe.targets { targetsAgree = Self.agrees(firstTargets.rows(0..<n), r) }
        if prefixAgrees && targetsAgree { return }
        // The whole window before refusing (see BoundaryProbe.start).
        let whole = try wholeWindow(after: range, probe: probe, job: job)
        guard Self.agrees(first, whole.inputs) else {
            throw refuse("is not what its blocks give (window 0 differs from the same window run here)")
        }
        if let firstTargets, let t = whole.targets, !Self.agrees(firstTargets, t) {
            throw refuse("has targets that the dense blocks do not give (window 0 differs from the same window run here)")
        }
        log("the boundary after block \(range.upperBound - 1) from \(worker): its first \(n) tokens differed from the probe's, the whole of window 0 agrees (rounding, or a near tie in routing)")
    }

    /// Window 0 of the range's start run whole through its blocks as recorded (`replay`: the pruned
    /// ones from the store) and, with targets, through the dense blocks.
    func wholeWindow(after range: Range<Int>, probe: BoundaryProbe, job: PruneJob) throws -> (inputs: Matrix, targets: Matrix?) {
        var one = job
        one.calibration = [[]]  // one window (its activations are given)
        func oneWindow(_ m: Matrix) throws -> ActivationStore {
            let s = RangePruner.store(job: one, config: model.config)
            try s.set(0, m)
            return s
        }
        let end = try replay(range, from: Boundary(inputs: try oneWindow(probe.start), targets: try probe.startTargets.map(oneWindow)), job: one)
        return (try end.inputs.get(0), try end.targets?.get(0))
    }

    /// Equal up to rounding (another machine's BLAS may round differently): ‖a − b‖² ≤ 1e-8·‖b‖²; false for NaN.
    static func agrees(_ a: Matrix, _ b: Matrix) -> Bool {
        guard a.rows == b.rows, a.cols == b.cols else { return false }
        var difference = 0.0, norm = 0.0
        a.withUnsafeBufferPointer { pa in
            b.withUnsafeBufferPointer { pb in
                for i in pa.indices {
                    let d = Double(pa[i]) - Double(pb[i])
                    difference += d * d
                    norm += Double(pb[i]) * Double(pb[i])
                }
            }
        }
        return difference <= 1e-8 * norm
    }

    /// Gives up on a link that failed: it is never used again, and the loss is recorded.
    func markLost(_ link: WorkerLink, _ error: Error, blocks first: Int, _ last: Int, finishedThrough: Int? = nil, context: EventContext) throws {
        dead.insert(ObjectIdentifier(link))
        link.abandon()
        try event(.workerLost(worker: link.name, error: "\(error)", first: first, last: last, finishedThrough: finishedThrough, context: context))
    }

    /// Runs `range` from `start` on `link` (with `job`, by default the run's); when the link is
    /// lost or its result is refused, continues the rest of the range on a replacement from the
    /// last block it finished.
    /// `started`: the range was already handed to `link` (ADMM starts every partition before
    /// collecting any). `context` goes into the events (an ADMM round, the dense pass).
    func runWithFailover(_ preferred: WorkerLink, _ range: Range<Int>, job: PruneJob? = nil, from start: Boundary,
                         started: Bool = false, busy: Set<ObjectIdentifier> = [], round: Int? = nil,
                         phase: String? = nil,
                         onBlock: (_ index: Int, _ pruned: DecoderBlock?, _ report: BlockReport?) throws -> Void) throws -> Boundary {
        let job = job ?? self.job
        let context = EventContext(round: round, phase: phase)
        var link = preferred
        var isStarted = started
        if !isLive(link) {
            let to = replacement(for: link, busy: busy)
            try event(.reassigned(first: range.lowerBound, last: range.upperBound - 1, from: link.name, to: to.name, context: context))
            log("blocks \(range.lowerBound)-\(range.upperBound - 1): \(link.name) was lost earlier; running them on \(to.name)")
            link = to
            // What was started on the lost link is started again on its replacement.
            isStarted = false
        }
        var from = range.lowerBound
        var boundary = start
        while true {
            var next = from
            do {
                let attempt = from..<range.upperBound
                if !isStarted { try link.start(attempt, job: job, from: boundary) }
                isStarted = false
                let name = link.name
                var probe = link.isRemote && job.samples > 0 ? try BoundaryProbe(boundary, config: model.config, sequenceLength: job.sequenceLength) : nil
                var lastArrival = Date()
                let end = try link.finish { index, pruned, report in
                    try checkBlock(index, pruned, report, expected: next, range: attempt, job: job, worker: name)
                    var report = report
                    if var profile = report?.profile {
                        // Waiting: the time since the previous block arrived that the block's own phases do not account for
                        // (a remote worker's transfer and queueing; in process, the driver's overhead).
                        let measured = profile.phases.values.reduce(0) { $0 + $1.seconds }
                        profile.add(.waiting, seconds: max(0, Date().timeIntervalSince(lastArrival) - measured))
                        report?.profile = profile
                    }
                    let checkpointStart = Date()
                    if let pruned { try record(pruned, report: report, worker: name, round: round) }
                    report?.profile?.add(.checkpoint, seconds: Date().timeIntervalSince(checkpointStart))
                    try onBlock(index, pruned, report)
                    lastArrival = Date()
                    next = index + 1
                    try probe?.advance(through: pruned, block: index, model: model)
                }
                guard next == range.upperBound else {
                    throw WorkerResultError(worker: name, detail: "returned the boundary after \(next == from ? "none" : "block \(next - 1)") of blocks \(from)-\(range.upperBound - 1)")
                }
                if let probe { try checkBoundary(end, after: attempt, probe: probe, job: job, worker: name) }
                return end
            } catch let error where link.isRemote && (error is WireError || error is WorkerResultError) {
                isStarted = false
                try markLost(link, error, blocks: from, range.upperBound - 1, finishedThrough: next - 1, context: context)
                log("worker \(link.name) lost (\(error)); it finished blocks \(from)..<\(next) of \(from)..<\(range.upperBound)")
                boundary = try replay(from..<next, from: boundary, job: job)
                from = next
                if from == range.upperBound { return boundary }
                let to = replacement(for: link, busy: busy)
                try event(.reassigned(first: from, last: range.upperBound - 1, from: link.name, to: to.name, context: context))
                log("blocks \(from)-\(range.upperBound - 1) reassigned to \(to.name)")
                link = to
            }
        }
    }

    /// Runs `range` from `start`: blocks that need no work are replayed here, the others go to
    /// `link` (with failover) in maximal runs.
    func runSegments(_ link: WorkerLink, _ range: Range<Int>, from start: Boundary, needsWork: (Int) -> Bool,
                     started: Bool = false, busy: Set<ObjectIdentifier> = [], round: Int? = nil, reports: [Int: BlockReport],
                     onBlock: (_ index: Int, _ pruned: DecoderBlock?, _ report: BlockReport?) throws -> Void) throws -> Boundary {
        if started || range.allSatisfy(needsWork) {
            return try runWithFailover(link, range, from: start, started: started, busy: busy, round: round, onBlock: onBlock)
        }
        var boundary = start
        var i = range.lowerBound
        while i < range.upperBound {
            var j = i
            if !needsWork(i) {
                while j < range.upperBound && !needsWork(j) { j += 1 }
                boundary = try replay(i..<j, from: boundary)
                if (i..<j).contains(where: { job.prunes($0) }) {
                    try event(.replayed(first: i, last: j - 1, round: round))
                }
                for b in i..<j { try onBlock(b, nil, reports[b]) }
                i = j
                continue
            }
            while j < range.upperBound && needsWork(j) { j += 1 }
            boundary = try runWithFailover(link, i..<j, from: boundary, busy: busy, round: round, onBlock: onBlock)
            i = j
        }
        return boundary
    }

    /// Whether block `i` still has to be pruned (not finished by an earlier run).
    func needsWork(_ i: Int) -> Bool { job.prunes(i) && finished[i] == nil }

    /// Runs the job over the workers in sequence; pruned blocks go to the store as they arrive.
    /// Blocks finished by an earlier run (`finished`) are replayed, not pruned again.
    public func run(progress: (_ block: Int, _ report: BlockReport?) -> Void) throws -> [BlockReport] {
        // A run that fails still finishes the checkpoint in flight before it reports.
        defer { try? writer.wait() }
        let pipeline = PrunePipeline(model: model, job: job, store: store)
        try pipeline.validate()
        let layerCount = model.config.layerCount
        var reports: [Int: BlockReport] = [:]
        for (i, f) in finished { if let r = f.report { reports[i] = r } }
        let firstTodo = (0..<layerCount).first(where: needsWork) ?? layerCount
        var position = 0
        var boundary: Boundary
        if firstTodo > 0, let (b, saved) = try runDirectory?.loadBoundary(atOrBefore: firstTodo, make: { RangePruner.store(job: job, config: model.config) }) {
            position = b
            boundary = saved
            log("resuming from the boundary checkpoint before block \(b)")
        } else {
            boundary = try pipeline.embed()
        }
        for i in 0..<position { progress(i, reports[i]) }
        // Blocks after the last one to prune are not run: nothing needs their activations
        // (an evaluation runs the written model on its own windows).
        let end = ((0..<layerCount).last(where: needsWork) ?? -1) + 1
        let partitions = plan()
        for (k, whole) in partitions.enumerated() where whole.upperBound > position && whole.lowerBound < end {
            let part = whole.lowerBound..<min(whole.upperBound, end)
            let first = max(part.lowerBound, position)
            // A worker's range starts here: keep the activations, so that a resumed run need not
            // replay everything before it.
            if first > 0 && first == part.lowerBound && needsWork(first), let runDirectory {
                try writer.wait()
                try runDirectory.saveBoundary(boundary, at: first)
            }
            boundary = try runSegments(k < workers.count ? workers[k] : inProcessWorker(), first..<part.upperBound, from: boundary, needsWork: needsWork,
                                       reports: reports) { index, pruned, report in
                if let report { reports[index] = report }
                progress(index, report)
            }
        }
        try writer.wait()
        for i in max(end, position)..<layerCount { progress(i, reports[i]) }
        return reports.keys.sorted().map { reports[$0]! }
    }

    /// The link for partition k in a step where the links in `busy` already hold work: the
    /// partition's own worker, or a replacement when that one is lost or busy (a link holding a
    /// partition of this step is not given a second).
    func partitionLink(_ k: Int, busy: Set<ObjectIdentifier>) -> WorkerLink {
        let link = k < workers.count ? workers[k] : inProcessWorker()
        return !isLive(link) || busy.contains(ObjectIdentifier(link)) ? replacement(for: link, busy: busy) : link
    }

    /// Starts `range` on `link` and marks the link busy; a remote link that fails to start is
    /// marked lost and false returned (the work then fails over when it is collected). An
    /// in-process link computes when collected, so starting it never holds up the others.
    func startWork(_ link: WorkerLink, _ range: Range<Int>, job: PruneJob, from: Boundary, busy: inout Set<ObjectIdentifier>,
                   context: EventContext) throws -> Bool {
        do {
            try link.start(range, job: job, from: from)
            busy.insert(ObjectIdentifier(link))
            return true
        } catch let error as WireError where link.isRemote {
            try markLost(link, error, blocks: range.lowerBound, range.upperBound - 1, context: context)
            return false
        }
    }

    /// ADMM's dense pass, pipelined: the windows are cut into micro-batches (`denseMicroBatches`),
    /// and at step t partition k runs micro-batch t − k, so that every partition works at once
    /// after the first K − 1 steps (K partitions, M micro-batches: K + M − 1 steps of a
    /// micro-batch's time through one partition, against K·M one after another). Remote links are
    /// all started before any is collected; a lost link's micro-batch goes to a replacement as in
    /// the rounds. Returns the dense boundaries after each partition, d_1 ... d_K.
    func densePass(_ partitions: [Range<Int>], from inputs: ActivationStore) throws -> [ActivationStore] {
        let K = partitions.count, n = job.samples
        let M = max(1, min(n, denseMicroBatches ?? 2 * K))
        let batches = (0..<M).map { m in m * n / M..<(m + 1) * n / M }
        var denseJob = job
        denseJob.denseOnly = true
        func batchJob(_ m: Int) -> PruneJob {
            var j = denseJob
            j.calibration = Array(job.calibration[batches[m]])
            return j
        }
        // outputs[k][m]: micro-batch m after partition k.
        var outputs = [[ActivationStore?]](repeating: Array(repeating: nil, count: M), count: K)
        for t in 0..<(K + M - 1) {
            var begun: [(k: Int, m: Int, link: WorkerLink, started: Bool, from: Boundary)] = []
            var busy = Set<ObjectIdentifier>()
            for k in 0..<K {
                let m = t - k
                guard (0..<M).contains(m) else { continue }
                let from: ActivationStore
                if k > 0 {
                    from = outputs[k - 1][m]!
                } else if M == 1 {
                    from = inputs
                } else {
                    from = RangePruner.store(job: batchJob(m), config: model.config)
                    for (i, s) in batches[m].enumerated() { try from.set(i, try inputs.get(s)) }
                }
                let link = partitionLink(k, busy: busy)
                let started = try startWork(link, partitions[k], job: batchJob(m), from: Boundary(inputs: from, targets: nil), busy: &busy,
                                        context: EventContext(phase: "dense pass"))
                begun.append((k, m, link, started, Boundary(inputs: from, targets: nil)))
            }
            for b in begun {
                busy.remove(ObjectIdentifier(b.link))
                outputs[b.k][b.m] = try runWithFailover(b.link, partitions[b.k], job: batchJob(b.m), from: b.from, started: b.started,
                                                        busy: busy, phase: "dense pass") { _, _, _ in }.inputs
            }
        }
        // Each partition's micro-batches put together in window order.
        return try (0..<K).map { k in
            if M == 1 { return outputs[k][0]! }
            let whole = RangePruner.store(job: denseJob, config: model.config)
            for (m, range) in batches.enumerated() {
                let part = outputs[k][m]!
                for (i, s) in range.enumerated() { try whole.set(s, try part.get(i)) }
            }
            return whole
        }
    }

    /// ADMM coordination. A dense pass through the workers gives every boundary its dense
    /// activations d_k. Each round, every worker prunes its range in parallel from its boundary
    /// input h_k (h_0: the embeddings); then for each boundary k ≥ 1, with o the left neighbour's
    /// pruned output and u a scaled dual, h_k ← (d_k + ρ(o − u))/(1 + ρ) and u ← u + h_k − o
    /// (with ρ = ∞: h_k ← o). After each round the model its weights make is run here over the
    /// calibration windows (`ADMMRound.modelError`, `ADMMRound.calibrationLoss`). The rounds stop by
    /// `ADMMOptions.stop(after:)` (converged, stalled residual, or the round limit); the weights
    /// are those of the kept round (`ADMMOptions.kept(among:)`: by default the smallest loss on
    /// the calibration windows), whose blocks are kept beside the store (`BlockFileStore.keep`) and put back at the
    /// end. With ρ = ∞ and as many rounds as partitions, every partition's input is the pruned
    /// chain's, so the last round's weights equal sequential coordination's.
    public func runADMM(options: ADMMOptions, progress: (_ block: Int, _ report: BlockReport?) -> Void,
                        round roundDone: (ADMMRound) -> Void = { _ in }) throws -> ADMMOutcome {
        let pipeline = PrunePipeline(model: model, job: job, store: store)
        try pipeline.validate()
        let partitions = plan()
        let K = partitions.count
        let make = { RangePruner.store(job: self.job, config: self.model.config) }
        let start = try pipeline.embed()
        let events = resumesADMM ? (try runDirectory?.events.records().map(\.event) ?? []) : []

        // Dense boundaries d_0 ... d_K, pipelined through the workers (or read back on resume).
        var dense: [ActivationStore] = [start.inputs]
        let savedDense = events.compactMap { e -> [String]? in if case .admmDense(let shas) = e { return shas } else { return nil } }.last
        if let saved = savedDense, saved.count == K, let runDirectory {
            for (k, sha) in saved.enumerated() {
                guard let d = try runDirectory.loadActivations(name: "dense-\(k + 1)", sha256: sha, make: make) else { break }
                dense.append(d)
            }
            if dense.count != K + 1 { dense = [start.inputs] } else { log("ADMM: dense boundaries read back from the run directory") }
        }
        if dense.count != K + 1 {
            dense = [start.inputs] + (try densePass(partitions, from: start.inputs))
            if let runDirectory {
                let shas = try (1...K).map { try runDirectory.saveActivations(dense[$0], name: "dense-\($0)") }
                try event(.admmDense(sha256: shas))
            }
        }

        var inputs = dense                        // h_k; h_0 stays the embeddings
        var duals: [ActivationStore?] = Array(repeating: nil, count: K)
        var rounds: [ADMMRound] = []
        var reports: [Int: BlockReport] = [:]
        for (i, f) in finished { if let r = f.report { reports[i] = r } }
        var firstRound = 1
        // Resume after the last round whose boundaries were checkpointed.
        let savedRounds = events.compactMap { e -> (round: ADMMRound, inputs: [String]?, duals: [String]?)? in
            if case .admmRound(let r, let residuals, let outputError, let modelError, let loss, _, let inputs, let duals) = e {
                return (ADMMRound(round: r, residuals: residuals, outputError: outputError, modelError: modelError, calibrationLoss: loss),
                        inputs, duals)
            }
            return nil
        }
        for e in savedRounds { rounds.append(e.round) }
        if let last = savedRounds.last, let hs = last.inputs, let runDirectory {
            let r = last.round.round
            let us = last.duals
            var ok = hs.count == K - 1
            for k in 1..<max(1, K) where ok {
                if let h = try runDirectory.loadActivations(name: "round-\(r)-h-\(k)", sha256: hs[k - 1], make: make) { inputs[k] = h } else { ok = false }
                if ok, let us, us.count == K - 1, !us[k - 1].isEmpty {
                    if let u = try runDirectory.loadActivations(name: "round-\(r)-u-\(k)", sha256: us[k - 1], make: make) { duals[k] = u } else { ok = false }
                }
            }
            if ok {
                rounds = rounds.filter { $0.round <= r }
                firstRound = r + 1
                log("ADMM: resuming after round \(r)")
            } else {
                // The round's checkpoint is damaged: start the rounds again.
                inputs = dense
                duals = Array(repeating: nil, count: K)
                rounds = []
            }
        }
        let layerCount = model.config.layerCount
        let pruned = (0..<layerCount).filter { job.prunes($0) }
        // The reports of the round kept so far (a resumed run reads them from the events).
        var keptReports: [Int: BlockReport] = [:]
        if let kept = options.kept(among: rounds) { keptReports = Self.reports(ofRound: kept.round, in: events) }
        if let stop = options.stop(after: rounds) {
            return try finishADMM(options: options, rounds: rounds, stop: stop, reports: reports, keptReports: keptReports,
                                  pruned: pruned, storeRound: { self.finished[$0]?.round })
        }
        var r = firstRound
        var stop = ADMMStop.roundLimit
        while true {
            // Blocks this round already finished before an interruption are replayed, not redone.
            let done: (Int) -> Bool = { i in self.resumesADMM && self.finished[i]?.round == r }
            let needsWork: (Int) -> Bool = { i in self.job.prunes(i) && !done(i) }
            var started: [Bool] = []
            var assigned: [WorkerLink] = []
            var busy = Set<ObjectIdentifier>()
            for (k, range) in partitions.enumerated() {
                let targets = job.plan.needsDenseStream ? dense[k] : nil
                let link = partitionLink(k, busy: busy)
                let ok = range.allSatisfy(needsWork)
                    ? try startWork(link, range, job: job, from: Boundary(inputs: inputs[k], targets: targets), busy: &busy, context: EventContext(round: r))
                    : false
                started.append(ok)
                assigned.append(link)
            }
            var outputs: [ActivationStore] = []
            for k in partitions.indices {
                let targets = job.plan.needsDenseStream ? dense[k] : nil
                var link = assigned[k]
                if started[k] {
                    busy.remove(ObjectIdentifier(link))
                } else if busy.contains(ObjectIdentifier(link)) {
                    // Started since for a later partition (which it holds until collected).
                    link = replacement(for: link, busy: busy)
                }
                outputs.append(try runSegments(link, partitions[k], from: Boundary(inputs: inputs[k], targets: targets),
                                               needsWork: needsWork, started: started[k], busy: busy, round: r,
                                               reports: reports) { index, pruned, report in
                    if let report { reports[index] = report }
                    progress(index, report)
                }.inputs)
            }
            var residuals: [Double] = []
            for k in 1..<max(1, K) {
                let o = outputs[k - 1]
                residuals.append(try relativeDistance(inputs[k], o))
                if options.rho.isInfinite {
                    inputs[k] = o
                } else {
                    let (h, u) = try boundaryUpdate(dense: dense[k], neighbour: o, dual: duals[k], rho: options.rho)
                    inputs[k] = h
                    duals[k] = u
                }
            }
            let outputError = try relativeDistance(outputs.last!, dense.last!)
            // The model these weights make, run as one chain over the calibration windows. With
            // every residual exactly zero each partition already ran from its left neighbour's
            // output, so the chain is what the partitions computed.
            let modelError = residuals.allSatisfy({ $0 == 0 }) ? outputError
                : try relativeDistance(replay(0..<layerCount, from: Boundary(inputs: start.inputs, targets: nil)).inputs, dense.last!)
            // Its language-model loss on the calibration windows (the blocks as written this round).
            let calibrationLoss = try Perplexity.evaluate(model: model.overlaid(with: try store.sources(pruned)),
                                                          tokens: job.calibration.flatMap { $0 }, sequenceLength: job.sequenceLength,
                                                          windows: job.samples).meanLoss
            let round = ADMMRound(round: r, residuals: residuals, outputError: outputError, modelError: modelError,
                                  calibrationLoss: calibrationLoss)
            rounds.append(round)
            let kept = options.kept(among: rounds)!
            if kept.round == r {
                // Before the round's event: a run stopped before it redoes the round and keeps it again.
                if options.keep == .best { try store.keep(pruned, round: r) }
                keptReports = reports
            }
            var inputsSHA256: [String]?, dualsSHA256: [String]?
            if let runDirectory {
                // The boundaries after this round, so that a resumed run starts the next one.
                inputsSHA256 = try (1..<max(1, K)).map { try runDirectory.saveActivations(inputs[$0], name: "round-\(r)-h-\($0)") }
                dualsSHA256 = try (1..<max(1, K)).map { k in try duals[k].map { try runDirectory.saveActivations($0, name: "round-\(r)-u-\(k)") } ?? "" }
            }
            try event(.admmRound(round: r, residuals: residuals, outputError: outputError, modelError: modelError,
                                 calibrationLoss: calibrationLoss, kept: kept.round,
                                 inputsSHA256: inputsSHA256, dualsSHA256: dualsSHA256))
            if options.keep == .best { store.removeKept(except: kept.round) }
            runDirectory?.removeActivations { $0.hasPrefix("round-") && !$0.hasPrefix("round-\(r)-") }
            roundDone(round)
            if let s = options.stop(after: rounds) {
                stop = s
                break
            }
            r += 1
        }
        let last = r
        return try finishADMM(options: options, rounds: rounds, stop: stop, reports: reports, keptReports: keptReports,
                              pruned: pruned, storeRound: { _ in last })
    }

    /// Each block's report of round `round` in `events` (the last of its `block_done` events in that round).
    static func reports(ofRound round: Int, in events: [RunEvent]) -> [Int: BlockReport] {
        var reports: [Int: BlockReport] = [:]
        for e in events {
            if case .blockDone(let b, _, _, let report, let r) = e, r == round, let report { reports[b] = report }
        }
        return reports
    }

    /// Ends ADMM coordination: puts the kept round's blocks back in the store where they are not
    /// there (`storeRound`: the round whose file block i's store file is, nil when unknown), each
    /// recorded as a `block_done` of that round; returns its reports.
    func finishADMM(options: ADMMOptions, rounds: [ADMMRound], stop: ADMMStop, reports: [Int: BlockReport],
                    keptReports: [Int: BlockReport], pruned: [Int], storeRound: (Int) -> Int?) throws -> ADMMOutcome {
        guard let last = rounds.last, var kept = options.kept(among: rounds) else { preconditionFailure("ADMM ended without a round") }
        var reports = reports
        func error(_ r: ADMMRound) -> String { String(format: "%.6g", r.score) }
        var reason: String
        switch options.keep {
        case .last: reason = "the last round (--keep-round last)"
        case .best:
            reason = kept.round == last.round
                ? "the last round run has the smallest loss of the model on the calibration windows (\(error(kept)))"
                : "round \(kept.round) has the smallest loss of the model on the calibration windows (\(error(kept)); the last round, \(last.round), \(error(last)))"
        }
        let toRestore = options.keep == .last ? [] : pruned.filter { storeRound($0) != kept.round }
        if kept.round != last.round || !toRestore.isEmpty {
            // The kept round's files and the SHA-256 their block_done events recorded.
            var expected: [Int: String] = [:]
            if let runDirectory {
                for record in try runDirectory.events.records() {
                    if case .blockDone(let b, let sha, _, _, let r) = record.event, r == kept.round { expected[b] = sha }
                }
            }
            var damaged: [Int] = []
            for i in toRestore {
                let file = store.keptPath(i, round: kept.round)
                if runDirectory != nil {
                    let found = FileManager.default.fileExists(atPath: file) ? (try? SHA256Digest.files([file])) : nil
                    if found == nil || found != expected[i] {
                        try event(.checkpointCorrupt(.block(i), file: file, expectedSHA256: expected[i] ?? "unknown", foundSHA256: found ?? "missing"))
                        damaged.append(i)
                    }
                } else if !FileManager.default.fileExists(atPath: file) {
                    damaged.append(i)
                }
            }
            if !damaged.isEmpty {
                // Without the kept round's files the last round's weights stand, if the store still holds all of them.
                guard pruned.allSatisfy({ storeRound($0) == last.round }) else {
                    throw RunDirectoryError("\(store.directory): the kept ADMM round \(kept.round)'s files of blocks \(damaged) are missing or damaged and the store already holds some of its blocks; start the run again")
                }
                log("ADMM: round \(kept.round)'s kept blocks \(damaged) are missing or damaged; keeping the last round, \(last.round)")
                reason = "round \(kept.round) had the smallest loss on the calibration windows, but its kept files were damaged: the last round, \(last.round), is kept"
                kept = last
            } else {
                for i in toRestore {
                    try store.restore(i, round: kept.round)
                    if let runDirectory, let sha = expected[i] {
                        try runDirectory.events.append(.blockDone(block: i, sha256: sha, worker: "kept round \(kept.round)",
                                                                  report: keptReports[i], round: kept.round))
                    }
                }
                for i in pruned { if let r = keptReports[i] { reports[i] = r } }
                log("ADMM: keeping round \(kept.round)'s weights (\(reason))")
            }
        }
        if runDirectory == nil { store.removeKept(except: nil) }
        return ADMMOutcome(reports: reports.keys.sorted().map { reports[$0]! }, rounds: rounds, kept: kept.round, stop: stop, keptReason: reason)
    }

    /// ‖a − b‖² / ‖b‖² over all windows.
    func relativeDistance(_ a: ActivationStore, _ b: ActivationStore) throws -> Double {
        var num = 0.0, den = 0.0
        for s in 0..<a.count {
            let x = try a.get(s), y = try b.get(s)
            x.withUnsafeBufferPointer { px in y.withUnsafeBufferPointer { py in
                for i in px.indices { let d = Double(px[i] - py[i]); num += d * d; den += Double(py[i]) * Double(py[i]) }
            } }
        }
        return den > 0 ? num / den : 0
    }

    /// h = (d + ρ(o − u))/(1 + ρ), u' = u + h − o.
    func boundaryUpdate(dense: ActivationStore, neighbour: ActivationStore, dual: ActivationStore?, rho: Double) throws -> (ActivationStore, ActivationStore) {
        let h = dense.makeSibling(), u = dense.makeSibling()
        let rho = Float(rho)
        for s in 0..<dense.count {
            let d = try dense.get(s), o = try neighbour.get(s)
            let u0 = try dual?.get(s) ?? Matrix(rows: d.rows, cols: d.cols)
            var hs = d, us = u0
            hs.withUnsafeMutableBufferPointer { ph in
                us.withUnsafeMutableBufferPointer { pu in
                    o.withUnsafeBufferPointer { po in
                        for i in ph.indices {
                            let value = (ph[i] + rho * (po[i] - pu[i])) / (1 + rho)
                            ph[i] = value
                            pu[i] += value - po[i]
                        }
                    }
                }
            }
            try h.set(s, hs)
            try u.set(s, us)
        }
        return (h, u)
    }
}
