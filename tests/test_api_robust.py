"""The library API on bad input (found by a probe of the public functions, session 15): each case was a silently
wrong result, a value quietly changed (a seed wrapped, a float cut to an int), or an error from deep inside torch
or pybind11. Each must now be one ValueError/TypeError naming the argument, or the right result.

Run: OMP_NUM_THREADS=1 PYTHONPATH=$PWD python -m pytest -q tests/test_api_robust.py
"""
from __future__ import annotations

import functools

import pytest
import torch

from pyllm import chat, ops, ref
from pyllm.tokenizer import Tokenizer


def test_matmul_out_sharing_memory_with_an_operand(rng):
    """out=a gave a wrong product (the kernel reads a while writing out), with no error."""
    a, b = torch.randn(3, 3, generator=rng), torch.randn(3, 3, generator=rng)
    bias = torch.randn(3, generator=rng)
    for out, name, kw in ((a, "a", {}), (b, "b", {"accumulate": True})):
        with pytest.raises(ValueError, match=f"matmul out: shares memory with {name}"):
            ops.matmul(a, b, out=out, **kw)
    buf = torch.randn(3, 3, generator=rng)
    with pytest.raises(ValueError, match="matmul out: shares memory with bias"):
        ops.matmul(a, b, bias=buf[1], out=buf)
    out = torch.full((3, 3), float("nan"))
    ops.matmul(a, b, bias=bias, out=out)  # disjoint buffers: still fine
    torch.testing.assert_close(out, a @ b.T + bias, rtol=1e-5, atol=1e-5)


def test_cross_entropy_ignore_index_is_an_int64(rng):
    """ignore_index=1.5: the kernel ignored target 1 while the mean counted it as valid (a wrong loss)."""
    x, t = torch.randn(3, 5, generator=rng), torch.tensor([1, 2, 3])
    for bad, exc in ((1.5, TypeError), (None, TypeError), (2 ** 70, ValueError)):
        with pytest.raises(exc, match="cross_entropy ignore_index"):
            ops.cross_entropy(x, t, bad)
    torch.testing.assert_close(ops.cross_entropy(x, t, 1), ref.cross_entropy(x, t, 1), rtol=1e-5, atol=1e-6)


def test_sample_arguments(rng):
    logits = torch.randn(2, 11, generator=rng)
    for kw, exc, pattern in ((dict(seed=-1), ValueError, r"sample seed: must be in \[0, 18446744073709551615\]"),
                             (dict(seed=2 ** 64), ValueError, "sample seed: must be in"),  # was seed 0's tokens
                             (dict(seed=1.5), TypeError, "sample seed: expected an integer"),
                             (dict(seed="7"), TypeError, "sample seed: expected an integer"),
                             (dict(step=-1), ValueError, "sample step: must be in"),
                             (dict(top_k=2.7), TypeError, "sample top_k: expected an integer"),  # was cut to 2
                             (dict(top_k=2 ** 70), ValueError, "sample top_k: must be in"),      # pybind11's
                             (dict(top_k=None), TypeError, "sample top_k: expected an integer"),
                             (dict(temperature=float("inf")), ValueError, "sample temperature: must be a finite"),
                             (dict(temperature=None), TypeError, "sample temperature: expected a number"),
                             (dict(top_p=1.5), ValueError, r"sample top_p: must be in \(0, 1\]"),
                             (dict(top_p=None), TypeError, "sample top_p: expected a number"),
                             (dict(min_p=-0.1), ValueError, r"sample min_p: must be in \[0, 1\]")):
        with pytest.raises(exc, match=pattern):
            ops.sample(logits, **kw)
    a = ops.sample(logits, top_k=torch.tensor(3), seed=2 ** 64 - 1, step=5)  # integer-like values are fine
    b = ops.sample(logits, top_k=3, seed=2 ** 64 - 1, step=5)
    assert torch.equal(a[0], b[0])


def test_decode_attention_shapes_and_strides(rng):
    q = torch.randn(3, 2, 6, generator=rng)
    cache = torch.randn(3, 5, 2, 6, generator=rng)
    with pytest.raises(ValueError, match="decode_attention q: bad shape"):  # was ZeroDivisionError
        ops.decode_attention(q, torch.randn(3, 5, 0, 6), torch.randn(3, 5, 0, 6), 2)
    # Any batch / position strides (the caches are only read): an expand()ed cache was the C++ "ld_t must be > 0",
    # then "overlap rows"; a time-major cache (T, B, Hkv, D) permuted to (B, T, ...) was refused the same way.
    one = torch.randn(1, 1, 2, 6, generator=rng)
    time_major = torch.randn(5, 3, 2, 6, generator=rng).permute(1, 0, 2, 3)
    for k, v in ((one.expand(3, 5, 2, 6), one.expand(3, 5, 2, 6)),
                 (time_major, torch.randn(5, 3, 2, 6, generator=rng).permute(1, 0, 2, 3)),
                 (cache[:1].expand(3, 5, 2, 6), cache[1:2].expand(3, 5, 2, 6))):
        out = ops.decode_attention(q, k, v, 4)
        torch.testing.assert_close(out, ref.decode_attention(q, k, v, 4), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out, ops.decode_attention(q, k.contiguous(), v.contiguous(), 4), rtol=0, atol=0)
    for n_ctx, exc in ((2.7, TypeError), (None, TypeError), (6, ValueError), (0, ValueError)):
        with pytest.raises(exc, match="decode_attention n_ctx"):
            ops.decode_attention(q, cache, cache, n_ctx)


def test_rmsnorm_of_a_scalar():
    with pytest.raises(ValueError, match="rmsnorm x: expected a non-empty tensor of at least 1 dim"):  # IndexError
        ops.rmsnorm(torch.tensor(2.0), torch.randn(0))


def test_adamw_hyper_parameters_and_failed_steps(rng):
    w = torch.randn(4, 3, generator=rng, requires_grad=True)
    for kw, pattern in ((dict(lr=float("nan")), "AdamW lr: must be a finite"),        # was accepted: NaN weights
                        (dict(lr=float("inf")), "AdamW lr: must be a finite"),
                        (dict(eps=float("nan")), "AdamW eps: must be a finite"),
                        (dict(weight_decay=float("nan")), "AdamW weight_decay: must be a finite"),
                        (dict(betas=(0.9, 1.0)), r"AdamW beta2: must be in \[0, 1\)"),
                        (dict(betas=(0.9,)), "AdamW betas: expected a pair"),          # was IndexError
                        (dict(lr="0.1"), "AdamW lr: expected a number")):
        with pytest.raises((ValueError, TypeError), match=pattern):
            ops.AdamW([w], **kw)
    p, g = torch.randn(5, generator=rng), torch.randn(5, generator=rng)
    m, v = torch.zeros(5), torch.zeros(5)
    for kw, exc, pattern in ((dict(beta1=1.0), ValueError, r"adamw_step beta1: must be in \[0, 1\)"),  # was NaN
                             (dict(lr=float("nan")), ValueError, "adamw_step lr: must be a finite"),
                             (dict(step=1.5), TypeError, "adamw_step step: expected an integer")):  # was cut
        args = {**dict(lr=1e-3, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0, step=1), **kw}
        with pytest.raises(exc, match=pattern):
            ops.adamw_step([p], [g], [m], [v], **args)
    with pytest.raises(ValueError, match=r"adamw_step ms\[0\]: shares memory with params\[0\]"):
        ops.adamw_step([p], [g], [p], [v], 1e-3, 0.9, 0.99, 1e-8, 0.0, 1)
    # a step that fails (here: an fp64 parameter) no longer advances the step count first
    wd = torch.randn(3, dtype=torch.float64, requires_grad=True)
    opt = ops.AdamW([wd])
    wd.grad = torch.ones(3, dtype=torch.float64)
    with pytest.raises(TypeError, match="expected dtype torch.float32"):
        opt.step()
    assert int(opt.state[wd]["step"]) == 0
    opt2, w2 = ops.AdamW([w]), w.detach().clone().requires_grad_()
    ref_opt = torch.optim.AdamW([w2])
    for _ in range(3):  # still torch's AdamW step for step
        w.grad = w2.grad = torch.randn(4, 3, generator=rng)
        opt2.step()
        ref_opt.step()
    torch.testing.assert_close(w, w2, rtol=1e-5, atol=1e-6)
    assert int(opt2.state[w]["step"]) == 3


def test_tokenizer_and_chat_argument_types():
    tok = Tokenizer.byte_level()
    with pytest.raises(TypeError, match="encode_batch expects a list of str, got str"):  # was 5 one-char texts
        tok.encode_batch("hello")
    for bad in (None, 104, "hi"):
        with pytest.raises(TypeError, match="decode: expected a sequence of token ids"):
            tok.decode(bad)
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(TypeError, match="render: expected a chat tokenizer"):  # was AttributeError
        chat.render(msgs, None)
    for bad in (None, 5):
        with pytest.raises(ValueError, match="prompt must be a string or a list of messages"):
            chat.render_prompt_completion(bad, "x", tok)
    assert chat.render(msgs, tok)[0][0] == tok.bos_id


# --- session 18's probe of the public ops --------------------------------------------------------------------------
def _first_order_ops(rng):
    """(name, fn of the leaf tensors, leaves) for each differentiable pyllm op."""
    x = torch.randn(2, 5, 2, 4, generator=rng)
    q, k, v = (torch.randn(1, 6, 2, 8, generator=rng) for _ in range(3))
    cos, sin = torch.randn(5, 2, generator=rng), torch.randn(5, 2, generator=rng)
    r = functools.partial(torch.randn, generator=rng)
    return [("rmsnorm", lambda a, w: ops.rmsnorm(a, w), [r(4, 8), r(8)]),
            ("linear", lambda a, w: ops.linear(a, w), [r(3, 8), r(5, 8)]),
            ("rope", lambda a: ops.rope(a, cos, sin), [x]),
            ("swiglu", lambda g, u: ops.swiglu(g, u), [r(6), r(6)]),
            ("cross_entropy", lambda lg: ops.cross_entropy(lg, torch.tensor([0, 2, 1])), [r(3, 5)]),
            ("attention", lambda a, b, c: ops.attention(a, b, c), [q, k, v])]


@pytest.mark.parametrize("i", range(6))
def test_second_order_gradients_are_an_error_not_a_wrong_answer(rng, i):
    """create_graph=True through a pyllm op returned a gradient with no graph, so a gradient penalty added nothing
    (rmsnorm's w.grad[:3] came out [-0.97, -4.76, 0.49] where the reference gives [11.9, -39.5, 1.72]). The
    backwards are first-order only and now say so when differentiated again."""
    name, fn, leaves = _first_order_ops(rng)[i]
    leaves = [t.clone().requires_grad_() for t in leaves]
    y = fn(*leaves)
    (g,) = torch.autograd.grad((y * y).sum(), leaves[0], create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        (g * g).sum().backward()
    leaves = [t.detach().clone().requires_grad_() for t in leaves]  # first order is unchanged (and compared with
    fn(*leaves).pow(2).sum().backward()                             # ref.py in the kernel tests)
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves), name


def test_rope_tables_that_ask_for_a_gradient_are_refused(rng):
    """cos/sin with requires_grad gave an output that required grad and a None .grad on the tables, silently."""
    x = torch.randn(1, 3, 2, 4, generator=rng, requires_grad=True)
    theta = torch.randn(3, 2, generator=rng, requires_grad=True)
    with pytest.raises(ValueError, match="rope cos/sin: the rotary tables get no gradient here"):
        ops.rope(x, theta.cos(), theta.sin())
    with torch.no_grad():  # no gradient asked for: fine
        out = ops.rope(x, theta.cos(), theta.sin())
    torch.testing.assert_close(out, ref.rope(x, theta.cos(), theta.sin()), rtol=1e-6, atol=1e-6)
    out = ops.rope(x, theta.cos().detach(), theta.sin().detach())
    out.sum().backward()
    assert x.grad is not None


def test_q8_and_adamw_argument_edges(rng):
    """Empty Q8_0 inputs were the binding's "operator(): null pointer for q/y", a float G torch.empty's TypeError,
    adamw_step at step >= 2^31 pybind11's 4-line "incompatible function arguments"."""
    for w in (torch.randn(0, 4), torch.randn(2, 0)):
        with pytest.raises(ValueError, match=r"quantize_q8 w: expected a non-empty \(n, k\)"):
            ops.quantize_q8(w, 2)
    with pytest.raises(TypeError, match="quantize_q8 G: expected an integer, got 2.0"):
        ops.quantize_q8(torch.randn(2, 4), 2.0)
    with pytest.raises(ValueError, match="matvec_q8 wq: expected a non-empty 2-D tensor"):
        ops.matvec_q8(torch.zeros(0, 4, dtype=torch.int8), torch.zeros(0, 1), torch.randn(4))
    p, g = torch.randn(7, generator=rng), torch.randn(7, generator=rng)
    m, v = torch.randn(7, generator=rng), torch.rand(7, generator=rng)
    expect = [t.clone() for t in (p, m, v)]
    ops.adamw_step([expect[0]], [g], [expect[1]], [expect[2]], 1e-2, 0.9, 0.999, 1e-8, 0.1, 2 ** 31 - 1)
    ops.adamw_step([p], [g], [m], [v], 1e-2, 0.9, 0.999, 1e-8, 0.1, 2 ** 40)
    assert all(torch.equal(a, b) for a, b in zip((p, m, v), expect))  # the fp32 bias corrections are 1 at both


def test_ops_without_a_backward_refuse_inputs_that_ask_for_one(rng):
    """Session 30 audit: matmul, matvec, decode_attention, quantize_q8, matvec_q8 returned outputs with no graph for
    inputs that require grad: backward() then left .grad None without a word (torch's ops would differentiate), and
    an out= leaf that requires grad was overwritten in place. Under no_grad they run as before."""
    a = torch.randn(3, 4, generator=rng).requires_grad_()
    b = torch.randn(5, 4, generator=rng)
    q, kc = torch.randn(2, 2, 8, generator=rng), torch.randn(2, 6, 1, 8, generator=rng)
    wq, ws = torch.zeros(5, 4, dtype=torch.int8), torch.ones(5, 1)
    calls = {"matmul": lambda: ops.matmul(a, b),
             "matmul out": lambda: ops.matmul(b[:3].detach(), b, out=torch.zeros(3, 5, requires_grad=True)),
             "matvec": lambda: ops.matvec(b, a[0]),
             "decode_attention": lambda: ops.decode_attention(q.requires_grad_(), kc, kc, 4),
             "quantize_q8": lambda: ops.quantize_q8(a, 4),
             "matvec_q8": lambda: ops.matvec_q8(wq, ws, a[0])}
    for name, call in calls.items():
        with pytest.raises(ValueError, match="records no gradient; call it under torch.no_grad"):
            call()
        with torch.no_grad():
            call()
    torch.testing.assert_close(ops.matmul(a.detach(), b), a.detach() @ b.T, rtol=1e-5, atol=1e-5)


def test_tensors_the_kernels_would_misread(rng):
    """A lazy negation bit (x.conj().imag) was read without its sign (swiglu gave 1.46 for -1.46); a sparse tensor
    was torch's RuntimeError; a dimension of 2^31 was pybind11's 4-line type error."""
    z = torch.tensor([1 + 2j], dtype=torch.complex64).conj().imag    # -2 behind a negation bit (one element:
    assert z.is_neg() and z.is_contiguous()                           # longer, the imag view is strided)
    with pytest.raises(ValueError, match="swiglu gate: has a lazy negation bit"):
        ops.swiglu(z, torch.ones(1))
    torch.testing.assert_close(ops.swiglu(z.resolve_neg(), torch.ones(1)), ref.swiglu(z.resolve_neg(), torch.ones(1)),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"matvec W: expected a dense \(strided\) tensor"):
        ops.matvec(torch.eye(3).to_sparse(), torch.ones(3))
    with pytest.raises(ValueError, match="rmsnorm x: a dimension of 2147483648 is beyond the kernels' 32-bit"):
        ops.rmsnorm(torch.empty(0, 2 ** 31), torch.ones(2 ** 31 - 1))  # no element: nothing allocated


def test_sample_top_k_1_is_the_argmax(isa, rng):
    """top_k=1 ranked tokens by their fp32 weight exp((l - max)/T): a logit within ~1e-7 of the maximum weighs exactly
    1 as well, and the tie went to the lower id, a token that is not the argmax (greedy picked the right one)."""
    logits = torch.tensor([[0.1, 0.10000000894069672], [2.0, 2.0 - 1e-7], [5.0, 5.0]])
    for seed in range(4):
        for T in (1.0, 0.7, 3.0):
            tok, lp = ops.sample(logits, temperature=T, top_k=1, seed=seed)
            assert tok.tolist() == [1, 0, 0], (seed, T)       # ties of equal logits: the lower id, as greedy
            torch.testing.assert_close(lp, torch.log_softmax(logits / T, -1).gather(1, tok[:, None])[:, 0])
            tok2, _ = ops.sample(logits, temperature=T, top_k=1, top_p=0.3, min_p=0.9, seed=seed)
            assert torch.equal(tok2, tok)
    mask = torch.tensor([[True, False], [False, True], [True, True]])
    assert ops.sample(logits, top_k=1, mask=mask)[0].tolist() == [0, 1, 0]


def test_adamw_step_buffers_that_share_memory(rng):
    """ms[i] = vs[i] (or a parameter listed twice) gave wrong updates without an error: only params against their
    own grads, ms, vs were checked."""
    p = [torch.randn(4, generator=rng), torch.randn(3, generator=rng)]
    g = [torch.randn(4, generator=rng), torch.randn(3, generator=rng)]
    m, v = [torch.zeros(4), torch.zeros(3)], [torch.zeros(4), torch.zeros(3)]
    hp = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0, step=1)
    with pytest.raises(ValueError, match=r"adamw_step (ms|vs)\[0\]: shares memory with (ms|vs)\[0\]"):
        ops.adamw_step(p, g, [m[0], m[1]], [m[0], v[1]], **hp)
    with pytest.raises(ValueError, match=r"adamw_step params\[[01]\]: shares memory with params\[[01]\]"):
        ops.adamw_step([p[0], p[0]], [g[0], torch.randn(4, generator=rng)], [m[0], torch.zeros(4)],
                       [v[0], torch.zeros(4)], **hp)
    buf = torch.zeros(8)
    with pytest.raises(ValueError, match=r"adamw_step ms\[1\]: shares memory with ms\[0\]"):  # one element shared
        ops.adamw_step(p, g, [buf[:4], buf[3:6]], v, **hp)
    p0 = [t.clone() for t in p]
    ops.adamw_step(p, g, m, v, **hp)  # separate buffers: the step runs
    assert not torch.equal(p[0], p0[0])


def test_dispatched_ops_keep_their_signatures():
    """Session 31: the CUDA-dispatch wrappers showed help() and inspect (*args, **kwargs); a call with no arguments
    raised StopIteration from inside the wrapper rather than the op's own TypeError."""
    import inspect
    from pyllm import ops
    for name in ("rmsnorm", "linear", "attention", "attention_with_lse", "rope", "swiglu", "cross_entropy", "sample",
                 "decode_attention"):
        fn = getattr(ops, name)
        assert getattr(fn, "_pyllm_cuda_dispatch", False), name
        assert "*args" not in str(inspect.signature(fn)), (name, inspect.signature(fn))
        with pytest.raises(TypeError, match="missing"):
            fn()


# --- session 32's fuzz of the public API -----------------------------------------------------------------------------
def test_linear_backward_with_no_output_features(rng):
    """weight (0, K): the forward gave (M, 0), the backward torch's "cannot reshape tensor of 0 elements into shape
    [-1, 0]" (dy.reshape(-1, N) with N = 0)."""
    x = torch.randn(3, 4, generator=rng, requires_grad=True)
    w = torch.randn(0, 4, requires_grad=True)
    b = torch.randn(0, requires_grad=True)
    ops.linear(x, w, b).sum().backward()
    assert torch.equal(x.grad, torch.zeros(3, 4)) and w.grad.shape == (0, 4) and b.grad.shape == (0,)


def test_cross_entropy_gradient_changed_in_place_before_a_second_backward(rng):
    """The backward returns the forward's gradient buffer itself (no copy): a caller that changed the gradient it got
    in place (g.zero_(), an in-place hook or clipping) changed what a retained graph's next backward returned, with
    no error (all zeros here, where torch gives the gradient again)."""
    logits = torch.randn(4, 7, generator=rng, requires_grad=True)
    t = torch.tensor([0, 6, -1, 3])
    loss = ops.cross_entropy(logits, t)
    (g,) = torch.autograd.grad(loss, logits, retain_graph=True)
    expect = g.clone()
    (g2,) = torch.autograd.grad(loss, logits, retain_graph=True)  # untouched: the same gradient again
    assert torch.equal(g2, expect)
    g.zero_()
    with pytest.raises(RuntimeError, match="cross_entropy backward: the gradient an earlier backward"):
        torch.autograd.grad(loss, logits)
    loss = ops.cross_entropy(logits, t)  # three retained backwards into a leaf's .grad: still the sum
    for _ in range(3):
        loss.backward(retain_graph=True)
    torch.testing.assert_close(logits.grad, 3 * expect)


def test_in_place_kernel_writes_bump_the_version_counter(rng):
    """adamw_step / AdamW.step and matmul(out=) wrote through raw pointers: autograd did not see the change, so a
    graph that had saved the tensor backpropagated through the new values without a word (torch.optim.AdamW and
    torch's out= ops make that backward an error)."""
    w = torch.nn.Parameter(torch.randn(3, generator=rng))
    opt = ops.AdamW([w], lr=0.5)
    loss = (w * w).sum()
    w.grad = torch.ones(3)
    opt.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    a, b, out = torch.randn(2, 3, generator=rng), torch.randn(4, 3, generator=rng), torch.zeros(2, 4)
    x = torch.randn(4, generator=rng, requires_grad=True)
    y = (out * x).sum()
    with torch.no_grad():
        ops.matmul(a, b, out=out)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()
    with torch.inference_mode():  # inference tensors have no version counter: still fine
        out_inf = torch.zeros(2, 4)
        ops.matmul(a, b, out=out_inf)
        p, g, m, v = torch.randn(3), torch.randn(3), torch.zeros(3), torch.zeros(3)
        ops.adamw_step([p], [g], [m], [v], 1e-3, 0.9, 0.99, 1e-8, 0.0, 1)
    torch.testing.assert_close(out_inf, a @ b.T, rtol=1e-5, atol=1e-5)


def test_adamw_sparse_gradient():
    """A sparse .grad was torch's "unsupported memory format option Contiguous" from inside AdamW.step."""
    w = torch.nn.Parameter(torch.randn(4, 3))
    opt = ops.AdamW([w])
    w.grad = torch.randn(4, 3).to_sparse()
    with pytest.raises(ValueError, match="AdamW: parameter 0 of group 0 has a sparse gradient"):
        opt.step()
