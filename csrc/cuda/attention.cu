// attention.cu — causal flash attention in fp32 (GQA, optional document mask): forward with online softmax and
// saved lse; backward by recomputation as two kernels (dq by query tiles, dk/dv by key tiles) so nothing needs
// atomics and results are deterministic. Simple CUDA-core version: one warp owns 8 rows, lanes split the 32
// keys (or queries) of a tile for the dot products and the head dim for the accumulators. It has no tensor
// cores, so expect it well below FlashAttention on H100 (bench_cuda.py measures how far); it is the correct base.
// bf16 inputs with D = 64 or 128 take the tensor-core kernels in attention_bf16.cu instead (ops_cuda.py picks).
#include "common.cuh"

namespace {
constexpr int BQ = 32, BKV = 32, ROWS = 8, THREADS = 128;  // 4 warps x 8 rows = 32 rows per block

// True when some (query r of q-tile, key c of k-tile) pair is allowed: skips tiles that belong to no shared
// document (packed rows cost ~sum(doc_len^2)). Called by the whole block; its result is block-uniform.
__device__ __forceinline__ bool tile_has_pair(const int* docq, const int* dock, int q0, int k0, int T) {
    int any = 0;
    for (int e = threadIdx.x; e < BQ * BKV; e += blockDim.x) {
        int r = e / BKV, c = e % BKV, i = q0 + r, j = k0 + c;
        any |= (i < T && j <= i && docq[r] == dock[c]);
    }
    return __syncthreads_or(any);
}

__device__ __forceinline__ float dot_smem(const float* a, const float* b, int D) {
    float s = 0.f;
    for (int d = 0; d < D; d++) s = fmaf(a[d], b[d], s);
    return s;
}

// out/lse as attention_params. grid (ceil(T/BQ), H, B). NC = head-dim chunks of 32 per lane (D <= 32*NC).
template <int NC>
__global__ void __launch_bounds__(THREADS) attn_fwd_kernel(attention_params p, float scale) {
    extern __shared__ float sm[];
    const int D = p.D, T = p.T, H = p.H, Hkv = p.Hkv;
    float* Qs = sm;                      // (BQ, D)     rows read as broadcasts
    float* Ks = Qs + BQ * D;             // (BKV, D+1)  lanes read different rows: +1 pad avoids bank conflicts
    float* Vs = Ks + BKV * (D + 1);      // (BKV, D)    lanes read along D
    int* docq = (int*)(Vs + BKV * D);    // (BQ)
    int* dock = docq + BQ;               // (BKV)
    const int b = blockIdx.z, h = blockIdx.y, q0 = blockIdx.x * BQ, kvh = h / (H / Hkv);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int32_t* doc = p.doc_ids ? p.doc_ids + (long)b * T : nullptr;

    for (int e = threadIdx.x; e < BQ * D; e += blockDim.x) {
        int r = e / D, d = e % D, i = q0 + r;
        Qs[e] = i < T ? p.q[(((long)b * T + i) * H + h) * D + d] : 0.f;
    }
    if (threadIdx.x < BQ) docq[threadIdx.x] = (doc && q0 + (int)threadIdx.x < T) ? doc[q0 + threadIdx.x] : 0;

    float m[ROWS], l[ROWS], acc[ROWS][NC];
#pragma unroll
    for (int rr = 0; rr < ROWS; rr++) {
        m[rr] = -INFINITY; l[rr] = 0.f;
#pragma unroll
        for (int c = 0; c < NC; c++) acc[rr][c] = 0.f;
    }
    const int q_last = min(q0 + BQ, T) - 1;
    for (int k0 = 0; k0 <= q_last; k0 += BKV) {
        __syncthreads();  // the previous tile's readers are done (and Qs/docq are visible on the first pass)
        for (int e = threadIdx.x; e < BKV * D; e += blockDim.x) {
            int c = e / D, d = e % D, j = k0 + c;
            long g = (((long)b * T + j) * Hkv + kvh) * D + d;
            Ks[c * (D + 1) + d] = j < T ? p.k[g] : 0.f;
            Vs[c * D + d] = j < T ? p.v[g] : 0.f;
        }
        if (threadIdx.x < BKV) dock[threadIdx.x] = (doc && k0 + (int)threadIdx.x < T) ? doc[k0 + threadIdx.x] : 0;
        __syncthreads();
        if (doc && !tile_has_pair(docq, dock, q0, k0, T)) continue;
#pragma unroll
        for (int rr = 0; rr < ROWS; rr++) {
            const int r = warp * ROWS + rr, i = q0 + r;
            if (i > q_last) continue;  // warp-uniform
            const int j = k0 + lane;
            const bool ok = j <= i && (!doc || dock[lane] == docq[r]);
            const float s = ok ? dot_smem(Qs + r * D, Ks + lane * (D + 1), D) * scale : -INFINITY;
            const float mnew = fmaxf(m[rr], warp_max(s));
            if (mnew == -INFINITY) continue;  // no allowed key yet for this row (warp-uniform)
            const float pj = ok ? expf(s - mnew) : 0.f;
            const float alpha = expf(m[rr] - mnew);  // 0 on the first allowed tile (m = -inf)
            l[rr] = l[rr] * alpha + warp_sum(pj);
            m[rr] = mnew;
#pragma unroll
            for (int c = 0; c < NC; c++) acc[rr][c] *= alpha;
#pragma unroll 4
            for (int jj = 0; jj < BKV; jj++) {
                const float pb = __shfl_sync(0xffffffffu, pj, jj);
#pragma unroll
                for (int c = 0; c < NC; c++) {
                    const int d = lane + 32 * c;
                    if (d < D) acc[rr][c] = fmaf(pb, Vs[jj * D + d], acc[rr][c]);
                }
            }
        }
    }
#pragma unroll
    for (int rr = 0; rr < ROWS; rr++) {
        const int i = q0 + warp * ROWS + rr;
        if (i > q_last) continue;
        const float inv = 1.f / l[rr];  // l > 0: key i itself is always allowed
#pragma unroll
        for (int c = 0; c < NC; c++) {
            const int d = lane + 32 * c;
            if (d < D) p.out[(((long)b * T + i) * H + h) * D + d] = acc[rr][c] * inv;
        }
        if (lane == 0) p.lse[((long)b * H + h) * T + i] = m[rr] + logf(l[rr]);
    }
}

// delta (B, H, T) = rowsum(dout * out): one warp per (b, t, h).
__global__ void attn_delta_kernel(float* delta, const float* dout, const float* out, int B, int T, int H, int D) {
    const long row = (long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);  // = (b*T + t)*H + h
    const int lane = threadIdx.x & 31;
    if (row >= (long)B * T * H) return;
    float s = 0.f;
    for (int d = lane; d < D; d += 32) s = fmaf(dout[row * D + d], out[row * D + d], s);
    s = warp_sum(s);
    const int h = row % H, t = (row / H) % T, b = row / ((long)H * T);
    if (lane == 0) delta[((long)b * H + h) * T + t] = s;
}

// dq: like the forward, per query tile; p = exp(s - lse), ds = p * (dout.v - delta), dq = scale * sum ds k.
template <int NC>
__global__ void __launch_bounds__(THREADS) attn_dq_kernel(attention_backward_params p, const float* delta,
                                                           float scale) {
    extern __shared__ float sm[];
    const int D = p.D, T = p.T, H = p.H, Hkv = p.Hkv;
    float* Qs = sm;                    // (BQ, D)
    float* dOs = Qs + BQ * D;          // (BQ, D)
    float* Ks = dOs + BQ * D;          // (BKV, D+1)
    float* Vs = Ks + BKV * (D + 1);    // (BKV, D+1)
    float* lseq = Vs + BKV * (D + 1);  // (BQ)
    float* delq = lseq + BQ;           // (BQ)
    int* docq = (int*)(delq + BQ);     // (BQ)
    int* dock = docq + BQ;             // (BKV)
    const int b = blockIdx.z, h = blockIdx.y, q0 = blockIdx.x * BQ, kvh = h / (H / Hkv);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int32_t* doc = p.doc_ids ? p.doc_ids + (long)b * T : nullptr;

    for (int e = threadIdx.x; e < BQ * D; e += blockDim.x) {
        int r = e / D, d = e % D, i = q0 + r;
        long g = (((long)b * T + i) * H + h) * D + d;
        Qs[e] = i < T ? p.q[g] : 0.f;
        dOs[e] = i < T ? p.dout[g] : 0.f;
    }
    if (threadIdx.x < BQ) {
        int i = q0 + threadIdx.x;
        docq[threadIdx.x] = (doc && i < T) ? doc[i] : 0;
        lseq[threadIdx.x] = i < T ? p.lse[((long)b * H + h) * T + i] : 0.f;
        delq[threadIdx.x] = i < T ? delta[((long)b * H + h) * T + i] : 0.f;
    }
    float dq[ROWS][NC];
#pragma unroll
    for (int rr = 0; rr < ROWS; rr++)
#pragma unroll
        for (int c = 0; c < NC; c++) dq[rr][c] = 0.f;
    const int q_last = min(q0 + BQ, T) - 1;
    for (int k0 = 0; k0 <= q_last; k0 += BKV) {
        __syncthreads();
        for (int e = threadIdx.x; e < BKV * D; e += blockDim.x) {
            int c = e / D, d = e % D, j = k0 + c;
            long g = (((long)b * T + j) * Hkv + kvh) * D + d;
            Ks[c * (D + 1) + d] = j < T ? p.k[g] : 0.f;
            Vs[c * (D + 1) + d] = j < T ? p.v[g] : 0.f;
        }
        if (threadIdx.x < BKV) dock[threadIdx.x] = (doc && k0 + (int)threadIdx.x < T) ? doc[k0 + threadIdx.x] : 0;
        __syncthreads();
        if (doc && !tile_has_pair(docq, dock, q0, k0, T)) continue;
#pragma unroll
        for (int rr = 0; rr < ROWS; rr++) {
            const int r = warp * ROWS + rr, i = q0 + r;
            if (i > q_last) continue;
            const int j = k0 + lane;
            const bool ok = j <= i && (!doc || dock[lane] == docq[r]);
            float ds = 0.f;
            if (ok) {
                const float s = dot_smem(Qs + r * D, Ks + lane * (D + 1), D) * scale;
                const float dp = dot_smem(dOs + r * D, Vs + lane * (D + 1), D);
                ds = expf(s - lseq[r]) * (dp - delq[r]);
            }
#pragma unroll 4
            for (int jj = 0; jj < BKV; jj++) {
                const float db = __shfl_sync(0xffffffffu, ds, jj);
#pragma unroll
                for (int c = 0; c < NC; c++) {
                    const int d = lane + 32 * c;
                    if (d < D) dq[rr][c] = fmaf(db, Ks[jj * (D + 1) + d], dq[rr][c]);
                }
            }
        }
    }
#pragma unroll
    for (int rr = 0; rr < ROWS; rr++) {
        const int i = q0 + warp * ROWS + rr;
        if (i > q_last) continue;
#pragma unroll
        for (int c = 0; c < NC; c++) {
            const int d = lane + 32 * c;
            if (d < D) p.dq[(((long)b * T + i) * H + h) * D + d] = dq[rr][c] * scale;
        }
    }
}

// dk, dv per key tile of one kv head, summed over the H/Hkv query heads that read it and all queries i >= j.
// grid (ceil(T/BKV), Hkv, B).
template <int NC>
__global__ void __launch_bounds__(THREADS) attn_dkdv_kernel(attention_backward_params p, const float* delta,
                                                             float scale) {
    extern __shared__ float sm[];
    const int D = p.D, T = p.T, H = p.H, Hkv = p.Hkv, G = H / Hkv;
    float* Ks = sm;                     // (BKV, D)   rows read as broadcasts
    float* Vs = Ks + BKV * D;           // (BKV, D)
    float* Qs = Vs + BKV * D;           // (BQ, D+1)  lanes read different rows
    float* dOs = Qs + BQ * (D + 1);     // (BQ, D+1)
    float* lseq = dOs + BQ * (D + 1);   // (BQ)
    float* delq = lseq + BQ;            // (BQ)
    int* docq = (int*)(delq + BQ);      // (BQ)
    int* dock = docq + BQ;              // (BKV)
    const int b = blockIdx.z, kvh = blockIdx.y, k0 = blockIdx.x * BKV;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int32_t* doc = p.doc_ids ? p.doc_ids + (long)b * T : nullptr;

    for (int e = threadIdx.x; e < BKV * D; e += blockDim.x) {
        int c = e / D, d = e % D, j = k0 + c;
        long g = (((long)b * T + j) * Hkv + kvh) * D + d;
        Ks[e] = j < T ? p.k[g] : 0.f;
        Vs[e] = j < T ? p.v[g] : 0.f;
    }
    if (threadIdx.x < BKV) dock[threadIdx.x] = (doc && k0 + (int)threadIdx.x < T) ? doc[k0 + threadIdx.x] : 0;
    float dk[ROWS][NC], dv[ROWS][NC];
#pragma unroll
    for (int rr = 0; rr < ROWS; rr++)
#pragma unroll
        for (int c = 0; c < NC; c++) dk[rr][c] = dv[rr][c] = 0.f;
    for (int g = 0; g < G; g++) {
        const int h = kvh * G + g;
        for (int q0 = (k0 / BQ) * BQ; q0 < T; q0 += BQ) {
            __syncthreads();
            for (int e = threadIdx.x; e < BQ * D; e += blockDim.x) {
                int r = e / D, d = e % D, i = q0 + r;
                long gi = (((long)b * T + i) * H + h) * D + d;
                Qs[r * (D + 1) + d] = i < T ? p.q[gi] : 0.f;
                dOs[r * (D + 1) + d] = i < T ? p.dout[gi] : 0.f;
            }
            if (threadIdx.x < BQ) {
                int i = q0 + threadIdx.x;
                docq[threadIdx.x] = (doc && i < T) ? doc[i] : 0;
                lseq[threadIdx.x] = i < T ? p.lse[((long)b * H + h) * T + i] : 0.f;
                delq[threadIdx.x] = i < T ? delta[((long)b * H + h) * T + i] : 0.f;
            }
            __syncthreads();
            if (doc && !tile_has_pair(docq, dock, q0, k0, T)) continue;
#pragma unroll
            for (int rr = 0; rr < ROWS; rr++) {
                const int c = warp * ROWS + rr, j = k0 + c;
                if (j >= T) continue;  // warp-uniform
                const int i = q0 + lane;
                const bool ok = i < T && i >= j && (!doc || docq[lane] == dock[c]);
                float pv = 0.f, ds = 0.f;
                if (ok) {
                    const float s = dot_smem(Ks + c * D, Qs + lane * (D + 1), D) * scale;
                    const float dp = dot_smem(Vs + c * D, dOs + lane * (D + 1), D);
                    pv = expf(s - lseq[lane]);
                    ds = pv * (dp - delq[lane]);
                }
#pragma unroll 2
                for (int ii = 0; ii < BQ; ii++) {
                    const float pb = __shfl_sync(0xffffffffu, pv, ii), db = __shfl_sync(0xffffffffu, ds, ii);
#pragma unroll
                    for (int cc = 0; cc < NC; cc++) {
                        const int d = lane + 32 * cc;
                        if (d < D) {
                            dv[rr][cc] = fmaf(pb, dOs[ii * (D + 1) + d], dv[rr][cc]);
                            dk[rr][cc] = fmaf(db, Qs[ii * (D + 1) + d], dk[rr][cc]);
                        }
                    }
                }
            }
        }
    }
#pragma unroll
    for (int rr = 0; rr < ROWS; rr++) {
        const int j = k0 + warp * ROWS + rr;
        if (j >= T) continue;
#pragma unroll
        for (int c = 0; c < NC; c++) {
            const int d = lane + 32 * c;
            if (d < D) {
                long g = (((long)b * T + j) * Hkv + kvh) * D + d;
                p.dk[g] = dk[rr][c] * scale;
                p.dv[g] = dv[rr][c];
            }
        }
    }
}

template <typename Kern, typename... Args>
const char* launch_attn(Kern kernel, dim3 grid, size_t smem, cudaStream_t s, Args... args) {
    if (smem > 48 * 1024)  // above 48 KB a block must opt in (D = 256 needs ~130 KB: fine on sm_80/sm_90)
        CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    kernel<<<grid, THREADS, smem, s>>>(args...);
    CUDA_CHECK_LAUNCH();
    return nullptr;
}

// Head-dim buckets (compile time grows with each): D <= 64, <= 128, <= 256.
int head_chunks(int D) { return D <= 64 ? 2 : D <= 128 ? 4 : 8; }
}  // namespace

extern "C" const char* attention_forward_cuda(const attention_params* p, pyllm_stream stream) {
    if (p->D > 256 || p->D <= 0 || p->Hkv <= 0 || p->H % p->Hkv) return "attention_forward_cuda: bad H/Hkv/D";
    cudaStream_t s = STREAM(stream);
    const float scale = 1.f / sqrtf((float)p->D);
    const size_t smem = (size_t)(BQ * p->D + BKV * (p->D + 1) + BKV * p->D) * 4 + (BQ + BKV) * 4;
    dim3 grid(ceil_div(p->T, BQ), p->H, p->B);
    switch (head_chunks(p->D)) {
        case 2: return launch_attn(attn_fwd_kernel<2>, grid, smem, s, *p, scale);
        case 4: return launch_attn(attn_fwd_kernel<4>, grid, smem, s, *p, scale);
        default: return launch_attn(attn_fwd_kernel<8>, grid, smem, s, *p, scale);
    }
}

extern "C" const char* attention_backward_cuda(const attention_backward_params* p, float* delta,
                                               pyllm_stream stream) {
    if (p->D > 256 || p->D <= 0 || p->Hkv <= 0 || p->H % p->Hkv) return "attention_backward_cuda: bad H/Hkv/D";
    cudaStream_t s = STREAM(stream);
    const float scale = 1.f / sqrtf((float)p->D);
    const int D = p->D;
    const long rows = (long)p->B * p->T * p->H;
    attn_delta_kernel<<<ceil_div(rows, 8), 256, 0, s>>>(delta, p->dout, p->out, p->B, p->T, p->H, D);
    CUDA_CHECK_LAUNCH();
    const size_t smem_dq = (size_t)(2 * BQ * D + 2 * BKV * (D + 1) + 2 * BQ) * 4 + (BQ + BKV) * 4;
    const size_t smem_kv = (size_t)(2 * BKV * D + 2 * BQ * (D + 1) + 2 * BQ) * 4 + (BQ + BKV) * 4;
    dim3 gq(ceil_div(p->T, BQ), p->H, p->B), gk(ceil_div(p->T, BKV), p->Hkv, p->B);
    const char* err = nullptr;
    switch (head_chunks(D)) {
        case 2: err = launch_attn(attn_dq_kernel<2>, gq, smem_dq, s, *p, (const float*)delta, scale);
                if (!err) err = launch_attn(attn_dkdv_kernel<2>, gk, smem_kv, s, *p, (const float*)delta, scale); break;
        case 4: err = launch_attn(attn_dq_kernel<4>, gq, smem_dq, s, *p, (const float*)delta, scale);
                if (!err) err = launch_attn(attn_dkdv_kernel<4>, gk, smem_kv, s, *p, (const float*)delta, scale); break;
        default: err = launch_attn(attn_dq_kernel<8>, gq, smem_dq, s, *p, (const float*)delta, scale);
                 if (!err) err = launch_attn(attn_dkdv_kernel<8>, gk, smem_kv, s, *p, (const float*)delta, scale); break;
    }
    return err;
}
