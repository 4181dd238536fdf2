import Foundation
import TopiaryTensor

/// A tensor of a block as Topiary holds it: checkpoint name and shape (1-D tensors are [1 x n]).
public struct BlockTensorSpec: Sendable, Equatable {
    public let name: String
    public let rows: Int
    public let cols: Int
    /// Stored as a 1-D tensor in checkpoints (norm weights, biases).
    public let isVector: Bool

    public init(_ name: String, _ rows: Int, _ cols: Int) {
        self.name = name
        self.rows = rows
        self.cols = cols
        isVector = false
    }

    public init(vector name: String, _ count: Int) {
        self.name = name
        rows = 1
        cols = count
        isVector = true
    }

    public var shape: [Int] { isVector ? [cols] : [rows, cols] }
}

/// A feed-forward network that SparseLLM prunes jointly through its auxiliary variables.
public enum FeedForward: Sendable, Equatable {
    /// down(act(gate(x)) ⊙ up(x)): LLaMA-like, and each Mixtral expert.
    case gated(gate: String, up: String, down: String)
    /// fc2(relu(fc1(x) + b1)) + b2: OPT.
    case plain(fc1: String, fc2: String)

    /// The linear whose input is the network's input.
    public var inputLinear: String {
        switch self {
        case .gated(let gate, _, _): return gate
        case .plain(let fc1, _): return fc1
        }
    }

    /// The linear whose product is the feed-forward's output.
    public var outputLinear: String {
        switch self {
        case .gated(_, _, let down): return down
        case .plain(_, let fc2): return fc2
        }
    }

    public var linears: [String] {
        switch self {
        case .gated(let g, let u, let d): return [g, u, d]
        case .plain(let f1, let f2): return [f1, f2]
        }
    }
}

/// Which calibration tokens a mixture-of-experts block shows each expert's linears.
public enum ExpertCalibration: String, Sendable, Codable, CaseIterable {
    /// The tokens the router sends to the expert (the model's own behaviour).
    case routed
    /// Every token through every expert, so rarely chosen experts get data (as llm-compressor
    /// does); the block's output still uses the routed experts only.
    case all
}

/// Everything one forward pass of a block needs besides its weights, and what it keeps.
///
/// The plain forward and the recording forward are the same code: with `recording` on, each
/// step stores what its backward needs in `tape`.
public struct BlockPass {
    public let sequenceLength: Int
    public let rope: Kernels.RopeTable?
    public let observer: LinearObserver?
    public var expertCalibration: ExpertCalibration = .routed
    public var recording = false
    /// Sees each gated feed-forward's products (`FeedForwardProducts`).
    public var feedForwardObserver: FeedForwardObserver?
    public var tape: BlockTape
    /// Incremental decoding (`DeviceBlock.decode`): each row is one sequence's next token, its
    /// attention reads and extends this cache instead of attending within the rows.
    var cache: KVCache?

    public init(sequenceLength: Int, rope: Kernels.RopeTable?, observer: LinearObserver? = nil, recording: Bool = false,
                backend: any ComputeBackend) {
        self.sequenceLength = sequenceLength
        self.rope = rope
        self.observer = observer
        self.recording = recording
        tape = BlockTape(sequenceLength: sequenceLength, rope: rope, backend: backend)
    }

    mutating func keep(_ key: String, _ t: @autoclosure () -> Tensor) {
        if recording { tape.values[key] = t() }
    }

    mutating func keep(indices key: String, _ v: @autoclosure () -> [Int]) {
        if recording { tape.indices[key] = v() }
    }

    mutating func keep(routing key: String, _ r: @autoclosure () -> Routing) {
        if recording { tape.routings[key] = r() }
    }
}

/// What a recording forward pass kept for the backward: tensors on the pass's backend.
public struct BlockTape: Sendable {
    public let sequenceLength: Int
    public let rope: Kernels.RopeTable?
    public let backend: any ComputeBackend
    var values: [String: Tensor] = [:]
    var indices: [String: [Int]] = [:]
    var routings: [String: Routing] = [:]

    init(sequenceLength: Int, rope: Kernels.RopeTable?, backend: any ComputeBackend) {
        self.sequenceLength = sequenceLength
        self.rope = rope
        self.backend = backend
    }

    func value(_ key: String) -> Tensor {
        guard let t = values[key] else { preconditionFailure("block tape has no '\(key)': was the forward pass recording?") }
        return t
    }
}

public protocol ModelFamily: Sendable {
    /// config.json `model_type` values this family reads.
    static var modelTypes: [String] { get }
    /// Decodes the family's config.json (the caller validates the result).
    static func decode(_ fields: JSONFields) throws -> ModelConfig
    /// config.json fields beyond the common ones (model_type, architectures, the family's own keys).
    static func huggingFaceFields(_ c: ModelConfig) -> [String: Any]
    /// Every tensor of block `i`, linears first in forward order.
    static func blockTensors(_ c: ModelConfig, block i: Int) -> [BlockTensorSpec]
    /// The prunable linears of block `i` in forward order (names without ".weight").
    static func linears(_ c: ModelConfig, block i: Int) -> [String]
    /// Groups of linears that read the same input (q/k/v; gate/up): they share statistics.
    static func inputGroups(_ c: ModelConfig, block i: Int) -> [[String]]
    /// The feed-forward networks of block `i` (one, or one per expert).
    static func feedForwards(_ c: ModelConfig, block i: Int) -> [FeedForward]
    /// Runs block `b` on `x` [sequences*sequenceLength x hidden].
    static func forward(_ b: DeviceBlock, _ x: Tensor, _ pass: inout BlockPass) -> Tensor
    /// ∂L/∂W of every linear from ∂L/∂output and the recording pass's tape.
    static func weightGradients(_ b: DeviceBlock, _ dy: Tensor, _ tape: BlockTape) -> [String: Tensor]
    /// Multiply-adds per token of the block's linears (the cost the planner balances).
    static func linearMACsPerToken(_ c: ModelConfig) -> Int
    /// The block's tensors as the checkpoint stores them (Phi-3 fuses q/k/v and gate/up).
    static func checkpointTensors(_ c: ModelConfig, block i: Int) -> [CheckpointTensor]
    /// RMSNorm scales by (offset + w): 0 for most families, 1 for Gemma-2.
    static var rmsNormOffset: Float { get }
    /// Prefix of block `i`'s tensor names.
    static func blockPrefix(_ i: Int) -> String
    /// Names of the tensors outside the blocks.
    static var tokenEmbedding: String { get }
    static var finalNorm: [String] { get }
}

/// A tensor as written to a checkpoint, made from the block's tensors.
public struct CheckpointTensor: Sendable {
    public let name: String
    public let shape: [Int]
    /// The block tensors it is made of, stacked by rows in this order.
    public let parts: [String]
}

extension ModelFamily {
    public static func blockPrefix(_ i: Int) -> String { "model.layers.\(i)." }
    public static var tokenEmbedding: String { "model.embed_tokens.weight" }
    public static var finalNorm: [String] { ["model.norm.weight"] }

    public static func inputGroups(_ c: ModelConfig, block i: Int) -> [[String]] {
        let p = blockPrefix(i)
        var groups = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"].map { p + $0 }, [p + "self_attn.o_proj"]]
        for ffn in feedForwards(c, block: i) {
            guard case .gated(let gate, let up, let down) = ffn else { continue }
            groups += [[gate, up], [down]]
        }
        return groups
    }

    public static func checkpointTensors(_ c: ModelConfig, block i: Int) -> [CheckpointTensor] {
        blockTensors(c, block: i).map { CheckpointTensor(name: $0.name, shape: $0.shape, parts: [$0.name]) }
    }

    public static func linearMACsPerToken(_ c: ModelConfig) -> Int {
        let attention = c.hiddenSize * (c.queryDim + 2 * c.kvDim) + c.queryDim * c.hiddenSize
        return attention + 3 * c.hiddenSize * c.intermediateSize
    }

    /// The standard LLaMA-like block's attention linears and norms, and one gated feed-forward.
    static func llamaTensors(_ c: ModelConfig, block i: Int, mlp: Bool = true) -> [BlockTensorSpec] {
        let p = blockPrefix(i)
        let h = c.hiddenSize
        var t = [BlockTensorSpec(p + "self_attn.q_proj.weight", c.queryDim, h), BlockTensorSpec(p + "self_attn.k_proj.weight", c.kvDim, h),
                 BlockTensorSpec(p + "self_attn.v_proj.weight", c.kvDim, h), BlockTensorSpec(p + "self_attn.o_proj.weight", h, c.queryDim)]
        if mlp {
            t += [BlockTensorSpec(p + "mlp.gate_proj.weight", c.intermediateSize, h), BlockTensorSpec(p + "mlp.up_proj.weight", c.intermediateSize, h),
                  BlockTensorSpec(p + "mlp.down_proj.weight", h, c.intermediateSize)]
        }
        if c.qkvBias {
            t += [BlockTensorSpec(vector: p + "self_attn.q_proj.bias", c.queryDim), BlockTensorSpec(vector: p + "self_attn.k_proj.bias", c.kvDim),
                  BlockTensorSpec(vector: p + "self_attn.v_proj.bias", c.kvDim)]
        }
        if c.outputBias { t.append(BlockTensorSpec(vector: p + "self_attn.o_proj.bias", h)) }
        if c.qkNorm {
            t += [BlockTensorSpec(vector: p + "self_attn.q_norm.weight", c.headDim), BlockTensorSpec(vector: p + "self_attn.k_norm.weight", c.headDim)]
        }
        t += [BlockTensorSpec(vector: p + "input_layernorm.weight", h), BlockTensorSpec(vector: p + "post_attention_layernorm.weight", h)]
        return t
    }

    static func llamaLinears(block i: Int) -> [String] {
        let p = blockPrefix(i)
        return ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"].map { p + $0 }
    }

    static func llamaAttention(_ c: ModelConfig, block i: Int) -> AttentionLayer {
        let p = blockPrefix(i)
        return AttentionLayer(prefix: p, output: "self_attn.o_proj", window: c.window(block: i),
                              qkNorm: c.qkNorm, softcap: c.attentionSoftcap, scaleBase: c.queryScaleBase)
    }

    static func llamaMLP(_ c: ModelConfig, block i: Int) -> GatedMLP {
        let p = blockPrefix(i)
        return GatedMLP(gate: p + "mlp.gate_proj", up: p + "mlp.up_proj", down: p + "mlp.down_proj", activation: c.activation)
    }

    /// norm, attend, add; norm, feed forward, add: the LLaMA block that most families share.
    static func llamaForward(_ b: DeviceBlock, _ x: Tensor, _ pass: inout BlockPass, feedForward: (Tensor, inout BlockPass) -> Tensor) -> Tensor {
        let p = blockPrefix(b.index)
        let a = b.rmsNorm(x, p + "input_layernorm.weight")
        let h = b.residual(x, plus: llamaAttention(b.config, block: b.index).forward(b, a, &pass))
        pass.keep("residual", h)
        let f = b.rmsNorm(h, p + "post_attention_layernorm.weight")
        return b.residual(h, plus: feedForward(f, &pass))
    }

    /// The backward of `llamaForward`, given the feed-forward's backward (∂L/∂its input).
    static func llamaBackward(_ b: DeviceBlock, _ dy: Tensor, _ tape: BlockTape,
                              feedForward: (Tensor, inout [String: Tensor]) -> Tensor) -> [String: Tensor] {
        let p = blockPrefix(b.index)
        var grads: [String: Tensor] = [:]
        let df = feedForward(dy, &grads)
        let dh = b.rmsNormBackward(tape.value("residual"), p + "post_attention_layernorm.weight", df)
        b.backend.add(dy, into: dh)
        llamaAttention(b.config, block: b.index).backward(b, dh, tape, into: &grads)
        return grads
    }
}

/// The families whose block is exactly LLaMA's (attention variants come from the config).
protocol LlamaBlockFamily: ModelFamily {}

extension LlamaBlockFamily {
    public static func blockTensors(_ c: ModelConfig, block i: Int) -> [BlockTensorSpec] { llamaTensors(c, block: i) }
    public static func linears(_ c: ModelConfig, block i: Int) -> [String] { llamaLinears(block: i) }
    public static func feedForwards(_ c: ModelConfig, block i: Int) -> [FeedForward] {
        let p = blockPrefix(i)
        return [.gated(gate: p + "mlp.gate_proj", up: p + "mlp.up_proj", down: p + "mlp.down_proj")]
    }

    public static func forward(_ b: DeviceBlock, _ x: Tensor, _ pass: inout BlockPass) -> Tensor {
        let mlp = llamaMLP(b.config, block: b.index)
        return llamaForward(b, x, &pass) { f, pass in mlp.forward(b, f, &pass) }
    }

    public static func weightGradients(_ b: DeviceBlock, _ dy: Tensor, _ tape: BlockTape) -> [String: Tensor] {
        let mlp = llamaMLP(b.config, block: b.index)
        return llamaBackward(b, dy, tape) { dy, grads in mlp.backward(b, dy, tape, into: &grads) }
    }

    static func common(_ c: ModelConfig) -> [String: Any] { c.llamaLikeFields() }
}
