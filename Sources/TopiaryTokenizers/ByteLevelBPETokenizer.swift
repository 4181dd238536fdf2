import Foundation

/// GPT-2 style byte-level BPE, as GGUF files with `tokenizer.ggml.model = gpt2` describe it: special tokens are
/// matched first, the text is split by a pre-tokenizer pattern, each piece's UTF-8 bytes become GPT-2's byte
/// characters and are merged by lowest merge rank.
public final class ByteLevelBPETokenizer: Tokenizer {
    /// The pre-tokenizer pattern (GGUF `tokenizer.ggml.pre`).
    public enum PreTokenizer: String, Sendable {
        /// GPT-2's pattern.
        case gpt2
        /// Every digit (\p{N}) split off on its own first, then GPT-2's pattern.
        case smollm
        /// LLaMA-3's pattern (numbers in groups of up to three); a piece that is a token is not merged.
        case llama3
        /// Qwen2's: NFC, then LLaMA-3's pattern with single digits; a piece that is a token is not merged.
        case qwen2
    }

    let pipeline: BPEPipeline
    public let preTokenizer: PreTokenizer

    /// Where errors in the arguments are reported as coming from.
    static let source = "ByteLevelBPETokenizer arguments"

    /// - Parameters:
    ///   - tokens: token strings by id, in GPT-2's byte-level characters.
    ///   - merges: merges in rank order, each "left right".
    ///   - tokenTypes: GGUF token types by id; 3 (control) tokens are special (matched whole, decoded as
    ///     nothing), 4 (user-defined) are matched whole and decoded as text.
    ///   - specialTokens: if given, these tokens are the special ones instead of those `tokenTypes` marks.
    public init(tokens: [String], merges: [String], tokenTypes: [Int]?, preTokenizer: PreTokenizer, bosID: Int?,
                eosID: Int?, unknownID: Int?, addsBOS: Bool, specialTokens: [String]? = nil) throws {
        let source = Self.source
        guard !tokens.isEmpty else {
            throw TokenizerError.invalidValue(path: source, field: "tokens", expected: "at least one token", found: "none")
        }
        if let tokenTypes, tokenTypes.count != tokens.count {
            throw TokenizerError.invalidValue(path: source, field: "tokenTypes", expected: "\(tokens.count) entries (one per token)",
                                              found: "\(tokenTypes.count)")
        }
        for (field, id) in [("bosID", bosID), ("eosID", eosID), ("unknownID", unknownID)] {
            if let id, !tokens.indices.contains(id) {
                throw TokenizerError.invalidValue(path: source, field: field, expected: "an id in 0..<\(tokens.count)", found: "\(id)")
            }
        }
        if addsBOS, bosID == nil {
            throw TokenizerError.invalidValue(path: source, field: "bosID", expected: "a BOS id since addsBOS is true", found: "nil")
        }
        var pairs: [(String, String)] = []
        pairs.reserveCapacity(merges.count)
        for (k, line) in merges.enumerated() {
            // The separator is the first space after the first byte, so a left token may itself be a space.
            let utf8 = Array(line.utf8)
            guard utf8.count >= 3, let split = utf8[1...].firstIndex(of: 0x20), split + 1 < utf8.count else {
                throw TokenizerError.invalidValue(path: source, field: "merges[\(k)]", expected: "\"left right\"",
                                                  found: "\"\(line)\"")
            }
            pairs.append((String(decoding: utf8[..<split], as: UTF8.self), String(decoding: utf8[(split + 1)...], as: UTF8.self)))
        }
        let model = BPEModel(tokens: tokens, merges: pairs, byteFallback: false,
                             unknownToken: unknownID.map { tokens[$0] }, fuseUnknown: false,
                             ignoreMerges: preTokenizer == .llama3 || preTokenizer == .qwen2)
        var added: [AddedToken] = []
        if let specialTokens {
            for s in specialTokens {
                guard let id = model.vocab[s] else {
                    throw TokenizerError.invalidValue(path: source, field: "specialTokens", expected: "tokens of the vocabulary",
                                                      found: "\"\(s)\"")
                }
                added.append(AddedToken(id: id, content: s, scalars: [UInt32](scalarsOf: s), special: true))
            }
        } else if let tokenTypes {
            for (id, type) in tokenTypes.enumerated() where type == 3 || type == 4 {
                added.append(AddedToken(id: Int32(id), content: tokens[id], scalars: [UInt32](scalarsOf: tokens[id]),
                                        special: type == 3))
            }
        }
        let steps: [PreTokenizerStep]
        switch preTokenizer {
        case .gpt2:
            steps = [.byteLevel(addPrefixSpace: false, useRegex: true)]
        case .smollm:
            steps = [.split(.digit, behavior: .isolated, invert: false), .byteLevel(addPrefixSpace: false, useRegex: true)]
        case .llama3:
            steps = [.split(.llama3, behavior: .isolated, invert: false), .byteLevel(addPrefixSpace: false, useRegex: false)]
        case .qwen2:
            steps = [.split(.qwen2, behavior: .isolated, invert: false), .byteLevel(addPrefixSpace: false, useRegex: false)]
        }
        self.preTokenizer = preTokenizer
        pipeline = BPEPipeline(
            model: model, addedTokens: added, normalizers: preTokenizer == .qwen2 ? [.nfc] : [], preTokenizers: steps, decoders: [.byteLevel],
            prefixIDs: addsBOS ? [Int32(bosID!)] : [], suffixIDs: [],
            bosID: bosID.map { Int32($0) }, eosID: eosID.map { Int32($0) })
    }

    public var vocabularySize: Int { pipeline.vocabularySize }
    public var bosID: Int? { pipeline.bosID.map(Int.init) }
    public var eosID: Int? { pipeline.eosID.map(Int.init) }
    public var addsBOS: Bool { pipeline.addsBOS }

    public func encode(_ text: String, addBOS: Bool?) -> [Int] { pipeline.encode(text, addBOS: addBOS) }

    public func decode(_ ids: [Int], skipSpecialTokens: Bool) -> String {
        pipeline.decode(ids, skipSpecialTokens: skipSpecialTokens)
    }

    /// A GPT-2 style tokenizer.json: vocab, merges, the special tokens as added tokens, the pre-tokenizer as
    /// Hugging Face spells it (smollm: Digits then ByteLevel), ByteLevel decoder.
    public func huggingFaceJSON() throws -> Data { pipeline.huggingFaceJSON().serialized() }
}
