#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Every operation of `ComputeBackend` in double precision on the host: the yardstick against
/// which the Float32 backends' rounding error is measured (`--precision f64`), meant for small
/// models. Tensors hold Float64; `upload` widens the host's Float32 exactly and `download` rounds
/// to Float32 (`downloadValues` keeps the doubles). Products go through OpenBLAS's dgemm/dsyrk and
/// LAPACK's dpotrf/dpotri/dtrsm/dposv; everything else is a plain loop in Float64 (sums in index
/// order, softmax, norms, RoPE angles and cos/sin in Float64). Masks and indices are Float64
/// tensors holding 0/1 and exact integers. Scalars that the protocol passes as Float (eps,
/// scales, alpha) are widened as they are.
///
/// It follows the protocol's orders where they define a result (selections and their ties, the
/// SparseGPT column loop, the row order of sums) and makes no attempt to give the CPU's bits:
/// its results differ from `CPUBackend`'s by the Float32 rounding of the latter.
public struct Float64Backend: ComputeBackend {
    /// Where RoPE's angles come from: Float64 (the default), or the table's Float32 cos/sin (the
    /// angles llama2.c and transformers compute, in transformers even for a float64 model), to
    /// measure what the Float32 angles alone cost.
    public enum RopeAngles: String, Sendable { case float64, float32Table }
    public let ropeAngles: RopeAngles

    public init(ropeAngles: RopeAngles = .float64) { self.ropeAngles = ropeAngles }
    public var name: String { "cpu-f64 (OpenBLAS, Float64, \(Linalg.threadCount) threads)" }

    // MARK: Memory and transfers

    public func upload(_ matrix: Matrix) -> Tensor {
        let out = uninitialized(rows: matrix.rows, cols: matrix.cols)
        let p = write(out)
        matrix.withUnsafeBufferPointer { m in for i in 0..<m.count { p[i] = Double(m[i]) } }
        return out
    }

    public func download(_ tensor: Tensor) -> Matrix {
        let p = read(tensor)
        return Matrix(rows: tensor.rows, cols: tensor.cols) { m in for i in 0..<m.count { m[i] = Float(p[i]) } }
    }

    /// The tensor's values without rounding, row-major.
    public func downloadValues(_ tensor: Tensor) -> [Double] {
        Array(UnsafeBufferPointer(start: read(tensor), count: tensor.count))
    }

    /// A tensor holding `values` (row-major) exactly.
    public func upload(values: [Double], rows: Int, cols: Int) -> Tensor {
        precondition(values.count == rows * cols, "upload: \(values.count) values for \(rows)x\(cols)")
        let out = uninitialized(rows: rows, cols: cols)
        values.withUnsafeBufferPointer { write(out).update(from: $0.baseAddress!, count: values.count) }
        return out
    }

    public func zeros(rows: Int, cols: Int) -> Tensor {
        Tensor(rows: rows, cols: cols, dtype: .float64, storage: Float64Storage(count: rows * cols, zeroed: true))
    }

    public func copy(_ region: TensorRegion) -> Tensor {
        let out = uninitialized(rows: region.rowCount, cols: region.colCount)
        copy(region, into: out.all)
        return out
    }

    public func copy(_ source: TensorRegion, into destination: TensorRegion) {
        precondition(source.rowCount == destination.rowCount && source.colCount == destination.colCount,
                     "copy: \(source) into \(destination)")
        let d = write(destination.tensor) + destination.offset
        let s = read(source.tensor) + source.offset
        for r in 0..<source.rowCount {
            (d + r * destination.leadingDimension).update(from: s + r * source.leadingDimension, count: source.colCount)
        }
    }

    // MARK: Dense linear algebra

    public func gemm(_ a: TensorRegion, _ transA: Transpose, _ b: TensorRegion, _ transB: Transpose,
                     alpha: Float, beta: Float, into c: TensorRegion) {
        let (m, k, kb, n) = Transpose.product(aRows: a.rowCount, aCols: a.colCount, transA,
                                              bRows: b.rowCount, bCols: b.colCount, transB)
        precondition(k == kb, "gemm: inner dimensions \(k) and \(kb) differ")
        precondition(c.rowCount == m && c.colCount == n, "gemm: output is \(c.rowCount)x\(c.colCount), expected \(m)x\(n)")
        Linalg.dgemm(transA, transB, m: m, n: n, k: k, alpha: Double(alpha),
                     a: read(a.tensor) + a.offset, lda: a.leadingDimension,
                     b: read(b.tensor) + b.offset, ldb: b.leadingDimension,
                     beta: Double(beta), c: write(c.tensor) + c.offset, ldc: c.leadingDimension)
    }

    public func syrkAccumulate(_ x: Tensor, alpha: Float, into c: Tensor) {
        precondition(c.rows == x.cols && c.cols == x.cols, "syrkAccumulate: \(x) into \(c)")
        Linalg.dsyrkAccumulate(n: x.rows, d: x.cols, alpha: Double(alpha), x: read(x), c: write(c))
    }

    public func syrkUpperUpdate(_ x: Tensor, alpha: Float, beta: Float, into c: Tensor) {
        precondition(c.rows == x.cols && c.cols == x.cols, "syrkUpperUpdate: \(x) into \(c)")
        if beta != 1 { Linalg.scaleUpper(write(c), n: c.rows, by: Double(beta)) }
        Linalg.dsyrkAccumulate(n: x.rows, d: x.cols, alpha: Double(alpha), x: read(x), c: write(c), mirror: false)
    }

    public func mirrorUpper(_ c: Tensor) {
        precondition(c.rows == c.cols, "mirrorUpper: \(c) is not square")
        Linalg.mirrorUpperToLower(write(c), n: c.rows)
    }

    public func cholesky(_ a: Tensor, upper: Bool, what: String) throws -> Tensor {
        precondition(a.rows == a.cols, "cholesky of \(a)")
        let f = copy(a)
        let minor = Linalg.dcholesky(write(f), n: a.rows, upper: upper)
        if minor > 0 { throw LinalgError.notPositiveDefinite(what: what, minor: minor) }
        return f
    }

    public func inverseSPD(_ a: Tensor, what: String) throws -> Tensor {
        precondition(a.rows == a.cols, "inverseSPD of \(a)")
        let f = copy(a)
        try Linalg.dinverseSPD(write(f), n: a.rows, what: what)
        return f
    }

    public func solveTriangular(_ t: Tensor, _ b: Tensor, upper: Bool, transpose: Bool) -> Tensor {
        precondition(t.rows == t.cols && t.rows == b.rows, "solveTriangular: \(t) with \(b)")
        let x = copy(b)
        Linalg.dsolveTriangular(read(t), write(x), n: t.rows, k: b.cols, upper: upper, transpose: transpose)
        return x
    }

    public func solveSPDDouble(_ a: Tensor, _ b: Tensor, what: String) throws -> Tensor {
        precondition(a.rows == a.cols && a.rows == b.rows, "solveSPDDouble: \(a) with \(b)")
        let (f, x) = (copy(a), copy(b))
        try Linalg.dsolveSPD(write(f), write(x), n: a.rows, k: b.cols, what: what)
        return x
    }

    public func inverseSPDDouble(_ a: Tensor, what: String) throws -> Tensor { try inverseSPD(a, what: what) }

    public func transpose(_ x: Tensor) -> Tensor {
        let out = uninitialized(rows: x.cols, cols: x.rows)
        let (px, po) = (read(x), write(out))
        for r in 0..<x.rows { for c in 0..<x.cols { po[c * x.rows + r] = px[r * x.cols + c] } }
        return out
    }

    // MARK: Element-wise

    public func scale(_ x: Tensor, by factor: Float) {
        let (p, f) = (write(x), Double(factor))
        for i in 0..<x.count { p[i] *= f }
    }

    public func scaleAdd(_ y: Tensor, beta: Float, _ x: Tensor, alpha: Float) {
        precondition(x.count == y.count, "scaleAdd: \(x) and \(y)")
        let (py, px, b, a) = (write(y), read(x), Double(beta), Double(alpha))
        for i in 0..<y.count { py[i] = py[i] * b + px[i] * a }
    }

    public func axpy(_ alpha: Float, _ x: Tensor, _ y: Tensor) {
        precondition(x.count == y.count, "axpy: \(x) and \(y)")
        let (py, px, a) = (write(y), read(x), Double(alpha))
        for i in 0..<y.count { py[i] += a * px[i] }
    }

    public func map(_ x: Tensor, _ f: ElementwiseFunction) -> Tensor {
        let out = uninitialized(rows: x.rows, cols: x.cols)
        let (po, px) = (write(out), read(x))
        for i in 0..<x.count {
            let v = px[i]
            switch f {
            case .abs: po[i] = Swift.abs(v)
            case .square: po[i] = v * v
            case .squareRoot: po[i] = v.squareRoot()
            case .nonZero: po[i] = v != 0 ? 1 : 0
            case .negate: po[i] = -v
            case .relu: po[i] = max(v, 0)
            case .silu: po[i] = Self.silu(v)
            case .geluTanh: po[i] = Self.geluTanh(v)
            }
        }
        return out
    }

    public func multiplyColumns(_ x: Tensor, by v: Tensor) -> Tensor {
        precondition(v.count == x.cols, "multiplyColumns: \(x) by \(v)")
        let out = uninitialized(rows: x.rows, cols: x.cols)
        let (po, px, pv, cols) = (write(out), read(x), read(v), x.cols)
        for r in 0..<x.rows { for c in 0..<cols { po[r * cols + c] = px[r * cols + c] * pv[c] } }
        return out
    }

    public func addScaledRows(_ y: Tensor, _ x: Tensor, scales: [Float]) {
        precondition(y.rows == x.rows && y.cols == x.cols && scales.count == x.rows, "addScaledRows: \(y) += \(scales.count) scales x \(x)")
        let (py, px, cols) = (write(y), read(x), x.cols)
        for r in 0..<x.rows {
            let s = Double(scales[r])
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
        let (po, px, pv, cols) = (write(out), read(x), read(v), x.cols)
        for r in 0..<x.rows { for c in 0..<cols { po[r * cols + c] = px[r * cols + c] / pv[c] } }
        return out
    }

    public func addToDiagonal(_ a: Tensor, _ value: Float) {
        precondition(a.rows == a.cols, "addToDiagonal of \(a)")
        let p = write(a)
        for j in 0..<a.rows { p[j * a.cols + j] += Double(value) }
    }

    public func multiply(_ a: Tensor, _ b: Tensor) -> Tensor {
        precondition(a.count == b.count, "multiply: \(a) and \(b)")
        let out = uninitialized(rows: a.rows, cols: a.cols)
        let (po, pa, pb) = (write(out), read(a), read(b))
        for i in 0..<a.count { po[i] = pa[i] * pb[i] }
        return out
    }

    public func addRowVector(_ x: Tensor, _ v: Tensor) -> Tensor {
        let out = copy(x)
        addRowVector(v, into: out)
        return out
    }

    // MARK: Reductions (index order, in Float64)

    public func diagonal(_ a: Tensor) -> Tensor {
        precondition(a.rows == a.cols, "diagonal of \(a)")
        let out = uninitialized(rows: 1, cols: a.rows)
        let (po, pa) = (write(out), read(a))
        for j in 0..<a.rows { po[j] = pa[j * a.cols + j] }
        return out
    }

    public func columnSquaredSums(_ x: Tensor) -> Tensor {
        let out = zeros(rows: 1, cols: x.cols)
        let (ps, px, cols) = (write(out), read(x), x.cols)
        for t in 0..<x.rows { for j in 0..<cols { let v = px[t * cols + j]; ps[j] += v * v } }
        return out
    }

    public func sum(_ x: Tensor) -> Double {
        let p = read(x)
        var s = 0.0
        for i in 0..<x.count { s += p[i] }
        return s
    }

    public func dot(_ a: Tensor, _ b: Tensor) -> Double {
        precondition(a.count == b.count, "dot: \(a) and \(b)")
        let (p, q) = (read(a), read(b))
        var s = 0.0
        for i in 0..<a.count { s += p[i] * q[i] }
        return s
    }

    public func allFinite(_ x: Tensor) -> Bool {
        let p = read(x)
        for i in 0..<x.count where !p[i].isFinite { return false }
        return true
    }

    public func chunkedDot(_ a: Tensor, _ b: Tensor) -> Double {
        precondition(a.count == b.count, "chunkedDot: \(a) and \(b)")
        let (x, y) = (read(a), read(b))
        return Parallel.sum(a.count) { range in
            var s = 0.0
            for i in range { s += x[i] * y[i] }
            return s
        }
    }

    public func chunkedSquaredDistance(_ a: Tensor, _ b: Tensor) -> Double {
        precondition(a.count == b.count, "chunkedSquaredDistance: \(a) and \(b)")
        let (x, y) = (read(a), read(b))
        return Parallel.sum(a.count) { range in
            var s = 0.0
            for i in range { let d = x[i] - y[i]; s += d * d }
            return s
        }
    }

    public func chunkedSquaredDistanceToProduct(_ p: Tensor, _ u: Tensor, _ v: Tensor) -> Double {
        precondition(p.count == u.count && p.count == v.count, "chunkedSquaredDistanceToProduct: \(p), \(u), \(v)")
        let (x, a, b) = (read(p), read(u), read(v))
        return Parallel.sum(p.count) { range in
            var s = 0.0
            for i in range { let d = x[i] - a[i] * b[i]; s += d * d }
            return s
        }
    }

    // MARK: Selection

    public func selectAtMostKthSmallest(_ scores: Tensor, k: Int) -> Tensor {
        let mask = zeros(rows: scores.rows, cols: scores.cols)
        if scores.count == 0 { return mask }
        let (ps, pm) = (read(scores), write(mask))
        var values = Array(UnsafeBufferPointer(start: ps, count: scores.count))
        values.sort()
        let threshold = values[min(max(k, 0), values.count - 1)]
        for i in 0..<scores.count where ps[i] <= threshold { pm[i] = 1 }
        return mask
    }

    public func selectSmallestInRows(_ scores: Tensor, counts: [Int]) -> Tensor {
        precondition(counts.count == scores.rows, "selectSmallestInRows: \(counts.count) counts for \(scores.rows) rows")
        let mask = zeros(rows: scores.rows, cols: scores.cols)
        let (ps, pm, cols) = (read(scores), write(mask), scores.cols)
        for r in 0..<scores.rows {
            for c in Self.stableOrder(ps + r * cols, cols).prefix(max(counts[r], 0)) { pm[r * cols + c] = 1 }
        }
        return mask
    }

    public func selectNOfM(_ scores: Tensor, n: Int, m: Int) -> Tensor {
        let mask = zeros(rows: scores.rows, cols: scores.cols)
        let (ps, pm, cols) = (read(scores), write(mask), scores.cols)
        for r in 0..<scores.rows {
            var g = 0
            while g < cols {
                let width = min(m, cols - g)
                let base = r * cols + g
                for j in Self.stableOrder(ps + base, width).prefix(min(n, width)) { pm[base + j] = 1 }
                g += m
            }
        }
        return mask
    }

    public func zeroMasked(_ x: Tensor, mask: Tensor) {
        precondition(x.count == mask.count, "zeroMasked: \(x) with mask \(mask)")
        let (px, pm) = (write(x), read(mask))
        for i in 0..<x.count where pm[i] != 0 { px[i] = 0 }
    }

    /// Indices 0..<n in ascending order of p[i], equal values by index (a stable sort).
    static func stableOrder(_ p: UnsafePointer<Double>, _ n: Int) -> [Int] {
        Array(0..<n).sorted { a, b in p[a] < p[b] || (p[a] == p[b] && a < b) }
    }

    // MARK: SparseGPT kernels

    public func zeroDeadInputs(hessian: Tensor, weight: Tensor) {
        precondition(hessian.rows == weight.cols && hessian.cols == weight.cols, "zeroDeadInputs: \(hessian) for \(weight)")
        let (ph, pw, rows, cols) = (write(hessian), write(weight), weight.rows, weight.cols)
        for j in 0..<cols where ph[j * cols + j] == 0 {
            ph[j * cols + j] = 1
            for r in 0..<rows { pw[r * cols + j] = 0 }
        }
    }

    /// The CPU's row loop in Float64, rows in fixed groups run concurrently, losses added in row order.
    public func sparseGPTBlock(weight: Tensor, inverseFactor: Tensor, mask: Tensor, nOfM: (n: Int, m: Int)?,
                               error: Tensor) -> Double {
        let (rows, count) = (weight.rows, weight.cols)
        precondition(inverseFactor.rows == count && inverseFactor.cols == count && mask.rows == rows && mask.cols == count
                     && error.rows == rows && error.cols == count, "sparseGPTBlock: \(weight), \(inverseFactor), \(mask), \(error)")
        var rowLosses = [Double](repeating: 0, count: rows)
        let group = nOfM
        rowLosses.withUnsafeMutableBufferPointer { pl in
            let buffers = UnsafeSendable((write(weight), read(inverseFactor), write(mask), write(error), pl.baseAddress!))
            Parallel.forEach(rows, chunk: 32) { range in
                let (w, h, m, e, losses) = buffers.value
                for r in range {
                    losses[r] = Self.sparseGPTRow(w + r * count, m + r * count, e + r * count, h, count: count, nOfM: group)
                }
            }
        }
        var loss = 0.0
        for r in 0..<rows { loss += rowLosses[r] / 2 }
        return loss
    }

    static func sparseGPTRow(_ row: UnsafeMutablePointer<Double>, _ m: UnsafeMutablePointer<Double>, _ e: UnsafeMutablePointer<Double>,
                             _ ph: UnsafePointer<Double>, count: Int, nOfM: (n: Int, m: Int)?) -> Double {
        var rowLoss = 0.0
        for i in 0..<count {
            let d = ph[i * count + i]
            if let group = nOfM, i % group.m == 0 {
                let width = min(group.m, count - i)
                let idx = Array(0..<width).sorted { a, b in
                    let da = ph[(i + a) * count + i + a], db = ph[(i + b) * count + i + b]
                    let sa = row[i + a] * row[i + a] / (da * da), sb = row[i + b] * row[i + b] / (db * db)
                    return sa < sb || (sa == sb && a < b)
                }
                for j in idx.prefix(min(group.n, width)) { m[i + j] = 1 }
            }
            let v = row[i]
            let q = m[i] != 0 ? 0 : v
            let ei = (v - q) / d
            rowLoss += (v - q) * (v - q) / (d * d)
            e[i] = ei
            row[i] = q
            if ei != 0 {
                let hrow = ph + i * count
                for j in (i + 1)..<count { row[j] -= ei * hrow[j] }
            }
        }
        return rowLoss
    }

    // MARK: SparseLLM kernels

    public func sparseLLMLlamaZ(_ z: Tensor, m: Tensor, sigma: Tensor, p: Tensor, alpha: Float, gamma: Float) {
        precondition(z.count == m.count && z.count == sigma.count && z.count == p.count, "sparseLLMLlamaZ: \(z), \(m), \(sigma), \(p)")
        let (zb, mb, sb, pb, a, c) = (write(z), read(m), read(sigma), read(p), Double(alpha), Double(gamma))
        for i in 0..<z.count { let sg = sb[i]; zb[i] = (a * mb[i] + c * sg * pb[i]) / (a + c * sg * sg) }
    }

    public func sparseLLMOPTZ(_ z: Tensor, m: Tensor, p: Tensor, alpha: Float, gamma: Float) {
        precondition(z.count == m.count && z.count == p.count, "sparseLLMOPTZ: \(z), \(m), \(p)")
        let (zb, mb, pb, a, c) = (write(z), read(m), read(p), Double(alpha), Double(gamma))
        for i in 0..<z.count {
            let (mi, pi) = (mb[i], pb[i])
            let positive = max((c * pi + a * mi) / (c + a), 0)
            let negative = min(mi, 0)
            let costPositive = c * (pi - positive) * (pi - positive) + a * (positive - mi) * (positive - mi)
            let costNegative = c * pi * pi + a * (negative - mi) * (negative - mi)
            zb[i] = costPositive <= costNegative ? positive : negative
        }
    }

    public func sparseLLMGate(_ s: Tensor, g: Tensor, z: Tensor, p: Tensor, alpha: Float, gamma: Float, steps: Int,
                              activation: GatedActivation) {
        precondition(s.count == g.count && s.count == z.count && s.count == p.count, "sparseLLMGate: \(s), \(g), \(z), \(p)")
        let (sb, gb, zb, pb, a, c) = (write(s), read(g), read(z), read(p), Double(alpha), Double(gamma))
        for i in 0..<s.count {
            let (gi, zi, pi) = (gb[i], zb[i], pb[i])
            if activation == .relu {
                // The two branches' minimisers, the better one (the positive on a tie).
                guard steps > 0 else { continue }
                let negative = min(gi, 0), positive = max((a * gi + c * pi * zi) / (a + c * zi * zi), 0)
                let costNegative = a * (negative - gi) * (negative - gi) + c * pi * pi
                let costPositive = a * (positive - gi) * (positive - gi) + c * (pi - positive * zi) * (pi - positive * zi)
                sb[i] = costPositive <= costNegative ? positive : negative
                continue
            }
            var si = sb[i]
            func cost(_ v: Double) -> Double {
                let r = pi - (activation == .silu ? Self.silu(v) : Self.geluTanh(v)) * zi
                return a * (v - gi) * (v - gi) + c * r * r
            }
            var f = cost(si)
            for _ in 0..<steps {
                let (value, d1, d2) = Self.gateActivation(si, activation)
                let r = pi - value * zi
                let grad = 2 * a * (si - gi) - 2 * c * zi * d1 * r
                let gaussNewton = 2 * a + 2 * c * zi * zi * d1 * d1
                var curvature = gaussNewton - 2 * c * zi * d2 * r
                if !(curvature > 0) { curvature = gaussNewton }
                var delta = -grad / curvature
                // The CPU's convergence test, so both stop at the same point of the problem.
                let bound = 1e-6 * max(1, Swift.abs(si))
                if Swift.abs(delta) <= bound { break }
                var accepted = false
                for _ in 0..<20 {
                    let trial = si + delta
                    let ft = cost(trial)
                    if ft.isFinite && ft <= f { si = trial; f = ft; accepted = true; break }
                    delta *= 0.5
                    if Swift.abs(delta) <= bound { break }          // no descent above the tolerance
                }
                if !accepted { break }
            }
            sb[i] = si
        }
    }

    /// act(v), act′(v) and act″(v) of SiLU or GELU-tanh (the gate's Newton steps; GELU-tanh's
    /// value and slope are the forward's and backward's).
    static func gateActivation(_ v: Double, _ activation: GatedActivation) -> (value: Double, d1: Double, d2: Double) {
        switch activation {
        case .silu:
            let sg = 1 / (1 + exp(-v))
            return (v * sg, sg * (1 + v * (1 - sg)), sg * (1 - sg) * (2 + v * (1 - 2 * sg)))
        case .geluTanh:
            // act″ = (1 − t²)u′ + v(1 − t²)(u″ − 2tu′²)/2 with t = tanh(u), u = k(v + bv³).
            let b = 0.044715
            let t = tanh(geluC * (v + b * v * v * v)), du = geluC * (1 + 3 * b * v * v), ddu = 6 * geluC * b * v, q = 1 - t * t
            return (geluTanh(v), geluTanhDerivative(v), q * du + 0.5 * v * q * (ddu - 2 * t * du * du))
        case .relu:
            preconditionFailure("a ReLU gate has its exact minimiser, not Newton steps")
        }
    }

    // MARK: Storage

    @inline(__always) static func silu(_ x: Double) -> Double { x / (1 + exp(-x)) }

    /// A tensor whose elements the caller writes, every one, before any is read.
    func uninitialized(rows: Int, cols: Int) -> Tensor {
        Tensor(rows: rows, cols: cols, dtype: .float64, storage: Float64Storage(count: rows * cols, zeroed: false))
    }

    func storage(_ t: Tensor) -> Float64Storage {
        guard let s = t.storage as? Float64Storage else { preconditionFailure("Float64Backend: \(t) belongs to another backend") }
        return s
    }

    func read(_ t: Tensor) -> UnsafePointer<Double> { UnsafePointer(storage(t).pointer) }
    func write(_ t: Tensor) -> UnsafeMutablePointer<Double> { storage(t).pointer }
}

/// A Float64 tensor's memory on the host (not shared: every upload, copy and reshape owns its own).
final class Float64Storage: TensorStorage, @unchecked Sendable {
    let pointer: UnsafeMutablePointer<Double>

    init(count: Int, zeroed: Bool) {
        pointer = .allocate(capacity: max(count, 1))
        if zeroed { pointer.initialize(repeating: 0, count: max(count, 1)) }
    }

    deinit { pointer.deallocate() }
}
