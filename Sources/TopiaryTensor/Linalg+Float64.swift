import CBLAS

/// Double-precision BLAS and LAPACK for `Float64Backend`, on raw row-major buffers.
extension Linalg {
    /// C[m x n] = alpha * op(A) * op(B) + beta * C in Float64, in the tiles of `sgemm` (a function
    /// of the shape alone, each tile one single-threaded OpenBLAS call), so the bits do not depend
    /// on the thread count.
    static func dgemm(
        _ transA: Transpose, _ transB: Transpose, m: Int, n: Int, k: Int,
        alpha: Double = 1, a: UnsafePointer<Double>, lda: Int, b: UnsafePointer<Double>, ldb: Int,
        beta: Double = 0, c: UnsafeMutablePointer<Double>, ldc: Int, concurrently: Bool = true
    ) {
        if m == 0 || n == 0 { return }
        _ = configured
        if k == 0 {
            for r in 0..<m { for j in 0..<n { c[r * ldc + j] = beta == 0 ? 0 : c[r * ldc + j] * beta } }
            return
        }
        let (tm, tn) = gemmTiles(m: m, n: n, k: k)
        let tilesM = (m + tm - 1) / tm, tilesN = (n + tn - 1) / tn
        let args = UnsafeSendable((a, b, c))
        forEachTile(tilesM * tilesN, concurrently: concurrently) { t in
            let (a, b, c) = args.value
            let i0 = (t / tilesN) * tm, j0 = (t % tilesN) * tn
            let rows = min(tm, m - i0), cols = min(tn, n - j0)
            cblas_dgemm(CblasRowMajor, transA.cblas, transB.cblas, blasint(rows), blasint(cols), blasint(k), alpha,
                        transA == .none ? a + i0 * lda : a + i0, blasint(lda),
                        transB == .none ? b + j0 : b + j0 * ldb, blasint(ldb),
                        beta, c + i0 * ldc + j0, blasint(ldc))
        }
    }

    /// C[d x d] += alpha * Xᵀ X for X [n x d] in Float64: the upper triangle in square tiles
    /// (dsyrk on the diagonal, dgemm above it) run concurrently, then mirrored.
    static func dsyrkAccumulate(n: Int, d: Int, alpha: Double, x: UnsafePointer<Double>,
                                c: UnsafeMutablePointer<Double>, mirror: Bool = true) {
        _ = configured
        if n == 0 || d == 0 { return }
        let tiles = (d + tile - 1) / tile
        let pairs = upperTiles(tiles)
        let args = UnsafeSendable((x, c))
        forEachTile(pairs.count) { t in
            let (x, c) = args.value
            let (ti, tj) = pairs[t]
            let i0 = ti * tile, j0 = tj * tile
            let rows = min(tile, d - i0), cols = min(tile, d - j0)
            if ti == tj {
                cblas_dsyrk(CblasRowMajor, CblasUpper, CblasTrans, blasint(rows), blasint(n), alpha,
                            x + i0, blasint(d), 1, c + i0 * d + i0, blasint(d))
            } else {
                cblas_dgemm(CblasRowMajor, CblasTrans, CblasNoTrans, blasint(rows), blasint(cols), blasint(n), alpha,
                            x + i0, blasint(d), x + j0, blasint(d), 1, c + i0 * d + j0, blasint(d))
            }
        }
        if mirror { mirrorUpperToLower(c, n: d) }
    }

    /// Cholesky factor in place of the row-major n x n matrix at `p` (upper: A = UᵀU, lower:
    /// A = LLᵀ), the other triangle zeroed. Returns 0, or the 1-based failing leading minor.
    static func dcholesky(_ p: UnsafeMutablePointer<Double>, n: Int, upper: Bool) -> Int {
        _ = configured
        if n == 0 { return 0 }
        let info = LAPACKE_dpotrf(LAPACK_ROW_MAJOR, upper ? 85 : 76, Int32(n), p, Int32(n))
        if info > 0 { return Int(info) }
        precondition(info == 0, "dpotrf: illegal argument \(-info)")
        for i in 0..<n {
            if upper { for j in 0..<i { p[i * n + j] = 0 } } else { for j in (i + 1)..<n { p[i * n + j] = 0 } }
        }
        return 0
    }

    /// Inverse in place of the symmetric positive definite row-major n x n matrix at `p`
    /// (dpotrf then dpotri, both triangles filled). Throws naming `what`.
    static func dinverseSPD(_ p: UnsafeMutablePointer<Double>, n: Int, what: String) throws {
        _ = configured
        if n == 0 { return }
        var info = LAPACKE_dpotrf(LAPACK_ROW_MAJOR, 85, Int32(n), p, Int32(n))
        if info > 0 { throw LinalgError.notPositiveDefinite(what: what, minor: Int(info)) }
        precondition(info == 0, "dpotrf: illegal argument \(-info)")
        info = LAPACKE_dpotri(LAPACK_ROW_MAJOR, 85, Int32(n), p, Int32(n))
        if info > 0 { throw LinalgError.singular(what: what, info: Int(info)) }
        mirrorUpperToLower(p, n: n)
        for i in 0..<(n * n) where !p[i].isFinite { throw LinalgError.singular(what: what, info: 0) }
    }

    /// Solves op(T) X = B in place of B [n x k] for a triangular row-major T [n x n].
    static func dsolveTriangular(_ t: UnsafePointer<Double>, _ b: UnsafeMutablePointer<Double>, n: Int, k: Int, upper: Bool, transpose: Bool) {
        _ = configured
        if n == 0 || k == 0 { return }
        cblas_dtrsm(CblasRowMajor, CblasLeft, upper ? CblasUpper : CblasLower, transpose ? CblasTrans : CblasNoTrans, CblasNonUnit,
                    blasint(n), blasint(k), 1, t, blasint(n), b, blasint(k))
    }

    /// Solves A X = B in place of B [n x k] for a symmetric positive definite A (overwritten by its factor).
    static func dsolveSPD(_ a: UnsafeMutablePointer<Double>, _ b: UnsafeMutablePointer<Double>, n: Int, k: Int, what: String) throws {
        _ = configured
        if n == 0 || k == 0 { return }
        let info = LAPACKE_dposv(LAPACK_ROW_MAJOR, 85, Int32(n), Int32(k), a, Int32(n), b, Int32(k))
        if info > 0 { throw LinalgError.notPositiveDefinite(what: what, minor: Int(info)) }
        precondition(info == 0, "dposv: illegal argument \(-info)")
    }
}
