import Foundation
import XCTest
import TopiaryTestSupport

/// Test files: fixtures and assets live in `shared/`, beside the repository root.
enum Assets {
    static var shared: URL { TestPaths.shared }

    static func path(_ relative: String) throws -> String {
        let p = shared.appendingPathComponent(relative).path
        guard FileManager.default.fileExists(atPath: p) else { throw MissingAsset(p) }
        return p
    }
}

extension XCTestCase {
    /// A fresh file in its own temporary folder holding `data`; the folder goes when the test ends.
    func temporaryFile(_ name: String, _ data: Data) throws -> String {
        let dir = try makeTemporaryDirectory("topiary-tok")
        let url = dir.appendingPathComponent(name)
        try data.write(to: url)
        return url.path
    }
}
