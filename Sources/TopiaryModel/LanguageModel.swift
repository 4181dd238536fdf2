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
    /// With `embeddedTokenizer` false the model's own tokenizer (tokenizer.json, or a GGUF file's
    /// vocabulary and merges) is not read, and `tokenizer` is the one at `tokenizerPath` or nil:
    /// for a caller that has token ids already (`eval --tokens`), which then does not pay for
    /// parsing a vocabulary it never uses (0.14 s for SmolLM2's tokenizer.json, 0.4 s for 128k).
    public static func open(path: String, tokenizerPath: String? = nil, embeddedTokenizer: Bool = true) throws -> LanguageModel {
        var isDirectory: ObjCBool = false
        guard FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory) else {
            throw CheckpointError.io(path: path, detail: "no such file or directory")
        }
        let model: LanguageModel
        if isDirectory.boolValue {
            model = try openHuggingFace(directory: path, tokenizerPath: tokenizerPath, embeddedTokenizer: embeddedTokenizer)
        } else {
            let head = try MappedFile(path: path)
            let magic = try head.bytes(at: 0, count: min(4, head.size), what: "magic")
            if Array(magic) == Array("GGUF".utf8) {
                model = try openGGUF(path: path, tokenizerPath: tokenizerPath, embeddedTokenizer: embeddedTokenizer)
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

    static func openHuggingFace(directory: String, tokenizerPath: String?, embeddedTokenizer: Bool = true) throws -> LanguageModel {
        let configPath = (directory as NSString).appendingPathComponent("config.json")
        guard FileManager.default.fileExists(atPath: configPath) else {
            throw CheckpointError.io(path: directory, detail: "no config.json: expected a Hugging Face model directory")
        }
        let config = try ModelConfig.fromHuggingFace(path: configPath)
        let checkpoint = try ShardedSafeTensors.open(directory: directory)
        // config.json's counts must be what the checkpoint holds, before anything is sized by them.
        try config.validate(against: checkpoint, path: configPath)
        let weights = FusedTensorSource.wrap(checkpoint, config: config)
        var tokenizer = try externalTokenizer(tokenizerPath, vocabularySize: config.vocabularySize)
        let tokPath = (directory as NSString).appendingPathComponent("tokenizer.json")
        if tokenizer == nil, embeddedTokenizer, FileManager.default.fileExists(atPath: tokPath) {
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
        case "qwen2": preTokenizer = .qwen2
        case "gpt2", "default": preTokenizer = .gpt2
        default:
            throw CheckpointError.invalidField(path: gguf.path, field: "tokenizer.ggml.pre", detail: "is '\(pre)', which is not supported (gpt2, smollm, llama-bpe, qwen2); pass --tokenizer tokenizer.json")
        }
        // Every field as the type it must be: a token list with a number in it, or an id that is a
        // string, is an error naming the key, not a shorter list or a missing id.
        func list<T>(_ key: String, _ what: String, _ element: (GGUFValue) -> T?) throws -> [T]? {
            guard let v = meta[key] else { return nil }
            guard let items = v.array else { throw CheckpointError.invalidField(path: gguf.path, field: key, detail: "is not an array, expected \(what)") }
            var out: [T] = []
            out.reserveCapacity(items.count)
            for (i, item) in items.enumerated() {
                guard let e = element(item) else {
                    throw CheckpointError.invalidField(path: gguf.path, field: key, detail: "has \(item) at index \(i), expected \(what)")
                }
                out.append(e)
            }
            return out
        }
        func id(_ key: String) throws -> Int? {
            guard let v = meta[key] else { return nil }
            guard let i = v.int else { throw CheckpointError.invalidField(path: gguf.path, field: key, detail: "is \(v), expected a token id") }
            return i
        }
        guard let tokens = try list("tokenizer.ggml.tokens", "strings", \.string) else {
            throw CheckpointError.missingField(path: gguf.path, field: "tokenizer.ggml.tokens")
        }
        guard let merges = try list("tokenizer.ggml.merges", "strings", \.string) else {
            throw CheckpointError.missingField(path: gguf.path, field: "tokenizer.ggml.merges")
        }
        let types = try list("tokenizer.ggml.token_type", "integers", \.int)
        var addsBOS = false
        if let v = meta["tokenizer.ggml.add_bos_token"] {
            guard let b = v.bool else { throw CheckpointError.invalidField(path: gguf.path, field: "tokenizer.ggml.add_bos_token", detail: "is \(v), expected true or false") }
            addsBOS = b
        }
        // The ids checked here, under their GGUF keys (the tokenizer's own check names its arguments).
        let bosKey = "tokenizer.ggml.bos_token_id", eosKey = "tokenizer.ggml.eos_token_id", unknownKey = "tokenizer.ggml.unknown_token_id"
        let bos = try id(bosKey), eos = try id(eosKey), unknown = try id(unknownKey)
        for (key, value) in [(bosKey, bos), (eosKey, eos), (unknownKey, unknown)] {
            if let value, !tokens.indices.contains(value) {
                throw CheckpointError.invalidField(path: gguf.path, field: key,
                                                   detail: "is \(value), expected a token id in 0..<\(tokens.count) (tokenizer.ggml.tokens has \(tokens.count))")
            }
        }
        if addsBOS && bos == nil {
            throw CheckpointError.invalidField(path: gguf.path, field: "tokenizer.ggml.add_bos_token", detail: "is true, but \(bosKey) is missing")
        }
        do {
            return try ByteLevelBPETokenizer(
                tokens: tokens, merges: merges, tokenTypes: types, preTokenizer: preTokenizer,
                bosID: bos, eosID: eos, unknownID: unknown, addsBOS: addsBOS)
        } catch let e as CheckpointError {
            throw e
        } catch {
            throw CheckpointError.invalidField(path: gguf.path, field: "tokenizer.ggml", detail: "\(error)")
        }
    }

    /// Loads decoder block `index` with shape checks.
    public func loadBlock(_ index: Int) throws -> DecoderBlock {
        try DecoderBlock.load(from: weights, config: config, index: index)
    }

    /// Starts reading block `index`'s tensors in the background (`TensorSource.prefetch`), so that
    /// its `loadBlock` while the block before computes finds them read; nothing is held in memory.
    public func prefetchBlock(_ index: Int) {
        guard (0..<config.layerCount).contains(index) else { return }
        for spec in config.family.blockTensors(config, block: index) { weights.prefetch(spec.name) }
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

    /// The tensors outside the blocks that `loadEmbedding` and `loadHead` read: the token
    /// embedding, OPT's positions and projections, the final norm and an untied lm_head.
    public var embeddingAndHeadTensors: [String] {
        let c = config
        var names = [WeightNames.tokenEmbedding(c.architecture)]
        if c.architecture == .opt {
            names.append(WeightNames.positionEmbedding)
            if c.wordEmbedProjDim != c.hiddenSize { names += [WeightNames.projectIn, WeightNames.projectOut] }
        }
        if c.architecture != .opt || c.finalLayerNorm { names += WeightNames.finalNorm(c.architecture) }
        let tied = c.tieWordEmbeddings || weights.entry(WeightNames.lmHead) == nil && c.architecture == .opt
        if !tied { names.append(WeightNames.lmHead) }
        return names
    }

    /// Throws the error that loading it gives (missing, or of a type this reader cannot decode)
    /// for the first of `embeddingAndHeadTensors` that the weights cannot place; decodes nothing
    /// for a file source. A writer calls it before it writes, so that a checkpoint without its
    /// final norm is refused rather than written without it, as eval refuses it.
    public func checkEmbeddingAndHeadTensors() throws {
        for name in embeddingAndHeadTensors where weights.entry(name) == nil {
            _ = try weights.load(name)
        }
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

/// Turns token ids into the first block's input.
public struct Embedding: Sendable {
    public let config: ModelConfig
    public let tokens: Matrix
    public let positions: Matrix?
    public let projectIn: Matrix?

    /// Embeds `sequences` of equal length, concatenated: [sequences*length x hidden], on the host.
    public func embed(_ ids: [Int], sequenceLength: Int) -> Matrix {
        let backend = CPUBackend()
        return backend.download(embed(ids, sequenceLength: sequenceLength, on: backend))
    }

    /// Embeds `sequences` of equal length, concatenated, on `backend`: the token rows are
    /// gathered on the host and uploaded (the model's input), the rest runs on the backend.
    public func embed(_ ids: [Int], sequenceLength: Int, on backend: any ComputeBackend) -> Tensor {
        precondition(ids.count % sequenceLength == 0)
        for id in ids { precondition(id >= 0 && id < tokens.rows, "token id \(id) outside the vocabulary of \(tokens.rows)") }
        var x = backend.upload(tokens.gatherRows(ids))
        if let projectIn { x = backend.linear(x, backend.upload(projectIn)) }
        if let scale = config.embeddingScale { backend.scale(x, by: scale) }
        if let positions {
            let rows = (0..<ids.count).map { $0 % sequenceLength + config.positionOffset }
            backend.add(backend.upload(positions.gatherRows(rows)), into: x)
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
    public func features(_ x: Tensor, on backend: any ComputeBackend) -> Tensor {
        var h = x
        if let norm {
            if config.architecture == .opt {
                h = backend.layerNorm(h, weight: backend.upload(norm.0), bias: norm.1.map { backend.upload($0) }, eps: config.normEps)
            } else {
                var w = norm.0
                let offset = config.family.rmsNormOffset
                if offset != 0 { w.withUnsafeMutableBufferPointer { p in for i in p.indices { p[i] += offset } } }
                h = backend.rmsNorm(h, weight: backend.upload(w), eps: config.normEps)
            }
        }
        if let projectOut { h = backend.linear(h, backend.upload(projectOut)) }
        return h
    }

    /// Logits [rows x vocabulary] for hidden states `x`.
    public func logits(_ x: Tensor, on backend: any ComputeBackend) -> Tensor {
        let logits = backend.linear(features(x, on: backend), backend.upload(classifier))
        if let cap = config.finalLogitSoftcap { backend.softcap(logits, cap: cap) }
        return logits
    }

    /// Logits of rows `rows` of hidden states `x` on `backend`, brought to the host.
    public func logits(_ x: Tensor, rows: Range<Int>, on backend: any ComputeBackend) -> Matrix {
        backend.download(logits(backend.copy(x.region(rows: rows)), on: backend))
    }

    /// Logits for hidden states on the host.
    public func logits(_ x: Matrix) -> Matrix {
        let backend = CPUBackend()
        return backend.download(logits(backend.upload(x), on: backend))
    }
}
