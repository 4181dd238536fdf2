import Foundation
import TopiaryModel
import TopiaryTensor

/// The pruning methods of the engine.
public enum PruneMethod: String, Sendable, Codable, CaseIterable {
    case magnitude, wanda, sparsegpt, sparsellm, besa
}

/// Where SparseLLM's feed-forward inputs and targets come from.
public enum TargetMode: String, Sendable, Codable, CaseIterable {
    /// The dense block on the pruned-so-far model's activations (the reference code).
    case sequential
    /// The dense model's own activations (the paper's formulation).
    case dense
}

/// What to do to each block.
public struct PrunePlan: Sendable, Equatable, Codable {
    public var method: PruneMethod
    public var pattern: SparsityPattern
    public var sparseGPT: SparseGPTPruner.Options
    public var sparseLLM: SparseLLM.Options?
    public var targets: TargetMode
    public var besa: BESA.Options?
    /// Mixture-of-experts blocks: which calibration tokens each expert's statistics see (nil: routed).
    public var expertCalibration: ExpertCalibration?
    /// `--allocation owl|learned`: each block's sparsity (by block index), instead of the pattern's.
    public var allocation: [Double]? = nil
    /// `--linear-errors`: whether each linear's output error is measured (nil: the method's
    /// default, yes for the methods that build the input Hessian anyway, no for Wanda,
    /// magnitude and BESA without its refit, whose only reason to build it would be this report).
    public var linearErrors: Bool? = nil
    /// How many windows measure each block's output error when the method reads no other dense
    /// output (nil: `BlockPruner.outputErrorSample`; at least the window count: all of them).
    public var outputErrorSample: Int? = nil

    public init(method: PruneMethod, pattern: SparsityPattern, sparseGPT: SparseGPTPruner.Options = .init(),
                sparseLLM: SparseLLM.Options? = nil, targets: TargetMode = .sequential, besa: BESA.Options? = nil,
                expertCalibration: ExpertCalibration? = nil) {
        self.method = method
        self.pattern = pattern
        self.sparseGPT = sparseGPT
        self.sparseLLM = sparseLLM
        self.targets = targets
        self.besa = besa
        self.expertCalibration = expertCalibration
    }

    /// Whether the driver must carry the dense model's activations beside the pruned ones.
    public var needsDenseStream: Bool { (method == .sparsellm || method == .besa) && targets == .dense }

    /// Whether each linear's errors (LinearReport.errorBefore/After) are measured.
    public var measuresLinearErrors: Bool { linearErrors ?? solvesWithHessian }

    /// Whether the method reads the dense block's output of every window: BESA reconstructs it,
    /// and SparseLLM starts from the dense pass's feed-forward products. The other methods read
    /// it only for the block's output error, measured on a sample of the windows
    /// (`BlockPruner.outputErrorWindows`).
    public var readsDenseOutputs: Bool { method == .besa || method == .sparsellm }

    /// Whether the method's solve reads the input Hessian: SparseGPT's and SparseLLM's always,
    /// BESA's only for its refit (`--besa-reconstruct`; its learning ranks by the input norms).
    public var solvesWithHessian: Bool {
        switch method {
        case .sparsegpt, .sparsellm: return true
        case .besa: return besa?.reconstruct ?? false
        case .wanda, .magnitude: return false
        }
    }

    /// Whether the blocks' statistics include each group's input Hessian XᵀX: SparseGPT's and
    /// SparseLLM's solves and BESA's refit use it, and the linear errors are quadratic forms in
    /// it. Wanda and BESA's learning need only its diagonal's square roots (the input norms),
    /// which are kept apart: without the Hessian, a block skips d² work per token and group (at
    /// 70B, down_proj's 28672² matrix, 3.3 GB, and most of a Wanda block's time in
    /// `scripts/bench/scaling`).
    public var collectsHessian: Bool { measuresLinearErrors || solvesWithHessian }
}

/// What happened to one linear layer.
public struct LinearReport: Sendable, Codable {
    public var name: String
    public var rows: Int
    public var columns: Int
    /// Fraction of zero weights after pruning.
    public var sparsity: Double
    /// ‖(W − W⊙M)X‖² / ‖WX‖²: the error of the mask alone, before any weight update (nil: not
    /// measured, `PrunePlan.measuresLinearErrors`).
    public var errorBefore: Double?
    /// ‖(W − Ŵ)X‖² / ‖WX‖² of the final weights (nil: not measured).
    public var errorAfter: Double?
    public var seconds: Double
    /// The rows both errors were measured on, when not all of them (`BlockPruner.errorRows`).
    public var errorRows: Int? = nil
}

/// What happened to one block.
public struct BlockReport: Sendable, Codable {
    public var block: Int
    public var linears: [LinearReport]
    /// ‖Y_dense − Y_pruned‖² / ‖Y_dense‖² of the block output on its (pruned-so-far) inputs.
    public var outputError: Double
    /// The windows `outputError` was measured on, when not all of them
    /// (`BlockPruner.outputErrorWindows`).
    public var outputErrorWindows: Int? = nil
    public var seconds: Double
    /// SparseLLM: the objective and FFN output error after each outer iteration.
    public var sparseLLM: [SparseLLM.IterationReport]? = nil
    /// SparseLLM: the iteration whose weights were kept.
    public var sparseLLMChosen: Int? = nil
    /// BESA: the learned allocation of this block.
    public var besa: BESA.Summary? = nil
    /// Mixture of experts: calibration tokens each expert's statistics saw, in expert order.
    public var expertTokens: [Int]? = nil
    /// Seconds and FLOPs per phase (`prune --profile`); nil from a worker that predates it.
    public var profile: BlockProfile? = nil
}

/// Prunes one decoder block given its inputs: the unit of work of every driver, local or
/// distributed (ARCHITECTURE.md). It never touches files or sockets.
///
/// Statistics and the magnitude, Wanda and SparseGPT solves run on `backend`; the block's
/// forward passes, SparseLLM and BESA still run on the host (their port is a later step).
public struct BlockPruner: Sendable {
    public let plan: PrunePlan
    public let backend: any ComputeBackend
    /// The other replicas of this stage, when several share it (nil: this process alone).
    public let exchange: (any ReplicaExchange)?
    public init(plan: PrunePlan, backend: any ComputeBackend = CPUBackend(), exchange: (any ReplicaExchange)? = nil) {
        self.plan = plan
        self.backend = backend
        self.exchange = exchange
    }

    /// This pruner's place among its stage's replicas.
    public var role: ReplicaRole { exchange?.role ?? .single }

    /// Linear layers that read the same input share statistics (q/k/v; gate/up): each linear's
    /// statistics are kept under the first linear of its family's input group.
    static func statisticsKeys(_ inputGroups: [[String]]) -> [String: String] {
        var keys: [String: String] = [:]
        for group in inputGroups { for name in group { keys[name] = group[0] } }
        return keys
    }

    /// The time now, after the backend has finished what was issued: the profile's phase clock
    /// (a GPU runs asynchronously, and its work would otherwise be counted in the phase that
    /// next waits for it; on the CPU the wait is nothing).
    private func clock() -> Date {
        backend.synchronize()
        return Date()
    }

    /// Prunes `block`. `inputs` are the block's inputs, one [sequenceLength x hidden] tensor per
    /// calibration sequence; returns the pruned block, its outputs on the same inputs, and a report.
    /// `targets`, for SparseLLM and BESA with dense targets: the dense model's inputs to this block.
    ///
    /// The block's tensors go to the backend once; from there to the pruned weights, nothing
    /// crosses to the host (`withoutTransfers`) unless a store spills to its file. The pruned
    /// weights come back at the end.
    public func prune(block: DecoderBlock, inputs: ActivationStore, targets: ActivationStore? = nil,
                      sequenceLength: Int) throws -> (block: DecoderBlock, outputs: ActivationStore, report: BlockReport) {
        let device = block.on(backend)
        // Replicas hand one another host tensors mid-block; a lone pruner makes no transfer.
        let spills = !inputs.fitsInMemory || role.count > 1
        let body = { try self.prune(device, block: block, inputs: inputs, targets: targets, sequenceLength: sequenceLength) }
        let (weights, outputs, report): ([String: Tensor], ActivationStore, BlockReport)
        do {
            (weights, outputs, report) = spills ? try body() : try backend.withoutTransfers("block \(block.index)", body)
        } catch {
            exchange?.fail("block \(block.index): \(error)")
            throw error
        }
        var pruned = block
        for (name, w) in weights { pruned.tensors[name + ".weight"] = backend.download(w) }
        return (pruned, outputs, report)
    }

    private func prune(_ device: DeviceBlock, block: DecoderBlock, inputs: ActivationStore, targets: ActivationStore?,
                       sequenceLength: Int) throws -> (weights: [String: Tensor], outputs: ActivationStore, report: BlockReport) {
        let start = Date()
        let rope = block.config.ropeTable(positions: sequenceLength)
        let keys = Self.statisticsKeys(block.inputGroups)
        let feedForwards = block.feedForwards
        let ffnInputLinears = Set(feedForwards.map(\.inputLinear))
        let collectsFFNInputs = plan.method == .sparsellm
        let experts = plan.expertCalibration ?? .routed
        var ffnInputs: [String: [Tensor]] = [:]
        // SparseLLM's solve starts from the dense pass's s, z, p and y when that pass ran every
        // window here (no replicas) on the inputs the solve gets (sequential targets), for one
        // gated feed-forward without biases (the solve's model of it; an MoE block solves its
        // experts one at a time and would hold them all). Window by window, in window order, as
        // the inputs are collected.
        var denseProducts: [String: SparseLLM.DenseProducts.Builder] = [:]
        let keepsProducts: Bool = {
            guard collectsFFNInputs, plan.targets == .sequential, exchange == nil, feedForwards.count == 1,
                  case .gated(let gate, let up, let down) = feedForwards[0] else { return false }
            return [gate, up, down].allSatisfy { device.bias($0) == nil }
        }()
        let productsObserver: FeedForwardObserver? = keepsProducts ? { gate, f in
            let builder = denseProducts[gate] ?? SparseLLM.DenseProducts.Builder(tokens: inputs.count * sequenceLength, on: backend)
            denseProducts[gate] = builder
            builder.append(SparseLLM.DenseProducts.Window(gate: f.gate, up: f.up, activation: f.activation, output: f.output))
        } : nil
        var tokensSeen: [String: Int] = [:]
        var profile = BlockProfile()
        // Replicas: each runs its own windows, a contiguous range. Most groups' statistics are made
        // by all of them together, passed down the chain of replicas in window order
        // (StatisticsChain), so that H is summed in the order one process sums it and the bytes do
        // not depend on the number of replicas; SparseLLM's feed-forward inputs go window by window
        // to the replica that solves the feed-forward (ReplicaWork.owners), which adds them in
        // window order.
        let role = self.role
        let n = inputs.count
        let mine = role.samples(n)
        let allKeys = Array(Set(block.linearNames.map { keys[$0] ?? $0 })).sorted()
        let chained = role.count > 1 ? ReplicaWork.chainedStatistics(block: block, plan: plan) : []
        let split = ReplicaWork.splitLinears(block: block, plan: plan, tokens: n * sequenceLength, replicas: role.count)
        // Whether the replicas make a row-shared linear's U together (between processes).
        let spread = exchange.map { SpreadInverseFactor.applies($0, backend: backend) } ?? false
        let owners = role.count > 1
            ? ReplicaWork.owners(block: block, plan: plan, tokens: n * sequenceLength, replicas: role.count,
                                 sharedStatistics: chained, sharedRows: Set(split),
                                 spreadFactor: spread)
            : [:]
        func owns(_ key: String) -> Bool { (owners[key] ?? 0) == role.rank }
        /// Whether window inputs of `key` from the `kind` pass go to `key`'s owner one by one.
        func sentToOwner(_ key: String, _ kind: ReplicaKey.Kind) -> Bool { !(kind == .statisticsInput && chained.contains(key)) }
        if role.count > 1, let stray = ffnInputLinears.first(where: { keys[$0] != $0 }) {
            throw PruneError.invalidOption("block \(block.index): replicas need \(stray), a feed-forward input, to lead its statistics group")
        }
        let forwardFLOPs = BlockProfile.forwardFLOPs(block.config, sequences: mine.count, sequenceLength: sequenceLength)
        // 1. Dense pass over the windows, collecting each linear's input statistics.
        var stats: [String: LayerStatistics] = [:]
        let denseOutputs = inputs.makeSibling()
        var statisticsSeconds = 0.0, statisticsFLOPs = 0.0, waitingSeconds = 0.0
        var spillMark = Self.spillSeconds(inputs, targets)
        var phaseStart = clock()
        // The chained groups' inputs of this replica's windows, in window order, until the chain.
        var held: [String: [Tensor]] = [:]
        func collect(_ name: String, _ x: Tensor) {
            if collectsFFNInputs && ffnInputLinears.contains(name) && plan.targets == .sequential { ffnInputs[name, default: []].append(x) }
            guard keys[name] == name else { return }
            if chained.contains(name) {
                held[name, default: []].append(x)
                return
            }
            let t0 = clock()
            tokensSeen[name, default: 0] += x.rows
            let st = stats[name] ?? LayerStatistics(columns: x.cols, backend: backend, hessian: plan.collectsHessian)
            stats[name] = st
            st.add(x)
            statisticsSeconds += clock().timeIntervalSince(t0)
            // The Hessian's syrk (2·tokens·d²/2) and the squared column sums.
            let d = Double(x.cols)
            let entries = st.hasHessian ? d * (d + 1) / 2 : 0
            statisticsFLOPs += Double(x.rows) * (2 * entries + d)
        }
        // This replica's own windows' inputs that go to groups it owns, until they are added in
        // window order with the others' (window -> linear, input).
        var pending: [Int: [(String, Tensor)]] = [:]
        /// The owner adds every window's inputs of its groups in window order, after its forwards
        /// (its windows and the others' overlap in time: waiting for window s − 1 before running
        /// window s would run the replicas' forwards one after another).
        func fold(kind: ReplicaKey.Kind, keys wanted: [String], into add: (String, Tensor) -> Void) throws {
            guard let exchange else { return }
            for s in 0..<n {
                if role.owns(sample: s, of: n) {
                    for (name, x) in pending.removeValue(forKey: s) ?? [] { add(name, x) }
                    continue
                }
                for key in wanted {
                    let t0 = clock()
                    let value = try exchange.receive(ReplicaKey(block: block.index, kind: kind, name: key, index: s))
                    waitingSeconds += clock().timeIntervalSince(t0)
                    if case .matrix(let m) = value { add(key, backend.upload(m)) }
                }
            }
        }
        /// Runs window s forward: its inputs to chained groups are kept (`collect`), those to
        /// groups this replica owns kept until they are folded, the others sent to their owners
        /// (`absent` when a window never reached a linear).
        func forwardSharing(_ x: Tensor, sample s: Int, kind: ReplicaKey.Kind, keys wanted: [String], through device: DeviceBlock,
                            add: @escaping (String, Tensor) -> Void) throws -> Tensor {
            guard let exchange else {
                return device.forward(x, sequenceLength: sequenceLength, rope: rope, expertCalibration: experts,
                                      observer: { name, x in if kind == .statisticsInput || wanted.contains(name) { add(name, x) } },
                                      feedForwards: kind == .statisticsInput ? productsObserver : nil)
            }
            var outgoing: [String: Matrix] = [:]
            var own: [(String, Tensor)] = []
            let y = device.forward(x, sequenceLength: sequenceLength, rope: rope, expertCalibration: experts) { name, x in
                guard wanted.contains(name) else { return }
                if !sentToOwner(name, kind) {
                    add(name, x)
                } else if owns(name) {
                    own.append((name, x))
                } else {
                    outgoing[name] = self.backend.download(x)
                }
            }
            for key in wanted where sentToOwner(key, kind) && !owns(key) {
                let value: ReplicaValue = outgoing[key].map { .matrix($0) } ?? .absent
                try exchange.send(ReplicaKey(block: block.index, kind: kind, name: key, index: s), value, to: owners[key] ?? 0)
            }
            pending[s] = own
            return y
        }
        // The dense output is kept for the windows that read it (all of them, or the output
        // error's sample); the other windows' passes only collect the linears' inputs, without
        // the feed-forward's last product.
        let measured = Self.outputErrorWindows(n, plan: plan)
        let measuredSet = Set(measured)
        let inputsOnly = device.withoutProducts(of: Set(feedForwards.map(\.outputLinear)))
        var skippedWindows = 0
        for s in mine {
            let keeps = measuredSet.contains(s)
            let y = try forwardSharing(try inputs.tensor(s), sample: s, kind: .statisticsInput, keys: allKeys, through: keeps ? device : inputsOnly,
                                       add: collect)
            if keeps { try denseOutputs.set(s, y) } else { skippedWindows += 1 }
        }
        try fold(kind: .statisticsInput, keys: allKeys.filter { sentToOwner($0, .statisticsInput) && owns($0) }, into: collect)
        if let exchange, !chained.isEmpty {
            var columns: [String: Int] = [:]
            for key in chained { columns[key] = device.weight(key).cols }
            let chain = StatisticsChain(exchange: exchange, backend: backend, block: block.index, hessian: plan.collectsHessian,
                                        windows: n, tokensPerWindow: sequenceLength)
            let t0 = clock()
            let outcome = try chain.run(groups: columns, held: held, owners: owners)
            held = [:]
            for (key, st) in outcome.statistics { stats[key] = st }
            for key in chained { tokensSeen[key] = outcome.tokens[key] }
            // The chain's time is statistics (the updates, and passing the parts on), less its waits.
            statisticsSeconds += clock().timeIntervalSince(t0) - outcome.waiting
            statisticsFLOPs += outcome.flops
            waitingSeconds += outcome.waiting
        }
        // The feed-forwards' last products that the windows without a kept output skipped (an
        // expert's share: top-k of the experts).
        let outputMACs = feedForwards.reduce(0.0) { $0 + Double(device.weight($1.outputLinear).count) }
            * (feedForwards.count > 1 ? Double(max(block.config.expertsPerToken, 1)) / Double(feedForwards.count) : 1)
        var denseFLOPs = forwardFLOPs - Double(skippedWindows) * 2 * outputMACs * Double(sequenceLength)
        if collectsFFNInputs && plan.targets == .dense {
            guard let targets else { throw PruneError.shape("block \(block.index): SparseLLM with dense targets needs the dense activations") }
            let wanted = ffnInputLinears.sorted()
            let addTarget: (String, Tensor) -> Void = { name, x in ffnInputs[name, default: []].append(x) }
            for s in mine {
                _ = try forwardSharing(try targets.tensor(s), sample: s, kind: .targetInput, keys: wanted, through: device, add: addTarget)
            }
            try fold(kind: .targetInput, keys: wanted.filter(owns), into: addTarget)
            denseFLOPs += forwardFLOPs
        }
        do {
            let spill = Self.spillSeconds(inputs, targets, denseOutputs) - spillMark
            profile.add(.spill, seconds: spill)
            profile.add(.statistics, seconds: statisticsSeconds, flops: statisticsFLOPs)
            profile.add(.waiting, seconds: waitingSeconds)
            profile.add(.denseForward, seconds: max(0, clock().timeIntervalSince(phaseStart) - statisticsSeconds - spill - waitingSeconds), flops: denseFLOPs)
        }
        // A linear that no calibration token reached (an expert the router never chose) has
        // zero statistics: its solvers then see no input to preserve.
        for name in block.linearNames where owns(keys[name] ?? name) && stats[keys[name] ?? name] == nil {
            stats[keys[name] ?? name] = LayerStatistics(columns: device.weight(name).cols, backend: backend, hessian: plan.collectsHessian)
        }
        // 2. Prune every linear. SparseLLM prunes the FFN's linears jointly, attention with SparseGPT.
        var prunedWeights: [String: Tensor] = [:]
        var linears: [LinearReport] = []
        var joint: [String: Tensor] = [:]
        var jointSeconds: [String: Double] = [:]
        var jointReports: [SparseLLM.IterationReport]?
        var jointChosen: Int?
        var besaSummary: BESA.Summary?
        spillMark = Self.spillSeconds(inputs, targets, denseOutputs)
        phaseStart = clock()
        var solveFLOPs = 0.0, errorSeconds = 0.0, errorFLOPs = 0.0
        if plan.method == .besa {
            // One replica learns the block (ReplicaWork gives it every group): the others hand it
            // their windows' inputs, dense outputs and targets.
            let gathered = try gatherForBESA(block.index, inputs: inputs, denseOutputs: denseOutputs, targets: targets,
                                             learner: owners[allKeys[0]] ?? 0)
            if let gathered {
                let t0 = clock()
                let r = try pruneBESA(device, inputs: gathered.inputs, denseOutputs: gathered.denseOutputs, targets: gathered.targets,
                                      stats: stats, sequenceLength: sequenceLength)
                joint = r.weights
                besaSummary = r.summary
                let seconds = clock().timeIntervalSince(t0) / Double(block.linearNames.count)
                for name in block.linearNames { jointSeconds[name] = seconds }
                let firstGroup = (block.inputGroups.first ?? []).reduce(0) { $0 + device.weight($1).count }
                solveFLOPs += BlockProfile.besaFLOPs(block.config, sequences: gathered.inputs.count, sequenceLength: sequenceLength,
                                                     epochs: (plan.besa ?? BESA.Options()).epochs, firstGroupMACsPerToken: firstGroup)
            }
        }
        if plan.method == .sparsellm {
            for (k, ffn) in feedForwards.enumerated() where owns(ffn.inputLinear) {
                let t0 = clock()
                var parts = ffnInputs.removeValue(forKey: ffn.inputLinear) ?? []
                // An expert without calibration tokens has nothing to fit: SparseGPT below handles it.
                guard !parts.isEmpty else { continue }
                let (tokens, width) = (parts.reduce(0) { $0 + $1.rows }, parts[0].cols)
                let what = feedForwards.count == 1 ? "block \(block.index)" : "block \(block.index) feed-forward \(k)"
                let result: (weights: [String: Tensor], iterations: [SparseLLM.IterationReport], chosen: Int)
                // The dense pass made the input statistics of these linears from the very inputs
                // the solve gets (with sequential targets; dense targets come from another
                // stream): their Gram matrices are not made again. Every replica layout gives
                // the owner the same statistics (in window order), so the same bits.
                func known(_ input: String, _ activation: String) -> SparseLLM.Grams? {
                    guard plan.targets == .sequential, let gx = stats[keys[input] ?? input]?.gram(),
                          let act = stats[keys[activation] ?? activation], act.hasGram else { return nil }
                    return SparseLLM.Grams(input: gx, activation: { act.gram()! })
                }
                switch ffn {
                case .gated(let gate, let up, let down):
                    // s, z, p and y window by window: the dense pass's, or made here from the
                    // windows' inputs the same way (replicas, dense targets, experts).
                    let kept = denseProducts.removeValue(forKey: gate)
                    let productsGiven = kept != nil
                    let builder = kept ?? SparseLLM.DenseProducts.Builder(tokens: tokens, on: backend)
                    if !productsGiven {
                        for x in parts {
                            builder.append(SparseLLM.windowProducts(x, gate: device.weight(gate), up: device.weight(up), down: device.weight(down),
                                                                    activation: block.config.activation.gated, on: backend))
                        }
                    }
                    // The windows' inputs cut straight into the solver's row chunks, each window
                    // freed once copied.
                    let chunks = SparseLLM.rowChunks(consuming: &parts, rows: SparseLLM.chunkRows, on: backend)
                    let grams = known(gate, down)
                    let r = try SparseLLM.pruneLlama(chunks: chunks, gate: device.weight(gate), up: device.weight(up), down: device.weight(down),
                                                     pattern: plan.pattern, sparseGPT: plan.sparseGPT, options: plan.sparseLLM ?? .llama,
                                                     grams: grams, products: try builder.finish(what: what),
                                                     activation: block.config.activation.gated, what: what, on: backend)
                    result = ([gate: r.gate, up: r.up, down: r.down], r.iterations, r.chosen)
                    let cost = SparseLLM.llamaFLOPs(tokens: tokens, width: width, intermediate: device.weight(gate).rows,
                                                    iterations: (plan.sparseLLM ?? .llama).iterations, gramsGiven: grams != nil,
                                                    productsGiven: productsGiven)
                    solveFLOPs += cost.products + cost.sparseGPT
                case .plain(let fc1, let fc2):
                    let x = parts.count == 1 ? parts[0] : backend.vstack(parts)
                    parts = []
                    let grams = known(fc1, fc2)
                    let r = try SparseLLM.pruneOPT(x: x, fc1: device.weight(fc1), bias1: device.bias(fc1)!, fc2: device.weight(fc2),
                                                   bias2: device.bias(fc2)!, pattern: plan.pattern, sparseGPT: plan.sparseGPT,
                                                   options: plan.sparseLLM ?? .opt, grams: grams, what: what, on: backend)
                    result = ([fc1: r.fc1, fc2: r.fc2], r.iterations, r.chosen)
                    let cost = SparseLLM.optFLOPs(tokens: tokens, width: width, intermediate: device.weight(fc1).rows,
                                                  iterations: (plan.sparseLLM ?? .opt).iterations, gramsGiven: grams != nil)
                    solveFLOPs += cost.products + cost.sparseGPT
                }
                joint.merge(result.weights) { $1 }
                if feedForwards.count == 1 {
                    jointReports = result.iterations
                    jointChosen = result.chosen
                }
                let seconds = clock().timeIntervalSince(t0) / Double(result.weights.count)
                for name in result.weights.keys { jointSeconds[name] = seconds }
            }
        }
        // The largest linears: every replica solves its share of the rows. When the replicas make
        // their U together (`SpreadInverseFactor`, between processes), before the linears each
        // owns: every replica takes part in the factorisation, so none waits for the others to
        // finish their own solves first, and the owner's report of it overlaps the others' solves
        // (SmolLM2, 2 replicas: the solve phase lost about 0.1 s a block waiting either way).
        // In one process the owner factors alone, and the others solve their own linears meanwhile.
        func solveSplit(_ exchange: any ReplicaExchange) throws {
            for name in split {
                let t0 = clock()
                let key = keys[name] ?? name
                let owner = owners[key] ?? 0
                let weight = device.weight(name)
                let solved = try solveSharedRows(exchange, block: block.index, name: name, weight: weight, owner: owner,
                                                 hessian: owner == role.rank ? stats[key]?.hessianTensor : nil)
                prunedWeights[name] = solved
                solveFLOPs += BlockProfile.sparseGPTFLOPs(rows: weight.rows, cols: weight.cols) / Double(role.count)
                if owner == role.rank, let st = stats[key] {
                    let errorStart = clock()
                    linears.append(Self.report(name: name, dense: weight, pruned: solved, stats: st, measure: plan.measuresLinearErrors,
                                               seconds: clock().timeIntervalSince(t0)))
                    errorSeconds += clock().timeIntervalSince(errorStart)
                    errorFLOPs += errorReportFLOPs(weight)
                }
            }
        }
        if let exchange, spread { try solveSplit(exchange) }
        // Linears that read the same inputs (q/k/v; gate/up) share one factorisation of their
        // Hessian, kept until the last of them is solved.
        let solvedHere = block.linearNames.filter { owns(keys[$0] ?? $0) && !split.contains($0) && joint[$0] == nil }
        var factorReaders: [String: Int] = [:]
        if plan.method == .sparsegpt || plan.method == .sparsellm {
            for name in solvedHere { factorReaders[keys[name] ?? name, default: 0] += 1 }
        }
        var factors: [String: SparseGPTPruner.Factor] = [:]
        for name in block.linearNames where owns(keys[name] ?? name) && !split.contains(name) {
            let t0 = clock()
            let weight = device.weight(name)
            guard let st = stats[keys[name] ?? name] else {
                throw PruneError.shape("block \(block.index): no statistics collected for \(name)")
            }
            let solved: Tensor
            if let j = joint[name] {
                solved = j
            } else {
                switch plan.method {
                case .magnitude: solved = MagnitudePruner.prune(weight, pattern: plan.pattern, on: backend)
                case .wanda: solved = WandaPruner.prune(weight, inputSquaredNorms: st.squaredNormsTensor, pattern: plan.pattern, on: backend)
                case .besa: preconditionFailure("BESA's weights come from its joint step")
                case .sparsegpt, .sparsellm:
                    let key = keys[name] ?? name
                    let reused = factors[key]
                    var factor = reused
                    if factor == nil && (factorReaders[key] ?? 0) > 1 {
                        factor = try SparseGPTPruner.sharedFactor(st.hessianTensor, options: plan.sparseGPT, what: name, on: backend)
                        factors[key] = factor
                    }
                    solved = try SparseGPTPruner.prune(weight, hessian: st.hessianTensor, pattern: plan.pattern, options: plan.sparseGPT,
                                                       what: name, factor: factor, on: backend).weight
                    factorReaders[key, default: 1] -= 1
                    if factorReaders[key] == 0 { factors[key] = nil }
                    solveFLOPs += BlockProfile.sparseGPTFLOPs(rows: weight.rows, cols: weight.cols, factored: reused == nil)
                }
            }
            prunedWeights[name] = solved
            let seconds = jointSeconds[name] ?? clock().timeIntervalSince(t0)
            // Errors are measured on the dense pass's inputs to each linear (for SparseLLM's down/fc2,
            // the dense FFN activation), so methods compare on the same footing.
            let errorStart = clock()
            linears.append(Self.report(name: name, dense: weight, pruned: solved, stats: st, measure: plan.measuresLinearErrors, seconds: seconds))
            errorSeconds += clock().timeIntervalSince(errorStart)
            errorFLOPs += errorReportFLOPs(weight)
        }
        if let exchange, role.count > 1 {
            if !spread { try solveSplit(exchange) }
            // Every replica needs the whole pruned block for its windows; replica 0 the reports.
            try shareSolves(exchange, block: block, keys: keys, owners: owners, split: Set(split), prunedWeights: &prunedWeights, linears: &linears,
                            tokensSeen: &tokensSeen, sparseLLM: &jointReports, chosen: &jointChosen, besa: &besaSummary)
        }
        do {
            let spill = Self.spillSeconds(inputs, targets, denseOutputs) - spillMark
            profile.add(.spill, seconds: spill)
            profile.add(.errorMetrics, seconds: errorSeconds, flops: errorFLOPs)
            // BESA's and SparseLLM's joint solves are timed here, and counted above from their shapes.
            profile.add(.solve, seconds: max(0, clock().timeIntervalSince(phaseStart) - errorSeconds - spill), flops: solveFLOPs)
        }
        // 3. The pruned block on the same inputs gives the next block's inputs.
        let pruned = device.replacing(weights: prunedWeights)
        let outputs = inputs.makeSibling()
        var terms: [Int: (num: Double, den: Double)] = [:]
        spillMark = Self.spillSeconds(inputs, denseOutputs, outputs)
        phaseStart = clock()
        var prunedForwardSeconds = 0.0
        for s in mine {
            let x = try inputs.tensor(s)
            let forwardStart = clock()
            let y = pruned.forward(x, sequenceLength: sequenceLength, rope: rope)
            prunedForwardSeconds += clock().timeIntervalSince(forwardStart)
            guard backend.allFinite(y) else {
                // Say whose values were not finite before blaming the solve: the input, or the
                // checkpoint's own tensors.
                if !backend.allFinite(x) {
                    throw PruneError.numerical("block \(block.index): its input for window \(s) is not finite (NaN or infinite values from the embedding or an earlier block)")
                }
                if let bad = block.tensors.keys.sorted().first(where: { name in
                    block.tensors[name]!.withUnsafeBufferPointer { !$0.allSatisfy(\.isFinite) }
                }) {
                    throw PruneError.numerical("block \(block.index): the model's tensor \(bad) holds NaN or infinite values, so the block's output is not finite (window \(s))")
                }
                throw PruneError.numerical("block \(block.index): pruned block output is not finite (sample \(s))")
            }
            if measuredSet.contains(s) {
                let dense = try denseOutputs.tensor(s)
                let term = (backend.chunkedSquaredDistance(y, dense), backend.chunkedDot(dense, dense))
                // The window's dense output has no other reader: free it before the next window's
                // output is stored, so the pruned pass does not hold three streams at once.
                denseOutputs.release(s)
                if role.rank == 0 {
                    terms[s] = term
                } else {
                    try exchange!.send(ReplicaKey(block: block.index, kind: .outputError, index: s), .bytes(Self.encode([term.0, term.1])), to: 0)
                }
            }
            try outputs.set(s, y)
        }
        // The error over the measured windows in window order, as one process adds it.
        var num = 0.0, den = 0.0
        if role.rank == 0 {
            for s in measured {
                let term: (num: Double, den: Double)
                if let t = terms[s] {
                    term = t
                } else {
                    guard case .bytes(let b) = try exchange!.receive(ReplicaKey(block: block.index, kind: .outputError, index: s)),
                          let v = Self.decode(b), v.count == 2 else { throw ReplicaError("block \(block.index): malformed output error of window \(s)") }
                    term = (v[0], v[1])
                }
                num += term.num
                den += term.den
            }
        }
        do {
            let spill = Self.spillSeconds(inputs, denseOutputs, outputs) - spillMark
            profile.add(.spill, seconds: spill)
            profile.add(.prunedForward, seconds: prunedForwardSeconds, flops: forwardFLOPs)
            let elements = Double(mine.filter(measuredSet.contains).count * inputs.rows * inputs.cols)
            profile.add(.errorMetrics, seconds: max(0, clock().timeIntervalSince(phaseStart) - prunedForwardSeconds - spill), flops: 4 * elements)
        }
        var report = BlockReport(block: block.index, linears: linears, outputError: den > 0 ? num / den : 0,
                                 outputErrorWindows: measured.count < n ? measured.count : nil,
                                 seconds: Date().timeIntervalSince(start), sparseLLM: jointReports, sparseLLMChosen: jointChosen,
                                 besa: besaSummary,
                                 expertTokens: feedForwards.count > 1 ? feedForwards.map { tokensSeen[$0.inputLinear] ?? 0 } : nil)
        report.profile = profile
        return (prunedWeights, outputs, report)
    }

    /// What a replica tells replica 0 about the linears it solved.
    struct ReplicaSummary: Codable {
        var linears: [LinearReport]
        var tokens: [String: Int]
        var sparseLLM: [SparseLLM.IterationReport]?
        var chosen: Int?
        var besa: BESA.Summary?
    }

    /// Hands every pruned weight from its owner to the other replicas, and the reports to
    /// replica 0, which lists the linears in the block's order as one process does.
    func shareSolves(_ exchange: any ReplicaExchange, block: DecoderBlock, keys: [String: String], owners: [String: Int],
                     split: Set<String>, prunedWeights: inout [String: Tensor], linears: inout [LinearReport], tokensSeen: inout [String: Int],
                     sparseLLM: inout [SparseLLM.IterationReport]?, chosen: inout Int?, besa: inout BESA.Summary?) throws {
        let role = exchange.role
        let order = block.linearNames
        func owner(_ name: String) -> Int { owners[keys[name] ?? name] ?? 0 }
        // Each pruned weight goes from its owner down a binomial tree (`ReplicaExchange.broadcast`),
        // in the block's order on every replica.
        for name in order where !split.contains(name) {
            let key = ReplicaKey(block: block.index, kind: .weight, name: name)
            guard owner(name) != role.rank else {
                guard let w = prunedWeights[name] else { throw PruneError.shape("block \(block.index): \(name) was not solved") }
                _ = try exchange.broadcast(key, .matrix(backend.download(w)), root: role.rank)
                continue
            }
            let expected = block.tensors[name + ".weight"].map { ($0.rows, $0.cols) }
            guard case .matrix(let m) = try exchange.broadcast(key, nil, root: owner(name)),
                  expected.map({ $0 == (m.rows, m.cols) }) ?? false else {
                throw ReplicaError("block \(block.index): replica \(owner(name)) sent no \(name) of the block's shape")
            }
            prunedWeights[name] = backend.upload(m)
        }
        if role.rank != 0 {
            let summary = ReplicaSummary(linears: linears, tokens: tokensSeen, sparseLLM: sparseLLM, chosen: chosen, besa: besa)
            try exchange.send(ReplicaKey(block: block.index, kind: .report, name: "summary", index: role.rank),
                              .bytes(Array(try JSONEncoder().encode(summary))), to: 0)
        }
        guard role.rank == 0 else { return }
        var byName = Dictionary(linears.map { ($0.name, $0) }, uniquingKeysWith: { $1 })
        for r in 1..<role.count {
            guard case .bytes(let b) = try exchange.receive(ReplicaKey(block: block.index, kind: .report, name: "summary", index: r)),
                  let summary = try? JSONDecoder().decode(ReplicaSummary.self, from: Data(b)) else {
                throw ReplicaError("block \(block.index): replica \(r) sent no readable report")
            }
            for l in summary.linears { byName[l.name] = l }
            tokensSeen.merge(summary.tokens) { $1 }
            if summary.sparseLLM != nil { sparseLLM = summary.sparseLLM; chosen = summary.chosen }
            if summary.besa != nil { besa = summary.besa }
        }
        linears = order.compactMap { byName[$0] }
    }

    /// SparseGPT on a linear whose rows the replicas share. The owner (who has H) prepares the
    /// weight and hands each replica its rows; all of them make U together
    /// (`SpreadInverseFactor`, between processes on the CPU backend; otherwise the owner
    /// factors and sends U down the tree); every replica runs the column loop on
    /// its rows, the owner choosing each column block's threshold over all rows' scores (the
    /// k-th smallest value does not depend on the order they arrive in); the pruned rows go to
    /// every replica. Each row's result depends only on that row, U and the threshold: the bits
    /// of one process's solve.
    func solveSharedRows(_ exchange: any ReplicaExchange, block: Int, name: String, weight: Tensor, owner: Int,
                         hessian: Tensor?) throws -> Tensor {
        let role = exchange.role
        let rows = weight.rows, cols = weight.cols
        let mine = ReplicaWork.solveRows(role.rank, of: role.count, rows: rows)
        func key(_ kind: ReplicaKey.Kind, _ index: Int = 0) -> ReplicaKey { ReplicaKey(block: block, kind: kind, name: name, index: index) }
        func matrix(_ kind: ReplicaKey.Kind, _ index: Int = 0, rows r: Int, cols c: Int) throws -> Matrix {
            guard case .matrix(let m) = try exchange.receive(key(kind, index)), m.rows == r, m.cols == c else {
                throw ReplicaError("block \(block): \(name): \(kind) \(index) from replica \(owner) is missing or not \(r)x\(c)")
            }
            return m
        }
        let u: Tensor, w: Tensor
        let what = "\(name): damped Hessian"
        let spread = SpreadInverseFactor.applies(exchange, backend: backend)
        if role.rank == owner {
            guard let hessian else { throw PruneError.shape("block \(block): no statistics collected for \(name)") }
            let prepared: Tensor
            if spread {
                let damped: Matrix
                do {
                    let (h, dead) = try SparseGPTPruner.damped(hessian, options: plan.sparseGPT, what: name, on: backend)
                    prepared = try SparseGPTPruner.prepare(weight, hessian: hessian, hasDeadInputs: dead, what: name, on: backend)
                    damped = backend.download(h)
                }
                // U made by all replicas (its tile columns go before the rows).
                u = backend.upload(try SpreadInverseFactor.compute(exchange, block: block, name: name, owner: owner, damped: consume damped,
                                                                   order: cols, what: what))
            } else {
                let factor: Tensor
                (prepared, factor) = try SparseGPTPruner.prepare(weight, hessian: hessian, options: plan.sparseGPT, what: name, on: backend)
                // U down a binomial tree.
                _ = try exchange.broadcast(key(.inverseFactor), .matrix(backend.download(factor)), root: owner)
                u = factor
            }
            // Each replica's rows straight to it.
            for r in 0..<role.count where r != role.rank {
                let range = ReplicaWork.solveRows(r, of: role.count, rows: rows)
                try exchange.send(key(.rows, r), .matrix(backend.download(backend.copy(prepared.region(rows: range)))), to: r)
            }
            w = backend.copy(prepared.region(rows: mine))
        } else {
            if spread {
                u = backend.upload(try SpreadInverseFactor.compute(exchange, block: block, name: name, owner: owner, damped: nil,
                                                                   order: cols, what: what))
            } else {
                guard case .matrix(let m) = try exchange.broadcast(key(.inverseFactor), nil, root: owner), m.rows == cols, m.cols == cols else {
                    throw ReplicaError("block \(block): \(name): inverseFactor from replica \(owner) is missing or not \(cols)x\(cols)")
                }
                u = backend.upload(m)
            }
            w = backend.upload(try matrix(.rows, role.rank, rows: mine.count, cols: cols))
        }
        var columnBlock = 0
        let threshold: (Tensor, Int) throws -> Float = { scores, k in
            defer { columnBlock += 1 }
            if role.rank != owner {
                try exchange.send(key(.scores, columnBlock * role.count + role.rank), .matrix(self.backend.download(scores)), to: owner)
                guard case .bytes(let b) = try exchange.receive(key(.threshold, columnBlock)), let v = Self.decode(b), v.count == 1 else {
                    throw ReplicaError("block \(block): \(name): no threshold for column block \(columnBlock)")
                }
                return Float(v[0])
            }
            var values = self.backend.download(scores).values
            for r in 0..<role.count where r != role.rank {
                let range = ReplicaWork.solveRows(r, of: role.count, rows: rows)
                values += try matrix(.scores, columnBlock * role.count + r, rows: range.count, cols: scores.cols).values
            }
            let t = values.isEmpty ? -Float.infinity : values.withUnsafeBufferPointer { Selection.kthSmallest($0, k) }
            for r in 0..<role.count where r != role.rank {
                try exchange.send(key(.threshold, columnBlock), .bytes(Self.encode([Double(t)])), to: r)
            }
            return t
        }
        let solved = try SparseGPTPruner.solve(w, inverseFactor: u, pattern: plan.pattern, options: plan.sparseGPT, what: name,
                                               totalRows: rows, firstRow: mine.lowerBound, threshold: threshold, on: backend).weight
        // Every replica gets every replica's rows, and puts them together in row order.
        let host = backend.download(solved)
        for r in 0..<role.count where r != role.rank { try exchange.send(key(.prunedRows, role.rank), .matrix(host), to: r) }
        var parts: [Tensor] = []
        for r in 0..<role.count {
            let range = ReplicaWork.solveRows(r, of: role.count, rows: rows)
            parts.append(r == role.rank ? solved : backend.upload(try matrix(.prunedRows, r, rows: range.count, cols: cols)))
        }
        return backend.vstack(parts)
    }

    /// BESA with replicas: the replica that learns the block (`learner`) gets every window's
    /// input, dense output and dense target; the others send theirs and get nil.
    func gatherForBESA(_ index: Int, inputs: ActivationStore, denseOutputs: ActivationStore, targets: ActivationStore?,
                       learner: Int) throws -> (inputs: ActivationStore, denseOutputs: ActivationStore, targets: ActivationStore?)? {
        guard let exchange, role.count > 1 else { return (inputs, denseOutputs, targets) }
        let n = inputs.count
        let withTargets = plan.targets == .dense && targets != nil
        func parts(_ s: Int) -> [(ReplicaKey.Kind, ActivationStore)] {
            [(.blockInput, inputs), (.denseOutput, denseOutputs)] + (withTargets ? [(.denseTarget, targets!)] : [])
        }
        guard role.rank == learner else {
            for s in role.samples(n) {
                for (kind, store) in parts(s) {
                    try exchange.send(ReplicaKey(block: index, kind: kind, index: s), .matrix(try store.get(s)), to: learner)
                }
            }
            return nil
        }
        let all = (inputs.makeSibling(), denseOutputs.makeSibling(), withTargets ? targets!.makeSibling() : nil)
        for s in 0..<n {
            let destinations: [ActivationStore] = [all.0, all.1] + (all.2.map { [$0] } ?? [])
            for ((kind, store), into) in zip(parts(s), destinations) {
                if role.owns(sample: s, of: n) {
                    try into.set(s, try store.tensor(s))
                } else {
                    guard case .matrix(let m) = try exchange.receive(ReplicaKey(block: index, kind: kind, index: s)),
                          m.rows == into.rows, m.cols == into.cols else {
                        throw ReplicaError("block \(index): window \(s)'s \(kind) from replica \(role.rank(ofSample: s, of: n)) is missing or mis-shaped")
                    }
                    try into.set(s, m)
                }
            }
        }
        return all
    }

    static func encode(_ values: [Double]) -> [UInt8] {
        values.flatMap { v in withUnsafeBytes(of: v.bitPattern.littleEndian) { Array($0) } }
    }

    static func decode(_ bytes: [UInt8]) -> [Double]? {
        guard bytes.count % 8 == 0 else { return nil }
        return stride(from: 0, to: bytes.count, by: 8).map { i in
            Double(bitPattern: bytes[i..<i + 8].reversed().reduce(UInt64(0)) { $0 << 8 | UInt64($1) })
        }
    }

    /// Seconds the stores have spent on their spill files so far.
    static func spillSeconds(_ stores: ActivationStore?...) -> Double {
        stores.reduce(0) { $0 + ($1?.spillSeconds ?? 0) }
    }

    /// At most this many windows measure a block's output error when the method reads no other
    /// dense output (`PrunePlan.readsDenseOutputs`).
    public static let outputErrorSample = 4

    /// The windows of n on which a block's output error is measured, in order: all of them when
    /// the method reads every dense output anyway or n is at most the plan's sample
    /// (`outputErrorSample` unless it says), otherwise that many spread evenly from window 0. The other windows' dense pass skips the
    /// feed-forward's last product (its output has no reader) and keeps no output: at SmolLM2's
    /// shape a quarter of the pass's linear FLOPs, and at 8B with 128 windows of 2048 tokens
    /// 4.3 GB of dense outputs a block that no longer have to be held or spilled.
    public static func outputErrorWindows(_ n: Int, plan: PrunePlan) -> [Int] {
        let k = max(1, plan.outputErrorSample ?? outputErrorSample)
        guard !plan.readsDenseOutputs, n > k else { return Array(0..<n) }
        return (0..<k).map { $0 * n / k }
    }

    /// Above this many FLOPs per quadratic form (rows x columns², 2^34: a 4096 x 4096 linear), the
    /// errors are measured on `errorRowSample` rows spread evenly over the layer instead of all of
    /// them: at 70B, three exact forms per linear cost more than the SparseGPT solve itself.
    public static let exactErrorFLOPs = Double(1 << 34)
    public static let errorRowSample = 512

    /// The rows a linear's errors are measured on: nil for all of them.
    public static func errorRows(rows: Int, cols: Int) -> [Int]? {
        guard Double(rows) * Double(cols) * Double(cols) > exactErrorFLOPs, rows > errorRowSample else { return nil }
        return (0..<errorRowSample).map { $0 * rows / errorRowSample }
    }

    /// FLOPs of one linear's error report (`report`): three quadratic forms tr(A H Aᵀ), a product
    /// with H and a dot product each, on the sampled rows; none where the plan measures no errors.
    func errorReportFLOPs(_ weight: Tensor) -> Double {
        guard plan.measuresLinearErrors else { return 0 }
        let rows = Double(Self.errorRows(rows: weight.rows, cols: weight.cols)?.count ?? weight.rows)
        return 3 * (2 * rows * Double(weight.cols) * Double(weight.cols + 1))
    }

    /// The errors of one linear's mask and of its final weights, on the backend of `stats`.
    static func report(name: String, dense full: Tensor, pruned fullPruned: Tensor, stats: LayerStatistics, measure: Bool,
                       seconds: Double) -> LinearReport {
        let backend = stats.backend
        let zeros = Double(backend.zeroCount(fullPruned))
        guard measure else {
            return LinearReport(name: name, rows: full.rows, columns: full.cols, sparsity: zeros / Double(full.count),
                                errorBefore: nil, errorAfter: nil, seconds: seconds)
        }
        let sample = errorRows(rows: full.rows, cols: full.cols)
        let w = sample.map { backend.gatherRows(full, $0) } ?? full
        let pruned = sample.map { backend.gatherRows(fullPruned, $0) } ?? fullPruned
        let reference = stats.quadraticForm(w)
        let maskOnly = backend.copy(w)                  // W − W⊙M: the removed weights
        let kept = backend.map(pruned, .nonZero)
        backend.zeroMasked(maskOnly, mask: kept)
        let delta = backend.copy(w)                     // W − Ŵ
        backend.axpy(-1, pruned, delta)
        let denom = reference > 0 ? reference : 1
        return LinearReport(name: name, rows: full.rows, columns: full.cols,
                            sparsity: zeros / Double(full.count),
                            errorBefore: stats.quadraticForm(maskOnly) / denom,
                            errorAfter: stats.quadraticForm(delta) / denom, seconds: seconds, errorRows: sample?.count)
    }
}
