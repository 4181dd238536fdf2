import CBLAS
import Dispatch
import Foundation

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

    /// The dimensions of op(A)·op(B) for A [aRows x aCols] and B [bRows x bCols]: op(A) is m x k,
    /// op(B) is kb x n (a product needs k == kb).
    static func product(aRows: Int, aCols: Int, _ transA: Transpose, bRows: Int, bCols: Int, _ transB: Transpose)
        -> (m: Int, k: Int, kb: Int, n: Int) {
        (transA == .none ? aRows : aCols, transA == .none ? aCols : aRows,
         transB == .none ? bRows : bCols, transB == .none ? bCols : bRows)
    }
}

/// Dense linear algebra on `Matrix` through OpenBLAS and LAPACKE.
public enum Linalg {
    /// Raw single-precision GEMM on row-major buffers:
    /// C[m x n] = alpha * op(A) * op(B) + beta * C, with leading dimensions in elements.
    ///
    /// The same bits at any thread count: C is cut into tiles whose shape depends only on
    /// (m, n, k) (`gemmTiles`), each tile is one single-threaded OpenBLAS call, and the tiles run
    /// concurrently over `threadCount` threads. Which thread computes a tile varies; what it
    /// computes does not.
    public static func sgemm(
        _ transA: Transpose, _ transB: Transpose, m: Int, n: Int, k: Int,
        alpha: Float = 1, a: UnsafePointer<Float>, lda: Int,
        b: UnsafePointer<Float>, ldb: Int,
        beta: Float = 0, c: UnsafeMutablePointer<Float>, ldc: Int, concurrently: Bool = true
    ) {
        if m == 0 || n == 0 { return }
        let (tm, tn) = gemmTiles(m: m, n: n, k: k)
        let tilesM = (m + tm - 1) / tm, tilesN = (n + tn - 1) / tn
        let args = UnsafeSendable((a, b, c))
        forEachTile(tilesM * tilesN, concurrently: concurrently) { t in
            let (a, b, c) = args.value
            let i0 = (t / tilesN) * tm, j0 = (t % tilesN) * tn
            let rows = min(tm, m - i0), cols = min(tn, n - j0)
            blasSgemm(transA, transB, m: rows, n: cols, k: k, alpha: alpha,
                      a: transA == .none ? a + i0 * lda : a + i0, lda: lda,
                      b: transB == .none ? b + j0 : b + j0 * ldb, ldb: ldb,
                      beta: beta, c: c + i0 * ldc + j0, ldc: ldc)
        }
    }

    /// The tile shape of an m x n x k product: a function of the shape alone. Small products are
    /// one tile. Otherwise at least `tileTarget` tiles (so that threads can share them), cut so
    /// that the operands OpenBLAS packs are packed as few times as possible: every tile packs its
    /// rows of A and its columns of B, so the cost is (tile columns) x m + (tile rows) x n
    /// elements of width k. A layer's forward (m = a window's 512 tokens, n = 1536-3072 outputs)
    /// used to be cut into 64-row tiles that packed the whole weight 8 times: the packing (a
    /// transposing copy) was 18% of a prune's cycles. Tiles are whole multiples of 64 rows and
    /// columns (the last one excepted). Which tile computes an element can change its last bit:
    /// OpenBLAS's small-matrix kernel (m·n·k up to 10^6 on SkylakeX) sums in another order, and on
    /// the Haswell kernel 4 tiles instead of 8 changed SmolLM2's BESA output. So the tiles must
    /// not follow the thread count.
    static func gemmTiles(m: Int, n: Int, k: Int) -> (rows: Int, cols: Int) {
        if m * n * max(k, 1) <= 1 << 18 { return (m, n) }
        func roundUp(_ x: Int, _ q: Int) -> Int { (x + q - 1) / q * q }
        let atLeast = min(tileTarget(m: m, n: n, k: k), ((m + 63) / 64) * ((n + 63) / 64))
        var best: (rows: Int, cols: Int, cost: Int, tiles: Int)? = nil
        var splitM = 1
        while splitM <= 64 {
            let rows = min(m, roundUp((m + splitM - 1) / splitM, 64))
            var splitN = 1
            while splitN <= 64 {
                let cols = min(n, roundUp((n + splitN - 1) / splitN, 64))
                let tilesM = (m + rows - 1) / rows, tilesN = (n + cols - 1) / cols
                let tiles = tilesM * tilesN
                if tiles >= atLeast {
                    let cost = tilesN * m + tilesM * n
                    if best == nil || cost < best!.cost || (cost == best!.cost && tiles < best!.tiles) {
                        best = (rows, cols, cost, tiles)
                    }
                }
                splitN *= 2
            }
            splitM *= 2
        }
        guard let best else { return (min(m, 64), n) }
        return (best.rows, best.cols)
    }

    /// The fewest tiles `gemmTiles` cuts a product into: 8, or one per 2^30 FLOPs up to 256.
    /// With 8 at every size, a real model's products (2048 tokens by a 7B's 4096 x 4096 q_proj:
    /// 64 GFLOP) were 8 tiles, so a 32-core node ran its forward passes on 8 threads; one tile
    /// per GFLOP gives that product 64 and a 70B's down_proj 256 (about 10 ms of one core each),
    /// while every product of SmolLM2's blocks stays at 8 (and so at the same bits).
    static func tileTarget(m: Int, n: Int, k: Int) -> Int {
        min(256, max(8, (2 * m * n * max(k, 1)) >> 30))
    }

    /// One OpenBLAS sgemm call in the calling thread (OpenBLAS itself always runs single-threaded).
    @usableFromInline
    static func blasSgemm(
        _ transA: Transpose, _ transB: Transpose, m: Int, n: Int, k: Int,
        alpha: Float, a: UnsafePointer<Float>, lda: Int, b: UnsafePointer<Float>, ldb: Int,
        beta: Float, c: UnsafeMutablePointer<Float>, ldc: Int
    ) {
        if m == 0 || n == 0 { return }
        _ = configured
        cblas_sgemm(CblasRowMajor, transA.cblas, transB.cblas, blasint(m), blasint(n), blasint(k),
                    alpha, a, blasint(lda), b, blasint(ldb), beta, c, blasint(ldc))
    }

    /// Runs `body(t)` for every tile index 0..<count over `threadCount` threads (in order on the
    /// calling thread when not `concurrently`: the same tiles, so the same bits, for callers that
    /// are themselves one of several concurrent tasks); each tile's work must be independent.
    static func forEachTile(_ count: Int, concurrently: Bool = true, _ body: (Int) -> Void) {
        let threads = threadCount
        if count <= 1 || threads <= 1 || !concurrently {
            for t in 0..<count { body(t) }
            return
        }
        withoutActuallyEscaping(body) { body in
            let box = UnsafeSendable(body)
            DispatchQueue.concurrentPerform(iterations: min(threads, count)) { worker in
                var t = worker
                while t < count {
                    box.value(t)
                    t += threads
                }
            }
        }
    }

    /// C = alpha * op(A) * op(B) + beta * C.
    public static func gemm(
        _ a: Matrix, _ transA: Transpose = .none, _ b: Matrix, _ transB: Transpose = .none,
        alpha: Float = 1, beta: Float = 0, into c: inout Matrix
    ) {
        let (m, k, kb, n) = Transpose.product(aRows: a.rows, aCols: a.cols, transA, bRows: b.rows, bCols: b.cols, transB)
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
                syrkUpper(n: d, k: x.rows, alpha: alpha, a: px.baseAddress!, lda: d, c: pc.baseAddress!, ldc: d)
                mirrorUpperToLower(pc.baseAddress!, n: d)
            }
        }
    }

    /// Side of the square tiles of the symmetric and triangular routines (a constant, so that
    /// results do not depend on the thread count).
    static let tile = 128

    /// The upper triangle of C[n x n] += alpha * Aᵀ A for A [k x n] (leading dimension lda), in
    /// strips of `side` rows (by default `syrkTile(n)`) from row 0: each strip's diagonal block by
    /// ssyrk, the rest of its columns by sgemm in blocks of `side` (128) or 2·`side` columns,
    /// concurrently. `rows`: only these rows (whole strips, or up to n); each block's bits are the
    /// same whichever others are computed (`syrkUpperWindows` computes pieces of C held apart, the
    /// units in which replicas pass a Hessian on). They are not the same for other block shapes on
    /// every OpenBLAS kernel (Haswell's differ, SkylakeX's do not), so the shapes are a function of
    /// n alone.
    public static func syrkUpper(n: Int, k: Int, alpha: Float, a: UnsafePointer<Float>, lda: Int,
                          c: UnsafeMutablePointer<Float>, ldc: Int, rows: Range<Int>? = nil, side: Int? = nil) {
        syrkUpperWindows(n: n, windows: [(k, alpha, 1, a, lda)], side: side, pieces: [(c, ldc, rows ?? 0..<n, 0..<n, 0, 0)])
    }

    /// Where a piece of C lies for `syrkUpperWindows`: its storage (ldc wide, from row `firstRow`
    /// and column `firstColumn`) and the rows and columns it covers (whole strips; only the blocks
    /// within the columns, a block that crosses their ends refused).
    public typealias UpperPieceStorage = (c: UnsafeMutablePointer<Float>, ldc: Int, rows: Range<Int>, columns: Range<Int>, firstRow: Int, firstColumn: Int)

    /// For each window in order, on the pieces of C: C = beta·C, then C += alpha·AᵀA (A [k x n],
    /// the window's inputs), block by block: the bits of calling `scaleUpper` and `syrkUpper`
    /// once per window, but a block's next window starts as soon as that block's last one is
    /// done, not once every block's is. The blocks x windows tasks go to the threads in window
    /// order, so a batch of a few more blocks than threads keeps them all busy (per window, it
    /// would take two rounds for the last few).
    public static func syrkUpperWindows(n: Int, windows: [(k: Int, alpha: Float, beta: Float, a: UnsafePointer<Float>, lda: Int)],
                                        side: Int? = nil, pieces: [UpperPieceStorage]) {
        _ = configured
        let t = side ?? syrkTile(n)
        var tiles: [(piece: Int, i0: Int, j0: Int, cols: Int)] = []
        for (index, piece) in pieces.enumerated() {
            let (rows, columns) = (piece.rows, piece.columns)
            precondition(rows.lowerBound >= 0 && rows.upperBound <= n && rows.lowerBound % t == 0 && (rows.upperBound % t == 0 || rows.upperBound == n),
                         "syrkUpper: rows \(rows) are not whole strips of \(t) within \(n)")
            for i0 in stride(from: rows.lowerBound, to: rows.upperBound, by: t) {
                for block in syrkBlocks(n: n, strip: i0, side: t) where block.upperBound > columns.lowerBound && block.lowerBound < columns.upperBound {
                    precondition(block.lowerBound >= columns.lowerBound && block.upperBound <= columns.upperBound,
                                 "syrkUpper: columns \(columns) cut the block of columns \(block) in the strip from row \(i0) of \(n)")
                    tiles.append((index, i0, block.lowerBound, block.count))
                }
            }
        }
        let blocks = tiles.count, total = blocks * windows.count
        if total == 0 { return }
        let args = UnsafeSendable((windows, pieces))
        func run(_ task: Int) {
            let (windows, pieces) = args.value
            let w = windows[task / blocks]
            let (p, i0, j0, cols) = tiles[task % blocks]
            let count = min(t, n - i0)
            let (c, ldc) = (pieces[p].c, pieces[p].ldc)
            let row = c + (i0 - pieces[p].firstRow) * ldc - pieces[p].firstColumn
            if w.beta != 1 { scaleUpper(row, n: n, by: w.beta, rows: i0..<(i0 + count), columns: j0..<(j0 + cols), firstRow: i0, ldc: ldc) }
            if w.k == 0 { return }
            if i0 == j0 {
                cblas_ssyrk(CblasRowMajor, CblasUpper, CblasTrans, blasint(count), blasint(w.k),
                            w.alpha, w.a + i0, blasint(w.lda), 1, row + i0, blasint(ldc))
            } else {
                blasSgemm(.transposed, .none, m: count, n: cols, k: w.k, alpha: w.alpha,
                          a: w.a + i0, lda: w.lda, b: w.a + j0, ldb: w.lda, beta: 1, c: row + j0, ldc: ldc)
            }
        }
        let threads = min(threadCount, total)
        if threads <= 1 || windows.count == 1 {
            for window in 0..<windows.count { forEachTile(blocks) { run(window * blocks + $0) } }
            return
        }
        // Tasks in window order from a shared counter; a task waits for its block's previous
        // window (claimed before it, so always running or done).
        final class Queue: @unchecked Sendable {
            let condition = NSCondition()
            var next = 0
            var done: [Int]
            init(_ blocks: Int) { done = [Int](repeating: 0, count: blocks) }
        }
        let queue = Queue(blocks)
        withoutActuallyEscaping(run) { run in
            let body = UnsafeSendable(run)
            DispatchQueue.concurrentPerform(iterations: threads) { _ in
                while true {
                    queue.condition.lock()
                    let task = queue.next
                    queue.next += 1
                    if task >= total { queue.condition.unlock(); return }
                    let (window, block) = (task / blocks, task % blocks)
                    while queue.done[block] < window { queue.condition.wait() }
                    queue.condition.unlock()
                    body.value(task)
                    queue.condition.lock()
                    queue.done[block] = window + 1
                    queue.condition.broadcast()
                    queue.condition.unlock()
                }
            }
        }
    }

    /// The strip height of `syrkUpper` for an n x n result: 128 below 4096 columns (blocks of
    /// 128 x 128, enough of them for the threads at SmolLM2's 576 and 1536), 256 from there
    /// (blocks of 256 x 512). Each block packs its slices of A, strided by n: at a 70B's 28672
    /// columns 128 x 128 blocks ran the update at 318 GFLOP/s, 256 x 512 at 436 and 512 x 512
    /// at 439 (2048 rows, 2 threads, SkylakeX; at 8192 columns 332, 409 and 449). 256 rather
    /// than 512 so that replicas can still share an 8192-wide Hessian 16 ways (two strips each).
    public static func syrkTile(_ n: Int) -> Int { n < 4096 ? 128 : 256 }

    /// The column blocks of `syrkUpper`'s strip from row `i0` of an n x n result (strips of
    /// `side` rows): the diagonal block, then blocks of `side` (128) or 2·`side` columns.
    static func syrkBlocks(n: Int, strip i0: Int, side t: Int) -> [Range<Int>] {
        let w = t == 128 ? 128 : 2 * t
        return [i0..<min(n, i0 + t)] + stride(from: i0 + t, to: n, by: w).map { $0..<min(n, $0 + w) }
    }

    /// The parts in which replicas pass an n x n Hessian's upper triangle on (`StatisticsChain`):
    /// for each strip of `syrkTile(n)` rows, its blocks from the diagonal on, gathered into
    /// pieces of at most `maxColumns` columns (a block wider than that alone). Each piece's bits
    /// are those the whole update gives it; smaller pieces let the next replica start sooner.
    public static func syrkPieces(n: Int, maxColumns: Int) -> [(rows: Range<Int>, columns: Range<Int>, blocks: Int)] {
        let t = syrkTile(n)
        var out: [(rows: Range<Int>, columns: Range<Int>, blocks: Int)] = []
        for i0 in stride(from: 0, to: n, by: t) {
            let rows = i0..<min(n, i0 + t)
            var piece: (columns: Range<Int>, blocks: Int)?
            for block in syrkBlocks(n: n, strip: i0, side: t) {
                if let p = piece, block.upperBound - p.columns.lowerBound <= maxColumns {
                    piece = (p.columns.lowerBound..<block.upperBound, p.blocks + 1)
                } else {
                    if let p = piece { out.append((rows, p.columns, p.blocks)) }
                    piece = (block, 1)
                }
            }
            if let piece { out.append((rows, piece.columns, piece.blocks)) }
        }
        return out
    }

    /// Tile coordinates (i, j) with i <= j of a t x t grid, in a fixed order.
    static func upperTiles(_ t: Int) -> [(Int, Int)] {
        var out: [(Int, Int)] = []
        out.reserveCapacity(t * (t + 1) / 2)
        for i in 0..<t { for j in i..<t { out.append((i, j)) } }
        return out
    }

    /// The upper triangle (diagonal included) of the n x n matrix at `p`, times `factor`. (Not
    /// BLAS's beta: OpenBLAS's small-matrix kernels fuse beta·C into the product's rounding.)
    /// With `rows` and `columns`, only those; p holds C's rows from `firstRow` on, `ldc` wide (by
    /// default n), a row's pointer at its column 0.
    static func scaleUpper<T: FloatingPoint>(_ p: UnsafeMutablePointer<T>, n: Int, by factor: T, rows: Range<Int>? = nil,
                                             columns: Range<Int>? = nil, firstRow: Int = 0, ldc: Int? = nil) {
        let columns = columns ?? 0..<n
        let ldc = ldc ?? n
        for i in rows ?? 0..<n {
            let row = p + (i - firstRow) * ldc
            for j in max(i, columns.lowerBound)..<max(i, columns.upperBound) { row[j] *= factor }
        }
    }

    @usableFromInline
    static func mirrorUpperToLower<T>(_ p: UnsafeMutablePointer<T>, n: Int) {
        // By 32 x 32 tiles: a row of the lower triangle reads a column of the upper one, and
        // across a tile those reads stay within 32 rows' cache lines (the untiled loop was 3% of
        // a SparseGPT prune, for a 1536-wide Hessian after every window).
        // Each band of 32 rows writes only its own rows, from the upper triangle, which no band
        // writes: the bands go over the threads (a plain copy, the same values in any order).
        let b = 32
        let base = UnsafeSendable(p)
        Parallel.forEachTask((n + b - 1) / b) { band in
            let p = base.value
            let i0 = band * b, i1 = min(i0 + b, n)
            for j0 in stride(from: 0, through: i0, by: b) {
                for i in i0..<i1 {
                    let row = p + i * n
                    for j in j0..<min(j0 + b, i) { row[j] = p[j * n + i] }
                }
            }
        }
    }

    /// Cholesky factor of a symmetric positive definite matrix: `upper` gives U with A = UᵀU,
    /// otherwise L with A = LLᵀ. The other triangle of the result is zero.
    public static func cholesky(_ a: Matrix, upper: Bool, what: String = "cholesky") throws -> Matrix {
        precondition(a.rows == a.cols, "cholesky of a non-square \(a.rows)x\(a.cols) matrix")
        var f = a
        let n = a.rows
        let minor = f.withUnsafeMutableBufferPointer { choleskyLower($0.baseAddress!, n: n) }
        if minor > 0 { throw LinalgError.notPositiveDefinite(what: what, minor: minor) }
        f.withUnsafeMutableBufferPointer { p in
            let b = p.baseAddress!
            for i in 0..<n {
                if upper {
                    for j in 0..<i { b[j * n + i] = b[i * n + j]; b[i * n + j] = 0 }
                } else {
                    for j in (i + 1)..<n { b[i * n + j] = 0 }
                }
            }
        }
        return f
    }

    /// Blocked right-looking Cholesky in place: the lower triangle of the row-major n x n matrix
    /// at `p` becomes L with A = LLᵀ (the strict upper triangle is neither read nor written).
    /// Panels of `tile` columns (`choleskyPanel`), each followed by its update of the trailing
    /// tiles (`choleskyUpdate`). Returns 0, or the 1-based leading minor that is not positive
    /// definite. `SpreadInverseFactor` (TopiaryPrune) makes the same calls spread over replicas.
    static func choleskyLower(_ p: UnsafeMutablePointer<Float>, n: Int) -> Int {
        let tiles = (n + tile - 1) / tile
        for k in 0..<tiles {
            let minor = choleskyPanel(p, n: n, panel: k)
            if minor > 0 { return minor }
            choleskyUpdate(p, n: n, panel: k, columns: Array((k + 1)..<tiles))
        }
        return 0
    }

    /// Panel `k` of the blocked Cholesky on the row-major n x n matrix at `p` (whose tile column
    /// k has had the updates of panels 0..<k): the diagonal block by LAPACK's potrf, the row
    /// tiles below it by trsm, concurrently. Returns 0, or the 1-based leading minor of the
    /// whole matrix that is not positive definite.
    static func choleskyPanel(_ p: UnsafeMutablePointer<Float>, n: Int, panel k: Int) -> Int {
        _ = configured
        let box = UnsafeSendable(p)
        let k0 = k * tile
        let kb = min(tile, n - k0)
        // Row-major lower with leading dimension n is column-major upper.
        let info = LAPACKE_spotrf(LAPACK_COL_MAJOR, 85, Int32(kb), p + k0 * n + k0, Int32(n))
        if info > 0 { return k0 + Int(info) }
        precondition(info == 0, "spotrf: illegal argument \(-info)")
        let r0 = k0 + kb
        forEachTile((n - r0 + tile - 1) / tile) { t in
            let p = box.value
            let i0 = r0 + t * tile
            cblas_strsm(CblasRowMajor, CblasRight, CblasLower, CblasTrans, CblasNonUnit,
                        blasint(min(tile, n - i0)), blasint(kb), 1, p + k0 * n + k0, blasint(n),
                        p + i0 * n + k0, blasint(n))
        }
        return 0
    }

    /// Panel `k`'s update of the trailing tiles in the tile columns `columns` (each after k):
    /// A[I, J] -= L[I, k] L[J, k]ᵀ for every tile (I, J) on or below the diagonal with J one of
    /// them, by ssyrk on the diagonal and sgemm below it, concurrently. Each tile's call is the
    /// same whichever columns a caller updates together, so its bits are too.
    static func choleskyUpdate(_ p: UnsafeMutablePointer<Float>, n: Int, panel k: Int, columns: [Int]) {
        _ = configured
        let box = UnsafeSendable(p)
        let k0 = k * tile
        let kb = min(tile, n - k0)
        let tiles = (n + tile - 1) / tile
        var pairs: [(Int, Int)] = []
        for j in columns {
            precondition(j > k && j < tiles, "choleskyUpdate: tile column \(j) is not after panel \(k) of \(tiles)")
            for i in j..<tiles { pairs.append((j, i)) }
        }
        forEachTile(pairs.count) { t in
            let p = box.value
            let (tj, ti) = pairs[t]
            let i0 = ti * tile, j0 = tj * tile
            let rows = min(tile, n - i0), cols = min(tile, n - j0)
            if ti == tj {
                cblas_ssyrk(CblasRowMajor, CblasLower, CblasNoTrans, blasint(rows), blasint(kb),
                            -1, p + i0 * n + k0, blasint(n), 1, p + i0 * n + i0, blasint(n))
            } else {
                blasSgemm(.none, .transposed, m: rows, n: cols, k: kb, alpha: -1,
                          a: p + i0 * n + k0, lda: n, b: p + j0 * n + k0, ldb: n,
                          beta: 1, c: p + i0 * n + j0, ldc: n)
            }
        }
    }

    /// Tile column `t` of X = L⁻¹ for the Cholesky factor in the lower triangle of the row-major
    /// n x n `l` (rows from t's first on are read), written into the zeroed n x n `x`:
    /// L[j0:, j0:] X[j0:, J] = I[j0:, J] by one trsm.
    static func lowerInverseTile(_ l: UnsafePointer<Float>, _ x: UnsafeMutablePointer<Float>, n: Int, tile t: Int) {
        _ = configured
        let j0 = t * tile
        let width = min(tile, n - j0)
        for i in j0..<(j0 + width) { x[i * n + i] = 1 }
        cblas_strsm(CblasRowMajor, CblasLeft, CblasLower, CblasNoTrans, CblasNonUnit,
                    blasint(n - j0), blasint(width), 1, l + j0 * n + j0, blasint(n),
                    x + j0 * n + j0, blasint(n))
    }

    /// Inverse of a symmetric positive definite matrix through its Cholesky factor:
    /// A⁻¹ = L⁻ᵀ L⁻¹, with L⁻¹ by triangular solves in column tiles and the product in square
    /// tiles that skip L⁻¹'s zeros, the tiles concurrently.
    public static func inverseSPD(_ a: Matrix, what: String = "inverse") throws -> Matrix {
        precondition(a.rows == a.cols)
        let n = a.rows
        var f = a
        let minor = f.withUnsafeMutableBufferPointer { choleskyLower($0.baseAddress!, n: n) }
        if minor > 0 { throw LinalgError.notPositiveDefinite(what: what, minor: minor) }
        let x = try lowerInverse(f, what: what)
        let tiles = (n + tile - 1) / tile
        // A⁻¹[I, J] = Σ_k X[k, I] X[k, J], k from max(i0, j0) (X is zero above its diagonal).
        x.withUnsafeBufferPointer { px in
            f.withUnsafeMutableBufferPointer { pr in
                let args = UnsafeSendable((px.baseAddress!, pr.baseAddress!))
                let pairs = upperTiles(tiles)
                forEachTile(pairs.count) { t in
                    let (x, r) = args.value
                    let (ti, tj) = pairs[t]
                    let i0 = ti * tile, j0 = tj * tile
                    blasSgemm(.transposed, .none, m: min(tile, n - i0), n: min(tile, n - j0), k: n - j0, alpha: 1,
                              a: x + j0 * n + i0, lda: n, b: x + j0 * n + j0, ldb: n, beta: 0,
                              c: r + i0 * n + j0, ldc: n)
                }
                mirrorUpperToLower(pr.baseAddress!, n: n)
            }
        }
        return f
    }

    /// The upper Cholesky factor U of A⁻¹ (A⁻¹ = UᵀU, U upper with a positive diagonal) for a
    /// symmetric positive definite A, without forming A⁻¹: with J the order-reversing
    /// permutation, JAJ = LLᵀ gives A = RRᵀ for the upper R = JLJ, so A⁻¹ = R⁻ᵀR⁻¹ and
    /// U = R⁻¹ = J L⁻¹ J (Cholesky factors with a positive diagonal are unique). One Cholesky
    /// and one triangular inverse, 2n³/3 FLOPs, where the Cholesky of the explicit inverse takes
    /// 4n³/3. On a row-major matrix J·J reverses the element order.
    /// Throws `notPositiveDefinite` naming the first trailing minor of A (counted from its last
    /// row) that is not positive definite.
    public static func inverseCholeskyUpper(_ a: consuming Matrix, what: String = "inverse Cholesky factor") throws -> Matrix {
        precondition(a.rows == a.cols, "inverseCholeskyUpper of a non-square \(a.rows)x\(a.cols) matrix")
        let n = a.rows
        var f = consume a
        reverse(&f)
        let minor = f.withUnsafeMutableBufferPointer { choleskyLower($0.baseAddress!, n: n) }
        if minor > 0 { throw LinalgError.notPositiveDefinite(what: "\(what) (factored from its last row: minor \(minor) is its last \(minor) rows and columns)", minor: minor) }
        var x = try lowerInverse(f, what: what)
        _ = consume f
        reverse(&x)
        return x
    }

    /// J·a·J for the order-reversing permutation J, in place: the elements in reverse order.
    static func reverse(_ a: inout Matrix) {
        let count = a.count
        a.withUnsafeMutableBufferPointer { p in
            let b = p.baseAddress!
            for i in 0..<count / 2 { (b[i], b[count - 1 - i]) = (b[count - 1 - i], b[i]) }
        }
    }

    /// X = L⁻¹ (lower, zero above the diagonal) for the Cholesky factor in the lower triangle of
    /// `l` (its strict upper triangle is not read): column tile J solves
    /// L[j0:, j0:] X[j0:, J] = I[j0:, J], the tiles concurrently.
    static func lowerInverse(_ l: Matrix, what: String) throws -> Matrix {
        let n = l.rows
        var x = Matrix(rows: n, cols: n)
        let tiles = (n + tile - 1) / tile
        l.withUnsafeBufferPointer { pf in
            x.withUnsafeMutableBufferPointer { px in
                let args = UnsafeSendable((pf.baseAddress!, px.baseAddress!))
                forEachTile(tiles) { t in
                    let (l, x) = args.value
                    lowerInverseTile(l, x, n: n, tile: t)
                }
            }
        }
        if !x.withUnsafeBufferPointer({ $0.allSatisfy { $0.isFinite } }) {
            throw LinalgError.singular(what: what, info: 0)
        }
        return x
    }

    /// Solve op(T) X = B for a triangular T (upper or lower), B [n x k]. Returns X.
    public static func solveTriangular(_ t: Matrix, _ b: Matrix, upper: Bool, transpose: Bool = false) -> Matrix {
        _ = configured
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
        _ = configured
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
        _ = configured
        let n = a.rows
        precondition(a.rows == a.cols)
        return try withDoubles(of: a) { d in
            var info = LAPACKE_dpotrf(LAPACK_COL_MAJOR, 85, Int32(n), d, Int32(n))
            if info > 0 { throw LinalgError.notPositiveDefinite(what: what, minor: Int(info)) }
            info = LAPACKE_dpotri(LAPACK_COL_MAJOR, 85, Int32(n), d, Int32(n))
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
    }

    /// Solves A X = B for symmetric positive definite A [n x n], B [n x k], in Float64
    /// (for normal equations whose conditioning fp32 cannot carry). Returns X in Float32.
    public static func solveSPDDouble(_ a: Matrix, _ b: Matrix, what: String = "solve") throws -> Matrix {
        _ = configured
        precondition(a.rows == a.cols && a.rows == b.rows, "solveSPDDouble: \(a.rows)x\(a.cols) with \(b.rows)x\(b.cols)")
        let n = a.rows, k = b.cols
        return try withDoubles(of: a) { ad in
            try withDoubles(of: b) { bd in
                let info = LAPACKE_dposv(LAPACK_ROW_MAJOR, 85, Int32(n), Int32(k), ad, Int32(n), bd, Int32(k))
                if info > 0 { throw LinalgError.notPositiveDefinite(what: what, minor: Int(info)) }
                precondition(info == 0, "dposv: illegal argument \(-info)")
                return Matrix(rows: n, cols: k) { out in for i in 0..<(n * k) { out[i] = Float(bd[i]) } }
            }
        }
    }

    /// X = C·A⁻¹ for a symmetric positive definite A [n x n] and C [k x n], in Float64, returned
    /// in Float32: `solveSPDDouble(a, cᵀ)ᵀ` with neither transpose made. C's rows, row-major,
    /// are the columns of Cᵀ in LAPACK's column-major terms, so they are the right-hand sides as
    /// they lie, and so is the result; A, symmetric, reads the same either way. One Cholesky
    /// (as `dposv` makes it), then the triangular solves in chunks of `rightChunk` rows of C
    /// over the threads. Each right-hand side's solve is the same arithmetic in whichever chunk
    /// it falls (the chunks are whole multiples of every kernel's column unroll), so the bits
    /// are those of one `dposv` over all of them, whatever the thread count (tested).
    public static func solveSPDDoubleRight(_ a: Matrix, _ c: Matrix, what: String = "solve") throws -> Matrix {
        _ = configured
        precondition(a.rows == a.cols && a.rows == c.cols, "solveSPDDoubleRight: \(a.rows)x\(a.cols) with \(c.rows)x\(c.cols)")
        let n = a.rows, k = c.rows
        guard n > 0, k > 0 else { return Matrix(rows: k, cols: n) }
        return try withDoubles(of: a) { ad in
            try withDoubles(of: c) { cd in
                let info = LAPACKE_dpotrf_work(LAPACK_COL_MAJOR, 85, Int32(n), ad, Int32(n))
                if info > 0 { throw LinalgError.notPositiveDefinite(what: what, minor: Int(info)) }
                precondition(info == 0, "dpotrf: illegal argument \(-info)")
                let chunks = (k + rightChunk - 1) / rightChunk
                let (factor, rhs) = (UnsafeSendable(ad), UnsafeSendable(cd))
                Parallel.forEachTask(chunks) { chunk in
                    let first = chunk * rightChunk, count = min(rightChunk, k - first)
                    let status = LAPACKE_dpotrs_work(LAPACK_COL_MAJOR, 85, Int32(n), Int32(count), factor.value, Int32(n),
                                                     rhs.value + first * n, Int32(n))
                    precondition(status == 0, "dpotrs: illegal argument \(-status)")
                }
                return Matrix(rows: k, cols: n) { out in for i in 0..<(n * k) { out[i] = Float(cd[i]) } }
            }
        }
    }

    /// `body` given `m`'s elements as Float64, in working space from the cache of mappings that
    /// tensors use (`MappedBuffers`), handed back when `body` returns. As Swift arrays they were
    /// a new mapping from malloc each time, every page faulted in on first write: 138 MB a block
    /// in SparseLLM's refits and p-step inverses at SmolLM2's width.
    static func withDoubles<R>(of m: Matrix, _ body: (UnsafeMutablePointer<Double>) throws -> R) rethrows -> R {
        let count = max(m.count, 1)
        let space = Storage(count: 2 * count, zeroed: false)
        return try withExtendedLifetime(space) {
            let d = UnsafeMutableRawPointer(space.pointer).bindMemory(to: Double.self, capacity: count)
            m.withUnsafeBufferPointer { f in for i in f.indices { d[i] = Double(f[i]) } }
            return try body(d)
        }
    }

    /// Right-hand sides per task of `solveSPDDoubleRight`.
    public static let rightChunk = 128

    /// OpenBLAS's description of its build (version, target kernel, threading).
    public static var openBLASConfig: String { String(cString: openblas_get_config()) }

    /// Threads that Topiary's tiles and chunks run on. OpenBLAS itself always runs one thread
    /// per call (set once, before the first call), so that no result depends on this number.
    public static var threadCount: Int {
        _ = configured
        return threads
    }

    public static func setThreadCount(_ n: Int) {
        _ = configured
        threads = max(1, n)
    }

    nonisolated(unsafe) private static var threads = 1

    /// OpenBLAS's own default (cores, or OPENBLAS_NUM_THREADS) becomes ours; OpenBLAS gets one.
    @usableFromInline
    static let configured: Bool = {
        threads = max(1, Int(openblas_get_num_threads()))
        openblas_set_num_threads(1)
        return true
    }()
}
