// The 16-lane vector type and its helpers, shared by the kernels' source files.
#ifndef TOPIARY_LANES_H
#define TOPIARY_LANES_H
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#pragma clang fp contract(off)

typedef float vf __attribute__((ext_vector_type(16)));
typedef int32_t vi __attribute__((ext_vector_type(16)));

#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))

// The helpers are macros: a function taking or returning a 16-lane vector would have a
// different ABI in each clone.
#define splat(x) ((vf)(float)(x))
#define load(p) ({ vf v_; memcpy(&v_, (p), sizeof v_); v_; })
#define store(p, v) do { vf s_ = (v); memcpy((p), &s_, sizeof s_); } while (0)
#define loadTail(p, count, fill) ({ vf t_ = splat(fill); const float *q_ = (p); \
    for (ptrdiff_t j_ = 0; j_ < (count); j_++) t_[j_] = q_[j_]; t_; })

#endif
