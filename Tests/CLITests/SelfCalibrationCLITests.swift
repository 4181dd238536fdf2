import Foundation
import XCTest
import TopiaryTestSupport

/// `prune --calib generate:N[:L]` (self-calibration) through the CLI: the same tokens and bytes
/// on any thread count and over workers, the cache in the run directory across a resume, and
/// the option's errors.
final class SelfCalibrationCLITests: XCTestCase {
    let stories = CLI.asset("stories260K/stories260K.bin")
    let storiesTokenizer = CLI.asset("stories260K/tok512.bin")

    func pruneArgs(_ output: String, calib: String = "generate:4:32", _ extra: [String] = []) -> [String] {
        ["prune", "--model", stories, "--tokenizer", storiesTokenizer, "--method", "sparsegpt", "--sparsity", "0.5",
         "--calib", calib, "--output", output] + extra
    }

    func cache(_ output: String) throws -> Data {
        try Data(contentsOf: URL(fileURLWithPath: output + ".run/calibration-generated.json"))
    }

    func testGeneratedCalibrationIsTheSameOnAnyThreadCountAndOverWorkers() throws {
        let dir = try CLI.temporaryDirectory(self)
        let one = dir.appendingPathComponent("t1").path
        let single = try CLI.run(pruneArgs(one, ["--threads", "1", "--json"]))
        XCTAssertEqual(single.status, 0, single.stderr)
        let sha = try XCTUnwrap(single.json?["output_sha256"] as? String)
        let calibration = try XCTUnwrap(single.json?["calibration"] as? [String: Any])
        XCTAssertEqual(calibration["source"] as? String, "generate")
        XCTAssertEqual(calibration["samples"] as? Int, 4)
        XCTAssertEqual(calibration["seqlen"] as? Int, 32)
        XCTAssertEqual(calibration["seed"] as? Int, 0)
        XCTAssertEqual(calibration["origin"] as? String, "generated")
        let schedule = try XCTUnwrap(calibration["schedule"] as? [String: Any])
        XCTAssertEqual((schedule["initial_temperature"] as? NSNumber)?.doubleValue, 1.0)
        XCTAssertEqual((schedule["final_temperature"] as? NSNumber)?.doubleValue, 1.0)
        // report.json records the same.
        let report = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: one + "/report.json"))) as? [String: Any])
        XCTAssertEqual((report["calibration"] as? [String: Any])?["source"] as? String, "generate")
        let tokens = try cache(one)
        let json = try XCTUnwrap(JSONSerialization.jsonObject(with: tokens) as? [String: Any])
        let windows = try XCTUnwrap(json["tokens"] as? [[Int]])
        XCTAssertEqual(windows.count, 4)
        XCTAssertTrue(windows.allSatisfy { $0.count == 32 && $0.first == 1 })

        let three = dir.appendingPathComponent("t3").path
        let threaded = try CLI.run(pruneArgs(three, ["--threads", "3", "--json"]))
        XCTAssertEqual(threaded.status, 0, threaded.stderr)
        XCTAssertEqual(try cache(three), tokens, "the sampled tokens depend on the thread count")
        XCTAssertEqual(threaded.json?["output_sha256"] as? String, sha)

        // Workers receive the coordinator's activations: the same bytes.
        let workers = try CLI.run(pruneArgs(dir.appendingPathComponent("w").path, ["--workers", "2", "--json"]))
        XCTAssertEqual(workers.status, 0, workers.stderr)
        XCTAssertEqual(workers.json?["output_sha256"] as? String, sha)

        // The finished run's directory is reused: the cache with the same settings too.
        let again = try CLI.run(pruneArgs(one, ["--overwrite", "--json"]))
        XCTAssertEqual(again.status, 0, again.stderr)
        XCTAssertEqual((again.json?["calibration"] as? [String: Any])?["origin"] as? String, "cached")
        XCTAssertEqual(again.json?["output_sha256"] as? String, sha)

        // Another seed samples other tokens.
        let other = try CLI.run(pruneArgs(dir.appendingPathComponent("s1").path, ["--seed", "1", "--json"]))
        XCTAssertEqual(other.status, 0, other.stderr)
        XCTAssertNotEqual(try cache(dir.appendingPathComponent("s1").path), tokens)
        XCTAssertNotEqual(other.json?["output_sha256"] as? String, sha)
    }

    func testAResumedRunReusesTheCacheAndRefusesOneWithOtherSettings() throws {
        let dir = try CLI.temporaryDirectory(self)
        let reference = try CLI.run(pruneArgs(dir.appendingPathComponent("ref").path, ["--json"]))
        XCTAssertEqual(reference.status, 0, reference.stderr)
        let sha = try XCTUnwrap(reference.json?["output_sha256"] as? String)

        let out = dir.appendingPathComponent("killed").path
        let p = try CLI.start(pruneArgs(out), environment: ["TOPIARY_DEBUG_BLOCK_DELAY": "0.5"], directory: dir)
        XCTAssertTrue(CLI.waitForEvent(out + ".run") { $0["event"] as? String == "block_done" && $0["block"] as? Int == 1 })
        kill(p.processIdentifier, SIGKILL)
        p.waitUntilExit()
        let cachePath = out + ".run/calibration-generated.json"
        let original = try Data(contentsOf: URL(fileURLWithPath: cachePath))

        // The cache rewritten with another seed: refused, naming the difference.
        let edited = String(decoding: original, as: UTF8.self).replacingOccurrences(of: "\"seed\":0", with: "\"seed\":5")
        XCTAssertNotEqual(edited, String(decoding: original, as: UTF8.self))
        try Data(edited.utf8).write(to: URL(fileURLWithPath: cachePath))
        let refused = try CLI.run(["prune", "--resume", out + ".run"])
        XCTAssertEqual(refused.status, 1, refused.stderr)
        XCTAssertTrue(refused.stderr.contains("seed 0 (the cache has 5)"), refused.stderr)
        XCTAssertTrue(refused.stderr.contains("calibration-generated.json"), refused.stderr)

        // The original cache back: resumed with it, the same bytes as the undisturbed run.
        try original.write(to: URL(fileURLWithPath: cachePath))
        let resumed = try CLI.run(["prune", "--resume", out + ".run", "--json"])
        XCTAssertEqual(resumed.status, 0, resumed.stderr)
        XCTAssertEqual((resumed.json?["calibration"] as? [String: Any])?["origin"] as? String, "cached")
        XCTAssertEqual(resumed.json?["output_sha256"] as? String, sha)
    }

    func testBadGenerateOptionsFailNamingTheOption() throws {
        let dir = try CLI.temporaryDirectory(self)
        let cases: [([String], String)] = [
            (pruneArgs(dir.appendingPathComponent("a").path, calib: "generate:0"), "N must be from 1 to 65536, got 0"),
            (pruneArgs(dir.appendingPathComponent("b").path, calib: "generate:abc"), "N 'abc' in 'generate:abc' is not a whole number"),
            (pruneArgs(dir.appendingPathComponent("c").path, calib: "generate:5:0"), "L must be at least 2"),
            (pruneArgs(dir.appendingPathComponent("d").path, calib: "generate:4:100000"), "longer than the model's context of 512 positions"),
            (pruneArgs(dir.appendingPathComponent("e").path, calib: "generate:4:32", ["--calib-samples", "8"]), "--calib-samples 8 conflicts with --calib generate:4:32"),
            (pruneArgs(dir.appendingPathComponent("f").path, calib: "generate:4:32", ["--calib-seqlen", "16"]), "--calib-seqlen 16 conflicts with --calib generate:4:32"),
            (pruneArgs(dir.appendingPathComponent("g").path, calib: "generate:4", ["--calib-seqlen", "1"]), "at least 2 tokens"),
        ]
        for (args, message) in cases {
            let r = try CLI.run(args + ["--json"])
            XCTAssertEqual(r.status, 2, "\(args): \(r.stderr)")
            XCTAssertTrue(r.stderr.contains(message), "\(args): \(r.stderr)")
            XCTAssertTrue(r.stderr.contains("--calib"), r.stderr)
        }
        // Nothing was written: no output, no run directory.
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: dir.path), [])
    }
}
