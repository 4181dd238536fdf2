import Foundation

/// Reads Hugging Face tokenizer.json files (BPE models: GPT-2 style byte-level and SentencePiece style with byte fallback).
public enum HuggingFaceTokenizer {
    /// Loads `path`, a tokenizer.json or a folder holding one. A tokenizer_config.json beside it, if present,
    /// supplies the BOS/EOS tokens and `add_bos_token`, which tokenizer.json itself does not record.
    public static func load(path: String) throws -> any Tokenizer {
        var isDirectory: ObjCBool = false
        guard FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory) else {
            throw TokenizerError.unreadable(path: path, detail: "no such file")
        }
        let file = isDirectory.boolValue ? (path as NSString).appendingPathComponent("tokenizer.json") : path
        let data: Data
        do {
            data = try Data(contentsOf: URL(fileURLWithPath: file))
        } catch {
            throw TokenizerError.unreadable(path: file, detail: error.localizedDescription)
        }
        let configPath = ((file as NSString).deletingLastPathComponent as NSString)
            .appendingPathComponent("tokenizer_config.json")
        var config: JSONNode?
        if let configData = FileManager.default.contents(atPath: configPath) {
            config = try JSONNode.parse(configData, source: configPath)
        }
        return try load(json: data, source: file, config: config)
    }

    /// Loads a tokenizer.json held in memory; `source` names it in errors.
    public static func load(json: Data, source: String = "tokenizer.json") throws -> any Tokenizer {
        try load(json: json, source: source, config: nil)
    }

    static func load(json: Data, source: String, config: JSONNode?) throws -> any Tokenizer {
        let root = try JSONNode.parse(json, source: source)
        return PipelineTokenizer(pipeline: try parsePipeline(root, config: config))
    }

    static func parsePipeline(_ root: JSONNode, config: JSONNode?) throws -> BPEPipeline {
        try root.requireObject()
        let model = try parseModel(try root.child("model"))
        var added: [AddedToken] = []
        if let list = try root.optional("added_tokens")?.array() {
            for node in list {
                let content = try node.child("content").string()
                let idNode = try node.child("id")
                let id = try idNode.int()
                guard id >= 0, id < 1 << 24 else {
                    throw TokenizerError.invalidValue(path: root.source, field: idNode.field,
                                                      expected: "a non-negative id", found: "\(id)")
                }
                added.append(AddedToken(
                    id: Int32(id), content: content, scalars: [UInt32](scalarsOf: content),
                    special: try node.optional("special")?.bool() ?? false,
                    lstrip: try node.optional("lstrip")?.bool() ?? false,
                    rstrip: try node.optional("rstrip")?.bool() ?? false,
                    singleWord: try node.optional("single_word")?.bool() ?? false,
                    normalized: try node.optional("normalized")?.bool() ?? false))
            }
        }
        let normalizers = try root.optional("normalizer").map(parseNormalizer) ?? []
        let preTokenizers = try root.optional("pre_tokenizer").map(parsePreTokenizer) ?? []
        let decoders = try root.optional("decoder").map(parseDecoder)
        var (prefix, suffix) = try root.optional("post_processor").map(parsePostProcessor) ?? ([], [])

        func lookup(_ content: String) -> Int32? {
            added.first(where: { $0.content == content })?.id ?? model.vocab[content]
        }
        func configToken(_ key: String) throws -> Int32? {
            guard let node = config?.optional(key) else { return nil }
            let content = try node.isString ? node.string() : node.child("content").string()
            return lookup(content)
        }
        let bos = try configToken("bos_token") ?? prefix.first
            ?? ["<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>"].lazy.compactMap(lookup).first
        let eos = try configToken("eos_token") ?? suffix.last
            ?? ["</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>", "<|im_end|>"].lazy.compactMap(lookup).first
        if let addBOS = try config?.optional("add_bos_token")?.bool() {
            if addBOS, prefix.isEmpty, let bos { prefix = [bos] }
            if !addBOS, prefix.first == bos, bos != nil { prefix.removeFirst() }
        }
        if let addEOS = try config?.optional("add_eos_token")?.bool() {
            if addEOS, suffix.isEmpty, let eos { suffix = [eos] }
            if !addEOS, suffix.last == eos, eos != nil { suffix.removeLast() }
        }
        return BPEPipeline(model: model, addedTokens: added, normalizers: normalizers, preTokenizers: preTokenizers,
                           decoders: decoders, prefixIDs: prefix, suffixIDs: suffix, bosID: bos, eosID: eos)
    }

    private static func parseModel(_ node: JSONNode) throws -> BPEModel {
        let type = try node.optional("type")?.string() ?? "BPE"
        guard type == "BPE" else {
            throw TokenizerError.unsupported(path: node.source, field: node.field + ".type", found: "\"\(type)\"",
                                             supported: ["\"BPE\""])
        }
        for key in ["continuing_subword_prefix", "end_of_word_suffix"] {
            if let v = try node.optional(key)?.string(), !v.isEmpty {
                throw TokenizerError.unsupported(path: node.source, field: node.field + "." + key, found: "\"\(v)\"",
                                                 supported: ["null"])
            }
        }
        let vocab = try node.child("vocab").members()
        var tokens: [String?] = []
        // Ids index an array: one far beyond the number of tokens would size it, not the file.
        let idLimit = min(1 << 24, vocab.count + (1 << 16))
        for (token, idNode) in vocab {
            let id = try idNode.int()
            guard id >= 0, id < idLimit else {
                throw TokenizerError.invalidValue(path: node.source, field: idNode.field,
                                                  expected: "an id in 0..<\(idLimit) (the vocabulary has \(vocab.count) tokens)", found: "\(id)")
            }
            if id >= tokens.count { tokens.append(contentsOf: repeatElement(nil, count: id + 1 - tokens.count)) }
            tokens[id] = token
        }
        var merges: [(String, String)] = []
        let mergesNode = try node.child("merges")
        for m in try mergesNode.array() {
            if let line = m.value.string {
                // The old form "a b": tokens never contain a space in the vocabularies that use it.
                let parts = line.split(separator: " ", omittingEmptySubsequences: false)
                guard parts.count == 2 else {
                    throw TokenizerError.invalidValue(path: node.source, field: m.field,
                                                      expected: "two tokens separated by one space", found: "\"\(line)\"")
                }
                merges.append((String(parts[0]), String(parts[1])))
            } else {
                let pair = try m.array()
                guard pair.count == 2 else {
                    throw TokenizerError.invalidValue(path: node.source, field: m.field,
                                                      expected: "a pair of tokens", found: "\(pair.count) items")
                }
                merges.append((try pair[0].string(), try pair[1].string()))
            }
        }
        return BPEModel(tokens: tokens, merges: merges,
                        byteFallback: try node.optional("byte_fallback")?.bool() ?? false,
                        unknownToken: try node.optional("unk_token")?.string(),
                        fuseUnknown: try node.optional("fuse_unk")?.bool() ?? false,
                        ignoreMerges: try node.optional("ignore_merges")?.bool() ?? false)
    }

    private static func parsePattern(_ node: JSONNode) throws -> (literal: String?, regex: String?) {
        if let s = try node.optional("String")?.string() { return (s, nil) }
        if let r = try node.optional("Regex")?.string() { return (nil, r) }
        throw TokenizerError.missingField(path: node.source, field: node.field + ".String or .Regex")
    }

    private static func regex(_ source: String, _ node: JSONNode) throws -> RegexBox {
        do {
            return try RegexBox(source)
        } catch {
            throw TokenizerError.invalidValue(path: node.source, field: node.field, expected: "a regular expression",
                                              found: "\"\(source)\" (\(error.localizedDescription))")
        }
    }

    /// A Split pattern, compiled by our own engine; a construct it does not support is an error naming it.
    private static func splitRegex(_ source: String, _ node: JSONNode) throws -> SplitRegex {
        do {
            return try SplitRegex(source)
        } catch {
            let field = node.field + ".Regex"
            switch error.kind {
            case .unsupported(let what):
                throw TokenizerError.unsupported(path: node.source, field: field,
                                                 found: "\"\(source)\", which uses \(what) at offset \(error.offset)",
                                                 supported: SplitRegex.supportedConstructs)
            case .invalid(let what):
                throw TokenizerError.invalidValue(path: node.source, field: field, expected: "a regular expression",
                                                  found: "\"\(source)\" (\(what) at offset \(error.offset))")
            }
        }
    }

    private static func parseNormalizer(_ node: JSONNode) throws -> [NormalizerStep] {
        let type = try node.child("type").string()
        switch type {
        case "Sequence":
            return try node.child("normalizers").array().flatMap(parseNormalizer)
        case "Prepend":
            return [.prepend(try node.child("prepend").string())]
        case "Replace":
            let content = try node.child("content").string()
            let pattern = try node.child("pattern")
            let (literal, regexSource) = try parsePattern(pattern)
            if let literal { return [.replace(.literal(literal), content: content)] }
            return [.replace(.regex(try regex(regexSource!, pattern)), content: content)]
        case "NFC": return [.nfc]
        case "NFD": return [.nfd]
        case "NFKC": return [.nfkc]
        case "NFKD": return [.nfkd]
        case "Lowercase": return [.lowercase]
        case "Strip":
            return [.strip(left: try node.optional("strip_left")?.bool() ?? true,
                           right: try node.optional("strip_right")?.bool() ?? true)]
        default:
            throw TokenizerError.unsupported(
                path: node.source, field: node.field + ".type", found: "\"\(type)\"",
                supported: ["Sequence", "Prepend", "Replace", "NFC", "NFD", "NFKC", "NFKD", "Lowercase", "Strip"])
        }
    }

    private static func parsePreTokenizer(_ node: JSONNode) throws -> [PreTokenizerStep] {
        let type = try node.child("type").string()
        switch type {
        case "Sequence":
            return try node.child("pretokenizers").array().flatMap(parsePreTokenizer)
        case "ByteLevel":
            return [.byteLevel(addPrefixSpace: try node.optional("add_prefix_space")?.bool() ?? true,
                               useRegex: try node.optional("use_regex")?.bool() ?? true)]
        case "Digits":
            let individual = try node.optional("individual_digits")?.bool() ?? false
            return [.split(.digit, behavior: individual ? .isolated : .contiguous, invert: false)]
        case "WhitespaceSplit":
            return [.split(.whitespace, behavior: .removed, invert: false)]
        case "Split":
            let patternNode = try node.child("pattern")
            let (literal, regexSource) = try parsePattern(patternNode)
            let pattern: SplitPattern
            if let literal {
                pattern = .literal([UInt32](scalarsOf: literal))
            } else {
                pattern = .regex(try splitRegex(regexSource!, patternNode))
            }
            let behaviorNode = try node.child("behavior")
            let behaviorName = try behaviorNode.string()
            guard let behavior = SplitBehavior(rawValue: behaviorName) else {
                throw TokenizerError.unsupported(
                    path: node.source, field: behaviorNode.field, found: "\"\(behaviorName)\"",
                    supported: ["Removed", "Isolated", "MergedWithPrevious", "MergedWithNext", "Contiguous"])
            }
            return [.split(pattern, behavior: behavior, invert: try node.optional("invert")?.bool() ?? false)]
        case "Metaspace":
            let replacement = try node.optional("replacement")?.string() ?? "\u{2581}"
            guard replacement.unicodeScalars.count == 1 else {
                throw TokenizerError.invalidValue(path: node.source, field: node.field + ".replacement",
                                                  expected: "one character", found: "\"\(replacement)\"")
            }
            var scheme = PrependScheme.always
            if let name = try node.optional("prepend_scheme")?.string() {
                guard let s = PrependScheme(rawValue: name) else {
                    throw TokenizerError.unsupported(path: node.source, field: node.field + ".prepend_scheme",
                                                     found: "\"\(name)\"", supported: ["always", "first", "never"])
                }
                scheme = s
            } else if let add = try node.optional("add_prefix_space")?.bool() {
                scheme = add ? .always : .never
            }
            return [.metaspace(replacement: replacement.unicodeScalars.first!.value, prependScheme: scheme,
                               split: try node.optional("split")?.bool() ?? true)]
        default:
            throw TokenizerError.unsupported(
                path: node.source, field: node.field + ".type", found: "\"\(type)\"",
                supported: ["Sequence", "ByteLevel", "Digits", "Split", "Metaspace", "WhitespaceSplit"])
        }
    }

    private static func parseDecoder(_ node: JSONNode) throws -> [DecoderStep] {
        let type = try node.child("type").string()
        switch type {
        case "Sequence":
            return try node.child("decoders").array().flatMap(parseDecoder)
        case "ByteLevel": return [.byteLevel]
        case "ByteFallback": return [.byteFallback]
        case "Fuse": return [.fuse]
        case "Replace":
            let content = try node.child("content").string()
            let pattern = try node.child("pattern")
            let (literal, regexSource) = try parsePattern(pattern)
            if let literal { return [.replace(.literal(literal), content: content)] }
            return [.replace(.regex(try regex(regexSource!, pattern)), content: content)]
        case "Strip":
            let content = try node.child("content").string()
            guard let c = content.unicodeScalars.first, content.unicodeScalars.count == 1 else {
                throw TokenizerError.invalidValue(path: node.source, field: node.field + ".content",
                                                  expected: "one character", found: "\"\(content)\"")
            }
            return [.strip(content: c, start: try node.child("start").int(), stop: try node.child("stop").int())]
        case "Metaspace":
            let replacement = try node.optional("replacement")?.string() ?? "\u{2581}"
            var scheme = PrependScheme.always
            if let name = try node.optional("prepend_scheme")?.string() {
                scheme = PrependScheme(rawValue: name) ?? .always
            } else if let add = try node.optional("add_prefix_space")?.bool() {
                scheme = add ? .always : .never
            }
            return [.metaspace(replacement: replacement.unicodeScalars.first ?? "\u{2581}", prependScheme: scheme)]
        default:
            throw TokenizerError.unsupported(
                path: node.source, field: node.field + ".type", found: "\"\(type)\"",
                supported: ["Sequence", "ByteLevel", "ByteFallback", "Fuse", "Replace", "Strip", "Metaspace"])
        }
    }

    /// The ids the post-processor puts before and after a single text.
    private static func parsePostProcessor(_ node: JSONNode) throws -> ([Int32], [Int32]) {
        let type = try node.child("type").string()
        switch type {
        case "Sequence":
            var result: ([Int32], [Int32]) = ([], [])
            for p in try node.child("processors").array() {
                let (pre, post) = try parsePostProcessor(p)
                result.0 += pre
                result.1 += post
            }
            return result
        case "ByteLevel":
            return ([], [])  // only trims offsets
        case "TemplateProcessing":
            let specials = try node.child("special_tokens")
            var before: [Int32] = [], after: [Int32] = []
            var seenSequence = false
            for item in try node.child("single").array() {
                if let special = item.optional("SpecialToken") {
                    let name = try special.child("id").string()
                    let ids = try specials.child(name).child("ids").array().map { try $0.int32() }
                    if seenSequence { after += ids } else { before += ids }
                } else if item.optional("Sequence") != nil {
                    seenSequence = true
                } else {
                    throw TokenizerError.invalidValue(path: node.source, field: item.field,
                                                      expected: "SpecialToken or Sequence", found: item.text)
                }
            }
            return (before, after)
        case "RobertaProcessing", "BertProcessing":
            let cls = try node.child("cls").array()
            let sep = try node.child("sep").array()
            guard cls.count == 2, sep.count == 2 else {
                throw TokenizerError.invalidValue(path: node.source, field: node.field + ".cls",
                                                  expected: "[token, id]", found: "\(cls.count) items")
            }
            return ([try cls[1].int32()], [try sep[1].int32()])
        default:
            throw TokenizerError.unsupported(
                path: node.source, field: node.field + ".type", found: "\"\(type)\"",
                supported: ["TemplateProcessing", "Sequence", "ByteLevel", "RobertaProcessing", "BertProcessing"])
        }
    }
}

/// A tokenizer read from tokenizer.json.
final class PipelineTokenizer: Tokenizer {
    let pipeline: BPEPipeline

    init(pipeline: BPEPipeline) { self.pipeline = pipeline }

    var vocabularySize: Int { pipeline.vocabularySize }
    var bosID: Int? { pipeline.bosID.map(Int.init) }
    var eosID: Int? { pipeline.eosID.map(Int.init) }
    var addsBOS: Bool { pipeline.addsBOS }
    func encode(_ text: String, addBOS: Bool?) -> [Int] { pipeline.encode(text, addBOS: addBOS) }
    func decode(_ ids: [Int], skipSpecialTokens: Bool) -> String { pipeline.decode(ids, skipSpecialTokens: skipSpecialTokens) }
    func huggingFaceJSON() throws -> Data { pipeline.huggingFaceJSON().serialized() }
}

/// A parsed JSON value with the file and the dotted field path it came from, for error messages.
///
/// The document is parsed once into `OrderedJSON` (our parser: members in file order, numbers as
/// their text); a node's field path is made only when asked for (an error, or a child of it), since
/// a vocabulary has tens of thousands of members and merges. Where a key occurs twice in an
/// object the last one counts, as in Python's json.
struct JSONNode {
    let value: OrderedJSON
    let source: String
    private let parent: String
    private let key: Key

    private enum Key {
        case root
        case member(String)
        case index(Int)
    }

    private init(value: OrderedJSON, source: String, parent: String, key: Key) {
        self.value = value
        self.source = source
        self.parent = parent
        self.key = key
    }

    static func parse(_ data: Data, source: String) throws -> JSONNode {
        do {
            return JSONNode(value: try OrderedJSON.parse(data), source: source, parent: "", key: .root)
        } catch let error as OrderedJSONError {
            throw TokenizerError.invalidJSON(path: source, detail: error.description)
        }
    }

    /// The dotted path of this value in the document ("" for the document itself).
    var field: String {
        switch key {
        case .root: return parent
        case .member(let k): return Self.memberPath(parent, k)
        case .index(let i): return "\(parent)[\(i)]"
        }
    }

    private static func memberPath(_ parent: String, _ key: String) -> String { parent.isEmpty ? key : parent + "." + key }

    /// `field` as errors name it.
    private var errorField: String {
        let f = field
        return f.isEmpty ? "(top level)" : f
    }

    /// The member `key`; missing or null is an error.
    func child(_ key: String) throws -> JSONNode {
        guard let v = optional(key) else { throw TokenizerError.missingField(path: source, field: Self.memberPath(field, key)) }
        return v
    }

    /// The member `key`, nil when absent or null.
    func optional(_ key: String) -> JSONNode? {
        guard let v = value[key] else { return nil }
        if case .null = v { return nil }
        return JSONNode(value: v, source: source, parent: field, key: .member(key))
    }

    private func mismatch(_ expected: String) -> TokenizerError {
        let found: String
        switch value {
        case .string: found = "a string"
        case .array: found = "an array"
        case .object: found = "an object"
        case .null: found = "null"
        case .bool(let b): found = b ? "true" : "false"
        case .number(let text): found = text
        }
        return .invalidValue(path: source, field: errorField, expected: expected, found: found)
    }

    /// The value as JSON text on one line (for error messages; long values are cut).
    var text: String {
        let t = String(decoding: value.serialized(), as: UTF8.self)
            .split(separator: "\n").map { $0.trimmingCharacters(in: .whitespaces) }.joined(separator: " ")
        return t.count > 200 ? String(t.prefix(200)) + "..." : t
    }

    var isString: Bool { value.string != nil }

    func string() throws -> String {
        guard let s = value.string else { throw mismatch("a string") }
        return s
    }

    /// An integer: a number with no fraction (1000, 1e3 and 1000.0 alike) that fits in an Int.
    func int() throws -> Int {
        guard let text = value.numberText else { throw mismatch("an integer") }
        if let i = Int(text) { return i }
        guard let d = Double(text), d.isFinite, d == d.rounded(.towardZero), let i = Int(exactly: d) else {
            throw mismatch("an integer")
        }
        return i
    }

    /// A token id: an integer that fits the 32-bit ids the tokenizer keeps.
    func int32() throws -> Int32 {
        let i = try int()
        guard let v = Int32(exactly: i), v >= 0 else {
            throw TokenizerError.invalidValue(path: source, field: errorField,
                                              expected: "a token id (0 to \(Int32.max))", found: "\(i)")
        }
        return v
    }

    /// JSON true or false only: a number (1, 0) is not taken for a boolean.
    func bool() throws -> Bool {
        guard let b = value.bool else { throw mismatch("true or false") }
        return b
    }

    func array() throws -> [JSONNode] {
        guard let items = value.array else { throw mismatch("an array") }
        let f = field
        return items.enumerated().map { JSONNode(value: $1, source: source, parent: f, key: .index($0)) }
    }

    /// An object's members in file order, each key once (its last occurrence, where it is repeated,
    /// at the place of that occurrence).
    func members() throws -> [(key: String, node: JSONNode)] {
        guard let list = value.members else { throw mismatch("an object") }
        var last: [String: Int] = [:]
        last.reserveCapacity(list.count)
        for (i, m) in list.enumerated() { last[m.key] = i }
        let f = field
        return list.enumerated().compactMap { i, m in
            last[m.key] == i ? (m.key, JSONNode(value: m.value, source: source, parent: f, key: .member(m.key))) : nil
        }
    }

    /// Checks that this is an object.
    func requireObject() throws {
        guard value.members != nil else { throw mismatch("an object") }
    }
}
