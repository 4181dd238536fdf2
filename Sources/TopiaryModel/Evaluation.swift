import Foundation
import TopiaryTensor

/// Errors in evaluation and generation requests.
public enum EvaluationError: Error, CustomStringConvertible, Equatable {
    case windowTooLong(sequenceLength: Int, context: Int, path: String)
    case tooFewTokens(tokens: Int, sequenceLength: Int)
    case noTokenizer(path: String)
    case tokenOutOfRange(id: Int, vocabulary: Int)
    /// A window's loss is NaN or infinite. `source` says where non-finite values first appeared
    /// ("block 3", "the token embedding", "the logits").
    case nonFiniteLoss(path: String, window: Int, windows: Int, firstToken: Int, sequenceLength: Int, loss: Double, source: String)
    /// Every loss is finite, but their mean is too large for exp (perplexity above 10^308).
    case perplexityOverflow(path: String, meanLoss: Double)
    /// Generation's next-token logits hold a NaN or an infinity (`source` as for `nonFiniteLoss`).
    case nonFiniteLogits(path: String, position: Int, source: String)

    public var description: String {
        switch self {
        case .windowTooLong(let t, let c, let p):
            return "\(p): a window of \(t) tokens is longer than the model's context of \(c) positions"
        case .tooFewTokens(let n, let t):
            return "the text has \(n) tokens, fewer than one window of \(t)"
        case .noTokenizer(let p):
            return "\(p): the model has no tokenizer; pass --tokenizer PATH"
        case .tokenOutOfRange(let id, let v):
            return "token id \(id) is outside the vocabulary (\(v) tokens)"
        case .nonFiniteLoss(let p, let w, let n, let first, let t, let loss, let source):
            return "\(p): window \(w + 1) of \(n) (tokens \(first)..<\(first + t)) has a non-finite loss (\(loss)); non-finite values first appeared in \(source)"
        case .perplexityOverflow(let p, let mean):
            return "\(p): the mean loss is \(mean) nats, so perplexity exp(\(mean)) is too large to represent"
        case .nonFiniteLogits(let p, let position, let source):
            return "\(p): the logits for the token at position \(position) are not finite (NaN or infinite), so there is no next token to choose; non-finite values first appeared in \(source)"
        }
    }
}

/// Where a hidden state first held a NaN or an infinity, for an error that names it: the token
/// embedding, a block's output, or else the final norm and logits (a scan per block, small beside
/// the block's own work).
struct NonFiniteTrace {
    private var first: String?

    init(embedding x: Tensor, on backend: any ComputeBackend) {
        first = backend.allFinite(x) ? nil : "the token embedding"
    }

    mutating func check(_ x: Tensor, block i: Int, on backend: any ComputeBackend) {
        if first == nil, !backend.allFinite(x) { first = "the output of block \(i)" }
    }

    var source: String { first ?? "the final norm and logits (every block's output was finite)" }
}

/// Result of the standard perplexity protocol.
public struct PerplexityResult: Sendable {
    public var perplexity: Double
    /// Mean cross-entropy of each window over its seqlen-1 predictions.
    public var windowLosses: [Double]
    public var sequenceLength: Int
    public var windows: Int { windowLosses.count }
    public var meanLoss: Double { windowLosses.reduce(0, +) / Double(max(windowLosses.count, 1)) }
    /// Where the time went (`eval --profile`).
    public var seconds = PerplexitySeconds()
}

/// Wall seconds of `Perplexity.evaluate`'s phases.
public struct PerplexitySeconds: Sendable, Equatable {
    /// Reading and converting weights: the embedding, every block, the head.
    public var load = 0.0
    /// The token embedding's lookup.
    public var embed = 0.0
    /// The blocks' forward passes over every window (with the finiteness checks).
    public var forward = 0.0
    /// The final norm, the logits and the log-softmax.
    public var head = 0.0
    public init() {}
}

/// The standard perplexity protocol (SparseGPT/Wanda `eval_ppl`): the token stream cut into
/// non-overlapping windows, each evaluated alone; perplexity = exp(mean window loss).
///
/// Evaluation streams block by block: every window's hidden state goes through block 0, then
/// block 1, and so on, so only one block's weights are in memory at a time. With `stateBudget`
/// (bytes), the windows whose hidden states do not fit in it at once go in later groups, each
/// streaming the blocks again: more reading, the same losses bit for bit (every window is
/// computed alone, and the mean adds them in window order).
public enum Perplexity {
    public static func evaluate(
        model: LanguageModel, tokens: [Int], sequenceLength: Int, windows requested: Int? = nil,
        block: ((Int) throws -> DecoderBlock)? = nil, backend: any ComputeBackend = ComputeDevices.defaultBackend,
        stateBudget: Int? = nil, progress: ((_ done: Int, _ total: Int) -> Void)? = nil
    ) throws -> PerplexityResult {
        let c = model.config
        guard sequenceLength <= c.maxPositions else {
            throw EvaluationError.windowTooLong(sequenceLength: sequenceLength, context: c.maxPositions, path: model.path)
        }
        guard sequenceLength >= 2 else { throw EvaluationError.tooFewTokens(tokens: tokens.count, sequenceLength: sequenceLength) }
        let available = tokens.count / sequenceLength
        guard available >= 1 else { throw EvaluationError.tooFewTokens(tokens: tokens.count, sequenceLength: sequenceLength) }
        let count = min(requested ?? available, available)
        if let bad = tokens.first(where: { $0 < 0 || $0 >= c.vocabularySize }) {
            throw EvaluationError.tokenOutOfRange(id: bad, vocabulary: c.vocabularySize)
        }
        var seconds = PerplexitySeconds()
        func timed<T>(_ phase: WritableKeyPath<PerplexitySeconds, Double>, _ body: () throws -> T) rethrows -> T {
            let t0 = Date()
            defer { seconds[keyPath: phase] += Date().timeIntervalSince(t0) }
            return try body()
        }
        let groupSize = stateBudget.map { max(1, $0 / Self.stateBytes(c, sequenceLength: sequenceLength)) } ?? count
        let groups = stride(from: 0, to: count, by: groupSize).map { $0..<min($0 + groupSize, count) }
        let rope = c.ropeTable(positions: sequenceLength)
        let loadBlock = block ?? { try model.loadBlock($0) }
        let embedding = try timed(\.load) { try model.loadEmbedding() }
        var losses: [Double] = []
        for (g, group) in groups.enumerated() {
            var states = timed(\.embed) {
                group.map { w in
                    embedding.embed(Array(tokens[(w * sequenceLength)..<((w + 1) * sequenceLength)]), sequenceLength: sequenceLength, on: backend)
                }
            }
            // Where each window's hidden state first held a NaN or an infinity (a scan per block per
            // window, small beside the block's own work), so that a non-finite loss can be traced.
            var firstNonFinite = states.map { NonFiniteTrace(embedding: $0, on: backend) }
            for i in 0..<c.layerCount {
                let b = try timed(\.load) { try loadBlock(i).on(backend) }
                // The next block's bytes are read by the kernel while this one computes (cold files on
                // a network file system, a 70B model's 1.7 GB a block in bf16).
                if block == nil, i + 1 < c.layerCount { model.prefetchBlock(i + 1) }
                timed(\.forward) {
                    for k in states.indices {
                        states[k] = b.forward(states[k], sequenceLength: sequenceLength, rope: rope)
                        firstNonFinite[k].check(states[k], block: i, on: backend)
                    }
                }
                progress?(g * c.layerCount + i + 1, groups.count * c.layerCount)
            }
            if block == nil, g + 1 < groups.count { model.prefetchBlock(0) }
            let head = try timed(\.load) { try model.loadHead(embedding: embedding) }
            for (k, w) in group.enumerated() {
                let targets = Array(tokens[(w * sequenceLength + 1)..<((w + 1) * sequenceLength)])
                let loss = timed(\.head) { meanCrossEntropy(head: head, hidden: states[k], targets: targets, on: backend) }
                guard loss.isFinite else {
                    throw EvaluationError.nonFiniteLoss(path: model.path, window: w, windows: count, firstToken: w * sequenceLength,
                                                        sequenceLength: sequenceLength, loss: loss,
                                                        source: firstNonFinite[k].source)
                }
                losses.append(loss)
            }
        }
        let mean = losses.reduce(0, +) / Double(losses.count)
        guard exp(mean).isFinite else { throw EvaluationError.perplexityOverflow(path: model.path, meanLoss: mean) }
        var result = PerplexityResult(perplexity: exp(mean), windowLosses: losses, sequenceLength: sequenceLength)
        result.seconds = seconds
        return result
    }

    /// One window's hidden state in memory: `sequenceLength` x the model's width, as Float32.
    public static func stateBytes(_ c: ModelConfig, sequenceLength: Int) -> Int {
        let bytes = Double(max(sequenceLength, 1)) * Double(max(c.hiddenSize, 1)) * Double(MemoryLayout<Float>.size)
        return bytes < 0x1p62 ? Int(bytes) : 1 << 62
    }

    /// The logits at every position of one sequence [tokens x vocabulary], streaming the blocks.
    public static func logits(model: LanguageModel, tokens: [Int], backend: any ComputeBackend = ComputeDevices.defaultBackend) throws -> Matrix {
        let c = model.config
        guard !tokens.isEmpty, tokens.count <= c.maxPositions else {
            throw EvaluationError.windowTooLong(sequenceLength: tokens.count, context: c.maxPositions, path: model.path)
        }
        if let bad = tokens.first(where: { $0 < 0 || $0 >= c.vocabularySize }) {
            throw EvaluationError.tokenOutOfRange(id: bad, vocabulary: c.vocabularySize)
        }
        let embedding = try model.loadEmbedding()
        var x = embedding.embed(tokens, sequenceLength: tokens.count, on: backend)
        let rope = c.ropeTable(positions: tokens.count)
        for i in 0..<c.layerCount {
            let b = try model.loadBlock(i).on(backend)
            if i + 1 < c.layerCount { model.prefetchBlock(i + 1) }
            x = b.forward(x, sequenceLength: tokens.count, rope: rope)
        }
        return backend.download(try model.loadHead(embedding: embedding).logits(x, on: backend))
    }

    /// Vocabulary entries whose logits `meanCrossEntropy` takes at once for `rows` positions:
    /// 2048, fewer for windows beyond 2048 positions so that a block stays near 16 MB (at least
    /// 256 entries).
    static func vocabularyBlock(rows: Int) -> Int { max(256, min(2048, (1 << 22) / max(rows, 1))) }

    /// Mean of -log softmax(logits[r])[targets[r]] over r < targets.count.
    ///
    /// The logits of all positions are taken against `vocabularyBlock` entries of the vocabulary
    /// at a time (about 16 MB; one GEMM of every position per block, so the classifier is read
    /// and packed once, where row chunks read all of it per chunk), and each row's log-sum-exp is
    /// carried across the blocks online (`BlockedCrossEntropy`): its running maximum m and the
    /// Double sum of e^(x − m), rescaled by e^(m_old − m_new) when a block raises the maximum.
    /// The bits do not depend on the thread count; the mean adds the rows in order.
    public static func meanCrossEntropy(head: Head, hidden: Tensor, targets: [Int], on backend: any ComputeBackend) -> Double {
        if let f64 = backend as? Float64Backend { return meanCrossEntropy(head: head, hidden: hidden, targets: targets, on: f64) }
        let rows = targets.count
        guard rows > 0 else { return .nan }
        let features = head.features(rows == hidden.rows ? hidden : backend.copy(hidden.region(rows: 0..<rows)), on: backend)
        let classifier = backend.upload(head.classifier)
        let vocabulary = head.classifier.rows
        var loss = BlockedCrossEntropy(targets: targets)
        let width = vocabularyBlock(rows: rows)
        var block: Tensor?
        var v0 = 0
        while v0 < vocabulary {
            let v1 = min(v0 + width, vocabulary)
            if block?.cols != v1 - v0 { block = backend.zeros(rows: rows, cols: v1 - v0) }
            let logits = block!
            backend.gemm(features.all, .none, classifier.region(rows: v0..<v1), .transposed, alpha: 1, beta: 0, into: logits.all)
            if let cap = head.config.finalLogitSoftcap { backend.softcap(logits, cap: cap) }
            backend.download(logits).withUnsafeBufferPointer { loss.add($0.baseAddress!, first: v0, width: v1 - v0) }
            v0 = v1
        }
        return loss.losses.reduce(0, +) / Double(rows)
    }

    /// The same in Float64: the logits come to the host unrounded and the log-softmax is taken in Float64.
    static func meanCrossEntropy(head: Head, hidden: Tensor, targets: [Int], on backend: Float64Backend) -> Double {
        let chunk = 128
        var total = 0.0
        var r0 = 0
        while r0 < targets.count {
            let r1 = min(r0 + chunk, targets.count)
            let logits = head.logits(backend.copy(hidden.region(rows: r0..<r1)), on: backend)
            let (v, values) = (logits.cols, backend.downloadValues(logits))
            for r in 0..<(r1 - r0) { total -= logProbability(values[(r * v)..<((r + 1) * v)], target: targets[r0 + r]) }
            r0 = r1
        }
        return total / Double(targets.count)
    }

    /// log softmax(row)[target] in Float64 (`row` indexed from its own start index).
    static func logProbability(_ row: ArraySlice<Double>, target: Int) -> Double {
        let m = row.max() ?? 0
        var s = 0.0
        for x in row { s += exp(x - m) }
        return row[row.startIndex + target] - m - log(s)
    }

    /// The same, for hidden states on the host.
    public static func meanCrossEntropy(head: Head, hidden: Matrix, targets: [Int]) -> Double {
        let backend = CPUBackend()
        return meanCrossEntropy(head: head, hidden: backend.upload(hidden), targets: targets, on: backend)
    }
}

/// Greedy text generation.
public enum Generation {
    /// Continues `prompt` greedily for up to `maxTokens` tokens, stopping after the end-of-sequence
    /// token. Returns the generated ids (prompt excluded).
    public static func greedy(model: LanguageModel, prompt: [Int], maxTokens: Int, stopAtEOS: Bool = true,
                              backend: any ComputeBackend = ComputeDevices.defaultBackend) throws -> [Int] {
        let c = model.config
        precondition(!prompt.isEmpty, "generation needs at least one prompt token")
        if let bad = prompt.first(where: { $0 < 0 || $0 >= c.vocabularySize }) {
            throw EvaluationError.tokenOutOfRange(id: bad, vocabulary: c.vocabularySize)
        }
        let embedding = try model.loadEmbedding()
        let blocks = try (0..<c.layerCount).map { try model.loadBlock($0).on(backend) }
        let head = try model.loadHead(embedding: embedding)
        var ids = prompt
        var generated: [Int] = []
        while generated.count < maxTokens && ids.count < c.maxPositions {
            // Recomputes the whole sequence each step; fine for the short looks this command is for.
            var x = embedding.embed(ids, sequenceLength: ids.count, on: backend)
            let rope = c.ropeTable(positions: ids.count)
            var firstNonFinite = NonFiniteTrace(embedding: x, on: backend)
            for (i, b) in blocks.enumerated() {
                x = b.forward(x, sequenceLength: ids.count, rope: rope)
                firstNonFinite.check(x, block: i, on: backend)
            }
            let logits = head.logits(x, rows: (ids.count - 1)..<ids.count, on: backend)
            // An argmax over NaNs would pick token 0 at every step, silently.
            guard logits.withUnsafeBufferPointer({ p in p.allSatisfy { $0.isFinite } }) else {
                throw EvaluationError.nonFiniteLogits(path: model.path, position: ids.count, source: firstNonFinite.source)
            }
            let next = logits.withUnsafeBufferPointer { p -> Int in
                var best = 0
                for i in 1..<p.count where p[i] > p[best] { best = i }
                return best
            }
            generated.append(next)
            ids.append(next)
            if stopAtEOS, c.eosTokenIDs.contains(next) || next == c.eosTokenID { break }
        }
        return generated
    }
}
