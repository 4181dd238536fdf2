import CCrypto
import Foundation

/// A shared secret that cannot be used: names the file (or TOPIARY_SECRET) and what is wrong.
public struct SecretError: Error, CustomStringConvertible, Equatable {
    public let description: String
    public init(_ description: String) { self.description = description }
}

/// The shared secret of a cluster: bytes, from a file or TOPIARY_SECRET (docs/protocol.md).
///
/// - A file's bytes are the secret exactly as stored, except that one trailing newline ("\n")
///   is dropped, so that `echo ... > F` and editors work; nothing else is trimmed or decoded
///   (binary secrets such as `head -c 32 /dev/urandom` are fine).
/// - The file must be a regular file that neither group nor others may access (mode 0600 or
///   stricter), as ssh requires of private keys; anything else is refused, naming the mode.
/// - TOPIARY_SECRET's bytes are used exactly as they are.
/// - At least `minimumBytes` bytes either way.
public struct SharedSecret: Sendable {
    public static let minimumBytes = 16
    /// A secret file larger than this is refused without being read.
    public static let maximumFileBytes = 64 << 10
    public let bytes: [UInt8]

    public init(bytes: [UInt8]) throws {
        try self.init(bytes: bytes, source: "the shared secret")
    }

    init(bytes: [UInt8], source: String) throws {
        guard bytes.count >= Self.minimumBytes else {
            throw SecretError("\(source) has \(bytes.count) bytes; at least \(Self.minimumBytes) are needed (e.g. 32 random bytes: head -c 32 /dev/urandom)")
        }
        self.bytes = bytes
    }

    /// Reads a secret file (see above for what is accepted).
    public static func load(file path: String) throws -> SharedSecret {
        // O_NONBLOCK: opening a FIFO must not block; it is refused below as not a regular file.
        let fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK)
        guard fd >= 0 else { throw SecretError("\(path): cannot open the secret file: \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw SecretError("\(path): cannot stat the secret file: \(String(cString: strerror(errno)))") }
        guard st.st_mode & 0o170000 == 0o100000 else { throw SecretError("\(path): the secret file is not a regular file") }
        let mode = st.st_mode & 0o7777
        guard mode & 0o077 == 0 else {
            throw SecretError("\(path): the secret file is accessible by group or others (mode \(String(format: "%04o", mode)); expected 0600 or stricter): run 'chmod 600 \(path)'")
        }
        guard st.st_size <= Self.maximumFileBytes else {
            throw SecretError("\(path): the secret file has \(st.st_size) bytes, more than the \(Self.maximumFileBytes) a secret may have")
        }
        var bytes: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress!, $0.count) }
            if n < 0 {
                if errno == EINTR { continue }
                throw SecretError("\(path): cannot read the secret file: \(String(cString: strerror(errno)))")
            }
            if n == 0 { break }
            bytes.append(contentsOf: buffer[0..<n])
            guard bytes.count <= Self.maximumFileBytes else {
                throw SecretError("\(path): the secret file has more than the \(Self.maximumFileBytes) bytes a secret may have")
            }
        }
        if bytes.last == UInt8(ascii: "\n") { bytes.removeLast() }
        return try SharedSecret(bytes: bytes, source: "\(path): the secret (after dropping one trailing newline)")
    }

    /// TOPIARY_SECRET, if set and not empty: its bytes exactly (read with getenv, so bytes that
    /// are not UTF-8 stay what they are).
    public static func fromEnvironment() throws -> SharedSecret? {
        guard let value = getenv("TOPIARY_SECRET") else { return nil }
        let bytes = Array(UnsafeBufferPointer(start: UnsafeRawPointer(value).assumingMemoryBound(to: UInt8.self), count: strlen(value)))
        if bytes.isEmpty { return nil }
        return try SharedSecret(bytes: bytes, source: "TOPIARY_SECRET")
    }

    /// HMAC-SHA256(secret, label ‖ a ‖ b).
    func mac(_ label: String, _ a: [UInt8], _ b: [UInt8]) -> [UInt8] {
        let message = Array(label.utf8) + a + b
        var out = [UInt8](repeating: 0, count: 32)
        var length: UInt32 = 0
        bytes.withUnsafeBytes { key in
            message.withUnsafeBytes { m in
                _ = HMAC(EVP_sha256(), key.baseAddress, Int32(key.count), m.bindMemory(to: UInt8.self).baseAddress, m.count, &out, &length)
            }
        }
        return out
    }
}

/// Cryptographically random bytes (nonces).
public func randomBytes(_ n: Int) -> [UInt8] {
    var out = [UInt8](repeating: 0, count: n)
    precondition(RAND_bytes(&out, Int32(n)) == 1, "RAND_bytes failed")
    return out
}

func constantTimeEqual(_ a: [UInt8], _ b: [UInt8]) -> Bool {
    guard a.count == b.count else { return false }
    return a.withUnsafeBytes { pa in b.withUnsafeBytes { pb in CRYPTO_memcmp(pa.baseAddress, pb.baseAddress, a.count) == 0 } }
}

/// Mutual HMAC-SHA256 challenge-response. The connecting side sends hello with its nonce; the
/// listener answers with its nonce and a MAC over both (proving it knows the secret); the
/// connector checks it and answers with its own MAC; the listener checks that and welcomes it.
/// Until then each side accepts only the next handshake message, in small frames.
public struct ListenerHandshake {
    public enum State: Equatable { case awaitingHello, awaitingProof, authenticated, failed }
    public let secret: SharedSecret
    public let name: String
    public private(set) var state: State = .awaitingHello
    public private(set) var version: UInt16 = 0
    public private(set) var peerName = ""
    private var peerNonce: [UInt8] = []
    private var nonce: [UInt8] = []

    public init(secret: SharedSecret, name: String) {
        self.secret = secret
        self.name = name
    }

    /// The message types accepted next (for `FrameDecoder.allowedTypes`).
    public var expected: Set<MessageType> {
        switch state {
        case .awaitingHello: return [.hello]
        case .awaitingProof: return [.proof]
        default: return []
        }
    }

    /// Handles one message and returns the replies to send. Errors mean: reply with the error
    /// message and close.
    public mutating func receive(_ message: Message) throws -> [Message] {
        switch (state, message) {
        case (.awaitingHello, .hello(let lo, let hi, _, let peerNonce, let peerName)):
            let chosen = min(hi, Protocol.supportedVersions.upperBound)
            guard chosen >= max(lo, Protocol.supportedVersions.lowerBound) else {
                state = .failed
                throw WireError.unsupportedVersion(found: hi, supported: Protocol.supportedVersions)
            }
            version = chosen
            self.peerNonce = peerNonce
            self.peerName = peerName
            nonce = randomBytes(Message.nonceBytes)
            state = .awaitingProof
            return [.challenge(version: chosen, nonce: nonce, mac: secret.mac("topiary-listener", peerNonce, nonce))]
        case (.awaitingProof, .proof(let mac)):
            guard constantTimeEqual(mac, secret.mac("topiary-connector", nonce, peerNonce)) else {
                state = .failed
                throw WireError.authenticationFailed("peer '\(peerName)' did not prove knowledge of the shared secret")
            }
            state = .authenticated
            return [.welcome(name: name)]
        default:
            state = .failed
            throw WireError.unexpectedMessage(expected: expected.map(\.description).sorted().joined(separator: " or "), found: message.type.description)
        }
    }
}

public struct ConnectorHandshake {
    public enum State: Equatable { case start, awaitingChallenge, awaitingWelcome, authenticated, failed }
    public let secret: SharedSecret
    public let name: String
    public let role: UInt8
    public private(set) var state: State = .start
    public private(set) var version: UInt16 = 0
    public private(set) var peerName = ""
    private var nonce: [UInt8] = []

    public init(secret: SharedSecret, name: String, role: UInt8) {
        self.secret = secret
        self.name = name
        self.role = role
    }

    public var expected: Set<MessageType> {
        switch state {
        case .awaitingChallenge: return [.challenge, .error]
        case .awaitingWelcome: return [.welcome, .error]
        default: return []
        }
    }

    public mutating func start() -> Message {
        nonce = randomBytes(Message.nonceBytes)
        state = .awaitingChallenge
        return .hello(minVersion: Protocol.supportedVersions.lowerBound, maxVersion: Protocol.supportedVersions.upperBound,
                      role: role, nonce: nonce, name: name)
    }

    public mutating func receive(_ message: Message) throws -> [Message] {
        switch (state, message) {
        case (.awaitingChallenge, .challenge(let version, let peerNonce, let mac)):
            guard Protocol.supportedVersions.contains(version) else {
                state = .failed
                throw WireError.unsupportedVersion(found: version, supported: Protocol.supportedVersions)
            }
            guard constantTimeEqual(mac, secret.mac("topiary-listener", nonce, peerNonce)) else {
                state = .failed
                throw WireError.authenticationFailed("the listener did not prove knowledge of the shared secret")
            }
            self.version = version
            state = .awaitingWelcome
            return [.proof(mac: secret.mac("topiary-connector", peerNonce, nonce))]
        case (.awaitingWelcome, .welcome(let name)):
            peerName = name
            state = .authenticated
            return []
        case (_, .error(_, let text)):
            state = .failed
            throw WireError.authenticationFailed("the listener refused the connection: \(text)")
        default:
            state = .failed
            throw WireError.unexpectedMessage(expected: expected.map(\.description).sorted().joined(separator: " or "), found: message.type.description)
        }
    }
}
