import TopiaryTensor

/// How a tensor's elements are stored in a file.
public enum TensorDType: String, Sendable, Codable, CaseIterable {
    case f32 = "F32", f16 = "F16", bf16 = "BF16"
    /// GGML block formats: 32 weights per block.
    case q8_0 = "Q8_0", q4_0 = "Q4_0", q4_1 = "Q4_1"

    /// Bytes taken by `count` elements, or nil when `count` is negative, does not fill whole
    /// blocks, or its size does not fit in an `Int`.
    public func byteCount(elements count: Int) -> Int? {
        guard count >= 0 else { return nil }
        let (units, unitBytes): (Int, Int)
        switch self {
        case .f32: (units, unitBytes) = (count, 4)
        case .f16, .bf16: (units, unitBytes) = (count, 2)
        case .q8_0, .q4_0, .q4_1:
            guard count % 32 == 0 else { return nil }
            (units, unitBytes) = (count / 32, self == .q8_0 ? 34 : (self == .q4_0 ? 18 : 20))
        }
        let (bytes, overflow) = units.multipliedReportingOverflow(by: unitBytes)
        return overflow ? nil : bytes
    }
}

/// Shape arithmetic that cannot trap: readers check every shape from a file with these before
/// they multiply its dimensions anywhere else.
public enum ShapeMath {
    /// The number of elements of `shape`, or nil when a dimension is negative or the product of
    /// its non-zero dimensions does not fit in an `Int`. (Requiring the non-zero product to fit,
    /// not just the whole product, means that no partial product of the dimensions, in any
    /// order, can overflow later: [0, 2^40, 2^40] is refused although it holds no element.)
    public static func elementCount(_ shape: [Int]) -> Int? {
        var nonZero = 1
        var hasZero = false
        for d in shape {
            guard d >= 0 else { return nil }
            if d == 0 { hasZero = true; continue }
            let (p, overflow) = nonZero.multipliedReportingOverflow(by: d)
            guard !overflow else { return nil }
            nonZero = p
        }
        return hasZero ? 0 : nonZero
    }
}

/// Where one tensor lives: name, shape (outermost first, as PyTorch prints it), type and bytes.
public struct TensorEntry: Sendable, Equatable {
    public var name: String
    public var shape: [Int]
    public var dtype: TensorDType
    /// Absolute byte offset of the data in the file.
    public var offset: Int
    public var byteCount: Int

    public init(name: String, shape: [Int], dtype: TensorDType, offset: Int, byteCount: Int) {
        self.name = name
        self.shape = shape
        self.dtype = dtype
        self.offset = offset
        self.byteCount = byteCount
    }

    public var elementCount: Int { shape.reduce(1, *) }

    /// Rows `range` of this tensor along its outermost dimension, as an entry over those rows'
    /// bytes only (shape [range.count, rest...]). Nil when the tensor has one dimension, the range
    /// is empty or outside it, or a row is not a whole number of the type's blocks.
    public func rows(_ range: Range<Int>) -> TensorEntry? {
        guard shape.count >= 2, shape[0] > 0, range.lowerBound >= 0, range.upperBound <= shape[0], !range.isEmpty,
              let rowBytes = dtype.byteCount(elements: elementCount / shape[0]), rowBytes * shape[0] == byteCount else { return nil }
        var rowsShape = shape
        rowsShape[0] = range.count
        return TensorEntry(name: name, shape: rowsShape, dtype: dtype, offset: offset + range.lowerBound * rowBytes,
                           byteCount: range.count * rowBytes)
    }
}

/// A collection of named tensors read lazily, one at a time, from memory-mapped files.
public protocol TensorSource: AnyObject, Sendable {
    /// The file or directory this source reads.
    var path: String { get }
    /// Tensor names in file order.
    var tensorNames: [String] { get }
    func entry(_ name: String) -> TensorEntry?
    /// The tensor as Float32: a 2-D tensor is [shape[0] x shape[1]]; a 1-D tensor is [1 x n];
    /// higher ranks are [shape[0] x product(rest)].
    func load(_ name: String) throws -> Matrix
    /// Asks the kernel to start reading the tensor's bytes in the background (a page-cache hint:
    /// nothing is decoded and nothing stays in this process's memory), so that a `load` soon
    /// after finds them read. An unknown name is ignored.
    func prefetch(_ name: String)
    /// Rows `rows` of tensor `name` as `load` gives them ([rows.count x columns]), decoding only
    /// those rows where the format allows it: a writer streams a large tensor (an embedding) in
    /// pieces this way instead of holding all of it in Float32 at once.
    func load(_ name: String, rows: Range<Int>) throws -> Matrix
}

extension TensorSource {
    public func prefetch(_ name: String) {}

    /// The whole tensor, cut: for sources that hold their tensors in memory (`MemoryTensorSource`);
    /// every source that reads a file cuts the rows' bytes instead.
    public func load(_ name: String, rows: Range<Int>) throws -> Matrix { try loadWhole(name, rows: rows) }

    /// Rows `rows` cut from the whole tensor `name` as `load` gives it.
    func loadWhole(_ name: String, rows: Range<Int>) throws -> Matrix {
        let m = try load(name)
        try Self.checkRows(rows, of: m.rows, tensor: name, path: path)
        return m.rows(rows)
    }

    /// Throws unless `rows` is a non-empty range within a tensor's `count` rows.
    static func checkRows(_ rows: Range<Int>, of count: Int, tensor: String, path: String) throws {
        guard rows.lowerBound >= 0, rows.upperBound <= count, !rows.isEmpty else {
            throw CheckpointError.shapeMismatch(path: path, tensor: tensor, expected: "rows within 0..<\(count)", found: "rows \(rows)")
        }
    }

    /// `load(name, rows:)` for a source that reads `entry` through `file`: the rows' bytes alone
    /// when the entry can be cut there (`TensorEntry.rows`), otherwise the whole tensor, cut.
    func loadRows(_ name: String, _ rows: Range<Int>, entry: TensorEntry, file: MappedFile) throws -> Matrix {
        let count = entry.shape.count >= 2 ? entry.shape[0] : 1
        try Self.checkRows(rows, of: count, tensor: name, path: path)
        if let cut = entry.rows(rows) { return try file.decodeTensor(cut) }
        return try file.decodeTensor(entry).rows(rows)
    }
}

/// Decodes a stored tensor into Float32.
public enum TensorDecoder {
    /// Decodes `entry` whose bytes are `bytes` (exactly `entry.byteCount` long).
    public static func decode(_ bytes: UnsafeRawBufferPointer, entry: TensorEntry, path: String) throws -> Matrix {
        let n = entry.elementCount
        guard let expected = entry.dtype.byteCount(elements: n) else {
            throw CheckpointError.invalidHeader(path: path, detail: "tensor '\(entry.name)' has \(n) elements, not a whole number of \(entry.dtype.rawValue) blocks of 32")
        }
        guard bytes.count == expected else {
            throw CheckpointError.invalidHeader(path: path, detail: "tensor '\(entry.name)' of shape \(entry.shape) and type \(entry.dtype.rawValue) needs \(expected) bytes, has \(bytes.count)")
        }
        let rows = entry.shape.count >= 2 ? entry.shape[0] : 1
        let cols = entry.shape.count >= 2 ? n / max(entry.shape[0], 1) : n
        return Matrix(rows: rows, cols: cols) { out in
            decode(bytes, dtype: entry.dtype, count: n, into: out.baseAddress!)
        }
    }

    /// Decodes `count` elements of `dtype` from `src` into `dst`, in chunks of 2^18 elements (whole
    /// blocks of the quantized types) over the CPU threads: a 70B block's 1.7 GB of bf16 is mostly
    /// page faults on the mapped file and the new matrix, which one thread takes in turn.
    /// Each element is decoded alone, so the bits do not depend on the threads.
    public static func decode(_ src: UnsafeRawBufferPointer, dtype: TensorDType, count: Int, into dst: UnsafeMutablePointer<Float>) {
        Parallel.forEach(count, chunk: 1 << 18) { range in
            decode(src, dtype: dtype, range: range, into: dst)
        }
    }

    /// Decodes elements `range` (for a quantized type, whole blocks of 32) of `dtype` from `src` into `dst`.
    static func decode(_ src: UnsafeRawBufferPointer, dtype: TensorDType, range: Range<Int>, into dst: UnsafeMutablePointer<Float>) {
        let blocks = (range.lowerBound / 32)..<(range.upperBound / 32)
        switch dtype {
        case .f32:
            for i in range { dst[i] = Float(bitPattern: UInt32(littleEndian: src.loadUnaligned(fromByteOffset: i * 4, as: UInt32.self))) }
        case .f16:
            for i in range { dst[i] = HalfPrecision.fp16ToFloat(UInt16(littleEndian: src.loadUnaligned(fromByteOffset: i * 2, as: UInt16.self))) }
        case .bf16:
            for i in range { dst[i] = HalfPrecision.bf16ToFloat(UInt16(littleEndian: src.loadUnaligned(fromByteOffset: i * 2, as: UInt16.self))) }
        case .q8_0:
            for b in blocks {
                let o = b * 34
                let d = HalfPrecision.fp16ToFloat(UInt16(littleEndian: src.loadUnaligned(fromByteOffset: o, as: UInt16.self)))
                for j in 0..<32 { dst[b * 32 + j] = Float(Int8(bitPattern: src[o + 2 + j])) * d }
            }
        case .q4_0:
            for b in blocks {
                let o = b * 18
                let d = HalfPrecision.fp16ToFloat(UInt16(littleEndian: src.loadUnaligned(fromByteOffset: o, as: UInt16.self)))
                for j in 0..<16 {
                    let q = src[o + 2 + j]
                    dst[b * 32 + j] = Float(Int(q & 0x0F) - 8) * d
                    dst[b * 32 + j + 16] = Float(Int(q >> 4) - 8) * d
                }
            }
        case .q4_1:
            for b in blocks {
                let o = b * 20
                let d = HalfPrecision.fp16ToFloat(UInt16(littleEndian: src.loadUnaligned(fromByteOffset: o, as: UInt16.self)))
                let m = HalfPrecision.fp16ToFloat(UInt16(littleEndian: src.loadUnaligned(fromByteOffset: o + 2, as: UInt16.self)))
                for j in 0..<16 {
                    let q = src[o + 4 + j]
                    dst[b * 32 + j] = Float(q & 0x0F) * d + m
                    dst[b * 32 + j + 16] = Float(q >> 4) * d + m
                }
            }
        }
    }
}
