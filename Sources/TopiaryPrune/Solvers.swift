import TopiaryTensor

/// Magnitude pruning: one threshold per matrix over |W| (unstructured), or the N smallest |W| in
/// every group of M inputs of a row. No calibration data.
public enum MagnitudePruner {
    /// Prunes a host matrix on `backend` (one upload, one download).
    public static func prune(_ weight: Matrix, pattern: SparsityPattern, backend: any ComputeBackend = CPUBackend()) -> Matrix {
        backend.download(prune(backend.upload(weight), pattern: pattern, on: backend))
    }

    /// The pruned copy of `weight`, computed on `backend`.
    public static func prune(_ weight: Tensor, pattern: SparsityPattern, on backend: any ComputeBackend) -> Tensor {
        let magnitudes = backend.map(weight, .abs)
        let mask: Tensor
        switch pattern {
        case .unstructured(let s):
            // Reference rule: thresh = sort(|W|)[int(numel * s)], prune |W| <= thresh.
            mask = backend.selectAtMostKthSmallest(magnitudes, k: Int(Double(weight.count) * s))
        case .nOfM(let n, let m):
            mask = backend.selectNOfM(magnitudes, n: n, m: m)
        }
        let pruned = backend.copy(weight)
        backend.zeroMasked(pruned, mask: mask)
        return pruned
    }
}

/// Wanda: score |W_ij| * ||x_j||, compared within each output row (stable order). A matrix loses
/// exactly round(s * rows * cols) weights: each row ⌊s·cols⌋ or one more, the extra ones spread
/// evenly over the rows (`rowCounts`). Where s·cols is a whole number (50% of an even width) that
/// is the reference's int(cols * s) per row; elsewhere the reference's floor would leave the matrix
/// short of the target (0.6994 instead of 0.7 under OWL on SmolLM2). N:M compares within groups of M inputs.
public enum WandaPruner {
    /// `inputSquaredNorms[j]` is ||x_j||² averaged as the reference does (any positive scale works).
    public static func prune(_ weight: Matrix, inputSquaredNorms: [Float], pattern: SparsityPattern,
                             backend: any ComputeBackend = CPUBackend()) -> Matrix {
        precondition(inputSquaredNorms.count == weight.cols, "Wanda: \(inputSquaredNorms.count) input norms for \(weight.cols) columns")
        let norms = backend.upload(Matrix(vector: inputSquaredNorms))
        return backend.download(prune(backend.upload(weight), inputSquaredNorms: norms, pattern: pattern, on: backend))
    }

    /// The pruned copy of `weight` [out x in] given the inputs' squared norms [1 x in], on `backend`.
    public static func prune(_ weight: Tensor, inputSquaredNorms: Tensor, pattern: SparsityPattern,
                             on backend: any ComputeBackend) -> Tensor {
        precondition(inputSquaredNorms.count == weight.cols, "Wanda: \(inputSquaredNorms.count) input norms for \(weight.cols) columns")
        let scale = backend.map(inputSquaredNorms, .squareRoot)
        switch pattern {
        case .unstructured(let s):
            return backend.zeroSmallestInRows(weight, scale: scale, counts: rowCounts(rows: weight.rows, cols: weight.cols, fraction: s))
        case .nOfM(let n, let m):
            let mask = backend.selectNOfM(backend.multiplyColumns(backend.map(weight, .abs), by: scale), n: n, m: m)
            let pruned = backend.copy(weight)
            backend.zeroMasked(pruned, mask: mask)
            return pruned
        }
    }

    /// How many weights each row loses so that the matrix loses round(fraction * rows * cols):
    /// ⌊total / rows⌋ each, and one more in the rows r where ⌊(r+1)·extra/rows⌋ steps up
    /// (evenly spread, independent of threads and of the scores).
    public static func rowCounts(rows: Int, cols: Int, fraction: Double) -> [Int] {
        guard rows > 0 else { return [] }
        let total = min(max(Int((fraction * Double(rows) * Double(cols)).rounded()), 0), rows * cols)
        let base = total / rows, extra = total % rows
        return (0..<rows).map { r in base + ((r + 1) * extra / rows - r * extra / rows) }
    }
}
