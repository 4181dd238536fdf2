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

/// The memory this process may use: the machine's physical memory, or less where a control
/// group limits it (a Slurm job's `--mem` under `task/cgroup`, a container's limit). The default
/// `--memory-budget` is a quarter of it, and `prune` refuses up front a run whose largest block
/// would not fit in it (`MemoryCheck`), instead of being killed hours in.
public struct MemoryLimit: Sendable, Equatable {
    public var bytes: Int
    /// Where the limit comes from: "physical memory" or the control group file that sets it.
    public var source: String

    /// This process's limit, from /proc/self/cgroup, /proc/self/mountinfo and the limit files
    /// (cgroup v2's `memory.max`, v1's `memory.limit_in_bytes`) of its group and every group
    /// above it within the mount; the least of them and the physical memory.
    public static var current: MemoryLimit {
        let physical = Int(clamping: ProcessInfo.processInfo.physicalMemory)
        return resolve(physical: physical, cgroup: ProcessResources.procText("/proc/self/cgroup"),
                       mountinfo: ProcessResources.procText("/proc/self/mountinfo"), read: ProcessResources.procText)
    }

    /// `current` from the texts of /proc/self/cgroup and /proc/self/mountinfo, and `read` for
    /// the limit files (nil where a file is absent). A limit file that says `max`, or a number
    /// at or above the physical memory, sets no limit.
    public static func resolve(physical: Int, cgroup: String?, mountinfo: String?, read: (String) -> String?) -> MemoryLimit {
        var best = MemoryLimit(bytes: physical > 0 ? physical : Int.max, source: "physical memory")
        guard let cgroup, let mountinfo else { return best }
        for (mount, root, version) in cgroupMounts(mountinfo) {
            // The process's group in this hierarchy: v2 is the "0::" line, v1 the line naming memory.
            let path = cgroup.split(separator: "\n").lazy.compactMap { line -> String? in
                let fields = line.split(separator: ":", maxSplits: 2, omittingEmptySubsequences: false)
                guard fields.count == 3 else { return nil }
                if version == 2 { return fields[0] == "0" && fields[1].isEmpty ? String(fields[2]) : nil }
                return fields[1].split(separator: ",").contains("memory") ? String(fields[2]) : nil
            }.first
            guard var path else { continue }
            // The group's path as seen inside the mount (a container's mount starts below /).
            if root != "/" {
                guard path == root || path.hasPrefix(root + "/") else { continue }
                path = String(path.dropFirst(root.count))
            }
            let file = version == 2 ? "memory.max" : "memory.limit_in_bytes"
            var parts = path.split(separator: "/").map(String.init)
            while true {
                let location = ([mount] + parts + [file]).joined(separator: "/")
                if let text = read(location)?.trimmingCharacters(in: .whitespacesAndNewlines),
                   let value = Int(text), value > 0, value < best.bytes {
                    best = MemoryLimit(bytes: value, source: location)
                }
                if parts.isEmpty { break }
                parts.removeLast()
            }
        }
        return best
    }

    /// The cgroup mounts that carry memory limits in /proc/self/mountinfo text: (mount point,
    /// root within the hierarchy, version). v1 mounts count only with the memory controller.
    static func cgroupMounts(_ mountinfo: String) -> [(String, String, Int)] {
        mountinfo.split(separator: "\n").compactMap { line in
            // "36 25 0:31 / /sys/fs/cgroup/memory rw,... shared:15 - cgroup cgroup rw,memory"
            let halves = line.components(separatedBy: " - ")
            guard halves.count == 2 else { return nil }
            let fields = halves[0].split(separator: " "), tail = halves[1].split(separator: " ")
            guard fields.count >= 5, tail.count >= 3 else { return nil }
            let (root, mount) = (unescape(String(fields[3])), unescape(String(fields[4])))
            switch tail[0] {
            case "cgroup2": return (mount, root, 2)
            case "cgroup" where tail[2].split(separator: ",").contains("memory"): return (mount, root, 1)
            default: return nil
            }
        }
    }

    /// mountinfo writes space, tab, newline and backslash in paths as octal escapes (\040).
    private static func unescape(_ s: String) -> String {
        guard s.contains("\\") else { return s }
        var out = [UInt8](), bytes = Array(s.utf8), i = 0
        while i < bytes.count {
            if bytes[i] == UInt8(ascii: "\\"), i + 3 < bytes.count,
               let v = UInt8(String(decoding: bytes[i + 1...i + 3], as: UTF8.self), radix: 8) {
                out.append(v)
                i += 4
            } else {
                out.append(bytes[i])
                i += 1
            }
        }
        return String(decoding: out, as: UTF8.self)
    }

    /// "23.4 GiB" and the like, for messages.
    public static func describe(_ bytes: Int) -> String {
        let units = ["B", "KiB", "MiB", "GiB", "TiB"]
        var v = Double(bytes), u = 0
        while v >= 1024, u < units.count - 1 { v /= 1024; u += 1 }
        return u == 0 ? "\(bytes) B" : "\(String(format: "%.1f", v)) \(units[u])"
    }
}
