import XCTest
@testable import TopiaryTensor

/// The cache of large mappings behind Matrix storage: what comes back is zeroed when asked, the
/// same mapping is reused for the same size, and what it holds never passes its capacity.
final class MappedBuffersTests: XCTestCase {
    func testReusedBufferIsZeroedWhenAskedAndKeptWithinCapacity() throws {
        let cache = MappedBuffers(capacity: 4 << 20)
        let a = try XCTUnwrap(cache.take(bytes: 1 << 20, zeroed: true))
        XCTAssertEqual(a.bytes, 1 << 20)
        a.pointer.initializeMemory(as: UInt8.self, repeating: 0xAB, count: a.bytes)
        cache.give(a.pointer, bytes: a.bytes)
        XCTAssertEqual(cache.held, 1 << 20)

        // The same size comes back as the same mapping, zero-filled.
        let b = try XCTUnwrap(cache.take(bytes: (1 << 20) - 100, zeroed: true))
        XCTAssertEqual(b.pointer, a.pointer)
        XCTAssertEqual(cache.held, 0)
        let bytes = UnsafeRawBufferPointer(start: b.pointer, count: b.bytes)
        XCTAssertTrue(bytes.allSatisfy { $0 == 0 }, "a reused buffer must be zero-filled when asked")

        // Another size is a new mapping; filling the cache evicts the oldest first.
        let c = try XCTUnwrap(cache.take(bytes: 2 << 20, zeroed: false))
        XCTAssertNotEqual(c.pointer, b.pointer)
        cache.give(b.pointer, bytes: b.bytes)
        cache.give(c.pointer, bytes: c.bytes)
        XCTAssertEqual(cache.held, 3 << 20)
        let d = try XCTUnwrap(cache.take(bytes: 1536 << 10, zeroed: false))
        cache.give(d.pointer, bytes: d.bytes)
        XCTAssertLessThanOrEqual(cache.held, cache.capacity)
        XCTAssertEqual(cache.held, (2 << 20) + (1536 << 10), "the 1 MiB buffer, the oldest, goes first")

        // A buffer larger than the whole capacity is unmapped at once.
        let e = try XCTUnwrap(cache.take(bytes: 5 << 20, zeroed: false))
        cache.give(e.pointer, bytes: e.bytes)
        XCTAssertEqual(cache.held, (2 << 20) + (1536 << 10))
    }

    func testLargeMatricesAreZeroAfterReuse() {
        for _ in 0..<3 {
            var m = Matrix(rows: 512, cols: 1024)
            XCTAssertTrue(m.values.allSatisfy { $0 == 0 })
            m.withUnsafeMutableBufferPointer { $0.update(repeating: 7) }
        }
    }
}
