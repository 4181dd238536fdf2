import Synchronization
/// A dense Float32 matrix in row-major order with owned, contiguous storage.
///
/// `Matrix` has value semantics (copy on write). Hot loops reach the storage through
/// `withUnsafeBufferPointer` / `withUnsafeMutableBufferPointer`; element subscripts are
/// for tests and cold code.
public struct Matrix: Sendable {
    public let rows: Int
    public let cols: Int
    @usableFromInline var storage: Storage

    public var count: Int { rows * cols }
    public var shape: (rows: Int, cols: Int) { (rows, cols) }

    /// A zero-filled matrix.
    public init(rows: Int, cols: Int) {
        precondition(rows >= 0 && cols >= 0, "Matrix: negative shape \(rows)x\(cols)")
        self.rows = rows
        self.cols = cols
        self.storage = Storage(count: rows * cols)
    }

    /// A matrix whose every element the caller writes before reading any (no zero-filling pass).
    init(rows: Int, cols: Int, uninitialized: Void) {
        precondition(rows >= 0 && cols >= 0, "Matrix: negative shape \(rows)x\(cols)")
        self.rows = rows
        self.cols = cols
        self.storage = Storage(count: rows * cols, zeroed: false)
    }

    /// A matrix filled with `value`.
    public init(rows: Int, cols: Int, repeating value: Float) {
        self.init(rows: rows, cols: cols)
        storage.pointer.update(repeating: value, count: rows * cols)
    }

    /// A matrix whose elements are taken from `values` (row-major).
    public init(rows: Int, cols: Int, values: [Float]) {
        precondition(values.count == rows * cols, "Matrix: \(values.count) values for shape \(rows)x\(cols)")
        self.init(rows: rows, cols: cols)
        values.withUnsafeBufferPointer { src in
            if let base = src.baseAddress { storage.pointer.update(from: base, count: values.count) }
        }
    }

    /// A matrix filled by `body`, which receives the uninitialised-but-zeroed storage.
    public init(rows: Int, cols: Int, fill body: (UnsafeMutableBufferPointer<Float>) throws -> Void) rethrows {
        self.init(rows: rows, cols: cols)
        try body(UnsafeMutableBufferPointer(start: storage.pointer, count: rows * cols))
    }

    /// A column vector-like 1 x n matrix.
    public init(vector values: [Float]) {
        self.init(rows: 1, cols: values.count, values: values)
    }

    public static func identity(_ n: Int) -> Matrix {
        var m = Matrix(rows: n, cols: n)
        m.withUnsafeMutableBufferPointer { p in for i in 0..<n { p[i * n + i] = 1 } }
        return m
    }

    @inlinable
    public subscript(row: Int, col: Int) -> Float {
        get {
            precondition(row >= 0 && row < rows && col >= 0 && col < cols, "Matrix index (\(row), \(col)) out of \(rows)x\(cols)")
            return storage.pointer[row * cols + col]
        }
        set {
            precondition(row >= 0 && row < rows && col >= 0 && col < cols, "Matrix index (\(row), \(col)) out of \(rows)x\(cols)")
            makeUnique()
            storage.pointer[row * cols + col] = newValue
        }
    }

    @inlinable
    public func withUnsafeBufferPointer<R>(_ body: (UnsafeBufferPointer<Float>) throws -> R) rethrows -> R {
        try body(UnsafeBufferPointer(start: storage.pointer, count: count))
    }

    @inlinable
    public mutating func withUnsafeMutableBufferPointer<R>(_ body: (UnsafeMutableBufferPointer<Float>) throws -> R) rethrows -> R {
        makeUnique()
        return try body(UnsafeMutableBufferPointer(start: storage.pointer, count: count))
    }

    @inlinable
    mutating func makeUnique() {
        if !isKnownUniquelyReferenced(&storage) {
            let copy = Storage(count: count, zeroed: false)
            copy.pointer.update(from: storage.pointer, count: count)
            storage = copy
        }
    }

    /// Elements as an array (tests, serialisation of small things).
    public var values: [Float] { withUnsafeBufferPointer { Array($0) } }

    /// One row as an array.
    public func row(_ r: Int) -> [Float] {
        precondition(r >= 0 && r < rows)
        return withUnsafeBufferPointer { Array($0[(r * cols)..<((r + 1) * cols)]) }
    }

    /// The same elements seen with another shape of equal element count.
    public func reshaped(rows newRows: Int, cols newCols: Int) -> Matrix {
        precondition(newRows * newCols == count, "reshape \(rows)x\(cols) -> \(newRows)x\(newCols)")
        return Matrix(rows: newRows, cols: newCols, sharing: storage)
    }

    init(rows: Int, cols: Int, sharing storage: Storage) {
        self.rows = rows
        self.cols = cols
        self.storage = storage
    }

    /// Rows `range` as a new matrix (copied).
    public func rows(_ range: Range<Int>) -> Matrix {
        precondition(range.lowerBound >= 0 && range.upperBound <= rows)
        var out = Matrix(rows: range.count, cols: cols)
        out.withUnsafeMutableBufferPointer { dst in
            withUnsafeBufferPointer { src in
                if let d = dst.baseAddress, let s = src.baseAddress {
                    d.update(from: s + range.lowerBound * cols, count: range.count * cols)
                }
            }
        }
        return out
    }

    /// The rows at `indices`, in that order, as a new matrix.
    public func gatherRows(_ indices: [Int]) -> Matrix {
        var out = Matrix(rows: indices.count, cols: cols)
        let n = cols
        out.withUnsafeMutableBufferPointer { dst in
            withUnsafeBufferPointer { src in
                for (j, r) in indices.enumerated() {
                    precondition(r >= 0 && r < rows, "gatherRows: row \(r) of \(rows)")
                    (dst.baseAddress! + j * n).update(from: src.baseAddress! + r * n, count: n)
                }
            }
        }
        return out
    }

    /// Columns `range` as a new matrix (copied).
    public func columns(_ range: Range<Int>) -> Matrix {
        precondition(range.lowerBound >= 0 && range.upperBound <= cols)
        var out = Matrix(rows: rows, cols: range.count)
        let n = range.count
        out.withUnsafeMutableBufferPointer { dst in
            withUnsafeBufferPointer { src in
                for r in 0..<rows {
                    for c in 0..<n { dst[r * n + c] = src[r * cols + range.lowerBound + c] }
                }
            }
        }
        return out
    }

    /// Stack matrices with the same column count on top of each other.
    public static func vstack(_ parts: [Matrix]) -> Matrix {
        guard let first = parts.first else { return Matrix(rows: 0, cols: 0) }
        let cols = first.cols
        let total = parts.reduce(0) { $0 + $1.rows }
        var out = Matrix(rows: total, cols: cols)
        var offset = 0
        out.withUnsafeMutableBufferPointer { dst in
            for p in parts {
                precondition(p.cols == cols, "vstack: \(p.cols) columns, expected \(cols)")
                p.withUnsafeBufferPointer { src in
                    if let d = dst.baseAddress, let s = src.baseAddress { (d + offset).update(from: s, count: src.count) }
                }
                offset += p.count
            }
        }
        return out
    }

    public func transposed() -> Matrix {
        var out = Matrix(rows: cols, cols: rows)
        let (r, c) = (rows, cols)
        out.withUnsafeMutableBufferPointer { dst in
            withUnsafeBufferPointer { src in
                // Blocked to stay cache friendly on large matrices.
                let tile = 32
                var i0 = 0
                while i0 < r {
                    var j0 = 0
                    while j0 < c {
                        for i in i0..<min(i0 + tile, r) {
                            for j in j0..<min(j0 + tile, c) { dst[j * r + i] = src[i * c + j] }
                        }
                        j0 += tile
                    }
                    i0 += tile
                }
            }
        }
        return out
    }

    /// Number of exactly-zero elements.
    public var zeroCount: Int {
        withUnsafeBufferPointer { p in
            var n = 0
            for v in p where v == 0 { n += 1 }
            return n
        }
    }

    /// Whether every element is finite.
    public var allFinite: Bool {
        withUnsafeBufferPointer { p in p.allSatisfy { $0.isFinite } }
    }

    /// Largest absolute elementwise difference (shapes must match).
    public func maxAbsDifference(_ other: Matrix) -> Float {
        precondition(rows == other.rows && cols == other.cols, "shape mismatch \(rows)x\(cols) vs \(other.rows)x\(other.cols)")
        return withUnsafeBufferPointer { a in
            other.withUnsafeBufferPointer { b in
                var m: Float = 0
                for i in 0..<a.count { m = max(m, abs(a[i] - b[i])) }
                return m
            }
        }
    }

    /// Sum of squared elements, accumulated in Double.
    public var squaredNorm: Double {
        withUnsafeBufferPointer { p in
            var s = 0.0
            for v in p { s += Double(v) * Double(v) }
            return s
        }
    }
}

extension Matrix: Equatable {
    public static func == (a: Matrix, b: Matrix) -> Bool {
        guard a.rows == b.rows && a.cols == b.cols else { return false }
        return a.withUnsafeBufferPointer { x in b.withUnsafeBufferPointer { y in
            x.count == 0 || memcmp(x.baseAddress!, y.baseAddress!, x.count * 4) == 0
        } }
    }
}

extension Matrix: CustomStringConvertible {
    public var description: String { "Matrix(\(rows)x\(cols))" }
}

/// Owned storage of a matrix: 64-byte aligned for SIMD and BLAS, zero-filled.
/// Large buffers are anonymous mappings that come from, and go back to, `MappedBuffers`: the
/// same shapes come and go for every window of every block, and a mapping handed back to the
/// kernel costs a page fault per 4 KiB page when the next one is first written.
@usableFromInline
final class Storage: @unchecked Sendable {
    @usableFromInline let pointer: UnsafeMutablePointer<Float>
    @usableFromInline let count: Int
    private let mappedBytes: Int

    static let mapThreshold = MappedBuffers.threshold

    /// `zeroed: false` leaves the contents undefined, for a caller that writes every element
    /// before reading any.
    @usableFromInline init(count: Int, zeroed: Bool = true) {
        self.count = count
        let bytes = max(count, 1) * MemoryLayout<Float>.stride
        if bytes >= Self.mapThreshold, let mapped = MappedBuffers.shared.take(bytes: bytes, zeroed: zeroed) {
            mappedBytes = mapped.bytes
            pointer = mapped.pointer.bindMemory(to: Float.self, capacity: max(count, 1))
        } else {
            mappedBytes = 0
            let raw = UnsafeMutableRawPointer.allocate(byteCount: bytes, alignment: 64)
            if zeroed { raw.initializeMemory(as: UInt8.self, repeating: 0, count: bytes) }
            pointer = raw.bindMemory(to: Float.self, capacity: max(count, 1))
        }
    }

    deinit {
        if mappedBytes > 0 {
            MappedBuffers.shared.give(UnsafeMutableRawPointer(pointer), bytes: mappedBytes)
        } else {
            UnsafeMutableRawPointer(pointer).deallocate()
        }
    }
}

/// Anonymous mappings for buffers from 128 KiB up, kept in the process once freed, for the next
/// buffer of the same size: the mapped bytes in use and held together never pass the most that
/// were in use at once (the high-water mark) by more than a sixteenth (16 MiB at most), and the
/// oldest held mappings go back to the kernel first when a new size needs room.
///
/// A block's passes and solves allocate and free the same few sizes once per window, per chunk
/// and per block. A mapping handed back to the kernel costs a page fault per page when the next
/// one is first written (11 million faults and 25 s of system time in an 80 s prune of SmolLM2
/// before there was a cache). On a virtual machine whose host takes back memory the guest
/// leaves free (this project's 2-core VMs do, within seconds), the first write to memory freed
/// a few seconds earlier ran at 0.14-0.2 GB/s in huge pages instead of 10 (a 12 MiB buffer,
/// 60-90 ms): SparseLLM's auxiliaries, freed at the end of one block's solve and taken again by
/// the next, cost SmolLM2's block a second (docs/design.md, Memory). Holding up to the
/// high-water mark, the resident size between blocks stays where the last peak put it instead of
/// falling, and the peak itself rises by at most the margin (a new size first sends held ones
/// back). glibc's heap, the other way to keep memory, grew by fragmentation block after block
/// (526 MB peak against 302 MB).
///
/// From 128 KiB, not glibc's 1 MiB: a window's k and v projections (SmolLM2: 384 KiB each),
/// taken from glibc's main heap between longer-lived allocations, grew it by 57-100 MiB in 8 of
/// 14 runs of Wanda's first six blocks and by nothing in the others (peak RSS 252-297 MiB
/// against 205-210). The sixteenth above the high-water mark is room for one phase's buffers
/// while another's are held: with none, a block's attention (two 384 KiB buffers) and its
/// feed-forward (two 3 MiB ones) sent each other's back to the kernel once a window, and mapping
/// them again took 540,000 page faults instead of 80,000 in those six blocks.
public final class MappedBuffers: @unchecked Sendable {
    /// Holds up to the high-water mark and its margin; or `TOPIARY_BUFFER_CACHE_MB` from the
    /// environment, a fixed bound on the bytes held (0 turns the cache off).
    public static let shared: MappedBuffers = {
        if let text = getenv("TOPIARY_BUFFER_CACHE_MB").map({ String(cString: $0) }), let mb = Int(text), mb >= 0 {
            return MappedBuffers(capacity: mb << 20)
        }
        return MappedBuffers()
    }()
    /// Buffers from this size up are mappings; smaller ones come from malloc.
    public static let threshold = 128 << 10
    /// What is held and in use together may pass the high-water mark by a sixteenth of it, and
    /// by no more than 16 MiB: room for the small buffers that malloc served before the threshold
    /// came down. At Llama-3.1-8B's shape (block 0, 8 x 512 tokens) a 256 MiB margin was all
    /// used, and raised the peak RSS from 4.29 GB to 4.56 GB for nothing measurable in time.
    static func margin(_ peak: Int) -> Int { min(peak / 16, 16 << 20) }
    private static let page = 4096

    private struct Entry: Sendable {
        let address: UInt
        let bytes: Int
        var pointer: UnsafeMutableRawPointer { UnsafeMutableRawPointer(bitPattern: address)! }
    }
    private struct State: Sendable {
        var free: [Entry] = []
        /// Bytes held for reuse, and handed out now.
        var held = 0, live = 0
        /// The most bytes handed out at once.
        var peak = 0
        /// Mappings made.
        var mappings = 0
    }
    private let state = Mutex(State())
    /// A fixed bound on the bytes held, instead of the high-water mark.
    private let capacity: Int?

    /// `capacity` nil: hold up to the high-water mark of the bytes in use and its margin.
    init(capacity: Int? = nil) {
        self.capacity = capacity
    }

    /// Bytes held for reuse now.
    public var held: Int { state.withLock { $0.held } }

    /// Bytes handed out and not yet given back.
    public var live: Int { state.withLock { $0.live } }

    /// The most bytes handed out at once so far.
    public var peak: Int { state.withLock { $0.peak } }

    /// Mappings made so far (each costs a page fault per page when first written).
    public var mappings: Int { state.withLock { $0.mappings } }

    /// The most that may be held and in use together now: a fixed capacity plus what is in use,
    /// or the high-water mark and its margin.
    public var bound: Int { state.withLock { bound($0) } }

    private func bound(_ s: State) -> Int { capacity.map { $0 + s.live } ?? s.peak + Self.margin(s.peak) }

    /// Drops held mappings, oldest first, until what is held fits: the fixed capacity, or the
    /// high-water mark and its margin less the bytes in use. Returns what to unmap.
    private func evict(_ s: inout State) -> [Entry] {
        let room = max(bound(s) - s.live, 0)
        var evicted: [Entry] = []
        while s.held > room, !s.free.isEmpty {
            let e = s.free.removeFirst()
            s.held -= e.bytes
            evicted.append(e)
        }
        return evicted
    }

    /// A buffer of at least `bytes` (its mapped size is returned), zero-filled when asked.
    func take(bytes: Int, zeroed: Bool) -> (pointer: UnsafeMutableRawPointer, bytes: Int)? {
        let size = (bytes + Self.page - 1) / Self.page * Self.page
        let (reused, evicted): (Entry?, [Entry]) = state.withLock { s in
            s.live += size
            s.peak = max(s.peak, s.live)
            // Most recent first: its pages are the likeliest to be in cache.
            if let i = s.free.lastIndex(where: { $0.bytes == size }) {
                let e = s.free.remove(at: i)
                s.held -= e.bytes
                return (e, [])
            }
            return (nil, evict(&s))
        }
        for e in evicted { munmap(e.pointer, e.bytes) }
        if let reused {
            if zeroed { memset(reused.pointer, 0, size) }
            return (reused.pointer, size)
        }
        guard let p = mmap(nil, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0), p != MAP_FAILED else {
            state.withLock { $0.live -= size }
            return nil
        }
        state.withLock { $0.mappings += 1 }
        // Huge pages where the kernel allows them on request: a 2 MiB page takes one fault
        // instead of 512 when the buffer is first written.
        if size >= 4 << 20 { _ = madvise(p, size, 14 /* MADV_HUGEPAGE */) }
        return (p, size)
    }

    /// Hands a buffer from `take` back.
    func give(_ pointer: UnsafeMutableRawPointer, bytes: Int) {
        if let capacity, bytes > capacity {
            state.withLock { $0.live -= bytes }
            munmap(pointer, bytes)
            return
        }
        let evicted: [Entry] = state.withLock { s in
            s.live -= bytes
            s.free.append(Entry(address: UInt(bitPattern: pointer), bytes: bytes))
            s.held += bytes
            return evict(&s)
        }
        for e in evicted { munmap(e.pointer, e.bytes) }
    }

    /// What a cache other than `shared` (a test's) holds goes back to the kernel with it.
    deinit {
        for e in state.withLock({ $0.free }) { munmap(e.pointer, e.bytes) }
    }
}

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
