import Foundation
import TopiaryModel

/// Why an output directory was refused or could not be installed. `isUsage`: the option itself is
/// wrong (an empty --output, '.', '..'), which the command line reports as a usage error.
public struct OutputDirectoryError: Error, CustomStringConvertible {
    public let description: String
    public let isUsage: Bool
    public init(_ message: String) {
        description = message
        isUsage = false
    }
    public init(usage message: String) {
        description = message
        isUsage = true
    }
}

/// The tool's version, as run.json, report.json and the output marker record it.
public enum ToolVersion {
    public static let string = "0.1.0"
}

/// The output directory of `prune` and `convert`: written under a temporary name beside it and
/// renamed into place, so that an interrupted run leaves nothing under its name.
///
/// Nothing the user owns is deleted:
/// - `--output` may not be empty, `.` or `..`, a symbolic link, nor the working directory, the run
///   directory, an input file (model, tokenizer, calibration text, ...) or any directory that
///   contains one of them;
/// - an existing non-empty directory is replaced only with `--overwrite`, and only when Topiary
///   wrote it: it carries the marker `.topiary-output.json`, which lists the files Topiary wrote
///   there, and holds nothing else. A directory with any other entry is refused, naming it.
public enum OutputDirectory {
    public static let markerName = ".topiary-output.json"

    /// A path the output must neither be nor contain, and what it is ("the model").
    public struct Protected {
        public let label: String
        public let path: String
    }

    /// The paths every command protects, with those given: the working directory first.
    public static func protected(_ given: [(String, String?)]) -> [Protected] {
        [Protected(label: "the working directory", path: FileManager.default.currentDirectoryPath)]
            + given.compactMap { label, path in path.map { Protected(label: label, path: $0) } }
    }

    /// Checks `path` before any work (see the type's comment); `command` names the command in usage errors.
    public static func check(_ path: String, overwrite: Bool, command: String, protecting: [Protected]) throws {
        guard !path.isEmpty else {
            throw OutputDirectoryError(usage: "topiary \(command): --output is empty; give the name of the directory to write the model to (e.g. --output pruned)")
        }
        var trimmed = path
        while trimmed.count > 1 && trimmed.hasSuffix("/") { trimmed.removeLast() }
        let last = (trimmed as NSString).lastPathComponent
        if trimmed == "/" || last == "." || last == ".." {
            throw OutputDirectoryError(usage: "topiary \(command): --output '\(path)' is a directory that holds other files ('.', '..' and '/' are never an output, which is replaced as a whole); give a new directory, e.g. --output pruned")
        }
        let target = canonical(path)
        for p in protecting where !p.path.isEmpty {
            let other = canonical(p.path)
            if other == target || other.hasPrefix(target == "/" ? "/" : target + "/") {
                throw OutputDirectoryError("\(path): cannot be the output directory: it \(other == target ? "is" : "contains") \(p.label) (\(p.path)), and the output directory is replaced as a whole; give a directory of its own")
            }
        }
        try checkExisting(path, overwrite: overwrite)
        if let problem = creationProblem(path) {
            throw OutputDirectoryError("\(path): cannot create the output directory: \(problem)")
        }
    }

    /// Why a directory could not be made at `path` (with its missing parents), found without
    /// creating anything: its nearest existing ancestor is not a directory, or cannot be written
    /// to. nil when `path` exists or nothing is known against it.
    public static func creationProblem(_ path: String) -> String? {
        var st = stat()
        if lstat(path, &st) == 0 { return nil }
        var p = trimmedPath(path)
        while true {
            guard let parent = parentPath(p) else { return nil }
            p = parent
            if stat(p, &st) != 0 {
                if errno == ENOENT || errno == ENOTDIR { continue }
                return "\(p): \(String(cString: strerror(errno)))"
            }
            if (st.st_mode & S_IFMT) != S_IFDIR { return "\(p) is not a directory" }
            if access(p, W_OK | X_OK) != 0 { return "\(p): \(String(cString: strerror(errno)))" }
            return nil
        }
    }

    /// The directory that holds `path` ("." for a bare name); nil for "/" and ".". (Not
    /// NSString's deletingLastPathComponent, which traps on some relative paths on Linux.)
    static func parentPath(_ path: String) -> String? {
        let p = trimmedPath(path)
        if p == "/" || p == "." { return nil }
        guard let slash = p.lastIndex(of: "/") else { return "." }
        let parent = trimmedPath(String(p[..<slash]))
        return parent.isEmpty ? "/" : parent
    }

    /// Creates the staging directory of `output` with its missing parents (as `mkdir -p`); a
    /// failure is one line naming the output and why.
    public static func createStaging(_ staging: String, for output: String) throws {
        if let problem = makeDirectories(staging) {
            throw OutputDirectoryError("\(output): cannot create the output directory: \(problem)")
        }
    }

    /// `mkdir -p`: nil when done, else why not (an ancestor that is not a directory, or mkdir's error).
    static func makeDirectories(_ path: String) -> String? {
        var st = stat()
        let p = trimmedPath(path)
        if stat(p, &st) == 0 { return (st.st_mode & S_IFMT) == S_IFDIR ? nil : "\(p) is not a directory" }
        if let parent = parentPath(p), let problem = makeDirectories(parent) { return problem }
        if mkdir(p, 0o777) == 0 { return nil }
        let error = errno
        if error == EEXIST && stat(p, &st) == 0 && (st.st_mode & S_IFMT) == S_IFDIR { return nil }
        return String(cString: strerror(error))
    }

    /// Checks an output file (`eval --logits`) before any work: it is written to a temporary
    /// name and renamed over `path`, so `path` must not be one of the inputs (nor inside one
    /// that is a directory, e.g. a Hugging Face model) and must not be a directory; its parent
    /// must be an existing directory. An existing other file is replaced, as its option says.
    /// `inputs` as `protected` takes them (the working directory, which may hold the file, is not
    /// among them).
    public static func checkFile(_ path: String, option: String, command: String, inputs: [(String, String?)]) throws {
        guard !path.isEmpty else { throw OutputDirectoryError(usage: "topiary \(command): --\(option) is empty; give the name of a file to write") }
        let target = canonical(path)
        for p in protected(inputs).dropFirst() where !p.path.isEmpty {
            let other = canonical(p.path)
            var isDirectory: ObjCBool = false
            let inside = FileManager.default.fileExists(atPath: other, isDirectory: &isDirectory) && isDirectory.boolValue
                && target.hasPrefix(other == "/" ? "/" : other + "/")
            if other == target || inside {
                throw OutputDirectoryError("\(path): cannot be the --\(option) file: it \(other == target ? "is" : "lies in") \(p.label) (\(p.path)), which it would replace or change; give a file of its own")
            }
        }
        var st = stat()
        if stat(path, &st) == 0 && (st.st_mode & S_IFMT) == S_IFDIR {
            throw OutputDirectoryError("\(path): is a directory; --\(option) takes the name of a file to write")
        }
        let parent = parentPath(target) ?? "/"
        var isDirectory: ObjCBool = false
        guard FileManager.default.fileExists(atPath: parent, isDirectory: &isDirectory), isDirectory.boolValue else {
            throw OutputDirectoryError("\(path): cannot be written: its directory \(parent) does not exist or is not a directory")
        }
    }

    /// An existing `path`: refused when it is a link or a file, or not empty unless overwriting a
    /// directory Topiary wrote.
    public static func checkExisting(_ path: String, overwrite: Bool) throws {
        var st = stat()
        guard lstat(path, &st) == 0 else { return }
        if (st.st_mode & S_IFMT) == S_IFLNK {
            throw OutputDirectoryError("\(path): is a symbolic link; give the directory itself (or a new name) as the output")
        }
        guard (st.st_mode & S_IFMT) == S_IFDIR else { throw OutputDirectoryError("\(path): exists and is not a directory") }
        let contents = (try? FileManager.default.contentsOfDirectory(atPath: path)) ?? []
        guard !contents.isEmpty else { return }
        guard overwrite else {
            throw OutputDirectoryError("\(path): output directory exists and is not empty (pass --overwrite to replace it, if Topiary wrote it)")
        }
        let listed = try writtenFiles(path)
        if let foreign = contents.sorted().first(where: { $0 != markerName && !listed.contains($0) }) {
            throw OutputDirectoryError("\(path): holds '\(foreign)', which Topiary did not write there; --overwrite replaces only what Topiary wrote (\(markerName) lists it), so move it away or choose another --output")
        }
    }

    /// The files Topiary wrote into `directory`, from its marker.
    public static func writtenFiles(_ directory: String) throws -> Set<String> {
        let marker = (directory as NSString).appendingPathComponent(markerName)
        guard let data = FileManager.default.contents(atPath: marker),
              let json = try? JSONSerialization.jsonObject(with: data) as? [String: Any],
              json["format"] as? String == "topiary-output", let files = json["files"] as? [String] else {
            throw OutputDirectoryError("\(directory): was not written by Topiary (no valid \(markerName) in it); --overwrite replaces only an output directory Topiary wrote, so remove it yourself or choose another --output")
        }
        return Set(files.filter { !$0.contains("/") && $0 != "." && $0 != ".." })
    }

    /// Writes the marker into a finished staging directory, listing every file in it.
    public static func writeMarker(in staging: String, command: String) throws {
        let files = try FileManager.default.contentsOfDirectory(atPath: staging).filter { $0 != markerName }.sorted()
        let marker: [String: Any] = ["format": "topiary-output", "command": command, "tool_version": ToolVersion.string, "files": files]
        let data = try JSONSerialization.data(withJSONObject: marker, options: [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes])
        try AtomicFile.write(data + Data("\n".utf8), to: (staging as NSString).appendingPathComponent(markerName))
    }

    /// Moves a finished staging directory to `output` (after writing its marker). An old output is
    /// replaced only as `checkExisting` allows: it is moved aside, the new one renamed into place,
    /// and then only the files its marker lists are removed with it.
    public static func install(staging: String, output: String, overwrite: Bool, command: String,
                               log: (String) -> Void = { _ in }) throws {
        try writeMarker(in: staging, command: command)
        let fm = FileManager.default
        var st = stat()
        var aside: String?
        if lstat(output, &st) == 0 {
            try checkExisting(output, overwrite: overwrite)
            let contents = (try? fm.contentsOfDirectory(atPath: output)) ?? []
            if contents.isEmpty {
                guard rmdir(output) == 0 else {
                    throw OutputDirectoryError("\(output): cannot replace the empty output directory: \(String(cString: strerror(errno)))")
                }
            } else {
                let old = trimmedPath(output) + ".old-\(getpid())"
                guard rename(output, old) == 0 else {
                    throw OutputDirectoryError("\(output): cannot move the old output directory aside to \(old): \(String(cString: strerror(errno)))")
                }
                aside = old
            }
        }
        if rename(staging, output) != 0 {
            let reason = String(cString: strerror(errno))
            if let aside { _ = rename(aside, output) }
            throw OutputDirectoryError("\(output): cannot move the finished model into place from \(staging): \(reason)")
        }
        if let aside {
            // Only what Topiary wrote there; anything else (which checkExisting refused) stays.
            let listed = (try? writtenFiles(aside)) ?? []
            for name in listed.union([markerName]) { _ = unlink((aside as NSString).appendingPathComponent(name)) }
            if rmdir(aside) != 0 {
                log("topiary: note: the previous output was moved to \(aside); it still holds files Topiary did not write")
            }
        }
    }

    /// Where a run stages its output before renaming it into place.
    public static func stagingPath(for output: String) -> String {
        trimmedPath(output) + ".partial-\(getpid())"
    }

    public static func trimmedPath(_ path: String) -> String {
        var p = path
        while p.count > 1 && p.hasSuffix("/") { p.removeLast() }
        return p
    }

    /// `path` absolute, with `.`, `..` and symbolic links resolved as far as it exists.
    public static func canonical(_ path: String) -> String {
        let absolute = path.hasPrefix("/") ? path : (FileManager.default.currentDirectoryPath as NSString).appendingPathComponent(path)
        if let resolved = realpath(absolute, nil) {
            defer { free(resolved) }
            return String(cString: resolved)
        }
        let trimmed = trimmedPath(absolute)
        let parent = (trimmed as NSString).deletingLastPathComponent
        let last = (trimmed as NSString).lastPathComponent
        guard !parent.isEmpty, parent != trimmed else { return trimmed }
        let base = canonical(parent)
        switch last {
        case ".", "": return base
        case "..": return (base as NSString).deletingLastPathComponent
        default: return base == "/" ? "/" + last : base + "/" + last
        }
    }
}
