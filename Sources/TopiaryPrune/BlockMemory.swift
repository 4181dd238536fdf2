import TopiaryModel

/// What a block's prune certainly holds in memory at once, counted from the shapes: a lower
/// bound, so that a run it refuses could not have finished on the machine (`MemoryCheck`
/// compares it with the memory the process may use before the run writes anything).
///
/// Counted: the block's weights as Float32; the activations the stores keep in memory during
/// the solve (the block's inputs and dense outputs, and the dense targets when the method
/// carries them, each up to a third of the memory budget; the rest is spilled); and SparseLLM's
/// feed-forward solve, which keeps its auxiliary variables for every calibration token (s, z and
/// p as wide as the FFN, the dense output y and the input x as wide as the model; for an MoE
/// block every expert's inputs are held until its turn; a chunk's temporaries and its two Gram
/// matrices); and, for a method that builds input Hessians, every linear group's (kept until the
/// block is solved), with a copy of the largest for SparseGPT's factor. Not counted: fp64
/// temporaries, the buffer cache, the code and the runtime, so the real peak is higher
/// (SmolLM2, SparseLLM, 128 x 512 tokens: 1.91 GB counted, 2.01 GB measured; a LLaMA-2-7B
/// SparseGPT block at 2 x 2048 tokens: 2.1 GB counted, 3.5 GB measured).
public struct BlockMemory: Sendable, Equatable {
    public var weights: Int
    public var activations: Int
    /// The linear groups' input Hessians, and SparseGPT's copy of the largest.
    public var hessians: Int
    /// SparseLLM's variables, inputs, temporaries and Gram matrices.
    public var solver: Int
    public var total: Int { weights + activations + hessians + solver }

    /// The largest block's bound for `plan` on `config` with `tokens` calibration tokens
    /// (samples x sequence length) and a memory budget of `budget` bytes.
    public static func lowerBound(_ config: ModelConfig, plan: PrunePlan, tokens: Int, budget: Int) -> BlockMemory {
        // Counted in Double and clamped: a hostile or absurd shape gives a huge bound, not a trap.
        func bytes(_ floats: Double) -> Int { Int(min(max(floats * 4, 0), 0x1p60)) }
        let (d, n) = (Double(config.hiddenSize), Double(max(tokens, 0)))
        let attention = 2 * d * Double(config.headCount) * Double(config.headDim) + 2 * d * Double(config.kvHeadCount) * Double(config.headDim)
        let gated = config.architecture.isLlamaLike
        let moe = config.expertCount > 0
        let experts = moe ? Double(config.expertCount) : 1
        let f = Double(moe ? config.expertWidth : config.intermediateSize)
        let ffn = experts * (gated ? 3 : 2) * d * f
        let streams = plan.needsDenseStream ? 3 : 2
        let activations = Double(streams) * min(Double(max(budget, 0) / 3), n * d * 4)
        var (hessians, solver) = (0.0, 0.0)
        if plan.collectsHessian {
            // Every linear group's XᵀX is kept until the block is solved: q/k/v's and o's inputs,
            // and per expert the feed-forward's two; SparseGPT factors the largest on a copy.
            let attentionOut = Double(config.headCount) * Double(config.headDim)
            hessians += d * d + attentionOut * attentionOut + experts * (d * d + f * f)
            if plan.solvesWithHessian { hessians += max(d, attentionOut, f) * max(d, attentionOut, f) }
        }
        if plan.method == .sparsellm {
            // Tokens the busiest expert sees at least, and every expert's inputs together.
            let perExpert: Double, held: Double
            if !moe {
                (perExpert, held) = (n, n)
            } else if (plan.expertCalibration ?? .routed) == .all {
                (perExpert, held) = (n, n * experts)
            } else {
                let routed = n * Double(max(config.expertsPerToken, 1))
                (perExpert, held) = ((routed / experts).rounded(.up), routed)
            }
            // Gated: s, z, p [tokens x f] and y [tokens x d]; OPT: z, p and y. A gated pass over
            // a chunk has at least its m, g, σ(s) and act [chunk x f] alive; XᵀX and pᵀp.
            let auxiliaries = perExpert * ((gated ? 3 : 2) * f + d)
            let temporaries = gated ? 4 * min(Double(SparseLLM.chunkRows), perExpert) * f : 0
            solver = held * d + auxiliaries + temporaries + d * d + f * f
        }
        return BlockMemory(weights: bytes(attention + ffn), activations: Int(min(activations, 0x1p60)), hessians: bytes(hessians),
                           solver: bytes(solver))
    }
}
