import Foundation
import TopiaryPrune

/// A worker's range in a run's plan, as run.json and the `start` and `resume` events record it.
public struct PlanEntry: Codable, Equatable, Sendable {
    /// First and last block of the range (inclusive).
    public var first: Int
    public var last: Int
    /// The worker's name ("worker@host:port", or "in-process").
    public var worker: String
    /// The process id of a local worker process that this run started (of replica 0 for a stage
    /// of replicas).
    public var pid: Int?
    /// `--replicas`: the stage's replicas, in rank order ("worker@host:port"), and their process ids.
    public var replicas: [String]?
    public var replicaPIDs: [Int]?
    /// Why the planner chose this range: its modelled FLOPs, and the machines that share it.
    public var modelledFLOPs: Double?
    public var machines: Int?

    public init(first: Int, last: Int, worker: String, pid: Int? = nil, replicas: [String]? = nil, replicaPIDs: [Int]? = nil) {
        self.first = first
        self.last = last
        self.worker = worker
        self.pid = pid
        self.replicas = replicas
        self.replicaPIDs = replicaPIDs
    }

    public var blocks: ClosedRange<Int>? { first <= last ? first...last : nil }

    enum CodingKeys: String, CodingKey {
        case first, last, worker, pid, replicas
        case replicaPIDs = "replica_pids", modelledFLOPs = "modelled_flops", machines
    }
}

/// What a checkpoint event is about: a block, the boundary entering a block, or saved
/// activations (ADMM), under the keys `block`, `boundary` and `activations`.
public enum CheckpointSubject: Equatable, Sendable {
    case block(Int)
    case boundary(Int)
    case activations(String)
}

/// Where in a run a worker was lost or a range reassigned: an ADMM round, or a phase ("dense
/// pass"); neither for a sequential run.
public struct EventContext: Equatable, Sendable {
    public var round: Int?
    public var phase: String?
    public init(round: Int? = nil, phase: String? = nil) {
        self.round = round
        self.phase = phase
    }
}

/// One event of events.jsonl (docs/run-directory.md, "events.jsonl"), with the fields the table
/// there gives each; `EventLog` adds `event` and `time`. Encoded and decoded under exactly those
/// keys, so a log written by an earlier Topiary reads back.
public enum RunEvent: Sendable {
    case start(plan: [PlanEntry], blocks: Int)
    case resume(plan: [PlanEntry], finishedBlocks: [Int])
    case blockDone(block: Int, sha256: String, worker: String, report: BlockReport?, round: Int?)
    case boundaryCheckpoint(block: Int, sha256: String, file: String)
    case replayed(first: Int, last: Int, round: Int?)
    /// `finishedThrough`: the last block the worker finished (first - 1: none); absent for an ADMM
    /// round's partition.
    case workerLost(worker: String, error: String, first: Int, last: Int, finishedThrough: Int?, context: EventContext)
    case reassigned(first: Int, last: Int, from: String, to: String, context: EventContext)
    case checkpointCorrupt(CheckpointSubject, file: String, expectedSHA256: String, foundSHA256: String)
    case checkpointRefused(CheckpointSubject, file: String, reason: String)
    case admmDense(sha256: [String])
    /// `modelError` and `calibrationLoss`: the hidden-state error and the language-model loss on the
    /// calibration windows of the model that this round's weights make (absent in logs of earlier
    /// Topiary versions); `kept`: the round whose weights the run keeps
    /// so far (the smallest such error), whose blocks are then in blocks/kept-r….
    case admmRound(round: Int, residuals: [Double], outputError: Double, modelError: Double?, calibrationLoss: Double?, kept: Int?,
                   inputsSHA256: [String]?, dualsSHA256: [String]?)
    case interrupted(signal: String, exitCode: Int)
    case complete(output: String, outputSHA256: String)

    /// The `event` value.
    public var name: String {
        switch self {
        case .start: return "start"
        case .resume: return "resume"
        case .blockDone: return "block_done"
        case .boundaryCheckpoint: return "boundary_checkpoint"
        case .replayed: return "replayed"
        case .workerLost: return "worker_lost"
        case .reassigned: return "reassigned"
        case .checkpointCorrupt: return "checkpoint_corrupt"
        case .checkpointRefused: return "checkpoint_refused"
        case .admmDense: return "admm_dense"
        case .admmRound: return "admm_round"
        case .interrupted: return "interrupted"
        case .complete: return "complete"
        }
    }
}

/// A line of events.jsonl: the event and when it was appended (UTC, ISO 8601).
public struct RunEventRecord: Codable, Sendable {
    public var event: RunEvent
    public var time: String

    public init(_ event: RunEvent, time: String) {
        self.event = event
        self.time = time
    }

    struct Key: CodingKey {
        var stringValue: String
        var intValue: Int? { nil }
        init(_ s: String) { stringValue = s }
        init?(stringValue: String) { self.stringValue = stringValue }
        init?(intValue: Int) { nil }
    }

    public func encode(to encoder: Encoder) throws {
        var c = encoder.container(keyedBy: Key.self)
        func put<T: Encodable>(_ key: String, _ value: T?) throws { try c.encodeIfPresent(value, forKey: Key(key)) }
        try put("event", event.name)
        try put("time", time)
        func subject(_ s: CheckpointSubject) throws {
            switch s {
            case .block(let b): try put("block", b)
            case .boundary(let b): try put("boundary", b)
            case .activations(let name): try put("activations", name)
            }
        }
        func context(_ x: EventContext) throws {
            try put("round", x.round)
            try put("phase", x.phase)
        }
        switch event {
        case .start(let plan, let blocks):
            try put("plan", plan); try put("blocks", blocks)
        case .resume(let plan, let finished):
            try put("plan", plan); try put("finished_blocks", finished)
        case .blockDone(let block, let sha, let worker, let report, let round):
            try put("block", block); try put("sha256", sha); try put("worker", worker); try put("report", report); try put("round", round)
        case .boundaryCheckpoint(let block, let sha, let file):
            try put("block", block); try put("sha256", sha); try put("file", file)
        case .replayed(let first, let last, let round):
            try put("first", first); try put("last", last); try put("round", round)
        case .workerLost(let worker, let error, let first, let last, let through, let x):
            try put("worker", worker); try put("error", error); try put("first", first); try put("last", last)
            try put("finished_through", through); try context(x)
        case .reassigned(let first, let last, let from, let to, let x):
            try put("first", first); try put("last", last); try put("from", from); try put("to", to); try context(x)
        case .checkpointCorrupt(let s, let file, let expected, let found):
            try subject(s); try put("file", file); try put("expected_sha256", expected); try put("found_sha256", found)
        case .checkpointRefused(let s, let file, let reason):
            try subject(s); try put("file", file); try put("reason", reason)
        case .admmDense(let shas):
            try put("sha256", shas)
        case .admmRound(let round, let residuals, let outputError, let modelError, let loss, let kept, let inputs, let duals):
            try put("round", round); try put("residuals", residuals); try put("output_error", outputError)
            try put("model_error", modelError); try put("calibration_loss", loss); try put("kept", kept)
            try put("inputs_sha256", inputs); try put("duals_sha256", duals)
        case .interrupted(let signal, let code):
            try put("signal", signal); try put("exit_code", code)
        case .complete(let output, let sha):
            try put("output", output); try put("output_sha256", sha)
        }
    }

    /// An unknown `event` value is an error (the reader skips that line).
    public init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: Key.self)
        func get<T: Decodable>(_ key: String, _ type: T.Type = T.self) throws -> T { try c.decode(T.self, forKey: Key(key)) }
        func opt<T: Decodable>(_ key: String, _ type: T.Type = T.self) throws -> T? { try c.decodeIfPresent(T.self, forKey: Key(key)) }
        func subject() throws -> CheckpointSubject {
            if let b: Int = try opt("block") { return .block(b) }
            if let b: Int = try opt("boundary") { return .boundary(b) }
            return .activations(try get("activations"))
        }
        func context() throws -> EventContext { EventContext(round: try opt("round"), phase: try opt("phase")) }
        time = try get("time")
        let name: String = try get("event")
        switch name {
        case "start": event = .start(plan: try get("plan"), blocks: try get("blocks"))
        case "resume": event = .resume(plan: try get("plan"), finishedBlocks: try get("finished_blocks"))
        case "block_done":
            // A report that does not decode leaves the block counted, without its report.
            event = .blockDone(block: try get("block"), sha256: try get("sha256"), worker: try get("worker"),
                               report: (try? opt("report", BlockReport.self)) ?? nil, round: try opt("round"))
        case "boundary_checkpoint": event = .boundaryCheckpoint(block: try get("block"), sha256: try get("sha256"), file: try get("file"))
        case "replayed": event = .replayed(first: try get("first"), last: try get("last"), round: try opt("round"))
        case "worker_lost":
            event = .workerLost(worker: try get("worker"), error: try get("error"), first: try get("first"), last: try get("last"),
                                finishedThrough: try opt("finished_through"), context: try context())
        case "reassigned":
            event = .reassigned(first: try get("first"), last: try get("last"), from: try get("from"), to: try get("to"), context: try context())
        case "checkpoint_corrupt":
            event = .checkpointCorrupt(try subject(), file: try get("file"), expectedSHA256: try get("expected_sha256"), foundSHA256: try get("found_sha256"))
        case "checkpoint_refused": event = .checkpointRefused(try subject(), file: try get("file"), reason: try get("reason"))
        case "admm_dense": event = .admmDense(sha256: try get("sha256"))
        case "admm_round":
            event = .admmRound(round: try get("round"), residuals: try get("residuals"), outputError: try get("output_error"),
                               modelError: try opt("model_error"), calibrationLoss: try opt("calibration_loss"), kept: try opt("kept"),
                               inputsSHA256: try opt("inputs_sha256"), dualsSHA256: try opt("duals_sha256"))
        case "interrupted": event = .interrupted(signal: try get("signal"), exitCode: try get("exit_code"))
        case "complete": event = .complete(output: try get("output"), outputSHA256: try get("output_sha256"))
        default:
            throw DecodingError.dataCorruptedError(forKey: Key("event"), in: c, debugDescription: "unknown event '\(name)'")
        }
    }
}

/// run.json (docs/run-directory.md, "run.json"): what a run is. `RunDirectory.writeManifest`
/// adds `version`, a fresh `run_id` and the `checksum`; `readManifest` checks them.
public struct RunManifest: Codable, Sendable {
    public struct ModelRecord: Codable, Sendable {
        public var path: String
        /// `ModelFingerprint` of the model.
        public var fingerprint: String
        public init(path: String, fingerprint: String) {
            self.path = path
            self.fingerprint = fingerprint
        }
    }

    public struct CalibrationRecord: Codable, Sendable {
        public var path: String
        public var sha256: String
        public init(path: String, sha256: String) {
            self.path = path
            self.sha256 = sha256
        }
    }

    public var format: String = "topiary-run"
    public var version: Int?
    public var toolVersion: String?
    public var created: String?
    public var model: ModelRecord?
    public var calibration: CalibrationRecord?
    /// The command's options as given (file paths absolute), and its flags.
    public var options: [String: String]
    public var flags: [String]
    public var plan: [PlanEntry]?
    /// `--allocation owl|learned`: the block sparsities chosen when the run started (and how), so
    /// that a resumed run prunes with them without measuring again.
    public var allocation: AllocationRecord?
    public var runID: String?
    public var checksum: String?

    public init(toolVersion: String, created: String, model: ModelRecord, calibration: CalibrationRecord,
                options: [String: String], flags: [String], plan: [PlanEntry]) {
        self.toolVersion = toolVersion
        self.created = created
        self.model = model
        self.calibration = calibration
        self.options = options
        self.flags = flags
        self.plan = plan
    }

    enum CodingKeys: String, CodingKey {
        case format, version, created, model, calibration, options, flags, plan, checksum, allocation
        case toolVersion = "tool_version", runID = "run_id"
    }
}
