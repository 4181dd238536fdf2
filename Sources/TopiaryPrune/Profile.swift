import Foundation
import TopiaryModel
import TopiaryTensor

/// Where a block's time goes (`prune --profile`): wall seconds per phase, and each phase's FLOPs
/// counted analytically from the shapes (not measured), so that a phase's time can be set
/// against the machine's sgemm rate.
public struct BlockProfile: Sendable, Codable, Equatable {
    public enum Phase: String, Sendable, CaseIterable {
        case load, denseForward = "dense_forward", statistics, solve, prunedForward = "pruned_forward"
        case errorMetrics = "error_metrics", spill, checkpoint, waiting
    }

    public struct Cost: Sendable, Codable, Equatable {
        public var seconds: Double
        public var flops: Double
        public init(seconds: Double = 0, flops: Double = 0) {
            self.seconds = seconds
            self.flops = flops
        }
    }

    /// Keyed by `Phase.rawValue`; a phase this build does not know (a newer worker's) is kept as it came.
    public var phases: [String: Cost] = [:]

    public init() {}

    public subscript(_ phase: Phase) -> Cost {
        get { phases[phase.rawValue] ?? Cost() }
        set { phases[phase.rawValue] = newValue }
    }

    public mutating func add(_ phase: Phase, seconds: Double, flops: Double = 0) {
        self[phase].seconds += seconds
        self[phase].flops += flops
    }

    public mutating func add(_ other: BlockProfile) {
        for (k, c) in other.phases {
            phases[k, default: Cost()].seconds += c.seconds
            phases[k, default: Cost()].flops += c.flops
        }
    }

    /// FLOPs of one block's forward pass over `sequences` windows of `sequenceLength` tokens: the
    /// linears (2 per multiply-add, from the family's cost) and causal attention (QKᵀ and PV over
    /// the lower triangle).
    public static func forwardFLOPs(_ c: ModelConfig, sequences: Int, sequenceLength: Int) -> Double {
        let t = Double(sequenceLength)
        let linears = 2 * Double(c.family.linearMACsPerToken(c)) * t
        return Double(sequences) * (linears + attentionFLOPs(c, sequenceLength: sequenceLength))
    }

    /// The head's logits for `rows` positions: the final norm aside, one [rows x hidden]·[hidden x vocabulary] product.
    public static func headFLOPs(_ c: ModelConfig, rows: Int) -> Double {
        2 * Double(rows) * Double(c.hiddenSize) * Double(c.vocabularySize)
    }

    /// Causal attention's QKᵀ and PV over one window's lower triangle.
    static func attentionFLOPs(_ c: ModelConfig, sequenceLength: Int) -> Double {
        let t = Double(sequenceLength)
        return 2 * 2 * (t * (t + 1) / 2) * Double(c.headDim * c.headCount)
    }

    /// BESA's learning of one block: per sequence and epoch, a forward pass (linears L plus causal
    /// attention A) and its backward: every linear's weight gradient (L), every input gradient but
    /// the block input's (L less 2·`firstGroupMACsPerToken` a token: the first input group, e.g.
    /// q/k/v, passes no gradient further down) and attention's (2.5A: the scores again, then the
    /// four products of the gradients). The final masks and `reconstruct`'s solves are not counted.
    public static func besaFLOPs(_ c: ModelConfig, sequences: Int, sequenceLength: Int, epochs: Int, firstGroupMACsPerToken: Int) -> Double {
        let attention = Double(sequences) * attentionFLOPs(c, sequenceLength: sequenceLength)
        let linears = forwardFLOPs(c, sequences: sequences, sequenceLength: sequenceLength) - attention
        let firstGroup = 2 * Double(firstGroupMACsPerToken) * Double(sequences * sequenceLength)
        return Double(epochs) * (3 * linears - firstGroup + 3.5 * attention)
    }

    /// SparseGPT's solve of a [rows x cols] weight: the factor of the damped Hessian's inverse
    /// (a Cholesky and a triangular inverse, about 2/3·cols³; none when `factored` is false, for
    /// a layer that reuses another's) and the column-by-column updates of every row (about rows·cols²).
    public static func sparseGPTFLOPs(rows: Int, cols: Int, factored: Bool = true) -> Double {
        let r = Double(rows), n = Double(cols)
        return (factored ? 2.0 / 3.0 * n * n * n : 0) + r * n * n
    }
}

/// A stopwatch for phases: `time(.phase) { ... }` adds the closure's wall seconds.
public struct PhaseTimer {
    public var profile = BlockProfile()
    public init() {}

    @discardableResult
    public mutating func time<T>(_ phase: BlockProfile.Phase, flops: Double = 0, _ body: () throws -> T) rethrows -> T {
        let t0 = Date()
        let r = try body()
        profile.add(phase, seconds: Date().timeIntervalSince(t0), flops: flops)
        return r
    }
}

/// The backend's sgemm rate in FLOP/s: the best of five [n x n]·[n x n]ᵀ products, after
/// products for a quarter of a second unmeasured.
public enum SgemmRate {
    /// Float32 GEMM rate of `backend` on square n x n x n products: the better of n = 1024 and
    /// 2048 on the CPU, n = 8192 on a GPU (where a smaller product is all launch and no
    /// arithmetic), or n = `size` alone.
    ///
    /// The warm-up is there because the first products of a process ran slower: the BLAS threads
    /// start, the cores' clocks rise. With one product before the best of three, `eval --profile`
    /// on a 2-core VM once measured 131 GFLOP/s where the forward pass then ran at 157. 2048 is
    /// there because 1024 alone read low on a 2-core Zen 3 VM whose neighbours come and go
    /// (OpenBLAS at 2 threads: 1024's 13 ms products gave 93-164 GFLOP/s in three rounds a second
    /// apart, 2048's 157-159), and a low rate makes the profile's ratios (FLOPs at this rate over
    /// seconds) read above what the machine allows. It still reads low when the neighbours are
    /// busy throughout (`eval --profile` there: 168.5 and then 127.1 GFLOP/s).
    public static func measure(size: Int? = nil, on backend: any ComputeBackend = CPUBackend()) -> Double {
        if size == nil && !(backend is CUDABackend) {
            return max(measure(size: 1024, on: backend), measure(size: 2048, on: backend))
        }
        let n = size ?? 8192
        var a = Matrix(rows: n, cols: n), b = Matrix(rows: n, cols: n)
        a.withUnsafeMutableBufferPointer { p in for i in p.indices { p[i] = Float(i % 7) * 0.25 - 0.75 } }
        b.withUnsafeMutableBufferPointer { p in for i in p.indices { p[i] = Float(i % 5) * 0.5 - 1 } }
        let (x, w) = (backend.upload(a), backend.upload(b))
        let warm = Date()
        repeat {
            _ = backend.linear(x, w)
            backend.synchronize()
        } while Date().timeIntervalSince(warm) < 0.25
        var best = Double.infinity
        for _ in 0..<5 {
            let t0 = Date()
            _ = backend.linear(x, w)
            backend.synchronize()
            best = min(best, Date().timeIntervalSince(t0))
        }
        return 2 * Double(n) * Double(n) * Double(n) / max(best, 1e-9)
    }
}
