import CBLAS

/// Errors from dense linear algebra.
public enum LinalgError: Error, CustomStringConvertible, Equatable {
    /// The matrix is not (numerically) positive definite: LAPACK's potrf failed at `minor`.
    case notPositiveDefinite(what: String, minor: Int)
    case singular(what: String, info: Int)
    case shapeMismatch(String)

    public var description: String {
        switch self {
        case .notPositiveDefinite(let what, let minor):
            return "\(what): matrix is not positive definite (Cholesky failed at leading minor \(minor))"
        case .singular(let what, let info):
            return "\(what): matrix is singular (LAPACK info \(info))"
        case .shapeMismatch(let s):
            return "shape mismatch: \(s)"
        }
    }
}

public enum Transpose: Sendable {
    case none, transposed
    @usableFromInline var cblas: CBLAS_TRANSPOSE { self == .none ? CblasNoTrans : CblasTrans }
}

/// Dense linear algebra on `Matrix` through OpenBLAS and LAPACKE.
public enum Linalg {
    /// Raw single-precision GEMM on row-major buffers:
    /// C[m x n] = alpha * op(A) * op(B) + beta * C, with leading dimensions in elements.
    @inlinable
    public static func sgemm(
        _ transA: Transpose, _ transB: Transpose, m: Int, n: Int, k: Int,
        alpha: Float = 1, a: UnsafePointer<Float>, lda: Int,
        b: UnsafePointer<Float>, ldb: Int,
        beta: Float = 0, c: UnsafeMutablePointer<Float>, ldc: Int
    ) {
        if m == 0 || n == 0 { return }
        cblas_sgemm(CblasRowMajor, transA.cblas, transB.cblas, blasint(m), blasint(n), blasint(k),
                    alpha, a, blasint(lda), b, blasint(ldb), beta, c, blasint(ldc))
    }

    /// C = alpha * op(A) * op(B) + beta * C.
    public static func gemm(
        _ a: Matrix, _ transA: Transpose = .none, _ b: Matrix, _ transB: Transpose = .none,
        alpha: Float = 1, beta: Float = 0, into c: inout Matrix
    ) {
        let m = transA == .none ? a.rows : a.cols
        let k = transA == .none ? a.cols : a.rows
        let kb = transB == .none ? b.rows : b.cols
        let n = transB == .none ? b.cols : b.rows
        precondition(k == kb, "gemm: inner dimensions \(k) and \(kb) differ")
        precondition(c.rows == m && c.cols == n, "gemm: output is \(c.rows)x\(c.cols), expected \(m)x\(n)")
        if k == 0 {
            if beta == 0 { c.withUnsafeMutableBufferPointer { $0.update(repeating: 0) } }
            else if beta != 1 { c.withUnsafeMutableBufferPointer { p in for i in p.indices { p[i] *= beta } } }
            return
        }
        a.withUnsafeBufferPointer { pa in
            b.withUnsafeBufferPointer { pb in
                c.withUnsafeMutableBufferPointer { pc in
                    sgemm(transA, transB, m: m, n: n, k: k, alpha: alpha,
                          a: pa.baseAddress!, lda: a.cols, b: pb.baseAddress!, ldb: b.cols,
                          beta: beta, c: pc.baseAddress!, ldc: n)
                }
            }
        }
    }

    /// A * B as a new matrix.
    public static func matmul(_ a: Matrix, _ b: Matrix) -> Matrix { matmul(a, .none, b, .none) }

    /// C = alpha * A * B + beta * C.
    public static func gemm(_ a: Matrix, _ b: Matrix, alpha: Float = 1, beta: Float = 0, into c: inout Matrix) {
        gemm(a, .none, b, .none, alpha: alpha, beta: beta, into: &c)
    }

    /// op(A) * op(B) as a new matrix.
    public static func matmul(_ a: Matrix, _ transA: Transpose = .none, _ b: Matrix, _ transB: Transpose = .none) -> Matrix {
        let m = transA == .none ? a.rows : a.cols
        let n = transB == .none ? b.cols : b.rows
        var c = Matrix(rows: m, cols: n)
        gemm(a, transA, b, transB, into: &c)
        return c
    }

    /// x · Wᵀ: the linear-layer product for activations `x` [tokens x in] and a weight `w` [out x in].
    public static func linear(_ x: Matrix, _ w: Matrix) -> Matrix {
        matmul(x, .none, w, .transposed)
    }

    /// C += alpha * Xᵀ X for `x` [n x d], C [d x d]; both triangles of C are kept in step.
    /// This is the Hessian accumulation H += (2/n) Σ x xᵀ when rows of `x` are tokens.
    public static func syrkAccumulate(_ x: Matrix, alpha: Float, into c: inout Matrix) {
        let d = x.cols
        precondition(c.rows == d && c.cols == d, "syrk: accumulator is \(c.rows)x\(c.cols), expected \(d)x\(d)")
        if x.rows == 0 { return }
        x.withUnsafeBufferPointer { px in
            c.withUnsafeMutableBufferPointer { pc in
                cblas_ssyrk(CblasRowMajor, CblasUpper, CblasTrans, blasint(d), blasint(x.rows),
                            alpha, px.baseAddress!, blasint(d), 1, pc.baseAddress!, blasint(d))
                mirrorUpperToLower(pc.baseAddress!, n: d)
            }
        }
    }

    @usableFromInline
    static func mirrorUpperToLower<T>(_ p: UnsafeMutablePointer<T>, n: Int) {
        for i in 0..<n { for j in 0..<i { p[i * n + j] = p[j * n + i] } }
    }

    static func zeroLower<T: Numeric>(_ p: UnsafeMutablePointer<T>, n: Int) {
        for i in 0..<n { for j in 0..<i { p[i * n + j] = 0 } }
    }

    static func zeroUpper<T: Numeric>(_ p: UnsafeMutablePointer<T>, n: Int) {
        for i in 0..<n { for j in (i + 1)..<max(n, i + 1) { p[i * n + j] = 0 } }
    }

    /// Cholesky factor of a symmetric positive definite matrix: `upper` gives U with A = UᵀU,
    /// otherwise L with A = LLᵀ. The other triangle of the result is zero.
    /// (Symmetric inputs read the same in either storage order, so LAPACK is called in its native
    /// column-major order with the triangle flipped: row-major U is column-major L. That spares
    /// LAPACKE's transposed copies in and out.)
    public static func cholesky(_ a: Matrix, upper: Bool, what: String = "cholesky") throws -> Matrix {
        precondition(a.rows == a.cols, "cholesky of a non-square \(a.rows)x\(a.cols) matrix")
        var f = a
        let n = a.rows
        let info = f.withUnsafeMutableBufferPointer { p -> Int32 in
            LAPACKE_spotrf(LAPACK_COL_MAJOR, upper ? 76 : 85, Int32(n), p.baseAddress, Int32(n))
        }
        if info > 0 { throw LinalgError.notPositiveDefinite(what: what, minor: Int(info)) }
        precondition(info == 0, "spotrf: illegal argument \(-info)")
        f.withUnsafeMutableBufferPointer { p in
            if upper { zeroLower(p.baseAddress!, n: n) } else { zeroUpper(p.baseAddress!, n: n) }
        }
        return f
    }

    /// Inverse of a symmetric positive definite matrix through its Cholesky factor (potrf + potri).
    public static func inverseSPD(_ a: Matrix, what: String = "inverse") throws -> Matrix {
        precondition(a.rows == a.cols)
        var f = try cholesky(a, upper: false, what: what)
        let n = a.rows
        let info = f.withUnsafeMutableBufferPointer { p -> Int32 in
            LAPACKE_spotri(LAPACK_COL_MAJOR, 85, Int32(n), p.baseAddress, Int32(n))
        }
        if info > 0 { throw LinalgError.singular(what: what, info: Int(info)) }
        f.withUnsafeMutableBufferPointer { p in
            // potri fills the lower triangle; mirror it up.
            let b = p.baseAddress!
            for i in 0..<n { for j in 0..<i { b[j * n + i] = b[i * n + j] } }
        }
        return f
    }

    /// Solve op(T) X = B for a triangular T (upper or lower), B [n x k]. Returns X.
    public static func solveTriangular(_ t: Matrix, _ b: Matrix, upper: Bool, transpose: Bool = false) -> Matrix {
        precondition(t.rows == t.cols && t.rows == b.rows, "solveTriangular: \(t.rows)x\(t.cols) with \(b.rows)x\(b.cols)")
        var x = b
        let n = t.rows
        t.withUnsafeBufferPointer { pt in
            x.withUnsafeMutableBufferPointer { px in
                cblas_strsm(CblasRowMajor, CblasLeft, upper ? CblasUpper : CblasLower,
                            transpose ? CblasTrans : CblasNoTrans, CblasNonUnit,
                            blasint(n), blasint(b.cols), 1, pt.baseAddress!, blasint(n), px.baseAddress!, blasint(b.cols))
            }
        }
        return x
    }

    /// Solve A X = B for symmetric positive definite A (Cholesky), B [n x k].
    public static func solveSPD(_ a: Matrix, _ b: Matrix, what: String = "solve") throws -> Matrix {
        precondition(a.rows == a.cols && a.rows == b.rows)
        var fa = a
        var x = b
        let n = a.rows
        let info = fa.withUnsafeMutableBufferPointer { pa in
            x.withUnsafeMutableBufferPointer { px in
                LAPACKE_sposv(LAPACK_ROW_MAJOR, 85, Int32(n), Int32(b.cols), pa.baseAddress, Int32(n),
                              px.baseAddress, Int32(b.cols))
            }
        }
        if info > 0 { throw LinalgError.notPositiveDefinite(what: what, minor: Int(info)) }
        return x
    }

    /// Inverse of a symmetric positive definite matrix computed in Float64 (for ill-conditioned problems).
    public static func inverseSPDDouble(_ a: Matrix, what: String = "inverse") throws -> Matrix {
        let n = a.rows
        precondition(a.rows == a.cols)
        var d = a.withUnsafeBufferPointer { p in p.map { Double($0) } }
        var info = d.withUnsafeMutableBufferPointer { p in
            LAPACKE_dpotrf(LAPACK_COL_MAJOR, 85, Int32(n), p.baseAddress, Int32(n))
        }
        if info > 0 { throw LinalgError.notPositiveDefinite(what: what, minor: Int(info)) }
        info = d.withUnsafeMutableBufferPointer { p in
            LAPACKE_dpotri(LAPACK_COL_MAJOR, 85, Int32(n), p.baseAddress, Int32(n))
        }
        if info > 0 { throw LinalgError.singular(what: what, info: Int(info)) }
        return Matrix(rows: n, cols: n) { out in
            for i in 0..<n {
                for j in 0...i {
                    let v = Float(d[i * n + j])
                    out[i * n + j] = v
                    out[j * n + i] = v
                }
            }
        }
    }

    /// Solves A X = B for symmetric positive definite A [n x n], B [n x k], in Float64
    /// (for normal equations whose conditioning fp32 cannot carry). Returns X in Float32.
    public static func solveSPDDouble(_ a: Matrix, _ b: Matrix, what: String = "solve") throws -> Matrix {
        precondition(a.rows == a.cols && a.rows == b.rows, "solveSPDDouble: \(a.rows)x\(a.cols) with \(b.rows)x\(b.cols)")
        let n = a.rows, k = b.cols
        var ad = a.withUnsafeBufferPointer { p in p.map { Double($0) } }
        var bd = b.withUnsafeBufferPointer { p in p.map { Double($0) } }
        let info = ad.withUnsafeMutableBufferPointer { pa in
            bd.withUnsafeMutableBufferPointer { pb in
                LAPACKE_dposv(LAPACK_ROW_MAJOR, 85, Int32(n), Int32(k), pa.baseAddress, Int32(n), pb.baseAddress, Int32(k))
            }
        }
        if info > 0 { throw LinalgError.notPositiveDefinite(what: what, minor: Int(info)) }
        precondition(info == 0, "dposv: illegal argument \(-info)")
        return Matrix(rows: n, cols: k) { out in for i in 0..<(n * k) { out[i] = Float(bd[i]) } }
    }

    /// Number of threads OpenBLAS uses.
    public static var threadCount: Int { Int(openblas_get_num_threads()) }
    public static func setThreadCount(_ n: Int) { openblas_set_num_threads(Int32(n)) }
}
