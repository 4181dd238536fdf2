import Foundation
import XCTest
import TopiaryTestSupport
@testable import TopiaryTokenizers

final class Llama2CTokenizerTests: XCTestCase {
    static func stories() throws -> Llama2CTokenizer {
        try Llama2CTokenizer(path: try Assets.path("assets/stories260K/tok512.bin"), vocabularySize: 512)
    }

    func testEncodesTheB2Vector() throws {
        let tok = try Self.stories()
        XCTAssertEqual(tok.encode("Once upon a time", addBOS: true), [1, 403, 407, 261, 378])
        XCTAssertEqual(tok.encode("Once upon a time", addBOS: nil), [1, 403, 407, 261, 378])
        XCTAssertEqual(tok.encode("Once upon a time", addBOS: false), [403, 407, 261, 378])
        XCTAssertEqual(tok.encode("", addBOS: false), [])
        XCTAssertEqual(tok.encode("", addBOS: true), [1])
        XCTAssertEqual(tok.vocabularySize, 512)
        XCTAssertEqual(tok.bosID, 1)
        XCTAssertEqual(tok.eosID, 2)
        XCTAssertTrue(tok.addsBOS)
    }

    func testDecodesTheB2GreedyContinuation() throws {
        let tok = try Self.stories()
        let greedy = [403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 338, 401, 396, 267, 337]
        let story = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
            + "One day, she saw a big, red ball."
        let decoded = tok.decode([1] + greedy)
        XCTAssertTrue(decoded.count > 50 && story.hasPrefix(decoded), decoded)
        XCTAssertEqual(tok.decode(greedy), decoded, "the leading space is dropped at the start as after BOS")
        XCTAssertEqual(tok.decode([1] + greedy + [2]), decoded)
    }

    func testDecodeSkipsIdsOutOfRange() throws {
        let tok = try Self.stories()
        XCTAssertEqual(tok.decode([-1, 403, 512, 100_000, Int.max, Int.min]), "Once")
    }

    func testByteFallbackAndRoundTrip() throws {
        let tok = try Self.stories()
        // "🙂" has no token: four byte tokens (byte + 3); "\n" is <0x0A> = 13.
        let ids = tok.encode("a🙂\nb", addBOS: false)
        XCTAssertTrue(ids.contains(0xF0 + 3) && ids.contains(13), "\(ids)")
        for text in ["Once upon a time, Lily met a cat.", "Ünïcödé — “quotes” 123456\n\tTabs  and  spaces ",
                     "emoji 🙂 and 中文", " leading space", "trailing space ", "\n\nnewlines\n"] {
            XCTAssertEqual(tok.decode(tok.encode(text, addBOS: true)), text)
            XCTAssertEqual(tok.decode(tok.encode(text, addBOS: false)), text)
        }
    }

    /// llama2.c's loop, written plainly: rescan all pairs after every merge.
    static func referenceEncode(_ tok: Llama2CTokenizer, _ text: String, bos: Bool) -> [Int] {
        var lookup: [[UInt8]: Int] = [:]
        for (id, p) in tok.pieces.enumerated() where lookup[p] == nil { lookup[p] = id }
        var t: [Int] = bos ? [1] : []
        if !text.isEmpty { t.append(lookup[[0x20]]!) }
        for s in text.unicodeScalars {
            if let id = lookup[Array(String(s).utf8)] { t.append(id) } else { t += s.utf8.map { Int($0) + 3 } }
        }
        while true {
            var best: Float = -1e10, bestID = -1, bestIndex = -1
            for i in 0..<max(t.count - 1, 0) {
                if let id = lookup[tok.pieces[t[i]] + tok.pieces[t[i + 1]]], tok.scores[id] > best {
                    best = tok.scores[id]; bestID = id; bestIndex = i
                }
            }
            if bestIndex < 0 { break }
            t[bestIndex] = bestID
            t.remove(at: bestIndex + 1)
        }
        return t
    }

    func testAgreesWithThePlainLoop() throws {
        let tok = try Self.stories()
        let wizard = try String(contentsOfFile: try Assets.path("assets/public-domain-text/wizard_of_oz.txt"), encoding: .utf8)
        var texts = wizard.split(separator: "\n", omittingEmptySubsequences: false).prefix(300).map(String.init)
        texts.append(String(wizard.prefix(1500)))
        var rng = SplitMix(seed: 7)
        let alphabet = Array("aaeet hhs  .,\n'Ü🙂the")
        for _ in 0..<200 {
            texts.append(String((0..<Int(rng.next() % 40)).map { _ in alphabet[Int(rng.next() % UInt64(alphabet.count))] }))
        }
        for text in texts {
            XCTAssertEqual(tok.encode(text, addBOS: true), Self.referenceEncode(tok, text, bos: true), text)
        }
    }

    func testWholeBookIsFast() throws {
        let tok = try Self.stories()
        let wizard = try String(contentsOfFile: try Assets.path("assets/public-domain-text/wizard_of_oz.txt"), encoding: .utf8)
        let start = Date()
        let ids = tok.encode(wizard, addBOS: true)
        let seconds = Date().timeIntervalSince(start)
        print("llama2.c tokenizer: \(wizard.utf8.count) bytes -> \(ids.count) tokens in \(seconds) s")
        XCTAssertEqual(tok.decode(ids), wizard)
    }

    func testExportedJSONReproducesTheEncoding() throws {
        let tok = try Self.stories()
        let json = try tok.huggingFaceJSON()
        let reloaded = try HuggingFaceTokenizer.load(json: json, source: "exported tok512 tokenizer.json")
        XCTAssertEqual(reloaded.vocabularySize, 512)
        XCTAssertEqual(reloaded.bosID, 1)
        XCTAssertEqual(reloaded.eosID, 2)
        XCTAssertTrue(reloaded.addsBOS)
        let wizard = try String(contentsOfFile: try Assets.path("assets/public-domain-text/wizard_of_oz.txt"), encoding: .utf8)
        var texts = ["Once upon a time", "Ünïcödé — “quotes” 123456", "emoji 🙂 and 中文", "  two  spaces\tand a tab", ""]
        texts += wizard.split(separator: "\n").prefix(400).map(String.init)
        texts.append(String(wizard.prefix(20_000)))
        for text in texts {
            let ids = tok.encode(text, addBOS: nil)
            XCTAssertEqual(reloaded.encode(text, addBOS: nil), ids, text)
            XCTAssertEqual(reloaded.encode(text, addBOS: false), tok.encode(text, addBOS: false), text)
            XCTAssertEqual(reloaded.decode(ids), tok.decode(ids), text)
        }
    }
}

