import Foundation

/// A tensor's memory on a CUDA device: Float32, row-major, freed (stream-ordered) with the last handle.
final class CUDATensorStorage: TensorStorage, @unchecked Sendable {
    let device: CUDADevice
    let pointer: UInt64

    init(device: CUDADevice, bytes: Int) {
        self.device = device
        self.pointer = device.allocate(bytes: bytes)
    }

    deinit { device.free(pointer) }
}

/// The CUDA backend: tensors live in device memory; GEMMs and the Hessians' rank-k updates go
/// through cuBLAS, the forward pass's element-wise and row kernels (norms, RoPE, activations,
/// the causal softmax of attention, whose two products are batched GEMMs) through our own
/// kernels compiled by NVRTC (`CUDAKernelSource`).
///
/// The rest of the protocol (Cholesky and inverses, mask selection, SparseGPT's column loop,
/// SparseLLM's and BESA's element kernels, the backward passes, the Float64 reductions) runs on
/// the host through `CPUBackend` on copies of its operands (`CUDABackend+Host.swift`): every
/// method works on the device and gives the CPU's results up to Float32 rounding; those
/// operations cost a transfer each until they get kernels of their own.
///
/// Results agree with `CPUBackend` to rounding, not bit for bit (cuBLAS and the kernels sum
/// in their own orders); a run repeated on the same device and library versions repeats its bits.
public struct CUDABackend: ComputeBackend {
    let device: CUDADevice
    let host = CPUBackend()

    /// The backend on CUDA device `index`, or a one-line error naming what is missing (driver,
    /// cuBLAS, NVRTC, the device itself).
    public init(device index: Int = 0) throws {
        device = try CUDADevice.shared(index)
    }

    public var name: String { device.summary }

    /// Waits for every operation issued so far (for timing).
    public func synchronize() { device.synchronize() }

    // MARK: Storage

    func storage(_ t: Tensor) -> CUDATensorStorage {
        guard let s = t.storage as? CUDATensorStorage, s.device === device else {
            preconditionFailure("CUDABackend: \(t) is not a tensor of \(device.summary)")
        }
        precondition(t.dtype == .float32, "CUDABackend: \(t) is not Float32")
        return s
    }

    func pointer(_ t: Tensor) -> UInt64 { storage(t).pointer }
    func pointer(_ r: TensorRegion) -> UInt64 { storage(r.tensor).pointer + UInt64(r.offset * 4) }

    func uninitialized(rows: Int, cols: Int) -> Tensor {
        Tensor(rows: rows, cols: cols, storage: CUDATensorStorage(device: device, bytes: rows * cols * 4))
    }

    /// Launches `name` as a grid-stride loop over `count` items, `threads` to a block.
    func launch(_ name: String, count: Int, threads: Int = CUDAKernelSource.threads, _ arguments: [CUDADevice.Argument]) {
        device.launch(name, blocks: min((count + threads - 1) / threads, 1 << 16), threads: threads, arguments)
    }

    // MARK: Memory and transfers

    public func upload(_ matrix: Matrix) -> Tensor {
        let t = uninitialized(rows: matrix.rows, cols: matrix.cols)
        overwrite(t, with: matrix)
        return t
    }

    public func download(_ tensor: Tensor) -> Matrix {
        let m = Matrix(rows: tensor.rows, cols: tensor.cols, uninitialized: ())
        device.download(pointer(tensor), to: UnsafeMutableRawPointer(m.storage.pointer), bytes: tensor.count * 4)
        return m
    }

    /// Overwrites `tensor`'s device memory with `matrix` (same shape).
    func overwrite(_ tensor: Tensor, with matrix: Matrix) {
        precondition(matrix.rows == tensor.rows && matrix.cols == tensor.cols, "overwrite: \(matrix) into \(tensor)")
        device.upload(UnsafeRawPointer(matrix.storage.pointer), to: pointer(tensor), bytes: matrix.count * 4)
    }

    public func zeros(rows: Int, cols: Int) -> Tensor {
        let t = uninitialized(rows: rows, cols: cols)
        device.zero(pointer(t), floats: rows * cols)
        return t
    }

    public func copy(_ region: TensorRegion) -> Tensor {
        let out = uninitialized(rows: region.rowCount, cols: region.colCount)
        copy(region, into: out.all)
        return out
    }

    public func copy(_ source: TensorRegion, into destination: TensorRegion) {
        precondition(source.rowCount == destination.rowCount && source.colCount == destination.colCount,
                     "copy: \(source) into \(destination)")
        let rows = source.rowCount, cols = source.colCount
        if rows == 0 || cols == 0 { return }
        if source.leadingDimension == cols && destination.leadingDimension == cols {
            device.copy(pointer(source), to: pointer(destination), bytes: rows * cols * 4)
            return
        }
        launch("copy2d", count: rows * cols, [.pointer(pointer(destination)), .int64(destination.leadingDimension),
                                              .pointer(pointer(source)), .int64(source.leadingDimension), .int64(rows), .int64(cols)])
    }

    // MARK: Dense linear algebra

    public func gemm(_ a: TensorRegion, _ transA: Transpose, _ b: TensorRegion, _ transB: Transpose,
                     alpha: Float, beta: Float, into c: TensorRegion) {
        let (m, k, kb, n) = Transpose.product(aRows: a.rowCount, aCols: a.colCount, transA,
                                              bRows: b.rowCount, bCols: b.colCount, transB)
        precondition(k == kb, "gemm: inner dimensions \(k) and \(kb) differ")
        precondition(c.rowCount == m && c.colCount == n, "gemm: output is \(c.rowCount)x\(c.colCount), expected \(m)x\(n)")
        if m == 0 || n == 0 { return }
        // Row-major C = op(A)·op(B) is column-major Cᵀ = op(B)ᵀ·op(A)ᵀ, and a row-major operand read
        // column-major is its transpose: the operands swap, and each keeps its own flag.
        device.sgemm(transA: transB == .transposed, transB: transA == .transposed, m: n, n: m, k: k, alpha: alpha,
                     a: pointer(b), lda: b.leadingDimension, b: pointer(a), ldb: a.leadingDimension,
                     beta: beta, c: pointer(c), ldc: c.leadingDimension)
    }

    public func syrkAccumulate(_ x: Tensor, alpha: Float, into c: Tensor) {
        precondition(c.rows == x.cols && c.cols == x.cols, "syrkAccumulate: \(x) into \(c)")
        if x.rows == 0 { return }
        gemm(x.all, .transposed, x.all, .none, alpha: alpha, beta: 1, into: c.all)
    }

    public func syrkUpperUpdate(_ x: Tensor, alpha: Float, beta: Float, into c: Tensor) {
        precondition(c.rows == x.cols && c.cols == x.cols, "syrkUpperUpdate: \(x) into \(c)")
        if c.rows == 0 { return }
        // Row-major X [n x d] read column-major is Xᵀ [d x n], so XᵀX = A·Aᵀ; row-major upper is column-major lower.
        device.ssyrk(lower: true, n: x.cols, k: x.rows, alpha: alpha, a: pointer(x), lda: max(x.cols, 1),
                     beta: beta, c: pointer(c), ldc: c.cols)
    }

    public func mirrorUpper(_ c: Tensor) {
        precondition(c.rows == c.cols, "mirrorUpper: \(c)")
        launch("mirror_upper", count: c.count, [.pointer(pointer(c)), .int64(c.rows)])
    }

    public func transpose(_ x: Tensor) -> Tensor {
        let out = uninitialized(rows: x.cols, cols: x.rows)
        launch("transpose", count: x.count, [.pointer(pointer(x)), .pointer(pointer(out)), .int64(x.rows), .int64(x.cols)])
        return out
    }

    // MARK: Element-wise

    public func scale(_ x: Tensor, by factor: Float) {
        launch("scale", count: x.count, [.pointer(pointer(x)), .int64(x.count), .float(factor)])
    }

    public func scaleAdd(_ y: Tensor, beta: Float, _ x: Tensor, alpha: Float) {
        precondition(x.count == y.count, "scaleAdd: \(x) and \(y)")
        launch("scale_add", count: y.count, [.pointer(pointer(y)), .float(beta), .pointer(pointer(x)), .float(alpha), .int64(y.count)])
    }

    public func axpy(_ alpha: Float, _ x: Tensor, _ y: Tensor) {
        precondition(x.count == y.count, "axpy: \(x) and \(y)")
        launch("axpy", count: y.count, [.float(alpha), .pointer(pointer(x)), .pointer(pointer(y)), .int64(y.count)])
    }

    public func map(_ x: Tensor, _ f: ElementwiseFunction) -> Tensor {
        let code: Int
        switch f {
        case .abs: code = 0
        case .square: code = 1
        case .squareRoot: code = 2
        case .negate: code = 3
        case .relu: code = 4
        case .silu: code = 5
        case .nonZero: code = 6
        case .geluTanh: return onDevice(host.map(onHost(x), .geluTanh))    // no device kernel for it
        }
        let out = uninitialized(rows: x.rows, cols: x.cols)
        launch("map", count: x.count, [.pointer(pointer(x)), .pointer(pointer(out)), .int64(x.count), .int32(code)])
        return out
    }

    func columnOp(_ x: Tensor, _ v: Tensor, _ op: Int, into out: Tensor) {
        precondition(v.count == x.cols && out.count == x.count, "column operation: \(x) with \(v)")
        launch("column_op", count: x.count, [.pointer(pointer(x)), .pointer(pointer(v)), .pointer(pointer(out)),
                                             .int64(x.rows), .int64(x.cols), .int32(op)])
    }

    public func multiplyColumns(_ x: Tensor, by v: Tensor) -> Tensor {
        let out = uninitialized(rows: x.rows, cols: x.cols)
        columnOp(x, v, 0, into: out)
        return out
    }

    public func divideColumns(_ x: Tensor, by v: Tensor) -> Tensor {
        let out = uninitialized(rows: x.rows, cols: x.cols)
        columnOp(x, v, 1, into: out)
        return out
    }

    public func addRowVector(_ x: Tensor, _ v: Tensor) -> Tensor {
        let out = uninitialized(rows: x.rows, cols: x.cols)
        columnOp(x, v, 2, into: out)
        return out
    }

    public func addRowVector(_ v: Tensor, into y: Tensor) { columnOp(y, v, 2, into: y) }

    public func addToDiagonal(_ a: Tensor, _ value: Float) {
        precondition(a.rows == a.cols, "addToDiagonal: \(a)")
        launch("add_diagonal", count: a.rows, [.pointer(pointer(a)), .int64(a.rows), .float(value)])
    }

    public func multiply(_ a: Tensor, _ b: Tensor) -> Tensor {
        precondition(a.count == b.count, "multiply: \(a) and \(b)")
        let out = uninitialized(rows: a.rows, cols: a.cols)
        launch("multiply", count: a.count, [.pointer(pointer(a)), .pointer(pointer(b)), .pointer(pointer(out)), .int64(a.count)])
        return out
    }

    public func add(_ x: Tensor, into y: Tensor) {
        precondition(x.count == y.count, "add: \(x) into \(y)")
        launch("add", count: y.count, [.pointer(pointer(x)), .pointer(pointer(y)), .int64(y.count)])
    }

    public func zeroMasked(_ x: Tensor, mask: Tensor) {
        precondition(x.count == mask.count, "zeroMasked: \(x) with \(mask)")
        launch("zero_masked", count: x.count, [.pointer(pointer(x)), .pointer(pointer(mask)), .int64(x.count)])
    }

    public func reluBackward(_ d: Tensor, input: Tensor) {
        precondition(d.count == input.count, "reluBackward: \(d) and \(input)")
        launch("relu_backward", count: d.count, [.pointer(pointer(d)), .pointer(pointer(input)), .int64(d.count)])
    }

    public func softcap(_ x: Tensor, cap: Float) {
        launch("softcap", count: x.count, [.pointer(pointer(x)), .int64(x.count), .float(cap)])
    }

    // MARK: Reductions computed on the device

    public func diagonal(_ a: Tensor) -> Tensor {
        precondition(a.rows == a.cols, "diagonal of \(a)")
        let out = uninitialized(rows: 1, cols: a.rows)
        launch("diagonal", count: a.rows, [.pointer(pointer(a)), .pointer(pointer(out)), .int64(a.rows)])
        return out
    }

    public func columnSquaredSums(_ x: Tensor) -> Tensor {
        let out = uninitialized(rows: 1, cols: x.cols)
        launch("column_squared_sums", count: x.cols, [.pointer(pointer(x)), .pointer(pointer(out)), .int64(x.rows), .int64(x.cols)])
        return out
    }

    // MARK: The forward pass

    public func reshaped(_ x: Tensor, rows: Int, cols: Int) -> Tensor {
        precondition(rows * cols == x.count, "reshaped: \(x) as \(rows)x\(cols)")
        return Tensor(rows: rows, cols: cols, storage: storage(x))
    }

    public func rmsNorm(_ x: Tensor, weight: Tensor, eps: Float) -> Tensor {
        precondition(weight.count == x.cols, "rmsNorm: \(x) with weight \(weight)")
        let out = uninitialized(rows: x.rows, cols: x.cols)
        device.launch("rms_norm", blocks: min(x.rows, 1 << 16), [.pointer(pointer(x)), .pointer(pointer(weight)), .pointer(pointer(out)),
                                                                  .int64(x.rows), .int64(x.cols), .float(eps)])
        return out
    }

    public func rope(_ x: Tensor, heads: Int, headDim: Int, sequenceLength: Int, table: Kernels.RopeTable, layout: RopeLayout, inverse: Bool) {
        precondition(x.cols == heads * headDim && x.rows % sequenceLength == 0, "rope: \(x) for \(heads) heads of \(headDim), sequences of \(sequenceLength)")
        precondition(sequenceLength <= table.positions, "RoPE table has \(table.positions) positions, need \(sequenceLength)")
        if inverse {
            hostInPlace([x]) { $0.rope($1[0], heads: heads, headDim: headDim, sequenceLength: sequenceLength, table: table, layout: layout, inverse: true) }
            return
        }
        let half = table.halfDim
        let used = sequenceLength * half
        let cosT = upload(Matrix(rows: 1, cols: used, values: Array(table.cos.prefix(used))))
        let sinT = upload(Matrix(rows: 1, cols: used, values: Array(table.sin.prefix(used))))
        launch("rope", count: x.rows * heads * half, [.pointer(pointer(x)), .pointer(pointer(cosT)), .pointer(pointer(sinT)), .int64(x.rows),
                                                      .int32(heads), .int32(headDim), .int32(half), .int32(sequenceLength),
                                                      .int32(layout == .adjacentPairs ? 1 : 0)])
    }

    /// Scores of one head for a run of sequences by one batched GEMM (every key, the upper
    /// triangle masked after), the causal softmax kernel, and PV by a second batched GEMM
    /// written straight into the head's columns of the output. Sequences go in groups whose
    /// score buffer stays under 256 MiB.
    public func attention(q: Tensor, k: Tensor, v: Tensor, shape: AttentionShape, options: AttentionOptions) -> Tensor {
        CPUAttention.check(q, k, v, shape)
        let out = uninitialized(rows: q.rows, cols: shape.queryWidth)
        let t = shape.sequenceLength, d = shape.headDim
        let qDim = shape.queryWidth, kvDim = shape.keyWidth
        let group = shape.heads / shape.kvHeads
        let sequences = q.rows / t
        if sequences == 0 { return out }
        let perGroup = max(1, min(sequences, (256 << 20) / max(t * t * 4, 1)))
        let scores = uninitialized(rows: perGroup * t, cols: t)
        let (pq, pk, pv, po, ps) = (pointer(q), pointer(k), pointer(v), pointer(out), pointer(scores))
        var s0 = 0
        while s0 < sequences {
            let batch = min(perGroup, sequences - s0)
            for h in 0..<shape.heads {
                let kvHead = h / group
                let qh = pq + UInt64((s0 * t * qDim + h * d) * 4)
                let kh = pk + UInt64((s0 * t * kvDim + kvHead * d) * 4)
                let vh = pv + UInt64((s0 * t * kvDim + kvHead * d) * 4)
                let oh = po + UInt64((s0 * t * qDim + h * d) * 4)
                // S = scale·Q·Kᵀ (row-major t x t): column-major Sᵀ = K·Qᵀ, K read as Kᵀ (d x t).
                device.sgemmStridedBatched(transA: true, transB: false, m: t, n: t, k: d, alpha: options.scale,
                                           a: kh, lda: kvDim, strideA: t * kvDim, b: qh, ldb: qDim, strideB: t * qDim,
                                           beta: 0, c: ps, ldc: t, strideC: t * t, batch: batch)
                device.launch("causal_softmax", blocks: min(batch * t, 1 << 16),
                              [.pointer(ps), .int64(batch * t), .int32(t), .int32(options.window ?? 0), .float(options.softcap ?? 0)])
                // O = P·V (row-major t x d): column-major Oᵀ = Vᵀ·Pᵀ.
                device.sgemmStridedBatched(transA: false, transB: false, m: d, n: t, k: t, alpha: 1,
                                           a: vh, lda: kvDim, strideA: t * kvDim, b: ps, ldb: t, strideB: t * t,
                                           beta: 0, c: oh, ldc: qDim, strideC: t * qDim, batch: batch)
            }
            s0 += batch
        }
        return out
    }

    public func gatedActivation(gate: Tensor, up: Tensor, _ activation: GatedActivation) -> Tensor {
        precondition(gate.rows == up.rows && gate.cols == up.cols, "gatedActivation: \(gate) and \(up)")
        let code: Int
        switch activation {
        case .silu: code = 0
        case .geluTanh: code = 1
        case .relu: code = 2
        }
        let out = uninitialized(rows: gate.rows, cols: gate.cols)
        launch("gated", count: gate.count, [.pointer(pointer(gate)), .pointer(pointer(up)), .pointer(pointer(out)), .int64(gate.count), .int32(code)])
        return out
    }
}
