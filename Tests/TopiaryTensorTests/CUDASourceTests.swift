import XCTest
@testable import TopiaryTensor

/// What of the CUDA backend can be checked without a GPU: its kernel table against its source,
/// and, where NVRTC is installed (it is a plain library, no device needed), that the source
/// compiles. The device itself is checked by scripts/cuda-check.
final class CUDASourceTests: XCTestCase {
    func testEveryKernelTheBackendLooksUpIsDefinedOnce() {
        let source = CUDAKernelSource.text
        XCTAssertEqual(Set(CUDAKernelSource.names).count, CUDAKernelSource.names.count)
        for name in CUDAKernelSource.names {
            let definitions = source.components(separatedBy: "__global__ void \(name)(").count - 1
            XCTAssertEqual(definitions, 1, "kernel \(name) is defined \(definitions) times")
        }
        // Every __global__ in the source is in the table (a kernel nobody can launch is dead code).
        let defined = source.components(separatedBy: "__global__ void ").dropFirst().map { $0.prefix { $0 != "(" } }
        XCTAssertEqual(Set(defined.map(String.init)), Set(CUDAKernelSource.names))
        XCTAssertTrue(source.contains("float row[\(CUDAKernelSource.sparseGPTMaxColumns)]"))
    }

    func testKernelSourceCompilesWhereNVRTCIsInstalled() throws {
        guard let (handle, _) = try? CUDALibraries.open("NVRTC", CUDALibraries.nvrtcNames) else {
            throw XCTSkip("NVRTC is not installed here (scripts/cuda-check compiles the kernels on a GPU machine)")
        }
        defer { dlclose(handle) }
        // CUDALibraries binds NVRTC together with the driver; without a driver, bind the two calls here.
        typealias Create = @convention(c) (UnsafeMutablePointer<OpaquePointer?>, UnsafePointer<CChar>, UnsafePointer<CChar>?, Int32,
                                           UnsafePointer<UnsafePointer<CChar>?>?, UnsafePointer<UnsafePointer<CChar>?>?) -> Int32
        typealias Compile = @convention(c) (OpaquePointer?, Int32, UnsafePointer<UnsafePointer<CChar>?>?) -> Int32
        typealias Destroy = @convention(c) (UnsafeMutablePointer<OpaquePointer?>) -> Int32
        let create = unsafeBitCast(try XCTUnwrap(dlsym(handle, "nvrtcCreateProgram")), to: Create.self)
        let compile = unsafeBitCast(try XCTUnwrap(dlsym(handle, "nvrtcCompileProgram")), to: Compile.self)
        let destroy = unsafeBitCast(try XCTUnwrap(dlsym(handle, "nvrtcDestroyProgram")), to: Destroy.self)
        var program: OpaquePointer? = nil
        XCTAssertEqual(CUDAKernelSource.text.withCString { create(&program, $0, "topiary_kernels.cu", 0, nil, nil) }, 0)
        defer { _ = destroy(&program) }
        let flags: [String] = ["--gpu-architecture=compute_75", "--fmad=false"]
        let options: [UnsafeMutablePointer<CChar>] = flags.map { strdup($0)! }
        defer { options.forEach { free($0) } }
        let pointers: [UnsafePointer<CChar>?] = options.map { UnsafePointer($0) }
        let status = pointers.withUnsafeBufferPointer { compile(program, Int32($0.count), $0.baseAddress) }
        XCTAssertEqual(status, 0, "NVRTC could not compile CUDAKernelSource.text")
    }
}
