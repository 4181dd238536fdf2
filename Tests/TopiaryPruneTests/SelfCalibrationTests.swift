import Foundation
import XCTest
import TopiaryModel
import TopiaryPrune
import TopiaryTensor

/// --calib generate: sampling from the model (KV cache, SplitMix64), the cache in the run
/// directory, and the option's parser.
final class SelfCalibrationTests: XCTestCase {
    func stories() throws -> LanguageModel {
        try LanguageModel.open(path: PipelineTests.shared("assets/stories260K/stories260K.bin"),
                               tokenizerPath: PipelineTests.shared("assets/stories260K/tok512.bin"))
    }

    func settings(_ model: LanguageModel, samples: Int = 3, length: Int = 24, seed: Int = 0) -> SelfCalibration.Settings {
        SelfCalibration.Settings(samples: samples, sequenceLength: length, seed: seed, startToken: model.config.bosTokenID ?? 1, model: "test")
    }

    /// The KV-cache step gives the logits the full forward gives at every position (LLaMA with
    /// RoPE and grouped heads: stories260K; OPT with learned positions: tiny-opt).
    func testDecodingWithTheCacheMatchesTheFullForward() throws {
        for model in [try stories(), try LanguageModel.open(path: PipelineTests.shared("fixtures/tiny-opt"))] {
            let c = model.config
            let tokens = (0..<12).map { ($0 * 37 + 5) % c.vocabularySize }
            let full = try Perplexity.logits(model: model, tokens: tokens)
            let backend = CPUBackend()
            let embedding = try model.loadEmbedding()
            let blocks = try (0..<c.layerCount).map { try model.loadBlock($0).on(backend) }
            let head = try model.loadHead(embedding: embedding)
            // Two sequences at once: the same tokens, and the same tokens shifted, so rows do not mix.
            let other = tokens.map { ($0 + 11) % c.vocabularySize }
            let fullOther = try Perplexity.logits(model: model, tokens: other)
            let cache = KVCache(config: c, sequences: 2, capacity: tokens.count)
            for t in 0..<tokens.count {
                var x = embedding.embed([tokens[t], other[t]], position: t, on: backend)
                for b in blocks { x = b.decode(x, cache: cache) }
                cache.advance()
                let logits = head.logits(x, rows: 0..<2, on: backend)
                for (row, reference) in [(0, full), (1, fullOther)] {
                    var worst: Float = 0
                    for j in 0..<c.vocabularySize { worst = max(worst, abs(logits[row, j] - reference[t, j])) }
                    XCTAssertLessThan(worst, 1e-3, "\(model.path): position \(t), sequence \(row)")
                }
            }
        }
    }

    func testTheSameSeedGivesTheSameTokensAndAnotherSeedOthers() throws {
        let model = try stories()
        let a = try SelfCalibration.generate(model: model, settings: settings(model))
        let b = try SelfCalibration.generate(model: model, settings: settings(model))
        XCTAssertEqual(a, b)
        XCTAssertEqual(a.count, 3)
        for w in a {
            XCTAssertEqual(w.count, 24)
            XCTAssertEqual(w.first, 1, "every sequence starts from BOS")
            XCTAssertTrue(w.allSatisfy { $0 >= 0 && $0 < model.config.vocabularySize })
        }
        XCTAssertNotEqual(a[0], a[1], "the sequences of one run differ")
        let other = try SelfCalibration.generate(model: model, settings: settings(model, seed: 1))
        XCTAssertNotEqual(a, other)
        // More sequences than one batch (16): two KV caches, still reproducible, all of L tokens.
        let many = try SelfCalibration.generate(model: model, settings: settings(model, samples: 18, length: 8))
        XCTAssertEqual(many, try SelfCalibration.generate(model: model, settings: settings(model, samples: 18, length: 8)))
        XCTAssertEqual(many.count, 18)
        XCTAssertTrue(many.allSatisfy { $0.count == 8 && $0.first == 1 })
        // stories260K is peaky (many sequences open "Once upon a time"), but the second batch is not
        // a copy of the first: every sequence has its own generator.
        XCTAssertNotEqual(Array(many[16...]), Array(many[0..<2]))
    }

    func testTheScheduleAndTheGeneratorAreTheDocumentedOnes() {
        XCTAssertEqual(SelfCalibration.schedule.temperature(0, of: 5), 1.0)
        XCTAssertEqual(SelfCalibration.schedule.temperature(4, of: 5), 1.0)
        XCTAssertEqual(SelfCalibration.schedule.temperature(2, of: 5), 1.0)
        // A linear schedule moves from its first to its last temperature over the sampled tokens.
        let linear = TemperatureSchedule(initial: 2.0, final: 0.6)
        XCTAssertEqual(linear.temperature(0, of: 5), 2.0)
        XCTAssertEqual(linear.temperature(4, of: 5), 0.6, accuracy: 1e-12)
        XCTAssertEqual(linear.temperature(2, of: 5), 1.3, accuracy: 1e-12)
        // SplitMix64 seeded with 0: the reference sequence's first values.
        var r = SplitMix64(seed: 0)
        XCTAssertEqual(r.next(), 0xE220_A839_7B1D_CDAF)
        XCTAssertEqual(r.next(), 0x6E78_9E6A_A1B9_65F4)
    }

    func testTheCacheIsReusedAndRefusedWhenItsSettingsDiffer() throws {
        let model = try stories()
        let dir = try makeTemporaryDirectory()
        let s = settings(model)
        let first = try SelfCalibration.load(model: model, settings: s, directory: dir.path, mustMatch: false)
        XCTAssertEqual(first.origin, .generated)
        let path = dir.appendingPathComponent(SelfCalibration.cacheName).path
        let bytes = try Data(contentsOf: URL(fileURLWithPath: path))
        let again = try SelfCalibration.load(model: model, settings: s, directory: dir.path, mustMatch: true)
        XCTAssertEqual(again.origin, .cached)
        XCTAssertEqual(again.windows, first.windows)
        let decoded = try SelfCalibration.decode(bytes, path: path)
        XCTAssertEqual(decoded.settings, s)
        XCTAssertEqual(decoded.windows, first.windows)
        // A resumed run refuses a cache made with other settings, naming what differs.
        XCTAssertThrowsError(try SelfCalibration.load(model: model, settings: settings(model, seed: 7), directory: dir.path, mustMatch: true)) { e in
            XCTAssertTrue("\(e)".contains("seed 7 (the cache has 0)"), "\(e)")
        }
        XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: path)), bytes, "a refused cache stays")
        // A new run samples again and replaces it.
        let replaced = try SelfCalibration.load(model: model, settings: settings(model, seed: 7), directory: dir.path, mustMatch: false)
        XCTAssertEqual(replaced.origin, .generated)
        XCTAssertNotEqual(replaced.windows, first.windows)
        // A damaged cache is an error naming the file.
        try Data("{\"format\": \"topiary-generated-calibration\", \"version\": 1}".utf8).write(to: URL(fileURLWithPath: path))
        XCTAssertThrowsError(try SelfCalibration.load(model: model, settings: s, directory: dir.path, mustMatch: true)) { e in
            XCTAssertTrue("\(e)".contains(path), "\(e)")
        }
    }

    func testBadSpecsAreRefusedNamingTheOption() {
        for bad in ["generate", "generate:", "generate:0", "generate:abc", "generate:5:0", "generate:5:1", "generate:-3",
                    "generate:5:x", "generate:1:2:3", "generate:70000", "generate: 4", "generate:99999999999999999999999"] {
            XCTAssertThrowsError(try SelfCalibration.parse(bad, maxSamples: 65536), bad) { e in
                XCTAssertTrue("\(e)".contains("--calib generate:N[:L]"), "\(bad): \(e)")
                XCTAssertTrue("\(e)".contains(bad), "\(bad): \(e)")
            }
        }
        XCTAssertEqual(try SelfCalibration.parse("generate:4", maxSamples: 65536), .init(samples: 4, sequenceLength: nil))
        XCTAssertEqual(try SelfCalibration.parse("generate:4:64", maxSamples: 65536), .init(samples: 4, sequenceLength: 64))
    }
}
