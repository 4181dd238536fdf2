import Foundation
import XCTest
import TopiaryTestSupport

/// A run directory written by an earlier Topiary resumes with this one: run.json and
/// events.jsonl keep their fields (docs/run-directory.md) now that they are written and read as
/// typed values.
///
/// Tests/Fixtures/run-v2 was written by Topiary at b0ffd24 (before run.json and the events were
/// typed): `topiary prune --model M/stories260K.bin --tokenizer M/tok512.bin --method sparsegpt
/// --sparsity 0.5 --calib M/calib.txt --calib-samples 4 --calib-seqlen 64 --seed 0 --output M/out
/// --run-dir M/run --workers 2` with M = /tmp/topiary-run-v2-fixture, stopped by SIGTERM after
/// blocks 0 and 1 (TOPIARY_DEBUG_BLOCK_DELAY=1). run.json's checksum and every checkpoint bind
/// those absolute paths, so the test lays the run out at M again (one run at a time: the run
/// directory's lock). Its two pruned blocks were computed with OpenBLAS's SkylakeX kernel, so the
/// resumed output equals a fresh run's bytes only with that kernel: both runs use it where the
/// CPU has AVX-512, and elsewhere the test checks everything but the bytes.
final class RunFormatCLITests: XCTestCase {
    /// Whether this CPU can run the SkylakeX kernel the fixture was written with.
    static var hasAVX512: Bool {
        guard let info = try? String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8),
              let line = info.split(separator: "\n").first(where: { $0.hasPrefix("flags") }) else { return false }
        let flags = Set(line.split(separator: " ").map(String.init))
        return ["avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"].allSatisfy(flags.contains)
    }

    static let root = "/tmp/topiary-run-v2-fixture"

    func testARunDirectoryWrittenBeforeTheTypedEventsResumes() throws {
        let fm = FileManager.default
        let root = Self.root
        try? fm.removeItem(atPath: root)
        try fm.createDirectory(atPath: root, withIntermediateDirectories: true)
        addTeardownBlock { try? FileManager.default.removeItem(atPath: root) }
        let fixture = CLI.repositoryRoot.appendingPathComponent("Tests/Fixtures/run-v2").path
        for (from, to) in [(CLI.asset("stories260K/stories260K.bin"), "stories260K.bin"), (CLI.asset("stories260K/tok512.bin"), "tok512.bin"),
                           (fixture + "/calib.txt", "calib.txt"), (fixture + "/run", "run")] {
            guard fm.fileExists(atPath: from) else { throw MissingAsset(from) }
            try fm.copyItem(atPath: from, toPath: root + "/" + to)
        }
        let oldEvents = CLI.events(root + "/run")
        XCTAssertEqual(oldEvents.compactMap { $0["event"] as? String }, ["start", "block_done", "block_done", "interrupted"])

        let kernel = Self.hasAVX512 ? ["OPENBLAS_CORETYPE": "SkylakeX"] : [:]
        let sameKernel = Self.hasAVX512
        if !sameKernel { print("RunFormatCLITests: no AVX-512 here, so the fixture's SkylakeX bytes cannot be reproduced; checking all but the bytes") }
        // The fixture's blocks 0 and 1 were solved before SparseGPT's factor of H⁻¹ came from one
        // Cholesky of the reversed Hessian (2026-12-05), which changed the bits of every SparseGPT
        // block: a fresh run now writes other bytes than this resumed one, which keeps the old
        // blocks. What stays checkable: the resumed run's bytes are its own (the same resume, from
        // a fresh copy of the fixture, writes them again).
        let first = try CLI.run(["prune", "--resume", root + "/run", "--json"], environment: kernel)
        XCTAssertEqual(first.status, 0, first.stderr)
        let expected = try XCTUnwrap(first.json?["output_sha256"] as? String)
        for name in ["run", "out"] { try fm.removeItem(atPath: root + "/" + name) }
        try fm.copyItem(atPath: fixture + "/run", toPath: root + "/run")

        // A fresh run (all blocks solved now) writes other bytes: the resume kept the old blocks.
        let dir = try CLI.temporaryDirectory(self)
        let fresh = try CLI.run(["prune", "--model", root + "/stories260K.bin", "--tokenizer", root + "/tok512.bin", "--method", "sparsegpt",
                                 "--sparsity", "0.5", "--calib", root + "/calib.txt", "--calib-samples", "4", "--calib-seqlen", "64",
                                 "--seed", "0", "--output", dir.appendingPathComponent("out").path, "--json"], environment: kernel)
        XCTAssertEqual(fresh.status, 0, fresh.stderr)
        XCTAssertNotEqual(fresh.json?["output_sha256"] as? String, expected)

        let resumed = try CLI.run(["prune", "--resume", root + "/run", "--json"], environment: kernel)
        XCTAssertEqual(resumed.status, 0, resumed.stderr)
        if sameKernel { XCTAssertEqual(resumed.json?["output_sha256"] as? String, expected) }
        let events = CLI.events(root + "/run")
        let names = events.compactMap { $0["event"] as? String }
        // The old run.json's checksum held, and both old block checkpoints counted as finished.
        let resume = try XCTUnwrap(events.first { $0["event"] as? String == "resume" })
        XCTAssertEqual(resume["finished_blocks"] as? [Int], [0, 1])
        XCTAssertFalse(names.contains("checkpoint_corrupt") || names.contains("checkpoint_refused"), "\(names)")
        XCTAssertEqual(events.filter { $0["event"] as? String == "block_done" }.compactMap { $0["block"] as? Int }, [0, 1, 2, 3, 4])
        let complete = try XCTUnwrap(events.last)
        XCTAssertEqual(complete["event"] as? String, "complete")
        if sameKernel { XCTAssertEqual(complete["output_sha256"] as? String, expected) }
        XCTAssertEqual(complete["output"] as? String, root + "/out")
        // Every event has its time; the new ones have the keys the old ones had.
        XCTAssertTrue(events.allSatisfy { ($0["time"] as? String)?.hasSuffix("Z") == true })
        let oldBlock = try XCTUnwrap(oldEvents.first { $0["event"] as? String == "block_done" })
        let newBlock = try XCTUnwrap(events.last { $0["event"] as? String == "block_done" })
        XCTAssertEqual(Set(oldBlock.keys), Set(newBlock.keys))
        XCTAssertEqual(Set((oldBlock["report"] as? [String: Any])?.keys ?? [:].keys), Set((newBlock["report"] as? [String: Any])?.keys ?? [:].keys))
        // A plan entry keeps every key it had (newer runs add the planner's reasons: modelled_flops, machines).
        let oldPlanKeys = Set(try XCTUnwrap(oldEvents.first)["plan"].flatMap { ($0 as? [[String: Any]])?.first?.keys } ?? [:].keys)
        let newPlanKeys = Set(resume["plan"].flatMap { ($0 as? [[String: Any]])?.first?.keys } ?? [:].keys)
        XCTAssertTrue(oldPlanKeys.isSubset(of: newPlanKeys), "\(oldPlanKeys) not in \(newPlanKeys)")
        XCTAssertEqual(newPlanKeys.subtracting(oldPlanKeys), ["modelled_flops", "machines"])

        // A completed run says so.
        let again = try CLI.run(["prune", "--resume", root + "/run"])
        XCTAssertEqual(again.status, 0, again.stderr)
        XCTAssertTrue(again.stdout.contains("already complete") && again.stdout.contains(expected), again.stdout)
    }
}
