#if canImport(Glibc)
import Glibc
#endif
import Foundation
import TopiaryModel
import TopiaryPrune
import TopiaryTensor

/// Errors about a run directory: its files are named, with what was expected.
public struct RunDirectoryError: Error, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}

/// The run directory of a prune run (docs/run-directory.md):
///
///     run.json          what the run is: model fingerprint, options, plan, tool version
///     events.jsonl      one JSON event per line, appended and fsynced
///     blocks/           each pruned block as it finishes (block-NNNNN.safetensors)
///     boundaries/       boundary activations at checkpoints (boundary-NNNNN.safetensors)
///     report.json       written when the run completes
///
/// Every file except events.jsonl is written to a temporary name, fsynced and renamed; the
/// SHA-256 of each checkpoint (block or boundary) is recorded in its event, and checked on resume.
public final class RunDirectory: @unchecked Sendable {
    public let path: String
    public let events: EventLog
    public let store: BlockFileStore

    public var manifestPath: String { Self.join(path, "run.json") }
    public var boundariesPath: String { Self.join(path, "boundaries") }
    public var reportPath: String { Self.join(path, "report.json") }

    static func join(_ a: String, _ b: String) -> String { (a as NSString).appendingPathComponent(b) }

    /// Opens (creating when absent) the directory at `path`.
    public init(path: String) throws {
        self.path = path
        var isDirectory: ObjCBool = false
        if FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory), !isDirectory.boolValue {
            throw RunDirectoryError("\(path): run directory is a file, expected a directory")
        }
        do { try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true) } catch {
            throw RunDirectoryError("\(path): cannot create the run directory: \(Self.reason(error))")
        }
        guard access(path, W_OK) == 0 else {
            throw RunDirectoryError("\(path): run directory is not writable (\(String(cString: strerror(errno))))")
        }
        store = try BlockFileStore(directory: Self.join(path, "blocks"))
        events = try EventLog(path: Self.join(path, "events.jsonl"))
    }

    static func reason(_ error: Error) -> String {
        let ns = error as NSError
        if let underlying = ns.userInfo[NSUnderlyingErrorKey] as? NSError, underlying.domain == NSPOSIXErrorDomain {
            return String(cString: strerror(Int32(underlying.code)))
        }
        return ns.localizedDescription
    }

    public var hasManifest: Bool { FileManager.default.fileExists(atPath: manifestPath) }

    /// Writes run.json (atomically).
    public func writeManifest(_ manifest: [String: Any]) throws {
        let data = try JSONSerialization.data(withJSONObject: manifest, options: [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes])
        try AtomicFile.write(data + Data("\n".utf8), to: manifestPath)
    }

    /// Reads run.json.
    public func readManifest() throws -> [String: Any] {
        guard let data = FileManager.default.contents(atPath: manifestPath) else {
            throw RunDirectoryError("\(manifestPath): missing; \(path) is not a Topiary run directory (or its run never started)")
        }
        guard let json = try? JSONSerialization.jsonObject(with: data) as? [String: Any] else {
            throw RunDirectoryError("\(manifestPath): not a JSON object")
        }
        guard json["format"] as? String == "topiary-run" else {
            throw RunDirectoryError("\(manifestPath): field 'format' is \(json["format"].map { "\($0)" } ?? "missing"), expected \"topiary-run\"")
        }
        return json
    }

    // MARK: Checkpoints

    /// Writes a pruned block and records it (with its SHA-256 and report) in events.jsonl.
    public func recordBlock(_ block: DecoderBlock, report: BlockReport?, worker: String, round: Int? = nil) throws {
        try store.write(block)
        let sha = try SHA256Digest.files([store.path(block.index)])
        var fields: [String: Any] = ["block": block.index, "sha256": sha, "worker": worker]
        if let round { fields["round"] = round }
        if let report {
            let encoder = JSONEncoder()
            encoder.outputFormatting = .sortedKeys
            fields["report"] = try JSONSerialization.jsonObject(with: try encoder.encode(report))
        }
        try events.append("block_done", fields)
    }

    /// The blocks recorded as done whose files still match their checksums, with their reports
    /// and (ADMM) the round that wrote them. A block whose file is missing or differs from its
    /// recorded SHA-256 is reported (event `checkpoint_corrupt`), its file removed, and left out,
    /// so that it is redone.
    public func verifiedBlocks() throws -> [Int: FinishedBlock] {
        var latest: [Int: [String: Any]] = [:]
        for e in try events.read() where e["event"] as? String == "block_done" {
            guard let b = e["block"] as? Int else { continue }
            latest[b] = e
        }
        var result: [Int: FinishedBlock] = [:]
        for (b, e) in latest.sorted(by: { $0.key < $1.key }) {
            let file = store.path(b)
            guard try matches(file, e["sha256"] as? String ?? "", reporting: ["block": b], missing: "missing") else {
                try? FileManager.default.removeItem(atPath: file)
                continue
            }
            var report: BlockReport?
            if let r = e["report"] {
                report = try? JSONDecoder().decode(BlockReport.self, from: JSONSerialization.data(withJSONObject: r))
            }
            result[b] = FinishedBlock(report: report, round: e["round"] as? Int)
        }
        return result
    }

    func activationsPath(_ name: String) -> String { Self.join(Self.join(path, "activations"), name + ".safetensors") }

    /// Saves activations under `name` (atomically) and returns the file's SHA-256, which the caller
    /// records in the event that makes the checkpoint count.
    public func saveActivations(_ store: ActivationStore, name: String) throws -> String {
        try writeStores([("", store)], to: activationsPath(name), metadata: ["name": name])
    }

    /// Writes activation stores into one safetensors file (atomically), window s of each under
    /// PREFIX + s (six digits); returns the file's SHA-256.
    func writeStores(_ stores: [(prefix: String, store: ActivationStore)], to file: String, metadata: [String: String]) throws -> String {
        let directory = (file as NSString).deletingLastPathComponent
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        var writer = SafeTensorsWriter(directory: directory, metadata: metadata)
        for s in 0..<(stores.first?.store.count ?? 0) {
            for (prefix, store) in stores {
                try writer.add(name: prefix + String(format: "%06d", s), shape: [store.rows, store.cols]) { try store.get(s) }
            }
        }
        try writer.writeSingleFile(to: file)
        return try SHA256Digest.files([file])
    }

    /// The windows stored under PREFIX + s in `file`, or nil when the file has none.
    func readStore(_ file: SafeTensorsFile, prefix: String, make: () -> ActivationStore) throws -> ActivationStore? {
        guard file.entry(prefix + String(format: "%06d", 0)) != nil else { return nil }
        let store = make()
        for s in 0..<store.count { try store.set(s, try file.load(prefix + String(format: "%06d", s))) }
        return store
    }

    /// Whether `file` has the SHA-256 its event recorded; when not, reports `checkpoint_corrupt`
    /// with `fields` (the found value is `missing` for an absent or unreadable file).
    func matches(_ file: String, _ expected: String, reporting fields: [String: Any], missing: String) throws -> Bool {
        let found = FileManager.default.fileExists(atPath: file) ? (try? SHA256Digest.files([file])) : nil
        if let found, found == expected { return true }
        try events.append("checkpoint_corrupt", fields.merging(["file": file, "expected_sha256": expected,
                                                                "found_sha256": found ?? missing]) { $1 })
        return false
    }

    /// Activations saved under `name`, if the file is there and matches `sha256`; a mismatch is
    /// reported (`checkpoint_corrupt`) and gives nil.
    public func loadActivations(name: String, sha256 expected: String, make: () -> ActivationStore) throws -> ActivationStore? {
        let file = activationsPath(name)
        guard FileManager.default.fileExists(atPath: file),
              try matches(file, expected, reporting: ["activations": name], missing: "unreadable") else { return nil }
        return try readStore(try SafeTensorsFile(path: file), prefix: "", make: make)
    }

    /// Removes saved activations whose names satisfy `predicate`.
    public func removeActivations(where predicate: (String) -> Bool) {
        let directory = Self.join(path, "activations")
        for name in (try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? [] where name.hasSuffix(".safetensors") {
            if predicate(String(name.dropLast(".safetensors".count))) { try? FileManager.default.removeItem(atPath: Self.join(directory, name)) }
        }
    }

    func boundaryPath(_ block: Int) -> String { Self.join(boundariesPath, String(format: "boundary-%05d.safetensors", block)) }

    /// Saves the activations entering `block` (atomically), records the checkpoint, and removes
    /// older boundary checkpoints.
    public func saveBoundary(_ boundary: Boundary, at block: Int) throws {
        let file = boundaryPath(block)
        let sha = try writeStores([("inputs/", boundary.inputs)] + (boundary.targets.map { [("targets/", $0)] } ?? []),
                                  to: file, metadata: ["block": "\(block)"])
        try events.append("boundary_checkpoint", ["block": block, "sha256": sha, "file": file])
        if let names = try? FileManager.default.contentsOfDirectory(atPath: boundariesPath) {
            for name in names where name.hasPrefix("boundary-") && name != (file as NSString).lastPathComponent {
                try? FileManager.default.removeItem(atPath: Self.join(boundariesPath, name))
            }
        }
    }

    /// The latest verified boundary checkpoint at or before `block`, loaded into stores made by
    /// `make`; a checkpoint whose file differs from its recorded SHA-256 is reported and skipped.
    public func loadBoundary(atOrBefore block: Int, make: () -> ActivationStore) throws -> (block: Int, boundary: Boundary)? {
        var candidates: [Int: String] = [:]
        for e in try events.read() where e["event"] as? String == "boundary_checkpoint" {
            if let b = e["block"] as? Int, let sha = e["sha256"] as? String, b <= block { candidates[b] = sha }
        }
        for (b, expected) in candidates.sorted(by: { $0.key > $1.key }) {
            let file = boundaryPath(b)
            guard FileManager.default.fileExists(atPath: file) else { continue }   // superseded
            guard try matches(file, expected, reporting: ["boundary": b], missing: "unreadable") else { continue }
            let f = try SafeTensorsFile(path: file)
            guard let inputs = try readStore(f, prefix: "inputs/", make: make) else {
                throw RunDirectoryError("\(file): no tensor inputs/000000; not a boundary checkpoint")
            }
            return (b, Boundary(inputs: inputs, targets: try readStore(f, prefix: "targets/", make: make)))
        }
        return nil
    }

    /// Removes the checkpoints once the output is written (run.json, events.jsonl and report.json stay).
    public func removeCheckpoints() {
        try? FileManager.default.removeItem(atPath: store.directory)
        try? FileManager.default.removeItem(atPath: boundariesPath)
        try? FileManager.default.removeItem(atPath: Self.join(path, "activations"))
    }
}

/// A block finished by an earlier attempt of a run: its report, and the ADMM round that wrote it.
public struct FinishedBlock: Sendable {
    public var report: BlockReport?
    public var round: Int?
}

/// events.jsonl: one JSON object per line ({"event": ..., "time": ..., ...}), each appended with
/// one write and fsynced. Safe to call from several threads.
public final class EventLog: @unchecked Sendable {
    public let path: String
    private let fd: Int32
    private let lock = NSLock()

    public init(path: String) throws {
        self.path = path
        fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw RunDirectoryError("\(path): cannot open the event log: \(String(cString: strerror(errno)))") }
    }

    deinit { close(fd) }

    /// Appends one event and flushes it to disk.
    public func append(_ event: String, _ fields: [String: Any] = [:]) throws {
        var object = fields
        object["event"] = event
        object["time"] = ISO8601DateFormatter().string(from: Date())
        var data = try JSONSerialization.data(withJSONObject: object, options: [.sortedKeys, .withoutEscapingSlashes])
        data.append(UInt8(ascii: "\n"))
        lock.lock()
        defer { lock.unlock() }
        let before = lseek(fd, 0, SEEK_END)
        let ok = data.withUnsafeBytes { p -> Bool in
            var done = 0
            while done < p.count {
                let n = write(fd, p.baseAddress! + done, p.count - done)
                if n < 0 { if errno == EINTR { continue }; return false }
                done += n
            }
            return true
        }
        guard ok, fsync(fd) == 0 else {
            let reason = String(cString: strerror(errno))
            // No torn line is left behind (a full disk can take half an event).
            if before >= 0 { _ = ftruncate(fd, before) }
            throw RunDirectoryError("\(path): cannot append event '\(event)': \(reason)")
        }
    }

    /// Every complete event; a torn last line (a crash mid-append) is ignored.
    public func read() throws -> [[String: Any]] {
        guard let data = FileManager.default.contents(atPath: path) else { return [] }
        var events: [[String: Any]] = []
        for line in data.split(separator: UInt8(ascii: "\n")) {
            guard let object = try? JSONSerialization.jsonObject(with: Data(line)) as? [String: Any] else { continue }
            events.append(object)
        }
        return events
    }
}

/// What identifies a model checkpoint cheaply: each file's name and size, and SHA-256 of its
/// first and last MiB (where GGUF and safetensors keep their headers and the last tensor).
public enum ModelFingerprint {
    public static func compute(path: String) throws -> String {
        var files: [String] = []
        var isDirectory: ObjCBool = false
        guard FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory) else {
            throw RunDirectoryError("\(path): model not found")
        }
        if isDirectory.boolValue {
            let names = try FileManager.default.contentsOfDirectory(atPath: path).sorted()
            files = names.filter { $0.hasSuffix(".safetensors") || $0 == "config.json" || $0.hasSuffix(".index.json") }
                .map { RunDirectory.join(path, $0) }
        } else {
            files = [path]
        }
        var digest = SHA256Digest()
        for file in files {
            guard let handle = FileHandle(forReadingAtPath: file) else { throw RunDirectoryError("\(file): cannot open for fingerprinting") }
            defer { try? handle.close() }
            let size = (try? FileManager.default.attributesOfItem(atPath: file)[.size] as? Int) ?? 0
            digest.update(Data("\((file as NSString).lastPathComponent)\n\(size)\n".utf8))
            digest.update(handle.readData(ofLength: 1 << 20))
            if size > 2 << 20 {
                try handle.seek(toOffset: UInt64(size - (1 << 20)))
                digest.update(handle.readData(ofLength: 1 << 20))
            }
        }
        return digest.finish()
    }
}
