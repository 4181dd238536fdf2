import Foundation
import TopiaryModel
import TopiaryTensor

/// How the target sparsity is spread over the blocks (`--allocation`).
public enum AllocationMethod: String, Sendable, Codable, CaseIterable {
    /// Every block at the target.
    case uniform
    /// OWL (Yin et al. 2024, "Outlier Weighed Layerwise sparsity"): blocks with more outlier
    /// weights keep more of them.
    case owl
}

/// OWL's allocation. A weight is an outlier when its Wanda score |W_ij|·‖X_j‖ exceeds M times
/// the mean score of its linear; a block's outlier ratio is the share of outliers over its
/// linears, measured on the dense model's calibration activations. The ratios of the pruned
/// blocks are scaled to [0, 2λ], centred, and give each block the density
/// (1 − target) + scaled − mean(scaled): the mean block sparsity is the target, and since the
/// blocks of one model have the same shapes, so is the sparsity of all their linears.
public enum OWLAllocation {
    public struct Options: Sendable, Equatable, Codable {
        /// The outlier threshold M (the paper's default for LLaMA: 5).
        public var m: Double
        /// The largest deviation from the target, λ (the paper: 0.08).
        public var lambda: Double
        public init(m: Double = 5, lambda: Double = 0.08) {
            self.m = m
            self.lambda = lambda
        }
    }

    /// Each block's outlier ratio from a dense pass over the calibration windows (one block in
    /// memory at a time, as the pruning pass).
    public static func outlierRatios(model: LanguageModel, job: PruneJob, m: Double,
                                     backend: any ComputeBackend = ComputeDevices.defaultBackend) throws -> [Double] {
        let c = model.config
        var inputs = RangePruner.store(job: job, config: c, backend: backend)
        let embedding = try model.loadEmbedding()
        for (s, window) in job.calibration.enumerated() { try inputs.set(s, embedding.embed(window, sequenceLength: job.sequenceLength)) }
        let rope = c.ropeTable(positions: job.sequenceLength)
        var ratios: [Double] = []
        for i in 0..<c.layerCount {
            let block = try model.loadBlock(i)
            let device = block.on(backend)
            let keys = BlockPruner.statisticsKeys(block.inputGroups)
            var sums: [String: Tensor] = [:]
            let outputs = inputs.makeSibling()
            for s in 0..<inputs.count {
                let y = device.forward(try inputs.tensor(s), sequenceLength: job.sequenceLength, rope: rope, expertCalibration: .routed) { name, x in
                    guard keys[name] == name else { return }
                    let add = backend.columnSquaredSums(x)
                    if let t = sums[name] { backend.axpy(1, add, t) } else { sums[name] = add }
                }
                try outputs.set(s, y)
            }
            var outliers = 0, total = 0
            for name in block.linearNames {
                let w = block.tensors[name + ".weight"]!
                let norms = sums[keys[name] ?? name].map { backend.download($0).values.map { Double($0).squareRoot() } }
                    ?? [Double](repeating: 0, count: w.cols)
                // Two passes over the weights (the mean, then the count) rather than a score per
                // weight held in memory: a 70B gate_proj has 235 million.
                let count = w.withUnsafeBufferPointer { p -> Int in
                    func score(_ r: Int, _ j: Int) -> Double { Double(abs(p[r * w.cols + j])) * norms[j] }
                    var sum = 0.0
                    for r in 0..<w.rows { for j in 0..<w.cols { sum += score(r, j) } }
                    let threshold = m * sum / Double(max(1, w.count))
                    var count = 0
                    for r in 0..<w.rows { for j in 0..<w.cols where score(r, j) > threshold { count += 1 } }
                    return count
                }
                outliers += count
                total += w.count
            }
            ratios.append(total > 0 ? Double(outliers) / Double(total) : 0)
            inputs = outputs
        }
        return ratios
    }

    /// Block sparsities from the outlier ratios: the blocks in `pruned` share the target as OWL
    /// shares it; the others keep the target (they are not pruned).
    public static func sparsities(ratios: [Double], pruned: [Int], target: Double, lambda: Double) throws -> [Double] {
        var out = [Double](repeating: target, count: ratios.count)
        let r = pruned.map { ratios[$0] }
        guard let lo = r.min(), let hi = r.max() else { return out }
        let scaled = r.map { hi > lo ? ($0 - lo) / (hi - lo) * 2 * lambda : 0 }
        let mean = scaled.reduce(0, +) / Double(scaled.count)
        for (k, i) in pruned.enumerated() {
            let s = 1 - ((1 - target) + scaled[k] - mean)
            guard s > 0, s < 1 else {
                throw PruneError.invalidOption("--owl-lambda \(lambda) gives block \(i) a sparsity of \(String(format: "%.3f", s)) at target \(target); choose a smaller λ")
            }
            out[i] = s
        }
        return out
    }
}

extension PrunePlan {
    /// The plan of block `i`: its own sparsity when the plan allocates one per block.
    public func forBlock(_ i: Int) -> PrunePlan {
        guard let a = allocation, i < a.count else { return self }
        var p = self
        p.pattern = .unstructured(a[i])
        p.allocation = nil
        return p
    }
}
