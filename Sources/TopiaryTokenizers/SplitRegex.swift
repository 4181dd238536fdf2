/// The regular expressions of Split pre-tokenizers (and of ByteLevel's own GPT-2 pattern), compiled to a small
/// backtracking program over Unicode scalars, with Oniguruma's meaning (the engine Hugging Face tokenizers uses).
///
/// Supported: literals and escaped punctuation; `\t \n \r \f \v \a \e \xHH \x{H…} \uHHHH`; `.` (any scalar
/// but `\n`); `\s \S` (White_Space), `\d \D` (Nd), `\w \W` (L, M, N, Pc); `\p{…} \P{…} \p{^…}` with a general
/// category (`L`, `Lu`, `Letter`, `Uppercase_Letter`, …) or `Any`, `White_Space`, `Alphabetic`, `Uppercase`,
/// `Lowercase`; character classes `[…]` and `[^…]` with ranges and the escapes above; groups `(…)`, `(?:…)`,
/// `(?<name>…)`, `(?i:…)`, `(?-i:…)`; lookahead `(?=…)` and `(?!…)`; alternation `|`; greedy and lazy
/// quantifiers `? * + {n} {n,} {n,m} {,m}` (and `??` `*?` …). Case-insensitive matching uses the simple case
/// mappings of the scalars, which agree with Unicode's simple case folding except for a few rarities.
///
/// Anything else (anchors, `\b`, back-references, lookbehind, atomic groups, possessive quantifiers, inline
/// flags without a group, nested or POSIX classes, scripts in `\p{…}`, …) is refused with an error naming it.
struct SplitRegex: Sendable {
    let source: String
    fileprivate let program: [Instruction]
    /// The character sets of the pattern; set k is bit k of a scalar's class mask.
    fileprivate let sets: [CharSet]
    /// Masks of the ASCII scalars, computed once.
    fileprivate private(set) var asciiMasks: [UInt64]
    /// Where the code of each top-level alternative starts.
    fileprivate let alternativeStarts: [Int32]
    /// For each top-level alternative, the mask bit saying that it can begin at a scalar (bits above the sets'),
    /// 0 where it must always be tried (it can match the empty string, or the 64 bits are taken).
    fileprivate let alternativeBits: [UInt64]
    /// Which scalars can begin each alternative (nil: any), the source of `alternativeBits`.
    fileprivate let firstSets: [FirstSet?]

    /// A syntax error or an unsupported construct, with the offset (in scalars) where it starts.
    struct SyntaxError: Error, Equatable {
        enum Kind: Equatable {
            /// Valid in Oniguruma, not supported here; the construct is named.
            case unsupported(String)
            /// Not a valid regular expression.
            case invalid(String)
        }
        var kind: Kind
        var offset: Int
    }

    /// What the parser accepts, for error messages.
    static let supportedConstructs = [
        "literals", "escaped punctuation", #"\t \n \r \f \v \a \e \xHH \x{H..} \uHHHH"#, ".",
        #"\s \S \d \D \w \W"#, #"\p{category} \P{category}"#, "[...] [^...] with ranges",
        "(...) (?:...) (?<name>...) (?i:...)", "(?=...) (?!...)", "|", "? * + {n} {n,} {n,m} and their lazy forms",
    ]

    /// The program may not grow past this many instructions (a limit on {n,m} expansion).
    static let maxProgramLength = 20_000

    init(_ source: String) throws(SyntaxError) {
        self.source = source
        var parser = Parser(Array(source.unicodeScalars))
        let tree = try parser.parseAll()
        guard parser.sets.count <= 64 else {
            throw SyntaxError(kind: .unsupported("more than 64 different character classes"), offset: 0)
        }
        var compiler = Compiler(sets: parser.sets)
        var starts: [Int32] = [], firstSets: [FirstSet?] = [], bits: [UInt64] = []
        let top: [Node]
        if case .alternation(let list) = tree { top = list } else { top = [tree] }
        // Each top-level alternative is compiled on its own, ending in `succeed`, so the matcher can skip the
        // alternatives that cannot start at a scalar without running them.
        for alt in top {
            let start = Int32(compiler.program.count)
            try compiler.emit(alt)
            compiler.program.append(Instruction(.succeed))
            let first = compiler.firstSet(of: alt)
            let bit = parser.sets.count + starts.count
            starts.append(start)
            firstSets.append(first)
            bits.append(first != nil && bit < 64 ? 1 << UInt64(bit) : 0)
            if compiler.program.count > Self.maxProgramLength {
                throw SyntaxError(kind: .unsupported("a pattern this large (over \(Self.maxProgramLength) instructions once {n,m} is expanded)"),
                                  offset: 0)
            }
        }
        program = compiler.program
        sets = parser.sets
        alternativeStarts = starts
        alternativeBits = bits
        self.firstSets = firstSets
        asciiMasks = []
        asciiMasks = (0..<128).map { mask(of: ScalarInfo(UInt32($0))) }
    }

    /// Bit k for each set k holding the scalar, and each alternative's bit when it can begin there.
    private func mask(of info: ScalarInfo) -> UInt64 {
        var m: UInt64 = 0
        for (k, set) in sets.enumerated() where set.contains(info) { m |= 1 << UInt64(k) }
        var starts: UInt64 = 0
        for (k, first) in firstSets.enumerated() where alternativeBits[k] != 0 && first!.admits(info.value, m) {
            starts |= alternativeBits[k]
        }
        return m | starts
    }

    /// The mask of every scalar of a buffer: bit k set when the scalar is in set k, and the alternatives' bits.
    func classify(_ scalars: UnsafeBufferPointer<UInt32>) -> [UInt64] {
        var cache: [UInt32: UInt64] = [:]
        return [UInt64](unsafeUninitializedCapacity: scalars.count) { out, count in
            asciiMasks.withUnsafeBufferPointer { ascii in
                for i in scalars.indices {
                    let v = scalars[i]
                    if v < 128 {
                        out[i] = ascii[Int(v)]
                    } else if let m = cache[v] {
                        out[i] = m
                    } else {
                        let m = mask(of: ScalarInfo(v))
                        cache[v] = m
                        out[i] = m
                    }
                }
            }
            count = scalars.count
        }
    }

    /// Appends the non-empty, non-overlapping, leftmost-first matches inside `range`, in order. As in Oniguruma's
    /// search, a position where the pattern matches nothing or only the empty string starts no match.
    /// `masks` are `classify`'s masks of `scalars`; the pattern sees only `range` (a lookahead stops at its end).
    func appendMatches(_ scalars: UnsafeBufferPointer<UInt32>, _ masks: UnsafeBufferPointer<UInt64>, _ range: Range<Int>,
                       into matches: inout [Range<Int>], stack: inout BacktrackStack) {
        program.withUnsafeBufferPointer { prog in
            alternativeStarts.withUnsafeBufferPointer { starts in
                alternativeBits.withUnsafeBufferPointer { bits in
                    var matcher = Matcher(prog: prog, s: scalars, m: masks, end: range.upperBound, stack: stack)
                    var i = range.lowerBound
                    while i < range.upperBound {
                        // The leftmost-first match at i: the first alternative that matches.
                        let mask = masks[i]
                        var end = -1
                        for k in 0..<starts.count where bits[k] == 0 || mask & bits[k] != 0 {
                            end = matcher.run(Int(starts[k]), i)
                            if end >= 0 { break }
                        }
                        if end > i {
                            matches.append(i..<end)
                            i = end
                        } else {
                            i += 1
                        }
                    }
                    stack = matcher.stack
                }
            }
        }
    }
}

// MARK: - Character sets

/// What the set tests need of a scalar: its value and general category (and White_Space etc. on demand).
struct ScalarInfo {
    let value: UInt32
    let category: UInt32
    let scalar: Unicode.Scalar?

    init(_ v: UInt32) {
        value = v
        scalar = Unicode.Scalar(v)
        category = scalar.map { Categories.bit($0.properties.generalCategory) } ?? Categories.bit(.surrogate)
    }
}

/// Unicode general categories as bits of a UInt32.
enum Categories {
    static let all: [Unicode.GeneralCategory] = [
        .uppercaseLetter, .lowercaseLetter, .titlecaseLetter, .modifierLetter, .otherLetter,
        .nonspacingMark, .spacingMark, .enclosingMark,
        .decimalNumber, .letterNumber, .otherNumber,
        .connectorPunctuation, .dashPunctuation, .openPunctuation, .closePunctuation, .initialPunctuation,
        .finalPunctuation, .otherPunctuation,
        .mathSymbol, .currencySymbol, .modifierSymbol, .otherSymbol,
        .spaceSeparator, .lineSeparator, .paragraphSeparator,
        .control, .format, .surrogate, .privateUse, .unassigned,
    ]

    static func bit(_ c: Unicode.GeneralCategory) -> UInt32 {
        switch c {
        case .uppercaseLetter: return 1 << 0
        case .lowercaseLetter: return 1 << 1
        case .titlecaseLetter: return 1 << 2
        case .modifierLetter: return 1 << 3
        case .otherLetter: return 1 << 4
        case .nonspacingMark: return 1 << 5
        case .spacingMark: return 1 << 6
        case .enclosingMark: return 1 << 7
        case .decimalNumber: return 1 << 8
        case .letterNumber: return 1 << 9
        case .otherNumber: return 1 << 10
        case .connectorPunctuation: return 1 << 11
        case .dashPunctuation: return 1 << 12
        case .openPunctuation: return 1 << 13
        case .closePunctuation: return 1 << 14
        case .initialPunctuation: return 1 << 15
        case .finalPunctuation: return 1 << 16
        case .otherPunctuation: return 1 << 17
        case .mathSymbol: return 1 << 18
        case .currencySymbol: return 1 << 19
        case .modifierSymbol: return 1 << 20
        case .otherSymbol: return 1 << 21
        case .spaceSeparator: return 1 << 22
        case .lineSeparator: return 1 << 23
        case .paragraphSeparator: return 1 << 24
        case .control: return 1 << 25
        case .format: return 1 << 26
        case .surrogate: return 1 << 27
        case .privateUse: return 1 << 28
        case .unassigned: return 1 << 29
        @unknown default: return 1 << 29
        }
    }

    static let letter: UInt32 = 0b11111
    static let mark: UInt32 = 0b111 << 5
    static let number: UInt32 = 0b111 << 8
    static let decimalNumber: UInt32 = 1 << 8
    static let punctuation: UInt32 = 0b1111111 << 11
    static let connectorPunctuation: UInt32 = 1 << 11
    static let symbol: UInt32 = 0b1111 << 18
    static let separator: UInt32 = 0b111 << 22
    static let other: UInt32 = 0b11111 << 25

    /// Category bits by property name, compared as Oniguruma does: case, spaces, '_' and '-' ignored.
    static let byName: [String: UInt32] = {
        var names: [String: UInt32] = [
            "l": letter, "letter": letter, "lc": 0b111, "casedletter": 0b111,
            "m": mark, "mark": mark, "combiningmark": mark,
            "n": number, "number": number,
            "p": punctuation, "punctuation": punctuation, "punct": punctuation,
            "s": symbol, "symbol": symbol,
            "z": separator, "separator": separator,
            "c": other, "other": other,
        ]
        let short = ["lu", "ll", "lt", "lm", "lo", "mn", "mc", "me", "nd", "nl", "no", "pc", "pd", "ps", "pe", "pi",
                     "pf", "po", "sm", "sc", "sk", "so", "zs", "zl", "zp", "cc", "cf", "cs", "co", "cn"]
        let long = ["uppercaseletter", "lowercaseletter", "titlecaseletter", "modifierletter", "otherletter",
                    "nonspacingmark", "spacingmark", "enclosingmark", "decimalnumber", "letternumber", "othernumber",
                    "connectorpunctuation", "dashpunctuation", "openpunctuation", "closepunctuation",
                    "initialpunctuation", "finalpunctuation", "otherpunctuation", "mathsymbol", "currencysymbol",
                    "modifiersymbol", "othersymbol", "spaceseparator", "lineseparator", "paragraphseparator",
                    "control", "format", "surrogate", "privateuse", "unassigned"]
        for k in 0..<30 {
            names[short[k]] = 1 << UInt32(k)
            names[long[k]] = 1 << UInt32(k)
        }
        names["digit"] = decimalNumber
        names["cntrl"] = 1 << 25
        return names
    }()
}

/// Binary properties `\p{…}` may name besides general categories.
enum ScalarProperty: Hashable {
    case any, whiteSpace, alphabetic, uppercase, lowercase

    static let byName: [String: ScalarProperty] = [
        "any": .any, "whitespace": .whiteSpace, "wspace": .whiteSpace, "space": .whiteSpace,
        "alphabetic": .alphabetic, "alpha": .alphabetic, "uppercase": .uppercase, "upper": .uppercase,
        "lowercase": .lowercase, "lower": .lowercase,
    ]

    func holds(_ info: ScalarInfo) -> Bool {
        switch self {
        case .any: return true
        case .whiteSpace:
            if info.value < 0x80 { return (0x09...0x0D).contains(info.value) || info.value == 0x20 }
            return info.scalar?.properties.isWhitespace ?? false
        case .alphabetic: return info.scalar?.properties.isAlphabetic ?? false
        case .uppercase: return info.scalar?.properties.isUppercase ?? false
        case .lowercase: return info.scalar?.properties.isLowercase ?? false
        }
    }
}

/// One item of a character class.
enum SetItem: Hashable {
    case range(UInt32, UInt32)
    case categories(UInt32, negated: Bool)
    case property(ScalarProperty, negated: Bool)

    func contains(_ info: ScalarInfo) -> Bool {
        switch self {
        case .range(let lo, let hi): return info.value >= lo && info.value <= hi
        case .categories(let bits, let negated): return (info.category & bits != 0) != negated
        case .property(let p, let negated): return p.holds(info) != negated
        }
    }
}

/// A character class: its items, negation, and case-insensitivity.
struct CharSet: Hashable {
    var items: [SetItem]
    var negated = false
    var caseInsensitive = false

    func contains(_ v: UInt32) -> Bool { contains(ScalarInfo(v)) }

    func contains(_ info: ScalarInfo) -> Bool {
        var hit = items.contains { $0.contains(info) }
        if !hit, caseInsensitive {
            for w in CaseFold.variants(info.value) where w != info.value {
                if items.contains(where: { $0.contains(ScalarInfo(w)) }) { hit = true; break }
            }
        }
        return hit != negated
    }
}

/// Case-insensitive comparison through the scalars' simple (one-scalar) case mappings.
enum CaseFold {
    /// The simple case folding of `v`: its lowercase after its uppercase (so "ſ" and "s" fold alike), where
    /// both mappings are one scalar. Dotted and dotless i (U+0130, U+0131) fold only to themselves, as in
    /// Unicode's default (non-Turkic) folding.
    static func fold(_ v: UInt32) -> UInt32 {
        if v < 0x80 { return (0x41...0x5A).contains(v) ? v + 0x20 : v }
        if v == 0x130 || v == 0x131 { return v }
        guard let s = Unicode.Scalar(v) else { return v }
        let upper = single(s.properties.uppercaseMapping) ?? s
        return (single(upper.properties.lowercaseMapping) ?? single(s.properties.lowercaseMapping) ?? s).value
    }

    /// `v`, its folding and the uppercase of its folding: the scalars a case-insensitive class tests.
    static func variants(_ v: UInt32) -> [UInt32] {
        let f = fold(v)
        var out = [v, f]
        if let s = Unicode.Scalar(f), let u = single(s.properties.uppercaseMapping), u.value != 0x130 {
            out.append(u.value)
        }
        return out
    }

    private static func single(_ s: String) -> Unicode.Scalar? {
        var it = s.unicodeScalars.makeIterator()
        guard let first = it.next(), it.next() == nil else { return nil }
        return first
    }
}

// MARK: - Parsing

private indirect enum Node {
    case char(UInt32, caseInsensitive: Bool)
    case set(Int)
    case any
    case sequence([Node])
    case alternation([Node])
    case repetition(Node, min: Int, max: Int?, greedy: Bool)
    case lookahead(Node, negated: Bool)

    var isSingleScalar: Bool {
        switch self {
        case .char, .set, .any: return true
        default: return false
        }
    }

    var canBeEmpty: Bool {
        switch self {
        case .char, .set, .any: return false
        case .sequence(let nodes): return nodes.allSatisfy(\.canBeEmpty)
        case .alternation(let nodes): return nodes.contains(where: \.canBeEmpty)
        case .repetition(let node, let min, _, _): return min == 0 || node.canBeEmpty
        case .lookahead: return true
        }
    }
}

private struct Parser {
    let s: [Unicode.Scalar]
    var i = 0
    var sets: [CharSet] = []
    var caseInsensitive = false

    init(_ s: [Unicode.Scalar]) { self.s = s }

    typealias SyntaxError = SplitRegex.SyntaxError

    func unsupported(_ what: String, at offset: Int? = nil) -> SyntaxError {
        SyntaxError(kind: .unsupported(what), offset: offset ?? i)
    }

    func invalid(_ what: String, at offset: Int? = nil) -> SyntaxError {
        SyntaxError(kind: .invalid(what), offset: offset ?? i)
    }

    var atEnd: Bool { i >= s.count }
    func peek(_ k: Int = 0) -> UInt32? { i + k < s.count ? s[i + k].value : nil }

    mutating func parseAll() throws(SyntaxError) -> Node {
        let node = try parseAlternation()
        if !atEnd { throw invalid("unmatched ')'") }
        return node
    }

    mutating func parseAlternation() throws(SyntaxError) -> Node {
        var alternatives = [try parseSequence()]
        while peek() == 0x7C {  // |
            i += 1
            alternatives.append(try parseSequence())
        }
        return alternatives.count == 1 ? alternatives[0] : .alternation(alternatives)
    }

    mutating func parseSequence() throws(SyntaxError) -> Node {
        var items: [Node] = []
        while let c = peek(), c != 0x7C, c != 0x29 {  // | )
            let start = i
            var atom = try parseAtom()
            atom = try parseQuantifiers(atom, atomStart: start)
            items.append(atom)
        }
        return items.count == 1 ? items[0] : .sequence(items)
    }

    mutating func parseQuantifiers(_ atom: Node, atomStart: Int) throws(SyntaxError) -> Node {
        var node = atom
        var quantified = false
        while let c = peek() {
            let qStart = i
            var bounds: (Int, Int?)
            switch c {
            case 0x3F: bounds = (0, 1); i += 1  // ?
            case 0x2A: bounds = (0, nil); i += 1  // *
            case 0x2B: bounds = (1, nil); i += 1  // +
            case 0x7B:  // {
                guard let b = try parseInterval() else { return node }  // a literal '{'
                bounds = b
            default: return node
            }
            if quantified {
                throw unsupported("a quantifier on a quantified expression ('\(String(s[qStart]))' after a quantifier)", at: qStart)
            }
            if case .lookahead = node { throw unsupported("a quantified lookahead", at: qStart) }
            var greedy = true
            if peek() == 0x3F { greedy = false; i += 1 }  // lazy
            else if peek() == 0x2B { throw unsupported("a possessive quantifier ('+' after a quantifier)") }
            if bounds.1 == nil || bounds.1! > 1, node.canBeEmpty {
                throw unsupported("a repeated expression that can match the empty string", at: atomStart)
            }
            node = .repetition(node, min: bounds.0, max: bounds.1, greedy: greedy)
            quantified = true
        }
        return node
    }

    /// `{n}`, `{n,}`, `{n,m}` or `{,m}` at `i`; nil (nothing consumed) when the brace does not start one, in
    /// which case Oniguruma reads it as a literal '{'.
    mutating func parseInterval() throws(SyntaxError) -> (Int, Int?)? {
        var j = i + 1
        func number() -> Int? {
            var n: Int? = nil
            while j < s.count, (0x30...0x39).contains(s[j].value) {
                n = min((n ?? 0) * 10 + Int(s[j].value - 0x30), 1_000_000)
                j += 1
            }
            return n
        }
        let lo = number()
        var hi: Int?
        if j < s.count, s[j] == "," {
            j += 1
            hi = number()
            guard lo != nil || hi != nil else { return nil }
        } else {
            guard lo != nil else { return nil }
            hi = lo
        }
        guard j < s.count, s[j] == "}" else { return nil }
        let start = i
        i = j + 1
        let low = lo ?? 0
        if let hi, hi < low { throw invalid("a repeat count {\(low),\(hi)} whose maximum is below its minimum", at: start) }
        return (low, hi)
    }

    mutating func parseAtom() throws(SyntaxError) -> Node {
        let c = s[i].value
        switch c {
        case 0x28: return try parseGroup()  // (
        case 0x5B: return .set(try parseClass())  // [
        case 0x2E: i += 1; return .any  // .
        case 0x5E: throw unsupported("the anchor '^'")
        case 0x24: throw unsupported("the anchor '$'")
        case 0x3F, 0x2A, 0x2B: throw invalid("a quantifier '\(String(s[i]))' with nothing to repeat")
        case 0x5C: return try parseEscape(inClass: false).node(&self)
        default:
            i += 1
            return literal(c)
        }
    }

    mutating func literal(_ c: UInt32) -> Node {
        guard caseInsensitive else { return .char(c, caseInsensitive: false) }
        let variants = CaseFold.variants(c)
        return variants.allSatisfy({ $0 == c }) ? .char(c, caseInsensitive: false) : .char(CaseFold.fold(c), caseInsensitive: true)
    }

    mutating func parseGroup() throws(SyntaxError) -> Node {
        let open = i
        i += 1
        let saved = caseInsensitive
        defer { caseInsensitive = saved }
        var lookahead: Bool? = nil  // negated?
        if peek() == 0x3F {  // (?
            i += 1
            guard let k = peek() else { throw invalid("an unterminated group", at: open) }
            switch k {
            case 0x3A: i += 1  // (?:
            case 0x3D: i += 1; lookahead = false  // (?=
            case 0x21: i += 1; lookahead = true  // (?!
            case 0x3C:  // (?<
                if peek(1) == 0x3D || peek(1) == 0x21 { throw unsupported("lookbehind '(?<\(String(s[i + 1]))'", at: open) }
                i += 1
                while let n = peek(), n != 0x3E { i += 1 }  // name
                guard peek() == 0x3E else { throw invalid("an unterminated group name", at: open) }
                i += 1
            case 0x3E: throw unsupported("an atomic group '(?>'", at: open)
            case 0x23: throw unsupported("a comment group '(?#'", at: open)
            case 0x50, 0x27, 0x26: throw unsupported("a named group reference or call '(?\(String(s[i]))'", at: open)
            default:
                // Option letters: only i, on or off, and only for a group's own contents.
                var on = true
                while let f = peek(), f != 0x3A, f != 0x29 {
                    switch f {
                    case 0x2D: on = false  // -
                    case 0x69: caseInsensitive = on  // i
                    default:
                        throw unsupported("the option '\(String(s[i]))' in '(?\(String(s[i]))…' (only i is supported)")
                    }
                    i += 1
                }
                guard let f = peek() else { throw invalid("an unterminated group", at: open) }
                if f == 0x29 { throw unsupported("options for the rest of the enclosing group '(?…)'; write '(?i:…)'", at: open) }
                i += 1
            }
        }
        let body = try parseAlternation()
        guard peek() == 0x29 else { throw invalid("an unterminated group", at: open) }
        i += 1
        if let negated = lookahead { return .lookahead(body, negated: negated) }
        return body
    }

    /// What an escape stands for: one scalar or a class item.
    enum Escape {
        case scalar(UInt32)
        case item(SetItem)

        func node(_ parser: inout Parser) -> Node {
            switch self {
            case .scalar(let v): return parser.literal(v)
            case .item(let item): return .set(parser.addSet(CharSet(items: [item])))
            }
        }
    }

    mutating func addSet(_ set: CharSet) -> Int {
        var set = set
        set.caseInsensitive = caseInsensitive
        if let k = sets.firstIndex(of: set) { return k }
        sets.append(set)
        return sets.count - 1
    }

    mutating func parseEscape(inClass: Bool) throws(SyntaxError) -> Escape {
        let start = i
        i += 1
        guard let c = peek() else { throw invalid("a pattern ending in '\\'", at: start) }
        i += 1
        switch c {
        case 0x74: return .scalar(0x09)  // t
        case 0x6E: return .scalar(0x0A)  // n
        case 0x72: return .scalar(0x0D)  // r
        case 0x66: return .scalar(0x0C)  // f
        case 0x76: return .scalar(0x0B)  // v
        case 0x61: return .scalar(0x07)  // a
        case 0x65: return .scalar(0x1B)  // e
        case 0x73: return .item(.property(.whiteSpace, negated: false))  // s
        case 0x53: return .item(.property(.whiteSpace, negated: true))  // S
        case 0x64: return .item(.categories(Categories.decimalNumber, negated: false))  // d
        case 0x44: return .item(.categories(Categories.decimalNumber, negated: true))  // D
        case 0x77: return .item(.categories(Self.word, negated: false))  // w
        case 0x57: return .item(.categories(Self.word, negated: true))  // W
        case 0x70, 0x50: return .item(try parseProperty(negated: c == 0x50, start: start))  // p P
        case 0x78: return .scalar(try parseHex(start: start))  // x
        case 0x75: return .scalar(try parseFixedHex(4, start: start))  // u
        case 0x62 where inClass: return .scalar(0x08)  // \b in a class is backspace
        case 0x62, 0x42: throw unsupported("the word boundary '\\\(String(s[start + 1]))'", at: start)
        case 0x41, 0x7A, 0x5A, 0x47: throw unsupported("the anchor '\\\(String(s[start + 1]))'", at: start)
        case 0x30...0x39, 0x6B: throw unsupported("a back-reference or octal escape '\\\(String(s[start + 1]))'", at: start)
        default:
            if c < 0x80, (0x41...0x5A).contains(c) || (0x61...0x7A).contains(c) {
                throw unsupported("the escape '\\\(String(s[start + 1]))'", at: start)
            }
            return .scalar(c)  // escaped punctuation (or any other scalar) stands for itself
        }
    }

    /// \w: Letter, Mark, Number, Connector_Punctuation.
    static let word = Categories.letter | Categories.mark | Categories.number | Categories.connectorPunctuation

    mutating func parseProperty(negated: Bool, start: Int) throws(SyntaxError) -> SetItem {
        guard peek() == 0x7B else { throw unsupported("a property escape without braces (write \\p{…})", at: start) }
        i += 1
        var negated = negated
        if peek() == 0x5E { negated.toggle(); i += 1 }  // \p{^…}
        var name = ""
        while let c = peek(), c != 0x7D {
            name.unicodeScalars.append(s[i])
            i += 1
        }
        guard peek() == 0x7D else { throw invalid("an unterminated \\p{", at: start) }
        i += 1
        let key = String(name.lowercased().unicodeScalars.filter { $0 != "_" && $0 != " " && $0 != "-" })
        if let bits = Categories.byName[key] { return .categories(bits, negated: negated) }
        if let p = ScalarProperty.byName[key] { return .property(p, negated: negated) }
        throw unsupported("the property '\\p{\(name)}' (general categories, Any, White_Space, Alphabetic, Uppercase and Lowercase are supported)", at: start)
    }

    mutating func parseHex(start: Int) throws(SyntaxError) -> UInt32 {
        if peek() == 0x7B {  // \x{H…}
            i += 1
            var v: UInt32 = 0, digits = 0
            while let c = peek(), let d = Self.hexDigit(c) {
                v = v &* 16 &+ d
                digits += 1
                i += 1
            }
            guard peek() == 0x7D, digits > 0, digits <= 8 else { throw invalid("a malformed \\x{…}", at: start) }
            i += 1
            guard Unicode.Scalar(v) != nil else { throw invalid("\\x{…} names no Unicode scalar", at: start) }
            return v
        }
        var v: UInt32 = 0, digits = 0
        while digits < 2, let c = peek(), let d = Self.hexDigit(c) {
            v = v * 16 + d
            digits += 1
            i += 1
        }
        guard digits > 0 else { throw invalid("a malformed \\x", at: start) }
        // Oniguruma reads \xHH as one byte of the UTF-8 text; only ASCII bytes stand for a scalar.
        guard v < 0x80 else { throw unsupported("the byte escape '\\x\(String(v, radix: 16))' above 7F (use \\x{…} or \\u)", at: start) }
        return v
    }

    mutating func parseFixedHex(_ n: Int, start: Int) throws(SyntaxError) -> UInt32 {
        var v: UInt32 = 0
        for _ in 0..<n {
            guard let c = peek(), let d = Self.hexDigit(c) else { throw invalid("a malformed \\u (four hex digits)", at: start) }
            v = v * 16 + d
            i += 1
        }
        guard Unicode.Scalar(v) != nil else { throw invalid("\\u\(String(v, radix: 16)) names no Unicode scalar", at: start) }
        return v
    }

    static func hexDigit(_ c: UInt32) -> UInt32? {
        switch c {
        case 0x30...0x39: return c - 0x30
        case 0x41...0x46: return c - 0x41 + 10
        case 0x61...0x66: return c - 0x61 + 10
        default: return nil
        }
    }

    /// `[…]` or `[^…]` at `i`; returns the set's index.
    mutating func parseClass() throws(SyntaxError) -> Int {
        let open = i
        i += 1
        var set = CharSet(items: [])
        if peek() == 0x5E { set.negated = true; i += 1 }
        if peek() == 0x5D { throw unsupported("']' as the first member of a class (escape it as \\])") }
        var pendingScalar: UInt32? = nil  // the last single scalar, which a '-' may turn into a range start
        while true {
            guard let c = peek() else { throw invalid("an unterminated character class", at: open) }
            if c == 0x5D { i += 1; break }  // ]
            if c == 0x5B {
                if peek(1) == 0x3A { throw unsupported("a POSIX bracket '[:…:]'") }
                throw unsupported("a nested character class")
            }
            if c == 0x26, peek(1) == 0x26 { throw unsupported("class intersection '&&'") }
            if c == 0x2D, let lo = pendingScalar, let next = peek(1), next != 0x5D {  // a range lo-hi
                i += 1
                let hiStart = i
                let hi: UInt32
                if next == 0x5C {
                    guard case .scalar(let v) = try parseEscape(inClass: true) else {
                        throw invalid("a range ending in a class escape", at: hiStart)
                    }
                    hi = v
                } else if next == 0x5B {
                    throw unsupported("a nested character class")
                } else {
                    hi = next
                    i += 1
                }
                guard hi >= lo else { throw invalid("a range whose end is below its start", at: hiStart) }
                set.items[set.items.count - 1] = .range(lo, hi)
                pendingScalar = nil
                continue
            }
            let item: SetItem
            if c == 0x5C {
                switch try parseEscape(inClass: true) {
                case .scalar(let v): item = .range(v, v); pendingScalar = v
                case .item(let it): item = it; pendingScalar = nil
                }
            } else {
                i += 1
                item = .range(c, c)
                pendingScalar = c
            }
            set.items.append(item)
        }
        return addSet(set)
    }
}

// MARK: - Compiling and matching

/// Which scalars can begin a match: a set of literal scalars (folded when `foldedScalars`) and class bits.
private struct FirstSet {
    var scalars: [UInt32] = []
    var foldedScalars: [UInt32] = []
    var mask: UInt64 = 0
    var anyButNewline = false

    @inline(__always) func admits(_ v: UInt32, _ m: UInt64) -> Bool {
        if m & mask != 0 { return true }
        if anyButNewline, v != 0x0A { return true }
        for c in scalars where c == v { return true }
        if !foldedScalars.isEmpty {
            let f = CaseFold.fold(v)
            for c in foldedScalars where c == f { return true }
        }
        return false
    }
}

private struct Instruction {
    enum Op: UInt8 {
        /// Scalar equal to `x`.
        case char
        /// Scalar whose case folding is `x`.
        case charFold
        /// Scalar whose class mask meets `mask`.
        case set
        /// Any scalar but '\n'.
        case any
        /// Try `x`, on failure `y`.
        case split
        case jump
        /// Run the body (from the next instruction to its `succeed`); on success (failure when negated) go on
        /// at `x`, at the same position.
        case lookahead
        case negativeLookahead
        /// The end of the pattern or of a lookahead body.
        case succeed
        /// A greedy repeat of one single-scalar `atom` (char, charFold, set or any, with `value` and `mask`),
        /// at least `x` and at most `y` times: the whole run is taken at once and one backtrack entry gives it
        /// back a scalar at a time, instead of an entry per scalar.
        case run
    }

    var op: Op
    var atom: Op = .char
    var x: Int32 = 0
    var y: Int32 = 0
    var value: UInt32 = 0
    var mask: UInt64 = 0

    init(_ op: Op, x: Int32 = 0, y: Int32 = 0, value: UInt32 = 0, mask: UInt64 = 0) {
        self.op = op
        self.x = x
        self.y = y
        self.value = value
        self.mask = mask
    }
}

private struct Compiler {
    let sets: [CharSet]
    var program: [Instruction] = []

    init(sets: [CharSet]) { self.sets = sets }

    var here: Int32 { Int32(program.count) }

    mutating func emit(_ node: Node) throws(SplitRegex.SyntaxError) {
        if program.count > SplitRegex.maxProgramLength {
            throw .init(kind: .unsupported("a pattern this large (over \(SplitRegex.maxProgramLength) instructions once {n,m} is expanded)"), offset: 0)
        }
        switch node {
        case .char(let v, let ci): program.append(Instruction(ci ? .charFold : .char, value: v))
        case .set(let k): program.append(Instruction(.set, mask: 1 << UInt64(k)))
        case .any: program.append(Instruction(.any))
        case .sequence(let nodes):
            for n in nodes { try emit(n) }
        case .alternation(let nodes):
            // split L1, next; L1: a; jump end; next: split L2, next2; … last alternative plain.
            var jumps: [Int] = []
            for (k, n) in nodes.enumerated() {
                if k < nodes.count - 1 {
                    let split = program.count
                    program.append(Instruction(.split, x: here + 1))
                    try emit(n)
                    jumps.append(program.count)
                    program.append(Instruction(.jump))
                    program[split].y = here
                } else {
                    try emit(n)
                }
            }
            for j in jumps { program[j].x = here }
        case .repetition(let body, let min, let max, true) where body.isSingleScalar:
            var run = Instruction(.run, x: Int32(min), y: Int32(Swift.min(max ?? Int(Int32.max), Int(Int32.max))))
            switch body {
            case .char(let v, let ci): run.atom = ci ? .charFold : .char; run.value = v
            case .set(let k): run.atom = .set; run.mask = 1 << UInt64(k)
            default: run.atom = .any
            }
            program.append(run)
        case .repetition(let body, let min, let max, let greedy):
            for _ in 0..<min { try emit(body) }
            if let max {
                // (body (body …)?)? nested, so a later copy is only tried after an earlier one matched.
                var exits: [Int] = []
                for _ in min..<max {
                    exits.append(program.count)
                    program.append(Instruction(.split, x: here + 1))
                    try emit(body)
                }
                for e in exits { setSplit(e, body: program[e].x, exit: here, greedy: greedy) }
            } else {
                let loop = program.count
                program.append(Instruction(.split))
                try emit(body)
                program.append(Instruction(.jump, x: Int32(loop)))
                setSplit(loop, body: Int32(loop + 1), exit: here, greedy: greedy)
            }
        case .lookahead(let body, let negated):
            let head = program.count
            program.append(Instruction(negated ? .negativeLookahead : .lookahead))
            try emit(body)
            program.append(Instruction(.succeed))
            program[head].x = here
        }
    }

    private mutating func setSplit(_ at: Int, body: Int32, exit: Int32, greedy: Bool) {
        program[at].x = greedy ? body : exit
        program[at].y = greedy ? exit : body
    }

    /// The scalars that can begin a match of `node`, nil when it can match the empty string (then it must be
    /// tried everywhere).
    func firstSet(of node: Node) -> FirstSet? {
        var first = FirstSet()
        return collect(node, &first) ? nil : first
    }

    /// Adds the scalars that can begin `node` to `first`; returns whether `node` can also match empty (so what
    /// follows it can begin the match too). A lookahead consumes nothing, so it counts as empty.
    private func collect(_ node: Node, _ first: inout FirstSet) -> Bool {
        switch node {
        case .char(let v, let ci):
            if ci { first.foldedScalars.append(v) } else { first.scalars.append(v) }
            return false
        case .set(let k):
            first.mask |= 1 << UInt64(k)
            return false
        case .any:
            first.anyButNewline = true
            return false
        case .sequence(let nodes):
            for n in nodes where !collect(n, &first) { return false }
            return true
        case .alternation(let nodes):
            var empty = false
            for n in nodes where collect(n, &first) { empty = true }
            return empty
        case .repetition(let body, let min, _, _):
            let empty = collect(body, &first)
            return empty || min == 0
        case .lookahead:
            return true
        }
    }
}

/// A saved alternative of the backtracking matcher: where to resume and at which position. With a `floor`
/// (≥ 0) it is a greedy run's: resume one scalar shorter, and stay on the stack while above the floor.
struct Backtrack {
    var pc: Int32
    var pos: Int32
    var floor: Int32 = -1
}

/// The matcher's stack of backtrack entries, in memory the owner allocates once (`init`) and frees (`release`)
/// for a whole text, so matching allocates nothing and pays no array uniqueness or bounds checks.
struct BacktrackStack {
    private(set) var entries: UnsafeMutablePointer<Backtrack>
    private var capacity: Int
    var count = 0

    init(capacity: Int = 256) {
        entries = .allocate(capacity: capacity)
        self.capacity = capacity
    }

    func release() { entries.deallocate() }

    @inline(__always) mutating func push(_ b: Backtrack) {
        if count == capacity { grow() }
        entries[count] = b
        count += 1
    }

    @inline(__always) mutating func pop() -> Backtrack {
        count -= 1
        return entries[count]
    }

    private mutating func grow() {
        let larger = UnsafeMutablePointer<Backtrack>.allocate(capacity: capacity * 2)
        larger.moveInitialize(from: entries, count: count)
        entries.deallocate()
        entries = larger
        capacity *= 2
    }
}

private struct Matcher {
    let prog: UnsafeBufferPointer<Instruction>
    let s: UnsafeBufferPointer<UInt32>
    let m: UnsafeBufferPointer<UInt64>
    let end: Int
    var stack: BacktrackStack

    /// Whether the scalar at `pos` (< end) is `inst`'s atom.
    @inline(__always) func atom(_ op: Instruction.Op, _ inst: Instruction, _ pos: Int) -> Bool {
        switch op {
        case .char: return s[pos] == inst.value
        case .set: return m[pos] & inst.mask != 0
        case .charFold: return CaseFold.fold(s[pos]) == inst.value
        default: return s[pos] != 0x0A
        }
    }

    /// Runs from `pc0` at `pos0` until a `succeed`; returns the position there, -1 if every path fails.
    mutating func run(_ pc0: Int, _ pos0: Int) -> Int {
        let base = stack.count
        var pc = pc0, pos = pos0
        while true {
            let inst = prog[pc]
            var ok = true
            switch inst.op {
            case .char, .set, .charFold, .any:
                if pos < end, atom(inst.op, inst, pos) { pos += 1; pc += 1 } else { ok = false }
            case .run:
                let limit = inst.y == Int32.max ? end : Swift.min(end, pos + Int(inst.y))
                var p = pos
                while p < limit, atom(inst.atom, inst, p) { p += 1 }
                let floor = pos + Int(inst.x)
                if p < floor {
                    ok = false
                } else {
                    if p > floor { stack.push(Backtrack(pc: Int32(pc + 1), pos: Int32(p), floor: Int32(floor))) }
                    pos = p
                    pc += 1
                }
            case .split:
                stack.push(Backtrack(pc: inst.y, pos: Int32(pos)))
                pc = Int(inst.x)
            case .jump:
                pc = Int(inst.x)
            case .lookahead, .negativeLookahead:
                let matched = run(pc + 1, pos) >= 0
                if matched == (inst.op == .lookahead) { pc = Int(inst.x) } else { ok = false }
            case .succeed:
                stack.count = base
                return pos
            }
            if !ok {
                guard stack.count > base else { return -1 }
                let b = stack.pop()
                pc = Int(b.pc)
                pos = Int(b.pos)
                if b.floor >= 0 {
                    pos -= 1
                    if pos > Int(b.floor) { stack.push(Backtrack(pc: b.pc, pos: Int32(pos), floor: b.floor)) }
                }
            }
        }
    }
}
