/// What merging an adjacent pair of tokens gives: the merged token and its priority (lower merges first).
struct PairMerge: Sendable {
    var rank: Int32
    var result: Int32
}

/// Pair → merge lookup, keyed by the two token ids packed in a UInt64: an open-addressing table (linear
/// probing, at most half full) with a multiplicative hash, which costs a few nanoseconds where Dictionary's
/// seeded SipHash costs tens. Merging is the inner loop of encoding a new word, so this matters.
struct MergeTable: Sendable {
    /// A key and its merge side by side, so a lookup touches one cache line.
    private struct Slot {
        /// `empty` where none (ids are below 2^31, so no pair packs to all ones).
        var key: UInt64
        var merge: PairMerge
    }

    private var slots: [Slot]
    private var shift: UInt64
    private(set) var count = 0

    private static let empty = UInt64.max

    init() {
        slots = [Slot](repeating: Slot(key: Self.empty, merge: PairMerge(rank: 0, result: 0)), count: 16)
        shift = 64 - 4
    }

    @inline(__always) static func key(_ left: Int32, _ right: Int32) -> UInt64 {
        UInt64(UInt32(bitPattern: left)) << 32 | UInt64(UInt32(bitPattern: right))
    }

    @inline(__always) private func slot(_ key: UInt64) -> Int { Int(truncatingIfNeeded: (key &* 0x9E37_79B9_7F4A_7C15) >> shift) }

    /// Adds a merge unless the pair already has one (the first listed merge of a pair wins).
    mutating func add(left: Int32, right: Int32, rank: Int32, result: Int32) {
        if (count + 1) * 2 > slots.count { grow() }
        let k = Self.key(left, right)
        let mask = slots.count - 1
        var i = slot(k)
        while slots[i].key != Self.empty {
            if slots[i].key == k { return }
            i = (i + 1) & mask
        }
        slots[i] = Slot(key: k, merge: PairMerge(rank: rank, result: result))
        count += 1
    }

    private mutating func grow() {
        let old = slots
        slots = [Slot](repeating: Slot(key: Self.empty, merge: PairMerge(rank: 0, result: 0)), count: old.count * 2)
        shift -= 1
        let mask = slots.count - 1
        for s in old where s.key != Self.empty {
            var i = slot(s.key)
            while slots[i].key != Self.empty { i = (i + 1) & mask }
            slots[i] = s
        }
    }

    @inline(__always) func lookup(_ left: Int32, _ right: Int32) -> PairMerge? {
        let k = Self.key(left, right)
        return slots.withUnsafeBufferPointer { slots in
            let mask = slots.count - 1
            var i = slot(k)
            while true {
                let found = slots[i].key
                if found == k { return slots[i].merge }
                if found == Self.empty { return nil }
                i = (i + 1) & mask
            }
        }
    }

    /// Every (packed pair, merge), in no particular order.
    var entries: [(key: UInt64, merge: PairMerge)] {
        slots.compactMap { $0.key == Self.empty ? nil : ($0.key, $0.merge) }
    }
}

/// Scratch space for `mergePairs`, reused across pieces of one encode call so that the hot loop allocates nothing.
struct MergeWorkspace {
    fileprivate var next: [Int32] = []
    fileprivate var prev: [Int32] = []
    fileprivate var heap: [Candidate] = []

    /// A pending merge of the symbol at `position` with its right neighbour.
    fileprivate struct Candidate {
        var rank: Int32
        var position: Int32
        var left: Int32
        var right: Int32

        /// Heap order: lowest rank first, then leftmost.
        @inline(__always) func precedes(_ other: Candidate) -> Bool {
            rank != other.rank ? rank < other.rank : position < other.position
        }
    }
}

/// Repeatedly merges the adjacent pair with the lowest rank (leftmost on ties) until no pair merges.
///
/// This is BPE (ranks from the merge list) and also llama2.c's "highest score first" (ranks from sorted
/// scores). Symbols live in a linked list and candidates in a binary heap, so a whole text of n symbols
/// takes O(n log n) rather than the O(n²) of rescanning after every merge. Stale heap entries (one of
/// whose symbols was merged since) are recognised on pop and skipped.
func mergePairs(_ symbols: inout [Int32], table: MergeTable, workspace ws: inout MergeWorkspace) {
    let n = symbols.count
    guard n >= 2, table.count > 0 else { return }
    if n <= shortWordLength {
        mergeShort(&symbols, table: table)
        return
    }
    // Take the buffers out of the workspace (keeping their capacity) so each is uniquely referenced here.
    var next = ws.next, prev = ws.prev, heap = ws.heap
    ws = MergeWorkspace()
    defer { ws.next = next; ws.prev = prev; ws.heap = heap }
    next.removeAll(keepingCapacity: true)
    prev.removeAll(keepingCapacity: true)
    heap.removeAll(keepingCapacity: true)
    for i in 0..<n {
        next.append(i + 1 < n ? Int32(i + 1) : -1)
        prev.append(Int32(i - 1))
    }
    for i in 0..<(n - 1) {
        if let m = table.lookup(symbols[i], symbols[i + 1]) {
            heapPush(&heap, .init(rank: m.rank, position: Int32(i), left: symbols[i], right: symbols[i + 1]))
        }
    }
    while let c = heapPop(&heap) {
        let p = Int(c.position)
        // Removed symbols carry id -1, so a stale candidate fails one of these checks.
        guard symbols[p] == c.left else { continue }
        let r = Int(next[p])
        guard r >= 0, symbols[r] == c.right, let m = table.lookup(c.left, c.right) else { continue }
        symbols[p] = m.result
        symbols[r] = -1
        let after = next[r]
        next[p] = after
        if after >= 0 { prev[Int(after)] = Int32(p) }
        let before = prev[p]
        if before >= 0, let lm = table.lookup(symbols[Int(before)], m.result) {
            heapPush(&heap, .init(rank: lm.rank, position: before, left: symbols[Int(before)], right: m.result))
        }
        if after >= 0, let rm = table.lookup(m.result, symbols[Int(after)]) {
            heapPush(&heap, .init(rank: rm.rank, position: Int32(p), left: m.result, right: symbols[Int(after)]))
        }
    }
    // Symbol 0 is never a right-hand symbol, so the list always starts there.
    var out = 0
    var i = 0
    while i >= 0 {
        symbols[out] = symbols[i]
        out += 1
        i = Int(next[i])
    }
    symbols.removeLast(n - out)
}

/// Up to this many symbols, `mergeShort`'s rescans cost less than the heap's bookkeeping.
let shortWordLength = 24

/// The same merges as the heap for a short word: the rank of each adjacent pair in a small array, rescanned
/// for the lowest (leftmost on ties) after each merge, which changes only the two pairs beside it.
private func mergeShort(_ symbols: inout [Int32], table: MergeTable) {
    var n = symbols.count
    withUnsafeTemporaryAllocation(of: PairMerge.self, capacity: n) { pairs in
        symbols.withUnsafeMutableBufferPointer { sym in
            let none = PairMerge(rank: .max, result: -1)
            for i in 0..<(n - 1) { pairs[i] = table.lookup(sym[i], sym[i + 1]) ?? none }
            while n > 1 {
                var best = 0
                for i in 1..<(n - 1) where pairs[i].rank < pairs[best].rank { best = i }
                guard pairs[best].rank != .max else { break }
                sym[best] = pairs[best].result
                // Drop symbol best+1 and pair best (now folded into the merged symbol).
                for i in (best + 1)..<(n - 1) { sym[i] = sym[i + 1] }
                for i in best..<max(n - 2, best) { pairs[i] = pairs[i + 1] }
                n -= 1
                if best > 0 { pairs[best - 1] = table.lookup(sym[best - 1], sym[best]) ?? none }
                if best < n - 1 { pairs[best] = table.lookup(sym[best], sym[best + 1]) ?? none }
            }
        }
    }
    symbols.removeLast(symbols.count - n)
}

private func heapPush(_ heap: inout [MergeWorkspace.Candidate], _ c: MergeWorkspace.Candidate) {
    heap.append(c)
    var i = heap.count - 1
    while i > 0 {
        let parent = (i - 1) / 2
        guard heap[i].precedes(heap[parent]) else { break }
        heap.swapAt(i, parent)
        i = parent
    }
}

private func heapPop(_ heap: inout [MergeWorkspace.Candidate]) -> MergeWorkspace.Candidate? {
    guard let last = heap.popLast() else { return nil }
    guard !heap.isEmpty else { return last }
    let top = heap[0]
    heap[0] = last
    var i = 0
    let n = heap.count
    while true {
        let l = 2 * i + 1
        guard l < n else { break }
        var best = l
        if l + 1 < n, heap[l + 1].precedes(heap[l]) { best = l + 1 }
        guard heap[best].precedes(heap[i]) else { break }
        heap.swapAt(i, best)
        i = best
    }
    return top
}
