import Foundation
import XCTest
import TopiaryModel
import TopiaryPrune
import TopiaryTensor
import TopiaryTestSupport
@testable import TopiaryCluster

/// `PruneRun` without the command line: a request run through it records run.json and its
/// events, reports every block through its callback, writes the single-process blocks, and a
/// resumed request prunes no finished block again.
final class PruneRunTests: XCTestCase {
    func testARequestRunsRecordsAndResumes() throws {
        let model = try LanguageModel.open(path: TestPaths.asset("stories260K/stories260K.bin"),
                                           tokenizerPath: TestPaths.asset("stories260K/tok512.bin"))
        let text = try String(contentsOfFile: TestPaths.asset("public-domain-text/wizard_of_oz.txt"), encoding: .utf8)
        let windows = try Calibration.windows(tokens: model.tokenizer!.encode(text, addBOS: nil), samples: 4, sequenceLength: 64, seed: 0)
        let dir = try makeTemporaryDirectory("prune-run").path
        let job = PruneJob(plan: PrunePlan(method: .sparsegpt, pattern: .unstructured(0.5)), calibration: windows,
                           sequenceLength: 64, layers: 1...3, memoryBudget: 1 << 30, workDirectory: dir)
        let single = try BlockFileStore(directory: dir + "/single")
        _ = try PrunePipeline(model: model, job: job, store: single).run { _, _ in }
        let pruned = Set((0..<model.config.layerCount).filter { job.prunes($0) })
        func blocks(_ store: BlockFileStore) throws -> [[String: Matrix]] {
            let overlaid = model.overlaid(with: try store.sources(pruned.sorted()))
            return try pruned.sorted().map { try overlaid.loadBlock($0).tensors }
        }
        XCTAssertEqual(pruned, [1, 2, 3])
        let manifest = RunManifest(toolVersion: "test", created: "2026-12-02T00:00:00Z", model: .init(path: model.path, fingerprint: "f"),
                                   calibration: .init(path: "calib", sha256: "c"), options: ["method": "sparsegpt"], flags: [], plan: [])

        // A new run on two in-process workers.
        let runPath = dir + "/run"
        do {
        let run = try RunDirectory.create(path: runPath)
        let workers = (0..<2).map { InProcessWorker(model: model, name: "w\($0)") }
        let request = PruneRequest(model: model, job: job, coordination: .sequential, workers: workers, runDirectory: run, start: .new(manifest))
        let first = try PruneRun(request) { _ in }
        try first.prepare()
        XCTAssertEqual(first.plan.map(\.worker), ["w0", "w1"])
        XCTAssertEqual(first.plan.first?.first, 0)
        XCTAssertEqual(first.plan.last?.last, model.config.layerCount - 1)
        XCTAssertEqual(first.replayedBlocks, [0, 4])
        var seen: [(Int, Bool)] = []
        let outcome = try first.execute { event in
            if case .block(let b, let report) = event { seen.append((b, report != nil)) }
        }
        XCTAssertEqual(seen.map(\.0), Array(0..<model.config.layerCount))
        XCTAssertEqual(Set(seen.filter(\.1).map(\.0)), pruned)
        XCTAssertEqual(outcome.reports.map(\.block), [1, 2, 3])
        XCTAssertTrue(outcome.rounds.isEmpty)
        let expected = try blocks(single)
        XCTAssertEqual(try blocks(run.store), expected)
        let written = try run.readManifest()
        XCTAssertEqual(written.plan, first.plan)
        XCTAssertEqual(written.options, ["method": "sparsegpt"])
        let names = try run.events.records().map(\.event.name)
        XCTAssertEqual(names.first, "start")
        XCTAssertEqual(names.filter { $0 == "block_done" }.count, 3)

        }
        // Resumed (the first run's directory released with it): every block is finished, so each
        // is replayed and none pruned again.
        let again = try RunDirectory.open(existing: runPath)
        let second = try PruneRun(PruneRequest(model: model, job: job, coordination: .sequential, workers: [InProcessWorker(model: model)],
                                               runDirectory: again, start: .resume(try again.readManifest()))) { _ in }
        try second.prepare()
        XCTAssertEqual(second.finishedBlocks, pruned)
        XCTAssertEqual(second.replayedBlocks, Set(0..<model.config.layerCount))
        _ = try second.execute { _ in }
        let after = try again.events.records().map(\.event.name)
        XCTAssertEqual(after.filter { $0 == "block_done" }.count, 3, "\(after)")
        XCTAssertTrue(after.contains("resume"))
        XCTAssertEqual(try blocks(again.store), try blocks(single))
    }
}
