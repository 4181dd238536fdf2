import Foundation
import TopiaryModel
import TopiaryPrune
import TopiaryTensor

/// Something that prunes a range of blocks: this process (`InProcessWorker`) or a worker
/// process over TCP (`RemoteWorker`). Both run `RangePruner`, so results are identical.
public protocol WorkerLink: AnyObject {
    var name: String { get }
    /// Hands the worker `range` and the activations at its start; returns at once for a remote
    /// worker, which then computes while the coordinator starts the others.
    func start(_ range: Range<Int>, job: PruneJob, from boundary: Boundary) throws
    /// Collects the started range's blocks (each reported as it arrives) and the boundary after it.
    func finish(onBlock: (_ index: Int, _ pruned: DecoderBlock?, _ report: BlockReport?) throws -> Void) throws -> Boundary
}

extension WorkerLink {
    /// Runs `range` from `boundary`, reporting each block as it finishes; returns the boundary after it.
    public func run(_ range: Range<Int>, job: PruneJob, from boundary: Boundary,
                    onBlock: (_ index: Int, _ pruned: DecoderBlock?, _ report: BlockReport?) throws -> Void) throws -> Boundary {
        try start(range, job: job, from: boundary)
        return try finish(onBlock: onBlock)
    }
}

/// Runs ranges in this process (when `finish` is called).
public final class InProcessWorker: WorkerLink {
    public let model: LanguageModel
    public let name: String
    private var pending: (Range<Int>, PruneJob, Boundary)?

    public init(model: LanguageModel, name: String = "in-process") {
        self.model = model
        self.name = name
    }

    public func start(_ range: Range<Int>, job: PruneJob, from boundary: Boundary) throws {
        pending = (range, job, boundary)
    }

    public func finish(onBlock: (Int, DecoderBlock?, BlockReport?) throws -> Void) throws -> Boundary {
        guard let (range, job, boundary) = pending else { preconditionFailure("finish without start") }
        pending = nil
        return try RangePruner(model: model, job: job).run(range, from: boundary, onBlock: onBlock)
    }
}

/// How partitions are coordinated.
public enum Coordination: String, Sendable, CaseIterable {
    /// Worker k starts from worker k−1's pruned boundary activations: the single-process result, bit for bit.
    case sequential
    /// All workers prune in parallel each round from boundary auxiliaries that the coordinator
    /// updates between rounds (ADMM-style message passing between neighbouring partitions).
    case admm
}

/// Settings of ADMM coordination.
public struct ADMMOptions: Sendable {
    public var rounds: Int
    /// Weight of agreement with the left neighbour's pruned output against the dense target;
    /// infinity (the default) passes the neighbour's output on unchanged.
    public var rho: Double
    /// Stop when every boundary's relative residual is at most this.
    public var tolerance: Double

    public init(rounds: Int, rho: Double = .infinity, tolerance: Double = 0) {
        self.rounds = rounds
        self.rho = rho
        self.tolerance = tolerance
    }
}

/// One ADMM round: the relative residual ‖h_k − o_{k−1}‖²/‖o_{k−1}‖² of each boundary k ≥ 1
/// (the input partition k used against what its left neighbour produced this round), and the
/// model output's relative error against the dense model.
public struct ADMMRound: Sendable, Codable {
    public var round: Int
    public var residuals: [Double]
    public var outputError: Double
    public var objective: Double { residuals.reduce(0, +) + outputError }
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

    /// ADMM coordination. A dense pass through the workers gives every boundary its dense
    /// activations d_k. Each round, every worker prunes its range in parallel from its boundary
    /// input h_k (h_0: the embeddings); then for each boundary k ≥ 1, with o the left neighbour's
    /// pruned output and u a scaled dual, h_k ← (d_k + ρ(o − u))/(1 + ρ) and u ← u + h_k − o
    /// (with ρ = ∞: h_k ← o). Stops at the tolerance or after the rounds; the weights are the last
    /// round's. With ρ = ∞ and as many rounds as partitions, every partition's input is the
    /// pruned chain's, so the weights equal sequential coordination's.
    public func runADMM(options: ADMMOptions, progress: (_ block: Int, _ report: BlockReport?) -> Void,
                        round roundDone: (ADMMRound) -> Void = { _ in }) throws -> (reports: [BlockReport], rounds: [ADMMRound]) {
        let pipeline = PrunePipeline(model: model, job: job, store: store)
        try pipeline.validate()
        let partitions = plan()
        let links = Array(workers.prefix(partitions.count))
        let start = try pipeline.embed()
        // Dense boundaries d_0 ... d_K, pipelined through the workers.
        var dense = [start]
        var denseJob = job
        denseJob.denseOnly = true
        for (range, worker) in zip(partitions, links) {
            dense.append(try worker.run(range, job: denseJob, from: Boundary(inputs: dense.last!.inputs, targets: nil)) { _, _, _ in })
        }
        var inputs = dense.map(\.inputs)          // h_k; h_0 stays the embeddings
        var duals: [ActivationStore?] = Array(repeating: nil, count: partitions.count)
        var rounds: [ADMMRound] = []
        var reports: [Int: BlockReport] = [:]
        for r in 1...max(1, options.rounds) {
            for (k, (range, worker)) in zip(partitions, links).enumerated() {
                let targets = job.plan.needsDenseStream ? dense[k].inputs : nil
                try worker.start(range, job: job, from: Boundary(inputs: inputs[k], targets: targets))
            }
            var outputs: [ActivationStore] = []
            for worker in links {
                outputs.append(try worker.finish { index, pruned, report in
                    if let pruned { try store.write(pruned) }
                    if let report { reports[index] = report }
                    progress(index, report)
                }.inputs)
            }
            var residuals: [Double] = []
            for k in 1..<max(1, partitions.count) {
                let o = outputs[k - 1]
                residuals.append(try relativeDistance(inputs[k], o))
                if options.rho.isInfinite {
                    inputs[k] = o
                } else {
                    let (h, u) = try boundaryUpdate(dense: dense[k].inputs, neighbour: o, dual: duals[k], rho: options.rho)
                    inputs[k] = h
                    duals[k] = u
                }
            }
            let round = ADMMRound(round: r, residuals: residuals, outputError: try relativeDistance(outputs.last!, dense.last!.inputs))
            rounds.append(round)
            roundDone(round)
            if residuals.allSatisfy({ $0 <= options.tolerance }) { break }
        }
        return (reports.keys.sorted().map { reports[$0]! }, rounds)
    }

    /// ‖a − b‖² / ‖b‖² over all windows.
    func relativeDistance(_ a: ActivationStore, _ b: ActivationStore) throws -> Double {
        var num = 0.0, den = 0.0
        for s in 0..<a.count {
            let x = try a.get(s), y = try b.get(s)
            x.withUnsafeBufferPointer { px in y.withUnsafeBufferPointer { py in
                for i in px.indices { let d = Double(px[i] - py[i]); num += d * d; den += Double(py[i]) * Double(py[i]) }
            } }
        }
        return den > 0 ? num / den : 0
    }

    /// h = (d + ρ(o − u))/(1 + ρ), u' = u + h − o.
    func boundaryUpdate(dense: ActivationStore, neighbour: ActivationStore, dual: ActivationStore?, rho: Double) throws -> (ActivationStore, ActivationStore) {
        let h = dense.makeSibling(), u = dense.makeSibling()
        let rho = Float(rho)
        for s in 0..<dense.count {
            let d = try dense.get(s), o = try neighbour.get(s)
            let u0 = try dual?.get(s) ?? Matrix(rows: d.rows, cols: d.cols)
            var hs = d, us = u0
            hs.withUnsafeMutableBufferPointer { ph in
                us.withUnsafeMutableBufferPointer { pu in
                    o.withUnsafeBufferPointer { po in
                        for i in ph.indices {
                            let value = (ph[i] + rho * (po[i] - pu[i])) / (1 + rho)
                            ph[i] = value
                            pu[i] += value - po[i]
                        }
                    }
                }
            }
            try h.set(s, hs)
            try u.set(s, us)
        }
        return (h, u)
    }

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
