import Foundation

/// A compute device as the command line names it: `cpu` or `cuda[:N]`.
public enum ComputeDevice: Equatable, Sendable, CustomStringConvertible {
    case cpu
    case cuda(index: Int)

    /// The highest CUDA device index `--device cuda:N` accepts.
    public static let maxCUDAIndex = 63

    /// Parses `cpu`, `cuda` (device 0) or `cuda:N`.
    public static func parse(_ text: String) throws -> ComputeDevice {
        if text == "cpu" { return .cpu }
        if text == "cuda" { return .cuda(index: 0) }
        if text.hasPrefix("cuda:") {
            let digits = text.dropFirst("cuda:".count)
            guard !digits.isEmpty, digits.allSatisfy({ $0.isASCII && $0.isNumber }), let n = Int(digits) else {
                throw DeviceError.invalid("--device cuda:N expects a device number N, got '\(text)'")
            }
            guard n <= maxCUDAIndex else { throw DeviceError.invalid("--device cuda:N: N must be 0...\(maxCUDAIndex), got \(n)") }
            return .cuda(index: n)
        }
        throw DeviceError.invalid("--device expects cpu, cuda or cuda:N, got '\(text)'")
    }

    public var description: String {
        switch self {
        case .cpu: return "cpu"
        case .cuda(let n): return "cuda:\(n)"
        }
    }
}

/// The arithmetic a run computes in, as `--precision` names it: Float32 on the chosen device
/// (the default), or Float64 on the CPU (`Float64Backend`), the yardstick for fp32's rounding error.
public enum ComputePrecision: String, Sendable, CaseIterable {
    case f32, f64

    /// Parses `f32` or `f64`; the error names the option and the value found.
    public static func parse(_ text: String) throws -> ComputePrecision {
        guard let p = ComputePrecision(rawValue: text) else {
            throw DeviceError.invalid("--precision expects f32 or f64, got '\(text)'")
        }
        return p
    }
}

public enum DeviceError: Error, CustomStringConvertible, Equatable {
    case invalid(String)
    case unavailable(String)

    public var description: String {
        switch self {
        case .invalid(let s), .unavailable(let s): return s
        }
    }
}

/// What this build and this machine offer, and the backend for a device.
public enum ComputeDevices {
    /// The backend that runs on `device`, or a one-line error naming what is missing.
    public static func backend(for device: ComputeDevice) throws -> any ComputeBackend {
        switch device {
        case .cpu:
            return CPUBackend()
        case .cuda(let index):
            do { return try CUDABackend(device: index) } catch let error as DeviceError {
                throw DeviceError.unavailable("\(device): \(error)")
            }
        }
    }

    /// The backend for `device` at `precision`: Float64 exists on the CPU only.
    public static func backend(for device: ComputeDevice, precision: ComputePrecision) throws -> any ComputeBackend {
        guard precision == .f64 else { return try backend(for: device) }
        guard device == .cpu else {
            throw DeviceError.unavailable("--precision f64 runs on the CPU only (Float64Backend); there is no Float64 backend for \(device)")
        }
        return Float64Backend()
    }

    /// The backend drivers use when none is passed to them: the CPU, or what `--device` chose
    /// (set once at start-up, before any work, as `--threads` is).
    public static var defaultBackend: any ComputeBackend { selected }

    public static func setDefaultBackend(_ backend: any ComputeBackend) { selected = backend }

    nonisolated(unsafe) private static var selected: any ComputeBackend = CPUBackend()

    /// Whether the CUDA driver library can be loaded where the CUDA backend looks for it (it is
    /// opened and closed again).
    public static var cudaDriverFound: Bool {
        guard let (handle, _) = try? CUDALibraries.open("CUDA driver library", CUDALibraries.driverNames) else { return false }
        dlclose(handle)
        return true
    }

    /// One line per device kind, for `topiary inspect --devices`.
    public struct Description: Sendable, Codable, Equatable {
        public var device: String
        public var available: Bool
        public var detail: String
    }

    public static func describe() -> [Description] {
        let cpu = CPUBackend()
        return [
            Description(device: "cpu", available: true,
                        detail: "\(cpu.name); \(ProcessInfo.processInfo.activeProcessorCount) cores; \(CPUBackend.libraryConfig)"),
        ] + cudaDescriptions()
    }

    /// One line per CUDA device, or one saying what is missing (the driver, cuBLAS, NVRTC).
    static func cudaDescriptions() -> [Description] {
        do {
            let n = try CUDADevice.count()
            if n == 0 { return [Description(device: "cuda", available: false, detail: "the driver reports no CUDA device")] }
            return (0..<n).map { i in
                do { return Description(device: "cuda:\(i)", available: true, detail: try CUDADevice.shared(i).summary) }
                catch { return Description(device: "cuda:\(i)", available: false, detail: "\(error)") }
            }
        } catch {
            return [Description(device: "cuda", available: false, detail: "\(error)")]
        }
    }
}
