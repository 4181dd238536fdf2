import Foundation
import TopiaryPrune

/// `prune --profile`: the pruned blocks' phases, summed over blocks, against the sgemm rate.
public enum ProfileReport {
    public typealias Phase = BlockProfile.Phase

    public static func totals(_ reports: [BlockReport]) -> BlockProfile {
        var total = BlockProfile()
        for r in reports { if let p = r.profile { total.add(p) } }
        return total
    }

    /// FLOPs at the sgemm rate over the seconds taken: 1 is the floor; nil when either is zero.
    public static func ratio(_ c: BlockProfile.Cost, sgemmRate: Double) -> Double? {
        c.flops > 0 && c.seconds > 0 && sgemmRate > 0 ? c.flops / sgemmRate / c.seconds : nil
    }

    /// One phase in JSON: seconds, FLOPs and the ratio (null when there is none).
    public static func costJSON(_ c: BlockProfile.Cost, sgemmRate: Double) -> [String: Any] {
        ["seconds": c.seconds, "flops": c.flops, "ratio": ratio(c, sgemmRate: sgemmRate).map { $0 as Any } ?? NSNull()]
    }

    /// A table row's last two columns: GFLOP/s and the ratio, "-" where there is none.
    public static func rateColumns(_ c: BlockProfile.Cost, sgemmRate: Double) -> String {
        let rate = c.seconds > 0 && c.flops > 0 ? String(format: "%9.1f", c.flops / c.seconds / 1e9) : String(repeating: " ", count: 8) + "-"
        return rate + " " + (ratio(c, sgemmRate: sgemmRate).map { String(format: "%6.3f", $0) } ?? "     -")
    }

    public static func phasesJSON(_ p: BlockProfile, sgemmRate: Double) -> [String: Any] {
        var json: [String: Any] = [:]
        for phase in Phase.allCases { json[phase.rawValue] = costJSON(p[phase], sgemmRate: sgemmRate) }
        return json
    }

    /// report.json's "profile": the rate, the totals, the run's time outside the blocks' phases, and each block's phases.
    public static func json(_ reports: [BlockReport], sgemmRate: Double, pruneSeconds: Double) -> [String: Any] {
        let total = totals(reports)
        let measured = total.phases.values.reduce(0) { $0 + $1.seconds }
        return [
            "sgemm_flops_per_second": sgemmRate,
            "phases": phasesJSON(total, sgemmRate: sgemmRate),
            "outside_blocks_seconds": max(0, pruneSeconds - measured),
            "blocks": reports.map { r in ["block": r.block, "phases": phasesJSON(r.profile ?? BlockProfile(), sgemmRate: sgemmRate)] as [String: Any] },
        ]
    }

    public static func table(_ reports: [BlockReport], sgemmRate: Double, pruneSeconds: Double) -> String {
        let total = totals(reports)
        let measured = total.phases.values.reduce(0) { $0 + $1.seconds }
        let blocks = max(reports.count, 1)
        var lines = [String(format: "profile over %d pruned blocks (sgemm rate %.1f GFLOP/s; ratio = FLOPs at that rate / seconds)", reports.count, sgemmRate / 1e9),
                     "phase            seconds  s/block  share     GFLOP   GFLOP/s  ratio"]
        func row(_ name: String, _ c: BlockProfile.Cost) -> String {
            let share = pruneSeconds > 0 ? 100 * c.seconds / pruneSeconds : 0
            return name.padding(toLength: 15, withPad: " ", startingAt: 0)
                + String(format: " %8.2f  %7.3f  %4.1f%%  %8.1f ", c.seconds, c.seconds / Double(blocks), share, c.flops / 1e9)
                + rateColumns(c, sgemmRate: sgemmRate)
        }
        for phase in Phase.allCases { lines.append(row(phase.rawValue, total[phase])) }
        var outside = BlockProfile.Cost()
        outside.seconds = max(0, pruneSeconds - measured)
        lines.append(row("outside blocks", outside))
        var all = BlockProfile.Cost()
        all.seconds = pruneSeconds
        all.flops = total.phases.values.reduce(0) { $0 + $1.flops }
        lines.append(row("total", all))
        return lines.joined(separator: "\n")
    }
}
