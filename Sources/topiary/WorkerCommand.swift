import Foundation
import TopiaryCluster
import TopiaryModel

/// The shared secret from --secret-file or TOPIARY_SECRET; none means loopback only.
func loadSecret(_ args: ParsedArguments) throws -> SharedSecret? {
    if let file = args.string("secret-file") { return try SharedSecret.load(file: file) }
    return try SharedSecret.fromEnvironment()
}

/// Without a configured secret, peers on loopback still run the handshake (so the protocol has
/// one path) with this fixed, public value: it authenticates nothing, which is why it is only
/// accepted on loopback addresses.
let loopbackSecret = try! SharedSecret(bytes: Array("topiary-unauthenticated-loopback-only".utf8))

enum WorkerCommand: Command {
    static let name = "worker"
    static let summary = "serve pruning work to a coordinator ('topiary prune --hosts')"
    static let usage = "topiary worker --listen HOST:PORT [--secret-file F] [--work-dir D]"
    static let details = """
    Listens for a coordinator, authenticates it (HMAC-SHA256 challenge-response in both directions
    over the shared secret from --secret-file or TOPIARY_SECRET), and prunes the block ranges it is
    given, reading the model from the path the coordinator names (a shared filesystem). Without a
    secret it listens on loopback addresses only, and says so. Port 0 picks a free port; the
    first line on stdout is "listening on HOST:PORT". Serves one coordinator at a time, until
    killed.
    """
    static let options = [
        OptionSpec(name: "listen", value: "HOST:PORT", help: "address to listen on (e.g. 0.0.0.0:7100, 127.0.0.1:0)"),
        OptionSpec(name: "secret-file", value: "F", help: "file holding the cluster's shared secret (mode 0600)"),
        OptionSpec(name: "work-dir", value: "D", help: "directory for spilled activations (default: the system's temporary directory)"),
        OptionSpec(name: "parent-pid", value: "P", help: "exit when process P, the parent, ends (set by 'prune --workers')"),
        CommonOptions.threads,
    ]

    static func run(_ args: ParsedArguments) throws {
        try CommonOptions.apply(args)
        let endpoint = try Endpoint(parsing: try args.required("listen"))
        if let parent = try args.int("parent-pid", min: 1) {
            // A local worker of a coordinator that was killed (SIGKILL cannot be cleaned up
            // after) must not stay behind: it goes when its parent goes.
            guard getppid() == pid_t(parent) else { throw ToolError("topiary worker: parent process \(parent) is gone") }
            Thread.detachNewThread {
                while getppid() == pid_t(parent) { sleep(1) }
                exit(0)
            }
        }
        var secret = try loadSecret(args)
        if secret == nil {
            guard endpoint.isLoopback else {
                throw ToolError("topiary worker: no shared secret (--secret-file or TOPIARY_SECRET); without one the worker listens on loopback only, not \(endpoint)")
            }
            Console.info("topiary worker: no shared secret given: listening on loopback only, peers are not authenticated")
            secret = loopbackSecret
        }
        let listener = try Listener(endpoint: endpoint)
        // Unbuffered, so that a parent reading the pipe sees it at once.
        FileHandle.standardOutput.write(Data("listening on \(listener.endpoint)\n".utf8))
        let workDir = args.string("work-dir") ?? (NSTemporaryDirectory() as NSString).appendingPathComponent("topiary-worker-\(getpid())")
        let service = WorkerService(name: "worker@\(listener.endpoint)", workDirectory: workDir)
        while true {
            guard let c = try listener.accept(connectionTimeout: 24 * 3600) else { continue }
            do {
                let peer = try c.acceptHandshake(secret: secret!, name: service.name)
                Console.info("topiary worker: serving \(peer) (\(c.peer))")
                try service.serve(c)
            } catch {
                Console.error("topiary worker: connection from \(c.peer) ended: \(error)")
            }
            c.close()
        }
    }
}

/// The workers of a prune run: one in-process worker, worker processes started here
/// (--workers N), or running workers (--hosts).
final class WorkerPool {
    var links: [WorkerLink] = []
    var processes: [Process] = []
    var remotes: [RemoteWorker] = []

    static func make(args: ParsedArguments, model: LanguageModel, tokenizerPath: String?) throws -> WorkerPool {
        let pool = WorkerPool()
        let count = try args.int("workers", min: 1)
        let hosts = args.string("hosts")
        if count != nil && hosts != nil { throw UsageError(message: "topiary prune: --workers and --hosts exclude each other") }
        var endpoints: [Endpoint] = []
        var secret = try loadSecret(args)
        if let count {
            // Local workers get a fresh random secret through their environment.
            let generated = try SharedSecret(bytes: Array(randomBytes(32).map { String(format: "%02x", $0) }.joined().utf8))
            secret = generated
            for _ in 0..<count {
                let (process, endpoint) = try startLocalWorker(secret: generated, threads: args.string("threads"))
                pool.processes.append(process)
                endpoints.append(endpoint)
            }
        } else if let hosts {
            endpoints = try hosts.split(separator: ",").map { try Endpoint(parsing: String($0)) }
        } else {
            pool.links = [InProcessWorker(model: model)]
            return pool
        }
        for e in endpoints {
            let useSecret: SharedSecret
            if let secret { useSecret = secret } else {
                guard e.isLoopback else {
                    throw ToolError("topiary prune: worker \(e) is not on loopback; give the cluster's secret (--secret-file or TOPIARY_SECRET)")
                }
                useSecret = loopbackSecret
            }
            // Workers started by the same job script may still be starting: retry for a while.
            let c = try connectWithRetry(to: e, within: try args.double("connect-timeout") ?? 60)
            c.timeout = 24 * 3600
            let name = try c.authenticate(secret: useSecret, name: "coordinator", role: 0)
            let remote = RemoteWorker(connection: c, name: name, model: model, tokenizerPath: tokenizerPath)
            pool.remotes.append(remote)
            pool.links.append(remote)
        }
        return pool
    }

    static func connectWithRetry(to e: Endpoint, within seconds: Double) throws -> Connection {
        let deadline = Date().addingTimeInterval(seconds)
        var pause = 0.1
        while true {
            do { return try Connection.connect(to: e, timeout: 10) } catch {
                guard Date() < deadline else {
                    throw ToolError("topiary prune: cannot reach worker \(e) within \(Int(seconds)) s: \(error)")
                }
                Thread.sleep(forTimeInterval: pause)
                pause = min(pause * 2, 2)
            }
        }
    }

    static func startLocalWorker(secret: SharedSecret, threads: String? = nil) throws -> (Process, Endpoint) {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: CommandLine.arguments[0]).standardizedFileURL
        if !FileManager.default.isExecutableFile(atPath: p.executableURL!.path) {
            p.executableURL = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath()
        }
        p.arguments = ["worker", "--listen", "127.0.0.1:0", "--parent-pid", "\(getpid())"] + (threads.map { ["--threads", $0] } ?? [])
        var env = ProcessInfo.processInfo.environment
        env["TOPIARY_SECRET"] = String(decoding: secret.bytes, as: UTF8.self)
        p.environment = env
        let out = Pipe()
        p.standardOutput = out
        p.standardInput = FileHandle.nullDevice
        try p.run()
        // The first line is "listening on HOST:PORT".
        var line = Data()
        let handle = out.fileHandleForReading
        while !line.contains(UInt8(ascii: "\n")) {
            let chunk = handle.availableData
            if chunk.isEmpty { break }
            line.append(chunk)
        }
        let text = String(decoding: line, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
        guard text.hasPrefix("listening on ") else {
            p.terminate()
            throw ToolError("topiary prune: a local worker did not start (it said: '\(text)')")
        }
        return (p, try Endpoint(parsing: String(text.dropFirst("listening on ".count))))
    }

    func shutdown() {
        for r in remotes { r.shutdown() }
        for p in processes where p.isRunning {
            p.terminate()
            // A worker that does not stop (hung, or stopped by a signal) is killed.
            let deadline = Date().addingTimeInterval(2)
            while p.isRunning && Date() < deadline { usleep(10_000) }
            if p.isRunning { kill(p.processIdentifier, SIGKILL) }
            p.waitUntilExit()
        }
    }
}
