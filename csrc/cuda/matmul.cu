// matmul.cu — C (M, N) = A (M, K) . B (N, K)^T with fp32 accumulate: bf16 and fp16 on tensor cores (mma.sync
// m16n8k16, cp.async 3-stage pipeline, ldmatrix; one kernel templated on the 16-bit type), and a simple tiled FFMA kernel for fp32 (and for bf16 shapes
// the tensor-core kernel cannot take). No wgmma/TMA (sm_90a) path yet: on H100 this mma.sync kernel is the
// Ampere-style path (HMMA in SASS), expected below cuBLAS's HGMMA kernels; benchmarks/bench_cuda.py measures it.
#include "common.cuh"

// ---------------------------------------------------------------------------------------------------------------
// Simple kernel: 64x64 tile per 256-thread block, BK = 16, each thread 4x4 outputs interleaved by 16 so that
// shared-memory reads are conflict-free. ~1/4 of fp32 peak at best; it is the fallback, not the fast path.
template <typename T, typename TO>
__global__ void __launch_bounds__(256) matmul_simple_kernel(TO* __restrict__ C, const T* __restrict__ A,
                                                            const T* __restrict__ B, int M, int N, int K) {
    __shared__ float As[16][65];  // (BK, BM) k-major, +1 pad: the transposing store is conflict-free
    __shared__ float Bs[16][65];  // (BK, BN)
    int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
    int m0 = blockIdx.y * 64, n0 = blockIdx.x * 64;
    float acc[4][4] = {};
    for (int k0 = 0; k0 < K; k0 += 16) {
#pragma unroll
        for (int i = 0; i < 4; i++) {
            int e = threadIdx.x + i * 256, r = e >> 4, k = e & 15;  // 64 rows x 16 k
            As[k][r] = (m0 + r < M && k0 + k < K) ? to_f32(A[(long)(m0 + r) * K + k0 + k]) : 0.f;
            Bs[k][r] = (n0 + r < N && k0 + k < K) ? to_f32(B[(long)(n0 + r) * K + k0 + k]) : 0.f;
        }
        __syncthreads();
#pragma unroll
        for (int k = 0; k < 16; k++) {
            float a[4], b[4];
#pragma unroll
            for (int i = 0; i < 4; i++) { a[i] = As[k][ty + 16 * i]; b[i] = Bs[k][tx + 16 * i]; }
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int j = 0; j < 4; j++) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) {
            int m = m0 + ty + 16 * i, n = n0 + tx + 16 * j;
            if (m < M && n < N) C[(long)m * N + n] = (TO)acc[i][j];
        }
}

// ---------------------------------------------------------------------------------------------------------------
// Tensor-core kernel. Block tile 128x128x32, 8 warps as 2 (M) x 4 (N), warp tile 64x32 = 4 x 4 mma tiles of
// m16n8. Shared rows are 32 bf16 + 8 pad = 80 bytes: the 8 row addresses of each ldmatrix 8x8 land in 8
// distinct 16-byte bank groups, so ldmatrix and the 16-byte cp.async stores are conflict-free.
// Requires K % 8 == 0 and 16-byte aligned A, B (each 16-byte chunk is wholly inside or outside K); rows past
// M/N and chunks past K are zero-filled by cp.async (src-size 0), so any M, N work.
namespace {
constexpr int BM = 128, BN = 128, BK = 32, STAGES = 3, LDS = BK + 8;
constexpr int TC_SMEM = STAGES * (BM + BN) * LDS * 2;  // bytes: 61440

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
    return (uint32_t)__cvta_generic_to_shared(p);
}
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
                 "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(p)));
}
// One m16n8k16 MMA, fp32 accumulate; the 16-bit input type picks the PTX variant (same fragment layout).
__device__ __forceinline__ void mma_16(__nv_bfloat16, float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void mma_16(__half, float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void store_out(float* C, long i, float v) { C[i] = v; }
__device__ __forceinline__ void store_out(__nv_bfloat16* C, long i, float v) { C[i] = __float2bfloat16(v); }
__device__ __forceinline__ void store_out(__half* C, long i, float v) { C[i] = __float2half(v); }
}  // namespace

template <typename TI, typename TO>  // TI: __nv_bfloat16 or __half
__global__ void __launch_bounds__(256) matmul_tc_kernel(TO* __restrict__ C, const TI* __restrict__ A,
                                                        const TI* __restrict__ B, int M, int N, int K) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    TI* As = reinterpret_cast<TI*>(smem_raw);  // (STAGES, BM, LDS)
    TI* Bs = As + STAGES * BM * LDS;           // (STAGES, BN, LDS)
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp >> 2, wn = warp & 3;  // warp tile origin: (wm*64, wn*32)
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    const int KT = (K + BK - 1) / BK;

    // 128 rows x 4 chunks of 16 bytes per operand per stage = 512 chunks: 2 per thread per operand.
    auto load_tile = [&](int stage, int kt) {
        int k0 = kt * BK;
#pragma unroll
        for (int i = 0; i < 2; i++) {
            int c = tid + i * 256, r = c >> 2, kc = (c & 3) * 8;
            bool ka = k0 + kc < K;
            bool va = ka && m0 + r < M, vb = ka && n0 + r < N;
            // An invalid chunk still needs a legal address: point it at the operand's start (0 bytes are read).
            const TI* ga = va ? A + (long)(m0 + r) * K + k0 + kc : A;
            const TI* gb = vb ? B + (long)(n0 + r) * K + k0 + kc : B;
            cp_async16(As + (stage * BM + r) * LDS + kc, ga, va);
            cp_async16(Bs + (stage * BN + r) * LDS + kc, gb, vb);
        }
    };

    float acc[4][4][4];  // [m16 tile][n8 tile][fragment]
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int f = 0; f < 4; f++) acc[i][j][f] = 0.f;

#pragma unroll
    for (int s = 0; s < STAGES - 1; s++) {
        if (s < KT) load_tile(s, s);
        cp_async_commit();  // always commit (maybe empty) so the group count below stays exact
    }
    for (int kt = 0; kt < KT; kt++) {
        cp_async_wait<STAGES - 2>();  // tile kt has landed (for this thread's copies) ...
        __syncthreads();              // ... and for everyone's; and everyone finished computing tile kt-1
        int nk = kt + STAGES - 1;     // refill the stage that tile kt-1 used
        if (nk < KT) load_tile(nk % STAGES, nk);
        cp_async_commit();
        const TI* as = As + (kt % STAGES) * BM * LDS;
        const TI* bs = Bs + (kt % STAGES) * BN * LDS;
#pragma unroll
        for (int kk = 0; kk < BK; kk += 16) {
            uint32_t af[4][4], bf[2][4];
#pragma unroll
            for (int mt = 0; mt < 4; mt++)  // rows 0-15 at k 0 (lanes 0-15) and k 8 (lanes 16-31)
                ldmatrix_x4(af[mt], as + (wm * 64 + mt * 16 + (lane & 15)) * LDS + kk + (lane >> 4) * 8);
#pragma unroll
            for (int np = 0; np < 2; np++)  // n 0-7 / 8-15 at k 0 / 8: regs {n0-7 k0, n0-7 k8, n8-15 k0, n8-15 k8}
                ldmatrix_x4(bf[np], bs + (wn * 32 + np * 16 + (lane & 7) + ((lane >> 4) << 3)) * LDS + kk +
                                        ((lane >> 3) & 1) * 8);
#pragma unroll
            for (int mt = 0; mt < 4; mt++)
#pragma unroll
                for (int nt = 0; nt < 4; nt++)
                    mma_16(TI(), acc[mt][nt], af[mt], bf[nt >> 1][(nt & 1) * 2], bf[nt >> 1][(nt & 1) * 2 + 1]);
        }
    }
    cp_async_wait<0>();

    // Accumulator fragment: c0,c1 at (row g, cols 2t, 2t+1), c2,c3 at (row g+8, same cols); g = lane/4, t = lane%4.
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int mt = 0; mt < 4; mt++)
#pragma unroll
        for (int nt = 0; nt < 4; nt++)
#pragma unroll
            for (int f = 0; f < 4; f++) {
                int m = m0 + wm * 64 + mt * 16 + g + (f >> 1) * 8;
                int n = n0 + wn * 32 + nt * 8 + 2 * t + (f & 1);
                if (m < M && n < N) store_out(C, (long)m * N + n, acc[mt][nt][f]);
            }
}

// 16-bit operands: the tensor-core kernel when K % 8 == 0 and A, B are 16-byte aligned, else the simple one.
template <typename TI>
static const char* matmul_16(const matmul_cuda_params* p, cudaStream_t s) {
    const TI* a = (const TI*)p->a;  // (M, K)
    const TI* b = (const TI*)p->b;  // (N, K)
    bool tc = p->K % 8 == 0 && ((uintptr_t)a & 15) == 0 && ((uintptr_t)b & 15) == 0;
    if (!tc) {
        dim3 grid(ceil_div(p->N, 64), ceil_div(p->M, 64));
        if (p->out_f32)
            matmul_simple_kernel<TI, float><<<grid, 256, 0, s>>>((float*)p->c, a, b, p->M, p->N, p->K);
        else
            matmul_simple_kernel<TI, TI><<<grid, 256, 0, s>>>((TI*)p->c, a, b, p->M, p->N, p->K);
        CUDA_CHECK_LAUNCH();
        return nullptr;
    }
    dim3 grid(ceil_div(p->N, BN), ceil_div(p->M, BM));
    if (p->out_f32) {
        CUDA_CHECK(cudaFuncSetAttribute(matmul_tc_kernel<TI, float>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        TC_SMEM));
        matmul_tc_kernel<TI, float><<<grid, 256, TC_SMEM, s>>>((float*)p->c, a, b, p->M, p->N, p->K);
    } else {
        CUDA_CHECK(cudaFuncSetAttribute(matmul_tc_kernel<TI, TI>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        TC_SMEM));
        matmul_tc_kernel<TI, TI><<<grid, 256, TC_SMEM, s>>>((TI*)p->c, a, b, p->M, p->N, p->K);
    }
    CUDA_CHECK_LAUNCH();
    return nullptr;
}

extern "C" const char* matmul_cuda(const matmul_cuda_params* p, pyllm_stream stream) {
    cudaStream_t s = STREAM(stream);
    if (p->M <= 0 || p->N <= 0 || p->K <= 0) return "matmul_cuda: M, N, K must be > 0";
    if (p->dtype == 0) {
        dim3 grid(ceil_div(p->N, 64), ceil_div(p->M, 64));
        matmul_simple_kernel<float, float><<<grid, 256, 0, s>>>((float*)p->c, (const float*)p->a,
                                                                 (const float*)p->b, p->M, p->N, p->K);
        CUDA_CHECK_LAUNCH();
        return nullptr;
    }
    if (p->dtype == 1) return matmul_16<__nv_bfloat16>(p, s);
    if (p->dtype == 2) return matmul_16<__half>(p, s);
    return "matmul_cuda: dtype must be 0 (fp32), 1 (bf16) or 2 (fp16)";
}
