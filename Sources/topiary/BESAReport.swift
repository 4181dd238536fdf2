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

    static func settingsJSON(_ o: BESA.Options, targets: TargetMode) -> [String: Any] {
        ["epochs": o.epochs, "lr": o.learningRate, "lr_schedule": (o.schedule ?? .constant).rawValue, "penalty": o.penalty, "granularity": o.granularity.rawValue,
         "reconstruct": o.reconstruct, "targets": targets.rawValue, "candidates": BESA.steps + 1]
    }

    static func blockJSON(_ s: BESA.Summary) -> [String: Any] {
        ["expected_sparsity": s.expectedSparsity, "shift": s.shift, "steps": s.steps, "epoch_losses": s.epochLosses,
         "linears": s.linears.map { l in
             ["name": l.name, "learned_sparsity": l.learnedSparsity, "sparsity": l.sparsity,
              "row_sparsity_min": l.rowSparsityMin, "row_sparsity_max": l.rowSparsityMax] as [String: Any]
         }]
    }

    /// An SVG heatmap: one row per block, one column per projection, each cell the fraction of
    /// that linear's weights removed (the learned sparsity before the final shift in its tooltip).
    /// Diverging colours around the target: blue sparser, red denser, white at the target.
    static func heatmap(_ reports: [BlockReport], target: Double) -> String {
        let rows = reports.compactMap { r in r.besa.map { (r.block, $0) } }
        let columns = rows.first?.1.linears.map { String($0.name.split(separator: ".").last ?? "") } ?? []
        let (cell, cellHeight, left, top) = (64, 22, 70, 46)
        let width = max(left + cell * columns.count + 20, left + 216 + 320)
        let height = top + cellHeight * rows.count + 50
        let deviations = rows.flatMap { $0.1.linears.map { abs($0.sparsity - target) } }
        let span = max(deviations.max() ?? 0, 0.01)
        func color(_ s: Double) -> (fill: String, text: String) {
            let t = min(max((s - target) / span, -1), 1)
            let end = t >= 0 ? (33.0, 102.0, 172.0) : (178.0, 24.0, 43.0)
            let a = abs(t)
            let c = (255 + (end.0 - 255) * a, 255 + (end.1 - 255) * a, 255 + (end.2 - 255) * a)
            return (String(format: "#%02x%02x%02x", Int(c.0), Int(c.1), Int(c.2)), a > 0.6 ? "#ffffff" : "#000000")
        }
        var svg = """
        <svg xmlns="http://www.w3.org/2000/svg" width="\(width)" height="\(height)" font-family="sans-serif" font-size="11">
        <text x="\(left)" y="16" font-size="13">BESA learned sparsity per linear (target \(String(format: "%.0f%%", target * 100)))</text>

        """
        for (j, name) in columns.enumerated() {
            svg += "<text x=\"\(left + j * cell + cell / 2)\" y=\"\(top - 8)\" text-anchor=\"middle\">\(name)</text>\n"
        }
        for (i, (block, summary)) in rows.enumerated() {
            let y = top + i * cellHeight
            svg += "<text x=\"\(left - 8)\" y=\"\(y + cellHeight / 2 + 4)\" text-anchor=\"end\">block \(block)</text>\n"
            for (j, l) in summary.linears.enumerated() {
                let (fill, ink) = color(l.sparsity)
                let x = left + j * cell
                svg += "<rect x=\"\(x)\" y=\"\(y)\" width=\"\(cell)\" height=\"\(cellHeight)\" fill=\"\(fill)\" stroke=\"#ffffff\">"
                svg += String(format: "<title>%@: %.4f (learned %.4f, rows %.2f-%.2f)</title></rect>\n", l.name, l.sparsity, l.learnedSparsity, l.rowSparsityMin, l.rowSparsityMax)
                svg += String(format: "<text x=\"%d\" y=\"%d\" text-anchor=\"middle\" fill=\"%@\">%.3f</text>\n", x + cell / 2, y + cellHeight / 2 + 4, ink, l.sparsity)
            }
        }
        // Legend: target − span to target + span.
        let legendY = top + rows.count * cellHeight + 16
        for k in 0..<21 {
            let s = target - span + 2 * span * Double(k) / 20
            svg += "<rect x=\"\(left + k * 10)\" y=\"\(legendY)\" width=\"10\" height=\"10\" fill=\"\(color(s).fill)\"/>\n"
        }
        svg += String(format: "<text x=\"%d\" y=\"%d\" text-anchor=\"end\">%.3f</text>\n", left - 4, legendY + 9, target - span)
        svg += String(format: "<text x=\"%d\" y=\"%d\">%.3f (fraction of weights removed; white = target)</text>\n", left + 216, legendY + 9, target + span)
        svg += "</svg>\n"
        return svg
    }
}
