#if canImport(Glibc)
import Glibc
#endif
import Foundation
import TopiaryModel

/// The blocks of the ADMM round a run keeps, beside the store's current blocks: each as
/// `kept-rRRRR-block-NNNNN.safetensors` in the store's directory, a hard link to the file the
/// round wrote (a copy where the filesystem has no hard links). Block files are always replaced by
/// rename, so a link keeps the round's bytes after later rounds overwrite `block-NNNNN`.
extension BlockFileStore {
    public func keptPath(_ index: Int, round: Int) -> String {
        (directory as NSString).appendingPathComponent(String(format: "kept-r%04d-block-%05d.safetensors", round, index))
    }

    /// Links (or copies) `from` to `to`, atomically replacing `to`.
    static func linkOrCopy(_ from: String, to: String) throws {
        // A temporary name that a run directory's clean-up removes (.NAME.tmp-PID-...).
        let temp = ((to as NSString).deletingLastPathComponent as NSString)
            .appendingPathComponent("." + (to as NSString).lastPathComponent + ".tmp-\(getpid())-link")
        _ = unlink(temp)
        if link(from, temp) == 0 {
            guard rename(temp, to) == 0 else {
                let reason = String(cString: strerror(errno))
                _ = unlink(temp)
                throw CheckpointError.io(path: to, detail: "cannot rename \(temp) to it: \(reason)")
            }
            return
        }
        guard let data = FileManager.default.contents(atPath: from) else {
            throw CheckpointError.io(path: from, detail: "cannot read it to keep a copy")
        }
        try AtomicFile.write(data, to: to)
    }

    /// Keeps the current files of `indices` as round `round`'s.
    public func keep(_ indices: [Int], round: Int) throws {
        for i in indices { try Self.linkOrCopy(path(i), to: keptPath(i, round: round)) }
    }

    /// Puts round `round`'s kept file of block `index` back as the block's file.
    public func restore(_ index: Int, round: Int) throws {
        try Self.linkOrCopy(keptPath(index, round: round), to: path(index))
    }

    /// Removes the kept files of every round but `round` (all when nil).
    public func removeKept(except round: Int?) {
        let keep = round.map { String(format: "kept-r%04d-", $0) }
        for name in (try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? []
        where name.hasPrefix("kept-r") && name.hasSuffix(".safetensors") && (keep == nil || !name.hasPrefix(keep!)) {
            _ = unlink((directory as NSString).appendingPathComponent(name))
        }
    }
}
