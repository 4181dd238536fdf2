import Foundation
import TopiaryCluster
import TopiaryModel
import CTopiarySupport
import TopiaryTensor

// Before anything else: run again with a faster OpenBLAS kernel where OpenBLAS chose a slow one
// (BLASKernel: a CPU it does not recognise gets Prescott).
BLASKernel.preferExecutable()
// malloc's thresholds for this program (CTopiarySupport's memory.c).
_ = topiary_configure_malloc()

/// A command as data: what `help` prints and what runs it.
struct CommandEntry: Sendable {
    let name: String
    let summary: String
    let usage: String
    let details: String
    let options: [OptionSpec]
    let run: @Sendable (ParsedArguments) throws -> Void

    init<C: Command>(_ c: C.Type) {
        name = C.name
        summary = C.summary
        usage = C.usage
        details = C.details
        options = C.options
        run = { try C.run($0) }
    }
}

let commands: [CommandEntry] = [
    CommandEntry(PruneCommand.self), CommandEntry(EvalCommand.self), CommandEntry(GenerateCommand.self),
    CommandEntry(InspectCommand.self), CommandEntry(ConvertCommand.self), CommandEntry(WorkerCommand.self),
    CommandEntry(HostlistCommand.self),
]

enum ExitCode {
    static let success: Int32 = 0
    static let failure: Int32 = 1
    static let usage: Int32 = 2
}

func helpText(for command: CommandEntry?) -> String {
    guard let c = command else {
        var s = """
        topiary: prune large language models (magnitude, Wanda, SparseGPT, SparseLLM, BESA)

        usage: topiary COMMAND [OPTIONS]

        commands:

        """
        for c in commands { s += "  " + c.name.padding(toLength: 10, withPad: " ", startingAt: 0) + c.summary + "\n" }
        s += "  help      show this text, or 'topiary help COMMAND' for one command\n"
        s += "\nModels: GGUF (llama incl. Mixtral, qwen2, qwen3, gemma2, phi3; F32, F16, BF16, Q8_0, Q4_0, Q4_1), llama2.c .bin, Hugging Face directories (safetensors).\n"
        s += "Exit codes: 0 success, 1 error (message on stderr), 2 usage error, 75 interrupted (prune: resume with --resume DIR).\n"
        return s
    }
    var s = "topiary \(c.name): \(c.summary)\n\nusage: \(c.usage)\n\n\(c.details)\n\noptions:\n"
    for o in c.options {
        let left = "--" + o.name + (o.value.map { " " + $0 } ?? "")
        s += "  " + left.padding(toLength: 22, withPad: " ", startingAt: 0) + " " + o.help + "\n"
    }
    return s
}

func runMain() -> Int32 {
    var argv = Array(CommandLine.arguments.dropFirst())
    guard let first = argv.first else {
        print(helpText(for: nil), terminator: "")
        return ExitCode.usage
    }
    argv.removeFirst()
    if first == "help" || first == "--help" || first == "-h" {
        if let name = argv.first {
            guard let c = commands.first(where: { $0.name == name }) else {
                let hint = Suggestion.closest(to: name, among: commands.map(\.name)).map { "did you mean '\($0)'? " } ?? ""
                Console.error("topiary help: unknown command '\(name)' (\(hint)commands: \(commands.map(\.name).joined(separator: ", ")))")
                return ExitCode.usage
            }
            print(helpText(for: c), terminator: "")
        } else {
            print(helpText(for: nil), terminator: "")
        }
        return ExitCode.success
    }
    if first == "--version" || first == "version" {
        print("topiary \(ToolVersion.string)")
        return ExitCode.success
    }
    guard let command = commands.first(where: { $0.name == first }) else {
        let hint = Suggestion.closest(to: first, among: commands.map(\.name) + ["help"]).map { "did you mean '\($0)'? " } ?? ""
        Console.error("topiary: unknown command '\(first)' (\(hint)commands: \(commands.map(\.name).joined(separator: ", ")); see 'topiary help')")
        return ExitCode.usage
    }
    if argv.contains("--help") || argv.contains("-h") {
        print(helpText(for: command), terminator: "")
        return ExitCode.success
    }
    // With --json, a failure still ends stdout with one JSON object: {"command", "error"}.
    let json = argv.contains("--json") && command.options.contains { $0.name == "json" }
    do {
        let args = try ParsedArguments(command: command.name, arguments: argv, specs: command.options)
        try command.run(args)
        return ExitCode.success
    } catch where error is UsageError || (error as? OutputDirectoryError)?.isUsage == true {
        let line = ErrorLine.usage("\(error)", command: command.name)
        Console.error(line)
        if json { JSONLine.printError(command: command.name, message: line) }
        return ExitCode.usage
    } catch {
        let body = ErrorLine.body("\(error)", command: command.name)
        Console.error("topiary \(command.name): error: \(body)")
        if json { JSONLine.printError(command: command.name, message: body) }
        return ExitCode.failure
    }
}

/// The one line a failed command prints: "topiary CMD: MESSAGE" for a usage error, "topiary CMD:
/// error: MESSAGE" otherwise, whether or not the message was written with the prefix already.
enum ErrorLine {
    static func body(_ message: String, command: String) -> String {
        var body = Substring(message)
        for prefix in ["topiary \(command): ", "error: "] where body.hasPrefix(prefix) { body = body.dropFirst(prefix.count) }
        return String(body)
    }

    static func usage(_ message: String, command: String) -> String {
        // Another command's prefix (a worker's own message relayed) stays as it is.
        if message.hasPrefix("topiary ") && !message.hasPrefix("topiary \(command): ") { return message }
        return "topiary \(command): " + body(message, command: command)
    }
}

exit(runMain())
