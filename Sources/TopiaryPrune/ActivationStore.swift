import Foundation
import TopiaryTensor
#if canImport(Glibc)
import Glibc
#endif

/// The hidden states of every calibration sequence at one point of the model, each a
/// [sequenceLength x hidden] tensor on `backend`. Kept there up to a byte budget; beyond it,
/// kept in a file in the run's working directory and read back one sequence at a time (a
/// download to write it, an upload to read it: the only transfers a store makes).
///
/// The spill file is read and written with pread/pwrite rather than mapped: pages of a mapping
/// count towards the process's resident memory once touched, page-cache pages do not, and the
/// point of spilling is to keep the resident set within the budget.
public final class ActivationStore: @unchecked Sendable {
    public let count: Int
    public let rows: Int
    public let cols: Int
    public let budgetBytes: Int
    public let spillDirectory: String
    public let backend: any ComputeBackend
    private var memory: [Tensor?]
    private var fd: Int32 = -1
    private var spillPath: String?
    /// Wall seconds spent reading and writing the spill file (`prune --profile`).
    public private(set) var spillSeconds = 0.0

    public var bytesPerSequence: Int { rows * cols * 4 }
    public var isSpilled: Bool { fd >= 0 }

    public init(count: Int, rows: Int, cols: Int, budgetBytes: Int, spillDirectory: String, backend: any ComputeBackend = CPUBackend()) {
        self.count = count
        self.rows = rows
        self.cols = cols
        self.budgetBytes = budgetBytes
        self.spillDirectory = spillDirectory
        self.backend = backend
        memory = Array(repeating: nil, count: count)
    }

    deinit {
        if fd >= 0 { close(fd) }
        if let spillPath { unlink(spillPath) }
    }

    /// An empty store of the same shape, budget and spill directory.
    public func makeSibling() -> ActivationStore {
        ActivationStore(count: count, rows: rows, cols: cols, budgetBytes: budgetBytes, spillDirectory: spillDirectory, backend: backend)
    }

    private func openSpill() throws {
        try FileManager.default.createDirectory(atPath: spillDirectory, withIntermediateDirectories: true)
        let path = (spillDirectory as NSString).appendingPathComponent("activations-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).bin")
        let f = open(path, O_RDWR | O_CREAT | O_TRUNC, 0o600)
        guard f >= 0 else { throw PruneError.calibration("\(path): cannot create activation spill file: \(String(cString: strerror(errno)))") }
        fd = f
        spillPath = path
    }

    /// Whether the whole store fits the budget (and so never touches its file).
    public var fitsInMemory: Bool { count * bytesPerSequence <= budgetBytes }

    /// Stores sequence i from the host (an upload when it stays in memory).
    public func set(_ i: Int, _ m: Matrix) throws {
        precondition(m.rows == rows && m.cols == cols, "activation \(i) is \(m.rows)x\(m.cols), expected \(rows)x\(cols)")
        if fitsInMemory {
            memory[i] = backend.upload(m)
            return
        }
        try write(i, m)
    }

    /// Stores sequence i, a tensor on the store's backend.
    public func set(_ i: Int, _ t: Tensor) throws {
        precondition(t.rows == rows && t.cols == cols, "activation \(i) is \(t.rows)x\(t.cols), expected \(rows)x\(cols)")
        if fitsInMemory {
            memory[i] = t
            return
        }
        try write(i, backend.download(t))
    }

    /// Sequence i on the host (a download when it is in memory).
    public func get(_ i: Int) throws -> Matrix {
        if let t = memory[i] { return backend.download(t) }
        return try read(i)
    }

    /// Sequence i on the store's backend.
    public func tensor(_ i: Int) throws -> Tensor {
        if let t = memory[i] { return t }
        return backend.upload(try read(i))
    }

    /// Frees sequence i's memory once its last reader is done with it (nothing to free when the
    /// store lives in its spill file). Reading it again is a programming error.
    public func release(_ i: Int) {
        guard fitsInMemory else { return }
        memory[i] = nil
    }

    private func write(_ i: Int, _ m: Matrix) throws {
        let t0 = Date()
        defer { spillSeconds += Date().timeIntervalSince(t0) }
        if fd < 0 { try openSpill() }
        let offset = off_t(i) * off_t(bytesPerSequence)
        try m.withUnsafeBufferPointer { p in
            var done = 0
            let raw = UnsafeRawPointer(p.baseAddress!)
            while done < bytesPerSequence {
                let n = pwrite(fd, raw + done, bytesPerSequence - done, offset + off_t(done))
                if n < 0 {
                    if errno == EINTR { continue }
                    throw PruneError.calibration("\(spillPath ?? spillDirectory): cannot write activations: \(String(cString: strerror(errno)))")
                }
                done += n
            }
        }
    }

    private func read(_ i: Int) throws -> Matrix {
        guard fd >= 0 else { preconditionFailure("activation \(i) read before it was written or after it was released") }
        let t0 = Date()
        defer { spillSeconds += Date().timeIntervalSince(t0) }
        let offset = off_t(i) * off_t(bytesPerSequence)
        var m = Matrix(rows: rows, cols: cols)
        let total = bytesPerSequence
        let path = spillPath ?? spillDirectory
        try m.withUnsafeMutableBufferPointer { p in
            var done = 0
            let raw = UnsafeMutableRawPointer(p.baseAddress!)
            while done < total {
                let n = pread(fd, raw + done, total - done, offset + off_t(done))
                if n < 0 && errno == EINTR { continue }
                if n <= 0 { throw PruneError.calibration("\(path): cannot read activations back") }
                done += n
            }
        }
        return m
    }
}
