import Foundation
import XCTest

/// Locates the workplace's shared assets and fixtures beside the repository (../shared).
enum TestAssets {
    static let repositoryRoot: URL = {
        var url = URL(fileURLWithPath: #filePath)
        while url.path != "/" {
            url.deleteLastPathComponent()
            if FileManager.default.fileExists(atPath: url.appendingPathComponent("Package.swift").path) { return url }
        }
        fatalError("Package.swift not found above \(#filePath)")
    }()

    static let shared = repositoryRoot.deletingLastPathComponent().appendingPathComponent("shared")

    static func asset(_ relative: String) -> String { shared.appendingPathComponent("assets/" + relative).path }
    static func fixture(_ relative: String) -> String { shared.appendingPathComponent("fixtures/" + relative).path }

    static var stories260K: String { asset("stories260K/stories260K.bin") }
    static var stories260KTokenizer: String { asset("stories260K/tok512.bin") }
    static var smolLM2: String { asset("smollm2-135m-instruct-q4_1/SmolLM2-135M-Instruct.Q4_1.gguf") }
    static var wikitext: String { asset("wikitext-2-raw/wiki.test.joined.txt") }
    static var wizardOfOz: String { asset("public-domain-text/wizard_of_oz.txt") }

    /// A fresh temporary directory, removed when the test ends.
    static func temporaryDirectory(_ test: XCTestCase) throws -> URL {
        let url = FileManager.default.temporaryDirectory.appendingPathComponent("topiary-test-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
        test.addTeardownBlock { try? FileManager.default.removeItem(at: url) }
        return url
    }
}
