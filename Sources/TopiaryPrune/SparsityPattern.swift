/// Which weights a solver may zero: a fraction of each matrix, or N of every M consecutive
/// inputs of each output row.
public enum SparsityPattern: Sendable, Equatable, CustomStringConvertible, Codable {
    case unstructured(Double)
    case nOfM(n: Int, m: Int)

    /// The fraction of weights this pattern removes.
    public var fraction: Double {
        switch self {
        case .unstructured(let s): return s
        case .nOfM(let n, let m): return Double(n) / Double(m)
        }
    }

    public var description: String {
        switch self {
        case .unstructured(let s): return "\(Int((s * 100).rounded()))%"
        case .nOfM(let n, let m): return "\(n):\(m)"
        }
    }

    /// Parses `--sparsity S` (a fraction in (0, 1)) or `--pattern N:M` (0 < N < M), exactly one.
    public static func parse(sparsity: String?, pattern: String?) throws -> SparsityPattern {
        switch (sparsity, pattern) {
        case (nil, nil): throw PruneError.invalidOption("give --sparsity S (a fraction such as 0.5) or --pattern N:M (such as 2:4)")
        case (.some, .some): throw PruneError.invalidOption("--sparsity and --pattern exclude each other; give one")
        case (let s?, nil):
            guard let v = Double(s), v.isFinite else { throw PruneError.invalidOption("--sparsity expects a number, got '\(s)'") }
            guard v > 0 && v < 1 else { throw PruneError.invalidOption("--sparsity must be strictly between 0 and 1, got \(s)") }
            return .unstructured(v)
        case (nil, let p?):
            let parts = p.split(separator: ":", omittingEmptySubsequences: false)
            guard parts.count == 2, let n = Int(parts[0]), let m = Int(parts[1]) else {
                throw PruneError.invalidOption("--pattern expects N:M such as 2:4, got '\(p)'")
            }
            guard n > 0 && m > 0 && n < m else { throw PruneError.invalidOption("--pattern N:M needs 0 < N < M, got \(n):\(m)") }
            return .nOfM(n: n, m: m)
        }
    }
}

/// Errors of the pruning layer, each naming the option, block or layer at fault.
public enum PruneError: Error, CustomStringConvertible, Equatable {
    case invalidOption(String)
    case calibration(String)
    /// A file that is not what its option expects (token ids, ...): the message names the file.
    case input(String)
    case numerical(String)
    case shape(String)

    public var description: String {
        switch self {
        case .invalidOption(let s): return s
        case .calibration(let s): return "calibration: \(s)"
        case .input(let s): return s
        case .numerical(let s): return s
        case .shape(let s): return s
        }
    }
}
