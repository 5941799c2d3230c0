// run.c — pyllm's standalone inference binary (llama2.c-style): one C11 file on pyllm's shared CPU kernels.
// Build: `make run` (or `python setup.py build_ext --inplace`, which also makes pyllm/bin/pyllm-run and the C API
// library pyllm/lib/libpyllm_run.so with -DPYLLM_RUN_LIBRARY). Run: `./run model.bin -z tokenizer.bin -i "Once"`.
// Reads pyllm model.bin (fp32 or Q8_0) and llama2.c v0/v1/v2 checkpoints (csrc/model_file.h). Threads: OMP_NUM_THREADS.
#define _POSIX_C_SOURCE 200809L
#include "run.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cpu/kernels.h"
#include "model_file.h"
#if __has_include("tokenizer.h")
#include "tokenizer.h"
#define RUN_HAVE_TOKENIZER 1
#endif

// ---------------------------------------------------------------------------------------------------------------
// Kernels the forward needs. Each wrapper calls the shared dispatched kernel from csrc/cpu/kernels.h where one exists.

// TODO(shared kernel): replace with matvec_f32 when landed.
static void mv_f32(float* y, const float* W, const float* x, int n, int k) {  // y (n) = W (n, k) @ x (k)
    #pragma omp parallel for schedule(static)
    for (int i = 0; i < n; i++) {
        const float* w = W + (size_t)i * k;
        float a[8] = {0};
        int j = 0;
        for (; j + 8 <= k; j += 8)
            for (int u = 0; u < 8; u++) a[u] += w[j + u] * x[j + u];
        float s = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
        for (; j < k; j++) s += w[j] * x[j];
        y[i] = s;
    }
}

// TODO(shared kernel): replace with quantize_q8 when landed. x (k) -> xq (k) int8 + xs (k/G): scale = max|x|/127.
static void q8_quantize(int8_t* xq, float* xs, const float* x, int k, int G) {
    for (int g = 0; g < k / G; g++) {
        float amax = 0.f;
        for (int j = 0; j < G; j++) amax = fmaxf(amax, fabsf(x[g * G + j]));
        float s = amax / 127.0f, inv = s != 0.f ? 1.0f / s : 0.f;
        xs[g] = s;
        for (int j = 0; j < G; j++) xq[g * G + j] = (int8_t)roundf(x[g * G + j] * inv);
    }
}

// TODO(shared kernel): replace with matvec_q8 when landed. y (n) = Wq (n, k) int8 * Ws (n, k/G) @ x quantized.
static void mv_q8(float* y, const int8_t* Wq, const float* Ws, const int8_t* xq, const float* xs, int n, int k, int G) {
    #pragma omp parallel for schedule(static)
    for (int i = 0; i < n; i++) {
        const int8_t* w = Wq + (size_t)i * k;
        const float* ws = Ws + (size_t)i * (k / G);
        float s = 0.f;
        for (int g = 0; g < k / G; g++) {
            int32_t acc = 0;
            for (int j = 0; j < G; j++) acc += (int32_t)w[g * G + j] * (int32_t)xq[g * G + j];
            s += (float)acc * ws[g] * xs[g];
        }
        y[i] = s;
    }
}

// TODO(shared kernel): replace with decode_attention when landed. q (H, hd); caches (T_max, Hkv, hd) -> out (H, hd).
static void attend(float* out, const float* q, const float* kc, const float* vc, float* att, int H, int Hkv, int hd,
                   int n_ctx) {
    const int kvd = Hkv * hd, kv_mul = H / Hkv;
    const float scale = 1.0f / sqrtf((float)hd);
    #pragma omp parallel for schedule(static) if (n_ctx > 64)
    for (int h = 0; h < H; h++) {
        const float* qh = q + h * hd;
        float* a = att + (size_t)h * n_ctx;  // (n_ctx) this head's scores
        const int kh = h / kv_mul;
        float mx = -INFINITY;
        for (int t = 0; t < n_ctx; t++) {
            const float* k = kc + (size_t)t * kvd + kh * hd;
            float s = 0.f;
            for (int i = 0; i < hd; i++) s += qh[i] * k[i];
            a[t] = s * scale;
            mx = fmaxf(mx, a[t]);
        }
        float sum = 0.f;
        for (int t = 0; t < n_ctx; t++) { a[t] = expf(a[t] - mx); sum += a[t]; }
        float* o = out + h * hd;
        for (int i = 0; i < hd; i++) o[i] = 0.f;
        for (int t = 0; t < n_ctx; t++) {
            const float* v = vc + (size_t)t * kvd + kh * hd;
            const float w = a[t] / sum;
            for (int i = 0; i < hd; i++) o[i] += w * v[i];
        }
    }
}

static void rmsnorm(float* out, const float* x, const float* w, int n, float eps) {
    rmsnorm_params p = {.out = out, .rstd = NULL, .x = x, .weight = w, .N = 1, .C = n, .eps = eps};
    rmsnorm_forward(&p);
}

// ---------------------------------------------------------------------------------------------------------------
// Model: mmap'ed weights, KV cache, activations.

struct run_model {
    model_file f;
    float *x, *xb, *xb2, *q, *hb, *hb2, *att, *logits;  // activations; att (n_heads, seq_len)
    float *key_cache, *value_cache;                     // (n_layers, seq_len, kv_dim)
    int8_t* xq;                                         // (max(dim, hidden)) quantized activation (q8_0)
    float* xs;                                          // (max(dim, hidden) / group)
};

run_model* run_model_build(const char* path, char* err, size_t errlen) {
    run_model* m = (run_model*)calloc(1, sizeof(run_model));
    if (!m) { snprintf(err, errlen, "%s: out of memory", path); return NULL; }
    if (model_file_build(&m->f, path, err, errlen) != 0) { free(m); return NULL; }
    const model_config* p = &m->f.cfg;
    const size_t D = p->dim, F = p->hidden_dim, hd = D / p->n_heads, qd = hd * p->n_heads,
                 kvd = hd * p->n_kv_heads, S = p->seq_len, big = F > qd ? (F > D ? F : D) : (qd > D ? qd : D);
    const size_t kv_bytes = 2 * (size_t)p->n_layers * S * kvd * sizeof(float);
    if (kv_bytes > ((size_t)64 << 30)) {
        snprintf(err, errlen, "%s: KV cache would need %zu GiB (seq_len %d); too large", path, kv_bytes >> 30,
                 p->seq_len);
        run_model_free(m);
        return NULL;
    }
    m->x = calloc(D, sizeof(float));
    m->xb = calloc(big, sizeof(float));
    m->xb2 = calloc(D, sizeof(float));
    m->q = calloc(qd, sizeof(float));
    m->hb = calloc(F, sizeof(float));
    m->hb2 = calloc(F, sizeof(float));
    m->att = calloc((size_t)p->n_heads * S, sizeof(float));
    m->logits = calloc((size_t)p->vocab_size, sizeof(float));
    m->key_cache = calloc((size_t)p->n_layers * S * kvd, sizeof(float));
    m->value_cache = calloc((size_t)p->n_layers * S * kvd, sizeof(float));
    m->xq = calloc(big, 1);
    m->xs = calloc(big, sizeof(float));
    if (!m->x || !m->xb || !m->xb2 || !m->q || !m->hb || !m->hb2 || !m->att || !m->logits || !m->key_cache ||
        !m->value_cache || !m->xq || !m->xs) {
        snprintf(err, errlen, "%s: out of memory for the KV cache and activations", path);
        run_model_free(m);
        return NULL;
    }
    return m;
}

void run_model_free(run_model* m) {
    if (!m) return;
    model_file_free(&m->f);
    free(m->x); free(m->xb); free(m->xb2); free(m->q); free(m->hb); free(m->hb2); free(m->att); free(m->logits);
    free(m->key_cache); free(m->value_cache); free(m->xq); free(m->xs);
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

// y (n) = W (n, k) @ x (k), fp32 or Q8_0 (x is quantized per group first, as llama2.c's runq.c does).
static void matvec(run_model* m, float* y, const model_matrix* W, const float* x, int n, int k) {
    if (W->f) {
        mv_f32(y, W->f, x, n, k);
    } else {
        const int G = m->f.cfg.group_size;
        q8_quantize(m->xq, m->xs, x, k, G);
        mv_q8(y, W->q, W->s, m->xq, m->xs, n, k, G);
    }
}

// Adjacent-pair RoPE on (n_heads, hd) rows: pairs (2i, 2i+1) rotate by pos * theta^(-2i/hd). Computed in fp32 the
// way pyllm's torch model does it (inv_freq = 1/theta^(2i/hd); angle = pos * inv_freq) so logits match closely.
static void rope_pairs(float* v, int n_heads, int hd, int pos, float theta) {
    for (int i = 0; i < hd; i += 2) {
        const float inv_freq = 1.0f / powf(theta, (float)i / (float)hd);
        const float ang = (float)pos * inv_freq, c = cosf(ang), s = sinf(ang);
        for (int h = 0; h < n_heads; h++) {
            float* r = v + h * hd + i;
            const float a = r[0], b = r[1];
            r[0] = a * c - b * s;
            r[1] = a * s + b * c;
        }
    }
}

float* run_forward(run_model* m, int token, int pos) {
    const model_config* p = &m->f.cfg;
    if (token < 0 || token >= p->vocab_size || pos < 0 || pos >= p->seq_len) return NULL;
    const int D = p->dim, F = p->hidden_dim, H = p->n_heads, Hkv = p->n_kv_heads, hd = D / H, qd = H * hd,
              kvd = Hkv * hd, S = p->seq_len;
    float* x = m->x;  // (D) the residual stream
    const model_matrix* E = &m->f.tok_emb;
    if (E->f) {
        memcpy(x, E->f + (size_t)token * D, (size_t)D * sizeof(float));
    } else {
        const int G = p->group_size;
        const int8_t* q = E->q + (size_t)token * D;
        const float* s = E->s + (size_t)token * (D / G);
        for (int i = 0; i < D; i++) x[i] = q[i] * s[i / G];
    }
    for (int l = 0; l < p->n_layers; l++) {
        const model_layer* w = &m->f.layers[l];
        float* kc = m->key_cache + (size_t)l * S * kvd;    // (S, Hkv, hd)
        float* vc = m->value_cache + (size_t)l * S * kvd;  // (S, Hkv, hd)
        rmsnorm(m->xb, x, w->rms_att, D, p->norm_eps);
        matvec(m, m->q, &w->wq, m->xb, qd, D);
        matvec(m, kc + (size_t)pos * kvd, &w->wk, m->xb, kvd, D);  // k, v written straight into the cache
        matvec(m, vc + (size_t)pos * kvd, &w->wv, m->xb, kvd, D);
        rope_pairs(m->q, H, hd, pos, p->rope_theta);
        rope_pairs(kc + (size_t)pos * kvd, Hkv, hd, pos, p->rope_theta);
        attend(m->xb, m->q, kc, vc, m->att, H, Hkv, hd, pos + 1);
        matvec(m, m->xb2, &w->wo, m->xb, D, qd);
        for (int i = 0; i < D; i++) x[i] += m->xb2[i];
        rmsnorm(m->xb, x, w->rms_ffn, D, p->norm_eps);
        matvec(m, m->hb, &w->w1, m->xb, F, D);
        matvec(m, m->hb2, &w->w3, m->xb, F, D);
        for (int i = 0; i < F; i++) {  // SwiGLU: silu(gate) * up
            const float g = m->hb[i];
            m->hb[i] = g / (1.0f + expf(-g)) * m->hb2[i];
        }
        matvec(m, m->xb2, &w->w2, m->hb, D, F);
        for (int i = 0; i < D; i++) x[i] += m->xb2[i];
    }
    rmsnorm(x, x, m->f.rms_final, D, p->norm_eps);
    matvec(m, m->logits, &m->f.cls, x, p->vocab_size, D);
    return m->logits;
}

// ---------------------------------------------------------------------------------------------------------------
// Sampling.

static uint64_t splitmix64(uint64_t z) {
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

typedef struct { float p; int i; } prob_index;
static int cmp_desc(const void* a, const void* b) {
    float x = ((const prob_index*)a)->p, y = ((const prob_index*)b)->p;
    return (x < y) - (x > y);
}

// TODO(shared kernel): replace with sample when landed (counter-based RNG on (seed, row, step)).
int run_sample(float* logits, int n, float temperature, float top_p, int top_k, uint64_t seed, int step) {
    int best = 0;
    for (int i = 1; i < n; i++) if (logits[i] > logits[best]) best = i;
    if (!(temperature > 0.f)) return best;
    float mx = logits[best], sum = 0.f;
    for (int i = 0; i < n; i++) { logits[i] = expf((logits[i] - mx) / temperature); sum += logits[i]; }
    const float u = (float)((splitmix64(seed ^ splitmix64((uint64_t)step)) >> 40) * (1.0 / 16777216.0));
    if ((top_k <= 0 || top_k >= n) && !(top_p < 1.f)) {  // plain multinomial
        float c = 0.f, r = u * sum;
        for (int i = 0; i < n; i++) { c += logits[i]; if (r < c) return i; }
        return best;
    }
    prob_index* pi = (prob_index*)malloc((size_t)n * sizeof(prob_index));
    if (!pi) return best;
    for (int i = 0; i < n; i++) { pi[i].p = logits[i] / sum; pi[i].i = i; }
    qsort(pi, (size_t)n, sizeof(prob_index), cmp_desc);
    int keep = (top_k > 0 && top_k < n) ? top_k : n;
    float c = 0.f;
    for (int i = 0; i < keep; i++) {
        c += pi[i].p;
        if (c >= top_p) { keep = i + 1; break; }
    }
    float tot = 0.f;
    for (int i = 0; i < keep; i++) tot += pi[i].p;
    float r = u * tot, acc = 0.f;
    int out = pi[keep - 1].i;
    for (int i = 0; i < keep; i++) { acc += pi[i].p; if (r < acc) { out = pi[i].i; break; } }
    free(pi);
    return out;
}

// ---------------------------------------------------------------------------------------------------------------
// Tokenizer: a thin wrapper over csrc/tokenizer.h (pyllm BPE or llama2.c tokenizer.bin, detected from the file).

#ifdef RUN_HAVE_TOKENIZER
struct run_tokenizer { tokenizer t; };

run_tokenizer* run_tokenizer_build(const char* path, int vocab_size, char* err, size_t errlen) {
    run_tokenizer* t = (run_tokenizer*)calloc(1, sizeof(run_tokenizer));
    if (!t) { snprintf(err, errlen, "%s: out of memory", path); return NULL; }
    if (tokenizer_build(&t->t, path, err, errlen) != 0) { free(t); return NULL; }
    if (vocab_size > 0 && t->t.vocab_size != vocab_size) {
        snprintf(err, errlen, "%s: tokenizer has %d tokens but the model's vocab_size is %d (wrong tokenizer?)", path,
                 t->t.vocab_size, vocab_size);
        run_tokenizer_free(t);
        return NULL;
    }
    return t;
}
void run_tokenizer_free(run_tokenizer* t) { if (t) { tokenizer_free(&t->t); free(t); } }
int run_encode(run_tokenizer* t, const char* text, int add_bos, int* ids, int max_ids) {
    int n = tokenizer_encode(&t->t, text, strlen(text), add_bos, (int32_t*)ids, max_ids);
    return n < 0 ? -1 : n;
}
const char* run_decode(run_tokenizer* t, int prev, int id, int* len) {
    size_t n = 0;
    const char* s = tokenizer_decode(&t->t, prev, id, &n);
    *len = (int)n;
    return s;
}
int run_token_id(run_tokenizer* t, const char* piece) { return tokenizer_special(&t->t, piece); }
int run_bos_id(run_tokenizer* t) { return t->t.bos_id; }
static int tok_is_special(run_tokenizer* t, int id) {
    return t->t.is_special && id >= 0 && id < t->t.vocab_size && t->t.is_special[id];
}
static int tok_eos(run_tokenizer* t) { return t->t.eos_id; }
#else
struct run_tokenizer { int unused; };
run_tokenizer* run_tokenizer_build(const char* path, int vocab_size, char* err, size_t errlen) {
    (void)vocab_size;
    snprintf(err, errlen, "%s: this build has no tokenizer (csrc/tokenizer.c missing)", path);
    return NULL;
}
void run_tokenizer_free(run_tokenizer* t) { (void)t; }
int run_encode(run_tokenizer* t, const char* text, int add_bos, int* ids, int max_ids) {
    (void)t; (void)text; (void)add_bos; (void)ids; (void)max_ids;
    return -1;
}
const char* run_decode(run_tokenizer* t, int prev, int id, int* len) { (void)t; (void)prev; (void)id; *len = 0; return NULL; }
int run_token_id(run_tokenizer* t, const char* piece) { (void)t; (void)piece; return -1; }
int run_bos_id(run_tokenizer* t) { (void)t; return -1; }
static int tok_is_special(run_tokenizer* t, int id) { (void)t; (void)id; return 0; }
static int tok_eos(run_tokenizer* t) { (void)t; return -1; }
#endif

// ---------------------------------------------------------------------------------------------------------------
// The command-line program.
#ifndef PYLLM_RUN_LIBRARY

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void print_token(run_tokenizer* tok, int prev, int id) {
    if (tok_is_special(tok, id)) return;  // <|end|> etc. are control tokens, not text
    int len = 0;
    const char* s = run_decode(tok, prev, id, &len);
    if (s && len > 0) fwrite(s, 1, (size_t)len, stdout);
    fflush(stdout);
}

typedef struct {
    float temperature, top_p;
    int top_k, steps;
    uint64_t seed;
} gen_opts;

static int next_token(run_model* m, float* logits, const gen_opts* o, int step) {
    return run_sample(logits, m->f.cfg.vocab_size, o->temperature, o->top_p, o->top_k, o->seed, step);
}

static int generate(run_model* m, run_tokenizer* tok, const char* prompt, const gen_opts* o) {
    int max_ids = (int)strlen(prompt) + 3;
    int* ids = (int*)malloc((size_t)max_ids * sizeof(int));
    int n = ids ? run_encode(tok, prompt, 1, ids, max_ids) : -1;
    if (n < 1) { fprintf(stderr, "pyllm-run: error: cannot encode the prompt\n"); free(ids); return 1; }
    const int bos = run_bos_id(tok);
    int token = ids[0], pos = 0, generated = 0;
    double t0 = 0;
    while (pos < o->steps) {
        float* logits = run_forward(m, token, pos);
        int next = pos + 1 < n ? ids[pos + 1] : next_token(m, logits, o, pos);
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
        fprintf(stderr, "pyllm-run: error: chat mode needs a pyllm tokenizer with <|bos|> <|system|> <|user|> "
                        "<|assistant|> <|end|> tokens\n");
        return 1;
    }
    const int cap = 1 << 16;
    int* ids = (int*)malloc((size_t)cap * sizeof(int));
    char* line = (char*)malloc(cap);
    if (!ids || !line) { free(ids); free(line); fprintf(stderr, "pyllm-run: error: out of memory\n"); return 1; }
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
                if (k < 0) { fprintf(stderr, "pyllm-run: error: system prompt too long\n"); rc = 1; break; }
                n += k;
                ids[n++] = end;
            }
        }
        const char* user = NULL;
        if (turn == 0 && first_user && *first_user) {
            user = first_user;
        } else {
            printf("User: ");
            fflush(stdout);
            if (!fgets(line, cap, stdin)) break;
            line[strcspn(line, "\r\n")] = 0;
            user = line;
        }
        ids[n++] = usr;
        int k = run_encode(tok, user, 0, ids + n, cap - n - 3);
        if (k < 0) { fprintf(stderr, "pyllm-run: error: message too long\n"); rc = 1; break; }
        n += k;
        ids[n++] = end;
        ids[n++] = ast;
        if (pos + n >= o->steps) { fprintf(stderr, "pyllm-run: context full (%d positions)\n", o->steps); break; }
        float* logits = NULL;
        for (int i = 0; i < n; i++) logits = run_forward(m, ids[i], pos++);
        printf("Assistant: ");
        fflush(stdout);
        double t0 = now_s();
        int token = ast;
        pending = -1;
        while (pos < o->steps) {
            int next = next_token(m, logits, o, pos);
            n_gen++;
            if (next == end) { pending = end; break; }
            print_token(tok, token, next);
            token = next;
            logits = run_forward(m, token, pos++);
        }
        t_gen += now_s() - t0;
        printf("\n");
        fflush(stdout);
        if (pending < 0) { fprintf(stderr, "pyllm-run: context full (%d positions)\n", o->steps); break; }
    }
    if (n_gen > 0 && t_gen > 0) fprintf(stderr, "achieved tok/s: %.2f (%ld generated)\n", n_gen / t_gen, n_gen);
    free(ids);
    free(line);
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
            "  -s <int>    random seed (default: time)\n"
            "  -n <int>    steps: forward passes, BOS and prompt included, as in llama2.c; 0 = seq_len (default 256)\n"
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
    for (int i = 1; i < argc; i++)
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) { usage(stdout); return 0; }
    if (argc < 2) { usage(stderr); return 2; }
    const char* model_path = argv[1];
    if (model_path[0] == '-') return bad_arg("the first argument must be the model path, got", model_path);
    gen_opts o = {1.0f, 0.9f, 0, 256, (uint64_t)time(NULL)};
    const char *prompt = "", *tok_path = NULL, *mode = "generate", *system = NULL;
    for (int i = 2; i < argc; i += 2) {
        const char* a = argv[i];
        if (a[0] != '-' || strlen(a) != 2 || !strchr("tpksnizmy", a[1])) return bad_arg("unknown option", a);
        if (i + 1 >= argc) return bad_arg("missing value for", a);
        const char* v = argv[i + 1];
        char* e = NULL;
        switch (a[1]) {
        case 't': o.temperature = strtof(v, &e); if (*e || !(o.temperature >= 0.f) || isinf(o.temperature)) return bad_arg("-t needs a temperature >= 0, got", v); break;
        case 'p': o.top_p = strtof(v, &e); if (*e || !(o.top_p > 0.f && o.top_p <= 1.f)) return bad_arg("-p needs a value in (0, 1], got", v); break;
        case 'k': { long k = strtol(v, &e, 10); if (*e || !*v || k < 0 || k > (1 << 30)) return bad_arg("-k needs an integer >= 0, got", v); o.top_k = (int)k; break; }
        case 's': { unsigned long long s = strtoull(v, &e, 10); if (*e || !*v) return bad_arg("-s needs an integer seed, got", v); o.seed = s; break; }
        case 'n': { long n = strtol(v, &e, 10); if (*e || !*v || n < 0 || n > (1 << 30)) return bad_arg("-n needs an integer >= 0, got", v); o.steps = (int)n; break; }
        case 'i': prompt = v; break;
        case 'z': tok_path = v; break;
        case 'm': mode = v; if (strcmp(v, "generate") && strcmp(v, "chat")) return bad_arg("-m must be generate or chat, got", v); break;
        case 'y': system = v; break;
        }
    }
    const char* isa_err = isa_env_error();
    if (isa_err) { fprintf(stderr, "pyllm-run: error: %s\n", isa_err); return 2; }
    char err[512];
    run_model* m = run_model_build(model_path, err, sizeof(err));
    if (!m) { fprintf(stderr, "pyllm-run: error: %s\n", err); return 1; }
    char tok_buf[4096];
    if (!tok_path) {  // tokenizer.bin in the model's directory
        const char* slash = strrchr(model_path, '/');
        int dl = slash ? (int)(slash - model_path + 1) : 0;
        snprintf(tok_buf, sizeof(tok_buf), "%.*stokenizer.bin", dl, model_path);
        tok_path = tok_buf;
    }
    run_tokenizer* tok = run_tokenizer_build(tok_path, m->f.cfg.vocab_size, err, sizeof(err));
    if (!tok) { fprintf(stderr, "pyllm-run: error: %s\n", err); run_model_free(m); return 1; }
    if (o.steps == 0 || o.steps > m->f.cfg.seq_len) o.steps = m->f.cfg.seq_len;
    int rc = !strcmp(mode, "chat") ? chat(m, tok, prompt, system, &o) : generate(m, tok, prompt, &o);
    (void)tok_eos;
    run_tokenizer_free(tok);
    run_model_free(m);
    return rc;
}
#endif  // PYLLM_RUN_LIBRARY
