/// The model kernels, checked and counted (ModelKernels.swift).
extension CheckingBackend {
    public func add(_ x: Tensor, into y: Tensor) {
        require(x.rows == y.rows && x.cols == y.cols, "add: \(x) into \(y)")
        record("add", flops: Double(y.count))
        inner.add(x, into: y)
        finite("add", y)
    }

    public func addRowVector(_ v: Tensor, into y: Tensor) {
        require(v.count == y.cols, "addRowVector: \(v) into \(y)")
        record("addRowVectorInPlace", flops: Double(y.count))
        inner.addRowVector(v, into: y)
        finite("addRowVector", y)
    }

    public func reshaped(_ x: Tensor, rows: Int, cols: Int) -> Tensor {
        require(rows * cols == x.count, "reshaped: \(x) as \(rows)x\(cols)")
        record("reshaped")
        let y = inner.reshaped(x, rows: rows, cols: cols)
        require(y.rows == rows && y.cols == cols, "reshaped of \(x) gave \(y)")
        return y
    }

    public func rmsNorm(_ x: Tensor, weight: Tensor, eps: Float) -> Tensor {
        require(weight.count == x.cols, "rmsNorm: \(x) with weight \(weight)")
        record("rmsNorm", flops: 4 * Double(x.count))
        return checked("rmsNorm", inner.rmsNorm(x, weight: weight, eps: eps), like: x)
    }

    public func layerNorm(_ x: Tensor, weight: Tensor, bias: Tensor?, eps: Float) -> Tensor {
        require(weight.count == x.cols && (bias?.count ?? x.cols) == x.cols, "layerNorm: \(x) with weight \(weight)")
        record("layerNorm", flops: 6 * Double(x.count))
        return checked("layerNorm", inner.layerNorm(x, weight: weight, bias: bias, eps: eps), like: x)
    }

    public func rmsNormBackward(input: Tensor, weight: Tensor, eps: Float, outputGradient: Tensor) -> Tensor {
        require(weight.count == input.cols && outputGradient.rows == input.rows && outputGradient.cols == input.cols,
                "rmsNormBackward: \(input), \(weight), \(outputGradient)")
        record("rmsNormBackward", flops: 8 * Double(input.count))
        return checked("rmsNormBackward", inner.rmsNormBackward(input: input, weight: weight, eps: eps, outputGradient: outputGradient), like: input)
    }

    public func layerNormBackward(input: Tensor, weight: Tensor, eps: Float, outputGradient: Tensor) -> Tensor {
        require(weight.count == input.cols && outputGradient.rows == input.rows && outputGradient.cols == input.cols,
                "layerNormBackward: \(input), \(weight), \(outputGradient)")
        record("layerNormBackward", flops: 12 * Double(input.count))
        return checked("layerNormBackward", inner.layerNormBackward(input: input, weight: weight, eps: eps, outputGradient: outputGradient), like: input)
    }

    public func rope(_ x: Tensor, heads: Int, headDim: Int, sequenceLength: Int, table: Kernels.RopeTable, layout: RopeLayout, inverse: Bool) {
        require(x.cols == heads * headDim && sequenceLength > 0 && x.rows % sequenceLength == 0 && sequenceLength <= table.positions,
                "rope: \(x) for \(heads) heads of \(headDim), sequences of \(sequenceLength), a table of \(table.positions) positions")
        record(inverse ? "ropeInverse" : "rope", flops: 3 * Double(x.count))
        inner.rope(x, heads: heads, headDim: headDim, sequenceLength: sequenceLength, table: table, layout: layout, inverse: inverse)
        finite("rope", x)
    }

    public func attention(q: Tensor, k: Tensor, v: Tensor, shape: AttentionShape, options: AttentionOptions) -> Tensor {
        requireAttention(q, k, v, shape)
        record("attention", flops: attentionFLOPs(q.rows, shape))
        let out = inner.attention(q: q, k: k, v: v, shape: shape, options: options)
        require(out.rows == q.rows && out.cols == shape.queryWidth, "attention gave \(out) for \(q)")
        finite("attention", out)
        return out
    }

    public func attentionBackward(q: Tensor, k: Tensor, v: Tensor, outputGradient: Tensor, shape: AttentionShape,
                                  options: AttentionOptions) -> (dq: Tensor, dk: Tensor, dv: Tensor) {
        requireAttention(q, k, v, shape)
        require(outputGradient.rows == q.rows && outputGradient.cols == shape.queryWidth, "attentionBackward: gradient \(outputGradient) for \(q)")
        record("attentionBackward", flops: 2.5 * attentionFLOPs(q.rows, shape))
        let g = inner.attentionBackward(q: q, k: k, v: v, outputGradient: outputGradient, shape: shape, options: options)
        require(g.dq.rows == q.rows && g.dq.cols == q.cols && g.dk.rows == k.rows && g.dk.cols == k.cols
                && g.dv.rows == v.rows && g.dv.cols == v.cols, "attentionBackward gave \(g.dq), \(g.dk), \(g.dv)")
        finite("attentionBackward", g.dq)
        finite("attentionBackward", g.dk)
        finite("attentionBackward", g.dv)
        return g
    }

    public func gatedActivation(gate: Tensor, up: Tensor, _ activation: GatedActivation) -> Tensor {
        require(gate.rows == up.rows && gate.cols == up.cols, "gatedActivation: \(gate) and \(up)")
        record("gatedActivation", flops: 6 * Double(gate.count))
        return checked("gatedActivation", inner.gatedActivation(gate: gate, up: up, activation), like: gate)
    }

    public func gatedActivationBackward(_ d: Tensor, gate: Tensor, up: Tensor, _ activation: GatedActivation) -> (gate: Tensor, up: Tensor) {
        require(d.rows == gate.rows && d.cols == gate.cols && up.rows == gate.rows && up.cols == gate.cols,
                "gatedActivationBackward: \(d), \(gate), \(up)")
        record("gatedActivationBackward", flops: 10 * Double(gate.count))
        let g = inner.gatedActivationBackward(d, gate: gate, up: up, activation)
        return (checked("gatedActivationBackward", g.gate, like: gate), checked("gatedActivationBackward", g.up, like: up))
    }

    public func reluBackward(_ d: Tensor, input: Tensor) {
        require(d.rows == input.rows && d.cols == input.cols, "reluBackward: \(d) and \(input)")
        record("reluBackward", flops: Double(d.count))
        inner.reluBackward(d, input: input)
    }

    public func softcap(_ x: Tensor, cap: Float) {
        require(cap > 0, "softcap: cap \(cap)")
        record("softcap", flops: 3 * Double(x.count))
        inner.softcap(x, cap: cap)
        finite("softcap", x)
    }

    public func route(_ logits: Tensor, topK: Int, normalize: Bool) -> Routing {
        require(topK >= 1 && topK <= logits.cols, "route: top \(topK) of \(logits)")
        record("route", flops: 4 * Double(logits.count))
        let r = inner.route(logits, topK: topK, normalize: normalize)
        require(r.chosen.count == logits.rows * topK && r.weights.count == logits.rows * topK
                && r.probabilities.rows == logits.rows && r.probabilities.cols == logits.cols, "route of \(logits) gave \(r.probabilities)")
        require(r.chosen.allSatisfy { $0 >= 0 && $0 < logits.cols }, "route chose an expert outside 0..<\(logits.cols)")
        finite("route", r.probabilities)
        return r
    }

    public func gatherRows(_ x: Tensor, _ rows: [Int]) -> Tensor {
        require(rows.allSatisfy { $0 >= 0 && $0 < x.rows }, "gatherRows: a row outside 0..<\(x.rows)")
        record("gatherRows")
        let y = inner.gatherRows(x, rows)
        require(y.rows == rows.count && y.cols == x.cols, "gatherRows of \(x) gave \(y)")
        return y
    }

    public func scatterAddRows(_ x: Tensor, rows: [Int], scales: [Float], into out: Tensor) {
        require(rows.count == x.rows && scales.count == x.rows && x.cols == out.cols && rows.allSatisfy { $0 >= 0 && $0 < out.rows },
                "scatterAddRows: \(x) into \(out) by \(rows.count) rows")
        record("scatterAddRows", flops: 2 * Double(x.count))
        inner.scatterAddRows(x, rows: rows, scales: scales, into: out)
        finite("scatterAddRows", out)
    }

    public func scaleRows(_ x: Tensor, by scales: [Float]) {
        require(scales.count == x.rows, "scaleRows: \(scales.count) scales for \(x)")
        record("scaleRows", flops: Double(x.count))
        inner.scaleRows(x, by: scales)
        finite("scaleRows", x)
    }

    public func accumulateRoutingGradient(outputGradient: Tensor, expertOutput: Tensor, rows: [Int], slots: [Int], into dWeights: Tensor) {
        require(outputGradient.rows == expertOutput.rows && outputGradient.cols == expertOutput.cols && rows.count == outputGradient.rows
                && slots.count == rows.count && rows.allSatisfy { $0 >= 0 && $0 < dWeights.rows } && slots.allSatisfy { $0 >= 0 && $0 < dWeights.cols },
                "accumulateRoutingGradient: \(outputGradient), \(expertOutput) into \(dWeights)")
        record("accumulateRoutingGradient", flops: 2 * Double(outputGradient.count))
        inner.accumulateRoutingGradient(outputGradient: outputGradient, expertOutput: expertOutput, rows: rows, slots: slots, into: dWeights)
        finite("accumulateRoutingGradient", dWeights)
    }

    public func routerLogitGradient(_ dWeights: Tensor, routing: Routing, normalize: Bool) -> Tensor {
        require(dWeights.rows == routing.tokens && dWeights.cols == routing.topK, "routerLogitGradient: \(dWeights) for \(routing.probabilities)")
        record("routerLogitGradient", flops: 4 * Double(routing.probabilities.count))
        let d = inner.routerLogitGradient(dWeights, routing: routing, normalize: normalize)
        return checked("routerLogitGradient", d, like: routing.probabilities)
    }

    private func requireAttention(_ q: Tensor, _ k: Tensor, _ v: Tensor, _ shape: AttentionShape) {
        require(q.cols == shape.queryWidth && k.cols == shape.keyWidth && v.cols == shape.keyWidth
                && k.rows == q.rows && v.rows == q.rows && q.rows % shape.sequenceLength == 0,
                "attention: q \(q), k \(k), v \(v) for \(shape)")
    }

    /// Scores and the weighted sum over the causal half: 2·2·N·T/2·headDim per head.
    private func attentionFLOPs(_ tokens: Int, _ shape: AttentionShape) -> Double {
        2 * Double(tokens) * Double(shape.sequenceLength) * Double(shape.headDim) * Double(shape.heads)
    }

    func checked(_ op: String, _ y: Tensor, like x: Tensor) -> Tensor {
        require(y.rows == x.rows && y.cols == x.cols, "\(op) gave \(y) for \(x)")
        finite(op, y)
        return y
    }
}

/// BESA's kernels, checked and counted.
extension CheckingBackend {
    public func rankRows(_ scores: Tensor) -> Tensor {
        require(scores.cols <= 1 << 24, "rankRows: \(scores) has too many columns for Float32 indices")
        record("rankRows", flops: Double(scores.count) * Double(max(1, Int.bitWidth - scores.cols.leadingZeroBitCount)))
        let order = inner.rankRows(scores)
        require(order.rows == scores.rows && order.cols == scores.cols, "rankRows of \(scores) gave \(order)")
        return order
    }

    public func rankedMask(order: Tensor, counts: [Int]) -> Tensor {
        require(counts.count == order.rows && counts.allSatisfy { $0 >= 0 && $0 <= order.cols }, "rankedMask: \(counts.count) counts for \(order)")
        record("rankedMask")
        let m = inner.rankedMask(order: order, counts: counts)
        require(m.rows == order.rows && m.cols == order.cols, "rankedMask of \(order) gave \(m)")
        return m
    }

    public func rankedPrefixSums(_ gradient: Tensor, _ weight: Tensor, order: Tensor, at counts: [Int]) -> [Double] {
        require(gradient.rows == weight.rows && gradient.cols == weight.cols && order.rows == weight.rows && order.cols == weight.cols
                && zip(counts, counts.dropFirst()).allSatisfy { $0 <= $1 } && counts.allSatisfy { $0 >= 0 && $0 <= weight.cols },
                "rankedPrefixSums: \(gradient), \(weight), \(order), counts \(counts.first ?? 0)...\(counts.last ?? 0)")
        record("rankedPrefixSums", flops: 2 * Double(weight.count))
        let sums = inner.rankedPrefixSums(gradient, weight, order: order, at: counts)
        require(sums.count == weight.rows * counts.count, "rankedPrefixSums gave \(sums.count) values")
        if !sums.allSatisfy({ $0.isFinite }) { violationFromExtension("rankedPrefixSums: non-finite sums") }
        return sums
    }

    public func channelNormalizedError(target: Tensor, prediction: Tensor) -> (loss: Double, gradient: Tensor) {
        require(target.rows == prediction.rows && target.cols == prediction.cols, "channelNormalizedError: \(target) and \(prediction)")
        record("channelNormalizedError", flops: 6 * Double(target.count))
        let r = inner.channelNormalizedError(target: target, prediction: prediction)
        return (r.loss, checked("channelNormalizedError", r.gradient, like: target))
    }
}
