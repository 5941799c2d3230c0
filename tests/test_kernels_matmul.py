"""GEMM (fp32, bf16), linear autograd, matvec and Q8_0 kernels vs pyllm.ref on fresh random inputs, odd sizes,
all transposes, bias/accumulate, poisoned outputs, every ISA path.
Run: OMP_NUM_THREADS=1 PYTHONPATH=$PWD python -m pytest -q tests/test_kernels_matmul.py"""
import pytest
import torch

from pyllm import ops, ref
from pyllm._ext import C
from conftest import poison

SIZES = [(1, 1, 1), (3, 17, 1), (17, 127, 3), (127, 3, 1000), (1000, 17, 127), (33, 300, 65), (1, 1000, 17)]


@pytest.fixture(params=["auto", "packed", "direct"])
def gemm_path(request, monkeypatch):
    """The fp32 GEMM's two drivers (impl_matmul.h): packed panels, or direct (A read in place, B packed only when
    stored (N, K)); "auto" = the kernel's own choice by shape. PYLLM_GEMM is read by the kernel on every call."""
    if request.param == "auto":
        monkeypatch.delenv("PYLLM_GEMM", raising=False)
    else:
        monkeypatch.setenv("PYLLM_GEMM", request.param)
    return request.param


@pytest.fixture(params=["auto", "packed", "widen"])
def bf16_path(request, monkeypatch):
    """The bf16 GEMM without AMX: k-pair panels on vdpbf16ps where the CPU has AVX512_BF16 ("auto": a row-major A
    of even K is read in place, its edge panel packed; "packed": PYLLM_GEMM=packed packs A too), or bf16 widened
    to fp32 while packing and the fp32 micro-kernel (PYLLM_NO_BF16DP=1, and CPUs without it)."""
    monkeypatch.delenv("PYLLM_GEMM", raising=False)
    if request.param == "widen":
        monkeypatch.setenv("PYLLM_NO_BF16DP", "1")
    else:
        monkeypatch.delenv("PYLLM_NO_BF16DP", raising=False)
        if request.param == "packed":
            monkeypatch.setenv("PYLLM_GEMM", "packed")
    return request.param


def _operands(rng, M, N, K, ta, tb, dtype=torch.float32):
    a = torch.randn(*((K, M) if ta else (M, K)), generator=rng).to(dtype)
    b = torch.randn(*((K, N) if tb else (N, K)), generator=rng).to(dtype)
    return a, b


def _tol(K):
    # fp32 sums of K products: rounding grows ~sqrt(K); inputs ~N(0,1) so |C| ~ sqrt(K).
    return dict(rtol=1e-5, atol=2e-6 * K ** 0.5 * 4)


@pytest.mark.parametrize("M,N,K", SIZES)
@pytest.mark.parametrize("ta,tb", [(0, 0), (0, 1), (1, 0), (1, 1)])
def test_matmul_transposes_bias(isa, gemm_path, rng, M, N, K, ta, tb):
    a, b = _operands(rng, M, N, K, ta, tb)
    bias = torch.randn(N, generator=rng) if (M + N + K + ta + tb) % 2 else None
    out = poison(torch.empty(M, N))
    ops.matmul(a, b, bias, trans_a=bool(ta), trans_b=bool(tb), out=out)
    torch.testing.assert_close(out, ref.matmul(a.double(), b.double(), None if bias is None else bias.double(),
                                               trans_a=bool(ta), trans_b=bool(tb)).float(), **_tol(K))


@pytest.mark.parametrize("M,N,K", [(17, 127, 3), (130, 70, 600), (1, 33, 257)])
def test_matmul_accumulate(isa, gemm_path, rng, M, N, K):
    a, b = _operands(rng, M, N, K, 0, 1)
    bias = torch.randn(N, generator=rng)
    c0 = torch.randn(M, N, generator=rng)
    out = c0.clone()
    ops.matmul(a, b, bias, trans_b=True, out=out, accumulate=True)
    torch.testing.assert_close(out, c0 + a @ b + bias, **_tol(K))


def test_matmul_strided_ld_and_k0(isa, gemm_path, rng):
    # Raw kernel call with row strides larger than the logical width (a view into a wider buffer); the padding
    # columns of C must stay untouched. K = 0 gives C = bias.
    M, N, K = 19, 35, 41
    A = torch.randn(M, K + 5, generator=rng)
    B = torch.randn(N, K + 3, generator=rng)
    Cbuf = poison(torch.empty(M, N + 7))
    C().matmul_forward(Cbuf.data_ptr(), A.data_ptr(), B.data_ptr(), 0, M, N, K, K + 5, K + 3, N + 7)
    torch.testing.assert_close(Cbuf[:, :N], A[:, :K] @ B[:, :K].T, **_tol(K))
    assert torch.isnan(Cbuf[:, N:]).all()
    bias = torch.randn(N, generator=rng)
    out = poison(torch.empty(M, N))
    C().matmul_forward(out.data_ptr(), A.data_ptr(), B.data_ptr(), bias.data_ptr(), M, N, 0, 1, 1, N)
    torch.testing.assert_close(out, bias.expand(M, N))
    old = torch.randn(M, N, generator=rng)  # the kernel's own K = 0 accumulate branch: C += bias (ops.matmul
    acc = old.clone()                       # handles K = 0 in Python, so it never reached this)
    C().matmul_forward(acc.data_ptr(), A.data_ptr(), B.data_ptr(), bias.data_ptr(), M, N, 0, 1, 1, N, False, False,
                       True)
    torch.testing.assert_close(acc, old + bias)
    # Through ops.matmul, K = 0 operands (no data pointer): the empty sum, plus bias, or added to `out`.
    a0, b0 = torch.empty(M, 0), torch.empty(N, 0)
    torch.testing.assert_close(ops.matmul(a0, b0), torch.zeros(M, N))
    torch.testing.assert_close(ops.matmul(a0, b0, bias=bias), bias.expand(M, N))
    acc = torch.randn(M, N, generator=rng)
    torch.testing.assert_close(ops.matmul(a0, b0, out=acc.clone(), accumulate=True), acc)


# (37, 290, 45): N past the AMX driver's first 256-column chunk, so the emulated avx512 build
# (tests/test_avx512_emu.py) runs its second chunk (every other shape had N <= 127: a driver that stopped after
# the first chunk passed there).
# (30, 70, 4611): two K blocks of the k-pair path (kc 2306, 2305 with MM_KC_MAX 1024: the last one odd),
# and 4 or 10 blocks of the widening path (MM_KC_MAX 1024 on avx512, 384 elsewhere; a block may stretch to 5/4 of it).
@pytest.mark.parametrize("M,N,K", [(1, 1, 1), (17, 127, 3), (127, 33, 1000), (65, 40, 257), (37, 290, 45),
                                   (30, 70, 4611)])
@pytest.mark.parametrize("ta,tb", [(0, 0), (1, 1), (0, 1)])
def test_matmul_bf16(isa, bf16_path, rng, M, N, K, ta, tb):
    a, b = _operands(rng, M, N, K, ta, tb, torch.bfloat16)
    out = poison(torch.empty(M, N))
    ops.matmul(a, b, trans_a=bool(ta), trans_b=bool(tb), out=out)
    # Products of bf16 values are exact in fp32; only the fp32 summation order differs from the reference.
    expect = ref.matmul(a.double(), b.double(), trans_a=bool(ta), trans_b=bool(tb)).float()
    torch.testing.assert_close(out, expect, **_tol(K))
    # And vs the fp32 inputs before rounding to bf16: bf16 tolerance (this compared the rounded inputs again).
    if not (ta or tb):
        a32, b32 = _operands(rng, M, N, K, 0, 0)
        _within_bf16_rounding(ops.matmul_bf16(a32.bfloat16(), b32.bfloat16()), a32, b32)


def _within_bf16_rounding(y, a32, b32):
    """y = bf16(a32) . bf16(b32)^T (fp32 sums) against the fp32 originals, elementwise: each input rounds by at most
    2^-8 relative (8 significant bits), so each product by 2^-7 (+ 2^-16), and the fp32 sums add K * 2^-24 of
    |a| . |b|. A bound from
    |a| . |b|^T, not a fixed atol: near-cancelling rows (K = 3, entries ~3) overran rtol/atol 2e-2 about once in a few
    hundred fresh draws."""
    exact = a32.double() @ b32.double().T
    bound = (2.0 ** -7 * 1.01 + a32.shape[1] * 2.0 ** -22) * (a32.double().abs() @ b32.double().abs().T) + 1e-30
    err = (y.double() - exact).abs()
    assert bool((err <= bound).all()), f"bf16-input error {float((err / bound).max()):.3f} x its bound"
    assert float(err.max()) > 0 or a32.shape[1] == 0  # the inputs were rounded: not the fp32 product itself


def _check_a_in_place(dtype, M, N, K, pad, threads):
    """C (M, N) = A·Bᵀ + bias, and += with accumulate, through the raw kernel with row strides lda = K + pad,
    ldb = K + 1, ldc = N + 3 (the padding columns of C must stay untouched). Data of its own per thread count: the
    packing scratch outlives a call, so an edge panel that a call forgot to pack would still hold the previous
    parameter's A, were the seed shared."""
    rng = torch.Generator().manual_seed(100 * threads + M)
    lda, ldb, ldc = K + pad, K + 1, N + 3
    A = torch.randn(M, lda, generator=rng).to(dtype)
    B = torch.randn(N, ldb, generator=rng).to(dtype)
    bias = torch.randn(N, generator=rng)
    a, b = A[:, :K], B[:, :K]
    expect = ref.matmul(a.double(), b.double(), bias.double())
    c0 = torch.randn(M, N, generator=rng)
    fn = C().matmul_bf16_forward if dtype == torch.bfloat16 else C().matmul_forward
    before = C().get_threads()
    C().set_threads(threads)
    try:
        Cbuf = poison(torch.empty(M, ldc))
        fn(Cbuf.data_ptr(), A.data_ptr(), B.data_ptr(), bias.data_ptr(), M, N, K, lda, ldb, ldc)
        torch.testing.assert_close(Cbuf[:, :N], expect.float(), **_tol(K))
        assert torch.isnan(Cbuf[:, N:]).all()
        Cbuf[:, :N] = c0
        fn(Cbuf.data_ptr(), A.data_ptr(), B.data_ptr(), bias.data_ptr(), M, N, K, lda, ldb, ldc, accumulate=True)
        torch.testing.assert_close(Cbuf[:, :N], (c0.double() + expect).float(), **_tol(K))
        assert torch.isnan(Cbuf[:, N:]).all()
    finally:
        C().set_threads(before)


# The k-pair GEMM's A read in place (row-major A, even K): full 14-row tiles from A's rows, the edge tile (M % 14)
# packed; threads splitting B blocks (75 x 1100: every thread reads the one shared edge panel) or A panels (3100
# rows: the last thread's); two K blocks (4200: 2100 + 2100); row strides that leave A's rows 2-byte aligned
# (lda = K + 1), and a 4 KiB one (lda = 2048: A packed instead).
@pytest.mark.parametrize("M,N,K,pad", [(75, 1100, 800, 0), (3100, 600, 400, 1), (37, 200, 4200, 3), (29, 64, 2, 0),
                                       (45, 70, 200, 2048 - 200)])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_matmul_bf16_a_in_place(isa, bf16_path, M, N, K, pad, threads):
    _check_a_in_place(torch.bfloat16, M, N, K, pad, threads)


# The same for the fp32 packed driver (K > 1024 or > 2 GFLOP: not the direct path), A's rows read in place by the
# fp32 micro-kernel; an edge B panel (N % 32) with full A tiles; lda = 2048 floats (8 KiB): A packed.
@pytest.mark.parametrize("M,N,K,pad", [(75, 1100, 1100, 0), (3100, 600, 1030, 1), (37, 200, 4200, 3),
                                       (45, 70, 1100, 2048 - 1100)])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_matmul_f32_a_in_place(isa, gemm_path, M, N, K, pad, threads):
    _check_a_in_place(torch.float32, M, N, K, pad, threads)


def test_matmul_bf16_vs_fp32_inputs(isa, rng):
    x = torch.randn(64, 300, generator=rng)
    w = torch.randn(50, 300, generator=rng)
    y = ops.matmul_bf16(x.bfloat16(), w.bfloat16())
    _within_bf16_rounding(y, x, w)


@pytest.mark.parametrize("shape,N", [((1, 1), 1), ((3, 17), 127), ((2, 5, 127), 33), ((4, 64, 96), 1000)])
def test_linear_grads_vs_torch(isa, rng, shape, N):
    K = shape[-1]
    x = torch.randn(*shape, generator=rng, requires_grad=True)
    w = (torch.randn(N, K, generator=rng) / K ** 0.5).requires_grad_()
    bias = torch.randn(N, generator=rng).requires_grad_() if N % 2 else None
    y = ops.linear(x, w, bias)
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    br = bias.detach().clone().requires_grad_() if bias is not None else None
    yr = ref.linear(xr, wr, br)
    tol = _tol(K)
    torch.testing.assert_close(y, yr, **tol)
    dy = torch.randn(*yr.shape, generator=rng)
    y.backward(dy)
    yr.backward(dy)
    M = x.numel() // K
    torch.testing.assert_close(x.grad, xr.grad, **_tol(N))
    torch.testing.assert_close(w.grad, wr.grad, **_tol(M))
    if bias is not None:
        torch.testing.assert_close(bias.grad, br.grad, **_tol(M))


def test_linear_backward_non_contiguous_grad(rng):
    x = torch.randn(6, 10, generator=rng, requires_grad=True)
    w = torch.randn(8, 10, generator=rng, requires_grad=True)
    y = ops.linear(x, w)
    (y.T * torch.arange(6.0)).sum().backward()     # dy arrives as a transposed (strided) view
    torch.testing.assert_close(x.grad, torch.arange(6.0)[:, None].expand(6, 8) @ w.detach(), **_tol(8))


def test_linear_gradcheck_float64_reference(rng):
    x = torch.randn(3, 5, generator=rng, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 5, generator=rng, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ref.linear, (x, w))
    # ref.matmul with transposes is what the backward computes: check it agrees with autograd in float64.
    dy = torch.randn(3, 4, generator=rng, dtype=torch.float64)
    (ref.linear(x, w) * dy).sum().backward()
    torch.testing.assert_close(ref.matmul(dy, w, trans_b=True), x.grad)
    torch.testing.assert_close(ref.matmul(dy, x.detach(), trans_a=True, trans_b=True), w.grad)


def test_matmul_rejects_bad_input():
    with pytest.raises(TypeError, match="dtype"):
        ops.linear(torch.zeros(2, 3, dtype=torch.float64), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="shape"):
        ops.linear(torch.zeros(2, 3), torch.zeros(4, 5))
    with pytest.raises(ValueError, match="contiguous"):
        ops.linear(torch.zeros(3, 2).t(), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="inner"):
        ops.matmul(torch.zeros(2, 3), torch.zeros(4, 5))
    with pytest.raises(ValueError, match="multiple"):
        ops.quantize_q8(torch.zeros(2, 30), 32)
    with pytest.raises(ValueError, match="k must be"):
        C().matvec_q8(1, 1, 1, 1, 2, 30, 32)
    with pytest.raises(ValueError, match=r"K >= 1, got \(2, 0\)"):  # was torch's "cannot reshape" from _Linear
        ops.linear(torch.zeros(2, 0), torch.zeros(4, 0))
    with pytest.raises(ValueError, match="non-empty 2-D"):  # was the binding's "null pointer for w"
        ops.matvec(torch.zeros(4, 0), torch.zeros(0))


@pytest.mark.parametrize("n,k", [(1, 1), (3, 17), (127, 1000), (1000, 127), (33, 4096)])
def test_matvec_f32(isa, rng, n, k):
    W = torch.randn(n, k, generator=rng)
    x = torch.randn(k, generator=rng)
    torch.testing.assert_close(ops.matvec(W, x), ref.matvec(W.double(), x.double()).float(), **_tol(k))


@pytest.mark.parametrize("n,k,G", [(1, 32, 32), (3, 64, 16), (17, 192, 64), (127, 1000, 8), (130, 4096, 64),
                                   (5, 96, 96), (9, 60, 3), (33, 288, 32), (5, 100, 4), (7, 512, 128),
                                   (4, 768, 256), (2, 96, 32), (6, 160, 16), (3, 32, 32), (7, 32, 8), (4, 288, 4)])
def test_q8_quantize_and_matvec(isa, rng, n, k, G):
    w = torch.randn(n, k, generator=rng) * torch.rand(n, 1, generator=rng) * 3
    w[0, :G] = 0                                   # an all-zero group: scale 0, q 0
    w[-1, -1] = 127 * 0.5 * (w[-1, -G:].abs().max() / 127)   # a value on a rounding tie region
    q, s = ops.quantize_q8(w, G)
    qr, sr = ref.quantize_q8(w, G)
    assert torch.equal(q, qr) and torch.equal(s, sr)
    x = torch.randn(k, generator=rng)
    x[:G] *= 0 if k > G else 1
    y = ops.matvec_q8(q, s, x)
    yp = poison(torch.empty(n))                    # every row written, rows paired across the matrix included
    C().matvec_q8(ops.ptr(yp), ops.ptr(q), ops.ptr(s), ops.ptr(x), n, k, G)
    assert torch.equal(yp, y)
    # Scales past each row's last group are never used: NaN there (after the last row) must not reach y.
    s_nan = torch.full((s.numel() + 64,), float("nan"))
    s_nan[:s.numel()] = s.flatten()
    yp = poison(torch.empty(n))
    C().matvec_q8(ops.ptr(yp), ops.ptr(q), ops.ptr(s_nan), ops.ptr(x), n, k, G)
    assert torch.equal(yp, y)
    # Same quantization semantics: only fp32-vs-float64 rounding of the scaled group sums may differ.
    yr = ref.matvec_q8(q, s, x)
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5 * (k ** 0.5))
    # And close to the fp32 product: each of W and x carries at most half a step (s/2) of error per element.
    err_bound = (s.repeat_interleave(G, 1).abs() * x.abs()).sum(1) * 0.5 + \
        (w.abs() * (x.abs().reshape(-1, G).amax(1) / 127).repeat_interleave(G)).sum(1) * 0.5 + 1e-4
    assert ((y - w @ x).abs() <= err_bound * 1.01).all()


def test_q8_matvec_large_k_heap_scratch(rng):
    # k > 32768: the kernel's x scratch comes from malloc instead of the stack.
    n, k, G = 3, 32768 + 64, 64
    w = torch.randn(n, k, generator=rng)
    q, s = ops.quantize_q8(w, G)
    x = torch.randn(k, generator=rng)
    torch.testing.assert_close(ops.matvec_q8(q, s, x), ref.matvec_q8(q, s, x), rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("n,k,G", [(3, 64, 32), (5, 60, 6), (4, 288, 4), (7, 512, 128)])
def test_q8_nan_is_kept(isa, rng, n, k, G):
    """A NaN in W or x was dropped by the group max (q 0, a finite scale): matvec_q8 gave finite numbers where the
    fp32 product is NaN. Now the group's scale is NaN, so exactly the rows that use it are NaN."""
    w = torch.randn(n, k, generator=rng)
    w[1, G + 1 if k > G else 1] = float("nan")
    q, s = ops.quantize_q8(w, G)
    qr, sr = ref.quantize_q8(w, G)
    assert torch.isnan(s[1]).sum() == 1 and not torch.isnan(s[[0, 2]]).any()
    torch.testing.assert_close(s, sr, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(q, qr)
    x = torch.randn(k, generator=rng)
    y = ops.matvec_q8(q, s, x)
    assert torch.isnan(y[1]) and torch.isfinite(y[[0] + list(range(2, n))]).all()
    q2, s2 = ops.quantize_q8(torch.randn(n, k, generator=rng), G)
    x[k - 1] = float("nan")  # the last group of x: NaN in every row, as W @ x
    assert torch.isnan(ops.matvec_q8(q2, s2, x)).all()


@pytest.mark.parametrize("ta", [0, 1])
def test_matmul_a_super_blocks(rng, ta):
    # M*K above the kernel's 8M-float packing budget: A is packed and multiplied in row super-blocks.
    M, N, K = 4500, 37, 2000
    a, b = _operands(rng, M, N, K, ta, 0)
    out = poison(torch.empty(M, N))
    ops.matmul(a, b, trans_a=bool(ta), out=out)
    torch.testing.assert_close(out, ref.matmul(a.double(), b.double(), trans_a=bool(ta)).float(), **_tol(K))


@pytest.mark.parametrize("M", [4, 5])
def test_matmul_small_m_boundary(isa, rng, M):
    # M <= 4 takes the unpacked dot-product path, M = 5 the packed GEMM: both against the reference.
    a = torch.randn(M, 300, generator=rng)
    b = torch.randn(70, 300, generator=rng)
    bias = torch.randn(70, generator=rng)
    c0 = torch.randn(M, 70, generator=rng)
    out = c0.clone()
    ops.matmul(a, b, bias, out=out, accumulate=True)
    torch.testing.assert_close(out, c0 + a @ b.T + bias, **_tol(300))


# Shapes that cross the GEMM driver's blocking paths (impl_matmul.h): K split into several blocks (K > MM_KC_MAX:
# 1024 on avx512, 384 elsewhere, stretched by up to 1/4: 2100 is 2 or 5 blocks; the direct path's are <= 384),
# several B blocks (N > 512) dealt out to threads from a shared counter, threads splitting the A panels instead
# (N <= 512, or >= 1024 rows per thread), A in row chunks (M * kc > 2.5M floats: 7001 rows at kc 384 are chunks of
# 3514 and 3487), M just above the small-M path, and M % 14 / N % 32 leftovers; on 1, 2 and 3 threads (3: a count
# that divides no block count), with bias and accumulate.
@pytest.mark.parametrize("M,N,K", [(70, 1100, 800), (5, 33, 1000), (7001, 37, 384), (3100, 600, 400), (29, 64, 9),
                                   (37, 200, 2100)])
@pytest.mark.parametrize("ta,tb", [(0, 0), (0, 1), (1, 1)])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_matmul_blocking_paths(isa, gemm_path, rng, M, N, K, ta, tb, threads):
    a, b = _operands(rng, M, N, K, ta, tb)
    bias = torch.randn(N, generator=rng)
    c0 = torch.randn(M, N, generator=rng)
    expect = ref.matmul(a.double(), b.double(), bias.double(), trans_a=bool(ta), trans_b=bool(tb))
    before = C().get_threads()
    C().set_threads(threads)
    try:
        out = poison(torch.empty(M, N))
        ops.matmul(a, b, bias, trans_a=bool(ta), trans_b=bool(tb), out=out)
        torch.testing.assert_close(out, expect.float(), **_tol(K))
        out = c0.clone()
        ops.matmul(a, b, bias, trans_a=bool(ta), trans_b=bool(tb), out=out, accumulate=True)
        torch.testing.assert_close(out, (c0.double() + expect).float(), **_tol(K))
    finally:
        C().set_threads(before)


def test_matmul_row_chunks_on_two_threads(rng, monkeypatch):
    """The packed driver with A in two row chunks (M * kc > 2.5M floats) on 2 threads splitting the A panels: the
    second chunk is shorter, so its panels split at another row; the threads meet between chunks so that neither
    packs over a panel the other still reads."""
    monkeypatch.setenv("PYLLM_GEMM", "packed")
    M, N, K = 7001, 600, 384  # kc 384: up to 5/4 * 2M / 384 = 6826 rows per chunk: chunks of 3514 and 3487 rows
    a, b = _operands(rng, M, N, K, 0, 0)
    before = C().get_threads()
    C().set_threads(2)
    try:
        out = poison(torch.empty(M, N))
        ops.matmul(a, b, out=out)
    finally:
        C().set_threads(before)
    torch.testing.assert_close(out, ref.matmul(a.double(), b.double()).float(), **_tol(K))


@pytest.mark.parametrize("threads", [2, 3])
def test_matmul_threads_own_a_panels(isa, rng, monkeypatch, threads):
    """The packed driver's threads each pack their own A panels and never wait for one another within a product.
    K = 2501 is two K blocks of 1251 and 1250 (MM_KC_MAX 1024 on avx512; six of 417..416 with 384): a
    thread that reaches the shorter last block first must not pack over a panel that a slower thread still reads
    (panels sit at the longest block's stride). Repeated, because a race shows only in some calls. N = 300 is one
    B block, so the threads split A (4 panels each of 12 on 3 threads)."""
    monkeypatch.setenv("PYLLM_GEMM", "packed")
    M, N, K = 70, 300, 2501
    before = C().get_threads()
    C().set_threads(threads)
    try:
        for ta, tb in [(0, 0), (1, 1), (0, 1)]:
            a, b = _operands(rng, M, N, K, ta, tb)
            expect = ref.matmul(a.double(), b.double(), trans_a=bool(ta), trans_b=bool(tb)).float()
            for _ in range(20):
                out = poison(torch.empty(M, N))
                ops.matmul(a, b, trans_a=bool(ta), trans_b=bool(tb), out=out)
                torch.testing.assert_close(out, expect, **_tol(K))
    finally:
        C().set_threads(before)


# The training GEMMs of the Shakespeare (d=128, M = 768) and issue-3 (d=384) models through linear's autograd, on
# both drivers and 1-2 threads: fwd x·Wᵀ, dX = dY·W, dW = dYᵀ·X against float64 autograd. Odd M / N leave an
# edge A tile (M % 14) and an edge B panel (N % 32); K = 768 > 384 crosses the direct path's K blocks (dW).
@pytest.mark.parametrize("M,K,N", [(768, 128, 128), (768, 352, 128), (768, 128, 262), (131, 1024, 45),
                                   (2048, 384, 1024)])
@pytest.mark.parametrize("threads", [1, 2])
def test_linear_training_shapes(gemm_path, rng, M, K, N, threads):
    x = torch.randn(M, K, generator=rng, requires_grad=True)
    w = torch.randn(N, K, generator=rng, requires_grad=True)
    dy = torch.randn(M, N, generator=rng)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    (x64 @ w64.T).backward(dy.double())
    before = C().get_threads()
    C().set_threads(threads)
    try:
        y = ops.linear(x, w)
        y.backward(dy)
    finally:
        C().set_threads(before)
    torch.testing.assert_close(y, (x64 @ w64.T).detach().float(), **_tol(K))
    torch.testing.assert_close(x.grad, x64.grad.float(), **_tol(N))
    torch.testing.assert_close(w.grad, w64.grad.float(), **_tol(M))


@pytest.mark.parametrize("ld", [1024, 2048])
def test_matmul_4k_strides(isa, gemm_path, rng, ld):
    # Row strides that are multiples of 4 KiB (the auto choice avoids the direct path there; forced, it must still
    # be right): A, B and C are views into (.., ld) buffers.
    M, N, K = 45, 70, 200
    for ta, tb in ((0, 0), (0, 1), (1, 1)):
        A = torch.randn(*((K, ld) if ta else (M, ld)), generator=rng)
        B = torch.randn(*((K, ld) if tb else (N, ld)), generator=rng)
        Cbuf = poison(torch.empty(M, ld))
        C().matmul_forward(Cbuf.data_ptr(), A.data_ptr(), B.data_ptr(), 0, M, N, K, ld, ld, ld, ta, tb, False)
        a = A[:, :M] if ta else A[:, :K]
        b = B[:, :N] if tb else B[:, :K]
        expect = ref.matmul(a.double(), b.double(), trans_a=bool(ta), trans_b=bool(tb)).float()
        torch.testing.assert_close(Cbuf[:, :N], expect, **_tol(K))
        assert torch.isnan(Cbuf[:, N:]).all()


def test_gemm_scratch_freed_when_a_thread_exits():
    """The GEMM keeps its packing scratch per calling thread (~2 MiB here); a thread that exits must free it,
    or a server that runs requests on fresh threads grows by that much per thread."""
    import threading

    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)

    def rss_mib():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20

    def one_thread():
        t = threading.Thread(target=lambda: ops.matmul(a, b))
        t.start()
        t.join()

    for _ in range(3):
        one_thread()
    r0 = rss_mib()
    for _ in range(40):
        one_thread()
    assert rss_mib() - r0 < 30  # leaking, this grows by ~90 MiB
