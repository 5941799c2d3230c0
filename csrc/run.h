// run.h — C API of pyllm's standalone runtime (csrc/run.c): load a model.bin / llama2.c checkpoint and a tokenizer,
// run one token at a time with a KV cache, sample. Built as pyllm/lib/libpyllm_run.so (bound by pyllm/runtime.py
// with cffi) and linked into the pyllm-run binary. Every build_ returns NULL and fills err (one line) on failure.
#pragma once
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct run_model run_model;          // weights (mmap) + KV cache + activations
typedef struct run_tokenizer run_tokenizer;  // pyllm BPE or llama2.c tokenizer.bin (see csrc/tokenizer.h)

// Size of the err buffers of the *_build calls: PATH_MAX (4096) and the message, so an error keeps the whole path
// and the problem (512 bytes cut the problem, or the path, off a long path). pyllm/runtime.py uses the same.
#define RUN_ERR_LEN 4608

// --- model -------------------------------------------------------------------------------------------------------
run_model* run_model_build(const char* path, char* err, size_t errlen);
void run_model_free(run_model* m);
// Config, in this order: dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len, shared_classifier,
// weight_type (0 fp32, 1 q8_0), group_size, format (model_format in model_file.h). Returns the count written (11).
int run_model_config(const run_model* m, int* out, int n);
float run_model_norm_eps(const run_model* m);
float run_model_rope_theta(const run_model* m);
// Logits (vocab_size) for `token` at position `pos`, given that positions [0, pos) were already run (KV cache).
// NULL if token or pos is out of range, or a kernel ran out of memory for its scratch (then the KV cache row at pos
// may be unwritten). The pointer is owned by the model and overwritten by the next call.
float* run_forward(run_model* m, int token, int pos);

// --- sampling ----------------------------------------------------------------------------------------------------
// Next token from logits (n): greedy when temperature == 0, else softmax(logits/temperature) truncated to the top_k
// (0 = off) most likely tokens, the smallest set with probability >= top_p, and the tokens with probability >= min_p
// times the top token's (0 = off; HF order: top-k, top-p, min-p); random numbers from (seed, step)
// only (pyllm's shared sample kernel: the same draw as pyllm.ops.sample / model.generate with that seed and step).
// Returns -1 for NaN/+inf logits, -2 when out of memory for the sampler's scratch.
int run_sample(float* logits, int n, float temperature, float top_p, int top_k, float min_p, uint64_t seed, int step);

// --- tokenizer ---------------------------------------------------------------------------------------------------
run_tokenizer* run_tokenizer_build(const char* path, int vocab_size, char* err, size_t errlen);
void run_tokenizer_free(run_tokenizer* t);
// 0 when t is the tokenizer.bin exported with m (a pyllm model.bin names it by CRC-32; other formats and older
// exports name none and pass); else -1 with a one-line message naming t's file.
int run_tokenizer_check(const run_model* m, run_tokenizer* t, char* err, size_t errlen);
// Encode UTF-8 text into ids (at most max_ids; add_bos prepends the BOS id). Returns the count, or -1: a character
// has no token (a tokenizer without byte fallback), -2: more than max_ids ids, -3: out of memory.
int run_encode(run_tokenizer* t, const char* text, int add_bos, int* ids, int max_ids);
// The same for len bytes of text, which may hold NUL bytes: run_encode stops at the first one (C strings), where
// pyllm.tokenizer encodes "\0" as a byte token like any other (pyllm/runtime.py's CTokenizer uses this one).
int run_encode_len(run_tokenizer* t, const char* text, size_t len, int add_bos, int* ids, int max_ids);
const char* run_tokenizer_path(run_tokenizer* t);  // as given to run_tokenizer_build (for error messages)
// The bytes of token `id` (pointer into the tokenizer; *len set). `prev` lets llama2.c's tokenizer strip the
// leading space after BOS. NULL for an id out of range.
const char* run_decode(run_tokenizer* t, int prev, int id, int* len);
int run_token_id(run_tokenizer* t, const char* piece);  // id of an exact piece such as "<|user|>", or -1
int run_bos_id(run_tokenizer* t);
int run_is_special(run_tokenizer* t, int id);  // 1 for a control token such as <|end|> (not text), else 0
int run_tokenizer_vocab_size(run_tokenizer* t);  // ids are in [0, vocab_size)

#ifdef __cplusplus
}
#endif
