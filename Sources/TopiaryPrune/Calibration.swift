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
    /// or commas. Returns nil when the file is not such a list (then it is text). A file that
    /// starts with '[' is a JSON array or an error: malformed JSON, an element that is not an
    /// integer (a boolean, a string, 2.5) or one that does not fit in Int is refused, naming the
    /// file, the element as written and its index.
    public static func tokenIDs(fromFile data: Data, path: String) throws -> [Int]? {
        guard let text = String(data: data, encoding: .utf8) else { return nil }
        let trimmed = text.trimmingCharacters(in: .whitespacesAndNewlines)
        if trimmed.hasPrefix("[") {
            let parsed: Any
            do { parsed = try JSONSerialization.jsonObject(with: Data(trimmed.utf8)) } catch {
                let reason = (error as NSError).userInfo[NSDebugDescriptionErrorKey].map { "\($0)" } ?? error.localizedDescription
                throw PruneError.input("\(path): looks like a JSON array of token ids but is not valid JSON: \(reason)")
            }
            guard let array = parsed as? [Any] else {
                throw PruneError.input("\(path): looks like a JSON array of token ids but is not one")
            }
            if array.isEmpty { return [] }
            // JSONSerialization gives booleans as NSNumbers (objCType "c") and numbers beyond Int
            // as unsigned, double or decimal ones: a signed integer is taken as it is, anything
            // else is judged by the element as written.
            var literals: [String]?
            func written(_ i: Int, _ v: Any) -> String {
                if literals == nil {
                    var parts = topLevelElements(of: trimmed)
                    if parts.count == array.count + 1, parts.last?.isEmpty == true { parts.removeLast() }
                    literals = parts
                }
                return literals!.count == array.count ? literals![i] : "\(v)"
            }
            func refuse(_ i: Int, _ literal: String, _ why: String) -> PruneError {
                .input("\(path): a JSON array of token ids holds '\(literal)' at index \(i), \(why)")
            }
            var ids: [Int] = []
            ids.reserveCapacity(array.count)
            for (i, v) in array.enumerated() {
                guard let n = v as? NSNumber else { throw refuse(i, written(i, v), "not an integer") }
                switch UInt8(bitPattern: n.objCType.pointee) {
                case UInt8(ascii: "c"): throw refuse(i, written(i, n.boolValue), "not an integer")
                case UInt8(ascii: "i"), UInt8(ascii: "l"), UInt8(ascii: "q"), UInt8(ascii: "s"): ids.append(n.intValue); continue
                default: break
                }
                let literal = written(i, v)
                if let id = Int(literal) { ids.append(id); continue }
                // 1.0 and 1e3 are integers.
                guard let d = Double(literal) ?? Optional(n.doubleValue), d.isFinite, d == d.rounded() else {
                    throw refuse(i, literal, "not an integer")
                }
                guard let id = Int(exactly: d) else { throw refuse(i, literal, "which does not fit in a 64-bit integer") }
                ids.append(id)
            }
            return ids
        }
        let fields = trimmed.split(whereSeparator: { $0 == "," || $0.isWhitespace })
        guard !fields.isEmpty else { return nil }
        var ids: [Int] = []
        ids.reserveCapacity(fields.count)
        for (i, field) in fields.enumerated() {
            if let id = Int(field) { ids.append(id); continue }
            // Only digits, yet no Int: token ids, one too large (not text to tokenize).
            let digits = field.first == "-" ? field.dropFirst() : field[...]
            if !digits.isEmpty && fields.allSatisfy({ f in (f.first == "-" ? f.dropFirst() : f[...]).allSatisfy { $0.isASCII && $0.isNumber } && f != "-" }) {
                throw PruneError.input("\(path): a list of token ids holds '\(field)' at index \(i), which does not fit in a 64-bit integer")
            }
            return nil
        }
        return ids
    }

    /// The top-level elements of a JSON array, as written (trimmed), split at the commas that lie
    /// outside strings and nested arrays or objects.
    static func topLevelElements(of json: String) -> [String] {
        let inner = json.dropFirst().dropLast()
        var parts: [String] = []
        var depth = 0, inString = false, escaped = false
        var current = ""
        for c in inner {
            if inString {
                if escaped { escaped = false } else if c == "\\" { escaped = true } else if c == "\"" { inString = false }
            } else {
                switch c {
                case "\"": inString = true
                case "[", "{": depth += 1
                case "]", "}": depth -= 1
                case "," where depth == 0:
                    parts.append(current.trimmingCharacters(in: .whitespacesAndNewlines))
                    current = ""
                    continue
                default: break
                }
            }
            current.append(c)
        }
        parts.append(current.trimmingCharacters(in: .whitespacesAndNewlines))
        return parts
    }
}
