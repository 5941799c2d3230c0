// kernels.h — the public API of pyllm's CPU kernels, shared by the pybind11 extension and the C binary.
// Every kernel is `void <op>_<verb>(const <op>_params* p)`: raw pointers and sizes in a params struct, no
// allocation the caller does not know about, fp32 unless the name says otherwise. Each call runs on the
// instruction-set path chosen in isa.h. To add a kernel: declare its params struct here, add one X(...) line
// to PYLLM_KERNELS, and implement `KFN(<name>)` in an impl_*.h header included by kernels_impl.h.
// Shapes are given as (dim, ...) in row-major order; a stride named ld* is in elements.
#pragma once
#include <stddef.h>
#include <stdint.h>
#include "isa.h"

#ifdef __cplusplus
extern "C" {
#endif

// --- normalisation ---------------------------------------------------------------------------------------
typedef struct {
    float* out;          // (N, C)
    float* rstd;         // (N)   optional: 1/rms per row, saved for backward (NULL to skip)
    const float* x;      // (N, C)
    const float* weight; // (C)
    int N, C;
    float eps;
} rmsnorm_params;

typedef struct {
    float* dx;           // (N, C)  written
    float* dweight;      // (C)     accumulated into (caller zeroes it)
    const float* dout;   // (N, C)
    const float* x;      // (N, C)
    const float* weight; // (C)
    const float* rstd;   // (N)     from rmsnorm_forward
    int N, C;
} rmsnorm_backward_params;

// --- matmul (impl_matmul.h) -----------------------------------------------------------------------------
// GEMM: C(M, N) = op(A)(M, K) · op(B)(N, K)ᵀ [+ bias(N)], or C += ... when accumulate (C not read otherwise).
// op(A) = A stored (M, K) row stride lda, or with trans_a A is stored (K, M) (op(A) = Aᵀ); likewise B is
// (N, K) or, with trans_b, (K, N). So for Y = X·Wᵀ (X (M,K), W (N,K)) the three training products are
//   forward  Y(M,N)  = X·Wᵀ      : A=X,  B=W                      (trans_a=0, trans_b=0)
//   dX(M,K)          = dY·W      : A=dY, B=W  stored (N,K)=(K',N') (trans_a=0, trans_b=1), inner dim N
//   dW(N,K)          = dYᵀ·X     : A=dY stored (M,N), B=X (M,K)    (trans_a=1, trans_b=1), inner dim M
// Allocates packing scratch per call: (N + min(M, ~8M/K)) * K floats, rounded up to tiles (malloc; returns
// without writing C if that fails).
typedef struct {
    float* C;            // (M, N) row stride ldc
    const float* A;      // (M, K) row stride lda; (K, M) if trans_a
    const float* B;      // (N, K) row stride ldb; (K, N) if trans_b
    const float* bias;   // (N) or NULL
    int M, N, K;
    int lda, ldb, ldc;
    int trans_a, trans_b;
    int accumulate;      // 0: C = A·Bᵀ (+bias); 1: C += A·Bᵀ (+bias)
} matmul_params;

// Same as matmul_params with bf16 A and B (raw bf16 bits in uint16_t), fp32 accumulate, fp32 C and bias.
// Panels are widened to fp32 while packing (halves the input bytes read; the math is the fp32 kernel's).
typedef struct {
    float* C;              // (M, N) row stride ldc
    const uint16_t* A;     // (M, K) bf16 row stride lda; (K, M) if trans_a
    const uint16_t* B;     // (N, K) bf16 row stride ldb; (K, N) if trans_b
    const float* bias;     // (N) or NULL
    int M, N, K;
    int lda, ldb, ldc;
    int trans_a, trans_b;
    int accumulate;
} matmul_bf16_params;

// y(n) = W(n, k) · x(k), fp32, for decoding (batch 1, memory-bound; OpenMP over rows).
typedef struct {
    float* y;            // (n)
    const float* W;      // (n, k) row-major, contiguous
    const float* x;      // (k)
    int n, k;
} matvec_params;

// Q8_0 (llama2.c runq.c): int8 values with one fp32 scale per group of G consecutive elements of a row;
// scale = max|w| / 127, q = roundf(w / scale) (q = 0 when the group is all zero). k % G == 0.
typedef struct {
    int8_t* q;           // (n, k)    written
    float* s;            // (n, k/G)  written
    const float* w;      // (n, k)
    int n, k, G;
} quantize_q8_params;

// y(n) = W·x with W in Q8_0: x is quantized the same way (per group of G) inside the kernel, then
// y[i] = sum_g (int32 dot of the group) * ws[i, g] * xs[g]. Scratch for quantized x: pass xq_scratch (k) and
// xs_scratch (k/G), or NULL to use the stack (k <= 32768) or malloc (larger k).
typedef struct {
    float* y;            // (n)
    const int8_t* wq;    // (n, k)
    const float* ws;     // (n, k/G)
    const float* x;      // (k)
    int8_t* xq_scratch;  // (k) or NULL
    float* xs_scratch;   // (k/G) or NULL
    int n, k, G;
} matvec_q8_params;

// X(name, params_type): every dispatched kernel, in one list. kernels.c builds the tables and entry points.
#define PYLLM_KERNELS(X)                          \
    X(rmsnorm_forward, rmsnorm_params)            \
    X(rmsnorm_backward, rmsnorm_backward_params)  \
    X(matmul_forward, matmul_params)              \
    X(matmul_bf16_forward, matmul_bf16_params)    \
    X(matvec_f32, matvec_params)                  \
    X(quantize_q8, quantize_q8_params)            \
    X(matvec_q8, matvec_q8_params)

#define PYLLM_DECLARE(name, P) void name(const P* p);
PYLLM_KERNELS(PYLLM_DECLARE)
#undef PYLLM_DECLARE

// Threads used by the kernels (OpenMP); n <= 0 means "all cores".
void kernels_set_threads(int n);
int kernels_get_threads(void);

#ifdef __cplusplus
}
#endif
