import Foundation
import TopiaryTensor
import TopiaryTokenizers

/// A task file that cannot be scored: the message names the file, the line and the field, and
/// what was expected.
public struct TaskFileError: Error, CustomStringConvertible, Equatable {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

/// One question of a multiple-choice task, with lm-evaluation-harness's per-document fields:
/// `context` (the prompt, as the model sees it), `choices` (the answers, without the space that
/// separates them from the context), `gold` (the index of the right answer).
public struct MultipleChoiceDocument: Sendable, Equatable {
    /// The file's line (1-based).
    public var line: Int
    public var context: String
    public var choices: [String]
    public var gold: Int

    public init(line: Int, context: String, choices: [String], gold: Int) {
        self.line = line
        self.context = context
        self.choices = choices
        self.gold = gold
    }
}

/// The scored task: each question's log-likelihoods and predictions, and the task's accuracies.
public struct MultipleChoiceResult: Sendable {
    public struct Question: Sendable {
        public var line: Int
        public var gold: Int
        /// log P(continuation | context) of each choice, in nats.
        public var logLikelihoods: [Double]
        /// How many tokens each choice's continuation has.
        public var continuationTokens: [Int]
        /// argmax of the log-likelihoods (the first on ties, as numpy's argmax).
        public var prediction: Int
        /// argmax of the log-likelihoods divided by the choices' lengths in characters.
        public var normalizedPrediction: Int
    }

    public var questions: [Question]
    /// Requests whose context was cut on the left to fit the model's context.
    public var truncated: Int

    public init(questions: [Question], truncated: Int = 0) {
        self.questions = questions
        self.truncated = truncated
    }

    public var acc: Double { Self.mean(questions.map { $0.prediction == $0.gold ? 1 : 0 }) }
    public var accNorm: Double { Self.mean(questions.map { $0.normalizedPrediction == $0.gold ? 1 : 0 }) }
    /// Standard errors of the means, as lm-eval reports them (sample standard deviation / √n).
    public var accStderr: Double { Self.stderr(questions.map { $0.prediction == $0.gold ? 1 : 0 }) }
    public var accNormStderr: Double { Self.stderr(questions.map { $0.normalizedPrediction == $0.gold ? 1 : 0 }) }

    static func mean(_ v: [Double]) -> Double { v.isEmpty ? 0 : v.reduce(0, +) / Double(v.count) }
    static func stderr(_ v: [Double]) -> Double {
        guard v.count > 1 else { return 0 }
        let m = mean(v)
        let variance = v.reduce(0) { $0 + ($1 - m) * ($1 - m) } / Double(v.count - 1)
        return (variance / Double(v.count)).squareRoot()
    }
}

/// Zero-shot multiple-choice scoring as lm-evaluation-harness scores its `multiple_choice`
/// tasks (ARC, HellaSwag, PIQA, ...):
///
/// - Each choice is a continuation `delimiter + choice` of the context (lm-eval's
///   `target_delimiter`, a space by default).
/// - Tokens: trailing white space of the context moves to the front of the continuation; then
///   `whole = encode(context + continuation)` and `ctx = encode(context)`, both without special
///   tokens, and the continuation's tokens are `whole[ctx.count...]` (lm-eval's `_encode_pair`).
///   An empty context is the single token BOS (EOS when there is no BOS) and the continuation is
///   encoded alone.
/// - log-likelihood = Σ log P(token | everything before it) over the continuation's tokens. When
///   context + continuation is longer than the model's context plus one, the context is cut on
///   the left (lm-eval's `[-(max_length + 1):]`).
/// - acc: the choice of highest log-likelihood is the gold one. acc_norm: the same with each
///   log-likelihood divided by its choice's length in characters (Unicode code points, Python's
///   `len(choice)`, the choice without the delimiter). Ties go to the first choice (numpy's argmax).
public enum MultipleChoice {
    // MARK: task files

    /// Reads a JSON-lines task file: one question a line; blank lines are skipped.
    public static func read(path: String) throws -> [MultipleChoiceDocument] {
        var isDirectory: ObjCBool = false
        if FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory), isDirectory.boolValue {
            throw TaskFileError("\(path): is a directory, expected a JSON-lines task file")
        }
        guard let data = FileManager.default.contents(atPath: path) else {
            throw TaskFileError("\(path): cannot read task file (missing or not readable)")
        }
        return try parse(data, path: path)
    }

    private struct Fields: Decodable {
        let context: String
        let choices: [String]
        /// Read as a number and checked to be a whole one below, so that 1.5 is named as such.
        let gold: Double
    }

    static let expected = [
        "context": "a string (the prompt before the answer)",
        "choices": "an array of strings (the answers)",
        "gold": "an integer (the index of the right answer in 'choices')",
    ]

    /// Parses task-file bytes read from `path` (named in errors).
    public static func parse(_ data: Data, path: String) throws -> [MultipleChoiceDocument] {
        let bytes = [UInt8](data)
        var documents: [MultipleChoiceDocument] = []
        let decoder = JSONDecoder()
        var start = bytes.starts(with: [0xEF, 0xBB, 0xBF]) ? 3 : 0
        var line = 1
        while start < bytes.count {
            let end = bytes[start...].firstIndex(of: 0x0A) ?? bytes.count
            let slice = bytes[start..<end]
            if slice.contains(where: { !($0 == 0x20 || $0 == 0x09 || $0 == 0x0D) }) {
                documents.append(try document(slice, line: line, path: path, decoder: decoder))
            }
            start = end + 1
            line += 1
        }
        guard !documents.isEmpty else {
            throw TaskFileError("\(path): holds no questions (expected one JSON object a line with fields 'context', 'choices' and 'gold')")
        }
        return documents
    }

    private static func document(_ slice: ArraySlice<UInt8>, line: Int, path: String, decoder: JSONDecoder) throws -> MultipleChoiceDocument {
        let at = "\(path): line \(line):"
        let fields: Fields
        do {
            fields = try decoder.decode(Fields.self, from: Data(slice))
        } catch let error as DecodingError {
            func field(_ path: [CodingKey]) -> String? { path.first?.stringValue }
            switch error {
            case .keyNotFound(let key, let context) where context.codingPath.isEmpty:
                throw TaskFileError("\(at) no field '\(key.stringValue)' (expected \(expected[key.stringValue] ?? "it"); each line needs 'context', 'choices' and 'gold', as lm-eval's documents have them)")
            case .typeMismatch(_, let context) where field(context.codingPath) != nil,
                 .valueNotFound(_, let context) where field(context.codingPath) != nil,
                 .dataCorrupted(let context) where field(context.codingPath) != nil:
                let name = field(context.codingPath)!
                let item = context.codingPath.count > 1 ? " item \((context.codingPath[1].intValue ?? 0) + 1)" : ""
                throw TaskFileError("\(at) field '\(name)'\(item) is not what was expected: '\(name)' must be \(expected[name] ?? "valid")")
            case .typeMismatch, .valueNotFound:
                throw TaskFileError("\(at) is not a JSON object (expected one object a line with fields 'context', 'choices' and 'gold')")
            default:
                throw TaskFileError("\(at) is not valid JSON (expected one object a line with fields 'context', 'choices' and 'gold')")
            }
        }
        guard fields.gold == fields.gold.rounded(), abs(fields.gold) < 1e15 else {
            throw TaskFileError("\(at) field 'gold' is \(fields.gold), expected \(expected["gold"]!)")
        }
        let gold = Int(fields.gold)
        guard fields.choices.count >= 2 else {
            throw TaskFileError("\(at) field 'choices' has \(fields.choices.count) answer\(fields.choices.count == 1 ? "" : "s"); a question needs at least 2")
        }
        if let empty = fields.choices.firstIndex(where: \.isEmpty) {
            throw TaskFileError("\(at) field 'choices' item \(empty + 1) is empty (acc_norm divides by each answer's length)")
        }
        guard fields.choices.indices.contains(gold) else {
            throw TaskFileError("\(at) field 'gold' is \(gold), expected an index into 'choices', 0-\(fields.choices.count - 1)")
        }
        return MultipleChoiceDocument(line: line, context: fields.context, choices: fields.choices, gold: gold)
    }

    // MARK: tokens

    /// White space as Python's `str.isspace` has it (what lm-eval's `rstrip()` removes).
    static func isPythonSpace(_ s: Unicode.Scalar) -> Bool {
        s.properties.isWhitespace || (0x1C...0x1F).contains(s.value)
    }

    /// Context and continuation tokens of one request, as lm-eval's `loglikelihood` makes them.
    public static func encode(context: String, continuation: String, tokenizer: any Tokenizer) throws -> (context: [Int], continuation: [Int]) {
        if context.isEmpty {
            guard let prefix = tokenizer.bosID ?? tokenizer.eosID else {
                throw TaskFileError("an empty context is scored after the BOS (or EOS) token, and the tokenizer has neither")
            }
            return ([prefix], tokenizer.encode(continuation, addBOS: false))
        }
        var contextScalars = Array(context.unicodeScalars)
        var moved: [Unicode.Scalar] = []
        while let last = contextScalars.last, isPythonSpace(last) { moved.insert(contextScalars.removeLast(), at: 0) }
        var c = String.UnicodeScalarView()
        c.append(contentsOf: contextScalars)
        var k = String.UnicodeScalarView()
        k.append(contentsOf: moved)
        k.append(contentsOf: continuation.unicodeScalars)
        let contextText = String(c), continuationText = String(k)
        let whole = tokenizer.encode(contextText + continuationText, addBOS: false)
        let contextTokens = tokenizer.encode(contextText, addBOS: false)
        // A context of white space only encodes to nothing: score it as an empty one.
        if contextTokens.isEmpty { return try encode(context: "", continuation: continuationText, tokenizer: tokenizer) }
        return (contextTokens, Array(whole.dropFirst(contextTokens.count)))
    }

    // MARK: scoring

    /// One sequence to run: its input tokens and how many of the last positions predict the
    /// continuation (whose tokens are `targets`).
    struct Sequence {
        var input: [Int]
        var targets: [Int]
    }

    /// Scores every question. `delimiter` goes between the context and each choice (lm-eval's
    /// `target_delimiter`). `tokenBudget` bounds the tokens run through the blocks together
    /// (the activations held at once); each block is loaded once per such group.
    public static func score(model: LanguageModel, tokenizer: any Tokenizer, documents: [MultipleChoiceDocument],
                             delimiter: String = " ", tokenBudget: Int = 32768, path: String = "the task file",
                             progress: ((_ done: Int, _ total: Int) -> Void)? = nil) throws -> MultipleChoiceResult {
        let context = model.config.maxPositions
        var sequences: [Sequence] = []
        var truncated = 0
        for d in documents {
            for (k, choice) in d.choices.enumerated() {
                let (ctx, cont) = try encode(context: d.context, continuation: delimiter + choice, tokenizer: tokenizer)
                guard !cont.isEmpty else {
                    throw TaskFileError("\(path): line \(d.line): field 'choices' item \(k + 1) ('\(choice)') gives no tokens after the context (the tokenizer merged it into the context's last token)")
                }
                guard cont.count <= context else {
                    throw TaskFileError("\(path): line \(d.line): field 'choices' item \(k + 1) is \(cont.count) tokens, longer than the model's context of \(context)")
                }
                var whole = ctx + cont
                if whole.count > context + 1 {
                    whole.removeFirst(whole.count - (context + 1))
                    truncated += 1
                }
                sequences.append(Sequence(input: Array(whole.dropLast()), targets: cont))
            }
        }
        let lls = try logLikelihoods(model: model, sequences: sequences, tokenBudget: tokenBudget, progress: progress)
        var questions: [MultipleChoiceResult.Question] = []
        var next = 0
        for d in documents {
            let ll = Array(lls[next..<(next + d.choices.count)])
            let counts = sequences[next..<(next + d.choices.count)].map(\.targets.count)
            next += d.choices.count
            questions.append(question(d, logLikelihoods: ll, continuationTokens: counts))
        }
        return MultipleChoiceResult(questions: questions, truncated: truncated)
    }

    /// A question's predictions from its choices' log-likelihoods: acc's argmax, and acc_norm's
    /// argmax of each log-likelihood divided by its choice's length in characters (Unicode code
    /// points: Python's `len(choice)`, which lm-eval uses; "café" is 4, not its 5 UTF-8 bytes).
    public static func question(_ d: MultipleChoiceDocument, logLikelihoods ll: [Double], continuationTokens: [Int]) -> MultipleChoiceResult.Question {
        precondition(ll.count == d.choices.count)
        let lengths = d.choices.map { Double($0.unicodeScalars.count) }
        return .init(line: d.line, gold: d.gold, logLikelihoods: ll, continuationTokens: continuationTokens,
                     prediction: argmax(ll), normalizedPrediction: argmax(zip(ll, lengths).map { $0 / $1 }))
    }

    /// Index of the largest value, the first on ties (numpy's argmax; a NaN wins, as in numpy).
    public static func argmax(_ v: [Double]) -> Int {
        var best = 0
        for i in v.indices.dropFirst() {
            if v[best].isNaN { return best }
            if v[i] > v[best] || v[i].isNaN { best = i }
        }
        return best
    }

    /// Σ log P(target | prefix) for each sequence, streaming the blocks: the sequences go
    /// through block 0, then block 1, ..., in groups of at most `tokenBudget` tokens (each block
    /// is loaded once per group). Each sequence runs alone, so its log-likelihood does not depend
    /// on which others share its group, and equals (to float rounding in the head's product) the
    /// sum that `Perplexity.logits` gives for it.
    static func logLikelihoods(model: LanguageModel, sequences: [Sequence], tokenBudget: Int,
                               progress: ((Int, Int) -> Void)?) throws -> [Double] {
        let c = model.config
        for s in sequences {
            if let bad = (s.input + s.targets).first(where: { $0 < 0 || $0 >= c.vocabularySize }) {
                throw EvaluationError.tokenOutOfRange(id: bad, vocabulary: c.vocabularySize)
            }
        }
        var groups: [Range<Int>] = []
        var first = 0, tokens = 0
        for i in sequences.indices {
            if i > first && tokens + sequences[i].input.count > tokenBudget {
                groups.append(first..<i)
                first = i
                tokens = 0
            }
            tokens += sequences[i].input.count
        }
        if first < sequences.count { groups.append(first..<sequences.count) }

        let embedding = try model.loadEmbedding()
        let head = try model.loadHead(embedding: embedding)
        var result = [Double](repeating: 0, count: sequences.count)
        var ropes: [Int: Kernels.RopeTable] = [:]
        func rope(_ length: Int) -> Kernels.RopeTable {
            if let r = ropes[length] { return r }
            let r = c.ropeTable(positions: length)
            ropes[length] = r
            return r
        }
        for members in groups {
            let backend = ComputeDevices.defaultBackend
            var states = members.map { embedding.embed(sequences[$0].input, sequenceLength: sequences[$0].input.count, on: backend) }
            for b in 0..<c.layerCount {
                let block = try model.loadBlock(b).on(backend)
                for (k, i) in members.enumerated() {
                    let length = sequences[i].input.count
                    states[k] = block.forward(states[k], sequenceLength: length, rope: rope(length))
                }
            }
            for (k, i) in members.enumerated() {
                // Logits of the positions that predict the continuation only (the head's matrix
                // product is most of the cost with a large vocabulary and a long context).
                let targets = sequences[i].targets
                let length = sequences[i].input.count
                if let f64 = backend as? Float64Backend {
                    // --precision f64: the log-softmax too in Float64, on the unrounded logits.
                    let logits = head.logits(backend.copy(states[k].region(rows: (length - targets.count)..<length)), on: backend)
                    let (v, values) = (logits.cols, f64.downloadValues(logits))
                    result[i] = targets.enumerated().reduce(0.0) { $0 + Perplexity.logProbability(values[($1.offset * v)..<(($1.offset + 1) * v)], target: $1.element) }
                    continue
                }
                let logits = head.logits(states[k], rows: (length - targets.count)..<length, on: backend)
                let v = logits.cols
                var sum = 0.0
                logits.withUnsafeBufferPointer { p in
                    for (t, target) in targets.enumerated() {
                        let row = p.baseAddress! + t * v
                        sum -= Kernels.logSumExp(row, v) - Double(row[target])
                    }
                }
                result[i] = sum
            }
            progress?(members.upperBound, sequences.count)
        }
        return result
    }
}
