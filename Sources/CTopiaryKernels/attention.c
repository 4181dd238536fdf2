// The two products of a causal attention tile (scores = scale·Q·Kᵀ and acc += P·V) for one
// thread, in register tiles of 6 rows by 16 columns. Every output is one fused multiply-add
// chain over the inner dimension in order from index 0, then scaled (scores) or added to the
// accumulator (values), so the bits depend on neither the CPU, the clone nor the tile's place.
// The clones with x86-64-v3 and v4 run the FMAs as instructions; the baseline calls fmaf.
#include "topiary_kernels.h"
#include "lanes.h"
#include <math.h>

#define FMA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define vfma(a, b, c) __builtin_elementwise_fma((a), (b), (c))

/// Rows per register tile: 6 accumulators of 16 lanes (12 of AVX2's 16 registers), one panel row
/// and one broadcast.
enum { TILE_ROWS = 6 };

void topiary_attention_pack_keys(const float *k, ptrdiff_t ldk, ptrdiff_t n, ptrdiff_t headDim, float *out) {
    for (ptrdiff_t j0 = 0; j0 < n; j0 += 16) {
        ptrdiff_t width = n - j0 < 16 ? n - j0 : 16;
        float *panel = out + j0 * headDim;
        for (ptrdiff_t p = 0; p < headDim; p++) {
            float *row = panel + p * 16;
            for (ptrdiff_t j = 0; j < width; j++) row[j] = k[(j0 + j) * ldk + p];
            for (ptrdiff_t j = width; j < 16; j++) row[j] = 0;
        }
    }
}

void topiary_attention_pack_values(const float *v, ptrdiff_t ldv, ptrdiff_t n, ptrdiff_t headDim, float *out) {
    for (ptrdiff_t d0 = 0; d0 < headDim; d0 += 16) {
        ptrdiff_t width = headDim - d0 < 16 ? headDim - d0 : 16;
        float *panel = out + d0 * n;
        for (ptrdiff_t j = 0; j < n; j++) {
            float *row = panel + j * 16;
            memcpy(row, v + j * ldv + d0, (size_t)width * sizeof(float));
            for (ptrdiff_t d = width; d < 16; d++) row[d] = 0;
        }
    }
}

/// `rows` (at most TILE_ROWS, a constant once inlined) rows of a[r·lda + i] times the panel
/// b[i·16 + c] over i < depth, each lane a fused multiply-add chain from i = 0; the result
/// `finish(acc, r)`'s to stores. A macro, so that each row count gets its own unrolled body.
#define registerTile(rows, a, lda, b, depth, finish) do { \
    vf rt_acc[TILE_ROWS]; \
    const float *rt_a[TILE_ROWS]; \
    for (int r_ = 0; r_ < (rows); r_++) { rt_acc[r_] = splat(0.0f); rt_a[r_] = (a) + r_ * (lda); } \
    _Pragma("clang loop unroll_count(4)") \
    for (ptrdiff_t i_ = 0; i_ < (depth); i_++) { \
        vf rt_b = load((b) + i_ * 16); \
        for (int r_ = 0; r_ < (rows); r_++) rt_acc[r_] = vfma(splat(rt_a[r_][i_]), rt_b, rt_acc[r_]); \
    } \
    for (int r_ = 0; r_ < (rows); r_++) finish(rt_acc[r_], r_); \
} while (0)

/// Calls `body(rows)` with rows a constant from 1 to TILE_ROWS.
#define withConstantRows(count, body) do { \
    switch (count) { \
    case 6: body(6); break; case 5: body(5); break; case 4: body(4); break; \
    case 3: body(3); break; case 2: body(2); break; default: body(1); break; } \
} while (0)

/// Stores the first `width` lanes of v at p.
#define storeFirst(p, v, width) do { \
    if ((width) == 16) store((p), (v)); \
    else { vf sf_v = (v); for (ptrdiff_t j_ = 0; j_ < (width); j_++) (p)[j_] = sf_v[j_]; } \
} while (0)

/// How many of the n columns rows r0..<r0 + rows see: the most that any of them sees.
static inline ptrdiff_t visibleColumns(ptrdiff_t r0, ptrdiff_t rows, ptrdiff_t n, ptrdiff_t period, ptrdiff_t offset) {
    ptrdiff_t most = 0;
    for (ptrdiff_t r = r0; r < r0 + rows; r++) {
        ptrdiff_t seen = r % period + offset + 1;
        most = seen > most ? seen : most;
    }
    return most < n ? most : n;
}

FMA_CLONES void topiary_attention_scores(const float *q, ptrdiff_t ldq, ptrdiff_t m, const float *kPacked, ptrdiff_t n,
                                         ptrdiff_t headDim, float scale, ptrdiff_t period, ptrdiff_t offset,
                                         float *s, ptrdiff_t lds) {
    for (ptrdiff_t r0 = 0; r0 < m; r0 += TILE_ROWS) {
        ptrdiff_t rows = m - r0 < TILE_ROWS ? m - r0 : TILE_ROWS;
        const float *a = q + r0 * ldq;
        ptrdiff_t visible = visibleColumns(r0, rows, n, period, offset);
        for (ptrdiff_t j0 = 0; j0 < visible; j0 += 16) {
            ptrdiff_t width = n - j0 < 16 ? n - j0 : 16;
            const float *panel = kPacked + j0 * headDim;
            float *c = s + r0 * lds + j0;
#define scoresFinish(acc, r) storeFirst(c + (r) * lds, (acc) * scale, width)
#define scoresTile(R) registerTile(R, a, ldq, panel, headDim, scoresFinish)
            withConstantRows(rows, scoresTile);
#undef scoresTile
#undef scoresFinish
        }
    }
}

FMA_CLONES void topiary_attention_values(const float *p, ptrdiff_t ldp, ptrdiff_t m, const float *vPacked, ptrdiff_t n,
                                         ptrdiff_t headDim, ptrdiff_t period, ptrdiff_t offset, float *acc, ptrdiff_t ldacc) {
    for (ptrdiff_t r0 = 0; r0 < m; r0 += TILE_ROWS) {
        ptrdiff_t rows = m - r0 < TILE_ROWS ? m - r0 : TILE_ROWS;
        const float *a = p + r0 * ldp;
        ptrdiff_t depth = visibleColumns(r0, rows, n, period, offset);
        for (ptrdiff_t d0 = 0; d0 < headDim; d0 += 16) {
            ptrdiff_t width = headDim - d0 < 16 ? headDim - d0 : 16;
            const float *panel = vPacked + d0 * n;
            float *c = acc + r0 * ldacc + d0;
#define valuesFinish(sum, r) do { \
    float *vf_c = c + (r) * ldacc; \
    if (width == 16) store(vf_c, load(vf_c) + (sum)); \
    else { vf vf_s = (sum); for (ptrdiff_t j_ = 0; j_ < width; j_++) vf_c[j_] += vf_s[j_]; } \
} while (0)
#define valuesTile(R) registerTile(R, a, ldp, panel, depth, valuesFinish)
            withConstantRows(rows, valuesTile);
#undef valuesTile
#undef valuesFinish
        }
    }
}
