/// BESA's kernels on the host (ComputeBackend's "BESA kernels").
extension CPUBackend {
    public func rankRows(_ scores: Tensor) -> Tensor {
        let (rows, cols) = (scores.rows, scores.cols)
        precondition(cols <= 1 << 24, "rankRows: \(cols) columns cannot be held exactly as Float32 indices")
        let out = uninitialized(rows: rows, cols: cols)
        let (ps, po) = (read(scores), write(out))
        // Each entry sorts as one integer (`Selection.key`: the score's bits in the order of the
        // values, then its column), so ties go to the lower column: the order a comparison sort on
        // (score, column) gives, without a closure call per comparison.
        Parallel.forEach(rows, chunk: 16) { range in
            var keys = [UInt64](repeating: 0, count: cols)
            for r in range {
                let row = ps + r * cols
                for c in 0..<cols { keys[c] = Selection.key(row[c], index: c) }
                keys.sort()
                for c in 0..<cols { po[r * cols + c] = Float(UInt32(truncatingIfNeeded: keys[c])) }
            }
        }
        return out
    }

    public func rankedMasked(_ weight: Tensor, order: Tensor, counts: [Int]) -> Tensor {
        precondition(weight.rows == order.rows && weight.cols == order.cols, "rankedMasked: \(weight) for \(order)")
        checkCounts(counts, order: order, what: "rankedMasked")
        let out = uninitialized(rows: weight.rows, cols: weight.cols)
        let (pw, po, px, cols) = (read(weight), read(order), write(out), order.cols)
        // Each row copied and masked while it is in cache, rows in parallel.
        counts.withUnsafeBufferPointer { counts in
            Parallel.forEach(order.rows, chunk: 16) { range in
                for r in range {
                    (px + r * cols).update(from: pw + r * cols, count: cols)
                    for j in 0..<counts[r] { px[r * cols + Int(po[r * cols + j])] = 0 }
                }
            }
        }
        return out
    }

    public func updateRankedMasked(_ masked: Tensor, weight: Tensor, order: Tensor, from: [Int], to: [Int]) {
        precondition(weight.rows == order.rows && weight.cols == order.cols && masked.rows == order.rows && masked.cols == order.cols,
                     "updateRankedMasked: \(masked), \(weight) for \(order)")
        checkCounts(from, order: order, what: "updateRankedMasked")
        checkCounts(to, order: order, what: "updateRankedMasked")
        let (pw, po, px, cols) = (read(weight), read(order), write(masked), order.cols)
        from.withUnsafeBufferPointer { from in to.withUnsafeBufferPointer { to in
            Parallel.forEach(order.rows, chunk: 64) { range in
                for r in range where from[r] != to[r] {
                    let (w, o, x) = (pw + r * cols, po + r * cols, px + r * cols)
                    if to[r] > from[r] {
                        for j in from[r]..<to[r] { x[Int(o[j])] = 0 }
                    } else {
                        for j in to[r]..<from[r] { let c = Int(o[j]); x[c] = w[c] }
                    }
                }
            }
        } }
    }

    public func rankedMask(order: Tensor, counts: [Int]) -> Tensor {
        checkCounts(counts, order: order, what: "rankedMask")
        let out = zeros(rows: order.rows, cols: order.cols)
        let (po, px, cols) = (read(order), write(out), order.cols)
        counts.withUnsafeBufferPointer { counts in
            Parallel.forEach(order.rows, chunk: 16) { range in
                for r in range {
                    for j in 0..<counts[r] { px[r * cols + Int(po[r * cols + j])] = 1 }
                }
            }
        }
        return out
    }

    /// Every row's count in 0...cols.
    private func checkCounts(_ counts: [Int], order: Tensor, what: String) {
        precondition(counts.count == order.rows, "\(what): \(counts.count) counts for \(order)")
        for r in 0..<order.rows {
            precondition(counts[r] >= 0 && counts[r] <= order.cols, "\(what): count \(counts[r]) of \(order.cols)")
        }
    }

    public func rankedPrefixSums(_ gradient: Tensor, _ weight: Tensor, order: Tensor, at counts: [Int]) -> [Double] {
        precondition(gradient.rows == weight.rows && gradient.cols == weight.cols && order.rows == weight.rows && order.cols == weight.cols,
                     "rankedPrefixSums: \(gradient), \(weight), \(order)")
        let (rows, cols, k) = (weight.rows, weight.cols, counts.count)
        precondition(zip(counts, counts.dropFirst()).allSatisfy { $0 <= $1 } && (counts.first ?? 0) >= 0 && (counts.last ?? 0) <= cols,
                     "rankedPrefixSums: counts \(counts.prefix(4))... not ascending within 0...\(cols)")
        var out = [Double](repeating: 0, count: rows * k)
        let (pg, pw, po) = (read(gradient), read(weight), read(order))
        // Each row's sum runs in its own ranked order, one addition after another. The row's
        // products G_rj·W_rj (exact in Double: two 24-bit significands) are made first in a
        // streaming pass, so that the ranked reads hit a buffer in cache, not the matrices; two
        // rows go in lockstep so that their additions overlap.
        out.withUnsafeMutableBufferPointer { buffer in counts.withUnsafeBufferPointer { counts in
            let d = buffer.baseAddress!
            Parallel.forEach(rows, chunk: 16) { range in
                withUnsafeTemporaryAllocation(of: Double.self, capacity: 2 * cols) { scratch in
                    let (p0, p1) = (scratch.baseAddress!, scratch.baseAddress! + cols)
                    func products(_ r: Int, into p: UnsafeMutablePointer<Double>) {
                        let (gr, wr) = (pg + r * cols, pw + r * cols)
                        for c in 0..<cols { p[c] = Double(gr[c]) * Double(wr[c]) }
                    }
                    var r = range.lowerBound
                    while r + 2 <= range.upperBound {
                        products(r, into: p0)
                        products(r + 1, into: p1)
                        let (o0, o1) = (po + r * cols, po + (r + 1) * cols)
                        var (s0, s1) = (0.0, 0.0)
                        var j = 0
                        for n in 0..<k {
                            while j < counts[n] {
                                s0 += p0[Int(o0[j])]
                                s1 += p1[Int(o1[j])]
                                j += 1
                            }
                            (d[r * k + n], d[(r + 1) * k + n]) = (s0, s1)
                        }
                        r += 2
                    }
                    if r < range.upperBound {
                        products(r, into: p0)
                        let o = po + r * cols
                        var sum = 0.0
                        var j = 0
                        for n in 0..<k {
                            while j < counts[n] {
                                sum += p0[Int(o[j])]
                                j += 1
                            }
                            d[r * k + n] = sum
                        }
                    }
                }
            }
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
