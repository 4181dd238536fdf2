import Foundation
import TopiaryModel
import TopiaryPrune
import TopiaryTensor

/// What a worker needs to run a range: the job without its calibration tokens (the worker gets
/// activations instead), and where the model is (shared filesystem). The body of an assign
/// message, as JSON (docs/protocol.md).
///
/// Its block range and layer range are ranges, not numbers: one decoded from the wire is checked
/// as it is decoded (an error naming the field `range` or `layers`), so no later use can trap.
struct Assignment: Codable {
    var modelPath: String
    var tokenizerPath: String?
    var plan: PrunePlan
    var sequenceLength: Int
    var samples: Int
    /// The blocks pruned (`--layers`); nil: all. On the wire `"layers": [first, last]`.
    var layers: ClosedRange<Int>?
    var memoryBudget: Int
    /// The blocks this job runs, never empty. On the wire `"first"` and `"end"` (exclusive).
    var blocks: Range<Int>
    var hasTargets: Bool
    var denseOnly: Bool
    /// Seconds between the worker's heartbeats while it computes (absent: 5).
    var heartbeatInterval: Double?
    /// With `--weights send`: the model's configuration, and how many of the announced tensors
    /// are the range's block weights (sent after the boundary); the worker opens no file.
    var config: ModelConfig?
    var weightTensors: Int?
    /// `--replicas`: this worker's place in its stage, and where the other replicas listen.
    /// Only this replica's windows travel (its contiguous range, `ReplicaRole.samples`), and come back.
    var replica: ReplicaSpec?

    struct ReplicaSpec: Codable, Equatable {
        var rank: Int
        var count: Int
        /// Names the group, so that no replica mixes two groups' messages.
        var group: String
        /// Each replica's HOST:PORT, in rank order.
        var peers: [String]
        var role: ReplicaRole { ReplicaRole(rank: rank, count: count) }
    }

    /// This worker's windows.
    var role: ReplicaRole { replica?.role ?? .single }

    init(modelPath: String, tokenizerPath: String?, plan: PrunePlan, sequenceLength: Int, samples: Int, layers: ClosedRange<Int>?,
         memoryBudget: Int, blocks: Range<Int>, hasTargets: Bool, denseOnly: Bool, heartbeatInterval: Double?,
         config: ModelConfig? = nil, weightTensors: Int? = nil) {
        self.modelPath = modelPath
        self.tokenizerPath = tokenizerPath
        self.plan = plan
        self.sequenceLength = sequenceLength
        self.samples = samples
        self.layers = layers
        self.memoryBudget = memoryBudget
        self.blocks = blocks
        self.hasTargets = hasTargets
        self.denseOnly = denseOnly
        self.heartbeatInterval = heartbeatInterval
        self.config = config
        self.weightTensors = weightTensors
    }

    enum CodingKeys: String, CodingKey {
        case modelPath, tokenizerPath, plan, sequenceLength, samples, layers, memoryBudget, first, end
        case hasTargets, denseOnly, heartbeatInterval, config, weightTensors, replica
    }

    init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        modelPath = try c.decode(String.self, forKey: .modelPath)
        tokenizerPath = try c.decodeIfPresent(String.self, forKey: .tokenizerPath)
        plan = try c.decode(PrunePlan.self, forKey: .plan)
        sequenceLength = try c.decode(Int.self, forKey: .sequenceLength)
        samples = try c.decode(Int.self, forKey: .samples)
        layers = try Self.layerRange(try c.decodeIfPresent([Int].self, forKey: .layers))
        memoryBudget = try c.decode(Int.self, forKey: .memoryBudget)
        blocks = try Self.blockRange(first: try c.decode(Int.self, forKey: .first), end: try c.decode(Int.self, forKey: .end))
        hasTargets = try c.decode(Bool.self, forKey: .hasTargets)
        denseOnly = try c.decode(Bool.self, forKey: .denseOnly)
        heartbeatInterval = try c.decodeIfPresent(Double.self, forKey: .heartbeatInterval)
        config = try c.decodeIfPresent(ModelConfig.self, forKey: .config)
        weightTensors = try c.decodeIfPresent(Int.self, forKey: .weightTensors)
        replica = try c.decodeIfPresent(ReplicaSpec.self, forKey: .replica)
    }

    func encode(to encoder: Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(modelPath, forKey: .modelPath)
        try c.encodeIfPresent(tokenizerPath, forKey: .tokenizerPath)
        try c.encode(plan, forKey: .plan)
        try c.encode(sequenceLength, forKey: .sequenceLength)
        try c.encode(samples, forKey: .samples)
        try c.encodeIfPresent(layers.map { [$0.lowerBound, $0.upperBound] }, forKey: .layers)
        try c.encode(memoryBudget, forKey: .memoryBudget)
        try c.encode(blocks.lowerBound, forKey: .first)
        try c.encode(blocks.upperBound, forKey: .end)
        try c.encode(hasTargets, forKey: .hasTargets)
        try c.encode(denseOnly, forKey: .denseOnly)
        try c.encodeIfPresent(heartbeatInterval, forKey: .heartbeatInterval)
        try c.encodeIfPresent(config, forKey: .config)
        try c.encodeIfPresent(weightTensors, forKey: .weightTensors)
        try c.encodeIfPresent(replica, forKey: .replica)
    }

    /// `[first, last]` from the wire as a range, or an error naming the field.
    static func layerRange(_ layers: [Int]?) throws -> ClosedRange<Int>? {
        guard let layers else { return nil }
        guard layers.count == 2, layers[0] >= 0, layers[0] <= layers[1] else {
            throw bad("layers", "is \(layers), expected [first, last] with 0 <= first <= last")
        }
        return layers[0]...layers[1]
    }

    /// `first` and `end` from the wire as a range of blocks, or an error naming the field.
    static func blockRange(first: Int, end: Int) throws -> Range<Int> {
        guard first >= 0, end > first else { throw bad("range", "\(first)..<\(end) is not a range of blocks (expected 0 <= first < end)") }
        return first..<end
    }

    func job(workDirectory: String) -> PruneJob {
        // The worker never tokenizes; RangePruner needs only the number of windows.
        var job = PruneJob(plan: plan, calibration: Array(repeating: [], count: samples), sequenceLength: sequenceLength,
                           layers: layers, memoryBudget: memoryBudget, workDirectory: workDirectory)
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
    /// Replicas of one stage.
    static let maxReplicas = 1024
}

extension Assignment {
    static func bad(_ field: String, _ detail: String) -> WireError { .malformed(message: "assign", field: field, detail: detail) }

    /// Decodes a job, refusing JSON that is not one, and a block or layer range that is not a
    /// range (naming the field).
    static func decode(_ json: [UInt8]) throws -> Assignment {
        do { return try JSONDecoder().decode(Assignment.self, from: Data(json)) } catch let e as WireError {
            throw e
        } catch {
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
        guard memoryBudget >= 0 else { throw Self.bad("memoryBudget", "is \(memoryBudget), expected a non-negative number of bytes") }
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
        if let r = replica {
            guard (1...AssignmentLimits.maxReplicas).contains(r.count), (0..<r.count).contains(r.rank) else {
                throw Self.bad("replica", "is rank \(r.rank) of \(r.count), expected 0 <= rank < count <= \(AssignmentLimits.maxReplicas)")
            }
            guard r.peers.count == r.count else { throw Self.bad("replica.peers", "lists \(r.peers.count) addresses for \(r.count) replicas") }
            guard !r.group.isEmpty, r.group.utf8.count <= 200 else { throw Self.bad("replica.group", "is empty or longer than 200 bytes") }
            for (k, p) in r.peers.enumerated() where k != r.rank {
                do { _ = try Endpoint(parsing: p) } catch { throw Self.bad("replica.peers", "entry \(k) '\(p)' is not HOST:PORT: \(error)") }
            }
        }
        let windows = role.samples(samples).count
        let expected = windows * tensorsPerWindow + weights
        guard expected == Int(tensors) else {
            throw Self.bad("tensors", "announces \(tensors) tensors, expected \(expected) (\(windows) windows x \(tensorsPerWindow) + \(weights) weights)")
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
        if let a = plan.allocation {
            try check(a.count <= 1 << 12, "allocation", "has \(a.count) blocks, at most \(1 << 12)")
            if let bad = a.firstIndex(where: { !($0.isFinite && $0 > 0 && $0 < 1) }) {
                try check(false, "allocation", "gives block \(bad) sparsity \(a[bad]), expected strictly between 0 and 1")
            }
            if case .nOfM = plan.pattern { try check(false, "allocation", "applies to unstructured sparsity, not \(plan.pattern)") }
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
        guard blocks.upperBound <= c.layerCount else {
            throw Self.bad("range", "\(blocks.lowerBound)..<\(blocks.upperBound) is outside the model's \(c.layerCount) blocks")
        }
        guard sequenceLength <= c.maxPositions else {
            throw Self.bad("sequenceLength", "is \(sequenceLength), longer than the model's context of \(c.maxPositions)")
        }
        if let layers, layers.upperBound >= c.layerCount {
            throw Self.bad("layers", "is [\(layers.lowerBound), \(layers.upperBound)], past the model's \(c.layerCount) blocks (0-\(c.layerCount - 1))")
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
    /// Only this replica's windows travel.
    var role: ReplicaRole = .single
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
        let specs = weightsSent ? a.blocks.flatMap { config.family.blockTensors(config, block: $0) } : []
        self.init(samples: a.samples, hasTargets: a.hasTargets, rows: a.sequenceLength, cols: config.hiddenSize, weights: specs)
        role = a.role
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
        guard role.owns(sample: s, of: samples) else {
            throw Self.bad("is '\(t.name)': window \(s) is replica \(role.rank(ofSample: s, of: samples))'s, not replica \(role.rank)'s of \(role.count)")
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
        let windows = role.samples(samples)
        if seenInputs.count != windows.count { throw Self.bad("inputs/\(windows.first { !seenInputs.contains($0) }!) is missing") }
        if hasTargets && seenTargets.count != windows.count { throw Self.bad("targets/\(windows.first { !seenTargets.contains($0) }!) is missing") }
        if let missing = weights.keys.sorted().first(where: { !seenWeights.contains($0) }) { throw Self.bad("block tensor '\(missing)' is missing") }
    }
}

enum BoundaryTransfer {
    /// Sends a boundary: inputs/i for every window of `role`, then targets/i when present.
    static func send(_ b: Boundary, over c: Connection, role: ReplicaRole = .single) throws {
        let windows = role.samples(b.inputs.count)
        for s in windows { try c.sendTensor(try b.inputs.get(s), name: "inputs/\(s)", stream: UInt32(s)) }
        if let t = b.targets {
            for s in windows { try c.sendTensor(try t.get(s), name: "targets/\(s)", stream: UInt32(t.count + s)) }
        }
    }

    static func tensorCount(_ b: Boundary, role: ReplicaRole = .single) -> UInt32 {
        UInt32(role.samples(b.inputs.count).count * (b.targets == nil ? 1 : 2))
    }

    /// Receives a boundary of exactly `role`'s windows of `samples` (and as many targets when
    /// `hasTargets`), each [rows x cols] like the stores `make` gives; any other name, shape,
    /// count, a duplicate or a missing window is refused before the tensor is allocated.
    static func receive(_ count: Int, over c: Connection, samples: Int, hasTargets: Bool, role: ReplicaRole = .single,
                        make: () -> ActivationStore) throws -> Boundary {
        let inputs = make()
        let targets: ActivationStore? = hasTargets ? make() : nil
        let windows = role.samples(samples).count
        let expected = windows * (hasTargets ? 2 : 1)
        guard count == expected else {
            throw WireError.malformed(message: "range-done", field: "tensors", detail: "is \(count), expected \(expected) (\(windows) windows\(hasTargets ? " x 2 with targets" : ""))")
        }
        var expect = AssignedTensors(samples: samples, hasTargets: hasTargets, rows: inputs.rows, cols: inputs.cols)
        expect.role = role
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
