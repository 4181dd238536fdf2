import Foundation
import XCTest

/// `--replicas R`: stages shared by R workers, in this process or over loopback, must write the
/// single-process bytes for any R and any stages x replicas grid, survive a lost replica, and
/// resume at another R (stories260K).
final class ReplicaCLITests: XCTestCase {
    let stories = CLI.asset("stories260K/stories260K.bin")
    let storiesTokenizer = CLI.asset("stories260K/tok512.bin")
    let oz = CLI.asset("public-domain-text/wizard_of_oz.txt")

    func pruneArgs(output: String, method: String = "sparsegpt", _ extra: [String] = []) -> [String] {
        ["prune", "--model", stories, "--tokenizer", storiesTokenizer, "--calib", oz, "--calib-samples", "8",
         "--calib-seqlen", "128", "--method", method, "--sparsity", "0.6", "--output", output] + extra
    }

    func sha(_ args: [String], file: StaticString = #filePath, line: UInt = #line) throws -> String {
        let r = try CLI.run(args + ["--json"])
        XCTAssertEqual(r.status, 0, r.stderr, file: file, line: line)
        return try XCTUnwrap(r.json?["output_sha256"] as? String, r.stderr, file: file, line: line)
    }

    func testAnyReplicaCountAndGridWritesTheSingleProcessBytes() throws {
        let dir = try CLI.temporaryDirectory(self)
        for method in ["sparsegpt", "wanda", "sparsellm"] {
            let single = try sha(pruneArgs(output: dir.appendingPathComponent("\(method)-single").path, method: method))
            for (k, extra) in [["--replicas", "2"], ["--replicas", "3"], ["--replicas", "4"], ["--workers", "2", "--replicas", "2"],
                               ["--workers", "4", "--replicas", "2"], ["--workers", "3", "--replicas", "3"]].enumerated() {
                if method != "sparsegpt" && k != 1 && k != 4 { continue }     // every grid for SparseGPT; two for the others
                let out = dir.appendingPathComponent("\(method)-\(k)").path
                XCTAssertEqual(try sha(pruneArgs(output: out, method: method, extra)), single, "\(method) \(extra.joined(separator: " "))")
            }
        }
    }

    /// SmolLM2's down_proj reads the 1536-wide feed-forward (12 strips of 128): with 2 or 3
    /// replicas its Hessian goes down the chain in 13 parts over the mesh, and its rows are solved
    /// by all. Worker processes and in-process replicas write the single-process bytes.
    func testAWideHessianDownTheChainOverWorkerProcessesWritesTheSingleProcessBytes() throws {
        let dir = try CLI.temporaryDirectory(self)
        let smol = CLI.asset("smollm2-135m-instruct-q4_1/SmolLM2-135M-Instruct.Q4_1.gguf")
        for method in ["sparsegpt", "wanda"] {
            let args = { (out: String, extra: [String]) in
                ["prune", "--model", smol, "--method", method, "--sparsity", "0.5", "--calib", self.oz, "--calib-samples", "6",
                 "--calib-seqlen", "64", "--layers", "0-1", "--threads", "1", "--output", dir.appendingPathComponent(out).path] + extra
            }
            let single = try sha(args("\(method)-single", []))
            XCTAssertEqual(try sha(args("\(method)-w2r2", ["--workers", "2", "--replicas", "2"])), single, "\(method) --workers 2 --replicas 2")
            XCTAssertEqual(try sha(args("\(method)-r3", ["--replicas", "3"])), single, "\(method) --replicas 3")
        }
    }

    func testThePlanNamesEachStagesReplicasAndTheirProcesses() throws {
        let dir = try CLI.temporaryDirectory(self)
        let out = dir.appendingPathComponent("out").path
        _ = try sha(pruneArgs(output: out, ["--workers", "5", "--replicas", "2"]))
        let start = try XCTUnwrap(CLI.events(out + ".run").first { $0["event"] as? String == "start" })
        let plan = try XCTUnwrap(start["plan"] as? [[String: Any]])
        // Two stages of two replicas and one worker alone; the planner gives the pairs more blocks.
        XCTAssertEqual(plan.count, 3)
        XCTAssertEqual((plan[0]["replicas"] as? [String])?.count, 2)
        XCTAssertEqual((plan[0]["replica_pids"] as? [Int])?.count, 2)
        XCTAssertNil(plan[2]["replicas"])
        let sizes = plan.map { ($0["last"] as! Int) - ($0["first"] as! Int) + 1 }
        XCTAssertEqual(sizes.reduce(0, +), 5)
        XCTAssertGreaterThanOrEqual(sizes[0], sizes[2])
    }

    func testAReplicaKilledMidRunTheRunCompletesWithTheSameBytes() throws {
        let dir = try CLI.temporaryDirectory(self)
        let expected = try sha(pruneArgs(output: dir.appendingPathComponent("ref").path))
        let out = dir.appendingPathComponent("out").path
        let p = try CLI.start(pruneArgs(output: out, ["--workers", "2", "--replicas", "2", "--heartbeat-interval", "0.5", "--heartbeat-timeout", "10"]),
                              environment: ["TOPIARY_DEBUG_BLOCK_DELAY": "1"], directory: dir)
        XCTAssertTrue(CLI.waitForEvent(out + ".run") { $0["event"] as? String == "block_done" && $0["block"] as? Int == 1 })
        let start = try XCTUnwrap(CLI.events(out + ".run").first { $0["event"] as? String == "start" })
        let plan = try XCTUnwrap(start["plan"] as? [[String: Any]])
        let pids = try XCTUnwrap(plan[0]["replica_pids"] as? [Int])
        kill(pid_t(pids[1]), SIGKILL)          // a follower: replica 0 must not wait for it forever
        let status = CLI.wait(p)
        let stderr = (try? String(contentsOf: dir.appendingPathComponent("stderr.txt"), encoding: .utf8)) ?? ""
        XCTAssertEqual(status, 0, stderr)
        let events = CLI.events(out + ".run")
        XCTAssertEqual(events.first { $0["event"] as? String == "complete" }?["output_sha256"] as? String, expected)
        XCTAssertNotNil(events.first { $0["event"] as? String == "worker_lost" }, "the lost replica is recorded")
        // The surviving replica carries on with the rest of the stage's range.
        let names = try XCTUnwrap(plan[0]["replicas"] as? [String])
        let moved = try XCTUnwrap(events.first { $0["event"] as? String == "reassigned" })
        XCTAssertEqual(moved["to"] as? String, names[0], "\(moved)")
        var done: [Int: Int] = [:]
        for e in events where e["event"] as? String == "block_done" { done[e["block"] as! Int, default: 0] += 1 }
        XCTAssertEqual(done, [0: 1, 1: 1, 2: 1, 3: 1, 4: 1], "no block is done twice")
    }

    func testAHungReplicaDoesNotHangTheRun() throws {
        let dir = try CLI.temporaryDirectory(self)
        let expected = try sha(pruneArgs(output: dir.appendingPathComponent("ref").path))
        let out = dir.appendingPathComponent("out").path
        let p = try CLI.start(pruneArgs(output: out, ["--workers", "2", "--replicas", "2", "--heartbeat-interval", "0.5", "--heartbeat-timeout", "3"]),
                              environment: ["TOPIARY_DEBUG_BLOCK_DELAY": "0.5"], directory: dir)
        XCTAssertTrue(CLI.waitForEvent(out + ".run") { $0["event"] as? String == "block_done" && $0["block"] as? Int == 0 })
        let start = try XCTUnwrap(CLI.events(out + ".run").first { $0["event"] as? String == "start" })
        let pids = try XCTUnwrap((try XCTUnwrap(start["plan"] as? [[String: Any]]))[0]["replica_pids"] as? [Int])
        kill(pid_t(pids[1]), SIGSTOP)          // alive but silent: its connections stay open
        defer { kill(pid_t(pids[1]), SIGKILL) }
        let status = CLI.wait(p, timeout: 120)
        let stderr = (try? String(contentsOf: dir.appendingPathComponent("stderr.txt"), encoding: .utf8)) ?? ""
        XCTAssertEqual(status, 0, stderr)
        XCTAssertEqual(CLI.events(out + ".run").first { $0["event"] as? String == "complete" }?["output_sha256"] as? String, expected)
    }

    func testARunResumedWithAnotherReplicaCountWritesTheSameBytes() throws {
        let dir = try CLI.temporaryDirectory(self)
        let expected = try sha(pruneArgs(output: dir.appendingPathComponent("ref").path))
        let out = dir.appendingPathComponent("out").path
        let p = try CLI.start(pruneArgs(output: out, ["--replicas", "2"]), environment: ["TOPIARY_DEBUG_BLOCK_DELAY": "0.5"], directory: dir)
        XCTAssertTrue(CLI.waitForEvent(out + ".run") { $0["event"] as? String == "block_done" && $0["block"] as? Int == 1 })
        kill(p.processIdentifier, SIGKILL)
        p.waitUntilExit()
        XCTAssertEqual(try sha(["prune", "--resume", out + ".run", "--replicas", "3"]), expected)
    }

    func testBadReplicaOptionsAreRefusedClearly() throws {
        let dir = try CLI.temporaryDirectory(self)
        let out = dir.appendingPathComponent("out").path
        for (extra, message) in [(["--replicas", "0"], "--replicas"), (["--replicas", "x"], "--replicas"),
                                 (["--workers", "2", "--replicas", "3"], "--replicas 3 needs at least 3 workers")] {
            let r = try CLI.run(pruneArgs(output: out, extra))
            XCTAssertNotEqual(r.status, 0)
            XCTAssertTrue(r.stderr.contains(message), "\(extra): \(r.stderr)")
            XCTAssertFalse(r.stderr.contains("Fatal error"), r.stderr)
        }
    }
}

/// `--allocation owl|learned` end to end (stories260K).
final class AllocationCLITests: XCTestCase {
    let stories = CLI.asset("stories260K/stories260K.bin")
    let storiesTokenizer = CLI.asset("stories260K/tok512.bin")
    let oz = CLI.asset("public-domain-text/wizard_of_oz.txt")

    func args(_ output: String, _ extra: [String]) -> [String] {
        ["prune", "--model", stories, "--tokenizer", storiesTokenizer, "--calib", oz, "--calib-samples", "8",
         "--calib-seqlen", "128", "--method", "wanda", "--sparsity", "0.7", "--output", output, "--json"] + extra
    }

    func testOWLGivesBlocksTheirOwnSparsityAroundTheTargetTheSameOnWorkersAndReplicas() throws {
        let dir = try CLI.temporaryDirectory(self)
        let r = try CLI.run(args(dir.appendingPathComponent("a").path, ["--allocation", "owl", "--owl-lambda", "0.1"]))
        XCTAssertEqual(r.status, 0, r.stderr)
        let allocation = try XCTUnwrap(r.json?["allocation"] as? [String: Any])
        XCTAssertEqual(allocation["method"] as? String, "owl")
        let blocks = try XCTUnwrap(allocation["block_sparsity"] as? [Double])
        XCTAssertEqual(blocks.count, 5)
        XCTAssertEqual(blocks.reduce(0, +) / 5, 0.7, accuracy: 1e-9)
        XCTAssertEqual(blocks.max()! - blocks.min()!, 0.2, accuracy: 1e-9)
        // Each block's report shows the sparsity it was given (up to per-row rounding of 64 columns).
        let reportData = try Data(contentsOf: dir.appendingPathComponent("a/report.json"))
        let reports = try XCTUnwrap((try JSONSerialization.jsonObject(with: reportData) as? [String: Any])?["blocks"] as? [[String: Any]])
        for (b, report) in reports.enumerated() {
            XCTAssertEqual(try XCTUnwrap(report["sparsity"] as? Double), blocks[b], accuracy: 1.0 / 64 + 1e-9, "block \(b)")
        }
        let sha = try XCTUnwrap(r.json?["output_sha256"] as? String)
        for (k, extra) in [["--workers", "2"], ["--replicas", "2"]].enumerated() {
            let other = try CLI.run(args(dir.appendingPathComponent("b\(k)").path, ["--allocation", "owl", "--owl-lambda", "0.1"] + extra))
            XCTAssertEqual(other.json?["output_sha256"] as? String, sha, other.stderr)
        }
        let uniform = try CLI.run(args(dir.appendingPathComponent("u").path, []))
        XCTAssertNotEqual(uniform.json?["output_sha256"] as? String, sha)
    }

    func testBadAllocationOptionsAreRefused() throws {
        let dir = try CLI.temporaryDirectory(self)
        let out = dir.appendingPathComponent("x").path
        for (extra, message) in [(["--allocation", "global"], "--allocation must be uniform or owl or learned, got 'global'"),
                                 (["--allocation", "learned", "--owl-lambda", "0.1"], "--owl-m and --owl-lambda apply to --allocation owl"),
                                 (["--allocation", "owl", "--owl-lambda", "best"], "--owl-lambda"),
                                 (["--owl-m", "3"], "--owl-m and --owl-lambda apply to --allocation owl"),
                                 (["--allocation", "owl", "--owl-lambda", "-1"], "--owl-lambda must be in [0, 1)"),
                                 (["--allocation", "owl", "--owl-lambda", "0.5"], "--owl-lambda 0.5 gives block"),
                                 (["--allocation", "owl", "--learned-blend", "1"], "--learned-blend applies to --allocation learned"),
                                 (["--learned-blend", "auto"], "--learned-blend applies to --allocation learned"),
                                 (["--allocation", "learned", "--learned-blend", "1.5"], "--learned-blend must be a number from 0 to 1 or auto, got '1.5'"),
                                 (["--allocation", "learned", "--learned-blend", "most"], "--learned-blend must be a number from 0 to 1 or auto, got 'most'")] {
            let r = try CLI.run(args(out, extra))
            XCTAssertNotEqual(r.status, 0)
            XCTAssertTrue(r.stderr.contains(message), "\(extra): \(r.stderr)")
        }
        var nm = args(out, ["--allocation", "owl"])
        nm.removeAll { $0 == "--sparsity" || $0 == "0.7" }
        let r = try CLI.run(nm + ["--pattern", "2:4"])
        XCTAssertTrue(r.stderr.contains("--allocation owl gives each block its own unstructured sparsity"), r.stderr)
        nm = args(out, ["--allocation", "learned"])
        nm.removeAll { $0 == "--sparsity" || $0 == "0.7" }
        let l = try CLI.run(nm + ["--pattern", "2:4"])
        XCTAssertEqual(l.status, 2)
        XCTAssertTrue(l.stderr.contains("--allocation learned gives each block its own unstructured sparsity; with --pattern N:M"), l.stderr)
    }

    /// `--allocation learned --learned-blend 1` (the curves' solution itself): the block
    /// sparsities' parameter-weighted mean is the target, each block is pruned at its own, the
    /// same bytes on workers, again, and after a kill and resume (which reuses the allocation
    /// recorded in run.json instead of measuring it again).
    func testLearnedAllocationMeetsTheTargetAndIsTheSameOnWorkersAndAfterAResume() throws {
        let dir = try CLI.temporaryDirectory(self)
        let learned = ["--allocation", "learned", "--learned-blend", "1"]
        let r = try CLI.run(args(dir.appendingPathComponent("a").path, learned))
        XCTAssertEqual(r.status, 0, r.stderr)
        let allocation = try XCTUnwrap(r.json?["allocation"] as? [String: Any])
        XCTAssertEqual(allocation["method"] as? String, "learned")
        XCTAssertEqual(allocation["curve_method"] as? String, "wanda")
        let blocks = try XCTUnwrap(allocation["block_sparsity"] as? [Double])
        let parameters = try XCTUnwrap(allocation["block_parameters"] as? [Int])
        XCTAssertEqual(blocks.count, 5)
        let weighted = zip(blocks, parameters).reduce(0.0) { $0 + $1.0 * Double($1.1) } / Double(parameters.reduce(0, +))
        XCTAssertEqual(weighted, 0.7, accuracy: 1e-9)  // the solver's exact mean, rounded to 1e-9 per block
        XCTAssertTrue(blocks.allSatisfy { $0 >= 0.6 - 1e-9 && $0 <= 0.8 + 1e-9 }, "\(blocks)")
        XCTAssertGreaterThan(blocks.max()! - blocks.min()!, 0.01, "\(blocks)")
        let curves = try XCTUnwrap(allocation["curves"] as? [[String: Any]])
        XCTAssertEqual(curves.count, 5)
        XCTAssertEqual((curves[0]["sparsities"] as? [Double])?.count, 9)
        XCTAssertGreaterThan(curves[0]["output_energy"] as? Double ?? 0, 0)
        // Errors grow with sparsity on every block (Wanda's masks nest).
        for c in curves { let e = c["errors"] as? [Double] ?? []; XCTAssertLessThan(e.first ?? 1, e.last ?? 0) }
        // Each block's report shows the sparsity it was given (up to Wanda's per-row rounding of 64 columns).
        let reportData = try Data(contentsOf: dir.appendingPathComponent("a/report.json"))
        let reports = try XCTUnwrap((try JSONSerialization.jsonObject(with: reportData) as? [String: Any])?["blocks"] as? [[String: Any]])
        for (b, report) in reports.enumerated() {
            XCTAssertEqual(try XCTUnwrap(report["sparsity"] as? Double), blocks[b], accuracy: 1.0 / 64 + 1e-9, "block \(b)")
        }
        let sha = try XCTUnwrap(r.json?["output_sha256"] as? String)
        for (k, extra) in [[], ["--workers", "2"]].enumerated() {
            let other = try CLI.run(args(dir.appendingPathComponent("b\(k)").path, learned + extra))
            XCTAssertEqual(other.json?["output_sha256"] as? String, sha, other.stderr)
            XCTAssertEqual((other.json?["allocation"] as? [String: Any])?["block_sparsity"] as? [Double], blocks)
        }
        XCTAssertNotEqual(try CLI.run(args(dir.appendingPathComponent("u").path, [])).json?["output_sha256"] as? String, sha)

        let out = dir.appendingPathComponent("killed").path
        let p = try CLI.start(args(out, learned), environment: ["TOPIARY_DEBUG_BLOCK_DELAY": "0.5"], directory: dir)
        XCTAssertTrue(CLI.waitForEvent(out + ".run") { $0["event"] as? String == "block_done" && $0["block"] as? Int == 1 })
        kill(p.processIdentifier, SIGKILL)
        p.waitUntilExit()
        let manifest = try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: out + ".run/run.json"))) as? [String: Any])
        XCTAssertEqual((manifest["allocation"] as? [String: Any])?["block_sparsity"] as? [Double], blocks)
        XCTAssertEqual((manifest["allocation"] as? [String: Any])?["blend"] as? Double, 1)
        let resumed = try CLI.run(["prune", "--resume", out + ".run", "--json"])
        XCTAssertEqual(resumed.status, 0, resumed.stderr)
        XCTAssertTrue(resumed.stderr.contains("allocation: learned, as recorded in run.json"), resumed.stderr)
        XCTAssertEqual(resumed.json?["output_sha256"] as? String, sha)
    }

    /// `--owl-lambda auto` records the grid's losses and picks the smallest; run.json keeps the choice.
    func testOWLLambdaAutoRecordsTheGridAndItsChoice() throws {
        let dir = try CLI.temporaryDirectory(self)
        let out = dir.appendingPathComponent("a").path
        let r = try CLI.run(args(out, ["--allocation", "owl", "--owl-lambda", "auto"]))
        XCTAssertEqual(r.status, 0, r.stderr)
        let allocation = try XCTUnwrap(r.json?["allocation"] as? [String: Any])
        let trials = try XCTUnwrap(allocation["lambda_search"] as? [[String: Any]])
        XCTAssertEqual(trials.compactMap { $0["lambda"] as? Double }, [0, 0.04, 0.08, 0.12, 0.16, 0.2])
        let losses = trials.map { ($0["lambda"] as! Double, $0["loss"] as? Double ?? .infinity) }
        let best = losses.min { $0.1 < $1.1 }!
        XCTAssertEqual(allocation["lambda"] as? Double, best.0, "\(losses)")
        XCTAssertTrue(losses.allSatisfy { $0.1.isFinite && $0.1 > 0 }, "\(losses)")
        let blocks = try XCTUnwrap(allocation["block_sparsity"] as? [Double])
        XCTAssertEqual(blocks.reduce(0, +) / 5, 0.7, accuracy: 1e-9)
        // The same as OWL given the chosen λ.
        let fixed = try CLI.run(args(dir.appendingPathComponent("b").path, ["--allocation", "owl", "--owl-lambda", "\(best.0)"]))
        XCTAssertEqual(fixed.json?["output_sha256"] as? String, r.json?["output_sha256"] as? String, fixed.stderr)
        let manifest = try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: out + ".run/run.json"))) as? [String: Any])
        let recorded = try XCTUnwrap(manifest["allocation"] as? [String: Any])
        XCTAssertEqual(recorded["lambda"] as? Double, best.0)
        XCTAssertEqual((recorded["lambda_search"] as? [[String: Any]])?.count, 6)
    }

    /// `--allocation learned` (blend auto, the default) scores the blends 0, 0.25, ..., 1 between
    /// uniform and the curves' solution by the calibration loss and keeps the least; the blocks
    /// are that share of the way to the solution, and the run equals `--learned-blend` given the
    /// chosen share. `--learned-blend 0` is uniform allocation: the uniform run's bytes.
    func testLearnedBlendAutoRecordsTheSearchAndZeroIsUniform() throws {
        let dir = try CLI.temporaryDirectory(self)
        let r = try CLI.run(args(dir.appendingPathComponent("a").path, ["--allocation", "learned"]))
        XCTAssertEqual(r.status, 0, r.stderr)
        let allocation = try XCTUnwrap(r.json?["allocation"] as? [String: Any])
        let trials = try XCTUnwrap(allocation["blend_search"] as? [[String: Any]])
        XCTAssertEqual(trials.compactMap { $0["blend"] as? Double }, [0, 0.25, 0.5, 0.75, 1])
        let losses = trials.map { ($0["blend"] as! Double, $0["loss"] as? Double ?? .infinity) }
        XCTAssertTrue(losses.allSatisfy { $0.1.isFinite && $0.1 > 0 }, "\(losses)")
        let best = losses.min { $0.1 < $1.1 }!
        let blend = try XCTUnwrap(allocation["blend"] as? Double)
        XCTAssertEqual(blend, best.0, "\(losses)")
        let solved = try XCTUnwrap(allocation["learned_block_sparsity"] as? [Double])
        let blocks = try XCTUnwrap(allocation["block_sparsity"] as? [Double])
        let parameters = try XCTUnwrap(allocation["block_parameters"] as? [Int])
        XCTAssertEqual(zip(blocks, parameters).reduce(0.0) { $0 + $1.0 * Double($1.1) } / Double(parameters.reduce(0, +)), 0.7, accuracy: 1e-9)
        for (b, s) in zip(blocks, solved) { XCTAssertEqual(b, 0.7 + blend * (s - 0.7), accuracy: 1e-8, "\(blocks) \(solved)") }
        let fixed = try CLI.run(args(dir.appendingPathComponent("b").path, ["--allocation", "learned", "--learned-blend", "\(blend)"]))
        XCTAssertEqual(fixed.json?["output_sha256"] as? String, r.json?["output_sha256"] as? String, fixed.stderr)
        XCTAssertNil((fixed.json?["allocation"] as? [String: Any])?["blend_search"])
        // Killed and resumed: run.json's record (its search included) is read back and reused.
        let out = dir.appendingPathComponent("killed").path
        let p = try CLI.start(args(out, ["--allocation", "learned"]), environment: ["TOPIARY_DEBUG_BLOCK_DELAY": "0.5"], directory: dir)
        XCTAssertTrue(CLI.waitForEvent(out + ".run") { $0["event"] as? String == "block_done" && $0["block"] as? Int == 1 })
        kill(p.processIdentifier, SIGKILL)
        p.waitUntilExit()
        let resumed = try CLI.run(["prune", "--resume", out + ".run", "--json"])
        XCTAssertEqual(resumed.status, 0, resumed.stderr)
        XCTAssertTrue(resumed.stderr.contains("allocation: learned, as recorded in run.json"), resumed.stderr)
        XCTAssertFalse(resumed.stderr.contains("searching the blend"), resumed.stderr)
        XCTAssertEqual(resumed.json?["output_sha256"] as? String, r.json?["output_sha256"] as? String)
        XCTAssertEqual(((resumed.json?["allocation"] as? [String: Any])?["blend_search"] as? [[String: Any]])?.count, 5)

        let zero = try CLI.run(args(dir.appendingPathComponent("z").path, ["--allocation", "learned", "--learned-blend", "0"]))
        XCTAssertEqual(zero.status, 0, zero.stderr)
        XCTAssertEqual((zero.json?["allocation"] as? [String: Any])?["block_sparsity"] as? [Double], [Double](repeating: 0.7, count: 5))
        let uniform = try CLI.run(args(dir.appendingPathComponent("u").path, []))
        XCTAssertEqual(zero.json?["output_sha256"] as? String, uniform.json?["output_sha256"] as? String)
    }
}
