import Foundation

/// Calibration windows drawn as the reference scripts draw them: `random.seed(seed)`, then for
/// each sample `start = random.randint(0, ntokens - seqlen - 1)` and tokens [start, start+seqlen).
public enum Calibration {
    public static func windows(tokens: [Int], samples: Int, sequenceLength: Int, seed: Int) throws -> [[Int]] {
        guard samples > 0 else { throw PruneError.invalidOption("--calib-samples must be at least 1") }
        guard sequenceLength >= 1 else { throw PruneError.invalidOption("--calib-seqlen must be at least 1") }
        guard tokens.count >= sequenceLength + 1 else {
            throw PruneError.calibration("the calibration data has \(tokens.count) tokens; one window of \(sequenceLength) needs at least \(sequenceLength + 1)")
        }
        var random = PythonRandom(seed: seed)
        return (0..<samples).map { _ in
            let start = random.randint(0, tokens.count - sequenceLength - 1)
            return Array(tokens[start..<(start + sequenceLength)])
        }
    }

    /// Reads a file of token ids: a JSON array of integers, or integers separated by white space
    /// or commas. Returns nil when the file is not such a list (then it is text).
    public static func tokenIDs(fromFile data: Data, path: String) throws -> [Int]? {
        guard let text = String(data: data, encoding: .utf8) else { return nil }
        let trimmed = text.trimmingCharacters(in: .whitespacesAndNewlines)
        if trimmed.hasPrefix("[") {
            guard let array = try? JSONSerialization.jsonObject(with: Data(trimmed.utf8)) as? [Any] else { return nil }
            var ids: [Int] = []
            for v in array {
                guard let n = v as? NSNumber, n.doubleValue == n.doubleValue.rounded() else {
                    throw PruneError.calibration("\(path): a JSON array of token ids holds '\(v)', not an integer")
                }
                ids.append(n.intValue)
            }
            return ids
        }
        let fields = trimmed.split(whereSeparator: { $0 == "," || $0.isWhitespace })
        guard !fields.isEmpty, fields.allSatisfy({ Int($0) != nil }) else { return nil }
        return fields.map { Int($0)! }
    }
}
