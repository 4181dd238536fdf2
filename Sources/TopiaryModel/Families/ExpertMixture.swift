import Foundation
import TopiaryTensor

/// A mixture of gated experts behind a router (Mixtral, Qwen3-MoE): per token, the router's
/// softmax picks the `topK` most probable experts; their outputs are summed with those
/// probabilities (renormalised over the chosen experts when `normalize`). The router is a
/// block tensor, not a pruned linear. Each expert runs on its tokens only, or, while statistics
/// are collected with `ExpertCalibration.all`, on every token (the output still follows the routing).
struct ExpertMixture {
    let router: String
    let experts: [GatedMLP]
    let topK: Int
    let normalize: Bool

    /// Per token: the chosen experts, most probable first (ties to the lower index), and their weights.
    func route(_ b: DecoderBlock, _ x: Matrix) -> (experts: [Int], weights: [Float], probabilities: Matrix) {
        let count = experts.count
        var probabilities = Linalg.linear(x, b.tensor(router))
        var chosen = [Int](repeating: 0, count: x.rows * topK)
        var weights = [Float](repeating: 0, count: x.rows * topK)
        probabilities.withUnsafeMutableBufferPointer { pl in
            for r in 0..<x.rows {
                let row = pl.baseAddress! + r * count
                Kernels.softmax(row, count)
                var taken = [Bool](repeating: false, count: count)
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
        }
        return (chosen, weights, probabilities)
    }

    func forward(_ b: DecoderBlock, _ x: Matrix, _ pass: inout BlockPass) -> Matrix {
        let k = topK
        let h = x.cols
        let (chosen, weights, probabilities) = route(b, x)
        pass.keep("moe.in", x)
        pass.keep(indices: "moe.chosen", chosen)
        pass.keep("moe.weights", Matrix(rows: x.rows, cols: k, values: weights))
        pass.keep("moe.probabilities", probabilities)
        var out = Matrix(rows: x.rows, cols: h)
        for (e, mlp) in experts.enumerated() {
            var rows: [Int] = []
            var rowWeights: [Float] = []
            for r in 0..<x.rows {
                for s in 0..<k where chosen[r * k + s] == e {
                    rows.append(r)
                    rowWeights.append(weights[r * k + s])
                }
            }
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
    func backward(_ b: DecoderBlock, _ dy: Matrix, _ tape: BlockTape, into grads: inout [String: Matrix]) -> Matrix {
        let k = topK
        let x = tape.value("moe.in")
        let h = x.cols
        let chosen = tape.indices["moe.chosen"]!
        let weights = tape.value("moe.weights")
        var dx = Matrix(rows: x.rows, cols: h)
        var dWeights = Matrix(rows: x.rows, cols: k)
        for (e, mlp) in experts.enumerated() {
            guard let rows = tape.indices["moe.\(e).rows"], !rows.isEmpty else {
                // No token reached this expert: its weights do not affect the output.
                for name in [mlp.gate, mlp.up, mlp.down] {
                    let w = b.weight(name)
                    grads[name] = Matrix(rows: w.rows, cols: w.cols)
                }
                continue
            }
            let y = tape.value("moe.\(e).y")
            var dyExpert = dy.gatherRows(rows)
            dyExpert.withUnsafeMutableBufferPointer { pd in
                y.withUnsafeBufferPointer { py in
                    for (j, r) in rows.enumerated() {
                        let slot = (0..<k).first { chosen[r * k + $0] == e }!
                        let row = pd.baseAddress! + j * h
                        // ∂L/∂(weight) = ⟨∂L/∂out_r, y_r⟩; the expert sees ∂L/∂out_r · weight.
                        var dot: Float = 0
                        for col in 0..<h { dot += row[col] * py[j * h + col] }
                        dWeights[r, slot] += dot
                        let w = weights[r, slot]
                        for col in 0..<h { row[col] *= w }
                    }
                }
            }
            let dxExpert = mlp.backward(b, dyExpert, tape, into: &grads)
            dx.withUnsafeMutableBufferPointer { px in
                dxExpert.withUnsafeBufferPointer { pe in
                    for (j, r) in rows.enumerated() { Kernels.add(pe.baseAddress! + j * h, into: px.baseAddress! + r * h, h) }
                }
            }
        }
        var dLogits = Matrix(rows: x.rows, cols: experts.count)
        if normalize {
            // weights = softmax over the chosen logits: ∂l_i = w_i (∂w_i − Σ_j w_j ∂w_j), chosen i only.
            for r in 0..<x.rows {
                var dot: Float = 0
                for s in 0..<k { dot += weights[r, s] * dWeights[r, s] }
                for s in 0..<k { dLogits[r, chosen[r * k + s]] = weights[r, s] * (dWeights[r, s] - dot) }
            }
        } else {
            // weights = p_i = softmax over all logits: ∂l_j = p_j (∂w_j [j chosen] − Σ_chosen ∂w_i p_i).
            let p = tape.value("moe.probabilities")
            for r in 0..<x.rows {
                var dot: Float = 0
                for s in 0..<k { dot += weights[r, s] * dWeights[r, s] }
                for j in 0..<experts.count { dLogits[r, j] = -p[r, j] * dot }
                for s in 0..<k { dLogits[r, chosen[r * k + s]] += weights[r, s] * dWeights[r, s] }
            }
        }
        Linalg.gemm(dLogits, .none, b.tensor(router), .none, beta: 1, into: &dx)
        return dx
    }
}
