import Foundation
import XCTest
import TopiaryTestSupport
@testable import TopiaryTokenizers

/// The chat template renderer against real Jinja2: ChatTemplates/expected.json holds what Jinja2,
/// set up as transformers sets it up for `apply_chat_template`, renders from the real chat
/// templates of the model families Topiary supports (and from small templates exercising one
/// construct each); ChatTemplates/make_expected.py writes it.
final class ChatTemplateTests: XCTestCase {
    static let folder = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("ChatTemplates")

    struct Expected: Decodable {
        let now: String
        let conversations: [String: [Message]]
        /// Messages with more than role and content (tool calls and results), handed to the
        /// template as the `messages` variable.
        let tool_conversations: [String: Argument]
        let cases: [Case]
        let features: [Case]
    }

    struct Message: Decodable {
        let role: String
        let content: String
    }

    struct Case: Decodable {
        let template: String?
        let name: String?
        let source: String?
        let conversation: String
        let add_generation_prompt: Bool
        let bos_token: String?
        let eos_token: String?
        let extra: Argument
        let expected: String?
        let raised: String?
        let error: String?

        var label: String {
            "\(template ?? name ?? "?") / \(conversation) / add_generation_prompt=\(add_generation_prompt)"
                + (variables.isEmpty ? "" : " / \(variables.keys.sorted())")
        }

        var variables: [String: ChatTemplateArgument] {
            guard case .object(let members) = extra.value else { return [:] }
            return Dictionary(uniqueKeysWithValues: members.map { ($0.key, $0.value) })
        }
    }

    /// A JSON value; make_expected.py writes objects as {"__object__": [[key, value], ...]} to keep
    /// their key order.
    struct Argument: Decodable {
        let value: ChatTemplateArgument

        struct OrderedObject: Decodable {
            let __object__: [[Argument]]
        }

        init(from decoder: Decoder) throws {
            let c = try decoder.singleValueContainer()
            if c.decodeNil() { value = .none }
            else if let b = try? c.decode(Bool.self) { value = .bool(b) }
            else if let i = try? c.decode(Int.self) { value = .int(i) }
            else if let d = try? c.decode(Double.self) { value = .double(d) }
            else if let s = try? c.decode(String.self) { value = .string(s) }
            else if let a = try? c.decode([Argument].self) { value = .array(a.map(\.value)) }
            else {
                value = .object(try c.decode(OrderedObject.self).__object__.map { pair in
                    guard pair.count == 2, case .string(let key) = pair[0].value else {
                        throw DecodingError.dataCorruptedError(in: c, debugDescription: "an object member is not a [key, value] pair")
                    }
                    return ChatTemplateArgument.Member(key, pair[1].value)
                })
            }
        }
    }

    static func loadExpected() throws -> Expected {
        try JSONDecoder().decode(Expected.self, from: Data(contentsOf: folder.appendingPathComponent("expected.json")))
    }

    static func templateSource(_ file: String) throws -> String {
        try String(contentsOf: folder.appendingPathComponent(file), encoding: .utf8)
    }

    /// The fixed clock of make_expected.py (naive local time there; read as UTC here).
    static func clock(_ expected: Expected) throws -> Date {
        let f = ISO8601DateFormatter()
        f.formatOptions = [.withFullDate, .withTime, .withColonSeparatorInTime, .withDashSeparatorInDate]
        f.timeZone = TimeZone(identifier: "UTC")
        return try XCTUnwrap(f.date(from: expected.now), "bad date \(expected.now)")
    }

    static let utc = TimeZone(identifier: "UTC")!

    /// Where two texts first differ, for a readable failure.
    func difference(_ got: String, _ want: String) -> String {
        let g = Array(got.unicodeScalars), w = Array(want.unicodeScalars)
        var i = 0
        while i < g.count, i < w.count, g[i] == w[i] { i += 1 }
        func around(_ a: [Unicode.Scalar]) -> String { PyString.repr(PyString.string(a[max(0, i - 30)..<min(a.count, i + 30)])) }
        return "first difference at code point \(i): got …\(around(g))…, want …\(around(w))…"
    }

    func check(_ c: Case, template: ChatTemplate, expected: Expected, file: StaticString = #filePath, line: UInt = #line) throws {
        var messages: [ChatMessage] = []
        var variables = c.variables
        if let plain = expected.conversations[c.conversation] {
            messages = plain.map { ChatMessage(role: $0.role, content: $0.content) }
        } else {
            variables["messages"] = try XCTUnwrap(expected.tool_conversations[c.conversation], c.conversation).value
        }
        let now = try Self.clock(expected)
        do {
            let text = try template.render(messages: messages, addGenerationPrompt: c.add_generation_prompt, bosToken: c.bos_token,
                                           eosToken: c.eos_token, variables: variables, now: now, timeZone: Self.utc)
            if let want = c.expected {
                XCTAssertTrue(text == want && text.utf8.elementsEqual(want.utf8), "\(c.label): \(difference(text, want))", file: file, line: line)
            } else {
                XCTFail("\(c.label): rendered, but Jinja2 failed (\(c.raised ?? c.error ?? ""))", file: file, line: line)
            }
        } catch let error as ChatTemplateError {
            if let raised = c.raised {
                XCTAssertEqual(error, .raised(raised), c.label, file: file, line: line)
            } else if c.error != nil {
                guard case .render = error else { return XCTFail("\(c.label): \(error), expected a render error like Jinja2's \(c.error!)", file: file, line: line) }
            } else {
                XCTFail("\(c.label): \(error)", file: file, line: line)
            }
        }
    }

    // MARK: Real templates

    func testModelTemplatesRenderAsJinja2() throws {
        let expected = try Self.loadExpected()
        XCTAssertGreaterThan(expected.cases.count, 150)
        var templates: [String: ChatTemplate] = [:]
        var covered: Set<String> = []
        for c in expected.cases {
            let file = try XCTUnwrap(c.template)
            if templates[file] == nil { templates[file] = try ChatTemplate(source: try Self.templateSource(file)) }
            try check(c, template: templates[file]!, expected: expected)
            covered.insert(file)
        }
        let files = try FileManager.default.contentsOfDirectory(atPath: Self.folder.path).filter { $0.hasSuffix(".jinja") }
        XCTAssertEqual(covered, Set(files), "every template in ChatTemplates/ has expected renders")
    }

    func testConstructsRenderAsJinja2() throws {
        let expected = try Self.loadExpected()
        XCTAssertGreaterThan(expected.features.count, 50)
        for c in expected.features {
            let template: ChatTemplate
            do {
                template = try ChatTemplate(source: try XCTUnwrap(c.source))
            } catch {
                XCTFail("\(c.label): \(error)")
                continue
            }
            try check(c, template: template, expected: expected)
        }
    }

    /// The SmolLM2 template in ChatTemplates/ is the one in the GGUF Topiary's tests use, and it
    /// gives the ChatML prompt `topiary generate --chat` has so far written by hand.
    func testSmolLM2TemplateFromGGUF() throws {
        let path = try Assets.path("assets/smollm2-135m-instruct-q4_1/SmolLM2-135M-Instruct.Q4_1.gguf")
        let source = try XCTUnwrap(try ggufString(path: path, key: "tokenizer.chat_template"))
        XCTAssertEqual(source, try Self.templateSource("HuggingFaceTB-SmolLM2-135M-Instruct.jinja"))
        let template = try ChatTemplate(source: source)
        let prompt = try template.render(messages: [ChatMessage(role: "user", content: "Hello")], addGenerationPrompt: true,
                                         bosToken: "<|im_start|>", eosToken: "<|im_end|>")
        XCTAssertEqual(prompt, "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
                       + "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n")
    }

    /// A string value from a GGUF file's metadata (enough of the format for that: version 2 or 3).
    func ggufString(path: String, key wanted: String) throws -> String? {
        let handle = try XCTUnwrap(FileHandle(forReadingAtPath: path))
        defer { try? handle.close() }
        let data = try XCTUnwrap(try handle.read(upToCount: 16 << 20))
        var at = 0
        func take(_ n: Int) throws -> Data {
            guard at + n <= data.count else { throw MissingAsset("GGUF metadata beyond the first 16 MiB of \(path)") }
            defer { at += n }
            return data.subdata(in: (data.startIndex + at)..<(data.startIndex + at + n))
        }
        func int(_ n: Int) throws -> Int { try take(n).reversed().reduce(0) { $0 << 8 | Int($1) } }
        func string() throws -> String { String(decoding: try take(try int(8)), as: UTF8.self) }
        let scalarSizes: [Int: Int] = [0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8]
        func skip(_ type: Int) throws {
            if type == 8 { _ = try string() }
            else if type == 9 {
                let element = try int(4)
                for _ in 0..<(try int(8)) { try skip(element) }
            } else { _ = try take(try XCTUnwrap(scalarSizes[type], "GGUF value type \(type)")) }
        }
        XCTAssertEqual(String(decoding: try take(4), as: UTF8.self), "GGUF")
        _ = try int(4)  // version
        _ = try int(8)  // tensor count
        for _ in 0..<(try int(8)) {
            let key = try string()
            let type = try int(4)
            if key == wanted, type == 8 { return try string() }
            try skip(type)
        }
        return nil
    }

    // MARK: Refusals

    func testRaiseExceptionSurfaces() throws {
        let gemma = try ChatTemplate(source: try Self.templateSource("google-gemma-2-2b-it.jinja"))
        XCTAssertThrowsError(try gemma.render(messages: [ChatMessage(role: "system", content: "Be brief."), ChatMessage(role: "user", content: "Hi")],
                                              addGenerationPrompt: true, bosToken: "<bos>", eosToken: "<eos>")) {
            XCTAssertEqual($0 as? ChatTemplateError, .raised("System role not supported"))
            XCTAssertTrue("\($0)".contains("System role not supported"), "\($0)")
        }
        let mixtral = try ChatTemplate(source: try Self.templateSource("mistralai-Mixtral-8x7B-Instruct-v0.1.jinja"))
        XCTAssertThrowsError(try mixtral.render(messages: [ChatMessage(role: "user", content: "a"), ChatMessage(role: "user", content: "b")],
                                                addGenerationPrompt: true, bosToken: "<s>", eosToken: "</s>")) {
            XCTAssertEqual($0 as? ChatTemplateError,
                           .raised("After the optional system message, conversation roles must alternate user/assistant/user/assistant/..."))
        }
    }

    func assertRefused(_ source: String, _ construct: String, line: Int, file: StaticString = #filePath, fileLine: UInt = #line) {
        XCTAssertThrowsError(try ChatTemplate(source: source), file: file, line: fileLine) { error in
            XCTAssertEqual(error as? ChatTemplateError, .unsupported(construct, line: line), file: file, line: fileLine)
            XCTAssertTrue("\(error)".contains("unsupported \(construct) at line \(line)"), "\(error)", file: file, line: fileLine)
        }
    }

    func testUnsupportedConstructsAreRefusedAtLoad() {
        assertRefused("{% for m in messages %}\n{{ m.role }}\n{{ m.content|wordwrap(20) }}\n{% endfor %}", "Jinja filter 'wordwrap'", line: 3)
        assertRefused("a\n{% include 'other.jinja' %}", "Jinja tag 'include'", line: 2)
        assertRefused("{% extends 'base' %}", "Jinja tag 'extends'", line: 1)
        assertRefused("{% filter upper %}x{% endfilter %}", "Jinja tag 'filter'", line: 1)
        assertRefused("{{ x is escaped }}", "Jinja test 'escaped'", line: 1)
        assertRefused("\n\n{{ lipsum(2) }}", "Jinja function 'lipsum'", line: 3)
        assertRefused("{{ '{} {}'.format(1, 2) }}", "Jinja method 'format'", line: 1)
        assertRefused("{% set _ = messages.append(1) %}", "Jinja method 'append'", line: 1)
        assertRefused("{% for x in messages recursive %}{{ loop(x) }}{% endfor %}", "recursive for loop", line: 1)
        assertRefused("x\n  {% raw %}{{ y }}{% endraw %}", "Jinja tag 'raw'", line: 2)
        assertRefused("{{ f(*args) }}{% macro f() %}{% endmacro %}", "*args/**kwargs in a call", line: 1)
        assertRefused("{{ 99999999999999999999 }}", "integer literal 99999999999999999999 (beyond 64 bits)", line: 1)
        // A macro defined anywhere in the template may be called; an unknown function may not.
        XCTAssertNoThrow(try ChatTemplate(source: "{{ greet() }}{% macro greet() %}hi{% endmacro %}"))
    }

    func testSyntaxErrors() {
        for (source, line) in [("{% if x %}no end", 1), ("{{ 1 + }}", 1), ("a\n{{ x", 2), ("{% endfor %}", 1), ("{# open", 1),
                               ("{% for x in y %}{% else %}{% else %}{% endfor %}", 1), ("\n{{ (1 }}", 2), ("{% break %}", 1),
                               ("{{ 'unterminated }}", 1), ("{{ x | }}", 1)] {
            XCTAssertThrowsError(try ChatTemplate(source: source), source) { error in
                guard case .syntax(_, let l)? = error as? ChatTemplateError else { return XCTFail("\(source): \(error)") }
                XCTAssertEqual(l, line, "\(source): \(error)")
            }
        }
    }

    func testRenderErrorsNameTheLine() throws {
        let t = try ChatTemplate(source: "line one\n{{ 'x' % 3 }}")
        XCTAssertThrowsError(try t.render(messages: [], addGenerationPrompt: false, bosToken: nil, eosToken: nil)) {
            XCTAssertEqual($0 as? ChatTemplateError, .unsupported("'%' string formatting", line: 2))
        }
        // No messages: templates that read messages[0] fail as they do in Jinja2.
        let qwen = try ChatTemplate(source: try Self.templateSource("Qwen-Qwen2.5-7B-Instruct.jinja"))
        XCTAssertThrowsError(try qwen.render(messages: [], addGenerationPrompt: true, bosToken: nil, eosToken: "<|im_end|>")) {
            guard case .render(let message, let line)? = $0 as? ChatTemplateError else { return XCTFail("\($0)") }
            XCTAssertEqual(line, 15)  // {%- if messages[0]['role'] == 'system' %}
            XCTAssertTrue(message.contains("no element 0"), message)
        }
    }

    // MARK: API

    func testParsedOnceRenderedManyTimes() throws {
        let template = try ChatTemplate(source: try Self.templateSource("meta-llama-Llama-3.2-3B-Instruct.jinja"))
        let messages = [ChatMessage(role: "system", content: "S"), ChatMessage(role: "user", content: "U")]
        let date = Date(timeIntervalSince1970: 1_700_000_000)  // 14 Nov 2023 22:13:20 UTC
        let results = Renders()
        DispatchQueue.concurrentPerform(iterations: 8) { i in
            let text = (try? template.render(messages: messages, addGenerationPrompt: i % 2 == 0, bosToken: "<|begin_of_text|>",
                                             eosToken: "<|eot_id|>", now: date, timeZone: Self.utc)) ?? "failed"
            results.set(i, text)
        }
        let head = "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
            + "Today Date: 14 Nov 2023\n\nS<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nU<|eot_id|>"
        for i in 0..<8 {
            XCTAssertEqual(results[i], i % 2 == 0 ? head + "<|start_header_id|>assistant<|end_header_id|>\n\n" : head)
        }
        // The date in another time zone, and a date_string given by the caller.
        let tokyo = try template.render(messages: messages, addGenerationPrompt: false, bosToken: nil, eosToken: nil,
                                        now: date, timeZone: TimeZone(identifier: "Asia/Tokyo")!)
        XCTAssertTrue(tokyo.contains("Today Date: 15 Nov 2023"), tokyo)
        let given = try template.render(messages: messages, addGenerationPrompt: false, bosToken: nil, eosToken: nil,
                                        extra: ["date_string": "01 Jan 2030"])
        XCTAssertTrue(given.hasPrefix("<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\nToday Date: 01 Jan 2030\n"), given)
    }

    func testTokenizerConfigFields() throws {
        let plain = #"{"bos_token": "<s>", "eos_token": {"content": "</s>", "lstrip": false}, "chat_template": "{{ bos_token }}x"}"#
        XCTAssertEqual(try TokenizerChatConfig.read(json: Data(plain.utf8)),
                       TokenizerChatConfig(chatTemplate: "{{ bos_token }}x", bosToken: "<s>", eosToken: "</s>"))
        let named = #"{"bos_token": null, "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}"#
        XCTAssertEqual(try TokenizerChatConfig.read(json: Data(named.utf8)), TokenizerChatConfig(chatTemplate: "D", bosToken: nil, eosToken: nil))
        XCTAssertEqual(try TokenizerChatConfig.read(json: Data(named.utf8), templateName: "tool_use").chatTemplate, "T")
        XCTAssertThrowsError(try TokenizerChatConfig.read(json: Data(named.utf8), templateName: "rag")) {
            XCTAssertTrue("\($0)".contains("tool_use, default"), "\($0)")
        }
        XCTAssertEqual(try TokenizerChatConfig.read(json: Data("{}".utf8)), TokenizerChatConfig(chatTemplate: nil, bosToken: nil, eosToken: nil))
        XCTAssertThrowsError(try TokenizerChatConfig.read(json: Data("{".utf8)))
    }

    final class Renders: @unchecked Sendable {
        private let lock = NSLock()
        private var texts: [Int: String] = [:]
        func set(_ i: Int, _ text: String) { lock.withLock { texts[i] = text } }
        subscript(i: Int) -> String? { lock.withLock { texts[i] } }
    }

    func testVariablesOfOtherTypes() throws {
        let template = try ChatTemplate(source: "{{ flag is false }} {{ n + 1 }} {{ items|tojson }} {{ obj.b }} {{ nothing is none }}")
        let text = try template.render(messages: [], addGenerationPrompt: false, bosToken: nil, eosToken: nil, variables: [
            "flag": false, "n": 41, "items": .array([1, "x", nil, 2.5]),
            "obj": .object([.init("a", 1), .init("b", "é")]), "nothing": nil,
        ])
        XCTAssertEqual(text, #"True 42 [1, "x", null, 2.5] é True"#)
    }
}
