/// LLaMA-2 and Llama-3.x (rope_scaling llama3, linear, dynamic; eos lists), and SmolLM2 and
/// other checkpoints that call themselves "llama" (biases on attention when attention_bias).
public enum LlamaFamily: LlamaBlockFamily {
    public static let modelTypes = ["llama"]

    public static func decode(_ f: JSONFields) throws -> ModelConfig {
        try ModelConfig.llamaLike(.llama, f)
    }

    public static func huggingFaceFields(_ c: ModelConfig) -> [String: Any] {
        var fields = common(c)
        fields["architectures"] = ["LlamaForCausalLM"]
        fields["model_type"] = "llama"
        fields["attention_bias"] = c.qkvBias
        fields["mlp_bias"] = false
        return fields
    }
}
