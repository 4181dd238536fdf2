import Foundation
import XCTest
import TopiaryTensor
import TopiaryTestSupport
@testable import TopiaryModel
import TopiaryTokenizers

/// An order-preserving JSON value that keeps numbers as written, and the writer's float text.
final class OrderedJSONTests: XCTestCase {
    func testParseKeepsOrderAndNumberTextAndWritesPythonsLayout() throws {
        let text = #"{"b": 1e-05, "a": [500000.0, -0, 2E+3], "c": {"z": null, "y": true}, "s": "\u00e9\"\n", "e": {}, "l": []}"#
        let value = try OrderedJSON.parse(Data(text.utf8))
        XCTAssertEqual(value.members?.map(\.key), ["b", "a", "c", "s", "e", "l"])
        XCTAssertEqual(value["b"]?.numberText, "1e-05")
        XCTAssertEqual(value["a"]?.array?.compactMap(\.numberText), ["500000.0", "-0", "2E+3"])
        XCTAssertEqual(value["s"]?.string, "é\"\n")
        XCTAssertEqual(value["c"]?["y"]?.bool, true)
        let expected = """
        {
          "b": 1e-05,
          "a": [
            500000.0,
            -0,
            2E+3
          ],
          "c": {
            "z": null,
            "y": true
          },
          "s": "é\\"\\n",
          "e": {},
          "l": []
        }

        """
        XCTAssertEqual(String(decoding: value.serialized(), as: UTF8.self), expected)
        XCTAssertTrue(String(decoding: value.serialized(asciiOnly: true), as: UTF8.self).contains(#""s": "\u00e9\"\n""#))
    }

    /// A config.json written by transformers (json.dumps(indent=2, sort_keys=True)) reads and writes back byte for byte.
    func testTransformersConfigRoundTripsByteForByte() throws {
        for fixture in ["tiny-llama-bf16", "tiny-opt", "tiny-llama3-v5config"] {
            let data = try Data(contentsOf: URL(fileURLWithPath: TestAssets.fixture(fixture + "/config.json")))
            XCTAssertEqual(try OrderedJSON.parse(data).serialized(asciiOnly: true), data, fixture)
        }
    }

    func testMalformedJSONIsRefusedWithItsOffset() {
        for bad in [#"{"a": }"#, #"{"a": 01}"#, #"{"a": 1,}"#, #"["x"#, #"{"a": 1} x"#, #"{"a": tru}"#] {
            XCTAssertThrowsError(try OrderedJSON.parse(Data(bad.utf8)), bad) { error in
                XCTAssertTrue(error is OrderedJSONError, bad)
            }
        }
    }

    /// Float32 values, held as Float or widened to Double, are written as Float's shortest text.
    func testFloatFieldsAreWrittenAsTheSourceDecimal() throws {
        let dictionary: [String: Any] = [
            "rms_norm_eps": Double(Float(1e-5)), "eps_float": Float(1e-5), "rope_theta": Double(Float(100000)),
            "theta_float": Float(500000), "tenth": 0.1, "tiny": 1e-300, "count": 3, "flag": true, "name": "x",
            "list": [Float(0.02), 2] as [Any],
        ]
        let text = String(decoding: try OrderedJSON.from(dictionary).serialized(), as: UTF8.self)
        XCTAssertEqual(Double(Float(1e-5)).description, "9.999999747378752e-06")  // what a plain Double writer gives
        XCTAssertTrue(text.contains(#""rms_norm_eps": 1e-05,"#), text)
        XCTAssertTrue(text.contains(#""eps_float": 1e-05,"#), text)
        XCTAssertTrue(text.contains(#""rope_theta": 100000.0,"#), text)
        XCTAssertTrue(text.contains(#""theta_float": 500000.0,"#), text)
        XCTAssertTrue(text.contains(#""tenth": 0.1,"#), text)
        XCTAssertTrue(text.contains(#""tiny": 1e-300"#), text)
        XCTAssertTrue(text.contains(#""count": 3,"#), text)
        XCTAssertTrue(text.contains(#""flag": true,"#), text)
        XCTAssertTrue(text.contains("0.02,\n    2\n"), text)
        // Keys sorted.
        let keys = try OrderedJSON.parse(Data(text.utf8)).members!.map(\.key)
        XCTAssertEqual(keys, keys.sorted())
    }
}

/// Editing a source config.json changes the dtype and nothing else.
final class HuggingFaceConfigFileTests: XCTestCase {
    func edit(_ text: String, _ name: String) throws -> String {
        String(decoding: try HuggingFaceConfigFile.settingDType(Data(text.utf8), to: name, path: "config.json"), as: UTF8.self)
    }

    func testDTypeFieldsAreChangedInPlace() throws {
        let both = "{\n  \"dtype\": \"bfloat16\",\n  \"rms_norm_eps\": 1e-05,\n  \"torch_dtype\" :\"bfloat16\"}"
        XCTAssertEqual(try edit(both, "float32"), "{\n  \"dtype\": \"float32\",\n  \"rms_norm_eps\": 1e-05,\n  \"torch_dtype\" :\"float32\"}")
        XCTAssertEqual(try edit(both, "bfloat16"), both)
        let torchOnly = "{\"torch_dtype\": \"float16\", \"x\": 1.50}"
        XCTAssertEqual(try edit(torchOnly, "bfloat16"), "{\"torch_dtype\": \"bfloat16\", \"x\": 1.50}")
    }

    func testTorchDTypeIsAddedWhenTheSourceHasNone() throws {
        // Sorted keys: inserted in order, spaced like its neighbours.
        XCTAssertEqual(try edit("{\n  \"a\": 1,\n  \"vocab_size\": 512\n}\n", "float32"),
                       "{\n  \"a\": 1,\n  \"torch_dtype\": \"float32\",\n  \"vocab_size\": 512\n}\n")
        XCTAssertEqual(try edit("{\n  \"a\": 1,\n  \"b\": 2\n}", "float32"), "{\n  \"a\": 1,\n  \"b\": 2,\n  \"torch_dtype\": \"float32\"\n}")
        // Unsorted keys: appended.
        XCTAssertEqual(try edit("{\"z\":1,\"a\":2}", "float16"), "{\"z\":1,\"a\":2,\"torch_dtype\":\"float16\"}")
        XCTAssertEqual(try edit("{ }", "float16"), "{\"torch_dtype\": \"float16\"}")
    }

    func testANonObjectIsRefused() {
        XCTAssertThrowsError(try edit("[1]", "float32"))
        XCTAssertThrowsError(try edit("{\"a\": }", "float32"))
    }
}

/// What an export writes beside the weights, and how it lays them out.
final class HuggingFaceExportFilesTests: XCTestCase {
    let bf16 = TestAssets.fixture("tiny-llama-bf16")

    /// A writable copy of a fixture directory (the shared fixtures are read-only).
    func copy(_ fixture: String, into parent: URL, name: String) throws -> String {
        let dir = parent.appendingPathComponent(name).path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        for f in try FileManager.default.contentsOfDirectory(atPath: fixture) {
            try Data(contentsOf: URL(fileURLWithPath: fixture + "/" + f)).write(to: URL(fileURLWithPath: dir + "/" + f))
        }
        return dir
    }

    func data(_ path: String) throws -> Data { try Data(contentsOf: URL(fileURLWithPath: path)) }

    func safetensorsHeader(_ path: String) throws -> [String: Any] {
        let d = try data(path)
        let n = d.prefix(8).withUnsafeBytes { Int($0.loadUnaligned(as: UInt64.self).littleEndian) }
        return try JSONSerialization.jsonObject(with: d.subdata(in: 8..<(8 + n))) as! [String: Any]
    }

    /// The digest the export feeds as it writes is that of its weight files read back, in the
    /// order returned, for one file and for several shards.
    func testExportDigestIsTheWrittenFilesDigest() throws {
        let out = try TestAssets.temporaryDirectory(self)
        let model = try LanguageModel.open(path: bf16)
        for (name, limit) in [("one", 5 << 30), ("shards", 1 << 14)] {
            let digest = SHA256Stream()
            let files = try HuggingFaceExport.write(model: model, to: out.path + "/" + name, maxShardBytes: limit, weightsDigest: digest)
            let weights = files.filter { $0.hasSuffix(".safetensors") }
            XCTAssertEqual(weights.count > 1, name == "shards", "\(files)")
            XCTAssertEqual(digest.finish(), try SHA256Digest.files(weights), name)
        }
    }

    func testBF16SourceKeepsItsConfigAndDTypeByDefault() throws {
        let out = try TestAssets.temporaryDirectory(self)
        let model = try LanguageModel.open(path: bf16)
        XCTAssertEqual(HuggingFaceExport.defaultDType(for: model), .bf16)
        let files = try HuggingFaceExport.write(model: model, to: out.path + "/same")
        XCTAssertEqual(files, [out.path + "/same/model.safetensors"])
        XCTAssertEqual(try data(out.path + "/same/config.json"), try data(bf16 + "/config.json"))
        XCTAssertEqual(try data(out.path + "/same/generation_config.json"), try data(bf16 + "/generation_config.json"))
        let header = try safetensorsHeader(files[0])
        XCTAssertEqual((header["model.embed_tokens.weight"] as? [String: Any])?["dtype"] as? String, "BF16")
        // BF16 to BF16 is exact.
        let back = try LanguageModel.open(path: out.path + "/same")
        for name in model.weights.tensorNames {
            XCTAssertEqual(try back.weights.load(name).values, try model.weights.load(name).values, name)
        }

        // --dtype f32: only the dtype line changes.
        try HuggingFaceExport.write(model: model, to: out.path + "/f32", dtype: .f32)
        let source = String(decoding: try data(bf16 + "/config.json"), as: UTF8.self)
        let written = String(decoding: try data(out.path + "/f32/config.json"), as: UTF8.self)
        XCTAssertEqual(written, source.replacingOccurrences(of: "\"dtype\": \"bfloat16\"", with: "\"dtype\": \"float32\""))
        XCTAssertNotEqual(written, source)
    }

    func testTokenizerAndGenerationFilesAreCopiedByteForByte() throws {
        let tmp = try TestAssets.temporaryDirectory(self)
        let source = try copy(bf16, into: tmp, name: "src")
        let tokenizer = try data(TestAssets.fixture("tokenizer-llama3/tokenizer.json"))
        try tokenizer.write(to: URL(fileURLWithPath: source + "/tokenizer.json"))
        let template = "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\\n\\n{{ m['content'] }}<|eot_id|>{% endfor %}"
        let tokenizerConfig = "{\n  \"bos_token\": \"<|begin_of_text|>\",\n  \"chat_template\": \"\(template)\",\n  \"eos_token\": \"<|eot_id|>\",\n  \"model_max_length\": 131072,\n  \"tokenizer_class\": \"PreTrainedTokenizerFast\"\n}"
        let carried: [String: Data] = [
            "tokenizer_config.json": Data(tokenizerConfig.utf8),
            "special_tokens_map.json": Data("{\"bos_token\": \"<|begin_of_text|>\"}".utf8),
            "chat_template.jinja": Data("{{ messages[0]['content'] }}\n".utf8),
            "merges.txt": Data("#version: 0.2\nh e\n".utf8),
            "additional_chat_templates/tool_use.jinja": Data("{{ tools }}".utf8),
        ]
        try FileManager.default.createDirectory(atPath: source + "/additional_chat_templates", withIntermediateDirectories: true)
        for (name, bytes) in carried { try bytes.write(to: URL(fileURLWithPath: source + "/" + name)) }
        // Not tokenizer or generation files: never copied.
        for name in ["README.md", "pytorch_model.bin", "training_args.json", "model.safetensors.bak", "optimizer.pt"] {
            try Data("x".utf8).write(to: URL(fileURLWithPath: source + "/" + name))
        }
        XCTAssertEqual(try HuggingFaceExport.carriedFiles(in: source),
                       ["additional_chat_templates/tool_use.jinja", "chat_template.jinja", "generation_config.json", "merges.txt",
                        "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"])

        let out = tmp.path + "/out"
        try HuggingFaceExport.write(model: try LanguageModel.open(path: source), to: out)
        for (name, bytes) in carried { XCTAssertEqual(try data(out + "/" + name), bytes, name) }
        XCTAssertEqual(try data(out + "/tokenizer.json"), tokenizer)
        XCTAssertEqual(try data(out + "/generation_config.json"), try data(bf16 + "/generation_config.json"))
        XCTAssertEqual(try data(out + "/config.json"), try data(bf16 + "/config.json"))
        let listing = Set(try FileManager.default.contentsOfDirectory(atPath: out))
        XCTAssertEqual(listing, ["additional_chat_templates", "chat_template.jinja", "config.json", "generation_config.json", "merges.txt",
                                 "model.safetensors", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"])
    }

    /// Shards the bf16 fixture into three files whose grouping is not by name, as `ShardedSafeTensors` reads it.
    func makeShardedSource(in tmp: URL) throws -> (directory: String, weightMap: [String: String]) {
        let source = try copy(bf16, into: tmp, name: "sharded")
        try FileManager.default.removeItem(atPath: source + "/model.safetensors")
        let model = try LanguageModel.open(path: bf16)
        let names = model.weights.tensorNames.sorted()
        var assignment: [String: String] = [:]
        for (i, name) in names.enumerated() { assignment[name] = ShardLayout.standardName(i % 3, of: 3) }
        var writer = SafeTensorsWriter(directory: source)
        writer.layout = .files((0..<3).map { ShardLayout.standardName($0, of: 3) }, assignment: assignment)
        writer.indexHasTotalParameters = true
        for name in names {
            let e = model.weights.entry(name)!
            try writer.add(name: name, matrix: try model.weights.load(name), shape: e.shape, dtype: .bf16)
        }
        _ = try writer.finish()
        return (source, assignment)
    }

    func index(_ directory: String) throws -> [String: Any] {
        try JSONSerialization.jsonObject(with: data(directory + "/model.safetensors.index.json")) as! [String: Any]
    }

    func testShardedSourceKeepsItsShardNamesAndWeightMap() throws {
        let tmp = try TestAssets.temporaryDirectory(self)
        let (source, assignment) = try makeShardedSource(in: tmp)
        let model = try LanguageModel.open(path: source)
        XCTAssertTrue(model.weights is ShardedSafeTensors)
        let out = tmp.path + "/out"
        let files = try HuggingFaceExport.write(model: model, to: out)
        let shardNames = (0..<3).map { ShardLayout.standardName($0, of: 3) }
        XCTAssertEqual(files.map { ($0 as NSString).lastPathComponent }, shardNames + ["model.safetensors.index.json"])
        let idx = try index(out)
        XCTAssertEqual(idx["weight_map"] as? [String: String], assignment)
        XCTAssertEqual(idx["weight_map"] as? [String: String], try index(source)["weight_map"] as? [String: String])
        var dataBytes = 0
        for name in shardNames {
            let path = out + "/" + name
            let headerLength = try data(path).prefix(8).withUnsafeBytes { Int($0.loadUnaligned(as: UInt64.self).littleEndian) }
            dataBytes += try data(path).count - 8 - headerLength
            // Each shard holds what the source's shard of that name held.
            let keys = Set(try safetensorsHeader(path).keys).subtracting(["__metadata__"])
            XCTAssertEqual(keys, Set(assignment.filter { $0.value == name }.keys), name)
        }
        let metadata = idx["metadata"] as? [String: Any]
        XCTAssertEqual(metadata?["total_size"] as? Int, dataBytes)
        XCTAssertEqual(metadata?["total_size"] as? Int, try index(source)["metadata"].flatMap { ($0 as? [String: Any])?["total_size"] as? Int })
        XCTAssertEqual(metadata?["total_parameters"] as? Int, model.weights.tensorNames.reduce(0) { $0 + model.weights.entry($1)!.elementCount })
        XCTAssertEqual(try data(out + "/config.json"), try data(bf16 + "/config.json"))
        let back = try LanguageModel.open(path: out)
        for name in model.weights.tensorNames {
            XCTAssertEqual(try back.weights.load(name).values, try model.weights.load(name).values, name)
        }
    }

    /// F32 from BF16 doubles the bytes: as many shards, cut in the source's order, total_size right.
    func testShardedSourceWithAWiderDTypeKeepsTheShardCount() throws {
        let tmp = try TestAssets.temporaryDirectory(self)
        let (source, _) = try makeShardedSource(in: tmp)
        let model = try LanguageModel.open(path: source)
        let out = tmp.path + "/out"
        let files = try HuggingFaceExport.write(model: model, to: out, dtype: .f32)
        XCTAssertEqual(files.map { ($0 as NSString).lastPathComponent },
                       (0..<3).map { ShardLayout.standardName($0, of: 3) } + ["model.safetensors.index.json"])
        let idx = try index(out)
        let map = try XCTUnwrap(idx["weight_map"] as? [String: String])
        XCTAssertEqual(Set(map.keys), Set(model.weights.tensorNames))
        let elements = model.weights.tensorNames.reduce(0) { $0 + model.weights.entry($1)!.elementCount }
        XCTAssertEqual((idx["metadata"] as? [String: Any])?["total_size"] as? Int, elements * 4)
        // Contiguous runs of the source's order (shard by shard, then by position in the file).
        let sharded = model.weights as! ShardedSafeTensors
        var order: [String] = []
        for f in sharded.shardFiles { order += try sharded.shard(f).tensorNames }
        let shardOfEach = order.map { map[$0]! }
        XCTAssertEqual(shardOfEach, shardOfEach.sorted())
        XCTAssertEqual(Set(shardOfEach).count, 3)
        XCTAssertEqual(try data(out + "/config.json"),
                       Data(String(decoding: try data(bf16 + "/config.json"), as: UTF8.self)
                            .replacingOccurrences(of: "\"bfloat16\"", with: "\"float32\"").utf8))
    }

    /// The six-shard bf16 fixture as transformers saved it: its layout and index are reproduced
    /// (read straight from the shards; opening it as a model is another task's).
    func testTinyLlama3ShardLayoutAndConfigAreKept() throws {
        let source = TestAssets.fixture("tiny-llama3")
        let layout = try HuggingFaceExport.sourceWeightLayout(directory: source, dtype: .bf16)
        XCTAssertTrue(layout.totalParameters)
        let sharded = try ShardedSafeTensors(directory: source)
        XCTAssertEqual(layout.shards, .files(sharded.shardFiles, assignment: sharded.weightMap))
        let out = try TestAssets.temporaryDirectory(self).path
        var writer = SafeTensorsWriter(directory: out)
        writer.layout = layout.shards
        writer.indexHasTotalParameters = layout.totalParameters
        for name in sharded.tensorNames {
            try writer.add(name: name, matrix: try sharded.load(name), shape: sharded.entry(name)!.shape, dtype: .bf16)
        }
        let files = try writer.finish()
        XCTAssertEqual(files.map { ($0 as NSString).lastPathComponent }, sharded.shardFiles + ["model.safetensors.index.json"])
        let written = try JSONSerialization.jsonObject(with: data(out + "/model.safetensors.index.json")) as! [String: Any]
        let original = try JSONSerialization.jsonObject(with: data(source + "/model.safetensors.index.json")) as! [String: Any]
        XCTAssertEqual(written["weight_map"] as? [String: String], original["weight_map"] as? [String: String])
        XCTAssertEqual(written["metadata"] as? [String: Int], original["metadata"] as? [String: Int])
        // Its config.json (no final newline, eos_token_id a list) is kept byte for byte.
        let config = try data(source + "/config.json")
        XCTAssertEqual(try HuggingFaceConfigFile.settingDType(config, to: "bfloat16", path: "config.json"), config)
        let f32 = String(decoding: try HuggingFaceConfigFile.settingDType(config, to: "float32", path: "config.json"), as: UTF8.self)
        XCTAssertEqual(f32, String(decoding: config, as: UTF8.self).replacingOccurrences(of: "\"dtype\": \"bfloat16\"", with: "\"dtype\": \"float32\""))
        // F32 output: six shards again.
        guard case .count(6, let order)? = try HuggingFaceExport.sourceWeightLayout(directory: source, dtype: .f32).shards else {
            return XCTFail("expected six shards cut in the source's order")
        }
        XCTAssertEqual(Set(order), Set(sharded.tensorNames))
    }

    func testCountLayoutSplitsIntoNonEmptyContiguousRuns() {
        let sizes = [100, 1, 1, 1, 50, 50, 1000, 1]
        let names = sizes.indices.map { "t\($0)" }
        for n in 1...8 {
            let shards = ShardLayout.count(n, order: names).shards(of: Array(sizes.indices), bytes: { sizes[$0] }, name: { names[$0] })
            XCTAssertEqual(shards.count, n)
            XCTAssertEqual(shards.flatMap(\.1), Array(sizes.indices))
            XCTAssertTrue(shards.allSatisfy { !$0.1.isEmpty })
            XCTAssertEqual(shards.map(\.0), (0..<n).map { ShardLayout.standardName($0, of: n) })
        }
    }

    /// GGUF: tokenizer_config.json, special_tokens_map.json and generation_config.json from the metadata.
    func testGGUFSourceGivesTokenizerConfigWithSpecialTokensAndChatTemplate() throws {
        let model = try LanguageModel.open(path: TestAssets.smolLM2)
        let out = try TestAssets.temporaryDirectory(self).path
        var config = model.config
        config.ropeLayout = .rotateHalf
        let layout = try HuggingFaceExport.writeNonWeightFiles(model: model, config: config, dtype: .f32, to: out)
        XCTAssertNil(layout.shards)
        let meta = try GGUFFile(path: TestAssets.smolLM2).metadata
        let tc = try OrderedJSON.parse(data(out + "/tokenizer_config.json"))
        XCTAssertEqual(tc["bos_token"]?.string, "<|im_start|>")
        XCTAssertEqual(tc["eos_token"]?.string, "<|im_end|>")
        XCTAssertEqual(tc["pad_token"]?.string, "<|im_end|>")
        XCTAssertEqual(tc["unk_token"]?.string, "<|endoftext|>")
        let template = try XCTUnwrap(meta["tokenizer.chat_template"]?.string)
        XCTAssertEqual(tc["chat_template"]?.string, template)
        XCTAssertEqual(tc["add_bos_token"]?.bool, false)
        XCTAssertNil(tc["add_eos_token"])
        XCTAssertEqual(tc["model_max_length"]?.int, 8192)
        XCTAssertEqual(tc["tokenizer_class"]?.string, "PreTrainedTokenizerFast")
        XCTAssertEqual(tc["clean_up_tokenization_spaces"]?.bool, false)
        let added = try XCTUnwrap(tc["added_tokens_decoder"]?.members)
        XCTAssertEqual(added.map(\.key), (0...16).map(String.init))
        XCTAssertEqual(added[2].value, .object([
            .init("content", .string("<|im_end|>")), .init("lstrip", .bool(false)), .init("normalized", .bool(false)),
            .init("rstrip", .bool(false)), .init("single_word", .bool(false)), .init("special", .bool(true)),
        ]))
        let keys = tc.members!.map(\.key)
        XCTAssertEqual(keys, keys.sorted())

        let map = try OrderedJSON.parse(data(out + "/special_tokens_map.json"))
        XCTAssertEqual(map["bos_token"]?["content"]?.string, "<|im_start|>")
        XCTAssertEqual(map["pad_token"]?["content"]?.string, "<|im_end|>")
        let generation = try OrderedJSON.parse(data(out + "/generation_config.json"))
        XCTAssertEqual([generation["bos_token_id"]?.int, generation["eos_token_id"]?.int, generation["pad_token_id"]?.int], [1, 2, 2])

        // The float fields read back as the GGUF's decimals, not as widened Float32 values.
        let configText = String(decoding: try data(out + "/config.json"), as: UTF8.self)
        XCTAssertTrue(configText.contains("\"rms_norm_eps\": 1e-05,"), configText)
        XCTAssertTrue(configText.contains("\"rope_theta\": 100000.0,"), configText)
        XCTAssertFalse(configText.contains("9.99999"), configText)
        let parsed = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(configText.utf8)) as? [String: Any])
        XCTAssertEqual(parsed["model_type"] as? String, "llama")
        XCTAssertEqual(parsed["torch_dtype"] as? String, "float32")
    }

    func testLlama2CSourceGivesTokenizerConfigWithBOSAndEOS() throws {
        let model = try LanguageModel.open(path: TestAssets.stories260K, tokenizerPath: TestAssets.stories260KTokenizer)
        let out = try TestAssets.temporaryDirectory(self).path
        _ = try HuggingFaceExport.writeNonWeightFiles(model: model, config: model.config, dtype: .f32, to: out)
        let tc = try OrderedJSON.parse(data(out + "/tokenizer_config.json"))
        XCTAssertEqual(tc["bos_token"]?.string, "<s>")
        XCTAssertEqual(tc["eos_token"]?.string, "</s>")
        XCTAssertEqual(tc["unk_token"]?.string, "<unk>")
        XCTAssertEqual(tc["add_bos_token"]?.bool, true)
        XCTAssertNil(tc["chat_template"])
        XCTAssertEqual(tc["added_tokens_decoder"]?.members?.map(\.key), ["0", "1", "2"])
        XCTAssertTrue(FileManager.default.fileExists(atPath: out + "/tokenizer.json"))
        let generation = try OrderedJSON.parse(data(out + "/generation_config.json"))
        XCTAssertEqual([generation["bos_token_id"]?.int, generation["eos_token_id"]?.int], [1, 2])
        XCTAssertTrue(String(decoding: try data(out + "/config.json"), as: UTF8.self).contains("\"rms_norm_eps\": 1e-05,"))
    }
}
