import Foundation
import TopiaryTensor

/// SparseLLM (Bai et al. 2024, arXiv 2402.17946): prunes the linear layers of one feed-forward
/// network jointly, through auxiliary variables for the pre-activations (z, and s for LLaMA's
/// gate) and the activation p, alternating exact block-coordinate updates with SparseGPT as the
/// inner sparse solver. A pure function of matrices: rows are tokens, columns features.
///
/// LLaMA:  J = α‖s − X W_gᵀ‖² + α‖z − X W_uᵀ‖² + β‖Y − p W_dᵀ‖² + γ‖p − SiLU(s)⊙z‖²
/// OPT:    J = α‖z − (X W_1ᵀ + b_1)‖² + β‖Y − (p W_2ᵀ + b_2)‖² + γ‖p − ReLU(z)‖²
///
/// Each step minimises J over one group of variables with the others fixed:
/// - W (each linear): refit to its current target by ridge-regularised least squares (normal
///   equations in fp64), then SparseGPT against the matching Gram matrix with a fresh mask.
///   "Refit, then SparseGPT" is SparseGPT with the auxiliary as target. The new weights are kept
///   only if they do not raise their term of J, so no step increases the objective.
/// - p: (β W_dᵀW_d + γI)⁻¹ applied to β W_dᵀ Y + γ·act, exactly (inverse in fp64).
/// - z: LLaMA (α m + γ σ p)/(α + γ σ²) with σ = SiLU(s), exact for any α, γ; OPT the ReLU case split.
/// - s (LLaMA): per element, safeguarded Newton steps on α(s − g)² + γ(p − SiLU(s) z)², each
///   accepted only if it lowers that element's term.
///
/// The weights returned are those of the iteration whose pruned FFN reproduces the dense FFN's
/// output on the calibration inputs best, ‖Y − FFN_Ŵ(X)‖²: lowering J does not always lower that
/// error (the auxiliaries drift from the activations the pruned weights produce), and the first
/// iteration is plain SparseGPT, so the result is never worse than SparseGPT on this measure.
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

    /// Prunes gate [f x d], up [f x d], down [d x f] given the FFN input x [N x d].
    public static func pruneLlama(x: Matrix, gate: Matrix, up: Matrix, down: Matrix, pattern: SparsityPattern,
                                  sparseGPT: SparseGPTPruner.Options = .init(), options: Options = .llama,
                                  what: String = "ffn") throws -> LlamaResult {
        let (a, b, c) = (Float(options.alpha), Float(options.beta), Float(options.gamma))
        let gramX = gram(x)
        var s = Linalg.linear(x, gate)
        var z = Linalg.linear(x, up)
        var p = siluProduct(s, z)
        let y = Linalg.linear(p, down)
        let yNorm = y.squaredNorm
        var (wg, wu, wd) = (gate, up, down)
        var reports: [IterationReport] = []
        var best: (error: Double, iteration: Int, gate: Matrix, up: Matrix, down: Matrix)?
        for t in 0..<options.iterations {
            let step = "\(what), iteration \(t + 1)"
            // W steps.
            let ku = try weightStep(current: wu, dense: up, first: t == 0, input: x, gram: gramX, target: z, bias: nil,
                                    pattern: pattern, sparseGPT: sparseGPT, ridge: options.ridge, what: "\(step): up_proj")
            wu = ku.weight
            let kg = try weightStep(current: wg, dense: gate, first: t == 0, input: x, gram: gramX, target: s, bias: nil,
                                    pattern: pattern, sparseGPT: sparseGPT, ridge: options.ridge, what: "\(step): gate_proj")
            wg = kg.weight
            let kd = try weightStep(current: wd, dense: down, first: t == 0, input: p, gram: gram(p), target: y, bias: nil,
                                    pattern: pattern, sparseGPT: sparseGPT, ridge: options.ridge, what: "\(step): down_proj")
            wd = kd.weight
            // ‖y − p·Wdᵀ‖²: from the weight step's normal-equation terms when it has them.
            let outputFit = kd.residual.map { max(0, yNorm + $0) } ?? distance(y, Linalg.linear(p, wd))
            // J right after the weight step, and the error that decides which weights are kept.
            let m = Linalg.linear(x, wu)
            let g = Linalg.linear(x, wg)
            let sigma = silu(s)
            let terms = [
                Double(a) * distance(s, g), Double(a) * distance(z, m),
                Double(b) * outputFit, Double(c) * distanceToProduct(p, sigma, z),
            ].map { $0 / Double(x.rows) }
            let error = distance(y, Linalg.linear(siluProduct(g, m), wd)) / max(y.squaredNorm, .leastNormalMagnitude)
            reports.append(IterationReport(iteration: t + 1, objective: terms.reduce(0, +), terms: terms,
                                           outputError: error, accepted: [ku.accepted, kg.accepted, kd.accepted]))
            if best == nil || error < best!.error { best = (error, t + 1, wg, wu, wd) }
            // After the last weight step the auxiliaries would never be used again.
            if t == options.iterations - 1 { break }
            // p step: the activation that down_proj reads.
            p = try activationStep(y: y, bias: nil, w: wd, act: product(sigma, z), beta: b, gamma: c, what: "\(step): p update")
            // z step (up_proj output), exact for any α, γ.
            llamaZStep(&z, m: m, sigma: sigma, p: p, alpha: a, gamma: c)
            try checkFinite(z, "\(step): z update")
            // s step (gate_proj output): safeguarded Newton per element.
            newtonGateStep(&s, g: g, z: z, p: p, alpha: a, gamma: c, steps: options.newtonSteps)
            try checkFinite(s, "\(step): s update")
        }
        let chosen = best!
        return LlamaResult(gate: chosen.gate, up: chosen.up, down: chosen.down, iterations: reports, chosen: chosen.iteration)
    }

    // MARK: OPT

    /// Prunes fc1 [f x d] (+ bias b1) and fc2 [d x f] (+ bias b2) given the FFN input x [N x d].
    public static func pruneOPT(x: Matrix, fc1: Matrix, bias1: Matrix, fc2: Matrix, bias2: Matrix, pattern: SparsityPattern,
                                sparseGPT: SparseGPTPruner.Options = .init(), options: Options = .opt,
                                what: String = "ffn") throws -> OPTResult {
        let (a, b, c) = (Float(options.alpha), Float(options.beta), Float(options.gamma))
        let gramX = gram(x)
        var z = addBias(Linalg.linear(x, fc1), bias1)
        var p = relu(z)
        let y = addBias(Linalg.linear(p, fc2), bias2)
        var (w1, w2) = (fc1, fc2)
        var reports: [IterationReport] = []
        var best: (error: Double, iteration: Int, fc1: Matrix, fc2: Matrix)?
        for t in 0..<options.iterations {
            let step = "\(what), iteration \(t + 1)"
            let k1 = try weightStep(current: w1, dense: fc1, first: t == 0, input: x, gram: gramX, target: z, bias: bias1,
                                    pattern: pattern, sparseGPT: sparseGPT, ridge: options.ridge, what: "\(step): fc1")
            w1 = k1.weight
            let k2 = try weightStep(current: w2, dense: fc2, first: t == 0, input: p, gram: gram(p), target: y, bias: bias2,
                                    pattern: pattern, sparseGPT: sparseGPT, ridge: options.ridge, what: "\(step): fc2")
            w2 = k2.weight
            let m = addBias(Linalg.linear(x, w1), bias1)
            let terms = [
                Double(a) * distance(z, m), Double(b) * distance(y, addBias(Linalg.linear(p, w2), bias2)),
                Double(c) * distance(p, relu(z)),
            ].map { $0 / Double(x.rows) }
            let error = distance(y, addBias(Linalg.linear(relu(m), w2), bias2)) / max(y.squaredNorm, .leastNormalMagnitude)
            reports.append(IterationReport(iteration: t + 1, objective: terms.reduce(0, +), terms: terms,
                                           outputError: error, accepted: [k1.accepted, k2.accepted]))
            if best == nil || error < best!.error { best = (error, t + 1, w1, w2) }
            if t == options.iterations - 1 { break }
            p = try activationStep(y: y, bias: bias2, w: w2, act: relu(z), beta: b, gamma: c, what: "\(step): p update")
            // z step: the better of the two ReLU branches, element by element.
            optZStep(&z, m: m, p: p, alpha: a, gamma: c)
            try checkFinite(z, "\(step): z update")
        }
        let chosen = best!
        return OPTResult(fc1: chosen.fc1, fc2: chosen.fc2, iterations: reports, chosen: chosen.iteration)
    }

    // MARK: steps

    /// The weight step for one linear y ≈ input·Wᵀ (+ bias) with target `target`: at the first
    /// iteration SparseGPT of the dense weight; later, SparseGPT of the least-squares refit, kept
    /// only if ‖target − input·Wᵀ − bias‖² does not rise.
    static func weightStep(current: Matrix, dense: Matrix, first: Bool, input: Matrix, gram g: Matrix, target: Matrix,
                           bias: Matrix?, pattern: SparsityPattern, sparseGPT: SparseGPTPruner.Options, ridge: Double,
                           what: String) throws -> (weight: Matrix, accepted: Bool, residual: Double?) {
        let shifted = bias.map { subtractBias(target, $0) } ?? target
        if first {
            let w = try SparseGPTPruner.prune(dense, hessian: g, pattern: pattern, options: sparseGPT, what: what).weight
            return (w, true, nil)
        }
        // Normal equations: W (XᵀX + λI) = targetᵀX.
        let cross = Linalg.matmul(shifted, .transposed, input, .none)          // [out x in]
        var damped = g
        let lambda = Float(ridge * meanDiagonal(g))
        damped.withUnsafeMutableBufferPointer { p in for i in 0..<g.rows { p[i * g.cols + i] += lambda } }
        let refit: Matrix
        do { refit = try Linalg.solveSPDDouble(damped, cross.transposed(), what: "\(what): refit").transposed() } catch {
            throw PruneError.numerical("\(error)")
        }
        try checkFinite(refit, "\(what): refit")
        let candidate = try SparseGPTPruner.prune(refit, hessian: g, pattern: pattern, options: sparseGPT, what: what).weight
        // ‖T − XWᵀ‖² = ‖T‖² − 2⟨W, TᵀX⟩ + tr(W G Wᵀ): compare without forming XWᵀ.
        // (‖T − XWᵀ‖² − ‖T‖², returned for the caller's objective.)
        func residual(_ w: Matrix) -> Double { quadratic(w, g) - 2 * inner(w, cross) }
        let (new, old) = (residual(candidate), residual(current))
        if new <= old { return (candidate, true, new) }
        return (current, false, old)
    }

    /// p = (β·act_target + γ·act)(βWᵀW + γI)⁻¹, where act_target = (Y − b)·W.
    static func activationStep(y: Matrix, bias: Matrix?, w: Matrix, act: Matrix, beta: Float, gamma: Float, what: String) throws -> Matrix {
        var system = Linalg.matmul(w, .transposed, w, .none)                    // [f x f]
        system.withUnsafeMutableBufferPointer { p in
            for i in p.indices { p[i] *= beta }
            for i in 0..<w.cols { p[i * w.cols + i] += gamma }
        }
        var rhs = act
        let yw = Linalg.matmul(bias.map { subtractBias(y, $0) } ?? y, .none, w, .none)    // [N x f]
        rhs.withUnsafeMutableBufferPointer { pr in
            yw.withUnsafeBufferPointer { py in
                let (r, y) = (pr.baseAddress!, py.baseAddress!)
                Parallel.forEach(pr.count) { range in for i in range { r[i] = gamma * r[i] + beta * y[i] } }
            }
        }
        let inverse: Matrix
        do { inverse = try Linalg.inverseSPDDouble(system, what: "\(what)") } catch { throw PruneError.numerical("\(error)") }
        let p = Linalg.matmul(rhs, inverse)
        try checkFinite(p, what)
        return p
    }

    /// LLaMA z (up_proj output): argmin α(z − m)² + γ(p − σz)² = (α m + γ σ p)/(α + γ σ²), element-wise.
    static func llamaZStep(_ z: inout Matrix, m: Matrix, sigma: Matrix, p: Matrix, alpha a: Float, gamma c: Float) {
        z.withUnsafeMutableBufferPointer { pz in
            m.withUnsafeBufferPointer { pm in
                sigma.withUnsafeBufferPointer { ps in
                    p.withUnsafeBufferPointer { pp in
                        let (zb, mb, sb, pb) = (pz.baseAddress!, pm.baseAddress!, ps.baseAddress!, pp.baseAddress!)
                        Parallel.forEach(pz.count) { range in
                            for i in range {
                                let sg = sb[i]
                                zb[i] = (a * mb[i] + c * sg * pb[i]) / (a + c * sg * sg)
                            }
                        }
                    }
                }
            }
        }
    }

    /// OPT z (fc1 output): argmin α(z − m)² + γ(p − ReLU(z))², the better of the z ≥ 0 branch
    /// max((αm + γp)/(α + γ), 0) and the z ≤ 0 branch min(m, 0), element-wise (ties: z ≥ 0).
    static func optZStep(_ z: inout Matrix, m: Matrix, p: Matrix, alpha a: Float, gamma c: Float) {
        z.withUnsafeMutableBufferPointer { pz in
            m.withUnsafeBufferPointer { pm in
                p.withUnsafeBufferPointer { pp in
                    let (zb, mb, pb) = (pz.baseAddress!, pm.baseAddress!, pp.baseAddress!)
                    Parallel.forEach(pz.count) { range in for i in range {
                        let (mi, pi) = (mb[i], pb[i])
                        let positive = max((c * pi + a * mi) / (c + a), 0)
                        let negative = min(mi, 0)
                        let costPositive = c * (pi - positive) * (pi - positive) + a * (positive - mi) * (positive - mi)
                        let costNegative = c * pi * pi + a * (negative - mi) * (negative - mi)
                        zb[i] = costPositive <= costNegative ? positive : negative
                    } }
                }
            }
        }
    }

    /// Per element: minimise α(s − g)² + γ(p − SiLU(s)·z)² from the current s by Newton steps
    /// (Gauss-Newton curvature where the exact one is not positive), halving a step until it
    /// lowers the element's term, so the update never raises the objective.
    static func newtonGateStep(_ s: inout Matrix, g: Matrix, z: Matrix, p: Matrix, alpha a: Float, gamma c: Float, steps: Int) {
        s.withUnsafeMutableBufferPointer { ps in
            g.withUnsafeBufferPointer { pg in
                z.withUnsafeBufferPointer { pz in
                    p.withUnsafeBufferPointer { pp in
                        let (sb, gb, zb, pb) = (ps.baseAddress!, pg.baseAddress!, pz.baseAddress!, pp.baseAddress!)
                        Parallel.forEach(ps.count) { range in for i in range {
                            let (gi, zi, pi) = (gb[i], zb[i], pb[i])
                            var si = sb[i]
                            func cost(_ v: Float) -> Float {
                                let r = pi - Kernels.silu(v) * zi
                                return a * (v - gi) * (v - gi) + c * r * r
                            }
                            var f = cost(si)
                            for _ in 0..<steps {
                                let sg = 1 / (1 + expf(-si))
                                let d1 = sg * (1 + si * (1 - sg))                       // SiLU′
                                let d2 = sg * (1 - sg) * (2 + si * (1 - 2 * sg))        // SiLU″
                                let r = pi - si * sg * zi
                                let grad = 2 * a * (si - gi) - 2 * c * zi * d1 * r
                                let gaussNewton = 2 * a + 2 * c * zi * zi * d1 * d1
                                var curvature = gaussNewton - 2 * c * zi * d2 * r
                                if !(curvature > 0) { curvature = gaussNewton }
                                var delta = -grad / curvature
                                // Converged: a further step would not move s measurably.
                                if abs(delta) <= 1e-6 * max(1, abs(si)) { break }
                                var accepted = false
                                for _ in 0..<20 {
                                    let trial = si + delta
                                    let ft = cost(trial)
                                    if ft.isFinite && ft <= f { si = trial; f = ft; accepted = true; break }
                                    delta *= 0.5
                                }
                                if !accepted { break }
                            }
                            sb[i] = si
                        } }
                    }
                }
            }
        }
    }

    // MARK: small helpers over matrices

    static func gram(_ x: Matrix) -> Matrix {
        var g = Matrix(rows: x.cols, cols: x.cols)
        Linalg.syrkAccumulate(x, alpha: 1, into: &g)
        return g
    }

    static func meanDiagonal(_ g: Matrix) -> Double {
        g.withUnsafeBufferPointer { p in (0..<g.rows).reduce(0.0) { $0 + Double(p[$1 * g.cols + $1]) } } / Double(max(g.rows, 1))
    }

    /// tr(W G Wᵀ).
    static func quadratic(_ w: Matrix, _ g: Matrix) -> Double { inner(Linalg.matmul(w, g), w) }

    static func inner(_ a: Matrix, _ b: Matrix) -> Double {
        a.withUnsafeBufferPointer { pa in b.withUnsafeBufferPointer { pb in
            let (x, y) = (pa.baseAddress!, pb.baseAddress!)
            return Parallel.sum(pa.count) { range in
                var s = 0.0
                for i in range { s += Double(x[i]) * Double(y[i]) }
                return s
            }
        } }
    }

    /// ‖a − b‖².
    static func distance(_ a: Matrix, _ b: Matrix) -> Double {
        a.withUnsafeBufferPointer { pa in b.withUnsafeBufferPointer { pb in
            let (x, y) = (pa.baseAddress!, pb.baseAddress!)
            return Parallel.sum(pa.count) { range in
                var s = 0.0
                for i in range { let d = Double(x[i] - y[i]); s += d * d }
                return s
            }
        } }
    }

    /// ‖p − u⊙v‖², without forming u⊙v.
    static func distanceToProduct(_ p: Matrix, _ u: Matrix, _ v: Matrix) -> Double {
        p.withUnsafeBufferPointer { pp in u.withUnsafeBufferPointer { pu in v.withUnsafeBufferPointer { pv in
            let (x, a, b) = (pp.baseAddress!, pu.baseAddress!, pv.baseAddress!)
            return Parallel.sum(pp.count) { range in
                var s = 0.0
                for i in range { let d = Double(x[i] - a[i] * b[i]); s += d * d }
                return s
            }
        } } }
    }

    /// f applied element-wise into a new matrix (one pass, no copy of the input first).
    static func map(_ m: Matrix, _ f: (Float) -> Float) -> Matrix {
        var out = Matrix(rows: m.rows, cols: m.cols)
        out.withUnsafeMutableBufferPointer { po in m.withUnsafeBufferPointer { pm in
            let (o, x) = (po.baseAddress!, pm.baseAddress!)
            Parallel.forEach(po.count) { range in for i in range { o[i] = f(x[i]) } }
        } }
        return out
    }

    /// f applied element-wise to pairs into a new matrix.
    static func zipMap(_ a: Matrix, _ b: Matrix, _ f: (Float, Float) -> Float) -> Matrix {
        var out = Matrix(rows: a.rows, cols: a.cols)
        out.withUnsafeMutableBufferPointer { po in a.withUnsafeBufferPointer { pa in b.withUnsafeBufferPointer { pb in
            let (o, x, y) = (po.baseAddress!, pa.baseAddress!, pb.baseAddress!)
            Parallel.forEach(po.count) { range in for i in range { o[i] = f(x[i], y[i]) } }
        } } }
        return out
    }

    static func silu(_ m: Matrix) -> Matrix { map(m, Kernels.silu) }
    static func relu(_ m: Matrix) -> Matrix { map(m) { max($0, 0) } }
    static func product(_ a: Matrix, _ b: Matrix) -> Matrix { zipMap(a, b) { $0 * $1 } }
    static func siluProduct(_ s: Matrix, _ z: Matrix) -> Matrix { zipMap(s, z) { Kernels.silu($0) * $1 } }

    static func addBias(_ m: Matrix, _ bias: Matrix) -> Matrix {
        var out = m
        let (rows, cols) = (m.rows, m.cols)
        out.withUnsafeMutableBufferPointer { po in
            bias.withUnsafeBufferPointer { pb in Kernels.addBias(pb.baseAddress!, to: po.baseAddress!, rows: rows, cols: cols) }
        }
        return out
    }

    static func subtractBias(_ m: Matrix, _ bias: Matrix) -> Matrix { addBias(m, map(bias) { -$0 }) }

    static func checkFinite(_ m: Matrix, _ what: String) throws {
        if !m.allFinite { throw PruneError.numerical("\(what): non-finite values") }
    }
}
