// impl_sample.h — batched sampling from logits (B, V): greedy, temperature, top-k, top-p, min-p, allowed mask.
// Included by kernels_impl.h; KFN() names the per-path symbol. Cost per row: one max pass, one exp pass that
// stores the weights (V floats of scratch per thread), one gather of the few tokens above a threshold, then an
// O(n) partial selection on those (quickselect, weighted for top-p). No sort of the vocabulary.
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

// Candidate order: higher logit first, then lower id. A strict total order, so selections are deterministic.
static inline int ranks_before(const float* l, int a, int b) { return l[a] > l[b] || (l[a] == l[b] && a < b); }

static inline void swap_int(int* a, int* b) { int t = *a; *a = *b; *b = t; }

// Partitions c[lo, hi) around a median-of-3 pivot; returns its position p: c[lo, p) rank before it, c(p, hi) after.
static int cand_partition(int* c, int lo, int hi, const float* l) {
    int mid = lo + (hi - lo) / 2, last = hi - 1;
    if (ranks_before(l, c[mid], c[lo])) swap_int(&c[mid], &c[lo]);
    if (ranks_before(l, c[last], c[lo])) swap_int(&c[last], &c[lo]);
    if (ranks_before(l, c[mid], c[last])) swap_int(&c[mid], &c[last]);  // median now at c[last]
    const int pv = c[last];
    int s = lo;
    for (int i = lo; i < last; i++)
        if (ranks_before(l, c[i], pv)) swap_int(&c[i], &c[s++]);
    swap_int(&c[s], &c[last]);
    return s;
}

// Reorders c[0, n) so that c[0, k) are the k best (unordered). Expected O(n).
static void select_top_k(int* c, int n, int k, const float* l) {
    int lo = 0, hi = n;
    while (lo < hi) {
        int p = cand_partition(c, lo, hi, l);
        if (p == k || p + 1 == k) return;
        if (p < k) lo = p + 1; else hi = p;
    }
}

// Reorders c[0, n) and returns r: c[0, r) is the shortest best-first prefix whose weight reaches target
// (top-p's nucleus). Weighted quickselect, expected O(n).
static int select_mass(int* c, int n, double target, const float* w, const float* l) {
    int lo = 0, hi = n;
    double acc = 0;  // mass of c[0, lo), all ranked before c[lo, hi)
    while (lo < hi) {
        int p = cand_partition(c, lo, hi, l);
        double left = 0;
        for (int i = lo; i < p; i++) left += w[c[i]];
        if (acc + left >= target) { hi = p; continue; }
        acc += left + w[c[p]];
        if (acc >= target) return p + 1;
        lo = p + 1;
    }
    return lo > 0 ? lo : 1;
}

// One row. Returns the token, or -1 (no allowed token with a finite logit) / -2 (NaN or +inf in the logits).
static int64_t sample_row(const sample_params* p, int b, float* w, int* cand, double* bsum, float* bmax,
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
        // Gather G = {w >= thr}, a best-first prefix, widening thr until G provably holds the final set.
        static const float radii[] = {5.f, 12.f, 30.f, -1.f};  // thr = e^-radius; -1: every token with w > 0
        int n = 0;
        double SG = 0;
        float thr = 0.f;
        for (int ri = 0; ri < 4; ri++) {
            thr = radii[ri] < 0 ? 0.f : expf(-radii[ri]);
            // min-p alone bounds the final set, except that top-p after top-k needs the whole top-k mass
            if (min_p > 0 && thr < (float)min_p && (k == 0 || top_p >= 1.0)) thr = (float)min_p;
            n = 0; SG = 0;
            for (int blk = 0; blk < nblk; blk++) {
                if (bmax[blk] < thr || bmax[blk] <= 0.f) continue;
                const int i1 = (blk + 1) * SBLK < V ? (blk + 1) * SBLK : V;
                for (i = blk * SBLK; i < i1; i++)
                    if (w[i] >= thr && w[i] > 0.f) { cand[n++] = i; SG += w[i]; }
            }
            const int all = thr == 0.f;
            const int topk_inside = k > 0 && n >= k;
            const int mass_known = k == 0 || topk_inside || all;
            const int final_inside = all || topk_inside || (min_p > 0 && thr <= (float)min_p) ||
                                     (top_p < 1.0 && k == 0 && SG >= top_p * Za);
            if (final_inside && (top_p >= 1.0 || mass_known)) break;
        }
        if (k > 0 && n > k) { select_top_k(cand, n, k, l); n = k; }
        if (top_p < 1.0) {
            double M = 0;
            if (k == 0) M = Za;
            else for (i = 0; i < n; i++) M += w[cand[i]];
            n = select_mass(cand, n, top_p * M, w, l);
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
        // per-thread scratch: weights (V), candidate ids (V), block sums and maxima (nblk)
        float* w = (float*)malloc((size_t)V * sizeof(float));
        int* cand = (int*)malloc((size_t)V * sizeof(int));
        double* bsum = (double*)malloc((size_t)nblk * sizeof(double));
        float* bmax = (float*)malloc((size_t)nblk * sizeof(float));
        #pragma omp for schedule(static)
        for (int b = 0; b < B; b++) {
            float lp = NAN;
            int64_t tok = (w && cand && bsum && bmax) ? sample_row(p, b, w, cand, bsum, bmax, &lp) : -3;
            p->tokens[b] = tok;
            p->logprobs[b] = lp;
        }
        free(w); free(cand); free(bsum); free(bmax);
    }
}
