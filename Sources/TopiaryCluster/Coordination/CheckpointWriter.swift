import Foundation

/// Writes checkpoints on a thread of its own, so that a pruned block is written (and synced, and
/// its event appended) while the next block computes (issue 16, item 5). At most one write is in
/// flight: `submit` first waits for the one before, so a run holds at most one finished block
/// beyond the one it computes. A write that failed fails the next `submit` or `wait`, with its own
/// error; nothing after it is written.
final class CheckpointWriter: @unchecked Sendable {
    private let queue = DispatchQueue(label: "topiary.checkpoint-writer")
    private let group = DispatchGroup()
    private let lock = NSLock()
    private var failure: Error?

    /// Waits for the write in flight, then starts `write`.
    func submit(_ write: @escaping () throws -> Void) throws {
        try wait()
        let box = Box(write)
        queue.async(group: group) {
            do { try box.write() } catch { self.lock.withLock { self.failure = error } }
        }
    }

    /// Returns once every submitted write is done; throws the error of one that failed.
    func wait() throws {
        group.wait()
        if let failure = lock.withLock({ failure }) { throw failure }
    }

    private struct Box: @unchecked Sendable {
        let write: () throws -> Void
        init(_ write: @escaping () throws -> Void) { self.write = write }
    }
}
