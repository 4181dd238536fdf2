/// Appends little-endian values to a byte array.
public struct ByteWriter {
    public private(set) var data: [UInt8] = []
    public init() {}

    public mutating func u8(_ v: UInt8) { data.append(v) }
    public mutating func u16(_ v: UInt16) { withUnsafeBytes(of: v.littleEndian) { data.append(contentsOf: $0) } }
    public mutating func u32(_ v: UInt32) { withUnsafeBytes(of: v.littleEndian) { data.append(contentsOf: $0) } }
    public mutating func u64(_ v: UInt64) { withUnsafeBytes(of: v.littleEndian) { data.append(contentsOf: $0) } }
    public mutating func f64(_ v: Double) { u64(v.bitPattern) }
    public mutating func bytes(_ b: [UInt8]) { data.append(contentsOf: b) }
    public mutating func raw(_ b: UnsafeRawBufferPointer) { data.append(contentsOf: b) }
    /// u32 length, then UTF-8 bytes.
    public mutating func string(_ s: String) {
        let b = Array(s.utf8)
        u32(UInt32(b.count))
        bytes(b)
    }
    /// u32 length, then bytes.
    public mutating func blob(_ b: [UInt8]) {
        u32(UInt32(b.count))
        bytes(b)
    }
}

/// Reads little-endian values from a payload; running short is a `truncated` error naming the
/// message and field.
public struct ByteCursor {
    private let bytes: UnsafeRawBufferPointer
    public let message: String
    public private(set) var offset = 0

    public init(_ bytes: UnsafeRawBufferPointer, message: String) {
        self.bytes = bytes
        self.message = message
    }

    public var remaining: Int { bytes.count - offset }

    mutating func need(_ n: Int, _ field: String) throws {
        guard n >= 0, n <= remaining else {
            throw WireError.truncated(what: "\(message) message, field '\(field)'", needed: n, available: remaining)
        }
    }

    public mutating func u8(_ field: String) throws -> UInt8 {
        try need(1, field)
        defer { offset += 1 }
        return bytes[offset]
    }
    public mutating func u16(_ field: String) throws -> UInt16 {
        try need(2, field)
        defer { offset += 2 }
        return UInt16(littleEndian: bytes.loadUnaligned(fromByteOffset: offset, as: UInt16.self))
    }
    public mutating func u32(_ field: String) throws -> UInt32 {
        try need(4, field)
        defer { offset += 4 }
        return UInt32(littleEndian: bytes.loadUnaligned(fromByteOffset: offset, as: UInt32.self))
    }
    public mutating func u64(_ field: String) throws -> UInt64 {
        try need(8, field)
        defer { offset += 8 }
        return UInt64(littleEndian: bytes.loadUnaligned(fromByteOffset: offset, as: UInt64.self))
    }
    public mutating func f64(_ field: String) throws -> Double { Double(bitPattern: try u64(field)) }
    public mutating func bytes(_ n: Int, _ field: String) throws -> [UInt8] {
        try need(n, field)
        defer { offset += n }
        return Array(bytes[offset..<(offset + n)])
    }
    public mutating func raw(_ n: Int, _ field: String) throws -> UnsafeRawBufferPointer {
        try need(n, field)
        defer { offset += n }
        return UnsafeRawBufferPointer(rebasing: bytes[offset..<(offset + n)])
    }
    public mutating func string(_ field: String, maxBytes: Int = 1 << 20) throws -> String {
        let n = Int(try u32(field + " length"))
        guard n <= maxBytes else { throw WireError.malformed(message: message, field: field, detail: "is \(n) bytes long, limit \(maxBytes)") }
        let b = try bytes(n, field)
        guard let s = String(validating: b, as: UTF8.self) else {
            throw WireError.malformed(message: message, field: field, detail: "is not valid UTF-8")
        }
        return s
    }
    public mutating func blob(_ field: String, maxBytes: Int = 1 << 20) throws -> [UInt8] {
        let n = Int(try u32(field + " length"))
        guard n <= maxBytes else { throw WireError.malformed(message: message, field: field, detail: "is \(n) bytes long, limit \(maxBytes)") }
        return try bytes(n, field)
    }
    /// Checks that the whole payload was consumed.
    public func finish() throws {
        if remaining != 0 { throw WireError.malformed(message: message, field: "payload", detail: "has \(remaining) unexpected trailing bytes") }
    }
}
