import Foundation

/// A backend for tests: forwards every call to `inner` after checking its shapes (a mismatch
/// traps with the call and the shapes named), checks that results are finite, and counts
/// transfers (calls and bytes), calls by operation and floating-point operations.
///
/// `forbidTransfers(_:_:)` opens a window in which any upload or download is a violation: a
/// solve that moves its weights to the host mid-solve, or a block its activations mid-block,
/// fails the test that opened it. Violations are recorded, not trapped, so that a test can
/// assert on them (`violations == []`).
public final class CheckingBackend: ComputeBackend, @unchecked Sendable {
    public struct Counts: Sendable, Equatable {
        public var uploads = 0
        public var uploadBytes = 0
        public var downloads = 0
        public var downloadBytes = 0
        /// Floating-point operations of the calls, by the usual dense estimates.
        public var flops: Double = 0
        /// Calls by operation name.
        public var calls: [String: Int] = [:]
        /// FLOPs by operation name.
        public var flopsByCall: [String: Double] = [:]

        public var transfers: Int { uploads + downloads }
    }

    public let inner: any ComputeBackend
    private let lock = NSLock()
    private var tally = Counts()
    private var recorded: [String] = []
    private var windows: [String] = []

    public init(_ inner: any ComputeBackend = CPUBackend()) { self.inner = inner }

    public var name: String { "checking(\(inner.name))" }
    public var counts: Counts { lock.withLock { tally } }
    public var violations: [String] { lock.withLock { recorded } }

    /// Clears the counts and the recorded violations.
    public func reset() { lock.withLock { tally = Counts(); recorded = [] } }

    /// Runs `body` with transfers forbidden: each one inside is recorded as a violation naming `label`.
    public func forbidTransfers<R>(_ label: String, _ body: () throws -> R) rethrows -> R {
        lock.withLock { windows.append(label) }
        defer { lock.withLock { _ = windows.removeLast() } }
        return try body()
    }

    public func withoutTransfers<R>(_ label: String, _ body: () throws -> R) rethrows -> R {
        try forbidTransfers(label, body)
    }

    public func synchronize() { inner.synchronize() }

    // MARK: Memory and transfers

    public func upload(_ matrix: Matrix) -> Tensor {
        transfer("upload", matrix.count * 4)
        let t = inner.upload(matrix)
        require(t.rows == matrix.rows && t.cols == matrix.cols, "upload of \(matrix) gave \(t)")
        return t
    }

    public func download(_ tensor: Tensor) -> Matrix {
        transfer("download", tensor.byteCount)
        let m = inner.download(tensor)
        require(m.rows == tensor.rows && m.cols == tensor.cols, "download of \(tensor) gave \(m)")
        return m
    }

    public func zeros(rows: Int, cols: Int) -> Tensor {
        record("zeros")
        return inner.zeros(rows: rows, cols: cols)
    }

    public func copy(_ region: TensorRegion) -> Tensor {
        record("copy")
        return inner.copy(region)
    }

    public func copy(_ source: TensorRegion, into destination: TensorRegion) {
        require(source.rowCount == destination.rowCount && source.colCount == destination.colCount, "copy: \(source) into \(destination)")
        record("copyInto")
        inner.copy(source, into: destination)
    }

    // MARK: Dense linear algebra

    public func gemm(_ a: TensorRegion, _ transA: Transpose, _ b: TensorRegion, _ transB: Transpose,
                     alpha: Float, beta: Float, into c: TensorRegion) {
        let (m, k, kb, n) = Transpose.product(aRows: a.rowCount, aCols: a.colCount, transA,
                                              bRows: b.rowCount, bCols: b.colCount, transB)
        require(k == kb, "gemm: op(\(a)) is \(m)x\(k) but op(\(b)) is \(kb)x\(n)")
        require(c.rowCount == m && c.colCount == n, "gemm: output \(c) for a \(m)x\(n) product")
        require(!c.tensor.isSameStorage(a.tensor) && !c.tensor.isSameStorage(b.tensor), "gemm: output \(c) is also an input")
        record("gemm", flops: 2 * Double(m) * Double(n) * Double(k))
        inner.gemm(a, transA, b, transB, alpha: alpha, beta: beta, into: c)
        finite("gemm", inner.copy(c))
    }

    public func syrkAccumulate(_ x: Tensor, alpha: Float, into c: Tensor) {
        require(c.rows == x.cols && c.cols == x.cols, "syrkAccumulate: accumulator \(c) for input \(x)")
        record("syrkAccumulate", flops: Double(x.cols) * Double(x.cols + 1) * Double(x.rows))
        inner.syrkAccumulate(x, alpha: alpha, into: c)
        finite("syrkAccumulate", c)
    }

    public func syrkUpperUpdate(_ x: Tensor, alpha: Float, beta: Float, into c: Tensor) {
        require(c.rows == x.cols && c.cols == x.cols, "syrkUpperUpdate: accumulator \(c) for input \(x)")
        record("syrkUpperUpdate", flops: Double(x.cols) * Double(x.cols + 1) * Double(x.rows)
                   + (beta != 1 ? Double(x.cols) * Double(x.cols + 1) / 2 : 0))
        inner.syrkUpperUpdate(x, alpha: alpha, beta: beta, into: c)
        finite("syrkUpperUpdate", c)
    }

    public func statisticsTile(columns: Int) -> Int? { inner.statisticsTile(columns: columns) }

    public func statisticsPieces(columns: Int, maxColumns: Int) -> [UpperPieceShape] {
        inner.statisticsPieces(columns: columns, maxColumns: maxColumns)
    }

    public func syrkUpperUpdate(_ windows: [(x: Tensor, alpha: Float, beta: Float)], pieces: [UpperPiece]) {
        guard let d = windows.first?.x.cols else { return }
        var entries = 0.0
        for p in pieces {
            require(p.values.rows == p.rows.count && p.values.cols == p.columns.count && p.rows.lowerBound >= 0 && p.rows.upperBound <= d
                    && p.columns.lowerBound >= 0 && p.columns.upperBound <= d,
                    "syrkUpperUpdate: piece \(p.values) for rows \(p.rows) and columns \(p.columns) of \(d)-wide inputs")
            entries += Double(UpperPieceShape.upperEntries(rows: p.rows, columns: p.columns))
        }
        require(inner.statisticsTile(columns: d) != nil || (pieces.count == 1 && pieces[0].rows == 0..<d && pieces[0].columns == 0..<d),
                "syrkUpperUpdate on pieces of \(d) on \(inner.name), which has no statisticsTile")
        for w in windows {
            require(w.x.cols == d, "syrkUpperUpdate: windows \(w.x) and \(windows[0].x) differ in width")
            record("syrkUpperUpdate", flops: 2 * entries * Double(w.x.rows) + (w.beta != 1 ? entries : 0))
        }
        inner.syrkUpperUpdate(windows, pieces: pieces)
        for p in pieces { finite("syrkUpperUpdate", p.values) }
    }

    public func mirrorUpper(_ c: Tensor) {
        require(c.rows == c.cols, "mirrorUpper: \(c) is not square")
        record("mirrorUpper", flops: 0)
        inner.mirrorUpper(c)
        finite("mirrorUpper", c)
    }

    public func cholesky(_ a: Tensor, upper: Bool, what: String) throws -> Tensor {
        require(a.rows == a.cols, "cholesky of a non-square \(a) (\(what))")
        record("cholesky", flops: pow(Double(a.rows), 3) / 3)
        let f = try inner.cholesky(a, upper: upper, what: what)
        require(f.rows == a.rows && f.cols == a.cols, "cholesky of \(a) gave \(f)")
        finite("cholesky", f)
        return f
    }

    public func inverseSPD(_ a: Tensor, what: String) throws -> Tensor {
        require(a.rows == a.cols, "inverseSPD of a non-square \(a) (\(what))")
        record("inverseSPD", flops: pow(Double(a.rows), 3))
        let inverse = try inner.inverseSPD(a, what: what)
        require(inverse.rows == a.rows && inverse.cols == a.cols, "inverseSPD of \(a) gave \(inverse)")
        finite("inverseSPD", inverse)
        return inverse
    }

    public func inverseCholeskyFactor(_ a: Tensor, what: String) throws -> Tensor {
        require(a.rows == a.cols, "inverseCholeskyFactor of a non-square \(a) (\(what))")
        record("inverseCholeskyFactor", flops: 2 * pow(Double(a.rows), 3) / 3)
        let u = try inner.inverseCholeskyFactor(a, what: what)
        require(u.rows == a.rows && u.cols == a.cols, "inverseCholeskyFactor of \(a) gave \(u)")
        finite("inverseCholeskyFactor", u)
        return u
    }

    public func inverseCholeskyFactorInPlace(_ a: Tensor, what: String) throws {
        require(a.rows == a.cols, "inverseCholeskyFactor of a non-square \(a) (\(what))")
        record("inverseCholeskyFactor", flops: 2 * pow(Double(a.rows), 3) / 3)
        try inner.inverseCholeskyFactorInPlace(a, what: what)
        finite("inverseCholeskyFactor", a)
    }

    public func solveTriangular(_ t: Tensor, _ b: Tensor, upper: Bool, transpose: Bool) -> Tensor {
        require(t.rows == t.cols && t.rows == b.rows, "solveTriangular: \(t) with \(b)")
        record("solveTriangular", flops: Double(t.rows) * Double(t.rows) * Double(b.cols))
        let x = inner.solveTriangular(t, b, upper: upper, transpose: transpose)
        finite("solveTriangular", x)
        return x
    }

    public func solveSPDDouble(_ a: Tensor, _ b: Tensor, what: String) throws -> Tensor {
        require(a.rows == a.cols && a.rows == b.rows, "solveSPDDouble: \(a) with \(b) (\(what))")
        record("solveSPDDouble", flops: pow(Double(a.rows), 3) / 3 + 2 * Double(a.rows) * Double(a.rows) * Double(b.cols))
        let x = try inner.solveSPDDouble(a, b, what: what)
        require(x.rows == b.rows && x.cols == b.cols, "solveSPDDouble of \(a), \(b) gave \(x)")
        finite("solveSPDDouble", x)
        return x
    }

    public func inverseSPDDouble(_ a: Tensor, what: String) throws -> Tensor {
        require(a.rows == a.cols, "inverseSPDDouble of a non-square \(a) (\(what))")
        record("inverseSPDDouble", flops: pow(Double(a.rows), 3))
        let inverse = try inner.inverseSPDDouble(a, what: what)
        require(inverse.rows == a.rows && inverse.cols == a.cols, "inverseSPDDouble of \(a) gave \(inverse)")
        finite("inverseSPDDouble", inverse)
        return inverse
    }

    public func transpose(_ x: Tensor) -> Tensor {
        record("transpose")
        let y = inner.transpose(x)
        require(y.rows == x.cols && y.cols == x.rows, "transpose of \(x) gave \(y)")
        return y
    }

    // MARK: Element-wise

    public func scale(_ x: Tensor, by factor: Float) {
        record("scale", flops: Double(x.count))
        inner.scale(x, by: factor)
        finite("scale", x)
    }

    public func scaleAdd(_ y: Tensor, beta: Float, _ x: Tensor, alpha: Float) {
        require(x.rows == y.rows && x.cols == y.cols, "scaleAdd: \(x) into \(y)")
        record("scaleAdd", flops: 3 * Double(y.count))
        inner.scaleAdd(y, beta: beta, x, alpha: alpha)
        finite("scaleAdd", y)
    }

    public func axpy(_ alpha: Float, _ x: Tensor, _ y: Tensor) {
        require(x.rows == y.rows && x.cols == y.cols, "axpy: \(x) into \(y)")
        record("axpy", flops: 2 * Double(y.count))
        inner.axpy(alpha, x, y)
        finite("axpy", y)
    }

    public func map(_ x: Tensor, _ f: ElementwiseFunction) -> Tensor {
        record("map.\(f.rawValue)", flops: Double(x.count))
        let y = inner.map(x, f)
        require(y.rows == x.rows && y.cols == x.cols, "map of \(x) gave \(y)")
        finite("map.\(f.rawValue)", y)
        return y
    }

    public func multiplyColumns(_ x: Tensor, by v: Tensor) -> Tensor {
        require(v.rows == 1 && v.cols == x.cols, "multiplyColumns: \(x) by \(v)")
        record("multiplyColumns", flops: Double(x.count))
        let y = inner.multiplyColumns(x, by: v)
        finite("multiplyColumns", y)
        return y
    }

    public func addScaledRows(_ y: Tensor, _ x: Tensor, scales: [Float]) {
        require(y.rows == x.rows && y.cols == x.cols && scales.count == x.rows, "addScaledRows: \(y) += \(scales.count) scales x \(x)")
        require(scales.allSatisfy(\.isFinite), "addScaledRows: a scale is not finite")
        record("addScaledRows", flops: 2 * Double(x.count))
        inner.addScaledRows(y, x, scales: scales)
        finite("addScaledRows", y)
    }

    public func rowDots(_ a: Tensor, _ b: Tensor) -> [Double] {
        require(a.rows == b.rows && a.cols == b.cols, "rowDots: \(a) and \(b)")
        record("rowDots", flops: 2 * Double(a.count))
        return inner.rowDots(a, b)
    }

    public func divideColumns(_ x: Tensor, by v: Tensor) -> Tensor {
        require(v.rows == 1 && v.cols == x.cols, "divideColumns: \(x) by \(v)")
        record("divideColumns", flops: Double(x.count))
        let y = inner.divideColumns(x, by: v)
        finite("divideColumns", y)
        return y
    }

    public func addToDiagonal(_ a: Tensor, _ value: Float) {
        require(a.rows == a.cols, "addToDiagonal of a non-square \(a)")
        record("addToDiagonal", flops: Double(a.rows))
        inner.addToDiagonal(a, value)
        finite("addToDiagonal", a)
    }

    public func multiply(_ a: Tensor, _ b: Tensor) -> Tensor {
        require(a.rows == b.rows && a.cols == b.cols, "multiply: \(a) and \(b)")
        record("multiply", flops: Double(a.count))
        let y = inner.multiply(a, b)
        finite("multiply", y)
        return y
    }

    public func addRowVector(_ x: Tensor, _ v: Tensor) -> Tensor {
        require(v.count == x.cols, "addRowVector: \(x) plus \(v)")
        record("addRowVector", flops: Double(x.count))
        let y = inner.addRowVector(x, v)
        finite("addRowVector", y)
        return y
    }

    // MARK: Reductions

    public func diagonal(_ a: Tensor) -> Tensor {
        require(a.rows == a.cols, "diagonal of a non-square \(a)")
        record("diagonal")
        return inner.diagonal(a)
    }

    public func columnSquaredSums(_ x: Tensor) -> Tensor {
        record("columnSquaredSums", flops: 2 * Double(x.count))
        let s = inner.columnSquaredSums(x)
        require(s.rows == 1 && s.cols == x.cols, "columnSquaredSums of \(x) gave \(s)")
        finite("columnSquaredSums", s)
        return s
    }

    public func sum(_ x: Tensor) -> Double {
        record("sum", flops: Double(x.count))
        let s = inner.sum(x)
        if !s.isFinite { violation("sum of \(x) is \(s)") }
        return s
    }

    public func dot(_ a: Tensor, _ b: Tensor) -> Double {
        require(a.rows == b.rows && a.cols == b.cols, "dot: \(a) and \(b)")
        record("dot", flops: 2 * Double(a.count))
        let s = inner.dot(a, b)
        if !s.isFinite { violation("dot of \(a) and \(b) is \(s)") }
        return s
    }

    public func allFinite(_ x: Tensor) -> Bool {
        record("allFinite")
        return inner.allFinite(x)
    }

    public func chunkedDot(_ a: Tensor, _ b: Tensor) -> Double {
        require(a.rows == b.rows && a.cols == b.cols, "chunkedDot: \(a) and \(b)")
        record("chunkedDot", flops: 2 * Double(a.count))
        return scalar("chunkedDot", inner.chunkedDot(a, b))
    }

    public func chunkedSquaredDistance(_ a: Tensor, _ b: Tensor) -> Double {
        require(a.rows == b.rows && a.cols == b.cols, "chunkedSquaredDistance: \(a) and \(b)")
        record("chunkedSquaredDistance", flops: 3 * Double(a.count))
        return scalar("chunkedSquaredDistance", inner.chunkedSquaredDistance(a, b))
    }

    public func chunkedSquaredDistanceToProduct(_ p: Tensor, _ u: Tensor, _ v: Tensor) -> Double {
        require(p.rows == u.rows && p.cols == u.cols && p.rows == v.rows && p.cols == v.cols,
                "chunkedSquaredDistanceToProduct: \(p), \(u), \(v)")
        record("chunkedSquaredDistanceToProduct", flops: 4 * Double(p.count))
        return scalar("chunkedSquaredDistanceToProduct", inner.chunkedSquaredDistanceToProduct(p, u, v))
    }

    // MARK: Selection

    public func selectAtMostKthSmallest(_ scores: Tensor, k: Int) -> Tensor {
        finite("selectAtMostKthSmallest (scores)", scores)
        record("selectAtMostKthSmallest", flops: Double(scores.count))
        return mask("selectAtMostKthSmallest", inner.selectAtMostKthSmallest(scores, k: k), scores)
    }

    public func selectSmallestInRows(_ scores: Tensor, counts: [Int]) -> Tensor {
        require(counts.count == scores.rows, "selectSmallestInRows: \(counts.count) counts for \(scores.rows) rows")
        if let bad = counts.first(where: { $0 < 0 || $0 > scores.cols }) {
            require(false, "selectSmallestInRows: \(bad) of \(scores.cols) columns")
        }
        finite("selectSmallestInRows (scores)", scores)
        record("selectSmallestInRows", flops: Double(scores.count))
        return mask("selectSmallestInRows", inner.selectSmallestInRows(scores, counts: counts), scores)
    }

    public func selectNOfM(_ scores: Tensor, n: Int, m: Int) -> Tensor {
        require(n > 0 && m > n, "selectNOfM: \(n):\(m)")
        finite("selectNOfM (scores)", scores)
        record("selectNOfM", flops: Double(scores.count))
        return mask("selectNOfM", inner.selectNOfM(scores, n: n, m: m), scores)
    }

    public func zeroMasked(_ x: Tensor, mask: Tensor) {
        require(x.rows == mask.rows && x.cols == mask.cols, "zeroMasked: \(x) with mask \(mask)")
        record("zeroMasked")
        inner.zeroMasked(x, mask: mask)
    }

    // MARK: SparseGPT kernels

    public func zeroDeadInputs(hessian: Tensor, weight: Tensor) {
        require(hessian.rows == weight.cols && hessian.cols == weight.cols, "zeroDeadInputs: Hessian \(hessian) for weight \(weight)")
        record("zeroDeadInputs")
        inner.zeroDeadInputs(hessian: hessian, weight: weight)
    }

    public func sparseGPTBlock(weight: Tensor, inverseFactor: Tensor, mask: Tensor, nOfM: (n: Int, m: Int)?,
                               error: Tensor) -> Double {
        let (rows, b) = (weight.rows, weight.cols)
        require(inverseFactor.rows == b && inverseFactor.cols == b, "sparseGPTBlock: inverse factor \(inverseFactor) for block \(weight)")
        require(mask.rows == rows && mask.cols == b && error.rows == rows && error.cols == b,
                "sparseGPTBlock: mask \(mask) and error \(error) for block \(weight)")
        if let g = nOfM { require(g.n > 0 && g.m > g.n, "sparseGPTBlock: \(g.n):\(g.m)") }
        record("sparseGPTBlock", flops: 2 * Double(rows) * Double(b) * Double(b))
        let loss = inner.sparseGPTBlock(weight: weight, inverseFactor: inverseFactor, mask: mask, nOfM: nOfM, error: error)
        finite("sparseGPTBlock (weight)", weight)
        finite("sparseGPTBlock (error)", error)
        if !loss.isFinite { violation("sparseGPTBlock: loss \(loss)") }
        return loss
    }

    // MARK: SparseLLM kernels

    public func sparseLLMLlamaZ(_ z: Tensor, m: Tensor, sigma: Tensor, p: Tensor, alpha: Float, gamma: Float) {
        require([m, sigma, p].allSatisfy { $0.rows == z.rows && $0.cols == z.cols }, "sparseLLMLlamaZ: \(z), \(m), \(sigma), \(p)")
        record("sparseLLMLlamaZ", flops: 7 * Double(z.count))
        inner.sparseLLMLlamaZ(z, m: m, sigma: sigma, p: p, alpha: alpha, gamma: gamma)
        finite("sparseLLMLlamaZ", z)
    }

    public func sparseLLMOPTZ(_ z: Tensor, m: Tensor, p: Tensor, alpha: Float, gamma: Float) {
        require([m, p].allSatisfy { $0.rows == z.rows && $0.cols == z.cols }, "sparseLLMOPTZ: \(z), \(m), \(p)")
        record("sparseLLMOPTZ", flops: 16 * Double(z.count))
        inner.sparseLLMOPTZ(z, m: m, p: p, alpha: alpha, gamma: gamma)
        finite("sparseLLMOPTZ", z)
    }

    public func sparseLLMGate(_ s: Tensor, g: Tensor, z: Tensor, p: Tensor, alpha: Float, gamma: Float, steps: Int,
                              activation: GatedActivation) {
        require([g, z, p].allSatisfy { $0.rows == s.rows && $0.cols == s.cols }, "sparseLLMGate: \(s), \(g), \(z), \(p)")
        record("sparseLLMGate", flops: 40 * Double(steps) * Double(s.count))
        inner.sparseLLMGate(s, g: g, z: z, p: p, alpha: alpha, gamma: gamma, steps: steps, activation: activation)
        finite("sparseLLMGate", s)
    }

    // MARK: Bookkeeping

    private func scalar(_ op: String, _ value: Double) -> Double {
        if !value.isFinite { violation("\(op): \(value)") }
        return value
    }

    func require(_ condition: Bool, _ message: @autoclosure () -> String) {
        if !condition { preconditionFailure("CheckingBackend: \(message())") }
    }

    func record(_ op: String, flops: Double = 0) {
        lock.withLock {
            tally.calls[op, default: 0] += 1
            tally.flops += flops
            tally.flopsByCall[op, default: 0] += flops
        }
    }

    func violationFromExtension(_ message: String) { violation(message) }

    private func violation(_ message: String) {
        lock.withLock { recorded.append(message) }
    }

    private func transfer(_ kind: String, _ bytes: Int) {
        lock.withLock {
            if kind == "upload" { tally.uploads += 1; tally.uploadBytes += bytes } else { tally.downloads += 1; tally.downloadBytes += bytes }
            if let window = windows.last { recorded.append("\(kind) of \(bytes) bytes inside '\(window)', where transfers are forbidden") }
        }
    }

    func finite(_ op: String, _ t: Tensor) {
        if !inner.allFinite(t) { violation("\(op): \(t) has non-finite values") }
    }

    private func mask(_ op: String, _ m: Tensor, _ scores: Tensor) -> Tensor {
        require(m.rows == scores.rows && m.cols == scores.cols, "\(op): mask \(m) for scores \(scores)")
        return m
    }
}
