import Foundation
import XCTest
import TopiaryTensor
@testable import TopiaryModel

/// Named end-to-end checks on the real assets (research B2 and B3).
final class Stories260KEndToEndTests: XCTestCase {
    func open() throws -> LanguageModel {
        try LanguageModel.open(path: TestAssets.stories260K, tokenizerPath: TestAssets.stories260KTokenizer)
    }

    func testConfigFromHeader() throws {
        let c = try open().config
        XCTAssertEqual([c.hiddenSize, c.intermediateSize, c.layerCount, c.headCount, c.kvHeadCount, c.vocabularySize, c.maxPositions],
                       [64, 172, 5, 8, 4, 512, 512])
        XCTAssertEqual(c.ropeLayout, .adjacentPairs)
        XCTAssertTrue(c.tieWordEmbeddings)
    }

    func testEncodeAndGreedyGenerationMatchLlama2C() throws {
        let model = try open()
        let tokenizer = try XCTUnwrap(model.tokenizer)
        XCTAssertEqual(tokenizer.encode("Once upon a time", addBOS: true), [1, 403, 407, 261, 378])
        let ids = try Generation.greedy(model: model, prompt: [1], maxTokens: 20)
        XCTAssertEqual(ids, [403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 338, 401, 396, 267, 337])
        XCTAssertTrue(tokenizer.decode([1] + ids).hasPrefix("Once upon a time, there was a little girl named Lily."))
    }

    /// Converting to a Hugging Face directory (rotate-half Q/K) and reading it back changes nothing.
    func testConvertRoundTripKeepsLogitsAndPerplexity() throws {
        let model = try open()
        let dir = try TestAssets.temporaryDirectory(self).appendingPathComponent("hf").path
        try HuggingFaceExport.write(model: model, to: dir)
        let back = try LanguageModel.open(path: dir)
        XCTAssertEqual(back.config.ropeLayout, .rotateHalf)
        XCTAssertNotNil(back.tokenizer)
        let text = try String(contentsOfFile: TestAssets.wizardOfOz, encoding: .utf8)
        let slice = String(text.prefix(20000))
        let tokens = model.tokenizer!.encode(slice, addBOS: nil)
        XCTAssertEqual(back.tokenizer!.encode(slice, addBOS: nil), tokens)
        let a = try Perplexity.evaluate(model: model, tokens: tokens, sequenceLength: 256, windows: 4)
        let b = try Perplexity.evaluate(model: back, tokens: tokens, sequenceLength: 256, windows: 4)
        XCTAssertEqual(a.perplexity, b.perplexity, accuracy: a.perplexity * 1e-5)
    }
}

extension Stories260KEndToEndTests {
    /// Windows whose hidden states do not fit the budget go in later groups, each streaming the
    /// blocks again: the same window losses, bit for bit, and the blocks read once per group.
    func testEvaluationInGroupsOfWindowsGivesTheSameLosses() throws {
        let model = try open()
        let text = try String(contentsOfFile: TestAssets.wizardOfOz, encoding: .utf8)
        let tokens = model.tokenizer!.encode(String(text.prefix(20000)), addBOS: nil)
        let whole = try Perplexity.evaluate(model: model, tokens: tokens, sequenceLength: 128, windows: 7)
        XCTAssertEqual(whole.windows, 7)
        let window = Perplexity.stateBytes(model.config, sequenceLength: 128)
        XCTAssertEqual(window, 128 * 64 * 4)
        for (budget, groups) in [(1, 7), (3 * window, 3), (3 * window + window / 2, 3), (7 * window, 1), (Int.max, 1)] {
            var seen: [(Int, Int)] = []
            let grouped = try Perplexity.evaluate(model: model, tokens: tokens, sequenceLength: 128, windows: 7, stateBudget: budget) {
                seen.append(($0, $1))
            }
            XCTAssertEqual(grouped.windowLosses, whole.windowLosses, "budget \(budget)")
            XCTAssertEqual(grouped.perplexity, whole.perplexity, "budget \(budget)")
            XCTAssertEqual(seen.count, groups * model.config.layerCount, "budget \(budget)")
            XCTAssertEqual(seen.last.map { [$0.0, $0.1] }, [groups * model.config.layerCount, groups * model.config.layerCount])
        }
    }
}

final class SmolLM2EndToEndTests: XCTestCase {
    static let chatPrompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"

    func testChatPromptAndGreedyAnswer() throws {
        let model = try LanguageModel.open(path: TestAssets.smolLM2)
        let c = model.config
        XCTAssertEqual([c.hiddenSize, c.intermediateSize, c.layerCount, c.headCount, c.kvHeadCount, c.headDim, c.vocabularySize],
                       [576, 1536, 30, 9, 3, 64, 49152])
        XCTAssertEqual(c.ropeTheta, 100000)
        let tokenizer = try XCTUnwrap(model.tokenizer)
        let prompt = tokenizer.encode(Self.chatPrompt, addBOS: nil)
        XCTAssertEqual(prompt, [1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198])
        let ids = try Generation.greedy(model: model, prompt: prompt, maxTokens: 16)
        // "The capital of France is Paris." and the end-of-turn token <|im_end|> (id 2), which decodes to nothing.
        XCTAssertEqual(ids.last, 2)
        XCTAssertEqual(tokenizer.decode(ids), "The capital of France is Paris.")
    }

    /// Research B3: the first two windows of 2048 give perplexity 18.62 (independent NumPy run).
    func testWikitextPerplexityOfTwoWindows() throws {
        let model = try LanguageModel.open(path: TestAssets.smolLM2)
        let text = try String(contentsOfFile: TestAssets.wikitext, encoding: .utf8)
        let tokens = model.tokenizer!.encode(text, addBOS: nil)
        XCTAssertEqual(tokens.count, 304_829)
        let result = try Perplexity.evaluate(model: model, tokens: tokens, sequenceLength: 2048, windows: 2)
        XCTAssertEqual(result.windowLosses[0], 2.6999, accuracy: 2e-3)
        XCTAssertEqual(result.windowLosses[1], 3.1486, accuracy: 2e-3)
        XCTAssertEqual(result.perplexity, 18.62, accuracy: 18.62 * 0.005)
    }
}

final class SmolLM2ConvertEndToEndTests: XCTestCase {
    /// GGUF (adjacent-pair RoPE, Q4_1/Q8_0) to a Hugging Face directory (rotate-half, fp32) and back.
    func testConvertedDirectoryGivesTheSamePerplexity() throws {
        let model = try LanguageModel.open(path: TestAssets.smolLM2)
        let dir = try TestAssets.temporaryDirectory(self).appendingPathComponent("smollm2-hf").path
        try HuggingFaceExport.write(model: model, to: dir)
        let back = try LanguageModel.open(path: dir)
        XCTAssertEqual(back.config.ropeLayout, .rotateHalf)
        let text = String(try String(contentsOfFile: TestAssets.wikitext, encoding: .utf8).prefix(30_000))
        let tokens = model.tokenizer!.encode(text, addBOS: nil)
        XCTAssertEqual(back.tokenizer!.encode(text, addBOS: nil), tokens)
        let a = try Perplexity.evaluate(model: model, tokens: tokens, sequenceLength: 512, windows: 2)
        let b = try Perplexity.evaluate(model: back, tokens: tokens, sequenceLength: 512, windows: 2)
        XCTAssertEqual(a.perplexity, b.perplexity, accuracy: a.perplexity * 1e-4)
        // The embedding (49152 x 576, quantized) was written in pieces of rows, each decoded from
        // its rows' bytes alone: the same values as the tensor decoded whole.
        let embedding = "model.embed_tokens.weight"
        let whole = try model.weights.load(embedding)
        XCTAssertGreaterThan(whole.count, HuggingFaceExport.pieceElements)
        XCTAssertEqual(try back.weights.load(embedding), whole)
        for range in [0..<1, 1000..<4641, 49151..<49152] {
            XCTAssertEqual(try model.weights.load(embedding, rows: range), whole.rows(range))
        }
        XCTAssertThrowsError(try model.weights.load(embedding, rows: 49151..<49153))
    }
}
