import Foundation
import TopiaryCluster
import TopiaryModel
import TopiaryPrune
import CTopiarySupport
import TopiaryTensor
import TopiaryTokenizers

// Before anything else: run again with a faster OpenBLAS kernel where OpenBLAS chose a slow one
// (BLASKernel: a CPU it does not recognise gets Prescott).
BLASKernel.preferExecutable()
// malloc's thresholds for this program (CTopiarySupport's memory.c).
_ = topiary_configure_malloc()

/// Benchmarks that print ratios measured in one run: achieved rates over the machine's own
/// measured sgemm rate, so figures compare across machines.
func now() -> Double { Date().timeIntervalSince1970 }

/// Best-of-`repeats` seconds of `body`.
func best(_ repeats: Int, _ body: () -> Void) -> Double {
    var t = Double.infinity
    for _ in 0..<repeats {
        let s = now()
        body()
        t = min(t, now() - s)
    }
    return t
}

func randomMatrix(_ r: Int, _ c: Int, seed: UInt64) -> Matrix {
    var state = seed
    return Matrix(rows: r, cols: c) { p in
        for i in p.indices {
            state = state &* 6364136223846793005 &+ 1442695040888963407
            p[i] = Float(Int64(bitPattern: state >> 11) % 2000) / 1000 - 1
        }
    }
}

/// The CPU backend, which every benchmark here measures (Linalg is reached only through it).
let cpu = CPUBackend()

/// x · Wᵀ on the host, through the CPU backend.
func hostLinear(_ x: Matrix, _ w: Matrix) -> Matrix { cpu.download(cpu.linear(cpu.upload(x), cpu.upload(w))) }

/// A · B on the host, through the CPU backend.
func hostMatmul(_ a: Matrix, _ b: Matrix) -> Matrix { cpu.download(cpu.matmul(cpu.upload(a), cpu.upload(b))) }

/// sgemm GFLOP/s for C[m x n] = A[m x k] Bᵀ (the linear-layer shape).
func sgemmRate(m: Int, n: Int, k: Int) -> Double {
    let a = randomMatrix(m, k, seed: 1), b = randomMatrix(n, k, seed: 2)
    _ = hostLinear(a, b)
    let t = best(3) { _ = hostLinear(a, b) }
    return 2.0 * Double(m * n * k) / t / 1e9
}

func argument(_ name: String, _ args: [String]) -> String? {
    guard let i = args.firstIndex(of: "--" + name), i + 1 < args.count else { return nil }
    return args[i + 1]
}

func benchForward(_ args: [String]) throws {
    guard let path = argument("model", args) else { throw ToolFailure("bench forward: --model PATH is required") }
    let seqlen = Int(argument("seqlen", args) ?? "2048")!
    let blocks = Int(argument("blocks", args) ?? "2")!
    let model = try LanguageModel.open(path: path)
    let c = model.config
    print("model \(path)")
    print("  hidden \(c.hiddenSize), ffn \(c.intermediateSize), heads \(c.headCount)/\(c.kvHeadCount), seqlen \(seqlen), BLAS threads \(CPUBackend.threadCount)")

    // The machine's sgemm rate on the block's own GEMM shapes, and on a large square product.
    let shapes = [(seqlen, c.queryDim, c.hiddenSize), (seqlen, c.kvDim, c.hiddenSize), (seqlen, c.intermediateSize, c.hiddenSize),
                  (seqlen, c.hiddenSize, c.intermediateSize)]
    var peak = sgemmRate(m: 2048, n: 2048, k: 2048)
    for (m, n, k) in shapes { peak = max(peak, sgemmRate(m: m, n: n, k: k)) }
    print(String(format: "  measured sgemm rate (best over shapes): %.1f GFLOP/s", peak))

    let x = randomMatrix(seqlen, c.hiddenSize, seed: 3)
    let rope = c.ropeTable(positions: seqlen)
    var linearFlops = 0.0
    for b in 0..<blocks {
        let block = try model.loadBlock(b)
        for name in block.linearNames {
            let w = block.weight(name)
            linearFlops += 2.0 * Double(seqlen) * Double(w.rows * w.cols)
        }
    }
    linearFlops /= Double(blocks)
    // Causal attention: QKᵀ and PV over the lower triangle (as computed, in 256-row query blocks).
    var attnFlops = 0.0
    var i0 = 0
    while i0 < seqlen {
        let i1 = min(i0 + 256, seqlen)
        attnFlops += 2.0 * 2.0 * Double((i1 - i0) * i1 * c.headDim * c.headCount)
        i0 = i1
    }
    // This VM's speed drifts by 2x within seconds (other tenants), so each measurement is taken
    // as a ratio to an sgemm timing made just before it on the largest of the block's shapes,
    // and the median of five such ratios is printed.
    let (fm, fn, fk) = shapes[2]
    let probeA = randomMatrix(fm, fk, seed: 1), probeB = randomMatrix(fn, fk, seed: 2)
    func probeRate() -> Double { 2.0 * Double(fm * fn * fk) / best(2) { _ = hostLinear(probeA, probeB) } / 1e9 }
    func median(_ v: [Double]) -> Double { v.sorted()[v.count / 2] }
    let q = cpu.upload(randomMatrix(seqlen, c.queryDim, seed: 5)), k = cpu.upload(randomMatrix(seqlen, c.kvDim, seed: 6))
    let v = cpu.upload(randomMatrix(seqlen, c.kvDim, seed: 7))
    let shape = AttentionShape(sequenceLength: seqlen, heads: c.headCount, kvHeads: c.kvHeadCount, headDim: c.headDim)
    let options = AttentionOptions(scale: 1 / Float(c.headDim).squareRoot())
    var forwardTimes: [Double] = [], projectionTimes: [Double] = [], attentionTimes: [Double] = []
    var forwardRatios: [Double] = [], projectionRatios: [Double] = [], attentionRatios: [Double] = []
    for b in 0..<blocks {
        let block = try model.loadBlock(b)
        _ = block.forward(x, sequenceLength: seqlen, rope: rope)
        // The projections alone (the GEMM-heavy part), on inputs of their real shapes.
        let inputs = block.linearNames.map { randomMatrix(seqlen, block.weight($0).cols, seed: 4) }
        for _ in 0..<5 {
            var rate = probeRate()
            let f = best(1) { _ = block.forward(x, sequenceLength: seqlen, rope: rope) }
            forwardTimes.append(f); forwardRatios.append((linearFlops + attnFlops) / f / 1e9 / rate)
            rate = probeRate()
            let p = best(1) { for (name, input) in zip(block.linearNames, inputs) { _ = hostLinear(input, block.weight(name)) } }
            projectionTimes.append(p); projectionRatios.append(linearFlops / p / 1e9 / rate)
            rate = probeRate()
            let a = best(1) { _ = cpu.attention(q: q, k: k, v: v, shape: shape, options: options) }
            attentionTimes.append(a); attentionRatios.append(attnFlops / a / 1e9 / rate)
        }
    }
    let forwardSeconds = median(forwardTimes), projectionSeconds = median(projectionTimes), attentionSeconds = median(attentionTimes)
    print(String(format: "  block forward: %.3f s per block (median), %.0f tokens/s, %.1f GFLOP/s (%.2f GFLOP linear + %.2f GFLOP attention)",
                 forwardSeconds, Double(seqlen) / forwardSeconds, (linearFlops + attnFlops) / forwardSeconds / 1e9, linearFlops / 1e9, attnFlops / 1e9))
    print(String(format: "  projections alone: %.3f s, %.1f GFLOP/s", projectionSeconds, linearFlops / projectionSeconds / 1e9))
    print(String(format: "  attention alone: %.3f s, %.1f GFLOP/s", attentionSeconds, attnFlops / attentionSeconds / 1e9))
    print(String(format: "  the rest (norms, RoPE, activation, residuals, copies): about %.3f s", forwardSeconds - projectionSeconds - attentionSeconds))
    print("  ratios to the sgemm rate measured just before each timing (median of \(forwardRatios.count); min-max):")
    for (name, r) in [("projections", projectionRatios), ("attention", attentionRatios), ("block forward", forwardRatios)] {
        print(String(format: "  ratio %@ / sgemm: %.2f  (%.2f-%.2f)", name, median(r), r.min()!, r.max()!))
    }
    print(String(format: "  whole model (%d blocks) at this rate: %.0f tokens/s", c.layerCount, Double(seqlen) / forwardSeconds / Double(c.layerCount)))

    // --windows N: a prune's calibration shape (N windows of seqlen tokens), run as one forward
    // call over all N against N calls of one window each, alternating (the same FLOPs).
    let windows = Int(argument("windows", args) ?? "1")!
    guard windows > 1 else { return }
    let all = randomMatrix(windows * seqlen, c.hiddenSize, seed: 8)
    let parts = (0..<windows).map { all.rows($0 * seqlen..<($0 + 1) * seqlen) }
    let block = try model.loadBlock(0)
    var together: [Double] = [], apart: [Double] = []
    for _ in 0..<5 {
        apart.append(best(1) { for p in parts { _ = block.forward(p, sequenceLength: seqlen, rope: rope) } })
        together.append(best(1) { _ = block.forward(all, sequenceLength: seqlen, rope: rope) })
    }
    let flops = Double(windows) * (linearFlops + attnFlops)
    print(String(format: "  %d windows of %d: one call %.3f s (%.1f GFLOP/s), one call a window %.3f s (%.1f GFLOP/s); medians of 5, alternating",
                 windows, seqlen, median(together), flops / median(together) / 1e9, median(apart), flops / median(apart) / 1e9))
}

/// SparseGPT on every linear shape of the model's first block, with the Hessian of real
/// calibration-like inputs: seconds per layer, and FLOPs at the measured sgemm rate over seconds.
func benchSparseGPT(_ args: [String]) throws {
    guard let path = argument("model", args) else { throw ToolFailure("bench sparsegpt: --model PATH is required") }
    let tokens = Int(argument("tokens", args) ?? "4096")!
    let model = try LanguageModel.open(path: path)
    let block = try model.loadBlock(0)
    let c = model.config
    print("model \(path), block 0, Hessians from \(tokens) tokens, BLAS threads \(CPUBackend.threadCount)")
    var peak = sgemmRate(m: 2048, n: 2048, k: 2048)
    for n in Set([c.hiddenSize, c.intermediateSize]) { peak = max(peak, sgemmRate(m: c.intermediateSize, n: n, k: n)) }
    print(String(format: "  measured sgemm rate: %.1f GFLOP/s", peak))
    print("  linear                          shape        seconds   solver GFLOP   ratio (FLOPs at sgemm rate / seconds)")
    var totalSeconds = 0.0, totalIdeal = 0.0
    var hessians: [Int: Matrix] = [:]
    for name in block.linearNames {
        let w = block.weight(name)
        let n = w.cols
        if hessians[n] == nil {
            // Correlated inputs with uneven feature scales, accumulated as the pruner does.
            let stats = LayerStatistics(columns: n)
            let x = hostMatmul(randomMatrix(tokens, n / 4, seed: 5), randomMatrix(n / 4, n, seed: 6))
            var noisy = x
            let noise = randomMatrix(tokens, n, seed: 7)
            noisy.withUnsafeMutableBufferPointer { p in noise.withUnsafeBufferPointer { q in for i in p.indices { p[i] += 0.1 * q[i] } } }
            stats.add(noisy)
            hessians[n] = stats.hessian
        }
        let h = hessians[n]!
        _ = try SparseGPTPruner.prune(w, hessian: h, pattern: .unstructured(0.5))
        let seconds = best(3) { _ = try? SparseGPTPruner.prune(w, hessian: h, pattern: .unstructured(0.5)) }
        let rows = Double(w.rows), cols = Double(n)
        // Cholesky of the reversed Hessian (n³/3), its triangular inverse (n³/3), lazy block
        // updates (≈ rows·n²), in-block column updates (≈ rows·n·128).
        let flops = 2.0 / 3.0 * cols * cols * cols + rows * cols * cols + rows * cols * 128
        let ideal = flops / (peak * 1e9)
        totalSeconds += seconds
        totalIdeal += ideal
        print("  " + name.padding(toLength: 30, withPad: " ", startingAt: 0) + "  " + "\(w.rows)x\(n)".padding(toLength: 11, withPad: " ", startingAt: 0)
              + String(format: "  %7.4f   %12.3f   %.2f", seconds, flops / 1e9, ideal / seconds))
    }
    print(String(format: "  block total: %.3f s; ratio %.2f; whole model (%d blocks) ≈ %.1f s of solver time",
                 totalSeconds, totalIdeal / totalSeconds, c.layerCount, totalSeconds * Double(c.layerCount)))
}

/// Runs SparseGPT on raw little-endian float32 files (W [rows x cols], H [cols x cols]) and writes
/// the pruned weights: for comparing against an independent port of the reference algorithm.
func sparseGPTRaw(_ args: [String]) throws {
    guard let w = argument("weight", args), let h = argument("hessian", args), let out = argument("out", args),
          let rows = argument("rows", args).flatMap(Int.init), let cols = argument("cols", args).flatMap(Int.init) else {
        throw ToolFailure("sparsegpt-raw --weight F --hessian F --rows R --cols C --out F (--sparsity S | --pattern N:M)")
    }
    func read(_ path: String, _ count: Int) throws -> Matrix {
        let data = try Data(contentsOf: URL(fileURLWithPath: path))
        guard data.count == count * 4 else { throw ToolFailure("\(path): \(data.count) bytes, expected \(count * 4)") }
        return Matrix(rows: 1, cols: count) { p in data.withUnsafeBytes { raw in for i in 0..<count { p[i] = raw.loadUnaligned(fromByteOffset: i * 4, as: Float.self) } } }
    }
    let weight = try read(w, rows * cols).reshaped(rows: rows, cols: cols)
    let hessian = try read(h, cols * cols).reshaped(rows: cols, cols: cols)
    let pattern = try SparsityPattern.parse(sparsity: argument("sparsity", args), pattern: argument("pattern", args))
    let result = try SparseGPTPruner.prune(weight, hessian: hessian, pattern: pattern)
    let bytes = result.weight.withUnsafeBufferPointer { Data(buffer: $0) }
    try bytes.write(to: URL(fileURLWithPath: out))
    print(String(format: "loss %.6f", result.loss))
}

/// Block 0's inputs for `samples` calibration windows of `seqlen` tokens of the text `calib` (seed 0,
/// as `topiary prune` draws them), embedded; activations beyond 4 GiB spill into `work`.
func calibrationInputs(model: LanguageModel, calib: String, samples: Int, seqlen: Int, work: String) throws -> ActivationStore {
    let text = try String(contentsOfFile: calib, encoding: .utf8)
    let windows = try Calibration.windows(tokens: model.tokenizer!.encode(text, addBOS: nil), samples: samples, sequenceLength: seqlen, seed: 0)
    let inputs = ActivationStore(count: samples, rows: seqlen, cols: model.config.hiddenSize, budgetBytes: 1 << 32, spillDirectory: work)
    let embedding = try model.loadEmbedding()
    for (i, w) in windows.enumerated() { try inputs.set(i, embedding.embed(w, sequenceLength: seqlen)) }
    return inputs
}

/// Seconds per block of SparseLLM and of SparseGPT on the same blocks and calibration windows.
func benchSparseLLM(_ args: [String]) throws {
    guard let path = argument("model", args), let calib = argument("calib", args) else {
        throw ToolFailure("bench sparsellm: --model PATH --calib TEXT are required")
    }
    let samples = Int(argument("samples", args) ?? "32")!
    let seqlen = Int(argument("seqlen", args) ?? "512")!
    let blocks = Int(argument("blocks", args) ?? "2")!
    let sparsity = Double(argument("sparsity", args) ?? "0.7")!
    let model = try LanguageModel.open(path: path)
    let work = FileManager.default.temporaryDirectory.appendingPathComponent("topiary-bench-\(getpid())").path
    defer { try? FileManager.default.removeItem(atPath: work) }
    var inputs = try calibrationInputs(model: model, calib: calib, samples: samples, seqlen: seqlen, work: work)
    print("model \(path), \(samples) x \(seqlen) calibration tokens, \(Int(sparsity * 100))% sparsity, blocks 0..<\(blocks), BLAS threads \(CPUBackend.threadCount)")
    print("  block   sparsegpt s   sparsellm s   ratio   block output error sparsegpt / sparsellm")
    var totals = (0.0, 0.0)
    for b in 0..<blocks {
        let block = try model.loadBlock(b)
        let t0 = now()
        let g = try BlockPruner(plan: PrunePlan(method: .sparsegpt, pattern: .unstructured(sparsity))).prune(block: block, inputs: inputs, sequenceLength: seqlen)
        let t1 = now()
        let l = try BlockPruner(plan: PrunePlan(method: .sparsellm, pattern: .unstructured(sparsity))).prune(block: block, inputs: inputs, sequenceLength: seqlen)
        let t2 = now()
        totals.0 += t1 - t0
        totals.1 += t2 - t1
        print(String(format: "  %5d   %11.2f   %11.2f   %5.2f   %.5f / %.5f", b, t1 - t0, t2 - t1, (t2 - t1) / (t1 - t0), g.report.outputError, l.report.outputError))
        inputs = l.outputs
    }
    print(String(format: "  per block: sparsegpt %.2f s, sparsellm %.2f s, ratio sparsellm / sparsegpt %.2f", totals.0 / Double(blocks), totals.1 / Double(blocks), totals.1 / totals.0))
}

/// SparseGPT's OBS column loop against `--weight-update admm` on the first blocks of a model: per
/// linear the relative output error ‖(W − Ŵ)X‖²/‖WX‖², per block the output error and seconds.
/// Each block's inputs are the OBS run's pruned outputs of the block before, so both see the same.
func benchWeightUpdate(_ args: [String]) throws {
    guard let path = argument("model", args), let calib = argument("calib", args) else {
        throw ToolFailure("bench weight-update: --model PATH --calib TEXT are required")
    }
    let samples = Int(argument("samples", args) ?? "32")!
    let seqlen = Int(argument("seqlen", args) ?? "512")!
    let blocks = Int(argument("blocks", args) ?? "2")!
    let pattern = try SparsityPattern.parse(sparsity: argument("sparsity", args), pattern: argument("pattern", args) ?? (argument("sparsity", args) == nil ? "2:4" : nil))
    var admm = ADMMPruner.Options()
    if let k = argument("iterations", args).flatMap(Int.init) { admm.iterations = k }
    if let r = argument("rho", args).flatMap(Double.init) { admm.rho = r }
    if let g = argument("growth", args).flatMap(Double.init) { admm.rhoGrowth = g }
    if let st = argument("step", args).flatMap(Int.init) { admm.rhoStep = st }
    if let f = argument("refit", args).flatMap(Int.init) { admm.refitIterations = f }
    let model = try LanguageModel.open(path: path)
    let work = FileManager.default.temporaryDirectory.appendingPathComponent("topiary-bench-\(getpid())").path
    defer { try? FileManager.default.removeItem(atPath: work) }
    var inputs = try calibrationInputs(model: model, calib: calib, samples: samples, seqlen: seqlen, work: work)
    print("model \(path), \(samples) x \(seqlen) calibration tokens, \(pattern), blocks 0..<\(blocks), ADMM \(admm)")
    for b in 0..<blocks {
        let block = try model.loadBlock(b)
        let t0 = now()
        let obs = try BlockPruner(plan: PrunePlan(method: .sparsegpt, pattern: pattern)).prune(block: block, inputs: inputs, sequenceLength: seqlen)
        let t1 = now()
        let viaADMM = try BlockPruner(plan: PrunePlan(method: .sparsegpt, pattern: pattern, sparseGPT: .init(admm: admm)))
            .prune(block: block, inputs: inputs, sequenceLength: seqlen)
        let t2 = now()
        for (o, a) in zip(obs.report.linears, viaADMM.report.linears) {
            let (name, o, a) = (o.name, o.errorAfter ?? .nan, a.errorAfter ?? .nan)
            print("  block \(b) " + name.padding(toLength: 28, withPad: " ", startingAt: 0)
                  + String(format: " obs %.5f  admm %.5f  ratio %.3f", o, a, a / o))
        }
        print(String(format: "  block %d output error obs %.5f (%.1f s)  admm %.5f (%.1f s)  ratio %.3f", b, obs.report.outputError, t1 - t0,
                     viaADMM.report.outputError, t2 - t1, viaADMM.report.outputError / obs.report.outputError))
        inputs = obs.outputs
    }
}

/// BESA on SmolLM2 blocks: seconds per block (and the block output error beside Wanda's), and the
/// block's forward+backward pass (one calibration window) at its GEMM FLOP count over the sgemm
/// rate measured in the same run.
func benchBESA(_ args: [String]) throws {
    guard let path = argument("model", args), let calib = argument("calib", args) else {
        throw ToolFailure("bench besa: --model PATH --calib TEXT are required")
    }
    let samples = Int(argument("samples", args) ?? "32")!
    let seqlen = Int(argument("seqlen", args) ?? "512")!
    let blocks = Int(argument("blocks", args) ?? "2")!
    let sparsity = Double(argument("sparsity", args) ?? "0.5")!
    let epochs = Int(argument("epochs", args) ?? "1")!
    let model = try LanguageModel.open(path: path)
    let c = model.config
    let work = FileManager.default.temporaryDirectory.appendingPathComponent("topiary-bench-\(getpid())").path
    defer { try? FileManager.default.removeItem(atPath: work) }
    var inputs = try calibrationInputs(model: model, calib: calib, samples: samples, seqlen: seqlen, work: work)
    print("model \(path), \(samples) x \(seqlen) calibration tokens, \(Int(sparsity * 100))% sparsity, \(epochs) epoch(s), blocks 0..<\(blocks), BLAS threads \(CPUBackend.threadCount)")

    // The machine's sgemm rate on the block's own GEMM shapes (as bench forward).
    let shapes = [(seqlen, c.queryDim, c.hiddenSize), (seqlen, c.kvDim, c.hiddenSize), (seqlen, c.intermediateSize, c.hiddenSize),
                  (seqlen, c.hiddenSize, c.intermediateSize)]
    var peak = sgemmRate(m: 2048, n: 2048, k: 2048)
    for (m, n, k) in shapes { peak = max(peak, sgemmRate(m: m, n: n, k: k)) }
    print(String(format: "  measured sgemm rate (best over shapes): %.1f GFLOP/s", peak))

    // GEMM FLOPs of one window's forward+backward as computed: forward linears 2TP; backward dW
    // for all linears (2TP) and dX for o/gate/up/down (LLaMA) or out/fc1/fc2 (OPT); attention
    // forward 2 GEMMs, backward 5 (P recomputed, dV, dP, dQ, dK), over the causal query blocks.
    let block0 = try model.loadBlock(0)
    var forwardFlops = 0.0, backwardFlops = 0.0
    for (i, name) in block0.linearNames.enumerated() {
        let n = Double(block0.weight(name).count)
        forwardFlops += 2 * Double(seqlen) * n
        backwardFlops += 2 * Double(seqlen) * n * (i >= 3 ? 2 : 1)
    }
    var attentionGEMM = 0.0
    var i0 = 0
    while i0 < seqlen {
        let i1 = min(i0 + 256, seqlen)
        attentionGEMM += 2.0 * Double((i1 - i0) * i1 * c.headDim * c.headCount)
        i0 = i1
    }
    forwardFlops += 2 * attentionGEMM
    backwardFlops += 5 * attentionGEMM
    let x = try inputs.get(0)
    let rope = c.ropeTable(positions: seqlen)
    let dy = randomMatrix(seqlen, c.hiddenSize, seed: 11)
    _ = block0.weightGradients(outputGradient: dy, tape: block0.forwardRecording(x, sequenceLength: seqlen, rope: rope).tape)
    let forwardSeconds = best(3) { _ = block0.forwardRecording(x, sequenceLength: seqlen, rope: rope) }
    let tape = block0.forwardRecording(x, sequenceLength: seqlen, rope: rope).tape
    let backwardSeconds = best(3) { _ = block0.weightGradients(outputGradient: dy, tape: tape) }
    let both = forwardSeconds + backwardSeconds
    print(String(format: "  forward (recording): %.4f s, %.2f GFLOP, %.1f GFLOP/s", forwardSeconds, forwardFlops / 1e9, forwardFlops / forwardSeconds / 1e9))
    print(String(format: "  backward (weight gradients): %.4f s, %.2f GFLOP, %.1f GFLOP/s", backwardSeconds, backwardFlops / 1e9, backwardFlops / backwardSeconds / 1e9))
    print(String(format: "  ratio forward+backward / sgemm: %.2f", (forwardFlops + backwardFlops) / both / 1e9 / peak))

    // Two host loops apart: SwiGLU's backward over a window's feed-forward activations (once a
    // step), and the ranking of the widest linear's rows (once a block, before the steps).
    do {
        let (g, u, dm) = (cpu.upload(randomMatrix(seqlen, c.intermediateSize, seed: 12)), cpu.upload(randomMatrix(seqlen, c.intermediateSize, seed: 13)),
                          cpu.upload(randomMatrix(seqlen, c.intermediateSize, seed: 14)))
        let activation = best(7) { _ = cpu.gatedActivationBackward(dm, gate: g, up: u, .silu) }
        let scores = cpu.upload(randomMatrix(c.intermediateSize, c.hiddenSize, seed: 15))
        let ranking = best(3) { _ = cpu.rankRows(scores) }
        print(String(format: "  SwiGLU backward, %d x %d: %.2f ms; rankRows, %d x %d: %.1f ms", seqlen, c.intermediateSize, activation * 1e3,
                     c.intermediateSize, c.hiddenSize, ranking * 1e3))
    }
    print("  block   wanda s   besa s   besa step s   output error wanda / besa")
    var total = 0.0
    for b in 0..<blocks {
        let block = try model.loadBlock(b)
        let t0 = now()
        let w = try BlockPruner(plan: PrunePlan(method: .wanda, pattern: .unstructured(sparsity))).prune(block: block, inputs: inputs, sequenceLength: seqlen)
        let t1 = now()
        let plan = PrunePlan(method: .besa, pattern: .unstructured(sparsity), besa: BESA.Options(epochs: epochs))
        let r = try BlockPruner(plan: plan).prune(block: block, inputs: inputs, sequenceLength: seqlen)
        let t2 = now()
        total += t2 - t1
        let steps = Double(r.report.besa?.steps ?? 1)
        print(String(format: "  %5d   %7.2f   %6.2f   %11.3f   %.5f / %.5f", b, t1 - t0, t2 - t1, (t2 - t1) / steps, w.report.outputError, r.report.outputError))
        inputs = r.outputs
    }
    print(String(format: "  per block: besa %.2f s; whole model (%d blocks) ≈ %.0f s", total / Double(blocks), c.layerCount, total / Double(blocks) * Double(c.layerCount)))
}

/// Activation transfer over loopback through the wire protocol (frames, CRC32C, chunking,
/// decoding into matrices) against a raw socket copy of the same bytes, in the same run.
func benchTransfer(_ args: [String]) throws {
    let megabytes = Int(argument("megabytes", args) ?? "512")!
    // Default: one SmolLM2 window of 2048 tokens, 4.5 MiB (--rows 4096 --cols 8192: a 70B window, 128 MiB).
    let rows = Int(argument("rows", args) ?? "2048")!, cols = Int(argument("cols", args) ?? "576")!
    let perTensor = rows * cols * 4
    let count = max(1, megabytes * (1 << 20) / perTensor)
    let tensor = randomMatrix(rows, cols, seed: 9)
    let secret = try SharedSecret(bytes: Array("bench transfer secret 0123456789".utf8))
    print("transfer: \(count) tensors of \(rows)x\(cols) f32 (\(count * perTensor >> 20) MiB) over 127.0.0.1; CRC32C in hardware: \(CRC32C.usesHardware)")

    // Raw: the same number of bytes with plain send/recv.
    func rawTrial() throws -> Double {
        let raw = try Listener(endpoint: Endpoint(host: "127.0.0.1", port: 0))
        let bytes = tensor.withUnsafeBufferPointer { Array(UnsafeRawBufferPointer($0)) }
        let rawDone = DispatchSemaphore(value: 0)
        DispatchQueue.global().async {
            if let c = try? raw.accept(timeout: 30) {
                for _ in 0..<count { try? c.sendRawForBenchmark(bytes) }
                c.close()
            }
            rawDone.signal()
        }
        let rc = try Connection.connect(to: raw.endpoint)
        var received = [UInt8](repeating: 0, count: perTensor)
        let t0 = now()
        for _ in 0..<count { try rc.receiveRawForBenchmark(into: &received) }
        let seconds = now() - t0
        rawDone.wait()
        return seconds
    }

    // Protocol: tensors as header + chunks, checksummed, decoded into matrices.
    func wireTrial() throws -> Double {
        let listener = try Listener(endpoint: Endpoint(host: "127.0.0.1", port: 0))
        let done = DispatchSemaphore(value: 0)
        DispatchQueue.global().async {
            if let c = try? listener.accept(timeout: 30) {
                _ = try? c.acceptHandshake(secret: secret, name: "sender")
                for i in 0..<count { try? c.sendTensor(tensor, name: "inputs/\(i)", stream: UInt32(i)) }
                c.close()
            }
            done.signal()
        }
        let c = try Connection.connect(to: listener.endpoint)
        _ = try c.authenticate(secret: secret, name: "receiver", role: 0)
        let t1 = now()
        for _ in 0..<count { _ = try c.receiveTensor() }
        let seconds = now() - t1
        done.wait()
        return seconds
    }

    // Loopback throughput swings with scheduling on a small machine: alternate the two, several
    // times, and compare medians.
    let trials = Int(argument("trials", args) ?? "7")!
    var raws: [Double] = [], wires: [Double] = []
    for _ in 0..<trials {
        raws.append(try rawTrial())
        wires.append(try wireTrial())
    }
    func median(_ v: [Double]) -> Double { let s = v.sorted(); return s.count % 2 == 1 ? s[s.count / 2] : (s[s.count / 2 - 1] + s[s.count / 2]) / 2 }
    let total = Double(count * perTensor) / Double(1 << 30)
    let rawSeconds = median(raws), wireSeconds = median(wires)
    print(String(format: "  raw socket copy: %.2f GiB/s (median of %d; %.2f-%.2f)", total / rawSeconds, trials, total / raws.max()!, total / raws.min()!))
    print(String(format: "  wire protocol:   %.2f GiB/s (median of %d; %.2f-%.2f)", total / wireSeconds, trials, total / wires.max()!, total / wires.min()!))
    print(String(format: "  ratio wire / raw (medians): %.2f", rawSeconds / wireSeconds))
}

/// Tokenizer throughput: a whole text file encoded at once, best of --repeats runs (the first run also
/// warms the caches of the allocator). The tokenizer is a tokenizer.json (--tokenizer PATH) or the one
/// stored in a GGUF file (--model PATH, the default model when neither is given); --dump FILE writes the
/// ids, one per line, to compare tokenizers across versions.
func benchTokenize(_ args: [String]) throws {
    guard let textPath = argument("text", args) else { throw ToolFailure("bench tokenize: --text PATH is required") }
    let repeats = Int(argument("repeats", args) ?? "3")!
    let tokenizer: any Tokenizer
    let source: String
    let loadStart = now()
    if let path = argument("tokenizer", args) {
        tokenizer = try HuggingFaceTokenizer.load(path: path)
        source = path
    } else if let path = argument("model", args) {
        tokenizer = try LanguageModel.ggufTokenizer(try GGUFFile(path: path))
        source = path
    } else {
        throw ToolFailure("bench tokenize: --tokenizer PATH (tokenizer.json) or --model PATH (GGUF) is required")
    }
    let loadSeconds = now() - loadStart
    guard let data = FileManager.default.contents(atPath: textPath) else { throw ToolFailure("bench tokenize: cannot read \(textPath)") }
    let text = String(decoding: data, as: UTF8.self)
    var ids: [Int] = []
    // Wall and thread CPU seconds, best of the runs each: on a shared machine the CPU time is the steadier.
    var seconds = Double.infinity, cpuSeconds = Double.infinity
    for _ in 0..<max(repeats, 1) {
        let cpu0 = threadCPUSeconds(), wall0 = now()
        ids = tokenizer.encode(text, addBOS: false)
        seconds = min(seconds, now() - wall0)
        cpuSeconds = min(cpuSeconds, threadCPUSeconds() - cpu0)
    }
    print("tokenizer \(source) (loaded in \(String(format: "%.2f", loadSeconds)) s)")
    print("text \(textPath): \(data.count) bytes")
    print(String(format: "  tokens %d, seconds %.4f (best of %d), tokens/s %.0f, MB/s %.2f", ids.count, seconds, repeats,
                 Double(ids.count) / seconds, Double(data.count) / seconds / 1e6))
    print(String(format: "  thread CPU seconds %.4f (best of %d), tokens/s by CPU time %.0f", cpuSeconds, repeats,
                 Double(ids.count) / cpuSeconds))
    if let dump = argument("dump", args) {
        var out = ""
        out.reserveCapacity(ids.count * 6)
        for id in ids { out += String(id); out += "\n" }
        try Data(out.utf8).write(to: URL(fileURLWithPath: dump))
        print("  ids written to \(dump)")
    }
}

/// CPU seconds the calling thread has used.
func threadCPUSeconds() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
}

/// GFLOP/s of the dense routines at the shapes pruning uses (SmolLM2's and a Llama-3-8B's
/// linears over 2048 tokens, their Hessians and factors), at `--threads` (default all cores).
func benchLinalg(_ args: [String]) {
    if let t = argument("threads", args).flatMap(Int.init) { CPUBackend.setThreadCount(t) }
    print("threads \(CPUBackend.threadCount)")
    if let width = argument("syrk-columns", args).flatMap(Int.init) {
        // The statistics' update at one width: H's upper triangle += XᵀX for a window of --rows
        // tokens, in the strips Topiary uses for that width and in 128 x 128 blocks (before
        // 2026-12-05) for comparison.
        let rows = argument("rows", args).flatMap(Int.init) ?? 2048
        let x = randomMatrix(rows, width, seed: 3)
        var h = [Float](repeating: 0, count: width * width)
        for side in [Linalg.syrkTile(width), 128] {
            let seconds = best(2) {
                x.withUnsafeBufferPointer { px in
                    h.withUnsafeMutableBufferPointer { ph in
                        Linalg.syrkUpper(n: width, k: rows, alpha: 1, a: px.baseAddress!, lda: width, c: ph.baseAddress!, ldc: width, side: side)
                    }
                }
            }
            print(String(format: "  XᵀX upper, %d columns, %d rows, strips of %d: %.3f s, %.1f GFLOP/s", width, rows, side, seconds,
                         Double(rows) * Double(width) * Double(width + 1) / seconds / 1e9))
        }
        return
    }
    for (m, n, k) in [(2048, 2048, 2048), (2048, 576, 576), (2048, 1536, 576), (2048, 576, 1536), (2048, 4096, 4096), (2048, 14336, 4096), (512, 512, 64)] {
        print(String(format: "  sgemm %5d x %5d x %5d  %6.1f GFLOP/s", m, n, k, sgemmRate(m: m, n: n, k: k)))
    }
    for n in [576, 1536, 4096] {
        let x = cpu.upload(randomMatrix(2048, n, seed: 3))
        let h = cpu.zeros(rows: n, cols: n)
        let ts = best(3) { cpu.syrkAccumulate(x, alpha: 1, into: h) }
        let spd = cpu.zeros(rows: n, cols: n)
        cpu.syrkAccumulate(x, alpha: 1 / 2048, into: spd)
        cpu.addToDiagonal(spd, 0.01)
        let tc = best(3) { _ = try? cpu.cholesky(spd, upper: true, what: "bench") }
        let ti = best(3) { _ = try? cpu.inverseSPD(spd, what: "bench") }
        let tu = best(3) { _ = try? cpu.inverseCholeskyFactor(spd, what: "bench") }
        let nd = Double(n)
        print(String(format: "  n %5d  syrk(2048 rows) %6.1f GFLOP/s  cholesky %6.1f GFLOP/s  inverse %6.1f GFLOP/s  U of the inverse %5.1f ms (%.1f GFLOP/s)",
                     n, 2048 * nd * nd / ts / 1e9, nd * nd * nd / 3 / tc / 1e9, nd * nd * nd / ti / 1e9, tu * 1e3, 2 * nd * nd * nd / 3 / tu / 1e9))
    }
    // The gated activations on one thread, over a window of Gemma-2-2B's feed-forward (2048 x
    // 9216): SwiGLU and GEGLU in the CPU's vectors, and GEGLU as an element loop through the C
    // library's tanhf (how Topiary computed it before 2026-12-07).
    let count = 2048 * 9216
    let (gate, up) = (randomMatrix(2048, 9216, seed: 4).values, randomMatrix(2048, 9216, seed: 5).values)
    var out = gate
    let c: Float = 0.7978845608028654
    let rates: [(String, Double)] = [
        ("SwiGLU, vector", best(5) { out = gate; Kernels.swiglu(gate: &out, up: up, count) }),
        ("GEGLU, vector", best(5) { out = gate; Kernels.geglu(gate: &out, up: up, count) }),
        ("GEGLU, tanhf loop", best(5) {
            out = gate
            for i in 0..<count { out[i] = 0.5 * gate[i] * (1 + tanhf(c * (gate[i] + 0.044715 * gate[i] * gate[i] * gate[i]))) * up[i] }
        }),
    ]
    let copy = best(5) { out = gate; out[0] += 1 }
    for (name, seconds) in rates {
        print("  \(name) (1 thread, 2048 x 9216, the copy subtracted): " + String(format: "%.2f ns an element", (seconds - copy) / Double(count) * 1e9))
    }
}

/// Seconds to load (decode to fp32) blocks of a model at 1 thread and at the machine's threads,
/// the bytes already in the page cache (a first pass reads them), one after the other in one run.
func benchLoad(_ args: [String]) throws {
    guard let path = argument("model", args) else { throw ToolFailure("bench load: --model PATH is required") }
    let blocks = Int(argument("blocks", args) ?? "2")!
    let model = try LanguageModel.open(path: path)
    let threads = Linalg.threadCount
    var bytes = 0
    for b in 0..<blocks { bytes += try model.loadBlock(b).tensors.values.reduce(0) { $0 + $1.count * 4 } }
    print("model \(path): \(blocks) block(s), \(bytes >> 20) MiB as fp32 (page cache warmed by a first pass)")
    for t in Array(Set([1, threads])).sorted() {
        Linalg.setThreadCount(t)
        var times: [Double] = []
        for _ in 0..<3 {
            let t0 = Date()
            for b in 0..<blocks { _ = try model.loadBlock(b) }
            times.append(Date().timeIntervalSince(t0) / Double(blocks))
        }
        print(String(format: "  threads %2d: %.3f s a block (best of 3), %.2f GB/s of fp32 written", t, times.min()!, Double(bytes) / Double(blocks) / times.min()! / 1e9))
    }
    Linalg.setThreadCount(threads)
}

/// The export of a whole model (`HuggingFaceExport.write`, as `convert` and the end of `prune`
/// do: decode, convert, write, hash) against writing the same number of bytes from memory
/// through the same streaming writer, fsync included, measured in the same run: the ratio says
/// how close the export comes to what the disk takes. Alternates the two, `--repeats` times.
func benchExport(_ args: [String]) throws {
    guard let path = argument("model", args) else { throw ToolFailure("bench export: --model PATH is required") }
    let repeats = Int(argument("repeats", args) ?? "2") ?? 2
    let model = try LanguageModel.open(path: path)
    let dtype = try argument("dtype", args).map { name -> TensorDType in
        guard let t = TensorDType(rawValue: name.uppercased()), [.f32, .f16, .bf16].contains(t) else {
            throw ToolFailure("bench export: --dtype must be f32, f16 or bf16")
        }
        return t
    } ?? HuggingFaceExport.defaultDType(for: model)
    let directory = argument("output", args) ?? FileManager.default.temporaryDirectory.appendingPathComponent("topiary-bench-export-\(getpid())").path
    defer { try? FileManager.default.removeItem(atPath: directory) }
    var exportTimes: [Double] = [], rawTimes: [Double] = []
    var bytes = 0
    for _ in 0..<repeats {
        try? FileManager.default.removeItem(atPath: directory)
        let digest = SHA256Stream()
        var t0 = Date()
        let files = try HuggingFaceExport.write(model: model, to: directory, dtype: dtype, weightsDigest: digest)
        _ = digest.finish()
        exportTimes.append(Date().timeIntervalSince(t0))
        bytes = try files.filter { $0.hasSuffix(".safetensors") }.reduce(0) { $0 + ((try FileManager.default.attributesOfItem(atPath: $1)[.size] as? Int) ?? 0) }
        try? FileManager.default.removeItem(atPath: directory)
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let piece = [UInt8](repeating: 0x5A, count: 1 << 20)
        t0 = Date()
        try AtomicFile.write(to: directory + "/raw.bin", streaming: true) { w in
            var left = bytes
            while left > 0 {
                let n = min(left, piece.count)
                try piece.withUnsafeBytes { try w.write(UnsafeRawBufferPointer(rebasing: $0[..<n])) }
                left -= n
            }
        }
        rawTimes.append(Date().timeIntervalSince(t0))
    }
    let (export, raw) = (exportTimes.min()!, rawTimes.min()!)
    print("model \(path): \(model.config.layerCount) blocks, weights written as \(dtype.rawValue): \(String(format: "%.2f", Double(bytes) / 1e9)) GB")
    print(String(format: "  export (decode, convert, write, SHA-256): best %.2f s, %.2f GB/s  (%@)", export, Double(bytes) / export / 1e9,
                 exportTimes.map { String(format: "%.2f", $0) }.joined(separator: ", ")))
    print(String(format: "  the same bytes from memory, streamed and synced: best %.2f s, %.2f GB/s  (%@)", raw, Double(bytes) / raw / 1e9,
                 rawTimes.map { String(format: "%.2f", $0) }.joined(separator: ", ")))
    print(String(format: "  ratio export / raw write: %.2f", raw / export))
}

struct ToolFailure: Error, CustomStringConvertible {
    let description: String
    init(_ d: String) { description = d }
}

let args = Array(CommandLine.arguments.dropFirst())
do {
    switch args.first {
    case "forward": try benchForward(Array(args.dropFirst()))
    case "sparsegpt": try benchSparseGPT(Array(args.dropFirst()))
    case "sparsegpt-raw": try sparseGPTRaw(Array(args.dropFirst()))
    case "sparsellm": try benchSparseLLM(Array(args.dropFirst()))
    case "weight-update": try benchWeightUpdate(Array(args.dropFirst()))
    case "transfer": try benchTransfer(Array(args.dropFirst()))
    case "besa": try benchBESA(Array(args.dropFirst()))
    case "tokenize": try benchTokenize(Array(args.dropFirst()))
    case "linalg": benchLinalg(Array(args.dropFirst()))
    case "load": try benchLoad(Array(args.dropFirst()))
    case "export": try benchExport(Array(args.dropFirst()))
    case "make-synthetic": try makeSynthetic(Array(args.dropFirst()))
    case "precision": try benchPrecision(Array(args.dropFirst()))
    case "cuda-check": try cudaCheck(Array(args.dropFirst()))
    default:
        FileHandle.standardError.write(Data("usage: topiary-bench forward|sparsegpt|sparsellm|besa|transfer|load --model PATH [--seqlen N] [--blocks K] [--tokens N] [--windows N]\n       topiary-bench export --model PATH [--dtype f32|f16|bf16] [--repeats N] [--output DIR]\n       topiary-bench linalg [--threads N]\n       topiary-bench precision --model PATH --text FILE [--tokenizer PATH] [--seqlen N] [--threads N] [--json FILE]\n       topiary-bench cuda-check [--device cuda:N]\n       topiary-bench make-synthetic --shape llama2-7b|llama3-8b|llama3-70b [--layers N] [--vocab V] [--seed S] [--output DIR]\n       topiary-bench tokenize --text PATH (--model GGUF | --tokenizer tokenizer.json) [--repeats N] [--dump FILE]\n".utf8))
        exit(2)
    }
} catch {
    FileHandle.standardError.write(Data("topiary-bench: \(error)\n".utf8))
    exit(1)
}
