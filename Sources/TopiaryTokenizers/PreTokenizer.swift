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
    /// The GPT-2 pattern, matched by hand.
    case gpt2
    /// The LLaMA-3 pattern, matched by hand.
    case llama3
    /// Each scalar of class \p{N} on its own.
    case digit
    /// Each whitespace scalar on its own.
    case whitespace
    /// A literal string.
    case literal([UInt32])
    /// Any other regular expression (ICU through Foundation).
    case regex(RegexBox)

    static let gpt2Source = #"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"#
    static let llama3Source =
        #"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"#
}

/// NSRegularExpression is immutable and documented as safe to share between threads.
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
    var buffer: [UInt32] = []
    buffer.reserveCapacity(pieces.scalars.count + pieces.scalars.count / 4)
    var ranges: [Range<Int>] = []
    ranges.reserveCapacity(pieces.ranges.count)
    var utf8: [UInt8] = []
    for r in pieces.ranges {
        let start = buffer.count
        for i in r {
            let v = pieces.scalars[i]
            if v < 0x80 {
                buffer.append(table[Int(v)])
            } else {
                utf8.removeAll(keepingCapacity: true)
                appendUTF8(v, to: &utf8)
                for b in utf8 { buffer.append(table[Int(b)]) }
            }
        }
        ranges.append(start..<buffer.count)
    }
    pieces.scalars = buffer
    pieces.ranges = ranges
}

/// Splits every piece at the matches of `pattern`, keeping the matches as `behavior` says.
func splitPieces(_ pieces: inout Pieces, pattern: SplitPattern, behavior: SplitBehavior, invert: Bool) {
    let classes: [UInt8]
    switch pattern {
    case .gpt2, .llama3, .digit, .whitespace: classes = CharClass.classify(pieces.scalars)
    case .literal, .regex: classes = []
    }
    var out: [Range<Int>] = []
    out.reserveCapacity(pieces.ranges.count * 2)
    var matches: [Range<Int>] = []
    var segments: [(range: Range<Int>, isMatch: Bool)] = []
    pieces.scalars.withUnsafeBufferPointer { s in
        classes.withUnsafeBufferPointer { c in
            for piece in pieces.ranges {
                matches.removeAll(keepingCapacity: true)
                findMatches(pattern, s, c, piece, &matches)
                // The matchers for the two known patterns match everywhere, so the common case needs no gap logic.
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

/// Appends the non-empty, non-overlapping, leftmost matches of `pattern` inside `piece`, in order.
private func findMatches(_ pattern: SplitPattern, _ s: UnsafeBufferPointer<UInt32>, _ c: UnsafeBufferPointer<UInt8>,
                         _ piece: Range<Int>, _ matches: inout [Range<Int>]) {
    let end = piece.upperBound
    switch pattern {
    case .gpt2:
        var i = piece.lowerBound
        while i < end {
            let n = gpt2MatchLength(s, c, i, end)
            matches.append(i..<(i + n))
            i += n
        }
    case .llama3:
        var i = piece.lowerBound
        while i < end {
            let n = llama3MatchLength(s, c, i, end)
            matches.append(i..<(i + n))
            i += n
        }
    case .digit:
        for i in piece where c[i] & CharClass.number != 0 { matches.append(i..<(i + 1)) }
    case .whitespace:
        for i in piece where c[i] & CharClass.space != 0 { matches.append(i..<(i + 1)) }
    case .literal(let needle):
        guard !needle.isEmpty else { return }
        var i = piece.lowerBound
        while i + needle.count <= end {
            var hit = true
            for k in needle.indices where s[i + k] != needle[k] { hit = false; break }
            if hit { matches.append(i..<(i + needle.count)); i += needle.count } else { i += 1 }
        }
    case .regex(let box):
        regexMatches(box.regex, s, piece, &matches)
    }
}

private func regexMatches(_ regex: NSRegularExpression, _ s: UnsafeBufferPointer<UInt32>, _ piece: Range<Int>,
                          _ matches: inout [Range<Int>]) {
    // NSRegularExpression works in UTF-16 offsets; keep the offset of every scalar to map back.
    var view = String.UnicodeScalarView()
    var utf16Offsets: [Int] = []
    utf16Offsets.reserveCapacity(piece.count + 1)
    var offset = 0
    for i in piece {
        utf16Offsets.append(offset)
        let scalar = Unicode.Scalar(s[i]) ?? "\u{FFFD}"
        view.append(scalar)
        offset += scalar.utf16.count
    }
    utf16Offsets.append(offset)
    let string = String(view)
    func scalarIndex(_ u: Int) -> Int {
        var lo = 0, hi = utf16Offsets.count - 1
        while lo < hi {
            let mid = (lo + hi) / 2
            if utf16Offsets[mid] < u { lo = mid + 1 } else { hi = mid }
        }
        return piece.lowerBound + lo
    }
    for m in regex.matches(in: string, range: NSRange(location: 0, length: offset)) where m.range.length > 0 {
        matches.append(scalarIndex(m.range.location)..<scalarIndex(m.range.location + m.range.length))
    }
}

/// Length of the match of GPT-2's pattern at `i`:
/// `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`.
@inline(__always)
private func gpt2MatchLength(_ s: UnsafeBufferPointer<UInt32>, _ c: UnsafeBufferPointer<UInt8>, _ i: Int, _ end: Int) -> Int {
    let ch = s[i]
    if ch == 0x27, i + 1 < end {  // '
        let n = contractionLength(s, i, end, caseInsensitive: false)
        if n > 0 { return n }
    }
    // An optional leading space belongs to the letter/number/other run that follows it.
    let start = (ch == 0x20 && i + 1 < end) ? i + 1 : i
    let cls = c[start]
    if cls & CharClass.letter != 0 { return run(c, start, end, CharClass.letter) - i }
    if cls & CharClass.number != 0 { return run(c, start, end, CharClass.number) - i }
    if CharClass.isOther(cls) {
        var j = start + 1
        while j < end, CharClass.isOther(c[j]) { j += 1 }
        return j - i
    }
    return whitespaceMatchLength(c, i, end, lineBreaksFirst: false)
}

/// Length of the match of LLaMA-3's pattern at `i`:
/// `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`.
@inline(__always)
private func llama3MatchLength(_ s: UnsafeBufferPointer<UInt32>, _ c: UnsafeBufferPointer<UInt8>, _ i: Int, _ end: Int) -> Int {
    let ch = s[i]
    if ch == 0x27, i + 1 < end {
        let n = contractionLength(s, i, end, caseInsensitive: true)
        if n > 0 { return n }
    }
    let cls = c[i]
    if cls & CharClass.letter != 0 { return run(c, i, end, CharClass.letter) - i }
    // One scalar that is not a line break, letter or number may lead a letter run.
    if cls & (CharClass.lineBreak | CharClass.number) == 0, i + 1 < end, c[i + 1] & CharClass.letter != 0 {
        return run(c, i + 1, end, CharClass.letter) - i
    }
    if cls & CharClass.number != 0 { return min(run(c, i, end, CharClass.number) - i, 3) }
    let start = (ch == 0x20 && i + 1 < end && CharClass.isOther(c[i + 1])) ? i + 1 : i
    if CharClass.isOther(c[start]) {
        var j = start + 1
        while j < end, CharClass.isOther(c[j]) { j += 1 }
        return run(c, j, end, CharClass.lineBreak) - i
    }
    return whitespaceMatchLength(c, i, end, lineBreaksFirst: true)
}

/// `'s|'t|'re|'ve|'m|'ll|'d` at `i` (which holds an apostrophe); 0 when none matches.
@inline(__always)
private func contractionLength(_ s: UnsafeBufferPointer<UInt32>, _ i: Int, _ end: Int, caseInsensitive: Bool) -> Int {
    func lower(_ v: UInt32) -> UInt32 { caseInsensitive && v >= 0x41 && v <= 0x5A ? v + 0x20 : v }
    let a = lower(s[i + 1])
    switch a {
    case 0x73, 0x74, 0x6D, 0x64: return 2  // s t m d
    default: break
    }
    guard i + 2 < end else { return 0 }
    let b = lower(s[i + 2])
    switch (a, b) {
    case (0x72, 0x65), (0x76, 0x65), (0x6C, 0x6C): return 3  // re ve ll
    default: return 0
    }
}

/// End of the run of scalars having `flag`, starting at `i`.
@inline(__always)
private func run(_ c: UnsafeBufferPointer<UInt8>, _ i: Int, _ end: Int, _ flag: UInt8) -> Int {
    var j = i
    while j < end, c[j] & flag != 0 { j += 1 }
    return j
}

/// The whitespace alternatives at `i` (a whitespace scalar): optionally `\s*[\r\n]+` (through the last line
/// break of the run), then `\s+(?!\S)` (the run, less its last scalar when a non-space follows), then `\s+`.
@inline(__always)
private func whitespaceMatchLength(_ c: UnsafeBufferPointer<UInt8>, _ i: Int, _ end: Int, lineBreaksFirst: Bool) -> Int {
    let r = run(c, i, end, CharClass.space)
    if lineBreaksFirst {
        var k = r - 1
        while k >= i, c[k] & CharClass.lineBreak == 0 { k -= 1 }
        if k >= i { return k + 1 - i }
    }
    if r == end { return r - i }
    return r - i > 1 ? r - i - 1 : 1
}
