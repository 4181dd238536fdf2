import Foundation

/// Renders a parsed template. One interpreter per render; values live only for that render.
final class JinjaInterpreter {
    private var output = ""
    private var macroDepth = 0

    /// Rendering stops past these, so that a template cannot run away with time or memory.
    static let maximumMacroDepth = 200
    static let maximumOutput = 64 << 20

    func render(_ nodes: [JinjaNode], scope: JinjaScope) throws -> String {
        output = ""
        _ = try execute(nodes, scope)
        return output
    }

    // MARK: Statements

    private enum Flow { case normal, breakLoop, continueLoop }

    private func execute(_ nodes: [JinjaNode], _ scope: JinjaScope) throws -> Flow {
        for node in nodes {
            switch node {
            case .text(let t):
                output += t
            case .output(let e):
                output += try evaluate(e, scope).pyStr
                if output.utf8.count > JinjaInterpreter.maximumOutput {
                    throw ChatTemplateError.render("output exceeds \(JinjaInterpreter.maximumOutput) bytes", line: e.line)
                }
            case .conditional(let branches, let otherwise):
                var body = otherwise
                for branch in branches where try evaluate(branch.condition, scope).truthy {
                    body = branch.body
                    break
                }
                let flow = try execute(body, scope)
                if flow != .normal { return flow }
            case .forLoop(let loop):
                try execute(loop, scope)
            case .assign(let target, let e, let line):
                try assign(target, try evaluate(e, scope), scope, line: line)
            case .assignBlock(let target, let body, let filters, let line):
                var value = JinjaValue.string(try capture { _ = try execute(body, scope) })
                for f in filters { value = try applyFilter(f.name, value, f.arguments, scope, line: f.line) }
                try assign(target, value, scope, line: line)
            case .macro(let definition):
                scope.set(definition.name, .macro(JinjaMacro(definition, closure: scope)))
            case .scoped(let body):
                let flow = try execute(body, JinjaScope(parent: scope))
                if flow != .normal { return flow }
            case .breakLoop:
                return .breakLoop
            case .continueLoop:
                return .continueLoop
            }
        }
        return .normal
    }

    /// Runs `body` with its output collected apart and returned.
    private func capture(_ body: () throws -> Void) throws -> String {
        let saved = output
        output = ""
        defer { output = saved }
        try body()
        return output
    }

    private func execute(_ loop: JinjaForLoop, _ scope: JinjaScope) throws {
        var items = try iterate(try evaluate(loop.iterable, scope), line: loop.iterable.line)
        if let condition = loop.condition {
            items = try items.filter { item in
                let s = JinjaScope(parent: scope)
                try assign(loop.target, item, s, line: loop.line)
                return try evaluate(condition, s).truthy
            }
        }
        if items.isEmpty {
            _ = try execute(loop.otherwise, JinjaScope(parent: scope))
            return
        }
        let n = items.count
        for (i, item) in items.enumerated() {
            // Each iteration has its own scope: a `set` in the body does not outlive it (Jinja2's rule;
            // namespaces carry values out).
            let s = JinjaScope(parent: scope)
            try assign(loop.target, item, s, line: loop.line)
            var info = JinjaDict()
            info["index0"] = .int(i)
            info["index"] = .int(i + 1)
            info["revindex0"] = .int(n - i - 1)
            info["revindex"] = .int(n - i)
            info["first"] = .bool(i == 0)
            info["last"] = .bool(i == n - 1)
            info["length"] = .int(n)
            info["depth0"] = .int(0)
            info["depth"] = .int(1)
            info["previtem"] = i > 0 ? items[i - 1] : .undefined(message: "there is no previous item")
            info["nextitem"] = i < n - 1 ? items[i + 1] : .undefined(message: "there is no next item")
            info["cycle"] = .function(JinjaFunction("cycle") { args, _ in
                guard !args.isEmpty else { throw ChatTemplateError.render("loop.cycle() needs at least one value", line: loop.line) }
                return args[i % args.count]
            })
            s.set("loop", .dict(info))
            if try execute(loop.body, s) == .breakLoop { break }
        }
    }

    private func assign(_ target: JinjaTarget, _ value: JinjaValue, _ scope: JinjaScope, line: Int) throws {
        switch target {
        case .name(let n):
            scope.set(n, value)
        case .namespaceAttribute(let n, let attribute):
            guard case .namespace(let ns) = scope.lookup(n) ?? .undefinedName(n) else {
                throw ChatTemplateError.render("cannot assign attribute '\(attribute)' on '\(n)', which is not a namespace", line: line)
            }
            ns.attributes[attribute] = value
        case .tuple(let targets):
            let items = try iterate(value, line: line)
            guard items.count == targets.count else {
                throw ChatTemplateError.render("cannot unpack \(items.count) values into \(targets.count) names", line: line)
            }
            for (t, v) in zip(targets, items) { try assign(t, v, scope, line: line) }
        }
    }

    /// Python's iteration: list and tuple items, dict keys, string code points; Undefined is empty.
    func iterate(_ value: JinjaValue, line: Int) throws -> [JinjaValue] {
        switch value {
        case .undefined: return []
        case .list(let a), .tuple(let a): return a
        case .dict(let d): return d.keys.map(JinjaValue.string)
        case .string(let s): return s.unicodeScalars.map { .string(String($0)) }
        default: throw ChatTemplateError.render("'\(value.typeName)' object is not iterable", line: line)
        }
    }

    // MARK: Expressions

    func evaluate(_ e: JinjaExpr, _ scope: JinjaScope) throws -> JinjaValue {
        switch e.kind {
        case .literal(let l):
            switch l {
            case .none: return .none
            case .bool(let b): return .bool(b)
            case .int(let i): return .int(i)
            case .double(let d): return .double(d)
            case .string(let s): return .string(s)
            }
        case .name(let n):
            return scope.lookup(n) ?? .undefinedName(n)
        case .list(let items):
            return .list(try items.map { try evaluate($0, scope) })
        case .tuple(let items):
            return .tuple(try items.map { try evaluate($0, scope) })
        case .dict(let items):
            var d = JinjaDict()
            for (k, v) in items {
                guard case .string(let key) = try evaluate(k, scope) else {
                    throw ChatTemplateError.unsupported("dict literal key that is not a string", line: k.line)
                }
                d[key] = try evaluate(v, scope)
            }
            return .dict(d)
        case .attribute(let base, let name):
            let object = try evaluate(base, scope)
            if case .undefined(let message) = object { throw ChatTemplateError.render(message, line: e.line) }
            return attribute(object, name) ?? item(object, .string(name)) ?? noAttribute(object, name)
        case .item(let base, let key):
            let object = try evaluate(base, scope)
            if case .undefined(let message) = object { throw ChatTemplateError.render(message, line: e.line) }
            let k = try evaluate(key, scope)
            if let v = item(object, k) { return v }
            if case .string(let name) = k, let v = attribute(object, name) { return v }
            if case .string(let name) = k { return noAttribute(object, name) }
            return .undefined(message: "\(object.typeName) object has no element \(k.pyRepr)")
        case .slice(let base, let start, let stop, let step):
            let object = try evaluate(base, scope)
            if case .undefined(let message) = object { throw ChatTemplateError.render(message, line: e.line) }
            // Where Python's slicing raises TypeError (not a sequence, bounds not integers), Jinja2 gives Undefined.
            var bounds: [Int?] = []
            for x in [start, stop, step] {
                guard let x else { bounds.append(nil); continue }
                let v = try evaluate(x, scope)
                if case .none = v { bounds.append(nil); continue }
                guard let i = v.index else { return .undefined(message: "\(object.typeName) object has no element \(v.pyRepr)") }
                bounds.append(i)
            }
            switch object {
            case .list, .tuple, .string: return try JinjaInterpreter.slice(object, bounds[0], bounds[1], bounds[2], line: e.line)
            default: return .undefined(message: "\(object.typeName) object has no element slice")
            }
        case .call(let callee, let arguments):
            let function = try evaluate(callee, scope)
            let (args, kwargs) = try evaluate(arguments, scope)
            return try call(function, args, kwargs, line: e.line)
        case .filter(let subject, let name, let arguments):
            return try applyFilter(name, try evaluate(subject, scope), arguments, scope, line: e.line)
        case .test(let subject, let name, let arguments):
            let value = try evaluate(subject, scope)
            let (args, kwargs) = try evaluate(arguments, scope)
            return .bool(try placed(e.line) { try JinjaBuiltins.test(name, value, JinjaCallArguments(args, kwargs, name: name), self) })
        case .not(let x):
            return .bool(!(try evaluate(x, scope).truthy))
        case .negate(let x):
            let v = try evaluate(x, scope)
            switch v {
            case .int(let i): return .int(-i)
            case .bool(let b): return .int(b ? -1 : 0)
            case .double(let d): return .double(-d)
            default: throw typeError("bad operand type for unary -: '\(v.typeName)'", v, line: e.line)
            }
        case .plus(let x):
            let v = try evaluate(x, scope)
            switch v {
            case .int, .double: return v
            case .bool(let b): return .int(b ? 1 : 0)
            default: throw typeError("bad operand type for unary +: '\(v.typeName)'", v, line: e.line)
            }
        case .binary(let op, let l, let r):
            return try binary(op, try evaluate(l, scope), try evaluate(r, scope), line: e.line)
        case .and(let l, let r):
            let a = try evaluate(l, scope)
            return a.truthy ? try evaluate(r, scope) : a
        case .or(let l, let r):
            let a = try evaluate(l, scope)
            return a.truthy ? a : try evaluate(r, scope)
        case .compare(let first, let ops):
            var left = try evaluate(first, scope)
            for (op, rightExpr) in ops {
                let right = try evaluate(rightExpr, scope)
                guard try compare(op, left, right, line: e.line) else { return .bool(false) }
                left = right
            }
            return .bool(true)
        case .conditional(let condition, let then, let otherwise):
            if try evaluate(condition, scope).truthy { return try evaluate(then, scope) }
            if let otherwise { return try evaluate(otherwise, scope) }
            return .undefined(message: "the inline if-expression evaluated to false and has no else section")
        }
    }

    func evaluate(_ arguments: JinjaArguments, _ scope: JinjaScope) throws -> ([JinjaValue], [(String, JinjaValue)]) {
        (try arguments.positional.map { try evaluate($0, scope) },
         try arguments.keyword.map { ($0.name, try evaluate($0.value, scope)) })
    }

    /// A Python attribute of `object` (methods of str, dict and list; namespace attributes), or nil.
    func attribute(_ object: JinjaValue, _ name: String) -> JinjaValue? {
        switch object {
        case .namespace(let ns):
            return ns.attributes[name]
        case .string, .dict, .list:
            guard let method = JinjaBuiltins.boundMethod(object, name, self) else { return nil }
            return .function(method)
        default:
            return nil
        }
    }

    /// `object[key]` as Python's subscript, or nil where Python raises (missing key, index out of range).
    func item(_ object: JinjaValue, _ key: JinjaValue) -> JinjaValue? {
        switch (object, key) {
        case (.dict(let d), .string(let k)):
            return d[k]
        case (.list(let a), _), (.tuple(let a), _):
            guard var i = key.index else { return nil }
            if i < 0 { i += a.count }
            return a.indices.contains(i) ? a[i] : nil
        case (.string(let s), _):
            guard var i = key.index else { return nil }
            let scalars = PyString.scalars(s)
            if i < 0 { i += scalars.count }
            return scalars.indices.contains(i) ? .string(String(scalars[i])) : nil
        default:
            return nil
        }
    }

    private func noAttribute(_ object: JinjaValue, _ name: String) -> JinjaValue {
        .undefined(message: "'\(object.typeName) object' has no attribute '\(name)'")
    }

    /// Python's slice of a list, tuple or string.
    static func slice(_ object: JinjaValue, _ start: Int?, _ stop: Int?, _ step: Int?, line: Int) throws -> JinjaValue {
        let step = step ?? 1
        guard step != 0 else { throw ChatTemplateError.render("slice step cannot be zero", line: line) }
        func indices(_ count: Int) -> [Int] {
            func clamp(_ v: Int?, _ fallback: Int) -> Int {
                guard var v else { return fallback }
                if v < 0 { v += count }
                return step > 0 ? min(max(v, 0), count) : min(max(v, -1), count - 1)
            }
            let lo = clamp(start, step > 0 ? 0 : count - 1)
            let hi = clamp(stop, step > 0 ? count : -1)
            return Array(stride(from: lo, to: hi, by: step))
        }
        switch object {
        case .list(let a): return .list(indices(a.count).map { a[$0] })
        case .tuple(let a): return .tuple(indices(a.count).map { a[$0] })
        case .string(let s):
            let scalars = PyString.scalars(s)
            return .string(PyString.string(indices(scalars.count).map { scalars[$0] }))
        default:
            throw ChatTemplateError.render("'\(object.typeName)' object is not subscriptable", line: line)
        }
    }

    func call(_ function: JinjaValue, _ args: [JinjaValue], _ kwargs: [(String, JinjaValue)], line: Int) throws -> JinjaValue {
        switch function {
        case .function(let f):
            return try placed(line) { try f.body(args, kwargs) }
        case .macro(let m):
            return try callMacro(m, args, kwargs, line: line)
        case .undefined(let message):
            throw ChatTemplateError.render(message, line: line)
        default:
            throw ChatTemplateError.render("'\(function.typeName)' object is not callable", line: line)
        }
    }

    private func callMacro(_ macro: JinjaMacro, _ args: [JinjaValue], _ kwargs: [(String, JinjaValue)], line: Int) throws -> JinjaValue {
        let d = macro.definition
        guard args.count <= d.parameters.count else {
            throw ChatTemplateError.render("macro '\(d.name)' takes not more than \(d.parameters.count) argument(s)", line: line)
        }
        guard macroDepth < JinjaInterpreter.maximumMacroDepth else {
            throw ChatTemplateError.render("macro calls nested deeper than \(JinjaInterpreter.maximumMacroDepth)", line: line)
        }
        let scope = JinjaScope(parent: macro.closure)
        var given = Set<String>()
        for (p, v) in zip(d.parameters, args) {
            scope.set(p.name, v)
            given.insert(p.name)
        }
        for (k, v) in kwargs {
            guard d.parameters.contains(where: { $0.name == k }) else {
                throw ChatTemplateError.render("macro '\(d.name)' takes no keyword argument '\(k)'", line: line)
            }
            guard !given.contains(k) else { throw ChatTemplateError.render("macro '\(d.name)' got multiple values for argument '\(k)'", line: line) }
            scope.set(k, v)
            given.insert(k)
        }
        for p in d.parameters where !given.contains(p.name) {
            scope.set(p.name, try p.defaultValue.map { try evaluate($0, scope) } ?? .undefined(message: "parameter '\(p.name)' was not provided"))
        }
        macroDepth += 1
        defer { macroDepth -= 1 }
        return .string(try capture { _ = try execute(d.body, scope) })
    }

    private func applyFilter(_ name: String, _ value: JinjaValue, _ arguments: JinjaArguments, _ scope: JinjaScope, line: Int) throws -> JinjaValue {
        let (args, kwargs) = try evaluate(arguments, scope)
        return try placed(line) { try JinjaBuiltins.filter(name, value, JinjaCallArguments(args, kwargs, name: name), self) }
    }

    /// Runs a built-in, giving its failures the line of the template expression that called it.
    private func placed<T>(_ line: Int, _ body: () throws -> T) throws -> T {
        do {
            return try body()
        } catch let error as JinjaCallError {
            throw ChatTemplateError.render(error.message, line: line)
        } catch let error as ChatTemplateError {
            throw error.at(line: line)
        }
    }

    // MARK: Operators

    func typeError(_ message: String, _ operands: JinjaValue..., line: Int) -> ChatTemplateError {
        for case .undefined(let m) in operands { return .render(m, line: line) }
        return .render(message, line: line)
    }

    func binary(_ op: JinjaBinaryOperator, _ a: JinjaValue, _ b: JinjaValue, line: Int) throws -> JinjaValue {
        if op == .concat { return .string(a.pyStr + b.pyStr) }
        let unsupported = typeError("unsupported operand type(s) for \(op.rawValue): '\(a.typeName)' and '\(b.typeName)'", a, b, line: line)
        func checked(_ r: (partialValue: Int, overflow: Bool)) throws -> JinjaValue {
            guard !r.overflow else { throw ChatTemplateError.unsupported("integer arithmetic beyond 64 bits", line: line) }
            return .int(r.partialValue)
        }
        func limit(_ n: Int) throws -> Int {
            guard n <= JinjaInterpreter.maximumOutput else { throw ChatTemplateError.render("repetition too large", line: line) }
            return max(n, 0)
        }
        switch op {
        case .add:
            switch (a, b) {
            case (.string(let x), .string(let y)): return .string(x + y)
            case (.list(let x), .list(let y)): return .list(x + y)
            case (.tuple(let x), .tuple(let y)): return .tuple(x + y)
            default: break
            }
            if let x = a.index, let y = b.index { return try checked(x.addingReportingOverflow(y)) }
            if let x = a.number, let y = b.number { return .double(x + y) }
            if case .string = a { throw typeError("can only concatenate str (not \"\(b.typeName)\") to str", a, b, line: line) }
            throw unsupported
        case .subtract:
            if let x = a.index, let y = b.index { return try checked(x.subtractingReportingOverflow(y)) }
            if let x = a.number, let y = b.number { return .double(x - y) }
            throw unsupported
        case .multiply:
            switch (a, b) {
            case (.string(let s), _) where b.index != nil: return .string(String(repeating: s, count: try limit(b.index!)))
            case (_, .string(let s)) where a.index != nil: return .string(String(repeating: s, count: try limit(a.index!)))
            case (.list(let x), _) where b.index != nil:
                let n = try limit(b.index!)
                _ = try limit(n * x.count)
                return .list(Array(repeatElement(x, count: n).joined()))
            default: break
            }
            if let x = a.index, let y = b.index { return try checked(x.multipliedReportingOverflow(by: y)) }
            if let x = a.number, let y = b.number { return .double(x * y) }
            throw unsupported
        case .divide:
            guard let x = a.number, let y = b.number else { throw unsupported }
            guard y != 0 else { throw ChatTemplateError.render("division by zero", line: line) }
            return .double(x / y)
        case .floorDivide:
            if let x = a.index, let y = b.index {
                guard y != 0 else { throw ChatTemplateError.render("integer division or modulo by zero", line: line) }
                let q = x / y
                return .int((x % y != 0 && (x < 0) != (y < 0)) ? q - 1 : q)
            }
            guard let x = a.number, let y = b.number else { throw unsupported }
            guard y != 0 else { throw ChatTemplateError.render("float floor division by zero", line: line) }
            return .double((x / y).rounded(.down))
        case .modulo:
            if case .string = a { throw ChatTemplateError.unsupported("'%' string formatting", line: line) }
            if let x = a.index, let y = b.index {
                guard y != 0 else { throw ChatTemplateError.render("integer division or modulo by zero", line: line) }
                let r = x % y
                return .int(r != 0 && (r < 0) != (y < 0) ? r + y : r)
            }
            guard let x = a.number, let y = b.number else { throw unsupported }
            guard y != 0 else { throw ChatTemplateError.render("float modulo", line: line) }
            var r = x.truncatingRemainder(dividingBy: y)
            if r != 0 && (r < 0) != (y < 0) { r += y }
            return .double(r)
        case .power:
            if let x = a.index, let y = b.index, y >= 0 {
                var result = 1, base = x, e = y
                while e > 0 {
                    if e & 1 == 1 { result = try checked(result.multipliedReportingOverflow(by: base)).index! }
                    e >>= 1
                    if e > 0 { base = try checked(base.multipliedReportingOverflow(by: base)).index! }
                }
                return .int(result)
            }
            guard let x = a.number, let y = b.number else { throw unsupported }
            return .double(Foundation.pow(x, y))
        case .concat:
            return .string(a.pyStr + b.pyStr)
        }
    }

    func compare(_ op: JinjaCompareOperator, _ a: JinjaValue, _ b: JinjaValue, line: Int) throws -> Bool {
        switch op {
        case .equal: return JinjaValue.pyEqual(a, b)
        case .notEqual: return !JinjaValue.pyEqual(a, b)
        case .isIn: return try contains(b, a, line: line)
        case .notIn: return !(try contains(b, a, line: line))
        case .less, .lessEqual, .greater, .greaterEqual:
            let (x, y) = (op == .less || op == .lessEqual) ? (a, b) : (b, a)
            guard let less = JinjaValue.pyLess(x, y) else {
                throw typeError("'\(op.rawValue)' not supported between instances of '\(a.typeName)' and '\(b.typeName)'", a, b, line: line)
            }
            return (op == .less || op == .greater) ? less : (less || JinjaValue.pyEqual(x, y))
        }
    }

    /// Python's `needle in container`.
    func contains(_ container: JinjaValue, _ needle: JinjaValue, line: Int) throws -> Bool {
        switch container {
        case .string(let s):
            guard case .string(let n) = needle else {
                throw typeError("'in <string>' requires string as left operand, not \(needle.typeName)", needle, line: line)
            }
            return PyString.contains(s, n)
        case .list(let a), .tuple(let a): return a.contains { JinjaValue.pyEqual($0, needle) }
        case .dict(let d):
            guard case .string(let k) = needle else { return false }
            return d[k] != nil
        case .undefined: return false
        default: throw ChatTemplateError.render("argument of type '\(container.typeName)' is not iterable", line: line)
        }
    }
}

/// A failure inside a built-in function or method, given its line by the call that made it.
struct JinjaCallError: Error {
    let message: String
}
