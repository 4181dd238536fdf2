import CTopiarySupport

/// CRC-32C (Castagnoli) of bytes, in hardware where the CPU has it.
public enum CRC32C {
    public static func checksum(_ bytes: UnsafeRawBufferPointer, continuing crc: UInt32 = 0) -> UInt32 {
        guard let base = bytes.baseAddress, bytes.count > 0 else { return crc }
        return topiary_crc32c(crc, base, bytes.count)
    }

    public static func checksum(_ bytes: [UInt8]) -> UInt32 {
        bytes.withUnsafeBytes { checksum($0) }
    }

    public static var usesHardware: Bool { topiary_crc32c_hardware() != 0 }
}

/// The fixed 24-byte frame header, little-endian (docs/protocol.md):
/// magic "TPRY" (4) · version u16 · type u16 · flags u32 · payload length u64 · payload CRC32C u32.
public struct FrameHeader: Equatable, Sendable {
    public static let size = 24
    public static let magic: [UInt8] = Array("TPRY".utf8)

    public var version: UInt16
    public var type: UInt16
    public var flags: UInt32
    public var length: UInt64
    public var checksum: UInt32

    public init(version: UInt16, type: UInt16, flags: UInt32, length: UInt64, checksum: UInt32) {
        self.version = version
        self.type = type
        self.flags = flags
        self.length = length
        self.checksum = checksum
    }

    public func encoded() -> [UInt8] {
        var w = ByteWriter()
        w.bytes(Self.magic)
        w.u16(version)
        w.u16(type)
        w.u32(flags)
        w.u64(length)
        w.u32(checksum)
        return w.data
    }

    /// Parses and checks a header: magic, version, known type, length under `limit`.
    /// Nothing of the payload is read before these checks pass.
    public static func decode(_ bytes: UnsafeRawBufferPointer, supported: ClosedRange<UInt16>, limit: Int) throws -> FrameHeader {
        guard bytes.count >= size else { throw WireError.truncated(what: "frame header", needed: size, available: bytes.count) }
        var r = ByteCursor(bytes, message: "frame header")
        let magic = try r.bytes(4, "magic")
        guard magic == Self.magic else { throw WireError.badMagic(found: magic) }
        let version = try r.u16("version")
        guard supported.contains(version) else { throw WireError.unsupportedVersion(found: version, supported: supported) }
        let type = try r.u16("type")
        guard MessageType(rawValue: type) != nil else { throw WireError.unknownMessageType(type) }
        let flags = try r.u32("flags")
        let length = try r.u64("length")
        guard length <= UInt64(limit) else { throw WireError.frameTooLarge(type: type, length: length, limit: limit) }
        let checksum = try r.u32("checksum")
        return FrameHeader(version: version, type: type, flags: flags, length: length, checksum: checksum)
    }
}

/// One frame: a message type, flags and an opaque payload.
public struct Frame: Equatable, Sendable {
    public var type: MessageType
    public var flags: UInt32
    public var payload: [UInt8]

    public init(type: MessageType, flags: UInt32 = 0, payload: [UInt8]) {
        self.type = type
        self.flags = flags
        self.payload = payload
    }

    /// Header and payload as bytes to send.
    public func encoded(version: UInt16 = Protocol.version) -> [UInt8] {
        let header = FrameHeader(version: version, type: type.rawValue, flags: flags, length: UInt64(payload.count),
                                 checksum: CRC32C.checksum(payload))
        return header.encoded() + payload
    }
}

/// Protocol constants.
public enum Protocol {
    /// 2: the statistics chain's replica messages (kinds 15 and 16) replaced kind 14,
    /// replicas own contiguous window ranges, and replicas on separate machines make a
    /// row-shared linear's U together (kinds 17 to 19); a version-1 peer is refused at the
    /// handshake rather than misreading them (docs/protocol.md, Versions). 3: the chain's
    /// parts of H are pieces of its upper triangle (a strip's columns from its diagonal on, at
    /// most `StatisticsChain.pieceColumns` wide), not whole-width strips.
    public static let version: UInt16 = 3
    public static let supportedVersions: ClosedRange<UInt16> = 3...3
    /// Default cap on one frame's payload; tensors larger than a frame are streamed in chunks.
    public static let defaultMaxFrameBytes = 64 << 20
    /// Before authentication only small frames are accepted, so an unauthenticated peer cannot
    /// make the other side read (or allocate) much.
    public static let maxHandshakeFrameBytes = 4096
}

/// Turns a byte stream into frames, whatever sizes the bytes arrive in. Header checks run as
/// soon as 24 bytes are there, before any of the payload is buffered or read.
public struct FrameDecoder {
    public var maxFrameBytes: Int
    public let supported: ClosedRange<UInt16>
    /// When set, a frame of any other type is refused at its header, before its payload is read
    /// (the handshake accepts only its own messages).
    public var allowedTypes: Set<MessageType>?
    private var buffer: [UInt8] = []
    private var header: FrameHeader?

    public init(maxFrameBytes: Int = Protocol.defaultMaxFrameBytes, supported: ClosedRange<UInt16> = Protocol.supportedVersions) {
        self.maxFrameBytes = maxFrameBytes
        self.supported = supported
    }

    /// Bytes received but not yet part of a returned frame.
    public var bufferedBytes: Int { buffer.count }

    public mutating func append(_ bytes: UnsafeRawBufferPointer) { buffer.append(contentsOf: bytes) }
    public mutating func append(_ bytes: [UInt8]) { buffer.append(contentsOf: bytes) }

    /// How many more bytes the next frame needs (header first, then payload).
    public var bytesWanted: Int {
        if let header { return max(0, FrameHeader.size + Int(header.length) - buffer.count) }
        return max(0, FrameHeader.size - buffer.count)
    }

    /// The next complete frame, nil when more bytes are needed, or an error (close the connection).
    public mutating func next() throws -> Frame? {
        if header == nil {
            guard buffer.count >= FrameHeader.size else { return nil }
            header = try buffer.withUnsafeBytes { try checkHeader($0) }
        }
        let h = header!
        let total = FrameHeader.size + Int(h.length)
        guard buffer.count >= total else { return nil }
        let payload = Array(buffer[FrameHeader.size..<total])
        try payload.withUnsafeBytes { try Self.checkPayload($0, of: h) }
        buffer.removeFirst(total)
        header = nil
        return Frame(type: MessageType(rawValue: h.type)!, flags: h.flags, payload: payload)
    }

    // The checks below are the only ones a frame gets, whether its bytes come through `next()`
    // or straight from a socket (`Connection` reads a header, then its payload, and asks these).

    /// Decodes and checks a frame header (its first 24 bytes): magic, version, known type,
    /// length under `maxFrameBytes`, and, when `allowedTypes` is set, its type.
    public func checkHeader(_ bytes: UnsafeRawBufferPointer) throws -> FrameHeader {
        let h = try FrameHeader.decode(bytes, supported: supported, limit: maxFrameBytes)
        if let allowed = allowedTypes, let type = MessageType(rawValue: h.type), !allowed.contains(type) {
            throw WireError.unexpectedMessage(expected: expectedText(allowed), found: type.description)
        }
        return h
    }

    /// What the next frame may be, as errors and waits name it ("a challenge message").
    public var expectedMessage: String { allowedTypes.map { "a " + expectedText($0) + " message" } ?? "the next message" }

    private func expectedText(_ allowed: Set<MessageType>) -> String { allowed.map(\.description).sorted().joined(separator: " or ") }

    /// Checks a whole payload against its header's CRC32C.
    public static func checkPayload(_ payload: UnsafeRawBufferPointer, of h: FrameHeader) throws {
        try checkPayload(checksum: CRC32C.checksum(payload), of: h)
    }

    /// Checks a payload's CRC32C, computed as it arrived (a tensor chunk read in place), against
    /// its header's.
    public static func checkPayload(checksum computed: UInt32, of h: FrameHeader) throws {
        guard computed == h.checksum else { throw WireError.badChecksum(type: h.type, expected: h.checksum, computed: computed) }
    }
}
