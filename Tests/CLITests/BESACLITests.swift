import Foundation
import XCTest
import TopiaryTestSupport

final class BESACLITests: XCTestCase {
    var base: [String] {
        ["prune", "--model", CLI.asset("stories260K/stories260K.bin"), "--tokenizer", CLI.asset("stories260K/tok512.bin"),
         "--calib", CLI.asset("public-domain-text/wizard_of_oz.txt"), "--calib-samples", "4", "--calib-seqlen", "64"]
    }

    /// stories260K end to end: the target sparsity, the learned allocation in report.json, and the
    /// heatmap beside it.
    func testPruneWritesAllocationAndHeatmap() throws {
        let out = try CLI.temporaryDirectory(self).appendingPathComponent("besa").path
        let r = try CLI.run(base + ["--method", "besa", "--sparsity", "0.7", "--besa-epochs", "2", "--besa-reconstruct",
                                    "--targets", "dense", "--output", out, "--json"])
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertEqual(r.json?["sparsity"] as? Double ?? 0, 0.7, accuracy: 0.005)
        let settings = try XCTUnwrap(r.json?["besa"] as? [String: Any])
        XCTAssertEqual(settings["epochs"] as? Int, 2)
        XCTAssertEqual(settings["reconstruct"] as? Bool, true)
        XCTAssertEqual(settings["targets"] as? String, "dense")
        let report = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: out + "/report.json"))) as! [String: Any]
        let blocks = report["blocks"] as! [[String: Any]]
        XCTAssertEqual(blocks.count, 5)
        for block in blocks {
            let besa = try XCTUnwrap(block["besa"] as? [String: Any])
            let linears = besa["linears"] as! [[String: Any]]
            XCTAssertEqual(linears.count, 7)
            for l in linears {
                XCTAssertNotNil(l["learned_sparsity"] as? Double)
                XCTAssertNotNil(l["sparsity"] as? Double)
            }
            XCTAssertEqual((besa["epoch_losses"] as! [Double]).count, 2)
        }
        let svg = try String(contentsOfFile: out + "/besa-sparsity.svg", encoding: .utf8)
        XCTAssertTrue(svg.hasPrefix("<svg"))
        XCTAssertTrue(svg.hasSuffix("</svg>\n"))
        XCTAssertEqual(svg.components(separatedBy: "<title>").count - 1, 5 * 7)
        for name in ["q_proj", "down_proj", "block 4"] { XCTAssertTrue(svg.contains(name), name) }
    }

    func testBESAOptionsAreChecked() throws {
        let out = ["--output", try CLI.temporaryDirectory(self).appendingPathComponent("o").path]
        let cases: [([String], String)] = [
            (["--method", "besa", "--sparsity", "0.5", "--besa-lr", "0"], "--besa-lr"),
            (["--method", "besa", "--sparsity", "0.5", "--besa-lr", "fast"], "--besa-lr"),
            (["--method", "besa", "--sparsity", "0.5", "--besa-epochs", "0"], "--besa-epochs"),
            (["--method", "besa", "--sparsity", "0.5", "--besa-penalty", "-1"], "--besa-penalty"),
            (["--method", "besa", "--sparsity", "0.5", "--besa-granularity", "column"], "--besa-granularity"),
            (["--method", "besa", "--sparsity", "0.5", "--besa-lr-schedule", "linear"], "--besa-lr-schedule"),
            (["--method", "wanda", "--sparsity", "0.5", "--besa-lr-schedule", "cosine"], "--method besa"),
            (["--method", "besa", "--pattern", "2:4"], "--sparsity"),
            (["--method", "wanda", "--sparsity", "0.5", "--besa-epochs", "2"], "--method besa"),
            (["--method", "wanda", "--sparsity", "0.5", "--besa-reconstruct"], "--besa-reconstruct"),
            (["--method", "wanda", "--sparsity", "0.5", "--targets", "dense"], "--targets"),
        ]
        for (args, expected) in cases {
            let r = try CLI.run(base + args + out)
            XCTAssertEqual(r.status, 2, "\(args): \(r.stderr)")
            XCTAssertTrue(r.stderr.contains(expected), "\(args): \(r.stderr)")
        }
        let help = try CLI.run(["help", "prune"])
        for option in ["--besa-epochs", "--besa-lr", "--besa-lr-schedule", "--besa-penalty", "--besa-granularity", "--besa-reconstruct"] {
            XCTAssertTrue(help.stdout.contains(option), option)
        }
    }
}
