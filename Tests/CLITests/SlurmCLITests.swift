import Foundation
import XCTest

/// The body of cluster/slurm/prune.sbatch run on this machine as Slurm would run it: SLURM_*
/// variables set, a fake `srun` that starts one task per node of SLURM_JOB_NODELIST locally (the
/// nodes are distinct loopback addresses), and a fake `scontrol` that records requeues.
final class SlurmCLITests: XCTestCase {
    let stories = CLI.asset("stories260K/stories260K.bin")
    let storiesTokenizer = CLI.asset("stories260K/tok512.bin")
    let oz = CLI.asset("public-domain-text/wizard_of_oz.txt")

    var pruneOptions: [String] {
        ["--model", stories, "--tokenizer", storiesTokenizer, "--calib", oz, "--calib-samples", "8",
         "--calib-seqlen", "128", "--method", "sparsegpt", "--sparsity", "0.6"]
    }

    func writeExecutable(_ path: URL, _ text: String) throws {
        try text.write(to: path, atomically: true, encoding: .utf8)
        chmod(path.path, 0o755)
    }

    func testSbatchTemplateRunsUnderFakeSlurmAndAPreemptedJobResumesToTheSameWeights() throws {
        let dir = try CLI.temporaryDirectory(self)
        let reference = try CLI.run(["prune"] + pruneOptions + ["--output", dir.appendingPathComponent("ref").path, "--json"])
        XCTAssertEqual(reference.status, 0, reference.stderr)
        let expected = try XCTUnwrap(reference.json?["output_sha256"] as? String)

        let bin = dir.appendingPathComponent("bin")
        try FileManager.default.createDirectory(at: bin, withIntermediateDirectories: true)
        try writeExecutable(bin.appendingPathComponent("srun"), """
        #!/bin/bash
        # fake srun: one task per node of SLURM_JOB_NODELIST, on this machine
        while [ $# -gt 0 ] && [ "${1#--}" != "$1" ]; do shift; done
        pids=()
        i=0
        for node in $("$TOPIARY" hostlist --separator ' '); do
            SLURMD_NODENAME=$node SLURM_PROCID=$i SLURM_NODEID=$i "$@" &
            pids+=($!)
            i=$((i + 1))
        done
        trap 'kill -TERM "${pids[@]}" 2>/dev/null; wait; exit 143' TERM INT
        wait
        """)
        let scontrolLog = dir.appendingPathComponent("scontrol.log")
        try writeExecutable(bin.appendingPathComponent("scontrol"), """
        #!/bin/bash
        echo "$@" >> "\(scontrolLog.path)"
        """)
        let output = dir.appendingPathComponent("pruned").path
        let port = Int.random(in: 20000...40000)
        var env: [String: String] = [
            "PATH": bin.path + ":" + (ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin"),
            "TOPIARY": CLI.binary, "TOPIARY_PORT": "\(port)", "TOPIARY_DEBUG_BLOCK_DELAY": "0.7",
            "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "127.0.0.[1-3]", "SLURM_NNODES": "3", "SLURM_NTASKS": "3",
            "SLURM_SUBMIT_DIR": dir.path, "SLURM_RESTART_COUNT": "0",
        ]
        let script = CLI.repositoryRoot.appendingPathComponent("cluster/slurm/prune.sbatch").path
        let jobDir = dir.appendingPathComponent("topiary-job-4242").path
        let run = jobDir + "/run"

        // First allocation: preempted (SIGTERM to the batch script) after block 1.
        let first = try start(script, pruneOptions + ["--output", output], env: env, dir: dir, log: "first")
        XCTAssertTrue(CLI.waitForEvent(run, { $0["event"] as? String == "block_done" && $0["block"] as? Int == 1 }))
        kill(first.processIdentifier, SIGTERM)
        XCTAssertEqual(CLI.wait(first), 75, log(dir, "first"))
        XCTAssertEqual(try String(contentsOf: scontrolLog, encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines), "requeue 4242")
        XCTAssertFalse(FileManager.default.fileExists(atPath: output))
        var mode = stat()
        XCTAssertEqual(stat(jobDir + "/secret", &mode), 0)
        XCTAssertEqual(mode.st_mode & 0o777, 0o600)
        let plan = CLI.events(run).first { $0["event"] as? String == "start" }?["plan"] as? [[String: Any]] ?? []
        XCTAssertEqual(plan.map { $0["worker"] as? String ?? "" }, (1...3).map { "worker@127.0.0.\($0):\(port)" })

        // The requeued job: same script, same arguments, SLURM_RESTART_COUNT=1.
        env["SLURM_RESTART_COUNT"] = "1"
        env["TOPIARY_DEBUG_BLOCK_DELAY"] = nil
        let second = try start(script, pruneOptions + ["--output", output], env: env, dir: dir, log: "second")
        XCTAssertEqual(CLI.wait(second), 0, log(dir, "second"))
        let events = CLI.events(run)
        XCTAssertEqual(events.first { $0["event"] as? String == "complete" }?["output_sha256"] as? String, expected)
        XCTAssertTrue(events.contains { $0["event"] as? String == "resume" })
        var done: [Int: Int] = [:]
        for e in events where e["event"] as? String == "block_done" { done[e["block"] as! Int, default: 0] += 1 }
        XCTAssertEqual(done, [0: 1, 1: 1, 2: 1, 3: 1, 4: 1])
    }

    /// Several tasks on one node (sbatch --ntasks-per-node=2): each task's worker listens on the
    /// port after the previous task's (SLURM_LOCALID), and --hosts lists every one of them.
    func testHostlistGivesEachTaskOnANodeItsOwnPort() throws {
        let two = try CLI.run(["hostlist", "--nodelist", "n[1-3]", "--tasks-per-node", "2(x2),1", "--port", "7100"])
        XCTAssertEqual(two.status, 0, two.stderr)
        XCTAssertEqual(two.stdout, "n1:7100,n1:7101,n2:7100,n2:7101,n3:7100\n")
        let one = try CLI.run(["hostlist", "--nodelist", "n[1-2]", "--tasks-per-node", "1(x2)", "--port", "7100"])
        XCTAssertEqual(one.stdout, "n1:7100,n2:7100\n")
        let plain = try CLI.run(["hostlist", "--nodelist", "n[1-2]", "--port", "7100"])
        XCTAssertEqual(plain.stdout, "n1:7100,n2:7100\n")

        let mismatch = try CLI.run(["hostlist", "--nodelist", "n[1-3]", "--tasks-per-node", "2", "--port", "7100"])
        XCTAssertEqual(mismatch.status, 1)
        XCTAssertTrue(mismatch.stderr.contains("1 count for 3 hosts"), mismatch.stderr)
        let noPort = try CLI.run(["hostlist", "--nodelist", "n1", "--tasks-per-node", "2"])
        XCTAssertEqual(noPort.status, 2)
        XCTAssertTrue(noPort.stderr.contains("needs --port"), noPort.stderr)
        let tooHigh = try CLI.run(["hostlist", "--nodelist", "n1", "--tasks-per-node", "2", "--port", "65535"])
        XCTAssertEqual(tooHigh.status, 2)
        XCTAssertTrue(tooHigh.stderr.contains("past port 65535"), tooHigh.stderr)
        let bad = try CLI.run(["hostlist", "--nodelist", "n1", "--tasks-per-node", "2(3)", "--port", "7100"])
        XCTAssertEqual(bad.status, 1)
        XCTAssertTrue(bad.stderr.contains("tasks per node"), bad.stderr)
    }

    func start(_ script: String, _ args: [String], env: [String: String], dir: URL, log: String) throws -> Process {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/bin/bash")
        p.arguments = [script] + args
        var environment = ProcessInfo.processInfo.environment
        for (k, v) in env { environment[k] = v }
        for k in ["TOPIARY_DEBUG_BLOCK_DELAY"] where env[k] == nil { environment[k] = nil }
        p.environment = environment
        p.currentDirectoryURL = dir
        let file = dir.appendingPathComponent("\(log).log")
        _ = FileManager.default.createFile(atPath: file.path, contents: nil)
        let handle = try FileHandle(forWritingTo: file)
        p.standardOutput = handle
        p.standardError = handle
        p.standardInput = FileHandle.nullDevice
        try p.run()
        return p
    }

    func log(_ dir: URL, _ name: String) -> String {
        (try? String(contentsOf: dir.appendingPathComponent("\(name).log"), encoding: .utf8)) ?? ""
    }
}
