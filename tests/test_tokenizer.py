"""Tests for pyllm.tokenizer (Python side): training, ids layout, specials, round trip, HF compatibility, files.
Run: PYTHONPATH=$PWD python -m pytest -q tests/test_tokenizer.py"""
from __future__ import annotations

import json
import random
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from pyllm.tokenizer import PRETOK_REGEX, SPECIAL_TOKENS, Tokenizer

WORDS = ["the", "cat", "sat", "on", "mat", "héllo", "naïve", "café", "Straße", "你好", "世界", "東京", "🙂", "🚀🚀",
         "don't", "x=1+2", "<|end|>", "A", "Zebra", "éé", "ñ", "...", "--", "\t", "aaaa", "aaaaaaa"]
# Text built to exercise every pre-tokenizer branch: whitespace runs before words/digits/punctuation, tabs,
# newlines, digit runs, mixed scripts, special-token-looking text.
TRICKY = ["", " ", "  ", "a", " a", "  a", "a  ", "\n", " \n ", "\t\t\nyou", "x 12345 y", " 1 22  333",
          "Hello  world\n\n  x", "héllo 你好 🙂", "a\u00a0b\u3000c", "<|end|> <|bos|><|user|>", "<|end", "aaaa",
          "aaaaaaaaa", "  \t  .,;", "über-Größe 3.14159", "\r\n\r\n", "\x0b\x0c", "#!/bin/sh\n  echo $((1+2))",
          "漢字漢字漢字" * 20, "🙂" * 50, " " * 40 + "x"]


def corpus(n_lines: int = 400, seed: int = 0) -> list[str]:
    r = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        parts = []
        for _ in range(r.randint(1, 12)):
            w = r.choice(WORDS) if r.random() < 0.8 else str(r.randint(0, 10 ** r.randint(1, 6)))
            parts.append(w + r.choice([" ", " ", " ", "  ", ", ", ". ", "\n", "\t"]))
        lines.append("".join(parts))
    return lines


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(iterator=corpus(), vocab_size=400)


def test_train_layout_and_specials(tok):
    assert tok.vocab_size == 400  # the corpus has enough pairs to fill the requested size
    for b in range(256):  # byte i is id i in every pyllm tokenizer
        assert tok.token_bytes(b) == bytes([b])
    assert list(tok.special_ids) == list(SPECIAL_TOKENS)
    assert list(tok.special_ids.values()) == list(range(400 - len(SPECIAL_TOKENS), 400))
    assert tok.bos_id == tok.special_ids["<|bos|>"] and tok.end_id == tok.special_ids["<|end|>"]
    assert len(tok.merges()) > 50
    # merges actually compress the training text
    text = "".join(corpus(50, seed=1))
    assert len(tok.encode(text)) < 0.6 * len(text.encode())


def test_train_from_files(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("".join(corpus(200, seed=3)), encoding="utf-8")
    t = Tokenizer.train(files=[f], vocab_size=300)
    assert 262 < t.vocab_size <= 300
    s = "the cat sat on the mat"
    assert t.decode(t.encode(s)) == s
    with pytest.raises(FileNotFoundError):
        Tokenizer.train(files=[tmp_path / "missing.txt"], vocab_size=300)
    with pytest.raises(ValueError, match="vocab_size"):
        Tokenizer.train(iterator=["abc"], vocab_size=100)


def test_byte_level():
    t = Tokenizer.byte_level()
    assert t.vocab_size == 256 + len(SPECIAL_TOKENS)
    assert t.special_ids == {s: 256 + i for i, s in enumerate(SPECIAL_TOKENS)}
    s = "héllo 你好 🙂\n"
    assert t.encode(s) == list(s.encode("utf-8"))
    assert t.encode(s, add_bos=True) == [256, *s.encode("utf-8")]
    assert t.decode(t.encode(s)) == s
    assert Tokenizer.train(iterator=["abc"], vocab_size=262).encode("abc") == [97, 98, 99]


def test_special_text_is_not_parsed_by_default(tok):
    s = "hi <|end|> there<|user|>"
    ids = tok.encode(s)
    assert not set(ids) & set(tok.special_ids.values())  # a user cannot inject control tokens
    assert tok.decode(ids) == s
    ids2 = tok.encode(s, allow_special=True)
    assert tok.end_id in ids2 and tok.special_ids["<|user|>"] in ids2
    assert tok.decode(ids2) == s
    assert tok.decode(ids2, skip_special=True) == "hi  there"
    assert tok.encode_batch([s, "x"], add_bos=True) == [[tok.bos_id, *ids], [tok.bos_id, *tok.encode("x")]]


def test_pretokenizer_matches_python_re(tok):
    """The HF pre-tokenizer equals Python's `re` running PRETOK_REGEX on bytes — the rule C implements."""
    pat = re.compile(PRETOK_REGEX.encode())
    hf = tok._plain.pre_tokenizer
    from pyllm.tokenizer import CHAR_TO_BYTE
    for s in TRICKY + corpus(30, seed=5):
        got = [bytes(CHAR_TO_BYTE[c] for c in p) for p, _ in hf.pre_tokenize_str(s)]
        assert got == pat.findall(s.encode("utf-8")), s


def reference_bpe(tok: Tokenizer, text: str) -> list[int]:
    """Plain-Python BPE: pre-tokenize with `re` on bytes, then merge the lowest-rank pair, leftmost first."""
    from pyllm.tokenizer import CHAR_TO_BYTE
    vocab = tok._hf.get_vocab(with_added_tokens=False)
    tb = {i: bytes(CHAR_TO_BYTE[c] for c in s) for s, i in vocab.items()}
    ranks = {(vocab[a], vocab[b]): (r, vocab[a + b]) for r, (a, b) in enumerate(tok.merges())}
    out = []
    for piece in re.findall(PRETOK_REGEX.encode(), text.encode("utf-8")):
        syms = list(piece)
        while True:
            cands = [(ranks[p][0], i) for i, p in enumerate(zip(syms, syms[1:])) if p in ranks]
            if not cands:
                break
            _, i = min(cands)
            syms[i:i + 2] = [ranks[(syms[i], syms[i + 1])][1]]
        out += syms
        assert b"".join(tb[s] for s in syms) == piece
    return out


def test_bpe_matches_reference_ties(tok):
    """Repeats ("aaaaaaa") have equal-rank overlapping pairs: HF merges leftmost first, like the reference."""
    assert any(a == "a" and b == "a" for a, b in tok.merges())
    for s in TRICKY + corpus(40, seed=7):
        assert tok.encode(s) == reference_bpe(tok, s), s


TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=200)
BIASED = st.lists(st.sampled_from(list(" \t\n\r\x0b\x0c aZ09é你🙂.<|>_") + ["<|end|>", "aaaa", "  "]),
                  max_size=40).map("".join)


@settings(max_examples=300, deadline=None)
@given(s=st.one_of(TEXT, BIASED))
def test_round_trip_any_unicode(tok, s):
    ids = tok.encode(s)
    assert tok.decode(ids) == s
    assert tok.decode_bytes(ids) == s.encode("utf-8")
    assert tok.decode(tok.encode(s, allow_special=True)) == s


def test_save_load_and_transformers(tok, tmp_path):
    p = tok.save(tmp_path / "tokdir")
    assert p.name == "tokenizer.json" and not list(tmp_path.glob("**/*.tmp"))
    t2 = Tokenizer.load(tmp_path / "tokdir")
    texts = TRICKY + corpus(30, seed=9)
    assert t2.encode_batch(texts) == tok.encode_batch(texts)
    assert t2.special_ids == tok.special_ids
    transformers = pytest.importorskip("transformers")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(p))
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "tokdir"))
    for s in texts:
        # transformers always parses special-token text: compare against allow_special=True
        want = tok.encode(s, allow_special=True)
        assert fast.encode(s, add_special_tokens=False) == want, s
        assert auto.encode(s, add_special_tokens=False) == want, s
        # tokenizer_config.json turns transformers' space clean-up off ("a ." stayed "a ." only where its default did)
        assert auto.decode(want) == tok.decode(want), s
        assert fast.decode(want, clean_up_tokenization_spaces=False) == tok.decode(want), s
    assert auto.bos_token_id == tok.bos_id and auto.eos_token_id == tok.end_id and auto.pad_token_id == tok.pad_id


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        Tokenizer.load(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        Tokenizer.load(bad)
    # a valid tokenizer.json without pyllm's special tokens
    spec = json.loads(Tokenizer.byte_level()._hf.to_str())
    spec["added_tokens"] = []
    bad.write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="special tokens"):
        Tokenizer.load(bad)


def test_two_tokens_with_one_id_is_one_line(tok, tmp_path):
    """Found by a mutation fuzz of tokenizer.json: a merge token given a byte's id (0) loaded in tokenizers, which
    then kept one of the two by hash order: the plain twin's from_str was a bare `Exception: Token ... out of
    vocabulary` traceback in most runs, "ids are not contiguous" in the others."""
    spec = json.loads(tok._hf.to_str())
    last = max(spec["model"]["vocab"], key=spec["model"]["vocab"].get)  # a merge result: its merge names it
    spec["model"]["vocab"][last] = 0
    bad = tmp_path / "tokenizer.json"
    bad.write_text(json.dumps(spec))
    for _ in range(4):  # the hash order differs per process, not per load: the check must not depend on it
        with pytest.raises(ValueError) as e:
            Tokenizer.load(bad)
        assert str(e.value).startswith(f"{bad}: tokens ") and f"{last!r}" in str(e.value) and "both have id 0" \
            in str(e.value), e.value


def test_decode_rejects_bad_ids(tok):
    with pytest.raises(ValueError, match="outside"):
        tok.decode([1, tok.vocab_size])
    with pytest.raises(ValueError):
        tok.decode([-1])
    for bad in ("a", "7", 7.9, None):  # were int()'s "invalid literal for int() with base 10: 'a'", or 7
        with pytest.raises(ValueError, match=f"decode: token ids must be integers, got {bad!r}"):
            tok.decode([1, bad])
    assert tok.decode(torch.tensor([72, 105])) == tok.decode([72, 105]) == tok.decode(np.array([72, 105]))


def test_failed_save_leaves_no_tmp(tmp_path):
    """save/save_bin onto a directory fail with the OSError naming it, and leave no half-written .tmp beside it."""
    t = Tokenizer.byte_level()
    d = tmp_path / "taken"
    d.mkdir()
    with pytest.raises(IsADirectoryError, match="taken"):
        t.save_bin(d)
    (d / "tokenizer.json").mkdir()
    with pytest.raises(IsADirectoryError, match="tokenizer.json"):
        t.save(d)
    assert sorted(p.name for p in tmp_path.rglob("*.tmp")) == []


def test_encode_explains_what_the_library_refused():
    """Were the tokenizers library's "TextInputSequence must be str" / "TextEncodeInput must be Union[...]"."""
    t = Tokenizer.byte_level()
    with pytest.raises(ValueError, match=r"lone surrogate '\\ud800' at character 1"):
        t.encode("a\ud800")
    with pytest.raises(ValueError, match="lone surrogate"):
        t.encode_batch(["ok", "x\udc00"])
    with pytest.raises(TypeError, match="text 1 is int, not str"):
        t.encode_batch(["a", 3])


def test_train_and_decode_argument_types(tmp_path):
    """Session 30 audit: Tokenizer.train(iterator='one string') trained on single characters (0 merges); files='a.txt'
    iterated the path ("no such file /"); an int document was "'int' object is not iterable"; vocab_size='300' a
    comparison TypeError; decode([True]) gave '\\x01'."""
    from pyllm.tokenizer import Tokenizer
    f = tmp_path / "a.txt"
    f.write_text("the cat sat on the mat. " * 40)
    tok = Tokenizer.train(files=str(f), vocab_size=270)  # one path: a file list of one
    assert tok.vocab_size == 270
    with pytest.raises(TypeError, match="iterator= takes an iterable of strings"):
        Tokenizer.train(iterator="the cat sat", vocab_size=270)
    with pytest.raises(TypeError, match="iterator item 1 is a int, not a string"):
        Tokenizer.train(iterator=["the cat", 2], vocab_size=270)
    with pytest.raises(TypeError, match="vocab_size must be an int, got '300'"):
        Tokenizer.train(iterator=["the cat"], vocab_size="300")
    with pytest.raises(ValueError, match="token ids must be integers, got True"):
        tok.decode([True])
