"""pyllm.runtime: the C runtime (csrc/run.h) from Python via cffi, and the `pyllm-run` console script.

    from pyllm.runtime import Runtime
    rt = Runtime("out/run/model.bin", "out/run/tokenizer.bin")
    logits = rt.forward(token, pos)          # numpy (vocab_size,) float32, KV cache at positions < pos reused
    print(rt.generate("Once upon a time", steps=64, temperature=0))

The library is pyllm/lib/libpyllm_run.so, built with the extension (`python setup.py build_ext --inplace`).
"""
from __future__ import annotations

import math
import operator
import os
import re
import sys
from pathlib import Path

import numpy as np

_PKG = Path(__file__).resolve().parent
LIB_PATH = _PKG / "lib" / "libpyllm_run.so"
ERR_LEN = 4608  # csrc/run.h RUN_ERR_LEN: room for a whole path and the problem in a *_build error
BIN_PATH = _PKG / "bin" / "pyllm-run"
FORMATS = {0: "pyllm", 1: "llama2c-v0", 2: "llama2c-v1", 3: "llama2c-v2"}

HEADER_PATH = _PKG / "lib" / "run.h"  # csrc/run.h, copied beside the library by the build


def cdef_from_header(text: str) -> str:
    """run.h as cffi's cdef takes it: without the preprocessor lines and the C++ `extern "C"` wrapper."""
    text = re.sub(r"#ifdef __cplusplus.*?#endif", "", text, flags=re.S)
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))

_ffi = None
_lib = None


def lib():
    """(ffi, lib) for libpyllm_run.so, loaded once; a clear error if it was not built."""
    global _ffi, _lib
    if _lib is None:
        if not LIB_PATH.exists():
            raise FileNotFoundError(f"{LIB_PATH} not found: build it with "
                                    "`python setup.py build_ext --inplace` (or `pip install .`)")
        if not HEADER_PATH.exists():
            raise FileNotFoundError(f"{HEADER_PATH} not found: rebuild with `python setup.py build_ext --inplace`")
        import cffi
        ffi = cffi.FFI()
        ffi.cdef(cdef_from_header(HEADER_PATH.read_text()))
        _lib = ffi.dlopen(str(LIB_PATH))
        _ffi = ffi
    return _ffi, _lib


class Model:
    """A model file loaded by the C runtime: forward(token, pos) -> logits with its own KV cache."""

    def __init__(self, path):
        ffi, L = lib()
        self.path = str(path)
        err = ffi.new(f"char[{ERR_LEN}]")
        self._m = L.run_model_build(self.path.encode(), err, ERR_LEN)
        if self._m == ffi.NULL:
            raise ValueError(ffi.string(err).decode(errors="replace"))
        out = ffi.new("int[11]")
        L.run_model_config(self._m, out, 11)
        (self.dim, self.hidden_dim, self.n_layers, self.n_heads, self.n_kv_heads, self.vocab_size, self.seq_len,
         shared, wtype, self.group_size, fmt) = list(out)
        self.shared_classifier = bool(shared)
        self.weight_type = "q8_0" if wtype == 1 else "fp32"
        self.format = FORMATS.get(fmt, str(fmt))
        self.norm_eps = L.run_model_norm_eps(self._m)
        self.rope_theta = L.run_model_rope_theta(self._m)
        self._n_run = 0   # positions [0, _n_run) hold this model's KV cache entries

    def forward(self, token: int, pos: int) -> np.ndarray:
        """Logits (vocab_size,) float32 (a copy) for `token` at `pos`; positions < pos must have been run."""
        ffi, L = lib()
        if self._m is None:
            raise ValueError("model is closed")
        # integers only (3.7 ran token 3, True token 1, without a word)
        token, pos = _int_arg(token, "forward token"), _int_arg(pos, "forward pos")
        if not (0 <= token < self.vocab_size) or not (0 <= pos < self.seq_len):
            raise ValueError(f"token {token} must be in [0, {self.vocab_size}) and pos {pos} in [0, {self.seq_len})")
        if pos > self._n_run:  # attention would read cache rows never written (zeros, or a stale sequence's)
            raise ValueError(f"forward pos {pos}: positions {self._n_run}..{pos - 1} have not been run (run the "
                             f"tokens before it first)")
        p = L.run_forward(self._m, token, pos)
        if p == ffi.NULL:
            raise MemoryError("run_forward: out of memory for a kernel's scratch buffers")
        self._n_run = pos + 1  # rows after pos belong to the sequence this one replaces
        return np.frombuffer(ffi.buffer(p, 4 * self.vocab_size), dtype=np.float32).copy()

    def close(self):
        if getattr(self, "_m", None) is not None:
            lib()[1].run_model_free(self._m)
            self._m = None

    __del__ = close


def _int_arg(v, name: str) -> int:
    """An integer argument (Python/numpy ints, integer 0-d tensors) as an int: a float, bool or string is a TypeError
    naming it."""
    if isinstance(v, bool):
        raise TypeError(f"{name}: expected an integer, got {v!r}")
    try:
        return operator.index(v)
    except TypeError:
        raise TypeError(f"{name}: expected an integer, got {v!r}") from None


def _token_id(i) -> int:
    """As pyllm.tokenizer's (not imported: it loads the tokenizers library, which this module does not need)."""
    if isinstance(i, bool):  # True was token 1
        raise ValueError(f"decode: token ids must be integers, got {i!r}")
    try:
        return operator.index(i)
    except TypeError:
        raise ValueError(f"decode: token ids must be integers, got {i!r}") from None


class CTokenizer:
    """The C tokenizer (pyllm tokenizer.bin or llama2.c's), for checking it against pyllm.tokenizer."""

    def __init__(self, path, vocab_size: int = 0):
        ffi, L = lib()
        err = ffi.new(f"char[{ERR_LEN}]")
        self._t = L.run_tokenizer_build(str(path).encode(), int(vocab_size), err, ERR_LEN)
        if self._t == ffi.NULL:
            raise ValueError(ffi.string(err).decode(errors="replace"))
        self.bos_id = L.run_bos_id(self._t)
        self.vocab_size = L.run_tokenizer_vocab_size(self._t)

    def _handle(self):
        if getattr(self, "_t", None) is None:  # was cffi's "initializer for ctype 'run_tokenizer *' ..."
            raise ValueError("tokenizer is closed")
        return self._t

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ffi, L = lib()
        t = self._handle()
        if not isinstance(text, str):  # was "'int' object has no attribute 'encode'"
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        data = text.encode()
        cap = len(data) + 3
        ids = ffi.new("int[]", cap)
        # with the length: run_encode (a C string) stopped at a "\0", dropping the rest of the text without a word
        n = L.run_encode_len(t, data, len(data), int(add_bos), ids, cap)
        if n == -3:
            raise MemoryError("C tokenizer: out of memory encoding the text")
        if n < 0:  # -2 (no room) cannot happen: cap is an upper bound
            raise ValueError(f"{ffi.string(L.run_tokenizer_path(self._t)).decode(errors='replace')}: the tokenizer "
                             f"has no token for a character of the text (and no byte fallback tokens)")
        return list(ids[0:n])

    def decode_bytes(self, ids, prev: int = -1, skip_special: bool = False) -> bytes:
        ffi, L = lib()
        t = self._handle()
        # the same ids as pyllm.tokenizer.Tokenizer.decode takes, and the same error (run_decode's NULL for an id
        # out of range was skipped: a wrong id vanished from the text)
        ids = [_token_id(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"decode: ids {bad[:5]} outside 0..{self.vocab_size - 1}")
        prev = _int_arg(prev, "decode_bytes prev")
        if not 0 <= prev < self.vocab_size:  # no token before (-1); 2^40 was cffi's OverflowError
            prev = -1
        n = ffi.new("int*")
        out = []
        for i in ids:
            if not (skip_special and L.run_is_special(t, i)):  # as pyllm-run prints: control tokens are not text
                s = L.run_decode(t, prev, i, n)
                out.append(ffi.buffer(s, n[0])[:])
            prev = i  # a skipped token is still the next one's predecessor, as in pyllm-run
        return b"".join(out)

    def decode(self, ids, skip_special: bool = False) -> str:
        return self.decode_bytes(ids, skip_special=skip_special).decode(errors="replace")

    def token_id(self, piece: str) -> int:
        if not isinstance(piece, str):
            raise TypeError(f"token_id expects str, got {type(piece).__name__}")
        return lib()[1].run_token_id(self._handle(), piece.encode())

    def close(self):
        if getattr(self, "_t", None) is not None:
            lib()[1].run_tokenizer_free(self._t)
            self._t = None

    __del__ = close


def f32_positive(v) -> float:
    """A positive sampling setting as the fp32 kernels get it: below FLT_MIN it would round to 0 (temperature 1e-50
    turned greedy, with the T = 1 log-prob; top_p 1e-50 was the binding's range error). FLT_MIN keeps its meaning
    (the limit as the setting goes to 0: the top token(s) only). Here, torch-free, for this module and pyllm.ops."""
    v = float(v)
    return max(v, float(np.finfo(np.float32).tiny)) if v > 0 else v


def sample(logits: np.ndarray, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
           step: int = 0, min_p: float = 0.0) -> int:
    """The C runtime's sampler on a copy of logits (n,)."""
    ffi, L = lib()
    buf = np.ascontiguousarray(logits, dtype=np.float32).copy()
    # the binary checks its -t/-p/-k flags; this entry point passed anything on (a negative temperature sampled,
    # a 2-D array was flattened, a negative seed was cffi's OverflowError)
    if buf.ndim != 1 or buf.size == 0:
        raise ValueError(f"sample: expected non-empty 1-D logits (n,), got shape {buf.shape}")
    for v, n in ((temperature, "temperature"), (top_p, "top_p"), (min_p, "min_p")):  # "1" was a bare TypeError
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise TypeError(f"sample: {n} must be a number, got {v!r}")
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise ValueError(f"sample: temperature must be a finite number >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"sample: top_p must be in (0, 1], got {top_p}")
    top_k, seed, step = (_int_arg(v, f"sample {n}") for v, n in ((top_k, "top_k"), (seed, "seed"), (step, "step")))
    if not 0 <= top_k < 2 ** 31:
        raise ValueError(f"sample: top_k must be in [0, 2^31) (0 = off), got {top_k}")
    if not 0 <= min_p <= 1:
        raise ValueError(f"sample: min_p must be in [0, 1] (0 = off), got {min_p}")
    if not (0 <= seed < 2 ** 64 and -2 ** 31 <= step < 2 ** 31):
        raise ValueError(f"sample: seed must be in [0, 2^64) and step an int32, got seed {seed}, step {step}")
    temperature, top_p, min_p = (f32_positive(v) for v in (temperature, top_p, min_p))
    t = int(L.run_sample(ffi.cast("float*", buf.ctypes.data), buf.size, temperature, top_p, top_k, min_p, seed,
                           step))
    if t == -2:
        raise MemoryError("sample: out of memory for the sampler's scratch buffers")
    if t < 0:
        raise ValueError("sample: logits contain NaN or +inf, or no finite logit")
    return t


class Runtime:
    """Model + tokenizer: generate text with the C runtime exactly as the pyllm-run binary does."""

    def __init__(self, model_bin, tokenizer_bin=None):
        self.model = Model(model_bin)
        self.tokenizer = CTokenizer(tokenizer_bin, self.model.vocab_size) if tokenizer_bin else None
        if self.tokenizer is not None:
            ffi, L = lib()
            err = ffi.new(f"char[{ERR_LEN}]")
            if L.run_tokenizer_check(self.model._m, self.tokenizer._t, err, ERR_LEN):
                raise ValueError(ffi.string(err).decode(errors="replace"))

    def forward(self, token: int, pos: int) -> np.ndarray:
        return self.model.forward(token, pos)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        return self._tok().encode(text, add_bos)

    def decode(self, ids, skip_special: bool = False) -> str:
        return self._tok().decode(ids, skip_special)

    def _tok(self) -> CTokenizer:
        if self.tokenizer is None:
            raise ValueError(f"Runtime({self.model.path!r}) has no tokenizer: pass tokenizer_bin, e.g. the tokenizer.bin "
                             f"next to the model, which pyllm-run takes by default")
        return self.tokenizer

    def generate_ids(self, ids: list[int], steps: int, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                     seed: int = 0, stop: tuple = (), min_p: float = 0.0) -> list[int]:
        """Run `ids` (from position 0), then sample up to `steps` new tokens; returns the new ids."""
        ids = [_int_arg(i, "generate_ids ids") for i in ids]  # an array was "truth value ... is ambiguous"
        if not ids:
            raise ValueError("generate needs at least one token (e.g. BOS)")
        steps = _int_arg(steps, "generate steps")
        if steps < 0:
            raise ValueError(f"generate: steps must be >= 0, got {steps}")
        if len(ids) + steps > self.model.seq_len:
            raise ValueError(f"{len(ids)} + {steps} tokens exceed the model's seq_len {self.model.seq_len}")
        for pos, t in enumerate(ids):
            logits = self.model.forward(t, pos)
        out = []
        pos = len(ids)
        for _ in range(steps):
            nxt = sample(logits, temperature, top_p, top_k, seed, len(out), min_p)  # step as model.generate counts
            if nxt in stop:
                break
            out.append(nxt)
            if len(out) == steps:
                break
            logits = self.model.forward(nxt, pos)
            pos += 1
        return out

    def generate(self, prompt: str, steps: int = 64, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 seed: int = 0, min_p: float = 0.0) -> str:
        """The text of up to `steps` tokens after BOS + prompt, without control tokens (as pyllm-run prints)."""
        tok = self._tok()
        ids = tok.encode(prompt, add_bos=True)
        return tok.decode(self.generate_ids(ids, steps, temperature, top_p, top_k, seed, stop=(tok.bos_id,),
                                            min_p=min_p), skip_special=True)


def run_binary_main() -> None:
    """Console script `pyllm-run`: exec the packaged C binary with the same arguments."""
    if not BIN_PATH.exists():
        print(f"pyllm-run: error: {BIN_PATH} not found; build it with `python setup.py build_ext --inplace` "
              "(or `pip install .`)", file=sys.stderr)
        sys.exit(2)
    os.execv(str(BIN_PATH), [str(BIN_PATH), *sys.argv[1:]])
