import Foundation
import XCTest
import TopiaryTestSupport
@testable import TopiaryTokenizers

/// The hand-written pattern matchers against ICU's regular expressions on the same patterns.
final class PreTokenizerTests: XCTestCase {
    func pieces(_ text: String, _ pattern: SplitPattern) -> [String] {
        var p = Pieces([UInt32](scalarsOf: text), startsText: true)
        splitPieces(&p, pattern: pattern, behavior: .isolated, invert: false)
        return p.ranges.map { Array(p.scalars[$0]).asString }
    }

    static var samples: [String] {
        var texts = [
            "Hello world", "  two  spaces\tand a tab", "I'm Oz, they'll say 'hi' — we've I'D 'S", "123456 1,234.5 x2",
            "Ünïcödé “quotes” 中文 🙂", "a  \n\n  b\r\n c \n", "trailing   ", "   ", "\n", "!!! ?? ...\n\nabc",
            "it's ’s 'll 'LL 'Re", "٣٤٥ Ⅻ ½ x²", "\u{00A0}nbsp\u{2003}em\u{3000}ideo", "e\u{0301}", "_under_score_",
        ]
        var rng = SplitMix(seed: 11)
        let alphabet = Array("ab Z9 0'sltrdmv\n\r\t.,!?\u{00A0}é中🙂½ ")
        for _ in 0..<300 {
            texts.append(String((0..<Int(rng.next() % 24)).map { _ in alphabet[Int(rng.next() % UInt64(alphabet.count))] }))
        }
        return texts
    }

    func testGPT2MatcherAgreesWithICU() throws {
        let icu = SplitPattern.regex(try RegexBox(SplitPattern.gpt2Source))
        for text in Self.samples {
            XCTAssertEqual(pieces(text, .gpt2), pieces(text, icu), text.debugDescription)
        }
    }

    func testLlama3MatcherAgreesWithICU() throws {
        let icu = SplitPattern.regex(try RegexBox(SplitPattern.llama3Source))
        for text in Self.samples {
            XCTAssertEqual(pieces(text, .llama3), pieces(text, icu), text.debugDescription)
        }
    }

    func testGPT2Pieces() {
        XCTAssertEqual(pieces("I'm Oz,  the Great!", .gpt2), ["I", "'m", " Oz", ",", " ", " the", " Great", "!"])
        XCTAssertEqual(pieces("x 123\n\n", .gpt2), ["x", " 123", "\n\n"])
    }

    func testLlama3Pieces() {
        XCTAssertEqual(pieces("I'M 12345 (hello)\n\n world", .llama3),
                       ["I", "'M", " ", "123", "45", " (", "hello", ")\n\n", " world"])
    }

    func testDigitsAndSplitBehaviours() {
        func split(_ text: String, _ pattern: SplitPattern, _ behavior: SplitBehavior, invert: Bool = false) -> [String] {
            var p = Pieces([UInt32](scalarsOf: text), startsText: true)
            splitPieces(&p, pattern: pattern, behavior: behavior, invert: invert)
            return p.ranges.map { Array(p.scalars[$0]).asString }
        }
        XCTAssertEqual(split("ab12c3", .digit, .isolated), ["ab", "1", "2", "c", "3"])
        XCTAssertEqual(split("ab12c3", .digit, .contiguous), ["ab", "12", "c", "3"])
        let dash = SplitPattern.literal([UInt32](scalarsOf: "-"))
        XCTAssertEqual(split("a-b--c-", dash, .removed), ["a", "b", "c"])
        XCTAssertEqual(split("a-b--c-", dash, .mergedWithPrevious), ["a-", "b-", "-", "c-"])
        XCTAssertEqual(split("-a-b--c", dash, .mergedWithNext), ["-a", "-b", "-", "-c"])
        XCTAssertEqual(split("a-b--c", dash, .contiguous), ["a", "-", "b", "--", "c"])
        XCTAssertEqual(split("a-b--c", dash, .removed, invert: true), ["-", "-", "-"])
    }

    func testMetaspace() {
        var p = Pieces([UInt32](scalarsOf: "Hey  you"), startsText: true)
        PreTokenizerStep.metaspace(replacement: 0x2581, prependScheme: .always, split: true).apply(&p)
        XCTAssertEqual(p.ranges.map { Array(p.scalars[$0]).asString }, ["▁Hey", "▁", "▁you"])
        var q = Pieces([UInt32](scalarsOf: "Hey"), startsText: false)
        PreTokenizerStep.metaspace(replacement: 0x2581, prependScheme: .first, split: false).apply(&q)
        XCTAssertEqual(q.ranges.map { Array(q.scalars[$0]).asString }, ["Hey"])
    }

    func testByteLevelMapIsGPT2s() {
        XCTAssertEqual(ByteLevelMap.byteToScalar[0x20], 0x120)  // Ġ
        XCTAssertEqual(ByteLevelMap.byteToScalar[0x0A], 0x10A)  // Ċ
        XCTAssertEqual(ByteLevelMap.byteToScalar[0x41], 0x41)
        XCTAssertEqual(ByteLevelMap.byteToScalar[0xAD], 0x143)
        XCTAssertEqual(Set(ByteLevelMap.byteToScalar).count, 256)
        var bytes: [UInt8] = []
        XCTAssertTrue(ByteLevelMap.bytes(of: ByteLevelMap.encode(Array(0...255)), into: &bytes))
        XCTAssertEqual(bytes, Array(0...255))
    }

    /// The heap merger against the plain "rescan for the lowest rank" loop.
    func testPairMergerAgreesWithRescanning() {
        var rng = SplitMix(seed: 3)
        var table = MergeTable()
        var plain: [UInt64: PairMerge] = [:]
        for k in 0..<40 {
            let l = Int32(rng.next() % 6), r = Int32(rng.next() % 6)
            let m = PairMerge(rank: Int32(rng.next() % 12), result: Int32(k % 6))
            if plain[MergeTable.key(l, r)] == nil { plain[MergeTable.key(l, r)] = m }
            table.add(left: l, right: r, rank: m.rank, result: m.result)
        }
        var workspace = MergeWorkspace()
        for _ in 0..<500 {
            let input = (0..<Int(rng.next() % 30)).map { _ in Int32(rng.next() % 6) }
            var expected = input
            while true {
                var best: (rank: Int32, index: Int)? = nil
                for i in 0..<max(expected.count - 1, 0) {
                    if let m = plain[MergeTable.key(expected[i], expected[i + 1])], best == nil || m.rank < best!.rank {
                        best = (m.rank, i)
                    }
                }
                guard let (_, i) = best else { break }
                expected[i] = plain[MergeTable.key(expected[i], expected[i + 1])]!.result
                expected.remove(at: i + 1)
            }
            var got = input
            mergePairs(&got, table: table, workspace: &workspace)
            XCTAssertEqual(got, expected, "\(input)")
        }
    }
}
