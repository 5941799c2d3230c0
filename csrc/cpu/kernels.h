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
    const float* dres;   // (N, C) or NULL: a residual gradient added to dx (saves the block op a pass)
} rmsnorm_backward_params;

// --- matmul (impl_matmul.h) -----------------------------------------------------------------------------
// GEMM: C(M, N) = op(A)(M, K) · op(B)(N, K)ᵀ [+ bias(N)], or C += ... when accumulate (C not read otherwise).
// op(A) = A stored (M, K) row stride lda, or with trans_a A is stored (K, M) (op(A) = Aᵀ); likewise B is
// (N, K) or, with trans_b, (K, N). So for Y = X·Wᵀ (X (M,K), W (N,K)) the three training products are
//   forward  Y(M,N)  = X·Wᵀ      : A=X,  B=W                      (trans_a=0, trans_b=0)
//   dX(M,K)          = dY·W      : A=dY, B=W  stored (N,K)=(K',N') (trans_a=0, trans_b=1), inner dim N
//   dW(N,K)          = dYᵀ·X     : A=dY stored (M,N), B=X (M,K)    (trans_a=1, trans_b=1), inner dim M
// Packing scratch (<= ~10 MiB) is kept per calling thread and reused across calls (aligned_alloc; returns
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
// On AMX tiles where the CPU and OS allow; else on vdpbf16ps over k-pair panels where the CPU has AVX512_BF16
// (PYLLM_NO_BF16DP=1: off); else panels are widened to fp32 while packing and run the fp32 micro-kernel.
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
// xs_scratch (k/G), or NULL to use the stack (k <= 32768) or malloc (larger k). x_quantized = 1: the caller
// already quantized x into xq_scratch/xs_scratch (quantize_q8 with n = 1), x is not read (several row blocks of
// one x: run.c's threads each take rows of the same quantized activation).
typedef struct {
    float* y;            // (n)
    const int8_t* wq;    // (n, k)
    const float* ws;     // (n, k/G)
    const float* x;      // (k)
    int8_t* xq_scratch;  // (k) or NULL
    float* xs_scratch;   // (k/G) or NULL
    int n, k, G;
    int x_quantized;     // 0: quantize x here; 1: xq_scratch, xs_scratch hold it already (both non-NULL)
} matvec_q8_params;
// --- sampling (impl_sample.h) -------------------------------------------------------------------------
typedef struct {
    int64_t* tokens;      // (B)    written: chosen id; -1 = row has no allowed token, -2 = NaN/+inf logits
    float* logprobs;      // (B)    written: log_softmax(logits / T)[token] over the full vocab (T = 1 if greedy)
    const float* logits;  // (B, V)
    const uint8_t* mask;  // (B, V) optional: nonzero = allowed (NULL: all allowed)
    int B, V;
    float temperature;    // 0 = greedy
    int top_k;            // 0 = off
    float top_p;          // 1 = off
    float min_p;          // 0 = off; > 1 acts as 1 (the top token alone)
    uint64_t seed, step;  // the draw for row b is a pure function of (seed, b, step)
} sample_params;

// --- fused training ops (impl_fused.h) ----------------------------------------------------------------------
typedef struct {
    float* out;           // (B, T, H, D)  may alias x
    const float* x;       // (B, T, H, D)
    const float* cos;     // (T, D/2)
    const float* sin;     // (T, D/2)
    int B, T, H, D;       // D even
    int backward;         // 1: rotate by -angle (the gradient of the forward rotation)
    int ldx, ldo;         // row stride per token (b, t) of x / out in floats; 0 = H*D (contiguous). Lets the
                          // decode layer read q, k from its fused [q | k] buffer and write k into the KV cache
                          // (the training block op rotates q, k inside attention instead: attention_params)
} rope_params;

typedef struct {
    float* out;           // (n)  silu(gate) * up
    const float* gate;    // (n)
    const float* up;      // (n)
    long n;
    int cols, ld;         // cols > 0: n = rows*cols, gate/up rows at stride ld (out contiguous): the halves of
                          // one fused (rows, 2*cols) gate|up GEMM output. 0: flat
} swiglu_params;

typedef struct {
    float* dgate;         // (n)
    float* dup;           // (n)
    const float* dout;    // (n)
    const float* gate;    // (n)
    const float* up;      // (n)
    long n;
    int cols, ld;         // as swiglu_params: dgate/dup/gate/up rows at stride ld, dout contiguous; 0: flat
} swiglu_backward_params;

typedef struct {
    float* loss;            // (N)  lse - logits[target], 0 for ignored rows
    float* stats;           // (N, 2)  row max and log(sum(exp(logits - max)))
    const float* logits;    // (N, V)
    const int64_t* targets; // (N)
    int N, V;
    int64_t ignore_index;
    float* dlogits;         // (N, V)  or NULL: the gradient of scale * sum(loss), the backward fused in; may alias logits
    float scale;            // 1 / n_valid for a mean loss
    int ld_dlogits;         // dlogits' row stride (>= V; 0: V): the GEMM that reads it wants no 4 KiB multiple
} cross_entropy_params;

typedef struct {
    float* params;        // (n)  updated in place
    const float* grads;   // (n)
    float* m;             // (n)  first moment, updated
    float* v;             // (n)  second moment, updated
    long n;
    float lr, beta1, beta2, eps, weight_decay;
    int step;             // 1-based, for bias correction
} adamw_params;
// --- attention (impl_attention.h) ---------------------------------------------------------------------
// Causal flash attention, fp32. Query head h reads kv head h / (H / Hkv) (H % Hkv == 0). Scale 1/sqrt(D).
// doc_ids (optional): token i attends to j only if j <= i and doc_ids[b,i] == doc_ids[b,j]; any ids work, and
// 64x64 tiles whose query and key id ranges do not overlap are skipped, so packed rows with increasing ids cost
// about sum(doc_len^2) rather than T^2/2.
// D <= 256. Scratch: each thread mallocs O(D*64 + 64*64) floats per call (backward also 4*T*D: its kv head's
// K, V, dK, dV). Backward parallelism is B*Hkv (one item owns a kv head's dK/dV and its query heads' dQ).
typedef struct {
    float* out;             // (B, T, H, D)   written
    float* lse;             // (B, H, T)      written: log-sum-exp of each query row's scaled scores (for backward)
    const float* q;         // (B, T, H, D)
    const float* k;         // (B, T, Hkv, D)
    const float* v;         // (B, T, Hkv, D)
    const int32_t* doc_ids; // (B, T) or NULL (plain causal)
    int B, T, H, Hkv, D;
    // CPU only (the CUDA kernels take 0 / NULL): the block op passes its pre-RoPE [q | k | v] GEMM output as is
    long ldq, ldkv;         // row stride per token (b, t) of q / of k and v, in floats; 0 = H*D / Hkv*D
    const float* cos;       // (T, D/2) or NULL: q and k are rotated (RoPE, rotate-half) as the kernel reads them
    const float* sin;       // (T, D/2)
} attention_params;

typedef struct {
    float* dq;              // (B, T, H, D)   written
    float* dk;              // (B, T, Hkv, D) written
    float* dv;              // (B, T, Hkv, D) written
    const float* dout;      // (B, T, H, D)
    const float* out;       // (B, T, H, D)   from attention_forward
    const float* lse;       // (B, H, T)      from attention_forward
    const float* q;         // (B, T, H, D)
    const float* k;         // (B, T, Hkv, D)
    const float* v;         // (B, T, Hkv, D)
    const int32_t* doc_ids; // (B, T) or NULL, as in the forward
    int B, T, H, Hkv, D;
    long ldq, ldkv;         // as in attention_params (CPU only), for q and k, v
    const float* cos;       // (T, D/2) or NULL, as in the forward: then dq, dk are the gradients of the
    const float* sin;       // (T, D/2)   pre-RoPE q, k (rotated back by -angle as they are written)
    long ld_dq, ld_dkv;     // row stride per token of dq / of dk and dv; 0 = H*D / Hkv*D
} attention_backward_params;

// One new query per sequence against a KV cache: out[b,h] = softmax(q[b,h] . K[b, :n_ctx, h/(H/Hkv)]^T / sqrt(D))
// . V[...]. The caches are strided so the C binary can pass its own layout: element (b, t, g, d) of k_cache is
// k_cache[b*ld_b + t*ld_t + g*D + d]. For a (B, T_max, Hkv, D) tensor: ld_t = Hkv*D, ld_b = T_max*Hkv*D; for
// run.c's (layers, T_max, Hkv, D) cache with B = 1: k_cache = base + layer*T_max*Hkv*D, ld_t = Hkv*D, ld_b = 0.
// 1 <= n_ctx <= T_max, D <= 256. No allocation.
typedef struct {
    float* out;             // (B, H, D)   written
    const float* q;         // (B, H, D)
    const float* k_cache;   // (B, T_max, Hkv, D) via ld_b, ld_t
    const float* v_cache;   // (B, T_max, Hkv, D) via ld_b, ld_t
    long ld_b, ld_t;        // elements between batch rows / between positions of the caches
    int B, H, Hkv, D, n_ctx;
} decode_attention_params;

// X(name, params_type): every dispatched kernel, in one list. kernels.c builds the tables and entry points.
#define PYLLM_KERNELS(X)                          \
    X(rmsnorm_forward, rmsnorm_params)            \
    X(rmsnorm_backward, rmsnorm_backward_params)   \
    X(attention_forward, attention_params)        \
    X(attention_backward, attention_backward_params) \
    X(decode_attention, decode_attention_params)  \
    X(sample_forward, sample_params)              \
    X(rope_forward, rope_params)                  \
    X(swiglu_forward, swiglu_params)              \
    X(swiglu_backward, swiglu_backward_params)    \
    X(cross_entropy_forward, cross_entropy_params) \
    X(adamw_step, adamw_params) \
    X(matmul_forward, matmul_params)             \
    X(matmul_bf16_forward, matmul_bf16_params)   \
    X(matvec_f32, matvec_params)                 \
    X(quantize_q8, quantize_q8_params)           \
    X(matvec_q8, matvec_q8_params)

#define PYLLM_DECLARE(name, P) void name(const P* p);
PYLLM_KERNELS(PYLLM_DECLARE)
#undef PYLLM_DECLARE

// Out of memory: a kernel that cannot get its heap scratch leaves its outputs unwritten and counts one event here
// (from any thread). Callers compare the count before and after a call: bindings.cpp raises MemoryError, run.c's
// forward returns NULL. A count, not a flag, so concurrent callers never clear each other's event.
void kernels_oom_note(void);
unsigned kernels_oom_count(void);

// Threads used by the kernels (OpenMP); n <= 0 means "all cores".
void kernels_set_threads(int n);
int kernels_get_threads(void);

#ifdef __cplusplus
}
#endif
