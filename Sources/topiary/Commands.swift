import Foundation
import TopiaryCluster
import TopiaryModel
import TopiaryTensor
import TopiaryPrune
import TopiaryTokenizers

/// A `topiary` subcommand.
protocol Command: Sendable {
    static var name: String { get }
    static var summary: String { get }
    static var usage: String { get }
    static var details: String { get }
    static var options: [OptionSpec] { get }
    static func run(_ args: ParsedArguments) throws
}

enum CommonOptions {
    static let json = OptionSpec(name: "json", value: nil, help: "print one JSON object as the last line of stdout")
    static let threads = OptionSpec(name: "threads", value: "N", help: "compute threads (default: all cores); results are the same bits at any count")
    static let model = OptionSpec(name: "model", value: "PATH", help: "GGUF file, llama2.c .bin, or Hugging Face directory")
    static let tokenizer = OptionSpec(name: "tokenizer", value: "PATH", help: "tokenizer.bin (llama2.c) or tokenizer.json, when the model has none")
    static let device = OptionSpec(name: "device", value: "DEV", help: "compute backend: cpu (default) or cuda[:N]; 'topiary inspect --devices' lists what is found")

    static let precision = OptionSpec(name: "precision", value: "P", help: "arithmetic: f32 (default) or f64 (every step in Float64 on the CPU, to measure f32's rounding error; for small models)")

    static func apply(_ args: ParsedArguments) throws {
        if let n = try args.int("threads", in: 1...Limits.threads) { CPUBackend.setThreadCount(n) }
        let precision = try Self.precision(args)
        if args.string("device") != nil || precision == .f64 {
            var device = ComputeDevice.cpu
            if let text = args.string("device") {
                do { device = try ComputeDevice.parse(text) } catch { throw UsageError(message: "topiary \(args.command): \(error)") }
            }
            do { ComputeDevices.setDefaultBackend(try ComputeDevices.backend(for: device, precision: precision)) } catch let error as DeviceError {
                if case .invalid = error { throw UsageError(message: "topiary \(args.command): \(error)") }
                throw error
            }
        }
    }

    /// `--precision f32|f64` (f32 when absent).
    static func precision(_ args: ParsedArguments) throws -> ComputePrecision {
        guard let text = args.string("precision") else { return .f32 }
        do { return try ComputePrecision.parse(text) } catch { throw UsageError(message: "topiary \(args.command): \(error)") }
    }

    static func openModel(_ args: ParsedArguments, embeddedTokenizer: Bool = true) throws -> LanguageModel {
        try LanguageModel.open(path: try args.required("model"), tokenizerPath: args.string("tokenizer"), embeddedTokenizer: embeddedTokenizer)
    }

    static func requireTokenizer(_ model: LanguageModel) throws -> any Tokenizer {
        guard let t = model.tokenizer else { throw EvaluationError.noTokenizer(path: model.path) }
        return t
    }
}

func elapsed(since start: Date) -> Double { Date().timeIntervalSince(start) }

func formatSeconds(_ s: Double) -> String {
    if s < 60 { return String(format: "%.1fs", s) }
    let m = Int(s) / 60
    return String(format: "%dm%02ds", m, Int(s) % 60)
}

// MARK: eval

enum EvalCommand: Command {
    static let name = "eval"
    static let summary = "measure perplexity with the standard protocol, or score multiple-choice tasks as lm-eval does"
    static let usage = """
    topiary eval --model PATH [--tokenizer PATH] (--text FILE | --tokens FILE) [--seqlen N] [--windows K] [--memory-budget SIZE] [--logits FILE] [--precision f32|f64] [--json] [--profile]
    topiary eval --model PATH [--tokenizer PATH] --tasks FILE.jsonl [--target-delimiter S] [--json]
    """
    static let details = """
    The text file is read as is (UTF-8) and tokenized whole; a BOS token is added only when the
    tokenizer's own settings add one. The tokens are cut into non-overlapping windows of --seqlen
    (the remainder is dropped); each window is evaluated alone and perplexity = exp(mean over
    windows of the mean next-token cross-entropy). This is the SparseGPT/Wanda protocol.
    Weights are streamed block by block, so memory holds one block plus the windows' activations:
    those beyond --memory-budget (default a quarter of the memory this process may use) go in
    later groups of windows, each reading the blocks again, with the same result.
    --tokens reads token ids instead of text (a JSON array, or integers separated by spaces,
    commas or newlines), for models without a tokenizer; the model's own tokenizer is then not
    read (one given with --tokenizer still is). --logits writes the first window's
    logits (one row per position) as a JSON array of arrays, to compare with another
    implementation on the same tokens. --precision f64 runs every step in Float64 on the CPU
    (products through dgemm, norms, RoPE angles, softmax and the final log-softmax in Float64),
    so that the f32 loss's rounding error can be measured; meant for small models.
    --profile measures the backend's sgemm rate (the better of 1024^3 and 2048^3) first, then
    prints where the time went (stderr): opening the model, tokenizing, reading weights, the
    embedding, the blocks' forward passes and the head, each with its FLOPs counted from the
    shapes and its ratio to the sgemm rate (FLOPs at that rate over the seconds taken); with
    --json also under "profile".

    --tasks scores a zero-shot multiple-choice task as lm-evaluation-harness does: one JSON
    object a line with lm-eval's per-document fields 'context' (string), 'choices' (array of
    strings, at least 2) and 'gold' (index of the right choice). Each choice is the continuation
    --target-delimiter (default " ") + choice; trailing white space of the context moves to the
    continuation; the continuation's tokens are encode(context + continuation) less the first
    len(encode(context)) tokens, encoded without special tokens (an empty context is the BOS
    token). Its log-likelihood is the sum of log P(token | all before it) over those tokens.
    acc: the highest log-likelihood is the gold choice; acc_norm: the highest log-likelihood
    divided by the choice's length in characters (Unicode code points, Python's len(choice));
    ties go to the first choice. Reported with their standard errors (sample standard deviation
    over sqrt(n)), as lm-eval reports them. docs/evaluation.md has the details.
    """
    static let options = [
        CommonOptions.model, CommonOptions.tokenizer,
        OptionSpec(name: "text", value: "FILE", help: "UTF-8 text to evaluate (e.g. wiki.test.joined.txt)"),
        OptionSpec(name: "tokens", value: "FILE", help: "token ids to evaluate instead of text"),
        OptionSpec(name: "logits", value: "FILE", help: "write the first window's logits as JSON"),
        OptionSpec(name: "seqlen", value: "N", help: "window length in tokens (default: 2048, or the model's context if shorter)"),
        OptionSpec(name: "windows", value: "K", help: "evaluate only the first K windows (default: all)"),
        OptionSpec(name: "memory-budget", value: "SIZE", help: "windows' hidden states held at once (default: a quarter of the memory this process may use); the windows beyond it go in later groups, each reading the blocks again (the same result)"),
        OptionSpec(name: "tasks", value: "FILE", help: "score a multiple-choice task file (JSON lines: context, choices, gold) as lm-eval does"),
        OptionSpec(name: "target-delimiter", value: "S", help: "with --tasks: text between the context and each choice (default: one space, lm-eval's)"),
        OptionSpec(name: "profile", value: nil, help: "measure the sgemm rate, print where each phase's time went (stderr; with --json also in the JSON line)"),
        CommonOptions.device, CommonOptions.precision,
        CommonOptions.threads, CommonOptions.json,
    ]

    static func run(_ args: ParsedArguments) throws {
        try CommonOptions.apply(args)
        if args.string("tasks") != nil { return try runTasks(args) }
        if args.string("target-delimiter") != nil { throw UsageError(message: "topiary eval: --target-delimiter applies to --tasks only") }
        let profiles = args.flag("profile")
        let textPath: String
        switch (args.string("text"), args.string("tokens")) {
        case (let t?, nil): textPath = t
        case (nil, let t?): textPath = t
        case (_?, _?): throw UsageError(message: "give --text or --tokens, not both")
        case (nil, nil): throw UsageError(message: "missing --text FILE (or --tokens FILE for token ids, or --tasks FILE for multiple-choice scoring)")
        }
        let seqlenOption = try args.int("seqlen", min: 2)
        let windows = try args.int("windows", min: 1)
        if let logitsPath = args.string("logits") {
            // Before the evaluation: the logits replace the file they are written to.
            try OutputDirectory.checkFile(logitsPath, option: "logits", command: "eval",
                                          inputs: [("the model", args.string("model")), ("the tokenizer", args.string("tokenizer")),
                                                   ("the text", args.string("text")), ("the token ids", args.string("tokens"))])
        }
        let stateBudget = try args.string("memory-budget").map { try PruneCommand.parseSize($0, command: "eval") } ?? PruneCommand.defaultMemoryBudget()
        let sgemmRate = profiles ? SgemmRate.measure(on: ComputeDevices.defaultBackend) : 0
        ResourceUsage.trace("start")
        let opening = Date()
        // Token ids need no tokenizer: the model's own is not read (one given with --tokenizer still is).
        let model = try CommonOptions.openModel(args, embeddedTokenizer: args.string("tokens") == nil)
        let openSeconds = elapsed(since: opening)
        ResourceUsage.trace("model opened")
        let start: Date
        let tokens: [Int]
        if args.string("tokens") != nil {
            guard let data = FileManager.default.contents(atPath: textPath) else { throw ToolError("\(textPath): cannot read file") }
            guard let ids = try Calibration.tokenIDs(fromFile: data, path: textPath) else {
                throw ToolError("\(textPath): expected token ids (a JSON array of integers, or integers separated by spaces, commas or newlines)")
            }
            start = Date()
            tokens = ids
        } else {
            let tokenizer = try CommonOptions.requireTokenizer(model)
            let text = try readUTF8Text(textPath)
            start = Date()
            tokens = tokenizer.encode(text, addBOS: nil)
        }
        let tokenizeSeconds = elapsed(since: start)
        ResourceUsage.trace("text tokenized")
        let seqlen = seqlenOption ?? min(2048, model.config.maxPositions)
        let json = args.flag("json")
        let result = try Perplexity.evaluate(model: model, tokens: tokens, sequenceLength: seqlen, windows: windows, stateBudget: stateBudget,
                                             progress: { done, total in
            if !json && Console.stderrIsTerminal {
                FileHandle.standardError.write(Data("\reval: block \(done)/\(total)".utf8))
                if done == total { FileHandle.standardError.write(Data("\n".utf8)) }
            }
        })
        let seconds = elapsed(since: start)
        let totalSeconds = elapsed(since: opening)
        ResourceUsage.trace("evaluated")
        if let logitsPath = args.string("logits") {
            let logits = try Perplexity.logits(model: model, tokens: Array(tokens.prefix(seqlen)))
            let rows = (0..<logits.rows).map { logits.row($0).map(Double.init) }
            try AtomicFile.write(try JSONSerialization.data(withJSONObject: rows) + Data("\n".utf8), to: logitsPath)
        }
        let precision = try CommonOptions.precision(args)
        print(String(format: "perplexity %.4f  (%@ of %d tokens; %d tokens in text; %@%@)",
                     result.perplexity, counted(result.windows, "window"), seqlen, tokens.count, formatSeconds(seconds),
                     precision == .f64 ? "; f64" : ""))
        var profile: EvalProfile?
        if profiles {
            let c = model.config
            let p = EvalProfile(sgemmRate: sgemmRate, phases: [
                ("open_model", "open model", .init(seconds: openSeconds)),
                // With --tokens the token ids are only read, under the same key.
                ("tokenize", args.string("tokens") != nil ? "read tokens" : "tokenize", .init(seconds: tokenizeSeconds)),
                ("load", "load", .init(seconds: result.seconds.load)),
                ("embed", "embed", .init(seconds: result.seconds.embed)),
                ("forward", "forward", .init(seconds: result.seconds.forward, flops:
                    Double(c.layerCount) * BlockProfile.forwardFLOPs(c, sequences: result.windows, sequenceLength: seqlen))),
                ("head", "head", .init(seconds: result.seconds.head, flops: BlockProfile.headFLOPs(c, rows: result.windows * (seqlen - 1)))),
            ], totalSeconds: totalSeconds)
            Console.info(p.table)
            profile = p
        }
        if json {
            var line: [String: Any] = [
                "command": "eval", "model": model.path, "text": textPath, "perplexity": result.perplexity,
                "tokens": tokens.count, "windows": result.windows, "seqlen": seqlen, "seconds": seconds,
                "window_losses": result.windowLosses, "precision": precision.rawValue,
            ]
            if let profile { line["profile"] = profile.json }
            JSONLine.print(line)
        }
    }

    /// `eval --profile`: each phase's seconds and FLOPs against the sgemm rate measured first
    /// (the columns and JSON of `prune --profile`, through `ProfileReport`).
    struct EvalProfile {
        var sgemmRate: Double
        /// `key` names the phase in the JSON, `label` in the table.
        var phases: [(key: String, label: String, cost: BlockProfile.Cost)]
        /// From opening the model to the loss (the sgemm measurement not included).
        var totalSeconds: Double

        var rows: [(key: String, label: String, cost: BlockProfile.Cost)] {
            let measured = phases.reduce(0) { $0 + $1.cost.seconds }
            return phases + [("other", "other", BlockProfile.Cost(seconds: max(0, totalSeconds - measured))),
                             ("total", "total", BlockProfile.Cost(seconds: totalSeconds, flops: phases.reduce(0) { $0 + $1.cost.flops }))]
        }

        var table: String {
            var lines = [String(format: "eval profile (sgemm rate %.1f GFLOP/s; ratio = FLOPs at that rate / seconds)", sgemmRate / 1e9),
                         "phase            seconds  share     GFLOP   GFLOP/s  ratio"]
            for r in rows {
                let share = totalSeconds > 0 ? 100 * r.cost.seconds / totalSeconds : 0
                lines.append(r.label.padding(toLength: 15, withPad: " ", startingAt: 0)
                             + String(format: " %8.2f  %5.1f%%  %8.1f ", r.cost.seconds, share, r.cost.flops / 1e9)
                             + ProfileReport.rateColumns(r.cost, sgemmRate: sgemmRate))
            }
            return lines.joined(separator: "\n")
        }

        var json: [String: Any] {
            var phasesJSON: [String: Any] = [:]
            for r in rows { phasesJSON[r.key] = ProfileReport.costJSON(r.cost, sgemmRate: sgemmRate) }
            return ["sgemm_flops_per_second": sgemmRate, "phases": phasesJSON]
        }
    }

    /// `--tasks`: multiple-choice scoring (acc, acc_norm).
    static func runTasks(_ args: ParsedArguments) throws {
        let path = try args.required("tasks")
        for other in ["text", "tokens", "seqlen", "windows", "logits", "memory-budget"] where args.string(other) != nil {
            throw UsageError(message: "topiary eval: --\(other) is for perplexity; --tasks scores a multiple-choice task (give one or the other)")
        }
        if args.flag("profile") { throw UsageError(message: "topiary eval: --profile is for perplexity, not --tasks") }
        let delimiter = args.string("target-delimiter") ?? " "
        let documents = try MultipleChoice.read(path: path)
        let model = try CommonOptions.openModel(args)
        let tokenizer = try CommonOptions.requireTokenizer(model)
        let json = args.flag("json")
        let start = Date()
        let result = try MultipleChoice.score(model: model, tokenizer: tokenizer, documents: documents, delimiter: delimiter, path: path,
                                              progress: { done, total in
            if !json && Console.stderrIsTerminal {
                FileHandle.standardError.write(Data("\reval: \(done)/\(total) choices".utf8))
                if done == total { FileHandle.standardError.write(Data("\n".utf8)) }
            }
        })
        let seconds = elapsed(since: start)
        if result.truncated > 0 {
            Console.info("eval: \(counted(result.truncated, "choice")) had the context cut on the left to fit the model's context of \(model.config.maxPositions) tokens")
        }
        var name = (path as NSString).lastPathComponent
        if name.hasSuffix(".jsonl") { name.removeLast(6) }
        let rows = [("acc", result.acc, result.accStderr), ("acc_norm", result.accNorm, result.accNormStderr)]
        let nameWidth = max(4, name.count)
        print("| " + "Task".padding(toLength: nameWidth, withPad: " ", startingAt: 0) + " |     n | Metric   |  Value |   Stderr |")
        print("|" + String(repeating: "-", count: nameWidth + 2) + "|------:|----------|-------:|---------:|")
        for (k, (metric, value, stderr)) in rows.enumerated() {
            let task = (k == 0 ? name : "").padding(toLength: nameWidth, withPad: " ", startingAt: 0)
            let n = k == 0 ? String(documents.count) : ""
            print("| \(task) | " + String(repeating: " ", count: max(0, 5 - n.count)) + n + " | "
                  + metric.padding(toLength: 8, withPad: " ", startingAt: 0) + String(format: " | %.4f | ± %.4f |", value, stderr))
        }
        print("(\(counted(documents.count, "question")), \(counted(result.questions.reduce(0) { $0 + $1.logLikelihoods.count }, "choice")), \(formatSeconds(seconds)))")
        if json {
            JSONLine.print([
                "command": "eval", "model": model.path, "tasks": path, "questions": documents.count,
                "acc": result.acc, "acc_stderr": result.accStderr, "acc_norm": result.accNorm, "acc_norm_stderr": result.accNormStderr,
                "target_delimiter": delimiter, "truncated": result.truncated, "seconds": seconds,
                "per_question": result.questions.map { q -> [String: Any] in
                    ["line": q.line, "gold": q.gold, "loglikelihoods": q.logLikelihoods, "continuation_tokens": q.continuationTokens,
                     "prediction": q.prediction, "prediction_norm": q.normalizedPrediction]
                },
            ])
        }
    }
}

// MARK: generate

enum GenerateCommand: Command {
    static let name = "generate"
    static let summary = "continue a prompt greedily, for a quick look at what a model says"
    static let usage = "topiary generate --model PATH [--tokenizer PATH] [--prompt TEXT] [--chat [--system TEXT]] [--max-tokens N] [--json]"
    static let details = """
    Greedy decoding (the most likely token each step). Without --prompt it starts from the BOS
    token. The prompt is encoded with the tokenizer's own settings (special tokens such as
    <|im_start|> are recognised). --chat renders the prompt as a user turn through the model's own
    chat template (chat_template.jinja or tokenizer_config.json in a Hugging Face directory,
    tokenizer.chat_template in a GGUF file), as transformers' apply_chat_template(...,
    add_generation_prompt=True) does, and encodes it without adding special tokens.
    Generation stops after an end-of-sequence token, --max-tokens tokens or at the model's
    context; a prompt that fills the context (or more) is an error naming both lengths.
    """
    static let options = [
        CommonOptions.model, CommonOptions.tokenizer,
        OptionSpec(name: "prompt", value: "TEXT", help: "text to continue (default: start from BOS)"),
        OptionSpec(name: "chat", value: nil, help: "render the prompt as a user turn through the model's chat template"),
        OptionSpec(name: "system", value: "TEXT", help: "with --chat: a system turn before the user's"),
        OptionSpec(name: "max-tokens", value: "N", help: "most tokens to generate (default: 64)"),
        CommonOptions.device,
        CommonOptions.threads, CommonOptions.json,
    ]

    static func run(_ args: ParsedArguments) throws {
        try CommonOptions.apply(args)
        let maxTokens = try args.int("max-tokens", min: 0) ?? 64
        let model = try CommonOptions.openModel(args)
        let tokenizer = try CommonOptions.requireTokenizer(model)
        var prompt: [Int]
        if args.string("system") != nil && !args.flag("chat") { throw UsageError(message: "--system needs --chat") }
        if args.flag("chat") && args.string("prompt") == nil { throw UsageError(message: "--chat needs --prompt") }
        if let text = args.string("prompt") {
            if args.flag("chat") {
                guard let chat = try model.chatSettings() else {
                    throw ToolError("\(model.path): the model carries no chat template (tokenizer_config.json chat_template, chat_template.jinja or GGUF tokenizer.chat_template); drop --chat")
                }
                prompt = tokenizer.encode(try chat.prompt(user: text, system: args.string("system")), addBOS: false)
            } else {
                prompt = tokenizer.encode(text, addBOS: nil)
            }
        } else {
            guard let bos = tokenizer.bosID ?? model.config.bosTokenID else {
                throw ToolError("\(model.path): the tokenizer has no BOS token; pass --prompt")
            }
            prompt = [bos]
        }
        if prompt.isEmpty, let bos = tokenizer.bosID { prompt = [bos] }
        guard !prompt.isEmpty else { throw ToolError("the prompt encodes to no tokens") }
        guard prompt.count < model.config.maxPositions else {
            throw ToolError("the prompt is \(prompt.count) tokens, and \(model.path) has a context of \(model.config.maxPositions) tokens: no token can follow it; shorten the prompt to at most \(model.config.maxPositions - 1) tokens")
        }
        let start = Date()
        let generated = try Generation.greedy(model: model, prompt: prompt, maxTokens: maxTokens)
        let seconds = elapsed(since: start)
        let promptText = tokenizer.decode(prompt)
        let full = tokenizer.decode(prompt + generated)
        let text = full.hasPrefix(promptText) ? String(full.dropFirst(promptText.count)) : tokenizer.decode(generated)
        print(text)
        if args.flag("json") {
            JSONLine.print([
                "command": "generate", "model": model.path, "text": text, "tokens": generated,
                "prompt_tokens": prompt, "seconds": seconds,
            ])
        }
    }
}

// MARK: convert

enum ConvertCommand: Command {
    static let name = "convert"
    static let summary = "write any readable checkpoint as a Hugging Face directory"
    static let usage = "topiary convert --model PATH [--tokenizer PATH] --output DIR [--dtype f32|f16|bf16] [--overwrite] [--json]"
    static let details = """
    From a Hugging Face directory: config.json as the source has it, with only its dtype field
    (torch_dtype and/or dtype) changed; the source's tokenizer and generation files
    (tokenizer.json, tokenizer_config.json, special_tokens_map.json, generation_config.json,
    chat_template.jinja, tokenizer.model, vocab.json, merges.txt, ...) copied byte for byte; a
    sharded source gives shards of the same names with model.safetensors.index.json.
    From a GGUF file: config.json from its metadata, tokenizer.json, tokenizer_config.json (chat
    template, BOS/EOS/PAD/UNK tokens, added tokens), special_tokens_map.json and
    generation_config.json. From llama2.c: config.json, generation_config.json and, with a
    tokenizer, tokenizer.json, tokenizer_config.json and special_tokens_map.json.
    Weights: model.safetensors (sharded above 5 GiB, with model.safetensors.index.json), by
    default in the source's dtype for a Hugging Face source and f32 otherwise. Q and K rows are
    written in Hugging Face's rotate-half RoPE layout, so transformers and other tools load the
    result directly. Quantised GGUF weights are written dequantised. The directory is written
    beside DIR under a temporary name and renamed at the end, so an interrupted run leaves
    nothing under DIR.
    """
    static let options = [
        CommonOptions.model, CommonOptions.tokenizer,
        OptionSpec(name: "output", value: "DIR", help: "directory to write (must be empty or absent)"),
        OptionSpec(name: "dtype", value: "TYPE", help: "f32, f16 or bf16 (default: a Hugging Face source's own, f32 for GGUF and llama2.c)"),
        OptionSpec(name: "overwrite", value: nil, help: "replace an existing output directory that Topiary wrote (never one with other files)"),
        CommonOptions.threads, CommonOptions.json,
    ]

    static func run(_ args: ParsedArguments) throws {
        try CommonOptions.apply(args)
        let output = try args.required("output")
        let requestedDType = try parseDType(args.string("dtype"))
        let overwrite = args.flag("overwrite")
        try OutputDirectory.check(output, overwrite: overwrite, command: name,
                                  protecting: OutputDirectory.protected([("the model", args.string("model")), ("the tokenizer", args.string("tokenizer"))]))
        let model = try CommonOptions.openModel(args)
        let dtype = requestedDType ?? HuggingFaceExport.defaultDType(for: model)
        let start = Date()
        // Staged beside the output and renamed at the end: an interrupted run leaves nothing under DIR.
        let staging = OutputDirectory.stagingPath(for: output)
        try? FileManager.default.removeItem(atPath: staging)
        let written: [String]
        do {
            try OutputDirectory.createStaging(staging, for: output)
            written = try HuggingFaceExport.write(model: model, to: staging, dtype: dtype)
            try OutputDirectory.install(staging: staging, output: output, overwrite: overwrite, command: name) { Console.info($0) }
        } catch {
            try? FileManager.default.removeItem(atPath: staging)
            throw error
        }
        let files = written.map { (output as NSString).appendingPathComponent(($0 as NSString).lastPathComponent) }
        let seconds = elapsed(since: start)
        print("wrote \(output) (\(files.count) weight file\(files.count == 1 ? "" : "s"), \(dtype.rawValue), \(formatSeconds(seconds)))")
        if args.flag("json") {
            JSONLine.print(["command": "convert", "model": model.path, "output": output, "files": files,
                            "dtype": dtype.rawValue, "seconds": seconds])
        }
    }
}
