import Foundation
import TopiaryTensor

/// The statistics of a block's linears (H and the squared norms) when the replicas of a stage
/// share it: each replica holds its own windows' inputs (a contiguous range, `ReplicaRole`), and
/// the statistics travel down the chain of replicas 0, 1, ..., R−1, one part at a time, each
/// replica adding its windows to a part before it passes it on; the last hands the finished parts
/// to the group's owner, which solves its linears.
///
/// Every element of H is thus updated by the windows in window order, with the decay and scale
/// one process uses (`LayerStatistics.add`), by the same strips of the same BLAS calls: the bits
/// do not depend on the number of replicas. The parts are the squared norms (with the count of
/// windows and tokens that reached the linear, which an expert's router decides) and H's strips
/// of `ComputeBackend.statisticsTile` rows. Since every replica works through the parts in the
/// same order, replica r works on part p + 1 while replica r + 1 works on part p: a pipeline
/// whose fill is one part per replica, and each replica does 1/R of every group's update. What
/// crosses each link is H once (d² floats per group), whatever the calibration set's size;
/// replicas that sent their windows' inputs to the owner sent tokens·d floats each.
struct StatisticsChain {
    let exchange: any ReplicaExchange
    let backend: any ComputeBackend
    let block: Int
    let hessian: Bool
    /// The calibration windows, and the most tokens one window can bring to a group: a peer's
    /// counts beyond them are refused.
    let windows: Int
    let tokensPerWindow: Int

    struct Outcome {
        /// The owner's statistics (none for a group no window reached).
        var statistics: [String: LayerStatistics] = [:]
        /// Tokens that reached each group this replica owns.
        var tokens: [String: Int] = [:]
        /// FLOPs of this replica's updates, and seconds it waited for parts.
        var flops = 0.0, waiting = 0.0
    }

    /// Passes every group in `groups` (key -> columns) down the chain with this replica's windows'
    /// inputs `held` (key -> inputs in window order; a key no window of this replica reached is
    /// absent), and gathers on each owner (`owners`, key -> rank) its finished statistics.
    func run(groups: [String: Int], held: [String: [Tensor]], owners: [String: Int]) throws -> Outcome {
        let role = exchange.role
        let last = role.count - 1
        var out = Outcome()
        func clock() -> Date { Date() }
        func receive(_ key: ReplicaKey) throws -> ReplicaValue {
            let t0 = clock()
            defer { out.waiting += clock().timeIntervalSince(t0) }
            return try exchange.receive(key)
        }
        // The groups the last replica owns: finished here, strip by strip, in the owner's H.
        var kept: [String: (tokens: Int, statistics: LayerStatistics?)] = [:]
        let ordered = groups.sorted { $0.key < $1.key }
        for (key, d) in ordered {
            let owner = owners[key] ?? 0
            let mine = held[key] ?? []
            func message(_ part: Int) -> ReplicaKey { ReplicaKey(block: block, kind: .chainedStatistics, name: key, index: part) }
            /// Where this replica's result of a part goes: the next replica, or the owner.
            func pass(_ part: Int, _ value: ReplicaValue) throws {
                if role.rank < last {
                    try exchange.send(message(part), value, to: role.rank + 1)
                } else {
                    try exchange.send(ReplicaKey(block: block, kind: .finishedStatistics, name: key, index: part), value, to: owner)
                }
            }
            let keeps = role.rank == last && owner == last
            // Part 0: the count of windows and tokens before this replica's, and the squared norms.
            var before = 0, tokens = 0
            let norms: Tensor
            if role.rank == 0 {
                norms = backend.zeros(rows: 1, cols: d)
            } else {
                let (count, seen, values) = try header(try receive(message(0)), key: key, columns: d, from: role.rank - 1,
                                                       windows: ReplicaRole.range(role.rank, of: role.count, total: windows).lowerBound)
                (before, tokens) = (count, seen)
                norms = backend.upload(values)
            }
            for (i, x) in mine.enumerated() {
                precondition(x.cols == d, "block \(block): \(key)'s inputs are \(x.cols) wide, its statistics \(d)")
                LayerStatistics.addSquaredNorms(x, before: before + i, into: norms, on: backend)
                tokens += x.rows
                out.flops += Double(x.rows * d)
            }
            let count = before + mine.count
            var finished: LayerStatistics?
            if keeps {
                if count > 0 {
                    finished = LayerStatistics(columns: d, backend: backend, hessian: hessian)
                    finished!.restore(sequences: count, squaredNorms: norms)
                }
            } else {
                try pass(0, .bytes(BlockPruner.encode([Double(count), Double(tokens)] + backend.download(norms).values.map(Double.init))))
            }
            // The strips of H.
            for (j, rows) in (hessian ? strips(columns: d) : []).enumerated() {
                var strip: Tensor?
                if role.rank > 0 {
                    switch try receive(message(j + 1)) {
                    case .absent where before == 0: strip = nil
                    case .matrix(let m) where before > 0 && m.rows == rows.count && m.cols == d: strip = backend.upload(m)
                    default:
                        throw ReplicaError("block \(block): replica \(role.rank - 1) sent no \(rows.count)x\(d) strip \(j) of \(key)'s Hessian after \(before) windows")
                    }
                }
                if !mine.isEmpty {
                    let s = strip ?? backend.zeros(rows: rows.count, cols: d)
                    for (i, x) in mine.enumerated() {
                        LayerStatistics.addHessianRows(x, before: before + i, strip: s, rows: rows, on: backend)
                        out.flops += Double(x.rows) * Double(rows.count) * Double(2 * d - rows.lowerBound - rows.upperBound + 1)
                    }
                    strip = s
                }
                if keeps {
                    if let strip { finished?.setUpperRows(rows, strip) }
                } else {
                    try pass(j + 1, strip.map { .matrix(backend.download($0)) } ?? .absent)
                }
            }
            if keeps { kept[key] = (tokens, finished) }
        }
        // The owners put their finished statistics together, once this replica has passed every
        // group on (waiting for a group's last part before passing the next would stall the chain).
        for (key, d) in ordered where (owners[key] ?? 0) == role.rank {
            if let k = kept[key] {
                out.tokens[key] = k.tokens
                out.statistics[key] = k.statistics
                continue
            }
            func message(_ part: Int) -> ReplicaKey { ReplicaKey(block: block, kind: .finishedStatistics, name: key, index: part) }
            let h = try header(try receive(message(0)), key: key, columns: d, from: last, windows: windows)
            out.tokens[key] = h.tokens
            var st: LayerStatistics?
            if h.count > 0 {
                st = LayerStatistics(columns: d, backend: backend, hessian: hessian)
                st!.restore(sequences: h.count, squaredNorms: backend.upload(h.norms))
            }
            for (j, rows) in (hessian ? strips(columns: d) : []).enumerated() {
                switch try receive(message(j + 1)) {
                case .absent where h.count == 0: continue
                case .matrix(let m) where h.count > 0 && m.rows == rows.count && m.cols == d: st!.setUpperRows(rows, backend.upload(m))
                default: throw ReplicaError("block \(block): replica \(last) sent no finished \(rows.count)x\(d) strip \(j) of \(key)'s Hessian")
                }
            }
            out.statistics[key] = st
        }
        return out
    }

    /// H's parts: strips of `statisticsTile` rows (all rows at once on a backend without one).
    func strips(columns d: Int) -> [Range<Int>] {
        guard let tile = backend.statisticsTile(columns: d), tile > 0 else { return [0..<d] }
        return stride(from: 0, to: d, by: tile).map { $0..<min(d, $0 + tile) }
    }

    /// Part 0 as it travels: [windows, tokens, the d squared norms], as doubles; at most
    /// `windows` windows (those before the receiver's) of at most `tokensPerWindow` tokens each.
    private func header(_ value: ReplicaValue, key: String, columns d: Int, from rank: Int, windows: Int) throws -> (count: Int, tokens: Int, norms: Matrix) {
        guard case .bytes(let b) = value, let v = BlockPruner.decode(b), v.count == d + 2,
              let count = Int(exactly: v[0]), let tokens = Int(exactly: v[1]) else {
            throw ReplicaError("block \(block): replica \(rank) sent no readable count and squared norms for \(key) (\(d) columns)")
        }
        guard (0...windows).contains(count), (0...count * tokensPerWindow).contains(tokens) else {
            throw ReplicaError("block \(block): replica \(rank) counts \(count) windows and \(tokens) tokens for \(key), expected at most \(windows) windows of \(tokensPerWindow) tokens")
        }
        return (count, tokens, Matrix(rows: 1, cols: d, values: v[2...].map { Float($0) }))
    }
}
