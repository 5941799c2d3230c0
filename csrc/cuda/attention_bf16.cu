// attention_bf16.cu — causal flash attention in bf16 on tensor cores (FA2 style; GQA, optional document mask):
// mma.sync m16n8k16 bf16 with fp32 accumulate, ldmatrix (.trans for the operands read along keys/queries),
// cp.async double-buffered tiles, online softmax in registers with exp2f on log2(e)-prescaled scores. Each warp
// owns 16 rows (queries in the forward and the dq kernel, keys in the dk/dv kernel); a block is WARPS of them.
// Backward by recomputation as in attention.cu: delta = rowsum(dout * out), then dq by query tiles and dk/dv by
// key tiles — two kernels, no atomics, deterministic (7 tile matmuls instead of FA2's 5, the price of that).
// Head dims 64 and 128 only (attention.cu's fp32 kernels take the rest). Shared memory tiles are swizzled per
// 16-byte chunk (chunk ^ (row & 7)) so the 16-byte cp.async stores and the ldmatrix row reads are conflict-free.
#include "common.cuh"  // (its kernels_cuda.h declares attention_bf16_params and the C API)

namespace {
typedef __nv_bfloat16 bf16;
constexpr float LOG2E = 1.4426950408889634f, LN2 = 0.6931471805599453f;

__device__ __forceinline__ uint32_t smem_u32(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }
// 16-byte async copy; valid = false zero-fills the destination (rows past T must be 0, not garbage: 0 * NaN).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
                 "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }
__device__ __forceinline__ void ldsm_x4(uint32_t r[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_u32(p)));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t r[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_u32(p)));
}
// c (16x8 fp32) += a (16x16 bf16, row) . b (16x8 bf16, col). Not volatile: a pure register op the compiler may
// schedule freely.
__device__ __forceinline__ void mma(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x (lower column) in the low half
    return *reinterpret_cast<uint32_t*>(&v);
}

// Element offset of 16-byte chunk `c` of row `r` in a swizzled (rows, D) bf16 tile.
template <int D> __device__ __forceinline__ int swz(int r, int c) { return r * D + ((c ^ (r & 7)) << 3); }

// Async copy of `rows` rows of D bf16 (global row stride ld elements) into a swizzled tile; rows >= nvalid -> 0.
template <int D, int ROWS, int NT>
__device__ __forceinline__ void load_tile(bf16* s, const bf16* g, long ld, int nvalid) {
    constexpr int CPR = D / 8;
#pragma unroll
    for (int e = threadIdx.x; e < ROWS * CPR; e += NT) {
        const int r = e / CPR, c = e % CPR;
        const bool ok = r < nvalid;
        cp_async16(s + swz<D>(r, c), g + (ok ? r : 0) * ld + c * 8, ok);
    }
}
// A fragment (16x16, rows r0.., k columns 16kk..) of a row-major swizzled tile.
template <int D> __device__ __forceinline__ void ld_a(uint32_t a[4], const bf16* s, int r0, int kk, int lane) {
    ldsm_x4(a, s + swz<D>(r0 + (lane & 15), 2 * kk + (lane >> 4)));
}
// B fragments of two n8 tiles (rows n0.. and n0+8.. of the tile are the n index, columns 16kk.. the k index):
// b[0..1] for rows n0..n0+7, b[2..3] for n0+8..n0+15. For S = Q K^T reading K (and dP = dO V^T reading V).
template <int D> __device__ __forceinline__ void ld_b(uint32_t b[4], const bf16* s, int n0, int kk, int lane) {
    ldsm_x4(b, s + swz<D>(n0 + (lane & 7) + ((lane >> 4) << 3), 2 * kk + ((lane >> 3) & 1)));
}
// B fragments read transposed: tile rows k0..k0+15 are the k index, columns (chunks dc, dc+1) the n index:
// b[0..1] for columns 8dc.., b[2..3] for 8dc+8... For O = P V reading V (and dq = dS K, dv = P^T dO, ...).
template <int D> __device__ __forceinline__ void ld_bt(uint32_t b[4], const bf16* s, int k0, int dc, int lane) {
    ldsm_x4_t(b, s + swz<D>(k0 + (lane & 7) + (((lane >> 3) & 1) << 3), dc + (lane >> 4)));
}

// min / max of doc[a..last] (warp-uniform, all lanes call): a tile whose id range misses the other tile's range
// has no allowed pair and is skipped before its data is even loaded (conservative: overlap does not prove a pair).
__device__ __forceinline__ void doc_range(const int32_t* doc, int a, int last, int& lo, int& hi) {
    int l = INT_MAX, h = INT_MIN;
    for (int i = a + (int)(threadIdx.x & 31); i <= last; i += 32) {
        const int d = __ldg(doc + i);
        l = min(l, d);
        h = max(h, d);
    }
    lo = __reduce_min_sync(0xffffffffu, l);
    hi = __reduce_max_sync(0xffffffffu, h);
}

// Accumulator fragments (16 rows x D fp32, NO = D/8 n-tiles) * mul -> bf16 rows of `dst` via the warp's own
// 16-row region `st` of a swizzled smem tile (so global stores are 16-byte and coalesced). Rows >= nvalid skip.
template <int D>
__device__ __forceinline__ void store_rows(bf16* dst, long ld, int nvalid, bf16* st, float (*acc)[4], float mul0,
                                           float mul1, int lane) {
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int o = 0; o < D / 8; o++) {
        *reinterpret_cast<uint32_t*>(st + swz<D>(g, o) + 2 * t) = pack_bf16(acc[o][0] * mul0, acc[o][1] * mul0);
        *reinterpret_cast<uint32_t*>(st + swz<D>(g + 8, o) + 2 * t) = pack_bf16(acc[o][2] * mul1, acc[o][3] * mul1);
    }
    __syncwarp();
    constexpr int CPR = D / 8;
#pragma unroll
    for (int e = lane; e < 16 * CPR; e += 32) {
        const int r = e / CPR, c = e % CPR;
        if (r < nvalid) *reinterpret_cast<uint4*>(dst + r * ld + c * 8) = *reinterpret_cast<const uint4*>(st + swz<D>(r, c));
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Forward. grid (ceil(T/BQ), H, B), BQ = 16*WARPS query rows per block, BKV = 64 keys per tile.
template <int D, int WARPS, int MINB>
__global__ void __launch_bounds__(WARPS * 32, MINB) fa_fwd_kernel(attention_bf16_params p, float sl2) {
    constexpr int BQ = 16 * WARPS, BKV = 64, NT = WARPS * 32, KD = D / 16, NS = BKV / 8, NO = D / 8;
    extern __shared__ __align__(128) unsigned char smem_raw[];
    bf16* Qs = reinterpret_cast<bf16*>(smem_raw);  // (BQ, D)          each warp reads only its own 16 rows
    bf16* Ks = Qs + BQ * D;                        // 2 x (BKV, D)     double-buffered
    bf16* Vs = Ks + 2 * BKV * D;                   // 2 x (BKV, D)
    const int T = p.T, H = p.H, Hkv = p.Hkv;
    const int qt = gridDim.x - 1 - blockIdx.x;  // the longest (last) query tiles start first
    const int b = blockIdx.z, h = blockIdx.y, q0 = qt * BQ, kvh = h / (H / Hkv);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const long ldq = (long)H * D, ldkv = (long)Hkv * D;
    const bf16* qg = reinterpret_cast<const bf16*>(p.q) + ((long)b * T + q0) * ldq + (long)h * D;
    const bf16* kg = reinterpret_cast<const bf16*>(p.k) + (long)b * T * ldkv + (long)kvh * D;
    const bf16* vg = reinterpret_cast<const bf16*>(p.v) + (long)b * T * ldkv + (long)kvh * D;
    const int32_t* doc = p.doc_ids ? p.doc_ids + (long)b * T : nullptr;
    const int q_last = min(q0 + BQ, T) - 1, n_kv = q_last / BKV + 1;
    const int wq0 = q0 + warp * 16;  // this warp's first row
    int qlo = 0, qhi = 0;
    if (doc) doc_range(doc, q0, q_last, qlo, qhi);
    auto next_kv = [&](int kt) {  // first kv tile >= kt that may hold an allowed pair (n_kv: none)
        if (doc)
            for (; kt < n_kv; kt++) {
                int lo, hi;
                doc_range(doc, kt * BKV, min(kt * BKV + BKV, T) - 1, lo, hi);
                if (hi >= qlo && lo <= qhi) break;
            }
        return kt;
    };
    auto load_kv = [&](int kt, int st) {
        const int k0 = kt * BKV;
        load_tile<D, BKV, NT>(Ks + st * BKV * D, kg + k0 * ldkv, ldkv, T - k0);
        load_tile<D, BKV, NT>(Vs + st * BKV * D, vg + k0 * ldkv, ldkv, T - k0);
    };

    load_tile<D, BQ, NT>(Qs, qg, ldq, T - q0);
    int kt = next_kv(0);
    if (kt < n_kv) load_kv(kt, 0);
    cp_async_commit();

    uint32_t qf[KD][4];
    float acc[NO][4], m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
#pragma unroll
    for (int o = 0; o < NO; o++) acc[o][0] = acc[o][1] = acc[o][2] = acc[o][3] = 0.f;
    int doc_r[2] = {0, 0};
    if (doc) {
        doc_r[0] = __ldg(doc + min(wq0 + g, T - 1));
        doc_r[1] = __ldg(doc + min(wq0 + g + 8, T - 1));
    }
    bool first = true;
    int st = 0;
    while (kt < n_kv) {
        const int kn = next_kv(kt + 1);
        if (kn < n_kv) load_kv(kn, st ^ 1);
        cp_async_commit();
        cp_async_wait<1>();  // Q and this tile have landed (for this thread's copies) ...
        __syncthreads();     // ... and everyone's
        if (first) {
#pragma unroll
            for (int kk = 0; kk < KD; kk++) ld_a<D>(qf[kk], Qs, warp * 16, kk, lane);
            first = false;
        }
        const int k0 = kt * BKV;
        if (k0 <= wq0 + 15) {  // else every key of the tile is after this warp's rows (warp-uniform)
            const bf16* Kt = Ks + st * BKV * D;
            const bf16* Vt = Vs + st * BKV * D;
            float s[NS][4];
#pragma unroll
            for (int n = 0; n < NS; n++) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < KD; kk++)
#pragma unroll
                for (int n = 0; n < NS / 2; n++) {
                    uint32_t bk[4];
                    ld_b<D>(bk, Kt, n * 16, kk, lane);
                    mma(s[2 * n], qf[kk], bk[0], bk[1]);
                    mma(s[2 * n + 1], qf[kk], bk[2], bk[3]);
                }
            bool dm = false;  // doc mask needed: the tiles are not one single document
            if (doc) {
                int lo, hi;
                doc_range(doc, k0, min(k0 + BKV, T) - 1, lo, hi);
                dm = !(lo == hi && qlo == qhi && lo == qlo);
            }
            if (k0 + BKV - 1 > wq0 || dm) {  // diagonal tile (or documents): mask per element
#pragma unroll
                for (int n = 0; n < NS; n++)
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        const int i = wq0 + g + (e >> 1) * 8, j = k0 + n * 8 + 2 * t + (e & 1);
                        bool ok = j <= i;
                        if (dm && ok) ok = __ldg(doc + min(j, T - 1)) == doc_r[e >> 1];
                        if (!ok) s[n][e] = -INFINITY;
                    }
            }
#pragma unroll
            for (int r = 0; r < 2; r++) {
                float mx = -INFINITY;
#pragma unroll
                for (int n = 0; n < NS; n++) mx = fmaxf(mx, fmaxf(s[n][2 * r], s[n][2 * r + 1]));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                const float mnew = fmaxf(m[r], mx * sl2);
                const float mu = mnew == -INFINITY ? 0.f : mnew;  // a row with no allowed key yet: p = 0, not NaN
                const float alpha = exp2f(m[r] - mu);
                m[r] = mnew;
                float rs = 0.f;
#pragma unroll
                for (int n = 0; n < NS; n++) {
                    s[n][2 * r] = exp2f(fmaf(s[n][2 * r], sl2, -mu));
                    s[n][2 * r + 1] = exp2f(fmaf(s[n][2 * r + 1], sl2, -mu));
                    rs += s[n][2 * r] + s[n][2 * r + 1];
                }
                l[r] = l[r] * alpha + rs;  // this thread's columns only; the quad is summed at the end
#pragma unroll
                for (int o = 0; o < NO; o++) {
                    acc[o][2 * r] *= alpha;
                    acc[o][2 * r + 1] *= alpha;
                }
            }
#pragma unroll
            for (int kk = 0; kk < BKV / 16; kk++) {
                uint32_t a[4] = {pack_bf16(s[2 * kk][0], s[2 * kk][1]), pack_bf16(s[2 * kk][2], s[2 * kk][3]),
                                 pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                 pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
                for (int dc = 0; dc < NO / 2; dc++) {
                    uint32_t bv[4];
                    ld_bt<D>(bv, Vt, kk * 16, 2 * dc, lane);
                    mma(acc[2 * dc], a, bv[0], bv[1]);
                    mma(acc[2 * dc + 1], a, bv[2], bv[3]);
                }
            }
        }
        __syncthreads();  // stage st is free for the load two tiles ahead
        st ^= 1;
        kt = kn;
    }
    cp_async_wait<0>();
    float inv[2];
#pragma unroll
    for (int r = 0; r < 2; r++) {
        float lr = l[r];
        lr += __shfl_xor_sync(0xffffffffu, lr, 1);
        lr += __shfl_xor_sync(0xffffffffu, lr, 2);
        inv[r] = 1.f / lr;  // > 0 for rows < T: key i itself is always allowed
        const int i = wq0 + g + 8 * r;
        if (t == 0 && i < T) p.lse[((long)b * H + h) * T + i] = (m[r] + log2f(lr)) * LN2;
    }
    bf16* og = reinterpret_cast<bf16*>(p.out) + ((long)b * T + wq0) * ldq + (long)h * D;
    store_rows<D>(og, ldq, T - wq0, Qs + warp * 16 * D, acc, inv[0], inv[1], lane);
}

// ---------------------------------------------------------------------------------------------------------------
// delta (B, H, T) fp32 = rowsum(dout * out): one warp per (b, t, h) row.
__global__ void fa_delta_kernel(float* delta, const bf16* dout, const bf16* out, int B, int T, int H, int D) {
    const long row = (long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);  // = (b*T + t)*H + h
    const int lane = threadIdx.x & 31;
    if (row >= (long)B * T * H) return;
    const __nv_bfloat162* a = reinterpret_cast<const __nv_bfloat162*>(dout + row * D);
    const __nv_bfloat162* c = reinterpret_cast<const __nv_bfloat162*>(out + row * D);
    float s = 0.f;
    for (int d = lane; d < D / 2; d += 32) {
        const float2 x = __bfloat1622float2(a[d]), y = __bfloat1622float2(c[d]);
        s = fmaf(x.x, y.x, fmaf(x.y, y.y, s));
    }
    s = warp_sum(s);
    const int h = row % H, t = (row / H) % T, b = row / ((long)H * T);
    if (lane == 0) delta[((long)b * H + h) * T + t] = s;
}

// dq by query tiles: S = Q K^T, P = exp2(S sl2 - lse2), dP = dO V^T, dS = P (dP - delta), dq = scale dS K.
// grid (ceil(T/BQ), H, B), BQ = 16*WARPS; BKV keys per tile.
template <int D, int WARPS, int BKV, int MINB>
__global__ void __launch_bounds__(WARPS * 32, MINB) fa_dq_kernel(attention_bf16_backward_params p,
                                                                 const float* delta, float sl2, float scale) {
    constexpr int BQ = 16 * WARPS, NT = WARPS * 32, KD = D / 16, NS = BKV / 8, NO = D / 8;
    extern __shared__ __align__(128) unsigned char smem_raw[];
    bf16* Qs = reinterpret_cast<bf16*>(smem_raw);  // (BQ, D)       warp-private rows
    bf16* dOs = Qs + BQ * D;                       // (BQ, D)
    bf16* Ks = dOs + BQ * D;                       // 2 x (BKV, D)
    bf16* Vs = Ks + 2 * BKV * D;                   // 2 x (BKV, D)
    const int T = p.T, H = p.H, Hkv = p.Hkv;
    const int qt = gridDim.x - 1 - blockIdx.x;
    const int b = blockIdx.z, h = blockIdx.y, q0 = qt * BQ, kvh = h / (H / Hkv);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const long ldq = (long)H * D, ldkv = (long)Hkv * D;
    const long qoff = ((long)b * T + q0) * ldq + (long)h * D;
    const bf16* kg = reinterpret_cast<const bf16*>(p.k) + (long)b * T * ldkv + (long)kvh * D;
    const bf16* vg = reinterpret_cast<const bf16*>(p.v) + (long)b * T * ldkv + (long)kvh * D;
    const int32_t* doc = p.doc_ids ? p.doc_ids + (long)b * T : nullptr;
    const int q_last = min(q0 + BQ, T) - 1, n_kv = q_last / BKV + 1;
    const int wq0 = q0 + warp * 16;
    int qlo = 0, qhi = 0;
    if (doc) doc_range(doc, q0, q_last, qlo, qhi);
    auto next_kv = [&](int kt) {
        if (doc)
            for (; kt < n_kv; kt++) {
                int lo, hi;
                doc_range(doc, kt * BKV, min(kt * BKV + BKV, T) - 1, lo, hi);
                if (hi >= qlo && lo <= qhi) break;
            }
        return kt;
    };
    auto load_kv = [&](int kt, int st) {
        const int k0 = kt * BKV;
        load_tile<D, BKV, NT>(Ks + st * BKV * D, kg + k0 * ldkv, ldkv, T - k0);
        load_tile<D, BKV, NT>(Vs + st * BKV * D, vg + k0 * ldkv, ldkv, T - k0);
    };
    load_tile<D, BQ, NT>(Qs, reinterpret_cast<const bf16*>(p.q) + qoff, ldq, T - q0);
    load_tile<D, BQ, NT>(dOs, reinterpret_cast<const bf16*>(p.dout) + qoff, ldq, T - q0);
    int kt = next_kv(0);
    if (kt < n_kv) load_kv(kt, 0);
    cp_async_commit();

    float lse2[2], del[2];
    int doc_r[2] = {0, 0};
#pragma unroll
    for (int r = 0; r < 2; r++) {
        const int i = wq0 + g + 8 * r;
        const long ri = ((long)b * H + h) * T + i;
        lse2[r] = i < T ? p.lse[ri] * LOG2E : INFINITY;  // rows past T: p = 0
        del[r] = i < T ? delta[ri] : 0.f;
        if (doc) doc_r[r] = __ldg(doc + min(i, T - 1));
    }
    uint32_t qf[KD][4], of[KD][4];
    float dq[NO][4];
#pragma unroll
    for (int o = 0; o < NO; o++) dq[o][0] = dq[o][1] = dq[o][2] = dq[o][3] = 0.f;
    bool first = true;
    int st = 0;
    while (kt < n_kv) {
        const int kn = next_kv(kt + 1);
        if (kn < n_kv) load_kv(kn, st ^ 1);
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        if (first) {
#pragma unroll
            for (int kk = 0; kk < KD; kk++) {
                ld_a<D>(qf[kk], Qs, warp * 16, kk, lane);
                ld_a<D>(of[kk], dOs, warp * 16, kk, lane);
            }
            first = false;
        }
        const int k0 = kt * BKV;
        if (k0 <= wq0 + 15) {
            const bf16* Kt = Ks + st * BKV * D;
            const bf16* Vt = Vs + st * BKV * D;
            float s[NS][4], dp[NS][4];
#pragma unroll
            for (int n = 0; n < NS; n++)
#pragma unroll
                for (int e = 0; e < 4; e++) s[n][e] = dp[n][e] = 0.f;
#pragma unroll
            for (int kk = 0; kk < KD; kk++)
#pragma unroll
                for (int n = 0; n < NS / 2; n++) {
                    uint32_t bk[4], bv[4];
                    ld_b<D>(bk, Kt, n * 16, kk, lane);
                    mma(s[2 * n], qf[kk], bk[0], bk[1]);
                    mma(s[2 * n + 1], qf[kk], bk[2], bk[3]);
                    ld_b<D>(bv, Vt, n * 16, kk, lane);
                    mma(dp[2 * n], of[kk], bv[0], bv[1]);
                    mma(dp[2 * n + 1], of[kk], bv[2], bv[3]);
                }
            bool dm = false;
            if (doc) {
                int lo, hi;
                doc_range(doc, k0, min(k0 + BKV, T) - 1, lo, hi);
                dm = !(lo == hi && qlo == qhi && lo == qlo);
            }
            const bool mask = k0 + BKV - 1 > wq0 || dm;
#pragma unroll
            for (int n = 0; n < NS; n++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int r = e >> 1;
                    float pv = exp2f(fmaf(s[n][e], sl2, -lse2[r]));
                    if (mask) {
                        const int i = wq0 + g + r * 8, j = k0 + n * 8 + 2 * t + (e & 1);
                        bool ok = j <= i;
                        if (dm && ok) ok = __ldg(doc + min(j, T - 1)) == doc_r[r];
                        if (!ok) pv = 0.f;
                    }
                    s[n][e] = pv * (dp[n][e] - del[r]);  // dS
                }
#pragma unroll
            for (int kk = 0; kk < BKV / 16; kk++) {
                uint32_t a[4] = {pack_bf16(s[2 * kk][0], s[2 * kk][1]), pack_bf16(s[2 * kk][2], s[2 * kk][3]),
                                 pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                 pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
                for (int dc = 0; dc < NO / 2; dc++) {
                    uint32_t bk[4];
                    ld_bt<D>(bk, Kt, kk * 16, 2 * dc, lane);
                    mma(dq[2 * dc], a, bk[0], bk[1]);
                    mma(dq[2 * dc + 1], a, bk[2], bk[3]);
                }
            }
        }
        __syncthreads();
        st ^= 1;
        kt = kn;
    }
    cp_async_wait<0>();
    bf16* dqg = reinterpret_cast<bf16*>(p.dq) + ((long)b * T + wq0) * ldq + (long)h * D;
    store_rows<D>(dqg, ldq, T - wq0, Qs + warp * 16 * D, dq, scale, scale, lane);
}

// dk, dv by key tiles of one kv head, summed over its H/Hkv query heads and all query tiles at or after the
// diagonal: S^T = K Q^T, P^T = exp2(S^T sl2 - lse2), dP^T = V dO^T, dS^T = P^T (dP^T - delta),
// dv += P^T dO, dk += scale dS^T Q. grid (ceil(T/BKV), Hkv, B), BKV = 16*WARPS; BQ queries per tile.
// KV_REGS: keep this warp's K/V fragments in registers (D = 64) or re-read them from smem (D = 128: registers).
template <int D, int WARPS, int BQ, bool KV_REGS, int MINB>
__global__ void __launch_bounds__(WARPS * 32, MINB) fa_dkdv_kernel(attention_bf16_backward_params p,
                                                                   const float* delta, float sl2, float scale) {
    constexpr int BKV = 16 * WARPS, NT = WARPS * 32, KD = D / 16, NS = BQ / 8, NO = D / 8;
    extern __shared__ __align__(128) unsigned char smem_raw[];
    bf16* Ks = reinterpret_cast<bf16*>(smem_raw);  // (BKV, D)     warp-private rows
    bf16* Vs = Ks + BKV * D;                       // (BKV, D)
    bf16* Qs = Vs + BKV * D;                       // 2 x (BQ, D)
    bf16* dOs = Qs + 2 * BQ * D;                   // 2 x (BQ, D)
    float* lse2s = reinterpret_cast<float*>(dOs + 2 * BQ * D);  // 2 x (BQ)  lse * log2(e), +inf past T
    float* dels = lse2s + 2 * BQ;                                // 2 x (BQ)
    const int T = p.T, H = p.H, Hkv = p.Hkv, G = H / Hkv;
    const int b = blockIdx.z, kvh = blockIdx.y, k0 = blockIdx.x * BKV;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const long ldq = (long)H * D, ldkv = (long)Hkv * D;
    const long kvoff = ((long)b * T + k0) * ldkv + (long)kvh * D;
    const int32_t* doc = p.doc_ids ? p.doc_ids + (long)b * T : nullptr;
    const int k_last = min(k0 + BKV, T) - 1;
    const int wk0 = k0 + warp * 16;
    const int qt0 = k0 / BQ, nq = (T - 1) / BQ + 1 - qt0, n_it = G * nq;  // iterations: (head, query tile)
    int klo = 0, khi = 0;
    if (doc) doc_range(doc, k0, k_last, klo, khi);
    auto next_it = [&](int it) {
        if (doc)
            for (; it < n_it; it++) {
                const int q0 = (qt0 + it % nq) * BQ;
                int lo, hi;
                doc_range(doc, q0, min(q0 + BQ, T) - 1, lo, hi);
                if (hi >= klo && lo <= khi) break;
            }
        return it;
    };
    auto load_q = [&](int it, int st) {
        const int h = kvh * G + it / nq, q0 = (qt0 + it % nq) * BQ;
        const long qoff = ((long)b * T + q0) * ldq + (long)h * D;
        load_tile<D, BQ, NT>(Qs + st * BQ * D, reinterpret_cast<const bf16*>(p.q) + qoff, ldq, T - q0);
        load_tile<D, BQ, NT>(dOs + st * BQ * D, reinterpret_cast<const bf16*>(p.dout) + qoff, ldq, T - q0);
        for (int e = threadIdx.x; e < BQ; e += NT) {  // plain loads: visible after the next __syncthreads
            const int i = q0 + e;
            const long ri = ((long)b * H + h) * T + i;
            lse2s[st * BQ + e] = i < T ? p.lse[ri] * LOG2E : INFINITY;
            dels[st * BQ + e] = i < T ? delta[ri] : 0.f;
        }
    };
    load_tile<D, BKV, NT>(Ks, reinterpret_cast<const bf16*>(p.k) + kvoff, ldkv, T - k0);
    load_tile<D, BKV, NT>(Vs, reinterpret_cast<const bf16*>(p.v) + kvoff, ldkv, T - k0);
    int it = next_it(0);
    if (it < n_it) load_q(it, 0);
    cp_async_commit();

    int doc_r[2] = {0, 0};
    if (doc) {
        doc_r[0] = __ldg(doc + min(wk0 + g, T - 1));
        doc_r[1] = __ldg(doc + min(wk0 + g + 8, T - 1));
    }
    uint32_t kf[KV_REGS ? KD : 1][4], vf[KV_REGS ? KD : 1][4];
    float dk[NO][4], dv[NO][4];
#pragma unroll
    for (int o = 0; o < NO; o++)
#pragma unroll
        for (int e = 0; e < 4; e++) dk[o][e] = dv[o][e] = 0.f;
    bool first = true;
    int st = 0;
    while (it < n_it) {
        const int in = next_it(it + 1);
        if (in < n_it) load_q(in, st ^ 1);
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        if (KV_REGS && first) {
#pragma unroll
            for (int kk = 0; kk < (KV_REGS ? KD : 1); kk++) {
                ld_a<D>(kf[kk], Ks, warp * 16, kk, lane);
                ld_a<D>(vf[kk], Vs, warp * 16, kk, lane);
            }
        }
        first = false;
        const int q0 = (qt0 + it % nq) * BQ;
        if (q0 + BQ - 1 >= wk0 && wk0 < T) {  // else every query of the tile is before this warp's keys
            const bf16* Qt = Qs + st * BQ * D;
            const bf16* Ot = dOs + st * BQ * D;
            float s[NS][4], dp[NS][4];
#pragma unroll
            for (int n = 0; n < NS; n++)
#pragma unroll
                for (int e = 0; e < 4; e++) s[n][e] = dp[n][e] = 0.f;
#pragma unroll
            for (int kk = 0; kk < KD; kk++) {
                uint32_t ka[4], va[4];
                if (KV_REGS) {
#pragma unroll
                    for (int e = 0; e < 4; e++) ka[e] = kf[KV_REGS ? kk : 0][e], va[e] = vf[KV_REGS ? kk : 0][e];
                } else {
                    ld_a<D>(ka, Ks, warp * 16, kk, lane);
                    ld_a<D>(va, Vs, warp * 16, kk, lane);
                }
#pragma unroll
                for (int n = 0; n < NS / 2; n++) {
                    uint32_t bq[4], bo[4];
                    ld_b<D>(bq, Qt, n * 16, kk, lane);
                    mma(s[2 * n], ka, bq[0], bq[1]);
                    mma(s[2 * n + 1], ka, bq[2], bq[3]);
                    ld_b<D>(bo, Ot, n * 16, kk, lane);
                    mma(dp[2 * n], va, bo[0], bo[1]);
                    mma(dp[2 * n + 1], va, bo[2], bo[3]);
                }
            }
            bool dm = false;
            if (doc) {
                int lo, hi;
                doc_range(doc, q0, min(q0 + BQ, T) - 1, lo, hi);
                dm = !(lo == hi && klo == khi && lo == klo);
            }
            const bool mask = q0 < wk0 + 15 || dm;
            const float* l2 = lse2s + st * BQ;
            const float* dl = dels + st * BQ;
#pragma unroll
            for (int n = 0; n < NS; n++) {
                const float2 lv = *reinterpret_cast<const float2*>(l2 + n * 8 + 2 * t);
                const float2 dv2 = *reinterpret_cast<const float2*>(dl + n * 8 + 2 * t);
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int c = e & 1;  // rows: keys (e >> 1); columns: queries
                    float pv = exp2f(fmaf(s[n][e], sl2, -(c ? lv.y : lv.x)));
                    if (mask) {
                        const int j = wk0 + g + (e >> 1) * 8, i = q0 + n * 8 + 2 * t + c;
                        bool ok = j <= i;
                        if (dm && ok) ok = __ldg(doc + min(i, T - 1)) == doc_r[e >> 1];
                        if (!ok) pv = 0.f;
                    }
                    s[n][e] = pv;                                    // P^T
                    dp[n][e] = pv * (dp[n][e] - (c ? dv2.y : dv2.x));  // dS^T
                }
            }
#pragma unroll
            for (int kk = 0; kk < BQ / 16; kk++) {
                uint32_t pa[4] = {pack_bf16(s[2 * kk][0], s[2 * kk][1]), pack_bf16(s[2 * kk][2], s[2 * kk][3]),
                                  pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                  pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3])};
                uint32_t da[4] = {pack_bf16(dp[2 * kk][0], dp[2 * kk][1]), pack_bf16(dp[2 * kk][2], dp[2 * kk][3]),
                                  pack_bf16(dp[2 * kk + 1][0], dp[2 * kk + 1][1]),
                                  pack_bf16(dp[2 * kk + 1][2], dp[2 * kk + 1][3])};
#pragma unroll
                for (int dc = 0; dc < NO / 2; dc++) {
                    uint32_t bo[4], bq[4];
                    ld_bt<D>(bo, Ot, kk * 16, 2 * dc, lane);
                    mma(dv[2 * dc], pa, bo[0], bo[1]);
                    mma(dv[2 * dc + 1], pa, bo[2], bo[3]);
                    ld_bt<D>(bq, Qt, kk * 16, 2 * dc, lane);
                    mma(dk[2 * dc], da, bq[0], bq[1]);
                    mma(dk[2 * dc + 1], da, bq[2], bq[3]);
                }
            }
        }
        __syncthreads();
        st ^= 1;
        it = in;
    }
    cp_async_wait<0>();
    __syncthreads();  // (KV_REGS = false reads Ks/Vs rows of this warp only, but keep the staging simple)
    bf16* dkg = reinterpret_cast<bf16*>(p.dk) + kvoff + (long)warp * 16 * ldkv;
    bf16* dvg = reinterpret_cast<bf16*>(p.dv) + kvoff + (long)warp * 16 * ldkv;
    store_rows<D>(dkg, ldkv, T - wk0, Ks + warp * 16 * D, dk, scale, scale, lane);
    store_rows<D>(dvg, ldkv, T - wk0, Vs + warp * 16 * D, dv, 1.f, 1.f, lane);
}

template <typename Kern, typename... Args>
const char* launch_fa(Kern kernel, dim3 grid, int threads, size_t smem, cudaStream_t s, Args... args) {
    if (smem > 48 * 1024) CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    kernel<<<grid, threads, smem, s>>>(args...);
    CUDA_CHECK_LAUNCH();
    return nullptr;
}

// Tile configurations per head dim (benchmarks/cuda_lab/attn_harness.cu times them).
template <int D> struct fa_cfg;
template <> struct fa_cfg<64> {
    static constexpr int FWD_WARPS = 4, FWD_MINB = 3;
    static constexpr int DQ_WARPS = 4, DQ_BKV = 32, DQ_MINB = 3;
    static constexpr int KV_WARPS = 4, KV_BQ = 64, KV_MINB = 2;
    static constexpr bool KV_REGS = true;
};
template <> struct fa_cfg<128> {
    static constexpr int FWD_WARPS = 4, FWD_MINB = 2;
    static constexpr int DQ_WARPS = 4, DQ_BKV = 64, DQ_MINB = 1;
    static constexpr int KV_WARPS = 4, KV_BQ = 64, KV_MINB = 1;
    static constexpr bool KV_REGS = false;
};

template <int D, int WARPS, int MINB>
const char* fa_forward(const attention_bf16_params* p, cudaStream_t s) {
    constexpr int BQ = 16 * WARPS, BKV = 64;
    const size_t smem = (size_t)(BQ + 4 * BKV) * D * 2;
    const float sl2 = LOG2E / sqrtf((float)D);
    return launch_fa(fa_fwd_kernel<D, WARPS, MINB>, dim3(ceil_div(p->T, BQ), p->H, p->B), WARPS * 32, smem, s, *p, sl2);
}

template <int D, int DQW, int DQB, int DQM, int KVW, int KVB, bool KVR, int KVM>
const char* fa_backward(const attention_bf16_backward_params* p, float* delta, cudaStream_t s) {
    const float scale = 1.f / sqrtf((float)D), sl2 = LOG2E * scale;
    const long rows = (long)p->B * p->T * p->H;
    fa_delta_kernel<<<ceil_div(rows, 8), 256, 0, s>>>(delta, reinterpret_cast<const bf16*>(p->dout),
                                                      reinterpret_cast<const bf16*>(p->out), p->B, p->T, p->H, D);
    CUDA_CHECK_LAUNCH();
    const size_t smem_dq = (size_t)(2 * 16 * DQW + 4 * DQB) * D * 2;
    const size_t smem_kv = (size_t)(2 * 16 * KVW + 4 * KVB) * D * 2 + 4 * KVB * 4;
    const char* err = launch_fa(fa_dq_kernel<D, DQW, DQB, DQM>, dim3(ceil_div(p->T, 16 * DQW), p->H, p->B), DQW * 32,
                                smem_dq, s, *p, (const float*)delta, sl2, scale);
    if (err) return err;
    return launch_fa(fa_dkdv_kernel<D, KVW, KVB, KVR, KVM>, dim3(ceil_div(p->T, 16 * KVW), p->Hkv, p->B), KVW * 32,
                     smem_kv, s, *p, (const float*)delta, sl2, scale);
}

const char* check_bf16_shape(int D, int H, int Hkv, const void* ptrs[], int n) {
    if ((D != 64 && D != 128) || Hkv <= 0 || H % Hkv) return "attention_bf16: D must be 64 or 128, H a multiple of Hkv";
    for (int i = 0; i < n; i++)
        if (reinterpret_cast<uintptr_t>(ptrs[i]) % 16) return "attention_bf16: tensors must be 16-byte aligned";
    return nullptr;
}
}  // namespace

extern "C" const char* attention_bf16_forward_cuda(const attention_bf16_params* p, pyllm_stream stream) {
    const void* ptrs[] = {p->out, p->q, p->k, p->v};
    if (const char* e = check_bf16_shape(p->D, p->H, p->Hkv, ptrs, 4)) return e;
    cudaStream_t s = STREAM(stream);
    if (p->D == 64) return fa_forward<64, fa_cfg<64>::FWD_WARPS, fa_cfg<64>::FWD_MINB>(p, s);
    return fa_forward<128, fa_cfg<128>::FWD_WARPS, fa_cfg<128>::FWD_MINB>(p, s);
}

extern "C" const char* attention_bf16_backward_cuda(const attention_bf16_backward_params* p, float* delta,
                                                    pyllm_stream stream) {
    const void* ptrs[] = {p->dq, p->dk, p->dv, p->dout, p->out, p->q, p->k, p->v};
    if (const char* e = check_bf16_shape(p->D, p->H, p->Hkv, ptrs, 8)) return e;
    cudaStream_t s = STREAM(stream);
    if (p->D == 64) {
        using C = fa_cfg<64>;
        return fa_backward<64, C::DQ_WARPS, C::DQ_BKV, C::DQ_MINB, C::KV_WARPS, C::KV_BQ, C::KV_REGS, C::KV_MINB>(p, delta, s);
    }
    using C = fa_cfg<128>;
    return fa_backward<128, C::DQ_WARPS, C::DQ_BKV, C::DQ_MINB, C::KV_WARPS, C::KV_BQ, C::KV_REGS, C::KV_MINB>(p, delta, s);
}
