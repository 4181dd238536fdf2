import TopiaryTensor

/// Magnitude pruning: one threshold per matrix over |W| (unstructured), or the N smallest |W| in
/// every group of M inputs of a row. No calibration data.
public enum MagnitudePruner {
    public static func prune(_ weight: Matrix, pattern: SparsityPattern) -> Matrix {
        var w = weight
        switch pattern {
        case .unstructured(let s):
            // Reference rule: thresh = sort(|W|)[int(numel * s)], prune |W| <= thresh.
            let k = Int(Double(w.count) * s)
            var magnitudes = w.withUnsafeBufferPointer { $0.map { abs($0) } }
            let threshold = Selection.kthSmallest(&magnitudes, k)
            w.withUnsafeMutableBufferPointer { p in
                for i in p.indices where abs(p[i]) <= threshold { p[i] = 0 }
            }
        case .nOfM(let n, let m):
            let scores = w.withUnsafeBufferPointer { $0.map { abs($0) } }
            applyNOfM(&w, scores: scores, n: n, m: m)
        }
        return w
    }

    /// Zeroes, in every row and every group of `m` consecutive columns, the `n` entries with the
    /// smallest score (ties: lower column first).
    static func applyNOfM(_ w: inout Matrix, scores: [Float], n: Int, m: Int) {
        let (rows, cols) = (w.rows, w.cols)
        w.withUnsafeMutableBufferPointer { p in
            var order = [Int](repeating: 0, count: m)
            for r in 0..<rows {
                var g = 0
                while g < cols {
                    let width = min(m, cols - g)
                    for j in 0..<width { order[j] = j }
                    let base = r * cols + g
                    let sorted = order[0..<width].sorted { a, b in
                        scores[base + a] < scores[base + b] || (scores[base + a] == scores[base + b] && a < b)
                    }
                    for j in sorted.prefix(min(n, width)) { p[base + j] = 0 }
                    g += m
                }
            }
        }
    }
}

/// Wanda: score |W_ij| * ||x_j||, compared within each output row; exactly int(cols * s) weights
/// of each row are pruned (stable order). N:M compares within groups of M inputs.
public enum WandaPruner {
    /// `inputNorms[j]` is ||x_j||² averaged as the reference does (any positive scale works).
    public static func prune(_ weight: Matrix, inputSquaredNorms: [Float], pattern: SparsityPattern) -> Matrix {
        precondition(inputSquaredNorms.count == weight.cols, "Wanda: \(inputSquaredNorms.count) input norms for \(weight.cols) columns")
        var w = weight
        let cols = w.cols
        let scale = inputSquaredNorms.map { $0.squareRoot() }
        var scores = [Float](repeating: 0, count: w.count)
        w.withUnsafeBufferPointer { p in
            for r in 0..<w.rows { for c in 0..<cols { scores[r * cols + c] = abs(p[r * cols + c]) * scale[c] } }
        }
        switch pattern {
        case .unstructured(let s):
            let k = Int(Double(cols) * s)
            let rows = w.rows
            w.withUnsafeMutableBufferPointer { p in
                var order = [Int](repeating: 0, count: cols)
                for r in 0..<rows {
                    let base = r * cols
                    for c in 0..<cols { order[c] = c }
                    // Stable: equal scores keep column order, as torch.sort(stable=True).
                    order.sort { a, b in scores[base + a] < scores[base + b] || (scores[base + a] == scores[base + b] && a < b) }
                    for c in order.prefix(k) { p[base + c] = 0 }
                }
            }
        case .nOfM(let n, let m):
            MagnitudePruner.applyNOfM(&w, scores: scores, n: n, m: m)
        }
        return w
    }
}

/// Selection of order statistics without a full sort.
enum Selection {
    /// The k-th smallest value (0-based) of `values`, reordering them. k is clamped to the range.
    static func kthSmallest(_ values: inout [Float], _ k: Int) -> Float {
        precondition(!values.isEmpty)
        let k = min(max(k, 0), values.count - 1)
        var lo = 0, hi = values.count - 1
        var state: UInt64 = 0x9E37_79B9_7F4A_7C15
        while lo < hi {
            // Deterministic pseudo-random pivot keeps the expected time linear.
            state = state &* 6364136223846793005 &+ 1442695040888963407
            let pivot = values[lo + Int(state >> 33) % (hi - lo + 1)]
            var i = lo, j = hi
            while i <= j {
                while values[i] < pivot { i += 1 }
                while values[j] > pivot { j -= 1 }
                if i <= j { values.swapAt(i, j); i += 1; j -= 1 }
            }
            if k <= j { hi = j } else if k >= i { lo = i } else { return values[k] }
        }
        return values[k]
    }
}
