import Foundation
import XCTest

/// `--device` on prune, eval, generate and worker, and `topiary inspect --devices` (issue 15).
final class DeviceCLITests: XCTestCase {
    let stories = CLI.asset("stories260K/stories260K.bin")
    let storiesTokenizer = CLI.asset("stories260K/tok512.bin")
    let oz = CLI.asset("public-domain-text/wizard_of_oz.txt")

    func pruneArgs(output: String, _ extra: [String] = []) -> [String] {
        ["prune", "--model", stories, "--tokenizer", storiesTokenizer, "--calib", oz, "--calib-samples", "4",
         "--calib-seqlen", "64", "--method", "sparsegpt", "--sparsity", "0.5", "--output", output, "--json"] + extra
    }

    func testDeviceCPUGivesTheDefaultBytes() throws {
        let dir = try CLI.temporaryDirectory(self)
        let plain = try CLI.run(pruneArgs(output: dir.appendingPathComponent("plain").path))
        let cpu = try CLI.run(pruneArgs(output: dir.appendingPathComponent("cpu").path, ["--device", "cpu"]))
        XCTAssertEqual(plain.status, 0, plain.stderr)
        XCTAssertEqual(cpu.status, 0, cpu.stderr)
        XCTAssertEqual(cpu.json?["output_sha256"] as? String, try XCTUnwrap(plain.json?["output_sha256"] as? String))
        // Local workers are started with the same --device.
        let workers = try CLI.run(pruneArgs(output: dir.appendingPathComponent("workers").path, ["--device", "cpu", "--workers", "2"]))
        XCTAssertEqual(workers.status, 0, workers.stderr)
        XCTAssertEqual(workers.json?["output_sha256"] as? String, try XCTUnwrap(plain.json?["output_sha256"] as? String))
    }

    func testCUDAIsOneLineNamingWhatIsMissing() throws {
        if let driver = dlopen("libcuda.so.1", RTLD_LAZY) {
            dlclose(driver)
            throw XCTSkip("a CUDA driver is installed here: scripts/cuda-check tests the device")
        }
        let dir = try CLI.temporaryDirectory(self)
        let commands: [[String]] = [
            pruneArgs(output: dir.appendingPathComponent("cuda").path, ["--device", "cuda"]),
            ["eval", "--model", stories, "--tokenizer", storiesTokenizer, "--text", oz, "--device", "cuda:1", "--json"],
            ["generate", "--model", stories, "--tokenizer", storiesTokenizer, "--device", "cuda:0"],
            ["worker", "--listen", "127.0.0.1:0", "--device", "cuda"],
        ]
        for args in commands {
            let r = try CLI.run(args)
            XCTAssertEqual(r.status, 1, "\(args[0]): \(r.stderr)")
            XCTAssertEqual(r.stderrLines.count, 1, "\(args[0]): \(r.stderr)")
            XCTAssertTrue(r.stderr.contains("CUDA driver library not found"), r.stderr)
            XCTAssertTrue(r.stderr.contains("libcuda.so.1"), r.stderr)
        }
        XCTAssertFalse(FileManager.default.fileExists(atPath: dir.appendingPathComponent("cuda").path))
    }

    func testMalformedDevicesAreUsageErrors() throws {
        for device in ["gpu", "cuda:", "cuda:x", "cuda:64", "CPU"] {
            let r = try CLI.run(["eval", "--model", stories, "--tokenizer", storiesTokenizer, "--text", oz, "--device", device])
            XCTAssertEqual(r.status, 2, "\(device): \(r.stderr)")
            XCTAssertTrue(r.stderr.hasPrefix("topiary eval: --device"), r.stderr)
        }
    }

    func testInspectDevicesListsTheCPUAndTheCUDADriver() throws {
        if let driver = dlopen("libcuda.so.1", RTLD_LAZY) {
            dlclose(driver)
            throw XCTSkip("a CUDA driver is installed here: scripts/cuda-check tests the device")
        }
        let r = try CLI.run(["inspect", "--devices", "--json"])
        XCTAssertEqual(r.status, 0, r.stderr)
        let devices = try XCTUnwrap(r.json?["devices"] as? [[String: Any]])
        XCTAssertEqual(devices.map { $0["device"] as? String }, ["cpu", "cuda"])
        XCTAssertEqual(devices.map { $0["available"] as? Bool }, [true, false])
        let cpu = try XCTUnwrap(devices[0]["detail"] as? String)
        XCTAssertTrue(cpu.contains("OpenBLAS") && cpu.contains("cores"), cpu)
        let cuda = try XCTUnwrap(devices[1]["detail"] as? String)
        XCTAssertTrue(cuda.contains("libcuda.so.1"), cuda)
        XCTAssertTrue(r.stdout.hasPrefix("cpu    available"), r.stdout)
    }
}
