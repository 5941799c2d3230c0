"""Tests for pyllm.chat: the template and its loss mask. Run: PYTHONPATH=$PWD python -m pytest -q tests/test_chat.py"""
from __future__ import annotations

import pytest

from pyllm.chat import render, render_prompt_completion
from pyllm.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.byte_level()  # ids are bytes, so expected sequences are easy to write out


def S(tok, name):
    return tok.special_ids[f"<|{name}|>"]


def test_multi_turn_mask(tok):
    msgs = [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "again <|end|>"},
            {"role": "assistant", "content": "ok!"}]
    ids, mask = render(msgs, tok)
    B = lambda s: list(s.encode())  # noqa: E731
    want = ([S(tok, "bos"), S(tok, "system"), *B("be nice"), S(tok, "end"), S(tok, "user"), *B("hi"), S(tok, "end"),
             S(tok, "assistant"), *B("hello"), S(tok, "end"), S(tok, "user"), *B("again <|end|>"), S(tok, "end"),
             S(tok, "assistant"), *B("ok!"), S(tok, "end")])
    assert ids == want
    assert len(mask) == len(ids)
    trained = [i for i, m in zip(ids, mask) if m]
    assert trained == [*B("hello"), S(tok, "end"), *B("ok!"), S(tok, "end")]
    # no system/user/role/bos token is ever trained on, and user-typed "<|end|>" stays plain bytes
    for k, (i, m) in enumerate(zip(ids, mask)):
        if i in (S(tok, "bos"), S(tok, "system"), S(tok, "user"), S(tok, "assistant")):
            assert m == 0
    assert ids.count(S(tok, "end")) == 5


def test_generation_prompt(tok):
    ids, mask = render([{"role": "user", "content": "2+2?"}], tok, add_generation_prompt=True)
    assert ids[-1] == S(tok, "assistant") and ids[-2] == S(tok, "end")
    assert sum(mask) == 0
    assert render([], tok) == ([tok.bos_id], [0])


def test_prompt_completion(tok):
    ids, mask = render_prompt_completion("q", "a", tok)
    assert ids == [tok.bos_id, S(tok, "user"), ord("q"), S(tok, "end"), S(tok, "assistant"), ord("a"), S(tok, "end")]
    assert mask == [0, 0, 0, 0, 0, 1, 1]
    ids2, _ = render_prompt_completion([{"role": "system", "content": "s"}, {"role": "user", "content": "q"}], "a", tok)
    assert ids2[1] == S(tok, "system") and ids2[-3:] == [S(tok, "assistant"), ord("a"), S(tok, "end")]


def test_trained_tokenizer_masks_whole_content():
    from test_tokenizer import corpus
    t = Tokenizer.train(iterator=corpus(), vocab_size=350)
    ids, mask = render([{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "sat on the mat"}], t)
    trained = [i for i, m in zip(ids, mask) if m]
    assert trained == t.encode("sat on the mat") + [t.end_id]


@pytest.mark.parametrize("msgs, pattern", [
    ([{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}], "message 1: unknown role 'bot'"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "  "}], "message 1: empty assistant"),
    ([{"role": "user"}], "message 0: expected a dict"),
    ([{"role": "user", "content": 3}], "message 0: content must be a string"),
    ("hello", "list of"),
])
def test_bad_messages(tok, msgs, pattern):
    with pytest.raises(ValueError, match=pattern):
        render(msgs, tok)
