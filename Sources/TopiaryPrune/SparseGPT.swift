import TopiaryTensor

/// SparseGPT (Frantar & Alistarh 2023): prunes a linear layer column by column, compensating
/// each removed weight through the inverse Hessian of the layer's inputs (optimal brain surgeon
/// updates), with lazy 128-column blocks and adaptive per-block mask selection.
public enum SparseGPTPruner {
    public struct Options: Sendable, Equatable, Codable {
        public var blockSize: Int = 128
        /// Dampening added to the diagonal, as a fraction of its mean.
        public var percentDamp: Double = 0.01
        public init(blockSize: Int = 128, percentDamp: Double = 0.01) {
            self.blockSize = blockSize
            self.percentDamp = percentDamp
        }
    }

    public struct Result: Sendable {
        public var weight: Matrix
        /// Sum over rows of the OBS losses (w - q)² / d², halved, as the reference reports it.
        public var loss: Double
    }

    /// Prunes `weight` [rows x cols] given the Hessian H = (2/n) Σ x xᵀ [cols x cols].
    /// `what` names the layer in errors. H is not modified (damping goes on a copy).
    /// `fixedMask` (row-major, true = prune) replaces the mask selection: the OBS updates of the
    /// kept weights under a mask chosen elsewhere (BESA's learned rows); `pattern` is then unused.
    public static func prune(_ weight: Matrix, hessian: Matrix, pattern: SparsityPattern,
                             options: Options = Options(), what: String = "layer", fixedMask: [Bool]? = nil) throws -> Result {
        let rows = weight.rows, cols = weight.cols
        precondition(fixedMask.map { $0.count == rows * cols } ?? true, "\(what): fixed mask does not match the weight's shape")
        guard hessian.rows == cols && hessian.cols == cols else {
            throw PruneError.shape("\(what): Hessian is \(hessian.rows)x\(hessian.cols), expected \(cols)x\(cols)")
        }
        var w = weight
        var h = hessian
        // Dead inputs (never active in calibration): unit Hessian diagonal, weights zeroed.
        var diagonalSum = 0.0
        h.withUnsafeMutableBufferPointer { ph in
            w.withUnsafeMutableBufferPointer { pw in
                for j in 0..<cols where ph[j * cols + j] == 0 {
                    ph[j * cols + j] = 1
                    for r in 0..<rows { pw[r * cols + j] = 0 }
                }
                for j in 0..<cols { diagonalSum += Double(ph[j * cols + j]) }
            }
        }
        let damp = Float(options.percentDamp * diagonalSum / Double(cols))
        h.withUnsafeMutableBufferPointer { ph in for j in 0..<cols { ph[j * cols + j] += damp } }
        let hinvFull: Matrix
        let u: Matrix
        do {
            hinvFull = try Linalg.inverseSPD(h, what: "\(what): damped Hessian")
            u = try Linalg.cholesky(hinvFull, upper: true, what: "\(what): inverse Hessian")
        } catch {
            throw PruneError.numerical("\(error)")
        }

        var loss = 0.0
        let bs = options.blockSize
        var errBlock = [Float](repeating: 0, count: rows * bs)
        var wBlock = [Float](repeating: 0, count: rows * bs)
        var hBlock = [Float](repeating: 0, count: bs * bs)
        var pruneMask = [Bool](repeating: false, count: rows * bs)
        try w.withUnsafeMutableBufferPointer { pw in
            try u.withUnsafeBufferPointer { pu in
                var i1 = 0
                while i1 < cols {
                    let i2 = min(i1 + bs, cols)
                    let count = i2 - i1
                    // Copies of this block of W (rows x count) and of U (count x count).
                    for r in 0..<rows { for c in 0..<count { wBlock[r * count + c] = pw[r * cols + i1 + c] } }
                    for a in 0..<count { for b in 0..<count { hBlock[a * count + b] = pu[(i1 + a) * cols + i1 + b] } }
                    if let fixedMask {
                        for r in 0..<rows { for c in 0..<count { pruneMask[r * count + c] = fixedMask[r * cols + i1 + c] } }
                    } else if case .unstructured(let s) = pattern {
                        // Adaptive mask: the block's smallest w²/d², chosen once at block start.
                        var scores = [Float](repeating: 0, count: rows * count)
                        for r in 0..<rows {
                            for c in 0..<count {
                                let d = hBlock[c * count + c]
                                let v = wBlock[r * count + c]
                                scores[r * count + c] = v * v / (d * d)
                            }
                        }
                        let original = scores
                        let threshold = Selection.kthSmallest(&scores, Int(Double(rows * count) * s))
                        for i in 0..<(rows * count) { pruneMask[i] = original[i] <= threshold }
                    } else {
                        for i in 0..<(rows * count) { pruneMask[i] = false }
                    }
                    loss += pruneBlock(&wBlock, hBlock, &errBlock, &pruneMask, rows: rows, count: count, pattern: pattern)
                    for r in 0..<rows { for c in 0..<count { pw[r * cols + i1 + c] = wBlock[r * count + c] } }
                    // Lazy update of all later columns: W[:, i2:] -= Err1 · U[i1:i2, i2:].
                    if i2 < cols {
                        errBlock.withUnsafeBufferPointer { pe in
                            Linalg.sgemm(.none, .none, m: rows, n: cols - i2, k: count, alpha: -1,
                                         a: pe.baseAddress!, lda: count, b: pu.baseAddress! + i1 * cols + i2, ldb: cols,
                                         beta: 1, c: pw.baseAddress! + i2, ldc: cols)
                        }
                    }
                    i1 = i2
                }
                if !pw.allSatisfy({ $0.isFinite }) {
                    throw PruneError.numerical("\(what): SparseGPT produced non-finite weights")
                }
            }
        }
        return Result(weight: w, loss: loss)
    }

    /// The column loop inside one block; rows are independent, so each row runs it alone, in
    /// fixed groups of rows run concurrently. Returns the block's share of the loss (the rows'
    /// losses added in row order, whatever the thread count).
    static func pruneBlock(_ w: inout [Float], _ hinv: [Float], _ err: inout [Float], _ mask: inout [Bool],
                           rows: Int, count: Int, pattern: SparsityPattern) -> Double {
        var rowLosses = [Float](repeating: 0, count: rows)
        w.withUnsafeMutableBufferPointer { pw in
            hinv.withUnsafeBufferPointer { ph in
                err.withUnsafeMutableBufferPointer { pe in
                    mask.withUnsafeMutableBufferPointer { pm in
                        rowLosses.withUnsafeMutableBufferPointer { pl in
                            let buffers = UnsafeShared((pw.baseAddress!, ph.baseAddress!, pe.baseAddress!, pm.baseAddress!, pl.baseAddress!))
                            Parallel.forEach(rows, chunk: 32) { group in
                                let (w, h, e, m, losses) = buffers.value
                                for r in group {
                                    losses[r] = pruneRow(w + r * count, m + r * count, e + r * count, h, count: count, pattern: pattern)
                                }
                            }
                        }
                    }
                }
            }
        }
        var loss = 0.0
        for r in 0..<rows { loss += Double(rowLosses[r]) / 2 }
        return loss
    }

    /// One row of a block: prunes column by column, spreading each removed weight's error over
    /// the row's later columns; returns Σ (w - q)² / d².
    static func pruneRow(_ row: UnsafeMutablePointer<Float>, _ m: UnsafeMutablePointer<Bool>, _ e: UnsafeMutablePointer<Float>,
                         _ ph: UnsafePointer<Float>, count: Int, pattern: SparsityPattern) -> Float {
        var rowLoss: Float = 0
        for i in 0..<count {
            let d = ph[i * count + i]
            if case .nOfM(let n, let groupSize) = pattern, i % groupSize == 0 {
                // Mask of this group from the current (already updated) weights.
                let width = min(groupSize, count - i)
                var idx = Array(0..<width)
                idx.sort { a, b in
                    let da = ph[(i + a) * count + i + a], db = ph[(i + b) * count + i + b]
                    let sa = row[i + a] * row[i + a] / (da * da), sb = row[i + b] * row[i + b] / (db * db)
                    return sa < sb || (sa == sb && a < b)
                }
                for j in idx.prefix(min(n, width)) { m[i + j] = true }
            }
            let v = row[i]
            let q: Float = m[i] ? 0 : v
            let e_i = (v - q) / d
            rowLoss += (v - q) * (v - q) / (d * d)
            e[i] = e_i
            row[i] = q
            if e_i != 0 && i + 1 < count {
                Kernels.axpy(-e_i, ph + i * count + i + 1, row + i + 1, count - i - 1)
            }
        }
        return rowLoss
    }
}

/// Buffers handed to concurrently run closures that touch disjoint parts of them.
struct UnsafeShared<T>: @unchecked Sendable {
    let value: T
    init(_ value: T) { self.value = value }
}
