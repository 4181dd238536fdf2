import Foundation
import TopiaryModel
import TopiaryPrune
import TopiaryTensor

/// How the replicas of one stage reach one another for one range.
public struct ReplicaMesh: Sendable {
    /// Names this range's group, so that a worker never mixes two groups' messages.
    public var group: String
    /// Worker processes: each replica's address, in rank order (they connect to one another).
    public var addresses: [String]
    /// Replicas in this process: their shared mailbox.
    public var hub: InProcessReplicaHub?

    public init(group: String, addresses: [String] = [], hub: InProcessReplicaHub? = nil) {
        self.group = group
        self.addresses = addresses
        self.hub = hub
    }
}

/// A link that can be one replica of a stage: it runs only its own windows of the range and
/// exchanges statistics and weights with the other replicas directly.
public protocol ReplicaMember: WorkerLink {
    /// Starts `range` as replica `role` of `mesh`; `boundary` holds this replica's windows only.
    /// `finish` then reports the blocks (whole, from replica 0; a follower's carry no weights)
    /// and returns the boundary of this replica's windows.
    func startReplica(_ range: Range<Int>, job: PruneJob, from boundary: Boundary, role: ReplicaRole, mesh: ReplicaMesh) throws
    /// Where other replicas reach this one ("" in process).
    var replicaAddress: String { get }
}

extension Boundary {
    /// The windows replica `role` runs, in stores of the job's shape (the others left empty).
    public func subset(_ role: ReplicaRole) throws -> Boundary {
        func part(_ s: ActivationStore) throws -> ActivationStore {
            let p = s.makeSibling()
            for i in role.samples(s.count) { try p.set(i, try s.tensor(i)) }
            return p
        }
        return Boundary(inputs: try part(inputs), targets: try targets.map(part))
    }

    /// Copies replica `role`'s windows of `part` into this boundary.
    public func fill(from part: Boundary, _ role: ReplicaRole) throws {
        for i in role.samples(inputs.count) {
            try inputs.set(i, try part.inputs.tensor(i))
            if let t = targets, let pt = part.targets { try t.set(i, try pt.tensor(i)) }
        }
    }
}

/// One stage run by several replicas (`--replicas R`): to the coordinator it is one worker. Each
/// replica runs its share of the calibration windows through every block; the statistics, solves
/// and weights are shared among them directly (`ReplicaExchange`), so the blocks are the bytes one
/// process gives. Replica 0 reports the blocks; the group's boundary is the replicas' windows put
/// together. A replica lost mid-range fails the group: the coordinator then hands the rest of the
/// range to a spare or to itself, with the same bytes (they do not depend on the replica count).
public final class ReplicaGroup: WorkerLink, @unchecked Sendable {
    public let members: [any ReplicaMember]
    /// Whether the started range carries dense targets (the boundary put together has them too).
    private var pendingTargets: Bool?
    private static let counter = Counter()

    public init(members: [any ReplicaMember]) {
        precondition(!members.isEmpty)
        self.members = members
    }

    public var name: String { members.map(\.name).joined(separator: "+") }
    public var isRemote: Bool { members.contains { $0.isRemote } }
    /// Seconds the replicas have to stop on their own once one has failed (the others see the
    /// mesh break and answer with a job error, staying usable); those still busy after it are
    /// abandoned (a replica that hangs without closing its connections).
    public var graceSeconds: Double = 15
    /// After a failed range: the members that answered (alive, idle); nil before.
    private var survivorRanks: [Int]?

    /// Gives up the members that were lost (all of them, unless a failed range found survivors).
    public func abandon() {
        let keep = Set(survivorRanks ?? [])
        for (rank, m) in members.enumerated() where !keep.contains(rank) { m.abandon() }
    }

    /// The replicas still usable after this group failed: a smaller group (or the one left), to
    /// redo the rest of the range with the same bytes; nil when none is.
    public func survivors() -> WorkerLink? {
        guard let s = survivorRanks, !s.isEmpty, s.count < members.count else { return nil }
        return s.count == 1 ? members[s[0]] : ReplicaGroup(members: s.map { members[$0] })
    }

    /// A job error a replica reports only because another replica failed.
    static func isSecondary(_ error: Error) -> Bool {
        if error is ReplicaError { return true }
        if let e = error as? WorkerJobError { return e.message.hasPrefix("replicas: ") }
        return false
    }

    /// A link that is gone: its connection broke, or it sent what it must not.
    static func isLost(_ error: Error) -> Bool { error is WireError || error is WorkerResultError }

    public func start(_ range: Range<Int>, job: PruneJob, from boundary: Boundary) throws {
        let count = members.count
        let inProcess = !isRemote
        let mesh = ReplicaMesh(group: "\(getpid())-\(Self.counter.next())-\(range.lowerBound)",
                               addresses: members.map(\.replicaAddress),
                               hub: inProcess ? InProcessReplicaHub(count: count) : nil)
        for (rank, m) in members.enumerated() {
            let role = ReplicaRole(rank: rank, count: count)
            try m.startReplica(range, job: job, from: try boundary.subset(role), role: role, mesh: mesh)
        }
        pendingTargets = boundary.targets != nil
    }

    public func finish(onBlock: (Int, DecoderBlock?, BlockReport?) throws -> Void) throws -> Boundary {
        guard let hasTargets = pendingTargets else { preconditionFailure("finish without start") }
        pendingTargets = nil
        // Followers are drained on threads of their own (a remote follower would otherwise stall
        // on a full socket while replica 0 waits for its statistics).
        let count = members.count
        let outcomes = Outcomes(count: count)
        survivorRanks = nil
        // Once one replica fails, the others get `graceSeconds` to stop on their own.
        let watchdog = DispatchSemaphore(value: 0)
        let done = DispatchGroup()
        for rank in 1..<max(1, count) {
            done.enter()
            let thread = Thread { [self] in
                defer { done.leave() }
                do {
                    outcomes.set(rank, .success(try members[rank].finish { _, _, _ in }))
                } catch {
                    outcomes.set(rank, .failure(error))
                    failed(outcomes, watchdog: watchdog)
                }
            }
            thread.stackSize = 4 << 20
            thread.start()
        }
        do {
            outcomes.set(0, .success(try members[0].finish(onBlock: onBlock)))
        } catch {
            outcomes.set(0, .failure(error))
            failed(outcomes, watchdog: watchdog)
        }
        done.wait()
        watchdog.signal()
        let results = outcomes.all
        var boundaries: [Boundary] = []
        var errors: [Error] = []
        var survivors: [Int] = []
        for (rank, r) in results.enumerated() {
            switch r {
            case .success(let b):
                boundaries.append(b)
                survivors.append(rank)
            case .failure(let e):
                errors.append(e)
                if Self.isSecondary(e) && !outcomes.wasAbandoned(rank) { survivors.append(rank) }
            case nil: errors.append(ReplicaError("a replica ended without a result"))
            }
        }
        // The group fails as its cause: a lost replica first (the coordinator then fails over,
        // to the survivors), then a replica's own job error, never the others' echoes of it.
        if !errors.isEmpty {
            survivorRanks = isRemote ? survivors : nil
            throw errors.first(where: Self.isLost) ?? errors.first(where: { !Self.isSecondary($0) }) ?? errors[0]
        }
        let shape = boundaries[0].inputs
        let whole = Boundary(inputs: shape.makeSibling(), targets: hasTargets ? shape.makeSibling() : nil)
        for rank in 0..<count { try whole.fill(from: boundaries[rank], ReplicaRole(rank: rank, count: count)) }
        return whole
    }

    /// After the first failure: abandons, `graceSeconds` later, the replicas still busy.
    private func failed(_ outcomes: Outcomes, watchdog: DispatchSemaphore) {
        guard outcomes.markFailed() else { return }
        Thread.detachNewThread { [self] in
            if watchdog.wait(timeout: .now() + graceSeconds) == .timedOut {
                for (rank, m) in members.enumerated() where !outcomes.isDone(rank) { m.abandon() }
            }
        }
    }

    /// Each replica's result, set from its own thread.
    final class Outcomes: @unchecked Sendable {
        private let lock = NSLock()
        private var values: [Result<Boundary, Error>?]
        init(count: Int) { values = Array(repeating: nil, count: count) }
        private var failed = false
        private var abandoned = Set<Int>()
        func set(_ i: Int, _ r: Result<Boundary, Error>) { lock.lock(); values[i] = r; lock.unlock() }
        var all: [Result<Boundary, Error>?] { lock.lock(); defer { lock.unlock() }; return values }
        /// True for the first failure only.
        func markFailed() -> Bool { lock.lock(); defer { lock.unlock() }; let first = !failed; failed = true; return first }
        /// Whether replica i has its result; one that has not is marked abandoned.
        func isDone(_ i: Int) -> Bool {
            lock.lock(); defer { lock.unlock() }
            if values[i] == nil { abandoned.insert(i); return false }
            return true
        }
        func wasAbandoned(_ i: Int) -> Bool { lock.lock(); defer { lock.unlock() }; return abandoned.contains(i) }
    }

    final class Counter: @unchecked Sendable {
        private let lock = NSLock()
        private var value = 0
        func next() -> Int { lock.lock(); defer { lock.unlock() }; value += 1; return value }
    }
}

/// A replica in this process: runs its range on a thread of its own from `startReplica`, so that
/// the group's replicas compute at once; `finish` hands over what it produced, in order.
public final class InProcessReplica: ReplicaMember, @unchecked Sendable {
    public let model: LanguageModel
    public let name: String
    public var replicaAddress: String { "" }
    private let condition = NSCondition()
    private var events: [(Int, DecoderBlock?, BlockReport?)] = []
    private var result: Result<Boundary, Error>?
    private var exchange: (any ReplicaExchange)?

    public init(model: LanguageModel, name: String) {
        self.model = model
        self.name = name
    }

    public func start(_ range: Range<Int>, job: PruneJob, from boundary: Boundary) throws {
        try startReplica(range, job: job, from: boundary, role: .single, mesh: ReplicaMesh(group: "", hub: InProcessReplicaHub(count: 1)))
    }

    public func startReplica(_ range: Range<Int>, job: PruneJob, from boundary: Boundary, role: ReplicaRole, mesh: ReplicaMesh) throws {
        guard let hub = mesh.hub else { preconditionFailure("an in-process replica needs the group's hub") }
        let exchange = hub.exchange(rank: role.rank)
        self.exchange = exchange
        condition.lock()
        events = []
        result = nil
        condition.unlock()
        let model = self.model
        let delay = DebugHooks.blockDelay
        let thread = Thread { [self] in
            let outcome = Result {
                try RangePruner(model: model, job: job, exchange: role.count > 1 ? exchange : nil).run(range, from: boundary) { index, pruned, report in
                    self.condition.lock()
                    self.events.append((index, role.rank == 0 ? pruned : nil, report))
                    self.condition.broadcast()
                    self.condition.unlock()
                    if delay > 0 { Thread.sleep(forTimeInterval: delay) }
                }
            }
            if case .failure(let e) = outcome { exchange.fail("\(self.name): \(e)") }
            self.condition.lock()
            self.result = outcome
            self.condition.broadcast()
            self.condition.unlock()
        }
        thread.stackSize = 8 << 20
        thread.start()
    }

    public func finish(onBlock: (Int, DecoderBlock?, BlockReport?) throws -> Void) throws -> Boundary {
        while true {
            condition.lock()
            while events.isEmpty && result == nil { condition.wait() }
            let batch = events
            events = []
            let outcome = batch.isEmpty ? result : nil
            condition.unlock()
            for (i, b, r) in batch { try onBlock(i, b, r) }
            if let outcome { return try outcome.get() }
        }
    }

    public func abandon() { exchange?.fail("\(name) abandoned") }
}
