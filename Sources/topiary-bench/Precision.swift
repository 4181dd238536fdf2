import Foundation
import TopiaryModel
import TopiaryTensor

/// Where Float32's rounding enters the forward pass: one window through every block in Float32
/// (CPUBackend) and in Float64 (Float64Backend), with the relative error ‖h32 − h64‖/‖h64‖
/// (Frobenius, in Float64) of each step's output: the attention input (after the input norm), the
/// attention context (before o_proj), the feed-forward input (after the second norm), the gated
/// activation (before down_proj), and the block's output (the residual stream).
///
/// "accumulated": the Float32 pass from the embedding on (the error eval sees). "local": each
/// block run in Float32 on the Float64 pass's input rounded to Float32, so a column shows what
/// that block's own Float32 arithmetic adds. Last, the loss of the window both ways.
func benchPrecision(_ args: [String]) throws {
    guard let path = argument("model", args) else { throw ToolFailure("bench precision: --model PATH is required") }
    guard let textPath = argument("text", args) else { throw ToolFailure("bench precision: --text FILE is required") }
    let seqlen = Int(argument("seqlen", args) ?? "2048")!
    if let t = argument("threads", args).flatMap(Int.init) { CPUBackend.setThreadCount(t) }
    let model = try LanguageModel.open(path: path, tokenizerPath: argument("tokenizer", args))
    guard let tokenizer = model.tokenizer else { throw ToolFailure("bench precision: \(path) has no tokenizer; pass --tokenizer") }
    let c = model.config
    let all = tokenizer.encode(try String(contentsOfFile: textPath, encoding: .utf8), addBOS: nil)
    guard all.count >= seqlen else { throw ToolFailure("bench precision: \(textPath) has \(all.count) tokens, fewer than \(seqlen)") }
    let window = Array(all.prefix(seqlen))
    let f32 = CPUBackend(), f64 = Float64Backend()
    print("model \(path)\nwindow: the first \(seqlen) tokens of \(textPath); relative error ‖h32 − h64‖/‖h64‖ of each step's output")

    func relative(_ a: Matrix, _ b: [Double]) -> Double {
        var diff = 0.0, norm = 0.0
        a.withUnsafeBufferPointer { p in
            for i in 0..<b.count { let d = Double(p[i]) - b[i]; diff += d * d; norm += b[i] * b[i] }
        }
        return (diff / max(norm, .leastNormalMagnitude)).squareRoot()
    }
    /// The steps, named by the linear whose input each one is.
    let steps = [("attn in", "q_proj"), ("context", "o_proj"), ("ffn in", "gate_proj"), ("act", "down_proj")]
    final class Captured: @unchecked Sendable { var byLinear: [String: Tensor] = [:] }
    func run(_ block: DeviceBlock, _ x: Tensor) -> (Tensor, [String: Tensor]) {
        let captured = Captured()
        let y = block.forward(x, sequenceLength: seqlen, rope: c.ropeTable(positions: seqlen)) { name, input in
            for (_, linear) in steps where name.hasSuffix(linear) { captured.byLinear[linear] = input }
        }
        return (y, captured.byLinear)
    }

    let embedding = try model.loadEmbedding()
    var x32 = embedding.embed(window, sequenceLength: seqlen, on: f32)
    var x64 = embedding.embed(window, sequenceLength: seqlen, on: f64)
    // Float64 everywhere but RoPE's angles, which come from the Float32 table (as transformers's float64 model has them).
    let f64Angles32 = Float64Backend(ropeAngles: .float32Table)
    var x64Angles32 = embedding.embed(window, sequenceLength: seqlen, on: f64Angles32)
    let header = steps.map { $0.0 } + ["output"]
    func cells(_ values: [Double?]) -> String {
        values.map { $0.map { String(format: "%9.2e", $0) } ?? "        -" }.joined(separator: " ")
    }
    print("\n          accumulated (f32 from the embedding on)                 | local (this block in f32 on the f64 input)             | f64, f32 RoPE angles")
    print("block " + header.map { $0.padding(toLength: 9, withPad: " ", startingAt: 0) }.joined(separator: " ")
          + " | " + header.map { $0.padding(toLength: 9, withPad: " ", startingAt: 0) }.joined(separator: " ") + " | output")
    var rows: [[String: Any]] = []
    for i in 0..<c.layerCount {
        let block = try model.loadBlock(i)
        let (y64, ref) = run(block.on(f64), x64)
        let (y32, acc) = run(block.on(f32), x32)
        let (yLocal, local) = run(block.on(f32), f32.upload(f64.download(x64)))
        let refOut = f64.downloadValues(y64)
        func errors(_ got: [String: Tensor], _ out: Tensor) -> [Double?] {
            steps.map { step -> Double? in
                guard let g = got[step.1], let r = ref[step.1] else { return nil }
                return relative(f32.download(g), f64.downloadValues(r))
            } + [relative(f32.download(out), refOut)]
        }
        let (a, l) = (errors(acc, y32), errors(local, yLocal))
        let (yAngles, _) = run(block.on(f64Angles32), x64Angles32)
        let angles = relative(f64Angles32.download(yAngles), refOut)
        print(String(format: "%5d ", i) + cells(a) + " | " + cells(l) + " | " + cells([angles]))
        rows.append(["block": i, "accumulated": a.map { $0 ?? .nan }, "local": l.map { $0 ?? .nan }, "f64_f32_rope_angles_output": angles])
        (x32, x64, x64Angles32) = (y32, y64, yAngles)
    }
    let head = try model.loadHead(embedding: embedding)
    let targets = Array(window.dropFirst())
    let loss32 = Perplexity.meanCrossEntropy(head: head, hidden: x32, targets: targets, on: f32)
    let loss64 = Perplexity.meanCrossEntropy(head: head, hidden: x64, targets: targets, on: f64)
    let lossLocal = Perplexity.meanCrossEntropy(head: head, hidden: f32.upload(f64.download(x64)), targets: targets, on: f32)
    // The f32 logits with the log-softmax taken in Float64 instead of Kernels.logSumExp's Float32.
    func lossWithFloat64LogSoftmax(_ hidden: Tensor) -> Double {
        var total = 0.0
        var r0 = 0
        while r0 < targets.count {
            let r1 = min(r0 + 128, targets.count)
            let logits = head.logits(hidden, rows: r0..<r1, on: f32)
            logits.withUnsafeBufferPointer { p in
                for r in 0..<(r1 - r0) {
                    let row = UnsafeBufferPointer(rebasing: p[(r * logits.cols)..<((r + 1) * logits.cols)])
                    let m = Double(row.max() ?? 0)
                    var sum = 0.0
                    for v in row { sum += exp(Double(v) - m) }
                    total += m + log(sum) - Double(row[targets[r0 + r]])
                }
            }
            r0 = r1
        }
        return total / Double(targets.count)
    }
    let lossAngles32 = Perplexity.meanCrossEntropy(head: head, hidden: x64Angles32, targets: targets, on: f64Angles32)
    let loss32LSE64 = lossWithFloat64LogSoftmax(x32)
    let lossLocalLSE64 = lossWithFloat64LogSoftmax(f32.upload(f64.download(x64)))
    print(String(format: "\nloss f32 %.9f  f64 %.9f  difference %.3e", loss32, loss64, loss32 - loss64))
    print(String(format: "  the head alone in f32 on the f64 hidden state:                        %+.3e", lossLocal - loss64))
    print(String(format: "  f32 blocks and logits, the log-softmax in f64:                        %+.3e", loss32LSE64 - loss64))
    print(String(format: "  the f64 hidden state rounded to f32, f32 logits, log-softmax in f64:  %+.3e", lossLocalLSE64 - loss64))
    print(String(format: "  f64 with RoPE angles from the f32 table:                              %+.3e", lossAngles32 - loss64))
    print(String(format: "  f32 against f64 with f32 RoPE angles (transformers's comparison):     %+.3e", loss32 - lossAngles32))
    if let out = argument("json", args) {
        let json: [String: Any] = ["model": path, "text": textPath, "seqlen": seqlen, "steps": header, "blocks": rows,
                                   "loss_f32": loss32, "loss_f64": loss64, "loss_head_only_f32": lossLocal,
                                   "loss_f32_logsoftmax_f64": loss32LSE64, "loss_f64_f32_rope_angles": lossAngles32, "loss_head_only_f32_logsoftmax_f64": lossLocalLSE64]
        try JSONSerialization.data(withJSONObject: json, options: [.prettyPrinted, .sortedKeys]).write(to: URL(fileURLWithPath: out))
    }
}
