/// The operations a solver needs from a compute device, on that device's tensors.
///
/// `CPUBackend` (OpenBLAS/LAPACKE through `Linalg`, host memory) is the default and the
/// reference; a GPU backend implements the same protocol, and `CheckingBackend` wraps any of
/// them for tests. Every reduction and selection has one defined order, given here, so that a
/// backend that follows it gives the CPU's bits.
///
/// Conventions: tensors are row-major rows x cols; an operation named for a result returns a
/// new tensor, one that says `into`/`in place` writes its last tensor argument. A mask is a
/// float32 tensor holding 1 where a weight is pruned and 0 where it is kept. Shapes are the
/// caller's duty (a mismatch is a programming error and traps); `CheckingBackend` names it.
public protocol ComputeBackend: Sendable {
    /// A short description: the device, its library, its threads.
    var name: String { get }

    // MARK: Memory and transfers

    /// A copy of a host matrix on the backend (free on the CPU, and still counted).
    func upload(_ matrix: Matrix) -> Tensor
    /// The tensor's values on the host.
    func download(_ tensor: Tensor) -> Matrix
    /// A zero-filled tensor.
    func zeros(rows: Int, cols: Int) -> Tensor
    /// A new tensor holding a copy of `region`.
    func copy(_ region: TensorRegion) -> Tensor
    /// Copies `source` into `destination` (same shape).
    func copy(_ source: TensorRegion, into destination: TensorRegion)

    // MARK: Dense linear algebra

    /// op(A) * op(B) as a new tensor: `gemm` with beta 0, which never reads its output, so a
    /// backend may hand it memory that was not cleared first.
    func matmul(_ a: Tensor, _ transA: Transpose, _ b: Tensor, _ transB: Transpose) -> Tensor
    /// C = alpha * op(A) * op(B) + beta * C on regions (C must not overlap A or B).
    func gemm(_ a: TensorRegion, _ transA: Transpose, _ b: TensorRegion, _ transB: Transpose,
              alpha: Float, beta: Float, into c: TensorRegion)
    /// C += alpha * Xᵀ X for X [n x d] and C [d x d]; both triangles of C are kept.
    func syrkAccumulate(_ x: Tensor, alpha: Float, into c: Tensor)
    /// C = beta * C, then C += alpha * Xᵀ X, on C's upper triangle only, for X [n x d] and C [d x d]; the
    /// lower triangle is left as it was until `mirrorUpper`. The same upper triangle, bit for
    /// bit, as scaling C by beta and then `syrkAccumulate`.
    func syrkUpperUpdate(_ x: Tensor, alpha: Float, beta: Float, into c: Tensor)
    /// The height of the strips of rows in which `syrkUpperUpdate` computes a `columns` x `columns`
    /// C's upper triangle when each strip's bits depend on nothing but its rows and columns of X
    /// (nil: one call, whose parts may depend on one another); a function of the width alone.
    /// Replicas pass a Hessian from one to the next by such strips (`StatisticsChain`).
    func statisticsTile(columns: Int) -> Int?
    /// The pieces in which replicas pass a d x d C's upper triangle on (`StatisticsChain`): on a
    /// backend with a `statisticsTile`, each strip of tile rows from its diagonal on, in pieces of
    /// at most `maxColumns` columns cut between the update's blocks, with the count of blocks in
    /// each (the units its threads share); otherwise one piece, all of C.
    func statisticsPieces(columns: Int, maxColumns: Int) -> [UpperPieceShape]
    /// `syrkUpperUpdate` of each window in order (its inputs X [n x d], alpha and beta), on pieces
    /// of a d x d C only (`statisticsPieces`, each in its own tensor), all of them in one pass:
    /// each piece gets the bits that the whole updates, one window after the other, give its
    /// entries. Without a `statisticsTile`, only one piece, all of C.
    func syrkUpperUpdate(_ windows: [(x: Tensor, alpha: Float, beta: Float)], pieces: [UpperPiece])
    /// Copies the upper triangle of the square C onto its lower triangle.
    func mirrorUpper(_ c: Tensor)
    /// Cholesky factor of a symmetric positive definite matrix (upper: A = UᵀU; lower: A = LLᵀ),
    /// the other triangle zero. Throws `LinalgError.notPositiveDefinite` naming `what`.
    func cholesky(_ a: Tensor, upper: Bool, what: String) throws -> Tensor
    /// Inverse of a symmetric positive definite matrix.
    func inverseSPD(_ a: Tensor, what: String) throws -> Tensor
    /// The upper Cholesky factor U of A⁻¹ (A⁻¹ = UᵀU) for a symmetric positive definite A: the
    /// factor SparseGPT's column loop reads. By default the Cholesky of `inverseSPD`'s result.
    func inverseCholeskyFactor(_ a: Tensor, what: String) throws -> Tensor
    /// `inverseCholeskyFactor` written over `a` (which the caller gives up): the same values,
    /// without holding A, its factor and U at once where the backend can avoid it (the CPU
    /// factors A's own memory: at a 70B's down_proj, 3.3 GB less at the peak). By default U is
    /// computed apart and copied into `a`.
    func inverseCholeskyFactorInPlace(_ a: Tensor, what: String) throws
    /// X with op(T) X = B for a triangular T.
    func solveTriangular(_ t: Tensor, _ b: Tensor, upper: Bool, transpose: Bool) -> Tensor
    /// X with A X = B for a symmetric positive definite A, computed in Float64 (for normal
    /// equations whose conditioning Float32 cannot carry), returned in Float32.
    func solveSPDDouble(_ a: Tensor, _ b: Tensor, what: String) throws -> Tensor
    /// X = C·A⁻¹ for a symmetric positive definite A [n x n] and C [k x n], in Float64: the
    /// solve a refit W (XᵀX + λI) = TᵀX makes, with C's rows as its right-hand sides. The same
    /// values as `transpose(solveSPDDouble(a, transpose(c)))`, its default.
    func solveSPDDoubleRight(_ a: Tensor, _ c: Tensor, what: String) throws -> Tensor
    /// The inverse of a symmetric positive definite matrix, computed in Float64.
    func inverseSPDDouble(_ a: Tensor, what: String) throws -> Tensor
    /// Xᵀ as a new tensor.
    func transpose(_ x: Tensor) -> Tensor

    // MARK: Element-wise

    /// x[i] *= factor, in place.
    func scale(_ x: Tensor, by factor: Float)
    /// y[i] = y[i] * beta + x[i] * alpha, in place (each product rounded, then the sum).
    func scaleAdd(_ y: Tensor, beta: Float, _ x: Tensor, alpha: Float)
    /// y[i] += alpha * x[i], in place.
    func axpy(_ alpha: Float, _ x: Tensor, _ y: Tensor)
    /// f(x[i]) as a new tensor.
    func map(_ x: Tensor, _ f: ElementwiseFunction) -> Tensor
    /// x[r, c] * v[c] (v is 1 x cols) as a new tensor.
    func multiplyColumns(_ x: Tensor, by v: Tensor) -> Tensor
    /// x[r, c] / v[c] (v is 1 x cols) as a new tensor.
    func divideColumns(_ x: Tensor, by v: Tensor) -> Tensor
    /// y[r, c] += scales[r] * x[r, c], in place (one scale per row; each product rounded, then the sum).
    func addScaledRows(_ y: Tensor, _ x: Tensor, scales: [Float])
    /// Σ_c a[r, c] b[r, c] per row, in Float64, columns in order.
    func rowDots(_ a: Tensor, _ b: Tensor) -> [Double]
    /// a[j, j] += value for every j of a square tensor, in place.
    func addToDiagonal(_ a: Tensor, _ value: Float)
    /// a[i] * b[i] as a new tensor.
    func multiply(_ a: Tensor, _ b: Tensor) -> Tensor
    /// x[r, c] + v[c] (v is 1 x cols: a bias) as a new tensor.
    func addRowVector(_ x: Tensor, _ v: Tensor) -> Tensor

    // MARK: Reductions (fixed order)

    /// The diagonal of a square tensor as 1 x n.
    func diagonal(_ a: Tensor) -> Tensor
    /// Σ_rows x[r, c]² as 1 x cols, rows added in order.
    func columnSquaredSums(_ x: Tensor) -> Tensor
    /// Σ x[i] in Float64, in index order.
    func sum(_ x: Tensor) -> Double
    /// How many elements are exactly zero (either sign).
    func zeroCount(_ x: Tensor) -> Int
    /// Σ a[i] b[i] in Float64, in index order.
    func dot(_ a: Tensor, _ b: Tensor) -> Double
    /// Whether every element is finite.
    func allFinite(_ x: Tensor) -> Bool
    /// Σ a[i] b[i] in Float64 over fixed chunks of `Parallel.chunk` elements, each chunk in
    /// index order, the chunks' sums added in chunk order.
    func chunkedDot(_ a: Tensor, _ b: Tensor) -> Double
    /// Σ (a[i] − b[i])² (the difference in Float32, the square and sum in Float64), chunked as `chunkedDot`.
    func chunkedSquaredDistance(_ a: Tensor, _ b: Tensor) -> Double
    /// Σ (p[i] − u[i] v[i])² (the product and difference in Float32), chunked as `chunkedDot`.
    func chunkedSquaredDistanceToProduct(_ p: Tensor, _ u: Tensor, _ v: Tensor) -> Double

    // MARK: Selection for masks

    /// Mask of scores at or below the k-th smallest score of the whole tensor (0-based, k
    /// clamped): the reference's `|W| <= sort(|W|)[k]` rule, ties included.
    func selectAtMostKthSmallest(_ scores: Tensor, k: Int) -> Tensor
    /// Mask of the `counts[r]` smallest scores of row r (one count per row, each in 0...cols),
    /// equal scores by column order (a stable sort).
    func selectSmallestInRows(_ scores: Tensor, counts: [Int]) -> Tensor
    /// Mask of the n smallest scores in every group of m consecutive columns of each row
    /// (a last, narrower group keeps its width), equal scores by column order.
    func selectNOfM(_ scores: Tensor, n: Int, m: Int) -> Tensor
    /// x[i] = 0 where mask[i] != 0, in place.
    func zeroMasked(_ x: Tensor, mask: Tensor)
    /// A copy of `weight` with, in each row r, the `counts[r]` weights of smallest score
    /// |w[r, c]| · scale[c] set to zero, equal scores by column order: Wanda's unstructured step,
    /// the same as `selectSmallestInRows` on `multiplyColumns(map(weight, .abs), by: scale)` and
    /// `zeroMasked` on a copy (the default), without the whole-matrix temporaries.
    func zeroSmallestInRows(_ weight: Tensor, scale: Tensor, counts: [Int]) -> Tensor

    // MARK: SparseGPT kernels

    /// Dead inputs of a layer (zero Hessian diagonal): the diagonal entry becomes 1 and the
    /// weight's column zero, in place.
    func zeroDeadInputs(hessian: Tensor, weight: Tensor)
    /// The optimal-brain-surgeon column loop of one SparseGPT block, row by row, in place:
    /// `weight` [rows x b] is pruned column by column with each removed weight's error spread
    /// over the row's later columns through `inverseFactor` [b x b] (the block of the upper
    /// Cholesky factor of H⁻¹); `mask` [rows x b] says which weights go, and with `nOfM` it
    /// starts empty and is chosen group by group from the updated weights. `error` [rows x b]
    /// receives (w - q) / d for the lazy update. Returns Σ_rows Σ (w - q)² / d² / 2, rows in order.
    func sparseGPTBlock(weight: Tensor, inverseFactor: Tensor, mask: Tensor, nOfM: (n: Int, m: Int)?,
                        error: Tensor) -> Double

    // MARK: SparseLLM kernels (element-wise exact minimisers; SparseLLM.swift derives them)

    /// LLaMA's z: z[i] = (α m[i] + γ σ[i] p[i]) / (α + γ σ[i]²), in place.
    func sparseLLMLlamaZ(_ z: Tensor, m: Tensor, sigma: Tensor, p: Tensor, alpha: Float, gamma: Float)
    /// OPT's z: the better of the ReLU branches max((αm + γp)/(α + γ), 0) and min(m, 0), in place.
    func sparseLLMOPTZ(_ z: Tensor, m: Tensor, p: Tensor, alpha: Float, gamma: Float)
    /// LLaMA's gate pre-activation s, minimising α(s − g)² + γ(p − act(s) z)² per element, in
    /// place. SiLU and GELU-tanh: up to `steps` safeguarded Newton steps, each accepted only if
    /// it lowers that term, halved until it does or until |step| <= 1e-6·max(1, |s|), where the
    /// element stops. ReLU: the exact minimiser, the better of s = min(g, 0) and
    /// s = max((αg + γpz)/(α + γz²), 0) (the second on a tie; nothing when `steps` is 0).
    func sparseLLMGate(_ s: Tensor, g: Tensor, z: Tensor, p: Tensor, alpha: Float, gamma: Float, steps: Int,
                       activation: GatedActivation)
    /// One pass over a chunk of tokens of SparseLLM's LLaMA FFN, with s, z, p the auxiliaries and
    /// g = x·W_gateᵀ, m = x·W_upᵀ the pruned layers' outputs: σ = act(s), σ⊙z, act(g)⊙m and the
    /// three distances ‖s − g‖², ‖z − m‖², ‖p − σ⊙z‖². The same values, bit for bit, as `map`,
    /// `multiply`, `gatedActivation`, `chunkedSquaredDistance` and
    /// `chunkedSquaredDistanceToProduct` (the default, which calls them).
    func sparseLLMLlamaPass(s: Tensor, z: Tensor, p: Tensor, g: Tensor, m: Tensor, activation: GatedActivation) -> SparseLLMLlamaPass

    /// Runs `body`, a stretch in which the caller moves nothing to or from the host (a block
    /// between its inputs and its outputs). `CheckingBackend` records any transfer inside as a
    /// violation; other backends just run `body`.
    func withoutTransfers<R>(_ label: String, _ body: () throws -> R) rethrows -> R

    /// Waits until every operation issued so far has finished (a device that runs
    /// asynchronously; the CPU's operations finish before they return). For timing only: results
    /// are always seen in order without it.
    func synchronize()

    // MARK: BESA kernels (BESA.swift derives them)

    /// Each row's columns in ascending order of score, equal scores by column (a stable sort), as
    /// column indices held exactly in Float32 (rows x cols; cols at most 2^24).
    func rankRows(_ scores: Tensor) -> Tensor
    /// Mask of the first counts[r] columns of row r in `order` (1 = pruned).
    func rankedMask(order: Tensor, counts: [Int]) -> Tensor
    /// `weight` with the first counts[r] columns of row r in `order` set to 0, as a new tensor:
    /// `zeroMasked` of a copy by `rankedMask`, without the mask.
    func rankedMasked(_ weight: Tensor, order: Tensor, counts: [Int]) -> Tensor
    /// `masked`, which is `rankedMasked(weight, order:, counts: from)`, becomes
    /// `rankedMasked(weight, order:, counts: to)` in place: in each row whose count changed, the
    /// columns between the two counts are zeroed or restored from `weight` (BESA's counts move
    /// by a few columns a step, so this touches a small part of the matrix).
    func updateRankedMasked(_ masked: Tensor, weight: Tensor, order: Tensor, from: [Int], to: [Int])
    /// For each row r and each count n of `counts` (ascending): Σ_{j<n} G[r, order_j]·W[r, order_j],
    /// each product and the sum in Float64, j in order; returned to the host row by row
    /// (rows x counts.count values: BESA's small per-row state, not the block's data).
    func rankedPrefixSums(_ gradient: Tensor, _ weight: Tensor, order: Tensor, at counts: [Int]) -> [Double]
    /// BESA's reconstruction loss of one sequence, L = (1/C) Σ_{t,c} (Y − Ŷ)²_tc / σ_c with
    /// σ_c = Σ_t Y²_tc (Float64, tokens in order; 1 where zero), and ∂L/∂Ŷ = −2(Y − Ŷ)/(σ_c C).
    func channelNormalizedError(target: Tensor, prediction: Tensor) -> (loss: Double, gradient: Tensor)

    // MARK: Model kernels (ModelKernels.swift: the decoder blocks' forward and backward)

    /// y[i] += x[i], in place.
    func add(_ x: Tensor, into y: Tensor)
    /// y[r, c] += v[c] (v is 1 x cols: a bias), in place.
    func addRowVector(_ v: Tensor, into y: Tensor)
    /// The same elements as a rows x cols tensor (rows·cols unchanged). Treat it as a new tensor:
    /// whether it shares memory with `x` is the backend's choice.
    func reshaped(_ x: Tensor, rows: Int, cols: Int) -> Tensor
    /// Each row x·w/sqrt(mean(x²) + eps) (w is 1 x cols; the sum of squares in 16-lane order).
    func rmsNorm(_ x: Tensor, weight: Tensor, eps: Float) -> Tensor
    /// Each row (x − mean)/sqrt(var + eps)·w (+ b), the biased variance, as PyTorch.
    func layerNorm(_ x: Tensor, weight: Tensor, bias: Tensor?, eps: Float) -> Tensor
    /// ∂L/∂x of `rmsNorm` given ∂L/∂y.
    func rmsNormBackward(input: Tensor, weight: Tensor, eps: Float, outputGradient: Tensor) -> Tensor
    /// ∂L/∂x of `layerNorm` given ∂L/∂y.
    func layerNormBackward(input: Tensor, weight: Tensor, eps: Float, outputGradient: Tensor) -> Tensor
    /// Rotary embeddings on x [tokens x heads·headDim] in place, row r at position r mod
    /// sequenceLength; `inverse` rotates back (the transpose, for the backward).
    func rope(_ x: Tensor, heads: Int, headDim: Int, sequenceLength: Int, table: Kernels.RopeTable, layout: RopeLayout, inverse: Bool)
    /// Causal multi-head attention with grouped key/value heads: softmax(scale·q kᵀ, masked) v per head.
    func attention(q: Tensor, k: Tensor, v: Tensor, shape: AttentionShape, options: AttentionOptions) -> Tensor
    /// Gradients of q, k and v from ∂L/∂output; the probabilities are recomputed as the forward
    /// computed them. With grouped heads, each k/v head sums its query heads' gradients.
    func attentionBackward(q: Tensor, k: Tensor, v: Tensor, outputGradient: Tensor, shape: AttentionShape,
                           options: AttentionOptions) -> (dq: Tensor, dk: Tensor, dv: Tensor)
    /// act(gate) ⊙ up as a new tensor.
    func gatedActivation(gate: Tensor, up: Tensor, _ activation: GatedActivation) -> Tensor
    /// gate[i] = act(gate[i])·up[i], in place: the same values as `gatedActivation`, without a
    /// third tensor of the feed-forward's width.
    func gatedActivationInPlace(gate: Tensor, up: Tensor, _ activation: GatedActivation)
    /// ∂L/∂gate and ∂L/∂up of `gatedActivation` given ∂L/∂output.
    func gatedActivationBackward(_ outputGradient: Tensor, gate: Tensor, up: Tensor,
                                 _ activation: GatedActivation) -> (gate: Tensor, up: Tensor)
    /// d[i] = 0 where !(input[i] > 0), in place: the ReLU's backward.
    func reluBackward(_ d: Tensor, input: Tensor)
    /// x[i] = cap·tanh(x[i]/cap), in place (Gemma-2's final logits).
    func softcap(_ x: Tensor, cap: Float)
    /// The router's softmax over each row of `logits` and each row's `topK` most probable experts
    /// (ties to the lower index), their weights renormalised over the chosen when `normalize`.
    /// The choices come back to the host: they are the control flow of the experts' GEMMs.
    func route(_ logits: Tensor, topK: Int, normalize: Bool) -> Routing
    /// Rows `rows` of x, in that order, as a new tensor.
    func gatherRows(_ x: Tensor, _ rows: [Int]) -> Tensor
    /// out[rows[j]] += round(scales[j]·x[j]) for each row j of x, in place.
    func scatterAddRows(_ x: Tensor, rows: [Int], scales: [Float], into out: Tensor)
    /// x[j] *= scales[j] for each row j, in place.
    func scaleRows(_ x: Tensor, by scales: [Float])
    /// dWeights[rows[j], slots[j]] += ⟨outputGradient[j], expertOutput[j]⟩ (Float32, columns in
    /// order), in place: the routing weights' gradient from one expert's rows.
    func accumulateRoutingGradient(outputGradient: Tensor, expertOutput: Tensor, rows: [Int], slots: [Int], into dWeights: Tensor)
    /// ∂L/∂(router logits) [tokens x experts] from ∂L/∂(routing weights) [tokens x topK].
    func routerLogitGradient(_ dWeights: Tensor, routing: Routing, normalize: Bool) -> Tensor
}

/// Functions applied element by element.
public enum ElementwiseFunction: String, Sendable {
    case abs, square, squareRoot, negate, relu, silu
    /// GELU with the tanh approximation, as `GatedActivation.geluTanh` applies it.
    case geluTanh
    /// 1 where x != 0 (NaN included), else 0: the kept weights of a pruned matrix as a mask.
    case nonZero

    /// A gated activation's act(x) alone.
    public init(_ activation: GatedActivation) {
        switch activation {
        case .silu: self = .silu
        case .geluTanh: self = .geluTanh
        case .relu: self = .relu
        }
    }
}

extension ComputeBackend {
    public func withoutTransfers<R>(_ label: String, _ body: () throws -> R) rethrows -> R { try body() }
    public func inverseCholeskyFactor(_ a: Tensor, what: String) throws -> Tensor {
        try cholesky(try inverseSPD(a, what: what), upper: true, what: "\(what): inverse")
    }
    public func inverseCholeskyFactorInPlace(_ a: Tensor, what: String) throws {
        copy(try inverseCholeskyFactor(a, what: what).region(), into: a.region())
    }
    public func synchronize() {}
    public func solveSPDDoubleRight(_ a: Tensor, _ c: Tensor, what: String) throws -> Tensor {
        transpose(try solveSPDDouble(a, transpose(c), what: what))
    }
    public func zeroCount(_ x: Tensor) -> Int { x.count - Int(sum(map(x, .nonZero))) }
    public func zeroSmallestInRows(_ weight: Tensor, scale: Tensor, counts: [Int]) -> Tensor {
        let mask = selectSmallestInRows(multiplyColumns(map(weight, .abs), by: scale), counts: counts)
        let pruned = copy(weight)
        zeroMasked(pruned, mask: mask)
        return pruned
    }
    public func statisticsTile(columns: Int) -> Int? { nil }
    public func statisticsPieces(columns d: Int, maxColumns: Int) -> [UpperPieceShape] {
        [UpperPieceShape(rows: 0..<d, columns: 0..<d, blocks: 1)]
    }
    public func syrkUpperUpdate(_ windows: [(x: Tensor, alpha: Float, beta: Float)], pieces: [UpperPiece]) {
        for w in windows {
            let all = 0..<w.x.cols
            precondition(pieces.count == 1 && pieces[0].rows == all && pieces[0].columns == all,
                         "\(name): syrkUpperUpdate on pieces of a \(w.x.cols)-wide update needs a statisticsTile")
            syrkUpperUpdate(w.x, alpha: w.alpha, beta: w.beta, into: pieces[0].values)
        }
    }

    /// A * B as a new tensor.
    public func matmul(_ a: Tensor, _ b: Tensor) -> Tensor { matmul(a, .none, b, .none) }

    /// op(A) * op(B) as a new tensor, on a zero-filled output.
    public func matmul(_ a: Tensor, _ transA: Transpose, _ b: Tensor, _ transB: Transpose) -> Tensor {
        let m = transA == .none ? a.rows : a.cols
        let n = transB == .none ? b.cols : b.rows
        let c = zeros(rows: m, cols: n)
        gemm(a.all, transA, b.all, transB, alpha: 1, beta: 0, into: c.all)
        return c
    }

    /// A new tensor with the same values.
    public func copy(_ tensor: Tensor) -> Tensor { copy(tensor.all) }

    public func rankedMasked(_ weight: Tensor, order: Tensor, counts: [Int]) -> Tensor {
        let w = copy(weight)
        zeroMasked(w, mask: rankedMask(order: order, counts: counts))
        return w
    }

    public func updateRankedMasked(_ masked: Tensor, weight: Tensor, order: Tensor, from: [Int], to: [Int]) {
        copy(rankedMasked(weight, order: order, counts: to).all, into: masked.all)
    }

    public func sparseLLMLlamaPass(s: Tensor, z: Tensor, p: Tensor, g: Tensor, m: Tensor, activation act: GatedActivation) -> SparseLLMLlamaPass {
        let sigma = map(s, ElementwiseFunction(act))
        return SparseLLMLlamaPass(sigma: sigma, activation: multiply(sigma, z), gated: gatedActivation(gate: g, up: m, act),
                                  gateDistance: chunkedSquaredDistance(s, g), upDistance: chunkedSquaredDistance(z, m),
                                  productDistance: chunkedSquaredDistanceToProduct(p, sigma, z))
    }

    /// `gatedActivation` copied back into `gate`.
    public func gatedActivationInPlace(gate: Tensor, up: Tensor, _ activation: GatedActivation) {
        copy(gatedActivation(gate: gate, up: up, activation).all, into: gate.all)
    }

    /// Mask of the k smallest scores of each row, equal scores by column order (a stable sort).
    public func selectSmallestInRows(_ scores: Tensor, count k: Int) -> Tensor {
        selectSmallestInRows(scores, counts: [Int](repeating: k, count: scores.rows))
    }
}

/// What `ComputeBackend.sparseLLMLlamaPass` gives for a chunk of tokens.
public struct SparseLLMLlamaPass {
    /// act(s).
    public var sigma: Tensor
    /// act(s)⊙z: the activation the auxiliaries make, the p step's starting point.
    public var activation: Tensor
    /// act(g)⊙m: the activation the pruned gate and up layers make.
    public var gated: Tensor
    /// ‖s − g‖², ‖z − m‖² and ‖p − act(s)⊙z‖², summed as `chunkedSquaredDistance` sums.
    public var gateDistance: Double, upDistance: Double, productDistance: Double

    public init(sigma: Tensor, activation: Tensor, gated: Tensor, gateDistance: Double, upDistance: Double, productDistance: Double) {
        self.sigma = sigma
        self.activation = activation
        self.gated = gated
        self.gateDistance = gateDistance
        self.upDistance = upDistance
        self.productDistance = productDistance
    }
}

/// Where a piece of a square matrix's upper triangle lies (`ComputeBackend.statisticsPieces`).
public struct UpperPieceShape: Equatable, Sendable {
    public let rows: Range<Int>
    public let columns: Range<Int>
    /// The update's blocks in the piece, the units its threads share.
    public let blocks: Int
    public init(rows: Range<Int>, columns: Range<Int>, blocks: Int) { (self.rows, self.columns, self.blocks) = (rows, columns, blocks) }

    /// The upper-triangle entries (diagonal included) the piece holds.
    public var upperEntries: Int { Self.upperEntries(rows: rows, columns: columns) }
    /// The upper-triangle entries (diagonal included) of a square matrix in `rows` x `columns`.
    public static func upperEntries(rows: Range<Int>, columns: Range<Int>) -> Int {
        rows.reduce(0) { $0 + max(0, columns.upperBound - max(columns.lowerBound, $1)) }
    }
}

/// A piece of a square matrix's upper triangle held apart: rows `rows` and columns `columns` in
/// `values` [rows.count x columns.count]; only the upper-triangle entries are meaningful.
public struct UpperPiece: Sendable {
    public let rows: Range<Int>
    public let columns: Range<Int>
    public let values: Tensor
    public init(rows: Range<Int>, columns: Range<Int>, values: Tensor) { (self.rows, self.columns, self.values) = (rows, columns, values) }
}
