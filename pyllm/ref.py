"""Plain-PyTorch references for every pyllm kernel: the tests and benchmarks compare against these."""
from __future__ import annotations

import math

import torch


def up(t: torch.Tensor) -> torch.Tensor:
    """Half types compute in fp32; fp32 and fp64 stay as they are (float64 gradchecks stay exact)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (..., C), weight (C) -> (..., C)."""
    xf = up(x)
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * up(weight)).to(x.dtype)


def sample_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 min_p: float = 0.0, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The truncated, renormalised distribution sample() draws from, (B, V), via the sort-based recipe.
    Order as HF transformers' warpers: mask, temperature, top-k, top-p (on the top-k distribution), min-p."""
    x = up(logits).double()
    if mask is not None:
        x = x.masked_fill(~mask, float("-inf"))
    if temperature == 0:
        return torch.nn.functional.one_hot(x.argmax(-1), x.shape[-1]).double()
    x = x / temperature
    V = x.shape[-1]
    # stable sort, descending: ties rank the lower id first (the kernel's order)
    sx, idx = torch.sort(x, dim=-1, descending=True, stable=True)
    keep = torch.ones_like(sx, dtype=torch.bool)
    if 0 < top_k < V:
        keep[:, top_k:] = False
    sx = sx.masked_fill(~keep, float("-inf"))
    if top_p < 1.0:
        p = torch.softmax(sx, -1)
        before = torch.cumsum(p, -1) - p          # mass ranked strictly before each token
        keep &= before < top_p                    # smallest prefix whose mass reaches top_p
        sx = sx.masked_fill(~keep, float("-inf"))
    if min_p > 0.0:
        p = torch.softmax(sx, -1)
        keep &= p >= min_p * p[:, :1]
        sx = sx.masked_fill(~keep, float("-inf"))
    probs = torch.zeros_like(x).scatter_(-1, idx, torch.softmax(sx, -1))
    return probs


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
           mask: torch.Tensor | None = None, seed: int = 0, step: int = 0):
    """Reference sampler: sort-based recipe + torch.multinomial with a torch.Generator seeded from (seed, step).
    Same distribution as ops.sample, not the same tokens. Returns (tokens (B,) int64, logprobs (B,) fp32)."""
    probs = sample_probs(logits, temperature, top_k, top_p, min_p, mask)
    if temperature == 0:
        tokens = probs.argmax(-1)
    else:
        g = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(step)) % (2**63))
        tokens = torch.multinomial(probs, 1, generator=g).squeeze(-1)
    T = temperature if temperature > 0 else 1.0
    logprobs = torch.log_softmax(up(logits) / T, -1).gather(-1, tokens[:, None]).squeeze(-1)
    return tokens, logprobs.float()


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF rotate-half RoPE. x (B, T, H, D); cos/sin (T, D/2) -> (B, T, H, D)."""
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up."""
    return torch.nn.functional.silu(gate) * up


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -1) -> torch.Tensor:
    """Mean CE over non-ignored targets; 0 (with a zero gradient) when every target is ignored."""
    if bool((targets == ignore_index).all()):
        return up(logits).sum() * 0.0
    return torch.nn.functional.cross_entropy(up(logits), targets, ignore_index=ignore_index)


def adamw_step(params, grads, ms, vs, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
               step: int) -> None:
    """One AdamW step in place, written out as torch.optim.AdamW does it (decoupled decay, bias correction)."""
    with torch.no_grad():
        for p, g, m, v in zip(params, grads, ms, vs):
            p.mul_(1 - lr * weight_decay)
            m.mul_(beta1).add_(g, alpha=1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (v.sqrt() / math.sqrt(1 - beta2 ** step)).add_(eps)
            p.addcdiv_(m, denom, value=-lr / (1 - beta1 ** step))
