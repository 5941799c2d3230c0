// impl_sample.h — batched sampling from logits (B, V): greedy, temperature, top-k, top-p, min-p, allowed mask.
// Included by kernels_impl.h; KFN() names the per-path symbol. Cost per row (no sort of the vocabulary):
//   1. max pass (vector): the shift, NaN/+inf check;
//   2. exp pass (vector): w_i = exp((l_i - max) / T) stored (V floats of scratch), block sums and maxima;
//   3. top-k / top-p only: the cut. One scalar histogram pass over the row on the weight's exponent byte (the
//      logit's octave below the max: mass or count per octave, 8 interleaved tables), then the boundary octave's
//      tokens are gathered (vector compress on avx512; blocks whose maximum lies below that octave are skipped)
//      and refined on the next mantissa bits until the cut is exact. The set is never listed: it is a cut
//      (w*, id*), "w_i > w* or (w_i == w* and i <= id*)", so top-k, top-p and min-p intersect by comparing cuts;
//   4. the draw (vector): per-block masses of the set, inverse CDF over the blocks, then one block scalar.
//
// Same seed -> same token on every ISA path: the kernels build with -std=c11 (no FMA contraction), vf_exp uses
// only lane-wise IEEE ops, and every sum that can change the choice is accumulated in a layout that does not
// depend on VLEN (16 fixed lanes per 256-token block, blocks and candidates summed in double in a fixed scalar
// order). So the weights, masses and the uniform draw are bit-identical on scalar/avx2/avx512.
// Filter order (HF transformers' warpers): mask -> temperature -> top-k -> top-p (on the top-k renormalised
// distribution) -> min-p (relative to the top token). Ties are broken by the lower token id ranking first.

#define SBLK 256            // tokens per block: block sums/maxima let the gather and the draw skip most blocks
#define SNV (16 / VLEN)     // vectors per 16-lane chunk

static inline uint64_t splitmix64(uint64_t x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

// Counter-based uniform in [0, 1) from (seed, row, step): no state, so batches and restarts reproduce.
static double sample_uniform(uint64_t seed, uint64_t row, uint64_t step) {
    uint64_t h = splitmix64(splitmix64(splitmix64(seed) ^ step) ^ row);
    return (double)(h >> 11) * 0x1.0p-53;
}

// exp(x) for x <= ~0 (Cephes polynomial, rel err ~2e-7); x < -87 (or -inf) -> 0. Lane-wise IEEE ops only.
static inline vf vf_exp_neg(vf x) {
    x = vf_fmax(x, vf_set1(-88.f));
    vf t = x * 1.44269504088896341f + 12582912.f;  // 1.5 * 2^23: rounds x*log2(e) to the nearest integer
    vf n = t - 12582912.f;
    vf r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    vf p = vf_set1(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.f;
    vi e = ((vi)t - 0x4B400000 + 127) << 23;        // 2^n built in the exponent field
    return vf_select(x > vf_set1(-87.f), p * (vf)e, vf_set1(0.f));
}

static inline double sum16(const vf* acc) {  // the 16 lanes in double, a fixed pairwise tree (any VLEN)
    float l[16];
    memcpy(l, acc, sizeof(l));
    double a[8];
    for (int q = 0; q < 8; q++) a[q] = (double)l[q] + (double)l[q + 8];
    for (int q = 0; q < 4; q++) a[q] += a[q + 4];
    return (a[0] + a[2]) + (a[1] + a[3]);
}

// One 16-token chunk of the exp pass. zref/wref: the shifts for Z (all tokens) and for w (allowed tokens).
static inline void exp_chunk16(const float* l, const uint8_t* mk, float zref, float wref, float invT, float* w,
                               vf* accZ, vf* accW, vf* accM) {
    for (int j = 0; j < SNV; j++) {
        vf x = vf_load(l + j * VLEN);
        vf e = vf_exp_neg((x - zref) * invT);
        accZ[j] += e;
        if (!w) continue;
        vf ew = e;
        if (mk) {
            ew = vf_exp_neg((x - wref) * invT);
            vi a;
            for (int q = 0; q < VLEN; q++) a[q] = mk[j * VLEN + q] ? -1 : 0;
            ew = vf_select(a, ew, vf_set1(0.f));
        }
        vf_store(w + j * VLEN, ew);
        accW[j] += ew;
        accM[j] = vf_fmax(accM[j], ew);
    }
}

// Returns Z = sum_i exp((l_i - zref) * invT) over the whole row. If w != NULL also writes
// w_i = allowed_i ? exp((l_i - wref) * invT) : 0 (V), the allowed mass per block bsum and the block maxima bmax.
static double exp_pass(const float* l, const uint8_t* mk, int V, float zref, float wref, float invT, float* w,
                       double* bsum, float* bmax) {
    double Z = 0;
    for (int i0 = 0, blk = 0; i0 < V; i0 += SBLK, blk++) {
        vf accZ[SNV], accW[SNV], accM[SNV];
        for (int j = 0; j < SNV; j++) accZ[j] = accW[j] = accM[j] = vf_set1(0.f);
        const int i1 = i0 + SBLK < V ? i0 + SBLK : V;
        int i = i0;
        for (; i + 16 <= i1; i += 16)
            exp_chunk16(l + i, mk ? mk + i : NULL, zref, wref, invT, w ? w + i : NULL, accZ, accW, accM);
        if (i < i1) {  // tail: pad with -inf (weight exactly 0) so it goes through the same lanes
            float lp[16], wp[16];
            uint8_t mp[16] = {0};
            for (int q = 0; q < 16; q++) lp[q] = i + q < i1 ? l[i + q] : -INFINITY;
            if (mk) for (int q = 0; q < i1 - i; q++) mp[q] = mk[i + q];
            exp_chunk16(lp, mk ? mp : NULL, zref, wref, invT, w ? wp : NULL, accZ, accW, accM);
            if (w) memcpy(w + i, wp, (size_t)(i1 - i) * sizeof(float));
        }
        Z += sum16(accZ);
        if (w) {
            bsum[blk] = sum16(accW);
            float m = 0.f;
            for (int j = 0; j < SNV; j++) m = fmaxf(m, vf_max(accM[j]));
            bmax[blk] = m;
        }
    }
    return Z;
}

// Candidate order: higher weight first, then lower id. A best-first prefix of that order is a cut (w*, id*):
// token i is in iff w_i > 0 and (w_i > w* or (w_i == w* and i <= id*)). {0, -1} = every token with weight.
// The shorter of two prefixes is the intersection, so the filters compose by comparing cuts.
typedef struct { float w; int id; } smp_cut;

static inline uint32_t wbits(float x) { uint32_t u; memcpy(&u, &x, 4); return u; }
static inline int smp_in(float x, int i, smp_cut c) { return x > c.w || (x == c.w && i <= c.id); }
static inline smp_cut smp_tighter(smp_cut a, smp_cut b) {  // the shorter prefix
    if (a.w != b.w) return a.w > b.w ? a : b;
    return a.id < b.id ? a : b;
}
static inline int smp_blk_end(int blk, int V) { return (blk + 1) * SBLK < V ? (blk + 1) * SBLK : V; }

#if VLEN == 8
// AVX2 has no compress instruction: the set lanes of an 8-bit mask, packed left, come from a table of 3-bit
// lane indices (a vpermd). (pdep/pext would build it without a table, but are microcoded on Zen 1/2.)
static uint32_t smp_lanes[256];
static pthread_once_t smp_lanes_once = PTHREAD_ONCE_INIT;
static void smp_lanes_make(void) {
    for (int m = 0; m < 256; m++) {
        uint32_t v = 0;
        for (int i = 0, j = 0; i < 8; i++)
            if (m >> i & 1) v |= (uint32_t)i << (3 * j++);
        smp_lanes[m] = v;
    }
}
// Stores the ids of the set lanes of m at out (8 ints written) and returns how many there are.
static inline int smp_compress8(int* out, __m256i ids, int m) {
    const __m256i idx = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)smp_lanes[m]),
                                                           _mm256_setr_epi32(0, 3, 6, 9, 12, 15, 18, 21)),
                                         _mm256_set1_epi32(7));
    _mm256_storeu_si256((__m256i*)out, _mm256_permutevar8x32_epi32(ids, idx));
    return __builtin_popcount((unsigned)m);
}
#endif

// Appends to out[n] the ids i in [i0, i1) with exponent byte e (w_i in [2^(e-127), 2^(e-126))), in id order;
// returns the new count. out needs 16 entries of slack (the vector paths store whole vectors).
static int smp_gather_octave(const float* w, int i0, int i1, int e, int* out, int n) {
    int i = i0;
#if VLEN == 16
    const __m512i ev = _mm512_set1_epi32(e), sixteen = _mm512_set1_epi32(16);
    __m512i ids = _mm512_add_epi32(_mm512_set1_epi32(i0),
                                   _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    for (; i + 16 <= i1; i += 16, ids = _mm512_add_epi32(ids, sixteen)) {
        const __mmask16 k = _mm512_cmpeq_epi32_mask(_mm512_srli_epi32(_mm512_loadu_si512(w + i), 23), ev);
        _mm512_storeu_si512(out + n, _mm512_maskz_compress_epi32(k, ids));
        n += __builtin_popcount(k);
    }
#elif VLEN == 8
    const __m256i ev = _mm256_set1_epi32(e), eight = _mm256_set1_epi32(8);
    __m256i ids = _mm256_add_epi32(_mm256_set1_epi32(i0), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    for (; i + 8 <= i1; i += 8, ids = _mm256_add_epi32(ids, eight)) {  // 2-3x the scalar loop below (session 12)
        const __m256i x = _mm256_srli_epi32(_mm256_loadu_si256((const __m256i*)(w + i)), 23);
        n += smp_compress8(out + n, ids, _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(x, ev))));
    }
#endif
    for (; i < i1; i++) {  // branch-free: which side a token falls on is unpredictable
        out[n] = i;
        n += (int)(wbits(w[i]) >> 23) == e;
    }
    return n;
}

// The same for the tokens inside cut c.
static int smp_gather_cut(const float* w, int i0, int i1, smp_cut c, int* out, int n) {
    int i = i0;
#if VLEN == 16
    const __m512 cw = _mm512_set1_ps(c.w);
    const __m512i cid = _mm512_set1_epi32(c.id), sixteen = _mm512_set1_epi32(16);
    __m512i ids = _mm512_add_epi32(_mm512_set1_epi32(i0),
                                   _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    for (; i + 16 <= i1; i += 16, ids = _mm512_add_epi32(ids, sixteen)) {
        const __m512 x = _mm512_loadu_ps(w + i);
        const __mmask16 k = _mm512_cmp_ps_mask(x, cw, _CMP_GT_OQ) |
                            (_mm512_cmp_ps_mask(x, cw, _CMP_EQ_OQ) & _mm512_cmple_epi32_mask(ids, cid));
        _mm512_storeu_si512(out + n, _mm512_maskz_compress_epi32(k, ids));
        n += __builtin_popcount(k);
    }
#elif VLEN == 8
    const __m256 cw = _mm256_set1_ps(c.w);
    const __m256i cid = _mm256_set1_epi32(c.id), eight = _mm256_set1_epi32(8);
    __m256i ids = _mm256_add_epi32(_mm256_set1_epi32(i0), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    for (; i + 8 <= i1; i += 8, ids = _mm256_add_epi32(ids, eight)) {
        const __m256 x = _mm256_loadu_ps(w + i);
        const __m256 eq_le = _mm256_andnot_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(ids, cid)),
                                              _mm256_cmp_ps(x, cw, _CMP_EQ_OQ));
        n += smp_compress8(out + n, ids, _mm256_movemask_ps(_mm256_or_ps(_mm256_cmp_ps(x, cw, _CMP_GT_OQ), eq_le)));
    }
#endif
    for (; i < i1; i++) {
        out[n] = i;
        n += smp_in(w[i], i, c) && w[i] > 0.f;
    }
    return n;
}

// Masses by weight digit, exactly: a weight with exponent byte e >= 1 is 2^(e-150) * sig, sig = 2^23 + its 23
// mantissa bits, so the mass of tokens sharing e is 2^(e-150) * (sum of their sig), an integer sum (no rounding,
// and integer adds, which chain through the histogram tables far faster than float ones). Counts likewise.
static inline uint64_t smp_sig(uint32_t b) { return (b & 0x7FFFFFu) | 0x800000u; }

// The cut of the shortest best-first prefix of grp whose count (by_count) or mass, added to acc (what precedes
// grp), reaches need. grp: ng ids in id order sharing the weight bits above `level` (level 0: any list of
// positive weights), acc < need. Radix on the weight's bits (for w >= 0 the IEEE bits order like the values):
// exponent byte, then 8, 8, 7 mantissa bits; per level a histogram finds the digit where the prefix ends, and
// the group shrinks to that digit.
static smp_cut smp_refine(int* grp, int ng, int* tmp, const float* w, int level, double acc, int by_count,
                          double need) {
    static const int shifts[4] = {23, 15, 7, 0};
    for (; level < 4 && ng > 48; level++) {
        const int sh = shifts[level];
        uint64_t h4[4][256 + 8];  // + 8: tables 2112 bytes apart, so none alias another modulo 4 KiB
        memset(h4, 0, sizeof(h4));
        if (by_count)
            for (int i = 0; i < ng; i++) h4[i & 3][(wbits(w[grp[i]]) >> sh) & 0xFF] += 1;
        else
            for (int i = 0; i < ng; i++) {
                const uint32_t b = wbits(w[grp[i]]);
                h4[i & 3][(b >> sh) & 0xFF] += smp_sig(b);
            }
        const int e = (int)(wbits(w[grp[0]]) >> 23);  // the group's exponent (levels >= 1)
        int db = -1;
        for (int d = 255; d >= 0; d--) {
            const uint64_t sum = h4[0][d] + h4[1][d] + h4[2][d] + h4[3][d];
            if (!sum) continue;
            const double add = by_count ? (double)sum : ldexp((double)sum, (level ? e : d) - 150);
            if (acc + add >= need) { db = d; break; }
            acc += add;
        }
        if (db < 0) {  // rounding: the whole group is in; the cut is its last token (smallest weight, last id)
            int b = grp[0];
            for (int i = 1; i < ng; i++) if (w[grp[i]] <= w[b]) b = grp[i];
            return (smp_cut){w[b], b};
        }
        int nt = 0;
        for (int i = 0; i < ng; i++) {  // stable: the group stays in id order
            tmp[nt] = grp[i];
            nt += (int)((wbits(w[grp[i]]) >> sh) & 0xFF) == db;
        }
        int* t = grp; grp = tmp; tmp = t;
        ng = nt;
    }
    // small group (or equal weights): sort best-first (insertion sort; stable, so ties stay in id order), walk
    for (int i = 1; i < ng; i++)
        for (int j = i; j > 0 && w[grp[j - 1]] < w[grp[j]]; j--) { int t = grp[j]; grp[j] = grp[j - 1]; grp[j - 1] = t; }
    for (int i = 0; i < ng; i++) {
        acc += by_count ? 1.0 : w[grp[i]];
        if (acc >= need) return (smp_cut){w[grp[i]], grp[i]};
    }
    return (smp_cut){w[grp[ng - 1]], grp[ng - 1]};
}

// The cut over a whole row of weights (V): one histogram pass on the exponent byte reads w directly (8
// interleaved tables: neighbours mostly share an octave, and one table would chain every add through the same
// slot), then the boundary octave is gathered, skipping blocks whose maximum lies below it, and refined.
// grp, tmp: V + 16.
static smp_cut smp_cut_row(const float* w, int V, int nblk, const float* bmax, int by_count, double need,
                           int* grp, int* tmp) {
    uint64_t h8[8][256 + 8];
    memset(h8, 0, sizeof(h8));
    for (int blk = 0; blk < nblk; blk++) {
        if (!(bmax[blk] > 0.f)) continue;
        const int i1 = smp_blk_end(blk, V);
        const uint32_t* wb = (const uint32_t*)w;
        int i = blk * SBLK;
        if (by_count) {
            for (; i + 8 <= i1; i += 8)  // unrolled: table c is a constant offset
                for (int c = 0; c < 8; c++) h8[c][wb[i + c] >> 23] += 1;
            for (; i < i1; i++) h8[i & 7][wb[i] >> 23] += 1;
        } else {
            for (; i + 8 <= i1; i += 8)
                for (int c = 0; c < 8; c++) h8[c][wb[i + c] >> 23] += smp_sig(wb[i + c]);
            for (; i < i1; i++) h8[i & 7][wb[i] >> 23] += smp_sig(wb[i]);
        }
    }
    double acc = 0;
    int db = -1;
    for (int d = 255; d >= 1; d--) {  // digit 0 holds the zero weights (masked / underflow): never candidates
        uint64_t sum = 0;
        for (int c = 0; c < 8; c++) sum += h8[c][d];
        if (!sum) continue;
        const double add = by_count ? (double)sum : ldexp((double)sum, d - 150);
        if (acc + add >= need) { db = d; break; }
        acc += add;
    }
    if (db < 0) return (smp_cut){0.f, -1};  // every token with weight
    int ng = 0;
    for (int blk = 0; blk < nblk; blk++)
        if ((int)(wbits(bmax[blk]) >> 23) >= db) ng = smp_gather_octave(w, blk * SBLK, smp_blk_end(blk, V), db, grp, ng);
    return smp_refine(grp, ng, tmp, w, 1, acc, by_count, need);
}

// Inverse-CDF draw from the tokens inside cut c (mass per block in 16 fixed lanes, blocks summed in double in
// order), then the chosen block token by token. bs: (nblk) scratch.
static int64_t smp_draw(const float* w, int V, int nblk, const float* bmax, smp_cut c, double u, double* bs) {
    vi iota;
    for (int q = 0; q < VLEN; q++) iota[q] = q;
    const vf cw = vf_set1(c.w);
    double S = 0;
    for (int blk = 0; blk < nblk; blk++) {
        bs[blk] = 0;
        if (!(bmax[blk] >= c.w) || !(bmax[blk] > 0.f)) continue;  // no token of this block reaches the cut
        const int i0 = blk * SBLK, i1 = smp_blk_end(blk, V);
        vf acc[SNV];
        for (int j = 0; j < SNV; j++) acc[j] = vf_set1(0.f);
        int i = i0;
        for (; i + 16 <= i1; i += 16)
            for (int j = 0; j < SNV; j++) {
                const vf x = vf_load(w + i + j * VLEN);
                const vi id = iota + (i + j * VLEN);
                const vi in = (x > cw) | ((x == cw) & (id <= c.id));
                acc[j] += vf_select(in, x, vf_set1(0.f));
            }
        if (i < i1) {  // tail: zero weights pad the lanes
            float xp[16] = {0};
            for (int q = 0; q < i1 - i; q++) xp[q] = smp_in(w[i + q], i + q, c) ? w[i + q] : 0.f;
            for (int j = 0; j < SNV; j++) acc[j] += vf_load(xp + j * VLEN);
        }
        bs[blk] = sum16(acc);
        S += bs[blk];
    }
    const double t = u * S;
    double acc = 0;
    int blk = 0;
    while (blk < nblk - 1 && acc + bs[blk] <= t) acc += bs[blk++];
    int64_t tok = -1;
    for (int i = blk * SBLK, i1 = smp_blk_end(blk, V); i < i1; i++) {
        if (!(w[i] > 0.f) || !smp_in(w[i], i, c)) continue;
        tok = i;
        acc += w[i];
        if (acc > t) break;
    }
    for (int i = V - 1; i >= 0 && tok < 0; i--)  // rounding left the chosen block empty: the last token in the set
        if (w[i] > 0.f && smp_in(w[i], i, c)) tok = i;
    return tok;
}

// One row. Returns the token, or -1 (no allowed token with a finite logit) / -2 (NaN or +inf in the logits).

// The first allowed token whose logit is the allowed maximum m_a (l (V), mk (V) allowed flags or NULL).
static int64_t smp_argmax(const float* l, const uint8_t* mk, int V, float m_a) {
    int i = 0;
    if (!mk) {  // skip whole vectors without the maximum
        const vf vm = vf_set1(m_a);
        for (; i + VLEN <= V; i += VLEN) {
            const vi eq = vf_load(l + i) == vm;
            int any = 0;
            for (int q = 0; q < VLEN; q++) any |= eq[q];
            if (any) break;
        }
    }
    for (; i < V; i++) if (l[i] == m_a && (!mk || mk[i])) return i;
    return 0;
}

static int64_t sample_row(const sample_params* p, int b, float* w, int* grp, int* tmp, double* bsum, float* bmax,
                          float* logprob) {
    const int V = p->V;
    const float* l = p->logits + (size_t)b * V;                 // (V)
    const uint8_t* mk = p->mask ? p->mask + (size_t)b * V : NULL;  // (V) or NULL
    // pass 1: max over all tokens (for Z) and over allowed tokens; flag NaN / +inf
    vf vmax = vf_set1(-INFINITY);
    vi bad = (vi){0};
    int i = 0;
    for (; i + VLEN <= V; i += VLEN) {
        vf x = vf_load(l + i);
        bad |= (x != x) | (x == vf_set1(INFINITY));
        vmax = vf_fmax(x, vmax);
    }
    float m_all = vf_max(vmax);
    int any_bad = 0;
    for (int q = 0; q < VLEN; q++) any_bad |= bad[q];
    for (; i < V; i++) {
        if (l[i] != l[i] || l[i] == INFINITY) any_bad = 1;
        m_all = l[i] > m_all ? l[i] : m_all;
    }
    if (any_bad) return -2;
    float m_a = m_all;
    if (mk) {
        m_a = -INFINITY;
        for (i = 0; i < V; i++) if (mk[i] && l[i] > m_a) m_a = l[i];
    }
    if (m_a == -INFINITY) return -1;

    if (p->temperature <= 0.f) {  // greedy: the first allowed argmax; logprob under T = 1
        const int64_t tok = smp_argmax(l, mk, V, m_a);
        double Z = exp_pass(l, NULL, V, m_all, m_all, 1.f, NULL, NULL, NULL);
        *logprob = (float)((double)l[tok] - m_all - log(Z));
        return tok;
    }
    // below ~2.9e-39, 1/T is +inf and the top token's weight 0 * inf = NaN (every weight 0: no token, a read of
    // l[-1]); FLT_MAX gives the T -> 0 limit: the top token(s) weigh 1, the rest 0
    const float invT = fminf(1.f / p->temperature, FLT_MAX);
    const int nblk = (V + SBLK - 1) / SBLK;
    // pass 2: w_i = exp((l_i - m_a)/T) on allowed tokens (so the top allowed token weighs exactly 1)
    const double Z = exp_pass(l, mk, V, m_all, m_a, invT, w, bsum, bmax);
    const double u = sample_uniform(p->seed, (uint64_t)b, p->step);
    const int k = p->top_k > 0 && p->top_k < V ? p->top_k : 0;
    // min_p > 1 acts as 1, the top token(s) alone, as HF's warper keeps one (run_sample passes any float on): a cut
    // above the top weight held no token, the draw returned -1 and the logprob read l[-1] (tests/asan_kernels.c)
    const double top_p = p->top_p, min_p = p->min_p > 1.f ? 1.0 : p->min_p;
    int64_t tok = -1;

    if (k == 1) {  // the argmax, as greedy picks it: by weight, logits within ~1e-7 of the top (exp rounds them to
        // the top's weight 1) were a tie that went to the lower id, a token below the argmax. Top-p and min-p keep
        // the one token (its relative weight is 1).
        tok = smp_argmax(l, mk, V, m_a);
    } else if (k == 0 && top_p >= 1.0 && min_p <= 0.0) {  // no truncation: inverse CDF over the block sums
        double Za = 0;
        for (int q = 0; q < nblk; q++) Za += bsum[q];
        const double t = u * Za;
        double acc = 0;
        int blk = 0;
        while (blk < nblk - 1 && acc + bsum[blk] <= t) acc += bsum[blk++];
        const int i1 = smp_blk_end(blk, V);
        for (i = blk * SBLK; i < i1; i++) {
            if (w[i] > 0.f) tok = i;
            acc += w[i];
            if (acc > t && w[i] > 0.f) break;
        }
        if (tok < 0)  // rounding left the chosen block empty: take the last token with weight
            for (i = V - 1; i >= 0 && tok < 0; i--) if (w[i] > 0.f) tok = i;
    } else {
        // Truncation: top-k by count, then top-p by mass on the top-k set, then min-p (w is relative to the top).
        smp_cut c = {0.f, -1};
        if (k > 0) {
            c = smp_cut_row(w, V, nblk, bmax, 1, (double)k, grp, tmp);
            if (top_p < 1.0) {  // list the top-k set (id order) and cut it by mass
                int n = 0;
                for (int blk = 0; blk < nblk; blk++)
                    if (bmax[blk] >= c.w && bmax[blk] > 0.f) n = smp_gather_cut(w, blk * SBLK, smp_blk_end(blk, V), c, grp, n);
                double M = 0;
                for (i = 0; i < n; i++) M += w[grp[i]];
                c = smp_refine(grp, n, tmp, w, 0, 0.0, 0, top_p * M);
            }
        } else if (top_p < 1.0) {
            double Za = 0;
            for (int q = 0; q < nblk; q++) Za += bsum[q];
            c = smp_cut_row(w, V, nblk, bmax, 0, top_p * Za, grp, tmp);
        }
        if (min_p > 0) c = smp_tighter(c, (smp_cut){(float)min_p, V});
        tok = smp_draw(w, V, nblk, bmax, c, u, bsum);
    }
    *logprob = (float)(((double)l[tok] - m_all) * invT - log(Z));
    return tok;
}

void KFN(sample_forward)(const sample_params* p) {
    const int B = p->B, V = p->V;
    const int nblk = (V + SBLK - 1) / SBLK;
#if VLEN == 8
    pthread_once(&smp_lanes_once, smp_lanes_make);
#endif
    #pragma omp parallel if (B > 1)
    {
        // per-thread scratch: weights (V), two id lists (V + 16 each), block sums (nblk, double) and maxima (nblk)
        const size_t nw = ((size_t)V + 15) / 16 * 16, ni = nw + 16;
        // (the reused per-thread scratch: a malloc of it per call page-faulted its ~400 KB afresh whenever the
        // heap had been trimmed, e.g. after torch ops: 0.22 against 0.11 ms per call at V = 32000, B = 1)
        char* buf = (char*)mm_scratch((nw * 4 + 2 * ni * 4 + (size_t)nblk * 12 + 64 + 3) / 4);
        if (!buf) kernels_oom_note();   // and its rows get token -3
        #pragma omp for schedule(static)
        for (int b = 0; b < B; b++) {
            float lp = NAN;
            int64_t tok = -3;
            if (buf) {
                float* w = (float*)buf;
                int* grp = (int*)(w + nw);
                int* tmp = grp + ni;
                double* bsum = (double*)(tmp + ni);
                float* bmax = (float*)(bsum + nblk);
                tok = sample_row(p, b, w, grp, tmp, bsum, bmax, &lp);
            }
            p->tokens[b] = tok;
            p->logprobs[b] = lp;
        }
    }
}
