import Foundation
import TopiaryModel
import TopiaryTensor

/// Everything a pruning run needs besides the model.
public struct PruneJob: Sendable {
    public var plan: PrunePlan
    /// Calibration windows, each `sequenceLength` token ids.
    public var calibration: [[Int]]
    public var sequenceLength: Int
    /// Blocks to prune; the others are run dense (the SparseLLM paper pruned only the first half).
    public var layers: ClosedRange<Int>?
    /// Bytes of calibration activations kept in memory; beyond it they go to `workDirectory`.
    public var memoryBudget: Int
    public var workDirectory: String

    public init(plan: PrunePlan, calibration: [[Int]], sequenceLength: Int, layers: ClosedRange<Int>?,
                memoryBudget: Int, workDirectory: String) {
        self.plan = plan
        self.calibration = calibration
        self.sequenceLength = sequenceLength
        self.layers = layers
        self.memoryBudget = memoryBudget
        self.workDirectory = workDirectory
    }

    public func prunes(_ block: Int) -> Bool { layers?.contains(block) ?? true }
}

/// The sequential, streaming driver: embeddings, then for each block: load only that block, prune
/// it from its inputs (statistics from a dense pass), run the pruned block to produce the next
/// block's inputs, write it out, release it. Memory holds one block and the activations.
public struct PrunePipeline: Sendable {
    public let model: LanguageModel
    public let job: PruneJob
    public let store: BlockFileStore

    public init(model: LanguageModel, job: PruneJob, store: BlockFileStore) {
        self.model = model
        self.job = job
        self.store = store
    }

    /// Runs the job; `progress` is called after each block with its report (nil when the block
    /// was only run, not pruned). Returns the reports of the pruned blocks.
    public func run(progress: (_ block: Int, _ report: BlockReport?) -> Void) throws -> [BlockReport] {
        let c = model.config
        if let layers = job.layers, layers.upperBound >= c.layerCount {
            throw PruneError.invalidOption("--layers \(layers.lowerBound)-\(layers.upperBound) runs past the model's \(c.layerCount) blocks (0-\(c.layerCount - 1))")
        }
        guard job.sequenceLength <= c.maxPositions else {
            throw PruneError.invalidOption("--calib-seqlen \(job.sequenceLength) is longer than the model's context of \(c.maxPositions)")
        }
        for w in job.calibration {
            if let bad = w.first(where: { $0 < 0 || $0 >= c.vocabularySize }) {
                throw PruneError.calibration("token id \(bad) is outside the model's vocabulary of \(c.vocabularySize)")
            }
        }
        // Three stores live at once (inputs, dense outputs, pruned outputs): split the budget.
        var inputs = ActivationStore(count: job.calibration.count, rows: job.sequenceLength, cols: c.hiddenSize,
                                     budgetBytes: job.memoryBudget / 3, spillDirectory: job.workDirectory)
        // SparseLLM with dense targets also carries the dense model's activations.
        var denseInputs: ActivationStore? = job.plan.needsDenseStream ? inputs.makeSibling() : nil
        do {
            let embedding = try model.loadEmbedding()
            for (s, window) in job.calibration.enumerated() {
                let x = embedding.embed(window, sequenceLength: job.sequenceLength)
                try inputs.set(s, x)
                try denseInputs?.set(s, x)
            }
        }
        let pruner = BlockPruner(plan: job.plan)
        let rope = c.ropeTable(positions: job.sequenceLength)
        var reports: [BlockReport] = []
        for i in 0..<c.layerCount {
            let block = try model.loadBlock(i)
            if job.prunes(i) {
                let (pruned, outputs, report) = try pruner.prune(block: block, inputs: inputs, targets: denseInputs,
                                                                 sequenceLength: job.sequenceLength)
                try store.write(pruned)
                inputs = outputs
                reports.append(report)
                progress(i, report)
            } else {
                let outputs = inputs.makeSibling()
                for s in 0..<inputs.count {
                    try outputs.set(s, block.forward(try inputs.get(s), sequenceLength: job.sequenceLength, rope: rope))
                }
                inputs = outputs
                progress(i, nil)
            }
            if let dense = denseInputs {
                let next = dense.makeSibling()
                for s in 0..<dense.count {
                    try next.set(s, block.forward(try dense.get(s), sequenceLength: job.sequenceLength, rope: rope))
                }
                denseInputs = next
            }
        }
        return reports
    }

    /// The pruned model: the original with every pruned block read from the store.
    public func prunedModel() throws -> LanguageModel {
        let pruned = (0..<model.config.layerCount).filter { job.prunes($0) }
        return model.overlaid(with: try store.sources(pruned))
    }
}
