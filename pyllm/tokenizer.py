"""pyllm.tokenizer — byte-level BPE on HF `tokenizers` whose ids the C tokenizer (csrc/tokenizer.c) reproduces.

    tok = Tokenizer.train(files=["data.txt"], vocab_size=4096)   # or iterator=..., or Tokenizer.byte_level()
    ids = tok.encode("hello world", add_bos=True); text = tok.decode(ids)
    tok.save("out/")            # out/tokenizer.json (transformers' PreTrainedTokenizerFast loads it)
    tok.save_bin("tokenizer.bin")  # the C binary's file, format in csrc/tokenizer.h

Layout of ids: 0..255 are the single bytes (id i = byte i), then one token per merge in rank order, then the
special tokens in SPECIAL_TOKENS order. Pre-tokenization is an ASCII-only regex (PRETOK_REGEX) so C can run it
on raw UTF-8 bytes. Text that merely looks like a special token ("<|end|>") is encoded as ordinary text unless
encode(..., allow_special=True): a user cannot inject control tokens.
"""
from __future__ import annotations

import json
import operator
import os
import struct
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from tokenizers import AddedToken, Regex
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from .data import atomic_write

SPECIAL_TOKENS = ("<|bos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|pad|>")
DEFAULT = SPECIAL_TOKENS

# Letter runs, single digits (helps arithmetic), runs of anything else (all non-ASCII lands here), each led by
# at most one space; whitespace runs keep their last space for the next word ("  x" -> " ", " x"). ASCII only:
# csrc/tokenizer.c implements exactly this on bytes. Keep in sync with TOKENIZER_PRETOK_V1 in csrc/tokenizer.h.
_WS = r"\t\n\x0b\x0c\r "
PRETOK_REGEX = (rf"[ ]?[A-Za-z]+|[ ]?[0-9]|[ ]?[^{_WS}A-Za-z0-9]+|[{_WS}]+(?![^{_WS}])|[{_WS}]+")

BIN_MAGIC = 0x4B4F5450  # "PTOK"
BIN_VERSION = 1
PRETOK_V1 = 1


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable char map used by HF ByteLevel (tokens are stored in this alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


BYTE_TO_CHAR = _bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


def _pre_tokenizer():
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOK_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def _assemble(vocab: dict[str, int], merges: list[tuple[str, str]], specials: Sequence[str]) -> HFTokenizer:
    """The canonical pyllm tokenizer: BPE without unk/normalizer, our pre-tokenizer, specials appended."""
    bpe = models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False)
    tok = HFTokenizer(bpe)
    tok.pre_tokenizer = _pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False, lstrip=False, rstrip=False)
                            for s in specials])
    return tok


def _check_texts(texts) -> None:
    """Why the tokenizers library refused texts: a non-str, or a lone surrogate (JSON's "\\ud800" escape decodes to
    one; it is not valid Unicode and has no UTF-8 bytes)."""
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"encode: text {i} is {type(t).__name__}, not str")
        try:
            t.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"text has a lone surrogate {t[e.start]!r} at character {e.start} (not valid Unicode; "
                             f"a \\ud800-style JSON escape?)") from None


def _strings(it):
    """Tokenizer.train's documents, each checked: an int was the trainer's "'int' object is not iterable"."""
    for n, t in enumerate(it):
        if not isinstance(t, str):
            raise TypeError(f"Tokenizer.train: iterator item {n} is a {type(t).__name__}, not a string")
        yield t


def _token_id(i) -> int:
    """An id as an int: Python/numpy ints and integer 0-d tensors (int() also took "7" and 7.9)."""
    if isinstance(i, bool):  # True was token 1
        raise ValueError(f"decode: token ids must be integers, got {i!r}")
    try:
        return operator.index(i)
    except TypeError:
        raise ValueError(f"decode: token ids must be integers, got {i!r}") from None


class Tokenizer:
    """Byte-level BPE with pyllm's special tokens; wraps an HF `tokenizers.Tokenizer`."""

    def __init__(self, hf: HFTokenizer, source: str = "<memory>"):
        self._hf = hf
        self.source = source
        spec = json.loads(hf.to_str())
        specials = [t for t in spec.get("added_tokens", []) if t.get("special")]
        self.special_ids = {t["content"]: t["id"] for t in specials}
        missing = [s for s in SPECIAL_TOKENS if s not in self.special_ids]
        if missing:
            raise ValueError(f"{source}: tokenizer lacks special tokens {missing}")
        self._spec = spec
        self.vocab_size = hf.get_vocab_size(with_added_tokens=True)
        vocab = hf.get_vocab(with_added_tokens=True)
        self._id_to_token = [None] * self.vocab_size
        for s, i in vocab.items():
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"{source}: token {s!r} has id {i} outside 0..{self.vocab_size - 1}")
            if self._id_to_token[i] is not None:  # tokenizers loads it, then keeps one of the two by hash order
                raise ValueError(f"{source}: tokens {self._id_to_token[i]!r} and {s!r} both have id {i}")
            self._id_to_token[i] = s
        if any(t is None for t in self._id_to_token):
            raise ValueError(f"{source}: token ids are not contiguous 0..{self.vocab_size - 1}")
        # A twin without added tokens: encodes user text with special-looking strings as plain text.
        plain = dict(spec)
        plain["added_tokens"] = []
        try:  # tokenizers raises a bare Exception for a spec it wrote itself but cannot read back
            self._plain = HFTokenizer.from_str(json.dumps(plain))
        except Exception as e:
            raise ValueError(f"{source}: not a valid tokenizer ({str(e).splitlines()[0][:200]})") from None

    # ---- construction -------------------------------------------------------------------------------------
    @classmethod
    def byte_level(cls, special_tokens: Sequence[str] = DEFAULT) -> "Tokenizer":
        """256 byte tokens (id i = byte i) + specials, no merges: character-level experiments."""
        vocab = {BYTE_TO_CHAR[b]: b for b in range(256)}
        return cls(_assemble(vocab, [], special_tokens), "byte_level")

    @classmethod
    def train(cls, files: Sequence[str | os.PathLike] | None = None, iterator: Iterable[str] | None = None,
              vocab_size: int = 4096, special_tokens: Sequence[str] = DEFAULT, min_frequency: int = 2,
              show_progress: bool = False) -> "Tokenizer":
        """Train byte-level BPE on text files or an iterator of strings. vocab_size counts bytes + specials."""
        if (files is None) == (iterator is None):
            raise ValueError("Tokenizer.train: give exactly one of files= or iterator=")
        if not isinstance(vocab_size, int) or isinstance(vocab_size, bool):
            raise TypeError(f"Tokenizer.train: vocab_size must be an int, got {vocab_size!r}")
        if isinstance(files, (str, os.PathLike)):  # one path: iterated, it was one file per character
            files = [files]
        if isinstance(iterator, (str, bytes)):     # one string: trained on its single characters, 0 merges
            raise TypeError("Tokenizer.train: iterator= takes an iterable of strings (documents), got one string")
        if iterator is not None:
            iterator = _strings(iterator)
        special_tokens = list(special_tokens)
        base = 256 + len(special_tokens)
        if vocab_size < base:
            raise ValueError(f"Tokenizer.train: vocab_size {vocab_size} < 256 bytes + {len(special_tokens)} specials")
        if vocab_size == base:
            return cls.byte_level(special_tokens)
        if files is not None:
            files = [str(f) for f in files]
            for f in files:
                if not os.path.isfile(f):
                    raise FileNotFoundError(f"Tokenizer.train: no such file {f}")
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = _pre_tokenizer()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                      special_tokens=special_tokens, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=show_progress)
        if files is not None:
            hf.train(files, trainer)
        else:
            hf.train_from_iterator(iterator, trainer)
        merges = _merges_of(json.loads(hf.to_str())["model"])
        # Re-number: byte i -> id i, then merge results in rank order (a merge whose result already exists
        # reuses that id, as HF's trainer does), then specials.
        vocab = {BYTE_TO_CHAR[b]: b for b in range(256)}
        for a, b in merges:
            if a not in vocab or b not in vocab:
                raise RuntimeError(f"trained merge ({a!r}, {b!r}) uses an unknown token")
            vocab.setdefault(a + b, len(vocab))
        return cls(_assemble(vocab, merges, special_tokens), "trained")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load tokenizer.json (or a directory containing it)."""
        p = Path(path)
        if p.is_dir():
            p = p / "tokenizer.json"
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no tokenizer.json there")
        try:
            hf = HFTokenizer.from_file(str(p))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise ValueError(f"{p}: not a valid tokenizer.json ({str(e).splitlines()[0][:200]})") from None
        return cls(hf, str(p))

    def save(self, path: str | os.PathLike) -> Path:
        """Write tokenizer.json (atomically). A directory (or a path without .json) gets dir/tokenizer.json plus
        a tokenizer_config.json so transformers' AutoTokenizer finds the special tokens."""
        p = Path(path)
        if p.suffix != ".json" or p.is_dir():  # (a directory named x.json: `--out x.json` made it)
            p.mkdir(parents=True, exist_ok=True)
            cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>", "eos_token": "<|end|>",
                   "pad_token": "<|pad|>", "clean_up_tokenization_spaces": False,
                   "model_max_length": 1_000_000_000}
            atomic_write(p / "tokenizer_config.json", [json.dumps(cfg, indent=2).encode()])
            p = p / "tokenizer.json"
        atomic_write(p, [self.json_bytes()])
        return p

    def json_bytes(self) -> bytes:
        """tokenizer.json's bytes as save writes them (data.tokenizer_hash hashes them without writing a file)."""
        return self._hf.to_str(pretty=True).encode("utf-8")

    # ---- ids ------------------------------------------------------------------------------------------------
    @property
    def bos_id(self) -> int:
        return self.special_ids["<|bos|>"]

    @property
    def end_id(self) -> int:
        return self.special_ids["<|end|>"]

    @property
    def pad_id(self) -> int:
        return self.special_ids["<|pad|>"]

    def role_id(self, role: str) -> int:
        """Id of <|system|> / <|user|> / <|assistant|>."""
        tok = f"<|{role}|>"
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"unknown role {role!r} (expected system, user or assistant)")
        return self.special_ids[tok]

    def encode(self, text: str, add_bos: bool = False, allow_special: bool = False) -> list[int]:
        """Token ids of text. allow_special=True parses literal special-token text ("<|end|>") into its id."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        try:
            ids = (self._hf if allow_special else self._plain).encode(text, add_special_tokens=False).ids
        except TypeError:
            _check_texts([text])  # the precise reason instead of "TextInputSequence must be str"
            raise
        return [self.bos_id, *ids] if add_bos else list(ids)

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False, allow_special: bool = False) -> list[list[int]]:
        if isinstance(texts, (str, bytes)) or not hasattr(texts, "__iter__"):  # a str was 1-character texts
            raise TypeError(f"encode_batch expects a list of str, got {type(texts).__name__}")
        try:
            encs = (self._hf if allow_special else self._plain).encode_batch(list(texts), add_special_tokens=False)
        except TypeError:
            _check_texts(texts)  # the precise reason instead of "TextEncodeInput must be Union[...]"
            raise
        return [[self.bos_id, *e.ids] if add_bos else list(e.ids) for e in encs]

    def _check_ids(self, ids: Sequence[int]) -> list[int]:
        if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):  # None / 104: "not iterable"
            raise TypeError(f"decode: expected a sequence of token ids, got {type(ids).__name__}")
        ids = [_token_id(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"decode: ids {bad[:5]} outside 0..{self.vocab_size - 1}")
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """Text of ids (invalid UTF-8 from a partial sequence becomes U+FFFD)."""
        return self._hf.decode(self._check_ids(ids), skip_special_tokens=skip_special)

    def token_bytes(self, i: int) -> bytes:
        """Raw bytes of one token (a special token gives its text)."""
        s = self._id_to_token[self._check_ids([i])[0]]
        if s in self.special_ids:
            return s.encode("utf-8")
        return bytes(CHAR_TO_BYTE[c] for c in s)

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        return b"".join(self.token_bytes(i) for i in self._check_ids(ids))

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, merges={len(self.merges())}, source={self.source!r})"

    def merges(self) -> list[tuple[str, str]]:
        return _merges_of(self._spec["model"])

    # ---- the C tokenizer file ---------------------------------------------------------------------------------
    def save_bin(self, path: str | os.PathLike) -> Path:
        """Write the C binary's tokenizer file (format: csrc/tokenizer.h), atomically."""
        m = self._spec.get("model", {})
        if m.get("type") != "BPE" or json.dumps(self._spec.get("pre_tokenizer"), sort_keys=True) != json.dumps(
                json.loads(_pre_tokenizer_json()), sort_keys=True) or self._spec.get("normalizer") is not None:
            raise ValueError(f"{self.source}: save_bin needs a pyllm byte-level BPE tokenizer (this one has a "
                             "different model/pre-tokenizer/normalizer, which the C tokenizer cannot reproduce)")
        if m.get("unk_token") is not None or m.get("byte_fallback") or m.get("continuing_subword_prefix") \
                or m.get("end_of_word_suffix") or m.get("ignore_merges"):
            raise ValueError(f"{self.source}: save_bin: BPE options unk/byte_fallback/prefix/suffix/ignore_merges unsupported")
        vocab = self._hf.get_vocab(with_added_tokens=False)
        merges = self.merges()
        # A special token whose text is already a byte or merge token (special_tokens=[..., "a"]) shares that token's
        # id: HF then gives plain text that id too, and the C tokenizer refused the file this wrote, later and
        # obscurely ("byte 0x61 has no token", or "merged token is not the concatenation"). (A special that is only
        # in the model's vocabulary, as HF's trainer puts it there, is never produced by a merge: that is fine.)
        used = {vocab[BYTE_TO_CHAR[b]] for b in range(256) if BYTE_TO_CHAR[b] in vocab}
        used.update(vocab[t] for a, b in merges for t in (a, b, a + b) if t in vocab)
        shared = {s: i for s, i in self.special_ids.items() if i in used}
        if shared:
            raise ValueError(f"{self.source}: save_bin: special tokens {shared} are also byte or merge tokens "
                             "(same ids), which the C tokenizer cannot represent; choose other texts")
        toks = [self.token_bytes(i) for i in range(self.vocab_size)]
        out = [b""]  # header, filled in once the merges are counted
        for t in toks:
            out.append(struct.pack("<I", len(t)) + t)
        for a, b in merges:
            out.append(struct.pack("<3i", vocab[a], vocab[b], vocab[a + b]))
        for name, i in self.special_ids.items():
            nb = name.encode("utf-8")
            out.append(struct.pack("<iI", i, len(nb)) + nb)
        out[0] = struct.pack("<8I", BIN_MAGIC, BIN_VERSION, self.vocab_size, len(merges), len(self.special_ids),
                             max(len(t) for t in toks), PRETOK_V1, 0)
        p = Path(path)
        atomic_write(p, out)
        return p


def _pre_tokenizer_json() -> str:
    t = HFTokenizer(models.BPE())
    t.pre_tokenizer = _pre_tokenizer()
    return json.dumps(json.loads(t.to_str())["pre_tokenizer"])


def _merges_of(model: dict) -> list[tuple[str, str]]:
    """Merges from tokenizer.json's model (both the ["a", "b"] and the old "a b" forms)."""
    out = []
    for m in model.get("merges", []):
        if isinstance(m, str):
            a, b = m.split(" ", 1)
        else:
            a, b = m
        out.append((a, b))
    return out


def write_llama2c_tokenizer(path: str | os.PathLike, pieces: Sequence[bytes | str], scores: Sequence[float]) -> Path:
    """Write a llama2.c tokenizer.bin: uint32 max_token_length, then per token float score, int32 len, bytes."""
    if len(pieces) != len(scores):
        raise ValueError("write_llama2c_tokenizer: pieces and scores differ in length")
    bs = [p.encode("utf-8") if isinstance(p, str) else bytes(p) for p in pieces]
    out = [struct.pack("<I", max((len(b) for b in bs), default=0))]
    for b, s in zip(bs, scores):
        out.append(struct.pack("<fi", float(s), len(b)) + b)
    p = Path(path)
    atomic_write(p, out)
    return p


def read_llama2c_tokenizer(path: str | os.PathLike) -> tuple[list[bytes], list[float]]:
    """(pieces, scores) of a llama2.c tokenizer.bin."""
    data = Path(path).read_bytes()
    if len(data) < 4:
        raise ValueError(f"{path}: truncated llama2.c tokenizer")
    off, pieces, scores = 4, [], []
    while off < len(data):
        if off + 8 > len(data):
            raise ValueError(f"{path}: truncated at byte {off}")
        s, n = struct.unpack_from("<fi", data, off)
        off += 8
        if n < 0 or off + n > len(data):
            raise ValueError(f"{path}: bad token length {n} at byte {off - 4}")
        pieces.append(data[off:off + n])
        scores.append(s)
        off += n
    return pieces, scores
