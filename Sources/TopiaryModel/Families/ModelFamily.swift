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
    public var tape: BlockTape

    public init(sequenceLength: Int, rope: Kernels.RopeTable?, observer: LinearObserver? = nil, recording: Bool = false) {
        self.sequenceLength = sequenceLength
        self.rope = rope
        self.observer = observer
        self.recording = recording
        tape = BlockTape(sequenceLength: sequenceLength, rope: rope)
    }

    mutating func keep(_ key: String, _ m: @autoclosure () -> Matrix) {
        if recording { tape.values[key] = m() }
    }

    mutating func keep(indices key: String, _ v: @autoclosure () -> [Int]) {
        if recording { tape.indices[key] = v() }
    }
}

/// What a block's forward pass keeps for its backward pass, by name. Only the gradients with
/// respect to the linear layers' (effective) weights are wanted (BESA learns masks of frozen
/// weights), so nothing before the first linear's input is kept.
public struct BlockTape: Sendable {
    public let sequenceLength: Int
    public let rope: Kernels.RopeTable?
    var values: [String: Matrix] = [:]
    var indices: [String: [Int]] = [:]

    init(sequenceLength: Int, rope: Kernels.RopeTable?) {
        self.sequenceLength = sequenceLength
        self.rope = rope
    }

    func value(_ key: String) -> Matrix {
        guard let m = values[key] else { preconditionFailure("block tape has no '\(key)': was the forward pass recording?") }
        return m
    }
}

/// One model family: the only place that knows its config.json spelling, its block's tensors
/// under their checkpoint names, its forward and backward passes, which linears share an input,
/// which form the feed-forward networks, and its costs. Solvers, the pruner, the planner and
/// the writer ask the family; adding a family touches one file and its tests.
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
    static func forward(_ b: DecoderBlock, _ x: Matrix, _ pass: inout BlockPass) -> Matrix
    /// ∂L/∂W of every linear from ∂L/∂output and the recording pass's tape.
    static func weightGradients(_ b: DecoderBlock, _ dy: Matrix, _ tape: BlockTape) -> [String: Matrix]
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
    static func llamaForward(_ b: DecoderBlock, _ x: Matrix, _ pass: inout BlockPass, feedForward: (Matrix, inout BlockPass) -> Matrix) -> Matrix {
        let p = blockPrefix(b.index)
        var h = x
        let a = b.rmsNorm(x, p + "input_layernorm.weight")
        addInPlace(&h, llamaAttention(b.config, block: b.index).forward(b, a, &pass))
        pass.keep("residual", h)
        let f = b.rmsNorm(h, p + "post_attention_layernorm.weight")
        var y = h
        addInPlace(&y, feedForward(f, &pass))
        return y
    }

    /// The backward of `llamaForward`, given the feed-forward's backward (∂L/∂its input).
    static func llamaBackward(_ b: DecoderBlock, _ dy: Matrix, _ tape: BlockTape,
                              feedForward: (Matrix, inout [String: Matrix]) -> Matrix) -> [String: Matrix] {
        let p = blockPrefix(b.index)
        var grads: [String: Matrix] = [:]
        let df = feedForward(dy, &grads)
        var dh = BlockGradients.rmsNormBackward(input: tape.value("residual"), weight: b.normWeight(p + "post_attention_layernorm.weight"),
                                                eps: b.config.normEps, outputGradient: df)
        addInPlace(&dh, dy)
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

    public static func forward(_ b: DecoderBlock, _ x: Matrix, _ pass: inout BlockPass) -> Matrix {
        let mlp = llamaMLP(b.config, block: b.index)
        return llamaForward(b, x, &pass) { f, pass in mlp.forward(b, f, &pass) }
    }

    public static func weightGradients(_ b: DecoderBlock, _ dy: Matrix, _ tape: BlockTape) -> [String: Matrix] {
        let mlp = llamaMLP(b.config, block: b.index)
        return llamaBackward(b, dy, tape) { dy, grads in mlp.backward(b, dy, tape, into: &grads) }
    }

    static func common(_ c: ModelConfig) -> [String: Any] { c.llamaLikeFields() }
}
