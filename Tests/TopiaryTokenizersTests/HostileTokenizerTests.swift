import Foundation
import XCTest
import TopiaryTestSupport
@testable import TopiaryTokenizers

/// Tokenizer files built to be slow or to break integer conversions load in linear time or are
/// refused with one line naming the file and field.
final class HostileTokenizerTests: XCTestCase {
    /// A llama2.c tokenizer.bin: <unk>, <s>, </s>, 256 byte tokens, then `pieces` (scores falling).
    func tokenizerBin(_ pieces: [[UInt8]]) -> Data {
        var all: [[UInt8]] = [Array("<unk>".utf8), Array("<s>".utf8), Array("</s>".utf8)]
        for b in 0..<256 { all.append(Array(String(format: "<0x%02X>", b).utf8)) }
        all += pieces
        var out = Data()
        func put<T: FixedWidthInteger>(_ v: T) { withUnsafeBytes(of: v.littleEndian) { out.append(contentsOf: $0) } }
        put(Int32(all.map(\.count).max()!))
        for (i, p) in all.enumerated() {
            put((i < 259 ? Float(0) : -Float(i - 259)).bitPattern)
            put(Int32(p.count))
            out.append(contentsOf: p)
        }
        return out
    }

    func testOneLongTokenLoadsInLinearTime() throws {
        // 100 KB made of "ab" (both halves tokens, and "ab" itself): every cut is a candidate.
        let long = Array(repeating: Array("ab".utf8), count: 50_000).flatMap { $0 }
        let pieces = [Array("a".utf8), Array("b".utf8), Array("ab".utf8), long]
        let path = try temporaryFile("long.bin", tokenizerBin(pieces))
        let start = Date()
        let tok = try Llama2CTokenizer(path: path, vocabularySize: 259 + pieces.count)
        let seconds = Date().timeIntervalSince(start)
        XCTAssertLessThan(seconds, 2, "loading a tokenizer with one 100 KB token took \(seconds) s")
        // The merges it found are the ones the quadratic search found: a and b make ab, and the long
        // token is made from its two halves when both are tokens (never here: 50 KB halves are not).
        XCTAssertEqual(tok.encode("ab", addBOS: false), [35, 261])  // the dummy-prefix space is byte token 0x20 + 3
        XCTAssertEqual(tok.decode([262]).count, 100_000)
    }

    func testManyPrefixTokensLoadFast() throws {
        // a, aa, aaa, ... up to 1,000 a's: 0.5 MB of tokens, each cut into every pair of shorter ones.
        let pieces = (1...1_000).map { Array(repeating: UInt8(ascii: "a"), count: $0) }
        let path = try temporaryFile("prefixes.bin", tokenizerBin(pieces))
        let start = Date()
        let tok = try Llama2CTokenizer(path: path, vocabularySize: 259 + pieces.count)
        XCTAssertLessThan(Date().timeIntervalSince(start), 10)
        XCTAssertEqual(tok.encode("aaaa", addBOS: false), [35, 262])
    }

    func testCutsMatchTheDirectSearch() throws {
        // The tries find exactly the (left, right) pairs that looking every prefix and suffix up finds.
        let tok = try Llama2CTokenizer(path: try Assets.path("assets/stories260K/tok512.bin"), vocabularySize: 512)
        var expected = Set<UInt64>()
        var ids: [[UInt8]: Int32] = [:]
        for (id, p) in tok.pieces.enumerated() where ids[p] == nil { ids[p] = Int32(id) }
        for (id, p) in tok.pieces.enumerated() where p.count >= 2 && ids[p] == Int32(id) && tok.scores[id] > -1e10 {
            for cut in 1..<p.count {
                if let l = ids[Array(p[..<cut])], let r = ids[Array(p[cut...])] { expected.insert(MergeTable.key(l, r)) }
            }
        }
        XCTAssertGreaterThan(expected.count, 100)
        XCTAssertEqual(Set(tok.merges.entries.map(\.key)), expected)
    }

    func testTokenizerJSONBooleansAndIdsAreStrict() throws {
        let base = #"{"model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": ["a b"], "byte_fallback": BOOL}}"#
        for (value, ok) in [("true", true), ("false", true), ("1", false), ("0", false), (#""true""#, false)] {
            let path = try temporaryFile("tokenizer.json", Data(base.replacingOccurrences(of: "BOOL", with: value).utf8))
            if ok {
                XCTAssertNoThrow(try HuggingFaceTokenizer.load(path: path))
            } else {
                XCTAssertThrowsError(try HuggingFaceTokenizer.load(path: path)) { error in
                    XCTAssertTrue("\(error)".contains("model.byte_fallback") && "\(error)".contains("true or false"), "\(error)")
                }
            }
        }
        // Post-processor ids beyond 32 bits (or negative) are refused, not converted with a trap.
        for id in ["4294967296", "-1", "1e300"] {
            let json = #"{"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}, "post_processor": {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<s>"}}, {"Sequence": {"id": "A"}}], "special_tokens": {"<s>": {"id": "<s>", "ids": [\#(id)]}}}}"#
            let path = try temporaryFile("tokenizer.json", Data(json.utf8))
            XCTAssertThrowsError(try HuggingFaceTokenizer.load(path: path)) { error in
                XCTAssertTrue("\(error)".contains("post_processor.special_tokens.<s>.ids[0]"), "\(error)")
            }
        }
        let roberta = #"{"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}, "post_processor": {"type": "RobertaProcessing", "cls": ["<s>", 99999999999], "sep": ["</s>", 2]}}"#
        let path = try temporaryFile("tokenizer.json", Data(roberta.utf8))
        XCTAssertThrowsError(try HuggingFaceTokenizer.load(path: path)) { error in
            XCTAssertTrue("\(error)".contains("post_processor.cls[1]"), "\(error)")
        }
    }
}
