import Foundation
import TopiaryModel
import TopiaryTensor

/// One replica's place in a stage that `count` replicas share: it runs the forward passes of a
/// contiguous range of the calibration windows (replica r of R: windows r·N/R up to (r+1)·N/R),
/// so that the statistics chain (`StatisticsChain`) passes each strip of a Hessian from replica
/// to replica once, in window order.
public struct ReplicaRole: Sendable, Equatable, Codable {
    public var rank: Int
    public var count: Int

    public init(rank: Int, count: Int) {
        precondition(count >= 1 && (0..<count).contains(rank), "replica \(rank) of \(count)")
        self.rank = rank
        self.count = count
    }

    public static let single = ReplicaRole(rank: 0, count: 1)

    /// The windows replica `rank` runs of `total`.
    public static func range(_ rank: Int, of count: Int, total: Int) -> Range<Int> {
        rank * total / count..<(rank + 1) * total / count
    }
    /// Whether this replica runs window `s` of `total`.
    public func owns(sample s: Int, of total: Int) -> Bool { Self.range(rank, of: count, total: total).contains(s) }
    /// The windows this replica runs, in order.
    public func samples(_ total: Int) -> [Int] { Array(Self.range(rank, of: count, total: total)) }
    /// The replica that runs window `s` of `total`.
    public func rank(ofSample s: Int, of total: Int) -> Int {
        (0..<count).first { Self.range($0, of: count, total: total).contains(s) } ?? count - 1
    }

    /// A broadcast from `root` goes down a binomial tree over the ranks counted from the root
    /// (v = (rank − root) mod count): v gets it from v minus its lowest set bit, and passes it
    /// on to v + 2^k for every 2^k below that bit, the largest subtree first. The root sends it
    /// ⌈log₂ count⌉ times instead of count − 1, and it reaches every replica after as many hops.
    public func broadcastParent(root: Int) -> Int? {
        let v = (rank - root + count) % count
        return v == 0 ? nil : (v - (v & -v) + root) % count
    }

    public func broadcastChildren(root: Int) -> [Int] {
        let v = (rank - root + count) % count
        var step = v == 0 ? 1 << max(0, Int.bitWidth - (count - 1).leadingZeroBitCount) : v & -v
        var out: [Int] = []
        while step > 1 {
            step >>= 1
            if v + step < count { out.append((v + step + root) % count) }
        }
        return out
    }
}

/// What a replica hands another during a block. Every message is named by its block, its kind,
/// a tensor or statistics name and an index, so that a receiver takes exactly the one it waits
/// for whatever order they arrive in.
public struct ReplicaKey: Hashable, Sendable, CustomStringConvertible {
    public enum Kind: UInt8, Sendable {
        /// The inputs of a statistics group's linear for window `index` (to the group's owner):
        /// only SparseLLM's feed-forward inputs (the other groups' statistics go down the chain).
        case statisticsInput = 1
        /// The same from the dense model's stream (SparseLLM with dense targets).
        case targetInput = 2
        /// A pruned weight (from its owner to every replica).
        case weight = 3
        /// A linear's report, or a joint step's report, as JSON (to replica 0).
        case report = 4
        /// Window `index`'s output error terms [num, den] (to replica 0).
        case outputError = 5
        /// Window `index`'s block input / dense output / dense target (BESA, to replica 0).
        case blockInput = 6, denseOutput = 7, denseTarget = 8
        /// A linear whose rows the replicas share: U of its inverse Hessian (owner to all, where
        /// the replicas do not make it together: `SpreadInverseFactor.applies`); the owner's
        /// prepared rows of replica `index`; a column block's scores (`index` = block x
        /// replicas + rank, to the owner); the block's threshold (`index` = column block, to
        /// all); replica `index`'s pruned rows (to all).
        case inverseFactor = 9
        case rows = 10, scores = 11, threshold = 12, prunedRows = 13
        /// Part `index` of a statistics group on its way down the chain of replicas (to the next
        /// replica), and finished (from the last to the group's owner): part 0 is the count of
        /// windows and tokens and the squared norms, part j + 1 strip j of H (`StatisticsChain`).
        case chainedStatistics = 15, finishedStatistics = 16
        /// A row-shared linear's U computed by all replicas (`SpreadInverseFactor`): tile column
        /// `index` of JAJ for the damped Hessian A (owner to the tile column's holder); panel
        /// `index` of its Cholesky factor, or the error that stopped it (its holder to all, down
        /// the tree); tile column `index` of L⁻¹ (its holder to all, down the tree).
        case factorColumn = 17, factorPanel = 18, inverseColumn = 19
    }

    public var block: Int
    public var kind: Kind
    public var name: String
    public var index: Int

    public init(block: Int, kind: Kind, name: String = "", index: Int = 0) {
        self.block = block
        self.kind = kind
        self.name = name
        self.index = index
    }

    public var description: String { "block \(block) \(kind) '\(name)' \(index)" }
}

/// A message's body.
public enum ReplicaValue: Sendable {
    /// A window that never reached this linear (an expert no token was routed to).
    case absent
    case matrix(Matrix)
    case bytes([UInt8])
}

/// Replicas lost or failed: every replica waiting on the exchange gets this error.
public struct ReplicaError: Error, CustomStringConvertible {
    public let detail: String
    public init(_ detail: String) { self.detail = detail }
    public var description: String { detail }
}

/// How the replicas of a stage reach one another: point to point, named messages. In one process
/// it is a shared mailbox (`InProcessReplicaHub`); between processes, the worker mesh over TCP.
/// A receive blocks until its message is there, or throws once any replica has failed.
public protocol ReplicaExchange: AnyObject, Sendable {
    var role: ReplicaRole { get }
    func send(_ key: ReplicaKey, _ value: ReplicaValue, to rank: Int) throws
    func receive(_ key: ReplicaKey) throws -> ReplicaValue
    /// Tells the other replicas this one failed (their receives throw); idempotent.
    func fail(_ reason: String)
    /// Whether the replicas share one process's memory (`InProcessReplicaHub`): a matrix sent
    /// to all of them is then one buffer, and splitting work that the backend already spreads
    /// over the cores gains nothing.
    var sharesMemory: Bool { get }
}

extension ReplicaExchange {
    /// `value` (given on `root`, nil elsewhere) to every replica down the binomial tree of
    /// `ReplicaRole.broadcastChildren`: each replica gets it from its parent and passes it on.
    /// Every replica must make the same broadcasts in the same order.
    public func broadcast(_ key: ReplicaKey, _ value: ReplicaValue?, root: Int) throws -> ReplicaValue {
        let got: ReplicaValue
        if role.rank == root {
            guard let value else { preconditionFailure("\(key): the root of a broadcast has nothing to send") }
            got = value
        } else {
            got = try receive(key)
        }
        for child in role.broadcastChildren(root: root) { try send(key, got, to: child) }
        return got
    }
}

/// A thread-safe set of delivered messages that receivers wait on.
public final class ReplicaMailbox: @unchecked Sendable {
    private let condition = NSCondition()
    private var messages: [ReplicaKey: ReplicaValue] = [:]
    private var failure: String?
    /// Seconds a receive waits before it gives up (a replica that stopped without failing).
    public var timeout: Double

    public init(timeout: Double = 24 * 3600) { self.timeout = timeout }

    public func deliver(_ key: ReplicaKey, _ value: ReplicaValue) {
        condition.lock()
        messages[key] = value
        condition.broadcast()
        condition.unlock()
    }

    public func fail(_ reason: String) {
        condition.lock()
        if failure == nil { failure = reason }
        condition.broadcast()
        condition.unlock()
    }

    public var failed: String? {
        condition.lock()
        defer { condition.unlock() }
        return failure
    }

    public func take(_ key: ReplicaKey) throws -> ReplicaValue {
        let deadline = Date().addingTimeInterval(timeout)
        condition.lock()
        defer { condition.unlock() }
        while true {
            if let v = messages.removeValue(forKey: key) { return v }
            if let failure { throw ReplicaError("replicas: \(failure) (while waiting for \(key))") }
            guard condition.wait(until: deadline) else {
                throw ReplicaError("replicas: nothing for \(key) after \(Int(timeout)) s")
            }
        }
    }
}

/// The replicas of one stage in one process: each gets an exchange from `exchange(rank:)`.
public final class InProcessReplicaHub: @unchecked Sendable {
    public let count: Int
    let boxes: [ReplicaMailbox]

    public init(count: Int) {
        self.count = count
        boxes = (0..<count).map { _ in ReplicaMailbox() }
    }

    public func exchange(rank: Int) -> any ReplicaExchange { Endpoint(hub: self, role: ReplicaRole(rank: rank, count: count)) }

    final class Endpoint: ReplicaExchange, @unchecked Sendable {
        let hub: InProcessReplicaHub
        let role: ReplicaRole
        var sharesMemory: Bool { true }
        init(hub: InProcessReplicaHub, role: ReplicaRole) {
            self.hub = hub
            self.role = role
        }
        func send(_ key: ReplicaKey, _ value: ReplicaValue, to rank: Int) throws {
            if let f = hub.boxes[role.rank].failed { throw ReplicaError("replicas: \(f)") }
            hub.boxes[rank].deliver(key, value)
        }
        func receive(_ key: ReplicaKey) throws -> ReplicaValue { try hub.boxes[role.rank].take(key) }
        func fail(_ reason: String) {
            for b in hub.boxes { b.fail("replica \(role.rank) of \(role.count) failed: \(reason)") }
        }
    }
}

/// Which replica solves which linears of a block: the linears that share statistics (q/k/v,
/// gate/up), and for SparseLLM a whole feed-forward, go to one replica together; the groups go
/// to replicas by modelled cost, largest first, each to the least loaded replica (ties to the
/// highest rank: the largest group's owner is then the last replica of the statistics chain,
/// which finishes its H in place instead of receiving it). Every replica computes the same plan
/// from the block alone.
public enum ReplicaWork {
    /// statistics key -> owning rank.
    /// `sharedStatistics`: groups whose statistics all replicas make (`StatisticsChain`): no
    /// owner's load. `sharedRows`: linears whose rows all replicas solve
    /// (`splitLinears`); their owner's own load is the factorisation (1/R of it with
    /// `spreadFactor`: `SpreadInverseFactor`) and the report.
    public static func owners(block: DecoderBlock, plan: PrunePlan, tokens: Int, replicas: Int,
                              sharedStatistics: Set<String> = [], sharedRows: Set<String> = [],
                              spreadFactor: Bool = false) -> [String: Int] {
        let keys = BlockPruner.statisticsKeys(block.inputGroups)
        let linears = block.linearNames
        func shape(_ name: String) -> (Int, Int) {
            guard let w = block.tensors[name + ".weight"] else { return (0, 0) }
            return (w.rows, w.cols)
        }
        // Groups of keys that one replica must hold together.
        var groupOf: [String: Int] = [:]
        var groups: [[String]] = []
        func group(_ members: [String]) {
            let ks = Array(Set(members.map { keys[$0] ?? $0 })).sorted()
            let existing = Set(ks.compactMap { groupOf[$0] })
            var merged = ks
            for g in existing.sorted(by: >) { merged += groups[g]; groups[g] = [] }
            merged = Array(Set(merged)).sorted()
            groups.append(merged)
            for k in merged { groupOf[k] = groups.count - 1 }
        }
        if plan.method == .besa {
            group(linears)              // BESA learns the block as a whole: one replica.
        } else {
            for name in linears { group([name]) }
            if plan.method == .sparsellm {
                for ffn in block.feedForwards {
                    switch ffn {
                    case .gated(let g, let u, let d): group([g, u, d])
                    case .plain(let a, let b): group([a, b])
                    }
                }
            }
        }
        var costed: [(cost: Double, keys: [String])] = []
        for g in groups where !g.isEmpty {
            var cost = 0.0
            for name in linears where g.contains(keys[name] ?? name) {
                let (rows, cols) = shape(name)
                cost += Self.cost(rows: rows, cols: cols, tokens: tokens, plan: plan,
                                  statistics: keys[name] == name && !sharedStatistics.contains(name),
                                  solveWeight: sharedRows.contains(name) && spreadFactor ? 3 / Double(replicas) : 3,
                                  sharedRows: sharedRows.contains(name))
            }
            costed.append((cost, g))
        }
        costed.sort { $0.cost != $1.cost ? $0.cost > $1.cost : $0.keys[0] < $1.keys[0] }
        var load = [Double](repeating: 0, count: replicas)
        var owners: [String: Int] = [:]
        for (cost, ks) in costed {
            let r = load.indices.min { load[$0] != load[$1] ? load[$0] < load[$1] : $0 > $1 }!
            load[r] += cost
            for k in ks { owners[k] = r }
        }
        return owners
    }

    /// Statistics groups that the replicas make together (`StatisticsChain`): every group but
    /// SparseLLM's feed-forward inputs, whose owner needs the inputs themselves (they go to it,
    /// window by window).
    public static func chainedStatistics(block: DecoderBlock, plan: PrunePlan) -> Set<String> {
        chainedStatistics(config: block.config, block: block.index, plan: plan)
    }

    /// `chainedStatistics` of block `i` of a model with `config`, without its weights.
    public static func chainedStatistics(config c: ModelConfig, block i: Int, plan: PrunePlan) -> Set<String> {
        let keys = BlockPruner.statisticsKeys(c.family.inputGroups(c, block: i))
        let ffnInputs = plan.method == .sparsellm ? Set(c.family.feedForwards(c, block: i).map(\.inputLinear)) : []
        return Set(c.family.linears(c, block: i).map { keys[$0] ?? $0 }).subtracting(ffnInputs)
    }

    /// About how many bytes one replica holds of its windows' inputs until a block's statistics
    /// chain (`BlockPruner`: every chained group's inputs for each window of its range, fp32),
    /// the most over `blocks` of a model with `config`: the largest range's tokens times the
    /// chained groups' widths; an expert's group gets `expertsPerToken / expertCount` of the
    /// tokens (the mean routing). Outside `--memory-budget`, which bounds the activations.
    public static func heldInputBytes(config c: ModelConfig, plan: PrunePlan, windows: Int, sequenceLength: Int,
                                      replicas: Int, blocks: Range<Int>) -> Int {
        guard replicas > 1, windows > 0 else { return 0 }
        let tokens = Double((windows + replicas - 1) / replicas * sequenceLength)
        var most = 0.0
        for i in blocks {
            let widths = Dictionary(c.family.blockTensors(c, block: i).map { ($0.name, $0.cols) }, uniquingKeysWith: { a, _ in a })
            var bytes = 0.0
            for key in chainedStatistics(config: c, block: i, plan: plan) {
                guard let cols = widths[key + ".weight"] else { continue }
                let routed = key.contains(".experts.") && c.expertCount > 0 ? Double(c.expertsPerToken) / Double(c.expertCount) : 1
                bytes += tokens * routed * Double(cols) * 4
            }
            most = max(most, bytes)
        }
        return Int(most)
    }

    /// Linears whose rows all replicas share: SparseGPT's linears that alone cost more than a
    /// replica's fair share of the block (down_proj at 70B), with at least as many rows as replicas.
    public static func splitLinears(block: DecoderBlock, plan: PrunePlan, tokens: Int, replicas: Int) -> [String] {
        guard replicas > 1, plan.method == .sparsegpt, plan.sparseGPT.admm == nil else { return [] }
        let keys = BlockPruner.statisticsKeys(block.inputGroups)
        var costs: [(String, Double, Int)] = []
        for name in block.linearNames {
            guard let w = block.tensors[name + ".weight"] else { continue }
            costs.append((name, cost(rows: w.rows, cols: w.cols, tokens: tokens, plan: plan, statistics: keys[name] == name), w.rows))
        }
        let fair = costs.reduce(0) { $0 + $1.1 } / Double(replicas)
        // Each replica needs at least one whole chunk of rows (`solveRows`).
        func chunks(_ rows: Int) -> Int { (rows + SparseGPTPruner.rowChunk(rows: rows) - 1) / SparseGPTPruner.rowChunk(rows: rows) }
        return costs.filter { $0.1 > fair && chunks($0.2) >= replicas }.map(\.0)
    }

    /// Replica `rank`'s rows of a linear with `rows` rows shared by `count` replicas, in whole
    /// units of `unit` rows (the last unit shorter).
    public static func rowRange(_ rank: Int, of count: Int, rows: Int, unit: Int = 1) -> Range<Int> {
        let units = (rows + unit - 1) / unit
        return min(rows, rank * units / count * unit)..<min(rows, (rank + 1) * units / count * unit)
    }

    /// Replica `rank`'s rows of a split SparseGPT linear: whole `SparseGPTPruner.rowChunk`s.
    public static func solveRows(_ rank: Int, of count: Int, rows: Int) -> Range<Int> {
        rowRange(rank, of: count, rows: rows, unit: SparseGPTPruner.rowChunk(rows: rows))
    }

    /// Modelled FLOPs of one linear's statistics (when it keeps them), solve and error report.
    /// For placing groups on owners (`owners`), the solve is weighted by `solveWeight` (3: the
    /// SparseGPT solve runs at about a third of the rate of the Hessian update and the reports;
    /// `prune --profile`, SmolLM2 at one thread: solve 0.22 of sgemm, statistics 0.73, error
    /// metrics 0.57), and a row-shared linear's owner keeps only the factorisation (`sharedRows`:
    /// the rows are everyone's equal share).
    /// The report and the Hessian are charged only where the plan has them
    /// (`PrunePlan.measuresLinearErrors`, `collectsHessian`; Wanda, magnitude and BESA without its
    /// refit: neither by default).
    public static func cost(rows: Int, cols: Int, tokens: Int, plan: PrunePlan, statistics: Bool,
                            solveWeight: Double = 1, sharedRows: Bool = false) -> Double {
        let r = Double(rows), c = Double(cols)
        var f = plan.measuresLinearErrors ? 6 * r * c * c : 0                  // the three quadratic forms of the report
        if statistics { f += Double(tokens) * (plan.collectsHessian ? c * c : c) }   // the Hessian's syrk, or the norms
        switch plan.method {
        case .magnitude, .wanda: f += r * c * 10
        case .sparsegpt, .sparsellm, .besa: f += solveWeight * (sharedRows ? c * c * c : 2 * r * c * c + c * c * c)
        }
        return f
    }
}
