import Dispatch
import Synchronization

/// Element-wise work split over the BLAS thread count, in fixed chunks: which thread does a chunk
/// varies, what a chunk computes and the order in which partial sums are added do not, so results
/// are the same bit for bit whatever the thread count.
public enum Parallel {
    /// Elements per chunk.
    public static let chunk = 1 << 16

    /// Calls `body` on consecutive ranges of `chunk` elements (the last one shorter) covering
    /// 0..<count, concurrently over `CPUBackend.threadCount` threads.
    public static func forEach(_ count: Int, chunk: Int = Parallel.chunk, _ body: (Range<Int>) -> Void) {
        precondition(chunk > 0)
        let chunks = (count + chunk - 1) / chunk
        if chunks <= 1 || CPUBackend.threadCount <= 1 {
            for c in 0..<chunks { body((c * chunk)..<min(count, (c + 1) * chunk)) }
            return
        }
        withoutActuallyEscaping(body) { body in
            let box = UnsafeSendable(body)
            DispatchQueue.concurrentPerform(iterations: min(CPUBackend.threadCount, chunks)) { worker in
                var c = worker
                while c < chunks {
                    box.value((c * chunk)..<min(count, (c + 1) * chunk))
                    c += CPUBackend.threadCount
                }
            }
        }
    }

    /// Calls `body` once for every task in 0..<count, concurrently over `CPUBackend.threadCount`
    /// threads, each thread taking the next task when it is free (for tasks of unequal cost).
    /// Which thread runs a task varies; a task must compute the same bits wherever it runs.
    public static func forEachTask(_ count: Int, _ body: (Int) -> Void) {
        forEachTask(count) { (_: Int, task: Int) in body(task) }
    }

    /// How many threads `forEachTask` runs `count` tasks on: its `worker` argument is below this.
    public static func workers(for count: Int) -> Int {
        count <= 1 || CPUBackend.threadCount <= 1 ? 1 : min(CPUBackend.threadCount, count)
    }

    /// `forEachTask`, telling `body` which of the `workers(for: count)` threads runs it: no two
    /// tasks run at once with the same worker, so scratch taken once for the call, a part per
    /// worker, serves every task (instead of a malloc and free per task).
    public static func forEachTask(_ count: Int, _ body: (_ worker: Int, _ task: Int) -> Void) {
        let workers = workers(for: count)
        if workers <= 1 {
            for task in 0..<count { body(0, task) }
            return
        }
        let next = Atomic<Int>(0)
        withoutActuallyEscaping(body) { body in
            let box = UnsafeSendable(body)
            DispatchQueue.concurrentPerform(iterations: workers) { worker in
                while true {
                    let task = next.wrappingAdd(1, ordering: .relaxed).oldValue
                    if task >= count { break }
                    box.value(worker, task)
                }
            }
        }
    }

    /// `forEachTask` with `floats` of scratch for each task: taken once for the call, a part per
    /// worker at a 64-byte boundary, instead of a malloc and free per task. Its contents are
    /// undefined when a task starts.
    static func forEachTask(_ count: Int, scratch floats: Int, _ body: (_ scratch: UnsafeMutablePointer<Float>, _ task: Int) -> Void) {
        let stride = (floats + 15) / 16 * 16
        let storage = Storage(count: workers(for: count) * stride, zeroed: false)
        let base = UnsafeSendable(storage.pointer)
        withExtendedLifetime(storage) {
            forEachTask(count) { worker, task in body(base.value + worker * stride, task) }
        }
    }

    /// Σ of `body` over chunks of 0..<count, each chunk's value computed once and added in chunk order.
    public static func sum(_ count: Int, _ body: (Range<Int>) -> Double) -> Double {
        sums(count, width: 1) { range, out in out[0] = body(range) }[0]
    }

    /// `width` sums over the same chunks at once (one pass over data that several sums read):
    /// `body` writes a chunk's `width` values into `out`, and each sum adds its values over the
    /// chunks in chunk order from 0, as `sum` adds one, so each has the bits `sum` would give it.
    public static func sums(_ count: Int, width: Int, _ body: (Range<Int>, UnsafeMutableBufferPointer<Double>) -> Void) -> [Double] {
        let chunks = (count + chunk - 1) / chunk
        var partial = [Double](repeating: 0, count: chunks * width)
        partial.withUnsafeMutableBufferPointer { out in
            let sink = UnsafeSendable(out)
            forEach(count) { range in
                let c = range.lowerBound / chunk
                body(range, UnsafeMutableBufferPointer(rebasing: sink.value[(c * width)..<((c + 1) * width)]))
            }
        }
        var totals = [Double](repeating: 0, count: width)
        for c in 0..<chunks { for j in 0..<width { totals[j] += partial[c * width + j] } }
        return totals
    }
}

/// Carries a value into concurrently run closures that use it safely (disjoint ranges).
@usableFromInline
struct UnsafeSendable<T>: @unchecked Sendable {
    @usableFromInline let value: T
    @usableFromInline init(_ value: T) { self.value = value }
}
