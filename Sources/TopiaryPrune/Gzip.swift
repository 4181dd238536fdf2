import CZlib
import Foundation

/// A calibration file that cannot be used: the message names the file, the line or byte, and
/// what was expected.
public struct CalibrationFileError: Error, CustomStringConvertible, Equatable {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

/// gzip decompression through the system's zlib (Debian's zlib1g-dev), for C4's `*.json.gz`
/// shards. zlib checks every member's CRC-32 and length; a file made of several members (as
/// `cat a.gz b.gz` gives) is read whole, as gzip and Python's gzip module read it.
public enum Gzip {
    /// Whether `data` starts with gzip's magic bytes 1f 8b.
    public static func hasMagic(_ data: Data) -> Bool {
        data.count >= 2 && data[data.startIndex] == 0x1F && data[data.startIndex + 1] == 0x8B
    }

    /// The decompressed bytes of `data`, a gzip file read from `path` (named in errors).
    /// `limit` bounds the output, so a small hostile file cannot exhaust memory (default: half
    /// of the machine's memory).
    public static func decompress(_ data: Data, path: String, limit: Int? = nil) throws -> [UInt8] {
        let limit = limit ?? Int(clamping: ProcessInfo.processInfo.physicalMemory / 2)
        guard hasMagic(data) else {
            throw CalibrationFileError("\(path): not a gzip file (it does not start with the gzip magic bytes 1f 8b)")
        }
        var stream = z_stream()
        // 15 + 16: a 32 KiB window, gzip header and trailer (not raw deflate or zlib).
        guard inflateInit2_(&stream, 15 + 16, zlibVersion(), Int32(MemoryLayout<z_stream>.size)) == Z_OK else {
            throw CalibrationFileError("\(path): zlib could not start inflating (out of memory?)")
        }
        defer { inflateEnd(&stream) }
        var output: [UInt8] = []
        output.reserveCapacity(min(limit, data.count * 3))
        let chunk = 1 << 20
        var buffer = [UInt8](repeating: 0, count: chunk)
        let total = data.count
        var members = 1
        return try data.withUnsafeBytes { (raw: UnsafeRawBufferPointer) -> [UInt8] in
            let base = raw.bindMemory(to: UInt8.self).baseAddress!
            var consumed = 0   // input bytes handed to zlib and used
            while true {
                // avail_in is 32 bits: hand the input over in pieces of at most 1 GiB.
                let piece = min(total - consumed, 1 << 30)
                stream.next_in = UnsafeMutablePointer(mutating: base + consumed)
                stream.avail_in = uInt(piece)
                var status: Int32 = Z_OK
                repeat {
                    status = buffer.withUnsafeMutableBufferPointer { out -> Int32 in
                        stream.next_out = out.baseAddress
                        stream.avail_out = uInt(chunk)
                        return inflate(&stream, Z_NO_FLUSH)
                    }
                    let produced = chunk - Int(stream.avail_out)
                    if produced > 0 {
                        guard output.count + produced <= limit else {
                            throw CalibrationFileError("\(path): decompresses to more than \(limit) bytes (half of this machine's memory); decompress it elsewhere or use a smaller shard")
                        }
                        output.append(contentsOf: buffer[0..<produced])
                    }
                    // Z_OK: progress was made; go on while input is left, or while the output
                    // buffer came back full (more may be pending inside zlib).
                } while status == Z_OK && (stream.avail_in > 0 || stream.avail_out == 0)
                consumed += piece - Int(stream.avail_in)
                switch status {
                case Z_STREAM_END:
                    // The end of one member: another may follow (concatenated gzip files).
                    let rest = total - consumed
                    if rest == 0 { return output }
                    let next = data[(data.startIndex + consumed)...]
                    guard hasMagic(next) else {
                        throw CalibrationFileError("\(path): \(rest) bytes after the end of gzip member \(members) (at byte \(consumed)) are not another gzip member (no magic bytes 1f 8b)")
                    }
                    guard inflateReset(&stream) == Z_OK else { throw CalibrationFileError("\(path): zlib could not restart for gzip member \(members + 1)") }
                    members += 1
                case Z_OK, Z_BUF_ERROR:
                    // Z_BUF_ERROR: no progress was possible without more input.
                    if consumed < total { continue }   // the next piece of input
                    // All input was used and the member has not ended.
                    throw CalibrationFileError("\(path): the gzip data is truncated: it ends after \(total) compressed bytes (\(output.count) bytes decompressed) before the end of gzip member \(members); the download is probably incomplete")
                default:
                    let detail = stream.msg.map { String(cString: $0) } ?? "zlib error \(status)"
                    throw CalibrationFileError("\(path): not valid gzip data in member \(members), near compressed byte \(consumed) (\(detail))")
                }
            }
        }
    }
}
