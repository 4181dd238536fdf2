import Foundation
import XCTest
import TopiaryTensor

/// Where tests find the workplace's shared assets and fixtures: `../shared` beside the
/// repository root (CI clones the repository with shared/ beside it, as developers have it).
public enum TestPaths {
    public static let repositoryRoot: URL = {
        var url = URL(fileURLWithPath: #filePath)
        while url.path != "/" {
            url.deleteLastPathComponent()
            if FileManager.default.fileExists(atPath: url.appendingPathComponent("Package.swift").path) { return url }
        }
        fatalError("Package.swift not found above \(#filePath)")
    }()

    public static let shared = repositoryRoot.deletingLastPathComponent().appendingPathComponent("shared")

    public static func asset(_ relative: String) -> String { shared.appendingPathComponent("assets/" + relative).path }
    public static func fixture(_ relative: String) -> String { shared.appendingPathComponent("fixtures/" + relative).path }
}

/// A test asset that should be in ../shared is not: the test fails (it is never skipped, so a
/// missing asset cannot pass unnoticed in CI).
public struct MissingAsset: Error, CustomStringConvertible {
    public let path: String
    public init(_ path: String) { self.path = path }
    public var description: String { "missing test asset \(path) (expected in ../shared beside the repository)" }
}

extension XCTestCase {
    /// A fresh temporary directory, removed when the test ends.
    public func makeTemporaryDirectory(_ prefix: String = "topiary-test") throws -> URL {
        let url = FileManager.default.temporaryDirectory.appendingPathComponent("\(prefix)-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
        addTeardownBlock { try? FileManager.default.removeItem(at: url) }
        return url
    }
}

/// SplitMix64: a small deterministic generator for test inputs (the one self-calibration uses).
public typealias SplitMix = SplitMix64

extension SplitMix64 {
    /// Uniform in [-1, 1).
    public mutating func uniform() -> Float { Float(next() >> 40) / Float(1 << 24) * 2 - 1 }
}
