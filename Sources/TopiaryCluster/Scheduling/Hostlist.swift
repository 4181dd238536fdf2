/// Slurm's compact host lists (SLURM_JOB_NODELIST): `node[01-04,07],gpu-a[1-2]` is node01,
/// node02, node03, node04, node07, gpu-a1, gpu-a2. Ranges keep their zero padding; several
/// bracket groups in one name expand to every combination (`r[1-2]n[1-2]`: r1n1, r1n2, r2n1, r2n2).
public enum Hostlist {
    public struct ParseError: Error, CustomStringConvertible {
        public let description: String
    }

    /// The host names of `list`, in order.
    public static func expand(_ list: String) throws -> [String] {
        var hosts: [String] = []
        for item in try splitTopLevel(list) where !item.isEmpty {
            hosts += try expandName(Substring(item), whole: list)
        }
        guard !hosts.isEmpty else { throw ParseError(description: "host list '\(list)' names no hosts") }
        return hosts
    }

    /// Slurm's compact task counts per node (SLURM_TASKS_PER_NODE): `2(x3),1` is 2, 2, 2, 1.
    /// Every count is at least 1; a repeat `(xN)` is at least 1 and at most 100000.
    public static func taskCounts(_ list: String) throws -> [Int] {
        var counts: [Int] = []
        let items = list.split(separator: ",", omittingEmptySubsequences: false)
        for raw in items {
            let item = String(raw.filter { $0 != " " })
            var count = Substring(item), repeats = 1
            if let open = item.firstIndex(of: "(") {
                guard item.hasSuffix(")"), item[item.index(after: open)...].hasPrefix("x"),
                      let n = Int(item[item.index(open, offsetBy: 2)..<item.index(before: item.endIndex)]),
                      (1...100_000).contains(n) else {
                    throw ParseError(description: "tasks per node '\(list)': '\(item)' is not N or N(xR) with R at least 1")
                }
                count = item[..<open]
                repeats = n
            }
            guard count.allSatisfy(\.isNumber), let n = Int(count), (1...100_000).contains(n) else {
                throw ParseError(description: "tasks per node '\(list)': '\(item)' is not N or N(xR) with N at least 1")
            }
            counts += Array(repeating: n, count: repeats)
        }
        return counts
    }

    /// Splits on commas outside brackets.
    static func splitTopLevel(_ s: String) throws -> [String] {
        var items: [String] = []
        var current = ""
        var depth = 0
        for ch in s {
            switch ch {
            case "[": depth += 1; current.append(ch)
            case "]":
                depth -= 1
                guard depth >= 0 else { throw ParseError(description: "host list '\(s)': ']' without '['") }
                current.append(ch)
            case "," where depth == 0: items.append(current); current = ""
            case " ", "\n", "\t" where depth == 0: continue
            default: current.append(ch)
            }
        }
        guard depth == 0 else { throw ParseError(description: "host list '\(s)': '[' without ']'") }
        items.append(current)
        return items
    }

    /// The most hosts one bracketed range, or one name with its ranges, may name (a typo's
    /// guard: no allocation is larger).
    static let maximumRange = 100_000

    static func expandName(_ name: Substring, whole: String) throws -> [String] {
        guard let open = name.firstIndex(of: "[") else { return [String(name)] }
        guard let close = name[open...].firstIndex(of: "]") else {
            throw ParseError(description: "host list '\(whole)': '[' without ']'")
        }
        let prefix = String(name[..<open])
        let rest = try expandName(name[name.index(after: close)...], whole: whole)
        var out: [String] = []
        for piece in name[name.index(after: open)..<close].split(separator: ",", omittingEmptySubsequences: false) {
            let bounds = piece.split(separator: "-", omittingEmptySubsequences: false)
            guard (1...2).contains(bounds.count), bounds.allSatisfy({ !$0.isEmpty && $0.allSatisfy({ ("0"..."9").contains($0) }) }) else {
                throw ParseError(description: "host list '\(whole)': '\(piece)' is not a number or a range N-M with N <= M")
            }
            guard let lo = Int(bounds[0]), let hi = Int(bounds.last!) else {
                throw ParseError(description: "host list '\(whole)': '\(piece)' has a number too large to be a host's index")
            }
            guard lo <= hi else {
                throw ParseError(description: "host list '\(whole)': range '\(piece)' runs backwards; write N-M with N <= M")
            }
            guard hi - lo < Self.maximumRange else {
                throw ParseError(description: "host list '\(whole)': range '\(piece)' names \(hi - lo + 1) hosts, more than the \(Self.maximumRange) one range may name")
            }
            let width = bounds[0].count
            guard out.count + (hi - lo + 1) * rest.count <= Self.maximumRange else {
                throw ParseError(description: "host list '\(whole)': '\(name)' names more than the \(Self.maximumRange) hosts one name may expand to")
            }
            for n in lo...hi {
                var digits = String(n)
                if digits.count < width { digits = String(repeating: "0", count: width - digits.count) + digits }
                for suffix in rest { out.append(prefix + digits + suffix) }
            }
        }
        return out
    }
}
