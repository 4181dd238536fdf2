import Foundation
import TopiaryTokenizers

/// A model's own chat template and the special-token strings it refers to.
public struct ChatSettings: Sendable {
    public let template: ChatTemplate
    public let bosToken: String?
    public let eosToken: String?
    /// Where the template was read from, for messages.
    public let source: String

    /// The prompt for one user turn, with the assistant turn opened, as transformers'
    /// `apply_chat_template(..., add_generation_prompt=True)` renders it.
    public func prompt(user text: String, system: String? = nil) throws -> String {
        var messages: [ChatMessage] = []
        if let system { messages.append(ChatMessage(role: "system", content: system)) }
        messages.append(ChatMessage(role: "user", content: text))
        return try template.render(messages: messages, addGenerationPrompt: true, bosToken: bosToken, eosToken: eosToken)
    }
}

extension LanguageModel {
    /// The chat template the model carries: chat_template.jinja or tokenizer_config.json's
    /// `chat_template` in a Hugging Face directory, `tokenizer.chat_template` in a GGUF file.
    /// Nil when the model has none.
    public func chatSettings() throws -> ChatSettings? {
        switch format {
        case .huggingFace:
            let dir = path as NSString
            let configPath = dir.appendingPathComponent("tokenizer_config.json")
            var settings = TokenizerChatConfig(chatTemplate: nil, bosToken: nil, eosToken: nil)
            if let data = FileManager.default.contents(atPath: configPath) {
                settings = try TokenizerChatConfig.read(json: data, source: configPath)
            }
            var source = configPath
            let jinjaPath = dir.appendingPathComponent("chat_template.jinja")
            if let data = FileManager.default.contents(atPath: jinjaPath) {
                guard let text = String(data: data, encoding: .utf8) else {
                    throw CheckpointError.invalidHeader(path: jinjaPath, detail: "not UTF-8 text")
                }
                settings.chatTemplate = text
                source = jinjaPath
            }
            guard let text = settings.chatTemplate else { return nil }
            return ChatSettings(template: try parse(text, source), bosToken: settings.bosToken, eosToken: settings.eosToken, source: source)
        case .gguf:
            let gguf = try GGUFFile(path: path)
            let meta = gguf.metadata
            guard let text = meta["tokenizer.chat_template"]?.string else { return nil }
            let tokens = meta["tokenizer.ggml.tokens"]?.stringArray
            func token(_ key: String) -> String? {
                guard let id = meta[key]?.int, let tokens, id >= 0, id < tokens.count else { return nil }
                return tokens[id]
            }
            return ChatSettings(template: try parse(text, path + " (tokenizer.chat_template)"), bosToken: token("tokenizer.ggml.bos_token_id"),
                                eosToken: token("tokenizer.ggml.eos_token_id"), source: path)
        case .llama2c:
            return nil
        }
    }

    private func parse(_ text: String, _ source: String) throws -> ChatTemplate {
        do { return try ChatTemplate(source: text) } catch {
            throw CheckpointError.invalidField(path: source, field: "chat_template", detail: "\(error)")
        }
    }
}
