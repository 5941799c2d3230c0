// decode.cu — one query per sequence against a KV cache (fp32), split-K over the context: each block reduces a
// chunk of positions to a partial (max, sum, acc[D]) in caller scratch, then one warp per (b, h) merges them.
// Simple: a warp takes one position at a time (lanes along D, 128-byte coalesced rows); not yet tuned.
// With n_ctx_dev the context length is read on the device (p->n_ctx is then its upper bound, which fixes the grid
// and the scratch size): a decode step whose position lives in device memory can be captured in a CUDA graph.
#include "common.cuh"

namespace {
constexpr int WARPS = 4, MAX_NC = 8;  // D <= 256

// Splits chosen from the shape alone (so decode_attention_cuda_ws_floats agrees): ~512 blocks in flight,
// at least 32 positions per split, at most 64 splits.
int n_splits(const decode_attention_params* p) {
    long bh = (long)p->B * p->H;
    long want = (512 + bh - 1) / bh;
    long most = (p->n_ctx + 31) / 32;
    long n = want < most ? want : most;
    return (int)(n < 1 ? 1 : n > 64 ? 64 : n);
}

// grid (B*H, n_split), 128 threads. ws[(bh*n_split + s)*(D+2) + ...] = {m, l, acc[D]} (acc not normalised).
__global__ void __launch_bounds__(WARPS * 32) decode_partial_kernel(decode_attention_params p,
                                                                    const long long* n_ctx_dev, float* ws,
                                                                    int n_split, float scale) {
    __shared__ float sm_m[WARPS], sm_l[WARPS], sm_acc[WARPS][MAX_NC * 32];
    const int bh = blockIdx.x, split = blockIdx.y, b = bh / p.H, h = bh % p.H, kvh = h / (p.H / p.Hkv);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, D = p.D;
    // clamped to [1, bound]: a bad device value must not read past the cache (the host checked the bound)
    const int n_ctx = n_ctx_dev ? (int)min(max(*n_ctx_dev, 1LL), (long long)p.n_ctx) : p.n_ctx;
    const int chunk = (n_ctx + n_split - 1) / n_split;
    const int t0 = split * chunk, t1 = min(n_ctx, t0 + chunk);
    float q[MAX_NC], acc[MAX_NC];
#pragma unroll
    for (int c = 0; c < MAX_NC; c++) {
        int d = lane + 32 * c;
        q[c] = d < D ? p.q[(long)bh * D + d] * scale : 0.f;
        acc[c] = 0.f;
    }
    float m = -INFINITY, l = 0.f;
    for (int t = t0 + warp; t < t1; t += WARPS) {
        const float* kr = p.k_cache + (long)b * p.ld_b + (long)t * p.ld_t + (long)kvh * D;
        const float* vr = p.v_cache + (long)b * p.ld_b + (long)t * p.ld_t + (long)kvh * D;
        float s = 0.f;
#pragma unroll
        for (int c = 0; c < MAX_NC; c++) {
            int d = lane + 32 * c;
            if (d < D) s = fmaf(q[c], kr[d], s);
        }
        s = warp_sum(s);
        const float mnew = fmaxf(m, s), alpha = expf(m - mnew), pj = expf(s - mnew);
        l = l * alpha + pj;
#pragma unroll
        for (int c = 0; c < MAX_NC; c++) {
            int d = lane + 32 * c;
            acc[c] = acc[c] * alpha + (d < D ? pj * vr[d] : 0.f);
        }
        m = mnew;
    }
    if (lane == 0) { sm_m[warp] = m; sm_l[warp] = l; }
#pragma unroll
    for (int c = 0; c < MAX_NC; c++) sm_acc[warp][lane + 32 * c] = acc[c];
    __syncthreads();
    if (warp != 0) return;
    float M = -INFINITY;
    for (int w = 0; w < WARPS; w++) M = fmaxf(M, sm_m[w]);
    float* o = ws + ((long)bh * n_split + split) * (D + 2);
    float L = 0.f;
    for (int w = 0; w < WARPS; w++) L += M == -INFINITY ? 0.f : sm_l[w] * expf(sm_m[w] - M);
    for (int d = lane; d < D; d += 32) {
        float a = 0.f;
        for (int w = 0; w < WARPS; w++) a += M == -INFINITY ? 0.f : sm_acc[w][d] * expf(sm_m[w] - M);
        o[2 + d] = a;
    }
    if (lane == 0) { o[0] = M; o[1] = L; }  // an empty split leaves M = -inf, L = 0: weight 0 in the merge
}

// One warp per (b, h): out = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s.
__global__ void decode_merge_kernel(float* out, const float* ws, int BH, int n_split, int D) {
    const int bh = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (bh >= BH) return;
    const float* w = ws + (long)bh * n_split * (D + 2);
    float M = -INFINITY;
    for (int s = 0; s < n_split; s++) M = fmaxf(M, w[s * (D + 2)]);
    float L = 0.f;
    for (int s = 0; s < n_split; s++) {
        float ms = w[s * (D + 2)];
        if (ms != -INFINITY) L += w[s * (D + 2) + 1] * expf(ms - M);
    }
    for (int d = lane; d < D; d += 32) {
        float a = 0.f;
        for (int s = 0; s < n_split; s++) {
            float ms = w[s * (D + 2)];
            if (ms != -INFINITY) a += w[s * (D + 2) + 2 + d] * expf(ms - M);
        }
        out[(long)bh * D + d] = a / L;  // L > 0: n_ctx >= 1 so some split saw a position
    }
}
}  // namespace

extern "C" long decode_attention_cuda_ws_floats(const decode_attention_params* p) {
    return (long)p->B * p->H * n_splits(p) * (p->D + 2);
}

extern "C" const char* decode_attention_cuda(const decode_attention_params* p, const long long* n_ctx_dev, float* ws,
                                             pyllm_stream stream) {
    if (p->D > 256 || p->D <= 0 || p->Hkv <= 0 || p->H % p->Hkv || p->n_ctx < 1)
        return "decode_attention_cuda: bad H/Hkv/D/n_ctx";
    cudaStream_t s = STREAM(stream);
    const int ns = n_splits(p), BH = p->B * p->H;
    decode_partial_kernel<<<dim3(BH, ns), WARPS * 32, 0, s>>>(*p, n_ctx_dev, ws, ns, 1.f / sqrtf((float)p->D));
    CUDA_CHECK_LAUNCH();
    decode_merge_kernel<<<ceil_div(BH, 4), 128, 0, s>>>(p->out, ws, BH, ns, p->D);
    CUDA_CHECK_LAUNCH();
    return nullptr;
}
