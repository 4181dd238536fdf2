import Foundation
import XCTest
import TopiaryTestSupport
@testable import TopiaryModel

/// The assets these tests read, in ../shared beside the repository.
enum TestAssets {
    static func asset(_ relative: String) -> String { TestPaths.asset(relative) }
    static func fixture(_ relative: String) -> String { TestPaths.fixture(relative) }

    static var stories260K: String { asset("stories260K/stories260K.bin") }
    static var stories260KTokenizer: String { asset("stories260K/tok512.bin") }
    static var smolLM2: String { asset("smollm2-135m-instruct-q4_1/SmolLM2-135M-Instruct.Q4_1.gguf") }
    static var wikitext: String { asset("wikitext-2-raw/wiki.test.joined.txt") }
    static var wizardOfOz: String { asset("public-domain-text/wizard_of_oz.txt") }

    static func temporaryDirectory(_ test: XCTestCase) throws -> URL { try test.makeTemporaryDirectory() }
}

extension XCTestCase {
    /// Asserts that `body` throws a `CheckpointError` accepted by `check`.
    func assertCheckpointError(_ body: @autoclosure () throws -> Any, file: StaticString = #filePath, line: UInt = #line,
                               _ check: (CheckpointError) -> Bool) {
        do {
            _ = try body()
            XCTFail("expected an error", file: file, line: line)
        } catch let e as CheckpointError {
            XCTAssertTrue(check(e), "unexpected error: \(e)", file: file, line: line)
        } catch {
            XCTFail("unexpected error type: \(error)", file: file, line: line)
        }
    }
}
