import Foundation
import TopiaryTensor

/// Mixtral: the LLaMA block with a mixture of experts in place of the feed-forward. A router
/// (not pruned) picks `num_experts_per_tok` of `num_local_experts` gated experts per token; the
/// chosen experts' outputs are summed with the router's renormalised softmax weights. Each
/// expert's linears see only the tokens routed to it (or every token, with
/// `ExpertCalibration.all`), so each is pruned from its own statistics.
public enum MixtralFamily: ModelFamily {
    public static let modelTypes = ["mixtral"]

    public static func decode(_ f: JSONFields) throws -> ModelConfig {
        var c = try ModelConfig.llamaLike(.mixtral, f)
        c.expertCount = try f.int("num_local_experts")
        c.expertsPerToken = try f.int("num_experts_per_tok")
        c.slidingWindow = try f.optionalInt("sliding_window")
        return c
    }

    public static func huggingFaceFields(_ c: ModelConfig) -> [String: Any] {
        var fields = c.llamaLikeFields()
        fields["architectures"] = ["MixtralForCausalLM"]
        fields["model_type"] = "mixtral"
        fields["num_local_experts"] = c.expertCount
        fields["num_experts_per_tok"] = c.expertsPerToken
        fields["sliding_window"] = c.slidingWindow ?? NSNull()
        return fields
    }

    static func router(block i: Int) -> String { blockPrefix(i) + "block_sparse_moe.gate.weight" }

    static func expert(_ c: ModelConfig, block i: Int, _ e: Int) -> GatedMLP {
        let p = blockPrefix(i) + "block_sparse_moe.experts.\(e)."
        return GatedMLP(gate: p + "w1", up: p + "w3", down: p + "w2", activation: c.activation, tag: "moe.\(e)")
    }

    public static func blockTensors(_ c: ModelConfig, block i: Int) -> [BlockTensorSpec] {
        var t = Array(llamaTensors(c, block: i, mlp: false).prefix(4))
        for e in 0..<c.expertCount {
            let x = expert(c, block: i, e)
            t += [BlockTensorSpec(x.gate + ".weight", c.intermediateSize, c.hiddenSize), BlockTensorSpec(x.up + ".weight", c.intermediateSize, c.hiddenSize),
                  BlockTensorSpec(x.down + ".weight", c.hiddenSize, c.intermediateSize)]
        }
        return t + [BlockTensorSpec(router(block: i), c.expertCount, c.hiddenSize)] + llamaTensors(c, block: i, mlp: false).dropFirst(4)
    }

    public static func linears(_ c: ModelConfig, block i: Int) -> [String] {
        Array(llamaLinears(block: i).prefix(4)) + (0..<c.expertCount).flatMap { e -> [String] in
            let x = expert(c, block: i, e)
            return [x.gate, x.up, x.down]
        }
    }

    public static func feedForwards(_ c: ModelConfig, block i: Int) -> [FeedForward] {
        (0..<c.expertCount).map { e in
            let x = expert(c, block: i, e)
            return .gated(gate: x.gate, up: x.up, down: x.down)
        }
    }

    public static func linearMACsPerToken(_ c: ModelConfig) -> Int {
        c.hiddenSize * (c.queryDim + 2 * c.kvDim) + c.queryDim * c.hiddenSize
            + c.expertsPerToken * 3 * c.hiddenSize * c.intermediateSize + c.expertCount * c.hiddenSize
    }

    public static func forward(_ b: DecoderBlock, _ x: Matrix, _ pass: inout BlockPass) -> Matrix {
        llamaForward(b, x, &pass) { f, pass in experts(b, f, &pass) }
    }

    public static func weightGradients(_ b: DecoderBlock, _ dy: Matrix, _ tape: BlockTape) -> [String: Matrix] {
        llamaBackward(b, dy, tape) { dy, grads in expertsBackward(b, dy, tape, into: &grads) }
    }

    /// Per token: the top-k experts by router probability and their renormalised weights.
    static func route(_ b: DecoderBlock, _ x: Matrix) -> (experts: [Int], weights: [Float]) {
        let c = b.config
        let k = c.expertsPerToken
        var logits = Linalg.linear(x, b.tensor(router(block: b.index)))
        var chosen = [Int](repeating: 0, count: x.rows * k)
        var weights = [Float](repeating: 0, count: x.rows * k)
        logits.withUnsafeMutableBufferPointer { pl in
            for r in 0..<x.rows {
                let row = pl.baseAddress! + r * c.expertCount
                Kernels.softmax(row, c.expertCount)
                // Top k, largest first; ties to the lower index.
                var taken = [Bool](repeating: false, count: c.expertCount)
                var sum: Float = 0
                for s in 0..<k {
                    var best = -1
                    for e in 0..<c.expertCount where !taken[e] && (best < 0 || row[e] > row[best]) { best = e }
                    taken[best] = true
                    chosen[r * k + s] = best
                    weights[r * k + s] = row[best]
                    sum += row[best]
                }
                for s in 0..<k { weights[r * k + s] /= sum }
            }
        }
        return (chosen, weights)
    }

    /// The mixture: each expert runs on its tokens, and its output, times the token's weight
    /// for it, is added in expert order.
    static func experts(_ b: DecoderBlock, _ x: Matrix, _ pass: inout BlockPass) -> Matrix {
        let c = b.config
        let k = c.expertsPerToken
        let (chosen, weights) = route(b, x)
        pass.keep("moe.in", x)
        pass.keep(indices: "moe.chosen", chosen)
        pass.keep("moe.weights", Matrix(rows: x.rows, cols: k, values: weights))
        var out = Matrix(rows: x.rows, cols: c.hiddenSize)
        for e in 0..<c.expertCount {
            var rows: [Int] = []
            var rowWeights: [Float] = []
            for r in 0..<x.rows {
                for s in 0..<k where chosen[r * k + s] == e {
                    rows.append(r)
                    rowWeights.append(weights[r * k + s])
                }
            }
            let mlp = expert(c, block: b.index, e)
            var y: Matrix
            if pass.observer != nil && pass.expertCalibration == .all {
                // Statistics from every token; the output from the routed ones.
                y = mlp.forward(b, x, &pass).gatherRows(rows)
            } else {
                guard !rows.isEmpty else { continue }
                y = mlp.forward(b, x.gatherRows(rows), &pass)
            }
            pass.keep(indices: "moe.\(e).rows", rows)
            pass.keep("moe.\(e).y", y)
            let h = c.hiddenSize
            out.withUnsafeMutableBufferPointer { po in
                y.withUnsafeMutableBufferPointer { py in
                    for (j, r) in rows.enumerated() {
                        let src = py.baseAddress! + j * h
                        for col in 0..<h { src[col] *= rowWeights[j] }
                        Kernels.add(src, into: po.baseAddress! + r * h, h)
                    }
                }
            }
        }
        return out
    }

    /// Weight gradients of every expert's linears; returns ∂L/∂x through the experts and the router.
    static func expertsBackward(_ b: DecoderBlock, _ dy: Matrix, _ tape: BlockTape, into grads: inout [String: Matrix]) -> Matrix {
        let c = b.config
        let k = c.expertsPerToken
        let h = c.hiddenSize
        let x = tape.value("moe.in")
        let chosen = tape.indices["moe.chosen"]!
        let weights = tape.value("moe.weights")
        var dx = Matrix(rows: x.rows, cols: h)
        var dWeights = Matrix(rows: x.rows, cols: k)
        for e in 0..<c.expertCount {
            let mlp = expert(c, block: b.index, e)
            guard let rows = tape.indices["moe.\(e).rows"], !rows.isEmpty else {
                // No token reached this expert: its weights do not affect the output.
                for (name, spec) in [(mlp.gate, (c.intermediateSize, h)), (mlp.up, (c.intermediateSize, h)), (mlp.down, (h, c.intermediateSize))] {
                    grads[name] = Matrix(rows: spec.0, cols: spec.1)
                }
                continue
            }
            let y = tape.value("moe.\(e).y")
            var dyExpert = dy.gatherRows(rows)
            dyExpert.withUnsafeMutableBufferPointer { pd in
                for (j, r) in rows.enumerated() {
                    let slot = (0..<k).first { chosen[r * k + $0] == e }!
                    let row = pd.baseAddress! + j * h
                    // ∂L/∂(weight) = ⟨∂L/∂out_r, y_r⟩, then the expert sees ∂L/∂out_r · weight.
                    var dot: Float = 0
                    y.withUnsafeBufferPointer { py in for col in 0..<h { dot += row[col] * py[j * h + col] } }
                    dWeights[r, slot] += dot
                    let w = weights[r, slot]
                    for col in 0..<h { row[col] *= w }
                }
            }
            let dxExpert = mlp.backward(b, dyExpert, tape, into: &grads)
            dx.withUnsafeMutableBufferPointer { px in
                dxExpert.withUnsafeBufferPointer { pe in
                    for (j, r) in rows.enumerated() { Kernels.add(pe.baseAddress! + j * h, into: px.baseAddress! + r * h, h) }
                }
            }
        }
        // weights = softmax over the chosen logits: ∂l_i = w_i (∂w_i − Σ_j w_j ∂w_j).
        var dLogits = Matrix(rows: x.rows, cols: c.expertCount)
        for r in 0..<x.rows {
            var dot: Float = 0
            for s in 0..<k { dot += weights[r, s] * dWeights[r, s] }
            for s in 0..<k { dLogits[r, chosen[r * k + s]] = weights[r, s] * (dWeights[r, s] - dot) }
        }
        Linalg.gemm(dLogits, .none, b.tensor(router(block: b.index)), .none, beta: 1, into: &dx)
        return dx
    }
}
