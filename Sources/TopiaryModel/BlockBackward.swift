#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import TopiaryTensor

/// What a block's forward pass keeps for its backward pass. Only the gradients with respect to
/// the linear layers' (effective) weights are wanted (BESA learns masks of frozen weights), so
/// nothing before the first linear's input is kept and the backward stops at q/k/v.
public struct BlockTape: Sendable {
    public let sequenceLength: Int
    let rope: Kernels.RopeTable?
    /// Input of q/k/v: the first norm's output (LLaMA, OPT pre-LN) or the block input (OPT post-LN).
    let attentionInput: Matrix
    /// Queries and keys as the scores see them (after RoPE for LLaMA), and values.
    let queries: Matrix
    let keys: Matrix
    let values: Matrix
    /// Attention output before the output projection (heads merged).
    let context: Matrix
    /// h = x + attention: the input of the second norm (LLaMA, OPT pre-LN) or of the first (OPT post-LN).
    let attentionResidual: Matrix
    /// Input of the FFN's first linear(s).
    let ffnInput: Matrix
    /// LLaMA: the gate projection g; OPT: fc1's output (bias included).
    let preActivation: Matrix
    /// LLaMA: the up projection u.
    let up: Matrix?
    /// Input of the FFN's last linear: silu(g)⊙u, or relu(fc1).
    let activation: Matrix
    /// OPT post-LN: the sum before the final norm.
    let outputResidual: Matrix?
}

extension DecoderBlock {
    /// The same forward pass as `forward` (the same operations in the same order, so the same
    /// output), keeping what `weightGradients` needs.
    public func forwardRecording(_ x: Matrix, sequenceLength: Int, rope: Kernels.RopeTable? = nil) -> (output: Matrix, tape: BlockTape) {
        precondition(x.cols == config.hiddenSize, "block \(index): input has \(x.cols) features, expected \(config.hiddenSize)")
        precondition(sequenceLength > 0 && x.rows % sequenceLength == 0, "block \(index): \(x.rows) rows is not a whole number of sequences of \(sequenceLength)")
        switch config.architecture {
        case .llama: return recordLlama(x, sequenceLength: sequenceLength, rope: rope ?? config.ropeTable(positions: sequenceLength))
        case .opt: return recordOPT(x, sequenceLength: sequenceLength)
        }
    }

    /// ∂L/∂W for every linear layer (by name, without ".weight"), given ∂L/∂output and the tape
    /// of the forward pass that produced the output. W is the weight the forward used, so for a
    /// masked block this is the gradient with respect to the effective weight W⊙M.
    public func weightGradients(outputGradient dy: Matrix, tape: BlockTape) -> [String: Matrix] {
        precondition(dy.rows == tape.attentionResidual.rows && dy.cols == config.hiddenSize, "block \(index): output gradient is \(dy.rows)x\(dy.cols)")
        switch config.architecture {
        case .llama: return backwardLlama(dy, tape)
        case .opt: return backwardOPT(dy, tape)
        }
    }

    // MARK: LLaMA

    func recordLlama(_ x: Matrix, sequenceLength: Int, rope: Kernels.RopeTable) -> (output: Matrix, tape: BlockTape) {
        let p = WeightNames.blockPrefix(.llama, index)
        let a = rmsNorm(x, tensors[p + "input_layernorm.weight"]!)
        var q = apply(p + "self_attn.q_proj", a, nil)
        var k = apply(p + "self_attn.k_proj", a, nil)
        let v = apply(p + "self_attn.v_proj", a, nil)
        applyRope(&q, heads: config.headCount, sequenceLength: sequenceLength, rope: rope)
        applyRope(&k, heads: config.kvHeadCount, sequenceLength: sequenceLength, rope: rope)
        let o = Attention.causal(q: q, k: k, v: v, sequenceLength: sequenceLength, heads: config.headCount,
                                 kvHeads: config.kvHeadCount, headDim: config.headDim)
        var h = x
        addInPlace(&h, apply(p + "self_attn.o_proj", o, nil))
        let b = rmsNorm(h, tensors[p + "post_attention_layernorm.weight"]!)
        let g = apply(p + "mlp.gate_proj", b, nil)
        let u = apply(p + "mlp.up_proj", b, nil)
        var m = g
        m.withUnsafeMutableBufferPointer { pm in
            u.withUnsafeBufferPointer { pu in Kernels.swiglu(gate: pm.baseAddress!, up: pu.baseAddress!, pm.count) }
        }
        var y = h
        addInPlace(&y, apply(p + "mlp.down_proj", m, nil))
        let tape = BlockTape(sequenceLength: sequenceLength, rope: rope, attentionInput: a, queries: q, keys: k, values: v,
                             context: o, attentionResidual: h, ffnInput: b, preActivation: g, up: u, activation: m, outputResidual: nil)
        return (y, tape)
    }

    func backwardLlama(_ dy: Matrix, _ t: BlockTape) -> [String: Matrix] {
        let p = WeightNames.blockPrefix(.llama, index)
        let (gateName, upName, downName) = (p + "mlp.gate_proj", p + "mlp.up_proj", p + "mlp.down_proj")
        var grads: [String: Matrix] = [:]
        // y = h + m W_dᵀ, m = silu(g)⊙u.
        grads[downName] = Linalg.matmul(dy, .transposed, t.activation, .none)
        let dm = Linalg.matmul(dy, weight(downName))
        var dg = dm, du = dm
        dg.withUnsafeMutableBufferPointer { pg in
            du.withUnsafeMutableBufferPointer { pu in
                t.preActivation.withUnsafeBufferPointer { g in
                    t.up!.withUnsafeBufferPointer { u in
                        for i in pg.indices {
                            let sigma = 1 / (1 + expf(-g[i]))
                            pu[i] *= g[i] * sigma                                    // ∂/∂u: silu(g)
                            pg[i] *= u[i] * sigma * (1 + g[i] * (1 - sigma))         // ∂/∂g: u·silu′(g)
                        }
                    }
                }
            }
        }
        grads[gateName] = Linalg.matmul(dg, .transposed, t.ffnInput, .none)
        grads[upName] = Linalg.matmul(du, .transposed, t.ffnInput, .none)
        var db = Linalg.matmul(dg, weight(gateName))
        Linalg.gemm(du, .none, weight(upName), .none, beta: 1, into: &db)
        // h feeds the residual and the second norm.
        var dh = BlockGradients.rmsNormBackward(input: t.attentionResidual, weight: tensors[p + "post_attention_layernorm.weight"]!,
                                                eps: config.normEps, outputGradient: db)
        addInPlace(&dh, dy)
        attentionBackward(dh, t, prefix: p, outName: "self_attn.o_proj", into: &grads)
        return grads
    }

    /// From ∂L/∂(x + o W_oᵀ + b_o) down to q/k/v's weight gradients.
    func attentionBackward(_ dh: Matrix, _ t: BlockTape, prefix p: String, outName: String, into grads: inout [String: Matrix]) {
        grads[p + outName] = Linalg.matmul(dh, .transposed, t.context, .none)
        let dContext = Linalg.matmul(dh, weight(p + outName))
        var (dq, dk, dv) = Attention.causalBackward(q: t.queries, k: t.keys, v: t.values, outputGradient: dContext,
                                                    sequenceLength: t.sequenceLength, heads: config.headCount,
                                                    kvHeads: config.kvHeadCount, headDim: config.headDim)
        if let rope = t.rope {
            inverseRope(&dq, heads: config.headCount, sequenceLength: t.sequenceLength, rope: rope)
            inverseRope(&dk, heads: config.kvHeadCount, sequenceLength: t.sequenceLength, rope: rope)
        }
        grads[p + "self_attn.q_proj"] = Linalg.matmul(dq, .transposed, t.attentionInput, .none)
        grads[p + "self_attn.k_proj"] = Linalg.matmul(dk, .transposed, t.attentionInput, .none)
        grads[p + "self_attn.v_proj"] = Linalg.matmul(dv, .transposed, t.attentionInput, .none)
    }

    /// RoPE rotates each pair by the position's angle; its transpose rotates back (angle −θ).
    func inverseRope(_ m: inout Matrix, heads: Int, sequenceLength: Int, rope: Kernels.RopeTable) {
        let width = m.cols, headDim = config.headDim, half = rope.halfDim, layout = config.ropeLayout
        let tokens = m.rows
        m.withUnsafeMutableBufferPointer { pm in
            rope.cos.withUnsafeBufferPointer { cosT in
                rope.sin.withUnsafeBufferPointer { sinT in
                    for row in 0..<tokens {
                        let pos = row % sequenceLength
                        let c = cosT.baseAddress! + pos * half, s = sinT.baseAddress! + pos * half
                        for h in 0..<heads {
                            let v = pm.baseAddress! + row * width + h * headDim
                            let stride = layout == .adjacentPairs ? 1 : half
                            for i in 0..<half {
                                let (i0, i1) = layout == .adjacentPairs ? (2 * i, 2 * i + 1) : (i, i + stride)
                                let a = v[i0], b = v[i1]
                                v[i0] = a * c[i] + b * s[i]
                                v[i1] = b * c[i] - a * s[i]
                            }
                        }
                    }
                }
            }
        }
    }

    // MARK: OPT

    func recordOPT(_ x: Matrix, sequenceLength: Int) -> (output: Matrix, tape: BlockTape) {
        let p = WeightNames.blockPrefix(.opt, index)
        let attnNorm = (tensors[p + "self_attn_layer_norm.weight"]!, tensors[p + "self_attn_layer_norm.bias"]!)
        let ffnNorm = (tensors[p + "final_layer_norm.weight"]!, tensors[p + "final_layer_norm.bias"]!)
        let pre = config.layerNormBefore
        let a = pre ? layerNorm(x, attnNorm.0, attnNorm.1) : x
        let q = apply(p + "self_attn.q_proj", a, nil)
        let k = apply(p + "self_attn.k_proj", a, nil)
        let v = apply(p + "self_attn.v_proj", a, nil)
        let o = Attention.causal(q: q, k: k, v: v, sequenceLength: sequenceLength, heads: config.headCount,
                                 kvHeads: config.kvHeadCount, headDim: config.headDim)
        var h = x
        addInPlace(&h, apply(p + "self_attn.out_proj", o, nil))
        let afterAttention = pre ? h : layerNorm(h, attnNorm.0, attnNorm.1)
        let b = pre ? layerNorm(afterAttention, ffnNorm.0, ffnNorm.1) : afterAttention
        let f = apply(p + "fc1", b, nil)
        var r = f
        r.withUnsafeMutableBufferPointer { Kernels.reluInPlace($0.baseAddress!, $0.count) }
        var y = afterAttention
        addInPlace(&y, apply(p + "fc2", r, nil))
        let beforeNorm: Matrix? = pre ? nil : y
        if !pre { y = layerNorm(y, ffnNorm.0, ffnNorm.1) }
        let tape = BlockTape(sequenceLength: sequenceLength, rope: nil, attentionInput: a, queries: q, keys: k, values: v,
                             context: o, attentionResidual: h, ffnInput: b, preActivation: f, up: nil, activation: r,
                             outputResidual: beforeNorm)
        return (y, tape)
    }

    func backwardOPT(_ dy: Matrix, _ t: BlockTape) -> [String: Matrix] {
        let p = WeightNames.blockPrefix(.opt, index)
        let attnNorm = tensors[p + "self_attn_layer_norm.weight"]!
        let ffnNorm = tensors[p + "final_layer_norm.weight"]!
        let eps = config.normEps
        var grads: [String: Matrix] = [:]
        // Post-LN: y = LN2(y0); pre-LN: y is y0.
        let dy0 = t.outputResidual.map { BlockGradients.layerNormBackward(input: $0, weight: ffnNorm, eps: eps, outputGradient: dy) } ?? dy
        grads[p + "fc2"] = Linalg.matmul(dy0, .transposed, t.activation, .none)
        var df = Linalg.matmul(dy0, weight(p + "fc2"))
        df.withUnsafeMutableBufferPointer { pd in
            t.preActivation.withUnsafeBufferPointer { f in for i in pd.indices where !(f[i] > 0) { pd[i] = 0 } }
        }
        grads[p + "fc1"] = Linalg.matmul(df, .transposed, t.ffnInput, .none)
        let dFFNInput = Linalg.matmul(df, weight(p + "fc1"))
        var dh: Matrix
        if config.layerNormBefore {
            // y0 = h + FFN(LN2(h)).
            dh = BlockGradients.layerNormBackward(input: t.attentionResidual, weight: ffnNorm, eps: eps, outputGradient: dFFNInput)
            addInPlace(&dh, dy0)
        } else {
            // y0 = LN1(h) + FFN(LN1(h)).
            var dNormed = dFFNInput
            addInPlace(&dNormed, dy0)
            dh = BlockGradients.layerNormBackward(input: t.attentionResidual, weight: attnNorm, eps: eps, outputGradient: dNormed)
        }
        attentionBackward(dh, t, prefix: p, outName: "self_attn.out_proj", into: &grads)
        return grads
    }
}

/// Backward passes of the norms, row by row (rows are tokens).
public enum BlockGradients {
    /// y = x·r·g with r = (mean(x²) + eps)^(-1/2): dx = r·w − (r³/C)·x·Σ(x⊙w), w = g⊙dy.
    public static func rmsNormBackward(input x: Matrix, weight g: Matrix, eps: Float, outputGradient dy: Matrix) -> Matrix {
        let cols = x.cols
        var dx = Matrix(rows: x.rows, cols: cols)
        x.withUnsafeBufferPointer { px in
            g.withUnsafeBufferPointer { pg in
                dy.withUnsafeBufferPointer { pd in
                    dx.withUnsafeMutableBufferPointer { po in
                        for r in 0..<x.rows {
                            let xr = px.baseAddress! + r * cols, dr = pd.baseAddress! + r * cols, or = po.baseAddress! + r * cols
                            let rstd = 1 / sqrtf(Kernels.sumOfSquares(xr, cols) / Float(cols) + eps)
                            var dot: Float = 0
                            for c in 0..<cols { dot += xr[c] * pg[c] * dr[c] }
                            let k = rstd * rstd * rstd * dot / Float(cols)
                            for c in 0..<cols { or[c] = rstd * pg[c] * dr[c] - k * xr[c] }
                        }
                    }
                }
            }
        }
        return dx
    }

    /// y = x̂·γ + β with x̂ = (x − μ)·rstd: dx = rstd·(w − mean(w) − x̂·mean(w⊙x̂)), w = γ⊙dy.
    public static func layerNormBackward(input x: Matrix, weight gamma: Matrix, eps: Float, outputGradient dy: Matrix) -> Matrix {
        let cols = x.cols
        let n = Float(cols)
        var dx = Matrix(rows: x.rows, cols: cols)
        x.withUnsafeBufferPointer { px in
            gamma.withUnsafeBufferPointer { pg in
                dy.withUnsafeBufferPointer { pd in
                    dx.withUnsafeMutableBufferPointer { po in
                        for r in 0..<x.rows {
                            let xr = px.baseAddress! + r * cols, dr = pd.baseAddress! + r * cols, or = po.baseAddress! + r * cols
                            let mean = Kernels.sum(xr, cols) / n
                            var variance: Float = 0
                            for c in 0..<cols { let d = xr[c] - mean; variance += d * d }
                            let rstd = 1 / sqrtf(variance / n + eps)
                            var meanW: Float = 0, meanWX: Float = 0
                            for c in 0..<cols {
                                let w = pg[c] * dr[c]
                                meanW += w
                                meanWX += w * (xr[c] - mean) * rstd
                            }
                            meanW /= n
                            meanWX /= n
                            for c in 0..<cols {
                                let xhat = (xr[c] - mean) * rstd
                                or[c] = rstd * (pg[c] * dr[c] - meanW - xhat * meanWX)
                            }
                        }
                    }
                }
            }
        }
        return dx
    }
}

extension Attention {
    /// Gradients of q, k, v (the matrices `causal` was given) from ∂L/∂output. The probabilities
    /// are recomputed block by block as the forward computes them, not stored. With grouped
    /// key/value heads, each k/v head sums the gradients of its group of query heads.
    public static func causalBackward(q: Matrix, k: Matrix, v: Matrix, outputGradient dOut: Matrix, sequenceLength t: Int,
                                      heads: Int, kvHeads: Int, headDim: Int) -> (dq: Matrix, dk: Matrix, dv: Matrix) {
        let qDim = heads * headDim
        let kvDim = kvHeads * headDim
        let sequences = q.rows / t
        let group = heads / kvHeads
        let scale = 1 / Float(headDim).squareRoot()
        var dq = Matrix(rows: q.rows, cols: qDim)
        var dk = Matrix(rows: k.rows, cols: kvDim)
        var dv = Matrix(rows: v.rows, cols: kvDim)
        let block = min(queryBlock, t)
        var probabilities = [Float](repeating: 0, count: block * t)
        var scoreGradient = [Float](repeating: 0, count: block * t)
        q.withUnsafeBufferPointer { pq in
        k.withUnsafeBufferPointer { pk in
        v.withUnsafeBufferPointer { pv in
        dOut.withUnsafeBufferPointer { pdo in
        dq.withUnsafeMutableBufferPointer { pdq in
        dk.withUnsafeMutableBufferPointer { pdk in
        dv.withUnsafeMutableBufferPointer { pdv in
        probabilities.withUnsafeMutableBufferPointer { pp in
        scoreGradient.withUnsafeMutableBufferPointer { pds in
            let prob = pp.baseAddress!, ds = pds.baseAddress!
            for seq in 0..<sequences {
                let base = seq * t
                for h in 0..<heads {
                    let kvHead = h / group
                    let qh = pq.baseAddress! + base * qDim + h * headDim
                    let kh = pk.baseAddress! + base * kvDim + kvHead * headDim
                    let vh = pv.baseAddress! + base * kvDim + kvHead * headDim
                    let doh = pdo.baseAddress! + base * qDim + h * headDim
                    let dqh = pdq.baseAddress! + base * qDim + h * headDim
                    let dkh = pdk.baseAddress! + base * kvDim + kvHead * headDim
                    let dvh = pdv.baseAddress! + base * kvDim + kvHead * headDim
                    var i0 = 0
                    while i0 < t {
                        let i1 = min(i0 + block, t)
                        let rows = i1 - i0
                        // P, exactly as the forward computed it.
                        Attention.probabilities(q: qh, qStride: qDim, k: kh, kStride: kvDim, headDim: headDim,
                                                scale: scale, rows: i0..<i1, into: prob)
                        // dV += Pᵀ dO;  dP = dO Vᵀ;  dS = P ⊙ (dP − rowsum(P ⊙ dP)).
                        Linalg.sgemm(.transposed, .none, m: i1, n: headDim, k: rows, alpha: 1,
                                     a: prob, lda: i1, b: doh + i0 * qDim, ldb: qDim, beta: 1, c: dvh, ldc: kvDim)
                        Linalg.sgemm(.none, .transposed, m: rows, n: i1, k: headDim, alpha: 1,
                                     a: doh + i0 * qDim, lda: qDim, b: vh, ldb: kvDim, beta: 0, c: ds, ldc: i1)
                        for r in 0..<rows {
                            let pr = prob + r * i1, dr = ds + r * i1
                            let visible = i0 + r + 1
                            var dot: Float = 0
                            for j in 0..<visible { dot += pr[j] * dr[j] }
                            for j in 0..<visible { dr[j] = pr[j] * (dr[j] - dot) }
                            for j in visible..<i1 { dr[j] = 0 }
                        }
                        // S = scale·Q Kᵀ: dQ = scale·dS K, dK += scale·dSᵀ Q.
                        Linalg.sgemm(.none, .none, m: rows, n: headDim, k: i1, alpha: scale,
                                     a: ds, lda: i1, b: kh, ldb: kvDim, beta: 0, c: dqh + i0 * qDim, ldc: qDim)
                        Linalg.sgemm(.transposed, .none, m: i1, n: headDim, k: rows, alpha: scale,
                                     a: ds, lda: i1, b: qh + i0 * qDim, ldb: qDim, beta: 1, c: dkh, ldc: kvDim)
                        i0 = i1
                    }
                }
            }
        }}}}}}}}}
        return (dq, dk, dv)
    }
}
