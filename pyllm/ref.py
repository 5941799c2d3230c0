"""Plain-PyTorch references for every pyllm kernel: the tests and benchmarks compare against these."""
from __future__ import annotations

import torch


def up(t: torch.Tensor) -> torch.Tensor:
    """Half types compute in fp32; fp32 and fp64 stay as they are (float64 gradchecks stay exact)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (..., C), weight (C) -> (..., C)."""
    xf = up(x)
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * up(weight)).to(x.dtype)


def matmul(a, b, bias=None, trans_a=False, trans_b=False, out=None, accumulate=False):
    """op(a) (M, K) @ op(b) (N, K).T (+ bias) in fp32 (bf16 inputs upcast); see ops.matmul."""
    A = up(a).T if trans_a else up(a)
    B = up(b).T if trans_b else up(b)
    c = A @ B.T
    if bias is not None:
        c = c + bias
    if out is None:
        return c
    if accumulate:
        out += c
    else:
        out.copy_(c)
    return out


def matmul_bf16(a, b):
    """a (M, K) bf16, b (N, K) bf16 -> (M, N) fp32."""
    return a.float() @ b.float().T


def linear(x, weight, bias=None):
    """x (..., K), weight (N, K), bias (N) or None -> (..., N)."""
    return torch.nn.functional.linear(x, weight, bias)


def matvec(W, x):
    """W (n, k), x (k) -> (n)."""
    return W @ x


def quantize_q8(w, G):
    """Q8_0 as llama2.c runq.c: per group of G, s = max|w|/127 (fp32), q = round-half-away(w / s), q = 0 if s == 0."""
    n, k = w.shape
    wg = w.float().reshape(n, k // G, G)
    s = wg.abs().amax(-1) / 127.0                                # fp32 division, as in C
    v = wg / torch.where(s == 0, torch.ones_like(s), s)[..., None]   # fp32 division, as in C
    q = torch.sign(v) * torch.floor(v.abs().double() + 0.5).float()  # roundf: exact in float64
    q = torch.where((s == 0)[..., None], torch.zeros_like(q), q)
    return q.to(torch.int8).reshape(n, k), s


def matvec_q8(wq, ws, x):
    """y[i] = sum_g (int dot of group g of wq[i] and quantized x) * ws[i, g] * xs[g]; exact int dots, float64 sum."""
    n, k = wq.shape
    G = k // ws.shape[1]
    xq, xs = quantize_q8(x.reshape(1, k), G)
    dots = (wq.reshape(n, -1, G).long() * xq.reshape(1, -1, G).long()).sum(-1)    # (n, k/G) exact
    return (dots.double() * ws.double() * xs.double()).sum(-1).float()
