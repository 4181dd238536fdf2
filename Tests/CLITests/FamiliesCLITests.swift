import Foundation
import XCTest

/// Every family fixture pruned end to end by every method (2:4 too), as a user would: the output
/// has exactly the source's tensors (Phi-3's written back fused), its config.json (only the dtype
/// may differ) and dtype, and evaluates to finite logits. Comparing those logits with transformers
/// is scripts/verify-transformers (needs torch; not part of the suite).
final class FamiliesCLITests: XCTestCase {
    static let fixtures = ["tiny-llama3", "tiny-llama3-v5config", "tiny-qwen2", "tiny-qwen3", "tiny-mistral", "tiny-gemma2",
                           "tiny-phi3", "tiny-mixtral"]
    static let runs: [(method: String, options: [String], sparsity: Double)] = [
        ("magnitude", ["--sparsity", "0.6"], 0.6), ("wanda", ["--sparsity", "0.6"], 0.6), ("sparsegpt", ["--sparsity", "0.6"], 0.6),
        ("sparsellm", ["--sparsity", "0.6"], 0.6), ("besa", ["--sparsity", "0.6"], 0.6), ("sparsegpt", ["--pattern", "2:4"], 0.5),
    ]

    func tokenFile(_ dir: URL, count: Int = 4000) throws -> String {
        let path = dir.appendingPathComponent("ids.json").path
        try JSONSerialization.data(withJSONObject: (0..<count).map { ($0 * 7919 + 11) % 512 }).write(to: URL(fileURLWithPath: path))
        return path
    }

    /// Tensor name -> dtype of a Hugging Face directory's weights (one file or shards).
    static func tensors(_ directory: String) throws -> [String: String] {
        let files = try FileManager.default.contentsOfDirectory(atPath: directory).filter { $0.hasSuffix(".safetensors") }
        var out: [String: String] = [:]
        for f in files {
            let d = try Data(contentsOf: URL(fileURLWithPath: directory + "/" + f))
            let n = d.prefix(8).withUnsafeBytes { Int($0.loadUnaligned(as: UInt64.self).littleEndian) }
            let header = try JSONSerialization.jsonObject(with: d.subdata(in: 8..<(8 + n))) as! [String: Any]
            for (name, v) in header where name != "__metadata__" { out[name] = (v as! [String: Any])["dtype"] as? String }
        }
        return out
    }

    static func config(_ directory: String) throws -> NSDictionary {
        var c = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: directory + "/config.json"))) as! [String: Any]
        c["torch_dtype"] = nil
        c["dtype"] = nil
        return c as NSDictionary
    }

    func testEveryFamilyPrunedByEveryMethodKeepsItsCheckpointShape() throws {
        let dir = try CLI.temporaryDirectory(self)
        let ids = try tokenFile(dir)
        let evalIDs = dir.appendingPathComponent("eval.json").path
        try JSONSerialization.data(withJSONObject: [1, 17, 300, 5, 99, 42, 511, 7, 256, 128, 64, 3, 2, 400, 401, 33])
            .write(to: URL(fileURLWithPath: evalIDs))
        for fixture in Self.fixtures {
            let source = CLI.fixture(fixture)
            let sourceTensors = try Self.tensors(source)
            let sourceConfig = try Self.config(source)
            for (k, run) in Self.runs.enumerated() {
                let what = "\(fixture) \(run.method) \(run.options.joined(separator: " "))"
                let out = dir.appendingPathComponent("\(fixture)-\(k)").path
                let r = try CLI.run(["prune", "--model", source, "--method", run.method] + run.options +
                                    ["--calib", ids, "--calib-samples", "4", "--calib-seqlen", "32", "--output", out, "--json"])
                XCTAssertEqual(r.status, 0, "\(what): \(r.stderr)")
                guard r.status == 0 else { continue }
                XCTAssertEqual(r.json?["sparsity"] as? Double ?? 0, run.sparsity, accuracy: 0.01, what)
                XCTAssertEqual(try Self.tensors(out), sourceTensors, "\(what): tensor names and dtypes")
                XCTAssertEqual(try Self.config(out), sourceConfig, "\(what): config.json")
                let eval = try CLI.run(["eval", "--model", out, "--tokens", evalIDs, "--seqlen", "16", "--json"])
                XCTAssertEqual(eval.status, 0, "\(what): \(eval.stderr)")
                let perplexity = eval.json?["perplexity"] as? Double ?? .nan
                XCTAssertTrue(perplexity.isFinite && perplexity > 1, "\(what): perplexity \(perplexity)")
            }
        }
    }

    /// A Qwen3-MoE checkpoint as transformers 5 saves one (per-expert tensors, a dense block among
    /// the expert blocks, top-k weights not renormalised), with random weights: written here
    /// because ../shared has no such fixture. Its logits were compared with transformers by hand
    /// (scripts/verify-transformers); here every method must run and keep the checkpoint's shape.
    static func writeQwen3MoE(to dir: String) throws {
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let config = """
        {"architectures": ["Qwen3MoeForCausalLM"], "attention_bias": false, "decoder_sparse_step": 1, "dtype": "float32",
         "head_dim": 32, "hidden_act": "silu", "hidden_size": 64, "intermediate_size": 160, "max_position_embeddings": 256,
         "mlp_only_layers": [1], "model_type": "qwen3_moe", "moe_intermediate_size": 48, "norm_topk_prob": false,
         "num_attention_heads": 4, "num_experts_per_tok": 2, "num_hidden_layers": 3, "num_key_value_heads": 2,
         "num_local_experts": 4, "rms_norm_eps": 1e-06, "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
         "sliding_window": null, "tie_word_embeddings": false, "use_sliding_window": false, "vocab_size": 512}
        """
        try Data(config.utf8).write(to: URL(fileURLWithPath: dir + "/config.json"))
        var shapes: [(String, [Int])] = [("model.embed_tokens.weight", [512, 64]), ("model.norm.weight", [64]), ("lm_head.weight", [512, 64])]
        for i in 0..<3 {
            let p = "model.layers.\(i)."
            shapes += [(p + "input_layernorm.weight", [64]), (p + "post_attention_layernorm.weight", [64]),
                       (p + "self_attn.q_proj.weight", [128, 64]), (p + "self_attn.k_proj.weight", [64, 64]),
                       (p + "self_attn.v_proj.weight", [64, 64]), (p + "self_attn.o_proj.weight", [64, 128]),
                       (p + "self_attn.q_norm.weight", [32]), (p + "self_attn.k_norm.weight", [32])]
            if i == 1 {
                shapes += [(p + "mlp.gate_proj.weight", [160, 64]), (p + "mlp.up_proj.weight", [160, 64]), (p + "mlp.down_proj.weight", [64, 160])]
            } else {
                shapes.append((p + "mlp.gate.weight", [4, 64]))
                for e in 0..<4 {
                    shapes += [(p + "mlp.experts.\(e).gate_proj.weight", [48, 64]), (p + "mlp.experts.\(e).up_proj.weight", [48, 64]),
                               (p + "mlp.experts.\(e).down_proj.weight", [64, 48])]
                }
            }
        }
        var header: [String: Any] = ["__metadata__": ["format": "pt"]]
        var payload = Data()
        var state: UInt64 = 7
        for (name, shape) in shapes.sorted(by: { $0.0 < $1.0 }) {
            let count = shape.reduce(1, *)
            let start = payload.count
            for _ in 0..<count {
                state = state &* 6364136223846793005 &+ 1442695040888963407
                let u = Float(state >> 40) / Float(1 << 24) - 0.5
                var v = name.hasSuffix("norm.weight") ? 1 + 0.2 * u : 0.4 * u
                withUnsafeBytes(of: &v) { payload.append(contentsOf: $0) }
            }
            header[name] = ["dtype": "F32", "shape": shape, "data_offsets": [start, payload.count]]
        }
        var json = try JSONSerialization.data(withJSONObject: header, options: [.sortedKeys])
        while json.count % 8 != 0 { json.append(UInt8(ascii: " ")) }
        var length = UInt64(json.count).littleEndian
        var file = Data(bytes: &length, count: 8)
        file.append(json)
        file.append(payload)
        try file.write(to: URL(fileURLWithPath: dir + "/model.safetensors"))
    }

    func testQwen3MoEPrunedByEveryMethodKeepsItsCheckpointShape() throws {
        let dir = try CLI.temporaryDirectory(self)
        let ids = try tokenFile(dir)
        let source = dir.appendingPathComponent("tiny-qwen3-moe").path
        try Self.writeQwen3MoE(to: source)
        let sourceTensors = try Self.tensors(source)
        for run in Self.runs {
            let out = dir.appendingPathComponent("out-\(run.method)-\(run.options[1])").path
            let r = try CLI.run(["prune", "--model", source, "--method", run.method] + run.options +
                                ["--calib", ids, "--calib-samples", "4", "--calib-seqlen", "32", "--output", out, "--json"])
            XCTAssertEqual(r.status, 0, "\(run.method): \(r.stderr)")
            guard r.status == 0 else { continue }
            // Wanda and magnitude keep int(48 * 0.6) = 28 of a down_proj row's 48 weights: 0.583.
            XCTAssertEqual(r.json?["sparsity"] as? Double ?? 0, run.sparsity, accuracy: 0.012, run.method)
            XCTAssertEqual(try Self.tensors(out), sourceTensors, run.method)
            XCTAssertEqual(try Self.config(out), try Self.config(source), run.method)
            let report = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: out + "/report.json"))) as! [String: Any]
            let blocks = report["blocks"] as! [[String: Any]]
            XCTAssertEqual(blocks.map { ($0["expert_tokens"] as? [Int])?.reduce(0, +) }, [2 * 4 * 32, nil, 2 * 4 * 32], run.method)
        }
    }

    /// Mixtral: report.json counts the tokens each expert's statistics saw: top-2 of 4 routed
    /// (2 per token in all), or every token with --moe-calibration all.
    func testExpertTokensFollowTheCalibrationMode() throws {
        let dir = try CLI.temporaryDirectory(self)
        let ids = try tokenFile(dir)
        let tokens = 4 * 32
        for (mode, check) in [("routed", { (t: [Int]) in t.reduce(0, +) == 2 * tokens && t.count == 4 }),
                              ("all", { (t: [Int]) in t == [Int](repeating: tokens, count: 4) })] {
            let out = dir.appendingPathComponent(mode).path
            let r = try CLI.run(["prune", "--model", CLI.fixture("tiny-mixtral"), "--method", "sparsellm", "--sparsity", "0.5",
                                 "--moe-calibration", mode, "--calib", ids, "--calib-samples", "4", "--calib-seqlen", "32", "--output", out])
            XCTAssertEqual(r.status, 0, r.stderr)
            let report = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: out + "/report.json"))) as! [String: Any]
            for block in report["blocks"] as! [[String: Any]] {
                let seen = block["expert_tokens"] as? [Int] ?? []
                XCTAssertTrue(check(seen), "\(mode): expert_tokens \(seen)")
            }
        }
        let notMoE = try CLI.run(["prune", "--model", CLI.fixture("tiny-qwen2"), "--method", "wanda", "--sparsity", "0.5",
                                  "--moe-calibration", "all", "--calib", ids, "--output", dir.appendingPathComponent("x").path])
        XCTAssertEqual(notMoE.status, 2)
        XCTAssertTrue(notMoE.stderr.contains("--moe-calibration"), notMoE.stderr)
    }

    /// --chat renders the model's own template: SmolLM2's inserts its default system turn.
    func testChatUsesTheModelsTemplate() throws {
        let model = try CLI.run(["generate", "--model", CLI.asset("smollm2-135m-instruct-q4_1/SmolLM2-135M-Instruct.Q4_1.gguf"),
                                 "--prompt", "Hi", "--chat", "--max-tokens", "1", "--json"])
        XCTAssertEqual(model.status, 0, model.stderr)
        // <|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n
        // as transformers' apply_chat_template(add_generation_prompt=True) gives it.
        XCTAssertEqual(model.json?["prompt_tokens"] as? [Int],
                       [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712, 8182, 2, 198,
                        1, 4093, 198, 26843, 2, 198, 1, 520, 9531, 198])
        let noTemplate = try CLI.run(["generate", "--model", CLI.asset("stories260K/stories260K.bin"), "--tokenizer",
                                      CLI.asset("stories260K/tok512.bin"), "--prompt", "Hi", "--chat"])
        XCTAssertEqual(noTemplate.status, 1)
        XCTAssertTrue(noTemplate.stderr.contains("no chat template"), noTemplate.stderr)
    }
}
