// model_file.h — mmap loader for the C runtime's model files: pyllm's model.bin and llama2.c's v0/v1/v2 checkpoints.
// Used by csrc/run.c (build with `make run`). Every header field is validated before any pointer is formed, so a
// truncated, corrupt or hostile file gives one error string, never a crash.
//
// pyllm model.bin, version 1 (little-endian; written by pyllm/export.py):
//   header, 256 bytes:  0 u32 magic 0x4d4c4c50 ("PLLM")   4 i32 version (1)
//                       8 i32 dim  12 hidden_dim  16 n_layers  20 n_heads  24 n_kv_heads  28 vocab_size  32 seq_len
//                      36 f32 norm_eps  40 f32 rope_theta  44 u8 shared_classifier  45 u8 weight_type (0 fp32, 1 q8_0)
//                      46 u16 zero  48 i32 group_size (q8_0 only, else 0)
//                      52 u32 tokenizer_crc: zlib's CRC-32 of the tokenizer.bin exported with it (0: none, unchecked;
//                         export renames two files, so a crash between them must not pair a new model with an old
//                         tokenizer of the same vocab silently)   56.. zero
//   then tensors, each starting on a 64-byte boundary (zero padding between):
//     tok_emb (V, dim); per layer: rms_att (dim), wq (H*hd, dim), wk (Hkv*hd, dim), wv (Hkv*hd, dim), wo (dim, H*hd),
//     rms_ffn (dim), w1 (hidden, dim) gate, w2 (dim, hidden) down, w3 (hidden, dim) up; rms_final (dim);
//     classifier (V, dim) unless shared.
//   Norm weights are always fp32. Matrices are fp32, or for q8_0: int8 values (n*k) then, on the next 64-byte
//   boundary, fp32 scales (n, k/group) with scale = max|w|/127 per group (llama2.c v2 semantics).
//   wq/wk rows are in adjacent-pair ("interleaved") RoPE order, as in llama2.c, so one RoPE convention serves all.
#pragma once
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define PYLLM_MODEL_MAGIC 0x4d4c4c50u   // "PLLM" as bytes in the file
#define PYLLM_MODEL_VERSION 1
#define LLAMA2C_MAGIC 0x616b3432u       // "ak42" as llama2.c's export.py writes it
#define MODEL_HEADER_BYTES 256
#define MODEL_ALIGN 64

typedef enum { MODEL_FORMAT_PYLLM = 0, MODEL_FORMAT_LLAMA2C_V0, MODEL_FORMAT_LLAMA2C_V1, MODEL_FORMAT_LLAMA2C_V2 } model_format;
typedef enum { WEIGHT_F32 = 0, WEIGHT_Q8_0 = 1 } weight_type;

typedef struct {
    int dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len;
    float norm_eps, rope_theta;
    int shared_classifier;  // classifier == token embedding
    int weight_type;        // WEIGHT_F32 | WEIGHT_Q8_0
    int group_size;         // q8_0 group along the input dim (0 for fp32)
} model_config;

// A weight matrix (n, k) row-major: f (fp32) or q (int8 (n, k)) + s (fp32 (n, k/group)).
typedef struct {
    const float* f;
    const int8_t* q;
    const float* s;
} model_matrix;

typedef struct {
    const float* rms_att;    // (dim)
    model_matrix wq;         // (n_heads*head_dim, dim)
    model_matrix wk, wv;     // (n_kv_heads*head_dim, dim)
    model_matrix wo;         // (dim, n_heads*head_dim)
    const float* rms_ffn;    // (dim)
    model_matrix w1, w3;     // (hidden_dim, dim)
    model_matrix w2;         // (dim, hidden_dim)
} model_layer;

typedef struct {
    model_config cfg;
    model_format format;
    model_matrix tok_emb;    // (vocab, dim)
    model_layer* layers;     // (n_layers)
    const float* rms_final;  // (dim)
    model_matrix cls;        // (vocab, dim); == tok_emb when shared
    uint32_t tokenizer_crc;  // pyllm format: CRC-32 of the tokenizer.bin exported with it; 0 = unknown
    void* map;               // the whole file, mmap'ed read-only
    size_t map_size;
} model_file;

// Open and validate `path`. 0 on success; -1 with a one-line message in err (naming the file and the problem).
int model_file_build(model_file* m, const char* path, char* err, size_t errlen);
void model_file_free(model_file* m);
const char* model_format_name(model_format f);

#ifdef __cplusplus
}
#endif
