import TopiaryTensor

/// Statistics of one linear layer's inputs over the calibration set, accumulated one sequence at
/// a time exactly as the reference scripts do (a running average, so the scale is 2/n Σ x xᵀ):
/// H ← H·n/(n+1); n ← n+1; H ← H + (2/n)·XᵀX, and for Wanda s_j ← s_j·(n−1)/n + Σ_t x_tj²/n.
/// Both live on `backend`.
public final class LayerStatistics: @unchecked Sendable {
    public let columns: Int
    public let backend: any ComputeBackend
    /// H [columns x columns] on the backend. Windows update its upper triangle only; the lower
    /// one is copied from it when H is read (once a block instead of once a window: the copy
    /// and the scaling of the whole matrix were 5% of a SparseGPT prune).
    public var hessianTensor: Tensor {
        let h = hessianUpper
        if lowerIsStale {
            backend.mirrorUpper(h)
            lowerIsStale = false
        }
        return h
    }
    /// H, unless the statistics were made without it (Wanda's and magnitude's blocks need only
    /// the squared norms).
    private let hessianStorage: Tensor?
    public var hasHessian: Bool { hessianStorage != nil }
    private var lowerIsStale = false
    /// Mean over sequences of Σ_tokens x_j² (Wanda's scaler_row) [1 x columns] on the backend.
    public let squaredNormsTensor: Tensor
    public private(set) var sequences = 0

    public init(columns: Int, backend: any ComputeBackend = CPUBackend(), hessian: Bool = true) {
        self.columns = columns
        self.backend = backend
        hessianStorage = hessian ? backend.zeros(rows: columns, cols: columns) : nil
        squaredNormsTensor = backend.zeros(rows: 1, cols: columns)
    }

    /// H on the host (a download).
    public var hessian: Matrix { backend.download(hessianTensor) }
    /// The squared norms on the host (a download).
    public var squaredNorms: [Float] { backend.download(squaredNormsTensor).values }

    /// Adds one calibration sequence's inputs [tokens x columns] from the host (an upload).
    public func add(_ x: Matrix) { add(backend.upload(x)) }

    /// Adds one calibration sequence's inputs [tokens x columns].
    public func add(_ x: Tensor) {
        precondition(x.cols == columns, "statistics for \(columns) inputs given \(x.cols)")
        let n = Float(sequences)
        let decay = n / (n + 1)
        sequences += 1
        // H·decay + (2/n)·XᵀX on the upper triangle (the bits of scaling H, then adding).
        if let hessianStorage {
            backend.syrkUpperUpdate(x, alpha: 2 / Float(sequences), beta: decay, into: hessianStorage)
            lowerIsStale = true
        }
        Self.addSquaredNorms(x, before: sequences - 1, into: squaredNormsTensor, on: backend)
    }

    /// The squared norms' update for the `before + 1`-th sequence, as `add` makes it.
    static func addSquaredNorms(_ x: Tensor, before: Int, into norms: Tensor, on backend: any ComputeBackend) {
        let n = Float(before)
        let sums = backend.columnSquaredSums(x)
        backend.scaleAdd(norms, beta: n / (n + 1), sums, alpha: 1 / Float(before + 1))
    }

    /// H's updates for the sequences `xs`, the first of them the `before + 1`-th, on some of its
    /// pieces only, each held apart (`ComputeBackend.syrkUpperUpdate(_:pieces:)`): the bits `add`
    /// gives them.
    static func addHessianPieces(_ xs: [Tensor], before: Int, pieces: [UpperPiece], on backend: any ComputeBackend) {
        let windows = xs.enumerated().map { i, x in
            let n = Float(before + i)
            return (x: x, alpha: 2 / Float(before + i + 1), beta: n / (n + 1))
        }
        backend.syrkUpperUpdate(windows, pieces: pieces)
    }

    /// Statistics put together from parts made elsewhere (`StatisticsChain`): the sequence count
    /// and squared norms here, H's pieces by `setUpperPiece`.
    public func restore(sequences: Int, squaredNorms: Tensor) {
        precondition(squaredNorms.rows == 1 && squaredNorms.cols == columns, "squared norms \(squaredNorms) for \(columns) inputs")
        self.sequences = sequences
        backend.copy(squaredNorms.region(), into: squaredNormsTensor.region())
    }

    /// Puts a piece of H's upper triangle in place (`ComputeBackend.statisticsPieces`); the lower
    /// triangle follows when H is read.
    public func setUpperPiece(_ piece: UpperPiece) {
        precondition(piece.values.rows == piece.rows.count && piece.values.cols == piece.columns.count
                     && piece.rows.upperBound <= columns && piece.columns.upperBound <= columns,
                     "rows \(piece.rows) and columns \(piece.columns) of a \(columns)-column Hessian given \(piece.values)")
        backend.copy(piece.values.region(), into: hessianUpper.region(rows: piece.rows, cols: piece.columns))
        lowerIsStale = true
    }

    /// H's storage as it is (its lower triangle possibly stale).
    private var hessianUpper: Tensor {
        guard let hessianStorage else { preconditionFailure("these statistics were collected without the Hessian (PrunePlan.collectsHessian)") }
        return hessianStorage
    }

    /// Whether `gram()` gives a matrix: H was made and has seen a sequence.
    public var hasGram: Bool { hasHessian && sequences > 0 }

    /// Σ XᵀX over the sequences added (H's running average times n/2), a new tensor: the Gram
    /// matrix of the inputs themselves, for a solver that works at that scale (SparseLLM's
    /// normal equations). nil without H or before any sequence.
    public func gram() -> Tensor? {
        guard hasGram else { return nil }
        let g = backend.copy(hessianTensor)
        backend.scale(g, by: Float(sequences) / 2)
        return g
    }

    /// ‖A Xᵀ‖² up to the common factor n/2: tr(A H Aᵀ) for A [rows x columns].
    public func quadraticForm(_ a: Matrix) -> Double { quadraticForm(backend.upload(a)) }

    public func quadraticForm(_ a: Tensor) -> Double {
        backend.dot(backend.matmul(a, hessianTensor), a)
    }
}
