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

/// e^x lane by lane for n values (tests compare it with the C library's).
void topiary_exp(const float *x, float *y, ptrdiff_t n);

/// Which clone the loader chose: 512 (AVX-512), 256 (AVX2) or 128 (baseline).
int topiary_kernels_vector_bits(void);

#endif
