import Foundation
import TopiaryTensor
import TopiaryTokenizers

/// The model families Topiary runs; each has one file under Families/ that knows its blocks.
public enum Architecture: String, Sendable, Codable, CaseIterable {
    case llama, mistral, qwen2, qwen3, gemma2, phi3, mixtral, opt
    case qwen3MoE = "qwen3_moe"

    /// The family file that knows this architecture's blocks, config and checkpoint names.
    public var family: any ModelFamily.Type {
        switch self {
        case .llama: return LlamaFamily.self
        case .mistral: return MistralFamily.self
        case .qwen2: return Qwen2Family.self
        case .qwen3: return Qwen3Family.self
        case .gemma2: return Gemma2Family.self
        case .phi3: return Phi3Family.self
        case .mixtral: return MixtralFamily.self
        case .qwen3MoE: return Qwen3MoEFamily.self
        case .opt: return OPTFamily.self
        }
    }

    /// Families whose blocks are the LLaMA pattern (RMSNorm, RoPE, gated feed-forward).
    public var isLlamaLike: Bool { self != .opt }
}

/// The activation of a feed-forward network.
public enum Activation: String, Sendable, Codable {
    case silu, geluTanh = "gelu_pytorch_tanh", relu
}

/// How RoPE frequencies are rescaled for long contexts (config.json `rope_scaling` / `rope_parameters`).
public enum RopeScaling: Sendable, Equatable, Codable {
    /// Every frequency divided by `factor`.
    case linear(factor: Float)
    /// NTK-aware: theta grows with the sequence beyond `maxPositions` (transformers' "dynamic").
    case dynamic(factor: Float)
    /// Llama-3.1: long wavelengths divided by `factor`, short ones kept, a smooth ramp between.
    case llama3(factor: Float, lowFrequencyFactor: Float, highFrequencyFactor: Float, originalMaxPositions: Int)
}

/// Hyper-parameters of a decoder-only model, whatever file it came from.
///
/// Field names follow the paper/user vocabulary; each family file reads and writes the Hugging
/// Face `config.json` spelling.
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
    /// Every end-of-sequence id (Llama-3 lists several); `eosTokenID` is the first.
    public var eosTokenIDs: [Int] = []
    // LLaMA-like families
    public var ropeTheta: Float
    public var ropeLayout: RopeLayout
    public var ropeScaling: RopeScaling? = nil
    /// transformers rounds RoPE frequencies to the model's dtype (bf16/fp16 checkpoints).
    public var ropeFrequencyRounding: Kernels.FrequencyRounding = .none
    public var activation: Activation = .silu
    /// Biases on the q/k/v projections (Qwen2; LLaMA with attention_bias) and on o_proj (LLaMA with attention_bias).
    public var qkvBias = false
    public var outputBias = false
    /// RMSNorm over each head's queries and keys before RoPE (Qwen3).
    public var qkNorm = false
    /// Sliding-window attention: a query sees itself and the `window - 1` keys before it, in
    /// the blocks where `slidingLayers` is true (all blocks when it is nil).
    public var slidingWindow: Int? = nil
    public var slidingLayers: [Bool]? = nil
    /// Gemma-2: tanh soft-capping of attention scores and of the final logits.
    public var attentionSoftcap: Float? = nil
    public var finalLogitSoftcap: Float? = nil
    /// Attention scores are scaled by 1/sqrt(queryScaleBase) (Gemma-2's query_pre_attn_scalar; default head_dim).
    public var queryScaleBase: Float? = nil
    /// Embeddings are multiplied by this (Gemma-2: sqrt(hidden_size)).
    public var embeddingScale: Float? = nil
    /// Mixture of experts (Mixtral): experts per block and experts chosen per token.
    public var expertCount = 0
    public var expertsPerToken = 0
    /// Each expert's hidden width (Qwen3-MoE's moe_intermediate_size; 0: intermediateSize).
    public var expertIntermediateSize = 0
    /// The chosen experts' weights are renormalised to sum to 1 (Mixtral; Qwen3-MoE's norm_topk_prob).
    public var normalizeTopK = true
    /// Which blocks have experts (nil: all, when expertCount > 0); the others have a dense feed-forward.
    public var expertLayers: [Bool]? = nil
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
        self.eosTokenIDs = eosTokenID.map { [$0] } ?? []
        self.ropeTheta = ropeTheta
        self.ropeLayout = ropeLayout
        self.layerNormBefore = layerNormBefore
        self.wordEmbedProjDim = wordEmbedProjDim ?? hiddenSize
        self.positionOffset = positionOffset
        self.finalLayerNorm = finalLayerNorm
        if architecture == .opt { activation = .relu }
    }

    public var family: any ModelFamily.Type { architecture.family }

    /// Whether block `i` has a mixture of experts.
    public func hasExperts(block i: Int) -> Bool {
        guard expertCount > 0 else { return false }
        guard let expertLayers else { return true }
        return i < expertLayers.count && expertLayers[i]
    }

    /// The hidden width of each expert.
    public var expertWidth: Int { expertIntermediateSize > 0 ? expertIntermediateSize : intermediateSize }
    public var queryDim: Int { headCount * headDim }
    public var kvDim: Int { kvHeadCount * headDim }

    /// The attention window of block `i` (nil: full causal attention).
    public func window(block i: Int) -> Int? {
        guard let slidingWindow else { return nil }
        if let slidingLayers { return i < slidingLayers.count && slidingLayers[i] ? slidingWindow : nil }
        return slidingWindow
    }

    /// Upper bounds far above any real model, so that a corrupt or hostile value is refused by
    /// name before anything is sized by it, and no product of two of them can overflow.
    public static let maxHiddenSize = 1 << 20
    public static let maxIntermediateSize = 1 << 22
    public static let maxLayers = 1 << 16
    public static let maxHeads = 1 << 16
    public static let maxHeadDim = 1 << 16
    public static let maxVocabulary = 1 << 24
    public static let maxPositionsLimit = 1 << 26
    public static let maxExperts = 1 << 12

    /// Checks the relations between fields that the forward pass relies on. `fieldNames` renames
    /// fields in errors for sources that spell them differently (GGUF: "llama.block_count" for
    /// "num_hidden_layers").
    public func validate(path: String, fieldNames: [String: String] = [:]) throws {
        func check(_ ok: Bool, _ field: String, _ detail: String) throws {
            if !ok { throw CheckpointError.invalidField(path: path, field: fieldNames[field] ?? field, detail: detail) }
        }
        func range(_ v: Int, _ field: String, _ max: Int) throws {
            try check(v > 0, field, "is \(v), expected a positive number")
            try check(v <= max, field, "is \(v), implausibly large (at most \(max))")
        }
        try range(hiddenSize, "hidden_size", Self.maxHiddenSize)
        try range(intermediateSize, architecture == .opt ? "ffn_dim" : "intermediate_size", Self.maxIntermediateSize)
        try range(layerCount, "num_hidden_layers", Self.maxLayers)
        try range(headCount, "num_attention_heads", Self.maxHeads)
        try check(kvHeadCount > 0 && kvHeadCount <= headCount && headCount % kvHeadCount == 0, "num_key_value_heads",
                  "is \(kvHeadCount), expected a divisor of num_attention_heads (\(headCount))")
        try check(headDim > 0 && headDim % 2 == 0, "head_dim", "is \(headDim), expected a positive even number")
        try check(headDim <= Self.maxHeadDim, "head_dim", "is \(headDim), implausibly large (at most \(Self.maxHeadDim))")
        try range(vocabularySize, "vocab_size", Self.maxVocabulary)
        try range(maxPositions, "max_position_embeddings", Self.maxPositionsLimit)
        if architecture == .opt {
            try range(wordEmbedProjDim, "word_embed_proj_dim", Self.maxHiddenSize)
        }
        try check(normEps.isFinite && normEps > 0, architecture == .opt ? "layer_norm_eps" : "rms_norm_eps", "is \(normEps), expected a positive number")
        if architecture.isLlamaLike {
            try check(ropeTheta.isFinite && ropeTheta > 0, "rope_theta", "is \(ropeTheta), expected a positive number")
        }
        if let slidingWindow { try check(slidingWindow > 0, "sliding_window", "is \(slidingWindow), expected a positive number or null") }
        if let slidingLayers {
            try check(slidingLayers.count == layerCount, "layer_types", "has \(slidingLayers.count) entries, expected num_hidden_layers (\(layerCount))")
        }
        for (field, v) in [("attn_logit_softcapping", attentionSoftcap), ("final_logit_softcapping", finalLogitSoftcap),
                           ("query_pre_attn_scalar", queryScaleBase)] {
            if let v { try check(v.isFinite && v > 0, field, "is \(v), expected a positive number or null") }
        }
        if architecture == .mixtral || architecture == .qwen3MoE {
            try range(expertCount, architecture == .mixtral ? "num_local_experts" : "num_experts", Self.maxExperts)
            try range(expertWidth, "moe_intermediate_size", Self.maxHiddenSize)
            try check(expertsPerToken > 0 && expertsPerToken <= expertCount, "num_experts_per_tok",
                      "is \(expertsPerToken), expected 1...\(expertCount)")
        }
        if architecture == .opt {
            try check(queryDim == hiddenSize, "num_attention_heads", "gives \(headCount)x\(headDim) = \(queryDim), expected hidden_size \(hiddenSize)")
        }
        switch ropeScaling {
        case .linear(let f)?, .dynamic(let f)?:
            try check(f.isFinite && f >= 1, "rope_scaling.factor", "is \(f), expected a number >= 1")
        case .llama3(let f, let low, let high, let original)?:
            try check(f.isFinite && f >= 1, "rope_scaling.factor", "is \(f), expected a number >= 1")
            try check(low.isFinite && high.isFinite && low > 0 && high > low, "rope_scaling.high_freq_factor",
                      "is \(high) with low_freq_factor \(low), expected 0 < low_freq_factor < high_freq_factor")
            try check(original > 0, "rope_scaling.original_max_position_embeddings", "is \(original), expected a positive number")
        case nil: break
        }
    }

    /// Checks the configuration against the tensors `weights` holds: block tensors for exactly
    /// blocks 0..<layerCount, and a token embedding of [vocab_size, hidden_size] (when the file
    /// holds it in a type this reader decodes). Nothing is sized by a count the file does not back.
    public func validate(against weights: any TensorSource, path: String) throws {
        let prefix = family.blockPrefix(0).dropLast(2)  // "model.layers."
        try Self.checkBlocks(Self.blockIndices(weights.tensorNames, prefix: String(prefix)), layerCount: layerCount,
                             path: path, field: "num_hidden_layers", tensorPrefix: String(prefix))
        let name = family.tokenEmbedding
        try checkEmbedding(weights.entry(name), name: name, path: path)
    }

    /// The block numbers N of tensors named `prefix`N`.`..., sorted, each once.
    public static func blockIndices(_ names: [String], prefix: String) -> [Int] {
        var found = Set<Int>()
        for name in names where name.hasPrefix(prefix) {
            let rest = name.utf8.dropFirst(prefix.utf8.count)
            let digits = rest.prefix { $0 >= 0x30 && $0 <= 0x39 }
            guard !digits.isEmpty, digits.count <= 9, rest.dropFirst(digits.count).first == UInt8(ascii: "."),
                  let n = Int(String(decoding: digits, as: UTF8.self)) else { continue }
            found.insert(n)
        }
        return found.sorted()
    }

    /// Refuses a block count that disagrees with the blocks the file has tensors for.
    public static func checkBlocks(_ indices: [Int], layerCount: Int, path: String, field: String, tensorPrefix: String) throws {
        if indices == Array(0..<max(layerCount, 0)) { return }
        let detail: String
        if indices.isEmpty {
            detail = "is \(layerCount), but the checkpoint has no block tensors (\(tensorPrefix)N.*)"
        } else if let missing = (0...indices.last!).first(where: { !indices.contains($0) }) {
            detail = "is \(layerCount), but the checkpoint has tensors for \(indices.count) blocks between \(tensorPrefix)0 and \(tensorPrefix)\(indices.last!); \(tensorPrefix)\(missing) has none"
        } else {
            let which = indices.count == 1 ? "1 block (\(tensorPrefix)0)" : "\(indices.count) blocks (\(tensorPrefix)0 to \(tensorPrefix)\(indices.last!))"
            detail = "is \(layerCount), but the checkpoint has tensors for \(which)"
        }
        throw CheckpointError.invalidField(path: path, field: field, detail: detail)
    }

    /// Refuses a token embedding whose shape is not [vocab_size, hidden_size] (the embedding width
    /// for OPT-350m); an absent entry (missing, or of a type not decoded) is left to loading.
    public func checkEmbedding(_ entry: TensorEntry?, name: String, path: String, vocabField: String = "vocab_size",
                               hiddenField: String = "hidden_size") throws {
        guard let entry else { return }
        let width = architecture == .opt ? wordEmbedProjDim : hiddenSize
        let expected = [vocabularySize, width]
        let count = ShapeMath.elementCount(entry.shape)
        if entry.shape == expected || (entry.shape.count == 1 && count == vocabularySize * width) { return }
        throw CheckpointError.shapeMismatch(path: path, tensor: name,
                                            expected: "\(expected) (\(vocabField) \(vocabularySize) x \(hiddenField) \(width))",
                                            found: "\(entry.shape)")
    }

    // MARK: Hugging Face config.json

    /// Reads a Hugging Face `config.json`; the family named by `model_type` decodes the rest.
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
        guard let architecture = Architecture.allCases.first(where: { $0.family.modelTypes.contains(modelType) }) else {
            let known = Architecture.allCases.flatMap { $0.family.modelTypes }.joined(separator: ", ")
            throw CheckpointError.unsupportedModel(path: path, detail: "model_type '\(modelType)' (supported: \(known))")
        }
        let config = try architecture.family.decode(fields)
        try config.validate(path: path)
        return config
    }

    /// A Hugging Face `config.json` for this model (Q/K in rotate-half layout), for sources that
    /// have none (GGUF, llama2.c); a Hugging Face source's own config.json is carried over instead.
    public func huggingFaceConfig(dtype: String = "float32") -> [String: Any] {
        var c: [String: Any] = [
            "hidden_size": hiddenSize, "num_attention_heads": headCount, "num_hidden_layers": layerCount,
            "vocab_size": vocabularySize, "max_position_embeddings": maxPositions,
            "tie_word_embeddings": tieWordEmbeddings, "torch_dtype": dtype,
        ]
        if let bosTokenID { c["bos_token_id"] = bosTokenID }
        if eosTokenIDs.count > 1 { c["eos_token_id"] = eosTokenIDs } else if let eosTokenID { c["eos_token_id"] = eosTokenID }
        for (key, value) in family.huggingFaceFields(self) { c[key] = value }
        return c
    }

    /// The config.json fields that every LLaMA-like family writes the same way.
    func llamaLikeFields() -> [String: Any] {
        var c: [String: Any] = [
            "intermediate_size": intermediateSize, "num_key_value_heads": kvHeadCount, "head_dim": headDim,
            "rms_norm_eps": normEps, "rope_theta": ropeTheta, "hidden_act": activation.rawValue,
        ]
        switch ropeScaling {
        case .linear(let f)?: c["rope_scaling"] = ["rope_type": "linear", "factor": f] as [String: Any]
        case .dynamic(let f)?: c["rope_scaling"] = ["rope_type": "dynamic", "factor": f] as [String: Any]
        case .llama3(let f, let low, let high, let original)?:
            c["rope_scaling"] = ["rope_type": "llama3", "factor": f, "low_freq_factor": low, "high_freq_factor": high,
                                 "original_max_position_embeddings": original] as [String: Any]
        case nil: break
        }
        if let slidingWindow, slidingLayers == nil { c["sliding_window"] = slidingWindow }
        return c
    }

    /// Reads the fields that every LLaMA-like family spells the same way (transformers 4.x and 5).
    static func llamaLike(_ architecture: Architecture, _ f: JSONFields) throws -> ModelConfig {
        let heads = try f.int("num_attention_heads")
        var c = ModelConfig(
            architecture: architecture, hiddenSize: try f.int("hidden_size"), intermediateSize: try f.int("intermediate_size"),
            layerCount: try f.count("num_hidden_layers", max: maxLayers), headCount: heads,
            kvHeadCount: try f.optionalInt("num_key_value_heads") ?? heads,
            headDim: try f.optionalInt("head_dim"), vocabularySize: try f.int("vocab_size"),
            maxPositions: try f.optionalInt("max_position_embeddings") ?? 2048,
            normEps: Float(try f.optionalDouble("rms_norm_eps") ?? 1e-6),
            tieWordEmbeddings: try f.optionalBool("tie_word_embeddings") ?? false,
            bosTokenID: try f.optionalInt("bos_token_id"), ropeLayout: .rotateHalf)
        // Families size per-block lists by the block count before validate runs: bound it first.
        guard (1...Self.maxLayers).contains(c.layerCount) else {
            throw CheckpointError.invalidField(path: f.path, field: "num_hidden_layers", detail: "is \(c.layerCount), expected 1...\(Self.maxLayers)")
        }
        c.eosTokenIDs = try f.intOrIntList("eos_token_id")
        c.eosTokenID = c.eosTokenIDs.first
        try c.readRope(f)
        if let act = try f.optionalString("hidden_act") ?? f.optionalString("hidden_activation") {
            guard let a = Activation(rawValue: act), a != .relu else {
                throw CheckpointError.invalidField(path: f.path, field: "hidden_act", detail: "is '\(act)', expected 'silu' or 'gelu_pytorch_tanh'")
            }
            c.activation = a
        }
        if try f.optionalBool("mlp_bias") == true {
            throw CheckpointError.invalidField(path: f.path, field: "mlp_bias", detail: "is true; biased feed-forward projections are not supported")
        }
        if try f.optionalBool("attention_bias") == true { c.qkvBias = true; c.outputBias = true }
        let dtype = try f.optionalString("torch_dtype") ?? f.optionalString("dtype")
        switch dtype {
        case "bfloat16": c.ropeFrequencyRounding = .bfloat16
        case "float16": c.ropeFrequencyRounding = .float16
        default: break
        }
        if let types = try f.optionalStringList("layer_types") {
            c.slidingLayers = try types.map { t in
                switch t {
                case "full_attention": return false
                case "sliding_attention": return true
                default: throw CheckpointError.invalidField(path: f.path, field: "layer_types", detail: "has '\(t)', expected 'full_attention' or 'sliding_attention'")
                }
            }
        }
        return c
    }

    /// RoPE theta and scaling: transformers 4.x `rope_theta` + `rope_scaling`, or transformers 5 `rope_parameters`.
    mutating func readRope(_ f: JSONFields) throws {
        var theta = try f.optionalDouble("rope_theta")
        var scaling: JSONFields?
        var scalingField = "rope_scaling"
        if let s = try f.optionalObject("rope_scaling") { scaling = s }
        if let p = try f.optionalObject("rope_parameters") {
            scalingField = "rope_parameters"
            scaling = p
            if let t = try p.optionalDouble("rope_theta") { theta = t }
        }
        ropeTheta = Float(theta ?? 10000)
        guard let s = scaling else { return }
        let type = try s.optionalString("rope_type") ?? s.optionalString("type") ?? "default"
        func factor() throws -> Float {
            guard let v = try s.optionalDouble("factor") else { throw CheckpointError.missingField(path: f.path, field: "\(scalingField).factor") }
            return Float(v)
        }
        switch type {
        case "default": ropeScaling = nil
        case "linear": ropeScaling = .linear(factor: try factor())
        case "dynamic": ropeScaling = .dynamic(factor: try factor())
        case "llama3":
            ropeScaling = .llama3(factor: try factor(), lowFrequencyFactor: Float(try s.optionalDouble("low_freq_factor") ?? 1),
                                  highFrequencyFactor: Float(try s.optionalDouble("high_freq_factor") ?? 4),
                                  originalMaxPositions: try s.optionalInt("original_max_position_embeddings") ?? 8192)
        default:
            throw CheckpointError.invalidField(path: f.path, field: "\(scalingField).rope_type",
                                               detail: "is '\(type)', which Topiary does not implement (supported: default, linear, dynamic, llama3)")
        }
    }
}

/// Typed access to a JSON object's fields with errors naming the file and field.
public struct JSONFields {
    public let path: String
    public let json: [String: Any]
    /// Prefix of field names in errors ("rope_scaling." inside that object).
    var prefix = ""

    init(path: String, json: [String: Any], prefix: String = "") {
        self.path = path
        self.json = json
        self.prefix = prefix
    }

    func invalid(_ key: String, _ v: Any, _ expected: String) -> CheckpointError {
        let shown = v is String ? "\"\(v)\" (a string)" : "\(v)"
        return CheckpointError.invalidField(path: path, field: prefix + key, detail: "is \(shown), expected \(expected)")
    }

    func present(_ key: String) -> Any? {
        guard let v = json[key], !(v is NSNull) else { return nil }
        return v
    }

    func string(_ key: String) throws -> String {
        guard let s = try optionalString(key) else { throw CheckpointError.missingField(path: path, field: prefix + key) }
        return s
    }

    func optionalString(_ key: String) throws -> String? {
        guard let v = present(key) else { return nil }
        guard let s = v as? String else { throw invalid(key, v, "a string") }
        return s
    }

    func int(_ key: String) throws -> Int {
        guard let v = try optionalInt(key) else { throw CheckpointError.missingField(path: path, field: prefix + key) }
        return v
    }

    /// A required count in 1...max (checked here, before anything is sized by it).
    func count(_ key: String, max: Int) throws -> Int {
        let v = try int(key)
        guard v > 0, v <= max else {
            throw CheckpointError.invalidField(path: path, field: prefix + key,
                                               detail: v > 0 ? "is \(v), implausibly large (at most \(max))" : "is \(v), expected a positive number")
        }
        return v
    }

    func optionalInt(_ key: String) throws -> Int? {
        guard let v = present(key) else { return nil }
        guard let i = Self.integer(v) else { throw invalid(key, v, "an integer") }
        return i
    }

    static func integer(_ v: Any) -> Int? {
        guard let n = v as? NSNumber, !isBoolean(n) else { return nil }
        let d = n.doubleValue
        return d == d.rounded() && abs(d) < 1e15 ? Int(d) : nil
    }

    /// An integer or a list of integers (Llama-3's eos_token_id); empty when absent.
    func intOrIntList(_ key: String) throws -> [Int] {
        guard let v = present(key) else { return [] }
        if let i = Self.integer(v) { return [i] }
        if let list = v as? [Any] {
            let ids = list.compactMap(Self.integer)
            if ids.count == list.count { return ids }
        }
        throw invalid(key, v, "an integer or a list of integers")
    }

    static func isBoolean(_ n: NSNumber) -> Bool { OrderedJSON.isBoolean(n) }

    func optionalBool(_ key: String) throws -> Bool? {
        guard let v = present(key) else { return nil }
        guard let n = v as? NSNumber, Self.isBoolean(n) else { throw invalid(key, v, "true or false") }
        return n.boolValue
    }

    func optionalDouble(_ key: String) throws -> Double? {
        guard let v = present(key) else { return nil }
        guard let n = v as? NSNumber, !Self.isBoolean(n), n.doubleValue.isFinite else { throw invalid(key, v, "a number") }
        return n.doubleValue
    }

    func optionalObject(_ key: String) throws -> JSONFields? {
        guard let v = present(key) else { return nil }
        guard let o = v as? [String: Any] else { throw invalid(key, v, "an object") }
        return JSONFields(path: path, json: o, prefix: prefix + key + ".")
    }

    func optionalIntList(_ key: String) throws -> [Int]? {
        guard let v = present(key) else { return nil }
        guard let list = v as? [Any] else { throw invalid(key, v, "a list of integers") }
        let ids = list.compactMap(Self.integer)
        guard ids.count == list.count else { throw invalid(key, v, "a list of integers") }
        return ids
    }

    func optionalStringList(_ key: String) throws -> [String]? {
        guard let v = present(key) else { return nil }
        guard let list = v as? [Any], let strings = list as? [String] else { throw invalid(key, v, "a list of strings") }
        return strings
    }
}
