import Foundation
import XCTest
@testable import TopiaryModel
import TopiaryTensor

final class AtomicFileTests: XCTestCase {
    private var dir = ""

    override func setUpWithError() throws {
        dir = FileManager.default.temporaryDirectory.appendingPathComponent("atomicfile-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    }

    override func tearDownWithError() throws {
        try? FileManager.default.removeItem(atPath: dir)
    }

    private func listing() throws -> [String] {
        try FileManager.default.contentsOfDirectory(atPath: dir).sorted()
    }

    func testWritesAndReplaces() throws {
        let path = dir + "/out.bin"
        try AtomicFile.write(Data("first version".utf8), to: path)
        XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: path)), Data("first version".utf8))
        try AtomicFile.write(Data("second".utf8), to: path)
        XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: path)), Data("second".utf8))
        XCTAssertEqual(try listing(), ["out.bin"], "no temporary file may remain")
    }

    func testReplacingKeepsPermissions() throws {
        let path = dir + "/perm.txt"
        try AtomicFile.write(Data("a".utf8), to: path)
        XCTAssertEqual(chmod(path, 0o600), 0)
        try AtomicFile.write(Data("b".utf8), to: path)
        let attrs = try FileManager.default.attributesOfItem(atPath: path)
        XCTAssertEqual((attrs[.posixPermissions] as? NSNumber)?.intValue, 0o600)
    }

    func testStreamingLargeAndSmallWrites() throws {
        let path = dir + "/stream.bin"
        let floats = (0..<300_000).map { Float($0) * 0.5 - 7 }  // 1.2 MB, larger than the writer's buffer
        try AtomicFile.write(to: path) { w in
            try w.write([1, 2, 3])
            try floats.withUnsafeBufferPointer { try w.write(floats: $0) }
            try w.write("tail")
            try w.writeConverted(count: 5, elementSize: 2) { range, p in
                for (k, i) in range.enumerated() {
                    p.storeBytes(of: UInt16(i * 257).littleEndian, toByteOffset: 2 * k, as: UInt16.self)
                }
            }
            XCTAssertEqual(w.bytesWritten, 3 + 1_200_000 + 4 + 10)
        }
        let data = try Data(contentsOf: URL(fileURLWithPath: path))
        XCTAssertEqual(data.count, 3 + 1_200_000 + 4 + 10)
        XCTAssertEqual(Array(data.prefix(3)), [1, 2, 3])
        data.withUnsafeBytes { raw in
            for i in [0, 1, 123_456, 299_999] {
                let bits = UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: 3 + 4 * i, as: UInt32.self))
                XCTAssertEqual(Float(bitPattern: bits), floats[i])
            }
            XCTAssertEqual(String(decoding: raw[(3 + 1_200_000)..<(3 + 1_200_004)], as: UTF8.self), "tail")
            for i in 0..<5 {
                XCTAssertEqual(UInt16(littleEndian: raw.loadUnaligned(fromByteOffset: 1_200_007 + 2 * i, as: UInt16.self)), UInt16(i * 257))
            }
        }
        XCTAssertEqual(try listing(), ["stream.bin"])
    }

    /// Streamed to disk in chunks (handed to the disk, waited for and dropped from the page
    /// cache as it goes) or not, the file has the same bytes, and the digest fed while writing
    /// is the digest of the file read back; small and large pieces, chunks that end inside a piece.
    func testStreamingToDiskAndDigestKeepTheBytes() throws {
        let floats = (0..<700_000).map { Float($0 % 1000) * 0.25 - 3 }   // 2.8 MB, past the 1 MiB buffer
        func write(_ path: String, chunk: Int?, digest: SHA256Stream?) throws {
            try AtomicFile.write(to: path, streamChunk: chunk, digest: digest) { w in
                try w.write([9, 8, 7, 6, 5])
                try floats.withUnsafeBufferPointer { try w.write(floats: $0) }
                for i in 0..<3000 { try w.write("piece \(i);") }
                try w.writeConverted(count: 600_000, elementSize: 2) { range, p in
                    HalfPrecision.floatsToBF16(floats.withUnsafeBufferPointer { $0.baseAddress! } + range.lowerBound, count: range.count, into: p)
                }
            }
        }
        try write(dir + "/plain.bin", chunk: nil, digest: nil)
        let plain = try Data(contentsOf: URL(fileURLWithPath: dir + "/plain.bin"))
        XCTAssertGreaterThan(plain.count, 4_000_000)
        for chunk in [4096, 65_537, 1 << 20, FileHandleWriter.streamChunk] {
            let path = dir + "/streamed-\(chunk).bin"
            let digest = SHA256Stream()
            try write(path, chunk: chunk, digest: digest)
            XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: path)), plain, "chunk \(chunk)")
            XCTAssertEqual(digest.finish(), try SHA256Digest.files([path]), "chunk \(chunk)")
        }
        // The public entry point streams with the default chunk.
        let digest = SHA256Stream()
        try AtomicFile.write(to: dir + "/public.bin", streaming: true, digest: digest) { w in try w.write(plain) }
        XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: dir + "/public.bin")), plain)
        XCTAssertEqual(digest.finish(), SHA256Digest.hex(plain))
    }

    func testMissingDirectoryNamesThePath() throws {
        let path = dir + "/no/such/dir/file.bin"
        XCTAssertThrowsError(try AtomicFile.write(Data([1]), to: path)) { error in
            guard case CheckpointError.io(let p, let detail) = error else { return XCTFail("unexpected \(error)") }
            XCTAssertEqual(p, path)
            XCTAssertTrue(detail.contains("No such file or directory"), detail)
            XCTAssertTrue(String(describing: error).contains(path))
        }
        XCTAssertEqual(try listing(), [])
    }

    func testFailingBodyLeavesTargetAndNoTemporaryFile() throws {
        struct Boom: Error {}
        let path = dir + "/keep.txt"
        try AtomicFile.write(Data("original".utf8), to: path)
        XCTAssertThrowsError(try AtomicFile.write(to: path) { w in
            try w.write([UInt8](repeating: 9, count: 3_000_000))
            throw Boom()
        }) { error in XCTAssertTrue(error is Boom, "the body's error is passed on unchanged") }
        XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: path)), Data("original".utf8))
        XCTAssertEqual(try listing(), ["keep.txt"])
    }

    func testUnwritableDirectoryReportsPermission() throws {
        if getuid() == 0 { throw XCTSkip("permissions are not enforced for root") }
        let locked = dir + "/locked"
        try FileManager.default.createDirectory(atPath: locked, withIntermediateDirectories: false)
        XCTAssertEqual(chmod(locked, 0o555), 0)
        defer { _ = chmod(locked, 0o755) }
        XCTAssertThrowsError(try AtomicFile.write(Data([1]), to: locked + "/f")) { error in
            guard case CheckpointError.io(let p, let detail) = error else { return XCTFail("unexpected \(error)") }
            XCTAssertEqual(p, locked + "/f")
            XCTAssertTrue(detail.contains("Permission denied"), detail)
        }
    }

    func testFileSizeLimitFailureIsReportedAndCleanedUp() throws {
        #if !os(Linux)
        throw XCTSkip("uses Linux's RLIMIT_FSIZE constants")
        #else
        // RLIMIT_FSIZE makes write() stop short and then fail with EFBIG: this exercises the
        // short-write loop and the error path the way a full disk (ENOSPC) would.
        let path = dir + "/big.bin"
        try AtomicFile.write(Data("previous".utf8), to: path)
        var old = rlimit()
        XCTAssertEqual(getrlimit(Int32(RLIMIT_FSIZE.rawValue), &old), 0)
        var limited = old
        limited.rlim_cur = 1_500_000
        let oldHandler = signal(SIGXFSZ, SIG_IGN)
        XCTAssertEqual(setrlimit(Int32(RLIMIT_FSIZE.rawValue), &limited), 0)
        defer {
            _ = setrlimit(Int32(RLIMIT_FSIZE.rawValue), &old)
            _ = signal(SIGXFSZ, oldHandler)
        }
        let floats = [Float](repeating: 1, count: 1_000_000)
        XCTAssertThrowsError(try AtomicFile.write(to: path) { w in
            try floats.withUnsafeBufferPointer { try w.write(floats: $0) }
        }) { error in
            guard case CheckpointError.io(let p, let detail) = error else { return XCTFail("unexpected \(error)") }
            XCTAssertEqual(p, path)
            XCTAssertTrue(detail.contains("File too large"), detail)
        }
        _ = setrlimit(Int32(RLIMIT_FSIZE.rawValue), &old)
        XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: path)), Data("previous".utf8))
        XCTAssertEqual(try listing(), ["big.bin"])
        #endif
    }

    func testRelativePathInCurrentDirectory() throws {
        let previous = FileManager.default.currentDirectoryPath
        XCTAssertTrue(FileManager.default.changeCurrentDirectoryPath(dir))
        defer { _ = FileManager.default.changeCurrentDirectoryPath(previous) }
        try AtomicFile.write(Data("rel".utf8), to: "relative.txt")
        XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: dir + "/relative.txt")), Data("rel".utf8))
    }
}
