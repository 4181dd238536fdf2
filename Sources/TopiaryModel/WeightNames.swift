/// Checkpoint (Hugging Face) names of a model's tensors. Every reader exposes its tensors under
/// these names, so blocks, pruners and writers use one vocabulary.
public enum WeightNames {
    public static func blockPrefix(_ arch: Architecture, _ i: Int) -> String {
        arch == .llama ? "model.layers.\(i)." : "model.decoder.layers.\(i)."
    }

    /// The linear layers of block `i`, in forward order, without the ".weight" suffix.
    public static func linears(_ arch: Architecture, block i: Int) -> [String] {
        let p = blockPrefix(arch, i)
        switch arch {
        case .llama:
            return ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"].map { p + $0 }
        case .opt:
            return ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                    "fc1", "fc2"].map { p + $0 }
        }
    }

    /// Every tensor of block `i`.
    public static func blockTensors(_ arch: Architecture, block i: Int) -> [String] {
        let p = blockPrefix(arch, i)
        switch arch {
        case .llama:
            return linears(arch, block: i).map { $0 + ".weight" }
                + [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        case .opt:
            return linears(arch, block: i).flatMap { [$0 + ".weight", $0 + ".bias"] }
                + ["self_attn_layer_norm", "final_layer_norm"].flatMap { [p + $0 + ".weight", p + $0 + ".bias"] }
        }
    }

    public static func tokenEmbedding(_ arch: Architecture) -> String {
        arch == .llama ? "model.embed_tokens.weight" : "model.decoder.embed_tokens.weight"
    }

    public static let positionEmbedding = "model.decoder.embed_positions.weight"
    public static let projectIn = "model.decoder.project_in.weight"
    public static let projectOut = "model.decoder.project_out.weight"
    public static let lmHead = "lm_head.weight"

    /// Final norm tensors (weight, and bias for OPT).
    public static func finalNorm(_ arch: Architecture) -> [String] {
        arch == .llama ? ["model.norm.weight"] : ["model.decoder.final_layer_norm.weight", "model.decoder.final_layer_norm.bias"]
    }
}
