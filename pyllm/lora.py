"""LoRA adapters for pyllm's GPT (used by `pyllm sft|dpo|rl --lora-r R`); see tests/test_lora.py.

An adapter adds (alpha/r) * B @ A to a target weight W (N, K): A (r, K) random, B (N, r) zero, so training starts
at the base model. It is a torch parametrization of `weight`, so it works however the model consumes the weight
(nn.Linear, ops.linear, fused kernels) and the base weight stays frozen. Cost: one (N, r) @ (r, K) per target per
forward, small next to the matmuls it feeds. Adapters save separately in PEFT's layout (adapter_model.safetensors +
adapter_config.json) and merge into the plain weights for every exported checkpoint (`merged_state_dict`).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ALL_TARGETS = DEFAULT_TARGETS + ("lm_head",)
PEFT_PREFIX = "base_model.model."  # PEFT's names for a LlamaForCausalLM: base_model.model.model.layers.0...


class LoRAParam(nn.Module):
    """W (N, K) -> W + scale * B @ A with A (r, K), B (N, r)."""

    def __init__(self, n: int, k: int, r: int, alpha: float):
        super().__init__()
        self.r, self.alpha, self.scale = r, alpha, alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, k))
        self.lora_B = nn.Parameter(torch.zeros(n, r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's init: B = 0 so the delta starts at 0

    def delta(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scale  # (N, K)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w + self.delta().to(w.dtype)


def parse_targets(spec: str | list | tuple | None) -> tuple[str, ...]:
    """'q_proj,v_proj' | 'all-linear' | None (= attention + MLP projections) -> names; unknown names fail."""
    if spec is None or spec == "" or spec == "default":
        return DEFAULT_TARGETS
    if isinstance(spec, str):
        if spec == "all-linear":
            return DEFAULT_TARGETS
        spec = [s.strip() for s in spec.split(",") if s.strip()]
    if not isinstance(spec, (list, tuple)) or not all(isinstance(s, str) for s in spec):  # 5: "not iterable"
        raise TypeError(f"--lora-targets: expected module names (a str or a list of str), got {spec!r}")
    bad = [s for s in spec if s not in ALL_TARGETS]
    if bad:
        raise ValueError(f"--lora-targets: unknown module(s) {bad}; choose from {', '.join(ALL_TARGETS)}")
    return tuple(spec)


def _targets_in(model: nn.Module, targets) -> list[tuple[str, nn.Module]]:
    out = []
    for name, mod in model.named_modules():
        if name.rsplit(".", 1)[-1] in targets and isinstance(getattr(mod, "weight", None), torch.Tensor) \
                and mod.weight.dim() == 2:
            out.append((name, mod))
    return out


def apply_lora(model: nn.Module, r: int, alpha: float | None = None, targets=None, verbose: bool = True) -> int:
    """Freeze every parameter of `model`, add trainable adapters on the target modules; returns trainable count."""
    from .ops import check_float, check_int
    r = check_int(r, "--lora-r", 1)
    alpha = check_float(alpha if alpha is not None else 2 * r, "--lora-alpha", 0.0, lo_open=True)
    if has_lora(model):  # a second call stacked adapters that the saved adapter / merged weights then dropped
        raise ValueError("LoRA: the model already has adapters (merge or remove them before adding others)")
    targets = parse_targets(targets)
    found = _targets_in(model, targets)
    if not found:
        raise ValueError(f"LoRA: no module named {list(targets)} with a 2-D weight in the model")
    name, mod = min(found, key=lambda f: min(f[1].weight.shape))
    if r > min(mod.weight.shape):  # B @ A has rank <= min(N, K) whatever r is; a huge r was a 256 GiB allocation's
        # RuntimeError traceback (torch's "can't allocate memory")
        raise ValueError(f"--lora-r must be <= {min(mod.weight.shape)}, the full rank of the smallest target "
                         f"({name}: {tuple(mod.weight.shape)[0]}x{tuple(mod.weight.shape)[1]}), got {r}")
    for p in model.parameters():
        p.requires_grad_(False)
    for _, mod in found:
        w = mod.weight
        lp = LoRAParam(w.shape[0], w.shape[1], r, alpha).to(device=w.device, dtype=torch.float32)
        parametrize.register_parametrization(mod, "weight", lp)
    model._lora_config = {"r": r, "lora_alpha": alpha, "target_modules": list(targets)}
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if verbose:
        n_all = sum(p.numel() for p in model.parameters())
        print(f"lora: r={r} alpha={alpha:g} on {len(found)} modules ({', '.join(targets)}): "
              f"trainable params {n_train:,} of {n_all:,} ({100.0 * n_train / max(n_all, 1):.2f}%)")
    return n_train


def has_lora(model: nn.Module) -> bool:
    return getattr(model, "_lora_config", None) is not None


def _lora_modules(model: nn.Module):
    """(clean weight name, LoRAParam) for every adapted weight."""
    for name, mod in model.named_modules():
        if parametrize.is_parametrized(mod, "weight"):
            for p in mod.parametrizations.weight:
                if isinstance(p, LoRAParam):
                    yield (f"{name}.weight" if name else "weight"), p


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """PEFT names: base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight (lm_head without 'model.')."""
    sd = {}
    for wname, p in _lora_modules(model):
        mod = wname[: -len(".weight")]
        full = PEFT_PREFIX + (mod if mod.startswith("lm_head") else "model." + mod)
        sd[f"{full}.lora_A.weight"] = p.lora_A.detach().cpu().contiguous()
        sd[f"{full}.lora_B.weight"] = p.lora_B.detach().cpu().contiguous()
    return sd


def load_adapter_state(model: nn.Module, sd: dict[str, torch.Tensor], source: str = "adapter") -> None:
    want = adapter_state_dict(model)
    missing = sorted(set(want) - set(sd))
    if missing:
        raise ValueError(f"{source}: adapter tensors missing, e.g. {missing[0]} (different --lora-targets?)")
    # an adapter the config does not name was dropped without a word (a model other than the one trained), an
    # integer tensor copied in as its truncated values
    extra = sorted(set(sd) - set(want))
    if extra:
        raise ValueError(f"{source}: unexpected adapter tensor {extra[0]} (adapter_config.json's target_modules do "
                         f"not name it)")
    bad = next((k for k, t in sd.items() if not t.is_floating_point()), None)
    if bad is not None:
        raise ValueError(f"{source}: adapter tensor {bad} has dtype {sd[bad].dtype}, expected a float tensor")
    with torch.no_grad():
        for wname, p in _lora_modules(model):
            mod = wname[: -len(".weight")]
            full = PEFT_PREFIX + (mod if mod.startswith("lm_head") else "model." + mod)
            for k, t in (("lora_A", p.lora_A), ("lora_B", p.lora_B)):
                src = sd[f"{full}.{k}.weight"]
                if src.shape != t.shape:
                    raise ValueError(f"{source}: {full}.{k} has shape {tuple(src.shape)}, model wants "
                                     f"{tuple(t.shape)} (different --lora-r?)")
                t.copy_(src)


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's plain state dict (base names) with every adapter folded in: W + scale * B @ A."""
    out = {}
    sd = model.state_dict()
    with torch.no_grad():
        deltas = {w: p.delta() for w, p in _lora_modules(model)}
    for k, v in sd.items():
        if ".parametrizations." in k:
            if not k.endswith(".parametrizations.weight.original"):
                continue  # the adapters themselves
            wname = k.replace(".parametrizations.weight.original", ".weight")
            v = v + deltas[wname].to(v.dtype)
            k = wname
        out[k] = v.detach()
    return out


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold the adapters into the weights in place and remove them; the model is a plain GPT again."""
    for name, mod in list(model.named_modules()):
        if parametrize.is_parametrized(mod, "weight"):
            # torch deletes the `weight` property from the module's generated Parametrized* class, which a
            # copy.deepcopy of the model shares with the original: the original lost its weights. Remove it from
            # a class of this module's own.
            cls = type(mod)
            mod.__class__ = type(cls.__name__, cls.__bases__,
                                 {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")})
            parametrize.remove_parametrizations(mod, "weight", leave_parametrized=True)
    model._lora_config = None
    for p in model.parameters():
        p.requires_grad_(True)
    return model


ADAPTER_FILE = "adapter_model.safetensors"  # PEFT's SAFETENSORS_WEIGHTS_NAME (PeftModel.from_pretrained reads it)
OLD_ADAPTER_FILE = "adapter.safetensors"      # what pyllm wrote before session 30: still read


def save_adapter(out_dir, model: nn.Module, base_model: str | None = None) -> None:
    """adapter_model.safetensors + adapter_config.json (PEFT names and fields), each written atomically."""
    from .safetensors_io import save_file
    if not has_lora(model):  # was an AttributeError after an empty adapter file had been written
        raise ValueError("save_adapter: the model has no LoRA adapters (apply_lora first)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state_dict(model), str(out_dir / ADAPTER_FILE))
    cfg = dict(peft_type="LORA", task_type="CAUSAL_LM", bias="none", lora_dropout=0.0,
               base_model_name_or_path=base_model, **model._lora_config)
    tmp = out_dir / "adapter_config.json.tmp"
    tmp.write_text(json.dumps(cfg, indent=2) + "\n")
    os.replace(tmp, out_dir / "adapter_config.json")


def load_adapter(model: nn.Module, adapter_dir, verbose: bool = False, r: int | None = None) -> nn.Module:
    """Add adapters as adapter_config.json describes and load adapter_model.safetensors into them. r: the rank the
    caller asked for (--lora-r on --resume); a saved rank that differs is an error, not silently kept."""
    from .safetensors_io import load_file
    adapter_dir = Path(adapter_dir)
    cfg_path = adapter_dir / "adapter_config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{cfg_path}: no adapter config")
    from .data import read_json
    cfg = read_json(cfg_path, "invalid JSON")
    if not isinstance(cfg, dict) or not {"r", "lora_alpha", "target_modules"} <= set(cfg):
        raise ValueError(f"{cfg_path}: expected an object with r, lora_alpha and target_modules")
    if r is not None and cfg["r"] != r:
        raise ValueError(f"{cfg_path}: the adapters being resumed have r={cfg['r']}, not --lora-r {r}")
    # the values as saved, not int()/float() of them: a lora_alpha of null or a list was float()'s TypeError
    # traceback, true a silent alpha of 1 (a rescaled adapter); target_modules 5 parse_targets' TypeError traceback.
    # null is no value here (apply_lora would read it as "the default 2 * r", not the alpha the adapters trained with)
    if cfg["lora_alpha"] is None:
        raise ValueError(f"{cfg_path}: lora_alpha is null, expected the number the adapters were trained with")
    try:
        apply_lora(model, cfg["r"], cfg["lora_alpha"], cfg["target_modules"], verbose=verbose)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{cfg_path}: {e}") from None
    f = adapter_dir / ADAPTER_FILE
    if not f.exists() and (adapter_dir / OLD_ADAPTER_FILE).exists():
        f = adapter_dir / OLD_ADAPTER_FILE
    load_adapter_state(model, load_file(str(f)), str(f))
    return model
