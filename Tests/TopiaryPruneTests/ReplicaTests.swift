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

    /// In every family, the dense pass of the windows outside the output error's sample makes
    /// no feed-forward output product (`DeviceBlock.withoutProducts`) and shows the linears the
    /// same inputs: the weights and the next block's inputs are those of a block that measures
    /// the error on every window, with one process and with replicas.
    func testEveryFamilyCollectsTheSameStatisticsWithoutTheFeedForwardsOutput() throws {
        for fixture in ["tiny-llama3", "tiny-qwen3", "tiny-gemma2", "tiny-phi3", "tiny-opt", "tiny-opt-postln", "tiny-mixtral"] {
            let model = try LanguageModel.open(path: TestPaths.fixture(fixture))
            let w = try windows(model, count: 5, length: 16, seed: 11)
            for method in [PruneMethod.sparsegpt, .wanda] {
                var (sampled, every) = (PrunePlan(method: method, pattern: .unstructured(0.5)), PrunePlan(method: method, pattern: .unstructured(0.5)))
                sampled.outputErrorSample = 1
                every.outputErrorSample = 5
                let reference = try prune(model, plan: every, windows: w, sequenceLength: 16, replicas: 1)
                XCTAssertNil(reference.report.outputErrorWindows)
                for replicas in [1, 2] {
                    let r = try prune(model, plan: sampled, windows: w, sequenceLength: 16, replicas: replicas)
                    XCTAssertEqual(r.report.outputErrorWindows, 1, "\(fixture) \(method)")
                    XCTAssertEqual(r.block.tensors, reference.block.tensors, "\(fixture) \(method) with \(replicas) replicas")
                    XCTAssertEqual(r.outputs, reference.outputs, "\(fixture) \(method) with \(replicas) replicas")
                    XCTAssertEqual(r.report.linears.map(\.errorAfter), reference.report.linears.map(\.errorAfter), "\(fixture) \(method)")
                    XCTAssertGreaterThan(r.report.outputError, 0, "\(fixture) \(method)")
                }
            }
        }
    }

    func testSparseLLMWithDenseTargetsGivesTheSameBitsWithReplicas() throws {
        try check("tiny-llama", PrunePlan(method: .sparsellm, pattern: .unstructured(0.6), sparseLLM: .llama, targets: .dense), replicas: [2, 3], targets: true)
        try check("tiny-llama", PrunePlan(method: .besa, pattern: .unstructured(0.6), targets: .dense, besa: BESA.Options(epochs: 1)), replicas: [2], targets: true)
    }

    /// A feed-forward wide enough (1024 inputs to down_proj: 8 strips of 128) that its Hessian
    /// travels down the chain of replicas in several parts, with some replicas holding no window
    /// (5 windows over 4): the same bits as one process.
    func testAWideHessianPassedDownTheChainGivesTheSameBitsAtAnyReplicaCount() throws {
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
        let keys = Set(BlockPruner.statisticsKeys(block.inputGroups).values)
        XCTAssertEqual(ReplicaWork.chainedStatistics(block: block, plan: PrunePlan(method: .sparsegpt, pattern: .unstructured(0.5))), keys)
        XCTAssertEqual(ReplicaWork.chainedStatistics(block: block, plan: PrunePlan(method: .sparsellm, pattern: .unstructured(0.5))),
                       keys.subtracting(["model.layers.0.mlp.gate_proj"]), "SparseLLM's owner needs the feed-forward's inputs")
        var wandaWithErrors = PrunePlan(method: .wanda, pattern: .unstructured(0.5))
        wandaWithErrors.linearErrors = true
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

    /// Replicas run contiguous ranges of windows that cover them all once.
    func testReplicasRunContiguousRangesOfTheWindows() {
        for (total, count) in [(32, 2), (32, 3), (5, 4), (2, 4), (128, 16), (0, 2)] {
            var seen: [Int] = []
            for rank in 0..<count {
                let role = ReplicaRole(rank: rank, count: count)
                let mine = role.samples(total)
                seen += mine
                for s in mine {
                    XCTAssertTrue(role.owns(sample: s, of: total))
                    XCTAssertEqual(role.rank(ofSample: s, of: total), rank)
                }
                XCTAssertLessThanOrEqual(mine.count, (total + count - 1) / count)
            }
            XCTAssertEqual(seen, Array(0..<total), "\(total) windows over \(count)")
        }
    }

    /// A broadcast's tree: from any root, every other replica has one parent, is its parent's
    /// child, and is reached within ⌈log₂ R⌉ hops; the root sends ⌈log₂ R⌉ times at most. Then a
    /// real broadcast over the in-process hub from every root reaches every replica.
    func testABroadcastTreeReachesEveryReplicaOnceWithinLogHops() throws {
        for count in 1...17 {
            let depthLimit = count == 1 ? 0 : Int.bitWidth - (count - 1).leadingZeroBitCount
            for root in 0..<count {
                var depth = [root: 0]
                var queue = [root]
                while let v = queue.first {
                    queue.removeFirst()
                    for c in ReplicaRole(rank: v, count: count).broadcastChildren(root: root) {
                        XCTAssertNil(depth[c], "\(c) reached twice (root \(root) of \(count))")
                        XCTAssertEqual(ReplicaRole(rank: c, count: count).broadcastParent(root: root), v)
                        depth[c] = depth[v]! + 1
                        queue.append(c)
                    }
                }
                XCTAssertEqual(depth.count, count, "root \(root) of \(count) reaches \(depth.keys.sorted())")
                XCTAssertLessThanOrEqual(depth.values.max() ?? 0, depthLimit)
                XCTAssertLessThanOrEqual(ReplicaRole(rank: root, count: count).broadcastChildren(root: root).count, depthLimit)
                XCTAssertNil(ReplicaRole(rank: root, count: count).broadcastParent(root: root))
            }
        }
        let count = 6
        let hub = InProcessReplicaHub(count: count)
        final class Box: @unchecked Sendable { var got: [Int: [Matrix]] = [:]; let lock = NSLock() }
        let box = Box()
        let group = DispatchGroup()
        for rank in 0..<count {
            group.enter()
            Thread.detachNewThread {
                let exchange = hub.exchange(rank: rank)
                var mine: [Matrix] = []
                for root in 0..<count {
                    let key = ReplicaKey(block: 0, kind: .weight, name: "w", index: root)
                    let value: ReplicaValue? = root == rank ? .matrix(Matrix(rows: 1, cols: 1, repeating: Float(root))) : nil
                    if case .matrix(let m) = try? exchange.broadcast(key, value, root: root) { mine.append(m) }
                }
                box.lock.lock(); box.got[rank] = mine; box.lock.unlock()
                group.leave()
            }
        }
        group.wait()
        for rank in 0..<count {
            XCTAssertEqual(box.got[rank]?.map { $0[0, 0] }, (0..<count).map(Float.init), "replica \(rank)")
        }
    }

    /// The chain on its own: R replicas (some with no window, some whose windows never reached a
    /// group, as an expert's) make the statistics that one `LayerStatistics` makes from all the
    /// windows in order, bit for bit, H, the squared norms and the counts, on the owner only.
    func testTheStatisticsChainMakesOneProcesssBits() throws {
        var rng = SplitMix(seed: 11)
        func random(_ rows: Int, _ cols: Int) -> Tensor {
            CPUBackend().upload(Matrix(rows: rows, cols: cols) { p in for i in p.indices { p[i] = rng.uniform() - 0.5 } })
        }
        // Group "a": 300 columns (3 strips, the last short); "b": 64 columns, reached by windows 1 and 4 only.
        let windows = 6
        let a = (0..<windows).map { random(7 + $0, 300) }
        let b: [Int: Tensor] = [1: random(3, 64), 4: random(5, 64)]
        for hessian in [true, false] {
            let one = ["a": LayerStatistics(columns: 300, hessian: hessian), "b": LayerStatistics(columns: 64, hessian: hessian)]
            for s in 0..<windows {
                one["a"]!.add(a[s])
                if let x = b[s] { one["b"]!.add(x) }
            }
            // Pieces of 128 columns in batches of one block and of 3 (3 strips of 300 columns in 6
            // pieces), and the default pieces in batches of 2 (a strip each).
            for (count, maxColumns, batch) in [(1, 128, 1), (2, 128, 3), (3, 4096, 2), (4, 128, 1), (7, 4096, 2), (3, 128, 3)] {
                let hub = InProcessReplicaHub(count: count)
                let owners = ["a": count - 1 > 0 ? 1 : 0, "b": 0]
                final class Box: @unchecked Sendable { var outcomes: [Int: Result<StatisticsChain.Outcome, Error>] = [:]; let lock = NSLock() }
                let box = Box()
                let group = DispatchGroup()
                for rank in 0..<count {
                    group.enter()
                    Thread.detachNewThread {
                        let role = ReplicaRole(rank: rank, count: count)
                        var held: [String: [Tensor]] = [:]
                        for s in role.samples(windows) {
                            held["a", default: []].append(a[s])
                            if let x = b[s] { held["b", default: []].append(x) }
                        }
                        var chain = StatisticsChain(exchange: hub.exchange(rank: rank), backend: CPUBackend(), block: 0, hessian: hessian,
                                                    windows: windows, tokensPerWindow: 12)
                        (chain.maxColumns, chain.batchBlocks) = (maxColumns, rank % 2 == 0 ? batch : 1)
                        let r = Result { try chain.run(groups: ["a": 300, "b": 64], held: held, owners: owners) }
                        box.lock.lock(); box.outcomes[rank] = r; box.lock.unlock()
                        group.leave()
                    }
                }
                group.wait()
                for rank in 0..<count {
                    let out = try box.outcomes[rank]!.get()
                    for key in ["a", "b"] {
                        guard owners[key] == rank else {
                            XCTAssertNil(out.statistics[key], "\(key) on replica \(rank), not its owner")
                            continue
                        }
                        let st = try XCTUnwrap(out.statistics[key], "\(key) on its owner \(rank) of \(count)")
                        XCTAssertEqual(st.sequences, one[key]!.sequences)
                        XCTAssertEqual(out.tokens[key], key == "a" ? (0..<windows).reduce(0) { $0 + 7 + $1 } : 8)
                        XCTAssertEqual(st.squaredNorms, one[key]!.squaredNorms, "\(key), \(count) replicas: other squared norms")
                        if hessian { XCTAssertEqual(st.hessian, one[key]!.hessian, "\(key), \(count) replicas, pieces of \(maxColumns): another Hessian") }
                    }
                }
            }
        }
    }

    /// A strip from the previous replica of the wrong shape, or unreadable counts, fail the chain
    /// with the group's name instead of a trap or wrong statistics.
    func testABadPartOnTheChainIsAnErrorNamingTheGroup() throws {
        let x = CPUBackend().upload(Matrix(rows: 4, cols: 256, repeating: 0.5))
        let header = ReplicaValue.bytes(BlockPruner.encode([2, 8] + [Double](repeating: 0, count: 256)))
        let norms = [Double](repeating: 0, count: 256)
        // An unreadable header; a header of the wrong width; more windows than come before replica 1
        // (2 of 4), more tokens than they can hold, a negative count; a readable header, then a strip
        // of the wrong height or none.
        for parts in [[ReplicaValue.bytes([1, 2, 3])], [.bytes(BlockPruner.encode([2, 8, 0]))], [.matrix(Matrix(rows: 1, cols: 3))],
                      [.bytes(BlockPruner.encode([3, 8] + norms))], [.bytes(BlockPruner.encode([2, 100] + norms))],
                      [.bytes(BlockPruner.encode([-1, 0] + norms))], [.bytes(BlockPruner.encode([9e18, 9e18] + norms))],
                      [header, .matrix(Matrix(rows: 5, cols: 256))], [header, .absent]] {
            let hub = InProcessReplicaHub(count: 2)
            let first = hub.exchange(rank: 0)
            for (i, part) in parts.enumerated() {
                try first.send(ReplicaKey(block: 3, kind: .chainedStatistics, name: "g", index: i), part, to: 1)
            }
            let chain = StatisticsChain(exchange: hub.exchange(rank: 1), backend: CPUBackend(), block: 3, hessian: true,
                                        windows: 4, tokensPerWindow: 16)
            XCTAssertThrowsError(try chain.run(groups: ["g": 256], held: ["g": [x]], owners: ["g": 1])) { error in
                XCTAssertTrue("\(error)".contains("g") && "\(error)".contains("block 3"), "\(error)")
            }
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
        XCTAssertEqual(Set(besa.values), [3], "one learner: the last replica (ties go to the highest rank)")
        // SparseGPT's largest linear is solved by all replicas, rows split; so the equality tests
        // above go through the shared-rows solve (down_proj here).
        let split = ReplicaWork.splitLinears(block: block, plan: PrunePlan(method: .sparsegpt, pattern: .unstructured(0.5)), tokens: 80, replicas: 2)
        XCTAssertEqual(split.map { $0.components(separatedBy: ".").last! }, ["down_proj"])
        XCTAssertEqual(ReplicaWork.splitLinears(block: block, plan: PrunePlan(method: .wanda, pattern: .unstructured(0.5)), tokens: 80, replicas: 2), [])
        XCTAssertEqual(ReplicaWork.rowRange(2, of: 3, rows: 10), 6..<10)
        XCTAssertEqual((0..<3).map { ReplicaWork.rowRange($0, of: 3, rows: 10).count }.reduce(0, +), 10)
    }

    func testTheHeldInputsEstimateIsTheChainedGroupsWidthsTimesTheLargestRangesTokens() throws {
        let model = try LanguageModel.open(path: TestPaths.fixture("tiny-llama"))
        let c = model.config
        let block = try model.loadBlock(0)
        let sparsegpt = PrunePlan(method: .sparsegpt, pattern: .unstructured(0.5))
        func widths(_ plan: PrunePlan) -> Int {
            let chained = ReplicaWork.chainedStatistics(block: block, plan: plan)
            return chained.reduce(0) { $0 + block.tensors[$1 + ".weight"]!.cols }
        }
        // 10 windows over 3 replicas: the largest range has 4.
        XCTAssertEqual(ReplicaWork.heldInputBytes(config: c, plan: sparsegpt, windows: 10, sequenceLength: 16, replicas: 3, blocks: 0..<1),
                       4 * 16 * widths(sparsegpt) * 4)
        XCTAssertEqual(ReplicaWork.heldInputBytes(config: c, plan: sparsegpt, windows: 10, sequenceLength: 16, replicas: 1, blocks: 0..<1), 0)
        // SparseLLM's feed-forward inputs go to their owner window by window instead.
        let sparsellm = PrunePlan(method: .sparsellm, pattern: .unstructured(0.5))
        XCTAssertLessThan(widths(sparsellm), widths(sparsegpt))
        XCTAssertEqual(ReplicaWork.heldInputBytes(config: c, plan: sparsellm, windows: 10, sequenceLength: 16, replicas: 2, blocks: 0..<1),
                       5 * 16 * widths(sparsellm) * 4)
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
