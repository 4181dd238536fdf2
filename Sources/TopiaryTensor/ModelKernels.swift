/// What the decoder blocks' forward and backward passes need from a backend, beyond the dense
/// linear algebra of `ComputeBackend`: norms, rotary embeddings, causal attention, the gated
/// activations, and a mixture of experts' routing. The CPU implementations are the reference
/// (CPUBackend+Model.swift); each states its order of operations so another backend can match it.

/// The shape of one causal self-attention: q [N x heads*headDim], k and v [N x kvHeads*headDim],
/// N = sequences * sequenceLength, each sequence at positions 0..<sequenceLength.
public struct AttentionShape: Sendable, Equatable {
    public var sequenceLength: Int
    public var heads: Int
    public var kvHeads: Int
    public var headDim: Int

    public init(sequenceLength: Int, heads: Int, kvHeads: Int, headDim: Int) {
        precondition(sequenceLength > 0 && heads > 0 && kvHeads > 0 && headDim > 0 && heads % kvHeads == 0,
                     "attention: \(heads) heads over \(kvHeads) key/value heads of \(headDim), sequences of \(sequenceLength)")
        self.sequenceLength = sequenceLength
        self.heads = heads
        self.kvHeads = kvHeads
        self.headDim = headDim
    }

    public var queryWidth: Int { heads * headDim }
    public var keyWidth: Int { kvHeads * headDim }
}

/// How attention scores become probabilities.
public struct AttentionOptions: Sendable, Equatable {
    /// Scores are q·k times this (1/sqrt(head_dim) unless the family says otherwise).
    public var scale: Float
    /// A query sees itself and the `window - 1` keys before it (nil: every earlier key).
    public var window: Int?
    /// Scores are capped as softcap·tanh(score/softcap) (Gemma-2).
    public var softcap: Float?

    public init(scale: Float, window: Int? = nil, softcap: Float? = nil) {
        self.scale = scale
        self.window = window
        self.softcap = softcap
    }

    public static func standard(headDim: Int) -> AttentionOptions { AttentionOptions(scale: 1 / Float(headDim).squareRoot()) }

    /// The first key that query `i` sees.
    @inlinable
    public func firstVisible(_ i: Int) -> Int { window.map { max(0, i - $0 + 1) } ?? 0 }
}

/// The activation of a gated feed-forward network: act(gate) ⊙ up.
public enum GatedActivation: String, Sendable {
    case silu
    /// GELU with the tanh approximation (PyTorch's approximate="tanh", Gemma's gelu_pytorch_tanh).
    case geluTanh
    case relu
}

/// A mixture of experts' routing of a batch of tokens: control data that the host needs to
/// schedule the experts (which rows go where), plus the router's probabilities for the backward.
public struct Routing: Sendable {
    public let topK: Int
    /// chosen[r·topK + s]: token r's s-th expert, most probable first (ties to the lower index).
    public let chosen: [Int]
    /// The weight of each choice (renormalised over the chosen experts when the router says so).
    public let weights: [Float]
    /// softmax of the router's logits [tokens x experts].
    public let probabilities: Tensor

    public init(topK: Int, chosen: [Int], weights: [Float], probabilities: Tensor) {
        self.topK = topK
        self.chosen = chosen
        self.weights = weights
        self.probabilities = probabilities
    }

    public var tokens: Int { probabilities.rows }
    public var experts: Int { probabilities.cols }

    /// The tokens routed to `expert`, in token order, with the slot of each choice.
    public func assignments(of expert: Int) -> (rows: [Int], slots: [Int]) {
        var rows: [Int] = [], slots: [Int] = []
        for r in 0..<tokens {
            for s in 0..<topK where chosen[r * topK + s] == expert {
                rows.append(r)
                slots.append(s)
            }
        }
        return (rows, slots)
    }
}

extension ComputeBackend {
    /// The parts one under another (equal widths) as one new tensor.
    public func vstack(_ parts: [Tensor]) -> Tensor {
        precondition(!parts.isEmpty && parts.allSatisfy { $0.cols == parts[0].cols }, "vstack: parts of unequal widths")
        let out = zeros(rows: parts.reduce(0) { $0 + $1.rows }, cols: parts[0].cols)
        var row = 0
        for part in parts {
            copy(part.all, into: out.region(rows: row..<(row + part.rows)))
            row += part.rows
        }
        return out
    }

    /// x · Wᵀ (+ b): the linear layer for activations x [tokens x in] and a weight W [out x in].
    public func linear(_ x: Tensor, _ weight: Tensor, bias: Tensor? = nil) -> Tensor {
        let y = matmul(x, .none, weight, .transposed)
        if let bias { addRowVector(bias, into: y) }
        return y
    }
}
