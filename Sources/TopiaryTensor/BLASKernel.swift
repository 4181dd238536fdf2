#if canImport(Glibc)
import Glibc
#endif
import Foundation
import CBLAS

/// Which of OpenBLAS's kernels runs, and choosing a better one than OpenBLAS chose.
///
/// OpenBLAS built with DYNAMIC_ARCH (Debian's) picks its kernel from the CPU's family and model
/// numbers when the library loads. On a virtual machine that reports a generic CPU ("Intel(R)
/// Xeon(R) Processor") it falls back to Prescott, an SSE3 kernel, even where the CPU has AVX-512:
/// measured on such a machine, sgemm ran at 19 GFLOP/s with Prescott, 61 with Haswell and 96
/// with SkylakeX (one thread, 2048^3). The kernel is read from OPENBLAS_CORETYPE only at load, so
/// `preferExecutable` runs the program again with it set, once, before it does anything else.
public enum BLASKernel {
    /// The kernel OpenBLAS is running ("Prescott", "Haswell", "SkylakeX", ...).
    public static var current: String { String(cString: openblas_get_corename()) }

    /// The fastest kernel this CPU's instruction sets allow, from /proc/cpuinfo's flags: SkylakeX
    /// with AVX-512 (F, CD, BW, DQ, VL), Haswell with AVX2 and FMA, Sandybridge with AVX; nil
    /// when none applies or the flags cannot be read.
    public static var preferred: String? {
        guard let info = try? String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8),
              let line = info.split(separator: "\n").first(where: { $0.hasPrefix("flags") }) else { return nil }
        let flags = Set(line.split(separator: ":").last?.split(separator: " ").map(String.init) ?? [])
        if ["avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"].allSatisfy(flags.contains) { return "SkylakeX" }
        if flags.contains("avx2") && flags.contains("fma") { return "Haswell" }
        if flags.contains("avx") { return "Sandybridge" }
        return nil
    }

    /// 3: AVX-512 kernels, 2: AVX2, 1: AVX, 0: older or unknown.
    static func level(_ name: String) -> Int {
        switch name.lowercased() {
        case "skylakex", "cooperlake", "sapphirerapids": return 3
        case "haswell", "zen": return 2
        case "sandybridge", "bulldozer", "piledriver", "steamroller", "excavator": return 1
        default: return 0
        }
    }

    /// Whether this process would be re-run with a better kernel: OPENBLAS_CORETYPE unset,
    /// TOPIARY_OPENBLAS_AUTO not "0", and a preferred kernel above the current one.
    public static var upgrade: String? {
        let env = ProcessInfo.processInfo.environment
        guard env["OPENBLAS_CORETYPE"] == nil, env["TOPIARY_OPENBLAS_AUTO"] != "0", let best = preferred else { return nil }
        return level(best) > level(current) ? best : nil
    }

    /// For an executable's first line: when `upgrade` names a kernel, sets OPENBLAS_CORETYPE to it
    /// and runs the same program again with the same arguments (execv; nothing runs before it).
    /// Returns only when nothing is to be done or the exec failed.
    public static func preferExecutable() {
        guard let best = upgrade else { return }
        setenv("OPENBLAS_CORETYPE", best, 1)
        execv("/proc/self/exe", CommandLine.unsafeArgv)
        // The exec failed (no /proc): carry on with the kernel we have.
        unsetenv("OPENBLAS_CORETYPE")
    }
}
