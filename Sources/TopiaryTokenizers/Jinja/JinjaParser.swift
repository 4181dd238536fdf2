/// Parses template tokens into a syntax tree, following Jinja2's grammar and operator precedence
/// (lowest first): `x if c else y`, `or`, `and`, `not`, comparisons and `in`, `+ -`, `~`,
/// `* / // %`, `**`, unary `- +`, then postfix `.attr`, `[i]`, `(args)`, `| filter`, `is test`.
/// Every filter, test, method and function a template names must be one Topiary implements: the
/// template is refused here, at load, rather than halfway through a render.
struct JinjaParser {
    private let tokens: [JinjaLexeme]
    private var index = 0
    private var loopDepth = 0
    private var macroNames: Set<String> = []
    /// Functions called by bare name, checked once all macros are known.
    private var calledFunctions: [(name: String, line: Int)] = []

    static func parse(_ source: String) throws -> [JinjaNode] {
        var parser = JinjaParser(tokens: try JinjaLexer.tokenize(source))
        let (nodes, end) = try parser.statements(until: [])
        precondition(end == nil)
        for call in parser.calledFunctions where !JinjaBuiltins.globalFunctions.contains(call.name) && !parser.macroNames.contains(call.name) {
            throw ChatTemplateError.unsupported("Jinja function '\(call.name)'", line: call.line)
        }
        return nodes
    }

    private init(tokens: [JinjaLexeme]) { self.tokens = tokens }

    // MARK: Token stream

    private var current: JinjaToken { tokens[index].token }
    private var line: Int { tokens[index].line }
    private func peek(_ offset: Int = 1) -> JinjaToken { tokens[min(index + offset, tokens.count - 1)].token }
    private mutating func advance() { if index < tokens.count - 1 { index += 1 } }

    private func isName(_ n: String, _ token: JinjaToken? = nil) -> Bool { (token ?? current) == .name(n) }
    private func isOp(_ o: String, _ token: JinjaToken? = nil) -> Bool { (token ?? current) == .op(o) }

    private func fail(_ message: String, line: Int? = nil) -> ChatTemplateError { .syntax(message, line: line ?? self.line) }

    private mutating func expect(_ token: JinjaToken) throws {
        guard current == token else { throw fail("expected \(token.description), got \(current.description)") }
        advance()
    }

    private mutating func expectName() throws -> String {
        guard case .name(let n) = current else { throw fail("expected a name, got \(current.description)") }
        advance()
        return n
    }

    private mutating func skipOp(_ o: String) -> Bool {
        if isOp(o) { advance(); return true }
        return false
    }

    private mutating func skipName(_ n: String) -> Bool {
        if isName(n) { advance(); return true }
        return false
    }

    // MARK: Statements

    /// Nodes up to a `{% name %}` tag with `name` in `ends` (returned, the tag's name consumed) or
    /// the end of the template (allowed only when `ends` is empty).
    private mutating func statements(until ends: Set<String>) throws -> ([JinjaNode], String?) {
        var nodes: [JinjaNode] = []
        while true {
            switch current {
            case .text(let t):
                nodes.append(.text(t))
                advance()
            case .variableBegin:
                advance()
                let e = try tuple(conditional: true)
                try expect(.variableEnd)
                nodes.append(.output(e))
            case .blockBegin:
                advance()
                if case .name(let n) = current, ends.contains(n) {
                    advance()
                    return (nodes, n)
                }
                nodes.append(contentsOf: try statement())
            case .end:
                if ends.isEmpty { return (nodes, nil) }
                throw fail("unexpected end of template; expected " + ends.sorted().map { "'\($0)'" }.joined(separator: " or "))
            default:
                throw fail("unexpected \(current.description)")
            }
        }
    }

    private mutating func statement() throws -> [JinjaNode] {
        let tagLine = line
        guard case .name(let tag) = current else { throw fail("expected a tag name, got \(current.description)") }
        advance()
        switch tag {
        case "if": return [try ifStatement()]
        case "for": return [try forStatement(line: tagLine)]
        case "set": return [try setStatement(line: tagLine)]
        case "macro": return [try macroStatement(line: tagLine)]
        case "break", "continue":
            guard loopDepth > 0 else { throw fail("'\(tag)' outside a loop", line: tagLine) }
            try expect(.blockEnd)
            return [tag == "break" ? .breakLoop : .continueLoop]
        case "generation":
            try expect(.blockEnd)
            let (body, _) = try statements(until: ["endgeneration"])
            try expect(.blockEnd)
            return [.scoped(body)]
        case "elif", "else", "endif", "endfor", "endset", "endmacro", "endgeneration":
            throw fail("unexpected '\(tag)'", line: tagLine)
        default:
            throw ChatTemplateError.unsupported("Jinja tag '\(tag)'", line: tagLine)
        }
    }

    private mutating func ifStatement() throws -> JinjaNode {
        var branches: [(condition: JinjaExpr, body: [JinjaNode])] = []
        var condition = try tuple(conditional: false)
        while true {
            try expect(.blockEnd)
            let (body, end) = try statements(until: ["elif", "else", "endif"])
            branches.append((condition, body))
            switch end {
            case "elif":
                condition = try tuple(conditional: false)
            case "else":
                try expect(.blockEnd)
                let (otherwise, _) = try statements(until: ["endif"])
                try expect(.blockEnd)
                return .conditional(branches, otherwise: otherwise)
            default:
                try expect(.blockEnd)
                return .conditional(branches, otherwise: [])
            }
        }
    }

    private mutating func forStatement(line: Int) throws -> JinjaNode {
        let target = try assignTarget(namespace: false, endNames: ["in"])
        guard skipName("in") else { throw fail("expected 'in', got \(current.description)") }
        let iterable = try tuple(conditional: false, endNames: ["recursive"])
        var condition: JinjaExpr?
        if skipName("if") { condition = try expression() }
        if isName("recursive") { throw ChatTemplateError.unsupported("recursive for loop", line: self.line) }
        try expect(.blockEnd)
        loopDepth += 1
        let (body, end) = try statements(until: ["endfor", "else"])
        loopDepth -= 1
        var otherwise: [JinjaNode] = []
        if end == "else" {
            try expect(.blockEnd)
            (otherwise, _) = try statements(until: ["endfor"])
        }
        try expect(.blockEnd)
        return .forLoop(JinjaForLoop(target: target, iterable: iterable, condition: condition, body: body, otherwise: otherwise, line: line))
    }

    private mutating func setStatement(line: Int) throws -> JinjaNode {
        let target = try assignTarget(namespace: true, endNames: [])
        if skipOp("=") {
            let value = try tuple(conditional: true)
            try expect(.blockEnd)
            return .assign(target, value, line: line)
        }
        var filters: [JinjaFilterCall] = []
        while isOp("|") {
            advance()
            filters.append(try filterCall())
        }
        try expect(.blockEnd)
        let (body, _) = try statements(until: ["endset"])
        try expect(.blockEnd)
        return .assignBlock(target, body: body, filters: filters, line: line)
    }

    private mutating func macroStatement(line: Int) throws -> JinjaNode {
        let name = try expectName()
        try expect(.op("("))
        var parameters: [(name: String, defaultValue: JinjaExpr?)] = []
        while !isOp(")") {
            if !parameters.isEmpty { try expect(.op(",")) }
            if isOp(")") { break }
            let p = try expectName()
            parameters.append((p, skipOp("=") ? try expression() : nil))
        }
        try expect(.op(")"))
        try expect(.blockEnd)
        let outerLoops = loopDepth
        loopDepth = 0
        let (body, _) = try statements(until: ["endmacro"])
        loopDepth = outerLoops
        try expect(.blockEnd)
        macroNames.insert(name)
        return .macro(JinjaMacroDefinition(name: name, parameters: parameters, body: body, line: line))
    }

    /// `name`, `ns.attr` (with `namespace`), or names separated by commas, optionally parenthesised.
    private mutating func assignTarget(namespace: Bool, endNames: Set<String>) throws -> JinjaTarget {
        if namespace, case .name(let n) = current, isOp(".", peek()) {
            advance(); advance()
            return .namespaceAttribute(n, try expectName())
        }
        var items: [JinjaTarget] = []
        var isTuple = false
        while true {
            if !items.isEmpty { try expect(.op(",")) }
            if case .name(let n) = current, endNames.contains(n) { break }
            if isOp("=") || current == .blockEnd { break }
            items.append(try singleTarget())
            if isOp(",") { isTuple = true } else { break }
        }
        guard !items.isEmpty else { throw fail("expected an assignment target, got \(current.description)") }
        return isTuple ? .tuple(items) : items[0]
    }

    private mutating func singleTarget() throws -> JinjaTarget {
        if skipOp("(") {
            var items: [JinjaTarget] = []
            while !isOp(")") {
                if !items.isEmpty { try expect(.op(",")) }
                if isOp(")") { break }
                items.append(try singleTarget())
            }
            try expect(.op(")"))
            return .tuple(items)
        }
        let n = try expectName()
        guard !["true", "false", "none", "True", "False", "None"].contains(n) else { throw fail("cannot assign to '\(n)'") }
        return .name(n)
    }

    // MARK: Expressions

    private func make(_ kind: JinjaExpr.Kind, _ line: Int) -> JinjaExpr { JinjaExpr(kind: kind, line: line) }

    /// Expressions separated by commas make a tuple (as in `{{ a, b }}` or `set a, b = 1, 2`).
    private mutating func tuple(conditional: Bool, endNames: Set<String> = [], parenthesized: Bool = false) throws -> JinjaExpr {
        let start = line
        var items: [JinjaExpr] = []
        var isTuple = false
        while true {
            if !items.isEmpty { try expect(.op(",")) }
            if current == .variableEnd || current == .blockEnd || isOp(")") { break }
            if case .name(let n) = current, endNames.contains(n) { break }
            items.append(try expression(conditional: conditional))
            if isOp(",") { isTuple = true } else { break }
        }
        if !isTuple {
            if let only = items.first { return only }
            if !parenthesized { throw fail("expected an expression, got \(current.description)") }
        }
        return make(.tuple(items), start)
    }

    private mutating func expression(conditional: Bool = true) throws -> JinjaExpr {
        conditional ? try conditionalExpression() : try orExpression()
    }

    private mutating func conditionalExpression() throws -> JinjaExpr {
        var e = try orExpression()
        while isName("if") {
            let l = line
            advance()
            let condition = try orExpression()
            let otherwise = skipName("else") ? try conditionalExpression() : nil
            e = make(.conditional(condition: condition, then: e, otherwise: otherwise), l)
        }
        return e
    }

    private mutating func orExpression() throws -> JinjaExpr {
        var e = try andExpression()
        while isName("or") {
            let l = line
            advance()
            e = make(.or(e, try andExpression()), l)
        }
        return e
    }

    private mutating func andExpression() throws -> JinjaExpr {
        var e = try notExpression()
        while isName("and") {
            let l = line
            advance()
            e = make(.and(e, try notExpression()), l)
        }
        return e
    }

    private mutating func notExpression() throws -> JinjaExpr {
        if isName("not") {
            let l = line
            advance()
            return make(.not(try notExpression()), l)
        }
        return try comparison()
    }

    private mutating func comparison() throws -> JinjaExpr {
        let l = line
        let first = try additive()
        var ops: [(JinjaCompareOperator, JinjaExpr)] = []
        while true {
            if case .op(let o) = current, let op = JinjaCompareOperator(rawValue: o), o != "in", o != "not in" {
                advance()
                ops.append((op, try additive()))
            } else if isName("in") {
                advance()
                ops.append((.isIn, try additive()))
            } else if isName("not"), isName("in", peek()) {
                advance(); advance()
                ops.append((.notIn, try additive()))
            } else {
                break
            }
        }
        return ops.isEmpty ? first : make(.compare(first, ops), l)
    }

    private mutating func additive() throws -> JinjaExpr {
        var e = try concatenation()
        while case .op(let o) = current, o == "+" || o == "-" {
            let l = line
            advance()
            e = make(.binary(o == "+" ? .add : .subtract, e, try concatenation()), l)
        }
        return e
    }

    private mutating func concatenation() throws -> JinjaExpr {
        var e = try multiplicative()
        while isOp("~") {
            let l = line
            advance()
            e = make(.binary(.concat, e, try multiplicative()), l)
        }
        return e
    }

    private mutating func multiplicative() throws -> JinjaExpr {
        var e = try power()
        while case .op(let o) = current, let op = JinjaBinaryOperator(rawValue: o), [.multiply, .divide, .floorDivide, .modulo].contains(op) {
            let l = line
            advance()
            e = make(.binary(op, e, try power()), l)
        }
        return e
    }

    /// Jinja2 makes `**` left-associative and binds unary minus tighter (`-2 ** 2` is 4).
    private mutating func power() throws -> JinjaExpr {
        var e = try unary()
        while isOp("**") {
            let l = line
            advance()
            e = make(.binary(.power, e, try unary()), l)
        }
        return e
    }

    private mutating func unary(filters: Bool = true) throws -> JinjaExpr {
        let l = line
        var e: JinjaExpr
        if skipOp("-") {
            e = make(.negate(try unary(filters: false)), l)
        } else if skipOp("+") {
            e = make(.plus(try unary(filters: false)), l)
        } else {
            e = try primary()
        }
        e = try postfix(e)
        if filters { e = try filterExpression(e) }
        return e
    }

    private mutating func primary() throws -> JinjaExpr {
        let l = line
        switch current {
        case .name(let n):
            advance()
            switch n {
            case "true", "True": return make(.literal(.bool(true)), l)
            case "false", "False": return make(.literal(.bool(false)), l)
            case "none", "None": return make(.literal(.none), l)
            default: return make(.name(n), l)
            }
        case .string(let s):
            // Adjacent string literals join, as in Python.
            var text = s
            advance()
            while case .string(let more) = current {
                text += more
                advance()
            }
            return make(.literal(.string(text)), l)
        case .integer(let i):
            advance()
            return make(.literal(.int(i)), l)
        case .float(let d):
            advance()
            return make(.literal(.double(d)), l)
        case .op("("):
            advance()
            let e = try tuple(conditional: true, parenthesized: true)
            try expect(.op(")"))
            return e
        case .op("["):
            advance()
            var items: [JinjaExpr] = []
            while !isOp("]") {
                if !items.isEmpty { try expect(.op(",")) }
                if isOp("]") { break }
                items.append(try expression())
            }
            try expect(.op("]"))
            return make(.list(items), l)
        case .op("{"):
            advance()
            var items: [(key: JinjaExpr, value: JinjaExpr)] = []
            while !isOp("}") {
                if !items.isEmpty { try expect(.op(",")) }
                if isOp("}") { break }
                let key = try expression()
                try expect(.op(":"))
                items.append((key, try expression()))
            }
            try expect(.op("}"))
            return make(.dict(items), l)
        default:
            throw fail("unexpected \(current.description)")
        }
    }

    private mutating func postfix(_ start: JinjaExpr) throws -> JinjaExpr {
        var e = start
        while true {
            let l = line
            if skipOp(".") {
                switch current {
                case .name(let n):
                    advance()
                    e = make(.attribute(e, n), l)
                case .integer(let i):
                    advance()
                    e = make(.item(e, make(.literal(.int(i)), l)), l)
                default:
                    throw fail("expected a name or number after '.', got \(current.description)")
                }
            } else if skipOp("[") {
                e = try subscription(e, line: l)
            } else if isOp("(") {
                e = try call(e)
            } else {
                return e
            }
        }
    }

    private mutating func subscription(_ target: JinjaExpr, line l: Int) throws -> JinjaExpr {
        var start: JinjaExpr?
        if !isOp(":") {
            start = try expression()
            if skipOp("]") { return make(.item(target, start!), l) }
            if isOp(",") { throw ChatTemplateError.unsupported("tuple subscript", line: l) }
        }
        try expect(.op(":"))
        var stop: JinjaExpr?, step: JinjaExpr?
        if !isOp(":") && !isOp("]") { stop = try expression() }
        if skipOp(":"), !isOp("]") { step = try expression() }
        try expect(.op("]"))
        return make(.slice(target, start: start, stop: stop, step: step), l)
    }

    private mutating func call(_ callee: JinjaExpr) throws -> JinjaExpr {
        let l = line
        switch callee.kind {
        case .name(let n):
            calledFunctions.append((n, l))
        case .attribute(_, let method):
            guard JinjaBuiltins.methods.contains(method) else {
                throw ChatTemplateError.unsupported("Jinja method '\(method)'", line: l)
            }
        default:
            break
        }
        return make(.call(callee, try arguments()), l)
    }

    private mutating func arguments() throws -> JinjaArguments {
        try expect(.op("("))
        var args = JinjaArguments()
        while !isOp(")") {
            if !(args.positional.isEmpty && args.keyword.isEmpty) {
                try expect(.op(","))
                if isOp(")") { break }
            }
            if isOp("*") || isOp("**") { throw ChatTemplateError.unsupported("*args/**kwargs in a call", line: line) }
            if case .name(let n) = current, isOp("=", peek()) {
                advance(); advance()
                args.keyword.append((n, try expression()))
            } else {
                guard args.keyword.isEmpty else { throw fail("positional argument after a keyword argument") }
                args.positional.append(try expression())
            }
        }
        try expect(.op(")"))
        return args
    }

    private mutating func filterExpression(_ start: JinjaExpr) throws -> JinjaExpr {
        var e = start
        while true {
            if isOp("|") {
                advance()
                let f = try filterCall()
                e = make(.filter(e, name: f.name, f.arguments), f.line)
            } else if isName("is") {
                e = try test(e)
            } else if isOp("(") {
                e = try call(e)
            } else {
                return e
            }
        }
    }

    private mutating func filterCall() throws -> JinjaFilterCall {
        let l = line
        let name = try expectName()
        if isOp(".") { throw ChatTemplateError.unsupported("dotted Jinja filter name '\(name).…'", line: l) }
        guard JinjaBuiltins.filters.contains(name) else { throw ChatTemplateError.unsupported("Jinja filter '\(name)'", line: l) }
        let args = isOp("(") ? try arguments() : JinjaArguments()
        return JinjaFilterCall(name: name, arguments: args, line: l)
    }

    private mutating func test(_ subject: JinjaExpr) throws -> JinjaExpr {
        let l = line
        advance()  // is
        let negated = skipName("not")
        let name = try expectName()
        if isOp(".") { throw ChatTemplateError.unsupported("dotted Jinja test name '\(name).…'", line: l) }
        guard JinjaBuiltins.tests.contains(name) else { throw ChatTemplateError.unsupported("Jinja test '\(name)'", line: l) }
        var args = JinjaArguments()
        if isOp("(") {
            args = try arguments()
        } else if !(isName("else") || isName("or") || isName("and")) {
            // One argument without parentheses: `x is divisibleby 3`, `x is sameas false`.
            var startsPrimary = false
            switch current {
            case .name, .string, .integer, .float: startsPrimary = true
            case .op(let o): startsPrimary = o == "(" || o == "[" || o == "{"
            default: break
            }
            if startsPrimary {
                if isName("is") { throw fail("tests cannot be chained with 'is'") }
                args.positional.append(try postfix(try primary()))
            }
        }
        let e = make(.test(subject, name: name, args), l)
        return negated ? make(.not(e), l) : e
    }
}
