import Foundation
import TopiaryModel
import TopiaryPrune
import TopiaryTensor

/// Something that prunes a range of blocks: this process (`InProcessWorker`) or a worker
/// process over TCP (`RemoteWorker`). Both run `RangePruner`, so results are identical.
public protocol WorkerLink: AnyObject {
    var name: String { get }
    /// Runs `range` from `boundary`, reporting each block as it finishes; returns the boundary after it.
    func run(_ range: Range<Int>, job: PruneJob, from boundary: Boundary,
             onBlock: (_ index: Int, _ pruned: DecoderBlock?, _ report: BlockReport?) throws -> Void) throws -> Boundary
}

/// Runs ranges in this process.
public final class InProcessWorker: WorkerLink {
    public let model: LanguageModel
    public let name: String
    public init(model: LanguageModel, name: String = "in-process") {
        self.model = model
        self.name = name
    }

    public func run(_ range: Range<Int>, job: PruneJob, from boundary: Boundary,
                    onBlock: (Int, DecoderBlock?, BlockReport?) throws -> Void) throws -> Boundary {
        try RangePruner(model: model, job: job).run(range, from: boundary, onBlock: onBlock)
    }
}

/// How partitions are coordinated.
public enum Coordination: String, Sendable, CaseIterable {
    /// Worker k starts from worker k−1's pruned boundary activations: the single-process result, bit for bit.
    case sequential
}

/// The coordinator: plans contiguous block ranges over the workers and runs them. The local run is
/// this with one in-process worker.
public struct Coordinator {
    public let model: LanguageModel
    public let job: PruneJob
    public let store: BlockFileStore
    public let workers: [WorkerLink]

    public init(model: LanguageModel, job: PruneJob, store: BlockFileStore, workers: [WorkerLink]) {
        self.model = model
        self.job = job
        self.store = store
        self.workers = workers
    }

    /// Block costs for planning: parameters × calibration tokens.
    public func blockCosts() -> [Double] {
        let c = model.config
        let perBlock = Double(c.hiddenSize * (c.queryDim + 2 * c.kvDim) + c.queryDim * c.hiddenSize
                              + (c.architecture == .llama ? 3 : 2) * c.hiddenSize * c.intermediateSize)
        return Array(repeating: perBlock * Double(job.samples * job.sequenceLength), count: c.layerCount)
    }

    public func plan() -> [Range<Int>] { PartitionPlanner.plan(costs: blockCosts(), workers: workers.count) }

    /// Runs the job over the workers in sequence; pruned blocks go to the store as they arrive.
    public func run(progress: (_ block: Int, _ report: BlockReport?) -> Void) throws -> [BlockReport] {
        let pipeline = PrunePipeline(model: model, job: job, store: store)
        try pipeline.validate()
        var boundary = try pipeline.embed()
        var reports: [BlockReport] = []
        for (range, worker) in zip(plan(), workers) {
            boundary = try worker.run(range, job: job, from: boundary) { index, pruned, report in
                if let pruned { try store.write(pruned) }
                if let report { reports.append(report) }
                progress(index, report)
            }
        }
        return reports
    }
}
