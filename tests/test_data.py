"""Token shards, `pyllm prepare`, the packed loader, progress bar and PNG plots. Run: pytest -q tests/test_data.py"""
from __future__ import annotations

import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from pyllm import data as D
from pyllm.cli import main as cli
from pyllm.prepare import prepare
from pyllm.tokenizer import Tokenizer


def _docs(rng: np.random.Generator, n: int) -> list[str]:
    words = ["the", "king", "shall", "speak", "é", "ünïcode", "x", "lord", "\n", "night", "💡", "sword"]
    return [" ".join(rng.choice(words, size=int(rng.integers(1, 40)))) + "." for _ in range(n)]


def _corpus(tmp_path, seed=None):
    """Two .txt docs, a .jsonl with many docs: returns (input dir, documents in reading order)."""
    rng = np.random.default_rng(seed if seed is not None else int.from_bytes(os.urandom(4), "little"))
    d = tmp_path / "in"
    d.mkdir()
    docs = _docs(rng, 45)
    (d / "a.txt").write_text(docs[0])
    (d / "b.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(docs[1:44])))
    (d / "c.txt").write_text(docs[44])
    return d, docs


def _split_docs(tokens: np.ndarray, bos: int, tok) -> list[str]:
    starts = np.flatnonzero(tokens == bos)
    ends = list(starts[1:]) + [tokens.size]
    return [tok.decode(tokens[s + 1:e].tolist()) for s, e in zip(starts, ends)]


# --- shard format ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("vocab", [300, 70000])
def test_shard_roundtrip(tmp_path, vocab):
    toks = np.random.default_rng().integers(0, vocab, size=1001)
    p = tmp_path / "s.bin"
    D.write_shard(p, toks, vocab, "ab" * 16, n_docs=7)
    h, arr = D.open_shard(p)
    assert arr.dtype == (np.uint16 if vocab <= 65536 else np.uint32)
    assert np.array_equal(np.asarray(arr, np.int64), toks)
    assert (h["n_tokens"], h["n_docs"], h["vocab_size"], h["tokenizer_hash"]) == (1001, 7, vocab, "ab" * 16)
    assert not (tmp_path / "s.bin.tmp").exists()


def test_shard_bad_files(tmp_path):
    p = tmp_path / "s.bin"
    D.write_shard(p, np.arange(100), 300, "0" * 32, 1)
    raw = p.read_bytes()
    p.write_bytes(raw[:-10])
    with pytest.raises(ValueError, match="truncated"):
        D.open_shard(p)
    p.write_bytes(b"NOTASHRD" + raw[8:])
    with pytest.raises(ValueError, match="bad magic"):
        D.open_shard(p)
    with pytest.raises(ValueError, match="token id 300 >= vocab size 300"):
        D.write_shard(tmp_path / "t.bin", np.array([1, 300]), 300, "0" * 32, 1)


# --- prepare ---------------------------------------------------------------------------------------------------------
def test_prepare_roundtrip_and_val_split(tmp_path):
    src, docs = _corpus(tmp_path)
    man = prepare([str(src)], tmp_path / "d", byte_level=True, val_fraction=0.2, shard_tokens=200, workers=2)
    assert man["complete"] and man["stats"]["docs"] == 45
    assert len([s for s in man["shards"] if s["split"] == "train"]) > 2  # several shards
    tok = Tokenizer.load(tmp_path / "d" / "tokenizer.json")
    got = {}
    for split in ("train", "val"):
        st = D.TokenStream(tmp_path / "d", split)
        got[split] = _split_docs(st.get(0, st.n_tokens), st.bos_id, tok)
    # every 5th document (index 4, 9, ...) is validation, the rest train, in reading order (a.txt, b.jsonl, c.txt)
    assert got["val"] == [t for i, t in enumerate(docs) if i % 5 == 4]
    assert got["train"] == [t for i, t in enumerate(docs) if i % 5 != 4]


def test_prepare_trained_tokenizer_and_cli(tmp_path, capsys):
    src, docs = _corpus(tmp_path)
    assert cli(["tokenizer-train", "--input", str(src / "b.jsonl"), "--vocab-size", "300",
                "--out", str(tmp_path / "tok")]) == 0
    tok = Tokenizer.load(tmp_path / "tok" / "tokenizer.json")
    assert tok.vocab_size == 300
    assert cli(["prepare", "--input", str(src / "*.txt"), str(src / "b.jsonl"), "--tokenizer",
                str(tmp_path / "tok" / "tokenizer.json"), "--out", str(tmp_path / "d"), "--val-fraction", "0",
                "--workers", "1"]) == 0
    st = D.TokenStream(tmp_path / "d", "train")
    assert st.vocab_size == 300 and st.get(0, st.n_tokens).max() < 300
    assert sorted(_split_docs(st.get(0, st.n_tokens), st.bos_id, tok)) == sorted(docs)
    # same command again: nothing to redo
    assert cli(["prepare", "--input", str(src / "*.txt"), str(src / "b.jsonl"), "--tokenizer",
                str(tmp_path / "tok" / "tokenizer.json"), "--out", str(tmp_path / "d"), "--val-fraction", "0",
                "--workers", "1"]) == 0
    assert "nothing to do" in capsys.readouterr().out


def test_shard_from_other_tokenizer_detected(tmp_path):
    src, _ = _corpus(tmp_path)
    prepare([str(src)], tmp_path / "a", byte_level=True, val_fraction=0, workers=1)
    prepare([str(src)], tmp_path / "b", vocab_size=300, val_fraction=0, workers=1)
    (tmp_path / "a" / "train_00000.bin").write_bytes((tmp_path / "b" / "train_00000.bin").read_bytes())
    with pytest.raises(ValueError, match=r"train_00000.bin: shard from a different tokenizer"):
        D.TokenStream(tmp_path / "a", "train")
    other = D.tokenizer_hash(Tokenizer.load(tmp_path / "b" / "tokenizer.json"))
    with pytest.raises(ValueError, match="data was tokenized with tokenizer"):
        D.TokenStream(tmp_path / "b", "train", tokenizer_hash="f" * 32)
    with pytest.raises(ValueError, match="exceeds the model's"):
        D.TokenStream(tmp_path / "b", "train", tokenizer_hash=other, vocab_size=100)


def test_malformed_jsonl(tmp_path, capsys):
    p = tmp_path / "x.jsonl"
    p.write_text('{"text": "fine"}\n\n{"text": "ok"\n{"body": "no text"}\n{"text": 3}\n{"text": "last"}\n')
    with pytest.raises(ValueError, match=r"x.jsonl:3: not valid JSON"):
        prepare([str(p)], tmp_path / "d", byte_level=True, workers=1)
    rc = cli(["prepare", "--input", str(p), "--byte-level", "--out", str(tmp_path / "d2"), "--workers", "1"])
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (the progress bar's last state comes before it)
    assert rc == 2 and err.startswith("pyllm prepare: error: ") and "x.jsonl:3: not valid JSON" in err
    q = tmp_path / "y.jsonl"
    q.write_text('{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r'y.jsonl:1: no "text" field'):
        prepare([str(q)], tmp_path / "d3", byte_level=True, workers=1)
    man = prepare([str(p)], tmp_path / "d4", byte_level=True, val_fraction=0, workers=1, skip_bad_lines=True)
    assert man["stats"]["bad_lines"] == 3 and man["stats"]["docs"] == 2


def test_corrupt_manifest(tmp_path):
    """A manifest that is JSON but not one (a list, a missing key, a shard entry without its fields) was a
    TypeError/KeyError traceback from pretrain; now one error naming the file, from every reader."""
    (tmp_path / "in.txt").write_text("hello world")
    d = tmp_path / "d"
    prepare([str(tmp_path / "in.txt")], d, byte_level=True, val_fraction=0, workers=1)
    good = json.loads((d / "manifest.json").read_text())
    for bad in ([], {k: v for k, v in good.items() if k != "shards"}, {**good, "shards": [{"file": "x.bin"}]},
                {**good, "shards": "train_00000.bin"}):
        (d / "manifest.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=r"manifest.json: corrupt manifest \(expected an object"):
            D.TokenStream(d, "train")
        with pytest.raises(ValueError, match=r"manifest.json: corrupt manifest"):
            prepare([str(tmp_path / "in.txt")], d, byte_level=True, val_fraction=0, workers=1)


def test_empty_files_and_invalid_utf8(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    (d / "empty.txt").write_bytes(b"")
    (d / "empty.jsonl").write_bytes(b"\n\n")
    (d / "bad.txt").write_bytes(b"caf\xe9 ok \xff\xfe end")
    (d / "good.txt").write_text("hello")
    man = prepare([str(d)], tmp_path / "o", byte_level=True, val_fraction=0, workers=1)
    s = man["stats"]
    assert (s["empty_files"], s["bad_utf8_docs"], s["docs"]) == (2, 1, 2)
    st = D.TokenStream(tmp_path / "o", "train")
    tok = Tokenizer.load(tmp_path / "o" / "tokenizer.json")
    assert _split_docs(st.get(0, st.n_tokens), st.bos_id, tok) == ["caf\ufffd ok \ufffd\ufffd end", "hello"]
    with pytest.raises(FileNotFoundError, match="no such file"):
        prepare([str(tmp_path / "missing*.txt")], tmp_path / "o2", byte_level=True)


def _cut_prepare(src, out, kw, monkeypatch, half_written=False):
    """prepare src into out, interrupted (KeyboardInterrupt) while writing its 3rd shard; half_written: that shard's
    .tmp left behind as a kill leaves it."""
    real = D.write_shard
    calls = {"n": 0}

    def dying(path, tokens, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            if half_written:
                with open(str(path) + ".tmp", "wb") as f:
                    f.write(b"PYLLMTOK" + b"\0" * 100)
            raise KeyboardInterrupt
        return real(path, tokens, *a, **k)
    monkeypatch.setattr(D, "write_shard", dying)
    with pytest.raises(KeyboardInterrupt):
        prepare([str(src)], out, **kw)
    monkeypatch.setattr(D, "write_shard", real)


def test_interrupted_prepare_leaves_no_complete_looking_shard(tmp_path, monkeypatch):
    src, _ = _corpus(tmp_path)
    kw = dict(byte_level=True, val_fraction=0.2, shard_tokens=150, workers=1)
    full = prepare([str(src)], tmp_path / "full", **kw)
    out = tmp_path / "cut"
    _cut_prepare(src, out, kw, monkeypatch, half_written=True)
    man = D.read_manifest(out)
    assert not man["complete"] and len(man["shards"]) == 2
    listed = {s["file"] for s in man["shards"]}
    assert {p.name for p in out.glob("*.bin")} == listed  # the half-written one is only a .tmp
    for name in listed:
        D.open_shard(out / name)
    with pytest.raises(ValueError, match="did not finish"):
        D.TokenStream(out, "train")
    resumed = prepare([str(src)], out, **kw)
    assert [s for s in resumed["shards"]] == full["shards"]
    for s in full["shards"]:
        assert (out / s["file"]).read_bytes() == (tmp_path / "full" / s["file"]).read_bytes()
    with pytest.raises(ValueError, match="other settings"):
        prepare([str(src)], out, **dict(kw, shard_tokens=99))


def test_resumed_prepare_refuses_a_manifest_past_the_inputs(tmp_path, monkeypatch):
    """An interrupted manifest whose last shard claims a doc_end beyond the inputs' documents (a corrupt or hand-edited
    manifest, or inputs shortened since) resumed after it: every document in between was skipped and the directory
    marked complete. The resume now counts the documents it reads and refuses such a manifest."""
    src, _ = _corpus(tmp_path)
    kw = dict(byte_level=True, val_fraction=0.2, shard_tokens=150, workers=1)
    out = tmp_path / "cut"
    _cut_prepare(src, out, kw, monkeypatch)
    mpath = out / D.MANIFEST
    man = json.loads(mpath.read_text())
    assert not man["complete"] and man["shards"]
    man["shards"][-1]["doc_end"] = 10 ** 9
    mpath.write_text(json.dumps(man))
    with pytest.raises(ValueError, match=r"manifest.json: its shards end at document 1000000000 but the inputs hold"):
        prepare([str(src)], out, **kw)
    assert not D.read_manifest(out)["complete"]


@pytest.mark.parametrize("dies_in", ["manifest", "tokenizer"])
def test_prepare_killed_before_its_first_manifest_reruns(tmp_path, monkeypatch, dies_in):
    """Crash-point fuzzing: a fresh run killed after saving its tokenizer.json and before writing manifest.json
    left a directory every rerun refused ("holds a tokenizer.json that no `pyllm prepare` run there wrote"). The
    manifest is written first now; a run killed between the two resumes, with the same tokenizer (trained again)."""
    src, _ = _corpus(tmp_path)
    kw = dict(vocab_size=300, val_fraction=0.2, shard_tokens=150, workers=1)
    full = prepare([str(src)], tmp_path / "full", **kw)
    real_write, real_save = D.atomic_write_text, Tokenizer.save

    def write(path, text):  # a Ctrl-C runs no clean-up here: what it leaves is what a SIGKILL leaves
        if dies_in == "manifest" and Path(path).name == D.MANIFEST:
            raise KeyboardInterrupt
        real_write(path, text)

    def save(self, path):
        if dies_in == "tokenizer":
            raise KeyboardInterrupt
        return real_save(self, path)
    monkeypatch.setattr(D, "atomic_write_text", write)
    monkeypatch.setattr(Tokenizer, "save", save)
    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        prepare([str(src)], out, **kw)
    monkeypatch.undo()
    resumed = prepare([str(src)], out, **kw)  # was "holds a tokenizer.json that no `pyllm prepare` run there wrote"
    assert resumed["shards"] == full["shards"] and resumed["complete"]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (tmp_path / "full").iterdir())
    for p in (tmp_path / "full").iterdir():
        assert (out / p.name).read_bytes() == p.read_bytes(), p.name


@pytest.mark.parametrize("damage", ["truncate", "delete", "foreign"])
def test_prepare_rerun_rebuilds_damaged_shards(tmp_path, capsys, damage):
    """A complete directory with a truncated, deleted or foreign shard said "already prepared; nothing to do" and
    pretrain failed on it later. The rerun now checks every listed shard and rebuilds that split from the first bad
    one: the same bytes as a clean run, the other split untouched."""
    src, _ = _corpus(tmp_path)
    kw = dict(byte_level=True, val_fraction=0.2, shard_tokens=150, workers=1)
    full = prepare([str(src)], tmp_path / "full", **kw)
    out = tmp_path / "d"
    prepare([str(src)], out, **kw)
    train = [s["file"] for s in full["shards"] if s["split"] == "train"]
    assert len(train) >= 4
    victim = out / train[2]
    if damage == "truncate":
        victim.write_bytes(victim.read_bytes()[:-7])
    elif damage == "delete":
        victim.unlink()
    else:
        D.write_shard(victim, np.arange(10), 256, "f" * 32, 1)
    val_before = {s["file"]: (out / s["file"]).stat().st_mtime_ns for s in full["shards"] if s["split"] == "val"}
    capsys.readouterr()
    man = prepare([str(src)], out, **kw)
    err = capsys.readouterr().err
    assert f"{victim}: " in err and "rebuilding the train split from this shard on" in err, err
    assert man["complete"] and sorted(map(json.dumps, man["shards"])) == sorted(map(json.dumps, full["shards"]))
    for s in full["shards"]:
        assert (out / s["file"]).read_bytes() == (tmp_path / "full" / s["file"]).read_bytes(), s["file"]
    assert {f: (out / f).stat().st_mtime_ns for f in val_before} == val_before
    st = D.TokenStream(out, "train")
    assert st.n_tokens == sum(s["n_tokens"] for s in full["shards"] if s["split"] == "train")


def test_empty_input_is_an_error(tmp_path, capsys):
    """An empty corpus trained a bytes-only "tokenizer" and prepared 0 tokens in 0 shards, both with exit 0."""
    (tmp_path / "empty.txt").write_text("")
    assert cli(["tokenizer-train", "--input", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "t")]) == 2
    assert "empty.txt: no text to train a tokenizer on" in capsys.readouterr().err
    assert not (tmp_path / "t" / "tokenizer.json").exists()
    assert cli(["prepare", "--input", str(tmp_path / "empty.txt"), "--byte-level", "--workers", "1",
                "--out", str(tmp_path / "d")]) == 2
    assert "empty.txt: no training text" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()  # was a half-made directory whose manifest refused the fixed rerun
    # a fresh run into an existing directory removes only what it wrote; the user's --tokenizer there stays
    d = tmp_path / "mine"
    d.mkdir()
    (d / "notes.txt").write_text("keep")
    Tokenizer.byte_level().save(d)
    tok_text = (d / "tokenizer.json").read_text()
    one = tmp_path / "one.jsonl"
    one.write_text("{\"text\": \"a\"}\n")   # --val-fraction 0.9: every document goes to validation
    assert cli(["prepare", "--input", str(one), "--tokenizer", str(d / "tokenizer.json"), "--val-fraction", "0.9",
                "--workers", "1", "--out", str(d)]) == 2
    assert "no training text" in capsys.readouterr().err
    assert sorted(p.name for p in d.iterdir()) == ["notes.txt", "tokenizer.json", "tokenizer_config.json"]
    assert (d / "tokenizer.json").read_text() == tok_text
    (tmp_path / "empty.txt").write_text("fixed: now some text")
    assert cli(["prepare", "--input", str(tmp_path / "empty.txt"), "--byte-level", "--workers", "1",
                "--out", str(tmp_path / "d")]) == 0
    assert D.read_manifest(tmp_path / "d")["complete"]


def test_corrupt_shard_contents_name_the_shard(tmp_path):
    """A non-ASCII tokenizer hash was a bare UnicodeDecodeError; a token id past the vocabulary was an index error
    from the model ("idx: token id 65000 is out of range") naming no file."""
    (tmp_path / "in.txt").write_text("hello world, " * 50)
    d = tmp_path / "d"
    man = prepare([str(tmp_path / "in.txt")], d, byte_level=True, val_fraction=0, workers=1)
    shard = d / man["shards"][0]["file"]
    raw = bytearray(shard.read_bytes())
    hdr = D.HEADER_BYTES
    bad_hash = bytearray(raw)
    bad_hash[D._HEAD.size - 32] = 0xFF
    shard.write_bytes(bytes(bad_hash))
    with pytest.raises(ValueError, match=r"s?\.bin: corrupt shard header \(tokenizer hash is not ASCII\)"):
        D.TokenStream(d, "train")
    oob = bytearray(raw)
    width = np.dtype(D.token_dtype(man["vocab_size"])).itemsize
    oob[hdr + 5 * width:hdr + 6 * width] = (65000).to_bytes(width, "little")
    shard.write_bytes(bytes(oob))
    st = D.TokenStream(d, "train")
    with pytest.raises(ValueError, match=rf"{shard.name}: token id 65000 >= the vocab size {man['vocab_size']}"):
        st.get(0, 10)


def test_manifest_format_version_and_field_types(tmp_path):
    """A manifest of another format or version, or a vocab_size of the wrong type or past the model's limit (2^24),
    was trained on or failed in ModelConfig with no file named."""
    (tmp_path / "in.txt").write_text("hello world")
    d = tmp_path / "d"
    prepare([str(tmp_path / "in.txt")], d, byte_level=True, val_fraction=0, workers=1)
    good = json.loads((d / "manifest.json").read_text())
    for bad, message in (({**good, "format": "other"}, "format 'other' version 1; this pyllm reads"),
                         ({**good, "version": 7}, "version 7; this pyllm reads 'pyllm-tokens' version 1"),
                         ({**good, "vocab_size": "big"}, "vocab_size must be an integer in [1, 16777216], got 'big'"),
                         ({**good, "vocab_size": 1 << 25}, "vocab_size must be an integer in [1, 16777216], got 3355"),
                         ({**good, "bos_id": -1}, "bos_id must be an integer in [0, 16777215]"),
                         ({**good, "tokenizer_hash": 5}, "tokenizer_hash must be a string")):
        (d / "manifest.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match="manifest.json: ") as e:
            D.TokenStream(d, "train")
        assert message in str(e.value), (message, str(e.value))


# --- packing / loader --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    t = tmp_path_factory.mktemp("stream")
    src, _ = _corpus(t, seed=1)
    prepare([str(src)], t / "d", byte_level=True, val_fraction=0, shard_tokens=300, workers=1)
    return D.TokenStream(t / "d", "train")


def test_loader_batches_doc_ids_and_determinism(stream):
    L = D.PackedLoader(stream, 3, 16, seed=5)
    x, y, d = L.next_batch()
    assert x.shape == y.shape == d.shape == (3, 16) and d.dtype == torch.int32
    assert torch.equal(x[:, 1:], y[:, :-1])
    bos = stream.bos_id
    for b in range(3):  # doc id = number of bos tokens seen so far in the row
        assert torch.equal(d[b], torch.cumsum((x[b] == bos).int(), 0).int())
    all_tokens = stream.get(0, stream.n_tokens)
    for b in range(3):  # each row is a real window of the stream
        row = np.concatenate([x[b].numpy(), y[b, -1:].numpy()])
        hits = np.flatnonzero(all_tokens[:-16] == row[0])
        assert any(np.array_equal(all_tokens[h:h + 17], row) for h in hits)
    L2 = D.PackedLoader(stream, 3, 16, seed=5)
    assert torch.equal(L2.next_batch()[0], x)
    assert not torch.equal(D.PackedLoader(stream, 3, 16, seed=6).next_batch()[0], x)


def test_loader_resume_and_ranks(stream):
    L = D.PackedLoader(stream, 4, 8, seed=3)
    n_per_epoch = L.n_windows // 4
    for _ in range(n_per_epoch - 2):
        L.next_batch()
    state = json.loads(json.dumps(L.state_dict()))
    ref = [L.next_batch()[0] for _ in range(5)]  # crosses into the next epoch
    assert L.epoch == 1
    L2 = D.PackedLoader(stream, 4, 8, seed=0)
    L2.load_state_dict(state)
    assert all(torch.equal(a, L2.next_batch()[0]) for a in ref)
    # two ranks of 2 rows == one process of 4 rows, batch after batch
    r0, r1 = (D.PackedLoader(stream, 2, 8, seed=3, rank=r, world_size=2) for r in (0, 1))
    one = D.PackedLoader(stream, 4, 8, seed=3)
    for _ in range(3):
        assert torch.equal(torch.cat([r0.next_batch()[0], r1.next_batch()[0]]), one.next_batch()[0])
    with pytest.raises(ValueError, match="--seq-len changed"):
        D.PackedLoader(stream, 4, 9).load_state_dict(state)
    with pytest.raises(ValueError, match="not enough tokens"):
        D.PackedLoader(stream, 10 ** 6, 8)



def test_loader_epoch_ends_on_a_step_boundary_whatever_the_split(stream):
    """A step of 4 windows as 2 ranks x 2 rows, 1 process x 2 rows x 2 micro-batches, or 1 process x 4 rows: the same
    windows step after step, across epochs. The epoch's end was decided per micro-batch: with windows left for one
    micro-batch and not two, 1 process x 2 micro-batches took 2 old and 2 new windows where 2 ranks started the new
    epoch (a pretrain resumed with another number of ranks, or run on one, saw another data order from there)."""
    T = next(t for t in range(8, 17) if (stream.n_tokens - 1 - (t - 1)) // t % 4 == 2)
    r0, r1 = (D.PackedLoader(stream, 2, T, seed=3, rank=r, world_size=2) for r in (0, 1))
    acc = D.PackedLoader(stream, 2, T, seed=3, accum=2)
    one = D.PackedLoader(stream, 4, T, seed=3)
    for _ in range(3 * r0.n_windows // 4):
        want = one.next_batch()[0]
        assert torch.equal(torch.cat([r0.next_batch()[0], r1.next_batch()[0]]), want)
        assert torch.equal(torch.cat([acc.next_batch()[0], acc.next_batch()[0]]), want)
    assert acc.epoch == r0.epoch == one.epoch >= 2

# --- progress + plot ---------------------------------------------------------------------------------------------
def test_progress(monkeypatch):
    from pyllm.progress import Progress
    monkeypatch.delenv("PYLLM_PROGRESS", raising=False)  # (a shell with PYLLM_PROGRESS=0 failed this test)
    buf = io.StringIO()
    with Progress(total=10, desc="work", file=buf, interval=0) as p:
        for _ in range(10):
            p.update()
        p.set_postfix(loss=1.23456)
    lines = buf.getvalue().splitlines()
    assert len(lines) == 11 and lines[-1].startswith("work: 100%") and "loss=1.235" in lines[-1]
    monkeypatch.setenv("PYLLM_PROGRESS", "0")
    buf = io.StringIO()
    assert list(Progress(range(3), file=buf)) == [0, 1, 2] and buf.getvalue() == ""


def _read_png(path) -> np.ndarray:
    raw = Path(path).read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, w, h = 8, b"", 0, 0
    while pos < len(raw):
        n, tag = struct.unpack(">I4s", raw[pos:pos + 8])
        body = raw[pos + 8:pos + 8 + n]
        assert struct.unpack(">I", raw[pos + 8 + n:pos + 12 + n])[0] == zlib.crc32(tag + body)
        if tag == b"IHDR":
            w, h = struct.unpack(">II", body[:8])
        elif tag == b"IDAT":
            idat += body
        pos += 12 + n
    px = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(h, 1 + 3 * w)
    assert (px[:, 0] == 0).all()
    return px[:, 1:].reshape(h, w, 3)


def test_plot(tmp_path):
    from pyllm.plot import COLORS, line_plot
    p = str(tmp_path / "loss.png")
    line_plot(p, {"train": (np.arange(50), np.linspace(5, 2, 50)), "val": ([0, 25, 49], [5.1, 3, 2.2])},
              width=300, height=200)
    img = _read_png(p)
    assert img.shape == (200, 300, 3)
    for c in COLORS[:2]:  # both series drawn
        assert (img == c).all(-1).sum() > 20
    legend = Path(p + ".txt").read_text()
    assert "train n=50 last=2" in legend and "val n=3" in legend


def test_cli_help_and_bad_flags(capsys):
    for cmd in ("prepare", "tokenizer-train"):
        with pytest.raises(SystemExit) as e:
            cli([cmd, "--help"])
        assert e.value.code == 0 and "--input" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        cli(["prepare", "--input", "x.txt", "--no-such-flag"])
    assert e.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err
    assert cli(["prepare", "--input", "/nonexistent/x.txt"]) == 2
    assert capsys.readouterr().err.strip() == \
        "pyllm prepare: error: /nonexistent/x.txt: no such file, and no file matches it as a glob"


def test_doc_sep_escapes_and_non_ascii(tmp_path, capsys):
    """A non-ASCII --doc-sep was decoded to mojibake (never matched: one document); a bad escape was the codec's
    message without the flag."""
    (tmp_path / "in.txt").write_text("alpha 東 beta 東 gamma")
    assert cli(["prepare", "--input", str(tmp_path / "in.txt"), "--byte-level", "--workers", "1", "--val-fraction",
                "0", "--doc-sep", " 東 ", "--out", str(tmp_path / "d")]) == 0
    assert json.loads((tmp_path / "d" / "manifest.json").read_text())["stats"]["docs"] == 3
    capsys.readouterr()
    assert cli(["prepare", "--input", str(tmp_path / "in.txt"), "--byte-level", "--doc-sep", "\\x",
                "--out", str(tmp_path / "d2")]) == 2
    want = "pyllm prepare: error: --doc-sep '\\\\x': bad escape (truncated \\xXX escape)"
    assert capsys.readouterr().err.strip() == want


def test_doc_sep_newlines_match_crlf_files(tmp_path):
    """--doc-sep '\\n\\n' on a Windows (CRLF) file never matched its blank lines: one document, no validation split."""
    (tmp_path / "in.txt").write_bytes(b"one\r\nstill one\r\n\r\ntwo\r\n\r\nthree\n\nfour\r\n")
    docs = list(D.iter_documents([str(tmp_path / "in.txt")], doc_sep="\n\n"))
    assert docs == ["one\r\nstill one", "two", "three", "four\r\n"]
    assert list(D.iter_documents([str(tmp_path / "in.txt")], doc_sep="\r\n\r\n")) == \
        ["one\r\nstill one", "two", "three\n\nfour\r\n"]


def test_utf8_bom_is_not_text(tmp_path):
    """A BOM-prefixed .jsonl (Windows editors) stopped with "line 1: not valid JSON (Unexpected UTF-8 BOM)"; in a .txt
    it became the first token of the document."""
    (tmp_path / "a.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "hi"}\n{"text": "yo"}\n')
    (tmp_path / "b.txt").write_bytes(b"\xef\xbb\xbfab")
    docs = list(D.iter_documents([str(tmp_path / "a.jsonl"), str(tmp_path / "b.txt")]))
    assert docs == ["hi", "yo", "ab"]


def test_lone_surrogate_and_deep_nesting_are_bad_lines(tmp_path):
    """{"text": "\\ud800"} is valid JSON but not Unicode: was the tokenizers library's "TextEncodeInput must be
    Union[...]" TypeError traceback from inside prepare's encoder."""
    p = tmp_path / "s.jsonl"
    p.write_text('{"text": "fine"}\n{"text": "bad \\ud800 here"}\n{"text": "pair \\ud83d\\ude00 ok"}\n')
    with pytest.raises(ValueError, match=r"s.jsonl:2: \"text\" has a lone surrogate"):
        prepare([str(p)], tmp_path / "d", byte_level=True, workers=1)
    man = prepare([str(p)], tmp_path / "d2", byte_level=True, val_fraction=0, workers=1, skip_bad_lines=True)
    assert man["stats"]["bad_lines"] == 1 and man["stats"]["docs"] == 2
    deep = tmp_path / "deep.jsonl"  # was a RecursionError traceback from json
    deep.write_text('{"text": "ok"}\n' + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(ValueError, match=r"deep.jsonl:2: not valid JSON \(nested too deeply\)"):
        prepare([str(deep)], tmp_path / "d3", byte_level=True, workers=1)
    big = tmp_path / "big.jsonl"  # was json's int-limit message: no file, no line, no --skip-bad-lines
    big.write_text('{"text": "ok"}\n{"text": "x", "n": 1' + "0" * 5000 + "}\n")
    with pytest.raises(ValueError, match=r"big.jsonl:2: not valid JSON \(Exceeds the limit"):
        prepare([str(big)], tmp_path / "d4", byte_level=True, workers=1)
    assert prepare([str(big)], tmp_path / "d5", byte_level=True, val_fraction=0, workers=1,
                   skip_bad_lines=True)["stats"]["bad_lines"] == 1



def test_prepare_worker_death_is_an_error_not_a_hang(tmp_path, monkeypatch, capsys):
    """A worker killed mid-chunk (the OOM killer, kill -9): multiprocessing.Pool replaced it and the main process
    waited for the lost chunk forever, idle at 0% CPU. The executor now breaks, and prepare says so in one line;
    a rerun of the same command resumes."""
    import faulthandler
    import signal
    import sys

    from pyllm import prepare as P
    (tmp_path / "in.txt").write_text("\n\n".join(f"document {i} " * 20 for i in range(40)) + "\n\n" + "DIE " * 50)
    real = P._encode_chunk

    def encode_or_die(texts):  # runs in the forked workers
        if any(t.startswith("DIE") for t in texts):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(texts)
    monkeypatch.setattr(P, "_encode_chunk", encode_or_die)
    argv = ["prepare", "--input", str(tmp_path / "in.txt"), "--byte-level", "--doc-sep", "\\n\\n", "--workers", "2",
            "--out", str(tmp_path / "d")]
    faulthandler.dump_traceback_later(300, exit=True, file=sys.__stderr__)  # a regression hangs: end the run
    try:
        rc = cli(argv)
    finally:
        faulthandler.cancel_dump_traceback_later()
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"pyllm prepare: error: {tmp_path / 'd'}: a tokenizer worker process died (killed: out of memory? "
                   f"try fewer --workers); rerun the same command"), err
    monkeypatch.setattr(P, "_encode_chunk", real)
    assert cli(argv) == 0


def test_prepare_progress_counts_bytes_on_non_ascii_text(tmp_path, monkeypatch):
    """The bars' totals are the files' sizes in bytes but they advanced by characters: on CJK text prepare showed
    27% when all input had been read (and an ETA 3x too long). Both bars (tokenizer training, encoding) now count
    bytes: at the end of reading they stand at the input's size less the document separators."""
    from pyllm import prepare as P
    text = "\n\n".join("東京の天気は晴れ。" * 30 + f" {i}" for i in range(60))
    (tmp_path / "in.txt").write_text(text)
    size = (tmp_path / "in.txt").stat().st_size
    seen = {}

    class Spy(P.Progress):
        def update(self, n=1):
            seen[self.desc] = seen.get(self.desc, 0) + n
            return super().update(n)
    monkeypatch.setattr(P, "Progress", Spy)
    assert cli(["prepare", "--input", str(tmp_path / "in.txt"), "--vocab-size", "300", "--doc-sep", "\\n\\n",
                "--workers", "1", "--out", str(tmp_path / "d")]) == 0
    assert set(seen) == {"tokenizer: reading", "prepare"}
    for desc, n in seen.items():
        assert size - 2 * 59 <= n <= size, (desc, n, size)


def test_atomic_write_names_the_output_not_its_temporary(tmp_path):
    """`pyllm score --out nodir/x.jsonl` said "nodir/x.jsonl.tmp: No such file or directory" (score had its own
    copy of the atomic write; it now uses data.atomic_write, which names the output)."""
    with pytest.raises(FileNotFoundError) as e:
        D.atomic_write_text(tmp_path / "nodir" / "x.jsonl", "{}\n")
    assert e.value.filename == str(tmp_path / "nodir" / "x.jsonl")
    assert not (tmp_path / "nodir").exists()


def test_tokenizer_train_failure_leaves_no_empty_out(tmp_path, capsys):
    """A failed `pyllm tokenizer-train` (missing or empty input) left the empty --out directory it had made."""
    (tmp_path / "empty.txt").write_text("")
    for inp in ("nonexist.txt", "empty.txt"):
        assert cli(["tokenizer-train", "--input", str(tmp_path / inp), "--vocab-size", "300",
                    "--out", str(tmp_path / "tk")]) == 2
        assert inp in capsys.readouterr().err
        assert not (tmp_path / "tk").exists()
    (tmp_path / "mine").mkdir()  # a directory that was there before is left alone
    assert cli(["tokenizer-train", "--input", str(tmp_path / "empty.txt"), "--vocab-size", "300",
                "--out", str(tmp_path / "mine")]) == 2
    assert (tmp_path / "mine").is_dir()


def test_no_validation_note_only_when_one_was_asked_for(tmp_path, capsys):
    """--val-fraction 0 asks for no validation split: the note that blamed "few documents" was printed anyway."""
    (tmp_path / "a.txt").write_text("one document only")
    prepare([str(tmp_path / "a.txt")], tmp_path / "d0", byte_level=True, val_fraction=0, workers=1)
    assert "no validation documents" not in capsys.readouterr().out
    prepare([str(tmp_path / "a.txt")], tmp_path / "d1", byte_level=True, val_fraction=0.01, workers=1)
    assert "note: no validation documents (few documents" in capsys.readouterr().out


def test_tokenizer_train_killed_between_its_files_leaves_no_stale_bin(tmp_path, monkeypatch):
    """tokenizer-train writes tokenizer.json, then tokenizer.bin: a rerun into the same --out killed between the two
    left the earlier run's tokenizer.bin (another vocabulary) beside the new tokenizer.json."""
    src, _ = _corpus(tmp_path)
    args = ["tokenizer-train", "--input", str(src / "b.jsonl"), "--out", str(tmp_path / "tok")]
    assert cli(args + ["--vocab-size", "300"]) == 0
    assert (tmp_path / "tok" / "tokenizer.bin").is_file()

    def killed(self, path):
        raise KeyboardInterrupt
    monkeypatch.setattr(Tokenizer, "save_bin", killed)
    assert cli(args + ["--vocab-size", "280"]) == 130
    assert Tokenizer.load(tmp_path / "tok" / "tokenizer.json").vocab_size == 280
    assert not (tmp_path / "tok" / "tokenizer.bin").exists()


def test_prepare_inputs_compare_by_file_and_contents(tmp_path, monkeypatch):
    """Session 30 audit: `in.txt ./in.txt` was read twice (every document trained on twice, the val ones too); an
    edit that kept the size was "already prepared" (or, after an interruption, resumed into a mix of old and new
    text); and `$PWD/in.txt` for `in.txt` threw an interrupted run's shards away as "other settings"."""
    monkeypatch.chdir(tmp_path)
    Path("in.txt").write_text("\n\n".join(f"document number {i} apple " + "x" * i for i in range(23)))
    kw = dict(byte_level=True, val_fraction=0.1, doc_sep="\n\n", workers=1)
    man = prepare(["in.txt", "./in.txt", str(tmp_path / "in.txt")], "d", **kw)
    assert man["stats"]["docs"] == 23 and len(man["settings"]["inputs"]) == 1
    assert prepare([str(tmp_path / "in.txt")], "d", **kw)["complete"]  # the same file: nothing to do
    os.utime("in.txt", ns=(1, 1))  # "apple" -> "mango" keeps the size; so does a touch: the stamp is what counts
    Path("in.txt").write_text(Path("in.txt").read_text().replace("apple", "mango"))
    with pytest.raises(ValueError, match=r"holds data prepared with other settings or inputs \(in.txt changed since\)"):
        prepare(["in.txt"], "d", **kw)
    man = prepare(["in.txt"], "d", overwrite=True, **kw)
    st = D.TokenStream(Path("d"), "train")
    text = Tokenizer.load(Path("d") / "tokenizer.json").decode(st.get(0, st.n_tokens).tolist())
    assert "mango" in text and "apple" not in text


def test_prepare_overwrite_past_a_bad_manifest_keeps_the_given_tokenizer(tmp_path, capsys):
    """--overwrite (which the manifest errors advise) failed on the same manifest error; with the run's own
    --tokenizer sitting in --out it deleted that tokenizer.json, then failed 'no tokenizer.json there'."""
    src = tmp_path / "in.txt"
    src.write_text("hello world\n\nmore text here\n\nthird one")
    d = tmp_path / "d"
    assert cli(["tokenizer-train", "--input", str(src), "--vocab-size", "270", "--out", str(d)]) == 0
    tok = (d / "tokenizer.json").read_bytes()
    args = ["prepare", "--input", str(src), "--tokenizer", str(d / "tokenizer.json"), "--out", str(d), "--workers",
            "1", "--val-fraction", "0", "--doc-sep", "\\n\\n"]
    assert cli(args) == 0
    man = json.loads((d / "manifest.json").read_text())
    for bad in ({**man, "version": 99}, {"shards": "oops"}):
        (d / "manifest.json").write_text(json.dumps(bad))
        assert cli(args) == 2
        assert "rerun `pyllm prepare --overwrite`" in capsys.readouterr().err
        assert cli(args + ["--overwrite"]) == 0
        assert (d / "tokenizer.json").read_bytes() == tok and D.read_manifest(d)["complete"]
    src.write_text(src.read_text() + "\n\nfourth")
    assert cli(args + ["--overwrite"]) == 0
    assert (d / "tokenizer.json").read_bytes() == tok and D.read_manifest(d)["stats"]["docs"] == 4
    # the --tokenizer file edited since: noticed, as an input's edit is
    other = tmp_path / "t2"
    assert cli(["tokenizer-train", "--input", str(src), "--vocab-size", "280", "--out", str(other)]) == 0
    args2 = ["prepare", "--input", str(src), "--tokenizer", str(other), "--out", str(tmp_path / "d2"), "--workers",
             "1", "--val-fraction", "0"]
    assert cli(args2) == 0
    (tmp_path / "more.txt").write_text("the quick brown fox jumps over the lazy dog. " * 30)
    assert cli(["tokenizer-train", "--input", str(tmp_path / "more.txt"), "--vocab-size", "280", "--out",
                str(other)]) == 0
    capsys.readouterr()
    assert cli(args2) == 2
    assert "(the --tokenizer file)" in capsys.readouterr().err
    assert cli(["prepare", "--input", str(src), "--vocab-size", "100", "--out", str(tmp_path / "d3")]) == 2
    assert "--vocab-size must be at least 262" in capsys.readouterr().err


def test_manifest_shard_entries_are_checked(tmp_path, capsys):
    """Found by a mutation fuzz of manifest.json's shard entries: a "file" of 5 or null was a TypeError traceback from
    pretrain and from a rerun of prepare; "../other/train_00000.bin" was read from another directory, and a rerun of
    prepare (or --overwrite) deleted that file there as a damaged shard; a shard listed twice was trained on twice; one
    of split "test" was silently left out; a "doc_end" of "x" a TypeError traceback in a resumed prepare; a bos_id past
    the vocabulary marked no document boundary (attention across documents, exit 0)."""
    src = tmp_path / "in.txt"
    src.write_text("\n\n".join(f"document {i} " * 5 for i in range(20)))
    args = ["prepare", "--input", str(src), "--byte-level", "--workers", "1", "--val-fraction", "0.2",
            "--shard-tokens", "150", "--doc-sep", "\\n\\n"]
    assert cli([*args, "--out", str(tmp_path / "other")]) == 0
    d = tmp_path / "d"
    assert cli([*args, "--out", str(d)]) == 0
    mp = d / "manifest.json"
    good = json.loads(mp.read_text())
    victim = tmp_path / "other" / good["shards"][0]["file"]
    theirs = victim.read_bytes()
    capsys.readouterr()

    def shard1(**kw):
        m = json.loads(json.dumps(good))
        m["shards"][1].update(kw)
        return m
    name = good["shards"][1]["file"]
    for bad, want in ((shard1(file=5), "shard 1: file 5 is not a file name in the directory"),
                      (shard1(file=None), "shard 1: file None is not a file name"),
                      (shard1(file="../other/" + victim.name),
                       f"shard 1: file '../other/{victim.name}' is not a file name"),
                      ({**good, "shards": [good["shards"][0], *good["shards"]]},
                       f"shard {good['shards'][0]['file']} is listed twice"),
                      (shard1(split="test"), f"shard {name}: split 'test', expected 'train' or 'val'"),
                      (shard1(n_tokens="1"), f"shard {name}: n_tokens must be an integer >= 0, got '1'"),
                      (shard1(doc_end="x"), f"shard {name}: doc_end must be an integer >= 0, got 'x'"),
                      ({**good, "bos_id": 10 ** 6}, "bos_id 1000000 is not below vocab_size 262"),
                      ({**good, "complete": "no"}, "complete must be true or false, got 'no'")):
        for incomplete in (False,) if "complete" in bad and bad["complete"] == "no" else (False, True):
            mp.write_text(json.dumps({**bad, "complete": False} if incomplete else bad))
            with pytest.raises(ValueError, match="manifest.json: corrupt manifest") as e:
                D.TokenStream(d, "train")
            assert want in str(e.value), (want, str(e.value))
            assert cli([*args, "--out", str(d)]) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and f"{mp}: corrupt manifest ({want}" in err[0], err
            assert victim.read_bytes() == theirs
    # --overwrite reads a corrupt manifest leniently to remove what it lists: only names inside --out
    mp.write_text(json.dumps(shard1(file="../other/" + victim.name)))
    assert cli([*args, "--out", str(d), "--overwrite"]) == 0
    assert victim.read_bytes() == theirs and D.read_manifest(d)["shards"] == good["shards"]


def test_complete_rerun_checks_its_tokenizer_json(tmp_path, capsys):
    """Session 31 audit: a complete directory whose tokenizer.json was deleted, garbled or swapped for another
    tokenizer's was "already prepared; nothing to do" (exit 0), and only pretrain refused it."""
    import shutil
    src, _ = _corpus(tmp_path)
    kw = dict(byte_level=True, val_fraction=0.2, shard_tokens=150, workers=1)
    out = tmp_path / "d"
    prepare([str(src)], out, **kw)
    other = prepare([str(src)], tmp_path / "o", byte_level=False, vocab_size=300, val_fraction=0.2, workers=1)
    assert other["tokenizer_hash"]
    tj = out / "tokenizer.json"
    good = tj.read_bytes()
    for damage, want in (("delete", "tokenizer.json: missing"), ("garbage", "not a valid tokenizer.json"),
                         ("swap", "tokenizer.json: does not match the manifest's tokenizer")):
        if damage == "delete":
            tj.unlink()
        elif damage == "garbage":
            tj.write_text("{not json")
        else:
            shutil.copy(tmp_path / "o" / "tokenizer.json", tj)
        with pytest.raises(ValueError, match=want):
            prepare([str(src)], out, **kw)
        tj.write_bytes(good)
    capsys.readouterr()
    prepare([str(src)], out, **kw)
    assert "already prepared" in capsys.readouterr().out
