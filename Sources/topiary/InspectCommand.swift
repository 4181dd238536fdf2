import Foundation
import TopiaryModel
import TopiaryTensor

enum InspectCommand: Command {
    static let name = "inspect"
    static let summary = "per-layer sparsity of a model, and which N:M patterns each linear meets"
    static let usage = "topiary inspect --model PATH [--tokenizer PATH] [--pattern N:M] [--json]\n       topiary inspect --devices [--json]\n       topiary inspect --blas-kernel"
    static let details = """
    Reads the model one block at a time and prints, for every linear layer of every decoder block,
    its shape, its fraction of exact zeros, and whether it meets the 2:4 and 4:8 patterns (at
    least N zeros in every group of M consecutive inputs of every row). --pattern adds a pattern
    to check. The last line sums the pruned linears.
    --devices lists the compute backends instead: the CPU (threads, cores, OpenBLAS build) and
    each CUDA device (name, memory, compute capability, driver), or the line that says which
    CUDA library (driver, cuBLAS, NVRTC) is missing.
    --blas-kernel prints the OpenBLAS kernel topiary runs with (the one it chose from the CPU's
    instruction sets unless OPENBLAS_CORETYPE is set; scripts/test exports it for the test run).
    """
    static let options = [
        CommonOptions.model, CommonOptions.tokenizer,
        OptionSpec(name: "pattern", value: "N:M", help: "also check this N:M pattern"),
        OptionSpec(name: "devices", value: nil, help: "list the compute backends and devices found, instead of a model"),
        OptionSpec(name: "blas-kernel", value: nil, help: "print the OpenBLAS kernel in use (e.g. SkylakeX), instead of a model"),
        CommonOptions.threads, CommonOptions.json,
    ]

    static func listDevices(json: Bool) {
        let devices = ComputeDevices.describe()
        for d in devices { print("\(d.device.padding(toLength: 6, withPad: " ", startingAt: 0)) \(d.available ? "available  " : "unavailable") \(d.detail)") }
        if json {
            JSONLine.print(["command": "inspect", "devices": devices.map { ["device": $0.device, "available": $0.available, "detail": $0.detail] as [String: Any] }])
        }
    }

    /// Whether every group of `m` consecutive columns of every row has at least `n` zeros.
    static func meets(_ w: Matrix, n: Int, m: Int) -> Bool {
        guard w.cols % m == 0 else { return false }
        return w.withUnsafeBufferPointer { p in
            for r in 0..<w.rows {
                var g = 0
                while g < w.cols {
                    var zeros = 0
                    for j in 0..<m where p[r * w.cols + g + j] == 0 { zeros += 1 }
                    if zeros < n { return false }
                    g += m
                }
            }
            return true
        }
    }

    static func run(_ args: ParsedArguments) throws {
        try CommonOptions.apply(args)
        if args.flag("devices") { return listDevices(json: args.flag("json")) }
        if args.flag("blas-kernel") { return print(BLASKernel.current) }
        var patterns = [(2, 4), (4, 8)]
        if let p = args.string("pattern") {
            let parts = p.split(separator: ":")
            guard parts.count == 2, let n = Int(parts[0]), let m = Int(parts[1]), n > 0, n < m else {
                throw UsageError(message: "topiary inspect: --pattern expects N:M with 0 < N < M, got '\(p)'")
            }
            if !patterns.contains(where: { $0 == (n, m) }) { patterns.append((n, m)) }
        }
        let model = try CommonOptions.openModel(args)
        // Only the blocks are read below; a model without its embedding or head is still refused.
        try model.checkEmbeddingAndHeadTensors()
        let c = model.config
        print("\(model.path): \(c.architecture.rawValue), \(c.layerCount) blocks, hidden \(c.hiddenSize), format \(model.format.rawValue)")
        let header = "linear".padding(toLength: 44, withPad: " ", startingAt: 0) + "  shape          sparsity  " + patterns.map { "\($0.0):\($0.1)" }.joined(separator: "  ")
        print(header)
        var rows: [[String: Any]] = []
        var zeros = 0, total = 0
        for i in 0..<c.layerCount {
            let block = try model.loadBlock(i)
            for name in block.linearNames {
                let w = block.weight(name)
                let z = w.zeroCount
                zeros += z
                total += w.count
                let checks = patterns.map { meets(w, n: $0.0, m: $0.1) }
                let shape = "\(w.rows)x\(w.cols)"
                print(name.padding(toLength: 44, withPad: " ", startingAt: 0) + "  " + shape.padding(toLength: 13, withPad: " ", startingAt: 0)
                      + String(format: "  %8.4f  ", Double(z) / Double(w.count)) + checks.map { $0 ? "yes" : "no " }.joined(separator: "  "))
                var row: [String: Any] = ["name": name, "rows": w.rows, "columns": w.cols, "sparsity": Double(z) / Double(w.count)]
                for (p, ok) in zip(patterns, checks) { row["meets_\(p.0)_\(p.1)"] = ok }
                rows.append(row)
            }
        }
        let overall = total > 0 ? Double(zeros) / Double(total) : 0
        print(String(format: "all block linears: %d of %d weights are zero (sparsity %.4f)", zeros, total, overall))
        if args.flag("json") {
            JSONLine.print(["command": "inspect", "model": model.path, "linears": rows, "sparsity": overall,
                            "zeros": zeros, "weights": total])
        }
    }
}
