#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The decoder blocks' kernels (ModelKernels.swift) and BESA's in Float64: norms with their sums
/// in Float64, RoPE with angles position·frequency and their cos/sin in Float64, attention with
/// Float64 scores and softmax.
extension Float64Backend {
    public func add(_ x: Tensor, into y: Tensor) {
        precondition(x.count == y.count, "add: \(x) into \(y)")
        let (px, py) = (read(x), write(y))
        for i in 0..<y.count { py[i] += px[i] }
    }

    public func addRowVector(_ v: Tensor, into y: Tensor) {
        precondition(v.count == y.cols, "addRowVector: \(v) into \(y)")
        let (pv, py, cols) = (read(v), write(y), y.cols)
        for r in 0..<y.rows { for c in 0..<cols { py[r * cols + c] += pv[c] } }
    }

    public func reshaped(_ x: Tensor, rows: Int, cols: Int) -> Tensor {
        precondition(rows * cols == x.count, "reshaped: \(x) as \(rows)x\(cols)")
        let out = uninitialized(rows: rows, cols: cols)
        write(out).update(from: read(x), count: x.count)
        return out
    }

    public func rmsNorm(_ x: Tensor, weight: Tensor, eps: Float) -> Tensor {
        precondition(weight.count == x.cols, "rmsNorm: \(x) with weight \(weight)")
        let out = uninitialized(rows: x.rows, cols: x.cols)
        let (px, pw, po, cols) = (read(x), read(weight), write(out), x.cols)
        for r in 0..<x.rows {
            let xr = px + r * cols, orow = po + r * cols
            var ss = 0.0
            for c in 0..<cols { ss += xr[c] * xr[c] }
            let scale = 1 / (ss / Double(cols) + Double(eps)).squareRoot()
            for c in 0..<cols { orow[c] = xr[c] * scale * pw[c] }
        }
        return out
    }

    public func layerNorm(_ x: Tensor, weight: Tensor, bias: Tensor?, eps: Float) -> Tensor {
        precondition(weight.count == x.cols && (bias?.count ?? x.cols) == x.cols, "layerNorm: \(x) with weight \(weight)")
        let out = uninitialized(rows: x.rows, cols: x.cols)
        let (px, pw, pb, po, cols) = (read(x), read(weight), bias.map { read($0) }, write(out), x.cols)
        for r in 0..<x.rows {
            let xr = px + r * cols, orow = po + r * cols
            var mean = 0.0
            for c in 0..<cols { mean += xr[c] }
            mean /= Double(cols)
            var v = 0.0
            for c in 0..<cols { let d = xr[c] - mean; v += d * d }
            let inv = 1 / (v / Double(cols) + Double(eps)).squareRoot()
            for c in 0..<cols { orow[c] = (xr[c] - mean) * inv * pw[c] + (pb?[c] ?? 0) }
        }
        return out
    }

    public func rmsNormBackward(input x: Tensor, weight g: Tensor, eps: Float, outputGradient dy: Tensor) -> Tensor {
        precondition(g.count == x.cols && dy.rows == x.rows && dy.cols == x.cols, "rmsNormBackward: \(x), \(g), \(dy)")
        let cols = x.cols
        let dx = uninitialized(rows: x.rows, cols: cols)
        let (px, pg, pd, po) = (read(x), read(g), read(dy), write(dx))
        for r in 0..<x.rows {
            let xr = px + r * cols, dr = pd + r * cols, or = po + r * cols
            var ss = 0.0
            for c in 0..<cols { ss += xr[c] * xr[c] }
            let rstd = 1 / (ss / Double(cols) + Double(eps)).squareRoot()
            var dot = 0.0
            for c in 0..<cols { dot += xr[c] * pg[c] * dr[c] }
            let k = rstd * rstd * rstd * dot / Double(cols)
            for c in 0..<cols { or[c] = rstd * pg[c] * dr[c] - k * xr[c] }
        }
        return dx
    }

    public func layerNormBackward(input x: Tensor, weight gamma: Tensor, eps: Float, outputGradient dy: Tensor) -> Tensor {
        precondition(gamma.count == x.cols && dy.rows == x.rows && dy.cols == x.cols, "layerNormBackward: \(x), \(gamma), \(dy)")
        let cols = x.cols
        let n = Double(cols)
        let dx = uninitialized(rows: x.rows, cols: cols)
        let (px, pg, pd, po) = (read(x), read(gamma), read(dy), write(dx))
        for r in 0..<x.rows {
            let xr = px + r * cols, dr = pd + r * cols, or = po + r * cols
            var mean = 0.0
            for c in 0..<cols { mean += xr[c] }
            mean /= n
            var variance = 0.0
            for c in 0..<cols { let d = xr[c] - mean; variance += d * d }
            let rstd = 1 / (variance / n + Double(eps)).squareRoot()
            var meanW = 0.0, meanWX = 0.0
            for c in 0..<cols {
                let w = pg[c] * dr[c]
                meanW += w
                meanWX += w * (xr[c] - mean) * rstd
            }
            meanW /= n
            meanWX /= n
            for c in 0..<cols { or[c] = rstd * (pg[c] * dr[c] - meanW - (xr[c] - mean) * rstd * meanWX) }
        }
        return dx
    }

    /// The angles are position·frequency with both in Float64 (`RopeTable.frequencies`), their
    /// cos and sin in Float64; the table's Float32 cos/sin are used only with `.float32Table`.
    public func rope(_ x: Tensor, heads: Int, headDim: Int, sequenceLength: Int, table: Kernels.RopeTable, layout: RopeLayout, inverse: Bool) {
        precondition(x.cols == heads * headDim && x.rows % sequenceLength == 0, "rope: \(x) for \(heads) heads of \(headDim), sequences of \(sequenceLength)")
        precondition(sequenceLength <= table.positions, "RoPE table has \(table.positions) positions, need \(sequenceLength)")
        let half = table.halfDim
        var cosines = [Double](repeating: 0, count: sequenceLength * half), sines = cosines
        for pos in 0..<sequenceLength {
            for i in 0..<half {
                let angle = Double(pos) * table.frequencies[i]
                let (c, s) = ropeAngles == .float64 ? (cos(angle), sin(angle)) : (Double(table.cos[pos * half + i]), Double(table.sin[pos * half + i]))
                cosines[pos * half + i] = c
                sines[pos * half + i] = inverse ? -s : s
            }
        }
        let p = write(x)
        let width = x.cols
        for row in 0..<x.rows {
            let pos = row % sequenceLength
            for h in 0..<heads {
                let v = p + row * width + h * headDim
                for i in 0..<half {
                    let (i0, i1) = layout == .adjacentPairs ? (2 * i, 2 * i + 1) : (i, i + half)
                    let (c, s) = (cosines[pos * half + i], sines[pos * half + i])
                    let a = v[i0], b = v[i1]
                    v[i0] = a * c - b * s
                    v[i1] = a * s + b * c
                }
            }
        }
    }

    public func attention(q: Tensor, k: Tensor, v: Tensor, shape: AttentionShape, options: AttentionOptions) -> Tensor {
        Self.checkAttention(q, k, v, shape)
        let out = zeros(rows: q.rows, cols: shape.queryWidth)
        let t = shape.sequenceLength, headDim = shape.headDim
        let (qDim, kvDim, group) = (shape.queryWidth, shape.keyWidth, shape.heads / shape.kvHeads)
        let block = min(Self.queryBlock, t)
        let pointers = UnsafeSendable((read(q), read(k), read(v), write(out)))
        Parallel.forEach((q.rows / t) * shape.heads, chunk: 1) { tasks in
            let (pq, pk, pv, po) = pointers.value
            let s = UnsafeMutablePointer<Double>.allocate(capacity: block * t)
            defer { s.deallocate() }
            for task in tasks {
                let (seq, h) = (task / shape.heads, task % shape.heads)
                let base = seq * t
                let qh = pq + base * qDim + h * headDim
                let kh = pk + base * kvDim + (h / group) * headDim
                let vh = pv + base * kvDim + (h / group) * headDim
                let oh = po + base * qDim + h * headDim
                var i0 = 0
                while i0 < t {
                    let i1 = min(i0 + block, t)
                    Self.probabilities(q: qh, qStride: qDim, k: kh, kStride: kvDim, headDim: headDim, options: options, rows: i0..<i1, into: s)
                    Linalg.dgemm(.none, .none, m: i1 - i0, n: headDim, k: i1, a: s, lda: i1, b: vh, ldb: kvDim,
                                 c: oh + i0 * qDim, ldc: qDim, concurrently: false)
                    i0 = i1
                }
            }
        }
        return out
    }

    public func attentionBackward(q: Tensor, k: Tensor, v: Tensor, outputGradient: Tensor, shape: AttentionShape,
                                  options: AttentionOptions) -> (dq: Tensor, dk: Tensor, dv: Tensor) {
        Self.checkAttention(q, k, v, shape)
        precondition(outputGradient.rows == q.rows && outputGradient.cols == shape.queryWidth, "attentionBackward: gradient \(outputGradient) for \(q)")
        let dq = zeros(rows: q.rows, cols: shape.queryWidth)
        let dk = zeros(rows: k.rows, cols: shape.keyWidth)
        let dv = zeros(rows: v.rows, cols: shape.keyWidth)
        let t = shape.sequenceLength, headDim = shape.headDim
        let (qDim, kvDim, group) = (shape.queryWidth, shape.keyWidth, shape.heads / shape.kvHeads)
        let scale = Double(options.scale)
        let block = min(Self.queryBlock, t)
        let pointers = UnsafeSendable((read(q), read(k), read(v), read(outputGradient), write(dq), write(dk), write(dv)))
        Parallel.forEach((q.rows / t) * shape.kvHeads, chunk: 1) { tasks in
            let (pq, pk, pv, pdo, pdq, pdk, pdv) = pointers.value
            let prob = UnsafeMutablePointer<Double>.allocate(capacity: block * t)
            let ds = UnsafeMutablePointer<Double>.allocate(capacity: block * t)
            let capped = UnsafeMutablePointer<Double>.allocate(capacity: block * t)
            defer { prob.deallocate(); ds.deallocate(); capped.deallocate() }
            for task in tasks {
                let (seq, kvHead) = (task / shape.kvHeads, task % shape.kvHeads)
                let base = seq * t
                for h in (kvHead * group)..<((kvHead + 1) * group) {
                    let qh = pq + base * qDim + h * headDim, doh = pdo + base * qDim + h * headDim, dqh = pdq + base * qDim + h * headDim
                    let kh = pk + base * kvDim + kvHead * headDim, vh = pv + base * kvDim + kvHead * headDim
                    let dkh = pdk + base * kvDim + kvHead * headDim, dvh = pdv + base * kvDim + kvHead * headDim
                    var i0 = 0
                    while i0 < t {
                        let i1 = min(i0 + block, t)
                        let rows = i1 - i0
                        Self.probabilities(q: qh, qStride: qDim, k: kh, kStride: kvDim, headDim: headDim,
                                           options: options, rows: i0..<i1, into: prob, capped: capped)
                        // dV += Pᵀ dO;  dP = dO Vᵀ;  dS = P ⊙ (dP − rowsum(P ⊙ dP)).
                        Linalg.dgemm(.transposed, .none, m: i1, n: headDim, k: rows, a: prob, lda: i1, b: doh + i0 * qDim, ldb: qDim,
                                     beta: 1, c: dvh, ldc: kvDim, concurrently: false)
                        Linalg.dgemm(.none, .transposed, m: rows, n: i1, k: headDim, a: doh + i0 * qDim, lda: qDim, b: vh, ldb: kvDim,
                                     c: ds, ldc: i1, concurrently: false)
                        for r in 0..<rows {
                            let pr = prob + r * i1, dr = ds + r * i1
                            let visible = i0 + r + 1
                            let first = options.firstVisible(i0 + r)
                            var dot = 0.0
                            for j in first..<visible { dot += pr[j] * dr[j] }
                            for j in first..<visible { dr[j] = pr[j] * (dr[j] - dot) }
                            if let cap = options.softcap.map(Double.init) {
                                let sr = capped + r * i1
                                for j in first..<visible { let u = sr[j] / cap; dr[j] *= 1 - u * u }
                            }
                            for j in 0..<first { dr[j] = 0 }
                            for j in visible..<i1 { dr[j] = 0 }
                        }
                        // S = scale·Q Kᵀ: dQ = scale·dS K, dK += scale·dSᵀ Q.
                        Linalg.dgemm(.none, .none, m: rows, n: headDim, k: i1, alpha: scale, a: ds, lda: i1, b: kh, ldb: kvDim,
                                     c: dqh + i0 * qDim, ldc: qDim, concurrently: false)
                        Linalg.dgemm(.transposed, .none, m: i1, n: headDim, k: rows, alpha: scale, a: ds, lda: i1, b: qh + i0 * qDim, ldb: qDim,
                                     beta: 1, c: dkh, ldc: kvDim, concurrently: false)
                        i0 = i1
                    }
                }
            }
        }
        return (dq, dk, dv)
    }

    /// Query rows handled at once, as the CPU's attention.
    static let queryBlock = 256

    static func checkAttention(_ q: Tensor, _ k: Tensor, _ v: Tensor, _ shape: AttentionShape) {
        precondition(q.cols == shape.queryWidth && k.cols == shape.keyWidth && v.cols == shape.keyWidth
                     && k.rows == q.rows && v.rows == q.rows && q.rows % shape.sequenceLength == 0,
                     "attention: q \(q), k \(k), v \(v) for \(shape)")
    }

    /// Causal probabilities of query rows `rows` of one head against keys 0..<rows.upperBound into
    /// `p` [rows.count x rows.upperBound] (masked entries 0); `capped` gets the soft-capped scores.
    static func probabilities(q: UnsafePointer<Double>, qStride: Int, k: UnsafePointer<Double>, kStride: Int, headDim: Int,
                              options: AttentionOptions, rows: Range<Int>, into p: UnsafeMutablePointer<Double>,
                              capped: UnsafeMutablePointer<Double>? = nil) {
        let (i0, i1) = (rows.lowerBound, rows.upperBound)
        Linalg.dgemm(.none, .transposed, m: rows.count, n: i1, k: headDim, alpha: Double(options.scale),
                     a: q + i0 * qStride, lda: qStride, b: k, ldb: kStride, c: p, ldc: i1, concurrently: false)
        for r in 0..<rows.count {
            let row = p + r * i1
            let visible = i0 + r + 1
            let first = options.firstVisible(i0 + r)
            if let cap = options.softcap.map(Double.init) {
                for j in first..<visible { row[j] = cap * tanh(row[j] / cap) }
                if let capped { (capped + r * i1).update(from: row, count: i1) }
            }
            softmax(row + first, visible - first)
            for j in 0..<first { row[j] = 0 }
            for j in visible..<i1 { row[j] = 0 }
        }
    }

    /// Softmax of the first `n` entries in place, in Float64.
    static func softmax(_ p: UnsafeMutablePointer<Double>, _ n: Int) {
        if n == 0 { return }
        var m = -Double.infinity
        for i in 0..<n where p[i] > m { m = p[i] }
        var s = 0.0
        for i in 0..<n { let e = exp(p[i] - m); p[i] = e; s += e }
        for i in 0..<n { p[i] /= s }
    }

    public func gatedActivation(gate: Tensor, up: Tensor, _ activation: GatedActivation) -> Tensor {
        precondition(gate.rows == up.rows && gate.cols == up.cols, "gatedActivation: \(gate) and \(up)")
        let out = uninitialized(rows: gate.rows, cols: gate.cols)
        let (g, u, o) = (read(gate), read(up), write(out))
        for i in 0..<gate.count {
            switch activation {
            case .silu: o[i] = Self.silu(g[i]) * u[i]
            case .geluTanh: o[i] = Self.geluTanh(g[i]) * u[i]
            case .relu: o[i] = max(g[i], 0) * u[i]
            }
        }
        return out
    }

    public func gatedActivationBackward(_ d: Tensor, gate: Tensor, up: Tensor, _ activation: GatedActivation) -> (gate: Tensor, up: Tensor) {
        precondition(d.count == gate.count && d.count == up.count, "gatedActivationBackward: \(d), \(gate), \(up)")
        let dg = uninitialized(rows: d.rows, cols: d.cols), du = uninitialized(rows: d.rows, cols: d.cols)
        let (pd, g, u, pg, pu) = (read(d), read(gate), read(up), write(dg), write(du))
        for i in 0..<d.count {
            switch activation {
            case .silu:
                let sigma = 1 / (1 + exp(-g[i]))
                pu[i] = pd[i] * (g[i] * sigma)
                pg[i] = pd[i] * (u[i] * sigma * (1 + g[i] * (1 - sigma)))
            case .geluTanh:
                pu[i] = pd[i] * Self.geluTanh(g[i])
                pg[i] = pd[i] * (u[i] * Self.geluTanhDerivative(g[i]))
            case .relu:
                pu[i] = pd[i] * max(g[i], 0)
                pg[i] = pd[i] * (g[i] > 0 ? u[i] : 0)
            }
        }
        return (dg, du)
    }

    static let geluC = (2 / Double.pi).squareRoot()
    static func geluTanh(_ x: Double) -> Double { 0.5 * x * (1 + tanh(geluC * (x + 0.044715 * x * x * x))) }
    static func geluTanhDerivative(_ x: Double) -> Double {
        let t = tanh(geluC * (x + 0.044715 * x * x * x))
        return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * geluC * (1 + 3 * 0.044715 * x * x)
    }

    public func reluBackward(_ d: Tensor, input: Tensor) {
        precondition(d.count == input.count, "reluBackward: \(d) and \(input)")
        let (pd, f) = (write(d), read(input))
        for i in 0..<d.count where !(f[i] > 0) { pd[i] = 0 }
    }

    public func softcap(_ x: Tensor, cap: Float) {
        let (p, c) = (write(x), Double(cap))
        for i in 0..<x.count { p[i] = c * tanh(p[i] / c) }
    }

    public func route(_ logits: Tensor, topK: Int, normalize: Bool) -> Routing {
        let count = logits.cols
        precondition(topK >= 1 && topK <= count, "route: top \(topK) of \(count) experts")
        let probabilities = copy(logits)
        let pl = write(probabilities)
        var chosen = [Int](repeating: 0, count: logits.rows * topK)
        var weights = [Float](repeating: 0, count: logits.rows * topK)
        var taken = [Bool](repeating: false, count: count)
        for r in 0..<logits.rows {
            let row = pl + r * count
            Self.softmax(row, count)
            for e in 0..<count { taken[e] = false }
            var picked = [Double](repeating: 0, count: topK)
            var sum = 0.0
            for s in 0..<topK {
                var best = -1
                for e in 0..<count where !taken[e] && (best < 0 || row[e] > row[best]) { best = e }
                taken[best] = true
                chosen[r * topK + s] = best
                picked[s] = row[best]
                sum += row[best]
            }
            for s in 0..<topK { weights[r * topK + s] = Float(normalize ? picked[s] / sum : picked[s]) }
        }
        return Routing(topK: topK, chosen: chosen, weights: weights, probabilities: probabilities)
    }

    public func gatherRows(_ x: Tensor, _ rows: [Int]) -> Tensor {
        let out = uninitialized(rows: rows.count, cols: x.cols)
        let (px, po) = (read(x), write(out))
        for (j, r) in rows.enumerated() {
            precondition(r >= 0 && r < x.rows, "gatherRows: row \(r) of \(x)")
            (po + j * x.cols).update(from: px + r * x.cols, count: x.cols)
        }
        return out
    }

    public func scatterAddRows(_ x: Tensor, rows: [Int], scales: [Float], into out: Tensor) {
        precondition(rows.count == x.rows && scales.count == x.rows && x.cols == out.cols, "scatterAddRows: \(x) into \(out)")
        let (h, px, po) = (x.cols, read(x), write(out))
        for (j, r) in rows.enumerated() {
            precondition(r >= 0 && r < out.rows, "scatterAddRows: row \(r) of \(out)")
            let w = Double(scales[j])
            for c in 0..<h { po[r * h + c] += px[j * h + c] * w }
        }
    }

    public func scaleRows(_ x: Tensor, by scales: [Float]) {
        precondition(scales.count == x.rows, "scaleRows: \(scales.count) scales for \(x)")
        let p = write(x)
        for r in 0..<x.rows { for c in 0..<x.cols { p[r * x.cols + c] *= Double(scales[r]) } }
    }

    public func accumulateRoutingGradient(outputGradient dy: Tensor, expertOutput y: Tensor, rows: [Int], slots: [Int], into dWeights: Tensor) {
        precondition(dy.rows == y.rows && dy.cols == y.cols && rows.count == dy.rows && slots.count == dy.rows,
                     "accumulateRoutingGradient: \(dy), \(y), \(rows.count) rows")
        let (h, pd, py, pw) = (dy.cols, read(dy), read(y), write(dWeights))
        for j in 0..<rows.count {
            var dot = 0.0
            for c in 0..<h { dot += pd[j * h + c] * py[j * h + c] }
            pw[rows[j] * dWeights.cols + slots[j]] += dot
        }
    }

    public func routerLogitGradient(_ dWeights: Tensor, routing: Routing, normalize: Bool) -> Tensor {
        let k = routing.topK, experts = routing.experts, tokens = routing.tokens
        precondition(dWeights.rows == tokens && dWeights.cols == k, "routerLogitGradient: \(dWeights) for \(tokens) tokens, top \(k)")
        let out = zeros(rows: tokens, cols: experts)
        let (dw, p, o) = (read(dWeights), read(routing.probabilities), write(out))
        let (chosen, weights) = (routing.chosen, routing.weights.map(Double.init))
        for r in 0..<tokens {
            var dot = 0.0
            for s in 0..<k { dot += weights[r * k + s] * dw[r * k + s] }
            if normalize {
                for s in 0..<k { o[r * experts + chosen[r * k + s]] = weights[r * k + s] * (dw[r * k + s] - dot) }
            } else {
                for j in 0..<experts { o[r * experts + j] = -p[r * experts + j] * dot }
                for s in 0..<k { o[r * experts + chosen[r * k + s]] += weights[r * k + s] * dw[r * k + s] }
            }
        }
        return out
    }

    // MARK: BESA kernels

    public func rankRows(_ scores: Tensor) -> Tensor {
        let (rows, cols) = (scores.rows, scores.cols)
        let out = uninitialized(rows: rows, cols: cols)
        let (ps, po) = (read(scores), write(out))
        for r in 0..<rows {
            for (j, c) in Self.stableOrder(ps + r * cols, cols).enumerated() { po[r * cols + j] = Double(c) }
        }
        return out
    }

    public func rankedMask(order: Tensor, counts: [Int]) -> Tensor {
        precondition(counts.count == order.rows, "rankedMask: \(counts.count) counts for \(order)")
        let cols = order.cols
        let out = zeros(rows: order.rows, cols: cols)
        let (po, pm) = (read(order), write(out))
        for r in 0..<order.rows {
            precondition(counts[r] >= 0 && counts[r] <= cols, "rankedMask: count \(counts[r]) of \(cols)")
            for j in 0..<counts[r] { pm[r * cols + Int(po[r * cols + j])] = 1 }
        }
        return out
    }

    public func rankedPrefixSums(_ gradient: Tensor, _ weight: Tensor, order: Tensor, at counts: [Int]) -> [Double] {
        precondition(gradient.rows == weight.rows && gradient.cols == weight.cols && order.rows == weight.rows && order.cols == weight.cols,
                     "rankedPrefixSums: \(gradient), \(weight), \(order)")
        let (rows, cols, k) = (weight.rows, weight.cols, counts.count)
        var out = [Double](repeating: 0, count: rows * k)
        let (pg, pw, po) = (read(gradient), read(weight), read(order))
        for r in 0..<rows {
            var prefix = 0.0
            var next = 0
            for j in 0...cols {
                while next < k && counts[next] == j { out[r * k + next] = prefix; next += 1 }
                if j == cols { break }
                let c = Int(po[r * cols + j])
                prefix += pg[r * cols + c] * pw[r * cols + c]
            }
        }
        return out
    }

    public func channelNormalizedError(target y: Tensor, prediction: Tensor) -> (loss: Double, gradient: Tensor) {
        precondition(y.rows == prediction.rows && y.cols == prediction.cols, "channelNormalizedError: \(y) and \(prediction)")
        let (tokens, channels) = (y.rows, y.cols)
        var energy = [Double](repeating: 0, count: channels)
        let gradient = uninitialized(rows: tokens, cols: channels)
        let (py, pp, pg) = (read(y), read(prediction), write(gradient))
        for t in 0..<tokens { for c in 0..<channels { let v = py[t * channels + c]; energy[c] += v * v } }
        let inverse = energy.map { $0 > 0 ? 1 / $0 : 1 }
        var loss = 0.0
        for t in 0..<tokens {
            for c in 0..<channels {
                let i = t * channels + c
                let d = py[i] - pp[i]
                loss += d * d * inverse[c]
                pg[i] = -2 * d * inverse[c] / Double(channels)
            }
        }
        return (loss / Double(channels), gradient)
    }
}
