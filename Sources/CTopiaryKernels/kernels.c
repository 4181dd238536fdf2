// Element-wise kernels in clang's 16-lane vector types. The loader picks a clone for the CPU
// (target_clones); no clone contracts a*b+c into an FMA, so all give the same bits.
#include "topiary_kernels.h"
#include "lanes.h"
#include <math.h>

/// e^x in every lane: x = n·ln2 + r with |r| <= ln2/2 (Cody–Waite, ln2 in two parts), e^r by
/// Cephes' degree-7 polynomial (within 2 ulp over the normal range), times 2^n through the
/// exponent bits. Below -87.33654 gives 0 (no subnormals), above 88.72283 +inf; NaN stays NaN.
/// n is rounded by adding 1.5·2^23 (no rounding instruction needed).
#define vexp(xin) ({ \
    vf x_ = (xin); \
    const vf low_ = splat(-87.33654f), high_ = splat(88.72283f); \
    vi tooLow_ = x_ < low_, tooHigh_ = x_ > high_, notNumber_ = x_ != x_; \
    vf v_ = tooLow_ ? low_ : (tooHigh_ ? high_ : x_); \
    const vf shifter_ = splat(12582912.0f); \
    vf t_ = v_ * 1.44269504088896341f + shifter_; \
    vf n_ = t_ - shifter_; \
    vf r_ = v_ - n_ * 0.693359375f; \
    r_ = r_ - n_ * -2.12194440e-4f; \
    vf p_ = splat(1.9875691500e-4f); \
    p_ = p_ * r_ + 1.3981999507e-3f; \
    p_ = p_ * r_ + 8.3334519073e-3f; \
    p_ = p_ * r_ + 4.1665795894e-2f; \
    p_ = p_ * r_ + 1.6666665459e-1f; \
    p_ = p_ * r_ + 5.0000001201e-1f; \
    p_ = p_ * (r_ * r_) + r_ + 1.0f; \
    vi bits_ = ((vi)t_ - (vi)(0x4B400000 - 127)) << 23; \
    vf e_ = p_ * (vf)bits_; \
    notNumber_ ? x_ : (tooHigh_ ? splat(INFINITY) : (tooLow_ ? splat(0.0f) : e_)); })

/// Lanes 0..15 added in order from -0 (as Swift's SIMD sum()).
#define laneSum(a) ({ vf a_ = (a); float s_ = -0.0f; for (int l_ = 0; l_ < 16; l_++) s_ += a_[l_]; s_; })

/// The sum of e^(in[i] - shift) in the order the header gives; the exponentials are stored to
/// `out` unless it is NULL. Inlined into each clone (it takes no vector arguments, so its ABI
/// is the same in all of them) and specialised there for `out` NULL or not.
static inline __attribute__((always_inline)) double expSum(const float *in, float *out, ptrdiff_t n, float shift) {
    const vf m = splat(shift);
    double total = 0;
    ptrdiff_t i = 0;
    while (i < n) {
        ptrdiff_t end = n < i + 4096 ? n : i + 4096;
        vf acc = splat(0.0f);
        for (; i + 16 <= end; i += 16) {
            vf e = vexp(load(in + i) - m);
            if (out) store(out + i, e);
            acc += e;
        }
        if (i < end) {
            vf e = vexp(loadTail(in + i, end - i, -INFINITY) - m);
            if (out) for (ptrdiff_t j = 0; j < end - i; j++) out[i + j] = e[j];
            acc += e;
            i = end;
        }
        total += (double)laneSum(acc);
    }
    return total;
}

CLONES double topiary_exp_shifted(float *p, ptrdiff_t n, float shift) { return expSum(p, p, n, shift); }

CLONES double topiary_sum_exp_shifted(const float *p, ptrdiff_t n, float shift) { return expSum(p, NULL, n, shift); }

CLONES float topiary_maximum(const float *p, ptrdiff_t n) {
    vf acc = splat(-INFINITY);
    ptrdiff_t i = 0;
    for (; i + 16 <= n; i += 16) {
        vf v = load(p + i);
        acc = v > acc ? v : acc;
    }
    float m = acc[0];
    for (int l = 1; l < 16; l++) m = acc[l] > m ? acc[l] : m;
    for (; i < n; i++) if (p[i] > m) m = p[i];
    return m;
}

// The loops of the element-wise kernels: 16 lanes at a time, the last lanes loaded with 0 and
// only the first n written back.

/// y[i] = op(x[i], args...) for i < n (x and y may be the same).
#define mapLanes(x, y, n, op, ...) do { \
    ptrdiff_t ml_i = 0; \
    for (; ml_i + 16 <= (n); ml_i += 16) store((y) + ml_i, op(load((x) + ml_i), ##__VA_ARGS__)); \
    if (ml_i < (n)) { \
        vf ml_r = op(loadTail((x) + ml_i, (n) - ml_i, 0), ##__VA_ARGS__); \
        for (ptrdiff_t j_ = 0; j_ < (n) - ml_i; j_++) (y)[ml_i + j_] = ml_r[j_]; \
    } } while (0)

/// gate[i] = act(gate[i])·up[i] for i < n.
#define gatedLanes(gate, up, n, act) do { \
    ptrdiff_t gl_i = 0; \
    for (; gl_i + 16 <= (n); gl_i += 16) store((gate) + gl_i, act(load((gate) + gl_i)) * load((up) + gl_i)); \
    if (gl_i < (n)) { \
        vf gl_r = act(loadTail((gate) + gl_i, (n) - gl_i, 0)) * loadTail((up) + gl_i, (n) - gl_i, 0); \
        for (ptrdiff_t j_ = 0; j_ < (n) - gl_i; j_++) (gate)[gl_i + j_] = gl_r[j_]; \
    } } while (0)

/// dg and du for i < n from d, g and u by `lanes(d, g, u, dg, du)` (16 elements).
#define gatedBackwardLanes(d, g, u, dg, du, n, lanes) do { \
    ptrdiff_t bl_i = 0; \
    vf bl_dg, bl_du; \
    for (; bl_i + 16 <= (n); bl_i += 16) { \
        lanes(load((d) + bl_i), load((g) + bl_i), load((u) + bl_i), bl_dg, bl_du); \
        store((dg) + bl_i, bl_dg); \
        store((du) + bl_i, bl_du); \
    } \
    if (bl_i < (n)) { \
        ptrdiff_t bl_m = (n) - bl_i; \
        lanes(loadTail((d) + bl_i, bl_m, 0), loadTail((g) + bl_i, bl_m, 0), loadTail((u) + bl_i, bl_m, 0), bl_dg, bl_du); \
        for (ptrdiff_t j_ = 0; j_ < bl_m; j_++) { (dg)[bl_i + j_] = bl_dg[j_]; (du)[bl_i + j_] = bl_du[j_]; } \
    } } while (0)

/// silu(v) = v / (1 + e^−v) in every lane.
#define vsilu(vin) ({ vf sl_v = (vin); sl_v / (1.0f + vexp(-sl_v)); })

/// tanh(u) in every lane: 1 − 2/(e^{2|u|} + 1) through the exponential above, with u's sign
/// (±1 where e^{−2|u|} underflows; NaN stays NaN).
#define vtanh(uin) ({ vf th_u = (uin); vf th_m = th_u < 0.0f ? -th_u : th_u; vf th_e = vexp(-2.0f * th_m); \
    vf th_t = (1.0f - th_e) / (1.0f + th_e); th_u < 0.0f ? -th_t : th_t; })

/// GELU-tanh, v·(1 + t)/2 with t = tanh(u), u = k(v + b·v³), k = √(2/π), b = 0.044715: t, the
/// value and the derivative (1 + t)/2 + v(1 − t²)u′/2, u′ = k(1 + 3b·v²), from v and t. The
/// forward, its backward and SparseLLM's gate update all take them from here.
#define GELU_K 0.7978845608028654f
#define GELU_B 0.044715f
#define geluT(vin) ({ vf gt_v = (vin); vtanh(GELU_K * (gt_v + GELU_B * gt_v * gt_v * gt_v)); })
#define geluFrom(v, t) (0.5f * (v) * (1.0f + (t)))
#define geluSlope(v) (GELU_K * (1.0f + 3.0f * GELU_B * (v) * (v)))
#define geluDerivativeFrom(v, t) (0.5f * (1.0f + (t)) + 0.5f * (v) * (1.0f - (t) * (t)) * geluSlope(v))
#define vgelu(vin) ({ vf gl_v = (vin); geluFrom(gl_v, geluT(gl_v)); })

/// cap·tanh(x/cap) in every lane.
#define vsoftcap(vin, cap) ((cap) * vtanh((vin) / (cap)))

CLONES void topiary_swiglu(float *gate, const float *up, ptrdiff_t n) { gatedLanes(gate, up, n, vsilu); }

CLONES void topiary_geglu(float *gate, const float *up, ptrdiff_t n) { gatedLanes(gate, up, n, vgelu); }

/// dg and du for 16 elements from their d, g, u.
#define swigluBackward(d, g, u, dg, du) do { \
    vf s_ = 1.0f / (1.0f + vexp(-(g))); \
    (du) = (d) * ((g) * s_); \
    (dg) = (d) * ((u) * s_ * (1.0f + (g) * (1.0f - s_))); } while (0)

/// The same for GEGLU: du = d·gelu(g) (the forward's value), dg = d·(u·gelu′(g)).
#define gegluBackward(d, g, u, dg, du) do { \
    vf gb_g = (g), gb_t = geluT(gb_g); \
    (du) = (d) * geluFrom(gb_g, gb_t); \
    (dg) = (d) * ((u) * geluDerivativeFrom(gb_g, gb_t)); } while (0)

CLONES void topiary_swiglu_backward(const float *d, const float *g, const float *u, float *dg, float *du, ptrdiff_t n) {
    gatedBackwardLanes(d, g, u, dg, du, n, swigluBackward);
}

CLONES void topiary_geglu_backward(const float *d, const float *g, const float *u, float *dg, float *du, ptrdiff_t n) {
    gatedBackwardLanes(d, g, u, dg, du, n, gegluBackward);
}

CLONES void topiary_silu(const float *x, float *y, ptrdiff_t n) { mapLanes(x, y, n, vsilu); }

CLONES void topiary_gelu_tanh(const float *x, float *y, ptrdiff_t n) { mapLanes(x, y, n, vgelu); }

CLONES void topiary_exp(const float *x, float *y, ptrdiff_t n) { mapLanes(x, y, n, vexp); }

CLONES void topiary_softcap(float *x, ptrdiff_t n, float cap) { mapLanes(x, x, n, vsoftcap, cap); }

/// What the gate's Newton steps keep of the activation at v between the cost and the
/// derivatives: e^−v for SiLU, tanh(√(2/π)·(v + 0.044715·v³)) for GELU-tanh.
#define gateAux(v, act) ({ vf ga_v = (v); vf ga_x; \
    if ((act) == TOPIARY_GATE_SILU) ga_x = vexp(-ga_v); \
    else ga_x = geluT(ga_v); ga_x; })

/// The activation at v from its auxiliary: v / (1 + e) for SiLU, v·(1 + t)/2 for GELU-tanh.
#define gateValue(v, x, act) ((act) == TOPIARY_GATE_SILU ? (v) / (1.0f + (x)) : geluFrom(v, x))

/// a·(v − g)² + c·(p − act(v)·z)² in every lane, act(v) from the auxiliary x at v.
#define gateCost(v, x, g, z, p, act) ({ vf r_ = (p) - gateValue(v, x, act) * (z); vf d_ = (v) - (g); \
    splat(a) * d_ * d_ + splat(c) * r_ * r_; })

/// act(v), act′(v) and act″(v) from the auxiliary x at v, into value, d1 and d2. GELU-tanh:
/// with t = tanh(u), u = k(v + bv³), u′ = k(1 + 3bv²), u″ = 6kbv,
/// act′ = (1 + t)/2 + v(1 − t²)u′/2 and act″ = (1 − t²)u′ + v(1 − t²)(u″ − 2tu′²)/2.
#define gateDerivatives(v, x, act, value, d1, d2) do { \
    if ((act) == TOPIARY_GATE_SILU) { \
        vf sg_ = 1.0f / (1.0f + (x)); \
        (value) = (v) * sg_; \
        (d1) = sg_ * (1.0f + (v) * (1.0f - sg_)); \
        (d2) = sg_ * (1.0f - sg_) * (2.0f + (v) * (1.0f - 2.0f * sg_)); \
    } else { \
        vf du_ = geluSlope(v), ddu_ = 6.0f * GELU_K * GELU_B * (v), q_ = 1.0f - (x) * (x); \
        (value) = geluFrom(v, x); \
        (d1) = geluDerivativeFrom(v, x); \
        (d2) = q_ * du_ + 0.5f * (v) * q_ * (ddu_ - 2.0f * (x) * du_ * du_); \
    } } while (0)

/// Sixteen elements of the SparseLLM gate update for SiLU or GELU-tanh (see the header); lanes
/// past `n` are padding. `act` is a constant at each call, so each activation's code is its own.
static inline __attribute__((always_inline)) void gateLanes(float *sp, const float *gp, const float *zp, const float *pp,
                                                            ptrdiff_t n, float a, float c, int steps, int act) {
    vf s, g, z, p;
    if (n >= 16) { s = load(sp); g = load(gp); z = load(zp); p = load(pp); }
    else { s = loadTail(sp, n, 0); g = loadTail(gp, n, 0); z = loadTail(zp, n, 0); p = loadTail(pp, n, 0); }
    vf x = gateAux(s, act);
    vf f = gateCost(s, x, g, z, p, act);
    vi active = (vi)(-1);
    for (int step = 0; step < steps; step++) {
        vf value, d1, d2;
        gateDerivatives(s, x, act, value, d1, d2);
        vf r = p - value * z;
        vf grad = 2.0f * a * (s - g) - 2.0f * c * z * d1 * r;
        vf gaussNewton = 2.0f * a + 2.0f * c * z * z * d1 * d1;
        vf curvature = gaussNewton - 2.0f * c * z * d2 * r;
        curvature = curvature > 0.0f ? curvature : gaussNewton;             // also when NaN
        vf delta = -grad / curvature;
        vf absDelta = delta < 0.0f ? -delta : delta, absS = s < 0.0f ? -s : s;
        vf bound = 1e-6f * (absS > 1.0f ? absS : splat(1.0f));
        active &= ~(absDelta <= bound);                                     // converged
        vi searching = active;
        for (int attempt = 0; attempt < 20; attempt++) {
            vf trial = s + delta;
            vf xt = gateAux(trial, act);
            vf ft = gateCost(trial, xt, g, z, p, act);
            vi finite = (ft == ft) & (ft != INFINITY);
            vi take = searching & finite & (ft <= f);
            s = take ? trial : s;
            x = take ? xt : x;
            f = take ? ft : f;
            searching &= ~take;
            delta *= 0.5f;
            absDelta *= 0.5f;
            vi stalled = searching & (absDelta <= bound);                   // no descent above the tolerance
            active &= ~stalled;
            searching &= ~stalled;
            int any = 0;
            for (int l = 0; l < 16; l++) any |= searching[l];
            if (!any) break;
        }
        active &= ~searching;                                               // no descent found
        int any = 0;
        for (int l = 0; l < 16; l++) any |= active[l];
        if (!any) break;
    }
    if (n >= 16) store(sp, s);
    else for (ptrdiff_t j = 0; j < n; j++) sp[j] = s[j];
}

/// The ReLU gate's exact minimiser (see the header), element by element.
static inline __attribute__((always_inline)) void gateRelu(float *s, const float *g, const float *z, const float *p, ptrdiff_t n,
                                                           float a, float c) {
    for (ptrdiff_t i = 0; i < n; i++) {
        float gi = g[i], zi = z[i], pi = p[i];
        float negative = gi < 0.0f ? gi : 0.0f;
        float positive = (a * gi + c * pi * zi) / (a + c * zi * zi);
        positive = positive > 0.0f ? positive : 0.0f;
        float dn = negative - gi, dp = positive - gi, rp = pi - positive * zi;
        float costNegative = a * dn * dn + c * pi * pi;
        float costPositive = a * dp * dp + c * rp * rp;
        s[i] = costPositive <= costNegative ? positive : negative;
    }
}

CLONES void topiary_sparsellm_gate(float *s, const float *g, const float *z, const float *p, ptrdiff_t n,
                                   float a, float c, int steps, int activation) {
    switch (activation) {
    case TOPIARY_GATE_SILU:
        for (ptrdiff_t i = 0; i < n; i += 16)
            gateLanes(s + i, g + i, z + i, p + i, n - i < 16 ? n - i : 16, a, c, steps, TOPIARY_GATE_SILU);
        break;
    case TOPIARY_GATE_GELU_TANH:
        for (ptrdiff_t i = 0; i < n; i += 16)
            gateLanes(s + i, g + i, z + i, p + i, n - i < 16 ? n - i : 16, a, c, steps, TOPIARY_GATE_GELU_TANH);
        break;
    case TOPIARY_GATE_RELU:
        if (steps > 0) gateRelu(s, g, z, p, n, a, c);
        break;
    }
}

CLONES void topiary_f32_to_bf16(const float *src, void *dst, ptrdiff_t n) {
    unsigned char *out = dst;
    for (ptrdiff_t i = 0; i < n; i++) {
        uint32_t b;
        memcpy(&b, src + i, 4);
        uint32_t rounded = (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
        uint32_t quiet = (b >> 16) | 0x0040u;
        uint16_t r = (uint16_t)((b & 0x7FFFFFFFu) > 0x7F800000u ? quiet : rounded);
        out[2 * i] = (unsigned char)(r & 0xFF);
        out[2 * i + 1] = (unsigned char)(r >> 8);
    }
}

CLONES void topiary_f32_to_f16(const float *src, void *dst, ptrdiff_t n) {
    unsigned char *out = dst;
    for (ptrdiff_t i = 0; i < n; i++) {
        uint32_t b;
        memcpy(&b, src + i, 4);
        uint32_t sign = (b >> 16) & 0x8000u, exponent = (b >> 23) & 0xFFu, mantissa = b & 0x7FFFFFu;
        int32_t e = (int32_t)exponent - 112;                     // the half's biased exponent
        // A normal half: the top 10 mantissa bits, rounded on the 13 below (a carry may reach
        // the exponent, and from the largest half to infinity).
        uint32_t normal = ((uint32_t)(e > 0 ? e : 0) << 10) | (mantissa >> 13);
        uint32_t rest = mantissa & 0x1FFFu;
        normal += (rest > 0x1000u) | ((rest == 0x1000u) & (normal & 1u));
        // A subnormal half (e in -10...0): the mantissa with its leading one, shifted 14 - e.
        uint32_t shift = (uint32_t)(e < -10 ? 24 : (e > 0 ? 14 : 14 - e));
        uint32_t full = mantissa | 0x800000u;
        uint32_t sub = full >> shift, subRest = full & ((1u << shift) - 1u), halfway = 1u << (shift - 1u);
        sub += (subRest > halfway) | ((subRest == halfway) & (sub & 1u));
        uint32_t r = e >= 31 ? 0x7C00u : (e > 0 ? normal : (e < -10 ? 0u : sub));
        if (exponent == 0xFFu) r = 0x7C00u | (mantissa ? 0x0200u : 0u);
        r |= sign;
        out[2 * i] = (unsigned char)(r & 0xFF);
        out[2 * i + 1] = (unsigned char)(r >> 8);
    }
}

int topiary_kernels_vector_bits(void) {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return 512;
    if (__builtin_cpu_supports("avx2")) return 256;
    return 128;
}
