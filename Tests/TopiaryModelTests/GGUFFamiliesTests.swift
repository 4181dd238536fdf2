import Foundation
import XCTest
import TopiaryTensor
@testable import TopiaryModel

/// A small GGUF v3 writer: metadata of the types llama.cpp's converter uses for model
/// parameters, F32 tensors, data aligned to 32 bytes (the default `general.alignment`).
struct TestGGUFWriter {
    enum Value {
        case u32(UInt32), f32(Float), string(String), bool(Bool)
    }

    struct Tensor {
        var name: String
        /// Outermost first, as PyTorch prints it (GGUF stores the reverse).
        var shape: [Int]
        var values: [Float]
    }

    var metadata: [(String, Value)] = []
    var tensors: [Tensor] = []

    mutating func set(_ key: String, _ value: Value) {
        metadata.removeAll { $0.0 == key }
        metadata.append((key, value))
    }

    mutating func remove(_ key: String) { metadata.removeAll { $0.0 == key } }

    mutating func add(_ name: String, shape: [Int], _ values: [Float]) {
        precondition(values.count == shape.reduce(1, *), "\(name): \(values.count) values for shape \(shape)")
        tensors.append(Tensor(name: name, shape: shape, values: values))
    }

    func bytes() -> [UInt8] {
        var out: [UInt8] = []
        func put<T: FixedWidthInteger>(_ v: T) { withUnsafeBytes(of: v.littleEndian) { out.append(contentsOf: $0) } }
        func put(_ s: String) {
            put(UInt64(s.utf8.count))
            out.append(contentsOf: Array(s.utf8))
        }
        func pad() { while out.count % 32 != 0 { out.append(0) } }
        out.append(contentsOf: Array("GGUF".utf8))
        put(UInt32(3))
        put(UInt64(tensors.count))
        put(UInt64(metadata.count))
        for (key, value) in metadata {
            put(key)
            switch value {
            case .u32(let v): put(UInt32(4)); put(v)
            case .f32(let v): put(UInt32(6)); put(v.bitPattern)
            case .bool(let v): put(UInt32(7)); out.append(v ? 1 : 0)
            case .string(let v): put(UInt32(8)); put(v)
            }
        }
        var offset: UInt64 = 0
        for t in tensors {
            put(t.name)
            put(UInt32(t.shape.count))
            for d in t.shape.reversed() { put(UInt64(d)) }
            put(UInt32(0))  // F32
            put(offset)
            offset += UInt64((t.values.count * 4 + 31) / 32 * 32)
        }
        pad()
        for t in tensors {
            for v in t.values { put(v.bitPattern) }
            pad()
        }
        return out
    }

    func write(to url: URL) throws { try Data(bytes()).write(to: url) }
}

/// What llama.cpp's convert_hf_to_gguf.py writes for a Hugging Face directory (F32 output),
/// done here without Python: the architecture's metadata keys, llama.cpp's tensor names, Q/K
/// rows permuted for adjacent-pair RoPE (llama, Mixtral), Gemma's norms stored as 1 + w and no
/// lm_head, Phi-3's fused tensors kept fused, Mixtral's experts stacked into 3-D tensors.
enum LlamaCppConversion {
    static func convert(_ directory: String) throws -> TestGGUFWriter {
        let data = try Data(contentsOf: URL(fileURLWithPath: directory + "/config.json"))
        let hp = try JSONSerialization.jsonObject(with: data) as! [String: Any]
        func int(_ k: String) -> Int? { (hp[k] as? NSNumber)?.intValue }
        func double(_ k: String) -> Double? { (hp[k] as? NSNumber)?.doubleValue }
        let source = try ShardedSafeTensors.open(directory: directory)
        let modelType = hp["model_type"] as! String
        let arch = ["llama": "llama", "mistral": "llama", "mixtral": "llama"][modelType] ?? modelType
        var w = TestGGUFWriter()
        func u32(_ k: String, _ v: Int?) { if let v { w.set(arch + "." + k, .u32(UInt32(v))) } }
        func f32(_ k: String, _ v: Double?) { if let v { w.set(arch + "." + k, .f32(Float(v))) } }
        w.set("general.architecture", .string(arch))
        w.set("general.name", .string((directory as NSString).lastPathComponent))

        let hidden = int("hidden_size")!, heads = int("num_attention_heads")!
        let kvHeads = int("num_key_value_heads") ?? heads
        let ropeTheta = double("rope_theta") ?? ((hp["rope_parameters"] as? [String: Any])?["rope_theta"] as? NSNumber)?.doubleValue
        switch arch {
        case "gemma2":
            // Gemma2Model.set_gguf_parameters: its own list (no rope.freq_base).
            u32("context_length", int("max_position_embeddings"))
            u32("embedding_length", hidden)
            u32("block_count", int("num_hidden_layers"))
            u32("feed_forward_length", int("intermediate_size"))
            u32("attention.head_count", heads)
            u32("attention.head_count_kv", kvHeads)
            f32("attention.layer_norm_rms_epsilon", double("rms_norm_eps"))
            u32("attention.key_length", int("head_dim"))
            u32("attention.value_length", int("head_dim"))
            f32("attn_logit_softcapping", double("attn_logit_softcapping"))
            f32("final_logit_softcapping", double("final_logit_softcapping"))
            u32("attention.sliding_window", int("sliding_window"))
        case "phi3":
            // Phi3MiniModel.set_gguf_parameters.
            u32("context_length", int("max_position_embeddings"))
            u32("rope.scaling.original_context_length", int("original_max_position_embeddings"))
            u32("embedding_length", hidden)
            u32("feed_forward_length", int("intermediate_size"))
            u32("block_count", int("num_hidden_layers"))
            u32("attention.head_count", heads)
            u32("attention.head_count_kv", kvHeads)
            f32("attention.layer_norm_rms_epsilon", double("rms_norm_eps"))
            u32("rope.dimension_count", hidden / heads)
            f32("rope.freq_base", ropeTheta)
            u32("attention.sliding_window", int("sliding_window") ?? 0)
        default:
            // TextModel.set_gguf_parameters (qwen2, qwen3; llama adds to it).
            u32("block_count", int("num_hidden_layers"))
            u32("context_length", int("max_position_embeddings"))
            u32("embedding_length", hidden)
            u32("feed_forward_length", int("intermediate_size"))
            u32("attention.head_count", heads)
            u32("attention.head_count_kv", int("num_key_value_heads"))
            f32("rope.freq_base", ropeTheta)
            f32("attention.layer_norm_rms_epsilon", double("rms_norm_eps"))
            u32("expert_count", int("num_local_experts"))
            u32("expert_used_count", int("num_experts_per_tok"))
            u32("attention.key_length", int("head_dim"))
            u32("attention.value_length", int("head_dim"))
            if arch == "llama" {
                u32("vocab_size", int("vocab_size"))
                u32("rope.dimension_count", int("head_dim") ?? hidden / heads)
            }
        }

        // gguf-py's tensor_mapping for these families.
        let blockNames: [(String, String)] = [
            ("input_layernorm", "attn_norm"), ("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"),
            ("self_attn.v_proj", "attn_v"), ("self_attn.o_proj", "attn_output"), ("self_attn.qkv_proj", "attn_qkv"),
            ("self_attn.q_norm", "attn_q_norm"), ("self_attn.k_norm", "attn_k_norm"),
            ("post_attention_layernorm", arch == "gemma2" ? "post_attention_norm" : "ffn_norm"),
            ("pre_feedforward_layernorm", "ffn_norm"), ("post_feedforward_layernorm", "post_ffw_norm"),
            ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"), ("mlp.down_proj", "ffn_down"),
            ("mlp.gate_up_proj", "ffn_up"), ("block_sparse_moe.gate", "ffn_gate_inp"),
        ]
        func ggufName(_ name: String) -> String {
            switch name {
            case "model.embed_tokens.weight": return "token_embd.weight"
            case "model.norm.weight": return "output_norm.weight"
            case "lm_head.weight": return "output.weight"
            default: break
            }
            let parts = name.split(separator: ".").map(String.init)
            precondition(parts.count >= 4 && parts[0] == "model" && parts[1] == "layers", "unexpected tensor \(name)")
            let block = parts[2]
            let rest = parts[3...].joined(separator: ".")
            for (hf, gg) in blockNames {
                for suffix in ["weight", "bias"] where rest == hf + "." + suffix { return "blk.\(block).\(gg).\(suffix)" }
            }
            preconditionFailure("no llama.cpp name for \(name)")
        }

        var stacked: [String: [(Int, [Int], [Float])]] = [:]
        for name in source.tensorNames.sorted() {
            let shape = source.entry(name)!.shape
            var values = try source.load(name).values
            if arch == "gemma2" && name == "lm_head.weight" { continue }
            if arch == "gemma2" && name.hasSuffix("norm.weight") { values = values.map { $0 + 1 } }
            if arch == "llama" {
                if name.hasSuffix("q_proj.weight") || name.hasSuffix("q_proj.bias") { values = permute(values, shape: shape, heads: heads) }
                if name.hasSuffix("k_proj.weight") || name.hasSuffix("k_proj.bias") { values = permute(values, shape: shape, heads: kvHeads) }
            }
            if let range = name.range(of: "block_sparse_moe.experts.") {
                // model.layers.N.block_sparse_moe.experts.E.wK.weight -> blk.N.ffn_{gate,down,up}_exps.weight
                let block = name.split(separator: ".")[2]
                let tail = name[range.upperBound...].split(separator: ".")
                let expert = Int(tail[0])!
                let target = ["w1": "ffn_gate_exps", "w2": "ffn_down_exps", "w3": "ffn_up_exps"][String(tail[1])]!
                stacked["blk.\(block).\(target).weight", default: []].append((expert, shape, values))
                continue
            }
            w.add(ggufName(name), shape: shape, values)
        }
        for (name, experts) in stacked.sorted(by: { $0.key < $1.key }) {
            let ordered = experts.sorted { $0.0 < $1.0 }
            w.add(name, shape: [ordered.count] + ordered[0].1, ordered.flatMap(\.2))
        }
        return w
    }

    /// convert_hf_to_gguf.py's LlamaModel.permute: rows viewed as (heads, 2, half) become (heads, half, 2).
    static func permute(_ values: [Float], shape: [Int], heads: Int) -> [Float] {
        let rows = shape[0]
        let width = shape.count > 1 ? shape[1] : 1
        let half = rows / heads / 2
        var out = values
        for h in 0..<heads {
            for j in 0..<2 {
                for i in 0..<half {
                    let from = h * 2 * half + j * half + i
                    let to = h * 2 * half + i * 2 + j
                    for c in 0..<width { out[to * width + c] = values[from * width + c] }
                }
            }
        }
        return out
    }
}

/// The tiny Hugging Face fixtures, converted to GGUF as llama.cpp's converter does, give the
/// fixture's expected (transformers) logits within 1e-4 when opened from the GGUF file.
final class GGUFFamiliesTests: XCTestCase {
    func write(_ w: TestGGUFWriter, _ name: String = "model.gguf") throws -> String {
        let url = try TestAssets.temporaryDirectory(self).appendingPathComponent(name)
        try w.write(to: url)
        return url.path
    }

    func converted(_ fixture: String) throws -> TestGGUFWriter {
        try LlamaCppConversion.convert(TestAssets.fixture(fixture))
    }

    func logits(_ model: LanguageModel, _ tokens: [Int]) throws -> Matrix {
        let embedding = try model.loadEmbedding()
        var x = embedding.embed(tokens, sequenceLength: tokens.count)
        for i in 0..<model.config.layerCount { x = try model.loadBlock(i).forward(x, sequenceLength: tokens.count) }
        return try model.loadHead(embedding: embedding).logits(x)
    }

    /// Opens the converted fixture and checks its config against the Hugging Face one, its
    /// logits against expected_logits.json, and returns the largest logit difference.
    @discardableResult
    func check(_ fixture: String, _ architecture: Architecture, layout: RopeLayout,
               file: StaticString = #filePath, line: UInt = #line) throws -> Float {
        let dir = TestAssets.fixture(fixture)
        let model = try LanguageModel.open(path: try write(try converted(fixture)))
        XCTAssertEqual(model.format, .gguf, file: file, line: line)
        XCTAssertEqual(model.config.architecture, architecture, file: file, line: line)
        XCTAssertEqual(model.config.ropeLayout, layout, file: file, line: line)

        // Everything the forward pass uses agrees with the Hugging Face directory's config.
        var expectedConfig = try LanguageModel.open(path: dir).config
        expectedConfig.ropeLayout = layout
        expectedConfig.bosTokenID = model.config.bosTokenID
        expectedConfig.eosTokenID = model.config.eosTokenID
        expectedConfig.eosTokenIDs = model.config.eosTokenIDs
        if expectedConfig.slidingWindow == nil { expectedConfig.slidingLayers = nil }
        XCTAssertEqual(model.config, expectedConfig, fixture, file: file, line: line)

        let data = try Data(contentsOf: URL(fileURLWithPath: dir + "/expected_logits.json"))
        let json = try JSONSerialization.jsonObject(with: data) as! [String: Any]
        let tokens = (json["tokens"] as! [NSNumber]).map(\.intValue)
        let expected = (json["logits"] as! [[NSNumber]]).map { $0.map(\.floatValue) }
        let got = try logits(model, tokens)
        XCTAssertEqual(got.rows, expected.count, file: file, line: line)
        XCTAssertEqual(got.cols, expected[0].count, file: file, line: line)
        var worst: Float = 0
        for r in 0..<min(got.rows, expected.count) {
            for c in 0..<min(got.cols, expected[r].count) { worst = max(worst, abs(got[r, c] - expected[r][c])) }
        }
        XCTAssertLessThan(worst, 1e-4, "\(fixture) from GGUF: largest logit difference \(worst)", file: file, line: line)
        print("\(fixture) from GGUF (\(architecture.rawValue)): largest logit difference \(worst)")
        return worst
    }

    func testLlamaPermutedQK() throws { try check("tiny-llama", .llama, layout: .adjacentPairs) }
    func testQwen2Biases() throws { try check("tiny-qwen2", .qwen2, layout: .rotateHalf) }
    func testQwen3HeadNorms() throws { try check("tiny-qwen3", .qwen3, layout: .rotateHalf) }
    func testGemma2() throws { try check("tiny-gemma2", .gemma2, layout: .rotateHalf) }
    func testPhi3Fused() throws { try check("tiny-phi3", .phi3, layout: .rotateHalf) }
    func testMixtralStackedExperts() throws { try check("tiny-mixtral", .mixtral, layout: .adjacentPairs) }

    /// Gemma's norms come back as the Hugging Face weights (the converter's +1 removed), and the
    /// tensors are the directory's, one for one.
    func testGemma2TensorsMatchHuggingFace() throws {
        let hf = try LanguageModel.open(path: TestAssets.fixture("tiny-gemma2"))
        let gguf = try LanguageModel.open(path: try write(try converted("tiny-gemma2")))
        XCTAssertTrue(gguf.config.tieWordEmbeddings)
        for i in 0..<hf.config.layerCount {
            let a = try hf.loadBlock(i), b = try gguf.loadBlock(i)
            XCTAssertEqual(Set(a.tensors.keys), Set(b.tensors.keys))
            for (name, m) in a.tensors { XCTAssertLessThan(m.maxAbsDifference(b.tensors[name]!), 1e-6, name) }
        }
        XCTAssertLessThan(try hf.weights.load("model.norm.weight").maxAbsDifference(try gguf.weights.load("model.norm.weight")), 1e-6)
    }

    /// Phi-3's fused attn_qkv and ffn_up are presented as q/k/v and gate/up, equal to the directory's split.
    func testPhi3SplitsFusedTensors() throws {
        let hf = try LanguageModel.open(path: TestAssets.fixture("tiny-phi3"))
        let gguf = try LanguageModel.open(path: try write(try converted("tiny-phi3")))
        for i in 0..<hf.config.layerCount {
            let a = try hf.loadBlock(i), b = try gguf.loadBlock(i)
            XCTAssertEqual(Set(a.tensors.keys), Set(b.tensors.keys))
            for (name, m) in a.tensors { XCTAssertEqual(m, b.tensors[name]!, name) }
        }
        // Rows of a part are the fused tensor's rows from the part's first (directory and GGUF);
        // an expert's slice is cut after it is read whole.
        for model in [hf, gguf] {
            for name in ["model.layers.1.self_attn.k_proj.weight", "model.layers.0.mlp.up_proj.weight", "model.embed_tokens.weight"] {
                let whole = try model.weights.load(name)
                for range in [0..<1, 2..<5, (whole.rows - 1)..<whole.rows] {
                    XCTAssertEqual(try model.weights.load(name, rows: range), whole.rows(range), "\(name) rows \(range)")
                }
                XCTAssertThrowsError(try model.weights.load(name, rows: (whole.rows - 1)..<(whole.rows + 1)), name)
            }
        }
        let mixtral = try LanguageModel.open(path: try write(try converted("tiny-mixtral"), "mixtral.gguf"))
        let expert = "model.layers.1.block_sparse_moe.experts.2.w3.weight"
        XCTAssertEqual(try mixtral.weights.load(expert, rows: 3..<7), try mixtral.weights.load(expert).rows(3..<7))
    }

    /// Each expert is read from its own bytes of the stacked tensor, and equals the directory's.
    func testMixtralExpertSlices() throws {
        let path = try write(try converted("tiny-mixtral"))
        let model = try LanguageModel.open(path: path)
        let file = try GGUFFile(path: path)
        let stacked = try XCTUnwrap(file.entry("blk.1.ffn_up_exps.weight"))
        XCTAssertEqual(stacked.shape, [4, 160, 64])
        let name = "model.layers.1.block_sparse_moe.experts.2.w3.weight"
        let e = try XCTUnwrap(model.weights.entry(name))
        XCTAssertEqual(e.shape, [160, 64])
        XCTAssertEqual(e.offset, stacked.offset + 2 * 160 * 64 * 4)
        XCTAssertEqual(e.byteCount, 160 * 64 * 4)
        XCTAssertTrue(model.weights.tensorNames.contains(name))
        let hf = try LanguageModel.open(path: TestAssets.fixture("tiny-mixtral"))
        for w in ["w1", "w2", "w3"] {
            for x in 0..<4 {
                let n = "model.layers.1.block_sparse_moe.experts.\(x).\(w).weight"
                XCTAssertEqual(try model.weights.load(n), try hf.weights.load(n), n)
            }
        }
        XCTAssertEqual(try model.weights.load("model.layers.0.block_sparse_moe.gate.weight"),
                       try hf.weights.load("model.layers.0.block_sparse_moe.gate.weight"))
    }

    /// A GGUF of each family exported to a Hugging Face directory gives that directory back:
    /// the same tensors (Q/K rows back in rotate-half order, Gemma's norms without the +1,
    /// Phi-3 fused again, Mixtral's experts one by one) and the same logits.
    func testExportToHuggingFaceGivesTheFixtureBack() throws {
        for fixture in ["tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-gemma2", "tiny-phi3", "tiny-mixtral"] {
            let gguf = try LanguageModel.open(path: try write(try converted(fixture), "\(fixture).gguf"))
            let out = try TestAssets.temporaryDirectory(self).appendingPathComponent(fixture).path
            try HuggingFaceExport.write(model: gguf, to: out)
            let exported = try ShardedSafeTensors.open(directory: out)
            let original = try ShardedSafeTensors.open(directory: TestAssets.fixture(fixture))
            XCTAssertEqual(Set(exported.tensorNames), Set(original.tensorNames), fixture)
            for name in original.tensorNames where exported.entry(name) != nil {
                XCTAssertEqual(exported.entry(name)?.shape, original.entry(name)?.shape, name)
                XCTAssertLessThan(try exported.load(name).maxAbsDifference(try original.load(name)), 1e-6, "\(fixture): \(name)")
            }
            let reopened = try LanguageModel.open(path: out)
            let tokens = [1, 17, 300, 5, 99, 42]
            XCTAssertLessThan(try logits(reopened, tokens).maxAbsDifference(try logits(gguf, tokens)), 1e-4, fixture)
        }
    }

    func testUnknownArchitectureIsRefusedByName() throws {
        var w = try converted("tiny-qwen2")
        w.set("general.architecture", .string("falcon"))
        let path = try write(w)
        assertCheckpointError(try LanguageModel.open(path: path)) {
            guard case .unsupportedModel(path, let detail) = $0 else { return false }
            return detail.contains("'falcon'") && ["llama", "qwen2", "qwen3", "gemma2", "phi3", "Mixtral"].allSatisfy(detail.contains)
        }
    }

    func testMissingArchitectureIsRefused() throws {
        var w = try converted("tiny-qwen2")
        w.remove("general.architecture")
        let path = try write(w)
        assertCheckpointError(try LanguageModel.open(path: path)) { $0 == .missingField(path: path, field: "general.architecture") }
    }

    func testMissingRequiredKeysAreNamed() throws {
        for (fixture, key) in [("tiny-qwen2", "qwen2.attention.layer_norm_rms_epsilon"), ("tiny-qwen3", "qwen3.embedding_length"),
                               ("tiny-gemma2", "gemma2.block_count"), ("tiny-phi3", "phi3.attention.head_count"),
                               ("tiny-phi3", "phi3.context_length"), ("tiny-mixtral", "llama.expert_used_count")] {
            var w = try converted(fixture)
            w.remove(key)
            let path = try write(w, "\(fixture)-without-\(key).gguf")
            assertCheckpointError(try LanguageModel.open(path: path)) { $0 == .missingField(path: path, field: key) }
            do { _ = try LanguageModel.open(path: path) } catch { XCTAssertTrue("\(error)".contains(key), "\(error)") }
        }
    }

    /// What is not implemented is refused, naming the key, not run wrongly.
    func testUnsupportedSettingsAreRefused() throws {
        var w = try converted("tiny-qwen2")
        w.set("qwen2.rope.scaling.type", .string("yarn"))
        var path = try write(w, "yarn.gguf")
        assertCheckpointError(try LanguageModel.open(path: path)) {
            if case .invalidField(path, "qwen2.rope.scaling.type", _) = $0 { return true } else { return false }
        }
        w = try converted("tiny-phi3")
        w.set("phi3.rope.dimension_count", .u32(8))
        path = try write(w, "partial.gguf")
        assertCheckpointError(try LanguageModel.open(path: path)) {
            if case .invalidField(path, "phi3.rope.dimension_count", _) = $0 { return true } else { return false }
        }
    }
}
