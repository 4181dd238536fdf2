import Foundation
import TopiaryTensor

/// `topiary-bench cuda-check [--device cuda:N]`: every operation of the CUDA backend on random
/// operands against the CPU backend (relative error ‖gpu − cpu‖/‖cpu‖ per operation, masks and
/// selections exactly), then the device's sgemm rate. Exits 1 if any operation is off; run by
/// scripts/cuda-check on a machine with an NVIDIA GPU.
func cudaCheck(_ args: [String]) throws {
    let device = try ComputeDevice.parse(argument("device", args) ?? "cuda")
    let gpu = try ComputeDevices.backend(for: device)
    print("device: \(gpu.name)")
    var failures: [String] = []
    var seed: UInt64 = 1
    func random(_ r: Int, _ c: Int) -> Matrix { seed += 1; return randomMatrix(r, c, seed: seed) }

    func report(_ name: String, _ expected: Matrix, _ got: Matrix, tolerance: Double) {
        guard expected.rows == got.rows && expected.cols == got.cols else {
            failures.append(name)
            print(String(format: "  %-40@ FAIL shape %dx%d against %dx%d", name as NSString, got.rows, got.cols, expected.rows, expected.cols))
            return
        }
        var diff = 0.0, norm = 0.0, worst = 0.0
        let (e, g) = (expected.values, got.values)
        for i in 0..<e.count {
            let d = Double(g[i]) - Double(e[i])
            if !d.isFinite && !(e[i].isNaN && g[i].isNaN) { diff = .infinity }
            diff += d * d
            norm += Double(e[i]) * Double(e[i])
            worst = max(worst, abs(d))
        }
        let relative = diff.squareRoot() / max(norm.squareRoot(), 1e-30)
        let ok = tolerance == 0 ? diff == 0 : relative <= tolerance
        if !ok { failures.append(name) }
        print(String(format: "  %-40@ %@ relative %.2e  max abs %.2e", name as NSString, (ok ? "ok  " : "FAIL") as NSString, relative, worst))
    }
    /// The same operation on both backends (operands uploaded to each), compared.
    func same(_ name: String, tolerance: Double = 1e-5, _ operands: [Matrix], _ op: (any ComputeBackend, [Tensor]) -> Tensor) {
        let c = op(cpu, operands.map { cpu.upload($0) })
        let g = op(gpu, operands.map { gpu.upload($0) })
        report(name, cpu.download(c), gpu.download(g), tolerance: tolerance)
    }
    /// An in-place operation on operand 0, compared after it ran.
    func inPlace(_ name: String, tolerance: Double = 1e-6, _ operands: [Matrix], _ op: (any ComputeBackend, [Tensor]) -> Void) {
        let c = operands.map { cpu.upload($0) }, g = operands.map { gpu.upload($0) }
        op(cpu, c)
        op(gpu, g)
        report(name, cpu.download(c[0]), gpu.download(g[0]), tolerance: tolerance)
    }

    print("dense linear algebra")
    for (ta, tb) in [(Transpose.none, Transpose.none), (.none, .transposed), (.transposed, .none), (.transposed, .transposed)] {
        let (m, n, k) = (67, 45, 129)
        let a = ta == .none ? random(m + 3, k + 5) : random(k + 3, m + 5)
        let b = tb == .none ? random(k + 2, n + 4) : random(n + 2, k + 4)
        inPlace("gemm \(ta == .none ? "N" : "T")\(tb == .none ? "N" : "T") regions, beta 0.5", tolerance: 1e-5, [random(m + 6, n + 7), a, b]) { be, t in
            let ar = ta == .none ? t[1].region(rows: 2..<(2 + m), cols: 3..<(3 + k)) : t[1].region(rows: 2..<(2 + k), cols: 3..<(3 + m))
            let br = tb == .none ? t[2].region(rows: 1..<(1 + k), cols: 4..<(4 + n)) : t[2].region(rows: 1..<(1 + n), cols: 4..<(4 + k))
            be.gemm(ar, ta, br, tb, alpha: 0.75, beta: 0.5, into: t[0].region(rows: 5..<(5 + m), cols: 6..<(6 + n)))
        }
    }
    inPlace("syrkUpperUpdate + mirrorUpper", tolerance: 1e-5, [random(96, 96), random(300, 96)]) { be, t in
        be.syrkUpperUpdate(t[1], alpha: 0.01, beta: 0.5, into: t[0]); be.mirrorUpper(t[0])
    }
    inPlace("syrkAccumulate", tolerance: 1e-5, [Matrix(rows: 80, cols: 80), random(333, 80)]) { be, t in   // C symmetric, as a Hessian is
        be.syrkAccumulate(t[1], alpha: 0.02, into: t[0]); be.syrkAccumulate(t[1], alpha: 0.01, into: t[0])
    }
    same("transpose", tolerance: 0, [random(37, 53)]) { be, t in be.transpose(t[0]) }
    same("copy region", tolerance: 0, [random(37, 53)]) { be, t in be.copy(t[0].region(rows: 3..<20, cols: 5..<50)) }
    inPlace("copy into region", tolerance: 0, [random(30, 40), random(10, 12)]) { be, t in
        be.copy(t[1].all, into: t[0].region(rows: 7..<17, cols: 20..<32))
    }
    let spd: Matrix = {
        let x = cpu.upload(random(400, 64)), h = cpu.zeros(rows: 64, cols: 64)
        cpu.syrkAccumulate(x, alpha: 1.0 / 400, into: h)
        cpu.addToDiagonal(h, 0.1)
        return cpu.download(h)
    }()
    same("cholesky upper", tolerance: 1e-5, [spd]) { be, t in try! be.cholesky(t[0], upper: true, what: "check") }
    same("cholesky lower", tolerance: 1e-5, [spd]) { be, t in try! be.cholesky(t[0], upper: false, what: "check") }
    same("inverseSPD", tolerance: 1e-4, [spd]) { be, t in try! be.inverseSPD(t[0], what: "check") }
    do {
        var bad = spd
        bad.withUnsafeMutableBufferPointer { p in p[5 * 64 + 5] = -1 }
        func failure(_ be: any ComputeBackend) -> LinalgError? {
            do { _ = try be.cholesky(be.upload(bad), upper: true, what: "check"); return nil } catch { return error as? LinalgError }
        }
        let (c, g) = (failure(cpu), failure(gpu))
        let same = c != nil && c == g
        if !same { failures.append("cholesky of a matrix that is not positive definite") }
        print("  cholesky, not positive definite          \(same ? "ok  " : "FAIL") cpu \(c.map { "\($0)" } ?? "no error") cuda \(g.map { "\($0)" } ?? "no error")")
    }
    // SparseGPT's column loop on a 128-column block: the inverse factor of a real Hessian.
    let hessian: Matrix = {
        let x = cpu.upload(random(600, 128)), h = cpu.zeros(rows: 128, cols: 128)
        cpu.syrkAccumulate(x, alpha: 2.0 / 600, into: h)
        cpu.addToDiagonal(h, 0.05)
        return cpu.download(try! cpu.cholesky(try! cpu.inverseSPD(h, what: "check"), upper: true, what: "check"))
    }()
    for nOfM in [nil, (n: 2, m: 4)] as [(n: Int, m: Int)?] {
        let w = random(70, 128)
        let scores = cpu.download(cpu.map(cpu.upload(w), .abs))
        let mask = nOfM == nil ? cpu.download(cpu.selectSmallestInRows(cpu.upload(scores), count: 64)) : Matrix(rows: 70, cols: 128)
        func run(_ be: any ComputeBackend) -> (Matrix, Matrix, Matrix, Double) {
            let (tw, tu, tm, te) = (be.upload(w), be.upload(hessian), be.upload(mask), be.zeros(rows: 70, cols: 128))
            let loss = be.sparseGPTBlock(weight: tw, inverseFactor: tu, mask: tm, nOfM: nOfM, error: te)
            return (be.download(tw), be.download(tm), be.download(te), loss)
        }
        let (c, g) = (run(cpu), run(gpu))
        let label = nOfM == nil ? "unstructured" : "2:4"
        report("sparseGPTBlock \(label) weights", c.0, g.0, tolerance: 1e-6)
        report("sparseGPTBlock \(label) mask", c.1, g.1, tolerance: 0)
        report("sparseGPTBlock \(label) error", c.2, g.2, tolerance: 1e-6)
        report("sparseGPTBlock \(label) loss", Matrix(rows: 1, cols: 1, values: [Float(c.3)]), Matrix(rows: 1, cols: 1, values: [Float(g.3)]), tolerance: 1e-6)
    }

    print("element-wise and reductions")
    inPlace("scale", [random(33, 65)]) { be, t in be.scale(t[0], by: 0.3) }
    inPlace("scaleAdd", [random(33, 65), random(33, 65)]) { be, t in be.scaleAdd(t[0], beta: 0.9, t[1], alpha: -0.4) }
    inPlace("axpy", [random(33, 65), random(33, 65)]) { be, t in be.axpy(1.7, t[1], t[0]) }
    for f in [ElementwiseFunction.abs, .square, .squareRoot, .negate, .relu, .silu, .geluTanh, .nonZero] {
        let x = f == .squareRoot ? cpu.download(cpu.map(cpu.upload(random(20, 31)), .abs)) : random(20, 31)
        same("map \(f.rawValue)", tolerance: 1e-6, [x]) { be, t in be.map(t[0], f) }
    }
    same("multiplyColumns", tolerance: 1e-6, [random(20, 31), random(1, 31)]) { be, t in be.multiplyColumns(t[0], by: t[1]) }
    same("divideColumns", tolerance: 1e-6, [random(20, 31), cpu.download(cpu.map(cpu.upload(random(1, 31)), .abs))]) { be, t in
        be.divideColumns(t[0], by: be.map(t[1], .squareRoot))
    }
    same("addRowVector", tolerance: 1e-6, [random(20, 31), random(1, 31)]) { be, t in be.addRowVector(t[0], t[1]) }
    inPlace("addRowVector into", [random(20, 31), random(1, 31)]) { be, t in be.addRowVector(t[1], into: t[0]) }
    inPlace("addToDiagonal", [random(40, 40)]) { be, t in be.addToDiagonal(t[0], 0.25) }
    same("multiply", tolerance: 1e-6, [random(20, 31), random(20, 31)]) { be, t in be.multiply(t[0], t[1]) }
    inPlace("add into", [random(20, 31), random(20, 31)]) { be, t in be.add(t[1], into: t[0]) }
    inPlace("zeroMasked", tolerance: 0, [random(20, 31), cpu.download(cpu.map(cpu.upload(random(20, 31)), .relu))]) { be, t in
        be.zeroMasked(t[0], mask: t[1])
    }
    inPlace("reluBackward", tolerance: 0, [random(20, 31), random(20, 31)]) { be, t in be.reluBackward(t[0], input: t[1]) }
    inPlace("softcap", [random(20, 31)]) { be, t in be.softcap(t[0], cap: 0.5) }
    same("diagonal", tolerance: 0, [random(40, 40)]) { be, t in be.diagonal(t[0]) }
    same("columnSquaredSums", tolerance: 1e-6, [random(700, 33)]) { be, t in be.columnSquaredSums(t[0]) }
    same("selectSmallestInRows (host)", tolerance: 0, [random(20, 64)]) { be, t in be.selectSmallestInRows(t[0], counts: (0..<20).map { $0 * 3 }) }
    same("selectNOfM 2:4 (host)", tolerance: 0, [random(20, 64)]) { be, t in be.selectNOfM(t[0], n: 2, m: 4) }
    do {
        // Several chunks and a short last one: the same Float64 bits as the CPU.
        let (a, b, c) = (random(300, 700), random(300, 700), random(300, 700))
        let (ca, cb, cc) = (cpu.upload(a), cpu.upload(b), cpu.upload(c))
        let (ga, gb, gc) = (gpu.upload(a), gpu.upload(b), gpu.upload(c))
        for (name, x, y) in [("chunkedDot", cpu.chunkedDot(ca, cb), gpu.chunkedDot(ga, gb)),
                             ("chunkedSquaredDistance", cpu.chunkedSquaredDistance(ca, cb), gpu.chunkedSquaredDistance(ga, gb)),
                             ("chunkedSquaredDistanceToProduct", cpu.chunkedSquaredDistanceToProduct(ca, cb, cc), gpu.chunkedSquaredDistanceToProduct(ga, gb, gc))] {
            let ok = x.bitPattern == y.bitPattern
            if !ok { failures.append(name) }
            print(String(format: "  %-40@ %@ cpu %.17g cuda %.17g", name as NSString, (ok ? "ok  " : "FAIL") as NSString, x, y))
        }
        var withInf = a
        withInf.withUnsafeMutableBufferPointer { p in p[12345] = .infinity }
        let finite = (gpu.allFinite(ga), gpu.allFinite(gpu.upload(withInf)))
        if finite != (true, false) { failures.append("allFinite") }
        print("  allFinite                                \(finite == (true, false) ? "ok  " : "FAIL") \(finite)")
    }

    print("forward pass")
    same("rmsNorm", tolerance: 1e-6, [random(45, 576), random(1, 576)]) { be, t in be.rmsNorm(t[0], weight: t[1], eps: 1e-5) }
    for layout in [RopeLayout.adjacentPairs, .rotateHalf] {
        let table = Kernels.RopeTable(rotaryDim: 64, theta: 10000, positions: 128)
        inPlace("rope \(layout.rawValue)", tolerance: 1e-6, [random(2 * 96, 3 * 64)]) { be, t in
            be.rope(t[0], heads: 3, headDim: 64, sequenceLength: 96, table: table, layout: layout, inverse: false)
        }
    }
    for (name, heads, kv, options) in [("MHA", 4, 4, AttentionOptions(scale: 0.125)), ("GQA 6/2", 6, 2, AttentionOptions(scale: 0.125)),
                                       ("window 17", 4, 2, AttentionOptions(scale: 0.125, window: 17)),
                                       ("softcap 5", 4, 4, AttentionOptions(scale: 0.125, softcap: 5))] {
        let shape = AttentionShape(sequenceLength: 77, heads: heads, kvHeads: kv, headDim: 64)
        same("attention \(name)", tolerance: 2e-6, [random(3 * 77, heads * 64), random(3 * 77, kv * 64), random(3 * 77, kv * 64)]) { be, t in
            be.attention(q: t[0], k: t[1], v: t[2], shape: shape, options: options)
        }
    }
    for act in [GatedActivation.silu, .geluTanh, .relu] {
        same("gatedActivation \(act.rawValue)", tolerance: 1e-6, [random(20, 31), random(20, 31)]) { be, t in be.gatedActivation(gate: t[0], up: t[1], act) }
    }

    print("sgemm rate (square, beta 0)")
    for n in [2048, 4096, 8192] {
        let a = gpu.upload(randomMatrix(n, n, seed: 5)), b = gpu.upload(randomMatrix(n, n, seed: 6))
        let c = gpu.zeros(rows: n, cols: n)
        gpu.gemm(a.all, .none, b.all, .none, alpha: 1, beta: 0, into: c.all)
        gpu.synchronize()
        let t = best(5) { gpu.gemm(a.all, .none, b.all, .none, alpha: 1, beta: 0, into: c.all); gpu.synchronize() }
        print(String(format: "  n %5d  %8.1f GFLOP/s", n, 2 * pow(Double(n), 3) / t / 1e9))
    }

    if failures.isEmpty {
        print("cuda-check: every operation agrees with the CPU backend")
    } else {
        print("cuda-check: \(failures.count) operation(s) disagree: \(failures.joined(separator: ", "))")
        exit(1)
    }
}
