import CCrypto
import Foundation

/// The shared secret of a cluster: from a file (mode 0600 expected) or TOPIARY_SECRET.
public struct SharedSecret: Sendable {
    public let bytes: [UInt8]

    public init(bytes: [UInt8]) throws {
        guard bytes.count >= 16 else {
            throw WireError.authenticationFailed("the shared secret has \(bytes.count) bytes; use at least 16 (e.g. 32 random bytes, hex-encoded)")
        }
        self.bytes = bytes
    }

    /// Reads a secret file; surrounding white space is ignored.
    public static func load(file path: String) throws -> SharedSecret {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw WireError.authenticationFailed("\(path): cannot read the secret file")
        }
        let text = String(decoding: data, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
        return try SharedSecret(bytes: Array(text.utf8))
    }

    /// TOPIARY_SECRET, if set.
    public static func fromEnvironment() throws -> SharedSecret? {
        guard let s = ProcessInfo.processInfo.environment["TOPIARY_SECRET"], !s.isEmpty else { return nil }
        return try SharedSecret(bytes: Array(s.utf8))
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
