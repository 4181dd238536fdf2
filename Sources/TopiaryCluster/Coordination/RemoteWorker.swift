import Foundation
import TopiaryModel
import TopiaryPrune
import TopiaryTensor

/// A job that failed on a worker (the worker is alive and said why): not a lost worker.
public struct WorkerJobError: Error, CustomStringConvertible {
    public let worker: String
    public let message: String
    public var description: String { "worker \(worker): \(message)" }
}

/// A worker process reached over TCP.
public final class RemoteWorker: ReplicaMember {
    public let connection: Connection
    public let name: String
    let modelPath: String
    let tokenizerPath: String?
    let config: ModelConfig

    public init(connection: Connection, name: String, model: LanguageModel, tokenizerPath: String?) {
        self.connection = connection
        self.name = name
        self.modelPath = model.path
        self.tokenizerPath = tokenizerPath
        self.config = model.config
        self.model = model
    }

    private var pending: (job: PruneJob, range: Range<Int>, hasTargets: Bool, role: ReplicaRole)?
    /// Where the worker listens (HOST:PORT): the other replicas of its stage connect there.
    public var address: String = ""
    public var replicaAddress: String { address }
    public var isRemote: Bool { true }
    /// Seconds between the worker's heartbeats; the connection's timeout decides when silence means lost.
    public var heartbeatInterval: Double = 5
    /// Send the range's weights with each assignment instead of letting the worker read the model.
    public var sendsWeights = false
    private let model: LanguageModel

    public func abandon() { connection.close() }

    /// The worker as errors name it.
    var peerText: String { name.hasPrefix("worker") ? name : "worker \(name)" }

    /// Runs `body`, naming this worker and `phase` in any wire error (timeouts included).
    func phase<T>(_ phase: @autoclosure () -> String, _ body: () throws -> T) throws -> T {
        do { return try body() } catch let e as WireError {
            if case .during = e { throw e }
            throw WireError.during(peer: peerText, phase: phase(), e)
        }
    }

    static func blocksText(_ r: Range<Int>) -> String { r.count == 1 ? "block \(r.lowerBound)" : "blocks \(r.lowerBound)-\(r.upperBound - 1)" }

    public func start(_ range: Range<Int>, job: PruneJob, from boundary: Boundary) throws {
        try start(range, job: job, from: boundary, replica: nil)
    }

    public func startReplica(_ range: Range<Int>, job: PruneJob, from boundary: Boundary, role: ReplicaRole, mesh: ReplicaMesh) throws {
        try start(range, job: job, from: boundary,
                  replica: Assignment.ReplicaSpec(rank: role.rank, count: role.count, group: mesh.group, peers: mesh.addresses))
    }

    func start(_ range: Range<Int>, job: PruneJob, from boundary: Boundary, replica: Assignment.ReplicaSpec?) throws {
        let role = replica?.role ?? .single
        // Weights to send: every block of the range (dense, as in the checkpoint), in name order.
        var weights: [(String, Matrix)] = []
        if sendsWeights {
            for i in range {
                let block = try model.loadBlock(i)
                for name in block.tensors.keys.sorted() { weights.append((name, block.tensors[name]!)) }
            }
        }
        var assignment = Assignment(
            modelPath: sendsWeights ? "" : modelPath, tokenizerPath: sendsWeights ? nil : tokenizerPath, plan: job.plan, sequenceLength: job.sequenceLength,
            samples: job.samples, layers: job.layers, memoryBudget: job.memoryBudget,
            blocks: range, hasTargets: boundary.targets != nil, denseOnly: job.denseOnly,
            heartbeatInterval: heartbeatInterval)
        if sendsWeights {
            assignment.config = config
            assignment.weightTensors = weights.count
        }
        assignment.replica = replica
        let encoder = JSONEncoder()
        encoder.outputFormatting = .sortedKeys
        let json = Array(try encoder.encode(assignment))
        try phase("assignment of \(Self.blocksText(range))") {
            try connection.send(.assign(job: json, tensors: BoundaryTransfer.tensorCount(boundary, role: role) + UInt32(weights.count)))
            try BoundaryTransfer.send(boundary, over: connection, role: role)
            for (k, (name, m)) in weights.enumerated() { try connection.sendTensor(m, name: name, stream: UInt32(k)) }
        }
        pending = (job, range, boundary.targets != nil, role)
    }

    /// Receives block `index`'s tensors: exactly the block's tensors as its model family defines
    /// them (names and shapes), each header checked before the tensor is allocated. A missing,
    /// extra, repeated or mis-shaped tensor is refused; nothing falls back to the dense weights.
    func receiveBlock(_ index: Int, tensors: UInt32) throws -> DecoderBlock {
        let specs = config.family.blockTensors(config, block: index)
        guard Int(tensors) == specs.count else {
            throw WireError.malformed(message: "block-result", field: "tensors",
                                      detail: "is \(tensors) for block \(index), expected its \(specs.count) tensors")
        }
        var expect = AssignedTensors(samples: 0, hasTargets: false, rows: 0, cols: 0, weights: specs)
        var weights: [String: Matrix] = [:]
        for _ in 0..<tensors {
            var (name, m) = try connection.receiveTensor { _ = try expect.check($0) }
            let spec = expect.weights[name]!
            if m.rows != spec.rows { m = m.reshaped(rows: spec.rows, cols: spec.cols) }
            weights[name] = m
        }
        try expect.checkComplete()
        return DecoderBlock(config: config, index: index, tensors: weights)
    }

    public func finish(onBlock: (Int, DecoderBlock?, BlockReport?) throws -> Void) throws -> Boundary {
        guard let (job, range, hasTargets, role) = pending else { preconditionFailure("finish without start") }
        // A follower replica reports each block without its weights (they are replica 0's).
        let follower = role.rank != 0
        pending = nil
        // Blocks arrive in order, each exactly once.
        var next = range.lowerBound
        while true {
            let message = try phase(next < range.upperBound ? "computing block \(next) (waiting for its result or a heartbeat)"
                                                            : "waiting for the end of \(Self.blocksText(range))") {
                try connection.receive()
            }
            switch message {
            case .blockResult(let raw, let tensors, let reportJSON):
                let index = Int(raw)
                let (block, report) = try phase("transfer of block \(index)") { () throws -> (DecoderBlock?, BlockReport?) in
                    guard index == next, range.contains(index) else {
                        throw WireError.malformed(message: "block-result", field: "block",
                                                  detail: "is \(index), expected \(next < range.upperBound ? "\(next)" : "none (all of \(Self.blocksText(range)) arrived)")")
                    }
                    let prunes = job.prunes(index)
                    var report: BlockReport?
                    if !reportJSON.isEmpty {
                        do { report = try JSONDecoder().decode(BlockReport.self, from: Data(reportJSON)) } catch {
                            throw WireError.malformed(message: "block-result", field: "report", detail: "of block \(index) is not a block report: \(error)")
                        }
                        guard report!.block == index else {
                            throw WireError.malformed(message: "block-result", field: "report", detail: "is block \(report!.block)'s, expected block \(index)'s")
                        }
                    }
                    guard prunes == (report != nil), (prunes && !follower) == (tensors > 0) else {
                        throw WireError.malformed(message: "block-result", field: "tensors",
                                                  detail: "block \(index) \(prunes ? "is pruned: expected its report and tensors" : "is only run: expected no report and no tensors"), found \(report == nil ? "no report" : "a report") and \(tensors) tensors")
                    }
                    return (prunes && !follower ? try receiveBlock(index, tensors: tensors) : nil, report)
                }
                next += 1
                try onBlock(index, block, report)
            case .rangeDone(let tensors):
                return try phase("transfer of the boundary after \(Self.blocksText(range))") {
                    guard next == range.upperBound else {
                        throw WireError.malformed(message: "range-done", field: "block", detail: "arrived after block \(next - 1), before the range's last block \(range.upperBound - 1)")
                    }
                    return try BoundaryTransfer.receive(Int(tensors), over: connection, samples: job.samples, hasTargets: hasTargets, role: role) {
                        RangePruner.store(job: job, config: config)
                    }
                }
            case .heartbeat:
                continue
            case .error(_, let text):
                throw WorkerJobError(worker: name, message: text)
            case let other:
                throw WireError.during(peer: peerText, phase: "computing \(Self.blocksText(range))",
                                       .unexpectedMessage(expected: "block-result or range-done", found: other.type.description))
            }
        }
    }

    public func shutdown() {
        connection.timeout = min(connection.timeout, 2)
        try? connection.send(.shutdown)
        connection.close()
    }
}

