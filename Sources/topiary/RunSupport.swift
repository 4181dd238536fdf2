import Foundation
import TopiaryCluster
import TopiaryModel
import TopiaryPrune

/// Exit code of a run stopped by SIGTERM or SIGINT: its run directory can be resumed
/// (`topiary prune --resume DIR`). EX_TEMPFAIL of sysexits.h.
let resumeExitCode: Int32 = 75

/// What the run directory needs from the prune command: creating run.json, merging a resumed
/// run's options, and stopping cleanly on a signal.
enum RunSupport {
    /// Options that do not change the result: they may differ when a run is resumed.
    static let resultNeutral: Set<String> = [
        "resume", "run-dir", "workers", "hosts", "replicas", "secret-file", "threads", "memory-budget", "eval-text", "eval-windows",
        "eval-seqlen", "skip-dense-eval", "json", "profile", "overwrite", "heartbeat-interval", "heartbeat-timeout", "connect-timeout", "weights",
    ]

    /// Options naming files: kept absolute in run.json, so a run resumes from any directory.
    static let pathOptions: Set<String> = ["model", "tokenizer", "calib", "output", "eval-text", "secret-file", "run-dir"]

    static func absolute(_ name: String, _ value: String) -> String {
        guard pathOptions.contains(name), !value.hasPrefix("/"), !(name == "calib" && SelfCalibration.isSpec(value)) else { return value }
        return URL(fileURLWithPath: value).standardizedFileURL.path
    }

    /// The options of the run in `directory` (run.json), with those given now merged in. An option
    /// that would change the result and differs from the run's is refused, naming it.
    static func resumedArguments(_ given: ParsedArguments, directory: String) throws -> (ParsedArguments, RunDirectory, RunManifest) {
        let run = try RunDirectory.open(existing: directory)
        let manifest = try run.readManifest()
        let stored = manifest.options, storedFlags = manifest.flags
        var values = stored
        var flags = Set(storedFlags)
        var changed: [String] = []
        for (name, raw) in given.allValues where name != "resume" {
            let value = absolute(name, raw)
            if !resultNeutral.contains(name), let old = stored[name], old != value { changed.append("--\(name) \(value) (the run has \(old))") }
            if !resultNeutral.contains(name), stored[name] == nil { changed.append("--\(name) \(value) (the run has none)") }
        }
        for name in given.allFlags where !resultNeutral.contains(name) && !storedFlags.contains(name) {
            changed.append("--\(name) (the run has none)")
        }
        guard changed.isEmpty else {
            throw UsageError(message: "topiary prune --resume: these options would change the result of the run in \(directory), so they cannot change on resume: \(changed.sorted().joined(separator: "; "))")
        }
        if given.string("workers") != nil || given.string("hosts") != nil {
            values["workers"] = nil
            values["hosts"] = nil
            values["replicas"] = nil
        }
        for (name, value) in given.allValues where name != "resume" { values[name] = value }
        flags.formUnion(given.allFlags)
        values["run-dir"] = directory
        return (ParsedArguments(command: given.command, values: values, flags: flags), run, manifest)
    }

    /// Checks that the model and calibration file are those the run started with.
    static func checkInputs(_ manifest: RunManifest, modelPath: String, calibPath: String, directory: String) throws {
        if let expected = manifest.model?.fingerprint {
            let found = try ModelFingerprint.compute(path: modelPath)
            guard found == expected else {
                throw ToolError("\(modelPath): the model differs from the one the run in \(directory) started with (fingerprint \(found.prefix(12)), expected \(expected.prefix(12)))")
            }
        }
        if let expected = manifest.calibration?.sha256 {
            let found = try SHA256Digest.files([calibPath])
            guard found == expected else {
                throw ToolError("\(calibPath): the calibration file differs from the one the run in \(directory) started with (sha256 \(found.prefix(12)), expected \(expected.prefix(12)))")
            }
        }
    }

    static func manifest(args: ParsedArguments, modelPath: String, calibPath: String, plan: [PlanEntry]) throws -> RunManifest {
        RunManifest(
            toolVersion: ToolVersion.string, created: ISO8601DateFormatter().string(from: Date()),
            model: .init(path: modelPath, fingerprint: try ModelFingerprint.compute(path: modelPath)),
            calibration: .init(path: calibPath, sha256: try SHA256Digest.files([calibPath])),
            options: Dictionary(uniqueKeysWithValues: args.allValues.filter { $0.key != "resume" }.map { ($0.key, absolute($0.key, $0.value)) }),
            flags: args.allFlags.sorted(),
            plan: plan)
    }

    nonisolated(unsafe) static var signalSources: [DispatchSourceSignal] = []

    /// On SIGTERM or SIGINT: record the interruption, stop local workers, exit with `resumeExitCode`.
    /// Finished blocks are already checkpointed and every file is written atomically, so stopping at
    /// any instant loses only the blocks in progress.
    static func installSignalHandlers(events: EventLog, directory: String, cleanup: @escaping @Sendable () -> Void) {
        for sig in [SIGTERM, SIGINT] {
            signal(sig, SIG_IGN)
            let source = DispatchSource.makeSignalSource(signal: sig, queue: DispatchQueue.global())
            source.setEventHandler {
                try? events.append(.interrupted(signal: sig == SIGTERM ? "SIGTERM" : "SIGINT", exitCode: Int(resumeExitCode)))
                // Console ends an open progress line first, so the message stands on its own line.
                Console.error("topiary prune: \(sig == SIGTERM ? "SIGTERM" : "SIGINT"): finished blocks are checkpointed in \(directory); continue with 'topiary prune --resume \(directory)' (exit code \(resumeExitCode))")
                cleanup()
                _exit(resumeExitCode)
            }
            source.resume()
            signalSources.append(source)
        }
    }
}
