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


# --- sampling ---------------------------------------------------------------------------------------------
def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
           mask: torch.Tensor | None = None, seed: int = 0, step: int = 0):
    """Draw one token per row. logits (B, V) fp32; mask (B, V) bool of ALLOWED tokens or None.
    temperature 0 = greedy. Filters in HF order: mask, temperature, top-k, top-p, min-p.
    The draw is a pure function of (seed, row, step): same seed -> same tokens on every CPU path.
    Returns (tokens (B,) int64, logprobs (B,) fp32) with logprob = log_softmax(logits / T)[token] (T = 1 if greedy)."""
    check(logits, "sample logits")
    if logits.dim() != 2 or logits.numel() == 0:
        raise ValueError(f"sample logits: expected a non-empty (B, V) tensor, got shape {tuple(logits.shape)}")
    B, V = logits.shape
    if mask is not None:
        check(mask, "sample mask", dtype=torch.bool, shape=(B, V))
    if not temperature >= 0:
        raise ValueError(f"sample: temperature must be >= 0, got {temperature}")
    if int(top_k) < 0:
        raise ValueError(f"sample: top_k must be >= 0 (0 = off), got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"sample: top_p must be in (0, 1], got {top_p}")
    if not 0 <= min_p <= 1:
        raise ValueError(f"sample: min_p must be in [0, 1], got {min_p}")
    tokens = torch.empty(B, dtype=torch.int64)
    logprobs = torch.empty(B, dtype=torch.float32)
    C().sample_forward(ptr(tokens), ptr(logprobs), ptr(logits), ptr(mask), B, V, float(temperature), int(top_k),
                       float(top_p), float(min_p), int(seed) & (2**64 - 1), int(step) & (2**64 - 1))
    bad = tokens < 0
    if bool(bad.any()):
        b = int(bad.nonzero()[0, 0])
        code = int(tokens[b])
        why = {-1: "no allowed token (the mask or -inf logits remove every token)",
               -2: "NaN or +inf in the logits"}.get(code, "out of memory for the scratch buffers")
        raise ValueError(f"sample: row {b}: {why}")
    return tokens, logprobs
