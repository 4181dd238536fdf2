import Foundation

/// A shard of documents as C4 and the Pile ship them: one JSON object a line, its document in
/// the string field `text` (other fields, such as C4's `url` and `timestamp`, are ignored);
/// gzip-compressed or not. Blank lines are skipped; every other line must be such an object,
/// and is checked when the shard is read, so a damaged line anywhere is reported (file, line,
/// what was expected) before any work, as the references' loader reports it.
public struct DocumentShard: Sendable {
    public let path: String
    /// The decompressed bytes.
    let bytes: [UInt8]
    /// Byte range and 1-based line number of each document.
    let ranges: [Range<Int>]
    let lines: [Int]

    public var count: Int { ranges.count }
    /// The file's line (1-based) that holds document `index`.
    public func line(of index: Int) -> Int { lines[index] }

    /// Whether `path` names a JSON-lines shard: `*.jsonl`, `*.jsonl.gz`, or `*.json.gz` (C4's
    /// own names, `c4-train.00000-of-01024.json.gz`). Any other file is calibration text or
    /// token ids.
    public static func isShardName(_ path: String) -> Bool {
        let name = (path as NSString).lastPathComponent.lowercased()
        return name.hasSuffix(".jsonl") || name.hasSuffix(".jsonl.gz") || name.hasSuffix(".json.gz")
    }

    /// Names of compressed shards Topiary does not read (the Pile's `*.jsonl.zst`), with what to do.
    public static func unsupportedCompression(_ path: String) -> String? {
        let name = (path as NSString).lastPathComponent.lowercased()
        if name.hasSuffix(".jsonl.zst") || name.hasSuffix(".json.zst") {
            return "\(path): zstd-compressed shards are not read; decompress it first (zstd -d \((path as NSString).lastPathComponent)) and pass the .jsonl, or recompress it with gzip"
        }
        if name.hasSuffix(".jsonl.xz") || name.hasSuffix(".jsonl.bz2") || name.hasSuffix(".jsonl.zip") {
            return "\(path): only gzip-compressed (.gz) or plain .jsonl shards are read; decompress it first"
        }
        return nil
    }

    /// Reads the shard at `path` (gunzipped when it starts with gzip's magic bytes; a name
    /// ending in .gz must).
    public static func read(path: String) throws -> DocumentShard {
        var isDirectory: ObjCBool = false
        if FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory), isDirectory.boolValue {
            throw CalibrationFileError("\(path): is a directory, expected a JSON-lines shard (.jsonl or .jsonl.gz)")
        }
        let data: Data
        do { data = try Data(contentsOf: URL(fileURLWithPath: path), options: .alwaysMapped) } catch {
            throw CalibrationFileError("\(path): cannot read calibration file (missing or not readable)")
        }
        let bytes: [UInt8]
        if Gzip.hasMagic(data) {
            bytes = try Gzip.decompress(data, path: path)
        } else if path.lowercased().hasSuffix(".gz") {
            throw CalibrationFileError("\(path): the name ends in .gz but the file is not gzip data (it does not start with the magic bytes 1f 8b)")
        } else {
            bytes = [UInt8](data)
        }
        return try DocumentShard(bytes: bytes, path: path)
    }

    /// Splits and checks decompressed shard bytes.
    public init(bytes: [UInt8], path: String) throws {
        self.path = path
        self.bytes = bytes
        var ranges: [Range<Int>] = []
        var lines: [Int] = []
        let decoder = JSONDecoder()
        var start = 0
        // A UTF-8 byte-order mark at the very start is not part of the first document's JSON.
        if bytes.starts(with: [0xEF, 0xBB, 0xBF]) { start = 3 }
        var line = 1
        while start < bytes.count {
            let end = bytes[start...].firstIndex(of: 0x0A) ?? bytes.count
            let range = start..<end
            if bytes[range].contains(where: { !($0 == 0x20 || $0 == 0x09 || $0 == 0x0D) }) {
                try Self.check(bytes[range], line: line, path: path, decoder: decoder)
                ranges.append(range)
                lines.append(line)
            }
            start = end + 1
            line += 1
        }
        guard !ranges.isEmpty else {
            throw CalibrationFileError("\(path): holds no documents (expected one JSON object a line, with a string field 'text')")
        }
        self.ranges = ranges
        self.lines = lines
    }

    private struct Document: Decodable { let text: String }

    private static func check(_ line: ArraySlice<UInt8>, line number: Int, path: String, decoder: JSONDecoder) throws {
        _ = try decode(line, line: number, path: path, decoder: decoder)
    }

    private static func decode(_ line: ArraySlice<UInt8>, line number: Int, path: String, decoder: JSONDecoder) throws -> String {
        do {
            return try decoder.decode(Document.self, from: Data(line)).text
        } catch let error as DecodingError {
            let prefix = "\(path): line \(number):"
            switch error {
            case .keyNotFound:
                throw CalibrationFileError("\(prefix) the JSON object has no field 'text' (expected the document's text in a string field 'text', as C4 and the Pile have it)")
            case .valueNotFound(_, let context) where context.codingPath.map(\.stringValue) == ["text"]:
                throw CalibrationFileError("\(prefix) field 'text' is null, expected a string")
            case .typeMismatch(_, let context) where context.codingPath.map(\.stringValue) == ["text"]:
                throw CalibrationFileError("\(prefix) field 'text' is not a string (expected the document's text as a JSON string)")
            case .typeMismatch, .valueNotFound:
                throw CalibrationFileError("\(prefix) is not a JSON object (expected one object a line, with a string field 'text'); it starts \(snippet(line))")
            default:
                throw CalibrationFileError("\(prefix) is not valid JSON (expected one JSON object a line, with a string field 'text'); it starts \(snippet(line))")
            }
        }
    }

    /// The first characters of a line, quoted, for messages.
    static func snippet(_ line: ArraySlice<UInt8>) -> String {
        let text = String(decoding: line.prefix(60), as: UTF8.self)
        let escaped = text.unicodeScalars.map { $0.value < 0x20 ? "\\u{\(String($0.value, radix: 16))}" : String($0) }.joined()
        return "'\(escaped)\(line.count > 60 ? "..." : "")'"
    }

    /// The text of document `index` (0-based, blank lines not counted).
    public func text(_ index: Int) throws -> String {
        try Self.decode(bytes[ranges[index]], line: lines[index], path: path, decoder: JSONDecoder())
    }
}

/// Windows drawn from a shard as the SparseGPT and Wanda scripts draw them from C4 (their
/// `get_c4`): after `random.seed(seed)`, for each sample, draw a document with
/// `random.randint(0, documents - 1)` and tokenize it (with the tokenizer's default special
/// tokens), again until one has more tokens than the window; then the window starts at
/// `random.randint(0, tokens - seqlen - 1)`. Python's Mersenne Twister (`PythonRandom`) makes
/// the draws those of CPython.
public struct DocumentWindows: Sendable {
    public var windows: [[Int]]
    /// For each window, the document it came from (0-based, blank lines not counted) and its first token.
    public var sources: [(document: Int, start: Int)]
    /// Documents drawn, the rejected ones included.
    public var draws: Int
    /// Documents in the shard.
    public var documents: Int

    /// `tokenize` encodes a document's text. A shard whose documents are all too short is
    /// reported, never sampled forever: once a window has been missed as many times in a row
    /// as there are documents, every document not yet tokenized is tokenized to settle it.
    public static func sample(shard: DocumentShard, samples: Int, sequenceLength: Int, seed: Int,
                              tokenize: (String) -> [Int]) throws -> DocumentWindows {
        guard samples > 0 else { throw PruneError.invalidOption("--calib-samples must be at least 1") }
        guard sequenceLength >= 1 else { throw PruneError.invalidOption("--calib-seqlen must be at least 1") }
        let n = shard.count
        // Token counts of the documents seen so far (-1: not tokenized yet); the long enough
        // ones' tokens are kept, as they may be drawn again.
        var lengths = [Int](repeating: -1, count: n)
        var kept: [Int: [Int]] = [:]
        var known = 0, longEnough = 0
        func tokens(_ i: Int) throws -> [Int]? {
            if lengths[i] >= 0 && lengths[i] <= sequenceLength { return nil }
            if let t = kept[i] { return t }
            let t = tokenize(try shard.text(i))
            lengths[i] = t.count
            known += 1
            guard t.count > sequenceLength else { return nil }
            longEnough += 1
            kept[i] = t
            return t
        }
        func noneLongEnough() -> CalibrationFileError {
            let longest = lengths.indices.max { lengths[$0] < lengths[$1] }!
            return CalibrationFileError("\(shard.path): no document is longer than the window: the C4 sampler takes each window from a document of more than \(sequenceLength) tokens (--calib-seqlen \(sequenceLength)), and the longest of the \(n) documents has \(lengths[longest]) tokens (line \(shard.line(of: longest))); lower --calib-seqlen or use a shard with longer documents")
        }
        var random = PythonRandom(seed: seed)
        var result = DocumentWindows(windows: [], sources: [], draws: 0, documents: n)
        result.windows.reserveCapacity(samples)
        for _ in 0..<samples {
            var misses = 0
            while true {
                let i = random.randint(0, n - 1)
                result.draws += 1
                if let t = try tokens(i) {
                    let start = random.randint(0, t.count - sequenceLength - 1)
                    result.windows.append(Array(t[start..<(start + sequenceLength)]))
                    result.sources.append((i, start))
                    break
                }
                misses += 1
                if misses >= n && known < n {
                    // Settle whether any document is long enough (the draws are unchanged:
                    // tokenizing consumes no random numbers).
                    for j in 0..<n where lengths[j] < 0 { _ = try tokens(j) }
                }
                if known == n && longEnough == 0 { throw noneLongEnough() }
            }
        }
        return result
    }
}
