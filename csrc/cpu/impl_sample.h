// impl_sample.h — batched sampling from logits (B, V): greedy, temperature, top-k, top-p, min-p, allowed mask.
// Included by kernels_impl.h; KFN() names the per-path symbol. Cost per row: one max pass, one exp pass that
// stores the weights (V floats of scratch per thread), then for top-k/top-p a radix selection on the weights' bits
// (one histogram pass over the row, then passes over the shrinking boundary group). No sort of the vocabulary.
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

static inline double sum16(const vf* acc) {       // the 16 lanes in a fixed order, in double
    float lanes[16];
    memcpy(lanes, acc, sizeof(lanes));
    double s = 0;
    for (int q = 0; q < 16; q++) s += lanes[q];
    return s;
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

// Candidate order: higher weight first, then lower id. Radix selection on the weight's bits (for w >= 0 the
// IEEE bits order like the values), 8 bits per level: a histogram (count and mass) per level finds the digit
// where the prefix ends, tokens above it are in, tokens on it go to the next level. O(n) per level, no sort.
static inline uint32_t wbits(float x) { uint32_t u; memcpy(&u, &x, 4); return u; }

// Appends to out[*no] the tokens of grp (ng ids in id order, all sharing the digits above `level`) that belong to
// the shortest best-first prefix whose count (by_count) or mass reaches need; acc = what out already holds.
static void radix_refine(int* out, int* no, int* grp, int ng, int* tmp, const float* w, int level, double acc,
                         int by_count, double need) {
    static const int shifts[4] = {23, 15, 7, 0};
    for (; level < 4 && ng > 0; level++) {
        const int sh = shifts[level];
        int cnt[256] = {0};
        double mass[256] = {0};
        for (int i = 0; i < ng; i++) {
            const int d = (wbits(w[grp[i]]) >> sh) & 0xFF;
            cnt[d]++;
            mass[d] += w[grp[i]];
        }
        int db = -1;  // the digit where the prefix ends; -1: the whole group is in
        for (int d = 255; d >= 0; d--) {
            const double add = by_count ? cnt[d] : mass[d];
            if (acc + add >= need) { db = d; break; }
            acc += add;
        }
        int nt = 0, n_out = *no;
        for (int i = 0; i < ng; i++) {  // stable: the group stays in id order; branch-free
            const int d = (wbits(w[grp[i]]) >> sh) & 0xFF;
            out[n_out] = grp[i];
            n_out += d > db;
            tmp[nt] = grp[i];
            nt += d == db;
        }
        *no = n_out;
        if (db < 0) return;
        memcpy(grp, tmp, (size_t)nt * sizeof(int));
        ng = nt;
    }
    for (int i = 1; i < ng; i++)  // equal weights: lower id first (the group is tiny; insertion sort)
        for (int j = i; j > 0 && grp[j - 1] > grp[j]; j--) { int t = grp[j]; grp[j] = grp[j - 1]; grp[j - 1] = t; }
    for (int i = 0; i < ng && acc < need; i++) { out[(*no)++] = grp[i]; acc += by_count ? 1.0 : w[grp[i]]; }
}

// The prefix over a whole row of weights (V): the first level reads w directly and skips blocks whose maximum is
// below the boundary octave. Writes the prefix to out, returns its length. grp, tmp: (V) scratch.
static int radix_prefix_row(const float* w, int V, int nblk, const float* bmax, int by_count, double need,
                            int* out, int* grp, int* tmp) {
    // 4 interleaved histograms (token i -> copy i % 4): neighbours mostly share an octave, and one table would
    // chain every add through the same memory slot. Combined in a fixed order, so still path-independent.
    int cnt4[4][256];
    double mass4[4][256];
    memset(cnt4, 0, sizeof(cnt4));
    memset(mass4, 0, sizeof(mass4));
    for (int blk = 0; blk < nblk; blk++) {
        if (!(bmax[blk] > 0.f)) continue;
        const int i1 = (blk + 1) * SBLK < V ? (blk + 1) * SBLK : V;
        for (int i = blk * SBLK; i < i1; i++) {  // w == 0 lands in digit 0, which no prefix ever reaches first
            const int d = wbits(w[i]) >> 23;
            cnt4[i & 3][d]++;
            mass4[i & 3][d] += w[i];
        }
    }
    int cnt[256];
    double mass[256];
    for (int d = 0; d < 256; d++) {
        cnt[d] = cnt4[0][d] + cnt4[1][d] + cnt4[2][d] + cnt4[3][d];
        mass[d] = ((mass4[0][d] + mass4[1][d]) + mass4[2][d]) + mass4[3][d];
    }
    cnt[0] = 0;  // zero weights (masked / underflow) are never candidates
    mass[0] = 0;
    double acc = 0;
    int db = -1;
    for (int d = 255; d >= 0; d--) {
        const double add = by_count ? cnt[d] : mass[d];
        if (acc + add >= need) { db = d; break; }
        acc += add;
    }
    int no = 0, ng = 0;
    for (int blk = 0; blk < nblk; blk++) {
        if (!(bmax[blk] > 0.f) || (int)(wbits(bmax[blk]) >> 23) < db) continue;
        const int i1 = (blk + 1) * SBLK < V ? (blk + 1) * SBLK : V;
        for (int i = blk * SBLK; i < i1; i++) {  // branch-free: which side a token falls on is unpredictable
            const int d = wbits(w[i]) >> 23;
            out[no] = i;
            no += d > db && d > 0;
            grp[ng] = i;
            ng += d == db && d > 0;
        }
    }
    if (db >= 0) radix_refine(out, &no, grp, ng, tmp, w, 1, acc, by_count, need);
    return no;
}

// The same over a list of ids cand[0, n) (rewritten in place with the prefix); returns its length.
static int radix_prefix_list(int* cand, int n, const float* w, int by_count, double need, int* grp, int* tmp) {
    memcpy(grp, cand, (size_t)n * sizeof(int));
    for (int i = 1; i < n; i++)  // id order, so that ties resolve by id (n <= top_k: small)
        for (int j = i; j > 0 && grp[j - 1] > grp[j]; j--) { int t = grp[j]; grp[j] = grp[j - 1]; grp[j - 1] = t; }
    int no = 0;
    radix_refine(cand, &no, grp, n, tmp, w, 0, 0.0, by_count, need);
    return no;
}

// One row. Returns the token, or -1 (no allowed token with a finite logit) / -2 (NaN or +inf in the logits).
static int64_t sample_row(const sample_params* p, int b, float* w, int* cand, int* grp, int* tmp, double* bsum,
                          float* bmax,
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
        int64_t tok = 0;
        for (i = 0; i < V; i++) if (l[i] == m_a && (!mk || mk[i])) { tok = i; break; }
        double Z = exp_pass(l, NULL, V, m_all, m_all, 1.f, NULL, NULL, NULL);
        *logprob = (float)((double)l[tok] - m_all - log(Z));
        return tok;
    }
    const float invT = 1.f / p->temperature;
    const int nblk = (V + SBLK - 1) / SBLK;
    // pass 2: w_i = exp((l_i - m_a)/T) on allowed tokens (so the top allowed token weighs exactly 1)
    const double Z = exp_pass(l, mk, V, m_all, m_a, invT, w, bsum, bmax);
    double Za = 0;
    for (int k = 0; k < nblk; k++) Za += bsum[k];
    const double u = sample_uniform(p->seed, (uint64_t)b, p->step);
    const int k = p->top_k > 0 && p->top_k < V ? p->top_k : 0;
    const double top_p = p->top_p, min_p = p->min_p;
    int64_t tok = -1;

    if (k == 0 && top_p >= 1.0 && min_p <= 0.0) {  // no truncation: inverse CDF over the block sums
        const double t = u * Za;
        double acc = 0;
        int blk = 0;
        while (blk < nblk - 1 && acc + bsum[blk] <= t) acc += bsum[blk++];
        const int i1 = (blk + 1) * SBLK < V ? (blk + 1) * SBLK : V;
        for (i = blk * SBLK; i < i1; i++) {
            if (w[i] > 0.f) tok = i;
            acc += w[i];
            if (acc > t && w[i] > 0.f) break;
        }
        if (tok < 0)  // rounding left the chosen block empty: take the last token with weight
            for (i = V - 1; i >= 0 && tok < 0; i--) if (w[i] > 0.f) tok = i;
    } else {
        // Truncation: top-k by count, then top-p by mass on the top-k set, then min-p (w is relative to the top).
        int n = 0;
        if (k > 0) {
            n = radix_prefix_row(w, V, nblk, bmax, 1, (double)k, cand, grp, tmp);
            if (top_p < 1.0) {
                double M = 0;
                for (i = 0; i < n; i++) M += w[cand[i]];
                n = radix_prefix_list(cand, n, w, 0, top_p * M, grp, tmp);
            }
        } else if (top_p < 1.0) {
            n = radix_prefix_row(w, V, nblk, bmax, 0, top_p * Za, cand, grp, tmp);
        } else {
            for (int blk = 0; blk < nblk; blk++) {
                if (bmax[blk] < (float)min_p) continue;
                const int i1 = (blk + 1) * SBLK < V ? (blk + 1) * SBLK : V;
                for (i = blk * SBLK; i < i1; i++) if (w[i] >= (float)min_p && w[i] > 0.f) cand[n++] = i;
            }
        }
        if (min_p > 0) {
            int r = 0;
            for (i = 0; i < n; i++) if (w[cand[i]] >= (float)min_p) cand[r++] = cand[i];
            n = r;
        }
        double S = 0;
        for (i = 0; i < n; i++) S += w[cand[i]];
        const double t = u * S;
        double acc = 0;
        for (i = 0; i < n; i++) {
            tok = cand[i];
            acc += w[cand[i]];
            if (acc > t) break;
        }
    }
    *logprob = (float)(((double)l[tok] - m_all) * invT - log(Z));
    return tok;
}

void KFN(sample_forward)(const sample_params* p) {
    const int B = p->B, V = p->V;
    const int nblk = (V + SBLK - 1) / SBLK;
    #pragma omp parallel if (B > 1)
    {
        // per-thread scratch: weights (V), candidate ids and two radix buffers (3V), block sums and maxima (nblk)
        float* w = (float*)malloc((size_t)V * sizeof(float));
        int* cand = (int*)malloc((size_t)3 * V * sizeof(int));
        double* bsum = (double*)malloc((size_t)nblk * sizeof(double));
        float* bmax = (float*)malloc((size_t)nblk * sizeof(float));
        #pragma omp for schedule(static)
        for (int b = 0; b < B; b++) {
            float lp = NAN;
            int64_t tok = (w && cand && bsum && bmax) ? sample_row(p, b, w, cand, cand + V, cand + 2 * (size_t)V, bsum, bmax, &lp) : -3;
            p->tokens[b] = tok;
            p->logprobs[b] = lp;
        }
        free(w); free(cand); free(bsum); free(bmax);
    }
}
