import Foundation
import TopiaryModel
import TopiaryPrune
import TopiaryTensor

/// What a worker needs to run a range: the job without its calibration tokens (the worker gets
/// activations instead), and where the model is (shared filesystem).
struct Assignment: Codable {
    var modelPath: String
    var tokenizerPath: String?
    var plan: PrunePlan
    var sequenceLength: Int
    var samples: Int
    var layers: [Int]?
    var memoryBudget: Int
    var first: Int
    var end: Int
    var hasTargets: Bool
    var denseOnly: Bool
    /// Seconds between the worker's heartbeats while it computes (absent: 5).
    var heartbeatInterval: Double?
    /// With `--weights send`: the model's configuration, and how many of the announced tensors
    /// are the range's block weights (sent after the boundary); the worker opens no file.
    var config: ModelConfig?
    var weightTensors: Int?

    func job(workDirectory: String) -> PruneJob {
        // The worker never tokenizes; RangePruner needs only the number of windows.
        var job = PruneJob(plan: plan, calibration: Array(repeating: [], count: samples), sequenceLength: sequenceLength,
                           layers: layers.map { $0[0]...$0[1] }, memoryBudget: memoryBudget, workDirectory: workDirectory)
        job.denseOnly = denseOnly
        return job
    }
}

enum BoundaryTransfer {
    /// Sends a boundary: inputs/i for every window, then targets/i when present.
    static func send(_ b: Boundary, over c: Connection) throws {
        for s in 0..<b.inputs.count { try c.sendTensor(try b.inputs.get(s), name: "inputs/\(s)", stream: UInt32(s)) }
        if let t = b.targets {
            for s in 0..<t.count { try c.sendTensor(try t.get(s), name: "targets/\(s)", stream: UInt32(t.count + s)) }
        }
    }

    static func tensorCount(_ b: Boundary) -> UInt32 { UInt32(b.inputs.count + (b.targets?.count ?? 0)) }

    /// Receives `count` boundary tensors into stores shaped like `like`.
    static func receive(_ count: Int, over c: Connection, samples: Int, make: () -> ActivationStore) throws -> Boundary {
        let inputs = make()
        var targets: ActivationStore?
        for _ in 0..<count {
            let (name, m) = try c.receiveTensor()
            let parts = name.split(separator: "/")
            guard parts.count == 2, let s = Int(parts[1]), s >= 0, s < samples, parts[0] == "inputs" || parts[0] == "targets" else {
                throw WireError.malformed(message: "tensor-header", field: "name", detail: "is '\(name)', expected inputs/N or targets/N with N < \(samples)")
            }
            guard m.rows == inputs.rows, m.cols == inputs.cols else {
                throw WireError.malformed(message: "tensor-header", field: "shape", detail: "of '\(name)' is \(m.rows)x\(m.cols), expected \(inputs.rows)x\(inputs.cols)")
            }
            if parts[0] == "inputs" {
                try inputs.set(s, m)
            } else {
                if targets == nil { targets = make() }
                try targets!.set(s, m)
            }
        }
        return Boundary(inputs: inputs, targets: targets)
    }
}

/// A job that failed on a worker (the worker is alive and said why): not a lost worker.
public struct WorkerJobError: Error, CustomStringConvertible {
    public let worker: String
    public let message: String
    public var description: String { "worker \(worker): \(message)" }
}

/// A worker process reached over TCP.
public final class RemoteWorker: WorkerLink {
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

    private var pending: PruneJob?
    public var isRemote: Bool { true }
    /// Seconds between the worker's heartbeats; the connection's timeout decides when silence means lost.
    public var heartbeatInterval: Double = 5
    /// Send the range's weights with each assignment instead of letting the worker read the model.
    public var sendsWeights = false
    private let model: LanguageModel

    public func abandon() { connection.close() }

    public func start(_ range: Range<Int>, job: PruneJob, from boundary: Boundary) throws {
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
            samples: job.samples, layers: job.layers.map { [$0.lowerBound, $0.upperBound] }, memoryBudget: job.memoryBudget,
            first: range.lowerBound, end: range.upperBound, hasTargets: boundary.targets != nil, denseOnly: job.denseOnly,
            heartbeatInterval: heartbeatInterval)
        if sendsWeights {
            assignment.config = config
            assignment.weightTensors = weights.count
        }
        let encoder = JSONEncoder()
        encoder.outputFormatting = .sortedKeys
        try connection.send(.assign(job: Array(try encoder.encode(assignment)), tensors: BoundaryTransfer.tensorCount(boundary) + UInt32(weights.count)))
        try BoundaryTransfer.send(boundary, over: connection)
        for (k, (name, m)) in weights.enumerated() { try connection.sendTensor(m, name: name, stream: UInt32(k)) }
        pending = job
    }

    public func finish(onBlock: (Int, DecoderBlock?, BlockReport?) throws -> Void) throws -> Boundary {
        guard let job = pending else { preconditionFailure("finish without start") }
        pending = nil
        while true {
            switch try connection.receive() {
            case .blockResult(let index, let tensors, let reportJSON):
                let report = reportJSON.isEmpty ? nil : try JSONDecoder().decode(BlockReport.self, from: Data(reportJSON))
                var weights: [String: Matrix] = [:]
                for _ in 0..<tensors {
                    let (name, m) = try connection.receiveTensor()
                    weights[name] = m
                }
                let block = tensors > 0 ? DecoderBlock(config: config, index: Int(index), tensors: weights) : nil
                try onBlock(Int(index), block, report)
            case .rangeDone(let tensors):
                return try BoundaryTransfer.receive(Int(tensors), over: connection, samples: job.samples) {
                    RangePruner.store(job: job, config: config)
                }
            case .heartbeat:
                continue
            case .error(_, let text):
                throw WorkerJobError(worker: name, message: text)
            case let other:
                throw WireError.unexpectedMessage(expected: "block-result or range-done", found: other.type.description)
            }
        }
    }

    public func shutdown() {
        try? connection.send(.shutdown)
        connection.close()
    }
}

/// The worker side: serves assignments on an authenticated connection until shutdown.
public final class WorkerService: @unchecked Sendable {
    public let name: String
    public let workDirectory: String
    private var models: [String: LanguageModel] = [:]
    private let lock = NSLock()
    /// Seconds to wait after each block (a testing aid), so that tests can kill a process in the
    /// middle of a run.
    public var blockDelay: Double = DebugHooks.blockDelay

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

    /// Handles messages until the coordinator says shutdown or the connection ends.
    public func serve(_ c: Connection) throws {
        while true {
            let message: Message
            do { message = try c.receive() } catch WireError.connection { return }
            switch message {
            case .assign(let jobJSON, let tensors):
                // A job the worker cannot run (bad JSON, unreadable model, a range outside it) is
                // answered with an error after the announced tensors are drained, and the worker
                // goes on serving; a protocol error closes the connection.
                var prepared: (Assignment, LanguageModel)?
                var jobError: Error?
                do {
                    let a = try JSONDecoder().decode(Assignment.self, from: Data(jobJSON))
                    let weightCount = a.weightTensors ?? 0
                    guard weightCount >= 0, weightCount <= Int(tensors) else {
                        throw WireError.malformed(message: "assign", field: "weightTensors", detail: "is \(weightCount), more than the \(tensors) tensors announced")
                    }
                    let model: LanguageModel
                    if let config = a.config, a.weightTensors != nil {
                        // Weights arrive after the boundary; the model is filled in below.
                        model = LanguageModel(path: "(weights from the coordinator)", format: .huggingFace, config: config,
                                              weights: MemoryTensorSource(path: "(weights from the coordinator)", tensors: [:]), tokenizer: nil)
                    } else {
                        model = try self.model(a.modelPath, tokenizer: a.tokenizerPath)
                    }
                    guard a.first >= 0, a.end <= model.config.layerCount, a.first < a.end else {
                        throw WireError.malformed(message: "assign", field: "range", detail: "\(a.first)..<\(a.end) is outside the model's \(model.config.layerCount) blocks")
                    }
                    prepared = (a, model)
                } catch {
                    jobError = error
                }
                guard let (a, openedModel) = prepared else {
                    for _ in 0..<tensors { _ = try c.receiveTensor() }
                    try c.send(.error(code: 400, message: "\(jobError!)"))
                    continue
                }
                let job = a.job(workDirectory: workDirectory)
                let weightCount = a.weightTensors ?? 0
                let start = try BoundaryTransfer.receive(Int(tensors) - weightCount, over: c, samples: a.samples) {
                    RangePruner.store(job: job, config: openedModel.config)
                }
                var model = openedModel
                if weightCount > 0 {
                    var received: [String: Matrix] = [:]
                    for _ in 0..<weightCount {
                        let (name, m) = try c.receiveTensor()
                        received[name] = m
                    }
                    model = LanguageModel(path: model.path, format: .huggingFace, config: model.config,
                                          weights: MemoryTensorSource(path: model.path, tensors: received), tokenizer: nil)
                }
                // While it computes, the worker says it is alive every interval; the coordinator
                // takes silence beyond its timeout as a lost worker. Sends are serialized.
                let sendLock = NSLock()
                let heart = Heartbeat(connection: c, interval: a.heartbeatInterval ?? 5, lock: sendLock)
                defer { heart.stop() }
                do {
                    let end = try RangePruner(model: model, job: job).run(a.first..<a.end, from: start) { index, pruned, report in
                        let encoder = JSONEncoder()
                        encoder.outputFormatting = .sortedKeys
                        let reportJSON = try report.map { Array(try encoder.encode($0)) } ?? []
                        let names = pruned.map { $0.tensors.keys.sorted() } ?? []
                        sendLock.lock()
                        do {
                            defer { sendLock.unlock() }
                            try c.send(.blockResult(block: UInt32(index), tensors: UInt32(names.count), report: reportJSON))
                            for (k, n) in names.enumerated() { try c.sendTensor(pruned!.tensors[n]!, name: n, stream: UInt32(k)) }
                        }
                        if blockDelay > 0 { Thread.sleep(forTimeInterval: blockDelay) }
                    }
                    heart.stop()
                    try c.send(.rangeDone(tensors: BoundaryTransfer.tensorCount(end)))
                    try BoundaryTransfer.send(end, over: c)
                } catch let e as WireError {
                    throw e
                } catch {
                    heart.stop()
                    try c.send(.error(code: 500, message: "\(error)"))
                }
            case .heartbeat(let n):
                try c.send(.heartbeat(sequence: n))
            case .shutdown:
                return
            case let other:
                throw WireError.unexpectedMessage(expected: "assign, heartbeat or shutdown", found: other.type.description)
            }
        }
    }
}

/// Sends heartbeats on a connection from a thread of its own until stopped.
final class Heartbeat: @unchecked Sendable {
    private let stopped = DispatchSemaphore(value: 0)
    private let exited = DispatchSemaphore(value: 0)
    private var isStopped = false

    init(connection: Connection, interval: Double, lock: NSLock) {
        let stopped = stopped, exited = exited
        let thread = Thread {
            var sequence: UInt64 = 0
            while stopped.wait(timeout: .now() + interval) == .timedOut {
                lock.lock()
                let ok = (try? connection.send(.heartbeat(sequence: sequence))) != nil
                lock.unlock()
                if !ok { break }
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
