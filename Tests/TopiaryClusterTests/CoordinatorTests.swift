import Foundation
import XCTest
import TopiaryModel
import TopiaryPrune
import TopiaryTensor
import TopiaryTestSupport
@testable import TopiaryCluster

final class PartitionPlannerTests: XCTestCase {
    func testContiguousRangesBalancedByCost() {
        XCTAssertEqual(PartitionPlanner.plan(costs: Array(repeating: 1, count: 30), workers: 3), [0..<10, 10..<20, 20..<30])
        XCTAssertEqual(PartitionPlanner.plan(costs: Array(repeating: 1, count: 5), workers: 3).map(\.count).sorted(), [1, 2, 2])
        // An expensive block gets a range to itself.
        XCTAssertEqual(PartitionPlanner.plan(costs: [1, 1, 10, 1, 1], workers: 3), [0..<2, 2..<3, 3..<5])
        // More workers than blocks: one block each.
        XCTAssertEqual(PartitionPlanner.plan(costs: [1, 1], workers: 4), [0..<1, 1..<2])
        // Every block exactly once, in order.
        let plan = PartitionPlanner.plan(costs: (0..<40).map { Double($0 % 7 + 1) }, workers: 6)
        XCTAssertEqual(plan.flatMap { Array($0) }, Array(0..<40))
    }
}

/// Sequential coordination gives the single-process result bit for bit, whether the workers are
/// in this process or other processes over TCP.
final class SequentialCoordinationTests: XCTestCase {
    let secret = try! SharedSecret(bytes: Array("coordination test secret 0123456".utf8))

    func setup() throws -> (LanguageModel, PruneJob, String) {
        let model = try LanguageModel.open(path: TestPaths.asset("stories260K/stories260K.bin"),
                                           tokenizerPath: TestPaths.asset("stories260K/tok512.bin"))
        let text = try String(contentsOfFile: TestPaths.asset("public-domain-text/wizard_of_oz.txt"), encoding: .utf8)
        let windows = try Calibration.windows(tokens: model.tokenizer!.encode(text, addBOS: nil), samples: 6, sequenceLength: 96, seed: 0)
        let dir = try makeTemporaryDirectory("coordination").path
        let job = PruneJob(plan: PrunePlan(method: .sparsellm, pattern: .unstructured(0.6), sparseLLM: .llama, targets: .dense),
                           calibration: windows, sequenceLength: 96, layers: 1...4, memoryBudget: 1 << 30, workDirectory: dir)
        return (model, job, dir)
    }

    func blocks(_ model: LanguageModel, _ store: BlockFileStore, _ job: PruneJob) throws -> [[String: Matrix]] {
        let pruned = model.overlaid(with: try store.sources((0..<model.config.layerCount).filter { job.prunes($0) }))
        return try (0..<model.config.layerCount).map { try pruned.loadBlock($0).tensors }
    }

    func testInProcessAndRemoteWorkersMatchTheSingleProcessRun() throws {
        let (model, job, dir) = try setup()
        let single = try BlockFileStore(directory: dir + "/single")
        let singleReports = try PrunePipeline(model: model, job: job, store: single).run { _, _ in }
        let expected = try blocks(model, single, job)

        // Three in-process workers.
        let local = try BlockFileStore(directory: dir + "/local")
        let workers = (0..<3).map { InProcessWorker(model: model, name: "w\($0)") }
        let localReports = try Coordinator(model: model, job: job, store: local, workers: workers).run { _, _ in }
        XCTAssertEqual(try blocks(model, local, job), expected)
        XCTAssertEqual(localReports.map(\.block), singleReports.map(\.block))

        // Two workers behind TCP on distinct loopback addresses, in this process's threads.
        var links: [WorkerLink] = []
        let group = DispatchGroup()
        for host in ["127.0.0.1", "127.0.0.2"] {
            let listener = try Listener(endpoint: Endpoint(host: host, port: 0))
            let service = WorkerService(name: "worker@\(host)", workDirectory: dir + "/worker-\(host)")
            let secret = self.secret
            DispatchQueue.global().async(group: group) {
                guard let c = try? listener.accept(timeout: 30) else { return }
                _ = try? c.acceptHandshake(secret: secret, name: service.name)
                try? service.serve(c)
                c.close()
            }
            let c = try Connection.connect(to: listener.endpoint)
            XCTAssertEqual(try c.authenticate(secret: secret, name: "coordinator", role: 0), "worker@\(host)")
            links.append(RemoteWorker(connection: c, name: host, model: model, tokenizerPath: TestPaths.asset("stories260K/tok512.bin")))
        }
        let remote = try BlockFileStore(directory: dir + "/remote")
        let remoteReports = try Coordinator(model: model, job: job, store: remote, workers: links).run { _, _ in }
        XCTAssertEqual(try blocks(model, remote, job), expected)
        XCTAssertEqual(remoteReports.map(\.outputError), singleReports.map(\.outputError))
        for l in links { (l as! RemoteWorker).shutdown() }
        XCTAssertEqual(group.wait(timeout: .now() + 30), .success)
    }

    /// Blocks after the last one --layers prunes are not run at all (nothing needs their
    /// activations), and the pruned blocks are still the single-process run's.
    func testNoBlockAfterTheLastPrunedOneRuns() throws {
        var (model, job, dir) = try setup()
        job.layers = 1...2
        let single = try BlockFileStore(directory: dir + "/single")
        _ = try PrunePipeline(model: model, job: job, store: single).run { _, _ in }
        let source = RecordingSource(model.weights)
        let recorded = LanguageModel(path: model.path, format: model.format, config: model.config, weights: source, tokenizer: model.tokenizer)
        let store = try BlockFileStore(directory: dir + "/recorded")
        let workers = (0..<2).map { InProcessWorker(model: recorded, name: "w\($0)") }
        var progressed: [Int] = []
        _ = try Coordinator(model: recorded, job: job, store: store, workers: workers).run { i, _ in progressed.append(i) }
        let family = model.config.family
        for b in 0..<model.config.layerCount {
            let read = family.blockTensors(model.config, block: b).filter { source.loaded.contains($0.name) }
            XCTAssertEqual(read.isEmpty, b > 2, "block \(b): \(read.count) of its tensors read")
        }
        XCTAssertEqual(progressed, Array(0..<model.config.layerCount))
        XCTAssertEqual(try blocks(model, store, job), try blocks(model, single, job))
    }

    /// A worker asked for blocks the model does not have answers with an error, not a crash.
    func testWorkerErrorsReachTheCoordinator() throws {
        let (model, job, dir) = try setup()
        let listener = try Listener(endpoint: Endpoint(host: "127.0.0.1", port: 0))
        let service = WorkerService(name: "w", workDirectory: dir + "/w")
        let secret = self.secret
        let group = DispatchGroup()
        DispatchQueue.global().async(group: group) {
            guard let c = try? listener.accept(timeout: 30) else { return }
            _ = try? c.acceptHandshake(secret: secret, name: "w")
            try? service.serve(c)
        }
        let c = try Connection.connect(to: listener.endpoint)
        _ = try c.authenticate(secret: secret, name: "coordinator", role: 0)
        let link = RemoteWorker(connection: c, name: "w", model: model, tokenizerPath: nil)
        let boundary = try PrunePipeline(model: model, job: job, store: try BlockFileStore(directory: dir + "/s")).embed()
        XCTAssertThrowsError(try link.run(3..<9, job: job, from: boundary) { _, _, _ in }) { e in
            XCTAssertTrue("\(e)".contains("outside the model's 5 blocks"), "\(e)")
        }
        link.shutdown()
        XCTAssertEqual(group.wait(timeout: .now() + 30), .success)
    }
}

/// A model's tensors, with the names of those loaded recorded.
final class RecordingSource: TensorSource, @unchecked Sendable {
    let base: any TensorSource
    private let lock = NSLock()
    private var names: Set<String> = []
    init(_ base: any TensorSource) { self.base = base }
    var path: String { base.path }
    var tensorNames: [String] { base.tensorNames }
    var loaded: Set<String> { lock.withLock { names } }
    func entry(_ name: String) -> TensorEntry? { base.entry(name) }
    func load(_ name: String) throws -> Matrix {
        lock.withLock { _ = names.insert(name) }
        return try base.load(name)
    }
}
