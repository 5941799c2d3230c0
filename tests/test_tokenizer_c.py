"""Tests for csrc/tokenizer.c through cffi: ids identical to pyllm.tokenizer, llama2.c's tokenizer.bin, and
malformed files failing cleanly. The C file is compiled into a temporary shared library (needs gcc).
Run: PYTHONPATH=$PWD python -m pytest -q tests/test_tokenizer_c.py"""
from __future__ import annotations

import random
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from conftest import SHARED
from pyllm.tokenizer import Tokenizer, write_llama2c_tokenizer, read_llama2c_tokenizer
from test_tokenizer import BIASED, TEXT, TRICKY, corpus

cffi = pytest.importorskip("cffi")
CSRC = Path(__file__).resolve().parents[1] / "csrc"
LLAMA_TOK = SHARED / "data" / "llama2c-tokenizer.bin"


def header_cdef() -> str:
    """tokenizer.h minus comments and preprocessor lines: the declarations cffi needs (no hand-copied struct)."""
    h = re.sub(r"//[^\n]*", "", (CSRC / "tokenizer.h").read_text())
    lines = [ln for ln in h.splitlines() if not ln.strip().startswith("#") and 'extern "C"' not in ln]
    body = "\n".join(lines).strip()
    return body[:body.rfind("}")]  # the closing brace of extern "C"


@pytest.fixture(scope="module")
def C(tmp_path_factory):
    if shutil.which("gcc") is None:
        pytest.skip("gcc not found: cannot compile csrc/tokenizer.c")
    so = tmp_path_factory.mktemp("ctok") / "libtok.so"
    subprocess.run(["gcc", "-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC",
                    str(CSRC / "tokenizer.c"), "-o", str(so)], check=True)
    ffi = cffi.FFI()
    ffi.cdef(header_cdef())
    return ffi, ffi.dlopen(str(so))


class CTok:
    def __init__(self, C, path):
        self.ffi, self.lib = C
        self.t = self.ffi.new("tokenizer*")
        err = self.ffi.new("char[512]")
        self.rc = self.lib.tokenizer_build(self.t, str(path).encode(), err, 512)
        self.err = self.ffi.string(err).decode(errors="replace")
        if self.rc == 0:
            self.t = self.ffi.gc(self.t, self.lib.tokenizer_free)

    def encode_rc(self, s, add_bos=False, allow_special=False):
        """(return code, ids): the raw result, for files whose encode may fail cleanly."""
        b = s.encode("utf-8") if isinstance(s, str) else s
        cap = len(b) + 4
        out = self.ffi.new("int32_t[]", cap)
        n = self.lib.tokenizer_encode_ex(self.t, b, len(b), add_bos * 1 | allow_special * 2, out, cap)
        return n, list(out[0:max(n, 0)])

    def encode(self, s, add_bos=False, allow_special=False):
        n, ids = self.encode_rc(s, add_bos, allow_special)
        assert n >= 0, f"encode error {n}"
        return ids

    def decode(self, ids, prev=-1):
        ln = self.ffi.new("size_t*")
        out = b""
        for i in ids:
            p = self.lib.tokenizer_decode(self.t, prev, i, ln)
            assert p != self.ffi.NULL
            out += self.ffi.buffer(p, ln[0])[:]
            prev = i
        return out


@pytest.fixture(scope="module")
def pair(C, tmp_path_factory):
    tok = Tokenizer.train(iterator=corpus(), vocab_size=400)
    path = tok.save_bin(tmp_path_factory.mktemp("bin") / "tok.bin")
    c = CTok(C, path)
    assert c.rc == 0, c.err
    return tok, c


def test_c_matches_python_on_corpus(pair):
    tok, c = pair
    assert c.t.kind == 1 and c.t.vocab_size == tok.vocab_size
    assert c.t.bos_id == tok.bos_id and c.t.eos_id == tok.end_id
    texts = TRICKY + corpus(100, seed=11) + ["".join(corpus(200, seed=12))]
    for s in texts:
        for add_bos in (False, True):
            for allow in (False, True):
                assert c.encode(s, add_bos, allow) == tok.encode(s, add_bos=add_bos, allow_special=allow), s
        assert c.decode(tok.encode(s)) == s.encode("utf-8")


def test_c_specials(pair):
    tok, c = pair
    for name, i in tok.special_ids.items():
        assert c.lib.tokenizer_special(c.t, name.encode()) == i
        assert c.lib.tokenizer_special(c.t, name[2:-2].encode()) == i
        assert c.decode([i]) == name.encode()
    assert c.lib.tokenizer_special(c.t, b"nope") == -1
    ln = c.ffi.new("size_t*")
    assert c.lib.tokenizer_decode(c.t, -1, tok.vocab_size, ln) == c.ffi.NULL
    assert c.lib.tokenizer_decode(c.t, -1, -3, ln) == c.ffi.NULL


def test_c_byte_level(C, tmp_path):
    tok = Tokenizer.byte_level()
    c = CTok(C, tok.save_bin(tmp_path / "b.bin"))
    assert c.rc == 0, c.err
    s = "héllo <|end|> 🙂"
    assert c.encode(s) == list(s.encode()) == tok.encode(s)
    assert c.encode(s, allow_special=True) == tok.encode(s, allow_special=True)


def test_c_long_runs_are_not_quadratic(pair):
    """A 100 KB run of CJK bytes is one pre-token; the heap merge handles it (a quadratic merge would hang)."""
    tok, c = pair
    s = "漢字你好世界" * 6000  # ~108 KB of non-ASCII bytes, no spaces
    assert c.encode(s) == tok.encode(s)
    s = "a" * 100_000
    assert c.encode(s) == tok.encode(s)


def test_c_output_buffer_too_small(pair):
    tok, c = pair
    b = "hello world 123".encode()
    out = c.ffi.new("int32_t[]", 2)
    assert c.lib.tokenizer_encode(c.t, b, len(b), 0, out, 2) == -5  # TOKENIZER_ERR_SPACE
    assert c.lib.tokenizer_encode(c.t, c.ffi.NULL, 0, 1, out, 2) == 1 and out[0] == tok.bos_id


@settings(max_examples=300, deadline=None)
@given(s=st.one_of(TEXT, BIASED))
def test_c_matches_python_property(pair, s):
    tok, c = pair
    assert c.encode(s) == tok.encode(s)
    assert c.encode(s, True, True) == tok.encode(s, add_bos=True, allow_special=True)


# ---- malformed pyllm files ---------------------------------------------------------------------------------------
def expect_error(C, path, pattern=None):
    c = CTok(C, path)
    assert c.rc < 0, f"{path} loaded but should not"
    assert str(path) in c.err
    if pattern:
        assert re.search(pattern, c.err), c.err
    return c


def test_c_bad_files(C, pair, tmp_path):
    tok, _ = pair
    good = (tmp_path / "g.bin")
    tok.save_bin(good)
    data = good.read_bytes()
    p = tmp_path / "x.bin"
    expect_error(C, tmp_path / "missing.bin", "cannot open")
    p.write_bytes(b"")
    expect_error(C, p)
    p.write_bytes(b"GGUF" + data[4:])
    expect_error(C, p, "not a pyllm tokenizer")
    p.write_bytes(data[:4] + struct.pack("<I", 7) + data[8:])
    expect_error(C, p, "version 7.*reads version 1")
    p.write_bytes(data + b"\0")
    expect_error(C, p, "unexpected bytes")
    # a merge with an id out of range: the merges start after the vocabulary
    off = 32 + sum(4 + len(tok.token_bytes(i)) for i in range(tok.vocab_size))
    p.write_bytes(data[:off] + struct.pack("<i", 10**6) + data[off + 4:])
    expect_error(C, p, "outside")
    # a special token id out of range: the specials follow the merges
    off2 = off + 12 * len(tok.merges())
    p.write_bytes(data[:off2] + struct.pack("<i", tok.vocab_size) + data[off2 + 4:])
    expect_error(C, p, "special token")
    # every truncation fails cleanly
    for n in list(range(0, 64)) + random.Random(0).sample(range(64, len(data)), 300):
        p.write_bytes(data[:n])
        expect_error(C, p)


def test_c_mutated_files_never_crash(C, pair, tmp_path):
    tok, _ = pair
    data = bytearray(Tokenizer.byte_level().save_bin(tmp_path / "b.bin").read_bytes())
    r = random.Random()
    p = tmp_path / "m.bin"
    loaded = 0
    for _ in range(300):
        d = bytearray(data)
        for _ in range(r.randint(1, 4)):
            i = r.randrange(len(d))
            d[i] = r.randrange(256)
        p.write_bytes(bytes(d))
        c = CTok(C, p)
        if c.rc == 0:  # a mutation inside token bytes may still be a valid file: encode works or fails cleanly
            loaded += 1
            n, ids = c.encode_rc("héllo 🙂 <|end|>", True, True)
            # e.g. a mutated "<|bos|>" name leaves no bos id: add_bos is then TOKENIZER_ERR_FORMAT (-2)
            assert n >= 0 or n == -2, n
            assert all(0 <= i < c.t.vocab_size for i in ids)
        else:
            assert c.err
    assert loaded < 300


# ---- llama2.c tokenizer.bin ----------------------------------------------------------------------------------
def llama2c_encode(pieces, scores, text: bytes, bos=True):
    """Plain-Python llama2.c run.c encode: dummy prefix, UTF-8 chars or <0xHH> bytes, best-score pair merges."""
    lookup = {}
    for i, p in enumerate(pieces):
        lookup.setdefault(p, i)
    ids = [1] if bos else []
    if text:
        ids.append(lookup[b" "])
    i = 0
    while i < len(text):
        j = i + 1
        while j < len(text) and text[j] & 0xC0 == 0x80 and j - i < 4:
            j += 1
        if text[i:j] in lookup:
            ids.append(lookup[text[i:j]])
        else:
            ids.extend(b + 3 for b in text[i:j])
        i = j
    while True:
        best, bi, bid = -1e10, -1, -1
        for k in range(len(ids) - 1):
            m = lookup.get(pieces[ids[k]] + pieces[ids[k + 1]])
            if m is not None and scores[m] > best:
                best, bi, bid = scores[m], k, m
        if bi < 0:
            return ids
        ids[bi:bi + 2] = [bid]


@pytest.fixture(scope="module")
def llama(C):
    if not LLAMA_TOK.exists():
        pytest.skip(f"{LLAMA_TOK} not found")
    c = CTok(C, LLAMA_TOK)
    assert c.rc == 0, c.err
    pieces, scores = read_llama2c_tokenizer(LLAMA_TOK)
    return c, pieces, scores


LLAMA_TEXTS = ["Hello world", "Once upon a time, there was a little girl named Lily.", "I love 🙂 pizza",
               "héllo naïve café", "你好，世界", "  two  spaces\n\nnewlines\t", "12345 + 678 = 13023", "", "a",
               "Hi 🌍! 𝕜𝓝 x🌍y"]   # 4-byte UTF-8 characters that are pieces of their own (🙂 is not)


def test_llama2c_known(llama):
    c, pieces, scores = llama
    assert c.t.kind == 2 and c.t.vocab_size == 32000 and c.t.bos_id == 1 and c.t.eos_id == 2
    assert c.encode("Hello world", add_bos=True) == [1, 15043, 3186]  # as sentencepiece/llama2.c give
    ids = c.encode("I love 🙂", add_bos=True)
    assert ids[-4:] == [b + 3 for b in "🙂".encode()]  # byte fallback <0xF0><0x9F><0x99><0x82>
    # a 4-byte character in the vocabulary is one piece: no test text had one, and a C encoder that cut characters
    # after 3 bytes (byte fallback for each part) passed
    for ch, piece in (("🌍", 31494), ("𝕜", 30994), ("𝓝", 31926)):
        assert pieces[piece] == ch.encode() and c.encode(f"a {ch} b") == llama2c_encode(pieces, scores,
                                                                                       f"a {ch} b".encode(), False)
        assert piece in c.encode(f"a {ch} b"), ch
    for s in LLAMA_TEXTS:
        ids = c.encode(s, add_bos=True)
        assert ids == llama2c_encode(pieces, scores, s.encode()), s
        assert c.encode(s) == llama2c_encode(pieces, scores, s.encode(), bos=False)
        assert c.decode(ids[1:], prev=1) == s.encode(), s  # decode strips the dummy space after BOS
    for name, i in ((b"bos", 1), (b"eos", 2), (b"end", 2), (b"<|user|>", -1)):
        assert c.lib.tokenizer_special(c.t, name) == i


@settings(max_examples=60, deadline=None)
@given(s=st.one_of(st.text(st.characters(blacklist_categories=("Cs",)), max_size=30), BIASED))
def test_llama2c_property(llama, s):
    c, pieces, scores = llama
    b = s.encode()
    ids = c.encode(b, add_bos=True)
    assert ids == llama2c_encode(pieces, scores, b)
    assert c.decode(ids[1:], prev=1) == b


def test_llama2c_small_written_file(C, tmp_path):
    pieces = [b"<unk>", b"<s>", b"</s>"] + [f"<0x{b:02X}>".encode() for b in range(256)] + \
             [b" ", b"a", b"b", b"ab", b" ab", b"aa"]
    scores = [0.0] * 259 + [-1.0, -2.0, -3.0, -4.0, -5.0, -4.0]
    p = write_llama2c_tokenizer(tmp_path / "t.bin", pieces, scores)
    c = CTok(C, p)
    assert c.rc == 0, c.err
    for s in [b"ab", b"aab", b"aaaa", b"abab xyz", b"\xff\xfe"]:
        assert c.encode(s, True) == llama2c_encode(pieces, scores, s), s
    # tie between equal-score pairs "ab" and "aa" (-4): leftmost wins
    assert c.encode(b"aab", True) == llama2c_encode(pieces, scores, b"aab")
    bad = tmp_path / "bad.bin"
    data = p.read_bytes()
    bad.write_bytes(data[:-3])
    expect_error(C, bad, "truncated or corrupt")
    bad.write_bytes(data[:4] + struct.pack("<fi", 0.0, 10**9))
    expect_error(C, bad)


# ---- differential checks found by fuzzing C against HF tokenizers -------------------------------------------------
def test_runtime_ctokenizer_encodes_past_nul(pair, tmp_path):
    """pyllm.runtime.CTokenizer.encode went through run_encode, a C string: "a\\0b" was [a] (the rest of the text
    dropped without a word) where pyllm.tokenizer gives [a, \\0, b]."""
    from pyllm import runtime
    if not runtime.LIB_PATH.exists():
        pytest.skip("libpyllm_run.so not built")
    tok, _ = pair
    ct = runtime.CTokenizer(tok.save_bin(tmp_path / "t.bin"), tok.vocab_size)
    for s in ("a\x00b", "hello\x00 world\x00", "\x00", "\x00\x00<|end|>"):
        for add_bos in (False, True):
            assert ct.encode(s, add_bos) == tok.encode(s, add_bos=add_bos), repr(s)


def test_save_bin_refuses_special_that_is_an_ordinary_token(C, tmp_path):
    """special_tokens=[..., "a"] gives the special "a" the id of the byte token a (HF reuses it): save_bin wrote a file the C
    tokenizer then refused ("byte 0x61 has no token"); it now says why at once."""
    from pyllm.tokenizer import DEFAULT
    tok = Tokenizer.byte_level(special_tokens=DEFAULT + ("a",))
    with pytest.raises(ValueError, match=r"special tokens \{'a': 97\} are also byte or merge tokens"):
        tok.save_bin(tmp_path / "t.bin")
    ok = Tokenizer.byte_level(special_tokens=DEFAULT + ("<|tool|>",))  # a new text: its own id, loads in C
    c = CTok(C, ok.save_bin(tmp_path / "ok.bin"))
    assert c.rc == 0, c.err
    assert c.encode("x<|tool|>", allow_special=True) == ok.encode("x<|tool|>", allow_special=True)
    # HF's own trainer puts the specials in the model's vocabulary too (ids 0..5), but no merge makes them: still fine
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
    from pyllm.tokenizer import SPECIAL_TOKENS, _pre_tokenizer
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer, hf.decoder = _pre_tokenizer(), decoders.ByteLevel()
    hf.train_from_iterator(corpus(100), trainers.BpeTrainer(vocab_size=300, special_tokens=list(SPECIAL_TOKENS),
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    raw = Tokenizer(hf, "raw")
    assert raw.bos_id == 0
    c = CTok(C, raw.save_bin(tmp_path / "raw.bin"))
    assert c.rc == 0, c.err
    for s in TRICKY:
        assert c.encode(s, True, True) == raw.encode(s, add_bos=True, allow_special=True), s


# Pieces the seeded fuzz below strings together: whitespace of every kind, contractions, ZWJ emoji, combining marks,
# RTL and CJK text, special-token text and parts of it, code points from every plane.
FUZZ_PARTS = [" ", "  ", "\t", "\n", "\r\n", "\r", "\x0b", "\x0c", "\u00a0", "\u3000", "\u2028", "\u0085", "\x00",
              "'s", "'T", "'Re", "’ll", "the", "The", "KING", "don't", "e\u0301", "\u0301\u0302", "👨‍👩‍👧", "🏳️‍🌈",
              "👍🏽", "שלום", "مرحبا", "\u202e", "漢字你好", "한국어", "𝕜𝓝", "\U0010fffd", "\ufffd", ".", "...", "--",
              "<|end|>", "<|user|>", "<|", "|>", "<|end", "end|>", "<<|bos|>>", "<|pad|>x"]


def fuzz_text(r: random.Random) -> str:
    out = []
    for _ in range(r.randint(0, 10)):
        k = r.randrange(6)
        if k == 0:
            out.append("".join(chr(r.choice([r.randrange(0x20, 0x7f), r.randrange(0x80, 0xd800),
                                             r.randrange(0xe000, 0x110000)])) for _ in range(r.randint(1, 6))))
        elif k == 1:
            out.append("".join(r.choice("0123456789") for _ in range(r.randint(1, 25))))
        elif k == 2:
            out.append(r.choice("a é漢🙂.\n0") * r.randint(1, 80))
        else:
            out.append(r.choice(FUZZ_PARTS))
    return "".join(out)


def test_c_matches_hf_seeded_fuzz(C, tmp_path):
    """Differential fuzz, C vs HF: encode (every flag) of mixed Unicode text, and decode of random ids (specials and
    lone UTF-8 bytes included) as pyllm-run streams them piece by piece, against HF's decode of the whole."""
    r = random.Random(1234)
    docs = [fuzz_text(random.Random(i)) for i in range(400)] + corpus(200)
    toks = [Tokenizer.byte_level(), Tokenizer.train(iterator=docs, vocab_size=300),
            Tokenizer.train(iterator=docs, vocab_size=1200)]
    for n, tok in enumerate(toks):
        c = CTok(C, tok.save_bin(tmp_path / f"t{n}.bin"))
        assert c.rc == 0, c.err
        specials = sorted(tok.special_ids.values())
        for _ in range(600):
            s = fuzz_text(r)
            for flags in range(4):
                want = tok.encode(s, add_bos=bool(flags & 1), allow_special=bool(flags & 2))
                assert c.encode(s, bool(flags & 1), bool(flags & 2)) == want, (n, flags, s)
            ids = [r.choice([r.randrange(tok.vocab_size), r.randrange(128, 256), r.choice(specials)])
                   for _ in range(r.randint(0, 12))]
            pieces = [c.decode([i]) for i in ids]  # one token at a time, as pyllm-run prints
            assert b"".join(pieces).decode(errors="replace") == tok.decode(ids), (n, ids)
            shown = b"".join(p for i, p in zip(ids, pieces) if i not in specials)  # pyllm-run skips control tokens
            assert shown.decode(errors="replace") == tok.decode(ids, skip_special=True), (n, ids)
