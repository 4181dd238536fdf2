import Foundation
import TopiaryTensor
import TopiaryTokenizers

/// The files of an export other than the weights: config.json, generation_config.json and the
/// tokenizer files, and the shard layout of the weights.
///
/// - From a Hugging Face directory, config.json is the source's with only the dtype changed
///   (`torch_dtype` and/or `dtype`, whichever it has; `torch_dtype` added if neither), byte for
///   byte otherwise; the tokenizer and generation files are copied unchanged; a sharded source
///   gives shards of the same names holding the same tensors.
/// - From a GGUF file, the files are made from its metadata: config.json from the model config,
///   tokenizer.json, tokenizer_config.json (chat template, special tokens, added tokens),
///   special_tokens_map.json, generation_config.json.
/// - From a llama2.c checkpoint: config.json, generation_config.json and, with a tokenizer,
///   tokenizer.json, tokenizer_config.json and special_tokens_map.json.
extension HuggingFaceExport {
    /// The file names, in a Hugging Face model directory, of the tokenizer and generation files an
    /// export copies unchanged (also: `*.tiktoken`, `tokenization_*.py`, and the `.jinja` files of
    /// `additional_chat_templates/`).
    public static let carriedFileNames: Set<String> = [
        "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
        "chat_template.jinja", "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt",
        "added_tokens.json", "vocab.txt", "spiece.model", "sentencepiece.bpe.model",
    ]

    static let additionalChatTemplates = "additional_chat_templates"

    /// Whether a file of a source directory is a tokenizer or generation file that is copied.
    static func isCarried(_ name: String) -> Bool {
        carriedFileNames.contains(name) || name.hasSuffix(".tiktoken") || (name.hasPrefix("tokenization_") && name.hasSuffix(".py"))
    }

    /// The dtype an export writes when none is asked for: a Hugging Face source's own (the type
    /// that holds most of its weights' elements, e.g. BF16 stays BF16), F32 for GGUF and llama2.c
    /// sources.
    public static func defaultDType(for model: LanguageModel) -> TensorDType {
        guard model.format == .huggingFace, let source = try? ShardedSafeTensors.open(directory: model.path) else { return .f32 }
        return storedDType(source) ?? .f32
    }

    /// The floating-point type holding most elements of `source` (nil when it has none).
    static func storedDType(_ source: any TensorSource) -> TensorDType? {
        var counts: [TensorDType: Int] = [:]
        for name in source.tensorNames {
            guard let e = source.entry(name), e.dtype == .f32 || e.dtype == .f16 || e.dtype == .bf16 else { continue }
            counts[e.dtype, default: 0] += e.elementCount
        }
        return counts.max { a, b in a.value != b.value ? a.value < b.value : a.key.rawValue > b.key.rawValue }?.key
    }

    /// PyTorch's name of a dtype, as config.json spells it.
    public static func torchDTypeName(_ dtype: TensorDType) -> String {
        switch dtype {
        case .f16: return "float16"
        case .bf16: return "bfloat16"
        default: return "float32"
        }
    }

    /// How the weights are laid out over files.
    struct WeightLayout {
        var shards: ShardLayout?
        var totalParameters = false
    }

    /// Writes every file but the weights into `directory` and says how to lay the weights out.
    static func writeNonWeightFiles(model: LanguageModel, config: ModelConfig, dtype: TensorDType, to directory: String) throws -> WeightLayout {
        switch model.format {
        case .huggingFace:
            return try writeFromHuggingFaceSource(model: model, dtype: dtype, to: directory)
        case .gguf:
            try writeGeneratedConfig(config, dtype: dtype, to: directory)
            try writeFromGGUF(model: model, config: config, to: directory)
        case .llama2c:
            try writeGeneratedConfig(config, dtype: dtype, to: directory)
            try writeGenerationConfig(bos: config.bosTokenID, eos: config.eosTokenID, pad: nil, to: directory)
            if let tokenizer = model.tokenizer {
                try writeTokenizerFiles(tokenizer, config: config, to: directory, withConfig: true)
            }
        }
        return WeightLayout()
    }

    // MARK: From a Hugging Face directory

    static func writeFromHuggingFaceSource(model: LanguageModel, dtype: TensorDType, to directory: String) throws -> WeightLayout {
        let source = model.path
        let configPath = (source as NSString).appendingPathComponent("config.json")
        let edited = try HuggingFaceConfigFile.settingDType(try readFile(configPath), to: torchDTypeName(dtype), path: configPath)
        try AtomicFile.write(edited, to: (directory as NSString).appendingPathComponent("config.json"))

        let carried = try carriedFiles(in: source)
        for file in carried {
            let target = (directory as NSString).appendingPathComponent(file)
            let parent = (target as NSString).deletingLastPathComponent
            if parent != directory {
                try FileManager.default.createDirectory(atPath: parent, withIntermediateDirectories: true)
            }
            try AtomicFile.write(try readFile((source as NSString).appendingPathComponent(file)), to: target)
        }
        if !carried.contains("generation_config.json") {
            try writeGenerationConfig(bos: model.config.bosTokenID, eos: model.config.eosTokenID, pad: nil, to: directory)
        }
        // A tokenizer the source directory does not hold (given with --tokenizer) is written out.
        if !carried.contains("tokenizer.json"), let tokenizer = model.tokenizer {
            try writeTokenizerFiles(tokenizer, config: model.config, to: directory,
                                    withConfig: !carried.contains("tokenizer_config.json"),
                                    withMap: !carried.contains("special_tokens_map.json"))
        }
        return try sourceWeightLayout(directory: source, dtype: dtype)
    }

    /// The tokenizer and generation files of a model directory, as paths relative to it, sorted.
    public static func carriedFiles(in directory: String) throws -> [String] {
        let fm = FileManager.default
        let names: [String]
        do { names = try fm.contentsOfDirectory(atPath: directory) } catch {
            throw CheckpointError.io(path: directory, detail: "cannot list directory: \(error.localizedDescription)")
        }
        var files: [String] = []
        for name in names.sorted() {
            let path = (directory as NSString).appendingPathComponent(name)
            var isDirectory: ObjCBool = false
            guard fm.fileExists(atPath: path, isDirectory: &isDirectory) else { continue }
            if !isDirectory.boolValue, isCarried(name) {
                files.append(name)
            } else if isDirectory.boolValue, name == additionalChatTemplates {
                let inner = (try? fm.contentsOfDirectory(atPath: path)) ?? []
                for t in inner.sorted() where t.hasSuffix(".jinja") {
                    var innerIsDirectory: ObjCBool = false
                    if fm.fileExists(atPath: (path as NSString).appendingPathComponent(t), isDirectory: &innerIsDirectory),
                       !innerIsDirectory.boolValue {
                        files.append(name + "/" + t)
                    }
                }
            }
        }
        return files
    }

    /// A sharded source keeps its layout: each tensor in the file of the same name it had, or,
    /// when the element size changes, as many shards cut in the source's tensor order.
    static func sourceWeightLayout(directory: String, dtype: TensorDType) throws -> WeightLayout {
        let fm = FileManager.default
        if fm.fileExists(atPath: (directory as NSString).appendingPathComponent(ShardedSafeTensors.singleFileName)) { return WeightLayout() }
        guard fm.fileExists(atPath: (directory as NSString).appendingPathComponent(ShardedSafeTensors.indexFileName)) else { return WeightLayout() }
        let sharded = try ShardedSafeTensors(directory: directory)
        var layout = WeightLayout(shards: nil, totalParameters: sharded.metadata["total_parameters"] != nil)
        let size = { (d: TensorDType) in d.byteCount(elements: 1) ?? 0 }
        if let stored = storedDType(sharded), size(stored) != size(dtype) {
            var order: [String] = []
            for f in sharded.shardFiles {
                order += try sharded.shard(f).tensorNames.filter { sharded.weightMap[$0] == f }
            }
            layout.shards = .count(sharded.shardFiles.count, order: order)
        } else {
            layout.shards = .files(sharded.shardFiles, assignment: sharded.weightMap)
        }
        return layout
    }

    // MARK: From a GGUF file

    static func writeFromGGUF(model: LanguageModel, config: ModelConfig, to directory: String) throws {
        let gguf = try GGUFFile(path: model.path)
        let meta = gguf.metadata
        let bos = meta["tokenizer.ggml.bos_token_id"]?.int ?? config.bosTokenID
        let eos = meta["tokenizer.ggml.eos_token_id"]?.int ?? config.eosTokenID
        let pad = meta["tokenizer.ggml.padding_token_id"]?.int
        try writeGenerationConfig(bos: bos, eos: eos, pad: pad, to: directory)
        guard let tokenizer = model.tokenizer else { return }
        try AtomicFile.write(try tokenizer.huggingFaceJSON(), to: (directory as NSString).appendingPathComponent("tokenizer.json"))
        guard let tokens = meta["tokenizer.ggml.tokens"]?.stringArray else {
            try writeTokenizerFiles(tokenizer, config: config, to: directory, withConfig: true, writeJSON: false)
            return
        }
        let types = meta["tokenizer.ggml.token_type"]?.array?.compactMap(\.int) ?? []
        func token(_ id: Int?) -> String? { id.flatMap { tokens.indices.contains($0) ? tokens[$0] : nil } }
        var settings = TokenizerSettings(maxLength: config.maxPositions)
        // Control tokens (type 3) are special; user-defined ones (type 4) are added tokens that
        // decode as text, as the tokenizer.json written beside them has them.
        for (id, type) in types.enumerated() where (type == 3 || type == 4) && tokens.indices.contains(id) {
            settings.added.append(.init(id: id, content: tokens[id], special: type == 3))
        }
        settings.bos = token(bos)
        settings.eos = token(eos)
        settings.pad = token(pad)
        settings.unk = token(meta["tokenizer.ggml.unknown_token_id"]?.int)
        settings.addBOS = meta["tokenizer.ggml.add_bos_token"]?.bool
        settings.addEOS = meta["tokenizer.ggml.add_eos_token"]?.bool
        settings.chatTemplate = meta["tokenizer.chat_template"]?.string
        try settings.write(to: directory)
    }

    // MARK: Generated files

    /// config.json from the model config (keys sorted; Float fields in Float's shortest text).
    static func writeGeneratedConfig(_ config: ModelConfig, dtype: TensorDType, to directory: String) throws {
        let json = try OrderedJSON.from(config.huggingFaceConfig(dtype: torchDTypeName(dtype)))
        try AtomicFile.write(json.serialized(asciiOnly: true), to: (directory as NSString).appendingPathComponent("config.json"))
    }

    static func writeGenerationConfig(bos: Int?, eos: Int?, pad: Int?, to directory: String) throws {
        var members: [String: OrderedJSON] = [:]
        if let bos { members["bos_token_id"] = .int(bos) }
        if let eos { members["eos_token_id"] = .int(eos) }
        if let pad { members["pad_token_id"] = .int(pad) }
        try AtomicFile.write(OrderedJSON.sortedObject(members).serialized(asciiOnly: true),
                             to: (directory as NSString).appendingPathComponent("generation_config.json"))
    }

    /// tokenizer.json from `tokenizer` and, read back from it, tokenizer_config.json and
    /// special_tokens_map.json with its BOS, EOS and unknown tokens and added tokens.
    static func writeTokenizerFiles(_ tokenizer: any Tokenizer, config: ModelConfig, to directory: String,
                                    withConfig: Bool, withMap: Bool = true, writeJSON: Bool = true) throws {
        let data = try tokenizer.huggingFaceJSON()
        if writeJSON { try AtomicFile.write(data, to: (directory as NSString).appendingPathComponent("tokenizer.json")) }
        guard withConfig || withMap else { return }
        let json: OrderedJSON
        do { json = try OrderedJSON.parse(data) } catch {
            throw CheckpointError.invalidHeader(path: (directory as NSString).appendingPathComponent("tokenizer.json"), detail: "written tokenizer.json is not valid JSON: \(error)")
        }
        var settings = TokenizerSettings(maxLength: config.maxPositions)
        var names: [Int: String] = [:]
        for t in json["added_tokens"]?.array ?? [] {
            guard let id = t["id"]?.int, let content = t["content"]?.string else { continue }
            names[id] = content
            settings.added.append(.init(id: id, content: content, special: t["special"]?.bool ?? false,
                                        lstrip: t["lstrip"]?.bool ?? false, rstrip: t["rstrip"]?.bool ?? false,
                                        normalized: t["normalized"]?.bool ?? false, singleWord: t["single_word"]?.bool ?? false))
        }
        let wanted = Set([tokenizer.bosID, tokenizer.eosID].compactMap { $0 }).subtracting(names.keys)
        if !wanted.isEmpty {
            for m in json["model"]?["vocab"]?.members ?? [] {
                if let id = m.value.int, wanted.contains(id) { names[id] = m.key }
            }
        }
        settings.bos = tokenizer.bosID.flatMap { names[$0] }
        settings.eos = tokenizer.eosID.flatMap { names[$0] }
        settings.unk = json["model"]?["unk_token"]?.string
        settings.addBOS = tokenizer.addsBOS
        try settings.write(to: directory, config: withConfig, map: withMap)
    }

    static func readFile(_ path: String) throws -> Data {
        do { return try Data(contentsOf: URL(fileURLWithPath: path), options: .mappedIfSafe) } catch {
            throw CheckpointError.io(path: path, detail: "cannot read: \(error.localizedDescription)")
        }
    }
}

/// What tokenizer_config.json and special_tokens_map.json say, as transformers writes them.
struct TokenizerSettings {
    struct Added {
        var id: Int
        var content: String
        var special: Bool
        var lstrip = false
        var rstrip = false
        var normalized = false
        var singleWord = false
    }
    var added: [Added] = []
    var bos: String?
    var eos: String?
    var pad: String?
    var unk: String?
    var addBOS: Bool?
    var addEOS: Bool?
    var chatTemplate: String?
    var maxLength: Int

    init(maxLength: Int) { self.maxLength = maxLength }

    /// tokenizer_config.json: keys sorted, added tokens by id, as transformers' save_pretrained.
    var tokenizerConfig: OrderedJSON {
        var m: [String: OrderedJSON] = [
            "clean_up_tokenization_spaces": .bool(false),
            "model_max_length": .int(maxLength),
            "tokenizer_class": .string("PreTrainedTokenizerFast"),
        ]
        if let addBOS { m["add_bos_token"] = .bool(addBOS) }
        if let addEOS { m["add_eos_token"] = .bool(addEOS) }
        if !added.isEmpty {
            m["added_tokens_decoder"] = .object(added.sorted { $0.id < $1.id }.map { t in
                .init(String(t.id), .object([
                    .init("content", .string(t.content)), .init("lstrip", .bool(t.lstrip)),
                    .init("normalized", .bool(t.normalized)), .init("rstrip", .bool(t.rstrip)),
                    .init("single_word", .bool(t.singleWord)), .init("special", .bool(t.special)),
                ]))
            })
        }
        for (key, value) in [("bos_token", bos), ("eos_token", eos), ("pad_token", pad), ("unk_token", unk)] {
            if let value { m[key] = .string(value) }
        }
        if let chatTemplate { m["chat_template"] = .string(chatTemplate) }
        return .sortedObject(m)
    }

    /// special_tokens_map.json: each special token with its flags, as transformers writes it.
    var specialTokensMap: OrderedJSON {
        var m: [String: OrderedJSON] = [:]
        for (key, value) in [("bos_token", bos), ("eos_token", eos), ("pad_token", pad), ("unk_token", unk)] {
            guard let value else { continue }
            let t = added.first { $0.content == value }
            m[key] = .object([
                .init("content", .string(value)), .init("lstrip", .bool(t?.lstrip ?? false)),
                .init("normalized", .bool(t?.normalized ?? false)), .init("rstrip", .bool(t?.rstrip ?? false)),
                .init("single_word", .bool(t?.singleWord ?? false)),
            ])
        }
        return .sortedObject(m)
    }

    func write(to directory: String, config: Bool = true, map: Bool = true) throws {
        if config {
            try AtomicFile.write(tokenizerConfig.serialized(), to: (directory as NSString).appendingPathComponent("tokenizer_config.json"))
        }
        if map {
            try AtomicFile.write(specialTokensMap.serialized(), to: (directory as NSString).appendingPathComponent("special_tokens_map.json"))
        }
    }
}

/// A source model's config.json, changed only where the output differs from the source.
public enum HuggingFaceConfigFile {
    /// `data` with its top-level `torch_dtype` and `dtype` values (whichever it has) set to
    /// `name`, every other byte as it was; when it has neither, `"torch_dtype": name` is added
    /// (in key order if the keys are sorted, else last), spaced like the member before it.
    public static func settingDType(_ data: Data, to name: String, path: String) throws -> Data {
        let parsed: (value: OrderedJSON, spans: [OrderedJSON.MemberSpan])
        do { parsed = try OrderedJSON.parseWithSpans(data) } catch {
            throw CheckpointError.invalidHeader(path: path, detail: "not valid JSON: \(error)")
        }
        guard case .object = parsed.value else { throw CheckpointError.invalidHeader(path: path, detail: "expected a JSON object") }
        var bytes = [UInt8](data)
        let literal = OrderedJSON.stringLiteral(name, asciiOnly: true)
        let targets = parsed.spans.filter { $0.key == "torch_dtype" || $0.key == "dtype" }
        if !targets.isEmpty {
            for span in targets.sorted(by: { $0.valueRange.lowerBound > $1.valueRange.lowerBound }) {
                if (try? OrderedJSON.parse(Data(bytes[span.valueRange]))) == .string(name) { continue }
                bytes.replaceSubrange(span.valueRange, with: literal)
            }
            return Data(bytes)
        }
        let key = "torch_dtype"
        guard let last = parsed.spans.last else {
            // An empty object: {"torch_dtype": "..."} in place of its braces' contents.
            guard let open = bytes.firstIndex(of: UInt8(ascii: "{")), let close = bytes.lastIndex(of: UInt8(ascii: "}")) else { return data }
            bytes.replaceSubrange((open + 1)..<close, with: OrderedJSON.stringLiteral(key) + Array(": ".utf8) + literal)
            return Data(bytes)
        }
        func whitespace(before index: Int) -> [UInt8] {
            var s = index
            while s > 0, [0x20, 0x0A, 0x0D, 0x09].contains(bytes[s - 1]) { s -= 1 }
            return Array(bytes[s..<index])
        }
        let separator = Array(bytes[last.keyRange.upperBound..<last.valueRange.lowerBound])
        let member = OrderedJSON.stringLiteral(key) + separator + literal
        let keys = parsed.spans.map(\.key)
        let precedes = { (a: String, b: String) in a.unicodeScalars.lexicographicallyPrecedes(b.unicodeScalars) }
        let sorted = zip(keys, keys.dropFirst()).allSatisfy { !precedes($1, $0) }
        if sorted, let next = parsed.spans.first(where: { precedes(key, $0.key) }) {
            let at = next.keyRange.lowerBound
            bytes.insert(contentsOf: member + [UInt8(ascii: ",")] + whitespace(before: at), at: at)
        } else {
            bytes.insert(contentsOf: [UInt8(ascii: ",")] + whitespace(before: last.keyRange.lowerBound) + member, at: last.valueRange.upperBound)
        }
        return Data(bytes)
    }
}
