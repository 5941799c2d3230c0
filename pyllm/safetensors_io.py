"""Minimal safetensors reader/writer (no pickle, no `safetensors` dependency), byte-compatible with the package.

Format: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets: [begin, end]},
"__metadata__": {str: str}}, then the raw little-endian tensor bytes (offsets relative to the end of the header).
Usage: save_file({"w": t}, "x.safetensors", metadata={"k": "v"}); load_file("x.safetensors") -> {"w": t}.
"""
from __future__ import annotations

import json
import math
import os
import struct
import sys
from pathlib import Path

import torch

DTYPES: dict[str, torch.dtype] = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100_000_000  # the safetensors package's limit too: a larger "header" is a corrupt file

if sys.byteorder != "little":  # pragma: no cover - x86/ARM are little-endian
    raise ImportError("pyllm.safetensors_io needs a little-endian machine")


def _bytes_view(t: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor, without a copy."""
    flat = t.reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy())


def save_file(tensors: dict[str, torch.Tensor], path, metadata: dict[str, str] | None = None) -> None:
    """Write tensors (+ optional str->str metadata) to path atomically (path.tmp-<pid>, then os.replace)."""
    path = Path(path)
    header: dict = {}
    if metadata:
        for k, v in metadata.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise ValueError(f"{path}: metadata must map str to str, got {k!r}: {type(v).__name__}")
        header["__metadata__"] = dict(metadata)
    # Largest element size first, then by name, so every tensor stays aligned to its element size (as the package).
    items = []
    for name, t in tensors.items():
        if not isinstance(name, str) or name == "__metadata__":
            raise ValueError(f"{path}: invalid tensor name {name!r}")
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{path}: tensor {name!r} is a {type(t).__name__}, not a torch.Tensor")
        if t.dtype not in NAMES:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {t.dtype}")
        items.append((name, t.detach().to("cpu").contiguous()))
    items.sort(key=lambda kv: (-kv[1].element_size(), kv[0]))
    offset = 0
    for name, t in items:
        n = t.numel() * t.element_size()
        header[name] = {"dtype": NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    hjson = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hjson += b" " * (-len(hjson) % 8)  # pad so the data starts 8-byte aligned
    from .data import atomic_write
    atomic_write(path, [struct.pack("<Q", len(hjson)), hjson, *(_bytes_view(t) for _, t in items)],
                 tmp_suffix=f".tmp-{os.getpid()}")


def read_header(path) -> tuple[dict, dict[str, str], int]:
    """Validate and return (tensor entries, metadata, data start offset). One-line ValueError naming file/tensor."""
    path = Path(path)
    if path.exists() and not path.is_file():
        raise ValueError(f"{path}: not a regular file (expected a safetensors file)")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such safetensors file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: truncated safetensors file ({size} bytes, no header length)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > size:
            raise ValueError(f"{path}: header length {n} does not fit in a {size}-byte file (truncated or corrupt)")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except _DuplicateKey as e:
        raise ValueError(f"{path}: header names {e.args[0]!r} twice") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: header is not valid JSON ({e})") from None
    except RecursionError:  # json's C scanner recurses per nesting level
        raise ValueError(f"{path}: header is not valid JSON (nested too deeply)") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: header must be a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise ValueError(f"{path}: __metadata__ must map str to str")
    data_len = size - 8 - n
    spans = []
    for name, e in header.items():
        if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
            raise ValueError(f"{path}: tensor {name!r}: entry must have exactly dtype, shape, data_offsets")
        if not isinstance(e["dtype"], str) or e["dtype"] not in DTYPES:  # a list: "unhashable type" traceback
            raise ValueError(f"{path}: tensor {name!r}: unsupported dtype {e['dtype']!r}")
        shape, offs = e["shape"], e["data_offsets"]
        # bool is an int to isinstance ([true] was torch.empty's TypeError); a dim >= 2^63 was its overflow error
        if not isinstance(shape, list) or not all(type(s) is int and 0 <= s < 2 ** 63 for s in shape):
            raise ValueError(f"{path}: tensor {name!r}: bad shape {shape!r}")
        if (not isinstance(offs, list) or len(offs) != 2 or not all(type(o) is int for o in offs)
                or not 0 <= offs[0] <= offs[1]):
            raise ValueError(f"{path}: tensor {name!r}: bad data_offsets {offs!r}")
        if offs[1] > data_len:
            raise ValueError(f"{path}: tensor {name!r}: data_offsets {offs} out of bounds of the {data_len}-byte "
                             f"data section (truncated file?)")
        want = math.prod(shape) * DTYPES[e["dtype"]].itemsize
        if offs[1] - offs[0] != want:
            raise ValueError(f"{path}: tensor {name!r}: {offs[1] - offs[0]} bytes for shape {shape} "
                             f"{e['dtype']} (expected {want})")
        spans.append((offs[0], offs[1], name))
    spans.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise ValueError(f"{path}: tensors {n0!r} and {n1!r} overlap in the data section")
        if b1 > e0:  # the safetensors package refuses gaps and trailing bytes too (a file it would not load)
            raise ValueError(f"{path}: {b1 - e0} unused bytes between tensors {n0!r} and {n1!r} in the data section")
    end = spans[-1][1] if spans else 0
    if (spans and spans[0][0]) or end != data_len:
        raise ValueError(f"{path}: the tensors cover bytes {spans[0][0] if spans else 0}..{end} of the {data_len}-byte "
                         f"data section (unused bytes: corrupt, or written by something else)")
    return header, meta, 8 + n


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs):
    """json object hook: a name given twice is an error (json kept the last: a second 'model.norm.weight' entry
    silently replaced the first; the safetensors package refuses the file)."""
    seen = {}
    for k, v in pairs:
        if k in seen:
            raise _DuplicateKey(k)
        seen[k] = v
    return seen


def load_file(path, device: str = "cpu", with_metadata: bool = False):
    """path -> {name: tensor} (or ({...}, metadata) with with_metadata=True). Reads each tensor straight into its
    own buffer: one copy of the weights in memory, any alignment."""
    header, meta, start = read_header(path)
    out: dict[str, torch.Tensor] = {}
    with open(path, "rb") as f:
        for name, e in header.items():
            t = torch.empty(e["shape"], dtype=DTYPES[e["dtype"]])
            b, end = e["data_offsets"]
            if end > b:
                f.seek(start + b)
                got = f.readinto(_bytes_view(t))
                if got != end - b:
                    raise ValueError(f"{path}: tensor {name!r}: short read ({got} of {end - b} bytes)")
            out[name] = t.to(device) if device != "cpu" else t
    return (out, meta) if with_metadata else out


def load_into(path, module) -> None:
    """Copy a small state file (a reward or value head) into `module`: the same tensor names, shapes and a float dtype,
    else a one-line ValueError naming the file (a foreign file was a KeyError 'weight' or load_state_dict's
    multi-line RuntimeError)."""
    tensors = load_file(path)
    want = module.state_dict()
    if set(tensors) != set(want):
        raise ValueError(f"{path}: holds tensors {sorted(tensors)}, expected {sorted(want)}")
    for k, t in tensors.items():
        if tuple(t.shape) != tuple(want[k].shape) or not t.is_floating_point():
            raise ValueError(f"{path}: tensor {k!r} is {t.dtype} of shape {tuple(t.shape)}, expected a float "
                             f"tensor of shape {tuple(want[k].shape)}")
    module.load_state_dict({k: t.to(want[k].dtype) for k, t in tensors.items()})

