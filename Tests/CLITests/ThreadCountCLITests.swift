import Foundation
import XCTest

/// The output bytes do not depend on `--threads` (issue 12): not in one process, not after a
/// resume at another thread count, not over workers that run different thread counts. On
/// stories260K the products, Hessians and Cholesky factors are large enough to be cut into
/// several tiles and panels (LinalgTests checks each routine's bits on larger shapes).
final class ThreadCountCLITests: XCTestCase {
    let stories = CLI.asset("stories260K/stories260K.bin")
    let storiesTokenizer = CLI.asset("stories260K/tok512.bin")
    let oz = CLI.asset("public-domain-text/wizard_of_oz.txt")

    func pruneArgs(output: String, method: String = "sparsegpt", _ extra: [String] = []) -> [String] {
        ["prune", "--model", stories, "--tokenizer", storiesTokenizer, "--calib", oz, "--calib-samples", "8",
         "--calib-seqlen", "128", "--method", method, "--sparsity", "0.6", "--output", output, "--json"] + extra
    }

    func sha(_ r: CLI.Result) -> String? { r.json?["output_sha256"] as? String }

    func testOutputBytesAreTheSameAtOneTwoAndThreeThreads() throws {
        let dir = try CLI.temporaryDirectory(self)
        for method in ["sparsegpt", "sparsellm", "wanda"] {
            var shas: [String] = []
            for threads in ["1", "2", "3"] {
                let r = try CLI.run(pruneArgs(output: dir.appendingPathComponent("\(method)-\(threads)").path, method: method,
                                              ["--threads", threads]))
                XCTAssertEqual(r.status, 0, r.stderr)
                shas.append(try XCTUnwrap(sha(r)))
            }
            XCTAssertEqual(Set(shas).count, 1, "\(method): sha256 at 1, 2, 3 threads: \(shas)")
        }
    }

    func testARunResumedAtAnotherThreadCountWritesTheSameBytes() throws {
        let dir = try CLI.temporaryDirectory(self)
        let reference = try CLI.run(pruneArgs(output: dir.appendingPathComponent("ref").path, ["--threads", "3"]))
        XCTAssertEqual(reference.status, 0, reference.stderr)
        let out = dir.appendingPathComponent("out").path
        let p = try CLI.start(pruneArgs(output: out, ["--threads", "1"]), environment: ["TOPIARY_DEBUG_BLOCK_DELAY": "0.5"], directory: dir)
        XCTAssertTrue(CLI.waitForEvent(out + ".run") { $0["event"] as? String == "block_done" && $0["block"] as? Int == 1 })
        kill(p.processIdentifier, SIGKILL)
        p.waitUntilExit()
        XCTAssertFalse(FileManager.default.fileExists(atPath: out))
        let resumed = try CLI.run(["prune", "--resume", out + ".run", "--threads", "2", "--json"])
        XCTAssertEqual(resumed.status, 0, resumed.stderr)
        XCTAssertEqual(sha(resumed), try XCTUnwrap(sha(reference)))
        XCTAssertNil(CLI.events(out + ".run").first { $0["event"] as? String == "checkpoint_refused" },
                     "a checkpoint written at 1 thread was refused at 2")
    }

    func testWorkersWithDifferentThreadCountsWriteTheSingleProcessBytes() throws {
        let dir = try CLI.temporaryDirectory(self)
        var workers: [Process] = []
        defer { for w in workers where w.isRunning { w.terminate(); w.waitUntilExit() } }
        var endpoints: [String] = []
        for threads in ["1", "3"] {
            let (p, endpoint) = try CLI.startWorker(["--listen", "127.0.0.1:0", "--threads", threads])
            workers.append(p)
            XCTAssertFalse(endpoint.isEmpty)
            endpoints.append(endpoint)
        }
        let single = try CLI.run(pruneArgs(output: dir.appendingPathComponent("single").path, ["--threads", "2"]))
        XCTAssertEqual(single.status, 0, single.stderr)
        let remote = try CLI.run(pruneArgs(output: dir.appendingPathComponent("remote").path,
                                           ["--hosts", endpoints.joined(separator: ","), "--coordination", "sequential"]))
        XCTAssertEqual(remote.status, 0, remote.stderr)
        XCTAssertEqual((remote.json?["plan"] as? [[String: Any]])?.count, 2)
        XCTAssertEqual(sha(remote), try XCTUnwrap(sha(single)))
    }

    /// End to end on SmolLM2 (576-wide, 1536-wide FFN: every product, Hessian and factor is cut
    /// into many tiles and panels). Before the fix, 1 and 2 threads gave different bytes here.
    func testSmolLM2SparseGPTGivesTheSameBytesAtOneAndThreeThreads() throws {
        let dir = try CLI.temporaryDirectory(self)
        var shas: [String] = []
        for threads in ["1", "3"] {
            let r = try CLI.run(["prune", "--model", CLI.asset("smollm2-135m-instruct-q4_1/SmolLM2-135M-Instruct.Q4_1.gguf"),
                                 "--method", "sparsegpt", "--sparsity", "0.5", "--calib", oz, "--calib-samples", "4",
                                 "--calib-seqlen", "128", "--threads", threads, "--output", dir.appendingPathComponent(threads).path, "--json"],
                                timeout: 900)
            XCTAssertEqual(r.status, 0, r.stderr)
            shas.append(try XCTUnwrap(sha(r)))
        }
        XCTAssertEqual(shas[0], shas[1])
    }
}
