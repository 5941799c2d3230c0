// sample.cu — batched token sampling, one 1024-thread block per row: greedy / temperature / top-k / min-p /
// top-p / allowed-token mask, counter RNG on (seed, row, step), log-prob of the chosen token under the full
// (unmasked, untruncated) temperature-scaled softmax, as the CPU kernel. No sort: every truncation is a threshold on
// q = exp(x - max) in (0, 1], found by bisection over q's float bits (non-negative floats order like their bit
// patterns), ~30 block reductions each. q is computed once into shared memory when the row fits (V <= ~56K floats
// on H100: 227 KB): each bisection pass then costs ~V/1024 shared loads per thread instead of a pass over the
// logits through L2 with an expf per element (H100, V = 50257: 0.31 -> 0.14 ms a call at B = 1, 0.83 -> 0.27 ms at
// B = 256; RESULTS.md, issue 8). One block per row leaves B = 1 on one SM: the next step is a row split over SMs.
#include <float.h>

#include "common.cuh"

namespace {
constexpr int THREADS = 1024;

__device__ __forceinline__ uint64_t splitmix64(uint64_t x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}
// Uniform in [0, 1) from (seed, row, step): the CPU kernel's hash in its order (impl_sample.h sample_uniform: seed,
// then step, then row; this kernel hashed row before step, so the same draw came from a swapped (row, step)) and its
// 53 bits. The inverse CDF below scales it in double; a target rounded up to the float total takes the last token.
__device__ __forceinline__ double uniform01(uint64_t seed, uint64_t row, uint64_t step) {
    uint64_t h = splitmix64(splitmix64(splitmix64(seed) ^ step) ^ row);
    return (double)(h >> 11) * 0x1.0p-53;
}

// x(v) = logit in raw units, -inf where masked. Scaled by 1/T only AFTER the max is subtracted, as the CPU kernel
// does: with T near 0 (1/T clamped to FLT_MAX), raw * (1/T) was +inf for every logit >= ~4, q = exp(inf - inf) NaN,
// no token kept, token -1 and a read of logits[row, -1].
struct Row {
    const float* lg; const uint8_t* mk; float invT; int V;
    __device__ float x(int v) const { return (mk && !mk[v]) ? -INFINITY : lg[v]; }
};

// Block sum in double: the log-prob's normaliser. A log-prob near 0 is -log(z) with z just above 1, and a float
// z (ulp 1.2e-7) left it 2e-5 off in relative terms (seen on an H100); the CPU kernel sums in double too.
__device__ double block_sum_d(double v, double* sh) {
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    if (lane == 0) sh[w] = v;
    __syncthreads();
    v = lane < nw ? sh[lane] : 0.0;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// q(v) = exp(x(v) - M): from the shared-memory copy when the row fits (CACHED), else recomputed from the logits.
template <bool CACHED>
__device__ __forceinline__ float q_at(const Row& r, const float* qs, float M, int v) {
    if constexpr (CACHED) return qs[v];
    else return expf((r.x(v) - M) * r.invT);
}
__device__ __forceinline__ bool kept(float q, uint32_t thr) { return q > 0.f && __float_as_uint(q) >= thr; }

// Sum over the row of q(v) where q >= thr (bits) and q > 0; or (COUNT) the number of such v. Four independent
// loads and sums per step: one block does a whole row, so the pass is bound by its issue rate and load latency.
template <bool CACHED, bool COUNT>
__device__ float kept_sum(const Row& r, const float* qs, float M, uint32_t thr, float* sh) {
    float s[4] = {0.f, 0.f, 0.f, 0.f};
    const int bd = blockDim.x;
    int v = threadIdx.x;
    for (; v + 3 * bd < r.V; v += 4 * bd) {
        float q[4];
#pragma unroll
        for (int u = 0; u < 4; u++) q[u] = q_at<CACHED>(r, qs, M, v + u * bd);
#pragma unroll
        for (int u = 0; u < 4; u++) s[u] += kept(q[u], thr) ? (COUNT ? 1.f : q[u]) : 0.f;
    }
    for (; v < r.V; v += bd) {
        float q = q_at<CACHED>(r, qs, M, v);
        s[0] += kept(q, thr) ? (COUNT ? 1.f : q) : 0.f;
    }
    return block_sum((s[0] + s[1]) + (s[2] + s[3]), sh);
}
}  // namespace

// CACHED: dynamic shared memory holds q of every token (V floats).
template <bool CACHED>
__global__ void __launch_bounds__(THREADS, 1) sample_kernel(sample_cuda_params p) {
    extern __shared__ float qs[];  // (V) when CACHED
    __shared__ float sh[32];
    __shared__ double sh_d[32];
    __shared__ float sh_v[32];
    __shared__ int sh_i[32];
    __shared__ int sh_tok;
    const int row = blockIdx.x, lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    const bool greedy = p.temperature <= 0.f;
    const Row r{p.logits + (long)row * p.V, p.mask ? p.mask + (long)row * p.V : nullptr,
                greedy ? 1.f : fminf(1.f / p.temperature, FLT_MAX), p.V};

    // The one pass over the logits in global memory, four loads in flight per thread: the max and argmax over the
    // allowed tokens (smallest index among equal maxima), and an online max and sum of exp over ALL tokens for
    // the log-prob's normaliser, in double (see block_sum_d). CACHED: x into shared memory.
    float mx = -INFINITY, m_all = -INFINITY;
    double z = 0.0;
    int arg = 0x7fffffff;
    auto visit = [&](int v, float x, bool allowed) {  // x raw: maxima in raw units, differences scaled by 1/T
        if (x > m_all) { z = z * exp(((double)m_all - (double)x) * r.invT) + 1.0; m_all = x; }
        else if (x > -INFINITY) z += (double)expf((x - m_all) * r.invT);
        if (allowed && x > mx) { mx = x; arg = v; }  // v ascends per thread: the first maximum wins
        if constexpr (CACHED) qs[v] = allowed ? x : -INFINITY;
    };
    {
        const int bd = blockDim.x;
        int v = threadIdx.x;
        for (; v + 3 * bd < p.V; v += 4 * bd) {
            float raw[4];
            bool ok[4];
#pragma unroll
            for (int u = 0; u < 4; u++) {
                raw[u] = r.lg[v + u * bd];
                ok[u] = !r.mk || r.mk[v + u * bd];
            }
#pragma unroll
            for (int u = 0; u < 4; u++) visit(v + u * bd, raw[u], ok[u]);
        }
        for (; v < p.V; v += bd) visit(v, r.lg[v], !r.mk || r.mk[v]);
    }
    const float M_all = block_max(m_all, sh);
    const double log_z = log(block_sum_d(m_all > -INFINITY ? z * exp(((double)m_all - (double)M_all) * r.invT) : 0.0,
                                         sh_d));
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
    // log-prob = (x - M_all) / T - log z: the difference first, so a log-prob near 0 keeps its relative accuracy.
    // top_k = 1 is the argmax, as greedy (by q, logits within ~1e-7 of the maximum round to q = 1 and tied).
    if (greedy || p.top_k == 1) {
        if (threadIdx.x == 0) {
            p.tokens[row] = arg;
            p.logprobs[row] = (float)((double)(r.lg[arg] - M_all) * r.invT - log_z);
        }
        return;
    }
    if constexpr (CACHED) {  // x -> q = exp((x - M) / T) in place (masked: -inf -> 0)
        for (int v = threadIdx.x; v < p.V; v += blockDim.x) qs[v] = expf((qs[v] - M) * r.invT);
        __syncthreads();
    }

    // Filters in the order of the CPU kernel and pyllm.ref (HF's): top-k, then top-p over what top-k kept, then min-p
    // (min-p first made top-p's mass that of the min-p set: a token ref keeps could never be drawn).
    uint32_t thr = 1;  // keep q >= thr (bits) and q > 0; 1 = the smallest positive float
    const uint32_t top = __float_as_uint(1.f) + 1;  // nothing has q >= top
    if (p.top_k > 0 && p.top_k < p.V) {
        // largest u with count(q >= u) >= k: the k-th largest q (ties at it are all kept)
        uint32_t lo = thr, hi = top;
        if (kept_sum<CACHED, true>(r, qs, M, lo, sh) >= (float)p.top_k) {
            while (hi - lo > 1) {
                uint32_t mid = lo + (hi - lo) / 2;
                if (kept_sum<CACHED, true>(r, qs, M, mid, sh) >= (float)p.top_k) lo = mid; else hi = mid;
            }
        }
        thr = lo;
    }
    if (p.top_p < 1.f) {
        // largest u with mass(q >= u) >= top_p * kept mass: exactly the tokens a sorted cumulative sum keeps
        // (a token stays iff the mass strictly above it is < top_p), with ties at the threshold all kept.
        const float target = p.top_p * kept_sum<CACHED, false>(r, qs, M, thr, sh);
        uint32_t lo = thr, hi = top;
        while (hi - lo > 1) {
            uint32_t mid = lo + (hi - lo) / 2;
            if (kept_sum<CACHED, false>(r, qs, M, mid, sh) >= target) lo = mid; else hi = mid;
        }
        thr = lo;
    }
    if (p.min_p > 0.f) thr = max(thr, __float_as_uint(fminf(p.min_p, 1.f)));  // q_max = 1, so p >= min_p p_max

    // Inverse CDF in index order: each thread owns a contiguous chunk; block exclusive scan of chunk sums.
    const int chunk = (p.V + blockDim.x - 1) / blockDim.x;
    const int v0 = min(p.V, (int)threadIdx.x * chunk), v1 = min(p.V, v0 + chunk);
    float local = 0.f;
    int last_kept = -1;
    for (int v = v0; v < v1; v++) {
        float q = q_at<CACHED>(r, qs, M, v);
        if (kept(q, thr)) { local += q; last_kept = v; }
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
    const float target = (float)(uniform01(p.seed, (uint64_t)row, p.step) * (double)total);
    if (local > 0.f && pre <= target && target < pre + local) {
        float c = pre;
        int tok = last_kept;  // rounding: fall back to the chunk's last kept token
        for (int v = v0; v < v1; v++) {
            float q = q_at<CACHED>(r, qs, M, v);
            if (kept(q, thr)) {
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
        p.tokens[row] = tok;  // -1 only if no token was kept (NaN logits): never read logits[row, -1]
        p.logprobs[row] = tok >= 0 ? (float)((double)(r.lg[tok] - M_all) * r.invT - log_z) : NAN;
    }
}

extern "C" const char* sample_cuda(const sample_cuda_params* p, pyllm_stream stream) {
    if (p->B <= 0 || p->V <= 0) return "sample_cuda: B and V must be > 0";
    int dev = 0, optin = 0;
    CUDA_CHECK(cudaGetDevice(&dev));
    CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    // static shared memory above is ~0.4 KB; keep 1 KB of the opt-in limit for it
    const size_t need = (size_t)p->V * sizeof(float);
    const bool cached = p->temperature > 0.f && need + 1024 <= (size_t)optin;
    if (cached) {
        if (need > 48 * 1024)
            CUDA_CHECK(cudaFuncSetAttribute(sample_kernel<true>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            (int)need));
        sample_kernel<true><<<p->B, THREADS, need, STREAM(stream)>>>(*p);
    } else {
        sample_kernel<false><<<p->B, THREADS, 0, STREAM(stream)>>>(*p);
    }
    CUDA_CHECK_LAUNCH();
    return nullptr;
}
