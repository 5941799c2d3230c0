// impl_fused.h — fused training ops: RoPE (HF rotate-half), SwiGLU, cross-entropy (saves max and log-sum, one-pass
// backward), AdamW step. Included by kernels_impl.h after impl_sample.h (uses its vf_exp_neg). Each is one or two streaming
// passes with no temporaries, where the torch composition makes 3-8 passes and allocates each intermediate.

// --- RoPE -------------------------------------------------------------------------------------------------
// out = cat(x1*c - x2*s, x2*c + x1*s) with x1 = x[..., :D/2], x2 = x[..., D/2:]. The backward is the same
// rotation by -angle (s -> -s), so one kernel serves both. out may alias x.
void KFN(rope_forward)(const rope_params* p) {
    const int T = p->T, H = p->H, D = p->D, h2 = D / 2;
    const long rows = (long)p->B * T * H;
    const long ldx = p->ldx ? p->ldx : (long)H * D, ldo = p->ldo ? p->ldo : (long)H * D;
    const float sg = p->backward ? -1.f : 1.f;
    #pragma omp parallel for schedule(static) if (rows * D > 65536)
    for (long r = 0; r < rows; r++) {
        const long bt = r / H, h = r % H;
        const int t = (int)(bt % T);
        const float* x = p->x + bt * ldx + h * D;     // (D)
        float* out = p->out + bt * ldo + h * D;       // (D)
        const float* c = p->cos + (size_t)t * h2;  // (D/2)
        const float* s = p->sin + (size_t)t * h2;  // (D/2)
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
}

// --- SwiGLU -----------------------------------------------------------------------------------------------
static inline vf vf_sigmoid(vf g) {  // 1/(1+e^-g) via e^-|g| so the exponential never overflows
    vf a = vf_select(g < vf_set1(0.f), -g, g);
    vf e = vf_exp_neg(-a);
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
static void row_max_logsum(const float* l, int V, float* out) {  // out (2): m, log(sum(exp(l - m)))
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
        out[0] = out[1] = NAN;
        return;
    }
    vf acc = vf_set1(0.f);
    for (i = 0; i + VLEN <= V; i += VLEN) acc += vf_exp_neg(vf_load(l + i) - m);
    double s = vf_sum(acc);
    for (; i < V; i++) s += vf_exp_neg(vf_set1(l[i] - m))[0];
    out[0] = m;
    out[1] = (float)log(s);
}

// Per row: stats[n] = (max, log-sum) and loss[n] = lse - logits[n, target] (0 where the target is ignored or out of
// range).
void KFN(cross_entropy_forward)(const cross_entropy_params* p) {
    const int N = p->N, V = p->V;
    #pragma omp parallel for schedule(static) if (N > 1)
    for (int n = 0; n < N; n++) {
        const float* l = p->logits + (size_t)n * V;  // (V)
        float* st = p->stats + 2 * (size_t)n;        // (2)
        row_max_logsum(l, V, st);
        const int64_t t = p->targets[n];
        p->loss[n] = (t >= 0 && t < V && t != p->ignore_index) ? (st[0] - l[t]) + st[1] : 0.f;
    }
}

// dlogits = (softmax - onehot) * scale in one pass from the saved stats; ignored rows get 0, NaN rows NaN. dlogits
// may alias logits (the training loop can reuse the logits buffer for its gradient).
void KFN(cross_entropy_backward)(const cross_entropy_backward_params* p) {
    const int N = p->N, V = p->V;
    #pragma omp parallel for schedule(static) if (N > 1)
    for (int n = 0; n < N; n++) {
        const float* l = p->logits + (size_t)n * V;  // (V)
        float* d = p->dlogits + (size_t)n * V;       // (V)
        const int64_t t = p->targets[n];
        const int valid = t >= 0 && t < V && t != p->ignore_index;
        const float sc = valid ? p->scale : 0.f, m = p->stats[2 * (size_t)n], ls = p->stats[2 * (size_t)n + 1];
        if (valid && m != m) {  // the forward's loss was NaN: so is its gradient (as torch)
            for (int i = 0; i < V; i++) d[i] = NAN;
            continue;
        }
        int i = 0;
        for (; i + VLEN <= V; i += VLEN) vf_store(d + i, vf_exp_neg((vf_load(l + i) - m) - ls) * sc);
        for (; i < V; i++) d[i] = vf_exp_neg(vf_set1((l[i] - m) - ls))[0] * sc;
        if (valid) d[t] -= sc;
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
