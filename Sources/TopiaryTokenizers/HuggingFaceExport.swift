/// Writing a pipeline back as a Hugging Face tokenizer.json.
extension BPEPipeline {
    func huggingFaceJSON() -> JSONValue {
        .object([
            ("version", .string("1.0")),
            ("truncation", .null),
            ("padding", .null),
            ("added_tokens", .array(addedTokens.sorted { $0.id < $1.id }.map(Self.json))),
            ("normalizer", Self.sequence(normalizers.map(Self.json), type: "Sequence", key: "normalizers")),
            ("pre_tokenizer", Self.sequence(preTokenizers.map(Self.json), type: "Sequence", key: "pretokenizers")),
            ("post_processor", templateJSON()),
            ("decoder", decoders.map { Self.sequence($0.map(Self.json), type: "Sequence", key: "decoders") } ?? .null),
            ("model", modelJSON()),
        ])
    }

    /// null for none, the step itself for one, a Sequence for more.
    private static func sequence(_ steps: [JSONValue], type: String, key: String) -> JSONValue {
        switch steps.count {
        case 0: return .null
        case 1: return steps[0]
        default: return .object([("type", .string(type)), (key, .array(steps))])
        }
    }

    private static func json(_ t: AddedToken) -> JSONValue {
        .object([
            ("id", .int(Int(t.id))), ("content", .string(t.content)), ("single_word", .bool(t.singleWord)),
            ("lstrip", .bool(t.lstrip)), ("rstrip", .bool(t.rstrip)), ("normalized", .bool(t.normalized)),
            ("special", .bool(t.special)),
        ])
    }

    private static func json(_ p: ReplacePattern) -> JSONValue {
        switch p {
        case .literal(let s): return .object([("String", .string(s))])
        case .regex(let box): return .object([("Regex", .string(box.source))])
        }
    }

    private static func json(_ n: NormalizerStep) -> JSONValue {
        switch n {
        case .prepend(let s): return .object([("type", .string("Prepend")), ("prepend", .string(s))])
        case .replace(let p, let content):
            return .object([("type", .string("Replace")), ("pattern", json(p)), ("content", .string(content))])
        case .nfc: return .object([("type", .string("NFC"))])
        case .nfd: return .object([("type", .string("NFD"))])
        case .nfkc: return .object([("type", .string("NFKC"))])
        case .nfkd: return .object([("type", .string("NFKD"))])
        case .lowercase: return .object([("type", .string("Lowercase"))])
        case .strip(let l, let r):
            return .object([("type", .string("Strip")), ("strip_left", .bool(l)), ("strip_right", .bool(r))])
        }
    }

    private static func json(_ p: PreTokenizerStep) -> JSONValue {
        switch p {
        case .byteLevel(let addPrefixSpace, let useRegex):
            return .object([("type", .string("ByteLevel")), ("add_prefix_space", .bool(addPrefixSpace)),
                            ("trim_offsets", .bool(true)), ("use_regex", .bool(useRegex))])
        case .split(.digit, let behavior, _):
            return .object([("type", .string("Digits")), ("individual_digits", .bool(behavior == .isolated))])
        case .split(.whitespace, _, _):
            return .object([("type", .string("WhitespaceSplit"))])
        case .split(let pattern, let behavior, let invert):
            let patternJSON: JSONValue
            switch pattern {
            case .literal(let s): patternJSON = .object([("String", .string(s.asString))])
            case .regex(let box): patternJSON = .object([("Regex", .string(box.source))])
            case .digit: patternJSON = .object([("Regex", .string(#"\p{N}"#))])
            case .whitespace: patternJSON = .object([("Regex", .string(#"\s"#))])
            }
            return .object([("type", .string("Split")), ("pattern", patternJSON),
                            ("behavior", .string(behavior.rawValue)), ("invert", .bool(invert))])
        case .metaspace(let replacement, let scheme, let split):
            return .object([("type", .string("Metaspace")), ("replacement", .string([replacement].asString)),
                            ("prepend_scheme", .string(scheme.rawValue)), ("split", .bool(split))])
        }
    }

    private static func json(_ d: DecoderStep) -> JSONValue {
        switch d {
        case .byteLevel:
            return .object([("type", .string("ByteLevel")), ("add_prefix_space", .bool(true)),
                            ("trim_offsets", .bool(true)), ("use_regex", .bool(true))])
        case .replace(let p, let content):
            return .object([("type", .string("Replace")), ("pattern", json(p)), ("content", .string(content))])
        case .byteFallback: return .object([("type", .string("ByteFallback"))])
        case .fuse: return .object([("type", .string("Fuse"))])
        case .strip(let content, let start, let stop):
            return .object([("type", .string("Strip")), ("content", .string(String(Character(content)))),
                            ("start", .int(start)), ("stop", .int(stop))])
        case .metaspace(let replacement, let scheme):
            return .object([("type", .string("Metaspace")), ("replacement", .string(String(Character(replacement)))),
                            ("prepend_scheme", .string(scheme.rawValue)), ("split", .bool(true))])
        }
    }

    /// A TemplateProcessing that adds the prefix and suffix ids, or null when there are none.
    private func templateJSON() -> JSONValue {
        guard !prefixIDs.isEmpty || !suffixIDs.isEmpty else { return .null }
        var names: [(String, Int32)] = []
        func name(_ id: Int32) -> String {
            let n = tokenString(Int(id)) ?? "<\(id)>"
            if !names.contains(where: { $0.0 == n }) { names.append((n, id)) }
            return n
        }
        func special(_ id: Int32, _ typeID: Int) -> JSONValue {
            .object([("SpecialToken", .object([("id", .string(name(id))), ("type_id", .int(typeID))]))])
        }
        func sequence(_ s: String, _ typeID: Int) -> JSONValue {
            .object([("Sequence", .object([("id", .string(s)), ("type_id", .int(typeID))]))])
        }
        let single = prefixIDs.map { special($0, 0) } + [sequence("A", 0)] + suffixIDs.map { special($0, 0) }
        let pair = single + prefixIDs.map { special($0, 1) } + [sequence("B", 1)] + suffixIDs.map { special($0, 1) }
        let specials = names.map { n, id in
            (n, JSONValue.object([("id", .string(n)), ("ids", .array([.int(Int(id))])), ("tokens", .array([.string(n)]))]))
        }
        return .object([("type", .string("TemplateProcessing")), ("single", .array(single)), ("pair", .array(pair)),
                        ("special_tokens", .object(specials))])
    }

    private func modelJSON() -> JSONValue {
        var vocab: [(String, JSONValue)] = []
        vocab.reserveCapacity(model.tokens.count)
        for (id, t) in model.tokens.enumerated() {
            if let t, model.vocab[t] == Int32(id) { vocab.append((t, .int(id))) }
        }
        // "a b" strings read with every version of the library; pairs only when a token itself holds a space
        // (the list must use one form throughout).
        let needsPairs = model.mergeList.contains { $0.0.contains(" ") || $0.1.contains(" ") }
        let merges: [JSONValue] = model.mergeList.map { a, b in
            needsPairs ? .array([.string(a), .string(b)]) : .string(a + " " + b)
        }
        return .object([
            ("type", .string("BPE")),
            ("dropout", .null),
            ("unk_token", model.unknownToken.map(JSONValue.string) ?? .null),
            ("continuing_subword_prefix", .null),
            ("end_of_word_suffix", .null),
            ("fuse_unk", .bool(model.fuseUnknown)),
            ("byte_fallback", .bool(model.byteFallbackIDs != nil)),
            ("ignore_merges", .bool(model.ignoreMerges)),
            ("vocab", .object(vocab)),
            ("merges", .array(merges)),
        ])
    }
}
