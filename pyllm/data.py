"""Token shards and packed batches: input reading (.txt/.jsonl/globs/dirs), the shard format, and the B x T loader.

Shard file (little-endian): a 256-byte header -- magic b"PYLLMTOK", version u32, bytes per token u32 (2 = uint16,
4 = uint32), token count u64, document count u64, vocab size u32, tokenizer hash (32 ASCII hex chars) -- then the
tokens, each document preceded by the tokenizer's bos (document-boundary) token. Read with np.memmap.
A data directory (written by `pyllm prepare`) holds tokenizer.json, manifest.json (the shards that are complete,
per split) and the shards; only shards listed in the manifest are ever read.
Used by pyllm.prepare and pyllm.pretrain; tests: tests/test_data.py.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

MAGIC = b"PYLLMTOK"
VERSION = 1
HEADER_BYTES = 256
_HEAD = struct.Struct("<8sIIQQI32s")  # magic, version, token bytes, n_tokens, n_docs, vocab_size, tokenizer hash
MANIFEST = "manifest.json"
TEXT_SUFFIXES = (".txt", ".jsonl")
UTF8_BOM = b"\xef\xbb\xbf"  # what Windows editors put first in a UTF-8 file: not part of the text (nor JSON)


# --- small helpers -------------------------------------------------------------------------------------------
def read_json(path, what: str):
    """The JSON value in file `path`; bad JSON or non-UTF-8 bytes are one ValueError "<path>: <what> (<why>)"."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: {what} ({getattr(e, 'msg', e)})") from None
    except RecursionError:  # json's C scanner recurses per nesting level
        raise ValueError(f"{path}: {what} (nested too deeply)") from None


def named(e: OSError, path) -> OSError:
    """e, naming path when it names no file: a full disk's ENOSPC from write() or fsync() carries no file name,
    and "error: [Errno 28] No space left on device" did not say which output."""
    return OSError(e.errno, e.strerror, str(path)) if e.filename is None and e.errno is not None else e


def atomic_write(path, chunks, tmp_suffix: str = ".tmp") -> None:
    """Write the bytes-like `chunks` to path via path + tmp_suffix, fsync, rename, so a crash never leaves a
    half-written file; a failed write (a full disk, path a directory) removes the tmp and names path in its error."""
    path = str(path)
    tmp = path + tmp_suffix
    try:
        with open(tmp, "wb") as f:
            for c in chunks:
                f.write(c)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.isfile(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):
            if e.filename == tmp:  # e.g. the parent directory is missing: name the output, not our temporary
                raise OSError(e.errno, e.strerror, path) from e
            raise named(e, path) from e
        raise


def atomic_write_text(path, text: str) -> None:
    atomic_write(path, [text.encode("utf-8")])


def tokenizer_hash(tok) -> str:
    """A 32-hex-char fingerprint of a tokenizer: sha256 of its tokenizer.json bytes as save writes them (vocab,
    merges, specials)."""
    return hashlib.sha256(tok.json_bytes()).hexdigest()[:32]


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 65536 else np.uint32


# --- shard format --------------------------------------------------------------------------------------------
def write_shard(path, tokens: np.ndarray, vocab_size: int, tok_hash: str, n_docs: int) -> None:
    """Write tokens (N,) as a shard: header + data to `<path>.tmp`, fsync, then rename (never a partial shard)."""
    path = str(path)
    dt = token_dtype(vocab_size)
    arr = np.ascontiguousarray(tokens, dtype=dt)
    if arr.size and int(tokens.max()) >= vocab_size:
        raise ValueError(f"{path}: token id {int(tokens.max())} >= vocab size {vocab_size}")
    head = _HEAD.pack(MAGIC, VERSION, np.dtype(dt).itemsize, arr.size, n_docs, vocab_size,
                      tok_hash.encode("ascii")[:32].ljust(32, b"0"))
    atomic_write(path, [head.ljust(HEADER_BYTES, b"\0"), memoryview(arr).cast("B")])


def read_header(path) -> dict:
    """Parse and check a shard header; a truncated or foreign file gets a one-line ValueError naming it."""
    path = str(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(HEADER_BYTES)
    if len(raw) < HEADER_BYTES or raw[:8] != MAGIC:
        raise ValueError(f"{path}: not a pyllm token shard (bad magic)")
    magic, version, nbytes, n_tokens, n_docs, vocab, h = _HEAD.unpack(raw[:_HEAD.size])
    if version != VERSION:
        raise ValueError(f"{path}: shard version {version}, this pyllm reads version {VERSION}")
    if nbytes not in (2, 4):
        raise ValueError(f"{path}: bad token width {nbytes}")
    if size != HEADER_BYTES + n_tokens * nbytes:
        raise ValueError(f"{path}: truncated shard: header says {n_tokens} tokens, file holds "
                         f"{(size - HEADER_BYTES) // nbytes}")
    try:
        thash = h.decode("ascii")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: corrupt shard header (tokenizer hash is not ASCII)") from None
    return dict(path=path, n_tokens=n_tokens, n_docs=n_docs, vocab_size=vocab, tokenizer_hash=thash,
                dtype=np.uint16 if nbytes == 2 else np.uint32)


def open_shard(path) -> tuple[dict, np.ndarray]:
    """(header, memmap of the tokens)."""
    h = read_header(path)
    if h["n_tokens"] == 0:
        return h, np.zeros(0, h["dtype"])
    return h, np.memmap(path, dtype=h["dtype"], mode="r", offset=HEADER_BYTES, shape=(h["n_tokens"],))


# --- reading text inputs -------------------------------------------------------------------------------------
@dataclass
class InputStats:
    files: int = 0
    docs: int = 0
    chars: int = 0
    empty_files: int = 0
    empty_docs: int = 0
    bad_utf8_docs: int = 0   # documents with invalid UTF-8 (decoded with U+FFFD replacement)
    bad_lines: int = 0       # malformed JSONL lines skipped under --skip-bad-lines
    notes: list = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["notes"] = d["notes"][:20]
        return d


def expand_inputs(patterns) -> list[str]:
    """Files, directories (searched recursively for .txt/.jsonl) and globs -> sorted, de-duplicated file list."""
    out: list[str] = []
    seen: set[str] = set()  # real paths: `in.txt ./in.txt` read the file twice (its val documents also trained on)
    for p in [patterns] if isinstance(patterns, (str, Path)) else patterns:
        p = str(p)
        if os.path.isdir(p):
            found = [str(q) for q in Path(p).rglob("*") if q.is_file() and q.suffix in TEXT_SUFFIXES]
            if not found:
                raise FileNotFoundError(f"{p}: directory holds no .txt or .jsonl files")
        elif os.path.isfile(p):
            found = [p]
        else:
            found = [q for q in glob.glob(p, recursive=True) if os.path.isfile(q)]
            if not found:
                raise FileNotFoundError(f"{p}: no such file, and no file matches it as a glob")
        for q in sorted(found):
            if not q.endswith(TEXT_SUFFIXES):
                raise ValueError(f"{q}: unsupported input type (use .txt or .jsonl)")
            real = os.path.realpath(q)
            if real not in seen:
                seen.add(real)
                out.append(q)
    return out


def _decode(raw: bytes, stats: InputStats, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        stats.bad_utf8_docs += 1
        stats.notes.append(f"{where}: invalid UTF-8 at byte {e.start}; replaced with U+FFFD")
        return raw.decode("utf-8", errors="replace")


def _is_unicode(s: str) -> bool:
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def iter_documents(files, stats: InputStats | None = None, skip_bad_lines: bool = False, doc_sep: str = ""):
    """Yield document strings: a .txt file is one document (or several, split on doc_sep); a .jsonl line's "text"."""
    stats = stats if stats is not None else InputStats()
    for path in files:
        stats.files += 1
        if os.path.getsize(path) == 0:
            stats.empty_files += 1
            continue
        if path.endswith(".jsonl"):
            n_here = 0
            with open(path, "rb") as f:
                for lineno, line in enumerate(f, 1):
                    if lineno == 1:
                        line = line.removeprefix(UTF8_BOM)
                    if not line.strip():
                        continue
                    err = None
                    try:
                        obj = json.loads(_decode(line, stats, f"{path}:{lineno}"))
                        if not isinstance(obj, dict) or "text" not in obj:
                            err = 'no "text" field'
                        elif not isinstance(obj["text"], str):
                            err = f'"text" is {type(obj["text"]).__name__}, not a string'
                        elif b"\\u" in line and not _is_unicode(obj["text"]):  # only an escape makes a surrogate
                            err = '"text" has a lone surrogate (a \\ud800-style escape): not valid Unicode'
                    except json.JSONDecodeError as e:
                        err = f"not valid JSON ({e.msg} at column {e.colno})"
                    except RecursionError:  # json's C scanner recurses per nesting level
                        err = "not valid JSON (nested too deeply)"
                    except ValueError as e:  # an integer past int()'s 4300-digit limit: the line was not named
                        err = f"not valid JSON ({str(e).split(';')[0]})"
                    if err:
                        if not skip_bad_lines:
                            raise ValueError(f"{path}:{lineno}: {err} (use --skip-bad-lines to skip such lines)")
                        stats.bad_lines += 1
                        stats.notes.append(f"{path}:{lineno}: skipped: {err}")
                        continue
                    n_here += 1
                    yield from _emit([obj["text"]], stats)
            if n_here == 0:
                stats.empty_files += 1
        else:
            with open(path, "rb") as f:
                text = _decode(f.read().removeprefix(UTF8_BOM), stats, path)
            yield from _emit(_split_docs(text, doc_sep), stats)


def _split_docs(text: str, doc_sep: str) -> list[str]:
    """text split on doc_sep; a newline in doc_sep also matches a CRLF one: '\\n\\n' never matched a Windows file's
    blank lines ("\\r\\n\\r\\n"), so the whole file was one document (and no validation split) without a word."""
    if not doc_sep:
        return [text]
    if "\n" in doc_sep and "\r" not in doc_sep and "\r\n" in text:
        return re.split("\r?\n".join(map(re.escape, doc_sep.split("\n"))), text)
    return text.split(doc_sep)


def _emit(texts, stats: InputStats):
    for t in texts:
        if not t.strip():
            stats.empty_docs += 1
            continue
        stats.docs += 1
        stats.chars += len(t)
        yield t


# --- reading a prepared data directory -----------------------------------------------------------------------
def read_manifest(data_dir) -> dict:
    p = Path(data_dir) / MANIFEST
    if not p.is_file():
        raise FileNotFoundError(f"{data_dir}: no {MANIFEST} (not a prepared data directory; run `pyllm prepare`)")
    m = read_json(p, "corrupt manifest")
    # the fields every reader indexes: a hand-edited or foreign manifest is one error, not a KeyError later
    shard_keys = {"file", "split", "n_tokens", "doc_end"}
    if (not isinstance(m, dict) or not {"tokenizer_hash", "vocab_size", "bos_id", "shards"} <= set(m)
            or not isinstance(m["shards"], list)
            or not all(isinstance(sh, dict) and shard_keys <= set(sh) for sh in m["shards"])):
        raise ValueError(f"{p}: corrupt manifest (expected an object with tokenizer_hash, vocab_size, bos_id and a "
                         f"shards list of {{{', '.join(sorted(shard_keys))}}}); rerun `pyllm prepare --overwrite`")
    if m.get("format", "pyllm-tokens") != "pyllm-tokens" or m.get("version", VERSION) != VERSION \
            or type(m.get("version", VERSION)) is not int:
        raise ValueError(f"{p}: format {m.get('format')!r} version {m.get('version')!r}; this pyllm reads "
                         f"'pyllm-tokens' version {VERSION} (rerun `pyllm prepare --overwrite`)")
    from .config import MAX_SIZES  # a vocab_size past the model's limit failed later in ModelConfig, unnamed
    for k, lo, hi in (("vocab_size", 1, MAX_SIZES["vocab_size"]), ("bos_id", 0, MAX_SIZES["vocab_size"] - 1)):
        v = m[k]
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            raise ValueError(f"{p}: corrupt manifest ({k} must be an integer in [{lo}, {hi}], got {v!r})")
    if not isinstance(m["tokenizer_hash"], str):
        raise ValueError(f"{p}: corrupt manifest (tokenizer_hash must be a string)")
    if m["bos_id"] >= m["vocab_size"]:  # else no token is a document boundary: attention ran across documents
        raise ValueError(f"{p}: corrupt manifest (bos_id {m['bos_id']} is not below vocab_size {m['vocab_size']})")
    if not isinstance(m.get("complete", False), bool):  # "complete": "no" read as done
        raise ValueError(f"{p}: corrupt manifest (complete must be true or false, got {m['complete']!r})")
    # each shard entry's fields: a "file" of 5 was a TypeError traceback, and "../other/train_00000.bin" was read
    # from another directory, and deleted there by a rerun of prepare as a damaged shard; a shard listed twice was
    # trained on twice, one of split "test" silently left out (and its tokens re-encoded into the next train shard
    # by a resumed prepare); a "doc_end" of "x" a TypeError traceback in the resume
    seen = set()
    for i, sh in enumerate(m["shards"]):
        f = sh["file"]
        if not is_shard_name(f):
            raise ValueError(f"{p}: corrupt manifest (shard {i}: file {f!r} is not a file name in the directory)")
        if f in seen:
            raise ValueError(f"{p}: corrupt manifest (shard {f} is listed twice)")
        seen.add(f)
        if sh["split"] not in ("train", "val"):
            raise ValueError(f"{p}: corrupt manifest (shard {f}: split {sh['split']!r}, expected 'train' or 'val')")
        for k in ("n_tokens", "doc_end"):
            if type(sh[k]) is not int or sh[k] < 0:
                raise ValueError(f"{p}: corrupt manifest (shard {f}: {k} must be an integer >= 0, got {sh[k]!r})")
    return m


def is_shard_name(name) -> bool:
    """A manifest's shard "file" as prepare writes it: a plain name inside the data directory, no path."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "\0" not in name and os.sep not in name
            and not (os.altsep and os.altsep in name))


class TokenStream:
    """All shards of one split as one concatenated token stream; every header is checked against the manifest."""

    def __init__(self, data_dir, split: str = "train", tokenizer_hash: str | None = None,
                 vocab_size: int | None = None):
        m = read_manifest(data_dir)
        if not m.get("complete"):
            raise ValueError(f"{data_dir}: `pyllm prepare` did not finish ({len(m.get('shards', []))} shards done);"
                             " rerun the same command to resume it")
        want_hash = tokenizer_hash or m["tokenizer_hash"]
        if tokenizer_hash and tokenizer_hash != m["tokenizer_hash"]:
            raise ValueError(f"{data_dir}: data was tokenized with tokenizer {m['tokenizer_hash']}, "
                             f"but this run's tokenizer is {tokenizer_hash}")
        self.vocab_size, self.bos_id = m["vocab_size"], m["bos_id"]
        if vocab_size is not None and m["vocab_size"] > vocab_size:
            raise ValueError(f"{data_dir}: data vocab size {m['vocab_size']} exceeds the model's {vocab_size}")
        self.shards, self.paths, sizes = [], [], []
        for s in m["shards"]:
            if s["split"] != split:
                continue
            path = Path(data_dir) / s["file"]
            h, arr = open_shard(path)
            if h["tokenizer_hash"] != want_hash or h["vocab_size"] != m["vocab_size"]:
                raise ValueError(f"{path}: shard from a different tokenizer (hash {h['tokenizer_hash']}, vocab "
                                 f"{h['vocab_size']}; the data directory's is {want_hash}, vocab {m['vocab_size']})")
            if h["n_tokens"] != s["n_tokens"]:
                raise ValueError(f"{path}: holds {h['n_tokens']} tokens, manifest says {s['n_tokens']}")
            self.shards.append(arr)
            self.paths.append(path)
            sizes.append(h["n_tokens"])
        self.offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        self.n_tokens = int(self.offsets[-1])

    def get(self, start: int, n: int) -> np.ndarray:
        """Tokens [start, start+n) as int64, crossing shard boundaries as needed."""
        out = np.empty(n, np.int64)
        i = int(np.searchsorted(self.offsets, start, side="right")) - 1
        done = 0
        while done < n:
            lo = start + done - int(self.offsets[i])
            take = min(n - done, len(self.shards[i]) - lo)
            out[done:done + take] = self.shards[i][lo:lo + take]
            if take and int(out[done:done + take].max()) >= self.vocab_size:  # else an index error deep in the model
                raise ValueError(f"{self.paths[i]}: token id {int(out[done:done + take].max())} >= the vocab size "
                                 f"{self.vocab_size} (corrupt shard; rerun `pyllm prepare --overwrite`)")
            done += take
            i += 1
        return out


class PackedLoader:
    """(x, y, doc_ids) batches of B rows x T tokens cut from the concatenated document stream.

    The stream is cut into windows of T+1 tokens at stride T, shifted by a per-epoch random offset; windows are
    visited in a per-epoch permutation from `seed`. Each call consumes B*world_size windows; rank r takes its B.
    An epoch ends at an optimizer step's boundary (accum calls a step). So the windows seen per optimizer step are
    the same whatever the split over ranks and micro-steps, and the position (epoch, pos) is all resume needs.
    doc_ids count bos tokens along a row: attention stays inside a document.
    """

    def __init__(self, stream: TokenStream, batch_size: int, seq_len: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True, accum: int = 1):
        self.stream, self.B, self.T, self.seed, self.accum = stream, batch_size, seq_len, seed, accum
        self.rank, self.world, self.shuffle = rank, world_size, shuffle
        room = stream.n_tokens - 1 - (seq_len - 1 if shuffle else 0)
        self.n_windows = max(0, room // seq_len)
        if self.n_windows < batch_size * world_size:
            raise ValueError(f"not enough tokens: {stream.n_tokens} tokens make {self.n_windows} windows of "
                             f"{seq_len}+1, but one batch needs {batch_size * world_size}; lower --batch-size or "
                             f"--seq-len, or add data")
        self.epoch, self.pos = 0, 0
        self._cache = None

    def _order(self):
        if self._cache is None or self._cache[0] != self.epoch:
            if self.shuffle:
                rng = np.random.default_rng([self.seed, self.epoch])
                shift = int(rng.integers(0, self.T))
                perm = rng.permutation(self.n_windows)
            else:
                shift, perm = 0, np.arange(self.n_windows)
            self._cache = (self.epoch, shift, perm)
        return self._cache[1], self._cache[2]

    def next_batch(self, device="cpu"):
        import torch
        g = self.B * self.world
        # whether a step's windows fit in the epoch is decided at its first micro-batch: decided per call, 1 process x
        # 2 micro-batches ended the epoch mid-step where 2 ranks ended it before the step (another order from then on)
        if self.pos + g > self.n_windows or (self.pos % (g * self.accum) == 0
                                             and self.pos + g * self.accum > self.n_windows):
            self.epoch, self.pos = self.epoch + 1, 0
        shift, perm = self._order()
        idx = perm[self.pos + self.rank * self.B: self.pos + (self.rank + 1) * self.B]
        self.pos += g
        rows = np.stack([self.stream.get(shift + int(i) * self.T, self.T + 1) for i in idx])  # (B, T+1)
        x, y = rows[:, :-1], rows[:, 1:]
        doc_ids = np.cumsum(x == self.stream.bos_id, axis=1, dtype=np.int32)  # (B, T)
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)  # noqa: E731
        return t(x), t(y), t(doc_ids)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "seed": self.seed, "n_windows": self.n_windows,
                "seq_len": self.T}

    def load_state_dict(self, d: dict) -> None:
        if d["n_windows"] != self.n_windows or d["seq_len"] != self.T:
            raise ValueError(f"data position is for {d['n_windows']} windows of {d['seq_len']} tokens, but the data "
                             f"now gives {self.n_windows} of {self.T}: the data or --seq-len changed since the "
                             "checkpoint")
        self.epoch, self.pos, self.seed = int(d["epoch"]), int(d["pos"]), int(d["seed"])
        self._cache = None
