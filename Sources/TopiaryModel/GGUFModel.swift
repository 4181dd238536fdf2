import Foundation
import TopiaryTensor

/// The GGUF architectures (`general.architecture`) Topiary opens, as llama.cpp's converter
/// (convert_hf_to_gguf.py) writes them. Mixtral has no architecture of its own: the converter
/// writes it as `llama` with `llama.expert_count` and stacked expert tensors.
///
/// What the converter does that a reader must undo or know:
/// - llama (and Mixtral): Q and K rows are permuted per head into adjacent-pair RoPE order
///   (llama.cpp's "normal" rope); the model is opened with `ropeLayout = .adjacentPairs`.
///   The experts' w1/w2/w3 of a block are stacked into 3-D `ffn_gate_exps` / `ffn_down_exps` /
///   `ffn_up_exps` ([experts, out, in]); the router is `ffn_gate_inp`.
/// - qwen2, qwen3, gemma2, phi3: NEOX (rotate-half) RoPE, rows not permuted: `.rotateHalf`.
/// - gemma2: every `*norm.weight` is stored with 1 added (llama.cpp's RMSNorm scales by w, the
///   Hugging Face one by 1 + w); the reader subtracts it again. lm_head is not written (tied).
///   `query_pre_attn_scalar` is not stored: llama.cpp scales scores by 1/sqrt(head_dim), and by
///   1/sqrt(hidden/heads) for the 46-block model (Gemma-2 27B); the reader does the same.
///   Missing soft-capping keys take llama.cpp's defaults (50 and 30).
/// - phi3: `attn_qkv` and `ffn_up` ([gate; up]) are the Hugging Face fused qkv_proj and
///   gate_up_proj, presented split as in a Hugging Face Phi-3 directory.
enum GGUFArchitecture: String, CaseIterable {
    case llama, qwen2, qwen3, gemma2, phi3

    static var supportedList: String {
        allCases.map(\.rawValue).joined(separator: ", ") + " (llama with llama.expert_count: Mixtral)"
    }
}

/// Typed access to `{arch}.*` metadata of a GGUF file, with errors naming the key.
struct GGUFKeys {
    let path: String
    let arch: String
    let meta: [String: GGUFValue]

    func key(_ name: String) -> String { arch + "." + name }

    func optionalInt(_ name: String) throws -> Int? {
        let k = key(name)
        guard let v = meta[k] else { return nil }
        guard let i = v.int else { throw CheckpointError.invalidField(path: path, field: k, detail: "is \(v), expected an integer") }
        return i
    }

    func int(_ name: String) throws -> Int {
        guard let i = try optionalInt(name) else { throw CheckpointError.missingField(path: path, field: key(name)) }
        return i
    }

    /// A required count in 1...max, checked before anything is sized by it.
    func count(_ name: String, max: Int) throws -> Int {
        let v = try int(name)
        guard v > 0, v <= max else {
            throw CheckpointError.invalidField(path: path, field: key(name),
                                               detail: v > 0 ? "is \(v), implausibly large (at most \(max))" : "is \(v), expected a positive number")
        }
        return v
    }

    /// A key outside `{arch}.` (tokenizer.ggml.*): an integer, or an error naming it.
    func optionalGeneralInt(_ k: String) throws -> Int? {
        guard let v = meta[k] else { return nil }
        guard let i = v.int else { throw CheckpointError.invalidField(path: path, field: k, detail: "is \(v), expected an integer") }
        return i
    }

    /// ModelConfig.validate's field names as this file spells them.
    var fieldNames: [String: String] {
        [
            "hidden_size": key("embedding_length"), "intermediate_size": key("feed_forward_length"),
            "num_hidden_layers": key("block_count"), "num_attention_heads": key("attention.head_count"),
            "num_key_value_heads": key("attention.head_count_kv"),
            "head_dim": arch == "llama" ? key("rope.dimension_count") : key("attention.key_length"),
            "vocab_size": meta[key("vocab_size")] != nil ? key("vocab_size") : "tokenizer.ggml.tokens",
            "max_position_embeddings": key("context_length"), "rms_norm_eps": key("attention.layer_norm_rms_epsilon"),
            "rope_theta": key("rope.freq_base"), "sliding_window": key("attention.sliding_window"),
            "attn_logit_softcapping": key("attn_logit_softcapping"), "final_logit_softcapping": key("final_logit_softcapping"),
            "num_local_experts": key("expert_count"), "num_experts_per_tok": key("expert_used_count"),
            "rope_scaling.factor": meta[key("rope.scaling.factor")] != nil ? key("rope.scaling.factor") : key("rope.scale_linear"),
        ]
    }

    func optionalDouble(_ name: String) throws -> Double? {
        let k = key(name)
        guard let v = meta[k] else { return nil }
        guard let d = v.double, d.isFinite else { throw CheckpointError.invalidField(path: path, field: k, detail: "is \(v), expected a number") }
        return d
    }

    func double(_ name: String) throws -> Double {
        guard let d = try optionalDouble(name) else { throw CheckpointError.missingField(path: path, field: key(name)) }
        return d
    }

    func optionalString(_ name: String) throws -> String? {
        let k = key(name)
        guard let v = meta[k] else { return nil }
        guard let s = v.string else { throw CheckpointError.invalidField(path: path, field: k, detail: "is \(v), expected a string") }
        return s
    }
}

extension LanguageModel {
    static func openGGUF(path: String, tokenizerPath: String?, embeddedTokenizer: Bool = true) throws -> LanguageModel {
        let gguf = try GGUFFile(path: path)
        let meta = gguf.metadata
        guard let archValue = meta["general.architecture"] else {
            throw CheckpointError.missingField(path: path, field: "general.architecture")
        }
        guard let arch = archValue.string.flatMap(GGUFArchitecture.init(rawValue:)) else {
            let name = archValue.string ?? "\(archValue)"
            throw CheckpointError.unsupportedModel(path: path, detail: "GGUF architecture '\(name)' (supported: \(GGUFArchitecture.supportedList))")
        }
        let keys = GGUFKeys(path: path, arch: arch.rawValue, meta: meta)
        let tokens = meta["tokenizer.ggml.tokens"]?.stringArray
        let config = arch == .llama ? try llamaGGUFConfig(gguf, keys) : try familyGGUFConfig(gguf, arch, keys)
        try config.validate(path: path, fieldNames: keys.fieldNames)
        // The block count must be the blocks the file has tensors for: one more or one less
        // would silently drop a block or ask for one that is not there.
        try ModelConfig.checkBlocks(ModelConfig.blockIndices(gguf.tensorNames, prefix: "blk."), layerCount: config.layerCount,
                                    path: path, field: keys.key("block_count"), tensorPrefix: "blk.")
        try config.checkEmbedding(gguf.entry("token_embd.weight"), name: "token_embd.weight", path: path,
                                  vocabField: keys.fieldNames["vocab_size"]!, hiddenField: keys.key("embedding_length"))
        let weights = FusedTensorSource.wrap(GGUFNames(gguf: gguf, config: config), config: config)
        var tokenizer = try externalTokenizer(tokenizerPath, vocabularySize: config.vocabularySize)
        if tokenizer == nil, embeddedTokenizer, tokens != nil { tokenizer = try ggufTokenizer(gguf) }
        return LanguageModel(path: path, format: .gguf, config: config, weights: weights, tokenizer: tokenizer)
    }

    /// The vocabulary size: `{arch}.vocab_size`, else the token list's length, else the embedding's rows.
    static func ggufVocabularySize(_ gguf: GGUFFile, _ keys: GGUFKeys) throws -> Int {
        if let v = try keys.optionalInt("vocab_size") { return v }
        return gguf.metadata["tokenizer.ggml.tokens"]?.array?.count ?? gguf.entry("token_embd.weight")?.shape.first ?? 0
    }

    /// llama (LLaMA, Mistral, SmolLM2, ...): read as it always has been (Q/K in adjacent-pair
    /// order); with `llama.expert_count` > 0, Mixtral.
    static func llamaGGUFConfig(_ gguf: GGUFFile, _ keys: GGUFKeys) throws -> ModelConfig {
        let heads = try keys.int("attention.head_count")
        let hidden = try keys.int("embedding_length")
        let vocab = try ggufVocabularySize(gguf, keys)
        let layers = try keys.count("block_count", max: ModelConfig.maxLayers)
        var config = ModelConfig(
            architecture: .llama, hiddenSize: hidden, intermediateSize: try keys.int("feed_forward_length"),
            layerCount: layers, headCount: heads,
            kvHeadCount: try keys.optionalInt("attention.head_count_kv") ?? heads,
            headDim: try keys.optionalInt("rope.dimension_count") ?? (heads > 0 ? hidden / heads : 0),
            vocabularySize: vocab, maxPositions: try keys.optionalInt("context_length") ?? 2048,
            normEps: Float(try keys.optionalDouble("attention.layer_norm_rms_epsilon") ?? 1e-5),
            tieWordEmbeddings: gguf.entry("output.weight") == nil && gguf.unsupportedTensors["output.weight"] == nil,
            bosTokenID: try keys.optionalGeneralInt("tokenizer.ggml.bos_token_id"),
            eosTokenID: try keys.optionalGeneralInt("tokenizer.ggml.eos_token_id"),
            ropeTheta: Float(try keys.optionalDouble("rope.freq_base") ?? 10000), ropeLayout: .adjacentPairs)
        if let experts = try keys.optionalInt("expert_count"), experts > 0 {
            config.architecture = .mixtral
            config.expertCount = experts
            config.expertsPerToken = try keys.int("expert_used_count")
        }
        return config
    }

    /// qwen2, qwen3, gemma2, phi3: the keys llama.cpp requires are required here too
    /// (embedding_length, block_count, feed_forward_length, attention.head_count, context_length,
    /// attention.layer_norm_rms_epsilon); the others take llama.cpp's defaults.
    static func familyGGUFConfig(_ gguf: GGUFFile, _ arch: GGUFArchitecture, _ k: GGUFKeys) throws -> ModelConfig {
        let meta = gguf.metadata
        let hidden = try k.int("embedding_length")
        let layers = try k.count("block_count", max: ModelConfig.maxLayers)
        let intermediate = try k.int("feed_forward_length")
        let heads = try k.int("attention.head_count")
        let maxPositions = try k.int("context_length")
        let eps = try k.double("attention.layer_norm_rms_epsilon")
        let kvHeads = try k.optionalInt("attention.head_count_kv") ?? heads
        let headDim = try k.optionalInt("attention.key_length") ?? (heads > 0 ? hidden / heads : 0)
        if let v = try k.optionalInt("attention.value_length"), v != headDim {
            throw CheckpointError.invalidField(path: k.path, field: k.key("attention.value_length"),
                                               detail: "is \(v), expected the key length \(headDim) (different key and value head sizes are not supported)")
        }
        if let rotary = try k.optionalInt("rope.dimension_count"), rotary != headDim {
            throw CheckpointError.invalidField(path: k.path, field: k.key("rope.dimension_count"),
                                               detail: "is \(rotary), expected the head size \(headDim); only full rotary embeddings are implemented")
        }
        let architecture: Architecture
        switch arch {
        case .qwen2: architecture = .qwen2
        case .qwen3: architecture = .qwen3
        case .gemma2: architecture = .gemma2
        case .phi3: architecture = .phi3
        case .llama: preconditionFailure("llama is read by llamaGGUFConfig")
        }
        var c = ModelConfig(
            architecture: architecture, hiddenSize: hidden, intermediateSize: intermediate, layerCount: layers,
            headCount: heads, kvHeadCount: kvHeads, headDim: headDim, vocabularySize: try ggufVocabularySize(gguf, k),
            maxPositions: maxPositions, normEps: Float(eps),
            tieWordEmbeddings: gguf.entry("output.weight") == nil && gguf.unsupportedTensors["output.weight"] == nil,
            bosTokenID: try k.optionalGeneralInt("tokenizer.ggml.bos_token_id"),
            eosTokenID: try k.optionalGeneralInt("tokenizer.ggml.eos_token_id"),
            ropeTheta: Float(try k.optionalDouble("rope.freq_base") ?? 10000), ropeLayout: .rotateHalf)
        c.ropeScaling = try ggufRopeScaling(k)
        switch arch {
        case .qwen2:
            c.qkvBias = true
        case .qwen3:
            c.qkNorm = true
        case .gemma2:
            c.activation = .geluTanh
            c.attentionSoftcap = Float(try k.optionalDouble("attn_logit_softcapping") ?? 50)
            c.finalLogitSoftcap = Float(try k.optionalDouble("final_logit_softcapping") ?? 30)
            // Not stored; llama.cpp uses head_dim, and hidden/heads for Gemma-2 27B (46 blocks),
            // which is what that model's query_pre_attn_scalar (144) is.
            c.queryScaleBase = Float(layers == 46 && heads > 0 ? hidden / heads : headDim)
            c.embeddingScale = Float(Double(hidden).squareRoot())
            if let window = try k.optionalInt("attention.sliding_window"), window > 0 {
                c.slidingWindow = window
                c.slidingLayers = (0..<layers).map { $0 % 2 == 0 }
            }
        case .phi3:
            if gguf.tensorNames.contains("rope_factors_long.weight") || meta[k.key("rope.scaling.attn_factor")] != nil {
                throw CheckpointError.unsupportedModel(path: k.path, detail: "Phi-3 with LongRoPE scaling (rope_factors_long/short) is not implemented")
            }
            // The converter writes 0 for "no sliding window".
            if let window = try k.optionalInt("attention.sliding_window"), window > 0 { c.slidingWindow = window }
        case .llama:
            break
        }
        return c
    }

    /// `{arch}.rope.scaling.type` (none or linear) and the older `{arch}.rope.scale_linear`.
    static func ggufRopeScaling(_ k: GGUFKeys) throws -> RopeScaling? {
        if let type = try k.optionalString("rope.scaling.type") {
            switch type {
            case "none": return nil
            case "linear":
                let factor = Float(try k.double("rope.scaling.factor"))
                return factor == 1 ? nil : .linear(factor: factor)
            default:
                throw CheckpointError.invalidField(path: k.path, field: k.key("rope.scaling.type"),
                                                   detail: "is '\(type)', which Topiary does not implement (supported: none, linear)")
            }
        }
        if let factor = try k.optionalDouble("rope.scale_linear"), factor != 1 { return .linear(factor: Float(factor)) }
        return nil
    }
}

/// Presents a GGUF file's tensors under Hugging Face checkpoint names: renames llama.cpp's
/// names per architecture, subtracts the 1 that llama.cpp's converter adds to Gemma's norms, and
/// cuts stacked expert tensors into one tensor per expert (read from that expert's bytes only).
/// Phi-3's fused tensors come out under their fused names (`FusedTensorSource` splits them).
final class GGUFNames: TensorSource, @unchecked Sendable {
    let gguf: GGUFFile
    let toGGUF: [String: String]
    /// Expert tensors: Hugging Face name -> (stacked GGUF name, expert index).
    let slices: [String: (tensor: String, index: Int)]
    /// Hugging Face names whose GGUF tensor holds 1 + w (Gemma's norms).
    let shifted: Set<String>
    let tensorNames: [String]
    var path: String { gguf.path }

    init(gguf: GGUFFile, config: ModelConfig) {
        self.gguf = gguf
        var map: [String: String] = [
            "model.embed_tokens.weight": "token_embd.weight",
            "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight",
        ]
        var slices: [String: (tensor: String, index: Int)] = [:]
        var shifted = Set<String>()
        let parts = Self.blockNames(config.architecture)
        for i in 0..<config.layerCount {
            for (hf, gg) in parts { map["model.layers.\(i).\(hf)"] = "blk.\(i).\(gg)" }
            if config.architecture == .mixtral {
                map["model.layers.\(i).block_sparse_moe.gate.weight"] = "blk.\(i).ffn_gate_inp.weight"
                for e in 0..<config.expertCount {
                    for (w, stacked, single) in [("w1", "ffn_gate_exps", "ffn_gate"), ("w2", "ffn_down_exps", "ffn_down"), ("w3", "ffn_up_exps", "ffn_up")] {
                        let hf = "model.layers.\(i).block_sparse_moe.experts.\(e).\(w).weight"
                        let legacy = "blk.\(i).\(single).\(e).weight"
                        // Older files hold one 2-D tensor per expert ("blk.N.ffn_gate.E.weight").
                        if gguf.entry(legacy) != nil || gguf.unsupportedTensors[legacy] != nil {
                            map[hf] = legacy
                        } else {
                            slices[hf] = ("blk.\(i).\(stacked).weight", e)
                        }
                    }
                }
            }
            if config.architecture == .gemma2 {
                for norm in ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"] {
                    shifted.insert("model.layers.\(i).\(norm).weight")
                }
            }
        }
        if config.architecture == .gemma2 { shifted.insert("model.norm.weight") }
        let inverse = Dictionary(map.map { ($1, $0) }, uniquingKeysWith: { a, _ in a })
        var stackedInverse: [String: [(Int, String)]] = [:]
        for (hf, s) in slices { stackedInverse[s.tensor, default: []].append((s.index, hf)) }
        toGGUF = map
        self.slices = slices
        self.shifted = shifted
        tensorNames = gguf.tensorNames.flatMap { g -> [String] in
            if let hf = inverse[g] { return [hf] }
            return (stackedInverse[g] ?? []).sorted { $0.0 < $1.0 }.map(\.1)
        }
    }

    /// (Hugging Face name within block, llama.cpp name within block) for each architecture.
    static func blockNames(_ arch: Architecture) -> [(String, String)] {
        let attention = [
            ("input_layernorm.weight", "attn_norm.weight"), ("self_attn.q_proj.weight", "attn_q.weight"),
            ("self_attn.k_proj.weight", "attn_k.weight"), ("self_attn.v_proj.weight", "attn_v.weight"),
            ("self_attn.o_proj.weight", "attn_output.weight"),
        ]
        let mlp = [("mlp.gate_proj.weight", "ffn_gate.weight"), ("mlp.up_proj.weight", "ffn_up.weight"), ("mlp.down_proj.weight", "ffn_down.weight")]
        let ffnNorm = [("post_attention_layernorm.weight", "ffn_norm.weight")]
        switch arch {
        case .qwen2:
            return attention + ffnNorm + mlp + [("self_attn.q_proj.bias", "attn_q.bias"), ("self_attn.k_proj.bias", "attn_k.bias"),
                                                ("self_attn.v_proj.bias", "attn_v.bias")]
        case .qwen3:
            return attention + ffnNorm + mlp + [("self_attn.q_norm.weight", "attn_q_norm.weight"), ("self_attn.k_norm.weight", "attn_k_norm.weight")]
        case .gemma2:
            return attention + mlp + [("post_attention_layernorm.weight", "post_attention_norm.weight"),
                                      ("pre_feedforward_layernorm.weight", "ffn_norm.weight"),
                                      ("post_feedforward_layernorm.weight", "post_ffw_norm.weight")]
        case .phi3:
            // Fused as in the Hugging Face checkpoint; files with separate attn_q/k/v work too.
            return attention + ffnNorm + [("self_attn.qkv_proj.weight", "attn_qkv.weight"), ("mlp.gate_up_proj.weight", "ffn_up.weight"),
                                          ("mlp.down_proj.weight", "ffn_down.weight")]
        case .mixtral:
            return attention + ffnNorm
        default:
            // llama: exactly the names this reader has always used.
            return [
                ("input_layernorm.weight", "attn_norm.weight"), ("self_attn.q_proj.weight", "attn_q.weight"), ("self_attn.k_proj.weight", "attn_k.weight"),
                ("self_attn.v_proj.weight", "attn_v.weight"), ("self_attn.o_proj.weight", "attn_output.weight"), ("post_attention_layernorm.weight", "ffn_norm.weight"),
                ("mlp.gate_proj.weight", "ffn_gate.weight"), ("mlp.up_proj.weight", "ffn_up.weight"), ("mlp.down_proj.weight", "ffn_down.weight"),
            ]
        }
    }

    func entry(_ name: String) -> TensorEntry? {
        if let s = slices[name] {
            guard var e = gguf.sliceEntry(s.tensor, index: s.index) else { return nil }
            e.name = name
            return e
        }
        guard let g = toGGUF[name], var e = gguf.entry(g) else { return nil }
        e.name = name
        return e
    }

    func prefetch(_ name: String) {
        // An expert's slice alone: its neighbours are other names, prefetched when asked for.
        if let s = slices[name] {
            if let e = gguf.sliceEntry(s.tensor, index: s.index) { gguf.prefetch(e) }
        } else if let g = toGGUF[name] {
            gguf.prefetch(g)
        }
    }

    func load(_ name: String) throws -> Matrix {
        if let s = slices[name] { return try gguf.loadSlice(s.tensor, index: s.index) }
        guard let g = toGGUF[name] else { throw CheckpointError.missingTensor(path: gguf.path, tensor: name) }
        return unshifted(try gguf.load(g), name)
    }

    func load(_ name: String, rows: Range<Int>) throws -> Matrix {
        guard slices[name] == nil, let g = toGGUF[name] else {
            // An expert's slice (or a missing name, which `load` reports): the whole slice, cut.
            return try loadWhole(name, rows: rows)
        }
        return unshifted(try gguf.load(g, rows: rows), name)
    }

    /// `m` less the 1 that llama.cpp adds to a `shifted` norm weight.
    private func unshifted(_ m: Matrix, _ name: String) -> Matrix {
        guard shifted.contains(name) else { return m }
        var m = m
        m.withUnsafeMutableBufferPointer { p in for i in p.indices { p[i] -= 1 } }
        return m
    }
}
