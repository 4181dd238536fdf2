import CTopiaryKernels
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// How rotary position embeddings pair the dimensions of a head.
public enum RopeLayout: String, Sendable, Codable {
    /// Pairs (2i, 2i+1): llama2.c and GGUF (the converter permutes Q/K rows for it).
    case adjacentPairs = "adjacent"
    /// Pairs (i, i + d/2): Hugging Face "rotate_half".
    case rotateHalf = "rotate-half"
}

/// Element-wise and row-wise kernels over unsafe buffers, vectorised with SIMD where it pays.
/// All row kernels take a row-major matrix of `rows` x `cols` in place unless said otherwise.
public enum Kernels {
    public typealias Vec = SIMD16<Float>

    /// Sum of squares of `n` floats at `p`, reduced in a fixed order.
    @inlinable
    public static func sumOfSquares(_ p: UnsafePointer<Float>, _ n: Int) -> Float {
        var acc = Vec()
        var i = 0
        let raw = UnsafeRawPointer(p)
        while i + 16 <= n {
            let v = raw.loadUnaligned(fromByteOffset: i * 4, as: Vec.self)
            acc += v * v
            i += 16
        }
        var s = acc.sum()
        while i < n { s += p[i] * p[i]; i += 1 }
        return s
    }

    @inlinable
    public static func sum(_ p: UnsafePointer<Float>, _ n: Int) -> Float {
        var acc = Vec()
        var i = 0
        let raw = UnsafeRawPointer(p)
        while i + 16 <= n {
            acc += raw.loadUnaligned(fromByteOffset: i * 4, as: Vec.self)
            i += 16
        }
        var s = acc.sum()
        while i < n { s += p[i]; i += 1 }
        return s
    }

    /// out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * weight, row by row. `out` may alias `x`.
    public static func rmsNorm(_ x: UnsafePointer<Float>, weight: UnsafePointer<Float>, eps: Float,
                               rows: Int, cols: Int, out: UnsafeMutablePointer<Float>) {
        for r in 0..<rows {
            let xr = x + r * cols
            let orow = out + r * cols
            let ms = sumOfSquares(xr, cols) / Float(cols)
            let scale = 1 / sqrtf(ms + eps)
            for c in 0..<cols { orow[c] = xr[c] * scale * weight[c] }
        }
    }

    /// out[r] = (x[r] - mean) / sqrt(var + eps) * weight + bias (biased variance, as PyTorch). `out` may alias `x`.
    public static func layerNorm(_ x: UnsafePointer<Float>, weight: UnsafePointer<Float>, bias: UnsafePointer<Float>?,
                                 eps: Float, rows: Int, cols: Int, out: UnsafeMutablePointer<Float>) {
        for r in 0..<rows {
            let xr = x + r * cols
            let orow = out + r * cols
            let mean = sum(xr, cols) / Float(cols)
            var v: Float = 0
            for c in 0..<cols { let d = xr[c] - mean; v += d * d }
            let inv = 1 / sqrtf(v / Float(cols) + eps)
            if let bias {
                for c in 0..<cols { orow[c] = (xr[c] - mean) * inv * weight[c] + bias[c] }
            } else {
                for c in 0..<cols { orow[c] = (xr[c] - mean) * inv * weight[c] }
            }
        }
    }

    /// p[i] = e^(p[i] - shift) for i < n, in place; returns their sum, added in 16 lanes of up to
    /// 256 terms each whose sums are added in Double (about double accuracy for any n). The
    /// exponential is Cephes' (Cody–Waite reduction, degree-7 polynomial, within 2 ulp), in C so
    /// that it runs in AVX-512 or AVX2 vectors where the CPU has them (CTopiaryKernels).
    @inlinable
    public static func expShifted(_ p: UnsafeMutablePointer<Float>, _ n: Int, shift: Float) -> Double {
        topiary_exp_shifted(p, n, shift)
    }

    /// The largest of p[0..<n] (-inf when n is 0; NaN entries are skipped).
    @inlinable
    public static func maximum(_ p: UnsafePointer<Float>, _ n: Int) -> Float { topiary_maximum(p, n) }

    /// Numerically stable softmax over the first `n` entries of a row, in place.
    @inlinable
    public static func softmax(_ p: UnsafeMutablePointer<Float>, _ n: Int) {
        if n == 0 { return }
        let m = maximum(p, n)
        let inv = Float(1 / expShifted(p, n, shift: m))
        scale(p, n, by: inv)
    }

    /// p[i] *= factor for i < n.
    @inlinable
    public static func scale(_ p: UnsafeMutablePointer<Float>, _ n: Int, by factor: Float) {
        let raw = UnsafeMutableRawPointer(p)
        let f = Vec(repeating: factor)
        var i = 0
        while i + 16 <= n {
            raw.storeBytes(of: raw.loadUnaligned(fromByteOffset: i * 4, as: Vec.self) * f, toByteOffset: i * 4, as: Vec.self)
            i += 16
        }
        while i < n { p[i] *= factor; i += 1 }
    }

    /// log(sum(exp(p[0..<n]))) computed stably, the sum of the exponentials in Double (a logit row
    /// of a 150K-token vocabulary loses nothing to the order of the sum).
    @inlinable
    public static func logSumExp(_ p: UnsafePointer<Float>, _ n: Int) -> Double {
        let m = maximum(p, n)
        return Double(m) + log(topiary_sum_exp_shifted(p, n, m))
    }

    /// The sum of e^(p[i] − shift) for i < n, added as `logSumExp` adds it (Double).
    public static func sumExpShifted(_ p: UnsafePointer<Float>, _ n: Int, shift: Float) -> Double {
        topiary_sum_exp_shifted(p, n, shift)
    }

    /// y[i] = silu(x[i]) in the CPU's vectors, with the 16-lane exponential of `swiglu`.
    public static func silu(_ x: UnsafePointer<Float>, into y: UnsafeMutablePointer<Float>, _ n: Int) {
        topiary_silu(x, y, n)
    }

    /// SparseLLM's gate (s) update for n elements in place on α(v − g)² + γ(p − act(v)·z)² per
    /// element: safeguarded Newton steps for SiLU and GELU-tanh, ReLU's exact minimiser
    /// (topiary_sparsellm_gate in the C kernels).
    public static func sparseLLMGate(s: UnsafeMutablePointer<Float>, g: UnsafePointer<Float>, z: UnsafePointer<Float>,
                                     p: UnsafePointer<Float>, _ n: Int, alpha: Float, gamma: Float, steps: Int,
                                     activation: GatedActivation) {
        let code = switch activation {
        case .silu: TOPIARY_GATE_SILU
        case .geluTanh: TOPIARY_GATE_GELU_TANH
        case .relu: TOPIARY_GATE_RELU
        }
        topiary_sparsellm_gate(s, g, z, p, n, alpha, gamma, Int32(clamping: steps), Int32(code))
    }

    /// gate[i] = silu(gate[i]) * up[i]: the SwiGLU product.
    public static func swiglu(gate: UnsafeMutablePointer<Float>, up: UnsafePointer<Float>, _ n: Int) {
        topiary_swiglu(gate, up, n)
    }

    /// y[i] = gelu_tanh(x[i]) in the CPU's vectors, tanh through the 16-lane exponential.
    public static func geluTanh(_ x: UnsafePointer<Float>, into y: UnsafeMutablePointer<Float>, _ n: Int) {
        topiary_gelu_tanh(x, y, n)
    }

    /// gate[i] = gelu_tanh(gate[i]) * up[i]: the GEGLU product (Gemma-2's feed-forward).
    public static func geglu(gate: UnsafeMutablePointer<Float>, up: UnsafePointer<Float>, _ n: Int) {
        topiary_geglu(gate, up, n)
    }

    /// x[i] = cap·tanh(x[i]/cap) in place, in the CPU's vectors (`geluTanh`'s tanh).
    public static func softcap(_ x: UnsafeMutablePointer<Float>, _ n: Int, cap: Float) {
        topiary_softcap(x, n, cap)
    }

    /// Scratch floats for `n` keys or values of `headDim` in the attention products' panels.
    public static func attentionPanelFloats(_ n: Int, headDim: Int) -> Int { (n + 15) / 16 * 16 * ((headDim + 15) / 16 * 16) }

    /// The causal mask of `attentionScores` and `attentionValues`: row r of the product sees
    /// columns j < (r mod period) + offset + 1 (a stack of query heads of `period` rows each, the
    /// first row offset columns past the tile's first key).
    public struct CausalTile {
        public var period: Int, offset: Int
        public init(period: Int, offset: Int) { (self.period, self.offset) = (period, offset) }
    }

    /// s[r·lds + j] = scale·(q row r · key j) for r < m and the columns j < n that r sees (the
    /// others hold anything): the keys (n rows of `headDim`, stride ldk) are first packed into
    /// `panels` (`attentionPanelFloats(n)`), then each score is one fused multiply-add chain over
    /// the head in order (topiary_attention_scores).
    public static func attentionScores(q: UnsafePointer<Float>, ldq: Int, m: Int, keys: UnsafePointer<Float>, ldk: Int, n: Int,
                                       headDim: Int, scale: Float, mask: CausalTile, panels: UnsafeMutablePointer<Float>,
                                       into s: UnsafeMutablePointer<Float>, lds: Int) {
        topiary_attention_pack_keys(keys, ldk, n, headDim, panels)
        topiary_attention_scores(q, ldq, m, panels, n, headDim, scale, mask.period, mask.offset, s, lds)
    }

    /// acc[r·ldacc + d] += Σ_{j<n} p[r·ldp + j]·values[j][d] for r < m, d < headDim, where p is 0
    /// at the columns row r does not see: the values (n rows, stride ldv) are first packed into
    /// `panels`, then each sum is one fused multiply-add chain over j in order, added to acc
    /// (topiary_attention_values).
    public static func attentionValues(p: UnsafePointer<Float>, ldp: Int, m: Int, values: UnsafePointer<Float>, ldv: Int, n: Int,
                                       headDim: Int, mask: CausalTile, panels: UnsafeMutablePointer<Float>,
                                       into acc: UnsafeMutablePointer<Float>, ldacc: Int) {
        topiary_attention_pack_values(values, ldv, n, headDim, panels)
        topiary_attention_values(p, ldp, m, panels, n, headDim, mask.period, mask.offset, acc, ldacc)
    }

    /// GEGLU's backward: dg and du from d = ∂L/∂(gelu(g)·u), with the forward's GELU.
    public static func gegluBackward(_ d: UnsafePointer<Float>, gate g: UnsafePointer<Float>, up u: UnsafePointer<Float>,
                                     dGate: UnsafeMutablePointer<Float>, dUp: UnsafeMutablePointer<Float>, _ n: Int) {
        topiary_geglu_backward(d, g, u, dGate, dUp, n)
    }

    /// SwiGLU's backward: dg and du from d = ∂L/∂(silu(g)·u), with the exponential of `swiglu`.
    public static func swigluBackward(_ d: UnsafePointer<Float>, gate g: UnsafePointer<Float>, up u: UnsafePointer<Float>,
                                      dGate: UnsafeMutablePointer<Float>, dUp: UnsafeMutablePointer<Float>, _ n: Int) {
        topiary_swiglu_backward(d, g, u, dGate, dUp, n)
    }

    /// p[i] = max(p[i], 0).
    public static func reluInPlace(_ p: UnsafeMutablePointer<Float>, _ n: Int) {
        for i in 0..<n { p[i] = max(p[i], 0) }
    }

    /// y[i] += x[i].
    public static func add(_ x: UnsafePointer<Float>, into y: UnsafeMutablePointer<Float>, _ n: Int) {
        var i = 0
        let rx = UnsafeRawPointer(x)
        let ry = UnsafeMutableRawPointer(y)
        while i + 16 <= n {
            let v = rx.loadUnaligned(fromByteOffset: i * 4, as: Vec.self) + ry.loadUnaligned(fromByteOffset: i * 4, as: Vec.self)
            ry.storeBytes(of: v, toByteOffset: i * 4, as: Vec.self)
            i += 16
        }
        while i < n { y[i] += x[i]; i += 1 }
    }

    /// y[i] += alpha * x[i] (SIMD; `x` and `y` must not overlap).
    @inlinable
    public static func axpy(_ alpha: Float, _ x: UnsafePointer<Float>, _ y: UnsafeMutablePointer<Float>, _ n: Int) {
        var i = 0
        let rx = UnsafeRawPointer(x)
        let ry = UnsafeMutableRawPointer(y)
        let a = Vec(repeating: alpha)
        while i + 16 <= n {
            let v = ry.loadUnaligned(fromByteOffset: i * 4, as: Vec.self) + a * rx.loadUnaligned(fromByteOffset: i * 4, as: Vec.self)
            ry.storeBytes(of: v, toByteOffset: i * 4, as: Vec.self)
            i += 16
        }
        while i < n { y[i] += alpha * x[i]; i += 1 }
    }

    /// Adds `bias` (length cols) to every row.
    public static func addBias(_ bias: UnsafePointer<Float>, to p: UnsafeMutablePointer<Float>, rows: Int, cols: Int) {
        for r in 0..<rows { add(bias, into: p + r * cols, cols) }
    }

    /// Rotary tables for positions 0..<maxPositions: cos and sin of pos * theta^(-2i/rotaryDim), i < rotaryDim/2.
    public struct RopeTable: Sendable {
        public let halfDim: Int
        public let cos: [Float]
        public let sin: [Float]
        public let positions: Int
        /// The inverse frequencies in Float64 (theta^(-2i/d) computed in Float64, then scaled by the
        /// ratio the Float32 scaling gives, or the 16-bit rounded value exactly): the Float64
        /// backend computes its angles from these.
        public let frequencies: [Double]

        /// Frequencies theta^(-2i/d) and angles pos * freq are computed in Float32, as both
        /// llama2.c and transformers do. `frequencyRounding` rounds the frequencies through a
        /// 16-bit type first, as transformers does for a model loaded in bf16 or fp16 (its
        /// inv_freq buffer is cast with the model).
        /// `scaleFrequency` rescales each frequency (long-context RoPE scaling) before the rounding.
        public init(rotaryDim: Int, theta: Float, positions: Int, frequencyRounding: FrequencyRounding = .none,
                    scaleFrequency: ((Float) -> Float)? = nil) {
            halfDim = rotaryDim / 2
            self.positions = positions
            var c = [Float](repeating: 0, count: positions * halfDim)
            var s = c
            var f64 = [Double](repeating: 0, count: halfDim)
            for i in 0..<halfDim {
                var freq = 1 / powf(theta, Float(2 * i) / Float(rotaryDim))
                f64[i] = 1 / pow(Double(theta), Double(2 * i) / Double(rotaryDim))
                if let scaleFrequency {
                    let scaled = scaleFrequency(freq)
                    f64[i] *= Double(scaled) / Double(freq)
                    freq = scaled
                }
                switch frequencyRounding {
                case .none: break
                case .bfloat16: freq = HalfPrecision.bf16ToFloat(HalfPrecision.floatToBF16(freq)); f64[i] = Double(freq)
                case .float16: freq = HalfPrecision.fp16ToFloat(HalfPrecision.floatToFP16(freq)); f64[i] = Double(freq)
                }
                for pos in 0..<positions {
                    let angle = Float(pos) * freq
                    c[pos * halfDim + i] = cosf(angle)
                    s[pos * halfDim + i] = sinf(angle)
                }
            }
            cos = c
            sin = s
            frequencies = f64
        }
    }

    public enum FrequencyRounding: String, Sendable, Codable {
        case none, bfloat16, float16
    }

    /// Applies RoPE in place to `x` [tokens x (heads*headDim)] where token t has position `firstPosition + t`.
    public static func rope(_ x: UnsafeMutablePointer<Float>, tokens: Int, heads: Int, headDim: Int,
                            firstPosition: Int, table: RopeTable, layout: RopeLayout) {
        let half = table.halfDim
        precondition(firstPosition + tokens <= table.positions, "RoPE table has \(table.positions) positions, need \(firstPosition + tokens)")
        table.cos.withUnsafeBufferPointer { cosT in
            table.sin.withUnsafeBufferPointer { sinT in
                for t in 0..<tokens {
                    let pos = firstPosition + t
                    let c = cosT.baseAddress! + pos * half
                    let s = sinT.baseAddress! + pos * half
                    for h in 0..<heads {
                        let v = x + t * heads * headDim + h * headDim
                        switch layout {
                        case .adjacentPairs:
                            for i in 0..<half {
                                let a = v[2 * i], b = v[2 * i + 1]
                                v[2 * i] = a * c[i] - b * s[i]
                                v[2 * i + 1] = a * s[i] + b * c[i]
                            }
                        case .rotateHalf:
                            let rd = 2 * half
                            for i in 0..<half {
                                let a = v[i], b = v[i + rd / 2]
                                v[i] = a * c[i] - b * s[i]
                                v[i + rd / 2] = b * c[i] + a * s[i]
                            }
                        }
                    }
                }
            }
        }
    }
}

/// −log softmax(row)[target] for every row of logits that arrive in blocks of columns (a
/// vocabulary too wide to hold every position's logits at once): each row's log-sum-exp is
/// carried online, its running maximum m and the Double sum of e^(x − m) (`sumExpShifted`),
/// rescaled by e^(m_old − m_new) when a block raises the maximum. Rows are independent, so the
/// bits depend on the blocks' order but not on the thread count.
public struct BlockedCrossEntropy: Sendable {
    public let targets: [Int]
    var maxima: [Float], sums: [Double], chosen: [Float]

    public init(targets: [Int]) {
        self.targets = targets
        (maxima, sums, chosen) = (Array(repeating: -.infinity, count: targets.count), Array(repeating: 0, count: targets.count),
                                  Array(repeating: .nan, count: targets.count))
    }

    /// Adds columns first..<first + width of every row: `block` is row-major, `width` apart.
    public mutating func add(_ block: UnsafePointer<Float>, first: Int, width: Int) {
        let targets = self.targets
        maxima.withUnsafeMutableBufferPointer { m in sums.withUnsafeMutableBufferPointer { s in chosen.withUnsafeMutableBufferPointer { c in
            let state = UnsafeSendable((block, m.baseAddress!, s.baseAddress!, c.baseAddress!))
            Parallel.forEach(targets.count, chunk: 16) { range in
                let (block, maxima, sums, chosen) = state.value
                for r in range {
                    let row = block + r * width
                    let blockMax = Kernels.maximum(row, width)
                    if blockMax > maxima[r] {
                        if sums[r] > 0 { sums[r] *= exp(Double(maxima[r]) - Double(blockMax)) }
                        maxima[r] = blockMax
                    }
                    // Before any finite logit, the block's are -inf (adding 0) or NaN (adding NaN).
                    sums[r] += Kernels.sumExpShifted(row, width, shift: maxima[r] > -.infinity ? maxima[r] : 0)
                    if targets[r] >= first, targets[r] < first + width { chosen[r] = row[targets[r] - first] }
                }
            }
        } } }
    }

    /// −log softmax at each row's target, in row order (NaN where a row's target was never in a
    /// block, or its logits were not finite).
    public var losses: [Double] {
        (0..<targets.count).map { r in Double(maxima[r]) + log(sums[r]) - Double(chosen[r]) }
    }
}
