import Foundation
import TopiaryCluster

/// Writes the one JSON object that `--json` promises as the last line of stdout: the command's
/// result, or, when it fails, `{"command": ..., "error": "the message printed on stderr"}`.
enum JSONLine {
    static func print(_ object: [String: Any]) {
        let data = (try? JSONSerialization.data(withJSONObject: sanitized(object), options: [.sortedKeys, .withoutEscapingSlashes]))
            ?? (try? JSONSerialization.data(withJSONObject: ["error": "the result could not be written as JSON"]))
            ?? Data(#"{"error":"the result could not be written as JSON"}"#.utf8)
        Swift.print(String(decoding: data, as: UTF8.self))
    }

    /// The line for a command that failed with `message` (exit status 1 or 2).
    static func printError(command: String?, message: String) {
        var object: [String: Any] = ["error": message]
        if let command { object["command"] = command }
        print(object)
    }

    /// `value` with NaN and infinities as null (JSON has no spelling for them).
    static func sanitized(_ value: Any) -> Any {
        switch value {
        case let d as Double: return d.isFinite ? d : NSNull()
        case let f as Float: return f.isFinite ? f : NSNull()
        case let dict as [String: Any]: return dict.mapValues(sanitized)
        case let list as [Any]: return list.map(sanitized)
        default: return value
        }
    }
}

/// Human-facing messages go to stderr so that stdout stays parseable. A progress bar redraws its
/// line with "\r"; a message written while such a line is open ends it first, so that the message
/// (a lost worker, SIGINT) starts on a line of its own and the bar continues below it.
enum Console {
    private static let lock = NSLock()
    nonisolated(unsafe) private static var lineOpen = false

    static func error(_ message: String) { write(message + "\n") }
    static func info(_ message: String) { write(message + "\n") }

    /// Redraws the open status line (a progress bar): `text` starts with "\r" and ends without a newline.
    static func status(_ text: String) {
        lock.lock()
        defer { lock.unlock() }
        FileHandle.standardError.write(Data(text.utf8))
        lineOpen = true
    }

    /// Ends the open status line, if any.
    static func endStatus() {
        lock.lock()
        defer { lock.unlock() }
        if lineOpen { FileHandle.standardError.write(Data("\n".utf8)) }
        lineOpen = false
    }

    private static func write(_ text: String) {
        lock.lock()
        defer { lock.unlock() }
        FileHandle.standardError.write(Data(((lineOpen ? "\n" : "") + text).utf8))
        lineOpen = false
    }

    static var stderrIsTerminal: Bool { isatty(2) == 1 }
}

/// "1 window", "2 windows".
func counted(_ n: Int, _ singular: String, _ plural: String? = nil) -> String {
    "\(n) " + (n == 1 ? singular : plural ?? singular + "s")
}

/// Reads a text file that must be UTF-8, with an error naming the file otherwise.
func readUTF8Text(_ path: String) throws -> String {
    guard let data = FileManager.default.contents(atPath: path) else {
        var isDir: ObjCBool = false
        if FileManager.default.fileExists(atPath: path, isDirectory: &isDir), isDir.boolValue {
            throw ToolError("\(path): is a directory, expected a text file")
        }
        throw ToolError("\(path): cannot read file (missing or not readable)")
    }
    guard let text = String(data: data, encoding: .utf8) else {
        // Find the first bad byte for the message.
        var offset = 0
        var it = data.makeIterator()
        var decoder = UTF8()
        var consumed = 0
        loop: while true {
            switch decoder.decode(&it) {
            case .scalarValue(let s): consumed += String(s).utf8.count
            case .emptyInput: break loop
            case .error: offset = consumed; break loop
            }
        }
        throw ToolError("\(path): not valid UTF-8 text (first invalid byte at offset \(offset))")
    }
    return text
}

/// A runtime error with a complete one-line message (exit code 1).
struct ToolError: Error, CustomStringConvertible {
    let description: String
    init(_ message: String) { description = message }
}

/// The process's resident memory now and at its peak, and its storage I/O (Linux).
enum ResourceUsage {
    static var peakResidentBytes: Int? { ProcessResources.peakResidentBytes }
    static var residentBytes: Int? { ProcessResources.residentBytes }
    static var io: (read: Int, write: Int)? { ProcessResources.io }

    /// With TOPIARY_TRACE_MEMORY set, prints the resident set at a named point to stderr.
    static func trace(_ point: String) {
        guard ProcessInfo.processInfo.environment["TOPIARY_TRACE_MEMORY"] != nil else { return }
        Console.info("memory at \(point): rss \((residentBytes ?? 0) >> 20) MiB, peak \((peakResidentBytes ?? 0) >> 20) MiB")
    }
}
