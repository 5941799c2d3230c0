// sample.cu — batched token sampling, one 1024-thread block per row: greedy / temperature / top-k / min-p /
// top-p / allowed-token mask, counter RNG on (seed, row, step), log-prob of the chosen token under the full
// temperature-scaled softmax. No sort: every truncation is a threshold on q = exp(x - max) in (0, 1], found by
// bisection over q's float bits (non-negative floats order like their bit patterns), ~30 block reductions each.
// The logits row is re-read from global memory (L1/L2) on every pass; caching it in shared memory is the
// obvious next step for batch 1 and is left until it can be measured.
#include "common.cuh"

namespace {
constexpr int THREADS = 1024;

__device__ __forceinline__ uint64_t splitmix64(uint64_t x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}
// Uniform in [0, 1) from (seed, row, step): 24 random bits, so u * S never rounds up to S.
__device__ __forceinline__ float uniform01(uint64_t seed, uint64_t row, uint64_t step) {
    uint64_t h = splitmix64(splitmix64(splitmix64(seed) ^ row) ^ step);
    return (float)(h >> 40) * (1.0f / 16777216.0f);
}

struct Row {
    const float* lg; const uint8_t* mk; float invT; int V;
    __device__ float x(int v) const { return (mk && !mk[v]) ? -INFINITY : lg[v] * invT; }
};

// Sum over the row of q(v) = exp(x(v) - M) where q >= thr (bits) and q > 0; or the count of such v.
__device__ float kept_sum(const Row& r, float M, uint32_t thr, bool count, float* sh) {
    float s = 0.f;
    for (int v = threadIdx.x; v < r.V; v += blockDim.x) {
        float q = expf(r.x(v) - M);
        if (q > 0.f && __float_as_uint(q) >= thr) s += count ? 1.f : q;
    }
    return block_sum(s, sh);
}
}  // namespace

__global__ void __launch_bounds__(THREADS) sample_kernel(sample_cuda_params p) {
    __shared__ float sh[32];
    __shared__ float sh_v[32];
    __shared__ int sh_i[32];
    __shared__ int sh_tok;
    const int row = blockIdx.x, lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    const bool greedy = p.temperature <= 0.f;
    const Row r{p.logits + (long)row * p.V, p.mask ? p.mask + (long)row * p.V : nullptr,
                greedy ? 1.f : 1.f / p.temperature, p.V};

    // max and argmax (smallest index among equal maxima)
    float mx = -INFINITY;
    int arg = 0x7fffffff;
    for (int v = threadIdx.x; v < p.V; v += blockDim.x) {
        float x = r.x(v);
        if (x > mx) { mx = x; arg = v; }  // v ascends per thread: the first maximum wins
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, mx, o);
        int oi = __shfl_xor_sync(0xffffffffu, arg, o);
        if (ov > mx || (ov == mx && oi < arg)) { mx = ov; arg = oi; }
    }
    if (lane == 0) { sh_v[w] = mx; sh_i[w] = arg; }
    __syncthreads();
    mx = lane < nw ? sh_v[lane] : -INFINITY;
    arg = lane < nw ? sh_i[lane] : 0x7fffffff;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, mx, o);
        int oi = __shfl_xor_sync(0xffffffffu, arg, o);
        if (ov > mx || (ov == mx && oi < arg)) { mx = ov; arg = oi; }
    }
    const float M = mx;
    if (M == -INFINITY) {  // every token masked out: ops.py rejects this first; never read out of bounds here
        if (threadIdx.x == 0) { p.tokens[row] = -1; p.logprobs[row] = NAN; }
        return;
    }
    float z = 0.f;
    for (int v = threadIdx.x; v < p.V; v += blockDim.x) z += expf(r.x(v) - M);
    const float logZ = M + logf(block_sum(z, sh));
    if (greedy) {
        if (threadIdx.x == 0) { p.tokens[row] = arg; p.logprobs[row] = r.x(arg) - logZ; }
        return;
    }

    uint32_t thr = 1;  // keep q >= thr (bits) and q > 0; 1 = the smallest positive float
    if (p.min_p > 0.f) thr = max(thr, __float_as_uint(fminf(p.min_p, 1.f)));  // q_max = 1, so p >= min_p p_max
    const uint32_t top = __float_as_uint(1.f) + 1;  // nothing has q >= top
    if (p.top_k > 0 && p.top_k < p.V) {
        // largest u with count(q >= u) >= k: the k-th largest q (ties at it are all kept)
        uint32_t lo = thr, hi = top;
        if (kept_sum(r, M, lo, true, sh) >= (float)p.top_k) {
            while (hi - lo > 1) {
                uint32_t mid = lo + (hi - lo) / 2;
                if (kept_sum(r, M, mid, true, sh) >= (float)p.top_k) lo = mid; else hi = mid;
            }
        }
        thr = lo;
    }
    if (p.top_p < 1.f) {
        // largest u with mass(q >= u) >= top_p * kept mass: exactly the tokens a sorted cumulative sum keeps
        // (a token stays iff the mass strictly above it is < top_p), with ties at the threshold all kept.
        const float target = p.top_p * kept_sum(r, M, thr, false, sh);
        uint32_t lo = thr, hi = top;
        while (hi - lo > 1) {
            uint32_t mid = lo + (hi - lo) / 2;
            if (kept_sum(r, M, mid, false, sh) >= target) lo = mid; else hi = mid;
        }
        thr = lo;
    }

    // Inverse CDF in index order: each thread owns a contiguous chunk; block exclusive scan of chunk sums.
    const int chunk = (p.V + blockDim.x - 1) / blockDim.x;
    const int v0 = min(p.V, (int)threadIdx.x * chunk), v1 = min(p.V, v0 + chunk);
    float local = 0.f;
    int last_kept = -1;
    for (int v = v0; v < v1; v++) {
        float q = expf(r.x(v) - M);
        if (q > 0.f && __float_as_uint(q) >= thr) { local += q; last_kept = v; }
    }
    float incl = local;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        float t = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += t;
    }
    __syncthreads();
    if (lane == 31) sh[w] = incl;
    if (threadIdx.x == 0) sh_tok = 0x7fffffff;
    __syncthreads();
    if (w == 0) {
        float t = lane < nw ? sh[lane] : 0.f, ti = t;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            float u = __shfl_up_sync(0xffffffffu, ti, o);
            if (lane >= o) ti += u;
        }
        if (lane < nw) sh_v[lane] = ti;  // inclusive scan of warp totals
    }
    __syncthreads();
    const float total = sh_v[nw - 1];
    const float pre = incl - local + (w > 0 ? sh_v[w - 1] : 0.f);
    const float target = uniform01(p.seed, (uint64_t)row, p.step) * total;
    if (local > 0.f && pre <= target && target < pre + local) {
        float c = pre;
        int tok = last_kept;  // rounding: fall back to the chunk's last kept token
        for (int v = v0; v < v1; v++) {
            float q = expf(r.x(v) - M);
            if (q > 0.f && __float_as_uint(q) >= thr) {
                c += q;
                if (target < c) { tok = v; break; }
            }
        }
        atomicMin(&sh_tok, tok);
    }
    // If rounding put target past every chunk (target >= the float-summed total), take the last kept token.
    int lk = last_kept;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) lk = max(lk, __shfl_xor_sync(0xffffffffu, lk, o));
    __syncthreads();
    if (lane == 0) sh_i[w] = lk;
    __syncthreads();
    if (threadIdx.x == 0) {
        int tok = sh_tok;
        if (tok == 0x7fffffff) {
            tok = -1;
            for (int i = 0; i < nw; i++) tok = max(tok, sh_i[i]);
        }
        p.tokens[row] = tok;
        p.logprobs[row] = r.x(tok) - logZ;
    }
}

extern "C" const char* sample_cuda(const sample_cuda_params* p, pyllm_stream stream) {
    if (p->B <= 0 || p->V <= 0) return "sample_cuda: B and V must be > 0";
    sample_kernel<<<p->B, THREADS, 0, STREAM(stream)>>>(*p);
    CUDA_CHECK_LAUNCH();
    return nullptr;
}
