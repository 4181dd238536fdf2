import Foundation
import XCTest
import TopiaryTestSupport
@testable import TopiaryModel
import TopiaryTensor

/// stories260K.bin in `../shared/assets` beside the repository root.
private func stories260KPath() throws -> String {
    let root = TestPaths.repositoryRoot
    let url = root.appendingPathComponent("../shared/assets/stories260K/stories260K.bin").standardizedFileURL
    guard FileManager.default.fileExists(atPath: url.path) else {
        throw MissingAsset(url.path)
    }
    return url.path
}

final class Llama2CTests: XCTestCase {
    private var dir = ""

    override func setUpWithError() throws {
        dir = try makeTemporaryDirectory("llama2c").path
    }

    private func write(_ bytes: [UInt8], _ name: String) throws -> String {
        let path = dir + "/" + name
        try Data(bytes).write(to: URL(fileURLWithPath: path))
        return path
    }

    private func int32s(_ values: [Int32]) -> [UInt8] {
        var out: [UInt8] = []
        for v in values { withUnsafeBytes(of: v.littleEndian) { out += $0 } }
        return out
    }

    func testStories260K() throws {
        let path = try stories260KPath()
        let ckpt = try Llama2CCheckpoint(path: path)
        XCTAssertEqual(ckpt.header, Llama2CHeader(dim: 64, hiddenDim: 172, layerCount: 5, headCount: 8, kvHeadCount: 4,
                                                  vocabularySize: 512, sequenceLength: 512, sharedClassifier: true))
        XCTAssertEqual(ckpt.header.headSize, 8)
        XCTAssertEqual(ckpt.header.kvDim, 32)
        XCTAssertEqual(ckpt.header.expectedFileSize, 1_056_540)
        XCTAssertEqual(ckpt.tensorNames.count, 1 + 5 * 9 + 1)
        XCTAssertNil(ckpt.entry("lm_head.weight"), "the classifier is shared")
        XCTAssertEqual(ckpt.tensorNames.first, "model.embed_tokens.weight")
        XCTAssertEqual(ckpt.tensorNames.last, "model.norm.weight")
        let total = ckpt.tensorNames.reduce(0) { $0 + ckpt.entry($1)!.elementCount }
        XCTAssertEqual(total, 260_032)
        for name in ["model.embed_tokens.weight", "model.layers.3.mlp.gate_proj.weight"] {
            let whole = try ckpt.load(name)
            XCTAssertEqual(try ckpt.load(name, rows: 5..<37), whole.rows(5..<37), name)
            XCTAssertThrowsError(try ckpt.load(name, rows: 0..<(whole.rows + 1)), name)
        }

        let shapes: [String: [Int]] = [
            "model.embed_tokens.weight": [512, 64], "model.norm.weight": [64],
            "model.layers.3.input_layernorm.weight": [64], "model.layers.3.post_attention_layernorm.weight": [64],
            "model.layers.3.self_attn.q_proj.weight": [64, 64], "model.layers.3.self_attn.k_proj.weight": [32, 64],
            "model.layers.3.self_attn.v_proj.weight": [32, 64], "model.layers.3.self_attn.o_proj.weight": [64, 64],
            "model.layers.3.mlp.gate_proj.weight": [172, 64], "model.layers.3.mlp.down_proj.weight": [64, 172],
            "model.layers.3.mlp.up_proj.weight": [172, 64],
        ]
        for (name, shape) in shapes {
            let e = try XCTUnwrap(ckpt.entry(name), name)
            XCTAssertEqual(e.shape, shape, name)
            XCTAssertEqual(e.dtype, .f32)
            let m = try ckpt.load(name)
            XCTAssertEqual(m.count, shape.reduce(1, *))
            XCTAssertTrue(m.allFinite, name)
        }
        for i in 0..<5 { XCTAssertNotNil(ckpt.entry("model.layers.\(i).mlp.up_proj.weight")) }
        XCTAssertNil(ckpt.entry("model.layers.5.mlp.up_proj.weight"))

        // Compare with the raw floats at offsets computed independently from the format description.
        let raw = try Data(contentsOf: URL(fileURLWithPath: path))
        func float(at index: Int) -> Float {
            raw.withUnsafeBytes { Float(bitPattern: UInt32(littleEndian: $0.loadUnaligned(fromByteOffset: 28 + 4 * index, as: UInt32.self))) }
        }
        let (d, l, hd, kv, v) = (64, 5, 172, 32, 512)
        let wqLayer2 = v * d + l * d + 2 * d * d
        let q2 = try ckpt.load("model.layers.2.self_attn.q_proj.weight")
        XCTAssertEqual(q2[0, 0], float(at: wqLayer2))
        XCTAssertEqual(q2[5, 7], float(at: wqLayer2 + 5 * d + 7))
        let w2Layer4 = v * d + l * d + l * d * d * 2 + l * kv * d * 2 + l * d + l * hd * d + 4 * d * hd
        let down4 = try ckpt.load("model.layers.4.mlp.down_proj.weight")
        XCTAssertEqual(down4.rows, 64)
        XCTAssertEqual(down4.cols, 172)
        XCTAssertEqual(down4[63, 171], float(at: w2Layer4 + 63 * hd + 171))
        let finalNorm = try ckpt.load("model.norm.weight")
        XCTAssertEqual(finalNorm[0, 63], float(at: 260_032 - 1))
        XCTAssertEqual(try ckpt.load("model.embed_tokens.weight")[511, 63], float(at: v * d - 1))
        assertCheckpointError(try ckpt.load("freq_cis_real")) {
            if case .missingTensor(path, "freq_cis_real") = $0 { return true } else { return false }
        }
    }

    func testTruncatedCopy() throws {
        let raw = try Data(contentsOf: URL(fileURLWithPath: try stories260KPath()))
        let path = try write(Array(raw.prefix(raw.count - 1000)), "cut.bin")
        assertCheckpointError(try Llama2CCheckpoint(path: path)) {
            if case .truncated(path, let d) = $0 { return d.contains("1056540") && d.contains("1055540") } else { return false }
        }
        let headerOnly = try write(Array(raw.prefix(20)), "short.bin")
        assertCheckpointError(try Llama2CCheckpoint(path: headerOnly)) {
            if case .truncated(headerOnly, _) = $0 { return true } else { return false }
        }
        let longer = try write(Array(raw) + [0, 0, 0, 0], "long.bin")
        assertCheckpointError(try Llama2CCheckpoint(path: longer)) {
            if case .invalidHeader(longer, let d) = $0 { return d.contains("1056544") } else { return false }
        }
    }

    func testBadHeaders() throws {
        let raw = try Data(contentsOf: URL(fileURLWithPath: try stories260KPath()))
        let cases: [(field: Int, value: Int32, mention: String)] = [
            (3, 0, "n_heads"), (0, -64, "dim"), (4, 3, "n_kv_heads"), (3, 7, "n_heads"), (1, 0, "hidden_dim"),
            (5, 0, "vocab_size"), (6, -1, "seq_len"), (2, 1 << 30, "n_layers"), (3, 64, "odd"),
        ]
        for (i, c) in cases.enumerated() {
            var bytes = Array(raw)
            withUnsafeBytes(of: c.value.littleEndian) { for j in 0..<4 { bytes[4 * c.field + j] = $0[j] } }
            let path = try write(bytes, "bad\(i).bin")
            assertCheckpointError(try Llama2CCheckpoint(path: path)) {
                if case .invalidHeader(path, let d) = $0 { return d.contains(c.mention) } else { return false }
            }
        }
    }

    func testVersionedExportsAndOtherFilesAreRefused() throws {
        let v1 = try write(Array(UInt32(0x616b3432).littleEndianBytes) + int32s([1, 64, 172, 5, 8, 4, 512, 512]) + [UInt8](repeating: 0, count: 223), "v1.bin")
        assertCheckpointError(try Llama2CCheckpoint(path: v1)) {
            if case .unsupportedModel(v1, let d) = $0 { return d.contains("unsupported llama2.c export version 1") } else { return false }
        }
        let v2 = try write(Array(UInt32(0x616b3432).littleEndianBytes) + int32s([2]), "v2.bin")
        assertCheckpointError(try Llama2CCheckpoint(path: v2)) {
            if case .unsupportedModel(v2, let d) = $0 { return d.contains("version 2") } else { return false }
        }
        let gguf = try write(Array("GGUF".utf8) + int32s([3, 0, 0, 0, 0, 0]), "model.gguf")
        assertCheckpointError(try Llama2CCheckpoint(path: gguf)) {
            if case .badMagic(gguf, _, _) = $0 { return true } else { return false }
        }
        let text = try write(Array("this is just some text, not a model at all".utf8), "notes.txt")
        assertCheckpointError(try Llama2CCheckpoint(path: text)) {
            if case .invalidHeader(text, _) = $0 { return true } else { return false }
        }
        let empty = try write([], "empty.bin")
        assertCheckpointError(try Llama2CCheckpoint(path: empty)) {
            if case .truncated(empty, _) = $0 { return true } else { return false }
        }
        assertCheckpointError(try Llama2CCheckpoint(path: dir + "/missing.bin")) {
            if case .io(let p, _) = $0 { return p == self.dir + "/missing.bin" } else { return false }
        }
    }

    /// A synthetic checkpoint with an unshared classifier: every float is its own index, so the
    /// position of each tensor in the file is visible in its values.
    func testUnsharedClassifierLayout() throws {
        let (d, hd, l, nh, nkv, v, seq) = (8, 12, 2, 2, 1, 10, 3)
        let h = Llama2CHeader(dim: d, hiddenDim: hd, layerCount: l, headCount: nh, kvHeadCount: nkv,
                              vocabularySize: v, sequenceLength: seq, sharedClassifier: false)
        var bytes = int32s([Int32(d), Int32(hd), Int32(l), Int32(nh), Int32(nkv), Int32(-v), Int32(seq)])
        for i in 0..<h.storedFloatCount { withUnsafeBytes(of: Float(i).bitPattern.littleEndian) { bytes += $0 } }
        XCTAssertEqual(bytes.count, h.expectedFileSize)
        let path = try write(bytes, "unshared.bin")
        let ckpt = try Llama2CCheckpoint(path: path)
        XCTAssertEqual(ckpt.header, h)
        XCTAssertEqual(ckpt.header.kvDim, 4)
        XCTAssertEqual(ckpt.tensorNames.last, "lm_head.weight")
        XCTAssertEqual(ckpt.tensorNames.count, 1 + l * 9 + 2)
        var next = 0
        func expect(_ name: String, _ shape: [Int], file: StaticString = #filePath, line: UInt = #line) throws {
            let m = try ckpt.load(name)
            let n = shape.reduce(1, *)
            XCTAssertEqual(ckpt.entry(name)?.shape, shape, name, file: file, line: line)
            XCTAssertEqual(m.values, (next..<(next + n)).map(Float.init), name, file: file, line: line)
            XCTAssertEqual(m.rows, shape.count == 2 ? shape[0] : 1, name, file: file, line: line)
            next += n
        }
        try expect("model.embed_tokens.weight", [v, d])
        for i in 0..<l { try expect("model.layers.\(i).input_layernorm.weight", [d]) }
        for i in 0..<l { try expect("model.layers.\(i).self_attn.q_proj.weight", [d, d]) }
        for i in 0..<l { try expect("model.layers.\(i).self_attn.k_proj.weight", [4, d]) }
        for i in 0..<l { try expect("model.layers.\(i).self_attn.v_proj.weight", [4, d]) }
        for i in 0..<l { try expect("model.layers.\(i).self_attn.o_proj.weight", [d, d]) }
        for i in 0..<l { try expect("model.layers.\(i).post_attention_layernorm.weight", [d]) }
        for i in 0..<l { try expect("model.layers.\(i).mlp.gate_proj.weight", [hd, d]) }
        for i in 0..<l { try expect("model.layers.\(i).mlp.down_proj.weight", [d, hd]) }
        for i in 0..<l { try expect("model.layers.\(i).mlp.up_proj.weight", [hd, d]) }
        try expect("model.norm.weight", [d])
        next += seq * (d / nh / 2) * 2  // RoPE tables are skipped
        try expect("lm_head.weight", [v, d])
        XCTAssertEqual(next, h.storedFloatCount)
    }
}

private extension UInt32 {
    var littleEndianBytes: [UInt8] { withUnsafeBytes(of: littleEndian) { Array($0) } }
}
