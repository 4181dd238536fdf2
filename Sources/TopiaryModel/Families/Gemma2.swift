import Foundation
import TopiaryTensor

/// Gemma-2: RMSNorm scaling by (1 + w), norms before and after attention and the feed-forward,
/// embeddings times sqrt(hidden), GeGLU with the tanh GELU, soft-capped attention scores and
/// final logits, sliding windows on alternate blocks, scores scaled by query_pre_attn_scalar.
public enum Gemma2Family: ModelFamily {
    public static let modelTypes = ["gemma2"]
    public static var rmsNormOffset: Float { 1 }

    public static func decode(_ f: JSONFields) throws -> ModelConfig {
        var c = try ModelConfig.llamaLike(.gemma2, f)
        if try f.optionalBool("tie_word_embeddings") == nil { c.tieWordEmbeddings = true }
        if try f.optionalString("hidden_activation") == nil, try f.optionalString("hidden_act") == nil { c.activation = .geluTanh }
        c.attentionSoftcap = try f.optionalDouble("attn_logit_softcapping").map(Float.init)
        c.finalLogitSoftcap = try f.optionalDouble("final_logit_softcapping").map(Float.init)
        c.queryScaleBase = Float(try f.optionalDouble("query_pre_attn_scalar") ?? Double(c.headDim))
        c.embeddingScale = Float(Double(c.hiddenSize).squareRoot())
        c.slidingWindow = try f.optionalInt("sliding_window")
        if c.slidingLayers == nil {
            // Without layer_types, transformers slides on even blocks (0, 2, ...).
            c.slidingLayers = (0..<c.layerCount).map { $0 % 2 == 0 }
        }
        return c
    }

    public static func huggingFaceFields(_ c: ModelConfig) -> [String: Any] {
        var fields = c.llamaLikeFields()
        fields["architectures"] = ["Gemma2ForCausalLM"]
        fields["model_type"] = "gemma2"
        fields["hidden_activation"] = c.activation.rawValue
        fields["attn_logit_softcapping"] = c.attentionSoftcap.map { $0 as Any } ?? NSNull()
        fields["final_logit_softcapping"] = c.finalLogitSoftcap.map { $0 as Any } ?? NSNull()
        fields["query_pre_attn_scalar"] = c.queryScaleBase ?? Float(c.headDim)
        fields["sliding_window"] = c.slidingWindow ?? NSNull()
        if let layers = c.slidingLayers { fields["layer_types"] = layers.map { $0 ? "sliding_attention" : "full_attention" } }
        return fields
    }

    public static func blockTensors(_ c: ModelConfig, block i: Int) -> [BlockTensorSpec] {
        let p = blockPrefix(i)
        return llamaTensors(c, block: i) + [BlockTensorSpec(vector: p + "pre_feedforward_layernorm.weight", c.hiddenSize),
                                            BlockTensorSpec(vector: p + "post_feedforward_layernorm.weight", c.hiddenSize)]
    }

    public static func linears(_ c: ModelConfig, block i: Int) -> [String] { llamaLinears(block: i) }

    public static func feedForwards(_ c: ModelConfig, block i: Int) -> [FeedForward] {
        let p = blockPrefix(i)
        return [.gated(gate: p + "mlp.gate_proj", up: p + "mlp.up_proj", down: p + "mlp.down_proj")]
    }

    /// h = x + norm(attend(norm(x))); y = h + norm(feed forward(norm(h))).
    public static func forward(_ b: DeviceBlock, _ x: Tensor, _ pass: inout BlockPass) -> Tensor {
        let p = blockPrefix(b.index)
        let attention = llamaAttention(b.config, block: b.index)
        let a = b.rmsNorm(x, p + "input_layernorm.weight")
        let attended = attention.forward(b, a, &pass)
        pass.keep("attn.out", attended)
        let h = b.residual(x, plus: b.rmsNorm(attended, p + "post_attention_layernorm.weight"))
        pass.keep("residual", h)
        let f = b.rmsNorm(h, p + "pre_feedforward_layernorm.weight")
        let m = llamaMLP(b.config, block: b.index).forward(b, f, &pass)
        pass.keep("mlp.out", m)
        return b.residual(h, plus: b.rmsNorm(m, p + "post_feedforward_layernorm.weight"))
    }

    public static func weightGradients(_ b: DeviceBlock, _ dy: Tensor, _ tape: BlockTape) -> [String: Tensor] {
        let p = blockPrefix(b.index)
        var grads: [String: Tensor] = [:]
        let dm = b.rmsNormBackward(tape.value("mlp.out"), p + "post_feedforward_layernorm.weight", dy)
        let df = llamaMLP(b.config, block: b.index).backward(b, dm, tape, into: &grads)
        let dh = b.rmsNormBackward(tape.value("residual"), p + "pre_feedforward_layernorm.weight", df)
        b.backend.add(dy, into: dh)
        let dAttended = b.rmsNormBackward(tape.value("attn.out"), p + "post_attention_layernorm.weight", dh)
        llamaAttention(b.config, block: b.index).backward(b, dAttended, tape, into: &grads)
        return grads
    }
}
