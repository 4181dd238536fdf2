import Foundation
import XCTest
import TopiaryTestSupport

/// Issue 12, as a careless user would meet it: outputs, run directories and resumes that must
/// never delete what the user owns, nor accept a checkpoint that is not the run's own; each
/// refusal is one line on stderr, and nothing is deleted or written.
enum Safety {
    static let stories = CLI.asset("stories260K/stories260K.bin")
    static let tokenizer = CLI.asset("stories260K/tok512.bin")
    static let oz = CLI.asset("public-domain-text/wizard_of_oz.txt")

    static func pruneArgs(output: String, sparsity: String = "0.6", _ extra: [String] = []) -> [String] {
        ["prune", "--model", stories, "--tokenizer", tokenizer, "--calib", oz, "--calib-samples", "8",
         "--calib-seqlen", "128", "--method", "sparsegpt", "--sparsity", sparsity, "--output", output] + extra
    }

    /// Every file and directory under `root` with its size and contents' hash: equal snapshots
    /// mean nothing was deleted, changed or added.
    static func snapshot(_ root: String) -> [String: String] {
        var result: [String: String] = [:]
        let fm = FileManager.default
        guard let e = fm.enumerator(atPath: root) else { return [:] }
        while let relative = e.nextObject() as? String {
            let path = root + "/" + relative
            var isDirectory: ObjCBool = false
            _ = fm.fileExists(atPath: path, isDirectory: &isDirectory)
            if isDirectory.boolValue { result[relative] = "dir"; continue }
            let data = fm.contents(atPath: path) ?? Data()
            result[relative] = "\(data.count):\(data.hashValue)"
        }
        return result
    }

    /// Runs topiary with `cwd` as its working directory.
    static func run(_ args: [String], cwd: URL, timeout: TimeInterval = 120) throws -> CLI.Result {
        try CLI.run(args, cwd: cwd, timeout: timeout)
    }

    /// The weights' sha256 of an undisturbed run (sparsegpt 0.6), computed once.
    nonisolated(unsafe) static var referenceSHA: String?
    nonisolated(unsafe) static var referenceJSON: [String: Any]?
    static func reference(_ test: XCTestCase) throws -> String {
        if let sha = referenceSHA { return sha }
        let dir = try CLI.temporaryDirectory(test)
        let r = try CLI.run(pruneArgs(output: dir.appendingPathComponent("ref").path, ["--json"]))
        XCTAssertEqual(r.status, 0, r.stderr)
        let sha = try XCTUnwrap(r.json?["output_sha256"] as? String)
        referenceSHA = sha
        referenceJSON = r.json
        return sha
    }

    /// Starts a slowed run and SIGKILLs it once block `block` is checkpointed; returns the run directory.
    static func killedRun(_ test: XCTestCase, sparsity: String = "0.6", after block: Int) throws -> (out: String, run: String) {
        let dir = try CLI.temporaryDirectory(test)
        let out = dir.appendingPathComponent("out").path
        let p = try CLI.start(pruneArgs(output: out, sparsity: sparsity), environment: ["TOPIARY_DEBUG_BLOCK_DELAY": "0.4"], directory: dir)
        XCTAssertTrue(CLI.waitForEvent(out + ".run") { $0["event"] as? String == "block_done" && $0["block"] as? Int == block })
        kill(p.processIdentifier, SIGKILL)
        p.waitUntilExit()
        return (out, out + ".run")
    }

    static func doneCounts(_ run: String) -> [Int: Int] {
        var counts: [Int: Int] = [:]
        for e in CLI.events(run) where e["event"] as? String == "block_done" { counts[e["block"] as! Int, default: 0] += 1 }
        return counts
    }

    static func sha256(_ path: String) throws -> String {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/sha256sum")
        p.arguments = [path]
        let out = Pipe()
        p.standardOutput = out
        try p.run()
        let data = out.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        return String(String(decoding: data, as: UTF8.self).prefix(64))
    }

    /// Appends a copy of the latest `block_done` event of `block` in `from` (another run, or this
    /// one) to `run`'s events, as block `as` with the SHA-256 of the file now at its name.
    static func forgeEvent(run: String, from: String, block: Int, as target: Int) throws {
        var event = try XCTUnwrap(CLI.events(from).last { $0["event"] as? String == "block_done" && $0["block"] as? Int == block })
        event["block"] = target
        event["sha256"] = try sha256(run + String(format: "/blocks/block-%05d.safetensors", target))
        let line = try JSONSerialization.data(withJSONObject: event, options: [.sortedKeys]) + Data("\n".utf8)
        let handle = try XCTUnwrap(FileHandle(forWritingAtPath: run + "/events.jsonl"))
        handle.seekToEndOfFile()
        handle.write(line)
        try handle.close()
    }
}

final class OutputSafetyCLITests: XCTestCase {
    /// `cd P/work; topiary prune ... --output .. --overwrite` deleted everything in P: now every
    /// such output is refused with one line before any work, and nothing is written or deleted.
    func testOutputsThatHoldTheUsersFilesAreRefusedAndNothingIsTouched() throws {
        let root = try CLI.temporaryDirectory(self)
        let p = root.appendingPathComponent("P")
        let work = p.appendingPathComponent("work")
        try FileManager.default.createDirectory(at: work, withIntermediateDirectories: true)
        try "mine".write(to: p.appendingPathComponent("thesis.tex"), atomically: true, encoding: .utf8)
        try "mine too".write(to: work.appendingPathComponent("notes.txt"), atomically: true, encoding: .utf8)
        // A directory holding the model, one holding the calibration text.
        let models = root.appendingPathComponent("models")
        try FileManager.default.createDirectory(at: models, withIntermediateDirectories: true)
        try FileManager.default.copyItem(atPath: Safety.stories, toPath: models.appendingPathComponent("stories.bin").path)
        let texts = root.appendingPathComponent("texts")
        try FileManager.default.createDirectory(at: texts, withIntermediateDirectories: true)
        try FileManager.default.copyItem(atPath: Safety.oz, toPath: texts.appendingPathComponent("oz.txt").path)
        try FileManager.default.createSymbolicLink(atPath: root.appendingPathComponent("link").path, withDestinationPath: p.path)
        let before = Safety.snapshot(root.path)

        let cases: [(args: [String], status: Int32, mentions: [String])] = [
            (Safety.pruneArgs(output: "..", ["--overwrite"]), 2, ["--output '..'"]),
            (Safety.pruneArgs(output: "../", ["--overwrite"]), 2, ["--output '../'"]),
            (Safety.pruneArgs(output: ".", ["--overwrite"]), 2, ["--output '.'"]),
            (Safety.pruneArgs(output: ""), 2, ["--output is empty"]),
            (Safety.pruneArgs(output: "/"), 2, ["--output '/'"]),
            (Safety.pruneArgs(output: p.path, ["--overwrite"]), 1, [p.path, "contains the working directory"]),
            (Safety.pruneArgs(output: work.path, ["--overwrite"]), 1, [work.path, "is the working directory"]),
            (Safety.pruneArgs(output: "../../P", ["--overwrite"]), 1, ["contains the working directory"]),
            (Safety.pruneArgs(output: root.appendingPathComponent("link").path, ["--overwrite"]), 1, ["contains the working directory"]),
            (Safety.pruneArgs(output: root.appendingPathComponent("new").path, ["--run-dir", root.appendingPathComponent("new/run").path]), 1,
             ["contains the run directory"]),
            (["prune", "--model", models.appendingPathComponent("stories.bin").path, "--tokenizer", Safety.tokenizer, "--calib", Safety.oz,
              "--method", "wanda", "--sparsity", "0.5", "--output", models.path, "--overwrite"], 1, [models.path, "contains the model"]),
            (["prune", "--model", Safety.stories, "--tokenizer", Safety.tokenizer, "--calib", texts.appendingPathComponent("oz.txt").path,
              "--method", "wanda", "--sparsity", "0.5", "--output", texts.path, "--overwrite"], 1, [texts.path, "contains the calibration file"]),
            (["convert", "--model", models.appendingPathComponent("stories.bin").path, "--tokenizer", Safety.tokenizer,
              "--output", models.path, "--overwrite"], 1, ["contains the model"]),
            (["convert", "--model", Safety.stories, "--tokenizer", Safety.tokenizer, "--output", "..", "--overwrite"], 2, ["--output '..'"]),
        ]
        for c in cases {
            let r = try Safety.run(c.args, cwd: work)
            XCTAssertEqual(r.status, c.status, "\(c.args): \(r.stderr)")
            XCTAssertEqual(r.stderrLines.count, 1, "\(c.args): \(r.stderr)")
            for m in c.mentions { XCTAssertTrue(r.stderr.contains(m), "'\(m)' not in \(r.stderr)") }
            XCTAssertEqual(Safety.snapshot(root.path), before, "\(c.args) changed files")
        }
    }

    /// --overwrite replaces only a directory Topiary wrote, and only when it holds nothing else.
    func testOverwriteReplacesOnlyWhatTopiaryWrote() throws {
        let dir = try CLI.temporaryDirectory(self)
        let users = dir.appendingPathComponent("users-model").path
        try FileManager.default.createDirectory(atPath: users, withIntermediateDirectories: true)
        for f in ["config.json", "model.safetensors", "report.json"] { try "theirs".write(toFile: users + "/" + f, atomically: true, encoding: .utf8) }
        var before = Safety.snapshot(dir.path)
        let refused = try CLI.run(Safety.pruneArgs(output: users, ["--overwrite"]))
        XCTAssertEqual(refused.status, 1, refused.stderr)
        XCTAssertEqual(refused.stderrLines.count, 1, refused.stderr)
        XCTAssertTrue(refused.stderr.contains("not written by Topiary"), refused.stderr)
        XCTAssertEqual(Safety.snapshot(dir.path), before)

        let ours = dir.appendingPathComponent("ours").path
        let first = try CLI.run(["convert", "--model", Safety.stories, "--tokenizer", Safety.tokenizer, "--output", ours])
        XCTAssertEqual(first.status, 0, first.stderr)
        let marker = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: ours + "/.topiary-output.json"))) as? [String: Any]
        XCTAssertEqual(marker?["format"] as? String, "topiary-output")
        XCTAssertTrue((marker?["files"] as? [String] ?? []).contains("model.safetensors"))
        // A file the user added makes it theirs as well: refused, naming the file.
        try "my results".write(toFile: ours + "/results.md", atomically: true, encoding: .utf8)
        before = Safety.snapshot(dir.path)
        let mixed = try CLI.run(Safety.pruneArgs(output: ours, ["--overwrite"]))
        XCTAssertEqual(mixed.status, 1, mixed.stderr)
        XCTAssertEqual(mixed.stderrLines.count, 1, mixed.stderr)
        XCTAssertTrue(mixed.stderr.contains("results.md"), mixed.stderr)
        XCTAssertEqual(Safety.snapshot(dir.path), before)
        // Without it, Topiary's own output is replaced.
        try FileManager.default.removeItem(atPath: ours + "/results.md")
        let replaced = try CLI.run(Safety.pruneArgs(output: ours, ["--overwrite", "--json"]))
        XCTAssertEqual(replaced.status, 0, replaced.stderr)
        XCTAssertTrue(FileManager.default.fileExists(atPath: ours + "/report.json"))
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: dir.path).sorted(), ["ours", "ours.run", "users-model"])
    }
}

final class RunDirectorySafetyCLITests: XCTestCase {
    /// A new run with --run-dir D, D a directory of the user's, deleted D/blocks and D/boundaries.
    func testAnExistingDirectoryThatIsNotARunDirectoryIsRefused() throws {
        let dir = try CLI.temporaryDirectory(self)
        let d = dir.appendingPathComponent("D").path
        for sub in ["blocks", "boundaries"] {
            try FileManager.default.createDirectory(atPath: d + "/" + sub, withIntermediateDirectories: true)
            try "mine".write(toFile: d + "/\(sub)/keep.txt", atomically: true, encoding: .utf8)
        }
        try "x".write(toFile: d + "/blocks/block-00000.safetensors", atomically: true, encoding: .utf8)
        let before = Safety.snapshot(dir.path)
        let r = try CLI.run(Safety.pruneArgs(output: dir.appendingPathComponent("out").path, ["--run-dir", d]))
        XCTAssertEqual(r.status, 1, r.stderr)
        XCTAssertEqual(r.stderrLines.count, 1, r.stderr)
        XCTAssertTrue(r.stderr.contains(d) && r.stderr.contains("not a Topiary run directory"), r.stderr)
        XCTAssertEqual(Safety.snapshot(dir.path), before)
    }

    func testResumeOfAMissingDirectoryCreatesNothing() throws {
        let dir = try CLI.temporaryDirectory(self)
        let missing = dir.appendingPathComponent("no-such-run").path
        let r = try CLI.run(["prune", "--resume", missing])
        XCTAssertEqual(r.status, 1, r.stderr)
        XCTAssertEqual(r.stderrLines.count, 1, r.stderr)
        XCTAssertTrue(r.stderr.contains(missing) && r.stderr.contains("no such run directory"), r.stderr)
        XCTAssertFalse(FileManager.default.fileExists(atPath: missing))
        // An empty directory is no run either, and stays empty.
        try FileManager.default.createDirectory(atPath: missing, withIntermediateDirectories: true)
        let empty = try CLI.run(["prune", "--resume", missing])
        XCTAssertEqual(empty.status, 1, empty.stderr)
        XCTAssertEqual(empty.stderrLines.count, 1, empty.stderr)
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: missing), [])
    }

    /// Two concurrent --resume runs on one directory: the second is refused by the lock, naming
    /// the holder; the first ends with the undisturbed bytes and no block pruned twice.
    func testASecondProcessOnARunDirectoryIsRefusedByTheLock() throws {
        let expected = try Safety.reference(self)
        let (_, run) = try Safety.killedRun(self, after: 1)
        let dir = URL(fileURLWithPath: run).deletingLastPathComponent()
        let first = try CLI.start(["prune", "--resume", run, "--json"], environment: ["TOPIARY_DEBUG_BLOCK_DELAY": "0.7"], directory: dir)
        XCTAssertTrue(CLI.waitForEvent(run) { $0["event"] as? String == "resume" })
        let eventsBefore = try Data(contentsOf: URL(fileURLWithPath: run + "/events.jsonl"))
        let second = try CLI.run(["prune", "--resume", run, "--json"])
        XCTAssertEqual(second.status, 1, second.stderr)
        XCTAssertEqual(second.stderrLines.count, 1, second.stderr)
        XCTAssertTrue(second.stderr.contains("in use by another topiary prune"), second.stderr)
        XCTAssertTrue(second.stderr.contains("pid \(first.processIdentifier)"), second.stderr)
        // A new run in the same directory is refused as well.
        let third = try CLI.run(Safety.pruneArgs(output: dir.appendingPathComponent("other").path, ["--run-dir", run]))
        XCTAssertEqual(third.status, 1, third.stderr)
        XCTAssertEqual(third.stderrLines.count, 1, third.stderr)
        let eventsAfter = try Data(contentsOf: URL(fileURLWithPath: run + "/events.jsonl"))
        XCTAssertEqual(eventsAfter.prefix(eventsBefore.count), eventsBefore, "the refused process wrote to the run")
        XCTAssertEqual(CLI.wait(first), 0)
        let stdout = try String(contentsOf: dir.appendingPathComponent("stdout.txt"), encoding: .utf8)
        XCTAssertTrue(stdout.contains(expected), stdout)
        XCTAssertEqual(Safety.doneCounts(run), [0: 1, 1: 1, 2: 1, 3: 1, 4: 1])
    }

    /// Edits to run.json (here: its sparsity) are refused on resume; nothing is written.
    func testAnEditedRunJSONIsRefused() throws {
        let (_, run) = try Safety.killedRun(self, after: 1)
        let path = run + "/run.json"
        let text = try String(contentsOfFile: path, encoding: .utf8)
        XCTAssertTrue(text.contains("\"sparsity\" : \"0.6\""))
        try text.replacingOccurrences(of: "\"sparsity\" : \"0.6\"", with: "\"sparsity\" : \"0.7\"").write(toFile: path, atomically: true, encoding: .utf8)
        let before = Safety.snapshot(run)
        let r = try CLI.run(["prune", "--resume", run])
        XCTAssertEqual(r.status, 1, r.stderr)
        XCTAssertEqual(r.stderrLines.count, 1, r.stderr)
        XCTAssertTrue(r.stderr.contains("run.json") && r.stderr.contains("checksum"), r.stderr)
        XCTAssertEqual(Safety.snapshot(run).filter { $0.key != "run.lock" }, before.filter { $0.key != "run.lock" })
    }

    /// A block checkpoint copied to another block's name, with a matching event: refused (an
    /// event naming why), redone, and the output is the undisturbed one.
    func testABlockCopiedToAnotherBlocksNameIsRefusedAndRedone() throws {
        let expected = try Safety.reference(self)
        let (_, run) = try Safety.killedRun(self, after: 2)
        try FileManager.default.removeItem(atPath: run + "/blocks/block-00001.safetensors")
        try FileManager.default.copyItem(atPath: run + "/blocks/block-00000.safetensors", toPath: run + "/blocks/block-00001.safetensors")
        try Safety.forgeEvent(run: run, from: run, block: 1, as: 1)
        let recorded = Safety.doneCounts(run)
        let r = try CLI.run(["prune", "--resume", run, "--json"])
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertEqual(r.json?["output_sha256"] as? String, expected)
        let refused = try XCTUnwrap(CLI.events(run).first { $0["event"] as? String == "checkpoint_refused" }, "no checkpoint_refused event")
        XCTAssertEqual(refused["block"] as? Int, 1)
        XCTAssertTrue((refused["reason"] as? String ?? "").contains("block 0"), "\(refused)")
        XCTAssertFalse(CLI.events(run).contains { $0["event"] as? String == "checkpoint_corrupt" })
        XCTAssertEqual(Safety.doneCounts(run)[1], recorded[1]! + 1, "block 1 is redone")
        XCTAssertEqual(Safety.doneCounts(run)[0], 1, "block 0 is not")
    }

    /// A block checkpoint (with its event) taken from a run at another sparsity: refused, redone.
    func testABlockFromARunAtAnotherSparsityIsRefusedAndRedone() throws {
        let expected = try Safety.reference(self)
        let (_, run) = try Safety.killedRun(self, after: 2)
        let (_, other) = try Safety.killedRun(self, sparsity: "0.5", after: 1)
        let name = "/blocks/block-00001.safetensors"
        try FileManager.default.removeItem(atPath: run + name)
        try FileManager.default.copyItem(atPath: other + name, toPath: run + name)
        try Safety.forgeEvent(run: run, from: other, block: 1, as: 1)
        let recorded = Safety.doneCounts(run)
        let r = try CLI.run(["prune", "--resume", run, "--json"])
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertEqual(r.json?["output_sha256"] as? String, expected)
        XCTAssertEqual(r.json?["sparsity"] as? Double ?? 0, 0.6, accuracy: 0.005)
        let refused = try XCTUnwrap(CLI.events(run).first { $0["event"] as? String == "checkpoint_refused" }, "no checkpoint_refused event")
        XCTAssertEqual(refused["block"] as? Int, 1)
        XCTAssertTrue((refused["reason"] as? String ?? "").contains("another run"), "\(refused)")
        XCTAssertEqual(Safety.doneCounts(run)[1], recorded[1]! + 1, "block 1 is redone")
        XCTAssertEqual(Safety.doneCounts(run)[0], 1, "block 0 is not")
    }

    /// A complete run whose output is gone: --resume says so and exits 1 (not "already complete", 0).
    func testACompleteRunWhoseOutputIsGoneSaysSo() throws {
        let dir = try CLI.temporaryDirectory(self)
        let out = dir.appendingPathComponent("out").path
        let r = try CLI.run(Safety.pruneArgs(output: out))
        XCTAssertEqual(r.status, 0, r.stderr)
        let done = try CLI.run(["prune", "--resume", out + ".run"])
        XCTAssertEqual(done.status, 0, done.stderr)
        XCTAssertTrue(done.stdout.contains("already complete"))
        try FileManager.default.removeItem(atPath: out)
        let before = Safety.snapshot(dir.path)
        let gone = try CLI.run(["prune", "--resume", out + ".run"])
        XCTAssertEqual(gone.status, 1, gone.stderr)
        XCTAssertEqual(gone.stderrLines.count, 1, gone.stderr)
        XCTAssertTrue(gone.stderr.contains(out) && gone.stderr.contains("gone"), gone.stderr)
        XCTAssertFalse(gone.stdout.contains("already complete"))
        XCTAssertEqual(Safety.snapshot(dir.path).filter { !$0.key.hasSuffix("run.lock") }, before.filter { !$0.key.hasSuffix("run.lock") })
        // The same command again (a new run) reuses the run directory and writes the output.
        let again = try CLI.run(Safety.pruneArgs(output: out))
        XCTAssertEqual(again.status, 0, again.stderr)
        XCTAssertTrue(FileManager.default.fileExists(atPath: out + "/model.safetensors"))
    }
}

final class CommandLineLimitsCLITests: XCTestCase {
    /// Values that trapped, aborted on allocation or spawned without end: each is refused with one
    /// line naming the option, before anything is written.
    func testNumericOptionsAreRangeChecked() throws {
        let dir = try CLI.temporaryDirectory(self)
        let out = dir.appendingPathComponent("out").path
        let base = ["prune", "--model", Safety.stories, "--tokenizer", Safety.tokenizer, "--calib", Safety.oz, "--output", out]
        let cases: [([String], String)] = [
            (["--method", "wanda", "--sparsity", "0.5", "--threads", "2147483648"], "--threads"),
            (["--method", "wanda", "--sparsity", "0.5", "--threads", "0"], "--threads"),
            (["--method", "wanda", "--sparsity", "0.5", "--memory-budget", "9999999999G"], "--memory-budget"),
            (["--method", "wanda", "--sparsity", "0.5", "--hosts", ""], "--hosts"),
            (["--method", "wanda", "--sparsity", "0.5", "--hosts", "127.0.0.1:7000,"], "--hosts"),
            (["--method", "wanda", "--pattern", "2:1099511627776"], "--pattern"),
            (["--method", "wanda", "--pattern", "2:99999999999999999999999"], "--pattern"),
            (["--method", "wanda", "--sparsity", "0.5", "--calib-samples", "1099511627776"], "--calib-samples"),
            (["--method", "sparsegpt", "--sparsity", "0.5", "--blocksize", "1099511627776"], "--blocksize"),
            (["--method", "wanda", "--sparsity", "0.5", "--workers", "1099511627776"], "--workers"),
            (["--method", "wanda", "--sparsity", "0.5", "--workers", "6"], "--workers"),
            (["--method", "wanda", "--sparsity", "0.5", "--calib-seqlen", "1099511627776"], "--calib-seqlen"),
            (["--method", "wanda", "--sparsity", "0.5", "--eval-text", Safety.oz, "--eval-seqlen", "1099511627776"], "--eval-seqlen"),
            (["--method", "wanda", "--sparsity", "0.5", "--connect-timeout", "1e300"], "--connect-timeout"),
            (["--method", "wanda", "--sparsity", "0.5", "--heartbeat-timeout", "1e300"], "--heartbeat-timeout"),
            (["--method", "sparsellm", "--sparsity", "0.5", "--iterations", "1099511627776"], "--iterations"),
            (["--method", "wanda", "--sparsity", "0.5", "--coordination", "admm", "--rounds", "1099511627776"], "--rounds"),
            (["--method", "besa", "--sparsity", "0.5", "--besa-epochs", "1099511627776"], "--besa-epochs"),
            (["--method", "wanda", "--sparsity", "0.5", "--layers", "0-99"], "--layers"),
            (["--method", "wanda", "--sparsity", "0.5", "--blocksize", "64"], "--blocksize"),
        ]
        for (args, option) in cases {
            let started = Date()
            let r = try CLI.run(base + args, timeout: 60)
            XCTAssertEqual(r.status, 2, "\(args): \(r.stderr)")
            XCTAssertEqual(r.stderrLines.count, 1, "\(args): \(r.stderr)")
            XCTAssertTrue(r.stderr.contains(option), "\(args): \(r.stderr)")
            XCTAssertLessThan(Date().timeIntervalSince(started), 30, "\(args)")
            XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: dir.path), [], "\(args) wrote files")
        }
        for args in [["eval", "--model", Safety.stories, "--tokenizer", Safety.tokenizer, "--text", Safety.oz, "--threads", "2147483648"],
                     ["generate", "--model", Safety.stories, "--tokenizer", Safety.tokenizer, "--threads", "99999"]] {
            let r = try CLI.run(args, timeout: 60)
            XCTAssertEqual(r.status, 2, "\(args): \(r.stderr)")
            XCTAssertTrue(r.stderr.contains("--threads"), r.stderr)
        }
    }

    /// "Did you mean" for near misses of options and commands, and for a percentage as --sparsity.
    func testNearMissesGetADidYouMean() throws {
        let dir = try CLI.temporaryDirectory(self)
        let base = ["prune", "--model", Safety.stories, "--tokenizer", Safety.tokenizer, "--calib", Safety.oz,
                    "--output", dir.appendingPathComponent("out").path, "--method", "wanda"]
        let cases: [([String], [String])] = [
            (base + ["--sparsity", "70"], ["--sparsity", "did you mean --sparsity 0.7"]),
            (base + ["--sparsity", "50%"], ["did you mean --sparsity 0.5"]),
            (base + ["--sparsity", "1.2"], ["between 0 and 1"]),
            (base + ["--sparsty", "0.5"], ["'--sparsty'", "did you mean '--sparsity'"]),
            (base + ["--sparsity", "0.5", "--calib-sample", "8"], ["did you mean '--calib-samples'"]),
            (base + ["--sparsity", "0.5", "--ovewrite"], ["did you mean '--overwrite'"]),
            (["prun"] + Array(base.dropFirst()), ["did you mean 'prune'"]),
        ]
        for (args, mentions) in cases {
            let r = try CLI.run(args, timeout: 60)
            XCTAssertEqual(r.status, 2, "\(args): \(r.stderr)")
            XCTAssertEqual(r.stderrLines.count, 1, r.stderr)
            for m in mentions { XCTAssertTrue(r.stderr.contains(m), "'\(m)' not in \(r.stderr)") }
        }
        // Far from every option: no guess.
        let far = try CLI.run(base + ["--sparsity", "0.5", "--zzzzzzzz", "1"])
        XCTAssertEqual(far.status, 2)
        XCTAssertFalse(far.stderr.contains("did you mean"), far.stderr)
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: dir.path), [])
    }

    /// A prompt longer than the model's context printed nothing and exited 0.
    func testGenerateWithAPromptLongerThanTheContextIsAnError() throws {
        let prompt = Array(repeating: "Dorothy lived in the midst of the great Kansas prairies.", count: 80).joined(separator: " ")
        let r = try CLI.run(["generate", "--model", Safety.stories, "--tokenizer", Safety.tokenizer, "--prompt", prompt, "--json"])
        XCTAssertEqual(r.status, 1, r.stderr)
        XCTAssertEqual(r.stderrLines.count, 1, r.stderr)
        XCTAssertTrue(r.stderr.contains("context of 512 tokens"), r.stderr)
        XCTAssertNotNil(r.stderr.range(of: #"the prompt is \d+ tokens"#, options: .regularExpression), r.stderr)
        // --json always ends with an object: here the error's.
        XCTAssertEqual(r.stdout.split(separator: "\n").count, 1, r.stdout)
        XCTAssertTrue((r.json?["error"] as? String ?? "").contains("context of 512 tokens"), r.stdout)
        // A short prompt still works.
        let ok = try CLI.run(["generate", "--model", Safety.stories, "--tokenizer", Safety.tokenizer, "--prompt", "Once", "--max-tokens", "4"])
        XCTAssertEqual(ok.status, 0, ok.stderr)
    }

    func testHelpPruneListsBESAAndWeights() throws {
        let help = try CLI.run(["help", "prune"])
        XCTAssertEqual(help.status, 0)
        let usage = help.stdout.components(separatedBy: "\n\n")[1]
        XCTAssertTrue(usage.contains("--weights path|send"), usage)
        XCTAssertTrue(usage.contains("magnitude|wanda|sparsegpt|sparsellm|besa"), usage)
        let method = try XCTUnwrap(help.stdout.split(separator: "\n").first { $0.hasPrefix("  --method ") })
        XCTAssertTrue(method.contains("besa"), String(method))
        XCTAssertTrue(help.stdout.contains("  --weights HOW"))
    }
}

// <stdlib.h>'s pseudo-terminal calls, which Glibc's module leaves out (they need _XOPEN_SOURCE).
@_silgen_name("posix_openpt") func pty_posix_openpt(_ flags: Int32) -> Int32
@_silgen_name("grantpt") func pty_grantpt(_ fd: Int32) -> Int32
@_silgen_name("unlockpt") func pty_unlockpt(_ fd: Int32) -> Int32
@_silgen_name("ptsname_r") func pty_ptsname_r(_ fd: Int32, _ buffer: UnsafeMutablePointer<CChar>, _ size: Int) -> Int32

/// The smaller points a new user met: ETA after a resume, SIGINT on the progress line, report
/// fields, plurals, BESA's block sparsity.
final class NewUserCLITests: XCTestCase {
    func testReportNamesThePatternAndOnlyTheMethodsOptions() throws {
        _ = try Safety.reference(self)
        let sparsegpt = try XCTUnwrap(Safety.referenceJSON)
        XCTAssertEqual(sparsegpt["pattern"] as? String, "unstructured")
        XCTAssertEqual(sparsegpt["target_sparsity"] as? Double, 0.6)
        XCTAssertNotNil(sparsegpt["sparsegpt"] as? [String: Any])

        let dir = try CLI.temporaryDirectory(self)
        let out = dir.appendingPathComponent("wanda").path
        let r = try CLI.run(["prune", "--model", Safety.stories, "--tokenizer", Safety.tokenizer, "--calib", Safety.oz,
                             "--calib-samples", "1", "--calib-seqlen", "64", "--method", "wanda", "--pattern", "2:4",
                             "--output", out, "--json"])
        XCTAssertEqual(r.status, 0, r.stderr)
        let json = try XCTUnwrap(r.json)
        XCTAssertEqual(json["pattern"] as? String, "2:4")
        XCTAssertEqual(json["target_sparsity"] as? Double, 0.5)
        XCTAssertNil(json["sparsegpt"], "a Wanda run reports SparseGPT settings")
        let report = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: out + "/report.json"))) as! [String: Any]
        XCTAssertNil(report["sparsegpt"])
        XCTAssertEqual(report["pattern"] as? String, "2:4")
        XCTAssertTrue(r.stderr.contains("1 calibration window of 64 tokens"), r.stderr)
        XCTAssertFalse(r.stderr.contains("1 calibration windows"), r.stderr)
    }

    /// The table's per-block sparsity is the block's (weighted by each linear's size).
    func testBESABlockSparsityIsWeightedByParameters() throws {
        let out = try CLI.temporaryDirectory(self).appendingPathComponent("besa").path
        let r = try CLI.run(["prune", "--model", Safety.stories, "--tokenizer", Safety.tokenizer, "--calib", Safety.oz,
                             "--calib-samples", "2", "--calib-seqlen", "64", "--method", "besa", "--sparsity", "0.5",
                             "--output", out, "--json"])
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertNil(r.json?["sparsegpt"], "a BESA run without --besa-reconstruct reports SparseGPT settings")
        let report = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: out + "/report.json"))) as! [String: Any]
        let rows = r.stdout.split(separator: "\n").drop { !$0.hasPrefix("block  sparsity") }.dropFirst().prefix(5)
        XCTAssertEqual(rows.count, 5, r.stdout)
        var differs = false
        for (row, block) in zip(rows, report["blocks"] as! [[String: Any]]) {
            let printed = try XCTUnwrap(Double(row.split(separator: " ")[1]))
            var zeros = 0.0, total = 0.0, mean = 0.0
            let linears = block["linears"] as! [[String: Any]]
            for l in linears {
                let size = Double((l["rows"] as! Int) * (l["columns"] as! Int))
                zeros += ((l["sparsity"] as! Double) * size).rounded()
                total += size
                mean += (l["sparsity"] as! Double) / Double(linears.count)
            }
            XCTAssertEqual(printed, zeros / total, accuracy: 0.00006, "block \(block["block"]!)")
            if abs(mean - zeros / total) > 0.0002 { differs = true }
        }
        XCTAssertTrue(differs, "the weighted and the unweighted sparsity agree here; the test cannot tell them apart")
    }

    /// After a resume the ETA counts only the blocks still to prune, at the pace of pruned blocks.
    func testETAAfterAResumeDoesNotCountReplayedBlocks() throws {
        let (_, run) = try Safety.killedRun(self, after: 1)
        // Exactly blocks 0 and 1 finished: later ones (if any) are forgotten and redone.
        let log = run + "/events.jsonl"
        let kept = try String(contentsOfFile: log, encoding: .utf8).split(separator: "\n").filter { line in
            let e = (try? JSONSerialization.jsonObject(with: Data(line.utf8))) as? [String: Any]
            return !(e?["event"] as? String == "block_done" && (e?["block"] as? Int ?? 0) > 1)
        }
        try (kept.joined(separator: "\n") + "\n").write(toFile: log, atomically: true, encoding: .utf8)
        let finished = Set(Safety.doneCounts(run).keys)
        XCTAssertEqual(finished, [0, 1])
        let dir = URL(fileURLWithPath: run).deletingLastPathComponent()
        let delay = 2.0
        let p = try CLI.start(["prune", "--resume", run], environment: ["TOPIARY_DEBUG_BLOCK_DELAY": "\(delay)"], directory: dir)
        XCTAssertEqual(CLI.wait(p), 0)
        let stderr = try String(contentsOf: dir.appendingPathComponent("stderr.txt"), encoding: .utf8)
        let progress = stderr.split(separator: "\n").compactMap { try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any] }
            .filter { $0["event"] as? String == "block" }
        XCTAssertEqual(progress.count, 5, stderr)
        for e in progress where finished.contains(e["block"] as! Int) { XCTAssertEqual(e["replayed"] as? Bool, true, "\(e)") }
        let work = progress.filter { $0["replayed"] as? Bool == false }
        XCTAssertEqual(work.count, 5 - finished.count)
        // The worker waits `delay` after each block it reports, so the second pruned block is the
        // first whose time includes a wait: two pruned blocks took at least `delay`, and one is
        // left. Counting the two replayed blocks as done gave at most (delay + pruning) / 4.
        guard work.count == 3 else { return XCTFail("expected blocks 2, 3, 4 pruned after the resume: \(progress)") }
        let second = work[1]
        let remaining = Double(work.count - 2)
        XCTAssertEqual(remaining, 1)
        let eta = try XCTUnwrap(second["eta"] as? Double, "\(second)")
        XCTAssertGreaterThanOrEqual(eta, 0.45 * delay * remaining, "\(second)")
        XCTAssertEqual(work.last?["eta"] as? Double, 0)
    }

    /// SIGINT's message starts on a line of its own, not after the progress bar.
    func testSIGINTMessageIsNotPrintedOnTheProgressBarLine() throws {
        let master = pty_posix_openpt(O_RDWR | O_NOCTTY)
        var name = [CChar](repeating: 0, count: 128)
        guard master >= 0, pty_grantpt(master) == 0, pty_unlockpt(master) == 0, pty_ptsname_r(master, &name, name.count) == 0 else {
            throw XCTSkip("no pseudo-terminal here")
        }
        let slave = open(String(decoding: name.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self), O_RDWR | O_NOCTTY)
        XCTAssertGreaterThanOrEqual(slave, 0)
        let dir = try CLI.temporaryDirectory(self)
        let out = dir.appendingPathComponent("out").path
        let p = Process()
        p.executableURL = URL(fileURLWithPath: CLI.binary)
        p.arguments = Safety.pruneArgs(output: out)
        var env = ProcessInfo.processInfo.environment
        env["TOPIARY_DEBUG_BLOCK_DELAY"] = "0.5"
        p.environment = env
        p.standardInput = FileHandle.nullDevice
        p.standardOutput = FileHandle.nullDevice
        p.standardError = FileHandle(fileDescriptor: slave, closeOnDealloc: false)
        try p.run()
        close(slave)
        nonisolated(unsafe) var text = Data()
        let reader = DispatchGroup()
        DispatchQueue.global().async(group: reader) {
            var buffer = [UInt8](repeating: 0, count: 4096)
            while true {
                let n = read(master, &buffer, buffer.count)
                if n <= 0 { break }
                text.append(contentsOf: buffer[0..<n])
            }
        }
        XCTAssertTrue(CLI.waitForEvent(out + ".run") { $0["event"] as? String == "block_done" && $0["block"] as? Int == 1 })
        usleep(200_000)
        kill(p.processIdentifier, SIGINT)
        XCTAssertEqual(CLI.wait(p), 75)
        XCTAssertEqual(reader.wait(timeout: .now() + 10), .success)
        close(master)
        let output = String(decoding: text, as: UTF8.self)
        XCTAssertTrue(output.contains("[#"), "no progress bar on the terminal: \(output)")
        let message = try XCTUnwrap(output.range(of: "topiary prune: SIGINT"), output)
        let before = output[..<message.lowerBound]
        // (The terminal turns "\n" into "\r\n"; compare bytes, as "\r\n" is one Character.)
        XCTAssertEqual(before.utf8.last, UInt8(ascii: "\n"), "the SIGINT message shares the progress bar's line: \(output.debugDescription)")
    }
}
