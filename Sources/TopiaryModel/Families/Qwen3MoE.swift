import Foundation
import TopiaryTensor

/// Qwen3-MoE: Qwen3's attention (q_norm/k_norm) with a mixture of experts in the feed-forward of
/// the blocks that `decoder_sparse_step` and `mlp_only_layers` select (the others keep a dense
/// feed-forward). Router `mlp.gate`, experts `mlp.experts.E.{gate,up,down}_proj` of width
/// `moe_intermediate_size`; the chosen experts' probabilities are renormalised only with
/// `norm_topk_prob`.
public enum Qwen3MoEFamily: ModelFamily {
    public static let modelTypes = ["qwen3_moe"]

    public static func decode(_ f: JSONFields) throws -> ModelConfig {
        var c = try ModelConfig.llamaLike(.qwen3MoE, f)
        c.qkNorm = true
        try Qwen2Family.readSlidingWindow(&c, f)
        // The Hub's configs say num_experts; transformers 5 writes num_local_experts.
        guard let experts = try f.optionalInt("num_experts") ?? f.optionalInt("num_local_experts") else {
            throw CheckpointError.missingField(path: f.path, field: "num_experts")
        }
        c.expertCount = experts
        c.expertsPerToken = try f.int("num_experts_per_tok")
        c.expertIntermediateSize = try f.int("moe_intermediate_size")
        c.normalizeTopK = try f.optionalBool("norm_topk_prob") ?? false
        let step = try f.optionalInt("decoder_sparse_step") ?? 1
        guard step > 0 else {
            throw CheckpointError.invalidField(path: f.path, field: "decoder_sparse_step", detail: "is \(step), expected a positive number")
        }
        let dense = Set(try f.optionalIntList("mlp_only_layers") ?? [])
        c.expertLayers = (0..<max(c.layerCount, 0)).map { !dense.contains($0) && ($0 + 1) % step == 0 }
        return c
    }

    public static func huggingFaceFields(_ c: ModelConfig) -> [String: Any] {
        var fields = Qwen2Family.qwenFields(c)
        fields["architectures"] = ["Qwen3MoeForCausalLM"]
        fields["model_type"] = "qwen3_moe"
        fields["num_experts"] = c.expertCount
        fields["num_experts_per_tok"] = c.expertsPerToken
        fields["moe_intermediate_size"] = c.expertWidth
        fields["norm_topk_prob"] = c.normalizeTopK
        fields["decoder_sparse_step"] = 1
        fields["mlp_only_layers"] = (0..<c.layerCount).filter { !c.hasExperts(block: $0) }
        return fields
    }

    static func router(block i: Int) -> String { blockPrefix(i) + "mlp.gate.weight" }

    static func expert(_ c: ModelConfig, block i: Int, _ e: Int) -> GatedMLP {
        let p = blockPrefix(i) + "mlp.experts.\(e)."
        return GatedMLP(gate: p + "gate_proj", up: p + "up_proj", down: p + "down_proj", activation: c.activation, tag: "moe.\(e)")
    }

    static func mixture(_ c: ModelConfig, block i: Int) -> ExpertMixture {
        ExpertMixture(router: router(block: i), experts: (0..<c.expertCount).map { expert(c, block: i, $0) },
                      topK: c.expertsPerToken, normalize: c.normalizeTopK)
    }

    public static func blockTensors(_ c: ModelConfig, block i: Int) -> [BlockTensorSpec] {
        guard c.hasExperts(block: i) else { return llamaTensors(c, block: i) }
        let attention = llamaTensors(c, block: i, mlp: false)
        var t = Array(attention.prefix(4))
        for e in 0..<c.expertCount {
            let x = expert(c, block: i, e)
            t += [BlockTensorSpec(x.gate + ".weight", c.expertWidth, c.hiddenSize), BlockTensorSpec(x.up + ".weight", c.expertWidth, c.hiddenSize),
                  BlockTensorSpec(x.down + ".weight", c.hiddenSize, c.expertWidth)]
        }
        return t + [BlockTensorSpec(router(block: i), c.expertCount, c.hiddenSize)] + attention.dropFirst(4)
    }

    public static func linears(_ c: ModelConfig, block i: Int) -> [String] {
        guard c.hasExperts(block: i) else { return llamaLinears(block: i) }
        return Array(llamaLinears(block: i).prefix(4)) + (0..<c.expertCount).flatMap { e -> [String] in
            let x = expert(c, block: i, e)
            return [x.gate, x.up, x.down]
        }
    }

    public static func feedForwards(_ c: ModelConfig, block i: Int) -> [FeedForward] {
        guard c.hasExperts(block: i) else {
            let m = llamaMLP(c, block: i)
            return [.gated(gate: m.gate, up: m.up, down: m.down)]
        }
        return (0..<c.expertCount).map { e in
            let x = expert(c, block: i, e)
            return .gated(gate: x.gate, up: x.up, down: x.down)
        }
    }

    public static func linearMACsPerToken(_ c: ModelConfig) -> Int {
        let attention = c.hiddenSize * (c.queryDim + 2 * c.kvDim) + c.queryDim * c.hiddenSize
        return attention + c.expertsPerToken * 3 * c.hiddenSize * c.expertWidth + c.expertCount * c.hiddenSize
    }

    public static func forward(_ b: DeviceBlock, _ x: Tensor, _ pass: inout BlockPass) -> Tensor {
        if b.config.hasExperts(block: b.index) {
            let moe = mixture(b.config, block: b.index)
            return llamaForward(b, x, &pass) { f, pass in moe.forward(b, f, &pass) }
        }
        let mlp = llamaMLP(b.config, block: b.index)
        return llamaForward(b, x, &pass) { f, pass in mlp.forward(b, f, &pass) }
    }

    public static func weightGradients(_ b: DeviceBlock, _ dy: Tensor, _ tape: BlockTape) -> [String: Tensor] {
        if b.config.hasExperts(block: b.index) {
            let moe = mixture(b.config, block: b.index)
            return llamaBackward(b, dy, tape) { dy, grads in moe.backward(b, dy, tape, into: &grads) }
        }
        let mlp = llamaMLP(b.config, block: b.index)
        return llamaBackward(b, dy, tape) { dy, grads in mlp.backward(b, dy, tape, into: &grads) }
    }
}
