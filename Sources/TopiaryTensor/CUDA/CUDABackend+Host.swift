/// The operations `CUDABackend` runs on the host: its operands are copied to `CPUBackend`
/// tensors, the CPU computes, and results (and tensors written in place) are copied back. They
/// are the small or sequential parts of a run (d x d factorisations, mask selection, SparseGPT's
/// column loop on one 128-column block, the Float64 reductions) and the backward passes; each
/// is exact as the CPU's and costs its transfers.
extension CUDABackend {
    /// The host copy of a device tensor.
    func onHost(_ t: Tensor) -> Tensor { host.upload(download(t)) }
    /// The device copy of a host tensor.
    func onDevice(_ t: Tensor) -> Tensor { upload(host.download(t)) }

    /// Runs `body` on host copies of `tensors`, then copies each back into its device memory.
    func hostInPlace(_ tensors: [Tensor], _ body: (CPUBackend, [Tensor]) -> Void) {
        let copies = tensors.map(onHost)
        body(host, copies)
        for (t, c) in zip(tensors, copies) { overwrite(t, with: host.download(c)) }
    }

    // MARK: Dense linear algebra

    func hostCholesky(_ a: Tensor, upper: Bool, what: String) throws -> Tensor {
        onDevice(try host.cholesky(onHost(a), upper: upper, what: what))
    }

    func hostInverseSPD(_ a: Tensor, what: String) throws -> Tensor {
        onDevice(try host.inverseSPD(onHost(a), what: what))
    }

    public func solveTriangular(_ t: Tensor, _ b: Tensor, upper: Bool, transpose: Bool) -> Tensor {
        onDevice(host.solveTriangular(onHost(t), onHost(b), upper: upper, transpose: transpose))
    }

    public func solveSPDDouble(_ a: Tensor, _ b: Tensor, what: String) throws -> Tensor {
        onDevice(try host.solveSPDDouble(onHost(a), onHost(b), what: what))
    }

    public func inverseSPDDouble(_ a: Tensor, what: String) throws -> Tensor {
        onDevice(try host.inverseSPDDouble(onHost(a), what: what))
    }

    // MARK: Row-scaled updates and Float64 reductions

    public func addScaledRows(_ y: Tensor, _ x: Tensor, scales: [Float]) {
        let hx = onHost(x)
        hostInPlace([y]) { cpu, t in cpu.addScaledRows(t[0], hx, scales: scales) }
    }

    public func rowDots(_ a: Tensor, _ b: Tensor) -> [Double] { host.rowDots(onHost(a), onHost(b)) }
    public func sum(_ x: Tensor) -> Double { host.sum(onHost(x)) }
    public func dot(_ a: Tensor, _ b: Tensor) -> Double { host.dot(onHost(a), onHost(b)) }

    // MARK: Selection for masks

    public func selectAtMostKthSmallest(_ scores: Tensor, k: Int) -> Tensor {
        onDevice(host.selectAtMostKthSmallest(onHost(scores), k: k))
    }

    public func selectSmallestInRows(_ scores: Tensor, counts: [Int]) -> Tensor {
        onDevice(host.selectSmallestInRows(onHost(scores), counts: counts))
    }

    public func selectNOfM(_ scores: Tensor, n: Int, m: Int) -> Tensor {
        onDevice(host.selectNOfM(onHost(scores), n: n, m: m))
    }

    // MARK: SparseGPT, SparseLLM and BESA kernels

    public func zeroDeadInputs(hessian: Tensor, weight: Tensor) {
        hostInPlace([hessian, weight]) { cpu, t in cpu.zeroDeadInputs(hessian: t[0], weight: t[1]) }
    }

    func hostSparseGPTBlock(weight: Tensor, inverseFactor: Tensor, mask: Tensor, nOfM: (n: Int, m: Int)?, error: Tensor) -> Double {
        let factor = onHost(inverseFactor)
        var loss = 0.0
        hostInPlace([weight, mask, error]) { cpu, t in
            loss = cpu.sparseGPTBlock(weight: t[0], inverseFactor: factor, mask: t[1], nOfM: nOfM, error: t[2])
        }
        return loss
    }

    public func sparseLLMLlamaZ(_ z: Tensor, m: Tensor, sigma: Tensor, p: Tensor, alpha: Float, gamma: Float) {
        let (hm, hs, hp) = (onHost(m), onHost(sigma), onHost(p))
        hostInPlace([z]) { cpu, t in cpu.sparseLLMLlamaZ(t[0], m: hm, sigma: hs, p: hp, alpha: alpha, gamma: gamma) }
    }

    public func sparseLLMOPTZ(_ z: Tensor, m: Tensor, p: Tensor, alpha: Float, gamma: Float) {
        let (hm, hp) = (onHost(m), onHost(p))
        hostInPlace([z]) { cpu, t in cpu.sparseLLMOPTZ(t[0], m: hm, p: hp, alpha: alpha, gamma: gamma) }
    }

    public func sparseLLMGate(_ s: Tensor, g: Tensor, z: Tensor, p: Tensor, alpha: Float, gamma: Float, steps: Int,
                              activation: GatedActivation) {
        let (hg, hz, hp) = (onHost(g), onHost(z), onHost(p))
        hostInPlace([s]) { cpu, t in
            cpu.sparseLLMGate(t[0], g: hg, z: hz, p: hp, alpha: alpha, gamma: gamma, steps: steps, activation: activation)
        }
    }

    public func rankRows(_ scores: Tensor) -> Tensor { onDevice(host.rankRows(onHost(scores))) }

    public func rankedMask(order: Tensor, counts: [Int]) -> Tensor { onDevice(host.rankedMask(order: onHost(order), counts: counts)) }

    public func rankedPrefixSums(_ gradient: Tensor, _ weight: Tensor, order: Tensor, at counts: [Int]) -> [Double] {
        host.rankedPrefixSums(onHost(gradient), onHost(weight), order: onHost(order), at: counts)
    }

    public func channelNormalizedError(target: Tensor, prediction: Tensor) -> (loss: Double, gradient: Tensor) {
        let r = host.channelNormalizedError(target: onHost(target), prediction: onHost(prediction))
        return (r.loss, onDevice(r.gradient))
    }

    // MARK: Model kernels without device code yet (OPT's LayerNorm, the backward passes, MoE routing)

    public func layerNorm(_ x: Tensor, weight: Tensor, bias: Tensor?, eps: Float) -> Tensor {
        onDevice(host.layerNorm(onHost(x), weight: onHost(weight), bias: bias.map(onHost), eps: eps))
    }

    public func rmsNormBackward(input: Tensor, weight: Tensor, eps: Float, outputGradient: Tensor) -> Tensor {
        onDevice(host.rmsNormBackward(input: onHost(input), weight: onHost(weight), eps: eps, outputGradient: onHost(outputGradient)))
    }

    public func layerNormBackward(input: Tensor, weight: Tensor, eps: Float, outputGradient: Tensor) -> Tensor {
        onDevice(host.layerNormBackward(input: onHost(input), weight: onHost(weight), eps: eps, outputGradient: onHost(outputGradient)))
    }

    public func attentionBackward(q: Tensor, k: Tensor, v: Tensor, outputGradient: Tensor, shape: AttentionShape,
                                  options: AttentionOptions) -> (dq: Tensor, dk: Tensor, dv: Tensor) {
        let r = host.attentionBackward(q: onHost(q), k: onHost(k), v: onHost(v), outputGradient: onHost(outputGradient),
                                       shape: shape, options: options)
        return (onDevice(r.dq), onDevice(r.dk), onDevice(r.dv))
    }

    public func gatedActivationBackward(_ outputGradient: Tensor, gate: Tensor, up: Tensor,
                                        _ activation: GatedActivation) -> (gate: Tensor, up: Tensor) {
        let r = host.gatedActivationBackward(onHost(outputGradient), gate: onHost(gate), up: onHost(up), activation)
        return (onDevice(r.gate), onDevice(r.up))
    }

    public func route(_ logits: Tensor, topK: Int, normalize: Bool) -> Routing {
        let r = host.route(onHost(logits), topK: topK, normalize: normalize)
        return Routing(topK: r.topK, chosen: r.chosen, weights: r.weights, probabilities: onDevice(r.probabilities))
    }

    public func gatherRows(_ x: Tensor, _ rows: [Int]) -> Tensor { onDevice(host.gatherRows(onHost(x), rows)) }

    public func scatterAddRows(_ x: Tensor, rows: [Int], scales: [Float], into out: Tensor) {
        let hx = onHost(x)
        hostInPlace([out]) { cpu, t in cpu.scatterAddRows(hx, rows: rows, scales: scales, into: t[0]) }
    }

    public func scaleRows(_ x: Tensor, by scales: [Float]) {
        hostInPlace([x]) { cpu, t in cpu.scaleRows(t[0], by: scales) }
    }

    public func accumulateRoutingGradient(outputGradient: Tensor, expertOutput: Tensor, rows: [Int], slots: [Int], into dWeights: Tensor) {
        let (hg, he) = (onHost(outputGradient), onHost(expertOutput))
        hostInPlace([dWeights]) { cpu, t in cpu.accumulateRoutingGradient(outputGradient: hg, expertOutput: he, rows: rows, slots: slots, into: t[0]) }
    }

    public func routerLogitGradient(_ dWeights: Tensor, routing: Routing, normalize: Bool) -> Tensor {
        let hostRouting = Routing(topK: routing.topK, chosen: routing.chosen, weights: routing.weights, probabilities: onHost(routing.probabilities))
        return onDevice(host.routerLogitGradient(onHost(dWeights), routing: hostRouting, normalize: normalize))
    }
}
