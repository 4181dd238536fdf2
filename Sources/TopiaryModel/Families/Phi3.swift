import Foundation

/// Phi-3: the LLaMA block with q/k/v stored fused as `qkv_proj` and gate/up as `gate_up_proj`.
/// Topiary holds and prunes them as the logical q/k/v and gate/up linears (each with its own
/// statistics and sparsity) and writes them back fused.
public enum Phi3Family: LlamaBlockFamily {
    public static let modelTypes = ["phi3"]

    public static func decode(_ f: JSONFields) throws -> ModelConfig {
        var c = try ModelConfig.llamaLike(.phi3, f)
        if let partial = try f.optionalDouble("partial_rotary_factor"), partial != 1 {
            throw CheckpointError.invalidField(path: f.path, field: "partial_rotary_factor", detail: "is \(partial); only full rotary embeddings (1.0) are implemented")
        }
        c.slidingWindow = try f.optionalInt("sliding_window")
        return c
    }

    public static func huggingFaceFields(_ c: ModelConfig) -> [String: Any] {
        var fields = common(c)
        fields["architectures"] = ["Phi3ForCausalLM"]
        fields["model_type"] = "phi3"
        fields["sliding_window"] = c.slidingWindow ?? NSNull()
        return fields
    }

    public static func checkpointTensors(_ c: ModelConfig, block i: Int) -> [CheckpointTensor] {
        let p = blockPrefix(i)
        let fused: Set<String> = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"].reduce(into: []) {
            $0.insert(p + $1 + ".weight")
        }
        let rest = blockTensors(c, block: i).filter { !fused.contains($0.name) }
            .map { CheckpointTensor(name: $0.name, shape: $0.shape, parts: [$0.name]) }
        return [CheckpointTensor(name: p + "self_attn.qkv_proj.weight", shape: [c.queryDim + 2 * c.kvDim, c.hiddenSize],
                                 parts: ["q_proj", "k_proj", "v_proj"].map { p + "self_attn." + $0 + ".weight" }),
                CheckpointTensor(name: p + "mlp.gate_up_proj.weight", shape: [2 * c.intermediateSize, c.hiddenSize],
                                 parts: [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"])] + rest
    }
}
