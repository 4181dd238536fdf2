import XCTest
@testable import TopiaryTensor

/// The cache of large mappings behind Matrix storage: what comes back is zeroed when asked, the
/// same mapping is reused for the same size, and what it holds never passes its bound (the
/// high-water mark of the bytes in use and a sixteenth of it, or a fixed capacity).
final class MappedBuffersTests: XCTestCase {
    func testReusedBufferIsZeroedWhenAsked() throws {
        let cache = MappedBuffers()
        let a = try XCTUnwrap(cache.take(bytes: 1 << 20, zeroed: true))
        XCTAssertEqual(a.bytes, 1 << 20)
        a.pointer.initializeMemory(as: UInt8.self, repeating: 0xAB, count: a.bytes)
        cache.give(a.pointer, bytes: a.bytes)
        XCTAssertEqual(cache.held, 1 << 20)
        XCTAssertEqual(cache.live, 0)

        // The same size (in pages) comes back as the same mapping, zero-filled.
        let b = try XCTUnwrap(cache.take(bytes: (1 << 20) - 100, zeroed: true))
        XCTAssertEqual(b.pointer, a.pointer)
        XCTAssertEqual(cache.held, 0)
        let bytes = UnsafeRawBufferPointer(start: b.pointer, count: b.bytes)
        XCTAssertTrue(bytes.allSatisfy { $0 == 0 }, "a reused buffer must be zero-filled when asked")
        cache.give(b.pointer, bytes: b.bytes)
    }

    /// What is in use and held together never passes the most that was in use at once by more
    /// than a sixteenth: a new size sends the oldest held mappings back first, and a repeated
    /// pattern of sizes (a block's passes, block after block) is served from what is held.
    func testHeldAndLiveStayWithinTheHighWaterMark() throws {
        let cache = MappedBuffers()
        let mib = 1 << 20
        func check(_ line: UInt = #line) {
            XCTAssertLessThanOrEqual(cache.live + cache.held, cache.peak + cache.peak / 16, "live \(cache.live) + held \(cache.held)", line: line)
            XCTAssertEqual(cache.bound, cache.peak + cache.peak / 16, line: line)
        }
        let a = try XCTUnwrap(cache.take(bytes: mib, zeroed: false))
        let b = try XCTUnwrap(cache.take(bytes: 2 * mib, zeroed: false))
        XCTAssertEqual(cache.peak, 3 * mib)
        cache.give(a.pointer, bytes: a.bytes)
        cache.give(b.pointer, bytes: b.bytes)
        XCTAssertEqual(cache.held, 3 * mib, "everything in use at the peak is held")
        check()

        // A new size with 3 MiB held and a 3 MiB peak: the oldest (a, then b) go back first.
        let c = try XCTUnwrap(cache.take(bytes: mib + mib / 2, zeroed: false))
        XCTAssertEqual(cache.held, 0, "1.5 MiB in use leaves room for 1.5 MiB: a (oldest) and then b go")
        check()
        cache.give(c.pointer, bytes: c.bytes)

        // A pattern of sizes repeated: after the first round nothing new is mapped.
        var mapped = Set<UInt>()
        for round in 0..<4 {
            var inUse: [(pointer: UnsafeMutableRawPointer, bytes: Int)] = []
            for size in [4 * mib, 3 * mib, 4 * mib, 1 * mib] {
                let buffer = try XCTUnwrap(cache.take(bytes: size, zeroed: round % 2 == 0))
                if round > 0 { XCTAssertTrue(mapped.contains(UInt(bitPattern: buffer.pointer)), "round \(round): \(size) bytes newly mapped") }
                mapped.insert(UInt(bitPattern: buffer.pointer))
                inUse.append(buffer)
                check()
            }
            for buffer in inUse.reversed() { cache.give(buffer.pointer, bytes: buffer.bytes) }
            check()
        }
        XCTAssertEqual(cache.peak, 12 * mib)
    }

    /// Two phases whose buffers differ (a block's attention, then its feed-forward) both stay
    /// held once the first phase's buffers fit in the margin above the high-water mark: from the
    /// third window on, nothing is mapped again. With no margin, the attention's second buffer
    /// sent a feed-forward buffer back every window, and the feed-forward then sent the attention's.
    func testTheMarginKeepsAlternatingPhasesMapped() throws {
        let cache = MappedBuffers()
        let kib = 1 << 10
        // In use throughout (a block's weights and activations): with the feed-forward's two
        // buffers, a 14 MiB high-water mark, whose sixteenth (896 KiB) holds the attention's two.
        let common = try XCTUnwrap(cache.take(bytes: 8192 * kib, zeroed: false))
        var mappings = 0
        for window in 0..<5 {
            let attention = try (0..<2).map { _ in try XCTUnwrap(cache.take(bytes: 384 * kib, zeroed: false)) }
            for b in attention { cache.give(b.pointer, bytes: b.bytes) }
            let feedForward = try (0..<2).map { _ in try XCTUnwrap(cache.take(bytes: 3072 * kib, zeroed: false)) }
            for b in feedForward { cache.give(b.pointer, bytes: b.bytes) }
            XCTAssertEqual(cache.peak, 14336 * kib)
            XCTAssertLessThanOrEqual(cache.live + cache.held, cache.bound)
            // The first window's attention buffers go back while the mark is still rising.
            if window >= 2 { XCTAssertEqual(cache.mappings, mappings, "window \(window): a buffer was mapped again") }
            mappings = cache.mappings
        }
        XCTAssertEqual(mappings, 1 + 2 + 2 + 1, "the common buffer; both phases' in window 0; one attention buffer again in window 1")
        XCTAssertEqual(cache.held, 6912 * kib, "both phases' buffers are held")
        // A large model's mark: the margin stops at 16 MiB.
        XCTAssertEqual(MappedBuffers.margin(128 << 20), 8 << 20)
        XCTAssertEqual(MappedBuffers.margin(40 << 30), 16 << 20)
        cache.give(common.pointer, bytes: common.bytes)
    }

    func testAFixedCapacityBoundsWhatIsHeld() throws {
        let cache = MappedBuffers(capacity: 4 << 20)
        let a = try XCTUnwrap(cache.take(bytes: 1 << 20, zeroed: false))
        let c = try XCTUnwrap(cache.take(bytes: 2 << 20, zeroed: false))
        cache.give(a.pointer, bytes: a.bytes)
        cache.give(c.pointer, bytes: c.bytes)
        XCTAssertEqual(cache.held, 3 << 20)
        let d = try XCTUnwrap(cache.take(bytes: 1536 << 10, zeroed: false))
        cache.give(d.pointer, bytes: d.bytes)
        XCTAssertLessThanOrEqual(cache.held, 4 << 20)
        XCTAssertEqual(cache.held, (2 << 20) + (1536 << 10), "the 1 MiB buffer, the oldest, goes first")

        // A buffer larger than the whole capacity is unmapped at once, leaving the rest.
        let e = try XCTUnwrap(cache.take(bytes: 5 << 20, zeroed: false))
        cache.give(e.pointer, bytes: e.bytes)
        XCTAssertEqual(cache.held, (2 << 20) + (1536 << 10))
        XCTAssertEqual(cache.live, 0)

        // Capacity 0 holds nothing.
        let off = MappedBuffers(capacity: 0)
        let f = try XCTUnwrap(off.take(bytes: 1 << 20, zeroed: false))
        off.give(f.pointer, bytes: f.bytes)
        XCTAssertEqual(off.held, 0)
    }

    func testLargeMatricesAreZeroAfterReuse() {
        for _ in 0..<3 {
            var m = Matrix(rows: 512, cols: 1024)
            XCTAssertTrue(m.values.allSatisfy { $0 == 0 })
            m.withUnsafeMutableBufferPointer { $0.update(repeating: 7) }
        }
    }
}
