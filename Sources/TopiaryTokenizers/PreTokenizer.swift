import Foundation

/// A text cut into pieces: ranges into one scalar buffer, in order, never empty. The BPE model encodes each
/// piece on its own. Ranges (rather than arrays per piece) keep a 1 MB text from becoming 300k small allocations.
struct Pieces {
    var scalars: [UInt32]
    var ranges: [Range<Int>]
    /// Whether the first piece starts at the very beginning of the original text (Metaspace "first" needs it).
    var startsText: Bool

    init(_ scalars: [UInt32], startsText: Bool) {
        self.scalars = scalars
        ranges = scalars.isEmpty ? [] : [0..<scalars.count]
        self.startsText = startsText
    }
}

/// How a split keeps the delimiters (the pattern's matches), as in Hugging Face tokenizers.
enum SplitBehavior: String, Sendable {
    case removed = "Removed"
    case isolated = "Isolated"
    case mergedWithPrevious = "MergedWithPrevious"
    case mergedWithNext = "MergedWithNext"
    case contiguous = "Contiguous"
}

/// The pattern of a Split pre-tokenizer.
enum SplitPattern: Sendable {
    /// Each scalar of class \p{N} on its own.
    case digit
    /// Each whitespace scalar on its own.
    case whitespace
    /// A literal string.
    case literal([UInt32])
    /// A regular expression, compiled by our own engine (SplitRegex).
    case regex(SplitRegex)

    static let gpt2Source = #"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"#
    static let llama3Source =
        #"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"#

    static let qwen2Source =
        #"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"#

    /// GPT-2's pattern (also what a ByteLevel pre-tokenizer with use_regex splits by).
    static let gpt2 = SplitPattern.regex(SplitRegex.gpt2)
    /// LLaMA-3's pattern (numbers in groups of up to three).
    static let llama3 = SplitPattern.regex(SplitRegex.llama3)
    /// Qwen2's pattern (single digits).
    static let qwen2 = SplitPattern.regex(SplitRegex.qwen2)
}

extension SplitRegex {
    // Both patterns are constants that the tests compile; failing here would be a bug in the engine.
    static let gpt2 = try! SplitRegex(SplitPattern.gpt2Source)
    static let llama3 = try! SplitRegex(SplitPattern.llama3Source)
    static let qwen2 = try! SplitRegex(SplitPattern.qwen2Source)
}

/// NSRegularExpression (for Replace normalizers and decoders) is immutable and documented as safe to share
/// between threads.
struct RegexBox: @unchecked Sendable {
    let source: String
    let regex: NSRegularExpression
    init(_ source: String) throws {
        self.source = source
        regex = try NSRegularExpression(pattern: source)
    }
}

/// Where Metaspace puts the replacement character in front of a piece.
enum PrependScheme: String, Sendable {
    case always, first, never
}

/// One pre-tokenization step of a Hugging Face pipeline.
enum PreTokenizerStep: Sendable {
    case byteLevel(addPrefixSpace: Bool, useRegex: Bool)
    case split(SplitPattern, behavior: SplitBehavior, invert: Bool)
    case metaspace(replacement: UInt32, prependScheme: PrependScheme, split: Bool)

    func apply(_ pieces: inout Pieces) {
        switch self {
        case .byteLevel(let addPrefixSpace, let useRegex):
            if addPrefixSpace { prependToPieces(&pieces, 0x20, when: { _ in true }) }
            if useRegex { splitPieces(&pieces, pattern: .gpt2, behavior: .isolated, invert: false) }
            mapToByteLevel(&pieces)
        case .split(let pattern, let behavior, let invert):
            splitPieces(&pieces, pattern: pattern, behavior: behavior, invert: invert)
        case .metaspace(let replacement, let scheme, let split):
            replaceSpaces(&pieces, with: replacement)
            switch scheme {
            case .always: prependToPieces(&pieces, replacement, when: { _ in true })
            case .first:
                let startsText = pieces.startsText
                prependToPieces(&pieces, replacement, when: { $0 == 0 && startsText })
            case .never: break
            }
            if split { splitPieces(&pieces, pattern: .literal([replacement]), behavior: .mergedWithNext, invert: false) }
        }
    }
}

/// Puts `scalar` in front of each piece that does not already start with it (and for which `when(index)` holds).
private func prependToPieces(_ pieces: inout Pieces, _ scalar: UInt32, when: (Int) -> Bool) {
    var buffer: [UInt32] = []
    buffer.reserveCapacity(pieces.scalars.count + pieces.ranges.count)
    var ranges: [Range<Int>] = []
    ranges.reserveCapacity(pieces.ranges.count)
    for (k, r) in pieces.ranges.enumerated() {
        let start = buffer.count
        if pieces.scalars[r.lowerBound] != scalar && when(k) { buffer.append(scalar) }
        buffer.append(contentsOf: pieces.scalars[r])
        ranges.append(start..<buffer.count)
    }
    pieces.scalars = buffer
    pieces.ranges = ranges
}

private func replaceSpaces(_ pieces: inout Pieces, with replacement: UInt32) {
    for r in pieces.ranges {
        for i in r where pieces.scalars[i] == 0x20 { pieces.scalars[i] = replacement }
    }
}

/// Rewrites each piece as its UTF-8 bytes in GPT-2's byte-level characters.
private func mapToByteLevel(_ pieces: inout Pieces) {
    let table = ByteLevelMap.byteToScalar
    var utf8Count = 0
    for v in pieces.scalars { utf8Count += v < 0x80 ? 1 : v < 0x800 ? 2 : v < 0x10000 ? 3 : 4 }
    if utf8Count == pieces.scalars.count {
        // All ASCII: one scalar per byte, so the ranges stay and the buffer is mapped in place.
        pieces.scalars.withUnsafeMutableBufferPointer { s in
            table.withUnsafeBufferPointer { table in
                for i in s.indices { s[i] = table[Int(s[i])] }
            }
        }
        return
    }
    var ranges: [Range<Int>] = []
    ranges.reserveCapacity(pieces.ranges.count)
    let scalars = pieces.scalars, oldRanges = pieces.ranges
    pieces.scalars = [UInt32](unsafeUninitializedCapacity: utf8Count) { out, count in
        var o = 0
        scalars.withUnsafeBufferPointer { s in table.withUnsafeBufferPointer { table in
            for r in oldRanges {
                let start = o
                for i in r {
                    let v = s[i]
                    switch v {
                    case 0..<0x80:
                        out[o] = table[Int(v)]
                        o += 1
                    case 0x80..<0x800:
                        out[o] = table[Int(0xC0 | (v >> 6))]
                        out[o + 1] = table[Int(0x80 | (v & 0x3F))]
                        o += 2
                    case 0x800..<0x10000:
                        out[o] = table[Int(0xE0 | (v >> 12))]
                        out[o + 1] = table[Int(0x80 | ((v >> 6) & 0x3F))]
                        out[o + 2] = table[Int(0x80 | (v & 0x3F))]
                        o += 3
                    default:
                        out[o] = table[Int(0xF0 | (v >> 18))]
                        out[o + 1] = table[Int(0x80 | ((v >> 12) & 0x3F))]
                        out[o + 2] = table[Int(0x80 | ((v >> 6) & 0x3F))]
                        out[o + 3] = table[Int(0x80 | (v & 0x3F))]
                        o += 4
                    }
                }
                ranges.append(start..<o)
            }
        } }
        count = o
    }
    pieces.ranges = ranges
}

/// Splits every piece at the matches of `pattern`, keeping the matches as `behavior` says.
func splitPieces(_ pieces: inout Pieces, pattern: SplitPattern, behavior: SplitBehavior, invert: Bool) {
    var out: [Range<Int>] = []
    out.reserveCapacity(pieces.ranges.count * 2)
    var matches: [Range<Int>] = []
    var segments: [(range: Range<Int>, isMatch: Bool)] = []
    var stack = BacktrackStack()
    defer { stack.release() }
    pieces.scalars.withUnsafeBufferPointer { s in
        let classes: [UInt8], masks: [UInt64]
        switch pattern {
        case .digit, .whitespace: classes = CharClass.classify(s); masks = []
        case .regex(let regex): classes = []; masks = regex.classify(s)
        case .literal: classes = []; masks = []
        }
        classes.withUnsafeBufferPointer { c in
            masks.withUnsafeBufferPointer { m in
                for piece in pieces.ranges {
                    matches.removeAll(keepingCapacity: true)
                    switch pattern {
                    case .digit:
                        for i in piece where c[i] & CharClass.number != 0 { matches.append(i..<(i + 1)) }
                    case .whitespace:
                        for i in piece where c[i] & CharClass.space != 0 { matches.append(i..<(i + 1)) }
                    case .literal(let needle):
                        literalMatches(needle, s, piece, &matches)
                    case .regex(let regex):
                        regex.appendMatches(s, m, piece, into: &matches, stack: &stack)
                    }
                    // Patterns like GPT-2's match everywhere, so the common case needs no gap logic.
                    if behavior == .isolated, !invert, matches.first?.lowerBound == piece.lowerBound,
                       matches.last?.upperBound == piece.upperBound, isTiling(matches) {
                        out.append(contentsOf: matches)
                        continue
                    }
                    segments.removeAll(keepingCapacity: true)
                    var pos = piece.lowerBound
                    for m in matches {
                        if m.lowerBound > pos { segments.append((pos..<m.lowerBound, invert)) }
                        segments.append((m, !invert))
                        pos = m.upperBound
                    }
                    if pos < piece.upperBound { segments.append((pos..<piece.upperBound, invert)) }
                    applyBehavior(behavior, segments, into: &out)
                }
            }
        }
    }
    pieces.ranges = out
}

private func isTiling(_ ranges: [Range<Int>]) -> Bool {
    for i in 1..<max(ranges.count, 1) where ranges[i].lowerBound != ranges[i - 1].upperBound { return false }
    return true
}

/// Hugging Face's rules for turning (segment, is-delimiter) lists into pieces. A delimiter joins its neighbour
/// only if that neighbour is not a delimiter itself, so "a--b" merged with next gives "a", "-", "-b".
private func applyBehavior(_ behavior: SplitBehavior, _ segments: [(range: Range<Int>, isMatch: Bool)],
                           into out: inout [Range<Int>]) {
    let first = out.count
    var previousMatch = false
    switch behavior {
    case .isolated:
        for s in segments { out.append(s.range) }
    case .removed:
        for s in segments where !s.isMatch { out.append(s.range) }
    case .mergedWithPrevious:
        for (r, isMatch) in segments {
            if isMatch && !previousMatch && out.count > first {
                out[out.count - 1] = out[out.count - 1].lowerBound..<r.upperBound
            } else {
                out.append(r)
            }
            previousMatch = isMatch
        }
    case .mergedWithNext:
        // The mirror image of merged-with-previous: walk from the end.
        for (r, isMatch) in segments.reversed() {
            if isMatch && !previousMatch && out.count > first {
                out[out.count - 1] = r.lowerBound..<out[out.count - 1].upperBound
            } else {
                out.append(r)
            }
            previousMatch = isMatch
        }
        out[first...].reverse()
    case .contiguous:
        for (r, isMatch) in segments {
            if isMatch == previousMatch && out.count > first {
                out[out.count - 1] = out[out.count - 1].lowerBound..<r.upperBound
            } else {
                out.append(r)
            }
            previousMatch = isMatch
        }
    }
}

/// Appends the non-overlapping occurrences of `needle` inside `piece`, left to right.
private func literalMatches(_ needle: [UInt32], _ s: UnsafeBufferPointer<UInt32>, _ piece: Range<Int>,
                            _ matches: inout [Range<Int>]) {
    guard !needle.isEmpty else { return }
    var i = piece.lowerBound
    while i + needle.count <= piece.upperBound {
        var hit = true
        for k in needle.indices where s[i + k] != needle[k] { hit = false; break }
        if hit { matches.append(i..<(i + needle.count)); i += needle.count } else { i += 1 }
    }
}
