import Foundation
import TopiaryTensor

/// SparseLLM (Bai et al. 2024, arXiv 2402.17946): prunes the linear layers of one feed-forward
/// network jointly, through auxiliary variables for the pre-activations (z, and s for LLaMA's
/// gate) and the activation p, alternating exact block-coordinate updates with SparseGPT as the
/// inner sparse solver. A pure function of matrices: rows are tokens, columns features.
///
/// LLaMA:  J = α‖s − X W_gᵀ‖² + α‖z − X W_uᵀ‖² + β‖Y − p W_dᵀ‖² + γ‖p − act(s)⊙z‖²
/// OPT:    J = α‖z − (X W_1ᵀ + b_1)‖² + β‖Y − (p W_2ᵀ + b_2)‖² + γ‖p − ReLU(z)‖²
///
/// Each step minimises J over one group of variables with the others fixed:
/// - W (each linear): refit to its current target by ridge-regularised least squares (normal
///   equations in fp64), then SparseGPT against the matching Gram matrix with a fresh mask.
///   "Refit, then SparseGPT" is SparseGPT with the auxiliary as target. The new weights are kept
///   only if they do not raise their term of J, so no step increases the objective.
/// - p: (β Y W_d + γ·act)(β W_dᵀW_d + γI)⁻¹, exactly, as act + (Y − act·W_dᵀ)(γ/β·I + W_dW_dᵀ)⁻¹W_d
///   (Woodbury; the small inverse in fp64).
/// - z: LLaMA (α m + γ σ p)/(α + γ σ²) with σ = act(s), exact for any α, γ; OPT the ReLU case split.
/// - s (LLaMA): per element, safeguarded Newton steps on α(s − g)² + γ(p − act(s) z)², each
///   accepted only if it lowers that element's term (for a ReLU gate, the exact minimiser).
///
/// act is the gated feed-forward's own activation: SiLU for LLaMA and most families, GELU-tanh
/// for Gemma-2, ReLU where a config says so; `pruneLlama` takes it (SiLU unless given).
///
/// The weights returned are those of the iteration whose pruned FFN reproduces the dense FFN's
/// output on the calibration inputs best, ‖Y − FFN_Ŵ(X)‖²: lowering J does not always lower that
/// error (the auxiliaries drift from the activations the pruned weights produce), and the first
/// iteration is plain SparseGPT, so the result is never worse than SparseGPT on this measure.
///
/// Everything runs on a `ComputeBackend`: the host-matrix entry points upload the FFN's input
/// and weights, and download the chosen weights, and nothing crosses in between.
public enum SparseLLM {
    public struct Options: Sendable, Equatable, Codable {
        public var alpha: Double
        public var beta: Double
        public var gamma: Double
        public var iterations: Int
        /// Ridge of the normal equations, relative to the mean diagonal of the Gram matrix.
        public var ridge: Double = 1e-4
        /// Newton steps per element in the s update.
        public var newtonSteps: Int = 4

        public init(alpha: Double, beta: Double, gamma: Double, iterations: Int = 4) {
            self.alpha = alpha
            self.beta = beta
            self.gamma = gamma
            self.iterations = iterations
        }

        /// The reference's defaults: 5 for LLaMA, 0.1 for OPT.
        public static let llama = Options(alpha: 5, beta: 5, gamma: 5)
        public static let opt = Options(alpha: 0.1, beta: 0.1, gamma: 0.1)
    }

    /// One outer iteration: the objective (and its terms, per token) right after its weight step,
    /// and the FFN's output error ‖Y − FFN_Ŵ(X)‖² / ‖Y‖² with those weights.
    public struct IterationReport: Sendable, Codable, Equatable {
        public var iteration: Int
        public var objective: Double
        public var terms: [Double]
        public var outputError: Double
        /// Which weight updates were kept (a refit+prune that raised its term is not).
        public var accepted: [Bool]
    }

    /// Gram matrices a caller already holds, so that the solve does not make them again: the
    /// FFN input's XᵀX and the dense activation's pᵀp (what the first iteration's down_proj or
    /// fc2 step reads). `BlockPruner` passes the block's input statistics
    /// (`LayerStatistics.gram`), which its dense pass made from the same inputs: at LLaMA-2-7B's
    /// width the first pᵀp alone is about a seventh of one iteration's products (f²n, against
    /// 2ndf for each of the others).
    ///
    /// The activation's is made when the first iteration's down_proj step reads it, not before:
    /// it is the largest (ffn x ffn; 485 MB at LLaMA-2-7B's width), and the gate and up steps
    /// before it have their own temporaries.
    public struct Grams {
        public var input: Tensor
        public var activation: () -> Tensor
        public init(input: Tensor, activation: @escaping () -> Tensor) {
            self.input = input
            self.activation = activation
        }
        public init(input: Tensor, activation: Tensor) { self.init(input: input, activation: { activation }) }
    }

    public struct LlamaResult: Sendable {
        public var gate: Matrix, up: Matrix, down: Matrix
        public var iterations: [IterationReport]
        /// The iteration whose weights are returned (1-based).
        public var chosen: Int
    }

    public struct OPTResult: Sendable {
        public var fc1: Matrix, fc2: Matrix
        public var iterations: [IterationReport]
        public var chosen: Int
    }

    // MARK: LLaMA

    /// Prunes gate [f x d], up [f x d], down [d x f] given the FFN input x [N x d], on `backend`.
    public static func pruneLlama(x: Matrix, gate: Matrix, up: Matrix, down: Matrix, pattern: SparsityPattern,
                                  sparseGPT: SparseGPTPruner.Options = .init(), options: Options = .llama,
                                  activation: GatedActivation = .silu, what: String = "ffn",
                                  backend: any ComputeBackend = CPUBackend()) throws -> LlamaResult {
        let r = try pruneLlama(x: backend.upload(x), gate: backend.upload(gate), up: backend.upload(up), down: backend.upload(down),
                               pattern: pattern, sparseGPT: sparseGPT, options: options, activation: activation, what: what,
                               on: backend)
        return LlamaResult(gate: backend.download(r.gate), up: backend.download(r.up), down: backend.download(r.down),
                           iterations: r.iterations, chosen: r.chosen)
    }

    /// The dense feed-forward's products over the same row chunks as the input: s = X·W_gᵀ,
    /// z = X·W_uᵀ, p = act(s)⊙z and y = p·W_dᵀ. `BlockPruner` keeps them from its dense pass
    /// (`FeedForwardProducts`, made window by window from the very inputs the solve gets, with
    /// the bits of `windowProducts`), so that the solve does not make them again: three
    /// [N x d]·[d x f] products, about 8% of SmolLM2's solve at four iterations. The solve
    /// updates s, z and p in place.
    public struct DenseProducts {
        public var gate: [Tensor]
        public var up: [Tensor]
        public var activation: [Tensor]
        public var output: [Tensor]
        public init(gate: [Tensor], up: [Tensor], activation: [Tensor], output: [Tensor]) {
            (self.gate, self.up, self.activation, self.output) = (gate, up, activation, output)
        }

        /// One window's s, z, p and y.
        public struct Window {
            public var gate: Tensor
            public var up: Tensor
            public var activation: Tensor
            public var output: Tensor
            public init(gate: Tensor, up: Tensor, activation: Tensor, output: Tensor) {
                (self.gate, self.up, self.activation, self.output) = (gate, up, activation, output)
            }
        }

        /// Gathers windows' products, in window order, straight into the row chunks that
        /// `rowChunks(consuming:)` cuts from the windows' inputs: each window is copied as it comes,
        /// so its buffers go back at once and the next window takes them. (Held as windows until
        /// the solve, SmolLM2's 3 MiB window buffers were mapped afresh at every block: 2.5 times
        /// the page faults.)
        public final class Builder {
            let tokens: Int, rows: Int
            let backend: any ComputeBackend
            private var lists: [[Tensor]] = [[], [], [], []]
            private var filled = 0
            private var problem: String?

            /// For `tokens` rows in all, cut every `rows`.
            public init(tokens: Int, rows: Int = SparseLLM.chunkRows, on backend: any ComputeBackend) {
                precondition(tokens >= 0 && rows > 0, "DenseProducts.Builder: \(tokens) tokens in chunks of \(rows)")
                (self.tokens, self.rows, self.backend) = (tokens, rows, backend)
            }

            /// Copies the next window's products in (a window that does not fit is reported by `finish`).
            public func append(_ w: Window) {
                guard problem == nil else { return }
                let parts = [w.gate, w.up, w.activation, w.output]
                let widths = lists.map { $0.first?.cols }
                guard parts.allSatisfy({ $0.rows == w.gate.rows }), zip(parts, widths).allSatisfy({ $1 == nil || $0.cols == $1 }) else {
                    problem = "window \(filled) rows in: products of \(parts.map { "\($0.rows)x\($0.cols)" }) after widths \(widths.map { $0 ?? 0 })"
                    return
                }
                guard filled + w.gate.rows <= tokens else {
                    problem = "dense products for more than \(tokens) tokens"
                    return
                }
                var offset = 0
                while offset < w.gate.rows {
                    let (chunk, within) = (filled / rows, filled % rows)
                    if within == 0 {
                        for i in 0..<4 { lists[i].append(backend.zeros(rows: min(rows, tokens - filled), cols: parts[i].cols)) }
                    }
                    let n = min(w.gate.rows - offset, lists[0][chunk].rows - within)
                    for i in 0..<4 {
                        backend.copy(parts[i].region(rows: offset..<offset + n), into: lists[i][chunk].region(rows: within..<within + n))
                    }
                    offset += n
                    filled += n
                }
            }

            /// The chunks, once every token's products are in; the builder lets go of them (the
            /// solve's p step replaces p's chunks, which would otherwise stay held here).
            public func finish(what: String) throws -> DenseProducts {
                defer { lists = [[], [], [], []] }
                if let problem { throw PruneError.shape("\(what): \(problem)") }
                guard filled == tokens else { throw PruneError.shape("\(what): dense products for \(filled) of \(tokens) tokens") }
                return DenseProducts(gate: lists[0], up: lists[1], activation: lists[2], output: lists[3])
            }
        }

        /// Every list has one tensor per input chunk with its rows, as wide as the layer's output.
        func check(inputs xs: [Tensor], ffn: Int, width: Int, what: String) throws {
            for (name, list, cols) in [("gate", gate, ffn), ("up", up, ffn), ("activation", activation, ffn), ("output", output, width)] {
                guard list.count == xs.count else {
                    throw PruneError.shape("\(what): the dense \(name) products come in \(list.count) chunks, the input in \(xs.count)")
                }
                for (i, (t, x)) in zip(list, xs).enumerated() where t.rows != x.rows || t.cols != cols {
                    throw PruneError.shape("\(what): dense \(name) chunk \(i) is \(t.rows)x\(t.cols), expected \(x.rows)x\(cols)")
                }
            }
        }
    }

    /// The dense products of one window's feed-forward input x: the solve's model of the FFN
    /// (act, no biases), product by product as the block's dense pass makes them.
    public static func windowProducts(_ x: Tensor, gate: Tensor, up: Tensor, down: Tensor, activation: GatedActivation,
                                      on backend: any ComputeBackend) -> DenseProducts.Window {
        let s = linear(x, gate, on: backend), z = linear(x, up, on: backend)
        let p = backend.gatedActivation(gate: s, up: z, activation)
        return DenseProducts.Window(gate: s, up: z, activation: p, output: linear(p, down, on: backend))
    }

    /// `pruneLlama` on tensors of `backend`; the pruned weights stay there.
    ///
    /// The auxiliaries s, z, p and the targets are kept as chunks of `chunkRows` token rows, and
    /// every per-token step (the pre-activations of the pruned linears, the terms of J, the
    /// output error, the p, z and s updates) runs one chunk at a time: besides the auxiliaries
    /// only one chunk's temporaries are alive, instead of eight or more [tokens x ffn] tensors.
    /// Sums over tokens add the chunks' sums in chunk order; the chunks are fixed by the token
    /// count alone, so the result does not depend on the thread count.
    public static func pruneLlama(x: Tensor, gate: Tensor, up: Tensor, down: Tensor, pattern: SparsityPattern,
                                  sparseGPT: SparseGPTPruner.Options = .init(), options: Options = .llama,
                                  grams: Grams? = nil, activation: GatedActivation = .silu, what: String = "ffn",
                                  chunkRows: Int = chunkRows, on backend: any ComputeBackend) throws
        -> (gate: Tensor, up: Tensor, down: Tensor, iterations: [IterationReport], chosen: Int) {
        try pruneLlama(chunks: rowChunks(x, rows: chunkRows, on: backend), gate: gate, up: up, down: down, pattern: pattern,
                       sparseGPT: sparseGPT, options: options, grams: grams, activation: activation, what: what, on: backend)
    }

    /// `pruneLlama` given the FFN input already cut into row chunks (`rowChunks`; the result
    /// depends on where the cuts are, as the sums over tokens add the chunks' sums in order).
    /// `BlockPruner` cuts them from the windows' inputs (`rowChunks(consuming:)`), so the input
    /// is held once, not also as its windows and their concatenation.
    public static func pruneLlama(chunks xs: [Tensor], gate: Tensor, up: Tensor, down: Tensor, pattern: SparsityPattern,
                                  sparseGPT: SparseGPTPruner.Options = .init(), options: Options = .llama,
                                  grams known: Grams? = nil, products dense: consuming DenseProducts? = nil,
                                  activation act: GatedActivation = .silu, what: String = "ffn", on backend: any ComputeBackend) throws
        -> (gate: Tensor, up: Tensor, down: Tensor, iterations: [IterationReport], chosen: Int) {
        guard let first = xs.first, xs.allSatisfy({ $0.cols == first.cols }) else {
            throw PruneError.shape("\(what): SparseLLM needs the FFN input as row chunks of one width, got widths \(xs.map(\.cols))")
        }
        let tokens = xs.reduce(0) { $0 + $1.rows }
        let (a, b, c) = (Float(options.alpha), Float(options.beta), Float(options.gamma))
        let gramX = try inputGram(known, width: first.cols, what: what) { gram(xs, on: backend) }
        // gate and up read x at every iteration: one factorisation of XᵀX for all their SparseGPT steps.
        let factorX = try SparseGPTPruner.sharedFactor(gramX, options: sparseGPT, what: "\(what): gate_proj/up_proj", on: backend)
        let s: [Tensor], z: [Tensor], y: [Tensor]
        var p: [Tensor]
        // Taken out of `dense`, so that p's chunks go once the p step replaces them.
        if let given = dense.take() {
            try given.check(inputs: xs, ffn: gate.rows, width: down.rows, what: what)
            (s, z, p, y) = (given.gate, given.up, given.activation, given.output)
        } else {
            let made = xs.map { windowProducts($0, gate: gate, up: up, down: down, activation: act, on: backend) }
            (s, z, p, y) = (made.map(\.gate), made.map(\.up), made.map(\.activation), made.map(\.output))
        }
        let yNorm = y.reduce(0) { $0 + backend.dot($1, $1) }
        var (wg, wu, wd) = (gate, up, down)
        var reports: [IterationReport] = []
        var best: (error: Double, iteration: Int, gate: Tensor, up: Tensor, down: Tensor)?
        for t in 0..<options.iterations {
            let step = "\(what), iteration \(t + 1)"
            // W steps.
            let ku = try weightStep(current: wu, dense: up, first: t == 0, inputs: xs, gram: gramX, targets: z, bias: nil,
                                    pattern: pattern, sparseGPT: sparseGPT, ridge: options.ridge, factor: factorX,
                                    what: "\(step): up_proj", on: backend)
            wu = ku.weight
            let kg = try weightStep(current: wg, dense: gate, first: t == 0, inputs: xs, gram: gramX, targets: s, bias: nil,
                                    pattern: pattern, sparseGPT: sparseGPT, ridge: options.ridge, factor: factorX,
                                    what: "\(step): gate_proj", on: backend)
            wg = kg.weight
            let gramP = try activationGram(t == 0 ? known : nil, width: gate.rows, what: what) { gram(p, on: backend) }
            let kd = try weightStep(current: wd, dense: down, first: t == 0, inputs: p, gram: gramP, targets: y, bias: nil,
                                    pattern: pattern, sparseGPT: sparseGPT, ridge: options.ridge, what: "\(step): down_proj", on: backend)
            wd = kd.weight
            // ‖y − p·Wdᵀ‖²: from the weight step's normal-equation terms when it has them; at the
            // first iteration p is the dense activation and y = p·W_denseᵀ, so it is
            // tr(ΔW·(pᵀp)·ΔWᵀ) with ΔW = W_dense − Wd (f² per output row instead of a pass over the tokens).
            let fit: Double
            if let residual = kd.residual {
                fit = max(0, yNorm + residual)
            } else {
                let change = backend.copy(down)
                backend.axpy(-1, wd, change)
                fit = quadratic(change, gramP, on: backend)
            }
            // After the last weight step the auxiliaries would never be used again.
            let last = t == options.iterations - 1
            let inverse = last ? nil : try activationInverse(w: wd, beta: b, gamma: c, what: "\(step): p update", on: backend)
            // One pass over the chunks: J's terms right after the weight step and the error
            // that decides which weights are kept (both with the auxiliaries before this
            // iteration's updates), then the p, z and s updates of the chunk.
            var sums = (gate: 0.0, up: 0.0, product: 0.0, error: 0.0)
            for i in xs.indices {
                let m = linear(xs[i], wu, on: backend)
                let g = linear(xs[i], wg, on: backend)
                // act(s), act(s)⊙z, act(g)⊙m and the three distances in one pass over the chunk.
                let pass = backend.sparseLLMLlamaPass(s: s[i], z: z[i], p: p[i], g: g, m: m, activation: act)
                let (sigma, activation, gated) = (pass.sigma, pass.activation, pass.gated)
                sums.gate += pass.gateDistance
                sums.up += pass.upDistance
                sums.product += pass.productDistance
                sums.error += backend.chunkedSquaredDistance(y[i], linear(gated, wd, on: backend))
                guard let inverse else { continue }
                // p step: the activation that down_proj reads.
                p[i] = try activationUpdate(y: y[i], bias: nil, w: wd, act: activation, inverse: inverse,
                                            beta: b, gamma: c, what: "\(step): p update", on: backend)
                // z step (up_proj output), exact for any α, γ.
                backend.sparseLLMLlamaZ(z[i], m: m, sigma: sigma, p: p[i], alpha: a, gamma: c)
                try checkFinite(z[i], "\(step): z update", on: backend)
                // s step (gate_proj output): safeguarded Newton per element.
                backend.sparseLLMGate(s[i], g: g, z: z[i], p: p[i], alpha: a, gamma: c, steps: options.newtonSteps, activation: act)
                try checkFinite(s[i], "\(step): s update", on: backend)
            }
            let terms = [Double(a) * sums.gate, Double(a) * sums.up, Double(b) * fit, Double(c) * sums.product]
                .map { $0 / Double(tokens) }
            let error = sums.error / max(yNorm, .leastNormalMagnitude)
            reports.append(IterationReport(iteration: t + 1, objective: terms.reduce(0, +), terms: terms,
                                           outputError: error, accepted: [ku.accepted, kg.accepted, kd.accepted]))
            if best == nil || error < best!.error { best = (error, t + 1, wg, wu, wd) }
        }
        let chosen = best!
        return (chosen.gate, chosen.up, chosen.down, reports, chosen.iteration)
    }

    // MARK: OPT

    /// Prunes fc1 [f x d] (+ bias b1) and fc2 [d x f] (+ bias b2) given the FFN input x [N x d], on `backend`.
    public static func pruneOPT(x: Matrix, fc1: Matrix, bias1: Matrix, fc2: Matrix, bias2: Matrix, pattern: SparsityPattern,
                                sparseGPT: SparseGPTPruner.Options = .init(), options: Options = .opt,
                                what: String = "ffn", backend: any ComputeBackend = CPUBackend()) throws -> OPTResult {
        let r = try pruneOPT(x: backend.upload(x), fc1: backend.upload(fc1), bias1: backend.upload(bias1), fc2: backend.upload(fc2),
                             bias2: backend.upload(bias2), pattern: pattern, sparseGPT: sparseGPT, options: options, what: what, on: backend)
        return OPTResult(fc1: backend.download(r.fc1), fc2: backend.download(r.fc2), iterations: r.iterations, chosen: r.chosen)
    }

    /// `pruneOPT` on tensors of `backend`; the pruned weights stay there.
    public static func pruneOPT(x: Tensor, fc1: Tensor, bias1: Tensor, fc2: Tensor, bias2: Tensor, pattern: SparsityPattern,
                                sparseGPT: SparseGPTPruner.Options = .init(), options: Options = .opt,
                                grams known: Grams? = nil, what: String = "ffn", on backend: any ComputeBackend) throws
        -> (fc1: Tensor, fc2: Tensor, iterations: [IterationReport], chosen: Int) {
        let (a, b, c) = (Float(options.alpha), Float(options.beta), Float(options.gamma))
        let gramX = try inputGram(known, width: x.cols, what: what) { gram([x], on: backend) }
        let factorX = try SparseGPTPruner.sharedFactor(gramX, options: sparseGPT, what: "\(what): fc1", on: backend)
        let z = backend.addRowVector(linear(x, fc1, on: backend), bias1)
        var p = backend.map(z, .relu)
        let y = backend.addRowVector(linear(p, fc2, on: backend), bias2)
        var (w1, w2) = (fc1, fc2)
        var reports: [IterationReport] = []
        var best: (error: Double, iteration: Int, fc1: Tensor, fc2: Tensor)?
        for t in 0..<options.iterations {
            let step = "\(what), iteration \(t + 1)"
            let k1 = try weightStep(current: w1, dense: fc1, first: t == 0, inputs: [x], gram: gramX, targets: [z], bias: bias1,
                                    pattern: pattern, sparseGPT: sparseGPT, ridge: options.ridge, factor: factorX,
                                    what: "\(step): fc1", on: backend)
            w1 = k1.weight
            let gramP = try activationGram(t == 0 ? known : nil, width: fc1.rows, what: what) { gram([p], on: backend) }
            let k2 = try weightStep(current: w2, dense: fc2, first: t == 0, inputs: [p], gram: gramP, targets: [y], bias: bias2,
                                    pattern: pattern, sparseGPT: sparseGPT, ridge: options.ridge, what: "\(step): fc2", on: backend)
            w2 = k2.weight
            let m = backend.addRowVector(linear(x, w1, on: backend), bias1)
            let terms = [
                Double(a) * backend.chunkedSquaredDistance(z, m),
                Double(b) * backend.chunkedSquaredDistance(y, backend.addRowVector(linear(p, w2, on: backend), bias2)),
                Double(c) * backend.chunkedSquaredDistance(p, backend.map(z, .relu)),
            ].map { $0 / Double(x.rows) }
            let error = backend.chunkedSquaredDistance(y, backend.addRowVector(linear(backend.map(m, .relu), w2, on: backend), bias2))
                / max(backend.dot(y, y), .leastNormalMagnitude)
            reports.append(IterationReport(iteration: t + 1, objective: terms.reduce(0, +), terms: terms,
                                           outputError: error, accepted: [k1.accepted, k2.accepted]))
            if best == nil || error < best!.error { best = (error, t + 1, w1, w2) }
            if t == options.iterations - 1 { break }
            let inverse = try activationInverse(w: w2, beta: b, gamma: c, what: "\(step): p update", on: backend)
            p = try activationUpdate(y: y, bias: bias2, w: w2, act: backend.map(z, .relu), inverse: inverse, beta: b, gamma: c,
                                     what: "\(step): p update", on: backend)
            // z step: the better of the two ReLU branches, element by element.
            backend.sparseLLMOPTZ(z, m: m, p: p, alpha: a, gamma: c)
            try checkFinite(z, "\(step): z update", on: backend)
        }
        let chosen = best!
        return (chosen.fc1, chosen.fc2, reports, chosen.iteration)
    }

    // MARK: FLOPs

    /// FLOPs of one solve (`prune --profile`), counted from the shapes the way the rest of the
    /// profile counts them: its own products, Gram matrices, solves and inverses (`products`:
    /// what `CheckingBackend` records as gemm, syrkAccumulate, solveSPDDouble and
    /// inverseSPDDouble), and its SparseGPT solves as `BlockProfile.sparseGPTFLOPs` costs them
    /// (`sparseGPT`). The element-wise steps (activations, the z and s updates, the distances)
    /// are not counted, as in the forward's count. `tokens` x `width` is the FFN's input and
    /// `intermediate` its hidden width.
    public static func llamaFLOPs(tokens: Int, width: Int, intermediate: Int, iterations: Int, gramsGiven: Bool = false,
                                  productsGiven: Bool = false) -> (products: Double, sparseGPT: Double) {
        let (n, d, f) = (Double(tokens), Double(width), Double(intermediate))
        let ndf = 2 * n * d * f                                      // one [N x d]·[d x f] product
        // XᵀX (unless given); s = X·W_gᵀ, z = X·W_uᵀ, y = p·W_dᵀ (unless given).
        var products = (gramsGiven ? 0 : d * (d + 1) * n) + (productsGiven ? 0 : 3 * ndf)
        var sparseGPT = BlockProfile.sparseGPTFLOPs(rows: 0, cols: width)   // the factor gate and up share
        for t in 0..<iterations {
            let (first, last) = (t == 0, t == iterations - 1)
            // gate and up: SparseGPT of the dense weight, then of the refit (cross product, the
            // normal equations in fp64, the two residuals' quadratic forms) with the shared factor.
            sparseGPT += 2 * BlockProfile.sparseGPTFLOPs(rows: intermediate, cols: width, factored: false)
            if !first { products += 2 * (ndf + d * d * d / 3 + 2 * d * d * f + 2 * 2 * f * d * d) }
            // pᵀp (at the first iteration, unless given), and down: SparseGPT with its own factor;
            // the refit as above, or at the first iteration the fit's quadratic form in pᵀp.
            if !(first && gramsGiven) { products += f * (f + 1) * n }
            sparseGPT += BlockProfile.sparseGPTFLOPs(rows: width, cols: intermediate)
            products += first ? 2 * d * f * f : ndf + f * f * f / 3 + 2 * f * f * d + 2 * 2 * d * f * f
            // The pass over the chunks: X·W_uᵀ, X·W_gᵀ and the pruned FFN's output; then, but for
            // the last iteration, the p step (W_d·W_dᵀ, its fp64 inverse, act·W_dᵀ, ·K, ·W_d).
            products += 3 * ndf
            if !last { products += 2 * d * d * f + d * d * d + 2 * ndf + 2 * n * d * d }
        }
        return (products, sparseGPT)
    }

    /// `llamaFLOPs` for OPT's FFN (fc1, ReLU, fc2, with biases).
    public static func optFLOPs(tokens: Int, width: Int, intermediate: Int, iterations: Int, gramsGiven: Bool = false)
        -> (products: Double, sparseGPT: Double) {
        let (n, d, f) = (Double(tokens), Double(width), Double(intermediate))
        let ndf = 2 * n * d * f
        // XᵀX (unless given); z = X·W_1ᵀ + b_1, y = p·W_2ᵀ + b_2.
        var products = (gramsGiven ? 0 : d * (d + 1) * n) + 2 * ndf
        var sparseGPT = BlockProfile.sparseGPTFLOPs(rows: 0, cols: width)
        for t in 0..<iterations {
            let (first, last) = (t == 0, t == iterations - 1)
            sparseGPT += BlockProfile.sparseGPTFLOPs(rows: intermediate, cols: width, factored: false)
            if !first { products += ndf + d * d * d / 3 + 2 * d * d * f + 2 * 2 * f * d * d }
            if !(first && gramsGiven) { products += f * (f + 1) * n } // pᵀp, made afresh each iteration
            sparseGPT += BlockProfile.sparseGPTFLOPs(rows: width, cols: intermediate)
            if !first { products += ndf + f * f * f / 3 + 2 * f * f * d + 2 * 2 * d * f * f }
            // X·W_1ᵀ, p·W_2ᵀ for the objective, the pruned FFN's output; the p step but at the end.
            products += 3 * ndf
            if !last { products += 2 * d * d * f + d * d * d + 2 * ndf + 2 * n * d * d }
        }
        return (products, sparseGPT)
    }

    // MARK: steps

    /// The weight step for one linear y ≈ input·Wᵀ (+ bias) with target `target`, both given as
    /// the same row chunks: at the first iteration SparseGPT of the dense weight; later,
    /// SparseGPT of the least-squares refit, kept only if ‖target − input·Wᵀ − bias‖² does not rise.
    static func weightStep(current: Tensor, dense: Tensor, first: Bool, inputs: [Tensor], gram g: Tensor, targets: [Tensor],
                           bias: Tensor?, pattern: SparsityPattern, sparseGPT: SparseGPTPruner.Options, ridge: Double,
                           factor: SparseGPTPruner.Factor? = nil,
                           what: String, on backend: any ComputeBackend) throws -> (weight: Tensor, accepted: Bool, residual: Double?) {
        if first {
            let w = try SparseGPTPruner.prune(dense, hessian: g, pattern: pattern, options: sparseGPT, what: what, factor: factor,
                                              on: backend).weight
            return (w, true, nil)
        }
        // Normal equations: W (XᵀX + λI) = targetᵀX, the cross product summed over the chunks in order.
        let cross = backend.zeros(rows: dense.rows, cols: dense.cols)             // [out x in]
        let negated = bias.map { backend.map($0, .negate) }
        for (input, target) in zip(inputs, targets) {
            let shifted = negated.map { backend.addRowVector(target, $0) } ?? target
            backend.gemm(shifted.all, .transposed, input.all, .none, alpha: 1, beta: 1, into: cross.all)
        }
        let damped = backend.copy(g)
        backend.addToDiagonal(damped, Float(ridge * meanDiagonal(g, on: backend)))
        let refit: Tensor
        do { refit = try backend.solveSPDDoubleRight(damped, cross, what: "\(what): refit") } catch {
            throw PruneError.numerical("\(error)")
        }
        try checkFinite(refit, "\(what): refit", on: backend)
        let candidate = try SparseGPTPruner.prune(refit, hessian: g, pattern: pattern, options: sparseGPT, what: what, factor: factor,
                                                  on: backend).weight
        // ‖T − XWᵀ‖² = ‖T‖² − 2⟨W, TᵀX⟩ + tr(W G Wᵀ): compare without forming XWᵀ.
        // (‖T − XWᵀ‖² − ‖T‖², returned for the caller's objective.)
        func residual(_ w: Tensor) -> Double { quadratic(w, g, on: backend) - 2 * backend.chunkedDot(w, cross) }
        let (new, old) = (residual(candidate), residual(current))
        if new <= old { return (candidate, true, new) }
        return (current, false, old)
    }

    /// K = (γ/β·I + WWᵀ)⁻¹ [out x out] for the p step (W [out x f] is down_proj or fc2, out < f),
    /// inverted in fp64.
    static func activationInverse(w: Tensor, beta: Float, gamma: Float, what: String, on backend: any ComputeBackend) throws -> Tensor {
        let system = backend.matmul(w, .none, w, .transposed)                    // [out x out]
        backend.addToDiagonal(system, gamma / beta)
        do { return try backend.inverseSPDDouble(system, what: "\(what)") } catch { throw PruneError.numerical("\(error)") }
    }

    /// The p step for some token rows: p = argmin β‖(Y − b) − pWᵀ‖² + γ‖p − act‖²
    /// = (β(Y − b)W + γ·act)(βWᵀW + γI)⁻¹, computed as act + ((Y − b) − act·Wᵀ)·K·W with
    /// `inverse` = K (`activationInverse`; Woodbury's identity, the same minimiser): three
    /// products through the layer's narrow side (out < f) instead of one through an f x f inverse,
    /// 35% fewer FLOPs at LLaMA's shapes and an out x out inverse instead of f x f. `act` is
    /// overwritten with p.
    static func activationUpdate(y: Tensor, bias: Tensor?, w: Tensor, act: Tensor, inverse: Tensor, beta: Float, gamma: Float,
                                 what: String, on backend: any ComputeBackend) throws -> Tensor {
        let residual = bias.map { backend.addRowVector(y, backend.map($0, .negate)) } ?? backend.copy(y)
        backend.gemm(act.all, .none, w.all, .transposed, alpha: -1, beta: 1, into: residual.all)   // (Y − b) − act·Wᵀ
        let coefficients = backend.matmul(residual, inverse)                   // [N x out]
        backend.gemm(coefficients.all, .none, w.all, .none, alpha: 1, beta: 1, into: act.all)      // act + E·K·W
        try checkFinite(act, what, on: backend)
        return act
    }

    // MARK: small helpers over tensors

    /// x · Wᵀ: a linear layer's output for inputs x [tokens x in] and weight W [out x in].
    static func linear(_ x: Tensor, _ w: Tensor, on backend: any ComputeBackend) -> Tensor {
        backend.matmul(x, .none, w, .transposed)
    }

    /// XᵀX over row chunks of X, added chunk by chunk in order.
    static func gram(_ chunks: [Tensor], on backend: any ComputeBackend) -> Tensor {
        let g = backend.zeros(rows: chunks[0].cols, cols: chunks[0].cols)
        for x in chunks { backend.syrkAccumulate(x, alpha: 1, into: g) }
        return g
    }

    /// Token rows per chunk of `pruneLlama`'s per-token steps.
    public static let chunkRows = 2048

    /// `x` cut into copies of `rows` rows (the last one shorter); `x` itself when it is one chunk.
    static func rowChunks(_ x: Tensor, rows: Int, on backend: any ComputeBackend) -> [Tensor] {
        precondition(rows > 0, "rowChunks: \(rows) rows a chunk")
        guard x.rows > rows else { return [x] }
        return stride(from: 0, to: x.rows, by: rows).map { backend.copy(x.region(rows: $0..<min($0 + rows, x.rows))) }
    }

    /// The chunks `rowChunks` would cut from the concatenation of `parts` (row blocks of one
    /// width, in order), copied from the parts directly; each part leaves `parts` (and is freed,
    /// if nothing else holds it) once its last row is copied. `parts` is empty afterwards. At
    /// LLaMA-2-7B's width and 128 x 2048 calibration tokens that is 8.6 GB less at once than
    /// concatenating first (the parts, their concatenation and its chunks, 4.3 GB each).
    static func rowChunks(consuming parts: inout [Tensor], rows: Int, on backend: any ComputeBackend) -> [Tensor] {
        precondition(rows > 0, "rowChunks: \(rows) rows a chunk")
        precondition(parts.allSatisfy { $0.cols == parts[0].cols }, "rowChunks: parts of different widths")
        if parts.count <= 1 {
            defer { parts = [] }
            return parts.first.map { rowChunks($0, rows: rows, on: backend) } ?? []
        }
        let total = parts.reduce(0) { $0 + $1.rows }, cols = parts[0].cols
        var pending = Array(parts.reversed())          // the next part last
        parts = []
        var offset = 0                                 // rows of pending.last already copied
        var chunks: [Tensor] = []
        for start in stride(from: 0, to: total, by: rows) {
            let chunk = backend.zeros(rows: min(rows, total - start), cols: cols)
            var filled = 0
            while filled < chunk.rows {
                let part = pending[pending.count - 1]
                let n = min(part.rows - offset, chunk.rows - filled)
                backend.copy(part.region(rows: offset..<offset + n), into: chunk.region(rows: filled..<filled + n))
                filled += n
                offset += n
                if offset == part.rows {
                    pending.removeLast()
                    offset = 0
                }
            }
            chunks.append(chunk)
        }
        return chunks
    }

    static func meanDiagonal(_ g: Tensor, on backend: any ComputeBackend) -> Double {
        backend.sum(backend.diagonal(g)) / Double(max(g.rows, 1))
    }

    /// tr(W G Wᵀ).
    static func quadratic(_ w: Tensor, _ g: Tensor, on backend: any ComputeBackend) -> Double {
        backend.chunkedDot(backend.matmul(w, g), w)
    }

    /// XᵀX: the given one, checked to be `width` wide, or `make()`.
    static func inputGram(_ known: Grams?, width: Int, what: String, otherwise make: () -> Tensor) throws -> Tensor {
        guard let known else { return make() }
        return try checked(known.input, width: width, name: "input", what: what)
    }

    /// pᵀp: the given one, made now (`Grams.activation`) and checked to be `width` wide, or `make()`.
    static func activationGram(_ known: Grams?, width: Int, what: String, otherwise make: () -> Tensor) throws -> Tensor {
        guard let known else { return make() }
        return try checked(known.activation(), width: width, name: "activation", what: what)
    }

    static func checked(_ g: Tensor, width: Int, name: String, what: String) throws -> Tensor {
        if g.rows != width || g.cols != width {
            throw PruneError.shape("\(what): SparseLLM was given a \(g.rows)x\(g.cols) Gram matrix of its \(name), expected \(width)x\(width)")
        }
        return g
    }

    static func checkFinite(_ t: Tensor, _ what: String, on backend: any ComputeBackend) throws {
        if !backend.allFinite(t) { throw PruneError.numerical("\(what): non-finite values") }
    }
}
