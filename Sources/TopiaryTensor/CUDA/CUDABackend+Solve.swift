/// SparseGPT's solve and the run's Float64 reductions on the device: Cholesky and the SPD
/// inverse by cuSOLVER (on the host where the library is missing), the column loop of a block
/// by `sparse_gpt_block` (CPUBackend.sparseGPTRow's arithmetic, one thread per row), and the
/// chunked sums in the CPU's chunks and order, so that they give the CPU's bits for the same
/// operands. `TOPIARY_CUDA_HOST_SOLVE=1` runs the factorisations and the column loop on the host.
extension CUDABackend {
    public func cholesky(_ a: Tensor, upper: Bool, what: String) throws -> Tensor {
        precondition(a.rows == a.cols, "cholesky of \(a)")
        guard device.hasSolver else { return try hostCholesky(a, upper: upper, what: what) }
        let f = copy(a)
        // Row-major upper U (A = UᵀU) is column-major lower L (A = LLᵀ), and the other way round.
        let info = device.cholesky(lower: upper, n: a.rows, a: pointer(f), inverse: false)
        if info > 0 { throw LinalgError.notPositiveDefinite(what: what, minor: info) }
        launch("zero_triangle", count: f.count, [.pointer(pointer(f)), .int64(f.rows), .int32(upper ? 1 : 0)])
        return f
    }

    public func inverseSPD(_ a: Tensor, what: String) throws -> Tensor {
        precondition(a.rows == a.cols, "inverseSPD of \(a)")
        guard device.hasSolver else { return try hostInverseSPD(a, what: what) }
        let f = copy(a)
        let info = device.cholesky(lower: true, n: a.rows, a: pointer(f), inverse: false)
        if info > 0 { throw LinalgError.notPositiveDefinite(what: what, minor: info) }
        let inv = device.cholesky(lower: true, n: a.rows, a: pointer(f), inverse: true)
        if inv > 0 { throw LinalgError.singular(what: what, info: inv) }
        mirrorUpper(f)   // column-major lower is row-major upper
        return f
    }

    public func sparseGPTBlock(weight: Tensor, inverseFactor: Tensor, mask: Tensor, nOfM: (n: Int, m: Int)?, error: Tensor) -> Double {
        let (rows, count) = (weight.rows, weight.cols)
        precondition(inverseFactor.rows == count && inverseFactor.cols == count && mask.rows == rows && mask.cols == count
                     && error.rows == rows && error.cols == count, "sparseGPTBlock: \(weight), \(inverseFactor), \(mask), \(error)")
        guard device.deviceSolve, count <= CUDAKernelSource.sparseGPTMaxColumns, rows > 0, count > 0 else {
            return hostSparseGPTBlock(weight: weight, inverseFactor: inverseFactor, mask: mask, nOfM: nOfM, error: error)
        }
        let losses = uninitialized(rows: 1, cols: rows)
        launch("sparse_gpt_block", count: rows, threads: 64,
               [.pointer(pointer(weight)), .pointer(pointer(inverseFactor)), .pointer(pointer(mask)), .pointer(pointer(error)),
                .pointer(pointer(losses)), .int32(rows), .int32(count), .int32(nOfM?.n ?? 0), .int32(nOfM?.m ?? 0)])
        let rowLosses = download(losses).values
        var loss = 0.0
        for r in 0..<rows { loss += Double(rowLosses[r]) / 2 }
        return loss
    }

    /// The chunked Float64 sums: one partial per `Parallel.chunk` elements on the device, added
    /// on the host in chunk order (as `Parallel.sum`).
    func chunkedSum(_ mode: Int, _ a: Tensor, _ b: Tensor, _ c: Tensor?) -> Double {
        let n = a.count
        if n == 0 { return 0 }
        let chunks = (n + Parallel.chunk - 1) / Parallel.chunk
        let partial = CUDATensorStorage(device: device, bytes: chunks * 8)
        launch("chunked_sums", count: chunks, threads: 64,
               [.pointer(pointer(a)), .pointer(pointer(b)), .pointer(c.map(pointer) ?? 0), .int64(n), .int64(Parallel.chunk),
                .int32(mode), .pointer(partial.pointer)])
        var sums = [Double](repeating: 0, count: chunks)
        sums.withUnsafeMutableBytes { device.download(partial.pointer, to: $0.baseAddress!, bytes: chunks * 8) }
        return sums.reduce(0, +)
    }

    public func chunkedDot(_ a: Tensor, _ b: Tensor) -> Double {
        precondition(a.count == b.count, "chunkedDot: \(a) and \(b)")
        return chunkedSum(0, a, b, nil)
    }

    public func chunkedSquaredDistance(_ a: Tensor, _ b: Tensor) -> Double {
        precondition(a.count == b.count, "chunkedSquaredDistance: \(a) and \(b)")
        return chunkedSum(1, a, b, nil)
    }

    public func chunkedSquaredDistanceToProduct(_ p: Tensor, _ u: Tensor, _ v: Tensor) -> Double {
        precondition(p.count == u.count && p.count == v.count, "chunkedSquaredDistanceToProduct: \(p), \(u), \(v)")
        return chunkedSum(2, p, u, v)
    }

    public func allFinite(_ x: Tensor) -> Bool {
        if x.count == 0 { return true }
        let flag = CUDATensorStorage(device: device, bytes: 4)
        device.zero(flag.pointer, floats: 1)
        launch("flag_nonfinite", count: x.count, [.pointer(pointer(x)), .int64(x.count), .pointer(flag.pointer)])
        var value: UInt32 = 0
        device.download(flag.pointer, to: &value, bytes: 4)
        return value == 0
    }
}
