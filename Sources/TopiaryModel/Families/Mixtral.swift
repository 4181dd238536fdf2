import Foundation
import TopiaryTensor

/// Mixtral: the LLaMA block with a mixture of experts in place of the feed-forward. A router
/// (not pruned) picks `num_experts_per_tok` of `num_local_experts` gated experts per token; the
/// chosen experts' outputs are summed with the router's renormalised softmax weights. Each
/// expert's linears see only the tokens routed to it (or every token, with
/// `ExpertCalibration.all`), so each is pruned from its own statistics.
public enum MixtralFamily: ModelFamily {
    public static let modelTypes = ["mixtral"]

    public static func decode(_ f: JSONFields) throws -> ModelConfig {
        var c = try ModelConfig.llamaLike(.mixtral, f)
        c.expertCount = try f.int("num_local_experts")
        c.expertsPerToken = try f.int("num_experts_per_tok")
        c.slidingWindow = try f.optionalInt("sliding_window")
        return c
    }

    public static func huggingFaceFields(_ c: ModelConfig) -> [String: Any] {
        var fields = c.llamaLikeFields()
        fields["architectures"] = ["MixtralForCausalLM"]
        fields["model_type"] = "mixtral"
        fields["num_local_experts"] = c.expertCount
        fields["num_experts_per_tok"] = c.expertsPerToken
        fields["sliding_window"] = c.slidingWindow ?? NSNull()
        return fields
    }

    static func router(block i: Int) -> String { blockPrefix(i) + "block_sparse_moe.gate.weight" }

    static func expert(_ c: ModelConfig, block i: Int, _ e: Int) -> GatedMLP {
        let p = blockPrefix(i) + "block_sparse_moe.experts.\(e)."
        return GatedMLP(gate: p + "w1", up: p + "w3", down: p + "w2", activation: c.activation, tag: "moe.\(e)")
    }

    public static func blockTensors(_ c: ModelConfig, block i: Int) -> [BlockTensorSpec] {
        var t = Array(llamaTensors(c, block: i, mlp: false).prefix(4))
        for e in 0..<c.expertCount {
            let x = expert(c, block: i, e)
            t += [BlockTensorSpec(x.gate + ".weight", c.intermediateSize, c.hiddenSize), BlockTensorSpec(x.up + ".weight", c.intermediateSize, c.hiddenSize),
                  BlockTensorSpec(x.down + ".weight", c.hiddenSize, c.intermediateSize)]
        }
        return t + [BlockTensorSpec(router(block: i), c.expertCount, c.hiddenSize)] + llamaTensors(c, block: i, mlp: false).dropFirst(4)
    }

    public static func linears(_ c: ModelConfig, block i: Int) -> [String] {
        Array(llamaLinears(block: i).prefix(4)) + (0..<c.expertCount).flatMap { e -> [String] in
            let x = expert(c, block: i, e)
            return [x.gate, x.up, x.down]
        }
    }

    public static func feedForwards(_ c: ModelConfig, block i: Int) -> [FeedForward] {
        (0..<c.expertCount).map { e in
            let x = expert(c, block: i, e)
            return .gated(gate: x.gate, up: x.up, down: x.down)
        }
    }

    public static func linearMACsPerToken(_ c: ModelConfig) -> Int {
        c.hiddenSize * (c.queryDim + 2 * c.kvDim) + c.queryDim * c.hiddenSize
            + c.expertsPerToken * 3 * c.hiddenSize * c.intermediateSize + c.expertCount * c.hiddenSize
    }

    public static func forward(_ b: DeviceBlock, _ x: Tensor, _ pass: inout BlockPass) -> Tensor {
        let moe = mixture(b.config, block: b.index)
        return llamaForward(b, x, &pass) { f, pass in moe.forward(b, f, &pass) }
    }

    public static func weightGradients(_ b: DeviceBlock, _ dy: Tensor, _ tape: BlockTape) -> [String: Tensor] {
        let moe = mixture(b.config, block: b.index)
        return llamaBackward(b, dy, tape) { dy, grads in moe.backward(b, dy, tape, into: &grads) }
    }

    static func mixture(_ c: ModelConfig, block i: Int) -> ExpertMixture {
        ExpertMixture(router: router(block: i), experts: (0..<c.expertCount).map { expert(c, block: i, $0) },
                      topK: c.expertsPerToken, normalize: true)
    }
}
