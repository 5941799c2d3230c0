"""Fused ops (rope, swiglu, cross_entropy, adamw) vs pyllm.ref: forward, gradients, odd sizes, every ISA path,
poisoned outputs; the AdamW optimizer vs torch.optim.AdamW. Run: pytest tests/test_kernels_fused.py"""
import pytest
import torch

from pyllm import ops, ref
from pyllm._ext import C
from conftest import poison


def rope_tables(T, D, rng):
    ang = torch.rand(T, D // 2, generator=rng) * 6.3
    return ang.cos().contiguous(), ang.sin().contiguous()


@pytest.mark.parametrize("B,T,H,D", [(1, 1, 1, 2), (2, 3, 3, 6), (1, 17, 2, 34), (3, 5, 4, 64), (1, 9, 1, 130)])
def test_rope_forward_backward(isa, rng, B, T, H, D):
    x = torch.randn(B, T, H, D, generator=rng, requires_grad=True)
    cos, sin = rope_tables(T, D, rng)
    y = ops.rope(x, cos, sin)
    xr = x.detach().clone().requires_grad_()
    yr = ref.rope(xr, cos, sin)
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-6)
    dy = torch.randn(B, T, H, D, generator=rng)
    y.backward(dy)
    yr.backward(dy)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-6)


def test_rope_writes_every_element(isa, rng):
    x = torch.randn(2, 5, 3, 18, generator=rng)
    cos, sin = rope_tables(5, 18, rng)
    out = poison(torch.empty_like(x))
    C().rope_forward(out.data_ptr(), x.data_ptr(), cos.data_ptr(), sin.data_ptr(), 2, 5, 3, 18, 0)
    torch.testing.assert_close(out, ref.rope(x, cos, sin), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(1,), (3,), (17,), (5, 127), (4, 1000), (2, 3, 4099)])
def test_swiglu_forward_backward(isa, rng, shape):
    g = (torch.randn(*shape, generator=rng) * 4).requires_grad_()
    u = torch.randn(*shape, generator=rng, requires_grad=True)
    y = ops.swiglu(g, u)
    gr, ur = g.detach().clone().requires_grad_(), u.detach().clone().requires_grad_()
    yr = ref.swiglu(gr, ur)
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-6)
    dy = torch.randn(*shape, generator=rng)
    y.backward(dy)
    yr.backward(dy)
    torch.testing.assert_close(g.grad, gr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(u.grad, ur.grad, rtol=1e-5, atol=1e-6)


def test_swiglu_extreme_gates_and_poison(isa, rng):
    g = torch.tensor([-200.0, -90.0, -30.0, -1e-3, 0.0, 1e-3, 30.0, 90.0, 200.0])
    u = torch.randn(9, generator=rng)
    out = poison(torch.empty(9))
    C().swiglu_forward(out.data_ptr(), g.data_ptr(), u.data_ptr(), 9)
    torch.testing.assert_close(out, ref.swiglu(g, u), rtol=1e-5, atol=1e-6)
    dg, du = poison(torch.empty(9)), poison(torch.empty(9))
    dy = torch.randn(9, generator=rng)
    C().swiglu_backward(dg.data_ptr(), du.data_ptr(), dy.data_ptr(), g.data_ptr(), u.data_ptr(), 9)
    gr = g.clone().requires_grad_()
    ur = u.clone().requires_grad_()
    ref.swiglu(gr, ur).backward(dy)
    torch.testing.assert_close(dg, gr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(du, ur.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("N,V", [(1, 1), (3, 17), (17, 127), (5, 1000), (4, 8193)])
@pytest.mark.parametrize("dloss", [1.0, 1.7])  # 1: the forward's gradient buffer is returned as it is
def test_cross_entropy_forward_backward(isa, rng, N, V, dloss):
    logits = (torch.randn(N, V, generator=rng) * 3).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=rng)
    if N > 1:
        targets[torch.rand(N, generator=rng) < 0.3] = -1
        targets[0] = int(torch.randint(0, V, (1,), generator=rng))
    loss = ops.cross_entropy(logits, targets)
    lr = logits.detach().clone().requires_grad_()
    loss_r = ref.cross_entropy(lr, targets)
    torch.testing.assert_close(loss, loss_r, rtol=1e-5, atol=1e-5)
    (loss * dloss).backward()
    (loss_r * dloss).backward()
    torch.testing.assert_close(logits.grad, lr.grad, rtol=1e-5, atol=1e-6)


def test_cross_entropy_retained_graph_backward_twice(isa, rng):
    """The backward hands out the forward's gradient buffer: a second backward through a retained graph must see
    it unchanged (the gradients add up to exactly twice the first)."""
    logits = torch.randn(5, 300, generator=rng).requires_grad_()
    targets = torch.randint(0, 300, (5,), generator=rng)
    loss = ops.cross_entropy(logits, targets)
    loss.backward(retain_graph=True)
    once = logits.grad.clone()
    (loss * 0.5).backward(retain_graph=True)
    loss.backward()
    torch.testing.assert_close(logits.grad, once * 2.5, rtol=1e-6, atol=0)
    lr = logits.detach().clone().requires_grad_()
    ref.cross_entropy(lr, targets).backward()
    torch.testing.assert_close(once, lr.grad, rtol=1e-5, atol=1e-6)


def test_cross_entropy_without_grad_writes_no_gradient(isa, rng):
    """Logits that do not require grad (evaluation): no (N, V) gradient is made, the loss is the same."""
    logits = torch.randn(4, 50, generator=rng)
    targets = torch.randint(0, 50, (4,), generator=rng)
    with torch.no_grad():
        a = ops.cross_entropy(logits, targets)
    torch.testing.assert_close(a, ref.cross_entropy(logits, targets), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("N,V,ignore", [(7, 17, 0), (9, 1000, 3), (5, 37, 36)])
def test_cross_entropy_non_negative_ignore_index(isa, rng, N, V, ignore):
    """ignore_index was only ever -1, which no valid target equals: a backward that dropped `t != ignore_index`
    (a gradient on the ignored rows, whose target is a real class) passed. Against torch's cross_entropy with the
    same ignore_index; ignored rows must get exactly zero gradient."""
    logits = (torch.randn(N, V, generator=rng) * 3).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=rng)
    targets[torch.arange(N) % 3 == 1] = ignore
    targets[0] = (ignore + 1) % V
    loss = ops.cross_entropy(logits, targets, ignore_index=ignore)
    lr = logits.detach().clone().requires_grad_()
    loss_r = torch.nn.functional.cross_entropy(lr, targets, ignore_index=ignore)
    torch.testing.assert_close(loss, loss_r, rtol=1e-5, atol=1e-5)
    (loss * 1.7).backward()
    (loss_r * 1.7).backward()
    torch.testing.assert_close(logits.grad, lr.grad, rtol=1e-5, atol=1e-6)
    assert torch.equal(logits.grad[targets == ignore], torch.zeros(int((targets == ignore).sum()), V))

def test_cross_entropy_all_ignored_is_zero(isa, rng):
    logits = torch.randn(4, 9, generator=rng, requires_grad=True)
    targets = torch.full((4,), -1, dtype=torch.int64)
    loss = ops.cross_entropy(logits, targets)
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros(4, 9))


@pytest.mark.parametrize("alias", [False, True])
def test_cross_entropy_kernel_gradient_in_place_and_poison(isa, rng, alias):
    """The kernel alone: loss, stats, and the gradient of scale * sum(loss) written by the forward, into a poisoned
    buffer or over the logits themselves (the training loop may reuse the logits buffer); ignored rows get 0."""
    N, V = 6, 301
    logits = torch.randn(N, V, generator=rng)
    targets = torch.randint(0, V, (N,), generator=rng)
    targets[2] = -1
    loss, stats = poison(torch.empty(N)), poison(torch.empty(N, 2))
    C().cross_entropy_forward(loss.data_ptr(), stats.data_ptr(), logits.data_ptr(), targets.data_ptr(), N, V, -1)
    torch.testing.assert_close(stats[:, 0], logits.max(-1).values, rtol=0, atol=0)
    torch.testing.assert_close(stats.sum(-1), torch.logsumexp(logits, -1), rtol=1e-5, atol=1e-5)
    expect = (torch.logsumexp(logits, -1) - logits.gather(1, targets.clamp(min=0)[:, None])[:, 0])
    expect[2] = 0
    torch.testing.assert_close(loss, expect, rtol=1e-5, atol=1e-5)
    buf = logits.clone()
    grad = buf if alias else poison(torch.empty(N, V))
    loss2, stats2 = poison(torch.empty(N)), poison(torch.empty(N, 2))
    C().cross_entropy_forward(loss2.data_ptr(), stats2.data_ptr(), buf.data_ptr(), targets.data_ptr(), N, V, -1,
                              grad.data_ptr(), 0.5)
    assert torch.equal(loss2, loss) and torch.equal(stats2, stats)  # the loss is read before the logits are overwritten
    lr = logits.clone().requires_grad_()
    torch.nn.functional.cross_entropy(lr, targets, ignore_index=-1, reduction="sum").mul(0.5).backward()
    torch.testing.assert_close(grad, lr.grad, rtol=1e-5, atol=1e-6)
    assert torch.equal(grad[2], torch.zeros(V))


@pytest.mark.parametrize("N,V,ld", [(1, 3, 3), (5, 301, 317), (4, 1024, 1040)])
def test_cross_entropy_kernel_gradient_row_stride(isa, rng, N, V, ld):
    """dlogits rows at stride ld_dlogits (the LM head's dX GEMM reads them in place at a stride that is not a 4 KiB
    multiple): each row's V values as torch's gradient, the padding between rows never written."""
    logits = torch.randn(N, V, generator=rng) * 2
    targets = torch.randint(0, V, (N,), generator=rng)
    if N > 1:
        targets[1] = -1
    buf = poison(torch.empty(N, ld))
    buf[:, V:] = 7.0
    loss, stats = poison(torch.empty(N)), poison(torch.empty(N, 2))
    C().cross_entropy_forward(loss.data_ptr(), stats.data_ptr(), logits.data_ptr(), targets.data_ptr(), N, V, -1,
                              buf.data_ptr(), 0.25, ld)
    lr = logits.clone().requires_grad_()
    torch.nn.functional.cross_entropy(lr, targets, ignore_index=-1, reduction="sum").mul(0.25).backward()
    torch.testing.assert_close(buf[:, :V], lr.grad, rtol=1e-5, atol=1e-6)
    assert torch.equal(buf[:, V:], torch.full((N, ld - V), 7.0))


def test_cross_entropy_kernel_rejects_a_bad_row_stride():
    logits, targets = torch.randn(2, 10), torch.zeros(2, dtype=torch.int64)
    loss, stats, d = torch.empty(2), torch.empty(2, 2), torch.empty(2, 16)
    args = (loss.data_ptr(), stats.data_ptr(), logits.data_ptr(), targets.data_ptr(), 2, 10, -1)
    with pytest.raises(ValueError, match="ld_dlogits must be 0 or >= V"):
        C().cross_entropy_forward(*args, d.data_ptr(), 1.0, 9)
    with pytest.raises(ValueError, match="alias logits only at the same row stride"):
        C().cross_entropy_forward(*args, logits.data_ptr(), 1.0, 16)


def test_padded_rows_stride():
    """padded_rows moves a 4 KiB-multiple row stride off the multiple and leaves every other one as it is."""
    for cols in (1, 383, 1000, 1023, 1025, 1152):
        assert ops.padded_rows(3, cols).stride() == (cols, 1)
    for cols in (1024, 2048, 8192):
        t = ops.padded_rows(3, cols)
        assert t.shape == (3, cols) and t.stride(1) == 1 and t.stride(0) > cols and (t.stride(0) * 4) % 4096


@pytest.mark.parametrize("V", [1000, 1024])   # 1024: dlogits comes in padded rows, read in place by dX's GEMM
def test_lm_head_and_cross_entropy_gradients(isa, rng, monkeypatch, V):
    """linear -> cross_entropy, as the model's LM head: the gradients of x and the weight equal torch's, with every
    buffer ops.empty hands out poisoned (the padding of dlogits' rows included: a GEMM that read it gives NaN)."""
    ops_empty = ops.empty
    monkeypatch.setattr(ops, "POOL_MIN_BYTES", 0)
    monkeypatch.setattr(ops, "empty", lambda *s: ops_empty(*s).fill_(float("nan")))
    N, K = 37, 24
    x = torch.randn(N, K, generator=rng, requires_grad=True)
    w = (torch.randn(V, K, generator=rng) * K ** -0.5).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=rng)
    targets[3] = -1
    ops.cross_entropy(ops.linear(x, w), targets).backward()
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref.cross_entropy(ref.linear(xr, wr), targets).backward()
    for a, r in ((x.grad, xr.grad), (w.grad, wr.grad)):   # fp32 sums in another order: atol from the scale
        torch.testing.assert_close(a, r, rtol=1e-4, atol=2e-5 * float(r.abs().max()))
    assert w.grad.is_contiguous()


def test_linear_backward_with_a_row_strided_gradient(isa, rng):
    """A gradient whose rows are contiguous but padded apart is read in place (no copy): the same dX, dW and db."""
    x = torch.randn(2, 9, 16, generator=rng, requires_grad=True)
    w = torch.randn(1024, 16, generator=rng, requires_grad=True)
    b = torch.randn(1024, generator=rng, requires_grad=True)
    dy = torch.randn(2, 9, 1040, generator=rng)[..., :1024]
    ops.linear(x, w, b).backward(dy)
    xr, wr, br = (t.detach().clone().requires_grad_() for t in (x, w, b))
    ref.linear(xr, wr, br).backward(dy.contiguous())
    for a, r in ((x.grad, xr.grad), (w.grad, wr.grad), (b.grad, br.grad)):   # sums of up to 1024 products
        torch.testing.assert_close(a, r, rtol=1e-4, atol=2e-5 * float(r.abs().max()))


@pytest.mark.parametrize("V,where", [(3, 0), (1000, 999), (1000, 17), (64, 63)])
def test_cross_entropy_nan_logit_makes_the_row_nan(isa, rng, V, where):
    """A NaN in a non-target logit gave a finite loss and gradient (max and exp both dropped NaN lanes), so a
    partly-NaN lm_head trained on with a normal-looking loss; as torch, the row's loss and gradient are NaN, and
    other rows are unaffected. Covers the vector body and the scalar tail."""
    logits = torch.randn(3, V, generator=rng)
    logits[1, where] = float("nan")
    targets = torch.tensor([0, (where + 1) % V, 1 % V])
    lp = logits.clone().requires_grad_()
    rows = [ops.cross_entropy(lp[i:i + 1], targets[i:i + 1]) for i in range(3)]
    assert torch.isfinite(rows[0]) and torch.isnan(rows[1]) and torch.isfinite(rows[2])
    loss = ops.cross_entropy(lp, targets)
    assert torch.isnan(loss)
    loss.backward()
    assert torch.isnan(lp.grad[1]).all()
    lr = logits.clone().requires_grad_()
    ref.cross_entropy(lr, targets).backward()
    assert torch.isnan(lr.grad[1]).all()  # what the reference does too


@pytest.mark.parametrize("scale", [1e3, 1e6, 1e8])
def test_cross_entropy_large_logits_keep_their_precision(isa, rng, scale):
    """The backward took exp(l - lse) with the fp32 lse = max + log-sum, whose low bits vanish at large |max|:
    three equal logits at 1e6 gave softmax 0.325 (not 1/3), at 1e8 1.0. Max and log-sum are now kept apart."""
    logits = (torch.randn(4, 37, generator=rng) + scale).requires_grad_()
    logits.data[0] = scale  # equal logits: softmax exactly 1/V
    targets = torch.randint(0, 37, (4,), generator=rng)
    ops.cross_entropy(logits, targets).backward()
    lr = logits.detach().double().requires_grad_()
    torch.nn.functional.cross_entropy(lr, targets).backward()
    torch.testing.assert_close(logits.grad, lr.grad.float(), rtol=1e-5, atol=1e-7)


def test_cross_entropy_rejects_bad_targets():
    with pytest.raises(ValueError, match="out of range"):
        ops.cross_entropy(torch.randn(2, 5), torch.tensor([1, 5]))
    with pytest.raises(TypeError, match="dtype"):
        ops.cross_entropy(torch.randn(2, 5), torch.tensor([1, 2], dtype=torch.int32))


@pytest.mark.parametrize("n", [1, 3, 17, 1000, 4099])
@pytest.mark.parametrize("eps, gscale", [(1e-8, 1.0), (1e-8, 1e-8), (0.1, 1.0)])
def test_adamw_step_matches_reference(isa, rng, n, eps, gscale):
    """eps = 1e-8 with N(0, 1) gradients moves the update by ~1e-8 relative: a kernel that dropped eps (or put it
    inside the sqrt) passed (session-30 mutation audit). Gradients ~1e-8, and eps = 0.1, make eps count."""
    p = torch.randn(n, generator=rng)
    pr = p.clone()
    m, v = torch.zeros(n), torch.zeros(n)
    mr, vr = m.clone(), v.clone()
    for step in range(1, 5):
        g = torch.randn(n, generator=rng) * gscale
        ops.adamw_step([p], [g], [m], [v], 1e-2, 0.9, 0.95, eps, 0.1, step)
        ref.adamw_step([pr], [g], [mr], [vr], 1e-2, 0.9, 0.95, eps, 0.1, step)
    torch.testing.assert_close(m, mr, rtol=1e-5, atol=1e-7 * gscale)
    torch.testing.assert_close(v, vr, rtol=1e-5, atol=1e-9 * gscale ** 2)
    torch.testing.assert_close(p, pr, rtol=1e-5, atol=1e-6)


def test_adamw_optimizer_matches_torch(isa, rng):
    shapes = [(7, 5), (13,), (3, 4, 6)]
    ours = [torch.randn(*s, generator=rng).requires_grad_() for s in shapes]
    theirs = [t.detach().clone().requires_grad_() for t in ours]
    groups = lambda ps: [{"params": ps[:2], "weight_decay": 0.1}, {"params": ps[2:], "weight_decay": 0.0}]
    opt = ops.AdamW(groups(ours), lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    opt_t = torch.optim.AdamW(groups(theirs), lr=3e-3, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    for _ in range(6):
        grads = [torch.randn(*s, generator=rng) for s in shapes]
        for a, b, g in zip(ours, theirs, grads):
            a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        opt_t.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(opt.state[a]["exp_avg_sq"], opt_t.state[b]["exp_avg_sq"], rtol=1e-5, atol=1e-9)


def test_fused_reject_bad_input():
    with pytest.raises(ValueError, match="even D"):
        ops.rope(torch.randn(1, 2, 1, 3), torch.ones(2, 1), torch.ones(2, 1))
    with pytest.raises(ValueError, match="shape"):
        ops.rope(torch.randn(1, 2, 1, 4), torch.ones(3, 2), torch.ones(2, 2))
    with pytest.raises(ValueError, match="shape"):
        ops.swiglu(torch.randn(3), torch.randn(4))
    with pytest.raises(ValueError, match="step"):
        ops.adamw_step([torch.zeros(2)], [torch.zeros(2)], [torch.zeros(2)], [torch.zeros(2)], 1e-3, 0.9, 0.99,
                       1e-8, 0.0, 0)


def test_ops_without_autograd_give_the_same_outputs(rng):
    """Under no_grad (or with no input requiring grad) the ops call their Function's forward directly (ops._apply:
    no autograd node); outputs must be bit-identical to the recorded path, and the recorded path must still
    differentiate."""
    B, T, H, Hkv, D, Cm, F = 2, 5, 4, 2, 8, 32, 24
    x = torch.randn(B, T, Cm, generator=rng)
    w_in, w_post = torch.randn(Cm, generator=rng), torch.randn(Cm, generator=rng)
    wq, wk, wv = (torch.randn(n, Cm, generator=rng) for n in (H * D, Hkv * D, Hkv * D))
    wo, wg, wu, wd = (torch.randn(*s, generator=rng) for s in ((Cm, H * D), (F, Cm), (F, Cm), (Cm, F)))
    cos, sin = torch.randn(T, D // 2, generator=rng), torch.randn(T, D // 2, generator=rng)
    q, k = torch.randn(B, T, H, D, generator=rng), torch.randn(B, T, Hkv, D, generator=rng)
    logits, targets = torch.randn(7, 11, generator=rng), torch.randint(0, 11, (7,), generator=rng)
    calls = {
        "rmsnorm": lambda *a: ops.rmsnorm(a[0], w_in),
        "linear": lambda *a: ops.linear(a[0], wq),
        "rope": lambda *a: ops.rope(a[1], cos, sin),
        "swiglu": lambda *a: ops.swiglu(a[0], a[0] * 0.5),
        "attention": lambda *a: ops.attention(a[1], a[2], a[2]),
        "cross_entropy": lambda *a: ops.cross_entropy(a[3], targets),
        "block": lambda *a: ops.block(a[0], w_in, wq, wk, wv, wo, w_post, wg, wu, wd, cos, sin, None, H, Hkv),
    }
    for name, f in calls.items():
        with torch.no_grad():
            plain = f(x, q, k, logits)
        leaves = [t.clone().requires_grad_() for t in (x, q, k, logits)]
        recorded = f(*leaves)
        assert recorded.requires_grad and not plain.requires_grad, name
        assert torch.equal(plain, recorded.detach()), name
        assert torch.equal(f(x, q, k, logits), plain), name   # grad mode on, no input requiring grad
        recorded.float().sum().backward()
        assert any(t.grad is not None and t.grad.abs().sum() > 0 for t in leaves), name
