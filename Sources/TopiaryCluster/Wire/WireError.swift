import Foundation

/// Everything that can be wrong with bytes from a peer. Each case names the field and what was
/// expected against what arrived; on any of them the connection is closed.
public enum WireError: Error, CustomStringConvertible, Equatable {
    case badMagic(found: [UInt8])
    case unsupportedVersion(found: UInt16, supported: ClosedRange<UInt16>)
    case unknownMessageType(UInt16)
    case frameTooLarge(type: UInt16, length: UInt64, limit: Int)
    case badChecksum(type: UInt16, expected: UInt32, computed: UInt32)
    case truncated(what: String, needed: Int, available: Int)
    case malformed(message: String, field: String, detail: String)
    case unexpectedMessage(expected: String, found: String)
    case authenticationFailed(String)
    case connection(String)
    /// An error on the link to a worker, naming the worker ("worker@host:port", or "worker NAME")
    /// and the phase it happened in
    /// ("handshake", "assignment of blocks 3-5", "transfer of block 4", ...).
    indirect case during(peer: String, phase: String, WireError)

    public var description: String {
        switch self {
        case .badMagic(let f):
            return "frame header: magic is \(f.map { String(format: "%02x", $0) }.joined(separator: " ")), expected 54 50 52 59 (\"TPRY\")"
        case .unsupportedVersion(let f, let s):
            return "frame header: protocol version \(f) is not supported (this side speaks \(s.lowerBound)...\(s.upperBound))"
        case .unknownMessageType(let t): return "frame header: unknown message type \(t)"
        case .frameTooLarge(let t, let l, let limit):
            return "frame header: message type \(t) declares \(l) payload bytes, over the limit of \(limit)"
        case .badChecksum(let t, let e, let c):
            return String(format: "message type %d: payload CRC32C is %08x, header says %08x", t, c, e)
        case .truncated(let w, let n, let a): return "\(w): truncated, needed \(n) bytes, \(a) available"
        case .malformed(let m, let f, let d): return "\(m) message: field '\(f)' \(d)"
        case .unexpectedMessage(let e, let f): return "expected a \(e) message, received \(f)"
        case .authenticationFailed(let s): return "authentication failed: \(s)"
        case .connection(let s): return s
        case .during(let peer, let phase, let e): return "\(peer), \(phase): \(e)"
        }
    }
}
