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
///
/// Spill I/O is off the compute thread (issue 16, item 5): a window handed to `set` is written
/// by the store's own thread while the caller computes on (at most `writesInFlight` windows
/// wait to be written: `set` blocks beyond that), and reading window i starts the read of the
/// window the reader will want next (i plus the step between its last two reads). A window still
/// waiting to be written reads back from memory. A failed write fails the read of that window,
/// with the file's name and the error; a window that is never read again loses nothing.
/// `spillSeconds` counts only the time the caller waited.
public final class ActivationStore: @unchecked Sendable {
    public let count: Int
    public let rows: Int
    public let cols: Int
    public let budgetBytes: Int
    public let spillDirectory: String
    public let backend: any ComputeBackend
    private var memory: [Tensor?]
    /// The spill file, once the first window is written to it.
    private var file: SpillFile?
    /// Wall seconds the caller waited for the spill file (`prune --profile`).
    public var spillSeconds: Double { spill.lock.withLock { spill.waited } }

    /// Windows handed to `set` and not yet written, at most this many.
    public static let writesInFlight = 2
    /// The spill file's I/O, in order: writes, and the reads ahead queued after them.
    private let io = DispatchQueue(label: "topiary.activation-spill")
    private let writeSlots = DispatchSemaphore(value: ActivationStore.writesInFlight)
    /// What the caller and the io queue share (the queue's work holds this and the file, not
    /// the store).
    private let spill = SpillState()

    private final class SpillState: @unchecked Sendable {
        let lock = NSLock()
        /// Windows queued for writing (the latest value of each, with its write's number).
        var pendingWrites: [Int: (number: Int, values: Matrix)] = [:]
        var writesIssued = 0
        /// Why a window's last write failed.
        var writeFailures: [Int: Error] = [:]
        var readAhead: ReadAhead?
        var lastRead: Int?
        var waited = 0.0
    }

    /// A read started before its reader asked: done once `result` is set. A write of its window
    /// drops it from the store.
    private final class ReadAhead: @unchecked Sendable {
        let index: Int
        let done = DispatchSemaphore(value: 0)
        var result: Result<Matrix, Error>?
        init(_ index: Int) { self.index = index }
    }

    public var bytesPerSequence: Int { rows * cols * 4 }
    public var isSpilled: Bool { file != nil }

    public init(count: Int, rows: Int, cols: Int, budgetBytes: Int, spillDirectory: String, backend: any ComputeBackend = CPUBackend()) {
        self.count = count
        self.rows = rows
        self.cols = cols
        self.budgetBytes = budgetBytes
        self.spillDirectory = spillDirectory
        self.backend = backend
        memory = Array(repeating: nil, count: count)
    }

    /// An open spill file, closed and removed when the last holder lets go: the store, or a
    /// write or read still queued after the store has gone. (Nothing in the store's deinit calls
    /// into Dispatch: waiting there for the queue crashed with a double free when replicas'
    /// stores went away as their threads ended.)
    private final class SpillFile: @unchecked Sendable {
        let fd: Int32
        let path: String
        init(fd: Int32, path: String) {
            self.fd = fd
            self.path = path
        }
        deinit {
            close(fd)
            unlink(path)
        }
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
        file = SpillFile(fd: f, path: path)
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

    /// Queues window i for writing; waits only while `writesInFlight` windows are queued.
    private func write(_ i: Int, _ m: Matrix) throws {
        let t0 = Date()
        if file == nil { try openSpill() }
        writeSlots.wait()
        let spill = self.spill
        let number: Int = spill.lock.withLock {
            spill.writesIssued += 1
            spill.pendingWrites[i] = (spill.writesIssued, m)
            spill.writeFailures[i] = nil
            // A read ahead of window i would give the values before this write.
            if spill.readAhead?.index == i { spill.readAhead = nil }
            spill.waited += Date().timeIntervalSince(t0)
            return spill.writesIssued
        }
        let (file, bytes, slots) = (self.file!, bytesPerSequence, writeSlots)
        let offset = off_t(i) * off_t(bytes)
        io.async {
            var failure: Error?
            m.withUnsafeBufferPointer { p in
                var done = 0
                let raw = UnsafeRawPointer(p.baseAddress!)
                while done < bytes {
                    let n = pwrite(file.fd, raw + done, bytes - done, offset + off_t(done))
                    if n < 0 {
                        if errno == EINTR { continue }
                        failure = PruneError.calibration("\(file.path): cannot write activations of window \(i): \(String(cString: strerror(errno)))")
                        return
                    }
                    done += n
                }
            }
            spill.lock.withLock {
                if spill.pendingWrites[i]?.number == number {
                    spill.pendingWrites[i] = nil
                    if let failure { spill.writeFailures[i] = failure }
                }
            }
            slots.signal()
        }
    }

    /// Window i from the spill file (or from memory while its write waits), then starts reading
    /// the window the reader is expected to want next.
    private func read(_ i: Int) throws -> Matrix {
        guard let file else { preconditionFailure("activation \(i) read before it was written or after it was released") }
        let t0 = Date()
        let spill = self.spill
        defer { spill.lock.withLock { spill.waited += Date().timeIntervalSince(t0) } }
        let (pending, failure, ahead, previous): (Matrix?, Error?, ReadAhead?, Int?) = spill.lock.withLock {
            let ahead = spill.readAhead?.index == i ? spill.readAhead : nil
            if ahead != nil { spill.readAhead = nil }
            defer { spill.lastRead = i }
            return (spill.pendingWrites[i]?.values, spill.writeFailures[i], ahead, spill.lastRead)
        }
        let m: Matrix
        if let pending {
            m = pending
        } else if let failure {
            throw failure
        } else if let ahead {
            ahead.done.wait()
            m = try spill.lock.withLock { ahead.result! }.get()
        } else {
            m = try Self.readWindow(i, file: file, rows: rows, cols: cols)
        }
        let step = previous.map { i - $0 } ?? 1
        let next = i + (step > 0 ? step : 1)
        if next < count { startReadAhead(next) }
        return m
    }

    /// Reads window i on the io queue, after the writes queued before it.
    private func startReadAhead(_ i: Int) {
        // (Registered only once its read is certain to be queued: a reader waits on it.)
        guard let file else { return }
        let spill = self.spill
        let ahead = ReadAhead(i)
        let started: Bool = spill.lock.withLock {
            guard spill.pendingWrites[i] == nil, spill.writeFailures[i] == nil else { return false }
            spill.readAhead = ahead
            return true
        }
        guard started else { return }
        let (rows, cols) = (self.rows, self.cols)
        io.async {
            let result = Result { try Self.readWindow(i, file: file, rows: rows, cols: cols) }
            spill.lock.withLock { ahead.result = result }
            ahead.done.signal()
        }
    }

    private static func readWindow(_ i: Int, file: SpillFile, rows: Int, cols: Int) throws -> Matrix {
        let total = rows * cols * 4
        let offset = off_t(i) * off_t(total)
        var m = Matrix(rows: rows, cols: cols)
        try m.withUnsafeMutableBufferPointer { p in
            var done = 0
            let raw = UnsafeMutableRawPointer(p.baseAddress!)
            while done < total {
                let n = pread(file.fd, raw + done, total - done, offset + off_t(done))
                if n < 0 && errno == EINTR { continue }
                if n <= 0 { throw PruneError.calibration("\(file.path): cannot read activations of window \(i) back") }
                done += n
            }
        }
        return m
    }
}
