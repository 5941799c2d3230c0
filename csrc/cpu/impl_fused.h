// impl_fused.h — fused training ops: RoPE (HF rotate-half), SwiGLU, cross-entropy (loss and, optionally, its
// gradient in one pass over the logits), AdamW step. Included by kernels_impl.h (after simd.h). Each is one or two
// streaming passes with no temporaries, where the torch composition makes 3-8 passes and allocates each intermediate.

// --- RoPE -------------------------------------------------------------------------------------------------
// out = cat(x1*c - x2*s, x2*c + x1*s) with x1 = x[..., :D/2], x2 = x[..., D/2:]. The backward is the same
// rotation by -angle (s -> -s), so one kernel serves both. out may alias x.
// One head row: out (D) = x (D) rotated by the angles whose cos / sin are c, s (D/2), times sg (-1: backward).
// Also the rotation of attention's q / k copies (impl_attention.h, att_copy_rows).
static inline void rope_row(float* out, const float* x, const float* c, const float* s, int D, float sg) {
    const int h2 = D / 2;
    int i = 0;
    for (; i + VLEN <= h2; i += VLEN) {
        vf x1 = vf_load(x + i), x2 = vf_load(x + h2 + i), vc = vf_load(c + i), vs = vf_load(s + i) * sg;
        vf_store(out + i, x1 * vc - x2 * vs);
        vf_store(out + h2 + i, x2 * vc + x1 * vs);
    }
    for (; i < h2; i++) {
        const float x1 = x[i], x2 = x[h2 + i], sv = s[i] * sg;
        out[i] = x1 * c[i] - x2 * sv;
        out[h2 + i] = x2 * c[i] + x1 * sv;
    }
}

void KFN(rope_forward)(const rope_params* p) {
    const int T = p->T, H = p->H, D = p->D, h2 = D / 2;
    const long BT = (long)p->B * T;
    const long ldx = p->ldx ? p->ldx : (long)H * D, ldo = p->ldo ? p->ldo : (long)H * D;
    const float sg = p->backward ? -1.f : 1.f;
    // one (B*T) row at a time, its heads inside: the flat loop over B*T*H rows it replaces did three integer
    // divisions per 64-float head row (the issue-3 step's (2048, 6, 64) calls: 0.61 -> 0.52 ms each)
    #pragma omp parallel for schedule(static) if (BT * H * D > 65536)
    for (long bt = 0; bt < BT; bt++) {
        const int t = (int)(bt % T);
        const float* c = p->cos + (size_t)t * h2;  // (D/2)
        const float* s = p->sin + (size_t)t * h2;  // (D/2)
        for (int h = 0; h < H; h++)
            rope_row(p->out + bt * ldo + (long)h * D, p->x + bt * ldx + (long)h * D, c, s, D, sg);  // (D) each
    }
}

// exp(x) for x <= ~0 in the training ops (cross-entropy, SwiGLU): vf_exp_neg's range reduction and polynomial
// (rel err ~2e-7) with FMAs, the polynomial in Estrin's form (impl_sample.h's vf_exp_neg stays FMA-free so that
// sampling gives the same bits on every path). 17 vector ops and a dependent chain of ~9 where vf_exp_neg has ~25 and
// ~20: a loop of them ran 9.7 against 15.5 cycles per vector (Zen 3, in L1); the cross-entropy row passes ~25% faster.
static inline vf vf_exp_fast(vf x) {
    x = vf_fmax(x, vf_set1(-88.f));
    const vf t = vf_fma(x, vf_set1(1.44269504088896341f), vf_set1(12582912.f));  // 1.5 * 2^23: round(x log2 e)
    const vf n = t - 12582912.f;
    const vf r = vf_fma(n, vf_set1(2.12194440e-4f), vf_fma(n, vf_set1(-0.693359375f), x));  // x - n ln 2
    const vf r2 = r * r;
    const vf p01 = vf_fma(vf_set1(1.6666665459e-1f), r, vf_set1(5.0000001201e-1f));
    const vf p23 = vf_fma(vf_set1(8.3334519073e-3f), r, vf_set1(4.1665795894e-2f));
    const vf p45 = vf_fma(vf_set1(1.9875691500e-4f), r, vf_set1(1.3981999507e-3f));
    const vf p = vf_fma(vf_fma(p45, r2, p23), r2, p01);
    const vi e = ((vi)t - 0x4B400000 + 127) << 23;  // 2^n in the exponent field
    return vf_select(x > vf_set1(-87.f), vf_fma(p, r2, r + 1.f) * (vf)e, vf_set1(0.f));
}

// --- SwiGLU -----------------------------------------------------------------------------------------------
static inline vf vf_sigmoid(vf g) {  // 1/(1+e^-g) via e^-|g| so the exponential never overflows
    vf a = vf_select(g < vf_set1(0.f), -g, g);
    vf e = vf_exp_fast(-a);
    vf r = 1.f / (1.f + e);
    return vf_select(g < vf_set1(0.f), e * r, r);
}

static inline float sigmoidf_(float g) {  // scalar tail: same formula through a 1-lane-used vector
    vf v = vf_set1(g);
    return vf_sigmoid(v)[0];
}

// One span of len elements; the flat kernels cut n into 4096-element spans, the row form (cols > 0) takes rows.
static inline void swiglu_span(float* out, const float* gate, const float* up, long len) {
    long i = 0;
    for (; i + VLEN <= len; i += VLEN) {
        vf g = vf_load(gate + i);
        vf_store(out + i, g * vf_sigmoid(g) * vf_load(up + i));
    }
    for (; i < len; i++) out[i] = gate[i] * sigmoidf_(gate[i]) * up[i];
}

void KFN(swiglu_forward)(const swiglu_params* p) {
    const long n = p->n;
    if (p->cols > 0) {   // rows of the fused (rows, ld) gate|up buffer
        const int rows = (int)(n / p->cols);
        K_FOR(n > 65536, r, rows,
              swiglu_span(p->out + (long)r * p->cols, p->gate + (long)r * p->ld, p->up + (long)r * p->ld, p->cols));
        return;
    }
    K_FOR(n > 65536, c, (int)((n + 4095) / 4096),
          swiglu_span(p->out + (long)c * 4096, p->gate + (long)c * 4096, p->up + (long)c * 4096,
                      (c + 1L) * 4096 < n ? 4096 : (int)(n - (long)c * 4096)));
}

// dgate = dy * up * s * (1 + g * (1 - s)), dup = dy * g * s, s = sigmoid(g). dgate/dup may alias gate/up.
static inline void swiglu_backward_span(float* dgate, float* dup, const float* dout, const float* gate,
                                        const float* up, long len) {
    long i = 0;
    for (; i + VLEN <= len; i += VLEN) {
        vf g = vf_load(gate + i), u = vf_load(up + i), dy = vf_load(dout + i);
        vf s = vf_sigmoid(g);
        vf_store(dgate + i, dy * u * s * (1.f + g * (1.f - s)));
        vf_store(dup + i, dy * g * s);
    }
    for (; i < len; i++) {
        const float g = gate[i], u = up[i], dy = dout[i], s = sigmoidf_(g);
        dgate[i] = dy * u * s * (1.f + g * (1.f - s));
        dup[i] = dy * g * s;
    }
}

void KFN(swiglu_backward)(const swiglu_backward_params* p) {
    const long n = p->n;
    if (p->cols > 0) {
        const long rows = n / p->cols, ld = p->ld;
        #pragma omp parallel for schedule(static) if (n > 65536)
        for (long r = 0; r < rows; r++)
            swiglu_backward_span(p->dgate + r * ld, p->dup + r * ld, p->dout + r * p->cols, p->gate + r * ld,
                                 p->up + r * ld, p->cols);
        return;
    }
    #pragma omp parallel for schedule(static) if (n > 65536)
    for (long i0 = 0; i0 < n; i0 += 4096)
        swiglu_backward_span(p->dgate + i0, p->dup + i0, p->dout + i0, p->gate + i0, p->up + i0,
                             (i0 + 4096 < n ? i0 + 4096 : n) - i0);
}

// --- cross-entropy ----------------------------------------------------------------------------------------
// A row's max m and log(sum(exp(l - m))), kept apart: their fp32 sum (the lse) loses the low bits of log-sum when
// |m| is large (logits ~1e6 gave softmax 0.325 for 1/3), so loss and gradient use them separately. A NaN logit makes
// the row NaN (max and the exp both drop NaN lanes, so it is flagged in the max pass: one compare per vector).
// e (V) or NULL: receives exp(l - m) (may alias l). Returns the sum of the exps (NaN for a NaN row, e untouched).
static double row_max_sumexp(const float* l, int V, float* e, float* m_out) {
    vf vm = vf_set1(-INFINITY);
    vi nan = (vi)vf_set1(0.f);
    int i = 0;
    for (; i + VLEN <= V; i += VLEN) {
        vf x = vf_load(l + i);
        vm = vf_fmax(x, vm);
        nan |= (vi)(x != x);
    }
    float m = vf_max(vm);
    int bad = 0;
    for (int q = 0; q < VLEN; q++) bad |= nan[q] != 0;
    for (; i < V; i++) {
        m = l[i] > m ? l[i] : m;
        bad |= l[i] != l[i];
    }
    if (bad) {
        *m_out = NAN;
        return NAN;
    }
    vf acc = vf_set1(0.f);
    if (e) {
        for (i = 0; i + VLEN <= V; i += VLEN) {
            const vf x = vf_exp_fast(vf_load(l + i) - m);
            vf_store(e + i, x);
            acc += x;
        }
    } else {
        for (i = 0; i + VLEN <= V; i += VLEN) acc += vf_exp_fast(vf_load(l + i) - m);
    }
    double s = vf_sum(acc);
    for (; i < V; i++) {
        const float x = vf_exp_fast(vf_set1(l[i] - m))[0];
        if (e) e[i] = x;
        s += x;
    }
    *m_out = m;
    return s;
}

// Per row: stats[n] = (max, log-sum) and loss[n] = lse - logits[n, target] (0 where the target is ignored or out of
// range). With dlogits, also the backward: dlogits = (softmax - onehot) * scale, 0 on ignored rows, NaN on NaN rows.
// Fused because the backward on its own read the (N, V) logits again and recomputed every exp (13 of the 28 ms the
// two took at N 2048, V 8192); here the exps are stored by the log-sum pass and scaled while the row is in cache.
void KFN(cross_entropy_forward)(const cross_entropy_params* p) {
    const int N = p->N, V = p->V;
    const size_t ldd = p->ld_dlogits ? (size_t)p->ld_dlogits : (size_t)V;   // dlogits' row stride
    #pragma omp parallel for schedule(static) if (N > 1)
    for (int n = 0; n < N; n++) {
        const float* l = p->logits + (size_t)n * V;                 // (V)
        float* d = p->dlogits ? p->dlogits + (size_t)n * ldd : NULL;  // (V), may alias l
        float* st = p->stats + 2 * (size_t)n;                       // (2)
        const int64_t t = p->targets[n];
        const int valid = t >= 0 && t < V && t != p->ignore_index;
        const float lt = valid ? l[t] : 0.f;  // read before d (which may be l) is written
        float m;
        const double s = row_max_sumexp(l, V, valid ? d : NULL, &m);
        st[0] = m;
        st[1] = (float)log(s);
        p->loss[n] = valid ? (m - lt) + st[1] : 0.f;
        if (!d) continue;
        if (!valid) {  // no gradient, whatever the logits (as the separate backward did)
            memset(d, 0, sizeof(float) * (size_t)V);
        } else if (m != m) {  // the loss is NaN: so is its gradient (as torch)
            for (int i = 0; i < V; i++) d[i] = NAN;
        } else {
            const vf k = vf_set1((float)(p->scale / s));
            int i = 0;
            for (; i + VLEN <= V; i += VLEN) vf_store(d + i, vf_load(d + i) * k);
            for (; i < V; i++) d[i] *= k[0];
            d[t] -= p->scale;
        }
    }
}

// --- AdamW ------------------------------------------------------------------------------------------------
static inline vf vf_sqrt(vf x) {  // GCC turns the lane loop into one sqrtps
    for (int q = 0; q < VLEN; q++) x[q] = sqrtf(x[q]);
    return x;
}

// torch.optim.AdamW semantics: p *= 1 - lr*wd; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
// p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps).
void KFN(adamw_step)(const adamw_params* p) {
    const long n = p->n;
    const float b1 = p->beta1, b2 = p->beta2;
    const float bc1 = 1.f - powf(b1, (float)p->step), bc2s = sqrtf(1.f - powf(b2, (float)p->step));
    const float step_size = p->lr / bc1, decay = 1.f - p->lr * p->weight_decay, eps = p->eps;
    #pragma omp parallel for schedule(static) if (n > 65536)
    for (long i0 = 0; i0 < n; i0 += 4096) {
        const long i1 = i0 + 4096 < n ? i0 + 4096 : n;
        long i = i0;
        for (; i + VLEN <= i1; i += VLEN) {
            vf g = vf_load(p->grads + i);
            vf m = vf_load(p->m + i) * b1 + (1.f - b1) * g;
            vf v = vf_load(p->v + i) * b2 + (1.f - b2) * (g * g);
            vf_store(p->m + i, m);
            vf_store(p->v + i, v);
            vf_store(p->params + i, vf_load(p->params + i) * decay - step_size * m / (vf_sqrt(v) / bc2s + eps));
        }
        for (; i < i1; i++) {
            const float g = p->grads[i];
            const float m = p->m[i] * b1 + (1.f - b1) * g, v = p->v[i] * b2 + (1.f - b2) * (g * g);
            p->m[i] = m;
            p->v[i] = v;
            p->params[i] = p->params[i] * decay - step_size * m / (sqrtf(v) / bc2s + eps);
        }
    }
}
