import Foundation
import XCTest
import TopiaryTestSupport

/// `prune` and `worker` inside a memory control group, as a Slurm job with `--mem` runs them: the
/// default memory budget follows the group's limit, not the machine's memory, and a run whose
/// largest block cannot fit is refused before anything is written. Needs root and cgroup v1's
/// memory hierarchy (this VM's); skipped elsewhere.
final class MemoryLimitCLITests: XCTestCase {
    static let smol = CLI.asset("smollm2-135m-instruct-q4_1/SmolLM2-135M-Instruct.Q4_1.gguf")

    /// SmolLM2 with SparseLLM at 128 x 512 tokens: about 1.9 GB at once (2.01 GB measured).
    static func sparseLLMArgs(output: String) -> [String] {
        ["prune", "--model", smol, "--method", "sparsellm", "--sparsity", "0.5", "--calib", CLI.asset("public-domain-text/wizard_of_oz.txt"),
         "--calib-samples", "128", "--calib-seqlen", "512", "--layers", "0-0", "--output", output]
    }

    /// A child of this process's memory group limited to `bytes`, removed by the caller.
    func memoryGroup(limit bytes: Int) throws -> String {
        let groups = (try? String(contentsOfFile: "/proc/self/cgroup", encoding: .utf8)) ?? ""
        guard let line = groups.split(separator: "\n").first(where: { $0.split(separator: ":").dropFirst().first == "memory" }),
              let own = line.split(separator: ":", maxSplits: 2).last else {
            throw XCTSkip("no cgroup v1 memory hierarchy here")
        }
        let group = "/sys/fs/cgroup/memory" + (own == "/" ? "" : String(own)) + "/topiary-test-\(getpid())-\(bytes)"
        guard (try? FileManager.default.createDirectory(atPath: group, withIntermediateDirectories: false)) != nil else {
            throw XCTSkip("cannot make a memory control group here (needs root)")
        }
        guard let handle = FileHandle(forWritingAtPath: group + "/memory.limit_in_bytes"),
              (try? handle.write(contentsOf: Data("\(bytes)".utf8))) != nil,
              (try? String(contentsOfFile: group + "/memory.limit_in_bytes", encoding: .utf8))?
                .trimmingCharacters(in: .whitespacesAndNewlines) == "\(bytes)" else {
            rmdir(group)
            throw XCTSkip("cannot set a control group's memory limit here")
        }
        try? handle.close()
        // A process must be able to join it (a nested container may let us make it but not move into it).
        let probe = Process()
        probe.executableURL = URL(fileURLWithPath: "/bin/sh")
        probe.arguments = ["-c", "echo $$ > \"$0/cgroup.procs\"", group]
        probe.standardError = FileHandle.nullDevice
        try probe.run()
        probe.waitUntilExit()
        guard probe.terminationStatus == 0 else {
            rmdir(group)
            throw XCTSkip("cannot move a process into a memory control group here")
        }
        return group
    }

    /// `sh` that moves itself into `group`, then runs the rest of its arguments.
    static func launcher(_ group: String) -> [String] {
        ["/bin/sh", "-c", "echo $$ > \"$0/cgroup.procs\" && exec \"$@\"", group]
    }

    /// `topiary args...` inside `group`: its exit status and stderr.
    static func run(in group: String, _ args: [String]) throws -> (status: Int32, stderr: String) {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/bin/sh")
        p.arguments = Array(launcher(group).dropFirst()) + [CLI.binary] + args
        let err = Pipe()
        p.standardError = err
        p.standardOutput = FileHandle.nullDevice
        try p.run()
        let stderr = String(decoding: err.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        p.waitUntilExit()
        return (p.terminationStatus, stderr)
    }

    func testSparseLLMThatCannotFitTheJobsMemoryIsRefusedUpFront() throws {
        let group = try memoryGroup(limit: 1 << 30)
        defer { rmdir(group) }
        let output = try CLI.temporaryDirectory(self).appendingPathComponent("out").path
        let (status, stderr) = try Self.run(in: group, Self.sparseLLMArgs(output: output))
        XCTAssertEqual(status, 1, stderr)
        XCTAssertTrue(stderr.contains("\(Self.smol): sparsellm with 128 x 512 calibration tokens needs at least 1.7 GiB"), stderr)
        XCTAssertTrue(stderr.contains("more than the 1.0 GiB this process may use (\(group)/memory.limit_in_bytes)"), stderr)
        // The default budget is a quarter of the group's 1 GiB, a third of it for each of the two
        // streams kept during the solve: 170.7 MiB, not a quarter of the machine's memory.
        XCTAssertTrue(stderr.contains("activations kept in memory 170.7 MiB"), stderr)
        XCTAssertTrue(stderr.contains("use fewer --calib-samples"), stderr)
        XCTAssertEqual(stderr.split(separator: "\n").count, 1, stderr)
        XCTAssertFalse(FileManager.default.fileExists(atPath: output))
        XCTAssertFalse(FileManager.default.fileExists(atPath: output + ".run"))
    }

    /// A worker on another node (--hosts) checks its own memory when the job is assigned; the
    /// coordinator fails the run with the worker's reason.
    func testAWorkerRefusesAJobItsMemoryCannotHold() throws {
        let group = try memoryGroup(limit: 1 << 30)
        defer { rmdir(group) }
        let dir = try CLI.temporaryDirectory(self)
        let secretFile = dir.appendingPathComponent("secret").path
        try "0123456789abcdef0123456789abcdef".write(toFile: secretFile, atomically: true, encoding: .utf8)
        XCTAssertEqual(chmod(secretFile, 0o600), 0)
        let (worker, endpoint) = try CLI.startWorker(["--listen", "127.0.0.1:0", "--secret-file", secretFile], launcher: Self.launcher(group))
        defer { if worker.isRunning { worker.terminate(); worker.waitUntilExit() } }
        XCTAssertFalse(endpoint.isEmpty)
        let output = dir.appendingPathComponent("out").path
        let r = try CLI.run(Self.sparseLLMArgs(output: output) + ["--hosts", endpoint, "--secret-file", secretFile, "--memory-budget", "6G"])
        XCTAssertEqual(r.status, 1, r.stderr)
        XCTAssertTrue(r.stderr.contains("sparsellm with 128 x 512 calibration tokens needs at least 1.8 GiB"), r.stderr)
        XCTAssertTrue(r.stderr.contains("more than the 1.0 GiB this worker may use (\(group)/memory.limit_in_bytes)"), r.stderr)
        XCTAssertFalse(FileManager.default.fileExists(atPath: output))
    }

    /// A run that fits: its default budget is a quarter of the group's limit, and report.json
    /// records the limit, where it came from, the budget and the count.
    func testTheDefaultBudgetFollowsTheGroupAndIsRecorded() throws {
        let group = try memoryGroup(limit: 2 << 30)
        defer { rmdir(group) }
        let dir = try CLI.temporaryDirectory(self)
        let output = dir.appendingPathComponent("out").path
        let (status, stderr) = try Self.run(in: group, ["prune", "--model", CLI.asset("stories260K/stories260K.bin"),
            "--tokenizer", CLI.asset("stories260K/tok512.bin"), "--calib", CLI.asset("public-domain-text/wizard_of_oz.txt"),
            "--calib-samples", "4", "--calib-seqlen", "64", "--method", "sparsegpt", "--sparsity", "0.5", "--output", output])
        XCTAssertEqual(status, 0, stderr)
        XCTAssertTrue(stderr.contains("; --memory-budget 512.0 MiB; this process may use 2.0 GiB (\(group)/memory.limit_in_bytes)"), stderr)
        let data = try Data(contentsOf: URL(fileURLWithPath: output + "/report.json"))
        let report = try XCTUnwrap(JSONSerialization.jsonObject(with: data) as? [String: Any])
        let memory = try XCTUnwrap(report["memory"] as? [String: Any])
        XCTAssertEqual(memory["limit_bytes"] as? Int, 2 << 30)
        XCTAssertEqual(memory["limit_source"] as? String, group + "/memory.limit_in_bytes")
        XCTAssertEqual(memory["budget_bytes"] as? Int, 512 << 20)
        let counted = try XCTUnwrap(memory["largest_block_at_least_bytes"] as? Int)
        XCTAssertGreaterThan(counted, 0)
        XCTAssertLessThan(counted, try XCTUnwrap(report["peak_rss_bytes"] as? Int))
    }
}
