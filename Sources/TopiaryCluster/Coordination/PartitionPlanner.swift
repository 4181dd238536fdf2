/// Splits the chain of blocks into contiguous ranges, one per worker, minimising the largest
/// range cost (exact, by dynamic programming over split points).
public enum PartitionPlanner {
    /// `costs[i]` is block i's cost (parameters × calibration tokens, or a measured time).
    public static func plan(costs: [Double], workers: Int) -> [Range<Int>] {
        plan(costs: costs, capacities: Array(repeating: 1, count: workers))
    }

    /// The same with workers of different speeds (`capacities[j]`: how many times one machine's
    /// rate worker j has, e.g. a stage of R replicas has R): range j, run by worker j, costs
    /// cost/capacity[j]. Workers beyond the blocks get no range.
    public static func plan(costs: [Double], capacities: [Double]) -> [Range<Int>] {
        let n = costs.count
        let k = max(1, min(capacities.count, n))
        let speed = capacities.isEmpty ? [1.0] : capacities.map { max($0, 1e-9) }
        if n == 0 { return [] }
        var prefix = [0.0]
        for c in costs { prefix.append(prefix.last! + c) }
        func cost(_ a: Int, _ b: Int) -> Double { prefix[b] - prefix[a] }
        // best[j][i]: the smallest achievable maximum for blocks 0..<i in j ranges.
        var best = [[Double]](repeating: [Double](repeating: .infinity, count: n + 1), count: k + 1)
        var split = [[Int]](repeating: [Int](repeating: 0, count: n + 1), count: k + 1)
        best[0][0] = 0
        for j in 1...k {
            for i in j...n {
                for s in (j - 1)..<i {
                    let v = max(best[j - 1][s], cost(s, i) / speed[j - 1])
                    // Ties go to the later split, so earlier ranges are not longer than later ones.
                    if v < best[j][i] || (v == best[j][i] && s > split[j][i]) {
                        best[j][i] = v
                        split[j][i] = s
                    }
                }
            }
        }
        var ranges: [Range<Int>] = []
        var end = n
        for j in stride(from: k, through: 1, by: -1) {
            let start = split[j][end]
            ranges.append(start..<end)
            end = start
        }
        return ranges.reversed()
    }
}
