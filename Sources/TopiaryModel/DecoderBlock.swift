import TopiaryTensor

/// Called with each linear layer's name (checkpoint name without ".weight") and its input
/// [tokens x in_features] just before the layer is applied; pruning collects statistics here.
public typealias LinearObserver = (_ linear: String, _ input: Matrix) -> Void

/// One decoder block (LLaMA or OPT) with its weights under their checkpoint names.
public struct DecoderBlock: Sendable {
    public let config: ModelConfig
    public let index: Int
    /// All tensors of the block by full checkpoint name ("model.layers.3.mlp.up_proj.weight").
    public var tensors: [String: Matrix]

    public init(config: ModelConfig, index: Int, tensors: [String: Matrix]) {
        self.config = config
        self.index = index
        self.tensors = tensors
    }

    /// Loads block `index` from `source`, checking every tensor's shape.
    public static func load(from source: any TensorSource, config: ModelConfig, index: Int) throws -> DecoderBlock {
        var tensors: [String: Matrix] = [:]
        for name in WeightNames.blockTensors(config.architecture, block: index) {
            var m = try source.load(name)
            let expected = expectedShape(config, name)
            if m.rows == 1 && expected.rows != 1 && m.cols == expected.rows * expected.cols {
                m = m.reshaped(rows: expected.rows, cols: expected.cols)
            }
            guard m.rows == expected.rows && m.cols == expected.cols else {
                throw CheckpointError.shapeMismatch(path: source.path, tensor: name,
                                                   expected: "[\(expected.rows), \(expected.cols)]", found: "[\(m.rows), \(m.cols)]")
            }
            tensors[name] = m
        }
        return DecoderBlock(config: config, index: index, tensors: tensors)
    }

    /// Shape of a block tensor as this code stores it (1-D tensors are [1 x n]).
    static func expectedShape(_ c: ModelConfig, _ name: String) -> (rows: Int, cols: Int) {
        let leaf = name.split(separator: ".").suffix(2).joined(separator: ".")
        let isBias = name.hasSuffix(".bias")
        let h = c.hiddenSize
        switch leaf {
        case "q_proj.weight": return (c.queryDim, h)
        case "k_proj.weight", "v_proj.weight": return (c.kvDim, h)
        case "o_proj.weight", "out_proj.weight": return (h, c.queryDim)
        case "gate_proj.weight", "up_proj.weight", "fc1.weight": return (c.intermediateSize, h)
        case "down_proj.weight", "fc2.weight": return (h, c.intermediateSize)
        case "q_proj.bias": return (1, c.queryDim)
        case "k_proj.bias", "v_proj.bias": return (1, c.kvDim)
        case "fc1.bias": return (1, c.intermediateSize)
        default: return isBias || name.hasSuffix("norm.weight") ? (1, h) : (1, h)
        }
    }

    /// The linear layers in forward order (names without ".weight").
    public var linearNames: [String] { WeightNames.linears(config.architecture, block: index) }

    public func weight(_ linear: String) -> Matrix { tensors[linear + ".weight"]! }
    public func bias(_ linear: String) -> Matrix? { tensors[linear + ".bias"] }

    public var parameterCount: Int { tensors.values.reduce(0) { $0 + $1.count } }

    /// Runs the block over `x` [sequences*sequenceLength x hidden], each sequence at positions
    /// 0..<sequenceLength, and returns the block's output of the same shape.
    public func forward(_ x: Matrix, sequenceLength: Int, rope: Kernels.RopeTable? = nil,
                        observer: LinearObserver? = nil) -> Matrix {
        precondition(x.cols == config.hiddenSize, "block \(index): input has \(x.cols) features, expected \(config.hiddenSize)")
        precondition(sequenceLength > 0 && x.rows % sequenceLength == 0, "block \(index): \(x.rows) rows is not a whole number of sequences of \(sequenceLength)")
        switch config.architecture {
        case .llama: return forwardLlama(x, sequenceLength: sequenceLength, rope: rope ?? config.ropeTable(positions: sequenceLength), observer: observer)
        case .opt: return forwardOPT(x, sequenceLength: sequenceLength, observer: observer)
        }
    }

    /// y = x Wᵀ (+ b), reporting the input to the observer first.
    func apply(_ linear: String, _ x: Matrix, _ observer: LinearObserver?) -> Matrix {
        observer?(linear, x)
        var y = Linalg.linear(x, weight(linear))
        if let b = bias(linear) {
            let (rows, cols) = (y.rows, y.cols)
            y.withUnsafeMutableBufferPointer { py in
                b.withUnsafeBufferPointer { pb in Kernels.addBias(pb.baseAddress!, to: py.baseAddress!, rows: rows, cols: cols) }
            }
        }
        return y
    }

    // MARK: LLaMA: norm, project, rotate, attend, project, add; norm, gate/up, SiLU, down, add.

    func forwardLlama(_ x: Matrix, sequenceLength: Int, rope: Kernels.RopeTable, observer: LinearObserver?) -> Matrix {
        let p = WeightNames.blockPrefix(.llama, index)
        var out = x
        let h = rmsNorm(x, tensors[p + "input_layernorm.weight"]!)
        var q = apply(p + "self_attn.q_proj", h, observer)
        var k = apply(p + "self_attn.k_proj", h, observer)
        let v = apply(p + "self_attn.v_proj", h, observer)
        applyRope(&q, heads: config.headCount, sequenceLength: sequenceLength, rope: rope)
        applyRope(&k, heads: config.kvHeadCount, sequenceLength: sequenceLength, rope: rope)
        let attn = Attention.causal(q: q, k: k, v: v, sequenceLength: sequenceLength, heads: config.headCount,
                                    kvHeads: config.kvHeadCount, headDim: config.headDim)
        addInPlace(&out, apply(p + "self_attn.o_proj", attn, observer))
        let h2 = rmsNorm(out, tensors[p + "post_attention_layernorm.weight"]!)
        var gate = apply(p + "mlp.gate_proj", h2, observer)
        let up = apply(p + "mlp.up_proj", h2, observer)
        gate.withUnsafeMutableBufferPointer { g in
            up.withUnsafeBufferPointer { u in Kernels.swiglu(gate: g.baseAddress!, up: u.baseAddress!, g.count) }
        }
        addInPlace(&out, apply(p + "mlp.down_proj", gate, observer))
        return out
    }

    func applyRope(_ m: inout Matrix, heads: Int, sequenceLength: Int, rope: Kernels.RopeTable) {
        let sequences = m.rows / sequenceLength
        let width = m.cols
        m.withUnsafeMutableBufferPointer { p in
            for s in 0..<sequences {
                Kernels.rope(p.baseAddress! + s * sequenceLength * width, tokens: sequenceLength, heads: heads,
                             headDim: config.headDim, firstPosition: 0, table: rope, layout: config.ropeLayout)
            }
        }
    }

    // MARK: OPT: pre-LN (x + attn(LN(x)), x + fc2(relu(fc1(LN(x))))) or post-LN (LN(x + attn(x)), ...).

    func forwardOPT(_ x: Matrix, sequenceLength: Int, observer: LinearObserver?) -> Matrix {
        let p = WeightNames.blockPrefix(.opt, index)
        let attnNorm = (tensors[p + "self_attn_layer_norm.weight"]!, tensors[p + "self_attn_layer_norm.bias"]!)
        let ffnNorm = (tensors[p + "final_layer_norm.weight"]!, tensors[p + "final_layer_norm.bias"]!)
        let pre = config.layerNormBefore

        var out = x
        let h = pre ? layerNorm(x, attnNorm.0, attnNorm.1) : x
        let q = apply(p + "self_attn.q_proj", h, observer)
        let k = apply(p + "self_attn.k_proj", h, observer)
        let v = apply(p + "self_attn.v_proj", h, observer)
        let attn = Attention.causal(q: q, k: k, v: v, sequenceLength: sequenceLength, heads: config.headCount,
                                    kvHeads: config.kvHeadCount, headDim: config.headDim)
        addInPlace(&out, apply(p + "self_attn.out_proj", attn, observer))
        if !pre { out = layerNorm(out, attnNorm.0, attnNorm.1) }

        let h2 = pre ? layerNorm(out, ffnNorm.0, ffnNorm.1) : out
        var f = apply(p + "fc1", h2, observer)
        f.withUnsafeMutableBufferPointer { Kernels.reluInPlace($0.baseAddress!, $0.count) }
        addInPlace(&out, apply(p + "fc2", f, observer))
        if !pre { out = layerNorm(out, ffnNorm.0, ffnNorm.1) }
        return out
    }

    // MARK: helpers

    func rmsNorm(_ x: Matrix, _ w: Matrix) -> Matrix {
        ModelMath.rmsNorm(x, w, eps: config.normEps)
    }

    func layerNorm(_ x: Matrix, _ w: Matrix, _ b: Matrix) -> Matrix {
        ModelMath.layerNorm(x, w, b, eps: config.normEps)
    }
}

func addInPlace(_ y: inout Matrix, _ x: Matrix) {
    precondition(y.rows == x.rows && y.cols == x.cols)
    y.withUnsafeMutableBufferPointer { py in
        x.withUnsafeBufferPointer { px in Kernels.add(px.baseAddress!, into: py.baseAddress!, py.count) }
    }
}

enum ModelMath {
    static func layerNorm(_ x: Matrix, _ w: Matrix, _ b: Matrix?, eps: Float) -> Matrix {
        var y = Matrix(rows: x.rows, cols: x.cols)
        x.withUnsafeBufferPointer { px in
            w.withUnsafeBufferPointer { pw in
                y.withUnsafeMutableBufferPointer { py in
                    if let b {
                        b.withUnsafeBufferPointer { pb in
                            Kernels.layerNorm(px.baseAddress!, weight: pw.baseAddress!, bias: pb.baseAddress!, eps: eps, rows: x.rows, cols: x.cols, out: py.baseAddress!)
                        }
                    } else {
                        Kernels.layerNorm(px.baseAddress!, weight: pw.baseAddress!, bias: nil, eps: eps, rows: x.rows, cols: x.cols, out: py.baseAddress!)
                    }
                }
            }
        }
        return y
    }

    static func rmsNorm(_ x: Matrix, _ w: Matrix, eps: Float) -> Matrix {
        var y = Matrix(rows: x.rows, cols: x.cols)
        x.withUnsafeBufferPointer { px in
            w.withUnsafeBufferPointer { pw in
                y.withUnsafeMutableBufferPointer { py in
                    Kernels.rmsNorm(px.baseAddress!, weight: pw.baseAddress!, eps: eps, rows: x.rows, cols: x.cols, out: py.baseAddress!)
                }
            }
        }
        return y
    }
}

extension ModelConfig {
    /// Rotary tables for positions 0..<positions.
    public func ropeTable(positions: Int) -> Kernels.RopeTable {
        Kernels.RopeTable(rotaryDim: headDim, theta: ropeTheta, positions: positions, frequencyRounding: ropeFrequencyRounding)
    }
}

/// Causal multi-head attention with grouped key/value heads, through GEMM.
public enum Attention {
    /// Query rows handled at once; bounds the score scratch to queryBlock x sequenceLength.
    static let queryBlock = 256

    /// q [N x heads*headDim], k and v [N x kvHeads*headDim], N = sequences * sequenceLength.
    /// Causal attention probabilities of query rows `rows` of one head against keys 0..<rows.upperBound
    /// (later keys are masked anyway), into `p` ([rows.count x rows.upperBound]; masked entries 0).
    /// The forward pass and the backward pass (which recomputes them) share this, so both see
    /// the same values bit for bit.
    @inlinable
    public static func probabilities(q: UnsafePointer<Float>, qStride: Int, k: UnsafePointer<Float>, kStride: Int, headDim: Int,
                                     scale: Float, rows: Range<Int>, into p: UnsafeMutablePointer<Float>) {
        let (i0, i1) = (rows.lowerBound, rows.upperBound)
        Linalg.sgemm(.none, .transposed, m: rows.count, n: i1, k: headDim, alpha: scale,
                     a: q + i0 * qStride, lda: qStride, b: k, ldb: kStride, beta: 0, c: p, ldc: i1)
        for r in 0..<rows.count {
            let row = p + r * i1
            let visible = i0 + r + 1
            Kernels.softmax(row, visible)
            for j in visible..<i1 { row[j] = 0 }
        }
    }

    public static func causal(q: Matrix, k: Matrix, v: Matrix, sequenceLength t: Int, heads: Int, kvHeads: Int, headDim: Int) -> Matrix {
        let qDim = heads * headDim
        let kvDim = kvHeads * headDim
        let sequences = q.rows / t
        let group = heads / kvHeads
        let scale = 1 / Float(headDim).squareRoot()
        var out = Matrix(rows: q.rows, cols: qDim)
        let block = min(queryBlock, t)
        var scores = [Float](repeating: 0, count: block * t)
        q.withUnsafeBufferPointer { pq in
            k.withUnsafeBufferPointer { pk in
                v.withUnsafeBufferPointer { pv in
                    out.withUnsafeMutableBufferPointer { po in
                        scores.withUnsafeMutableBufferPointer { ps in
                            let s = ps.baseAddress!
                            for seq in 0..<sequences {
                                let base = seq * t
                                for h in 0..<heads {
                                    let kvHead = h / group
                                    let qh = pq.baseAddress! + base * qDim + h * headDim
                                    let kh = pk.baseAddress! + base * kvDim + kvHead * headDim
                                    let vh = pv.baseAddress! + base * kvDim + kvHead * headDim
                                    let oh = po.baseAddress! + base * qDim + h * headDim
                                    var i0 = 0
                                    while i0 < t {
                                        let i1 = min(i0 + block, t)
                                        let rows = i1 - i0
                                        probabilities(q: qh, qStride: qDim, k: kh, kStride: kvDim, headDim: headDim,
                                                      scale: scale, rows: i0..<i1, into: s)
                                        Linalg.sgemm(.none, .none, m: rows, n: headDim, k: i1, alpha: 1,
                                                     a: s, lda: i1, b: vh, ldb: kvDim, beta: 0, c: oh + i0 * qDim, ldc: qDim)
                                        i0 = i1
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        return out
    }
}
