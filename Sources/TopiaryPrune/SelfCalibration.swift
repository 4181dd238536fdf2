import Foundation
import TopiaryModel

/// Self-calibration (Williams, Chrysostomou and Aletras, "Self-calibration for language model
/// quantization and pruning", NAACL 2025, arXiv 2410.17170): calibration sequences sampled from
/// the model being pruned, each starting from its BOS token, with a temperature that moves
/// linearly over the sequence. `--calib generate:N[:L]`.
///
/// The tokens are drawn by `Generation.sample` (KV cache, SplitMix64 seeded with --seed) and kept
/// in the run directory as `calibration-generated.json`, with the settings that produced them.
public enum SelfCalibration {
    /// The cache's file name in the run directory.
    public static let cacheName = "calibration-generated.json"
    static let format = "topiary-generated-calibration"

    /// The temperature schedule: T = 1 throughout, the model's own distribution (a constant
    /// schedule). Measured on SmolLM2 (docs/evaluation.md, "Self-calibration's temperature"):
    /// the linear 2.0 -> 0.6 used before gave SparseGPT 70% 505.1 and 464.6 on two held-out
    /// texts where T = 1 gives 197.9 and 150.7.
    public static let schedule = TemperatureSchedule(initial: 1.0, final: 1.0)

    /// Sequences sampled together (their KV caches together): bounds the cache to 16 x L
    /// positions per block. Part of the result (GEMM row counts), so fixed, and recorded.
    public static let batch = 16

    /// `generate:N[:L]` as given to --calib.
    public struct Spec: Equatable, Sendable {
        public var samples: Int
        public var sequenceLength: Int?

        public init(samples: Int, sequenceLength: Int?) {
            self.samples = samples
            self.sequenceLength = sequenceLength
        }
    }

    /// Whether a --calib value asks for generation (then it is never a file name).
    public static func isSpec(_ value: String) -> Bool { value.hasPrefix("generate:") || value == "generate" }

    /// Parses `generate:N[:L]`; N in 1...maxSamples, L at least 2 (BOS and one sampled token).
    /// Errors name the option and say what was wrong.
    public static func parse(_ value: String, maxSamples: Int) throws -> Spec {
        let usage = "--calib generate:N[:L] (N sequences of L tokens sampled from the model, e.g. generate:128:2048)"
        let parts = value.split(separator: ":", omittingEmptySubsequences: false).map(String.init)
        guard parts.first == "generate", parts.count == 2 || parts.count == 3 else {
            throw PruneError.invalidOption("\(usage): got '\(value)'")
        }
        func number(_ text: String, _ what: String) throws -> Int {
            guard !text.isEmpty, text.allSatisfy({ $0.isASCII && $0.isNumber }), let n = Int(text) else {
                throw PruneError.invalidOption("\(usage): \(what) '\(text)' in '\(value)' is not a whole number")
            }
            return n
        }
        let n = try number(parts[1], "N")
        guard (1...maxSamples).contains(n) else {
            throw PruneError.invalidOption("\(usage): N must be from 1 to \(maxSamples), got \(parts[1]) in '\(value)'")
        }
        var length: Int?
        if parts.count == 3 {
            let l = try number(parts[2], "L")
            guard l >= 2 else {
                throw PruneError.invalidOption("\(usage): L must be at least 2 (the BOS token and one sampled token), got \(parts[2]) in '\(value)'")
            }
            length = l
        }
        return Spec(samples: n, sequenceLength: length)
    }

    /// What produced a set of generated sequences: a cache is reused only when all of it matches.
    public struct Settings: Equatable, Sendable {
        public var samples: Int
        public var sequenceLength: Int
        public var seed: Int
        public var startToken: Int
        public var schedule: TemperatureSchedule
        /// The model's fingerprint (the run directory's).
        public var model: String

        public init(samples: Int, sequenceLength: Int, seed: Int, startToken: Int, schedule: TemperatureSchedule = SelfCalibration.schedule, model: String) {
            self.samples = samples
            self.sequenceLength = sequenceLength
            self.seed = seed
            self.startToken = startToken
            self.schedule = schedule
            self.model = model
        }

        /// The seed as SplitMix64 takes it: the integer's two's-complement bits.
        public var generatorSeed: UInt64 { UInt64(bitPattern: Int64(seed)) }

        /// The settings as report.json and the cache record them.
        public var json: [String: Any] {
            ["source": "generate", "samples": samples, "seqlen": sequenceLength, "seed": seed, "start_token": startToken,
             "schedule": scheduleJSON, "rng": "splitmix64 per sequence", "batch": SelfCalibration.batch, "sampling": "softmax(logits / T), full-precision logits",
             "model_fingerprint": model]
        }

        var scheduleJSON: [String: Any] {
            ["kind": "linear", "initial_temperature": schedule.initial, "final_temperature": schedule.final]
        }

        /// How two settings differ, for the refusal message ("seed 1 (the cache has 0)").
        func differences(from cached: Settings) -> [String] {
            var d: [String] = []
            if samples != cached.samples { d.append("samples \(samples) (the cache has \(cached.samples))") }
            if sequenceLength != cached.sequenceLength { d.append("seqlen \(sequenceLength) (the cache has \(cached.sequenceLength))") }
            if seed != cached.seed { d.append("seed \(seed) (the cache has \(cached.seed))") }
            if startToken != cached.startToken { d.append("start token \(startToken) (the cache has \(cached.startToken))") }
            if schedule != cached.schedule {
                d.append("temperature \(schedule.initial)->\(schedule.final) (the cache has \(cached.schedule.initial)->\(cached.schedule.final))")
            }
            if model != cached.model { d.append("model fingerprint \(model.prefix(12)) (the cache has \(cached.model.prefix(12)))") }
            return d
        }
    }

    /// The sequences, freshly sampled.
    public static func generate(model: LanguageModel, settings s: Settings, progress: ((Int, Int) -> Void)? = nil) throws -> [[Int]] {
        try Generation.sample(model: model, sequences: s.samples, length: s.sequenceLength, start: s.startToken, schedule: s.schedule,
                              seed: s.generatorSeed, batch: batch, progress: progress)
    }

    /// The cache's bytes: the settings and the token ids, one sequence a line.
    public static func encode(_ windows: [[Int]], settings: Settings) throws -> Data {
        var head = settings.json
        head["format"] = format
        head["version"] = 1
        let headData = try JSONSerialization.data(withJSONObject: head, options: [.sortedKeys, .withoutEscapingSlashes])
        var text = String(decoding: headData.dropLast(), as: UTF8.self)   // without the closing brace
        text += ",\"tokens\":[\n"
        text += windows.map { "[" + $0.map(String.init).joined(separator: ",") + "]" }.joined(separator: ",\n")
        text += "\n]}\n"
        return Data(text.utf8)
    }

    /// Reads a cache: its settings and sequences. Anything that is not such a file is an error naming it.
    public static func decode(_ data: Data, path: String) throws -> (settings: Settings, windows: [[Int]]) {
        func bad(_ why: String) -> PruneError { .calibration("\(path): \(why); remove it to sample again") }
        guard let json = try? JSONSerialization.jsonObject(with: data) as? [String: Any], json["format"] as? String == format else {
            throw bad("not a generated-calibration cache (\(format) JSON)")
        }
        guard json["version"] as? Int == 1 else { throw bad("version \(json["version"] ?? "none") is not 1") }
        guard json["batch"] as? Int == batch, json["rng"] as? String == "splitmix64 per sequence" else {
            throw bad("it was sampled by another generator or batch size (batch \(json["batch"] ?? "none"), rng \(json["rng"] ?? "none"))")
        }
        guard let samples = json["samples"] as? Int, let length = json["seqlen"] as? Int, let seed = json["seed"] as? Int,
              let start = json["start_token"] as? Int, let model = json["model_fingerprint"] as? String,
              let schedule = json["schedule"] as? [String: Any], schedule["kind"] as? String == "linear",
              let t0 = (schedule["initial_temperature"] as? NSNumber)?.doubleValue, let t1 = (schedule["final_temperature"] as? NSNumber)?.doubleValue,
              let rows = json["tokens"] as? [[Any]] else {
            throw bad("its settings are incomplete")
        }
        let settings = Settings(samples: samples, sequenceLength: length, seed: seed, startToken: start,
                                schedule: TemperatureSchedule(initial: t0, final: t1), model: model)
        var windows: [[Int]] = []
        for (i, row) in rows.enumerated() {
            let ids = row.compactMap { ($0 as? NSNumber).flatMap { $0.doubleValue == $0.doubleValue.rounded() ? $0.intValue : nil } }
            guard ids.count == row.count, ids.count == length else { throw bad("sequence \(i) is not \(length) token ids") }
            windows.append(ids)
        }
        guard windows.count == samples else { throw bad("it holds \(windows.count) sequences, its settings say \(samples)") }
        return (settings, windows)
    }

    /// How the sequences were obtained.
    public enum Origin: String, Sendable { case generated, cached }

    /// The sequences for `settings` in `directory`: the cache when its settings match; otherwise
    /// sampled and cached (written atomically) — unless `mustMatch` (a resumed run), which refuses
    /// a cache whose settings differ, naming the differences.
    public static func load(model: LanguageModel, settings: Settings, directory: String, mustMatch: Bool,
                            progress: ((Int, Int) -> Void)? = nil) throws -> (windows: [[Int]], origin: Origin) {
        let path = (directory as NSString).appendingPathComponent(cacheName)
        if let data = FileManager.default.contents(atPath: path) {
            let cached = try decode(data, path: path)
            if cached.settings == settings {
                if let bad = cached.windows.joined().first(where: { $0 < 0 || $0 >= model.config.vocabularySize }) {
                    throw PruneError.calibration("\(path): token id \(bad) is outside the model's vocabulary of \(model.config.vocabularySize); remove it to sample again")
                }
                return (cached.windows, .cached)
            }
            if mustMatch {
                throw PruneError.calibration("\(path): the generated calibration was made with other settings than this run's: \(settings.differences(from: cached.settings).joined(separator: "; ")); remove it to sample again")
            }
        }
        let windows = try generate(model: model, settings: settings, progress: progress)
        try AtomicFile.write(try encode(windows, settings: settings), to: path)
        return (windows, .generated)
    }
}
