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

/// Bounds on what a job may ask of a worker, so that no field a peer sends can make the worker
/// trap or allocate without limit (docs/protocol.md, "What a worker checks").
enum AssignmentLimits {
    static let maxSamples = 1 << 20
    static let maxSequenceLength = 1 << 20
    static let maxHeartbeatInterval = 3600.0
    /// SparseGPT's block size: it allocates blockSize² floats.
    static let maxBlockSize = 1 << 14
    /// M of an N:M pattern.
    static let maxGroup = 1 << 20
    static let maxIterations = 100_000
    /// Block tensors sent with one job: the worker lists them all before the first arrives
    /// (Qwen3-MoE-235B's 94 blocks of 128 experts have some 37,000).
    static let maxWeightTensors = 1 << 18
}

extension Assignment {
    static func bad(_ field: String, _ detail: String) -> WireError { .malformed(message: "assign", field: field, detail: detail) }

    /// Decodes a job, refusing JSON that is not one.
    static func decode(_ json: [UInt8]) throws -> Assignment {
        do { return try JSONDecoder().decode(Assignment.self, from: Data(json)) } catch {
            throw bad("job", "is not a valid job: \(error)")
        }
    }

    /// Boundary tensors per window: inputs, and targets when they travel.
    var tensorsPerWindow: Int { hasTargets ? 2 : 1 }

    /// Checks every field that does not depend on the model, before anything is allocated or
    /// read for the job; `tensors` is the count the assign message announced.
    func validateFields(announced tensors: UInt32) throws {
        let L = AssignmentLimits.self
        guard (1...L.maxSamples).contains(samples) else { throw Self.bad("samples", "is \(samples), expected 1...\(L.maxSamples)") }
        guard (1...L.maxSequenceLength).contains(sequenceLength) else {
            throw Self.bad("sequenceLength", "is \(sequenceLength), expected 1...\(L.maxSequenceLength)")
        }
        if let layers {
            guard layers.count == 2, layers[0] >= 0, layers[0] <= layers[1] else {
                throw Self.bad("layers", "is \(layers), expected [first, last] with 0 <= first <= last")
            }
        }
        guard memoryBudget >= 0 else { throw Self.bad("memoryBudget", "is \(memoryBudget), expected a non-negative number of bytes") }
        guard first >= 0, end > first else { throw Self.bad("range", "\(first)..<\(end) is not a range of blocks (expected 0 <= first < end)") }
        if let h = heartbeatInterval {
            guard h.isFinite, h > 0, h <= L.maxHeartbeatInterval else {
                throw Self.bad("heartbeatInterval", "is \(h), expected more than 0 and at most \(Int(L.maxHeartbeatInterval)) seconds")
            }
        }
        guard (config == nil) == (weightTensors == nil) else {
            throw Self.bad("weightTensors", "and 'config' come together (weights sent with the job) or not at all")
        }
        let weights = weightTensors ?? 0
        guard weights >= 0, weights <= Int(tensors), weights <= L.maxWeightTensors else {
            throw Self.bad("weightTensors", "is \(weights), expected 0...\(min(Int(tensors), L.maxWeightTensors)) (the tensors announced, at most \(L.maxWeightTensors))")
        }
        let expected = samples * tensorsPerWindow + weights
        guard expected == Int(tensors) else {
            throw Self.bad("tensors", "announces \(tensors) tensors, expected \(expected) (\(samples) windows x \(tensorsPerWindow) + \(weights) weights)")
        }
        try validatePlan()
    }

    /// The pruning plan's numbers: in range, finite, and small enough to allocate for.
    func validatePlan() throws {
        let L = AssignmentLimits.self
        func check(_ ok: Bool, _ field: String, _ detail: String) throws { if !ok { throw Self.bad("plan." + field, detail) } }
        switch plan.pattern {
        case .unstructured(let s):
            try check(s.isFinite && s > 0 && s < 1, "pattern", "is sparsity \(s), expected strictly between 0 and 1")
        case .nOfM(let n, let m):
            try check(n > 0 && n < m && m <= L.maxGroup, "pattern", "is \(n):\(m), expected N:M with 0 < N < M <= \(L.maxGroup)")
            try check(plan.method != .besa, "pattern", "is \(n):\(m); besa learns unstructured sparsity")
        }
        let g = plan.sparseGPT
        try check((1...L.maxBlockSize).contains(g.blockSize), "sparseGPT.blockSize", "is \(g.blockSize), expected 1...\(L.maxBlockSize)")
        try check(g.percentDamp.isFinite && g.percentDamp >= 0, "sparseGPT.percentDamp", "is \(g.percentDamp), expected a non-negative number")
        if let o = plan.sparseLLM {
            for (name, v) in [("alpha", o.alpha), ("beta", o.beta), ("gamma", o.gamma)] {
                try check(v.isFinite && v > 0, "sparseLLM." + name, "is \(v), expected a positive number")
            }
            try check((1...L.maxIterations).contains(o.iterations), "sparseLLM.iterations", "is \(o.iterations), expected 1...\(L.maxIterations)")
            try check(o.ridge.isFinite && o.ridge >= 0, "sparseLLM.ridge", "is \(o.ridge), expected a non-negative number")
            try check((0...L.maxIterations).contains(o.newtonSteps), "sparseLLM.newtonSteps", "is \(o.newtonSteps), expected 0...\(L.maxIterations)")
        }
        if let b = plan.besa {
            try check((1...L.maxIterations).contains(b.epochs), "besa.epochs", "is \(b.epochs), expected 1...\(L.maxIterations)")
            try check(b.learningRate.isFinite && b.learningRate > 0, "besa.learningRate", "is \(b.learningRate), expected a positive number")
            try check(b.penalty.isFinite && b.penalty >= 0, "besa.penalty", "is \(b.penalty), expected a non-negative number")
        }
    }

    /// Checks the fields that depend on the model the job runs on.
    func validate(against c: ModelConfig) throws {
        guard end <= c.layerCount else {
            throw Self.bad("range", "\(first)..<\(end) is outside the model's \(c.layerCount) blocks")
        }
        guard sequenceLength <= c.maxPositions else {
            throw Self.bad("sequenceLength", "is \(sequenceLength), longer than the model's context of \(c.maxPositions)")
        }
        if let layers, layers[1] >= c.layerCount {
            throw Self.bad("layers", "is \(layers), past the model's \(c.layerCount) blocks (0-\(c.layerCount - 1))")
        }
    }
}

/// A configuration sent with the job (`--weights send`): the checks of a config.json, and
/// sizes bounded so that the tensors it implies can be allocated.
func validateSentConfig(_ c: ModelConfig) throws {
    try c.validate(path: "assign message, field 'config'")
    let bounds: [(String, Int, Int)] = [
        ("hiddenSize", c.hiddenSize, 1 << 16), ("intermediateSize", c.intermediateSize, 1 << 18),
        ("layerCount", c.layerCount, 1 << 12), ("headCount", c.headCount, 1 << 12), ("kvHeadCount", c.kvHeadCount, 1 << 12),
        ("headDim", c.headDim, 1 << 12), ("vocabularySize", c.vocabularySize, 1 << 24), ("maxPositions", c.maxPositions, 1 << 24),
        ("expertCount", c.expertCount, 1 << 10), ("wordEmbedProjDim", c.wordEmbedProjDim, 1 << 16),
    ]
    for (field, value, limit) in bounds where value < 0 || value > limit {
        throw WireError.malformed(message: "assign", field: "config." + field, detail: "is \(value), expected at most \(limit)")
    }
}

/// What the tensors following an assign message must be: exactly inputs/0..n-1 (and
/// targets/0..n-1 when they travel) of shape [sequenceLength, hidden], then, with weights sent,
/// exactly the range's block tensors (the model family's names and shapes). Each header is
/// checked before anything is allocated for it.
struct AssignedTensors {
    enum Kind { case input(Int), target(Int), weight(String) }
    let samples: Int
    let hasTargets: Bool
    let rows: Int
    let cols: Int
    var weights: [String: BlockTensorSpec]
    var seenInputs = Set<Int>()
    var seenTargets = Set<Int>()
    var seenWeights = Set<String>()

    init(samples: Int, hasTargets: Bool, rows: Int, cols: Int, weights: [BlockTensorSpec] = []) {
        self.samples = samples
        self.hasTargets = hasTargets
        self.rows = rows
        self.cols = cols
        self.weights = Dictionary(weights.map { ($0.name, $0) }) { a, _ in a }
    }

    /// The tensors of job `a` on a model with configuration `config`.
    init(_ a: Assignment, config: ModelConfig, weightsSent: Bool) {
        let specs = weightsSent ? (a.first..<a.end).flatMap { config.family.blockTensors(config, block: $0) } : []
        self.init(samples: a.samples, hasTargets: a.hasTargets, rows: a.sequenceLength, cols: config.hiddenSize, weights: specs)
    }

    static func bad(_ detail: String) -> WireError { .malformed(message: "tensor-header", field: "name", detail: detail) }

    /// Checks one announced tensor and records it.
    mutating func check(_ t: TensorAnnouncement) throws -> Kind {
        if let spec = weights[t.name] {
            guard seenWeights.insert(t.name).inserted else { throw Self.bad("'\(t.name)' arrived twice") }
            guard t.shape == [spec.rows, spec.cols] || (spec.isVector && t.shape == [spec.cols]) else {
                throw WireError.malformed(message: "tensor-header", field: "shape",
                                          detail: "of '\(t.name)' is \(t.shapeText), expected \(spec.rows)x\(spec.cols)")
            }
            return .weight(t.name)
        }
        if samples == 0 { throw Self.bad("'\(t.name)' is not one of the block's tensors") }
        let parts = t.name.split(separator: "/", omittingEmptySubsequences: false)
        guard parts.count == 2, parts[0] == "inputs" || (parts[0] == "targets" && hasTargets),
              let s = Int(parts[1]), String(s) == parts[1], s >= 0, s < samples else {
            throw Self.bad("is '\(t.name)', expected inputs/N\(hasTargets ? " or targets/N" : "") with N < \(samples)\(weights.isEmpty ? "" : ", or a tensor of the range's blocks")")
        }
        guard t.shape == [rows, cols] else {
            throw WireError.malformed(message: "tensor-header", field: "shape", detail: "of '\(t.name)' is \(t.shapeText), expected \(rows)x\(cols)")
        }
        if parts[0] == "inputs" {
            guard seenInputs.insert(s).inserted else { throw Self.bad("'\(t.name)' arrived twice") }
            return .input(s)
        }
        guard seenTargets.insert(s).inserted else { throw Self.bad("'\(t.name)' arrived twice") }
        return .target(s)
    }

    /// After the last tensor: nothing is missing.
    func checkComplete() throws {
        if seenInputs.count != samples { throw Self.bad("inputs/\((0..<samples).first { !seenInputs.contains($0) }!) is missing") }
        if hasTargets && seenTargets.count != samples { throw Self.bad("targets/\((0..<samples).first { !seenTargets.contains($0) }!) is missing") }
        if let missing = weights.keys.sorted().first(where: { !seenWeights.contains($0) }) { throw Self.bad("block tensor '\(missing)' is missing") }
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

    /// Receives a boundary of exactly `samples` windows (and as many targets when `hasTargets`),
    /// each [rows x cols] like the stores `make` gives; any other name, shape, count, a
    /// duplicate or a missing window is refused before the tensor is allocated.
    static func receive(_ count: Int, over c: Connection, samples: Int, hasTargets: Bool, make: () -> ActivationStore) throws -> Boundary {
        let inputs = make()
        let targets: ActivationStore? = hasTargets ? make() : nil
        let expected = samples * (hasTargets ? 2 : 1)
        guard count == expected else {
            throw WireError.malformed(message: "range-done", field: "tensors", detail: "is \(count), expected \(expected) (\(samples) windows\(hasTargets ? " x 2 with targets" : ""))")
        }
        var expect = AssignedTensors(samples: samples, hasTargets: hasTargets, rows: inputs.rows, cols: inputs.cols)
        for _ in 0..<count {
            var kind: AssignedTensors.Kind = .input(0)
            let (_, m) = try c.receiveTensor { kind = try expect.check($0) }
            switch kind {
            case .input(let s): try inputs.set(s, m)
            case .target(let s): try targets!.set(s, m)
            case .weight: break
            }
        }
        try expect.checkComplete()
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

    private var pending: (job: PruneJob, range: Range<Int>, hasTargets: Bool)?
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
        let json = Array(try encoder.encode(assignment))
        try phase("assignment of \(Self.blocksText(range))") {
            try connection.send(.assign(job: json, tensors: BoundaryTransfer.tensorCount(boundary) + UInt32(weights.count)))
            try BoundaryTransfer.send(boundary, over: connection)
            for (k, (name, m)) in weights.enumerated() { try connection.sendTensor(m, name: name, stream: UInt32(k)) }
        }
        pending = (job, range, boundary.targets != nil)
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
        guard let (job, range, hasTargets) = pending else { preconditionFailure("finish without start") }
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
                    guard prunes == (report != nil), prunes == (tensors > 0) else {
                        throw WireError.malformed(message: "block-result", field: "tensors",
                                                  detail: "block \(index) \(prunes ? "is pruned: expected its report and tensors" : "is only run: expected no report and no tensors"), found \(report == nil ? "no report" : "a report") and \(tensors) tensors")
                    }
                    return (prunes ? try receiveBlock(index, tensors: tensors) : nil, report)
                }
                next += 1
                try onBlock(index, block, report)
            case .rangeDone(let tensors):
                return try phase("transfer of the boundary after \(Self.blocksText(range))") {
                    guard next == range.upperBound else {
                        throw WireError.malformed(message: "range-done", field: "block", detail: "arrived after block \(next - 1), before the range's last block \(range.upperBound - 1)")
                    }
                    return try BoundaryTransfer.receive(Int(tensors), over: connection, samples: job.samples, hasTargets: hasTargets) {
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
            var block = a.first
            while block < a.end && expected <= announced {
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
                throw Assignment.bad("weightTensors", "is \(announced), expected \(block < a.end ? "at least " : "")\(expected): the tensors of blocks \(a.first)-\(a.end - 1)")
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
        let heart = Heartbeat(connection: c, interval: a.heartbeatInterval ?? 5, lock: sendLock)
        defer { heart.stop() }
        computeLock.lock()
        defer { computeLock.unlock() }
        do {
            let end = try RangePruner(model: model, job: job).run(a.first..<a.end, from: Boundary(inputs: inputs, targets: targets)) { index, pruned, report in
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
