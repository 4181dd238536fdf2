import Foundation
import TopiaryModel
import TopiaryPrune
import TopiaryTensor

/// Whether the largest block's prune fits the memory a process may use (`BlockMemory`, a lower
/// bound, against `MemoryLimit`): `prune` checks its own process before it writes anything, and
/// a worker checks itself when a job is assigned, so a run that cannot fit is refused at the
/// start instead of being killed for memory an hour in.
public enum MemoryCheck {
    public enum Outcome: Equatable, Sendable {
        case fits
        /// Within a fifth of the limit: the run goes on, with this warning.
        case near(String)
        case refused(String)
    }

    /// What the largest block holds at least in host memory, for `backend`. A replica of a
    /// stage in a process of its own (`replicas` > 1) keeps about its share of the windows, and
    /// may not be the one that solves SparseLLM's feed-forward: only that share is counted.
    public static func need(_ config: ModelConfig, plan: PrunePlan, samples: Int, sequenceLength: Int, budget: Int,
                            backend: any ComputeBackend, replicas: Int = 1) -> BlockMemory {
        let share = replicas > 1 ? samples / replicas : samples
        let (tokens, overflow) = share.multipliedReportingOverflow(by: sequenceLength)
        var need = BlockMemory.lowerBound(config, plan: plan, tokens: overflow ? Int.max : tokens, budget: budget)
        if replicas > 1 { (need.hessians, need.solver) = (0, 0) }
        // On a GPU the Hessians and the solver's variables live in device memory; in Float64
        // they are twice as wide.
        if !(backend is CPUBackend || backend is Float64Backend) { (need.hessians, need.solver) = (0, 0) }
        if backend is Float64Backend { (need.hessians, need.solver) = (need.hessians * 2, need.solver * 2) }
        return need
    }

    /// `need` (from `need(...)`, for `method` with `samples` x `sequenceLength` calibration
    /// tokens) against `limit`; `who` names the process in the message ("this process", "this
    /// worker").
    public static func check(_ need: BlockMemory, method: PruneMethod, samples: Int, sequenceLength: Int,
                             limit: MemoryLimit = .current, who: String = "this process") -> Outcome {
        let method = method.rawValue
        if need.total > limit.bytes {
            var parts = ["the largest block's weights \(MemoryLimit.describe(need.weights))",
                         "activations kept in memory \(MemoryLimit.describe(need.activations))"]
            if need.hessians > 0 { parts.append("input Hessians \(MemoryLimit.describe(need.hessians))") }
            if need.solver > 0 { parts.append("SparseLLM's variables for every token \(MemoryLimit.describe(need.solver))") }
            return .refused("\(method) with \(samples) x \(sequenceLength) calibration tokens needs at least \(MemoryLimit.describe(need.total)) at once (\(parts.joined(separator: ", "))), more than the \(MemoryLimit.describe(limit.bytes)) \(who) may use (\(limit.source)); use fewer --calib-samples or a shorter --calib-seqlen, a smaller --memory-budget, or machines or a job with more memory")
        }
        if need.total > limit.bytes / 10 * 8 {
            return .near("\(method) with \(samples) x \(sequenceLength) calibration tokens holds at least \(MemoryLimit.describe(need.total)) at once, near the \(MemoryLimit.describe(limit.bytes)) \(who) may use (\(limit.source)); the run may be killed for memory")
        }
        return .fits
    }
}
