import Foundation
import TopiaryModel
import TopiaryPrune
import TopiaryTensor

/// The worker side: serves assignments on an authenticated connection until shutdown. Several
/// connections may be served at once (each on its own thread); their jobs compute one at a time,
/// and a job that waits for its turn sends heartbeats meanwhile.
public final class WorkerService: @unchecked Sendable {
    public let name: String
    public let workDirectory: String
    private var models: [String: LanguageModel] = [:]
    private let lock = NSLock()
    private let computeLock = NSLock()
    /// Seconds to wait after each block (a testing aid), so that tests can kill a process in the
    /// middle of a run.
    public var blockDelay: Double = DebugHooks.blockDelay
    /// The cluster's secret, to reach the other replicas of a stage (set by `WorkerServer`).
    public var peerSecret: SharedSecret?
    /// Connections from other replicas, until their job claims them.
    let peers = PeerRegistry()
    /// The largest tensor another replica may send (a pruned weight, a layer's inputs).
    public var maxPeerTensorBytes = 4 << 30
    /// Seconds the replicas of a stage have to connect to one another.
    public var meshTimeout: Double = 120

    public init(name: String, workDirectory: String) {
        self.name = name
        self.workDirectory = workDirectory
    }

    func model(_ path: String, tokenizer: String?) throws -> LanguageModel {
        lock.lock()
        defer { lock.unlock() }
        if let m = models[path] { return m }
        let m = try LanguageModel.open(path: path, tokenizerPath: tokenizer)
        models[path] = m
        return m
    }

    /// A job checked and ready to receive its tensors.
    struct PreparedJob {
        let assignment: Assignment
        let model: LanguageModel
        let weightsSent: Bool
    }

    /// Checks a job in full before any of its tensors is read: every field, then the model it
    /// names (or the configuration it sends), the fields that depend on it, and the size of every
    /// tensor it announces against `maxTensorBytes` (the receiver's tensor limit, as f32).
    func prepare(_ json: [UInt8], tensors: UInt32, maxTensorBytes: Int) throws -> PreparedJob {
        let a = try Assignment.decode(json)
        try a.validateFields(announced: tensors)
        let model: LanguageModel
        if let config = a.config, a.weightTensors != nil {
            try validateSentConfig(config)
            // Weights arrive after the boundary; the model is filled in once they are here.
            model = LanguageModel(path: "(weights from the coordinator)", format: .huggingFace, config: config,
                                  weights: MemoryTensorSource(path: "(weights from the coordinator)", tensors: [:]), tokenizer: nil)
        } else {
            model = try self.model(a.modelPath, tokenizer: a.tokenizerPath)
        }
        let c = model.config
        try a.validate(against: c)
        let limit = maxTensorBytes / 4
        let window = a.sequenceLength.multipliedReportingOverflow(by: c.hiddenSize)
        guard !window.overflow, window.partialValue <= limit else {
            throw Assignment.bad("sequenceLength", "is \(a.sequenceLength): a window of \(a.sequenceLength)x\(c.hiddenSize) floats is over the tensor limit of \(maxTensorBytes) bytes")
        }
        if let announced = a.weightTensors {
            // Listed block by block, stopping once past the announced count: the work stays
            // bounded by what the job announced, however many blocks and experts its config claims.
            var expected = 0
            var block = a.blocks.lowerBound
            while block < a.blocks.upperBound && expected <= announced {
                let specs = c.family.blockTensors(c, block: block)
                for spec in specs {
                    let n = spec.rows.multipliedReportingOverflow(by: spec.cols)
                    guard !n.overflow, n.partialValue <= limit else {
                        throw Assignment.bad("config", "gives block tensor '\(spec.name)' \(spec.rows)x\(spec.cols) floats, over the tensor limit of \(maxTensorBytes) bytes")
                    }
                }
                expected += specs.count
                block += 1
            }
            guard announced == expected else {
                throw Assignment.bad("weightTensors", "is \(announced), expected \(block < a.blocks.upperBound ? "at least " : "")\(expected): the tensors of blocks \(a.blocks.lowerBound)-\(a.blocks.upperBound - 1)")
            }
        }
        return PreparedJob(assignment: a, model: model, weightsSent: a.config != nil)
    }

    /// A job checked in full, with the stores its windows go into and what its announced tensors
    /// must be.
    struct Intake {
        let prepared: PreparedJob
        let job: PruneJob
        var expect: AssignedTensors
        let inputs: ActivationStore
        let targets: ActivationStore?
    }

    func intake(_ json: [UInt8], tensors: UInt32, maxTensorBytes: Int) throws -> Intake {
        let p = try prepare(json, tensors: tensors, maxTensorBytes: maxTensorBytes)
        let job = p.assignment.job(workDirectory: workDirectory)
        let inputs = RangePruner.store(job: job, config: p.model.config)
        return Intake(prepared: p, job: job, expect: AssignedTensors(p.assignment, config: p.model.config, weightsSent: p.weightsSent),
                      inputs: inputs, targets: p.assignment.hasTargets ? inputs.makeSibling() : nil)
    }

    /// What the worker does with an assign message before it computes, without a connection:
    /// checks the job, then each of `headers` as if it arrived, then that none is missing.
    /// (topiary-fuzz's job target drives the worker's checks through this.)
    public func checkJob(_ json: [UInt8], tensors: UInt32, headers: [TensorAnnouncement], maxTensorBytes: Int = 4 << 30) throws {
        var i = try intake(json, tensors: tensors, maxTensorBytes: maxTensorBytes)
        for h in headers { _ = try i.expect.check(h) }
        try i.expect.checkComplete()
    }

    /// Handles messages until the coordinator says shutdown or the connection ends.
    public func serve(_ c: Connection) throws {
        while true {
            let message: Message
            do { message = try c.receive() } catch WireError.connection { return }
            switch message {
            case .assign(let jobJSON, let tensors):
                try runJob(jobJSON, tensors: tensors, on: c)
            case .heartbeat(let n):
                try c.send(.heartbeat(sequence: n))
            case .shutdown:
                return
            case .peerJoin(let group, let rank):
                // Another replica of a stage: its job will claim this connection.
                peers.adopt(c, group: group, rank: Int(rank), timeout: meshTimeout * 5)
                return
            case let other:
                throw WireError.unexpectedMessage(expected: "assign, heartbeat or shutdown", found: other.type.description)
            }
        }
    }

    /// One assign message: checks the job, receives its tensors (each checked against the job
    /// before it is allocated), runs it and sends the results. A job the worker cannot run
    /// (a field out of range, an unreadable model, a tensor that is not what the job announced)
    /// is answered with error(400) once the announced tensors are drained, and the worker goes
    /// on serving; only a tensor too large to drain, or a protocol error, closes the connection.
    func runJob(_ jobJSON: [UInt8], tensors: UInt32, on c: Connection) throws {
        var problem: Error?
        var intake: Intake?
        do { intake = try self.intake(jobJSON, tensors: tensors, maxTensorBytes: c.maxTensorBytes) } catch { problem = error }
        // A job whose largest block cannot fit this worker's memory is refused before its
        // tensors are kept (the coordinator fails the run with the reason, naming this worker).
        if let intake {
            let job = intake.job
            let need = MemoryCheck.need(intake.prepared.model.config, plan: job.plan, samples: job.calibration.count,
                                        sequenceLength: job.sequenceLength, budget: job.memoryBudget, backend: ComputeDevices.defaultBackend,
                                        replicas: intake.prepared.assignment.replica?.count ?? 1)
            switch MemoryCheck.check(need, method: job.plan.method, samples: job.calibration.count, sequenceLength: job.sequenceLength,
                                     who: "this worker") {
            case .fits: break
            case .near(let warning): FileHandle.standardError.write(Data("topiary worker \(name): warning: \(warning)\n".utf8))
            case .refused(let reason): problem = MemoryRefusal(description: reason)
            }
        }
        var weights: [String: Matrix] = [:]
        for _ in 0..<tensors {
            let t = try c.receiveTensorHeader()
            var kind: AssignedTensors.Kind?
            if problem == nil {
                do { kind = try intake!.expect.check(t) } catch { problem = error }
            }
            guard let kind else {
                guard t.byteCount / UInt64(t.dtype.size) * 4 <= UInt64(c.maxTensorBytes) else {
                    // Too large to drain sensibly: say why, and close.
                    let reason = WireError.malformed(message: "tensor-header", field: "shape",
                                                     detail: "\(t.shapeText) of '\(t.name)' is over the limit of \(c.maxTensorBytes) bytes")
                    try? c.send(.error(code: 400, message: "\(problem.map { "\($0)" } ?? "\(reason)")"))
                    throw reason
                }
                try c.skipTensorBody(t)
                continue
            }
            let m = try c.receiveTensorBody(t)
            switch kind {
            case .input(let s): try intake!.inputs.set(s, m)
            case .target(let s): try intake!.targets!.set(s, m)
            case .weight(let name):
                let spec = intake!.expect.weights[name]!
                weights[name] = m.rows == spec.rows ? m : m.reshaped(rows: spec.rows, cols: spec.cols)
            }
        }
        if problem == nil {
            do { try intake!.expect.checkComplete() } catch { problem = error }
        }
        guard problem == nil, let intake else {
            try c.send(.error(code: 400, message: "\(problem!)"))
            return
        }
        let (prepared, job, inputs, targets) = (intake.prepared, intake.job, intake.inputs, intake.targets)
        let a = prepared.assignment
        var model = prepared.model
        if prepared.weightsSent {
            model = LanguageModel(path: model.path, format: .huggingFace, config: model.config,
                                  weights: MemoryTensorSource(path: model.path, tensors: weights), tokenizer: nil)
        }
        // While it waits for its turn and computes, the worker says it is alive every interval;
        // the coordinator takes silence beyond its timeout as a lost worker. Sends are serialized.
        let sendLock = NSLock()
        // Replicas: the mesh first (the others are starting their share now).
        var mesh: (exchange: TCPReplicaExchange, close: () -> Void)?
        let role = a.role
        if let spec = a.replica, spec.count > 1 {
            do { mesh = try joinMesh(spec, timeout: meshTimeout) } catch {
                try c.send(.error(code: 500, message: "\(error)"))
                return
            }
        }
        let exchange = mesh?.exchange
        let heart = Heartbeat(connection: c, interval: a.heartbeatInterval ?? 5, lock: sendLock) {
            // The coordinator is gone: the other replicas must not wait for this one.
            exchange?.fail("\(self.name): the coordinator's connection is lost")
        }
        defer { heart.stop() }
        computeLock.lock()
        defer { computeLock.unlock() }
        do {
            let end = try RangePruner(model: model, job: job, exchange: exchange).run(a.blocks, from: Boundary(inputs: inputs, targets: targets)) { index, pruned, report in
                let encoder = JSONEncoder()
                encoder.outputFormatting = .sortedKeys
                let reportJSON = try report.map { Array(try encoder.encode($0)) } ?? []
                // A follower replica's blocks are replica 0's: it reports, without the weights.
                let names = role.rank == 0 ? pruned.map { $0.tensors.keys.sorted() } ?? [] : []
                sendLock.lock()
                do {
                    defer { sendLock.unlock() }
                    try c.send(.blockResult(block: UInt32(index), tensors: UInt32(names.count), report: reportJSON))
                    for (k, n) in names.enumerated() { try c.sendTensor(pruned!.tensors[n]!, name: n, stream: UInt32(k)) }
                }
                if blockDelay > 0 { Thread.sleep(forTimeInterval: blockDelay) }
            }
            mesh?.close()
            mesh = nil
            heart.stop()
            try c.send(.rangeDone(tensors: BoundaryTransfer.tensorCount(end, role: role)))
            try BoundaryTransfer.send(end, over: c, role: role)
        } catch let e as WireError {
            exchange?.fail("\(name): \(e)")
            mesh?.close()
            throw e
        } catch {
            exchange?.fail("\(name): \(error)")
            mesh?.close()
            heart.stop()
            try c.send(.error(code: 500, message: "\(error)"))
        }
    }
}

/// Sends heartbeats on a connection from a thread of its own until stopped.
final class Heartbeat: @unchecked Sendable {
    private let stopped = DispatchSemaphore(value: 0)
    private let exited = DispatchSemaphore(value: 0)
    private var isStopped = false

    init(connection: Connection, interval: Double, lock: NSLock, onFailure: @escaping @Sendable () -> Void = {}) {
        let stopped = stopped, exited = exited
        let thread = Thread {
            var sequence: UInt64 = 0
            while stopped.wait(timeout: .now() + interval) == .timedOut {
                lock.lock()
                let ok = (try? connection.send(.heartbeat(sequence: sequence))) != nil
                lock.unlock()
                if !ok { onFailure(); break }
                sequence += 1
            }
            exited.signal()
        }
        thread.start()
    }

    /// Stops the thread and waits for it (idempotent).
    func stop() {
        guard !isStopped else { return }
        isStopped = true
        stopped.signal()
        exited.wait()
    }
}

/// A job refused for the memory it would need (`MemoryCheck`).
struct MemoryRefusal: Error, CustomStringConvertible {
    let description: String
}
