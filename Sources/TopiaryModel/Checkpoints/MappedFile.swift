import TopiaryTensor
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A read-only memory map of a whole file. Pages are read by the kernel when touched, so a
/// checkpoint is never loaded whole: only the tensors that are asked for are brought in.
public final class MappedFile: @unchecked Sendable {
    public let path: String
    public let size: Int
    private let base: UnsafeRawPointer?

    public init(path: String) throws {
        self.path = path
        let fd = open(path, O_RDONLY)
        if fd < 0 { throw CheckpointError.io(path: path, detail: "cannot open: \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        var st = stat()
        if fstat(fd, &st) != 0 { throw CheckpointError.io(path: path, detail: "cannot stat: \(String(cString: strerror(errno)))") }
        if (st.st_mode & S_IFMT) == S_IFDIR { throw CheckpointError.io(path: path, detail: "is a directory, expected a file") }
        size = Int(st.st_size)
        if size == 0 {
            base = nil
            return
        }
        let p = mmap(nil, size, PROT_READ, MAP_PRIVATE, fd, 0)
        if p == MAP_FAILED || p == nil {
            throw CheckpointError.io(path: path, detail: "cannot map: \(String(cString: strerror(errno)))")
        }
        base = UnsafeRawPointer(p!)
    }

    deinit {
        if let base { munmap(UnsafeMutableRawPointer(mutating: base), size) }
    }

    /// The bytes [offset, offset+count), or an error naming `what` when they are not all in the file.
    public func bytes(at offset: Int, count: Int, what: String) throws -> UnsafeRawBufferPointer {
        guard offset >= 0, count >= 0, offset <= size, count <= size - offset else {
            throw CheckpointError.tensorOutOfBounds(path: path, tensor: what, end: offset &+ count, fileSize: size)
        }
        guard let base else { return UnsafeRawBufferPointer(start: nil, count: 0) }
        return UnsafeRawBufferPointer(start: base + offset, count: count)
    }

    /// Decodes the tensor `entry` (its bytes checked against the file) and then drops the file
    /// pages it touched from this process's resident set: a tensor read once is not kept twice,
    /// as decoded floats and as mapped pages. The kernel reads them again if they are touched again.
    public func decodeTensor(_ entry: TensorEntry) throws -> Matrix {
        let bytes = try self.bytes(at: entry.offset, count: entry.byteCount, what: entry.name)
        defer { release(offset: entry.offset, count: entry.byteCount) }
        return try TensorDecoder.decode(bytes, entry: entry, path: path)
    }

    /// Advises the kernel that [offset, offset+count) will be read soon (the pages covering it):
    /// it reads them ahead into the page cache without mapping them into this process.
    public func prefetch(offset: Int, count: Int) {
        guard let base, count > 0, offset >= 0, offset < size else { return }
        let page = Int(sysconf(Int32(_SC_PAGESIZE)))
        let start = offset / page * page
        let end = min(offset + min(count, size - offset), size)
        _ = madvise(UnsafeMutableRawPointer(mutating: base + start), end - start, Int32(MADV_WILLNEED))
    }

    /// Advises the kernel that [offset, offset+count) is not needed now (whole pages inside it).
    public func release(offset: Int, count: Int) {
        guard let base, count > 0 else { return }
        let page = Int(sysconf(Int32(_SC_PAGESIZE)))
        let start = (offset + page - 1) / page * page
        let end = (offset + count) / page * page
        guard end > start else { return }
        _ = madvise(UnsafeMutableRawPointer(mutating: base + start), end - start, Int32(MADV_DONTNEED))
    }

    /// A cursor for parsing headers.
    public func reader(at offset: Int = 0) -> ByteReader { ByteReader(file: self, offset: offset) }
}

/// Sequential little-endian reads from a mapped file; running past the end is a `truncated` error.
public struct ByteReader {
    public let file: MappedFile
    public private(set) var offset: Int

    init(file: MappedFile, offset: Int) {
        self.file = file
        self.offset = offset
    }

    public var remaining: Int { file.size - offset }

    mutating func take(_ n: Int, _ what: @autoclosure () -> String) throws -> UnsafeRawBufferPointer {
        guard n >= 0, n <= remaining else {
            throw CheckpointError.truncated(path: file.path, detail: "needed \(n) bytes for \(what()) at offset \(offset), \(max(remaining, 0)) left")
        }
        let b = try file.bytes(at: offset, count: n, what: what())
        offset += n
        return b
    }

    public mutating func read<T: FixedWidthInteger>(_: T.Type, _ what: @autoclosure () -> String) throws -> T {
        let b = try take(MemoryLayout<T>.size, what())
        return T(littleEndian: b.loadUnaligned(as: T.self))
    }

    public mutating func readFloat(_ what: @autoclosure () -> String) throws -> Float {
        Float(bitPattern: try read(UInt32.self, what()))
    }

    public mutating func readDouble(_ what: @autoclosure () -> String) throws -> Double {
        Double(bitPattern: try read(UInt64.self, what()))
    }

    /// `count` raw bytes as a UTF-8 string (invalid sequences repaired).
    public mutating func readString(count: Int, _ what: @autoclosure () -> String) throws -> String {
        let b = try take(count, what())
        return String(decoding: b, as: UTF8.self)
    }

    public mutating func readBytes(count: Int, _ what: @autoclosure () -> String) throws -> [UInt8] {
        Array(try take(count, what()))
    }

    public mutating func skip(_ n: Int, _ what: @autoclosure () -> String) throws {
        _ = try take(n, what())
    }

    public mutating func seek(to newOffset: Int) { offset = newOffset }
}
