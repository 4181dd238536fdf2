import Foundation
import XCTest

/// `topiary eval --profile`: where the evaluation's time went, against the sgemm rate.
final class EvalProfileCLITests: XCTestCase {
    let stories = CLI.asset("stories260K/stories260K.bin")
    let storiesTokenizer = CLI.asset("stories260K/tok512.bin")
    let oz = CLI.asset("public-domain-text/wizard_of_oz.txt")

    func evalArgs(_ extra: [String]) -> [String] {
        ["eval", "--model", stories, "--tokenizer", storiesTokenizer, "--text", oz, "--seqlen", "256", "--windows", "4", "--json"] + extra
    }

    /// `--memory-budget` bounds the windows' hidden states held at once: a budget below one
    /// window evaluates them one at a time, with the same losses; a bad size names the option.
    func testMemoryBudgetGroupsTheWindowsWithTheSameResult() throws {
        let plain = try CLI.run(evalArgs([]))
        let grouped = try CLI.run(evalArgs(["--memory-budget", "1"]))
        XCTAssertEqual(plain.status, 0, plain.stderr)
        XCTAssertEqual(grouped.status, 0, grouped.stderr)
        XCTAssertEqual(try XCTUnwrap(plain.json)["window_losses"] as? [Double], try XCTUnwrap(grouped.json)["window_losses"] as? [Double])
        let bad = try CLI.run(evalArgs(["--memory-budget", "lots"]))
        XCTAssertEqual(bad.status, 2, bad.stderr)
        XCTAssertTrue(bad.stderr.contains("topiary eval: --memory-budget expects a size such as 512M or 8G, got 'lots'"), bad.stderr)
        let tasks = try CLI.run(["eval", "--model", stories, "--tokenizer", storiesTokenizer, "--tasks", oz, "--memory-budget", "1G"])
        XCTAssertEqual(tasks.status, 2, tasks.stderr)
        XCTAssertTrue(tasks.stderr.contains("--memory-budget is for perplexity"), tasks.stderr)
    }

    func testProfileCountsTheHeadAndLeavesTheResultAlone() throws {
        let plain = try CLI.run(evalArgs([]))
        let profiled = try CLI.run(evalArgs(["--profile"]))
        XCTAssertEqual(plain.status, 0, plain.stderr)
        XCTAssertEqual(profiled.status, 0, profiled.stderr)
        let (a, b) = (try XCTUnwrap(plain.json), try XCTUnwrap(profiled.json))
        XCTAssertNil(a["profile"])
        XCTAssertEqual(a["window_losses"] as? [Double], b["window_losses"] as? [Double])

        let profile = try XCTUnwrap(b["profile"] as? [String: Any])
        XCTAssertGreaterThan(profile["sgemm_flops_per_second"] as? Double ?? 0, 0)
        let phases = try XCTUnwrap(profile["phases"] as? [String: [String: Any]])
        XCTAssertEqual(Set(phases.keys), ["open_model", "tokenize", "load", "embed", "forward", "head", "other", "total"])
        func flops(_ name: String) -> Double { phases[name]?["flops"] as? Double ?? -1 }
        func seconds(_ name: String) -> Double { phases[name]?["seconds"] as? Double ?? -1 }
        // stories260K: 64 wide, 512 tokens of vocabulary; 4 windows of 256 tokens predict 255 each.
        XCTAssertEqual(flops("head"), 2 * 4 * 255 * 64 * 512)
        XCTAssertGreaterThan(flops("forward"), 0)
        XCTAssertEqual(flops("load"), 0)
        XCTAssertEqual(flops("total"), flops("forward") + flops("head"))
        XCTAssertNotNil(phases["forward"]?["ratio"] as? Double)
        XCTAssertTrue(phases["load"]?["ratio"] is NSNull)
        let parts = ["open_model", "tokenize", "load", "embed", "forward", "head", "other"].map(seconds)
        XCTAssertTrue(parts.allSatisfy { $0 >= 0 }, "\(parts)")
        XCTAssertEqual(parts.reduce(0, +), seconds("total"), accuracy: 1e-6)
        for word in ["eval profile", "sgemm rate", "forward", "head", "total"] {
            XCTAssertTrue(profiled.stderr.contains(word), "'\(word)' not in: \(profiled.stderr)")
        }
    }

    func testProfileKeysDoNotDependOnTheInput() throws {
        let dir = try CLI.temporaryDirectory(self)
        let ids = dir.appendingPathComponent("ids.json")
        try Data("[\((0..<300).map { String(1 + $0 % 500) }.joined(separator: ","))]".utf8).write(to: ids)
        let r = try CLI.run(["eval", "--model", stories, "--tokens", ids.path, "--seqlen", "128", "--json", "--profile"])
        XCTAssertEqual(r.status, 0, r.stderr)
        let phases = try XCTUnwrap((r.json?["profile"] as? [String: Any])?["phases"] as? [String: Any])
        XCTAssertEqual(Set(phases.keys), ["open_model", "tokenize", "load", "embed", "forward", "head", "other", "total"])
        XCTAssertTrue(r.stderr.contains("read tokens"), r.stderr)
    }

    func testProfileIsForPerplexityOnly() throws {
        let tasks = CLI.repositoryRoot.appendingPathComponent("Tests/Fixtures/tasks/stories-mc.jsonl").path
        let r = try CLI.run(["eval", "--model", stories, "--tokenizer", storiesTokenizer, "--tasks", tasks, "--profile"])
        XCTAssertEqual(r.status, 2, r.stderr)
        XCTAssertTrue(r.stderr.contains("--profile"), r.stderr)
    }
}
