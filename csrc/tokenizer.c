// tokenizer.c — pyllm's C tokenizer: byte-level BPE identical to pyllm/tokenizer.py, and llama2.c's
// tokenizer.bin. C11, libc only. API and file format: tokenizer.h. Tests: tests/test_tokenizer_c.py.
// Both kinds share one merge engine: symbols in a doubly linked list + a binary min-heap of candidate pairs keyed
// (priority, position), so a pre-token of n bytes costs O(n log n) — a 100 KB run of CJK text stays fast.
#define _POSIX_C_SOURCE 200809L  // open/fstat/fdopen
#include "tokenizer.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define MAX_FILE_BYTES (1u << 30)
#define MAX_VOCAB (1 << 24)

static void set_err(char* err, size_t errlen, const char* fmt, ...) {
    if (!err || errlen == 0) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

// ---- reading --------------------------------------------------------------------------------------------
typedef struct {
    const uint8_t* p;
    size_t n, off;
} reader;

static int rd_u32(reader* r, uint32_t* v) {
    if (r->n - r->off < 4) return -1;
    const uint8_t* b = r->p + r->off;
    *v = (uint32_t)b[0] | (uint32_t)b[1] << 8 | (uint32_t)b[2] << 16 | (uint32_t)b[3] << 24;
    r->off += 4;
    return 0;
}

static int rd_i32(reader* r, int32_t* v) {
    uint32_t u;
    if (rd_u32(r, &u)) return -1;
    memcpy(v, &u, 4);
    return 0;
}

static int rd_f32(reader* r, float* v) {
    uint32_t u;
    if (rd_u32(r, &u)) return -1;
    memcpy(v, &u, 4);
    return 0;
}

static uint8_t* read_file(const char* path, size_t* n, char* err, size_t errlen) {
    // O_NONBLOCK: a FIFO would block the open until a writer came (a hang); only regular files are read (/dev/zero
    // was read up to the 1 GiB limit before the error)
    int fd = open(path, O_RDONLY | O_NONBLOCK);
    struct stat st;
    if (fd < 0) {
        set_err(err, errlen, "%s: cannot open tokenizer file: %s", path, strerror(errno));
        return NULL;
    }
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        set_err(err, errlen, "%s: not a regular file", path);
        return NULL;
    }
    FILE* f = fdopen(fd, "rb");
    if (!f) {
        set_err(err, errlen, "%s: cannot open tokenizer file: %s", path, strerror(errno));
        close(fd);
        return NULL;
    }
    size_t cap = 1 << 16, len = 0;
    uint8_t* buf = malloc(cap);
    while (buf) {
        if (len == cap) {
            if (cap >= MAX_FILE_BYTES) {
                set_err(err, errlen, "%s: tokenizer file larger than %u bytes", path, MAX_FILE_BYTES);
                free(buf);
                fclose(f);
                return NULL;
            }
            uint8_t* nb = realloc(buf, cap * 2);
            if (!nb) { free(buf); buf = NULL; break; }
            buf = nb;
            cap *= 2;
        }
        size_t got = fread(buf + len, 1, cap - len, f);
        len += got;
        if (got == 0) break;
    }
    int bad = ferror(f) ? (errno ? errno : EIO) : 0;  // e.g. EISDIR: a directory opens fine and fails on the first read
    fclose(f);
    if (!buf) {
        set_err(err, errlen, "%s: out of memory reading tokenizer", path);
        return NULL;
    }
    if (bad) {
        set_err(err, errlen, "%s: read error: %s", path, strerror(bad));
        free(buf);
        return NULL;
    }
    *n = len;
    return buf;
}

// zlib's CRC-32 (reflected polynomial 0xEDB88320), bit by bit: no table to build; a few ms per MB, once per load.
static uint32_t crc32_bytes(const uint8_t* p, size_t n) {
    uint32_t c = 0xFFFFFFFFu;
    for (size_t i = 0; i < n; i++) {
        c ^= p[i];
        for (int k = 0; k < 8; k++) c = (c >> 1) ^ (0xEDB88320u & (0u - (c & 1u)));
    }
    return ~c;
}

// ---- hash tables ------------------------------------------------------------------------------------------
static uint64_t mix64(uint64_t x) {
    x ^= x >> 33; x *= 0xff51afd7ed558ccdULL; x ^= x >> 33; x *= 0xc4ceb9fe1a85ec53ULL; x ^= x >> 33;
    return x;
}

static size_t pow2_at_least(size_t n) {
    size_t s = 16;
    while (s < n) s <<= 1;
    return s;
}

static const tokenizer_pair* pair_find(const tokenizer* t, int32_t a, int32_t b) {
    if (!t->pairs) return NULL;
    size_t mask = t->n_pair_slots - 1;
    size_t h = (size_t)mix64(((uint64_t)(uint32_t)a << 32) | (uint32_t)b) & mask;
    for (;;) {
        const tokenizer_pair* p = &t->pairs[h];
        if (!p->used) return NULL;
        if (p->left == a && p->right == b) return p;
        h = (h + 1) & mask;
    }
}

// Returns 1 inserted, 0 already present.
static int pair_insert(tokenizer* t, int32_t a, int32_t b, int32_t merged, double priority) {
    size_t mask = t->n_pair_slots - 1;
    size_t h = (size_t)mix64(((uint64_t)(uint32_t)a << 32) | (uint32_t)b) & mask;
    for (;;) {
        tokenizer_pair* p = &t->pairs[h];
        if (!p->used) {
            p->used = 1; p->left = a; p->right = b; p->merged = merged; p->priority = priority;
            return 1;
        }
        if (p->left == a && p->right == b) return 0;
        h = (h + 1) & mask;
    }
}

static uint64_t hash_bytes(const char* s, size_t n) {
    uint64_t h = 1469598103934665603ULL;
    for (size_t i = 0; i < n; i++) h = (h ^ (uint8_t)s[i]) * 1099511628211ULL;
    return mix64(h);
}

static int32_t str_find(const tokenizer* t, const char* s, size_t n) {
    if (!t->str_slots) return -1;
    size_t mask = t->n_str_slots - 1;
    for (size_t h = (size_t)hash_bytes(s, n) & mask;; h = (h + 1) & mask) {
        int32_t id = t->str_slots[h];
        if (id < 0) return -1;
        if (t->vocab_len[id] == n && memcmp(t->vocab[id], s, n) == 0) return id;
    }
}

static void str_insert(tokenizer* t, int32_t id) {  // first id of a duplicated string wins
    size_t mask = t->n_str_slots - 1;
    for (size_t h = (size_t)hash_bytes(t->vocab[id], t->vocab_len[id]) & mask;; h = (h + 1) & mask) {
        int32_t o = t->str_slots[h];
        if (o < 0) { t->str_slots[h] = id; return; }
        if (t->vocab_len[o] == t->vocab_len[id] && memcmp(t->vocab[o], t->vocab[id], t->vocab_len[id]) == 0) return;
    }
}

// ---- build / free -------------------------------------------------------------------------------------------
void tokenizer_free(tokenizer* t) {
    if (!t) return;
    if (t->vocab) {
        for (int i = 0; i < t->vocab_size; i++) free(t->vocab[i]);
        free(t->vocab);
    }
    if (t->special_names) {
        for (int i = 0; i < t->n_special; i++) free(t->special_names[i]);
        free(t->special_names);
    }
    free(t->vocab_len); free(t->scores); free(t->pairs); free(t->special_ids); free(t->is_special);
    free(t->str_slots);
    memset(t, 0, sizeof(*t));
}

// Allocates the vocab arrays for n tokens (all zeroed so tokenizer_free works at any point).
static int alloc_vocab(tokenizer* t, int n) {
    t->vocab_size = n;
    t->vocab = calloc((size_t)n, sizeof(char*));
    t->vocab_len = calloc((size_t)n, sizeof(uint32_t));
    t->is_special = calloc((size_t)n, 1);
    return (t->vocab && t->vocab_len && t->is_special) ? 0 : -1;
}

static char* dup_bytes(const uint8_t* p, size_t n) {
    char* s = malloc(n + 1);
    if (s) { memcpy(s, p, n); s[n] = 0; }
    return s;
}

static int build_pyllm(tokenizer* t, reader* r, const char* path, char* err, size_t errlen) {
    uint32_t h[8];
    for (int i = 0; i < 8; i++) rd_u32(r, &h[i]);  // size checked by the caller (>= 32 bytes)
    if (h[1] != TOKENIZER_VERSION) {
        set_err(err, errlen, "%s: pyllm tokenizer version %u, this build reads version %d (re-export it with "
                "this pyllm: tok.save_bin / pyllm export)", path, h[1], TOKENIZER_VERSION);
        return TOKENIZER_ERR_FORMAT;
    }
    uint32_t nv = h[2], nm = h[3], ns = h[4];
    if (h[6] != TOKENIZER_PRETOK_V1) {
        set_err(err, errlen, "%s: unknown pre-tokenizer id %u (this build knows %d)", path, h[6], TOKENIZER_PRETOK_V1);
        return TOKENIZER_ERR_FORMAT;
    }
    size_t rest = r->n - r->off;
    if (nv < 256 || nv > MAX_VOCAB || (size_t)nv * 4 > rest || (size_t)nm * 12 > rest || (size_t)ns * 8 > rest) {
        set_err(err, errlen, "%s: bad header (vocab_size %u, n_merges %u, n_special %u for a %zu-byte file)",
                path, nv, nm, ns, r->n);
        return TOKENIZER_ERR_FORMAT;
    }
    t->kind = TOKENIZER_PYLLM;
    if (alloc_vocab(t, (int)nv)) return TOKENIZER_ERR_NOMEM;
    uint32_t maxlen = 0;
    for (uint32_t i = 0; i < nv; i++) {
        uint32_t len;
        if (rd_u32(r, &len) || len > r->n - r->off) {
            set_err(err, errlen, "%s: truncated in the vocabulary at token %u of %u", path, i, nv);
            return TOKENIZER_ERR_FORMAT;
        }
        if (len == 0) {
            set_err(err, errlen, "%s: token %u is empty", path, i);
            return TOKENIZER_ERR_FORMAT;
        }
        if (!(t->vocab[i] = dup_bytes(r->p + r->off, len))) return TOKENIZER_ERR_NOMEM;
        t->vocab_len[i] = len;
        if (len > maxlen) maxlen = len;
        r->off += len;
    }
    t->max_token_len = (int)maxlen;
    // merges are read into a temporary list; the table is filled after specials are known
    size_t merges_off = r->off;
    if ((size_t)nm * 12 > r->n - r->off) {
        set_err(err, errlen, "%s: truncated in the merges (%u expected)", path, nm);
        return TOKENIZER_ERR_FORMAT;
    }
    r->off += (size_t)nm * 12;
    t->n_special = 0;
    t->special_ids = calloc(ns ? ns : 1, sizeof(int32_t));
    t->special_names = calloc(ns ? ns : 1, sizeof(char*));
    if (!t->special_ids || !t->special_names) return TOKENIZER_ERR_NOMEM;
    for (uint32_t i = 0; i < ns; i++) {
        int32_t id;
        uint32_t len;
        if (rd_i32(r, &id) || rd_u32(r, &len) || len > r->n - r->off) {
            set_err(err, errlen, "%s: truncated in the special tokens at %u of %u", path, i, ns);
            return TOKENIZER_ERR_FORMAT;
        }
        if (id < 0 || (uint32_t)id >= nv || t->is_special[id]) {
            set_err(err, errlen, "%s: special token %u has id %d (out of range 0..%u or repeated)", path, i, id, nv - 1);
            return TOKENIZER_ERR_FORMAT;
        }
        if (!(t->special_names[i] = dup_bytes(r->p + r->off, len))) return TOKENIZER_ERR_NOMEM;
        t->n_special = (int)i + 1;
        t->special_ids[i] = id;
        t->is_special[id] = 1;
        r->off += len;
    }
    if (r->off != r->n) {
        set_err(err, errlen, "%s: %zu unexpected bytes after the special tokens", path, r->n - r->off);
        return TOKENIZER_ERR_FORMAT;
    }
    for (int b = 0; b < 256; b++) t->byte_id[b] = -1;
    for (uint32_t i = 0; i < nv; i++)
        if (!t->is_special[i] && t->vocab_len[i] == 1 && t->byte_id[(uint8_t)t->vocab[i][0]] < 0)
            t->byte_id[(uint8_t)t->vocab[i][0]] = (int32_t)i;
    for (int b = 0; b < 256; b++)
        if (t->byte_id[b] < 0) {
            set_err(err, errlen, "%s: byte 0x%02x has no token (every byte must be in the vocabulary)", path, b);
            return TOKENIZER_ERR_FORMAT;
        }
    t->n_pair_slots = pow2_at_least((size_t)nm * 2 + 1);
    t->pairs = calloc(t->n_pair_slots, sizeof(tokenizer_pair));
    if (!t->pairs) return TOKENIZER_ERR_NOMEM;
    reader m = {r->p, r->n, merges_off};
    for (uint32_t k = 0; k < nm; k++) {
        int32_t a = 0, b = 0, c = 0;
        rd_i32(&m, &a); rd_i32(&m, &b); rd_i32(&m, &c);
        if (a < 0 || b < 0 || c < 0 || (uint32_t)a >= nv || (uint32_t)b >= nv || (uint32_t)c >= nv) {
            set_err(err, errlen, "%s: merge %u (%d, %d) -> %d has an id outside 0..%u", path, k, a, b, c, nv - 1);
            return TOKENIZER_ERR_FORMAT;
        }
        if (t->is_special[a] || t->is_special[b] || t->is_special[c] ||
            t->vocab_len[c] != t->vocab_len[a] + t->vocab_len[b] ||
            memcmp(t->vocab[c], t->vocab[a], t->vocab_len[a]) ||
            memcmp(t->vocab[c] + t->vocab_len[a], t->vocab[b], t->vocab_len[b])) {
            set_err(err, errlen, "%s: merge %u (%d, %d) -> %d: merged token is not the concatenation", path, k, a, b, c);
            return TOKENIZER_ERR_FORMAT;
        }
        if (!pair_insert(t, a, b, c, (double)k)) {
            set_err(err, errlen, "%s: merge %u (%d, %d) repeats an earlier merge", path, k, a, b);
            return TOKENIZER_ERR_FORMAT;
        }
    }
    t->bos_id = tokenizer_special(t, "<|bos|>");
    t->eos_id = tokenizer_special(t, "<|end|>");
    t->space_id = -1;
    return 0;
}

static int build_llama2c(tokenizer* t, reader* r, const char* path, char* err, size_t errlen) {
    uint32_t maxlen;
    if (rd_u32(r, &maxlen) || maxlen == 0 || maxlen > 4096) {
        set_err(err, errlen, "%s: not a pyllm tokenizer (no \"PTOK\" magic) nor a llama2.c tokenizer.bin "
                "(max_token_length %u)", path, r->n >= 4 ? maxlen : 0);
        return TOKENIZER_ERR_FORMAT;
    }
    // first pass: count and validate
    size_t off0 = r->off;
    int n = 0;
    while (r->off < r->n) {
        float s;
        int32_t len;
        if (rd_f32(r, &s) || rd_i32(r, &len) || len < 0 || (size_t)len > r->n - r->off || (uint32_t)len > maxlen) {
            set_err(err, errlen, "%s: llama2.c tokenizer truncated or corrupt at token %d (byte %zu)", path, n, r->off);
            return TOKENIZER_ERR_FORMAT;
        }
        r->off += (size_t)len;
        if (++n > MAX_VOCAB) {
            set_err(err, errlen, "%s: more than %d tokens", path, MAX_VOCAB);
            return TOKENIZER_ERR_FORMAT;
        }
    }
    if (n < 3) {
        set_err(err, errlen, "%s: llama2.c tokenizer with only %d tokens", path, n);
        return TOKENIZER_ERR_FORMAT;
    }
    t->kind = TOKENIZER_LLAMA2C;
    t->max_token_len = (int)maxlen;
    if (alloc_vocab(t, n) || !(t->scores = calloc((size_t)n, sizeof(float)))) return TOKENIZER_ERR_NOMEM;
    r->off = off0;
    for (int i = 0; i < n; i++) {
        int32_t len = 0;
        rd_f32(r, &t->scores[i]);
        rd_i32(r, &len);
        if (!(t->vocab[i] = dup_bytes(r->p + r->off, (size_t)len))) return TOKENIZER_ERR_NOMEM;
        t->vocab_len[i] = (uint32_t)len;
        r->off += (size_t)len;
    }
    t->n_str_slots = pow2_at_least((size_t)n * 2);
    if (!(t->str_slots = malloc(t->n_str_slots * sizeof(int32_t)))) return TOKENIZER_ERR_NOMEM;
    memset(t->str_slots, 0xff, t->n_str_slots * sizeof(int32_t));
    size_t n_pairs = 0;
    for (int i = 0; i < n; i++) {
        str_insert(t, i);
        n_pairs += t->vocab_len[i] > 1 ? t->vocab_len[i] - 1 : 0;
    }
    // llama2.c merges (a, b) when the string a+b is a token; enumerate every split of every token instead, so
    // encoding needs no string concatenation. Priority -score: highest score first (only scores > -1e10 merge).
    t->n_pair_slots = pow2_at_least(n_pairs * 2 + 1);
    if (!(t->pairs = calloc(t->n_pair_slots, sizeof(tokenizer_pair)))) return TOKENIZER_ERR_NOMEM;
    for (int c = 0; c < n; c++) {
        if (!(t->scores[c] > -1e10f) || str_find(t, t->vocab[c], t->vocab_len[c]) != c) continue;
        for (uint32_t k = 1; k < t->vocab_len[c]; k++) {
            int32_t a = str_find(t, t->vocab[c], k), b = str_find(t, t->vocab[c] + k, t->vocab_len[c] - k);
            if (a >= 0 && b >= 0) pair_insert(t, a, b, c, -(double)t->scores[c]);
        }
    }
    for (int b = 0; b < 256; b++) t->byte_id[b] = b + 3 < n ? b + 3 : -1;
    for (int b = 0; b < 256; b++) { t->byte_piece[2 * b] = (unsigned char)b; t->byte_piece[2 * b + 1] = 0; }
    t->bos_id = 1;
    t->eos_id = 2;
    t->space_id = str_find(t, " ", 1);
    return 0;
}

int tokenizer_build(tokenizer* t, const char* path, char* err, size_t errlen) {
    if (err && errlen) err[0] = 0;
    if (!t || !path) {
        set_err(err, errlen, "tokenizer_build: NULL argument");
        return TOKENIZER_ERR_ARG;
    }
    memset(t, 0, sizeof(*t));
    size_t n = 0;
    uint8_t* data = read_file(path, &n, err, errlen);
    if (!data) return TOKENIZER_ERR_IO;
    reader r = {data, n, 0};
    uint32_t magic = 0;
    int rc;
    if (n >= 4) rd_u32(&r, &magic);
    r.off = 0;
    if (magic == TOKENIZER_MAGIC) {
        if (n < 32) {
            set_err(err, errlen, "%s: truncated pyllm tokenizer header (%zu bytes)", path, n);
            rc = TOKENIZER_ERR_FORMAT;
        } else {
            rc = build_pyllm(t, &r, path, err, errlen);  // reads the 8 header words itself
        }
    } else {
        rc = build_llama2c(t, &r, path, err, errlen);
    }
    if (!rc) t->file_crc = crc32_bytes(data, n);
    free(data);
    if (rc) {
        if (rc == TOKENIZER_ERR_NOMEM) set_err(err, errlen, "%s: out of memory building the tokenizer", path);
        tokenizer_free(t);
    }
    return rc;
}

// ---- the merge engine -----------------------------------------------------------------------------------------
typedef struct {
    double pri;
    int32_t pos, left, right, merged;
} heap_item;

static int item_less(const heap_item* a, const heap_item* b) {
    return a->pri < b->pri || (a->pri == b->pri && a->pos < b->pos);
}

static void heap_push(heap_item* h, int* n, heap_item it) {
    int i = (*n)++;
    while (i > 0) {
        int p = (i - 1) / 2;
        if (!item_less(&it, &h[p])) break;
        h[i] = h[p];
        i = p;
    }
    h[i] = it;
}

static heap_item heap_pop(heap_item* h, int* n) {
    heap_item top = h[0], last = h[--(*n)];
    int i = 0;
    for (;;) {
        int c = 2 * i + 1;
        if (c >= *n) break;
        if (c + 1 < *n && item_less(&h[c + 1], &h[c])) c++;
        if (!item_less(&h[c], &last)) break;
        h[i] = h[c];
        i = c;
    }
    if (*n > 0) h[i] = last;
    return top;
}

typedef struct {
    int32_t* id;    // (n) symbol ids
    int32_t* prev;  // (n)
    int32_t* next;  // (n) -1 at the end
    heap_item* heap;  // (3n) candidate pairs; each merge pushes at most 2
} scratch;

static void push_pair(const tokenizer* t, scratch* s, int* nh, int32_t pos, int32_t nxt) {
    const tokenizer_pair* p = pair_find(t, s->id[pos], s->id[nxt]);
    if (p) heap_push(s->heap, nh, (heap_item){p->priority, pos, p->left, p->right, p->merged});
}

// Merges symbols 0..n-1 (ids in s->id) in place: lowest priority first, leftmost on ties. Returns the list head.
static void merge_symbols(const tokenizer* t, scratch* s, int n) {
    int nh = 0;
    for (int i = 0; i < n; i++) { s->prev[i] = i - 1; s->next[i] = i + 1 < n ? i + 1 : -1; }
    for (int i = 0; i + 1 < n; i++) push_pair(t, s, &nh, i, i + 1);
    while (nh > 0) {
        heap_item it = heap_pop(s->heap, &nh);
        int32_t pos = it.pos, nxt = s->next[pos];
        // stale entries: the left symbol was absorbed (id -1), or either side changed since the push
        if (s->id[pos] != it.left || nxt < 0 || s->id[nxt] != it.right) continue;
        s->id[pos] = it.merged;
        s->id[nxt] = -1;
        s->next[pos] = s->next[nxt];
        if (s->next[pos] >= 0) s->prev[s->next[pos]] = pos;
        if (s->prev[pos] >= 0) push_pair(t, s, &nh, s->prev[pos], pos);
        if (s->next[pos] >= 0) push_pair(t, s, &nh, pos, s->next[pos]);
    }
}

static int scratch_alloc(scratch* s, size_t n) {
    if (n == 0) n = 1;
    s->id = malloc(n * sizeof(int32_t));
    s->prev = malloc(n * sizeof(int32_t));
    s->next = malloc(n * sizeof(int32_t));
    s->heap = malloc(3 * n * sizeof(heap_item));
    return (s->id && s->prev && s->next && s->heap) ? 0 : -1;
}

static void scratch_free(scratch* s) {
    free(s->id); free(s->prev); free(s->next); free(s->heap);
}

// ---- pyllm encode -----------------------------------------------------------------------------------------------
enum { C_LETTER, C_DIGIT, C_SPACE, C_OTHER };

static int byte_class(uint8_t c) {
    if ((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z')) return C_LETTER;
    if (c >= '0' && c <= '9') return C_DIGIT;
    if (c == ' ' || (c >= '\t' && c <= '\r')) return C_SPACE;
    return C_OTHER;
}

// End of the pre-token starting at i (see TOKENIZER_PRETOK_V1 in tokenizer.h).
static size_t pretok_end(const uint8_t* s, size_t n, size_t i) {
    int c = byte_class(s[i]);
    size_t j = i;
    if (s[i] == ' ' && i + 1 < n) {
        int c1 = byte_class(s[i + 1]);
        if (c1 == C_DIGIT) return i + 2;
        if (c1 == C_LETTER || c1 == C_OTHER) {
            j = i + 2;
            while (j < n && byte_class(s[j]) == c1) j++;
            return j;
        }
    }
    if (c == C_DIGIT) return i + 1;
    if (c == C_LETTER || c == C_OTHER) {
        while (j < n && byte_class(s[j]) == c) j++;
        return j;
    }
    while (j < n && byte_class(s[j]) == C_SPACE) j++;  // whitespace run
    if (j == n || j - i == 1) return j;
    return j - 1;  // leave the last whitespace to lead the next pre-token
}

static int encode_plain_pyllm(const tokenizer* t, const uint8_t* s, size_t n, scratch* sc, int32_t* out, int nout,
                              int max_out) {
    size_t i = 0;
    while (i < n) {
        size_t j = pretok_end(s, n, i);
        int m = (int)(j - i);
        for (int k = 0; k < m; k++) sc->id[k] = t->byte_id[s[i + k]];
        merge_symbols(t, sc, m);
        for (int k = 0; k >= 0; k = sc->next[k]) {
            if (nout >= max_out) return TOKENIZER_ERR_SPACE;
            out[nout++] = sc->id[k];
        }
        i = j;
    }
    return nout;
}

// Longest special token whose text starts at s (length n), or -1.
static int match_special(const tokenizer* t, const uint8_t* s, size_t n, size_t* mlen) {
    int best = -1;
    size_t bl = 0;
    for (int k = 0; k < t->n_special; k++) {
        size_t l = strlen(t->special_names[k]);
        if (l > 0 && l <= n && l > bl && memcmp(s, t->special_names[k], l) == 0) { best = k; bl = l; }
    }
    *mlen = bl;
    return best;
}

static int encode_pyllm(const tokenizer* t, const uint8_t* s, size_t n, int flags, scratch* sc, int32_t* out,
                        int nout, int max_out) {
    if (!(flags & TOKENIZER_ALLOW_SPECIAL)) return encode_plain_pyllm(t, s, n, sc, out, nout, max_out);
    size_t start = 0, i = 0;
    while (i < n) {
        size_t ml;
        int k = s[i] == '<' ? match_special(t, s + i, n - i, &ml) : -1;  // all pyllm specials start with '<'
        if (k < 0 && t->n_special > 0 && s[i] != '<') {
            // names not starting with '<' are rare; check them too
            for (int q = 0; q < t->n_special && k < 0; q++)
                if ((uint8_t)t->special_names[q][0] == s[i]) k = match_special(t, s + i, n - i, &ml);
        }
        if (k < 0) { i++; continue; }
        nout = encode_plain_pyllm(t, s + start, i - start, sc, out, nout, max_out);
        if (nout < 0) return nout;
        if (nout >= max_out) return TOKENIZER_ERR_SPACE;
        out[nout++] = t->special_ids[k];
        i += ml;
        start = i;
    }
    return encode_plain_pyllm(t, s + start, n - start, sc, out, nout, max_out);
}

// ---- llama2.c encode ----------------------------------------------------------------------------------------------
static int encode_llama2c(const tokenizer* t, const uint8_t* s, size_t n, int flags, scratch* sc, int32_t* out,
                          int max_out) {
    int m = 0;
    if (flags & TOKENIZER_ADD_BOS) sc->id[m++] = t->bos_id;
    if (n > 0) {
        if (t->space_id < 0) return TOKENIZER_ERR_FORMAT;
        sc->id[m++] = t->space_id;
    }
    // one UTF-8 character at a time, like run.c: a lead byte plus up to 3 continuation bytes
    size_t i = 0;
    while (i < n) {
        size_t j = i + 1;
        while (j < n && (s[j] & 0xC0) == 0x80 && j - i < 4) j++;
        int32_t id = str_find(t, (const char*)s + i, j - i);
        if (id >= 0) {
            sc->id[m++] = id;
        } else {
            for (size_t k = i; k < j; k++) {
                if (t->byte_id[s[k]] < 0) return TOKENIZER_ERR_FORMAT;
                sc->id[m++] = t->byte_id[s[k]];
            }
        }
        i = j;
    }
    merge_symbols(t, sc, m);
    int nout = 0;
    if (m == 0) return 0;
    for (int k = 0; k >= 0; k = sc->next[k]) {
        if (nout >= max_out) return TOKENIZER_ERR_SPACE;
        out[nout++] = sc->id[k];
    }
    return nout;
}

int tokenizer_encode_ex(const tokenizer* t, const char* text, size_t len, int flags, int32_t* out, int max_out) {
    if (!t || !t->kind || (!text && len) || !out || max_out < 0) return TOKENIZER_ERR_ARG;
    if (len > (size_t)(INT32_MAX / 4)) return TOKENIZER_ERR_ARG;
    scratch sc;
    if (scratch_alloc(&sc, len + 2)) { scratch_free(&sc); return TOKENIZER_ERR_NOMEM; }
    int rc;
    const uint8_t* s = (const uint8_t*)text;
    if (t->kind == TOKENIZER_LLAMA2C) {
        rc = encode_llama2c(t, s, len, flags, &sc, out, max_out);
    } else {
        int nout = 0;
        if (flags & TOKENIZER_ADD_BOS) {
            if (t->bos_id < 0) { scratch_free(&sc); return TOKENIZER_ERR_FORMAT; }
            if (max_out < 1) { scratch_free(&sc); return TOKENIZER_ERR_SPACE; }
            out[nout++] = t->bos_id;
        }
        rc = encode_pyllm(t, s, len, flags, &sc, out, nout, max_out);
    }
    scratch_free(&sc);
    return rc;
}

int tokenizer_encode(const tokenizer* t, const char* text, size_t len, int add_bos, int32_t* out, int max_out) {
    return tokenizer_encode_ex(t, text, len, add_bos ? TOKENIZER_ADD_BOS : 0, out, max_out);
}

// ---- decode / specials ----------------------------------------------------------------------------------------
static int hexval(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
}

const char* tokenizer_decode(const tokenizer* t, int prev, int id, size_t* len) {
    if (len) *len = 0;
    if (!t || !t->kind || id < 0 || id >= t->vocab_size) return NULL;
    const char* p = t->vocab[id];
    size_t n = t->vocab_len[id];
    if (t->kind == TOKENIZER_LLAMA2C) {
        if (prev == t->bos_id && n > 0 && p[0] == ' ') { p++; n--; }
        if (n == 6 && p[0] == '<' && p[1] == '0' && p[2] == 'x' && p[5] == '>' && hexval(p[3]) >= 0 &&
            hexval(p[4]) >= 0) {
            int b = hexval(p[3]) * 16 + hexval(p[4]);
            p = (const char*)t->byte_piece + 2 * b;
            n = 1;
        }
    }
    if (len) *len = n;
    return p;
}

int tokenizer_special(const tokenizer* t, const char* name) {
    if (!t || !t->kind || !name) return -1;
    if (t->kind == TOKENIZER_LLAMA2C) {
        if (!strcmp(name, "bos") || !strcmp(name, "<s>")) return t->bos_id;
        if (!strcmp(name, "eos") || !strcmp(name, "end") || !strcmp(name, "</s>")) return t->eos_id;
        return -1;
    }
    size_t nl = strlen(name);
    for (int k = 0; k < t->n_special; k++) {
        const char* s = t->special_names[k];
        size_t sl = strlen(s);
        if (!strcmp(s, name)) return t->special_ids[k];
        // short form: "end" for "<|end|>"
        if (sl == nl + 4 && !strncmp(s, "<|", 2) && !strncmp(s + 2, name, nl) && !strcmp(s + 2 + nl, "|>"))
            return t->special_ids[k];
    }
    return -1;
}
