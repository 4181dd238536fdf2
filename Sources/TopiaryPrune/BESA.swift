import Foundation
import TopiaryModel
import TopiaryTensor

/// BESA (Xu et al., ICLR 2024, arXiv 2402.16880; ../shared/research/besa.md §1-3): learns how
/// sparse each output row of each linear of a block should be, so that the block's output
/// changes least, with the weights frozen.
///
/// For each row r (or each linear, `.layer`): a distribution p_r = softmax(θ_r) over candidate
/// sparsities s_k = k/100, k = 0…100, and its mean s̄_r. The row's weights are ranked once per
/// block by Wanda's score |W_rj|·‖x_j‖ (ascending, stable); the forward pass prunes the first
/// ⌊s̄_r·C⌋ of them (hard mask). The gradient reaches θ through the expected keep-mask
/// q_rj = 1 − Σ_k p_rk [j < N_k], N_k = ⌊s_k·C⌋ (straight-through): ∂L/∂p_rk = −Σ_{j<N_k} G̃_rj
/// with G = ∂L/∂W_eff ⊙ W in ranked order, a prefix sum read at the 101 counts.
///
/// Loss per calibration sequence: (1/C) Σ_{t,c} ((Y − Ŷ)_tc / σ_c)² with σ_c = ‖Y[:, c]‖, plus
/// β((S − s*)/s*)², S the parameter-weighted mean of s̄ over the block. Adam on θ, one sequence
/// per step. Unlike the reference there is no sigmoid inside the softmax (it confines every
/// row to about [0.38, 0.62]), so any target is reachable; θ starts at the maximum-entropy
/// distribution whose mean is the target (uniform at 50%, the reference's start).
///
/// The soft penalty and the floor of the counts leave the block's realised sparsity near, not
/// at, the target; a final shift of every row's learned sparsity by one common δ (bisection)
/// makes the count exact, keeping the learned allocation's shape.
public enum BESA {
    public enum Granularity: String, Sendable, Codable, CaseIterable {
        /// One distribution per output row (the paper's main results).
        case row
        /// One distribution per linear layer.
        case layer
    }

    public struct Options: Sendable, Equatable, Codable {
        /// Passes over the calibration sequences (one Adam step per sequence).
        public var epochs: Int
        /// Adam's step size on the logits.
        public var learningRate: Double
        /// β, the weight of the sparsity penalty.
        public var penalty: Double
        public var granularity: Granularity
        /// After the masks are chosen, update the kept weights with SparseGPT under those masks.
        public var reconstruct: Bool
        /// Adam's step size over the run: nil (or constant) keeps `learningRate`; cosine takes it
        /// from `learningRate` down to 0 along half a cosine over all epochs' steps.
        public var schedule: LearningRateSchedule?

        public init(epochs: Int = 1, learningRate: Double = 0.05, penalty: Double = 5, granularity: Granularity = .row,
                    reconstruct: Bool = false) {
            self.epochs = epochs
            self.learningRate = learningRate
            self.penalty = penalty
            self.granularity = granularity
            self.reconstruct = reconstruct
        }

        /// The step size of Adam step t (1-based) of `total`.
        public func learningRate(step t: Int, of total: Int) -> Double {
            switch schedule ?? .constant {
            case .constant: return learningRate
            case .cosine: return learningRate * 0.5 * (1 + cos(Double.pi * Double(t - 1) / Double(max(total, 1))))
            }
        }
    }

    public enum LearningRateSchedule: String, Sendable, Codable, Equatable {
        case constant, cosine
    }

    /// The candidate sparsities are k / steps, k = 0…steps.
    public static let steps = 100

    /// What was learned for one linear layer.
    public struct LinearAllocation: Sendable, Codable, Equatable {
        public var name: String
        /// Mean over rows of the learned expected sparsity s̄_r, before the final shift.
        public var learnedSparsity: Double
        /// Fraction of the layer's weights the final mask removes.
        public var sparsity: Double
        /// Smallest and largest row sparsity of the final mask.
        public var rowSparsityMin: Double
        public var rowSparsityMax: Double
    }

    /// The learning run of one block.
    public struct Summary: Sendable, Codable, Equatable {
        public var linears: [LinearAllocation]
        /// Mean reconstruction loss of each epoch (the first is the Wanda-like start's neighbourhood).
        public var epochLosses: [Double]
        /// The block's expected sparsity S at the end of training.
        public var expectedSparsity: Double
        /// The common shift δ added to every row's sparsity to hit the target count.
        public var shift: Double
        public var steps: Int
    }

    public struct Result: Sendable {
        /// New weights of every linear, by name (without ".weight"), on the block's backend.
        public var weights: [String: Tensor]
        public var summary: Summary
    }

    /// Learns the allocation of `block` at overall sparsity `target` and returns the pruned
    /// weights, all on the block's backend. `sample(i)` gives calibration sequence i's input to
    /// the block and the output to reconstruct; `inputSquaredNorms(name)` Wanda's ‖x_j‖² for a
    /// linear's inputs [1 x in]; `hessian(name)` its inputs' Hessian (used only with `reconstruct`).
    ///
    /// What scales with the model (weights, rankings, activations, gradients) stays on the
    /// backend. The learned logits and Adam's moments (101 per row) are kept on the host: each
    /// step the backend returns the ranked prefix sums at the 101 candidate counts and is given
    /// the rows' counts, O(rows) values against the O(rows x cols) that stay.
    public static func prune(block: DeviceBlock, samples: Int, sequenceLength: Int,
                             sample: (Int) throws -> (input: Tensor, target: Tensor),
                             inputSquaredNorms: (String) throws -> Tensor, hessian: (String) throws -> Tensor,
                             target: Double, options: Options, sparseGPT: SparseGPTPruner.Options = .init()) throws -> Result {
        precondition(target > 0 && target < 1, "BESA: target sparsity \(target) outside (0, 1)")
        precondition(samples > 0 && options.epochs > 0)
        let backend = block.backend
        let names = block.linearNames
        var learners: [RowLearner] = []
        for name in names {
            learners.append(RowLearner(name: name, weight: block.weight(name), inputSquaredNorms: try inputSquaredNorms(name),
                                       granularity: options.granularity, target: target, on: backend))
        }
        let blockParameters = Double(learners.reduce(0) { $0 + $1.rows * $1.cols })
        let rope = block.config.ropeTable(positions: sequenceLength)
        var adamStep = 0
        var epochLosses: [Double] = []
        for _ in 0..<options.epochs {
            var lossSum = 0.0
            for s in 0..<samples {
                let (x, y) = try sample(s)
                var weights: [String: Tensor] = [:]
                for l in learners { weights[l.name] = l.maskedWeight() }
                let masked = block.replacing(weights: weights)
                let (prediction, tape) = masked.forwardRecording(x, sequenceLength: sequenceLength, rope: rope)
                let (loss, dy) = backend.channelNormalizedError(target: y, prediction: prediction)
                guard loss.isFinite else { throw PruneError.numerical("block \(block.index): BESA loss is not finite (sample \(s))") }
                lossSum += loss
                let grads = masked.weightGradients(outputGradient: dy, tape: tape)
                // The penalty's slope dL/dS; S's slope in a row's s̄ is (n_ℓ/n_block)/R_ℓ.
                let expected = learners.reduce(0.0) { $0 + Double($1.rows * $1.cols) / blockParameters * $1.meanSparsity() }
                let slope = 2 * options.penalty * (expected - target) / (target * target)
                adamStep += 1
                for l in learners {
                    let share = Double(l.rows * l.cols) / blockParameters / Double(l.rows)
                    l.step(weightGradient: grads[l.name]!, penaltySlope: slope * share,
                           learningRate: options.learningRate(step: adamStep, of: options.epochs * samples), step: adamStep)
                }
            }
            epochLosses.append(lossSum / Double(samples))
        }
        let expected = learners.reduce(0.0) { $0 + Double($1.rows * $1.cols) / blockParameters * $1.meanSparsity() }
        // One common shift of every row's sparsity so the block removes round(target·n) weights.
        let wanted = Int((target * blockParameters).rounded())
        func count(_ delta: Double) -> Int { learners.reduce(0) { $0 + $1.prunedCount(shift: delta) } }
        var (lo, hi) = (-1.0, 1.0)
        for _ in 0..<60 {
            let mid = (lo + hi) / 2
            if count(mid) < wanted { lo = mid } else { hi = mid }
        }
        let shift = abs(count(lo) - wanted) < abs(count(hi) - wanted) ? lo : hi

        var weights: [String: Tensor] = [:]
        var allocations: [LinearAllocation] = []
        for l in learners {
            let counts = l.rowCounts(shift: shift)
            let mask = backend.rankedMask(order: l.order, counts: counts)
            if options.reconstruct {
                weights[l.name] = try SparseGPTPruner.prune(l.weight, hessian: try hessian(l.name), pattern: .unstructured(0), options: sparseGPT,
                                                            what: l.name, fixedMask: mask, on: backend).weight
            } else {
                let w = backend.copy(l.weight)
                backend.zeroMasked(w, mask: mask)
                weights[l.name] = w
            }
            let rowFractions = counts.map { Double($0) / Double(l.cols) }
            allocations.append(LinearAllocation(name: l.name, learnedSparsity: l.meanSparsity(),
                                                sparsity: Double(counts.reduce(0, +)) / Double(l.rows * l.cols),
                                                rowSparsityMin: rowFractions.min() ?? 0, rowSparsityMax: rowFractions.max() ?? 0))
        }
        let summary = Summary(linears: allocations, epochLosses: epochLosses, expectedSparsity: expected, shift: shift, steps: adamStep)
        return Result(weights: weights, summary: summary)
    }

    /// θ_k = λ·s_k with λ such that the mean is `target`: the distribution of largest entropy
    /// over the candidates with that mean.
    static func maximumEntropyLogits(mean target: Double) -> [Double] {
        func mean(_ lambda: Double) -> Double {
            let logits = (0...steps).map { lambda * Double($0) / Double(steps) }
            let p = softmax(logits)
            return zip(p, 0...steps).reduce(0) { $0 + $1.0 * Double($1.1) / Double(steps) }
        }
        var (lo, hi) = (-500.0, 500.0)
        for _ in 0..<100 {
            let mid = (lo + hi) / 2
            if mean(mid) < target { lo = mid } else { hi = mid }
        }
        let lambda = (lo + hi) / 2
        return (0...steps).map { lambda * Double($0) / Double(steps) }
    }

    static func softmax(_ x: [Double]) -> [Double] {
        let m = x.max() ?? 0
        let e = x.map { Foundation.exp($0 - m) }
        let s = e.reduce(0, +)
        return e.map { $0 / s }
    }
}

/// The learnable allocation of one linear layer: logits per group of rows (one group per row,
/// or one for the layer) and Adam's moments on the host; the weight and the rows' fixed Wanda
/// order on the backend.
final class RowLearner {
    let name: String
    let backend: any ComputeBackend
    let weight: Tensor
    let rows: Int
    let cols: Int
    let groups: Int
    /// order[r, j]: the column of row r's j-th least important weight.
    let order: Tensor
    /// N_k = ⌊k·cols/100⌋: the weights a row loses at candidate k.
    let candidateCounts: [Int]
    var logits: [Double]
    var firstMoment: [Double]
    var secondMoment: [Double]
    /// p and s̄ per group, for the current logits.
    var probabilities: [Double]
    var groupSparsity: [Double]

    static let (beta1, beta2, epsilon) = (0.9, 0.999, 1e-8)

    init(name: String, weight: Tensor, inputSquaredNorms: Tensor, granularity: BESA.Granularity, target: Double, on backend: any ComputeBackend) {
        precondition(inputSquaredNorms.count == weight.cols, "BESA \(name): \(inputSquaredNorms.count) input norms for \(weight.cols) columns")
        self.name = name
        self.backend = backend
        self.weight = weight
        rows = weight.rows
        cols = weight.cols
        groups = granularity == .row ? rows : 1
        let k = BESA.steps + 1
        candidateCounts = (0...BESA.steps).map { $0 * weight.cols / BESA.steps }
        // Wanda's score |W_rj|·‖x_j‖, ranked ascending within each row.
        let norms = backend.reshaped(backend.map(inputSquaredNorms, .squareRoot), rows: 1, cols: weight.cols)
        order = backend.rankRows(backend.multiplyColumns(backend.map(weight, .abs), by: norms))
        let start = BESA.maximumEntropyLogits(mean: target)
        logits = Array((0..<groups).map { _ in start }.joined())
        firstMoment = [Double](repeating: 0, count: groups * k)
        secondMoment = firstMoment
        probabilities = firstMoment
        groupSparsity = [Double](repeating: 0, count: groups)
        refresh()
    }

    func group(_ row: Int) -> Int { groups == rows ? row : 0 }

    /// p = softmax(θ) and s̄ = Σ p_k s_k for every group (groups in parallel; each group's
    /// arithmetic is the same wherever it runs).
    func refresh() {
        withBuffers { b in
            Parallel.forEach(groups, chunk: Self.rowChunk) { range in
                for g in range { b.refresh(g) }
            }
        }
    }

    /// The learner's per-group arrays as pointers, for loops over groups in parallel.
    struct Buffers: @unchecked Sendable {
        let logits, probabilities, sparsity, first, second: UnsafeMutablePointer<Double>
        static let k = BESA.steps + 1

        /// Group g's p = softmax(θ_g) and s̄_g.
        func refresh(_ g: Int) {
            let (k, steps) = (Self.k, Double(BESA.steps))
            let theta = logits + g * k, p = probabilities + g * k
            var m = -Double.infinity
            for i in 0..<k { m = max(m, theta[i]) }
            var sum = 0.0
            for i in 0..<k { p[i] = exp(theta[i] - m); sum += p[i] }
            var mean = 0.0
            for i in 0..<k { p[i] /= sum; mean += p[i] * Double(i) / steps }
            sparsity[g] = mean
        }

        /// Row r's ∂L/∂θ into d[0..<k] from its ranked prefix sums s[0..<k]: ∂L/∂p_k =
        /// −s_k + slope·s_k's sparsity, then the softmax's backward at the row's current p.
        func rowGradient(_ r: Int, prefix s: UnsafePointer<Double>, penaltySlope: Double, into d: UnsafeMutablePointer<Double>) {
            let (k, steps) = (Self.k, Double(BESA.steps))
            for i in 0..<k { d[i] = 0.0 + (-s[i] + penaltySlope * Double(i) / steps) }
            Self.softmaxBackward(probabilities + r * k, d)
        }

        /// The softmax's backward in place: d ← p ⊙ (d − ⟨p, d⟩) over the k candidates.
        static func softmaxBackward(_ p: UnsafePointer<Double>, _ d: UnsafeMutablePointer<Double>) {
            var dot = 0.0
            for i in 0..<k { dot += p[i] * d[i] }
            for i in 0..<k { d[i] = p[i] * (d[i] - dot) }
        }

        /// One Adam step on the `count` logits from `offset`, given their gradient `g`.
        func adam(_ offset: Int, _ count: Int, gradient g: UnsafePointer<Double>, learningRate: Double, corrections: (Double, Double)) {
            let (b1, b2, eps) = (RowLearner.beta1, RowLearner.beta2, RowLearner.epsilon)
            let (theta, m1, m2) = (logits + offset, first + offset, second + offset)
            // Eight lanes at a time (each lane's arithmetic is the scalar loop's: IEEE division and
            // square root round the same in a vector), the rest one by one.
            typealias V = SIMD8<Double>
            var i = 0
            while i + V.scalarCount <= count {
                func load(_ p: UnsafePointer<Double>) -> V { UnsafeRawPointer(p + i).loadUnaligned(as: V.self) }
                let grad = load(g)
                let m = b1 * load(m1) + (1 - b1) * grad
                let v = b2 * load(m2) + (1 - b2) * grad * grad
                UnsafeMutableRawPointer(m1 + i).storeBytes(of: m, as: V.self)
                UnsafeMutableRawPointer(m2 + i).storeBytes(of: v, as: V.self)
                let t = load(theta) - learningRate * (m / corrections.0) / ((v / corrections.1).squareRoot() + eps)
                UnsafeMutableRawPointer(theta + i).storeBytes(of: t, as: V.self)
                i += V.scalarCount
            }
            for i in i..<count {
                let grad = g[i]
                let m = b1 * m1[i] + (1 - b1) * grad
                let v = b2 * m2[i] + (1 - b2) * grad * grad
                m1[i] = m
                m2[i] = v
                theta[i] -= learningRate * (m / corrections.0) / ((v / corrections.1).squareRoot() + eps)
            }
        }
    }

    func withBuffers<R>(_ body: (Buffers) -> R) -> R {
        logits.withUnsafeMutableBufferPointer { logits in
            probabilities.withUnsafeMutableBufferPointer { probabilities in
                groupSparsity.withUnsafeMutableBufferPointer { sparsity in
                    firstMoment.withUnsafeMutableBufferPointer { first in
                        secondMoment.withUnsafeMutableBufferPointer { second in
                            body(Buffers(logits: logits.baseAddress!, probabilities: probabilities.baseAddress!, sparsity: sparsity.baseAddress!,
                                         first: first.baseAddress!, second: second.baseAddress!))
                        }
                    }
                }
            }
        }
    }

    /// Rows per chunk of the learner's parallel loops over rows.
    static let rowChunk = 32

    func meanSparsity() -> Double { groups == 1 ? groupSparsity[0] : groupSparsity.reduce(0, +) / Double(groups) }

    /// Weights each row loses: ⌊clamp(s̄_r + shift)·cols⌋ (a hair of slack against rounding in s̄).
    func rowCounts(shift: Double) -> [Int] {
        (0..<rows).map { r in
            let s = min(max(groupSparsity[group(r)] + shift, 0), 1)
            return min(cols, Int(s * Double(cols) + 1e-9))
        }
    }

    func prunedCount(shift: Double) -> Int { rowCounts(shift: shift).reduce(0, +) }

    /// The last `maskedWeight` and its rows' counts, updated in place at the next call.
    private var masked: (weight: Tensor, counts: [Int])?

    /// W ⊙ M_hard for the current logits. The tensor is the learner's and is changed in place by
    /// the next call: use it before then (one step's forward and backward).
    func maskedWeight() -> Tensor {
        let counts = rowCounts(shift: 0)
        if let masked {
            backend.updateRankedMasked(masked.weight, weight: weight, order: order, from: masked.counts, to: counts)
            self.masked = (masked.weight, counts)
            return masked.weight
        }
        let w = backend.rankedMasked(weight, order: order, counts: counts)
        masked = (w, counts)
        return w
    }

    /// ∂L/∂θ from ∂L/∂W_eff: through the straight-through mask to p, plus the penalty's
    /// `penaltySlope`·s_k per row, through the softmax to θ.
    func logitGradient(weightGradient dW: Tensor, penaltySlope: Double) -> [Double] {
        let k = BESA.steps + 1
        // ∂L/∂p_rk = −Σ_{j<N_k} (G⊙W)[r, order_j] + slope·s_k.
        let prefix = backend.rankedPrefixSums(dW, weight, order: order, at: candidateCounts)
        var dp = [Double](repeating: 0, count: groups * k)
        if groups == rows {
            // A group per row: rows apart, in parallel.
            withBuffers { b in
                dp.withUnsafeMutableBufferPointer { dp in
                    prefix.withUnsafeBufferPointer { prefix in
                        let (d, s) = (dp.baseAddress!, prefix.baseAddress!)
                        Parallel.forEach(rows, chunk: Self.rowChunk) { range in
                            for r in range { b.rowGradient(r, prefix: s + r * k, penaltySlope: penaltySlope, into: d + r * k) }
                        }
                    }
                }
            }
            return dp
        }
        // One group: the rows' terms added in row order, then the softmax's backward.
        let steps = Double(BESA.steps)
        for r in 0..<rows {
            for i in 0..<k { dp[i] += -prefix[r * k + i] + penaltySlope * Double(i) / steps }
        }
        probabilities.withUnsafeBufferPointer { p in
            dp.withUnsafeMutableBufferPointer { Buffers.softmaxBackward(p.baseAddress!, $0.baseAddress!) }
        }
        return dp
    }

    /// One Adam step on θ. With a group per row, each row's gradient, step and new softmax run
    /// in one pass while the row is in cache (the same arithmetic as `logitGradient`, then Adam
    /// over all rows, then `refresh`).
    func step(weightGradient dW: Tensor, penaltySlope: Double, learningRate: Double, step t: Int) {
        let k = BESA.steps + 1
        let corrections = (1 - pow(Self.beta1, Double(t)), 1 - pow(Self.beta2, Double(t)))
        guard groups == rows else {
            let gradient = logitGradient(weightGradient: dW, penaltySlope: penaltySlope)
            withBuffers { b in
                gradient.withUnsafeBufferPointer { b.adam(0, $0.count, gradient: $0.baseAddress!, learningRate: learningRate, corrections: corrections) }
            }
            refresh()
            return
        }
        let prefix = backend.rankedPrefixSums(dW, weight, order: order, at: candidateCounts)
        withBuffers { b in
            prefix.withUnsafeBufferPointer { prefix in
                let s = prefix.baseAddress!
                Parallel.forEach(rows, chunk: Self.rowChunk) { range in
                    withUnsafeTemporaryAllocation(of: Double.self, capacity: k) { d in
                        for r in range {
                            b.rowGradient(r, prefix: s + r * k, penaltySlope: penaltySlope, into: d.baseAddress!)
                            b.adam(r * k, k, gradient: d.baseAddress!, learningRate: learningRate, corrections: corrections)
                            b.refresh(r)
                        }
                    }
                }
            }
        }
    }
}
