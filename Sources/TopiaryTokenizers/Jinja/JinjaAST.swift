/// The syntax tree of a parsed chat template. Immutable (and Sendable), so a ChatTemplate parses
/// once and renders many times.

enum JinjaLiteral: Sendable {
    case none
    case bool(Bool)
    case int(Int)
    case double(Double)
    case string(String)
}

struct JinjaExpr: Sendable {
    let kind: Kind
    let line: Int

    indirect enum Kind: Sendable {
        case literal(JinjaLiteral)
        case name(String)
        case list([JinjaExpr])
        case tuple([JinjaExpr])
        case dict([(key: JinjaExpr, value: JinjaExpr)])
        /// `x.name`: Python attribute first (`text.split`), then item (`message.role`).
        case attribute(JinjaExpr, String)
        /// `x[i]`: item first, then attribute.
        case item(JinjaExpr, JinjaExpr)
        /// `x[start:stop:step]`.
        case slice(JinjaExpr, start: JinjaExpr?, stop: JinjaExpr?, step: JinjaExpr?)
        case call(JinjaExpr, JinjaArguments)
        /// `x | name(args)`.
        case filter(JinjaExpr, name: String, JinjaArguments)
        /// `x is name(args)` (`is not` wraps it in `.not`).
        case test(JinjaExpr, name: String, JinjaArguments)
        case not(JinjaExpr)
        case negate(JinjaExpr)
        case plus(JinjaExpr)
        case binary(JinjaBinaryOperator, JinjaExpr, JinjaExpr)
        case and(JinjaExpr, JinjaExpr)
        case or(JinjaExpr, JinjaExpr)
        /// `a < b <= c`: Python's chained comparison.
        case compare(JinjaExpr, [(JinjaCompareOperator, JinjaExpr)])
        /// `a if condition else b`; with no else, Undefined when the condition is false.
        case conditional(condition: JinjaExpr, then: JinjaExpr, otherwise: JinjaExpr?)
    }
}

struct JinjaArguments: Sendable {
    var positional: [JinjaExpr] = []
    var keyword: [(name: String, value: JinjaExpr)] = []
}

enum JinjaBinaryOperator: String, Sendable {
    case add = "+", subtract = "-", multiply = "*", divide = "/", floorDivide = "//", modulo = "%", power = "**"
    case concat = "~"
}

enum JinjaCompareOperator: String, Sendable {
    case equal = "==", notEqual = "!=", less = "<", lessEqual = "<=", greater = ">", greaterEqual = ">="
    case isIn = "in", notIn = "not in"
}

/// What `set` and `for` assign to.
indirect enum JinjaTarget: Sendable {
    case name(String)
    /// `ns.attr` (namespace attributes only).
    case namespaceAttribute(String, String)
    case tuple([JinjaTarget])
}

struct JinjaFilterCall: Sendable {
    let name: String
    let arguments: JinjaArguments
    let line: Int
}

struct JinjaForLoop: Sendable {
    let target: JinjaTarget
    let iterable: JinjaExpr
    let condition: JinjaExpr?
    let body: [JinjaNode]
    let otherwise: [JinjaNode]
    let line: Int
}

struct JinjaMacroDefinition: Sendable {
    let name: String
    let parameters: [(name: String, defaultValue: JinjaExpr?)]
    let body: [JinjaNode]
    let line: Int
}

indirect enum JinjaNode: Sendable {
    case text(String)
    case output(JinjaExpr)
    /// `if`/`elif` branches in order, then the `else` body.
    case conditional([(condition: JinjaExpr, body: [JinjaNode])], otherwise: [JinjaNode])
    case forLoop(JinjaForLoop)
    case assign(JinjaTarget, JinjaExpr, line: Int)
    /// `{% set x %}...{% endset %}`, optionally through filters.
    case assignBlock(JinjaTarget, body: [JinjaNode], filters: [JinjaFilterCall], line: Int)
    case macro(JinjaMacroDefinition)
    /// A body rendered in a scope of its own (`{% generation %}`, transformers' assistant-mask tag).
    case scoped([JinjaNode])
    case breakLoop
    case continueLoop
}
