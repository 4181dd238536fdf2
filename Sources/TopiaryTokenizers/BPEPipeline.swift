import Foundation

/// A token matched as a whole string in the raw text before anything else (Hugging Face "added tokens").
struct AddedToken: Sendable {
    var id: Int32
    var content: String
    var scalars: [UInt32]
    /// Special (control) tokens produce nothing when decoding.
    var special: Bool
    var lstrip = false
    var rstrip = false
    var singleWord = false
    var normalized = false
}

/// The pattern of a Replace normalizer or decoder.
enum ReplacePattern: Sendable {
    case literal(String)
    case regex(RegexBox)
}

/// One normalization step, applied to each stretch of text between added tokens.
enum NormalizerStep: Sendable {
    case prepend(String)
    case replace(ReplacePattern, content: String)
    case nfc, nfd, nfkc, nfkd, lowercase
    case strip(left: Bool, right: Bool)

    func apply(_ text: [UInt32]) -> [UInt32] {
        switch self {
        case .prepend(let p):
            return text.isEmpty ? text : [UInt32](scalarsOf: p) + text
        case .replace(.literal(let pattern), let content):
            return replaceLiteral(text, [UInt32](scalarsOf: pattern), [UInt32](scalarsOf: content))
        case .replace(.regex(let box), let content):
            let s = text.asString
            let replaced = box.regex.stringByReplacingMatches(
                in: s, range: NSRange(location: 0, length: s.utf16.count),
                withTemplate: NSRegularExpression.escapedTemplate(for: content))
            return [UInt32](scalarsOf: replaced)
        case .nfc: return normalizeRuns(text, unchangedBelow: 0x300) { $0.precomposedStringWithCanonicalMapping }
        case .nfd: return normalizeRuns(text, unchangedBelow: 0xC0) { $0.decomposedStringWithCanonicalMapping }
        case .nfkc: return normalizeRuns(text, unchangedBelow: 0xA0) { $0.precomposedStringWithCompatibilityMapping }
        case .nfkd: return normalizeRuns(text, unchangedBelow: 0xA0) { $0.decomposedStringWithCompatibilityMapping }
        case .lowercase: return [UInt32](scalarsOf: text.asString.lowercased())
        case .strip(let left, let right):
            var lo = 0, hi = text.count
            if left { while lo < hi, CharClass.of(text[lo]) & CharClass.space != 0 { lo += 1 } }
            if right { while hi > lo, CharClass.of(text[hi - 1]) & CharClass.space != 0 { hi -= 1 } }
            return Array(text[lo..<hi])
        }
    }
}

/// A Unicode normalization applied only where it can change something. The text is cut before each ASCII
/// scalar: ASCII scalars are starters that no normalization form changes and that never compose with what
/// precedes them, so each run (one ASCII scalar or the text start, then non-ASCII scalars) normalizes on its
/// own. Runs whose scalars are all below `threshold` (where the form changes nothing: U+0300 for NFC, the
/// first letter with a decomposition U+00C0 for NFD, U+00A0 for the compatibility forms) are copied; the
/// others go through Foundation. Most text is thereby copied, not converted to String and back.
func normalizeRuns(_ text: [UInt32], unchangedBelow threshold: UInt32, _ normalize: (String) -> String) -> [UInt32] {
    guard var k = text.firstIndex(where: { $0 >= threshold }) else { return text }
    var out: [UInt32] = []
    out.reserveCapacity(text.count + 16)
    text.withUnsafeBufferPointer { t in
        var copied = 0
        while k < t.count {
            // The run holding scalar k: from the ASCII scalar before it (or the text start) to the next ASCII one.
            var start = k
            while start > copied, t[start] >= 0x80 { start -= 1 }
            var end = k + 1
            while end < t.count, t[end] >= 0x80 { end += 1 }
            out.append(contentsOf: UnsafeBufferPointer(rebasing: t[copied..<start]))
            out.append(contentsOf: [UInt32](scalarsOf: normalize(Array(t[start..<end]).asString)))
            copied = end
            k = end
            while k < t.count, t[k] < threshold { k += 1 }
        }
        out.append(contentsOf: UnsafeBufferPointer(rebasing: t[copied...]))
    }
    return out
}

func replaceLiteral(_ text: [UInt32], _ pattern: [UInt32], _ content: [UInt32]) -> [UInt32] {
    guard !pattern.isEmpty, text.count >= pattern.count else { return text }
    var out: [UInt32] = []
    out.reserveCapacity(text.count)
    var i = 0
    while i < text.count {
        if text[i] == pattern[0], i + pattern.count <= text.count, text[i..<(i + pattern.count)].elementsEqual(pattern) {
            out.append(contentsOf: content)
            i += pattern.count
        } else {
            out.append(text[i])
            i += 1
        }
    }
    return out
}

/// One decoding step over the list of token strings, as Hugging Face decoders work.
enum DecoderStep: Sendable {
    case byteLevel
    case replace(ReplacePattern, content: String)
    case byteFallback
    case fuse
    case strip(content: Unicode.Scalar, start: Int, stop: Int)
    case metaspace(replacement: Unicode.Scalar, prependScheme: PrependScheme)

    func apply(_ tokens: [String]) -> [String] {
        switch self {
        case .byteLevel:
            // Bytes of the whole sequence first, so characters split across tokens come back whole.
            var bytes: [UInt8] = []
            for t in tokens where !ByteLevelMap.bytes(of: t, into: &bytes) { bytes.append(contentsOf: t.utf8) }
            return [String(decoding: bytes, as: UTF8.self)]
        case .replace(.literal(let pattern), let content):
            return tokens.map { $0.replacingOccurrences(of: pattern, with: content, options: .literal) }
        case .replace(.regex(let box), let content):
            return tokens.map {
                box.regex.stringByReplacingMatches(in: $0, range: NSRange(location: 0, length: $0.utf16.count),
                                                   withTemplate: NSRegularExpression.escapedTemplate(for: content))
            }
        case .byteFallback:
            var out: [String] = []
            var pending: [UInt8] = []
            func flush() {
                guard !pending.isEmpty else { return }
                if let s = String(validating: pending, as: UTF8.self) {
                    out.append(s)
                } else {
                    // Invalid UTF-8: one replacement character per byte, as Hugging Face does.
                    out.append(contentsOf: repeatElement("\u{FFFD}", count: pending.count))
                }
                pending.removeAll()
            }
            for t in tokens {
                if let b = byteTokenValue(t) { pending.append(b) } else { flush(); out.append(t) }
            }
            flush()
            return out
        case .fuse:
            return [tokens.joined()]
        case .strip(let content, let start, let stop):
            return tokens.map { t in
                var scalars = Array(t.unicodeScalars)
                var lo = 0
                while lo < start, lo < scalars.count, scalars[lo] == content { lo += 1 }
                var cut = 0
                while cut < stop, scalars.count - cut > lo, scalars[scalars.count - 1 - cut] == content { cut += 1 }
                scalars = Array(scalars[lo..<(scalars.count - cut)])
                var view = String.UnicodeScalarView()
                view.append(contentsOf: scalars)
                return String(view)
            }
        case .metaspace(let replacement, let scheme):
            return tokens.enumerated().map { k, t in
                var s = String(String.UnicodeScalarView(t.unicodeScalars.map { $0 == replacement ? " " : $0 }))
                if k == 0, scheme != .never, s.hasPrefix(" ") { s.removeFirst() }
                return s
            }
        }
    }
}

/// The byte of a `<0xXX>` token, else nil.
func byteTokenValue(_ t: String) -> UInt8? {
    let u = Array(t.utf8)
    guard u.count == 6, u[0] == UInt8(ascii: "<"), u[1] == UInt8(ascii: "0"), u[2] == UInt8(ascii: "x"),
          u[5] == UInt8(ascii: ">") else { return nil }
    return UInt8(String(decoding: u[3..<5], as: UTF8.self), radix: 16)
}

/// The BPE model: vocabulary, merges, and what to do with characters outside the vocabulary.
struct BPEModel: Sendable {
    /// Model vocabulary by id (nil where an id has no model token, e.g. it is only an added token).
    var tokens: [String?]
    var vocab: [String: Int32]
    var merges: MergeTable
    /// The merges in rank order, for export.
    var mergeList: [(String, String)]
    /// Single-scalar tokens: a flat table below 0x400 (covers all byte-level characters), a dictionary above.
    var smallScalarIDs: [Int32]
    var scalarIDs: [UInt32: Int32]
    /// `<0xXX>` token of each byte when byte fallback is on.
    var byteFallbackIDs: [Int32]?
    var unknownToken: String?
    var unknownID: Int32?
    var fuseUnknown: Bool
    /// A piece that is itself a token is emitted whole, without merging (LLaMA-3).
    var ignoreMerges: Bool

    static let smallTableSize = 0x400

    /// Builds the lookup tables. Merges whose parts or result are not in the vocabulary are skipped.
    init(tokens: [String?], merges: [(String, String)], byteFallback: Bool, unknownToken: String?,
         fuseUnknown: Bool, ignoreMerges: Bool) {
        self.tokens = tokens
        var vocab: [String: Int32] = [:]
        vocab.reserveCapacity(tokens.count)
        for (id, t) in tokens.enumerated() {
            if let t, vocab[t] == nil { vocab[t] = Int32(id) }
        }
        self.vocab = vocab
        var table = MergeTable()
        var kept: [(String, String)] = []
        kept.reserveCapacity(merges.count)
        for (a, b) in merges {
            guard let l = vocab[a], let r = vocab[b], let m = vocab[a + b] else { continue }
            table.add(left: l, right: r, rank: Int32(kept.count), result: m)
            kept.append((a, b))
        }
        self.merges = table
        mergeList = kept
        var small = [Int32](repeating: -1, count: Self.smallTableSize)
        var large: [UInt32: Int32] = [:]
        for (id, t) in tokens.enumerated() {
            guard let t else { continue }
            var it = t.unicodeScalars.makeIterator()
            guard let s = it.next(), it.next() == nil, vocab[t] == Int32(id) else { continue }
            if s.value < Self.smallTableSize { small[Int(s.value)] = Int32(id) } else { large[s.value] = Int32(id) }
        }
        smallScalarIDs = small
        scalarIDs = large
        if byteFallback {
            var ids = [Int32](repeating: -1, count: 256)
            for b in 0..<256 { ids[b] = vocab[String(format: "<0x%02X>", b)] ?? -1 }
            byteFallbackIDs = ids
        } else {
            byteFallbackIDs = nil
        }
        self.unknownToken = unknownToken
        unknownID = unknownToken.flatMap { vocab[$0] }
        self.fuseUnknown = fuseUnknown
        self.ignoreMerges = ignoreMerges
    }

    @inline(__always) func id(ofScalar v: UInt32) -> Int32 {
        v < Self.smallTableSize ? smallScalarIDs[Int(v)] : (scalarIDs[v] ?? -1)
    }

    /// Appends the ids of one piece.
    func encode(_ piece: Slice<UnsafeBufferPointer<UInt32>>, into out: inout [Int32], state: inout EncodeState) {
        if ignoreMerges, let id = vocab[Array(piece).asString] {
            out.append(id)
            return
        }
        var symbols = state.symbols
        state.symbols = []
        defer { state.symbols = symbols }
        symbols.removeAll(keepingCapacity: true)
        var lastWasUnknown = false
        for v in piece {
            let id = self.id(ofScalar: v)
            if id >= 0 {
                symbols.append(id)
                lastWasUnknown = false
                continue
            }
            if let fallback = byteFallbackIDs {
                state.utf8.removeAll(keepingCapacity: true)
                appendUTF8(v, to: &state.utf8)
                if state.utf8.allSatisfy({ fallback[Int($0)] >= 0 }) {
                    for b in state.utf8 { symbols.append(fallback[Int(b)]) }
                    lastWasUnknown = false
                    continue
                }
            }
            // No token and no byte token: the unknown token (consecutive ones fused if asked), else dropped.
            if let unk = unknownID, !(fuseUnknown && lastWasUnknown) { symbols.append(unk) }
            lastWasUnknown = true
        }
        mergePairs(&symbols, table: merges, workspace: &state.workspace)
        out.append(contentsOf: symbols)
    }
}

/// Per-call scratch state: the piece cache and reusable buffers (kept out of the tokenizer so it stays immutable).
struct EncodeState {
    var cache = PieceCache()
    var symbols: [Int32] = []
    var utf8: [UInt8] = []
    var workspace = MergeWorkspace()
}

/// The ids of each piece encoded so far (a text repeats its words, so most pieces are found here and never
/// merged): an open-addressing table (linear probing, at most half full) over piece scalars kept in one flat
/// buffer and ids in another, hashed by a multiply-xor loop, so neither lookup nor insertion allocates per piece.
struct PieceCache {
    private struct Slot {
        var hash: UInt64 = 0
        /// -1 for an empty slot.
        var keyStart: Int32 = -1
        var keyCount: Int32 = 0
        var valueStart: Int32 = 0
        var valueCount: Int32 = 0
    }

    private var slots = [Slot](repeating: Slot(), count: 1 << 12)
    private var keys: [UInt32] = []
    private var values: [Int32] = []
    private var count = 0

    @inline(__always) static func hash(_ s: UnsafeBufferPointer<UInt32>, _ r: Range<Int>) -> UInt64 {
        var h: UInt64 = 0x9E37_79B9_7F4A_7C15 ^ UInt64(r.count)
        for i in r { h = (h ^ UInt64(s[i])) &* 0xFF51_AFD7_ED55_8CCD }
        return h ^ (h >> 32)
    }

    /// Appends the cached ids of `s[r]` to `out`; false when the piece is not cached.
    @inline(__always)
    func append(_ s: UnsafeBufferPointer<UInt32>, _ r: Range<Int>, hash: UInt64, to out: inout [Int32]) -> Bool {
        slots.withUnsafeBufferPointer { slots in
            let mask = slots.count - 1
            var i = Int(truncatingIfNeeded: hash) & mask
            while slots[i].keyStart >= 0 {
                let slot = slots[i]
                if slot.hash == hash, Int(slot.keyCount) == r.count, matches(slot, s, r) {
                    // Usually one or two ids: a plain loop beats append(contentsOf:)'s generic path.
                    let v = Int(slot.valueStart)
                    values.withUnsafeBufferPointer { values in
                        for k in v..<(v + Int(slot.valueCount)) { out.append(values[k]) }
                    }
                    return true
                }
                i = (i + 1) & mask
            }
            return false
        }
    }

    @inline(__always) private func matches(_ slot: Slot, _ s: UnsafeBufferPointer<UInt32>, _ r: Range<Int>) -> Bool {
        keys.withUnsafeBufferPointer { keys in
            var k = Int(slot.keyStart)
            for i in r {
                if keys[k] != s[i] { return false }
                k += 1
            }
            return true
        }
    }

    /// Records `ids` as the encoding of `s[r]` (which is not cached yet).
    mutating func insert(_ s: UnsafeBufferPointer<UInt32>, _ r: Range<Int>, hash: UInt64, ids: ArraySlice<Int32>) {
        if (count + 1) * 2 > slots.count { grow() }
        var slot = Slot(hash: hash, keyStart: Int32(keys.count), keyCount: Int32(r.count),
                        valueStart: Int32(values.count), valueCount: Int32(ids.count))
        keys.append(contentsOf: UnsafeBufferPointer(rebasing: s[r]))
        values.append(contentsOf: ids)
        let mask = slots.count - 1
        var i = Int(truncatingIfNeeded: hash) & mask
        while slots[i].keyStart >= 0 { i = (i + 1) & mask }
        swap(&slots[i], &slot)
        count += 1
    }

    private mutating func grow() {
        let old = slots
        slots = [Slot](repeating: Slot(), count: old.count * 2)
        let mask = slots.count - 1
        for slot in old where slot.keyStart >= 0 {
            var i = Int(truncatingIfNeeded: slot.hash) & mask
            while slots[i].keyStart >= 0 { i = (i + 1) & mask }
            slots[i] = slot
        }
    }
}

/// A Hugging Face style tokenization pipeline around a BPE model: added tokens, normalizers, pre-tokenizers,
/// the model, the post-processor template, and the decoders.
struct BPEPipeline: Sendable {
    var model: BPEModel
    let addedTokens: [AddedToken]
    var normalizers: [NormalizerStep]
    var preTokenizers: [PreTokenizerStep]
    /// nil: no decoder, tokens are joined with spaces (as Hugging Face does).
    var decoders: [DecoderStep]?
    /// Ids the post-processor template puts before and after the text.
    var prefixIDs: [Int32]
    var suffixIDs: [Int32]
    var bosID: Int32?
    var eosID: Int32?

    private(set) var vocabularySize = 0
    /// For each id: decodes to nothing (control tokens).
    private var silent: [Bool] = []
    /// Added tokens by first scalar, longest first, so the scan finds the leftmost-longest match.
    private var addedByFirstScalar: [UInt32: [Int]] = [:]
    private var asciiStartsAdded = [Bool](repeating: false, count: 128)

    /// Pieces up to this length are cached per call: longer ones rarely repeat.
    static let cacheableLength = 64

    init(model: BPEModel, addedTokens: [AddedToken], normalizers: [NormalizerStep], preTokenizers: [PreTokenizerStep],
         decoders: [DecoderStep]?, prefixIDs: [Int32], suffixIDs: [Int32], bosID: Int32?, eosID: Int32?) {
        self.model = model
        self.addedTokens = addedTokens
        self.normalizers = normalizers
        self.preTokenizers = preTokenizers
        self.decoders = decoders
        self.prefixIDs = prefixIDs
        self.suffixIDs = suffixIDs
        self.bosID = bosID
        self.eosID = eosID
        indexAddedTokens()
    }

    private mutating func indexAddedTokens() {
        let maxAdded = addedTokens.map { Int($0.id) }.max() ?? -1
        vocabularySize = max(model.tokens.count, maxAdded + 1)
        silent = [Bool](repeating: false, count: vocabularySize)
        for t in addedTokens where t.special { silent[Int(t.id)] = true }
        addedByFirstScalar = [:]
        asciiStartsAdded = [Bool](repeating: false, count: 128)
        for (k, t) in addedTokens.enumerated() where !t.scalars.isEmpty {
            addedByFirstScalar[t.scalars[0], default: []].append(k)
            if t.scalars[0] < 128 { asciiStartsAdded[Int(t.scalars[0])] = true }
        }
        for key in addedByFirstScalar.keys {
            addedByFirstScalar[key]!.sort { addedTokens[$0].scalars.count > addedTokens[$1].scalars.count }
        }
    }

    var addsBOS: Bool { !prefixIDs.isEmpty }

    func encode(_ text: String, addBOS: Bool?) -> [Int] {
        let scalars = [UInt32](scalarsOf: text)
        var ids: [Int32] = []
        ids.reserveCapacity(scalars.count / 3 + 4)
        switch addBOS {
        case nil, true?:
            if !prefixIDs.isEmpty { ids.append(contentsOf: prefixIDs) } else if addBOS == true, let b = bosID { ids.append(b) }
        case false?:
            break
        }
        var state = EncodeState()
        var textStart = 0
        scanAddedTokens(scalars) { range, added in
            if range.lowerBound > textStart { encodeText(scalars, textStart..<range.lowerBound, into: &ids, state: &state) }
            ids.append(added)
            textStart = range.upperBound
        }
        if textStart < scalars.count { encodeText(scalars, textStart..<scalars.count, into: &ids, state: &state) }
        if addBOS != false { ids.append(contentsOf: suffixIDs) }
        return ids.map(Int.init)
    }

    /// Calls `found` with the range (including any whitespace it strips) and id of each added token, left to right.
    private func scanAddedTokens(_ s: [UInt32], _ found: (Range<Int>, Int32) -> Void) {
        guard !addedTokens.isEmpty else { return }
        var i = 0
        var lastEnd = 0
        while i < s.count {
            // Skip, cheaply, the scalars that start no added token.
            if s[i] < 128 {
                let next = s.withUnsafeBufferPointer { s in
                    asciiStartsAdded.withUnsafeBufferPointer { starts in
                        var j = i
                        while j < s.count, s[j] < 128, !starts[Int(s[j])] { j += 1 }
                        return j
                    }
                }
                if next > i {
                    i = next
                    continue
                }
            }
            let v = s[i]
            if v >= 128, addedByFirstScalar[v] == nil {
                i += 1
                continue
            }
            var matched = false
            for k in addedByFirstScalar[v] ?? [] {
                let t = addedTokens[k]
                let end = i + t.scalars.count
                guard end <= s.count, s[i..<end].elementsEqual(t.scalars) else { continue }
                if t.singleWord, (i > 0 && isWordScalar(s[i - 1])) || (end < s.count && isWordScalar(s[end])) { continue }
                var lo = i, hi = end
                if t.lstrip { while lo > lastEnd, CharClass.of(s[lo - 1]) & CharClass.space != 0 { lo -= 1 } }
                if t.rstrip { while hi < s.count, CharClass.of(s[hi]) & CharClass.space != 0 { hi += 1 } }
                found(lo..<hi, t.id)
                lastEnd = hi
                i = hi
                matched = true
                break
            }
            if !matched { i += 1 }
        }
    }

    private func isWordScalar(_ v: UInt32) -> Bool {
        v == 0x5F || CharClass.of(v) & (CharClass.letter | CharClass.number) != 0
    }

    /// Normalizes, pre-tokenizes and encodes one stretch of text between added tokens.
    private func encodeText(_ scalars: [UInt32], _ range: Range<Int>, into ids: inout [Int32], state: inout EncodeState) {
        var text = Array(scalars[range])
        for n in normalizers { text = n.apply(text) }
        guard !text.isEmpty else { return }
        var pieces = Pieces(text, startsText: range.lowerBound == 0)
        for p in preTokenizers { p.apply(&pieces) }
        pieces.scalars.withUnsafeBufferPointer { s in
            for r in pieces.ranges {
                guard r.count <= Self.cacheableLength else {
                    model.encode(s[r], into: &ids, state: &state)
                    continue
                }
                let hash = PieceCache.hash(s, r)
                if state.cache.append(s, r, hash: hash, to: &ids) { continue }
                let start = ids.count
                model.encode(s[r], into: &ids, state: &state)
                state.cache.insert(s, r, hash: hash, ids: ids[start...])
            }
        }
    }

    /// The string of a token id (added tokens first, as Hugging Face does), nil if out of range or unassigned.
    func tokenString(_ id: Int) -> String? {
        guard id >= 0, id < vocabularySize else { return nil }
        if let t = addedTokens.first(where: { $0.id == id }) { return t.content }
        return id < model.tokens.count ? model.tokens[id] : nil
    }

    /// Hugging Face's decode: the token strings (added tokens first), less the special ones when
    /// `skipSpecialTokens`, through the decoders.
    func decode(_ ids: [Int], skipSpecialTokens: Bool = true) -> String {
        var tokens: [String] = []
        tokens.reserveCapacity(ids.count)
        let addedIDs = Dictionary(addedTokens.map { (Int($0.id), $0.content) }, uniquingKeysWith: { a, _ in a })
        for id in ids where id >= 0 && id < vocabularySize && !(skipSpecialTokens && silent[id]) {
            if let t = addedIDs[id] ?? (id < model.tokens.count ? model.tokens[id] : nil) { tokens.append(t) }
        }
        guard let decoders else { return tokens.joined(separator: " ") }
        for d in decoders { tokens = d.apply(tokens) }
        return tokens.joined()
    }
}
