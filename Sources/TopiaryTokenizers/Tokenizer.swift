import Foundation

/// Text ↔ token ids for a language model.
public protocol Tokenizer: Sendable {
    var vocabularySize: Int { get }
    var bosID: Int? { get }
    var eosID: Int? { get }
    /// Whether the tokenizer's own settings add BOS at the start of an encoded text (used by perplexity evaluation).
    var addsBOS: Bool { get }
    /// Encodes text; `addBOS` nil means "as the tokenizer's own settings say" (addsBOS).
    func encode(_ text: String, addBOS: Bool?) -> [Int]
    /// Decodes a whole id array; ids outside the vocabulary are skipped. Control tokens (BOS, EOS, other special
    /// tokens) produce nothing when `skipSpecialTokens`, else their text (Hugging Face's skip_special_tokens).
    func decode(_ ids: [Int], skipSpecialTokens: Bool) -> String
    /// A Hugging Face tokenizer.json (as Data, UTF-8 JSON) that reproduces this tokenizer, for `topiary convert`.
    func huggingFaceJSON() throws -> Data
}

extension Tokenizer {
    /// Encodes as the tokenizer's own settings say.
    public func encode(_ text: String) -> [Int] { encode(text, addBOS: nil) }

    /// Decodes with control tokens producing nothing.
    public func decode(_ ids: [Int]) -> String { decode(ids, skipSpecialTokens: true) }
}

/// Everything that can be wrong with a tokenizer file or tokenizer data, naming the file (or, for
/// in-memory data, what it came from), the field, and what was expected against what was found.
public enum TokenizerError: Error, CustomStringConvertible, Equatable {
    case unreadable(path: String, detail: String)
    case truncated(path: String, field: String, offset: Int, needed: Int, available: Int)
    case invalidValue(path: String, field: String, expected: String, found: String)
    case invalidJSON(path: String, detail: String)
    case missingField(path: String, field: String)
    case unsupported(path: String, field: String, found: String, supported: [String])

    public var description: String {
        switch self {
        case .unreadable(let p, let d):
            return "\(p): cannot read tokenizer: \(d)"
        case .truncated(let p, let f, let offset, let needed, let available):
            return "\(p): file is truncated: \(f) needs \(needed) bytes at offset \(offset), only \(available) left"
        case .invalidValue(let p, let f, let e, let found):
            return "\(p): field '\(f)': expected \(e), found \(found)"
        case .invalidJSON(let p, let d):
            return "\(p): not valid JSON: \(d)"
        case .missingField(let p, let f):
            return "\(p): required field '\(f)' is missing"
        case .unsupported(let p, let f, let found, let supported):
            return "\(p): field '\(f)' is \(found), which is not supported (supported: \(supported.joined(separator: ", ")))"
        }
    }
}
