import Foundation
import XCTest

final class PruneCLITests: XCTestCase {
    let stories = CLI.asset("stories260K/stories260K.bin")
    let storiesTokenizer = CLI.asset("stories260K/tok512.bin")
    let oz = CLI.asset("public-domain-text/wizard_of_oz.txt")

    func pruneArgs(output: String, _ extra: [String]) -> [String] {
        ["prune", "--model", stories, "--tokenizer", storiesTokenizer, "--calib", oz,
         "--calib-samples", "8", "--calib-seqlen", "128", "--output", output] + extra
    }

    func testPruneWritesAModelThatInspectAndGenerateRead() throws {
        let dir = try CLI.temporaryDirectory(self)
        let out = dir.appendingPathComponent("pruned").path
        let r = try CLI.run(pruneArgs(output: out, ["--method", "sparsegpt", "--sparsity", "0.5", "--eval-text", oz,
                                                    "--eval-seqlen", "256", "--eval-windows", "4", "--json"]))
        XCTAssertEqual(r.status, 0, r.stderr)
        let json = try XCTUnwrap(r.json)
        XCTAssertEqual(json["method"] as? String, "sparsegpt")
        XCTAssertEqual(json["sparsity"] as! Double, 0.5, accuracy: 0.01)
        let dense = json["perplexity_dense"] as! Double, pruned = json["perplexity"] as! Double
        XCTAssertGreaterThan(pruned, dense)
        XCTAssertLessThan(pruned, dense * 3)
        XCTAssertEqual((json["output_sha256"] as! String).count, 64)
        XCTAssertGreaterThan(json["peak_rss_bytes"] as! Int, 0)
        XCTAssertGreaterThan(json["prune_seconds"] as! Double, 0)
        for f in ["config.json", "model.safetensors", "tokenizer.json", "report.json"] {
            XCTAssertTrue(FileManager.default.fileExists(atPath: out + "/" + f), f)
        }
        // The run directory keeps its record (run.json, events.jsonl, report.json), not its checkpoints.
        XCTAssertFalse(FileManager.default.fileExists(atPath: out + ".run/blocks"))
        XCTAssertTrue(FileManager.default.fileExists(atPath: out + ".run/events.jsonl"))
        let report = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: out + "/report.json"))) as! [String: Any]
        let blocks = report["blocks"] as! [[String: Any]]
        XCTAssertEqual(blocks.count, 5)
        let linear = (blocks[0]["linears"] as! [[String: Any]])[0]
        XCTAssertLessThanOrEqual(linear["error_after"] as! Double, linear["error_before"] as! Double)

        let inspect = try CLI.run(["inspect", "--model", out, "--json"])
        XCTAssertEqual(inspect.status, 0, inspect.stderr)
        XCTAssertEqual(inspect.json?["sparsity"] as! Double, 0.5, accuracy: 0.01)
        let gen = try CLI.run(["generate", "--model", out, "--max-tokens", "8", "--json"])
        XCTAssertEqual(gen.status, 0, gen.stderr)
        XCTAssertEqual((gen.json?["tokens"] as? [Int])?.count, 8)
    }

    /// --skip-dense-eval evaluates the pruned model only: the same pruned perplexity and weights as
    /// a run that evaluates both, perplexity_dense null; without --eval-text it is refused.
    func testSkipDenseEvalEvaluatesThePrunedModelOnly() throws {
        let dir = try CLI.temporaryDirectory(self)
        let eval = ["--method", "wanda", "--sparsity", "0.5", "--eval-text", oz, "--eval-seqlen", "128", "--eval-windows", "2", "--json"]
        let both = try CLI.run(pruneArgs(output: dir.appendingPathComponent("both").path, eval))
        XCTAssertEqual(both.status, 0, both.stderr)
        let one = try CLI.run(pruneArgs(output: dir.appendingPathComponent("one").path, eval + ["--skip-dense-eval"]))
        XCTAssertEqual(one.status, 0, one.stderr)
        let b = try XCTUnwrap(both.json), o = try XCTUnwrap(one.json)
        XCTAssertTrue(b["perplexity_dense"] is Double)
        XCTAssertTrue(o["perplexity_dense"] is NSNull, "\(o)")
        XCTAssertEqual(o["perplexity"] as? Double, b["perplexity"] as? Double)
        XCTAssertEqual(o["output_sha256"] as? String, b["output_sha256"] as? String)
        XCTAssertFalse(one.stderr.contains("evaluating the dense model"))

        let refused = try CLI.run(pruneArgs(output: dir.appendingPathComponent("none").path,
                                            ["--method", "wanda", "--sparsity", "0.5", "--skip-dense-eval"]))
        XCTAssertEqual(refused.status, 2)
        XCTAssertTrue(refused.stderr.contains("--skip-dense-eval goes with --eval-text"), refused.stderr)
    }

    func testNOfMPatternIsMetAndRunsAreDeterministic() throws {
        let dir = try CLI.temporaryDirectory(self)
        var hashes: [String] = []
        for k in 0..<2 {
            let out = dir.appendingPathComponent("p\(k)").path
            let r = try CLI.run(pruneArgs(output: out, ["--method", "wanda", "--pattern", "2:4", "--json"]))
            XCTAssertEqual(r.status, 0, r.stderr)
            hashes.append(r.json?["output_sha256"] as? String ?? "")
        }
        XCTAssertEqual(hashes[0], hashes[1])
        let inspect = try CLI.run(["inspect", "--model", dir.appendingPathComponent("p0").path, "--json"])
        let linears = inspect.json?["linears"] as? [[String: Any]] ?? []
        XCTAssertEqual(linears.count, 35)
        for l in linears { XCTAssertEqual(l["meets_2_4"] as? Bool, true, l["name"] as! String) }
    }

    /// `--weight-update admm` end to end on stories260K: 2:4 met in every linear, its settings in
    /// report.json, the same bytes on 1 and 2 threads; option mistakes refused by name.
    func testADMMWeightUpdateRunsAndIsRefusedWhereItDoesNotApply() throws {
        let dir = try CLI.temporaryDirectory(self)
        var hashes: [String] = []
        for threads in ["1", "2"] {
            let out = dir.appendingPathComponent("admm\(threads)").path
            let r = try CLI.run(pruneArgs(output: out, ["--method", "sparsegpt", "--pattern", "2:4", "--weight-update", "admm",
                                                        "--admm-iterations", "8", "--threads", threads, "--json"]))
            XCTAssertEqual(r.status, 0, r.stderr)
            hashes.append(r.json?["output_sha256"] as? String ?? "missing")
            let report = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: out + "/report.json"))) as! [String: Any]
            let update = (report["sparsegpt"] as? [String: Any])?["weight_update"] as? [String: Any]
            XCTAssertEqual(update?["method"] as? String, "admm")
            XCTAssertEqual(update?["iterations"] as? Int, 8)
        }
        XCTAssertEqual(hashes[0], hashes[1])
        let inspect = try CLI.run(["inspect", "--model", dir.appendingPathComponent("admm1").path, "--json"])
        for l in inspect.json?["linears"] as? [[String: Any]] ?? [] { XCTAssertEqual(l["meets_2_4"] as? Bool, true, l["name"] as! String) }
        let out = dir.appendingPathComponent("bad").path
        try expectFailure(pruneArgs(output: out, ["--method", "sparsegpt", "--sparsity", "0.5", "--weight-update", "lbfgs"]), status: 2,
                          mentions: ["--weight-update", "lbfgs"])
        try expectFailure(pruneArgs(output: out, ["--method", "sparsegpt", "--sparsity", "0.5", "--admm-rho", "0.3"]), status: 2,
                          mentions: ["--admm-rho", "--weight-update admm"])
        try expectFailure(pruneArgs(output: out, ["--method", "wanda", "--sparsity", "0.5", "--weight-update", "admm"]), status: 2,
                          mentions: ["--weight-update", "sparsegpt"])
        try expectFailure(pruneArgs(output: out, ["--method", "sparsegpt", "--sparsity", "0.5", "--weight-update", "admm", "--admm-rho", "-1"]),
                          status: 2, mentions: ["--admm-rho"])
    }

    func expectFailure(_ args: [String], status: Int32, mentions: [String], file: StaticString = #filePath, line: UInt = #line) throws {
        let r = try CLI.run(args, timeout: 120)
        XCTAssertEqual(r.status, status, r.stderr, file: file, line: line)
        XCTAssertEqual(r.stderrLines.count, 1, r.stderr, file: file, line: line)
        for m in mentions { XCTAssertTrue(r.stderr.contains(m), "'\(m)' not in \(r.stderr)", file: file, line: line) }
    }

    func testBadPruneRequestsAreRefusedClearly() throws {
        let dir = try CLI.temporaryDirectory(self)
        let out = dir.appendingPathComponent("out").path
        try expectFailure(pruneArgs(output: out, ["--method", "sparsegpt", "--sparsity", "1.2"]), status: 2, mentions: ["--sparsity", "between 0 and 1"])
        try expectFailure(pruneArgs(output: out, ["--method", "sparsegpt", "--sparsity", "0"]), status: 2, mentions: ["--sparsity"])
        try expectFailure(pruneArgs(output: out, ["--method", "wanda", "--pattern", "4:4"]), status: 2, mentions: ["4:4", "N < M"])
        try expectFailure(pruneArgs(output: out, ["--method", "obs", "--sparsity", "0.5"]), status: 2, mentions: ["--method", "obs"])
        let short = dir.appendingPathComponent("short.txt").path
        try "Once upon a time.".write(toFile: short, atomically: true, encoding: .utf8)
        try expectFailure(["prune", "--model", stories, "--tokenizer", storiesTokenizer, "--calib", short, "--calib-samples", "4",
                           "--calib-seqlen", "128", "--output", out, "--method", "wanda", "--sparsity", "0.5"],
                          status: 1, mentions: [short, "one window of 128"])
        try expectFailure(["prune", "--model", stories, "--calib", oz, "--output", out, "--method", "wanda", "--sparsity", "0.5"],
                          status: 1, mentions: [oz, "tokenizer"])
        // An existing, non-empty output directory is refused unless --overwrite, and --overwrite
        // replaces only a directory Topiary wrote (issue 12: a user's directory is never deleted).
        try FileManager.default.createDirectory(atPath: out, withIntermediateDirectories: true)
        try "keep me".write(toFile: out + "/notes.txt", atomically: true, encoding: .utf8)
        try expectFailure(pruneArgs(output: out, ["--method", "magnitude", "--sparsity", "0.5"]), status: 1, mentions: [out, "--overwrite"])
        XCTAssertTrue(FileManager.default.fileExists(atPath: out + "/notes.txt"))
        try expectFailure(pruneArgs(output: out, ["--method", "magnitude", "--sparsity", "0.5", "--overwrite"]), status: 1,
                          mentions: [out, "not written by Topiary"])
        XCTAssertTrue(FileManager.default.fileExists(atPath: out + "/notes.txt"))
        let mine = dir.appendingPathComponent("mine").path
        let first = try CLI.run(pruneArgs(output: mine, ["--method", "magnitude", "--sparsity", "0.5"]))
        XCTAssertEqual(first.status, 0, first.stderr)
        let ok = try CLI.run(pruneArgs(output: mine, ["--method", "magnitude", "--sparsity", "0.5", "--overwrite"]))
        XCTAssertEqual(ok.status, 0, ok.stderr)
        XCTAssertTrue(FileManager.default.fileExists(atPath: mine + "/model.safetensors"))
    }

    /// A run killed part-way leaves nothing under the output name.
    func testInterruptedRunLeavesNoOutput() throws {
        let dir = try CLI.temporaryDirectory(self)
        let out = dir.appendingPathComponent("killed").path
        let p = Process()
        p.executableURL = URL(fileURLWithPath: CLI.binary)
        p.arguments = ["prune", "--model", CLI.asset("smollm2-135m-instruct-q4_1/SmolLM2-135M-Instruct.Q4_1.gguf"),
                       "--method", "sparsegpt", "--sparsity", "0.5", "--calib", oz, "--calib-samples", "4",
                       "--calib-seqlen", "256", "--output", out]
        p.standardOutput = FileHandle.nullDevice
        p.standardError = FileHandle.nullDevice
        try p.run()
        // Wait until some pruned blocks exist, then kill it hard.
        let deadline = Date().addingTimeInterval(120)
        while p.isRunning && Date() < deadline {
            let blocks = (try? FileManager.default.contentsOfDirectory(atPath: out + ".run/blocks")) ?? []
            if blocks.filter({ $0.hasSuffix(".safetensors") }).count >= 2 { break }
            usleep(50_000)
        }
        XCTAssertTrue(p.isRunning, "the run finished before it could be interrupted")
        kill(p.processIdentifier, SIGKILL)
        p.waitUntilExit()
        XCTAssertFalse(FileManager.default.fileExists(atPath: out), "a killed run left \(out)")
        let staged = (try? FileManager.default.contentsOfDirectory(atPath: dir.path)) ?? []
        XCTAssertFalse(staged.contains { $0.hasPrefix("killed.partial") && FileManager.default.fileExists(atPath: dir.appendingPathComponent($0).path + "/model.safetensors") })
    }
}

final class SparseLLMCLITests: XCTestCase {
    /// OPT (pre-LN, and post-LN with project_in/out) pruned end to end with SparseLLM, calibrated
    /// from a file of token ids (the fixtures have no tokenizer).
    func testOPTFixturesRunEndToEnd() throws {
        let dir = try CLI.temporaryDirectory(self)
        let ids = dir.appendingPathComponent("ids.json").path
        let tokens = (0..<4000).map { ($0 * 7919 + 11) % 512 }
        try JSONSerialization.data(withJSONObject: tokens).write(to: URL(fileURLWithPath: ids))
        for fixture in ["tiny-opt", "tiny-opt-postln"] {
            let out = dir.appendingPathComponent(fixture).path
            let r = try CLI.run(["prune", "--model", CLI.fixture(fixture), "--method", "sparsellm", "--sparsity", "0.7",
                                 "--calib", ids, "--calib-samples", "8", "--calib-seqlen", "64", "--output", out, "--json"])
            XCTAssertEqual(r.status, 0, r.stderr)
            XCTAssertEqual(r.json?["sparsity"] as? Double ?? 0, 0.7, accuracy: 0.01)
            let settings = r.json?["sparsellm"] as? [String: Any]
            XCTAssertEqual(settings?["alpha"] as? Double, 0.1)
            let report = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: out + "/report.json"))) as! [String: Any]
            for block in report["blocks"] as! [[String: Any]] {
                let iterations = block["sparsellm"] as! [[String: Any]]
                XCTAssertEqual(iterations.count, 4)
                let objectives = iterations.map { $0["objective"] as! Double }
                for (a, b) in zip(objectives, objectives.dropFirst()) { XCTAssertLessThanOrEqual(b, a * (1 + 1e-5)) }
            }
            let inspect = try CLI.run(["inspect", "--model", out, "--json"])
            XCTAssertEqual(inspect.json?["sparsity"] as? Double ?? 0, 0.7, accuracy: 0.01)
        }
    }

    func testSparseLLMOptionsAreChecked() throws {
        let dir = try CLI.temporaryDirectory(self)
        let base = ["prune", "--model", CLI.asset("stories260K/stories260K.bin"), "--tokenizer", CLI.asset("stories260K/tok512.bin"),
                    "--calib", CLI.asset("public-domain-text/wizard_of_oz.txt"), "--sparsity", "0.7",
                    "--output", dir.appendingPathComponent("o").path]
        let wrongMethod = try CLI.run(base + ["--method", "sparsegpt", "--alpha", "1"])
        XCTAssertEqual(wrongMethod.status, 2)
        XCTAssertTrue(wrongMethod.stderr.contains("--method sparsellm"))
        let badTargets = try CLI.run(base + ["--method", "sparsellm", "--targets", "global"])
        XCTAssertEqual(badTargets.status, 2)
        XCTAssertTrue(badTargets.stderr.contains("--targets"))
        let badGamma = try CLI.run(base + ["--method", "sparsellm", "--gamma", "-1"])
        XCTAssertEqual(badGamma.status, 2)
        XCTAssertTrue(badGamma.stderr.contains("--gamma"))
    }
}
