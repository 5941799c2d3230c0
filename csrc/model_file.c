// model_file.c — mmap loader and validator for pyllm model.bin and llama2.c v0/v1/v2 checkpoints (see model_file.h).
// The layout is walked twice: once with 64-bit checked offsets only (to compare the size the header implies with the
// file's real size), then again forming pointers, which are then all in bounds and aligned by construction.
#define _POSIX_C_SOURCE 200809L
#include "model_file.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

// Limits well above any model this runtime can run on a CPU; they keep every product below 2^62.
#define MAX_DIM (1 << 16)
#define MAX_HIDDEN (1 << 18)
#define MAX_LAYERS 1024
#define MAX_VOCAB (1 << 24)
#define MAX_SEQ (1 << 20)

const char* model_format_name(model_format f) {
    switch (f) {
    case MODEL_FORMAT_PYLLM: return "pyllm model.bin v1";
    case MODEL_FORMAT_LLAMA2C_V0: return "llama2.c legacy v0";
    case MODEL_FORMAT_LLAMA2C_V1: return "llama2.c v1";
    case MODEL_FORMAT_LLAMA2C_V2: return "llama2.c v2 (Q8_0)";
    }
    return "unknown";
}

// "path: message" into err (one line); returns -1 so callers can `return fail(...)`.
static int vfail(char* err, size_t errlen, const char* path, const char* fmt, va_list ap) {
    if (err && errlen) {
        int n = snprintf(err, errlen, "%s: ", path);
        if (n < 0 || (size_t)n >= errlen) n = 0;
        vsnprintf(err + n, errlen - (size_t)n, fmt, ap);
    }
    return -1;
}

static int fail(char* err, size_t errlen, const char* path, const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vfail(err, errlen, path, fmt, ap);
    va_end(ap);
    return -1;
}

// Format the message first (it may read m's header fields), then unmap.
static int bail(model_file* m, char* err, size_t errlen, const char* path, const char* fmt, ...)
    __attribute__((format(printf, 5, 6)));
static int bail(model_file* m, char* err, size_t errlen, const char* path, const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vfail(err, errlen, path, fmt, ap);
    va_end(ap);
    model_file_free(m);
    return -1;
}

static int32_t rd_i32(const unsigned char* p) { int32_t v; memcpy(&v, p, 4); return v; }
static uint32_t rd_u32(const unsigned char* p) { uint32_t v; memcpy(&v, p, 4); return v; }
static float rd_f32(const unsigned char* p) { float v; memcpy(&v, p, 4); return v; }

// Checked layout cursor: offsets in 64-bit, pointers formed only when base != NULL.
typedef struct {
    const unsigned char* base;
    uint64_t off;
    int overflow, misaligned;
} cursor;

static uint64_t cur_take(cursor* c, uint64_t bytes, uint64_t align) {
    if (align > 1) {
        uint64_t pad = (align - c->off % align) % align;
        if (c->off > UINT64_MAX - pad) { c->overflow = 1; return 0; }
        c->off += pad;
    }
    uint64_t at = c->off;
    if (c->off > UINT64_MAX - bytes) { c->overflow = 1; return 0; }
    c->off += bytes;
    return at;
}

static const float* cur_f32(cursor* c, uint64_t n, uint64_t align) {
    uint64_t at = cur_take(c, n * 4, align);
    if (at % 4) c->misaligned = 1;
    return (c->base && !c->overflow && !c->misaligned) ? (const float*)(const void*)(c->base + at) : NULL;
}

static const int8_t* cur_i8(cursor* c, uint64_t n, uint64_t align) {
    uint64_t at = cur_take(c, n, align);
    return (c->base && !c->overflow) ? (const int8_t*)(c->base + at) : NULL;
}

static model_matrix cur_matrix(cursor* c, const model_config* cfg, uint64_t n, uint64_t k, uint64_t align) {
    model_matrix m = {0};
    if (cfg->weight_type == WEIGHT_Q8_0) {
        m.q = cur_i8(c, n * k, align);
        m.s = cur_f32(c, n * k / (uint64_t)cfg->group_size, align);
    } else {
        m.f = cur_f32(c, n * k, align);
    }
    return m;
}

// Walk the tensors of `m->format` from offset `start`; fills m's pointers when base != NULL. Returns the end offset.
static uint64_t layout(model_file* m, const unsigned char* base, uint64_t start, int* overflow, int* misaligned) {
    const model_config* p = &m->cfg;
    cursor c = {base, start, 0, 0};
    const uint64_t L = (uint64_t)p->n_layers, D = (uint64_t)p->dim, F = (uint64_t)p->hidden_dim,
                   V = (uint64_t)p->vocab_size, hd = D / (uint64_t)p->n_heads, qd = hd * (uint64_t)p->n_heads,
                   kvd = hd * (uint64_t)p->n_kv_heads;
    model_layer* ly = m->layers;
    if (m->format == MODEL_FORMAT_PYLLM) {
        const uint64_t A = MODEL_ALIGN;
        m->tok_emb = cur_matrix(&c, p, V, D, A);
        for (uint64_t l = 0; l < L; l++) {
            model_layer t;
            t.rms_att = cur_f32(&c, D, A);
            t.wq = cur_matrix(&c, p, qd, D, A);
            t.wk = cur_matrix(&c, p, kvd, D, A);
            t.wv = cur_matrix(&c, p, kvd, D, A);
            t.wo = cur_matrix(&c, p, D, qd, A);
            t.rms_ffn = cur_f32(&c, D, A);
            t.w1 = cur_matrix(&c, p, F, D, A);
            t.w2 = cur_matrix(&c, p, D, F, A);
            t.w3 = cur_matrix(&c, p, F, D, A);
            if (ly) ly[l] = t;
        }
        m->rms_final = cur_f32(&c, D, A);
        m->cls = p->shared_classifier ? m->tok_emb : cur_matrix(&c, p, V, D, A);
        uint64_t end = c.off;
        *overflow = c.overflow;
        *misaligned = c.misaligned;
        return end;
    }
    // llama2.c: each tensor kind is stored for all layers in a row. Stacked matrices are walked one layer at a time
    // (same bytes: for v2 each layer's int8 block is followed by its scales, exactly as export.py writes them).
#define EACH_LAYER(field, expr) for (uint64_t l = 0; l < L; l++) { __typeof__(ly[0].field) t_ = expr; if (ly) ly[l].field = t_; }
    if (m->format == MODEL_FORMAT_LLAMA2C_V0) {
        m->tok_emb = cur_matrix(&c, p, V, D, 1);
        EACH_LAYER(rms_att, cur_f32(&c, D, 1));
        EACH_LAYER(wq, cur_matrix(&c, p, qd, D, 1));
        EACH_LAYER(wk, cur_matrix(&c, p, kvd, D, 1));
        EACH_LAYER(wv, cur_matrix(&c, p, kvd, D, 1));
        EACH_LAYER(wo, cur_matrix(&c, p, D, qd, 1));
        EACH_LAYER(rms_ffn, cur_f32(&c, D, 1));
        EACH_LAYER(w1, cur_matrix(&c, p, F, D, 1));
        EACH_LAYER(w2, cur_matrix(&c, p, D, F, 1));
        EACH_LAYER(w3, cur_matrix(&c, p, F, D, 1));
        m->rms_final = cur_f32(&c, D, 1);
        cur_take(&c, 2 * (uint64_t)p->seq_len * (hd / 2) * 4, 1);  // freq_cis_real, freq_cis_imag: unused
        m->cls = p->shared_classifier ? m->tok_emb : cur_matrix(&c, p, V, D, 1);
    } else {  // v1, v2: fp32 norms first, then the matrices (fp32 for v1, int8 + scales for v2)
        EACH_LAYER(rms_att, cur_f32(&c, D, 1));
        EACH_LAYER(rms_ffn, cur_f32(&c, D, 1));
        m->rms_final = cur_f32(&c, D, 1);
        m->tok_emb = cur_matrix(&c, p, V, D, 1);
        EACH_LAYER(wq, cur_matrix(&c, p, qd, D, 1));
        EACH_LAYER(wk, cur_matrix(&c, p, kvd, D, 1));
        EACH_LAYER(wv, cur_matrix(&c, p, kvd, D, 1));
        EACH_LAYER(wo, cur_matrix(&c, p, D, qd, 1));
        EACH_LAYER(w1, cur_matrix(&c, p, F, D, 1));
        EACH_LAYER(w2, cur_matrix(&c, p, D, F, 1));
        EACH_LAYER(w3, cur_matrix(&c, p, F, D, 1));
        m->cls = p->shared_classifier ? m->tok_emb : cur_matrix(&c, p, V, D, 1);
    }
#undef EACH_LAYER
    *overflow = c.overflow;
    *misaligned = c.misaligned;
    return c.off;
}

// Returns NULL if the config is runnable, else a description of the first problem.
static const char* check_config(const model_config* p, char* buf, size_t n) {
#define BAD(...) do { snprintf(buf, n, __VA_ARGS__); return buf; } while (0)
#define RANGE(f, hi) if (p->f <= 0 || p->f > (hi)) BAD(#f " %d is out of range [1, %d]", p->f, (int)(hi))
    RANGE(dim, MAX_DIM);
    RANGE(hidden_dim, MAX_HIDDEN);
    RANGE(n_layers, MAX_LAYERS);
    RANGE(n_heads, p->dim);
    RANGE(n_kv_heads, p->n_heads);
    RANGE(vocab_size, MAX_VOCAB);
    RANGE(seq_len, MAX_SEQ);
#undef RANGE
    if (p->dim % p->n_heads) BAD("dim %d is not divisible by n_heads %d", p->dim, p->n_heads);
    if (p->n_heads % p->n_kv_heads) BAD("n_heads %d is not a multiple of n_kv_heads %d", p->n_heads, p->n_kv_heads);
    if ((p->dim / p->n_heads) % 2) BAD("head size %d must be even for RoPE", p->dim / p->n_heads);
    if (p->dim / p->n_heads > 256) BAD("head size %d is larger than the 256 the attention kernel supports", p->dim / p->n_heads);
    if (!(p->norm_eps > 0.f && p->norm_eps < 1.f)) BAD("norm_eps %g is not in (0, 1)", (double)p->norm_eps);
    if (!(p->rope_theta > 0.f && isfinite(p->rope_theta))) BAD("rope_theta %g is not positive", (double)p->rope_theta);
    if (p->weight_type == WEIGHT_Q8_0) {
        if (p->group_size <= 0 || p->group_size > p->dim) BAD("group size %d is out of range [1, dim]", p->group_size);
        if (p->dim % p->group_size || p->hidden_dim % p->group_size)  // llama2.c's export.py checks dim only: its
            // runq.c then skips the last hidden % group units of w2 (stories260K / 42M: 44 of 172 / 96 of 1376)
            BAD("group size %d does not divide dim %d and hidden_dim %d (llama2.c's export.py checks dim only, and "
                "its runq.c then skips weights): run the fp32 v0/v1 file, or export with a group size dividing both",
                p->group_size, p->dim, p->hidden_dim);
    } else if (p->weight_type != WEIGHT_F32) {
        BAD("weight type %d is unknown (0 = fp32, 1 = q8_0)", p->weight_type);
    }
    return NULL;
#undef BAD
}

static void read_dims(model_config* p, const unsigned char* h) {
    p->dim = rd_i32(h + 0);
    p->hidden_dim = rd_i32(h + 4);
    p->n_layers = rd_i32(h + 8);
    p->n_heads = rd_i32(h + 12);
    p->n_kv_heads = rd_i32(h + 16);
    p->vocab_size = rd_i32(h + 20);
    p->seq_len = rd_i32(h + 24);
}

int model_file_build(model_file* m, const char* path, char* err, size_t errlen) {
    memset(m, 0, sizeof(*m));
    int fd = open(path, O_RDONLY | O_NONBLOCK);  // a FIFO must not block the open (a hang): it is refused below
    if (fd < 0) return fail(err, errlen, path, "cannot open: %s", strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return fail(err, errlen, path, "not a regular file");
    }
    uint64_t size = (uint64_t)st.st_size;
    if (size < 28) {
        close(fd);
        return fail(err, errlen, path, "file is %llu bytes, too small for any model header", (unsigned long long)size);
    }
    void* map = mmap(NULL, (size_t)size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);  // the mapping keeps the file alive
    if (map == MAP_FAILED) return fail(err, errlen, path, "mmap failed: %s", strerror(errno));
    m->map = map;
    m->map_size = (size_t)size;
    const unsigned char* h = (const unsigned char*)map;
    model_config* p = &m->cfg;
    p->norm_eps = 1e-5f;       // llama2.c's fixed math
    p->rope_theta = 10000.0f;
    uint64_t start;
    uint32_t magic = rd_u32(h);
    char why[400];
    if (magic == PYLLM_MODEL_MAGIC || magic == LLAMA2C_MAGIC) {
        if (size < MODEL_HEADER_BYTES) {
            return bail(m, err, errlen, path, "truncated header: %llu bytes, the header alone is %d",
                        (unsigned long long)size, MODEL_HEADER_BYTES);
        }
        int version = rd_i32(h + 4);
        read_dims(p, h + 8);
        start = MODEL_HEADER_BYTES;
        if (magic == PYLLM_MODEL_MAGIC) {
            if (version != PYLLM_MODEL_VERSION) {
                return bail(m, err, errlen, path, "pyllm model.bin version %d is not supported (this runtime reads "
                            "version %d; re-export with this pyllm)", version, PYLLM_MODEL_VERSION);
            }
            m->format = MODEL_FORMAT_PYLLM;
            p->norm_eps = rd_f32(h + 36);
            p->rope_theta = rd_f32(h + 40);
            p->shared_classifier = h[44];
            p->weight_type = h[45];
            p->group_size = rd_i32(h + 48);
            m->tokenizer_crc = rd_u32(h + 52);
            if (p->shared_classifier > 1) {
                return bail(m, err, errlen, path, "corrupt header: shared_classifier flag is %d", p->shared_classifier);
            }
            if (p->weight_type == WEIGHT_F32 && p->group_size != 0) {
                return bail(m, err, errlen, path, "corrupt header: fp32 weights with group size %d", p->group_size);
            }
        } else {
            if (version != 1 && version != 2) {
                return bail(m, err, errlen, path, "llama2.c checkpoint version %d is not supported (reads v0, v1, v2)",
                            version);
            }
            m->format = version == 1 ? MODEL_FORMAT_LLAMA2C_V1 : MODEL_FORMAT_LLAMA2C_V2;
            p->shared_classifier = h[36];
            if (p->shared_classifier > 1) {
                return bail(m, err, errlen, path, "corrupt header: shared_classifier flag is %d", p->shared_classifier);
            }
            if (version == 2) {
                p->weight_type = WEIGHT_Q8_0;
                p->group_size = rd_i32(h + 37);
            }
        }
        const char* bad = check_config(p, why, sizeof(why));
        if (bad) {
            return bail(m, err, errlen, path, "invalid %s header: %s", model_format_name(m->format), bad);
        }
    } else {
        // No magic: llama2.c's legacy v0 (7 int32, negative vocab = separate classifier). Reject with a hint.
        m->format = MODEL_FORMAT_LLAMA2C_V0;
        read_dims(p, h);
        p->shared_classifier = p->vocab_size > 0;
        if (p->vocab_size < 0 && p->vocab_size > -MAX_VOCAB - 1) p->vocab_size = -p->vocab_size;
        start = 28;
        const char* bad = check_config(p, why, sizeof(why));
        if (bad) {
            return bail(m, err, errlen, path, "not a model file: no pyllm magic (PLLM) or llama2.c magic (ak42), and "
                        "not a valid llama2.c v0 header (%s)", bad);
        }
    }
    int overflow = 0, misaligned = 0;
    uint64_t need = layout(m, NULL, start, &overflow, &misaligned);
    if (overflow) {
        return bail(m, err, errlen, path, "header sizes overflow");
    }
    if (misaligned) {
        return bail(m, err, errlen, path, "unsupported %s: an fp32 tensor is not 4-byte aligned (group size %d)",
                    model_format_name(m->format), p->group_size);
    }
    if (need != size) {
        uint64_t have = size;
        return bail(m, err, errlen, path, "%s: header implies %llu bytes but the file has %llu (%s)",
                    model_format_name(m->format), (unsigned long long)need, (unsigned long long)have,
                    have < need ? "truncated" : "trailing data: wrong format or corrupt header");
    }
    m->layers = (model_layer*)calloc((size_t)p->n_layers, sizeof(model_layer));
    if (!m->layers) {
        return bail(m, err, errlen, path, "out of memory");
    }
    layout(m, h, start, &overflow, &misaligned);
    return 0;
}

void model_file_free(model_file* m) {
    if (m->map) munmap(m->map, m->map_size);
    free(m->layers);
    model_format f = m->format;
    memset(m, 0, sizeof(*m));
    m->format = f;  // kept so an error message can still name the format
}
