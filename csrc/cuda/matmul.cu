// matmul.cu — C (M, N) = A (M, K) . B (N, K)^T with fp32 accumulate: bf16 and fp16 on tensor cores (mma.sync
// m16n8k16, cp.async 3-stage pipeline, ldmatrix; one kernel templated on the 16-bit type), a simple tiled FFMA
// kernel for fp32 (and for 16-bit shapes the tensor-core kernels cannot take), and a GEMV for M <= 16. On sm_90
// devices with an sm_90a build, 16-bit operands go to a TMA + wgmma kernel (HGMMA in SASS; 0.62-0.96x of cuBLAS on
// an H100, RESULTS.md issue 8) and the mma.sync kernel (HMMA) is the sm_80 path and the fallback.
// benchmarks/cuda_lab/gemm_harness.cu checks and times this file against cuBLAS outside the package.
#include "common.cuh"
#include <cuda.h>          // CUtensorMap (types only: the encoder comes through cudaGetDriverEntryPointByVersion)
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled
#include <type_traits>

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

// ---------------------------------------------------------------------------------------------------------------
// sm_90a kernel (H100): warp-specialized, TMA + wgmma. Block tile 128 x BN (BN = 256, 192 or 128) x 64, 384
// threads = 3 warpgroups: warpgroup 0 is the producer (one thread issues cp.async.bulk.tensor loads of the A and B
// K-slices into a STAGES-deep ring, completion counted on a "full" mbarrier per stage), warpgroups 1 and 2 are
// consumers, each owning 64 rows of the tile and issuing wgmma.mma_async m64nBNk16 from shared memory into fp32
// registers (BN / 2 per thread), then releasing the stage on its "empty" mbarrier. The grid is persistent (one
// block per SM, tiles strided by the grid): the producer runs ahead into the next tile while the consumers store
// this one, which matters at K = 768 where a tile is only 12 K-slices. Shared tiles are 64 elements
// (128 bytes) wide in K, written by TMA with the 128-byte swizzle that the wgmma descriptors name, so neither side
// has bank conflicts. TMA zero-fills rows past M / N and columns past K, so any M, N work; the tensor map needs
// K % 8 == 0 and 16-byte aligned A, B (row stride a multiple of 16 bytes). setmaxnreg moves registers from the
// producer (40) to the consumers (232). The body exists only in the sm_90a pass; elsewhere the kernel is empty
// and matmul_sm90() never launches it (it checks the device and that an sm_90 cubin is present).
// Measured on an H100 (the development version of benchmarks/cuda_lab/gemm_harness.cu, cuBLAS in the same run;
// checked against cuBLAS at 13 shapes, bf16/fp16 in, 16-bit/fp32 out): 4096^3 699 TFLOP/s = 0.89x cuBLAS (the
// mma.sync kernel: 264, 0.34x); (M, N, K) = (8192, 768, 3072) 0.85x; the K = 768 shapes 0.61-0.74x. A fit of tile
// time against K (768 vs 4096) puts ~7 us per tile outside the mainloop at K = 768: the direct fragment stores of
// the epilogue are the suspect (a staged, coalesced epilogue was written in that harness but never measured).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define PYLLM_SM90A 1
#endif

namespace sm90 {
constexpr int BM = 128, BK = 64, THREADS = 384;
constexpr int GROUP_M = 8;  // row tiles per group of the tile order (tile_origin)
// ~192-200 KB of ring per block (one block per SM)
__host__ __device__ constexpr int stages(int bn) { return bn == 256 ? 4 : bn == 192 ? 5 : 6; }
__host__ __device__ constexpr int stage_bytes(int bn) { return (BM + bn) * BK * 2; }
__host__ __device__ constexpr int smem_bytes(int bn) { return stages(bn) * stage_bytes(bn) + 1024; }  // +1024: align

#ifdef PYLLM_SM90A
__device__ __forceinline__ void mbar_init(uint64_t* bar, int count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(count));
}
__device__ __forceinline__ void mbar_expect_tx(uint64_t* bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(bytes)
                 : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_u32(bar)) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, int parity) {  // until phase `parity` has completed
    uint32_t done;
    do {
        asm volatile(
            "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
            : "=r"(done)
            : "r"(smem_u32(bar)), "r"(parity)
            : "memory");
    } while (!done);
}
// 2-D tile load: box at (c0 = k, c1 = row) of the tensor map into shared `dst`, bytes counted on `bar`.
__device__ __forceinline__ void tma_load_2d(void* dst, const CUtensorMap* map, int c0, int c1, uint64_t* bar) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], "
        "[%4];\n" ::"r"(smem_u32(dst)),
        "l"((uint64_t)map), "r"(c0), "r"(c1), "r"(smem_u32(bar))
        : "memory");
}
// Shared-memory matrix descriptor for a K-major tile of 128-byte rows with the 128-byte swizzle: start address,
// leading offset unused (1), stride offset 1024 bytes (8 rows = one swizzle atom), layout 1 = SWIZZLE_128B.
// Advancing K by 16 elements inside the 128-byte row adds 32 bytes, i.e. +2 to the encoded address.
__device__ __forceinline__ uint64_t make_desc(const void* p) {
    uint64_t a = smem_u32(p);
    return ((a & 0x3FFFF) >> 4) | (1ull << 16) | (64ull << 32) | (1ull << 62);
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Keeps the compiler from moving accumulator accesses across wgmma issue / wait.
__device__ __forceinline__ void fence_reg(float& r) { asm volatile("" : "+f"(r)::"memory"); }

#define F8(d, i) "+f"(d[i + 0]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), \
                 "+f"(d[i + 6]), "+f"(d[i + 7])
#define WG_REGS_64 \
    "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
    "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
    "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
    "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define WG_OPS_64(d) \
    F8(d, 0), F8(d, 8), F8(d, 16), F8(d, 24), F8(d, 32), F8(d, 40), F8(d, 48), F8(d, 56)
#define WG_REGS_96 \
    "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
    "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
    "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
    "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, " \
    "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, " \
    "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95"
#define WG_OPS_96(d) \
    F8(d, 0), F8(d, 8), F8(d, 16), F8(d, 24), F8(d, 32), F8(d, 40), F8(d, 48), F8(d, 56), \
    F8(d, 64), F8(d, 72), F8(d, 80), F8(d, 88)
#define WG_REGS_128 \
    "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
    "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
    "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
    "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, " \
    "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, " \
    "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, " \
    "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, " \
    "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
#define WG_OPS_128(d) \
    F8(d, 0), F8(d, 8), F8(d, 16), F8(d, 24), F8(d, 32), F8(d, 40), F8(d, 48), F8(d, 56), \
    F8(d, 64), F8(d, 72), F8(d, 80), F8(d, 88), F8(d, 96), F8(d, 104), F8(d, 112), F8(d, 120)
// D (64, N) += A (64, 16) . B (N, 16)^T, both from shared memory (K-major, no transpose), fp32 accumulate.
// scale-d is a predicate operand (true: accumulate into D), set from register operand IS.
#define PYLLM_WGMMA(NN, NR, IA, IB, IS, TY, TYS)                                                                  \
    __device__ __forceinline__ void wgmma(TY, float (&d)[NR], uint64_t da, uint64_t db) {                        \
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" #IS ", 0;\n"                                             \
                     "wgmma.mma_async.sync.aligned.m64n" #NN "k16.f32." TYS "." TYS " {" WG_REGS_##NR "}, %" #IA    \
                     ", %" #IB ", p, 1, 1, 0, 0;\n}\n"                                                              \
                     : WG_OPS_##NR(d)                                                                             \
                     : "l"(da), "l"(db), "r"(1));                                                                 \
    }
PYLLM_WGMMA(256, 128, 128, 129, 130, __nv_bfloat16, "bf16")
PYLLM_WGMMA(192, 96, 96, 97, 98, __nv_bfloat16, "bf16")
PYLLM_WGMMA(128, 64, 64, 65, 66, __nv_bfloat16, "bf16")
PYLLM_WGMMA(256, 128, 128, 129, 130, __half, "f16")
PYLLM_WGMMA(192, 96, 96, 97, 98, __half, "f16")
PYLLM_WGMMA(128, 64, 64, 65, 66, __half, "f16")
#undef PYLLM_WGMMA
#undef F8

__device__ __forceinline__ void store_pair(float* C, long i, float x, float y) {
    *reinterpret_cast<float2*>(C + i) = make_float2(x, y);
}
__device__ __forceinline__ void store_pair(__nv_bfloat16* C, long i, float x, float y) {
    *reinterpret_cast<__nv_bfloat162*>(C + i) = __floats2bfloat162_rn(x, y);
}
__device__ __forceinline__ void store_pair(__half* C, long i, float x, float y) {
    *reinterpret_cast<__half2*>(C + i) = __floats2half2_rn(x, y);
}

// Epilogue for one m64nN accumulator. Layout (per warp, like mma.sync m16n8): acc[4j + 2h + e] is at row
// 16w + g + 8h, column 8j + 2t + e of the warpgroup's 64 x N block (g = lane / 4, t = lane % 4); the caller
// passes row0 = first row + 16w + g and col0 = first column + 2t. Rows >= M and columns >= N are skipped.
template <typename TO, int NR>
__device__ __forceinline__ void store_rows(TO* C, const float (&acc)[NR], int row0, int col0, int M, int N,
                                           int pair_ok) {
#pragma unroll
    for (int j = 0; j < NR / 4; j++) {
        const int col = col0 + 8 * j;
        if (col >= N) continue;
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int row = row0 + 8 * h;
            if (row >= M) continue;
            const long i = (long)row * N + col;
            if (pair_ok) {
                store_pair(C, i, acc[4 * j + 2 * h], acc[4 * j + 2 * h + 1]);
            } else {
                store_out(C, i, acc[4 * j + 2 * h]);
                if (col + 1 < N) store_out(C, i + 1, acc[4 * j + 2 * h + 1]);
            }
        }
    }
}

#endif  // PYLLM_SM90A

// Tile t -> (m0, n0) in grouped order: group_m row tiles sweep the column tiles together, so the blocks resident at
// once share A and B panels in L2. (group_m = all row tiles, column order, measured slower at the LM head shape.)
template <int BN>
__device__ __forceinline__ void tile_origin(int t, int mt, int nt, int group_m, int* m0, int* n0) {
    const int per_group = group_m * nt, first = (t / per_group) * group_m;
    const int gsz = min(mt - first, group_m), r = t % per_group;
    *m0 = (first + r % gsz) * BM;
    *n0 = (r / gsz) * BN;
}

template <typename TI, typename TO, int BN>
__global__ void __launch_bounds__(THREADS, 1)
    matmul_sm90_kernel(const __grid_constant__ CUtensorMap map_a,  // A (M, K), box (BM rows, 64)
                       const __grid_constant__ CUtensorMap map_b,  // B (N, K), box (BN rows, 64)
                       TO* __restrict__ C,                         // (M, N)
                       int M, int N, int K, int group_m, int pair_ok) {
#ifdef PYLLM_SM90A
    constexpr int STAGES = stages(BN), A_BYTES = BM * BK * 2, STAGE_BYTES = stage_bytes(BN);
    extern __shared__ __align__(1024) unsigned char smem_raw[];
    // The 128-byte swizzle pattern repeats every 1024 bytes: each stage's tiles must start 1024-aligned.
    unsigned char* smem = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023);  // (STAGES, A|B tile)
    __shared__ __align__(8) uint64_t full[STAGES], empty[STAGES];

    const int mt = (M + BM - 1) / BM, nt = (N + BN - 1) / BN, tiles = mt * nt;
    const int KB = (K + BK - 1) / BK;
    const int wg = threadIdx.x / 128;

    if (threadIdx.x == 0) {
        for (int s = 0; s < STAGES; s++) {
            mbar_init(&full[s], 1);   // the producer's arrive (plus the TMA byte count)
            mbar_init(&empty[s], 2);  // one arrive per consumer warpgroup
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();

    if (wg == 0) {  // producer
        asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n");
        if (threadIdx.x == 0) {
            int s = 0, phase = 0, filled = 0;  // the ring position runs on across tiles
            for (int t = blockIdx.x; t < tiles; t += gridDim.x) {
                int m0, n0;
                tile_origin<BN>(t, mt, nt, group_m, &m0, &n0);
                for (int kb = 0; kb < KB; kb++) {
                    if (filled >= STAGES) mbar_wait(&empty[s], phase ^ 1);  // both consumers done with its last use
                    unsigned char* st = smem + s * STAGE_BYTES;
                    mbar_expect_tx(&full[s], STAGE_BYTES);  // out-of-bounds parts of a box count (as zeros) too
                    tma_load_2d(st, &map_a, kb * BK, m0, &full[s]);
                    tma_load_2d(st + A_BYTES, &map_b, kb * BK, n0, &full[s]);
                    filled++;
                    if (++s == STAGES) { s = 0; phase ^= 1; }
                }
            }
        }
    } else {  // consumers: warpgroup c computes rows m0 + 64c .. +63
        asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n");
        const int c = wg - 1;
        const int w = (threadIdx.x / 32) % 4, g = (threadIdx.x % 32) >> 2, t4 = threadIdx.x & 3;
        float acc[BN / 2];
        int s = 0, phase = 0;
        for (int t = blockIdx.x; t < tiles; t += gridDim.x) {  // the same tiles as the producer, in order
            int m0, n0, prev = 0;
            tile_origin<BN>(t, mt, nt, group_m, &m0, &n0);
#pragma unroll
            for (int i = 0; i < BN / 2; i++) acc[i] = 0.f;
            for (int kb = 0; kb < KB; kb++) {
                mbar_wait(&full[s], phase);
                const unsigned char* st = smem + s * STAGE_BYTES;
                uint64_t da = make_desc(st + c * 64 * BK * 2), db = make_desc(st + A_BYTES);
#pragma unroll
                for (int i = 0; i < BN / 2; i++) fence_reg(acc[i]);
                wgmma_fence();
#pragma unroll
                for (int k = 0; k < BK / 16; k++) wgmma(TI(), acc, da + 2 * k, db + 2 * k);
                wgmma_commit();
                // Keep this stage's wgmmas in flight; the previous stage's are done, so its buffers can be refilled.
                wgmma_wait<1>();
#pragma unroll
                for (int i = 0; i < BN / 2; i++) fence_reg(acc[i]);
                if (kb > 0 && threadIdx.x % 128 == 0) mbar_arrive(&empty[prev]);
                prev = s;
                if (++s == STAGES) { s = 0; phase ^= 1; }
            }
            wgmma_wait<0>();
#pragma unroll
            for (int i = 0; i < BN / 2; i++) fence_reg(acc[i]);
            if (threadIdx.x % 128 == 0) mbar_arrive(&empty[prev]);  // the tile's last stage: refill during the stores

                store_rows(C, acc, m0 + c * 64 + w * 16 + g, n0 + 2 * t4, M, N, pair_ok);
        }  // tiles
    }
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    __trap();  // built for sm_90 without the "a" features: fail loudly rather than leave C unwritten
#endif
}

// Ping-pong variant, 128 x 128 tiles: each consumer warpgroup owns whole tiles (two m64n128 accumulators, 128
// registers) and the two take alternate tiles of the block's sequence, so one stores its tile while the other keeps
// the tensor cores busy. The producer fills the ring in tile order; a stage is used by one consumer only. The
// mainloops take turns (named barriers 1 and 2): a consumer starts waiting on its tile's stages only after the
// other has issued the previous tile's last wgmma. That keeps the tensor cores on one tile at a time, and it is
// needed for correctness: a consumer must never wait on a stage two ring laps ahead (the parity would match a
// stale phase).
constexpr int PP_BN = 128, PP_STAGES = 6;
template <typename TI, typename TO>
__global__ void __launch_bounds__(THREADS, 1)
    matmul_sm90_pp_kernel(const __grid_constant__ CUtensorMap map_a,  // A (M, K), box (BM rows, 64)
                          const __grid_constant__ CUtensorMap map_b,  // B (N, K), box (128 rows, 64)
                          TO* __restrict__ C,                         // (M, N)
                          int M, int N, int K, int group_m, int pair_ok) {
#ifdef PYLLM_SM90A
    constexpr int BN = PP_BN, STAGES = PP_STAGES, A_BYTES = BM * BK * 2, STAGE_BYTES = stage_bytes(BN);
    extern __shared__ __align__(1024) unsigned char smem_raw[];
    unsigned char* smem = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023);  // (STAGES, A|B tile)
    __shared__ __align__(8) uint64_t full[STAGES], empty[STAGES];
    const int mt = (M + BM - 1) / BM, nt = (N + BN - 1) / BN, tiles = mt * nt;
    const int KB = (K + BK - 1) / BK;
    const int wg = threadIdx.x / 128;

    if (threadIdx.x == 0) {
        for (int s = 0; s < STAGES; s++) {
            mbar_init(&full[s], 1);
            mbar_init(&empty[s], 1);  // the one consumer that used the stage
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();

    if (wg == 0) {  // producer
        asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n");
        if (threadIdx.x == 0) {
            int s = 0, phase = 0, filled = 0;
            for (int t = blockIdx.x; t < tiles; t += gridDim.x) {
                int m0, n0;
                tile_origin<BN>(t, mt, nt, group_m, &m0, &n0);
                for (int kb = 0; kb < KB; kb++) {
                    if (filled >= STAGES) mbar_wait(&empty[s], phase ^ 1);
                    unsigned char* st = smem + s * STAGE_BYTES;
                    mbar_expect_tx(&full[s], STAGE_BYTES);
                    tma_load_2d(st, &map_a, kb * BK, m0, &full[s]);
                    tma_load_2d(st + A_BYTES, &map_b, kb * BK, n0, &full[s]);
                    filled++;
                    if (++s == STAGES) { s = 0; phase ^= 1; }
                }
            }
        }
    } else {  // consumer c takes the block's tiles c, c + 2, c + 4, ...
        asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n");
        const int c = wg - 1;
        const int w = (threadIdx.x / 32) % 4, g = (threadIdx.x % 32) >> 2, t4 = threadIdx.x & 3;
        float lo[BN / 2], hi[BN / 2];  // rows 0-63 and 64-127 of the tile
        int local = 0;
        for (int t = blockIdx.x; t < tiles; t += gridDim.x, local++) {
            if ((local & 1) != c) continue;
            int m0, n0, prev = 0;
            tile_origin<BN>(t, mt, nt, group_m, &m0, &n0);
            const long pos = (long)local * KB;  // this tile's first slot in the ring sequence
            int s = (int)(pos % STAGES), phase = (int)((pos / STAGES) & 1);
#pragma unroll
            for (int i = 0; i < BN / 2; i++) { lo[i] = 0.f; hi[i] = 0.f; }
            if (local > 0) asm volatile("bar.sync %0, 256;\n" ::"r"(1 + c) : "memory");  // other's turn is over
            for (int kb = 0; kb < KB; kb++) {
                mbar_wait(&full[s], phase);
                const unsigned char* st = smem + s * STAGE_BYTES;
                uint64_t da = make_desc(st), db = make_desc(st + A_BYTES);
#pragma unroll
                for (int i = 0; i < BN / 2; i++) { fence_reg(lo[i]); fence_reg(hi[i]); }
                wgmma_fence();
#pragma unroll
                for (int k = 0; k < BK / 16; k++) {
                    wgmma(TI(), lo, da + 2 * k, db + 2 * k);
                    wgmma(TI(), hi, da + 2 * k + 64 * 128 / 16, db + 2 * k);  // A rows 64-127: +8 KB
                }
                wgmma_commit();
                wgmma_wait<1>();
#pragma unroll
                for (int i = 0; i < BN / 2; i++) { fence_reg(lo[i]); fence_reg(hi[i]); }
                if (kb > 0 && threadIdx.x % 128 == 0) mbar_arrive(&empty[prev]);
                prev = s;
                if (++s == STAGES) { s = 0; phase ^= 1; }
            }
            if (t + gridDim.x < tiles)  // hand the tensor cores to the other consumer's next tile
                asm volatile("bar.arrive %0, 256;\n" ::"r"(2 - c) : "memory");
            wgmma_wait<0>();
#pragma unroll
            for (int i = 0; i < BN / 2; i++) { fence_reg(lo[i]); fence_reg(hi[i]); }
            if (threadIdx.x % 128 == 0) mbar_arrive(&empty[prev]);
            store_rows(C, lo, m0 + w * 16 + g, n0 + 2 * t4, M, N, pair_ok);
            store_rows(C, hi, m0 + 64 + w * 16 + g, n0 + 2 * t4, M, N, pair_ok);
        }
    }
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    __trap();  // built for sm_90 without the "a" features: fail loudly rather than leave C unwritten
#endif
}

// Per-device facts, looked up once: SM count, and whether this binary has sm_90 machine code for the kernel from
// sm_90 PTX (ptxVersion 90: the 90a target; a JIT from the compute_80 PTX reports binaryVersion 90 but ptxVersion
// 80, and its body is empty).
struct dev_info { int init, ok, sms; };
static dev_info g_dev[64];
static PFN_cuTensorMapEncodeTiled_v12000 g_encode;

static bool device_ok(int* sms) {
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return false;
    dev_info& d = g_dev[dev];
    if (!d.init) {  // benign race: every thread computes the same values
        cudaDeviceProp prop;
        cudaFuncAttributes fa;
        int ok = cudaGetDeviceProperties(&prop, dev) == cudaSuccess && prop.major == 9 &&
                 cudaFuncGetAttributes(&fa, matmul_sm90_kernel<__nv_bfloat16, __nv_bfloat16, 256>) == cudaSuccess &&
                 fa.binaryVersion == 90 && fa.ptxVersion >= 90;
        if (ok && !g_encode) {
            void* fn = nullptr;
            cudaDriverEntryPointQueryResult q;
            if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &q) !=
                    cudaSuccess || q != cudaDriverEntryPointSuccess || !fn)
                ok = 0;
            else
                g_encode = (PFN_cuTensorMapEncodeTiled_v12000)fn;
        }
        cudaGetLastError();  // a failed query above must not surface as the next launch's error
        d.sms = prop.multiProcessorCount;
        d.ok = ok;
        d.init = 1;
    }
    *sms = d.sms;
    return d.ok;
}

// Row-major (rows, K) 16-bit matrix, box (box_rows, 64) with the 128-byte swizzle; out-of-bounds reads give zeros.
static bool make_map(CUtensorMap* m, const void* ptr, int rows, int K, int box_rows, bool f16) {
    cuuint64_t dims[2] = {(cuuint64_t)K, (cuuint64_t)rows};
    cuuint64_t strides[1] = {(cuuint64_t)K * 2};
    cuuint32_t box[2] = {(cuuint32_t)BK, (cuuint32_t)box_rows}, estr[2] = {1, 1};
    return g_encode(m, f16 ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2,
                    const_cast<void*>(ptr), dims, strides, box, estr, CU_TENSOR_MAP_INTERLEAVE_NONE,
                    CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                    CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// Kernel and tile width. Short K with N <= 4096 (the transformer's K = 768 projections): the ping-pong kernel, whose
// stores overlap the other warpgroup's math (H100, (8192, 768, 768): 333 vs 304 TFLOP/s; (8192, 3072, 768): 392 vs
// 380). Otherwise the BN whose wave count x per-tile cost is least (full waves matter at transformer shapes: N = 768
// gives 192 tiles of 128x256 on 132 SMs, 1.45 waves, but 256 tiles of 128x192). Returns BN, or -1 for ping-pong.
static int pick_bn(int M, int N, int K, int sms) {
    if (K <= 1024 && N <= 4096) return -1;
    const int bns[3] = {256, 192, 128};
    const double cost[3] = {256.0, 192.0 / 0.97, 128.0 / 0.90};  // narrower tiles re-read more per FLOP
    int best = 256;
    double best_t = 1e300;
    for (int i = 0; i < 3; i++) {
        long tiles = (long)((M + BM - 1) / BM) * ((N + bns[i] - 1) / bns[i]);
        double t = (double)((tiles + sms - 1) / sms) * cost[i];
        if (t < best_t - 1e-9) { best_t = t; best = bns[i]; }
    }
    return best;
}

// N even and C aligned for 2-element stores (then col even and col < N imply col + 1 < N)
template <typename TO> static int pair_ok(const TO* c, int N) {
    return N % 2 == 0 && (uintptr_t)c % (2 * sizeof(TO)) == 0;
}

template <typename TI, typename TO, int BN>
static const char* launch(const CUtensorMap& ma, const CUtensorMap& mb, TO* c, int M, int N, int K, int sms,
                          cudaStream_t s) {
    auto kern = matmul_sm90_kernel<TI, TO, BN>;
    CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes(BN)));
    int mt = (M + BM - 1) / BM, tiles = mt * ((N + BN - 1) / BN);
    kern<<<tiles < sms ? tiles : sms, THREADS, smem_bytes(BN), s>>>(ma, mb, c, M, N, K, GROUP_M, pair_ok(c, N));
    CUDA_CHECK_LAUNCH();
    return nullptr;
}

template <typename TI, typename TO>
static const char* launch_pp(const CUtensorMap& ma, const CUtensorMap& mb, TO* c, int M, int N, int K, int sms,
                             cudaStream_t s) {
    auto kern = matmul_sm90_pp_kernel<TI, TO>;
    constexpr int smem = PP_STAGES * stage_bytes(PP_BN) + 1024;
    CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    int mt = (M + BM - 1) / BM, tiles = mt * ((N + PP_BN - 1) / PP_BN);
    kern<<<tiles < sms ? tiles : sms, THREADS, smem, s>>>(ma, mb, c, M, N, K, GROUP_M, pair_ok(c, N));
    CUDA_CHECK_LAUNCH();
    return nullptr;
}
}  // namespace sm90

// The sm_90a path for 16-bit operands; *used = false (nothing launched) when the device, the build or the operands
// do not suit it, and the caller takes the mma.sync kernel.
template <typename TI>
static const char* matmul_sm90(const matmul_cuda_params* p, cudaStream_t s, bool* used) {
    *used = false;
    int sms = 0;
    if (p->K % 8 != 0 || ((uintptr_t)p->a & 15) || ((uintptr_t)p->b & 15) || !sm90::device_ok(&sms)) return nullptr;
    const int bn = sm90::pick_bn(p->M, p->N, p->K, sms);  // -1: the ping-pong kernel
    const int box_n = bn < 0 ? sm90::PP_BN : bn;
    const bool f16 = std::is_same<TI, __half>::value;
    CUtensorMap ma, mb;
    if (!sm90::make_map(&ma, p->a, p->M, p->K, sm90::BM, f16) || !sm90::make_map(&mb, p->b, p->N, p->K, box_n, f16))
        return nullptr;
    *used = true;
    if (p->out_f32) {
        float* c = (float*)p->c;
        if (bn < 0) return sm90::launch_pp<TI, float>(ma, mb, c, p->M, p->N, p->K, sms, s);
        if (bn == 256) return sm90::launch<TI, float, 256>(ma, mb, c, p->M, p->N, p->K, sms, s);
        if (bn == 192) return sm90::launch<TI, float, 192>(ma, mb, c, p->M, p->N, p->K, sms, s);
        return sm90::launch<TI, float, 128>(ma, mb, c, p->M, p->N, p->K, sms, s);
    }
    TI* c = (TI*)p->c;
    if (bn < 0) return sm90::launch_pp<TI, TI>(ma, mb, c, p->M, p->N, p->K, sms, s);
    if (bn == 256) return sm90::launch<TI, TI, 256>(ma, mb, c, p->M, p->N, p->K, sms, s);
    if (bn == 192) return sm90::launch<TI, TI, 192>(ma, mb, c, p->M, p->N, p->K, sms, s);
    return sm90::launch<TI, TI, 128>(ma, mb, c, p->M, p->N, p->K, sms, s);
}

// 16-bit operands: the tensor-core kernel when K % 8 == 0 and A, B are 16-byte aligned (on sm_90a the TMA + wgmma
// kernel, else mma.sync), otherwise the simple one.
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
    bool used = false;
    const char* err = matmul_sm90<TI>(p, s, &used);
    if (used) return err;
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

// ---------------------------------------------------------------------------------------------------------------
// Small M (decode: one or a few tokens): a GEMV, one warp per output column n. Every element of B is read once,
// 16 bytes per lane per load, so the kernel runs at memory bandwidth; the tiled kernels above would fill 1/64 of
// their tile and launch only N/64 blocks (12 for N = 768: the fp32 decode ran at 47 tok/s on an H100).
constexpr int GEMV_MAX_M = 16, GEMV_WARPS = 8;  // M <= 16: a short prompt's prefill too

template <typename T> struct Vec16;  // 16 bytes of T, converted to floats
template <> struct Vec16<float> {
    static constexpr int N = 4;
    __device__ static void load(float f[4], const float* p) {
        float4 v = *reinterpret_cast<const float4*>(p);
        f[0] = v.x; f[1] = v.y; f[2] = v.z; f[3] = v.w;
    }
};
template <typename T16> struct Vec16Half {
    static constexpr int N = 8;
    __device__ static void load(float f[8], const T16* p) {
        uint4 v = *reinterpret_cast<const uint4*>(p);
        const T16* h = reinterpret_cast<const T16*>(&v);
#pragma unroll
        for (int i = 0; i < 8; i++) f[i] = to_f32(h[i]);
    }
};
template <> struct Vec16<__nv_bfloat16> : Vec16Half<__nv_bfloat16> {};
template <> struct Vec16<__half> : Vec16Half<__half> {};

// grid ceil(N / GEMV_WARPS), GEMV_WARPS * 32 threads. vec: K % Vec16<T>::N == 0 and A, B 16-byte aligned.
template <typename T, typename TO, int MM>
__global__ void __launch_bounds__(GEMV_WARPS * 32) matmul_gemv_kernel(TO* __restrict__ C, const T* __restrict__ A,
                                                                     const T* __restrict__ B, int M, int N, int K,
                                                                     bool vec) {
    const int lane = threadIdx.x & 31, n = blockIdx.x * GEMV_WARPS + (threadIdx.x >> 5);
    if (n >= N) return;
    const T* b = B + (long)n * K;  // (K)
    float acc[MM] = {};
    if (vec) {
        constexpr int V = Vec16<T>::N;
        for (int k = lane * V; k < K; k += 32 * V) {
            float bf[V];
            Vec16<T>::load(bf, b + k);
#pragma unroll
            for (int m = 0; m < MM; m++) {
                if (m < M) {
                    float af[V];
                    Vec16<T>::load(af, A + (long)m * K + k);
#pragma unroll
                    for (int i = 0; i < V; i++) acc[m] = fmaf(af[i], bf[i], acc[m]);
                }
            }
        }
    } else {
        for (int k = lane; k < K; k += 32) {
            float bk = to_f32(b[k]);
#pragma unroll
            for (int m = 0; m < MM; m++)
                if (m < M) acc[m] = fmaf(to_f32(A[(long)m * K + k]), bk, acc[m]);
        }
    }
#pragma unroll
    for (int m = 0; m < MM; m++) {
        float v = warp_sum(acc[m]);
        if (lane == 0 && m < M) store_out(C, (long)m * N + n, v);
    }
}

template <typename T, typename TO>
static const char* matmul_gemv(const matmul_cuda_params* p, cudaStream_t s) {
    const T* a = (const T*)p->a;  // (M, K)
    const T* b = (const T*)p->b;  // (N, K)
    const bool vec = p->K % Vec16<T>::N == 0 && ((uintptr_t)a & 15) == 0 && ((uintptr_t)b & 15) == 0;
    const int grid = ceil_div(p->N, GEMV_WARPS);
    if (p->M == 1)  // the decode case: no dead accumulators
        matmul_gemv_kernel<T, TO, 1><<<grid, GEMV_WARPS * 32, 0, s>>>((TO*)p->c, a, b, p->M, p->N, p->K, vec);
    else
        matmul_gemv_kernel<T, TO, GEMV_MAX_M><<<grid, GEMV_WARPS * 32, 0, s>>>((TO*)p->c, a, b, p->M, p->N, p->K,
                                                                               vec);
    CUDA_CHECK_LAUNCH();
    return nullptr;
}

extern "C" const char* matmul_cuda(const matmul_cuda_params* p, pyllm_stream stream) {
    cudaStream_t s = STREAM(stream);
    if (p->M <= 0 || p->N <= 0 || p->K <= 0) return "matmul_cuda: M, N, K must be > 0";
    if (p->M <= GEMV_MAX_M) {
        if (p->dtype == 0) return matmul_gemv<float, float>(p, s);
        if (p->dtype == 1)
            return p->out_f32 ? matmul_gemv<__nv_bfloat16, float>(p, s)
                              : matmul_gemv<__nv_bfloat16, __nv_bfloat16>(p, s);
        if (p->dtype == 2) return p->out_f32 ? matmul_gemv<__half, float>(p, s) : matmul_gemv<__half, __half>(p, s);
    }
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
