"""Sampling kernel (ops.sample) vs the exact truncated distribution (ref.sample_probs): chi-square on many draws,
greedy, masks, seeds, every ISA path, log-probs, odd vocab sizes, bad input. Run: pytest tests/test_kernels_sample.py"""
import math

import pytest
import torch

from pyllm import ops, ref
from pyllm._ext import C
from conftest import ISAS, poison

COMBOS = [  # temperature, top_k, top_p, min_p
    (1.0, 0, 1.0, 0.0), (0.7, 0, 1.0, 0.0), (1.3, 5, 1.0, 0.0), (1.0, 0, 0.8, 0.0), (1.0, 0, 1.0, 0.1),
    (0.9, 10, 0.7, 0.0), (1.0, 8, 0.9, 0.05), (2.0, 0, 0.5, 0.02),
    (1.0, 10, 1.0, 0.2),  # top-k with a min-p that cuts into it (no top-p): a kernel skipping min-p after top-k passed
]


def chi2_critical(df: int, alpha: float) -> float:
    """Upper alpha quantile of chi-square(df), Wilson-Hilferty approximation (good to ~1% for df >= 3)."""
    z = float(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(1 - alpha)))
    a = 2.0 / (9 * df)
    return df * (1 - a + z * math.sqrt(a)) ** 3


def chi2_stat(counts: torch.Tensor, probs: torch.Tensor, n: int):
    """Pearson chi-square over the support, bins with expected count < 5 pooled into one; returns (stat, df)."""
    exp = probs * n
    big = exp >= 5
    obs_b, exp_b = counts[big].double(), exp[big]
    if (~big).any() and exp[~big].sum() > 0:
        obs_b = torch.cat([obs_b, counts[~big].double().sum()[None]])
        exp_b = torch.cat([exp_b, exp[~big].sum()[None]])
    return float(((obs_b - exp_b) ** 2 / exp_b).sum()), len(exp_b) - 1


@pytest.mark.parametrize("T,k,p,mp", COMBOS)
@pytest.mark.parametrize("V", [17, 50])
def test_sample_distribution_chi_square(rng, T, k, p, mp, V):
    n = 20000
    logits = torch.randn(1, V, generator=rng) * 2
    probs = ref.sample_probs(logits, T, k, p, mp)[0]
    seed = int(torch.randint(0, 2**62, (1,), generator=rng))
    tokens, _ = ops.sample(logits.expand(n, V).contiguous(), T, k, p, mp, seed=seed)  # one draw per row
    counts = torch.bincount(tokens, minlength=V)
    assert counts[probs == 0].sum() == 0, "drew a token the filters remove"
    stat, df = chi2_stat(counts, probs, n)
    if df >= 1:
        crit = chi2_critical(max(df, 3), 1e-6) if df >= 3 else {1: 23.9, 2: 27.6}[df]
        assert stat < crit, f"chi2 {stat:.1f} >= {crit:.1f} (df {df}): sampled distribution is wrong"


def test_sample_distribution_with_mask(rng):
    n, V = 20000, 31
    logits = torch.randn(1, V, generator=rng) * 2
    mask = torch.rand(1, V, generator=rng) < 0.5
    mask[0, logits.argmax()] = False  # the mask removes the argmax
    mask[0, 3] = True
    probs = ref.sample_probs(logits, 1.0, 6, 0.9, 0.0, mask)[0]
    tokens, _ = ops.sample(logits.expand(n, V).contiguous(), 1.0, 6, 0.9, 0.0, mask.expand(n, V).contiguous(),
                           seed=int(torch.randint(0, 2**62, (1,), generator=rng)))
    counts = torch.bincount(tokens, minlength=V)
    assert counts[~mask[0]].sum() == 0
    stat, df = chi2_stat(counts, probs, n)
    if df >= 3:
        assert stat < chi2_critical(df, 1e-6)


def test_greedy_is_argmax_and_logprob_is_log_softmax(isa, rng):
    for V in (1, 3, 17, 1000, 50257):
        logits = torch.randn(5, V, generator=rng) * 3
        tokens, lp = ops.sample(logits, temperature=0.0)
        assert torch.equal(tokens, logits.argmax(-1))
        # float64 reference: torch 2.6's fp32 log_softmax missed 1e-5 at V = 50257 (seen once in ~10 runs)
        want = torch.log_softmax(logits.double(), -1).gather(-1, tokens[:, None])[:, 0]
        torch.testing.assert_close(lp.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("V", [1, 3, 17, 1000, 50257])
@pytest.mark.parametrize("T,k,p,mp", [(0.8, 0, 1.0, 0.0), (1.0, 40, 0.9, 0.0), (1.5, 0, 0.95, 0.02)])
def test_logprob_and_support(isa, rng, V, T, k, p, mp):
    logits = torch.randn(7, V, generator=rng) * 4
    tokens, lp = ops.sample(logits, T, k, p, mp, seed=int(torch.randint(0, 2**62, (1,), generator=rng)))
    assert tokens.dtype == torch.int64 and ((tokens >= 0) & (tokens < V)).all()
    probs = ref.sample_probs(logits, T, k, p, mp)
    assert (probs.gather(-1, tokens[:, None]) > 0).all(), "drew a token outside the truncated support"
    # Reference in float64: torch's own fp32 log_softmax at V=50257 is off by up to ~2e-5 on AVX2 (8-lane sums).
    want = torch.log_softmax(logits.double() / T, -1).gather(-1, tokens[:, None])[:, 0]
    torch.testing.assert_close(lp.double(), want, rtol=1e-5, atol=1e-5)


def test_same_tokens_on_every_isa_path(rng):
    # Many seeds, vocab sizes that hit every tail/block case, and all filter combos: tokens bitwise equal.
    before = C().isa_get()
    try:
        for V in (3, 17, 255, 257, 4099):
            logits = torch.randn(64, V, generator=rng) * 2.5
            mask = torch.rand(64, V, generator=rng) < 0.7
            mask[:, 0] = True
            for T, k, p, mp in COMBOS:
                for m in (None, mask):
                    seed = int(torch.randint(0, 2**62, (1,), generator=rng))
                    outs = []
                    for isa in ISAS:
                        C().isa_set(isa)
                        outs.append(ops.sample(logits, T, k, p, mp, m, seed=seed, step=7))
                    for t, lp in outs[1:]:
                        assert torch.equal(t, outs[0][0]), f"V={V} combo={(T, k, p, mp)}: tokens differ across paths"
                        torch.testing.assert_close(lp, outs[0][1], rtol=1e-6, atol=1e-6)
    finally:
        C().isa_set(before)


def test_seed_reproducible_and_step_changes_draw(rng):
    logits = torch.randn(256, 100, generator=rng)
    a = ops.sample(logits, 1.0, 0, 0.95, seed=123, step=4)
    b = ops.sample(logits, 1.0, 0, 0.95, seed=123, step=4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = ops.sample(logits, 1.0, 0, 0.95, seed=124, step=4)[0]
    d = ops.sample(logits, 1.0, 0, 0.95, seed=123, step=5)[0]
    assert (c != a[0]).sum() > 100 and (d != a[0]).sum() > 100  # 256 draws from ~80 tokens: mostly different
    # a row's draw does not depend on the other rows
    e = ops.sample(logits[:10].contiguous(), 1.0, 0, 0.95, seed=123, step=4)[0]
    assert torch.equal(e, a[0][:10])


def test_mask_never_violated(isa, rng):
    for V in (3, 17, 1000, 50257):
        logits = torch.randn(16, V, generator=rng) * 5
        mask = torch.rand(16, V, generator=rng) < 0.05
        mask[torch.arange(16), logits.argmax(-1)] = False  # the mask removes the argmax
        mask[torch.arange(16), torch.randint(0, V, (16,), generator=rng)] = True  # at least one allowed
        for T, k, p, mp in [(0.0, 0, 1.0, 0.0), (1.0, 0, 1.0, 0.0), (1.0, 3, 0.5, 0.1), (0.5, 0, 0.9, 0.0)]:
            tokens, lp = ops.sample(logits, T, k, p, mp, mask, seed=int(torch.randint(0, 2**62, (1,), generator=rng)))
            assert mask.gather(-1, tokens[:, None]).all()
            Tn = T if T > 0 else 1.0
            torch.testing.assert_close(lp, torch.log_softmax(logits / Tn, -1).gather(-1, tokens[:, None])[:, 0],
                                       rtol=1e-5, atol=1e-5)
        greedy = ops.sample(logits, 0.0, mask=mask)[0]
        assert torch.equal(greedy, logits.masked_fill(~mask, float("-inf")).argmax(-1))


def test_mask_far_below_max_still_samples(rng):
    # allowed tokens 200 logits below the max: their weights would underflow relative to the global max
    logits = torch.randn(4, 50, generator=rng)
    logits[:, 0] = 300.0
    mask = torch.zeros(4, 50, dtype=torch.bool)
    mask[:, 10:13] = True
    tokens, lp = ops.sample(logits, 0.5, mask=mask, seed=1)
    assert ((tokens >= 10) & (tokens < 13)).all()
    assert torch.isfinite(lp).all()


def test_writes_every_output(isa, rng):
    logits = torch.randn(9, 333, generator=rng)
    tokens = torch.full((9,), -7, dtype=torch.int64)
    lp = poison(torch.empty(9))
    C().sample_forward(tokens.data_ptr(), lp.data_ptr(), logits.data_ptr(), 0, 9, 333, 1.0, 20, 0.9, 0.0, 5, 0)
    assert ((tokens >= 0) & (tokens < 333)).all() and torch.isfinite(lp).all()


def test_sample_rejects_bad_input():
    with pytest.raises(ValueError, match="row 1: no allowed token"):
        m = torch.ones(3, 5, dtype=torch.bool)
        m[1] = False
        ops.sample(torch.randn(3, 5), mask=m)
    with pytest.raises(ValueError, match="row 0: no allowed token"):
        ops.sample(torch.full((1, 4), float("-inf")))
    with pytest.raises(ValueError, match="NaN"):
        x = torch.randn(2, 5)
        x[1, 2] = float("nan")
        ops.sample(x)
    with pytest.raises(TypeError, match="dtype"):
        ops.sample(torch.randn(2, 5), mask=torch.ones(2, 5, dtype=torch.uint8))
    with pytest.raises(ValueError, match="shape"):
        ops.sample(torch.randn(2, 5), mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="top_p"):
        ops.sample(torch.randn(2, 5), top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        ops.sample(torch.randn(2, 5), temperature=-1.0)
    with pytest.raises(ValueError, match="top_k"):
        ops.sample(torch.randn(2, 5), top_k=-2)
    with pytest.raises(ValueError, match=r"\(B, V\)"):
        ops.sample(torch.randn(5))


@pytest.mark.parametrize("V", [1000, 4099])
def test_top_p_cut_inside_equal_weights(isa, rng, V):
    # every logit equal: the nucleus is the first ceil(top_p * V) ids (ties rank the lower id first), so the
    # cut falls inside one group of identical weights; flat rows also make the boundary octave the whole row
    p = 0.1049
    n_in = math.ceil(p * V - 1e-9)
    tokens, _ = ops.sample(torch.zeros(4000, V), 1.0, top_p=p, seed=int(torch.randint(0, 2**62, (1,), generator=rng)))
    assert int(tokens.max()) < n_in and int(tokens.max()) >= n_in - 20  # drawn up to the cut, never past it


@pytest.mark.parametrize("scale", [0.5, 3.0])
def test_top_p_chi_square_large_vocab(isa, rng, scale):
    # V = 4099 (a tail block), quantised logits (many equal weights across the boundary): exact nucleus
    n, V = 20000, 4099
    logits = torch.round(torch.randn(1, V, generator=rng) * scale * 8) / 8
    for k, p in [(0, 0.3), (200, 0.6)]:
        probs = ref.sample_probs(logits, 1.0, k, p)[0]
        tokens, _ = ops.sample(logits.expand(n, V).contiguous(), 1.0, k, p,
                               seed=int(torch.randint(0, 2**62, (1,), generator=rng)))
        counts = torch.bincount(tokens, minlength=V)
        assert counts[probs == 0].sum() == 0, "drew a token outside the nucleus"
        stat, df = chi2_stat(counts, probs, n)
        assert stat < chi2_critical(max(df, 3), 1e-6)


@pytest.mark.parametrize("T", [1e-30, 2e-39, 1e-45, 1e-50])
def test_tiny_temperature_is_the_greedy_limit(isa, rng, T):
    """Below ~2.9e-39 the kernel's 1/T was +inf: every weight NaN -> 0, so "no allowed token" (and a read of
    logits[-1]); below fp32's smallest float T rounded to 0: greedy with the T = 1 log-prob. Now every tiny T is the
    T -> 0 limit: the argmax with log-prob 0, or among k equal maxima 1/k each; the C runtime's sampler too."""
    logits = torch.randn(3, 300, generator=rng) * 4
    logits[2, [7, 100, 299]] = 50.0  # three equal maxima
    tokens, lp = ops.sample(logits, temperature=T, seed=1)
    assert tokens[:2].tolist() == logits[:2].argmax(-1).tolist() and lp[:2].tolist() == [0.0, 0.0]
    assert int(tokens[2]) in (7, 100, 299)
    torch.testing.assert_close(lp[2], torch.tensor(-math.log(3)), rtol=1e-6, atol=1e-6)
    draws = {int(ops.sample(logits[2:], temperature=T, seed=1, step=s)[0]) for s in range(40)}
    assert draws == {7, 100, 299}
    tok_p, _ = ops.sample(logits, temperature=1.0, top_p=1e-50, seed=2)  # was the binding's top_p range error
    assert tok_p[:2].tolist() == logits[:2].argmax(-1).tolist()
    from pyllm import runtime
    if runtime.LIB_PATH.exists():
        assert runtime.sample(logits[0].numpy(), temperature=T, seed=1) == int(logits[0].argmax())
