import TopiaryTensor

/// Statistics of one linear layer's inputs over the calibration set, accumulated one sequence at
/// a time exactly as the reference scripts do (a running average, so the scale is 2/n Σ x xᵀ):
/// H ← H·n/(n+1); n ← n+1; H ← H + (2/n)·XᵀX, and for Wanda s_j ← s_j·(n−1)/n + Σ_t x_tj²/n.
public final class LayerStatistics: @unchecked Sendable {
    public let columns: Int
    public private(set) var hessian: Matrix
    /// Mean over sequences of Σ_tokens x_j² (Wanda's scaler_row).
    public private(set) var squaredNorms: [Float]
    public private(set) var sequences = 0

    public init(columns: Int) {
        self.columns = columns
        hessian = Matrix(rows: columns, cols: columns)
        squaredNorms = [Float](repeating: 0, count: columns)
    }

    /// Adds one calibration sequence's inputs [tokens x columns].
    public func add(_ x: Matrix) {
        precondition(x.cols == columns, "statistics for \(columns) inputs given \(x.cols)")
        let n = Float(sequences)
        let decay = n / (n + 1)
        sequences += 1
        hessian.withUnsafeMutableBufferPointer { p in for i in p.indices { p[i] *= decay } }
        Linalg.syrkAccumulate(x, alpha: 2 / Float(sequences), into: &hessian)
        let inv = 1 / Float(sequences)
        var sums = [Float](repeating: 0, count: columns)
        x.withUnsafeBufferPointer { px in
            sums.withUnsafeMutableBufferPointer { ps in
                for t in 0..<x.rows {
                    let row = px.baseAddress! + t * columns
                    for j in 0..<columns { ps[j] += row[j] * row[j] }
                }
            }
        }
        for j in 0..<columns { squaredNorms[j] = squaredNorms[j] * decay + sums[j] * inv }
    }

    /// ‖A Xᵀ‖² up to the common factor n/2: tr(A H Aᵀ) for A [rows x columns].
    public func quadraticForm(_ a: Matrix) -> Double {
        let ah = Linalg.matmul(a, hessian)
        return ah.withUnsafeBufferPointer { p in
            a.withUnsafeBufferPointer { q in
                var s = 0.0
                for i in 0..<p.count { s += Double(p[i]) * Double(q[i]) }
                return s
            }
        }
    }
}
