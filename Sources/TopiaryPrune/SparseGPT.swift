import TopiaryTensor

/// SparseGPT (Frantar & Alistarh 2023): prunes a linear layer column by column, compensating
/// each removed weight through the inverse Hessian of the layer's inputs (optimal brain surgeon
/// updates), with lazy 128-column blocks and adaptive per-block mask selection.
public enum SparseGPTPruner {
    public struct Options: Sendable, Equatable, Codable {
        public var blockSize: Int = 128
        /// Dampening added to the diagonal, as a fraction of its mean.
        public var percentDamp: Double = 0.01
        /// `--weight-update admm`: the mask and the kept weights from ADMM iterations on the layer's
        /// least-squares problem (`ADMMPruner`) instead of the OBS column loop; nil: OBS.
        public var admm: ADMMPruner.Options? = nil
        public init(blockSize: Int = 128, percentDamp: Double = 0.01, admm: ADMMPruner.Options? = nil) {
            self.blockSize = blockSize
            self.percentDamp = percentDamp
            self.admm = admm
        }
    }

    public struct Result: Sendable {
        public var weight: Matrix
        /// Sum over rows of the OBS losses (w - q)² / d², halved, as the reference reports it.
        public var loss: Double
    }

    /// The result on the backend that computed it.
    public struct TensorResult: Sendable {
        public var weight: Tensor
        public var loss: Double
    }

    /// Prunes a host `weight` [rows x cols] given the host Hessian H = (2/n) Σ x xᵀ [cols x cols]
    /// on `backend`: uploads them (and `fixedMask`), solves, downloads the result.
    /// `fixedMask` (row-major, true = prune) replaces the mask selection: the OBS updates of the
    /// kept weights under a mask chosen elsewhere (BESA's learned rows).
    public static func prune(_ weight: Matrix, hessian: Matrix, pattern: SparsityPattern, options: Options = Options(),
                             what: String = "layer", fixedMask: [Bool]? = nil,
                             backend: any ComputeBackend = CPUBackend()) throws -> Result {
        precondition(fixedMask.map { $0.count == weight.count } ?? true, "\(what): fixed mask does not match the weight's shape")
        guard hessian.rows == weight.cols && hessian.cols == weight.cols else {
            throw PruneError.shape("\(what): Hessian is \(hessian.rows)x\(hessian.cols), expected \(weight.cols)x\(weight.cols)")
        }
        let mask = fixedMask.map { m in backend.upload(Matrix(rows: weight.rows, cols: weight.cols, values: m.map { $0 ? 1 : 0 })) }
        let r = try prune(backend.upload(weight), hessian: backend.upload(hessian), pattern: pattern, options: options,
                          what: what, fixedMask: mask, on: backend)
        return Result(weight: backend.download(r.weight), loss: r.loss)
    }

    /// Prunes `weight` [rows x cols] given the Hessian [cols x cols], both on `backend`, and
    /// returns the pruned weight there: nothing crosses to the host. `what` names the layer in
    /// errors; the Hessian is not modified (damping goes on a copy). `fixedMask` [rows x cols]
    /// (1 = prune) replaces the unstructured mask selection. `factor`: the Hessian's `factor`,
    /// when the caller keeps it for several layers that read the same inputs (the same bits as
    /// factoring it again).
    public static func prune(_ weight: Tensor, hessian: Tensor, pattern: SparsityPattern, options: Options = Options(),
                             what: String = "layer", fixedMask: Tensor? = nil, factor: Factor? = nil,
                             on backend: any ComputeBackend) throws -> TensorResult {
        let rows = weight.rows, cols = weight.cols
        precondition(fixedMask.map { $0.rows == rows && $0.cols == cols } ?? true, "\(what): fixed mask does not match the weight's shape")
        if let admm = options.admm {
            return try ADMMPruner.prune(weight, hessian: hessian, pattern: pattern, percentDamp: options.percentDamp, options: admm,
                                        what: what, fixedMask: fixedMask, on: backend)
        }
        let f = try factor ?? Self.factor(hessian, options: options, what: what, on: backend)
        let w = try prepare(weight, factor: f, what: what, on: backend)
        return try solve(w, inverseFactor: f.inverseFactor, pattern: pattern, options: options, what: what, fixedMask: fixedMask, on: backend)
    }

    /// What SparseGPT derives from a Hessian alone, shared by the layers that read the same
    /// inputs (q/k/v; gate/up; SparseLLM's refits of one layer): U, the upper Cholesky factor of
    /// the inverse of the damped Hessian, and the Hessian itself, whose zero diagonal entries
    /// mark the dead inputs.
    public struct Factor: @unchecked Sendable {
        public let inverseFactor: Tensor
        public let hessian: Tensor
        /// Whether some input is dead (a zero diagonal entry): only then does `prepare` read H.
        public let hasDeadInputs: Bool
    }

    /// U for `hessian` [cols x cols]: dead inputs (never active in calibration) get a unit
    /// diagonal, then `percentDamp` of the mean diagonal is added, on a copy (`damped`).
    public static func factor(_ hessian: Tensor, options: Options = Options(), what: String = "layer",
                              on backend: any ComputeBackend) throws -> Factor {
        let (h, hasDeadInputs) = try damped(hessian, options: options, what: what, on: backend)
        do {
            try backend.inverseCholeskyFactorInPlace(h, what: "\(what): damped Hessian")
            return Factor(inverseFactor: h, hessian: hessian, hasDeadInputs: hasDeadInputs)
        } catch {
            throw PruneError.numerical("\(error)")
        }
    }

    /// The matrix whose inverse `factor` factors: a copy of `hessian` with a unit diagonal on its
    /// dead inputs and `percentDamp` of the mean diagonal added; and whether some input is dead.
    public static func damped(_ hessian: Tensor, options: Options = Options(), what: String = "layer",
                              on backend: any ComputeBackend) throws -> (hessian: Tensor, hasDeadInputs: Bool) {
        let cols = hessian.cols
        guard hessian.rows == cols else { throw PruneError.shape("\(what): Hessian is \(hessian.rows)x\(cols), not square") }
        let live = backend.sum(backend.map(backend.diagonal(hessian), .nonZero))
        let h = backend.copy(hessian)
        backend.zeroDeadInputs(hessian: h, weight: backend.zeros(rows: 1, cols: cols))
        let damp = Float(options.percentDamp * backend.sum(backend.diagonal(h)) / Double(cols))
        backend.addToDiagonal(h, damp)
        return (h, live < Double(cols))
    }

    /// `factor` for a caller that keeps it for several layers; nil under `--weight-update admm`,
    /// which does not read U.
    public static func sharedFactor(_ hessian: Tensor, options: Options, what: String, on backend: any ComputeBackend) throws -> Factor? {
        options.admm == nil ? try factor(hessian, options: options, what: what, on: backend) : nil
    }

    /// A copy of `weight` with its dead inputs' columns zeroed, for the column loop.
    public static func prepare(_ weight: Tensor, factor: Factor, what: String = "layer", on backend: any ComputeBackend) throws -> Tensor {
        try prepare(weight, hessian: factor.hessian, hasDeadInputs: factor.hasDeadInputs, what: what, on: backend)
    }

    /// `prepare` given the (undamped) Hessian and whether `damped` found a dead input.
    public static func prepare(_ weight: Tensor, hessian: Tensor, hasDeadInputs: Bool, what: String = "layer",
                               on backend: any ComputeBackend) throws -> Tensor {
        let cols = weight.cols
        guard hessian.rows == cols && hessian.cols == cols else {
            throw PruneError.shape("\(what): Hessian is \(hessian.rows)x\(hessian.cols), expected \(cols)x\(cols)")
        }
        let w = backend.copy(weight)
        // (On a copy of H: zeroDeadInputs also sets their diagonal entries, which the caller's H keeps.)
        if hasDeadInputs { backend.zeroDeadInputs(hessian: backend.copy(hessian), weight: w) }
        return w
    }

    /// Rows per lazy-update product for a layer of `rows` rows: a function of the layer alone,
    /// so one process and any split of the rows over replicas make the same calls.
    public static func rowChunk(rows: Int) -> Int {
        rows >= 1024 ? 256 : (rows >= 128 ? 64 : 16)
    }

    /// The first step: a copy of `weight` with its dead inputs (never active in calibration)
    /// zeroed, and the upper Cholesky factor U of the inverse of the damped Hessian.
    public static func prepare(_ weight: Tensor, hessian: Tensor, options: Options = Options(), what: String = "layer",
                               on backend: any ComputeBackend) throws -> (weight: Tensor, inverseFactor: Tensor) {
        guard hessian.rows == weight.cols && hessian.cols == weight.cols else {
            throw PruneError.shape("\(what): Hessian is \(hessian.rows)x\(hessian.cols), expected \(weight.cols)x\(weight.cols)")
        }
        let f = try factor(hessian, options: options, what: what, on: backend)
        return (try prepare(weight, factor: f, what: what, on: backend), f.inverseFactor)
    }

    /// The column loop on `w` (modified in place and returned) given U. Each row's result depends
    /// only on that row, U and the mask, so rows may be solved apart (replicas) as long as the
    /// unstructured mask's threshold is the whole layer's: `threshold(scores, k)`, when given,
    /// returns the k-th smallest score of the column block over all rows (this `w` holds some of
    /// them); without it, `w` is the whole layer.
    /// `firstRow`: where `w`'s rows start in the whole layer (replicas solve the row ranges that
    /// `ReplicaWork.solveRows` cuts on `rowChunk` boundaries).
    public static func solve(_ w: Tensor, inverseFactor u: Tensor, pattern: SparsityPattern, options: Options = Options(),
                             what: String = "layer", fixedMask: Tensor? = nil, totalRows: Int? = nil, firstRow: Int = 0,
                             threshold: ((_ scores: Tensor, _ k: Int) throws -> Float)? = nil,
                             on backend: any ComputeBackend) throws -> TensorResult {
        let rows = w.rows, cols = w.cols
        // A NaN in the checkpoint's own weight would come out of the solve as its failure.
        guard backend.allFinite(w) else { throw PruneError.numerical("\(what): the weight to prune holds NaN or infinite values (the model's own, before any update)") }
        let chunk = rowChunk(rows: totalRows ?? rows)
        var loss = 0.0
        var i1 = 0
        while i1 < cols {
            let i2 = min(i1 + options.blockSize, cols)
            let block = i1..<i2
            let wBlock = backend.copy(w.region(cols: block))
            let uBlock = backend.copy(u.region(rows: block, cols: block))
            let mask: Tensor
            var nOfM: (n: Int, m: Int)?
            if case .nOfM(let n, let m) = pattern { nOfM = (n, m) }
            if let fixedMask {
                mask = backend.copy(fixedMask.region(cols: block))
            } else if case .unstructured(let s) = pattern {
                // Adaptive mask: the block's smallest w²/d², chosen once at block start.
                let scores = backend.divideColumns(backend.map(wBlock, .square), by: backend.map(backend.diagonal(uBlock), .square))
                let k = Int(Double((totalRows ?? rows) * block.count) * s)
                if let threshold {
                    let t = try threshold(scores, k)
                    let host = backend.download(scores)
                    mask = backend.upload(Matrix(rows: host.rows, cols: host.cols, values: host.values.map { $0 <= t ? 1 : 0 }))
                } else {
                    mask = backend.selectAtMostKthSmallest(scores, k: k)
                }
            } else {
                // N:M: chosen group by group inside the column loop, from the updated weights.
                mask = backend.zeros(rows: rows, cols: block.count)
            }
            let err = backend.zeros(rows: rows, cols: block.count)
            loss += backend.sparseGPTBlock(weight: wBlock, inverseFactor: uBlock, mask: mask, nOfM: nOfM, error: err)
            backend.copy(wBlock.all, into: w.region(cols: block))
            // Lazy update of all later columns: W[:, i2:] -= Err · U[i1:i2, i2:], one product per
            // chunk of the layer's rows, so that a row's bits do not depend on which rows share the
            // call (some BLAS kernels sum a row differently by its place in the product).
            if i2 < cols {
                var r = 0
                while r < rows {
                    let end = min(rows, ((firstRow + r) / chunk + 1) * chunk - firstRow)
                    backend.gemm(err.region(rows: r..<end), .none, u.region(rows: block, cols: i2..<cols), .none, alpha: -1, beta: 1,
                                 into: w.region(rows: r..<end, cols: i2..<cols))
                    r = end
                }
            }
            i1 = i2
        }
        guard backend.allFinite(w) else { throw PruneError.numerical("\(what): SparseGPT produced non-finite weights") }
        return TensorResult(weight: w, loss: loss)
    }
}
