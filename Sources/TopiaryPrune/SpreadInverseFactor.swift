import TopiaryTensor

/// U, the upper Cholesky factor of the inverse damped Hessian, for a linear whose rows the
/// replicas share (`BlockPruner.solveSharedRows`), computed by all of them instead of its owner
/// alone (at a 70B's down_proj, 2/3 · 28672³ FLOPs a block). The blocked factorisation of
/// `InverseFactorTiles` is spread by tile columns: tile column t belongs to replica t mod R.
///
/// 1. The owner (who holds the damped Hessian A) reverses it (JAJ) and sends each tile column
///    to its holder.
/// 2. Panel by panel, k = 0, 1, …: panel k's holder factors it and broadcasts it down the tree;
///    every replica applies it to the tile columns it holds. The holder of panel k + 1 updates
///    that column first and factors and sends it before its other updates (one panel of
///    look-ahead), so the next panel is on its way while the replicas update.
/// 3. Every replica now has all of L; it computes L⁻¹'s tile columns it holds, and each tile
///    column of L⁻¹ is broadcast by its holder, in order. U = J L⁻¹ J on every replica.
///
/// Each tile is the one BLAS call that the one-process factorisation makes for it, on the same
/// values, so U has the bits of `Linalg.inverseCholeskyUpper` for any R. A panel that is not
/// positive definite is broadcast as its error, so the replicas that get it throw the error one
/// process throws, and the others (once the failing replica has failed the exchange) an error
/// that names it. On the wire each replica receives about n² floats (L and L⁻¹, the lower halves),
/// where today's alternative, the owner's U down the tree, is n² too; the owner sends its
/// half of JAJ once.
///
/// Used between processes on the CPU backend (`applies`). Replicas in one process share memory
/// and the backend already spreads a factorisation over every core, so there the owner factors
/// and U goes to all as one buffer; another backend (CUDA) factors on its device with its own
/// routine, whose bits these host tiles would not reproduce.
public enum SpreadInverseFactor {
    public static func holder(ofTile t: Int, replicas: Int) -> Int { t % replicas }

    /// Whether `BlockPruner.solveSharedRows` makes U this way for these replicas and backend.
    public static func applies(_ exchange: any ReplicaExchange, backend: any ComputeBackend) -> Bool {
        exchange.role.count > 1 && !exchange.sharesMemory && backend is CPUBackend
    }

    /// U [n x n] on every replica. `damped`: the damped Hessian on `owner` (given up to this
    /// call), nil elsewhere. `what` names the matrix in errors, as `SparseGPTPruner.factor` does.
    public static func compute(_ exchange: any ReplicaExchange, block: Int, name: String, owner: Int,
                               damped: consuming Matrix?, order n: Int, what: String) throws -> Matrix {
        let role = exchange.role
        let replicas = role.count
        func key(_ kind: ReplicaKey.Kind, _ index: Int) -> ReplicaKey { ReplicaKey(block: block, kind: kind, name: name, index: index) }
        func holder(_ t: Int) -> Int { Self.holder(ofTile: t, replicas: replicas) }
        func place(_ value: ReplicaValue, _ kind: ReplicaKey.Kind, _ t: Int, from: Int, shape: (rows: Int, cols: Int),
                   into set: (Matrix) -> Void) throws {
            switch value {
            case .matrix(let m) where m.rows == shape.rows && m.cols == shape.cols: set(m)
            case .bytes(let b) where kind == .factorPanel: throw PruneError.numerical(String(decoding: b, as: UTF8.self))
            default:
                throw ReplicaError("block \(block): \(name): \(kind) \(t) (from replica \(from)) is missing or not \(shape.rows)x\(shape.cols)")
            }
        }

        var f: InverseFactorTiles
        if role.rank == owner {
            var given = consume damped
            guard let a = given.take(), a.rows == n, a.cols == n else {
                throw PruneError.shape("block \(block): \(name): the owner has no \(n)x\(n) damped Hessian to factor")
            }
            f = InverseFactorTiles(reversing: consume a)
            for t in 0..<f.tiles where holder(t) != owner {
                try exchange.send(key(.factorColumn, t), .matrix(f.column(t)), to: holder(t))
            }
        } else {
            f = InverseFactorTiles(order: n)
            for t in 0..<f.tiles where holder(t) == role.rank {
                try place(try exchange.receive(key(.factorColumn, t)), .factorColumn, t, from: owner, shape: f.columnShape(t)) { f.setColumn(t, $0) }
            }
        }
        let tiles = f.tiles
        let mine = (0..<tiles).filter { holder($0) == role.rank }

        func factorAndSend(_ k: Int) throws {
            do {
                try f.factorPanel(k, what: what)
            } catch {
                let message = "\(error)"
                _ = try exchange.broadcast(key(.factorPanel, k), .bytes(Array(message.utf8)), root: role.rank)
                throw PruneError.numerical(message)
            }
            _ = try exchange.broadcast(key(.factorPanel, k), .matrix(f.column(k)), root: role.rank)
        }
        var factoredAhead = -1
        for k in 0..<tiles {
            let root = holder(k)
            if root == role.rank {
                if factoredAhead != k { try factorAndSend(k) }
            } else {
                try place(try exchange.broadcast(key(.factorPanel, k), nil, root: root), .factorPanel, k, from: root,
                          shape: f.columnShape(k)) { f.setColumn(k, $0) }
            }
            let later = mine.filter { $0 > k }
            if k + 1 < tiles, holder(k + 1) == role.rank {
                f.update(panel: k, columns: [k + 1])
                try factorAndSend(k + 1)
                factoredAhead = k + 1
                f.update(panel: k, columns: Array(later.dropFirst()))
            } else {
                f.update(panel: k, columns: later)
            }
        }

        do {
            try f.invert(mine, what: what)
        } catch {
            throw PruneError.numerical("block \(block): \(error) (tile columns \(mine.map(String.init).joined(separator: ", ")) of L⁻¹ on replica \(role.rank))")
        }
        f.releaseFactor()
        for t in 0..<tiles {
            let root = holder(t)
            if root == role.rank {
                _ = try exchange.broadcast(key(.inverseColumn, t), .matrix(f.inverseColumn(t)), root: root)
            } else {
                try place(try exchange.broadcast(key(.inverseColumn, t), nil, root: root), .inverseColumn, t, from: root,
                          shape: f.columnShape(t)) { f.setInverseColumn(t, $0) }
            }
        }
        return f.upperFactor()
    }
}
