// impl_matvec.h — the memory-bound products of decoding: small-M GEMM rows (mm_small_m, also used by mm_gemm for
// M <= MM_SMALL_M), the fp32 matvec and the Q8_0 int8 matvec. Included by kernels_impl.h before impl_matmul.h;
// KFN() names the per-path symbol. Tested by tests/test_kernels_matmul.py; timed by benchmarks/bench_run.py.
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

// Small M (decoding: M = batch <= MM_SMALL_M, B not transposed): M dot products per row of B, no packing —
// packing would copy all of B (N*K) to read it once, doubling the memory traffic of a memory-bound product.
// Also the body of matvec_f32 (M = 1). Needs unit k-stride in A and B (trans_a = trans_b = 0).
#define MM_SMALL_M 4
static void mm_small_m(const float* A, int lda, const float* B, int ldb, float* C, int ldc, const float* bias,
                       int M, int N, int K, int accumulate) {
    #pragma omp parallel for schedule(static) if ((long)N * K > 65536)
    for (int n = 0; n < N; n++) {
        const float* b = B + (size_t)n * ldb;              // (K), stays in L1 across the M dots
        for (int m = 0; m < M; m++) {
            const float* a = A + (size_t)m * lda;          // (K)
            vf a0 = (vf){0}, a1 = (vf){0}, a2 = (vf){0}, a3 = (vf){0};
            int k = 0;
            for (; k + 4 * VLEN <= K; k += 4 * VLEN) {
                a0 = vf_fma(vf_load(a + k), vf_load(b + k), a0);
                a1 = vf_fma(vf_load(a + k + VLEN), vf_load(b + k + VLEN), a1);
                a2 = vf_fma(vf_load(a + k + 2 * VLEN), vf_load(b + k + 2 * VLEN), a2);
                a3 = vf_fma(vf_load(a + k + 3 * VLEN), vf_load(b + k + 3 * VLEN), a3);
            }
            for (; k + VLEN <= K; k += VLEN) a0 = vf_fma(vf_load(a + k), vf_load(b + k), a0);
            float s = vf_sum((a0 + a1) + (a2 + a3));
            for (; k < K; k++) s += a[k] * b[k];
            if (bias) s += bias[n];
            float* c = C + (size_t)m * ldc + n;
            *c = accumulate ? *c + s : s;
        }
    }
}

// --- matvec (decoding: batch 1, memory-bound) ---------------------------------------------------------------
void KFN(matvec_f32)(const matvec_params* p) {
    mm_small_m(p->x, p->k, p->W, p->k, p->y, p->n, NULL, 1, p->n, p->k, 0);
}

// --- Q8_0 (llama2.c runq.c semantics) -------------------------------------------------------------------------
// Per group of G: s = max|w| / 127, q = roundf(w / s) (round half away from zero; q = 0 when s == 0).
static void q8_quantize_row(int8_t* restrict q, float* restrict s, const float* restrict w, int k, int G) {
    for (int g = 0; g < k / G; g++) {
        const float* wg = w + (size_t)g * G;
        float amax = 0.f;
        for (int i = 0; i < G; i++) { float a = fabsf(wg[i]); amax = a > amax ? a : amax; }
        const float scale = amax / 127.0f;
        s[g] = scale;
        for (int i = 0; i < G; i++) q[(size_t)g * G + i] = scale != 0.f ? (int8_t)roundf(wg[i] / scale) : 0;
    }
}

void KFN(quantize_q8)(const quantize_q8_params* p) {
    const int G = p->G, k = p->k;
    #pragma omp parallel for schedule(static) if ((long)p->n * k > 65536)
    for (int i = 0; i < p->n; i++)
        q8_quantize_row(p->q + (size_t)i * k, p->s + (size_t)i * (k / G), p->w + (size_t)i * k, k, G);
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

// y(n) = sum over groups g of (int dot of xq and wq over g) * ws[i, g] * xs[g].
void KFN(matvec_q8)(const matvec_q8_params* p) {
    const int n = p->n, k = p->k, G = p->G, ng = k / G;
    int8_t* xq = p->xq_scratch;
    float* xs = p->xs_scratch;
    int8_t* xq_heap = NULL;
    float* xs_heap = NULL;
    int8_t xq_stack[(!xq && k <= 32768) ? k : 1];                    // (k) when no scratch was given
    float xs_stack[(!xs && k <= 32768) ? ng : 1];                     // (k/G)
    if (!xq) xq = k <= 32768 ? xq_stack : (xq_heap = (int8_t*)malloc((size_t)k));
    if (!xs) xs = k <= 32768 ? xs_stack : (xs_heap = (float*)malloc((size_t)ng * sizeof(float)));
    if (!xq || !xs) { free(xq_heap); free(xs_heap); return; }
    q8_quantize_row(xq, xs, p->x, k, G);
    #pragma omp parallel for schedule(static) if ((long)n * k > 65536)
    for (int i = 0; i < n; i++) {
        const int8_t* w = p->wq + (size_t)i * k;     // (k)
        const float* ws = p->ws + (size_t)i * ng;     // (k/G)
        float y = 0.f;
        int g = 0;
#if defined(__AVX2__)
        if (G % 32 == 0) {
            __m256 acc = _mm256_setzero_ps();
            for (; g < ng; g++) {
                __m256i d = _mm256_setzero_si256();
                for (int j = g * G; j < (g + 1) * G; j += 32) d = _mm256_add_epi32(d, q8_dot32(xq + j, w + j));
                acc = _mm256_add_ps(acc, _mm256_mul_ps(_mm256_cvtepi32_ps(d), _mm256_set1_ps(ws[g] * xs[g])));
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
        p->y[i] = y;
    }
    free(xq_heap);
    free(xs_heap);
}
