// kernels_cuda.h — the C API of pyllm's CUDA kernels (csrc/cuda/*.cu), called by csrc/bindings.cpp.
// Same style as csrc/cpu/kernels.h: raw device pointers + sizes in a params struct, plus the caller's stream
// (a cudaStream_t passed as void* so this header needs no CUDA headers; NULL = the legacy default stream).
// Every function returns NULL on success or a one-line error ("file:line: call: cudaError text") — every launch
// is checked with cudaGetLastError. Nothing here synchronizes or allocates: scratch buffers come from the caller.
// Where a CPU params struct (cpu/kernels.h) has exactly the right fields it is reused, so both sides agree.
#pragma once
#include <stddef.h>
#include <stdint.h>
#include "../cpu/kernels.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef void* pyllm_stream;  // cudaStream_t

// Number of visible CUDA devices; 0 (never an error) when there is no driver or no GPU.
int pyllm_cuda_device_count(void);

// --- matmul (matmul.cu) ------------------------------------------------------------------------------------
// C (M, N) = A (M, K) . B (N, K)^T, fp32 accumulate ("NT": both operands K-contiguous, like x @ W.T).
// dtype 0 = fp32 operands and output (simple tiled FFMA kernel); dtype 1 = bf16 / 2 = fp16 operands, same-type
// output (tensor cores, mma.sync m16n8k16, cp.async + ldmatrix, 3-stage pipeline, when K % 8 == 0 and A, B are
// 16-byte aligned; otherwise the simple kernel). out_f32 = 1 writes fp32 C even for 16-bit operands.
typedef struct {
    void* c;             // (M, N)  written
    const void* a;       // (M, K)
    const void* b;       // (N, K)
    int M, N, K;
    int dtype;           // 0 fp32, 1 bf16, 2 fp16
    int out_f32;         // 16-bit operands only: 1 = fp32 output
} matmul_cuda_params;
const char* matmul_cuda(const matmul_cuda_params* p, pyllm_stream stream);

// --- attention (attention.cu), fp32 ----------------------------------------------------------------------
// Forward: the CPU attention_params (causal, GQA, optional doc_ids; lse saved (B, H, T)). D <= 256.
const char* attention_forward_cuda(const attention_params* p, pyllm_stream stream);
// Backward by recomputation (no T x T buffer); `delta` (B, H, T) fp32 is caller-provided scratch.
// Deterministic: dq and dk/dv are computed by separate kernels, no atomics.
const char* attention_backward_cuda(const attention_backward_params* p, float* delta, pyllm_stream stream);

// --- attention, bf16 tensor cores (attention_bf16.cu) ------------------------------------------------------
// Same semantics as the fp32 pair above (causal, GQA, optional doc_ids; lse natural-log, fp32) on bf16 q/k/v/out,
// FA2-style mma.sync kernels. D must be 64 or 128 and every bf16 pointer 16-byte aligned (else an error string).
// Backward: dq, dk, dv in bf16 (fp32 accumulate), deterministic (separate dq and dk/dv kernels, no atomics);
// `delta` (B, H, T) fp32 is caller scratch.
typedef struct {
    void* out;               // (B, T, H, D)   bf16, written
    float* lse;              // (B, H, T)      written: log-sum-exp of each query row's scaled scores
    const void* q;           // (B, T, H, D)   bf16
    const void* k;           // (B, T, Hkv, D) bf16
    const void* v;           // (B, T, Hkv, D) bf16
    const int32_t* doc_ids;  // (B, T) or NULL
    int B, T, H, Hkv, D;
} attention_bf16_params;
typedef struct {
    void* dq;                // (B, T, H, D)   bf16, written
    void* dk;                // (B, T, Hkv, D) bf16, written
    void* dv;                // (B, T, Hkv, D) bf16, written
    const void* dout;        // (B, T, H, D)   bf16
    const void* out;         // (B, T, H, D)   bf16, from the forward
    const float* lse;        // (B, H, T)      from the forward
    const void* q;           // (B, T, H, D)   bf16
    const void* k;           // (B, T, Hkv, D) bf16
    const void* v;           // (B, T, Hkv, D) bf16
    const int32_t* doc_ids;  // (B, T) or NULL
    int B, T, H, Hkv, D;
} attention_bf16_backward_params;
const char* attention_bf16_forward_cuda(const attention_bf16_params* p, pyllm_stream stream);
const char* attention_bf16_backward_cuda(const attention_bf16_backward_params* p, float* delta, pyllm_stream stream);

// Decode attention (split-K over the context): the CPU decode_attention_params; `ws` is caller scratch of
// decode_attention_cuda_ws_floats(p) floats. n_ctx_dev (1 int64 on the device, or NULL): the context length, read
// by the kernel and clamped to [1, p->n_ctx] (then the bound): graph-capturable decode with a device position.
long decode_attention_cuda_ws_floats(const decode_attention_params* p);
const char* decode_attention_cuda(const decode_attention_params* p, const long long* n_ctx_dev, float* ws,
                                  pyllm_stream stream);

// --- sampling (sample.cu) ----------------------------------------------------------------------------------
// One block per row. temperature <= 0: greedy (argmax, smallest index on ties), logprob under T = 1; top_k = 1
// is that argmax too. Otherwise q = exp((logit - max) / T) (mask: disallowed -> 0; 1/T clamped to FLT_MAX), then in
// the CPU kernel's order: top_k (k-th largest q, by bisection on the float bits), top_p over what top_k kept (the
// largest threshold t with mass(q >= t) >= top_p * kept mass, by bisection — no sort), min_p (q >= min_p); then
// draw with the CPU kernel's u = hash(seed, step, row) (53 bits). Ties at a cut are all kept (the CPU keeps the
// lower ids), so rows with such ties, and float sums in another order, can draw other tokens than the CPU.
// logprob = log_softmax(logits / T)[token] over the full row: unmasked and untruncated, as the CPU kernel.
typedef struct {
    int64_t* tokens;         // (B)     written
    float* logprobs;         // (B)     written
    const float* logits;     // (B, V)
    const uint8_t* mask;     // (B, V)  1 = allowed, or NULL
    int B, V;
    float temperature, top_p, min_p;
    int top_k;               // 0 = off
    uint64_t seed, step;
} sample_cuda_params;
const char* sample_cuda(const sample_cuda_params* p, pyllm_stream stream);

// --- fused elementwise / row ops (fused.cu), fp32 ----------------------------------------------------------
const char* rmsnorm_forward_cuda(const rmsnorm_params* p, pyllm_stream stream);
// dweight is overwritten (not accumulated): column sums are reduced inside, deterministic.
const char* rmsnorm_backward_cuda(const rmsnorm_backward_params* p, pyllm_stream stream);

typedef struct {
    float* out;          // (B, T, H, D) written (may alias x)
    const float* x;      // (B, T, H, D)
    const float* cos;    // (T, D/2)
    const float* sin;    // (T, D/2)
    int B, T, H, D;
    int inverse;         // 1: rotate by -angle (the backward of rope is rope with -sin)
} rope_cuda_params;
const char* rope_cuda(const rope_cuda_params* p, pyllm_stream stream);

typedef struct {
    float* out;          // (n)  forward: silu(gate) * up
    float* dgate;        // (n)  backward only
    float* dup;          // (n)  backward only
    const float* gate;   // (n)
    const float* up;     // (n)
    const float* dout;   // (n)  backward only (NULL for forward)
    long n;
} swiglu_cuda_params;
const char* swiglu_cuda(const swiglu_cuda_params* p, pyllm_stream stream);

// Cross-entropy per row: loss[i] = logsumexp(logits[i]) - logits[i, t_i] (0 where t_i == ignore_index), and
// with dlogits != NULL: dlogits[i] = (softmax(logits[i]) - onehot(t_i)) * scale (0 rows where ignored).
typedef struct {
    float* losses;            // (N)     written
    float* dlogits;           // (N, V)  written when not NULL
    const float* logits;      // (N, V)
    const int64_t* targets;   // (N)
    int N, V;
    long ignore_index;
    float scale;              // gradient scale (dloss / n_valid)
} cross_entropy_cuda_params;
const char* cross_entropy_cuda(const cross_entropy_cuda_params* p, pyllm_stream stream);

// AdamW, one step over n fp32 params (PyTorch's formula, decoupled weight decay).
typedef struct {
    float* param; float* m; float* v;  // (n) updated in place
    const float* grad;                 // (n)
    long n;
    float lr, beta1, beta2, eps, weight_decay;
    int step;                          // 1-based, for bias correction
} adamw_cuda_params;
const char* adamw_cuda(const adamw_cuda_params* p, pyllm_stream stream);

#ifdef __cplusplus
}
#endif
