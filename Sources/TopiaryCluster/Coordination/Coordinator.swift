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
    /// Collects the started range's blocks (each reported as it arrives) and the boundary after it.
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
    public var rounds: Int
    /// Weight of agreement with the left neighbour's pruned output against the dense target;
    /// infinity (the default) passes the neighbour's output on unchanged.
    public var rho: Double
    /// Stop when every boundary's relative residual is at most this.
    public var tolerance: Double

    public init(rounds: Int, rho: Double = .infinity, tolerance: Double = 0) {
        self.rounds = rounds
        self.rho = rho
        self.tolerance = tolerance
    }
}

/// One ADMM round: the relative residual ‖h_k − o_{k−1}‖²/‖o_{k−1}‖² of each boundary k ≥ 1
/// (the input partition k used against what its left neighbour produced this round), and the
/// model output's relative error against the dense model.
public struct ADMMRound: Sendable, Codable {
    public var round: Int
    public var residuals: [Double]
    public var outputError: Double
    public var objective: Double { residuals.reduce(0, +) + outputError }
}

/// The coordinator: plans contiguous block ranges over the workers and runs them. The local run is
/// this with one in-process worker.
///
/// Faults: a remote worker that fails (its connection drops, or it sends nothing, not even a
/// heartbeat, for the connection's timeout) is abandoned; the blocks it finished stay, the
/// activations after them are recomputed here by replaying those blocks, and the rest of its range
/// goes to another live, idle worker, or to this process when none is left. With a run directory
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
    /// Progress messages (worker lost, reassignment, replay).
    public var log: (String) -> Void = { _ in }

    private var dead = Set<ObjectIdentifier>()
    private lazy var fallback: WorkerLink = InProcessWorker(model: model, name: "coordinator (in-process)")

    public init(model: LanguageModel, job: PruneJob, store: BlockFileStore, workers: [WorkerLink], runDirectory: RunDirectory? = nil) {
        self.model = model
        self.job = job
        self.store = store
        self.workers = workers
        self.runDirectory = runDirectory
    }

    /// Block costs for planning: parameters × calibration tokens.
    public func blockCosts() -> [Double] {
        let c = model.config
        let perBlock = Double(c.family.linearMACsPerToken(c))
        return Array(repeating: perBlock * Double(job.samples * job.sequenceLength), count: c.layerCount)
    }

    public func plan() -> [Range<Int>] { fixedPlan ?? PartitionPlanner.plan(costs: blockCosts(), workers: workers.count) }

    func event(_ name: String, _ fields: [String: Any]) throws { try runDirectory?.events.append(name, fields) }

    /// Writes a block the moment it arrives: to the run directory (checksummed, with an event) or the store.
    func record(_ block: DecoderBlock, report: BlockReport?, worker: String, round: Int? = nil) throws {
        if let runDirectory {
            try runDirectory.recordBlock(block, report: report, worker: worker, round: round)
        } else {
            try store.write(block)
        }
    }

    /// Recomputes the activations after `range` from those before it, through the blocks as they
    /// were pruned (read back from the store).
    func replay(_ range: Range<Int>, from boundary: Boundary, job: PruneJob? = nil) throws -> Boundary {
        guard !range.isEmpty else { return boundary }
        return try RangePruner(model: model, job: job ?? self.job).replay(range, from: boundary) { i in
            try model.overlaid(with: try store.sources([i])).loadBlock(i)
        }
    }

    func isLive(_ link: WorkerLink) -> Bool { !dead.contains(ObjectIdentifier(link)) }

    /// A live link with no work in progress other than `excluding`, or this process.
    func replacement(for lost: WorkerLink, busy: Set<ObjectIdentifier>) -> WorkerLink {
        workers.first { $0 !== lost && isLive($0) && !busy.contains(ObjectIdentifier($0)) } ?? fallback
    }

    /// Gives up on a link that failed: it is never used again, and the loss is recorded.
    func markLost(_ link: WorkerLink, _ error: Error, _ fields: [String: Any]) throws {
        dead.insert(ObjectIdentifier(link))
        link.abandon()
        try event("worker_lost", fields.merging(["worker": link.name, "error": "\(error)"]) { $1 })
    }

    /// Runs `range` from `start` on `link` (with `job`, by default the run's); when the link is
    /// lost, continues the rest of the range on a replacement from the last block it finished.
    /// `started`: the range was already handed to `link` (ADMM starts every partition before
    /// collecting any). `context` goes into the events (an ADMM round, the dense pass).
    func runWithFailover(_ preferred: WorkerLink, _ range: Range<Int>, job: PruneJob? = nil, from start: Boundary,
                         started: Bool = false, busy: Set<ObjectIdentifier> = [], round: Int? = nil,
                         context: [String: Any] = [:],
                         onBlock: (_ index: Int, _ pruned: DecoderBlock?, _ report: BlockReport?) throws -> Void) throws -> Boundary {
        let job = job ?? self.job
        var context = context
        if let round { context["round"] = round }
        func fields(_ f: [String: Any]) -> [String: Any] { f.merging(context) { a, _ in a } }
        var link = preferred
        if !isLive(link) {
            let to = replacement(for: link, busy: busy)
            try event("reassigned", fields(["first": range.lowerBound, "last": range.upperBound - 1, "from": link.name, "to": to.name]))
            log("blocks \(range.lowerBound)-\(range.upperBound - 1): \(link.name) was lost earlier; running them on \(to.name)")
            link = to
        }
        var from = range.lowerBound
        var boundary = start
        var isStarted = started
        while true {
            var next = from
            do {
                if !isStarted { try link.start(from..<range.upperBound, job: job, from: boundary) }
                isStarted = false
                let name = link.name
                return try link.finish { index, pruned, report in
                    if let pruned { try record(pruned, report: report, worker: name, round: round) }
                    try onBlock(index, pruned, report)
                    next = index + 1
                }
            } catch let error as WireError where link.isRemote {
                isStarted = false
                try markLost(link, error, fields(["first": from, "last": range.upperBound - 1, "finished_through": next - 1]))
                log("worker \(link.name) lost (\(error)); it finished blocks \(from)..<\(next) of \(from)..<\(range.upperBound)")
                boundary = try replay(from..<next, from: boundary, job: job)
                from = next
                if from == range.upperBound { return boundary }
                let to = replacement(for: link, busy: busy)
                try event("reassigned", fields(["first": from, "last": range.upperBound - 1, "from": link.name, "to": to.name]))
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
                    var fields: [String: Any] = ["first": i, "last": j - 1]
                    if let round { fields["round"] = round }
                    try event("replayed", fields)
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
        let partitions = plan()
        for (k, part) in partitions.enumerated() where part.upperBound > position {
            let first = max(part.lowerBound, position)
            // A worker's range starts here: keep the activations, so that a resumed run need not
            // replay everything before it.
            if first > 0 && first == part.lowerBound && needsWork(first), let runDirectory { try runDirectory.saveBoundary(boundary, at: first) }
            boundary = try runSegments(workers[k], first..<part.upperBound, from: boundary, needsWork: needsWork,
                                       reports: reports) { index, pruned, report in
                if let report { reports[index] = report }
                progress(index, report)
            }
        }
        return reports.keys.sorted().map { reports[$0]! }
    }

    /// ADMM coordination. A dense pass through the workers gives every boundary its dense
    /// activations d_k. Each round, every worker prunes its range in parallel from its boundary
    /// input h_k (h_0: the embeddings); then for each boundary k ≥ 1, with o the left neighbour's
    /// pruned output and u a scaled dual, h_k ← (d_k + ρ(o − u))/(1 + ρ) and u ← u + h_k − o
    /// (with ρ = ∞: h_k ← o). Stops at the tolerance or after the rounds; the weights are the last
    /// round's. With ρ = ∞ and as many rounds as partitions, every partition's input is the
    /// pruned chain's, so the weights equal sequential coordination's.
    public func runADMM(options: ADMMOptions, progress: (_ block: Int, _ report: BlockReport?) -> Void,
                        round roundDone: (ADMMRound) -> Void = { _ in }) throws -> (reports: [BlockReport], rounds: [ADMMRound]) {
        let pipeline = PrunePipeline(model: model, job: job, store: store)
        try pipeline.validate()
        let partitions = plan()
        let K = partitions.count
        let make = { RangePruner.store(job: self.job, config: self.model.config) }
        let start = try pipeline.embed()
        let events = resumesADMM ? (try runDirectory?.events.read() ?? []) : []

        // Dense boundaries d_0 ... d_K, pipelined through the workers (or read back on resume).
        var dense: [ActivationStore] = [start.inputs]
        if let saved = events.last(where: { $0["event"] as? String == "admm_dense" })?["sha256"] as? [String],
           saved.count == K, let runDirectory {
            for (k, sha) in saved.enumerated() {
                guard let d = try runDirectory.loadActivations(name: "dense-\(k + 1)", sha256: sha, make: make) else { break }
                dense.append(d)
            }
            if dense.count != K + 1 { dense = [start.inputs] } else { log("ADMM: dense boundaries read back from the run directory") }
        }
        if dense.count != K + 1 {
            var denseJob = job
            denseJob.denseOnly = true
            for (k, range) in partitions.enumerated() {
                let link = k < workers.count ? workers[k] : fallback
                dense.append(try runWithFailover(link, range, job: denseJob, from: Boundary(inputs: dense.last!, targets: nil),
                                                 context: ["phase": "dense pass"]) { _, _, _ in }.inputs)
            }
            if let runDirectory {
                let shas = try (1...K).map { try runDirectory.saveActivations(dense[$0], name: "dense-\($0)") }
                try event("admm_dense", ["sha256": shas])
            }
        }

        var inputs = dense                        // h_k; h_0 stays the embeddings
        var duals: [ActivationStore?] = Array(repeating: nil, count: K)
        var rounds: [ADMMRound] = []
        var reports: [Int: BlockReport] = [:]
        for (i, f) in finished { if let r = f.report { reports[i] = r } }
        var firstRound = 1
        // Resume after the last round whose boundaries were checkpointed.
        for e in events where e["event"] as? String == "admm_round" {
            guard let r = e["round"] as? Int, let residuals = e["residuals"] as? [Double], let outputError = e["output_error"] as? Double else { continue }
            rounds.append(ADMMRound(round: r, residuals: residuals, outputError: outputError))
        }
        if let last = events.last(where: { $0["event"] as? String == "admm_round" }), let r = last["round"] as? Int,
           let hs = last["inputs_sha256"] as? [String], let runDirectory {
            let us = last["duals_sha256"] as? [String]
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
        if let last = rounds.last, last.residuals.allSatisfy({ $0 <= options.tolerance }) || last.round >= options.rounds {
            return (reports.keys.sorted().map { reports[$0]! }, rounds)
        }
        for r in firstRound...max(firstRound, options.rounds) {
            // Blocks this round already finished before an interruption are replayed, not redone.
            let done: (Int) -> Bool = { i in self.resumesADMM && self.finished[i]?.round == r }
            let needsWork: (Int) -> Bool = { i in self.job.prunes(i) && !done(i) }
            var started: [Bool] = []
            var assigned: [WorkerLink] = []
            var busy = Set<ObjectIdentifier>()
            for (k, range) in partitions.enumerated() {
                let targets = job.plan.needsDenseStream ? dense[k] : nil
                var link = k < workers.count ? workers[k] : fallback
                if !isLive(link) { link = replacement(for: link, busy: busy) }
                var ok = false
                // The in-process fallback computes in finish, so starting it never blocks the others.
                if !busy.contains(ObjectIdentifier(link)) && range.allSatisfy(needsWork) {
                    do {
                        try link.start(range, job: job, from: Boundary(inputs: inputs[k], targets: targets))
                        ok = true
                        busy.insert(ObjectIdentifier(link))
                    } catch let error as WireError where link.isRemote {
                        try markLost(link, error, ["first": range.lowerBound, "last": range.upperBound - 1, "round": r])
                    }
                }
                started.append(ok)
                assigned.append(link)
            }
            var outputs: [ActivationStore] = []
            for k in partitions.indices {
                let targets = job.plan.needsDenseStream ? dense[k] : nil
                busy.remove(ObjectIdentifier(assigned[k]))
                outputs.append(try runSegments(assigned[k], partitions[k], from: Boundary(inputs: inputs[k], targets: targets),
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
            let round = ADMMRound(round: r, residuals: residuals, outputError: try relativeDistance(outputs.last!, dense.last!))
            rounds.append(round)
            var fields: [String: Any] = ["round": r, "residuals": residuals, "output_error": round.outputError]
            if let runDirectory {
                // The boundaries after this round, so that a resumed run starts the next one.
                fields["inputs_sha256"] = try (1..<max(1, K)).map { try runDirectory.saveActivations(inputs[$0], name: "round-\(r)-h-\($0)") }
                fields["duals_sha256"] = try (1..<max(1, K)).map { k in try duals[k].map { try runDirectory.saveActivations($0, name: "round-\(r)-u-\(k)") } ?? "" }
            }
            try event("admm_round", fields)
            runDirectory?.removeActivations { $0.hasPrefix("round-") && !$0.hasPrefix("round-\(r)-") }
            roundDone(round)
            if residuals.allSatisfy({ $0 <= options.tolerance }) { break }
        }
        return (reports.keys.sorted().map { reports[$0]! }, rounds)
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
