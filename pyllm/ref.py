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


def attention_mask(T: int, doc_ids: torch.Tensor | None, device=None) -> torch.Tensor:
    """Bool mask of allowed (query i, key j) pairs: (T, T) causal, or (B, 1, T, T) causal & same document."""
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    if doc_ids is None:
        return causal
    same = doc_ids[:, :, None] == doc_ids[:, None, :]  # (B, T, T)
    return (same & causal)[:, None]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention. q (B, T, H, D), k/v (B, T, Hkv, D), doc_ids (B, T) int or None -> (B, T, H, D)."""
    H, Hkv = q.shape[2], k.shape[2]
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, D)
    if H != Hkv:
        kt, vt = kt.repeat_interleave(H // Hkv, dim=1), vt.repeat_interleave(H // Hkv, dim=1)
    if doc_ids is None:
        out = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
    else:
        mask = attention_mask(q.shape[1], doc_ids, q.device)
        out = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask)
    return out.transpose(1, 2)


def attention_lse(q: torch.Tensor, k: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """log-sum-exp of each query row's scaled, masked scores: (B, H, T) (what the kernel saves for backward)."""
    H, Hkv, T, D = q.shape[2], k.shape[2], q.shape[1], q.shape[3]
    kt = k.transpose(1, 2).repeat_interleave(H // Hkv, dim=1)
    s = q.transpose(1, 2) @ kt.transpose(-1, -2) / D ** 0.5  # (B, H, T, T)
    return s.masked_fill(~attention_mask(T, doc_ids, q.device), float("-inf")).logsumexp(-1)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, n_ctx: int) -> torch.Tensor:
    """q (B, H, D) attends to cache positions [0, n_ctx) of k/v_cache (B, T_max, Hkv, D) -> (B, H, D)."""
    H, Hkv = q.shape[1], k_cache.shape[2]
    k = k_cache[:, :n_ctx].transpose(1, 2).repeat_interleave(H // Hkv, dim=1)  # (B, H, n_ctx, D)
    v = v_cache[:, :n_ctx].transpose(1, 2).repeat_interleave(H // Hkv, dim=1)
    return torch.nn.functional.scaled_dot_product_attention(q[:, :, None], k, v)[:, :, 0]
