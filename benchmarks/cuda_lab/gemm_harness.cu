// benchmarks/cuda_lab/gemm_harness.cu — standalone check and timing of pyllm's CUDA matmul (csrc/cuda/matmul.cu)
// against cuBLAS, outside the Python package: NaN-poisoned C, odd shapes, bf16/fp16 in, 16-bit/fp32 out, then
// medians of 20 (3 rotating input sets) at 4096^3 and the GPT-2-small shapes. Run on a GPU machine:
//     bash benchmarks/cuda_lab/run_gemm.sh        (compiles for sm_90a, prints SASS counts, checks, times)
#include "../../csrc/cuda/matmul.cu"
#ifdef GEMM_HARNESS
#include <cublas_v2.h>
#include <algorithm>
#include <vector>
#define CK(x)                                                                                  \
    do {                                                                                       \
        cudaError_t e_ = (x);                                                                  \
        if (e_ != cudaSuccess) {                                                               \
            printf("CUDA error %s at %s:%d\n", cudaGetErrorString(e_), __FILE__, __LINE__);    \
            exit(1);                                                                           \
        }                                                                                      \
    } while (0)
#define CB(x)                                                                                  \
    do {                                                                                       \
        cublasStatus_t e_ = (x);                                                               \
        if (e_ != CUBLAS_STATUS_SUCCESS) {                                                     \
            printf("cuBLAS error %d at %s:%d\n", (int)e_, __FILE__, __LINE__);                 \
            exit(1);                                                                           \
        }                                                                                      \
    } while (0)
#define CM(x)                                                                                  \
    do {                                                                                       \
        const char* m_ = (x);                                                                  \
        if (m_) {                                                                              \
            printf("kernel error: %s\n", m_);                                                  \
            exit(1);                                                                           \
        }                                                                                      \
    } while (0)

static cublasHandle_t g_blas;
// sum (c - ref)^2, sum ref^2, count of non-finite c
template <typename TO>
__global__ void err_kernel(const TO* c, const float* ref, long n, double* acc) {
    double d = 0, r = 0, bad = 0;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        float x = to_f32(c[i]), y = ref[i];
        if (!isfinite(x)) bad += 1;
        else { d += (double)(x - y) * (x - y); r += (double)y * y; }
    }
    atomicAdd(&acc[0], d); atomicAdd(&acc[1], r); atomicAdd(&acc[2], bad);
}
// cuBLAS NT: row-major C (M, N) = A (M, K) B (N, K)^T is column-major C^T (N, M) = B^T' ... i.e. op(B)=T, op(A)=N.
static void blas(void* c, bool c32, const void* a, const void* b, int M, int N, int K, bool f16) {
    float one = 1.f, zero = 0.f;
    cudaDataType ti = f16 ? CUDA_R_16F : CUDA_R_16BF, to = c32 ? CUDA_R_32F : ti;
    CB(cublasGemmEx(g_blas, CUBLAS_OP_T, CUBLAS_OP_N, N, M, K, &one, b, ti, K, a, ti, K, &zero, c, to, N,
                    CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}
static void run_new(void* c, bool c32, const void* a, const void* b, int M, int N, int K, bool f16) {
    matmul_cuda_params p{c, a, b, M, N, K, f16 ? 2 : 1, c32 ? 1 : 0};
    CM(matmul_cuda(&p, nullptr));  // the package's entry point: its dispatch picks the kernel
}

// the mma.sync kernel, as matmul_16 launches it on devices without the sm_90a path
static void run_old(void* c, const void* a, const void* b, int M, int N, int K) {
    auto kern = matmul_tc_kernel<__nv_bfloat16, __nv_bfloat16>;
    CK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, TC_SMEM));
    dim3 grid(ceil_div(N, BN), ceil_div(M, BM));
    kern<<<grid, 256, TC_SMEM>>>((__nv_bfloat16*)c, (const __nv_bfloat16*)a, (const __nv_bfloat16*)b, M, N, K);
    CK(cudaGetLastError());
}

int main() {
    setvbuf(stdout, nullptr, _IONBF, 0);
    CB(cublasCreate(&g_blas));
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    printf("device %s, %d SMs, cc %d.%d\n", prop.name, prop.multiProcessorCount, prop.major, prop.minor);
    const long MAXA = 8192L * 3072, MAXB = 50304L * 768, MAXC = 8192L * 50304;
    // 3 input sets (timing rotates them so L2 never serves a repeat), bf16 and fp16 copies of the same values
    std::vector<__nv_bfloat16> hb(MAXB);
    std::vector<__half> hh(MAXB);
    void *A[3], *B[3], *Ah, *Bh;
    uint64_t x = 0x9E3779B97F4A7C15ull;
    for (int set = 0; set < 3; set++) {
        CK(cudaMalloc(&A[set], MAXA * 2));
        CK(cudaMalloc(&B[set], MAXB * 2));
        for (int which = 0; which < 2; which++) {
            long n = which ? MAXB : MAXA;
            for (long i = 0; i < n; i++) {
                x ^= x << 13; x ^= x >> 7; x ^= x << 17;
                float v = (float)((x >> 40) & 0xFFFFFF) / 16777216.f * 2.f - 1.f;
                hb[i] = __float2bfloat16(v);
                if (set == 0) hh[i] = __float2half(v);
            }
            CK(cudaMemcpy(which ? B[set] : A[set], hb.data(), n * 2, cudaMemcpyHostToDevice));
            if (set == 0) {
                if (which) { CK(cudaMalloc(&Bh, MAXB * 2)); CK(cudaMemcpy(Bh, hh.data(), n * 2, cudaMemcpyHostToDevice)); }
                else { CK(cudaMalloc(&Ah, MAXA * 2)); CK(cudaMemcpy(Ah, hh.data(), n * 2, cudaMemcpyHostToDevice)); }
            }
        }
    }
    void *C, *R;
    double* acc;
    CK(cudaMalloc(&C, MAXC * 4));
    CK(cudaMalloc(&R, MAXC * 4));
    CK(cudaMalloc(&acc, 3 * sizeof(double)));

    // ---- correctness: every tile width, bf16 / fp32 out, bf16 / fp16 in; C poisoned with NaN bytes first
    struct S { int M, N, K; };
    std::vector<S> shapes = {{1, 1, 8},       {17, 33, 40},     {129, 257, 72},   {300, 64, 16},
                             {1000, 1000, 1000}, {77, 768, 768}, {4096, 4096, 4096}, {8192, 768, 768},
                             {8192, 3072, 768}, {8192, 768, 3072}, {8192, 50304, 768}, {256, 50257, 64},
                             {255, 130, 4104}, {100, 36, 24},   {513, 1000, 264}};
    int fails = 0;
    for (auto sh : shapes) {
        printf("shape %d x %d x %d\n", sh.M, sh.N, sh.K);
        for (int f16 = 0; f16 < 2; f16++) {
            if (f16 && (long)sh.M * sh.N > 64L * 1024 * 1024) continue;
            const void* a = f16 ? Ah : A[0];
            const void* b = f16 ? Bh : B[0];
            blas(R, true, a, b, sh.M, sh.N, sh.K, f16);
            for (int c32 = 0; c32 < 2; c32++) {
                long n = (long)sh.M * sh.N;
                CK(cudaMemset(C, 0xFF, n * (c32 ? 4 : 2)));  // NaN bytes: an unwritten element fails
                run_new(C, c32, a, b, sh.M, sh.N, sh.K, f16);
                CK(cudaMemset(acc, 0, 3 * sizeof(double)));
                if (c32) err_kernel<float><<<512, 256>>>((float*)C, (float*)R, n, acc);
                else if (f16) err_kernel<__half><<<512, 256>>>((__half*)C, (float*)R, n, acc);
                else err_kernel<__nv_bfloat16><<<512, 256>>>((__nv_bfloat16*)C, (float*)R, n, acc);
                CK(cudaGetLastError());
                double h[3];
                CK(cudaMemcpy(h, acc, sizeof h, cudaMemcpyDeviceToHost));
                double rel = sqrt(h[0] / (h[1] > 0 ? h[1] : 1));
                bool ok = h[2] == 0 && rel < (c32 ? 1e-5 : 1e-2);
                fails += !ok;
                printf("check %5d x %5d x %5d %s in %s out: rel %.2e nonfinite %.0f %s\n", sh.M, sh.N, sh.K,
                       f16 ? "f16 " : "bf16", c32 ? "f32 " : "16b ", rel, h[2], ok ? "ok" : "FAIL");
            }
        }
    }
    printf("correctness: %d failures\n", fails);

    // ---- timing: medians of 20 after 5 warm-ups, rotating the 3 input sets
    cudaEvent_t ev[2 * 25];
    for (auto& e : ev) CK(cudaEventCreate(&e));
    auto time = [&](auto&& fn) {
        for (int i = 0; i < 25; i++) {
            CK(cudaEventRecord(ev[2 * i]));
            fn(i % 3);
            CK(cudaEventRecord(ev[2 * i + 1]));
        }
        CK(cudaDeviceSynchronize());
        std::vector<float> ms;
        for (int i = 5; i < 25; i++) {
            float t;
            CK(cudaEventElapsedTime(&t, ev[2 * i], ev[2 * i + 1]));
            ms.push_back(t);
        }
        std::sort(ms.begin(), ms.end());
        return (ms[9] + ms[10]) / 2;
    };
    std::vector<S> tshapes = {{4096, 4096, 4096}, {8192, 768, 768}, {8192, 3072, 768}, {8192, 768, 3072},
                              {8192, 50304, 768}};
    for (auto sh : tshapes) {
        int M = sh.M, N = sh.N, K = sh.K;
        double fl = 2.0 * M * N * K;
        float tb = time([&](int s) { blas(C, false, A[s], B[s], M, N, K, false); });
        float to = time([&](int s) { run_old(C, A[s], B[s], M, N, K); });
        printf("time %5d x %5d x %5d: cuBLAS %.1f TFLOP/s (%.1f us); old mma.sync %.1f (%.2fx)", M, N, K,
               fl / tb * 1e-9, tb * 1e3, fl / to * 1e-9, tb / to);
        float tn = time([&](int s) { run_new(C, false, A[s], B[s], M, N, K, false); });
        printf("; pyllm matmul_cuda %.1f (%.2fx)", fl / tn * 1e-9, tb / tn);
        printf("\n");
    }
    return fails ? 1 : 0;
}
#endif  // GEMM_HARNESS
