import Foundation
import TopiaryPrune

/// The command-line face of BESA: its options, its part of report.json, and the heatmap of
/// the learned allocation written beside the report.
enum BESAOptions {
    static let specs = [
        OptionSpec(name: "besa-epochs", value: "E", help: "BESA: passes over the calibration windows, one Adam step per window (default 1)"),
        OptionSpec(name: "besa-lr", value: "X", help: "BESA: Adam step size on the allocation logits (default 0.05)"),
        OptionSpec(name: "besa-lr-schedule", value: "S", help: "BESA: constant (default) or cosine (from --besa-lr down to 0 over all epochs)"),
        OptionSpec(name: "besa-penalty", value: "B", help: "BESA: weight of the sparsity penalty ((S - target)/target)^2 (default 5)"),
        OptionSpec(name: "besa-granularity", value: "G", help: "BESA: row (one allocation per output row, default) or layer"),
        OptionSpec(name: "besa-reconstruct", value: nil, help: "BESA: update the kept weights with SparseGPT under the learned masks"),
    ]

    /// The BESA options of `--method besa`; nil for other methods, which must not be given them.
    static func parse(_ args: ParsedArguments, method: PruneMethod) throws -> BESA.Options? {
        let given = specs.filter { $0.isFlag ? args.flag($0.name) : args.string($0.name) != nil }.map { "--" + $0.name }
        guard method == .besa else {
            if !given.isEmpty {
                throw UsageError(message: "topiary prune: \(given.joined(separator: ", ")) apply to --method besa only")
            }
            return nil
        }
        var o = BESA.Options()
        if let e = try args.int("besa-epochs", in: 1...Limits.epochs) { o.epochs = e }
        if let lr = try args.double("besa-lr") {
            guard lr > 0 else { throw UsageError(message: "topiary prune: --besa-lr must be positive, got \(lr)") }
            o.learningRate = lr
        }
        if let sched = args.string("besa-lr-schedule") {
            guard let schedule = BESA.LearningRateSchedule(rawValue: sched) else {
                throw UsageError(message: "topiary prune: --besa-lr-schedule must be constant or cosine, got '\(sched)'")
            }
            o.schedule = schedule
        }
        if let b = try args.double("besa-penalty") {
            guard b >= 0 else { throw UsageError(message: "topiary prune: --besa-penalty must not be negative, got \(b)") }
            o.penalty = b
        }
        if let g = args.string("besa-granularity") {
            guard let granularity = BESA.Granularity(rawValue: g) else {
                throw UsageError(message: "topiary prune: --besa-granularity must be row or layer, got '\(g)'")
            }
            o.granularity = granularity
        }
        o.reconstruct = args.flag("besa-reconstruct")
        return o
    }
}
