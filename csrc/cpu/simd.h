// simd.h — one vector type per compiled path (GCC vector extensions), so each kernel is written once.
// VLEN floats per vector: 16 on avx512, 8 on avx2, 4 on the portable path (SSE2, part of x86-64 itself).
// Included only from kernels_impl.h after the path's `#pragma GCC target`.
#pragma once
#include <string.h>

#if defined(__AVX512F__)
#define VLEN 16
#elif defined(__AVX2__)
#define VLEN 8
#else
#define VLEN 4
#endif

typedef float vf __attribute__((vector_size(VLEN * 4), aligned(4)));  // unaligned loads allowed
typedef int32_t vi __attribute__((vector_size(VLEN * 4), aligned(4)));

static inline vf vf_load(const float* p) { vf v; memcpy(&v, p, sizeof(v)); return v; }
static inline void vf_store(float* p, vf v) { memcpy(p, &v, sizeof(v)); }
static inline vf vf_set1(float x) { return (vf){0} + x; }
static inline float vf_sum(vf v) { float s = 0.f; for (int i = 0; i < VLEN; i++) s += v[i]; return s; }
static inline float vf_max(vf v) { float m = v[0]; for (int i = 1; i < VLEN; i++) m = v[i] > m ? v[i] : m; return m; }
static inline vf vf_select(vi mask, vf a, vf b) { return (vf)((mask & (vi)a) | (~mask & (vi)b)); }  // mask ? a : b
static inline vf vf_fmax(vf a, vf b) { return vf_select(a > b, a, b); }
