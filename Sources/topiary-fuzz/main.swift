import Foundation
import TopiaryTensor
#if canImport(Glibc)
import Glibc
#endif

// topiary-fuzz: seeded fuzzers for the checkpoint and tokenizer readers and the wire decoders.
//
// Every case's input is made from the case's own seed (derived from --seed and its number), so
// a failure is reproduced by `topiary-fuzz TARGET --replay SEED`. Cases run in a child process
// under a memory limit; the parent watches it: a crash (signal), a case that runs past
// --case-seconds (a hang), or an allocation past --memory-mib (the child dies allocating) is a
// failure reported with its seed, and the run goes on from the next case. A case that loads, or
// is refused with an error, passes.

let targets = makeTargets()

let usage = """
usage: topiary-fuzz TARGET [--seed N] [--cases N] [--seconds S] [--case-seconds S] [--memory-mib M]
       topiary-fuzz TARGET --replay SEED [--save DIR]
       topiary-fuzz TARGET --check-seeds

targets: \(targets.map(\.name).joined(separator: ", ")), all

--seed N          run seed (default 1); case i uses a seed derived from N and i
--cases N         cases to run (default 1000 unless --seconds is given)
--seconds S       stop after S seconds (with --cases: whichever comes first)
--case-seconds S  a case running longer is a failure (hang), default 10
--memory-mib M    the child's data limit; an allocation past it is a failure, default 2048
--max-failures N  stop a target after N failures (each costs a restart), default 50
--replay SEED     run one case in this process and print what it did
--save DIR        with --replay: also write the case's input files to DIR
--check-seeds     every unmutated seed input must load (exit 1 otherwise)

Exit status: 0 when no case failed, 1 when one did, 2 on a usage error.
"""

struct Options {
    var targets: [any FuzzTarget] = []
    var seed: UInt64 = 1
    var cases: Int?
    var seconds: Double?
    var caseSeconds: Double = 10
    var memoryMiB = 2048
    var maxFailures = 50
    var replay: UInt64?
    var save: String?
    var checkSeeds = false
    // Child mode (internal): run cases [from, to) until the deadline, reporting on stdout.
    var child = false
    var from = 0
    var to = 0
    var deadline: Double = .infinity
    var work: String?
}

func fail(_ message: String) -> Never {
    FileHandle.standardError.write(Data("topiary-fuzz: \(message)\n".utf8))
    exit(2)
}

func need<T>(_ value: T?, _ message: String) -> T {
    guard let value else { fail(message) }
    return value
}

func parseSeed(_ s: String) -> UInt64? {
    if s.hasPrefix("0x") { return UInt64(s.dropFirst(2), radix: 16) }
    return UInt64(s)
}

func parse(_ argv: [String], targets: [any FuzzTarget]) -> Options {
    var o = Options()
    guard let targetName = argv.first, !targetName.hasPrefix("-") else { fail("missing TARGET\n\(usage)") }
    if targetName == "all" {
        o.targets = targets
    } else {
        guard let t = targets.first(where: { $0.name == targetName }) else {
            fail("unknown target '\(targetName)' (targets: \(targets.map(\.name).joined(separator: ", ")), all)")
        }
        o.targets = [t]
    }
    var i = 1
    func value() -> String {
        i += 1
        guard i < argv.count else { fail("\(argv[i - 1]) needs a value") }
        return argv[i]
    }
    while i < argv.count {
        switch argv[i] {
        case "--seed": o.seed = need(parseSeed(value()), "--seed: expected an unsigned integer")
        case "--cases": o.cases = need(Int(value()).flatMap { $0 >= 0 ? $0 : nil }, "--cases: expected a count")
        case "--seconds": o.seconds = need(Double(value()).flatMap { $0 > 0 ? $0 : nil }, "--seconds: expected a positive number")
        case "--case-seconds": o.caseSeconds = need(Double(value()).flatMap { $0 > 0 ? $0 : nil }, "--case-seconds: expected a positive number")
        case "--memory-mib": o.memoryMiB = need(Int(value()).flatMap { $0 >= 64 ? $0 : nil }, "--memory-mib: expected at least 64")
        case "--replay": o.replay = need(parseSeed(value()), "--replay: expected a case seed")
        case "--max-failures": o.maxFailures = need(Int(value()).flatMap { $0 >= 1 ? $0 : nil }, "--max-failures: expected a positive count")
        case "--save": o.save = value()
        case "--check-seeds": o.checkSeeds = true
        case "--child": o.child = true
        case "--from": o.from = need(Int(value()), "--from")
        case "--to": o.to = need(Int(value()), "--to")
        case "--deadline": o.deadline = need(Double(value()), "--deadline")
        case "--work": o.work = value()
        default: fail("unknown option '\(argv[i])'\n\(usage)")
        }
        i += 1
    }
    return o
}

/// A fresh directory for case files: in /dev/shm (memory) when there is one, else the temporary directory.
func makeWorkDirectory() -> String {
    var base = NSTemporaryDirectory()
    if access("/dev/shm", W_OK) == 0 { base = "/dev/shm/" }
    let dir = base + (base.hasSuffix("/") ? "" : "/") + "topiary-fuzz-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
    try? FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    return dir
}

/// Writes a line to stdout unbuffered (the parent reads it as the child goes).
func report(_ line: String) {
    let bytes = Array((line + "\n").utf8)
    var done = 0
    while done < bytes.count {
        let n = bytes[done...].withUnsafeBytes { write(1, $0.baseAddress, $0.count) }
        if n <= 0 { exit(3) }
        done += n
    }
}

func isFailure(_ outcome: CaseOutcome) -> FuzzFailure? {
    if case .refused(let e) = outcome, let f = e as? FuzzFailure { return f }
    return nil
}

// MARK: Child

/// Caps the process's data (heap and private mappings): an allocation past it fails, and the
/// Swift runtime stops the process, which the parent reports as a failure with the seed.
func limitMemory(_ mib: Int) {
    var limit = rlimit(rlim_cur: rlim_t(mib) << 20, rlim_max: rlim_t(mib) << 20)
    _ = setrlimit(Int32(RLIMIT_DATA.rawValue), &limit)
}

func runChild(_ o: Options) -> Never {
    limitMemory(o.memoryMiB)
    CPUBackend.setThreadCount(1)
    let target = o.targets[0]
    let work = o.work ?? makeWorkDirectory()
    for index in o.from..<o.to {
        if Date().timeIntervalSince1970 > o.deadline { break }
        report("c \(index)")
        var r = FuzzRandom(seed: FuzzRandom.caseSeed(o.seed, index))
        let outcome = target.run(&r, directory: work)
        if let f = isFailure(outcome) {
            report("f \(index) \(f.description.replacingOccurrences(of: "\n", with: " "))")
        } else {
            report("r \(index) \(outcome.label)")
        }
    }
    report("end")
    exit(0)
}

// MARK: Parent

/// The lines of a crash report that say what and where: the fatal error, and the first frames in
/// the project's own sources.
func crashSummary(_ stderr: String) -> String {
    let lines = stderr.split(separator: "\n").map { $0.trimmingCharacters(in: .whitespaces) }
    var parts: [String] = []
    if let fatal = lines.first(where: { $0.contains("Fatal error") || $0.contains("fatal error") || $0.contains("Could not allocate") }) {
        parts.append(fatal)
    }
    for line in lines where line.contains("/Sources/") && !line.contains("/Sources/topiary-fuzz/") {
        if let at = line.range(of: " at /") {
            // "2 [ra] 0x000055... closure #1 in f(_:) + 6374 in topiary-fuzz at /path/Sources/X.swift:151:34"
            let head = line.components(separatedBy: " + ").first ?? ""
            let function = head.split(separator: " ").drop { $0.first?.isNumber == true || $0.hasPrefix("[") || $0.hasPrefix("0x") }.joined(separator: " ")
            parts.append("\(function) at \(line[at.upperBound...].components(separatedBy: "/Sources/").last.map { "Sources/" + $0 } ?? "")")
        }
        if parts.count >= 3 { break }
    }
    if parts.isEmpty { parts = lines.suffix(3).map { String($0) } }
    return parts.joined(separator: " | ")
}

struct Failure {
    var index: Int
    var seed: UInt64
    var kind: String
}

/// Runs `target`'s cases in child processes, restarting after each crash or hang.
func supervise(_ target: any FuzzTarget, _ o: Options, start: Date) -> (ran: Int, failures: [Failure], labels: [String: Int]) {
    let total = o.cases ?? (o.seconds == nil ? 1000 : Int.max)
    let deadline = o.seconds.map { start.timeIntervalSince1970 + $0 } ?? .infinity
    let exe = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath().path
    var next = 0
    var ran = 0
    var failures: [Failure] = []
    var labels: [String: Int] = [:]
    let work = makeWorkDirectory()
    defer { try? FileManager.default.removeItem(atPath: work) }
    while next < total && Date().timeIntervalSince1970 < deadline && failures.count < o.maxFailures {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: exe)
        p.arguments = [target.name, "--child", "--seed", String(o.seed), "--from", String(next), "--to", String(total == Int.max ? Int.max - 1 : total),
                       "--deadline", String(deadline), "--memory-mib", String(o.memoryMiB), "--work", work]
        var env = ProcessInfo.processInfo.environment
        env["OPENBLAS_NUM_THREADS"] = "1"
        // A crash's report: the fatal error and a symbolicated backtrace, without colours or prompts.
        env["SWIFT_BACKTRACE"] = "enable=yes,interactive=no,color=no,threads=crashed,registers=none,images=none"
        p.environment = env
        let out = Pipe()
        p.standardOutput = out
        let errPath = work + ".stderr"
        _ = FileManager.default.createFile(atPath: errPath, contents: nil)
        p.standardError = FileHandle(forWritingAtPath: errPath)
        p.standardInput = FileHandle.nullDevice
        do { try p.run() } catch { fail("cannot start the child process: \(error)") }
        let fd = out.fileHandleForReading.fileDescriptor
        var pending: [UInt8] = []
        var current: Int?
        var finished = false
        var hung = false
        var lastProgress = Date()
        var chunk = [UInt8](repeating: 0, count: 1 << 16)
        loop: while true {
            var pfd = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            let ready = poll(&pfd, 1, 100)
            if ready > 0 {
                let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
                if n <= 0 { break loop }
                pending += chunk[0..<n]
                while let nl = pending.firstIndex(of: 0x0A) {
                    let line = String(decoding: pending[..<nl], as: UTF8.self)
                    pending.removeSubrange(...nl)
                    let parts = line.split(separator: " ", maxSplits: 2).map(String.init)
                    switch parts.first {
                    case "c":
                        current = Int(parts[1])
                        lastProgress = Date()
                    case "r":
                        ran += 1
                        next = Int(parts[1])! + 1
                        current = nil
                        if parts.count == 3 { labels[parts[2], default: 0] += 1 }
                    case "f":
                        let index = Int(parts[1])!
                        ran += 1
                        next = index + 1
                        current = nil
                        failures.append(Failure(index: index, seed: FuzzRandom.caseSeed(o.seed, index), kind: "property: " + (parts.count > 2 ? parts[2] : "")))
                    case "end":
                        finished = true
                    default: break
                    }
                }
            } else if current != nil && Date().timeIntervalSince(lastProgress) > o.caseSeconds {
                kill(p.processIdentifier, SIGKILL)
                hung = true
                break loop
            }
        }
        p.waitUntilExit()
        defer { try? FileManager.default.removeItem(atPath: errPath) }
        if finished { break }
        let stderrTail = crashSummary((try? String(contentsOfFile: errPath, encoding: .utf8)) ?? "")
        if let index = current {
            let kind: String
            if hung {
                kind = "hang: still running after \(o.caseSeconds) s"
            } else if p.terminationReason == .uncaughtSignal {
                kind = "crash: signal \(p.terminationStatus)" + (stderrTail.isEmpty ? "" : ": " + stderrTail)
            } else {
                kind = "crash: exit status \(p.terminationStatus)" + (stderrTail.isEmpty ? "" : ": " + stderrTail)
            }
            failures.append(Failure(index: index, seed: FuzzRandom.caseSeed(o.seed, index), kind: kind))
            ran += 1
            next = index + 1
        } else if !finished {
            // The child ended between cases without saying so: count it and go on.
            failures.append(Failure(index: next, seed: FuzzRandom.caseSeed(o.seed, next),
                                    kind: "child ended unexpectedly (status \(p.terminationStatus)): \(stderrTail)"))
            next += 1
        }
    }
    return (ran, failures, labels)
}

// MARK: Main

let options = parse(Array(CommandLine.arguments.dropFirst()), targets: targets)
if options.child { runChild(options) }

if options.checkSeeds {
    var problems: [String] = []
    for t in options.targets {
        let dir = makeWorkDirectory()
        problems += t.checkSeeds(directory: dir)
        try? FileManager.default.removeItem(atPath: dir)
        print("\(t.name): seeds checked")
    }
    for p in problems { print("FAIL \(p)") }
    exit(problems.isEmpty ? 0 : 1)
}

if let seed = options.replay {
    limitMemory(options.memoryMiB)
    CPUBackend.setThreadCount(1)
    let t = options.targets[0]
    let dir = options.save ?? makeWorkDirectory()
    try? FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    var r = FuzzRandom(seed: seed)
    let started = Date()
    let outcome = t.run(&r, directory: dir)
    let seconds = Date().timeIntervalSince(started)
    switch outcome {
    case .loaded: print("\(t.name) case \(String(seed, radix: 16)): loaded (\(String(format: "%.3f", seconds)) s)")
    case .refused(let e): print("\(t.name) case \(String(seed, radix: 16)): \(e is FuzzFailure ? "FAILED" : "refused"): \(e) (\(String(format: "%.3f", seconds)) s)")
    }
    if options.save == nil { try? FileManager.default.removeItem(atPath: dir) }
    exit(isFailure(outcome) == nil ? 0 : 1)
}

var anyFailed = false
for t in options.targets {
    let start = Date()
    let (ran, failures, labels) = supervise(t, options, start: start)
    let seconds = Date().timeIntervalSince(start)
    let loaded = labels["loaded"] ?? 0
    let stopped = failures.count >= options.maxFailures ? " (stopped at --max-failures \(options.maxFailures))" : ""
    print("\(t.name): \(ran) cases (seed \(options.seed)) in \(String(format: "%.1f", seconds)) s: \(loaded) loaded, \(ran - loaded - failures.count) refused with an error, \(failures.count) failed\(stopped)")
    let refusals = labels.filter { $0.key != "loaded" }.sorted { $0.value != $1.value ? $0.value > $1.value : $0.key < $1.key }
    if !refusals.isEmpty {
        print("  refusals: " + refusals.prefix(8).map { "\($0.key) \($0.value)" }.joined(separator: ", "))
    }
    // Failures grouped by what they say (addresses and numbers aside), a few seeds of each.
    var groups: [(key: String, failures: [Failure])] = []
    for f in failures {
        let key = String(f.kind.unicodeScalars.map { CharacterSet.decimalDigits.contains($0) ? "#" : Character($0) })
            .replacingOccurrences(of: "x#", with: "x")
        if let i = groups.firstIndex(where: { $0.key == key }) { groups[i].failures.append(f) } else { groups.append((key, [f])) }
    }
    for g in groups {
        let first = g.failures[0]
        print("FAIL \(t.name) (\(g.failures.count) case\(g.failures.count == 1 ? "" : "s")): \(first.kind)")
        for f in g.failures.prefix(3) {
            print("  case \(f.index): reproduce with topiary-fuzz \(t.name) --replay 0x\(String(f.seed, radix: 16))")
        }
    }
    if !failures.isEmpty { anyFailed = true }
}
exit(anyFailed ? 1 : 0)
