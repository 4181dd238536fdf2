/// BESA's kernels on the host (ComputeBackend's "BESA kernels").
extension CPUBackend {
    public func rankRows(_ scores: Tensor) -> Tensor {
        let (rows, cols) = (scores.rows, scores.cols)
        precondition(cols <= 1 << 24, "rankRows: \(cols) columns cannot be held exactly as Float32 indices")
        let out = uninitialized(rows: rows, cols: cols)
        let (ps, po) = (read(scores), write(out))
        Parallel.forEach(rows, chunk: 16) { range in
            var index = [Int32](repeating: 0, count: cols)
            for r in range {
                let row = ps + r * cols
                for c in 0..<cols { index[c] = Int32(c) }
                index.sort { a, b in row[Int(a)] < row[Int(b)] || (row[Int(a)] == row[Int(b)] && a < b) }
                for c in 0..<cols { po[r * cols + c] = Float(index[c]) }
            }
        }
        return out
    }

    public func rankedMasked(_ weight: Tensor, order: Tensor, counts: [Int]) -> Tensor {
        precondition(weight.rows == order.rows && weight.cols == order.cols, "rankedMasked: \(weight) for \(order)")
        let out = copy(weight)
        setRanked(out, to: 0, order: order, counts: counts, what: "rankedMasked")
        return out
    }

    public func rankedMask(order: Tensor, counts: [Int]) -> Tensor {
        let out = zeros(rows: order.rows, cols: order.cols)
        setRanked(out, to: 1, order: order, counts: counts, what: "rankedMask")
        return out
    }

    /// x[r, order[r, j]] = value for j < counts[r], every row r.
    private func setRanked(_ x: Tensor, to value: Float, order: Tensor, counts: [Int], what: String) {
        precondition(counts.count == order.rows, "\(what): \(counts.count) counts for \(order)")
        let cols = order.cols
        for r in 0..<order.rows {
            precondition(counts[r] >= 0 && counts[r] <= cols, "\(what): count \(counts[r]) of \(cols)")
        }
        let (po, px) = (read(order), write(x))
        counts.withUnsafeBufferPointer { counts in
            Parallel.forEach(order.rows, chunk: 16) { range in
                for r in range {
                    for j in 0..<counts[r] { px[r * cols + Int(po[r * cols + j])] = value }
                }
            }
        }
    }

    public func rankedPrefixSums(_ gradient: Tensor, _ weight: Tensor, order: Tensor, at counts: [Int]) -> [Double] {
        precondition(gradient.rows == weight.rows && gradient.cols == weight.cols && order.rows == weight.rows && order.cols == weight.cols,
                     "rankedPrefixSums: \(gradient), \(weight), \(order)")
        let (rows, cols, k) = (weight.rows, weight.cols, counts.count)
        var out = [Double](repeating: 0, count: rows * k)
        let (pg, pw, po) = (read(gradient), read(weight), read(order))
        // Rows apart, in parallel: each row's sums in its own order.
        out.withUnsafeMutableBufferPointer { buffer in counts.withUnsafeBufferPointer { counts in
            let d = buffer.baseAddress!
            Parallel.forEach(rows, chunk: 16) { range in for r in range {
                let gr = pg + r * cols, wr = pw + r * cols, ranked = po + r * cols
                var prefix = 0.0
                var next = 0
                for j in 0...cols {
                    while next < k && counts[next] == j {
                        d[r * k + next] = prefix
                        next += 1
                    }
                    if j == cols { break }
                    let c = Int(ranked[j])
                    prefix += Double(gr[c]) * Double(wr[c])
                }
            } }
        } }
        return out
    }

    public func channelNormalizedError(target y: Tensor, prediction: Tensor) -> (loss: Double, gradient: Tensor) {
        precondition(y.rows == prediction.rows && y.cols == prediction.cols, "channelNormalizedError: \(y) and \(prediction)")
        let (tokens, channels) = (y.rows, y.cols)
        var energy = [Double](repeating: 0, count: channels)
        let gradient = uninitialized(rows: tokens, cols: channels)
        let (py, pp, pg) = (read(y), read(prediction), write(gradient))
        for t in 0..<tokens { for c in 0..<channels { let v = Double(py[t * channels + c]); energy[c] += v * v } }
        let inverse = energy.map { $0 > 0 ? 1 / $0 : 1 }
        var loss = 0.0
        for t in 0..<tokens {
            for c in 0..<channels {
                let i = t * channels + c
                let d = Double(py[i]) - Double(pp[i])
                loss += d * d * inverse[c]
                pg[i] = Float(-2 * d * inverse[c] / Double(channels))
            }
        }
        return (loss / Double(channels), gradient)
    }
}
