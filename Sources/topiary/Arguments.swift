import Foundation

/// Upper bounds of numeric options: where a value allocates memory, starts processes or becomes a
/// timeout, a mistyped value is refused before any work instead of exhausting the machine.
enum Limits {
    static let threads = 4096
    /// Worker processes (--workers) and worker addresses (--hosts).
    static let workers = 1024
    static let calibSamples = 1 << 16
    /// Evaluation windows (more than the text has are not evaluated anyway).
    static let windows = 1 << 24
    static let blocksize = 1 << 16
    static let patternM = 1024
    static let percdamp = 1e6
    static let iterations = 1000
    static let rounds = 1000
    static let epochs = 1000
    /// Bytes of --memory-budget: 1024T.
    static let memoryBudget = 1 << 50
    /// Seconds of a timeout or interval: a week.
    static let seconds = 7 * 24 * 3600.0
}

/// A command-line usage error: exit code 2 and a pointer to `topiary help COMMAND`.
struct UsageError: Error, CustomStringConvertible {
    let message: String
    var description: String { message }
}

/// One option a command accepts.
struct OptionSpec: Sendable {
    let name: String          // without the leading "--"
    let value: String?        // placeholder of its value; nil for a flag
    let help: String
    var isFlag: Bool { value == nil }
}

/// Parsed options of one command: `--name value`, `--name=value` and `--flag`.
struct ParsedArguments {
    let command: String
    private(set) var values: [String: String] = [:]
    private(set) var flags: Set<String> = []

    init(command: String, arguments: [String], specs: [OptionSpec]) throws {
        self.command = command
        let byName = Dictionary(specs.map { ($0.name, $0) }, uniquingKeysWith: { a, _ in a })
        var i = 0
        while i < arguments.count {
            let arg = arguments[i]
            guard arg.hasPrefix("--"), arg.count > 2 else {
                throw UsageError(message: "topiary \(command): unexpected argument '\(arg)' (options start with --; see 'topiary help \(command)')")
            }
            var name = String(arg.dropFirst(2))
            var inlineValue: String?
            if let eq = name.firstIndex(of: "=") {
                inlineValue = String(name[name.index(after: eq)...])
                name = String(name[..<eq])
            }
            guard let spec = byName[name] else {
                let hint = Suggestion.closest(to: name, among: specs.map(\.name)).map { "did you mean '--\($0)'? " } ?? ""
                throw UsageError(message: "topiary \(command): unknown option '--\(name)' (\(hint)see 'topiary help \(command)')")
            }
            if spec.isFlag {
                if inlineValue != nil { throw UsageError(message: "topiary \(command): option '--\(name)' takes no value") }
                flags.insert(name)
            } else {
                let value: String
                if let inlineValue { value = inlineValue } else {
                    guard i + 1 < arguments.count else {
                        throw UsageError(message: "topiary \(command): option '--\(name)' needs a value \(spec.value!)")
                    }
                    i += 1
                    value = arguments[i]
                }
                if values[name] != nil { throw UsageError(message: "topiary \(command): option '--\(name)' given twice") }
                values[name] = value
            }
            i += 1
        }
    }

    /// Options as data (a resumed run's, read back from run.json).
    init(command: String, values: [String: String], flags: Set<String>) {
        self.command = command
        self.values = values
        self.flags = flags
    }

    func flag(_ name: String) -> Bool { flags.contains(name) }
    var allValues: [String: String] { values }
    var allFlags: Set<String> { flags }
    func string(_ name: String) -> String? { values[name] }

    func required(_ name: String) throws -> String {
        guard let v = values[name] else {
            throw UsageError(message: "topiary \(command): missing required option '--\(name)' (see 'topiary help \(command)')")
        }
        return v
    }

    func int(_ name: String, min: Int = Int.min) throws -> Int? {
        try int(name, in: min...Int.max)
    }

    /// An integer option within `range`; the message names the option, the range and the value.
    func int(_ name: String, in range: ClosedRange<Int>) throws -> Int? {
        guard let s = values[name] else { return nil }
        func bounds() -> String {
            switch (range.lowerBound == Int.min, range.upperBound == Int.max) {
            case (true, true): return ""
            case (false, true): return " of at least \(range.lowerBound)"
            case (true, false): return " of at most \(range.upperBound)"
            case (false, false): return " from \(range.lowerBound) to \(range.upperBound)"
            }
        }
        guard let v = Int(s.trimmingCharacters(in: .whitespaces)) else {
            let tooLarge = !s.isEmpty && s.allSatisfy { $0.isASCII && $0.isNumber || $0 == "-" || $0 == "+" }
            throw UsageError(message: "topiary \(command): option '--\(name)' expects an integer\(bounds()), got '\(s)'\(tooLarge ? " (out of range)" : "")")
        }
        guard range.contains(v) else {
            throw UsageError(message: "topiary \(command): option '--\(name)' must be an integer\(bounds()), got \(v)")
        }
        return v
    }

    /// A finite number; `range` bounds it (inclusive) when given.
    func double(_ name: String, in range: ClosedRange<Double>? = nil) throws -> Double? {
        guard let s = values[name] else { return nil }
        guard let v = Double(s.trimmingCharacters(in: .whitespaces)), v.isFinite else {
            throw UsageError(message: "topiary \(command): option '--\(name)' expects a number, got '\(s)'")
        }
        if let range, !range.contains(v) {
            throw UsageError(message: "topiary \(command): option '--\(name)' must be from \(Self.format(range.lowerBound)) to \(Self.format(range.upperBound)), got \(s)")
        }
        return v
    }

    static func format(_ v: Double) -> String { v == v.rounded() && abs(v) < 1e15 ? String(Int(v)) : "\(v)" }
}

/// "Did you mean" for near misses: the candidate within a small edit distance (or the only one
/// that starts with what was typed).
enum Suggestion {
    static func closest(to word: String, among candidates: [String]) -> String? {
        let limit = max(1, min(3, word.count / 3))
        var best: (String, Int)?
        for c in candidates {
            let d = distance(word, c)
            if d <= limit, best == nil || d < best!.1 { best = (c, d) }
        }
        if let best { return best.0 }
        let prefixed = candidates.filter { $0.hasPrefix(word) || (word.count >= 4 && word.hasPrefix($0)) }
        return prefixed.count == 1 ? prefixed[0] : nil
    }

    /// Levenshtein distance (insertions, deletions, substitutions; a swap of neighbours counts 1).
    static func distance(_ a: String, _ b: String) -> Int {
        let x = Array(a), y = Array(b)
        if x.isEmpty { return y.count }
        if y.isEmpty { return x.count }
        var d = [[Int]](repeating: [Int](repeating: 0, count: y.count + 1), count: x.count + 1)
        for i in 0...x.count { d[i][0] = i }
        for j in 0...y.count { d[0][j] = j }
        for i in 1...x.count {
            for j in 1...y.count {
                d[i][j] = Swift.min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (x[i - 1] == y[j - 1] ? 0 : 1))
                if i > 1, j > 1, x[i - 1] == y[j - 2], x[i - 2] == y[j - 1] { d[i][j] = Swift.min(d[i][j], d[i - 2][j - 2] + 1) }
            }
        }
        return d[x.count][y.count]
    }
}
