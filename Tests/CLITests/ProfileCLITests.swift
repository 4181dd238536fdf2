import Foundation
import XCTest

/// `prune --profile` (issue 16 item 1): where a run's time goes, per phase, against the sgemm rate.
final class ProfileCLITests: XCTestCase {
    let phases = ["load", "dense_forward", "statistics", "solve", "pruned_forward", "error_metrics", "spill", "checkpoint", "waiting"]

    func pruneArgs(output: String, _ extra: [String] = []) -> [String] {
        ["prune", "--model", CLI.asset("stories260K/stories260K.bin"), "--tokenizer", CLI.asset("stories260K/tok512.bin"),
         "--calib", CLI.asset("public-domain-text/wizard_of_oz.txt"), "--calib-samples", "4", "--calib-seqlen", "64",
         "--method", "sparsegpt", "--sparsity", "0.5", "--output", output, "--json"] + extra
    }

    func profile(_ output: String) throws -> [String: Any] {
        let data = try Data(contentsOf: URL(fileURLWithPath: output).appendingPathComponent("report.json"))
        let report = try XCTUnwrap(try JSONSerialization.jsonObject(with: data) as? [String: Any])
        return try XCTUnwrap(report["profile"] as? [String: Any], "report.json has no profile")
    }

    func checkPhases(_ json: Any?, what: String) throws {
        let phasesJSON = try XCTUnwrap(json as? [String: Any], what)
        for phase in phases {
            let cost = try XCTUnwrap(phasesJSON[phase] as? [String: Any], "\(what): no \(phase)")
            let seconds = try XCTUnwrap(cost["seconds"] as? Double, "\(what) \(phase)")
            let flops = try XCTUnwrap(cost["flops"] as? Double, "\(what) \(phase)")
            XCTAssertGreaterThanOrEqual(seconds, 0, "\(what) \(phase)")
            XCTAssertGreaterThanOrEqual(flops, 0, "\(what) \(phase)")
        }
    }

    func testProfileIsRecordedAndPrintedAndLeavesTheBytesAlone() throws {
        let dir = try CLI.temporaryDirectory(self)
        let plainPath = dir.appendingPathComponent("plain").path, profiledPath = dir.appendingPathComponent("profiled").path
        let plain = try CLI.run(pruneArgs(output: plainPath))
        XCTAssertEqual(plain.status, 0, plain.stderr)
        let profiled = try CLI.run(pruneArgs(output: profiledPath, ["--profile"]))
        XCTAssertEqual(profiled.status, 0, profiled.stderr)
        XCTAssertEqual(profiled.json?["output_sha256"] as? String, try XCTUnwrap(plain.json?["output_sha256"] as? String))

        // Without --profile, report.json has no profile.
        let plainReport = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: plainPath).appendingPathComponent("report.json"))) as? [String: Any]
        XCTAssertNil(plainReport?["profile"])
        XCTAssertFalse(plain.stderr.contains("profile over"), plain.stderr)

        let p = try profile(profiledPath)
        XCTAssertGreaterThan(try XCTUnwrap(p["sgemm_flops_per_second"] as? Double), 0)
        try checkPhases(p["phases"], what: "totals")
        let totals = try XCTUnwrap(p["phases"] as? [String: Any])
        // Forward passes and the solve have FLOPs counted from the shapes; the dense and pruned passes count alike.
        let dense = try XCTUnwrap((totals["dense_forward"] as? [String: Any])?["flops"] as? Double)
        XCTAssertGreaterThan(dense, 0)
        XCTAssertEqual((totals["pruned_forward"] as? [String: Any])?["flops"] as? Double, dense)
        XCTAssertGreaterThan(try XCTUnwrap((totals["solve"] as? [String: Any])?["flops"] as? Double), 0)
        let blocks = try XCTUnwrap(p["blocks"] as? [[String: Any]])
        XCTAssertEqual(blocks.map { $0["block"] as? Int ?? -1 }, [0, 1, 2, 3, 4])
        for b in blocks { try checkPhases(b["phases"], what: "block \(b["block"] ?? "?")") }

        XCTAssertTrue(profiled.stderr.contains("profile: sgemm rate"), profiled.stderr)
        XCTAssertTrue(profiled.stderr.contains("profile over 5 pruned blocks"), profiled.stderr)
        for phase in phases + ["outside blocks", "total"] {
            XCTAssertTrue(profiled.stderrLines.contains { $0.hasPrefix(phase + " ") }, "no table row for \(phase)")
        }
    }

    /// Workers send their blocks' profiles with their reports; the bytes stay those of one process.
    func testProfileFromWorkers() throws {
        let dir = try CLI.temporaryDirectory(self)
        let single = try CLI.run(pruneArgs(output: dir.appendingPathComponent("single").path))
        XCTAssertEqual(single.status, 0, single.stderr)
        let path = dir.appendingPathComponent("workers").path
        let workers = try CLI.run(pruneArgs(output: path, ["--workers", "2", "--profile"]))
        XCTAssertEqual(workers.status, 0, workers.stderr)
        XCTAssertEqual(workers.json?["output_sha256"] as? String, try XCTUnwrap(single.json?["output_sha256"] as? String))
        let blocks = try XCTUnwrap(try profile(path)["blocks"] as? [[String: Any]])
        XCTAssertEqual(blocks.count, 5)
        for b in blocks {
            try checkPhases(b["phases"], what: "block \(b["block"] ?? "?")")
            let forward = ((b["phases"] as? [String: Any])?["dense_forward"] as? [String: Any])?["seconds"] as? Double
            XCTAssertGreaterThan(try XCTUnwrap(forward), 0, "block \(b["block"] ?? "?"): the worker's timings did not arrive")
        }
    }
}
