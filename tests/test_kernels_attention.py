"""Attention kernels (csrc/cpu/impl_attention.h) vs pyllm.ref on fresh random inputs: causal flash attention
forward/backward with GQA and document masks, and decode attention over a strided KV cache; odd T and D, every
ISA path, outputs poisoned first. Run: OMP_NUM_THREADS=1 PYTHONPATH=$PWD python -m pytest -q tests/test_kernels_attention.py
"""
import pytest
import torch

from pyllm import ops, ref
from pyllm._ext import C
from conftest import poison

FWD_TOL = dict(rtol=1e-5, atol=2e-5)
GRAD_TOL = dict(rtol=1e-4, atol=5e-5)


def random_docs(B, T, rng, kind="segments"):
    """(B, T) int32 document ids. segments: contiguous documents of random length with several length-1
    documents forced in; permuted: the same segments with shuffled (non-increasing) ids; scattered: every token
    draws one of 3 ids (documents that interleave)."""
    if kind == "scattered":
        return torch.randint(0, 3, (B, T), generator=rng, dtype=torch.int32)
    starts = torch.rand(B, T, generator=rng) < 0.08
    if T >= 8:  # length-1 documents: two starts in a row, at random places
        for b in range(B):
            i = int(torch.randint(1, T - 2, (1,), generator=rng))
            starts[b, i] = starts[b, i + 1] = starts[b, i + 2] = True
    starts[:, 0] = True
    ids = starts.int().cumsum(1) - 1
    if kind == "permuted":
        ids = torch.randperm(T, generator=rng)[ids].contiguous()
    return ids.to(torch.int32)


def make_qkv(B, T, H, Hkv, D, rng, dtype=torch.float32):
    q = torch.randn(B, T, H, D, generator=rng, dtype=dtype)
    k = torch.randn(B, T, Hkv, D, generator=rng, dtype=dtype)
    v = torch.randn(B, T, Hkv, D, generator=rng, dtype=dtype)
    return q, k, v


def check_against_ref(q, k, v, doc, rng):
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    out, lse = ops.attention_with_lse(qs, ks, vs, doc)
    out_ref = ref.attention(qr, kr, vr, doc)
    torch.testing.assert_close(out, out_ref, **FWD_TOL)
    torch.testing.assert_close(lse, ref.attention_lse(q, k, doc), **FWD_TOL)
    dy = torch.randn(out.shape, generator=rng)
    out.backward(dy)
    out_ref.backward(dy)
    for name, a, b in (("dq", qs, qr), ("dk", ks, kr), ("dv", vs, vr)):
        torch.testing.assert_close(a.grad, b.grad, **GRAD_TOL, msg=lambda m: f"{name}: {m}")


# (B, T, H, Hkv, D): odd T (1, 3, 17, 127, 300) x D (3, 17, 64, 128) x GQA ratios (1, 2, 4, H = Hkv = 1)
SHAPES = [
    (1, 1, 1, 1, 3), (2, 3, 4, 2, 17), (1, 17, 4, 1, 64), (2, 17, 2, 2, 128), (1, 127, 4, 4, 17),
    (1, 127, 2, 1, 64), (1, 300, 1, 1, 64), (2, 300, 4, 1, 3), (1, 300, 2, 2, 128), (1, 65, 8, 2, 64),
]


@pytest.mark.parametrize("B,T,H,Hkv,D", SHAPES)
def test_attention_causal_matches_ref(isa, rng, B, T, H, Hkv, D):
    check_against_ref(*make_qkv(B, T, H, Hkv, D, rng), None, rng)


@pytest.mark.parametrize("kind", ["segments", "permuted", "scattered"])
@pytest.mark.parametrize("B,T,H,Hkv,D", [(2, 17, 2, 1, 17), (1, 127, 4, 2, 64), (2, 300, 2, 1, 64),
                                         (1, 300, 1, 1, 3)])
def test_attention_doc_mask_matches_ref(isa, rng, kind, B, T, H, Hkv, D):
    check_against_ref(*make_qkv(B, T, H, Hkv, D, rng), random_docs(B, T, rng, kind), rng)


def test_attention_one_document_equals_causal(rng):
    q, k, v = make_qkv(2, 130, 4, 2, 64, rng)
    doc = torch.full((2, 130), 7, dtype=torch.int32)
    torch.testing.assert_close(ops.attention(q, k, v, doc), ops.attention(q, k, v), rtol=0, atol=0)
    # ops drops a mask that masks nothing; the kernel's masked path itself must agree too (raw calls)
    outs = []
    for d in (doc, None):
        out, lse = poison(torch.empty_like(q)), poison(torch.empty(2, 4, 130))
        C().attention_forward(out.data_ptr(), lse.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(),
                              0 if d is None else d.data_ptr(), 2, 130, 4, 2, 64)
        outs.append(out)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


def test_attention_one_document_per_row_skip_matches_ref(rng):
    # Rows with different single documents (ops skips the mask), then one row split in two (the masked path).
    q, k, v = make_qkv(3, 37, 4, 2, 16, rng)
    doc = torch.tensor([5, 9, 2], dtype=torch.int32)[:, None].expand(3, 37).contiguous()
    check_against_ref(q, k, v, doc, rng)
    doc[1, 20:] = 10
    check_against_ref(q, k, v, doc, rng)


def test_attention_two_threads_no_races(rng):
    # Big enough for the kernels' OpenMP regions to engage; items must not collide on any output.
    before = C().get_threads()
    C().set_threads(2)
    try:
        q, k, v = make_qkv(2, 200, 4, 2, 64, rng)
        check_against_ref(q, k, v, random_docs(2, 200, rng), rng)
        check_against_ref(q, k, v, None, rng)
    finally:
        C().set_threads(before)


def test_attention_kernels_write_every_element(isa, rng):
    B, T, H, Hkv, D = 2, 75, 4, 2, 17
    q, k, v = make_qkv(B, T, H, Hkv, D, rng)
    doc = random_docs(B, T, rng)
    p = lambda t: t.data_ptr()  # noqa: E731
    out, lse = poison(torch.empty(B, T, H, D)), poison(torch.empty(B, H, T))
    C().attention_forward(p(out), p(lse), p(q), p(k), p(v), p(doc), B, T, H, Hkv, D)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    torch.testing.assert_close(out, ref.attention(q, k, v, doc), **FWD_TOL)
    dy = torch.randn(B, T, H, D, generator=rng)
    dq, dk, dv = poison(torch.empty_like(q)), poison(torch.empty_like(k)), poison(torch.empty_like(v))
    C().attention_backward(p(dq), p(dk), p(dv), p(dy), p(out), p(lse), p(q), p(k), p(v), p(doc), B, T, H, Hkv, D)
    assert torch.isfinite(dq).all() and torch.isfinite(dk).all() and torch.isfinite(dv).all()


# (B, T, H, Hkv, D, pad, docs): q, k, v read in place from one [q | k | v | pad] row per token, RoPE applied by the
# kernels as they read q and k; D with a vector half (64, 128), a scalar one (6, 34: D/2 not a multiple of 8 / 16)
@pytest.mark.parametrize("B,T,H,Hkv,D,pad,docs", [(1, 1, 1, 1, 2, 0, False), (2, 17, 4, 2, 6, 3, True),
                                                  (1, 127, 2, 1, 64, 0, False), (2, 75, 4, 4, 34, 5, True),
                                                  (1, 300, 2, 2, 64, 1, True), (1, 130, 2, 1, 128, 0, False)])
def test_attention_rope_in_place_matches_ref(isa, rng, B, T, H, Hkv, D, pad, docs):
    """The block op's layout: the kernels read pre-RoPE q, k, v from rows of a (B*T, N3 + pad) buffer, rotate q and
    k (RoPE) as they read them, and write the pre-RoPE dq, dk, dv into such rows: equal to rope() then attention
    with autograd through both; the pad columns of the gradient buffer are never written."""
    HD, KD = H * D, Hkv * D
    ld = HD + 2 * KD + pad
    qkv = torch.randn(B * T, ld, generator=rng)
    ang = torch.rand(T, D // 2, generator=rng) * 6.3
    cos, sin = ang.cos().contiguous(), ang.sin().contiguous()
    doc = random_docs(B, T, rng) if docs else None
    p = lambda t: 0 if t is None else t.data_ptr()  # noqa: E731
    q0 = qkv.data_ptr()
    out, lse = poison(torch.empty(B, T, H, D)), poison(torch.empty(B, H, T))
    C().attention_forward(p(out), p(lse), q0, q0 + 4 * HD, q0 + 4 * (HD + KD), p(doc), B, T, H, Hkv, D, ld, ld,
                          p(cos), p(sin))
    parts = [qkv[:, :HD], qkv[:, HD:HD + KD], qkv[:, HD + KD:HD + 2 * KD]]
    qr, kr, vr = (t.clone().reshape(B, T, -1, D).requires_grad_() for t in parts)
    out_ref = ref.attention(ref.rope(qr, cos, sin), ref.rope(kr, cos, sin), vr, doc)
    torch.testing.assert_close(out, out_ref, **FWD_TOL)
    torch.testing.assert_close(lse, ref.attention_lse(ref.rope(qr, cos, sin), ref.rope(kr, cos, sin), doc), **FWD_TOL)
    dy = torch.randn(B, T, H, D, generator=rng)
    out_ref.backward(dy)
    dqkv = torch.full((B * T, ld), 7.0)
    dqkv[:, :HD + 2 * KD] = float("nan")
    d0 = dqkv.data_ptr()
    C().attention_backward(d0, d0 + 4 * HD, d0 + 4 * (HD + KD), p(dy), p(out), p(lse), q0, q0 + 4 * HD,
                           q0 + 4 * (HD + KD), p(doc), B, T, H, Hkv, D, ld, ld, p(cos), p(sin), ld, ld)
    for name, a, r in (("dq", dqkv[:, :HD], qr), ("dk", dqkv[:, HD:HD + KD], kr),
                       ("dv", dqkv[:, HD + KD:HD + 2 * KD], vr)):
        torch.testing.assert_close(a.reshape(r.shape), r.grad, **GRAD_TOL, msg=lambda m: f"{name}: {m}")
    assert bool((dqkv[:, HD + 2 * KD:] == 7.0).all())


def test_attention_layout_rejects_bad_strides_and_tables(rng):
    B, T, H, Hkv, D = 1, 4, 2, 1, 4
    q, k, v = make_qkv(B, T, H, Hkv, D, rng)
    out, lse = torch.empty_like(q), torch.empty(B, H, T)
    cos = torch.ones(T, D // 2)
    args = (out.data_ptr(), lse.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(), 0, B, T, H, Hkv, D)
    with pytest.raises(ValueError, match="q row stride"):
        C().attention_forward(*args, H * D - 1, 0)
    with pytest.raises(ValueError, match="k/v row stride"):
        C().attention_forward(*args, 0, -1)
    with pytest.raises(ValueError, match="cos and sin go together"):
        C().attention_forward(*args, 0, 0, cos.data_ptr(), 0)
    with pytest.raises(ValueError, match="even head dim"):
        C().attention_forward(out.data_ptr(), lse.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(), 0, B, T, H,
                              Hkv, 3, 0, 0, cos.data_ptr(), cos.data_ptr())
    dq = torch.empty_like(q)
    with pytest.raises(ValueError, match="k/v row stride"):
        C().attention_backward(dq.data_ptr(), dq.data_ptr(), dq.data_ptr(), out.data_ptr(), out.data_ptr(),
                               lse.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(), 0, B, T, H, Hkv, D, 0, 0, 0, 0,
                               0, Hkv * D - 1)


def test_attention_reference_gradcheck_float64(rng):
    # The kernel is fp32; check the reference's autograd (what the kernel backward is compared to) in float64.
    q, k, v = (t.requires_grad_() for t in make_qkv(1, 6, 4, 2, 3, rng, torch.float64))
    doc = torch.tensor([[0, 0, 1, 2, 2, 2]], dtype=torch.int32)
    assert torch.autograd.gradcheck(lambda a, b, c: ref.attention(a, b, c, doc), (q, k, v))
    assert torch.autograd.gradcheck(lambda a, b, c: ref.attention(a, b, c), (q, k, v))


def test_attention_rejects_bad_input():
    q, k = torch.zeros(1, 4, 4, 8), torch.zeros(1, 4, 3, 8)
    with pytest.raises(ValueError, match="multiple"):
        ops.attention(q, k, k)
    with pytest.raises(TypeError, match="dtype"):
        ops.attention(q.double(), k, k)
    with pytest.raises(ValueError, match="shape"):
        ops.attention(q, torch.zeros(1, 5, 2, 8), torch.zeros(1, 5, 2, 8))
    with pytest.raises(ValueError, match="contiguous"):
        ops.attention(torch.zeros(1, 4, 8, 4).transpose(2, 3), torch.zeros(1, 4, 2, 8), torch.zeros(1, 4, 2, 8))
    with pytest.raises(TypeError, match="doc_ids"):
        ops.attention(q, q, q, torch.zeros(1, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="256"):
        ops.attention(torch.zeros(1, 2, 1, 260), torch.zeros(1, 2, 1, 260), torch.zeros(1, 2, 1, 260))


# --- decode attention ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("B,H,Hkv,D,T_max", [(1, 1, 1, 3, 1), (2, 4, 2, 17, 40), (3, 8, 2, 64, 300),
                                             (1, 4, 4, 128, 600), (2, 6, 1, 64, 513), (1, 3, 3, 48, 70),
                                             (2, 2, 1, 32, 259), (1, 2, 2, 16, 33), (1, 2, 1, 8, 6),
                                             (1, 12, 1, 64, 300), (2, 20, 2, 32, 70),   # G 12, 10: two head groups
                                             (1, 4, 2, 80, 45), (1, 2, 1, 256, 37)])    # 5 vectors; D 256: via memory
def test_decode_attention_matches_ref(isa, rng, B, H, Hkv, D, T_max):
    # Caches are slices of a bigger (layers, B, T_max + 5, Hkv, D) buffer: the kernel must honour the strides.
    big_k = torch.randn(2, B, T_max + 5, Hkv, D, generator=rng)
    big_v = torch.randn(2, B, T_max + 5, Hkv, D, generator=rng)
    k_cache, v_cache = big_k[1, :, :T_max], big_v[1, :, :T_max]
    q = torch.randn(B, H, D, generator=rng)
    for n_ctx in {1, T_max, int(torch.randint(1, T_max + 1, (1,), generator=rng))}:
        out = ops.decode_attention(q, k_cache, v_cache, n_ctx)
        torch.testing.assert_close(out, ref.decode_attention(q, k_cache, v_cache, n_ctx), **FWD_TOL)


def test_decode_attention_device_length_tensor(rng):
    """n_ctx as a 1-element int64 tensor (GPT's decode step keeps it on the device): the int's result, on the op and
    on the reference, and on the reference's masked form (what it runs for a GPU tensor: the whole cache, masked)."""
    q, k, v = torch.randn(2, 4, 16, generator=rng), torch.randn(2, 30, 2, 16, generator=rng), torch.randn(2, 30, 2, 16,
                                                                                                        generator=rng)
    for n in (1, 13, 30):
        want = ref.decode_attention(q, k, v, n)
        torch.testing.assert_close(ref.decode_attention(q, k, v, torch.tensor([n])), want, **FWD_TOL)
        torch.testing.assert_close(ref.decode_attention_masked(q, k, v, torch.tensor([n])), want, **FWD_TOL)
        torch.testing.assert_close(ops.decode_attention(q, k, v, torch.tensor([n])), ops.decode_attention(q, k, v, n),
                                   rtol=0, atol=0)
    with pytest.raises(ValueError, match="decode_attention n_ctx"):
        ops.decode_attention(q, k, v, torch.tensor([31]))
    for bad in (torch.tensor([3], dtype=torch.int32), torch.tensor([3, 4]), torch.tensor([3.0])):
        with pytest.raises(TypeError, match="decode_attention n_ctx: expected an int or a 1-element int64 tensor"):
            ops.decode_attention(q, k, v, bad)


@pytest.mark.parametrize("H,Hkv", [(4, 2), (12, 1), (20, 2)])   # G 2, 12, 10 (query heads go in groups of <= 8)
def test_decode_attention_writes_every_element_and_agrees_with_full_attention(isa, rng, H, Hkv):
    B, T, D = 2, 37, 17
    q, k, v = make_qkv(B, T, H, Hkv, D, rng)
    out = poison(torch.empty(B, H, D))
    q_last = q[:, -1].contiguous()  # (B, H, D), kept alive across the call
    C().decode_attention(out.data_ptr(), q_last.data_ptr(), k.data_ptr(), v.data_ptr(),
                         T * Hkv * D, Hkv * D, B, H, Hkv, D, T)
    torch.testing.assert_close(out, ops.attention(q, k, v)[:, -1], **FWD_TOL)


def test_decode_attention_rejects_bad_input():
    q, cache = torch.zeros(1, 4, 8), torch.zeros(1, 10, 2, 8)
    with pytest.raises(ValueError, match="n_ctx"):
        ops.decode_attention(q, cache, cache, 11)
    with pytest.raises(ValueError, match="n_ctx"):
        ops.decode_attention(q, cache, cache, 0)
    with pytest.raises(ValueError, match="k_cache"):
        ops.decode_attention(q, torch.zeros(1, 10, 2, 9), cache, 3)
    with pytest.raises(ValueError, match="contiguous"):
        ops.decode_attention(q, torch.zeros(1, 10, 8, 2).transpose(2, 3), cache, 3)


@pytest.mark.parametrize("T", [5, 70, 200])
def test_nan_keys_and_queries_propagate_as_in_torch(isa, rng, T):
    """The softmax's exp masked NaN scores to 0 (as it does -inf ones): a NaN key was silently dropped and its
    rows came out finite, where softmax attention gives NaN. Now the rows that see a NaN key or value (and only those) are NaN,
    forward and backward, and single-query decode attention does the same."""
    q = torch.randn(1, T, 4, 16, generator=rng)
    k, v = (torch.randn(1, T, 2, 16, generator=rng) for _ in range(2))
    j = 0 if T == 5 else int(torch.randint(0, T, (1,), generator=rng))  # 0: a query whose only key is NaN
    k[0, j, 1] = float("nan")                       # kv head 1 of 2: query heads 2 and 3
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    out = ops.attention(qs, ks, vs)
    # plain softmax attention (torch's SDPA returns a finite row where a query's only key is NaN)
    kt, vt = (t.transpose(1, 2).repeat_interleave(2, dim=1) for t in (k, v))
    sc = (q.transpose(1, 2) @ kt.transpose(-1, -2) / 4.0).masked_fill(~ref.attention_mask(T, None), float("-inf"))
    want = (torch.softmax(sc, -1) @ vt).transpose(1, 2)
    assert torch.equal(out.isnan(), want.isnan())
    nan_rows = out.isnan().any(-1)[0]               # (T, H)
    assert nan_rows[j:, 2:].all() and not nan_rows[:j].any() and not nan_rows[:, :2].any()
    torch.testing.assert_close(out.nan_to_num(), want.nan_to_num(), rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert qs.grad[0, j:, 2:].isnan().any() and not qs.grad[0, :, :2].isnan().any()
    kc = torch.randn(2, 9, 2, 16, generator=rng)
    vc = torch.randn(2, 9, 2, 16, generator=rng)
    kc[1, 4, 0] = float("nan")
    o = ops.decode_attention(torch.randn(2, 4, 16, generator=rng), kc, vc, 9)
    assert o[1, :2].isnan().all() and not o[0].isnan().any() and not o[1, 2:].isnan().any()
    assert not ops.decode_attention(torch.randn(2, 4, 16, generator=rng), kc, vc, 4).isnan().any()
