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


# --- attention (csrc/cpu/impl_attention.h) ------------------------------------------------------------------
def _check_attention(q, k, v, doc_ids):
    check(q, "attention q")
    if q.dim() != 4:
        raise ValueError(f"attention q: expected shape (B, T, H, D), got {tuple(q.shape)}")
    B, T, H, D = q.shape
    check(k, "attention k")
    if k.dim() != 4:
        raise ValueError(f"attention k: expected shape (B, T, Hkv, D), got {tuple(k.shape)}")
    Hkv = k.shape[2]
    check(k, "attention k", shape=(B, T, Hkv, D))
    check(v, "attention v", shape=(B, T, Hkv, D))
    if min(B, T, H, D, Hkv) == 0:
        raise ValueError(f"attention q: empty tensor of shape {tuple(q.shape)}")
    if H % Hkv != 0:
        raise ValueError(f"attention k: {H} query heads is not a multiple of {Hkv} kv heads")
    if D > 256:
        raise ValueError(f"attention q: head dim {D} > 256 is not supported")
    if doc_ids is not None:
        check(doc_ids, "attention doc_ids", dtype=torch.int32, shape=(B, T))
    return B, T, H, Hkv, D


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, doc_ids):
        B, T, H, Hkv, D = _check_attention(q, k, v, doc_ids)
        out = torch.empty_like(q)
        lse = torch.empty(B, H, T, dtype=torch.float32)
        C().attention_forward(ptr(out), ptr(lse), ptr(q), ptr(k), ptr(v), ptr(doc_ids), B, T, H, Hkv, D)
        ctx.save_for_backward(q, k, v, out, lse, doc_ids)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, doc_ids = ctx.saved_tensors
        B, T, H, D = q.shape
        Hkv = k.shape[2]
        dout = dout.contiguous()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        C().attention_backward(ptr(dq), ptr(dk), ptr(dv), ptr(dout), ptr(out), ptr(lse), ptr(q), ptr(k), ptr(v),
                               ptr(doc_ids), B, T, H, Hkv, D)
        return dq, dk, dv, None


def attention_with_lse(q, k, v, doc_ids=None):
    """Like attention() but also returns lse (B, H, T): log-sum-exp of each query row's scaled scores."""
    return _Attention.apply(q, k, v, doc_ids)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention, scale 1/sqrt(D). q (B, T, H, D), k/v (B, T, Hkv, D) fp32 contiguous, H % Hkv == 0;
    doc_ids (B, T) int32 or None: token i attends to j only if j <= i and both are in the same document.
    -> (B, T, H, D). Differentiable in q, k, v (flash-attention backward; T x T is never stored)."""
    return _Attention.apply(q, k, v, doc_ids)[0]


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, n_ctx: int) -> torch.Tensor:
    """One query per sequence over cache positions [0, n_ctx). q (B, H, D); k_cache/v_cache (B, T_max, Hkv, D)
    fp32 whose last two dims are contiguous (a slice of a bigger cache is fine) -> (B, H, D). No autograd."""
    check(q, "decode_attention q")
    if q.dim() != 3:
        raise ValueError(f"decode_attention q: expected shape (B, H, D), got {tuple(q.shape)}")
    B, H, D = q.shape
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.device.type != "cpu":
            raise TypeError(f"decode_attention {name}: expected a float32 cpu tensor")
        if t.dim() != 4 or t.shape[0] != B or t.shape[3] != D:
            raise ValueError(f"decode_attention {name}: expected shape ({B}, T_max, Hkv, {D}), got {tuple(t.shape)}")
        if t.stride(3) != 1 or t.stride(2) != D:
            raise ValueError(f"decode_attention {name}: its last two dims (Hkv, D) must be contiguous")
    if k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride():
        raise ValueError("decode_attention v_cache: must have the same shape and strides as k_cache")
    T_max, Hkv = k_cache.shape[1], k_cache.shape[2]
    if min(B, H, D) == 0 or H % Hkv != 0 or D > 256:
        raise ValueError(f"decode_attention q: bad shape {tuple(q.shape)} for {Hkv} kv heads (H % Hkv, D <= 256)")
    n_ctx = int(n_ctx)
    if not 1 <= n_ctx <= T_max:
        raise ValueError(f"decode_attention n_ctx: must be in [1, {T_max}], got {n_ctx}")
    out = torch.empty_like(q)
    C().decode_attention(ptr(out), ptr(q), ptr(k_cache), ptr(v_cache), k_cache.stride(0), k_cache.stride(1), B, H, Hkv, D, n_ctx)
    return out


# === CUDA section (cuda helper). Keep it LAST in this file: it wraps the op functions defined above so that
# CUDA tensors go to pyllm/ops_cuda.py and everything else to the unchanged CPU code (or to ref.<op> where no CPU
# kernel exists yet). tests/test_cuda.py checks that every name in CUDA_OPS is wrapped. ===
def _cuda_dispatch(name: str):
    cpu_fn = globals().get(name)

    def fn(*args, **kwargs):
        first = args[0] if args else next(iter(kwargs.values()))
        if isinstance(first, torch.Tensor) and first.is_cuda:
            from . import ops_cuda
            ops_cuda.require_built(name)
            return getattr(ops_cuda, name)(*args, **kwargs)
        if cpu_fn is not None:
            return cpu_fn(*args, **kwargs)
        from . import ref
        return getattr(ref, name)(*args, **kwargs)

    fn.__name__ = name
    fn.__doc__ = (cpu_fn.__doc__ if cpu_fn is not None else f"ref.{name} on CPU") + " (CUDA: pyllm.ops_cuda)"
    fn._pyllm_cuda_dispatch = True
    fn._pyllm_cpu_fn = cpu_fn
    return fn


def _cuda_ops() -> tuple:
    from . import ops_cuda
    return ops_cuda.NAMES if ops_cuda.available() else ()


CUDA_OPS = _cuda_ops()  # ops with CUDA kernels in this build (empty when built without CUDA)
for _name in ("rmsnorm", "linear", "attention", "rope", "swiglu", "cross_entropy", "sample", "decode_attention"):
    globals()[_name] = _cuda_dispatch(_name)
del _name
