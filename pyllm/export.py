"""`pyllm export`: write a checkpoint as model.bin + tokenizer.bin for the C runtime (pyllm-run) or llama2.c.

    pyllm export --checkpoint out/ckpt --out out/run                       # pyllm model.bin, fp32
    pyllm export --checkpoint out/ckpt --out out/run --quantize q8_0       # pyllm model.bin, Q8_0 (groups of 64)
    pyllm export --checkpoint out/ckpt --out out/l2c --format llama2c      # llama2.c v0 (its run.c reads it)

Formats (byte layouts in csrc/model_file.h): pyllm model.bin v1 has the full config (norm eps, RoPE theta, GQA, tied
classifier) and 64-byte aligned fp32 or Q8_0 tensors for mmap. llama2c writes llama2.c's legacy v0 (what llama2.c's
run.c reads), v1 (--llama2c-version 1) or, with --quantize q8_0, v2 (what llama2.c's runq.c reads). wq/wk are permuted
from HF's rotate-half RoPE layout to llama2.c's adjacent pairs, which the C runtime uses for every format.
"""
from __future__ import annotations

import os
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import torch

PYLLM_MAGIC = 0x4D4C4C50  # b"PLLM"
PYLLM_VERSION = 1
LLAMA2C_MAGIC = 0x616B3432
HEADER_BYTES = 256
ALIGN = 64


def _cfg(config) -> dict:
    """The fields the binary needs, from a ModelConfig (or anything with the same attributes)."""
    return dict(dim=config.dim, hidden_dim=config.hidden_dim, n_layers=config.n_layers, n_heads=config.n_heads,
                n_kv_heads=config.n_kv_heads, vocab_size=config.vocab_size, seq_len=config.max_seq_len,
                norm_eps=float(config.norm_eps), rope_theta=float(config.rope_theta))


def _normalize(state_dict: dict) -> dict:
    """HF Llama names without a leading `model.`, as fp32 CPU tensors."""
    out = {}
    for k, v in state_dict.items():
        k = k[len("model."):] if k.startswith("model.") else k
        out[k] = v.detach().to("cpu", torch.float32).contiguous()
    return out


def permute_pairs(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF rotate-half rows -> adjacent-pair rows per head (row i -> 2i, row hd/2+i -> 2i+1), as llama2.c expects."""
    n, k = w.shape
    return w.view(n_heads, 2, n // n_heads // 2, k).transpose(1, 2).reshape(n, k)


def _tensors(sd: dict, c: dict):
    """Ordered (name, tensor, is_matrix) per layer in the C runtime's terms, wq/wk permuted to adjacent pairs."""
    need = ["embed_tokens.weight", "norm.weight"]
    for i in range(c["n_layers"]):
        need += [f"layers.{i}.{n}.weight" for n in ("input_layernorm", "self_attn.q_proj", "self_attn.k_proj",
                 "self_attn.v_proj", "self_attn.o_proj", "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj",
                 "mlp.down_proj")]
    missing = [n for n in need if n not in sd]
    if missing:
        raise ValueError(f"checkpoint is missing tensor(s) {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    emb = sd["embed_tokens.weight"]
    if tuple(emb.shape) != (c["vocab_size"], c["dim"]):
        raise ValueError(f"embed_tokens.weight has shape {tuple(emb.shape)}, config says ({c['vocab_size']}, {c['dim']})")
    layers = []
    for i in range(c["n_layers"]):
        g = lambda n: sd[f"layers.{i}.{n}.weight"]  # noqa: E731
        layers.append(dict(
            rms_att=g("input_layernorm"), wq=permute_pairs(g("self_attn.q_proj"), c["n_heads"]),
            wk=permute_pairs(g("self_attn.k_proj"), c["n_kv_heads"]), wv=g("self_attn.v_proj"),
            wo=g("self_attn.o_proj"), rms_ffn=g("post_attention_layernorm"), w1=g("mlp.gate_proj"),
            w2=g("mlp.down_proj"), w3=g("mlp.up_proj")))
    cls = sd.get("lm_head.weight")
    shared = cls is None or torch.equal(cls, emb)
    return emb, layers, sd["norm.weight"], (None if shared else cls)


def quantize_q8_0(w: torch.Tensor, group_size: int):
    """Symmetric int8 per group of `group_size` along the last dim: scale = max|w|/127 (llama2.c's quantize_q80)."""
    g = w.reshape(-1, group_size)
    scale = g.abs().amax(dim=1) / 127.0
    q = torch.where(scale[:, None] > 0, g / scale.clamp_min(1e-30)[:, None], torch.zeros_like(g))
    return torch.round(q).to(torch.int8).reshape(w.shape), scale.float()


def dequantize_q8_0(q: torch.Tensor, s: torch.Tensor, group_size: int) -> torch.Tensor:
    return (q.float().reshape(-1, group_size) * s[:, None]).reshape(q.shape)


class _Writer:
    """Writes into `path.tmp`, then os.replace: a failed export never leaves a half-written file."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.f = open(self.tmp, "wb")

    def align(self, a: int):
        pad = -self.f.tell() % a
        if pad:
            self.f.write(b"\0" * pad)

    def f32(self, t: torch.Tensor, align: int = 1):
        self.align(align)
        self.f.write(t.detach().float().contiguous().numpy().astype("<f4").tobytes())

    def i8(self, t: torch.Tensor, align: int = 1):
        self.align(align)
        self.f.write(t.contiguous().numpy().astype(np.int8).tobytes())

    def __enter__(self):
        return self

    def __exit__(self, kind, e, tb):
        """Success: close and rename into place. Failure: remove the partial .tmp, and name the file in a write
        error that names none (a full disk)."""
        try:
            if e is None:
                self.f.flush()  # the last buffered bytes reach the OS here: this can fail too
                os.fsync(self.f.fileno())  # and the disk, before the rename (else a crash can leave it empty)
                self.f.close()
                os.replace(self.tmp, self.path)
                return False
        except OSError as err:
            e = err
        try:
            self.f.close()  # flushing to a full disk fails again: the .tmp goes all the same
        except OSError:
            pass
        self.tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            from .data import named
            raise named(e, self.path) from e
        return False


def auto_group_size(config, start: int = 64) -> int:
    """The largest of 64, 32, 16, ... that divides dim and hidden_dim (llama2.c's export.py halves until it divides
    dim only, and its runq.c then skips the last hidden_dim % group units of w2: pyllm checks both)."""
    g = start
    while g > 1 and (config.dim % g or config.hidden_dim % g):
        g //= 2
    return g


def _check_group(c: dict, group_size: int):
    if group_size <= 0 or c["dim"] % group_size or c["hidden_dim"] % group_size:
        raise ValueError(f"--group-size {group_size} must divide dim {c['dim']} and hidden_dim {c['hidden_dim']}")


def write_model_bin(path, state_dict: dict, config, quantize: str | None = None, group_size: int = 64,
                    tokenizer_crc: int = 0) -> Path:
    """pyllm model.bin v1 (layout in csrc/model_file.h). tokenizer_crc: zlib.crc32 of the tokenizer.bin exported
    with it, which pyllm-run then requires (0: none)."""
    c = _cfg(config)
    sd = _normalize(state_dict)
    emb, layers, norm, cls = _tensors(sd, c)
    q8 = quantize == "q8_0"
    if quantize not in (None, "q8_0"):
        raise ValueError(f"unknown --quantize {quantize!r} (choose q8_0)")
    if q8:
        _check_group(c, group_size)
    with _Writer(path) as w:
        hdr = struct.pack("<Ii7iffBBHi", PYLLM_MAGIC, PYLLM_VERSION, c["dim"], c["hidden_dim"], c["n_layers"],
                          c["n_heads"], c["n_kv_heads"], c["vocab_size"], c["seq_len"], c["norm_eps"], c["rope_theta"],
                          int(cls is None), int(q8), 0, group_size if q8 else 0)
        hdr += struct.pack("<I", tokenizer_crc & 0xFFFFFFFF)
        w.f.write(hdr + b"\0" * (HEADER_BYTES - len(hdr)))

        def matrix(t):
            if q8:
                q, s = quantize_q8_0(t, group_size)
                w.i8(q, ALIGN)
                w.f32(s, ALIGN)
            else:
                w.f32(t, ALIGN)

        matrix(emb)
        for ly in layers:
            w.f32(ly["rms_att"], ALIGN)
            for n in ("wq", "wk", "wv", "wo"):
                matrix(ly[n])
            w.f32(ly["rms_ffn"], ALIGN)
            for n in ("w1", "w2", "w3"):
                matrix(ly[n])
        w.f32(norm, ALIGN)
        if cls is not None:
            matrix(cls)
    return Path(path)


def _check_llama2c(c: dict):
    if abs(c["norm_eps"] - 1e-5) > 1e-12 or c["rope_theta"] != 10000.0:
        raise ValueError(f"llama2.c hard-codes norm eps 1e-5 and RoPE theta 10000; this model has eps {c['norm_eps']}"
                         f" and theta {c['rope_theta']} (use --format pyllm)")


def write_llama2c(path, state_dict: dict, config, version: int = 0, group_size: int = 64) -> Path:
    """llama2.c checkpoint: v0 (legacy, read by llama2.c's run.c), v1 (fp32, 256-byte header), v2 (Q8_0, runq.c)."""
    c = _cfg(config)
    _check_llama2c(c)
    if version not in (0, 1, 2):
        raise ValueError(f"llama2.c version must be 0, 1 or 2, got {version}")
    sd = _normalize(state_dict)
    emb, layers, norm, cls = _tensors(sd, c)
    shared = cls is None
    dims = (c["dim"], c["hidden_dim"], c["n_layers"], c["n_heads"], c["n_kv_heads"])
    if version == 2:
        _check_group(c, group_size)
    with _Writer(path) as w:
        if version == 0:
            w.f.write(struct.pack("<7i", *dims, c["vocab_size"] if shared else -c["vocab_size"], c["seq_len"]))
            w.f32(emb)
            for n in ("rms_att", "wq", "wk", "wv", "wo", "rms_ffn", "w1", "w2", "w3"):
                for ly in layers:
                    w.f32(ly[n])
            w.f32(norm)
            hd = c["dim"] // c["n_heads"]
            inv = 1.0 / (c["rope_theta"] ** (torch.arange(0, hd, 2).float() / hd))
            ang = torch.outer(torch.arange(c["seq_len"]).float(), inv)
            w.f32(torch.cos(ang))  # freq_cis_real/imag: llama2.c's run.c skips them, but they must be there
            w.f32(torch.sin(ang))
            if not shared:
                w.f32(cls)
        else:
            hdr = struct.pack("<Ii7iB", LLAMA2C_MAGIC, version, *dims, c["vocab_size"], c["seq_len"], int(shared))
            if version == 2:
                hdr += struct.pack("<i", group_size)
            w.f.write(hdr + b"\0" * (HEADER_BYTES - len(hdr)))
            for n in ("rms_att", "rms_ffn"):
                for ly in layers:
                    w.f32(ly[n])
            w.f32(norm)
            mats = [emb] + [ly[n] for n in ("wq", "wk", "wv", "wo", "w1", "w2", "w3") for ly in layers]
            if not shared:
                mats.append(cls)
            for t in mats:
                if version == 2:
                    q, s = quantize_q8_0(t, group_size)
                    w.i8(q)
                    w.f32(s)
                else:
                    w.f32(t)
    return Path(path)


def export(state_dict: dict, config, out_dir, fmt: str = "pyllm", quantize: str | None = None, group_size: int = 64,
           llama2c_version: int | None = None, tokenizer=None) -> dict:
    """Write model.bin (and tokenizer.bin when a tokenizer is given) into out_dir; returns the paths written.
    Every flag combination is checked before out_dir is created, and tokenizer.bin is written (to a .tmp) before
    model.bin replaces the old one: a failure leaves the old pair (or nothing), never a new model.bin beside an old
    or missing tokenizer.bin. A kill between the two renames can still leave one; a pyllm model.bin names its
    tokenizer.bin by CRC-32, so pyllm-run refuses that pair (llama2.c's format has no room for it)."""
    if fmt not in ("pyllm", "llama2c"):
        raise ValueError(f"unknown --format {fmt!r} (choose pyllm or llama2c)")
    if quantize not in (None, "q8_0"):
        raise ValueError(f"unknown --quantize {quantize!r} (choose q8_0)")
    if fmt == "pyllm" and llama2c_version is not None:
        raise ValueError("--llama2c-version only applies to --format llama2c")
    version = llama2c_version if llama2c_version is not None else (2 if quantize else 0)
    if fmt == "llama2c":
        if (version == 2) != (quantize == "q8_0"):
            raise ValueError("llama2.c v2 is its Q8_0 format: use --quantize q8_0 exactly when --llama2c-version is 2")
        _check_llama2c(_cfg(config))
    if quantize == "q8_0":
        _check_group(_cfg(config), group_size)
    if tokenizer is not None and not hasattr(tokenizer, "save_bin"):
        raise ValueError("this tokenizer has no save_bin(); cannot write tokenizer.bin")
    if not str(out_dir).strip():  # Path("") is the current directory
        raise ValueError("--out is empty: give the export directory")
    out = Path(out_dir)
    for name in ("model.bin", "tokenizer.bin"):  # checked before writing either (a directory named tokenizer.bin
        if (out / name).exists() and not (out / name).is_file():  # failed after the new model.bin was in place)
            raise ValueError(f"{out / name}: exists and is not a regular file")
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    tmp = out / "tokenizer.bin.tmp"
    try:
        crc = 0
        if tokenizer is not None:
            tokenizer.save_bin(str(tmp))
            crc = zlib.crc32(tmp.read_bytes())  # named in model.bin's header: a crash between the two renames below
        if fmt == "pyllm":                      # leaves a pair that pyllm-run refuses, not one it runs wrongly
            paths["model"] = write_model_bin(out / "model.bin", state_dict, config, quantize, group_size, crc)
        else:
            paths["model"] = write_llama2c(out / "model.bin", state_dict, config, version, group_size)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if tokenizer is not None:
        try:
            os.replace(tmp, out / "tokenizer.bin")
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        paths["tokenizer"] = out / "tokenizer.bin"
    return paths


def add_arguments(p):
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (model.safetensors + config.json)")
    p.add_argument("--out", required=True, help="output directory for model.bin and tokenizer.bin")
    p.add_argument("--format", default="pyllm", choices=["pyllm", "llama2c"],
                   help="pyllm: model.bin v1 with the full config (default). llama2c: llama2.c's v0 checkpoint "
                        "(v2 with --quantize q8_0); tokenizer.bin is still pyllm's format (read by pyllm-run, not by "
                        "llama2.c, whose tokenizer is sentencepiece-only)")
    p.add_argument("--quantize", default=None, choices=["q8_0"], help="int8 weights in groups (default: fp32)")
    p.add_argument("--group-size", type=int, default=None,
                   help="Q8_0 group size along the input dim (default: 64, halved until it divides dim and hidden_dim; "
                        "llama2.c's export.py checks dim only)")
    p.add_argument("--llama2c-version", type=int, default=None, choices=[0, 1, 2],
                   help="llama2.c file version (default: 0 for fp32, 2 for q8_0)")


def main(args) -> int:
    if args.group_size is not None and args.quantize is None:
        raise ValueError("--group-size only applies with --quantize q8_0")
    ckpt = Path(args.checkpoint)
    if not ckpt.is_dir():
        raise FileNotFoundError(f"{ckpt}: checkpoint directory not found")
    try:
        from .checkpoint import load_checkpoint
    except ImportError as e:
        raise ValueError(f"cannot load checkpoints in this build ({e})") from None
    # model.bin holds fp32 (or Q8_0 made from fp32): an HF bf16/fp16 checkpoint casts losslessly (without dtype the
    # loader's error said "pass dtype=torch.float32", which no export flag can do)
    model, tok = load_checkpoint(str(ckpt), dtype=torch.float32)
    if tok is not None and tok.vocab_size != model.config.vocab_size:  # pyllm-run would refuse the pair later
        raise ValueError(f"{ckpt}: tokenizer.json has {tok.vocab_size} tokens but config.json's vocab_size is "
                         f"{model.config.vocab_size} (pyllm-run needs them equal: wrong tokenizer?)")
    gs = args.group_size if args.group_size is not None else auto_group_size(model.config)
    paths = export(model.state_dict(), model.config, args.out, args.format, args.quantize, gs,
                   args.llama2c_version, tok)
    for k, v in paths.items():
        print(f"wrote {k}: {v} ({v.stat().st_size / 1e6:.1f} MB)")
    if tok is None:
        print("no tokenizer in the checkpoint: tokenizer.bin not written")
        if (Path(args.out) / "tokenizer.bin").exists():  # pyllm-run picks it up beside model.bin without a word
            print(f"{Path(args.out) / 'tokenizer.bin'}: warning: left from an earlier export, not this checkpoint's",
                  file=sys.stderr)
    return 0


if __name__ == "__main__":  # python -m pyllm.export ... == pyllm <command> ...
    from .cli import module_main
    raise SystemExit(module_main(__spec__.name))
