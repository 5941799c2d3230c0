// run.c — pyllm's standalone inference binary (llama2.c-style): one C11 file on pyllm's shared CPU kernels.
// Build: `make run` (or `python setup.py build_ext --inplace`, which also makes pyllm/bin/pyllm-run and the C API
// library pyllm/lib/libpyllm_run.so with -DPYLLM_RUN_LIBRARY). Run: `./run model.bin -z tokenizer.bin -i "Once"`.
// Reads pyllm model.bin (fp32 or Q8_0) and llama2.c v0/v1/v2 checkpoints (csrc/model_file.h). Threads: OMP_NUM_THREADS.
#define _POSIX_C_SOURCE 200809L
#include "run.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu/kernels.h"
#include "model_file.h"
#include "tokenizer.h"

// ---------------------------------------------------------------------------------------------------------------
// Kernels the forward needs. Each wrapper calls the shared dispatched kernel from csrc/cpu/kernels.h where one exists.

static void rmsnorm(float* out, const float* x, const float* w, int n, float eps) {
    rmsnorm_params p = {.out = out, .rstd = NULL, .x = x, .weight = w, .N = 1, .C = n, .eps = eps};
    rmsnorm_forward(&p);
}

// ---------------------------------------------------------------------------------------------------------------
// Model: mmap'ed weights, KV cache, activations.

// One forward is one OpenMP parallel region (run_forward): each thread takes a block of the rows of every weight
// matrix (and a block of the attention heads) and the threads meet at 5 barriers per layer, where calling each
// kernel with its own `omp parallel for` cost 7 fork/joins per layer and left RMSNorm, RoPE, attention and the
// residual adds on one thread. Each thread keeps its own copy of the residual stream and of the normed, quantized
// activation (D floats: computing them twice costs less than a barrier), so only the matrix products and the
// heads are divided. Rows are split the same way for any thread count: logits do not depend on it.
typedef struct {
    float *x, *xb;         // (D) residual stream, normed activation (also the quantized attention output's source)
    int8_t* xq;            // (max(D, qd)) quantized xb or attention output (q8_0)
    float* xs;             // (max(D, qd) / G)
} run_thread_buf;

struct run_model {
    model_file f;
    float *att, *xb2, *q, *hb, *hb2, *logits;           // shared activations
    float *key_cache, *value_cache;                     // (n_layers, seq_len, kv_dim)
    int8_t* hq;                                         // (hidden) quantized SwiGLU output (q8_0)
    float* hs;                                          // (hidden / group)
    float* rope_cs;                                     // (head_dim) cos, sin of each pair at the current pos
    run_thread_buf* tb;                                 // (n_tb) per-thread buffers
    int n_tb;
    int cls_next;                                       // next classifier chunk to take (see forward_thread)
};

// (Re)allocates the per-thread buffers for nt threads. 0 on success.
static int thread_bufs(run_model* m, int nt) {
    if (nt <= m->n_tb) return 0;
    const model_config* p = &m->f.cfg;
    const size_t D = p->dim, qd = (size_t)(D / p->n_heads) * p->n_heads, big = qd > D ? qd : D;
    run_thread_buf* tb = (run_thread_buf*)realloc(m->tb, (size_t)nt * sizeof(run_thread_buf));
    if (!tb) return -1;
    m->tb = tb;
    for (; m->n_tb < nt; m->n_tb++) {
        run_thread_buf* b = &tb[m->n_tb];
        b->x = calloc(D, sizeof(float));
        b->xb = calloc(big, sizeof(float));
        b->xq = calloc(big, 1);
        b->xs = calloc(big, sizeof(float));
        if (!b->x || !b->xb || !b->xq || !b->xs) {
            free(b->x); free(b->xb); free(b->xq); free(b->xs);
            return -1;
        }
    }
    return 0;
}

run_model* run_model_build(const char* path, char* err, size_t errlen) {
    run_model* m = (run_model*)calloc(1, sizeof(run_model));
    if (!m) { snprintf(err, errlen, "%s: out of memory", path); return NULL; }
    if (model_file_build(&m->f, path, err, errlen) != 0) { free(m); return NULL; }
    (void)isa_get();            // the lazy ISA choice and CPU feature detection happen here, before any kernel
    (void)cpu_features_get();   // runs inside run_forward's parallel region
    const model_config* p = &m->f.cfg;
    const size_t D = p->dim, F = p->hidden_dim, hd = D / p->n_heads, qd = hd * p->n_heads,
                 kvd = hd * p->n_kv_heads, S = p->seq_len;
    const size_t kv_bytes = 2 * (size_t)p->n_layers * S * kvd * sizeof(float);
    if (kv_bytes > ((size_t)64 << 30)) {
        snprintf(err, errlen, "%s: KV cache would need %zu GiB (seq_len %d); too large", path, kv_bytes >> 30,
                 p->seq_len);
        run_model_free(m);
        return NULL;
    }
    m->att = calloc(qd, sizeof(float));
    m->xb2 = calloc(D, sizeof(float));
    m->q = calloc(qd, sizeof(float));
    m->hb = calloc(F, sizeof(float));
    m->hb2 = calloc(F, sizeof(float));
    m->hq = calloc(F, 1);
    m->hs = calloc(F, sizeof(float));
    m->rope_cs = calloc(hd, sizeof(float));
    m->logits = calloc((size_t)p->vocab_size, sizeof(float));
    m->key_cache = calloc((size_t)p->n_layers * S * kvd, sizeof(float));
    m->value_cache = calloc((size_t)p->n_layers * S * kvd, sizeof(float));
#ifdef _OPENMP
    const int nt = omp_get_max_threads();
#else
    const int nt = 1;
#endif
    if (!m->att || !m->xb2 || !m->q || !m->hb || !m->hb2 || !m->hq || !m->hs || !m->rope_cs || !m->logits ||
        !m->key_cache || !m->value_cache || thread_bufs(m, nt) != 0) {
        snprintf(err, errlen, "%s: out of memory for the KV cache and activations", path);
        run_model_free(m);
        return NULL;
    }
    return m;
}

void run_model_free(run_model* m) {
    if (!m) return;
    model_file_free(&m->f);
    free(m->att); free(m->xb2); free(m->q); free(m->hb); free(m->hb2); free(m->hq); free(m->hs); free(m->rope_cs);
    free(m->logits); free(m->key_cache); free(m->value_cache);
    for (int i = 0; i < m->n_tb; i++) { free(m->tb[i].x); free(m->tb[i].xb); free(m->tb[i].xq); free(m->tb[i].xs); }
    free(m->tb);
    free(m);
}

int run_model_config(const run_model* m, int* out, int n) {
    const model_config* p = &m->f.cfg;
    int v[11] = {p->dim, p->hidden_dim, p->n_layers, p->n_heads, p->n_kv_heads, p->vocab_size, p->seq_len,
                 p->shared_classifier, p->weight_type, p->group_size, (int)m->f.format};
    int k = n < 11 ? n : 11;
    for (int i = 0; i < k; i++) out[i] = v[i];
    return k;
}
float run_model_norm_eps(const run_model* m) { return m->f.cfg.norm_eps; }
float run_model_rope_theta(const run_model* m) { return m->f.cfg.rope_theta; }

// Rows [r0, r1) of y (n) = W (n, k) @ x (k), fp32 or Q8_0. For Q8_0 the caller has quantized x into (xq, xs)
// (llama2.c's runq.c: activations quantized per group, int8 dots, fp32 scales).
static void matvec_rows(const run_model* m, float* y, const model_matrix* W, const float* x, const int8_t* xq,
                        const float* xs, int r0, int r1, int k) {
    if (r0 >= r1) return;
    if (W->f) {
        matvec_params p = {.y = y + r0, .W = W->f + (size_t)r0 * k, .x = x, .n = r1 - r0, .k = k};
        matvec_f32(&p);
    } else {
        const int G = m->f.cfg.group_size;
        matvec_q8_params p = {.y = y + r0, .wq = W->q + (size_t)r0 * k, .ws = W->s + (size_t)r0 * (k / G), .x = x,
                              .xq_scratch = (int8_t*)xq, .xs_scratch = (float*)xs, .n = r1 - r0, .k = k, .G = G,
                              .x_quantized = 1};
        matvec_q8(&p);
    }
}

// Thread t of nt: its share [lo, hi) of n items, boundaries rounded down to a multiple of `align` (the last ends at n).
static void split(int n, int t, int nt, int align, int* lo, int* hi) {
    *lo = (int)((long)n * t / nt / align * align);
    *hi = t == nt - 1 ? n : (int)((long)n * (t + 1) / nt / align * align);
}

// Thread t's rows of the products y_j = W_j @ x for j < nj, all with the same x (k): the rows of W_0, W_1, ...
// counted as one list and split evenly, so e.g. wq, wk, wv cost one barrier, not three.
typedef struct { float* y; const model_matrix* W; int n; } mv_job;
static void matvec_share(const run_model* m, const mv_job* jobs, int nj, const float* x, const int8_t* xq,
                         const float* xs, int k, int t, int nt) {
    int total = 0;
    for (int j = 0; j < nj; j++) total += jobs[j].n;
    int lo, hi;
    split(total, t, nt, 16, &lo, &hi);
    for (int j = 0, base = 0; j < nj; base += jobs[j].n, j++) {
        const int a = lo > base ? lo - base : 0, b = hi - base < jobs[j].n ? hi - base : jobs[j].n;
        matvec_rows(m, jobs[j].y, jobs[j].W, x, xq, xs, a, b, k);
    }
}

static void quantize(int8_t* q, float* s, const float* x, int n, int G) {
    quantize_q8_params p = {.q = q, .s = s, .w = x, .n = 1, .k = n, .G = G};
    quantize_q8(&p);
}

// Adjacent-pair RoPE on (n_heads, hd) rows: pair (2i, 2i+1) rotates by the angle whose cos, sin are cs[2i], cs[2i+1].
static void rope_pairs(float* v, int n_heads, int hd, const float* cs) {
    for (int h = 0; h < n_heads; h++)
        for (int i = 0; i < hd; i += 2) {
            float* r = v + h * hd + i;
            const float a = r[0], b = r[1], c = cs[i], s = cs[i + 1];
            r[0] = a * c - b * s;
            r[1] = a * s + b * c;
        }
}

#ifndef CLS_CHUNK
#define CLS_CHUNK 512   // classifier rows per chunk: 63 chunks at vocab 32000
#endif

// Thread t's part of one forward (called inside the parallel region; see run_thread_buf).
static void forward_thread(run_model* m, int token, int pos, int t, int nt) {
    const model_config* p = &m->f.cfg;
    const int D = p->dim, F = p->hidden_dim, H = p->n_heads, Hkv = p->n_kv_heads, hd = D / H, qd = H * hd,
              kvd = Hkv * hd, S = p->seq_len, rep = H / Hkv, G = p->group_size, q8 = p->weight_type == WEIGHT_Q8_0;
    run_thread_buf* b = &m->tb[t];
    float* x = b->x;  // (D) the residual stream, this thread's copy
    const model_matrix* E = &m->f.tok_emb;
    if (E->f) {
        memcpy(x, E->f + (size_t)token * D, (size_t)D * sizeof(float));
    } else {
        const int8_t* q = E->q + (size_t)token * D;
        const float* s = E->s + (size_t)token * (D / G);
        for (int i = 0; i < D; i++) x[i] = q[i] * s[i / G];
    }
    int g0, g1, f0, f1;  // this thread's kv heads, and rows of w1/w3 (whole groups: it quantizes its own part)
    split(Hkv, t, nt, 1, &g0, &g1);
    split(F, t, nt, G > 0 ? (G % 16 == 0 ? G : G * 16) : 16, &f0, &f1);
    for (int l = 0; l < p->n_layers; l++) {
        const model_layer* w = &m->f.layers[l];
        float* kc = m->key_cache + (size_t)l * S * kvd;    // (S, Hkv, hd)
        float* vc = m->value_cache + (size_t)l * S * kvd;  // (S, Hkv, hd)
        rmsnorm(b->xb, x, w->rms_att, D, p->norm_eps);
        if (q8) quantize(b->xq, b->xs, b->xb, D, G);
        const mv_job qkv[3] = {{m->q, &w->wq, qd}, {kc + (size_t)pos * kvd, &w->wk, kvd},   // k, v written straight
                               {vc + (size_t)pos * kvd, &w->wv, kvd}};                      // into the cache
        matvec_share(m, qkv, 3, b->xb, b->xq, b->xs, D, t, nt);
        #pragma omp barrier
        if (g0 < g1) {  // heads: RoPE on this thread's q and k heads, then attention of its query heads
            rope_pairs(m->q + (size_t)g0 * rep * hd, (g1 - g0) * rep, hd, m->rope_cs);
            rope_pairs(kc + (size_t)pos * kvd + (size_t)g0 * hd, g1 - g0, hd, m->rope_cs);
            decode_attention_params ap = {.out = m->att + (size_t)g0 * rep * hd, .q = m->q + (size_t)g0 * rep * hd,
                                          .k_cache = kc + (size_t)g0 * hd, .v_cache = vc + (size_t)g0 * hd, .ld_b = 0,
                                          .ld_t = kvd, .B = 1, .H = (g1 - g0) * rep, .Hkv = g1 - g0, .D = hd,
                                          .n_ctx = pos + 1};
            decode_attention(&ap);
        }
        #pragma omp barrier
        if (q8) quantize(b->xq, b->xs, m->att, qd, G);
        const mv_job o = {m->xb2, &w->wo, D};
        matvec_share(m, &o, 1, m->att, b->xq, b->xs, qd, t, nt);
        #pragma omp barrier
        for (int i = 0; i < D; i++) x[i] += m->xb2[i];
        rmsnorm(b->xb, x, w->rms_ffn, D, p->norm_eps);
        if (q8) quantize(b->xq, b->xs, b->xb, D, G);
        if (f0 < f1) {  // rows [f0, f1) of w1 (gate) and w3 (up), SwiGLU on them, and their quantization for w2
            matvec_rows(m, m->hb, &w->w1, b->xb, b->xq, b->xs, f0, f1, D);
            matvec_rows(m, m->hb2, &w->w3, b->xb, b->xq, b->xs, f0, f1, D);
            swiglu_params sw = {.out = m->hb + f0, .gate = m->hb + f0, .up = m->hb2 + f0, .n = f1 - f0};
            swiglu_forward(&sw);
            if (q8) quantize(m->hq + f0, m->hs + f0 / G, m->hb + f0, f1 - f0, G);
        }
        #pragma omp barrier
        const mv_job down = {m->xb2, &w->w2, D};
        matvec_share(m, &down, 1, m->hb, m->hq, m->hs, F, t, nt);
        #pragma omp barrier
        for (int i = 0; i < D; i++) x[i] += m->xb2[i];
    }
    rmsnorm(b->xb, x, m->f.rms_final, D, p->norm_eps);
    if (q8) quantize(b->xq, b->xs, b->xb, D, G);
    // The classifier (the largest matrix: 60% of llama2.c 15M's Q8_0 bytes) in chunks of CLS_CHUNK rows taken
    // from a shared counter, not in equal shares: on this VM one of two threads often runs 30-50% slower for a
    // while (per-phase timers), and with equal shares the other waited for it at the end of every token. 2-thread
    // A/Bs against equal shares: 15M Q8_0 +7% (median of 25 interleaved pairs), 110M Q8_0 +6% (11 pairs);
    // 110M fp32 -3% (5 pairs, within noise). Logits do not depend on who computes which row.
    if (nt > 1) {
        for (;;) {
            const int r0 = __atomic_fetch_add(&m->cls_next, 1, __ATOMIC_RELAXED) * CLS_CHUNK;
            if (r0 >= p->vocab_size) break;
            const int r1 = r0 + CLS_CHUNK < p->vocab_size ? r0 + CLS_CHUNK : p->vocab_size;
            matvec_rows(m, m->logits, &m->f.cls, b->xb, b->xq, b->xs, r0, r1, D);
        }
    } else {
        matvec_rows(m, m->logits, &m->f.cls, b->xb, b->xq, b->xs, 0, p->vocab_size, D);
    }
}

float* run_forward(run_model* m, int token, int pos) {
    const model_config* p = &m->f.cfg;
    if (token < 0 || token >= p->vocab_size || pos < 0 || pos >= p->seq_len) return NULL;
    const unsigned oom0 = kernels_oom_count();
    const int hd = p->dim / p->n_heads;
    // RoPE angles of this position, computed in fp32 the way pyllm's torch model does (inv_freq = 1/theta^(2i/hd);
    // angle = pos * inv_freq) so logits match closely.
    for (int i = 0; i < hd; i += 2) {
        const float ang = (float)pos * (1.0f / powf(p->rope_theta, (float)i / (float)hd));
        m->rope_cs[i] = cosf(ang);
        m->rope_cs[i + 1] = sinf(ang);
    }
#ifdef _OPENMP
    int nt = omp_get_max_threads();
    if (thread_bufs(m, nt) != 0) nt = m->n_tb;             // out of memory for more: use what exists
    m->cls_next = 0;
    int ok = 1;
    #pragma omp parallel num_threads(nt)
    {
        if (omp_get_num_threads() != nt) {  // fewer threads than asked (nested call, limits): run on one
            #pragma omp single
            ok = 0;
        } else {
            forward_thread(m, token, pos, omp_get_thread_num(), nt);
        }
    }
    if (!ok) forward_thread(m, token, pos, 0, 1);
#else
    forward_thread(m, token, pos, 0, 1);
#endif
    return kernels_oom_count() == oom0 ? m->logits : NULL;
}

// ---------------------------------------------------------------------------------------------------------------
// Sampling.

int run_sample(float* logits, int n, float temperature, float top_p, int top_k, float min_p, uint64_t seed, int step) {
    int64_t token = -1;
    float logprob = 0.f;
    sample_params p = {.tokens = &token, .logprobs = &logprob, .logits = logits, .mask = NULL, .B = 1, .V = n,
                       .temperature = temperature, .top_k = top_k, .top_p = top_p, .min_p = min_p, .seed = seed,
                       .step = (uint64_t)step};
    sample_forward(&p);
    return token == -3 ? -2 : token < 0 ? -1 : (int)token;  // the kernel's -3 (out of memory) -> -2, -2 (NaN) -> -1
}

// ---------------------------------------------------------------------------------------------------------------
// Tokenizer: a thin wrapper over csrc/tokenizer.h (pyllm BPE or llama2.c tokenizer.bin, detected from the file).

struct run_tokenizer { tokenizer t; char path[RUN_ERR_LEN - 512]; };  // path: for errors at encode time

run_tokenizer* run_tokenizer_build(const char* path, int vocab_size, char* err, size_t errlen) {
    run_tokenizer* t = (run_tokenizer*)calloc(1, sizeof(run_tokenizer));
    if (!t) { snprintf(err, errlen, "%s: out of memory", path); return NULL; }
    if (tokenizer_build(&t->t, path, err, errlen) != 0) { free(t); return NULL; }
    snprintf(t->path, sizeof(t->path), "%s", path);
    if (vocab_size > 0 && t->t.vocab_size != vocab_size) {
        snprintf(err, errlen, "%s: tokenizer has %d tokens but the model's vocab_size is %d (wrong tokenizer?)", path,
                 t->t.vocab_size, vocab_size);
        run_tokenizer_free(t);
        return NULL;
    }
    if (t->t.bos_id < 0) {  // every prompt starts with it: this failed later as "cannot encode the prompt"
        snprintf(err, errlen, "%s: the tokenizer has no <|bos|> token (pyllm's tokenizers always have one)", path);
        run_tokenizer_free(t);
        return NULL;
    }
    return t;
}
void run_tokenizer_free(run_tokenizer* t) { if (t) { tokenizer_free(&t->t); free(t); } }
int run_tokenizer_check(const run_model* m, run_tokenizer* t, char* err, size_t errlen) {
    const uint32_t want = m->f.tokenizer_crc;
    if (!want || t->t.file_crc == want) return 0;
    snprintf(err, errlen, "%s: not the tokenizer.bin exported with this model.bin (its CRC-32 is %08x, the model names "
             "%08x): use the tokenizer.bin that the same `pyllm export` wrote, or export again", t->path,
             t->t.file_crc, want);
    return -1;
}
int run_encode_len(run_tokenizer* t, const char* text, size_t len, int add_bos, int* ids, int max_ids) {
    int n = tokenizer_encode(&t->t, text, len, add_bos, (int32_t*)ids, max_ids);
    return n >= 0 ? n : n == TOKENIZER_ERR_SPACE ? -2 : n == TOKENIZER_ERR_NOMEM ? -3 : -1;
}
int run_encode(run_tokenizer* t, const char* text, int add_bos, int* ids, int max_ids) {
    return run_encode_len(t, text, strlen(text), add_bos, ids, max_ids);
}
const char* run_tokenizer_path(run_tokenizer* t) { return t->path; }
const char* run_decode(run_tokenizer* t, int prev, int id, int* len) {
    size_t n = 0;
    const char* s = tokenizer_decode(&t->t, prev, id, &n);
    *len = (int)n;
    return s;
}
int run_token_id(run_tokenizer* t, const char* piece) { return tokenizer_special(&t->t, piece); }
int run_bos_id(run_tokenizer* t) { return t->t.bos_id; }
int run_tokenizer_vocab_size(run_tokenizer* t) { return t->t.vocab_size; }
int run_is_special(run_tokenizer* t, int id) {
    return t->t.is_special && id >= 0 && id < t->t.vocab_size && t->t.is_special[id];
}

// ---------------------------------------------------------------------------------------------------------------
// The command-line program.
#ifndef PYLLM_RUN_LIBRARY

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void print_token(run_tokenizer* tok, int prev, int id) {
    if (run_is_special(tok, id)) return;  // <|end|> etc. are control tokens, not text
    int len = 0;
    const char* s = run_decode(tok, prev, id, &len);
    // llama2.c's safe_printf: a <0xHH> byte token that is a control character (ESC of a terminal escape, NUL, ...)
    // is not printed; bytes >= 0x80 are (llama2.c drops them too, and with them the UTF-8 of every character
    // spelled in byte tokens). Only llama2.c tokenizers: pyllm's byte-level pieces print as Python decodes them.
    if (s && len == 1 && tok->t.kind == TOKENIZER_LLAMA2C) {
        const unsigned char c = (unsigned char)s[0];
        if ((c < 0x20 && c != '\n' && c != '\t' && c != '\r' && c != '\v' && c != '\f') || c == 0x7f) return;
    }
    if (s && len > 0) fwrite(s, 1, (size_t)len, stdout);
    fflush(stdout);
}

typedef struct {
    float temperature, top_p;
    int top_k, steps;
    uint64_t seed;
    float min_p;
} gen_opts;

// The one-line error for a failed step: no logits (out of memory in the forward) or a negative run_sample code.
static const char* step_error(const float* logits, int next) {
    if (!logits) return "out of memory in the forward (a kernel's scratch buffers)";
    return next == -2 ? "out of memory for the sampler's scratch buffers" : "the model produced NaN/inf logits";
}

static int next_token(run_model* m, float* logits, const gen_opts* o, int step) {
    return run_sample(logits, m->f.cfg.vocab_size, o->temperature, o->top_p, o->top_k, o->min_p, o->seed, step);
}

// Is s[0, n) well-formed UTF-8 (RFC 3629: no overlongs, no surrogates, nothing past U+10FFFF)? Python's tokenizer
// cannot take anything else, so the binary refuses it too (it was tokenized byte by byte, silently).
static int utf8_valid(const char* str, size_t n) {
    const unsigned char* s = (const unsigned char*)str;
    for (size_t i = 0; i < n;) {
        const unsigned c = s[i];
        const int len = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 0;
        if (!len || i + len > n) return 0;
        unsigned cp = len == 1 ? c : c & (0x7F >> len);
        for (int k = 1; k < len; k++) {
            if ((s[i + k] & 0xC0) != 0x80) return 0;
            cp = (cp << 6) | (s[i + k] & 0x3F);
        }
        static const unsigned min_cp[5] = {0, 0, 0x80, 0x800, 0x10000};
        if (cp < min_cp[len] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return 0;
        i += len;
    }
    return 1;
}

static int encode_failed(run_tokenizer* tok, const char* what, int code) {  // run_encode's error -> one line, rc 1
    if (code == -2)
        fprintf(stderr, "pyllm-run: error: the %s is too long\n", what);
    else if (code == -3)
        fprintf(stderr, "pyllm-run: error: out of memory encoding the %s\n", what);
    else
        fprintf(stderr, "pyllm-run: error: %s: the tokenizer has no token for a character of the %s (and no byte "
                        "fallback tokens)\n", run_tokenizer_path(tok), what);
    return 1;
}

static int generate(run_model* m, run_tokenizer* tok, const char* prompt, const gen_opts* o) {
    int max_ids = (int)strlen(prompt) + 3;
    int* ids = (int*)malloc((size_t)max_ids * sizeof(int));
    int n = ids ? run_encode(tok, prompt, 1, ids, max_ids) : -3;
    if (n < 1) { free(ids); return encode_failed(tok, "prompt (-i)", n); }
    if (n > o->steps) {  // was cut to the first -n tokens without a word
        fprintf(stderr, "pyllm-run: error: the prompt (-i) is %d tokens with BOS, more than the %d positions (-n, at "
                        "most the model's context)\n", n, o->steps);
        free(ids);
        return 1;
    }
    const int bos = run_bos_id(tok);
    int token = ids[0], pos = 0, generated = 0;
    double t0 = 0;
    while (pos < o->steps) {
        float* logits = run_forward(m, token, pos);
        // step = index of the generated token, as pyllm's model.generate counts it: same seed -> same tokens
        int next = !logits ? -1 : pos + 1 < n ? ids[pos + 1] : next_token(m, logits, o, generated);
        if (next < 0) { fprintf(stderr, "\npyllm-run: error: %s\n", step_error(logits, next)); free(ids); return 1; }
        pos++;
        if (pos >= n && next == bos) break;  // a new document: llama2.c's stop rule
        print_token(tok, token, next);
        if (pos >= n) generated++;
        token = next;
        if (t0 == 0) t0 = now_s();  // time from after the first forward, as llama2.c does
    }
    printf("\n");
    if (pos > 1) fprintf(stderr, "achieved tok/s: %.2f (%d positions, %d generated)\n", (pos - 1) / (now_s() - t0),
                         pos, generated);
    free(ids);
    return 0;
}

static int chat(run_model* m, run_tokenizer* tok, const char* first_user, const char* system, const gen_opts* o) {
    const int bos = run_token_id(tok, "<|bos|>"), sys = run_token_id(tok, "<|system|>"),
              usr = run_token_id(tok, "<|user|>"), ast = run_token_id(tok, "<|assistant|>"),
              end = run_token_id(tok, "<|end|>");
    if (bos < 0 || sys < 0 || usr < 0 || ast < 0 || end < 0) {
        fprintf(stderr, "pyllm-run: error: %s: chat mode needs a pyllm tokenizer with <|bos|> <|system|> <|user|> "
                        "<|assistant|> <|end|> tokens; missing:%s%s%s%s%s\n", run_tokenizer_path(tok),
                bos < 0 ? " <|bos|>" : "", sys < 0 ? " <|system|>" : "", usr < 0 ? " <|user|>" : "",
                ast < 0 ? " <|assistant|>" : "", end < 0 ? " <|end|>" : "");
        return 1;
    }
    const int cap = 1 << 16;
    int* ids = (int*)malloc((size_t)cap * sizeof(int));
    char* line = NULL;  // one stdin line (getline: any length; its byte count shows a NUL inside)
    size_t line_cap = 0;
    if (!ids) { fprintf(stderr, "pyllm-run: error: out of memory\n"); return 1; }
    int pos = 0, turn = 0, pending = -1, rc = 0;  // pending: the assistant's <|end|>, fed at the next turn
    double t_gen = 0;
    long n_gen = 0;
    for (;; turn++) {
        int n = 0;
        if (pending >= 0) ids[n++] = pending;
        if (turn == 0) {
            ids[n++] = bos;
            if (system && *system) {
                ids[n++] = sys;
                int k = run_encode(tok, system, 0, ids + n, cap - n - 4);
                if (k < 0) { rc = encode_failed(tok, "system prompt (-y)", k); break; }
                n += k;
                ids[n++] = end;
            }
        }
        if (turn == 0 && system && *system && n + 3 >= o->steps) {  // <|user|> <|end|> <|assistant|> and one reply token must fit
            fprintf(stderr, "pyllm-run: error: the system prompt (-y) takes %d of the %d context positions (-n), "
                            "leaving no room for a message and a reply\n", n, o->steps);
            rc = 1;
            break;
        }
        const char* user = NULL;
        if (turn == 0 && first_user && *first_user) {
            user = first_user;
        } else {
            printf("User: ");
            fflush(stdout);
            errno = 0;
            ssize_t len = getline(&line, &line_cap, stdin);
            if (len < 0) {  // the end of input, or a read error (stdin a directory, closed): not a clean end
                if (ferror(stdin)) {
                    fprintf(stderr, "pyllm-run: error: reading standard input: %s\n", strerror(errno ? errno : EIO));
                    rc = 1;
                }
                break;
            }
            if (len > 0 && line[len - 1] == '\n') line[--len] = 0;  // the line end only (a lone \r inside is text)
            if (len > 0 && line[len - 1] == '\r') line[--len] = 0;
            if (memchr(line, 0, (size_t)len)) {  // strlen stopped there: the rest of the line was dropped
                fprintf(stderr, "pyllm-run: error: the message contains a NUL byte\n");
                rc = 1;
                break;
            }
            if (!utf8_valid(line, (size_t)len)) {
                fprintf(stderr, "pyllm-run: error: the message is not valid UTF-8\n");
                rc = 1;
                break;
            }
            user = line;
        }
        ids[n++] = usr;
        int k = run_encode(tok, user, 0, ids + n, cap - n - 3);
        if (k < 0) { rc = encode_failed(tok, "message", k); break; }
        n += k;
        ids[n++] = end;
        ids[n++] = ast;
        if (pos + n >= o->steps) {
            if (turn == 0) {  // nothing was said yet: an error, not the end of a conversation
                fprintf(stderr, "pyllm-run: error: the first message (-i or stdin) takes %d of the %d context "
                                "positions (-n) with the chat template, leaving no room for a reply\n", n, o->steps);
                rc = 1;
            } else {
                fprintf(stderr, "pyllm-run: context full (%d positions)\n", o->steps);
            }
            break;
        }
        float* logits = NULL;
        for (int i = 0; i < n && (i == 0 || logits); i++) logits = run_forward(m, ids[i], pos++);
        printf("Assistant: ");
        fflush(stdout);
        double t0 = now_s();
        int token = ast;
        pending = -1;
        while (pos < o->steps) {
            int next = logits ? next_token(m, logits, o, (int)n_gen) : -1;
            if (next < 0) { fprintf(stderr, "\npyllm-run: error: %s\n", step_error(logits, next)); rc = 1; break; }
            n_gen++;
            if (next == end) { pending = end; break; }
            print_token(tok, token, next);
            token = next;
            logits = run_forward(m, token, pos++);
        }
        t_gen += now_s() - t0;
        printf("\n");
        fflush(stdout);
        if (rc) break;
        if (pending < 0) { fprintf(stderr, "pyllm-run: context full (%d positions)\n", o->steps); break; }
    }
    if (n_gen > 0 && t_gen > 0) fprintf(stderr, "achieved tok/s: %.2f (%ld generated)\n", n_gen / t_gen, n_gen);
    free(ids);
    free(line);  // getline's buffer (NULL if no line was read)
    return rc;
}

static void usage(FILE* f) {
    fprintf(f,
            "usage: pyllm-run <model.bin> [options]\n"
            "Runs a pyllm model.bin (fp32/Q8_0) or a llama2.c v0/v1/v2 checkpoint. Threads: OMP_NUM_THREADS.\n"
            "options:\n"
            "  -t <float>  temperature, 0 = greedy (default 1.0)\n"
            "  -p <float>  top-p (nucleus) mass in (0, 1], 1 = off (default 0.9)\n"
            "  -k <int>    top-k, 0 = off (default 0)\n"
            "  --min-p <f> min-p in [0, 1]: keep tokens at >= this times the top token's probability, "
            "0 = off (default 0)\n"
            "  -s <int>    random seed (default: time)\n"
            "  -n <int>    steps: forward passes, BOS and prompt included, as in llama2.c; 0 or more than the\n"
            "              model's context = the context (default 256)\n"
            "  -i <text>   prompt; in chat mode the first user message (default: empty)\n"
            "  -z <path>   tokenizer.bin, pyllm or llama2.c format (default: tokenizer.bin next to the model)\n"
            "  -m <mode>   generate|chat (default generate)\n"
            "  -y <text>   system prompt in chat mode (default: none)\n"
            "  -h, --help  this help\n");
}

static int bad_arg(const char* msg, const char* v) {
    fprintf(stderr, "pyllm-run: error: %s '%s' (see --help)\n", msg, v);
    return 2;
}

int main(int argc, char** argv) {
    for (int i = 1; i < argc; i += i == 1 ? 1 : 2)  // where an option may stand: "-i -h" is the prompt "-h"
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) { usage(stdout); return 0; }
    if (argc < 2) { usage(stderr); return 2; }
    const char* model_path = argv[1];
    if (model_path[0] == '-') return bad_arg("the first argument must be the model path, got", model_path);
    gen_opts o = {1.0f, 0.9f, 0, 256, (uint64_t)time(NULL), 0.f};
    const char *prompt = "", *tok_path = NULL, *mode = "generate", *system = NULL;
    for (int i = 2; i < argc; i += 2) {
        const char* a = argv[i];
        if (!strcmp(a, "--min-p")) {  // the one long option (llama.cpp's name); the rest are llama2.c's letters
            if (i + 1 >= argc) return bad_arg("missing value for", a);
            char* e = NULL;
            o.min_p = strtof(argv[i + 1], &e);
            if (*e || !*argv[i + 1] || !(o.min_p >= 0.f && o.min_p <= 1.f))
                return bad_arg("--min-p needs a value in [0, 1], got", argv[i + 1]);
            continue;
        }
        if (a[0] != '-' || strlen(a) != 2 || !strchr("tpksnizmy", a[1])) return bad_arg("unknown option", a);
        if (i + 1 >= argc) return bad_arg("missing value for", a);
        const char* v = argv[i + 1];
        char* e = NULL;
        switch (a[1]) {
        case 't': o.temperature = strtof(v, &e); if (*e || !*v || !(o.temperature >= 0.f) || isinf(o.temperature)) return bad_arg("-t needs a finite temperature >= 0, got", v); break;
        case 'p': o.top_p = strtof(v, &e); if (*e || !(o.top_p > 0.f && o.top_p <= 1.f)) return bad_arg("-p needs a value in (0, 1], got", v); break;
        case 'k': { long k = strtol(v, &e, 10); if (*e || !*v || k < 0 || k > (1 << 30)) return bad_arg("-k needs an integer in [0, 2^30], got", v); o.top_k = (int)k; break; }
        case 's': { errno = 0; unsigned long long s = strtoull(v, &e, 10); if (*e || !(*v >= '0' && *v <= '9') || errno == ERANGE) return bad_arg("-s needs an integer seed in [0, 2^64), got", v); o.seed = s; break; }
        case 'n': { long n = strtol(v, &e, 10); if (*e || !*v || n < 0 || n > (1 << 30)) return bad_arg("-n needs an integer in [0, 2^30], got", v); o.steps = (int)n; break; }
        case 'i': prompt = v; break;
        case 'z': tok_path = v; break;
        case 'm': mode = v; if (strcmp(v, "generate") && strcmp(v, "chat")) return bad_arg("-m must be generate or chat, got", v); break;
        case 'y': system = v; break;
        }
    }
    if (system && strcmp(mode, "chat")) return bad_arg("-y (a system prompt) needs -m chat; the mode is", mode);
    for (int k = 0; k < 2; k++) {  // before the model is read
        const char* text = k ? system : prompt;
        if (text && !utf8_valid(text, strlen(text))) {
            fprintf(stderr, "pyllm-run: error: the %s is not valid UTF-8\n", k ? "system prompt (-y)" : "prompt (-i)");
            return 2;
        }
    }
    const char* isa_err = isa_env_error();
    if (isa_err) { fprintf(stderr, "pyllm-run: error: %s\n", isa_err); return 2; }
    char err[RUN_ERR_LEN];
    run_model* m = run_model_build(model_path, err, sizeof(err));
    if (!m) { fprintf(stderr, "pyllm-run: error: %s\n", err); return 1; }
    char tok_buf[RUN_ERR_LEN];
    if (!tok_path) {  // tokenizer.bin in the model's directory
        const char* slash = strrchr(model_path, '/');
        int dl = slash ? (int)(slash - model_path + 1) : 0;
        snprintf(tok_buf, sizeof(tok_buf), "%.*stokenizer.bin", dl, model_path);
        tok_path = tok_buf;
    }
    run_tokenizer* tok = run_tokenizer_build(tok_path, m->f.cfg.vocab_size, err, sizeof(err));
    if (!tok) { fprintf(stderr, "pyllm-run: error: %s\n", err); run_model_free(m); return 1; }
    if (run_tokenizer_check(m, tok, err, sizeof(err))) {
        fprintf(stderr, "pyllm-run: error: %s\n", err);
        run_tokenizer_free(tok);
        run_model_free(m);
        return 1;
    }
    if (o.steps == 0 || o.steps > m->f.cfg.seq_len) o.steps = m->f.cfg.seq_len;
    int rc = !strcmp(mode, "chat") ? chat(m, tok, prompt, system, &o) : generate(m, tok, prompt, &o);
    run_tokenizer_free(tok);
    run_model_free(m);
    if (fflush(stdout) != 0 || ferror(stdout)) {  // a full disk or a closed pipe: the text did not all arrive
        fprintf(stderr, "pyllm-run: error: writing to standard output: %s\n", strerror(errno ? errno : EIO));
        return 1;
    }
    return rc;
}
#endif  // PYLLM_RUN_LIBRARY
