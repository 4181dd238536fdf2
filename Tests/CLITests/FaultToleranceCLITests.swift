import Foundation
import XCTest

/// Runs that lose a worker, lose the coordinator, are signalled or find a damaged checkpoint, and
/// must still end with the weights of an undisturbed run (stories260K). TOPIARY_DEBUG_BLOCK_DELAY
/// slows every block down so that a process can be killed in the middle of the run.
final class FaultToleranceCLITests: XCTestCase {
    let stories = CLI.asset("stories260K/stories260K.bin")
    let storiesTokenizer = CLI.asset("stories260K/tok512.bin")
    let oz = CLI.asset("public-domain-text/wizard_of_oz.txt")

    func pruneArgs(output: String, _ extra: [String] = []) -> [String] {
        ["prune", "--model", stories, "--tokenizer", storiesTokenizer, "--calib", oz, "--calib-samples", "8",
         "--calib-seqlen", "128", "--method", "sparsegpt", "--sparsity", "0.6", "--output", output] + extra
    }

    /// The weights' sha256 of an undisturbed single-process run (computed once).
    nonisolated(unsafe) static var referenceSHA: String?
    func reference() throws -> String {
        if let sha = Self.referenceSHA { return sha }
        let dir = try CLI.temporaryDirectory(self)
        let r = try CLI.run(pruneArgs(output: dir.appendingPathComponent("ref").path, ["--json"]))
        XCTAssertEqual(r.status, 0, r.stderr)
        let sha = try XCTUnwrap(r.json?["output_sha256"] as? String)
        Self.referenceSHA = sha
        return sha
    }

    func outputSHA(_ runDirectory: String) -> String? {
        CLI.events(runDirectory).first { $0["event"] as? String == "complete" }?["output_sha256"] as? String
    }

    func blockDone(_ block: Int) -> ([String: Any]) -> Bool {
        { $0["event"] as? String == "block_done" && $0["block"] as? Int == block }
    }

    /// Starts a slowed-down run and SIGKILLs its coordinator once an event satisfies `when`;
    /// returns the output path and the run directory.
    func killedRun(_ extra: [String] = [], delay: String = "0.5", when: @escaping ([String: Any]) -> Bool) throws -> (out: String, run: String) {
        let dir = try CLI.temporaryDirectory(self)
        let out = dir.appendingPathComponent("out").path
        let p = try CLI.start(pruneArgs(output: out, extra), environment: ["TOPIARY_DEBUG_BLOCK_DELAY": delay], directory: dir)
        XCTAssertTrue(CLI.waitForEvent(out + ".run", when))
        kill(p.processIdentifier, SIGKILL)
        p.waitUntilExit()
        return (out, out + ".run")
    }

    func doneCounts(_ runDirectory: String) -> [Int: Int] {
        var counts: [Int: Int] = [:]
        for e in CLI.events(runDirectory) where e["event"] as? String == "block_done" { counts[e["block"] as! Int, default: 0] += 1 }
        return counts
    }

    func testWorkerKilledMidRunTheRunCompletesWithTheSameWeights() throws {
        let expected = try reference()
        let dir = try CLI.temporaryDirectory(self)
        let out = dir.appendingPathComponent("out").path
        let p = try CLI.start(pruneArgs(output: out, ["--workers", "3", "--heartbeat-interval", "0.5", "--heartbeat-timeout", "10"]),
                              environment: ["TOPIARY_DEBUG_BLOCK_DELAY": "1"], directory: dir)
        // Blocks 0-1, 2-3, 4: kill the second worker once it has finished its first block.
        XCTAssertTrue(CLI.waitForEvent(out + ".run", blockDone(2)))
        let start = try XCTUnwrap(CLI.events(out + ".run").first { $0["event"] as? String == "start" })
        let plan = try XCTUnwrap(start["plan"] as? [[String: Any]])
        XCTAssertEqual(plan.count, 3)
        let victim = try XCTUnwrap(plan[1]["pid"] as? Int)
        kill(pid_t(victim), SIGKILL)
        let status = CLI.wait(p)
        let stderr = (try? String(contentsOf: dir.appendingPathComponent("stderr.txt"), encoding: .utf8)) ?? ""
        XCTAssertEqual(status, 0, stderr)
        XCTAssertEqual(outputSHA(out + ".run"), expected)
        let events = CLI.events(out + ".run")
        let lost = try XCTUnwrap(events.first { $0["event"] as? String == "worker_lost" })
        XCTAssertEqual(lost["worker"] as? String, plan[1]["worker"] as? String)
        XCTAssertEqual(lost["finished_through"] as? Int, 2)
        let moved = try XCTUnwrap(events.first { $0["event"] as? String == "reassigned" })
        XCTAssertEqual(moved["first"] as? Int, 3)
        XCTAssertNotEqual(moved["to"] as? String, plan[1]["worker"] as? String)
        XCTAssertEqual(doneCounts(out + ".run"), [0: 1, 1: 1, 2: 1, 3: 1, 4: 1], "no block is done twice")
    }

    func testAStalledWorkerIsLostWhenItsHeartbeatsStop() throws {
        let expected = try reference()
        let dir = try CLI.temporaryDirectory(self)
        let out = dir.appendingPathComponent("out").path
        let p = try CLI.start(pruneArgs(output: out, ["--workers", "2", "--heartbeat-interval", "0.2", "--heartbeat-timeout", "2"]),
                              environment: ["TOPIARY_DEBUG_BLOCK_DELAY": "0.5"], directory: dir)
        XCTAssertTrue(CLI.waitForEvent(out + ".run", blockDone(0)))
        let plan = try XCTUnwrap(CLI.events(out + ".run").first { $0["event"] as? String == "start" }?["plan"] as? [[String: Any]])
        let victim = pid_t(try XCTUnwrap(plan[0]["pid"] as? Int))
        kill(victim, SIGSTOP)   // alive but silent, as a hung node
        defer { kill(victim, SIGKILL) }
        XCTAssertEqual(CLI.wait(p), 0)
        XCTAssertEqual(outputSHA(out + ".run"), expected)
        let lost = try XCTUnwrap(CLI.events(out + ".run").first { $0["event"] as? String == "worker_lost" })
        XCTAssertTrue((lost["error"] as? String ?? "").contains("no data"), "\(lost)")
    }

    func testCoordinatorKilledThenResumedWritesTheSameWeightsAndRedoesNoBlock() throws {
        let expected = try reference()
        let (out, run) = try killedRun(when: blockDone(1))
        XCTAssertFalse(FileManager.default.fileExists(atPath: out))
        let finishedBefore = Set(doneCounts(run).keys)
        XCTAssertTrue(finishedBefore.contains(1) && finishedBefore.count < 5)

        // Changing what the run computes is refused, naming the option.
        let changed = try CLI.run(["prune", "--resume", run, "--sparsity", "0.7"])
        XCTAssertEqual(changed.status, 2)
        XCTAssertTrue(changed.stderr.contains("--sparsity 0.7"), changed.stderr)

        let r = try CLI.run(["prune", "--resume", run, "--json"])
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertEqual(r.json?["output_sha256"] as? String, expected)
        XCTAssertEqual(doneCounts(run), [0: 1, 1: 1, 2: 1, 3: 1, 4: 1], "a finished block was done again")
        let resume = try XCTUnwrap(CLI.events(run).first { $0["event"] as? String == "resume" })
        XCTAssertEqual(Set(resume["finished_blocks"] as! [Int]), finishedBefore)
        // The checkpoints are gone, the record stays.
        XCTAssertFalse(FileManager.default.fileExists(atPath: run + "/blocks"))
        for f in ["run.json", "events.jsonl", "report.json"] { XCTAssertTrue(FileManager.default.fileExists(atPath: run + "/" + f), f) }
        let again = try CLI.run(["prune", "--resume", run])
        XCTAssertEqual(again.status, 0)
        XCTAssertTrue(again.stdout.contains("already complete"))
    }

    func testACorruptedCheckpointIsDetectedRedoneAndReported() throws {
        let expected = try reference()
        let (_, run) = try killedRun(when: blockDone(2))
        // Flip bytes in the middle of block 1's weights.
        let file = run + "/blocks/block-00001.safetensors"
        var bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: file)))
        for i in stride(from: bytes.count / 2, to: bytes.count / 2 + 64, by: 1) { bytes[i] ^= 0x5A }
        try Data(bytes).write(to: URL(fileURLWithPath: file))

        let r = try CLI.run(["prune", "--resume", run, "--json"])
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertEqual(r.json?["output_sha256"] as? String, expected)
        let corrupt = try XCTUnwrap(CLI.events(run).first { $0["event"] as? String == "checkpoint_corrupt" })
        XCTAssertEqual(corrupt["block"] as? Int, 1)
        XCTAssertEqual(doneCounts(run)[1], 2, "block 1 is redone")
        XCTAssertEqual(doneCounts(run)[0], 1, "block 0 is not")
    }

    func testSIGTERMStopsWithTheResumeExitCodeAndTheRunResumes() throws {
        let expected = try reference()
        let dir = try CLI.temporaryDirectory(self)
        let out = dir.appendingPathComponent("out").path
        let run = out + ".run"
        let p = try CLI.start(pruneArgs(output: out, ["--workers", "2"]), environment: ["TOPIARY_DEBUG_BLOCK_DELAY": "0.5"], directory: dir)
        XCTAssertTrue(CLI.waitForEvent(run, blockDone(1)))
        kill(p.processIdentifier, SIGTERM)
        XCTAssertEqual(CLI.wait(p), 75)
        XCTAssertEqual(p.terminationReason, .exit)
        XCTAssertTrue(CLI.events(run).contains { $0["event"] as? String == "interrupted" && $0["signal"] as? String == "SIGTERM" })
        let r = try CLI.run(["prune", "--resume", run, "--json"])
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertEqual(r.json?["output_sha256"] as? String, expected)
    }

    func testAFullRunDirectoryFailsClearlyAndTheRunResumesOnceThereIsSpace() throws {
        let expected = try reference()
        let dir = try CLI.temporaryDirectory(self)
        let mountPoint = dir.appendingPathComponent("small").path
        try FileManager.default.createDirectory(atPath: mountPoint, withIntermediateDirectories: true)
        // A 600 KiB filesystem: room for run.json, the events and about two blocks.
        let mounted = try CLI.runTool("/bin/mount", ["-t", "tmpfs", "-o", "size=600k", "tmpfs", mountPoint])
        guard mounted == 0 else { throw XCTSkip("cannot mount a small tmpfs here (mount needs root): the full-disk test did not run") }
        defer { _ = try? CLI.runTool("/bin/umount", ["-l", mountPoint]) }
        let run = mountPoint + "/run"
        let out = dir.appendingPathComponent("out").path
        let r = try CLI.run(pruneArgs(output: out, ["--run-dir", run]))
        XCTAssertEqual(r.status, 1, r.stderr)
        XCTAssertTrue(r.stderr.contains("No space left on device"), r.stderr)
        XCTAssertTrue(r.stderr.contains(run), "the error names the file: \(r.stderr)")
        XCTAssertFalse(FileManager.default.fileExists(atPath: out))
        // What was written is intact: every recorded checkpoint still matches its checksum.
        let recorded = doneCounts(run)
        XCTAssertFalse(recorded.isEmpty)
        XCTAssertLessThan(recorded.count, 5)
        XCTAssertEqual(try CLI.runTool("/bin/mount", ["-o", "remount,size=64m", mountPoint]), 0)
        let resumed = try CLI.run(["prune", "--resume", run, "--json"])
        XCTAssertEqual(resumed.status, 0, resumed.stderr)
        XCTAssertEqual(resumed.json?["output_sha256"] as? String, expected)
        XCTAssertFalse(CLI.events(run).contains { $0["event"] as? String == "checkpoint_corrupt" })
        for (block, count) in doneCounts(run) where recorded[block] != nil { XCTAssertEqual(count, 1, "block \(block) redone") }
    }

    func testAnADMMRunKilledMidRoundResumesFromItsLastRound() throws {
        // With rho = infinity and rounds = partitions, ADMM gives the sequential weights.
        let expected = try reference()
        // Kill the coordinator in round 2, once a block of that round is done.
        let (_, run) = try killedRun(["--workers", "3", "--coordination", "admm", "--rounds", "3", "--keep-round", "last"], delay: "0.3") {
            $0["event"] as? String == "block_done" && $0["round"] as? Int == 2
        }
        let before = CLI.events(run)
        // The coordinator's local workers do not outlive it.
        let workerPIDs = (before.first { $0["event"] as? String == "start" }?["plan"] as? [[String: Any]] ?? []).compactMap { $0["pid"] as? Int }
        XCTAssertEqual(workerPIDs.count, 3)
        let deadline = Date().addingTimeInterval(10)
        while Date() < deadline && workerPIDs.contains(where: { kill(pid_t($0), 0) == 0 }) { usleep(100_000) }
        XCTAssertFalse(workerPIDs.contains(where: { kill(pid_t($0), 0) == 0 }), "local workers outlived their killed coordinator")
        let doneInRound2 = Set(before.filter { $0["event"] as? String == "block_done" && $0["round"] as? Int == 2 }.map { $0["block"] as! Int })
        XCTAssertFalse(doneInRound2.isEmpty)
        // Resume with fewer workers: the recorded partitions are kept.
        let r = try CLI.run(["prune", "--resume", run, "--workers", "2", "--json"])
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertEqual(r.json?["output_sha256"] as? String, expected)
        let events = CLI.events(run)
        XCTAssertEqual(events.filter { $0["event"] as? String == "admm_dense" }.count, 1, "the dense pass is not redone")
        XCTAssertEqual(events.filter { $0["event"] as? String == "admm_round" }.map { $0["round"] as! Int }, [1, 2, 3])
        for b in doneInRound2 {
            XCTAssertEqual(events.filter { $0["event"] as? String == "block_done" && $0["round"] as? Int == 2 && $0["block"] as? Int == b }.count, 1,
                           "block \(b) of round 2 was done again")
        }
    }
    /// Keeping the best round (the default): killed in the last round, after the kept round's
    /// blocks were put aside, the resumed run keeps the same round and writes the bytes of an
    /// uninterrupted run; resuming the completed rounds again puts nothing back twice.
    func testAnADMMRunKilledAfterItsKeptRoundResumesToTheSameBytes() throws {
        let extra = ["--workers", "3", "--coordination", "admm", "--rounds", "3"]
        let dir = try CLI.temporaryDirectory(self)
        let whole = try CLI.run(pruneArgs(output: dir.appendingPathComponent("whole").path, extra + ["--json"]))
        XCTAssertEqual(whole.status, 0, whole.stderr)
        let summary = whole.json?["admm"] as? [String: Any]
        let kept = try XCTUnwrap(summary?["kept"] as? Int)
        let last = try XCTUnwrap((summary?["rounds"] as? [[String: Any]])?.last?["round"] as? Int)
        // Killed once a block of the last round is done (that round's event names the round kept so far).
        let (_, run) = try killedRun(extra, delay: "0.3") {
            $0["event"] as? String == "block_done" && $0["round"] as? Int == last
        }
        let before = CLI.events(run)
        if kept != last { XCTAssertEqual(before.filter { $0["event"] as? String == "admm_round" }.last?["kept"] as? Int, kept) }
        let r = try CLI.run(["prune", "--resume", run, "--json"])
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertEqual(r.json?["output_sha256"] as? String, whole.json?["output_sha256"] as? String)
        XCTAssertEqual((r.json?["admm"] as? [String: Any])?["kept"] as? Int, kept)
        let events = CLI.events(run)
        XCTAssertFalse(events.contains { $0["event"] as? String == "checkpoint_corrupt" })
        XCTAssertEqual(events.filter { $0["event"] as? String == "admm_round" }.map { $0["round"] as! Int }, Array(1...last))
        if kept != last {
            // Every pruned block's last record is the kept round's (put back from its kept files).
            var latest: [Int: Int] = [:]
            for e in events where e["event"] as? String == "block_done" { latest[e["block"] as! Int] = e["round"] as? Int }
            XCTAssertTrue(latest.values.allSatisfy { $0 == kept }, "\(latest)")
        }
        // The completed run's checkpoints, kept files included, are gone.
        XCTAssertFalse(FileManager.default.fileExists(atPath: run + "/blocks"))
    }
}
