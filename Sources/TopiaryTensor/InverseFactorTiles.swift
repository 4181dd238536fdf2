/// The steps of `Linalg.inverseCholeskyUpper` one tile column at a time, for a caller that
/// spreads them over machines (TopiaryPrune's `SpreadInverseFactor`): the Cholesky of JAJ panel
/// by panel (`factorPanel`, then each holder's `update` of its own tile columns), L⁻¹ by tile
/// columns (`invert`), U = J L⁻¹ J (`upperFactor`). Every tile is the one BLAS call that the
/// one-process factorisation makes for it, on the same values, so U has the same bits whoever
/// computes which tile column. Host memory only; nothing here sends or receives.
public struct InverseFactorTiles {
    public let order: Int
    public let tiles: Int
    /// JAJ, whose lower triangle becomes L as the panels are factored.
    var a: Matrix
    /// L⁻¹'s tile columns as they are computed or set (zero until then).
    var x: Matrix

    public static var tile: Int { Linalg.tile }

    /// A holder that gets its tile columns of JAJ from elsewhere (`setColumn`): zeros.
    public init(order: Int) {
        precondition(order > 0, "InverseFactorTiles: order \(order)")
        self.order = order
        tiles = (order + Linalg.tile - 1) / Linalg.tile
        a = Matrix(rows: order, cols: order)
        x = Matrix(rows: 0, cols: 0)
    }

    /// The holder of A (symmetric positive definite, square): JAJ in A's own memory.
    public init(reversing matrix: consuming Matrix) {
        precondition(matrix.rows == matrix.cols && matrix.rows > 0, "InverseFactorTiles: \(matrix.rows)x\(matrix.cols) is not square")
        order = matrix.rows
        tiles = (order + Linalg.tile - 1) / Linalg.tile
        a = consume matrix
        Linalg.reverse(&a)
        x = Matrix(rows: 0, cols: 0)
    }

    /// The columns of tile column `t`.
    public func columns(_ t: Int) -> Range<Int> {
        precondition(t >= 0 && t < tiles, "tile column \(t) of \(tiles)")
        return (t * Linalg.tile)..<min(order, (t + 1) * Linalg.tile)
    }

    /// Tile column `t` of JAJ (or of L, once factored) from its first row down: (n − t0) x width.
    public func column(_ t: Int) -> Matrix { Self.cut(a, columns(t)) }

    /// Sets tile column `t` from its first row down (the shape `column(t)` has).
    public mutating func setColumn(_ t: Int, _ m: Matrix) { Self.paste(&a, m, columns(t)) }

    /// The shape of tile column `t` as `column` and `setColumn` hold it.
    public func columnShape(_ t: Int) -> (rows: Int, cols: Int) {
        let c = columns(t)
        return (order - c.lowerBound, c.count)
    }

    /// Factors panel `k` (its tile column must have had every earlier panel's update). Throws
    /// `notPositiveDefinite` as `Linalg.inverseCholeskyUpper` words it.
    public mutating func factorPanel(_ k: Int, what: String) throws {
        _ = columns(k)
        let n = order
        let minor = a.withUnsafeMutableBufferPointer { Linalg.choleskyPanel($0.baseAddress!, n: n, panel: k) }
        if minor > 0 {
            throw LinalgError.notPositiveDefinite(what: "\(what) (factored from its last row: minor \(minor) is its last \(minor) rows and columns)", minor: minor)
        }
    }

    /// Panel `k`'s update of the tile columns `columnTiles` (each after k); panel k's tile column
    /// must be factored (here or by `setColumn`).
    public mutating func update(panel k: Int, columns columnTiles: [Int]) {
        let n = order
        a.withUnsafeMutableBufferPointer { Linalg.choleskyUpdate($0.baseAddress!, n: n, panel: k, columns: columnTiles) }
    }

    /// L⁻¹'s tile columns `columnTiles`; L must be whole (every panel factored or set). Throws
    /// `singular` naming `what` if one of them is not finite.
    public mutating func invert(_ columnTiles: [Int], what: String) throws {
        let n = order
        if x.rows != n { x = Matrix(rows: n, cols: n) }
        a.withUnsafeBufferPointer { pa in
            x.withUnsafeMutableBufferPointer { px in
                let args = UnsafeSendable((pa.baseAddress!, px.baseAddress!))
                Linalg.forEachTile(columnTiles.count) { i in
                    let (l, x) = args.value
                    Linalg.lowerInverseTile(l, x, n: n, tile: columnTiles[i])
                }
            }
        }
        // Each tile column's rows from its first, read in place.
        let finite = x.withUnsafeBufferPointer { px in
            columnTiles.allSatisfy { t in
                let c = columns(t)
                return (c.lowerBound..<n).allSatisfy { i in UnsafeBufferPointer(rebasing: px[(i * n + c.lowerBound)..<(i * n + c.upperBound)]).allSatisfy(\.isFinite) }
            }
        }
        if !finite { throw LinalgError.singular(what: what, info: 0) }
    }

    /// Drops L once every tile column of L⁻¹ this holder computes is done (the rest arrive by
    /// `setInverseColumn`, which needs no L).
    public mutating func releaseFactor() { a = Matrix(rows: 0, cols: 0) }

    /// Tile column `t` of L⁻¹ from its first row down.
    public func inverseColumn(_ t: Int) -> Matrix { Self.cut(x, columns(t)) }

    public mutating func setInverseColumn(_ t: Int, _ m: Matrix) {
        if x.rows != order { x = Matrix(rows: order, cols: order) }
        Self.paste(&x, m, columns(t))
    }

    /// U = J L⁻¹ J, the upper Cholesky factor of A⁻¹, once every tile column of L⁻¹ is here
    /// (moved out: the holder keeps nothing).
    public mutating func upperFactor() -> Matrix {
        var u = Matrix(rows: 0, cols: 0)
        swap(&u, &x)
        Linalg.reverse(&u)
        return u
    }

    static func cut(_ m: Matrix, _ c: Range<Int>) -> Matrix {
        let n = m.cols, w = c.count, r0 = c.lowerBound
        var out = Matrix(rows: n - r0, cols: w)
        m.withUnsafeBufferPointer { src in
            out.withUnsafeMutableBufferPointer { dst in
                for i in r0..<n {
                    (dst.baseAddress! + (i - r0) * w).update(from: src.baseAddress! + i * n + r0, count: w)
                }
            }
        }
        return out
    }

    static func paste(_ m: inout Matrix, _ part: Matrix, _ c: Range<Int>) {
        let n = m.cols, w = c.count, r0 = c.lowerBound
        precondition(part.rows == n - r0 && part.cols == w, "tile column \(c): \(part.rows)x\(part.cols), expected \(n - r0)x\(w)")
        part.withUnsafeBufferPointer { src in
            m.withUnsafeMutableBufferPointer { dst in
                for i in r0..<n {
                    (dst.baseAddress! + i * n + r0).update(from: src.baseAddress! + (i - r0) * w, count: w)
                }
            }
        }
    }
}
