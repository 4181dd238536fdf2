#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// OpenBLAS and LAPACKE on the host: the reference backend, and the only code outside `Linalg`
/// itself that reaches them. Tensors are host `Matrix` storage shared copy-on-write, so an
/// upload or a download is a reference, not a copy (both still count in a `CheckingBackend`).
public struct CPUBackend: ComputeBackend {
    public init() {}
    public var name: String { "cpu (OpenBLAS, \(Linalg.threadCount) threads)" }

    /// Threads that the CPU backend's tiles and chunks run on (`--threads`); no result depends on it.
    public static var threadCount: Int { Linalg.threadCount }
    public static func setThreadCount(_ n: Int) { Linalg.setThreadCount(n) }
    /// OpenBLAS's description of its build (version, target kernel, threading).
    public static var libraryConfig: String { Linalg.openBLASConfig }

    // MARK: Memory and transfers

    public func upload(_ matrix: Matrix) -> Tensor { tensor(matrix) }
    public func download(_ tensor: Tensor) -> Matrix { storage(tensor).matrix }
    public func zeros(rows: Int, cols: Int) -> Tensor { tensor(Matrix(rows: rows, cols: cols)) }

    public func copy(_ region: TensorRegion) -> Tensor {
        let source = storage(region.tensor)
        if region.rowCount == region.tensor.rows && region.colCount == region.tensor.cols { return tensor(source.matrix) }
        let out = uninitialized(rows: region.rowCount, cols: region.colCount)
        copy(region, into: out.all)
        return out
    }

    public func copy(_ source: TensorRegion, into destination: TensorRegion) {
        precondition(source.rowCount == destination.rowCount && source.colCount == destination.colCount,
                     "copy: \(source) into \(destination)")
        let d = write(destination.tensor) + destination.offset
        let s = read(source.tensor) + source.offset
        let width = source.colCount
        for r in 0..<source.rowCount {
            (d + r * destination.leadingDimension).update(from: s + r * source.leadingDimension, count: width)
        }
    }

    // MARK: Dense linear algebra

    public func matmul(_ a: Tensor, _ transA: Transpose, _ b: Tensor, _ transB: Transpose) -> Tensor {
        // sgemm with beta 0 writes every element without reading it: no need to clear the
        // output first (a memset over every activation a block produces).
        let c = uninitialized(rows: transA == .none ? a.rows : a.cols, cols: transB == .none ? b.cols : b.rows)
        gemm(a.all, transA, b.all, transB, alpha: 1, beta: 0, into: c.all)
        return c
    }

    public func gemm(_ a: TensorRegion, _ transA: Transpose, _ b: TensorRegion, _ transB: Transpose,
                     alpha: Float, beta: Float, into c: TensorRegion) {
        let (m, k, kb, n) = Transpose.product(aRows: a.rowCount, aCols: a.colCount, transA,
                                              bRows: b.rowCount, bCols: b.colCount, transB)
        precondition(k == kb, "gemm: inner dimensions \(k) and \(kb) differ")
        precondition(c.rowCount == m && c.colCount == n, "gemm: output is \(c.rowCount)x\(c.colCount), expected \(m)x\(n)")
        if m == 0 || n == 0 { return }
        let pc = write(c.tensor) + c.offset
        if k == 0 {
            for r in 0..<m {
                let row = pc + r * c.leadingDimension
                for j in 0..<n { row[j] = beta == 0 ? 0 : row[j] * beta }
            }
            return
        }
        Linalg.sgemm(transA, transB, m: m, n: n, k: k, alpha: alpha,
                     a: read(a.tensor) + a.offset, lda: a.leadingDimension,
                     b: read(b.tensor) + b.offset, ldb: b.leadingDimension,
                     beta: beta, c: pc, ldc: c.leadingDimension)
    }

    public func syrkAccumulate(_ x: Tensor, alpha: Float, into c: Tensor) {
        let input = storage(x).matrix
        Linalg.syrkAccumulate(input, alpha: alpha, into: &storage(c).matrix)
    }

    public func syrkUpperUpdate(_ x: Tensor, alpha: Float, beta: Float, into c: Tensor) {
        precondition(c.rows == x.cols && c.cols == x.cols, "syrkUpperUpdate: \(x) into \(c)")
        if beta != 1 {
            // Rows in bands over the threads (each element scaled once, in any order).
            let (pc, n) = (UnsafeSendable(write(c)), c.rows)
            Parallel.forEach(n, chunk: max(1, Parallel.chunk / max(n, 1))) { rows in
                Linalg.scaleUpper(pc.value, n: n, by: beta, rows: rows)
            }
        }
        if x.rows == 0 { return }
        Linalg.syrkUpper(n: x.cols, k: x.rows, alpha: alpha, a: read(x), lda: x.cols, c: write(c), ldc: c.cols)
    }

    public func statisticsTile(columns: Int) -> Int? { Linalg.syrkTile(columns) }

    public func statisticsPieces(columns d: Int, maxColumns: Int) -> [UpperPieceShape] {
        Linalg.syrkPieces(n: d, maxColumns: maxColumns).map { UpperPieceShape(rows: $0.rows, columns: $0.columns, blocks: $0.blocks) }
    }

    public func syrkUpperUpdate(_ windows: [(x: Tensor, alpha: Float, beta: Float)], pieces: [UpperPiece]) {
        guard let d = windows.first?.x.cols else { return }
        for w in windows { precondition(w.x.cols == d, "syrkUpperUpdate: windows \(w.x) and \(windows[0].x) differ in width") }
        for p in pieces {
            precondition(p.values.rows == p.rows.count && p.values.cols == p.columns.count && p.rows.lowerBound >= 0 && p.rows.upperBound <= d
                         && p.columns.lowerBound >= 0 && p.columns.upperBound <= d,
                         "syrkUpperUpdate: rows \(p.rows) and columns \(p.columns) of a \(d)-wide update into \(p.values)")
        }
        Linalg.syrkUpperWindows(n: d, windows: windows.map { ($0.x.rows, $0.alpha, $0.beta, read($0.x), d) },
                                pieces: pieces.map { (write($0.values), $0.columns.count, $0.rows, $0.columns, $0.rows.lowerBound, $0.columns.lowerBound) })
    }

    public func mirrorUpper(_ c: Tensor) {
        precondition(c.rows == c.cols, "mirrorUpper: \(c) is not square")
        Linalg.mirrorUpperToLower(write(c), n: c.rows)
    }

    public func cholesky(_ a: Tensor, upper: Bool, what: String) throws -> Tensor {
        tensor(try Linalg.cholesky(storage(a).matrix, upper: upper, what: what))
    }

    public func inverseSPD(_ a: Tensor, what: String) throws -> Tensor {
        tensor(try Linalg.inverseSPD(storage(a).matrix, what: what))
    }

    /// One Cholesky and one triangular inverse (`Linalg.inverseCholeskyUpper`), half the FLOPs of
    /// the default's inverse and second Cholesky.
    public func inverseCholeskyFactor(_ a: Tensor, what: String) throws -> Tensor {
        tensor(try Linalg.inverseCholeskyUpper(storage(a).matrix, what: what))
    }

    public func inverseCholeskyFactorInPlace(_ a: Tensor, what: String) throws {
        // A's matrix moves out of its storage, so that the factorisation owns the only reference
        // and works in A's memory instead of a copy; U moves back in.
        let s = storage(a)
        var m = Matrix(rows: 0, cols: 0)
        swap(&m, &s.matrix)
        do {
            s.matrix = try Linalg.inverseCholeskyUpper(consume m, what: what)
        } catch {
            // A's values are gone; the tensor keeps its shape with zeros (the caller gave it up).
            s.matrix = Matrix(rows: a.rows, cols: a.cols)
            throw error
        }
    }

    public func solveTriangular(_ t: Tensor, _ b: Tensor, upper: Bool, transpose: Bool) -> Tensor {
        tensor(Linalg.solveTriangular(storage(t).matrix, storage(b).matrix, upper: upper, transpose: transpose))
    }

    public func solveSPDDouble(_ a: Tensor, _ b: Tensor, what: String) throws -> Tensor {
        tensor(try Linalg.solveSPDDouble(storage(a).matrix, storage(b).matrix, what: what))
    }

    public func solveSPDDoubleRight(_ a: Tensor, _ c: Tensor, what: String) throws -> Tensor {
        tensor(try Linalg.solveSPDDoubleRight(storage(a).matrix, storage(c).matrix, what: what))
    }

    public func inverseSPDDouble(_ a: Tensor, what: String) throws -> Tensor {
        tensor(try Linalg.inverseSPDDouble(storage(a).matrix, what: what))
    }

    public func transpose(_ x: Tensor) -> Tensor { tensor(storage(x).matrix.transposed()) }

    // MARK: Element-wise (in fixed chunks over the threads: each element's value never depends on them)

    public func scale(_ x: Tensor, by factor: Float) {
        let p = write(x)
        for i in 0..<x.count { p[i] *= factor }
    }

    public func scaleAdd(_ y: Tensor, beta: Float, _ x: Tensor, alpha: Float) {
        precondition(x.count == y.count, "scaleAdd: \(x) and \(y)")
        let py = write(y)
        let px = read(x)
        Parallel.forEach(y.count) { range in for i in range { py[i] = py[i] * beta + px[i] * alpha } }
    }

    public func axpy(_ alpha: Float, _ x: Tensor, _ y: Tensor) {
        precondition(x.count == y.count, "axpy: \(x) and \(y)")
        let py = write(y)
        Kernels.axpy(alpha, read(x), py, y.count)
    }

    public func map(_ x: Tensor, _ f: ElementwiseFunction) -> Tensor {
        let out = uninitialized(rows: x.rows, cols: x.cols)
        let po = write(out), px = read(x)
        Parallel.forEach(x.count) { range in
            switch f {
            case .abs: for i in range { po[i] = Swift.abs(px[i]) }
            case .square: for i in range { po[i] = px[i] * px[i] }
            case .squareRoot: for i in range { po[i] = px[i].squareRoot() }
            case .nonZero: for i in range { po[i] = px[i] != 0 ? 1 : 0 }
            case .negate: for i in range { po[i] = -px[i] }
            case .relu: for i in range { po[i] = max(px[i], 0) }
            case .silu: Kernels.silu(px + range.lowerBound, into: po + range.lowerBound, range.count)
            case .geluTanh: Kernels.geluTanh(px + range.lowerBound, into: po + range.lowerBound, range.count)
            }
        }
        return out
    }

    public func multiplyColumns(_ x: Tensor, by v: Tensor) -> Tensor {
        precondition(v.count == x.cols, "multiplyColumns: \(x) by \(v)")
        let out = uninitialized(rows: x.rows, cols: x.cols)
        let po = write(out), px = read(x), pv = read(v)
        let cols = x.cols
        for r in 0..<x.rows { for c in 0..<cols { po[r * cols + c] = px[r * cols + c] * pv[c] } }
        return out
    }

    public func addScaledRows(_ y: Tensor, _ x: Tensor, scales: [Float]) {
        precondition(y.rows == x.rows && y.cols == x.cols && scales.count == x.rows, "addScaledRows: \(y) += \(scales.count) scales x \(x)")
        let (py, px, cols) = (write(y), read(x), x.cols)
        for r in 0..<x.rows {
            let s = scales[r]
            for c in 0..<cols { py[r * cols + c] = py[r * cols + c] + s * px[r * cols + c] }
        }
    }

    public func rowDots(_ a: Tensor, _ b: Tensor) -> [Double] {
        precondition(a.rows == b.rows && a.cols == b.cols, "rowDots: \(a) and \(b)")
        let (pa, pb, cols) = (read(a), read(b), a.cols)
        return (0..<a.rows).map { r in
            var sum = 0.0
            for c in 0..<cols { sum += Double(pa[r * cols + c]) * Double(pb[r * cols + c]) }
            return sum
        }
    }

    public func divideColumns(_ x: Tensor, by v: Tensor) -> Tensor {
        precondition(v.count == x.cols, "divideColumns: \(x) by \(v)")
        let out = uninitialized(rows: x.rows, cols: x.cols)
        let po = write(out), px = read(x), pv = read(v)
        let cols = x.cols
        for r in 0..<x.rows { for c in 0..<cols { po[r * cols + c] = px[r * cols + c] / pv[c] } }
        return out
    }

    public func addToDiagonal(_ a: Tensor, _ value: Float) {
        precondition(a.rows == a.cols, "addToDiagonal of \(a)")
        let p = write(a)
        for j in 0..<a.rows { p[j * a.cols + j] += value }
    }

    public func multiply(_ a: Tensor, _ b: Tensor) -> Tensor {
        precondition(a.count == b.count, "multiply: \(a) and \(b)")
        let out = uninitialized(rows: a.rows, cols: a.cols)
        let po = write(out), pa = read(a), pb = read(b)
        Parallel.forEach(a.count) { range in for i in range { po[i] = pa[i] * pb[i] } }
        return out
    }

    public func addRowVector(_ x: Tensor, _ v: Tensor) -> Tensor {
        precondition(v.count == x.cols, "addRowVector: \(x) plus \(v)")
        let out = uninitialized(rows: x.rows, cols: x.cols)
        let po = write(out)
        po.update(from: read(x), count: x.count)
        Kernels.addBias(read(v), to: po, rows: x.rows, cols: x.cols)
        return out
    }

    // MARK: Reductions

    public func diagonal(_ a: Tensor) -> Tensor {
        precondition(a.rows == a.cols, "diagonal of \(a)")
        let out = uninitialized(rows: 1, cols: a.rows)
        let po = write(out), pa = read(a)
        for j in 0..<a.rows { po[j] = pa[j * a.cols + j] }
        return out
    }

    public func columnSquaredSums(_ x: Tensor) -> Tensor {
        let out = zeros(rows: 1, cols: x.cols)
        let ps = write(out), px = read(x)
        let cols = x.cols
        for t in 0..<x.rows {
            let row = px + t * cols
            for j in 0..<cols { ps[j] += row[j] * row[j] }
        }
        return out
    }

    public func sum(_ x: Tensor) -> Double {
        let p = read(x)
        var s = 0.0
        for i in 0..<x.count { s += Double(p[i]) }
        return s
    }

    /// Without the 0/1 temporary of `map(.nonZero)` (at 7B shapes its fresh pages made the
    /// sparsity count of a Wanda block cost more than its selection).
    public func zeroCount(_ x: Tensor) -> Int {
        let chunk = Parallel.chunk
        let parts = (x.count + chunk - 1) / chunk
        var counts = [Int](repeating: 0, count: parts)
        let p = UnsafeSendable(read(x))
        counts.withUnsafeMutableBufferPointer { out in
            let out = UnsafeSendable(out)
            // A count per chunk of 2^16 elements, without a branch (half of a pruned matrix is
            // zero, in no order a predictor can follow).
            Parallel.forEach(parts, chunk: 1) { range in
                for part in range {
                    let start = part * chunk, end = min(x.count, start + chunk)
                    var zeros: Int32 = 0
                    for i in start..<end { zeros &+= p.value[i] == 0 ? 1 : 0 }
                    out.value[part] = Int(zeros)
                }
            }
        }
        return counts.reduce(0, +)
    }

    public func dot(_ a: Tensor, _ b: Tensor) -> Double {
        precondition(a.count == b.count, "dot: \(a) and \(b)")
        let p = read(a), q = read(b)
        var s = 0.0
        for i in 0..<a.count { s += Double(p[i]) * Double(q[i]) }
        return s
    }

    public func allFinite(_ x: Tensor) -> Bool {
        // An element is NaN or infinite when its exponent bits are all ones: OR-ed over a chunk
        // without a branch (so the loop vectorises), chunks over the threads.
        let words = UnsafeSendable(UnsafeRawPointer(read(x)).assumingMemoryBound(to: UInt32.self))
        return Parallel.sum(x.count) { range in
            let w = words.value
            var found: UInt32 = 0
            for i in range { found |= (w[i] & 0x7f80_0000) == 0x7f80_0000 ? 1 : 0 }
            return Double(found)
        } == 0
    }

    public func chunkedDot(_ a: Tensor, _ b: Tensor) -> Double {
        precondition(a.count == b.count, "chunkedDot: \(a) and \(b)")
        let (x, y) = (read(a), read(b))
        return Parallel.sum(a.count) { range in
            var s = 0.0
            for i in range { s += Double(x[i]) * Double(y[i]) }
            return s
        }
    }

    public func chunkedSquaredDistance(_ a: Tensor, _ b: Tensor) -> Double {
        precondition(a.count == b.count, "chunkedSquaredDistance: \(a) and \(b)")
        let (x, y) = (read(a), read(b))
        return Parallel.sum(a.count) { range in
            var s = 0.0
            for i in range { let d = Double(x[i] - y[i]); s += d * d }
            return s
        }
    }

    public func chunkedSquaredDistanceToProduct(_ p: Tensor, _ u: Tensor, _ v: Tensor) -> Double {
        precondition(p.count == u.count && p.count == v.count, "chunkedSquaredDistanceToProduct: \(p), \(u), \(v)")
        let (x, a, b) = (read(p), read(u), read(v))
        return Parallel.sum(p.count) { range in
            var s = 0.0
            for i in range { let d = Double(x[i] - a[i] * b[i]); s += d * d }
            return s
        }
    }

    // MARK: Selection

    public func selectAtMostKthSmallest(_ scores: Tensor, k: Int) -> Tensor {
        let mask = zeros(rows: scores.rows, cols: scores.cols)
        if scores.count == 0 { return mask }
        let ps = read(scores), pm = write(mask)
        let threshold = Selection.kthSmallest(UnsafeBufferPointer(start: ps, count: scores.count), k)
        for i in 0..<scores.count { pm[i] = ps[i] <= threshold ? 1 : 0 }
        return mask
    }

    public func selectSmallestInRows(_ scores: Tensor, counts: [Int]) -> Tensor {
        precondition(counts.count == scores.rows, "selectSmallestInRows: \(counts.count) counts for \(scores.rows) rows")
        let mask = zeros(rows: scores.rows, cols: scores.cols)
        let cols = scores.cols
        if cols == 0 { return mask }
        let buffers = UnsafeSendable((read(scores), write(mask)))
        // Each row's k smallest under (score, column): the order of a stable sort, as
        // torch.sort(stable=True), so equal scores go in column order. Found by selection on
        // keys that pack both (linear time; a full sort per row was 9% of a Wanda prune).
        Parallel.forEach(scores.rows, chunk: 8) { range in
            let (ps, pm) = buffers.value
            var keys = [UInt64](repeating: 0, count: cols)
            for r in range {
                let k = counts[r]
                let row = ps + r * cols, out = pm + r * cols
                if k <= 0 { continue }
                if k >= cols { out.update(repeating: 1, count: cols); continue }
                for c in 0..<cols { keys[c] = Selection.key(row[c], index: c) }
                let last = Selection.kthSmallest(&keys, k - 1)
                for c in 0..<cols where Selection.key(row[c], index: c) <= last { out[c] = 1 }
            }
        }
        return mask
    }

    /// Row by row over the threads: each row's scores in a buffer of keys (the products of
    /// `map(.abs)` and `multiplyColumns`, bit for bit), its k-th smallest key by selection, and
    /// the row written once. Wanda's four whole-matrix temporaries (|W|, the scores, the mask,
    /// the copy) were a third of its block at 7B shapes, most of it the kernel clearing their
    /// fresh pages.
    public func zeroSmallestInRows(_ weight: Tensor, scale: Tensor, counts: [Int]) -> Tensor {
        precondition(counts.count == weight.rows && scale.count == weight.cols,
                     "zeroSmallestInRows: \(counts.count) counts and \(scale.count) scales for \(weight)")
        let out = uninitialized(rows: weight.rows, cols: weight.cols)
        let cols = weight.cols
        if cols == 0 || weight.rows == 0 { return out }
        let buffers = UnsafeSendable((read(weight), read(scale), write(out)))
        Parallel.forEach(weight.rows, chunk: 8) { range in
            let (pw, ps, po) = buffers.value
            var keys = [UInt64](repeating: 0, count: cols)
            for r in range {
                let k = counts[r]
                let row = pw + r * cols, dst = po + r * cols
                if k <= 0 { dst.update(from: row, count: cols); continue }
                if k >= cols { dst.update(repeating: 0, count: cols); continue }
                for c in 0..<cols { keys[c] = Selection.key(Swift.abs(row[c]) * ps[c], index: c) }
                let last = Selection.kthSmallest(&keys, k - 1)
                for c in 0..<cols { dst[c] = Selection.key(Swift.abs(row[c]) * ps[c], index: c) <= last ? 0 : row[c] }
            }
        }
        return out
    }

    public func selectNOfM(_ scores: Tensor, n: Int, m: Int) -> Tensor {
        let mask = zeros(rows: scores.rows, cols: scores.cols)
        let ps = read(scores), pm = write(mask)
        let (rows, cols) = (scores.rows, scores.cols)
        var order = [Int](repeating: 0, count: m)
        for r in 0..<rows {
            var g = 0
            while g < cols {
                let width = min(m, cols - g)
                for j in 0..<width { order[j] = j }
                let base = r * cols + g
                let sorted = order[0..<width].sorted { a, b in
                    ps[base + a] < ps[base + b] || (ps[base + a] == ps[base + b] && a < b)
                }
                for j in sorted.prefix(min(n, width)) { pm[base + j] = 1 }
                g += m
            }
        }
        return mask
    }

    public func zeroMasked(_ x: Tensor, mask: Tensor) {
        precondition(x.count == mask.count, "zeroMasked: \(x) with mask \(mask)")
        let (px, pm) = (UnsafeSendable(write(x)), UnsafeSendable(read(mask)))
        // A select, not a branch: masks are about half ones, in no order a predictor can follow.
        Parallel.forEach(x.count) { range in
            let (x, m) = (px.value, pm.value)
            for i in range { x[i] = m[i] != 0 ? 0 : x[i] }
        }
    }

    // MARK: SparseGPT kernels

    public func zeroDeadInputs(hessian: Tensor, weight: Tensor) {
        precondition(hessian.rows == weight.cols && hessian.cols == weight.cols, "zeroDeadInputs: \(hessian) for \(weight)")
        let ph = write(hessian), pw = write(weight)
        let (rows, cols) = (weight.rows, weight.cols)
        for j in 0..<cols where ph[j * cols + j] == 0 {
            ph[j * cols + j] = 1
            for r in 0..<rows { pw[r * cols + j] = 0 }
        }
    }

    /// Rows are independent, so each row runs the column loop alone, in fixed groups of rows
    /// run concurrently; the rows' losses are added in row order, whatever the thread count.
    public func sparseGPTBlock(weight: Tensor, inverseFactor: Tensor, mask: Tensor, nOfM: (n: Int, m: Int)?,
                               error: Tensor) -> Double {
        let (rows, count) = (weight.rows, weight.cols)
        precondition(inverseFactor.rows == count && inverseFactor.cols == count && mask.rows == rows && mask.cols == count
                     && error.rows == rows && error.cols == count, "sparseGPTBlock: \(weight), \(inverseFactor), \(mask), \(error)")
        var rowLosses = [Float](repeating: 0, count: rows)
        // The row loop reads the mask as bytes (a quarter of the traffic of the float mask).
        let pm = write(mask)
        var flags = [Bool](repeating: false, count: rows * count)
        let groupSize = nOfM
        flags.withUnsafeMutableBufferPointer { pf in
            for i in 0..<pf.count { pf[i] = pm[i] != 0 }
            rowLosses.withUnsafeMutableBufferPointer { pl in
                let buffers = UnsafeSendable((write(weight), read(inverseFactor), write(error), pf.baseAddress!, pl.baseAddress!))
                Parallel.forEach(rows, chunk: 32) { group in
                    let (w, h, e, m, losses) = buffers.value
                    for r in group {
                        losses[r] = Self.sparseGPTRow(w + r * count, m + r * count, e + r * count, h, count: count, nOfM: groupSize)
                    }
                }
            }
            if nOfM != nil { for i in 0..<pf.count { pm[i] = pf[i] ? 1 : 0 } }
        }
        var loss = 0.0
        for r in 0..<rows { loss += Double(rowLosses[r]) / 2 }
        return loss
    }

    /// One row of a block: prunes column by column, spreading each removed weight's error over
    /// the row's later columns; returns Σ (w - q)² / d².
    static func sparseGPTRow(_ row: UnsafeMutablePointer<Float>, _ m: UnsafeMutablePointer<Bool>, _ e: UnsafeMutablePointer<Float>,
                             _ ph: UnsafePointer<Float>, count: Int, nOfM: (n: Int, m: Int)?) -> Float {
        var rowLoss: Float = 0
        for i in 0..<count {
            let d = ph[i * count + i]
            if let group = nOfM, i % group.m == 0 {
                // Mask of this group from the current (already updated) weights.
                let (n, groupSize) = group
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

    // MARK: SparseLLM kernels

    public func sparseLLMLlamaZ(_ z: Tensor, m: Tensor, sigma: Tensor, p: Tensor, alpha a: Float, gamma c: Float) {
        precondition(z.count == m.count && z.count == sigma.count && z.count == p.count, "sparseLLMLlamaZ: \(z), \(m), \(sigma), \(p)")
        let zb = write(z)
        let (mb, sb, pb) = (read(m), read(sigma), read(p))
        Parallel.forEach(z.count) { range in
            for i in range {
                let sg = sb[i]
                zb[i] = (a * mb[i] + c * sg * pb[i]) / (a + c * sg * sg)
            }
        }
    }

    public func sparseLLMOPTZ(_ z: Tensor, m: Tensor, p: Tensor, alpha a: Float, gamma c: Float) {
        precondition(z.count == m.count && z.count == p.count, "sparseLLMOPTZ: \(z), \(m), \(p)")
        let zb = write(z)
        let (mb, pb) = (read(m), read(p))
        Parallel.forEach(z.count) { range in for i in range {
            let (mi, pi) = (mb[i], pb[i])
            let positive = max((c * pi + a * mi) / (c + a), 0)
            let negative = min(mi, 0)
            let costPositive = c * (pi - positive) * (pi - positive) + a * (positive - mi) * (positive - mi)
            let costNegative = c * pi * pi + a * (negative - mi) * (negative - mi)
            zb[i] = costPositive <= costNegative ? positive : negative
        } }
    }

    public func sparseLLMGate(_ s: Tensor, g: Tensor, z: Tensor, p: Tensor, alpha a: Float, gamma c: Float, steps: Int,
                              activation: GatedActivation) {
        precondition(s.count == g.count && s.count == z.count && s.count == p.count, "sparseLLMGate: \(s), \(g), \(z), \(p)")
        let sb = write(s)
        let (gb, zb, pb) = (read(g), read(z), read(p))
        let pointers = UnsafeSendable((sb, gb, zb, pb))
        Parallel.forEach(s.count) { range in
            let (sb, gb, zb, pb) = pointers.value
            let o = range.lowerBound
            Kernels.sparseLLMGate(s: sb + o, g: gb + o, z: zb + o, p: pb + o, range.count, alpha: a, gamma: c, steps: steps,
                                  activation: activation)
        }
    }

    /// The default's five passes over the chunk as one: each `Parallel` chunk (the ranges that
    /// `map`, `gatedActivation` and the chunked sums use) in pieces of `llamaPassPiece`
    /// elements, each piece's activations as `map` and `gatedActivation` make them (SiLU,
    /// SwiGLU, GELU and GEGLU by the same vector kernels; ReLU's by the same expressions) and
    /// its terms added in index order, the chunks' sums by `Parallel.sums` as `Parallel.sum` adds
    /// them, so every value and every sum is the one the default computes.
    public func sparseLLMLlamaPass(s: Tensor, z: Tensor, p: Tensor, g: Tensor, m: Tensor,
                                   activation act: GatedActivation) -> SparseLLMLlamaPass {
        precondition([z, p, g, m].allSatisfy { $0.rows == s.rows && $0.cols == s.cols }, "sparseLLMLlamaPass: \(s), \(z), \(p), \(g), \(m)")
        let sigma = uninitialized(rows: s.rows, cols: s.cols)
        let activation = uninitialized(rows: s.rows, cols: s.cols)
        let gated = uninitialized(rows: s.rows, cols: s.cols)
        let inputs = UnsafeSendable((read(s), read(z), read(p), read(g), read(m)))
        let outputs = UnsafeSendable((write(sigma), write(activation), write(gated)))
        let sums = Parallel.sums(s.count, width: 3) { range, out in
            let (ps, pz, pp, pg, pm) = inputs.value
            let (pSigma, pAct, pGated) = outputs.value
            var (gate, up, product) = (0.0, 0.0, 0.0)
            for start in stride(from: range.lowerBound, to: range.upperBound, by: Self.llamaPassPiece) {
                let n = min(Self.llamaPassPiece, range.upperBound - start)
                switch act {
                case .silu:
                    Kernels.silu(ps + start, into: pSigma + start, n)
                    (pGated + start).update(from: pg + start, count: n)
                    Kernels.swiglu(gate: pGated + start, up: pm + start, n)
                case .geluTanh:
                    Kernels.geluTanh(ps + start, into: pSigma + start, n)
                    (pGated + start).update(from: pg + start, count: n)
                    Kernels.geglu(gate: pGated + start, up: pm + start, n)
                case .relu:
                    for i in start..<(start + n) {
                        pSigma[i] = max(ps[i], 0)
                        pGated[i] = max(pg[i], 0) * pm[i]
                    }
                }
                for i in start..<(start + n) {
                    let dg = Double(ps[i] - pg[i])
                    gate += dg * dg
                    let du = Double(pz[i] - pm[i])
                    up += du * du
                    let a = pSigma[i] * pz[i]
                    pAct[i] = a
                    let dp = Double(pp[i] - a)
                    product += dp * dp
                }
            }
            (out[0], out[1], out[2]) = (gate, up, product)
        }
        return SparseLLMLlamaPass(sigma: sigma, activation: activation, gated: gated, gateDistance: sums[0],
                                  upDistance: sums[1], productDistance: sums[2])
    }

    /// Elements per piece of `sparseLLMLlamaPass` (16 KiB an array: the piece's eight arrays
    /// stay in the core's L2 between its kernels).
    static let llamaPassPiece = 4096

    // MARK: Storage

    /// A tensor whose elements the caller writes, every one, before any is read.
    func uninitialized(rows: Int, cols: Int) -> Tensor { tensor(Matrix(rows: rows, cols: cols, uninitialized: ())) }

    func tensor(_ matrix: Matrix) -> Tensor {
        Tensor(rows: matrix.rows, cols: matrix.cols, storage: CPUTensorStorage(matrix))
    }

    func storage(_ t: Tensor) -> CPUTensorStorage {
        guard let s = t.storage as? CPUTensorStorage else { preconditionFailure("CPUBackend: \(t) belongs to another backend") }
        return s
    }

    func read(_ t: Tensor) -> UnsafePointer<Float> { UnsafePointer(storage(t).matrix.storage.pointer) }
    func write(_ t: Tensor) -> UnsafeMutablePointer<Float> { storage(t).writablePointer() }
}

/// A CPU tensor's memory: a host `Matrix`, shared copy-on-write with the matrix it was uploaded
/// from or downloaded to, so the first write through either side copies it.
final class CPUTensorStorage: TensorStorage, @unchecked Sendable {
    var matrix: Matrix
    init(_ matrix: Matrix) { self.matrix = matrix }

    func writablePointer() -> UnsafeMutablePointer<Float> {
        matrix.makeUnique()
        return matrix.storage.pointer
    }
}

/// Selection of order statistics without a full sort.
public enum Selection {
    /// A key whose unsigned order is (value, index)'s: the value's order as Float's `<` (with
    /// -0 as +0, so that equal values tie and go by index) in the high 32 bits, the index below.
    @inlinable @inline(__always)
    public static func key(_ value: Float, index: Int) -> UInt64 {
        let bits = (value + 0).bitPattern   // -0 + 0 is +0
        let ordered = bits & 0x8000_0000 != 0 ? ~bits : bits | 0x8000_0000
        return UInt64(ordered) << 32 | UInt64(UInt32(truncatingIfNeeded: index))
    }

    /// The k-th smallest value (0-based) of `values` (no NaN) by radix selection on the order
    /// keys of their bits: three passes of 11, 11 and 10 bits, each a histogram over the values
    /// that share the bits chosen so far. The same value as sorting would give (-0 and +0 tie; the
    /// one returned is +0); a quickselect over SparseGPT's column blocks was 8% of its solve.
    /// k is clamped to the range.
    public static func kthSmallest(_ values: UnsafeBufferPointer<Float>, _ k: Int) -> Float {
        precondition(!values.isEmpty)
        var rank = min(max(k, 0), values.count - 1)
        @inline(__always) func ordered(_ v: Float) -> UInt32 {
            let bits = (v + 0).bitPattern
            return bits & 0x8000_0000 != 0 ? ~bits : bits | 0x8000_0000
        }
        var prefix: UInt32 = 0
        var histogram = [Int](repeating: 0, count: 2048)
        for (shift, width) in [(21, 11), (10, 11), (0, 10)] {
            let fixedMask: UInt32 = shift + width == 32 ? 0 : ~UInt32(0) << UInt32(shift + width)
            let digitMask = UInt32((1 << width) - 1)
            for i in 0..<(1 << width) { histogram[i] = 0 }
            histogram.withUnsafeMutableBufferPointer { h in
                for v in values {
                    let key = ordered(v)
                    if key & fixedMask == prefix { h[Int((key >> UInt32(shift)) & digitMask)] += 1 }
                }
            }
            var digit = 0
            while rank >= histogram[digit] {
                rank -= histogram[digit]
                digit += 1
            }
            prefix |= UInt32(digit) << UInt32(shift)
        }
        let bits = prefix & 0x8000_0000 != 0 ? prefix & 0x7FFF_FFFF : ~prefix
        return Float(bitPattern: bits)
    }

    /// The k-th smallest value (0-based) of `values`, reordering them. k is clamped to the range.
    @inlinable
    public static func kthSmallest<T: Comparable>(_ values: inout [T], _ k: Int) -> T {
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
