import Foundation

/// A JSON value that keeps what a file said: object members in the order written and every number
/// as its literal text ("1e-05" stays "1e-05", "500000.0" stays "500000.0"). Used to carry a source
/// model's config.json over unchanged, to write Hugging Face's JSON files, and to read
/// tokenizer.json and tokenizer_config.json (`JSONNode`).
public indirect enum OrderedJSON: Sendable, Equatable {
    case null
    case bool(Bool)
    /// A number as its literal text (JSON syntax, or Python's NaN / Infinity / -Infinity).
    case number(String)
    case string(String)
    case array([OrderedJSON])
    case object([Member])

    public struct Member: Sendable, Equatable {
        public var key: String
        public var value: OrderedJSON
        public init(_ key: String, _ value: OrderedJSON) {
            self.key = key
            self.value = value
        }
    }

    // MARK: Access

    /// The value of the last member named `key` (as Python's json keeps the last of duplicates).
    public subscript(key: String) -> OrderedJSON? {
        guard case .object(let members) = self else { return nil }
        return members.last(where: { $0.key == key })?.value
    }

    public var members: [Member]? { if case .object(let m) = self { return m } else { return nil } }
    public var array: [OrderedJSON]? { if case .array(let a) = self { return a } else { return nil } }
    public var string: String? { if case .string(let s) = self { return s } else { return nil } }
    public var bool: Bool? { if case .bool(let b) = self { return b } else { return nil } }
    /// The literal text of a number.
    public var numberText: String? { if case .number(let t) = self { return t } else { return nil } }
    /// An integer literal's value (nil for fractions and exponents).
    public var int: Int? { numberText.flatMap { Int($0) } }
    public var double: Double? { numberText.flatMap { Double($0) } }

    // MARK: Building

    /// An integer.
    public static func int(_ i: Int) -> OrderedJSON { .number(String(i)) }

    /// A number from a Float, written as Float's shortest round-trip text ("1e-05").
    public static func float(_ f: Float) -> OrderedJSON {
        f.isFinite ? .number(f.description) : .null
    }

    /// A number from a Double; a Double that is exactly a Float's value (a Float32 field widened)
    /// is written as that Float's shortest text, so 9.999999747378752e-06 reads back as 1e-05.
    public static func double(_ d: Double) -> OrderedJSON {
        guard d.isFinite else { return .null }
        let f = Float(d)
        if f.isFinite, Double(f) == d { return .number(f.description) }
        return .number(d.description)
    }

    /// An object with its members sorted by key (as Python's `sort_keys=True` sorts them).
    public static func sortedObject(_ members: [String: OrderedJSON]) -> OrderedJSON {
        .object(members.sorted { $0.key.unicodeScalars.lexicographicallyPrecedes($1.key.unicodeScalars) }
            .map { Member($0.key, $0.value) })
    }

    /// Whether JSONSerialization made `n` from true or false (not from 1 or 0).
    package static func isBoolean(_ n: NSNumber) -> Bool {
        String(cString: n.objCType) == "c" && (n == NSNumber(value: true) || n == NSNumber(value: false))
    }

    /// Converts what JSONSerialization takes (dictionaries, arrays, strings, numbers, booleans,
    /// NSNull) into a value with dictionary keys sorted. Float and Float-valued Double fields are
    /// written as Float's shortest text.
    public static func from(_ any: Any) throws -> OrderedJSON {
        if any is NSNull { return .null }
        if let json = any as? OrderedJSON { return json }
        // Exact Swift types first: a native Bool, Int or Float keeps its kind.
        switch any {
        case let s as String: return .string(s)
        case let s as Substring: return .string(String(s))
        default: break
        }
        let type = Swift.type(of: any)
        if type == Bool.self, let b = any as? Bool { return .bool(b) }
        if type == Int.self, let i = any as? Int { return .int(i) }
        if type == Int32.self, let i = any as? Int32 { return .int(Int(i)) }
        if type == Int64.self, let i = any as? Int64 { return .int(Int(i)) }
        if type == UInt32.self, let i = any as? UInt32 { return .number(String(i)) }
        if type == UInt64.self, let i = any as? UInt64 { return .number(String(i)) }
        if type == Float.self, let f = any as? Float { return .float(f) }
        if type == Double.self, let d = any as? Double { return .double(d) }
        if let n = any as? NSNumber {
            if isBoolean(n) { return .bool(n.boolValue) }
            let d = n.doubleValue
            if d == d.rounded(), abs(d) < 1e15 { return .int(Int(d)) }
            return .double(d)
        }
        if let dict = any as? [String: Any] {
            var members: [String: OrderedJSON] = [:]
            for (k, v) in dict { members[k] = try from(v) }
            return sortedObject(members)
        }
        if let list = any as? [Any] { return .array(try list.map(from)) }
        throw OrderedJSONError(offset: 0, detail: "cannot write a value of type \(type) as JSON")
    }

    // MARK: Writing

    /// The text Python's `json.dumps(value, indent=2)` gives, plus a final newline: members and
    /// elements one a line, two spaces per level, ", " never used at line ends, `{}` and `[]` for
    /// empty ones. With `asciiOnly` (Python's default `ensure_ascii=True`, which transformers uses
    /// for config.json) characters beyond ASCII are written as \u escapes; otherwise as UTF-8
    /// (`ensure_ascii=False`, as transformers writes tokenizer_config.json).
    public func serialized(asciiOnly: Bool = false) -> Data {
        var out: [UInt8] = []
        write(to: &out, indent: 0, asciiOnly: asciiOnly)
        out.append(0x0A)
        return Data(out)
    }

    private func write(to out: inout [UInt8], indent: Int, asciiOnly: Bool) {
        switch self {
        case .null: out.append(contentsOf: "null".utf8)
        case .bool(let b): out.append(contentsOf: (b ? "true" : "false").utf8)
        case .number(let t): out.append(contentsOf: t.utf8)
        case .string(let s): Self.writeString(s, to: &out, asciiOnly: asciiOnly)
        case .array(let items):
            if items.isEmpty { out.append(contentsOf: "[]".utf8); return }
            out.append(UInt8(ascii: "["))
            for (k, item) in items.enumerated() {
                if k > 0 { out.append(UInt8(ascii: ",")) }
                Self.newline(&out, indent + 1)
                item.write(to: &out, indent: indent + 1, asciiOnly: asciiOnly)
            }
            Self.newline(&out, indent)
            out.append(UInt8(ascii: "]"))
        case .object(let members):
            if members.isEmpty { out.append(contentsOf: "{}".utf8); return }
            out.append(UInt8(ascii: "{"))
            for (k, m) in members.enumerated() {
                if k > 0 { out.append(UInt8(ascii: ",")) }
                Self.newline(&out, indent + 1)
                Self.writeString(m.key, to: &out, asciiOnly: asciiOnly)
                out.append(contentsOf: ": ".utf8)
                m.value.write(to: &out, indent: indent + 1, asciiOnly: asciiOnly)
            }
            Self.newline(&out, indent)
            out.append(UInt8(ascii: "}"))
        }
    }

    private static func newline(_ out: inout [UInt8], _ indent: Int) {
        out.append(0x0A)
        out.append(contentsOf: repeatElement(UInt8(ascii: " "), count: 2 * indent))
    }

    /// A JSON string literal escaped as Python's json module escapes it.
    package static func writeString(_ s: String, to out: inout [UInt8], asciiOnly: Bool) {
        let hex = Array("0123456789abcdef".utf8)
        func u4(_ v: UInt32) {
            out.append(contentsOf: "\\u".utf8)
            for shift in stride(from: 12, through: 0, by: -4) { out.append(hex[Int((v >> UInt32(shift)) & 0xF)]) }
        }
        out.append(UInt8(ascii: "\""))
        for u in s.unicodeScalars {
            switch u.value {
            case 0x22: out.append(contentsOf: "\\\"".utf8)
            case 0x5C: out.append(contentsOf: "\\\\".utf8)
            case 0x0A: out.append(contentsOf: "\\n".utf8)
            case 0x0D: out.append(contentsOf: "\\r".utf8)
            case 0x09: out.append(contentsOf: "\\t".utf8)
            case 0x08: out.append(contentsOf: "\\b".utf8)
            case 0x0C: out.append(contentsOf: "\\f".utf8)
            case 0..<0x20: u4(u.value)
            case 0x7F... where asciiOnly:
                if u.value >= 0x10000 {
                    let v = u.value - 0x10000
                    u4(0xD800 + (v >> 10))
                    u4(0xDC00 + (v & 0x3FF))
                } else {
                    u4(u.value)
                }
            default: out.append(contentsOf: String(u).utf8)
            }
        }
        out.append(UInt8(ascii: "\""))
    }

    package static func stringLiteral(_ s: String, asciiOnly: Bool = false) -> [UInt8] {
        var out: [UInt8] = []
        writeString(s, to: &out, asciiOnly: asciiOnly)
        return out
    }

    // MARK: Reading

    /// Parses a JSON document (UTF-8). Numbers keep their text; Python's NaN, Infinity and
    /// -Infinity are accepted as numbers, since Python's json writes them.
    public static func parse(_ data: Data) throws -> OrderedJSON {
        try parseWithSpans(data).value
    }

    /// Where a member of the top-level object lies in the text: byte ranges of its key (quotes
    /// included) and of its value.
    package struct MemberSpan {
        package var key: String
        package var keyRange: Range<Int>
        package var valueRange: Range<Int>
    }

    /// Parses, also returning the byte ranges of the top-level object's members (empty when the
    /// document is not an object).
    package static func parseWithSpans(_ data: Data) throws -> (value: OrderedJSON, spans: [MemberSpan]) {
        var p = Parser(bytes: [UInt8](data))
        p.skipWhitespace()
        let value = try p.parseValue(depth: 0)
        p.skipWhitespace()
        guard p.i == p.bytes.count else { throw p.error("unexpected text after the JSON value") }
        return (value, p.spans)
    }

    private struct Parser {
        let bytes: [UInt8]
        var i = 0
        var spans: [MemberSpan] = []

        init(bytes: [UInt8]) {
            self.bytes = bytes
            // A UTF-8 byte-order mark is allowed before the document.
            if bytes.starts(with: [0xEF, 0xBB, 0xBF]) { i = 3 }
        }

        func error(_ detail: String) -> OrderedJSONError { OrderedJSONError(offset: i, detail: detail) }

        mutating func skipWhitespace() {
            while i < bytes.count, bytes[i] == 0x20 || bytes[i] == 0x0A || bytes[i] == 0x0D || bytes[i] == 0x09 { i += 1 }
        }

        mutating func literal(_ word: String) -> Bool {
            let w = Array(word.utf8)
            guard bytes.count - i >= w.count, Array(bytes[i..<i + w.count]) == w else { return false }
            i += w.count
            return true
        }

        mutating func parseValue(depth: Int) throws -> OrderedJSON {
            guard depth < 512 else { throw error("nested too deeply") }
            guard i < bytes.count else { throw error("unexpected end of the document") }
            switch bytes[i] {
            case UInt8(ascii: "{"): return try parseObject(depth: depth)
            case UInt8(ascii: "["):
                i += 1
                var items: [OrderedJSON] = []
                skipWhitespace()
                if i < bytes.count, bytes[i] == UInt8(ascii: "]") { i += 1; return .array(items) }
                while true {
                    skipWhitespace()
                    items.append(try parseValue(depth: depth + 1))
                    skipWhitespace()
                    guard i < bytes.count else { throw error("unterminated array") }
                    if bytes[i] == UInt8(ascii: ",") { i += 1; continue }
                    if bytes[i] == UInt8(ascii: "]") { i += 1; return .array(items) }
                    throw error("expected ',' or ']' in an array")
                }
            case UInt8(ascii: "\""): return .string(try parseString())
            case UInt8(ascii: "t"): if literal("true") { return .bool(true) }
            case UInt8(ascii: "f"): if literal("false") { return .bool(false) }
            case UInt8(ascii: "n"): if literal("null") { return .null }
            case UInt8(ascii: "N"): if literal("NaN") { return .number("NaN") }
            case UInt8(ascii: "I"): if literal("Infinity") { return .number("Infinity") }
            case UInt8(ascii: "-"), UInt8(ascii: "0")...UInt8(ascii: "9"):
                if literal("-Infinity") { return .number("-Infinity") }
                return .number(try parseNumber())
            default: break
            }
            throw error("unexpected character '\(Character(Unicode.Scalar(bytes[i])))'")
        }

        mutating func parseObject(depth: Int) throws -> OrderedJSON {
            i += 1
            var members: [Member] = []
            skipWhitespace()
            if i < bytes.count, bytes[i] == UInt8(ascii: "}") { i += 1; return .object(members) }
            while true {
                skipWhitespace()
                guard i < bytes.count, bytes[i] == UInt8(ascii: "\"") else { throw error("expected a member name in quotes") }
                let keyStart = i
                let key = try parseString()
                let keyEnd = i
                skipWhitespace()
                guard i < bytes.count, bytes[i] == UInt8(ascii: ":") else { throw error("expected ':' after member name \"\(key)\"") }
                i += 1
                skipWhitespace()
                let valueStart = i
                let value = try parseValue(depth: depth + 1)
                if depth == 0 { spans.append(MemberSpan(key: key, keyRange: keyStart..<keyEnd, valueRange: valueStart..<i)) }
                members.append(Member(key, value))
                skipWhitespace()
                guard i < bytes.count else { throw error("unterminated object") }
                if bytes[i] == UInt8(ascii: ",") { i += 1; continue }
                if bytes[i] == UInt8(ascii: "}") { i += 1; return .object(members) }
                throw error("expected ',' or '}' in an object")
            }
        }

        mutating func parseNumber() throws -> String {
            let start = i
            func digits() -> Int {
                let s = i
                while i < bytes.count, bytes[i] >= 0x30, bytes[i] <= 0x39 { i += 1 }
                return i - s
            }
            if bytes[i] == UInt8(ascii: "-") { i += 1 }
            guard i < bytes.count, bytes[i] >= 0x30, bytes[i] <= 0x39 else { throw error("malformed number") }
            if bytes[i] == 0x30 { i += 1 } else { _ = digits() }
            if i < bytes.count, bytes[i] == UInt8(ascii: ".") {
                i += 1
                guard digits() > 0 else { throw error("malformed number: no digits after '.'") }
            }
            if i < bytes.count, bytes[i] == UInt8(ascii: "e") || bytes[i] == UInt8(ascii: "E") {
                i += 1
                if i < bytes.count, bytes[i] == UInt8(ascii: "+") || bytes[i] == UInt8(ascii: "-") { i += 1 }
                guard digits() > 0 else { throw error("malformed number: no digits in the exponent") }
            }
            return String(decoding: bytes[start..<i], as: UTF8.self)
        }

        mutating func hex4() throws -> UInt32 {
            guard bytes.count - i >= 4 else { throw error("truncated \\u escape") }
            var v: UInt32 = 0
            for _ in 0..<4 {
                let c = bytes[i]
                let d: UInt32
                switch c {
                case 0x30...0x39: d = UInt32(c - 0x30)
                case 0x41...0x46: d = UInt32(c - 0x41 + 10)
                case 0x61...0x66: d = UInt32(c - 0x61 + 10)
                default: throw error("bad hex digit in a \\u escape")
                }
                v = v << 4 | d
                i += 1
            }
            return v
        }

        mutating func parseString() throws -> String {
            i += 1
            var out: [UInt8] = []
            while true {
                guard i < bytes.count else { throw error("unterminated string") }
                let c = bytes[i]
                if c == UInt8(ascii: "\"") { i += 1; break }
                if c < 0x20 { throw error("unescaped control character in a string") }
                if c != UInt8(ascii: "\\") { out.append(c); i += 1; continue }
                i += 1
                guard i < bytes.count else { throw error("unterminated escape") }
                let e = bytes[i]
                i += 1
                switch e {
                case UInt8(ascii: "\""), UInt8(ascii: "\\"), UInt8(ascii: "/"): out.append(e)
                case UInt8(ascii: "b"): out.append(0x08)
                case UInt8(ascii: "f"): out.append(0x0C)
                case UInt8(ascii: "n"): out.append(0x0A)
                case UInt8(ascii: "r"): out.append(0x0D)
                case UInt8(ascii: "t"): out.append(0x09)
                case UInt8(ascii: "u"):
                    var v = try hex4()
                    if v >= 0xD800, v < 0xDC00, bytes.count - i >= 6, bytes[i] == UInt8(ascii: "\\"), bytes[i + 1] == UInt8(ascii: "u") {
                        let save = i
                        i += 2
                        let low = try hex4()
                        if low >= 0xDC00, low < 0xE000 {
                            v = 0x10000 + ((v - 0xD800) << 10) + (low - 0xDC00)
                        } else {
                            i = save
                        }
                    }
                    // A lone surrogate cannot be held in a Swift String; it becomes U+FFFD.
                    let scalar = Unicode.Scalar(v) ?? "\u{FFFD}"
                    out.append(contentsOf: String(scalar).utf8)
                default: throw error("unknown escape '\\\(Character(Unicode.Scalar(e)))'")
                }
            }
            guard let s = String(validating: out, as: UTF8.self) else { throw error("string is not valid UTF-8") }
            return s
        }
    }
}

/// A JSON document that cannot be parsed: the byte offset and what was wrong.
public struct OrderedJSONError: Error, CustomStringConvertible, Sendable {
    public let offset: Int
    public let detail: String
    public var description: String { "at byte \(offset): \(detail)" }
}
