// impl_attention.h — causal flash attention (forward, backward; GQA; document masks) and single-query decode
// attention over a KV cache. Included by kernels_impl.h; KFN() names the per-path symbol. Tested by
// tests/test_kernels_attention.py, timed by benchmarks/bench_attention.py.
//
// Layout: q (B, T, H, D), k/v (B, T, Hkv, D) row-major, rows ldq / ldkv apart (the block op: q, k, v read in
// place from its [q | k | v] GEMM output, RoPE applied as they are read: att_copy_rows); query head h reads kv
// head h / (H / Hkv).
// Work goes in tiles of ATT_BR queries x ATT_BC keys. The scores of one tile are kept TRANSPOSED, S^T (BC, BR),
// so the softmax runs along contiguous query vectors and K/V rows serve as the broadcast operand of att_mm: no
// per-tile transpose. K and V are first copied into contiguous zero-padded (T, Dp) panels per kv head: read in
// place, rows H*D*4 bytes apart are ~one per 4 KiB page (no hardware prefetch, few L1 sets) and the strided V
// reads cost the forward ~6%. Q^T of a query block is built once per block.
// Nothing of size T x T exists; the forward saves lse = m + log(l) per query row and the backward recomputes
// P = exp(S - lse) (FlashAttention-2). Tiles that a document mask hides entirely are skipped.

#include <immintrin.h>  // x86-64 only: SSE2 on the portable path, AVX2/FMA/AVX-512 where the path enables them

#ifndef ATT_BR
#define ATT_BR 64  // query rows per tile (multiple of 2*VLEN on every path; 128 measured no better)
#endif
#ifndef ATT_BC
#define ATT_BC 64  // keys per tile
#endif
#define ATT_DMAX 256  // largest head dim (decode keeps one (D) accumulator on the stack)
#ifndef ATT_MR
#if VLEN == 16
#define ATT_MR 8   // register tile of att_mm: ATT_MR rows x 2 vectors (16 accumulators of 32 zmm)
#else
#define ATT_MR 6   // 12 accumulators of 16 ymm/xmm registers
#endif
#endif

// 2^x for a vector, x <= ~0 (scores minus their running max or lse; no overflow clamp): x = n + r with
// n = round(x), |r| <= 0.5, 2^r by its degree-6 Taylor series (rel error < 1.3e-7), 2^n built in the exponent
// bits. x < -126 (and -inf) gives exactly 0, so masked scores never produce denormals; NaN stays NaN (a NaN key
// or query makes its rows NaN, as in torch, where masking NaN to 0 silently dropped the key). The scores are kept in
// log2 units (Q pre-scaled by log2(e)/sqrt(D)), which saves the ln2 range reduction of exp(): 15 vector ops.
static inline vf att_exp2_poly(vf r) {
    vf y = vf_set1(1.5403530393381606e-4f);
    y = vf_fma(y, r, vf_set1(1.3333558146428443e-3f));
    y = vf_fma(y, r, vf_set1(9.618129107628477e-3f));
    y = vf_fma(y, r, vf_set1(5.550410866482158e-2f));
    y = vf_fma(y, r, vf_set1(0.2402265069591007f));
    y = vf_fma(y, r, vf_set1(0.6931471805599453f));
    return vf_fma(y, r, vf_set1(1.0f));
}
#if VLEN == 16
// AVX-512 has the rounding (vrndscaleps) and the 2^n scaling (vscalefps, masked to zero) as one instruction
// each: 11 vector ops instead of 16, the same bits (both round to nearest even; y * 2^n is exact).
static inline vf att_exp2(vf x) {
    const __mmask16 keep = _mm512_cmp_ps_mask((__m512)x, _mm512_set1_ps(-126.0f), _CMP_NLT_UQ);  // NaN kept
    const __m512 n = _mm512_roundscale_ps((__m512)x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return (vf)_mm512_maskz_scalef_ps(keep, (__m512)att_exp2_poly(x - (vf)n), n);  // -inf: r is NaN, masked
}
#else
static inline vf att_exp2(vf x) {
    const vi lt = x < -126.0f;                             // false for NaN: it reaches the result
    x = vf_select(lt, vf_set1(-126.0f), x);
    const vf tm = x + 12582912.0f;                         // + 1.5 * 2^23 rounds x to an integer n
    const vf y = att_exp2_poly(x - (tm - 12582912.0f));
    typedef uint32_t vu __attribute__((vector_size(VLEN * 4)));  // unsigned: a NaN lane's bits wrap, defined
    const vi e = (vi)(((vu)tm << 23) + (127u << 23));      // 2^n: n sits in the low mantissa bits of tm
    // and-not as an intrinsic: GCC turns `~lt & v` into a blend, which takes an FMA pipe on AMD
#if VLEN == 8
    return (vf)_mm256_andnot_ps((__m256)lt, (__m256)(y * (vf)e));
#else
    return (vf)_mm_andnot_ps((__m128)lt, (__m128)(y * (vf)e));
#endif
}
#endif

// The causal shape of a diagonal tile. Query i0 + r and key j0 + c, off = i0 - j0: key c is masked for query r
// where c > r + off, so on the diagonal (off = 0) half of each product is multiplied by zeros or thrown away. The
// products skip that part by register tile: ATT_TRI_SKIP (C rows = keys, columns = queries: S^T, dP^T) stores
// `fill` (-inf: the mask's value; 0) in tiles where every element is masked; ATT_TRI_KUPTO (rows = queries, inner
// index = keys: P V, dS K) stops the inner loop at the tile's last query; ATT_TRI_KFROM (rows = keys, inner =
// queries: P^T dO, dS^T Q) starts it at the tile's first key. Off the diagonal (off >= BC - 1) nothing is skipped.
// The skipped terms are products with exact zeros (P = 0 there): for finite inputs the results are bit-identical.
// Measured (1 thread, ABBA in one process): fwd+bwd at T = 256 ~7-15% faster, T = 1024 ~3%, T = 4096 within noise.
enum { ATT_TRI_NONE, ATT_TRI_SKIP, ATT_TRI_KUPTO, ATT_TRI_KFROM };
static inline int att_klo(int tri, int m, int off) { return tri == ATT_TRI_KFROM && m - off > 0 ? m - off : 0; }
static inline int att_khi(int tri, int m, int R, int off, int K) {
    return tri == ATT_TRI_KUPTO && m + R + off < K ? m + R + off : K;
}

// R rows x 4 vectors of C (one 64-column block at n on AVX-512): each A row segment and each B row is read once
// per R rows, not twice / once per 8 rows as with the 2-vector tile. R = 6: 24 accumulators + 4 B vectors.
// tri / off / fill: the causal shape of a diagonal tile (see att_mm_core). J0 (a constant): the leading vectors
// that every one of the R rows masks (ATT_TRI_SKIP) are stored as `fill` and left out of the k loop.
// acc: the backward's dK / dV tiles come from (T, Dp) panels that at T = 4096 live in L3, and each register tile
// waited on its 24 C loads (the hardware prefetcher did not run ahead of them): the next tile's rows are asked for
// while this one computes. dV, dK, dQ products at T = 4096 (1 thread, rdtsc per phase, 3 rounds): 906-917 ->
// 877-884 M TSC cycles, ~-3%; A-operand prefetch as well measured worse, two tiles ahead no better.
#define ATT_MM4J(R, J0)                                                                                      \
    {                                                                                                        \
        const int klo = att_klo(tri, m, off), khi = att_khi(tri, m, R, off, K);                              \
        vf c[R][4];                                                                                          \
        for (int r = 0; r < R; r++)                                                                          \
            for (int j = J0; j < 4; j++) c[r][j] = acc ? vf_load(C + (m + r) * ldc + n + j * VLEN) : vf_set1(0.f); \
        if (acc) /* the next register tile's C rows (acc: see the comment above) */                       \
            for (int r = 0; r < R; r++)                                                                      \
                for (int j = 0; j < 4; j++)                                                                  \
                    _mm_prefetch((const char*)(C + (m + R + r) * ldc + n + j * VLEN), _MM_HINT_T0);          \
        const float* a = A + (long)m * sam + (long)klo * sak;                                                \
        const float* b = B + n + (long)klo * ldb;                                                            \
        for (int k = klo; k < khi; k++, a += sak, b += ldb) {                                                \
            vf bv[4];                                                                                        \
            for (int j = J0; j < 4; j++) bv[j] = vf_load(b + j * VLEN);                                      \
            for (int r = 0; r < R; r++) {                                                                    \
                const vf ar = vf_set1(a[r * sam]);                                                           \
                for (int j = J0; j < 4; j++) c[r][j] = vf_fma(ar, bv[j], c[r][j]);                           \
            }                                                                                                \
        }                                                                                                    \
        for (int r = 0; r < R; r++) {                                                                        \
            for (int j = 0; j < J0; j++) vf_store(C + (m + r) * ldc + n + j * VLEN, vf_set1(fill));         \
            for (int j = J0; j < 4; j++) vf_store(C + (m + r) * ldc + n + j * VLEN, c[r][j]);                \
        }                                                                                                    \
    }
// On a diagonal tile (off = 0) of S^T or dP^T, rows m.. (keys) mask the queries before m: the 6-row tiles skip
// 0, 1, 2 or 3 of their 4 vectors, 35% of the tile's products (an all-masked row tile stores fill only).
// Measured (1 thread, B8 H12 T256 D64, 3 alternating rounds): fwd+bwd 42-43 -> 38.4-39.5 ms; T = 4096 within noise.
#define ATT_MM4(R)                                                                                           \
    {                                                                                                        \
        const int js = tri == ATT_TRI_SKIP ? att_skip_vectors(m, n, off) : 0;                                \
        if (js >= 4) {                                                                                       \
            for (int r = 0; r < R; r++)                                                                      \
                for (int j = 0; j < 4; j++) vf_store(C + (m + r) * ldc + n + j * VLEN, vf_set1(fill));      \
        } else if (js == 0) ATT_MM4J(R, 0)                                                                   \
        else if (js == 1) ATT_MM4J(R, 1)                                                                     \
        else if (js == 2) ATT_MM4J(R, 2)                                                                     \
        else ATT_MM4J(R, 3)                                                                                  \
    }
// Leading vectors of the columns from n (queries) that rows m.. of an S^T-shaped tile all mask: query q is hidden
// from key row c where q < c - off, so from every row >= m where q < m - off.
static inline int att_skip_vectors(int m, int n, int off) { return m - off - n > 0 ? (m - off - n) / VLEN : 0; }

// R rows x 2 vectors of C, a one-vector column tail where N is an odd number of vectors.
#define ATT_MM2(R)                                                                                           \
    {                                                                                                        \
        const int klo = att_klo(tri, m, off), khi = att_khi(tri, m, R, off, K);                              \
        const float* a0 = A + (long)m * sam + (long)klo * sak;                                               \
        float* cm = C + (long)m * ldc;                                                                       \
        int n = 0;                                                                                           \
        for (; n + 2 * VLEN <= N; n += 2 * VLEN) {                                                           \
            if (tri == ATT_TRI_SKIP && m > n + 2 * VLEN - 1 + off) {                                         \
                for (int r = 0; r < R; r++) {                                                                \
                    vf_store(cm + r * ldc + n, vf_set1(fill));                                               \
                    vf_store(cm + r * ldc + n + VLEN, vf_set1(fill));                                        \
                }                                                                                            \
                continue;                                                                                    \
            }                                                                                                \
            vf c0[R], c1[R];                                                                                 \
            for (int r = 0; r < R; r++) {                                                                    \
                c0[r] = acc ? vf_load(cm + r * ldc + n) : vf_set1(0.f);                                      \
                c1[r] = acc ? vf_load(cm + r * ldc + n + VLEN) : vf_set1(0.f);                               \
            }                                                                                                \
            const float* a = a0;                                                                             \
            const float* b = B + n + (long)klo * ldb;                                                        \
            for (int k = klo; k < khi; k++, a += sak, b += ldb) {                                            \
                const vf b0 = vf_load(b), b1 = vf_load(b + VLEN);                                            \
                for (int r = 0; r < R; r++) {                                                                \
                    const vf ar = vf_set1(a[r * sam]);                                                       \
                    c0[r] = vf_fma(ar, b0, c0[r]);                                                           \
                    c1[r] = vf_fma(ar, b1, c1[r]);                                                           \
                }                                                                                            \
            }                                                                                                \
            for (int r = 0; r < R; r++) {                                                                    \
                vf_store(cm + r * ldc + n, c0[r]);                                                           \
                vf_store(cm + r * ldc + n + VLEN, c1[r]);                                                    \
            }                                                                                                \
        }                                                                                                    \
        for (; n < N; n += VLEN) {                                                                           \
            if (tri == ATT_TRI_SKIP && m > n + VLEN - 1 + off) {                                             \
                for (int r = 0; r < R; r++) vf_store(cm + r * ldc + n, vf_set1(fill));                       \
                continue;                                                                                    \
            }                                                                                                \
            vf c0[R];                                                                                        \
            for (int r = 0; r < R; r++) c0[r] = acc ? vf_load(cm + r * ldc + n) : vf_set1(0.f);              \
            const float* a = a0;                                                                             \
            const float* b = B + n + (long)klo * ldb;                                                        \
            for (int k = klo; k < khi; k++, a += sak, b += ldb) {                                            \
                const vf b0 = vf_load(b);                                                                    \
                for (int r = 0; r < R; r++) c0[r] = vf_fma(vf_set1(a[r * sam]), b0, c0[r]);                  \
            }                                                                                                \
            for (int r = 0; r < R; r++) vf_store(cm + r * ldc + n, c0[r]);                                   \
        }                                                                                                    \
    }

// C (M, N) (+)= A (M, K) . B (K, N). A's element (m, k) is A[m*sam + k*sak] (row- or column-major, read one
// scalar at a time and broadcast); B rows are ldb apart, C rows ldc apart; N a multiple of VLEN. acc = 0
// overwrites C. On AVX-512 with N a multiple of 64 (every tile product at D = 64, 128, ...): 6 x 4-vector
// register tiles (ATT_MM4): the tiles' K/V operands come from L2 (a head's (T, Dp) panels), and reading each
// once per 6 rows made the forward ~5-10% faster than the 8 x 2 tile below (session 10, T = 1024 / 4096).
static inline __attribute__((always_inline)) void att_mm_core(float* C, long ldc, const float* A, long sam,
                                                              long sak, const float* B, long ldb, int M, int N,
                                                              int K, int acc, int tri, int off, float fill) {
    int m = 0;
#if VLEN == 16
    if (N % (4 * VLEN) == 0) {
        for (int n = 0; n < N; n += 4 * VLEN) {
            const int m6 = M % 6 == 2 && M >= 8 ? M - 8 : M;   // 32 = 4x6 + 2x4 rows, not 5x6 + 2x1
            for (m = 0; m + 6 <= m6; m += 6) ATT_MM4(6)
            for (; m + 4 <= M; m += 4) ATT_MM4(4)
            for (; m < M; m++) ATT_MM4(1)
        }
        return;
    }
#endif
    // Otherwise R rows x 2 vectors: 6 x 2 (12 accumulators + 2 B vectors + 1 broadcast of 16 ymm registers:
    // 8 loads per 12 FMAs) where the 4 x 2 tile it replaced had 6 per 8 and only the 8 accumulators that the
    // FMA latency x 2 pipes needs; the M = 64 tiles split 10 x 6 + 4.
    const int m6 = ATT_MR == 6 && M % 6 == 2 && M >= 8 ? M - 8 : M;   // 6q+2 rows: two 4-row tiles, not 1-row
    for (; m + ATT_MR <= m6; m += ATT_MR) ATT_MM2(ATT_MR)
    for (; m + 4 <= M; m += 4) ATT_MM2(4)
    for (; m < M; m++) ATT_MM2(1)
}
// Row-major A (sak = 1) and column-major A (sam = 1): two specialisations so the broadcast addressing is cheap.
// Tiles the causal mask does not cut (every tile off the diagonal) take a copy of the core compiled without the
// tri checks: with them the T = 1024 forward + backward ran ~2% slower.
static inline int att_tri_cuts(int tri, int off, int M, int K) {
    return tri != ATT_TRI_NONE && (tri == ATT_TRI_KUPTO ? off < K - 1 : off < M - 1);
}
static void att_mm_rowA(float* C, long ldc, const float* A, long lda, const float* B, long ldb, int M, int N,
                        int K, int acc, int tri, int off, float fill) {
    if (att_tri_cuts(tri, off, M, K))
        att_mm_core(C, ldc, A, lda, 1, B, ldb, M, N, K, acc, tri, off, fill);
    else
        att_mm_core(C, ldc, A, lda, 1, B, ldb, M, N, K, acc, ATT_TRI_NONE, 0, 0.f);
}
static void att_mm_colA(float* C, long ldc, const float* A, long lda, const float* B, long ldb, int M, int N,
                        int K, int acc, int tri, int off) {
    if (att_tri_cuts(tri, off, M, K))
        att_mm_core(C, ldc, A, 1, lda, B, ldb, M, N, K, acc, tri, off, 0.f);
    else
        att_mm_core(C, ldc, A, 1, lda, B, ldb, M, N, K, acc, ATT_TRI_NONE, 0, 0.f);
}

static inline int att_min(int a, int b) { return a < b ? a : b; }

// Smallest and largest document id among rows [i0, i0+n) of one batch row (doc: (T)).
static void att_doc_range(const int32_t* doc, int i0, int n, int32_t* lo, int32_t* hi) {
    int32_t a = doc[i0], b = doc[i0];
    for (int i = i0 + 1; i < i0 + n; i++) { a = doc[i] < a ? doc[i] : a; b = doc[i] > b ? doc[i] : b; }
    *lo = a; *hi = b;
}

// Tile (query rows [i0, i0+Mq), keys [j0, j0+Nk)): 0 = skip (fully masked: disjoint document-id ranges),
// 1 = compute without masking, 2 = compute then mask element-wise (diagonal tile, or documents may differ).
static int att_tile_kind(const int32_t* doc, int i0, int Mq, int j0, int Nk, int32_t qlo, int32_t qhi) {
    int kind = (j0 + Nk - 1 > i0) ? 2 : 1;
    if (doc) {
        int32_t klo, khi;
        att_doc_range(doc, j0, Nk, &klo, &khi);
        if (khi < qlo || klo > qhi) return 0;
        if (!(qlo == qhi && klo == khi && qlo == klo)) kind = 2;
    }
    return kind;
}

// S^T (BC, BR): key c of the tile vs query r; -inf where key j0+c is in the future of query i0+r or in another
// document. Padded query columns (r >= Mq) are left alone (their Q^T columns are zero).
static void att_mask(float* ST, const int32_t* doc, int i0, int Mq, int j0, int Nk) {
    if (!doc) {  // causal only: key j is hidden from the queries i0 + r < j, a prefix of its S^T row: a fill
                 // instead of the element test below (T = 256, ABBA of 21: forward +1.5%, backward +3%)
        for (int c = 0; c < Nk; c++) {
            const int n = att_min(j0 + c - i0, Mq);
            float* s = ST + (long)c * ATT_BR;
            for (int r = 0; r < n; r++) s[r] = -INFINITY;
        }
        return;
    }
    for (int c = 0; c < Nk; c++) {
        const int j = j0 + c;
        float* s = ST + (long)c * ATT_BR;
        for (int r = 0; r < Mq; r++)
            if (j > i0 + r || (doc && doc[j] != doc[i0 + r])) s[r] = -INFINITY;
    }
}

// Q^T of one block, (D, BR), times `mul`; zero columns for rows past T. src rows ld apart.
// VLEN x VLEN blocks through impl_matmul.h's register transposes where the path has one: the element loop alone
// (a strided gather, one scalar per element) was ~5% of a T = 256 forward (two of them per block in the backward).
static void att_transpose(float* dst, const float* src, long ld, int Mq, int D, float mul) {
    int r0 = 0;
#if VLEN == 8 || VLEN == 16
#if VLEN == 16
    typedef __m512 vt;
#define ATT_TRANSPOSE mm_transpose16
#else
    typedef __m256 vt;
#define ATT_TRANSPOSE mm_transpose8
#endif
    const vf vm = vf_set1(mul);
    for (; r0 + VLEN <= Mq; r0 += VLEN) {
        int d0 = 0;
        for (; d0 + VLEN <= D; d0 += VLEN) {
            vt x[VLEN];
            for (int i = 0; i < VLEN; i++) x[i] = (vt)vf_load(src + (r0 + i) * ld + d0);
            ATT_TRANSPOSE(x);
            for (int j = 0; j < VLEN; j++) vf_store(dst + (long)(d0 + j) * ATT_BR + r0, (vf)x[j] * vm);
        }
        for (; d0 < D; d0++)
            for (int i = 0; i < VLEN; i++) dst[(long)d0 * ATT_BR + r0 + i] = src[(r0 + i) * ld + d0] * mul;
    }
#undef ATT_TRANSPOSE
#endif
    for (int d = 0; d < D; d++) {  // rows past the last full block, then the zero columns
        float* o = dst + (long)d * ATT_BR;
        for (int r = r0; r < Mq; r++) o[r] = src[r * ld + d] * mul;
        for (int r = Mq; r < ATT_BR; r++) o[r] = 0.f;
    }
}

// n rows of a (., D) view ld apart -> rows ldd apart, D values each and zeros in [D, Dp) (Dp = D: none). cs/sn
// (T, D/2) non-NULL: row r is rotated as RoPE rotates position t0 + r (rotate-half; sg = -1: by -angle, the
// backward), so the block op's q and k need no RoPE pass of their own: the kernels read the pre-RoPE GEMM output
// and write the pre-RoPE gradients (the issue-3 step: 24 rope calls, ~12 ms of a 1.9 s step, gone).
static void att_copy_rows(float* dst, long ldd, int Dp, const float* src, long ld, int n, int D, const float* cs,
                          const float* sn, int t0, float sg) {
    const int h2 = D / 2;
    for (int r = 0; r < n; r++) {
        float* o = dst + (long)r * ldd;
        const float* x = src + r * ld;
        for (int d = 0; d < D; d += 16) __builtin_prefetch(x + 8 * ld + d);  // rows ~a page apart: no HW prefetch
        int d = 0;
        if (cs) {  // impl_fused.h's rotation, (D/2) angles of position t0 + r
            rope_row(o, x, cs + (size_t)(t0 + r) * h2, sn + (size_t)(t0 + r) * h2, D, sg);
            d = D;
        }
        for (; d + VLEN <= D; d += VLEN) vf_store(o + d, vf_load(x + d));
        for (; d < D; d++) o[d] = x[d];
        for (; d < Dp; d++) o[d] = 0.f;
    }
}

void KFN(attention_forward)(const attention_params* p) {
    const int B = p->B, T = p->T, H = p->H, D = p->D, G = p->H / p->Hkv;
    const int Dp = (D + VLEN - 1) / VLEN * VLEN;
    const int nb = (T + ATT_BR - 1) / ATT_BR;
    const long ldq = p->ldq ? p->ldq : (long)H * D, ldk = p->ldkv ? p->ldkv : (long)p->Hkv * D, ldo = (long)H * D;
    const float scale2 = 1.4426950408889634f / sqrtf((float)D);  // scores in log2 units
    const long items = (long)B * H * nb;
    #pragma omp parallel if (items > 1 && (long)T * T * D * B * H > 200000)
    {
        // per-thread scratch: Q^T (D, BR), S^T/P^T (BC, BR), O (BR, Dp), rotated Q rows (BR, Dp), and K, V (T, Dp)
        // of kv head `packed` (mm_scratch: reused across calls, no page faults on megabytes of fresh memory per call)
        float* Qt = mm_scratch((size_t)D * ATT_BR + ATT_BC * ATT_BR + 2 * (size_t)ATT_BR * Dp + 2 * (size_t)T * Dp);
        if (!Qt) kernels_oom_note();
        float* ST = Qt + (size_t)D * ATT_BR;
        float* O = ST + ATT_BC * ATT_BR;
        float* Qr = O + (size_t)ATT_BR * Dp;
        float* Kall = Qr + (size_t)ATT_BR * Dp;
        float* Vall = Kall + (size_t)T * Dp;
        long packed = -1;  // b * Hkv + kv head held in Kall/Vall: items of one head come in a row, so few repacks
        float m[ATT_BR], l[ATT_BR], alpha[ATT_BR];
        #pragma omp for schedule(dynamic, 1)
        for (long it = 0; it < items; it++) {
            if (!Qt) continue;  // out of memory: this thread's items stay unwritten (the caller sees the count)
            const int qb = nb - 1 - (int)(it % nb);  // longest rows (most key tiles) first
            const int h = (int)((it / nb) % H), b = (int)(it / ((long)nb * H)), hk = h / G;
            const int i0 = qb * ATT_BR, Mq = att_min(ATT_BR, T - i0);
            const int32_t* doc = p->doc_ids ? p->doc_ids + (size_t)b * T : NULL;  // (T)
            int32_t qlo = 0, qhi = 0;
            if (doc) att_doc_range(doc, i0, Mq, &qlo, &qhi);
            if (packed != (long)b * p->Hkv + hk) {
                packed = (long)b * p->Hkv + hk;
                att_copy_rows(Kall, Dp, Dp, p->k + (size_t)b * T * ldk + (size_t)hk * D, ldk, T, D, p->cos, p->sin, 0, 1.f);
                att_copy_rows(Vall, Dp, Dp, p->v + (size_t)b * T * ldk + (size_t)hk * D, ldk, T, D, NULL, NULL, 0, 0.f);
            }
            const float* q = p->q + ((size_t)b * T + i0) * ldq + (size_t)h * D;  // (Mq, D), rows ldq apart
            if (p->cos) {  // rotated rows first, then the transpose
                att_copy_rows(Qr, Dp, Dp, q, ldq, Mq, D, p->cos, p->sin, i0, 1.f);
                att_transpose(Qt, Qr, Dp, Mq, D, scale2);
            } else {
                att_transpose(Qt, q, ldq, Mq, D, scale2);
            }
            memset(O, 0, sizeof(float) * (size_t)ATT_BR * Dp);
            for (int r = 0; r < ATT_BR; r++) { m[r] = -INFINITY; l[r] = 0.f; }
            for (int kb = 0; kb * ATT_BC < i0 + Mq; kb++) {  // key tiles up to the diagonal
                const int j0 = kb * ATT_BC, Nk = att_min(ATT_BC, T - j0);
                const int kind = att_tile_kind(doc, i0, Mq, j0, Nk, qlo, qhi);
                if (!kind) continue;
                const float* Kp = Kall + (size_t)j0 * Dp;  // (Nk, Dp)
                const float* Vp = Vall + (size_t)j0 * Dp;  // (Nk, Dp)
                att_mm_rowA(ST, ATT_BR, Kp, Dp, Qt, ATT_BR, Nk, ATT_BR, D, 0, ATT_TRI_SKIP, i0 - j0, -INFINITY);  // S^T = K Q^T * scale * log2(e)
                if (kind == 2) att_mask(ST, doc, i0, Mq, j0, Nk);
                // online softmax along keys, vectorised over queries
                for (int r = 0; r < ATT_BR; r += VLEN) {
                    vf mx = vf_set1(-INFINITY), mx1 = mx, mx2 = mx, mx3 = mx;  // 4 chains: latency, not width, binds
                    int c = 0;
                    for (; c + 4 <= Nk; c += 4) {
                        mx = vf_fmax(mx, vf_load(ST + c * ATT_BR + r));
                        mx1 = vf_fmax(mx1, vf_load(ST + (c + 1) * ATT_BR + r));
                        mx2 = vf_fmax(mx2, vf_load(ST + (c + 2) * ATT_BR + r));
                        mx3 = vf_fmax(mx3, vf_load(ST + (c + 3) * ATT_BR + r));
                    }
                    for (; c < Nk; c++) mx = vf_fmax(mx, vf_load(ST + c * ATT_BR + r));
                    mx = vf_fmax(vf_fmax(mx, mx1), vf_fmax(mx2, mx3));
                    const vf mold = vf_load(m + r), mnew = vf_fmax(mold, mx);
                    const vf msafe = vf_select(mnew == -INFINITY, vf_set1(0.f), mnew);  // rows with no key yet
                    vf sum = vf_set1(0.f);
                    for (int c = 0; c < Nk; c++) {
                        vf pv = att_exp2(vf_load(ST + c * ATT_BR + r) - msafe);
                        vf_store(ST + c * ATT_BR + r, pv);
                        sum += pv;
                    }
                    const vf a = att_exp2(mold - msafe);
                    vf_store(alpha + r, a);
                    vf_store(l + r, vf_load(l + r) * a + sum);
                    vf_store(m + r, mnew);
                }
                for (int r = 0; r < Mq; r++)
                    if (alpha[r] != 1.f) {
                        const vf a = vf_set1(alpha[r]);
                        for (int d = 0; d < Dp; d += VLEN) vf_store(O + r * Dp + d, vf_load(O + r * Dp + d) * a);
                    }
                att_mm_colA(O, Dp, ST, ATT_BR, Vp, Dp, Mq, Dp, Nk, 1, ATT_TRI_KUPTO, i0 - j0);  // O += P V
            }
            float* out = p->out + ((size_t)b * T + i0) * ldo + (size_t)h * D;  // (Mq, D), rows ldo apart
            float* lse = p->lse + ((size_t)b * H + h) * T + i0;                 // (Mq)
            for (int r = 0; r < Mq; r++) {  // vectors by hand: GCC kept the loop scalar (out may alias O)
                const float inv = 1.0f / l[r];
                int d = 0;
                for (; d + VLEN <= D; d += VLEN) vf_store(out + r * ldo + d, vf_load(O + r * Dp + d) * inv);
                for (; d < D; d++) out[r * ldo + d] = O[r * Dp + d] * inv;
                lse[r] = m[r] * 0.6931471805599453f + logf(l[r]);  // natural-log units
            }
        }
    }
}

// One work item per (batch, kv head): it owns dk/dv of that kv head and dq of the heads that read it, so no
// two threads write the same output (parallelism = B * Hkv items). dK, dV accumulate over the group's heads in
// (T, Dp) buffers; dQ of one query block accumulates in (BR, Dp) over its key tiles.
void KFN(attention_backward)(const attention_backward_params* p) {
    const int B = p->B, T = p->T, H = p->H, Hkv = p->Hkv, D = p->D, G = p->H / p->Hkv;
    const int Dp = (D + VLEN - 1) / VLEN * VLEN;
    const int nb = (T + ATT_BR - 1) / ATT_BR;
    const long ldq = p->ldq ? p->ldq : (long)H * D, ldk = p->ldkv ? p->ldkv : (long)Hkv * D, ldo = (long)H * D;
    const long lddq = p->ld_dq ? p->ld_dq : (long)H * D, lddk = p->ld_dkv ? p->ld_dkv : (long)Hkv * D;
    const float scale = 1.0f / sqrtf((float)D);
    const int items = B * Hkv;
    #pragma omp parallel if (items > 1 && (long)T * T * D * B * H > 200000)
    {
        // per-thread scratch: Q^T, dO^T (D, BR); S^T/P^T, dP^T/dS^T (BC, BR); dQ (BR, Dp); dK, dV (T, Dp);
        // Q, dO (BR, Dp) and this kv head's K, V (T, Dp) packed.
        const size_t n_scratch = 2 * (size_t)D * ATT_BR + 2 * ATT_BC * ATT_BR + (size_t)ATT_BR * Dp +
                                 4 * (size_t)T * Dp + 2 * (size_t)ATT_BR * Dp;
        float* Qt = mm_scratch(n_scratch);
        if (!Qt) kernels_oom_note();
        float* dOt = Qt + (size_t)D * ATT_BR;
        float* PT = dOt + (size_t)D * ATT_BR;
        float* dST = PT + ATT_BC * ATT_BR;
        float* dQa = dST + ATT_BC * ATT_BR;
        float* dKa = dQa + (size_t)ATT_BR * Dp;
        float* dVa = dKa + (size_t)T * Dp;
        float* Qp = dVa + (size_t)T * Dp;
        float* dOp = Qp + (size_t)ATT_BR * Dp;
        float* Kall = dOp + (size_t)ATT_BR * Dp;
        float* Vall = Kall + (size_t)T * Dp;
        float lse[ATT_BR], Di[ATT_BR];
        #pragma omp for schedule(dynamic, 1)
        for (int it = 0; it < items; it++) {
            if (!Qt) continue;  // out of memory: see attention_forward
            const int b = it / Hkv, g = it % Hkv;
            const int32_t* doc = p->doc_ids ? p->doc_ids + (size_t)b * T : NULL;  // (T)
            memset(dKa, 0, sizeof(float) * 2 * (size_t)T * Dp);                     // dKa and dVa
            att_copy_rows(Kall, Dp, Dp, p->k + (size_t)b * T * ldk + (size_t)g * D, ldk, T, D, p->cos, p->sin, 0, 1.f);
            att_copy_rows(Vall, Dp, Dp, p->v + (size_t)b * T * ldk + (size_t)g * D, ldk, T, D, NULL, NULL, 0, 0.f);
            for (int h = g * G; h < (g + 1) * G; h++) {
                for (int qb = 0; qb < nb; qb++) {
                    const int i0 = qb * ATT_BR, Mq = att_min(ATT_BR, T - i0);
                    const size_t row0 = ((size_t)b * T + i0) * ldo + (size_t)h * D;
                    const float* q = p->q + ((size_t)b * T + i0) * ldq + (size_t)h * D;  // (Mq, D), rows ldq apart
                    const float* dO = p->dout + row0;    // (Mq, D), rows ldo apart, as are o's
                    const float* o = p->out + row0;
                    int32_t qlo = 0, qhi = 0;
                    if (doc) att_doc_range(doc, i0, Mq, &qlo, &qhi);
                    // rows first (rotated where cos is given), then the transposes from them: one strided pass
                    att_copy_rows(Qp, Dp, Dp, q, ldq, Mq, D, p->cos, p->sin, i0, 1.f);
                    att_copy_rows(dOp, Dp, Dp, dO, ldo, Mq, D, NULL, NULL, 0, 0.f);
                    att_transpose(Qt, Qp, Dp, Mq, D, scale * 1.4426950408889634f);  // log2 units
                    att_transpose(dOt, dOp, Dp, Mq, D, 1.f);
                    const float* lse_src = p->lse + ((size_t)b * H + h) * T + i0;  // (Mq)
                    for (int r = 0; r < ATT_BR; r++) {
                        float di = 0.f;
                        if (r < Mq) {
                            vf acc = vf_set1(0.f);  // in-order scalar sums were ~1% of the backward at T = 1024
                            int d = 0;
                            for (; d + VLEN <= D; d += VLEN)
                                acc = vf_fma(vf_load(dO + r * ldo + d), vf_load(o + r * ldo + d), acc);
                            di = vf_sum(acc);
                            for (; d < D; d++) di += dO[r * ldo + d] * o[r * ldo + d];
                        }
                        Di[r] = di;  // rowsum(dO * O): the softmax-gradient correction of row r
                        lse[r] = r < Mq ? lse_src[r] * 1.4426950408889634f : 0.f;
                    }
                    memset(dQa, 0, sizeof(float) * (size_t)ATT_BR * Dp);
                    for (int kb = 0; kb * ATT_BC < i0 + Mq; kb++) {  // key tiles up to the diagonal
                        const int j0 = kb * ATT_BC, Nk = att_min(ATT_BC, T - j0);
                        const int kind = att_tile_kind(doc, i0, Mq, j0, Nk, qlo, qhi);
                        if (!kind) continue;
                        const float* Kp = Kall + (size_t)j0 * Dp;  // (Nk, Dp)
                        const float* Vp = Vall + (size_t)j0 * Dp;  // (Nk, Dp)
                        const int off = i0 - j0;                   // 0 on the diagonal: see att_klo
                        for (int o = 0; o < 6 * Dp; o += 16) {     // the first register tile's dV, dK rows (ATT_MM4J)
                            _mm_prefetch((const char*)(dVa + (size_t)j0 * Dp + o), _MM_HINT_T0);
                            _mm_prefetch((const char*)(dKa + (size_t)j0 * Dp + o), _MM_HINT_T0);
                        }
                        att_mm_rowA(PT, ATT_BR, Kp, Dp, Qt, ATT_BR, Nk, ATT_BR, D, 0, ATT_TRI_SKIP, off, -INFINITY);  // S^T = K Q^T * scale * log2(e)
                        if (kind == 2) att_mask(PT, doc, i0, Mq, j0, Nk);
                        att_mm_rowA(dST, ATT_BR, Vp, Dp, dOt, ATT_BR, Nk, ATT_BR, D, 0, ATT_TRI_SKIP, off, 0.f);  // dP^T = V dO^T
                        for (int r = 0; r < ATT_BR; r += VLEN) {
                            const vf vl = vf_load(lse + r), vd = vf_load(Di + r);
                            for (int c = 0; c < Nk; c++) {
                                const vf pv = att_exp2(vf_load(PT + c * ATT_BR + r) - vl);  // P recomputed
                                vf_store(PT + c * ATT_BR + r, pv);
                                vf_store(dST + c * ATT_BR + r, pv * (vf_load(dST + c * ATT_BR + r) - vd) * scale);
                            }
                        }
                        att_mm_rowA(dVa + (size_t)j0 * Dp, Dp, PT, ATT_BR, dOp, Dp, Nk, Dp, Mq, 1, ATT_TRI_KFROM, off, 0.f);  // dV += P^T dO
                        att_mm_rowA(dKa + (size_t)j0 * Dp, Dp, dST, ATT_BR, Qp, Dp, Nk, Dp, Mq, 1, ATT_TRI_KFROM, off, 0.f);  // dK += dS^T Q
                        att_mm_colA(dQa, Dp, dST, ATT_BR, Kp, Dp, Mq, Dp, Nk, 1, ATT_TRI_KUPTO, off);  // dQ += dS K
                    }
                    float* dq = p->dq + ((size_t)b * T + i0) * lddq + (size_t)h * D;  // (Mq, D), rows lddq apart
                    att_copy_rows(dq, lddq, D, dQa, Dp, Mq, D, p->cos, p->sin, i0, -1.f);
                }
            }
            float* dk = p->dk + (size_t)b * T * lddk + (size_t)g * D;  // (T, D), rows lddk apart
            float* dv = p->dv + (size_t)b * T * lddk + (size_t)g * D;
            att_copy_rows(dk, lddk, D, dKa, Dp, T, D, p->cos, p->sin, 0, -1.f);
            att_copy_rows(dv, lddk, D, dVa, Dp, T, D, NULL, NULL, 0, 0.f);
        }
    }
}

// Single query per (batch, head) over positions [0, n_ctx) of a KV cache: scores of up to 256 positions at a
// time (in log2 units, for the vector att_exp2), online softmax across chunks. Memory-bound in principle (reads
// n_ctx * D floats of K and V per kv head); with scalar expf and the output accumulated through memory it was
// ~11% of a 15M-model token at 256 positions. The query heads that share a kv head (GQA) are taken together, up to
// DEC_GMAX at a time: each chunk of K and V rows comes from memory once and serves them all from L2. One head at a
// time re-read every row G times: 8 kv heads of 128 at 2000 positions, G = 4, ran at 4.5 GB/s of K+V on Zen 4.
#ifndef DEC_GMAX
#define DEC_GMAX 8
#endif
// Rows of <= 256 bytes (D <= 64), one row per 1-4 KiB of cache: the hardware prefetcher leaves them to demand
// misses, so the group's first head (the one that reads from memory) asks for K rows DEC_AHEAD positions ahead and
// for the V rows the chunk will need. B 64 x 12 heads of 64 at 500 positions: 9.6 -> 11.3 GB/s of K+V; B 512 x 8
// heads over 4 of 64 at 200: 8.2 -> 11.2 GB/s. At D = 128 it measured -7% / +8% (B 8 / B 1), so it stays off there.
#define DEC_AHEAD 16
#ifndef DEC_PREFETCH_MAX
#define DEC_PREFETCH_MAX 4096  // n_ctx * D up to which an item prefetches the next item's K/V rows (32 KiB of both)
#endif
static void decode_attention_heads(const decode_attention_params* p, int item, int items) {
    const int H = p->H, D = p->D, G = p->H / p->Hkv, n_ctx = p->n_ctx, ngc = (G + DEC_GMAX - 1) / DEC_GMAX;
    const int b = item / (p->Hkv * ngc), kvh = item / ngc % p->Hkv, h0 = kvh * G + item % ngc * DEC_GMAX;
    if (item + 1 < items && (long)n_ctx * D <= DEC_PREFETCH_MAX) {
        // Short items (an RL rollout: B 512 x 30 positions): each waits on its own few strided rows, too few for
        // the hardware prefetcher to pick up. Ask for the next item's rows (the next this thread runs: static
        // schedule) while this one computes. B 512, 4 heads of 32, 30 positions: 2.5 -> 0.55 ms per call.
        const int nb = (item + 1) / (p->Hkv * ngc), nkvh = (item + 1) / ngc % p->Hkv;
        const char* nk = (const char*)(p->k_cache + (size_t)nb * p->ld_b + (size_t)nkvh * D);
        const char* nv = (const char*)(p->v_cache + (size_t)nb * p->ld_b + (size_t)nkvh * D);
        for (int t = 0; t < n_ctx; t++)
            for (int o = 0; o < D * 4; o += 64) {
                _mm_prefetch(nk + (size_t)t * p->ld_t * 4 + o, _MM_HINT_T1);
                _mm_prefetch(nv + (size_t)t * p->ld_t * 4 + o, _MM_HINT_T1);
            }
    }
    const int ng = att_min(DEC_GMAX, kvh * G + G - h0);                       // query heads h0 .. h0+ng-1
    const float scale = 1.4426950408889634f / sqrtf((float)D);                 // scores in log2 units
    const float* kc = p->k_cache + (size_t)b * p->ld_b + (size_t)kvh * D;      // (n_ctx, D), rows ld_t apart
    const float* vc = p->v_cache + (size_t)b * p->ld_b + (size_t)kvh * D;
    float accs[DEC_GMAX][ATT_DMAX + VLEN], s[256 + VLEN], ms[DEC_GMAX], ls[DEC_GMAX];
    for (int j = 0; j < ng; j++) {
        for (int d = 0; d < D; d++) accs[j][d] = 0.f;
        ms[j] = -INFINITY;
        ls[j] = 0.f;
    }
    for (int t0 = 0; t0 < n_ctx; t0 += 256) {
        const int n = att_min(256, n_ctx - t0);
        for (int j = 0; j < ng; j++) {   // this chunk's rows: from memory for the first head, from L2 after
            const float* q = p->q + ((size_t)b * H + h0 + j) * D;               // (D)
            float* acc = accs[j];
            // Scores of 4 rows at a time: 4 independent FMA chains and 4 row loads in flight. One row at a time
            // was one chain of D / VLEN dependent FMAs per row (latency-bound: 8 x 4 cycles at D = 128).
            int t = 0;
            for (; t + 4 <= n; t += 4) {
                const float* k0 = kc + (size_t)(t0 + t) * p->ld_t;
                const float *k1 = k0 + p->ld_t, *k2 = k1 + p->ld_t, *k3 = k2 + p->ld_t;
                if (D <= 64 && j == 0 && t + DEC_AHEAD + 4 <= n)  // see DEC_AHEAD
                    for (int r = 0; r < 4; r++)
                        for (int o = 0; o < D; o += 16) {
                            _mm_prefetch((const char*)(k0 + (DEC_AHEAD + r) * p->ld_t + o), _MM_HINT_T0);
                            _mm_prefetch((const char*)(vc + (size_t)(t0 + t + r) * p->ld_t + o), _MM_HINT_T1);
                        }
                vf a0 = vf_set1(0.f), a1 = a0, a2 = a0, a3 = a0;
                int d = 0;
                for (; d + VLEN <= D; d += VLEN) {
                    const vf qv = vf_load(q + d);
                    a0 = vf_fma(qv, vf_load(k0 + d), a0); a1 = vf_fma(qv, vf_load(k1 + d), a1);
                    a2 = vf_fma(qv, vf_load(k2 + d), a2); a3 = vf_fma(qv, vf_load(k3 + d), a3);
                }
                float d0 = vf_sum(a0), d1 = vf_sum(a1), d2 = vf_sum(a2), d3 = vf_sum(a3);
                for (; d < D; d++) { d0 += q[d] * k0[d]; d1 += q[d] * k1[d]; d2 += q[d] * k2[d]; d3 += q[d] * k3[d]; }
                s[t] = d0 * scale; s[t + 1] = d1 * scale; s[t + 2] = d2 * scale; s[t + 3] = d3 * scale;
            }
            for (; t < n; t++) {
                const float* k = kc + (size_t)(t0 + t) * p->ld_t;
                vf a = vf_set1(0.f);
                int d = 0;
                for (; d + VLEN <= D; d += VLEN) a = vf_fma(vf_load(q + d), vf_load(k + d), a);
                float dot = vf_sum(a);
                for (; d < D; d++) dot += q[d] * k[d];
                s[t] = dot * scale;
            }
            for (int t = n; t < n + VLEN; t++) s[t] = -INFINITY;               // pad: weight exactly 0
            vf vmax = vf_set1(-INFINITY);
            for (int t = 0; t < n; t += VLEN) vmax = vf_fmax(vmax, vf_load(s + t));
            const float cmax = vf_max(vmax);
            const float m = ms[j], mnew = cmax > m ? cmax : m;
            const float alpha = exp2f(m - mnew);  // 0 on the first chunk (m = -inf)
            vf vsum = vf_set1(0.f);
            for (int t = 0; t < n; t += VLEN) {
                const vf e = att_exp2(vf_load(s + t) - vf_set1(mnew));
                vf_store(s + t, e);
                vsum += e;
            }
            ls[j] = ls[j] * alpha + vf_sum(vsum);
            ms[j] = mnew;
            for (int d = 0; d < D; d++) acc[d] *= alpha;
            if (D % VLEN == 0 && D <= 8 * VLEN) {  // the output stays in registers (through memory, each row's
                // FMAs waited on the previous row's store: ~10 cycles a row at D = 128). Up to 4 vectors: two rows
                // a step, in two chains (FMA latency); 5-8 vectors are enough chains with one.
                const int nv = D / VLEN, two = nv <= 4;
                vf a[8], c[4];
                for (int i = 0; i < 8; i++) a[i] = i < nv ? vf_load(acc + i * VLEN) : vf_set1(0.f);
                for (int i = 0; i < 4; i++) c[i] = vf_set1(0.f);
                int t = 0;
                if (two)
                    for (; t + 2 <= n; t += 2) {
                        const float* v = vc + (size_t)(t0 + t) * p->ld_t;
                        const vf w0 = vf_set1(s[t]), w1 = vf_set1(s[t + 1]);
                        for (int i = 0; i < 4; i++)
                            if (i < nv) {
                                a[i] = vf_fma(w0, vf_load(v + i * VLEN), a[i]);
                                c[i] = vf_fma(w1, vf_load(v + p->ld_t + i * VLEN), c[i]);
                            }
                    }
                for (; t < n; t++) {
                    const float* v = vc + (size_t)(t0 + t) * p->ld_t;
                    const vf w = vf_set1(s[t]);
                    for (int i = 0; i < 8; i++)
                        if (i < nv) a[i] = vf_fma(w, vf_load(v + i * VLEN), a[i]);
                }
                for (int i = 0; i < nv; i++) vf_store(acc + i * VLEN, i < 4 ? a[i] + c[i] : a[i]);
            } else {
                for (int t = 0; t < n; t++) {
                    const float* v = vc + (size_t)(t0 + t) * p->ld_t;
                    const vf w = vf_set1(s[t]);
                    int d = 0;
                    for (; d + VLEN <= D; d += VLEN) vf_store(acc + d, vf_fma(w, vf_load(v + d), vf_load(acc + d)));
                    for (; d < D; d++) acc[d] += s[t] * v[d];
                }
            }
        }
    }
    for (int j = 0; j < ng; j++) {
        float* out = p->out + ((size_t)b * H + h0 + j) * D;
        const float inv = 1.0f / ls[j];
        for (int d = 0; d < D; d++) out[d] = accs[j][d] * inv;
    }
}

void KFN(decode_attention)(const decode_attention_params* p) {
    const int ngc = (p->H / p->Hkv + DEC_GMAX - 1) / DEC_GMAX, items = p->B * p->Hkv * ngc;
    K_FOR((long)p->B * p->H * p->n_ctx * p->D > 100000, it, items, decode_attention_heads(p, it, items));
}
