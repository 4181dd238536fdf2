import Foundation
import TopiaryPrune

/// report.json's pieces that come from the pruned blocks: each block's record, its sparsity, and
/// BESA's per-block summary and heatmap (besa-sparsity.svg).
public enum PruneReport {
    /// The pattern in report.json and --json: "unstructured", or "N:M" (the fraction is target_sparsity).
    public static func patternJSON(_ p: SparsityPattern) -> String {
        switch p {
        case .unstructured: return "unstructured"
        case .nOfM(let n, let m): return "\(n):\(m)"
        }
    }

    /// Zeros over weights of all the pruned linears (each linear's zeros rounded to a count).
    public static func sparsity(_ reports: [BlockReport]) -> Double {
        var zeros = 0, total = 0
        for r in reports { for l in r.linears { zeros += Int((l.sparsity * Double(l.rows * l.columns)).rounded()); total += l.rows * l.columns } }
        return total > 0 ? Double(zeros) / Double(total) : 0
    }

    /// One block of report.json's `blocks`.
    public static func blockJSON(_ r: BlockReport) -> [String: Any] {
        let weights = r.linears.reduce(0.0) { $0 + Double($1.rows * $1.columns) }
        var json: [String: Any] = [
            "block": r.block, "seconds": r.seconds, "output_error": r.outputError,
            "sparsity": weights > 0 ? r.linears.reduce(0.0) { $0 + $1.sparsity * Double($1.rows * $1.columns) } / weights : 0,
            "linears": r.linears.map { l in
                var linear: [String: Any] = ["name": l.name, "rows": l.rows, "columns": l.columns, "sparsity": l.sparsity, "seconds": l.seconds]
                if let e = l.errorBefore { linear["error_before"] = e }
                if let e = l.errorAfter { linear["error_after"] = e }
                if let rows = l.errorRows { linear["error_rows"] = rows }
                return linear
            },
        ]
        if let windows = r.outputErrorWindows { json["output_error_windows"] = windows }
        if let chosen = r.sparseLLMChosen { json["sparsellm_chosen_iteration"] = chosen }
        if let tokens = r.expertTokens { json["expert_tokens"] = tokens }
        if let b = r.besa { json["besa"] = besaBlock(b) }
        if let iterations = r.sparseLLM {
            json["sparsellm"] = iterations.map { i in
                ["iteration": i.iteration, "objective": i.objective, "terms": i.terms, "ffn_output_error": i.outputError,
                 "accepted": i.accepted] as [String: Any]
            }
        }
        return json
    }

    /// The fraction of a block's pruned weights that are zero, each linear weighted by its size.
    public static func blockSparsity(_ r: BlockReport) -> Double {
        var zeros = 0.0, total = 0.0
        for l in r.linears {
            let size = Double(l.rows * l.columns)
            zeros += (l.sparsity * size).rounded()
            total += size
        }
        return total > 0 ? zeros / total : 0
    }

    /// report.json's `besa` settings.
    public static func besaSettings(_ o: BESA.Options, targets: TargetMode) -> [String: Any] {
        ["epochs": o.epochs, "lr": o.learningRate, "lr_schedule": (o.schedule ?? .constant).rawValue, "penalty": o.penalty, "granularity": o.granularity.rawValue,
         "reconstruct": o.reconstruct, "targets": targets.rawValue, "candidates": BESA.steps + 1]
    }

    /// One block's BESA summary in report.json.
    public static func besaBlock(_ s: BESA.Summary) -> [String: Any] {
        ["expected_sparsity": s.expectedSparsity, "shift": s.shift, "steps": s.steps, "epoch_losses": s.epochLosses,
         "linears": s.linears.map { l in
             ["name": l.name, "learned_sparsity": l.learnedSparsity, "sparsity": l.sparsity,
              "row_sparsity_min": l.rowSparsityMin, "row_sparsity_max": l.rowSparsityMax] as [String: Any]
         }]
    }

    /// An SVG heatmap: one row per block, one column per projection, each cell the fraction of
    /// that linear's weights removed (the learned sparsity before the final shift in its tooltip).
    /// Diverging colours around the target: blue sparser, red denser, white at the target.
    public static func besaHeatmap(_ reports: [BlockReport], target: Double) -> String {
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
