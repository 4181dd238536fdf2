import Foundation
import XCTest

/// `--precision f32|f64`: the Float64 backend through `topiary eval` and `topiary prune`.
final class PrecisionCLITests: XCTestCase {
    let stories = CLI.asset("stories260K/stories260K.bin")
    let storiesTokenizer = CLI.asset("stories260K/tok512.bin")
    let oz = CLI.asset("public-domain-text/wizard_of_oz.txt")

    func evalArgs(_ extra: [String]) -> [String] {
        ["eval", "--model", stories, "--tokenizer", storiesTokenizer, "--text", oz, "--seqlen", "256", "--windows", "4", "--json"] + extra
    }

    func testEvalInFloat64IsWithinRoundingOfFloat32() throws {
        let f32 = try CLI.run(evalArgs([]))
        let f64 = try CLI.run(evalArgs(["--precision", "f64"]))
        XCTAssertEqual(f32.status, 0, f32.stderr)
        XCTAssertEqual(f64.status, 0, f64.stderr)
        let (a, b) = (try XCTUnwrap(f32.json), try XCTUnwrap(f64.json))
        XCTAssertEqual(a["precision"] as? String, "f32")
        XCTAssertEqual(b["precision"] as? String, "f64")
        let lossesF32 = a["window_losses"] as! [Double], lossesF64 = b["window_losses"] as! [Double]
        XCTAssertEqual(lossesF32.count, 4)
        for (x, y) in zip(lossesF32, lossesF64) {
            XCTAssertEqual(x, y, accuracy: 1e-3)
            XCTAssertNotEqual(x, y)   // a different computation, not the f32 one again
        }
        XCTAssertTrue(f64.stdout.contains("; f64)"), f64.stdout)
        // The explicit default is the default's bits.
        let explicit = try CLI.run(evalArgs(["--precision", "f32"]))
        XCTAssertEqual(explicit.json?["window_losses"] as? [Double], lossesF32)
    }

    func testTaskScoringInFloat64IsWithinRoundingOfFloat32() throws {
        let tasks = CLI.repositoryRoot.appendingPathComponent("Tests/Fixtures/tasks/stories-mc.jsonl").path
        let runs = try ["f32", "f64"].map { try CLI.run(["eval", "--model", stories, "--tokenizer", storiesTokenizer, "--tasks", tasks,
                                                         "--precision", $0, "--json"]) }
        for r in runs { XCTAssertEqual(r.status, 0, r.stderr) }
        let questions = runs.map { ($0.json?["per_question"] as? [[String: Any]]) ?? [] }
        XCTAssertFalse(questions[0].isEmpty)
        XCTAssertEqual(questions[0].count, questions[1].count)
        var differs = false
        for (a, b) in zip(questions[0], questions[1]) {
            let (la, lb) = (a["loglikelihoods"] as! [Double], b["loglikelihoods"] as! [Double])
            for (x, y) in zip(la, lb) {
                XCTAssertEqual(x, y, accuracy: 1e-3)
                differs = differs || x != y
            }
        }
        XCTAssertTrue(differs)
    }

    func testBadPrecisionValuesNameTheOption() throws {
        for bad in ["f16", "F64", "double", ""] {
            let r = try CLI.run(evalArgs(["--precision", bad]))
            XCTAssertEqual(r.status, 2, "\(bad): \(r.stderr)")
            XCTAssertTrue(r.stderr.contains("--precision expects f32 or f64, got '\(bad)'"), r.stderr)
        }
        let cuda = try CLI.run(evalArgs(["--precision", "f64", "--device", "cuda"]))
        XCTAssertNotEqual(cuda.status, 0)
        XCTAssertTrue(cuda.stderr.contains("--precision f64 runs on the CPU only"), cuda.stderr)
    }

    func pruneArgs(output: String, _ extra: [String]) -> [String] {
        ["prune", "--model", stories, "--tokenizer", storiesTokenizer, "--calib", oz, "--calib-samples", "8", "--calib-seqlen", "128",
         "--method", "sparsegpt", "--sparsity", "0.5", "--output", output, "--json"] + extra
    }

    func testPruneInFloat64RunsEndToEndAndIsRecorded() throws {
        let dir = try CLI.temporaryDirectory(self)
        let out64 = dir.appendingPathComponent("f64").path, out32 = dir.appendingPathComponent("f32").path
        let eval = ["--eval-text", oz, "--eval-seqlen", "256", "--eval-windows", "2"]
        let r64 = try CLI.run(pruneArgs(output: out64, ["--precision", "f64"] + eval))
        let r32 = try CLI.run(pruneArgs(output: out32, eval))
        XCTAssertEqual(r64.status, 0, r64.stderr)
        XCTAssertEqual(r32.status, 0, r32.stderr)
        let (a, b) = (try XCTUnwrap(r32.json), try XCTUnwrap(r64.json))
        XCTAssertEqual(a["precision"] as? String, "f32")
        XCTAssertEqual(b["precision"] as? String, "f64")
        XCTAssertEqual(b["sparsity"] as! Double, 0.5, accuracy: 0.01)
        XCTAssertEqual(b["perplexity"] as! Double, a["perplexity"] as! Double, accuracy: 1e-2 * (a["perplexity"] as! Double))
        let report = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: out64 + "/report.json"))) as! [String: Any]
        XCTAssertEqual(report["precision"] as? String, "f64")
        let manifest = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: out64 + ".run/run.json"))) as! [String: Any]
        XCTAssertEqual((manifest["options"] as? [String: Any])?["precision"] as? String, "f64")
        // A resume may not change the precision, either way.
        for (run, other) in [(out64 + ".run", "f32"), (out32 + ".run", "f64")] {
            let r = try CLI.run(["prune", "--resume", run, "--precision", other])
            XCTAssertEqual(r.status, 2, r.stderr)
            XCTAssertTrue(r.stderr.contains("cannot change on resume: --precision \(other)"), r.stderr)
        }
        // Workers and replicas exchange in f32: refused, naming the option.
        let workers = try CLI.run(pruneArgs(output: dir.appendingPathComponent("w").path, ["--precision", "f64", "--workers", "2"]))
        XCTAssertEqual(workers.status, 2, workers.stderr)
        XCTAssertTrue(workers.stderr.contains("--precision f64 runs as one process without replicas"), workers.stderr)
        XCTAssertTrue(workers.stderr.contains("drop --workers"), workers.stderr)
        let replicas = try CLI.run(pruneArgs(output: dir.appendingPathComponent("r").path, ["--precision", "f64", "--replicas", "2"]))
        XCTAssertEqual(replicas.status, 2, replicas.stderr)
        XCTAssertTrue(replicas.stderr.contains("drop --replicas 2"), replicas.stderr)
    }
}
