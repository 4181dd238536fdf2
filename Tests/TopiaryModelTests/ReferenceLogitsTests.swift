import Foundation
import XCTest
import TopiaryTensor
@testable import TopiaryModel

/// The tiny Hugging Face fixtures give the logits that transformers computes for a fixed token
/// sequence; our readers and forward passes must agree within 1e-4.
final class ReferenceLogitsTests: XCTestCase {
    func logits(model: LanguageModel, tokens: [Int]) throws -> Matrix {
        let embedding = try model.loadEmbedding()
        var x = embedding.embed(tokens, sequenceLength: tokens.count)
        for i in 0..<model.config.layerCount {
            x = try model.loadBlock(i).forward(x, sequenceLength: tokens.count)
        }
        return try model.loadHead(embedding: embedding).logits(x)
    }

    func check(_ fixture: String, file: StaticString = #filePath, line: UInt = #line) throws {
        let dir = TestAssets.fixture(fixture)
        let data = try Data(contentsOf: URL(fileURLWithPath: dir + "/expected_logits.json"))
        let json = try JSONSerialization.jsonObject(with: data) as! [String: Any]
        let tokens = (json["tokens"] as! [NSNumber]).map(\.intValue)
        let expected = (json["logits"] as! [[NSNumber]]).map { $0.map(\.floatValue) }
        let model = try LanguageModel.open(path: dir)
        let got = try logits(model: model, tokens: tokens)
        XCTAssertEqual(got.rows, expected.count, file: file, line: line)
        XCTAssertEqual(got.cols, expected[0].count, file: file, line: line)
        var worst: Float = 0
        for r in 0..<got.rows { for c in 0..<got.cols { worst = max(worst, abs(got[r, c] - expected[r][c])) } }
        XCTAssertLessThan(worst, 1e-4, "\(fixture): largest logit difference \(worst)", file: file, line: line)
    }

    func testTinyLlamaFP32() throws { try check("tiny-llama") }
    func testTinyLlamaBF16() throws { try check("tiny-llama-bf16") }
    func testTinyOPTPreLN() throws { try check("tiny-opt") }
    func testTinyOPTPostLNWithProjections() throws { try check("tiny-opt-postln") }
    func testTinyLlama3ScaledRopeShardedBF16() throws { try check("tiny-llama3") }
    func testTinyLlama3TransformersV5Config() throws { try check("tiny-llama3-v5config") }
    func testTinyQwen2Biases() throws { try check("tiny-qwen2") }
    func testTinyQwen3HeadNorms() throws { try check("tiny-qwen3") }
    func testTinyMistralSlidingWindow() throws { try check("tiny-mistral") }
    func testTinyGemma2() throws { try check("tiny-gemma2") }
    func testTinyPhi3Fused() throws { try check("tiny-phi3") }
    func testTinyMixtral() throws { try check("tiny-mixtral") }

    /// Both RoPE layouts give the same logits once Q/K rows are permuted (what convert does).
    func testRopeLayoutPermutationPreservesLogits() throws {
        let model = try LanguageModel.open(path: TestAssets.fixture("tiny-llama"))
        let tokens = [1, 5, 9, 200, 3, 7]
        let expected = try logits(model: model, tokens: tokens)
        var config = model.config
        config.ropeLayout = .adjacentPairs
        let embedding = try model.loadEmbedding()
        var x = embedding.embed(tokens, sequenceLength: tokens.count)
        for i in 0..<config.layerCount {
            let b = try model.loadBlock(i)
            var t = b.tensors
            for (name, m) in b.tensors {
                if name.hasSuffix("q_proj.weight") { t[name] = RopePermutation.rotateHalfToAdjacent(m, heads: config.headCount, headDim: config.headDim) }
                if name.hasSuffix("k_proj.weight") { t[name] = RopePermutation.rotateHalfToAdjacent(m, heads: config.kvHeadCount, headDim: config.headDim) }
            }
            x = DecoderBlock(config: config, index: i, tensors: t).forward(x, sequenceLength: tokens.count)
        }
        let got = try model.loadHead(embedding: embedding).logits(x)
        XCTAssertLessThan(got.maxAbsDifference(expected), 1e-4)
        // The permutation and its inverse cancel.
        let w = try model.loadBlock(0).weight("model.layers.0.self_attn.q_proj")
        let back = RopePermutation.rotateHalfToAdjacent(RopePermutation.adjacentToRotateHalf(w, heads: 8, headDim: 8), heads: 8, headDim: 8)
        XCTAssertEqual(back, w)
    }

    /// Observers see every linear's input, in forward order, with the right widths.
    func testObserverSeesEveryLinearInput() throws {
        for fixture in ["tiny-llama", "tiny-opt"] {
            let model = try LanguageModel.open(path: TestAssets.fixture(fixture))
            let block = try model.loadBlock(1)
            var seen: [(String, Int, Int)] = []
            let x = Matrix(rows: 8, cols: model.config.hiddenSize, repeating: 0.1)
            let backend = CPUBackend()
            _ = block.on(backend).forward(backend.upload(x), sequenceLength: 4) { name, input in seen.append((name, input.rows, input.cols)) }
            XCTAssertEqual(seen.map(\.0), block.linearNames, fixture)
            for (name, rows, cols) in seen {
                XCTAssertEqual(rows, 8)
                XCTAssertEqual(cols, block.weight(name).cols, name)
            }
        }
    }
}
