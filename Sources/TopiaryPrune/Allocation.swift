import Foundation
import TopiaryModel
import TopiaryTensor

/// How the target sparsity is spread over the blocks (`--allocation`).
public enum AllocationMethod: String, Sendable, Codable, CaseIterable {
    /// Every block at the target.
    case uniform
    /// OWL (Yin et al. 2024, "Outlier Weighed Layerwise sparsity"): blocks with more outlier
    /// weights keep more of them.
    case owl
    /// One budget over all blocks, from each block's reconstruction-error-vs-sparsity curve.
    case learned
}

/// The allocation a run chose, as run.json and report.json record it: a resumed run reuses it
/// instead of measuring again, and the plan carries `blockSparsity` to every worker.
public struct AllocationRecord: Sendable, Equatable, Codable {
    public var method: AllocationMethod
    /// Each block's sparsity (by block index; blocks outside --layers keep the target).
    public var blockSparsity: [Double]
    /// OWL: M, the λ used, and each block's outlier ratio.
    public var owlM: Double? = nil
    public var owlLambda: Double? = nil
    public var outlierRatios: [Double]? = nil
    /// OWL with `--owl-lambda auto`: the grid's λ and the calibration loss of each (nil: a λ that
    /// would push a block's sparsity out of (0, 1)).
    public var lambdaSearch: [LambdaTrial]? = nil
    /// Learned: the method whose masks measured the curves, each pruned block's curve, and the
    /// linear parameters of each block (the budget's weights).
    public var curveMethod: PruneMethod? = nil
    public var curves: [LearnedAllocation.Curve?]? = nil
    public var blockParameters: [Int]? = nil
    /// Learned: the curves' solution before the blend, the share of the way from uniform to it
    /// that the run uses (`--learned-blend`), and with `auto` each share's calibration loss.
    public var learnedSparsity: [Double]? = nil
    public var learnedBlend: Double? = nil
    public var blendSearch: [BlendTrial]? = nil
    /// Seconds the measurement took (the run that measured it).
    public var seconds: Double? = nil

    public struct LambdaTrial: Sendable, Equatable, Codable {
        public var lambda: Double
        public var loss: Double?
        public init(lambda: Double, loss: Double?) {
            self.lambda = lambda
            self.loss = loss
        }
    }

    public struct BlendTrial: Sendable, Equatable, Codable {
        public var blend: Double
        /// nil: not finite.
        public var loss: Double?
        public init(blend: Double, loss: Double?) {
            self.blend = blend
            self.loss = loss
        }
    }

    /// `blockSparsity` is kept rounded to 1e-9: run.json is written through JSONSerialization,
    /// which reads back more than half of all full-precision doubles off by a bit, and a resumed
    /// run must prune with the very values the first run used (a 1e-9 grid reads back exactly).
    public init(method: AllocationMethod, blockSparsity: [Double]) {
        self.method = method
        self.blockSparsity = blockSparsity.map { ($0 * 1e9).rounded() / 1e9 }
    }

    /// report.json's `allocation` object, under run.json's keys (built directly: a parse of the
    /// encoded record would round some doubles in their last bit).
    public var json: [String: Any] {
        var o: [String: Any] = ["method": method.rawValue, "block_sparsity": blockSparsity]
        if let owlM { o["m"] = owlM }
        if let owlLambda { o["lambda"] = owlLambda }
        if let outlierRatios { o["outlier_ratios"] = outlierRatios }
        if let lambdaSearch { o["lambda_search"] = lambdaSearch.map { ["lambda": $0.lambda, "loss": $0.loss.map { $0 as Any } ?? NSNull()] as [String: Any] } }
        if let curveMethod { o["curve_method"] = curveMethod.rawValue }
        if let curves {
            o["curves"] = curves.map { c in c.map { ["sparsities": $0.sparsities, "errors": $0.errors,
                                                     "output_energy": $0.outputEnergy.map { $0 as Any } ?? NSNull()] as Any } ?? NSNull() }
        }
        if let blockParameters { o["block_parameters"] = blockParameters }
        if let learnedSparsity { o["learned_block_sparsity"] = learnedSparsity }
        if let learnedBlend { o["blend"] = learnedBlend }
        if let blendSearch { o["blend_search"] = blendSearch.map { ["blend": $0.blend, "loss": $0.loss.map { $0 as Any } ?? NSNull()] as [String: Any] } }
        if let seconds { o["seconds"] = seconds }
        return o
    }

    enum CodingKeys: String, CodingKey {
        case method, curves, seconds
        case blockSparsity = "block_sparsity", owlM = "m", owlLambda = "lambda", outlierRatios = "outlier_ratios"
        case lambdaSearch = "lambda_search", curveMethod = "curve_method", blockParameters = "block_parameters"
        case learnedSparsity = "learned_block_sparsity", learnedBlend = "blend", blendSearch = "blend_search"
    }
}

extension AllocationRecord {
    /// Measures `allocation` on the dense model (OWL's outlier ratios and, with --owl-lambda auto,
    /// its λ search; or the learned allocation's error curves) and chooses the block sparsities.
    /// `learnedBlend` nil: `--learned-blend auto`.
    public static func measure(_ allocation: AllocationMethod, model: LanguageModel, job: PruneJob, owlM: Double,
                               owlLambda: Double?, learnedBlend: Double? = nil, log: (String) -> Void) throws -> AllocationRecord {
        let c = model.config
        let t0 = Date()
        let pruned = (0..<c.layerCount).filter { job.prunes($0) }
        let target = job.plan.pattern.fraction
        switch allocation {
        case .uniform:
            return AllocationRecord(method: .uniform, blockSparsity: [Double](repeating: target, count: c.layerCount))
        case .owl:
            log("allocation: OWL (M \(owlM), λ \(owlLambda.map { "\($0)" } ?? "auto")): measuring each block's outlier ratio on the dense model")
            let scores = try OWLAllocation.denseScores(model: model, job: job, m: owlM)
            var lambda = owlLambda ?? 0
            var trials: [AllocationRecord.LambdaTrial]?
            if owlLambda == nil {
                log("allocation: searching λ over \(OWLAllocation.lambdaGrid) by the loss on \(min(OWLAllocation.searchWindows, job.samples)) calibration windows (\(AllocationSearch.masks(job.plan)))")
                let found = try OWLAllocation.searchLambda(model: model, job: job, ratios: scores.ratios, squaredNorms: scores.squaredNorms, log: log)
                lambda = found.lambda
                trials = found.trials
                log("allocation: λ \(lambda) chosen")
            }
            var record = AllocationRecord(method: .owl, blockSparsity: try OWLAllocation.sparsities(ratios: scores.ratios, pruned: pruned,
                                                                                                     target: target, lambda: lambda))
            record.owlM = owlM
            record.owlLambda = lambda
            record.outlierRatios = scores.ratios
            record.lambdaSearch = trials
            record.seconds = Date().timeIntervalSince(t0)
            return record
        case .learned:
            let method = LearnedAllocation.curveMethod(for: job.plan)
            log("allocation: learned: each block's output error at sparsities \(LearnedAllocation.grid(target: target).map { String(format: "%.3f", $0) }.joined(separator: " ")) with \(method.rawValue) masks, on the dense model")
            let measured = try LearnedAllocation.measureCurves(model: model, job: job, log: log)
            let (curves, parameters) = (measured.curves, measured.parameters)
            let weights = parameters.map(Double.init)
            let solved = try LearnedAllocation.solve(curves: curves, weights: weights, target: target)
            var blend = learnedBlend ?? 1
            var trials: [AllocationRecord.BlendTrial]?
            if learnedBlend == nil {
                log("allocation: searching the blend between uniform (0) and the curves' solution (1) over \(LearnedAllocation.blendGrid) by the loss on \(min(AllocationSearch.windows, job.samples)) calibration windows (\(AllocationSearch.masks(job.plan)))")
                let found = try AllocationSearch.least(LearnedAllocation.blendGrid) { t in
                    let loss = try AllocationSearch.loss(model: model, job: job,
                                                         sparsities: LearnedAllocation.blend(solved, curves: curves, weights: weights, target: target, share: t),
                                                         squaredNorms: measured.squaredNorms)
                    log(String(format: "allocation: blend %.2f: calibration loss %.5f", t, loss))
                    return loss
                }
                trials = zip(LearnedAllocation.blendGrid, found.losses).map { .init(blend: $0, loss: $1) }
                guard let best = found.best else {
                    throw PruneError.invalidOption("--learned-blend auto: the calibration loss is not finite for any blend of \(LearnedAllocation.blendGrid)")
                }
                blend = best
                log("allocation: blend \(blend) chosen")
            }
            var record = AllocationRecord(method: .learned, blockSparsity: LearnedAllocation.blend(solved, curves: curves, weights: weights,
                                                                                                    target: target, share: blend))
            record.curveMethod = method
            record.curves = curves
            record.blockParameters = parameters
            record.learnedSparsity = AllocationRecord(method: .learned, blockSparsity: solved).blockSparsity
            record.learnedBlend = blend
            record.blendSearch = trials
            record.seconds = Date().timeIntervalSince(t0)
            return record
        }
    }
}

/// OWL's allocation. A weight is an outlier when its Wanda score |W_ij|·‖X_j‖ exceeds M times
/// the mean score of its linear; a block's outlier ratio is the share of outliers over its
/// linears, measured on the dense model's calibration activations. The ratios of the pruned
/// blocks are scaled to [0, 2λ], centred, and give each block the density
/// (1 − target) + scaled − mean(scaled): the mean block sparsity is the target, and since the
/// blocks of one model have the same shapes, so is the sparsity of all their linears.
public enum OWLAllocation {
    public struct Options: Sendable, Equatable, Codable {
        /// The outlier threshold M (the paper's default for LLaMA: 5).
        public var m: Double
        /// The largest deviation from the target, λ (the paper: 0.08).
        public var lambda: Double
        public init(m: Double = 5, lambda: Double = 0.08) {
            self.m = m
            self.lambda = lambda
        }
    }

    /// Each block's outlier ratio from a dense pass over the calibration windows (one block in
    /// memory at a time, as the pruning pass).
    public static func outlierRatios(model: LanguageModel, job: PruneJob, m: Double,
                                     backend: any ComputeBackend = ComputeDevices.defaultBackend) throws -> [Double] {
        try denseScores(model: model, job: job, m: m, backend: backend).ratios
    }

    /// The outlier ratios, and each block's Wanda input norms (Σ x_j² per statistics group, from
    /// the dense model's activations) for the λ search.
    public static func denseScores(model: LanguageModel, job: PruneJob, m: Double,
                                   backend: any ComputeBackend = ComputeDevices.defaultBackend) throws -> (ratios: [Double], squaredNorms: [[String: [Float]]]) {
        let c = model.config
        var inputs = RangePruner.store(job: job, config: c, backend: backend)
        let embedding = try model.loadEmbedding()
        for (s, window) in job.calibration.enumerated() { try inputs.set(s, embedding.embed(window, sequenceLength: job.sequenceLength)) }
        let rope = c.ropeTable(positions: job.sequenceLength)
        var ratios: [Double] = []
        var blockNorms: [[String: [Float]]] = []
        for i in 0..<c.layerCount {
            let block = try model.loadBlock(i)
            let device = block.on(backend)
            let keys = BlockPruner.statisticsKeys(block.inputGroups)
            var sums: [String: Tensor] = [:]
            let outputs = inputs.makeSibling()
            for s in 0..<inputs.count {
                let y = device.forward(try inputs.tensor(s), sequenceLength: job.sequenceLength, rope: rope, expertCalibration: .routed) { name, x in
                    guard keys[name] == name else { return }
                    let add = backend.columnSquaredSums(x)
                    if let t = sums[name] { backend.axpy(1, add, t) } else { sums[name] = add }
                }
                try outputs.set(s, y)
            }
            blockNorms.append(sums.mapValues { backend.download($0).values })
            var outliers = 0, total = 0
            for name in block.linearNames {
                let w = block.tensors[name + ".weight"]!
                let norms = sums[keys[name] ?? name].map { backend.download($0).values.map { Double($0).squareRoot() } }
                    ?? [Double](repeating: 0, count: w.cols)
                // Two passes over the weights (the mean, then the count) rather than a score per
                // weight held in memory: a 70B gate_proj has 235 million.
                let count = w.withUnsafeBufferPointer { p -> Int in
                    func score(_ r: Int, _ j: Int) -> Double { Double(abs(p[r * w.cols + j])) * norms[j] }
                    var sum = 0.0
                    for r in 0..<w.rows { for j in 0..<w.cols { sum += score(r, j) } }
                    let threshold = m * sum / Double(max(1, w.count))
                    var count = 0
                    for r in 0..<w.rows { for j in 0..<w.cols where score(r, j) > threshold { count += 1 } }
                    return count
                }
                outliers += count
                total += w.count
            }
            ratios.append(total > 0 ? Double(outliers) / Double(total) : 0)
            inputs = outputs
        }
        return (ratios, blockNorms)
    }

    /// `--owl-lambda auto`'s grid: from 0 (uniform) to 0.2 in steps of 0.04.
    public static let lambdaGrid: [Double] = [0, 0.04, 0.08, 0.12, 0.16, 0.2]
    /// The λ search measures the loss on at most this many calibration windows.
    public static let searchWindows = AllocationSearch.windows

    /// `--owl-lambda auto`: for each λ of `grid`, every pruned block gets OWL's sparsities and its
    /// linears `AllocationSearch`'s masks (Wanda's from the dense model's input norms, `denseScores`,
    /// or magnitude's for a magnitude run), and the pruned model's language-model loss is
    /// measured on the first `searchWindows` calibration windows. Returns every trial and the λ
    /// of the smallest loss (the first on a tie; a λ that would push a block out of (0, 1) is
    /// skipped).
    public static func searchLambda(model: LanguageModel, job: PruneJob, ratios: [Double], squaredNorms: [[String: [Float]]],
                                    grid: [Double] = lambdaGrid, backend: any ComputeBackend = ComputeDevices.defaultBackend,
                                    log: (String) -> Void = { _ in }) throws -> (lambda: Double, trials: [AllocationRecord.LambdaTrial]) {
        let c = model.config
        let pruned = (0..<c.layerCount).filter { job.prunes($0) }
        let found = try AllocationSearch.least(grid) { lambda -> Double? in
            guard let sparsities = try? sparsities(ratios: ratios, pruned: pruned, target: job.plan.pattern.fraction, lambda: lambda) else {
                log(String(format: "allocation: λ %.3f pushes a block's sparsity out of (0, 1); skipped", lambda))
                return nil
            }
            let loss = try AllocationSearch.loss(model: model, job: job, sparsities: sparsities, squaredNorms: squaredNorms, backend: backend)
            log(String(format: "allocation: λ %.3f: calibration loss %.5f", lambda, loss))
            return loss
        }
        guard let best = found.best else {
            throw PruneError.invalidOption("--owl-lambda auto: every λ of the grid \(grid) pushes a block's sparsity out of (0, 1) or gives a calibration loss that is not finite")
        }
        return (best, zip(grid, found.losses).map { .init(lambda: $0, loss: $1) })
    }

    /// Block sparsities from the outlier ratios: the blocks in `pruned` share the target as OWL
    /// shares it; the others keep the target (they are not pruned).
    public static func sparsities(ratios: [Double], pruned: [Int], target: Double, lambda: Double) throws -> [Double] {
        var out = [Double](repeating: target, count: ratios.count)
        let r = pruned.map { ratios[$0] }
        guard let lo = r.min(), let hi = r.max() else { return out }
        let scaled = r.map { hi > lo ? ($0 - lo) / (hi - lo) * 2 * lambda : 0 }
        let mean = scaled.reduce(0, +) / Double(scaled.count)
        for (k, i) in pruned.enumerated() {
            let s = 1 - ((1 - target) + scaled[k] - mean)
            guard s > 0, s < 1 else {
                throw PruneError.invalidOption("--owl-lambda \(lambda) gives block \(i) a sparsity of \(String(format: "%.3f", s)) at target \(target); choose a smaller λ")
            }
            out[i] = s
        }
        return out
    }
}

/// The searches of `--owl-lambda auto` and `--learned-blend auto`: a candidate allocation is
/// scored by the language-model loss of the dense model with each pruned block's linears given
/// masks at the block's sparsity, on the first `windows` calibration windows: magnitude's own
/// masks for a magnitude run, Wanda's (from the dense model's input norms) for every other
/// method. Neither needs a sequential pass, so a candidate is cheap whatever the run's method.
/// (Until 2026-12-05 magnitude runs were scored with Wanda's masks too, a poor proxy: the blend
/// it chose made magnitude's learned 50% worse, 383.8 against the solution's 228.9.)
public enum AllocationSearch {
    public static let windows = 8

    /// Whether a candidate is scored with magnitude's masks (a magnitude run) rather than Wanda's.
    static func usesMagnitude(_ plan: PrunePlan) -> Bool { plan.method == .magnitude }

    /// The masks that score a candidate for this plan, as the log says it.
    public static func masks(_ plan: PrunePlan) -> String {
        usesMagnitude(plan) ? "magnitude masks" : "Wanda masks from the dense model's norms"
    }

    /// Scores the candidates in order and returns the one of the least finite loss (the first on
    /// a tie), with each candidate's loss: nil where `score` gave none (a skipped candidate) or a
    /// loss that is not finite, which run.json records as null and which is never chosen.
    public static func least<Candidate>(_ candidates: [Candidate], score: (Candidate) throws -> Double?) rethrows
        -> (best: Candidate?, losses: [Double?]) {
        var best: (candidate: Candidate, loss: Double)?
        var losses: [Double?] = []
        for candidate in candidates {
            let loss = try score(candidate).flatMap { $0.isFinite ? $0 : nil }
            losses.append(loss)
            if let loss, best == nil || loss < best!.loss { best = (candidate, loss) }
        }
        return (best?.candidate, losses)
    }

    /// The mean loss per token of that model. `squaredNorms[i]`: block i's Σ x_j² per statistics
    /// group (any positive scale: only each row's order of |W|·‖x‖ matters).
    public static func loss(model: LanguageModel, job: PruneJob, sparsities: [Double], squaredNorms: [[String: [Float]]],
                            backend: any ComputeBackend = ComputeDevices.defaultBackend) throws -> Double {
        let first = Array(job.calibration.prefix(windows))
        return try Perplexity.evaluate(model: model, tokens: first.flatMap { $0 }, sequenceLength: job.sequenceLength,
                                       windows: first.count, block: { i in
            var block = try model.loadBlock(i)
            guard job.prunes(i) else { return block }
            let keys = BlockPruner.statisticsKeys(block.inputGroups)
            for name in block.linearNames {
                let w = block.weight(name)
                let pattern = SparsityPattern.unstructured(sparsities[i])
                if usesMagnitude(job.plan) {
                    block.tensors[name + ".weight"] = MagnitudePruner.prune(w, pattern: pattern, backend: backend)
                    continue
                }
                let norms = squaredNorms[i][keys[name] ?? name] ?? [Float](repeating: 0, count: w.cols)
                block.tensors[name + ".weight"] = WandaPruner.prune(w, inputSquaredNorms: norms, pattern: pattern, backend: backend)
            }
            return block
        }, backend: backend).meanLoss
    }
}

extension PrunePlan {
    /// The plan of block `i`: its own sparsity when the plan allocates one per block.
    public func forBlock(_ i: Int) -> PrunePlan {
        guard let a = allocation, i < a.count else { return self }
        var p = self
        p.pattern = .unstructured(a[i])
        p.allocation = nil
        return p
    }
}

/// `--allocation learned`: one budget over all blocks. A dense pass over the calibration windows
/// (one block in memory at a time, each block on the dense model's inputs) prunes every block at a
/// grid of sparsities around the target with the run's own masks and measures the block's output
/// error ‖Y − Ŷ‖² / ‖Y‖² against its dense output; the solver then chooses the block sparsities of
/// least total error whose parameter-weighted mean is the target.
public enum LearnedAllocation {
    /// One block's reconstruction error at each sparsity of the grid (sparsities increasing).
    public struct Curve: Sendable, Equatable, Codable {
        public var sparsities: [Double]
        public var errors: [Double]
        /// ‖Y‖² of the block's dense output, per measured window: errors × energy is the
        /// absolute error ‖Y − Ŷ‖² (recorded; the solver uses the relative errors, which did far
        /// better on SmolLM2, docs/methods.md).
        public var outputEnergy: Double?
        public init(sparsities: [Double], errors: [Double], outputEnergy: Double? = nil) {
            precondition(sparsities.count == errors.count && !sparsities.isEmpty, "a curve needs one error per sparsity")
            self.sparsities = sparsities
            self.errors = errors
            self.outputEnergy = outputEnergy
        }
        enum CodingKeys: String, CodingKey {
            case sparsities, errors
            case outputEnergy = "output_energy"
        }

    }

    /// The grid's half-width and step around the target.
    public static let radius = 0.1, step = 0.025
    /// The curves' errors are measured on at most this many calibration windows (the statistics,
    /// and so the masks, use them all).
    public static let errorWindows = 8

    /// target − radius ... target + radius in steps of `step`, inside [0.01, 0.99] (the target
    /// itself always in it).
    public static func grid(target: Double) -> [Double] {
        let k = Int((radius / step).rounded())
        var g: [Double] = [target]
        for j in -k...k where j != 0 {
            let s: Double = target + Double(j) * step
            if s >= 0.01 - 1e-12 && s <= 0.99 + 1e-12 { g.append(s) }
        }
        return g.sorted()
    }

    /// The solver whose masks measure the curves: the run's own where it prunes linear by linear;
    /// SparseGPT for SparseLLM (its inner solver) and for BESA with reconstruction, Wanda for BESA
    /// (the ordering its learned masks start from).
    public static func curveMethod(for plan: PrunePlan) -> PruneMethod {
        switch plan.method {
        case .magnitude, .wanda, .sparsegpt: return plan.method
        case .sparsellm: return .sparsegpt
        case .besa: return (plan.besa?.reconstruct ?? false) ? .sparsegpt : .wanda
        }
    }

    /// Each pruned block's curve (nil for the blocks outside --layers) and every block's linear
    /// parameter count. For SparseGPT one Hessian per statistics group serves every grid point.
    public static func measureCurves(model: LanguageModel, job: PruneJob, backend: any ComputeBackend = ComputeDevices.defaultBackend,
                                     log: (String) -> Void = { _ in }) throws -> (curves: [Curve?], parameters: [Int], squaredNorms: [[String: [Float]]]) {
        let c = model.config
        let method = curveMethod(for: job.plan)
        let grid = grid(target: job.plan.pattern.fraction)
        var inputs = RangePruner.store(job: job, config: c, backend: backend)
        let embedding = try model.loadEmbedding()
        for (s, window) in job.calibration.enumerated() { try inputs.set(s, embedding.embed(window, sequenceLength: job.sequenceLength)) }
        let rope = c.ropeTable(positions: job.sequenceLength)
        let measured = min(errorWindows, inputs.count)
        var curves: [Curve?] = [], parameters: [Int] = []
        var norms: [[String: [Float]]] = []
        for i in 0..<c.layerCount {
            let block = try model.loadBlock(i)
            let device = block.on(backend)
            let keys = BlockPruner.statisticsKeys(block.inputGroups)
            var stats: [String: LayerStatistics] = [:]
            let outputs = inputs.makeSibling()
            let collects = job.prunes(i)
            for s in 0..<inputs.count {
                let y = device.forward(try inputs.tensor(s), sequenceLength: job.sequenceLength, rope: rope, expertCalibration: job.plan.expertCalibration ?? .routed) { name, x in
                    guard collects, keys[name] == name else { return }
                    let st = stats[name] ?? LayerStatistics(columns: x.cols, backend: backend)
                    stats[name] = st
                    st.add(x)
                }
                try outputs.set(s, y)
            }
            parameters.append(block.linearNames.reduce(0) { $0 + device.weight($1).count })
            norms.append(stats.mapValues(\.squaredNorms))
            guard collects else {
                curves.append(nil)
                inputs = outputs
                continue
            }
            var errors: [Double] = []
            var energy = 0.0
            for sparsity in grid {
                var weights: [String: Tensor] = [:]
                for name in block.linearNames {
                    let w = device.weight(name)
                    let st = stats[keys[name] ?? name] ?? LayerStatistics(columns: w.cols, backend: backend)
                    let pattern = SparsityPattern.unstructured(sparsity)
                    switch method {
                    case .magnitude: weights[name] = MagnitudePruner.prune(w, pattern: pattern, on: backend)
                    case .wanda, .besa: weights[name] = WandaPruner.prune(w, inputSquaredNorms: st.squaredNormsTensor, pattern: pattern, on: backend)
                    case .sparsegpt, .sparsellm:
                        weights[name] = try SparseGPTPruner.prune(w, hessian: st.hessianTensor, pattern: pattern, options: job.plan.sparseGPT,
                                                                  what: "block \(i) \(name)", on: backend).weight
                    }
                }
                let pruned = device.replacing(weights: weights)
                var num = 0.0, den = 0.0
                for s in 0..<measured {
                    let y = pruned.forward(try inputs.tensor(s), sequenceLength: job.sequenceLength, rope: rope)
                    let dense = try outputs.tensor(s)
                    num += backend.chunkedSquaredDistance(y, dense)
                    den += backend.chunkedDot(dense, dense)
                }
                errors.append(den > 0 ? num / den : 0)
                energy = den / Double(max(1, measured))
            }
            curves.append(Curve(sparsities: grid, errors: errors, outputEnergy: energy))
            log("allocation: block \(i) error " + zip(grid, errors).map { String(format: "%.3f:%.3g", $0, $1) }.joined(separator: " "))
            inputs = outputs
        }
        return (curves, parameters, norms)
    }

    /// `--learned-blend auto`'s grid: the share of the way from uniform (0) to the curves'
    /// solution (1).
    public static let blendGrid: [Double] = [0, 0.25, 0.5, 0.75, 1]

    /// The block sparsities `share` of the way from the target to `solved` (the curves' solution)
    /// for the blocks with a curve; the others keep their value in `solved` (the target, as `solve`
    /// leaves them). The weighted mean stays the target:
    /// the last block with a curve absorbs the rounding of the sums. `share` 1 is `solved` itself.
    public static func blend(_ solved: [Double], curves: [Curve?], weights: [Double], target: Double, share: Double) -> [Double] {
        guard share != 1 else { return solved }
        let blocks = curves.indices.filter { curves[$0] != nil }
        guard let last = blocks.last else { return solved }
        var out = solved
        for b in blocks { out[b] = target + share * (solved[b] - target) }
        let total = blocks.reduce(0.0) { $0 + weights[$1] }
        let others = blocks.dropLast().reduce(0.0) { $0 + weights[$1] * out[$1] }
        out[last] = (target * total - others) / weights[last]
        return out
    }

    /// The block sparsities of least total error, each curve interpolated linearly between its
    /// points, whose mean weighted by `weights` is `target` (to the last bit the arithmetic
    /// allows). Exact for the piecewise-linear curves: each curve is replaced by its lower convex
    /// hull (a point above the hull is never optimal), every block starts at its smallest
    /// sparsity, and the hull segments are taken in increasing order of error per pruned weight
    /// (ties: block order) until the budget is met, the last one in part. Blocks with a nil curve
    /// keep the target and do not count.
    public static func solve(curves: [Curve?], weights: [Double], target: Double) throws -> [Double] {
        precondition(curves.count == weights.count, "one weight per block")
        var out = [Double](repeating: target, count: curves.count)
        let blocks = curves.indices.filter { curves[$0] != nil }
        guard !blocks.isEmpty else { return out }
        struct Segment { var block: Int; var from: Double; var to: Double; var slope: Double }
        var segments: [Segment] = []
        var total = 0.0, budget = 0.0, reachable = 0.0
        for b in blocks {
            let hull = lowerHull(curves[b]!)
            out[b] = hull[0].s
            total += weights[b]
            budget -= weights[b] * hull[0].s
            reachable += weights[b] * (hull.last!.s - hull[0].s)
            for k in hull.indices.dropFirst() {
                let (a, z) = (hull[k - 1], hull[k])
                segments.append(Segment(block: b, from: a.s, to: z.s, slope: (z.e - a.e) / (weights[b] * (z.s - a.s))))
            }
        }
        budget += target * total
        guard budget >= -1e-12 * total, budget <= reachable + 1e-12 * total else {
            throw PruneError.invalidOption("--allocation learned: the target \(target) is outside the sparsities the curves cover")
        }
        segments.sort { ($0.slope, $0.block, $0.from) < ($1.slope, $1.block, $1.from) }
        var last = blocks[0]
        for seg in segments where budget > 0 {
            let full = weights[seg.block] * (seg.to - seg.from)
            if full <= budget {
                out[seg.block] = seg.to
                budget -= full
            } else {
                out[seg.block] = seg.from + budget / weights[seg.block]
                budget = 0
            }
            last = seg.block
        }
        // The block that moved last absorbs the rounding of the sums, so the weighted mean is the
        // target exactly in the arithmetic used to check it.
        let others = blocks.filter { $0 != last }.reduce(0.0) { $0 + weights[$1] * out[$1] }
        out[last] = (target * total - others) / weights[last]
        return out
    }

    /// The lower convex hull of a curve's points (monotone chain), as (sparsity, error).
    static func lowerHull(_ curve: Curve) -> [(s: Double, e: Double)] {
        let points = zip(curve.sparsities, curve.errors).map { (s: $0, e: $1) }.sorted { $0.s < $1.s }
        var hull: [(s: Double, e: Double)] = []
        for p in points {
            if let l = hull.last, l.s == p.s {
                if p.e < l.e { hull[hull.count - 1] = p }
                continue
            }
            while hull.count >= 2 {
                let (a, b) = (hull[hull.count - 2], hull[hull.count - 1])
                // b is above the chord a-p (or on it): drop it.
                if (b.e - a.e) * (p.s - a.s) >= (p.e - a.e) * (b.s - a.s) { hull.removeLast() } else { break }
            }
            hull.append(p)
        }
        return hull
    }
}
