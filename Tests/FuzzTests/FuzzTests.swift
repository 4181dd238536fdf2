import Foundation
import XCTest
import TopiaryTestSupport

/// A short budget of every fuzzer (scripts/fuzz runs the long one): the built topiary-fuzz runs a
/// few seconds per target, and no case may crash, hang or allocate past its bound.
final class FuzzTests: XCTestCase {
    static let binary: String = {
        var dir = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent()
        for _ in 0..<4 {
            let candidate = dir.appendingPathComponent("topiary-fuzz").path
            if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
            dir.deleteLastPathComponent()
        }
        for config in ["release", "debug"] {
            let candidate = TestPaths.repositoryRoot.appendingPathComponent(".build/\(config)/topiary-fuzz").path
            if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
        }
        fatalError("topiary-fuzz not found; build it first (swift build --product topiary-fuzz)")
    }()

    func run(_ args: [String], timeout: TimeInterval = 240) throws -> (status: Int32, output: String) {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: Self.binary)
        p.arguments = args
        let out = Pipe()
        p.standardOutput = out
        p.standardError = out
        try p.run()
        nonisolated(unsafe) var data = Data()
        let group = DispatchGroup()
        DispatchQueue.global().async(group: group) { data = out.fileHandleForReading.readDataToEndOfFile() }
        let deadline = Date().addingTimeInterval(timeout)
        while p.isRunning && Date() < deadline { usleep(20_000) }
        if p.isRunning {
            p.terminate()
            XCTFail("topiary-fuzz \(args.joined(separator: " ")) did not finish within \(timeout) s")
        }
        p.waitUntilExit()
        group.wait()
        return (p.terminationStatus, String(decoding: data, as: UTF8.self))
    }

    /// Seconds per target: TOPIARY_FUZZ_SECONDS, default 3.
    var seconds: String { ProcessInfo.processInfo.environment["TOPIARY_FUZZ_SECONDS"] ?? "3" }

    func fuzz(_ target: String, file: StaticString = #filePath, line: UInt = #line) throws {
        // A fixed seed: the suite runs the same cases (as many as fit in the budget) every time;
        // scripts/fuzz --seed N explores others. A failure prints the seed that reproduces it.
        let (status, output) = try run([target, "--seed", "1", "--seconds", seconds, "--case-seconds", "20"])
        let failures = output.split(separator: "\n").filter { $0.hasPrefix("FAIL") }
        XCTAssertEqual(status, 0, output, file: file, line: line)
        XCTAssertTrue(output.contains("\(target): "), output, file: file, line: line)
        XCTAssertTrue(failures.isEmpty, output, file: file, line: line)
        // It ran cases at all.
        let ran = output.split(separator: "\n").first { $0.hasPrefix("\(target): ") }.flatMap { $0.split(separator: " ").dropFirst().first }.flatMap { Int($0) } ?? 0
        XCTAssertGreaterThan(ran, 0, output, file: file, line: line)
    }

    func testSeedsLoad() throws {
        let (status, output) = try run(["all", "--check-seeds"])
        XCTAssertEqual(status, 0, output)
    }

    func testGGUF() throws { try fuzz("gguf") }
    func testSafeTensorsAndConfig() throws { try fuzz("safetensors") }
    func testLlama2CCheckpoint() throws { try fuzz("llama2c") }
    func testLlama2CTokenizer() throws { try fuzz("tokenizer-bin") }
    func testTokenizerJSON() throws { try fuzz("tokenizer-json") }
    func testFrameDecoder() throws { try fuzz("frame") }
    func testMessageDecoder() throws { try fuzz("message") }
    func testAssignJob() throws { try fuzz("job") }
    func testCalibrationShard() throws { try fuzz("calib-shard") }
    func testTaskFile() throws { try fuzz("tasks") }

    /// The same seed gives the same cases: two runs of a fixed number of cases agree.
    func testRunsAreReproducible() throws {
        let a = try run(["gguf", "--seed", "7", "--cases", "40"]).output
        let b = try run(["gguf", "--seed", "7", "--cases", "40"]).output
        func summary(_ s: String) -> [String] {
            s.split(separator: "\n").map { String($0) }.filter { $0.hasPrefix("  refusals") || $0.hasPrefix("FAIL") }
        }
        XCTAssertEqual(summary(a), summary(b))
        XCTAssertTrue(a.contains("gguf: 40 cases"), a)
    }
}
