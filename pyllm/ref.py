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


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, n_ctx) -> torch.Tensor:
    """q (B, H, D) attends to cache positions [0, n_ctx) of k/v_cache (B, T_max, Hkv, D) -> (B, H, D).
    n_ctx an int, or a 1-element tensor: read on the host on CPU; on a GPU the whole cache is read under a mask
    instead (decode_attention_masked: no host sync, so a CUDA graph can capture it)."""
    if isinstance(n_ctx, torch.Tensor):
        if n_ctx.device.type != "cpu":
            return decode_attention_masked(q, k_cache, v_cache, n_ctx)
        n_ctx = int(n_ctx)
    H, Hkv = q.shape[1], k_cache.shape[2]
    k = k_cache[:, :n_ctx].transpose(1, 2).repeat_interleave(H // Hkv, dim=1)  # (B, H, n_ctx, D)
    v = v_cache[:, :n_ctx].transpose(1, 2).repeat_interleave(H // Hkv, dim=1)
    return torch.nn.functional.scaled_dot_product_attention(q[:, :, None], k, v)[:, :, 0]


def decode_attention_masked(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            n_ctx: torch.Tensor) -> torch.Tensor:
    """decode_attention over the whole cache with positions >= n_ctx (a 1-element tensor) masked out."""
    H, Hkv = q.shape[1], k_cache.shape[2]
    mask = (torch.arange(k_cache.shape[1], device=q.device) < n_ctx.reshape(()))[None]   # (1, T_max) True: attend
    k = k_cache.transpose(1, 2).repeat_interleave(H // Hkv, dim=1)                    # (B, H, T_max, D)
    v = v_cache.transpose(1, 2).repeat_interleave(H // Hkv, dim=1)
    return torch.nn.functional.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=mask)[:, :, 0]
