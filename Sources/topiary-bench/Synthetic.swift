import Foundation
import TopiaryModel
import TopiaryTensor

/// `topiary-bench make-synthetic`: random-weight Hugging Face checkpoints with the real block
/// shapes of LLaMA-2-7B, Llama-3.1-8B and a few blocks of a Llama-3-70B, bf16, sharded as the
/// Hub shards them (transformers' greedy packing in module order), for measuring Topiary at real
/// sizes without downloading gated weights. Only the shapes are real: the weights are uniform
/// random with standard deviation 1/sqrt(fan_in) (so activations keep their scale through every
/// linear), norms are 1, and the vocabulary is small (32000 by default) to save disk.
struct SyntheticShape {
    var name: String
    var hidden: Int
    var intermediate: Int
    var heads: Int
    var kvHeads: Int
    var layers: Int
    var vocab: Int
    var maxPositions: Int
    var ropeTheta: Double
    var llama3Rope: Bool
    var bos: Int
    var eos: Int
    /// transformers' `max_shard_size` the Hub checkpoint was saved with (decimal bytes).
    var maxShardBytes: Int
    /// The fixture tokenizer (in ../shared/fixtures) of the same kind, copied when found.
    var tokenizerFixture: String

    static let all: [String: SyntheticShape] = [
        // meta-llama/Llama-2-7b-hf: 2 shards ("10GB").
        "llama2-7b": SyntheticShape(name: "llama2-7b", hidden: 4096, intermediate: 11008, heads: 32, kvHeads: 32, layers: 32,
                                    vocab: 32000, maxPositions: 4096, ropeTheta: 10000, llama3Rope: false, bos: 1, eos: 2,
                                    maxShardBytes: 10_000_000_000, tokenizerFixture: "tokenizer-sentencepiece"),
        // meta-llama/Llama-3.1-8B: 4 shards ("5GB"), llama3 RoPE scaling; vocabulary cut to 32000.
        "llama3-8b": SyntheticShape(name: "llama3-8b", hidden: 4096, intermediate: 14336, heads: 32, kvHeads: 8, layers: 32,
                                    vocab: 32000, maxPositions: 131072, ropeTheta: 500000, llama3Rope: true, bos: 0, eos: 1,
                                    maxShardBytes: 5_000_000_000, tokenizerFixture: "tokenizer-llama3"),
        // meta-llama/Llama-3.1-70B's blocks (80 in the real model; 2 by default here).
        "llama3-70b": SyntheticShape(name: "llama3-70b", hidden: 8192, intermediate: 28672, heads: 64, kvHeads: 8, layers: 2,
                                     vocab: 32000, maxPositions: 131072, ropeTheta: 500000, llama3Rope: true, bos: 0, eos: 1,
                                     maxShardBytes: 5_000_000_000, tokenizerFixture: "tokenizer-llama3"),
    ]

    var headDim: Int { hidden / heads }

    var configJSON: String {
        let rope = llama3Rope
            ? """
              {
                "factor": 8.0,
                "high_freq_factor": 4.0,
                "low_freq_factor": 1.0,
                "original_max_position_embeddings": 8192,
                "rope_type": "llama3"
              }
            """.trimmingCharacters(in: .whitespaces)
            : "null"
        return """
        {
          "architectures": [
            "LlamaForCausalLM"
          ],
          "attention_bias": false,
          "attention_dropout": 0.0,
          "bos_token_id": \(bos),
          "eos_token_id": \(eos),
          "head_dim": \(headDim),
          "hidden_act": "silu",
          "hidden_size": \(hidden),
          "initializer_range": 0.02,
          "intermediate_size": \(intermediate),
          "max_position_embeddings": \(maxPositions),
          "mlp_bias": false,
          "model_type": "llama",
          "num_attention_heads": \(heads),
          "num_hidden_layers": \(layers),
          "num_key_value_heads": \(kvHeads),
          "pretraining_tp": 1,
          "rms_norm_eps": 1e-05,
          "rope_scaling": \(rope),
          "rope_theta": \(ropeTheta),
          "tie_word_embeddings": false,
          "torch_dtype": "bfloat16",
          "use_cache": true,
          "vocab_size": \(vocab)
        }

        """
    }

    /// (name, [rows, cols] or [n], fan-in; 0 for a norm of ones) in transformers' module order.
    var tensors: [(name: String, shape: [Int], fanIn: Int)] {
        let q = heads * headDim, kv = kvHeads * headDim
        var t: [(String, [Int], Int)] = [("model.embed_tokens.weight", [vocab, hidden], 1)]
        for i in 0..<layers {
            let p = "model.layers.\(i)."
            t += [(p + "self_attn.q_proj.weight", [q, hidden], hidden), (p + "self_attn.k_proj.weight", [kv, hidden], hidden),
                  (p + "self_attn.v_proj.weight", [kv, hidden], hidden), (p + "self_attn.o_proj.weight", [hidden, q], q),
                  (p + "mlp.gate_proj.weight", [intermediate, hidden], hidden), (p + "mlp.up_proj.weight", [intermediate, hidden], hidden),
                  (p + "mlp.down_proj.weight", [hidden, intermediate], intermediate),
                  (p + "input_layernorm.weight", [hidden], 0), (p + "post_attention_layernorm.weight", [hidden], 0)]
        }
        t += [("model.norm.weight", [hidden], 0), ("lm_head.weight", [vocab, hidden], hidden)]
        return t
    }
}

/// Uniform values with standard deviation `1/sqrt(fanIn)` from a generator seeded by the run's
/// seed and the tensor's name (so a tensor's values do not depend on which others are written).
func syntheticTensor(name: String, shape: [Int], fanIn: Int, seed: UInt64) -> Matrix {
    let rows = shape.count == 2 ? shape[0] : 1, cols = shape.last!
    if fanIn == 0 { return Matrix(rows: rows, cols: cols, repeating: 1) }
    var h: UInt64 = 0xcbf2_9ce4_8422_2325 ^ seed
    for b in name.utf8 { h = (h ^ UInt64(b)) &* 0x100_0000_01b3 }
    let scale = Float(3.0.squareRoot() / Double(fanIn).squareRoot()), stream = h
    // Rows in chunks across threads, each chunk its own stream (the same values at any thread count).
    let chunkRows = max(1, (1 << 22) / cols)
    let chunks = (rows + chunkRows - 1) / chunkRows
    return Matrix(rows: rows, cols: cols) { all in
        nonisolated(unsafe) let base = all.baseAddress!
        DispatchQueue.concurrentPerform(iterations: chunks) { c in
            var s = stream &+ UInt64(c) &* 0x9e37_79b9_7f4a_7c15
            let lo = c * chunkRows * cols, hi = min(rows, (c + 1) * chunkRows) * cols
            for i in lo..<hi {
                // splitmix64
                s = s &+ 0x9e37_79b9_7f4a_7c15
                var z = s
                z = (z ^ (z >> 30)) &* 0xbf58_476d_1ce4_e5b9
                z = (z ^ (z >> 27)) &* 0x94d0_49bb_1331_11eb
                z ^= z >> 31
                base[i] = (Float(z >> 40) * (2.0 / 16_777_216.0) - 1) * scale
            }
        }
    }
}

func makeSynthetic(_ args: [String]) throws {
    let usage = "make-synthetic --shape llama2-7b|llama3-8b|llama3-70b [--layers N] [--vocab V] [--seed S] [--output DIR] [--tokenizer-from DIR|none]"
    guard let shapeName = argument("shape", args), var shape = SyntheticShape.all[shapeName] else {
        throw ToolFailure("usage: topiary-bench \(usage)")
    }
    if let l = argument("layers", args) {
        guard let n = Int(l), (1...200).contains(n) else { throw ToolFailure("make-synthetic: --layers must be 1-200, got '\(l)'") }
        shape.layers = n
    }
    if let v = argument("vocab", args) {
        guard let n = Int(v), (16...262_144).contains(n) else { throw ToolFailure("make-synthetic: --vocab must be 16-262144, got '\(v)'") }
        shape.vocab = n
    }
    let seed = UInt64(argument("seed", args) ?? "0") ?? 0
    let home = ProcessInfo.processInfo.environment["TOPIARY_CACHE"] ?? (NSHomeDirectory() + "/.cache/topiary")
    let output = argument("output", args) ?? "\(home)/synthetic/\(shape.name)-\(shape.layers)L-seed\(seed)"
    let fm = FileManager.default
    if fm.fileExists(atPath: output + "/config.json") {
        print("exists: \(output)")
        return
    }
    if fm.fileExists(atPath: output) { throw ToolFailure("make-synthetic: \(output) exists and is not a finished checkpoint; remove it first") }

    let tensors = shape.tensors
    let totalBytes = tensors.reduce(0) { $0 + 2 * $1.shape.reduce(1, *) }
    let parent = (output as NSString).deletingLastPathComponent
    try fm.createDirectory(atPath: parent, withIntermediateDirectories: true)
    if let attrs = try? fm.attributesOfFileSystem(forPath: parent), let free = attrs[.systemFreeSize] as? Int, free < totalBytes + (1 << 30) {
        throw ToolFailure("make-synthetic: \(shape.name) with \(shape.layers) blocks needs \(totalBytes >> 20) MiB and \(parent) has \(free >> 20) MiB free; use fewer --layers")
    }
    // Built under a temporary name, renamed into place when complete.
    let staging = output + ".partial-\(getpid())"
    try fm.createDirectory(atPath: staging, withIntermediateDirectories: true)

    // transformers' sharding: module order, a new shard when the next tensor would pass the limit.
    var shards: [[String]] = [[]]
    var current = 0
    for t in tensors {
        let b = 2 * t.shape.reduce(1, *)
        if current + b > shape.maxShardBytes && !shards[shards.count - 1].isEmpty {
            shards.append([])
            current = 0
        }
        shards[shards.count - 1].append(t.name)
        current += b
    }
    var assignment: [String: String] = [:]
    let files = shards.enumerated().map { i, names in
        let f = ShardLayout.standardName(i, of: shards.count)
        for n in names { assignment[n] = f }
        return f
    }
    var writer = SafeTensorsWriter(directory: staging)
    writer.layout = .files(files, assignment: assignment)
    for t in tensors {
        try writer.add(name: t.name, shape: t.shape, dtype: .bf16) {
            syntheticTensor(name: t.name, shape: t.shape, fanIn: t.fanIn, seed: seed)
        }
    }
    print("writing \(shape.name): hidden \(shape.hidden), ffn \(shape.intermediate), heads \(shape.heads)/\(shape.kvHeads), \(shape.layers) blocks, vocab \(shape.vocab), \(String(format: "%.2f", Double(totalBytes) / 1e9)) GB bf16 in \(files.count) shards -> \(output)")
    let t0 = now()
    try AtomicFile.write(Data(shape.configJSON.utf8), to: staging + "/config.json")
    try AtomicFile.write(Data("{\n  \"bos_token_id\": \(shape.bos),\n  \"eos_token_id\": \(shape.eos)\n}\n".utf8), to: staging + "/generation_config.json")
    let tokenizerFrom = argument("tokenizer-from", args)
    if tokenizerFrom != "none" {
        let dir = tokenizerFrom ?? (URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("../../../shared/fixtures/\(shape.tokenizerFixture)").standardized.path)
        if let data = fm.contents(atPath: dir + "/tokenizer.json") {
            try AtomicFile.write(data, to: staging + "/tokenizer.json")
        }
    }
    _ = try writer.finish()
    try fm.moveItem(atPath: staging, toPath: output)
    print(String(format: "done in %.1f s: %@", now() - t0, output))
}
