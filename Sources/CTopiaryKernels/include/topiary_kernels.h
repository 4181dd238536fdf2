#ifndef TOPIARY_KERNELS_H
#define TOPIARY_KERNELS_H
#include <stddef.h>

/// Element-wise kernels of the forward pass in 16-lane vectors, compiled for AVX-512, AVX2 and
/// baseline x86-64 and chosen at load time (the Swift SIMD types compile for the baseline only).
/// Every clone runs the same operations in the same order without contraction into FMA, so the
/// results are the same bits on every CPU and for every thread count.

/// p[i] = e^(p[i] - shift) for i < n, in place; returns their sum: 16 lanes added in order within
/// chunks of 4096 entries, each chunk's lane sum (lanes 0..15 in order) added in double.
double topiary_exp_shifted(float *p, ptrdiff_t n, float shift);

/// The same sum without storing the exponentials (log-sum-exp of a logit row).
double topiary_sum_exp_shifted(const float *p, ptrdiff_t n, float shift);

/// The largest of p[0..<n] (-inf when n is 0; NaN entries are skipped).
float topiary_maximum(const float *p, ptrdiff_t n);

/// gate[i] = silu(gate[i]) * up[i], silu(x) = x / (1 + e^-x).
void topiary_swiglu(float *gate, const float *up, ptrdiff_t n);

/// SwiGLU's backward from d = ∂L/∂(silu(g)·u): with σ = 1 / (1 + e^-g[i]),
/// du[i] = d[i]·(g[i]·σ) and dg[i] = d[i]·(u[i]·σ·(1 + g[i]·(1 − σ))), e^x as in `topiary_swiglu`.
void topiary_swiglu_backward(const float *d, const float *g, const float *u, float *dg, float *du, ptrdiff_t n);

/// y[i] = silu(x[i]) = x[i] / (1 + e^-x[i]) for i < n (x and y may be the same).
void topiary_silu(const float *x, float *y, ptrdiff_t n);

/// e^x lane by lane for n values (tests compare it with the C library's).
void topiary_exp(const float *x, float *y, ptrdiff_t n);

/// y[i] = gelu(x[i]) = x[i]·(1 + tanh(√(2/π)·(x[i] + 0.044715·x[i]³)))/2 for i < n, tanh as
/// 1 − 2/(e^{2|u|} + 1) with u's sign through the 16-lane exponential (x and y may be the same).
void topiary_gelu_tanh(const float *x, float *y, ptrdiff_t n);

/// gate[i] = gelu(gate[i]) * up[i] (GEGLU, with `topiary_gelu_tanh`'s value).
void topiary_geglu(float *gate, const float *up, ptrdiff_t n);

/// GEGLU's backward for n elements: du = d·gelu(g) (the forward's value), dg = d·(u·gelu′(g)).
void topiary_geglu_backward(const float *d, const float *g, const float *u, float *dg, float *du, ptrdiff_t n);

/// x[i] = cap·tanh(x[i]/cap) for i < n, in place, tanh as `topiary_gelu_tanh` takes it
/// (Gemma-2's soft-capped attention scores and logits).
void topiary_softcap(float *x, ptrdiff_t n, float cap);

/// The gated activations of `topiary_sparsellm_gate`.
enum { TOPIARY_GATE_SILU = 0, TOPIARY_GATE_GELU_TANH = 1, TOPIARY_GATE_RELU = 2 };

/// SparseLLM's gate update, element by element, on a·(v − g[i])² + c·(p[i] − act(v)·z[i])².
/// SiLU and GELU-tanh (v·(1 + tanh(√(2/π)(v + 0.044715v³)))/2): from s[i], at most `steps`
/// Newton steps (exact curvature, Gauss–Newton where it is not positive), each halved up to 20
/// times until the cost does not rise; an element stops when its step is within
/// 1e-6·max(1, |s|) or no halving descends. 16 elements at a time in lanes, each lane's
/// arithmetic independent of the others, so the result does not depend on `n`'s split.
/// ReLU: the exact minimiser (unless `steps` is 0), the better of the branches v = min(g, 0)
/// and v = max((a·g + c·p·z)/(a + c·z²), 0), the second on a tie.
void topiary_sparsellm_gate(float *s, const float *g, const float *z, const float *p, ptrdiff_t n,
                            float a, float c, int steps, int activation);

/// dst[i] = the bfloat16 bits of src[i], little-endian, rounded to nearest even; a NaN keeps its
/// top 16 bits with the quiet bit set (HalfPrecision.floatToBF16, element for element). `dst`
/// need not be aligned.
void topiary_f32_to_bf16(const float *src, void *dst, ptrdiff_t n);

/// dst[i] = the IEEE binary16 bits of src[i], little-endian, rounded to nearest even (subnormal
/// halves included, overflow to infinity, every NaN to 0x7E00 with its sign), as
/// HalfPrecision.floatToFP16 gives them. `dst` need not be aligned.
void topiary_f32_to_f16(const float *src, void *dst, ptrdiff_t n);

/// The products of one causal attention tile, for one thread (attention.c). Each output is one
/// fused multiply-add chain over the inner dimension in order from index 0, so the bits are the
/// same on every CPU and wherever the tile lies.
///
/// Keys for `topiary_attention_scores`: n rows of headDim floats (row stride ldk) into panels of
/// 16 keys, out[j0·headDim + p·16 + j] = k[(j0 + j)·ldk + p] for each j0 a multiple of 16, the
/// last panel padded with zeros (out holds roundup(n, 16)·headDim floats).
void topiary_attention_pack_keys(const float *k, ptrdiff_t ldk, ptrdiff_t n, ptrdiff_t headDim, float *out);

/// Values for `topiary_attention_values`: n rows of headDim floats (row stride ldv) into panels
/// of 16 columns, out[d0·n + j·16 + d] = v[j·ldv + d0 + d] for each d0 a multiple of 16, the last
/// panel padded with zeros (out holds n·roundup(headDim, 16) floats).
void topiary_attention_pack_values(const float *v, ptrdiff_t ldv, ptrdiff_t n, ptrdiff_t headDim, float *out);

/// Causal masks in both products: row r sees the columns j < (r mod period) + offset + 1 (and
/// j < n); period > 0. Rows are done six at a time, and the columns none of the six sees are
/// skipped (scores) or not summed (values).
///
/// s[r·lds + j] = scale·Σ_{p<headDim} q[r·ldq + p]·k[j][p] for r < m and the columns j that r sees
/// (the rest of the row's n entries hold anything), k packed by `topiary_attention_pack_keys`;
/// the sum is fmaf(q, k, sum) from p = 0 starting at +0, then multiplied by scale.
void topiary_attention_scores(const float *q, ptrdiff_t ldq, ptrdiff_t m, const float *kPacked, ptrdiff_t n,
                              ptrdiff_t headDim, float scale, ptrdiff_t period, ptrdiff_t offset,
                              float *s, ptrdiff_t lds);

/// acc[r·ldacc + d] += Σ_j p[r·ldp + j]·v[j][d] for r < m and d < headDim, the sum over j < n,
/// which must be 0 at the columns r does not see; v packed by `topiary_attention_pack_values`.
/// The sum is fmaf(p, v, sum) from j = 0 starting at +0 (with finite values the zeros change
/// nothing, so the columns skipped make no difference to the bits), then added to acc.
void topiary_attention_values(const float *p, ptrdiff_t ldp, ptrdiff_t m, const float *vPacked, ptrdiff_t n,
                              ptrdiff_t headDim, ptrdiff_t period, ptrdiff_t offset, float *acc, ptrdiff_t ldacc);

/// Which clone the loader chose: 512 (AVX-512), 256 (AVX2) or 128 (baseline).
int topiary_kernels_vector_bits(void);

#endif
