import Foundation
import TopiaryTensor

/// Called with each linear layer's name (checkpoint name without ".weight") and its input
/// [tokens x in_features] just before the layer is applied; pruning collects statistics here.
public typealias LinearObserver = (_ linear: String, _ input: Matrix) -> Void

/// One decoder block of any family, with its weights under their checkpoint names. What the
/// block is made of and how it runs is its family's knowledge (Families/).
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

    /// Every tensor of the block as its family defines it.
    public var specs: [BlockTensorSpec] { config.family.blockTensors(config, block: index) }

    /// Loads block `index` from `source`, checking every tensor's shape.
    public static func load(from source: any TensorSource, config: ModelConfig, index: Int) throws -> DecoderBlock {
        var tensors: [String: Matrix] = [:]
        for spec in config.family.blockTensors(config, block: index) {
            var m = try source.load(spec.name)
            if m.rows == 1 && spec.rows != 1 && m.cols == spec.rows * spec.cols {
                m = m.reshaped(rows: spec.rows, cols: spec.cols)
            }
            guard m.rows == spec.rows && m.cols == spec.cols else {
                throw CheckpointError.shapeMismatch(path: source.path, tensor: spec.name,
                                                   expected: "[\(spec.rows), \(spec.cols)]", found: "[\(m.rows), \(m.cols)]")
            }
            tensors[spec.name] = m
        }
        return DecoderBlock(config: config, index: index, tensors: tensors)
    }

    /// The linear layers in forward order (names without ".weight").
    public var linearNames: [String] { config.family.linears(config, block: index) }
    /// Groups of linears that read the same input.
    public var inputGroups: [[String]] { config.family.inputGroups(config, block: index) }
    /// The feed-forward networks (SparseLLM's auxiliary-variable problems).
    public var feedForwards: [FeedForward] { config.family.feedForwards(config, block: index) }

    public func weight(_ linear: String) -> Matrix { tensor(linear + ".weight") }
    public func bias(_ linear: String) -> Matrix? { tensors[linear + ".bias"] }

    func tensor(_ name: String) -> Matrix {
        guard let m = tensors[name] else { preconditionFailure("block \(index) has no tensor \(name)") }
        return m
    }

    public var parameterCount: Int { tensors.values.reduce(0) { $0 + $1.count } }

    /// Runs the block over `x` [sequences*sequenceLength x hidden], each sequence at positions
    /// 0..<sequenceLength, and returns the block's output of the same shape.
    public func forward(_ x: Matrix, sequenceLength: Int, rope: Kernels.RopeTable? = nil, expertCalibration: ExpertCalibration = .routed,
                        observer: LinearObserver? = nil) -> Matrix {
        var pass = makePass(x, sequenceLength: sequenceLength, rope: rope, observer: observer, recording: false)
        pass.expertCalibration = expertCalibration
        return config.family.forward(self, x, &pass)
    }

    /// The same forward pass as `forward` (the same code, so the same output), keeping what
    /// `weightGradients` needs.
    public func forwardRecording(_ x: Matrix, sequenceLength: Int, rope: Kernels.RopeTable? = nil) -> (output: Matrix, tape: BlockTape) {
        var pass = makePass(x, sequenceLength: sequenceLength, rope: rope, observer: nil, recording: true)
        let y = config.family.forward(self, x, &pass)
        return (y, pass.tape)
    }

    /// ∂L/∂W for every linear layer (by name, without ".weight"), given ∂L/∂output and the tape
    /// of the forward pass that produced the output. W is the weight the forward used, so for a
    /// masked block this is the gradient with respect to the effective weight W⊙M.
    public func weightGradients(outputGradient dy: Matrix, tape: BlockTape) -> [String: Matrix] {
        precondition(dy.cols == config.hiddenSize && dy.rows % tape.sequenceLength == 0, "block \(index): output gradient is \(dy.rows)x\(dy.cols)")
        return config.family.weightGradients(self, dy, tape)
    }

    func makePass(_ x: Matrix, sequenceLength: Int, rope: Kernels.RopeTable?, observer: LinearObserver?, recording: Bool) -> BlockPass {
        precondition(x.cols == config.hiddenSize, "block \(index): input has \(x.cols) features, expected \(config.hiddenSize)")
        precondition(sequenceLength > 0 && x.rows % sequenceLength == 0, "block \(index): \(x.rows) rows is not a whole number of sequences of \(sequenceLength)")
        let table = config.architecture.isLlamaLike ? (rope ?? config.ropeTable(positions: sequenceLength)) : nil
        return BlockPass(sequenceLength: sequenceLength, rope: table, observer: observer, recording: recording)
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

    /// An RMSNorm weight as the family applies it (Gemma-2 scales by 1 + w).
    func normWeight(_ name: String) -> Matrix {
        let w = tensor(name)
        let offset = config.family.rmsNormOffset
        guard offset != 0 else { return w }
        var shifted = w
        shifted.withUnsafeMutableBufferPointer { p in for i in p.indices { p[i] += offset } }
        return shifted
    }

    func rmsNorm(_ x: Matrix, _ weight: String) -> Matrix {
        ModelMath.rmsNorm(x, normWeight(weight), eps: config.normEps)
    }

    func layerNorm(_ x: Matrix, _ weight: String, _ bias: String) -> Matrix {
        ModelMath.layerNorm(x, tensor(weight), tensor(bias), eps: config.normEps)
    }
}

extension ModelFamily {
    /// RMSNorm scales by (offset + w): 0 for most families, 1 for Gemma-2.
    public static var rmsNormOffset: Float { 0 }
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
    /// Rotary tables for positions 0..<positions, with the config's frequency scaling.
    public func ropeTable(positions: Int) -> Kernels.RopeTable {
        var theta = ropeTheta
        if case .dynamic(let factor)? = ropeScaling, positions > maxPositions {
            // transformers' dynamic NTK: the base grows with the sequence beyond the trained context.
            let d = Float(headDim)
            theta *= powf(factor * Float(positions) / Float(maxPositions) - (factor - 1), d / (d - 2))
        }
        let scaling = ropeScaling
        // Rounding the frequencies to the checkpoint's dtype reproduces a transformers model cast
        // with .to(dtype) (the tiny-llama-bf16 fixture); current transformers keeps scaled
        // frequencies in fp32 (the tiny-llama3 fixture), so scaled RoPE is never rounded.
        let rounding = scaling == nil ? ropeFrequencyRounding : .none
        return Kernels.RopeTable(rotaryDim: headDim, theta: theta, positions: positions, frequencyRounding: rounding) { freq in
            switch scaling {
            case .linear(let factor)?: return freq / factor
            case .llama3(let factor, let low, let high, let original)?:
                let lowWavelength = Float(original) / low
                let highWavelength = Float(original) / high
                let wavelength = 2 * Float.pi / freq
                if wavelength < highWavelength { return freq }
                if wavelength > lowWavelength { return freq / factor }
                let smooth = (Float(original) / wavelength - low) / (high - low)
                return (1 - smooth) * freq / factor + smooth * freq
            case .dynamic?, nil: return freq
            }
        }
    }
}

/// Causal multi-head attention with grouped key/value heads, through GEMM.
public enum Attention {
    /// Query rows handled at once; bounds the score scratch to queryBlock x sequenceLength.
    static let queryBlock = 256

    /// How scores become probabilities.
    public struct Options: Sendable {
        /// Scores are q·k times this (1/sqrt(head_dim) unless the family says otherwise).
        public var scale: Float
        /// A query sees itself and the `window - 1` keys before it (nil: every earlier key).
        public var window: Int?
        /// Scores are capped as softcap·tanh(score/softcap) (Gemma-2).
        public var softcap: Float?

        public init(scale: Float, window: Int? = nil, softcap: Float? = nil) {
            self.scale = scale
            self.window = window
            self.softcap = softcap
        }

        public static func standard(headDim: Int) -> Options { Options(scale: 1 / Float(headDim).squareRoot()) }

        /// The first key that query `i` sees.
        @inlinable
        public func firstVisible(_ i: Int) -> Int { window.map { max(0, i - $0 + 1) } ?? 0 }
    }

    /// q [N x heads*headDim], k and v [N x kvHeads*headDim], N = sequences * sequenceLength.
    /// Causal attention probabilities of query rows `rows` of one head against keys 0..<rows.upperBound
    /// (later keys are masked anyway), into `p` ([rows.count x rows.upperBound]; masked entries 0).
    /// With soft-capping, `capped` (same shape) receives the capped scores, which the backward needs.
    /// The forward pass and the backward pass (which recomputes them) share this, so both see
    /// the same values bit for bit.
    @inlinable
    public static func probabilities(q: UnsafePointer<Float>, qStride: Int, k: UnsafePointer<Float>, kStride: Int, headDim: Int,
                                     options: Options, rows: Range<Int>, into p: UnsafeMutablePointer<Float>,
                                     capped: UnsafeMutablePointer<Float>? = nil) {
        let (i0, i1) = (rows.lowerBound, rows.upperBound)
        Linalg.sgemm(.none, .transposed, m: rows.count, n: i1, k: headDim, alpha: options.scale,
                     a: q + i0 * qStride, lda: qStride, b: k, ldb: kStride, beta: 0, c: p, ldc: i1)
        for r in 0..<rows.count {
            let row = p + r * i1
            let visible = i0 + r + 1
            let first = options.firstVisible(i0 + r)
            if let cap = options.softcap {
                for j in first..<visible { row[j] = cap * tanhf(row[j] / cap) }
                if let capped { (capped + r * i1).update(from: row, count: i1) }
            }
            Kernels.softmax(row + first, visible - first)
            for j in 0..<first { row[j] = 0 }
            for j in visible..<i1 { row[j] = 0 }
        }
    }

    public static func causal(q: Matrix, k: Matrix, v: Matrix, sequenceLength t: Int, heads: Int, kvHeads: Int, headDim: Int,
                              options: Options? = nil) -> Matrix {
        let options = options ?? .standard(headDim: headDim)
        let qDim = heads * headDim
        let kvDim = kvHeads * headDim
        let sequences = q.rows / t
        let group = heads / kvHeads
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
                                                      options: options, rows: i0..<i1, into: s)
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
