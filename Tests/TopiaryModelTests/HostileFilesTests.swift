import Foundation
import XCTest
import TopiaryTensor
import TopiaryTestSupport
@testable import TopiaryModel

/// A GGUF writer that writes whatever it is told, impossible values included: metadata of any
/// integer or float type, tensors with any dimensions, a chosen alignment.
struct RawGGUF {
    enum Value {
        case u32(UInt32), i32(Int32), u64(UInt64), f32(Float), f64(Double), string(String), bool(Bool)
    }
    struct Tensor {
        var name: String
        /// Outermost first.
        var dims: [UInt64]
        var type: UInt32 = 0
        var values: [Float] = []
        /// The data offset written for the tensor (nil: where the writer puts its data).
        var offset: UInt64? = nil
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
            }
        }
        var offset: UInt64 = 0
        let a = UInt64(max(alignment, 1))
        for t in tensors {
            put(t.name)
            put(UInt32(t.dims.count))
            for d in t.dims.reversed() { put(d) }
            put(t.type)
            put(t.offset ?? offset)
            offset += (UInt64(t.values.count * 4) + a - 1) / a * a
        }
        while out.count % Int(a) != 0 { out.append(0) }
        for t in tensors {
            for v in t.values { put(v.bitPattern) }
            while out.count % Int(a) != 0 { out.append(0) }
        }
        return out
    }
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
        // The same unsupported tensor where it belongs: the file opens (the tensor is refused when used).
        g = RawGGUF.llama()
        g.tensors[g.tensors.count - 1].type = 12
        let gguf = try GGUFFile(path: try write(g.bytes()))
        XCTAssertEqual(gguf.unsupportedTensors["output.weight"], "Q4_K")
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
