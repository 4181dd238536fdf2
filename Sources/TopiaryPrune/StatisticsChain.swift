import Foundation
import TopiaryTensor

/// The statistics of a block's linears (H and the squared norms) when the replicas of a stage
/// share it: each replica holds its own windows' inputs (a contiguous range, `ReplicaRole`), and
/// the statistics travel down the chain of replicas 0, 1, ..., R−1, one part at a time, each
/// replica adding its windows to a part before it passes it on; the last hands the finished parts
/// to the group's owner, which solves its linears.
///
/// Every element of H is thus updated by the windows in window order, with the decay and scale
/// one process uses (`LayerStatistics.add`), by the same blocks of the same BLAS calls: the bits
/// do not depend on the number of replicas. The parts are the squared norms (with the count of
/// windows and tokens that reached the linear, which an expert's router decides) and H's upper
/// triangle in pieces (`ComputeBackend.statisticsPieces`: each strip of tile rows from its
/// diagonal on, cut into pieces of at most `maxColumns` columns). Since every replica works
/// through the parts in the same order, replica r works on part p + 1 while replica r + 1 works on
/// part p: a pipeline whose fill is one batch of pieces per replica, and each replica does 1/R of
/// every group's update. What crosses each link is H's upper triangle once (d²/2 floats per
/// group), whatever the calibration set's size; replicas that sent their windows' inputs to the
/// owner sent tokens·d floats each.
struct StatisticsChain {
    let exchange: any ReplicaExchange
    let backend: any ComputeBackend
    let block: Int
    let hessian: Bool
    /// The calibration windows, and the most tokens one window can bring to a group: a peer's
    /// counts beyond them are refused.
    let windows: Int
    let tokensPerWindow: Int
    /// The widest piece of H that travels (`ComputeBackend.statisticsPieces`): the chain's fill
    /// is one piece per replica, so a narrow piece lets the last replica start sooner.
    var maxColumns = StatisticsChain.pieceColumns
    /// Blocks of the update a replica computes in one pass before it passes them on.
    var batchBlocks = CPUBackend.threadCount

    /// 4096: at a 70B's 28672-wide down_proj a strip of 256 rows travels in 7 pieces, and 16
    /// replicas wait about 0.3 s for the chain to fill rather than 1.8 s (docs/scaling.md).
    static let pieceColumns = 4096

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
            // The pieces of H, in batches of the threads' worth of blocks.
            let pieces = hessian ? backend.statisticsPieces(columns: d, maxColumns: maxColumns) : []
            for batch in batches(pieces) {
                var held: [UpperPiece?] = []
                for j in batch {
                    let shape = pieces[j]
                    var values: Tensor?
                    if role.rank > 0 {
                        switch try receive(message(j + 1)) {
                        case .absent where before == 0: values = nil
                        case .matrix(let m) where before > 0 && m.rows == shape.rows.count && m.cols == shape.columns.count: values = backend.upload(m)
                        default:
                            throw ReplicaError("block \(block): replica \(role.rank - 1) sent no \(shape.rows.count)x\(shape.columns.count) piece \(j) (rows \(shape.rows), columns \(shape.columns)) of \(key)'s Hessian after \(before) windows")
                        }
                    }
                    if values == nil && !mine.isEmpty { values = backend.zeros(rows: shape.rows.count, cols: shape.columns.count) }
                    held.append(values.map { UpperPiece(rows: shape.rows, columns: shape.columns, values: $0) })
                }
                if !mine.isEmpty {
                    let live = held.compactMap { $0 }
                    let entries = batch.reduce(0.0) { $0 + Double(pieces[$1].upperEntries) }
                    LayerStatistics.addHessianPieces(mine, before: before, pieces: live, on: backend)
                    out.flops += 2 * Double(mine.reduce(0) { $0 + $1.rows }) * entries
                }
                for (j, piece) in zip(batch, held) {
                    if keeps {
                        if let piece { finished?.setUpperPiece(piece) }
                    } else {
                        try pass(j + 1, piece.map { .matrix(backend.download($0.values)) } ?? .absent)
                    }
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
            for (j, shape) in (hessian ? backend.statisticsPieces(columns: d, maxColumns: maxColumns) : []).enumerated() {
                switch try receive(message(j + 1)) {
                case .absent where h.count == 0: continue
                case .matrix(let m) where h.count > 0 && m.rows == shape.rows.count && m.cols == shape.columns.count:
                    st!.setUpperPiece(UpperPiece(rows: shape.rows, columns: shape.columns, values: backend.upload(m)))
                default: throw ReplicaError("block \(block): replica \(last) sent no finished \(shape.rows.count)x\(shape.columns.count) piece \(j) (rows \(shape.rows), columns \(shape.columns)) of \(key)'s Hessian")
                }
            }
            out.statistics[key] = st
        }
        return out
    }

    /// The pieces' indices in batches: consecutive pieces until a batch holds `batchBlocks` of the
    /// update's blocks (the threads' worth), each batch updated in one pass and then passed on.
    /// A batch is this replica's own affair (the pieces travel one by one), so replicas with other
    /// thread counts still agree.
    func batches(_ pieces: [UpperPieceShape]) -> [Range<Int>] {
        var out: [Range<Int>] = []
        var start = 0, blocks = 0
        for (j, piece) in pieces.enumerated() {
            blocks += piece.blocks
            if blocks >= batchBlocks || j == pieces.count - 1 {
                out.append(start..<(j + 1))
                (start, blocks) = (j + 1, 0)
            }
        }
        return out
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
