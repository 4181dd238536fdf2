import Foundation
import XCTest
import TopiaryTestSupport

/// `scripts/bench/quality` end to end on stories260K with a tiny protocol: the cells it runs, the
/// refusals it records, magnitude's single seed, the table it writes (markdown, JSON, SVG) from
/// each cell's report.json, and a second run that skips every finished cell.
final class QualityScriptTests: XCTestCase {
    func runScript(_ args: [String]) throws -> (status: Int32, stdout: String, stderr: String) {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        p.arguments = ["python3", CLI.repositoryRoot.appendingPathComponent("scripts/bench/quality").path] + args
        p.currentDirectoryURL = CLI.repositoryRoot
        let out = Pipe(), err = Pipe()
        p.standardOutput = out
        p.standardError = err
        try p.run()
        let o = out.fileHandleForReading.readDataToEndOfFile(), e = err.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        return (p.terminationStatus, String(decoding: o, as: UTF8.self), String(decoding: e, as: UTF8.self))
    }

    func testATinyGridRunsRecordsRefusalsAndResumes() throws {
        let dir = try CLI.temporaryDirectory(self)
        let work = dir.appendingPathComponent("work").path, out = dir.appendingPathComponent("out").path
        let args = ["--model", CLI.asset("stories260K/stories260K.bin"), "--calib", CLI.asset("public-domain-text/wizard_of_oz.txt"),
                    "--eval-text", CLI.asset("public-domain-text/tinyshakespeare.txt"),
                    "--calib-samples", "2", "--calib-seqlen", "64", "--eval-windows", "1", "--eval-seqlen", "128",
                    "--methods", "magnitude,wanda", "--allocations", "uniform,owl", "--points", "0.5,2:4", "--seeds", "0,1",
                    "--topiary", CLI.binary, "--work", work, "--out", out, "--jobs", "2",
                    "--", "--tokenizer", CLI.asset("stories260K/tok512.bin"), "--threads", "1"]
        let first = try runScript(args)
        XCTAssertEqual(first.status, 0, first.stderr)
        // 2 methods x 2 allocations x 2 points x 2 seeds, less magnitude uniform's second seed at each point.
        XCTAssertTrue(first.stderr.contains("14 cells, 2 at a time"), first.stderr)

        let table = try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: out + "/quality.json"))) as? [String: Any])
        let cells = try XCTUnwrap(table["cells"] as? [[String: Any]])
        func cell(_ m: String, _ a: String, _ p: String) -> [String: Any]? {
            cells.first { $0["method"] as? String == m && $0["allocation"] as? String == a && $0["point"] as? String == p }
        }
        // Each number is the run's own report.json's.
        let wanda = try XCTUnwrap(cell("wanda", "uniform", "0.5"))
        XCTAssertEqual(wanda["status"] as? String, "done")
        XCTAssertEqual(wanda["n"] as? Int, 2)
        let runs = try XCTUnwrap(wanda["runs"] as? [[String: Any]])
        XCTAssertEqual(runs.compactMap { $0["seed"] as? Int }, [0, 1])
        let cellDirs = try FileManager.default.contentsOfDirectory(atPath: work).map { work + "/" + $0 }
        let protocolDir = try XCTUnwrap(cellDirs.first { FileManager.default.fileExists(atPath: $0 + "/protocol.json") })
        for (k, run) in runs.enumerated() {
            let report = try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: protocolDir + "/wanda-uniform-0.5-seed\(k)/report.json"))) as? [String: Any])
            XCTAssertEqual(run["perplexity"] as? Double, report["perplexity"] as? Double)
            XCTAssertEqual(run["output_sha256"] as? String, report["output_sha256"] as? String)
        }
        XCTAssertNotEqual(runs[0]["output_sha256"] as? String, runs[1]["output_sha256"] as? String, "the seeds calibrate differently")
        // Magnitude with uniform allocation runs once; OWL with 2:4 is refused, with the tool's reason.
        XCTAssertEqual(cell("magnitude", "uniform", "0.5")?["n"] as? Int, 1)
        let refused = try XCTUnwrap(cell("wanda", "owl", "2:4"))
        XCTAssertEqual(refused["status"] as? String, "refused")
        XCTAssertTrue("\(refused["refused"] ?? "")".contains("nothing to allocate"), "\(refused)")
        XCTAssertEqual(cell("wanda", "owl", "0.5")?["status"] as? String, "done")
        let markdown = try String(contentsOfFile: out + "/quality.md", encoding: .utf8)
        XCTAssertTrue(markdown.contains("| wanda | uniform |"), markdown)
        XCTAssertTrue(markdown.contains("n/a (refused"), markdown)
        let svg = try String(contentsOfFile: out + "/quality.svg", encoding: .utf8)
        XCTAssertTrue(svg.hasPrefix("<svg") && svg.contains("</svg>"), String(svg.prefix(200)))

        // Again: every cell is done, none runs.
        let second = try runScript(args)
        XCTAssertEqual(second.status, 0, second.stderr)
        XCTAssertFalse(second.stderr.contains(": perplexity "), second.stderr)
        XCTAssertTrue(second.stderr.contains("done before, skipped"), second.stderr)
    }
}
