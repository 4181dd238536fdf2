import Foundation

/// When `strftime_now` renders.
struct JinjaClock: Sendable {
    let now: Date
    let timeZone: TimeZone
}

/// Arguments of a filter, test, method or global function call.
struct JinjaCallArguments {
    let positional: [JinjaValue]
    let keyword: [(String, JinjaValue)]
    let name: String

    init(_ positional: [JinjaValue], _ keyword: [(String, JinjaValue)], name: String) {
        self.positional = positional
        self.keyword = keyword
        self.name = name
    }

    /// The arguments matched to parameter names as Python binds them; nil where not given.
    func bind(_ parameters: [String]) throws -> [JinjaValue?] {
        guard positional.count <= parameters.count else {
            throw JinjaCallError(message: "\(name)() takes at most \(parameters.count) argument(s) (\(positional.count) given)")
        }
        var bound = [JinjaValue?](repeating: nil, count: parameters.count)
        for (i, v) in positional.enumerated() { bound[i] = v }
        for (k, v) in keyword {
            guard let i = parameters.firstIndex(of: k) else { throw JinjaCallError(message: "\(name)() got an unexpected keyword argument '\(k)'") }
            guard bound[i] == nil else { throw JinjaCallError(message: "\(name)() got multiple values for argument '\(k)'") }
            bound[i] = v
        }
        return bound
    }
}

/// The filters, tests, methods and global functions Topiary's Jinja implements, with the
/// semantics of Jinja2 3.1 and Python (and transformers' own `tojson`, `raise_exception`,
/// `strftime_now`).
enum JinjaBuiltins {
    static let filters: Set<String> = [
        "abs", "attr", "capitalize", "count", "d", "default", "first", "float", "indent", "int", "items", "join",
        "last", "length", "list", "lower", "map", "max", "min", "reject", "rejectattr", "replace", "reverse", "round",
        "select", "selectattr", "sort", "string", "sum", "title", "tojson", "trim", "unique", "upper",
    ]

    static let tests: Set<String> = [
        "defined", "undefined", "none", "boolean", "false", "true", "integer", "float", "number", "string", "mapping",
        "sequence", "iterable", "callable", "sameas", "odd", "even", "divisibleby", "lower", "upper", "in",
        "eq", "equalto", "==", "ne", "!=", "lt", "lessthan", "<", "le", "<=", "gt", "greaterthan", ">", "ge", ">=",
    ]

    static let stringMethods: Set<String> = [
        "startswith", "endswith", "split", "rsplit", "strip", "lstrip", "rstrip", "upper", "lower", "title",
        "capitalize", "replace", "find", "rfind", "count", "join", "splitlines", "isdigit", "isalpha", "isalnum",
        "isspace", "islower", "isupper",
    ]
    static let dictMethods: Set<String> = ["items", "keys", "values", "get"]
    static let listMethods: Set<String> = ["count", "index"]
    /// Every name a template may call as `x.name(...)`; `cycle` is `loop.cycle`.
    static let methods: Set<String> = stringMethods.union(dictMethods).union(listMethods).union(["cycle"])

    static let globalFunctions: Set<String> = ["range", "dict", "namespace", "raise_exception", "strftime_now"]

    // MARK: Globals

    /// The global functions, bound to a render (its clock).
    static func globals(clock: JinjaClock) -> [String: JinjaValue] {
        var g: [String: JinjaValue] = [:]
        g["raise_exception"] = .function(JinjaFunction("raise_exception") { args, kwargs in
            let a = try JinjaCallArguments(args, kwargs, name: "raise_exception").bind(["message"])
            throw ChatTemplateError.raised((a[0] ?? .none).pyStr)
        })
        g["strftime_now"] = .function(JinjaFunction("strftime_now") { args, kwargs in
            let a = try JinjaCallArguments(args, kwargs, name: "strftime_now").bind(["format"])
            guard case .string(let format)? = a[0] else { throw JinjaCallError(message: "strftime_now() needs a format string") }
            return .string(strftime(format, clock))
        })
        g["namespace"] = .function(JinjaFunction("namespace") { args, kwargs in
            var d = JinjaDict()
            if let first = args.first {
                guard args.count == 1, case .dict(let initial) = first else {
                    throw JinjaCallError(message: "namespace() takes at most one positional argument, a dict")
                }
                d = initial
            }
            for (k, v) in kwargs { d[k] = v }
            return .namespace(JinjaNamespace(d))
        })
        g["dict"] = .function(JinjaFunction("dict") { args, kwargs in
            var d = JinjaDict()
            if let first = args.first {
                guard args.count == 1, case .dict(let initial) = first else {
                    throw JinjaCallError(message: "dict() takes at most one positional argument, a dict")
                }
                d = initial
            }
            for (k, v) in kwargs { d[k] = v }
            return .dict(d)
        })
        g["range"] = .function(JinjaFunction("range") { args, kwargs in
            guard kwargs.isEmpty, (1...3).contains(args.count) else { throw JinjaCallError(message: "range() takes 1 to 3 integer arguments") }
            let ints = try args.map { v -> Int in
                guard let i = v.index else { throw JinjaCallError(message: "'\(v.typeName)' object cannot be interpreted as an integer") }
                return i
            }
            let (start, stop, step) = ints.count == 1 ? (0, ints[0], 1) : (ints[0], ints[1], ints.count == 3 ? ints[2] : 1)
            guard step != 0 else { throw JinjaCallError(message: "range() arg 3 must not be zero") }
            let items = stride(from: start, to: stop, by: step)
            guard items.underestimatedCount <= 100_000 else {
                throw JinjaCallError(message: "range too big, the sandbox blocks ranges larger than MAX_RANGE (100000)")
            }
            return .list(items.map(JinjaValue.int))
        })
        return g
    }

    // MARK: Methods

    /// `object.name` as a callable, for the methods of str, dict and list Topiary implements.
    static func boundMethod(_ object: JinjaValue, _ name: String, _ interpreter: JinjaInterpreter) -> JinjaFunction? {
        switch object {
        case .string(let s) where stringMethods.contains(name):
            return JinjaFunction(name) { args, kwargs in try stringMethod(s, name, JinjaCallArguments(args, kwargs, name: name)) }
        case .dict(let d) where dictMethods.contains(name):
            return JinjaFunction(name) { args, kwargs in
                let call = JinjaCallArguments(args, kwargs, name: name)
                switch name {
                case "items":
                    _ = try call.bind([])
                    return .list(d.pairs.map { .tuple([.string($0), $1]) })
                case "keys":
                    _ = try call.bind([])
                    return .list(d.keys.map(JinjaValue.string))
                case "values":
                    _ = try call.bind([])
                    return .list(d.values)
                default:  // get
                    let a = try call.bind(["key", "default"])
                    guard let key = a[0] else { throw JinjaCallError(message: "get() needs a key") }
                    if case .string(let k) = key, let v = d[k] { return v }
                    return a[1] ?? .none
                }
            }
        case .list(let items) where listMethods.contains(name):
            return JinjaFunction(name) { args, kwargs in
                let a = try JinjaCallArguments(args, kwargs, name: name).bind(["value"])
                guard let needle = a[0] else { throw JinjaCallError(message: "\(name)() takes exactly one argument") }
                if name == "count" { return .int(items.filter { JinjaValue.pyEqual($0, needle) }.count) }
                guard let i = items.firstIndex(where: { JinjaValue.pyEqual($0, needle) }) else {
                    throw JinjaCallError(message: "\(needle.pyRepr) is not in list")
                }
                return .int(i)
            }
        default:
            return nil
        }
    }

    private static func optionalString(_ v: JinjaValue?, _ method: String) throws -> String? {
        switch v {
        case nil, .none?: return nil
        case .string(let s)?: return s
        case let other?: throw JinjaCallError(message: "\(method) arg must be None or str, not \(other.typeName)")
        }
    }

    private static func requiredString(_ v: JinjaValue?, _ method: String) throws -> String {
        guard case .string(let s)? = v else {
            throw JinjaCallError(message: "\(method)() needs a str argument, not \(v?.typeName ?? "nothing")")
        }
        return s
    }

    private static func stringMethod(_ s: String, _ name: String, _ call: JinjaCallArguments) throws -> JinjaValue {
        switch name {
        case "startswith", "endswith":
            let a = try call.bind(["prefix"])
            let candidates: [JinjaValue]
            switch a[0] {
            case .string?: candidates = [a[0]!]
            case .tuple(let items)?: candidates = items
            default: throw JinjaCallError(message: "\(name) first arg must be str or a tuple of str")
            }
            for case .string(let p) in candidates {
                let (x, y) = (Array(s.utf8), Array(p.utf8))
                if name == "startswith" ? x.starts(with: y) : x.reversed().starts(with: y.reversed()) { return .bool(true) }
            }
            return .bool(false)
        case "split", "rsplit":
            let a = try call.bind(["sep", "maxsplit"])
            let sep = try optionalString(a[0], name)
            if sep?.isEmpty == true { throw JinjaCallError(message: "empty separator") }
            let maxsplit = a[1]?.index ?? -1
            if name == "rsplit", let sep { return .list(PyString.rsplit(s, sep, maxsplit: maxsplit).map(JinjaValue.string)) }
            if name == "rsplit", maxsplit >= 0 { throw ChatTemplateError.unsupported("str.rsplit() on whitespace with maxsplit", line: 0) }
            return .list(PyString.split(s, sep, maxsplit: maxsplit).map(JinjaValue.string))
        case "strip", "lstrip", "rstrip":
            let a = try call.bind(["chars"])
            return .string(PyString.strip(s, chars: try optionalString(a[0], name), left: name != "rstrip", right: name != "lstrip"))
        case "upper": _ = try call.bind([]); return .string(PyString.upper(s))
        case "lower": _ = try call.bind([]); return .string(PyString.lower(s))
        case "title": _ = try call.bind([]); return .string(PyString.title(s))
        case "capitalize": _ = try call.bind([]); return .string(PyString.capitalize(s))
        case "replace":
            let a = try call.bind(["old", "new", "count"])
            return .string(PyString.replace(s, try requiredString(a[0], name), try requiredString(a[1], name), count: a[2]?.index ?? -1))
        case "find", "rfind":
            let a = try call.bind(["sub"])
            return .int(PyString.find(s, try requiredString(a[0], name), last: name == "rfind"))
        case "count":
            let a = try call.bind(["sub"])
            return .int(PyString.count(s, try requiredString(a[0], name)))
        case "join":
            let a = try call.bind(["iterable"])
            let items: [JinjaValue]
            switch a[0] {
            case .list(let x)?, .tuple(let x)?: items = x
            case .string(let t)?: items = t.unicodeScalars.map { .string(String($0)) }
            case .dict(let d)?: items = d.keys.map(JinjaValue.string)
            default: throw JinjaCallError(message: "can only join an iterable")
            }
            return .string(try items.map { v -> String in
                guard case .string(let t) = v else { throw JinjaCallError(message: "sequence item: expected str instance, \(v.typeName) found") }
                return t
            }.joined(separator: s))
        case "splitlines":
            let a = try call.bind(["keepends"])
            return .list(PyString.splitlines(s, keepends: a[0]?.truthy ?? false).map(JinjaValue.string))
        case "isdigit", "isalpha", "isalnum", "isspace":
            _ = try call.bind([])
            guard !s.isEmpty else { return .bool(false) }
            return .bool(s.unicodeScalars.allSatisfy { c in
                let p = c.properties
                let digit = p.numericType == .decimal || p.numericType == .digit
                let alpha = [.uppercaseLetter, .lowercaseLetter, .titlecaseLetter, .modifierLetter, .otherLetter].contains(p.generalCategory)
                switch name {
                case "isdigit": return digit
                case "isalpha": return alpha
                case "isalnum": return alpha || digit || p.numericType != nil
                default: return PyString.isSpace(c)
                }
            })
        case "islower", "isupper":
            _ = try call.bind([])
            return .bool(PyString.isCase(s, lower: name == "islower"))
        default:
            throw JinjaCallError(message: "'str' object has no attribute '\(name)'")
        }
    }

    // MARK: Filters

    private static func isNone(_ v: JinjaValue) -> Bool { if case .none = v { return true } else { return false } }

    /// `make_attrgetter`: items of `value` reached through a dotted path ("a.b", "items.0"), each
    /// step as `x[step]` (item first, then attribute).
    static func attributePath(_ value: JinjaValue, _ path: JinjaValue, _ interpreter: JinjaInterpreter, default fallback: JinjaValue? = nil) throws -> JinjaValue {
        let parts: [JinjaValue]
        if case .string(let p) = path {
            parts = PyString.split(p, ".", maxsplit: -1).map { part in Int(part).map(JinjaValue.int) ?? .string(part) }
        } else {
            parts = [path]
        }
        var item = value
        for part in parts {
            if case .undefined(let m) = item { throw JinjaCallError(message: m) }
            if let v = interpreter.item(item, part) {
                item = v
            } else if case .string(let name) = part, let v = interpreter.attribute(item, name) {
                item = v
            } else {
                item = .undefined(message: "'\(item.typeName) object' has no attribute '\(part.pyStr)'")
            }
            if let fallback, item.isUndefined { item = fallback }
        }
        return item
    }

    static func filter(_ name: String, _ value: JinjaValue, _ call: JinjaCallArguments, _ interpreter: JinjaInterpreter) throws -> JinjaValue {
        func iterate(_ v: JinjaValue) throws -> [JinjaValue] {
            do { return try interpreter.iterate(v, line: 0) } catch let error as ChatTemplateError { throw JinjaCallError(message: error.message) }
        }
        func lowered(_ v: JinjaValue, _ caseSensitive: Bool) -> JinjaValue {
            if !caseSensitive, case .string(let s) = v { return .string(PyString.lower(s)) }
            return v
        }
        func less(_ a: JinjaValue, _ b: JinjaValue) throws -> Bool {
            guard let r = JinjaValue.pyLess(a, b) else {
                throw JinjaCallError(message: "'<' not supported between instances of '\(a.typeName)' and '\(b.typeName)'")
            }
            return r
        }
        switch name {
        case "abs":
            _ = try call.bind([])
            switch value {
            case .int(let i): return .int(abs(i))
            case .bool(let b): return .int(b ? 1 : 0)
            case .double(let d): return .double(abs(d))
            default: throw JinjaCallError(message: "bad operand type for abs(): '\(value.typeName)'")
            }
        case "attr":
            let a = try call.bind(["name"])
            guard case .string(let n)? = a[0] else { throw JinjaCallError(message: "attr() needs a name") }
            return interpreter.attribute(value, n) ?? .undefined(message: "'\(value.typeName) object' has no attribute '\(n)'")
        case "capitalize":
            _ = try call.bind([])
            return .string(PyString.capitalize(value.pyStr))
        case "count", "length":
            _ = try call.bind([])
            switch value {
            case .undefined: return .int(0)
            case .string(let s): return .int(PyString.length(s))
            case .list(let a), .tuple(let a): return .int(a.count)
            case .dict(let d): return .int(d.count)
            default: throw JinjaCallError(message: "object of type '\(value.typeName)' has no len()")
            }
        case "d", "default":
            let a = try call.bind(["default_value", "boolean"])
            let useDefault = value.isUndefined || ((a[1]?.truthy ?? false) && !value.truthy)
            return useDefault ? (a[0] ?? .string("")) : value
        case "first", "last":
            _ = try call.bind([])
            let items = try iterate(value)
            return (name == "first" ? items.first : items.last) ?? .undefined(message: "No \(name) item, sequence was empty.")
        case "float":
            let a = try call.bind(["default"])
            return pyFloat(value).map(JinjaValue.double) ?? a[0] ?? .double(0)
        case "indent":
            let a = try call.bind(["width", "first", "blank"])
            let indentation: String
            switch a[0] {
            case .string(let s)?: indentation = s
            case let w?: indentation = String(repeating: " ", count: max(w.index ?? 4, 0))
            case nil: indentation = "    "
            }
            let lines = PyString.splitlines(value.pyStr + "\n", keepends: false)
            var result: String
            if a[2]?.truthy ?? false {
                result = lines.joined(separator: "\n" + indentation)
            } else {
                result = lines.first ?? ""
                if lines.count > 1 { result += "\n" + lines.dropFirst().map { $0.isEmpty ? $0 : indentation + $0 }.joined(separator: "\n") }
            }
            return .string((a[1]?.truthy ?? false) ? indentation + result : result)
        case "int":
            let a = try call.bind(["default", "base"])
            if let base = a[1], base.index != 10 {
                throw ChatTemplateError.unsupported("int filter with a base other than 10", line: 0)
            }
            return pyInt(value).map(JinjaValue.int) ?? a[0] ?? .int(0)
        case "items":
            _ = try call.bind([])
            switch value {
            case .undefined: return .list([])
            case .dict(let d): return .list(d.pairs.map { .tuple([.string($0), $1]) })
            default: throw JinjaCallError(message: "Can only get item pairs from a mapping.")
            }
        case "join":
            let a = try call.bind(["d", "attribute"])
            var items = try iterate(value)
            if let attribute = a[1], !isNone(attribute) { items = try items.map { try attributePath($0, attribute, interpreter) } }
            return .string(items.map(\.pyStr).joined(separator: (a[0] ?? .string("")).pyStr))
        case "list":
            _ = try call.bind([])
            return .list(try iterate(value))
        case "lower":
            _ = try call.bind([])
            return .string(PyString.lower(value.pyStr))
        case "upper":
            _ = try call.bind([])
            return .string(PyString.upper(value.pyStr))
        case "map":
            let items = try iterate(value)
            if call.positional.isEmpty, let attribute = call.keyword.first(where: { $0.0 == "attribute" })?.1 {
                let fallback = call.keyword.first(where: { $0.0 == "default" })?.1
                guard call.keyword.allSatisfy({ $0.0 == "attribute" || $0.0 == "default" }) else {
                    throw JinjaCallError(message: "Unexpected keyword argument for map")
                }
                return .list(try items.map { try attributePath($0, attribute, interpreter, default: fallback.flatMap { isNone($0) ? nil : $0 }) })
            }
            guard case .string(let filterName)? = call.positional.first else { throw JinjaCallError(message: "map requires a filter argument") }
            guard filters.contains(filterName) else { throw ChatTemplateError.unsupported("Jinja filter '\(filterName)' (in map)", line: 0) }
            let rest = JinjaCallArguments(Array(call.positional.dropFirst()), call.keyword, name: filterName)
            return .list(try items.map { try filter(filterName, $0, rest, interpreter) })
        case "max", "min":
            let a = try call.bind(["case_sensitive", "attribute"])
            let caseSensitive = a[0]?.truthy ?? false
            var best: (item: JinjaValue, key: JinjaValue)?
            for item in try iterate(value) {
                let key = lowered(try a[1].map { try attributePath(item, $0, interpreter) } ?? item, caseSensitive)
                if let b = best {
                    if name == "min" ? try less(key, b.key) : try less(b.key, key) { best = (item, key) }
                } else {
                    best = (item, key)
                }
            }
            return best?.item ?? .undefined(message: "No aggregated item, sequence was empty.")
        case "reject", "select", "rejectattr", "selectattr":
            let byAttribute = name.hasSuffix("attr")
            let keep = name.hasPrefix("select")
            var args = call.positional
            var attribute: JinjaValue?
            if byAttribute {
                guard !args.isEmpty else { throw JinjaCallError(message: "Missing parameter for attribute name") }
                attribute = args.removeFirst()
            }
            var testName: String?
            if !args.isEmpty {
                guard case .string(let t) = args.removeFirst() else { throw JinjaCallError(message: "the test name must be a string") }
                guard tests.contains(t) else { throw ChatTemplateError.unsupported("Jinja test '\(t)' (in \(name))", line: 0) }
                testName = t
            }
            let testArgs = JinjaCallArguments(args, call.keyword, name: testName ?? name)
            return .list(try iterate(value).filter { item in
                let subject = try attribute.map { try attributePath(item, $0, interpreter) } ?? item
                let passed = try testName.map { try test($0, subject, testArgs, interpreter) } ?? subject.truthy
                return passed == keep
            })
        case "replace":
            let a = try call.bind(["old", "new", "count"])
            guard let old = a[0], let new = a[1] else { throw JinjaCallError(message: "replace() needs old and new") }
            let count: Int
            switch a[2] {
            case nil, .none?: count = -1
            case let c?:
                guard let i = c.index else { throw JinjaCallError(message: "'\(c.typeName)' object cannot be interpreted as an integer") }
                count = i
            }
            return .string(PyString.replace(value.pyStr, old.pyStr, new.pyStr, count: count))
        case "reverse":
            _ = try call.bind([])
            if case .string(let s) = value { return .string(PyString.string(s.unicodeScalars.reversed())) }
            return .list(try iterate(value).reversed())
        case "round":
            let a = try call.bind(["precision", "method"])
            let precision = a[0]?.index ?? 0
            let method = a[1]?.pyStr ?? "common"
            guard ["common", "ceil", "floor"].contains(method) else { throw JinjaCallError(message: "method must be common, ceil or floor") }
            if method == "common", case .int = value, precision >= 0 { return value }
            guard let x = value.number else { throw JinjaCallError(message: "type \(value.typeName) doesn't define __round__ method") }
            if method != "common" {
                let scale = Foundation.pow(10.0, Double(precision))
                return .double((method == "ceil" ? (x * scale).rounded(.up) : (x * scale).rounded(.down)) / scale)
            }
            if precision >= 0, x.isFinite {
                // Python rounds the exact binary value half to even; so does C's printf.
                return .double(Double(String(format: "%.\(min(precision, 340))f", x)) ?? x)
            }
            let scale = Foundation.pow(10.0, Double(-precision))
            return .double((x / scale).rounded(.toNearestOrEven) * scale)
        case "sort":
            let a = try call.bind(["reverse", "case_sensitive", "attribute"])
            let reverse = a[0]?.truthy ?? false
            let caseSensitive = a[1]?.truthy ?? false
            let items = try iterate(value)
            let keys = try items.map { item in lowered(try a[2].map { try attributePath(item, $0, interpreter) } ?? item, caseSensitive) }
            // Stable, also when reversed (as Python's sorted).
            var order = Array(items.indices)
            var failure: Error?
            order.sort { i, j in
                do {
                    if try less(keys[i], keys[j]) { return !reverse }
                    if try less(keys[j], keys[i]) { return reverse }
                } catch {
                    failure = error
                }
                return i < j
            }
            if let failure { throw failure }
            return .list(order.map { items[$0] })
        case "string":
            _ = try call.bind([])
            return .string(value.pyStr)
        case "sum":
            let a = try call.bind(["attribute", "start"])
            var total = a[1] ?? .int(0)
            for item in try iterate(value) {
                let v = try a[0].map { try attributePath(item, $0, interpreter) } ?? item
                do { total = try interpreter.binary(.add, total, v, line: 0) } catch let e as ChatTemplateError { throw JinjaCallError(message: e.message) }
            }
            return total
        case "title":
            _ = try call.bind([])
            // Jinja's own title: each run after "-", whitespace or an opening bracket starts upper case.
            var out = "", atStart = true
            for c in value.pyStr.unicodeScalars {
                let separator = c == "-" || c == "(" || c == "{" || c == "[" || c == "<" || PyString.isSpace(c)
                if separator { out.unicodeScalars.append(c) } else { out += atStart ? PyString.upper(String(c)) : PyString.lower(String(c)) }
                atStart = separator
            }
            return .string(out)
        case "tojson":
            let a = try call.bind(["ensure_ascii", "indent", "separators", "sort_keys"])
            var options = PyJSON.Options()
            options.ensureASCII = a[0]?.truthy ?? false
            switch a[1] {
            case nil, .none?: options.indent = nil
            case .string(let s)?: options.indent = s
            case let n?:
                guard let i = n.index else { throw JinjaCallError(message: "indent must be an int or a str") }
                options.indent = String(repeating: " ", count: max(i, 0))
            }
            switch a[2] {
            case nil, .none?: break
            case .tuple(let p)?, .list(let p)?:
                guard p.count == 2, case .string(let item) = p[0], case .string(let key) = p[1] else {
                    throw JinjaCallError(message: "separators must be a pair of strings")
                }
                options.separators = (item, key)
            case let other?: throw JinjaCallError(message: "separators must be a pair of strings, not \(other.typeName)")
            }
            options.sortKeys = a[3]?.truthy ?? false
            return .string(try PyJSON.dumps(value, options))
        case "trim":
            let a = try call.bind(["chars"])
            return .string(PyString.strip(value.pyStr, chars: try optionalString(a[0], "trim"), left: true, right: true))
        case "unique":
            let a = try call.bind(["case_sensitive", "attribute"])
            let caseSensitive = a[0]?.truthy ?? false
            var seen: [JinjaValue] = []
            var out: [JinjaValue] = []
            for item in try iterate(value) {
                let key = lowered(try a[1].map { try attributePath(item, $0, interpreter) } ?? item, caseSensitive)
                if !seen.contains(where: { JinjaValue.pyEqual($0, key) }) {
                    seen.append(key)
                    out.append(item)
                }
            }
            return .list(out)
        default:
            throw ChatTemplateError.unsupported("Jinja filter '\(name)'", line: 0)
        }
    }

    /// Jinja's `int` filter: int(value), else int(float(value)), else nil.
    static func pyInt(_ value: JinjaValue) -> Int? {
        switch value {
        case .int(let i): return i
        case .bool(let b): return b ? 1 : 0
        case .double(let d): return d.isFinite && abs(d) < 9.2e18 ? Int(d) : nil
        case .string(let s):
            let t = PyString.strip(s, chars: nil, left: true, right: true)
            let digits = t.unicodeScalars.drop { $0 == "+" || $0 == "-" }
            if t.unicodeScalars.count - digits.count <= 1, let first = digits.first, first != "_", digits.last != "_",
               !PyString.contains(t, "__"), let i = Int(t.replacingOccurrences(of: "_", with: "")) {
                return i
            }
            return pyFloat(value).flatMap { $0.isFinite && abs($0) < 9.2e18 ? Int($0) : nil }
        default: return nil
        }
    }

    /// Python's float(value), or nil where it raises.
    static func pyFloat(_ value: JinjaValue) -> Double? {
        switch value {
        case .int, .bool, .double: return value.number
        case .string(let s):
            let t = PyString.lower(PyString.strip(s, chars: nil, left: true, right: true))
            switch t {
            case "inf", "+inf", "infinity", "+infinity": return .infinity
            case "-inf", "-infinity": return -.infinity
            case "nan", "+nan", "-nan": return .nan
            default: break
            }
            guard !t.isEmpty, t.unicodeScalars.allSatisfy({ "0123456789+-.e_".unicodeScalars.contains($0) }),
                  !t.hasPrefix("_"), !t.hasSuffix("_"), !PyString.contains(t, "__") else { return nil }
            return Double(t.replacingOccurrences(of: "_", with: ""))
        default: return nil
        }
    }

    // MARK: Tests

    static func test(_ name: String, _ value: JinjaValue, _ call: JinjaCallArguments, _ interpreter: JinjaInterpreter) throws -> Bool {
        func one() throws -> JinjaValue {
            let a = try call.bind(["other"])
            guard let other = a[0] else { throw JinjaCallError(message: "the '\(name)' test needs an argument") }
            return other
        }
        func compare(_ op: JinjaCompareOperator) throws -> Bool {
            let other = try one()
            do { return try interpreter.compare(op, value, other, line: 0) } catch let e as ChatTemplateError { throw JinjaCallError(message: e.message) }
        }
        func integer(_ v: JinjaValue) throws -> Int {
            guard let i = v.index else { throw ChatTemplateError.unsupported("the '\(name)' test on a \(v.typeName)", line: 0) }
            return i
        }
        switch name {
        case "defined", "undefined", "none", "boolean", "false", "true", "integer", "float", "number", "string",
             "mapping", "sequence", "iterable", "callable", "odd", "even", "lower", "upper":
            _ = try call.bind([])
        default: break
        }
        switch name {
        case "defined": return !value.isUndefined
        case "undefined": return value.isUndefined
        case "none": if case .none = value { return true } else { return false }
        case "boolean": if case .bool = value { return true } else { return false }
        case "false": if case .bool(false) = value { return true } else { return false }
        case "true": if case .bool(true) = value { return true } else { return false }
        case "integer": if case .int = value { return true } else { return false }
        case "float": if case .double = value { return true } else { return false }
        case "number": return value.number != nil
        case "string": if case .string = value { return true } else { return false }
        case "mapping": if case .dict = value { return true } else { return false }
        case "sequence":
            switch value { case .string, .list, .tuple, .dict, .undefined: return true; default: return false }
        case "iterable":
            switch value { case .string, .list, .tuple, .dict, .undefined: return true; default: return false }
        case "callable":
            switch value { case .macro, .function, .undefined: return true; default: return false }
        case "sameas":
            // Python's `is`: the singletons and CPython's cached small ints compare by value.
            let other = try one()
            switch (value, other) {
            case (.none, .none): return true
            case (.bool(let x), .bool(let y)): return x == y
            case (.int(let x), .int(let y)): return x == y && (-5...256).contains(x)
            case (.namespace(let x), .namespace(let y)): return x === y
            default: return false
            }
        case "odd": return try integer(value) % 2 != 0
        case "even": return try integer(value) % 2 == 0
        case "divisibleby":
            let n = try integer(try one())
            guard n != 0 else { throw JinjaCallError(message: "integer division or modulo by zero") }
            return try integer(value) % n == 0
        case "lower": return PyString.isCase(value.pyStr, lower: true)
        case "upper": return PyString.isCase(value.pyStr, lower: false)
        case "in": return try compare(.isIn)
        case "eq", "equalto", "==": return try compare(.equal)
        case "ne", "!=": return try compare(.notEqual)
        case "lt", "lessthan", "<": return try compare(.less)
        case "le", "<=": return try compare(.lessEqual)
        case "gt", "greaterthan", ">": return try compare(.greater)
        case "ge", ">=": return try compare(.greaterEqual)
        default: throw ChatTemplateError.unsupported("Jinja test '\(name)'", line: 0)
        }
    }

    // MARK: strftime

    /// C's strftime in the C locale (what Python's datetime.strftime calls on Linux) for a naive
    /// local time, for the common conversions; glibc's "-" flag (no padding) is honoured.
    static func strftime(_ format: String, _ clock: JinjaClock) -> String {
        var calendar = Calendar(identifier: .gregorian)
        calendar.timeZone = clock.timeZone
        let c = calendar.dateComponents([.year, .month, .day, .hour, .minute, .second, .weekday], from: clock.now)
        let (year, month, day) = (c.year!, c.month!, c.day!)
        let (hour, minute, second) = (c.hour!, c.minute!, c.second!)
        let weekday = c.weekday! - 1  // 0 = Sunday
        let dayOfYear = calendar.ordinality(of: .day, in: .year, for: clock.now) ?? 1
        let days = ["Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"]
        let months = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December"]
        let hour12 = hour % 12 == 0 ? 12 : hour % 12

        var out = ""
        var it = format.unicodeScalars.makeIterator()
        while let ch = it.next() {
            guard ch == "%" else { out.unicodeScalars.append(ch); continue }
            guard var spec = it.next() else { out += "%"; break }
            var pad = true
            if spec == "-" {
                pad = false
                guard let s = it.next() else { out += "%-"; break }
                spec = s
            }
            func num(_ v: Int, _ width: Int, _ fill: Character = "0") -> String {
                let s = String(v)
                return pad && s.count < width ? String(repeating: fill, count: width - s.count) + s : s
            }
            switch spec {
            case "a": out += String(days[weekday].prefix(3))
            case "A": out += days[weekday]
            case "b", "h": out += String(months[month - 1].prefix(3))
            case "B": out += months[month - 1]
            case "d": out += num(day, 2)
            case "e": out += num(day, 2, " ")
            case "H": out += num(hour, 2)
            case "k": out += num(hour, 2, " ")
            case "I": out += num(hour12, 2)
            case "l": out += num(hour12, 2, " ")
            case "j": out += num(dayOfYear, 3)
            case "m": out += num(month, 2)
            case "M": out += num(minute, 2)
            case "S": out += num(second, 2)
            case "p": out += hour < 12 ? "AM" : "PM"
            case "y": out += num(year % 100, 2)
            case "Y": out += String(year)
            case "C": out += num(year / 100, 2)
            case "u": out += String(weekday == 0 ? 7 : weekday)
            case "w": out += String(weekday)
            case "F": out += "\(year)-\(num(month, 2))-\(num(day, 2))"
            case "D", "x": out += "\(num(month, 2))/\(num(day, 2))/\(num(year % 100, 2))"
            case "T", "X": out += "\(num(hour, 2)):\(num(minute, 2)):\(num(second, 2))"
            case "R": out += "\(num(hour, 2)):\(num(minute, 2))"
            case "c":
                out += "\(days[weekday].prefix(3)) \(months[month - 1].prefix(3)) \(num(day, 2, " ")) "
                    + "\(num(hour, 2)):\(num(minute, 2)):\(num(second, 2)) \(year)"
            case "Z", "z": break  // transformers' datetime.now() has no time zone: Python writes nothing
            case "n": out += "\n"
            case "t": out += "\t"
            case "%": out += "%"
            default:
                out += "%" + (pad ? "" : "-")
                out.unicodeScalars.append(spec)
            }
        }
        return out
    }
}

/// Python's json.dumps, as transformers' `tojson` filter calls it.
enum PyJSON {
    struct Options {
        var ensureASCII = false
        /// nil: all on one line; otherwise the text of one level of indentation.
        var indent: String?
        /// (item separator, key separator); Python's default depends on the indent.
        var separators: (String, String)?
        var sortKeys = false
    }

    static func dumps(_ value: JinjaValue, _ options: Options) throws -> String {
        var out = ""
        let separators = options.separators ?? (options.indent == nil ? (", ", ": ") : (",", ": "))
        try write(value, options, separators, level: 0, to: &out)
        return out
    }

    private static func write(_ value: JinjaValue, _ o: Options, _ sep: (String, String), level: Int, to out: inout String) throws {
        switch value {
        case .none: out += "null"
        case .bool(let b): out += b ? "true" : "false"
        case .int(let i): out += String(i)
        case .double(let d):
            if d.isNaN { out += "NaN" } else if d.isInfinite { out += d < 0 ? "-Infinity" : "Infinity" } else { out += PyFloat.repr(d) }
        case .string(let s): string(s, ensureASCII: o.ensureASCII, to: &out)
        case .list(let items), .tuple(let items):
            guard !items.isEmpty else { out += "[]"; return }
            out += "["
            for (i, item) in items.enumerated() {
                if i > 0 { out += sep.0 }
                newline(o, level + 1, &out)
                try write(item, o, sep, level: level + 1, to: &out)
            }
            newline(o, level, &out)
            out += "]"
        case .dict(let d):
            guard !d.isEmpty else { out += "{}"; return }
            var pairs = Array(d.pairs)
            if o.sortKeys { pairs.sort { PyString.less($0.0, $1.0) } }
            out += "{"
            for (i, (k, v)) in pairs.enumerated() {
                if i > 0 { out += sep.0 }
                newline(o, level + 1, &out)
                string(k, ensureASCII: o.ensureASCII, to: &out)
                out += sep.1
                try write(v, o, sep, level: level + 1, to: &out)
            }
            newline(o, level, &out)
            out += "}"
        case .undefined, .namespace, .macro, .function:
            throw JinjaCallError(message: "Object of type \(value.typeName) is not JSON serializable")
        }
    }

    private static func newline(_ o: Options, _ level: Int, _ out: inout String) {
        guard let indent = o.indent else { return }
        out += "\n" + String(repeating: indent, count: level)
    }

    private static func string(_ s: String, ensureASCII: Bool, to out: inout String) {
        out += "\""
        for c in s.unicodeScalars {
            switch c {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            case "\u{08}": out += "\\b"
            case "\u{0C}": out += "\\f"
            default:
                if c.value < 0x20 || (ensureASCII && c.value > 0x7E) {
                    if c.value > 0xFFFF {
                        let v = c.value - 0x10000
                        out += hex4(0xD800 + (v >> 10)) + hex4(0xDC00 + (v & 0x3FF))
                    } else {
                        out += hex4(c.value)
                    }
                } else {
                    out.unicodeScalars.append(c)
                }
            }
        }
        out += "\""
    }

    private static func hex4(_ v: UInt32) -> String {
        let h = String(v, radix: 16)
        return "\\u" + String(repeating: "0", count: 4 - h.count) + h
    }
}
