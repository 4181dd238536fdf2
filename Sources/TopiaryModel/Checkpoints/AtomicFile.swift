#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import Foundation
import CTopiarySupport

/// Writes a file so that readers see either the old contents or the complete new contents,
/// never a partial file: the bytes go to a temporary file in the same directory
/// (`.NAME.tmp-PID-XXXXXXXX`), which is flushed to disk, renamed over the target, and the
/// directory entry is flushed too. On any failure the temporary file is removed and the
/// target is left as it was.
///
/// System errors are reported as `CheckpointError.io(path:detail:)` naming the target path and
/// the operating system's reason (for example "No space left on device").
public enum AtomicFile {
    /// Writes `data` to `path` atomically.
    public static func write(_ data: Data, to path: String) throws {
        try write(to: path) { writer in try writer.write(data) }
    }

    /// Writes the bytes appended by `body` to `path` atomically. The writer must not be used
    /// after `body` returns. Errors thrown by `body` are passed on unchanged (after clean-up).
    /// `streaming` (for a large file that this process will not read again soon, such as an
    /// output model's weights): the file goes to disk as it is written and its pages leave the
    /// page cache (`FileHandleWriter.streamChunk`).
    /// `digest`, when given, is fed every byte of the file in order as it is written.
    public static func write(to path: String, streaming: Bool = false, digest: SHA256Stream? = nil,
                             _ body: (FileHandleWriter) throws -> Void) throws {
        try write(to: path, streamChunk: streaming ? FileHandleWriter.streamChunk : nil, digest: digest, body)
    }

    /// `write(to:streaming:digest:_:)` with the streaming writer's chunk given (tests use small ones).
    static func write(to path: String, streamChunk: Int?, digest: SHA256Stream?, _ body: (FileHandleWriter) throws -> Void) throws {
        let (directory, name) = split(path)
        guard !name.isEmpty else {
            throw CheckpointError.io(path: path, detail: "cannot write: the path names a directory, not a file")
        }
        // Keep the permissions of a file that is being replaced.
        var existing = stat()
        let replacing = stat(path, &existing) == 0
        let mode: mode_t = replacing ? (existing.st_mode & 0o7777) : 0o644

        var fd: Int32 = -1
        var temp = ""
        for _ in 0..<8 {
            temp = directory + "/." + name + ".tmp-\(getpid())-" + hex8(UInt32.random(in: .min ... .max))
            fd = posixOpen(temp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode)
            if fd >= 0 || errno != EEXIST { break }
        }
        if fd < 0 {
            throw CheckpointError.io(path: path, detail: "cannot create temporary file \(temp): \(osReason(errno))")
        }
        var fdOpen = true
        var renamed = false
        defer {
            if fdOpen { _ = close(fd) }
            if !renamed { _ = unlink(temp) }
        }
        // The file was created with the requested mode filtered by the umask; a replaced file
        // keeps its exact permissions.
        if replacing { _ = fchmod(fd, mode) }

        let writer = FileHandleWriter(fd: fd, path: path, streamChunk: streamChunk, digest: digest)
        defer { writer.close() }
        try body(writer)
        try writer.flush()
        writer.close()

        if posixFsync(fd) != 0 {
            throw CheckpointError.io(path: path, detail: "cannot flush to disk: \(osReason(errno))")
        }
        fdOpen = false
        if close(fd) != 0 {
            // Network file systems may report a failed write only here.
            throw CheckpointError.io(path: path, detail: "cannot close: \(osReason(errno))")
        }
        if rename(temp, path) != 0 {
            throw CheckpointError.io(path: path, detail: "cannot rename \(temp) over it: \(osReason(errno))")
        }
        renamed = true
        try syncDirectory(directory, for: path)
    }

    /// Flushes a directory's entries to disk (after a rename or an unlink in it).
    static func syncDirectory(_ directory: String, for path: String) throws {
        let dfd = posixOpen(directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC, 0)
        if dfd < 0 {
            throw CheckpointError.io(path: path, detail: "cannot open directory \(directory) to flush it: \(osReason(errno))")
        }
        defer { _ = close(dfd) }
        if posixFsync(dfd) != 0 {
            let e = errno
            // Some file systems cannot sync directories; the rename itself has happened.
            if e == EINVAL || e == ENOTSUP || e == EOPNOTSUPP { return }
            throw CheckpointError.io(path: path, detail: "cannot flush directory \(directory) to disk: \(osReason(e))")
        }
    }

    /// Directory part (or ".") and last component of a path.
    static func split(_ path: String) -> (String, String) {
        guard let slash = path.lastIndex(of: "/") else { return (".", path) }
        let dir = String(path[..<slash])
        return (dir.isEmpty ? "/" : dir, String(path[path.index(after: slash)...]))
    }

    static func osReason(_ code: Int32) -> String {
        guard let s = strerror(code) else { return "error \(code)" }
        return String(cString: s)
    }

    private static func hex8(_ v: UInt32) -> String {
        let s = String(v, radix: 16)
        return String(repeating: "0", count: 8 - s.count) + s
    }
}

/// Appends bytes to a file opened by `AtomicFile`, retrying interrupted and short writes.
/// Small writes are gathered in a buffer; large ones (a tensor's raw values) go straight to
/// the file without being copied.
public final class FileHandleWriter {
    private let fd: Int32
    private let path: String
    private var buffer: UnsafeMutableRawPointer
    private var buffered = 0
    private var closed = false
    private static let capacity = 1 << 20

    /// Bytes appended so far.
    public private(set) var bytesWritten = 0

    /// A streaming writer hands each `streamChunk` bytes to the disk as soon as they are written
    /// (without waiting), waits for the chunk before it, and drops that one's pages from the
    /// page cache. Without it, a file larger than free memory makes every write reclaim cached
    /// pages first: 13 GB written in 1 MiB pieces took 25-26 s on a 24 GiB VM whose disk takes
    /// 1.3-1.5 GB/s, and 9-10 s with each 256 MiB synced and dropped. The file's final fsync
    /// still makes it durable; where the system cannot do this (not Linux, or a file system
    /// without it) the writes are plain.
    static let streamChunk = 64 << 20
    /// The chunk when streaming, nil when not.
    private let streamChunk: Int?
    /// File bytes handed to the system; [0, dropped) are on disk and out of the cache,
    /// [dropped, started) on their way to disk.
    private var fileOffset = 0, started = 0, dropped = 0

    private let digest: SHA256Stream?
    /// With a digest, bytes are hashed on a queue of their own while they are written and the
    /// next buffer fills (SHA-256 of a 7B model's 13 GB is about 8 s on one core): a flushed
    /// buffer is hashed while the other one fills, and a caller's bytes while they are written.
    /// One serial queue keeps the file's order.
    private let hashQueue: DispatchQueue?
    /// The hashes in flight over `buffer`, over `spare`, and over a caller's bytes.
    private var bufferHashing = DispatchGroup(), spareHashing = DispatchGroup()
    private let callerHashing = DispatchGroup()
    private var spare: UnsafeMutableRawPointer?

    init(fd: Int32, path: String, streamChunk: Int? = nil, digest: SHA256Stream? = nil) {
        precondition(streamChunk.map { $0 > 0 } ?? true, "FileHandleWriter: stream chunk \(streamChunk!)")
        self.fd = fd
        self.path = path
        self.streamChunk = streamChunk
        self.digest = digest
        hashQueue = digest == nil ? nil : DispatchQueue(label: "topiary.file-digest")
        buffer = UnsafeMutableRawPointer.allocate(byteCount: Self.capacity, alignment: 16)
        if digest != nil { spare = UnsafeMutableRawPointer.allocate(byteCount: Self.capacity, alignment: 16) }
    }

    deinit {
        waitForHashes()
        buffer.deallocate()
        spare?.deallocate()
    }

    public func write(_ bytes: UnsafeRawBufferPointer) throws {
        guard !closed else {
            throw CheckpointError.io(path: path, detail: "write after the file was finished")
        }
        guard let base = bytes.baseAddress, bytes.count > 0 else { return }
        if buffered + bytes.count > Self.capacity { try flush() }
        if bytes.count >= Self.capacity {
            // The caller's memory: hashed while it is written, and done with before returning.
            defer { callerHashing.wait() }
            try writeFully(UnsafeRawBufferPointer(start: base, count: bytes.count), hashing: callerHashing)
        } else {
            (buffer + buffered).copyMemory(from: base, byteCount: bytes.count)
            buffered += bytes.count
        }
        bytesWritten += bytes.count
    }

    public func write(_ data: Data) throws {
        try data.withUnsafeBytes { try write($0) }
    }

    public func write(_ bytes: [UInt8]) throws {
        try bytes.withUnsafeBytes { try write($0) }
    }

    public func write(_ string: String) throws {
        var s = string
        try s.withUTF8 { try write(UnsafeRawBufferPointer($0)) }
    }

    /// Appends Float32 values in little-endian byte order.
    public func write(floats: UnsafeBufferPointer<Float>) throws {
        #if _endian(little)
        try write(UnsafeRawBufferPointer(floats))
        #else
        try writeConverted(count: floats.count, elementSize: 4) { range, p in
            for (k, i) in range.enumerated() {
                p.storeBytes(of: floats[i].bitPattern.littleEndian, toByteOffset: 4 * k, as: UInt32.self)
            }
        }
        #endif
    }

    /// Appends `count` elements of `elementSize` bytes each, converted in chunks straight into
    /// the writer's buffer (so no full-size copy is ever built): `fill(range, destination)`
    /// stores elements `range` back to back at `destination` (which need not be aligned).
    public func writeConverted(count: Int, elementSize: Int, _ fill: (Range<Int>, UnsafeMutableRawPointer) throws -> Void) throws {
        guard !closed else {
            throw CheckpointError.io(path: path, detail: "write after the file was finished")
        }
        precondition(elementSize > 0 && elementSize <= 4096, "FileHandleWriter: element size \(elementSize)")
        var i = 0
        while i < count {
            if Self.capacity - buffered < elementSize { try flush() }
            let n = min((Self.capacity - buffered) / elementSize, count - i)
            try fill(i..<(i + n), buffer + buffered)
            buffered += n * elementSize
            bytesWritten += n * elementSize
            i += n
        }
    }

    /// Writes out buffered bytes. With a digest, the buffer is hashed meanwhile and the spare
    /// one (whose hash is waited for) takes the next bytes.
    func flush() throws {
        guard buffered > 0 else { return }
        let n = buffered
        buffered = 0
        try writeFully(UnsafeRawBufferPointer(start: buffer, count: n), hashing: bufferHashing)
        if let other = spare {
            spareHashing.wait()
            spare = buffer
            buffer = other
            swap(&bufferHashing, &spareHashing)
        }
    }

    /// No more writes; the digest has every byte once this returns.
    func close() {
        closed = true
        waitForHashes()
    }

    private func waitForHashes() {
        for g in [bufferHashing, spareHashing, callerHashing] { g.wait() }
    }

    /// Hands `bytes` to the hashing queue (after the bytes before them), counted in `group`.
    private func hash(_ bytes: UnsafeRawBufferPointer, in group: DispatchGroup) {
        guard let digest, let hashQueue else { return }
        let piece = UncheckedBytes(bytes: bytes)
        group.enter()
        hashQueue.async {
            digest.update(piece.bytes)
            group.leave()
        }
    }

    private func writeFully(_ bytes: UnsafeRawBufferPointer, hashing group: DispatchGroup) throws {
        guard var p = bytes.baseAddress else { return }
        hash(bytes, in: group)
        var left = bytes.count
        while left > 0 {
            let n = posixWrite(fd, p, min(left, 1 << 30))
            if n < 0 {
                let e = errno
                if e == EINTR { continue }
                throw CheckpointError.io(path: path, detail: "cannot write: \(AtomicFile.osReason(e))")
            }
            if n == 0 {
                throw CheckpointError.io(path: path, detail: "cannot write: the system accepted no bytes")
            }
            p += n
            left -= n
            fileOffset += n
            if let chunk = streamChunk, fileOffset - started >= chunk { streamOut() }
        }
    }

    /// Starts the disk writes of [started, fileOffset), then waits for [dropped, started) and
    /// drops its pages. Failures only mean the pages stay cached: the final fsync reports errors.
    private func streamOut() {
        if started > dropped && topiary_writeback_finish(fd, Int64(dropped), Int64(started - dropped)) == 0 { dropped = started }
        _ = topiary_writeback_start(fd, Int64(started), Int64(fileOffset - started))
        started = fileOffset
    }
}

// Thin wrappers so that the C functions are not shadowed by methods of the same name.

private func posixOpen(_ path: String, _ flags: Int32, _ mode: mode_t) -> Int32 {
    while true {
        let fd = open(path, flags, mode)
        if fd < 0 && errno == EINTR { continue }
        return fd
    }
}

private func posixWrite(_ fd: Int32, _ p: UnsafeRawPointer, _ n: Int) -> Int {
    write(fd, p, n)
}

private func posixFsync(_ fd: Int32) -> Int32 {
    while true {
        let r = fsync(fd)
        if r != 0 && errno == EINTR { continue }
        return r
    }
}

/// Bytes handed to the hashing queue; the writer keeps them alive and unchanged until it has
/// waited for their hash.
private struct UncheckedBytes: @unchecked Sendable {
    let bytes: UnsafeRawBufferPointer
}
