import Foundation
import TopiaryModel
import TopiaryTensor

/// Valid inputs that the fuzzers start from, built here (no files outside the repository are
/// needed): tiny models of each family in each format, and tokenizers of each kind.
enum Seeds {
    // MARK: Tensor data

    static func tensorBytes(_ count: Int, type: UInt32, _ r: inout FuzzRandom) -> [UInt8] {
        var w = LEWriter()
        switch type {
        case 0: for _ in 0..<count { w.f32(r.float()) }
        case 1: for _ in 0..<count { w.int(HalfPrecision.floatToFP16(r.float()), field: false) }
        case 30: for _ in 0..<count { w.int(HalfPrecision.floatToBF16(r.float()), field: false) }
        case 8:  // Q8_0: f16 scale, 32 x int8
            for _ in 0..<(count / 32) {
                w.int(HalfPrecision.floatToFP16(0.004), field: false)
                w.raw(r.bytes(32))
            }
        case 2:  // Q4_0: f16 scale, 16 bytes of nibbles
            for _ in 0..<(count / 32) {
                w.int(HalfPrecision.floatToFP16(0.01), field: false)
                w.raw(r.bytes(16))
            }
        default:  // an unsupported type: some bytes
            w.raw(r.bytes(count))
        }
        return w.bytes
    }

    // MARK: GGUF

    enum GGUFValue {
        case u32(UInt32), i32(Int32), f32(Float), bool(Bool), string(String), u64(UInt64), f64(Double)
        case strings([String]), i32s([Int32])
    }

    struct GGUFTensor {
        var name: String
        /// Outermost first.
        var shape: [Int]
        var type: UInt32
    }

    /// A GGUF v3 file; the integer fields (counts, lengths, types, dimensions, offsets, integer
    /// values) are recorded for mutation.
    static func gguf(metadata: [(String, GGUFValue)], tensors: [GGUFTensor], alignment: Int = 32, _ r: inout FuzzRandom) -> FuzzFile {
        var w = LEWriter()
        func string(_ s: String) {
            w.int(UInt64(s.utf8.count))
            w.raw(Array(s.utf8))
        }
        w.raw(Array("GGUF".utf8))
        w.int(UInt32(3))
        w.int(UInt64(tensors.count))
        w.int(UInt64(metadata.count))
        for (key, value) in metadata {
            string(key)
            switch value {
            case .u32(let v): w.int(UInt32(4)); w.int(v)
            case .i32(let v): w.int(UInt32(5)); w.int(v)
            case .f32(let v): w.int(UInt32(6)); w.f32(v, field: true)
            case .bool(let v): w.int(UInt32(7)); w.raw([v ? 1 : 0])
            case .string(let v): w.int(UInt32(8)); string(v)
            case .u64(let v): w.int(UInt32(10)); w.int(v)
            case .f64(let v):
                w.int(UInt32(12))
                w.fields.append(IntField(offset: w.bytes.count, width: 8, isFloat: true))
                w.int(v.bitPattern, field: false)
            case .strings(let list):
                w.int(UInt32(9)); w.int(UInt32(8)); w.int(UInt64(list.count))
                for s in list { string(s) }
            case .i32s(let list):
                w.int(UInt32(9)); w.int(UInt32(5)); w.int(UInt64(list.count))
                for v in list { w.int(v, field: false) }
            }
        }
        var data: [[UInt8]] = []
        var offset = 0
        for t in tensors {
            string(t.name)
            w.int(UInt32(t.shape.count))
            for d in t.shape.reversed() { w.int(UInt64(d)) }
            w.int(t.type)
            w.int(UInt64(offset))
            let bytes = tensorBytes(t.shape.reduce(1, *), type: t.type, &r)
            data.append(bytes)
            offset += (bytes.count + alignment - 1) / alignment * alignment
        }
        w.pad(to: alignment)
        for d in data {
            w.raw(d)
            w.pad(to: alignment)
        }
        return FuzzFile(name: "model.gguf", bytes: w.bytes, fields: w.fields)
    }

    /// GPT-2 byte-level characters for bytes 0...255, as GGUF and tokenizer.json vocabularies spell them.
    static let byteCharacters: [String] = {
        var printable = Array(33...126) + Array(161...172) + Array(174...255)
        var map = [Int](repeating: -1, count: 256)
        for b in printable { map[b] = b }
        var n = 0
        for b in 0..<256 where map[b] < 0 {
            map[b] = 256 + n
            n += 1
            printable.append(b)
        }
        return map.map { String(UnicodeScalar(UInt32($0))!) }
    }()

    static let byteLevelMerges = ["Ġ t", "h e", "Ġt he", "l l", "o r", "Ġ w", "Ġw or", "l d"]
    static var byteLevelTokens: [String] {
        byteCharacters + ["Ġt", "he", "Ġthe", "ll", "or", "Ġw", "Ġwor", "ld", "<|endoftext|>"]
    }

    /// Tiny GGUF models: llama (mixed tensor types, a byte-level tokenizer), gemma2, qwen2 (biases),
    /// phi3 (fused tensors), Mixtral (stacked experts), and a llama file with an unsupported type.
    static func ggufModels(_ r: inout FuzzRandom) -> [FuzzFile] {
        let h = 8, ffn = 16, blocks = 2
        func attention(_ i: Int, q: Int, kv: Int, types: [UInt32] = [0, 0, 0, 0]) -> [GGUFTensor] {
            [GGUFTensor(name: "blk.\(i).attn_norm.weight", shape: [h], type: 0),
             GGUFTensor(name: "blk.\(i).attn_q.weight", shape: [q, h], type: types[0]),
             GGUFTensor(name: "blk.\(i).attn_k.weight", shape: [kv, h], type: types[1]),
             GGUFTensor(name: "blk.\(i).attn_v.weight", shape: [kv, h], type: types[2]),
             GGUFTensor(name: "blk.\(i).attn_output.weight", shape: [h, q], type: types[3])]
        }
        func mlp(_ i: Int, types: [UInt32] = [0, 0, 0]) -> [GGUFTensor] {
            [GGUFTensor(name: "blk.\(i).ffn_norm.weight", shape: [h], type: 0),
             GGUFTensor(name: "blk.\(i).ffn_gate.weight", shape: [ffn, h], type: types[0]),
             GGUFTensor(name: "blk.\(i).ffn_up.weight", shape: [ffn, h], type: types[1]),
             GGUFTensor(name: "blk.\(i).ffn_down.weight", shape: [h, ffn], type: types[2])]
        }
        func common(_ arch: String, vocab: Int?) -> [(String, GGUFValue)] {
            var m: [(String, GGUFValue)] = [
                ("general.architecture", .string(arch)), ("general.alignment", .u32(32)),
                ("\(arch).context_length", .u32(32)), ("\(arch).embedding_length", .u32(UInt32(h))),
                ("\(arch).block_count", .u32(UInt32(blocks))), ("\(arch).feed_forward_length", .u32(UInt32(ffn))),
                ("\(arch).attention.head_count", .u32(2)), ("\(arch).attention.layer_norm_rms_epsilon", .f32(1e-5)),
                ("\(arch).rope.freq_base", .f32(10000)),
            ]
            if let vocab { m.append(("\(arch).vocab_size", .u32(UInt32(vocab)))) }
            return m
        }
        var files: [FuzzFile] = []

        // llama with a tokenizer, mixed types.
        let tokens = byteLevelTokens
        var meta = common("llama", vocab: nil)
        meta += [("llama.attention.head_count_kv", .u32(1)), ("llama.rope.dimension_count", .u32(4)),
                 ("tokenizer.ggml.model", .string("gpt2")), ("tokenizer.ggml.pre", .string("smollm")),
                 ("tokenizer.ggml.tokens", .strings(tokens)), ("tokenizer.ggml.merges", .strings(byteLevelMerges)),
                 ("tokenizer.ggml.token_type", .i32s(tokens.indices.map { $0 == tokens.count - 1 ? 3 : 1 })),
                 ("tokenizer.ggml.bos_token_id", .u32(UInt32(tokens.count - 1))), ("tokenizer.ggml.eos_token_id", .u32(UInt32(tokens.count - 1))),
                 ("tokenizer.ggml.add_bos_token", .bool(false)), ("general.name", .string("fuzz-llama"))]
        var tensors = [GGUFTensor(name: "token_embd.weight", shape: [tokens.count, h], type: 0)]
        for i in 0..<blocks { tensors += attention(i, q: 8, kv: 4, types: [1, 0, 30, 8]) + mlp(i, types: [2, 0, 8]) }
        tensors += [GGUFTensor(name: "output_norm.weight", shape: [h], type: 0), GGUFTensor(name: "output.weight", shape: [tokens.count, h], type: 0)]
        files.append(gguf(metadata: meta, tensors: tensors, &r))

        // gemma2: tied, norms stored +1, its own keys.
        meta = common("gemma2", vocab: nil) + [("gemma2.attention.head_count_kv", .u32(1)), ("gemma2.attention.key_length", .u32(4)),
                                               ("gemma2.attention.value_length", .u32(4)), ("gemma2.attn_logit_softcapping", .f32(50)),
                                               ("gemma2.final_logit_softcapping", .f32(30)), ("gemma2.attention.sliding_window", .u32(4))]
        tensors = [GGUFTensor(name: "token_embd.weight", shape: [40, h], type: 0)]
        for i in 0..<blocks {
            tensors += attention(i, q: 8, kv: 4) + mlp(i)
            tensors += [GGUFTensor(name: "blk.\(i).post_attention_norm.weight", shape: [h], type: 0),
                        GGUFTensor(name: "blk.\(i).post_ffw_norm.weight", shape: [h], type: 0)]
        }
        tensors.append(GGUFTensor(name: "output_norm.weight", shape: [h], type: 0))
        files.append(gguf(metadata: meta, tensors: tensors, &r))

        // qwen2: q/k/v biases.
        meta = common("qwen2", vocab: 40) + [("qwen2.attention.head_count_kv", .u32(2))]
        tensors = [GGUFTensor(name: "token_embd.weight", shape: [40, h], type: 0)]
        for i in 0..<blocks {
            tensors += attention(i, q: 8, kv: 8) + mlp(i)
            for p in ["q", "k", "v"] { tensors.append(GGUFTensor(name: "blk.\(i).attn_\(p).bias", shape: [8], type: 0)) }
        }
        tensors += [GGUFTensor(name: "output_norm.weight", shape: [h], type: 0), GGUFTensor(name: "output.weight", shape: [40, h], type: 0)]
        files.append(gguf(metadata: meta, tensors: tensors, &r))

        // phi3: fused qkv and gate_up.
        meta = common("phi3", vocab: nil) + [("phi3.attention.head_count_kv", .u32(2)), ("phi3.rope.dimension_count", .u32(4)),
                                             ("phi3.attention.sliding_window", .u32(0))]
        tensors = [GGUFTensor(name: "token_embd.weight", shape: [40, h], type: 0)]
        for i in 0..<blocks {
            tensors += [GGUFTensor(name: "blk.\(i).attn_norm.weight", shape: [h], type: 0),
                        GGUFTensor(name: "blk.\(i).attn_qkv.weight", shape: [24, h], type: 0),
                        GGUFTensor(name: "blk.\(i).attn_output.weight", shape: [h, 8], type: 0),
                        GGUFTensor(name: "blk.\(i).ffn_norm.weight", shape: [h], type: 0),
                        GGUFTensor(name: "blk.\(i).ffn_up.weight", shape: [2 * ffn, h], type: 0),
                        GGUFTensor(name: "blk.\(i).ffn_down.weight", shape: [h, ffn], type: 0)]
        }
        tensors += [GGUFTensor(name: "output_norm.weight", shape: [h], type: 0), GGUFTensor(name: "output.weight", shape: [40, h], type: 0)]
        files.append(gguf(metadata: meta, tensors: tensors, &r))

        // Mixtral: llama with stacked experts.
        meta = common("llama", vocab: 40) + [("llama.attention.head_count_kv", .u32(1)), ("llama.expert_count", .u32(2)),
                                             ("llama.expert_used_count", .u32(1))]
        tensors = [GGUFTensor(name: "token_embd.weight", shape: [40, h], type: 0)]
        for i in 0..<blocks {
            tensors += attention(i, q: 8, kv: 4)
            tensors += [GGUFTensor(name: "blk.\(i).ffn_norm.weight", shape: [h], type: 0),
                        GGUFTensor(name: "blk.\(i).ffn_gate_inp.weight", shape: [2, h], type: 0),
                        GGUFTensor(name: "blk.\(i).ffn_gate_exps.weight", shape: [2, ffn, h], type: 0),
                        GGUFTensor(name: "blk.\(i).ffn_down_exps.weight", shape: [2, h, ffn], type: 8),
                        GGUFTensor(name: "blk.\(i).ffn_up_exps.weight", shape: [2, ffn, h], type: 0)]
        }
        tensors += [GGUFTensor(name: "output_norm.weight", shape: [h], type: 0), GGUFTensor(name: "output.weight", shape: [40, h], type: 0)]
        files.append(gguf(metadata: meta, tensors: tensors, &r))

        // llama whose lm_head has a type this reader does not decode (Q4_K).
        meta = common("llama", vocab: 40) + [("llama.attention.head_count_kv", .u32(2))]
        tensors = [GGUFTensor(name: "token_embd.weight", shape: [40, h], type: 0)]
        for i in 0..<blocks { tensors += attention(i, q: 8, kv: 8) + mlp(i) }
        tensors += [GGUFTensor(name: "output_norm.weight", shape: [h], type: 0), GGUFTensor(name: "output.weight", shape: [40, h], type: 12)]
        files.append(gguf(metadata: meta, tensors: tensors, &r))
        return files
    }

    // MARK: Hugging Face directories

    /// A safetensors file: 8-byte header length, JSON header, data.
    static func safetensors(_ tensors: [(name: String, shape: [Int], dtype: String)], name: String, _ r: inout FuzzRandom) -> (JSON, [UInt8]) {
        var members: [(String, JSON)] = [("__metadata__", .object([("format", .string("pt"))]))]
        var data: [UInt8] = []
        for t in tensors {
            let count = t.shape.reduce(1, *)
            let bytes = tensorBytes(count, type: t.dtype == "F32" ? 0 : (t.dtype == "F16" ? 1 : 30), &r)
            members.append((t.name, .object([("dtype", .string(t.dtype)), ("shape", .array(t.shape.map { .int($0) })),
                                             ("data_offsets", .array([.int(data.count), .int(data.count + bytes.count)]))])))
            data += bytes
        }
        return (.object(members), data)
    }

    static func safetensorsBytes(header: JSON, data: [UInt8]) -> FuzzFile {
        var w = LEWriter()
        var text = Array(header.text.utf8)
        while text.count % 8 != 0 { text.append(0x20) }
        w.int(UInt64(text.count))
        w.raw(text)
        w.raw(data)
        return FuzzFile(name: "model.safetensors", bytes: w.bytes, fields: w.fields)
    }

    /// A Hugging Face model directory for `config`: config.json and the safetensors header and
    /// data (kept apart so the fuzzer can mutate the header as JSON and rebuild the length).
    struct HuggingFaceSeed {
        var config: JSON
        var shards: [(name: String, header: JSON, data: [UInt8])]
        var index: JSON?
    }

    static func huggingFaceModels(_ r: inout FuzzRandom) -> [HuggingFaceSeed] {
        func tiny(_ arch: Architecture) -> ModelConfig {
            var c = ModelConfig(architecture: arch, hiddenSize: 8, intermediateSize: 16, layerCount: 2, headCount: 2,
                                kvHeadCount: arch == .opt || arch == .phi3 ? 2 : 1, vocabularySize: 40, maxPositions: 32,
                                normEps: 1e-5, tieWordEmbeddings: arch == .gemma2 || arch == .opt, bosTokenID: 1, eosTokenID: 2)
            switch arch {
            case .qwen2: c.qkvBias = true
            case .qwen3: c.qkNorm = true
            case .gemma2:
                c.activation = .geluTanh
                c.attentionSoftcap = 50
                c.finalLogitSoftcap = 30
                c.queryScaleBase = 4
                c.embeddingScale = Float(8.0.squareRoot())
                c.slidingWindow = 4
                c.slidingLayers = [true, false]
            case .mixtral:
                c.expertCount = 2
                c.expertsPerToken = 1
            default: break
            }
            return c
        }
        var seeds: [HuggingFaceSeed] = []
        for (k, arch) in [Architecture.llama, .qwen2, .qwen3, .gemma2, .phi3, .mixtral, .opt, .mistral].enumerated() {
            let c = tiny(arch)
            var list: [(name: String, shape: [Int], dtype: String)] = []
            let dtype = ["F32", "BF16", "F16"][k % 3]
            list.append((c.family.tokenEmbedding, [c.vocabularySize, c.hiddenSize], dtype))
            for n in c.family.finalNorm { list.append((n, [c.hiddenSize], dtype)) }
            if !c.tieWordEmbeddings { list.append((WeightNames.lmHead, [c.vocabularySize, c.hiddenSize], dtype)) }
            if arch == .opt { list.append((WeightNames.positionEmbedding, [c.maxPositions + c.positionOffset, c.hiddenSize], dtype)) }
            for i in 0..<c.layerCount {
                for t in c.family.checkpointTensors(c, block: i) { list.append((t.name, t.shape, dtype)) }
            }
            let config = JSON.from(c.huggingFaceConfig(dtype: ["float32", "bfloat16", "float16"][k % 3]))
            if arch == .llama {
                // Also as two shards with an index.
                let half = list.count / 2
                let a = safetensors(Array(list[..<half]), name: "a", &r), b = safetensors(Array(list[half...]), name: "b", &r)
                let names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
                var map: [(String, JSON)] = []
                for (i, part) in [Array(list[..<half]), Array(list[half...])].enumerated() {
                    for t in part { map.append((t.name, .string(names[i]))) }
                }
                let index = JSON.object([("metadata", .object([("total_size", .int(a.1.count + b.1.count))])), ("weight_map", .object(map))])
                seeds.append(HuggingFaceSeed(config: config, shards: [(names[0], a.0, a.1), (names[1], b.0, b.1)], index: index))
            }
            let single = safetensors(list, name: "model", &r)
            seeds.append(HuggingFaceSeed(config: config, shards: [("model.safetensors", single.0, single.1)], index: nil))
        }
        return seeds
    }

    // MARK: llama.c

    static func llama2cModel(_ header: [Int32], _ r: inout FuzzRandom) -> FuzzFile {
        var w = LEWriter()
        for v in header { w.int(v) }
        let h = header.map { Int($0) }
        // Size from the header when it is small enough to write; otherwise some floats.
        var floats = 64
        if h[0...6].enumerated().allSatisfy({ $0.offset == 5 ? abs($0.element) <= 4096 : ($0.element > 0 && $0.element <= 4096) }),
           h[3] > 0, h[0] % h[3] == 0, h[4] > 0 {
            let dim = Double(h[0]), hd = Double(h[1]), l = Double(h[2]), v = Double(abs(h[5])), seq = Double(h[6])
            let kv = dim * Double(h[4]) / Double(h[3]), head = Double(h[0] / h[3])
            var n = v * dim + l * dim * 2 + l * dim * dim * 2 + l * kv * dim * 2 + l * hd * dim * 3 + dim + seq * (head / 2).rounded(.down) * 2
            if h[5] < 0 { n += v * dim }
            if n <= Double(1 << 20) { floats = Int(n) }
        }
        for _ in 0..<floats { w.f32(r.float()) }
        return FuzzFile(name: "model.bin", bytes: w.bytes, fields: w.fields)
    }

    // MARK: Tokenizers

    /// A llama2.c tokenizer.bin: <unk>, <s>, </s>, 256 byte tokens, then pieces with scores.
    static func tokenizerBin(longToken: Int = 0, _ r: inout FuzzRandom) -> (FuzzFile, vocabulary: Int) {
        var pieces: [[UInt8]] = [Array("<unk>".utf8), Array("<s>".utf8), Array("</s>".utf8)]
        for b in 0..<256 { pieces.append(Array(String(format: "<0x%02X>", b).utf8)) }
        let words = [" ", "t", "h", "e", "th", "he", "the", " t", " th", " the", "l", "o", "ll", "lo", "hello", " hello", "w", "or", "ld",
                     " w", " wor", " world", "a", "aa", "aaaa", "aaaaaaaa"]
        for word in words { pieces.append(Array(word.utf8)) }
        if longToken > 0 { pieces.append(Array(repeating: Array("the".utf8), count: longToken / 3 + 1).flatMap { $0 }) }
        var w = LEWriter()
        w.int(Int32(pieces.map(\.count).max()!))
        for (i, p) in pieces.enumerated() {
            w.f32(i < 259 ? 0 : -Float(i - 259), field: true)
            w.int(Int32(p.count))
            w.raw(p)
        }
        return (FuzzFile(name: "tokenizer.bin", bytes: w.bytes, fields: w.fields), pieces.count)
    }

    /// tokenizer.json files: GPT-2 byte-level, SentencePiece-style with byte fallback, and a
    /// Llama-3 style Split regex.
    static func tokenizerJSONs() -> [JSON] {
        let tokens = byteLevelTokens
        let vocab = JSON.object(tokens.enumerated().map { ($1, .int($0)) })
        let special = JSON.object([("id", .int(tokens.count - 1)), ("content", .string("<|endoftext|>")), ("single_word", .bool(false)),
                                   ("lstrip", .bool(false)), ("rstrip", .bool(false)), ("normalized", .bool(false)), ("special", .bool(true))])
        let post = JSON.object([
            ("type", .string("TemplateProcessing")),
            ("single", .array([.object([("SpecialToken", .object([("id", .string("<|endoftext|>")), ("type_id", .int(0))]))]),
                               .object([("Sequence", .object([("id", .string("A")), ("type_id", .int(0))]))])])),
            ("special_tokens", .object([("<|endoftext|>", .object([("id", .string("<|endoftext|>")), ("ids", .array([.int(tokens.count - 1)])),
                                                                     ("tokens", .array([.string("<|endoftext|>")]))]))])),
        ])
        let byteLevel = JSON.object([
            ("version", .string("1.0")), ("added_tokens", .array([special])), ("normalizer", .null),
            ("pre_tokenizer", .object([("type", .string("ByteLevel")), ("add_prefix_space", .bool(false)), ("trim_offsets", .bool(true)),
                                       ("use_regex", .bool(true))])),
            ("post_processor", post), ("decoder", .object([("type", .string("ByteLevel"))])),
            ("model", .object([("type", .string("BPE")), ("dropout", .null), ("unk_token", .null), ("byte_fallback", .bool(false)),
                               ("vocab", vocab), ("merges", .array(byteLevelMerges.map { .string($0) }))])),
        ])
        let llama3Pattern = #"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"#
        let split = JSON.object([
            ("version", .string("1.0")), ("added_tokens", .array([special])), ("normalizer", .null),
            ("pre_tokenizer", .object([("type", .string("Sequence")), ("pretokenizers", .array([
                .object([("type", .string("Split")), ("pattern", .object([("Regex", .string(llama3Pattern))])), ("behavior", .string("Isolated")),
                         ("invert", .bool(false))]),
                .object([("type", .string("ByteLevel")), ("add_prefix_space", .bool(false)), ("trim_offsets", .bool(true)), ("use_regex", .bool(false))]),
            ]))])),
            ("post_processor", .object([("type", .string("ByteLevel")), ("trim_offsets", .bool(false))])),
            ("decoder", .object([("type", .string("ByteLevel"))])),
            ("model", .object([("type", .string("BPE")), ("ignore_merges", .bool(true)), ("vocab", vocab),
                               ("merges", .array(byteLevelMerges.map { m in .array(m.split(separator: " ").map { .string(String($0)) }) }))])),
        ])
        var spTokens = ["<unk>", "<s>", "</s>"] + (0..<256).map { String(format: "<0x%02X>", $0) }
        spTokens += ["▁", "t", "h", "e", "▁t", "he", "▁the", "l", "o", "w", "r", "d", "ll", "or", "▁w", "▁wor", "ld"]
        let spMerges = ["▁ t", "h e", "▁t he", "l l", "o r", "▁ w", "▁w or", "l d"]
        let sentencePiece = JSON.object([
            ("version", .string("1.0")),
            ("added_tokens", .array((0..<3).map { i in .object([("id", .int(i)), ("content", .string(spTokens[i])), ("special", .bool(true))]) })),
            ("normalizer", .object([("type", .string("Sequence")), ("normalizers", .array([
                .object([("type", .string("Prepend")), ("prepend", .string("▁"))]),
                .object([("type", .string("Replace")), ("pattern", .object([("String", .string(" "))])), ("content", .string("▁"))]),
            ]))])),
            ("pre_tokenizer", .null),
            ("post_processor", .object([("type", .string("TemplateProcessing")),
                                        ("single", .array([.object([("SpecialToken", .object([("id", .string("<s>")), ("type_id", .int(0))]))]),
                                                           .object([("Sequence", .object([("id", .string("A")), ("type_id", .int(0))]))])])),
                                        ("special_tokens", .object([("<s>", .object([("id", .string("<s>")), ("ids", .array([.int(1)])),
                                                                                      ("tokens", .array([.string("<s>")]))]))]))])),
            ("decoder", .object([("type", .string("Sequence")), ("decoders", .array([
                .object([("type", .string("Replace")), ("pattern", .object([("String", .string("▁"))])), ("content", .string(" "))]),
                .object([("type", .string("ByteFallback"))]), .object([("type", .string("Fuse"))]),
                .object([("type", .string("Strip")), ("content", .string(" ")), ("start", .int(1)), ("stop", .int(0))]),
            ]))])),
            ("model", .object([("type", .string("BPE")), ("unk_token", .string("<unk>")), ("byte_fallback", .bool(true)), ("fuse_unk", .bool(true)),
                               ("vocab", .object(spTokens.enumerated().map { ($1, .int($0)) })),
                               ("merges", .array(spMerges.map { .string($0) }))])),
        ])
        return [byteLevel, split, sentencePiece]
    }

    static let tokenizerConfig = JSON.object([("add_bos_token", .bool(true)), ("bos_token", .string("<s>")), ("eos_token", .string("</s>"))])
}
