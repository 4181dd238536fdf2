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

    /// Runs every block dense (the dense pass that gives ADMM its boundary targets).
    public var denseOnly = false

    public func prunes(_ block: Int) -> Bool { !denseOnly && (layers?.contains(block) ?? true) }

    /// Calibration windows (a worker that receives activations knows only their number).
    public var samples: Int { calibration.count }
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

    /// Checks the job against the model before any work.
    public func validate() throws {
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
    }

    /// The calibration windows embedded: the boundary in front of block 0.
    public func embed() throws -> Boundary {
        let c = model.config
        let inputs = RangePruner.store(job: job, config: c)
        // SparseLLM with dense targets also carries the dense model's activations.
        let targets: ActivationStore? = job.plan.needsDenseStream ? inputs.makeSibling() : nil
        let embedding = try model.loadEmbedding()
        for (s, window) in job.calibration.enumerated() {
            let x = embedding.embed(window, sequenceLength: job.sequenceLength)
            try inputs.set(s, x)
            try targets?.set(s, x)
        }
        return Boundary(inputs: inputs, targets: targets)
    }

    /// Runs the whole job in this process; `progress` is called after each block with its report
    /// (nil when the block was only run, not pruned). Returns the reports of the pruned blocks.
    public func run(progress: (_ block: Int, _ report: BlockReport?) -> Void) throws -> [BlockReport] {
        try validate()
        var reports: [BlockReport] = []
        _ = try RangePruner(model: model, job: job).run(0..<model.config.layerCount, from: try embed()) { index, pruned, report in
            if let pruned { try store.write(pruned) }
            if let report { reports.append(report) }
            progress(index, report)
        }
        return reports
    }

    /// The pruned model: the original with every pruned block read from the store.
    public func prunedModel() throws -> LanguageModel {
        let pruned = (0..<model.config.layerCount).filter { job.prunes($0) }
        return model.overlaid(with: try store.sources(pruned))
    }
}

/// The activations at a boundary between blocks: the calibration windows' hidden states entering
/// a block, and for SparseLLM with dense targets the dense model's hidden states there too.
public struct Boundary: Sendable {
    public var inputs: ActivationStore
    public var targets: ActivationStore?

    public init(inputs: ActivationStore, targets: ActivationStore?) {
        self.inputs = inputs
        self.targets = targets
    }
}

/// Runs a contiguous range of blocks from the activations at its start: the work of one worker,
/// and of the whole single-process run (one range covering every block).
public struct RangePruner: Sendable {
    public let model: LanguageModel
    public let job: PruneJob
    /// Where the blocks' statistics and solves run.
    public let backend: any ComputeBackend
    /// The other replicas of this stage (nil: this range's work is not shared). A replica holds
    /// and runs only its own windows (`ReplicaRole.samples`); the blocks it returns are the
    /// whole stage's.
    public let exchange: (any ReplicaExchange)?

    public init(model: LanguageModel, job: PruneJob, backend: any ComputeBackend = ComputeDevices.defaultBackend,
                exchange: (any ReplicaExchange)? = nil) {
        self.model = model
        self.job = job
        self.backend = backend
        self.exchange = exchange
    }

    var role: ReplicaRole { exchange?.role ?? .single }

    /// An empty activation store for this job. Three stores live at once (inputs, dense outputs,
    /// pruned outputs), so each gets a third of the memory budget.
    public static func store(job: PruneJob, config: ModelConfig, backend: any ComputeBackend = ComputeDevices.defaultBackend) -> ActivationStore {
        ActivationStore(count: job.samples, rows: job.sequenceLength, cols: config.hiddenSize,
                        budgetBytes: job.memoryBudget / 3, spillDirectory: job.workDirectory, backend: backend)
    }

    /// Prunes (or, outside --layers, runs) blocks `range` in order. `onBlock` receives each block's
    /// index, its pruned weights (nil when it was not pruned) and report as soon as it is done.
    /// Returns the boundary after the range.
    public func run(_ range: Range<Int>, from start: Boundary,
                    onBlock: (_ index: Int, _ pruned: DecoderBlock?, _ report: BlockReport?) throws -> Void) throws -> Boundary {
        let rope = model.config.ropeTable(positions: job.sequenceLength)
        var boundary = start
        for i in range {
            let loadStart = Date()
            let block = try model.loadBlock(i)
            let loadSeconds = Date().timeIntervalSince(loadStart)
            // The next block's bytes are read by the kernel while this one computes.
            if i + 1 < range.upperBound { model.prefetchBlock(i + 1) }
            if job.prunes(i) {
                let pruner = BlockPruner(plan: job.plan.forBlock(i), backend: backend, exchange: exchange)
                let (pruned, outputs, prunedReport) = try pruner.prune(block: block, inputs: boundary.inputs, targets: boundary.targets,
                                                                 sequenceLength: job.sequenceLength)
                var report = prunedReport
                report.profile?.add(.load, seconds: loadSeconds)
                boundary.inputs = outputs
                try onBlock(i, pruned, report)
            } else {
                boundary.inputs = try forward(block, boundary.inputs, rope: rope)
                try onBlock(i, nil, nil)
            }
            if let dense = boundary.targets { boundary.targets = try forward(block, dense, rope: rope) }
        }
        return boundary
    }

    /// Runs blocks `range` forward without pruning them: the inputs through each block as it was
    /// pruned before (`pruned(i)`, asked only for blocks the job prunes; the others run dense), the
    /// dense targets through the dense block. Gives bit for bit the activations that pruning
    /// the range produced, so a resumed or reassigned run continues exactly where it stopped.
    public func replay(_ range: Range<Int>, from start: Boundary, pruned: (Int) throws -> DecoderBlock) throws -> Boundary {
        let rope = model.config.ropeTable(positions: job.sequenceLength)
        var boundary = start
        for i in range {
            let dense = try model.loadBlock(i)
            let block = job.prunes(i) ? try pruned(i) : dense
            boundary.inputs = try forward(block, boundary.inputs, rope: rope)
            if let t = boundary.targets { boundary.targets = try forward(dense, t, rope: rope) }
        }
        return boundary
    }

    func forward(_ block: DecoderBlock, _ inputs: ActivationStore, rope: Kernels.RopeTable) throws -> ActivationStore {
        let outputs = inputs.makeSibling()
        let device = block.on(inputs.backend)
        for s in role.samples(inputs.count) {
            try outputs.set(s, device.forward(try inputs.tensor(s), sequenceLength: job.sequenceLength, rope: rope))
        }
        return outputs
    }
}
