import Foundation
import XCTest

/// Hostile and careless model files through the command line: one line on stderr naming the file
/// and what was wrong, exit status 1, and with --json a last stdout line {"command", "error"}.
final class HostileFilesCLITests: XCTestCase {
    func expectError(_ args: [String], exitCode: Int32 = 1, mentions: [String], file: StaticString = #filePath, line: UInt = #line) throws {
        let r = try CLI.run(args, timeout: 120)
        XCTAssertEqual(r.status, exitCode, "stderr: \(r.stderr)", file: file, line: line)
        XCTAssertEqual(r.stderrLines.count, 1, "expected one line, got: \(r.stderr)", file: file, line: line)
        for m in mentions { XCTAssertTrue(r.stderr.contains(m), "'\(m)' not in: \(r.stderr)", file: file, line: line) }
        if args.contains("--json") {
            let json = r.json
            XCTAssertNotNil(json, "last stdout line is not a JSON object: \(r.stdout)", file: file, line: line)
            XCTAssertEqual(json?["command"] as? String, args.first, file: file, line: line)
            let error = json?["error"] as? String ?? ""
            for m in mentions { XCTAssertTrue(error.contains(m), "'\(m)' not in the JSON error: \(error)", file: file, line: line) }
        }
    }

    func write(_ b: GGUFBuilder, _ name: String = "model.gguf") throws -> String {
        let path = try CLI.temporaryDirectory(self).appendingPathComponent(name).path
        try Data(b.bytes()).write(to: URL(fileURLWithPath: path))
        return path
    }

    func tokens(_ n: Int) throws -> String {
        let path = try CLI.temporaryDirectory(self).appendingPathComponent("tokens.txt").path
        try (0..<n).map { String($0 % 64) }.joined(separator: " ").write(toFile: path, atomically: true, encoding: .utf8)
        return path
    }

    func testNaNLossFailsEvalNamingTheWindowAndBlock() throws {
        var b = GGUFBuilder.tinyLlama()
        let i = b.tensors.firstIndex { $0.name == "blk.0.ffn_down.weight" }!
        b.tensors[i].data = Array(repeating: [0x00, 0x00, 0xC0, 0x7F], count: b.tensors[i].data.count / 4).flatMap { $0 }  // NaN
        let path = try write(b)
        let toks = try tokens(32)
        try expectError(["eval", "--model", path, "--tokens", toks, "--seqlen", "16"],
                        mentions: [path, "window 1 of 2 (tokens 0..<16)", "non-finite loss", "block 0"])
        try expectError(["eval", "--model", path, "--tokens", toks, "--seqlen", "16", "--json"],
                        mentions: [path, "window 1 of 2", "block 0"])
    }

    func testJSONErrorObjectOnEveryFailure() throws {
        // A usage error (exit 2) and a missing file (exit 1) both end stdout with the object.
        try expectError(["eval", "--json"], exitCode: 2, mentions: ["missing --text"])
        try expectError(["eval", "--model", "/nonexistent/m.gguf", "--tokens", "/dev/null", "--json"], mentions: ["/nonexistent/m.gguf"])
        try expectError(["generate", "--model", "/nonexistent/m.gguf", "--json"], mentions: ["/nonexistent/m.gguf"])
        // A good run still prints its result object, with a finite perplexity.
        let r = try CLI.run(["eval", "--model", try write(GGUFBuilder.tinyLlama()), "--tokens", try tokens(32), "--seqlen", "16", "--json"])
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertEqual(r.json?["command"] as? String, "eval")
        XCTAssertNotNil(r.json?["perplexity"] as? Double, r.stdout)
        XCTAssertNil(r.json?["error"])
    }

    func testEvalOnTokenIDsDoesNotReadTheModelsTokenizer() throws {
        // A GGUF whose tokenizer is one Topiary cannot read: token ids need none, so eval --tokens
        // evaluates it; --text needs it, and the error names the field.
        var b = GGUFBuilder.tinyLlama()
        b.metadata += [("tokenizer.ggml.model", .string("llama")), ("tokenizer.ggml.tokens", .strings((0..<64).map { "t\($0)" }))]
        let path = try write(b)
        let r = try CLI.run(["eval", "--model", path, "--tokens", try tokens(32), "--seqlen", "16", "--json"])
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertNotNil(r.json?["perplexity"] as? Double, r.stdout)
        let text = try CLI.temporaryDirectory(self).appendingPathComponent("text.txt")
        try "Once upon a time".write(to: text, atomically: true, encoding: .utf8)
        try expectError(["eval", "--model", path, "--text", text.path, "--seqlen", "16"], mentions: [path, "tokenizer.ggml.model", "'llama'"])
        // A tokenizer given with --tokenizer is still read (and a bad one refused) with --tokens.
        try expectError(["eval", "--model", path, "--tokenizer", "/nonexistent/tokenizer.json", "--tokens", try tokens(32), "--seqlen", "16"],
                        mentions: ["/nonexistent/tokenizer.json"])
    }

    func testHostileHeadersAreRefusedByTheCommands() throws {
        let toks = try tokens(32)
        var b = GGUFBuilder.tinyLlama()
        b.metadata.append(("general.alignment", .u32(3)))
        var path = try write(b)
        try expectError(["eval", "--model", path, "--tokens", toks, "--seqlen", "16"], mentions: [path, "general.alignment", "is 3"])
        b = GGUFBuilder.tinyLlama()
        b.metadata = b.metadata.map { $0.0 == "llama.block_count" ? ($0.0, .u32(2)) : $0 }
        path = try write(b)
        try expectError(["eval", "--model", path, "--tokens", toks, "--seqlen", "16", "--json"], mentions: [path, "llama.block_count", "is 2", "1 block (blk.0)"])
        b = GGUFBuilder.tinyLlama()
        b.metadata = b.metadata.map { $0.0 == "llama.attention.layer_norm_rms_epsilon" ? ($0.0, .f32(-1)) : $0 }
        path = try write(b)
        try expectError(["generate", "--model", path], mentions: [path, "llama.attention.layer_norm_rms_epsilon", "-1.0"])
        b = GGUFBuilder.tinyLlama()
        b.tensors[1].ne = [1 << 32, 1 << 32]
        path = try write(b)
        try expectError(["convert", "--model", path, "--output", path + ".out"], mentions: [path, "blk.0.attn_norm.weight", "shape"])
    }

    func testHugeLayerCountInConfigJSONDoesNotAbortGenerate() throws {
        let dir = try CLI.temporaryDirectory(self).appendingPathComponent("model")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        let fixture = CLI.fixture("tiny-llama")
        try FileManager.default.copyItem(atPath: fixture + "/model.safetensors", toPath: dir.path + "/model.safetensors")
        let config = try String(contentsOfFile: fixture + "/config.json", encoding: .utf8)
            .replacingOccurrences(of: #""num_hidden_layers": 2"#, with: #""num_hidden_layers": 2147483647"#)
        try config.write(toFile: dir.path + "/config.json", atomically: true, encoding: .utf8)
        try expectError(["generate", "--model", dir.path, "--tokenizer", CLI.fixture("tokenizer-sentencepiece/tokenizer.json")],
                        mentions: [dir.path + "/config.json", "num_hidden_layers", "2147483647"])
    }
}
