import Foundation

/// A value while a chat template renders: what a Python object is to Jinja2. Numbers, strings,
/// lists and dicts follow Python's semantics (Jinja2 evaluates templates as Python), which is what
/// makes the rendered text match transformers' `apply_chat_template` character for character.
enum JinjaValue {
    /// Jinja's Undefined: a missing variable, key or attribute. Prints as "", is false, iterates as
    /// empty; using it any other way fails with `message`.
    case undefined(message: String)
    case none
    case bool(Bool)
    case int(Int)
    case double(Double)
    case string(String)
    case list([JinjaValue])
    /// A Python tuple: literals such as `(',', ':')` and the pairs `dict.items()` yields.
    case tuple([JinjaValue])
    case dict(JinjaDict)
    case namespace(JinjaNamespace)
    case macro(JinjaMacro)
    case function(JinjaFunction)

    static func undefinedName(_ name: String) -> JinjaValue { .undefined(message: "'\(name)' is undefined") }

    var isUndefined: Bool { if case .undefined = self { return true } else { return false } }

    /// Python's truth value.
    var truthy: Bool {
        switch self {
        case .undefined, .none: return false
        case .bool(let b): return b
        case .int(let i): return i != 0
        case .double(let d): return d != 0
        case .string(let s): return !s.isEmpty
        case .list(let a), .tuple(let a): return !a.isEmpty
        case .dict(let d): return !d.isEmpty
        case .namespace, .macro, .function: return true
        }
    }

    /// Python's type name, for error messages.
    var typeName: String {
        switch self {
        case .undefined: return "Undefined"
        case .none: return "NoneType"
        case .bool: return "bool"
        case .int: return "int"
        case .double: return "float"
        case .string: return "str"
        case .list: return "list"
        case .tuple: return "tuple"
        case .dict: return "dict"
        case .namespace: return "Namespace"
        case .macro: return "Macro"
        case .function: return "builtin_function_or_method"
        }
    }

    /// A number as Python sees it (bool is an int there).
    var number: Double? {
        switch self {
        case .bool(let b): return b ? 1 : 0
        case .int(let i): return Double(i)
        case .double(let d): return d
        default: return nil
        }
    }

    /// An int (or bool) as Python's `__index__` gives it.
    var index: Int? {
        switch self {
        case .bool(let b): return b ? 1 : 0
        case .int(let i): return i
        default: return nil
        }
    }
}

/// A Python dict with string keys, in insertion order (json.dumps and iteration keep it).
/// Keys compare by code points, as Python's do (Swift's String == would equate canonically
/// equivalent spellings).
struct JinjaDict {
    private(set) var keys: [String] = []
    private(set) var values: [JinjaValue] = []

    init() {}
    init(_ pairs: [(String, JinjaValue)]) { for (k, v) in pairs { self[k] = v } }

    var isEmpty: Bool { keys.isEmpty }
    var count: Int { keys.count }
    var pairs: Zip2Sequence<[String], [JinjaValue]> { zip(keys, values) }

    private func position(of key: String) -> Int? { keys.firstIndex { PyString.equal($0, key) } }

    subscript(key: String) -> JinjaValue? {
        get { position(of: key).map { values[$0] } }
        set {
            if let i = position(of: key) {
                if let v = newValue { values[i] = v } else { keys.remove(at: i); values.remove(at: i) }
            } else if let v = newValue {
                keys.append(key)
                values.append(v)
            }
        }
    }
}

/// `namespace(...)`: the one mutable object templates have (`{% set ns.attr = ... %}` reaches out of loops).
final class JinjaNamespace {
    var attributes: JinjaDict
    init(_ attributes: JinjaDict) { self.attributes = attributes }
}

/// A `{% macro %}` bound to the scope it was defined in.
final class JinjaMacro {
    let definition: JinjaMacroDefinition
    let closure: JinjaScope
    init(_ definition: JinjaMacroDefinition, closure: JinjaScope) {
        self.definition = definition
        self.closure = closure
    }
}

/// A built-in callable: a global function, a bound method (`text.split`), `loop.cycle`.
final class JinjaFunction {
    let name: String
    let body: (_ args: [JinjaValue], _ kwargs: [(String, JinjaValue)]) throws -> JinjaValue
    init(_ name: String, _ body: @escaping (_ args: [JinjaValue], _ kwargs: [(String, JinjaValue)]) throws -> JinjaValue) {
        self.name = name
        self.body = body
    }
}

/// Variables: one scope per template, per loop iteration, per macro call. `set` writes the innermost.
final class JinjaScope {
    private var variables: [String: JinjaValue] = [:]
    let parent: JinjaScope?

    init(parent: JinjaScope?) { self.parent = parent }

    func lookup(_ name: String) -> JinjaValue? {
        var scope: JinjaScope? = self
        while let s = scope {
            if let v = s.variables[name] { return v }
            scope = s.parent
        }
        return nil
    }

    func set(_ name: String, _ value: JinjaValue) { variables[name] = value }
}

// MARK: - Python equality, ordering and text forms

extension JinjaValue {
    /// Python's `==`.
    static func pyEqual(_ a: JinjaValue, _ b: JinjaValue) -> Bool {
        switch (a, b) {
        case (.undefined, .undefined), (.none, .none): return true
        case (.string(let x), .string(let y)): return PyString.equal(x, y)
        case (.list(let x), .list(let y)), (.tuple(let x), .tuple(let y)):
            return x.count == y.count && zip(x, y).allSatisfy { pyEqual($0, $1) }
        case (.dict(let x), .dict(let y)):
            guard x.count == y.count else { return false }
            for (k, v) in x.pairs {
                guard let w = y[k], pyEqual(v, w) else { return false }
            }
            return true
        case (.namespace(let x), .namespace(let y)): return x === y
        case (.macro(let x), .macro(let y)): return x === y
        case (.function(let x), .function(let y)): return x === y
        default:
            if case .int(let x) = a, case .int(let y) = b { return x == y }
            if let x = a.number, let y = b.number { return x == y }
            return false
        }
    }

    /// Python's `<`; nil where Python raises TypeError (say, str < int).
    static func pyLess(_ a: JinjaValue, _ b: JinjaValue) -> Bool? {
        switch (a, b) {
        case (.string(let x), .string(let y)): return PyString.less(x, y)
        case (.list(let x), .list(let y)), (.tuple(let x), .tuple(let y)):
            for (u, v) in zip(x, y) where !pyEqual(u, v) { return pyLess(u, v) }
            return x.count < y.count
        default:
            if case .int(let x) = a, case .int(let y) = b { return x < y }
            if let x = a.number, let y = b.number { return x < y }
            return nil
        }
    }

    /// Python's `str()`, which `{{ }}` prints; Undefined prints as "".
    var pyStr: String {
        switch self {
        case .undefined: return ""
        case .string(let s): return s
        default: return pyRepr
        }
    }

    /// Python's `repr()`.
    var pyRepr: String {
        switch self {
        case .undefined: return ""
        case .none: return "None"
        case .bool(let b): return b ? "True" : "False"
        case .int(let i): return String(i)
        case .double(let d): return PyFloat.repr(d)
        case .string(let s): return PyString.repr(s)
        case .list(let a): return "[" + a.map(\.pyRepr).joined(separator: ", ") + "]"
        case .tuple(let a): return "(" + a.map(\.pyRepr).joined(separator: ", ") + (a.count == 1 ? ",)" : ")")
        case .dict(let d): return JinjaValue.dictRepr(d)
        case .namespace(let n): return "<Namespace " + JinjaValue.dictRepr(n.attributes) + ">"
        case .macro(let m): return "<Macro '\(m.definition.name)'>"
        case .function(let f): return "<built-in function \(f.name)>"
        }
    }

    private static func dictRepr(_ d: JinjaDict) -> String {
        "{" + d.pairs.map { PyString.repr($0) + ": " + $1.pyRepr }.joined(separator: ", ") + "}"
    }
}

enum PyFloat {
    /// Python's float repr: the shortest text that reads back, "1.0" for whole numbers, exponent
    /// form from 1e16 and below 1e-4. Swift's description follows the same rules; only the
    /// spellings of the non-finite values need care.
    static func repr(_ d: Double) -> String {
        if d.isNaN { return "nan" }
        if d.isInfinite { return d < 0 ? "-inf" : "inf" }
        return d.description
    }
}

/// Python's str operations on Swift strings: by code points (never grapheme clusters), comparing
/// code points exactly (never canonical equivalence).
enum PyString {
    static func equal(_ a: String, _ b: String) -> Bool { a.utf8.elementsEqual(b.utf8) }

    /// Code point order; UTF-8 byte order is the same order.
    static func less(_ a: String, _ b: String) -> Bool { a.utf8.lexicographicallyPrecedes(b.utf8) }

    static func scalars(_ s: String) -> [Unicode.Scalar] { Array(s.unicodeScalars) }

    static func string<S: Sequence>(_ scalars: S) -> String where S.Element == Unicode.Scalar {
        var view = String.UnicodeScalarView()
        view.append(contentsOf: scalars)
        return String(view)
    }

    static func length(_ s: String) -> Int { s.unicodeScalars.count }

    /// `str.isspace` (also what `\s` matches in Python's regular expressions).
    static func isSpace(_ c: Unicode.Scalar) -> Bool {
        switch c.value {
        case 0x09...0x0D, 0x1C...0x20, 0x85, 0xA0, 0x1680, 0x2000...0x200A, 0x2028, 0x2029, 0x202F, 0x205F, 0x3000: return true
        default: return false
        }
    }

    static func strip(_ s: String, chars: String?, left: Bool, right: Bool) -> String {
        let a = scalars(s)
        let set: [Unicode.Scalar]? = chars.map(scalars)
        func drop(_ c: Unicode.Scalar) -> Bool { set.map { $0.contains(c) } ?? isSpace(c) }
        var lo = 0, hi = a.count
        if left { while lo < hi, drop(a[lo]) { lo += 1 } }
        if right { while hi > lo, drop(a[hi - 1]) { hi -= 1 } }
        return string(a[lo..<hi])
    }

    /// Byte offsets of the non-overlapping occurrences of `needle` (non-empty) in `hay`.
    static func occurrences(_ hay: [UInt8], _ needle: [UInt8], limit: Int = Int.max) -> [Int] {
        var found: [Int] = []
        guard !needle.isEmpty, needle.count <= hay.count else { return found }
        var i = 0
        let last = hay.count - needle.count
        while i <= last, found.count < limit {
            if hay[i] == needle[0], hay[i..<(i + needle.count)].elementsEqual(needle) {
                found.append(i)
                i += needle.count
            } else {
                i += 1
            }
        }
        return found
    }

    static func contains(_ hay: String, _ needle: String) -> Bool {
        needle.isEmpty || !occurrences(Array(hay.utf8), Array(needle.utf8), limit: 1).isEmpty
    }

    /// `str.find` / `str.rfind`: a code point index, or -1.
    static func find(_ hay: String, _ needle: String, last: Bool) -> Int {
        let h = Array(hay.utf8), n = Array(needle.utf8)
        var byte: Int?
        if n.isEmpty {
            byte = last ? h.count : 0
        } else if last {
            var i = h.count - n.count
            while i >= 0 {
                if h[i..<(i + n.count)].elementsEqual(n) { byte = i; break }
                i -= 1
            }
        } else {
            byte = occurrences(h, n, limit: 1).first
        }
        guard let b = byte else { return -1 }
        return h[0..<b].reduce(0) { $0 + (($1 & 0xC0) != 0x80 ? 1 : 0) }
    }

    static func count(_ hay: String, _ needle: String) -> Int {
        needle.isEmpty ? length(hay) + 1 : occurrences(Array(hay.utf8), Array(needle.utf8)).count
    }

    static func replace(_ s: String, _ old: String, _ new: String, count: Int) -> String {
        let limit = count < 0 ? Int.max : count
        if old.isEmpty {
            // Python puts `new` before every code point and at the end.
            var out = "", n = 0
            for c in s.unicodeScalars {
                if n < limit { out += new; n += 1 }
                out.unicodeScalars.append(c)
            }
            if n < limit { out += new }
            return out
        }
        let h = Array(s.utf8), o = Array(old.utf8), w = Array(new.utf8)
        var out: [UInt8] = [], at = 0
        for i in occurrences(h, o, limit: limit) {
            out.append(contentsOf: h[at..<i])
            out.append(contentsOf: w)
            at = i + o.count
        }
        out.append(contentsOf: h[at...])
        return String(decoding: out, as: UTF8.self)
    }

    /// `str.split(sep, maxsplit)`; `sep` nil splits on runs of whitespace, dropping empty parts.
    static func split(_ s: String, _ sep: String?, maxsplit: Int) -> [String] {
        let limit = maxsplit < 0 ? Int.max : maxsplit
        guard let sep else {
            var parts: [String] = []
            let a = scalars(s)
            var i = 0
            while i < a.count {
                while i < a.count, isSpace(a[i]) { i += 1 }
                if i == a.count { break }
                if parts.count == limit {
                    var end = a.count
                    while end > i, isSpace(a[end - 1]) { end -= 1 }
                    parts.append(string(a[i..<end]))
                    break
                }
                let start = i
                while i < a.count, !isSpace(a[i]) { i += 1 }
                parts.append(string(a[start..<i]))
            }
            return parts
        }
        let h = Array(s.utf8), n = Array(sep.utf8)
        var parts: [String] = [], at = 0
        for i in occurrences(h, n, limit: limit) {
            parts.append(String(decoding: h[at..<i], as: UTF8.self))
            at = i + n.count
        }
        parts.append(String(decoding: h[at...], as: UTF8.self))
        return parts
    }

    /// `str.rsplit(sep, maxsplit)` for a given separator.
    static func rsplit(_ s: String, _ sep: String, maxsplit: Int) -> [String] {
        if maxsplit < 0 { return split(s, sep, maxsplit: -1) }
        let h = Array(s.utf8), n = Array(sep.utf8)
        var parts: [String] = [], end = h.count, i = h.count - n.count
        while i >= 0, parts.count < maxsplit {
            if h[i..<(i + n.count)].elementsEqual(n) {
                parts.append(String(decoding: h[(i + n.count)..<end], as: UTF8.self))
                end = i
                i -= n.count
            } else {
                i -= 1
            }
        }
        parts.append(String(decoding: h[0..<end], as: UTF8.self))
        return parts.reversed()
    }

    /// `str.splitlines(keepends)`.
    static func splitlines(_ s: String, keepends: Bool) -> [String] {
        let a = scalars(s)
        var lines: [String] = [], start = 0, i = 0
        while i < a.count {
            let c = a[i].value
            let isBreak = c == 0x0A || c == 0x0D || c == 0x0B || c == 0x0C || (0x1C...0x1E).contains(c)
                || c == 0x85 || c == 0x2028 || c == 0x2029
            if isBreak {
                var end = i + 1
                if c == 0x0D, i + 1 < a.count, a[i + 1].value == 0x0A { end += 1 }
                lines.append(string(a[start..<(keepends ? end : i)]))
                start = end
                i = end
            } else {
                i += 1
            }
        }
        if start < a.count { lines.append(string(a[start...])) }
        return lines
    }

    static func upper(_ s: String) -> String { s.uppercased() }
    static func lower(_ s: String) -> String { s.lowercased() }

    private static func titlecase(_ c: Unicode.Scalar) -> String { c.properties.titlecaseMapping }

    /// `str.capitalize`: the first code point in title case, the rest lower case.
    static func capitalize(_ s: String) -> String {
        guard let first = s.unicodeScalars.first else { return s }
        return titlecase(first) + lower(string(s.unicodeScalars.dropFirst()))
    }

    /// `str.title`: title case after an uncased code point, lower case after a cased one.
    static func title(_ s: String) -> String {
        var out = "", previousCased = false
        for c in s.unicodeScalars {
            out += previousCased ? c.properties.lowercaseMapping : titlecase(c)
            previousCased = c.properties.isCased
        }
        return out
    }

    /// `str.islower` / `str.isupper`: some lower (upper) case code point, and none upper (lower) or title case.
    static func isCase(_ s: String, lower wantLower: Bool) -> Bool {
        var cased = false
        for c in s.unicodeScalars {
            let p = c.properties
            let other = wantLower ? p.isUppercase : p.isLowercase
            if other || p.generalCategory == .titlecaseLetter { return false }
            if wantLower ? p.isLowercase : p.isUppercase { cased = true }
        }
        return cased
    }

    /// Python's `repr()` of a str.
    static func repr(_ s: String) -> String {
        let quote: Unicode.Scalar = (s.unicodeScalars.contains("'") && !s.unicodeScalars.contains("\"")) ? "\"" : "'"
        var out = String(quote)
        for c in s.unicodeScalars {
            switch c {
            case quote, "\\": out += "\\" + String(c)
            case "\t": out += "\\t"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            default:
                if c.value < 0x20 || c.value == 0x7F { out += hexEscape(c) }
                else if c.value < 0x7F || isPrintable(c) { out.unicodeScalars.append(c) }
                else { out += hexEscape(c) }
            }
        }
        out.unicodeScalars.append(quote)
        return out
    }

    /// Python's `\xNN`, `\uNNNN` or `\UNNNNNNNN` spelling of a code point (lower-case hex).
    static func hexEscape(_ c: Unicode.Scalar) -> String {
        let v = c.value
        let (prefix, width) = v <= 0xFF ? ("\\x", 2) : v <= 0xFFFF ? ("\\u", 4) : ("\\U", 8)
        let hex = String(v, radix: 16)
        return prefix + String(repeating: "0", count: max(0, width - hex.count)) + hex
    }

    /// `str.isprintable` for one code point: not a control, format, surrogate, private-use,
    /// unassigned or separator character (the space excepted).
    static func isPrintable(_ c: Unicode.Scalar) -> Bool {
        if c == " " { return true }
        switch c.properties.generalCategory {
        case .control, .format, .surrogate, .privateUse, .unassigned, .lineSeparator, .paragraphSeparator, .spaceSeparator:
            return false
        default:
            return true
        }
    }
}
