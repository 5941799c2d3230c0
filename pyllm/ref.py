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
# === model-helper section: references the model needs until (or alongside) the kernel owners' versions ===
# Signatures are exactly CONTRACT.md's. They are bound with setdefault at the end of this section, so a kernel
# owner's own ref.<op> (defined anywhere in this file, before or after) wins and merges need no edits here.
import torch.nn.functional as F  # noqa: E402


def _fallback_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (..., K), weight (N, K) -> (..., N) = x @ weight.T."""
    return F.linear(x, weight)


def _fallback_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF rotate-half RoPE. x (B, T, H, D), cos/sin (T, D/2) -> (B, T, H, D)."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    c, s = cos[:, None, :], sin[:, None, :]           # (T, 1, D/2) broadcast over heads
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


def _fallback_swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, same shapes."""
    return F.silu(gate) * up


def _fallback_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -1) -> torch.Tensor:
    """logits (N, V), targets (N) -> mean CE over non-ignored targets (0, still differentiable, if none)."""
    if bool((targets == ignore_index).all()):
        return logits.sum() * 0.0
    return F.cross_entropy(up(logits), targets, ignore_index=ignore_index)


def _fallback_sample(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                     min_p: float = 0.0, mask: torch.Tensor | None = None, seed: int = 0, step: int = 0):
    """logits (B, V) -> (tokens (B,) int64, logprobs (B,) fp32). Greedy at temperature 0. mask (B, V) True = allowed.
    Each row draws from its own torch.Generator seeded from (seed, row, step), so rows and steps are independent
    and reproducible (not bit-identical to the C kernel's counter RNG; the tests compare distributions there)."""
    logits = up(logits)
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    T = float(temperature) if temperature > 0 else 1.0
    logp_full = torch.log_softmax(logits / T, dim=-1)               # (B, V) before truncation
    if temperature <= 0:
        tok = logits.argmax(dim=-1)
        return tok, logp_full.gather(1, tok[:, None])[:, 0].float()
    probs = logp_full.exp()
    V = probs.shape[-1]
    if top_k and 0 < top_k < V:
        kth = probs.topk(top_k, dim=-1).values[:, -1:]
        probs = probs.masked_fill(probs < kth, 0.0)
    if min_p > 0.0:
        probs = probs.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, 0.0)
    if top_p < 1.0:
        sp, si = probs.sort(dim=-1, descending=True)
        cum = sp.cumsum(-1) / sp.sum(-1, keepdim=True)
        drop = (cum - sp / sp.sum(-1, keepdim=True)) >= top_p   # keep the smallest prefix reaching top_p
        probs = probs.scatter(1, si, sp.masked_fill(drop, 0.0))
    toks = []
    for b in range(probs.shape[0]):
        g = torch.Generator(device="cpu").manual_seed(
            (int(seed) * 1000003 + b * 7919 + int(step) * 104729 + 12345) % (2 ** 63))
        toks.append(torch.multinomial(probs[b].float().cpu(), 1, generator=g))
    tok = torch.cat(toks).to(logits.device)
    return tok, logp_full.gather(1, tok[:, None])[:, 0].float()


for _name in ("linear", "rope", "swiglu", "cross_entropy", "sample"):
    globals().setdefault(_name, globals()["_fallback_" + _name])
del _name


# === attention (attn-helper section) ===
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
