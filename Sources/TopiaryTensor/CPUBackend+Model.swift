#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The decoder blocks' kernels on the host (ModelKernels.swift): the reference every backend's
/// results are compared with.
extension CPUBackend {
    /// Rows per parallel chunk of a row-wise kernel: about 64K elements.
    static func rowChunk(_ cols: Int) -> Int { max(1, Parallel.chunk / max(cols, 1)) }

    public func add(_ x: Tensor, into y: Tensor) {
        precondition(x.count == y.count, "add: \(x) into \(y)")
        let (py, px) = (UnsafeSendable(write(y)), UnsafeSendable(read(x)))
        Parallel.forEach(y.count) { range in
            Kernels.add(px.value + range.lowerBound, into: py.value + range.lowerBound, range.count)
        }
    }

    public func addRowVector(_ v: Tensor, into y: Tensor) {
        precondition(v.count == y.cols, "addRowVector: \(v) into \(y)")
        let py = write(y)
        Kernels.addBias(read(v), to: py, rows: y.rows, cols: y.cols)
    }

    public func reshaped(_ x: Tensor, rows: Int, cols: Int) -> Tensor {
        precondition(rows * cols == x.count, "reshaped: \(x) as \(rows)x\(cols)")
        return tensor(storage(x).matrix.reshaped(rows: rows, cols: cols))
    }

    public func rmsNorm(_ x: Tensor, weight: Tensor, eps: Float) -> Tensor {
        precondition(weight.count == x.cols, "rmsNorm: \(x) with weight \(weight)")
        let out = uninitialized(rows: x.rows, cols: x.cols)
        let (px, pw, po, cols) = (read(x), read(weight), write(out), x.cols)
        Parallel.forEach(x.rows, chunk: Self.rowChunk(cols)) { r in
            Kernels.rmsNorm(px + r.lowerBound * cols, weight: pw, eps: eps, rows: r.count, cols: cols, out: po + r.lowerBound * cols)
        }
        return out
    }

    public func layerNorm(_ x: Tensor, weight: Tensor, bias: Tensor?, eps: Float) -> Tensor {
        precondition(weight.count == x.cols && (bias?.count ?? x.cols) == x.cols, "layerNorm: \(x) with weight \(weight)")
        let out = uninitialized(rows: x.rows, cols: x.cols)
        let (px, pw, pb, po, cols) = (read(x), read(weight), bias.map { read($0) }, write(out), x.cols)
        Parallel.forEach(x.rows, chunk: Self.rowChunk(cols)) { r in
            Kernels.layerNorm(px + r.lowerBound * cols, weight: pw, bias: pb, eps: eps, rows: r.count, cols: cols, out: po + r.lowerBound * cols)
        }
        return out
    }

    /// y = x·r·g with r = (mean(x²) + eps)^(-1/2): dx = r·w − (r³/C)·x·Σ(x⊙w), w = g⊙dy.
    public func rmsNormBackward(input x: Tensor, weight g: Tensor, eps: Float, outputGradient dy: Tensor) -> Tensor {
        precondition(g.count == x.cols && dy.rows == x.rows && dy.cols == x.cols, "rmsNormBackward: \(x), \(g), \(dy)")
        let cols = x.cols
        let dx = uninitialized(rows: x.rows, cols: cols)
        let (px, pg, pd, po) = (read(x), read(g), read(dy), write(dx))
        Parallel.forEach(x.rows, chunk: Self.rowChunk(cols)) { rows in
            for r in rows {
                let xr = px + r * cols, dr = pd + r * cols, or = po + r * cols
                let rstd = 1 / sqrtf(Kernels.sumOfSquares(xr, cols) / Float(cols) + eps)
                var dot: Float = 0
                for c in 0..<cols { dot += xr[c] * pg[c] * dr[c] }
                let k = rstd * rstd * rstd * dot / Float(cols)
                for c in 0..<cols { or[c] = rstd * pg[c] * dr[c] - k * xr[c] }
            }
        }
        return dx
    }

    /// y = x̂·γ + β with x̂ = (x − μ)·rstd: dx = rstd·(w − mean(w) − x̂·mean(w⊙x̂)), w = γ⊙dy.
    public func layerNormBackward(input x: Tensor, weight gamma: Tensor, eps: Float, outputGradient dy: Tensor) -> Tensor {
        precondition(gamma.count == x.cols && dy.rows == x.rows && dy.cols == x.cols, "layerNormBackward: \(x), \(gamma), \(dy)")
        let cols = x.cols
        let n = Float(cols)
        let dx = uninitialized(rows: x.rows, cols: cols)
        let (px, pg, pd, po) = (read(x), read(gamma), read(dy), write(dx))
        Parallel.forEach(x.rows, chunk: Self.rowChunk(cols)) { rows in
            for r in rows {
                let xr = px + r * cols, dr = pd + r * cols, or = po + r * cols
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
        return dx
    }

    public func rope(_ x: Tensor, heads: Int, headDim: Int, sequenceLength: Int, table: Kernels.RopeTable, layout: RopeLayout, inverse: Bool) {
        precondition(x.cols == heads * headDim && x.rows % sequenceLength == 0, "rope: \(x) for \(heads) heads of \(headDim), sequences of \(sequenceLength)")
        let p = write(x)
        let width = x.cols
        if !inverse {
            // Row by row (each row at its position), rows in parallel chunks.
            Parallel.forEach(x.rows, chunk: Self.rowChunk(width)) { r in
                var row = r.lowerBound
                while row < r.upperBound {
                    let position = row % sequenceLength
                    let count = min(r.upperBound - row, sequenceLength - position)
                    Kernels.rope(p + row * width, tokens: count, heads: heads, headDim: headDim,
                                 firstPosition: position, table: table, layout: layout)
                    row += count
                }
            }
            return
        }
        // The transpose of the rotation: angle −θ; rows in parallel chunks.
        let half = table.halfDim
        table.cos.withUnsafeBufferPointer { cosT in
            table.sin.withUnsafeBufferPointer { sinT in
                let (cosBase, sinBase) = (cosT.baseAddress!, sinT.baseAddress!)
                Parallel.forEach(x.rows, chunk: Self.rowChunk(width)) { rows in
                    for row in rows {
                        let pos = row % sequenceLength
                        let c = cosBase + pos * half, s = sinBase + pos * half
                        for h in 0..<heads {
                            let v = p + row * width + h * headDim
                            for i in 0..<half {
                                let (i0, i1) = layout == .adjacentPairs ? (2 * i, 2 * i + 1) : (i, i + half)
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

    public func attention(q: Tensor, k: Tensor, v: Tensor, shape: AttentionShape, options: AttentionOptions) -> Tensor {
        CPUAttention.check(q, k, v, shape)
        let out = zeros(rows: q.rows, cols: shape.queryWidth)
        CPUAttention.forward(q: read(q), k: read(k), v: read(v), out: write(out), tokens: q.rows, shape: shape, options: options)
        return out
    }

    public func attentionBackward(q: Tensor, k: Tensor, v: Tensor, outputGradient: Tensor, shape: AttentionShape,
                                  options: AttentionOptions) -> (dq: Tensor, dk: Tensor, dv: Tensor) {
        CPUAttention.check(q, k, v, shape)
        precondition(outputGradient.rows == q.rows && outputGradient.cols == shape.queryWidth, "attentionBackward: gradient \(outputGradient) for \(q)")
        let dq = zeros(rows: q.rows, cols: shape.queryWidth)
        let dk = zeros(rows: k.rows, cols: shape.keyWidth)
        let dv = zeros(rows: v.rows, cols: shape.keyWidth)
        CPUAttention.backward(q: read(q), k: read(k), v: read(v), dOut: read(outputGradient), dq: write(dq), dk: write(dk), dv: write(dv),
                              tokens: q.rows, shape: shape, options: options)
        return (dq, dk, dv)
    }

    public func gatedActivation(gate: Tensor, up: Tensor, _ activation: GatedActivation) -> Tensor {
        precondition(gate.rows == up.rows && gate.cols == up.cols, "gatedActivation: \(gate) and \(up)")
        let out = uninitialized(rows: gate.rows, cols: gate.cols)
        Self.gatedActivation(read(gate), read(up), into: write(out), gate.count, activation)
        return out
    }

    public func gatedActivationInPlace(gate: Tensor, up: Tensor, _ activation: GatedActivation) {
        precondition(gate.rows == up.rows && gate.cols == up.cols, "gatedActivationInPlace: \(gate) and \(up)")
        let g = write(gate)
        Self.gatedActivation(g, read(up), into: g, gate.count, activation)
    }

    /// o[i] = act(g[i])·u[i] in parallel chunks; `o` may be `g`.
    private static func gatedActivation(_ g: UnsafePointer<Float>, _ u: UnsafePointer<Float>, into o: UnsafeMutablePointer<Float>,
                                        _ count: Int, _ activation: GatedActivation) {
        Parallel.forEach(count) { r in
            switch activation {
            case .silu:
                if UnsafePointer(o) != g { (o + r.lowerBound).update(from: g + r.lowerBound, count: r.count) }
                Kernels.swiglu(gate: o + r.lowerBound, up: u + r.lowerBound, r.count)
            case .geluTanh:
                if UnsafePointer(o) != g { (o + r.lowerBound).update(from: g + r.lowerBound, count: r.count) }
                Kernels.geglu(gate: o + r.lowerBound, up: u + r.lowerBound, r.count)
            case .relu: for i in r { o[i] = max(g[i], 0) * u[i] }
            }
        }
    }

    public func gatedActivationBackward(_ d: Tensor, gate: Tensor, up: Tensor, _ activation: GatedActivation) -> (gate: Tensor, up: Tensor) {
        precondition(d.count == gate.count && d.count == up.count, "gatedActivationBackward: \(d), \(gate), \(up)")
        let dg = uninitialized(rows: d.rows, cols: d.cols), du = uninitialized(rows: d.rows, cols: d.cols)
        let (pd, g, u, pg, pu) = (read(d), read(gate), read(up), write(dg), write(du))
        Parallel.forEach(d.count) { range in
            switch activation {
            case .silu:
                // ∂/∂u: silu(g); ∂/∂g: u·silu′(g), in the CPU's vectors with the forward's exponential.
                let i = range.lowerBound
                Kernels.swigluBackward(pd + i, gate: g + i, up: u + i, dGate: pg + i, dUp: pu + i, range.count)
            case .geluTanh:
                let i = range.lowerBound
                Kernels.gegluBackward(pd + i, gate: g + i, up: u + i, dGate: pg + i, dUp: pu + i, range.count)
            case .relu:
                for i in range {
                    pu[i] = pd[i] * max(g[i], 0)
                    pg[i] = pd[i] * (g[i] > 0 ? u[i] : 0)
                }
            }
        }
        return (dg, du)
    }

    public func reluBackward(_ d: Tensor, input: Tensor) {
        precondition(d.count == input.count, "reluBackward: \(d) and \(input)")
        let (pd, f) = (write(d), read(input))
        for i in 0..<d.count where !(f[i] > 0) { pd[i] = 0 }
    }

    public func softcap(_ x: Tensor, cap: Float) {
        let p = write(x)
        Parallel.forEach(x.count) { r in Kernels.softcap(p + r.lowerBound, r.count, cap: cap) }
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
            Kernels.softmax(row, count)
            for e in 0..<count { taken[e] = false }
            var sum: Float = 0
            for s in 0..<topK {
                var best = -1
                for e in 0..<count where !taken[e] && (best < 0 || row[e] > row[best]) { best = e }
                taken[best] = true
                chosen[r * topK + s] = best
                weights[r * topK + s] = row[best]
                sum += row[best]
            }
            if normalize { for s in 0..<topK { weights[r * topK + s] /= sum } }
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
        let h = x.cols
        let (px, po) = (read(x), write(out))
        var scaled = [Float](repeating: 0, count: h)
        scaled.withUnsafeMutableBufferPointer { buffer in
            let row = buffer.baseAddress!
            for (j, r) in rows.enumerated() {
                precondition(r >= 0 && r < out.rows, "scatterAddRows: row \(r) of \(out)")
                let w = scales[j]
                for c in 0..<h { row[c] = px[j * h + c] * w }
                Kernels.add(row, into: po + r * h, h)
            }
        }
    }

    public func scaleRows(_ x: Tensor, by scales: [Float]) {
        precondition(scales.count == x.rows, "scaleRows: \(scales.count) scales for \(x)")
        let p = write(x)
        for r in 0..<x.rows {
            let w = scales[r]
            for c in 0..<x.cols { p[r * x.cols + c] *= w }
        }
    }

    public func accumulateRoutingGradient(outputGradient dy: Tensor, expertOutput y: Tensor, rows: [Int], slots: [Int], into dWeights: Tensor) {
        precondition(dy.rows == y.rows && dy.cols == y.cols && rows.count == dy.rows && slots.count == dy.rows,
                     "accumulateRoutingGradient: \(dy), \(y), \(rows.count) rows")
        let h = dy.cols
        let (pd, py, pw) = (read(dy), read(y), write(dWeights))
        for j in 0..<rows.count {
            var dot: Float = 0
            for c in 0..<h { dot += pd[j * h + c] * py[j * h + c] }
            pw[rows[j] * dWeights.cols + slots[j]] += dot
        }
    }

    public func routerLogitGradient(_ dWeights: Tensor, routing: Routing, normalize: Bool) -> Tensor {
        let k = routing.topK, experts = routing.experts, tokens = routing.tokens
        precondition(dWeights.rows == tokens && dWeights.cols == k, "routerLogitGradient: \(dWeights) for \(tokens) tokens, top \(k)")
        let out = zeros(rows: tokens, cols: experts)
        let (dw, p, o) = (read(dWeights), read(routing.probabilities), write(out))
        let (chosen, weights) = (routing.chosen, routing.weights)
        for r in 0..<tokens {
            var dot: Float = 0
            for s in 0..<k { dot += weights[r * k + s] * dw[r * k + s] }
            if normalize {
                // weights = softmax over the chosen logits: ∂l_i = w_i (∂w_i − Σ_j w_j ∂w_j), chosen i only.
                for s in 0..<k { o[r * experts + chosen[r * k + s]] = weights[r * k + s] * (dw[r * k + s] - dot) }
            } else {
                // weights = p_i = softmax over all logits: ∂l_j = p_j (∂w_j [j chosen] − Σ_chosen ∂w_i p_i).
                for j in 0..<experts { o[r * experts + j] = -p[r * experts + j] * dot }
                for s in 0..<k { o[r * experts + chosen[r * k + s]] += weights[r * k + s] * dw[r * k + s] }
            }
        }
        return out
    }
}

/// Causal attention on host buffers: the forward by tiles through the register-tiled products of
/// attention.c, the backward through GEMM a block of query rows at a time.
enum CPUAttention {
    /// Query rows handled at once; bounds the score scratch to queryBlock x sequenceLength.
    static let queryBlock = 256

    static func check(_ q: Tensor, _ k: Tensor, _ v: Tensor, _ shape: AttentionShape) {
        precondition(q.cols == shape.queryWidth && k.cols == shape.keyWidth && v.cols == shape.keyWidth
                     && k.rows == q.rows && v.rows == q.rows && q.rows % shape.sequenceLength == 0,
                     "attention: q \(q), k \(k), v \(v) for \(shape)")
    }

    /// Causal attention probabilities of query rows `rows` of one head against keys 0..<rows.upperBound
    /// (later keys are masked anyway), into `p` ([rows.count x rows.upperBound]; masked entries 0).
    /// With soft-capping, `capped` (same shape) receives the capped scores, which the backward needs.
    /// The backward recomputes P through this (whole rows, one softmax each); the forward's online
    /// softmax over tiles gives the same probabilities to within rounding, not the same bits.
    static func probabilities(q: UnsafePointer<Float>, qStride: Int, k: UnsafePointer<Float>, kStride: Int, headDim: Int,
                              options: AttentionOptions, rows: Range<Int>, into p: UnsafeMutablePointer<Float>,
                              capped: UnsafeMutablePointer<Float>? = nil) {
        let (i0, i1) = (rows.lowerBound, rows.upperBound)
        Linalg.sgemm(.none, .transposed, m: rows.count, n: i1, k: headDim, alpha: options.scale,
                     a: q + i0 * qStride, lda: qStride, b: k, ldb: kStride, beta: 0, c: p, ldc: i1, concurrently: false)
        for r in 0..<rows.count {
            let row = p + r * i1
            let visible = i0 + r + 1
            let first = options.firstVisible(i0 + r)
            if let cap = options.softcap {
                Kernels.softcap(row + first, visible - first, cap: cap)
                if let capped { (capped + r * i1).update(from: row, count: i1) }
            }
            Kernels.softmax(row + first, visible - first)
            for j in 0..<first { row[j] = 0 }
            for j in visible..<i1 { row[j] = 0 }
        }
    }

    /// Query rows and key rows of one tile of the forward pass.
    static let queryTile = 128, keyTile = 256

    /// Flash-style causal attention. A task is one (sequence, key/value head, query tile): the
    /// group's query heads that share the key/value head are stacked into one [group·rows x
    /// headDim] block, and key tiles up to the tile's last row (none above the diagonal) stream
    /// through it: scores by `Kernels.attentionScores`, an online softmax per row (running
    /// maximum and sum, earlier output rescaled when the maximum grows), and the tile's PV added
    /// by `Kernels.attentionValues` (register-tiled products with the keys and values packed
    /// once per tile, where sgemm packed the query stack and the probabilities again for every
    /// key tile). No score matrix larger than a tile exists. Tiles are fixed by the shape alone,
    /// each task writes only its own output rows, and each product is one FMA chain in a fixed
    /// order, so the bits depend on neither the thread count nor the CPU.
    static func forward(q pq: UnsafePointer<Float>, k pk: UnsafePointer<Float>, v pv: UnsafePointer<Float>, out po: UnsafeMutablePointer<Float>,
                        tokens: Int, shape: AttentionShape, options: AttentionOptions) {
        let t = shape.sequenceLength, headDim = shape.headDim
        let qDim = shape.queryWidth, kvDim = shape.keyWidth
        let group = shape.heads / shape.kvHeads
        let tiles = (t + queryTile - 1) / queryTile
        let sequences = tokens / t
        let stacked = group * queryTile
        let pointers = UnsafeSendable((pq, pk, pv, po))
        // The largest tiles (nearest the end of a sequence) first, so the last tasks are short.
        let tasks = sequences * shape.kvHeads * tiles
        // Scratch: the q stack, the accumulator, a tile of scores, row maxima and sums, and the
        // panels the key tile's keys, then its values, are packed into for the two products.
        let panels = Kernels.attentionPanelFloats(keyTile, headDim: headDim)
        Parallel.forEachTask(tasks, scratch: 2 * stacked * headDim + stacked * keyTile + 2 * stacked + panels) { scratch, task in
            let (pq, pk, pv, po) = pointers.value
            let tile = tiles - 1 - task % tiles
            let kvHead = (task / tiles) % shape.kvHeads
            let seq = task / (tiles * shape.kvHeads)
            let base = seq * t
            let i0 = tile * queryTile, i1 = min(i0 + queryTile, t)
            let rows = i1 - i0
            let m = group * rows
            let qs = scratch, acc = scratch + stacked * headDim, s = acc + stacked * headDim
            let rowMax = s + stacked * keyTile, rowSum = rowMax + stacked
            let panels = rowSum + stacked
            // Stack the group's query heads: row h·rows + r is head (kvHead·group + h), position i0 + r.
            for h in 0..<group {
                let src = pq + (base + i0) * qDim + (kvHead * group + h) * headDim
                for r in 0..<rows { (qs + (h * rows + r) * headDim).update(from: src + r * qDim, count: headDim) }
            }
            acc.initialize(repeating: 0, count: m * headDim)
            rowMax.initialize(repeating: -.infinity, count: m)
            rowSum.initialize(repeating: 0, count: m)
            let kh = pk + base * kvDim + kvHead * headDim
            let vh = pv + base * kvDim + kvHead * headDim
            let firstKey = options.firstVisible(i0)
            var j0 = (firstKey / keyTile) * keyTile
            while j0 < i1 {
                let j1 = min(j0 + keyTile, i1)
                let n = j1 - j0
                let mask = Kernels.CausalTile(period: rows, offset: i0 - j0)
                Kernels.attentionScores(q: qs, ldq: headDim, m: m, keys: kh + j0 * kvDim, ldk: kvDim, n: n, headDim: headDim,
                                        scale: options.scale, mask: mask, panels: panels, into: s, lds: n)
                for row in 0..<m {
                    let i = i0 + row % rows
                    let sr = s + row * n
                    // Keys this query sees inside the tile: [lo, hi).
                    let lo = max(options.firstVisible(i), j0) - j0, hi = min(i + 1, j1) - j0
                    guard lo < hi else {
                        sr.update(repeating: 0, count: n)
                        continue
                    }
                    if let cap = options.softcap { Kernels.softcap(sr + lo, hi - lo, cap: cap) }
                    let tileMax = Kernels.maximum(sr + lo, hi - lo)
                    let newMax = max(rowMax[row], tileMax)
                    if newMax > rowMax[row], rowMax[row] > -.infinity {
                        let correction = expf(rowMax[row] - newMax)
                        rowSum[row] *= correction
                        Kernels.scale(acc + row * headDim, headDim, by: correction)
                    }
                    rowMax[row] = newMax
                    rowSum[row] += Float(Kernels.expShifted(sr + lo, hi - lo, shift: newMax))
                    if lo > 0 { sr.update(repeating: 0, count: lo) }
                    if hi < n { (sr + hi).update(repeating: 0, count: n - hi) }
                }
                Kernels.attentionValues(p: s, ldp: n, m: m, values: vh + j0 * kvDim, ldv: kvDim, n: n, headDim: headDim,
                                        mask: mask, panels: panels, into: acc, ldacc: headDim)
                j0 = j1
            }
            for h in 0..<group {
                let dst = po + (base + i0) * qDim + (kvHead * group + h) * headDim
                for r in 0..<rows {
                    let row = h * rows + r
                    let inv = 1 / rowSum[row]
                    let a = acc + row * headDim, o = dst + r * qDim
                    for d in 0..<headDim { o[d] = a[d] * inv }
                }
            }
        }
    }

    /// Every (sequence, key/value head) pair is an independent task: it owns its k/v gradient
    /// columns and runs its group's query heads in order (their sums into dK and dV keep the
    /// serial order), so the bits do not depend on the thread count.
    static func backward(q pq: UnsafePointer<Float>, k pk: UnsafePointer<Float>, v pv: UnsafePointer<Float>, dOut pdo: UnsafePointer<Float>,
                         dq pdq: UnsafeMutablePointer<Float>, dk pdk: UnsafeMutablePointer<Float>, dv pdv: UnsafeMutablePointer<Float>,
                         tokens: Int, shape: AttentionShape, options: AttentionOptions) {
        let t = shape.sequenceLength, headDim = shape.headDim
        let qDim = shape.queryWidth, kvDim = shape.keyWidth
        let group = shape.heads / shape.kvHeads
        let scale = options.scale
        let block = min(queryBlock, t)
        let pointers = UnsafeSendable((pq, pk, pv, pdo, pdq, pdk, pdv))
        let tasks = (tokens / t) * shape.kvHeads
        // Scratch: probabilities, score gradients and, with a soft cap, the capped scores, a
        // query block each (whole cache lines apart).
        let buffer = (block * t + 15) / 16 * 16
        let buffers = options.softcap == nil ? 2 : 3
        Parallel.forEachTask(tasks, scratch: buffers * buffer) { scratch, task in
            let (pq, pk, pv, pdo, pdq, pdk, pdv) = pointers.value
            let prob = scratch, ds = scratch + buffer
            let capped: UnsafeMutablePointer<Float>? = buffers == 3 ? ds + buffer : nil
            let (seq, kvHead) = (task / shape.kvHeads, task % shape.kvHeads)
            let base = seq * t
            for h in (kvHead * group)..<((kvHead + 1) * group) {
                let qh = pq + base * qDim + h * headDim
                let kh = pk + base * kvDim + kvHead * headDim
                let vh = pv + base * kvDim + kvHead * headDim
                let doh = pdo + base * qDim + h * headDim
                let dqh = pdq + base * qDim + h * headDim
                let dkh = pdk + base * kvDim + kvHead * headDim
                let dvh = pdv + base * kvDim + kvHead * headDim
                var i0 = 0
                while i0 < t {
                    let i1 = min(i0 + block, t)
                    let rows = i1 - i0
                    // P, exactly as the forward computed it.
                    probabilities(q: qh, qStride: qDim, k: kh, kStride: kvDim, headDim: headDim,
                                  options: options, rows: i0..<i1, into: prob, capped: capped)
                    // dV += Pᵀ dO;  dP = dO Vᵀ;  dS = P ⊙ (dP − rowsum(P ⊙ dP)).
                    Linalg.sgemm(.transposed, .none, m: i1, n: headDim, k: rows, alpha: 1,
                                 a: prob, lda: i1, b: doh + i0 * qDim, ldb: qDim, beta: 1, c: dvh, ldc: kvDim, concurrently: false)
                    Linalg.sgemm(.none, .transposed, m: rows, n: i1, k: headDim, alpha: 1,
                                 a: doh + i0 * qDim, lda: qDim, b: vh, ldb: kvDim, beta: 0, c: ds, ldc: i1, concurrently: false)
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
                                 a: ds, lda: i1, b: kh, ldb: kvDim, beta: 0, c: dqh + i0 * qDim, ldc: qDim, concurrently: false)
                    Linalg.sgemm(.transposed, .none, m: i1, n: headDim, k: rows, alpha: scale,
                                 a: ds, lda: i1, b: qh + i0 * qDim, ldb: qDim, beta: 1, c: dkh, ldc: kvDim, concurrently: false)
                    i0 = i1
                }
            }
        }
    }
}

