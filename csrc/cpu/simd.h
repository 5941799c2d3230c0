// simd.h — one vector type per compiled path (GCC vector extensions), so each kernel is written once.
// VLEN floats per vector: 16 on avx512, 8 on avx2, 4 on the portable path (SSE2, part of x86-64 itself).
// Also K_FOR, the kernels' parallel-loop helper. Included from kernels_impl.h (and benchmarks/bench_matmul_lab.py's
// lab source) after the path's `#pragma GCC target`.
#pragma once
#include <immintrin.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

// for (int i = 0; i < n; i++) { ... }, as an OpenMP static loop when `big` and the caller is not already inside a
// parallel region, else as a plain loop. run.c's forward calls the kernels from inside its own region, once per
// thread: a nested `omp parallel for if (0)` there still builds a one-thread team in libgomp (0.5-0.9 us per call
// in a micro-benchmark, ~90 calls per token for llama2.c's 15M model; the end-to-end gain was within noise).
#ifdef _OPENMP
#define K_FOR(big, i, n, ...)                                                                               \
    do {                                                                                                    \
        if ((big) && omp_get_level() == 0) {                                                                \
            _Pragma("omp parallel for schedule(static)") for (int i = 0; i < (n); i++) { __VA_ARGS__; }     \
        } else {                                                                                            \
            for (int i = 0; i < (n); i++) { __VA_ARGS__; }                                                  \
        }                                                                                                   \
    } while (0)
#else
#define K_FOR(big, i, n, ...) do { for (int i = 0; i < (n); i++) { __VA_ARGS__; } } while (0)
#endif

#if defined(__AVX512F__)
#define VLEN 16
#elif defined(__AVX2__)
#define VLEN 8
#else
#define VLEN 4
#endif

typedef float vf __attribute__((vector_size(VLEN * 4), aligned(4)));  // unaligned loads allowed
typedef int32_t vi __attribute__((vector_size(VLEN * 4), aligned(4)));

// Loads, stores and broadcasts are explicit intrinsics: gcc 12 lowers a memcpy of a 32-byte vector through the
// stack inside register-heavy micro-kernels (spills), and `(vf){0} + x` costs an add (x + 0.0 is not x for -0.0).
#if defined(__AVX512F__)
static inline vf vf_load(const float* p) { return (vf)_mm512_loadu_ps(p); }
static inline void vf_store(float* p, vf v) { _mm512_storeu_ps(p, (__m512)v); }
static inline vf vf_set1(float x) { return (vf)_mm512_set1_ps(x); }
static inline vf vf_fma(vf a, vf b, vf c) { return (vf)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c); }
static inline vf vf_fmax(vf a, vf b) { return (vf)_mm512_max_ps((__m512)a, (__m512)b); }
#elif defined(__AVX2__)
static inline vf vf_load(const float* p) { return (vf)_mm256_loadu_ps(p); }
static inline void vf_store(float* p, vf v) { _mm256_storeu_ps(p, (__m256)v); }
static inline vf vf_set1(float x) { return (vf)_mm256_set1_ps(x); }
static inline vf vf_fma(vf a, vf b, vf c) { return (vf)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c); }
static inline vf vf_fmax(vf a, vf b) { return (vf)_mm256_max_ps((__m256)a, (__m256)b); }
#else
static inline vf vf_load(const float* p) { return (vf)_mm_loadu_ps(p); }
static inline void vf_store(float* p, vf v) { _mm_storeu_ps(p, (__m128)v); }
static inline vf vf_set1(float x) { return (vf)_mm_set1_ps(x); }
static inline vf vf_fma(vf a, vf b, vf c) { return a * b + c; }  // no FMA on the baseline: two roundings
static inline vf vf_fmax(vf a, vf b) { return (vf)_mm_max_ps((__m128)a, (__m128)b); }
#endif
// vf_fmax(a, b) is a > b ? a : b, NaN included: maxps returns its second operand when either is NaN. One
// instruction; the compare-and-select it replaces was three, on the max loops' critical path.
// vf_sum: a pairwise tree (halves added), log2(VLEN) dependent adds; the sequential lane loop it replaces was VLEN.
static inline float vf_sum(vf v) {
#if VLEN == 16
    return _mm512_reduce_add_ps((__m512)v);
#elif VLEN == 8
    __m128 h = _mm_add_ps(_mm256_castps256_ps128((__m256)v), _mm256_extractf128_ps((__m256)v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
#else
    return (v[0] + v[2]) + (v[1] + v[3]);
#endif
}
static inline float vf_max(vf v) { float m = v[0]; for (int i = 1; i < VLEN; i++) m = v[i] > m ? v[i] : m; return m; }
static inline vf vf_select(vi mask, vf a, vf b) { return (vf)((mask & (vi)a) | (~mask & (vi)b)); }  // mask ? a : b
