import Foundation
import TopiaryTensor

/// OPT: LayerNorm with biases, learned positions, biased linears, ReLU feed-forward; pre-LN
/// (OPT-125m and larger) or post-LN with project_in/out (OPT-350m).
public enum OPTFamily: ModelFamily {
    public static let modelTypes = ["opt"]
    public static func blockPrefix(_ i: Int) -> String { "model.decoder.layers.\(i)." }
    public static var tokenEmbedding: String { "model.decoder.embed_tokens.weight" }
    public static var finalNorm: [String] { ["model.decoder.final_layer_norm.weight", "model.decoder.final_layer_norm.bias"] }

    public static func decode(_ f: JSONFields) throws -> ModelConfig {
        if let act = try f.optionalString("activation_function"), act != "relu" {
            throw CheckpointError.invalidField(path: f.path, field: "activation_function", detail: "is '\(act)', expected 'relu'")
        }
        if try f.optionalBool("enable_bias") == false {
            throw CheckpointError.invalidField(path: f.path, field: "enable_bias", detail: "is false; OPT without biases is not supported")
        }
        let heads = try f.int("num_attention_heads")
        let hidden = try f.int("hidden_size")
        let before = try f.optionalBool("do_layer_norm_before") ?? true
        let removeFinal = try f.optionalBool("_remove_final_layer_norm") ?? false
        var c = ModelConfig(
            architecture: .opt, hiddenSize: hidden, intermediateSize: try f.int("ffn_dim"),
            layerCount: try f.int("num_hidden_layers"), headCount: heads, kvHeadCount: heads,
            vocabularySize: try f.int("vocab_size"), maxPositions: try f.int("max_position_embeddings"),
            normEps: 1e-5, tieWordEmbeddings: try f.optionalBool("tie_word_embeddings") ?? true,
            bosTokenID: try f.optionalInt("bos_token_id"), eosTokenID: try f.optionalInt("eos_token_id"),
            layerNormBefore: before, wordEmbedProjDim: try f.optionalInt("word_embed_proj_dim") ?? hidden,
            positionOffset: 2, finalLayerNorm: before && !removeFinal)
        c.activation = .relu
        return c
    }

    public static func huggingFaceFields(_ c: ModelConfig) -> [String: Any] {
        ["architectures": ["OPTForCausalLM"], "model_type": "opt", "ffn_dim": c.intermediateSize,
         "do_layer_norm_before": c.layerNormBefore, "_remove_final_layer_norm": c.layerNormBefore && !c.finalLayerNorm,
         "word_embed_proj_dim": c.wordEmbedProjDim, "activation_function": "relu", "enable_bias": true,
         "layer_norm_elementwise_affine": true]
    }

    public static func linears(_ c: ModelConfig, block i: Int) -> [String] {
        let p = blockPrefix(i)
        return ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"].map { p + $0 }
    }

    public static func blockTensors(_ c: ModelConfig, block i: Int) -> [BlockTensorSpec] {
        let p = blockPrefix(i)
        let h = c.hiddenSize, f = c.intermediateSize
        let shapes = [(h, h), (h, h), (h, h), (h, h), (f, h), (h, f)]
        var t: [BlockTensorSpec] = []
        for (name, (rows, cols)) in zip(linears(c, block: i), shapes) {
            t += [BlockTensorSpec(name + ".weight", rows, cols), BlockTensorSpec(vector: name + ".bias", rows)]
        }
        for norm in ["self_attn_layer_norm", "final_layer_norm"] {
            t += [BlockTensorSpec(vector: p + norm + ".weight", h), BlockTensorSpec(vector: p + norm + ".bias", h)]
        }
        return t
    }

    public static func inputGroups(_ c: ModelConfig, block i: Int) -> [[String]] {
        let l = linears(c, block: i)
        return [Array(l[0..<3]), [l[3]], [l[4]], [l[5]]]
    }

    public static func feedForwards(_ c: ModelConfig, block i: Int) -> [FeedForward] {
        [.plain(fc1: blockPrefix(i) + "fc1", fc2: blockPrefix(i) + "fc2")]
    }

    public static func linearMACsPerToken(_ c: ModelConfig) -> Int {
        4 * c.hiddenSize * c.hiddenSize + 2 * c.hiddenSize * c.intermediateSize
    }

    static func attention(block i: Int) -> AttentionLayer { AttentionLayer(prefix: blockPrefix(i), output: "self_attn.out_proj") }

    /// Pre-LN: x + attend(LN(x)), then + fc2(relu(fc1(LN(·)))). Post-LN: LN(x + attend(x)), then LN(· + fc2(relu(fc1(·)))).
    public static func forward(_ b: DeviceBlock, _ x: Tensor, _ pass: inout BlockPass) -> Tensor {
        let p = blockPrefix(b.index)
        let pre = b.config.layerNormBefore
        let attnNorm = (p + "self_attn_layer_norm.weight", p + "self_attn_layer_norm.bias")
        let ffnNorm = (p + "final_layer_norm.weight", p + "final_layer_norm.bias")
        let a = pre ? b.layerNorm(x, attnNorm.0, attnNorm.1) : x
        let h = b.residual(x, plus: attention(block: b.index).forward(b, a, &pass))
        pass.keep("residual", h)
        let afterAttention = pre ? h : b.layerNorm(h, attnNorm.0, attnNorm.1)
        let f = pre ? b.layerNorm(afterAttention, ffnNorm.0, ffnNorm.1) : afterAttention
        let r = b.apply(p + "fc1", f, pass.observer)
        pass.keep("mlp.in", f)
        pass.keep("mlp.f", r)
        let m = b.backend.map(r, .relu)
        pass.keep("mlp.m", m)
        let y = b.residual(afterAttention, plus: b.apply(p + "fc2", m, pass.observer))
        guard !pre else { return y }
        pass.keep("output.residual", y)
        return b.layerNorm(y, ffnNorm.0, ffnNorm.1)
    }

    public static func weightGradients(_ b: DeviceBlock, _ dy: Tensor, _ tape: BlockTape) -> [String: Tensor] {
        let p = blockPrefix(b.index)
        let backend = b.backend
        let attnNorm = p + "self_attn_layer_norm.weight"
        let ffnNorm = p + "final_layer_norm.weight"
        var grads: [String: Tensor] = [:]
        // Post-LN: y = LN2(y0); pre-LN: y is y0.
        let dy0 = b.config.layerNormBefore ? dy : b.layerNormBackward(tape.value("output.residual"), ffnNorm, dy)
        grads[p + "fc2"] = backend.matmul(dy0, .transposed, tape.value("mlp.m"), .none)
        let df = backend.matmul(dy0, b.weight(p + "fc2"))
        backend.reluBackward(df, input: tape.value("mlp.f"))
        grads[p + "fc1"] = backend.matmul(df, .transposed, tape.value("mlp.in"), .none)
        let dFFNInput = backend.matmul(df, b.weight(p + "fc1"))
        let dh: Tensor
        if b.config.layerNormBefore {
            // y0 = h + FFN(LN2(h)).
            dh = b.layerNormBackward(tape.value("residual"), ffnNorm, dFFNInput)
            backend.add(dy0, into: dh)
        } else {
            // y0 = LN1(h) + FFN(LN1(h)).
            dh = b.layerNormBackward(tape.value("residual"), attnNorm, b.sum(dFFNInput, dy0))
        }
        attention(block: b.index).backward(b, dh, tape, into: &grads)
        return grads
    }
}
