#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import Foundation

/// The CUDA libraries, opened with dlopen at run time: the driver (libcuda), cuBLAS and NVRTC.
/// Nothing here is linked at build time, so every build and every CPU test works on a machine
/// without them; `CUDALibraries.load()` says in one line which library or symbol is missing.
///
/// Where the libraries are looked for: each directory of `TOPIARY_CUDA_LIBRARY_PATH`
/// (colon-separated) first, then the dynamic loader's own search (LD_LIBRARY_PATH, ldconfig),
/// then `$CUDA_HOME/lib64` and `/usr/local/cuda/lib64`.
final class CUDALibraries: @unchecked Sendable {
    typealias CUresult = Int32
    typealias CUdevice = Int32
    typealias CUdeviceptr = UInt64

    // Driver API (libcuda.so.1).
    let cuInit: @convention(c) (UInt32) -> CUresult
    let cuDriverGetVersion: @convention(c) (UnsafeMutablePointer<Int32>) -> CUresult
    let cuDeviceGetCount: @convention(c) (UnsafeMutablePointer<Int32>) -> CUresult
    let cuDeviceGet: @convention(c) (UnsafeMutablePointer<CUdevice>, Int32) -> CUresult
    let cuDeviceGetName: @convention(c) (UnsafeMutablePointer<CChar>, Int32, CUdevice) -> CUresult
    let cuDeviceTotalMem: @convention(c) (UnsafeMutablePointer<Int>, CUdevice) -> CUresult
    let cuDeviceGetAttribute: @convention(c) (UnsafeMutablePointer<Int32>, Int32, CUdevice) -> CUresult
    let cuDevicePrimaryCtxRetain: @convention(c) (UnsafeMutablePointer<OpaquePointer?>, CUdevice) -> CUresult
    let cuCtxSetCurrent: @convention(c) (OpaquePointer?) -> CUresult
    let cuCtxSynchronize: @convention(c) () -> CUresult
    let cuMemAlloc: @convention(c) (UnsafeMutablePointer<CUdeviceptr>, Int) -> CUresult
    let cuMemFree: @convention(c) (CUdeviceptr) -> CUresult
    let cuMemAllocAsync: (@convention(c) (UnsafeMutablePointer<CUdeviceptr>, Int, OpaquePointer?) -> CUresult)?
    let cuMemFreeAsync: (@convention(c) (CUdeviceptr, OpaquePointer?) -> CUresult)?
    let cuDeviceGetDefaultMemPool: (@convention(c) (UnsafeMutablePointer<OpaquePointer?>, CUdevice) -> CUresult)?
    let cuMemPoolSetAttribute: (@convention(c) (OpaquePointer?, Int32, UnsafeMutableRawPointer) -> CUresult)?
    let cuMemcpyHtoD: @convention(c) (CUdeviceptr, UnsafeRawPointer, Int) -> CUresult
    let cuMemcpyDtoH: @convention(c) (UnsafeMutableRawPointer, CUdeviceptr, Int) -> CUresult
    let cuMemcpyDtoD: @convention(c) (CUdeviceptr, CUdeviceptr, Int) -> CUresult
    let cuMemsetD32: @convention(c) (CUdeviceptr, UInt32, Int) -> CUresult
    let cuModuleLoadData: @convention(c) (UnsafeMutablePointer<OpaquePointer?>, UnsafeRawPointer) -> CUresult
    let cuModuleGetFunction: @convention(c) (UnsafeMutablePointer<OpaquePointer?>, OpaquePointer?, UnsafePointer<CChar>) -> CUresult
    let cuLaunchKernel: @convention(c) (OpaquePointer?, UInt32, UInt32, UInt32, UInt32, UInt32, UInt32, UInt32, OpaquePointer?,
                                        UnsafeMutablePointer<UnsafeMutableRawPointer?>?, UnsafeMutablePointer<UnsafeMutableRawPointer?>?) -> CUresult
    let cuGetErrorString: @convention(c) (CUresult, UnsafeMutablePointer<UnsafePointer<CChar>?>) -> CUresult

    // cuBLAS (libcublas.so.13/12/11).
    typealias SgemmFunction = @convention(c) (OpaquePointer?, Int32, Int32, Int32, Int32, Int32, UnsafePointer<Float>,
                                              UnsafeRawPointer?, Int32, UnsafeRawPointer?, Int32, UnsafePointer<Float>,
                                              UnsafeMutableRawPointer?, Int32) -> Int32
    typealias SgemmBatchedFunction = @convention(c) (OpaquePointer?, Int32, Int32, Int32, Int32, Int32, UnsafePointer<Float>,
                                                     UnsafeRawPointer?, Int32, Int64, UnsafeRawPointer?, Int32, Int64, UnsafePointer<Float>,
                                                     UnsafeMutableRawPointer?, Int32, Int64, Int32) -> Int32
    typealias SsyrkFunction = @convention(c) (OpaquePointer?, Int32, Int32, Int32, Int32, UnsafePointer<Float>, UnsafeRawPointer?, Int32,
                                              UnsafePointer<Float>, UnsafeMutableRawPointer?, Int32) -> Int32
    let cublasCreate: @convention(c) (UnsafeMutablePointer<OpaquePointer?>) -> Int32
    let cublasSgemm: SgemmFunction
    let cublasSgemmStridedBatched: SgemmBatchedFunction
    let cublasSsyrk: SsyrkFunction
    let cublasSetMathMode: @convention(c) (OpaquePointer?, Int32) -> Int32

    // NVRTC (libnvrtc.so.13/12/11).
    let nvrtcCreateProgram: @convention(c) (UnsafeMutablePointer<OpaquePointer?>, UnsafePointer<CChar>, UnsafePointer<CChar>?, Int32,
                                            UnsafePointer<UnsafePointer<CChar>?>?, UnsafePointer<UnsafePointer<CChar>?>?) -> Int32
    let nvrtcCompileProgram: @convention(c) (OpaquePointer?, Int32, UnsafePointer<UnsafePointer<CChar>?>?) -> Int32
    let nvrtcGetPTXSize: @convention(c) (OpaquePointer?, UnsafeMutablePointer<Int>) -> Int32
    let nvrtcGetPTX: @convention(c) (OpaquePointer?, UnsafeMutablePointer<CChar>) -> Int32
    let nvrtcGetProgramLogSize: @convention(c) (OpaquePointer?, UnsafeMutablePointer<Int>) -> Int32
    let nvrtcGetProgramLog: @convention(c) (OpaquePointer?, UnsafeMutablePointer<CChar>) -> Int32
    let nvrtcDestroyProgram: @convention(c) (UnsafeMutablePointer<OpaquePointer?>) -> Int32

    /// cuSOLVER's dense Cholesky and inverse, where the library is found (else those two run on the host).
    struct Solver {
        typealias BufferSize = @convention(c) (OpaquePointer?, Int32, Int32, UnsafeMutableRawPointer?, Int32, UnsafeMutablePointer<Int32>) -> Int32
        typealias Factor = @convention(c) (OpaquePointer?, Int32, Int32, UnsafeMutableRawPointer?, Int32, UnsafeMutableRawPointer?, Int32,
                                           UnsafeMutableRawPointer?) -> Int32
        let create: @convention(c) (UnsafeMutablePointer<OpaquePointer?>) -> Int32
        let potrfBufferSize: BufferSize
        let potrf: Factor
        let potriBufferSize: BufferSize
        let potri: Factor
    }
    let solver: Solver?
    static let cusolverNames = ["libcusolver.so.12", "libcusolver.so.11", "libcusolver.so.13", "libcusolver.so"]


    static let driverNames = ["libcuda.so.1", "libcuda.so"]
    static let cublasNames = ["libcublas.so.13", "libcublas.so.12", "libcublas.so.11", "libcublas.so"]
    static let nvrtcNames = ["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so.11.2", "libnvrtc.so"]

    /// Directories searched before the loader's own path.
    static var searchDirectories: [String] {
        let env = ProcessInfo.processInfo.environment
        var dirs = (env["TOPIARY_CUDA_LIBRARY_PATH"] ?? "").split(separator: ":").map(String.init)
        dirs.append("")   // the loader's own search
        if let home = env["CUDA_HOME"] { dirs.append(home + "/lib64") }
        dirs.append("/usr/local/cuda/lib64")
        return dirs
    }

    /// Opens the first of `names` found, in `searchDirectories` order.
    static func open(_ what: String, _ names: [String]) throws -> (UnsafeMutableRawPointer, String) {
        for dir in searchDirectories {
            for name in names {
                let path = dir.isEmpty ? name : dir + "/" + name
                if let h = dlopen(path, RTLD_NOW | RTLD_LOCAL) { return (h, path) }
            }
        }
        throw DeviceError.unavailable("\(what) not found (tried \(names.joined(separator: ", ")) in TOPIARY_CUDA_LIBRARY_PATH, the loader's path, $CUDA_HOME/lib64 and /usr/local/cuda/lib64)")
    }

    init() throws {
        let (driver, driverPath) = try Self.open("CUDA driver library", Self.driverNames)
        let (cublas, cublasPath) = try Self.open("cuBLAS", Self.cublasNames)
        let (nvrtc, nvrtcPath) = try Self.open("NVRTC (the CUDA run-time compiler)", Self.nvrtcNames)

        func symbol<T>(_ handle: UnsafeMutableRawPointer, _ library: String, _ name: String, as: T.Type) throws -> T {
            guard let p = dlsym(handle, name) else {
                throw DeviceError.unavailable("\(library) has no symbol \(name) (too old a version?)")
            }
            return unsafeBitCast(p, to: T.self)
        }
        func optional<T>(_ handle: UnsafeMutableRawPointer, _ name: String, as: T.Type) -> T? {
            dlsym(handle, name).map { unsafeBitCast($0, to: T.self) }
        }
        let d = driverPath
        cuInit = try symbol(driver, d, "cuInit", as: type(of: cuInit))
        cuDriverGetVersion = try symbol(driver, d, "cuDriverGetVersion", as: type(of: cuDriverGetVersion))
        cuDeviceGetCount = try symbol(driver, d, "cuDeviceGetCount", as: type(of: cuDeviceGetCount))
        cuDeviceGet = try symbol(driver, d, "cuDeviceGet", as: type(of: cuDeviceGet))
        cuDeviceGetName = try symbol(driver, d, "cuDeviceGetName", as: type(of: cuDeviceGetName))
        cuDeviceTotalMem = try symbol(driver, d, "cuDeviceTotalMem_v2", as: type(of: cuDeviceTotalMem))
        cuDeviceGetAttribute = try symbol(driver, d, "cuDeviceGetAttribute", as: type(of: cuDeviceGetAttribute))
        cuDevicePrimaryCtxRetain = try symbol(driver, d, "cuDevicePrimaryCtxRetain", as: type(of: cuDevicePrimaryCtxRetain))
        cuCtxSetCurrent = try symbol(driver, d, "cuCtxSetCurrent", as: type(of: cuCtxSetCurrent))
        cuCtxSynchronize = try symbol(driver, d, "cuCtxSynchronize", as: type(of: cuCtxSynchronize))
        cuMemAlloc = try symbol(driver, d, "cuMemAlloc_v2", as: type(of: cuMemAlloc))
        cuMemFree = try symbol(driver, d, "cuMemFree_v2", as: type(of: cuMemFree))
        cuMemAllocAsync = optional(driver, "cuMemAllocAsync", as: (@convention(c) (UnsafeMutablePointer<CUdeviceptr>, Int, OpaquePointer?) -> CUresult).self)
        cuMemFreeAsync = optional(driver, "cuMemFreeAsync", as: (@convention(c) (CUdeviceptr, OpaquePointer?) -> CUresult).self)
        cuDeviceGetDefaultMemPool = optional(driver, "cuDeviceGetDefaultMemPool", as: (@convention(c) (UnsafeMutablePointer<OpaquePointer?>, CUdevice) -> CUresult).self)
        cuMemPoolSetAttribute = optional(driver, "cuMemPoolSetAttribute", as: (@convention(c) (OpaquePointer?, Int32, UnsafeMutableRawPointer) -> CUresult).self)
        cuMemcpyHtoD = try symbol(driver, d, "cuMemcpyHtoD_v2", as: type(of: cuMemcpyHtoD))
        cuMemcpyDtoH = try symbol(driver, d, "cuMemcpyDtoH_v2", as: type(of: cuMemcpyDtoH))
        cuMemcpyDtoD = try symbol(driver, d, "cuMemcpyDtoD_v2", as: type(of: cuMemcpyDtoD))
        cuMemsetD32 = try symbol(driver, d, "cuMemsetD32_v2", as: type(of: cuMemsetD32))
        cuModuleLoadData = try symbol(driver, d, "cuModuleLoadData", as: type(of: cuModuleLoadData))
        cuModuleGetFunction = try symbol(driver, d, "cuModuleGetFunction", as: type(of: cuModuleGetFunction))
        cuLaunchKernel = try symbol(driver, d, "cuLaunchKernel", as: type(of: cuLaunchKernel))
        cuGetErrorString = try symbol(driver, d, "cuGetErrorString", as: type(of: cuGetErrorString))

        let b = cublasPath
        cublasCreate = try symbol(cublas, b, "cublasCreate_v2", as: type(of: cublasCreate))
        cublasSgemm = try symbol(cublas, b, "cublasSgemm_v2", as: SgemmFunction.self)
        cublasSgemmStridedBatched = try symbol(cublas, b, "cublasSgemmStridedBatched", as: SgemmBatchedFunction.self)
        cublasSsyrk = try symbol(cublas, b, "cublasSsyrk_v2", as: SsyrkFunction.self)
        cublasSetMathMode = try symbol(cublas, b, "cublasSetMathMode", as: type(of: cublasSetMathMode))

        let n = nvrtcPath
        nvrtcCreateProgram = try symbol(nvrtc, n, "nvrtcCreateProgram", as: type(of: nvrtcCreateProgram))
        nvrtcCompileProgram = try symbol(nvrtc, n, "nvrtcCompileProgram", as: type(of: nvrtcCompileProgram))
        nvrtcGetPTXSize = try symbol(nvrtc, n, "nvrtcGetPTXSize", as: type(of: nvrtcGetPTXSize))
        nvrtcGetPTX = try symbol(nvrtc, n, "nvrtcGetPTX", as: type(of: nvrtcGetPTX))
        nvrtcGetProgramLogSize = try symbol(nvrtc, n, "nvrtcGetProgramLogSize", as: type(of: nvrtcGetProgramLogSize))
        nvrtcGetProgramLog = try symbol(nvrtc, n, "nvrtcGetProgramLog", as: type(of: nvrtcGetProgramLog))
        nvrtcDestroyProgram = try symbol(nvrtc, n, "nvrtcDestroyProgram", as: type(of: nvrtcDestroyProgram))

        if let (h, _) = try? Self.open("cuSOLVER", Self.cusolverNames),
           let create = optional(h, "cusolverDnCreate", as: (@convention(c) (UnsafeMutablePointer<OpaquePointer?>) -> Int32).self),
           let fs = optional(h, "cusolverDnSpotrf_bufferSize", as: Solver.BufferSize.self),
           let f = optional(h, "cusolverDnSpotrf", as: Solver.Factor.self),
           let ibs = optional(h, "cusolverDnSpotri_bufferSize", as: Solver.BufferSize.self),
           let i = optional(h, "cusolverDnSpotri", as: Solver.Factor.self) {
            solver = Solver(create: create, potrfBufferSize: fs, potrf: f, potriBufferSize: ibs, potri: i)
        } else {
            solver = nil
        }
    }

    /// The driver's name for an error code.
    func errorString(_ code: CUresult) -> String {
        var p: UnsafePointer<CChar>? = nil
        if cuGetErrorString(code, &p) == 0, let p { return "\(String(cString: p)) (\(code))" }
        return "CUDA error \(code)"
    }
}

/// NVRTC on its own: compiles CUDA C++ to PTX without a GPU (the compiler is a plain library),
/// so the kernel sources can be checked on a machine that has the library and no device.
enum NVRTC {
    /// PTX for `source`, or the compiler's log as the error.
    static func compile(_ lib: CUDALibraries, source: String, name: String, options: [String]) throws -> [CChar] {
        var program: OpaquePointer? = nil
        var status = source.withCString { src in name.withCString { nm in lib.nvrtcCreateProgram(&program, src, nm, 0, nil, nil) } }
        guard status == 0 else { throw DeviceError.unavailable("nvrtcCreateProgram failed (\(status))") }
        defer { _ = lib.nvrtcDestroyProgram(&program) }
        let cOptions = options.map { strdup($0) }
        defer { cOptions.forEach { free($0) } }
        status = cOptions.map { UnsafePointer<CChar>($0) }.withUnsafeBufferPointer { opts in
            lib.nvrtcCompileProgram(program, Int32(opts.count), opts.baseAddress)
        }
        if status != 0 {
            var logSize = 0
            _ = lib.nvrtcGetProgramLogSize(program, &logSize)
            var log = [CChar](repeating: 0, count: max(logSize, 1))
            _ = lib.nvrtcGetProgramLog(program, &log)
            throw DeviceError.unavailable("NVRTC could not compile \(name) (\(status)):\n\(String(decoding: log.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self))")
        }
        var size = 0
        _ = lib.nvrtcGetPTXSize(program, &size)
        var ptx = [CChar](repeating: 0, count: size)
        _ = lib.nvrtcGetPTX(program, &ptx)
        return ptx
    }
}
