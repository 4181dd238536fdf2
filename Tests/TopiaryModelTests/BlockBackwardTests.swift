import Foundation
import XCTest
import TopiaryTensor
import TopiaryTestSupport
@testable import TopiaryModel

/// The hand-written backward pass against central differences of an independent Float64 forward
/// pass written from the maths, for every linear of LLaMA (both RoPE layouts, grouped KV heads)
/// and OPT (pre-LN and post-LN, with biases) blocks.
final class BlockBackwardTests: XCTestCase {
    static let sequenceLength = 8
    static let sequences = 2

    static func config(_ arch: Architecture, layout: RopeLayout = .rotateHalf, preLN: Bool = true) -> ModelConfig {
        var c = ModelConfig(architecture: arch, hiddenSize: 16, intermediateSize: 32, layerCount: 1, headCount: 4,
                            kvHeadCount: arch == .opt ? 4 : 2, headDim: arch == .qwen3 ? 8 : nil, vocabularySize: 32, maxPositions: 64,
                            normEps: 1e-5, tieWordEmbeddings: false, ropeLayout: layout, layerNormBefore: preLN)
        switch arch {
        case .qwen2: c.qkvBias = true
        case .qwen3: c.qkNorm = true
        case .mistral: c.slidingWindow = 3
        case .gemma2:
            c.slidingWindow = 3
            c.slidingLayers = [true]
            c.attentionSoftcap = 1.5
            c.queryScaleBase = 6
            c.activation = .geluTanh
        case .mixtral:
            c.expertCount = 4
            c.expertsPerToken = 2
        case .qwen3MoE:
            c.qkNorm = true
            c.expertCount = 4
            c.expertsPerToken = 2
            c.expertIntermediateSize = 12
            c.normalizeTopK = false
        default: break
        }
        return c
    }

    static func randomBlock(_ c: ModelConfig, seed: UInt64) -> DecoderBlock {
        var rng = SplitMix(seed: seed)
        var tensors: [String: Matrix] = [:]
        for spec in c.family.blockTensors(c, block: 0) {
            let name = spec.name
            let shape = (rows: spec.rows, cols: spec.cols)
            let isNorm = name.contains("norm")
            tensors[name] = Matrix(rows: shape.rows, cols: shape.cols) { p in
                for i in p.indices {
                    let u = rng.uniform()
                    if isNorm { p[i] = name.hasSuffix(".weight") ? 1 + 0.3 * u : 0.2 * u }
                    else if name.hasSuffix(".bias") { p[i] = 0.3 * u }
                    else { p[i] = 0.6 * u }
                }
            }
        }
        return DecoderBlock(config: c, index: 0, tensors: tensors)
    }

    static func randomMatrix(_ rows: Int, _ cols: Int, seed: UInt64, scale: Float = 1) -> Matrix {
        var rng = SplitMix(seed: seed)
        return Matrix(rows: rows, cols: cols) { p in for i in p.indices { p[i] = scale * rng.uniform() } }
    }

    // MARK: the checks

    func testLlamaRotateHalfGradients() { check(Self.config(.llama, layout: .rotateHalf), seed: 1) }
    func testLlamaAdjacentPairsGradients() { check(Self.config(.llama, layout: .adjacentPairs), seed: 2) }
    func testOPTPreLNGradients() { check(Self.config(.opt, preLN: true), seed: 3) }
    func testOPTPostLNGradients() { check(Self.config(.opt, preLN: false), seed: 4) }
    func testQwen2BiasGradients() { check(Self.config(.qwen2), seed: 5) }
    func testQwen3HeadNormGradients() { check(Self.config(.qwen3), seed: 6) }
    func testMistralSlidingWindowGradients() { check(Self.config(.mistral), seed: 7) }
    func testGemma2Gradients() { check(Self.config(.gemma2), seed: 8) }
    func testMixtralExpertGradients() { check(Self.config(.mixtral), seed: 9) }
    /// Qwen3-MoE: experts of their own width, top-k weights not renormalised.
    func testQwen3MoEExpertGradients() { check(Self.config(.qwen3MoE), seed: 10) }

    /// The recording forward is the model's forward, to the bit.
    func testRecordingForwardEqualsForward() {
        let configs = [Self.config(.llama), Self.config(.llama, layout: .adjacentPairs), Self.config(.opt), Self.config(.opt, preLN: false),
                       Self.config(.qwen2), Self.config(.qwen3), Self.config(.mistral), Self.config(.gemma2), Self.config(.mixtral),
                       Self.config(.qwen3MoE)]
        for (i, c) in configs.enumerated() {
            let block = Self.randomBlock(c, seed: 10 + UInt64(i))
            let x = Self.randomMatrix(Self.sequences * Self.sequenceLength, c.hiddenSize, seed: 20 + UInt64(i))
            XCTAssertEqual(block.forwardRecording(x, sequenceLength: Self.sequenceLength).output,
                           block.forward(x, sequenceLength: Self.sequenceLength), "\(c.architecture)")
        }
    }

    /// Every family's forward and backward through a CheckingBackend: the CPU backend's bits,
    /// every call's shapes checked and results finite, and no transfer between the block's
    /// tensors going up and the gradients coming down.
    func testEveryFamilyRunsOnTheCheckingBackendWithoutTransfers() {
        let configs = [Self.config(.llama), Self.config(.llama, layout: .adjacentPairs), Self.config(.opt), Self.config(.opt, preLN: false),
                       Self.config(.qwen2), Self.config(.qwen3), Self.config(.mistral), Self.config(.gemma2), Self.config(.mixtral),
                       Self.config(.qwen3MoE)]
        for (i, c) in configs.enumerated() {
            let block = Self.randomBlock(c, seed: 40 + UInt64(i))
            let x = Self.randomMatrix(Self.sequences * Self.sequenceLength, c.hiddenSize, seed: 50 + UInt64(i))
            let dy = Self.randomMatrix(x.rows, x.cols, seed: 60 + UInt64(i))
            let checking = CheckingBackend()
            let device = block.on(checking)
            let (input, gradient) = (checking.upload(x), checking.upload(dy))
            let (y, grads) = checking.withoutTransfers("block") { () -> (Tensor, [String: Tensor]) in
                let (y, tape) = device.forwardRecording(input, sequenceLength: Self.sequenceLength)
                return (y, device.weightGradients(outputGradient: gradient, tape: tape))
            }
            XCTAssertEqual(checking.violations, [], "\(c.architecture)")
            XCTAssertEqual(checking.counts.uploads, block.tensors.count + 2 + (c.family.rmsNormOffset != 0 ? 4 : 0), "\(c.architecture)")
            XCTAssertEqual(checking.counts.downloads, 0, "\(c.architecture)")
            let (tape, expected) = (block.forwardRecording(x, sequenceLength: Self.sequenceLength), block.forward(x, sequenceLength: Self.sequenceLength))
            XCTAssertEqual(checking.download(y), expected, "\(c.architecture)")
            let cpuGrads = block.weightGradients(outputGradient: dy, tape: tape.tape)
            XCTAssertEqual(Set(grads.keys), Set(block.linearNames), "\(c.architecture)")
            for name in block.linearNames { XCTAssertEqual(checking.download(grads[name]!), cpuGrads[name], "\(c.architecture) \(name)") }
        }
    }

    /// A transfer inside a block's window is recorded as a violation naming the window.
    func testATransferInsideTheBlockWindowIsAViolation() {
        let c = Self.config(.llama)
        let block = Self.randomBlock(c, seed: 70)
        let checking = CheckingBackend()
        let device = block.on(checking)
        let x = checking.upload(Self.randomMatrix(Self.sequenceLength, c.hiddenSize, seed: 71))
        checking.withoutTransfers("block 0") {
            // A forward that brings its output to the host mid-block, as the old host-side pass did.
            let y = device.forward(x, sequenceLength: Self.sequenceLength)
            _ = checking.download(y)
        }
        XCTAssertEqual(checking.violations.count, 1)
        XCTAssertTrue(checking.violations.first?.contains("'block 0'") ?? false, "\(checking.violations)")
    }

    /// Attention with more than one query block (the backward recomputes P block by block).
    func testAttentionBackwardAcrossQueryBlocks() {
        let (t, heads, kvHeads, d) = (300, 2, 1, 4)
        let q = Self.randomMatrix(t, heads * d, seed: 31), k = Self.randomMatrix(t, kvHeads * d, seed: 32)
        let v = Self.randomMatrix(t, kvHeads * d, seed: 33), r = Self.randomMatrix(t, heads * d, seed: 34)
        let backend = CheckingBackend()
        let g = backend.attentionBackward(q: backend.upload(q), k: backend.upload(k), v: backend.upload(v), outputGradient: backend.upload(r),
                                          shape: AttentionShape(sequenceLength: t, heads: heads, kvHeads: kvHeads, headDim: d),
                                          options: .standard(headDim: d))
        let (dq, dk, dv) = (backend.download(g.dq), backend.download(g.dk), backend.download(g.dv))
        XCTAssertEqual(backend.violations, [])
        func loss(_ q: Matrix, _ k: Matrix, _ v: Matrix) -> Double {
            let o = ReferenceBlock.attention(q.values.map(Double.init), k.values.map(Double.init), v.values.map(Double.init),
                                             tokens: t, sequenceLength: t, heads: heads, kvHeads: kvHeads, headDim: d)
            return zip(o, r.values).reduce(0) { $0 + $1.0 * Double($1.1) }
        }
        for (which, grad) in [(0, dq), (1, dk), (2, dv)] {
            for (row, col) in [(0, 0), (17, 3), (255, 1), (256, 2), (299, grad.cols - 1), (120, 0)] {
                var plus = [q, k, v], minus = [q, k, v]
                let h: Float = 1e-2
                plus[which][row, col] += h
                minus[which][row, col] -= h
                let hd = Double(plus[which][row, col]) - Double(minus[which][row, col])
                let fd = (loss(plus[0], plus[1], plus[2]) - loss(minus[0], minus[1], minus[2])) / hd
                XCTAssertEqual(Double(grad[row, col]), fd, accuracy: 1e-3 * max(1, abs(fd)), "input \(which) at (\(row), \(col))")
            }
        }
    }

    /// Loss L = Σ R⊙Y for a fixed random R, so ∂L/∂Y = R. For each linear: central differences
    /// of L (Float64 reference forward) on a spread of entries, and along a random direction
    /// over the whole matrix.
    func check(_ c: ModelConfig, seed: UInt64, file: StaticString = #filePath, line: UInt = #line) {
        let block = Self.randomBlock(c, seed: seed)
        let tokens = Self.sequences * Self.sequenceLength
        let x = Self.randomMatrix(tokens, c.hiddenSize, seed: seed + 100)
        let r = Self.randomMatrix(tokens, c.hiddenSize, seed: seed + 200)
        let (y, tape) = block.forwardRecording(x, sequenceLength: Self.sequenceLength)
        let grads = block.weightGradients(outputGradient: r, tape: tape)
        XCTAssertEqual(Set(grads.keys), Set(block.linearNames), file: file, line: line)

        let reference = ReferenceBlock(block: block, sequenceLength: Self.sequenceLength)
        let x64 = x.values.map(Double.init), r64 = r.values.map(Double.init)
        // The reference forward is the same function.
        let y64 = reference.forward(x64)
        let yScale = y.values.map { abs(Double($0)) }.max()!
        for (a, b) in zip(y.values, y64) { XCTAssertEqual(Double(a), b, accuracy: 1e-5 * yScale, "forward", file: file, line: line) }

        func loss(_ ref: ReferenceBlock) -> Double { zip(ref.forward(x64), r64).reduce(0) { $0 + $1.0 * $1.1 } }
        let h = 1e-5
        for name in block.linearNames {
            let g = grads[name]!
            let w = block.weight(name)
            XCTAssertEqual(g.rows, w.rows, file: file, line: line)
            XCTAssertEqual(g.cols, w.cols, file: file, line: line)
            // Entries: every 5th, with an offset per layer so all rows and columns are touched.
            var errorSquares = 0.0, normSquares = 0.0, worst = 0.0, largest = 0.0
            var entries: [(Int, Double)] = []
            for i in stride(from: name.count % 5, to: w.count, by: 5) {
                var plus = reference, minus = reference
                plus.weights[name]![i] += h
                minus.weights[name]![i] -= h
                let fd = (loss(plus) - loss(minus)) / (2 * h)
                entries.append((i, fd))
                largest = max(largest, abs(fd))
            }
            for (i, fd) in entries {
                let analytic = Double(g.values[i])
                errorSquares += (analytic - fd) * (analytic - fd)
                normSquares += fd * fd
                worst = max(worst, abs(analytic - fd) / max(abs(fd), 1e-2 * largest))
            }
            let relative = (errorSquares / normSquares).squareRoot()
            XCTAssertLessThan(relative, 1e-3, "\(c.architecture) \(name): relative error \(relative) over \(entries.count) entries", file: file, line: line)
            XCTAssertLessThan(worst, 1e-3, "\(c.architecture) \(name): worst entry relative error \(worst)", file: file, line: line)
            XCTAssertGreaterThan(largest, 1e-3, "\(name): gradient too small to test anything", file: file, line: line)

            // Directional derivative along a random direction D: (L(W+hD) − L(W−hD))/2h = ⟨G, D⟩.
            let direction = Self.randomMatrix(w.rows, w.cols, seed: seed + 300 + UInt64(name.count)).values.map(Double.init)
            var plus = reference, minus = reference
            for i in 0..<w.count { plus.weights[name]![i] += h * direction[i]; minus.weights[name]![i] -= h * direction[i] }
            let fd = (loss(plus) - loss(minus)) / (2 * h)
            let analytic = zip(g.values, direction).reduce(0.0) { $0 + Double($1.0) * $1.1 }
            XCTAssertEqual(analytic, fd, accuracy: 1e-3 * abs(fd), "\(c.architecture) \(name): directional derivative", file: file, line: line)
        }
    }
}

/// A decoder block in Float64, written from the maths (norm, project, rotate, attend, project,
/// add), sharing no code with the model's forward pass.
struct ReferenceBlock {
    let config: ModelConfig
    let sequenceLength: Int
    var weights: [String: [Double]]
    var vectors: [String: [Double]]
    /// Input features of each linear.
    var inputs: [String: Int] = [:]
    let prefix: String

    init(block: DecoderBlock, sequenceLength: Int) {
        config = block.config
        self.sequenceLength = sequenceLength
        prefix = WeightNames.blockPrefix(config.architecture, 0)
        var w: [String: [Double]] = [:], v: [String: [Double]] = [:]
        for (name, m) in block.tensors {
            if name.hasSuffix(".weight") && !name.contains("norm") {
                w[String(name.dropLast(".weight".count))] = m.values.map(Double.init)
                inputs[String(name.dropLast(".weight".count))] = m.cols
            }
            else { v[name] = m.values.map(Double.init) }
        }
        weights = w
        vectors = v
    }

    /// x [tokens x in] (row-major) times Wᵀ [out x in], plus the bias if there is one.
    func linear(_ x: [Double], _ name: String) -> [Double] {
        let w = weights[name]!
        let bias = vectors[name + ".bias"]
        let inputs = self.inputs[name]!
        let outputs = w.count / inputs
        let tokens = x.count / inputs
        var y = [Double](repeating: 0, count: tokens * outputs)
        for t in 0..<tokens {
            for o in 0..<outputs {
                var s = bias?[o] ?? 0
                for i in 0..<inputs { s += x[t * inputs + i] * w[o * inputs + i] }
                y[t * outputs + o] = s
            }
        }
        return y
    }

    func rmsNorm(_ x: [Double], _ g: [Double]) -> [Double] {
        let n = g.count
        let offset = Double(config.family.rmsNormOffset)
        var y = x
        for t in 0..<(x.count / n) {
            let row = x[(t * n)..<((t + 1) * n)]
            let scale = 1 / ((row.reduce(0) { $0 + $1 * $1 } / Double(n)) + Double(config.normEps)).squareRoot()
            for c in 0..<n { y[t * n + c] = x[t * n + c] * scale * (g[c] + offset) }
        }
        return y
    }

    func layerNorm(_ x: [Double], _ g: [Double], _ b: [Double]) -> [Double] {
        let n = g.count
        var y = x
        for t in 0..<(x.count / n) {
            let row = Array(x[(t * n)..<((t + 1) * n)])
            let mean = row.reduce(0, +) / Double(n)
            let variance = row.reduce(0) { $0 + ($1 - mean) * ($1 - mean) } / Double(n)
            let scale = 1 / (variance + Double(config.normEps)).squareRoot()
            for c in 0..<n { y[t * n + c] = (row[c] - mean) * scale * g[c] + b[c] }
        }
        return y
    }

    func rope(_ x: [Double], heads: Int) -> [Double] {
        let d = config.headDim, half = d / 2
        let width = heads * d
        var y = x
        for t in 0..<(x.count / width) {
            let pos = Double(t % sequenceLength)
            for h in 0..<heads {
                let base = t * width + h * d
                for i in 0..<half {
                    let angle = pos * pow(Double(config.ropeTheta), -Double(2 * i) / Double(d))
                    let (i0, i1) = config.ropeLayout == .adjacentPairs ? (2 * i, 2 * i + 1) : (i, i + half)
                    let a = x[base + i0], b = x[base + i1]
                    y[base + i0] = a * cos(angle) - b * sin(angle)
                    y[base + i1] = a * sin(angle) + b * cos(angle)
                }
            }
        }
        return y
    }

    /// Causal softmax attention per sequence and head; query head h reads key/value head h / group.
    static func attention(_ q: [Double], _ k: [Double], _ v: [Double], tokens: Int, sequenceLength: Int,
                          heads: Int, kvHeads: Int, headDim d: Int, scaleBase: Double? = nil, window: Int? = nil,
                          softcap: Double? = nil) -> [Double] {
        let qDim = heads * d, kvDim = kvHeads * d, group = heads / kvHeads
        var o = [Double](repeating: 0, count: tokens * qDim)
        for s in 0..<(tokens / sequenceLength) {
            for h in 0..<heads {
                let kh = h / group
                for i in 0..<sequenceLength {
                    let qi = (s * sequenceLength + i) * qDim + h * d
                    var scores = [Double](repeating: 0, count: i + 1)
                    for j in 0...i {
                        let kj = (s * sequenceLength + j) * kvDim + kh * d
                        var dot = 0.0
                        for e in 0..<d { dot += q[qi + e] * k[kj + e] }
                        scores[j] = dot / (scaleBase ?? Double(d)).squareRoot()
                        if let softcap { scores[j] = softcap * tanh(scores[j] / softcap) }
                        if let window, i - j >= window { scores[j] = -Double.infinity }
                    }
                    let m = scores.max()!
                    let exps = scores.map { exp($0 - m) }
                    let total = exps.reduce(0, +)
                    for j in 0...i {
                        let vj = (s * sequenceLength + j) * kvDim + kh * d
                        for e in 0..<d { o[qi + e] += exps[j] / total * v[vj + e] }
                    }
                }
            }
        }
        return o
    }

    func attend(_ q: [Double], _ k: [Double], _ v: [Double]) -> [Double] {
        Self.attention(q, k, v, tokens: q.count / config.queryDim, sequenceLength: sequenceLength,
                       heads: config.headCount, kvHeads: config.kvHeadCount, headDim: config.headDim,
                       scaleBase: config.queryScaleBase.map(Double.init), window: config.window(block: 0),
                       softcap: config.attentionSoftcap.map(Double.init))
    }

    /// RMSNorm over each head's slice.
    func headNorm(_ x: [Double], _ g: [Double]) -> [Double] { rmsNorm(x, g) }

    func activation(_ g: Double) -> Double {
        switch config.activation {
        case .silu: return g / (1 + exp(-g))
        case .geluTanh: return 0.5 * g * (1 + tanh((2 / Double.pi).squareRoot() * (g + 0.044715 * g * g * g)))
        case .relu: return max(g, 0)
        }
    }

    func gatedMLP(_ b: [Double], gate: String, up: String, down: String) -> [Double] {
        let g = linear(b, gate), u = linear(b, up)
        return linear(zip(g, u).map { activation($0) * $1 }, down)
    }

    /// The mixture: top-k experts of the router's softmax, weights renormalised (Mixtral) or the
    /// plain probabilities (Qwen3-MoE without norm_topk_prob).
    func mixture(_ b: [Double]) -> [Double] {
        let h = config.hiddenSize, e = config.expertCount
        let mixtral = config.architecture == .mixtral
        let logits = linear(b, prefix + (mixtral ? "block_sparse_moe.gate" : "mlp.gate"))
        var out = [Double](repeating: 0, count: b.count)
        for t in 0..<(b.count / h) {
            let row = Array(logits[(t * e)..<((t + 1) * e)])
            let chosen = (0..<e).sorted { row[$0] > row[$1] }.prefix(config.expertsPerToken)
            let total = config.normalizeTopK ? chosen.reduce(0.0) { $0 + exp(row[$1]) } : row.reduce(0.0) { $0 + exp($1) }
            let x = Array(b[(t * h)..<((t + 1) * h)])
            for j in chosen {
                let y = mixtral ? gatedMLP(x, gate: prefix + "block_sparse_moe.experts.\(j).w1", up: prefix + "block_sparse_moe.experts.\(j).w3",
                                           down: prefix + "block_sparse_moe.experts.\(j).w2")
                    : gatedMLP(x, gate: prefix + "mlp.experts.\(j).gate_proj", up: prefix + "mlp.experts.\(j).up_proj",
                               down: prefix + "mlp.experts.\(j).down_proj")
                for c in 0..<h { out[t * h + c] += exp(row[j]) / total * y[c] }
            }
        }
        return out
    }

    func forward(_ x: [Double]) -> [Double] {
        let p = prefix
        func add(_ a: [Double], _ b: [Double]) -> [Double] { zip(a, b).map { $0 + $1 } }
        switch config.architecture {
        case .llama, .mistral, .qwen2, .qwen3, .phi3, .mixtral, .gemma2, .qwen3MoE:
            let gemma = config.architecture == .gemma2
            let a = rmsNorm(x, vectors[p + "input_layernorm.weight"]!)
            var q = linear(a, p + "self_attn.q_proj"), k = linear(a, p + "self_attn.k_proj")
            if config.qkNorm {
                q = headNorm(q, vectors[p + "self_attn.q_norm.weight"]!)
                k = headNorm(k, vectors[p + "self_attn.k_norm.weight"]!)
            }
            q = rope(q, heads: config.headCount)
            k = rope(k, heads: config.kvHeadCount)
            let v = linear(a, p + "self_attn.v_proj")
            var attended = linear(attend(q, k, v), p + "self_attn.o_proj")
            if gemma { attended = rmsNorm(attended, vectors[p + "post_attention_layernorm.weight"]!) }
            let h = add(x, attended)
            let b = rmsNorm(h, vectors[p + (gemma ? "pre_feedforward_layernorm.weight" : "post_attention_layernorm.weight")]!)
            var f = config.hasExperts(block: 0) ? mixture(b)
                : gatedMLP(b, gate: p + "mlp.gate_proj", up: p + "mlp.up_proj", down: p + "mlp.down_proj")
            if gemma { f = rmsNorm(f, vectors[p + "post_feedforward_layernorm.weight"]!) }
            return add(h, f)
        case .opt:
            func norm1(_ z: [Double]) -> [Double] { layerNorm(z, vectors[p + "self_attn_layer_norm.weight"]!, vectors[p + "self_attn_layer_norm.bias"]!) }
            func norm2(_ z: [Double]) -> [Double] { layerNorm(z, vectors[p + "final_layer_norm.weight"]!, vectors[p + "final_layer_norm.bias"]!) }
            let pre = config.layerNormBefore
            let a = pre ? norm1(x) : x
            let o = attend(linear(a, p + "self_attn.q_proj"), linear(a, p + "self_attn.k_proj"), linear(a, p + "self_attn.v_proj"))
            var h = add(x, linear(o, p + "self_attn.out_proj"))
            if !pre { h = norm1(h) }
            let f = linear(pre ? norm2(h) : h, p + "fc1").map { max($0, 0) }
            let y = add(h, linear(f, p + "fc2"))
            return pre ? y : norm2(y)
        }
    }
}
