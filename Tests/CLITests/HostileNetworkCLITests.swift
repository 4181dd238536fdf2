import Foundation
import XCTest
import TopiaryTestSupport

/// The worker and the coordinator as processes, against peers that are idle, slow, hostile or
/// silent, and secrets that must be refused. Loopback only; every wait is bounded.
final class HostileNetworkCLITests: XCTestCase {
    func pruneArgs(_ out: String) -> [String] {
        ["prune", "--model", CLI.asset("stories260K/stories260K.bin"), "--tokenizer", CLI.asset("stories260K/tok512.bin"),
         "--method", "sparsegpt", "--sparsity", "0.6", "--calib", CLI.asset("public-domain-text/wizard_of_oz.txt"),
         "--calib-samples", "8", "--calib-seqlen", "128", "--output", out, "--json"]
    }

    /// A TCP connection to 127.0.0.1:port as a plain descriptor (no protocol at all).
    func rawConnect(_ endpoint: String) throws -> Int32 {
        let port = try XCTUnwrap(UInt16(endpoint.split(separator: ":").last.map(String.init) ?? ""))
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = port.bigEndian
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        let rc = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
        XCTAssertEqual(rc, 0, "connect to \(endpoint)")
        return fd
    }

    /// A listening socket that never accepts (the kernel completes connections into its
    /// backlog, so connecting succeeds and nothing ever answers); returns it and its port.
    func silentListener() throws -> (Int32, UInt16) {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = 0
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        XCTAssertEqual(withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, len) } }, 0)
        XCTAssertEqual(listen(fd, 16), 0)
        _ = withUnsafeMutablePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) } }
        return (fd, UInt16(bigEndian: addr.sin_port))
    }

    func writeSecret(_ bytes: [UInt8], mode: mode_t, at path: String) {
        XCTAssertTrue(FileManager.default.createFile(atPath: path, contents: Data(bytes)))
        XCTAssertEqual(chmod(path, mode), 0)
    }

    /// The acceptance case: a worker with an idle, a slow (one byte a second) and a garbage
    /// connection open still serves a legitimate `prune --hosts` run at once, which ends with
    /// the single-process sha256.
    func testWorkerWithIdleSlowAndGarbageConnectionsServesAPruneRun() throws {
        let dir = try CLI.temporaryDirectory(self)
        let secretFile = dir.appendingPathComponent("secret").path
        writeSecret(Array("hostile-network-test-secret-0123456789".utf8), mode: 0o600, at: secretFile)
        let (worker, endpoint) = try CLI.startWorker(["--listen", "127.0.0.1:0", "--secret-file", secretFile])
        defer { if worker.isRunning { worker.terminate(); worker.waitUntilExit() } }
        XCTAssertFalse(endpoint.isEmpty)

        let idle = try rawConnect(endpoint)
        defer { close(idle) }
        let garbage = try rawConnect(endpoint)
        defer { close(garbage) }
        var junk = SplitMix(seed: 12)
        let bytes = (0..<4096).map { _ in UInt8(truncatingIfNeeded: junk.next()) }
        _ = bytes.withUnsafeBytes { send(garbage, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
        let slow = try rawConnect(endpoint)
        defer { close(slow) }
        final class Flag: @unchecked Sendable { var value = false }
        let stop = Flag()
        let trickle = DispatchGroup()
        DispatchQueue.global().async(group: trickle) {
            // The start of a hello frame ("TPRY", version 1, type 1, 45 payload bytes), a byte a
            // second, until the worker hangs up or the test ends.
            let header: [UInt8] = Array("TPRY".utf8) + [1, 0, 1, 0, 0, 0, 0, 0, 45, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0] + Array(repeating: 0, count: 45)
            for var b in header where !stop.value {
                if send(slow, &b, 1, Int32(MSG_NOSIGNAL)) != 1 { return }
                Thread.sleep(forTimeInterval: 1)
            }
        }
        defer { stop.value = true; _ = trickle.wait(timeout: .now() + 5) }
        usleep(300_000)

        let single = try CLI.run(pruneArgs(dir.appendingPathComponent("single").path))
        XCTAssertEqual(single.status, 0, single.stderr)
        let started = Date()
        let remote = try CLI.run(pruneArgs(dir.appendingPathComponent("remote").path) +
                                 ["--hosts", endpoint, "--secret-file", secretFile, "--connect-timeout", "5", "--heartbeat-timeout", "10"],
                                 timeout: 120)
        XCTAssertEqual(remote.status, 0, remote.stderr)
        XCTAssertEqual(remote.json?["output_sha256"] as? String, single.json?["output_sha256"] as? String)
        XCTAssertNotNil(single.json?["output_sha256"] as? String)
        XCTAssertTrue(remote.stderr.contains("on worker@\(endpoint)"), remote.stderr)
        XCTAssertLessThan(Date().timeIntervalSince(started), 60)
        XCTAssertTrue(worker.isRunning, "the worker died")
    }

    /// Against a listener that accepts and never answers, `prune --hosts` fails at its
    /// --connect-timeout, naming the worker and the phase, instead of waiting.
    func testPruneAgainstASilentListenerFailsWithinItsTimeouts() throws {
        let dir = try CLI.temporaryDirectory(self)
        let (fd, port) = try silentListener()
        defer { close(fd) }
        let started = Date()
        let r = try CLI.run(pruneArgs(dir.appendingPathComponent("out").path) +
                            ["--hosts", "127.0.0.1:\(port)", "--connect-timeout", "5", "--heartbeat-timeout", "10"], timeout: 60)
        let seconds = Date().timeIntervalSince(started)
        XCTAssertEqual(r.status, 1, r.stderr)
        XCTAssertTrue(r.stderr.contains("worker 127.0.0.1:\(port): handshake: the handshake did not complete within 5 s"), r.stderr)
        XCTAssertGreaterThan(seconds, 4)
        XCTAssertLessThan(seconds, 20, "took \(seconds) s")
        // Nothing listening at all: the connect phase, named, within --connect-timeout.
        let closed = try CLI.run(pruneArgs(dir.appendingPathComponent("out2").path) + ["--hosts", "127.0.0.1:1", "--connect-timeout", "2"], timeout: 60)
        XCTAssertEqual(closed.status, 1, closed.stderr)
        XCTAssertTrue(closed.stderr.contains("worker 127.0.0.1:1: connect: cannot reach it within 2 s"), closed.stderr)
    }

    /// Secret files: 0644 refused naming the mode, too short refused, binary secrets that differ
    /// (in bytes that are not UTF-8) refused, one trailing newline not part of the secret.
    func testSecretFilesAreBytesAndMustBePrivate() throws {
        let dir = try CLI.temporaryDirectory(self)
        let open = dir.appendingPathComponent("open").path
        writeSecret(Array("0123456789abcdef0123456789abcdef".utf8), mode: 0o644, at: open)
        let w = try CLI.run(["worker", "--listen", "127.0.0.1:0", "--secret-file", open], timeout: 30)
        XCTAssertEqual(w.status, 1)
        XCTAssertTrue(w.stderr.contains("\(open): the secret file is accessible by group or others (mode 0644; expected 0600 or stricter)"), w.stderr)
        let p = try CLI.run(pruneArgs(dir.appendingPathComponent("o1").path) + ["--hosts", "127.0.0.1:1", "--secret-file", open], timeout: 60)
        XCTAssertEqual(p.status, 1)
        XCTAssertTrue(p.stderr.contains("mode 0644; expected 0600 or stricter"), p.stderr)

        let short = dir.appendingPathComponent("short").path
        writeSecret(Array("too-short\n".utf8), mode: 0o600, at: short)
        let s = try CLI.run(["worker", "--listen", "127.0.0.1:0", "--secret-file", short], timeout: 30)
        XCTAssertEqual(s.status, 1)
        XCTAssertTrue(s.stderr.contains("has 9 bytes; at least 16 are needed"), s.stderr)
        let envShort = try CLI.runWithEnvironment(["worker", "--listen", "127.0.0.1:0"], environment: ["TOPIARY_SECRET": "short"])
        XCTAssertEqual(envShort.status, 1)
        XCTAssertTrue(envShort.stderr.contains("TOPIARY_SECRET has 5 bytes; at least 16 are needed"), envShort.stderr)

        // Binary secrets differing only in bytes that are not UTF-8.
        let common = Array(repeating: UInt8(0x5a), count: 24)
        let a = dir.appendingPathComponent("a").path, b = dir.appendingPathComponent("b").path
        writeSecret(common + [0xff, 0xfe, 0xfd, 0x80], mode: 0o600, at: a)
        writeSecret(common + [0xc0, 0xc1, 0xf5, 0x81], mode: 0o600, at: b)
        let (worker, endpoint) = try CLI.startWorker(["--listen", "127.0.0.1:0", "--secret-file", a])
        defer { if worker.isRunning { worker.terminate(); worker.waitUntilExit() } }
        let refused = try CLI.run(pruneArgs(dir.appendingPathComponent("o2").path) + ["--hosts", endpoint, "--secret-file", b, "--connect-timeout", "5"], timeout: 60)
        XCTAssertEqual(refused.status, 1, refused.stderr)
        XCTAssertTrue(refused.stderr.contains("worker \(endpoint): handshake: authentication failed: the listener did not prove knowledge of the shared secret"), refused.stderr)

        // `echo SECRET > F` and TOPIARY_SECRET=SECRET are the same secret; a second newline is not.
        let echoed = dir.appendingPathComponent("echoed").path
        writeSecret(Array("an-echoed-secret-0123456789\n".utf8), mode: 0o600, at: echoed)
        let (w2, e2) = try CLI.startWorker(["--listen", "127.0.0.1:0", "--secret-file", echoed])
        defer { if w2.isRunning { w2.terminate(); w2.waitUntilExit() } }
        let ok = try CLI.runWithEnvironment(pruneArgs(dir.appendingPathComponent("o3").path) + ["--hosts", e2, "--connect-timeout", "5"],
                                            environment: ["TOPIARY_SECRET": "an-echoed-secret-0123456789"])
        XCTAssertEqual(ok.status, 0, ok.stderr)
        let twice = dir.appendingPathComponent("twice").path
        writeSecret(Array("an-echoed-secret-0123456789\n\n".utf8), mode: 0o600, at: twice)
        let no = try CLI.run(pruneArgs(dir.appendingPathComponent("o4").path) + ["--hosts", e2, "--secret-file", twice, "--connect-timeout", "5"], timeout: 60)
        XCTAssertEqual(no.status, 1, no.stderr)
        XCTAssertTrue(no.stderr.contains("did not prove knowledge of the shared secret"), no.stderr)
    }
}

extension CLI {
    /// `run`, with extra environment variables.
    static func runWithEnvironment(_ args: [String], environment: [String: String], timeout: TimeInterval = 120) throws -> Result {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("topiary-env-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let p = try start(args, environment: environment, directory: dir)
        let status = wait(p, timeout: timeout)
        return Result(status: status,
                      stdout: (try? String(contentsOf: dir.appendingPathComponent("stdout.txt"), encoding: .utf8)) ?? "",
                      stderr: (try? String(contentsOf: dir.appendingPathComponent("stderr.txt"), encoding: .utf8)) ?? "")
    }
}
