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
