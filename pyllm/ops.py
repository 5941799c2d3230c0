"""torch autograd Functions over pyllm._C: validate tensors here, pass data_ptr() and sizes to the kernels."""
from __future__ import annotations

import torch

from ._ext import C


# --- validation -------------------------------------------------------------------------------------------
def check(t: torch.Tensor, name: str, dtype=torch.float32, shape: tuple | None = None, device: str = "cpu"):
    """One-line errors for what the kernels cannot take: wrong dtype/device/shape, or a strided view."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype}, got {t.dtype}")
    if t.device.type != device:
        raise ValueError(f"{name}: expected a {device} tensor, got {t.device}")
    if shape is not None:
        if len(shape) != t.dim() or any(s is not None and s != d for s, d in zip(shape, t.shape)):
            raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name}: must be contiguous (call .contiguous())")
    return t


def ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


# --- rmsnorm ----------------------------------------------------------------------------------------------
class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        C_ = x.shape[-1]
        x2 = x.reshape(-1, C_)
        N = x2.shape[0]
        out = torch.empty_like(x2)
        rstd = torch.empty(N, dtype=torch.float32)
        C().rmsnorm_forward(ptr(out), ptr(rstd), ptr(x2), ptr(weight), N, C_, float(eps))
        ctx.save_for_backward(x2, weight, rstd)
        return out.view_as(x)

    @staticmethod
    def backward(ctx, dout):
        x2, weight, rstd = ctx.saved_tensors
        N, C_ = x2.shape
        dout2 = dout.reshape(N, C_).contiguous()
        dx = torch.empty_like(x2)
        dw = torch.zeros_like(weight)
        C().rmsnorm_backward(ptr(dx), ptr(dw), ptr(dout2), ptr(x2), ptr(weight), ptr(rstd), N, C_)
        return dx.view(dout.shape), dw, None


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """RMSNorm over the last dim. x (..., C) fp32 contiguous, weight (C)."""
    check(x, "rmsnorm x")
    check(weight, "rmsnorm weight", shape=(x.shape[-1],))
    if x.numel() == 0:
        raise ValueError("rmsnorm x: empty tensor")
    return _RMSNorm.apply(x, weight, eps)


# --- matmul -----------------------------------------------------------------------------------------------
def matmul(a, b, bias=None, trans_a=False, trans_b=False, out=None, accumulate=False):
    """C (M, N) = op(a) @ op(b).T (+ bias), one call of the packed GEMM kernel (no autograd).
    op(a) = a (M, K), or a.T when trans_a (a stored (K, M)); op(b) = b (N, K), or b.T when trans_b (b (K, N)).
    a, b fp32 (or both bf16: fp32 accumulate, fp32 result). out (M, N) fp32 is written (or added to when
    accumulate); a new tensor is returned when out is None."""
    dt = torch.bfloat16 if isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 else torch.float32
    check(a, "matmul a", dt)
    check(b, "matmul b", dt)
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(f"matmul: a and b must be 2-D, got {tuple(a.shape)} and {tuple(b.shape)}")
    M, K = (a.shape[1], a.shape[0]) if trans_a else tuple(a.shape)
    N, Kb = (b.shape[1], b.shape[0]) if trans_b else tuple(b.shape)
    if K != Kb:
        raise ValueError(f"matmul: inner dimensions differ: op(a) is ({M}, {K}), op(b).T needs ({Kb}, {N})")
    if bias is not None:
        check(bias, "matmul bias", shape=(N,))
    if out is None:
        if accumulate:
            raise ValueError("matmul: accumulate=True needs out")
        out = torch.empty(M, N, dtype=torch.float32)
    else:
        check(out, "matmul out", shape=(M, N))
    if M == 0 or N == 0:
        return out
    fn = C().matmul_bf16_forward if dt == torch.bfloat16 else C().matmul_forward
    fn(ptr(out), ptr(a), ptr(b), ptr(bias), M, N, K, max(1, a.shape[1]), max(1, b.shape[1]), N,
       bool(trans_a), bool(trans_b), bool(accumulate))
    return out


def matmul_bf16(a, b):
    """a (M, K) bf16, b (N, K) bf16 -> (M, N) fp32 = a @ b.T with fp32 accumulation."""
    check(a, "matmul_bf16 a", torch.bfloat16)
    check(b, "matmul_bf16 b", torch.bfloat16)
    return matmul(a, b)


class _Linear(torch.autograd.Function):
    # Backward uses the kernel's transpose flags on the saved tensors: no transposed copies are made.
    @staticmethod
    def forward(ctx, x, weight, bias):
        K = x.shape[-1]
        x2 = x.reshape(-1, K)                                    # (M, K) view
        y = matmul(x2, weight, bias)                             # (M, N)
        ctx.save_for_backward(x2, weight)
        ctx.has_bias = bias is not None
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x2, weight = ctx.saved_tensors
        N, K = weight.shape
        dy2 = dy.reshape(-1, N).contiguous()                     # (M, N)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = matmul(dy2, weight, trans_b=True).view(*dy.shape[:-1], K)   # (M, K) = dY·W
        if ctx.needs_input_grad[1]:
            dw = matmul(dy2, x2, trans_a=True, trans_b=True)                  # (N, K) = dYᵀ·X
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2.sum(0)
        return dx, dw, db


def linear(x, weight, bias=None):
    """x (..., K) fp32 contiguous, weight (N, K), bias (N) or None -> (..., N) = x @ weight.T (+ bias)."""
    check(x, "linear x")
    if x.dim() == 0:
        raise ValueError("linear x: expected at least 1 dimension")
    check(weight, "linear weight", shape=(None, x.shape[-1]))
    if bias is not None:
        check(bias, "linear bias", shape=(weight.shape[0],))
    return _Linear.apply(x, weight, bias)


# --- matvec and Q8_0 (the C binary's decode path; exposed for tests) ---------------------------------------
def matvec(W, x):
    """W (n, k) fp32, x (k) -> y (n) = W @ x."""
    check(W, "matvec W")
    if W.dim() != 2:
        raise ValueError(f"matvec W: expected 2-D, got {tuple(W.shape)}")
    check(x, "matvec x", shape=(W.shape[1],))
    y = torch.empty(W.shape[0], dtype=torch.float32)
    C().matvec_f32(ptr(y), ptr(W), ptr(x), W.shape[0], W.shape[1])
    return y


def quantize_q8(w, G):
    """w (n, k) fp32, k % G == 0 -> (q (n, k) int8, s (n, k/G) fp32); Q8_0: s = max|w|/127, q = roundf(w/s)."""
    check(w, "quantize_q8 w")
    if w.dim() != 2 or G <= 0 or w.shape[1] % G:
        raise ValueError(f"quantize_q8 w: expected (n, k) with k a multiple of G={G}, got {tuple(w.shape)}")
    n, k = w.shape
    q = torch.empty(n, k, dtype=torch.int8)
    s = torch.empty(n, k // G, dtype=torch.float32)
    C().quantize_q8(ptr(q), ptr(s), ptr(w), n, k, G)
    return q, s


def matvec_q8(wq, ws, x):
    """wq (n, k) int8, ws (n, k/G) fp32, x (k) fp32 -> y (n): x is Q8_0-quantized per group inside the kernel."""
    check(wq, "matvec_q8 wq", torch.int8)
    if wq.dim() != 2:
        raise ValueError(f"matvec_q8 wq: expected 2-D, got {tuple(wq.shape)}")
    n, k = wq.shape
    check(ws, "matvec_q8 ws", shape=(n, None))
    if ws.shape[1] == 0 or k % ws.shape[1]:
        raise ValueError(f"matvec_q8 ws: k={k} is not a multiple of the number of groups {ws.shape[1]}")
    check(x, "matvec_q8 x", shape=(k,))
    y = torch.empty(n, dtype=torch.float32)
    C().matvec_q8(ptr(y), ptr(wq), ptr(ws), ptr(x), n, k, k // ws.shape[1])
    return y
