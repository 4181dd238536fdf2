import Foundation
import XCTest
import TopiaryTestSupport

/// `prune --calib SHARD.jsonl[.gz]` (the references' C4 sampler) through the CLI, in one
/// process, over workers and across a resume; and `eval --tasks` (multiple-choice scoring).
final class CalibrationTasksCLITests: XCTestCase {
    let stories = CLI.asset("stories260K/stories260K.bin")
    let storiesTokenizer = CLI.asset("stories260K/tok512.bin")
    static let fixtures = TestPaths.repositoryRoot.appendingPathComponent("Tests/Fixtures")
    let shard = fixtures.appendingPathComponent("calibration/c4-sample.jsonl.gz").path
    let tasks = fixtures.appendingPathComponent("tasks/stories-mc.jsonl").path

    func pruneArgs(_ output: String, calib: String? = nil, seqlen: Int = 64, _ extra: [String] = []) -> [String] {
        ["prune", "--model", stories, "--tokenizer", storiesTokenizer, "--method", "sparsegpt", "--sparsity", "0.6",
         "--calib", calib ?? shard, "--calib-samples", "8", "--calib-seqlen", "\(seqlen)", "--output", output] + extra
    }

    func testShardCalibrationIsTheSameInOneProcessOverWorkersAndAfterAResume() throws {
        let dir = try CLI.temporaryDirectory(self)
        let single = try CLI.run(pruneArgs(dir.appendingPathComponent("single").path, ["--json"]))
        XCTAssertEqual(single.status, 0, single.stderr)
        let sha = try XCTUnwrap(single.json?["output_sha256"] as? String)
        let calibration = try XCTUnwrap(single.json?["calibration"] as? [String: Any])
        XCTAssertEqual(calibration["format"] as? String, "jsonl")
        XCTAssertEqual(calibration["documents"] as? Int, 36)
        // 13 documents drawn for 8 windows of 64 tokens with seed 0, as scripts/expected-c4-windows prints.
        XCTAssertEqual(calibration["draws"] as? Int, 13)
        // The uncompressed shard holds the same documents.
        let plain = try CLI.run(pruneArgs(dir.appendingPathComponent("plain").path,
                                          calib: Self.fixtures.appendingPathComponent("calibration/c4-sample.jsonl").path, ["--json"]))
        XCTAssertEqual(plain.json?["output_sha256"] as? String, sha, plain.stderr)
        // Another seed draws other windows.
        let other = try CLI.run(pruneArgs(dir.appendingPathComponent("seed1").path, ["--seed", "1", "--json"]))
        XCTAssertEqual(other.status, 0, other.stderr)
        XCTAssertNotEqual(other.json?["output_sha256"] as? String, sha)
        // Workers get the coordinator's windows (as activations): the same bytes.
        let workers = try CLI.run(pruneArgs(dir.appendingPathComponent("workers").path, ["--workers", "2", "--json"]))
        XCTAssertEqual(workers.status, 0, workers.stderr)
        XCTAssertEqual(workers.json?["output_sha256"] as? String, sha)
        // Killed after block 1, resumed: the windows are drawn again from the recorded shard and seed.
        let out = dir.appendingPathComponent("killed").path
        let p = try CLI.start(pruneArgs(out), environment: ["TOPIARY_DEBUG_BLOCK_DELAY": "0.5"], directory: dir)
        XCTAssertTrue(CLI.waitForEvent(out + ".run") { $0["event"] as? String == "block_done" && $0["block"] as? Int == 1 })
        kill(p.processIdentifier, SIGKILL)
        p.waitUntilExit()
        let resumed = try CLI.run(["prune", "--resume", out + ".run", "--json"])
        XCTAssertEqual(resumed.status, 0, resumed.stderr)
        XCTAssertEqual(resumed.json?["output_sha256"] as? String, sha)
        var done: [Int: Int] = [:]
        for e in CLI.events(out + ".run") where e["event"] as? String == "block_done" { done[e["block"] as! Int, default: 0] += 1 }
        XCTAssertEqual(done, [0: 1, 1: 1, 2: 1, 3: 1, 4: 1], "a block finished before the kill was pruned again")
    }

    func testBadShardsFailWithOneLineNamingTheFileAndLine() throws {
        let dir = try CLI.temporaryDirectory(self)
        let bad = dir.appendingPathComponent("bad.jsonl").path
        try (#"{"text": "Once upon a time."}"# + "\n" + #"{"txt": "no text field"}"# + "\n").write(toFile: bad, atomically: true, encoding: .utf8)
        let r = try CLI.run(pruneArgs(dir.appendingPathComponent("o1").path, calib: bad, ["--json"]))
        XCTAssertEqual(r.status, 1)
        XCTAssertEqual(r.stderrLines.filter { $0.contains("error") }.count, 1, r.stderr)
        XCTAssertTrue(r.stderr.contains("\(bad): line 2: the JSON object has no field 'text'"), r.stderr)
        XCTAssertTrue((r.json?["error"] as? String ?? "").contains("line 2"))
        // Every document shorter than the window: an error, quickly, not an endless search.
        let short = try CLI.run(pruneArgs(dir.appendingPathComponent("o2").path, seqlen: 250), timeout: 60)
        XCTAssertEqual(short.status, 1)
        XCTAssertTrue(short.stderr.contains("no document is longer than the window"), short.stderr)
        XCTAssertTrue(short.stderr.contains("224 tokens (line 7)"), short.stderr)
        // A download cut short.
        let gz = try Data(contentsOf: URL(fileURLWithPath: shard))
        let cut = dir.appendingPathComponent("cut.json.gz").path
        try gz.prefix(1000).write(to: URL(fileURLWithPath: cut))
        let truncated = try CLI.run(pruneArgs(dir.appendingPathComponent("o3").path, calib: cut))
        XCTAssertEqual(truncated.status, 1)
        XCTAssertTrue(truncated.stderr.contains("\(cut): the gzip data is truncated"), truncated.stderr)
        let zst = dir.appendingPathComponent("00.jsonl.zst").path
        try Data([0x28, 0xB5, 0x2F, 0xFD]).write(to: URL(fileURLWithPath: zst))
        let z = try CLI.run(pruneArgs(dir.appendingPathComponent("o4").path, calib: zst))
        XCTAssertEqual(z.status, 1)
        XCTAssertTrue(z.stderr.contains("zstd"), z.stderr)
    }

    func testEvalTasksPrintsATableAndJSON() throws {
        let r = try CLI.run(["eval", "--model", stories, "--tokenizer", storiesTokenizer, "--tasks", tasks, "--json"])
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertTrue(r.stdout.contains("| stories-mc |    10 | acc      |"), r.stdout)
        XCTAssertTrue(r.stdout.contains("| acc_norm |"), r.stdout)
        let json = try XCTUnwrap(r.json)
        XCTAssertEqual(json["questions"] as? Int, 10)
        // The summary agrees with the per-question predictions it reports.
        let questions = try XCTUnwrap(json["per_question"] as? [[String: Any]])
        XCTAssertEqual(questions.count, 10)
        let acc = Double(questions.filter { $0["prediction"] as? Int == $0["gold"] as? Int }.count) / 10
        let accNorm = Double(questions.filter { $0["prediction_norm"] as? Int == $0["gold"] as? Int }.count) / 10
        XCTAssertEqual(json["acc"] as? Double, acc)
        XCTAssertEqual(json["acc_norm"] as? Double, accNorm)
        XCTAssertTrue(r.stdout.contains(String(format: "| acc      | %.4f |", acc)), r.stdout)
        for q in questions {
            let lls = try XCTUnwrap(q["loglikelihoods"] as? [Double])
            XCTAssertEqual(q["prediction"] as? Int, lls.indices.max { lls[$0] < lls[$1] })
        }
    }

    func testEvalTasksRefusesBadFilesAndMixedOptions() throws {
        let dir = try CLI.temporaryDirectory(self)
        let bad = dir.appendingPathComponent("bad.jsonl").path
        try (#"{"context": "Q", "choices": ["a", "b"], "gold": 0}"# + "\n" + #"{"context": "Q", "choices": ["a", "b"], "gold": 5}"# + "\n")
            .write(toFile: bad, atomically: true, encoding: .utf8)
        let r = try CLI.run(["eval", "--model", stories, "--tokenizer", storiesTokenizer, "--tasks", bad, "--json"])
        XCTAssertEqual(r.status, 1)
        XCTAssertTrue(r.stderr.contains("\(bad): line 2: field 'gold' is 5, expected an index into 'choices', 0-1"), r.stderr)
        XCTAssertTrue((r.json?["error"] as? String ?? "").contains("line 2"))
        let mixed = try CLI.run(["eval", "--model", stories, "--tokenizer", storiesTokenizer, "--tasks", tasks, "--seqlen", "64"])
        XCTAssertEqual(mixed.status, 2)
        XCTAssertTrue(mixed.stderr.contains("--seqlen is for perplexity"), mixed.stderr)
        let delimiterAlone = try CLI.run(["eval", "--model", stories, "--tokenizer", storiesTokenizer,
                                          "--text", CLI.asset("public-domain-text/wizard_of_oz.txt"), "--target-delimiter", ""])
        XCTAssertEqual(delimiterAlone.status, 2)
    }
}
