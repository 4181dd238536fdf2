#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import Foundation
import TopiaryTensor

// MARK: - Reading one file

/// A `.safetensors` file: an 8-byte little-endian header length N, N bytes of JSON
/// (`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {string: string}}`),
/// then the tensor bytes, with offsets relative to the end of the header.
///
/// The file is memory-mapped and each tensor is decoded to Float32 only when it is loaded.
/// F32, F16 and BF16 tensors are decoded; tensors of other types (I8, F64, ...) are listed in
/// `tensorNames` and `unsupportedTensors`, and loading one is an `unsupportedType` error.
/// Every header value is checked against the file before anything is read.
public final class SafeTensorsFile: TensorSource {
    public let path: String
    /// Tensor names in the order of their data in the file.
    public let tensorNames: [String]
    /// The `__metadata__` entries (empty when there are none).
    public let metadata: [String: String]
    /// Tensors whose type this reader does not decode, with the type as the file names it.
    public let unsupportedTensors: [String: String]
    /// Absolute offset of the first data byte (8 + header length).
    public let dataOffset: Int
    private let entries: [String: TensorEntry]
    private let file: MappedFile

    /// Bytes per element of the types the format defines (sub-byte types are left out).
    static let elementSizes: [String: Int] = [
        "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
        "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
        "C64": 8,
    ]
    static let decodedTypes: [String: TensorDType] = ["F32": .f32, "F16": .f16, "BF16": .bf16]

    public init(path: String) throws {
        self.path = path
        let file = try MappedFile(path: path)
        self.file = file
        guard file.size >= 8 else {
            throw CheckpointError.truncated(path: path, detail: "file has \(file.size) bytes, fewer than the 8-byte header length")
        }
        var reader = file.reader()
        let declared = try reader.read(UInt64.self, "header length")
        guard declared <= UInt64(file.size - 8) else {
            throw CheckpointError.truncated(path: path, detail: "header length \(declared) runs past the end of the file (\(file.size) bytes, \(file.size - 8) after the length)")
        }
        let headerLength = Int(declared)
        guard headerLength >= 2 else {
            throw CheckpointError.invalidHeader(path: path, detail: "header length is \(headerLength), too short for a JSON object")
        }
        let headerBytes = try file.bytes(at: 8, count: headerLength, what: "header")
        let raw = try SafeTensorsHeaderParser.parse(Data(headerBytes), path: path)
        dataOffset = 8 + headerLength
        let dataSize = file.size - dataOffset
        metadata = raw.metadata

        var placed: [(name: String, begin: Int, end: Int)] = []
        var entries: [String: TensorEntry] = [:]
        var unsupported: [String: String] = [:]
        for (name, e) in raw.tensors {
            guard e.dataOffsets.count == 2 else {
                throw CheckpointError.invalidHeader(path: path, detail: "tensor '\(name)': data_offsets has \(e.dataOffsets.count) values, expected [begin, end]")
            }
            let begin = e.dataOffsets[0], end = e.dataOffsets[1]
            guard begin >= 0, begin <= end else {
                throw CheckpointError.invalidHeader(path: path, detail: "tensor '\(name)': data_offsets [\(begin), \(end)] are not an increasing pair of byte offsets")
            }
            guard end <= dataSize else {
                let (absEnd, overflow) = dataOffset.addingReportingOverflow(end)
                throw CheckpointError.tensorOutOfBounds(path: path, tensor: name, end: overflow ? Int.max : absEnd, fileSize: file.size)
            }
            if e.shape.contains(where: { $0 < 0 }) {
                throw CheckpointError.invalidHeader(path: path, detail: "tensor '\(name)' has a negative dimension in shape \(e.shape)")
            }
            guard let count = ShapeMath.elementCount(e.shape) else {
                throw CheckpointError.invalidHeader(path: path, detail: "tensor '\(name)' has an impossibly large shape \(e.shape) (its element count does not fit in 64 bits)")
            }
            let found = end - begin
            if let size = Self.elementSizes[e.dtype] {
                let (needed, overflow) = count.multipliedReportingOverflow(by: size)
                guard !overflow, needed == found else {
                    throw CheckpointError.invalidHeader(path: path, detail: "tensor '\(name)' of shape \(e.shape) and type \(e.dtype) needs \(overflow ? "too many" : String(needed)) bytes, but data_offsets [\(begin), \(end)] hold \(found)")
                }
            }
            placed.append((name, begin, end))
            if let dtype = Self.decodedTypes[e.dtype] {
                entries[name] = TensorEntry(name: name, shape: e.shape, dtype: dtype, offset: dataOffset + begin, byteCount: found)
            } else {
                unsupported[name] = e.dtype
            }
        }
        placed.sort { a, b in
            a.begin != b.begin ? a.begin < b.begin : a.name.utf8.lexicographicallyPrecedes(b.name.utf8)
        }
        var previous: (name: String, end: Int)? = nil
        for t in placed where t.end > t.begin {
            if let p = previous, t.begin < p.end {
                throw CheckpointError.invalidHeader(path: path, detail: "tensors '\(p.name)' and '\(t.name)' overlap (byte \(t.begin) is before \(p.end))")
            }
            previous = (t.name, t.end)
        }
        tensorNames = placed.map(\.name)
        self.entries = entries
        unsupportedTensors = unsupported
    }

    public func entry(_ name: String) -> TensorEntry? { entries[name] }

    /// The type of a tensor as written in the file ("F32", "I8", ...), or nil when absent.
    public func storedType(_ name: String) -> String? {
        entries[name]?.dtype.rawValue ?? unsupportedTensors[name]
    }

    public func load(_ name: String) throws -> Matrix { try file.decodeTensor(try readable(name)) }

    public func load(_ name: String, rows: Range<Int>) throws -> Matrix {
        try loadRows(name, rows, entry: try readable(name), file: file)
    }

    /// The entry of tensor `name`, or the error that says why it cannot be read.
    private func readable(_ name: String) throws -> TensorEntry {
        if let type = unsupportedTensors[name] {
            throw CheckpointError.unsupportedType(path: path, tensor: name, type: type)
        }
        guard let e = entries[name] else { throw CheckpointError.missingTensor(path: path, tensor: name) }
        return e
    }

    public func prefetch(_ name: String) {
        if let e = entries[name] { file.prefetch(offset: e.offset, count: e.byteCount) }
    }
}

/// The JSON header of a safetensors file, decoded but not yet checked against the file.
fileprivate struct SafeTensorsHeaderParser {
    struct Tensor: Decodable {
        var dtype: String
        var shape: [Int]
        var dataOffsets: [Int]
        enum CodingKeys: String, CodingKey {
            case dtype, shape
            case dataOffsets = "data_offsets"
        }

        init(from decoder: Decoder) throws {
            let c = try decoder.container(keyedBy: CodingKeys.self)
            dtype = try c.decode(String.self, forKey: .dtype)
            shape = try c.decode([HeaderInt].self, forKey: .shape).map(\.value)
            dataOffsets = try c.decode([HeaderInt].self, forKey: .dataOffsets).map(\.value)
        }
    }

    /// An integer of a tensor's entry (a dimension, an offset). A number that is not one, or
    /// does not fit in Int, is named as written with its field (the decoder's own error names
    /// neither the field nor the tensor).
    struct HeaderInt: Decodable {
        var value: Int
        init(from decoder: Decoder) throws {
            let c = try decoder.singleValueContainer()
            do {
                value = try c.decode(Int.self)
            } catch let e as DecodingError {
                throw e
            } catch {
                // Foundation's parser: numberIsNotRepresentableInSwift(parsed: "304128.5").
                let text = "\(error)"
                var written: String?
                if let open = text.range(of: "parsed: \""), let close = text[open.upperBound...].firstIndex(of: "\"") {
                    written = String(text[open.upperBound..<close])
                }
                written = written ?? (try? c.decode(Double.self)).map { "\($0)" }
                let field = SafeTensorsHeaderParser.field(decoder.codingPath, skipping: 1)
                guard let written else { throw Problem(detail: "\(field) is not an integer") }
                let integral = !written.contains(where: { $0 == "." || $0 == "e" || $0 == "E" })
                    || Double(written).map { $0.isFinite && $0 == $0.rounded() } == true
                throw Problem(detail: "\(field) is \(written), \(integral ? "which does not fit in a 64-bit integer" : "not an integer")")
            }
        }
    }

    struct Parsed: Decodable {
        var metadata: [String: String] = [:]
        var tensors: [(String, Tensor)] = []

        init(from decoder: Decoder) throws {
            let c = try decoder.container(keyedBy: SafeTensorsKey.self)
            for key in c.allKeys {
                if key.stringValue == "__metadata__" {
                    if try c.decodeNil(forKey: key) { continue }
                    do {
                        metadata = try c.decode([String: String].self, forKey: key)
                    } catch {
                        throw Problem(detail: "__metadata__ must be an object of string values: \(SafeTensorsHeaderParser.describe(error, skipping: 1))")
                    }
                } else {
                    do {
                        tensors.append((key.stringValue, try c.decode(Tensor.self, forKey: key)))
                    } catch {
                        throw Problem(detail: "tensor '\(key.stringValue)': \(SafeTensorsHeaderParser.describe(error, skipping: 1))")
                    }
                }
            }
        }
    }

    struct Problem: Error { var detail: String }

    static func parse(_ json: Data, path: String) throws -> Parsed {
        guard json.first(where: { $0 != 0x20 && $0 != 0x0A && $0 != 0x0D && $0 != 0x09 }) == UInt8(ascii: "{") else {
            throw CheckpointError.invalidHeader(path: path, detail: "header is not a JSON object")
        }
        do {
            return try JSONDecoder().decode(Parsed.self, from: json)
        } catch let p as Problem {
            throw CheckpointError.invalidHeader(path: path, detail: p.detail)
        } catch {
            throw CheckpointError.invalidHeader(path: path, detail: "header is not valid JSON: \(describe(error, skipping: 0))")
        }
    }

    /// A short description of a decoding error; `skipping` leading coding-path components
    /// (the tensor name) are left out of the field path.
    static func field(_ path: [CodingKey], skipping: Int) -> String {
        var name = ""
        for key in path.dropFirst(skipping) {
            if let i = key.intValue { name += "[\(i)]" } else { name += (name.isEmpty ? "" : ".") + key.stringValue }
        }
        return name.isEmpty ? (skipping == 0 ? "value" : "the entry") : "field '" + name + "'"
    }

    static func describe(_ error: Error, skipping: Int) -> String {
        func field(_ path: [CodingKey]) -> String { Self.field(path, skipping: skipping) }
        if let p = error as? Problem { return p.detail }
        guard let e = error as? DecodingError else { return String(describing: error) }
        switch e {
        case .keyNotFound(let key, let ctx):
            return "missing \(field(ctx.codingPath + [key]))"
        case .typeMismatch(let type, let ctx):
            let name = "\(type)"
            let expected = name.hasPrefix("Dictionary<") ? "an object" : name.hasPrefix("Array<") ? "an array"
                : name == "Int" ? "an integer" : name == "String" ? "a string" : "of the expected type (\(name))"
            // "Expected to decode Int but found bool instead."
            var found = ""
            if let r = ctx.debugDescription.range(of: "but found "), let end = ctx.debugDescription.range(of: " instead", range: r.upperBound..<ctx.debugDescription.endIndex) {
                found = " (found \(ctx.debugDescription[r.upperBound..<end.lowerBound]))"
            }
            return "\(field(ctx.codingPath)) is not \(expected)\(found)"
        case .valueNotFound(_, let ctx):
            return "\(field(ctx.codingPath)) is null"
        case .dataCorrupted(let ctx):
            var s = ctx.debugDescription
            if let u = ctx.underlyingError { s += " (\(u.localizedDescription))" }
            return ctx.codingPath.count > skipping ? "\(field(ctx.codingPath)): \(s)" : s
        @unknown default:
            return String(describing: e)
        }
    }
}

private struct SafeTensorsKey: CodingKey {
    var stringValue: String
    var intValue: Int? { nil }
    init(stringValue: String) { self.stringValue = stringValue }
    init?(intValue: Int) { nil }
}

// MARK: - Reading a sharded checkpoint

/// A checkpoint split over several safetensors files, described by
/// `model.safetensors.index.json` (`{"metadata": {...}, "weight_map": {tensor: file}}`).
/// Shards are opened (memory-mapped) only when one of their tensors is first asked for.
public final class ShardedSafeTensors: TensorSource, @unchecked Sendable {
    /// The directory holding the index and the shards.
    public let path: String
    public let indexPath: String
    /// Tensor names grouped by shard (shards in file-name order), sorted by name within a shard.
    public let tensorNames: [String]
    /// The index's `metadata`, with numbers and booleans written out as text.
    public let metadata: [String: String]
    /// Tensor name -> shard file name.
    public let weightMap: [String: String]
    /// Shard file names in order.
    public let shardFiles: [String]
    private let lock = NSLock()
    private var opened: [String: SafeTensorsFile] = [:]

    public static let indexFileName = "model.safetensors.index.json"
    public static let singleFileName = "model.safetensors"

    public init(directory: String, indexFileName: String = ShardedSafeTensors.indexFileName) throws {
        path = directory
        indexPath = directory + "/" + indexFileName
        let file = try MappedFile(path: indexPath)
        let bytes = try file.bytes(at: 0, count: file.size, what: "index")
        struct Index: Decodable {
            var metadata: [String: Scalar]?
            var weight_map: [String: String]
        }
        let index: Index
        do {
            index = try JSONDecoder().decode(Index.self, from: Data(bytes))
        } catch {
            throw CheckpointError.invalidHeader(path: indexPath, detail: "not a valid safetensors index: \(SafeTensorsHeaderParser.describe(error, skipping: 0))")
        }
        var meta: [String: String] = [:]
        for (k, v) in index.metadata ?? [:] { if let s = v.text { meta[k] = s } }
        metadata = meta
        weightMap = index.weight_map
        var byShard: [String: [String]] = [:]
        for (tensor, shard) in index.weight_map {
            guard !shard.isEmpty, !shard.contains("/"), shard != ".", shard != ".." else {
                throw CheckpointError.invalidField(path: indexPath, field: "weight_map.\(tensor)", detail: "names '\(shard)', expected a file name in the same directory")
            }
            byShard[shard, default: []].append(tensor)
        }
        let shards = byShard.keys.sorted { $0.utf8.lexicographicallyPrecedes($1.utf8) }
        for shard in shards {
            var st = stat()
            if stat(directory + "/" + shard, &st) != 0 {
                let reason = AtomicFile.osReason(errno)
                let example = byShard[shard]!.min { $0.utf8.lexicographicallyPrecedes($1.utf8) }!
                throw CheckpointError.io(path: directory + "/" + shard, detail: "shard listed in \(indexPath) (for '\(example)' and \(byShard[shard]!.count - 1) more) cannot be opened: \(reason)")
            }
        }
        shardFiles = shards
        tensorNames = shards.flatMap { s in byShard[s]!.sorted { $0.utf8.lexicographicallyPrecedes($1.utf8) } }
    }

    /// Opens the checkpoint in `directory`: `model.safetensors` when present, otherwise the
    /// sharded checkpoint described by `model.safetensors.index.json`. A path to a single
    /// `.safetensors` file, or to an `*.index.json` file, is opened directly.
    public static func open(directory: String) throws -> any TensorSource {
        var st = stat()
        guard stat(directory, &st) == 0 else {
            throw CheckpointError.io(path: directory, detail: "cannot open: \(AtomicFile.osReason(errno))")
        }
        if (st.st_mode & S_IFMT) != S_IFDIR {
            if directory.hasSuffix(".index.json") {
                let (dir, name) = AtomicFile.split(directory)
                return try ShardedSafeTensors(directory: dir, indexFileName: name)
            }
            return try SafeTensorsFile(path: directory)
        }
        if stat(directory + "/" + singleFileName, &st) == 0 {
            return try SafeTensorsFile(path: directory + "/" + singleFileName)
        }
        if stat(directory + "/" + indexFileName, &st) == 0 {
            return try ShardedSafeTensors(directory: directory)
        }
        throw CheckpointError.io(path: directory, detail: "contains neither \(singleFileName) nor \(indexFileName)")
    }

    /// The shard file `name`, opened on first use.
    public func shard(_ name: String) throws -> SafeTensorsFile {
        lock.lock()
        defer { lock.unlock() }
        if let f = opened[name] { return f }
        let f = try SafeTensorsFile(path: path + "/" + name)
        opened[name] = f
        return f
    }

    /// The tensor's entry (its offset is within its shard). Opens the shard; nil when the
    /// tensor is not listed or its shard cannot be opened (`load` reports why).
    public func entry(_ name: String) -> TensorEntry? {
        guard let s = weightMap[name], let f = try? shard(s) else { return nil }
        return f.entry(name)
    }

    public func load(_ name: String) throws -> Matrix {
        guard let s = weightMap[name] else { throw CheckpointError.missingTensor(path: indexPath, tensor: name) }
        return try shard(s).load(name)
    }

    public func load(_ name: String, rows: Range<Int>) throws -> Matrix {
        guard let s = weightMap[name] else { throw CheckpointError.missingTensor(path: indexPath, tensor: name) }
        return try shard(s).load(name, rows: rows)
    }

    public func prefetch(_ name: String) {
        if let s = weightMap[name], let f = try? shard(s) { f.prefetch(name) }
    }

    /// A JSON scalar in the index metadata.
    struct Scalar: Decodable {
        var text: String?
        init(from decoder: Decoder) throws {
            let c = try decoder.singleValueContainer()
            if let i = try? c.decode(Int.self) { text = String(i) }
            else if let d = try? c.decode(Double.self) { text = String(d) }
            else if let b = try? c.decode(Bool.self) { text = String(b) }
            else if let s = try? c.decode(String.self) { text = s }
            else { text = nil }
        }
    }
}

// MARK: - Writing

/// Writes named tensors as safetensors: one `model.safetensors`, or, when the data exceed
/// `maxShardBytes`, `model-00001-of-0000K.safetensors` shards plus `model.safetensors.index.json`.
///
/// Output is deterministic: header keys sorted (byte order), tensors laid out in sorted-name
/// order, header padded with spaces to a multiple of 8 bytes. `__metadata__` holds
/// `"format": "pt"` plus the caller's entries. Files are written through `AtomicFile`, one
/// tensor at a time; tensors added with a `produce` closure are computed only when written.
public struct SafeTensorsWriter {
    public let directory: String
    public let maxShardBytes: Int?
    public let metadata: [String: String]
    /// When set, the checkpoint is always sharded, with the files this layout gives (to keep a
    /// source checkpoint's layout); `maxShardBytes` is then not used.
    public var layout: ShardLayout?
    /// Whether the index's metadata also gives `total_parameters` (the elements of all tensors),
    /// as transformers 5 writes it.
    public var indexHasTotalParameters = false
    /// Weight files go to disk as they are written, and out of the page cache
    /// (`AtomicFile.write(to:streaming:)`): for an output model, which this process does not
    /// read again and which is often larger than the machine's free memory.
    public var streamsToDisk = false
    /// When set, fed the bytes of every safetensors file written, in the order `finish` returns
    /// them: the SHA-256 of their concatenation without reading them back.
    public var weightsDigest: SHA256Stream?
    private var pending: [Pending] = []
    private var names: Set<String> = []

    struct Pending {
        var name: String
        var shape: [Int]
        var dtype: TensorDType
        var count: Int
        var byteCount: Int
        var values: Values
    }

    /// Where a tensor's values come from when it is written.
    enum Values {
        /// All of them at once.
        case whole(() throws -> Matrix)
        /// Pieces of at most `rows` rows along the outermost dimension, one call a piece.
        case pieces(rows: Int, (Range<Int>) throws -> Matrix)
    }

    /// - Parameters:
    ///   - directory: created if missing.
    ///   - maxShardBytes: largest amount of tensor data per file; nil writes one file.
    ///   - metadata: extra `__metadata__` entries (a "format" entry replaces "pt").
    public init(directory: String, maxShardBytes: Int? = nil, metadata: [String: String] = [:]) {
        self.directory = directory
        self.maxShardBytes = maxShardBytes
        self.metadata = metadata
    }

    /// Adds a tensor; `shape` (outermost first) defaults to `[rows, cols]` and must hold
    /// exactly the matrix's elements. `dtype` is F32, F16 or BF16 (16-bit types are rounded to
    /// nearest even).
    public mutating func add(name: String, matrix: Matrix, shape: [Int]? = nil, dtype: TensorDType = .f32) throws {
        let shape = shape ?? [matrix.rows, matrix.cols]
        let count = try check(name: name, shape: shape, dtype: dtype)
        guard count == matrix.count else {
            throw CheckpointError.shapeMismatch(path: directory, tensor: name, expected: "\(shape) (\(count) values)", found: "\(matrix.rows)x\(matrix.cols) (\(matrix.count) values)")
        }
        append(name: name, shape: shape, dtype: dtype, count: count, values: .whole { matrix })
    }

    /// Adds a tensor whose values `produce` returns when the file is written (so callers can
    /// stream tensors from disk). The result must hold exactly `shape`'s element count.
    public mutating func add(name: String, shape: [Int], dtype: TensorDType = .f32, produce: @escaping () throws -> Matrix) throws {
        let count = try check(name: name, shape: shape, dtype: dtype)
        append(name: name, shape: shape, dtype: dtype, count: count, values: .whole(produce))
    }

    /// Adds a tensor that is written in pieces of at most `rows` rows along its outermost
    /// dimension: `produce(range)` returns those rows ([range.count x the rest]) when they are
    /// written, so a large tensor is never held whole (the pieces' bytes are the tensor's bytes).
    public mutating func add(name: String, shape: [Int], dtype: TensorDType = .f32, rows: Int,
                             produce: @escaping (Range<Int>) throws -> Matrix) throws {
        let count = try check(name: name, shape: shape, dtype: dtype)
        guard rows > 0, shape.count >= 2 else {
            throw CheckpointError.shapeMismatch(path: directory, tensor: name, expected: "a tensor of at least two dimensions in pieces of at least one row",
                                                found: "shape \(shape), \(rows) rows a piece")
        }
        append(name: name, shape: shape, dtype: dtype, count: count, values: .pieces(rows: rows, produce))
    }

    /// Total bytes of tensor data added so far.
    public var totalBytes: Int { pending.reduce(0) { $0 + $1.byteCount } }

    /// Writes the checkpoint and returns the paths written (the index last, when sharded).
    /// A stale `model.safetensors` or index that would make the directory ambiguous is removed.
    public func finish() throws -> [String] {
        try makeDirectory()
        let sorted = pending.sorted { $0.name.utf8.lexicographicallyPrecedes($1.name.utf8) }
        let total = totalBytes
        let single = directory + "/" + ShardedSafeTensors.singleFileName
        let indexPath = directory + "/" + ShardedSafeTensors.indexFileName
        if let layout {
            return try writeShards(layout.shards(of: sorted, bytes: \.byteCount, name: \.name), total: total)
        }
        if maxShardBytes == nil || total <= maxShardBytes! || sorted.count <= 1 {
            try Self.writeFile(path: single, tensors: sorted, metadata: fileMetadata, streaming: streamsToDisk, digest: weightsDigest)
            try removeIfPresent(indexPath)
            return [single]
        }
        // Greedy packing in name order; a tensor larger than the limit gets a shard to itself.
        let limit = max(maxShardBytes!, 1)
        var shards: [[Pending]] = []
        var current: [Pending] = []
        var currentBytes = 0
        for t in sorted {
            if !current.isEmpty && currentBytes + t.byteCount > limit {
                shards.append(current)
                current = []
                currentBytes = 0
            }
            current.append(t)
            currentBytes += t.byteCount
        }
        if !current.isEmpty { shards.append(current) }
        let named = shards.enumerated().map { i, shard in (ShardLayout.standardName(i, of: shards.count), shard) }
        return try writeShards(named, total: total)
    }

    /// Writes `shards` (file name and tensors, in file order) and the index; returns the paths
    /// written, the index last.
    private func writeShards(_ shards: [(String, [Pending])], total: Int) throws -> [String] {
        let single = directory + "/" + ShardedSafeTensors.singleFileName
        let indexPath = directory + "/" + ShardedSafeTensors.indexFileName
        // Without an index a half-written set of shards is never mistaken for a checkpoint.
        try removeIfPresent(indexPath)
        try removeIfPresent(single)
        var written: [String] = []
        var weightMap: [(String, String)] = []
        for (name, shard) in shards {
            guard !name.isEmpty, !name.contains("/"), name != ShardedSafeTensors.singleFileName,
                  name != ShardedSafeTensors.indexFileName, name.hasSuffix(".safetensors") else {
                throw CheckpointError.invalidField(path: directory, field: "shard name", detail: "'\(name)' is not a safetensors file name in the output directory")
            }
            let p = directory + "/" + name
            let sorted = shard.sorted { $0.name.utf8.lexicographicallyPrecedes($1.name.utf8) }
            try Self.writeFile(path: p, tensors: sorted, metadata: fileMetadata, streaming: streamsToDisk, digest: weightsDigest)
            written.append(p)
            for t in shard { weightMap.append((t.name, name)) }
        }
        weightMap.sort { $0.0.utf8.lexicographicallyPrecedes($1.0.utf8) }
        var json = "{\n  \"metadata\": {\n"
        var metaLines = metadata.map { (k, v) in (k, Self.jsonString(v)) }
        metaLines.append(("total_size", String(total)))
        if indexHasTotalParameters { metaLines.append(("total_parameters", String(pending.reduce(0) { $0 + $1.count }))) }
        metaLines.sort { $0.0.utf8.lexicographicallyPrecedes($1.0.utf8) }
        json += metaLines.map { "    \(Self.jsonString($0.0)): \($0.1)" }.joined(separator: ",\n")
        json += "\n  },\n  \"weight_map\": {\n"
        json += weightMap.map { "    \(Self.jsonString($0.0)): \(Self.jsonString($0.1))" }.joined(separator: ",\n")
        json += "\n  }\n}\n"
        try AtomicFile.write(Data(json.utf8), to: indexPath)
        written.append(indexPath)
        return written
    }

    /// Writes every tensor added into one safetensors file at `path`, whatever `maxShardBytes`.
    public func writeSingleFile(to path: String) throws {
        let sorted = pending.sorted { $0.name.utf8.lexicographicallyPrecedes($1.name.utf8) }
        try Self.writeFile(path: path, tensors: sorted, metadata: fileMetadata, streaming: streamsToDisk, digest: weightsDigest)
    }

    // MARK: Internals

    private var fileMetadata: [String: String] {
        var m = ["format": "pt"]
        for (k, v) in metadata { m[k] = v }
        return m
    }

    private func check(name: String, shape: [Int], dtype: TensorDType) throws -> Int {
        guard !name.isEmpty, name != "__metadata__" else {
            throw CheckpointError.invalidField(path: directory, field: "tensor name", detail: "'\(name)' cannot be used as a tensor name")
        }
        guard !names.contains(name) else {
            throw CheckpointError.invalidField(path: directory, field: name, detail: "was added twice")
        }
        guard dtype == .f32 || dtype == .f16 || dtype == .bf16 else {
            throw CheckpointError.unsupportedType(path: directory, tensor: name, type: dtype.rawValue)
        }
        guard let count = ShapeMath.elementCount(shape), dtype.byteCount(elements: count) != nil else {
            throw CheckpointError.invalidField(path: directory, field: name, detail: "has invalid shape \(shape)")
        }
        return count
    }

    private mutating func append(name: String, shape: [Int], dtype: TensorDType, count: Int, values: Values) {
        names.insert(name)
        pending.append(Pending(name: name, shape: shape, dtype: dtype, count: count, byteCount: dtype.byteCount(elements: count)!, values: values))
    }

    private func makeDirectory() throws {
        do {
            try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        } catch {
            throw CheckpointError.io(path: directory, detail: "cannot create directory: \(error.localizedDescription)")
        }
    }

    private func removeIfPresent(_ path: String) throws {
        if unlink(path) != 0 && errno != ENOENT {
            throw CheckpointError.io(path: path, detail: "cannot remove stale file: \(AtomicFile.osReason(errno))")
        }
    }

    /// The header (length prefix excluded) for `tensors` laid out back to back in the given order.
    static func header(tensors: [Pending], metadata: [String: String]) -> [UInt8] {
        var items: [(String, String)] = []
        var meta = metadata.map { (k, v) in (k, v) }
        meta.sort { $0.0.utf8.lexicographicallyPrecedes($1.0.utf8) }
        items.append(("__metadata__", "{" + meta.map { jsonString($0.0) + ":" + jsonString($0.1) }.joined(separator: ",") + "}"))
        var offset = 0
        for t in tensors {
            let shape = t.shape.map(String.init).joined(separator: ",")
            items.append((t.name, "{\"data_offsets\":[\(offset),\(offset + t.byteCount)],\"dtype\":\"\(t.dtype.rawValue)\",\"shape\":[\(shape)]}"))
            offset += t.byteCount
        }
        items.sort { $0.0.utf8.lexicographicallyPrecedes($1.0.utf8) }
        var bytes = Array(("{" + items.map { jsonString($0.0) + ":" + $0.1 }.joined(separator: ",") + "}").utf8)
        while bytes.count % 8 != 0 { bytes.append(0x20) }
        return bytes
    }

    static func writeFile(path: String, tensors: [Pending], metadata: [String: String], streaming: Bool = false,
                          digest: SHA256Stream? = nil) throws {
        let header = header(tensors: tensors, metadata: metadata)
        let dataBytes = tensors.reduce(0) { $0 + $1.byteCount }
        try AtomicFile.write(to: path, streaming: streaming, digest: digest) { w in
            var length = UInt64(header.count).littleEndian
            try withUnsafeBytes(of: &length) { try w.write($0) }
            try w.write(header)
            /// Writes `m`'s values as `dtype`.
            func put(_ m: Matrix, _ dtype: TensorDType) throws {
                try m.withUnsafeBufferPointer { src in
                    switch dtype {
                    case .f16:
                        try w.writeConverted(count: src.count, elementSize: 2) { range, p in
                            HalfPrecision.floatsToFP16(src.baseAddress! + range.lowerBound, count: range.count, into: p)
                        }
                    case .bf16:
                        try w.writeConverted(count: src.count, elementSize: 2) { range, p in
                            HalfPrecision.floatsToBF16(src.baseAddress! + range.lowerBound, count: range.count, into: p)
                        }
                    default:
                        try w.write(floats: src)
                    }
                }
            }
            for t in tensors {
                switch t.values {
                case .whole(let produce):
                    let m = try produce()
                    guard m.count == t.count else {
                        throw CheckpointError.shapeMismatch(path: path, tensor: t.name, expected: "\(t.shape) (\(t.count) values)", found: "\(m.rows)x\(m.cols) (\(m.count) values)")
                    }
                    try put(m, t.dtype)
                case .pieces(let piece, let produce):
                    // No values, no pieces (t.shape[0] may be nonzero with another dimension 0).
                    guard t.count > 0 else { continue }
                    let (rows, width) = (t.shape[0], t.count / t.shape[0])
                    for start in stride(from: 0, to: rows, by: piece) {
                        let range = start..<min(start + piece, rows)
                        let m = try produce(range)
                        guard m.count == range.count * width else {
                            throw CheckpointError.shapeMismatch(path: path, tensor: t.name, expected: "rows \(range) of \(t.shape) (\(range.count * width) values)",
                                                                found: "\(m.rows)x\(m.cols) (\(m.count) values)")
                        }
                        try put(m, t.dtype)
                    }
                }
            }
            let expected = 8 + header.count + dataBytes
            guard w.bytesWritten == expected else {
                throw CheckpointError.io(path: path, detail: "internal error: wrote \(w.bytesWritten) bytes, expected \(expected)")
            }
        }
    }

    static func pad5(_ n: Int) -> String {
        let s = String(n)
        return s.count >= 5 ? s : String(repeating: "0", count: 5 - s.count) + s
    }

    /// `s` as a JSON string literal (UTF-8 kept as is, control characters escaped).
    static func jsonString(_ s: String) -> String {
        var out = "\""
        for u in s.unicodeScalars {
            switch u {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            default:
                if u.value < 0x20 {
                    let h = String(u.value, radix: 16)
                    out += "\\u" + String(repeating: "0", count: 4 - h.count) + h
                } else {
                    out.unicodeScalars.append(u)
                }
            }
        }
        return out + "\""
    }
}

/// How a sharded checkpoint's tensors are spread over files when the writer is told (to keep a
/// source checkpoint's layout) rather than packing by size.
public enum ShardLayout: Sendable, Equatable {
    /// Each tensor goes to the file `assignment` names; `files` gives the files' order. A tensor
    /// not in `assignment` goes to the last file. Files left with no tensor are not written.
    case files([String], assignment: [String: String])
    /// `count` files (model-00001-of-0000N.safetensors, ...), or as many as there are tensors if
    /// fewer: the tensors in `order` (tensors not in it follow, by name) are cut into contiguous
    /// runs of about equal bytes, none empty.
    case count(Int, order: [String])

    /// transformers' name for shard `index` (0-based) of `count`.
    public static func standardName(_ index: Int, of count: Int) -> String {
        "model-\(SafeTensorsWriter.pad5(index + 1))-of-\(SafeTensorsWriter.pad5(count)).safetensors"
    }

    /// The shards (file name, items) for `items`, which come sorted by name.
    func shards<T>(of items: [T], bytes: (T) -> Int, name: (T) -> String) -> [(String, [T])] {
        switch self {
        case .files(let files, let assignment):
            guard let last = files.last else { return items.isEmpty ? [] : [(Self.standardName(0, of: 1), items)] }
            var groups: [String: [T]] = [:]
            for item in items { groups[assignment[name(item)] ?? last, default: []].append(item) }
            var order = files
            for f in groups.keys.sorted() where !files.contains(f) { order.append(f) }
            return order.compactMap { f in groups[f].map { (f, $0) } }
        case .count(let requested, let order):
            guard !items.isEmpty else { return [] }
            let rank = Dictionary(order.enumerated().map { ($1, $0) }, uniquingKeysWith: { a, _ in a })
            // `items` are in name order, so a stable sort puts unlisted tensors last, by name.
            let ordered = items.enumerated().sorted { a, b in
                let ra = rank[name(a.element)] ?? Int.max, rb = rank[name(b.element)] ?? Int.max
                return ra != rb ? ra < rb : a.offset < b.offset
            }.map(\.element)
            let n = max(1, min(requested, ordered.count))
            let total = ordered.reduce(0) { $0 + bytes($1) }
            var groups: [[T]] = Array(repeating: [], count: n)
            var k = 0, before = 0
            for (i, item) in ordered.enumerated() {
                let b = bytes(item)
                if k < n - 1, !groups[k].isEmpty {
                    // Move on when this tensor's middle lies past shard k's share of the bytes, or when
                    // every tensor left is needed to give each remaining shard one.
                    let pastShare = (2 * before + b) * n > 2 * total * (k + 1)
                    let needed = ordered.count - i <= n - 1 - k
                    if pastShare || needed { k += 1 }
                }
                groups[k].append(item)
                before += b
            }
            return groups.enumerated().map { (Self.standardName($0, of: n), $1) }
        }
    }
}
