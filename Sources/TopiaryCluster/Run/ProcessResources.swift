import Foundation

/// The calling process's memory and storage I/O, from Linux's /proc/self files (nil elsewhere).
public enum ProcessResources {
    /// Resident set now (`VmRSS`) and at its peak (`VmHWM`), in bytes.
    public static var residentBytes: Int? { statusBytes(procText("/proc/self/status"), key: "VmRSS") }
    public static var peakResidentBytes: Int? { statusBytes(procText("/proc/self/status"), key: "VmHWM") }

    /// Bytes read and written through the storage layer (/proc/self/io's `read_bytes` and
    /// `write_bytes`: page-cache misses and write-back, not reads served from the cache).
    public static var io: (read: Int, write: Int)? { ioBytes(procText("/proc/self/io")) }

    /// The value of `key` in /proc/PID/status text (`VmHWM:\t14463048 kB`: the kernel pads the
    /// number with spaces to 8 characters, so a value of 8 digits or more follows the tab
    /// directly), in bytes.
    public static func statusBytes(_ text: String?, key: String) -> Int? {
        guard let text else { return nil }
        for line in text.split(separator: "\n") where line.hasPrefix(key + ":") {
            let fields = line.dropFirst(key.count + 1).split(whereSeparator: { $0 == " " || $0 == "\t" })
            guard let value = fields.first.flatMap({ Int($0) }) else { return nil }
            let unit = fields.dropFirst().first.map(String.init) ?? ""
            return unit == "kB" ? value * 1024 : value
        }
        return nil
    }

    /// `read_bytes` and `write_bytes` from /proc/PID/io text.
    public static func ioBytes(_ text: String?) -> (read: Int, write: Int)? {
        guard let text else { return nil }
        var read: Int?, write: Int?
        for line in text.split(separator: "\n") {
            let parts = line.split(separator: ":", maxSplits: 1)
            guard parts.count == 2, let v = Int(parts[1].trimmingCharacters(in: .whitespaces)) else { continue }
            if parts[0] == "read_bytes" { read = v }
            if parts[0] == "write_bytes" { write = v }
        }
        guard let read, let write else { return nil }
        return (read, write)
    }

    static func procText(_ path: String) -> String? { try? String(contentsOfFile: path, encoding: .utf8) }
}
