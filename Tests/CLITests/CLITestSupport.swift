import Foundation
import XCTest
import TopiaryTestSupport

/// Runs the built `topiary` binary as a user would.
enum CLI {
    static var repositoryRoot: URL { TestPaths.repositoryRoot }
    static func asset(_ relative: String) -> String { TestPaths.asset(relative) }
    static func fixture(_ relative: String) -> String { TestPaths.fixture(relative) }

    /// The topiary executable built beside the test bundle.
    static let binary: String = {
        if let env = ProcessInfo.processInfo.environment["TOPIARY_BIN"] { return env }
        var dir = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent()
        for _ in 0..<4 {
            let candidate = dir.appendingPathComponent("topiary").path
            if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
            dir.deleteLastPathComponent()
        }
        for config in ["release", "debug"] {
            let candidate = repositoryRoot.appendingPathComponent(".build/\(config)/topiary").path
            if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
        }
        fatalError("topiary binary not found; build it first (swift build --product topiary)")
    }()

    struct Result {
        let status: Int32
        let stdout: String
        let stderr: String
        var stderrLines: [String] { stderr.split(separator: "\n").map(String.init) }
        /// The JSON object on the last line of stdout.
        var json: [String: Any]? {
            guard let last = stdout.split(separator: "\n").last,
                  let data = last.data(using: .utf8) else { return nil }
            return (try? JSONSerialization.jsonObject(with: data)) as? [String: Any]
        }
    }

    /// Runs `topiary args...` with a time limit, so a hang fails the test instead of blocking it.
    static func run(_ args: [String], cwd: URL? = nil, environment: [String: String] = [:], timeout: TimeInterval = 300) throws -> Result {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: binary)
        p.arguments = args
        if !environment.isEmpty {
            var env = ProcessInfo.processInfo.environment
            for (k, v) in environment { env[k] = v }
            p.environment = env
        }
        if let cwd { p.currentDirectoryURL = cwd }
        let out = Pipe(), err = Pipe()
        p.standardOutput = out
        p.standardError = err
        p.standardInput = FileHandle.nullDevice
        try p.run()
        // Read concurrently so a full pipe never blocks the child.
        nonisolated(unsafe) var outData = Data(), errData = Data()
        let group = DispatchGroup()
        DispatchQueue.global().async(group: group) { outData = out.fileHandleForReading.readDataToEndOfFile() }
        DispatchQueue.global().async(group: group) { errData = err.fileHandleForReading.readDataToEndOfFile() }
        let deadline = Date().addingTimeInterval(timeout)
        while p.isRunning && Date() < deadline { usleep(20_000) }
        if p.isRunning {
            p.terminate()
            p.waitUntilExit()
            XCTFail("topiary \(args.joined(separator: " ")) did not finish within \(timeout) s")
        }
        p.waitUntilExit()
        group.wait()
        return Result(status: p.terminationStatus, stdout: String(decoding: outData, as: UTF8.self),
                      stderr: String(decoding: errData, as: UTF8.self))
    }

    static func temporaryDirectory(_ test: XCTestCase) throws -> URL { try test.makeTemporaryDirectory("topiary-cli") }

    /// Starts a `topiary worker` (through `launcher`, e.g. `ip netns exec NS`, when given) and
    /// returns it with the address from its first line, "listening on HOST:PORT".
    static func startWorker(_ arguments: [String], launcher: [String] = []) throws -> (Process, String) {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: launcher.first ?? binary)
        p.arguments = launcher.isEmpty ? ["worker"] + arguments : Array(launcher.dropFirst()) + [binary, "worker"] + arguments
        let out = Pipe()
        p.standardOutput = out
        p.standardError = FileHandle.nullDevice
        try p.run()
        var line = Data()
        while !line.contains(UInt8(ascii: "\n")) {
            let chunk = out.fileHandleForReading.availableData
            if chunk.isEmpty { break }
            line.append(chunk)
        }
        let text = String(decoding: line, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
        return (p, text.hasPrefix("listening on ") ? String(text.dropFirst("listening on ".count)) : "")
    }
}

/// Builds small GGUF files for tests, with control over every header field.
struct GGUFBuilder {
    enum Value {
        case u32(UInt32), f32(Float), string(String), bool(Bool), strings([String]), i32s([Int32])
    }
    struct Tensor {
        var name: String
        var ne: [UInt64]       // innermost first, as GGUF stores it
        var type: UInt32
        var data: [UInt8]
        var offsetOverride: UInt64? = nil
    }
    var magic = Array("GGUF".utf8)
    var version: UInt32 = 3
    var metadata: [(String, Value)] = []
    var tensors: [Tensor] = []

    private func append<T: FixedWidthInteger>(_ v: T, to out: inout [UInt8]) {
        withUnsafeBytes(of: v.littleEndian) { out.append(contentsOf: $0) }
    }
    private func appendString(_ s: String, to out: inout [UInt8]) {
        append(UInt64(s.utf8.count), to: &out)
        out.append(contentsOf: Array(s.utf8))
    }

    func bytes() -> [UInt8] {
        var out = magic
        append(version, to: &out)
        append(UInt64(tensors.count), to: &out)
        append(UInt64(metadata.count), to: &out)
        for (key, value) in metadata {
            appendString(key, to: &out)
            switch value {
            case .u32(let v): append(UInt32(4), to: &out); append(v, to: &out)
            case .f32(let v): append(UInt32(6), to: &out); append(v.bitPattern, to: &out)
            case .bool(let v): append(UInt32(7), to: &out); out.append(v ? 1 : 0)
            case .string(let v): append(UInt32(8), to: &out); appendString(v, to: &out)
            case .strings(let vs):
                append(UInt32(9), to: &out); append(UInt32(8), to: &out); append(UInt64(vs.count), to: &out)
                for v in vs { appendString(v, to: &out) }
            case .i32s(let vs):
                append(UInt32(9), to: &out); append(UInt32(5), to: &out); append(UInt64(vs.count), to: &out)
                for v in vs { append(v, to: &out) }
            }
        }
        var offset: UInt64 = 0
        var offsets: [UInt64] = []
        for t in tensors {
            offsets.append(offset)
            offset += UInt64((t.data.count + 31) / 32 * 32)
        }
        for (t, o) in zip(tensors, offsets) {
            appendString(t.name, to: &out)
            append(UInt32(t.ne.count), to: &out)
            for d in t.ne { append(d, to: &out) }
            append(t.type, to: &out)
            append(t.offsetOverride ?? o, to: &out)
        }
        while out.count % 32 != 0 { out.append(0) }
        for t in tensors {
            out.append(contentsOf: t.data)
            while out.count % 32 != 0 { out.append(0) }
        }
        return out
    }

    /// A valid one-block LLaMA GGUF (hidden 32, ffn 64, 2 heads, vocab 64), F32 weights of small values.
    static func tinyLlama() -> GGUFBuilder {
        var b = GGUFBuilder()
        b.metadata = [
            ("general.architecture", .string("llama")), ("llama.block_count", .u32(1)),
            ("llama.embedding_length", .u32(32)), ("llama.feed_forward_length", .u32(64)),
            ("llama.attention.head_count", .u32(2)), ("llama.attention.head_count_kv", .u32(2)),
            ("llama.context_length", .u32(128)), ("llama.attention.layer_norm_rms_epsilon", .f32(1e-5)),
            ("llama.vocab_size", .u32(64)),
        ]
        func f32(_ name: String, _ ne: [UInt64]) -> Tensor {
            let n = ne.reduce(1, *)
            var data: [UInt8] = []
            for i in 0..<n { withUnsafeBytes(of: (Float(i % 7) * 0.01).bitPattern.littleEndian) { data.append(contentsOf: $0) } }
            return Tensor(name: name, ne: ne, type: 0, data: data)
        }
        b.tensors = [
            f32("token_embd.weight", [32, 64]), f32("blk.0.attn_norm.weight", [32]),
            f32("blk.0.attn_q.weight", [32, 32]), f32("blk.0.attn_k.weight", [32, 32]),
            f32("blk.0.attn_v.weight", [32, 32]), f32("blk.0.attn_output.weight", [32, 32]),
            f32("blk.0.ffn_norm.weight", [32]), f32("blk.0.ffn_gate.weight", [32, 64]),
            f32("blk.0.ffn_up.weight", [32, 64]), f32("blk.0.ffn_down.weight", [64, 32]),
            f32("output_norm.weight", [32]),
        ]
        return b
    }
}

extension CLI {
    /// Starts `topiary args...` in the background (output to files in `directory`), for tests that
    /// signal it mid-run.
    static func start(_ args: [String], environment: [String: String] = [:], directory: URL) throws -> Process {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: binary)
        p.arguments = args
        var env = ProcessInfo.processInfo.environment
        for (k, v) in environment { env[k] = v }
        p.environment = env
        _ = FileManager.default.createFile(atPath: directory.appendingPathComponent("stdout.txt").path, contents: nil)
        _ = FileManager.default.createFile(atPath: directory.appendingPathComponent("stderr.txt").path, contents: nil)
        p.standardOutput = try FileHandle(forWritingTo: directory.appendingPathComponent("stdout.txt"))
        p.standardError = try FileHandle(forWritingTo: directory.appendingPathComponent("stderr.txt"))
        p.standardInput = FileHandle.nullDevice
        try p.run()
        return p
    }

    /// Waits (at most `timeout` s) for the process to exit; fails the test and kills it otherwise.
    static func wait(_ p: Process, timeout: TimeInterval = 300) -> Int32 {
        let deadline = Date().addingTimeInterval(timeout)
        while p.isRunning && Date() < deadline { usleep(20_000) }
        if p.isRunning {
            kill(p.processIdentifier, SIGKILL)
            XCTFail("process did not finish within \(timeout) s")
        }
        p.waitUntilExit()
        return p.terminationStatus
    }

    /// The events of a run directory's events.jsonl.
    static func events(_ runDirectory: String) -> [[String: Any]] {
        guard let data = FileManager.default.contents(atPath: runDirectory + "/events.jsonl") else { return [] }
        return data.split(separator: UInt8(ascii: "\n")).compactMap { try? JSONSerialization.jsonObject(with: Data($0)) as? [String: Any] }
    }

    /// Waits until an event satisfies `predicate` (false after `timeout` s).
    static func waitForEvent(_ runDirectory: String, timeout: TimeInterval = 120, _ predicate: ([String: Any]) -> Bool) -> Bool {
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            if events(runDirectory).contains(where: predicate) { return true }
            usleep(50_000)
        }
        return false
    }
}

extension CLI {
    /// Runs a system tool, output discarded; returns its exit status.
    @discardableResult
    static func runTool(_ path: String, _ args: [String]) throws -> Int32 {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: path)
        p.arguments = args
        p.standardOutput = FileHandle.nullDevice
        p.standardError = FileHandle.nullDevice
        try p.run()
        p.waitUntilExit()
        return p.terminationStatus
    }
}
