// avx512_emu.h — a plain-C model of the AVX-512 intrinsics pyllm's kernels use, so the avx512 build of
// csrc/cpu/kernels_impl.h (its 16-lane tiles, masks, transposes, VNNI and AMX drivers) runs and is tested on a CPU
// without AVX-512. Test-only: tests/test_avx512_emu.py builds pyllm._C with it (isa.c, -DPYLLM_EMULATE_AVX512).
// Include after <immintrin.h> under an AVX2 target: GCC's own _mm512_* stay declared but unused; the macros below
// route every call here. Semantics from the Intel SDM; an intrinsic or predicate not modelled fails to compile
// (no macro) or aborts (unknown immediate), so the model never silently differs from what the kernels assume.
#pragma once
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifndef __AVX512F__
#define __AVX512F__ 1   // simd.h and the kernels pick their 16-lane code on this
#endif

typedef union { __m512 v; __m512i i; float f[16]; int32_t d[16]; uint32_t u[16]; int8_t b[64]; uint8_t ub[64];
                uint16_t w[32]; } e512;
static inline e512 e512_ps(__m512 v) { e512 r; r.v = v; return r; }
static inline e512 e512_si(__m512i v) { e512 r; r.i = v; return r; }

static inline __m512 emu_loadu_ps(const void* p) { e512 r; memcpy(r.f, p, 64); return r.v; }
static inline void emu_storeu_ps(void* p, __m512 a) { e512 r = e512_ps(a); memcpy(p, r.f, 64); }
static inline __m512i emu_loadu_si512(const void* p) { e512 r; memcpy(r.d, p, 64); return r.i; }
static inline void emu_storeu_si512(void* p, __m512i a) { e512 r = e512_si(a); memcpy(p, r.d, 64); }
static inline __m512 emu_set1_ps(float x) { e512 r; for (int i = 0; i < 16; i++) r.f[i] = x; return r.v; }
static inline __m512i emu_set1_epi32(int x) { e512 r; for (int i = 0; i < 16; i++) r.d[i] = x; return r.i; }
static inline __m512i emu_set1_epi8(char x) { e512 r; memset(r.b, x, 64); return r.i; }
static inline __m512 emu_setzero_ps(void) { e512 r; memset(&r, 0, 64); return r.v; }
static inline __m512i emu_setzero_si512(void) { e512 r; memset(&r, 0, 64); return r.i; }
static inline __m512i emu_setr_epi32(int e0, int e1, int e2, int e3, int e4, int e5, int e6, int e7, int e8, int e9,
                                     int e10, int e11, int e12, int e13, int e14, int e15) {
    e512 r;
    const int e[16] = {e0, e1, e2, e3, e4, e5, e6, e7, e8, e9, e10, e11, e12, e13, e14, e15};
    memcpy(r.d, e, 64);
    return r.i;
}

// --- arithmetic -----------------------------------------------------------------------------------------------
static inline __m512 emu_fmadd_ps(__m512 a, __m512 b, __m512 c) {
    e512 x = e512_ps(a), y = e512_ps(b), z = e512_ps(c), r;
    for (int i = 0; i < 16; i++) r.f[i] = fmaf(x.f[i], y.f[i], z.f[i]);   // one rounding, as vfmadd
    return r.v;
}
static inline __m512 emu_mul_ps(__m512 a, __m512 b) {
    e512 x = e512_ps(a), y = e512_ps(b), r;
    for (int i = 0; i < 16; i++) r.f[i] = x.f[i] * y.f[i];
    return r.v;
}
static inline __m512 emu_max_ps(__m512 a, __m512 b) {   // MAXPS: the second operand when either is NaN (or equal)
    e512 x = e512_ps(a), y = e512_ps(b), r;
    for (int i = 0; i < 16; i++) r.f[i] = x.f[i] > y.f[i] ? x.f[i] : y.f[i];
    return r.v;
}
static inline float emu_reduce_add_ps(__m512 a) {   // GCC's tree: 256-bit halves, 128-bit halves, then pairs
    e512 x = e512_ps(a);
    float s8[8], s4[4];
    for (int i = 0; i < 8; i++) s8[i] = x.f[i + 8] + x.f[i];
    for (int i = 0; i < 4; i++) s4[i] = s8[i + 4] + s8[i];
    return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}
static inline __m512i emu_add_epi32(__m512i a, __m512i b) {
    e512 x = e512_si(a), y = e512_si(b), r;
    for (int i = 0; i < 16; i++) r.u[i] = x.u[i] + y.u[i];
    return r.i;
}
static inline __m512i emu_sub_epi32(__m512i a, __m512i b) {
    e512 x = e512_si(a), y = e512_si(b), r;
    for (int i = 0; i < 16; i++) r.u[i] = x.u[i] - y.u[i];
    return r.i;
}
static inline __m512i emu_xor_si512(__m512i a, __m512i b) {
    e512 x = e512_si(a), y = e512_si(b), r;
    for (int i = 0; i < 16; i++) r.u[i] = x.u[i] ^ y.u[i];
    return r.i;
}
static inline __m512i emu_srli_epi32(__m512i a, unsigned n) {
    e512 x = e512_si(a), r;
    for (int i = 0; i < 16; i++) r.u[i] = n > 31 ? 0 : x.u[i] >> n;
    return r.i;
}
static inline __m512i emu_slli_epi32(__m512i a, unsigned n) {
    e512 x = e512_si(a), r;
    for (int i = 0; i < 16; i++) r.u[i] = n > 31 ? 0 : x.u[i] << n;
    return r.i;
}
static inline __m512 emu_cvtepi32_ps(__m512i a) {
    e512 x = e512_si(a), r;
    for (int i = 0; i < 16; i++) r.f[i] = (float)x.d[i];
    return r.v;
}
static inline __m512i emu_cvtepu16_epi32(__m256i a) {
    uint16_t w[16];
    memcpy(w, &a, 32);
    e512 r;
    for (int i = 0; i < 16; i++) r.d[i] = w[i];
    return r.i;
}
static inline __m512 emu_castsi512_ps(__m512i a) { e512 r = e512_si(a); return r.v; }
// VDPBF16PS: each fp32 lane += the products of its two bf16 halves, high pair first (SDM: DAZ on the bf16
// inputs, FTZ on the result, round to nearest even; a bf16 product is exact in fp32, so each step rounds once)
static inline float emu_bf16_daz(uint16_t h) {
    if ((h & 0x7F80u) == 0) h &= 0x8000u;   // a denormal input reads as a signed zero
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static inline float emu_ftz(float f) { return fpclassify(f) == FP_SUBNORMAL ? copysignf(0.0f, f) : f; }
static inline __m512 emu_dpbf16_ps(__m512 acc, __m512i a, __m512i b) {
    e512 c = e512_ps(acc), x = e512_si(a), y = e512_si(b);
    for (int i = 0; i < 16; i++) {
        float t = emu_ftz(c.f[i] + emu_bf16_daz(x.w[2 * i + 1]) * emu_bf16_daz(y.w[2 * i + 1]));
        c.f[i] = emu_ftz(t + emu_bf16_daz(x.w[2 * i]) * emu_bf16_daz(y.w[2 * i]));
    }
    return c.v;
}
// VPDPBUSD: each int32 lane += 4 products of unsigned bytes of u and signed bytes of s (no saturation)
static inline __m512i emu_dpbusd_epi32(__m512i acc, __m512i u, __m512i s) {
    e512 c = e512_si(acc), x = e512_si(u), y = e512_si(s);
    for (int i = 0; i < 16; i++) {
        int32_t d = 0;
        for (int j = 0; j < 4; j++) d += (int32_t)x.ub[4 * i + j] * (int32_t)y.b[4 * i + j];
        c.u[i] += (uint32_t)d;
    }
    return c.i;
}

// --- rounding and scaling ---------------------------------------------------------------------------------------
static inline __m512 emu_roundscale_ps(__m512 a, int imm) {
    if ((imm >> 4) != 0 || (imm & 4)) abort();   // only scale 0 and an explicit rounding mode are modelled
    e512 x = e512_ps(a), r;
    for (int i = 0; i < 16; i++) {
        const float v = x.f[i];
        switch (imm & 3) {
        case 0: r.f[i] = nearbyintf(v); break;   // to nearest even (the default rounding mode)
        case 1: r.f[i] = floorf(v); break;
        case 2: r.f[i] = ceilf(v); break;
        default: r.f[i] = truncf(v); break;
        }
    }
    return r.v;
}
// VSCALEFPS: a * 2^floor(b), with the SDM's NaN and infinity rules
static inline float emu_scalef1(float a, float b) {
    if (isnan(a) || isnan(b)) return isnan(a) ? a + 0.0f : b + 0.0f;
    if (isinf(b)) {
        if (b > 0) return a == 0.0f ? NAN : a * INFINITY;
        return isinf(a) ? NAN : a * 0.0f;
    }
    float n = floorf(b);
    n = n > 400.0f ? 400.0f : n < -400.0f ? -400.0f : n;
    return ldexpf(a, (int)n);
}

// --- masks ------------------------------------------------------------------------------------------------------
static inline __mmask16 emu_cmp_ps_mask(__m512 a, __m512 b, int pred) {
    e512 x = e512_ps(a), y = e512_ps(b);
    unsigned k = 0;
    for (int i = 0; i < 16; i++) {
        const float p = x.f[i], q = y.f[i];
        const int un = isnan(p) || isnan(q);
        int t;
        switch (pred) {
        case _CMP_EQ_OQ: t = !un && p == q; break;
        case _CMP_LT_OQ: t = !un && p < q; break;
        case _CMP_GT_OQ: t = !un && p > q; break;
        case _CMP_NLT_UQ: t = un || !(p < q); break;
        default: abort();   // a predicate the model does not know
        }
        k |= (unsigned)t << i;
    }
    return (__mmask16)k;
}
static inline __mmask16 emu_cmpeq_epi32_mask(__m512i a, __m512i b) {
    e512 x = e512_si(a), y = e512_si(b);
    unsigned k = 0;
    for (int i = 0; i < 16; i++) k |= (unsigned)(x.d[i] == y.d[i]) << i;
    return (__mmask16)k;
}
static inline __mmask16 emu_cmple_epi32_mask(__m512i a, __m512i b) {
    e512 x = e512_si(a), y = e512_si(b);
    unsigned k = 0;
    for (int i = 0; i < 16; i++) k |= (unsigned)(x.d[i] <= y.d[i]) << i;
    return (__mmask16)k;
}
// masked loads touch only the selected elements (the hardware suppresses faults on the others: so must the model)
static inline __m512 emu_maskz_loadu_ps(__mmask16 k, const void* p) {
    e512 r;
    for (int i = 0; i < 16; i++) {
        r.f[i] = 0.0f;
        if ((k >> i) & 1) memcpy(&r.f[i], (const char*)p + 4 * i, 4);
    }
    return r.v;
}
static inline __m512i emu_maskz_loadu_epi8(__mmask64 k, const void* p) {
    e512 r;
    for (int i = 0; i < 64; i++) r.b[i] = ((k >> i) & 1) ? ((const int8_t*)p)[i] : 0;
    return r.i;
}
static inline __m512i emu_maskz_loadu_epi16(__mmask32 k, const void* p) {
    e512 r;
    for (int i = 0; i < 32; i++) {
        r.w[i] = 0;
        if ((k >> i) & 1) memcpy(&r.w[i], (const char*)p + 2 * i, 2);
    }
    return r.i;
}
static inline __m256i emu256_maskz_loadu_epi16(__mmask16 k, const void* p) {
    uint16_t w[16];
    for (int i = 0; i < 16; i++) {
        w[i] = 0;
        if ((k >> i) & 1) memcpy(&w[i], (const char*)p + 2 * i, 2);
    }
    __m256i r;
    memcpy(&r, w, 32);
    return r;
}
static inline void emu_mask_storeu_ps(void* p, __mmask16 k, __m512 a) {
    e512 x = e512_ps(a);
    for (int i = 0; i < 16; i++)
        if ((k >> i) & 1) memcpy((char*)p + 4 * i, &x.f[i], 4);
}
static inline __m512 emu_maskz_mov_ps(__mmask16 k, __m512 a) {
    e512 x = e512_ps(a), r;
    for (int i = 0; i < 16; i++) r.f[i] = ((k >> i) & 1) ? x.f[i] : 0.0f;
    return r.v;
}
static inline __m512 emu_mask_add_ps(__m512 src, __mmask16 k, __m512 a, __m512 b) {
    e512 s = e512_ps(src), x = e512_ps(a), y = e512_ps(b), r;
    for (int i = 0; i < 16; i++) r.f[i] = ((k >> i) & 1) ? x.f[i] + y.f[i] : s.f[i];
    return r.v;
}
static inline __m512 emu_maskz_scalef_ps(__mmask16 k, __m512 a, __m512 b) {
    e512 x = e512_ps(a), y = e512_ps(b), r;
    for (int i = 0; i < 16; i++) r.f[i] = ((k >> i) & 1) ? emu_scalef1(x.f[i], y.f[i]) : 0.0f;
    return r.v;
}
static inline __m512i emu_maskz_compress_epi32(__mmask16 k, __m512i a) {
    e512 x = e512_si(a), r;
    int n = 0;
    for (int i = 0; i < 16; i++)
        if ((k >> i) & 1) r.d[n++] = x.d[i];
    while (n < 16) r.d[n++] = 0;
    return r.i;
}

// --- permutes ---------------------------------------------------------------------------------------------------
static inline __m512 emu_permutexvar_ps(__m512i idx, __m512 a) {
    e512 j = e512_si(idx), x = e512_ps(a), r;
    for (int i = 0; i < 16; i++) r.f[i] = x.f[j.u[i] & 15];
    return r.v;
}
static inline __m512 emu_shuffle_f32x4(__m512 a, __m512 b, int imm) {   // 128-bit lanes: a, a, b, b by imm
    e512 x = e512_ps(a), y = e512_ps(b), r;
    for (int l = 0; l < 4; l++) memcpy(&r.f[4 * l], &(l < 2 ? x : y).f[4 * ((imm >> (2 * l)) & 3)], 16);
    return r.v;
}
static inline __m512 emu_shuffle_ps(__m512 a, __m512 b, int imm) {   // per 128-bit lane: a[i0] a[i1] b[i2] b[i3]
    e512 x = e512_ps(a), y = e512_ps(b), r;
    for (int l = 0; l < 4; l++)
        for (int e = 0; e < 4; e++) r.f[4 * l + e] = (e < 2 ? x : y).f[4 * l + ((imm >> (2 * e)) & 3)];
    return r.v;
}
static inline __m512 emu_unpacklo_ps(__m512 a, __m512 b) {   // per 128-bit lane: a0 b0 a1 b1
    e512 x = e512_ps(a), y = e512_ps(b), r;
    for (int l = 0; l < 4; l++)
        for (int e = 0; e < 2; e++) { r.f[4 * l + 2 * e] = x.f[4 * l + e]; r.f[4 * l + 2 * e + 1] = y.f[4 * l + e]; }
    return r.v;
}
static inline __m512 emu_unpackhi_ps(__m512 a, __m512 b) {   // per 128-bit lane: a2 b2 a3 b3
    e512 x = e512_ps(a), y = e512_ps(b), r;
    for (int l = 0; l < 4; l++)
        for (int e = 0; e < 2; e++) {
            r.f[4 * l + 2 * e] = x.f[4 * l + 2 + e];
            r.f[4 * l + 2 * e + 1] = y.f[4 * l + 2 + e];
        }
    return r.v;
}

// --- the names the kernels call ----------------------------------------------------------------------------------
#define _mm512_loadu_ps emu_loadu_ps
#define _mm512_storeu_ps emu_storeu_ps
#define _mm512_loadu_si512 emu_loadu_si512
#define _mm512_storeu_si512 emu_storeu_si512
#define _mm512_set1_ps emu_set1_ps
#define _mm512_set1_epi32 emu_set1_epi32
#define _mm512_set1_epi8 emu_set1_epi8
#define _mm512_setzero_ps emu_setzero_ps
#define _mm512_setzero_si512 emu_setzero_si512
#undef _mm512_setr_epi32   // GCC defines it as a macro
#define _mm512_setr_epi32 emu_setr_epi32
#define _mm512_fmadd_ps emu_fmadd_ps
#define _mm512_mul_ps emu_mul_ps
#define _mm512_max_ps emu_max_ps
#define _mm512_reduce_add_ps emu_reduce_add_ps
#define _mm512_add_epi32 emu_add_epi32
#define _mm512_sub_epi32 emu_sub_epi32
#define _mm512_xor_si512 emu_xor_si512
#define _mm512_srli_epi32 emu_srli_epi32
#define _mm512_slli_epi32 emu_slli_epi32
#define _mm512_cvtepi32_ps emu_cvtepi32_ps
#define _mm512_cvtepu16_epi32 emu_cvtepu16_epi32
#define _mm512_castsi512_ps emu_castsi512_ps
#define _mm512_dpbusd_epi32 emu_dpbusd_epi32
#define _mm512_roundscale_ps emu_roundscale_ps
#define _mm512_cmp_ps_mask emu_cmp_ps_mask
#define _mm512_cmpeq_epi32_mask emu_cmpeq_epi32_mask
#define _mm512_cmple_epi32_mask emu_cmple_epi32_mask
#define _mm512_maskz_loadu_ps emu_maskz_loadu_ps
#define _mm512_maskz_loadu_epi8 emu_maskz_loadu_epi8
#define _mm256_maskz_loadu_epi16 emu256_maskz_loadu_epi16
#define _mm512_maskz_loadu_epi16 emu_maskz_loadu_epi16
#define _mm512_mask_storeu_ps emu_mask_storeu_ps
#define _mm512_maskz_mov_ps emu_maskz_mov_ps
#define _mm512_mask_add_ps emu_mask_add_ps
#define _mm512_maskz_scalef_ps emu_maskz_scalef_ps
#define _mm512_maskz_compress_epi32 emu_maskz_compress_epi32
#define _mm512_permutexvar_ps emu_permutexvar_ps
#define _mm512_shuffle_f32x4 emu_shuffle_f32x4
#define _mm512_shuffle_ps emu_shuffle_ps
#define _mm512_unpacklo_ps emu_unpacklo_ps
#define _mm512_unpackhi_ps emu_unpackhi_ps
