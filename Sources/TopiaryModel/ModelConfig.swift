import Foundation
import TopiaryTensor

/// The model families Topiary runs.
public enum Architecture: String, Sendable, Codable {
    case llama
    case opt
}

/// Hyper-parameters of a decoder-only model, whatever file it came from.
///
/// Field names follow the paper/user vocabulary; `huggingFaceConfig()` writes the
/// Hugging Face `config.json` spelling.
public struct ModelConfig: Sendable, Equatable, Codable {
    public var architecture: Architecture
    public var hiddenSize: Int
    public var intermediateSize: Int
    public var layerCount: Int
    public var headCount: Int
    public var kvHeadCount: Int
    public var headDim: Int
    public var vocabularySize: Int
    public var maxPositions: Int
    public var normEps: Float
    public var tieWordEmbeddings: Bool
    public var bosTokenID: Int?
    public var eosTokenID: Int?
    // LLaMA
    public var ropeTheta: Float
    public var ropeLayout: RopeLayout
    /// transformers rounds RoPE frequencies to the model's dtype (bf16/fp16 checkpoints).
    public var ropeFrequencyRounding: Kernels.FrequencyRounding = .none
    // OPT
    /// Pre-LN (OPT-125m and larger except 350m) when true; post-LN (OPT-350m) when false.
    public var layerNormBefore: Bool
    /// OPT-350m embeds tokens in a smaller space and projects in and out of the hidden size.
    public var wordEmbedProjDim: Int
    /// OPT's learned positions start at this offset.
    public var positionOffset: Int
    public var finalLayerNorm: Bool

    public init(architecture: Architecture, hiddenSize: Int, intermediateSize: Int, layerCount: Int, headCount: Int,
                kvHeadCount: Int, headDim: Int? = nil, vocabularySize: Int, maxPositions: Int, normEps: Float,
                tieWordEmbeddings: Bool, bosTokenID: Int? = nil, eosTokenID: Int? = nil, ropeTheta: Float = 10000,
                ropeLayout: RopeLayout = .rotateHalf, layerNormBefore: Bool = true, wordEmbedProjDim: Int? = nil,
                positionOffset: Int = 2, finalLayerNorm: Bool = true) {
        self.architecture = architecture
        self.hiddenSize = hiddenSize
        self.intermediateSize = intermediateSize
        self.layerCount = layerCount
        self.headCount = headCount
        self.kvHeadCount = kvHeadCount
        self.headDim = headDim ?? (headCount > 0 ? hiddenSize / headCount : 0)
        self.vocabularySize = vocabularySize
        self.maxPositions = maxPositions
        self.normEps = normEps
        self.tieWordEmbeddings = tieWordEmbeddings
        self.bosTokenID = bosTokenID
        self.eosTokenID = eosTokenID
        self.ropeTheta = ropeTheta
        self.ropeLayout = ropeLayout
        self.layerNormBefore = layerNormBefore
        self.wordEmbedProjDim = wordEmbedProjDim ?? hiddenSize
        self.positionOffset = positionOffset
        self.finalLayerNorm = finalLayerNorm
    }

    public var queryDim: Int { headCount * headDim }
    public var kvDim: Int { kvHeadCount * headDim }

    /// Checks the relations between fields that the forward pass relies on.
    public func validate(path: String) throws {
        func check(_ ok: Bool, _ field: String, _ detail: String) throws {
            if !ok { throw CheckpointError.invalidField(path: path, field: field, detail: detail) }
        }
        try check(hiddenSize > 0, "hidden_size", "is \(hiddenSize), expected a positive number")
        try check(intermediateSize > 0, "intermediate_size", "is \(intermediateSize), expected a positive number")
        try check(layerCount > 0, "num_hidden_layers", "is \(layerCount), expected a positive number")
        try check(headCount > 0, "num_attention_heads", "is \(headCount), expected a positive number")
        try check(kvHeadCount > 0 && headCount % kvHeadCount == 0, "num_key_value_heads",
                  "is \(kvHeadCount), expected a divisor of num_attention_heads (\(headCount))")
        try check(headDim > 0 && headDim % 2 == 0, "head_dim", "is \(headDim), expected a positive even number")
        try check(vocabularySize > 0, "vocab_size", "is \(vocabularySize), expected a positive number")
        try check(maxPositions > 0, "max_position_embeddings", "is \(maxPositions), expected a positive number")
        if architecture == .opt {
            try check(queryDim == hiddenSize, "num_attention_heads", "gives \(headCount)x\(headDim) = \(queryDim), expected hidden_size \(hiddenSize)")
        }
    }

    // MARK: Hugging Face config.json

    /// Reads a Hugging Face `config.json` (LLaMA family or OPT).
    public static func fromHuggingFace(path: String) throws -> ModelConfig {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw CheckpointError.io(path: path, detail: "cannot read file")
        }
        let object: Any
        do { object = try JSONSerialization.jsonObject(with: data) } catch {
            throw CheckpointError.invalidHeader(path: path, detail: "not valid JSON")
        }
        guard let json = object as? [String: Any] else {
            throw CheckpointError.invalidHeader(path: path, detail: "expected a JSON object")
        }
        let fields = JSONFields(path: path, json: json)
        let modelType = try fields.string("model_type")
        var config: ModelConfig
        switch modelType {
        case "llama", "mistral", "qwen2":
            if let scaling = json["rope_scaling"] as? [String: Any] {
                let type = (scaling["rope_type"] ?? scaling["type"]) as? String ?? "?"
                if type != "default" {
                    throw CheckpointError.invalidField(path: path, field: "rope_scaling", detail: "has type '\(type)', which is not supported yet (only unscaled RoPE)")
                }
            }
            let heads = try fields.int("num_attention_heads")
            let hidden = try fields.int("hidden_size")
            var theta = try fields.optionalDouble("rope_theta")
            if theta == nil, let params = json["rope_parameters"] as? [String: Any] {
                theta = try JSONFields(path: path, json: params).optionalDouble("rope_theta")
                if let type = params["rope_type"] as? String, type != "default" {
                    throw CheckpointError.invalidField(path: path, field: "rope_parameters.rope_type", detail: "is '\(type)', which is not supported yet (only unscaled RoPE)")
                }
            }
            if let act = json["hidden_act"] as? String, act != "silu" {
                throw CheckpointError.invalidField(path: path, field: "hidden_act", detail: "is '\(act)', expected 'silu'")
            }
            if (json["attention_bias"] as? Bool) == true || (json["mlp_bias"] as? Bool) == true {
                throw CheckpointError.invalidField(path: path, field: "attention_bias", detail: "is true; biased LLaMA projections are not supported yet")
            }
            config = ModelConfig(
                architecture: .llama, hiddenSize: hidden, intermediateSize: try fields.int("intermediate_size"),
                layerCount: try fields.int("num_hidden_layers"), headCount: heads,
                kvHeadCount: try fields.optionalInt("num_key_value_heads") ?? heads,
                headDim: try fields.optionalInt("head_dim"), vocabularySize: try fields.int("vocab_size"),
                maxPositions: try fields.optionalInt("max_position_embeddings") ?? 2048,
                normEps: Float(try fields.optionalDouble("rms_norm_eps") ?? 1e-6),
                tieWordEmbeddings: (json["tie_word_embeddings"] as? Bool) ?? false,
                bosTokenID: try fields.optionalInt("bos_token_id"), eosTokenID: try fields.optionalInt("eos_token_id"),
                ropeTheta: Float(theta ?? 10000), ropeLayout: .rotateHalf)
            switch (json["torch_dtype"] ?? json["dtype"]) as? String {
            case "bfloat16": config.ropeFrequencyRounding = .bfloat16
            case "float16": config.ropeFrequencyRounding = .float16
            default: break
            }
        case "opt":
            if let act = json["activation_function"] as? String, act != "relu" {
                throw CheckpointError.invalidField(path: path, field: "activation_function", detail: "is '\(act)', expected 'relu'")
            }
            if (json["enable_bias"] as? Bool) == false {
                throw CheckpointError.invalidField(path: path, field: "enable_bias", detail: "is false; OPT without biases is not supported")
            }
            let heads = try fields.int("num_attention_heads")
            let hidden = try fields.int("hidden_size")
            let before = (json["do_layer_norm_before"] as? Bool) ?? true
            let removeFinal = (json["_remove_final_layer_norm"] as? Bool) ?? false
            config = ModelConfig(
                architecture: .opt, hiddenSize: hidden, intermediateSize: try fields.int("ffn_dim"),
                layerCount: try fields.int("num_hidden_layers"), headCount: heads, kvHeadCount: heads,
                vocabularySize: try fields.int("vocab_size"),
                maxPositions: try fields.int("max_position_embeddings"),
                normEps: 1e-5, tieWordEmbeddings: (json["tie_word_embeddings"] as? Bool) ?? true,
                bosTokenID: try fields.optionalInt("bos_token_id"), eosTokenID: try fields.optionalInt("eos_token_id"),
                layerNormBefore: before, wordEmbedProjDim: try fields.optionalInt("word_embed_proj_dim") ?? hidden,
                positionOffset: 2, finalLayerNorm: before && !removeFinal)
        default:
            throw CheckpointError.unsupportedModel(path: path, detail: "model_type '\(modelType)' (supported: llama, opt)")
        }
        try config.validate(path: path)
        return config
    }

    /// A Hugging Face `config.json` for this model (Q/K in rotate-half layout, fp32 weights).
    public func huggingFaceConfig(dtype: String = "float32") -> [String: Any] {
        var c: [String: Any] = [
            "hidden_size": hiddenSize, "num_attention_heads": headCount, "num_hidden_layers": layerCount,
            "vocab_size": vocabularySize, "max_position_embeddings": maxPositions,
            "tie_word_embeddings": tieWordEmbeddings, "torch_dtype": dtype,
        ]
        if let bosTokenID { c["bos_token_id"] = bosTokenID }
        if let eosTokenID { c["eos_token_id"] = eosTokenID }
        switch architecture {
        case .llama:
            c["architectures"] = ["LlamaForCausalLM"]
            c["model_type"] = "llama"
            c["intermediate_size"] = intermediateSize
            c["num_key_value_heads"] = kvHeadCount
            c["head_dim"] = headDim
            c["rms_norm_eps"] = Double(normEps)
            c["rope_theta"] = Double(ropeTheta)
            c["hidden_act"] = "silu"
            c["attention_bias"] = false
            c["mlp_bias"] = false
        case .opt:
            c["architectures"] = ["OPTForCausalLM"]
            c["model_type"] = "opt"
            c["ffn_dim"] = intermediateSize
            c["do_layer_norm_before"] = layerNormBefore
            c["_remove_final_layer_norm"] = layerNormBefore && !finalLayerNorm
            c["word_embed_proj_dim"] = wordEmbedProjDim
            c["activation_function"] = "relu"
            c["enable_bias"] = true
            c["layer_norm_elementwise_affine"] = true
        }
        return c
    }
}

/// Typed access to a JSON object's fields with errors naming the file and field.
struct JSONFields {
    let path: String
    let json: [String: Any]

    func string(_ key: String) throws -> String {
        guard let v = json[key] else { throw CheckpointError.missingField(path: path, field: key) }
        guard let s = v as? String else { throw CheckpointError.invalidField(path: path, field: key, detail: "is not a string") }
        return s
    }

    func int(_ key: String) throws -> Int {
        guard let v = try optionalInt(key) else { throw CheckpointError.missingField(path: path, field: key) }
        return v
    }

    func optionalInt(_ key: String) throws -> Int? {
        guard let v = json[key], !(v is NSNull) else { return nil }
        if let n = v as? NSNumber, !JSONFields.isBoolean(n) {
            let d = n.doubleValue
            if d == d.rounded(), abs(d) < 1e15 { return Int(d) }
        }
        throw CheckpointError.invalidField(path: path, field: key, detail: "is \(v), expected an integer")
    }

    static func isBoolean(_ n: NSNumber) -> Bool {
        String(cString: n.objCType) == "c" && (n == NSNumber(value: true) || n == NSNumber(value: false))
    }

    func optionalDouble(_ key: String) throws -> Double? {
        guard let v = json[key], !(v is NSNull) else { return nil }
        if let n = v as? NSNumber { return n.doubleValue }
        throw CheckpointError.invalidField(path: path, field: key, detail: "is \(v), expected a number")
    }
}
