import TopiaryTensor

/// Message types on the wire. Unknown values are refused at the frame header.
public enum MessageType: UInt16, Sendable, CaseIterable, CustomStringConvertible {
    case hello = 1, challenge = 2, proof = 3, welcome = 4, error = 5, heartbeat = 6
    case tensorHeader = 20, tensorChunk = 21
    case assign = 30, blockResult = 31, rangeDone = 32, shutdown = 33
    case peerJoin = 40, replica = 41

    public var description: String {
        switch self {
        case .hello: return "hello"
        case .challenge: return "challenge"
        case .proof: return "proof"
        case .welcome: return "welcome"
        case .error: return "error"
        case .heartbeat: return "heartbeat"
        case .tensorHeader: return "tensor-header"
        case .tensorChunk: return "tensor-chunk"
        case .assign: return "assign"
        case .blockResult: return "block-result"
        case .rangeDone: return "range-done"
        case .shutdown: return "shutdown"
        case .peerJoin: return "peer-join"
        case .replica: return "replica"
        }
    }
}

/// Element types of tensors on the wire.
public enum WireDType: UInt8, Sendable, CaseIterable {
    case f32 = 0, f16 = 1, bf16 = 2
    public var size: Int { self == .f32 ? 4 : 2 }
}

/// The messages, decoded. `encode` and `decode` are exact inverses (tested for every case).
public enum Message: Equatable, Sendable {
    public static let nonceBytes = 32
    public static let macBytes = 32

    /// Opens a connection: the versions the sender speaks and its nonce.
    case hello(minVersion: UInt16, maxVersion: UInt16, role: UInt8, nonce: [UInt8], name: String)
    /// The listener's answer: chosen version, its nonce, and its proof of the secret.
    case challenge(version: UInt16, nonce: [UInt8], mac: [UInt8])
    /// The connecting side's proof of the secret.
    case proof(mac: [UInt8])
    case welcome(name: String)
    case error(code: UInt16, message: String)
    case heartbeat(sequence: UInt64)
    /// Announces a tensor of `byteCount` bytes that follows in chunks on `stream`.
    case tensorHeader(stream: UInt32, name: String, dtype: WireDType, shape: [Int], byteCount: UInt64)
    case tensorChunk(stream: UInt32, offset: UInt64, bytes: [UInt8])
    /// A range of blocks to prune: the job as JSON (small; the bulk, activations, travels as
    /// tensors), then `tensors` boundary tensors follow.
    case assign(job: [UInt8], tensors: UInt32)
    /// Block `block` is done; `tensors` tensors of its pruned weights follow; report as JSON.
    case blockResult(block: UInt32, tensors: UInt32, report: [UInt8])
    /// The range is done; `tensors` boundary tensors (the activations after it) follow.
    case rangeDone(tensors: UInt32)
    case shutdown
    /// A replica joining a stage's mesh: the first message on a connection one replica opens to another.
    case peerJoin(group: String, rank: UInt32)
    /// A message between replicas (`ReplicaKey`); form 0: absent, 1: a tensor follows, 2: `bytes`, 3: goodbye.
    case replica(block: UInt32, kind: UInt8, name: String, index: UInt32, form: UInt8, bytes: [UInt8])

    public var type: MessageType {
        switch self {
        case .hello: return .hello
        case .challenge: return .challenge
        case .proof: return .proof
        case .welcome: return .welcome
        case .error: return .error
        case .heartbeat: return .heartbeat
        case .tensorHeader: return .tensorHeader
        case .tensorChunk: return .tensorChunk
        case .assign: return .assign
        case .blockResult: return .blockResult
        case .rangeDone: return .rangeDone
        case .shutdown: return .shutdown
        case .peerJoin: return .peerJoin
        case .replica: return .replica
        }
    }

    public func frame() -> Frame { Frame(type: type, payload: encodedPayload()) }

    public func encodedPayload() -> [UInt8] {
        var w = ByteWriter()
        switch self {
        case .hello(let lo, let hi, let role, let nonce, let name):
            w.u16(lo); w.u16(hi); w.u8(role); w.bytes(nonce); w.string(name)
        case .challenge(let version, let nonce, let mac):
            w.u16(version); w.bytes(nonce); w.bytes(mac)
        case .proof(let mac):
            w.bytes(mac)
        case .welcome(let name):
            w.string(name)
        case .error(let code, let message):
            w.u16(code); w.string(message)
        case .heartbeat(let sequence):
            w.u64(sequence)
        case .tensorHeader(let stream, let name, let dtype, let shape, let byteCount):
            w.u32(stream); w.string(name); w.u8(dtype.rawValue); w.u8(UInt8(shape.count))
            for d in shape { w.u64(UInt64(d)) }
            w.u64(byteCount)
        case .tensorChunk(let stream, let offset, let bytes):
            w.u32(stream); w.u64(offset); w.bytes(bytes)
        case .assign(let job, let tensors):
            w.u32(tensors); w.blob(job)
        case .blockResult(let block, let tensors, let report):
            w.u32(block); w.u32(tensors); w.blob(report)
        case .rangeDone(let tensors):
            w.u32(tensors)
        case .shutdown:
            break
        case .peerJoin(let group, let rank):
            w.string(group); w.u32(rank)
        case .replica(let block, let kind, let name, let index, let form, let bytes):
            w.u32(block); w.u8(kind); w.string(name); w.u32(index); w.u8(form); w.blob(bytes)
        }
        return w.data
    }

    /// Decodes a frame's payload, checking every field.
    public static func decode(_ frame: Frame) throws -> Message {
        try frame.payload.withUnsafeBytes { raw in
            var r = ByteCursor(raw, message: frame.type.description)
            let m: Message
            switch frame.type {
            case .hello:
                let lo = try r.u16("min_version"), hi = try r.u16("max_version")
                guard lo <= hi else { throw WireError.malformed(message: "hello", field: "min_version", detail: "is \(lo), above max_version \(hi)") }
                let role = try r.u8("role")
                guard role <= 1 else { throw WireError.malformed(message: "hello", field: "role", detail: "is \(role), expected 0 (coordinator) or 1 (worker)") }
                m = .hello(minVersion: lo, maxVersion: hi, role: role, nonce: try r.bytes(nonceBytes, "nonce"), name: try r.string("name", maxBytes: 256))
            case .challenge:
                m = .challenge(version: try r.u16("version"), nonce: try r.bytes(nonceBytes, "nonce"), mac: try r.bytes(macBytes, "mac"))
            case .proof:
                m = .proof(mac: try r.bytes(macBytes, "mac"))
            case .welcome:
                m = .welcome(name: try r.string("name", maxBytes: 256))
            case .error:
                m = .error(code: try r.u16("code"), message: try r.string("message", maxBytes: 64 << 10))
            case .heartbeat:
                m = .heartbeat(sequence: try r.u64("sequence"))
            case .tensorHeader:
                let stream = try r.u32("stream")
                let name = try r.string("name", maxBytes: 1024)
                let code = try r.u8("dtype")
                guard let dtype = WireDType(rawValue: code) else {
                    throw WireError.malformed(message: "tensor-header", field: "dtype", detail: "is \(code), expected 0 (f32), 1 (f16) or 2 (bf16)")
                }
                let rank = Int(try r.u8("rank"))
                guard rank >= 1 && rank <= 4 else { throw WireError.malformed(message: "tensor-header", field: "rank", detail: "is \(rank), expected 1 to 4") }
                var shape: [Int] = []
                var elements: UInt64 = 1
                for i in 0..<rank {
                    let d = try r.u64("shape[\(i)]")
                    guard d <= 1 << 40 else { throw WireError.malformed(message: "tensor-header", field: "shape[\(i)]", detail: "is \(d), more than 2^40") }
                    let (product, overflow) = elements.multipliedReportingOverflow(by: d)
                    guard !overflow, product <= 1 << 40 else {
                        throw WireError.malformed(message: "tensor-header", field: "shape", detail: "has more than 2^40 elements")
                    }
                    elements = product
                    shape.append(Int(d))
                }
                let byteCount = try r.u64("byte_count")
                guard byteCount == elements * UInt64(dtype.size) else {
                    throw WireError.malformed(message: "tensor-header", field: "byte_count",
                                              detail: "is \(byteCount), expected \(elements * UInt64(dtype.size)) for shape \(shape) of \(dtype)")
                }
                m = .tensorHeader(stream: stream, name: name, dtype: dtype, shape: shape, byteCount: byteCount)
            case .tensorChunk:
                let (stream, offset) = try TensorStream.chunkPrefix(&r)
                m = .tensorChunk(stream: stream, offset: offset, bytes: try r.bytes(r.remaining, "bytes"))
            case .assign:
                let tensors = try r.u32("tensors")
                m = .assign(job: try r.blob("job", maxBytes: 1 << 20), tensors: tensors)
            case .blockResult:
                let block = try r.u32("block"), tensors = try r.u32("tensors")
                m = .blockResult(block: block, tensors: tensors, report: try r.blob("report", maxBytes: 16 << 20))
            case .rangeDone:
                m = .rangeDone(tensors: try r.u32("tensors"))
            case .shutdown:
                m = .shutdown
            case .peerJoin:
                m = .peerJoin(group: try r.string("group", maxBytes: 256), rank: try r.u32("rank"))
            case .replica:
                let block = try r.u32("block"), kind = try r.u8("kind"), name = try r.string("name", maxBytes: 1024), index = try r.u32("index")
                let form = try r.u8("form")
                guard form <= 3 else { throw WireError.malformed(message: "replica", field: "form", detail: "is \(form), expected 0 (absent), 1 (tensor), 2 (bytes) or 3 (goodbye)") }
                m = .replica(block: block, kind: kind, name: name, index: index, form: form, bytes: try r.blob("bytes", maxBytes: 16 << 20))
            }
            try r.finish()
            return m
        }
    }
}

/// A tensor on the wire: one tensor-header message, then tensor-chunk messages of at most
/// `chunkBytes` (whole elements), at least one also for an empty tensor. Both the messages
/// built in memory (`messages`) and a connection's streaming send (`Connection.sendTensor`)
/// cut, encode and frame the chunks here.
public enum TensorStream {
    public static func messages(_ m: Matrix, name: String, shape: [Int]? = nil, dtype: WireDType = .f32, stream: UInt32,
                                chunkBytes: Int = 16 << 20) -> [Message] {
        let shape = shape ?? [m.rows, m.cols]
        var out: [Message] = [.tensorHeader(stream: stream, name: name, dtype: dtype, shape: shape, byteCount: UInt64(m.count * dtype.size))]
        forEachChunk(m, dtype: dtype, chunkBytes: chunkBytes) { offset, data in
            out.append(.tensorChunk(stream: stream, offset: UInt64(offset), bytes: Array(data)))
        }
        return out
    }

    /// Bytes of a tensor-chunk payload before its data: stream u32, offset u64.
    public static let chunkPrefixBytes = 12

    /// A chunk's size for `chunkBytes`: whole elements of `dtype`, at least one.
    static func chunkSize(_ chunkBytes: Int, dtype: WireDType) -> Int { max(dtype.size, chunkBytes / dtype.size * dtype.size) }

    /// Calls `body` with each chunk's byte offset and bytes, in order: f32 straight from the
    /// matrix's storage, f16/bf16 through one reusable conversion buffer (valid during the call).
    /// An empty tensor is one empty chunk.
    static func forEachChunk(_ m: Matrix, dtype: WireDType, chunkBytes: Int,
                             _ body: (Int, UnsafeRawBufferPointer) throws -> Void) rethrows {
        let total = m.count * dtype.size
        let chunk = chunkSize(chunkBytes, dtype: dtype)
        var converted = dtype == .f32 ? [] : [UInt8](repeating: 0, count: min(chunk, total))
        try m.withUnsafeBufferPointer { values in
            var offset = 0
            repeat {
                let n = min(chunk, total - offset)
                if dtype == .f32 {
                    try body(offset, UnsafeRawBufferPointer(start: values.baseAddress.map { UnsafeRawPointer($0) + offset }, count: n))
                } else {
                    converted.withUnsafeMutableBytes { out in
                        writeHalf(UnsafeBufferPointer(rebasing: values[(offset / 2)..<(offset / 2 + n / 2)]), dtype: dtype, into: out)
                    }
                    try converted.withUnsafeBytes { try body(offset, UnsafeRawBufferPointer(rebasing: $0[0..<n])) }
                }
                offset += n
            } while offset < total
        }
    }

    /// The frame header and payload prefix of the tensor-chunk message carrying `data` at
    /// `offset` of `stream`: these bytes followed by `data` are exactly
    /// `Message.tensorChunk(stream:offset:bytes: data).frame().encoded()`.
    static func chunkFramePrefix(stream: UInt32, offset: Int, data: UnsafeRawBufferPointer) -> [UInt8] {
        var prefix = ByteWriter()
        prefix.u32(stream)
        prefix.u64(UInt64(offset))
        let crc = prefix.data.withUnsafeBytes { p in CRC32C.checksum(data, continuing: CRC32C.checksum(p)) }
        let header = FrameHeader(version: Protocol.version, type: MessageType.tensorChunk.rawValue, flags: 0,
                                 length: UInt64(prefix.data.count + data.count), checksum: crc)
        return header.encoded() + prefix.data
    }

    /// Reads a tensor-chunk payload's stream and offset.
    static func chunkPrefix(_ r: inout ByteCursor) throws -> (stream: UInt32, offset: UInt64) {
        let stream = try r.u32("stream"), offset = try r.u64("offset")
        return (stream, offset)
    }

    static func encode(_ m: Matrix, dtype: WireDType) -> [UInt8] {
        m.withUnsafeBufferPointer { p in
            if dtype == .f32 { return Array(UnsafeRawBufferPointer(p)) }
            var out = [UInt8](repeating: 0, count: p.count * 2)
            out.withUnsafeMutableBytes { writeHalf(UnsafeBufferPointer(rebasing: p[...]), dtype: dtype, into: $0) }
            return out
        }
    }

    /// Writes `values` as little-endian f16 or bf16 bits into `out` (2 bytes each), through the
    /// vector conversions (the bits of `HalfPrecision.floatToFP16` and `floatToBF16`).
    static func writeHalf(_ values: UnsafeBufferPointer<Float>, dtype: WireDType, into out: UnsafeMutableRawBufferPointer) {
        precondition(dtype != .f32 && out.count >= values.count * 2)
        guard let source = values.baseAddress, let destination = out.baseAddress else { return }
        if dtype == .f16 {
            HalfPrecision.floatsToFP16(source, count: values.count, into: destination)
        } else {
            HalfPrecision.floatsToBF16(source, count: values.count, into: destination)
        }
    }
}

/// Where a tensor's chunks have got to: each must be on the tensor's stream, at the next offset,
/// whole elements, and within the announced size. Both `TensorAssembler` (which keeps the
/// bytes) and `Connection.skipTensorBody` (which drains a refused job's tensors) check through it.
public struct TensorChunkOrder: Sendable {
    public let stream: UInt32
    public let name: String
    public let dtype: WireDType
    public let byteCount: UInt64
    public private(set) var received: UInt64 = 0

    public init(stream: UInt32, name: String, dtype: WireDType, byteCount: UInt64) {
        self.stream = stream
        self.name = name
        self.dtype = dtype
        self.byteCount = byteCount
    }

    public init(_ a: TensorAnnouncement) { self.init(stream: a.stream, name: a.name, dtype: a.dtype, byteCount: a.byteCount) }

    public var isComplete: Bool { received == byteCount }

    /// Checks a chunk of `n` bytes at `offset` on `stream`; it is then counted as received.
    public mutating func accept(stream: UInt32, offset: UInt64, byteCount n: Int) throws {
        guard stream == self.stream else {
            throw WireError.malformed(message: "tensor-chunk", field: "stream", detail: "is \(stream), expected \(self.stream) (tensor '\(name)')")
        }
        guard offset == received else {
            throw WireError.malformed(message: "tensor-chunk", field: "offset", detail: "is \(offset), expected \(received) (tensor '\(name)')")
        }
        guard n >= 0, UInt64(n) <= byteCount - received, n % dtype.size == 0 else {
            throw WireError.malformed(message: "tensor-chunk", field: "bytes",
                                      detail: "has \(n) bytes; \(byteCount - received) of tensor '\(name)' remain, in \(dtype.size)-byte elements")
        }
        received += UInt64(n)
    }
}

/// Reassembles a tensor from its header and chunks, checking that chunks arrive in order,
/// belong to the stream and add up to exactly the announced size.
///
/// A header is a claim, not bytes: storage is reserved for at most `initialCapacityBytes` of it
/// up front and grows (doubling) as chunks arrive, so a peer that announces a huge tensor and
/// sends little of it costs about what it sent, never what it announced.
public struct TensorAssembler {
    public let stream: UInt32
    public let name: String
    public let dtype: WireDType
    public let shape: [Int]
    public let byteCount: Int
    /// Storage reserved before any chunk arrives, at most (the default chunk size).
    public static let initialCapacityBytes = 16 << 20
    private let elements: Int
    /// Stream, offsets and sizes of the chunks so far.
    private var order: TensorChunkOrder
    private var received: Int { Int(order.received) }
    /// The elements received so far, in a flat 1 x capacity matrix (capacity <= elements).
    private var values: Matrix

    /// Checks the header: its shape against its byte count, and the tensor's f32 storage against
    /// `maxBytes` (what the receiver is prepared to hold), refusing with the field and the bound.
    public init(header: Message, maxBytes: Int = 4 << 30) throws {
        guard case .tensorHeader(let stream, let name, let dtype, let shape, let byteCount) = header else {
            throw WireError.unexpectedMessage(expected: "tensor-header", found: header.type.description)
        }
        // Message.decode checks these; a header built in memory gets the same checks.
        var count = 1
        for (i, d) in shape.enumerated() {
            guard d >= 0 else {
                throw WireError.malformed(message: "tensor-header", field: "shape[\(i)]", detail: "is \(d) in \(shape) of '\(name)', expected 0 or more")
            }
            let (product, overflow) = count.multipliedReportingOverflow(by: d)
            guard !overflow else {
                throw WireError.malformed(message: "tensor-header", field: "shape", detail: "\(shape) of '\(name)' has more elements than a 64-bit count holds")
            }
            count = product
        }
        let (bytes, overflow) = UInt64(count).multipliedReportingOverflow(by: UInt64(dtype.size))
        guard !overflow, byteCount == bytes else {
            throw WireError.malformed(message: "tensor-header", field: "byte_count",
                                      detail: "is \(byteCount), expected \(overflow ? "\(count) x \(dtype.size)" : "\(bytes)") for shape \(shape) of \(dtype)")
        }
        guard count <= maxBytes / 4 else {
            let f32 = count.multipliedReportingOverflow(by: 4)
            throw WireError.malformed(message: "tensor-header", field: "shape",
                                      detail: "\(shape) of '\(name)' needs \(f32.overflow ? "\(count) x 4" : "\(f32.partialValue)") bytes as f32, over the limit of \(maxBytes) bytes")
        }
        self.stream = stream
        self.name = name
        self.dtype = dtype
        self.shape = shape
        self.byteCount = Int(byteCount)
        order = TensorChunkOrder(stream: stream, name: name, dtype: dtype, byteCount: byteCount)
        elements = count
        values = Matrix(rows: 1, cols: min(count, Self.initialCapacityBytes / 4))
    }

    public var isComplete: Bool { received == byteCount }

    /// Grows the storage to hold `needed` elements, keeping the first `kept`: at least
    /// doubling, never past the tensor.
    private mutating func reserve(_ needed: Int, keeping kept: Int) {
        guard needed > values.count else { return }
        let capacity = min(elements, max(needed, 2 * values.count))
        var grown = Matrix(rows: 1, cols: capacity)
        grown.withUnsafeMutableBufferPointer { dst in
            values.withUnsafeBufferPointer { src in
                if kept > 0 { dst.baseAddress!.update(from: src.baseAddress!, count: kept) }
            }
        }
        values = grown
    }

    public mutating func add(_ chunk: Message) throws {
        guard case .tensorChunk(let stream, let offset, let bytes) = chunk else {
            throw WireError.unexpectedMessage(expected: "tensor-chunk", found: chunk.type.description)
        }
        try bytes.withUnsafeBytes { try add(stream: stream, offset: offset, bytes: $0) }
    }

    /// Adds a chunk's bytes straight from a receive buffer (no intermediate message).
    public mutating func add(stream: UInt32, offset: UInt64, bytes: UnsafeRawBufferPointer) throws {
        let first = received / dtype.size
        try order.accept(stream: stream, offset: offset, byteCount: bytes.count)
        let n = bytes.count / dtype.size
        reserve(first + n, keeping: first)
        let dtype = self.dtype
        values.withUnsafeMutableBufferPointer { dst in
            switch dtype {
            case .f32:
                // Little-endian host: the wire bytes are the floats.
                if n > 0 { UnsafeMutableRawPointer(dst.baseAddress! + first).copyMemory(from: bytes.baseAddress!, byteCount: n * 4) }
            case .f16:
                for i in 0..<n { dst[first + i] = HalfPrecision.fp16ToFloat(UInt16(littleEndian: bytes.loadUnaligned(fromByteOffset: i * 2, as: UInt16.self))) }
            case .bf16:
                for i in 0..<n { dst[first + i] = HalfPrecision.bf16ToFloat(UInt16(littleEndian: bytes.loadUnaligned(fromByteOffset: i * 2, as: UInt16.self))) }
            }
        }
    }

    /// For f32 tensors: checks a chunk's stream, offset and size, then lets `fill` write its
    /// `byteCount` bytes straight into the tensor's storage (no staging copy). Returns the CRC32C
    /// of the frame payload, continuing from `prefixChecksum` (the CRC of the bytes before the
    /// data). A chunk whose checksum then fails is an error and the tensor is discarded.
    public mutating func receiveInPlace(stream: UInt32, offset: UInt64, byteCount n: Int, prefixChecksum: UInt32,
                                        fill: (UnsafeMutableRawBufferPointer) throws -> Void) throws -> UInt32 {
        precondition(dtype == .f32)
        let start = received
        try order.accept(stream: stream, offset: offset, byteCount: n)
        reserve((start + n) / 4, keeping: start / 4)
        let crc = try values.withUnsafeMutableBufferPointer { dst -> UInt32 in
            let region = UnsafeMutableRawBufferPointer(start: UnsafeMutableRawPointer(dst.baseAddress!) + start, count: n)
            try fill(region)
            return CRC32C.checksum(UnsafeRawBufferPointer(region), continuing: prefixChecksum)
        }
        return crc
    }

    /// Bytes of storage reserved so far (at most the tensor's f32 size).
    public var reservedBytes: Int { values.count * 4 }

    /// The tensor, once every byte has arrived: [shape[0], the rest] (a vector is 1 x n).
    public func matrix() throws -> Matrix {
        guard isComplete else { throw WireError.truncated(what: "tensor '\(name)'", needed: byteCount, available: received) }
        let rows = shape.count >= 2 ? shape[0] : 1
        // Complete: the storage grew to exactly the tensor's elements.
        return values.reshaped(rows: rows, cols: rows > 0 ? elements / rows : 0)
    }
}
