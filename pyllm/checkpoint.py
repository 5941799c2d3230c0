"""Checkpoints as Hugging Face Llama directories: model.safetensors + config.json + generation_config.json
(+ tokenizer.json). transformers.LlamaForCausalLM.from_pretrained(dir) loads what save_checkpoint writes, and
load_checkpoint reads what LlamaForCausalLM.save_pretrained writes. Writes are atomic per directory.
Usage: save_checkpoint("out/ckpt", model, tokenizer); model, tok = load_checkpoint("out/ckpt")
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
from pathlib import Path
from typing import Callable

import torch

from . import safetensors_io
from .config import ModelConfig
from .model import GPT

WEIGHTS, CONFIG, GEN_CONFIG, TOKENIZER = "model.safetensors", "config.json", "generation_config.json", "tokenizer.json"
FORMAT_VERSION = 1

# HF Llama config keys we read (or know to be harmless: bookkeeping, inference/training switches with no effect on
# the weights' meaning). Anything else is rejected: silently ignoring an unknown setting could change the model.
HF_KEYS = {
    "architectures", "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_parameters",
    "rope_scaling", "vocab_size", "tie_word_embeddings", "hidden_act", "attention_bias", "mlp_bias",
    "attention_dropout", "torch_dtype", "dtype", "bos_token_id", "eos_token_id", "pad_token_id", "head_dim",
    "initializer_range", "pretraining_tp", "transformers_version", "use_cache", "pyllm", "_name_or_path",
    "output_attentions", "output_hidden_states", "return_dict", "chunk_size_feed_forward", "is_encoder_decoder",
}


def hf_config(model: GPT, tokenizer=None, extra: dict | None = None) -> dict:
    """The config.json dict: HF Llama fields (transformers builds the same model from them) + a "pyllm" sub-dict."""
    c = model.config
    d = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": c.dim, "intermediate_size": c.hidden_dim, "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads, "head_dim": c.head_dim,
        "max_position_embeddings": c.max_seq_len, "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta,
        "rope_scaling": None, "vocab_size": c.vocab_size, "tie_word_embeddings": c.tie_embeddings,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
        "initializer_range": c.init_std, "torch_dtype": "float32", "use_cache": True,
    }
    d.update(_special_ids(tokenizer))
    d["pyllm"] = {"format_version": FORMAT_VERSION, "config": c.to_dict(), "extra": extra or {}}
    return d


def _special_ids(tokenizer) -> dict:
    """bos = document boundary, eos = end of turn (<|end|>), pad = <|pad|>, when the tokenizer has them."""
    if tokenizer is None:
        return {}
    out = {}
    bos = getattr(tokenizer, "bos_id", None)
    special = getattr(tokenizer, "special_ids", {}) or {}
    if bos is not None:
        out["bos_token_id"] = int(bos)
    eos = special.get("<|end|>", bos)
    if eos is not None:
        out["eos_token_id"] = int(eos)
    if "<|pad|>" in special:
        out["pad_token_id"] = int(special["<|pad|>"])
    return out


def state_dict_hf(model: GPT) -> dict[str, torch.Tensor]:
    """HF names (model.<name>, lm_head.weight) -> fp32 CPU tensors, exactly the keys save_pretrained writes. A model
    with LoRA adapters gives its merged weights (its raw state dict's `...parametrizations.weight.original` names
    made a checkpoint load_checkpoint refused and transformers loaded with those layers randomly initialised)."""
    from .lora import has_lora, merged_state_dict
    out = {}
    for k, v in (merged_state_dict(model) if has_lora(model) else model.state_dict()).items():
        out[k if k == "lm_head.weight" else "model." + k] = v.detach().to("cpu", torch.float32).contiguous()
    return out


def _write_json(path: Path, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: someone else's live process
        return True
    return True


def recover_interrupted_save(dir) -> None:
    """What a save_checkpoint killed mid-way (SIGKILL, the OOM killer, a power cut: no clean-up ran) left beside
    <dir>: its <dir>.tmp-<pid>/ (a partial copy), or, killed while the previous checkpoint was being removed,
    <dir>.old-<pid>/; both are removed. Killed between the two renames, <dir> is gone and <dir>.old-<pid>/ is the
    previous complete checkpoint: it is put back (a --resume said "no trainer_state.json there"). Only a dead
    process's leftovers are touched: a live one may be saving now. Each leftover was a model-sized directory that
    no later run removed."""
    dir = Path(dir)
    if dir.is_symlink():
        dir = Path(os.path.realpath(dir))
    if not dir.name or not dir.parent.is_dir():  # ("." or "/": no sibling is its save's)
        return
    pattern = re.compile(re.escape(dir.name) + r"\.(old|tmp)-(\d+)")
    for p in sorted(dir.parent.iterdir()):  # .old-* before .tmp-*
        m = pattern.fullmatch(p.name)
        if not m or p.is_symlink() or not p.is_dir() or _pid_alive(int(m.group(2))):
            continue
        if m.group(1) == "old" and not os.path.lexists(dir):
            try:
                os.replace(p, dir)
            except FileNotFoundError:  # another rank of the run (each resumes) put it back first
                continue
            print(f"{dir}: put back the previous checkpoint from {p.name} (a save was killed mid-swap)",
                  file=sys.stderr)
        else:
            shutil.rmtree(p, ignore_errors=True)


def _sigterm_raises():
    """SIGTERM raises pyllm.cli.Terminated (so the clean-up of save_checkpoint runs) where it has its default action:
    under torchrun, where pyllm.cli._catch_sigterm leaves it so for the ranks waiting in a collective, it killed a
    rank mid-save and left <dir>.tmp-<pid>/ (torchrun stops the ranks left with it when one fails, and so does a batch
    scheduler stopping the run). A save holds no collective, so the handler runs promptly. -> the handler to put back,
    or None."""
    from .cli import _catch_sigterm
    return _catch_sigterm(under_torchrun=True)


def save_checkpoint(dir, model: GPT, tokenizer=None, extra: dict | None = None,
                    extra_files: Callable[[Path], None] | None = None) -> Path:
    """Write the checkpoint directory atomically: everything goes into <dir>.tmp-<pid> first, then that directory
    replaces <dir> (a crash mid-save leaves the previous checkpoint intact). extra (JSON-able) is kept under
    config.json["pyllm"]["extra"]; extra_files(tmp_dir) lets a trainer add its state files inside the same swap.
    A SIGTERM during the save (where it has its default action) raises pyllm.cli.Terminated, a KeyboardInterrupt,
    after the clean-up, instead of killing the process mid-write."""
    given = dir = Path(dir)
    if dir.exists() and not dir.is_dir():  # the swap below moved the file aside, then failed on rmtree of it
        raise FileExistsError(f"{dir}: exists and is not a directory (a checkpoint is a directory)")
    if dir.is_symlink():  # swap the link's target: renaming the link itself left a real <dir> in its place and a
        dir = Path(os.path.realpath(dir))  # stray <dir>.old-<pid> link ("Cannot call rmtree on a symbolic link")
    recover_interrupted_save(dir)
    tmp = dir.with_name(f"{dir.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    old, prev = None, _sigterm_raises()
    try:
        safetensors_io.save_file(state_dict_hf(model), tmp / WEIGHTS, metadata={"format": "pt"})
        _write_json(tmp / CONFIG, hf_config(model, tokenizer, extra))
        _write_json(tmp / GEN_CONFIG, {**_special_ids(tokenizer), "pyllm_format_version": FORMAT_VERSION})
        if tokenizer is not None:
            tokenizer.save(tmp)
            if not (tmp / TOKENIZER).is_file():
                raise ValueError(f"{tmp}: tokenizer.save did not write {TOKENIZER}")
        if extra_files is not None:
            extra_files(tmp)
        if dir.exists():
            old = dir.with_name(f"{dir.name}.old-{os.getpid()}")
            if old.exists():
                shutil.rmtree(old)
            os.replace(dir, old)   # the only window without <dir>: between these two renames
            os.replace(tmp, dir)
            shutil.rmtree(old)
        else:
            os.replace(tmp, dir)
    except BaseException as e:
        if old is not None and old.is_dir() and not dir.exists():  # Ctrl-C between the renames: put it back
            os.replace(old, dir)
        elif old is not None and old.is_dir():  # Ctrl-C / SIGTERM while the previous one was being removed
            shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno is not None:  # name what failed by its place in <dir>, not the gone tmp
            f = str(e.filename or dir)
            if f.startswith(str(tmp)):
                f = str(dir) + f[len(str(tmp)):]
            raise OSError(e.errno, e.strerror, f) from e
        raise
    finally:
        if prev is not None:
            signal.signal(signal.SIGTERM, prev)
    return given


def _get(d: dict, key: str, default):
    """d[key], or default when it is absent or null (HF writes null for unset fields)."""
    v = d.get(key)
    return default if v is None else v


def _flag(d: dict, key: str, default: bool) -> bool:
    """A JSON boolean (bool("false") was True)."""
    v = _get(d, key, default)
    if not isinstance(v, bool):
        raise ValueError(f"{key} must be true or false, got {v!r}")
    return v


def config_from_hf(d: dict, source: str = CONFIG) -> ModelConfig:
    """An HF Llama config dict -> ModelConfig; a setting pyllm cannot honour is a one-line ValueError."""
    if not isinstance(d, dict):
        raise ValueError(f"{source}: expected a JSON object")
    unknown = sorted(set(d) - HF_KEYS)
    if unknown:
        raise ValueError(f"{source}: unknown/unsupported config field(s) {unknown}")
    if d.get("model_type") != "llama":
        raise ValueError(f"{source}: model_type must be 'llama', got {d.get('model_type')!r}")
    arch = d.get("architectures")
    if arch is not None and arch != ["LlamaForCausalLM"]:
        raise ValueError(f"{source}: architectures must be ['LlamaForCausalLM'], got {arch!r}")
    for key, ok in (("hidden_act", ("silu",)), ("attention_bias", (False, None)), ("mlp_bias", (False, None)),
                    ("rope_scaling", (None,)), ("pretraining_tp", (1, None))):
        if d.get(key) not in ok:
            raise ValueError(f"{source}: unsupported {key}={d.get(key)!r} (pyllm supports {ok[0]!r})")
    theta = d.get("rope_theta")
    rp = d.get("rope_parameters")
    if rp is not None:   # transformers >= 5 keeps theta here
        if not isinstance(rp, dict) or rp.get("rope_type", "default") != "default" or set(rp) - {"rope_type",
                                                                                                  "rope_theta"}:
            raise ValueError(f"{source}: unsupported rope_parameters={rp!r} (pyllm supports plain default RoPE)")
        if theta is not None and rp.get("rope_theta", theta) != theta:
            raise ValueError(f"{source}: rope_theta {theta} disagrees with rope_parameters {rp}")
        theta = rp.get("rope_theta", theta)
    required = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    missing = [k for k in required if k not in d]
    if missing:
        raise ValueError(f"{source}: missing required field(s) {missing}")
    pyllm = d.get("pyllm") or {}
    if not isinstance(pyllm, dict) or not isinstance(pyllm.get("config") or {}, dict):
        raise ValueError(f"{source}: field 'pyllm' must be an object with a 'config' object")
    try:
        for key in ("rms_norm_eps", "rope_theta", "initializer_range"):
            v = d.get(key)
            if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool)):
                raise ValueError(f"{key} must be a number, got {v!r}")
        kw = dict(
            vocab_size=d["vocab_size"], dim=d["hidden_size"], n_layers=d["num_hidden_layers"],
            n_heads=d["num_attention_heads"], n_kv_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
            hidden_dim=d["intermediate_size"], max_seq_len=d.get("max_position_embeddings", 2048),
            norm_eps=float(_get(d, "rms_norm_eps", 1e-6)), rope_theta=float(theta if theta is not None else 10000.0),
            tie_embeddings=_flag(d, "tie_word_embeddings", False),  # transformers' LlamaConfig default
            init_std=float((pyllm.get("config") or {}).get("init_std", _get(d, "initializer_range", 0.02))),
        )
        cfg = ModelConfig(**kw)
    except (TypeError, ValueError) as e:  # a wrong type or range in config.json: one line naming the file
        raise ValueError(f"{source}: {e}") from None
    hd = d.get("head_dim")
    if hd is not None and hd != cfg.head_dim:
        raise ValueError(f"{source}: head_dim {hd} != hidden_size/num_attention_heads = {cfg.head_dim} "
                         f"(unsupported)")
    return cfg


def read_latest(path: Path) -> str:
    """The checkpoint name in a run's `latest` pointer file (a garbled one was a bare UnicodeDecodeError)."""
    try:
        name = path.read_text().strip()
    except UnicodeDecodeError:
        name = ""
    if not name or "\n" in name or "\0" in name:
        raise ValueError(f"{path}: not a checkpoint name (expected one line like 'ckpt_000100')")
    return name


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (not a pyllm/HF checkpoint directory?)")
    from .data import read_json
    return read_json(path, "invalid JSON")


def load_checkpoint(dir, dtype: torch.dtype | None = None, device: str = "cpu", backend: str | None = None,
                    load_tokenizer: bool = True):
    """-> (GPT, Tokenizer or None). Weights must be F32 unless dtype is given, in which case any float dtype
    (e.g. a bf16/fp16 HF export) is cast to it: dtype=torch.float32 for the pyllm kernels; a model in another dtype
    runs with backend="torch". Every mismatch is a one-line ValueError naming file and tensor."""
    try:  # before reading anything; "cuda" without a GPU was torch's AssertionError traceback after the load
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"load_checkpoint: bad device {device!r} ({e})") from None
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"load_checkpoint: dtype must be a torch floating-point dtype, got {dtype!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"load_checkpoint: device {device!r}: no CUDA GPU is available to torch")
    dir = Path(dir)
    if not dir.is_dir():
        olds = sorted(dir.parent.glob(f"{dir.name}.old-*")) if dir.parent.is_dir() else []
        hint = f" (an interrupted save left the previous checkpoint at {olds[0]})" if olds else ""
        raise FileNotFoundError(f"{dir}: checkpoint directory not found{hint}")
    # `pyllm pretrain --out base/` writes base/ckpt_<step>/ + base/latest; the README then says --model base/
    latest = dir / "latest"
    if not (dir / CONFIG).exists() and latest.is_file() and (dir / read_latest(latest) / CONFIG).is_file():
        dir = dir / read_latest(latest)
    cfg = config_from_hf(_read_json(dir / CONFIG), str(dir / CONFIG))
    wpath = dir / WEIGHTS
    if not wpath.is_file():
        if (dir / f"{WEIGHTS}.index.json").is_file():
            raise ValueError(f"{wpath}: sharded checkpoints are not supported (save with one shard)")
        if wpath.exists():
            raise ValueError(f"{wpath}: not a regular file")
        raise FileNotFoundError(f"{wpath}: missing")
    header, _, _ = safetensors_io.read_header(wpath)
    # The layer count first and the shapes on the meta device: a config.json that says 10^7 layers (or a huge
    # width) built that model for minutes before the tensors were compared with it
    n_file = len({k.split(".")[2] for k in header if k.startswith("model.layers.") and k.count(".") >= 3})
    if cfg.n_layers != n_file:
        raise ValueError(f"{dir / CONFIG}: num_hidden_layers is {cfg.n_layers} but {wpath.name} holds {n_file} "
                         f"layers")
    with torch.device("meta"):
        shapes = GPT(cfg, backend=backend).state_dict()
    want = {("" if k == "lm_head.weight" else "model.") + k: tuple(v.shape) for k, v in shapes.items()}
    # transformers may store lm_head.weight even when tied; accepted only if it equals the embedding (checked below)
    tied_head = cfg.tie_embeddings and "lm_head.weight" in header
    for name in want:
        if name not in header:
            raise ValueError(f"{wpath}: missing tensor {name!r}")
    for name, e in header.items():
        if name not in want and not (tied_head and name == "lm_head.weight"):
            raise ValueError(f"{wpath}: unexpected tensor {name!r}")
        shape = want.get(name, want["model.embed_tokens.weight"])
        if tuple(e["shape"]) != shape:
            raise ValueError(f"{wpath}: tensor {name!r} has shape {tuple(e['shape'])}, config.json implies {shape}")
        if dtype is None and e["dtype"] != "F32":
            raise ValueError(f"{wpath}: tensor {name!r} has dtype {e['dtype']}, expected F32 "
                             f"(pass dtype=torch.float32 to cast)")
        if dtype is not None and e["dtype"] not in ("F32", "F16", "BF16", "F64"):
            raise ValueError(f"{wpath}: tensor {name!r} has non-float dtype {e['dtype']}")
    tensors = safetensors_io.load_file(wpath)
    model = GPT(cfg, backend=backend)
    target = dtype or torch.float32
    if tied_head:
        head = tensors.pop("lm_head.weight")
        if not torch.equal(head, tensors["model.embed_tokens.weight"]):
            raise ValueError(f"{wpath}: tensor 'lm_head.weight' differs from the embedding but config.json says "
                             f"tie_word_embeddings=true")
    sd = {(k if k == "lm_head.weight" else k[len("model."):]): v.to(target) for k, v in tensors.items()}
    model.to(target)
    model.load_state_dict(sd, strict=True)
    model.to(device)
    tok = None
    if load_tokenizer and (dir / TOKENIZER).exists() and not (dir / TOKENIZER).is_file():
        # a directory there read as "no tokenizer": export went on without tokenizer.bin, exit 0
        raise ValueError(f"{dir / TOKENIZER}: exists and is not a regular file")
    if load_tokenizer and (dir / TOKENIZER).is_file():
        try:
            from .tokenizer import Tokenizer
        except ImportError:
            tok = None
        else:
            tok = Tokenizer.load(dir / TOKENIZER)
    return model, tok


def read_extra(dir) -> dict:
    """The extra dict saved with save_checkpoint(..., extra=...) ({} for an HF-written checkpoint)."""
    path = Path(dir) / CONFIG
    d = _read_json(path)
    meta = d.get("pyllm") if isinstance(d, dict) else None
    extra = meta.get("extra") if isinstance(meta, dict) else None
    if not isinstance(d, dict) or (meta is not None and not isinstance(meta, dict)) or \
            (extra is not None and not isinstance(extra, dict)):
        raise ValueError(f"{path}: expected a JSON object with an optional 'pyllm': {{'extra': {{...}}}} object")
    return extra or {}


__all__ = ["save_checkpoint", "recover_interrupted_save", "load_checkpoint", "config_from_hf", "hf_config",
           "state_dict_hf", "read_extra"]
