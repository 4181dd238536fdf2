import Foundation
import TopiaryTensor

/// Row permutations between the two RoPE layouts of Q and K projections.
public enum RopePermutation {
    /// Reorders the rows of a Q or K weight [heads*headDim x in] (or a bias [1 x heads*headDim])
    /// from adjacent-pair layout (GGUF, llama2.c) to Hugging Face's rotate-half layout:
    /// within each head, row j*half + i of the result is row 2i + j of the input.
    public static func adjacentToRotateHalf(_ w: Matrix, heads: Int, headDim: Int) -> Matrix {
        permute(w, heads: heads, headDim: headDim, inverse: false)
    }

    /// The inverse of `adjacentToRotateHalf`.
    public static func rotateHalfToAdjacent(_ w: Matrix, heads: Int, headDim: Int) -> Matrix {
        permute(w, heads: heads, headDim: headDim, inverse: true)
    }

    static func permute(_ w: Matrix, heads: Int, headDim: Int, inverse: Bool) -> Matrix {
        let half = headDim / 2
        let isVector = w.rows == 1 && w.cols == heads * headDim
        let rows = isVector ? w.cols : w.rows
        precondition(rows == heads * headDim, "RoPE permutation: \(rows) rows for \(heads) heads of \(headDim)")
        let width = isVector ? 1 : w.cols
        var out = Matrix(rows: w.rows, cols: w.cols)
        out.withUnsafeMutableBufferPointer { dst in
            w.withUnsafeBufferPointer { src in
                for h in 0..<heads {
                    for i in 0..<half {
                        for j in 0..<2 {
                            let hf = h * headDim + j * half + i
                            let adj = h * headDim + 2 * i + j
                            let (to, from) = inverse ? (adj, hf) : (hf, adj)
                            (dst.baseAddress! + to * width).update(from: src.baseAddress! + from * width, count: width)
                        }
                    }
                }
            }
        }
        return out
    }
}

/// Writes a model as a Hugging Face directory: config.json, safetensors weights, and the
/// tokenizer and generation files (HuggingFaceExport+Files.swift says which, for each source).
public enum HuggingFaceExport {
    /// Non-block tensors above this many elements are written in pieces of about this many.
    static let pieceElements = 1 << 21

    /// Writes `model` (with blocks from `block`, default: the model's own) to `directory`.
    /// Q/K rows are put in rotate-half layout. `dtype` nil writes `defaultDType(for:)` (a Hugging
    /// Face source's own, else F32). A sharded Hugging Face source gives the same shards; other
    /// sources give one file, or shards of at most `maxShardBytes`. Returns the weight files written.
    /// `weightsDigest`, when given, is fed the weight files' bytes as they are written (in the
    /// order returned): `SHA256Digest.files` of the returned files, without reading them back.
    /// The weight files go to disk as they are written and do not stay in the page cache.
    @discardableResult
    public static func write(
        model: LanguageModel, to directory: String, dtype: TensorDType? = nil,
        block: ((Int) throws -> DecoderBlock)? = nil, maxShardBytes: Int = 5 << 30, weightsDigest: SHA256Stream? = nil
    ) throws -> [String] {
        let c = model.config
        var out = c
        out.ropeLayout = .rotateHalf
        let dtype = dtype ?? defaultDType(for: model)
        try model.checkEmbeddingAndHeadTensors()
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let layout = try writeNonWeightFiles(model: model, config: out, dtype: dtype, to: directory)

        var writer = SafeTensorsWriter(directory: directory, maxShardBytes: maxShardBytes, metadata: [:])
        writer.layout = layout.shards
        writer.indexHasTotalParameters = layout.totalParameters
        writer.streamsToDisk = true
        writer.weightsDigest = weightsDigest
        let loadBlock = block ?? { try model.loadBlock($0) }
        let permute = c.architecture.isLlamaLike && c.ropeLayout == .adjacentPairs
        // Non-block tensors.
        for name in model.weights.tensorNames where !name.contains(".layers.") {
            if name == WeightNames.lmHead && c.tieWordEmbeddings { continue }
            guard let e = model.weights.entry(name) else { continue }
            // An embedding or head is the largest tensor (SmolLM2's 113 MB in Float32, a 70B's
            // 4.2 GB): written in pieces of rows, it is never held whole.
            if e.shape.count >= 2, e.shape[0] > 1, e.elementCount > pieceElements {
                let rows = max(1, pieceElements / max(e.elementCount / e.shape[0], 1))
                try writer.add(name: name, shape: e.shape, dtype: dtype, rows: rows) { try model.weights.load(name, rows: $0) }
            } else {
                try writer.add(name: name, shape: e.shape, dtype: dtype) { try model.weights.load(name) }
            }
        }
        // Blocks, one at a time when written, as the family's checkpoint stores them.
        for i in 0..<c.layerCount {
            let tensors = c.family.checkpointTensors(c, block: i)
            let cache = BlockCache(uses: tensors.reduce(0) { $0 + $1.parts.count }, load: { try loadBlock(i) })
            for tensor in tensors {
                try writer.add(name: tensor.name, shape: tensor.shape, dtype: dtype) {
                    var parts: [Matrix] = []
                    for name in tensor.parts {
                        var m = try cache.take(name)
                        let isQ = name.hasSuffix("q_proj.weight") || name.hasSuffix("q_proj.bias")
                        let isK = name.hasSuffix("k_proj.weight") || name.hasSuffix("k_proj.bias")
                        if permute && isQ { m = RopePermutation.adjacentToRotateHalf(m, heads: c.headCount, headDim: c.headDim) }
                        if permute && isK { m = RopePermutation.adjacentToRotateHalf(m, heads: c.kvHeadCount, headDim: c.headDim) }
                        parts.append(m)
                    }
                    return parts.count == 1 ? parts[0] : Matrix.vstack(parts)
                }
            }
        }
        return try writer.finish()
    }

}

/// Holds a block while its tensors are written (the writer orders tensors by name, so a block's
/// tensors are written together but not in forward order); released after its last tensor.
final class BlockCache: @unchecked Sendable {
    private let load: () throws -> DecoderBlock
    private var block: DecoderBlock?
    private var remaining: Int

    init(uses: Int, load: @escaping () throws -> DecoderBlock) {
        self.remaining = uses
        self.load = load
    }

    func take(_ name: String) throws -> Matrix {
        let b = try block ?? load()
        remaining -= 1
        block = remaining > 0 ? b : nil
        return b.tensors[name]!
    }
}
