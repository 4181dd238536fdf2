import Foundation
import TopiaryModel
@testable import TopiaryPrune
import TopiaryTensor
import TopiaryTestSupport
import XCTest

/// Replicas of a stage (`ReplicaExchange`): for any replica count, a block's pruned weights, output
/// error and the next block's inputs are the bits one pruner gives, for every family and method.
final class ReplicaTests: XCTestCase {
    /// Prunes block 0 of `model` with `replicas` in-process replicas, each on its own thread;
    /// returns replica 0's weights and report and the outputs put together.
    func prune(_ model: LanguageModel, plan: PrunePlan, windows: [Matrix], sequenceLength: Int, replicas: Int,
               targets: [Matrix]? = nil) throws -> (block: DecoderBlock, report: BlockReport, outputs: [Matrix]) {
        try prune(try model.loadBlock(0), plan: plan, windows: windows, sequenceLength: sequenceLength, replicas: replicas, targets: targets)
    }

    func prune(_ block: DecoderBlock, plan: PrunePlan, windows: [Matrix], sequenceLength: Int, replicas: Int,
               targets: [Matrix]? = nil) throws -> (block: DecoderBlock, report: BlockReport, outputs: [Matrix]) {
        let store = { (ms: [Matrix], role: ReplicaRole) -> ActivationStore in
            let s = ActivationStore(count: ms.count, rows: sequenceLength, cols: block.config.hiddenSize, budgetBytes: 1 << 30, spillDirectory: NSTemporaryDirectory())
            for i in role.samples(ms.count) { try! s.set(i, ms[i]) }
            return s
        }
        if replicas == 1 {
            let r = try BlockPruner(plan: plan).prune(block: block, inputs: store(windows, .single), targets: targets.map { store($0, .single) },
                                                   sequenceLength: sequenceLength)
            return (r.block, r.report, try (0..<windows.count).map { try r.outputs.get($0) })
        }
        let hub = InProcessReplicaHub(count: replicas)
        final class Results: @unchecked Sendable {
            let lock = NSLock()
            var values: [Int: Result<(block: DecoderBlock, outputs: ActivationStore, report: BlockReport), Error>] = [:]
        }
        let results = Results()
        let group = DispatchGroup()
        for rank in 0..<replicas {
            group.enter()
            let role = ReplicaRole(rank: rank, count: replicas)
            let inputs = store(windows, role)
            let t = targets.map { store($0, role) }
            Thread.detachNewThread {
                let r = Result { try BlockPruner(plan: plan, exchange: hub.exchange(rank: rank)).prune(block: block, inputs: inputs, targets: t, sequenceLength: sequenceLength) }
                results.lock.lock()
                results.values[rank] = r
                results.lock.unlock()
                group.leave()
            }
        }
        group.wait()
        var outputs = [Matrix](repeating: Matrix(rows: 0, cols: 0), count: windows.count)
        for rank in 0..<replicas {
            let r = try results.values[rank]!.get()
            XCTAssertEqual(r.block.tensors, try results.values[0]!.get().block.tensors, "replica \(rank) holds another block")
            for s in ReplicaRole(rank: rank, count: replicas).samples(windows.count) { outputs[s] = try r.outputs.get(s) }
        }
        let first = try results.values[0]!.get()
        return (first.block, first.report, outputs)
    }

    func windows(_ model: LanguageModel, count: Int, length: Int, seed: UInt64) throws -> [Matrix] {
        var rng = SplitMix(seed: seed)
        let embedding = try model.loadEmbedding()
        return (0..<count).map { _ in
            embedding.embed((0..<length).map { _ in Int(rng.next() % UInt64(model.config.vocabularySize)) }, sequenceLength: length)
        }
    }

    func check(_ fixture: String, _ plan: PrunePlan, replicas: [Int] = [2, 3, 4], samples: Int = 5, targets: Bool = false,
               file: StaticString = #filePath, line: UInt = #line) throws {
        let model = try LanguageModel.open(path: TestPaths.fixture(fixture))
        let length = 16
        let w = try windows(model, count: samples, length: length, seed: 7)
        let t = targets ? try windows(model, count: samples, length: length, seed: 8) : nil
        let one = try prune(model, plan: plan, windows: w, sequenceLength: length, replicas: 1, targets: t)
        for r in replicas {
            let many = try prune(model, plan: plan, windows: w, sequenceLength: length, replicas: r, targets: t)
            XCTAssertEqual(many.block.tensors, one.block.tensors, "\(fixture) \(plan.method) with \(r) replicas: other weights", file: file, line: line)
            XCTAssertEqual(many.outputs, one.outputs, "\(fixture) \(plan.method) with \(r) replicas: other outputs", file: file, line: line)
            XCTAssertEqual(many.report.outputError, one.report.outputError, "\(fixture) \(plan.method) with \(r) replicas", file: file, line: line)
            XCTAssertEqual(many.report.linears.map(\.name), one.report.linears.map(\.name), file: file, line: line)
            XCTAssertEqual(many.report.linears.map(\.errorAfter), one.report.linears.map(\.errorAfter), file: file, line: line)
            XCTAssertEqual(many.report.expertTokens, one.report.expertTokens, file: file, line: line)
        }
    }

    func testEveryMethodGivesTheSameBitsAtAnyReplicaCount() throws {
        for method in PruneMethod.allCases {
            var plan = PrunePlan(method: method, pattern: .unstructured(0.6))
            if method == .besa { plan.besa = BESA.Options(epochs: 1) }
            try check("tiny-llama", plan)
        }
        try check("tiny-llama", PrunePlan(method: .sparsegpt, pattern: .nOfM(n: 2, m: 4)))
    }

    func testEveryFamilyGivesTheSameBitsWithReplicas() throws {
        for fixture in ["tiny-llama3", "tiny-qwen3", "tiny-gemma2", "tiny-phi3", "tiny-opt", "tiny-opt-postln", "tiny-mixtral"] {
            try check(fixture, PrunePlan(method: .sparsegpt, pattern: .unstructured(0.5)), replicas: [3])
        }
        // Experts: routed statistics (windows that reach no expert are skipped in the same order) and all tokens.
        try check("tiny-mixtral", PrunePlan(method: .sparsellm, pattern: .unstructured(0.5), sparseLLM: .llama), replicas: [2, 3])
        try check("tiny-mixtral", PrunePlan(method: .wanda, pattern: .unstructured(0.5), expertCalibration: .all), replicas: [2])
    }

    func testSparseLLMWithDenseTargetsGivesTheSameBitsWithReplicas() throws {
        try check("tiny-llama", PrunePlan(method: .sparsellm, pattern: .unstructured(0.6), sparseLLM: .llama, targets: .dense), replicas: [2, 3], targets: true)
        try check("tiny-llama", PrunePlan(method: .besa, pattern: .unstructured(0.6), targets: .dense, besa: BESA.Options(epochs: 1)), replicas: [2], targets: true)
    }

    /// A feed-forward wide enough (1024 inputs to down_proj: 8 tiles of 128) that its Hessian is
    /// shared: every replica sums its rows of it over all windows, the owner gathers them. The
    /// same bits as one process, for the methods that share statistics.
    func testASharedHessianGivesTheSameBitsAtAnyReplicaCount() throws {
        var c = ModelConfig(architecture: .llama, hiddenSize: 64, intermediateSize: 1024, layerCount: 1, headCount: 8,
                            kvHeadCount: 4, vocabularySize: 32, maxPositions: 64, normEps: 1e-5, tieWordEmbeddings: false)
        c.ropeTheta = 10000
        var rng = SplitMix(seed: 3)
        var tensors: [String: Matrix] = [:]
        for spec in c.family.blockTensors(c, block: 0) {
            let norm = spec.name.contains("norm")
            tensors[spec.name] = Matrix(rows: spec.rows, cols: spec.cols) { p in
                for i in p.indices { p[i] = norm ? 1 + 0.2 * rng.uniform() : 0.3 * rng.uniform() }
            }
        }
        let block = DecoderBlock(config: c, index: 0, tensors: tensors)
        let length = 16, samples = 5
        let windows = (0..<samples).map { _ in Matrix(rows: length, cols: 64) { p in for i in p.indices { p[i] = rng.uniform() } } }
        let tokens = samples * length
        for r in [2, 3, 4] {
            let shared = ReplicaWork.splitStatistics(block: block, plan: PrunePlan(method: .sparsegpt, pattern: .unstructured(0.5)),
                                                     tokens: tokens, replicas: r, tile: CPUBackend().statisticsTile(columns:))
            XCTAssertEqual(Array(shared.keys), ["model.layers.0.mlp.down_proj"], "\(r) replicas share down_proj's Hessian only")
            let rows = try XCTUnwrap(shared["model.layers.0.mlp.down_proj"])
            XCTAssertEqual(rows.first?.lowerBound, 0)
            XCTAssertEqual(rows.last?.upperBound, 1024)
            for k in 1..<r { XCTAssertEqual(rows[k - 1].upperBound, rows[k].lowerBound, "contiguous") }
            XCTAssertTrue(rows.allSatisfy { !$0.isEmpty && $0.lowerBound % 128 == 0 }, "\(rows)")
        }
        XCTAssertTrue(ReplicaWork.splitStatistics(block: block, plan: PrunePlan(method: .sparsellm, pattern: .unstructured(0.5)),
                                                  tokens: tokens, replicas: 2, tile: { _ in 128 }).isEmpty, "SparseLLM keeps a feed-forward together")
        XCTAssertTrue(ReplicaWork.splitStatistics(block: block, plan: PrunePlan(method: .sparsegpt, pattern: .unstructured(0.5)),
                                                  tokens: tokens, replicas: 2, tile: { _ in nil }).isEmpty, "a backend without tiles shares none")
        XCTAssertTrue(ReplicaWork.splitStatistics(block: block, plan: PrunePlan(method: .wanda, pattern: .unstructured(0.5)),
                                                  tokens: tokens, replicas: 2, tile: { _ in 128 }).isEmpty, "Wanda builds no Hessian to share")
        var wandaWithErrors = PrunePlan(method: .wanda, pattern: .unstructured(0.5))
        wandaWithErrors.linearErrors = true
        XCTAssertFalse(ReplicaWork.splitStatistics(block: block, plan: wandaWithErrors, tokens: tokens, replicas: 2, tile: { _ in 128 }).isEmpty,
                       "Wanda with --linear-errors shares down_proj's Hessian")
        for plan in [PrunePlan(method: .sparsegpt, pattern: .unstructured(0.5)), PrunePlan(method: .sparsegpt, pattern: .nOfM(n: 2, m: 4)),
                     PrunePlan(method: .wanda, pattern: .unstructured(0.5)), PrunePlan(method: .magnitude, pattern: .unstructured(0.5)),
                     wandaWithErrors] {
            let one = try prune(block, plan: plan, windows: windows, sequenceLength: length, replicas: 1)
            for r in [2, 3, 4] {
                let many = try prune(block, plan: plan, windows: windows, sequenceLength: length, replicas: r)
                XCTAssertEqual(many.block.tensors, one.block.tensors, "\(plan.method) \(plan.pattern) with \(r) replicas: other weights")
                XCTAssertEqual(many.outputs, one.outputs, "\(plan.method) with \(r) replicas: other outputs")
                XCTAssertEqual(many.report.linears.map(\.errorBefore), one.report.linears.map(\.errorBefore), "\(plan.method) with \(r) replicas")
                XCTAssertEqual(many.report.linears.map(\.errorAfter), one.report.linears.map(\.errorAfter), "\(plan.method) with \(r) replicas")
            }
        }
    }

    /// Rows of a shared Hessian: whole tiles, each replica about an equal share of the upper
    /// triangle's tiles, every row once.
    func testSharedHessianRowsCoverTheMatrixInBalancedTiles() {
        for (columns, count) in [(1024, 2), (1024, 3), (1536, 2), (1536, 4), (28672, 16), (300, 2)] {
            let ranges = (0..<count).map { ReplicaWork.statisticsRows($0, of: count, columns: columns, tile: 128) }
            XCTAssertEqual(ranges.first?.lowerBound, 0)
            XCTAssertEqual(ranges.last?.upperBound, columns)
            let t = (columns + 127) / 128
            var tiles: [Int] = []
            for (k, r) in ranges.enumerated() {
                if k > 0 { XCTAssertEqual(ranges[k - 1].upperBound, r.lowerBound) }
                XCTAssertEqual(r.lowerBound % 128, 0)
                tiles.append((r.lowerBound / 128..<(r.upperBound + 127) / 128).reduce(0) { $0 + (t - $1) })
            }
            let fair = Double(t * (t + 1) / 2) / Double(count)
            XCTAssertLessThanOrEqual(Double(tiles.max()!), fair + Double(t), "\(columns) columns over \(count): \(tiles)")
        }
    }

    func testMoreReplicasThanWindowsStillWork() throws {
        try check("tiny-llama", PrunePlan(method: .sparsegpt, pattern: .unstructured(0.5)), replicas: [4], samples: 2)
    }

    func testGroupsGoToReplicasByCostAndEveryGroupHasOneOwner() throws {
        let model = try LanguageModel.open(path: TestPaths.fixture("tiny-llama"))
        let block = try model.loadBlock(0)
        let keys = BlockPruner.statisticsKeys(block.inputGroups)
        for r in 1...5 {
            let owners = ReplicaWork.owners(block: block, plan: PrunePlan(method: .sparsegpt, pattern: .unstructured(0.5)), tokens: 4096, replicas: r)
            XCTAssertEqual(Set(owners.keys), Set(keys.values), "every statistics group has an owner")
            XCTAssertTrue(owners.values.allSatisfy { (0..<r).contains($0) })
            if r >= 2 { XCTAssertGreaterThan(Set(owners.values).count, 1, "\(r) replicas share the solves") }
        }
        // SparseLLM keeps a feed-forward's groups together; BESA the whole block.
        let sllm = ReplicaWork.owners(block: block, plan: PrunePlan(method: .sparsellm, pattern: .unstructured(0.5)), tokens: 4096, replicas: 4)
        for ffn in block.feedForwards {
            if case .gated(let g, _, let d) = ffn { XCTAssertEqual(sllm[keys[g]!], sllm[keys[d]!]) }
        }
        let besa = ReplicaWork.owners(block: block, plan: PrunePlan(method: .besa, pattern: .unstructured(0.5)), tokens: 4096, replicas: 4)
        XCTAssertEqual(Set(besa.values), [0])
        // SparseGPT's largest linear is solved by all replicas, rows split; so the equality tests
        // above go through the shared-rows solve (down_proj here).
        let split = ReplicaWork.splitLinears(block: block, plan: PrunePlan(method: .sparsegpt, pattern: .unstructured(0.5)), tokens: 80, replicas: 2)
        XCTAssertEqual(split.map { $0.components(separatedBy: ".").last! }, ["down_proj"])
        XCTAssertEqual(ReplicaWork.splitLinears(block: block, plan: PrunePlan(method: .wanda, pattern: .unstructured(0.5)), tokens: 80, replicas: 2), [])
        XCTAssertEqual(ReplicaWork.rowRange(2, of: 3, rows: 10), 6..<10)
        XCTAssertEqual((0..<3).map { ReplicaWork.rowRange($0, of: 3, rows: 10).count }.reduce(0, +), 10)
    }

    func testAFailingReplicaFailsTheOthersInsteadOfLeavingThemWaiting() throws {
        let model = try LanguageModel.open(path: TestPaths.fixture("tiny-llama"))
        let block = try model.loadBlock(0)
        let hub = InProcessReplicaHub(count: 2)
        let inputs = ActivationStore(count: 4, rows: 16, cols: model.config.hiddenSize, budgetBytes: 1 << 30, spillDirectory: NSTemporaryDirectory())
        for s in ReplicaRole(rank: 0, count: 2).samples(4) { try inputs.set(s, Matrix(rows: 16, cols: model.config.hiddenSize, repeating: 0.1)) }
        // Replica 1 fails before it sends anything.
        hub.exchange(rank: 1).fail("disk full")
        XCTAssertThrowsError(try BlockPruner(plan: PrunePlan(method: .sparsegpt, pattern: .unstructured(0.5)), exchange: hub.exchange(rank: 0))
            .prune(block: block, inputs: inputs, sequenceLength: 16)) { error in
            XCTAssertTrue("\(error)".contains("replica 1 of 2 failed: disk full"), "\(error)")
        }
    }
}

/// The per-linear error report measures large linears on a spread of rows, small ones on all.
final class ErrorReportRowsTests: XCTestCase {
    func testLargeLinearsAreMeasuredOnASpreadOfRowsAndSmallOnesOnAll() throws {
        XCTAssertNil(BlockPruner.errorRows(rows: 576, cols: 1536), "SmolLM2's largest linear is measured exactly")
        XCTAssertNil(BlockPruner.errorRows(rows: 4096, cols: 2048))
        let rows = try XCTUnwrap(BlockPruner.errorRows(rows: 8192, cols: 28672))
        XCTAssertEqual(rows.count, BlockPruner.errorRowSample)
        XCTAssertEqual(rows.first, 0)
        XCTAssertEqual(rows.last, 8192 - 16)
        XCTAssertEqual(Set(rows).count, rows.count)
        XCTAssertTrue(zip(rows, rows.dropFirst()).allSatisfy { $1 - $0 == 16 }, "evenly spread")
    }
}
