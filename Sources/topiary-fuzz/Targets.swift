import Foundation
#if canImport(Glibc)
import Glibc
#endif
import TopiaryCluster
import TopiaryModel
import TopiaryPrune
import TopiaryTensor
import TopiaryTokenizers

/// What one case did: loaded (every step passed) or refused with an error (the first one).
enum CaseOutcome {
    case loaded
    case refused(Error)

    /// A short label for counting outcomes by kind: the error's type and case.
    var label: String {
        switch self {
        case .loaded: return "loaded"
        case .refused(let e):
            let kind = Mirror(reflecting: e).children.first?.label.map { "." + $0 } ?? ""
            return "\(type(of: e))\(kind)"
        }
    }
}

/// A fuzz target: builds its seed inputs once (from a fixed seed), makes case inputs from a
/// case's random stream, and runs them through the reader or decoder under test.
protocol FuzzTarget {
    var name: String { get }
    /// Runs case `r` (files, if any, go under `directory`).
    func run(_ r: inout FuzzRandom, directory: String) -> CaseOutcome
    /// Runs each seed input unmutated; every one must load.
    func checkSeeds(directory: String) -> [String]
}

/// Collects the first error of several steps, so that a case goes on exercising the rest.
struct Steps {
    var first: Error?
    mutating func attempt(_ body: () throws -> Void) {
        do { try body() } catch { if first == nil { first = error } }
    }
    var outcome: CaseOutcome { first.map { .refused($0) } ?? .loaded }
}

let sampleText = "Hello world, the théâtre 123 hello\n\t<|endoftext|> the world"

/// Uses an opened model as the commands do: decodes every tensor, evaluates two short windows,
/// generates two tokens, encodes and decodes text, and now and then converts it.
func exercise(_ model: LanguageModel, _ steps: inout Steps, _ r: inout FuzzRandom, directory: String) {
    for name in model.weights.tensorNames { steps.attempt { _ = try model.weights.load(name) } }
    let c = model.config
    let n = min(4, c.maxPositions)
    if n >= 2 {
        let tokens = (0..<(2 * n)).map { ($0 * 7 + 1) % c.vocabularySize }
        steps.attempt { _ = try Perplexity.evaluate(model: model, tokens: tokens, sequenceLength: n, windows: 2) }
        steps.attempt { _ = try Generation.greedy(model: model, prompt: [tokens[0]], maxTokens: 2) }
    }
    if let t = model.tokenizer {
        let ids = t.encode(sampleText, addBOS: nil)
        _ = t.decode(ids, skipSpecialTokens: false)
    }
    if r.chance(0.1) {
        try? FileManager.default.removeItem(atPath: directory + "/converted")
        steps.attempt { try HuggingFaceExport.write(model: model, to: directory + "/converted") }
    }
}

/// Replaces the files in `directory` with `files` (plain writes: no fsync, which would make the
/// disk, not the reader, the cost of a case).
func writeFiles(_ files: [FuzzFile], to directory: String) {
    let fm = FileManager.default
    for name in (try? fm.contentsOfDirectory(atPath: directory)) ?? [] { try? fm.removeItem(atPath: directory + "/" + name) }
    for f in files {
        let fd = open(directory + "/" + f.name, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        guard fd >= 0 else { continue }
        var done = 0
        while done < f.bytes.count {
            let n = f.bytes[done...].withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
            if n <= 0 { break }
            done += n
        }
        close(fd)
    }
}

/// How many byte-level mutation rounds a case gets (0 keeps a structured mutation alone).
func rounds(_ r: inout FuzzRandom) -> Int { r.pick([0, 1, 1, 1, 2, 2, 3, 4, 6, 10]) }

// MARK: GGUF

struct GGUFTarget: FuzzTarget {
    let name = "gguf"
    let seeds: [FuzzFile]

    init() {
        var r = FuzzRandom(seed: 0x6767_7566)
        seeds = Seeds.ggufModels(&r)
    }

    func open(_ file: FuzzFile, directory: String, _ r: inout FuzzRandom) -> CaseOutcome {
        writeFiles([file], to: directory)
        var steps = Steps()
        var model: LanguageModel?
        steps.attempt { model = try LanguageModel.open(path: directory + "/" + file.name) }
        if let model { exercise(model, &steps, &r, directory: directory) }
        return steps.outcome
    }

    func run(_ r: inout FuzzRandom, directory: String) -> CaseOutcome {
        var file = r.pick(seeds)
        Mutator.mutate(&file, donors: seeds.map(\.bytes), &r, rounds: max(1, rounds(&r)))
        return open(file, directory: directory, &r)
    }

    func checkSeeds(directory: String) -> [String] {
        var r = FuzzRandom(seed: 1)
        return seeds.enumerated().compactMap { i, s in
            // The last seed's lm_head is a Q4_K tensor that does not fill whole blocks: refused by name when the file is opened.
            if case .refused(let e) = open(s, directory: directory, &r) {
                if i == seeds.count - 1, case .unsupportedType(_, "output.weight", "Q4_K")? = e as? CheckpointError { return nil }
                return "gguf seed \(i): \(e)"
            }
            return nil
        }
    }
}

// MARK: safetensors + config.json

struct SafeTensorsTarget: FuzzTarget {
    let name = "safetensors"
    let seeds: [Seeds.HuggingFaceSeed]

    init() {
        var r = FuzzRandom(seed: 0x7361_6665)
        seeds = Seeds.huggingFaceModels(&r)
    }

    func files(_ s: Seeds.HuggingFaceSeed) -> [FuzzFile] {
        var files = [FuzzFile(name: "config.json", bytes: Array(s.config.text.utf8), isText: true)]
        for shard in s.shards {
            var f = Seeds.safetensorsBytes(header: shard.header, data: shard.data)
            f.name = shard.name
            files.append(f)
        }
        if let index = s.index {
            files.append(FuzzFile(name: ShardedSafeTensors.indexFileName, bytes: Array(index.text.utf8), isText: true))
        }
        return files
    }

    func open(_ files: [FuzzFile], directory: String, _ r: inout FuzzRandom) -> CaseOutcome {
        let dir = directory + "/model"
        try? FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        writeFiles(files, to: dir)
        var steps = Steps()
        var model: LanguageModel?
        steps.attempt { model = try LanguageModel.open(path: dir) }
        if let model { exercise(model, &steps, &r, directory: directory) }
        return steps.outcome
    }

    func run(_ r: inout FuzzRandom, directory: String) -> CaseOutcome {
        var s = r.pick(seeds)
        // Structured: config.json fields, a shard's header fields or data, the index.
        for _ in 0..<r.pick([0, 1, 1, 2, 3]) {
            switch r.below(4) {
            case 0, 1: s.config.mutate(&r)
            case 2:
                let k = r.below(s.shards.count)
                s.shards[k].header.mutate(&r)
            default:
                if s.index != nil, r.chance(0.5) {
                    s.index!.mutate(&r)
                } else {
                    let k = r.below(s.shards.count)
                    var d = FuzzFile(name: "", bytes: s.shards[k].data)
                    Mutator.mutate(&d, donors: [], &r, rounds: 1 + r.below(3))
                    s.shards[k].data = d.bytes
                }
            }
        }
        var fs = files(s)
        let k = r.below(fs.count)
        Mutator.mutate(&fs[k], donors: fs.map(\.bytes), &r, rounds: rounds(&r))
        return open(fs, directory: directory, &r)
    }

    func checkSeeds(directory: String) -> [String] {
        var r = FuzzRandom(seed: 1)
        return seeds.enumerated().compactMap { i, s in
            if case .refused(let e) = open(files(s), directory: directory, &r) { return "safetensors seed \(i): \(e)" }
            return nil
        }
    }
}

// MARK: llama2.c checkpoint

struct Llama2CTarget: FuzzTarget {
    let name = "llama2c"
    let tokenizer: FuzzFile
    let vocabulary: Int

    init() {
        var r = FuzzRandom(seed: 0x6C6C_3263)
        (tokenizer, vocabulary) = Seeds.tokenizerBin(&r)
    }

    var header: [Int32] { [8, 16, 2, 2, 1, Int32(vocabulary), 16] }

    func open(_ model: FuzzFile, withTokenizer: Bool, directory: String, _ r: inout FuzzRandom) -> CaseOutcome {
        writeFiles(withTokenizer ? [model, tokenizer] : [model], to: directory)
        var steps = Steps()
        var m: LanguageModel?
        steps.attempt { m = try LanguageModel.open(path: directory + "/" + model.name, tokenizerPath: withTokenizer ? directory + "/tokenizer.bin" : nil) }
        if let m { exercise(m, &steps, &r, directory: directory) }
        return steps.outcome
    }

    func run(_ r: inout FuzzRandom, directory: String) -> CaseOutcome {
        var h = header
        if r.chance(0.5) { h[5] = -h[5] }  // an unshared classifier
        // Structured: header values changed, the file sized to match when that is small.
        for _ in 0..<r.pick([0, 0, 1, 1, 2]) {
            let i = r.below(7)
            h[i] = r.chance(0.5) ? Int32(truncatingIfNeeded: r.pick(Interesting.unsigned)) : h[i] &+ Int32(r.below(9) - 4)
        }
        var file = Seeds.llama2cModel(h, &r)
        if r.chance(0.6) { Mutator.mutate(&file, donors: [tokenizer.bytes], &r, rounds: rounds(&r)) }
        return open(file, withTokenizer: r.chance(0.3), directory: directory, &r)
    }

    func checkSeeds(directory: String) -> [String] {
        var r = FuzzRandom(seed: 1)
        var failures: [String] = []
        for (shared, tok) in [(true, true), (false, false)] {
            var h = header
            if !shared { h[5] = -h[5] }
            if case .refused(let e) = open(Seeds.llama2cModel(h, &r), withTokenizer: tok, directory: directory, &r) {
                failures.append("llama2c seed (shared \(shared)): \(e)")
            }
        }
        return failures
    }
}

// MARK: llama2.c tokenizer.bin

struct TokenizerBinTarget: FuzzTarget {
    let name = "tokenizer-bin"

    func load(_ file: FuzzFile, vocabulary: Int, directory: String) -> CaseOutcome {
        writeFiles([file], to: directory)
        var steps = Steps()
        steps.attempt {
            let t = try Llama2CTokenizer(path: directory + "/" + file.name, vocabularySize: vocabulary)
            let ids = t.encode(sampleText, addBOS: nil)
            _ = t.decode(ids, skipSpecialTokens: false)
            let json = try t.huggingFaceJSON()
            let back = try HuggingFaceTokenizer.load(json: json, source: "exported tokenizer.json")
            _ = back.decode(back.encode(sampleText, addBOS: nil), skipSpecialTokens: true)
        }
        return steps.outcome
    }

    func run(_ r: inout FuzzRandom, directory: String) -> CaseOutcome {
        // Now and then a long token (up to 60 KB of "the..."), whose cuts into known tokens are
        // many: loading must stay linear in the file's size.
        let long = r.chance(0.05) ? 1000 + r.below(60_000) : 0
        var (file, vocabulary) = Seeds.tokenizerBin(longToken: long, &r)
        if r.chance(0.2) {
            vocabulary = r.pick([0, 1, 259, 260, vocabulary - 1, vocabulary + 1, 1 << 20, Int(Int32.max), Int.max / 4])
        }
        Mutator.mutate(&file, donors: [], &r, rounds: rounds(&r))
        return load(file, vocabulary: vocabulary, directory: directory)
    }

    func checkSeeds(directory: String) -> [String] {
        var r = FuzzRandom(seed: 1)
        let (file, vocabulary) = Seeds.tokenizerBin(longToken: 100_000, &r)
        if case .refused(let e) = load(file, vocabulary: vocabulary, directory: directory) { return ["tokenizer-bin seed: \(e)"] }
        return []
    }
}

// MARK: tokenizer.json

struct TokenizerJSONTarget: FuzzTarget {
    let name = "tokenizer-json"
    let seeds = Seeds.tokenizerJSONs()

    func load(_ files: [FuzzFile], directory: String) -> CaseOutcome {
        writeFiles(files, to: directory)
        var steps = Steps()
        steps.attempt {
            let t = try HuggingFaceTokenizer.load(path: directory + "/tokenizer.json")
            let ids = t.encode(sampleText, addBOS: nil)
            _ = t.decode(ids, skipSpecialTokens: false)
            _ = t.decode(ids + [-1, 1 << 30], skipSpecialTokens: true)
        }
        return steps.outcome
    }

    func run(_ r: inout FuzzRandom, directory: String) -> CaseOutcome {
        var json = r.pick(seeds)
        for _ in 0..<r.pick([0, 1, 1, 2, 3]) { json.mutate(&r) }
        var file = FuzzFile(name: "tokenizer.json", bytes: Array(json.text.utf8), isText: true)
        Mutator.mutate(&file, donors: seeds.map { Array($0.text.utf8) }, &r, rounds: r.pick([0, 0, 0, 0, 1, 2, 4]))
        var files = [file]
        if r.chance(0.2) {
            var config = Seeds.tokenizerConfig
            if r.chance(0.7) { config.mutate(&r) }
            files.append(FuzzFile(name: "tokenizer_config.json", bytes: Array(config.text.utf8), isText: true))
        }
        return load(files, directory: directory)
    }

    func checkSeeds(directory: String) -> [String] {
        seeds.enumerated().compactMap { i, s in
            let files = [FuzzFile(name: "tokenizer.json", bytes: Array(s.text.utf8)),
                         FuzzFile(name: "tokenizer_config.json", bytes: Array(Seeds.tokenizerConfig.text.utf8))]
            if case .refused(let e) = load(files, directory: directory) { return "tokenizer-json seed \(i): \(e)" }
            return nil
        }
    }
}

// MARK: Wire

/// Valid messages of every type, with the integer fields of their payloads where known.
enum WireSeeds {
    static func messages() -> [Message] {
        var r = FuzzRandom(seed: 0x7769_7265)
        let job = JSON.object([
            ("modelPath", .string("/models/m.gguf")), ("plan", .object([("method", .string("wanda")), ("sparsity", .double(0.5))])),
            ("sequenceLength", .int(8)), ("samples", .int(2)), ("layers", .array([.int(0), .int(1)])), ("memoryBudget", .int(1 << 30)),
            ("first", .int(0)), ("end", .int(2)), ("hasTargets", .bool(false)), ("denseOnly", .bool(false)), ("heartbeatInterval", .double(5)),
        ])
        return [
            .hello(minVersion: 1, maxVersion: 1, role: 0, nonce: r.bytes(32), name: "coordinator"),
            .challenge(version: 1, nonce: r.bytes(32), mac: r.bytes(32)),
            .proof(mac: r.bytes(32)),
            .welcome(name: "worker-1"),
            .error(code: 400, message: "bad job"),
            .heartbeat(sequence: 7),
            .tensorHeader(stream: 0, name: "inputs/0", dtype: .f32, shape: [4, 8], byteCount: 128),
            .tensorHeader(stream: 1, name: "model.layers.0.mlp.up_proj.weight", dtype: .bf16, shape: [2, 3, 4], byteCount: 48),
            .tensorChunk(stream: 0, offset: 0, bytes: r.bytes(128)),
            .assign(job: Array(job.text.utf8), tensors: 2),
            .blockResult(block: 3, tensors: 2, report: Array(#"{"block":3,"sparsity":0.5}"#.utf8)),
            .rangeDone(tensors: 1),
            .shutdown,
            .peerJoin(group: "4242-1-0", rank: 1),
            .replica(block: 2, kind: 1, name: "model.layers.2.mlp.down_proj", index: 5, form: 0, bytes: []),
            .replica(block: 2, kind: 5, name: "", index: 3, form: 2, bytes: [0, 0, 0, 0, 0, 0, 240, 63, 0, 0, 0, 0, 0, 0, 0, 64]),
        ]
    }

    /// Integer fields of a payload: every 1, 2, 4 and 8-byte window that starts where a field of
    /// the message's layout starts (worked out from the encoding).
    static func fields(_ m: Message) -> [IntField] {
        switch m {
        case .tensorHeader(_, let name, _, let shape, _):
            let n = name.utf8.count
            var f = [IntField(offset: 0, width: 4), IntField(offset: 4, width: 4), IntField(offset: 8 + n, width: 1), IntField(offset: 9 + n, width: 1)]
            for i in 0..<shape.count { f.append(IntField(offset: 10 + n + 8 * i, width: 8)) }
            f.append(IntField(offset: 10 + n + 8 * shape.count, width: 8))
            return f
        case .assign: return [IntField(offset: 0, width: 4), IntField(offset: 4, width: 4)]
        case .blockResult: return [IntField(offset: 0, width: 4), IntField(offset: 4, width: 4), IntField(offset: 8, width: 4)]
        case .tensorChunk: return [IntField(offset: 0, width: 4), IntField(offset: 4, width: 8)]
        case .hello: return [IntField(offset: 0, width: 2), IntField(offset: 2, width: 2), IntField(offset: 4, width: 1), IntField(offset: 37, width: 4)]
        case .welcome, .error: return [IntField(offset: 0, width: 4), IntField(offset: 0, width: 2), IntField(offset: 2, width: 4)]
        default: return [IntField(offset: 0, width: 4)]
        }
    }
}

/// Decodes a message and uses it as a receiver would: a tensor header starts an assembler and
/// some of the announced bytes arrive (all of them for a small tensor). The assembler's storage
/// must follow what arrived, not what the header announced.
func useMessage(_ frame: Frame, _ r: inout FuzzRandom) throws {
    let m = try Message.decode(frame)
    // What decodes must encode back to the same payload.
    let again = try Message.decode(m.frame())
    guard again == m else { throw FuzzFailure("message \(m.type) does not survive encode and decode: \(m) became \(again)") }
    if case .tensorHeader(let stream, _, let dtype, let shape, let byteCount) = m {
        var assembler = try TensorAssembler(header: m, maxBytes: r.chance(0.8) ? 4 << 30 : r.pick([0, 64, 1 << 20]))
        let arrived = byteCount <= 1 << 16 ? Int(byteCount) : r.below(1 << 16) / dtype.size * dtype.size
        try assembler.add(.tensorChunk(stream: stream, offset: 0, bytes: r.bytes(arrived)))
        let bound = max(TensorAssembler.initialCapacityBytes, 2 * arrived / dtype.size * 4)
        guard assembler.reservedBytes <= bound else {
            throw FuzzFailure("tensor \(shape) reserved \(assembler.reservedBytes) bytes after \(arrived) arrived (bound \(bound))")
        }
        if arrived == byteCount { _ = try assembler.matrix() }
    }
}

/// A property the fuzzer checks failed: reported as a failure, like a crash.
struct FuzzFailure: Error, CustomStringConvertible {
    let description: String
    init(_ d: String) { description = d }
}

struct FrameTarget: FuzzTarget {
    let name = "frame"
    let messages = WireSeeds.messages()

    func decode(_ stream: [UInt8], _ r: inout FuzzRandom, maxFrameBytes: Int, allowed: Set<MessageType>?) -> CaseOutcome {
        var decoder = FrameDecoder(maxFrameBytes: maxFrameBytes)
        decoder.allowedTypes = allowed
        var steps = Steps()
        var offset = 0
        steps.attempt {
            while offset < stream.count {
                let n = min(stream.count - offset, 1 + r.below(r.chance(0.5) ? 8 : 512))
                decoder.append(Array(stream[offset..<(offset + n)]))
                offset += n
                _ = decoder.bytesWanted
                // Payloads are the message target's: here only the framing is under test.
                while let frame = try decoder.next() {
                    guard frame.payload.count <= maxFrameBytes else {
                        throw FuzzFailure("a \(frame.type) frame of \(frame.payload.count) bytes passed a limit of \(maxFrameBytes)")
                    }
                }
            }
        }
        return steps.outcome
    }

    func run(_ r: inout FuzzRandom, directory: String) -> CaseOutcome {
        var stream: [UInt8] = []
        var fields: [IntField] = []
        for _ in 0..<(1 + r.below(5)) {
            let m = r.pick(messages)
            var payload = FuzzFile(name: "", bytes: m.encodedPayload(), fields: WireSeeds.fields(m))
            if r.chance(0.5) { Mutator.mutate(&payload, donors: [], &r, rounds: 1 + r.below(3)) }
            let frame = Frame(type: m.type, flags: r.chance(0.9) ? 0 : UInt32(truncatingIfNeeded: r.next()), payload: payload.bytes)
            let base = stream.count
            for (o, w) in [(4, 2), (6, 2), (8, 4), (12, 8), (20, 4)] { fields.append(IntField(offset: base + o, width: w)) }
            stream += frame.encoded()
        }
        var file = FuzzFile(name: "", bytes: stream, fields: fields)
        if r.chance(0.5) { Mutator.mutate(&file, donors: messages.map { $0.frame().encoded() }, &r, rounds: 1 + r.below(4)) }
        let limit = r.pick([Protocol.maxHandshakeFrameBytes, 1 << 20, Protocol.defaultMaxFrameBytes])
        let allowed: Set<MessageType>? = r.chance(0.2) ? [.hello, .proof] : nil
        return decode(file.bytes, &r, maxFrameBytes: limit, allowed: allowed)
    }

    func checkSeeds(directory: String) -> [String] {
        var r = FuzzRandom(seed: 1)
        let stream = messages.flatMap { $0.frame().encoded() }
        if case .refused(let e) = decode(stream, &r, maxFrameBytes: Protocol.defaultMaxFrameBytes, allowed: nil) { return ["frame seed: \(e)"] }
        return []
    }
}

struct MessageTarget: FuzzTarget {
    let name = "message"
    let messages = WireSeeds.messages()

    func run(_ r: inout FuzzRandom, directory: String) -> CaseOutcome {
        if r.chance(0.05) {
            // A tensor header whose byte count agrees with a hostile shape (2^20 x 2^20, a zero
            // dimension beside a huge one, ...): only its size is wrong for a receiver.
            let dims = (0..<(1 + r.below(4))).map { _ in r.pick([0, 1, 3, 1 << 10, 1 << 20, 1 << 30, 1 << 32, 1 << 40, UInt64.max, r.next()]) }
            let dtype = r.pick(WireDType.allCases)
            let count = dims.reduce(UInt64(1)) { $0 &* $1 }
            var w = ByteWriter()
            w.u32(0); w.string("inputs/0"); w.u8(dtype.rawValue); w.u8(UInt8(dims.count))
            for d in dims { w.u64(d) }
            w.u64(count &* UInt64(dtype.size))
            var steps = Steps()
            steps.attempt { try useMessage(Frame(type: .tensorHeader, payload: w.data), &r) }
            return steps.outcome
        }
        let m = r.pick(messages)
        var payload = FuzzFile(name: "", bytes: m.encodedPayload(), fields: WireSeeds.fields(m))
        Mutator.mutate(&payload, donors: messages.map { $0.encodedPayload() }, &r, rounds: max(1, rounds(&r)))
        let type = r.chance(0.9) ? m.type : r.pick(MessageType.allCases)
        var steps = Steps()
        steps.attempt { try useMessage(Frame(type: type, payload: payload.bytes), &r) }
        return steps.outcome
    }

    func checkSeeds(directory: String) -> [String] {
        var r = FuzzRandom(seed: 1)
        return messages.compactMap { m in
            do { try useMessage(m.frame(), &r) } catch { return "message seed \(m.type): \(error)" }
            return nil
        }
    }
}

// MARK: Assign job

/// The coordinator's job (an assign message's JSON) and the tensor headers that follow it, as a
/// worker receives them: decoded, every field checked, the model it names opened (a tiny GGUF
/// file in the case directory) or the configuration it sends checked, the activation stores
/// sized, then each header checked against the job. Nothing may trap, hang or allocate past
/// the memory limit; a job or header that is not right is refused with an error.
struct JobTarget: FuzzTarget {
    let name = "job"
    let models: [FuzzFile]
    let seeds: [JobSeed]

    struct JobSeed {
        var job: JSON
        var headers: [TensorAnnouncement]
    }

    init() {
        var r = FuzzRandom(seed: 0x6A6F_6273)
        let gguf = Seeds.ggufModels(&r)
        // The llama (hidden 8, 2 blocks, context 32) and the Mixtral seed, under their own names.
        models = [FuzzFile(name: "llama.gguf", bytes: gguf[0].bytes), FuzzFile(name: "mixtral.gguf", bytes: gguf[4].bytes)]
        seeds = JobTarget.makeSeeds()
    }

    /// The fields of an Assignment, in its order; `plan` and `config` through their own encoders.
    static func job(model: String, plan: PrunePlan, sequenceLength: Int, samples: Int, layers: [Int]?, first: Int, end: Int,
                    hasTargets: Bool, config: ModelConfig? = nil, weightTensors: Int? = nil) -> JSON {
        func encoded<T: Encodable>(_ v: T) -> JSON {
            let data = try! JSONEncoder().encode(v)
            return JSON.from(try! JSONSerialization.jsonObject(with: data, options: [.fragmentsAllowed]))
        }
        var m: [(String, JSON)] = [("modelPath", .string(model)), ("plan", encoded(plan)), ("sequenceLength", .int(sequenceLength)),
                                   ("samples", .int(samples))]
        if let layers { m.append(("layers", .array(layers.map { .int($0) }))) }
        m += [("memoryBudget", .int(1 << 20)), ("first", .int(first)), ("end", .int(end)), ("hasTargets", .bool(hasTargets)),
              ("denseOnly", .bool(false)), ("heartbeatInterval", .double(5))]
        if let config { m.append(("config", encoded(config))) }
        if let weightTensors { m.append(("weightTensors", .int(weightTensors))) }
        return .object(m)
    }

    static func header(_ name: String, _ shape: [Int]) -> TensorAnnouncement {
        // Wrapping: a product past 64 bits is the decoder's to refuse.
        TensorAnnouncement(stream: 0, name: name, dtype: .f32, shape: shape, byteCount: shape.reduce(UInt64(4)) { $0 &* UInt64($1) })
    }

    static func boundary(samples: Int, rows: Int, cols: Int, targets: Bool) -> [TensorAnnouncement] {
        (0..<samples).map { header("inputs/\($0)", [rows, cols]) } + (targets ? (0..<samples).map { header("targets/\($0)", [rows, cols]) } : [])
    }

    static func weights(_ c: ModelConfig, _ blocks: Range<Int>) -> [TensorAnnouncement] {
        blocks.flatMap { c.family.blockTensors(c, block: $0) }.map { header($0.name, $0.shape) }
    }

    static func makeSeeds() -> [JobSeed] {
        let wanda = PrunePlan(method: .wanda, pattern: .unstructured(0.5))
        let sparseGPT = PrunePlan(method: .sparsegpt, pattern: .nOfM(n: 2, m: 4), sparseGPT: .init(blockSize: 4, percentDamp: 0.01))
        let sparseLLM = PrunePlan(method: .sparsellm, pattern: .unstructured(0.5), sparseLLM: .llama, targets: .dense)
        let besa = PrunePlan(method: .besa, pattern: .unstructured(0.5), besa: .init(epochs: 2))
        var seeds = [
            JobSeed(job: job(model: "llama.gguf", plan: wanda, sequenceLength: 4, samples: 2, layers: nil, first: 0, end: 2, hasTargets: false),
                    headers: boundary(samples: 2, rows: 4, cols: 8, targets: false)),
            JobSeed(job: job(model: "llama.gguf", plan: sparseGPT, sequenceLength: 8, samples: 3, layers: [1, 1], first: 1, end: 2, hasTargets: false),
                    headers: boundary(samples: 3, rows: 8, cols: 8, targets: false)),
            JobSeed(job: job(model: "mixtral.gguf", plan: sparseLLM, sequenceLength: 4, samples: 2, layers: nil, first: 0, end: 1, hasTargets: true),
                    headers: boundary(samples: 2, rows: 4, cols: 8, targets: true)),
        ]
        // Weights sent with the job: a llama and a Mixtral configuration, no file.
        var llama = ModelConfig(architecture: .llama, hiddenSize: 8, intermediateSize: 16, layerCount: 3, headCount: 2, kvHeadCount: 1,
                                vocabularySize: 40, maxPositions: 32, normEps: 1e-5, tieWordEmbeddings: false)
        var mixtral = llama
        mixtral.architecture = .mixtral
        mixtral.expertCount = 2
        mixtral.expertsPerToken = 1
        llama.qkvBias = true
        for (c, plan, range) in [(llama, besa, 1..<3), (mixtral, wanda, 0..<2)] {
            let w = weights(c, range)
            seeds.append(JobSeed(job: job(model: "", plan: plan, sequenceLength: 4, samples: 2, layers: nil, first: range.lowerBound,
                                          end: range.upperBound, hasTargets: false, config: c, weightTensors: w.count),
                                 headers: boundary(samples: 2, rows: 4, cols: 8, targets: false) + w))
        }
        return seeds
    }

    /// A header as the wire would deliver it: through encode and decode (which refuses what no
    /// peer could send), or the decoder's error.
    static func delivered(_ h: TensorAnnouncement) throws -> TensorAnnouncement {
        guard case .tensorHeader(let stream, let name, let dtype, let shape, let byteCount) = try Message.decode(h.message.frame()) else {
            throw FuzzFailure("a tensor header decoded as another message")
        }
        return TensorAnnouncement(stream: stream, name: name, dtype: dtype, shape: shape, byteCount: byteCount)
    }

    /// Changes one header: its name, a dimension, its type; or drops, repeats or adds one.
    static func mutate(_ headers: inout [TensorAnnouncement], _ r: inout FuzzRandom) {
        let names = ["inputs/0", "inputs/1", "inputs/2", "inputs/-1", "inputs/01", "inputs/+1", "inputs/1099511627776", "inputs/",
                     "inputs/0/0", "targets/0", "targets/1", "Inputs/0", "", "model.layers.0.self_attn.q_proj.weight",
                     "model.layers.7.mlp.up_proj.weight", "model.layers.1.block_sparse_moe.experts.1.w1.weight"]
        let dims = [0, 1, 2, 3, 4, 7, 8, 9, 16, 32, 64, 4096, 1 << 20, 1 << 30, 1 << 40]
        let k = headers.isEmpty ? 0 : r.below(headers.count)
        switch r.below(7) {
        case 0 where !headers.isEmpty: headers[k].name = r.pick(names)
        case 1 where !headers.isEmpty:
            var shape = headers[k].shape
            if r.chance(0.2) {
                shape = r.chance(0.5) ? Array(shape.dropLast()) : shape + [r.pick(dims)]
            } else if !shape.isEmpty {
                shape[r.below(shape.count)] = r.pick(dims)
            }
            headers[k].shape = shape
            // Mostly a consistent byte count (the decoder refuses the rest).
            if r.chance(0.9) {
                headers[k].byteCount = shape.reduce(UInt64(headers[k].dtype.size)) { $0 &* UInt64($1) }
            }
        case 2 where !headers.isEmpty:
            headers[k].dtype = r.pick(WireDType.allCases)
            headers[k].byteCount = headers[k].byteCount / 4 * UInt64(headers[k].dtype.size)
        case 3 where !headers.isEmpty: headers.remove(at: k)
        case 4 where !headers.isEmpty: headers.insert(headers[k], at: r.below(headers.count + 1))
        case 5 where headers.count > 1: headers.swapAt(k, r.below(headers.count))
        default: headers.append(header(r.pick(names), [r.pick(dims), r.pick(dims)]))
        }
    }

    func check(_ seed: JobSeed, json: [UInt8], tensors: UInt32, maxTensorBytes: Int, directory: String) -> CaseOutcome {
        writeFiles(models, to: directory)
        // A fresh service per case (nothing cached from an earlier case), working in the case directory.
        let service = WorkerService(name: "fuzz", workDirectory: directory + "/work")
        let cwd = FileManager.default.currentDirectoryPath
        // The jobs name their model relative to the case directory.
        _ = FileManager.default.changeCurrentDirectoryPath(directory)
        defer { _ = FileManager.default.changeCurrentDirectoryPath(cwd) }
        var steps = Steps()
        steps.attempt {
            let headers = try seed.headers.map(JobTarget.delivered)
            try service.checkJob(json, tensors: tensors, headers: headers, maxTensorBytes: maxTensorBytes)
        }
        return steps.outcome
    }

    /// Numbers near the job's bounds (docs/protocol.md, "What a worker checks"), besides the
    /// generally interesting ones.
    static let literals = ["0", "1", "2", "3", "4", "5", "7", "8", "9", "16", "31", "32", "33", "-1", "-2", "0.5", "0.999", "1.0", "1e-9", "1024", "1025",
                           "3600", "3600.5", "4095", "4096", "4097", "16384", "16385", "65536", "65537", "100000", "100001",
                           "262144", "262145", "1048576", "1048577", "16777216", "16777217"] + Interesting.numbers

    func run(_ r: inout FuzzRandom, directory: String) -> CaseOutcome {
        var seed = r.pick(seeds)
        // Mostly values changed in place, so that cases get past the decoder to the checks.
        for _ in 0..<r.pick([0, 1, 1, 2, 2, 3, 4]) { seed.job.mutateLeaf(&r, literals: JobTarget.literals) }
        for _ in 0..<r.pick([0, 0, 0, 1, 1, 2]) { seed.job.mutate(&r) }
        var file = FuzzFile(name: "", bytes: Array(seed.job.text.utf8), isText: true)
        Mutator.mutate(&file, donors: seeds.map { Array($0.job.text.utf8) }, &r, rounds: r.pick([0, 0, 0, 0, 0, 0, 0, 1, 2, 4]))
        for _ in 0..<r.pick([0, 0, 0, 1, 1, 2]) { JobTarget.mutate(&seed.headers, &r) }
        // The assign message's count: the headers that follow, or another number.
        var tensors = UInt32(seed.headers.count)
        if r.chance(0.1) { tensors = r.chance(0.5) ? tensors &+ UInt32(bitPattern: Int32(r.below(5) - 2)) : UInt32(truncatingIfNeeded: r.pick(Interesting.unsigned)) }
        let limit = r.chance(0.9) ? 4 << 30 : r.pick([0, 4, 64, 100, 128, 1 << 10])
        return check(seed, json: file.bytes, tensors: tensors, maxTensorBytes: limit, directory: directory)
    }

    func checkSeeds(directory: String) -> [String] {
        seeds.enumerated().compactMap { i, s in
            if case .refused(let e) = check(s, json: Array(s.job.text.utf8), tensors: UInt32(s.headers.count), maxTensorBytes: 4 << 30, directory: directory) {
                return "job seed \(i): \(e)"
            }
            return nil
        }
    }
}

extension JSON {
    /// Replaces one number anywhere in the document by one of `literals`, or flips one Bool:
    /// the document keeps its structure.
    mutating func mutateLeaf(_ r: inout FuzzRandom, literals: [String]) {
        func leaves(_ v: JSON) -> Int {
            switch v {
            case .number, .bool: return 1
            case .array(let a): return a.reduce(0) { $0 + leaves($1) }
            case .object(let m): return m.reduce(0) { $0 + leaves($1.1) }
            default: return 0
            }
        }
        func replace(_ v: inout JSON, _ k: inout Int, _ r: inout FuzzRandom) {
            switch v {
            case .number, .bool:
                if k == 0 {
                    if case .bool(let b) = v { v = .bool(!b) } else { v = .number(r.pick(literals)) }
                }
                k -= 1
            case .array(var a):
                for i in a.indices where k >= 0 { replace(&a[i], &k, &r) }
                v = .array(a)
            case .object(var m):
                for i in m.indices where k >= 0 { replace(&m[i].1, &k, &r) }
                v = .object(m)
            default: break
            }
        }
        let n = leaves(self)
        guard n > 0 else { return }
        var k = r.below(n)
        replace(&self, &k, &r)
    }
}

func makeTargets() -> [any FuzzTarget] {
    [GGUFTarget(), SafeTensorsTarget(), Llama2CTarget(), TokenizerBinTarget(), TokenizerJSONTarget(), FrameTarget(), MessageTarget(), JobTarget(),
     ShardTarget(), TasksTarget()]
}
