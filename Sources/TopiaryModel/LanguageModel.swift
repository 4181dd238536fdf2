import Foundation
import TopiaryTensor
import TopiaryTokenizers

/// The file format a model was read from.
public enum CheckpointFormat: String, Sendable {
    case gguf, llama2c = "llama2.c", huggingFace = "huggingface"
}

/// An opened model: configuration, lazily read weights under checkpoint names, and tokenizer.
/// Weights are read one tensor at a time; nothing here holds the whole model.
public final class LanguageModel: Sendable {
    public let path: String
    public let format: CheckpointFormat
    public let config: ModelConfig
    public let weights: any TensorSource
    public let tokenizer: (any Tokenizer)?

    public init(path: String, format: CheckpointFormat, config: ModelConfig, weights: any TensorSource, tokenizer: (any Tokenizer)?) {
        self.path = path
        self.format = format
        self.config = config
        self.weights = weights
        self.tokenizer = tokenizer
    }

    /// Opens a GGUF file, a llama2.c .bin (tokenizer from `tokenizerPath`) or a Hugging Face directory.
    public static func open(path: String, tokenizerPath: String? = nil) throws -> LanguageModel {
        var isDirectory: ObjCBool = false
        guard FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory) else {
            throw CheckpointError.io(path: path, detail: "no such file or directory")
        }
        let model: LanguageModel
        if isDirectory.boolValue {
            model = try openHuggingFace(directory: path, tokenizerPath: tokenizerPath)
        } else {
            let head = try MappedFile(path: path)
            let magic = try head.bytes(at: 0, count: min(4, head.size), what: "magic")
            if Array(magic) == Array("GGUF".utf8) {
                model = try openGGUF(path: path, tokenizerPath: tokenizerPath)
            } else if path.lowercased().hasSuffix(".gguf") {
                throw CheckpointError.badMagic(path: path, expected: "\"GGUF\"", found: GGUFFile.describeMagic(Array(magic)))
            } else if path.hasSuffix(".safetensors") {
                throw CheckpointError.io(path: path, detail: "a bare .safetensors file has no config; pass the directory that holds it and its config.json")
            } else {
                model = try openLlama2C(path: path, tokenizerPath: tokenizerPath)
            }
        }
        return model
    }

    static func externalTokenizer(_ path: String?, vocabularySize: Int) throws -> (any Tokenizer)? {
        guard let path else { return nil }
        if path.hasSuffix(".json") { return try HuggingFaceTokenizer.load(path: path) }
        return try Llama2CTokenizer(path: path, vocabularySize: vocabularySize)
    }

    static func openHuggingFace(directory: String, tokenizerPath: String?) throws -> LanguageModel {
        let configPath = (directory as NSString).appendingPathComponent("config.json")
        guard FileManager.default.fileExists(atPath: configPath) else {
            throw CheckpointError.io(path: directory, detail: "no config.json: expected a Hugging Face model directory")
        }
        let config = try ModelConfig.fromHuggingFace(path: configPath)
        let weights = FusedTensorSource.wrap(try ShardedSafeTensors.open(directory: directory), config: config)
        var tokenizer = try externalTokenizer(tokenizerPath, vocabularySize: config.vocabularySize)
        let tokPath = (directory as NSString).appendingPathComponent("tokenizer.json")
        if tokenizer == nil, FileManager.default.fileExists(atPath: tokPath) {
            tokenizer = try HuggingFaceTokenizer.load(path: tokPath)
        }
        return LanguageModel(path: directory, format: .huggingFace, config: config, weights: weights, tokenizer: tokenizer)
    }

    static func openLlama2C(path: String, tokenizerPath: String?) throws -> LanguageModel {
        let checkpoint = try Llama2CCheckpoint(path: path)
        let h = checkpoint.header
        let config = ModelConfig(
            architecture: .llama, hiddenSize: h.dim, intermediateSize: h.hiddenDim, layerCount: h.layerCount,
            headCount: h.headCount, kvHeadCount: h.kvHeadCount, vocabularySize: h.vocabularySize,
            maxPositions: h.sequenceLength, normEps: 1e-5, tieWordEmbeddings: h.sharedClassifier,
            bosTokenID: 1, eosTokenID: 2, ropeTheta: 10000, ropeLayout: .adjacentPairs)
        try config.validate(path: path)
        let tokenizer = try externalTokenizer(tokenizerPath, vocabularySize: config.vocabularySize)
        return LanguageModel(path: path, format: .llama2c, config: config, weights: checkpoint, tokenizer: tokenizer)
    }

    static func openGGUF(path: String, tokenizerPath: String?) throws -> LanguageModel {
        let gguf = try GGUFFile(path: path)
        let meta = gguf.metadata
        let arch = meta["general.architecture"]?.string ?? "?"
        guard arch == "llama" else {
            throw CheckpointError.unsupportedModel(path: path, detail: "GGUF architecture '\(arch)' (supported: llama)")
        }
        func int(_ key: String) throws -> Int {
            guard let v = meta[key] else { throw CheckpointError.missingField(path: path, field: key) }
            guard let i = v.int else { throw CheckpointError.invalidField(path: path, field: key, detail: "is not an integer") }
            return i
        }
        let heads = try int("llama.attention.head_count")
        let hidden = try int("llama.embedding_length")
        let tokens = meta["tokenizer.ggml.tokens"]?.stringArray
        let vocab = try meta["llama.vocab_size"] != nil ? int("llama.vocab_size") : (tokens?.count ?? gguf.entry("token_embd.weight")?.shape.first ?? 0)
        let renamed = GGUFNames(gguf: gguf, layerCount: try int("llama.block_count"))
        let config = ModelConfig(
            architecture: .llama, hiddenSize: hidden, intermediateSize: try int("llama.feed_forward_length"),
            layerCount: try int("llama.block_count"), headCount: heads,
            kvHeadCount: meta["llama.attention.head_count_kv"] != nil ? try int("llama.attention.head_count_kv") : heads,
            headDim: meta["llama.rope.dimension_count"]?.int ?? hidden / heads,
            vocabularySize: vocab, maxPositions: meta["llama.context_length"]?.int ?? 2048,
            normEps: Float(meta["llama.attention.layer_norm_rms_epsilon"]?.double ?? 1e-5),
            tieWordEmbeddings: gguf.entry("output.weight") == nil && gguf.unsupportedTensors["output.weight"] == nil,
            bosTokenID: meta["tokenizer.ggml.bos_token_id"]?.int, eosTokenID: meta["tokenizer.ggml.eos_token_id"]?.int,
            ropeTheta: Float(meta["llama.rope.freq_base"]?.double ?? 10000), ropeLayout: .adjacentPairs)
        try config.validate(path: path)
        var tokenizer = try externalTokenizer(tokenizerPath, vocabularySize: vocab)
        if tokenizer == nil, tokens != nil { tokenizer = try ggufTokenizer(gguf) }
        return LanguageModel(path: path, format: .gguf, config: config, weights: renamed, tokenizer: tokenizer)
    }

    /// The tokenizer stored in a GGUF file's metadata.
    public static func ggufTokenizer(_ gguf: GGUFFile) throws -> any Tokenizer {
        let meta = gguf.metadata
        let model = meta["tokenizer.ggml.model"]?.string ?? "?"
        guard model == "gpt2" else {
            throw CheckpointError.invalidField(path: gguf.path, field: "tokenizer.ggml.model", detail: "is '\(model)'; only 'gpt2' (byte-level BPE) is supported, pass --tokenizer")
        }
        let pre = meta["tokenizer.ggml.pre"]?.string ?? "gpt2"
        let preTokenizer: ByteLevelBPETokenizer.PreTokenizer
        switch pre {
        case "smollm", "starcoder", "refact", "codeshell": preTokenizer = .smollm
        case "llama-bpe", "llama3": preTokenizer = .llama3
        case "gpt2", "default": preTokenizer = .gpt2
        default:
            throw CheckpointError.invalidField(path: gguf.path, field: "tokenizer.ggml.pre", detail: "is '\(pre)', which is not supported (gpt2, smollm, llama-bpe)")
        }
        guard let tokens = meta["tokenizer.ggml.tokens"]?.stringArray else {
            throw CheckpointError.missingField(path: gguf.path, field: "tokenizer.ggml.tokens")
        }
        guard let merges = meta["tokenizer.ggml.merges"]?.stringArray else {
            throw CheckpointError.missingField(path: gguf.path, field: "tokenizer.ggml.merges")
        }
        let types = meta["tokenizer.ggml.token_type"]?.array?.compactMap(\.int)
        do {
            return try ByteLevelBPETokenizer(
                tokens: tokens, merges: merges, tokenTypes: types, preTokenizer: preTokenizer,
                bosID: meta["tokenizer.ggml.bos_token_id"]?.int, eosID: meta["tokenizer.ggml.eos_token_id"]?.int,
                unknownID: meta["tokenizer.ggml.unknown_token_id"]?.int,
                addsBOS: meta["tokenizer.ggml.add_bos_token"]?.bool ?? false)
        } catch {
            throw CheckpointError.invalidField(path: gguf.path, field: "tokenizer.ggml", detail: "\(error)")
        }
    }

    /// Loads decoder block `index` with shape checks.
    public func loadBlock(_ index: Int) throws -> DecoderBlock {
        try DecoderBlock.load(from: weights, config: config, index: index)
    }

    /// Loads a non-block tensor, checking its shape.
    public func loadTensor(_ name: String, rows: Int, cols: Int) throws -> Matrix {
        var m = try weights.load(name)
        if m.rows == 1 && rows != 1 && m.count == rows * cols { m = m.reshaped(rows: rows, cols: cols) }
        guard m.rows == rows && m.cols == cols else {
            throw CheckpointError.shapeMismatch(path: weights.path, tensor: name, expected: "[\(rows), \(cols)]", found: "[\(m.rows), \(m.cols)]")
        }
        return m
    }

    /// Token (and OPT position) embeddings and projections in front of the first block.
    public func loadEmbedding() throws -> Embedding {
        let c = config
        let tokens = try loadTensor(WeightNames.tokenEmbedding(c.architecture), rows: c.vocabularySize, cols: c.wordEmbedProjDim)
        var positions: Matrix?
        var projectIn: Matrix?
        if c.architecture == .opt {
            positions = try loadTensor(WeightNames.positionEmbedding, rows: c.maxPositions + c.positionOffset, cols: c.hiddenSize)
            if c.wordEmbedProjDim != c.hiddenSize {
                projectIn = try loadTensor(WeightNames.projectIn, rows: c.hiddenSize, cols: c.wordEmbedProjDim)
            }
        }
        return Embedding(config: c, tokens: tokens, positions: positions, projectIn: projectIn)
    }

    /// Final norm, projection and classifier after the last block.
    public func loadHead(embedding: Embedding? = nil) throws -> Head {
        let c = config
        var norm: (Matrix, Matrix?)?
        let names = WeightNames.finalNorm(c.architecture)
        if c.architecture != .opt || c.finalLayerNorm {
            norm = (try loadTensor(names[0], rows: 1, cols: c.hiddenSize),
                    names.count > 1 ? try loadTensor(names[1], rows: 1, cols: c.hiddenSize) : nil)
        }
        var projectOut: Matrix?
        if c.architecture == .opt && c.wordEmbedProjDim != c.hiddenSize {
            projectOut = try loadTensor(WeightNames.projectOut, rows: c.wordEmbedProjDim, cols: c.hiddenSize)
        }
        let classifier: Matrix
        if c.tieWordEmbeddings || weights.entry(WeightNames.lmHead) == nil && c.architecture == .opt {
            classifier = try embedding?.tokens ?? loadTensor(WeightNames.tokenEmbedding(c.architecture), rows: c.vocabularySize, cols: c.wordEmbedProjDim)
        } else {
            classifier = try loadTensor(WeightNames.lmHead, rows: c.vocabularySize, cols: c.wordEmbedProjDim)
        }
        return Head(config: c, norm: norm, projectOut: projectOut, classifier: classifier)
    }
}

/// Maps Hugging Face names onto a GGUF file's llama.cpp names.
final class GGUFNames: TensorSource, @unchecked Sendable {
    let gguf: GGUFFile
    let toGGUF: [String: String]
    let tensorNames: [String]
    var path: String { gguf.path }

    init(gguf: GGUFFile, layerCount: Int) {
        self.gguf = gguf
        var map: [String: String] = [
            "model.embed_tokens.weight": "token_embd.weight",
            "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight",
        ]
        let parts = [
            ("input_layernorm", "attn_norm"), ("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"),
            ("self_attn.v_proj", "attn_v"), ("self_attn.o_proj", "attn_output"), ("post_attention_layernorm", "ffn_norm"),
            ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"), ("mlp.down_proj", "ffn_down"),
        ]
        for i in 0..<layerCount {
            for (hf, gg) in parts { map["model.layers.\(i).\(hf).weight"] = "blk.\(i).\(gg).weight" }
        }
        let inverse = Dictionary(map.map { ($1, $0) }, uniquingKeysWith: { a, _ in a })
        toGGUF = map
        tensorNames = gguf.tensorNames.compactMap { inverse[$0] }
    }

    func entry(_ name: String) -> TensorEntry? {
        guard let g = toGGUF[name], var e = gguf.entry(g) else { return nil }
        e.name = name
        return e
    }

    func load(_ name: String) throws -> Matrix {
        guard let g = toGGUF[name] else { throw CheckpointError.missingTensor(path: gguf.path, tensor: name) }
        return try gguf.load(g)
    }
}

/// Turns token ids into the first block's input.
public struct Embedding: Sendable {
    public let config: ModelConfig
    public let tokens: Matrix
    public let positions: Matrix?
    public let projectIn: Matrix?

    /// Embeds `sequences` of equal length, concatenated: [sequences*length x hidden].
    public func embed(_ ids: [Int], sequenceLength: Int) -> Matrix {
        precondition(ids.count % sequenceLength == 0)
        let width = tokens.cols
        var x = Matrix(rows: ids.count, cols: width)
        x.withUnsafeMutableBufferPointer { px in
            tokens.withUnsafeBufferPointer { pt in
                for (r, id) in ids.enumerated() {
                    precondition(id >= 0 && id < tokens.rows, "token id \(id) outside the vocabulary of \(tokens.rows)")
                    (px.baseAddress! + r * width).update(from: pt.baseAddress! + id * width, count: width)
                }
            }
        }
        if let projectIn { x = Linalg.linear(x, projectIn) }
        if let scale = config.embeddingScale {
            x.withUnsafeMutableBufferPointer { p in for i in p.indices { p[i] *= scale } }
        }
        if let positions {
            let h = x.cols
            x.withUnsafeMutableBufferPointer { px in
                positions.withUnsafeBufferPointer { pp in
                    for r in 0..<ids.count {
                        let pos = r % sequenceLength + config.positionOffset
                        Kernels.add(pp.baseAddress! + pos * h, into: px.baseAddress! + r * h, h)
                    }
                }
            }
        }
        return x
    }
}

/// Final norm, optional projection, and the classifier.
public struct Head: Sendable {
    public let config: ModelConfig
    public let norm: (Matrix, Matrix?)?
    public let projectOut: Matrix?
    public let classifier: Matrix

    /// Hidden states after the final norm and projection: [rows x classifier.cols].
    public func features(_ x: Matrix) -> Matrix {
        var h = x
        if let norm {
            if config.architecture == .opt {
                h = ModelMath.layerNorm(h, norm.0, norm.1, eps: config.normEps)
            } else {
                var w = norm.0
                let offset = config.family.rmsNormOffset
                if offset != 0 { w.withUnsafeMutableBufferPointer { p in for i in p.indices { p[i] += offset } } }
                h = ModelMath.rmsNorm(h, w, eps: config.normEps)
            }
        }
        if let projectOut { h = Linalg.linear(h, projectOut) }
        return h
    }

    /// Logits [rows x vocabulary] for hidden states `x`.
    public func logits(_ x: Matrix) -> Matrix {
        var logits = Linalg.linear(features(x), classifier)
        if let cap = config.finalLogitSoftcap {
            logits.withUnsafeMutableBufferPointer { p in for i in p.indices { p[i] = cap * tanhf(p[i] / cap) } }
        }
        return logits
    }
}
