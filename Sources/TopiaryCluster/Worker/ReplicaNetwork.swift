import Foundation
import TopiaryModel
import TopiaryPrune
import TopiaryTensor

/// The replicas of a stage over TCP: one authenticated connection between every two replicas
/// (the higher rank dials the lower and says `peer-join`), a receiving thread per connection that
/// files each message in the mailbox under its `ReplicaKey`, and sends serialized per connection.
/// Statistics and weights go replica to replica; the coordinator carries none of them.
final class TCPReplicaExchange: ReplicaExchange, @unchecked Sendable {
    let role: ReplicaRole
    let mailbox = ReplicaMailbox()
    var sharesMemory: Bool { false }
    private let connections: [Int: Connection]
    private let locks: [Int: NSLock]
    private let finished = DispatchGroup()
    private let stateLock = NSLock()
    private var closing = false

    init(role: ReplicaRole, connections: [Int: Connection]) {
        self.role = role
        self.connections = connections
        locks = connections.mapValues { _ in NSLock() }
        for (rank, c) in connections {
            finished.enter()
            let thread = Thread { [self] in
                defer { finished.leave() }
                receiveLoop(from: rank, c)
            }
            thread.stackSize = 1 << 20
            thread.start()
        }
    }

    private var isClosing: Bool {
        stateLock.lock()
        defer { stateLock.unlock() }
        return closing
    }

    private func receiveLoop(from rank: Int, _ c: Connection) {
        do {
            while true {
                let message = try c.receive()
                guard case .replica(let block, let kindCode, let name, let index, let form, let bytes) = message else {
                    throw WireError.unexpectedMessage(expected: "replica", found: message.type.description)
                }
                if form == 3 { return }     // goodbye: the peer finished its range
                guard let kind = ReplicaKey.Kind(rawValue: kindCode) else {
                    throw WireError.malformed(message: "replica", field: "kind", detail: "is \(kindCode), not a kind of replica message")
                }
                let key = ReplicaKey(block: Int(block), kind: kind, name: name, index: Int(index))
                switch form {
                case 0: mailbox.deliver(key, .absent)
                case 1:
                    let (_, m) = try c.receiveTensor()
                    mailbox.deliver(key, .matrix(m))
                default: mailbox.deliver(key, .bytes(bytes))
                }
            }
        } catch {
            if !isClosing { mailbox.fail("replica \(rank): \(error)") }
        }
    }

    func send(_ key: ReplicaKey, _ value: ReplicaValue, to rank: Int) throws {
        if rank == role.rank {
            mailbox.deliver(key, value)
            return
        }
        guard let c = connections[rank], let lock = locks[rank] else { throw ReplicaError("no connection to replica \(rank)") }
        if let f = mailbox.failed { throw ReplicaError("replicas: \(f)") }
        lock.lock()
        defer { lock.unlock() }
        let head = { (form: UInt8, bytes: [UInt8]) in
            Message.replica(block: UInt32(key.block), kind: key.kind.rawValue, name: key.name, index: UInt32(key.index), form: form, bytes: bytes)
        }
        do {
            switch value {
            case .absent: try c.send(head(0, []))
            case .matrix(let m):
                try c.send(head(1, []))
                try c.sendTensor(m, name: key.name.isEmpty ? "replica" : key.name, stream: 0)
            case .bytes(let b): try c.send(head(2, b))
            }
        } catch {
            mailbox.fail("sending \(key) to replica \(rank): \(error)")
            throw ReplicaError("sending \(key) to replica \(rank): \(error)")
        }
    }

    func receive(_ key: ReplicaKey) throws -> ReplicaValue { try mailbox.take(key) }

    func fail(_ reason: String) {
        mailbox.fail(reason)
        stateLock.lock()
        closing = true
        stateLock.unlock()
        for c in connections.values { c.shutdownSocket() }
    }

    /// The range is done: says goodbye to every peer, waits for theirs, and closes.
    func close() {
        for (rank, c) in connections {
            locks[rank]!.lock()
            try? c.send(.replica(block: 0, kind: 0, name: "", index: 0, form: 3, bytes: []))
            locks[rank]!.unlock()
        }
        finished.wait()
        stateLock.lock()
        closing = true
        stateLock.unlock()
        for c in connections.values { c.shutdownSocket() }
    }
}

/// Connections other replicas opened to this worker, by group and rank, until a job of that group
/// takes them. The connection's serving thread waits until the job is done with it.
final class PeerRegistry: @unchecked Sendable {
    private let condition = NSCondition()
    private var waiting: [String: [Int: (Connection, DispatchSemaphore)]] = [:]

    /// Called on the connection's own thread; returns when the job has finished with it.
    func adopt(_ c: Connection, group: String, rank: Int, timeout: Double) {
        let released = DispatchSemaphore(value: 0)
        condition.lock()
        waiting[group, default: [:]][rank] = (c, released)
        condition.broadcast()
        condition.unlock()
        // A connection no job claims is dropped after `timeout`; a claimed one when released.
        if released.wait(timeout: .now() + timeout) == .timedOut {
            condition.lock()
            let unclaimed = waiting[group]?[rank] != nil
            if unclaimed { waiting[group]?[rank] = nil }
            condition.unlock()
            if !unclaimed { released.wait() }
        }
    }

    /// Waits until the replicas `ranks` of `group` have joined; returns their connections and a
    /// release for each serving thread.
    func claim(group: String, ranks: [Int], timeout: Double) throws -> [Int: (Connection, DispatchSemaphore)] {
        let deadline = Date().addingTimeInterval(timeout)
        condition.lock()
        defer { condition.unlock() }
        while true {
            let have = waiting[group] ?? [:]
            if ranks.allSatisfy({ have[$0] != nil }) {
                var out: [Int: (Connection, DispatchSemaphore)] = [:]
                for r in ranks { out[r] = have[r] }
                for r in ranks { waiting[group]?[r] = nil }
                if waiting[group]?.isEmpty ?? false { waiting[group] = nil }
                return out
            }
            guard condition.wait(until: deadline) else {
                let missing = ranks.filter { have[$0] == nil }
                throw ReplicaError("replica\(missing.count == 1 ? "" : "s") \(missing.map(String.init).joined(separator: ", ")) of group \(group) did not connect within \(Int(timeout)) s")
            }
        }
    }
}

extension WorkerService {
    /// Builds this worker's side of a replica mesh: dials every lower rank, waits for every
    /// higher one. The connections are authenticated with the cluster's secret.
    func joinMesh(_ spec: Assignment.ReplicaSpec, timeout: Double) throws -> (TCPReplicaExchange, () -> Void) {
        guard let secret = peerSecret else { throw ReplicaError("this worker has no secret to reach its replicas with") }
        var connections: [Int: Connection] = [:]
        var releases: [DispatchSemaphore] = []
        do {
            for rank in 0..<spec.rank {
                let endpoint = try Endpoint(parsing: spec.peers[rank])
                let deadline = Date().addingTimeInterval(timeout)
                var connection: Connection?
                var lastError: Error?
                while connection == nil && Date() < deadline {
                    do {
                        let c = try Connection.connect(to: endpoint, timeout: min(10, max(0.1, deadline.timeIntervalSinceNow)))
                        _ = try c.authenticate(secret: secret, name: "\(name) (replica \(spec.rank))", role: 1, within: 10)
                        try c.send(.peerJoin(group: spec.group, rank: UInt32(spec.rank)))
                        connection = c
                    } catch {
                        lastError = error
                        Thread.sleep(forTimeInterval: 0.2)
                    }
                }
                guard let c = connection else {
                    throw ReplicaError("cannot reach replica \(rank) at \(spec.peers[rank]) within \(Int(timeout)) s: \(lastError.map { "\($0)" } ?? "no attempt")")
                }
                connections[rank] = c
            }
            let higher = Array((spec.rank + 1)..<spec.count)
            for (rank, (c, release)) in try peers.claim(group: spec.group, ranks: higher, timeout: timeout) {
                connections[rank] = c
                releases.append(release)
            }
        } catch {
            for c in connections.values { c.close() }
            for r in releases { r.signal() }
            throw error
        }
        for c in connections.values {
            c.timeout = 24 * 3600      // a peer may be silent while it solves a large linear
            c.maxTensorBytes = maxPeerTensorBytes
        }
        let exchange = TCPReplicaExchange(role: spec.role, connections: connections)
        let dialed = Set(0..<spec.rank)
        return (exchange, {
            exchange.close()
            for (rank, c) in connections where dialed.contains(rank) { c.close() }
            for r in releases { r.signal() }
        })
    }
}
