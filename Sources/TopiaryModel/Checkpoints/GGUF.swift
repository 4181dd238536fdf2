import TopiaryTensor

/// A metadata value of a GGUF file.
public enum GGUFValue: Sendable, Equatable {
    case uint(UInt64)
    case int(Int64)
    case float(Double)
    case bool(Bool)
    case string(String)
    case array([GGUFValue])

    public var int: Int? {
        switch self {
        case .uint(let v): return v <= UInt64(Int.max) ? Int(v) : nil
        case .int(let v): return Int(v)
        default: return nil
        }
    }
    public var double: Double? {
        switch self {
        case .float(let v): return v
        case .uint, .int: return int.map(Double.init)
        default: return nil
        }
    }
    public var string: String? { if case .string(let s) = self { return s } else { return nil } }
    public var bool: Bool? { if case .bool(let b) = self { return b } else { return nil } }
    public var array: [GGUFValue]? { if case .array(let a) = self { return a } else { return nil } }
    public var stringArray: [String]? { array?.compactMap(\.string) }
}

/// A GGUF (v2/v3) file: metadata and lazily decoded tensors.
///
/// Tensor shapes are reported outermost first: GGUF's `ne = (ne0, ne1)` with ne0 contiguous
/// becomes `[ne1, ne0]`, i.e. PyTorch's `[out, in]`.
public final class GGUFFile: TensorSource, @unchecked Sendable {
    public let path: String
    public let version: UInt32
    public let metadata: [String: GGUFValue]
    public private(set) var tensorNames: [String] = []
    private var entries: [String: TensorEntry] = [:]
    private let file: MappedFile

    /// GGML type ids this reader decodes.
    static let supportedTypes: [UInt32: TensorDType] = [0: .f32, 1: .f16, 2: .q4_0, 3: .q4_1, 8: .q8_0, 30: .bf16]
    /// Every ggml type this reader knows, decodable or not: its name and block layout (elements
    /// per block, bytes per block, as ggml's type traits give them), so that the byte extent of
    /// any tensor can be checked against its neighbours even when its type cannot be decoded.
    static let ggmlTypes: [UInt32: (name: String, blockElements: Int, blockBytes: Int)] = [
        0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
        7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 36), 10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110),
        12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
        16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50),
        20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136),
        24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8),
        29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66), 39: ("MXFP4", 32, 17),
    ]

    /// The name of ggml type `type` ("Q4_K"), or "ggml type N" for an id this reader does not know.
    static func typeName(_ type: UInt32) -> String { ggmlTypes[type]?.name ?? "ggml type \(type)" }

    /// Bytes taken by `count` elements of ggml type `type`, or nil when the type is unknown, the
    /// elements do not fill whole blocks, or the size does not fit in an `Int`.
    static func byteCount(type: UInt32, elements count: Int) -> Int? {
        guard let t = ggmlTypes[type], count >= 0, count % t.blockElements == 0 else { return nil }
        let (bytes, overflow) = (count / t.blockElements).multipliedReportingOverflow(by: t.blockBytes)
        return overflow ? nil : bytes
    }

    // Bounds on header counts so that a corrupt header gives an error, not a huge allocation.
    private static let maxCount: UInt64 = 1 << 24
    /// The fewest bytes one metadata entry takes (key length, one-byte key, type, one-byte value)
    /// and one tensor description (name length, rank, one dimension, type, offset): a count
    /// that the bytes left cannot hold is refused before anything is read or reserved.
    private static let minMetadataEntryBytes = 8 + 1 + 4 + 1
    private static let minTensorInfoBytes = 8 + 4 + 8 + 4 + 8
    /// The largest `general.alignment` accepted (llama.cpp writes 32).
    static let maxAlignment = 1 << 16

    public init(path: String) throws {
        self.path = path
        file = try MappedFile(path: path)
        var r = file.reader()
        let magic = try r.readBytes(count: 4, "magic")
        guard magic == Array("GGUF".utf8) else {
            throw CheckpointError.badMagic(path: path, expected: "\"GGUF\"", found: Self.describeMagic(magic))
        }
        version = try r.read(UInt32.self, "version")
        guard version == 2 || version == 3 else {
            throw CheckpointError.invalidHeader(path: path, detail: "GGUF version \(version) is not supported (expected 2 or 3)")
        }
        let tensorCount = try r.read(UInt64.self, "tensor count")
        let kvCount = try r.read(UInt64.self, "metadata count")
        guard tensorCount < Self.maxCount, kvCount < Self.maxCount else {
            throw CheckpointError.invalidHeader(path: path, detail: "implausible counts: \(tensorCount) tensors, \(kvCount) metadata entries")
        }
        guard kvCount <= UInt64(r.remaining / Self.minMetadataEntryBytes) else {
            throw CheckpointError.truncated(path: path, detail: "metadata count \(kvCount) cannot fit in the \(r.remaining) bytes after the header (each entry takes at least \(Self.minMetadataEntryBytes))")
        }
        var meta: [String: GGUFValue] = [:]
        var arrayElements = 0
        for i in 0..<Int(kvCount) {
            let key = try Self.readString(&r, "metadata key \(i)")
            let type = try r.read(UInt32.self, "type of metadata '\(key)'")
            let value = try Self.readValue(&r, type: type, key: key, depth: 0, elements: &arrayElements)
            guard meta.updateValue(value, forKey: key) == nil else {
                throw CheckpointError.invalidHeader(path: path, detail: "metadata key '\(key)' appears twice")
            }
        }
        metadata = meta
        var alignment = 32
        if let value = meta["general.alignment"] {
            guard let a = value.int, a >= 8, a <= Self.maxAlignment, a & (a - 1) == 0 else {
                throw CheckpointError.invalidField(path: path, field: "general.alignment",
                                                   detail: "is \(value.int.map(String.init) ?? "\(value)"), expected a power of two from 8 to \(Self.maxAlignment) (the GGUF specification requires a multiple of 8)")
            }
            alignment = a
        }
        guard tensorCount <= UInt64(r.remaining / Self.minTensorInfoBytes) else {
            throw CheckpointError.truncated(path: path, detail: "tensor count \(tensorCount) cannot fit in the \(r.remaining) bytes after the metadata (each tensor description takes at least \(Self.minTensorInfoBytes))")
        }
        var pending: [(String, [Int], UInt32, UInt64)] = []
        var seen = Set<String>()
        for i in 0..<Int(tensorCount) {
            let name = try Self.readString(&r, "name of tensor \(i)")
            guard seen.insert(name).inserted else {
                throw CheckpointError.invalidHeader(path: path, detail: "tensor '\(name)' is described twice")
            }
            let nDims = try r.read(UInt32.self, "dimension count of tensor '\(name)'")
            guard nDims >= 1 && nDims <= 4 else {
                throw CheckpointError.invalidHeader(path: path, detail: "tensor '\(name)' has \(nDims) dimensions, expected 1 to 4")
            }
            var ne: [Int] = []
            for d in 0..<Int(nDims) {
                let v = try r.read(UInt64.self, "dimension \(d) of tensor '\(name)'")
                guard v <= 1 << 40 else {
                    throw CheckpointError.invalidHeader(path: path, detail: "tensor '\(name)' dimension \(d) is \(v), expected at most 2^40")
                }
                ne.append(Int(v))
            }
            let type = try r.read(UInt32.self, "type of tensor '\(name)'")
            let offset = try r.read(UInt64.self, "offset of tensor '\(name)'")
            let shape = Array(ne.reversed())
            guard ShapeMath.elementCount(shape) != nil else {
                throw CheckpointError.invalidHeader(path: path, detail: "tensor '\(name)' has shape \(shape), whose element count does not fit in 64 bits (the file has \(file.size) bytes)")
            }
            pending.append((name, shape, type, offset))
        }
        let dataStart = (r.offset + alignment - 1) / alignment * alignment
        var extents: [TensorExtent] = []
        for (index, (name, shape, type, relOffset)) in pending.enumerated() {
            // Every tensor, decodable or not, starts on the alignment and inside the file.
            guard relOffset % UInt64(alignment) == 0 else {
                throw CheckpointError.invalidHeader(path: path, detail: "tensor '\(name)' has data offset \(relOffset), expected a multiple of the alignment \(alignment)\(meta["general.alignment"] == nil ? " (the default; general.alignment is absent)" : " (general.alignment)")")
            }
            let start = dataStart.addingReportingOverflow(Int(clamping: relOffset))
            guard !start.overflow, start.partialValue <= file.size else {
                throw CheckpointError.tensorOutOfBounds(path: path, tensor: name, end: start.overflow ? Int.max : start.partialValue, fileSize: file.size)
            }
            let count = ShapeMath.elementCount(shape)!
            let dtype = Self.supportedTypes[type]
            guard let bytes = Self.byteCount(type: type, elements: count) else {
                if let dtype {
                    throw CheckpointError.invalidHeader(path: path, detail: "tensor '\(name)' has \(count) elements, not a whole number of \(dtype.rawValue) blocks or too many for a file")
                }
                // Without its size the tensor's extent, and so every other tensor's, cannot be checked.
                throw CheckpointError.unsupportedType(path: path, tensor: name, type: Self.typeName(type))
            }
            guard bytes <= file.size - start.partialValue else {
                let end = start.partialValue.addingReportingOverflow(bytes)
                throw CheckpointError.tensorOutOfBounds(path: path, tensor: name, end: end.overflow ? Int.max : end.partialValue, fileSize: file.size)
            }
            extents.append(TensorExtent(index: index, name: name, shape: shape, type: Self.typeName(type), offset: Int(relOffset), byteCount: bytes))
            tensorNames.append(name)
            if let dtype {
                entries[name] = TensorEntry(name: name, shape: shape, dtype: dtype, offset: start.partialValue, byteCount: bytes)
            } else {
                // Recorded, and refused only when the tensor is used.
                unsupported[name] = Self.typeName(type)
            }
        }
        try Self.checkLayout(extents, alignment: alignment, dataStart: dataStart, fileSize: file.size, path: path)
    }

    /// Where one tensor's bytes lie in the data section, as its description says.
    struct TensorExtent {
        /// Its place among the tensor descriptions.
        var index: Int
        var name: String
        var shape: [Int]
        var type: String
        /// Bytes from the start of the data section.
        var offset: Int
        var byteCount: Int
        var end: Int { offset + byteCount }

        var described: String { "'\(name)' (\(type), shape \(shape), \(byteCount) bytes at data offset \(offset))" }
    }

    /// Checks that the tensors tile the data section as llama.cpp writes it: in order of offset,
    /// the first at offset 0 and each next one exactly where the one before ends, rounded up to
    /// the alignment, and nothing after the last but padding to the alignment. An overlap, a gap
    /// or bytes left over mean that a type, a shape, an offset or the tensor count is wrong, and
    /// that some tensor would be read from another's bytes.
    static func checkLayout(_ extents: [TensorExtent], alignment: Int, dataStart: Int, fileSize: Int, path: String) throws {
        func aligned(_ n: Int) -> Int { (n + alignment - 1) / alignment * alignment }
        // An empty tensor may share its offset with the next one: it comes first.
        let sorted = extents.sorted { ($0.offset, $0.byteCount > 0 ? 1 : 0, $0.index) < ($1.offset, $1.byteCount > 0 ? 1 : 0, $1.index) }
        var previous: TensorExtent?
        for t in sorted {
            let expected = previous.map { aligned($0.end) } ?? 0
            guard t.offset != expected else {
                previous = t
                continue
            }
            guard let p = previous else {
                throw CheckpointError.invalidHeader(path: path, detail: "the first tensor in the data section, '\(t.name)', is at data offset \(t.offset), expected 0: \(t.offset) bytes belong to no tensor")
            }
            if t.offset < p.end {
                throw CheckpointError.invalidHeader(path: path, detail: "tensor '\(t.name)' at data offset \(t.offset) overlaps tensor \(p.described), which ends at \(p.end): expected '\(t.name)' at data offset \(expected)")
            }
            throw CheckpointError.invalidHeader(path: path, detail: "tensor \(p.described) ends at \(p.end), but the next tensor '\(t.name)' is at data offset \(t.offset): expected it at \(expected) (the end rounded up to the alignment \(alignment)); the \(t.offset - p.end) bytes between belong to no tensor")
        }
        // llama.cpp pads after the last tensor too; more than that was described by a tensor the header does not count.
        if let last = previous, fileSize - dataStart > aligned(last.end) {
            let extra = fileSize - dataStart - last.end
            throw CheckpointError.invalidHeader(path: path, detail: "the last tensor in the data section, \(last.described), ends at byte \(dataStart + last.end) but the file has \(fileSize) bytes: expected at most \(alignment - 1) bytes of padding after it, found \(extra) (is the tensor count \(extents.count) too low?)")
        }
    }

    private var unsupported: [String: String] = [:]

    public func entry(_ name: String) -> TensorEntry? { entries[name] }

    public func load(_ name: String) throws -> Matrix { try file.decodeTensor(try readable(name)) }

    public func load(_ name: String, rows: Range<Int>) throws -> Matrix {
        try loadRows(name, rows, entry: try readable(name), file: file)
    }

    /// The entry of tensor `name`, or the error that says why it cannot be read.
    private func readable(_ name: String) throws -> TensorEntry {
        if let type = unsupported[name] {
            throw CheckpointError.unsupportedType(path: path, tensor: name, type: type)
        }
        guard let e = entries[name] else { throw CheckpointError.missingTensor(path: path, tensor: name) }
        return e
    }

    public func prefetch(_ name: String) {
        if let e = entries[name] { prefetch(e) }
    }

    /// Reads ahead the bytes of `entry` (a tensor of this file, or a `sliceEntry` of one).
    public func prefetch(_ entry: TensorEntry) { file.prefetch(offset: entry.offset, count: entry.byteCount) }

    /// Names of tensors whose type this reader cannot decode, with the type's name.
    public var unsupportedTensors: [String: String] { unsupported }

    /// Where slice `index` of tensor `name` along its outermost dimension lies: one expert of
    /// llama.cpp's stacked [experts, out, in] tensors, as an entry of shape [out, in] over that
    /// expert's bytes only. Nil when the tensor is absent, has one dimension, has no slice
    /// `index`, or a slice is not a whole number of the type's blocks.
    public func sliceEntry(_ name: String, index: Int) -> TensorEntry? {
        guard let e = entries[name], e.shape.count >= 2, index >= 0, index < e.shape[0] else { return nil }
        let inner = Array(e.shape.dropFirst())
        guard let innerCount = ShapeMath.elementCount(inner), let bytes = e.dtype.byteCount(elements: innerCount),
              bytes.multipliedReportingOverflow(by: e.shape[0]) == (e.byteCount, false) else { return nil }
        return TensorEntry(name: "\(name)[\(index)]", shape: inner, dtype: e.dtype, offset: e.offset + index * bytes, byteCount: bytes)
    }

    /// Slice `index` of tensor `name` along its outermost dimension (see `sliceEntry`), decoded
    /// from its own bytes without reading the other slices: [shape[1] x product(shape[2...])].
    public func loadSlice(_ name: String, index: Int) throws -> Matrix {
        if let type = unsupported[name] {
            throw CheckpointError.unsupportedType(path: path, tensor: name, type: type)
        }
        guard let e = entries[name] else { throw CheckpointError.missingTensor(path: path, tensor: name) }
        guard e.shape.count >= 2, index >= 0, index < e.shape[0] else {
            throw CheckpointError.shapeMismatch(path: path, tensor: name, expected: "at least \(index + 1) slices along its first dimension",
                                                found: "\(e.shape)")
        }
        guard let slice = sliceEntry(name, index: index) else {
            throw CheckpointError.invalidHeader(path: path, detail: "tensor '\(name)' of shape \(e.shape) and type \(e.dtype.rawValue) cannot be cut into \(e.shape[0]) slices of whole blocks")
        }
        return try file.decodeTensor(slice)
    }

    private static func readString(_ r: inout ByteReader, _ what: String) throws -> String {
        let n = try r.read(UInt64.self, "length of \(what)")
        guard n <= UInt64(r.remaining) else {
            throw CheckpointError.truncated(path: r.file.path, detail: "\(what) claims \(n) bytes at offset \(r.offset), \(r.remaining) left")
        }
        return try r.readString(count: Int(n), what)
    }

    /// Metadata array elements a file may hold in all (a decoded element takes some 24 bytes
    /// however few it took in the file): Gemma's 256K-token vocabulary is 3 arrays of 256K.
    static let maxArrayElements = 1 << 24

    private static func readValue(_ r: inout ByteReader, type: UInt32, key: String, depth: Int, elements: inout Int) throws -> GGUFValue {
        let what = "value of '\(key)'"
        switch type {
        case 0: return .uint(UInt64(try r.read(UInt8.self, what)))
        case 1: return .int(Int64(try r.read(Int8.self, what)))
        case 2: return .uint(UInt64(try r.read(UInt16.self, what)))
        case 3: return .int(Int64(try r.read(Int16.self, what)))
        case 4: return .uint(UInt64(try r.read(UInt32.self, what)))
        case 5: return .int(Int64(try r.read(Int32.self, what)))
        case 6: return .float(Double(try r.readFloat(what)))
        case 7: return .bool(try r.read(UInt8.self, what) != 0)
        case 8: return .string(try readString(&r, what))
        case 9:
            guard depth < 4 else { throw CheckpointError.invalidHeader(path: r.file.path, detail: "'\(key)': arrays nested too deeply") }
            let elementType = try r.read(UInt32.self, "array type of '\(key)'")
            guard let size = minValueBytes(elementType) else {
                throw CheckpointError.invalidHeader(path: r.file.path, detail: "metadata '\(key)' is an array of unknown value type \(elementType)")
            }
            let count = try r.read(UInt64.self, "array length of '\(key)'")
            // A count beyond what the bytes left can hold is corrupt: refused before anything is reserved.
            guard count <= UInt64(r.remaining / size) else {
                throw CheckpointError.truncated(path: r.file.path, detail: "array '\(key)' claims \(count) elements of at least \(size) bytes each, \(r.remaining) bytes left")
            }
            elements += Int(count)
            guard elements <= maxArrayElements else {
                throw CheckpointError.invalidHeader(path: r.file.path, detail: "array '\(key)' of \(count) elements takes the file's metadata past \(maxArrayElements) array elements in all")
            }
            var out: [GGUFValue] = []
            out.reserveCapacity(Int(count))
            for _ in 0..<Int(count) { out.append(try readValue(&r, type: elementType, key: key, depth: depth + 1, elements: &elements)) }
            return .array(out)
        case 10: return .uint(try r.read(UInt64.self, what))
        case 11: return .int(try r.read(Int64.self, what))
        case 12: return .float(try r.readDouble(what))
        default:
            throw CheckpointError.invalidHeader(path: r.file.path, detail: "metadata '\(key)' has unknown value type \(type)")
        }
    }

    /// The fewest bytes a metadata value of `type` takes (nil for an unknown type).
    private static func minValueBytes(_ type: UInt32) -> Int? {
        switch type {
        case 0, 1, 7: return 1
        case 2, 3: return 2
        case 4, 5, 6: return 4
        case 8, 10, 11, 12: return 8
        case 9: return 4 + 8
        default: return nil
        }
    }

    static func describeMagic(_ bytes: [UInt8]) -> String {
        let printable = bytes.allSatisfy { $0 >= 0x20 && $0 < 0x7F }
        if printable { return "\"" + String(decoding: bytes, as: UTF8.self) + "\"" }
        return bytes.map { String(format2: $0) }.joined(separator: " ")
    }
}

extension String {
    init(format2 byte: UInt8) {
        let hex = String(byte, radix: 16)
        self = "0x" + (hex.count == 1 ? "0" + hex : hex)
    }
}
