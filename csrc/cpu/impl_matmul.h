// impl_matmul.h — GEMM C(M,N) (+)= op(A)·op(B)ᵀ (fp32, and bf16 inputs with fp32 accumulate); M <= MM_SMALL_M
// goes to mm_small_m (impl_matvec.h). Included by kernels_impl.h; KFN() names the per-path symbol.
//
// GEMM design (Goto/BLIS): for each K block of MM_KC, both operands are packed into zero-padded panels —
// A into MR-row panels (kc, MR), B into NR-column panels (kc, NR) — so one register-blocked micro-kernel
// (MR x NR accumulators, NR = 2 vectors, A broadcast, B loaded) serves every transpose, and edges cost only
// the padding. C is split into MM_MC x MM_NC tiles handed to OpenMP threads; inside a tile the A micro-panel
// (kc*MR floats, 14 KiB on avx512) stays in L1 while the B micro-panels (NC*kc, 512 KiB) stream from L2
// (measured a few % faster than keeping the 32 KiB B micro-panel in L1 instead).
// Packing costs (M+N)*K copies per call against 2*M*N*K flops; scratch is malloc'd per call (see mm_gemm).
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#ifdef MM_MR
#elif VLEN == 16
#define MM_MR 14        // 28 zmm accumulators + 2 B vectors (+ 1 broadcast) of 32 registers
#else
#define MM_MR 6         // 12 ymm/xmm accumulators + 2 B vectors + 1 broadcast of 16 registers
#endif
#define MM_NR (2 * VLEN)
#ifndef MM_KC               // (tuning overrides: -DMM_KC=... for benchmarks/ experiments only)
#define MM_KC 256
#endif
#ifndef MM_MC
#define MM_MC (MM_MR * 8)
#endif
#ifndef MM_NC
#define MM_NC (MM_NR * 16)
#endif

static inline float mm_bf16_to_f32(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }

// Element X[r, k] of an operand stored (R, K) with row stride ld, or (K, R) when trans.
#define MM_AT(src, ld, trans, r, k) ((src)[(trans) ? (size_t)(k) * (ld) + (r) : (size_t)(r) * (ld) + (k)])

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
    for (int kb = 0; kb < kc; kb += 16) {
        const int kn = kc - kb < 16 ? kc - kb : 16;
        float* d = dst + (size_t)kb * R;
        for (int i = 0; i < rn; i++) {
            const size_t o = (size_t)(r0 + i) * ld + k0 + kb;
            if (bf16) for (int k = 0; k < kn; k++) d[k * R + i] = mm_bf16_to_f32(sh[o + k]);
            else      for (int k = 0; k < kn; k++) d[k * R + i] = sf[o + k];
        }
        for (int k = 0; k < kn; k++)
            for (int i = rn; i < R; i++) d[k * R + i] = 0.f;
    }
}

// Packs panels [p0, p1) of X (rows rbase + p*R ..., `rows` valid rows in all) into base + p*R*kr.
// Transposed fp32/bf16 sources are read k-outer across the whole group, so each source row segment is
// R*(p1-p0) contiguous values (whole cache lines, one page) rather than R values per page.
#define MM_PACK_GROUP 8
static void mm_pack_group(int bf16, float* base, size_t kr, const void* src, int ld, int trans, int rbase,
                          int rows, int p0, int p1, int K, int R) {
    if (trans) {
        const float* sf = (const float*)src;
        const uint16_t* sh = (const uint16_t*)src;
        for (int k = 0; k < K; k++)
            for (int p = p0; p < p1; p++) {
                const int rn = rows - p * R < R ? rows - p * R : R;
                float* d = base + (size_t)p * R * kr + (size_t)k * R;
                const size_t o = (size_t)k * ld + rbase + (size_t)p * R;
                if (bf16) for (int i = 0; i < rn; i++) d[i] = mm_bf16_to_f32(sh[o + i]);
                else      for (int i = 0; i < rn; i++) d[i] = sf[o + i];
                for (int i = rn; i < R; i++) d[i] = 0.f;
            }
        return;
    }
    for (int p = p0; p < p1; p++) {
        const int rn = rows - p * R < R ? rows - p * R : R;
        float* d = base + (size_t)p * R * kr;
        mm_pack_f32(d, src, bf16, ld, trans, rbase + p * R, rn, 0, K, R);
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

// acc(MR, NR) = sum_k a[k*MR + i] * b[k*NR + j]; a (kc, MR) and b (kc, NR) packed panels.
static void mm_kernel_f32(int kc, const float* restrict a, const float* restrict b, float* c, int ldc, int mr,
                          int nr, const float* bias, int add) {
    vf acc[MM_MR][2];
    _Pragma("GCC unroll 16")
    for (int i = 0; i < MM_MR; i++) acc[i][0] = acc[i][1] = (vf){0};
    for (int i = 0; i < mr; i++) {  // C tile is read/written after the k loop: start its lines on their way
        __builtin_prefetch(c + (size_t)i * ldc, 1);
        __builtin_prefetch(c + (size_t)i * ldc + MM_NR - 1, 1);
    }
    for (int k = 0; k < kc; k++) {
        vf b0 = vf_load(b), b1 = vf_load(b + VLEN);
        _Pragma("GCC unroll 16")
        for (int i = 0; i < MM_MR; i++) {
            vf ai = vf_set1(a[i]);
            acc[i][0] = vf_fma(ai, b0, acc[i][0]);
            acc[i][1] = vf_fma(ai, b1, acc[i][1]);
        }
        a += MM_MR;
        b += MM_NR;
    }
    MM_TILE_WRITE(acc, c, ldc, mr, nr, bias, add);
}


// The shared driver: A and B are fp32, or bf16 (bf16 = 1) converted to fp32 while packing.
// B is packed whole (np panels of (K, NR)); A in super-blocks of at most MM_A_FLOATS floats (whole when it
// fits) so the scratch stays bounded for huge M·K (e.g. the LM-head dW). Each C tile then runs the whole K
// loop, so C is read and written once per call and stays in L2 across the K blocks.
#ifndef MM_A_FLOATS
#define MM_A_FLOATS (8L << 20)       // 32 MiB
#endif
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
    const size_t kr = (size_t)K;                                        // rows of a packed panel
    const int np = (N + MM_NR - 1) / MM_NR;                             // B panels
    const int nt = (N + MM_NC - 1) / MM_NC;                             // tile columns
    long mb = MM_A_FLOATS / (long)kr / MM_MC * MM_MC;                  // rows per A super-block
    if (mb < MM_MC) mb = MM_MC;
    if (mb > M) mb = M;
    const int mbp = (int)((mb + MM_MR - 1) / MM_MR);                   // A panels per super-block
    const size_t b_sz = (size_t)np * MM_NR * kr, a_sz = (size_t)mbp * MM_MR * kr;  // 4-byte elements
    float* Bp = (float*)aligned_alloc(64, ((a_sz + b_sz) * sizeof(float) + 63) / 64 * 64);  // (np, kr, NR)
    if (!Bp) return;
    float* Ap = Bp + b_sz;                                                                   // (mbp, kr, MR)
    const double flops = 2.0 * M * N * K;
    #pragma omp parallel if (flops > 4e6)
    {
        #pragma omp for schedule(static)
        for (int g = 0; g < np; g += MM_PACK_GROUP)
            mm_pack_group(bf16, Bp, kr, B, ldb, trans_b, 0, N, g, g + MM_PACK_GROUP < np ? g + MM_PACK_GROUP : np,
                          K, MM_NR);
        for (int ms = 0; ms < M; ms += (int)mb) {
            const int msn = M - ms < mb ? M - ms : (int)mb;                 // rows in this super-block
            const int mp = (msn + MM_MR - 1) / MM_MR, mt = (msn + MM_MC - 1) / MM_MC;
            #pragma omp for schedule(static)
            for (int g = 0; g < mp; g += MM_PACK_GROUP)
                mm_pack_group(bf16, Ap, kr, A, lda, trans_a, ms, msn, g,
                              g + MM_PACK_GROUP < mp ? g + MM_PACK_GROUP : mp, K, MM_MR);
            #pragma omp for collapse(2) schedule(dynamic, 1)
            for (int ti = 0; ti < mt; ti++)
                for (int tj = 0; tj < nt; tj++) {
                    const int i0 = ti * (MM_MC / MM_MR), j0 = tj * (MM_NC / MM_NR);
                    const int i1 = i0 + MM_MC / MM_MR < mp ? i0 + MM_MC / MM_MR : mp;
                    const int j1 = j0 + MM_NC / MM_NR < np ? j0 + MM_NC / MM_NR : np;
                    for (int k0 = 0; k0 < K; k0 += MM_KC) {
                        const int kc = K - k0 < MM_KC ? K - k0 : MM_KC;
                        const size_t ko = (size_t)k0;
                        const int add = accumulate || k0 > 0;
                        for (int i = i0; i < i1; i++)
                            for (int j = j0; j < j1; j++) {
                                const int n0 = j * MM_NR, nr = N - n0 < MM_NR ? N - n0 : MM_NR;
                                const float* bp = Bp + (size_t)j * MM_NR * kr + ko * MM_NR;
                                const float* bj = bias && k0 == 0 ? bias + n0 : NULL;
                                const int m0 = i * MM_MR, mr = msn - m0 < MM_MR ? msn - m0 : MM_MR;
                                const float* ap = Ap + (size_t)i * MM_MR * kr + ko * MM_MR;
                                float* c = C + (size_t)(ms + m0) * ldc + n0;
                                mm_kernel_f32(kc, ap, bp, c, ldc, mr, nr, bj, add);
                            }
                    }
                }
        }
    }
    free(Bp);
}

void KFN(matmul_forward)(const matmul_params* p) {
    mm_gemm(0, p->A, p->lda, p->trans_a, p->B, p->ldb, p->trans_b, p->C, p->ldc, p->bias, p->M, p->N, p->K,
            p->accumulate);
}

// bf16 panels are widened to fp32 while packing (exact) and run on the fp32 micro-kernel. An AVX512_BF16
// micro-kernel (vdpbf16ps on k-pair panels, same register blocking) was written and tested, and measured
// slower on this CPU: 85 vs 140 GFLOP/s at 4096x768x3072, 1 thread, so it was removed. AMX is not exposed.
void KFN(matmul_bf16_forward)(const matmul_bf16_params* p) {
    mm_gemm(1, p->A, p->lda, p->trans_a, p->B, p->ldb, p->trans_b, p->C, p->ldc, p->bias, p->M, p->N, p->K,
            p->accumulate);
}
