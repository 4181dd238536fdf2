import CCrypto
import Foundation

/// SHA-256 through libcrypto, over bytes or whole files (streamed).
public struct SHA256Digest {
    private var context: OpaquePointer

    public init() {
        context = EVP_MD_CTX_new()
        EVP_DigestInit_ex(context, EVP_sha256(), nil)
    }

    public mutating func update(_ bytes: UnsafeRawBufferPointer) {
        if bytes.count > 0 { EVP_DigestUpdate(context, bytes.baseAddress, bytes.count) }
    }

    public mutating func update(_ data: Data) {
        data.withUnsafeBytes { update($0) }
    }

    /// The digest as lowercase hex; the context is freed.
    public mutating func finish() -> String {
        var out = [UInt8](repeating: 0, count: 32)
        var length: UInt32 = 0
        EVP_DigestFinal_ex(context, &out, &length)
        EVP_MD_CTX_free(context)
        return out.map { String(format: "%02x", $0) }.joined()
    }

    public static func hex(_ data: Data) -> String {
        var d = SHA256Digest()
        d.update(data)
        return d.finish()
    }

    /// SHA-256 of the concatenated contents of `paths`, read in 4 MiB pieces.
    public static func files(_ paths: [String]) throws -> String {
        var d = SHA256Digest()
        for path in paths {
            guard let handle = FileHandle(forReadingAtPath: path) else {
                throw CheckpointError.io(path: path, detail: "cannot open for hashing")
            }
            defer { try? handle.close() }
            while true {
                let chunk = handle.readData(ofLength: 4 << 20)
                if chunk.isEmpty { break }
                d.update(chunk)
            }
        }
        return d.finish()
    }
}

/// A SHA-256 fed in pieces through a reference, so that a writer can hash a set of files as it
/// writes them (`SafeTensorsWriter.weightsDigest`) instead of reading them back.
public final class SHA256Stream: @unchecked Sendable {
    private var digest = SHA256Digest()
    private var result: String?

    public init() {}

    public func update(_ bytes: UnsafeRawBufferPointer) {
        precondition(result == nil, "SHA256Stream: update after finish")
        digest.update(bytes)
    }

    /// The digest of everything given so far, as lowercase hex; nothing may be added after.
    public func finish() -> String {
        if let result { return result }
        let r = digest.finish()
        result = r
        return r
    }

    deinit { if result == nil { _ = digest.finish() } }
}
