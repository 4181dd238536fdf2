import Foundation
import XCTest
import TopiaryTestSupport

/// Multi-process runs over loopback: the weights equal the single-process run's, byte for byte.
final class DistributedCLITests: XCTestCase {
    func args(_ out: String) -> [String] {
        ["prune", "--model", CLI.asset("stories260K/stories260K.bin"), "--tokenizer", CLI.asset("stories260K/tok512.bin"),
         "--method", "sparsegpt", "--sparsity", "0.6", "--calib", CLI.asset("public-domain-text/wizard_of_oz.txt"),
         "--calib-samples", "8", "--calib-seqlen", "128", "--output", out, "--json"]
    }

    func testLocalWorkersGiveTheSingleProcessWeights() throws {
        let dir = try CLI.temporaryDirectory(self)
        let single = try CLI.run(args(dir.appendingPathComponent("single").path))
        XCTAssertEqual(single.status, 0, single.stderr)
        let three = try CLI.run(args(dir.appendingPathComponent("three").path) + ["--workers", "3", "--coordination", "sequential"])
        XCTAssertEqual(three.status, 0, three.stderr)
        XCTAssertEqual(three.json?["output_sha256"] as? String, single.json?["output_sha256"] as? String)
        let plan = three.json?["plan"] as? [[String: Any]] ?? []
        XCTAssertEqual(plan.count, 3)
        XCTAssertEqual(plan.map { $0["first"] as? Int ?? -1 }, [0, 2, 4])
        XCTAssertTrue(three.stderr.contains("plan: blocks 0-1 on worker@127.0.0.1:"))
        // The same with the weights sent by the coordinator (the assignment names no model path).
        let sent = try CLI.run(args(dir.appendingPathComponent("sent").path) + ["--workers", "2", "--weights", "send"])
        XCTAssertEqual(sent.status, 0, sent.stderr)
        XCTAssertEqual(sent.json?["output_sha256"] as? String, single.json?["output_sha256"] as? String)
        let bad = try CLI.run(args(dir.appendingPathComponent("bad").path) + ["--weights", "mail"])
        XCTAssertEqual(bad.status, 2)
        XCTAssertTrue(bad.stderr.contains("--weights must be path or send"), bad.stderr)
    }

    /// Workers started by hand on distinct loopback addresses, authenticated with a secret file.
    func testWorkersOnDistinctAddressesWithASecretFile() throws {
        let dir = try CLI.temporaryDirectory(self)
        let secretFile = dir.appendingPathComponent("secret").path
        try "0123456789abcdef0123456789abcdef".write(toFile: secretFile, atomically: true, encoding: .utf8)
        XCTAssertEqual(chmod(secretFile, 0o600), 0)   // a secret file others can read is refused
        var workers: [Process] = []
        var endpoints: [String] = []
        defer { for w in workers where w.isRunning { w.terminate(); w.waitUntilExit() } }
        for host in ["127.0.0.2", "127.0.0.3"] {
            let (p, endpoint) = try CLI.startWorker(["--listen", "\(host):0", "--secret-file", secretFile])
            workers.append(p)
            XCTAssertTrue(endpoint.hasPrefix("\(host):"), endpoint)
            endpoints.append(endpoint)
        }
        let single = try CLI.run(args(dir.appendingPathComponent("single").path))
        let remote = try CLI.run(args(dir.appendingPathComponent("remote").path) + ["--hosts", endpoints.joined(separator: ","), "--secret-file", secretFile])
        XCTAssertEqual(remote.status, 0, remote.stderr)
        XCTAssertEqual(remote.json?["output_sha256"] as? String, single.json?["output_sha256"] as? String)
        // A coordinator with the wrong secret is refused.
        let wrong = dir.appendingPathComponent("wrong").path
        try "not-the-cluster-secret-at-all-00".write(toFile: wrong, atomically: true, encoding: .utf8)
        XCTAssertEqual(chmod(wrong, 0o600), 0)
        let refused = try CLI.run(args(dir.appendingPathComponent("refused").path) + ["--hosts", endpoints[0], "--secret-file", wrong])
        XCTAssertEqual(refused.status, 1)
        XCTAssertTrue(refused.stderr.contains("did not prove knowledge of the shared secret"), refused.stderr)
    }

    /// ADMM with as many rounds as partitions (and the default ρ = ∞) ends on the sequential
    /// result: residuals fall to zero and the last round's weights are identical; fewer rounds
    /// differ. By default the run keeps the round whose model is closest to the dense one on the
    /// calibration windows, with that round's weights.
    func testADMMWithRoundsEqualToPartitionsEqualsSequential() throws {
        let dir = try CLI.temporaryDirectory(self)
        let single = try CLI.run(args(dir.appendingPathComponent("single").path))
        let admm = try CLI.run(args(dir.appendingPathComponent("admm").path) + ["--workers", "3", "--coordination", "admm", "--keep-round", "last"])
        XCTAssertEqual(admm.status, 0, admm.stderr)
        XCTAssertEqual(admm.json?["output_sha256"] as? String, single.json?["output_sha256"] as? String)
        let summary = admm.json?["admm"] as? [String: Any]
        let rounds = summary?["rounds"] as? [[String: Any]] ?? []
        XCTAssertEqual(rounds.count, 3)
        XCTAssertEqual(rounds.last?["residuals"] as? [Double], [0, 0])
        XCTAssertGreaterThan((rounds.first?["residuals"] as? [Double])?.first ?? 0, 0)
        XCTAssertEqual(summary?["stopped"] as? String, "converged")
        XCTAssertEqual(summary?["kept"] as? Int, 3)
        XCTAssertEqual(summary?["keep_round"] as? String, "last")

        // The default: the kept round has the smallest loss on the calibration windows, and its weights are those of a
        // run that stopped there.
        let best = try CLI.run(args(dir.appendingPathComponent("best").path) + ["--workers", "3", "--coordination", "admm"])
        XCTAssertEqual(best.status, 0, best.stderr)
        let b = best.json?["admm"] as? [String: Any]
        let errors = (b?["rounds"] as? [[String: Any]] ?? []).map { ($0["round"] as? Int ?? -1, $0["calibration_loss"] as? Double ?? .nan) }
        let smallest = errors.map(\.1).min() ?? .nan
        let kept = try XCTUnwrap(b?["kept"] as? Int)
        XCTAssertEqual(kept, errors.last { $0.1 == smallest }?.0, "\(errors)")
        XCTAssertTrue((b?["kept_reason"] as? String ?? "").contains("round \(kept)"), "\(b ?? [:])")
        XCTAssertTrue(["converged", "residual_stalled", "round_limit"].contains(b?["stopped"] as? String ?? ""), "\(b ?? [:])")
        XCTAssertTrue(best.stderr.contains("keeping round \(kept)"), best.stderr)
        let at = try CLI.run(args(dir.appendingPathComponent("at").path) + ["--workers", "3", "--coordination", "admm", "--rounds", "\(kept)",
                                                                           "--keep-round", "last", "--min-improvement", "0"])
        XCTAssertEqual(at.status, 0, at.stderr)
        XCTAssertEqual(at.json?["output_sha256"] as? String, best.json?["output_sha256"] as? String)
        let wrong = try CLI.run(args(dir.appendingPathComponent("wrong").path) + ["--workers", "2", "--coordination", "admm", "--keep-round", "first"])
        XCTAssertEqual(wrong.status, 2)
        XCTAssertTrue(wrong.stderr.contains("--keep-round must be one of best, last"), wrong.stderr)
        let short = try CLI.run(args(dir.appendingPathComponent("short").path) + ["--workers", "3", "--coordination", "admm", "--rounds", "2"])
        XCTAssertEqual(short.status, 0, short.stderr)
        XCTAssertNotEqual(short.json?["output_sha256"] as? String, single.json?["output_sha256"] as? String)
        // A finite rho blends in the dense target and runs too.
        let blended = try CLI.run(args(dir.appendingPathComponent("rho").path) + ["--workers", "2", "--coordination", "admm", "--rho", "4", "--rounds", "3"])
        XCTAssertEqual(blended.status, 0, blended.stderr)
        let bad = try CLI.run(args(dir.appendingPathComponent("bad").path) + ["--rounds", "2"])
        XCTAssertEqual(bad.status, 2)
    }

    func testWorkerWithoutSecretRefusesNonLoopbackAddresses() throws {
        let r = try CLI.run(["worker", "--listen", "0.0.0.0:0"], timeout: 30)
        XCTAssertEqual(r.status, 1)
        XCTAssertTrue(r.stderr.contains("loopback only"), r.stderr)
    }
}
