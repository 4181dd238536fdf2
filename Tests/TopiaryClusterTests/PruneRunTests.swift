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
    /// stories260K with the tokens of wizard_of_oz.txt, shared by the tests.
    struct Fixture {
        let model: LanguageModel
        let tokens: [Int]

        init() throws {
            model = try LanguageModel.open(path: TestPaths.asset("stories260K/stories260K.bin"),
                                           tokenizerPath: TestPaths.asset("stories260K/tok512.bin"))
            let text = try String(contentsOfFile: TestPaths.asset("public-domain-text/wizard_of_oz.txt"), encoding: .utf8)
            tokens = model.tokenizer!.encode(text, addBOS: nil)
        }

        func windows(samples: Int, length: Int) throws -> [[Int]] {
            try Calibration.windows(tokens: tokens, samples: samples, sequenceLength: length, seed: 0)
        }

        func manifest(options: [String: String] = [:]) -> RunManifest {
            RunManifest(toolVersion: "test", created: "2026-12-04T00:00:00Z", model: .init(path: model.path, fingerprint: "f"),
                        calibration: .init(path: "calib", sha256: "c"), options: options, flags: [], plan: [])
        }
    }

    func testARequestRunsRecordsAndResumes() throws {
        let fixture = try Fixture()
        let model = fixture.model
        let windows = try fixture.windows(samples: 4, length: 64)
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
        let manifest = fixture.manifest(options: ["method": "sparsegpt"])

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

    /// `run` with a delivery: the dense and pruned perplexities, the output directory (the
    /// single-process weights, report.json, the marker), report.json in the run directory, the
    /// `complete` event, and the checkpoints gone; a request without one is refused by name.
    func testRunDeliversTheOutputAndReport() throws {
        let fixture = try Fixture()
        let (model, tokens) = (fixture.model, fixture.tokens)
        let windows = try fixture.windows(samples: 4, length: 64)
        let dir = try makeTemporaryDirectory("prune-run-deliver").path
        let job = PruneJob(plan: PrunePlan(method: .wanda, pattern: .unstructured(0.5)), calibration: windows,
                           sequenceLength: 64, layers: nil, memoryBudget: 1 << 30, workDirectory: dir)
        let single = try BlockFileStore(directory: dir + "/single")
        let pipeline = PrunePipeline(model: model, job: job, store: single)
        _ = try pipeline.run { _, _ in }
        let expectedFiles = try HuggingFaceExport.write(model: try pipeline.prunedModel(), to: dir + "/expected", dtype: .f32)
        let expectedSHA = try SHA256Digest.files(expectedFiles.filter { $0.hasSuffix(".safetensors") })
        let manifest = fixture.manifest(options: ["method": "wanda"])
        let run = try RunDirectory.create(path: dir + "/run")
        var request = PruneRequest(model: model, job: job, coordination: .sequential, workers: [InProcessWorker(model: model)],
                                   runDirectory: run, start: .new(manifest))
        let noDelivery = try PruneRun(request) { _ in }
        try noDelivery.prepare()
        XCTAssertThrowsError(try noDelivery.run { _ in }) { XCTAssertTrue("\($0)".contains("delivery"), "\($0)") }

        let output = dir + "/pruned"
        request.delivery = PruneDelivery(output: output, dtype: .f32, overwrite: false,
                                         evaluation: .init(tokens: Array(tokens.prefix(2000)), source: "wizard", sequenceLength: 128, windows: 2, skipDense: false),
                                         sgemmRate: nil, fields: ["calibration": ["file": "calib"]], started: Date())
        let pruneRun = try PruneRun(request) { _ in }
        try pruneRun.prepare()
        var prunedEvent = false
        let result = try pruneRun.run { if case .pruned = $0 { prunedEvent = true } }
        XCTAssertTrue(prunedEvent)
        XCTAssertEqual(result.outputSHA256, expectedSHA)
        XCTAssertEqual(result.sparsity, 0.5, accuracy: 1e-3)
        let dense = try XCTUnwrap(result.perplexityDense), pruned = try XCTUnwrap(result.perplexity)
        XCTAssertGreaterThan(pruned, dense)
        let listed = try OutputDirectory.writtenFiles(output)
        XCTAssertTrue(listed.isSuperset(of: ["model.safetensors", "report.json", "config.json"]), "\(listed)")
        for path in [output + "/report.json", run.reportPath] {
            let report = try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: path))) as? [String: Any])
            XCTAssertEqual(report["output_sha256"] as? String, expectedSHA, path)
            XCTAssertEqual(report["method"] as? String, "wanda")
            XCTAssertEqual((report["calibration"] as? [String: Any])?["file"] as? String, "calib")
            XCTAssertEqual((report["blocks"] as? [Any])?.count, model.config.layerCount)
            XCTAssertEqual(report["perplexity"] as? Double, pruned)
        }
        let events = try run.events.records().map(\.event)
        guard case .complete(let written, let sha)? = events.last else { return XCTFail("no complete event: \(events.map(\.name))") }
        XCTAssertEqual(written, output)
        XCTAssertEqual(sha, expectedSHA)
        XCTAssertFalse(FileManager.default.fileExists(atPath: run.path + "/blocks"), "the checkpoints stay after complete")
        XCTAssertNil(result.summary["blocks"])
    }

    /// An output that may not be replaced (a directory Topiary did not write) fails the delivery
    /// after the pruning: nothing of the user's is touched, no staging directory is left beside
    /// it, and the run is not recorded as complete (its checkpoints stay for another --output).
    func testAFailedInstallLeavesNoStagingAndNoCompleteEvent() throws {
        let fixture = try Fixture()
        let model = fixture.model
        let windows = try fixture.windows(samples: 2, length: 32)
        let dir = try makeTemporaryDirectory("prune-run-taken").path
        let job = PruneJob(plan: PrunePlan(method: .magnitude, pattern: .unstructured(0.5)), calibration: windows,
                           sequenceLength: 32, layers: 0...0, memoryBudget: 1 << 30, workDirectory: dir)
        let output = dir + "/taken"
        try FileManager.default.createDirectory(atPath: output, withIntermediateDirectories: true)
        try Data("mine".utf8).write(to: URL(fileURLWithPath: output + "/mine.txt"))
        let manifest = fixture.manifest()
        let run = try RunDirectory.create(path: dir + "/run")
        var request = PruneRequest(model: model, job: job, coordination: .sequential, workers: [InProcessWorker(model: model)],
                                   runDirectory: run, start: .new(manifest))
        request.delivery = PruneDelivery(output: output, dtype: .f32, overwrite: false, evaluation: nil, sgemmRate: nil, fields: [:], started: Date())
        let pruneRun = try PruneRun(request) { _ in }
        try pruneRun.prepare()
        XCTAssertThrowsError(try pruneRun.run { _ in }) { XCTAssertTrue("\($0)".contains("exists and is not empty"), "\($0)") }
        XCTAssertEqual(try String(contentsOfFile: output + "/mine.txt", encoding: .utf8), "mine")
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: output), ["mine.txt"])
        XCTAssertFalse(FileManager.default.fileExists(atPath: OutputDirectory.stagingPath(for: output)))
        XCTAssertFalse(try run.events.records().contains { $0.event.name == "complete" })
        XCTAssertTrue(FileManager.default.fileExists(atPath: run.path + "/blocks"), "the checkpoints stay")
    }
}
