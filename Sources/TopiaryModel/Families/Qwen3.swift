/// Qwen3 (dense): the LLaMA block with an RMSNorm on each head's queries and keys before RoPE
/// (q_norm, k_norm), and a head dimension independent of the hidden size.
public enum Qwen3Family: LlamaBlockFamily {
    public static let modelTypes = ["qwen3"]

    public static func decode(_ f: JSONFields) throws -> ModelConfig {
        var c = try ModelConfig.llamaLike(.qwen3, f)
        c.qkNorm = true
        try Qwen2Family.readSlidingWindow(&c, f)
        return c
    }

    public static func huggingFaceFields(_ c: ModelConfig) -> [String: Any] {
        var fields = Qwen2Family.qwenFields(c)
        fields["architectures"] = ["Qwen3ForCausalLM"]
        fields["model_type"] = "qwen3"
        fields["attention_bias"] = c.qkvBias
        return fields
    }
}
