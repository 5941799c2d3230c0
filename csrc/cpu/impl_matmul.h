// impl_matmul.h — GEMM C(M,N) (+)= op(A)·op(B)ᵀ (fp32, and bf16 inputs with fp32 accumulate); M <= MM_SMALL_M
// goes to mm_small_m (impl_matvec.h). Included by kernels_impl.h; KFN() names the per-path symbol.
//
// GEMM design (Goto/BLIS): per K block (K split evenly into blocks of <= MM_KC_MAX), both operands are packed
// into zero-padded panels — A into MR-row panels (kc, MR), B into NR-column panels (kc, NR) — so one
// register-blocked micro-kernel (MR x NR accumulators, NR = 2 vectors, A broadcast, B loaded) serves every
// transpose, and edges cost only the padding. The A micro-panel (kc*MR floats, 21 KiB on avx512) stays in L1
// while the B micro-panels of one B block (<= MM_NC_MAX columns, <= 768 KiB) stream from L2. Packing costs
// (M+N)*K copies per call against 2*M*N*K flops, and was the measured gap to torch: the packers prefetch their
// strided source rows, and the scratch is reused across calls (no malloc or page faults per call). A row-major A
// is not packed at all: the micro-kernel reads its MR rows in place (ain in mm_gemm), but for a 4 KiB row stride.
// Small and mid-size products (the training GEMMs of d = 128..384 models) take the direct path (mm_direct below):
// the micro-kernel reads A in place and B in place where its layout allows, so little or nothing is packed.
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif
#include <pthread.h>

#ifdef MM_MR
#elif VLEN == 16
#define MM_MR 14        // 28 zmm accumulators + 2 B vectors (+ 1 broadcast) of 32 registers
#else
#define MM_MR 6         // 12 ymm/xmm accumulators + 2 B vectors + 1 broadcast of 16 registers
#endif
#define MM_NR (2 * VLEN)
#define MM_HAVE_DP (VLEN == 16)   // the bf16 k-pair path (vdpbf16ps, below) exists in the avx512 build

#ifndef MM_PACK_GROUP
#define MM_PACK_GROUP 8
#endif
#ifndef MM_PF_ROWS
#define MM_PF_ROWS 4
#endif
#ifndef MM_PF_PACK
#define MM_PF_PACK 4
#endif
#ifndef MM_PF_B
#define MM_PF_B 8       // k steps ahead that the micro-kernel prefetches its B operand
#endif
static inline float mm_bf16_to_f32(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }

// Element X[r, k] of an operand stored (R, K) with row stride ld, or (K, R) when trans.
#define MM_AT(src, ld, trans, r, k) ((src)[(trans) ? (size_t)(k) * (ld) + (r) : (size_t)(r) * (ld) + (k)])

#if VLEN == 16
// x[i] = row i of a 16 x 16 block -> x[j] = column j: three rounds of in-lane and cross-lane shuffles (64 ops).
static inline __attribute__((always_inline)) void mm_transpose16(__m512 x[16]) {
    __m512 t[16];
    for (int i = 0; i < 16; i += 2) {             // interleave row pairs
        t[i] = _mm512_unpacklo_ps(x[i], x[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(x[i], x[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {             // 4 rows' values of one column per 128-bit lane
        x[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
        x[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
        x[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        x[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int i = 0; i < 4; i++) {                 // then move the 128-bit lanes across row groups
        t[i] = _mm512_shuffle_f32x4(x[i], x[i + 4], 0x88);
        t[i + 4] = _mm512_shuffle_f32x4(x[i], x[i + 4], 0xDD);
        t[i + 8] = _mm512_shuffle_f32x4(x[i + 8], x[i + 12], 0x88);
        t[i + 12] = _mm512_shuffle_f32x4(x[i + 8], x[i + 12], 0xDD);
    }
    for (int i = 0; i < 4; i++) {
        x[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
        x[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xDD);
        x[i + 4] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0x88);
        x[i + 12] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0xDD);
    }
}
#endif

#if VLEN == 8
// x[i] = row i of an 8 x 8 block -> x[j] = column j (24 shuffles).
static inline __attribute__((always_inline)) void mm_transpose8(__m256 x[8]) {
    __m256 t[8], u[8];
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(x[i], x[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(x[i], x[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
        u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
        u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
        u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int i = 0; i < 4; i++) {
        x[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
        x[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
    }
}
#endif

// dst (kc, R) fp32 panel: dst[k*R + i] = X[r0+i, k0+k] for i < rn, 0 for rn <= i < R. src is fp32 or bf16.
// Branch-free inner loops per layout: trans copies a contiguous run per k; otherwise each source row is read
// along k in chunks of 16 (one cache line) while the 16 x R destination block stays in L1.
static void mm_pack_f32(float* restrict dst, const void* src, int bf16, int ld, int trans, int r0, int rn,
                        int k0, int kc, int R) {
    const float* sf = (const float*)src;
    const uint16_t* sh = (const uint16_t*)src;
    if (trans) {
        for (int k = 0; k < kc; k++) {
            float* d = dst + (size_t)k * R;
            const size_t o = (size_t)(k0 + k) * ld + r0;
            if (bf16) for (int i = 0; i < rn; i++) d[i] = mm_bf16_to_f32(sh[o + i]);
            else      for (int i = 0; i < rn; i++) d[i] = sf[o + i];
            for (int i = rn; i < R; i++) d[i] = 0.f;
        }
        return;
    }
#if VLEN == 16
    // 16 rows x 16 k at a time: 16 (masked) loads, one in-register transpose, <= 16 masked stores: ~0.4 vector op
    // per element where the scalar loop below costs a load and a store each. Rows rn..R-1 load as zeros (the
    // padding). Packing was ~10% of a 4096x768x3072 GEMM (perf, session 11).
    for (int kb = 0; kb < kc; kb += 16) {
        const int kn = kc - kb < 16 ? kc - kb : 16;
        const __mmask16 km = (__mmask16)((1u << kn) - 1);
        float* d = dst + (size_t)kb * R;
        for (int i0 = 0; i0 < R; i0 += 16) {
            __m512 x[16];
            for (int i = 0; i < 16; i++) {
                const size_t o = (size_t)(r0 + i0 + i) * ld + k0 + kb;
                if (i0 + i >= rn) {
                    x[i] = _mm512_setzero_ps();
                    continue;
                }
#if MM_PF_PACK
                if (kb + 16 * MM_PF_PACK < kc) __builtin_prefetch(bf16 ? (const void*)(sh + o + 16 * MM_PF_PACK)
                                                                       : (const void*)(sf + o + 16 * MM_PF_PACK));
#endif
                x[i] = bf16 ? _mm512_castsi512_ps(_mm512_slli_epi32(
                                  _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(km, sh + o)), 16))
                            : _mm512_maskz_loadu_ps(km, sf + o);
            }
            mm_transpose16(x);
            const __mmask16 im = (__mmask16)(R - i0 < 16 ? (1u << (R - i0)) - 1 : 0xFFFFu);
            for (int k = 0; k < kn; k++) _mm512_mask_storeu_ps(d + (size_t)k * R + i0, im, x[k]);
        }
    }
    return;
#elif VLEN == 8
    // The avx2 version of the above: 8 rows x 8 k per in-register transpose. Full-width loads only (a short last
    // k chunk goes through a zeroed stack row; AVX2's masked stores are slow on AMD, so no masked stores either).
    for (int kb = 0; kb < kc; kb += 8) {
        const int kn = kc - kb < 8 ? kc - kb : 8;
        float* d = dst + (size_t)kb * R;
        for (int i0 = 0; i0 < R; i0 += 8) {
            __m256 x[8];
            for (int i = 0; i < 8; i++) {
                const size_t o = (size_t)(r0 + i0 + i) * ld + k0 + kb;
                if (i0 + i >= rn) {
                    x[i] = _mm256_setzero_ps();
                    continue;
                }
#if MM_PF_PACK
                if (kb + 16 * MM_PF_PACK < kc) __builtin_prefetch(bf16 ? (const void*)(sh + o + 16 * MM_PF_PACK)
                                                                       : (const void*)(sf + o + 16 * MM_PF_PACK));
#endif
                if (kn == 8) {
                    x[i] = bf16 ? _mm256_castsi256_ps(_mm256_slli_epi32(
                                      _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(sh + o))), 16))
                                : _mm256_loadu_ps(sf + o);
                } else {
                    float t[8] = {0};
                    for (int k = 0; k < kn; k++) t[k] = bf16 ? mm_bf16_to_f32(sh[o + k]) : sf[o + k];
                    x[i] = _mm256_loadu_ps(t);
                }
            }
            mm_transpose8(x);
            const int w = R - i0 < 8 ? R - i0 : 8;
            for (int k = 0; k < kn; k++) {
                float* dk = d + (size_t)k * R + i0;
                if (w == 8) {
                    _mm256_storeu_ps(dk, x[k]);
                } else if (w == 6) {  // the avx2 A panel (MR = 6)
                    _mm_storeu_ps(dk, _mm256_castps256_ps128(x[k]));
                    _mm_storel_pi((__m64*)(dk + 4), _mm256_extractf128_ps(x[k], 1));
                } else {
                    float t[8];
                    _mm256_storeu_ps(t, x[k]);
                    for (int i = 0; i < w; i++) dk[i] = t[i];
                }
            }
        }
    }
    return;
#endif
    for (int kb = 0; kb < kc; kb += 16) {
        const int kn = kc - kb < 16 ? kc - kb : 16;
        float* d = dst + (size_t)kb * R;
        for (int i = 0; i < rn; i++) {
            const size_t o = (size_t)(r0 + i) * ld + k0 + kb;
#if MM_PF_PACK
            // rn rows are rn separate streams (one page each): fetch MM_PF_PACK lines ahead along each row
            if (kb + 16 * MM_PF_PACK < kc) __builtin_prefetch(bf16 ? (const void*)(sh + o + 16 * MM_PF_PACK)
                                                                   : (const void*)(sf + o + 16 * MM_PF_PACK));
#endif
            if (bf16) for (int k = 0; k < kn; k++) d[k * R + i] = mm_bf16_to_f32(sh[o + k]);
            else      for (int k = 0; k < kn; k++) d[k * R + i] = sf[o + k];
        }
        for (int k = 0; k < kn; k++)
            for (int i = rn; i < R; i++) d[k * R + i] = 0.f;
    }
}

// Packs panels [p0, p1) of X (panel p = rows rbase + p*R ..., `rows` valid rows from rbase), K range
// [k0, k0+kc), into base + p*R*kc (each panel (kc, R)). Transposed sources are read k-outer across the whole
// group, so each source row segment is R*(p1-p0) contiguous values (whole cache lines) rather than R values.
#if VLEN == 16
static void mm_pack_pairs(uint32_t* restrict dst, const uint16_t* src, int ld, int trans, int r0, int rn, int k0,
                          int kc, int R);
#endif
// dp: bf16 k-pair panels (mm_pack_pairs), each (kp, R) 32-bit with kp = (kc+1)/2, at base + p*R*kp.
static void mm_pack_group(int bf16, int dp, float* base, const void* src, int ld, int trans, int rbase, int rows,
                          int p0, int p1, int k0, int kc, int R) {
#if MM_HAVE_DP
    if (dp) {
        const size_t kp = (size_t)(kc + 1) / 2;
        for (int p = p0; p < p1; p++) {
            const int rn = rows - p * R < R ? rows - p * R : R;
            mm_pack_pairs((uint32_t*)base + (size_t)p * R * kp, (const uint16_t*)src, ld, trans, rbase + p * R, rn,
                          k0, kc, R);
        }
        return;
    }
#endif
    (void)dp;
    if (trans) {
        const float* sf = (const float*)src;
        const uint16_t* sh = (const uint16_t*)src;
        const int esz = bf16 ? 2 : 4, seg = (rows - p0 * R < (p1 - p0) * R ? rows - p0 * R : (p1 - p0) * R) * esz;
        for (int k = 0; k < kc; k++) {
#if MM_PF_ROWS
            // Each source row segment is a short run one row (ld) apart: prefetch MM_PF_ROWS rows ahead, so the
            // copy is not latency-bound on one new page per row.
            if (k + MM_PF_ROWS < kc) {
                const char* q = (const char*)src + ((size_t)(k0 + k + MM_PF_ROWS) * ld + rbase + (size_t)p0 * R) * esz;
                for (int x = 0; x < seg; x += 64) __builtin_prefetch(q + x);
                __builtin_prefetch(q + seg - 1);
            }
#endif
            for (int p = p0; p < p1; p++) {
                const int rn = rows - p * R < R ? rows - p * R : R;
                float* d = base + (size_t)p * R * kc + (size_t)k * R;
                const size_t o = (size_t)(k0 + k) * ld + rbase + (size_t)p * R;
                if (bf16) {
                    for (int i = 0; i < rn; i++) d[i] = mm_bf16_to_f32(sh[o + i]);
                } else if (rn == R) {  // constant trip counts: a few vector moves
                    if (R == MM_MR) for (int i = 0; i < MM_MR; i++) d[i] = sf[o + i];
                    else            for (int i = 0; i < MM_NR; i++) d[i] = sf[o + i];
                    continue;
                } else {
                    for (int i = 0; i < rn; i++) d[i] = sf[o + i];
                }
                for (int i = rn; i < R; i++) d[i] = 0.f;
            }
        }
        (void)esz; (void)seg;
        return;
    }
    for (int p = p0; p < p1; p++) {
        const int rn = rows - p * R < R ? rows - p * R : R;
        mm_pack_f32(base + (size_t)p * R * kc, src, bf16, ld, trans, rbase + p * R, rn, k0, kc, R);
    }
}

// Write one MR x NR accumulator tile into C (mr x nr valid): C = acc (+bias) or C += acc (+bias).
// bias is already offset to the tile's first column (or NULL). Written as a macro so the accumulators stay
// in registers in every micro-kernel that expands it.
#define MM_TILE_WRITE(acc, c, ldc, mr, nr, bias, add)                                                      \
    do {                                                                                                   \
        if ((mr) == MM_MR && (nr) == MM_NR) {                                                              \
            vf b0_ = (vf){0}, b1_ = (vf){0};                                                               \
            if (bias) { b0_ = vf_load(bias); b1_ = vf_load((bias) + VLEN); }                               \
            _Pragma("GCC unroll 16")                                                                       \
            for (int i_ = 0; i_ < MM_MR; i_++) {                                                           \
                float* ci_ = (c) + (size_t)i_ * (ldc);                                                     \
                vf r0_ = acc[i_][0], r1_ = acc[i_][1];                                                     \
                if (bias) { r0_ += b0_; r1_ += b1_; }                                                      \
                if (add) { r0_ += vf_load(ci_); r1_ += vf_load(ci_ + VLEN); }                              \
                vf_store(ci_, r0_); vf_store(ci_ + VLEN, r1_);                                             \
            }                                                                                              \
        } else {                                                                                           \
            float t_[MM_MR * MM_NR];                                                                       \
            for (int i_ = 0; i_ < MM_MR; i_++) { vf_store(t_ + i_ * MM_NR, acc[i_][0]);                    \
                                                 vf_store(t_ + i_ * MM_NR + VLEN, acc[i_][1]); }           \
            for (int i_ = 0; i_ < (mr); i_++)                                                              \
                for (int j_ = 0; j_ < (nr); j_++) {                                                        \
                    float v_ = t_[i_ * MM_NR + j_] + ((bias) ? (bias)[j_] : 0.f);                          \
                    float* cij_ = (c) + (size_t)i_ * (ldc) + j_;                                           \
                    *cij_ = (add) ? *cij_ + v_ : v_;                                                       \
                }                                                                                          \
        }                                                                                                  \
    } while (0)

// out(MR, NR) = sum_k A(i, k) * B(k, 0..NR): A(i, k) = a[i*asi + k*ask], B(k, :) = b + k*bsk (NR contiguous
// floats). Instantiated out of line with constant strides (mm_kloop_*): packed A (asi 1, ask MR), A rows read in
// place (asi lda, ask 1: row-major A, broadcast from MR rows side by side), A columns read in place (asi 1, ask lda:
// a transposed A, MR contiguous values per k); B is a packed panel (bsk NR) or rows of a (K, N) B read in place.
// Why out of line and unrolled: inlined into the tile code, GCC kept two accumulators rotating through vmovaps
// in the loop (and spilled them to the stack once unrolled); alone, with nothing else live, the 4-step unrolled
// loop is 12 FMAs + 8 loads + 1-2 prefetches per k and nothing more. +10% on the micro-kernel alone and 0-20% per
// GEMM cell on the AVX2 development host (bench_matmul_lab.py, session 19); the 2*MR stores of out per tile are
// small beside the tile's 2*MR*kc FMAs.
static inline __attribute__((always_inline)) void mm_kloop(int kc, const float* restrict a, size_t asi, size_t ask,
                                                           const float* restrict b, size_t bsk,
                                                           vf out[MM_MR][2]) {
    vf acc[MM_MR][2];
    _Pragma("GCC unroll 16")
    for (int i = 0; i < MM_MR; i++) acc[i][0] = acc[i][1] = (vf){0};
    _Pragma("GCC unroll 4")
    for (int k = 0; k < kc; k++) {
        // B streams from L2 (or memory, read in place): fetching it MM_PF_B steps ahead keeps the loads off the L2
        // latency that the L1 prefetcher alone does not hide. +3-12% on every big-shape layout and +2-5% on the
        // issue-3 training step (bench_matmul_lab.py / in-process step A/B, session 7). A packed B row of the AVX2 and
        // SSE paths lies within one 64-byte line (the panels are line-aligned), so one prefetch covers it.
        __builtin_prefetch(b + MM_PF_B * bsk);
        if (VLEN == 16 || bsk != MM_NR) __builtin_prefetch(b + MM_PF_B * bsk + VLEN);
        vf b0 = vf_load(b), b1 = vf_load(b + VLEN);
        _Pragma("GCC unroll 16")
        for (int i = 0; i < MM_MR; i++) {
            vf ai = vf_set1(a[i * asi]);
            acc[i][0] = vf_fma(ai, b0, acc[i][0]);
            acc[i][1] = vf_fma(ai, b1, acc[i][1]);
        }
        a += ask;
        b += bsk;
    }
    _Pragma("GCC unroll 16")
    for (int i = 0; i < MM_MR; i++) { out[i][0] = acc[i][0]; out[i][1] = acc[i][1]; }
}
static __attribute__((noinline)) void mm_kloop_packed(int kc, const float* restrict a, const float* restrict b,
                                                      vf out[MM_MR][2]) {
    mm_kloop(kc, a, 1, MM_MR, b, MM_NR, out);
}
static __attribute__((noinline)) void mm_kloop_arows(int kc, const float* restrict a, size_t lda,
                                                     const float* restrict b, size_t bsk, vf out[MM_MR][2]) {
    mm_kloop(kc, a, lda, 1, b, bsk, out);
}
static __attribute__((noinline)) void mm_kloop_acols(int kc, const float* restrict a, size_t lda,
                                                     const float* restrict b, size_t bsk, vf out[MM_MR][2]) {
    mm_kloop(kc, a, 1, lda, b, bsk, out);
}
static __attribute__((noinline)) void mm_kloop_any(int kc, const float* restrict a, size_t asi, size_t ask,
                                                   const float* restrict b, size_t bsk, vf out[MM_MR][2]) {
    mm_kloop(kc, a, asi, ask, b, bsk, out);
}

// The C tile is read/written after the k loop: start its lines on their way first. (Prefetching them to L2 here
// and to L1 a few dozen steps before the end measured no better.)
static inline void mm_prefetch_c(float* c, int ldc, int mr) {
    for (int i = 0; i < mr; i++) {
        __builtin_prefetch(c + (size_t)i * ldc, 1);
        __builtin_prefetch(c + (size_t)i * ldc + MM_NR - 1, 1);
    }
}

// One MR x NR tile of C (mr x nr valid) from a (kc, MR) and b (kc, NR) packed panels.
static void mm_kernel_f32(int kc, const float* restrict a, const float* restrict b, float* c, int ldc, int mr,
                          int nr, const float* bias, int add) {
    vf acc[MM_MR][2];
    mm_prefetch_c(c, ldc, mr);
    mm_kloop_packed(kc, a, b, acc);
    MM_TILE_WRITE(acc, c, ldc, mr, nr, bias, add);
}
// a: MR rows (stride lda) read along k in place; b rows bsk apart; a whole tile.
static void mm_kernel_arows(int kc, const float* restrict a, size_t lda, const float* restrict b, size_t bsk,
                            float* c, int ldc, const float* bias, int add) {
    vf acc[MM_MR][2];
    mm_prefetch_c(c, ldc, MM_MR);
    mm_kloop_arows(kc, a, lda, b, bsk, acc);
    MM_TILE_WRITE(acc, c, ldc, MM_MR, MM_NR, bias, add);
}
// a: k-th MR values at a + k*lda (a transposed A read in place); b rows bsk apart; a whole tile.
static void mm_kernel_acols(int kc, const float* restrict a, size_t lda, const float* restrict b, size_t bsk,
                            float* c, int ldc, const float* bias, int add) {
    vf acc[MM_MR][2];
    mm_prefetch_c(c, ldc, MM_MR);
    mm_kloop_acols(kc, a, lda, b, bsk, acc);
    MM_TILE_WRITE(acc, c, ldc, MM_MR, MM_NR, bias, add);
}
// Any strides (the direct path's edge tiles).
static void mm_kernel_any(int kc, const float* restrict a, size_t asi, size_t ask, const float* restrict b,
                          size_t bsk, float* c, int ldc, int mr, int nr, const float* bias, int add) {
    vf acc[MM_MR][2];
    mm_prefetch_c(c, ldc, mr);
    mm_kloop_any(kc, a, asi, ask, b, bsk, acc);
    MM_TILE_WRITE(acc, c, ldc, mr, nr, bias, add);
}

// --- bf16 k-pairs on AVX512_BF16 (vdpbf16ps) ----------------------------------------------------------------
// A bf16 product on CPUs with AVX512_BF16 and no AMX (AMD Zen 4, Intel Cooper Lake): vdpbf16ps multiplies the two
// bf16 halves of each 32-bit lane by those of another register and adds both products to an fp32 lane, 32 MACs
// per instruction where an fp32 FMA does 16. Panels hold k-pairs: a 32-bit element is X[r, 2p] (low half) and
// X[r, 2p+1] (high half), so the micro-kernel is the fp32 one with k halved (MR x NR tile, A pairs broadcast,
// B pairs loaded). Where vdpbf16ps runs at the FMA's instruction rate this doubles the bf16 peak (Zen 4:
// benchmarks/machine.py measures 235 against 116 GFLOP/s on 1 core); the widening path (bf16 -> fp32 in packing,
// the fp32 micro-kernel) is kept for CPUs without it and when PYLLM_NO_BF16DP=1. (On the Sapphire Rapids-class VM
// of sessions 1-11 the instruction measured at half the FMA's rate, and this kernel was removed then, fa014bd.)
#if VLEN == 16
#ifdef PYLLM_EMULATE_AVX512
#define mm_dpbf16 emu_dpbf16_ps   // tests/avx512_emu.h's model of the instruction
#else
// Inline asm, as the VNNI dots (impl_matvec.h): the avx512 path needs no avx512bf16 target, and this runs only
// where cpu_features_get()->avx512bf16.
static inline __m512 mm_dpbf16(__m512 acc, __m512i a, __m512i b) {
    __asm__("vdpbf16ps %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
    return acc;
}
#endif

// dst (kp, R) k-pair panel, kp = (kc+1)/2: dst[p*R + i] = X[r0+i, k0+2p] | X[r0+i, k0+2p+1] << 16 (0 past kc and
// for rn <= i < R). X bf16, stored (R, K) with row stride ld, or (K, R) when trans. Not transposed, a pair is two
// adjacent values of a row: 16 rows x 16 pairs (one 64-byte line each, masked per bf16 so an odd kc reads nothing
// past it) per 16 x 16 in-register transpose of 32-bit lanes, as mm_pack_f32. Transposed, rows 2p and 2p+1 of the
// source are interleaved.
static void mm_pack_pairs(uint32_t* restrict dst, const uint16_t* src, int ld, int trans, int r0, int rn, int k0,
                          int kc, int R) {
    const int kp = (kc + 1) / 2;
    if (trans) {
        for (int p = 0; p < kp; p++) {
            const uint16_t* s0 = src + (size_t)(k0 + 2 * p) * ld + r0;
            const int two = 2 * p + 1 < kc;
            for (int i0 = 0; i0 < R; i0 += 16) {
                const int n = rn - i0 < 0 ? 0 : rn - i0 > 16 ? 16 : rn - i0;
                const __mmask16 m = (__mmask16)((1u << n) - 1);
                __m512i v = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, s0 + i0));
                if (two) v = _mm512_xor_si512(v, _mm512_slli_epi32(
                                 _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, s0 + ld + i0)), 16));
                const __mmask16 st = (__mmask16)(R - i0 < 16 ? (1u << (R - i0)) - 1 : 0xFFFFu);
                _mm512_mask_storeu_ps(dst + (size_t)p * R + i0, st, _mm512_castsi512_ps(v));
            }
        }
        return;
    }
    for (int pb = 0; pb < kp; pb += 16) {
        const int kn = kc - 2 * pb < 32 ? kc - 2 * pb : 32, pn = (kn + 1) / 2;
        const __mmask32 km = (__mmask32)(kn == 32 ? 0xFFFFFFFFu : (1u << kn) - 1);
        uint32_t* d = dst + (size_t)pb * R;
        for (int i0 = 0; i0 < R; i0 += 16) {
            __m512 x[16];
            for (int i = 0; i < 16; i++) {
                const size_t o = (size_t)(r0 + i0 + i) * ld + k0 + 2 * pb;
                if (i0 + i >= rn) {
                    x[i] = _mm512_setzero_ps();
                    continue;
                }
#if MM_PF_PACK
                if (2 * pb + 32 * MM_PF_PACK < kc) __builtin_prefetch(src + o + 32 * MM_PF_PACK);
#endif
                x[i] = _mm512_castsi512_ps(_mm512_maskz_loadu_epi16(km, src + o));
            }
            mm_transpose16(x);
            const __mmask16 im = (__mmask16)(R - i0 < 16 ? (1u << (R - i0)) - 1 : 0xFFFFu);
            for (int p = 0; p < pn; p++) _mm512_mask_storeu_ps(d + (size_t)p * R + i0, im, x[p]);
        }
    }
}

// The fp32 k loop (mm_kloop) on k-pair panels: per pair 2 B loads, MR broadcasts, 2*MR vdpbf16ps. A's pair i of
// step p is the 32 bits at a + i*asi + p*ask (bf16 units): a packed panel (asi 2, ask 2*MR), or MR rows of a
// row-major A read in place (asi lda, ask 2), where a pair is two adjacent values of a row.
static inline __attribute__((always_inline)) void mm_kloop_pairs_s(int kp, const uint16_t* restrict a, size_t asi,
                                                                   size_t ask, const uint32_t* restrict b,
                                                                   vf out[MM_MR][2]) {
    __m512 acc[MM_MR][2];
    _Pragma("GCC unroll 16")
    for (int i = 0; i < MM_MR; i++) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    _Pragma("GCC unroll 4")
    for (int p = 0; p < kp; p++) {
        __builtin_prefetch(b + MM_PF_B * MM_NR);
        __builtin_prefetch(b + MM_PF_B * MM_NR + VLEN);
        const __m512i b0 = _mm512_loadu_si512(b), b1 = _mm512_loadu_si512(b + VLEN);
        _Pragma("GCC unroll 16")
        for (int i = 0; i < MM_MR; i++) {
            uint32_t pair;
            memcpy(&pair, a + i * asi, 4);   // a row of A need not be 4-byte aligned (odd lda)
            const __m512i ai = _mm512_set1_epi32((int)pair);
            acc[i][0] = mm_dpbf16(acc[i][0], ai, b0);
            acc[i][1] = mm_dpbf16(acc[i][1], ai, b1);
        }
        a += ask;
        b += MM_NR;
    }
    _Pragma("GCC unroll 16")
    for (int i = 0; i < MM_MR; i++) { out[i][0] = (vf)acc[i][0]; out[i][1] = (vf)acc[i][1]; }
}
static __attribute__((noinline)) void mm_kloop_pairs(int kp, const uint32_t* restrict a, const uint32_t* restrict b,
                                                     vf out[MM_MR][2]) {
    mm_kloop_pairs_s(kp, (const uint16_t*)a, 2, 2 * MM_MR, b, out);
}
static __attribute__((noinline)) void mm_kloop_pairs_rows(int kp, const uint16_t* restrict a, size_t lda,
                                                          const uint32_t* restrict b, vf out[MM_MR][2]) {
    mm_kloop_pairs_s(kp, a, lda, 2, b, out);
}
static void mm_kernel_pairs(int kp, const uint32_t* restrict a, const uint32_t* restrict b, float* c, int ldc, int mr,
                            int nr, const float* bias, int add) {
    vf acc[MM_MR][2];
    mm_prefetch_c(c, ldc, mr);
    mm_kloop_pairs(kp, a, b, acc);
    MM_TILE_WRITE(acc, c, ldc, mr, nr, bias, add);
}
// A whole MR-row tile of a row-major bf16 A read in place (a: row m0 at column k0, row stride lda; kp pairs).
static void mm_kernel_pairs_rows(int kp, const uint16_t* restrict a, size_t lda, const uint32_t* restrict b, float* c,
                                 int ldc, int nr, const float* bias, int add) {
    vf acc[MM_MR][2];
    mm_prefetch_c(c, ldc, MM_MR);
    mm_kloop_pairs_rows(kp, a, lda, b, acc);
    MM_TILE_WRITE(acc, c, ldc, MM_MR, nr, bias, add);
}
#endif

// Is the k-pair path on for this call (bf16 operands, AVX512_BF16, not turned off)?
static int mm_use_pairs(void) {
    if (!MM_HAVE_DP || !cpu_features_get()->avx512bf16) return 0;
    const char* e = getenv("PYLLM_NO_BF16DP");   // set and not "0": off (as PYLLM_NO_AMX)
    return !(e && *e && *e != '0');
}

// Packing scratch, kept per calling thread and grown on demand (64-byte aligned): no malloc or page faults per
// call. Also the per-thread scratch of sampling (~3 V floats) and attention (up to 4 T*D floats), never nested
// inside a GEMM (one user at a time). The GEMM's part is bounded by its block sizes: MM_A_FLOATS + threads *
// MM_NC_MAX * MM_KC_MAX floats (8 MiB + 2 MiB a thread on avx512). The buffer keeps its largest size until the
// thread exits (a pthread key's destructor frees it: a server that starts and ends threads must not leak it).
static _Thread_local float* mm_scratch_buf;
static _Thread_local size_t mm_scratch_cap;
static pthread_key_t mm_scratch_key;
static pthread_once_t mm_scratch_once = PTHREAD_ONCE_INIT;
static void mm_scratch_key_make(void) { (void)pthread_key_create(&mm_scratch_key, free); }
#ifndef MM_SCRATCH_EXACT
#define MM_SCRATCH_EXACT 0  // 1 (tests/asan_kernels.c only): a fresh buffer of exactly `floats` per call, so ASan's
#endif                      // redzone lies right past it and its malloc fill (NaN) is what a kernel reads unwritten
static float* mm_scratch(size_t floats) {
    if (floats > mm_scratch_cap || MM_SCRATCH_EXACT) {
        free(mm_scratch_buf);
        mm_scratch_cap = MM_SCRATCH_EXACT ? floats : (floats + 4095) / 4096 * 4096;
        mm_scratch_buf = MM_SCRATCH_EXACT ? (float*)malloc(floats * sizeof(float))   // (no aligned load reads it)
                                          : (float*)aligned_alloc(64, mm_scratch_cap * sizeof(float));
        if (!mm_scratch_buf) mm_scratch_cap = 0;
        pthread_once(&mm_scratch_once, mm_scratch_key_make);
        (void)pthread_setspecific(mm_scratch_key, mm_scratch_buf);   // the destructor frees the current buffer
    }
    return mm_scratch_buf;
}

// This thread's index t of nt inside a parallel region (0 of 1 without OpenMP).
static inline void mm_thread_slot(int* t, int* nt) {
#ifdef _OPENMP
    *t = omp_get_thread_num();
    *nt = omp_get_num_threads();
#else
    *t = 0;
    *nt = 1;
#endif
}

// Next item number from a work counter shared by the threads of a GEMM: items are dealt as threads free up, so a
// vCPU slowed by other guests on its host does not hold the others at the next barrier.
static inline int mm_take(int* counter) {
    int v;
    #pragma omp atomic capture
    v = (*counter)++;
    return v;
}

// Direct path (fp32, small and mid-size products, e.g. the training GEMMs of a d=128..384 model): no A packing —
// the micro-kernel broadcasts A straight from its rows (row-major A) or columns (transposed A) — and B packed only
// when its k-th NR values are not contiguous (B stored (N, K): the forward x·Wᵀ, B = the small weight). dX = dY·W
// and dW = dYᵀ·X then pack nothing (but an edge panel). Packing cost (M+N)*K strided copies per call, measured as
// 1/4 of the GEMM at K = 128. Loops: K blocks of <= MM_DKC -> B blocks of MM_DNB panels (L2) -> groups of MM_DGRP
// A tiles (MR rows, L1), taken by the threads from a counter per (K block, B block) as they free up -> B panels.
// (Against a fixed half of the tiles per thread, the counter measured +2-12% mean at 2 threads over the d=128 and
// d=384 training shapes, 4 in-process lab runs, session 13.) An edge A tile (< MR rows) and an edge B panel
// (< NR columns) are packed zero-padded, so no load runs past the end of an operand.
#ifndef MM_DKC
#define MM_DKC 384
#endif
#ifndef MM_DNB
#define MM_DNB 8
#endif
#ifndef MM_DGRP
#define MM_DGRP 8
#endif
static void mm_direct(const float* A, int lda, int trans_a, const float* B, int ldb, int trans_b, float* C, int ldc,
                      const float* bias, int M, int N, int K, int accumulate, int T) {
    const int nkb = (K + MM_DKC - 1) / MM_DKC, kcm = (K + nkb - 1) / nkb;          // K blocks, balanced
    const int npn = (N + MM_NR - 1) / MM_NR, mp = (M + MM_MR - 1) / MM_MR;          // B panels, A tiles
    const int bedge = trans_b && N % MM_NR;                                         // in-place B: edge panel packed
    const int bpn = trans_b ? bedge : npn;                                          // packed B panels
    const int njb = (npn + MM_DNB - 1) / MM_DNB, ngr = (mp + MM_DGRP - 1) / MM_DGRP;  // B blocks, A-tile groups
    const size_t b_sz = (size_t)bpn * MM_NR * kcm, a_sz = (size_t)MM_MR * kcm, n_ctr = (size_t)nkb * njb;
    float* Bp = mm_scratch(b_sz + (size_t)T * a_sz + n_ctr);                        // (bpn, kc, NR) + T x (kc, MR)
    if (!Bp) { kernels_oom_note(); return; }
    int* ctr = (int*)(Bp + b_sz + (size_t)T * a_sz);                                // (nkb, njb) groups taken
    memset(ctr, 0, n_ctr * sizeof(int));
    #pragma omp parallel num_threads(T) if (T > 1)
    {
        int t, nt;
        mm_thread_slot(&t, &nt);
        float* Ae = Bp + b_sz + (size_t)t * a_sz;                                   // this thread's edge A tile
        for (int k0 = 0; k0 < K; k0 += kcm) {
            int ae_packed = 0;                                                      // Ae holds this K block
            const int kc = K - k0 < kcm ? K - k0 : kcm;
            const int add = accumulate || k0 > 0;
            if (!trans_b) {
                #pragma omp for schedule(static)
                for (int g = 0; g < npn; g += MM_PACK_GROUP)
                    mm_pack_group(0, 0, Bp, B, ldb, 0, 0, N, g, g + MM_PACK_GROUP < npn ? g + MM_PACK_GROUP : npn,
                                  k0, kc, MM_NR);
            } else if (bedge) {
                #pragma omp single
                mm_pack_f32(Bp, B, 0, ldb, 1, (npn - 1) * MM_NR, N - (npn - 1) * MM_NR, k0, kc, MM_NR);
            }
            for (int jb = 0; jb < npn; jb += MM_DNB) {
                const int je = jb + MM_DNB < npn ? jb + MM_DNB : npn;
                int* taken = ctr + (size_t)(k0 / kcm) * njb + jb / MM_DNB;          // A-tile groups dealt
                for (int gi = mm_take(taken); gi < ngr; gi = mm_take(taken)) {
                    const int i0 = gi * MM_DGRP, i1 = i0 + MM_DGRP < mp ? i0 + MM_DGRP : mp;
                    if (!ae_packed && M % MM_MR && i1 == mp) {                            // the edge A tile is ours
                        mm_pack_f32(Ae, A, 0, lda, trans_a, (mp - 1) * MM_MR, M - (mp - 1) * MM_MR, k0, kc, MM_MR);
                        ae_packed = 1;
                    }
                    for (int i = i0; i < i1; i++) {
                        const int m0 = i * MM_MR, mr = M - m0 < MM_MR ? M - m0 : MM_MR;
                        const float* ai = trans_a ? A + (size_t)k0 * lda + m0 : A + (size_t)m0 * lda + k0;
                        for (int j = jb; j < je; j++) {
                            const int n0 = j * MM_NR, nr = N - n0 < MM_NR ? N - n0 : MM_NR;
                            const float* bj = !trans_b ? Bp + (size_t)j * MM_NR * kc
                                            : nr < MM_NR ? Bp : B + (size_t)k0 * ldb + n0;
                            const size_t bsk = !trans_b || nr < MM_NR ? MM_NR : (size_t)ldb;
                            const float* bb = bias && k0 == 0 ? bias + n0 : NULL;
                            float* c = C + (size_t)m0 * ldc + n0;
                            if (mr < MM_MR)    mm_kernel_any(kc, Ae, 1, MM_MR, bj, bsk, c, ldc, mr, nr, bb, add);
                            else if (nr < MM_NR)
                                mm_kernel_any(kc, ai, trans_a ? 1 : (size_t)lda, trans_a ? (size_t)lda : 1, bj, bsk, c,
                                              ldc, mr, nr, bb, add);
                            else if (trans_a)  mm_kernel_acols(kc, ai, lda, bj, bsk, c, ldc, bb, add);
                            else               mm_kernel_arows(kc, ai, lda, bj, bsk, c, ldc, bb, add);
                        }
                    }
                }
            }
            #pragma omp barrier
        }
    }
}

// K block: the A micro-panel (kc, MR) need not stay in L1 on Zen 4 (its 14 floats a step come from L2 in order):
// kc 1024 against 384 measured +0-4% per cell at 1 thread and up to +14% at 2 (bench_matmul_lab.py, the issue-3
// and training-step shapes, session 25): fewer passes over C and fewer repacks of A. The AVX2 path keeps the 384
// it was tuned with on its hosts (Zen 3; KC 256-512 within noise there).
#ifndef MM_KC_MAX
#if VLEN == 16
#define MM_KC_MAX 1024
#else
#define MM_KC_MAX 384
#endif
#endif
#ifndef MM_NC_MAX
#define MM_NC_MAX 512
#endif
#ifndef MM_A_FLOATS
#define MM_A_FLOATS (2L << 20)       // 8 MiB
#endif
#ifndef MM_DYN_BLOCKS
#define MM_DYN_BLOCKS 8      // B blocks per thread when threads split the columns...
#endif
#ifndef MM_DYN_MIN_PANELS
#define MM_DYN_MIN_PANELS 4  // ...of at least this many NR-column panels each
#endif
#ifndef MM_MSPLIT_ROWS
#define MM_MSPLIT_ROWS 1024  // rows of A per thread from which threads split A panels even when N is wide
#endif
#ifndef MM_PAR_FLOPS
#define MM_PAR_FLOPS 4e6
#endif
#ifndef MM_DIRECT_FLOPS
#define MM_DIRECT_FLOPS 2e9
#endif
// The direct path where it measured faster than packing both operands (bench_matmul_lab.py, 1 thread, in-process
// A/B): every layout of the d=128 Shakespeare model (M = 768, K <= 768: 0.90-0.98x torch against 0.68-0.90x),
// and fwd/dx of the issue-3 d=384 model (M = 2048, K = 384); not the products with K >= 2048 or >= 5 GFLOP
// (dW of 2048 tokens: in-place columns of A are 2048 strided rows; 0.57 against 0.81), nor a row stride that is
// a multiple of 4 KiB (all rows in the same L1 set: dX 2048x1024x384 0.60 against 0.82). PYLLM_GEMM=packed|direct
// forces a path (tests cover both on every shape; packed then packs A too, never reading its rows in place).
static int mm_use_direct(int M, int N, int K, int lda, int trans_b, int ldb) {
    const char* e = getenv("PYLLM_GEMM");
    if (e && e[0] == 'p') return 0;
    if (e && e[0] == 'd') return 1;
    return 2.0 * M * N * K <= MM_DIRECT_FLOPS && K <= 1024 && lda % 1024 && (!trans_b || ldb % 1024);
}

// How many blocks of about `limit` cover n: a block may stretch to 5/4 of the limit where that saves one, since
// each block of K or chunk of A costs a whole pass (over C, or repacking B) whatever its size.
static inline long mm_blocks(long n, long limit) {
    const long stretched = limit + limit / 4;
    return (n + stretched - 1) / stretched;
}

// The shared driver: A and B are fp32, or bf16 (bf16 = 1) converted to fp32 while packing.
// Loops (BLIS, with the operand roles swapped because B is the vector-loaded operand here):
//   A chunk (<= MM_A_FLOATS rows*kc) -> K block kc (K split evenly, <= MM_KC_MAX) -> pack the A chunk
//   (together, or each thread its own panels: below; not at all when A's rows are read in place: ain) -> B blocks
//   of <= MM_NC_MAX columns, each packed by the thread that uses it into its own L2-resident buffer -> A
//   micro-panel (kc, MR) (L1) -> B micro-panels (kc, NR) streamed from L2.
// Threads split either dimension:
// - A micro-panels, when N is narrow (one B block per thread or fewer) or M is tall (>= MM_MSPLIT_ROWS rows per
//   thread): each thread packs its own A panels and all of B into its own buffers, and never waits for another
//   inside a product. Its cost is the duplicated B packing, N*K copies per thread against 2*M*N*K/T flops.
// - Otherwise B blocks, dealt from the counter of this A chunk and K block (mm_take) as threads free up, after the
//   threads pack the A chunk together; a barrier closes each K block.
// Measured at 2 threads (bench_matmul_lab.py, 3 runs with each variant built twice, session 20): splitting A at
// >= 1536 rows per thread took dW of 4096x768x3072 from 126 to 149 GFLOP/s and dX of 4096x768x768 from 134 to 149
// (in some runs; the rest within the noise); at 512 rows per thread (1024^3) it lost 5-7% to the B split (the
// duplicated B packing).
static void mm_gemm(int bf16, const void* A, int lda, int trans_a, const void* B, int ldb, int trans_b, float* C,
                    int ldc, const float* bias, int M, int N, int K, int accumulate) {
    if (M <= 0 || N <= 0) return;
    if (!bf16 && M <= MM_SMALL_M && !trans_a && !trans_b && K > 0) {
        mm_small_m((const float*)A, lda, (const float*)B, ldb, C, ldc, bias, M, N, K, accumulate);
        return;
    }
    if (K <= 0) {  // empty product: C = bias (or 0), or C += bias
        for (int m = 0; m < M; m++)
            for (int n = 0; n < N; n++) {
                float v = bias ? bias[n] : 0.f;
                C[(size_t)m * ldc + n] = accumulate ? C[(size_t)m * ldc + n] + v : v;
            }
        return;
    }
    int T = 1;
#ifdef _OPENMP
    if (2.0 * M * N * K > MM_PAR_FLOPS && !omp_in_parallel()) T = omp_get_max_threads();
#endif
    if (!bf16 && mm_use_direct(M, N, K, lda, trans_b, ldb)) {
        mm_direct((const float*)A, lda, trans_a, (const float*)B, ldb, trans_b, C, ldc, bias, M, N, K, accumulate, T);
        return;
    }
    // dp: bf16 k-pair panels and the vdpbf16ps micro-kernel; K blocks of an even length (so a block starts on a
    // pair) and twice as long: a k-pair panel holds two k per 32-bit element, the same bytes per block as fp32's
    const int dp = bf16 && mm_use_pairs(), kc_max = dp ? 2 * MM_KC_MAX : MM_KC_MAX;
    // K blocks, balanced: each is another pass over C and a repack of both operands (dX of the step's QKV,
    // K = 1152: one block of 1152, not two of 576, +2.5% alone; session 26).
    const int nkb = (int)mm_blocks(K, kc_max);
    const int kcm = dp ? ((K + nkb - 1) / nkb + 1) / 2 * 2 : (K + nkb - 1) / nkb;
    const int kwm = dp ? kcm / 2 : kcm;                                             // rows of the largest panel
    // ain: A's rows read in place (row-major A) by the micro-kernel: broadcast from MR rows side by side (fp32), or
    // the 32-bit k-pairs of MR rows (bf16: a pair is two adjacent values of a row). A is then never packed but for
    // its edge panel (< MR rows), kept at Ap. For bf16 (4096x768x768, 1 thread) packing A was 6-7% of the product
    // and the packed panels' trip through L3 another ~4%: in place +2-9% per issue-3 cell where A is not transposed
    // in a C A/B harness (K = 768 with N = 3072: no change), median +1.6% / +3.8% at 1 / 2 threads in
    // bench_matmul_lab.py (session 29); fp32 +5-6% at 4096x768x768, +-2% at the larger shapes. Not for
    // an odd K in bf16 (a last pair would read past a row), nor a row stride that is a multiple of 4 KiB (the MR rows
    // share one L1 set: 121 against 187 GFLOP/s; pyllm/ops.py makes its own such buffers off it: padded_rows), nor
    // the widening path, nor under PYLLM_GEMM=packed.
    const char* ge = getenv("PYLLM_GEMM");
    const size_t lda_bytes = (size_t)lda * (bf16 ? 2 : 4);
    const int ain = !trans_a && lda_bytes % 4096 != 0 && !(ge && ge[0] == 'p') && (dp ? K % 2 == 0 : !bf16);
    const int npn = (N + MM_NR - 1) / MM_NR;                                        // B panels in all
    int nb = (npn * MM_NR + MM_NC_MAX - 1) / MM_NC_MAX;                             // B blocks
    const int nsplit = T > 1 && nb >= T && M < (long)MM_MSPLIT_ROWS * T;
    if (nsplit) {  // many small B blocks, dealt out as threads free up (below): a vCPU slowed by its host's
                   // other guests does not hold the other threads at the K-block barrier (session 13).
        nb = (nb + T - 1) / T * T;
        const int want = MM_DYN_BLOCKS * T < npn / MM_DYN_MIN_PANELS ? MM_DYN_BLOCKS * T : npn / MM_DYN_MIN_PANELS;
        if (nb < want) nb = want;
    }
    const int bpp = (npn + nb - 1) / nb;                                            // panels per B block
    nb = (npn + bpp - 1) / bpp;
    // Rows per A chunk: about MM_A_FLOATS of packed A, the chunks balanced. Every chunk repacks all of B: with a
    // hard limit, M = 2048 at kc = 1024 was chunks of 2044 and 4 rows, the second repacking B for a 4-row panel (the
    // step's K >= 2048 products with M = 2048, 1 thread, as one chunk: +1.5-3% alone, -2% per shape in the step's
    // --kernels profile; session 26).
    const long mc_max = MM_A_FLOATS / kwm > MM_MR ? MM_A_FLOATS / kwm : MM_MR, nch_want = mm_blocks(M, mc_max);
    long mc = ((M + nch_want - 1) / nch_want + MM_MR - 1) / MM_MR * MM_MR;         // rows per A chunk
    if (mc > M || ain) mc = M;                                                      // A in place: one chunk
    const int mpc = (int)((mc + MM_MR - 1) / MM_MR);                                // A panels per chunk
    const int nch = (int)((M + mc - 1) / mc);                                        // A chunks
    const size_t a_sz = (size_t)(ain ? 1 : mpc) * MM_MR * kwm, b_sz = (size_t)bpp * MM_NR * kwm;
    const size_t n_ctr = (size_t)nch * nkb;
    float* Ap = mm_scratch(a_sz + (size_t)T * b_sz + n_ctr);                        // (mpc, kc, MR); ain: 1 panel
    if (!Ap) { kernels_oom_note(); return; }
    int* ctr = (int*)(Ap + a_sz + (size_t)T * b_sz);                                // (nch, nkb) B blocks taken
    memset(ctr, 0, n_ctr * sizeof(int));
    #pragma omp parallel num_threads(T) if (T > 1)
    {
        int t, nt;
        mm_thread_slot(&t, &nt);
        float* Bp = Ap + a_sz + (size_t)t * b_sz;                                   // (bpp, kc, NR), this thread's
        for (int ms = 0; ms < M; ms += (int)mc) {
            const int msn = M - ms < mc ? M - ms : (int)mc;                         // rows in this chunk
            const int mp = (msn + MM_MR - 1) / MM_MR;
            // this thread's A panels (all of them when the threads split B)
            const int i0 = nsplit || nt == 1 ? 0 : (int)((long)mp * t / nt);
            const int i1 = nsplit || nt == 1 ? mp : (int)((long)mp * (t + 1) / nt);
            // where those panels are packed: their region at the largest kc, so a thread packing a shorter last K
            // block never writes into a panel that another thread is still reading (kc sets the panel stride)
            float* Aq = Ap + (size_t)i0 * MM_MR * kwm;
            for (int k0 = 0; k0 < K; k0 += kcm) {
                const int kc = K - k0 < kcm ? K - k0 : kcm;
                const int add = accumulate || k0 > 0;
                if (ain) {     // only the edge panel (< MR rows) is packed, at Ap: by the thread whose panels end
                               // with it, or by thread 0 before a barrier when the threads split B (all read it)
                    const int edge = msn % MM_MR != 0;
                    if (edge && (nsplit ? t == 0 : i1 == mp))
                        mm_pack_group(bf16, dp, Ap, A, lda, 0, ms + (mp - 1) * MM_MR, msn - (mp - 1) * MM_MR, 0, 1,
                                      k0, kc, MM_MR);
                    if (edge && nsplit) {
                        #pragma omp barrier
                    }
                } else if (nsplit) {  // the A chunk, packed together (every thread reads all of it)
                    #pragma omp for schedule(static)
                    for (int g = 0; g < mp; g += MM_PACK_GROUP)
                        mm_pack_group(bf16, dp, Ap, A, lda, trans_a, ms, msn, g,
                                      g + MM_PACK_GROUP < mp ? g + MM_PACK_GROUP : mp, k0, kc, MM_MR);
                } else {       // this thread's own panels, at Aq: written and read by it alone
                    for (int g = 0; g < i1 - i0; g += MM_PACK_GROUP)
                        mm_pack_group(bf16, dp, Aq, A, lda, trans_a, ms + i0 * MM_MR, msn - i0 * MM_MR, g,
                                      g + MM_PACK_GROUP < i1 - i0 ? g + MM_PACK_GROUP : i1 - i0, k0, kc, MM_MR);
                }
                int* taken = ctr + (size_t)(ms / mc) * nkb + k0 / kcm;              // B blocks dealt (nsplit)
                for (int bk = nsplit ? mm_take(taken) : 0; bk < nb; bk = nsplit ? mm_take(taken) : bk + 1) {
                    const int j0 = bk * bpp, j1 = j0 + bpp < npn ? j0 + bpp : npn;
                    for (int g = 0; g < j1 - j0; g += MM_PACK_GROUP)
                        mm_pack_group(bf16, dp, Bp, B, ldb, trans_b, j0 * MM_NR, N - j0 * MM_NR, g,
                                      g + MM_PACK_GROUP < j1 - j0 ? g + MM_PACK_GROUP : j1 - j0, k0, kc, MM_NR);
                    const int kr = dp ? (kc + 1) / 2 : kc;                            // rows of a packed panel
                    for (int i = i0; i < i1; i++) {
                        const int m0 = i * MM_MR, mr = msn - m0 < MM_MR ? msn - m0 : MM_MR;
                        const float* ap = ain ? Ap : Aq + (size_t)(i - i0) * MM_MR * kr;   // (kr, MR) packed
                        for (int j = j0; j < j1; j++) {
                            const int n0 = j * MM_NR, nr = N - n0 < MM_NR ? N - n0 : MM_NR;
                            const float* bp = Bp + (size_t)(j - j0) * MM_NR * kr;
                            const float* bj = bias && k0 == 0 ? bias + n0 : NULL;
                            float* c = C + (size_t)(ms + m0) * ldc + n0;
#if MM_HAVE_DP
                            if (dp && ain && mr == MM_MR) {
                                mm_kernel_pairs_rows(kr, (const uint16_t*)A + (size_t)(ms + m0) * lda + k0, lda,
                                                     (const uint32_t*)bp, c, ldc, nr, bj, add);
                                continue;
                            }
                            if (dp) {
                                mm_kernel_pairs(kr, (const uint32_t*)ap, (const uint32_t*)bp, c, ldc, mr, nr, bj, add);
                                continue;
                            }
#endif
                            if (ain && mr == MM_MR) {
                                const float* ai = (const float*)A + (size_t)(ms + m0) * lda + k0;
                                if (nr == MM_NR) mm_kernel_arows(kc, ai, lda, bp, MM_NR, c, ldc, bj, add);
                                else mm_kernel_any(kc, ai, lda, 1, bp, MM_NR, c, ldc, MM_MR, nr, bj, add);
                                continue;
                            }
                            mm_kernel_f32(kc, ap, bp, c, ldc, mr, nr, bj, add);
                        }
                    }
                }
                if (nsplit) {  // all B blocks of this K block done before the shared A chunk is repacked
                    #pragma omp barrier
                }
            }
            if (!nsplit && nch > 1) {  // the next chunk's panel split may differ: no thread packs over a panel
                #pragma omp barrier     // that another is still reading
            }
        }
    }
}

void KFN(matmul_forward)(const matmul_params* p) {
    mm_gemm(0, p->A, p->lda, p->trans_a, p->B, p->ldb, p->trans_b, p->C, p->ldc, p->bias, p->M, p->N, p->K,
            p->accumulate);
}

#include "impl_amx.h"

// AMX tiles where the CPU and the OS allow them (impl_amx.h); else k-pair panels on vdpbf16ps where the CPU has
// AVX512_BF16 (mm_kernel_pairs: Zen 4, 4096x3072x768 at 194 against 101 GFLOP/s widened, 1 thread); else bf16
// panels are widened to fp32 while packing (exact) and run on the fp32 micro-kernel.
void KFN(matmul_bf16_forward)(const matmul_bf16_params* p) {
#ifdef PYLLM_HAVE_AMX
    const cpu_features* f = cpu_features_get();
    if (f->amx_tile && f->amx_bf16 && p->M > 0 && p->N > 0 && p->K > 0) {
        int T = 1;
#ifdef _OPENMP
        if (2.0 * p->M * p->N * p->K > MM_PAR_FLOPS && !omp_in_parallel()) T = omp_get_max_threads();
#endif
        if (mm_amx_bf16(p->A, p->lda, p->trans_a, p->B, p->ldb, p->trans_b, p->C, p->ldc, p->bias, p->M, p->N, p->K,
                        p->accumulate, T))
            kernels_oom_note();
        return;
    }
#endif
    mm_gemm(1, p->A, p->lda, p->trans_a, p->B, p->ldb, p->trans_b, p->C, p->ldc, p->bias, p->M, p->N, p->K,
            p->accumulate);
}
