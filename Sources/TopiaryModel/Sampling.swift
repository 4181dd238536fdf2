import Foundation
import TopiaryTensor

/// Keys and values of the positions decoded so far, for every block and sequence: what lets
/// `DeviceBlock.decode` run one new token per sequence without recomputing the earlier ones.
///
/// The cache lives on the host. Attention over it is one query row per sequence and head, each
/// (sequence) computed by one task in a fixed order, so its bits do not depend on the thread
/// count. Call `advance()` after every block has decoded the step's tokens.
public final class KVCache: @unchecked Sendable {
    public let config: ModelConfig
    public let sequences: Int
    public let capacity: Int
    /// Positions cached so far: the position of the token being decoded.
    public private(set) var length = 0
    let rope: Kernels.RopeTable?
    /// [block][sequence]: rows of kvHeads*headDim floats, one per position.
    var keys: [[[Float]]]
    var values: [[[Float]]]

    public init(config: ModelConfig, sequences: Int, capacity: Int) {
        precondition(sequences > 0 && capacity > 0 && capacity <= config.maxPositions, "KVCache: \(sequences) sequences of \(capacity) positions")
        self.config = config
        self.sequences = sequences
        self.capacity = capacity
        rope = config.architecture.isLlamaLike ? config.ropeTable(positions: capacity) : nil
        let empty = [[Float]](repeating: [], count: sequences)
        keys = Array(repeating: empty, count: config.layerCount)
        values = keys
    }

    /// The step's tokens are in every block's cache: the next call decodes the next position.
    public func advance() {
        precondition(length < capacity, "KVCache: full (\(capacity) positions)")
        length += 1
    }

    /// Attention of block `b` for one new token per sequence (rows of q, k, v: [sequences x ...],
    /// not yet rotated): rotates q and k to position `length`, appends k and v to the cache and
    /// attends each query to positions 0...length (or the window's last ones).
    func attend(_ b: DeviceBlock, q: Tensor, k: Tensor, v: Tensor, options: AttentionOptions) -> Tensor {
        let c = config, backend = b.backend
        let d = c.headDim, heads = c.headCount, kvHeads = c.kvHeadCount, group = heads / kvHeads
        let qWidth = heads * d, kWidth = kvHeads * d
        precondition(q.rows == sequences && k.rows == sequences && q.cols == qWidth && k.cols == kWidth && length < capacity,
                     "KVCache: \(q.rows) rows for \(sequences) sequences at position \(length) of \(capacity)")
        var qh = backend.download(q), kh = backend.download(k)
        let vh = backend.download(v)
        let position = length
        if let rope {
            // Every row is its own sequence's token at the same position: rotated one at a time.
            qh.withUnsafeMutableBufferPointer { p in
                for s in 0..<sequences {
                    Kernels.rope(p.baseAddress! + s * qWidth, tokens: 1, heads: heads, headDim: d, firstPosition: position, table: rope, layout: c.ropeLayout)
                }
            }
            kh.withUnsafeMutableBufferPointer { p in
                for s in 0..<sequences {
                    Kernels.rope(p.baseAddress! + s * kWidth, tokens: 1, heads: kvHeads, headDim: d, firstPosition: position, table: rope, layout: c.ropeLayout)
                }
            }
        }
        let block = b.index
        kh.withUnsafeBufferPointer { kp in
            vh.withUnsafeBufferPointer { vp in
                for s in 0..<sequences {
                    keys[block][s].append(contentsOf: UnsafeBufferPointer(rebasing: kp[(s * kWidth)..<((s + 1) * kWidth)]))
                    values[block][s].append(contentsOf: UnsafeBufferPointer(rebasing: vp[(s * kWidth)..<((s + 1) * kWidth)]))
                }
            }
        }
        let n = position + 1
        let first = options.firstVisible(position)
        var out = Matrix(rows: sequences, cols: qWidth)
        let blockKeys = keys[block], blockValues = values[block]
        qh.withUnsafeBufferPointer { qp in
            out.withUnsafeMutableBufferPointer { op in
                let (qBase, oBase) = (qp.baseAddress!, op.baseAddress!)
                Parallel.forEach(sequences, chunk: 1) { range in
                    var scores = [Float](repeating: 0, count: n)
                    for s in range {
                        blockKeys[s].withUnsafeBufferPointer { kp in
                            blockValues[s].withUnsafeBufferPointer { vp in
                                scores.withUnsafeMutableBufferPointer { sp in
                                    for h in 0..<heads {
                                        let qRow = qBase + s * qWidth + h * d
                                        let kv = (h / group) * d
                                        for j in first..<n {
                                            let kRow = kp.baseAddress! + j * kWidth + kv
                                            var dot: Float = 0
                                            for i in 0..<d { dot += qRow[i] * kRow[i] }
                                            var score = options.scale * dot
                                            if let cap = options.softcap { score = cap * tanhf(score / cap) }
                                            sp[j] = score
                                        }
                                        Kernels.softmax(sp.baseAddress! + first, n - first)
                                        let oRow = oBase + s * qWidth + h * d
                                        for i in 0..<d { oRow[i] = 0 }
                                        for j in first..<n {
                                            let p = sp[j]
                                            let vRow = vp.baseAddress! + j * kWidth + kv
                                            for i in 0..<d { oRow[i] += p * vRow[i] }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        return backend.upload(out)
    }
}

extension DeviceBlock {
    /// One decoding step: `x` [sequences x hidden] holds each sequence's newest token at position
    /// `cache.length`; attention reads and extends `cache`. The rest of the block (norms, linears,
    /// feed-forward, experts) is the same code as `forward`.
    public func decode(_ x: Tensor, cache: KVCache) -> Tensor {
        precondition(x.cols == config.hiddenSize && x.rows == cache.sequences, "block \(index): decode input \(x) for \(cache.sequences) sequences")
        var pass = BlockPass(sequenceLength: 1, rope: nil, backend: backend)
        pass.cache = cache
        return config.family.forward(self, x, &pass)
    }
}

extension Embedding {
    /// Embeds one token per sequence, every one at `position` (OPT adds that position's embedding).
    public func embed(_ ids: [Int], position: Int, on backend: any ComputeBackend) -> Tensor {
        for id in ids { precondition(id >= 0 && id < tokens.rows, "token id \(id) outside the vocabulary of \(tokens.rows)") }
        var x = backend.upload(tokens.gatherRows(ids))
        if let projectIn { x = backend.linear(x, backend.upload(projectIn)) }
        if let scale = config.embeddingScale { backend.scale(x, by: scale) }
        if let positions {
            backend.add(backend.upload(positions.gatherRows(Array(repeating: position + config.positionOffset, count: ids.count))), into: x)
        }
        return x
    }
}

/// A sampling temperature that moves linearly from `initial` (the first generated token) to
/// `final` (the last).
public struct TemperatureSchedule: Sendable, Equatable {
    public var initial: Double
    public var final: Double

    public init(initial: Double, final: Double) {
        self.initial = initial
        self.final = final
    }

    /// The temperature of generated token `index` of `count` (0-based).
    public func temperature(_ index: Int, of count: Int) -> Double {
        count <= 1 ? initial : initial + (final - initial) * Double(index) / Double(count - 1)
    }
}

extension Generation {
    /// Samples `sequences` sequences of `length` tokens each, starting from `start` (the first
    /// token of every sequence), with a KV cache: `batch` sequences at a time (sequences
    /// b·batch ..< (b+1)·batch together, one forward step per position), so the cache holds
    /// batch x length positions per block. Sequence s draws from its own generator,
    /// SplitMix64(seed: the s-th output of SplitMix64(seed)). Token i (1-based after the start
    /// token) is drawn from softmax(logits / T) with T = schedule.temperature(i-1, of: length-1):
    /// probabilities exp((l - max)/T) in Double, summed in vocabulary order, the first token whose
    /// running sum exceeds u·total, u the sequence's next number in [0, 1). The end-of-sequence
    /// token is sampled like any other, and sampling continues after it. The whole model is in
    /// memory while sampling. The same arguments give the same tokens on any thread count.
    public static func sample(model: LanguageModel, sequences: Int, length: Int, start: Int, schedule: TemperatureSchedule, seed: UInt64,
                              batch: Int = 16, backend: any ComputeBackend = ComputeDevices.defaultBackend,
                              progress: ((_ done: Int, _ total: Int) -> Void)? = nil) throws -> [[Int]] {
        let c = model.config
        precondition(sequences > 0 && length > 0 && batch > 0, "sample: \(sequences) sequences of \(length), batches of \(batch)")
        guard length <= c.maxPositions else {
            throw EvaluationError.windowTooLong(sequenceLength: length, context: c.maxPositions, path: model.path)
        }
        guard start >= 0 && start < c.vocabularySize else { throw EvaluationError.tokenOutOfRange(id: start, vocabulary: c.vocabularySize) }
        var ids = [[Int]](repeating: [start], count: sequences)
        if length == 1 { return ids }
        var root = SplitMix64(seed: seed)
        var generators = (0..<sequences).map { _ in SplitMix64(seed: root.next()) }
        let embedding = try model.loadEmbedding()
        let blocks = try (0..<c.layerCount).map { try model.loadBlock($0).on(backend) }
        let head = try model.loadHead(embedding: embedding)
        var weights = [Double](repeating: 0, count: c.vocabularySize)
        let steps = length - 1
        var done = 0
        for first in stride(from: 0, to: sequences, by: batch) {
            let members = first..<min(first + batch, sequences)
            let cache = KVCache(config: c, sequences: members.count, capacity: steps)
            for step in 0..<steps {
                var x = embedding.embed(members.map { ids[$0][step] }, position: step, on: backend)
                for b in blocks { x = b.decode(x, cache: cache) }
                cache.advance()
                let logits = head.logits(x, rows: 0..<members.count, on: backend)
                let temperature = schedule.temperature(step, of: steps)
                logits.withUnsafeBufferPointer { p in
                    let v = logits.cols
                    for (r, s) in members.enumerated() {
                        let row = p.baseAddress! + r * v
                        var top = row[0]
                        for j in 1..<v where row[j] > top { top = row[j] }
                        var total = 0.0
                        for j in 0..<v {
                            let w = row[j].isFinite ? exp(Double(row[j] - top) / temperature) : 0
                            weights[j] = w
                            total += w
                        }
                        let threshold = generators[s].nextUnit() * total
                        var chosen = -1, running = 0.0
                        for j in 0..<v where weights[j] > 0 {
                            running += weights[j]
                            chosen = j
                            if running > threshold { break }
                        }
                        ids[s].append(max(chosen, 0))
                    }
                }
                done += members.count
                progress?(done, sequences * steps)
            }
        }
        return ids
    }
}
