import Foundation
import XCTest
import TopiaryTestSupport
@testable import TopiaryModel
import TopiaryTensor

/// The shared fixtures folder: `../shared/fixtures` beside the repository root.
private func safeTensorsFixture(_ relative: String) throws -> String {
    let root = TestPaths.repositoryRoot
    let url = root.appendingPathComponent("../shared/fixtures").appendingPathComponent(relative).standardizedFileURL
    guard FileManager.default.fileExists(atPath: url.path) else {
        throw MissingAsset(url.path)
    }
    return url.path
}

/// Deterministic pseudo-random values.
private func pseudoRandomMatrix(rows: Int, cols: Int, seed: UInt64) -> Matrix {
    var state = seed &* 6364136223846793005 &+ 1442695040888963407
    return Matrix(rows: rows, cols: cols) { out in
        for i in 0..<out.count {
            state = state &* 6364136223846793005 &+ 1442695040888963407
            out[i] = (Float(state >> 40) / Float(1 << 24) - 0.5) * 4
        }
    }
}

final class SafeTensorsTests: XCTestCase {
    private var dir = ""

    override func setUpWithError() throws {
        dir = try makeTemporaryDirectory("safetensors").path
    }

    /// A safetensors file made of `header` (padded with spaces) and `data`.
    private func rawFile(_ name: String, header: String, data: [UInt8], declaredLength: UInt64? = nil) throws -> String {
        var h = Array(header.utf8)
        while h.count % 8 != 0 { h.append(0x20) }
        var bytes: [UInt8] = []
        withUnsafeBytes(of: (declaredLength ?? UInt64(h.count)).littleEndian) { bytes += $0 }
        bytes += h + data
        let path = dir + "/" + name
        try Data(bytes).write(to: URL(fileURLWithPath: path))
        return path
    }

    // MARK: Round trips

    func testRoundTripF32F16BF16() throws {
        var a = pseudoRandomMatrix(rows: 7, cols: 5, seed: 1)
        a[0, 0] = 0
        a[0, 1] = -0.0
        a[0, 2] = 1e-6      // subnormal in fp16
        a[0, 3] = 70000     // overflows fp16 to infinity
        a[0, 4] = .infinity
        let b = pseudoRandomMatrix(rows: 1, cols: 9, seed: 2)
        let c = pseudoRandomMatrix(rows: 2, cols: 12, seed: 3)
        var writer = SafeTensorsWriter(directory: dir + "/out", metadata: ["topiary.method": "magnitude"])
        for (suffix, dtype) in [("f32", TensorDType.f32), ("f16", .f16), ("bf16", .bf16)] {
            try writer.add(name: "a.\(suffix)", matrix: a, dtype: dtype)
            try writer.add(name: "b.\(suffix)", matrix: b, shape: [9], dtype: dtype)
            try writer.add(name: "c.\(suffix)", matrix: c, shape: [2, 3, 4], dtype: dtype)
        }
        let written = try writer.finish()
        XCTAssertEqual(written, [dir + "/out/model.safetensors"])

        let source = try ShardedSafeTensors.open(directory: dir + "/out")
        let file = try XCTUnwrap(source as? SafeTensorsFile)
        XCTAssertEqual(file.metadata, ["format": "pt", "topiary.method": "magnitude"])
        XCTAssertEqual(file.tensorNames, ["a.bf16", "a.f16", "a.f32", "b.bf16", "b.f16", "b.f32", "c.bf16", "c.f16", "c.f32"],
                       "data is laid out in sorted-name order")
        XCTAssertEqual(file.entry("c.f16")?.shape, [2, 3, 4])
        XCTAssertEqual(file.entry("b.bf16")?.shape, [9])
        XCTAssertEqual(file.entry("a.f32")?.dtype, .f32)
        XCTAssertEqual(file.entry("a.f16")?.dtype, .f16)
        XCTAssertEqual(file.entry("a.bf16")?.dtype, .bf16)

        func rounded(_ m: Matrix, _ f: (Float) -> Float) -> [Float] { m.values.map(f) }
        let toF16 = { (x: Float) in HalfPrecision.fp16ToFloat(HalfPrecision.floatToFP16(x)) }
        let toBF16 = { (x: Float) in HalfPrecision.bf16ToFloat(HalfPrecision.floatToBF16(x)) }
        XCTAssertEqual(try file.load("a.f32"), a)
        XCTAssertEqual(try file.load("a.f16").values, rounded(a, toF16))
        XCTAssertEqual(try file.load("a.bf16").values, rounded(a, toBF16))
        XCTAssertEqual(try file.load("a.f16")[0, 3], .infinity)
        XCTAssertEqual(try file.load("a.f16")[0, 1].sign, .minus)
        XCTAssertNotEqual(try file.load("a.f16")[0, 2], 0)
        let b16 = try file.load("b.f16")
        XCTAssertEqual(b16.rows, 1)
        XCTAssertEqual(b16.cols, 9)
        XCTAssertEqual(b16.values, rounded(b, toF16))
        XCTAssertEqual(try file.load("b.bf16").values, rounded(b, toBF16))
        let c32 = try file.load("c.f32")
        XCTAssertEqual((c32.rows, c32.cols).0, 2)
        XCTAssertEqual(c32.cols, 12)
        XCTAssertEqual(c32.values, c.values)
        XCTAssertEqual(try file.load("c.bf16").values, rounded(c, toBF16))
    }

    func testHeaderLayoutIsSortedAndPadded() throws {
        var writer = SafeTensorsWriter(directory: dir, metadata: ["zeta": "1", "alpha": "2"])
        try writer.add(name: "b", matrix: Matrix(vector: [1, 2, 3]), shape: [3])
        try writer.add(name: "a", matrix: Matrix(rows: 1, cols: 1, values: [4]), shape: [1, 1], dtype: .bf16)
        try writer.add(name: "Z", matrix: Matrix(vector: [5]), shape: [1], dtype: .f16)
        _ = try writer.finish()
        let data = try Data(contentsOf: URL(fileURLWithPath: dir + "/model.safetensors"))
        let n = Int(data.prefix(8).withUnsafeBytes { UInt64(littleEndian: $0.loadUnaligned(as: UInt64.self)) })
        XCTAssertEqual(n % 8, 0)
        XCTAssertEqual(data.count, 8 + n + 2 + 2 + 12)
        let header = String(decoding: data[8..<(8 + n)], as: UTF8.self)
        let expected = #"{"Z":{"data_offsets":[0,2],"dtype":"F16","shape":[1]},"#
            + #""__metadata__":{"alpha":"2","format":"pt","zeta":"1"},"#
            + #""a":{"data_offsets":[2,4],"dtype":"BF16","shape":[1,1]},"#
            + #""b":{"data_offsets":[4,16],"dtype":"F32","shape":[3]}}"#
        XCTAssertEqual(header.trimmingCharacters(in: .whitespaces), expected)
        XCTAssertTrue(header.hasPrefix(expected))
        XCTAssertTrue(header.dropFirst(expected.utf8.count).allSatisfy { $0 == " " })
    }

    func testDeterministicBytes() throws {
        func write(_ sub: String, reversed: Bool) throws -> [String: Data] {
            var items: [(String, Matrix, TensorDType)] = (0..<6).map { i in
                ("layer.\(i).weight", pseudoRandomMatrix(rows: 3 + i, cols: 4, seed: UInt64(i)), [.f32, .f16, .bf16][i % 3])
            }
            if reversed { items.reverse() }
            var w = SafeTensorsWriter(directory: dir + "/" + sub, maxShardBytes: 100, metadata: ["k": "v", "a": "b"])
            for (name, m, t) in items { try w.add(name: name, matrix: m, dtype: t) }
            var out: [String: Data] = [:]
            for p in try w.finish() {
                out[URL(fileURLWithPath: p).lastPathComponent] = try Data(contentsOf: URL(fileURLWithPath: p))
            }
            return out
        }
        let first = try write("one", reversed: false)
        let second = try write("two", reversed: true)
        XCTAssertGreaterThan(first.count, 2)
        XCTAssertEqual(first, second, "the same tensors give the same bytes whatever the order they were added in")
    }

    func testShardedRoundTrip() throws {
        var writer = SafeTensorsWriter(directory: dir + "/sharded", maxShardBytes: 600, metadata: ["note": "x"])
        var expected: [String: Matrix] = [:]
        for i in 0..<5 {
            let m = pseudoRandomMatrix(rows: 8, cols: 8, seed: UInt64(10 + i))  // 256 bytes each in F32
            expected["model.layers.\(i).weight"] = m
            try writer.add(name: "model.layers.\(i).weight", matrix: m)
        }
        let big = pseudoRandomMatrix(rows: 20, cols: 20, seed: 99)  // 1600 bytes: a shard of its own
        var produced = 0
        try writer.add(name: "lm_head.weight", shape: [20, 20], dtype: .f32) {
            produced += 1
            return big
        }
        expected["lm_head.weight"] = big
        XCTAssertEqual(produced, 0, "produce closures run only when writing")
        XCTAssertEqual(writer.totalBytes, 5 * 256 + 1600)
        let files = try writer.finish()
        XCTAssertEqual(produced, 1)
        let names = files.map { URL(fileURLWithPath: $0).lastPathComponent }
        XCTAssertEqual(names, ["model-00001-of-00004.safetensors", "model-00002-of-00004.safetensors",
                               "model-00003-of-00004.safetensors", "model-00004-of-00004.safetensors",
                               "model.safetensors.index.json"])

        let source = try ShardedSafeTensors.open(directory: dir + "/sharded")
        let sharded = try XCTUnwrap(source as? ShardedSafeTensors)
        XCTAssertEqual(sharded.metadata["total_size"], String(5 * 256 + 1600))
        let viaIndex = try ShardedSafeTensors.open(directory: dir + "/sharded/model.safetensors.index.json")
        XCTAssertEqual(viaIndex.tensorNames, sharded.tensorNames)
        XCTAssertEqual(sharded.metadata["note"], "x")
        XCTAssertEqual(Set(sharded.tensorNames), Set(expected.keys))
        XCTAssertEqual(sharded.tensorNames.count, expected.count)
        XCTAssertEqual(sharded.weightMap["lm_head.weight"], "model-00001-of-00004.safetensors")
        XCTAssertEqual(sharded.weightMap["model.layers.4.weight"], "model-00004-of-00004.safetensors")
        for (name, m) in expected {
            XCTAssertEqual(try sharded.load(name), m, name)
            XCTAssertEqual(sharded.entry(name)?.shape, [m.rows, m.cols])
        }
        XCTAssertEqual(try sharded.shard("model-00002-of-00004.safetensors").tensorNames,
                       ["model.layers.0.weight", "model.layers.1.weight"])
        assertCheckpointError(try sharded.load("nope")) {
            if case .missingTensor(let p, "nope") = $0 { return p.hasSuffix("model.safetensors.index.json") }
            return false
        }

        // The index is valid JSON with a sorted weight map, as Hugging Face writes it.
        let indexData = try Data(contentsOf: URL(fileURLWithPath: dir + "/sharded/model.safetensors.index.json"))
        let index = try XCTUnwrap(try JSONSerialization.jsonObject(with: indexData) as? [String: Any])
        XCTAssertEqual((index["metadata"] as? [String: Any])?["total_size"] as? Int, 5 * 256 + 1600)
        XCTAssertEqual((index["weight_map"] as? [String: String])?.count, 6)

        // Writing the same directory again unsharded removes the now stale index.
        var single = SafeTensorsWriter(directory: dir + "/sharded")
        try single.add(name: "only", matrix: Matrix(vector: [1, 2]))
        _ = try single.finish()
        XCTAssertFalse(FileManager.default.fileExists(atPath: dir + "/sharded/model.safetensors.index.json"))
        XCTAssertEqual(try ShardedSafeTensors.open(directory: dir + "/sharded").tensorNames, ["only"])
    }

    func testWriterRejectsBadInput() throws {
        var w = SafeTensorsWriter(directory: dir)
        try w.add(name: "x", matrix: Matrix(vector: [1, 2, 3]))
        assertCheckpointError(try w.add(name: "x", matrix: Matrix(vector: [1]))) {
            if case .invalidField(_, "x", _) = $0 { return true } else { return false }
        }
        assertCheckpointError(try w.add(name: "y", matrix: Matrix(vector: [1, 2, 3]), shape: [2, 2])) {
            if case .shapeMismatch(_, "y", _, _) = $0 { return true } else { return false }
        }
        assertCheckpointError(try w.add(name: "q", matrix: Matrix(rows: 1, cols: 32), dtype: .q8_0)) {
            if case .unsupportedType(_, "q", "Q8_0") = $0 { return true } else { return false }
        }
        try w.add(name: "z", shape: [4], dtype: .f16) { Matrix(vector: [1, 2, 3]) }
        assertCheckpointError(try w.finish()) {
            if case .shapeMismatch(let p, "z", _, _) = $0 { return p == self.dir + "/model.safetensors" } else { return false }
        }
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: dir), [], "no partial or temporary file is left")
    }

    /// A tensor written in pieces of rows has the bytes of the tensor written whole, in every
    /// type and with a last piece shorter than the others; the rows read back in pieces are the
    /// rows read whole, from the rows' own bytes.
    func testTensorsInPiecesOfRows() throws {
        let a = pseudoRandomMatrix(rows: 11, cols: 6, seed: 4)
        func write(_ sub: String, pieces: Int?) throws -> (Data, [Range<Int>]) {
            var asked: [Range<Int>] = []
            var w = SafeTensorsWriter(directory: dir + "/" + sub)
            for (suffix, dtype) in [("f32", TensorDType.f32), ("f16", .f16), ("bf16", .bf16)] {
                if let pieces {
                    try w.add(name: "a.\(suffix)", shape: [11, 2, 3], dtype: dtype, rows: pieces) { range in
                        asked.append(range)
                        return a.rows(range)
                    }
                } else {
                    try w.add(name: "a.\(suffix)", matrix: a, shape: [11, 2, 3], dtype: dtype)
                }
            }
            let files = try w.finish()
            return (try Data(contentsOf: URL(fileURLWithPath: files[0])), asked)
        }
        let (whole, _) = try write("whole", pieces: nil)
        let (cut, asked) = try write("cut", pieces: 4)
        XCTAssertEqual(cut, whole)
        XCTAssertEqual(asked, Array(repeating: [0..<4, 4..<8, 8..<11], count: 3).flatMap { $0 })
        let file = try SafeTensorsFile(path: dir + "/cut/model.safetensors")
        for name in ["a.f32", "a.f16", "a.bf16"] {
            let all = try file.load(name)
            for range in [0..<1, 3..<9, 10..<11, 0..<11] {
                XCTAssertEqual(try file.load(name, rows: range), all.rows(range), "\(name) rows \(range)")
            }
            XCTAssertEqual(file.entry(name)?.rows(3..<9)?.byteCount, 6 * file.entry(name)!.byteCount / 11)
            for bad in [0..<0, 10..<12, -1..<2] {
                assertCheckpointError(try file.load(name, rows: bad)) {
                    if case .shapeMismatch(_, name, _, _) = $0 { return true } else { return false }
                }
            }
        }
        assertCheckpointError(try file.load("absent", rows: 0..<1)) {
            if case .missingTensor(_, "absent") = $0 { return true } else { return false }
        }
        // A piece of the wrong size stops the write, naming the tensor and the rows.
        var w = SafeTensorsWriter(directory: dir + "/bad")
        try w.add(name: "b", shape: [5, 2], rows: 2) { range in Matrix(rows: 2, cols: 2) }
        assertCheckpointError(try w.finish()) {
            if case .shapeMismatch(_, "b", let expected, _) = $0 { return expected.contains("4..<5") } else { return false }
        }
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: dir + "/bad"), [], "no partial or temporary file is left")
        assertCheckpointError(try w.add(name: "c", shape: [5], rows: 2) { _ in Matrix(vector: [1]) }) {
            if case .shapeMismatch(_, "c", _, _) = $0 { return true } else { return false }
        }
    }

    // MARK: Fixtures

    func testReadsTinyLlamaFixtures() throws {
        let f32 = try SafeTensorsFile(path: try safeTensorsFixture("tiny-llama/model.safetensors"))
        let bf16 = try SafeTensorsFile(path: try safeTensorsFixture("tiny-llama-bf16/model.safetensors"))
        XCTAssertEqual(f32.metadata["format"], "pt")
        var expected: [String: [Int]] = [
            "lm_head.weight": [512, 64], "model.embed_tokens.weight": [512, 64], "model.norm.weight": [64],
        ]
        for i in 0..<2 {
            let p = "model.layers.\(i)."
            expected[p + "input_layernorm.weight"] = [64]
            expected[p + "post_attention_layernorm.weight"] = [64]
            expected[p + "self_attn.q_proj.weight"] = [64, 64]
            expected[p + "self_attn.k_proj.weight"] = [32, 64]
            expected[p + "self_attn.v_proj.weight"] = [32, 64]
            expected[p + "self_attn.o_proj.weight"] = [64, 64]
            expected[p + "mlp.gate_proj.weight"] = [172, 64]
            expected[p + "mlp.up_proj.weight"] = [172, 64]
            expected[p + "mlp.down_proj.weight"] = [64, 172]
        }
        for (source, dtype) in [(f32, TensorDType.f32), (bf16, .bf16)] {
            XCTAssertEqual(source.tensorNames.count, 21)
            XCTAssertEqual(Set(source.tensorNames), Set(expected.keys))
            XCTAssertEqual(source.tensorNames.first, "lm_head.weight", "file order follows the data offsets")
            XCTAssertTrue(source.unsupportedTensors.isEmpty)
            for (name, shape) in expected {
                let e = try XCTUnwrap(source.entry(name), name)
                XCTAssertEqual(e.shape, shape, name)
                XCTAssertEqual(e.dtype, dtype, name)
            }
        }
        let q = try f32.load("model.layers.0.self_attn.q_proj.weight")
        XCTAssertEqual(q.rows, 64)
        XCTAssertEqual(q.cols, 64)
        XCTAssertEqual(q[0, 0], 0.07850641, accuracy: 1e-7)
        XCTAssertTrue(q.allFinite)
        let norm = try f32.load("model.norm.weight")
        XCTAssertEqual(norm.rows, 1)
        XCTAssertEqual(norm.cols, 64)
        // The bf16 fixture holds the fp32 weights rounded to nearest even.
        for name in expected.keys {
            let a = try f32.load(name), b = try bf16.load(name)
            XCTAssertEqual(a.values.map { HalfPrecision.bf16ToFloat(HalfPrecision.floatToBF16($0)) }, b.values, name)
        }
    }

    // MARK: Corrupt files

    private let goodHeader = #"{"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"b":{"dtype":"F16","shape":[3],"data_offsets":[16,22]}}"#

    func testValidHandMadeFile() throws {
        let path = try rawFile("ok.safetensors", header: goodHeader, data: [UInt8](repeating: 0, count: 22))
        let f = try SafeTensorsFile(path: path)
        XCTAssertEqual(f.tensorNames, ["a", "b"])
        XCTAssertEqual(try f.load("b").values, [0, 0, 0])
    }

    func testTruncatedFiles() throws {
        let tiny = dir + "/tiny.safetensors"
        try Data([1, 2, 3]).write(to: URL(fileURLWithPath: tiny))
        assertCheckpointError(try SafeTensorsFile(path: tiny)) {
            if case .truncated(tiny, _) = $0 { return true } else { return false }
        }
        // Data cut short: the last tensor runs past the end of the file.
        let cut = try rawFile("cut.safetensors", header: goodHeader, data: [UInt8](repeating: 0, count: 20))
        assertCheckpointError(try SafeTensorsFile(path: cut)) {
            if case .tensorOutOfBounds(cut, "b", _, _) = $0 { return true } else { return false }
        }
        let empty = dir + "/empty.safetensors"
        try Data().write(to: URL(fileURLWithPath: empty))
        assertCheckpointError(try SafeTensorsFile(path: empty)) {
            if case .truncated(empty, _) = $0 { return true } else { return false }
        }
    }

    func testHeaderLengthBeyondFile() throws {
        let path = try rawFile("long.safetensors", header: goodHeader, data: [UInt8](repeating: 0, count: 22), declaredLength: 1 << 40)
        assertCheckpointError(try SafeTensorsFile(path: path)) {
            if case .truncated(path, let d) = $0 { return d.contains("header length") } else { return false }
        }
        let huge = try rawFile("huge.safetensors", header: goodHeader, data: [], declaredLength: UInt64.max)
        assertCheckpointError(try SafeTensorsFile(path: huge)) {
            if case .truncated(huge, _) = $0 { return true } else { return false }
        }
    }

    func testBadJSON() throws {
        for (i, header) in [#"{"a": {"dtype": "F32", "shape": [1], "#, "not json at all", "[1, 2, 3]", "{\"a\": 1,}"].enumerated() {
            let path = try rawFile("bad\(i).safetensors", header: header, data: [0, 0, 0, 0])
            assertCheckpointError(try SafeTensorsFile(path: path)) {
                if case .invalidHeader(path, _) = $0 { return true } else { return false }
            }
        }
    }

    func testMalformedEntries() throws {
        let cases: [(String, String)] = [
            (#"{"w":{"dtype":"F32","data_offsets":[0,4]}}"#, "shape"),
            (#"{"w":{"dtype":"F32","shape":[1.5],"data_offsets":[0,4]}}"#, "1.5"),
            (#"{"w":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}"#, "negative"),
            (#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}}"#, "data_offsets"),
            (#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0]}}"#, "data_offsets"),
            (#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,99999999999999999999]}}"#, "w"),
            (#"{"w":{"dtype":"F32","shape":[4611686018427387904,4],"data_offsets":[0,4]}}"#, "shape"),
            (#"{"w":"nope"}"#, "w"),
            (#"{"__metadata__":{"n":1}}"#, "__metadata__"),
        ]
        for (i, (header, mention)) in cases.enumerated() {
            let path = try rawFile("m\(i).safetensors", header: header, data: [0, 0, 0, 0])
            assertCheckpointError(try SafeTensorsFile(path: path)) {
                if case .invalidHeader(path, let d) = $0 { return d.contains(mention) && (i == 8 || d.contains("'w'")) }
                return false
            }
        }
    }

    func testOffsetsPastTheEnd() throws {
        let header = #"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"v":{"dtype":"F32","shape":[1000],"data_offsets":[16,4016]}}"#
        let path = try rawFile("oob.safetensors", header: header, data: [UInt8](repeating: 0, count: 16))
        assertCheckpointError(try SafeTensorsFile(path: path)) {
            if case .tensorOutOfBounds(path, "v", let end, let size) = $0 {
                let actual = (try? FileManager.default.attributesOfItem(atPath: path)[.size] as? Int) ?? -1
                return size == actual && end == size + 4000
            }
            return false
        }
    }

    func testWrongByteCount() throws {
        let header = #"{"w":{"dtype":"BF16","shape":[3,2],"data_offsets":[0,16]}}"#
        let path = try rawFile("count.safetensors", header: header, data: [UInt8](repeating: 0, count: 16))
        assertCheckpointError(try SafeTensorsFile(path: path)) {
            if case .invalidHeader(path, let d) = $0 { return d.contains("'w'") && d.contains("12") } else { return false }
        }
    }

    func testOverlappingTensors() throws {
        let header = #"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"v":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#
        let path = try rawFile("overlap.safetensors", header: header, data: [UInt8](repeating: 0, count: 12))
        assertCheckpointError(try SafeTensorsFile(path: path)) {
            if case .invalidHeader(path, let d) = $0 { return d.contains("overlap") } else { return false }
        }
    }

    func testUnsupportedTypeRefusedOnlyWhenLoaded() throws {
        let header = #"{"q":{"dtype":"I8","shape":[2,4],"data_offsets":[0,8]},"s":{"dtype":"F32","shape":[2],"data_offsets":[8,16]},"x":{"dtype":"F8_E4M3","shape":[2],"data_offsets":[16,18]}}"#
        var data = [UInt8](repeating: 1, count: 8)
        withUnsafeBytes(of: Float(1.5).bitPattern.littleEndian) { data += $0 }
        withUnsafeBytes(of: Float(-2).bitPattern.littleEndian) { data += $0 }
        data += [0, 0]
        let path = try rawFile("i8.safetensors", header: header, data: data)
        let f = try SafeTensorsFile(path: path)
        XCTAssertEqual(f.tensorNames, ["q", "s", "x"])
        XCTAssertEqual(f.unsupportedTensors, ["q": "I8", "x": "F8_E4M3"])
        XCTAssertNil(f.entry("q"))
        XCTAssertEqual(f.storedType("q"), "I8")
        XCTAssertEqual(try f.load("s").values, [1.5, -2])
        assertCheckpointError(try f.load("q")) {
            if case .unsupportedType(path, "q", "I8") = $0 { return true } else { return false }
        }
        // Even unsupported types are checked against the file.
        let bad = try rawFile("i8bad.safetensors", header: #"{"q":{"dtype":"I8","shape":[2,4],"data_offsets":[0,6]}}"#, data: [UInt8](repeating: 0, count: 8))
        assertCheckpointError(try SafeTensorsFile(path: bad)) {
            if case .invalidHeader(bad, let d) = $0 { return d.contains("'q'") } else { return false }
        }
    }

    func testMissingTensorAndMissingCheckpoint() throws {
        let path = try rawFile("ok.safetensors", header: goodHeader, data: [UInt8](repeating: 0, count: 22))
        assertCheckpointError(try SafeTensorsFile(path: path).load("zzz")) {
            if case .missingTensor(path, "zzz") = $0 { return true } else { return false }
        }
        let emptyDir = dir + "/nothing"
        try FileManager.default.createDirectory(atPath: emptyDir, withIntermediateDirectories: false)
        assertCheckpointError(try ShardedSafeTensors.open(directory: emptyDir)) {
            if case .io(emptyDir, let d) = $0 { return d.contains("model.safetensors") } else { return false }
        }
        assertCheckpointError(try ShardedSafeTensors.open(directory: dir + "/absent")) {
            if case .io(let p, _) = $0 { return p == self.dir + "/absent" } else { return false }
        }
    }

    func testBadIndex() throws {
        let d = dir + "/idx"
        try FileManager.default.createDirectory(atPath: d, withIntermediateDirectories: false)
        let index = d + "/model.safetensors.index.json"
        try Data(#"{"weight_map": {"w": "model-00001-of-00002.safetensors"}}"#.utf8).write(to: URL(fileURLWithPath: index))
        assertCheckpointError(try ShardedSafeTensors.open(directory: d)) {
            if case .io(let p, let detail) = $0 { return p.hasSuffix("model-00001-of-00002.safetensors") && detail.contains("'w'") }
            return false
        }
        try Data(#"{"weight_map": {"w": "../escape.safetensors"}}"#.utf8).write(to: URL(fileURLWithPath: index))
        assertCheckpointError(try ShardedSafeTensors(directory: d)) {
            if case .invalidField(index, let f, _) = $0 { return f.contains("w") } else { return false }
        }
        try Data(#"{"metadata": {}}"#.utf8).write(to: URL(fileURLWithPath: index))
        assertCheckpointError(try ShardedSafeTensors(directory: d)) {
            if case .invalidHeader(index, let detail) = $0 { return detail.contains("weight_map") } else { return false }
        }
    }

    /// Every type decodes in chunks over the threads: the same bits at 1 and 3 threads, over more
    /// than one chunk, and each element as decoding it alone gives.
    func testDecodingOverThreadsGivesTheSameBits() {
        let saved = Linalg.threadCount
        defer { Linalg.setThreadCount(saved) }
        let count = (1 << 18) * 2 + 96   // two whole chunks and three blocks of 32
        var state: UInt64 = 7
        for dtype in TensorDType.allCases {
            let bytes = (0..<dtype.byteCount(elements: count)!).map { _ -> UInt8 in
                state = state &* 6364136223846793005 &+ 1442695040888963407
                return UInt8(truncatingIfNeeded: state >> 33)
            }
            var results: [[UInt32]] = []
            for threads in [1, 3] {
                Linalg.setThreadCount(threads)
                var out = [Float](repeating: 0, count: count)
                bytes.withUnsafeBytes { src in out.withUnsafeMutableBufferPointer { TensorDecoder.decode(src, dtype: dtype, count: count, into: $0.baseAddress!) } }
                results.append(out.map(\.bitPattern))
            }
            XCTAssertEqual(results[0], results[1], "\(dtype) over 3 threads")
            // The last block alone, decoded from its own bytes.
            let last = count - 32, per = dtype.byteCount(elements: 32)!
            var tail = [Float](repeating: 0, count: 32)
            Array(bytes[(last / 32 * per)...]).withUnsafeBytes { src in
                tail.withUnsafeMutableBufferPointer { TensorDecoder.decode(src, dtype: dtype, count: 32, into: $0.baseAddress!) }
            }
            XCTAssertEqual(Array(results[1][last...]), tail.map(\.bitPattern), "\(dtype): the last block")
        }
    }
}
