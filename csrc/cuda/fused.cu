// fused.cu — the small memory-bound ops in fp32: RMSNorm fwd/bwd, RoPE (rotate-half), SwiGLU fwd/bwd,
// cross-entropy fwd/bwd, AdamW. One pass over memory each; row ops use one block per row.
#include "common.cuh"

namespace {
__global__ void rmsnorm_fwd_kernel(rmsnorm_params p) {
    __shared__ float sh[32];
    const long row = blockIdx.x;
    const float* x = p.x + row * p.C;
    float ss = 0.f;
    for (int c = threadIdx.x; c < p.C; c += blockDim.x) ss = fmaf(x[c], x[c], ss);
    const float r = rsqrtf(block_sum(ss, sh) / p.C + p.eps);
    for (int c = threadIdx.x; c < p.C; c += blockDim.x) p.out[row * p.C + c] = x[c] * r * p.weight[c];
    if (p.rstd && threadIdx.x == 0) p.rstd[row] = r;
}

// dx = r w g - x r^3 / C * sum(w g x) per row.
__global__ void rmsnorm_bwd_dx_kernel(rmsnorm_backward_params p) {
    __shared__ float sh[32];
    const long row = blockIdx.x;
    const float *x = p.x + row * p.C, *g = p.dout + row * p.C;
    const float r = p.rstd[row];
    float s = 0.f;
    for (int c = threadIdx.x; c < p.C; c += blockDim.x) s = fmaf(p.weight[c] * g[c], x[c], s);
    const float k = block_sum(s, sh) * r * r * r / p.C;
    for (int c = threadIdx.x; c < p.C; c += blockDim.x) p.dx[row * p.C + c] = r * p.weight[c] * g[c] - x[c] * k;
}

// dw[c] = sum_rows g x r: block (32, 32) = 32 columns x 32 row lanes, reduced in shared memory (deterministic).
__global__ void rmsnorm_bwd_dw_kernel(rmsnorm_backward_params p) {
    __shared__ float part[32][33];
    const int c = blockIdx.x * 32 + threadIdx.x;
    float s = 0.f;
    if (c < p.C)
        for (long n = threadIdx.y; n < p.N; n += 32) s = fmaf(p.dout[n * p.C + c] * p.x[n * p.C + c], p.rstd[n], s);
    part[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && c < p.C) {
        float t = 0.f;
        for (int i = 0; i < 32; i++) t += part[i][threadIdx.x];
        p.dweight[c] = t;
    }
}

__global__ void rope_kernel(rope_cuda_params p) {
    const int half = p.D / 2;
    const long n = (long)p.B * p.T * p.H * half;
    for (long e = blockIdx.x * (long)blockDim.x + threadIdx.x; e < n; e += (long)gridDim.x * blockDim.x) {
        const int d = e % half;
        const long bth = e / half;               // (b*T + t)*H + h
        const int t = (bth / p.H) % p.T;
        const float c = p.cos[(long)t * half + d], s = p.inverse ? -p.sin[(long)t * half + d] : p.sin[(long)t * half + d];
        const float x1 = p.x[bth * p.D + d], x2 = p.x[bth * p.D + half + d];
        p.out[bth * p.D + d] = x1 * c - x2 * s;
        p.out[bth * p.D + half + d] = x2 * c + x1 * s;
    }
}

__global__ void swiglu_kernel(swiglu_cuda_params p) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < p.n; i += (long)gridDim.x * blockDim.x) {
        const float g = p.gate[i], u = p.up[i], sg = 1.f / (1.f + expf(-g));
        if (!p.dout) {
            p.out[i] = g * sg * u;
        } else {
            const float d = p.dout[i];
            p.dgate[i] = d * u * sg * (1.f + g * (1.f - sg));
            p.dup[i] = d * g * sg;
        }
    }
}

__global__ void cross_entropy_kernel(cross_entropy_cuda_params p) {
    __shared__ float sh[32];
    const long row = blockIdx.x;
    const float* x = p.logits + row * p.V;
    const long t = p.targets[row];
    float* dx = p.dlogits ? p.dlogits + row * p.V : nullptr;
    if (t == p.ignore_index) {
        if (threadIdx.x == 0) p.losses[row] = 0.f;
        if (dx) for (int v = threadIdx.x; v < p.V; v += blockDim.x) dx[v] = 0.f;
        return;
    }
    float m = -INFINITY;
    for (int v = threadIdx.x; v < p.V; v += blockDim.x) m = fmaxf(m, x[v]);
    m = block_max(m, sh);
    float z = 0.f;
    for (int v = threadIdx.x; v < p.V; v += blockDim.x) z += expf(x[v] - m);
    z = block_sum(z, sh);
    const bool in_range = t >= 0 && t < p.V;  // ops.py validates; never read out of bounds regardless
    if (threadIdx.x == 0) p.losses[row] = in_range ? m + logf(z) - x[t] : NAN;
    if (dx) {
        const float inv = 1.f / z;
        for (int v = threadIdx.x; v < p.V; v += blockDim.x)
            dx[v] = (expf(x[v] - m) * inv - (v == t ? 1.f : 0.f)) * p.scale;
    }
}

__global__ void adamw_kernel(adamw_cuda_params p, float bc1, float bc2) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < p.n; i += (long)gridDim.x * blockDim.x) {
        const float g = p.grad[i];
        float w = p.param[i] * (1.f - p.lr * p.weight_decay);
        const float m = p.beta1 * p.m[i] + (1.f - p.beta1) * g;
        const float v = p.beta2 * p.v[i] + (1.f - p.beta2) * g * g;
        p.m[i] = m;
        p.v[i] = v;
        p.param[i] = w - p.lr * (m / bc1) / (sqrtf(v / bc2) + p.eps);
    }
}

int grid_for(long n) { long g = (n + 255) / 256; return (int)(g < 1 ? 1 : g > 65535L * 8 ? 65535L * 8 : g); }
}  // namespace

extern "C" const char* rmsnorm_forward_cuda(const rmsnorm_params* p, pyllm_stream stream) {
    rmsnorm_fwd_kernel<<<p->N, 256, 0, STREAM(stream)>>>(*p);
    CUDA_CHECK_LAUNCH();
    return nullptr;
}

extern "C" const char* rmsnorm_backward_cuda(const rmsnorm_backward_params* p, pyllm_stream stream) {
    rmsnorm_bwd_dx_kernel<<<p->N, 256, 0, STREAM(stream)>>>(*p);
    CUDA_CHECK_LAUNCH();
    rmsnorm_bwd_dw_kernel<<<ceil_div(p->C, 32), dim3(32, 32), 0, STREAM(stream)>>>(*p);
    CUDA_CHECK_LAUNCH();
    return nullptr;
}

extern "C" const char* rope_cuda(const rope_cuda_params* p, pyllm_stream stream) {
    if (p->D % 2) return "rope_cuda: head dim must be even";
    rope_kernel<<<grid_for((long)p->B * p->T * p->H * (p->D / 2)), 256, 0, STREAM(stream)>>>(*p);
    CUDA_CHECK_LAUNCH();
    return nullptr;
}

extern "C" const char* swiglu_cuda(const swiglu_cuda_params* p, pyllm_stream stream) {
    swiglu_kernel<<<grid_for(p->n), 256, 0, STREAM(stream)>>>(*p);
    CUDA_CHECK_LAUNCH();
    return nullptr;
}

extern "C" const char* cross_entropy_cuda(const cross_entropy_cuda_params* p, pyllm_stream stream) {
    cross_entropy_kernel<<<p->N, 512, 0, STREAM(stream)>>>(*p);
    CUDA_CHECK_LAUNCH();
    return nullptr;
}

extern "C" const char* adamw_cuda(const adamw_cuda_params* p, pyllm_stream stream) {
    const float bc1 = 1.f - powf(p->beta1, (float)p->step), bc2 = 1.f - powf(p->beta2, (float)p->step);
    adamw_kernel<<<grid_for(p->n), 256, 0, STREAM(stream)>>>(*p, bc1, bc2);
    CUDA_CHECK_LAUNCH();
    return nullptr;
}
