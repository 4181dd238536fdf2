import Foundation
import XCTest
import TopiaryTestSupport
@testable import TopiaryModel

/// config.json as the Hub spells it, for every family: what is read, and what is refused with
/// one line naming the field and its value.
final class FamilyConfigTests: XCTestCase {
    func config(_ json: String, file: StaticString = #filePath, line: UInt = #line) throws -> Result<ModelConfig, Error> {
        let dir = try makeTemporaryDirectory()
        let path = dir.appendingPathComponent("config.json").path
        try Data(json.utf8).write(to: URL(fileURLWithPath: path))
        return Result { try ModelConfig.fromHuggingFace(path: path) }
    }

    let llama = #""hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 100"#

    func refused(_ json: String, naming words: [String], file: StaticString = #filePath, line: UInt = #line) throws {
        switch try config(json) {
        case .success: XCTFail("accepted: \(json)", file: file, line: line)
        case .failure(let error):
            let message = "\(error)"
            XCTAssertFalse(message.contains("\n"), message, file: file, line: line)
            for w in words { XCTAssertTrue(message.contains(w), "'\(message)' does not name \(w)", file: file, line: line) }
        }
    }

    func testUnknownModelTypeRopeTypeActivationAndFeaturesAreRefused() throws {
        try refused(#"{"model_type": "falcon", \#(llama)}"#, naming: ["model_type", "falcon"])
        try refused(#"{"model_type": "llama", \#(llama), "rope_scaling": {"rope_type": "yarn", "factor": 4}}"#, naming: ["rope_scaling.rope_type", "yarn"])
        try refused(#"{"model_type": "llama", \#(llama), "rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}"#, naming: ["rope_parameters.rope_type", "longrope"])
        try refused(#"{"model_type": "llama", \#(llama), "hidden_act": "gelu_new"}"#, naming: ["hidden_act", "gelu_new"])
        try refused(#"{"model_type": "phi3", \#(llama), "partial_rotary_factor": 0.5}"#, naming: ["partial_rotary_factor", "0.5"])
        try refused(#"{"model_type": "gemma2", \#(llama), "layer_types": ["sliding_attention", "chunked_attention"]}"#, naming: ["layer_types", "chunked_attention"])
        try refused(#"{"model_type": "llama", \#(llama), "mlp_bias": true}"#, naming: ["mlp_bias"])
        try refused(#"{"model_type": "llama", \#(llama), "rms_norm_eps": -1}"#, naming: ["rms_norm_eps", "-1"])
        try refused(#"{"model_type": "llama", \#(llama), "rope_theta": 0}"#, naming: ["rope_theta"])
        try refused(#"{"model_type": "llama", \#(llama), "tie_word_embeddings": "yes"}"#, naming: ["tie_word_embeddings", "yes"])
        try refused(#"{"model_type": "mixtral", \#(llama), "num_local_experts": 4, "num_experts_per_tok": 5}"#, naming: ["num_experts_per_tok", "5"])
    }

    func testLlama3ScalingEosListsAndBothSpellings() throws {
        let v4 = try config(#"{"model_type": "llama", \#(llama), "eos_token_id": [128001, 128008, 128009], "rope_theta": 500000.0, "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192, "rope_type": "llama3"}}"#).get()
        let v5 = try config(#"{"model_type": "llama", \#(llama), "eos_token_id": [128001, 128008, 128009], "rope_parameters": {"rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192, "rope_type": "llama3"}}"#).get()
        XCTAssertEqual(v4, v5)
        XCTAssertEqual(v4.eosTokenIDs, [128001, 128008, 128009])
        XCTAssertEqual(v4.ropeTheta, 500000)
        XCTAssertEqual(v4.ropeScaling, .llama3(factor: 8, lowFrequencyFactor: 1, highFrequencyFactor: 4, originalMaxPositions: 8192))
        // Llama-3.1's scaling: short wavelengths kept, long ones divided by the factor.
        let table = v4.ropeTable(positions: 2)
        XCTAssertEqual(table.sin[table.halfDim + 0], sinf(1), accuracy: 1e-6)
        let longest = 1 / powf(500000, Float(2 * (table.halfDim - 1)) / 16) / 8
        XCTAssertEqual(table.sin[table.halfDim + table.halfDim - 1], sinf(longest), accuracy: 1e-9)
    }

    func testQwenWindowsOnlyWithUseSlidingWindowAndGemmaAlternates() throws {
        let off = try config(#"{"model_type": "qwen2", \#(llama), "sliding_window": 4096, "use_sliding_window": false, "max_window_layers": 1}"#).get()
        XCTAssertNil(off.window(block: 1))
        XCTAssertTrue(off.qkvBias)
        XCTAssertFalse(off.outputBias)
        let on = try config(#"{"model_type": "qwen2", \#(llama), "sliding_window": 16, "use_sliding_window": true, "max_window_layers": 1}"#).get()
        XCTAssertEqual([on.window(block: 0), on.window(block: 1)], [nil, 16])
        let gemma = try config(#"{"model_type": "gemma2", \#(llama), "sliding_window": 8, "query_pre_attn_scalar": 16}"#).get()
        XCTAssertEqual([gemma.window(block: 0), gemma.window(block: 1)], [8, nil])
        XCTAssertEqual(gemma.activation, .geluTanh)
        XCTAssertTrue(gemma.tieWordEmbeddings)
        let mistral = try config(#"{"model_type": "mistral", \#(llama), "sliding_window": null}"#).get()
        XCTAssertNil(mistral.window(block: 0))
    }

    /// What every family's file says about its blocks, checked against the fixtures' tensors.
    func testFamilyTensorListsMatchTheFixtures() throws {
        for fixture in ["tiny-llama", "tiny-llama3", "tiny-qwen2", "tiny-qwen3", "tiny-mistral", "tiny-gemma2", "tiny-phi3", "tiny-mixtral", "tiny-opt"] {
            let model = try LanguageModel.open(path: TestAssets.fixture(fixture))
            let c = model.config
            for i in 0..<c.layerCount {
                let expected = Set(model.weights.tensorNames.filter { $0.hasPrefix(c.family.blockPrefix(i)) })
                let written = Set(c.family.checkpointTensors(c, block: i).map(\.name))
                XCTAssertEqual(written, Set(ShardedNames.checkpointNames(model, block: i)), fixture)
                XCTAssertTrue(expected.isSuperset(of: c.family.blockTensors(c, block: i).map(\.name)), fixture)
                // Every linear is in exactly one input group, and every feed-forward's linears are linears.
                let groups = c.family.inputGroups(c, block: i).flatMap { $0 }
                XCTAssertEqual(groups.sorted(), c.family.linears(c, block: i).sorted(), fixture)
                for ffn in c.family.feedForwards(c, block: i) { XCTAssertTrue(Set(groups).isSuperset(of: ffn.linears), fixture) }
            }
        }
    }
}

/// The tensor names a model's checkpoint holds for block `i` (before any fused tensor is split).
enum ShardedNames {
    static func checkpointNames(_ model: LanguageModel, block i: Int) -> [String] {
        let base = (model.weights as? FusedTensorSource)?.base ?? model.weights
        return base.tensorNames.filter { $0.hasPrefix(model.config.family.blockPrefix(i)) }
    }
}
