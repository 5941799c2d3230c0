// impl_amx.h — bf16 GEMM on AMX tiles (TDPBF16PS), C(M,N) (+)= op(A)·op(B)ᵀ with fp32 accumulate. Included by
// impl_matmul.h in the avx512 build only; matmul_bf16_forward takes it when cpuid, XCR0 and the kernel's
// permission (arch_prctl, isa.c) all say AMX is usable, else the fp32-widening path. PYLLM_NO_AMX=1 turns it off.
// The tile instructions go through the AMX_* macros below: built with -DPYLLM_AMX_EMULATE they run on a plain-C
// model of the eight tile registers, which is how tests/test_amx.py checks this driver on machines without AMX.
//
// Design (one K pass, everything packed, zero-padded so every tile is full):
//   A -> 16-row panels (16, Kp) bf16, Kp = K rounded up to 32 (one tile row = 32 bf16 = 64 bytes);
//   B -> 16-column VNNI panels (Kp/2, 16, 2) bf16: the layout TDPBF16PS wants (k pairs interleaved per column).
//   C blocks of 32 x 32 = 2 x 2 accumulator tiles (tmm0-3), A tiles tmm4-5, B tiles tmm6-7: 4 TDPBF16PS per
//   4 tile loads, each 16 x 16 x 32 (16 KFLOP). B is walked in chunks of MM_AMX_NC columns that stay in L2
//   while the threads split the 32-row A blocks; the accumulators go through a 4 KiB buffer to C (bias, edges).
// Packing costs (M + N) * K bf16 copies against 2 * M * N * K flops, into mm_scratch (no allocation per call).
#if VLEN == 16 && (defined(__x86_64__) || defined(__i386__))
#define PYLLM_HAVE_AMX 1

#ifndef MM_AMX_NC
#define MM_AMX_NC 256            // B columns per chunk: 256 x 768 x 2 bytes = 384 KiB of the 2 MiB L2
#endif

// The 64-byte tile configuration (palette 1): bytes per row and rows for each of the 8 tiles.
typedef struct {
    uint8_t palette_id, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} amx_tilecfg;

#ifdef PYLLM_AMX_EMULATE
// --- a plain-C model of the tile registers (Intel SDM, TILELOADD / TDPBF16PS / TILESTORED) -------------------
typedef struct { int rows, colsb; uint8_t b[16][64]; } amx_emu_tile;
static _Thread_local amx_emu_tile amx_emu_t[8];
static void amx_emu_config(const amx_tilecfg* c) {
    for (int t = 0; t < 8; t++) { amx_emu_t[t].rows = c->rows[t]; amx_emu_t[t].colsb = c->colsb[t]; }
}
static void amx_emu_zero(int t) { memset(amx_emu_t[t].b, 0, sizeof amx_emu_t[t].b); }
static void amx_emu_load(int t, const void* base, size_t stride) {
    for (int r = 0; r < amx_emu_t[t].rows; r++)
        memcpy(amx_emu_t[t].b[r], (const char*)base + r * stride, (size_t)amx_emu_t[t].colsb);
}
static void amx_emu_store(int t, void* base, size_t stride) {
    for (int r = 0; r < amx_emu_t[t].rows; r++)
        memcpy((char*)base + r * stride, amx_emu_t[t].b[r], (size_t)amx_emu_t[t].colsb);
}
static float amx_emu_bf16(const uint8_t* p) { uint32_t u = (uint32_t)(p[0] | p[1] << 8) << 16; float f; memcpy(&f, &u, 4); return f; }
static void amx_emu_dpbf16ps(int c, int a, int b) {
    amx_emu_tile *tc = &amx_emu_t[c], *ta = &amx_emu_t[a], *tb = &amx_emu_t[b];
    for (int m = 0; m < tc->rows; m++)
        for (int n = 0; n < tc->colsb / 4; n++) {
            float acc;
            memcpy(&acc, tc->b[m] + 4 * n, 4);
            for (int k = 0; k < ta->colsb / 4; k++)   // k-th pair of A's row m against row k of B, column n
                acc += amx_emu_bf16(ta->b[m] + 4 * k) * amx_emu_bf16(tb->b[k] + 4 * n)
                     + amx_emu_bf16(ta->b[m] + 4 * k + 2) * amx_emu_bf16(tb->b[k] + 4 * n + 2);
            memcpy(tc->b[m] + 4 * n, &acc, 4);
        }
}
#define AMX_FN static
#define AMX_CONFIG(cfg) amx_emu_config(cfg)
#define AMX_RELEASE() ((void)0)
#define AMX_ZERO(t) amx_emu_zero(t)
#define AMX_LOAD(t, base, stride) amx_emu_load(t, base, stride)
#define AMX_STORE(t, base, stride) amx_emu_store(t, base, stride)
#define AMX_DP(c, a, b) amx_emu_dpbf16ps(c, a, b)
#else
#define AMX_FN static __attribute__((target("amx-tile,amx-bf16")))
#define AMX_CONFIG(cfg) _tile_loadconfig(cfg)
#define AMX_RELEASE() _tile_release()
#define AMX_ZERO(t) _tile_zero(t)
#define AMX_LOAD(t, base, stride) _tile_loadd(t, base, stride)
#define AMX_STORE(t, base, stride) _tile_stored(t, base, stride)
#define AMX_DP(c, a, b) _tile_dpbf16ps(c, a, b)
#endif

// One A panel d (16, Kp): rows r0 .. r0+15 of op(A) (A stored (M, K) row stride lda, or (K, M) when ta), zeroed
// past row M and column K.
static void amx_pack_a(uint16_t* d, const uint16_t* A, int lda, int ta, int r0, int M, int K, int Kp) {
    const int rn = M - r0 < 16 ? M - r0 : 16;
    memset(d, 0, (size_t)16 * Kp * sizeof(uint16_t));
    if (!ta) {
        for (int m = 0; m < rn; m++) memcpy(d + (size_t)m * Kp, A + (size_t)(r0 + m) * lda, (size_t)K * 2);
    } else {
        for (int k = 0; k < K; k++) {
            const uint16_t* s = A + (size_t)k * lda + r0;
            for (int m = 0; m < rn; m++) d[(size_t)m * Kp + k] = s[m];
        }
    }
}

// One B panel d (Kp/2, 16, 2): columns c0 .. c0+15 of op(B)ᵀ in VNNI pairs, d[k/2][n][k%2] = B[c0+n, k] (B stored
// (N, K) row stride ldb, or (K, N) when tb), zeroed past column N and row K.
static void amx_pack_b(uint16_t* d, const uint16_t* B, int ldb, int tb, int c0, int N, int K, int Kp) {
    const int cn = N - c0 < 16 ? N - c0 : 16;
    memset(d, 0, (size_t)16 * Kp * sizeof(uint16_t));
    if (!tb) {
        for (int n = 0; n < cn; n++) {
            const uint16_t* s = B + (size_t)(c0 + n) * ldb;
            for (int k = 0; k < K; k++) d[(size_t)(k / 2) * 32 + n * 2 + (k & 1)] = s[k];
        }
    } else {
        for (int k = 0; k < K; k++) {
            const uint16_t* s = B + (size_t)k * ldb + c0;
            uint16_t* o = d + (size_t)(k / 2) * 32 + (k & 1);
            for (int n = 0; n < cn; n++) o[2 * n] = s[n];
        }
    }
}

// C = op(A)·op(B)ᵀ (+bias) or C += ...: A, B raw bf16 bits. Returns 0, or -1 when the scratch cannot be had.
// A (M, K) row stride lda, or (K, M) if trans_a; B (N, K) row stride ldb, or (K, N) if trans_b; C (M, N) fp32
// row stride ldc; bias (N) or NULL. T threads (1: the caller's).
AMX_FN int mm_amx_bf16(const uint16_t* A, int lda, int trans_a, const uint16_t* B, int ldb, int trans_b, float* C,
                       int ldc, const float* bias, int M, int N, int K, int accumulate, int T) {
    const int Kp = (K + 31) / 32 * 32;
    const int mp = (M + 31) / 32 * 2, np = (N + 31) / 32 * 2;      // 16-row / 16-column panels, even counts
    const size_t a_sz = (size_t)mp * 16 * Kp, b_sz = (size_t)np * 16 * Kp;   // bf16 elements
    uint16_t* Ap = (uint16_t*)mm_scratch((a_sz + b_sz + 1) / 2);   // the GEMM's reused per-thread scratch
    if (!Ap) return -1;
    uint16_t* Bp = Ap + a_sz;   // (np, Kp/2, 16, 2); Ap (mp, 16, Kp)
    #pragma omp parallel num_threads(T) if (T > 1)
    {
        #pragma omp for schedule(static) nowait
        for (int p = 0; p < mp; p++) amx_pack_a(Ap + (size_t)p * 16 * Kp, A, lda, trans_a, p * 16, M, K, Kp);
        #pragma omp for schedule(static)
        for (int q = 0; q < np; q++) amx_pack_b(Bp + (size_t)q * 16 * Kp, B, ldb, trans_b, q * 16, N, K, Kp);
        amx_tilecfg cfg;
        memset(&cfg, 0, sizeof cfg);
        cfg.palette_id = 1;
        for (int t = 0; t < 8; t++) { cfg.rows[t] = 16; cfg.colsb[t] = 64; }
        AMX_CONFIG(&cfg);
        float acc[32 * 32];                                         // (32, 32) one C block
        const size_t as = (size_t)Kp * 2;                           // A tile row stride, bytes
        for (int n0 = 0; n0 < np; n0 += MM_AMX_NC / 16) {
            const int n1 = n0 + MM_AMX_NC / 16 < np ? n0 + MM_AMX_NC / 16 : np;
            #pragma omp for schedule(static)
            for (int i = 0; i < mp; i += 2) {
                const uint16_t* a0 = Ap + (size_t)i * 16 * Kp;
                const uint16_t* a1 = a0 + (size_t)16 * Kp;
                for (int j = n0; j < n1; j += 2) {
                    const uint16_t* b0 = Bp + (size_t)j * 16 * Kp;
                    const uint16_t* b1 = b0 + (size_t)16 * Kp;
                    AMX_ZERO(0); AMX_ZERO(1); AMX_ZERO(2); AMX_ZERO(3);
                    for (int k = 0; k < Kp; k += 32) {
                        AMX_LOAD(4, a0 + k, as);
                        AMX_LOAD(5, a1 + k, as);
                        AMX_LOAD(6, b0 + (size_t)k * 16, 64);
                        AMX_LOAD(7, b1 + (size_t)k * 16, 64);
                        AMX_DP(0, 4, 6); AMX_DP(1, 4, 7);
                        AMX_DP(2, 5, 6); AMX_DP(3, 5, 7);
                    }
                    AMX_STORE(0, acc, 128); AMX_STORE(1, acc + 16, 128);
                    AMX_STORE(2, acc + 16 * 32, 128); AMX_STORE(3, acc + 16 * 32 + 16, 128);
                    const int m0 = i * 16, c0 = j * 16;
                    const int mr = M - m0 < 32 ? M - m0 : 32, nr = N - c0 < 32 ? N - c0 : 32;
                    for (int r = 0; r < mr; r++) {
                        float* c = C + (size_t)(m0 + r) * ldc + c0;
                        const float* s = acc + r * 32;
                        for (int x = 0; x < nr; x++) {
                            const float v = s[x] + (bias ? bias[c0 + x] : 0.f);
                            c[x] = accumulate ? c[x] + v : v;
                        }
                    }
                }
            }
        }
        AMX_RELEASE();
    }
    return 0;
}
#endif
