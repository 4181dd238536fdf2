/// A token of a Jinja template.
enum JinjaToken: Equatable {
    /// Literal template text, whitespace control already applied.
    case text(String)
    case blockBegin, blockEnd, variableBegin, variableEnd
    case name(String)
    case string(String)
    case integer(Int)
    case float(Double)
    /// An operator or punctuation: + - * / // % ** ~ == != < <= > >= = . : | , ( ) [ ] { } ;
    case op(String)
    case end

    var description: String {
        switch self {
        case .text: return "template data"
        case .blockBegin: return "begin of statement block"
        case .blockEnd: return "end of statement block"
        case .variableBegin: return "begin of print statement"
        case .variableEnd: return "end of print statement"
        case .name(let n): return "'\(n)'"
        case .string: return "string"
        case .integer(let i): return "'\(i)'"
        case .float(let d): return "'\(d)'"
        case .op(let o): return "'\(o)'"
        case .end: return "end of template"
        }
    }
}

struct JinjaLexeme {
    let token: JinjaToken
    let line: Int
}

/// Splits a template into tokens the way Jinja2's lexer does in the environment transformers
/// uses: `trim_blocks` (the newline after a block or comment tag goes), `lstrip_blocks`
/// (whitespace before a block or comment tag on its own line goes), `-` and `+` whitespace
/// control on tags, newlines normalised to "\n" and a single trailing newline dropped.
struct JinjaLexer {
    private let src: [Unicode.Scalar]
    private var pos = 0
    private var line = 1
    private var tokens: [JinjaLexeme] = []

    static func tokenize(_ source: String) throws -> [JinjaLexeme] {
        var lexer = JinjaLexer(source: source)
        try lexer.run()
        return lexer.tokens
    }

    private init(source: String) {
        // Jinja2: every "\r\n", "\r" or "\n" becomes "\n", and one trailing newline is dropped
        // (keep_trailing_newline=False).
        var out: [Unicode.Scalar] = []
        var it = Array(source.unicodeScalars)[...]
        while let c = it.popFirst() {
            if c == "\r" {
                if it.first == "\n" { it.removeFirst() }
                out.append("\n")
            } else {
                out.append(c)
            }
        }
        if out.last == "\n" { out.removeLast() }
        src = out
    }

    private func at(_ i: Int) -> Unicode.Scalar? { i < src.count ? src[i] : nil }

    private func starts(_ s: String, at i: Int) -> Bool {
        var j = i
        for c in s.unicodeScalars {
            guard j < src.count, src[j] == c else { return false }
            j += 1
        }
        return true
    }

    private func newlines(_ range: Range<Int>) -> Int { src[range].reduce(0) { $0 + ($1 == "\n" ? 1 : 0) } }

    private mutating func emit(_ token: JinjaToken, line: Int? = nil) {
        tokens.append(JinjaLexeme(token: token, line: line ?? self.line))
    }

    private func syntax(_ message: String, line: Int? = nil) -> ChatTemplateError {
        .syntax(message, line: line ?? self.line)
    }

    private enum TagKind { case block, variable, comment }

    private mutating func run() throws {
        var lineStarting = true  // the previous token ended a line (lstrip_blocks applies at the start too)
        while pos < src.count {
            // The next tag opening: "{%", "{{" or "{#".
            var open = pos
            var kind: TagKind?
            while open + 1 < src.count {
                if src[open] == "{" {
                    switch src[open + 1] {
                    case "%": kind = .block
                    case "{": kind = .variable
                    case "#": kind = .comment
                    default: break
                    }
                    if kind != nil { break }
                }
                open += 1
            }
            guard let kind else {
                emit(.text(PyString.string(src[pos...])))
                line += newlines(pos..<src.count)
                pos = src.count
                break
            }
            let signAt = open + 2
            let sign: Unicode.Scalar? = (at(signAt) == "-" || at(signAt) == "+") ? src[signAt] : nil

            // Whitespace control on the text before the tag.
            var text = src[pos..<open]
            if sign == "-" {
                while let c = text.last, PyString.isSpace(c) { text.removeLast() }
            } else if sign != "+", kind != .variable {
                // lstrip_blocks: only whitespace between the line start and the tag goes.
                let lineStart = (text.lastIndex(of: "\n").map { $0 + 1 }) ?? text.startIndex
                if lineStart > text.startIndex || lineStarting {
                    let tail = text[lineStart...]
                    if !tail.isEmpty, tail.allSatisfy(PyString.isSpace) { text = text[..<lineStart] }
                }
            }
            if !text.isEmpty { emit(.text(PyString.string(text))) }
            line += newlines(pos..<open)
            pos = signAt + (sign == nil ? 0 : 1)

            switch kind {
            case .comment:
                lineStarting = try comment()
            case .block:
                if isRawTag() { throw ChatTemplateError.unsupported("Jinja tag 'raw'", line: line) }
                emit(.blockBegin)
                lineStarting = try expressionTokens(block: true)
            case .variable:
                emit(.variableBegin)
                lineStarting = try expressionTokens(block: false)
            }
        }
        emit(.end)
    }

    private func isRawTag() -> Bool {
        var i = pos
        while let c = at(i), PyString.isSpace(c) { i += 1 }
        guard starts("raw", at: i) else { return false }
        let after = at(i + 3)
        return after == nil || PyString.isSpace(after!) || after == "-" || after == "%"
    }

    /// Skips a comment body and its closing "#}"; returns whether what it consumed ends a line.
    private mutating func comment() throws -> Bool {
        var close = pos
        while close + 1 < src.count, !(src[close] == "#" && src[close + 1] == "}") { close += 1 }
        guard close + 1 < src.count else { throw syntax("missing end of comment tag") }
        let sign: Unicode.Scalar? = close > pos && (src[close - 1] == "-" || src[close - 1] == "+") ? src[close - 1] : nil
        var end = close + 2
        if sign == "-" {
            while let c = at(end), PyString.isSpace(c) { end += 1 }
        } else if sign == nil, at(end) == "\n" {
            end += 1  // trim_blocks
        }
        line += newlines(pos..<end)
        pos = end
        return src[end - 1] == "\n"
    }

    /// Tokens of a `{% %}` or `{{ }}` tag up to and including its end; returns whether the end
    /// (with the whitespace it consumed) ends a line.
    private mutating func expressionTokens(block: Bool) throws -> Bool {
        var brackets: [Unicode.Scalar] = []
        while true {
            // The tag's end, unless a bracket is open (Jinja2 reads "}}" inside a dict literal as braces).
            if brackets.isEmpty {
                var end: Int?
                var skipSpace = false, trimNewline = false
                if block {
                    if starts("+%}", at: pos) { end = pos + 3 }
                    else if starts("-%}", at: pos) { end = pos + 3; skipSpace = true }
                    else if starts("%}", at: pos) { end = pos + 2; trimNewline = true }
                } else {
                    if starts("-}}", at: pos) { end = pos + 3; skipSpace = true }
                    else if starts("}}", at: pos) { end = pos + 2 }
                }
                if var e = end {
                    emit(block ? .blockEnd : .variableEnd)
                    if skipSpace { while let c = at(e), PyString.isSpace(c) { e += 1 } }
                    if trimNewline, at(e) == "\n" { e += 1 }
                    line += newlines(pos..<e)
                    pos = e
                    return src[e - 1] == "\n"
                }
            }
            guard let c = at(pos) else {
                throw syntax("unexpected end of template, expected '\(block ? "%}" : "}}")'")
            }
            if PyString.isSpace(c) {
                if c == "\n" { line += 1 }
                pos += 1
            } else if isDigit(c) {
                try number()
            } else if c == "_" || isLetter(c) {
                let start = pos
                while let d = at(pos), d == "_" || isLetter(d) || isDigit(d) { pos += 1 }
                emit(.name(PyString.string(src[start..<pos])))
            } else if c == "'" || c == "\"" {
                try string()
            } else if let op = ["**", "//", "==", "!=", ">=", "<="].first(where: { starts($0, at: pos) }) {
                emit(.op(op))
                pos += 2
            } else if "+-/*%~[](){}><=.:|,;".unicodeScalars.contains(c) {
                switch c {
                case "(", "[", "{": brackets.append(c)
                case ")", "]", "}":
                    let opening: Unicode.Scalar = c == ")" ? "(" : c == "]" ? "[" : "{"
                    guard let last = brackets.popLast() else { throw syntax("unexpected '\(c)'") }
                    guard last == opening else { throw syntax("unexpected '\(c)', expected the close of '\(last)'") }
                default: break
                }
                emit(.op(String(c)))
                pos += 1
            } else {
                throw syntax("unexpected character '\(c)'")
            }
        }
    }

    private func isDigit(_ c: Unicode.Scalar) -> Bool { ("0"..."9").contains(c) }
    private func isLetter(_ c: Unicode.Scalar) -> Bool { ("a"..."z").contains(c) || ("A"..."Z").contains(c) }

    /// `(\d+_)*\d+` from `i`: the end of the digit run, or nil.
    private func digitRun(_ i: Int) -> Int? {
        guard let c = at(i), isDigit(c) else { return nil }
        var j = i
        while true {
            while let d = at(j), isDigit(d) { j += 1 }
            if at(j) == "_", let d = at(j + 1), isDigit(d) { j += 1 } else { return j }
        }
    }

    /// Jinja2's float and integer literals (decimal only; underscores allowed between digits).
    private mutating func number() throws {
        let start = pos
        let intEnd = digitRun(pos)!
        var end: Int?
        if start == 0 || src[start - 1] != "." {  // Jinja2 reads no float right after a dot (`x.0.1`)
            var fracEnd = intEnd
            if at(intEnd) == ".", let f = digitRun(intEnd + 1) { fracEnd = f }
            if at(fracEnd) == "e" || at(fracEnd) == "E" {
                var e = fracEnd + 1
                if at(e) == "+" || at(e) == "-" { e += 1 }
                if let expEnd = digitRun(e) { end = expEnd }
            }
            if end == nil, fracEnd > intEnd { end = fracEnd }
        }
        if let end {
            let text = PyString.string(src[start..<end]).replacingOccurrences(of: "_", with: "")
            guard let d = Double(text) else { throw syntax("invalid float literal '\(text)'") }
            emit(.float(d))
            pos = end
            return
        }
        // Integers: `[1-9](_?\d)*` or `0(_?0)*`.
        var j = start + 1
        if src[start] == "0" {
            while true {
                if at(j) == "0" { j += 1 } else if at(j) == "_", at(j + 1) == "0" { j += 2 } else { break }
            }
        } else {
            j = intEnd
        }
        let text = PyString.string(src[start..<j]).replacingOccurrences(of: "_", with: "")
        guard let i = Int(text) else {
            throw ChatTemplateError.unsupported("integer literal \(text) (beyond 64 bits)", line: line)
        }
        emit(.integer(i))
        pos = j
    }

    /// A quoted string literal, its escapes decoded as Jinja2 decodes them (Python's
    /// "unicode-escape" codec over the literal with its non-ASCII characters backslash-escaped).
    private mutating func string() throws {
        let quote = src[pos]
        let startLine = line
        var i = pos + 1
        var body: [Unicode.Scalar] = []
        while true {
            guard let c = at(i) else { throw syntax("unexpected character '\(quote)' (unterminated string)", line: startLine) }
            if c == quote { break }
            if c == "\\" {
                guard let d = at(i + 1) else { throw syntax("unterminated string", line: startLine) }
                body.append(c)
                body.append(d)
                i += 2
            } else {
                body.append(c)
                i += 1
            }
        }
        line += newlines(pos..<i)
        pos = i + 1
        emit(.string(try JinjaLexer.unescape(body, line: startLine)), line: startLine)
    }

    static func unescape(_ s: [Unicode.Scalar], line: Int) throws -> String {
        var out = String.UnicodeScalarView()
        var i = 0
        func hex(_ count: Int, _ what: String) throws -> Unicode.Scalar {
            guard i + count <= s.count, s[i..<(i + count)].allSatisfy({ $0.properties.isASCIIHexDigit }),
                  let v = UInt32(PyString.string(s[i..<(i + count)]), radix: 16)
            else { throw ChatTemplateError.syntax("truncated \\\(what) escape in a string literal", line: line) }
            guard let scalar = Unicode.Scalar(v) else {
                throw ChatTemplateError.unsupported("string escape \\\(what)\(String(v, radix: 16)) (not a Unicode scalar)", line: line)
            }
            i += count
            return scalar
        }
        while i < s.count {
            let c = s[i]
            i += 1
            guard c == "\\", i < s.count else { out.append(c); continue }
            let d = s[i]
            i += 1
            switch d {
            case "\n": break  // a line continuation
            case "\\", "'", "\"": out.append(d)
            case "a": out.append("\u{07}")
            case "b": out.append("\u{08}")
            case "f": out.append("\u{0C}")
            case "n": out.append("\n")
            case "r": out.append("\r")
            case "t": out.append("\t")
            case "v": out.append("\u{0B}")
            case "0"..."7":
                var v = d.value - 0x30
                var n = 1
                while n < 3, i < s.count, ("0"..."7").contains(s[i]) {
                    v = v * 8 + s[i].value - 0x30
                    i += 1
                    n += 1
                }
                out.append(Unicode.Scalar(v)!)
            case "x": out.append(try hex(2, "x"))
            case "u": out.append(try hex(4, "u"))
            case "U": out.append(try hex(8, "U"))
            case "N": throw ChatTemplateError.unsupported("string escape \\N{...}", line: line)
            default:
                out.append("\\")
                if d.isASCII {
                    out.append(d)
                } else {
                    // Jinja2 backslash-escapes non-ASCII characters before decoding, so "\é" is "\" + "xe9".
                    out.append(contentsOf: PyString.hexEscape(d).unicodeScalars.dropFirst())
                }
            }
        }
        return String(out)
    }
}
