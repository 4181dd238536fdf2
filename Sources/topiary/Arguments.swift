import Foundation

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
                throw UsageError(message: "topiary \(command): unknown option '--\(name)' (see 'topiary help \(command)')")
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
        guard let s = values[name] else { return nil }
        guard let v = Int(s) else { throw UsageError(message: "topiary \(command): option '--\(name)' expects an integer, got '\(s)'") }
        guard v >= min else { throw UsageError(message: "topiary \(command): option '--\(name)' must be at least \(min), got \(v)") }
        return v
    }

    func double(_ name: String) throws -> Double? {
        guard let s = values[name] else { return nil }
        guard let v = Double(s), v.isFinite else { throw UsageError(message: "topiary \(command): option '--\(name)' expects a number, got '\(s)'") }
        return v
    }
}
