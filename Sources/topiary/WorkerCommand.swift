import Foundation
import TopiaryCluster
import TopiaryModel

/// The shared secret from --secret-file or TOPIARY_SECRET; none means loopback only. A secret
/// that cannot be used (a file group or others can read, too short) is an error naming it.
func loadSecret(_ args: ParsedArguments) throws -> SharedSecret? {
    do {
        if let file = args.string("secret-file") { return try SharedSecret.load(file: file) }
        return try SharedSecret.fromEnvironment()
    } catch let e as SecretError {
        throw ToolError("\(e)")
    }
}

/// Without a configured secret, peers on loopback still run the handshake (so the protocol has
/// one path) with this fixed, public value: it authenticates nothing, which is why it is only
/// accepted on loopback addresses.
let loopbackSecret = try! SharedSecret(bytes: Array("topiary-unauthenticated-loopback-only".utf8))

enum WorkerCommand: Command {
    static let name = "worker"
    static let summary = "serve pruning work to a coordinator ('topiary prune --hosts')"
    static let usage = "topiary worker --listen HOST:PORT [--secret-file F] [--work-dir D] [--handshake-timeout S]"
    static let details = """
    Listens for a coordinator, authenticates it (HMAC-SHA256 challenge-response in both directions
    over the shared secret from --secret-file or TOPIARY_SECRET), and prunes the block ranges it is
    given, reading the model from the path the coordinator names (a shared filesystem). Without a
    secret it listens on loopback addresses only, and says so. Port 0 picks a free port; the
    first line on stdout is "listening on HOST:PORT". The secret file must be readable by its
    owner only (mode 0600) and hold at least 16 bytes; one trailing newline is not part of it.
    Each connection is served on its own thread: a connection must authenticate within
    --handshake-timeout seconds (at most 64 may be authenticating at once; one more closes the
    oldest), so an idle, slow or hostile peer never delays a coordinator. Jobs of several
    coordinators compute one at a time. Runs until killed.
    """
    static let options = [
        OptionSpec(name: "listen", value: "HOST:PORT", help: "address to listen on (e.g. 0.0.0.0:7100, 127.0.0.1:0)"),
        OptionSpec(name: "secret-file", value: "F", help: "file holding the cluster's shared secret (mode 0600, at least 16 bytes)"),
        OptionSpec(name: "work-dir", value: "D", help: "directory for spilled activations (default: the system's temporary directory)"),
        OptionSpec(name: "handshake-timeout", value: "S", help: "seconds a connection has to authenticate (default 10)"),
        OptionSpec(name: "parent-pid", value: "P", help: "exit when process P, the parent, ends (set by 'prune --workers')"),
        CommonOptions.device,
        CommonOptions.threads,
    ]

    static func run(_ args: ParsedArguments) throws {
        try CommonOptions.apply(args)
        let endpoint = try Endpoint(parsing: try args.required("listen"))
        let handshakeTimeout = try args.double("handshake-timeout") ?? 10
        guard handshakeTimeout.isFinite, handshakeTimeout > 0, handshakeTimeout <= 3600 else {
            throw UsageError(message: "topiary worker: --handshake-timeout must be more than 0 and at most 3600 seconds, got \(handshakeTimeout)")
        }
        if let parent = try args.int("parent-pid", min: 1) {
            // A local worker of a coordinator that was killed (SIGKILL cannot be cleaned up
            // after) must not stay behind: it goes when its parent goes.
            guard getppid() == pid_t(parent) else { throw ToolError("topiary worker: parent process \(parent) is gone") }
            Thread.detachNewThread {
                while getppid() == pid_t(parent) { sleep(1) }
                // _exit, not exit: exit runs library destructors, and OpenBLAS's joins its
                // threads, which can hang when BLAS ran on a connection's thread that is gone.
                // The worker has nothing to flush.
                _exit(0)
            }
        }
        if let dir = args.string("work-dir") {
            // Checked now, not when the first spill needs it mid-run: it must be a writable
            // directory, or one that can be made.
            var st = stat()
            if stat(dir, &st) == 0 {
                guard (st.st_mode & S_IFMT) == S_IFDIR else {
                    throw UsageError(message: "topiary worker: --work-dir \(dir) is a file, expected a directory (for spilled activations)")
                }
                guard access(dir, W_OK | X_OK) == 0 else {
                    throw UsageError(message: "topiary worker: --work-dir \(dir) is not writable (\(String(cString: strerror(errno))))")
                }
            } else if let problem = OutputDirectory.creationProblem(dir) {
                throw UsageError(message: "topiary worker: --work-dir \(dir) cannot be created: \(problem)")
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
        let server = WorkerServer(listener: listener, secret: secret!, service: service)
        server.handshakeTimeout = handshakeTimeout
        server.log = { Console.error("topiary worker: \($0)") }
        server.run()
    }
}

/// The workers of a prune run: one in-process worker, worker processes started here
/// (--workers N), or running workers (--hosts).
final class WorkerPool {
    var links: [WorkerLink] = []
    var processes: [Process] = []
    var remotes: [RemoteWorker] = []

    static func make(args: ParsedArguments, model: LanguageModel, tokenizerPath: String?, replicas: Int = 1) throws -> WorkerPool {
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
                let (process, endpoint) = try startLocalWorker(secret: generated, threads: args.string("threads"), device: args.string("device"))
                pool.processes.append(process)
                endpoints.append(endpoint)
            }
        } else if let hosts {
            endpoints = try hosts.split(separator: ",").map { try Endpoint(parsing: String($0)) }
        } else {
            pool.links = [InProcessWorker(model: model)]
            if replicas > 1 {
                pool.links = [ReplicaGroup(members: (0..<replicas).map { InProcessReplica(model: model, name: "replica \($0)") })]
            }
            return pool
        }
        // Every phase runs under a limit: reaching a worker and its handshake under
        // --connect-timeout, everything after (assignment, computing, transfers) under
        // --heartbeat-timeout; an error names the worker and the phase.
        let connectTimeout = try args.double("connect-timeout") ?? 60
        guard connectTimeout.isFinite, connectTimeout > 0 else {
            throw UsageError(message: "topiary prune: --connect-timeout must be a positive number of seconds, got \(connectTimeout)")
        }
        let heartbeatTimeout = try args.double("heartbeat-timeout") ?? 60
        for e in endpoints {
            let useSecret: SharedSecret
            if let secret { useSecret = secret } else {
                guard e.isLoopback else {
                    throw ToolError("topiary prune: worker \(e) is not on loopback; give the cluster's secret (--secret-file or TOPIARY_SECRET)")
                }
                useSecret = loopbackSecret
            }
            let (c, name) = try connectAndAuthenticate(to: e, secret: useSecret, within: connectTimeout)
            c.timeout = heartbeatTimeout
            c.frameTimeout = max(120, heartbeatTimeout)
            let remote = RemoteWorker(connection: c, name: name, model: model, tokenizerPath: tokenizerPath)
            remote.address = e.description
            pool.remotes.append(remote)
            pool.links.append(remote)
        }
        if replicas > 1 {
            // Stages of R consecutive workers; workers beyond the last whole stage are spares.
            guard pool.remotes.count >= replicas else {
                throw UsageError(message: "topiary prune: --replicas \(replicas) needs at least \(replicas) workers; --workers/--hosts gives \(pool.remotes.count)")
            }
            let stages = pool.remotes.count / replicas
            var links: [WorkerLink] = (0..<stages).map { k in ReplicaGroup(members: Array(pool.remotes[(k * replicas)..<((k + 1) * replicas)])) }
            links += pool.remotes.dropFirst(stages * replicas).map { $0 as WorkerLink }
            pool.links = links
        }
        return pool
    }

    /// Connects to a worker and authenticates, all within `seconds`. Workers started by the same
    /// job script may still be starting, so a refused connection, or one closed before the
    /// handshake began (a worker busy with too many unauthenticated peers), is tried again
    /// until the time is up; a worker that accepts and never answers fails at that time.
    static func connectAndAuthenticate(to e: Endpoint, secret: SharedSecret, within seconds: Double) throws -> (Connection, String) {
        let deadline = Date().addingTimeInterval(seconds)
        var pause = 0.1
        var lastError: Error?
        // An error's text without the address in front (the message names the worker already).
        func text(_ error: Error) -> String {
            let t = "\(error)"
            return t.hasPrefix("\(e): ") ? String(t.dropFirst("\(e): ".count)) : t
        }
        while true {
            let remaining = deadline.timeIntervalSinceNow
            if remaining <= 0 {
                throw ToolError("worker \(e): connect: cannot reach it within \(secondsText(seconds)) s: \(lastError.map { text($0) } ?? "no attempt")")
            }
            let c: Connection
            do { c = try Connection.connect(to: e, timeout: min(10, remaining)) } catch {
                lastError = error
                Thread.sleep(forTimeInterval: min(pause, max(0, deadline.timeIntervalSinceNow)))
                pause = min(pause * 2, 2)
                continue
            }
            do {
                let name = try c.authenticate(secret: secret, name: "coordinator", role: 0, within: max(0.001, deadline.timeIntervalSinceNow))
                return (c, name)
            } catch WireError.connection(let text) where text.hasSuffix("connection closed") {
                c.close()
                lastError = WireError.connection("\(text) during the handshake")
                Thread.sleep(forTimeInterval: min(pause, max(0, deadline.timeIntervalSinceNow)))
                pause = min(pause * 2, 2)
            } catch {
                c.close()
                throw ToolError("worker \(e): handshake: \(text(error))")
            }
        }
    }

    static func secondsText(_ s: Double) -> String { s == s.rounded() && abs(s) < 1e15 ? String(Int(s)) : String(format: "%.3g", s) }

    static func startLocalWorker(secret: SharedSecret, threads: String? = nil, device: String? = nil) throws -> (Process, Endpoint) {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: CommandLine.arguments[0]).standardizedFileURL
        if !FileManager.default.isExecutableFile(atPath: p.executableURL!.path) {
            p.executableURL = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath()
        }
        p.arguments = ["worker", "--listen", "127.0.0.1:0", "--parent-pid", "\(getpid())"] + (threads.map { ["--threads", $0] } ?? [])
            + (device.map { ["--device", $0] } ?? [])
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
