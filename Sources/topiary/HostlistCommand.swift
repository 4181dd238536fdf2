import Foundation
import TopiaryCluster

enum HostlistCommand: Command {
    static let name = "hostlist"
    static let summary = "expand a Slurm host list (node[01-04,07]) into worker addresses for --hosts"
    static let usage = "topiary hostlist [--nodelist LIST] [--port P] [--separator S]"
    static let details = """
    Expands a compact Slurm host list (default: $SLURM_JOB_NODELIST) such as node[01-04,07],gpu-a[1-2]
    into one name per host, in order, joined by --separator (default ","). With --port each
    becomes HOST:PORT, ready for 'topiary prune --hosts'. cluster/slurm/prune.sbatch uses it.
    """
    static let options = [
        OptionSpec(name: "nodelist", value: "LIST", help: "host list to expand (default: $SLURM_JOB_NODELIST)"),
        OptionSpec(name: "port", value: "P", help: "append :P to every host"),
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
        print(hosts.map { host in port.map { "\(host):\($0)" } ?? host }.joined(separator: args.string("separator") ?? ","))
    }
}
