// impl_matvec.h — the memory-bound products of decoding: small-M GEMM rows (mm_small_m, also used by mm_gemm for
// M <= MM_SMALL_M), the fp32 matvec and the Q8_0 int8 matvec. Included by kernels_impl.h before impl_matmul.h;
// KFN() names the per-path symbol. Tested by tests/test_kernels_matmul.py; timed by benchmarks/bench_run.py.
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

// Small M (decoding: M = batch <= MM_SMALL_M, B not transposed): M dot products per row of B, no packing —
// packing would copy all of B (N*K) to read it once, doubling the memory traffic of a memory-bound product.
// Also the body of matvec_f32 (M = 1). Needs unit k-stride in A and B (trans_a = trans_b = 0).
// MV_ROWS rows of B are read side by side, each a(k) vector loaded once for all of them: one stream of B per row
// keeps more cache misses in flight than one row at a time (measured on 1-2 threads: +5-10% streaming rate on
// llama2.c 110M shapes), and the MV_ROWS independent FMA chains hide the FMA latency. The rows (MV_ROWS*K*4
// bytes) stay in L1/L2 across the M dots. A short last block repeats its first row (results discarded).
// The weights are also prefetched MV_PREFETCH bytes ahead into L2 (prefetcht1, once per cache line, first dot only):
// 110M fp32 decode went 24.7 -> 27.3 tok/s on 1 thread (A/B, 5 interleaved runs each). prefetcht0 helps less: each
// L1 prefetch holds one of the core's few L1 fill buffers until its line arrives, an L2 prefetch does not (a plain
// read loop: 9.0 GB/s no prefetch, 10.4 with t0, 11.8-12.0 with t1, 4-16 KiB ahead).
#define MM_SMALL_M 4
#define MV_ROWS 4
#ifndef MV_PREFETCH
#define MV_PREFETCH 16384  // bytes ahead of each row that mm_small_m prefetches into L2 (0: none)
#endif
#ifndef PF_HINT
#define PF_HINT _MM_HINT_T1
#endif
// Rows [blk * MV_ROWS, + MV_ROWS) of B against the M rows of A.
static void mm_small_m_block(const float* A, int lda, const float* B, int ldb, float* C, int ldc, const float* bias,
                             int M, int N, int K, int accumulate, int blk) {
    const int n0 = blk * MV_ROWS, nr = N - n0 < MV_ROWS ? N - n0 : MV_ROWS;
    const float* b[MV_ROWS];                           // MV_ROWS rows of B, each (K)
    for (int r = 0; r < MV_ROWS; r++) b[r] = B + (size_t)(n0 + (r < nr ? r : 0)) * ldb;
    for (int m = 0; m < M; m++) {
        const float* a = A + (size_t)m * lda;          // (K)
        vf acc[MV_ROWS];
        for (int r = 0; r < MV_ROWS; r++) acc[r] = vf_set1(0.f);
        int k = 0;
        for (; k + VLEN <= K; k += VLEN) {
            const vf av = vf_load(a + k);
#if MV_PREFETCH && VLEN >= 8 && (defined(__x86_64__) || defined(__i386__))
            if (m == 0 && (k * 4) % 64 == 0)
                for (int r = 0; r < MV_ROWS; r++) _mm_prefetch((const char*)(b[r] + k) + MV_PREFETCH, PF_HINT);
#endif
            for (int r = 0; r < MV_ROWS; r++) acc[r] = vf_fma(av, vf_load(b[r] + k), acc[r]);
        }
        for (int r = 0; r < nr; r++) {
            float s = vf_sum(acc[r]);
            for (int kk = k; kk < K; kk++) s += a[kk] * b[r][kk];
            if (bias) s += bias[n0 + r];
            float* c = C + (size_t)m * ldc + n0 + r;
            *c = accumulate ? *c + s : s;
        }
    }
}

static void mm_small_m(const float* A, int lda, const float* B, int ldb, float* C, int ldc, const float* bias,
                       int M, int N, int K, int accumulate) {
    K_FOR((long)N * K > 65536, blk, (N + MV_ROWS - 1) / MV_ROWS,
          mm_small_m_block(A, lda, B, ldb, C, ldc, bias, M, N, K, accumulate, blk));
}

// --- matvec (decoding: batch 1, memory-bound) ---------------------------------------------------------------
void KFN(matvec_f32)(const matvec_params* p) {
    mm_small_m(p->x, p->k, p->W, p->k, p->y, p->n, NULL, 1, p->n, p->k, 0);
}

// --- Q8_0 (llama2.c runq.c semantics) -------------------------------------------------------------------------
// Per group of G: s = max|w| / 127, q = roundf(w / s) (round half away from zero; q = 0 when s == 0 or NaN: a
// NaN in the group gives s = NaN, so every product that uses the group is NaN, as in fp32).
// Vectorised when VLEN divides G, bit-identical to the scalar loop: the same IEEE division, then round half away
// from zero done exactly (truncate, then step away from zero when the dropped fraction is >= 0.5).
static void q8_quantize_row(int8_t* restrict q, float* restrict s, const float* restrict w, int k, int G) {
    for (int g = 0; g < k / G; g++) {
        const float* wg = w + (size_t)g * G;
        int8_t* qg = q + (size_t)g * G;
        float amax = 0.f;
        int i = 0;
        if (G % VLEN == 0) {  // max drops NaN lanes: they are flagged apart, so a NaN makes the group's scale NaN
            vf m = vf_set1(0.f);
            vi nan = (vi)vf_set1(0.f);
            for (; i < G; i += VLEN) {
                const vf a = (vf)((vi)vf_load(wg + i) & 0x7fffffff);  // |w|
                m = vf_fmax(m, a);
                nan |= (vi)(a != a);
            }
            amax = vf_max(m);
            for (int j = 0; j < VLEN; j++) amax = nan[j] ? NAN : amax;
        }
        for (; i < G; i++) { float a = fabsf(wg[i]); amax = (a > amax || a != a) ? a : amax; }  // NaN sticks
        const float scale = amax / 127.0f;
        s[g] = scale;
        if (!(scale != 0.f && scale == scale)) { memset(qg, 0, (size_t)G); continue; }  // 0 or NaN
        i = 0;
        if (G % VLEN == 0) {
            for (; i < G; i += VLEN) {
                const vf v = vf_load(wg + i) / vf_set1(scale);   // |v| <= 127 (+ rounding), fits int32
                vi t = __builtin_convertvector(v, vi);             // truncated toward zero
                const vf r = v - __builtin_convertvector(t, vf);   // dropped fraction, exact
                t = t - (vi)(r >= 0.5f) + (vi)(r <= -0.5f);        // comparisons give -1 where true
                for (int j = 0; j < VLEN; j++) qg[i + j] = (int8_t)t[j];
            }
        }
        for (; i < G; i++) qg[i] = (int8_t)roundf(wg[i] / scale);
    }
}

void KFN(quantize_q8)(const quantize_q8_params* p) {
    const int G = p->G, k = p->k;
    K_FOR((long)p->n * k > 65536, i, p->n,
          q8_quantize_row(p->q + (size_t)i * k, p->s + (size_t)i * (k / G), p->w + (size_t)i * k, k, G));
}

#if defined(__AVX2__)
// 32 int8 products of x and w summed pairwise into 8 int32 lanes: maddubs needs an unsigned operand, so it
// multiplies |x| by w*sign(x) (|x| <= 127 by construction, pair sums fit in int16).
static inline __m256i q8_dot32(const int8_t* x, const int8_t* w) {
    __m256i vx = _mm256_loadu_si256((const __m256i*)x), vw = _mm256_loadu_si256((const __m256i*)w);
    __m256i s16 = _mm256_maddubs_epi16(_mm256_sign_epi8(vx, vx), _mm256_sign_epi8(vw, vx));
    return _mm256_madd_epi16(s16, _mm256_set1_epi16(1));
}
#endif

#ifndef Q8_PREFETCH
#define Q8_PREFETCH 4096   // bytes of weights ahead of the current chunk that the Q8_0 dots prefetch (q8_rows2_vnni)
#endif
#if defined(__AVX512F__)
// AVX512-VNNI, used only when cpu_features_get()->avx512vnni says the CPU has it (the avx512 path itself needs
// only F/BW/VL/DQ). Emitted as inline asm so this file needs no vnni target and runs on CPUs without it.
// vpdpbusd acc += (unsigned bytes u) . (signed bytes s), 4 products per int32 lane: 64 weights per instruction.
#ifdef PYLLM_EMULATE_AVX512
#define q8_dpbusd _mm512_dpbusd_epi32   // tests/avx512_emu.h's model of the instruction
#else
static inline __m512i q8_dpbusd(__m512i acc, __m512i u, __m512i s) {
    __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u), "v"(s));
    return acc;
}
#endif

// The VNNI path needs the group structure to repeat every 64 bytes, and the group of a byte to be a shift of its
// index: G a power of two >= 4 (llama2.c's and pyllm's group sizes are). Others take the AVX2 path.
static inline int q8_vnni_ok(int G) { return G >= 4 && (G & (G - 1)) == 0; }

// One 64-byte chunk of rows w and w2 (see q8_rows2_vnni); bm masks the bytes, sm the groups' scales.
#define Q8_CHUNK(bm, sm)                                                                                              \
    do {                                                                                                              \
        const __m512i xv = _mm512_maskz_loadu_epi8(bm, xq + j), xb = _mm512_loadu_si512(xbias + j / 4);            \
        const __m512 xsv = _mm512_maskz_loadu_ps(sm, xs + g);                                                         \
        const __m512i d = q8_dpbusd(xb, _mm512_xor_si512(_mm512_maskz_loadu_epi8(bm, w + j), flip), xv);            \
        const __m512i d2 = q8_dpbusd(xb, _mm512_xor_si512(_mm512_maskz_loadu_epi8(bm, w2 + j), flip), xv);          \
        const __m512 sc = _mm512_permutexvar_ps(gidx, _mm512_mul_ps(_mm512_maskz_loadu_ps(sm, ws + g), xsv));       \
        const __m512 sc2 = _mm512_permutexvar_ps(gidx, _mm512_mul_ps(_mm512_maskz_loadu_ps(sm, ws2 + g), xsv));     \
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), sc, acc);                                                        \
        acc2 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d2), sc2, acc2);                                                    \
    } while (0)

// The whole chunks from j up to `end` (prefetching the weights Q8_PREFETCH bytes ahead).
#define Q8_WHOLE_CHUNKS(end)                                                                                          \
    for (; j + 64 <= (end); j += 64) {                                                                                \
        _mm_prefetch((const char*)(w + j + Q8_PREFETCH), PF_HINT);                                                   \
        _mm_prefetch((const char*)(w2 + j + Q8_PREFETCH), PF_HINT);                                                  \
        const int g = j >> lg;                                                                                        \
        Q8_CHUNK(~0ULL, sm);                                                                                          \
    }

// Rows w and w2 (k each) at once, sharing the loads of x: w goes in as the unsigned operand w ^ 0x80 = w + 128, so
// each int32 lane holds dot(w, x) + 128 * (sum of its 4 x bytes); starting the lane at xbias = -128 * that sum
// makes it exact. Lane l of the 64-byte chunk at j belongs to group (j + 4l) / G; its scale ws[g] * xs[g] is
// gathered by a permute (gidx) from the chunk's first groups, so every chunk costs one dpbusd, one convert and one
// FMA per row. The loop over whole chunks does no index arithmetic beyond a shift and no mask: a division (j / G)
// and the masks computed per chunk made the kernel compute-bound, ~13-20 GB/s from L2 on one core (k = 288, 768).
// The weight bytes are prefetched Q8_PREFETCH bytes ahead: with ~10 instructions per 64 weight bytes the
// out-of-order window alone keeps too few cache misses in flight, and the stream ran at ~6 GB/s on one core (half
// of what the core can read); prefetched, ~12-14 GB/s (llama2.c 110M shapes, 1 thread).
// A row whose k is not a multiple of 64 ends in one masked chunk. Or, with `two` (k % 64 == 32, e.g. llama2.c 15M's
// k = 288, 4.5 chunks), w and w2 are each two adjacent rows, one 2k-byte stream of whole chunks against x doubled
// (xq, xs, xbias of x ++ x), the middle chunk split between the rows by lanes (0-7 / 8-15); y and y2 then get two
// dots each. Against a half-empty masked chunk per row: pyllm-run 15M Q8_0 1.13x on 2 threads (21 interleaved
// pairs), 1.11x on 1 (11).
static void q8_rows2_vnni(float* y, float* y2, const int8_t* w, const int8_t* w2, const float* ws, const float* ws2,
                          const float* xs, const int8_t* xq, const int32_t* xbias, int k, int G, int two) {
    const int lg = __builtin_ctz(G), per = G >= 64 ? 1 : 64 / G;   // log2(G), groups per 64-byte chunk
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    const __m512i gidx = _mm512_srli_epi32(_mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 44, 48, 52,
                                                             56, 60), lg < 6 ? lg : 6);
    const __mmask16 sm = (__mmask16)((1u << per) - 1);
    __m512 acc = _mm512_setzero_ps(), acc2 = _mm512_setzero_ps();
    int j = 0;
    Q8_WHOLE_CHUNKS(k);
    if (j < k && !two) {   // k - j < 64 bytes left: G < 64 (k is a multiple of G), whole groups
        const int g = j >> lg;
        Q8_CHUNK((1ULL << (k - j)) - 1, (__mmask16)((1u << ((k - j) >> lg)) - 1));
    } else if (two) {
        const __m512 a1 = acc, a2 = acc2;
        acc = acc2 = _mm512_setzero_ps();
        {   // the chunk across the two rows
            const int g = j >> lg;
            Q8_CHUNK(~0ULL, sm);
        }
        y[1] = _mm512_reduce_add_ps(_mm512_maskz_mov_ps(0xFF00, acc));      // the second rows start here
        y2[1] = _mm512_reduce_add_ps(_mm512_maskz_mov_ps(0xFF00, acc2));
        acc = _mm512_mask_add_ps(a1, 0x00FF, a1, acc);
        acc2 = _mm512_mask_add_ps(a2, 0x00FF, a2, acc2);
        const __m512 b1 = acc, b2 = acc2;
        acc = acc2 = _mm512_setzero_ps();
        j += 64;
        Q8_WHOLE_CHUNKS(2 * k);
        y[1] += _mm512_reduce_add_ps(acc);
        y2[1] += _mm512_reduce_add_ps(acc2);
        acc = b1;
        acc2 = b2;
    }
    y[0] = _mm512_reduce_add_ps(acc);
    y2[0] = _mm512_reduce_add_ps(acc2);
}
#undef Q8_WHOLE_CHUNKS
#undef Q8_CHUNK

// Row blocks i and i + nb of matvec_q8, each one row (two = 0) or two adjacent rows (two = 1: rows 2i, 2i + 1,
// with x doubled); block i alone when it is the odd last one.
static void q8_pair_vnni(const matvec_q8_params* p, int i, int nb, int nblocks, const float* xs, const int8_t* xq,
                         const int32_t* xbias, int two) {
    const int k = p->k, ng = k / p->G, r = 1 + two, i1 = i + nb < nblocks ? i + nb : i;
    float y[2], y1[2];
    q8_rows2_vnni(y, y1, p->wq + (size_t)r * i * k, p->wq + (size_t)r * i1 * k, p->ws + (size_t)r * i * ng,
                  p->ws + (size_t)r * i1 * ng, xs, xq, xbias, k, p->G, two);
    for (int q = 0; q < r; q++) {
        p->y[r * i + q] = y[q];
        if (i1 != i) p->y[r * i1 + q] = y1[q];
    }
}

// -128 * (sum of each int32 lane's 4 bytes of xq): vpdpbusd of 0x80 bytes (unsigned 128) and xq, negated.
// xbias: (k/4 rounded up to 16 lanes); the bytes past k count as 0.
static void q8_xbias_vnni(int32_t* xbias, const int8_t* xq, int k) {
    const __m512i u = _mm512_set1_epi8((char)0x80);
    for (int j = 0; j < k; j += 64) {
        const __mmask64 bm = k - j >= 64 ? ~0ULL : (1ULL << (k - j)) - 1;
        const __m512i s = q8_dpbusd(_mm512_setzero_si512(), u, _mm512_maskz_loadu_epi8(bm, xq + j));
        _mm512_storeu_si512(xbias + j / 4, _mm512_sub_epi32(_mm512_setzero_si512(), s));
    }
}
#endif

// One row, group by group: (int32 dot of the group) * ws[g] * xs[g], AVX2 maddubs when 32 divides G.
static float q8_row(const int8_t* w, const float* ws, const float* xs, const int8_t* xq, int k, int G) {
    const int ng = k / G;
    float y = 0.f;
    int g = 0;
#if defined(__AVX2__)
    if (G % 32 == 0) {
        __m256 acc = _mm256_setzero_ps();
        for (; g < ng; g++) {
            __m256i d = _mm256_setzero_si256();
            for (int j = g * G; j < (g + 1) * G; j += 64)                      // see q8_rows2_vnni
                _mm_prefetch((const char*)(w + j + Q8_PREFETCH), PF_HINT);
            for (int j = g * G; j < (g + 1) * G; j += 32) d = _mm256_add_epi32(d, q8_dot32(xq + j, w + j));
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_set1_ps(ws[g] * xs[g]), acc);
        }
        __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
        h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        y = _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
    }
#endif
    for (; g < ng; g++) {
        int32_t d = 0;
        for (int j = g * G; j < (g + 1) * G; j++) d += (int32_t)xq[j] * (int32_t)w[j];
        y += (float)d * (ws[g] * xs[g]);
    }
    return y;
}

// y(n) = sum over groups g of (int dot of xq and wq over g) * ws[i, g] * xs[g].
void KFN(matvec_q8)(const matvec_q8_params* p) {
    const int n = p->n, k = p->k, G = p->G, ng = k / G;
    const int small = k <= 32768;                                      // scratch on the stack up to 32 KiB
    int8_t* xq = p->xq_scratch;
    float* xs = p->xs_scratch;
    int8_t xq_stack[(!xq && small) ? k : 1];                           // (k) when no scratch was given
    float xs_stack[(!xs && small) ? ng : 1];                            // (k/G)
    int32_t xbias_stack[small ? k / 64 * 16 + 16 : 1];                  // (k/4 rounded up to 16 lanes), VNNI
    int8_t* xq_heap = NULL;
    float* xs_heap = NULL;
    int32_t* xbias = small ? xbias_stack : NULL;
    if (!xq) xq = small ? xq_stack : (xq_heap = (int8_t*)malloc((size_t)k));
    if (!xs) xs = small ? xs_stack : (xs_heap = (float*)malloc((size_t)ng * sizeof(float)));
    int vnni = 0;
#if defined(__AVX512F__)
    vnni = cpu_features_get()->avx512vnni && q8_vnni_ok(G);
    if (vnni && !small) xbias = (int32_t*)malloc(((size_t)k / 64 * 16 + 16) * sizeof(int32_t));
#endif
    if (!xq || !xs || (vnni && !xbias)) { kernels_oom_note(); goto done; }
    if (!p->x_quantized) q8_quantize_row(xq, xs, p->x, k, G);
#if defined(__AVX512F__)
    if (vnni && k % 64 == 32 && n >= 2 && k <= 8192) {   // adjacent rows as one stream (q8_rows2_vnni, two)
        int8_t xq2[2 * k];
        float xs2[2 * ng];
        int32_t xbias2[2 * k / 64 * 16 + 16];
        memcpy(xq2, xq, (size_t)k); memcpy(xq2 + k, xq, (size_t)k);
        memcpy(xs2, xs, (size_t)ng * 4); memcpy(xs2 + ng, xs, (size_t)ng * 4);
        q8_xbias_vnni(xbias2, xq2, 2 * k);
        const int npairs = n / 2, nb = (npairs + 1) / 2;
        K_FOR((long)n * k > 65536, i, nb, q8_pair_vnni(p, i, nb, npairs, xs2, xq2, xbias2, 1));
        if (n % 2) {   // the odd last row alone
            q8_xbias_vnni(xbias, xq, k);
            q8_pair_vnni(p, n - 1, 0, n, xs, xq, xbias, 0);
        }
        goto done;
    }
    if (vnni) {
        q8_xbias_vnni(xbias, xq, k);
        // Rows two at a time (an odd last one alone), taken half the matrix apart: rows i and i + nb are two
        // separate memory streams where adjacent rows are one. llama2.c 110M Q8_0 decode +14% on 1 thread and +5%
        // on 2 (pyllm-run A/Bs, 9-21 interleaved pairs each, session 7); 15M (17 MB) -3% on 1 thread, 0 on 2.
        const int nb = (n + 1) / 2;
        K_FOR((long)n * k > 65536, i, nb, q8_pair_vnni(p, i, nb, n, xs, xq, xbias, 0));
        goto done;
    }
#endif
    K_FOR((long)n * k > 65536, i, n,   // w (k) and its scales (k/G)
          p->y[i] = q8_row(p->wq + (size_t)i * k, p->ws + (size_t)i * ng, xs, xq, k, G));
done:
    free(xq_heap);
    free(xs_heap);
    if (xbias != xbias_stack) free(xbias);
}
