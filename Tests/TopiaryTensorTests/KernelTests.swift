import XCTest
import CTopiaryKernels
@testable import TopiaryTensor

final class HalfPrecisionTests: XCTestCase {
    func testFP16KnownValues() {
        XCTAssertEqual(HalfPrecision.fp16ToFloat(0x3C00), 1)
        XCTAssertEqual(HalfPrecision.fp16ToFloat(0xC000), -2)
        XCTAssertEqual(HalfPrecision.fp16ToFloat(0x7BFF), 65504)
        XCTAssertEqual(HalfPrecision.fp16ToFloat(0x0001), 5.9604645e-08)
        XCTAssertEqual(HalfPrecision.fp16ToFloat(0x7C00), .infinity)
        XCTAssertTrue(HalfPrecision.fp16ToFloat(0x7E00).isNaN)
        XCTAssertEqual(HalfPrecision.floatToFP16(1), 0x3C00)
        XCTAssertEqual(HalfPrecision.floatToFP16(65504), 0x7BFF)
        XCTAssertEqual(HalfPrecision.floatToFP16(1e6), 0x7C00)
        XCTAssertEqual(HalfPrecision.floatToFP16(5.9604645e-08), 0x0001)
    }

    func testFP16RoundTripsEveryFiniteHalf() {
        for bits in UInt16.min...UInt16.max {
            let f = HalfPrecision.fp16ToFloat(bits)
            if f.isNaN { continue }
            let back = HalfPrecision.floatToFP16(f)
            // +0 and -0 keep their sign bits.
            XCTAssertEqual(back, bits, "half bits \(bits)")
            if back != bits { return }
        }
    }

    func testFP16RoundsToNearestEven() {
        // 1 + 2^-11 is halfway between 1 and the next half (1 + 2^-10): ties to even (1).
        XCTAssertEqual(HalfPrecision.floatToFP16(1 + 0.00048828125), 0x3C00)
        // 1 + 3*2^-11 is halfway between 1+2^-10 (odd) and 1+2^-9 (even).
        XCTAssertEqual(HalfPrecision.floatToFP16(1 + 3 * 0.00048828125), 0x3C02)
        // Agrees with the platform's conversion on random values.
        var rng = TestRandom(seed: 9)
        for _ in 0..<10000 {
            let f = rng.uniform() * 1000
            XCTAssertEqual(HalfPrecision.floatToFP16(f), Float16(f).bitPattern)
        }
    }

    func testBF16() {
        XCTAssertEqual(HalfPrecision.bf16ToFloat(0x3F80), 1)
        XCTAssertEqual(HalfPrecision.floatToBF16(1), 0x3F80)
        // 1 + 2^-8 is halfway between two bf16 values; ties to even.
        XCTAssertEqual(HalfPrecision.floatToBF16(1 + 1.0 / 256), 0x3F80)
        XCTAssertEqual(HalfPrecision.floatToBF16(1 + 3.0 / 256), 0x3F82)
        XCTAssertTrue(HalfPrecision.bf16ToFloat(HalfPrecision.floatToBF16(.nan)).isNaN)
        for bits in stride(from: 0, to: 0x7F80, by: 7) {
            XCTAssertEqual(HalfPrecision.floatToBF16(HalfPrecision.bf16ToFloat(UInt16(bits))), UInt16(bits))
        }
    }

    /// The vector conversion gives `floatToBF16`'s bits for every value: ties both ways, values
    /// that round up to infinity, infinities, signalling and quiet NaNs of both signs, subnormals,
    /// and a million random bit patterns; written at an odd address and at every length's tail.
    func testVectorBF16MatchesScalar() {
        checkVector(HalfPrecision.floatToBF16, HalfPrecision.floatsToBF16)
    }

    /// The same for binary16: also halves that are subnormal, halfway between two subnormals,
    /// just below the smallest, rounding up to the smallest normal and to infinity.
    func testVectorFP16MatchesScalar() {
        checkVector(HalfPrecision.floatToFP16, HalfPrecision.floatsToFP16,
                    extra: [0x3380_0000, 0x3300_0000, 0x3300_0001, 0x32FF_FFFF, 0x3400_0000, 0x3400_1000, 0x3400_3000, 0x3880_0000,
                            0x387F_E000, 0x387F_F000, 0x477F_E000, 0x477F_F000, 0x477F_EFFF, 0x4780_0000, 0xC77F_F000, 0x3540_0000,
                            0x3540_1000, 0x3380_0001, 0xB380_0001, 0x7FA0_0001, 0x2000_0000])
    }

    func checkVector(_ scalar: (Float) -> UInt16, _ vector: (UnsafePointer<Float>, Int, UnsafeMutableRawPointer) -> Void,
                     extra: [UInt32] = [], file: StaticString = #filePath, line: UInt = #line) {
        var bits: [UInt32] = [0, 0x8000_0000, 0x3F80_8000, 0x3F81_8000, 0x3F80_7FFF, 0x3F81_7FFF, 0x7F7F_FFFF, 0xFF7F_FFFF,
                              0x7F7F_8000, 0x7F80_0000, 0xFF80_0000, 0x7F80_0001, 0xFF80_0001, 0x7FC0_0000, 0xFFFF_FFFF,
                              0x7FBF_FFFF, 0x0000_0001, 0x807F_FFFF, 0x0000_8000, 0x0001_8000] + extra
        var state: UInt64 = 0x9E37_79B9_7F4A_7C15
        for _ in 0..<1_000_000 {
            state = state &* 6364136223846793005 &+ 1442695040888963407
            bits.append(UInt32(truncatingIfNeeded: state >> 32))
        }
        let values = bits.map { Float(bitPattern: $0) }
        let expected = values.flatMap { v -> [UInt8] in let b = scalar(v); return [UInt8(b & 0xFF), UInt8(b >> 8)] }
        var out = [UInt8](repeating: 0xAA, count: 2 * values.count + 1)
        values.withUnsafeBufferPointer { src in
            out.withUnsafeMutableBytes { dst in vector(src.baseAddress!, src.count, dst.baseAddress! + 1) }
        }
        XCTAssertEqual(out[0], 0xAA, file: file, line: line)
        XCTAssertEqual(Array(out[1...]), expected, file: file, line: line)
        for n in 0..<40 {
            var tail = [UInt8](repeating: 0xAA, count: 2 * n + 2)
            values.withUnsafeBufferPointer { src in
                tail.withUnsafeMutableBytes { dst in vector(src.baseAddress!, n, dst.baseAddress!) }
            }
            XCTAssertEqual(Array(tail[..<(2 * n)]), Array(expected[..<(2 * n)]), "n = \(n)", file: file, line: line)
            XCTAssertEqual(Array(tail[(2 * n)...]), [0xAA, 0xAA], "n = \(n): wrote past the end", file: file, line: line)
        }
    }
}

final class KernelTests: XCTestCase {
    /// The CPU's finiteness check over several chunks: one NaN or infinity anywhere (first,
    /// inside a later chunk, last) is found; the largest finite values and subnormals are finite.
    func testAllFiniteFindsOneNonFiniteElementAnywhere() {
        let cpu = CPUBackend()
        let n = 3 * Parallel.chunk + 17
        var x = Matrix(rows: 1, cols: n) { p in for i in p.indices { p[i] = Float(i % 7) - 3 } }
        x[0, 5] = .greatestFiniteMagnitude
        x[0, 6] = -.greatestFiniteMagnitude
        x[0, 7] = .leastNonzeroMagnitude
        XCTAssertTrue(cpu.allFinite(cpu.upload(x)))
        for at in [0, Parallel.chunk + 3, 2 * Parallel.chunk, n - 1] {
            for bad in [Float.nan, .infinity, -.infinity, -Float.nan] {
                var y = x
                y[0, at] = bad
                XCTAssertFalse(cpu.allFinite(cpu.upload(y)), "\(bad) at \(at)")
            }
        }
    }

    func testRMSNormAndLayerNorm() {
        let x: [Float] = [1, 2, 3, 4, -1, 0, 1, 2]
        let w: [Float] = [1, 0.5, 2, 1]
        var out = [Float](repeating: 0, count: 8)
        Kernels.rmsNorm(x, weight: w, eps: 1e-5, rows: 2, cols: 4, out: &out)
        let ms: Double = (1.0 + 4 + 9 + 16) / 4
        let expected1: Double = 2 / (ms + 1e-5).squareRoot() * 0.5
        XCTAssertEqual(out[1], Float(expected1), accuracy: 1e-6)
        Kernels.layerNorm(x, weight: w, bias: [0, 0, 1, 0], eps: 1e-5, rows: 2, cols: 4, out: &out)
        // Row 2: mean 0.5, biased variance 1.25.
        let expected6: Double = (1 - 0.5) / (1.25 + 1e-5).squareRoot() * 2 + 1
        XCTAssertEqual(out[6], Float(expected6), accuracy: 1e-5)
    }

    func testSoftmaxAndLogSumExp() {
        var p: [Float] = [1000, 1001, 1002]
        let lse = Kernels.logSumExp(p, 3)
        Kernels.softmax(&p, 3)
        XCTAssertEqual(p.reduce(0, +), 1, accuracy: 1e-6)
        let e2: Double = exp(2.0) / (1 + exp(1.0) + exp(2.0))
        XCTAssertEqual(p[2], Float(e2), accuracy: 1e-6)
        let expected: Double = 1002 + log(1 + exp(-1.0) + exp(-2.0))
        XCTAssertEqual(lse, expected, accuracy: 1e-7)   // Float exponentials, Double sum
    }

    /// The vector exponential against Foundation's, element by element and summed, over the range
    /// softmax uses and beyond it (underflow to 0, overflow to +inf), lane tails included.
    func testVectorExponentialMatchesFoundation() {
        var rng = SplitMix64(seed: 7)
        for n in [1, 15, 16, 17, 100, 4097] {
            var x = [Float](repeating: 0, count: n)
            for i in 0..<n { x[i] = Float(rng.nextUnit() * 120 - 100) }
            if n > 3 { x[0] = -104; x[1] = 0; x[2] = 88 }
            var y = x
            let total = y.withUnsafeMutableBufferPointer { Kernels.expShifted($0.baseAddress!, n, shift: 0) }
            var reference = 0.0
            for i in 0..<n {
                let e = exp(Double(x[i]))
                reference += e
                if x[i] < -87.33654 {
                    XCTAssertEqual(y[i], 0, "x=\(x[i])")
                } else {
                    XCTAssertEqual(Double(y[i]) / e, 1, accuracy: 3e-7, "x=\(x[i])")
                }
            }
            XCTAssertEqual(total / reference, 1, accuracy: 1e-6, "n=\(n)")
        }
        var big: [Float] = [89, -.infinity, .nan]
        _ = big.withUnsafeMutableBufferPointer { Kernels.expShifted($0.baseAddress!, 2, shift: 0) }
        XCTAssertEqual(big[0], .infinity)
        XCTAssertEqual(big[1], 0)
    }

    /// logSumExp over a vocabulary-sized row is as accurate as a Double sum.
    func testLogSumExpLongRowIsDoubleAccurate() {
        var rng = SplitMix64(seed: 11)
        let n = 49_152
        var x = [Float](repeating: 0, count: n)
        for i in 0..<n { x[i] = Float(rng.nextUnit() * 20 - 10) }
        var m = -Double.infinity
        for v in x { m = max(m, Double(v)) }
        var s = 0.0
        for v in x { s += exp(Double(v) - m) }
        let reference = m + log(s)
        XCTAssertEqual(Kernels.logSumExp(x, n), reference, accuracy: 2e-6)
    }

    /// The cross-entropy of logits that arrive in blocks of columns (eval's head) equals the
    /// Double reference row by row for any block width, including rows whose maximum comes in a
    /// later block and rows whose first blocks are all -inf; the bits do not depend on the thread
    /// count; a row whose target no block held, or with a NaN logit, gives NaN.
    func testBlockedCrossEntropyMatchesTheWholeRow() {
        let saved = CPUBackend.threadCount
        defer { CPUBackend.setThreadCount(saved) }
        var rng = SplitMix64(seed: 12)
        let (rows, cols) = (37, 1_000)
        var logits = (0..<(rows * cols)).map { _ in Float(rng.nextUnit() * 30 - 15) }
        for j in 0..<cols { logits[3 * cols + j] = Float(j) / 10 }                      // maximum in the last block
        for j in 0..<600 { logits[4 * cols + j] = -.infinity }                           // first blocks all -inf
        logits[5 * cols + 17] = .nan
        let targets = (0..<rows).map { ($0 * 389) % cols }
        func blocked(width: Int) -> [Double] {
            var loss = BlockedCrossEntropy(targets: targets)
            var block = [Float](repeating: 0, count: rows * width)
            var v0 = 0
            while v0 < cols {
                let w = min(width, cols - v0)
                for r in 0..<rows { for j in 0..<w { block[r * w + j] = logits[r * cols + v0 + j] } }
                loss.add(block, first: v0, width: w)
                v0 += w
            }
            return loss.losses
        }
        for width in [1, 7, 64, 333, 1_000] {
            CPUBackend.setThreadCount(1)
            let one = blocked(width: width)
            CPUBackend.setThreadCount(3)
            let three = blocked(width: width)
            XCTAssertEqual(one.map(\.bitPattern), three.map(\.bitPattern), "width \(width)")
            for r in 0..<rows {
                let row = (0..<cols).map { Double(logits[r * cols + $0]) }
                let m = row.max()!
                let reference = m + log(row.reduce(0) { $0 + exp($1 - m) }) - row[targets[r]]
                if r == 5 { XCTAssertTrue(three[r].isNaN, "width \(width)"); continue }
                XCTAssertEqual(three[r], reference, accuracy: 1e-5 * max(1, Swift.abs(reference)), "row \(r), width \(width)")
            }
        }
        var partial = BlockedCrossEntropy(targets: [5])
        partial.add([1, 2, 3], first: 0, width: 3)
        XCTAssertTrue(partial.losses[0].isNaN, "the target was in no block")
    }

    func testActivations() {
        func silu(_ x: Float) -> Float {
            var y: Float = 0
            withUnsafePointer(to: x) { Kernels.silu($0, into: &y, 1) }
            return y
        }
        XCTAssertEqual(silu(0), 0)
        XCTAssertEqual(silu(2), 2 / (1 + Float(exp(-2.0))), accuracy: 1e-6)
        var r: [Float] = [-1, 0, 2]
        Kernels.reluInPlace(&r, 3)
        XCTAssertEqual(r, [0, 0, 2])
        var g: [Float] = [1, -1]
        Kernels.swiglu(gate: &g, up: [2, 3], 2)
        XCTAssertEqual(g[0], silu(1) * 2, accuracy: 1e-6)
    }

    /// Both RoPE layouts rotate the same pairs by the same angles once the dimensions are permuted.
    func testRopeLayoutsAgreeUnderPermutation() {
        let headDim = 8, heads = 2, tokens = 5
        let table = Kernels.RopeTable(rotaryDim: headDim, theta: 10000, positions: 16)
        var rng = TestRandom(seed: 11)
        let adjacent = (0..<(tokens * heads * headDim)).map { _ in rng.uniform() }
        // rotate-half index j*half + i holds adjacent index 2i + j.
        var half = adjacent
        for t in 0..<tokens { for h in 0..<heads { for i in 0..<4 { for j in 0..<2 {
            half[(t * heads + h) * headDim + j * 4 + i] = adjacent[(t * heads + h) * headDim + 2 * i + j]
        } } } }
        var a = adjacent, b = half
        Kernels.rope(&a, tokens: tokens, heads: heads, headDim: headDim, firstPosition: 3, table: table, layout: .adjacentPairs)
        Kernels.rope(&b, tokens: tokens, heads: heads, headDim: headDim, firstPosition: 3, table: table, layout: .rotateHalf)
        for t in 0..<tokens { for h in 0..<heads { for i in 0..<4 { for j in 0..<2 {
            XCTAssertEqual(b[(t * heads + h) * headDim + j * 4 + i], a[(t * heads + h) * headDim + 2 * i + j], accuracy: 1e-6)
        } } } }
        // Position 0 is the identity; norms are preserved.
        var c = Array(adjacent[0..<headDim])
        Kernels.rope(&c, tokens: 1, heads: 1, headDim: headDim, firstPosition: 0, table: table, layout: .adjacentPairs)
        XCTAssertEqual(c, Array(adjacent[0..<headDim]))
        let before = adjacent.map { $0 * $0 }.reduce(0, +), after = a.map { $0 * $0 }.reduce(0, +)
        XCTAssertEqual(before, after, accuracy: 1e-4)
    }

    /// The 16-lane exponential written lane by lane in Swift.
    static func referenceExp(_ x: Float) -> Float {
        if x.isNaN { return x }
        if x > 88.72283 { return .infinity }
        if x < -87.33654 { return 0 }
        let shifter: Float = 12582912
        let t = x * 1.44269504088896341 + shifter
        let n = t - shifter
        var r = x - n * 0.693359375
        r = r - n * -2.12194440e-4
        var p: Float = 1.9875691500e-4
        p = p * r + 1.3981999507e-3
        p = p * r + 8.3334519073e-3
        p = p * r + 4.1665795894e-2
        p = p * r + 1.6666665459e-1
        p = p * r + 5.0000001201e-1
        p = p * (r * r) + r + 1
        let bits = (Int32(bitPattern: t.bitPattern) &- Int32(0x4B40_0000 - 127)) &<< 23
        return p * Float(bitPattern: UInt32(bitPattern: bits))
    }

    /// The C exponential, whichever clone the loader chose for this CPU (AVX-512, AVX2 or
    /// baseline), gives the bits of the same algorithm written out lane by lane in Swift (Swift
    /// does not contract a*b+c into an FMA): the outputs cannot depend on the machine's vectors.
    func testVectorExponentialHasTheScalarAlgorithmsBits() {
        let reference = Self.referenceExp
        var rng = SplitMix64(seed: 3)
        let n = 10_007
        var x = [Float](repeating: 0, count: n)
        for i in 0..<n { x[i] = Float(rng.nextUnit() * 200 - 100) }
        x[0] = .nan; x[1] = -.infinity; x[2] = .infinity; x[3] = 0; x[4] = -87.33654; x[5] = 88.72283
        var y = [Float](repeating: 0, count: n)
        topiary_exp(x, &y, n)
        for i in 0..<n where !(x[i].isNaN && y[i].isNaN) {
            XCTAssertEqual(y[i].bitPattern, reference(x[i]).bitPattern, "x=\(x[i]) (vector bits \(topiary_kernels_vector_bits()))")
        }
        XCTAssertTrue(y[0].isNaN)
    }

    /// The attention tile's two products have the bits of one fused multiply-add chain per output
    /// written element by element, whatever the clone, for row counts around the six-row register tile,
    /// column counts around the 16-lane panels and head widths that are and are not multiples of
    /// 16; the columns a causal mask hides are skipped in the scores (left as they were) and make
    /// no difference in the sums (they are zero there).
    func testAttentionProductsHaveTheFMAChainsBits() {
        var rng = SplitMix64(seed: 11)
        func uniform(_ n: Int) -> [Float] { (0..<n).map { _ in Float(rng.nextUnit() * 2 - 1) } }
        for (m, n, headDim, period, offset) in [(13, 37, 20, 13, 100), (12, 16, 64, 6, 0), (7, 33, 8, 7, 5), (1, 1, 16, 1, 0), (24, 40, 17, 8, 9)] {
            let what = "m \(m), n \(n), head \(headDim), mask \(period)/\(offset) (vector bits \(topiary_kernels_vector_bits()))"
            let (ldq, ldk) = (headDim + 3, 2 * headDim + 1)
            let q = uniform(m * ldq), keys = uniform(n * ldk), values = uniform(n * ldk)
            let scale: Float = 0.37
            var panels = [Float](repeating: .nan, count: Kernels.attentionPanelFloats(n, headDim: headDim))
            let sentinel = Float(12345)
            var s = [Float](repeating: sentinel, count: m * n)
            let mask = Kernels.CausalTile(period: period, offset: offset)
            Kernels.attentionScores(q: q, ldq: ldq, m: m, keys: keys, ldk: ldk, n: n, headDim: headDim, scale: scale, mask: mask,
                                    panels: &panels, into: &s, lds: n)
            func sees(_ r: Int) -> Int { min(n, r % period + offset + 1) }
            for r in 0..<m {
                let groupSees = (r / 6 * 6..<min(r / 6 * 6 + 6, m)).map(sees).max()!
                for j in 0..<n {
                    if j < sees(r) {
                        var sum: Float = 0
                        for p in 0..<headDim { sum = sum.addingProduct(q[r * ldq + p], keys[j * ldk + p]) }
                        XCTAssertEqual(s[r * n + j].bitPattern, (sum * scale).bitPattern, "score \(r), \(j): \(what)")
                    } else if j >= (groupSees + 15) / 16 * 16 {
                        XCTAssertEqual(s[r * n + j], sentinel, "score \(r), \(j) is past the six rows' last panel: \(what)")
                    }
                }
            }
            // Probabilities with zeros where the row does not see.
            var p = uniform(m * n)
            for r in 0..<m { for j in sees(r)..<n { p[r * n + j] = 0 } }
            let start = uniform(m * headDim)
            var acc = start, whole = start
            Kernels.attentionValues(p: p, ldp: n, m: m, values: values, ldv: ldk, n: n, headDim: headDim, mask: mask,
                                    panels: &panels, into: &acc, ldacc: headDim)
            Kernels.attentionValues(p: p, ldp: n, m: m, values: values, ldv: ldk, n: n, headDim: headDim,
                                    mask: Kernels.CausalTile(period: 1, offset: n), panels: &panels, into: &whole, ldacc: headDim)
            for r in 0..<m {
                for d in 0..<headDim {
                    var sum: Float = 0
                    for j in 0..<n { sum = sum.addingProduct(p[r * n + j], values[j * ldk + d]) }
                    XCTAssertEqual(acc[r * headDim + d].bitPattern, (start[r * headDim + d] + sum).bitPattern, "value \(r), \(d): \(what)")
                    XCTAssertEqual(whole[r * headDim + d].bitPattern, acc[r * headDim + d].bitPattern, "value \(r), \(d) unmasked: \(what)")
                }
            }
        }
    }

    typealias GatedBackward = (UnsafePointer<Float>, UnsafePointer<Float>, UnsafePointer<Float>,
                               UnsafeMutablePointer<Float>, UnsafeMutablePointer<Float>, Int) -> Void

    /// A gated activation's backward (dg, du) over d, g and u in one call, and in three calls
    /// over [0, 5), [5, 600) and [600, n).
    static func wholeAndInParts(_ backward: GatedBackward, d: [Float], g: [Float], u: [Float])
        -> (whole: ([Float], [Float]), parts: ([Float], [Float])) {
        let n = d.count
        var (dg, du) = ([Float](repeating: 0, count: n), [Float](repeating: 0, count: n))
        var (dgParts, duParts) = (dg, du)
        backward(d, g, u, &dg, &du, n)
        d.withUnsafeBufferPointer { dp in g.withUnsafeBufferPointer { gp in u.withUnsafeBufferPointer { up in
            dgParts.withUnsafeMutableBufferPointer { a in duParts.withUnsafeMutableBufferPointer { b in
                for (lo, hi) in [(0, 5), (5, 600), (600, n)] {
                    backward(dp.baseAddress! + lo, gp.baseAddress! + lo, up.baseAddress! + lo, a.baseAddress! + lo, b.baseAddress! + lo, hi - lo)
                }
            } }
        } } }
        return ((dg, du), (dgParts, duParts))
    }

    /// SwiGLU's backward has the bits of its formula written element by element with the same
    /// exponential, whatever the split of the elements (the tail of a split is a partial vector).
    func testSwigluBackwardHasTheScalarFormulasBits() {
        let e = Self.referenceExp
        var rng = SplitMix64(seed: 7)
        let n = 1_003
        func uniform(_ scale: Double) -> [Float] { (0..<n).map { _ in Float((rng.nextUnit() * 2 - 1) * scale) } }
        let (d, g, u) = (uniform(3), uniform(30), uniform(5))
        let ((dg, du), (dgParts, duParts)) = Self.wholeAndInParts(Kernels.swigluBackward, d: d, g: g, u: u)
        for i in 0..<n {
            let sigma = 1 / (1 + e(-g[i]))
            let expectedUp = d[i] * (g[i] * sigma)
            let expectedGate = d[i] * (u[i] * sigma * (1 + g[i] * (1 - sigma)))
            XCTAssertEqual(du[i].bitPattern, expectedUp.bitPattern, "du at g=\(g[i])")
            XCTAssertEqual(dg[i].bitPattern, expectedGate.bitPattern, "dg at g=\(g[i]), u=\(u[i])")
            XCTAssertEqual(duParts[i].bitPattern, expectedUp.bitPattern, "du split, element \(i)")
            XCTAssertEqual(dgParts[i].bitPattern, expectedGate.bitPattern, "dg split, element \(i)")
        }
        // Against the derivative itself: d/dg of silu(g)·u by central differences in Double.
        for x in [-6.0, -1.0, 0.0, 0.5, 4.0] {
            let (h, uu) = (1e-4, 1.5)
            func f(_ v: Double) -> Double { v / (1 + exp(-v)) * uu }
            var (a, b): (Float, Float) = (0, 0)
            Kernels.swigluBackward([1], gate: [Float(x)], up: [Float(uu)], dGate: &a, dUp: &b, 1)
            XCTAssertEqual(Double(a), (f(x + h) - f(x - h)) / (2 * h), accuracy: 1e-4, "dg at \(x)")
            XCTAssertEqual(Double(b), x / (1 + exp(-x)), accuracy: 1e-5, "du at \(x)")
        }
    }

    /// The vector GELU-tanh, GEGLU, GEGLU's backward and soft-capping have the bits of their
    /// formulas written element by element with the same exponential (tanh = 1 − 2/(e^{2|u|} + 1),
    /// u's sign), whatever the split of the elements; GELU is within 1e-6 (absolute, or relative
    /// above 1) and the caps within 2e-6 of the cap of Foundation's tanh in Double, and the
    /// backward's dg is the derivative by central differences.
    func testGeluTanhGegluAndBackwardHaveTheScalarFormulasBits() {
        let e = Self.referenceExp
        let (k, b): (Float, Float) = (0.7978845608028654, 0.044715)
        func tanhRef(_ u: Float) -> Float {
            let m = u < 0 ? -u : u, em = e(-2 * m)
            let t = (1 - em) / (1 + em)
            return u < 0 ? -t : t
        }
        func gelu(_ v: Float) -> Float { 0.5 * v * (1 + tanhRef(k * (v + b * v * v * v))) }
        var rng = SplitMix64(seed: 9)
        let n = 1_003
        func uniform(_ scale: Double) -> [Float] { (0..<n).map { _ in Float((rng.nextUnit() * 2 - 1) * scale) } }
        let (x, d, u) = (uniform(12) + [0, -0.0, 1e-30, 60, -60, .infinity, -.infinity], uniform(3), uniform(5))
        let m = x.count
        var y = [Float](repeating: 0, count: m)
        Kernels.geluTanh(x, into: &y, m)
        for i in 0..<m {
            XCTAssertEqual(y[i].bitPattern, gelu(x[i]).bitPattern, "gelu(\(x[i]))")
            if x[i].isFinite {
                let v = Double(x[i])
                let exact = 0.5 * v * (1 + tanh((2 / Double.pi).squareRoot() * (v + 0.044715 * v * v * v)))
                XCTAssertEqual(Double(y[i]), exact, accuracy: 1e-6 * max(1, abs(exact)), "gelu(\(x[i])) against Double")
            }
        }
        XCTAssertEqual(y[m - 2], .infinity)
        XCTAssertEqual(y[m - 1].isNaN, true, "−∞·0 as the formula gives")
        let g = Array(x.prefix(n))
        var gated = g
        Kernels.geglu(gate: &gated, up: u, n)
        let ((dg, du), (dgParts, duParts)) = Self.wholeAndInParts(Kernels.gegluBackward, d: d, g: g, u: u)
        for i in 0..<n {
            XCTAssertEqual(gated[i].bitPattern, (gelu(g[i]) * u[i]).bitPattern, "geglu at g=\(g[i])")
            let t = tanhRef(k * (g[i] + b * g[i] * g[i] * g[i]))
            let expectedUp = d[i] * (0.5 * g[i] * (1 + t))
            let derivative = 0.5 * (1 + t) + 0.5 * g[i] * (1 - t * t) * (k * (1 + 3 * b * g[i] * g[i]))
            let expectedGate = d[i] * (u[i] * derivative)
            XCTAssertEqual(du[i].bitPattern, expectedUp.bitPattern, "du at g=\(g[i])")
            XCTAssertEqual(dg[i].bitPattern, expectedGate.bitPattern, "dg at g=\(g[i]), u=\(u[i])")
            XCTAssertEqual(duParts[i].bitPattern, expectedUp.bitPattern, "du split, element \(i)")
            XCTAssertEqual(dgParts[i].bitPattern, expectedGate.bitPattern, "dg split, element \(i)")
        }
        // Soft-capping (Gemma-2's scores and logits) with the same tanh.
        for cap: Float in [50, 30] {
            var capped = x
            Kernels.softcap(&capped, m, cap: cap)
            for i in 0..<m {
                XCTAssertEqual(capped[i].bitPattern, (cap * tanhRef(x[i] / cap)).bitPattern, "softcap \(cap) of \(x[i])")
                if x[i].isFinite {
                    XCTAssertEqual(Double(capped[i]), Double(cap) * tanh(Double(x[i]) / Double(cap)), accuracy: 2e-6 * Double(cap), "softcap \(cap) of \(x[i])")
                }
            }
            XCTAssertEqual(capped[m - 2], cap)
            XCTAssertEqual(capped[m - 1], -cap)
        }
        for v in [-6.0, -1.0, 0.0, 0.5, 4.0] {
            let h = 1e-4
            func f(_ v: Double) -> Double { 0.5 * v * (1 + tanh((2 / Double.pi).squareRoot() * (v + 0.044715 * v * v * v))) }
            var (a, c): (Float, Float) = (0, 0)
            Kernels.gegluBackward([1], gate: [Float(v)], up: [1], dGate: &a, dUp: &c, 1)
            XCTAssertEqual(Double(a), (f(v + h) - f(v - h)) / (2 * h), accuracy: 1e-4, "dg at \(v)")
        }
    }

    /// The vector SiLU and SparseLLM's gate update (SiLU and GELU-tanh) have the bits of their
    /// algorithms written element by element with the same exponential, whatever the split of
    /// the elements.
    func testSiluAndSparseLLMGateHaveTheScalarAlgorithmsBits() {
        let e = Self.referenceExp
        var rng = SplitMix64(seed: 5)
        let n = 1_003
        func uniform(_ scale: Double) -> [Float] { (0..<n).map { _ in Float((rng.nextUnit() * 2 - 1) * scale) } }
        let x = uniform(30)
        var y = [Float](repeating: 0, count: n)
        Kernels.silu(x, into: &y, n)
        for i in 0..<n { XCTAssertEqual(y[i].bitPattern, (x[i] / (1 + e(-x[i]))).bitPattern, "silu(\(x[i]))") }

        let (a, c): (Float, Float) = (5, 5)
        let g = uniform(4), z = uniform(60), p = uniform(3), s0 = uniform(4)
        let (k, b): (Float, Float) = (0.7978845608028654, 0.044715)
        // What the kernel keeps of the activation at v (e^−v; tanh(k(v + bv³)) by the exponential).
        func aux(_ v: Float, _ act: GatedActivation) -> Float {
            if act == .silu { return e(-v) }
            let u = k * (v + b * v * v * v)
            let m = u < 0 ? -u : u, em = e(-2 * m)
            let t = (1 - em) / (1 + em)
            return u < 0 ? -t : t
        }
        func value(_ v: Float, _ x: Float, _ act: GatedActivation) -> Float { act == .silu ? v / (1 + x) : 0.5 * v * (1 + x) }
        func derivatives(_ v: Float, _ x: Float, _ act: GatedActivation) -> (Float, Float, Float) {
            if act == .silu {
                let sg = 1 / (1 + x)
                return (v * sg, sg * (1 + v * (1 - sg)), sg * (1 - sg) * (2 + v * (1 - 2 * sg)))
            }
            let du = k * (1 + 3 * b * v * v), ddu = 6 * k * b * v, q = 1 - x * x
            return (0.5 * v * (1 + x), 0.5 * (1 + x) + 0.5 * v * q * du, q * du + 0.5 * v * q * (ddu - 2 * x * du * du))
        }
        for act in [GatedActivation.silu, .geluTanh] {
            var stalls = 0                                  // elements stopped by the halving bound
            func scalar(_ i: Int, steps: Int) -> Float {
                let (gi, zi, pi) = (g[i], z[i], p[i])
                func cost(_ v: Float, _ xv: Float) -> Float {
                    let r = pi - value(v, xv, act) * zi
                    return a * (v - gi) * (v - gi) + c * r * r
                }
                var si = s0[i], xi = aux(si, act)
                var f = cost(si, xi)
                for _ in 0..<steps {
                    let (value, d1, d2) = derivatives(si, xi, act)
                    let r = pi - value * zi
                    let grad = 2 * a * (si - gi) - 2 * c * zi * d1 * r
                    let gaussNewton = 2 * a + 2 * c * zi * zi * d1 * d1
                    var curvature = gaussNewton - 2 * c * zi * d2 * r
                    if !(curvature > 0) { curvature = gaussNewton }
                    var delta = -grad / curvature
                    let bound = 1e-6 * max(1, Swift.abs(si))
                    if Swift.abs(delta) <= bound { break }
                    var accepted = false
                    for _ in 0..<20 {
                        let trial = si + delta, xt = aux(trial, act)
                        let ft = cost(trial, xt)
                        if ft.isFinite && ft <= f { (si, xi, f, accepted) = (trial, xt, ft, true); break }
                        delta *= 0.5
                        if Swift.abs(delta) <= bound { stalls += 1; break }      // no descent above the tolerance: the element stops
                    }
                    if !accepted { break }
                }
                return si
            }
            for steps in [1, 4] {
                var whole = s0
                Kernels.sparseLLMGate(s: &whole, g: g, z: z, p: p, n, alpha: a, gamma: c, steps: steps, activation: act)
                var parts = s0
                parts.withUnsafeMutableBufferPointer { sp in
                    g.withUnsafeBufferPointer { gp in z.withUnsafeBufferPointer { zp in p.withUnsafeBufferPointer { pp in
                        for (lo, hi) in [(0, 7), (7, 500), (500, n)] {
                            Kernels.sparseLLMGate(s: sp.baseAddress! + lo, g: gp.baseAddress! + lo, z: zp.baseAddress! + lo,
                                                  p: pp.baseAddress! + lo, hi - lo, alpha: a, gamma: c, steps: steps, activation: act)
                        }
                    } } }
                }
                var moved = 0
                for i in 0..<n {
                    let expected = scalar(i, steps: steps)
                    XCTAssertEqual(whole[i].bitPattern, expected.bitPattern, "\(act): element \(i), \(steps) steps")
                    XCTAssertEqual(parts[i].bitPattern, expected.bitPattern, "\(act): element \(i) split, \(steps) steps")
                    if whole[i] != s0[i] { moved += 1 }
                }
                XCTAssertGreaterThan(moved, n / 2, "\(act): the update moves most elements")
            }
            XCTAssertGreaterThan(stalls, 0, "\(act): some elements stop by the halving bound, so the kernel's rule for them is compared")
        }
    }

    /// With a ReLU gate the update is the exact minimiser of α(v − g)² + γ(p − ReLU(v)·z)²
    /// (against a grid in Double), and 0 steps leave s as it was.
    func testSparseLLMReluGateIsTheMinimiser() {
        var rng = SplitMix64(seed: 6)
        let n = 400
        func uniform(_ scale: Double) -> [Float] { (0..<n).map { _ in Float((rng.nextUnit() * 2 - 1) * scale) } }
        let g = uniform(3), z = uniform(4), p = uniform(3), s0 = uniform(3)
        var unchanged = s0
        Kernels.sparseLLMGate(s: &unchanged, g: g, z: z, p: p, n, alpha: 2, gamma: 7, steps: 0, activation: .relu)
        XCTAssertEqual(unchanged, s0)
        for (a, c): (Float, Float) in [(5, 5), (0.5, 9), (8, 0.3)] {
            var s = s0
            Kernels.sparseLLMGate(s: &s, g: g, z: z, p: p, n, alpha: a, gamma: c, steps: 1, activation: .relu)
            var positive = 0
            for i in 0..<n {
                func f(_ v: Double) -> Double {
                    Double(a) * pow(v - Double(g[i]), 2) + Double(c) * pow(Double(p[i]) - max(v, 0) * Double(z[i]), 2)
                }
                let grid = stride(from: -6.0, through: 6.0, by: 1e-3).map(f).min()!
                XCTAssertLessThanOrEqual(f(Double(s[i])), grid + 1e-4, "α \(a) γ \(c) element \(i)")
                if s[i] > 0 { positive += 1 }
            }
            XCTAssertGreaterThan(positive, n / 10, "α \(a) γ \(c): both branches are taken")
            XCTAssertLessThan(positive, n * 9 / 10, "α \(a) γ \(c): both branches are taken")
        }
    }
}
