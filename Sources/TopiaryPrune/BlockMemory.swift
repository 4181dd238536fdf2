import TopiaryModel

/// What a block's prune certainly holds in memory at once, counted from the shapes: a lower
/// bound, so that a run it refuses could not have finished on the machine (`topiary prune`
/// compares it with the memory the process may use before loading anything).
///
/// Counted: the block's weights as Float32; the activations the stores keep in memory during
/// the solve (the block's inputs and dense outputs, and the dense targets when the method
/// carries them, each up to a third of the memory budget; the rest is spilled); and SparseLLM's
/// feed-forward solve, which keeps its auxiliary variables for every calibration token (s, z and
/// p as wide as the FFN, the dense output y and the input x as wide as the model; for an MoE
/// block every expert's inputs are held until its turn; a chunk's temporaries and its two Gram
/// matrices). Not counted: the other Hessians, the buffer cache, the code and the runtime: the
/// real peak is higher (SmolLM2, SparseLLM, 128 x 512 tokens: 1.89 GB counted, 2.01 GB measured).
public struct BlockMemory: Sendable, Equatable {
    public var weights: Int
    public var activations: Int
    public var solver: Int
    public var total: Int { weights + activations + solver }

    /// The largest block's bound for `plan` on `config` with `tokens` calibration tokens
    /// (samples x sequence length) and a memory budget of `budget` bytes.
    public static func lowerBound(_ config: ModelConfig, plan: PrunePlan, tokens: Int, budget: Int) -> BlockMemory {
        let float = MemoryLayout<Float>.size
        let (d, n) = (config.hiddenSize, tokens)
        let attention = 2 * d * config.headCount * config.headDim + 2 * d * config.kvHeadCount * config.headDim
        let gated = config.architecture.isLlamaLike
        let moe = config.expertCount > 0
        let experts = moe ? config.expertCount : 1
        let f = moe ? config.expertWidth : config.intermediateSize
        let ffn = experts * (gated ? 3 : 2) * d * f
        let streams = plan.method == .sparsellm || plan.method == .besa ? (plan.targets == .dense ? 3 : 2) : 2
        let activations = streams * min(budget / 3, n * d * float)
        var solver = 0
        if plan.method == .sparsellm {
            // Tokens the busiest expert sees at least, and every expert's inputs together.
            let perExpert: Int, held: Int
            if !moe {
                (perExpert, held) = (n, n)
            } else if (plan.expertCalibration ?? .routed) == .all {
                (perExpert, held) = (n, n * experts)
            } else {
                let routed = n * max(config.expertsPerToken, 1)
                (perExpert, held) = ((routed + experts - 1) / experts, routed)
            }
            // Gated: s, z, p [tokens x f] and y [tokens x d]; OPT: z, p and y. A gated pass over
            // a chunk has at least its m, g, σ(s) and act [chunk x f] alive; XᵀX and pᵀp.
            let auxiliaries = perExpert * ((gated ? 3 : 2) * f + d)
            let temporaries = gated ? 4 * min(SparseLLM.chunkRows, perExpert) * f : 0
            solver = (held * d + auxiliaries + temporaries + d * d + f * f) * float
        }
        return BlockMemory(weights: (attention + ffn) * float, activations: activations, solver: solver)
    }
}
