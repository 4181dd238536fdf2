import Foundation
import XCTest

/// Test files: fixtures and assets live in `shared/`, beside the repository root.
enum Assets {
    /// The repository root: this file is Tests/TopiaryTokenizersTests/Assets.swift.
    static let repoRoot = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent()
    static let shared = repoRoot.deletingLastPathComponent().appendingPathComponent("shared")

    static func path(_ relative: String) throws -> String {
        let p = shared.appendingPathComponent(relative).path
        guard FileManager.default.fileExists(atPath: p) else { throw XCTSkip("missing test asset \(p)") }
        return p
    }
}

extension XCTestCase {
    /// A fresh file in its own temporary folder holding `data`; the folder goes when the test ends.
    func temporaryFile(_ name: String, _ data: Data) throws -> String {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("topiary-tok-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        addTeardownBlock { try? FileManager.default.removeItem(at: dir) }
        let url = dir.appendingPathComponent(name)
        try data.write(to: url)
        return url.path
    }
}
