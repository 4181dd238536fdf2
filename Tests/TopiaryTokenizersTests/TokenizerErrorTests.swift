import Foundation
import XCTest
@testable import TopiaryTokenizers

final class TokenizerErrorTests: XCTestCase {
    func assertError(_ body: () throws -> Any, mentions words: [String], file: StaticString = #filePath, line: UInt = #line,
                     _ check: (TokenizerError) -> Bool) {
        do {
            _ = try body()
            XCTFail("expected an error", file: file, line: line)
        } catch let error as TokenizerError {
            XCTAssertTrue(check(error), "\(error)", file: file, line: line)
            for w in words { XCTAssertTrue(error.description.contains(w), "'\(w)' not in: \(error)", file: file, line: line) }
        } catch {
            XCTFail("not a TokenizerError: \(error)", file: file, line: line)
        }
    }

    func testTruncatedLlama2CTokenizer() throws {
        let full = try Data(contentsOf: URL(fileURLWithPath: try Assets.path("assets/stories260K/tok512.bin")))
        let path = try temporaryFile("tok512-cut.bin", full.prefix(3000))
        assertError({ try Llama2CTokenizer(path: path, vocabularySize: 512) }, mentions: [path, "truncated", "token"]) {
            if case .truncated(let p, _, _, _, _) = $0 { return p == path } else { return false }
        }
        let empty = try temporaryFile("empty.bin", Data())
        assertError({ try Llama2CTokenizer(path: empty, vocabularySize: 512) }, mentions: [empty, "max_token_length"]) {
            if case .truncated = $0 { return true } else { return false }
        }
        // A vocabulary larger than the file holds (a header that does not belong to this tokenizer).
        let real = try Assets.path("assets/stories260K/tok512.bin")
        assertError({ try Llama2CTokenizer(path: real, vocabularySize: 32000) }, mentions: [real, "token 512"]) {
            if case .truncated = $0 { return true } else { return false }
        }
    }

    func testBadLlama2CFields() throws {
        var bytes = Data([7, 0, 0, 0])
        bytes.append(contentsOf: [0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0x7F])  // score 0, length 2^31-1
        let path = try temporaryFile("bad-length.bin", bytes)
        assertError({ try Llama2CTokenizer(path: path, vocabularySize: 512) }, mentions: [path, "length of token 0"]) {
            if case .invalidValue = $0 { return true } else { return false }
        }
        assertError({ try Llama2CTokenizer(path: "/nonexistent/tokenizer.bin", vocabularySize: 512) },
                    mentions: ["/nonexistent/tokenizer.bin"]) {
            if case .unreadable = $0 { return true } else { return false }
        }
    }

    func testInvalidJSON() throws {
        let path = try temporaryFile("tokenizer.json", Data(#"{"model": {"type": "BPE", "vocab": {"#.utf8))
        assertError({ try HuggingFaceTokenizer.load(path: path) }, mentions: [path, "JSON"]) {
            if case .invalidJSON(let p, _) = $0 { return p == path } else { return false }
        }
    }

    /// tokenizer.json is read by our own JSON parser: errors give the byte offset, numbers written
    /// as 1e0 or 2.0 are integer ids, a fraction is not, and a key repeated in the vocabulary counts
    /// once, its last occurrence (Python's json), whatever the order.
    func testJSONReaderDetails() throws {
        let path = try temporaryFile("tokenizer.json", Data(#"{"model": {"vocab": {"a": 0,, "b": 1}}}"#.utf8))
        assertError({ try HuggingFaceTokenizer.load(path: path) }, mentions: [path, "at byte 28", "member name"]) {
            if case .invalidJSON(let p, _) = $0 { return p == path } else { return false }
        }
        let notUTF8 = try temporaryFile("tokenizer.json", Data(#"{"model": {"vocab": {"a"#.utf8) + Data([0xFF]) + Data(#"": 0}}}"#.utf8))
        assertError({ try HuggingFaceTokenizer.load(path: notUTF8) }, mentions: [notUTF8, "UTF-8"]) {
            if case .invalidJSON = $0 { return true } else { return false }
        }
        let numbers = #"{"model": {"vocab": {"a": 0, "b": 1e0, "ab": 2.0}, "merges": [["a", "b"]]}}"#
        let tok = try HuggingFaceTokenizer.load(json: Data(numbers.utf8), source: "t.json")
        XCTAssertEqual(tok.vocabularySize, 3)
        XCTAssertEqual(tok.encode("ab", addBOS: false), [2])
        assertError({ try HuggingFaceTokenizer.load(json: Data(#"{"model": {"vocab": {"a": 0, "b": 1.5}, "merges": []}}"#.utf8),
                                                    source: "t.json") },
                    mentions: ["t.json", "model.vocab.b", "an integer", "1.5"]) {
            if case .invalidValue = $0 { return true } else { return false }
        }
        assertError({ try HuggingFaceTokenizer.load(json: Data(#"{"model": {"vocab": {"a": 0}, "merges": [["a", "b"], ["a"]]}}"#.utf8),
                                                    source: "t.json") },
                    mentions: ["t.json", "model.merges[1]", "a pair of tokens"]) {
            if case .invalidValue = $0 { return true } else { return false }
        }
        assertError({ try HuggingFaceTokenizer.load(json: Data(#"{"model": {"vocab": {"a": 0}, "merges": [], "byte_fallback": 1}}"#.utf8),
                                                    source: "t.json") },
                    mentions: ["t.json", "model.byte_fallback", "true or false"]) {
            if case .invalidValue = $0 { return true } else { return false }
        }
        // A value quoted in an error is one line of JSON.
        let post = #"{"model": {"vocab": {"a": 0}, "merges": []}, "post_processor": {"type": "TemplateProcessing", "special_tokens": {}, "single": [{"Other": {"id": "A"}}]}}"#
        assertError({ try HuggingFaceTokenizer.load(json: Data(post.utf8), source: "t.json") },
                    mentions: ["t.json", "post_processor.single[0]", "SpecialToken or Sequence", #"{ "Other": { "id": "A" } }"#]) {
            if case .invalidValue = $0 { return true } else { return false }
        }
        // "a" first at 0, then again at 2: the last counts, so id 0 has no token and "a" is 2.
        let repeated = #"{"model": {"vocab": {"a": 0, "b": 1, "a": 2}, "merges": []}}"#
        let r = try HuggingFaceTokenizer.load(json: Data(repeated.utf8), source: "t.json")
        XCTAssertEqual(r.encode("ab", addBOS: false), [2, 1])
    }

    func testUnsupportedModelType() throws {
        let json = #"{"model": {"type": "WordPiece", "vocab": {"a": 0}}}"#
        let path = try temporaryFile("tokenizer.json", Data(json.utf8))
        assertError({ try HuggingFaceTokenizer.load(path: path) }, mentions: [path, "model.type", "WordPiece", "BPE"]) {
            if case .unsupported(let p, "model.type", _, _) = $0 { return p == path } else { return false }
        }
    }

    func testMissingAndMistypedFields() throws {
        assertError({ try HuggingFaceTokenizer.load(json: Data(#"{"model": {"type": "BPE", "vocab": {"a": 0}}}"#.utf8),
                                                    source: "t.json") },
                    mentions: ["t.json", "model.merges"]) {
            if case .missingField(_, "model.merges") = $0 { return true } else { return false }
        }
        assertError({ try HuggingFaceTokenizer.load(json: Data(#"{"model": {"vocab": {"a": "zero"}, "merges": []}}"#.utf8),
                                                    source: "t.json") },
                    mentions: ["t.json", "model.vocab.a", "integer"]) {
            if case .invalidValue = $0 { return true } else { return false }
        }
        let badPre = #"{"model": {"vocab": {"a": 0}, "merges": []}, "pre_tokenizer": {"type": "BertPreTokenizer"}}"#
        assertError({ try HuggingFaceTokenizer.load(json: Data(badPre.utf8), source: "t.json") },
                    mentions: ["t.json", "pre_tokenizer.type", "BertPreTokenizer"]) {
            if case .unsupported = $0 { return true } else { return false }
        }
        assertError({ try HuggingFaceTokenizer.load(path: "/nonexistent/dir") }, mentions: ["/nonexistent/dir"]) {
            if case .unreadable = $0 { return true } else { return false }
        }
    }

    func testBadByteLevelArguments() {
        assertError({ try ByteLevelBPETokenizer(tokens: ["a", "b"], merges: ["ab"], tokenTypes: nil, preTokenizer: .gpt2,
                                                bosID: nil, eosID: nil, unknownID: nil, addsBOS: false) },
                    mentions: ["merges[0]"]) {
            if case .invalidValue = $0 { return true } else { return false }
        }
        assertError({ try ByteLevelBPETokenizer(tokens: ["a", "b"], merges: [], tokenTypes: [1], preTokenizer: .gpt2,
                                                bosID: nil, eosID: nil, unknownID: nil, addsBOS: false) },
                    mentions: ["tokenTypes"]) {
            if case .invalidValue = $0 { return true } else { return false }
        }
        assertError({ try ByteLevelBPETokenizer(tokens: ["a", "b"], merges: [], tokenTypes: nil, preTokenizer: .gpt2,
                                                bosID: 5, eosID: nil, unknownID: nil, addsBOS: true) },
                    mentions: ["bosID"]) {
            if case .invalidValue = $0 { return true } else { return false }
        }
    }

    func testByteLevelDecodeOutOfRangeIsSkipped() throws {
        let tok = try ByteLevelBPETokenizer(tokens: ["a", "b", "ab"], merges: ["a b"], tokenTypes: nil, preTokenizer: .gpt2,
                                            bosID: nil, eosID: nil, unknownID: nil, addsBOS: false)
        XCTAssertEqual(tok.encode("abab", addBOS: nil), [2, 2])
        XCTAssertEqual(tok.decode([2, -1, 3, 99, Int.max, 0]), "aba")
        // Bytes with no token are dropped (no unknown token given), as Hugging Face's BPE does.
        XCTAssertEqual(tok.encode("a c b", addBOS: nil), [0, 1])
    }
}

extension TokenizerErrorTests {
    func splitTokenizer(_ regex: String) -> Data {
        let escaped = regex.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "\"", with: "\\\"")
        return Data(#"""
        {"model": {"vocab": {"a": 0}, "merges": []},
         "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": "\#(escaped)"}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "use_regex": false}]}}
        """#.utf8)
    }

    func testUnsupportedSplitRegexIsNamed() throws {
        let path = try temporaryFile("tokenizer.json", splitTokenizer(#"(?<=\s)\p{L}+|\s"#))
        assertError({ try HuggingFaceTokenizer.load(path: path) },
                    mentions: [path, "pre_tokenizer.pretokenizers[0].pattern.Regex", "lookbehind", "offset 0"]) {
            if case .unsupported(let p, _, _, _) = $0 { return p == path } else { return false }
        }
        assertError({ try HuggingFaceTokenizer.load(json: self.splitTokenizer(#"\p{Greek}+"#), source: "t.json") },
                    mentions: ["t.json", "pattern.Regex", #"\p{Greek}"#]) {
            if case .unsupported = $0 { return true } else { return false }
        }
        assertError({ try HuggingFaceTokenizer.load(json: self.splitTokenizer("(ab|c"), source: "t.json") },
                    mentions: ["t.json", "pattern.Regex", "unterminated group"]) {
            if case .invalidValue = $0 { return true } else { return false }
        }
        // A supported pattern loads.
        XCTAssertNoThrow(try HuggingFaceTokenizer.load(json: splitTokenizer(#"\p{L}+|\s+(?!\S)|\s+"#), source: "t.json"))
    }
}
