#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import TopiaryTensor

/// Self-attention as the families use it: project, (per-head norm), rotate, attend (causal, with
/// an optional sliding window and soft-capping), project. `forward` keeps what `backward` needs
/// under the "attn." keys of the tape.
struct AttentionLayer {
    let prefix: String
    /// The output projection's leaf name ("self_attn.o_proj"; OPT: "self_attn.out_proj").
    let output: String
    var window: Int? = nil
    var qkNorm = false
    var softcap: Float? = nil
    /// Scores are scaled by 1/sqrt(scaleBase); nil: the head dimension.
    var scaleBase: Float? = nil

    var q: String { prefix + "self_attn.q_proj" }
    var k: String { prefix + "self_attn.k_proj" }
    var v: String { prefix + "self_attn.v_proj" }
    var o: String { prefix + output }

    func options(_ c: ModelConfig) -> Attention.Options {
        Attention.Options(scale: 1 / (scaleBase ?? Float(c.headDim)).squareRoot(), window: window, softcap: softcap)
    }

    func forward(_ b: DecoderBlock, _ a: Matrix, _ pass: inout BlockPass) -> Matrix {
        let c = b.config
        var q = b.apply(self.q, a, pass.observer)
        var k = b.apply(self.k, a, pass.observer)
        let v = b.apply(self.v, a, pass.observer)
        if qkNorm {
            pass.keep("attn.q0", q)
            pass.keep("attn.k0", k)
            q = headNorm(b, q, prefix + "self_attn.q_norm.weight")
            k = headNorm(b, k, prefix + "self_attn.k_norm.weight")
        }
        if let rope = pass.rope {
            b.applyRope(&q, heads: c.headCount, sequenceLength: pass.sequenceLength, rope: rope)
            b.applyRope(&k, heads: c.kvHeadCount, sequenceLength: pass.sequenceLength, rope: rope)
        }
        let context = Attention.causal(q: q, k: k, v: v, sequenceLength: pass.sequenceLength, heads: c.headCount,
                                       kvHeads: c.kvHeadCount, headDim: c.headDim, options: options(c))
        pass.keep("attn.in", a)
        pass.keep("attn.q", q)
        pass.keep("attn.k", k)
        pass.keep("attn.v", v)
        pass.keep("attn.context", context)
        return b.apply(o, context, pass.observer)
    }

    /// RMSNorm over each head's slice of a [tokens x heads*headDim] projection (Qwen3's q_norm/k_norm).
    func headNorm(_ b: DecoderBlock, _ m: Matrix, _ weight: String) -> Matrix {
        let d = b.config.headDim
        return b.rmsNorm(m.reshaped(rows: m.count / d, cols: d), weight).reshaped(rows: m.rows, cols: m.cols)
    }

    /// From ∂L/∂(attention output) down to q/k/v/o's weight gradients.
    func backward(_ b: DecoderBlock, _ dOut: Matrix, _ tape: BlockTape, into grads: inout [String: Matrix]) {
        let c = b.config
        grads[o] = Linalg.matmul(dOut, .transposed, tape.value("attn.context"), .none)
        let dContext = Linalg.matmul(dOut, b.weight(o))
        var (dq, dk, dv) = Attention.causalBackward(q: tape.value("attn.q"), k: tape.value("attn.k"), v: tape.value("attn.v"),
                                                    outputGradient: dContext, sequenceLength: tape.sequenceLength, heads: c.headCount,
                                                    kvHeads: c.kvHeadCount, headDim: c.headDim, options: options(c))
        if let rope = tape.rope {
            b.inverseRope(&dq, heads: c.headCount, sequenceLength: tape.sequenceLength, rope: rope)
            b.inverseRope(&dk, heads: c.kvHeadCount, sequenceLength: tape.sequenceLength, rope: rope)
        }
        if qkNorm {
            dq = headNormBackward(b, tape.value("attn.q0"), prefix + "self_attn.q_norm.weight", dq)
            dk = headNormBackward(b, tape.value("attn.k0"), prefix + "self_attn.k_norm.weight", dk)
        }
        let a = tape.value("attn.in")
        grads[q] = Linalg.matmul(dq, .transposed, a, .none)
        grads[k] = Linalg.matmul(dk, .transposed, a, .none)
        grads[v] = Linalg.matmul(dv, .transposed, a, .none)
    }

    func headNormBackward(_ b: DecoderBlock, _ input: Matrix, _ weight: String, _ dOut: Matrix) -> Matrix {
        let d = b.config.headDim
        let rows = input.count / d
        return BlockGradients.rmsNormBackward(input: input.reshaped(rows: rows, cols: d), weight: b.normWeight(weight), eps: b.config.normEps,
                                              outputGradient: dOut.reshaped(rows: rows, cols: d)).reshaped(rows: input.rows, cols: input.cols)
    }
}

/// down(act(gate(x)) ⊙ up(x)). `tag` names its tape entries (one per Mixtral expert).
struct GatedMLP {
    let gate: String
    let up: String
    let down: String
    let activation: Activation
    var tag = "mlp"

    func forward(_ b: DecoderBlock, _ x: Matrix, _ pass: inout BlockPass) -> Matrix {
        var m = b.apply(gate, x, pass.observer)
        let u = b.apply(up, x, pass.observer)
        pass.keep(tag + ".in", x)
        pass.keep(tag + ".g", m)
        pass.keep(tag + ".u", u)
        m.withUnsafeMutableBufferPointer { g in
            u.withUnsafeBufferPointer { pu in
                switch activation {
                case .silu: Kernels.swiglu(gate: g.baseAddress!, up: pu.baseAddress!, g.count)
                case .geluTanh: for i in g.indices { g[i] = GELU.tanh(g[i]) * pu[i] }
                case .relu: for i in g.indices { g[i] = max(g[i], 0) * pu[i] }
                }
            }
        }
        pass.keep(tag + ".m", m)
        return b.apply(down, m, pass.observer)
    }

    /// Weight gradients of the three linears from ∂L/∂output; returns ∂L/∂x.
    func backward(_ b: DecoderBlock, _ dy: Matrix, _ tape: BlockTape, into grads: inout [String: Matrix]) -> Matrix {
        let x = tape.value(tag + ".in")
        grads[down] = Linalg.matmul(dy, .transposed, tape.value(tag + ".m"), .none)
        let dm = Linalg.matmul(dy, b.weight(down))
        var dg = dm, du = dm
        dg.withUnsafeMutableBufferPointer { pg in
            du.withUnsafeMutableBufferPointer { pu in
                tape.value(tag + ".g").withUnsafeBufferPointer { g in
                    tape.value(tag + ".u").withUnsafeBufferPointer { u in
                        for i in pg.indices {
                            switch activation {
                            case .silu:
                                let sigma = 1 / (1 + expf(-g[i]))
                                pu[i] *= g[i] * sigma                                    // ∂/∂u: silu(g)
                                pg[i] *= u[i] * sigma * (1 + g[i] * (1 - sigma))         // ∂/∂g: u·silu′(g)
                            case .geluTanh:
                                pu[i] *= GELU.tanh(g[i])
                                pg[i] *= u[i] * GELU.tanhDerivative(g[i])
                            case .relu:
                                pu[i] *= max(g[i], 0)
                                pg[i] *= g[i] > 0 ? u[i] : 0
                            }
                        }
                    }
                }
            }
        }
        grads[gate] = Linalg.matmul(dg, .transposed, x, .none)
        grads[up] = Linalg.matmul(du, .transposed, x, .none)
        var dx = Linalg.matmul(dg, b.weight(gate))
        Linalg.gemm(du, .none, b.weight(up), .none, beta: 1, into: &dx)
        return dx
    }
}

/// GELU with the tanh approximation (PyTorch's approximate="tanh", Gemma's gelu_pytorch_tanh).
enum GELU {
    static let c: Float = 0.7978845608028654   // sqrt(2/π)

    @inline(__always) static func tanh(_ x: Float) -> Float {
        0.5 * x * (1 + tanhf(c * (x + 0.044715 * x * x * x)))
    }

    @inline(__always) static func tanhDerivative(_ x: Float) -> Float {
        let t = tanhf(c * (x + 0.044715 * x * x * x))
        return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * c * (1 + 3 * 0.044715 * x * x)
    }
}
