import Foundation

/// One turn of a conversation, as a chat template reads it (`message['role']`, `message.content`).
public struct ChatMessage: Sendable, Equatable {
    public var role: String
    public var content: String

    public init(role: String, content: String) {
        self.role = role
        self.content = content
    }
}

/// A value handed to a chat template beside the messages (`enable_thinking`, `date_string`, ...).
public enum ChatTemplateArgument: Sendable, Equatable, ExpressibleByStringLiteral, ExpressibleByBooleanLiteral,
    ExpressibleByIntegerLiteral, ExpressibleByFloatLiteral, ExpressibleByNilLiteral
{
    case none
    case bool(Bool)
    case int(Int)
    case double(Double)
    case string(String)
    case array([ChatTemplateArgument])
    /// A dict, keys in the order given (`tojson` keeps it).
    case object([Member])

    public struct Member: Sendable, Equatable {
        public var key: String
        public var value: ChatTemplateArgument
        public init(_ key: String, _ value: ChatTemplateArgument) {
            self.key = key
            self.value = value
        }
    }

    public init(stringLiteral value: String) { self = .string(value) }
    public init(booleanLiteral value: Bool) { self = .bool(value) }
    public init(integerLiteral value: Int) { self = .int(value) }
    public init(floatLiteral value: Double) { self = .double(value) }
    public init(nilLiteral: ()) { self = .none }

    var jinjaValue: JinjaValue {
        switch self {
        case .none: return .none
        case .bool(let b): return .bool(b)
        case .int(let i): return .int(i)
        case .double(let d): return .double(d)
        case .string(let s): return .string(s)
        case .array(let a): return .list(a.map(\.jinjaValue))
        case .object(let members): return .dict(JinjaDict(members.map { ($0.key, $0.value.jinjaValue) }))
        }
    }
}

/// Why a chat template could not be loaded or rendered.
public enum ChatTemplateError: Error, CustomStringConvertible, Equatable {
    /// The template is not valid Jinja.
    case syntax(String, line: Int)
    /// The template uses a Jinja construct Topiary does not implement (named, e.g. "Jinja filter 'wordwrap'").
    case unsupported(String, line: Int)
    /// The template called `raise_exception(message)`: it refuses this conversation (say, a system
    /// turn for a model without one, or turns that do not alternate).
    case raised(String)
    /// Rendering failed as it would in Jinja2 (an undefined value used, a type error, ...).
    case render(String, line: Int)

    public var description: String {
        switch self {
        case .syntax(let m, let line): return "chat template syntax error at line \(line): \(m)"
        case .unsupported(let construct, let line): return "unsupported \(construct) at line \(line) of the chat template"
        case .raised(let m): return "the chat template refused the conversation: \(m)"
        case .render(let m, let line): return "chat template error at line \(line): \(m)"
        }
    }

    /// The message without its line.
    var message: String {
        switch self {
        case .syntax(let m, _), .render(let m, _), .raised(let m): return m
        case .unsupported(let construct, _): return "unsupported \(construct)"
        }
    }

    /// The same error placed at `line` when it came from code that did not know its line.
    func at(line: Int) -> ChatTemplateError {
        switch self {
        case .syntax(let m, 0): return .syntax(m, line: line)
        case .unsupported(let c, 0): return .unsupported(c, line: line)
        case .render(let m, 0): return .render(m, line: line)
        default: return self
        }
    }
}

/// A model's own chat template: the Jinja template a Hugging Face model carries
/// (tokenizer_config.json's `chat_template`, chat_template.jinja, or GGUF metadata
/// `tokenizer.chat_template`), rendered as transformers'
/// `tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=...)` renders it:
/// Jinja2 with `trim_blocks` and `lstrip_blocks`, `raise_exception`, `strftime_now`, and a `tojson`
/// that leaves non-ASCII text as it is.
///
/// The template is parsed once, at init, where a construct Topiary does not implement is refused;
/// `render` can then run any number of times (and from any thread).
public struct ChatTemplate: Sendable {
    public let source: String
    private let nodes: [JinjaNode]

    public init(source: String) throws {
        self.source = source
        self.nodes = try JinjaParser.parse(source)
    }

    /// The prompt text for `messages`. `bosToken`/`eosToken` are the tokenizer's special tokens
    /// (nil leaves `bos_token`/`eos_token` undefined, as transformers does for a tokenizer without
    /// one); `extra` adds template variables (`date_string`, ...). `now` and `timeZone` set what
    /// `strftime_now` reads (the local clock by default, as in transformers).
    public func render(messages: [ChatMessage], addGenerationPrompt: Bool, bosToken: String?, eosToken: String?,
                       extra: [String: String] = [:], now: Date = Date(), timeZone: TimeZone = .current) throws -> String {
        try render(messages: messages, addGenerationPrompt: addGenerationPrompt, bosToken: bosToken, eosToken: eosToken,
                   variables: extra.mapValues(ChatTemplateArgument.string), now: now, timeZone: timeZone)
    }

    /// As above, with variables of any JSON-like type (`enable_thinking: false` for Qwen3, `tools`
    /// for a request that offers tools). A variable replaces the one of the same name set from the
    /// other arguments (`messages` with tool calls, say).
    public func render(messages: [ChatMessage], addGenerationPrompt: Bool, bosToken: String?, eosToken: String?,
                       variables: [String: ChatTemplateArgument], now: Date = Date(), timeZone: TimeZone = .current) throws -> String {
        let clock = JinjaClock(now: now, timeZone: timeZone)
        let scope = JinjaScope(parent: nil)
        for (name, value) in JinjaBuiltins.globals(clock: clock) { scope.set(name, value) }
        scope.set("messages", .list(messages.map { .dict(JinjaDict([("role", .string($0.role)), ("content", .string($0.content))])) }))
        // transformers passes these two always, as None when the caller has none.
        scope.set("tools", .none)
        scope.set("documents", .none)
        scope.set("add_generation_prompt", .bool(addGenerationPrompt))
        if let bosToken { scope.set("bos_token", .string(bosToken)) }
        if let eosToken { scope.set("eos_token", .string(eosToken)) }
        for (name, value) in variables { scope.set(name, value.jinjaValue) }
        return try JinjaInterpreter().render(nodes, scope: scope)
    }
}

/// The chat fields of a Hugging Face tokenizer_config.json: the template and the special tokens
/// it prints. (A model may instead carry its template in chat_template.jinja beside it, or a
/// GGUF file in its `tokenizer.chat_template` metadata.)
public struct TokenizerChatConfig: Sendable, Equatable {
    /// `chat_template`, nil when the config has none.
    public var chatTemplate: String?
    /// `bos_token` / `eos_token`: nil when absent or null.
    public var bosToken: String?
    public var eosToken: String?

    public init(chatTemplate: String?, bosToken: String?, eosToken: String?) {
        self.chatTemplate = chatTemplate
        self.bosToken = bosToken
        self.eosToken = eosToken
    }

    /// Reads the fields. `chat_template` is a string, or a list of `{"name", "template"}` of which
    /// the one named `templateName` is taken (transformers takes "default" for a chat without
    /// tools); a special token is a string or an `{"content": ...}` object.
    public static func read(json: Data, source: String = "tokenizer_config.json", templateName: String = "default") throws -> TokenizerChatConfig {
        let root = try JSONNode.parse(json, source: source)
        try root.requireObject()
        var template: String?
        if let t = root.optional("chat_template") {
            if t.isString {
                template = try t.string()
            } else {
                var names: [String] = []
                for entry in try t.array() {
                    let name = try entry.child("name").string()
                    if name == templateName { template = try entry.child("template").string() }
                    names.append(name)
                }
                if template == nil {
                    throw TokenizerError.unsupported(path: source, field: "chat_template", found: "without a template named '\(templateName)'", supported: names)
                }
            }
        }
        func token(_ key: String) throws -> String? {
            guard let t = root.optional(key) else { return nil }
            return t.isString ? try t.string() : try t.child("content").string()
        }
        return TokenizerChatConfig(chatTemplate: template, bosToken: try token("bos_token"), eosToken: try token("eos_token"))
    }
}
