import Foundation
import TopiaryModel
import TopiaryTokenizers
import XCTest
import TopiaryTestSupport

/// SmolLM2's tokenizer, built from the GGUF file's metadata, against the vectors in baselines-and-assets.md B3.
final class GGUFTokenizerTests: XCTestCase {
    static var shared: URL { TestPaths.shared }

    static func asset(_ relative: String) throws -> String {
        let path = shared.appendingPathComponent("assets").appendingPathComponent(relative).path
        guard FileManager.default.fileExists(atPath: path) else { throw MissingAsset(path) }
        return path
    }

    static func smolLM2() throws -> ByteLevelBPETokenizer {
        let g = try GGUFFile(path: try asset("smollm2-135m-instruct-q4_1/SmolLM2-135M-Instruct.Q4_1.gguf"))
        let m = g.metadata
        XCTAssertEqual(m["tokenizer.ggml.model"]?.string, "gpt2")
        let pre = try XCTUnwrap(m["tokenizer.ggml.pre"]?.string.flatMap(ByteLevelBPETokenizer.PreTokenizer.init(rawValue:)))
        return try ByteLevelBPETokenizer(
            tokens: try XCTUnwrap(m["tokenizer.ggml.tokens"]?.stringArray),
            merges: try XCTUnwrap(m["tokenizer.ggml.merges"]?.stringArray),
            tokenTypes: m["tokenizer.ggml.token_type"]?.array?.compactMap(\.int),
            preTokenizer: pre,
            bosID: m["tokenizer.ggml.bos_token_id"]?.int,
            eosID: m["tokenizer.ggml.eos_token_id"]?.int,
            unknownID: m["tokenizer.ggml.unknown_token_id"]?.int,
            addsBOS: m["tokenizer.ggml.add_bos_token"]?.bool ?? false)
    }

    static let chatPrompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"

    func testChatPrompt() throws {
        let tok = try Self.smolLM2()
        XCTAssertEqual(tok.vocabularySize, 49152)
        XCTAssertEqual(tok.bosID, 1)
        XCTAssertEqual(tok.eosID, 2)
        XCTAssertFalse(tok.addsBOS)
        XCTAssertEqual(tok.encode(Self.chatPrompt, addBOS: nil), [1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198])
    }

    func testWikiTextCountAndRoundTrip() throws {
        let tok = try Self.smolLM2()
        let text = try String(contentsOfFile: try Self.asset("wikitext-2-raw/wiki.test.joined.txt"), encoding: .utf8)
        let start = Date()
        let ids = tok.encode(text, addBOS: nil)
        print("SmolLM2 tokenizer: \(text.utf8.count) bytes -> \(ids.count) tokens in \(Date().timeIntervalSince(start)) s")
        XCTAssertEqual(ids.count, 304_829)
        XCTAssertEqual(Array(ids.prefix(8)), [446, 6356, 389, 9226, 352, 446, 216, 16506])
        XCTAssertEqual(tok.decode(ids), text)
    }

    func testDecodeReversesEncode() throws {
        let tok = try Self.smolLM2()
        for text in ["The capital of France is Paris.", "  two  spaces\tand a tab\n", "Ünïcödé — “quotes” 123456",
                     "emoji 🙂 and 中文", "I'm Oz, they'll say 'hi'!", ""] {
            XCTAssertEqual(tok.decode(tok.encode(text, addBOS: nil)), text)
        }
        // Control tokens decode to nothing; ids out of range are skipped.
        XCTAssertEqual(tok.decode(tok.encode(Self.chatPrompt, addBOS: nil)), "user\nWhat is the capital of France?\nassistant\n")
        XCTAssertEqual(tok.decode([-1, 49152, 504, 1 << 40]), tok.decode([504]))
    }

    func testExportedJSONReproducesTheEncoding() throws {
        let tok = try Self.smolLM2()
        let reloaded = try HuggingFaceTokenizer.load(json: try tok.huggingFaceJSON(), source: "exported SmolLM2 tokenizer.json")
        XCTAssertEqual(reloaded.vocabularySize, 49152)
        XCTAssertFalse(reloaded.addsBOS)
        XCTAssertEqual(reloaded.encode(Self.chatPrompt, addBOS: nil), tok.encode(Self.chatPrompt, addBOS: nil))
        let text = try String(contentsOfFile: try Self.asset("wikitext-2-raw/wiki.test.joined.txt"), encoding: .utf8)
        let slice = String(text.prefix(100_000))
        let ids = tok.encode(slice, addBOS: nil)
        XCTAssertEqual(reloaded.encode(slice, addBOS: nil), ids)
        XCTAssertEqual(reloaded.decode(ids), slice)
    }
}
