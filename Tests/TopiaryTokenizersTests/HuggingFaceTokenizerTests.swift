import Foundation
import XCTest
@testable import TopiaryTokenizers

final class HuggingFaceTokenizerTests: XCTestCase {
    struct Expected: Decodable {
        var text: String
        var ids: [Int]
        var decoded: String
    }

    func expectations(_ fixture: String) throws -> [Expected] {
        let data = try Data(contentsOf: URL(fileURLWithPath: try Assets.path("fixtures/\(fixture)/expected_encodings.json")))
        return try JSONDecoder().decode([Expected].self, from: data)
    }

    func checkFixture(_ fixture: String, file: StaticString = #filePath, line: UInt = #line) throws -> any Tokenizer {
        let tok = try HuggingFaceTokenizer.load(path: try Assets.path("fixtures/\(fixture)/tokenizer.json"))
        // Neither tokenizer.json has a post-processor, so no BOS is added and the expected ids start without one.
        XCTAssertFalse(tok.addsBOS, file: file, line: line)
        for e in try expectations(fixture) {
            XCTAssertEqual(tok.encode(e.text, addBOS: nil), e.ids, e.text, file: file, line: line)
            XCTAssertEqual(tok.decode(e.ids), e.decoded, e.text, file: file, line: line)
        }
        // The exported JSON gives the same tokenizer back.
        let reloaded = try HuggingFaceTokenizer.load(json: try tok.huggingFaceJSON(), source: "re-exported \(fixture)")
        for e in try expectations(fixture) {
            XCTAssertEqual(reloaded.encode(e.text, addBOS: nil), e.ids, e.text, file: file, line: line)
            XCTAssertEqual(reloaded.decode(e.ids), e.decoded, e.text, file: file, line: line)
        }
        return tok
    }

    func testByteLevelFixture() throws {
        let tok = try checkFixture("tokenizer-bytelevel")
        XCTAssertEqual(tok.vocabularySize, 600)
        XCTAssertEqual(tok.eosID, 0)  // <|endoftext|>
        XCTAssertEqual(tok.encode("<|endoftext|>The", addBOS: nil), [0, 348])
        XCTAssertEqual(tok.decode([0, 348]), "The", "special tokens decode to nothing")
    }

    func testSentencePieceFixture() throws {
        let tok = try checkFixture("tokenizer-sentencepiece")
        XCTAssertEqual(tok.vocabularySize, 700)
        XCTAssertEqual(tok.bosID, 1)
        XCTAssertEqual(tok.eosID, 2)
        XCTAssertEqual(tok.encode("Once", addBOS: true).first, 1)
        // Prepend applies to each stretch between added tokens, as in Hugging Face.
        XCTAssertEqual(tok.encode("<s>The", addBOS: false), [1] + tok.encode("The", addBOS: false))
    }

    func testTokenizerConfigBesideTheFileSuppliesBOS() throws {
        let json = try Data(contentsOf: URL(fileURLWithPath: try Assets.path("fixtures/tokenizer-sentencepiece/tokenizer.json")))
        let file = try temporaryFile("tokenizer.json", json)
        let config = #"{"bos_token": {"content": "<s>"}, "eos_token": "</s>", "add_bos_token": true}"#
        try Data(config.utf8).write(to: URL(fileURLWithPath: file).deletingLastPathComponent().appendingPathComponent("tokenizer_config.json"))
        let tok = try HuggingFaceTokenizer.load(path: URL(fileURLWithPath: file).deletingLastPathComponent().path)
        XCTAssertTrue(tok.addsBOS)
        XCTAssertEqual(tok.encode("Once upon", addBOS: nil), [1, 343, 296, 323, 449, 474, 359])
        XCTAssertEqual(tok.encode("Once upon", addBOS: false), [343, 296, 323, 449, 474, 359])
        // The exported file records BOS in its post-processor.
        let reloaded = try HuggingFaceTokenizer.load(json: try tok.huggingFaceJSON())
        XCTAssertTrue(reloaded.addsBOS)
        XCTAssertEqual(reloaded.encode("Once upon", addBOS: nil), [1, 343, 296, 323, 449, 474, 359])
    }

    /// The same byte-level vocabulary through ByteLevelBPETokenizer (as a GGUF file would give it).
    func testByteLevelTokenizerMatchesTheFixture() throws {
        let path = try Assets.path("fixtures/tokenizer-bytelevel/tokenizer.json")
        let root = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: path))) as! [String: Any]
        let model = root["model"] as! [String: Any]
        let vocab = model["vocab"] as! [String: Int]
        var tokens = [String](repeating: "", count: vocab.count)
        for (t, id) in vocab { tokens[id] = t }
        let merges = (model["merges"] as! [[String]]).map { $0.joined(separator: " ") }
        var types = [Int](repeating: 1, count: tokens.count)
        types[0] = 3
        let tok = try ByteLevelBPETokenizer(tokens: tokens, merges: merges, tokenTypes: types, preTokenizer: .gpt2,
                                            bosID: nil, eosID: 0, unknownID: nil, addsBOS: false)
        for e in try expectations("tokenizer-bytelevel") {
            XCTAssertEqual(tok.encode(e.text, addBOS: nil), e.ids, e.text)
            XCTAssertEqual(tok.decode(e.ids), e.decoded, e.text)
        }
        let reloaded = try HuggingFaceTokenizer.load(json: try tok.huggingFaceJSON())
        for e in try expectations("tokenizer-bytelevel") {
            XCTAssertEqual(reloaded.encode(e.text, addBOS: nil), e.ids, e.text)
        }
        let withList = try ByteLevelBPETokenizer(tokens: tokens, merges: merges, tokenTypes: nil, preTokenizer: .gpt2,
                                                 bosID: nil, eosID: 0, unknownID: nil, addsBOS: false,
                                                 specialTokens: ["<|endoftext|>"])
        XCTAssertEqual(withList.encode("a<|endoftext|>b", addBOS: nil), tok.encode("a<|endoftext|>b", addBOS: nil))
        XCTAssertEqual(withList.encode("<|endoftext|>", addBOS: nil), [0])
    }

    func testPreTokenizerVariantsExportAndReload() throws {
        let path = try Assets.path("fixtures/tokenizer-bytelevel/tokenizer.json")
        let root = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: path))) as! [String: Any]
        let model = root["model"] as! [String: Any]
        let vocab = model["vocab"] as! [String: Int]
        var tokens = [String](repeating: "", count: vocab.count)
        for (t, id) in vocab { tokens[id] = t }
        let merges = (model["merges"] as! [[String]]).map { $0.joined(separator: " ") }
        let texts = PreTokenizerTests.samples + ["Once upon a time 12345, Dorothy's dog.\n\n  Toto!", "<|endoftext|>x 1"]
        for variant in [ByteLevelBPETokenizer.PreTokenizer.gpt2, .smollm, .llama3] {
            let tok = try ByteLevelBPETokenizer(tokens: tokens, merges: merges, tokenTypes: nil, preTokenizer: variant,
                                                bosID: 0, eosID: 0, unknownID: nil, addsBOS: true,
                                                specialTokens: ["<|endoftext|>"])
            let reloaded = try HuggingFaceTokenizer.load(json: try tok.huggingFaceJSON(), source: "\(variant)")
            XCTAssertTrue(reloaded.addsBOS)
            for text in texts {
                let ids = tok.encode(text, addBOS: nil)
                XCTAssertEqual(ids.first, 0)
                XCTAssertEqual(reloaded.encode(text, addBOS: nil), ids, "\(variant): \(text.debugDescription)")
                XCTAssertEqual(tok.decode(ids), text.replacingOccurrences(of: "<|endoftext|>", with: ""))
            }
        }
        // smollm: each digit on its own, also away from its leading space; gpt2 keeps " 123" together.
        let smollm = try ByteLevelBPETokenizer(tokens: tokens, merges: merges, tokenTypes: nil, preTokenizer: .smollm,
                                               bosID: nil, eosID: nil, unknownID: nil, addsBOS: false)
        XCTAssertEqual(smollm.encode("x 123", addBOS: nil), [vocab["x"]!, vocab["Ġ"]!, vocab["1"]!, vocab["2"]!, vocab["3"]!])
    }

    func testIgnoreMergesEmitsWholeTokens() throws {
        let tokens = ["a", "b", "c", "ab", "abc"]
        for (variant, expected) in [(ByteLevelBPETokenizer.PreTokenizer.gpt2, [3, 2]), (.llama3, [4])] {
            let tok = try ByteLevelBPETokenizer(tokens: tokens, merges: ["a b"], tokenTypes: nil, preTokenizer: variant,
                                                bosID: nil, eosID: nil, unknownID: nil, addsBOS: false)
            XCTAssertEqual(tok.encode("abc", addBOS: nil), expected, "\(variant)")
        }
    }

    func testMetaspaceTokenizer() throws {
        let json = #"""
        {"added_tokens": [{"id": 4, "content": "<unk>", "special": true}],
         "normalizer": null,
         "pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": true},
         "decoder": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": true},
         "model": {"type": "BPE", "unk_token": "<unk>", "fuse_unk": true,
                   "vocab": {"▁": 0, "a": 1, "b": 2, "▁a": 3, "<unk>": 4}, "merges": [["▁", "a"]]}}
        """#
        let tok = try HuggingFaceTokenizer.load(json: Data(json.utf8), source: "metaspace.json")
        XCTAssertEqual(tok.encode("a b", addBOS: nil), [3, 0, 2])
        XCTAssertEqual(tok.encode("a  b", addBOS: nil), [3, 0, 0, 2])
        XCTAssertEqual(tok.encode("axyb", addBOS: nil), [3, 4, 2], "unknown characters fused into one <unk>")
        XCTAssertEqual(tok.decode([3, 0, 2]), "a b")
        let reloaded = try HuggingFaceTokenizer.load(json: try tok.huggingFaceJSON(), source: "re-exported metaspace.json")
        XCTAssertEqual(reloaded.encode("a  b", addBOS: nil), [3, 0, 0, 2])
        XCTAssertEqual(reloaded.decode([3, 0, 2]), "a b")
    }

    func testDecodeSkipsIdsOutOfRange() throws {
        let tok = try HuggingFaceTokenizer.load(path: try Assets.path("fixtures/tokenizer-sentencepiece/tokenizer.json"))
        XCTAssertEqual(tok.decode([-5, 343, 296, 700, 1 << 40, 323]), "On")
    }
}
