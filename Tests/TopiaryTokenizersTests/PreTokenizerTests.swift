import Foundation
import XCTest
import TopiaryTestSupport
@testable import TopiaryTokenizers

/// The regular expression engine of Split pre-tokenizers against ICU's regular expressions on the same patterns
/// (where ICU and Oniguruma, which Hugging Face uses, agree), and the splitting behaviours.
final class PreTokenizerTests: XCTestCase {
    func pieces(_ text: String, _ pattern: SplitPattern) -> [String] {
        var p = Pieces([UInt32](scalarsOf: text), startsText: true)
        splitPieces(&p, pattern: pattern, behavior: .isolated, invert: false)
        return p.ranges.map { Array(p.scalars[$0]).asString }
    }

    func pieces(_ text: String, regex source: String) throws -> [String] {
        pieces(text, .regex(try SplitRegex(source)))
    }

    /// ICU's non-empty matches of `source` in `text` and the stretches between them, in order.
    func icuPieces(_ text: String, _ source: String) throws -> [String] {
        let regex = try NSRegularExpression(pattern: source)
        let ns = text as NSString
        var out: [String] = []
        var pos = 0
        for m in regex.matches(in: text, range: NSRange(location: 0, length: ns.length)) where m.range.length > 0 {
            if m.range.location > pos { out.append(ns.substring(with: NSRange(location: pos, length: m.range.location - pos))) }
            out.append(ns.substring(with: m.range))
            pos = m.range.location + m.range.length
        }
        if pos < ns.length { out.append(ns.substring(from: pos)) }
        return out
    }

    static var samples: [String] {
        var texts = [
            "Hello world", "  two  spaces\tand a tab", "I'm Oz, they'll say 'hi' — we've I'D 'S", "123456 1,234.5 x2",
            "Ünïcödé “quotes” 中文 🙂", "a  \n\n  b\r\n c \n", "trailing   ", "   ", "\n", "!!! ?? ...\n\nabc",
            "it's ’s 'll 'LL 'Re", "٣٤٥ Ⅻ ½ x²", "\u{00A0}nbsp\u{2003}em\u{3000}ideo", "e\u{0301}", "_under_score_",
            "AbcDEF ghIJ aab abb ba xxxx xxx 12 1234 éé 中中丮",
        ]
        var rng = SplitMix(seed: 11)
        let alphabet = Array("ab Z9 0'sltrdmv\n\r\t.,!?\u{00A0}é中🙂½ ")
        for _ in 0..<300 {
            texts.append(String((0..<Int(rng.next() % 24)).map { _ in alphabet[Int(rng.next() % UInt64(alphabet.count))] }))
        }
        return texts
    }

    static let qwen2Source =
        #"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"#

    /// Patterns on which ICU and Oniguruma agree for the samples (no '.', \w or \v, whose meanings differ).
    static let comparedPatterns = [
        SplitPattern.gpt2Source, SplitPattern.llama3Source, qwen2Source,
        #"[a-z]+|[A-Z][a-z]*?|\d{2,}|x{3}|(?:ab|a)(?=b)|(?i:[a-c]+)|[^\s]"#,
        #"\p{Lu}\p{Ll}*|\p{P}+|\p{Zs}|\P{L}"#,
        #"[\u00e9\x{4E2D}-\x{4E2E}]+|[0-9]{1,2}|(a|b)+?b|\s(?!\s)"#,
        #"(?i:AB|Z)|[-,.!?]{2}|\S+?(?=\s)"#,
    ]

    func testCompiledPatternsAgreeWithICU() throws {
        for source in Self.comparedPatterns {
            let compiled = SplitPattern.regex(try SplitRegex(source))
            for text in Self.samples {
                XCTAssertEqual(pieces(text, compiled), try icuPieces(text, source), "\(source) on \(text.debugDescription)")
            }
        }
        // The shared instances are these patterns.
        for text in Self.samples {
            XCTAssertEqual(pieces(text, .gpt2), try icuPieces(text, SplitPattern.gpt2Source), text.debugDescription)
            XCTAssertEqual(pieces(text, .llama3), try icuPieces(text, SplitPattern.llama3Source), text.debugDescription)
        }
    }

    /// Oniguruma's meanings where ICU's differ, and the search rules.
    func testOnigurumaMeanings() throws {
        XCTAssertEqual(try pieces("ab\ncd\re", regex: ".+"), ["ab", "\n", "cd\re"], "'.' is anything but \\n")
        XCTAssertEqual(try pieces("x½y Ⅻ_", regex: #"\w+"#), ["x½y", " ", "Ⅻ_"], "\\w is L, M, N and Pc")
        XCTAssertEqual(try pieces("a\u{0B}\u{85}\u{2028}b\u{1F}", regex: #"\s+"#), ["a", "\u{0B}\u{85}\u{2028}", "b\u{1F}"])
        XCTAssertEqual(try pieces("a٣½", regex: #"\d"#), ["a", "٣", "½"], "\\d is Nd only")
        // Case-insensitive literals and classes fold ſ to s and the Kelvin sign to k.
        XCTAssertEqual(pieces("x'ſ 'S", .llama3), ["x", "'ſ", " '", "S"])
        XCTAssertEqual(try pieces("\u{212A}K", regex: "(?i:k)"), ["\u{212A}", "K"])
        XCTAssertEqual(try pieces("Kſ", regex: "(?i:[a-z]+)"), ["Kſ"])
        XCTAssertEqual(try pieces("abc", regex: "(?i:A(?-i:b)C)"), ["abc"])
        XCTAssertEqual(try pieces("aBcabC", regex: "(?i:A(?-i:b)C)"), ["aBc", "abC"], "(?-i:…) turns case-insensitivity off")
        // An empty match starts nothing: the scalar goes to the stretch between matches.
        XCTAssertEqual(try pieces("axxb", regex: "x*"), ["a", "xx", "b"])
        XCTAssertEqual(try pieces("abac", regex: "a(?=b)"), ["a", "bac"])
        // A lookahead sees only its piece: "\s+(?!\S)" takes the whole run at a piece's end.
        XCTAssertEqual(pieces("a  ", .gpt2), ["a", "  "])
        XCTAssertEqual(try pieces("{a}{2}", regex: "a{2}|[{}]|a"), ["{", "a", "}", "{", "2", "}"], "'{' not starting a count is literal")
        XCTAssertEqual(try pieces("aaaaa", regex: "a{,2}"), ["aa", "aa", "a"])
        XCTAssertEqual(try pieces("aaaaa", regex: "a{2,}?"), ["aa", "aa", "a"])
        XCTAssertEqual(try pieces("a-b]c\\", regex: #"[\]\\-]"#), ["a", "-", "b", "]", "c", "\\"])
    }

    func testUnsupportedConstructsAreNamed() {
        let refused: [(String, String)] = [
            ("^a", "anchor '^'"), ("a$", "anchor '$'"), (#"\bword"#, "word boundary"), ("(?<=a)b", "lookbehind"),
            ("(?>a)", "atomic group"), ("a++", "possessive"), (#"(a)\1"#, "back-reference"), ("[[:alpha:]]", "POSIX bracket"),
            ("[a&&b]", "intersection"), ("[a[b]]", "nested character class"), (#"\p{Han}"#, "property '\\p{Han}'"),
            ("(?i)a", "options for the rest"), ("(?m:a)", "option 'm'"), ("(a*)*", "can match the empty string"),
            (#"\A"#, "anchor"), (#"\X"#, "escape '\\X'"), (#"\pL"#, "without braces"), (#"\xE9"#, "byte escape"),
        ]
        for (source, words) in refused {
            do {
                _ = try SplitRegex(source)
                XCTFail("\(source) compiled")
            } catch {
                guard case .unsupported(let what) = error.kind else { XCTFail("\(source): \(error)"); continue }
                XCTAssertTrue(what.contains(words), "\(source): '\(what)' does not mention \(words)")
            }
        }
        for source in ["(a", "a)", "[ab", "a{3,2}", "*a", "a|?", #"\u12"#, #"\p{L"#] {
            do {
                _ = try SplitRegex(source)
                XCTFail("\(source) compiled")
            } catch {
                guard case .invalid = error.kind else { XCTFail("\(source): \(error)"); continue }
            }
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

    /// The merger (a rescan for words up to shortWordLength symbols, a heap above) against the plain "rescan
    /// for the lowest rank" loop.
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
        for _ in 0..<1000 {
            let input = (0..<Int(rng.next() % UInt64(3 * shortWordLength))).map { _ in Int32(rng.next() % 6) }
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

extension PreTokenizerTests {
    /// The normalizations applied run by run agree with Foundation's on the whole text.
    func testNormalizationByRunsAgreesWithWholeText() {
        var texts = Self.samples + [
            "e\u{0301}\u{0323}x Å ﬁ ① ｶ ḳ́ 한국어 \u{1100}\u{1161}\u{11A8} a\u{0308}\u{0301}b", "\u{0301}start", "ß ẞ Ⅻ ½ ²",
        ]
        var rng = SplitMix(seed: 5)
        let alphabet = Array("ae \u{0301}\u{0308}\u{0323}Åﬁ①ｶ\u{1100}\u{1161}\u{11A8}한½é中\u{00A0}")
        for _ in 0..<300 {
            texts.append(String((0..<Int(rng.next() % 16)).map { _ in alphabet[Int(rng.next() % UInt64(alphabet.count))] }))
        }
        for text in texts {
            let scalars = [UInt32](scalarsOf: text)
            XCTAssertEqual(NormalizerStep.nfc.apply(scalars).asString, text.precomposedStringWithCanonicalMapping, text.debugDescription)
            XCTAssertEqual(NormalizerStep.nfd.apply(scalars).asString, text.decomposedStringWithCanonicalMapping, text.debugDescription)
            XCTAssertEqual(NormalizerStep.nfkc.apply(scalars).asString, text.precomposedStringWithCompatibilityMapping, text.debugDescription)
            XCTAssertEqual(NormalizerStep.nfkd.apply(scalars).asString, text.decomposedStringWithCompatibilityMapping, text.debugDescription)
        }
    }
}
