import Foundation
import XCTest

/// Bad input gives one line on stderr naming the file and what was wrong, and a non-zero exit;
/// never a crash or a hang.
final class BadInputTests: XCTestCase {
    func expectError(_ args: [String], exitCode: Int32 = 1, mentions: [String],
                     file: StaticString = #filePath, line: UInt = #line) throws {
        let r = try CLI.run(args, timeout: 120)
        XCTAssertEqual(r.status, exitCode, "stderr: \(r.stderr)", file: file, line: line)
        XCTAssertEqual(r.stderrLines.count, 1, "expected one line, got: \(r.stderr)", file: file, line: line)
        for m in mentions {
            XCTAssertTrue(r.stderr.contains(m), "'\(m)' not in: \(r.stderr)", file: file, line: line)
        }
    }

    /// `eval --logits` replaces the file it names: never an input, nor a directory, checked
    /// before the evaluation; the inputs are untouched.
    func testLogitsFileIsNeverAnInput() throws {
        let dir = try CLI.temporaryDirectory(self)
        let model = dir.appendingPathComponent("m.bin").path, tokenizer = dir.appendingPathComponent("tok.bin").path
        let text = dir.appendingPathComponent("t.txt").path
        try FileManager.default.copyItem(atPath: CLI.asset("stories260K/stories260K.bin"), toPath: model)
        try FileManager.default.copyItem(atPath: CLI.asset("stories260K/tok512.bin"), toPath: tokenizer)
        try Data(String(repeating: "Once upon a time there was a girl. ", count: 8).utf8).write(to: URL(fileURLWithPath: text))
        let before = try [model, tokenizer, text].map { try Data(contentsOf: URL(fileURLWithPath: $0)) }
        let base = ["eval", "--model", model, "--tokenizer", tokenizer, "--text", text, "--seqlen", "16", "--windows", "1"]
        for (target, what) in [(model, "the model"), (tokenizer, "the tokenizer"), (text, "the text")] {
            try expectError(base + ["--logits", target], mentions: [target, "--logits", what])
        }
        try expectError(base + ["--logits", dir.path], mentions: [dir.path, "is a directory"])
        try expectError(base + ["--logits", dir.appendingPathComponent("none/x.json").path], mentions: ["does not exist"])
        try expectError(["eval", "--model", CLI.fixture("tiny-llama"), "--text", text, "--seqlen", "8",
                         "--logits", CLI.fixture("tiny-llama") + "/logits.json"], mentions: ["lies in the model"])
        XCTAssertEqual(try [model, tokenizer, text].map { try Data(contentsOf: URL(fileURLWithPath: $0)) }, before)
        let logits = dir.appendingPathComponent("logits.json").path
        let ok = try CLI.run(base + ["--logits", logits], timeout: 120)
        XCTAssertEqual(ok.status, 0, ok.stderr)
        XCTAssertEqual((try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: logits))) as? [[Double]])?.count, 16)
    }

    /// NaN weights in the checkpoint: generate stops with an error naming the block where the
    /// values turned non-finite, instead of emitting token 0; prune names the tensor, not its solve.
    func testNonFiniteWeightsAreNamedNotBlamedOnTheWork() throws {
        let dir = try CLI.temporaryDirectory(self)
        let path = dir.appendingPathComponent("nan.bin").path
        var data = try Data(contentsOf: URL(fileURLWithPath: CLI.asset("stories260K/stories260K.bin")))
        // llama2.c: a 28-byte header (dim 64, vocabulary 512, 5 layers), the embedding, the
        // attention norms, then wq: its first ten values of layer 0 become NaN.
        let wq = 28 + 4 * (512 * 64 + 5 * 64)
        for i in 0..<10 { data.replaceSubrange((wq + 4 * i)..<(wq + 4 * i + 4), with: withUnsafeBytes(of: Float.nan.bitPattern.littleEndian) { Data($0) }) }
        try data.write(to: URL(fileURLWithPath: path))
        let tokenizer = CLI.asset("stories260K/tok512.bin")
        try expectError(["generate", "--model", path, "--tokenizer", tokenizer, "--prompt", "Once", "--max-tokens", "3"],
                        mentions: [path, "not finite", "block 0"])
        let prune = ["prune", "--model", path, "--tokenizer", tokenizer, "--calib", CLI.asset("public-domain-text/wizard_of_oz.txt"),
                     "--calib-samples", "2", "--calib-seqlen", "16", "--sparsity", "0.5"]
        let wanda = try CLI.run(prune + ["--method", "wanda", "--output", dir.appendingPathComponent("w").path], timeout: 120)
        XCTAssertEqual(wanda.status, 1, wanda.stderr)
        XCTAssertTrue(wanda.stderr.contains("model.layers.0.self_attn.q_proj.weight holds NaN"), wanda.stderr)
        let sparseGPT = try CLI.run(prune + ["--method", "sparsegpt", "--output", dir.appendingPathComponent("s").path], timeout: 120)
        XCTAssertEqual(sparseGPT.status, 1, sparseGPT.stderr)
        XCTAssertTrue(sparseGPT.stderr.contains("q_proj: the weight to prune holds NaN"), sparseGPT.stderr)
    }

    /// N:M needs M to divide every linear's input width (stories260K's down_proj has 172).
    func testPatternWhoseGroupsDoNotFitTheLinearsIsRefused() throws {
        let dir = try CLI.temporaryDirectory(self)
        for pattern in ["6:8", "1000:1024", "1:172"] {
            try expectError(["prune", "--model", CLI.asset("stories260K/stories260K.bin"), "--tokenizer", CLI.asset("stories260K/tok512.bin"),
                             "--calib", CLI.asset("public-domain-text/wizard_of_oz.txt"), "--method", "magnitude", "--pattern", pattern,
                             "--output", dir.appendingPathComponent("out").path],
                            exitCode: 2, mentions: ["--pattern \(pattern)", "multiple of"])
        }
        XCTAssertFalse(FileManager.default.fileExists(atPath: dir.appendingPathComponent("out").path))
    }

    /// A --sparsity so close to 1 that a linear (or, for SparseGPT, a block of its columns) would
    /// keep one weight or none is refused before any work; 0.99 still runs.
    func testSparsityThatWouldEmptyALinearIsRefused() throws {
        let dir = try CLI.temporaryDirectory(self)
        let base = ["prune", "--model", CLI.fixture("tiny-llama"), "--calib", "generate:2:8"]
        for (method, sparsity) in [("magnitude", "0.9999999999"), ("wanda", "0.99999"), ("sparsegpt", "0.9999")] {
            try expectError(base + ["--method", method, "--sparsity", sparsity, "--output", dir.appendingPathComponent("out").path],
                            exitCode: 2, mentions: ["--sparsity \(sparsity)", "at most one of", "q_proj.weight"])
        }
        XCTAssertFalse(FileManager.default.fileExists(atPath: dir.appendingPathComponent("out").path))
        let ok = try CLI.run(base + ["--method", "magnitude", "--sparsity", "0.99", "--output", dir.appendingPathComponent("ok").path], timeout: 120)
        XCTAssertEqual(ok.status, 0, ok.stderr)
    }

    /// Evaluation options without the text to evaluate on are refused, not ignored.
    func testEvaluationOptionsWithoutEvalTextAreRefused() throws {
        let dir = try CLI.temporaryDirectory(self)
        for extra in [["--eval-windows", "3"], ["--eval-seqlen", "16"], ["--skip-dense-eval"]] {
            try expectError(["prune", "--model", CLI.fixture("tiny-llama"), "--calib", "generate:2:8", "--method", "magnitude",
                             "--sparsity", "0.5", "--output", dir.appendingPathComponent("out").path] + extra,
                            exitCode: 2, mentions: [extra[0], "goes with --eval-text"])
        }
    }

    /// --resume of a directory whose run.json is damaged says so (not "no run.json"); one under a
    /// file says there is no such directory rather than that it cannot be created.
    func testResumeNamesADamagedRecordAndAMissingDirectory() throws {
        let dir = try CLI.temporaryDirectory(self)
        let run = dir.appendingPathComponent("run").path
        try FileManager.default.createDirectory(atPath: run, withIntermediateDirectories: true)
        try Data("{garbage".utf8).write(to: URL(fileURLWithPath: run + "/run.json"))
        try expectError(["prune", "--resume", run], mentions: [run + "/run.json", "not valid JSON", "nothing to resume"])
        try Data("{\"format\": \"other\"}".utf8).write(to: URL(fileURLWithPath: run + "/run.json"))
        try expectError(["prune", "--resume", run], mentions: ["field 'format' is 'other'"])
        let file = dir.appendingPathComponent("file").path
        try Data().write(to: URL(fileURLWithPath: file))
        try expectError(["prune", "--resume", file + "/run"], mentions: ["no such run directory", "\(file) is not a directory", "nothing to resume"])
    }

    /// A worker's --work-dir is checked when it starts, not when its first spill needs it.
    func testWorkerWorkDirectoryIsCheckedAtStart() throws {
        let dir = try CLI.temporaryDirectory(self)
        let file = dir.appendingPathComponent("file").path
        try Data().write(to: URL(fileURLWithPath: file))
        try expectError(["worker", "--listen", "127.0.0.1:0", "--work-dir", file], exitCode: 2, mentions: ["--work-dir \(file) is a file"])
        try expectError(["worker", "--listen", "127.0.0.1:0", "--work-dir", file + "/spill"], exitCode: 2, mentions: ["cannot be created", "\(file) is not a directory"])
    }

    /// Every failure is one line with the command's prefix once: a message written with the prefix
    /// already is not given it twice, nor a usage error without one left bare.
    func testErrorLinesCarryTheCommandsPrefixOnce() throws {
        let worker = try CLI.run(["worker", "--listen", "10.0.0.1:0"], timeout: 60)
        XCTAssertEqual(worker.stderr.trimmingCharacters(in: .whitespacesAndNewlines).components(separatedBy: "topiary worker:").count, 2, worker.stderr)
        XCTAssertTrue(worker.stderr.hasPrefix("topiary worker: error: no shared secret"), worker.stderr)
        let eval = try CLI.run(["eval", "--model", CLI.fixture("tiny-llama")], timeout: 60)
        XCTAssertEqual(eval.status, 2, eval.stderr)
        XCTAssertTrue(eval.stderr.hasPrefix("topiary eval: missing --text"), eval.stderr)
    }

    func testTruncatedLlama2CCheckpoint() throws {
        let dir = try CLI.temporaryDirectory(self)
        let path = dir.appendingPathComponent("stories-truncated.bin").path
        let data = try Data(contentsOf: URL(fileURLWithPath: CLI.asset("stories260K/stories260K.bin")))
        try data.prefix(data.count / 2).write(to: URL(fileURLWithPath: path))
        try expectError(["eval", "--model", path, "--tokenizer", CLI.asset("stories260K/tok512.bin"),
                         "--text", CLI.asset("public-domain-text/wizard_of_oz.txt")],
                        mentions: [path, "truncated"])
    }

    func testTruncatedGGUF() throws {
        let dir = try CLI.temporaryDirectory(self)
        let path = dir.appendingPathComponent("tiny.gguf").path
        let bytes = GGUFBuilder.tinyLlama().bytes()
        try Data(bytes.prefix(200)).write(to: URL(fileURLWithPath: path))
        try expectError(["convert", "--model", path, "--output", dir.appendingPathComponent("out").path],
                        mentions: [path, "truncated"])
    }

    func testWrongMagic() throws {
        let dir = try CLI.temporaryDirectory(self)
        let path = dir.appendingPathComponent("model.gguf").path
        var b = GGUFBuilder.tinyLlama()
        b.magic = Array("GGUX".utf8)
        try Data(b.bytes()).write(to: URL(fileURLWithPath: path))
        try expectError(["convert", "--model", path, "--output", dir.appendingPathComponent("out").path],
                        mentions: [path, "magic", "GGUX"])
    }

    func testTensorPastTheEndOfTheFile() throws {
        let dir = try CLI.temporaryDirectory(self)
        let path = dir.appendingPathComponent("tiny.gguf").path
        var b = GGUFBuilder.tinyLlama()
        b.tensors[2].offsetOverride = 1 << 20
        try Data(b.bytes()).write(to: URL(fileURLWithPath: path))
        try expectError(["convert", "--model", path, "--output", dir.appendingPathComponent("out").path],
                        mentions: [path, "blk.0.attn_q.weight", "past the end"])
    }

    func testUnsupportedQuantisationType() throws {
        let dir = try CLI.temporaryDirectory(self)
        let path = dir.appendingPathComponent("tiny.gguf").path
        var b = GGUFBuilder.tinyLlama()
        b.tensors[3].type = 12  // Q4_K
        b.tensors[3].data = [UInt8](repeating: 0, count: 144 * 4)
        try Data(b.bytes()).write(to: URL(fileURLWithPath: path))
        try expectError(["convert", "--model", path, "--output", dir.appendingPathComponent("out").path],
                        mentions: [path, "blk.0.attn_k.weight", "Q4_K"])
    }

    /// A GGUF without its final norm: convert and inspect refuse it, as eval does, instead of
    /// writing (or reporting) a model without model.norm.weight.
    func testGGUFWithoutItsFinalNorm() throws {
        let dir = try CLI.temporaryDirectory(self)
        let path = dir.appendingPathComponent("tiny.gguf").path
        var b = GGUFBuilder.tinyLlama()
        b.tensors.removeAll { $0.name == "output_norm.weight" }
        try Data(b.bytes()).write(to: URL(fileURLWithPath: path))
        let out = dir.appendingPathComponent("out").path
        try expectError(["convert", "--model", path, "--output", out], mentions: [path, "'output_norm.weight' is missing"])
        XCTAssertFalse(FileManager.default.fileExists(atPath: out))
        try expectError(["inspect", "--model", path], mentions: [path, "'output_norm.weight' is missing"])
    }

    /// A tensor count one too low (the last description, output_norm.weight, not read): the data
    /// section seems to start early and the norm's bytes are left over; refused, naming the count.
    func testGGUFTensorCountTooLow() throws {
        let dir = try CLI.temporaryDirectory(self)
        let path = dir.appendingPathComponent("tiny.gguf").path
        let b = GGUFBuilder.tinyLlama()
        var bytes = b.bytes()
        withUnsafeBytes(of: UInt64(b.tensors.count - 1).littleEndian) { bytes.replaceSubrange(8..<16, with: $0) }
        try Data(bytes).write(to: URL(fileURLWithPath: path))
        for command in [["convert", "--output", dir.appendingPathComponent("out").path], ["inspect"]] {
            try expectError(command + ["--model", path], mentions: [path, "'blk.0.ffn_down.weight'", "tensor count \(b.tensors.count - 1) too low"])
        }
    }

    func testConfigMissingARequiredField() throws {
        let dir = try CLI.temporaryDirectory(self)
        let model = dir.appendingPathComponent("tiny-llama")
        try FileManager.default.createDirectory(at: model, withIntermediateDirectories: true)
        let source = URL(fileURLWithPath: CLI.fixture("tiny-llama"))
        try FileManager.default.copyItem(at: source.appendingPathComponent("model.safetensors"), to: model.appendingPathComponent("model.safetensors"))
        var config = try JSONSerialization.jsonObject(with: Data(contentsOf: source.appendingPathComponent("config.json"))) as! [String: Any]
        config.removeValue(forKey: "hidden_size")
        try JSONSerialization.data(withJSONObject: config).write(to: model.appendingPathComponent("config.json"))
        try expectError(["convert", "--model", model.path, "--output", dir.appendingPathComponent("out").path],
                        mentions: [model.appendingPathComponent("config.json").path, "hidden_size", "missing"])
    }

    func testTextThatIsNotUTF8() throws {
        let dir = try CLI.temporaryDirectory(self)
        let text = dir.appendingPathComponent("latin1.txt").path
        try Data([0x48, 0x69, 0x20, 0xE9, 0x74, 0xE9, 0xFF, 0x0A]).write(to: URL(fileURLWithPath: text))
        try expectError(["eval", "--model", CLI.asset("stories260K/stories260K.bin"), "--tokenizer", CLI.asset("stories260K/tok512.bin"),
                         "--text", text], mentions: [text, "UTF-8", "offset 3"])
    }

    /// Token-id files (eval --tokens, prune --calib) hold integers that fit in Int: booleans,
    /// fractions and numbers too large are refused, shown as written with their index; a file
    /// that starts with '[' but is not valid JSON is refused, never read as calibration text.
    func testTokenIDFilesHoldOnlyIntegers() throws {
        let dir = try CLI.temporaryDirectory(self)
        let model = CLI.asset("stories260K/stories260K.bin"), tokenizer = CLI.asset("stories260K/tok512.bin")
        func file(_ name: String, _ text: String) throws -> String {
            let path = dir.appendingPathComponent(name).path
            try Data(text.utf8).write(to: URL(fileURLWithPath: path))
            return path
        }
        let ids = (0..<40).map { String(1 + $0 % 500) }.joined(separator: ", ")
        for (name, text, mentions) in [("bool.json", "[\(ids), true]", ["holds 'true'", "index 40", "not an integer"]),
                                       ("huge.json", "[\(ids), 99999999999999999999999]", ["holds '99999999999999999999999'", "index 40", "does not fit"]),
                                       ("big.json", "[9223372036854775808, \(ids)]", ["holds '9223372036854775808'", "index 0", "does not fit"]),
                                       ("exp.json", "[1e30, \(ids)]", ["holds '1e30'", "index 0"]),
                                       ("cut.json", "[\(ids)", ["looks like a JSON array of token ids but is not valid JSON"])] {
            let path = try file(name, text)
            let eval = ["eval", "--model", model, "--tokens", path, "--seqlen", "8", "--windows", "1"]
            try expectError(eval, mentions: [path] + mentions)
            let r = try CLI.run(eval, timeout: 120)
            XCTAssertFalse(r.stderr.contains("calibration"), r.stderr)
            try expectError(["prune", "--model", model, "--tokenizer", tokenizer, "--calib", path, "--calib-samples", "2", "--calib-seqlen", "8",
                             "--method", "magnitude", "--sparsity", "0.5", "--output", dir.appendingPathComponent("out-\(name)").path],
                            mentions: [path] + mentions)
        }
    }

    /// An output that cannot be created is one line naming the path given and why, not a
    /// Foundation error dump naming the staging directory.
    func testOutputDirectoryThatCannotBeCreated() throws {
        let dir = try CLI.temporaryDirectory(self)
        let model = CLI.asset("stories260K/stories260K.bin"), tokenizer = CLI.asset("stories260K/tok512.bin")
        let file = dir.appendingPathComponent("afile").path
        try Data("x".utf8).write(to: URL(fileURLWithPath: file))
        let convert = ["convert", "--model", model, "--tokenizer", tokenizer, "--output"]
        try expectError(convert + [file + "/out"], mentions: [file + "/out", "cannot create the output directory", file + " is not a directory"])
        try expectError(convert + [file + "/a/b/out"], mentions: [file + "/a/b/out", "cannot create the output directory", file + " is not a directory"])
        for output in ["/proc/topiary-out", "/proc/self/topiary/out"] {
            let r = try CLI.run(convert + [output], timeout: 120)
            XCTAssertEqual(r.status, 1, r.stderr)
            XCTAssertEqual(r.stderrLines.count, 1, r.stderr)
            XCTAssertTrue(r.stderr.contains("\(output): cannot create the output directory"), r.stderr)
            XCTAssertFalse(r.stderr.contains(".partial-") || r.stderr.contains("NSCocoaErrorDomain"), r.stderr)
        }
        let prune = ["prune", "--model", model, "--tokenizer", tokenizer, "--calib", CLI.asset("public-domain-text/wizard_of_oz.txt"),
                     "--calib-samples", "2", "--calib-seqlen", "8", "--method", "magnitude", "--sparsity", "0.5"]
        try expectError(prune + ["--output", file + "/out"], mentions: [file + "/out", "cannot create the output directory", file + " is not a directory"])
        try expectError(prune + ["--output", dir.appendingPathComponent("out").path, "--run-dir", file + "/run"],
                        mentions: [file + "/run", "cannot create the run directory", file + " is not a directory"])
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: dir.path), ["afile"])
        // Relative names, from inside the directory.
        let relative = try CLI.run(convert + ["afile/out"], cwd: dir, timeout: 120)
        XCTAssertEqual(relative.status, 1, relative.stderr)
        XCTAssertTrue(relative.stderr.contains("afile/out: cannot create the output directory: afile is not a directory"), relative.stderr)
        let runDir = try CLI.run(prune + ["--output", "p", "--run-dir", "afile/r"], cwd: dir, timeout: 120)
        XCTAssertEqual(runDir.status, 1, runDir.stderr)
        XCTAssertTrue(runDir.stderr.contains("afile/r: cannot create the run directory: afile is not a directory"), runDir.stderr)
        let ok = try CLI.run(convert + ["o"], cwd: dir, timeout: 120)
        XCTAssertEqual(ok.status, 0, ok.stderr)
        XCTAssertTrue(FileManager.default.fileExists(atPath: dir.appendingPathComponent("o/model.safetensors").path))
    }

    func testWindowLongerThanTheContext() throws {
        let model = CLI.asset("stories260K/stories260K.bin")
        try expectError(["eval", "--model", model, "--tokenizer", CLI.asset("stories260K/tok512.bin"),
                         "--text", CLI.asset("public-domain-text/wizard_of_oz.txt"), "--seqlen", "1024"],
                        mentions: [model, "1024", "512"])
    }

    func testUnknownOptionAndCommand() throws {
        try expectError(["eval", "--modle", "x"], exitCode: 2, mentions: ["--modle", "topiary help eval"])
        try expectError(["frobnicate"], exitCode: 2, mentions: ["frobnicate"])
        try expectError(["eval", "--text", "x"], exitCode: 2, mentions: ["--model"])
    }

    func testMissingModelFile() throws {
        try expectError(["eval", "--model", "/nonexistent/model.gguf", "--text", "/dev/null"],
                        mentions: ["/nonexistent/model.gguf", "no such file"])
    }
}

final class HelpTests: XCTestCase {
    func testHelpListsEveryCommandAndOption() throws {
        let r = try CLI.run(["help"])
        XCTAssertEqual(r.status, 0)
        for c in ["eval", "generate", "convert"] { XCTAssertTrue(r.stdout.contains(c)) }
        let e = try CLI.run(["help", "eval"])
        XCTAssertEqual(e.status, 0)
        for o in ["--model", "--tokenizer", "--text", "--seqlen", "--windows", "--json"] { XCTAssertTrue(e.stdout.contains(o), o) }
        let bad = try CLI.run(["help", "nosuch"])
        XCTAssertEqual(bad.status, 2)
    }
}

final class ConvertCLITests: XCTestCase {
    func testConvertThenEvalGivesTheSamePerplexity() throws {
        let dir = try CLI.temporaryDirectory(self)
        let out = dir.appendingPathComponent("hf").path
        let model = CLI.asset("stories260K/stories260K.bin"), tok = CLI.asset("stories260K/tok512.bin")
        let text = CLI.asset("public-domain-text/wizard_of_oz.txt")
        let c = try CLI.run(["convert", "--model", model, "--tokenizer", tok, "--output", out, "--json"])
        XCTAssertEqual(c.status, 0, c.stderr)
        XCTAssertEqual(c.json?["files"] as? [String], [out + "/model.safetensors"])
        for f in ["config.json", "generation_config.json", "tokenizer.json", "model.safetensors"] {
            XCTAssertTrue(FileManager.default.fileExists(atPath: out + "/" + f), f)
        }
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: dir.path), ["hf"])
        let a = try CLI.run(["eval", "--model", model, "--tokenizer", tok, "--text", text, "--seqlen", "256", "--windows", "4", "--json"])
        let b = try CLI.run(["eval", "--model", out, "--text", text, "--seqlen", "256", "--windows", "4", "--json"])
        let pa = try XCTUnwrap(a.json?["perplexity"] as? Double), pb = try XCTUnwrap(b.json?["perplexity"] as? Double)
        XCTAssertEqual(pa, pb, accuracy: pa * 1e-5)
        // A second convert into the same, now non-empty directory needs --overwrite.
        let again = try CLI.run(["convert", "--model", model, "--tokenizer", tok, "--output", out])
        XCTAssertEqual(again.status, 1)
        XCTAssertTrue(again.stderr.contains("--overwrite"))
    }
}
