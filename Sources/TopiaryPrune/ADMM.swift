import Foundation
import TopiaryTensor

/// A layer's mask and kept weights from ADMM on its least-squares problem (after Boža 2024,
/// "Fast and Effective Weight Update for Pruned Large Language Models", arXiv 2401.02938; our
/// own schedule and finish): minimise ‖(W − W₀)X‖² = tr((W − W₀) H (W − W₀)ᵀ) over W with the
/// pattern's zeros, by splitting W (free) from Z (sparse) with the scaled dual U:
///
///     W ← (W₀H + ρ(Z − U)) (H + ρI)⁻¹      one GEMM with an inverse kept while ρ stays
///     Z ← P(W + U)                          keep the largest |v_ij|·√H_jj of each row (or group)
///     U ← W + U − Z
///
/// P prunes per row (exactly `WandaPruner.rowCounts`, the rows' counts spread as Wanda's) or N
/// of every M inputs. Unstructured sparsity rises along a cubic ramp over the first half of the
/// iterations (gradual pruning: the mask can change while the weights move) and is the target
/// after. ρ grows by `rhoGrowth` every `rhoStep` iterations from `rho` (relative to the mean of
/// H's damped diagonal) up to `maximumRelativeRho`, U rescaled with it. Then the mask of the last Z is fixed and each row's
/// kept weights are refitted to the least-squares optimum on that mask by `refitIterations` of
/// Jacobi-preconditioned conjugate gradients (the objective only falls). H is SparseGPT's
/// (2/n)Σxxᵀ with the same damping and dead inputs. The result is exactly sparse.
///
/// Cost: one rows×n×n GEMM an iteration (ADMM and CG alike) and one n×n inverse per ρ, against
/// SparseGPT's one rows×n×n update in all. A fixed mask (BESA's) skips ADMM: the refit alone.
public enum ADMMPruner {
    public struct Options: Sendable, Equatable, Codable {
        public var iterations: Int
        public var rho: Double
        public var rhoGrowth: Double
        public var rhoStep: Int
        public var refitIterations: Int
        public init(iterations: Int = 30, rho: Double = 0.1, rhoGrowth: Double = 1.5, rhoStep: Int = 3, refitIterations: Int = 20) {
            self.iterations = iterations
            self.rho = rho
            self.rhoGrowth = rhoGrowth
            self.rhoStep = rhoStep
            self.refitIterations = refitIterations
        }
    }

    /// Where ρ stops growing, relative to the mean of H's damped diagonal: far beyond it
    /// (H + ρI)⁻¹ is I/ρ to Float's precision and the iteration has converged, and ρ itself would
    /// overflow Float (1.5^250 at 1000 iterations; growth 100 every 3 iterations after 60).
    public static let maximumRelativeRho = 1e8

    /// The sparsity the mask has at iteration k (0-based) of `iterations` for a target `s`.
    static func rampedSparsity(_ s: Double, iteration k: Int, of iterations: Int) -> Double {
        let ramp = max(iterations / 2, 1)
        let t = min(Double(k + 1) / Double(ramp), 1)
        return s * (1 - (1 - t) * (1 - t) * (1 - t))
    }

    public static func prune(_ weight: Tensor, hessian: Tensor, pattern: SparsityPattern, percentDamp: Double, options: Options,
                             what: String, fixedMask: Tensor? = nil, on backend: any ComputeBackend) throws -> SparseGPTPruner.TensorResult {
        let rows = weight.rows, cols = weight.cols
        guard hessian.rows == cols && hessian.cols == cols else {
            throw PruneError.shape("\(what): Hessian is \(hessian.rows)x\(hessian.cols), expected \(cols)x\(cols)")
        }
        guard options.iterations >= 0, options.refitIterations >= 0, options.rho > 0, options.rhoGrowth >= 1, options.rhoStep >= 1 else {
            throw PruneError.invalidOption("\(what): ADMM needs iterations >= 0, refit iterations >= 0, rho > 0, growth >= 1 and step >= 1, got \(options)")
        }
        let w0 = backend.copy(weight)
        let h = backend.copy(hessian)
        backend.zeroDeadInputs(hessian: h, weight: w0)
        let meanDiagonal = backend.sum(backend.diagonal(h)) / Double(max(cols, 1))
        backend.addToDiagonal(h, Float(percentDamp * meanDiagonal))
        let diagonal = backend.diagonal(h)
        let scale = backend.sum(diagonal) / Double(max(cols, 1))
        let columnNorms = backend.map(diagonal, .squareRoot)
        let target = backend.matmul(w0, h)   // W₀H (H is symmetric)

        func select(_ v: Tensor, sparsity s: Double) -> Tensor {
            let scores = backend.multiplyColumns(backend.map(v, .abs), by: columnNorms)
            switch pattern {
            case .unstructured:
                return backend.selectSmallestInRows(scores, counts: WandaPruner.rowCounts(rows: rows, cols: cols, fraction: s))
            case .nOfM(let n, let m):
                return backend.selectNOfM(scores, n: n, m: m)
            }
        }
        var mask: Tensor = fixedMask ?? select(w0, sparsity: rampedSparsity(pattern.fraction, iteration: 0, of: options.iterations))
        var z = backend.copy(w0)
        backend.zeroMasked(z, mask: mask)
        if fixedMask == nil && options.iterations > 0 {
            let u = backend.zeros(rows: rows, cols: cols)
            var inverse: Tensor? = nil
            var inverseRho = -1.0
            for k in 0..<options.iterations {
                let rho = min(options.rho * pow(options.rhoGrowth, Double(k / options.rhoStep)), maximumRelativeRho) * scale
                if rho != inverseRho {
                    // U is the scaled dual Y/ρ: it follows ρ so that the multiplier Y stays.
                    if inverseRho > 0 { backend.scale(u, by: Float(inverseRho / rho)) }
                    let shifted = backend.copy(h)
                    backend.addToDiagonal(shifted, Float(rho))
                    do { inverse = try backend.inverseSPD(shifted, what: "\(what): H + ρI") } catch { throw PruneError.numerical("\(error)") }
                    inverseRho = rho
                }
                // W = (W₀H + ρ(Z − U)) (H + ρI)⁻¹, then U becomes V = W + U.
                let b = backend.copy(target)
                backend.axpy(Float(rho), z, b)
                backend.axpy(Float(-rho), u, b)
                let w = backend.matmul(b, inverse!)
                backend.axpy(1, w, u)
                mask = select(u, sparsity: rampedSparsity(pattern.fraction, iteration: k, of: options.iterations))
                z = backend.copy(u)
                backend.zeroMasked(z, mask: mask)
                backend.axpy(-1, z, u)   // U = V − Z
            }
        }
        refit(z, target: target, hessian: h, diagonal: diagonal, mask: mask, iterations: options.refitIterations, on: backend)
        guard backend.allFinite(z) else { throw PruneError.numerical("\(what): ADMM produced non-finite weights") }
        // The objective ½ tr(E H Eᵀ), E = Z − W₀ (SparseGPT reports the same half).
        let e = backend.copy(z)
        backend.axpy(-1, w0, e)
        let loss = 0.5 * backend.dot(e, backend.matmul(e, h))
        return SparseGPTPruner.TensorResult(weight: z, loss: loss)
    }

    /// Conjugate gradients on every row's kept weights at once, in place on `x` (zero where
    /// `mask` prunes): each row minimises (x − w₀) H (x − w₀)ᵀ over its kept set, whose gradient
    /// is 2(xH − W₀H) there. Jacobi preconditioner (H's diagonal); per-row step sizes; a row whose
    /// curvature or residual vanishes stops moving.
    static func refit(_ x: Tensor, target: Tensor, hessian h: Tensor, diagonal: Tensor, mask: Tensor, iterations: Int,
                      on backend: any ComputeBackend) {
        guard iterations > 0, x.count > 0 else { return }
        let r = backend.copy(target)
        backend.gemm(x.all, .none, h.all, .none, alpha: -1, beta: 1, into: r.all)
        backend.zeroMasked(r, mask: mask)
        var zr = backend.divideColumns(r, by: diagonal)
        var p = backend.copy(zr)
        var rz = backend.rowDots(r, zr)
        for _ in 0..<iterations {
            let q = backend.matmul(p, h)
            backend.zeroMasked(q, mask: mask)
            let pq = backend.rowDots(p, q)
            let alpha = zip(rz, pq).map { a, b in b > 0 && a > 0 ? Float(a / b) : 0 }
            if alpha.allSatisfy({ $0 == 0 }) { break }
            backend.addScaledRows(x, p, scales: alpha)
            backend.addScaledRows(r, q, scales: alpha.map { -$0 })
            zr = backend.divideColumns(r, by: diagonal)
            let next = backend.rowDots(r, zr)
            let beta = zip(next, rz).map { a, b in b > 0 && a > 0 ? Float(a / b) : 0 }
            let np = backend.copy(zr)
            backend.addScaledRows(np, p, scales: beta)
            p = np
            rz = next
        }
    }
}
