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

    func forward(_ b: DeviceBlock, _ x: Tensor, _ pass: inout BlockPass) -> Tensor {
        let backend = b.backend
        let routing = backend.route(backend.linear(x, b.tensor(router)), topK: topK, normalize: normalize)
        pass.keep("moe.in", x)
        pass.keep(routing: "moe", routing)
        let out = backend.zeros(rows: x.rows, cols: x.cols)
        for (e, mlp) in experts.enumerated() {
            let (rows, slots) = routing.assignments(of: e)
            let y: Tensor
            if pass.observer != nil && pass.expertCalibration == .all {
                // Statistics from every token; the output from the routed ones.
                y = backend.gatherRows(mlp.forward(b, x, &pass), rows)
            } else {
                guard !rows.isEmpty else { continue }
                y = mlp.forward(b, backend.gatherRows(x, rows), &pass)
            }
            pass.keep(indices: "moe.\(e).rows", rows)
            pass.keep("moe.\(e).y", y)
            backend.scatterAddRows(y, rows: rows, scales: zip(rows, slots).map { routing.weights[$0 * topK + $1] }, into: out)
        }
        return out
    }

    /// Weight gradients of every expert's linears; returns ∂L/∂x through the experts and the router.
    func backward(_ b: DeviceBlock, _ dy: Tensor, _ tape: BlockTape, into grads: inout [String: Tensor]) -> Tensor {
        let backend = b.backend
        let x = tape.value("moe.in")
        guard let routing = tape.routings["moe"] else { preconditionFailure("block tape has no routing: was the forward pass recording?") }
        let dx = backend.zeros(rows: x.rows, cols: x.cols)
        let dWeights = backend.zeros(rows: x.rows, cols: topK)
        for (e, mlp) in experts.enumerated() {
            guard let rows = tape.indices["moe.\(e).rows"], !rows.isEmpty else {
                // No token reached this expert: its weights do not affect the output.
                for name in [mlp.gate, mlp.up, mlp.down] {
                    let w = b.weight(name)
                    grads[name] = backend.zeros(rows: w.rows, cols: w.cols)
                }
                continue
            }
            let slots = routing.assignments(of: e).slots
            let dyExpert = backend.gatherRows(dy, rows)
            // ∂L/∂(weight) = ⟨∂L/∂out_r, y_r⟩; the expert sees ∂L/∂out_r · weight.
            backend.accumulateRoutingGradient(outputGradient: dyExpert, expertOutput: tape.value("moe.\(e).y"), rows: rows, slots: slots, into: dWeights)
            backend.scaleRows(dyExpert, by: zip(rows, slots).map { routing.weights[$0 * topK + $1] })
            let dxExpert = mlp.backward(b, dyExpert, tape, into: &grads)
            backend.scatterAddRows(dxExpert, rows: rows, scales: [Float](repeating: 1, count: rows.count), into: dx)
        }
        let dLogits = backend.routerLogitGradient(dWeights, routing: routing, normalize: normalize)
        backend.gemm(dLogits.all, .none, b.tensor(router).all, .none, alpha: 1, beta: 1, into: dx.all)
        return dx
    }
}
