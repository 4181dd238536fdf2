import Foundation
import XCTest
import TopiaryTestSupport

/// Workers on distinct hosts: two network namespaces, each joined to this one by a veth pair,
/// with addresses from 198.18.0.0/15 (the range set aside for benchmarking networks). Traffic
/// never leaves the machine. Where the machine refuses namespaces (not root), the distinct
/// loopback addresses of DistributedCLITests cover the same path.
final class NetworkNamespaceTests: XCTestCase {
    @discardableResult
    func sh(_ command: String) -> (Int32, String) {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/bin/sh")
        p.arguments = ["-c", command]
        let out = Pipe()
        p.standardOutput = out
        p.standardError = out
        try? p.run()
        let data = out.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        return (p.terminationStatus, String(decoding: data, as: UTF8.self))
    }

    func testWorkersInSeparateNetworkNamespaces() throws {
        let tag = String(getpid() % 10000)
        let namespaces = ["tpry\(tag)a", "tpry\(tag)b"]
        guard sh("ip netns add \(namespaces[0])").0 == 0 else {
            throw XCTSkip("network namespaces are not available here (needs root and iproute2); DistributedCLITests covers distinct addresses on loopback")
        }
        defer {
            for (i, ns) in namespaces.enumerated() {
                sh("ip netns pids \(ns) | xargs -r kill -9; ip netns delete \(ns); ip link delete tv\(tag)\(i) 2>/dev/null")
            }
        }
        var hosts: [String] = []
        for (i, ns) in namespaces.enumerated() {
            if i > 0 { XCTAssertEqual(sh("ip netns add \(ns)").0, 0) }
            let (host, peer) = ("198.18.\(i + 1).1", "198.18.\(i + 1).2")
            let setup = """
            ip link add tv\(tag)\(i) type veth peer name tp\(tag)\(i) && \
            ip link set tp\(tag)\(i) netns \(ns) && \
            ip addr add \(host)/30 dev tv\(tag)\(i) && ip link set tv\(tag)\(i) up && \
            ip netns exec \(ns) ip addr add \(peer)/30 dev tp\(tag)\(i) && \
            ip netns exec \(ns) ip link set tp\(tag)\(i) up && ip netns exec \(ns) ip link set lo up
            """
            let (rc, out) = sh(setup)
            XCTAssertEqual(rc, 0, out)
            hosts.append(peer)
        }
        let dir = try CLI.temporaryDirectory(self)
        let secretFile = dir.appendingPathComponent("secret").path
        try "netns-test-secret-0123456789abcdef".write(toFile: secretFile, atomically: true, encoding: .utf8)
        XCTAssertEqual(chmod(secretFile, 0o600), 0)   // a secret file others can read is refused
        var workers: [Process] = []
        defer { for w in workers where w.isRunning { w.terminate() } }
        var endpoints: [String] = []
        for (ns, host) in zip(namespaces, hosts) {
            let (p, endpoint) = try CLI.startWorker(["--listen", "\(host):7100", "--secret-file", secretFile],
                                                    launcher: ["/usr/sbin/ip", "netns", "exec", ns])
            workers.append(p)
            XCTAssertEqual(endpoint, "\(host):7100")
            endpoints.append(endpoint)
        }
        let base = ["prune", "--model", CLI.asset("stories260K/stories260K.bin"), "--tokenizer", CLI.asset("stories260K/tok512.bin"),
                    "--method", "wanda", "--sparsity", "0.5", "--calib", CLI.asset("public-domain-text/wizard_of_oz.txt"),
                    "--calib-samples", "8", "--calib-seqlen", "128", "--json"]
        let single = try CLI.run(base + ["--output", dir.appendingPathComponent("single").path])
        let remote = try CLI.run(base + ["--output", dir.appendingPathComponent("netns").path,
                                         "--hosts", endpoints.joined(separator: ","), "--secret-file", secretFile])
        XCTAssertEqual(remote.status, 0, remote.stderr)
        XCTAssertEqual(remote.json?["output_sha256"] as? String, single.json?["output_sha256"] as? String)
        XCTAssertTrue(remote.stderr.contains("worker@198.18.1.2:7100") && remote.stderr.contains("worker@198.18.2.2:7100"), remote.stderr)
    }
}
