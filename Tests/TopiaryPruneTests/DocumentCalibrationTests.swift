import Foundation
import XCTest
import TopiaryTestSupport
@testable import TopiaryModel
@testable import TopiaryPrune

/// The JSON-lines (C4) calibration loader: windows, gzip, and bad shards.
///
/// The expected windows were printed by scripts/expected-c4-windows, which draws them with
/// CPython's own `random` module and a separate, standard-library-only implementation of the
/// stories260K (llama2.c) tokenizer; rerun it to regenerate them. Nothing here is computed by
/// the code under test.
final class DocumentCalibrationTests: XCTestCase {
    static let fixtures = TestPaths.repositoryRoot.appendingPathComponent("Tests/Fixtures/calibration")
    static let shardPath = fixtures.appendingPathComponent("c4-sample.jsonl").path

    /// stories260K with its tokenizer, which adds BOS by default, as the C4 loader's tokenizer call does.
    static let model = try! LanguageModel.open(path: TestPaths.asset("stories260K/stories260K.bin"),
                                               tokenizerPath: TestPaths.asset("stories260K/tok512.bin"))

    static func tokenize(_ text: String) -> [Int] { model.tokenizer!.encode(text, addBOS: nil) }

    typealias Case = (seed: Int, samples: Int, seqlen: Int, draws: Int, documents: [Int], starts: [Int], windows: [[Int]])

    /// Printed by scripts/expected-c4-windows.
    static let expected: [Case] = [
        (seed: 0, samples: 8, seqlen: 64, draws: 13,
         documents: [16, 31, 19, 13, 8, 8, 16, 19],
         starts: [65, 51, 30, 64, 18, 6, 68, 6],
         windows: [
            [268, 266, 269, 265, 298, 294, 411, 373, 265, 298, 295, 418, 302, 432, 398, 265, 410, 354, 422, 279, 292, 297, 309, 272, 275, 426, 291, 416, 281, 394, 261, 416, 334, 341, 280, 260, 356, 322, 265, 261, 413, 413, 417, 429, 426, 346, 282, 323, 265, 410, 354, 422, 322, 265, 401, 340, 269, 259, 425, 420, 416, 266, 312, 426],
            [298, 414, 267, 268, 266, 426, 359, 413, 394, 265, 280, 294, 273, 421, 433, 261, 421, 289, 428, 265, 352, 347, 431, 269, 265, 410, 327, 421, 262, 275, 322, 265, 259, 276, 411, 426, 291, 284, 414, 289, 286, 404, 330, 278, 289, 411, 421, 422, 432, 329, 429, 412, 425, 372, 265, 349, 295, 419, 410, 354, 427, 413, 312, 280],
            [410, 276, 388, 422, 262, 427, 305, 264, 292, 426, 346, 286, 272, 294, 269, 268, 379, 402, 422, 432, 261, 419, 261, 352, 412, 430, 430, 275, 262, 415, 389, 329, 474, 345, 280, 414, 294, 286, 262, 427, 309, 413, 266, 268, 420, 327, 416, 269, 263, 415, 275, 411, 432, 281, 381, 410, 276, 412, 421, 308, 276, 380, 263, 415],
            [436, 291, 300, 276, 352, 303, 272, 295, 261, 260, 380, 269, 265, 416, 278, 283, 279, 327, 416, 387, 261, 297, 412, 427, 426, 291, 267, 420, 413, 414, 293, 411, 410, 354, 427, 413, 273, 421, 433, 299, 432, 262, 421, 327, 421, 422, 269, 349, 411, 380, 310, 432, 269, 263, 260, 416, 265, 300, 276, 263, 414, 354, 350, 432],
            [299, 270, 333, 415, 353, 261, 410, 435, 271, 411, 426, 346, 410, 449, 425, 423, 427, 266, 269, 410, 449, 425, 423, 427, 266, 432, 398, 281, 280, 389, 297, 309, 410, 276, 412, 402, 265, 423, 426, 410, 447, 413, 278, 412, 356, 281, 273, 421, 355, 261, 424, 283, 269, 336, 432, 313, 434, 415, 414, 372, 298, 420, 412, 427],
            [394, 262, 287, 411, 298, 420, 412, 427, 406, 300, 416, 428, 299, 270, 333, 415, 353, 261, 410, 435, 271, 411, 426, 346, 410, 449, 425, 423, 427, 266, 269, 410, 449, 425, 423, 427, 266, 432, 398, 281, 280, 389, 297, 309, 410, 276, 412, 402, 265, 423, 426, 410, 447, 413, 278, 412, 356, 281, 273, 421, 355, 261, 424, 283],
            [265, 298, 294, 411, 373, 265, 298, 295, 418, 302, 432, 398, 265, 410, 354, 422, 279, 292, 297, 309, 272, 275, 426, 291, 416, 281, 394, 261, 416, 334, 341, 280, 260, 356, 322, 265, 261, 413, 413, 417, 429, 426, 346, 282, 323, 265, 410, 354, 422, 322, 265, 401, 340, 269, 259, 425, 420, 416, 266, 312, 426, 291, 280, 260],
            [261, 410, 360, 421, 435, 316, 411, 302, 352, 412, 430, 430, 275, 432, 269, 322, 265, 329, 428, 271, 416, 299, 281, 286, 410, 276, 388, 422, 262, 427, 305, 264, 292, 426, 346, 286, 272, 294, 269, 268, 379, 402, 422, 432, 261, 419, 261, 352, 412, 430, 430, 275, 262, 415, 389, 329, 474, 345, 280, 414, 294, 286, 262, 427],
         ]),
        (seed: 1234, samples: 6, seqlen: 100, draws: 25,
         documents: [6, 1, 1, 31, 4, 4],
         starts: [98, 3, 44, 56, 42, 38],
         windows: [
            [290, 418, 312, 381, 267, 329, 280, 295, 325, 266, 268, 422, 273, 428, 289, 284, 303, 422, 284, 290, 406, 426, 291, 276, 382, 276, 272, 277, 420, 273, 306, 419, 432, 261, 272, 421, 414, 304, 269, 261, 352, 347, 431, 432, 263, 415, 417, 402, 284, 380, 411, 353, 411, 352, 414, 287, 474, 269, 308, 293, 352, 414, 287, 280, 289, 413, 412, 271, 266, 261, 352, 425, 356, 422, 278, 347, 433, 299, 280, 347, 433, 356, 414, 360, 432, 261, 280, 425, 427, 430, 414, 295, 418, 387, 265, 279, 293, 260, 419, 432],
            [379, 280, 314, 411, 350, 269, 265, 268, 315, 418, 419, 329, 428, 303, 267, 262, 299, 322, 265, 259, 388, 298, 276, 302, 259, 276, 406, 426, 410, 447, 262, 423, 388, 298, 315, 421, 395, 410, 447, 416, 416, 412, 334, 427, 302, 266, 311, 263, 417, 264, 327, 269, 278, 347, 355, 410, 408, 419, 292, 411, 426, 338, 394, 311, 400, 428, 352, 379, 416, 299, 322, 265, 298, 295, 418, 302, 432, 280, 415, 412, 419, 299, 261, 352, 266, 268, 388, 426, 410, 447, 416, 416, 412, 278, 412, 425, 428, 260, 418, 269],
            [412, 334, 427, 302, 266, 311, 263, 417, 264, 327, 269, 278, 347, 355, 410, 408, 419, 292, 411, 426, 338, 394, 311, 400, 428, 352, 379, 416, 299, 322, 265, 298, 295, 418, 302, 432, 280, 415, 412, 419, 299, 261, 352, 266, 268, 388, 426, 410, 447, 416, 416, 412, 278, 412, 425, 428, 260, 418, 269, 352, 303, 279, 327, 416, 265, 349, 412, 315, 419, 267, 337, 335, 270, 288, 426, 342, 337, 266, 261, 306, 284, 304, 416, 299, 318, 361, 290, 311, 284, 309, 386, 280, 388, 266, 265, 423, 322, 387, 278, 379],
            [426, 359, 413, 394, 265, 280, 294, 273, 421, 433, 261, 421, 289, 428, 265, 352, 347, 431, 269, 265, 410, 327, 421, 262, 275, 322, 265, 259, 276, 411, 426, 291, 284, 414, 289, 286, 404, 330, 278, 289, 411, 421, 422, 432, 329, 429, 412, 425, 372, 265, 349, 295, 419, 410, 354, 427, 413, 312, 280, 287, 427, 303, 422, 432, 269, 261, 413, 279, 412, 424, 416, 312, 336, 298, 347, 418, 416, 333, 415, 413, 267, 265, 423, 261, 306, 269, 263, 377, 267, 262, 305, 411, 427, 329, 415, 417, 264, 265, 270, 290],
            [309, 415, 299, 267, 400, 467, 353, 331, 410, 304, 259, 424, 417, 331, 358, 381, 282, 411, 411, 427, 266, 322, 413, 414, 265, 268, 347, 433, 311, 262, 293, 413, 285, 286, 410, 276, 380, 299, 432, 398, 312, 381, 297, 414, 282, 417, 429, 413, 425, 276, 419, 410, 304, 280, 289, 330, 419, 294, 417, 289, 419, 322, 312, 432, 269, 263, 415, 294, 410, 293, 265, 318, 372, 373, 261, 268, 347, 433, 432, 308, 277, 428, 415, 413, 410, 447, 421, 417, 331, 432, 335, 408, 282, 417, 429, 413, 425, 276, 419, 410],
            [300, 435, 299, 297, 309, 415, 299, 267, 400, 467, 353, 331, 410, 304, 259, 424, 417, 331, 358, 381, 282, 411, 411, 427, 266, 322, 413, 414, 265, 268, 347, 433, 311, 262, 293, 413, 285, 286, 410, 276, 380, 299, 432, 398, 312, 381, 297, 414, 282, 417, 429, 413, 425, 276, 419, 410, 304, 280, 289, 330, 419, 294, 417, 289, 419, 322, 312, 432, 269, 263, 415, 294, 410, 293, 265, 318, 372, 373, 261, 268, 347, 433, 432, 308, 277, 428, 415, 413, 410, 447, 421, 417, 331, 432, 335, 408, 282, 417, 429, 413],
         ]),
        (seed: 7, samples: 10, seqlen: 16, draws: 12,
         documents: [9, 3, 6, 3, 13, 5, 26, 15, 35, 3],
         starts: [6, 0, 93, 4, 9, 3, 4, 5, 6, 4],
         windows: [
            [277, 264, 261, 410, 449, 295, 373, 270, 289, 411, 422, 322, 265, 263, 347, 418],
            [1, 359, 413, 286, 261, 268, 325, 428, 415, 413, 280, 414, 341, 328, 322, 410],
            [430, 285, 267, 268, 425, 290, 418, 312, 381, 267, 329, 280, 295, 325, 266, 268],
            [261, 268, 325, 428, 415, 413, 280, 414, 341, 328, 322, 410, 447, 427, 420, 290],
            [299, 272, 379, 373, 261, 267, 420, 413, 414, 293, 411, 387, 329, 299, 384, 262],
            [294, 262, 294, 353, 265, 284, 294, 269, 278, 347, 355, 261, 413, 265, 284, 414],
            [270, 414, 305, 322, 265, 298, 420, 277, 264, 383, 397, 396, 261, 352, 412, 430],
            [261, 259, 420, 323, 415, 318, 416, 417, 330, 419, 388, 422, 261, 340, 416, 327],
            [285, 419, 267, 414, 467, 410, 475, 432, 410, 479, 432, 410, 472, 432, 410, 484],
            [261, 268, 325, 428, 415, 413, 280, 414, 341, 328, 322, 410, 447, 427, 420, 290],
         ]),
    ]
    /// Token counts of the fixture's 36 documents (BOS included), from the same script.
    static let documentLengths = [24, 189, 13, 21, 152, 21, 224, 14, 105, 29, 155, 36, 8, 152, 23, 65, 172, 12, 36, 118, 10, 193, 14, 97, 11, 66, 60, 187, 14, 78, 13, 159, 20, 83, 5, 31]

    func check(_ shard: DocumentShard, file: StaticString = #filePath, line: UInt = #line) throws {
        for c in Self.expected {
            let got = try DocumentWindows.sample(shard: shard, samples: c.samples, sequenceLength: c.seqlen, seed: c.seed, tokenize: Self.tokenize)
            XCTAssertEqual(got.sources.map(\.document), c.documents, "seed \(c.seed): documents", file: file, line: line)
            XCTAssertEqual(got.sources.map(\.start), c.starts, "seed \(c.seed): window starts", file: file, line: line)
            XCTAssertEqual(got.windows, c.windows, "seed \(c.seed): windows", file: file, line: line)
            XCTAssertEqual(got.draws, c.draws, "seed \(c.seed): documents drawn", file: file, line: line)
        }
    }

    func testTheFixtureTokenizesAsTheGenerator() throws {
        let shard = try DocumentShard.read(path: Self.shardPath)
        XCTAssertEqual(shard.count, 36)
        XCTAssertEqual(try (0..<shard.count).map { Self.tokenize(try shard.text($0)).count }, Self.documentLengths)
    }

    func testWindowsMatchCPythonsC4Sampler() throws {
        try check(try DocumentShard.read(path: Self.shardPath))
    }

    func testGzipShardsGiveTheSameWindows() throws {
        try check(try DocumentShard.read(path: Self.shardPath + ".gz"))
        // Two gzip members, as `cat a.gz b.gz` makes: read whole.
        try check(try DocumentShard.read(path: Self.fixtures.appendingPathComponent("c4-sample-2members.jsonl.gz").path))
    }

    func testBlankLinesAreNotDocumentsAndCRLFIsAccepted() throws {
        let text = "\n{\"text\": \"a\"}\r\n   \n{\"text\": \"b\", \"url\": \"x\"}\n\n"
        let shard = try DocumentShard(bytes: Array(text.utf8), path: "mem.jsonl")
        XCTAssertEqual(shard.count, 2)
        XCTAssertEqual(try shard.text(1), "b")
        XCTAssertEqual(shard.line(of: 0), 2)
        XCTAssertEqual(shard.line(of: 1), 4)
    }

    // MARK: bad shards

    func assertRefused(_ body: () throws -> Any, mentions words: [String], file: StaticString = #filePath, line: UInt = #line) {
        do {
            _ = try body()
            XCTFail("expected an error mentioning \(words)", file: file, line: line)
        } catch {
            let message = "\(error)"
            for w in words { XCTAssertTrue(message.contains(w), "'\(w)' not in: \(message)", file: file, line: line) }
        }
    }

    func shard(_ text: String) throws -> DocumentShard { try DocumentShard(bytes: Array(text.utf8), path: "bad.jsonl") }

    func testBadLinesAreNamedWithWhatWasExpected() {
        let good = "{\"text\": \"fine\"}\n"
        assertRefused({ try self.shard(good + "{\"text\": \"cut\n") }, mentions: ["bad.jsonl: line 2:", "not valid JSON", "'text'"])
        assertRefused({ try self.shard(good + good + "{\"body\": \"x\"}\n") }, mentions: ["bad.jsonl: line 3:", "no field 'text'"])
        assertRefused({ try self.shard(good + "{\"text\": 42}\n") }, mentions: ["line 2:", "'text' is not a string"])
        assertRefused({ try self.shard(good + "{\"text\": null}\n") }, mentions: ["line 2:", "'text' is null"])
        assertRefused({ try self.shard("[\"text\"]\n") }, mentions: ["line 1:", "not a JSON object"])
        assertRefused({ try self.shard("text only\n") }, mentions: ["line 1:", "not valid JSON", "'text only'"])
        assertRefused({ try self.shard("\n\n") }, mentions: ["bad.jsonl", "no documents"])
        assertRefused({ try DocumentShard(bytes: [0x7B, 0x22, 0x74, 0x65, 0x78, 0x74, 0x22, 0x3A, 0x22, 0xFF, 0x22, 0x7D], path: "bytes.jsonl") },
                      mentions: ["bytes.jsonl: line 1:"])
    }

    func testDamagedGzipIsRefusedNamingTheFile() throws {
        let dir = try makeTemporaryDirectory()
        let gz = try Data(contentsOf: URL(fileURLWithPath: Self.shardPath + ".gz"))
        // Cut short, as an interrupted download leaves it.
        let cut = dir.appendingPathComponent("cut.jsonl.gz").path
        try gz.prefix(gz.count / 2).write(to: URL(fileURLWithPath: cut))
        assertRefused({ try DocumentShard.read(path: cut) }, mentions: [cut, "truncated"])
        // Only the trailer (CRC-32 and length) missing.
        let noTrailer = dir.appendingPathComponent("notrailer.jsonl.gz").path
        try gz.prefix(gz.count - 4).write(to: URL(fileURLWithPath: noTrailer))
        assertRefused({ try DocumentShard.read(path: noTrailer) }, mentions: [noTrailer, "truncated"])
        // A flipped byte in the compressed data: zlib's checks (codes, CRC-32) catch it.
        var flipped = gz
        flipped[gz.count / 2] ^= 0x55
        let bad = dir.appendingPathComponent("flipped.jsonl.gz").path
        try flipped.write(to: URL(fileURLWithPath: bad))
        assertRefused({ try DocumentShard.read(path: bad) }, mentions: [bad, "gzip"])
        // Garbage after the last member.
        let tail = dir.appendingPathComponent("tail.jsonl.gz").path
        try (gz + Data("junk".utf8)).write(to: URL(fileURLWithPath: tail))
        assertRefused({ try DocumentShard.read(path: tail) }, mentions: [tail, "not another gzip member"])
        // A .gz name on plain data.
        let plain = dir.appendingPathComponent("plain.jsonl.gz").path
        try Data("{\"text\": \"a\"}\n".utf8).write(to: URL(fileURLWithPath: plain))
        assertRefused({ try DocumentShard.read(path: plain) }, mentions: [plain, "not gzip data"])
        assertRefused({ try DocumentShard.read(path: dir.appendingPathComponent("missing.jsonl").path) }, mentions: ["missing.jsonl", "cannot read"])
        // A bound on the decompressed size (a small file that inflates hugely is refused).
        assertRefused({ try Gzip.decompress(gz, path: "x.gz", limit: 1000) }, mentions: ["x.gz", "more than 1000 bytes"])
    }

    func testNoDocumentLongerThanTheWindowIsAnErrorNotAHang() throws {
        let shard = try DocumentShard.read(path: Self.shardPath)
        let longest = Self.documentLengths.max()!
        let start = Date()
        assertRefused({ try DocumentWindows.sample(shard: shard, samples: 4, sequenceLength: longest, seed: 0, tokenize: Self.tokenize) },
                      mentions: [Self.shardPath, "no document is longer than the window", "\(longest) tokens", "line 7"])
        XCTAssertLessThan(Date().timeIntervalSince(start), 10)
        // One window's length below the longest: only document 6 (line 7) qualifies, and every window comes from it.
        let only = try DocumentWindows.sample(shard: shard, samples: 3, sequenceLength: longest - 1, seed: 0, tokenize: Self.tokenize)
        XCTAssertEqual(only.sources.map(\.document), [6, 6, 6])
        XCTAssertEqual(only.sources.map(\.start), [0, 0, 0])
    }

    func testShardNames() {
        XCTAssertTrue(DocumentShard.isShardName("/data/c4-train.00000-of-01024.json.gz"))
        XCTAssertTrue(DocumentShard.isShardName("pile/00.jsonl"))
        XCTAssertTrue(DocumentShard.isShardName("x.JSONL.GZ"))
        XCTAssertFalse(DocumentShard.isShardName("ids.json"))
        XCTAssertFalse(DocumentShard.isShardName("wizard_of_oz.txt"))
        XCTAssertNotNil(DocumentShard.unsupportedCompression("pile/00.jsonl.zst"))
        XCTAssertNil(DocumentShard.unsupportedCompression("c4.json.gz"))
    }
}
