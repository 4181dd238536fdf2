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

    func options(_ c: ModelConfig) -> AttentionOptions {
        AttentionOptions(scale: 1 / (scaleBase ?? Float(c.headDim)).squareRoot(), window: window, softcap: softcap)
    }

    func shape(_ c: ModelConfig, _ sequenceLength: Int) -> AttentionShape {
        AttentionShape(sequenceLength: sequenceLength, heads: c.headCount, kvHeads: c.kvHeadCount, headDim: c.headDim)
    }

    func forward(_ b: DeviceBlock, _ a: Tensor, _ pass: inout BlockPass) -> Tensor {
        let c = b.config
        let qkv = b.apply([self.q, self.k, self.v], a, pass.observer)
        var (q, k) = (qkv[0], qkv[1])
        let v = qkv[2]
        if qkNorm {
            pass.keep("attn.q0", q)
            pass.keep("attn.k0", k)
            q = headNorm(b, q, prefix + "self_attn.q_norm.weight")
            k = headNorm(b, k, prefix + "self_attn.k_norm.weight")
        }
        if let cache = pass.cache {
            // One new token per sequence: rotated at the cache's position, attending to the cache.
            return b.apply(o, cache.attend(b, q: q, k: k, v: v, options: options(c)), pass.observer)
        }
        if let rope = pass.rope {
            b.applyRope(q, heads: c.headCount, sequenceLength: pass.sequenceLength, rope: rope)
            b.applyRope(k, heads: c.kvHeadCount, sequenceLength: pass.sequenceLength, rope: rope)
        }
        let context = b.backend.attention(q: q, k: k, v: v, shape: shape(c, pass.sequenceLength), options: options(c))
        pass.keep("attn.in", a)
        pass.keep("attn.q", q)
        pass.keep("attn.k", k)
        pass.keep("attn.v", v)
        pass.keep("attn.context", context)
        return b.apply(o, context, pass.observer)
    }

    /// RMSNorm over each head's slice of a [tokens x heads*headDim] projection (Qwen3's q_norm/k_norm).
    func headNorm(_ b: DeviceBlock, _ m: Tensor, _ weight: String) -> Tensor {
        let d = b.config.headDim
        let heads = b.backend.reshaped(m, rows: m.count / d, cols: d)
        return b.backend.reshaped(b.rmsNorm(heads, weight), rows: m.rows, cols: m.cols)
    }

    /// From ∂L/∂(attention output) down to q/k/v/o's weight gradients.
    func backward(_ b: DeviceBlock, _ dOut: Tensor, _ tape: BlockTape, into grads: inout [String: Tensor]) {
        let c = b.config
        let backend = b.backend
        grads[o] = backend.matmul(dOut, .transposed, tape.value("attn.context"), .none)
        let dContext = backend.matmul(dOut, b.weight(o))
        var (dq, dk, dv) = backend.attentionBackward(q: tape.value("attn.q"), k: tape.value("attn.k"), v: tape.value("attn.v"),
                                                     outputGradient: dContext, shape: shape(c, tape.sequenceLength), options: options(c))
        if let rope = tape.rope {
            b.applyRope(dq, heads: c.headCount, sequenceLength: tape.sequenceLength, rope: rope, inverse: true)
            b.applyRope(dk, heads: c.kvHeadCount, sequenceLength: tape.sequenceLength, rope: rope, inverse: true)
        }
        if qkNorm {
            dq = headNormBackward(b, tape.value("attn.q0"), prefix + "self_attn.q_norm.weight", dq)
            dk = headNormBackward(b, tape.value("attn.k0"), prefix + "self_attn.k_norm.weight", dk)
        }
        let a = tape.value("attn.in")
        grads[q] = backend.matmul(dq, .transposed, a, .none)
        grads[k] = backend.matmul(dk, .transposed, a, .none)
        grads[v] = backend.matmul(dv, .transposed, a, .none)
    }

    func headNormBackward(_ b: DeviceBlock, _ input: Tensor, _ weight: String, _ dOut: Tensor) -> Tensor {
        let d = b.config.headDim
        let rows = input.count / d
        let backend = b.backend
        let dx = b.rmsNormBackward(backend.reshaped(input, rows: rows, cols: d), weight, backend.reshaped(dOut, rows: rows, cols: d))
        return backend.reshaped(dx, rows: input.rows, cols: input.cols)
    }
}

/// down(act(gate(x)) ⊙ up(x)). `tag` names its tape entries (one per Mixtral expert).
struct GatedMLP {
    let gate: String
    let up: String
    let down: String
    let activation: Activation
    var tag = "mlp"

    func forward(_ b: DeviceBlock, _ x: Tensor, _ pass: inout BlockPass) -> Tensor {
        let gu = b.apply([gate, up], x, pass.observer)
        if !pass.recording && pass.feedForwardObserver == nil {
            // Nothing kept for a backward or an observer: the activation overwrites the gate's
            // product instead of filling a third tensor of the feed-forward's width.
            b.backend.gatedActivationInPlace(gate: gu[0], up: gu[1], activation.gated)
            return b.apply(down, gu[0], pass.observer)
        }
        let (g, u) = (gu[0], gu[1])
        pass.keep(tag + ".in", x)
        pass.keep(tag + ".g", g)
        pass.keep(tag + ".u", u)
        let m = b.backend.gatedActivation(gate: g, up: u, activation.gated)
        pass.keep(tag + ".m", m)
        let y = b.apply(down, m, pass.observer)
        pass.feedForwardObserver?(gate, FeedForwardProducts(gate: g, up: u, activation: m, output: y))
        return y
    }

    /// Weight gradients of the three linears from ∂L/∂output; returns ∂L/∂x.
    func backward(_ b: DeviceBlock, _ dy: Tensor, _ tape: BlockTape, into grads: inout [String: Tensor]) -> Tensor {
        let backend = b.backend
        let x = tape.value(tag + ".in")
        grads[down] = backend.matmul(dy, .transposed, tape.value(tag + ".m"), .none)
        let dm = backend.matmul(dy, b.weight(down))
        let (dg, du) = backend.gatedActivationBackward(dm, gate: tape.value(tag + ".g"), up: tape.value(tag + ".u"), activation.gated)
        grads[gate] = backend.matmul(dg, .transposed, x, .none)
        grads[up] = backend.matmul(du, .transposed, x, .none)
        let dx = backend.matmul(dg, b.weight(gate))
        backend.gemm(du.all, .none, b.weight(up).all, .none, alpha: 1, beta: 1, into: dx.all)
        return dx
    }
}

extension Activation {
    /// The backend's name for this activation.
    public var gated: GatedActivation {
        switch self {
        case .silu: return .silu
        case .geluTanh: return .geluTanh
        case .relu: return .relu
        }
    }
}
