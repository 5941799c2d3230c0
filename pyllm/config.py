"""The one model config dataclass and its named presets (llama2.c shapes, nanochat-style --depth family)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass


# the largest sizes pyllm-run's loader accepts (csrc/model_file.c MAX_*)
MAX_SIZES = {"vocab_size": 1 << 24, "dim": 1 << 16, "n_layers": 1024, "hidden_dim": 1 << 18, "max_seq_len": 1 << 20}


def llama_hidden_dim(dim: int, multiple_of: int = 32) -> int:
    """SwiGLU width as Llama/llama2.c size it: 2/3 of 4*dim, rounded up to a multiple."""
    hidden = int(2 * 4 * dim / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@dataclass
class ModelConfig:
    """A Llama-style decoder: RMSNorm, RoPE (HF rotate-half layout), SwiGLU, grouped-query attention, no biases."""
    vocab_size: int = 512
    dim: int = 64                 # model width (HF hidden_size)
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int | None = None  # None = n_heads (plain multi-head attention)
    hidden_dim: int | None = None  # SwiGLU width; None = llama_hidden_dim(dim)
    max_seq_len: int = 256
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    init_std: float = 0.02

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.hidden_dim is None:
            self.hidden_dim = llama_hidden_dim(self.dim)
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "max_seq_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {v!r}")
            if v > MAX_SIZES.get(name, v):  # before anything is built from it (10^9 positions: a 32 GB RoPE table)
                raise ValueError(f"ModelConfig.{name} must be <= {MAX_SIZES[name]} (pyllm-run's limit), got {v}")
        if self.dim % self.n_heads:
            raise ValueError(f"ModelConfig: dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"ModelConfig: n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig: head_dim {self.head_dim} must be even for RoPE")
        if not isinstance(self.tie_embeddings, bool):  # 'no' is truthy: a tied model was built
            raise ValueError(f"ModelConfig.tie_embeddings must be True or False, got {self.tie_embeddings!r}")
        # the ranges pyllm-run's loader accepts (csrc/model_file.c): a config it would reject must not train
        for name, ok, want in (("norm_eps", lambda v: 0 < v < 1, "a number in (0, 1)"),
                               ("rope_theta", lambda v: 0 < v < math.inf, "a positive finite number"),
                               ("init_std", lambda v: 0 <= v < math.inf, "a finite number >= 0")):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not ok(v):
                raise ValueError(f"ModelConfig.{name} must be {want}, got {v!r}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"{source}: unknown ModelConfig field(s) {unknown}")
        return cls(**d)

    def num_params(self, embeddings: bool = True) -> int:
        c = self
        kv = c.n_kv_heads * c.head_dim
        per_layer = c.dim * (c.dim + 2 * kv + c.dim) + 3 * c.dim * c.hidden_dim + 2 * c.dim
        n = c.n_layers * per_layer + c.dim
        if embeddings:
            n += c.vocab_size * c.dim * (1 if c.tie_embeddings else 2)
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (6N plus attention), as nanoGPT/nanochat count them for MFU."""
        T = seq_len or self.max_seq_len
        return 6 * self.num_params(embeddings=False) + 6 * self.vocab_size * self.dim + 12 * self.n_layers * self.dim * T


# llama2.c's trained shapes (stories260K uses its own 512-token vocab; the others Llama 2's 32000).
# llama2.c ties the classifier to the token embedding; with tying the param counts are its 260K/15M/42M/110M.
PRESETS: dict[str, dict] = {
    "260K": dict(dim=64, n_layers=5, n_heads=8, n_kv_heads=4, hidden_dim=172, vocab_size=512, max_seq_len=512,
                 tie_embeddings=True),
    "15M": dict(dim=288, n_layers=6, n_heads=6, n_kv_heads=6, hidden_dim=768, vocab_size=32000, max_seq_len=256,
                tie_embeddings=True),
    "42M": dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=8, hidden_dim=1376, vocab_size=32000, max_seq_len=1024,
                tie_embeddings=True),
    "110M": dict(dim=768, n_layers=12, n_heads=12, n_kv_heads=12, hidden_dim=2048, vocab_size=32000,
                 max_seq_len=1024, tie_embeddings=True),
}


def depth_config(depth: int, vocab_size: int = 8192, max_seq_len: int = 1024, **overrides) -> ModelConfig:
    """nanochat's family: width 64*depth, heads of 128 channels (64 when the width is narrower)."""
    if depth <= 0:
        raise ValueError(f"depth must be positive, got {depth}")
    dim = 64 * depth
    head = 128 if dim >= 256 else 64
    n_heads = max(1, dim // head)
    kw = dict(vocab_size=vocab_size, dim=dim, n_layers=depth, n_heads=n_heads, n_kv_heads=n_heads,
              max_seq_len=max_seq_len)
    kw.update(overrides)
    return ModelConfig(**kw)


def preset(name: str, **overrides) -> ModelConfig:
    """A named preset ("15M", "d4", ...) with fields overridden, e.g. preset("15M", vocab_size=4096)."""
    if not isinstance(name, str):  # preset(15) was "'int' object has no attribute 'startswith'"
        raise TypeError(f"preset: expected a name like '15M' or 'd6', got {name!r}")
    if name.startswith("d") and name[1:].isdigit():
        return depth_config(int(name[1:]), **overrides)
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)} or d<depth> (e.g. d6)")
    kw = dict(PRESETS[name])
    kw.update(overrides)
    return ModelConfig(**kw)
