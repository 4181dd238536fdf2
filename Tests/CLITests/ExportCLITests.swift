import Foundation
import XCTest

/// What `convert` and `prune` write from a Hugging Face source: its config.json with only the
/// dtype changed, its tokenizer and generation files unchanged, its shard layout.
final class ExportCLITests: XCTestCase {
    let bf16 = CLI.fixture("tiny-llama-bf16")
    let chatTemplate = "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\\n\\n{{ m['content'] }}<|eot_id|>{% endfor %}"

    func data(_ path: String) throws -> Data { try Data(contentsOf: URL(fileURLWithPath: path)) }

    /// A writable copy of the bf16 fixture with tokenizer files added; returns the directory and the added files.
    func sourceWithTokenizer(in dir: URL, name: String = "src") throws -> (String, [String: Data]) {
        let source = dir.appendingPathComponent(name).path
        try FileManager.default.createDirectory(atPath: source, withIntermediateDirectories: true)
        for f in try FileManager.default.contentsOfDirectory(atPath: bf16) {
            try data(bf16 + "/" + f).write(to: URL(fileURLWithPath: source + "/" + f))
        }
        let files: [String: Data] = [
            "tokenizer.json": try data(CLI.fixture("tokenizer-llama3/tokenizer.json")),
            "tokenizer_config.json": Data("{\n  \"bos_token\": \"<|begin_of_text|>\",\n  \"chat_template\": \"\(chatTemplate)\",\n  \"eos_token\": \"<|eot_id|>\",\n  \"tokenizer_class\": \"PreTrainedTokenizerFast\"\n}\n".utf8),
            "special_tokens_map.json": Data("{\"bos_token\": \"<|begin_of_text|>\", \"eos_token\": \"<|eot_id|>\"}".utf8),
            "chat_template.jinja": Data("{{ bos_token }}{{ messages[0]['content'] }}".utf8),
        ]
        for (f, bytes) in files { try bytes.write(to: URL(fileURLWithPath: source + "/" + f)) }
        return (source, files)
    }

    /// Splits `directory`'s model.safetensors into `count` shards (tensor i to shard i % count, so a
    /// shard's tensors are not a run of names) with model.safetensors.index.json, as transformers lays them out.
    func shard(_ directory: String, count: Int) throws -> [String: String] {
        let whole = try data(directory + "/model.safetensors")
        let headerLength = whole.prefix(8).withUnsafeBytes { Int($0.loadUnaligned(as: UInt64.self).littleEndian) }
        let header = try JSONSerialization.jsonObject(with: whole.subdata(in: 8..<(8 + headerLength))) as! [String: Any]
        let body = whole.subdata(in: (8 + headerLength)..<whole.count)
        let names = header.keys.filter { $0 != "__metadata__" }.sorted()
        var weightMap: [String: String] = [:]
        var totalSize = 0
        for k in 0..<count {
            let file = String(format: "model-%05d-of-%05d.safetensors", k + 1, count)
            var entries: [String: Any] = ["__metadata__": ["format": "pt"]]
            var payload = Data()
            for (i, name) in names.enumerated() where i % count == k {
                let e = header[name] as! [String: Any]
                let offsets = e["data_offsets"] as! [Int]
                let bytes = body.subdata(in: offsets[0]..<offsets[1])
                entries[name] = ["dtype": e["dtype"]!, "shape": e["shape"]!, "data_offsets": [payload.count, payload.count + bytes.count]]
                payload.append(bytes)
                weightMap[name] = file
            }
            totalSize += payload.count
            var json = try JSONSerialization.data(withJSONObject: entries, options: [.sortedKeys])
            while json.count % 8 != 0 { json.append(UInt8(ascii: " ")) }
            var length = UInt64(json.count).littleEndian
            var out = Data(bytes: &length, count: 8)
            out.append(json)
            out.append(payload)
            try out.write(to: URL(fileURLWithPath: directory + "/" + file))
        }
        let index: [String: Any] = ["metadata": ["total_size": totalSize], "weight_map": weightMap]
        try JSONSerialization.data(withJSONObject: index, options: [.prettyPrinted, .sortedKeys])
            .write(to: URL(fileURLWithPath: directory + "/model.safetensors.index.json"))
        try FileManager.default.removeItem(atPath: directory + "/model.safetensors")
        return weightMap
    }

    func dtypes(_ safetensors: String) throws -> Set<String> {
        let d = try data(safetensors)
        let n = d.prefix(8).withUnsafeBytes { Int($0.loadUnaligned(as: UInt64.self).littleEndian) }
        let header = try JSONSerialization.jsonObject(with: d.subdata(in: 8..<(8 + n))) as! [String: Any]
        return Set(header.compactMap { ($0.value as? [String: Any])?["dtype"] as? String })
    }

    func testConvertKeepsTheSourceConfigTokenizerFilesAndDType() throws {
        let dir = try CLI.temporaryDirectory(self)
        let (source, added) = try sourceWithTokenizer(in: dir)
        let out = dir.appendingPathComponent("out").path
        let r = try CLI.run(["convert", "--model", source, "--output", out, "--json"])
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertEqual(r.json?["dtype"] as? String, "BF16")
        XCTAssertEqual(try dtypes(out + "/model.safetensors"), ["BF16"])
        XCTAssertEqual(try data(out + "/config.json"), try data(bf16 + "/config.json"))
        XCTAssertEqual(try data(out + "/generation_config.json"), try data(bf16 + "/generation_config.json"))
        for (f, bytes) in added { XCTAssertEqual(try data(out + "/" + f), bytes, f) }
        XCTAssertFalse(FileManager.default.fileExists(atPath: out + "/expected_logits.json"))

        // --dtype f32: the dtype line alone changes.
        let f32 = dir.appendingPathComponent("f32").path
        let w = try CLI.run(["convert", "--model", source, "--output", f32, "--dtype", "f32", "--json"])
        XCTAssertEqual(w.status, 0, w.stderr)
        XCTAssertEqual(try dtypes(f32 + "/model.safetensors"), ["F32"])
        let before = String(decoding: try data(bf16 + "/config.json"), as: UTF8.self).split(separator: "\n", omittingEmptySubsequences: false)
        let after = String(decoding: try data(f32 + "/config.json"), as: UTF8.self).split(separator: "\n", omittingEmptySubsequences: false)
        XCTAssertEqual(before.count, after.count)
        let changed = zip(before, after).filter { $0 != $1 }
        XCTAssertEqual(changed.map { String($0.1) }, ["  \"dtype\": \"float32\","])
        for (f, bytes) in added { XCTAssertEqual(try data(f32 + "/" + f), bytes, f) }
    }

    func testPruneOfAShardedSourceKeepsItsShardsConfigAndTokenizerFiles() throws {
        let dir = try CLI.temporaryDirectory(self)
        let (source, added) = try sourceWithTokenizer(in: dir)
        let weightMap = try shard(source, count: 3)
        let ids = dir.appendingPathComponent("ids.json").path
        try JSONSerialization.data(withJSONObject: (0..<2000).map { ($0 * 7919 + 11) % 512 }).write(to: URL(fileURLWithPath: ids))
        let out = dir.appendingPathComponent("pruned").path
        let r = try CLI.run(["prune", "--model", source, "--method", "wanda", "--sparsity", "0.5", "--calib", ids,
                             "--calib-samples", "4", "--calib-seqlen", "32", "--output", out, "--json"])
        XCTAssertEqual(r.status, 0, r.stderr)
        let shards = (1...3).map { String(format: "model-%05d-of-00003.safetensors", $0) }
        let listing = Set(try FileManager.default.contentsOfDirectory(atPath: out))
        XCTAssertEqual(listing, Set(shards + ["model.safetensors.index.json", "config.json", "generation_config.json", "report.json",
                                              ".topiary-output.json"] + added.keys))
        let index = try JSONSerialization.jsonObject(with: data(out + "/model.safetensors.index.json")) as! [String: Any]
        XCTAssertEqual(index["weight_map"] as? [String: String], weightMap)
        var sizes = 0
        for s in shards {
            let d = try data(out + "/" + s)
            sizes += d.count - 8 - d.prefix(8).withUnsafeBytes { Int($0.loadUnaligned(as: UInt64.self).littleEndian) }
            XCTAssertEqual(try dtypes(out + "/" + s), ["BF16"], s)
        }
        XCTAssertEqual((index["metadata"] as? [String: Any])?["total_size"] as? Int, sizes)
        XCTAssertEqual(try data(out + "/config.json"), try data(bf16 + "/config.json"))
        XCTAssertEqual(try data(out + "/generation_config.json"), try data(bf16 + "/generation_config.json"))
        for (f, bytes) in added { XCTAssertEqual(try data(out + "/" + f), bytes, f) }
        let inspect = try CLI.run(["inspect", "--model", out, "--json"])
        XCTAssertEqual(inspect.status, 0, inspect.stderr)
        XCTAssertEqual(inspect.json?["sparsity"] as? Double ?? 0, 0.5, accuracy: 0.02)
    }

    func testConvertOfAnF32SourceWithTiedEmbeddingsKeepsItsConfig() throws {
        let dir = try CLI.temporaryDirectory(self)
        let out = dir.appendingPathComponent("opt").path
        let r = try CLI.run(["convert", "--model", CLI.fixture("tiny-opt"), "--output", out, "--json"])
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertEqual(r.json?["dtype"] as? String, "F32")
        XCTAssertEqual(try data(out + "/config.json"), try data(CLI.fixture("tiny-opt/config.json")))
        XCTAssertEqual(try data(out + "/generation_config.json"), try data(CLI.fixture("tiny-opt/generation_config.json")))
        let eval = try CLI.run(["inspect", "--model", out, "--json"])
        XCTAssertEqual(eval.status, 0, eval.stderr)
    }
}
