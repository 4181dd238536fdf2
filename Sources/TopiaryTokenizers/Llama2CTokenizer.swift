import Foundation

/// The tokenizer of llama2.c (`tokenizer.bin`): SentencePiece pieces with their scores, spaces already as " ".
///
/// File: int32 max_token_length, then per token float32 score, int32 byte length, the bytes. Encoding follows
/// llama2.c's `encode`: optional BOS, a " " token in front of non-empty text, each code point as its token or
/// as byte tokens (byte + 3), then repeatedly the adjacent pair whose concatenation is the token with the highest
/// score is merged (leftmost on ties).
public final class Llama2CTokenizer: Tokenizer {
    public let path: String
    /// Token bytes by id.
    let pieces: [[UInt8]]
    let scores: [Float]
    public let maxTokenLength: Int
    /// Pair → merged token, ranked by score (highest first), so the generic lowest-rank merger does llama2.c's loop.
    let merges: MergeTable
    /// Tokens of exactly one code point, by scalar value.
    let scalarIDs: [UInt32: Int32]
    let spaceID: Int32

    public let vocabularySize: Int
    public let bosID: Int? = 1
    public let eosID: Int? = 2
    public let addsBOS = true

    static let unknownID = 0
    /// Byte b is token b + 3 (after <unk>, BOS, EOS).
    static let byteOffset = 3

    public init(path: String, vocabularySize: Int) throws {
        self.path = path
        guard vocabularySize > Self.byteOffset + 256 else {
            throw TokenizerError.invalidValue(path: path, field: "vocabularySize (from the model header)",
                                              expected: "more than 259 (3 special + 256 byte tokens)", found: "\(vocabularySize)")
        }
        let data: Data
        do {
            data = try Data(contentsOf: URL(fileURLWithPath: path))
        } catch {
            throw TokenizerError.unreadable(path: path, detail: error.localizedDescription)
        }
        let bytes = [UInt8](data)
        var offset = 0
        func need(_ n: Int, _ field: @autoclosure () -> String) throws {
            guard n <= bytes.count - offset else {
                throw TokenizerError.truncated(path: path, field: field(), offset: offset, needed: n, available: bytes.count - offset)
            }
        }
        func readUInt32() -> UInt32 {
            let v = UInt32(bytes[offset]) | UInt32(bytes[offset + 1]) << 8 | UInt32(bytes[offset + 2]) << 16
                | UInt32(bytes[offset + 3]) << 24
            offset += 4
            return v
        }
        try need(4, "max_token_length")
        let maxLength = Int(Int32(bitPattern: readUInt32()))
        guard maxLength > 0 else {
            throw TokenizerError.invalidValue(path: path, field: "max_token_length", expected: "a positive length", found: "\(maxLength)")
        }
        maxTokenLength = maxLength
        // Every token takes at least 8 bytes (score and length): no more is reserved than the
        // file can hold, whatever vocabulary size the model's header claims.
        let room = (bytes.count - offset) / 8
        var pieces: [[UInt8]] = []
        var scores: [Float] = []
        pieces.reserveCapacity(min(vocabularySize, room))
        scores.reserveCapacity(min(vocabularySize, room))
        for id in 0..<vocabularySize {
            try need(8, "score and length of token \(id) of \(vocabularySize)")
            scores.append(Float(bitPattern: readUInt32()))
            let length = Int(Int32(bitPattern: readUInt32()))
            guard length >= 0, length <= maxLength else {
                throw TokenizerError.invalidValue(path: path, field: "length of token \(id)",
                                                  expected: "0...\(maxLength) (max_token_length)", found: "\(length)")
            }
            try need(length, "bytes of token \(id)")
            pieces.append(Array(bytes[offset..<(offset + length)]))
            offset += length
        }
        self.pieces = pieces
        self.scores = scores
        self.vocabularySize = vocabularySize

        // llama2.c looks strings up in a sorted copy of the vocabulary; for a string held by several ids take the first.
        var ids: [[UInt8]: Int32] = [:]
        for (id, p) in pieces.enumerated() where ids[p] == nil { ids[p] = Int32(id) }
        var scalarIDs: [UInt32: Int32] = [:]
        for (p, id) in ids {
            let scalars = String(decoding: p, as: UTF8.self).unicodeScalars
            if scalars.count == 1, Array(scalars.first!.utf8) == p { scalarIDs[scalars.first!.value] = id }
        }
        self.scalarIDs = scalarIDs
        spaceID = ids[[0x20]] ?? Int32(0x20 + Self.byteOffset)

        // Every way to cut each token into two tokens is a pair that merges into it. llama2.c only merges into
        // tokens scoring above -1e10; equal scores share a rank, so the leftmost pair wins as in its scan.
        // The cuts are found with two tries (of the tokens, and of the tokens reversed) walked
        // along each token from either end, so loading takes time linear in the file's size
        // (looking up every prefix and suffix as a string would be quadratic in a token's length).
        let rankOfScore = Self.ranks(of: scores)
        var forward = ByteTrie(), backward = ByteTrie()
        for (p, id) in ids {
            forward.insert(p, id: id)
            backward.insert(p.reversed(), id: id)
        }
        var table = MergeTable()
        var prefixID: [Int32] = [], suffixID: [Int32] = []
        for (id, p) in pieces.enumerated() where p.count >= 2 && ids[p] == Int32(id) {
            guard let rank = rankOfScore[id] else { continue }
            // prefixID[cut]: the token p[..<cut] (-1 when none); suffixID[cut]: the token p[cut...].
            prefixID.removeAll(keepingCapacity: true)
            prefixID.append(contentsOf: repeatElement(-1, count: p.count + 1))
            suffixID.removeAll(keepingCapacity: true)
            suffixID.append(contentsOf: repeatElement(-1, count: p.count + 1))
            forward.walk(p) { depth, token in prefixID[depth] = token }
            backward.walk(p.reversed()) { depth, token in suffixID[p.count - depth] = token }
            for cut in 1..<p.count where prefixID[cut] >= 0 && suffixID[cut] >= 0 {
                table.add(left: prefixID[cut], right: suffixID[cut], rank: rank, result: Int32(id))
            }
        }
        merges = table
    }

    /// Rank of each token's score among all scores, highest first; nil for scores llama2.c never merges into.
    private static func ranks(of scores: [Float]) -> [Int32?] {
        let usable = Set(scores.filter { $0 > -1e10 }).sorted(by: >)
        var rank: [Float: Int32] = [:]
        for (k, s) in usable.enumerated() { rank[s] = Int32(k) }
        return scores.map { $0 > -1e10 ? rank[$0] : nil }
    }

    public func encode(_ text: String, addBOS: Bool?) -> [Int] {
        var symbols: [Int32] = []
        symbols.reserveCapacity(text.utf8.count + 2)
        if addBOS ?? addsBOS { symbols.append(Int32(bosID!)) }
        if !text.isEmpty { symbols.append(spaceID) }
        for s in text.unicodeScalars {
            if let id = scalarIDs[s.value] {
                symbols.append(id)
            } else {
                for b in s.utf8 { symbols.append(Int32(b) + Int32(Self.byteOffset)) }
            }
        }
        var workspace = MergeWorkspace()
        mergePairs(&symbols, table: merges, workspace: &workspace)
        return symbols.map(Int.init)
    }

    /// BOS, EOS and <unk> produce nothing (with `skipSpecialTokens`, else "<s>", "</s>", "<unk>", the names the
    /// exported tokenizer.json gives them); the first piece (at the start or after BOS) loses one leading space,
    /// the dummy prefix; `<0xXX>` pieces are raw bytes; ids out of range are skipped.
    public func decode(_ ids: [Int], skipSpecialTokens: Bool) -> String {
        var out: [UInt8] = []
        var atStart = true
        for id in ids {
            guard id >= 0, id < vocabularySize else { continue }
            if id == bosID {
                if !skipSpecialTokens { out.append(contentsOf: "<s>".utf8) }
                atStart = true
                continue
            }
            if id == eosID || id == Self.unknownID {
                if !skipSpecialTokens { out.append(contentsOf: (id == eosID ? "</s>" : "<unk>").utf8) }
                continue
            }
            var piece = pieces[id][...]
            if atStart, piece.first == 0x20 { piece = piece.dropFirst() }
            atStart = false
            if let b = byteTokenValue(String(decoding: piece, as: UTF8.self)) {
                out.append(b)
            } else {
                out.append(contentsOf: piece)
            }
        }
        return String(decoding: out, as: UTF8.self)
    }

    /// A SentencePiece style BPE tokenizer.json with byte fallback: spaces as "▁" (normalizer Prepend("▁") and
    /// Replace(" ", "▁")), and for each token, in order of decreasing score, a merge for every way to cut it into two
    /// tokens, so that lowest-rank-first BPE makes the same choices as llama2.c's highest-score-first loop.
    /// (They differ only where two different tokens have equal scores and their pairs overlap; llama2.c takes the
    /// leftmost, BPE the one listed first. Literal "<s>", "</s>" or "<unk>" in text also become special tokens.)
    public func huggingFaceJSON() throws -> Data {
        let specialNames = [Self.unknownID: "<unk>", bosID!: "<s>", eosID!: "</s>"]
        var names: [String?] = []
        var used = Set<String>()
        for (id, p) in pieces.enumerated() {
            var name: String
            if let special = specialNames[id] {
                name = special
            } else if let s = String(validating: p, as: UTF8.self) {
                name = s.replacingOccurrences(of: " ", with: "\u{2581}")
            } else {
                name = "<invalid_utf8_\(id)>"  // cannot occur in encodings: no text produces invalid UTF-8
            }
            if used.contains(name) { name = "<duplicate_\(id)>" }  // a JSON vocab holds each string once
            used.insert(name)
            names.append(name)
        }
        var mergeEntries: [(rank: Int32, result: Int32, cut: Int, pair: (String, String))] = []
        let lengths = pieces.map(\.count)
        for (key, m) in merges.entries {
            let l = Int(Int32(truncatingIfNeeded: key >> 32)), r = Int(Int32(truncatingIfNeeded: key & 0xFFFF_FFFF))
            guard let a = names[l], let b = names[r], specialNames[l] == nil, specialNames[r] == nil,
                  specialNames[Int(m.result)] == nil else { continue }
            mergeEntries.append((m.rank, m.result, lengths[l], (a, b)))
        }
        mergeEntries.sort { ($0.rank, $0.result, $0.cut) < ($1.rank, $1.result, $1.cut) }
        let model = BPEModel(tokens: names, merges: mergeEntries.map(\.pair), byteFallback: true, unknownToken: "<unk>",
                             fuseUnknown: true, ignoreMerges: false)
        let added = specialNames.sorted { $0.key < $1.key }.map { id, name in
            AddedToken(id: Int32(id), content: name, scalars: [UInt32](scalarsOf: name), special: true)
        }
        let pipeline = BPEPipeline(
            model: model, addedTokens: added,
            normalizers: [.prepend("\u{2581}"), .replace(.literal(" "), content: "\u{2581}")],
            preTokenizers: [],
            decoders: [.replace(.literal("\u{2581}"), content: " "), .byteFallback, .fuse, .strip(content: " ", start: 1, stop: 0)],
            prefixIDs: [Int32(bosID!)], suffixIDs: [], bosID: Int32(bosID!), eosID: Int32(eosID!))
        return pipeline.huggingFaceJSON().serialized()
    }
}

/// A trie of byte strings, each ending at a node that holds its token id: finds, in one walk
/// along a string, every prefix of it that is a token.
struct ByteTrie {
    /// Edge (node << 8 | byte) -> child node.
    private var edges: [UInt64: Int32] = [:]
    /// Token id ending at each node (-1 where none); node 0 is the root.
    private var tokens: [Int32] = [-1]

    mutating func insert<S: Sequence<UInt8>>(_ bytes: S, id: Int32) {
        var node: Int32 = 0
        for b in bytes {
            let key = UInt64(node) << 8 | UInt64(b)
            if let next = edges[key] {
                node = next
            } else {
                let next = Int32(tokens.count)
                tokens.append(-1)
                edges[key] = next
                node = next
            }
        }
        if tokens[Int(node)] < 0 { tokens[Int(node)] = id }
    }

    /// Calls `found(depth, id)` for every non-empty prefix of `bytes` that is a token, shortest first.
    func walk<S: Sequence<UInt8>>(_ bytes: S, _ found: (Int, Int32) -> Void) {
        var node: Int32 = 0
        var depth = 0
        for b in bytes {
            guard let next = edges[UInt64(node) << 8 | UInt64(b)] else { return }
            node = next
            depth += 1
            let token = tokens[Int(node)]
            if token >= 0 { found(depth, token) }
        }
    }
}
