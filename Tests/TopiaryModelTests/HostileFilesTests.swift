import Foundation
import XCTest
import TopiaryTensor
import TopiaryTestSupport
@testable import TopiaryModel

/// A GGUF writer that writes whatever it is told, impossible values included: metadata of any
/// integer or float type, tensors with any dimensions, a chosen alignment.
struct RawGGUF {
    enum Value {
        case u32(UInt32), i32(Int32), u64(UInt64), f32(Float), f64(Double), string(String), bool(Bool), strings([String])
    }
    struct Tensor {
        var name: String
        /// Outermost first.
        var dims: [UInt64]
        var type: UInt32 = 0
        var values: [Float] = []
        /// The data offset written for the tensor (nil: where the writer puts its data).
        var offset: UInt64? = nil
        /// Bytes written as the tensor's data instead of `values` as F32 (another type's blocks).
        var raw: [UInt8]? = nil

        var data: [UInt8] { raw ?? values.flatMap { withUnsafeBytes(of: $0.bitPattern.littleEndian, Array.init) } }
    }
    var metadata: [(String, Value)] = []
    var tensors: [Tensor] = []
    var alignment = 32

    mutating func set(_ key: String, _ v: Value) {
        metadata.removeAll { $0.0 == key }
        metadata.append((key, v))
    }

    /// A tiny llama (hidden 8, 2 heads, ffn 16, vocab 16) with `blocks` blocks of tensors.
    static func llama(blocks: Int = 2, blockCount: Value? = nil) -> RawGGUF {
        var g = RawGGUF()
        let h = 8, ffn = 16, vocab = 16
        for (k, v) in [("general.architecture", Value.string("llama")), ("llama.embedding_length", .u32(UInt32(h))),
                       ("llama.block_count", blockCount ?? .u32(UInt32(blocks))), ("llama.feed_forward_length", .u32(UInt32(ffn))),
                       ("llama.attention.head_count", .u32(2)), ("llama.context_length", .u32(32)),
                       ("llama.attention.layer_norm_rms_epsilon", .f32(1e-5)), ("llama.rope.freq_base", .f32(10000)),
                       ("llama.vocab_size", .u32(UInt32(vocab)))] {
            g.set(k, v)
        }
        var r = SplitMix(seed: 3)
        func t(_ name: String, _ shape: [Int]) -> Tensor {
            Tensor(name: name, dims: shape.map(UInt64.init), values: (0..<shape.reduce(1, *)).map { _ in r.uniform() * 0.1 })
        }
        g.tensors.append(t("token_embd.weight", [vocab, h]))
        for i in 0..<blocks {
            g.tensors += [t("blk.\(i).attn_norm.weight", [h]), t("blk.\(i).attn_q.weight", [h, h]), t("blk.\(i).attn_k.weight", [h, h]),
                          t("blk.\(i).attn_v.weight", [h, h]), t("blk.\(i).attn_output.weight", [h, h]), t("blk.\(i).ffn_norm.weight", [h]),
                          t("blk.\(i).ffn_gate.weight", [ffn, h]), t("blk.\(i).ffn_up.weight", [ffn, h]), t("blk.\(i).ffn_down.weight", [h, ffn])]
        }
        g.tensors += [t("output_norm.weight", [h]), t("output.weight", [vocab, h])]
        return g
    }

    func bytes() -> [UInt8] {
        var out: [UInt8] = []
        func put<T: FixedWidthInteger>(_ v: T) { withUnsafeBytes(of: v.littleEndian) { out.append(contentsOf: $0) } }
        func put(_ s: String) {
            put(UInt64(s.utf8.count))
            out.append(contentsOf: Array(s.utf8))
        }
        out += Array("GGUF".utf8)
        put(UInt32(3))
        put(UInt64(tensors.count))
        put(UInt64(metadata.count))
        for (k, v) in metadata {
            put(k)
            switch v {
            case .u32(let x): put(UInt32(4)); put(x)
            case .i32(let x): put(UInt32(5)); put(x)
            case .f32(let x): put(UInt32(6)); put(x.bitPattern)
            case .bool(let x): put(UInt32(7)); out.append(x ? 1 : 0)
            case .string(let x): put(UInt32(8)); put(x)
            case .u64(let x): put(UInt32(10)); put(x)
            case .f64(let x): put(UInt32(12)); put(x.bitPattern)
            case .strings(let xs): put(UInt32(9)); put(UInt32(8)); put(UInt64(xs.count)); for x in xs { put(x) }
            }
        }
        let a = max(alignment, 1)
        for (t, offset) in zip(tensors, dataOffsets()) {
            put(t.name)
            put(UInt32(t.dims.count))
            for d in t.dims.reversed() { put(d) }
            put(t.type)
            put(t.offset ?? offset)
        }
        while out.count % a != 0 { out.append(0) }
        for t in tensors {
            out += t.data
            while out.count % a != 0 { out.append(0) }
        }
        return out
    }

    /// Where the writer puts each tensor's data in the data section: one after another, each
    /// padded to the alignment.
    func dataOffsets() -> [UInt64] {
        let a = UInt64(max(alignment, 1))
        var offset: UInt64 = 0
        return tensors.map { t in
            defer { offset += (UInt64(t.data.count) + a - 1) / a * a }
            return offset
        }
    }

    /// The index of tensor `name`.
    func index(_ name: String) -> Int { tensors.firstIndex { $0.name == name }! }
}

/// Hostile and careless files: every one is refused with one line naming the file and the field
/// or tensor and what was expected, quickly, without a trap or a large allocation.
final class HostileFilesTests: XCTestCase {
    func write(_ bytes: [UInt8], _ name: String = "model.gguf") throws -> String {
        let url = try makeTemporaryDirectory("topiary-hostile").appendingPathComponent(name)
        try Data(bytes).write(to: url)
        return url.path
    }

    /// Opening `path` fails within `seconds` with one line that contains every word.
    func refused(_ path: String, naming words: [String], seconds: Double = 5, file: StaticString = #filePath, line: UInt = #line) {
        let start = Date()
        do {
            _ = try LanguageModel.open(path: path)
            XCTFail("accepted \(path)", file: file, line: line)
        } catch {
            let message = "\(error)"
            XCTAssertFalse(message.contains("\n"), message, file: file, line: line)
            XCTAssertTrue(message.hasPrefix(path), "does not name the file: \(message)", file: file, line: line)
            for w in words { XCTAssertTrue(message.contains(w), "'\(message)' does not name \(w)", file: file, line: line) }
        }
        XCTAssertLessThan(Date().timeIntervalSince(start), seconds, "took too long", file: file, line: line)
    }

    func testTheRawWriterMakesAValidModel() throws {
        let model = try LanguageModel.open(path: try write(RawGGUF.llama().bytes()))
        XCTAssertEqual(model.config.layerCount, 2)
        XCTAssertTrue(try Perplexity.evaluate(model: model, tokens: Array(0..<16), sequenceLength: 8).perplexity.isFinite)
    }

    // MARK: Shapes and offsets

    func testDimensionsWhoseProductOverflowAreRefused() throws {
        var g = RawGGUF.llama()
        g.tensors[1].dims = [1 << 32, 1 << 32]
        refused(try write(g.bytes()), naming: ["blk.0.attn_norm.weight", "shape", "[4294967296, 4294967296]"])
        // A zero dimension does not hide two huge ones.
        g = RawGGUF.llama()
        g.tensors[1].dims = [0, 1 << 40, 1 << 40]
        refused(try write(g.bytes()), naming: ["blk.0.attn_norm.weight", "shape"])
        // A dimension past 2^40.
        g = RawGGUF.llama()
        g.tensors[1].dims = [UInt64.max]
        refused(try write(g.bytes()), naming: ["blk.0.attn_norm.weight", "dimension 0", "18446744073709551615"])
    }

    func testTensorPastTheEndAndHugeOffsetsAreRefused() throws {
        var g = RawGGUF.llama()
        g.tensors[2].dims = [1 << 20, 8]  // 32 MiB in a small file
        refused(try write(g.bytes()), naming: ["blk.0.attn_q.weight", "past the end of the file"])
    }

    /// Every tensor's data offset is a multiple of the file's alignment (general.alignment, else
    /// 32) and lies inside the file, also for a tensor whose type this reader does not decode.
    func testTensorOffsetsMustBeAlignedAndInsideTheFile() throws {
        // tensors[2] is blk.0.attn_q.weight (its data is at offset 544).
        var g = RawGGUF.llama()
        g.tensors[2].offset = 68
        refused(try write(g.bytes()), naming: ["blk.0.attn_q.weight", "data offset 68", "multiple of the alignment 32", "general.alignment is absent"])
        // A multiple of 32, but not of the file's own alignment.
        g = RawGGUF.llama()
        g.set("general.alignment", .u32(64))
        g.alignment = 64
        g.tensors[2].offset = 160
        refused(try write(g.bytes()), naming: ["blk.0.attn_q.weight", "data offset 160", "multiple of the alignment 64"])
        // Aligned, but past the end of the file, or past every address.
        for offset: UInt64 in [1 << 20, 1 << 62, UInt64.max - 31] {
            g = RawGGUF.llama()
            g.tensors[2].offset = offset
            refused(try write(g.bytes()), naming: ["blk.0.attn_q.weight", "past the end of the file"])
        }
        // A type this reader does not decode (Q4_K) is still placed: misaligned, or past the end.
        for (offset, words) in [(UInt64(40), ["data offset 40", "multiple of the alignment 32"]), (1 << 40, ["past the end of the file"])] {
            g = RawGGUF.llama()
            g.tensors[g.tensors.count - 1].type = 12
            g.tensors[g.tensors.count - 1].offset = offset
            refused(try write(g.bytes()), naming: ["output.weight"] + words)
        }
        // An unsupported tensor of whole Q4_K blocks where it belongs: the file opens (the tensor
        // is refused when used).
        g = RawGGUF.llama()
        g.tensors[g.tensors.count - 1].type = 12
        g.tensors[g.tensors.count - 1].dims = [32, 8]
        g.tensors[g.tensors.count - 1].raw = [UInt8](repeating: 0, count: 144)
        let gguf = try GGUFFile(path: try write(g.bytes()))
        XCTAssertEqual(gguf.unsupportedTensors["output.weight"], "Q4_K")
        // A type whose size is unknown (99), or a Q4_K tensor of a part block: its extent, and so
        // its neighbours', cannot be checked, and the file is refused naming it.
        for (type, name) in [(UInt32(99), "ggml type 99"), (12, "Q4_K")] {
            g = RawGGUF.llama()
            g.tensors[g.tensors.count - 1].type = type
            refused(try write(g.bytes()), naming: ["output.weight", "unsupported type \(name)"])
        }
    }

    // MARK: Tensor extents

    /// The tensors tile the data section: the first at 0, each next one where the one before
    /// ends (rounded up to the alignment), nothing after the last but padding. Anything else is a
    /// tensor read from another's bytes, or bytes no tensor owns, and is refused naming both.
    func testOverlappingTensorsAreRefused() throws {
        let clean = RawGGUF.llama()
        let offsets = clean.dataOffsets()
        let down = clean.index("blk.0.ffn_down.weight")
        // On top of token_embd, inside ffn_up (its neighbour before), and 32 bytes late.
        var g = clean
        g.tensors[down].offset = 0
        refused(try write(g.bytes()), naming: ["'blk.0.ffn_down.weight' at data offset 0 overlaps tensor 'token_embd.weight'",
                                               "512 bytes at data offset 0", "expected 'blk.0.ffn_down.weight' at data offset 512"])
        g = clean
        g.tensors[down].offset = offsets[down] - 32
        refused(try write(g.bytes()), naming: ["'blk.0.ffn_down.weight' at data offset \(offsets[down] - 32) overlaps tensor 'blk.0.ffn_up.weight'",
                                               "expected 'blk.0.ffn_down.weight' at data offset \(offsets[down])"])
        g = clean
        g.tensors[down].offset = offsets[down] + 32
        refused(try write(g.bytes()), naming: ["'blk.0.ffn_up.weight'", "ends at \(offsets[down])", "'blk.0.ffn_down.weight' is at data offset \(offsets[down] + 32)",
                                               "expected it at \(offsets[down])", "32 bytes between belong to no tensor"])
        // The data section starting with bytes that belong to no tensor.
        g = clean
        g.tensors[0].offset = offsets[1]
        g.tensors[1].offset = offsets[1] - 32
        refused(try write(g.bytes()), naming: ["first tensor", "'blk.0.attn_norm.weight'", "data offset \(offsets[1] - 32)", "expected 0"])
    }

    func testATypeThatDisagreesWithTheDataIsRefused() throws {
        // F32 -> F16: the tensor takes half its bytes, and a gap is left before the next one.
        var g = RawGGUF.llama()
        let gate = g.index("blk.0.ffn_gate.weight")
        g.tensors[gate].type = 1
        let offsets = g.dataOffsets()
        refused(try write(g.bytes()), naming: ["'blk.0.ffn_gate.weight' (F16, shape [16, 8], 256 bytes at data offset \(offsets[gate]))",
                                               "next tensor 'blk.0.ffn_up.weight' is at data offset \(offsets[gate + 1])",
                                               "expected it at \(offsets[gate] + 256)"])
        // F16 data described as F32: the tensor runs into its neighbour.
        g = RawGGUF.llama()
        g.tensors[0].raw = g.tensors[0].values.flatMap { withUnsafeBytes(of: HalfPrecision.floatToFP16($0).littleEndian, Array.init) }
        g.tensors[0].type = 1
        XCTAssertNoThrow(try GGUFFile(path: try write(g.bytes())), "the F16 embedding as written")
        g.tensors[0].type = 0
        refused(try write(g.bytes()), naming: ["'blk.0.attn_norm.weight' at data offset 256 overlaps tensor 'token_embd.weight' (F32, shape [16, 8], 512 bytes at data offset 0)"])
        // Q8_0 blocks described as Q4_0: a gap.
        g = RawGGUF.llama()
        g.tensors[0].raw = [UInt8](repeating: 0, count: 4 * 34)
        g.tensors[0].type = 8
        XCTAssertNoThrow(try GGUFFile(path: try write(g.bytes())), "the Q8_0 embedding as written")
        g.tensors[0].type = 2
        refused(try write(g.bytes()), naming: ["'token_embd.weight' (Q4_0, shape [16, 8], 72 bytes at data offset 0) ends at 72", "expected it at 96"])
    }

    func testTheLastTensorPastTheEndOfTheFileIsRefused() throws {
        // The last tensor's F16 data described as F32: 256 bytes past the end.
        var g = RawGGUF.llama()
        let last = g.tensors.count - 1
        g.tensors[last].raw = g.tensors[last].values.flatMap { withUnsafeBytes(of: HalfPrecision.floatToFP16($0).littleEndian, Array.init) }
        g.tensors[last].type = 1
        XCTAssertNoThrow(try GGUFFile(path: try write(g.bytes())), "the F16 head as written")
        g.tensors[last].type = 0
        refused(try write(g.bytes()), naming: ["'output.weight'", "past the end of the file"])
        // A larger shape for the last tensor.
        g = RawGGUF.llama()
        g.tensors[last].dims = [32, 8]
        refused(try write(g.bytes()), naming: ["'output.weight'", "past the end of the file"])
    }

    /// A tensor count one too low: the header ends one description early, so the data section
    /// seems to start early, every tensor is read from the wrong bytes, and the last one's data
    /// is left over at the end; refused, naming the count.
    func testATensorCountTooLowIsRefused() throws {
        let g = RawGGUF.llama()
        var bytes = g.bytes()
        withUnsafeBytes(of: UInt64(g.tensors.count - 1).littleEndian) { bytes.replaceSubrange(8..<16, with: $0) }
        refused(try write(bytes), naming: ["the last tensor in the data section, 'output_norm.weight'", "expected at most 31 bytes of padding",
                                           "is the tensor count \(g.tensors.count - 1) too low?"])
    }

    /// The extents of the real SmolLM2 file (Q8_0, Q4_1 and F32 tensors) pass; its corruptions
    /// that once opened, evaluated to a wrong perplexity or converted with a tensor missing do not.
    func testSmolLM2CorruptedDescriptionsAreRefused() throws {
        let source = TestAssets.smolLM2
        guard FileManager.default.fileExists(atPath: source) else { throw MissingAsset(source) }
        let original = try Data(contentsOf: URL(fileURLWithPath: source))
        let gguf = try GGUFFile(path: source)
        XCTAssertEqual(gguf.tensorNames.count, 272)
        let dir = try makeTemporaryDirectory("topiary-hostile")
        /// The byte offset of the type field of tensor `name`'s description.
        func typeField(_ name: String) -> Int {
            let key = withUnsafeBytes(of: UInt64(name.utf8.count).littleEndian, Array.init) + Array(name.utf8)
            let at = original.range(of: Data(key))!.upperBound
            return at + 4 + 8 * Int(original[at])
        }
        func corrupted(_ name: String, _ change: (inout Data) -> Void) throws -> String {
            var data = original
            change(&data)
            let path = dir.appendingPathComponent(name).path
            try data.write(to: URL(fileURLWithPath: path))
            return path
        }
        // blk.0.attn_norm.weight F32 -> F16 (eval read it, and every tensor after, from the wrong bytes).
        var path = try corrupted("f16-norm.gguf") { $0[typeField("blk.0.attn_norm.weight")] = 1 }
        assertCheckpointError(try GGUFFile(path: path)) {
            guard case .invalidHeader(path, let d) = $0 else { return false }
            return d.contains("'blk.0.attn_norm.weight' (F16, shape [576], 1152 bytes at data offset 30081024)") && d.contains("'blk.0.ffn_down.weight'")
                && d.contains("expected it at 30082176")
        }
        // The tensor count 272 -> 271: output_norm.weight is not described, and its bytes are left over.
        path = try corrupted("count.gguf") { $0[8] = UInt8(271 & 0xFF) }
        assertCheckpointError(try GGUFFile(path: path)) {
            guard case .invalidHeader(path, let d) = $0 else { return false }
            return d.contains("tensor count 271") && d.contains("'blk.9.attn_v.weight'")
        }
    }

    /// A model without a tensor its head needs is not converted: it used to be written without
    /// its final norm, or without an lm_head of a type this reader cannot decode.
    func testConvertRefusesAModelWithoutItsFinalNormOrWithAnUndecodableHead() throws {
        var g = RawGGUF.llama()
        g.tensors.removeAll { $0.name == "output_norm.weight" }
        var path = try write(g.bytes())
        let out = try makeTemporaryDirectory("topiary-hostile").appendingPathComponent("converted").path
        assertCheckpointError(try HuggingFaceExport.write(model: try LanguageModel.open(path: path), to: out)) {
            $0 == .missingTensor(path: path, tensor: "output_norm.weight")
        }
        XCTAssertFalse(FileManager.default.fileExists(atPath: out), "wrote \(out)")
        // An lm_head of whole Q5_0 blocks: the file opens, the head is refused, not left out.
        g = RawGGUF.llama()
        let head = g.index("output.weight")
        g.tensors[head].type = 6
        g.tensors[head].raw = [UInt8](repeating: 0, count: 4 * 22)
        path = try write(g.bytes())
        assertCheckpointError(try HuggingFaceExport.write(model: try LanguageModel.open(path: path), to: out)) {
            $0 == .unsupportedType(path: path, tensor: "output.weight", type: "Q5_0")
        }
        XCTAssertFalse(FileManager.default.fileExists(atPath: out), "wrote \(out)")
        // The complete model converts.
        XCTAssertNoThrow(try HuggingFaceExport.write(model: try LanguageModel.open(path: try write(RawGGUF.llama().bytes())), to: out))
    }

    /// A GGUF tokenizer's special ids are checked under their GGUF keys, not the tokenizer's
    /// argument names (bosID).
    func testGGUFTokenizerIdsOutsideTheVocabularyAreNamedByTheirKeys() throws {
        func model(_ change: (inout RawGGUF) -> Void) -> RawGGUF {
            var g = RawGGUF.llama()
            g.set("tokenizer.ggml.model", .string("gpt2"))
            g.set("tokenizer.ggml.tokens", .strings(["a", "b", "ab"] + (3..<16).map { "t\($0)" }))
            g.set("tokenizer.ggml.merges", .strings(["a b"]))
            g.set("tokenizer.ggml.bos_token_id", .u32(1))
            change(&g)
            return g
        }
        XCTAssertNotNil(try LanguageModel.open(path: try write(model { _ in }.bytes())).tokenizer)
        refused(try write(model { $0.set("tokenizer.ggml.bos_token_id", .u32(99)) }.bytes()),
                naming: ["tokenizer.ggml.bos_token_id", "99", "0..<16"])
        refused(try write(model { $0.set("tokenizer.ggml.eos_token_id", .i32(-1)) }.bytes()),
                naming: ["tokenizer.ggml.eos_token_id", "-1", "0..<16"])
        refused(try write(model {
            $0.metadata.removeAll { $0.0 == "tokenizer.ggml.bos_token_id" }
            $0.set("tokenizer.ggml.add_bos_token", .bool(true))
        }.bytes()), naming: ["tokenizer.ggml.add_bos_token", "tokenizer.ggml.bos_token_id", "missing"])
    }

    /// A safetensors header entry that is not an object, or an offset or dimension that is not
    /// an integer, is one line naming the file, the tensor and the field.
    func testSafeTensorsFieldsOfTheWrongTypeAreNamed() throws {
        let dir = try makeTemporaryDirectory("topiary-hostile")
        for (i, (entry, words)) in [(#"{"dtype": "F32", "shape": [2], "data_offsets": [304128.5, 304136]}"#, ["data_offsets[0]", "304128.5", "not an integer"]),
                                    (#"{"dtype": "F32", "shape": [2], "data_offsets": [0, 99999999999999999999]}"#, ["data_offsets[1]", "99999999999999999999", "does not fit"]),
                                    (#"{"dtype": "F32", "shape": [true], "data_offsets": [0, 8]}"#, ["shape[0]", "not an integer"]),
                                    (#"{"dtype": 5, "shape": [2], "data_offsets": [0, 8]}"#, ["dtype", "not a string"]),
                                    ("7", ["not an object"]), ("[1, 2]", ["not an object"])].enumerated() {
            let header = #"{"w": \#(entry)}"#
            var bytes = withUnsafeBytes(of: UInt64(header.utf8.count).littleEndian) { Array($0) }
            bytes += Array(header.utf8) + [UInt8](repeating: 0, count: 8)
            let path = dir.appendingPathComponent("\(i).safetensors").path
            try Data(bytes).write(to: URL(fileURLWithPath: path))
            assertCheckpointError(try SafeTensorsFile(path: path)) {
                guard case .invalidHeader(path, let detail) = $0 else { return false }
                let ok = detail.contains("tensor 'w'") && words.allSatisfy(detail.contains) && !detail.contains("Dictionary<")
                    && !detail.contains("numberIsNotRepresentable") && !detail.contains("\n")
                return ok
            }
        }
    }

    func testSafeTensorsShapesThatOverflowAreRefused() throws {
        let dir = try makeTemporaryDirectory("topiary-hostile")
        for (shape, name) in [("[4294967296, 4294967296]", "big"), ("[0, 4611686018427387904, 4611686018427387904]", "zero")] {
            let header = #"{"w": {"dtype": "F32", "shape": \#(shape), "data_offsets": [0, 0]}}"#
            var bytes = withUnsafeBytes(of: UInt64(header.utf8.count).littleEndian) { Array($0) }
            bytes += Array(header.utf8)
            let path = dir.appendingPathComponent("\(name).safetensors").path
            try Data(bytes).write(to: URL(fileURLWithPath: path))
            assertCheckpointError(try SafeTensorsFile(path: path)) {
                guard case .invalidHeader(path, let detail) = $0 else { return false }
                return detail.contains("'w'") && detail.contains("impossibly large")
            }
        }
    }

    // MARK: Counts bounded by the file

    func testBlockCountMinusOneAndHugeAreRefusedQuickly() throws {
        refused(try write(RawGGUF.llama(blockCount: .i32(-1)).bytes()), naming: ["llama.block_count", "-1", "positive"])
        refused(try write(RawGGUF.llama(blockCount: .u32(UInt32(Int32.max))).bytes()), naming: ["llama.block_count", "2147483647", "at most"])
        refused(try write(RawGGUF.llama(blockCount: .u64(UInt64.max)).bytes()), naming: ["llama.block_count", "expected an integer"])
        refused(try write(RawGGUF.llama(blockCount: .u32(0)).bytes()), naming: ["llama.block_count", "0"])
    }

    func testBlockCountThatDisagreesWithTheTensorsIsRefused() throws {
        // One block fewer than the file has (the last would be dropped), one more (missing).
        refused(try write(RawGGUF.llama(blocks: 3, blockCount: .u32(2)).bytes()),
                naming: ["llama.block_count", "is 2", "3 blocks", "blk.0 to blk.2"])
        refused(try write(RawGGUF.llama(blocks: 2, blockCount: .u32(3)).bytes()), naming: ["llama.block_count", "is 3", "2 blocks"])
        // A gap.
        var g = RawGGUF.llama(blocks: 3)
        g.tensors.removeAll { $0.name.hasPrefix("blk.1.") }
        refused(try write(g.bytes()), naming: ["llama.block_count", "blk.1 has none"])
    }

    func testGemmaBlockCountMinusOneDoesNotTrap() throws {
        var g = RawGGUF.llama()
        g.metadata = g.metadata.map { ($0.0.replacingOccurrences(of: "llama.", with: "gemma2."), $0.1) }
        g.set("general.architecture", .string("gemma2"))
        g.set("gemma2.block_count", .i32(-1))
        refused(try write(g.bytes()), naming: ["gemma2.block_count", "-1"])
    }

    func testHeaderCountsBeyondTheFileAreRefused() throws {
        var bytes = RawGGUF.llama().bytes()
        // Tensor count (bytes 8..<16) just under the hard cap: cannot fit in the file.
        withUnsafeBytes(of: UInt64((1 << 24) - 1).littleEndian) { bytes.replaceSubrange(8..<16, with: $0) }
        refused(try write(bytes), naming: ["tensor count 16777215", "cannot fit"])
        // A metadata array claiming more elements than the bytes left can hold.
        var g = RawGGUF.llama()
        g.set("general.name", .string("x"))
        bytes = g.bytes()
        let key = Array("general.name".utf8)
        let at = (0..<bytes.count).first { Array(bytes[$0..<min(bytes.count, $0 + key.count)]) == key }! + key.count
        // Turn the string value into an array of strings of 2^40 elements.
        var patched = Array(bytes[..<at])
        withUnsafeBytes(of: UInt32(9).littleEndian) { patched += $0 }
        withUnsafeBytes(of: UInt32(8).littleEndian) { patched += $0 }
        withUnsafeBytes(of: UInt64(1 << 40).littleEndian) { patched += $0 }
        patched += bytes[(at + 4)...]
        refused(try write(patched), naming: ["general.name", "1099511627776 elements"])
    }

    func testDuplicateTensorsAndKeysAreRefused() throws {
        var g = RawGGUF.llama()
        g.tensors.append(g.tensors[0])
        refused(try write(g.bytes()), naming: ["token_embd.weight", "twice"])
        g = RawGGUF.llama()
        g.metadata.append(("llama.block_count", .u32(2)))
        refused(try write(g.bytes()), naming: ["llama.block_count", "twice"])
    }

    func testConfigJSONLayerCountIsBoundedByTheCheckpoint() throws {
        let dir = try makeTemporaryDirectory("topiary-hostile")
        let fixture = TestAssets.fixture("tiny-llama")
        try FileManager.default.copyItem(atPath: fixture + "/model.safetensors", toPath: dir.path + "/model.safetensors")
        var config = try String(contentsOfFile: fixture + "/config.json", encoding: .utf8)
        for (layers, words) in [("2147483647", ["num_hidden_layers", "2147483647", "at most"]), ("3", ["num_hidden_layers", "is 3", "2 blocks"]),
                                ("1", ["num_hidden_layers", "is 1", "2 blocks"]), ("-1", ["num_hidden_layers", "-1"])] {
            config = config.replacingOccurrences(of: #""num_hidden_layers": [-0-9]+"#, with: "\"num_hidden_layers\": \(layers)", options: .regularExpression)
            try config.write(toFile: dir.path + "/config.json", atomically: true, encoding: .utf8)
            let start = Date()
            do {
                _ = try LanguageModel.open(path: dir.path)
                XCTFail("accepted num_hidden_layers \(layers)")
            } catch {
                let message = "\(error)"
                XCTAssertTrue(message.contains("config.json"), message)
                for w in words { XCTAssertTrue(message.contains(w), "'\(message)' does not name \(w)") }
            }
            XCTAssertLessThan(Date().timeIntervalSince(start), 5)
        }
    }

    func testEmbeddingShapeMustMatchTheConfig() throws {
        var g = RawGGUF.llama()
        g.set("llama.vocab_size", .u32(1 << 20))
        refused(try write(g.bytes()), naming: ["token_embd.weight", "llama.vocab_size 1048576"])
    }

    // MARK: Impossible hyperparameters

    func testNaNNegativeAndZeroHyperparametersAreRefusedByGGUFName() throws {
        let cases: [(String, RawGGUF.Value, [String])] = [
            ("llama.attention.layer_norm_rms_epsilon", .f32(.nan), ["nan", "expected a number"]),
            ("llama.attention.layer_norm_rms_epsilon", .f32(-1e-5), ["-1e-05"]),
            ("llama.attention.layer_norm_rms_epsilon", .f64(.infinity), ["expected a number"]),
            ("llama.rope.freq_base", .f32(0), ["is 0.0", "positive"]),
            ("llama.rope.freq_base", .f32(-10000), ["-10000"]),
            ("llama.rope.freq_base", .f64(1e300), ["inf"]),
            ("llama.attention.head_count", .u32(0), ["is 0"]),
            ("llama.embedding_length", .u32(1 << 30), ["1073741824", "at most"]),
            ("llama.context_length", .string("2048"), ["expected an integer"]),
            ("llama.vocab_size", .u32(0), ["is 0"]),
        ]
        for (key, value, words) in cases {
            var g = RawGGUF.llama()
            g.set(key, value)
            refused(try write(g.bytes()), naming: [key] + words)
        }
    }

    func testAlignmentMustBeAPowerOfTwoAndAMultipleOf8() throws {
        for a in [3, 0, 4, 48, 1 << 30] {
            var g = RawGGUF.llama()
            g.set("general.alignment", .u32(UInt32(a)))
            refused(try write(g.bytes()), naming: ["general.alignment", "is \(a)", "power of two", "multiple of 8"])
        }
        var g = RawGGUF.llama()
        g.set("general.alignment", .string("32"))
        refused(try write(g.bytes()), naming: ["general.alignment"])
        g = RawGGUF.llama()
        g.set("general.alignment", .u32(64))
        g.alignment = 64
        XCTAssertEqual(try LanguageModel.open(path: try write(g.bytes())).config.layerCount, 2)
    }

    func testConfigJSONNaNAndStringNumbersAreRefused() throws {
        let dir = try makeTemporaryDirectory("topiary-hostile")
        let path = dir.appendingPathComponent("config.json").path
        let base = #""model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 100"#
        for (extra, words) in [(#", "rms_norm_eps": NaN"#, [path]), (#", "rms_norm_eps": 1e400"#, [path]),
                               (#", "rms_norm_eps": -1e-6"#, ["rms_norm_eps", "-1e-06"]), (#", "rope_theta": 0"#, ["rope_theta"]),
                               (#", "max_position_embeddings": 1e300"#, ["max_position_embeddings", "expected an integer"])] {
            try Data(("{" + base + extra + "}").utf8).write(to: URL(fileURLWithPath: path))
            XCTAssertThrowsError(try ModelConfig.fromHuggingFace(path: path)) { error in
                for w in words { XCTAssertTrue("\(error)".contains(w), "'\(error)' does not name \(w)") }
            }
        }
        try Data(#"{"model_type": "llama", "hidden_size": "64", "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 100}"#.utf8)
            .write(to: URL(fileURLWithPath: path))
        XCTAssertThrowsError(try ModelConfig.fromHuggingFace(path: path)) { error in
            XCTAssertEqual("\(error)", "\(path): field 'hidden_size' is \"64\" (a string), expected an integer")
        }
        for (field, value) in [("do_layer_norm_before", #""x""#), ("do_layer_norm_before", "1"), ("_remove_final_layer_norm", #""false""#),
                               ("enable_bias", "0")] {
            let json = #"{"model_type": "opt", "hidden_size": 64, "ffn_dim": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 100, "max_position_embeddings": 64, "\#(field)": \#(value)}"#
            try Data(json.utf8).write(to: URL(fileURLWithPath: path))
            XCTAssertThrowsError(try ModelConfig.fromHuggingFace(path: path)) { error in
                XCTAssertTrue("\(error)".contains("'\(field)'") && "\(error)".contains("expected true or false"), "\(error)")
            }
        }
    }

    // MARK: Non-finite results

    func testANaNInABlockFailsEvaluationNamingTheWindowAndTheBlock() throws {
        let model = try LanguageModel.open(path: TestAssets.fixture("tiny-llama"))
        let name = "model.layers.1.mlp.down_proj.weight"
        let clean = try model.weights.load(name)
        let poisoned = LanguageModel(path: model.path, format: model.format, config: model.config,
                                     weights: OverlayTensorSource(base: model.weights, layers: [
                                         MemoryTensorSource(path: "poison", tensors: [name: Matrix(rows: clean.rows, cols: clean.cols, repeating: .nan)]),
                                     ]), tokenizer: nil)
        XCTAssertThrowsError(try Perplexity.evaluate(model: poisoned, tokens: Array(0..<64), sequenceLength: 16)) { error in
            guard case EvaluationError.nonFiniteLoss(_, 0, 4, 0, 16, let loss, let source)? = error as? EvaluationError else {
                return XCTFail("\(error)")
            }
            XCTAssertTrue(loss.isNaN)
            XCTAssertEqual(source, "the output of block 1")
            XCTAssertTrue("\(error)".contains("window 1 of 4 (tokens 0..<16)"), "\(error)")
        }
        // An infinite embedding row: only the window that uses it fails, and it says where.
        let embedding = try model.weights.load("model.embed_tokens.weight")
        var rows = embedding
        rows.withUnsafeMutableBufferPointer { p in for c in 0..<embedding.cols { p[40 * embedding.cols + c] = .infinity } }
        let inf = LanguageModel(path: model.path, format: model.format, config: model.config,
                                weights: OverlayTensorSource(base: model.weights, layers: [
                                    MemoryTensorSource(path: "poison", tensors: ["model.embed_tokens.weight": rows]),
                                ]), tokenizer: nil)
        XCTAssertThrowsError(try Perplexity.evaluate(model: inf, tokens: Array(0..<64), sequenceLength: 16)) { error in
            XCTAssertTrue("\(error)".contains("window 3 of 4 (tokens 32..<48)") && "\(error)".contains("the token embedding"), "\(error)")
        }
    }
}
