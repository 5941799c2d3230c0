"""ops.block (a whole decoder layer as one autograd Function) vs the per-op torch composition (model.Block on the
"torch" backend = pyllm.ref ops): output and every gradient, GQA, document masks, odd sizes, every ISA path, every
buffer the op allocates poisoned; plus the strided kernel forms it relies on (RoPE row strides, SwiGLU rows of a fused
gate|up buffer, RMSNorm backward's residual). Run: pytest tests/test_ops_block.py"""
import sys

import pytest
import torch

from pyllm import ops, ref
from pyllm._ext import C
from pyllm.config import ModelConfig
from pyllm.model import GPT, Block, KVCache, backend_table
from conftest import poison


@pytest.fixture
def poisoned_alloc(monkeypatch):
    """Every torch.empty / empty_like / ops.empty in the op returns NaNs: an element a kernel never writes shows up.
    Every ops.empty goes through the buffer pool (no size threshold), so reused buffers are poisoned too."""
    empty, empty_like, ops_empty = torch.empty, torch.empty_like, ops.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: empty(*a, **k).fill_(float("nan")))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: empty_like(*a, **k).fill_(float("nan")))
    monkeypatch.setattr(ops, "POOL_MIN_BYTES", 0)
    monkeypatch.setattr(ops, "empty", lambda *s: ops_empty(*s).fill_(float("nan")))


def _docs(B, T, rng):
    """(B, T) int32 document ids with 1-3 documents per row (row 0 always has a boundary when T > 2)."""
    d = torch.zeros(B, T, dtype=torch.int32)
    for b in range(B):
        cuts = sorted(torch.randint(1, max(T, 2), (int(torch.randint(0, 3, (1,), generator=rng)) + (b == 0),),
                                    generator=rng).tolist())
        for c in cuts:
            d[b, c:] += 1
    return d


@pytest.mark.parametrize("B,T,dim,H,Hkv,F,docs", [
    (1, 1, 8, 1, 1, 3, False),          # one token
    (3, 17, 48, 4, 4, 37, False),       # odd T and hidden
    (2, 33, 48, 4, 2, 40, True),        # GQA 2:1, document mask
    (2, 64, 128, 4, 1, 352, True),      # MQA, the Tiny Shakespeare layer
    (1, 9, 96, 6, 3, 127, False),       # head dim 16, GQA
    (2, 7, 32, 2, 1, 512, True),        # 2F = 1024: gate|up and its gradient in padded rows (ops.padded_rows)
])
def test_block_matches_per_op_path(isa, rng, poisoned_alloc, B, T, dim, H, Hkv, F, docs):
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=rng)))
    c = ModelConfig(vocab_size=32, dim=dim, n_layers=2, n_heads=H, n_kv_heads=Hkv, hidden_dim=F, max_seq_len=T)
    blk = Block(c)
    for p in blk.parameters():  # non-trivial norm weights too; matrices ~ 1/sqrt(fan-in) so activations stay O(1)
        p.data.normal_(1.0 if p.dim() == 1 else 0.0, 0.3 if p.dim() == 1 else p.shape[-1] ** -0.5, generator=rng)
    x = torch.randn(B, T, dim, generator=rng, requires_grad=True)
    model = GPT(c)
    cos, sin = model.rope_cos[:T].contiguous(), model.rope_sin[:T].contiguous()
    d = _docs(B, T, rng) if docs else None
    o_torch, o_pyllm = backend_table("torch"), backend_table("pyllm")
    assert "block" in o_pyllm and "block" not in o_torch
    y_ref = blk(o_torch, x, cos, sin, d)
    dy = torch.randn(B, T, dim, generator=rng)
    g_ref = torch.autograd.grad(y_ref, [x, *blk.parameters()], dy)
    y = blk(o_pyllm, x, cos, sin, d)                 # Block.forward takes the block op here
    assert y.grad_fn is not None and type(y.grad_fn).__name__ == "_BlockBackward"
    g = torch.autograd.grad(y, [x, *blk.parameters()], dy)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5 * float(y_ref.detach().abs().max()))
    names = ["x"] + [n for n, _ in blk.named_parameters()]
    for n, a, b in zip(names, g, g_ref):   # fp32 sums in another order: tolerance relative to the gradient's scale
        torch.testing.assert_close(a, b, rtol=1e-4, atol=max(1e-5, 2e-5 * float(b.abs().max())),
                                   msg=lambda m: f"grad {n}: {m}")


def test_pool_hands_out_only_unreferenced_buffers(monkeypatch):
    monkeypatch.setattr(ops, "POOL_MIN_BYTES", 0)
    ops.empty_pool_release()                      # what earlier tests left free
    a, b = ops.empty(301, 7), ops.empty(301, 7)
    assert a.shape == (301, 7) and a.dtype == torch.float32 and a.data_ptr() != b.data_ptr()
    pa = a.data_ptr()
    del a
    c = ops.empty(7, 301)                         # same element count: the freed buffer, in the new shape
    assert c.data_ptr() == pa and c.shape == (7, 301)
    view = c[1:]                                  # a view keeps the storage (and the buffer) in use
    del c
    d = ops.empty(301, 7)
    assert d.data_ptr() not in (pa, b.data_ptr())
    del view
    e = ops.empty(2107)
    assert e.data_ptr() == pa
    monkeypatch.setattr(ops, "POOL_MAX_BYTES", 0)  # past the bound (and none free): plain torch.empty, not pooled
    size = ops._pool_bytes
    held = [ops.empty(301, 7) for _ in range(3)]
    assert len({t.data_ptr() for t in held} | {pa, b.data_ptr(), d.data_ptr()}) == 6 and ops._pool_bytes == size
    del e
    assert ops.empty_pool_release() >= 2107 * 4
    assert sorted(a.ctypes.data for a in ops._pool[2107]) == sorted([b.data_ptr(), d.data_ptr()])  # still held


def test_pool_full_drops_free_buffers_of_other_sizes(monkeypatch):
    monkeypatch.setattr(ops, "POOL_MIN_BYTES", 0)
    ops.empty_pool_release()
    monkeypatch.setattr(ops, "POOL_MAX_BYTES", ops._pool_bytes + 3 * 4000 * 4)   # room for three 4000-float buffers
    held, old = ops.empty(4000), [ops.empty(4000) for _ in range(2)]
    del old                                       # two free 4000s; the pool is full
    new = ops.empty(3000)                         # another size: the free 4000s are dropped to make room
    # (the allocator may give the new buffer a dropped one's address: comparing addresses with theirs failed in CI)
    assert new.data_ptr() in [a.ctypes.data for a in ops._pool[3000]] and new.numel() == 3000
    assert [a.ctypes.data for a in ops._pool[4000]] == [held.data_ptr()]
    assert ops._pool_bytes <= ops.POOL_MAX_BYTES


def test_pool_never_reuses_what_autograd_saved(rng, monkeypatch):
    """Between forward and backward, take every free pooled buffer and fill it with NaN: a buffer the block saved
    for backward (or returned) handed out again would corrupt the gradients."""
    monkeypatch.setattr(ops, "POOL_MIN_BYTES", 0)
    torch.manual_seed(3)
    c = ModelConfig(vocab_size=32, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96, max_seq_len=24)
    blk = Block(c)
    for p in blk.parameters():
        p.data.normal_(1.0 if p.dim() == 1 else 0.0, 0.3 if p.dim() == 1 else p.shape[-1] ** -0.5, generator=rng)
    x = torch.randn(2, 24, 64, generator=rng, requires_grad=True)
    model = GPT(c)
    cos, sin = model.rope_cos[:24].contiguous(), model.rope_sin[:24].contiguous()
    dy = torch.randn(2, 24, 64, generator=rng)
    o_torch, o_pyllm = backend_table("torch"), backend_table("pyllm")
    g_ref = torch.autograd.grad(blk(o_torch, x, cos, sin), [x, *blk.parameters()], dy)
    y = blk(o_pyllm, x, cos, sin)
    y_before = y.detach().clone()
    free = {n: sum(sys.getrefcount(a) == 3 for a in arrays) for n, arrays in ops._pool.items()}  # as ops.empty counts
    grabbed = [ops.empty(n).fill_(float("nan")) for n, k in free.items() for _ in range(k)]
    assert grabbed and sum(free.values()) < sum(map(len, ops._pool.values()))  # some free, some held for backward
    g = torch.autograd.grad(y, [x, *blk.parameters()], dy)
    torch.testing.assert_close(y, y_before, rtol=0, atol=0)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=max(1e-5, 2e-5 * float(b.abs().max())))


def _model_pair(rng):
    """The same small GQA model on the pyllm and torch backends, and a batch (x, y, doc_ids) with ignored targets."""
    c = ModelConfig(vocab_size=61, dim=48, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=37, max_seq_len=32)
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=rng)))
    a = GPT(c, backend="pyllm")
    b = GPT(c, backend="torch")
    b.load_state_dict(a.state_dict())
    x = torch.randint(0, 61, (3, 19), generator=rng)
    y = torch.randint(0, 61, (3, 19), generator=rng)
    y[0, :4] = -1
    return a, b, x, y, _docs(3, 19, rng)


def test_model_pyllm_and_torch_agree_with_docs_and_gqa(rng):
    a, b, x, y, d = _model_pair(rng)
    la, lb = a(x, y, d)[1], b(x, y, d)[1]
    la.backward()
    lb.backward()
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-6)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=2e-5 * float(q.grad.abs().max()),
                                   msg=lambda m: f"grad {n}: {m}")


class _CountCalls:
    """Stands in for pyllm._C and counts the calls of each kernel."""
    def __init__(self, real):
        self.real, self.n = real, {}

    def __getattr__(self, name):
        f = getattr(self.real, name)
        if not callable(f):
            return f

        def counted(*a):
            self.n[name] = self.n.get(name, 0) + 1
            return f(*a)
        return counted


def test_model_bf16_autocast_runs_bf16_gemms(rng, monkeypatch):
    """Under torch.autocast("cpu", bfloat16) the pyllm model's GEMMs (block and lm head, forward and backward) take
    bf16 operands: loss and gradients match the torch backend under the same autocast at bf16 tolerance, and every
    GEMM call goes to matmul_bf16_forward (none without autocast)."""
    import pyllm._ext as ext
    a, b, x, y, d = _model_pair(rng)
    counter = _CountCalls(ext._C if ext._C is not None else C())
    monkeypatch.setattr(ext, "_C", counter)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        la, lb = a(x, y, d)[1], b(x, y, d)[1]
    la.backward()
    lb.backward()
    # 2 layers x (4 forward + 8 backward) + lm head (1 + 2)
    assert counter.n.get("matmul_bf16_forward") == 27 and "matmul_forward" not in counter.n, counter.n
    torch.testing.assert_close(la, lb.float(), rtol=2e-2, atol=2e-2)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert p.grad.dtype == torch.float32
        torch.testing.assert_close(p.grad, q.grad.float(), rtol=5e-2, atol=2e-2 * float(q.grad.abs().max()),
                                   msg=lambda m: f"grad {n}: {m}")
    counter.n.clear()
    a(x, y, d)[1].backward()
    assert "matmul_bf16_forward" not in counter.n and counter.n.get("matmul_forward") == 27, counter.n


def test_block_frozen_weights_and_no_grad(rng):
    """needs_input_grad: frozen weights get no gradient, x's gradient is unchanged; no_grad gives the same values."""
    c = ModelConfig(vocab_size=32, dim=32, n_layers=1, n_heads=2, hidden_dim=24, max_seq_len=8)
    blk = Block(c)
    for p in blk.parameters():
        p.data.normal_(0.0, 0.2, generator=rng)
    cos, sin = GPT(c).rope_cos[:8].contiguous(), GPT(c).rope_sin[:8].contiguous()
    x = torch.randn(2, 8, 32, generator=rng, requires_grad=True)
    o = backend_table("pyllm")
    gx_all = torch.autograd.grad(blk(o, x, cos, sin).sum(), x)[0]
    for n, p in blk.named_parameters():
        if "q_proj" in n or "gate_proj" in n:
            p.requires_grad_(False)
    y = blk(o, x, cos, sin)
    y.sum().backward()
    assert blk.self_attn.q_proj.weight.grad is None and blk.mlp.gate_proj.weight.grad is None
    assert blk.self_attn.k_proj.weight.grad is not None and blk.mlp.up_proj.weight.grad is not None
    torch.testing.assert_close(x.grad, gx_all)
    with torch.no_grad():
        torch.testing.assert_close(blk(o, x, cos, sin), y)


def test_block_bad_input():
    c = ModelConfig(vocab_size=32, dim=32, n_layers=1, n_heads=2, hidden_dim=24, max_seq_len=8)
    blk = Block(c)
    a, m = blk.self_attn, blk.mlp
    w = (blk.input_layernorm.weight, a.q_proj.weight, a.k_proj.weight, a.v_proj.weight, a.o_proj.weight,
         blk.post_attention_layernorm.weight, m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight)
    cos = sin = torch.zeros(8, 8)
    with pytest.raises(ValueError, match="block x"):
        ops.block(torch.zeros(2, 8, 32).transpose(0, 1), *w, cos, sin, None, 2, 2)
    with pytest.raises(ValueError, match="block wo"):
        ops.block(torch.zeros(2, 8, 32), *w[:4], w[4].t().contiguous()[:, :16], *w[5:], cos, sin, None, 2, 2)
    with pytest.raises(ValueError, match="bad heads"):
        ops.block(torch.zeros(2, 8, 32), *w, cos, sin, None, 2, 3)
    with pytest.raises(TypeError, match="block doc_ids"):
        ops.block(torch.zeros(2, 8, 32), *w, cos, sin, torch.zeros(2, 8, dtype=torch.int64), 2, 2)



# --- decode_block: one layer of a decode step -------------------------------------------------------------
def _decode_setup(rng, B, dim, H, Hkv, F, T_max, pos):
    c = ModelConfig(vocab_size=32, dim=dim, n_layers=1, n_heads=H, n_kv_heads=Hkv, hidden_dim=F, max_seq_len=T_max)
    blk = Block(c)
    for p in blk.parameters():
        p.data.normal_(1.0 if p.dim() == 1 else 0.0, 0.3 if p.dim() == 1 else p.shape[-1] ** -0.5, generator=rng)
    model = GPT(c)
    cos, sin = model.rope_cos[pos:pos + 1].contiguous(), model.rope_sin[pos:pos + 1].contiguous()
    cache = KVCache(c, B, T_max, "cpu", torch.float32)
    cache.k[0].normal_(generator=rng)      # an earlier prompt's keys and values, and junk past pos: neither may
    cache.v[0].normal_(generator=rng)      # change, and nothing past pos may be read
    cache.seek(pos)
    x = torch.randn(B, 1, dim, generator=rng)
    a, m = blk.self_attn, blk.mlp
    w = (blk.input_layernorm.weight, a.q_proj.weight, a.k_proj.weight, a.v_proj.weight, a.o_proj.weight,
         blk.post_attention_layernorm.weight, m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight)
    return blk, cache, x, cos, sin, w, c


@pytest.mark.parametrize("B,dim,H,Hkv,F,T_max,pos", [
    (1, 8, 1, 1, 3, 1, 0),            # one position, the first
    (3, 48, 4, 4, 37, 20, 11),        # odd hidden, batch
    (2, 48, 4, 2, 40, 33, 32),        # GQA 2:1, the last position
    (5, 96, 6, 3, 127, 9, 4),         # head dim 16, GQA, M = 5 (past the small-M GEMM)
    (2, 128, 4, 1, 352, 64, 17),      # MQA, head dim 32
])
def test_decode_block_matches_per_op_path(isa, rng, poisoned_alloc, B, dim, H, Hkv, F, T_max, pos):
    """The fused layer against model.Block's per-op decode step on the torch backend: output, the k/v written at
    pos, and every other cache row untouched; every buffer the op allocates is poisoned."""
    blk, cache, x, cos, sin, w, c = _decode_setup(rng, B, dim, H, Hkv, F, T_max, pos)
    ref_cache = KVCache(c, B, T_max, "cpu", torch.float32)
    ref_cache.k[0].copy_(cache.k[0]); ref_cache.v[0].copy_(cache.v[0]); ref_cache.seek(pos)
    k0, v0 = cache.k[0].clone(), cache.v[0].clone()
    o_torch, o_pyllm = backend_table("torch"), backend_table("pyllm")
    assert "decode_block" in o_pyllm and "decode_block" not in o_torch
    with torch.no_grad():
        want = blk(o_torch, x, cos, sin, None, ref_cache, 0, ref_cache.pos)
        got = ops.decode_block(x, *w, cos, sin, cache.k[0], cache.v[0], cache.pos, H, Hkv, 1e-5)
        via_block = blk(o_pyllm, x, cos, sin, None, cache, 0, cache.pos)   # Block.forward takes the fused path
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(via_block, got, rtol=0, atol=0)
    torch.testing.assert_close(cache.k[0][:, pos], ref_cache.k[0][:, pos], **tol)
    torch.testing.assert_close(cache.v[0][:, pos], ref_cache.v[0][:, pos], **tol)
    others = torch.arange(T_max) != pos
    assert torch.equal(cache.k[0][:, others], k0[:, others]) and torch.equal(cache.v[0][:, others], v0[:, others])


def test_decode_block_time_major_cache(rng):
    """A cache laid out (T_max, B, Hkv, D) and permuted to (B, T_max, ...): batch rows closer than positions."""
    B, dim, H, Hkv, F, T_max, pos = 3, 32, 2, 1, 24, 10, 6
    blk, cache, x, cos, sin, w, _ = _decode_setup(rng, B, dim, H, Hkv, F, T_max, pos)
    tk = cache.k[0].transpose(0, 1).contiguous().transpose(0, 1)   # same values, strides (Hkv D, B Hkv D, D, 1)
    tv = cache.v[0].transpose(0, 1).contiguous().transpose(0, 1)
    with torch.no_grad():
        want = ops.decode_block(x, *w, cos, sin, cache.k[0], cache.v[0], pos, H, Hkv)
        got = ops.decode_block(x, *w, cos, sin, tk, tv, pos, H, Hkv)
        one_k, one_v = (t[:1].as_strided(t[:1].shape, (0, *t.stride()[1:])) for t in (tk, tv))  # B 1, stride 0
        got1 = ops.decode_block(x[:1], *w, cos, sin, one_k, one_v, pos, H, Hkv)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(got1, want[:1], rtol=0, atol=0)
    assert torch.equal(tk, cache.k[0]) and torch.equal(tv, cache.v[0])


def test_generate_decode_paths_agree(rng):
    """GPT.generate on CPU runs each decode step's layers as one ops.DecodeStack call; without it decode_block per
    layer, without either the per-op step: the same tokens and log-probs (the stack bit for bit: the same kernels)."""
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=rng)))
    c = ModelConfig(vocab_size=97, dim=48, n_layers=3, n_heads=4, n_kv_heads=2, hidden_dim=72, max_seq_len=40)
    m = GPT(c).eval()
    idx = torch.randint(0, 97, (3, 5), generator=rng)
    table = m._ops(idx.device)
    steps, calls = [], []

    class Counting(table["decode_stack"]):
        def __call__(self, x, pos):
            steps.append(1)
            return super().__call__(x, pos)
    table["decode_stack"] = Counting
    fused = table["decode_block"]
    table["decode_block"] = lambda *a: calls.append(1) or fused(*a)
    kw = [dict(temperature=0), dict(temperature=1.0, top_p=0.9, seed=5)]
    got = [m.generate(idx, 20, return_logprobs=True, **k) for k in kw]
    assert len(steps) == 2 * 19 and not calls                   # every decode step after the prompt, one call each
    del table["decode_stack"]
    per_layer = [m.generate(idx, 20, return_logprobs=True, **k) for k in kw]
    assert len(calls) == 2 * 19 * 3                             # every decode step, every layer
    del table["decode_block"]
    per_op = [m.generate(idx, 20, return_logprobs=True, **k) for k in kw]
    for (seq, lp), (seq1, lp1), (seq2, lp2) in zip(got, per_layer, per_op):
        assert torch.equal(seq, seq1) and torch.equal(lp, lp1)
        assert torch.equal(seq, seq2)
        torch.testing.assert_close(lp, lp2, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("B,H,Hkv,pos", [(1, 2, 1, 0), (3, 4, 2, 7), (2, 2, 2, 9)])
def test_decode_stack_matches_decode_block(isa, rng, poisoned_alloc, B, H, Hkv, pos):
    """DecodeStack over 3 layers = decode_block layer after layer, bit for bit: the output (x updated in place), every
    layer's k/v at pos, nothing else of the caches; its scratch is poisoned."""
    dim, F, T_max = 32, 40, 10
    layers, caches = [], []
    for _ in range(3):
        _, cache, x, _, _, w, c = _decode_setup(rng, B, dim, H, Hkv, F, T_max, pos)
        layers.append(w)
        caches.append(cache)
    model = GPT(c)
    ks, vs = [cc.k[0] for cc in caches], [cc.v[0] for cc in caches]
    k0, v0 = [t.clone() for t in ks], [t.clone() for t in vs]
    cos, sin = model.rope_cos[pos:pos + 1].contiguous(), model.rope_sin[pos:pos + 1].contiguous()
    with torch.no_grad():
        want = x
        for w, k, v in zip(layers, k0, v0):
            want = ops.decode_block(want, *w, cos, sin, k, v, pos, H, Hkv, 1e-5)
        stack = ops.DecodeStack(layers, ks, vs, model.rope_cos, model.rope_sin, B, H, Hkv, 1e-5)
        xin = x.clone()
        got = stack(xin, torch.tensor([pos]))
    assert got is xin
    assert torch.equal(got, want)
    for k, v, kr, vr in zip(ks, vs, k0, v0):
        assert torch.equal(k, kr) and torch.equal(v, vr)        # k0/v0 took decode_block's writes at pos


def test_decode_stack_bad_input(rng):
    B, dim, H, Hkv, F, T_max = 2, 32, 2, 2, 24, 8
    _, cache, x, _, _, w, c = _decode_setup(rng, B, dim, H, Hkv, F, T_max, 3)
    _, cache2, _, _, _, w2, _ = _decode_setup(rng, B, dim, H, Hkv, F + 8, T_max, 3)
    model = GPT(c)
    cs = (model.rope_cos, model.rope_sin)
    k, v = cache.k[0], cache.v[0]
    with torch.no_grad():
        with pytest.raises(ValueError, match="DecodeStack layer 1 k_cache: expected shape"):
            ops.DecodeStack([w, w], [k, k[:, :, :1]], [v, v], *cs, B, H, Hkv)
        with pytest.raises(ValueError, match="DecodeStack layer 1: shapes"):
            ops.DecodeStack([w, w2], [k, cache2.k[0]], [v, cache2.v[0]], *cs, B, H, Hkv)
        with pytest.raises(ValueError, match="DecodeStack layer 0: expected 9 weights"):
            ops.DecodeStack([w[:8]], [k], [v], *cs, B, H, Hkv)
        with pytest.raises(ValueError, match="DecodeStack layer 0: expected 9 weights, got 0"):
            ops.DecodeStack([()], [k], [v], *cs, B, H, Hkv)
        with pytest.raises(ValueError, match="non-empty lists of one length"):
            ops.DecodeStack([w], [k, k], [v], *cs, B, H, Hkv)
        with pytest.raises(ValueError, match="DecodeStack layer 0 wo"):
            ops.DecodeStack([(*w[:4], w[4][:, :16].contiguous(), *w[5:])], [k], [v], *cs, B, H, Hkv)
        with pytest.raises(ValueError, match="DecodeStack layer 0 k_cache"):
            ops.DecodeStack([w], [k], [v], *cs, 3, H, Hkv)          # the batch is not the cache's
        stack = ops.DecodeStack([w], [k], [v], *cs, B, H, Hkv)
        with pytest.raises(ValueError, match="DecodeStack pos"):
            stack(x.clone(), T_max)
        with pytest.raises(ValueError, match="DecodeStack x: expected shape"):
            stack(x[:1].clone(), 3)
        kb, vb = k.clone(), v.clone()
        stack(x.clone(), 3)                                         # a good call still works after the refusals
        assert not torch.equal(k, kb) or not torch.equal(v, vb)
    with pytest.raises(ValueError, match="DecodeStack x: it records no gradient"):
        stack(x.clone().requires_grad_(), 3)


def test_decode_block_bad_input(rng):
    blk, cache, x, cos, sin, w, _ = _decode_setup(rng, 2, 32, 2, 2, 24, 8, 3)
    k, v = cache.k[0], cache.v[0]
    with torch.no_grad():
        with pytest.raises(ValueError, match="decode_block x: expected a non-empty \\(B, 1, C\\)"):
            ops.decode_block(torch.zeros(2, 2, 32), *w, cos, sin, k, v, 3, 2, 2)
        with pytest.raises(ValueError, match="decode_block pos"):
            ops.decode_block(x, *w, cos, sin, k, v, 8, 2, 2)
        with pytest.raises(TypeError, match="decode_block pos"):
            ops.decode_block(x, *w, cos, sin, k, v, torch.tensor([3], dtype=torch.int32), 2, 2)
        with pytest.raises(ValueError, match="rows overlap"):
            ops.decode_block(x, *w, cos, sin, k[:1].expand(2, -1, -1, -1), v[:1].expand(2, -1, -1, -1), 3, 2, 2)
        with pytest.raises(ValueError, match="decode_block k_cache: expected shape"):
            ops.decode_block(x, *w, cos, sin, k[:, :, :1], v[:, :, :1], 3, 2, 2)
        with pytest.raises(ValueError, match="same shape and strides"):
            ops.decode_block(x, *w, cos, sin, k, v[:, :7], 3, 2, 2)
        with pytest.raises(ValueError, match="decode_block wo"):
            ops.decode_block(x, *w[:4], w[4].t().contiguous()[:, :16], *w[5:], cos, sin, k, v, 3, 2, 2)
    with pytest.raises(ValueError, match="no gradient"):   # grad mode with parameters that require grad
        ops.decode_block(x, *w, cos, sin, k, v, 3, 2, 2)
    assert torch.equal(k, cache.k[0])

# --- the strided kernel forms -----------------------------------------------------------------------------
@pytest.mark.parametrize("B,T,H,D,pad", [(1, 1, 1, 2, 0), (2, 5, 3, 6, 7), (1, 17, 2, 34, 34), (3, 4, 4, 64, 1)])
def test_rope_row_strides(isa, rng, B, T, H, D, pad):
    """x read from, or out written into, rows of stride H*D + pad: same values; the gaps are never written."""
    ld = H * D + pad
    buf = torch.randn(B * T, ld, generator=rng)
    x = buf[:, :H * D].contiguous().view(B, T, H, D)
    ang = torch.rand(T, D // 2, generator=rng) * 6.3
    cos, sin = ang.cos().contiguous(), ang.sin().contiguous()
    for bwd in (0, 1):
        want = ref.rope(x, cos, -sin if bwd else sin)
        out = poison(torch.empty(B, T, H, D))
        C().rope_forward(out.data_ptr(), buf.data_ptr(), cos.data_ptr(), sin.data_ptr(), B, T, H, D, bwd, ld, 0)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
        wide = torch.full((B * T, ld), 7.0)
        C().rope_forward(wide.data_ptr(), x.data_ptr(), cos.data_ptr(), sin.data_ptr(), B, T, H, D, bwd, 0, ld)
        torch.testing.assert_close(wide[:, :H * D].reshape(B, T, H, D), want, rtol=1e-5, atol=1e-6)
        assert bool((wide[:, H * D:] == 7.0).all())
    with pytest.raises(ValueError, match="ldx/ldo"):
        C().rope_forward(out.data_ptr(), buf.data_ptr(), cos.data_ptr(), sin.data_ptr(), B, T, H, D, 0, H * D - 1, 0)


@pytest.mark.parametrize("rows,cols", [(1, 1), (3, 17), (5, 127), (7, 352), (2, 1000)])
def test_swiglu_rows_of_fused_buffer(isa, rng, rows, cols):
    gu = torch.randn(rows, 2 * cols, generator=rng) * 4                 # [gate | up] per row
    g, u = gu[:, :cols], gu[:, cols:]
    out = poison(torch.empty(rows, cols))
    C().swiglu_forward(out.data_ptr(), gu.data_ptr(), gu.data_ptr() + 4 * cols, rows * cols, cols, 2 * cols)
    torch.testing.assert_close(out, ref.swiglu(g, u), rtol=1e-5, atol=1e-6)
    dy = torch.randn(rows, cols, generator=rng)
    gr, ur = g.clone().requires_grad_(), u.clone().requires_grad_()
    ref.swiglu(gr, ur).backward(dy)
    dgu = poison(torch.empty(rows, 2 * cols))
    C().swiglu_backward(dgu.data_ptr(), dgu.data_ptr() + 4 * cols, dy.data_ptr(), gu.data_ptr(),
                        gu.data_ptr() + 4 * cols, rows * cols, cols, 2 * cols)
    torch.testing.assert_close(dgu[:, :cols], gr.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dgu[:, cols:], ur.grad, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="cols"):
        C().swiglu_forward(out.data_ptr(), gu.data_ptr(), gu.data_ptr(), rows * cols, cols, cols - 1)


@pytest.mark.parametrize("N,C_", [(1, 1), (3, 17), (64, 128), (5, 1000)])
def test_rmsnorm_backward_residual(isa, rng, N, C_):
    x = torch.randn(N, C_, generator=rng)
    w = torch.randn(C_, generator=rng)
    dy = torch.randn(N, C_, generator=rng)
    res = torch.randn(N, C_, generator=rng)
    xr = x.clone().requires_grad_()
    wr = w.clone().requires_grad_()
    ref.rmsnorm(xr, wr, 1e-5).backward(dy)
    rstd = torch.rsqrt(x.pow(2).mean(-1) + 1e-5).contiguous()
    dx, dw = poison(torch.empty(N, C_)), torch.zeros(C_)
    C().rmsnorm_backward(dx.data_ptr(), dw.data_ptr(), dy.data_ptr(), x.data_ptr(), w.data_ptr(), rstd.data_ptr(),
                         N, C_, res.data_ptr())
    torch.testing.assert_close(dx, xr.grad + res, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dw, wr.grad, rtol=1e-4, atol=1e-5)


def test_decode_caches_that_share_memory(rng):
    """Session 30 audit: k_cache = v_cache (or two layers of a DecodeStack on one cache) was accepted and gave wrong
    attention (v written, then the rotated k over it) with no error. Interleaved caches, buf[:, :, 0] and
    buf[:, :, 1] of one (B, T, 2, Hkv, D) buffer, share a byte range but no element: still accepted, same values."""
    B, dim, H, Hkv, F, T_max, pos = 2, 32, 2, 1, 24, 8, 3
    _, cache, x, cos, sin, w, c = _decode_setup(rng, B, dim, H, Hkv, F, T_max, pos)
    k, v = cache.k[0], cache.v[0]
    model = GPT(c)
    cs = (model.rope_cos, model.rope_sin)
    with torch.no_grad():
        with pytest.raises(ValueError, match="decode_block v_cache: shares memory with k_cache"):
            ops.decode_block(x, *w, cos, sin, k, k, pos, H, Hkv)
        shifted = torch.empty(B * T_max * Hkv * 16 + 8)  # v half a row after k: the same strides, meeting rows
        kk = shifted[:-8].view(B, T_max, Hkv, 16)
        vv = shifted[8:].view(B, T_max, Hkv, 16)
        with pytest.raises(ValueError, match="decode_block v_cache: shares memory with k_cache"):
            ops.decode_block(x, *w, cos, sin, kk, vv, pos, H, Hkv)
        with pytest.raises(ValueError, match="DecodeStack layer 0 v_cache: shares memory with k_cache"):
            ops.DecodeStack([w], [k], [k], *cs, B, H, Hkv)
        with pytest.raises(ValueError, match="DecodeStack layer 1 v_cache: shares memory with layer 0's k_cache"):
            ops.DecodeStack([w, w], [k, v.clone()], [v, k], *cs, B, H, Hkv)
        buf = torch.empty(B, T_max, 2, Hkv, 16)
        buf[:, :, 0], buf[:, :, 1] = k, v
        ki, vi = buf[:, :, 0], buf[:, :, 1]
        want = ops.decode_block(x, *w, cos, sin, k.clone(), v.clone(), pos, H, Hkv)
        got = ops.decode_block(x, *w, cos, sin, ki, vi, pos, H, Hkv)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        ops.DecodeStack([w, w], [ki, k], [vi, v], *cs, B, H, Hkv)  # and in a stack, beside separate caches


def test_decode_zero_size_heads_or_hidden(rng):
    """A wq with no rows (head dim 0) or a wg with none (F = 0) reached the binding: "null pointer for out"."""
    _, cache, x, cos, sin, w, _ = _decode_setup(rng, 2, 32, 2, 1, 24, 8, 3)
    k, v = cache.k[0], cache.v[0]
    no_f = (*w[:6], w[6][:0], w[7][:0], w[8][:, :0].contiguous())
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"decode_block wg: expected \(F, C\) with F >= 1"):
            ops.decode_block(x, *no_f, cos, sin, k, v, 3, 2, 1)
    xb = torch.randn(2, 3, 32, generator=rng)
    cb, sb = torch.ones(3, 8), torch.zeros(3, 8)
    with pytest.raises(ValueError, match=r"block wg: expected \(F, C\) with F >= 1"):
        ops.block(xb, *no_f, cb, sb, None, 2, 1)
    no_d = (w[0], w[1][:0], w[2][:0], w[3][:0], w[4][:, :0].contiguous(), *w[5:])
    with pytest.raises(ValueError, match="block: head dim 0 must be even, > 0 and <= 256"):
        ops.block(xb, *no_d, torch.ones(3, 0), torch.ones(3, 0), None, 2, 1)
