"""The pyllm model: a Llama-style decoder (RMSNorm, RoPE, GQA, SwiGLU, no biases) with a KV cache and generate().

Parameter names follow HF Llama (without the "model." prefix) so checkpoints map 1:1; see pyllm/checkpoint.py.
Every heavy op goes through a backend table: "pyllm" = the pyllm._C kernels in pyllm.ops where they exist (pyllm.ref
for the rest), "torch" = all pyllm.ref. Try it: python -c "from pyllm.model import GPT; print(GPT.from_preset('d2'))"
"""
from __future__ import annotations

import math
import os
import warnings
from typing import Callable

import torch
import torch.nn as nn

from . import ref
from .config import ModelConfig, preset
from .ops import check_int, check_sample_settings

OP_NAMES = ("rmsnorm", "linear", "attention", "rope", "swiglu", "cross_entropy", "sample", "decode_attention")
BACKENDS = ("pyllm", "torch")


def _check_ids(t, name: str) -> None:
    """Token ids / document ids / targets: an integer tensor (a list was an AttributeError, a float tensor was
    truncated without a word)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of token ids, got {type(t).__name__}")
    if t.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name}: expected an integer tensor (torch.int64), got {t.dtype}")


def check_backend(name) -> None:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose from {list(BACKENDS)}")


def backend_table(name: str, device_type: str = "cpu") -> dict[str, Callable]:
    """The functions a backend runs on a device: ops.<op> where pyllm has a kernel for it, ref.<op> otherwise."""
    check_backend(name)
    table = {n: getattr(ref, n) for n in OP_NAMES}
    if name == "torch":
        return table
    from . import _ext
    if _ext._C is None:
        warnings.warn(f"pyllm._C is not built ({_ext._import_error}); backend 'pyllm' runs the torch references")
        return table
    from . import ops
    # CUDA kernels announce themselves in ops.CUDA_OPS; until then a CUDA model runs the references.
    have = set(OP_NAMES) if device_type == "cpu" else set(getattr(ops, "CUDA_OPS", ()))
    for n in OP_NAMES:
        if n in have and hasattr(ops, n):
            table[n] = getattr(ops, n)
    if device_type == "cpu":
        table["block"] = ops.block   # a whole decoder layer as one autograd node (Block.forward uses it)
        table["decode_block"] = ops.decode_block   # a layer of a no-grad decode step as direct kernel calls
        table["decode_stack"] = ops.DecodeStack    # ...and all layers of generate's decode steps, checked once
    return table


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (max_seq_len, head_dim/2) in fp32, as HF Llama's default rotary embedding computes them."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = torch.arange(max_seq_len, dtype=torch.int64).float()[:, None] * inv_freq[None, :]
    return freqs.cos(), freqs.sin()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))


class Linear(nn.Module):
    """A bias-free projection whose weight (out, in) is named like nn.Linear's (so HF names line up)."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_out, n_in))


class Attention(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        D = c.head_dim
        self.q_proj = Linear(c.dim, c.n_heads * D)
        self.k_proj = Linear(c.dim, c.n_kv_heads * D)
        self.v_proj = Linear(c.dim, c.n_kv_heads * D)
        self.o_proj = Linear(c.n_heads * D, c.dim)


class MLP(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.gate_proj = Linear(c.dim, c.hidden_dim)
        self.up_proj = Linear(c.dim, c.hidden_dim)
        self.down_proj = Linear(c.hidden_dim, c.dim)


class Block(nn.Module):
    """One decoder layer. It runs through its module call (Block.forward), so per-block hooks fire: FSDP2
    groups wrapped around each Block are gathered for exactly its forward and backward."""

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.config = c
        self.input_layernorm = RMSNorm(c.dim, c.norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.dim, c.norm_eps)
        self.mlp = MLP(c)

    def kernel_weights(self) -> tuple:
        """(w_in, wq, wk, wv, wo, w_post, wg, wu, wd): the layer's weights in the order ops.block,
        ops.decode_block and ops.DecodeStack take them."""
        a, m = self.self_attn, self.mlp
        return (self.input_layernorm.weight, a.q_proj.weight, a.k_proj.weight, a.v_proj.weight, a.o_proj.weight,
                self.post_attention_layernorm.weight, m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight)

    def forward(self, o: dict, x, cos, sin, doc_ids=None, cache: KVCache | None = None, layer: int = 0,
                pos: int = 0):
        """x (B, T, C) whose first token sits at position `pos` (an int; with a cache, a (1,) int64 device tensor
        for a one-token decode step: GPT._decode_step); cos/sin (T, D/2) for those positions; o the backend's op
        table (GPT._ops)."""
        c = self.config
        B, T, _ = x.shape
        H, Hkv, D = c.n_heads, c.n_kv_heads, c.head_dim
        a = self.self_attn
        if cache is None and "block" in o and x.dtype == torch.float32:   # pyllm on CPU: the same math, one node
            return o["block"](x.contiguous(), *self.kernel_weights(), cos, sin, doc_ids, H, Hkv, c.norm_eps)
        if (isinstance(pos, torch.Tensor) and "decode_block" in o and x.dtype == torch.float32
                and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")):   # CPU decode step
            return o["decode_block"](x.contiguous(), *self.kernel_weights(), cos, sin, cache.k[layer], cache.v[layer],
                                     pos, H, Hkv, c.norm_eps)
        h = o["rmsnorm"](x, self.input_layernorm.weight, c.norm_eps)
        q = o["linear"](h, a.q_proj.weight).view(B, T, H, D)
        k = o["linear"](h, a.k_proj.weight).view(B, T, Hkv, D)
        v = o["linear"](h, a.v_proj.weight).view(B, T, Hkv, D)
        q, k = o["rope"](q, cos, sin), o["rope"](k, cos, sin)
        if cache is None:
            y = o["attention"](q, k, v, doc_ids)                           # (B, T, H, D)
        elif isinstance(pos, torch.Tensor):   # a decode step (GPT._decode_step): one query, position on the device
            # in the cache's dtype: under autocast (torch backend) v comes out bf16 and index_copy_ refused it
            cache.k[layer].index_copy_(1, pos, k.to(cache.k[layer].dtype))
            cache.v[layer].index_copy_(1, pos, v.to(cache.v[layer].dtype))
            y = o["decode_attention"](q[:, 0].contiguous(), cache.k[layer], cache.v[layer], cache.n_ctx)[:, None]
        elif pos == 0:   # the prompt: plain causal attention over it
            cache.k[layer][:, :T] = k
            cache.v[layer][:, :T] = v
            y = o["attention"](q, k, v, None)
        else:
            raise ValueError("KV cache: a chunk after the prompt goes through GPT._decode_step, one token at a time")
        x = x + o["linear"](y.reshape(B, T, H * D), a.o_proj.weight)
        h = o["rmsnorm"](x, self.post_attention_layernorm.weight, c.norm_eps)
        m = self.mlp
        g = o["swiglu"](o["linear"](h, m.gate_proj.weight), o["linear"](h, m.up_proj.weight))
        return x + o["linear"](g, m.down_proj.weight)


class KVCache:
    """Per-layer key/value buffers (B, T_max, Hkv, D) filled left to right. The next decode position lives on the
    device, pos (1,) int64 with n_ctx = pos + 1 beside it, and a decode step advances both in place: the step reads
    nothing back to the host, so a CUDA graph of it replays as is (GPT.generate)."""

    def __init__(self, c: ModelConfig, B: int, T_max: int, device, dtype):
        shape = (B, T_max, c.n_kv_heads, c.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(c.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(c.n_layers)]
        self.pos = torch.zeros(1, dtype=torch.int64, device=device)     # (1,) where the next token's k/v go
        self.n_ctx = torch.ones(1, dtype=torch.int64, device=device)    # (1,) pos + 1: what decode attention reads

    def seek(self, pos: int) -> None:
        """The next decode step writes position pos (after a prompt of pos tokens)."""
        self.pos.fill_(pos)
        self.n_ctx.fill_(pos + 1)


def _callback_says_stop(r) -> bool:
    """generate's callback result: None / False go on, anything true stops (a tensor(True) or numpy bool was
    ignored: only the object True stopped, so `lambda t: (t == eos).all()` never did)."""
    if r is None:
        return False
    try:
        return bool(r)
    except (RuntimeError, ValueError, TypeError):  # a many-element tensor or array: ambiguous
        raise TypeError(f"generate callback: return True to stop or None/False to go on, got {r!r}") from None


class GPT(nn.Module):
    """Llama-style decoder. forward(idx (B, T)) -> (logits (B, T, V), loss or None)."""

    def __init__(self, config: ModelConfig, backend: str | None = None):
        super().__init__()
        if not isinstance(config, ModelConfig):  # a dict was "'dict' object has no attribute 'vocab_size'"
            raise TypeError(f"GPT: expected a ModelConfig (pyllm.config), got {type(config).__name__}")
        if backend is not None:  # was accepted, then failed at the first forward
            check_backend(backend)
        self.config = c = config
        self.embed_tokens = nn.Embedding(c.vocab_size, c.dim)
        self.layers = nn.ModuleList(Block(c) for _ in range(c.n_layers))
        self.norm = RMSNorm(c.dim, c.norm_eps)
        if not c.tie_embeddings:
            self.lm_head = Linear(c.dim, c.vocab_size)
        cos, sin = rope_tables(c.head_dim, c.max_seq_len, c.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)   # (max_seq_len, D/2)
        self.register_buffer("rope_sin", sin, persistent=False)
        self._backend_name = backend
        self._tables: dict[str, dict] = {}
        self.reset_parameters()

    # --- construction ---------------------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, backend: str | None = None, **overrides) -> "GPT":
        """GPT.from_preset("15M", vocab_size=4096) — any pyllm.config preset with fields overridden."""
        return cls(preset(name, **overrides), backend=backend)

    def reset_parameters(self):
        """normal(0, init_std) everywhere, norms 1, residual output projections scaled by 1/sqrt(2*n_layers)."""
        c = self.config
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name == "norm.weight":
                nn.init.ones_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, 0.0, c.init_std / math.sqrt(2 * c.n_layers))
            else:
                nn.init.normal_(p, 0.0, c.init_std)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.config.tie_embeddings else self.lm_head.weight

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # --- backend --------------------------------------------------------------------------------------------
    @property
    def backend(self) -> str:
        """The backend name; None at construction means "pyllm" (CUDA falls back per op inside backend_table)."""
        return self._backend_name or "pyllm"

    def set_backend(self, name: str) -> "GPT":
        check_backend(name)
        self._backend_name = name
        self._tables = {}
        return self

    def _ops(self, device: torch.device) -> dict[str, Callable]:
        key = device.type
        if key not in self._tables:
            self._tables[key] = backend_table(self.backend, key)
        return self._tables[key]

    # --- forward --------------------------------------------------------------------------------------------
    def _trunk(self, idx, doc_ids=None, cache: KVCache | None = None, pos: int = 0):
        """idx (B, T) -> final-norm hidden states (B, T, C)."""
        _check_ids(idx, "idx")
        if idx.dim() != 2 or idx.numel() == 0:
            raise ValueError(f"idx: expected a non-empty (B, T) tensor, got shape {tuple(idx.shape)}")
        V = self.config.vocab_size
        # else embedding's "index out of range in self"; CPU only: on a GPU the test would sync host and device
        # every forward, and the embedding kernel's own device assert catches it there. A decode step (pos a
        # tensor) feeds back the sampler's tokens, in range by construction: three tensor ops a token saved
        if (idx.device.type == "cpu" and not isinstance(pos, torch.Tensor)
                and bool(((idx < 0) | (idx >= V)).any())):
            bad = idx[(idx < 0) | (idx >= V)][0].item()
            raise ValueError(f"idx: token id {bad} is out of range [0, {V}) (a tokenizer/model vocab mismatch?)")
        B, T = idx.shape
        # a device position (a decode step) is not read back: generate checked the length against max_seq_len
        if not isinstance(pos, torch.Tensor) and pos + T > self.config.max_seq_len:
            raise ValueError(f"sequence of {pos + T} tokens exceeds max_seq_len {self.config.max_seq_len}")
        if doc_ids is not None:
            _check_ids(doc_ids, "doc_ids")  # a float tensor was cast to int32 without a word
            if tuple(doc_ids.shape) != (B, T):
                raise ValueError(f"doc_ids: expected shape {(B, T)}, got {tuple(doc_ids.shape)}")
            if doc_ids.dtype == torch.int64 and doc_ids.numel():
                lo, hi = torch.aminmax(doc_ids)  # one reduction, one read back
                if bool((hi > 2 ** 31 - 1) | (lo < -2 ** 31)):
                    # the kernels compare int32 ids: 5 and 5 + 2^32 (hashed or global ids) became one document.
                    # Renumbered per batch, which keeps exactly which tokens share a document.
                    doc_ids = torch.unique(doc_ids, return_inverse=True)[1]
            doc_ids = doc_ids.to(device=idx.device, dtype=torch.int32).contiguous()
            # One document per row masks nothing beyond causality: drop it on every backend (the masked kernel is
            # ~25% slower at T = 64, and torch then uses SDPA's causal path instead of an explicit mask).
            if cache is None and bool((doc_ids == doc_ids[:, :1]).all()):
                doc_ids = None
        if self.backend == "pyllm" and self.embed_tokens.weight.dtype != torch.float32:
            # else the first kernel's "rmsnorm x: expected dtype torch.float32", which did not say what to do
            raise TypeError(f"GPT: the pyllm kernels run float32 weights, this model's are "
                            f"{self.embed_tokens.weight.dtype}: use model.float() (bf16 matmuls: "
                            f"torch.autocast('cpu', torch.bfloat16)) or model.set_backend('torch')")
        o = self._ops(idx.device)
        x = self.embed_tokens(idx)                                           # (B, T, C)
        if isinstance(pos, torch.Tensor):                                    # (1, D/2) at the device position
            cos, sin = self.rope_cos.index_select(0, pos), self.rope_sin.index_select(0, pos)
        else:
            cos, sin = self.rope_cos[pos:pos + T], self.rope_sin[pos:pos + T]     # (T, D/2)
        for i, blk in enumerate(self.layers):
            x = blk(o, x, cos, sin, doc_ids, cache, i, pos)
        return o["rmsnorm"](x, self.norm.weight, self.config.norm_eps)

    def forward(self, idx, targets=None, doc_ids=None, return_hidden: bool = False):
        """idx (B, T) int64; targets (B, T) with -1 = ignore; doc_ids (B, T) blocks attention across documents.
        -> (logits (B, T, V), loss or None[, hidden (B, T, C) final-norm output])."""
        hidden = self._trunk(idx, doc_ids)
        o = self._ops(idx.device)
        logits = o["linear"](hidden, self.lm_head_weight)                   # (B, T, V)
        loss = None
        if targets is not None:
            _check_ids(targets, "targets")  # float targets were truncated by .long()
            if targets.shape != idx.shape:
                raise ValueError(f"targets: expected shape {tuple(idx.shape)}, got {tuple(targets.shape)}")
            V = logits.shape[-1]
            loss = o["cross_entropy"](logits.reshape(-1, V), targets.reshape(-1).long().contiguous(), -1)
        return (logits, loss, hidden) if return_hidden else (logits, loss)

    def logprobs(self, idx, targets) -> torch.Tensor:
        """Per-token log p(targets[b, t] | idx[b, :t+1]) (B, T), differentiable (RL); ignored (-1) targets give 0."""
        _check_ids(targets, "targets")
        if targets.shape != idx.shape:  # else a broadcast or a gather of the wrong positions
            raise ValueError(f"targets: expected shape {tuple(idx.shape)}, got {tuple(targets.shape)}")
        V = self.config.vocab_size
        if targets.device.type == "cpu" and targets.numel() and bool((targets >= V).any()):
            raise ValueError(f"targets: token id {int(targets.max())} is out of range [0, {V}) (negative = ignored)")
        logits, _ = self.forward(idx)
        logp = torch.log_softmax(logits.float(), dim=-1)
        ignore = targets < 0
        out = logp.gather(-1, targets.clamp(min=0).long()[..., None])[..., 0]
        return out.masked_fill(ignore, 0.0)

    # --- generation -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 min_p: float = 0.0, seed: int | None = None, stop_tokens=(), callback=None,
                 return_logprobs: bool = False, num_samples: int = 1):
        """Sample max_new_tokens after idx (B, T) with a KV cache -> LongTensor (B, T + n_new).
        temperature 0 = greedy. seed None = drawn from torch's global RNG (so torch.manual_seed fixes it).
        stop_tokens: a row that emits one stops (later positions repeat that token); all rows stopped = done.
        callback(tokens (B,)) is called after each step (streaming); returning True stops generation.
        return_logprobs=True also returns the chosen tokens' log-probs (B, n_new) under log_softmax(logits/T).
        num_samples=k: k samples per prompt -> (B*k, T + n_new), row b*k+j = sample j of prompt b (the same rows as
        idx.repeat_interleave(k, 0)), but each prompt is prefilled once and its KV cache copied k times (RL rollouts:
        the prompt is most of the tokens of a short reply)."""
        _check_ids(idx, "idx")
        if idx.dim() != 2 or idx.numel() == 0:
            raise ValueError(f"idx: expected a non-empty (B, T) prompt, got shape {tuple(idx.shape)}")
        num_samples = check_int(num_samples, "num_samples", 1)
        max_new_tokens = check_int(max_new_tokens, "max_new_tokens", 0)
        # the sampling settings up front, whatever the backend and also with nothing to generate
        check_sample_settings(temperature, top_k, top_p, min_p, "generate")
        if seed is not None:
            seed = check_int(seed, "seed", 0, 2 ** 64 - 1)
        if callback is not None and not callable(callback):  # was "'int' object is not callable" after the prompt
            raise TypeError(f"callback: expected a function of the step's tokens, got {callback!r}")
        if isinstance(stop_tokens, (str, bytes)) or not hasattr(stop_tokens, "__iter__"):
            raise TypeError(f"stop_tokens: expected an iterable of token ids, got {stop_tokens!r}")
        stop_tokens = [check_int(s, "stop_tokens", 0) for s in stop_tokens]
        k = num_samples
        B, T = idx.shape
        B *= k
        if T + max_new_tokens > self.config.max_seq_len:
            raise ValueError(f"prompt {T} + max_new_tokens {max_new_tokens} exceeds max_seq_len "
                             f"{self.config.max_seq_len}")
        if max_new_tokens == 0:  # nothing to sample (torch.stack of no log-probs was a RuntimeError)
            seq = idx.repeat_interleave(k, 0) if k > 1 else idx
            return (seq, torch.zeros(B, 0, device=idx.device)) if return_logprobs else seq
        if seed is None:
            seed = int(torch.randint(0, 2 ** 31 - 1, (1,)).item())
        o = self._ops(idx.device)
        p = self.embed_tokens.weight
        cache = KVCache(self.config, B, T + max_new_tokens, p.device, p.dtype)
        stop = torch.tensor(sorted(set(stop_tokens)), dtype=torch.long, device=idx.device)
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        last = torch.zeros(B, dtype=torch.long, device=idx.device)
        out, lps = [idx.repeat_interleave(k, 0) if k > 1 else idx], []
        x, decode = idx, None
        for step in range(max_new_tokens):
            if step == 0:   # the prompt; with k > 1 the B/k distinct prompts, then each of their k rows gets the cache
                pc = KVCache(self.config, B // k, T, p.device, p.dtype) if k > 1 else cache
                h = self._trunk(x, cache=pc, pos=0)[:, -1]                                 # (B/k, C)
                if k > 1:
                    h = h.repeat_interleave(k, 0)
                    for kc, vc, kp, vp in zip(cache.k, cache.v, pc.k, pc.v):
                        kc[:, :T] = kp.repeat_interleave(k, 0)
                        vc[:, :T] = vp.repeat_interleave(k, 0)
                cache.seek(T)
                logits = o["linear"](h.contiguous(), self.lm_head_weight).float().contiguous()  # (B, V)
            else:
                if decode is None:
                    decode = _DecodeRunner(self, cache, x, max_new_tokens - step)
                logits = decode(x)                                                          # (B, V)
            tok, lp = o["sample"](logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                  seed=seed, step=step)
            tok = torch.where(done, last, tok)
            out.append(tok[:, None])
            lps.append(torch.where(done, torch.zeros_like(lp), lp))
            if stop.numel():
                done = done | torch.isin(tok, stop)
                last = tok
            stop_now = _callback_says_stop(callback(tok)) if callback is not None else False
            # done only changes with stop tokens: without them, skip the host sync (the GPU keeps its queue)
            if (stop.numel() and bool(done.all())) or stop_now:
                break
            x = tok[:, None]
        seq = torch.cat(out, dim=1)
        return (seq, torch.stack(lps, dim=1)) if return_logprobs else seq

    def _decode_step(self, tok, cache: KVCache, stack=None) -> torch.Tensor:
        """tok (B, 1) at position cache.pos -> logits (B, V) fp32; writes the cache there and advances cache.pos.
        Nothing is read back to the host, so the step can be captured in a CUDA graph (_DecodeRunner).
        stack: an ops.DecodeStack of this model and cache (CPU): the layers as one call (_DecodeRunner builds it)."""
        o = self._ops(tok.device)
        if stack is not None:
            x = stack(self.embed_tokens(tok), cache.pos)                                    # (B, 1, C)
            h = o["rmsnorm"](x, self.norm.weight, self.config.norm_eps)[:, -1]
        else:
            h = self._trunk(tok, cache=cache, pos=cache.pos)[:, -1]                         # (B, C)
        logits = o["linear"](h.contiguous(), self.lm_head_weight).float()
        cache.pos.add_(1)
        cache.n_ctx.add_(1)
        return logits.contiguous()

    # --- training -------------------------------------------------------------------------------------------
    def configure_optimizer(self, lr: float, weight_decay: float = 0.1, betas=(0.9, 0.95), **kw):
        """AdamW with weight decay on matrices (embeddings included) and none on norms/1-D params."""
        decay = [p for p in self.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.requires_grad and p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), **kw)


class _DecodeRunner:
    """generate's decode steps. On CUDA (outside autocast, PYLLM_CUDA_GRAPHS unset or not "0") and
    with at least GRAPH_MIN_STEPS steps to go, the first step runs eagerly (it also warms up), then one step is
    captured as a CUDA graph and every later step is one replay: one launch from Python instead of ~13 ops per layer
    (the 110M model's eager decode spent ~7 ms of Python against ~0.7 ms of GPU work per token). Elsewhere, and if
    the capture fails (then with a warning), each step runs GPT._decode_step eagerly."""

    GRAPH_MIN_STEPS = 4

    def __init__(self, model: GPT, cache: KVCache, tok: torch.Tensor, steps_left: int):
        self.model, self.cache, self.graph = model, cache, None
        self.first = None
        self.replays = 0
        self.stack = self.cpu_stack(model, cache, tok)
        if not self.wants_graph(tok, steps_left):
            return
        self.tok = tok.clone()                                              # (B, 1) the graph's input
        side = torch.cuda.Stream(tok.device)
        side.wait_stream(torch.cuda.current_stream(tok.device))
        with torch.cuda.stream(side):   # the first step, eager, on a side stream as torch's capture recipe asks
            self.first = model._decode_step(self.tok, cache)
        torch.cuda.current_stream(tok.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):   # recorded, not run: the cache and its position are untouched
                self.logits = model._decode_step(self.tok, cache)
        except RuntimeError as e:
            warnings.warn(f"generate: CUDA graph capture failed ({str(e).splitlines()[0][:200]}); decoding eagerly")
            return
        self.graph = graph

    @staticmethod
    def wants_graph(tok: torch.Tensor, steps_left: int) -> bool:
        return (tok.is_cuda and steps_left >= _DecodeRunner.GRAPH_MIN_STEPS
                and os.environ.get("PYLLM_CUDA_GRAPHS", "1") != "0" and not torch.is_autocast_enabled("cuda"))

    @staticmethod
    def cpu_stack(model: GPT, cache: KVCache, tok: torch.Tensor):
        """An ops.DecodeStack over the model's layers where Block.forward would take decode_block (CPU pyllm, fp32,
        no gradient, no CPU autocast), else None (then each step runs GPT._decode_step layer by layer)."""
        o = model._ops(tok.device)
        p = model.embed_tokens.weight
        if ("decode_stack" not in o or tok.device.type != "cpu" or p.dtype != torch.float32
                or torch.is_grad_enabled() or torch.is_autocast_enabled("cpu")):
            return None
        c = model.config
        return o["decode_stack"]([blk.kernel_weights() for blk in model.layers], cache.k, cache.v, model.rope_cos,
                                 model.rope_sin, cache.k[0].shape[0], c.n_heads, c.n_kv_heads, c.norm_eps)

    def __call__(self, tok: torch.Tensor) -> torch.Tensor:
        """tok (B, 1) -> logits (B, V) of the next position (the graph's output buffer: read it before the next
        call, as generate's sampler does, in stream order)."""
        if self.first is not None:   # the warm-up step already ran with this token
            first, self.first = self.first, None
            return first
        if self.graph is None:
            return self.model._decode_step(tok, self.cache, self.stack)
        self.tok.copy_(tok)
        self.graph.replay()
        self.replays += 1
        return self.logits
