import Foundation
import XCTest
import TopiaryTestSupport
@testable import TopiaryTokenizers

/// The Llama-3 and Qwen2 kinds of tokenizer.json (Split regex pre-tokenizer, ByteLevel without its own regex,
/// BPE with ignore_merges, NFC for Qwen2, a TemplateProcessing that adds <|begin_of_text|> for Llama-3)
/// against the ids and decodings the Hugging Face tokenizers library recorded.
final class RegexSplitFixtureTests: XCTestCase {
    struct Case: Decodable {
        var text: String
        var ids: [Int]
        var ids_no_special: [Int]
        var decoded: String
    }

    struct Expected: Decodable { var cases: [Case] }

    func fixture(_ name: String) throws -> (tokenizer: String, cases: [Case]) {
        let tokenizer = TestPaths.fixture("\(name)/tokenizer.json")
        let expected = TestPaths.fixture("\(name)/expected.json")
        for p in [tokenizer, expected] where !FileManager.default.fileExists(atPath: p) { throw MissingAsset(p) }
        let cases = try JSONDecoder().decode(Expected.self, from: Data(contentsOf: URL(fileURLWithPath: expected))).cases
        XCTAssertGreaterThanOrEqual(cases.count, 8, "\(expected) holds fewer cases than recorded")
        return (tokenizer, cases)
    }

    /// Every recorded case: ids with the post-processor (addBOS nil: as the file says), without it (addBOS
    /// false), and the recorded decoding, which is that of the ids without the post-processor's, special tokens
    /// kept. Skipping special tokens (our default) gives the same text less the special tokens' own.
    func check(_ tok: any Tokenizer, _ cases: [Case], _ label: String, specials: [String],
               file: StaticString = #filePath, line: UInt = #line) {
        for c in cases {
            let what = "\(label): \(c.text.debugDescription)"
            XCTAssertEqual(tok.encode(c.text, addBOS: nil), c.ids, what, file: file, line: line)
            XCTAssertEqual(tok.encode(c.text, addBOS: false), c.ids_no_special, "\(what) without special tokens", file: file, line: line)
            XCTAssertEqual(tok.decode(c.ids_no_special, skipSpecialTokens: false), c.decoded, "\(what) decoding", file: file, line: line)
            var skipped = c.decoded
            for s in specials { skipped = skipped.replacingOccurrences(of: s, with: "") }
            XCTAssertEqual(tok.decode(c.ids), skipped, "\(what) decoding without special tokens", file: file, line: line)
        }
    }

    func testLlama3Fixture() throws {
        let (path, cases) = try fixture("tokenizer-llama3")
        let tok = try HuggingFaceTokenizer.load(path: path)
        XCTAssertTrue(tok.addsBOS)
        XCTAssertEqual(tok.bosID, 0)  // <|begin_of_text|>
        XCTAssertEqual(tok.vocabularySize, 900)
        let specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]
        check(tok, cases, "llama3", specials: specials)
        for c in cases where !c.ids.isEmpty {
            XCTAssertEqual(tok.encode(c.text, addBOS: true), c.ids, c.text.debugDescription)
        }
        let reloaded = try HuggingFaceTokenizer.load(json: try tok.huggingFaceJSON(), source: "re-exported llama3")
        check(reloaded, cases, "re-exported llama3", specials: specials)
    }

    func testQwen2Fixture() throws {
        let (path, cases) = try fixture("tokenizer-qwen2")
        let tok = try HuggingFaceTokenizer.load(path: path)
        XCTAssertFalse(tok.addsBOS, "Qwen2's tokenizer.json has no post-processor")
        XCTAssertEqual(tok.vocabularySize, 900)
        let specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        check(tok, cases, "qwen2", specials: specials)
        let reloaded = try HuggingFaceTokenizer.load(json: try tok.huggingFaceJSON(), source: "re-exported qwen2")
        check(reloaded, cases, "re-exported qwen2", specials: specials)
    }
}

/// A Qwen2 tokenizer as llama.cpp stores it in a GGUF file (`tokenizer.ggml.pre` = qwen2: vocab, merges
/// and token types; the pattern implied) gives the ids Hugging Face gives with its tokenizer.json.
final class GGUFQwen2PresetTests: XCTestCase {
    func testQwen2PresetMatchesTheTokenizerJSON() throws {
        let path = TestPaths.fixture("tokenizer-qwen2/tokenizer.json")
        let expectedPath = TestPaths.fixture("tokenizer-qwen2/expected.json")
        for p in [path, expectedPath] where !FileManager.default.fileExists(atPath: p) { throw MissingAsset(p) }
        let json = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: path))) as! [String: Any]
        let model = json["model"] as! [String: Any]
        let vocab = model["vocab"] as! [String: Int]
        var tokens = [String](repeating: "", count: vocab.count)
        for (t, id) in vocab { tokens[id] = t }
        var types = [Int](repeating: 1, count: tokens.count)
        for added in json["added_tokens"] as? [[String: Any]] ?? [] {
            let id = added["id"] as! Int
            if id >= tokens.count {
                tokens += [String](repeating: "", count: id - tokens.count + 1)
                types += [Int](repeating: 1, count: id - types.count + 1)
            }
            tokens[id] = added["content"] as! String
            types[id] = (added["special"] as? Bool ?? false) ? 3 : 4
        }
        let merges = (model["merges"] as! [Any]).map { m -> String in
            if let s = m as? String { return s }
            return (m as! [String]).joined(separator: " ")
        }
        let tokenizer = try ByteLevelBPETokenizer(tokens: tokens, merges: merges, tokenTypes: types, preTokenizer: .qwen2,
                                                  bosID: nil, eosID: nil, unknownID: nil, addsBOS: false)
        let cases = try JSONDecoder().decode(RegexSplitFixtureTests.Expected.self, from: Data(contentsOf: URL(fileURLWithPath: expectedPath))).cases
        XCTAssertGreaterThanOrEqual(cases.count, 8)
        for c in cases { XCTAssertEqual(tokenizer.encode(c.text, addBOS: false), c.ids_no_special, c.text.debugDescription) }
    }
}
