import Foundation
import TopiaryCluster

enum HostlistCommand: Command {
    static let name = "hostlist"
    static let summary = "expand a Slurm host list (node[01-04,07]) into worker addresses for --hosts"
    static let usage = "topiary hostlist [--nodelist LIST] [--port P] [--tasks-per-node LIST] [--separator S]"
    static let details = """
    Expands a compact Slurm host list (default: $SLURM_JOB_NODELIST) such as node[01-04,07],gpu-a[1-2]
    into one name per host, in order, joined by --separator (default ","). With --port each
    becomes HOST:PORT, ready for 'topiary prune --hosts'. With --tasks-per-node (Slurm's
    $SLURM_TASKS_PER_NODE form, e.g. 2(x3),1: one count per host, in order) a host running N
    tasks appears N times, as HOST:P, HOST:P+1, ..., HOST:P+N-1 (the task with SLURM_LOCALID i
    listens on P+i); counts above 1 need --port. cluster/slurm/prune.sbatch uses it.
    """
    static let options = [
        OptionSpec(name: "nodelist", value: "LIST", help: "host list to expand (default: $SLURM_JOB_NODELIST)"),
        OptionSpec(name: "port", value: "P", help: "append :P to every host"),
        OptionSpec(name: "tasks-per-node", value: "LIST", help: "tasks on each host, as $SLURM_TASKS_PER_NODE (2(x3),1); host i's tasks get ports P..P+N-1"),
        OptionSpec(name: "separator", value: "S", help: "text between hosts (default ',')"),
    ]

    static func run(_ args: ParsedArguments) throws {
        guard let list = args.string("nodelist") ?? ProcessInfo.processInfo.environment["SLURM_JOB_NODELIST"] else {
            throw UsageError(message: "topiary hostlist: no --nodelist given and SLURM_JOB_NODELIST is not set")
        }
        let port = try args.int("port", min: 1)
        if let port, port > 65535 { throw UsageError(message: "topiary hostlist: --port must be at most 65535, got \(port)") }
        let hosts: [String]
        do { hosts = try Hostlist.expand(list) } catch { throw ToolError("\(error)") }
        var counts = Array(repeating: 1, count: hosts.count)
        if let given = args.string("tasks-per-node") {
            do { counts = try Hostlist.taskCounts(given) } catch { throw ToolError("\(error)") }
            guard counts.count == hosts.count else {
                throw ToolError("topiary hostlist: --tasks-per-node '\(given)' gives \(counts.count) count\(counts.count == 1 ? "" : "s") for \(hosts.count) host\(hosts.count == 1 ? "" : "s") in '\(list)'")
            }
            if port == nil, counts.contains(where: { $0 > 1 }) {
                throw UsageError(message: "topiary hostlist: --tasks-per-node with more than one task on a host needs --port (each task listens on its own port)")
            }
            if let port, port + counts.max()! - 1 > 65535 {
                throw UsageError(message: "topiary hostlist: --port \(port) with \(counts.max()!) tasks on a host goes past port 65535")
            }
        }
        var entries: [String] = []
        for (host, count) in zip(hosts, counts) {
            for task in 0..<count { entries.append(port.map { "\(host):\($0 + task)" } ?? host) }
        }
        print(entries.joined(separator: args.string("separator") ?? ","))
    }
}
