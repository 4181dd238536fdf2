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
///     run.lock          the lock (flock) held by the one process using the directory, naming it
///     run.json          what the run is: model fingerprint, options, plan, tool version, checksum
///     events.jsonl      one JSON event per line, appended and fsynced
///     blocks/           each pruned block as it finishes (block-NNNNN.safetensors)
///     boundaries/       boundary activations at checkpoints (boundary-NNNNN.safetensors)
///     report.json       written when the run completes
///
/// Every file except events.jsonl is written to a temporary name, fsynced and renamed; the
/// SHA-256 of each checkpoint (block or boundary) is recorded in its event, and checked on resume.
/// Each checkpoint file names, in its safetensors metadata, the run it belongs to (run.json's
/// checksum, which covers the run's id, model, calibration and options) and its block, so a file
/// from another run, another block or other options is refused even when its event matches.
///
/// Topiary deletes only what it wrote: a directory is taken for a run only when it is new, empty,
/// or already a run directory (run.json or run.lock of Topiary's format), and only the files a run
/// writes are ever removed from it.
public final class RunDirectory: @unchecked Sendable {
    public let path: String
    public let events: EventLog
    public let store: BlockFileStore
    /// The run this directory holds: run.json's checksum, bound into every checkpoint it writes.
    public private(set) var identity: String?
    /// The open lock file; closing it (or exiting) releases the directory.
    private let lockDescriptor: Int32

    public static let lockName = "run.lock"
    public var manifestPath: String { Self.join(path, "run.json") }
    public var boundariesPath: String { Self.join(path, "boundaries") }
    public var reportPath: String { Self.join(path, "report.json") }
    /// The calibration sampled from the model (--calib generate), kept across runs in this directory.
    public static let generatedCalibrationName = "calibration-generated.json"
    var activationsDirectory: String { Self.join(path, "activations") }

    static func join(_ a: String, _ b: String) -> String { (a as NSString).appendingPathComponent(b) }

    /// What is at a path that is to be a run directory.
    public enum State: Equatable {
        case absent
        case empty
        /// A directory with other files: not Topiary's (the first such entry).
        case foreign(String)
        /// Locked by a run that never wrote run.json (it stopped early).
        case started
        case unfinished
        case complete
    }

    /// Looks at `path` without changing anything.
    public static func state(of path: String) throws -> State {
        var st = stat()
        guard lstat(path, &st) == 0 else {
            if errno == ENOENT { return .absent }
            if errno == ENOTDIR, let problem = OutputDirectory.creationProblem(path) {
                throw RunDirectoryError("\(path): cannot create the run directory: \(problem)")
            }
            throw RunDirectoryError("\(path): cannot read the run directory: \(String(cString: strerror(errno)))")
        }
        guard (st.st_mode & S_IFMT) == S_IFDIR else {
            throw RunDirectoryError("\(path): run directory is \((st.st_mode & S_IFMT) == S_IFLNK ? "a symbolic link" : "a file"), expected a directory")
        }
        let contents = (try? FileManager.default.contentsOfDirectory(atPath: path)) ?? []
        if contents.isEmpty { return .empty }
        let manifest = join(path, "run.json")
        if contents.contains("run.json") {
            guard let data = FileManager.default.contents(atPath: manifest),
                  let json = try? JSONSerialization.jsonObject(with: data) as? [String: Any],
                  json["format"] as? String == "topiary-run" else { return .foreign("run.json") }
            let log = try EventLog.records(path: join(path, "events.jsonl"))
            return log.contains { if case .complete = $0.event { return true } else { return false } } ? .complete : .unfinished
        }
        if contents.contains(lockName) {
            let lock = join(path, lockName)
            let size = (try? FileManager.default.attributesOfItem(atPath: lock)[.size] as? Int) ?? nil
            if Lock.holder(lock) != nil || size == 0 { return .started }
            // A run that stopped between sampling its calibration (--calib generate) and writing run.json.
            if contents.allSatisfy({ $0 == lockName || $0 == generatedCalibrationName || ($0.hasPrefix(".") && $0.contains(".tmp-")) }) { return .started }
        }
        let ownFiles: Set<String> = [lockName, generatedCalibrationName]
        return .foreign(contents.sorted().first { !ownFiles.contains($0) } ?? contents.sorted()[0])
    }

    /// Why the run.json in `path` is not a run's record (`state(of:)` found it `.foreign`).
    static func manifestProblem(_ path: String) -> String {
        let manifest = join(path, "run.json")
        guard let data = FileManager.default.contents(atPath: manifest) else { return "\(manifest): cannot be read" }
        guard let any = try? JSONSerialization.jsonObject(with: data) else {
            return "\(manifest): not valid JSON (\(data.count) bytes), so not the record of a Topiary run"
        }
        guard let json = any as? [String: Any] else { return "\(manifest): not a JSON object, so not the record of a Topiary run" }
        return "\(manifest): field 'format' is \(json["format"].map { "'\($0)'" } ?? "missing"), expected 'topiary-run'"
    }

    /// Whether `path` can take a new run (changing nothing): refuses a directory that is not a run
    /// directory (it would mix Topiary's files with the user's) or holds an unfinished run.
    @discardableResult
    public static func checkForNewRun(_ path: String) throws -> State {
        let found = try state(of: path)
        switch found {
        case .foreign("run.json"):
            throw RunDirectoryError("\(path): exists and is not a Topiary run directory (\(manifestProblem(path))); Topiary would mix its files with yours: give --run-dir a new or empty directory")
        case .foreign(let entry):
            throw RunDirectoryError("\(path): exists and is not a Topiary run directory (it holds '\(entry)' and no run.json of a run); Topiary would mix its files with yours: give --run-dir a new or empty directory")
        case .unfinished:
            throw RunDirectoryError("\(path): holds an unfinished run; continue it with 'topiary prune --resume \(path)', or remove the directory to start again")
        default:
            return found
        }
    }

    /// Takes the directory for a new run: creates it when absent; refuses one that is not a run
    /// directory, or holds an unfinished run, or is in use; clears a finished run's record.
    public static func create(path: String) throws -> RunDirectory {
        switch try checkForNewRun(path) {
        case .absent:
            if let problem = OutputDirectory.makeDirectories(path) {
                throw RunDirectoryError("\(path): cannot create the run directory: \(problem)")
            }
        default: break
        }
        guard access(path, W_OK) == 0 else {
            throw RunDirectoryError("\(path): run directory is not writable (\(String(cString: strerror(errno))))")
        }
        let lock = try Lock.acquire(directory: path)
        do {
            // Again under the lock: another process may have started a run meanwhile.
            try checkForNewRun(path)
            clearRecord(path)
            return try RunDirectory(path: path, lock: lock)
        } catch {
            close(lock)
            throw error
        }
    }

    /// Opens the run directory of an existing run (--resume): never creates anything, refuses a
    /// directory without run.json, takes the lock and checks run.json's checksum.
    public static func open(existing path: String) throws -> RunDirectory {
        var st = stat()
        if lstat(path, &st) != 0 && errno == ENOTDIR {
            let problem = OutputDirectory.creationProblem(path) ?? "a parent is not a directory"
            throw RunDirectoryError("\(path): no such run directory (\(problem)); nothing to resume")
        }
        switch try state(of: path) {
        case .absent:
            throw RunDirectoryError("\(path): no such run directory; nothing to resume (a run directory is made by 'topiary prune ... --run-dir DIR', by default OUTPUT.run)")
        case .foreign("run.json"):
            throw RunDirectoryError("\(manifestProblem(path)); nothing to resume (a run cannot continue without its record: start it again)")
        case .empty, .foreign, .started:
            throw RunDirectoryError("\(path): not a Topiary run directory, or its run never started (no run.json); nothing to resume")
        case .unfinished, .complete:
            break
        }
        let lock = try Lock.acquire(directory: path)
        do {
            let run = try RunDirectory(path: path, lock: lock)
            _ = try run.readManifest()
            // A completed run's checkpoints are gone and stay gone (nothing is written to it).
            if try state(of: path) == .complete { _ = rmdir(run.store.directory) }
            return run
        } catch {
            close(lock)
            throw error
        }
    }

    private init(path: String, lock: Int32) throws {
        self.path = path
        lockDescriptor = lock
        store = try BlockFileStore(directory: Self.join(path, "blocks"))
        events = try EventLog(path: Self.join(path, "events.jsonl"))
    }

    deinit { close(lockDescriptor) }

    /// Removes a previous run's record and checkpoints (only files a run writes), before a new run.
    static func clearRecord(_ path: String) {
        for name in ["run.json", "events.jsonl", "report.json"] { _ = unlink(join(path, name)) }
        removeOwnFiles(in: path, where: { $0.hasPrefix("activations-") && $0.hasSuffix(".bin") })
        removeCheckpointFiles(path)
    }

    /// Removes the files in `directory` that satisfy `predicate`, and the temporary files of
    /// interrupted atomic writes (.NAME.tmp-PID-XXXXXXXX).
    static func removeOwnFiles(in directory: String, where predicate: (String) -> Bool) {
        for name in (try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? [] where predicate(name) || (name.hasPrefix(".") && name.contains(".tmp-")) {
            _ = unlink(join(directory, name))
        }
    }

    /// Removes the block, boundary and activation checkpoints (only those), and their directories
    /// when nothing else is in them.
    static func removeCheckpointFiles(_ path: String) {
        let safetensors: (String, String) -> (String) -> Bool = { prefix, suffix in { $0.hasPrefix(prefix) && $0.hasSuffix(suffix) } }
        for (sub, prefix) in [("blocks", "block-"), ("blocks", "kept-r"), ("boundaries", "boundary-"), ("activations", "")] {
            let directory = join(path, sub)
            removeOwnFiles(in: directory, where: safetensors(prefix, ".safetensors"))
            _ = rmdir(directory)
        }
    }

    public var hasManifest: Bool { FileManager.default.fileExists(atPath: manifestPath) }

    /// The version of run.json this Topiary writes and reads.
    public static let manifestVersion = 2

    /// The canonical bytes a checksum covers: the object without its `checksum`, keys sorted.
    static func checksum(of manifest: [String: Any]) throws -> String {
        var body = manifest
        body["checksum"] = nil
        let data = try JSONSerialization.data(withJSONObject: body, options: [.sortedKeys, .withoutEscapingSlashes])
        var digest = SHA256Digest()
        digest.update(Data("topiary-run.json\n".utf8))
        digest.update(data)
        return digest.finish()
    }

    /// Writes run.json (atomically), with a fresh run id, the format version and its checksum,
    /// which becomes the run's identity. The checksum is over the JSON object (see `checksum(of:)`),
    /// so it is the same for the same contents whatever wrote them.
    public func writeManifest(_ manifest: RunManifest) throws {
        var typed = manifest
        typed.version = Self.manifestVersion
        typed.checksum = nil
        if typed.runID == nil { typed.runID = UUID().uuidString.lowercased() }
        guard var m = try JSONSerialization.jsonObject(with: try JSONEncoder().encode(typed)) as? [String: Any] else {
            throw RunDirectoryError("\(manifestPath): the run's record is not a JSON object")
        }
        let sum = try Self.checksum(of: m)
        m["checksum"] = sum
        let data = try JSONSerialization.data(withJSONObject: m, options: [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes])
        try AtomicFile.write(data + Data("\n".utf8), to: manifestPath)
        identity = sum
    }

    /// Reads run.json, refusing one whose checksum does not match (an edited or damaged file),
    /// or whose fields are not those Topiary writes.
    public func readManifest() throws -> RunManifest {
        guard let data = FileManager.default.contents(atPath: manifestPath) else {
            throw RunDirectoryError("\(manifestPath): missing; \(path) is not a Topiary run directory (or its run never started)")
        }
        guard let json = try? JSONSerialization.jsonObject(with: data) as? [String: Any] else {
            throw RunDirectoryError("\(manifestPath): not a JSON object")
        }
        guard json["format"] as? String == "topiary-run" else {
            throw RunDirectoryError("\(manifestPath): field 'format' is \(json["format"].map { "\($0)" } ?? "missing"), expected \"topiary-run\"")
        }
        guard json["version"] as? Int == Self.manifestVersion else {
            throw RunDirectoryError("\(manifestPath): version \(json["version"].map { "\($0)" } ?? "missing") is not the version \(Self.manifestVersion) this Topiary (\(json["tool_version"].map { "\($0)" } ?? "?") wrote it) resumes; start the run again")
        }
        guard let recorded = json["checksum"] as? String, recorded == (try Self.checksum(of: json)) else {
            throw RunDirectoryError("\(manifestPath): its checksum does not match its contents, so it was edited or damaged; a run's options cannot change once it started (give the options that may change on the command line, or start a new run)")
        }
        let manifest: RunManifest
        do { manifest = try JSONDecoder().decode(RunManifest.self, from: data) } catch {
            throw RunDirectoryError("\(manifestPath): fields 'options' and 'flags' missing or not what Topiary writes (\(error))")
        }
        identity = recorded
        return manifest
    }

    // MARK: Checkpoints

    /// The metadata every checkpoint file carries: the run it belongs to, and what it is.
    func checkpointMetadata(_ fields: [String: String]) -> [String: String] {
        fields.merging(["run": identity ?? "", "format": "topiary-checkpoint"]) { $1 }
    }

    /// Writes a pruned block (atomically), with the run's identity and its index in the metadata.
    func writeBlock(_ block: DecoderBlock) throws {
        var writer = SafeTensorsWriter(directory: store.directory, metadata: checkpointMetadata(["block": "\(block.index)"]))
        for name in block.tensors.keys.sorted() {
            let m = block.tensors[name]!
            let shape = m.rows == 1 && (name.hasSuffix(".bias") || name.hasSuffix("norm.weight")) ? [m.cols] : [m.rows, m.cols]
            try writer.add(name: name, matrix: m, shape: shape, dtype: .f32)
        }
        try writer.writeSingleFile(to: store.path(block.index))
    }

    /// Writes a pruned block and records it (with its SHA-256 and report) in events.jsonl.
    public func recordBlock(_ block: DecoderBlock, report: BlockReport?, worker: String, round: Int? = nil) throws {
        guard identity != nil else { throw RunDirectoryError("\(manifestPath): a block was finished before run.json was written") }
        try writeBlock(block)
        let sha = try SHA256Digest.files([store.path(block.index)])
        try events.append(.blockDone(block: block.index, sha256: sha, worker: worker, report: report, round: round))
    }

    /// The blocks recorded as done whose files still match their checksums and belong to this run
    /// and block, with their reports and (ADMM) the round that wrote them. A block whose file is
    /// missing or differs from its recorded SHA-256 is reported (event `checkpoint_corrupt`); one
    /// whose file belongs to another run, other options or another block is reported (event
    /// `checkpoint_refused`, with the reason). Either way its file is removed and it is left out,
    /// so that it is redone.
    public func verifiedBlocks() throws -> [Int: FinishedBlock] {
        var latest: [Int: (sha256: String, report: BlockReport?, round: Int?)] = [:]
        for record in try events.records() {
            guard case .blockDone(let b, let sha, _, let report, let round) = record.event else { continue }
            latest[b] = (sha, report, round)
        }
        var result: [Int: FinishedBlock] = [:]
        for (b, e) in latest.sorted(by: { $0.key < $1.key }) {
            let file = store.path(b)
            guard try matches(file, e.sha256, reporting: .block(b), missing: "missing") else {
                _ = unlink(file)
                continue
            }
            if let problem = bindingProblem(file, expected: ["block": "\(b)"], tensorsOfBlock: b) {
                try events.append(.checkpointRefused(.block(b), file: file, reason: problem))
                _ = unlink(file)
                continue
            }
            result[b] = FinishedBlock(report: e.report, round: e.round)
        }
        return result
    }

    func activationsPath(_ name: String) -> String { Self.join(activationsDirectory, name + ".safetensors") }

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
        var writer = SafeTensorsWriter(directory: directory, metadata: checkpointMetadata(metadata))
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
    func matches(_ file: String, _ expected: String, reporting subject: CheckpointSubject, missing: String) throws -> Bool {
        let found = FileManager.default.fileExists(atPath: file) ? (try? SHA256Digest.files([file])) : nil
        if let found, found == expected { return true }
        try events.append(.checkpointCorrupt(subject, file: file, expectedSHA256: expected, foundSHA256: found ?? missing))
        return false
    }

    /// Why a checkpoint file that matches its recorded SHA-256 still cannot be used: it belongs to
    /// another run (or the same run with other options: run.json's checksum differs), or its
    /// metadata or tensors name another block. nil when it is this run's.
    func bindingProblem(_ file: String, expected: [String: String], tensorsOfBlock block: Int? = nil) -> String? {
        guard let f = try? SafeTensorsFile(path: file) else { return "unreadable safetensors file" }
        guard let identity, f.metadata["run"] == identity else {
            return f.metadata["run"] == nil ? "the file names no run (not written by this run)"
                : "the file belongs to another run or to other options (run \(f.metadata["run"]!.prefix(12)), this run \((identity ?? "").prefix(12)))"
        }
        for (key, value) in expected.sorted(by: { $0.key < $1.key }) where f.metadata[key] != value {
            return "the file is \(key) \(f.metadata[key] ?? "missing"), expected \(key) \(value)"
        }
        if let block {
            // Checkpoint names: the first number in a tensor's name is its block (model.layers.N....).
            for name in f.tensorNames {
                let first = name.split(separator: ".").first { !$0.isEmpty && $0.allSatisfy(\.isNumber) }
                guard first.flatMap({ Int($0) }) == block else {
                    return "tensor \(name) is not one of block \(block)'s"
                }
            }
        }
        return nil
    }

    /// Activations saved under `name`, if the file is there, matches `sha256` and belongs to this
    /// run; a mismatch is reported (`checkpoint_corrupt`, or `checkpoint_refused` with the reason)
    /// and gives nil.
    public func loadActivations(name: String, sha256 expected: String, make: () -> ActivationStore) throws -> ActivationStore? {
        let file = activationsPath(name)
        guard FileManager.default.fileExists(atPath: file),
              try matches(file, expected, reporting: .activations(name), missing: "unreadable") else { return nil }
        if let problem = bindingProblem(file, expected: ["name": name]) {
            try events.append(.checkpointRefused(.activations(name), file: file, reason: problem))
            return nil
        }
        return try readStore(try SafeTensorsFile(path: file), prefix: "", make: make)
    }

    /// Removes saved activations whose names satisfy `predicate`.
    public func removeActivations(where predicate: (String) -> Bool) {
        let directory = activationsDirectory
        for name in (try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? [] where name.hasSuffix(".safetensors") {
            if predicate(String(name.dropLast(".safetensors".count))) { _ = unlink(Self.join(directory, name)) }
        }
    }

    func boundaryPath(_ block: Int) -> String { Self.join(boundariesPath, String(format: "boundary-%05d.safetensors", block)) }

    /// Saves the activations entering `block` (atomically), records the checkpoint, and removes
    /// older boundary checkpoints.
    public func saveBoundary(_ boundary: Boundary, at block: Int) throws {
        let file = boundaryPath(block)
        let sha = try writeStores([("inputs/", boundary.inputs)] + (boundary.targets.map { [("targets/", $0)] } ?? []),
                                  to: file, metadata: ["block": "\(block)"])
        try events.append(.boundaryCheckpoint(block: block, sha256: sha, file: file))
        if let names = try? FileManager.default.contentsOfDirectory(atPath: boundariesPath) {
            for name in names where name.hasPrefix("boundary-") && name.hasSuffix(".safetensors") && name != (file as NSString).lastPathComponent {
                _ = unlink(Self.join(boundariesPath, name))
            }
        }
    }

    /// The latest verified boundary checkpoint at or before `block`, loaded into stores made by
    /// `make`; a checkpoint whose file differs from its recorded SHA-256 is reported and skipped.
    public func loadBoundary(atOrBefore block: Int, make: () -> ActivationStore) throws -> (block: Int, boundary: Boundary)? {
        var candidates: [Int: String] = [:]
        for record in try events.records() {
            if case .boundaryCheckpoint(let b, let sha, _) = record.event, b <= block { candidates[b] = sha }
        }
        for (b, expected) in candidates.sorted(by: { $0.key > $1.key }) {
            let file = boundaryPath(b)
            guard FileManager.default.fileExists(atPath: file) else { continue }   // superseded
            guard try matches(file, expected, reporting: .boundary(b), missing: "unreadable") else { continue }
            if let problem = bindingProblem(file, expected: ["block": "\(b)"]) {
                try events.append(.checkpointRefused(.boundary(b), file: file, reason: problem))
                continue
            }
            let f = try SafeTensorsFile(path: file)
            guard let inputs = try readStore(f, prefix: "inputs/", make: make) else {
                throw RunDirectoryError("\(file): no tensor inputs/000000; not a boundary checkpoint")
            }
            return (b, Boundary(inputs: inputs, targets: try readStore(f, prefix: "targets/", make: make)))
        }
        return nil
    }

    /// Removes the checkpoints once the output is written (run.json, events.jsonl and report.json
    /// stay). Only the files a run writes are removed, and their directories when then empty.
    public func removeCheckpoints() {
        Self.removeCheckpointFiles(path)
    }
}

/// The lock of a run directory: flock(2) on run.lock, held for the life of the process (the
/// descriptor is closed on exec, so worker processes do not inherit it). The file names its holder
/// (pid, host, start time) for the message another process gets.
enum Lock {
    static func acquire(directory: String) throws -> Int32 {
        let file = RunDirectory.join(directory, RunDirectory.lockName)
        let fd = open(file, O_RDWR | O_CREAT | O_CLOEXEC, 0o644)
        guard fd >= 0 else {
            throw RunDirectoryError("\(file): cannot open the run directory's lock: \(String(cString: strerror(errno)))")
        }
        if flock(fd, LOCK_EX | LOCK_NB) != 0 {
            let code = errno
            close(fd)
            guard code == EWOULDBLOCK else {
                throw RunDirectoryError("\(file): cannot lock the run directory: \(String(cString: strerror(code)))")
            }
            let who = holder(file).map { h in
                "pid \(h["pid"].map { "\($0)" } ?? "?") on host \(h["host"] as? String ?? "?")\((h["since"] as? String).map { ", since \($0)" } ?? "")"
            } ?? "a process that has not yet written its name"
            throw RunDirectoryError("\(directory): in use by another topiary prune (\(who)); one run at a time per run directory: wait for it to end, or stop it (a stopped run resumes with --resume)")
        }
        var host = [CChar](repeating: 0, count: 256)
        let hostName = gethostname(&host, host.count - 1) == 0
            ? String(decoding: host.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self) : "?"
        let info: [String: Any] = ["format": "topiary-run-lock", "pid": Int(getpid()), "host": hostName,
                                   "since": ISO8601DateFormatter().string(from: Date())]
        if var data = try? JSONSerialization.data(withJSONObject: info, options: [.sortedKeys]) {
            data.append(UInt8(ascii: "\n"))
            _ = ftruncate(fd, 0)
            _ = data.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, 0) }
            _ = fsync(fd)
        }
        return fd
    }

    /// The holder recorded in a lock file, when it is one of Topiary's.
    static func holder(_ file: String) -> [String: Any]? {
        guard let data = FileManager.default.contents(atPath: file),
              let json = try? JSONSerialization.jsonObject(with: data) as? [String: Any],
              json["format"] as? String == "topiary-run-lock" else { return nil }
        return json
    }
}

/// A block finished by an earlier attempt of a run: its report, and the ADMM round that wrote it.
public struct FinishedBlock: Sendable {
    public var report: BlockReport?
    public var round: Int?
}

/// events.jsonl: one JSON object per line ({"event": ..., "time": ..., ...}; `RunEvent`), each
/// appended with one write and fsynced. Safe to call from several threads.
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

    /// Appends one event, stamped with the time, and flushes it to disk.
    public func append(_ event: RunEvent) throws {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        var data = try encoder.encode(RunEventRecord(event, time: ISO8601DateFormatter().string(from: Date())))
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
            throw RunDirectoryError("\(path): cannot append event '\(event.name)': \(reason)")
        }
    }

    /// Every complete event, as JSON objects; a torn last line (a crash mid-append) is ignored.
    public func read() throws -> [[String: Any]] { try Self.read(path: path) }

    /// Every complete event, typed; a torn last line, and a line that is not one of the events
    /// `RunEvent` knows, are ignored.
    public func records() throws -> [RunEventRecord] { try Self.records(path: path) }

    /// The typed events of the log at `path` (none when it is absent).
    public static func records(path: String) throws -> [RunEventRecord] {
        guard let data = FileManager.default.contents(atPath: path) else { return [] }
        let decoder = JSONDecoder()
        return data.split(separator: UInt8(ascii: "\n")).compactMap { try? decoder.decode(RunEventRecord.self, from: Data($0)) }
    }

    /// The events of the log at `path` (none when it is absent).
    public static func read(path: String) throws -> [[String: Any]] {
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
