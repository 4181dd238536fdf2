#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import Foundation

/// One CUDA device as `CUDABackend` uses it: the primary context, a cuBLAS handle, the kernel
/// module compiled by NVRTC, and stream-ordered memory. All work goes to the context's legacy
/// default stream, so operations run in the order they are issued and a download sees every
/// write issued before it.
final class CUDADevice: @unchecked Sendable {
    let lib: CUDALibraries
    let index: Int
    let name: String
    let totalMemory: Int
    let computeCapability: (major: Int, minor: Int)
    let driverVersion: Int
    private let context: OpaquePointer?
    private let cublas: OpaquePointer?
    private let functions: [String: OpaquePointer?]
    private let cublasLock = NSLock()
    private let asyncMemory: Bool
    /// TF32 tensor cores for Float32 GEMMs (`TOPIARY_CUDA_MATH=tf32`): faster, 10-bit mantissas.
    let tf32: Bool
    /// cuSOLVER's handle, where the library was found and `TOPIARY_CUDA_HOST_SOLVE` is unset.
    private let cusolver: OpaquePointer?
    /// SparseGPT's factorisations and column loop on the device (false: on the host, as a check).
    let deviceSolve: Bool

    private nonisolated(unsafe) static var devices: [Int: CUDADevice] = [:]
    private nonisolated(unsafe) static var libraries: Result<CUDALibraries, DeviceError>?
    private static let lock = NSLock()

    /// The libraries, loaded once (or the error saying what is missing).
    static func loadLibraries() throws -> CUDALibraries {
        try lock.withLock {
            if libraries == nil {
                do { libraries = .success(try CUDALibraries()) } catch let e as DeviceError { libraries = .failure(e) }
                catch { libraries = .failure(.unavailable("\(error)")) }
            }
            return try libraries!.get()
        }
    }

    /// The device `index`, set up once per process.
    static func shared(_ index: Int) throws -> CUDADevice {
        let lib = try loadLibraries()
        return try lock.withLock {
            if let d = devices[index] { return d }
            let d = try CUDADevice(lib: lib, index: index)
            devices[index] = d
            return d
        }
    }

    /// Devices the driver reports (0 where it cannot start), with the error if it cannot.
    static func count() throws -> Int { try count(try loadLibraries()) }

    private static func count(_ lib: CUDALibraries) throws -> Int {
        var status = lib.cuInit(0)
        guard status == 0 else { throw DeviceError.unavailable("cuInit failed: \(lib.errorString(status))") }
        var n: Int32 = 0
        status = lib.cuDeviceGetCount(&n)
        guard status == 0 else { throw DeviceError.unavailable("cuDeviceGetCount failed: \(lib.errorString(status))") }
        return Int(n)
    }

    private init(lib: CUDALibraries, index: Int) throws {
        self.lib = lib
        self.index = index
        let available = try Self.count(lib)
        guard index < available else {
            throw DeviceError.unavailable("the driver reports \(available) CUDA device\(available == 1 ? "" : "s") (0...\(max(available - 1, 0)))")
        }
        func check(_ status: Int32, _ what: String) throws {
            if status != 0 { throw DeviceError.unavailable("\(what) failed: \(lib.errorString(status))") }
        }
        var device: Int32 = 0
        try check(lib.cuDeviceGet(&device, Int32(index)), "cuDeviceGet")
        var buffer = [CChar](repeating: 0, count: 256)
        try check(lib.cuDeviceGetName(&buffer, 255, device), "cuDeviceGetName")
        name = String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        var bytes = 0
        try check(lib.cuDeviceTotalMem(&bytes, device), "cuDeviceTotalMem")
        totalMemory = bytes
        var major: Int32 = 0, minor: Int32 = 0
        try check(lib.cuDeviceGetAttribute(&major, 75, device), "cuDeviceGetAttribute")   // compute capability major
        try check(lib.cuDeviceGetAttribute(&minor, 76, device), "cuDeviceGetAttribute")   // minor
        computeCapability = (Int(major), Int(minor))
        var version: Int32 = 0
        _ = lib.cuDriverGetVersion(&version)
        driverVersion = Int(version)
        var ctx: OpaquePointer? = nil
        try check(lib.cuDevicePrimaryCtxRetain(&ctx, device), "cuDevicePrimaryCtxRetain")
        context = ctx
        try check(lib.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")

        // Stream-ordered allocation from the device's pool, kept cached (no release between blocks).
        var usesPool = false
        if lib.cuMemAllocAsync != nil, lib.cuMemFreeAsync != nil, let getPool = lib.cuDeviceGetDefaultMemPool,
           let setAttribute = lib.cuMemPoolSetAttribute {
            var pool: OpaquePointer? = nil
            if getPool(&pool, device) == 0 {
                var threshold = UInt64.max
                usesPool = setAttribute(pool, 4, &threshold) == 0   // CU_MEMPOOL_ATTR_RELEASE_THRESHOLD
            }
        }
        asyncMemory = usesPool

        var handle: OpaquePointer? = nil
        let cublasStatus = lib.cublasCreate(&handle)
        guard cublasStatus == 0 else { throw DeviceError.unavailable("cublasCreate failed (status \(cublasStatus))") }
        cublas = handle
        tf32 = ProcessInfo.processInfo.environment["TOPIARY_CUDA_MATH"] == "tf32"
        deviceSolve = (ProcessInfo.processInfo.environment["TOPIARY_CUDA_HOST_SOLVE"] ?? "").isEmpty
        var solverHandle: OpaquePointer? = nil
        if deviceSolve, let solver = lib.solver, solver.create(&solverHandle) != 0 { solverHandle = nil }
        cusolver = solverHandle
        _ = lib.cublasSetMathMode(handle, tf32 ? 3 : 0)   // CUBLAS_TF32_TENSOR_OP_MATH : CUBLAS_DEFAULT_MATH

        let arch = "--gpu-architecture=compute_\(major)\(minor)"
        let ptx = try NVRTC.compile(lib, source: CUDAKernelSource.text, name: "topiary_kernels.cu", options: [arch, "--fmad=false"])
        var module: OpaquePointer? = nil
        try check(ptx.withUnsafeBytes { lib.cuModuleLoadData(&module, $0.baseAddress!) }, "cuModuleLoadData (the kernels' PTX)")
        var table: [String: OpaquePointer?] = [:]
        for kernel in CUDAKernelSource.names {
            var f: OpaquePointer? = nil
            try check(kernel.withCString { lib.cuModuleGetFunction(&f, module, $0) }, "cuModuleGetFunction \(kernel)")
            table[kernel] = f
        }
        functions = table
    }

    /// One line about the device, for `--device` messages and `inspect --devices`.
    var summary: String {
        let gib = Double(totalMemory) / Double(1 << 30)
        return "cuda:\(index) \(name), \(String(format: "%.0f", gib)) GiB, compute \(computeCapability.major).\(computeCapability.minor), driver \(driverVersion / 1000).\(driverVersion % 1000 / 10)\(tf32 ? ", TF32 GEMMs" : "")\(cusolver == nil ? ", Cholesky on the host" : "")\(deviceSolve ? "" : ", SparseGPT's loop on the host")"
    }

    // MARK: Failures

    /// A device failure inside an operation that cannot throw: one line naming the operation and
    /// the driver's error, then exit (nothing half-written is renamed into place).
    func fail(_ what: String, _ detail: String) -> Never {
        let message = "topiary: cuda:\(index): \(what) failed: \(detail)\n"
        FileHandle.standardError.write(message.data(using: .utf8)!)
        exit(70)
    }

    @inline(__always) func check(_ status: Int32, _ what: @autoclosure () -> String) {
        if status != 0 { fail(what(), lib.errorString(status)) }
    }

    @inline(__always) func makeCurrent() {
        let status = lib.cuCtxSetCurrent(context)
        if status != 0 { fail("cuCtxSetCurrent", lib.errorString(status)) }
    }

    // MARK: Memory

    func allocate(bytes: Int) -> UInt64 {
        if bytes == 0 { return 0 }
        makeCurrent()
        var p: UInt64 = 0
        let status = asyncMemory ? lib.cuMemAllocAsync!(&p, bytes, nil) : lib.cuMemAlloc(&p, bytes)
        if status != 0 {
            fail("allocating \(bytes) bytes", lib.errorString(status) + " (the device holds \(totalMemory >> 20) MiB; fewer calibration samples or --device cpu would fit)")
        }
        return p
    }

    /// Frees `p` once the work issued before has finished with it: in stream order from the pool,
    /// or, without a pool, after waiting for the device (a kernel may still read it).
    func free(_ p: UInt64) {
        if p == 0 { return }
        makeCurrent()
        if asyncMemory {
            _ = lib.cuMemFreeAsync!(p, nil)
        } else {
            _ = lib.cuCtxSynchronize()
            _ = lib.cuMemFree(p)
        }
    }

    func upload(_ host: UnsafeRawPointer, to p: UInt64, bytes: Int) {
        if bytes == 0 { return }
        makeCurrent()
        check(lib.cuMemcpyHtoD(p, host, bytes), "copying \(bytes) bytes to the device")
    }

    func download(_ p: UInt64, to host: UnsafeMutableRawPointer, bytes: Int) {
        if bytes == 0 { return }
        makeCurrent()
        check(lib.cuMemcpyDtoH(host, p, bytes), "copying \(bytes) bytes from the device")
    }

    func copy(_ source: UInt64, to destination: UInt64, bytes: Int) {
        if bytes == 0 { return }
        makeCurrent()
        check(lib.cuMemcpyDtoD(destination, source, bytes), "a device-to-device copy")
    }

    func zero(_ p: UInt64, floats: Int) {
        if floats == 0 { return }
        makeCurrent()
        check(lib.cuMemsetD32(p, 0, floats), "zero-filling")
    }

    func synchronize() {
        makeCurrent()
        check(lib.cuCtxSynchronize(), "synchronising")
    }

    // MARK: Kernels

    enum Argument {
        case pointer(UInt64)
        case int64(Int)
        case int32(Int)
        case float(Float)
    }

    /// Launches kernel `name` on `blocks` x `threads` with `arguments` (in the kernel's order).
    func launch(_ name: String, blocks: Int, threads: Int = CUDAKernelSource.threads, _ arguments: [Argument]) {
        guard let entry = functions[name], let function = entry else { fail("launching \(name)", "no such kernel in the module") }
        if blocks == 0 { return }
        makeCurrent()
        let slots = UnsafeMutableRawPointer.allocate(byteCount: max(arguments.count, 1) * 8, alignment: 8)
        defer { slots.deallocate() }
        var pointers = [UnsafeMutableRawPointer?](repeating: nil, count: arguments.count)
        for (i, argument) in arguments.enumerated() {
            let slot = slots + i * 8
            switch argument {
            case .pointer(let p): slot.storeBytes(of: p, as: UInt64.self)
            case .int64(let v): slot.storeBytes(of: Int64(v), as: Int64.self)
            case .int32(let v): slot.storeBytes(of: Int32(v), as: Int32.self)
            case .float(let v): slot.storeBytes(of: v, as: Float.self)
            }
            pointers[i] = slot
        }
        let status = pointers.withUnsafeMutableBufferPointer { params in
            lib.cuLaunchKernel(function, UInt32(blocks), 1, 1, UInt32(threads), 1, 1, 0, nil, params.baseAddress, nil)
        }
        check(status, "launching \(name)")
    }


    // MARK: cuBLAS (column-major; callers pass row-major operands as their transposes)

    func sgemm(transA: Bool, transB: Bool, m: Int, n: Int, k: Int, alpha: Float, a: UInt64, lda: Int,
               b: UInt64, ldb: Int, beta: Float, c: UInt64, ldc: Int) {
        makeCurrent()
        var (al, be) = (alpha, beta)
        let status = cublasLock.withLock {
            lib.cublasSgemm(cublas, transA ? 1 : 0, transB ? 1 : 0, Int32(m), Int32(n), Int32(k), &al,
                            UnsafeRawPointer(bitPattern: UInt(a)), Int32(lda), UnsafeRawPointer(bitPattern: UInt(b)), Int32(ldb), &be,
                            UnsafeMutableRawPointer(bitPattern: UInt(c)), Int32(ldc))
        }
        if status != 0 { fail("cublasSgemm (\(m)x\(n)x\(k))", "cuBLAS status \(status)") }
    }

    func sgemmStridedBatched(transA: Bool, transB: Bool, m: Int, n: Int, k: Int, alpha: Float,
                             a: UInt64, lda: Int, strideA: Int, b: UInt64, ldb: Int, strideB: Int,
                             beta: Float, c: UInt64, ldc: Int, strideC: Int, batch: Int) {
        makeCurrent()
        var (al, be) = (alpha, beta)
        let status = cublasLock.withLock {
            lib.cublasSgemmStridedBatched(cublas, transA ? 1 : 0, transB ? 1 : 0, Int32(m), Int32(n), Int32(k), &al,
                                          UnsafeRawPointer(bitPattern: UInt(a)), Int32(lda), Int64(strideA),
                                          UnsafeRawPointer(bitPattern: UInt(b)), Int32(ldb), Int64(strideB), &be,
                                          UnsafeMutableRawPointer(bitPattern: UInt(c)), Int32(ldc), Int64(strideC), Int32(batch))
        }
        if status != 0 { fail("cublasSgemmStridedBatched (\(m)x\(n)x\(k) x\(batch))", "cuBLAS status \(status)") }
    }

    // MARK: cuSOLVER (column-major)

    var hasSolver: Bool { cusolver != nil }

    /// Cholesky in place (potrf) or the inverse from that factor (potri) on one triangle of the
    /// column-major n x n matrix at `a`; returns LAPACK's info (0, or the failing leading minor).
    func cholesky(lower: Bool, n: Int, a: UInt64, inverse: Bool) -> Int {
        guard let solver = lib.solver, let handle = cusolver else { fail("cuSOLVER", "not loaded") }
        makeCurrent()
        let uplo: Int32 = lower ? 0 : 1
        var lwork: Int32 = 0
        let what = inverse ? "cusolverDnSpotri" : "cusolverDnSpotrf"
        let sizeStatus = (inverse ? solver.potriBufferSize : solver.potrfBufferSize)(handle, uplo, Int32(n), UnsafeMutableRawPointer(bitPattern: UInt(a)), Int32(n), &lwork)
        if sizeStatus != 0 { fail("\(what)_bufferSize (n \(n))", "cuSOLVER status \(sizeStatus)") }
        let work = allocate(bytes: max(Int(lwork), 1) * 4)
        let info = allocate(bytes: 4)
        defer { free(work); free(info) }
        let status = (inverse ? solver.potri : solver.potrf)(handle, uplo, Int32(n), UnsafeMutableRawPointer(bitPattern: UInt(a)), Int32(n),
                                                             UnsafeMutableRawPointer(bitPattern: UInt(work)), lwork, UnsafeMutableRawPointer(bitPattern: UInt(info)))
        if status != 0 { fail("\(what) (n \(n))", "cuSOLVER status \(status)") }
        var result: Int32 = 0
        download(info, to: &result, bytes: 4)
        return Int(result)
    }

    /// C = alpha·A·Aᵀ + beta·C on one triangle (column-major), A n x k.
    func ssyrk(lower: Bool, n: Int, k: Int, alpha: Float, a: UInt64, lda: Int, beta: Float, c: UInt64, ldc: Int) {
        makeCurrent()
        var (al, be) = (alpha, beta)
        let status = cublasLock.withLock {
            lib.cublasSsyrk(cublas, lower ? 0 : 1, 0, Int32(n), Int32(k), &al, UnsafeRawPointer(bitPattern: UInt(a)), Int32(lda), &be,
                            UnsafeMutableRawPointer(bitPattern: UInt(c)), Int32(ldc))
        }
        if status != 0 { fail("cublasSsyrk (\(n)x\(k))", "cuBLAS status \(status)") }
    }
}
