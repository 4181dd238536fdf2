#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import TopiaryTensor

extension DecoderBlock {
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
                                      heads: Int, kvHeads: Int, headDim: Int, options: Options? = nil) -> (dq: Matrix, dk: Matrix, dv: Matrix) {
        let options = options ?? .standard(headDim: headDim)
        let qDim = heads * headDim
        let kvDim = kvHeads * headDim
        let sequences = q.rows / t
        let group = heads / kvHeads
        let scale = options.scale
        var dq = Matrix(rows: q.rows, cols: qDim)
        var dk = Matrix(rows: k.rows, cols: kvDim)
        var dv = Matrix(rows: v.rows, cols: kvDim)
        let block = min(queryBlock, t)
        var probabilities = [Float](repeating: 0, count: block * t)
        var scoreGradient = [Float](repeating: 0, count: block * t)
        var cappedScores = [Float](repeating: 0, count: options.softcap == nil ? 0 : block * t)
        q.withUnsafeBufferPointer { pq in
        k.withUnsafeBufferPointer { pk in
        v.withUnsafeBufferPointer { pv in
        dOut.withUnsafeBufferPointer { pdo in
        dq.withUnsafeMutableBufferPointer { pdq in
        dk.withUnsafeMutableBufferPointer { pdk in
        dv.withUnsafeMutableBufferPointer { pdv in
        probabilities.withUnsafeMutableBufferPointer { pp in
        scoreGradient.withUnsafeMutableBufferPointer { pds in
        cappedScores.withUnsafeMutableBufferPointer { pcs in
            let prob = pp.baseAddress!, ds = pds.baseAddress!, capped = pcs.baseAddress
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
                                                options: options, rows: i0..<i1, into: prob, capped: capped)
                        // dV += Pᵀ dO;  dP = dO Vᵀ;  dS = P ⊙ (dP − rowsum(P ⊙ dP)).
                        Linalg.sgemm(.transposed, .none, m: i1, n: headDim, k: rows, alpha: 1,
                                     a: prob, lda: i1, b: doh + i0 * qDim, ldb: qDim, beta: 1, c: dvh, ldc: kvDim)
                        Linalg.sgemm(.none, .transposed, m: rows, n: i1, k: headDim, alpha: 1,
                                     a: doh + i0 * qDim, lda: qDim, b: vh, ldb: kvDim, beta: 0, c: ds, ldc: i1)
                        for r in 0..<rows {
                            let pr = prob + r * i1, dr = ds + r * i1
                            let visible = i0 + r + 1
                            let first = options.firstVisible(i0 + r)
                            var dot: Float = 0
                            for j in first..<visible { dot += pr[j] * dr[j] }
                            for j in first..<visible { dr[j] = pr[j] * (dr[j] - dot) }
                            if let cap = options.softcap, let capped {
                                // s = cap·tanh(raw/cap): ∂s/∂raw = 1 − (s/cap)².
                                let sr = capped + r * i1
                                for j in first..<visible { let u = sr[j] / cap; dr[j] *= 1 - u * u }
                            }
                            for j in 0..<first { dr[j] = 0 }
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
        }}}}}}}}}}
        return (dq, dk, dv)
    }
}
