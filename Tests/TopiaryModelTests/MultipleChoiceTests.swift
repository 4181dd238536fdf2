import Foundation
import XCTest
import TopiaryTestSupport
@testable import TopiaryModel

/// `topiary eval --tasks`: lm-eval's multiple-choice scoring on stories260K.
final class MultipleChoiceTests: XCTestCase {
    static let taskPath = TestPaths.repositoryRoot.appendingPathComponent("Tests/Fixtures/tasks/stories-mc.jsonl").path
    static let model = try! LanguageModel.open(path: TestAssets.stories260K, tokenizerPath: TestAssets.stories260KTokenizer)

    /// log P(tokens[k] | tokens[..<k]) summed over the last `count` tokens, from the logits of the
    /// existing evaluation code (`Perplexity.logits`, the whole sequence at once), with the log
    /// softmax taken here in Double.
    func referenceLogLikelihood(_ tokens: [Int], count: Int) throws -> Double {
        let logits = try Perplexity.logits(model: Self.model, tokens: Array(tokens.dropLast()))
        var sum = 0.0
        for position in (tokens.count - 1 - count)..<(tokens.count - 1) {
            let row = logits.row(position).map(Double.init)
            let top = row.max()!
            let logZ = top + log(row.reduce(0) { $0 + exp($1 - top) })
            sum += row[tokens[position + 1]] - logZ
        }
        return sum
    }

    func testLogLikelihoodsAreSumsOfPerTokenLogProbsAndAccuraciesFollow() throws {
        let tokenizer = Self.model.tokenizer!
        let documents = try MultipleChoice.read(path: Self.taskPath)
        XCTAssertEqual(documents.count, 10)
        let result = try MultipleChoice.score(model: Self.model, tokenizer: tokenizer, documents: documents)
        XCTAssertEqual(result.questions.count, 10)
        var accHits = 0.0, normHits = 0.0, differ = 0
        for (d, q) in zip(documents, result.questions) {
            var expected: [Double] = []
            for (k, choice) in d.choices.enumerated() {
                // The tokens written out here from lm-eval's rule (no context in the fixture ends in white space).
                let context: [Int], continuation: [Int]
                if d.context.isEmpty {
                    context = [tokenizer.bosID!]
                    continuation = tokenizer.encode(" " + choice, addBOS: false)
                } else {
                    let whole = tokenizer.encode(d.context + " " + choice, addBOS: false)
                    context = tokenizer.encode(d.context, addBOS: false)
                    continuation = Array(whole[context.count...])
                }
                XCTAssertEqual(q.continuationTokens[k], continuation.count, "line \(d.line) choice \(k)")
                let reference = try referenceLogLikelihood(context + continuation, count: continuation.count)
                XCTAssertEqual(q.logLikelihoods[k], reference, accuracy: 1e-4 * max(1, abs(reference)), "line \(d.line) choice \(k)")
                expected.append(reference)
            }
            // acc and acc_norm from the reference log-likelihoods, with lengths counted here.
            let best = expected.indices.max { expected[$0] < expected[$1] }!
            let normalized = zip(expected, d.choices).map { $0 / Double($1.count) }
            let bestNorm = normalized.indices.max { normalized[$0] < normalized[$1] }!
            XCTAssertEqual(q.prediction, best, "line \(d.line)")
            XCTAssertEqual(q.normalizedPrediction, bestNorm, "line \(d.line)")
            if best == d.gold { accHits += 1 }
            if bestNorm == d.gold { normHits += 1 }
            if best != bestNorm { differ += 1 }
        }
        XCTAssertEqual(result.acc, accHits / 10)
        XCTAssertEqual(result.accNorm, normHits / 10)
        // The fixture is one where the two measures disagree (line 10: the long right answer).
        XCTAssertGreaterThan(differ, 0)
        XCTAssertNotEqual(result.acc, result.accNorm)
    }

    func testEachChoiceScoresAloneWhateverShareItsGroup() throws {
        let tokenizer = Self.model.tokenizer!
        let documents = try MultipleChoice.read(path: Self.taskPath)
        let all = try MultipleChoice.score(model: Self.model, tokenizer: tokenizer, documents: documents)
        // A token budget of one token: every sequence in its own group.
        let apart = try MultipleChoice.score(model: Self.model, tokenizer: tokenizer, documents: documents, tokenBudget: 1)
        XCTAssertEqual(all.questions.map(\.logLikelihoods), apart.questions.map(\.logLikelihoods))
        let reversed = try MultipleChoice.score(model: Self.model, tokenizer: tokenizer, documents: documents.reversed())
        XCTAssertEqual(all.questions.map(\.logLikelihoods), reversed.questions.reversed().map(\.logLikelihoods))
    }

    func testAccAndAccNormOnHandValues() {
        let d = MultipleChoiceDocument(line: 1, context: "Q", choices: ["a", "bbbbbbbb", "café"], gold: 1)
        // acc: -2 is highest; acc_norm: -2/1, -8/8 = -1, -4.4/4 = -1.1 (4 code points, not 5 bytes) → choice 1.
        let q = MultipleChoice.question(d, logLikelihoods: [-2, -8, -4.4], continuationTokens: [1, 3, 2])
        XCTAssertEqual(q.prediction, 0)
        XCTAssertEqual(q.normalizedPrediction, 1)
        // With 5 (bytes) "café" would be -0.88 and win: the length is in characters.
        XCTAssertEqual(MultipleChoice.question(d, logLikelihoods: [-2, -8, -3.6], continuationTokens: [1, 3, 2]).normalizedPrediction, 2)
        // Ties go to the first choice, as numpy's argmax.
        XCTAssertEqual(MultipleChoice.question(d, logLikelihoods: [-1, -1, -1], continuationTokens: [1, 1, 1]).prediction, 0)
        let right = MultipleChoice.question(MultipleChoiceDocument(line: 2, context: "Q", choices: ["x", "y"], gold: 0),
                                            logLikelihoods: [-1, -3], continuationTokens: [1, 1])
        let result = MultipleChoiceResult(questions: [q, right, right, right])
        XCTAssertEqual(result.acc, 0.75)
        XCTAssertEqual(result.accNorm, 1.0)
        // lm-eval's stderr: sample standard deviation / √n: for 1,0,1,1, 0.5 / 2.
        XCTAssertEqual(result.accStderr, 0.25, accuracy: 1e-12)
        XCTAssertEqual(result.accNormStderr, 0)
    }

    func testTrailingWhiteSpaceMovesToTheContinuation() throws {
        let tokenizer = Self.model.tokenizer!
        let (context, continuation) = try MultipleChoice.encode(context: "The cat sat on the \n", continuation: " mat", tokenizer: tokenizer)
        XCTAssertEqual(context, tokenizer.encode("The cat sat on the", addBOS: false))
        let whole = tokenizer.encode("The cat sat on the \n mat", addBOS: false)
        XCTAssertEqual(context + continuation, whole)
        let (empty, alone) = try MultipleChoice.encode(context: "", continuation: " Once", tokenizer: tokenizer)
        XCTAssertEqual(empty, [tokenizer.bosID!])
        XCTAssertEqual(alone, tokenizer.encode(" Once", addBOS: false))
        // White space only: scored as an empty context.
        let (blank, _) = try MultipleChoice.encode(context: "  ", continuation: "x", tokenizer: tokenizer)
        XCTAssertEqual(blank, [tokenizer.bosID!])
    }

    func refused(_ text: String, mentions words: [String], file: StaticString = #filePath, line: UInt = #line) {
        do {
            _ = try MultipleChoice.parse(Data(text.utf8), path: "task.jsonl")
            XCTFail("accepted: \(text)", file: file, line: line)
        } catch {
            for w in words { XCTAssertTrue("\(error)".contains(w), "'\(w)' not in: \(error)", file: file, line: line) }
        }
    }

    func testBadTaskFilesNameFileLineAndField() {
        let good = #"{"context": "Q", "choices": ["a", "b"], "gold": 0}"# + "\n"
        refused(good + #"{"choices": ["a", "b"], "gold": 0}"#, mentions: ["task.jsonl: line 2:", "no field 'context'", "a string"])
        refused(good + "\n" + #"{"context": "Q", "gold": 0}"#, mentions: ["task.jsonl: line 3:", "no field 'choices'"])
        refused(#"{"context": "Q", "choices": ["a", "b"]}"#, mentions: ["line 1:", "no field 'gold'", "an integer"])
        refused(#"{"context": 3, "choices": ["a", "b"], "gold": 0}"#, mentions: ["line 1:", "field 'context'", "must be a string"])
        refused(#"{"context": "Q", "choices": "a b", "gold": 0}"#, mentions: ["line 1:", "field 'choices'", "an array of strings"])
        refused(#"{"context": "Q", "choices": ["a", 2], "gold": 0}"#, mentions: ["line 1:", "field 'choices' item 2"])
        refused(#"{"context": "Q", "choices": ["a", "b"], "gold": "0"}"#, mentions: ["line 1:", "field 'gold'", "an integer"])
        refused(#"{"context": "Q", "choices": ["a", "b"], "gold": 1.5}"#, mentions: ["line 1:", "field 'gold'"])
        refused(#"{"context": "Q", "choices": ["a", "b"], "gold": 2}"#, mentions: ["line 1:", "field 'gold' is 2", "0-1"])
        refused(#"{"context": "Q", "choices": ["a", "b"], "gold": -1}"#, mentions: ["line 1:", "field 'gold' is -1"])
        refused(#"{"context": "Q", "choices": ["a"], "gold": 0}"#, mentions: ["line 1:", "at least 2"])
        refused(#"{"context": "Q", "choices": ["a", ""], "gold": 0}"#, mentions: ["line 1:", "item 2 is empty"])
        refused(good + "not json", mentions: ["task.jsonl: line 2:", "not valid JSON"])
        refused(good + #"["Q", ["a", "b"], 0]"#, mentions: ["line 2:", "not a JSON object"])
        refused("\n \n", mentions: ["task.jsonl", "no questions"])
        XCTAssertThrowsError(try MultipleChoice.read(path: "/nonexistent/tasks.jsonl")) { XCTAssertTrue("\($0)".contains("/nonexistent/tasks.jsonl")) }
    }
}
