import Foundation

/// Qwen2 and Qwen2.5: the LLaMA block with biases on q/k/v (pruning leaves them dense), often
/// tied embeddings; sliding windows only where `use_sliding_window` says so.
public enum Qwen2Family: LlamaBlockFamily {
    public static let modelTypes = ["qwen2"]

    public static func decode(_ f: JSONFields) throws -> ModelConfig {
        var c = try ModelConfig.llamaLike(.qwen2, f)
        c.qkvBias = true
        c.outputBias = false
        try readSlidingWindow(&c, f)
        return c
    }

    /// Qwen's windows: `sliding_window` applies only with `use_sliding_window`, to the blocks that
    /// `layer_types` marks (or, in older configs, blocks from `max_window_layers` on).
    static func readSlidingWindow(_ c: inout ModelConfig, _ f: JSONFields) throws {
        guard try f.optionalBool("use_sliding_window") == true else {
            c.slidingWindow = nil
            return
        }
        c.slidingWindow = try f.optionalInt("sliding_window")
        if c.slidingLayers == nil {
            let first = try f.optionalInt("max_window_layers") ?? 0
            c.slidingLayers = (0..<c.layerCount).map { $0 >= first }
        }
    }

    static func qwenFields(_ c: ModelConfig) -> [String: Any] {
        var fields = common(c)
        fields["use_sliding_window"] = c.slidingWindow != nil
        fields["sliding_window"] = c.slidingWindow ?? NSNull()
        if let layers = c.slidingLayers { fields["layer_types"] = layers.map { $0 ? "sliding_attention" : "full_attention" } }
        return fields
    }

    public static func huggingFaceFields(_ c: ModelConfig) -> [String: Any] {
        var fields = qwenFields(c)
        fields["architectures"] = ["Qwen2ForCausalLM"]
        fields["model_type"] = "qwen2"
        return fields
    }
}
