import Foundation
import XCTest
import TopiaryTestSupport

/// topiary runs itself again with the fastest OpenBLAS kernel the CPU allows when OpenBLAS chose
/// a slower one, unless OPENBLAS_CORETYPE is set or TOPIARY_OPENBLAS_AUTO=0.
final class BLASKernelCLITests: XCTestCase {
    func kernel(_ environment: [String: String?]) throws -> String {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: CLI.binary)
        p.arguments = ["inspect", "--blas-kernel"]
        var env = ProcessInfo.processInfo.environment
        for (k, v) in environment { env[k] = v }
        p.environment = env
        let out = Pipe()
        p.standardOutput = out
        try p.run()
        let data = out.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        XCTAssertEqual(p.terminationStatus, 0)
        return String(decoding: data, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
    }

    static func level(_ name: String) -> Int {
        switch name.lowercased() {
        case "skylakex", "cooperlake", "sapphirerapids": return 3
        case "haswell", "zen": return 2
        case "sandybridge": return 1
        default: return 0
        }
    }

    func testTheChosenKernelIsNoSlowerThanOpenBLASsOwnAndTheUserCanPinIt() throws {
        let own = try kernel(["OPENBLAS_CORETYPE": nil, "TOPIARY_OPENBLAS_AUTO": "0"])
        let chosen = try kernel(["OPENBLAS_CORETYPE": nil, "TOPIARY_OPENBLAS_AUTO": nil])
        XCTAssertFalse(own.isEmpty)
        XCTAssertGreaterThanOrEqual(Self.level(chosen), Self.level(own), "own \(own), chosen \(chosen)")
        // What the CPU's flags allow, as /proc/cpuinfo says.
        let flags = (try? String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8))?.split(separator: "\n")
            .first { $0.hasPrefix("flags") }.map { Set($0.split(separator: " ").map(String.init)) } ?? []
        let allowed = ["avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"].allSatisfy(flags.contains) ? 3
            : flags.contains("avx2") && flags.contains("fma") ? 2 : flags.contains("avx") ? 1 : 0
        XCTAssertEqual(Self.level(chosen), max(allowed, Self.level(own)), "own \(own), chosen \(chosen), flags allow level \(allowed)")
        // A kernel the user names is kept, even a slower one.
        XCTAssertEqual(try kernel(["OPENBLAS_CORETYPE": "Prescott", "TOPIARY_OPENBLAS_AUTO": nil]).lowercased(), "prescott")
    }
}
