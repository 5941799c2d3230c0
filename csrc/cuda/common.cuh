// common.cuh — helpers shared by csrc/cuda/*.cu: error checking that returns a one-line message (never exits),
// warp/block reductions, bf16 conversion. Included by every .cu; compiled by setup.py with nvcc.
#pragma once
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>
#include <stdio.h>
#include <stdint.h>
#include "kernels_cuda.h"

// A failed CUDA call (or launch) makes the enclosing C-API function return a message; bindings.cpp raises it.
// The message lives in a thread-local buffer valid until the next failure on the same thread.
static inline const char* pyllm_cuda_error(cudaError_t e, const char* file, int line, const char* what) {
    static thread_local char buf[512];
    snprintf(buf, sizeof buf, "%s:%d: %s: %s (%s)", file, line, what, cudaGetErrorString(e), cudaGetErrorName(e));
    return buf;
}
#define CUDA_CHECK(call)                                                                        \
    do {                                                                                        \
        cudaError_t e_ = (call);                                                                \
        if (e_ != cudaSuccess) return pyllm_cuda_error(e_, __FILE__, __LINE__, #call);          \
    } while (0)
// After every <<<...>>>: launch-configuration errors show here; faults show at the caller's next sync.
#define CUDA_CHECK_LAUNCH() CUDA_CHECK(cudaGetLastError())
#define STREAM(s) (reinterpret_cast<cudaStream_t>(s))

static inline int ceil_div(long a, long b) { return (int)((a + b - 1) / b); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Block-wide reductions for blockDim.x a multiple of 32 (<= 1024). `sh` is 32 floats of shared memory; every
// thread gets the result. The leading __syncthreads lets callers reuse `sh` back to back.
__device__ __forceinline__ float block_sum(float v, float* sh) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) sh[w] = v;
    __syncthreads();
    v = lane < nw ? sh[lane] : 0.f;
    return warp_sum(v);
}
__device__ __forceinline__ float block_max(float v, float* sh) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) sh[w] = v;
    __syncthreads();
    v = lane < nw ? sh[lane] : -INFINITY;
    return warp_max(v);
}

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
