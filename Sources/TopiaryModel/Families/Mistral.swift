/// Mistral: the LLaMA block with sliding-window attention (`sliding_window`; null means none).
public enum MistralFamily: LlamaBlockFamily {
    public static let modelTypes = ["mistral"]

    public static func decode(_ f: JSONFields) throws -> ModelConfig {
        var c = try ModelConfig.llamaLike(.mistral, f)
        c.slidingWindow = try f.optionalInt("sliding_window")
        return c
    }

    public static func huggingFaceFields(_ c: ModelConfig) -> [String: Any] {
        var fields = common(c)
        fields["architectures"] = ["MistralForCausalLM"]
        fields["model_type"] = "mistral"
        fields["sliding_window"] = c.slidingWindow ?? NSNull()
        return fields
    }
}

import Foundation
