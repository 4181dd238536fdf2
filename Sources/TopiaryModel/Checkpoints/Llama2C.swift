import TopiaryTensor

/// The header of a legacy (version 0) llama2.c checkpoint: seven little-endian int32 values.
public struct Llama2CHeader: Sendable, Equatable {
    public var dim: Int
    public var hiddenDim: Int
    public var layerCount: Int
    public var headCount: Int
    public var kvHeadCount: Int
    /// Absolute value of the stored vocab_size (its sign says whether the classifier is shared).
    public var vocabularySize: Int
    public var sequenceLength: Int
    /// True when the stored vocab_size is positive: the output classifier is the token embedding.
    public var sharedClassifier: Bool

    public init(dim: Int, hiddenDim: Int, layerCount: Int, headCount: Int, kvHeadCount: Int,
                vocabularySize: Int, sequenceLength: Int, sharedClassifier: Bool) {
        self.dim = dim
        self.hiddenDim = hiddenDim
        self.layerCount = layerCount
        self.headCount = headCount
        self.kvHeadCount = kvHeadCount
        self.vocabularySize = vocabularySize
        self.sequenceLength = sequenceLength
        self.sharedClassifier = sharedClassifier
    }

    public static let byteCount = 28

    public var headSize: Int { dim / headCount }
    public var kvDim: Int { dim * kvHeadCount / headCount }

    /// Float32 values stored after the header, the RoPE tables included.
    public var storedFloatCount: Int {
        let l = layerCount
        var n = vocabularySize * dim              // token embedding
        n += l * dim * 2                          // rms_att, rms_ffn
        n += l * dim * dim * 2                    // wq, wo
        n += l * kvDim * dim * 2                  // wk, wv
        n += l * hiddenDim * dim * 3              // w1, w2, w3
        n += dim                                  // rms_final
        n += sequenceLength * (headSize / 2) * 2  // freq_cis_real, freq_cis_imag
        if !sharedClassifier { n += vocabularySize * dim }
        return n
    }

    /// The exact size of a file with this header.
    public var expectedFileSize: Int { Self.byteCount + 4 * storedFloatCount }
}

/// A legacy llama2.c `.bin` checkpoint (as written by `export.py --version 0` or the original
/// `export_meta_llama_bin.py`), exposed under Hugging Face LLaMA tensor names.
///
/// Matrices are `[out, in]`. The RoPE frequency tables are skipped. Q and K rows keep
/// llama2.c's layout, in which RoPE rotates adjacent pairs `(2i, 2i+1)` within each head.
/// `lm_head.weight` exists only when the classifier is not shared with the embedding.
public final class Llama2CCheckpoint: TensorSource {
    public let path: String
    public let header: Llama2CHeader
    /// Tensor names in the order of their data in the file.
    public let tensorNames: [String]
    private let entries: [String: TensorEntry]
    private let file: MappedFile

    /// Magic of the newer llama2.c exports (version 1 and 2): uint32 0x616b3432 ("ak42").
    public static let versionedExportMagic: UInt32 = 0x616b_3432

    // Upper bounds that keep every size computation far from overflow and reject files that
    // are not llama2.c checkpoints at all.
    private static let limits: [(field: String, max: Int)] = [
        ("dim", 1 << 16), ("hidden_dim", 1 << 20), ("n_layers", 1 << 12), ("n_heads", 1 << 12),
        ("n_kv_heads", 1 << 12), ("vocab_size", 1 << 22), ("seq_len", 1 << 22),
    ]

    public init(path: String) throws {
        self.path = path
        let file = try MappedFile(path: path)
        self.file = file
        guard file.size >= 4 else {
            throw CheckpointError.truncated(path: path, detail: "file has \(file.size) bytes, a llama2.c header needs \(Llama2CHeader.byteCount)")
        }
        var r = file.reader()
        let magic = try r.read(UInt32.self, "magic")
        if magic == Self.versionedExportMagic {
            let version = file.size >= 8 ? String(try r.read(Int32.self, "version")) : "unknown"
            throw CheckpointError.unsupportedModel(path: path, detail: "unsupported llama2.c export version \(version) (file starts with the \"ak42\" magic); only legacy version 0 files are supported — re-export with llama2.c's export.py --version 0")
        }
        let first4 = try file.bytes(at: 0, count: 4, what: "magic")
        if Array(first4) == Array("GGUF".utf8) {
            throw CheckpointError.badMagic(path: path, expected: "a llama2.c legacy header (no magic)", found: "\"GGUF\" (a GGUF file)")
        }
        guard file.size >= Llama2CHeader.byteCount else {
            throw CheckpointError.truncated(path: path, detail: "file has \(file.size) bytes, a llama2.c header needs \(Llama2CHeader.byteCount)")
        }
        r.seek(to: 0)
        var values: [Int] = []
        for (field, _) in Self.limits { values.append(Int(try r.read(Int32.self, field))) }
        let stored = values
        values[5] = abs(values[5])
        for (i, (field, limit)) in Self.limits.enumerated() {
            let v = values[i]
            guard v > 0 else {
                throw CheckpointError.invalidHeader(path: path, detail: "\(field) is \(stored[i]), expected \(field == "vocab_size" ? "a non-zero value" : "a positive value") (is this a legacy llama2.c checkpoint?)")
            }
            guard v <= limit else {
                throw CheckpointError.invalidHeader(path: path, detail: "\(field) is \(v), implausibly large (at most \(limit)); is this a legacy llama2.c checkpoint?")
            }
        }
        let h = Llama2CHeader(dim: values[0], hiddenDim: values[1], layerCount: values[2], headCount: values[3],
                              kvHeadCount: values[4], vocabularySize: values[5], sequenceLength: values[6],
                              sharedClassifier: stored[5] > 0)
        guard h.headCount <= h.dim, h.dim % h.headCount == 0 else {
            throw CheckpointError.invalidHeader(path: path, detail: "n_heads is \(h.headCount), which does not divide dim \(h.dim)")
        }
        guard h.kvHeadCount <= h.headCount, h.headCount % h.kvHeadCount == 0 else {
            throw CheckpointError.invalidHeader(path: path, detail: "n_kv_heads is \(h.kvHeadCount), which does not divide n_heads \(h.headCount)")
        }
        guard h.headSize % 2 == 0 else {
            throw CheckpointError.invalidHeader(path: path, detail: "dim / n_heads = \(h.headSize) is odd; RoPE needs an even head size")
        }
        let expected = h.expectedFileSize
        guard file.size >= expected else {
            throw CheckpointError.truncated(path: path, detail: "expected \(expected) bytes for dim \(h.dim), hidden_dim \(h.hiddenDim), n_layers \(h.layerCount), n_heads \(h.headCount), n_kv_heads \(h.kvHeadCount), vocab_size \(stored[5]), seq_len \(h.sequenceLength); the file has \(file.size)")
        }
        guard file.size == expected else {
            throw CheckpointError.invalidHeader(path: path, detail: "the file has \(file.size) bytes but its header (dim \(h.dim), hidden_dim \(h.hiddenDim), n_layers \(h.layerCount), n_heads \(h.headCount), n_kv_heads \(h.kvHeadCount), vocab_size \(stored[5]), seq_len \(h.sequenceLength)) implies exactly \(expected); not a legacy llama2.c checkpoint?")
        }
        header = h

        var names: [String] = []
        var entries: [String: TensorEntry] = [:]
        var offset = Llama2CHeader.byteCount
        func add(_ name: String, _ shape: [Int]) {
            let bytes = 4 * shape.reduce(1, *)
            entries[name] = TensorEntry(name: name, shape: shape, dtype: .f32, offset: offset, byteCount: bytes)
            names.append(name)
            offset += bytes
        }
        func perLayer(_ suffix: String, _ shape: [Int]) {
            for i in 0..<h.layerCount { add("model.layers.\(i).\(suffix)", shape) }
        }
        let (d, hd, kv, v) = (h.dim, h.hiddenDim, h.kvDim, h.vocabularySize)
        add("model.embed_tokens.weight", [v, d])
        perLayer("input_layernorm.weight", [d])
        perLayer("self_attn.q_proj.weight", [d, d])
        perLayer("self_attn.k_proj.weight", [kv, d])
        perLayer("self_attn.v_proj.weight", [kv, d])
        perLayer("self_attn.o_proj.weight", [d, d])
        perLayer("post_attention_layernorm.weight", [d])
        perLayer("mlp.gate_proj.weight", [hd, d])
        perLayer("mlp.down_proj.weight", [d, hd])
        perLayer("mlp.up_proj.weight", [hd, d])
        add("model.norm.weight", [d])
        offset += 4 * h.sequenceLength * (h.headSize / 2) * 2  // freq_cis_real, freq_cis_imag: skipped
        if !h.sharedClassifier { add("lm_head.weight", [v, d]) }
        precondition(offset == expected, "llama2.c layout does not add up")
        tensorNames = names
        self.entries = entries
    }

    public func entry(_ name: String) -> TensorEntry? { entries[name] }

    public func load(_ name: String) throws -> Matrix { try file.decodeTensor(try readable(name)) }

    public func load(_ name: String, rows: Range<Int>) throws -> Matrix {
        try loadRows(name, rows, entry: try readable(name), file: file)
    }

    /// The entry of tensor `name`, or the error that says it is missing.
    private func readable(_ name: String) throws -> TensorEntry {
        guard let e = entries[name] else { throw CheckpointError.missingTensor(path: path, tensor: name) }
        return e
    }

    public func prefetch(_ name: String) {
        if let e = entries[name] { file.prefetch(offset: e.offset, count: e.byteCount) }
    }
}
