"""The C runtime (csrc/run.c via pyllm.runtime and the pyllm-run binary) vs a torch Llama forward on tiny random models.

Run: OMP_NUM_THREADS=1 PYTHONPATH=$PWD python -m pytest -q tests/test_run.py
"""
from __future__ import annotations

import os
import shutil
import struct
import subprocess

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pyllm.config import ModelConfig
from pyllm.export import dequantize_q8_0, export, quantize_q8_0, write_llama2c, write_model_bin
from pyllm import runtime

pytestmark = pytest.mark.skipif(not runtime.LIB_PATH.exists(), reason="libpyllm_run.so not built")


def tiny_config(**kw) -> ModelConfig:
    base = dict(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96, max_seq_len=48,
                norm_eps=1e-6, rope_theta=5000.0)
    base.update(kw)
    return ModelConfig(**base)


def random_state_dict(c: ModelConfig, gen: torch.Generator, tied: bool = False, std: float = 0.1,
                      head_std: float | None = None) -> dict:
    """HF Llama names, random weights (norms near 1 so a missing norm weight shows)."""
    hd = c.head_dim
    r = lambda *s, sd=std: torch.randn(*s, generator=gen) * sd  # noqa: E731
    sd = {"embed_tokens.weight": r(c.vocab_size, c.dim, sd=1.0), "norm.weight": 1 + r(c.dim)}
    for i in range(c.n_layers):
        p = f"layers.{i}."
        sd.update({
            p + "input_layernorm.weight": 1 + r(c.dim), p + "post_attention_layernorm.weight": 1 + r(c.dim),
            p + "self_attn.q_proj.weight": r(c.n_heads * hd, c.dim), p + "self_attn.k_proj.weight": r(c.n_kv_heads * hd, c.dim),
            p + "self_attn.v_proj.weight": r(c.n_kv_heads * hd, c.dim), p + "self_attn.o_proj.weight": r(c.dim, c.n_heads * hd),
            p + "mlp.gate_proj.weight": r(c.hidden_dim, c.dim), p + "mlp.up_proj.weight": r(c.hidden_dim, c.dim),
            p + "mlp.down_proj.weight": r(c.dim, c.hidden_dim)})
    if not tied:
        sd["lm_head.weight"] = r(c.vocab_size, c.dim, sd=head_std or std)
    return sd


def ref_logits(sd: dict, c: ModelConfig, tokens) -> torch.Tensor:
    """Plain torch Llama forward (HF rotate-half RoPE, GQA, SwiGLU), fp32: (T, V)."""
    T, H, Hkv, hd = len(tokens), c.n_heads, c.n_kv_heads, c.head_dim
    inv = 1.0 / (c.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    ang = torch.arange(T, dtype=torch.int64).float()[:, None] * inv[None]
    cos, sin = ang.cos()[:, None], ang.sin()[:, None]  # (T, 1, hd/2)

    def rope(x):  # (T, H, hd)
        x1, x2 = x[..., :hd // 2], x[..., hd // 2:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + c.norm_eps) * w

    x = sd["embed_tokens.weight"][torch.tensor(tokens)]
    for i in range(c.n_layers):
        g = lambda n: sd[f"layers.{i}.{n}.weight"]  # noqa: E731
        h = rms(x, g("input_layernorm"))
        q = rope((h @ g("self_attn.q_proj").T).view(T, H, hd))
        k = rope((h @ g("self_attn.k_proj").T).view(T, Hkv, hd)).repeat_interleave(H // Hkv, dim=1)
        v = (h @ g("self_attn.v_proj").T).view(T, Hkv, hd).repeat_interleave(H // Hkv, dim=1)
        a = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True)
        x = x + a.transpose(0, 1).reshape(T, H * hd) @ g("self_attn.o_proj").T
        h = rms(x, g("post_attention_layernorm"))
        x = x + (F.silu(h @ g("mlp.gate_proj").T) * (h @ g("mlp.up_proj").T)) @ g("mlp.down_proj").T
    x = rms(x, sd["norm.weight"])
    return x @ sd.get("lm_head.weight", sd["embed_tokens.weight"]).T


def c_logits(path, tokens) -> np.ndarray:
    m = runtime.Model(path)
    try:
        return np.stack([m.forward(t, pos) for pos, t in enumerate(tokens)])
    finally:
        m.close()


def model_logits(sd, c, tokens):
    """pyllm.model.GPT's logits when the model has landed (torch backend), else None."""
    try:
        from pyllm.model import GPT
    except ImportError:
        return None
    m = GPT(c, backend="torch")
    missing, unexpected = m.load_state_dict(sd, strict=False)
    assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
    with torch.no_grad():
        return m(torch.tensor([tokens]))[0][0]


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("fmt", ["pyllm", "llama2c-v0", "llama2c-v1"])
def test_fp32_logits_match_torch(tmp_path, rng, fmt, tied):
    if fmt == "pyllm":
        c = tiny_config(tie_embeddings=tied)  # GQA, non-default eps and theta: the header must carry them
    else:
        c = tiny_config(norm_eps=1e-5, rope_theta=10000.0, n_kv_heads=4 if tied else 2, tie_embeddings=tied)
    sd = random_state_dict(c, rng, tied=tied)
    path = tmp_path / "model.bin"
    if fmt == "pyllm":
        write_model_bin(path, sd, c)
    else:
        write_llama2c(path, sd, c, version=int(fmt[-1]))
    tokens = torch.randint(0, c.vocab_size, (c.max_seq_len,), generator=rng).tolist()
    got = c_logits(path, tokens)
    want = ref_logits(sd, c, tokens).numpy()
    assert np.abs(got - want).max() < 1e-4, np.abs(got - want).max()
    m = model_logits(sd, c, tokens)
    if m is not None:
        assert np.abs(got - m.numpy()).max() < 1e-4
    info = runtime.Model(path)
    assert (info.dim, info.n_kv_heads, info.shared_classifier, info.seq_len) == (c.dim, c.n_kv_heads, tied, c.max_seq_len)
    assert info.norm_eps == pytest.approx(c.norm_eps) and info.rope_theta == c.rope_theta
    assert info.format == ("pyllm" if fmt == "pyllm" else fmt)


def test_kv_cache_positions_are_independent_of_history(tmp_path, rng):
    """Running a token at pos p twice (overwriting the cache slot) gives the same logits: no stale state."""
    c = tiny_config()
    sd = random_state_dict(c, rng)
    write_model_bin(tmp_path / "m.bin", sd, c)
    m = runtime.Model(tmp_path / "m.bin")
    toks = torch.randint(0, c.vocab_size, (6,), generator=rng).tolist()
    first = [m.forward(t, p) for p, t in enumerate(toks)]
    again = m.forward(toks[-1], len(toks) - 1)
    np.testing.assert_array_equal(first[-1], again)
    with pytest.raises(ValueError):
        m.forward(c.vocab_size, 0)
    with pytest.raises(ValueError):
        m.forward(0, c.max_seq_len)


def test_quantize_q8_0_roundtrip(rng):
    w = torch.randn(8, 128, generator=rng)
    q, s = quantize_q8_0(w, 64)
    assert q.dtype == torch.int8 and s.shape == (16,)
    err = (dequantize_q8_0(q, s, 64) - w).abs().reshape(-1, 64).amax(1)
    assert (err <= s / 2 + 1e-6).all()  # round to nearest: at most half a step per group


def peaked_model(rng, c):
    """Small random layers and a classifier that maps each token's embedding to a permuted token with a big margin:
    greedy decoding walks the permutation, perturbed by the (random, context-dependent) layers."""
    sd = random_state_dict(c, rng, std=0.05)
    perm = torch.randperm(c.vocab_size, generator=rng)
    sd["lm_head.weight"] = 0.5 * sd["embed_tokens.weight"][perm.argsort()] * sd["norm.weight"].reciprocal()
    return sd


# Q8_0 bound: weights and activations are rounded to 1/254 of their group's range. On this model we require
# max|dlogit| <= 1.5% of max|logit| (measured 0.35-0.56% over 8 seeds). On plain random models with large weights
# (std 0.15, classifier std 1.5) it is 2.6-4%, and greedy paths there diverge once a near-tie flips.
Q8_REL_BOUND = 0.015


@pytest.mark.parametrize("fmt", ["pyllm", "llama2c-v2"])
def test_q8_logits_within_bound_and_same_greedy(tmp_path, rng, fmt):
    c = tiny_config(max_seq_len=80, norm_eps=1e-5, rope_theta=10000.0, vocab_size=128)
    sd = peaked_model(rng, c)
    f32, q8 = tmp_path / "f32.bin", tmp_path / "q8.bin"
    write_model_bin(f32, sd, c)
    if fmt == "pyllm":
        write_model_bin(q8, sd, c, quantize="q8_0", group_size=32)
    else:
        write_llama2c(q8, sd, c, version=2, group_size=32)
    assert runtime.Model(q8).weight_type == "q8_0"
    tokens = torch.randint(0, c.vocab_size, (16,), generator=rng).tolist()
    a, b = c_logits(f32, tokens), c_logits(q8, tokens)
    rel = np.abs(a - b).max() / np.abs(a).max()
    assert 0 < rel < Q8_REL_BOUND, rel
    # 64 greedy tokens: fp32 runtime == torch reference == Q8_0 runtime
    ids = [tokens[0]]
    rf, rq = runtime.Runtime(f32), runtime.Runtime(q8)
    gf = rf.generate_ids(ids, 64, temperature=0)
    gq = rq.generate_ids(ids, 64, temperature=0)
    seq = list(ids)
    for _ in range(64):
        seq.append(int(ref_logits(sd, c, seq)[-1].argmax()))
    assert gf == seq[1:]
    assert gq == gf
    with pytest.raises(ValueError, match=r"has no tokenizer: pass tokenizer_bin, e.g. the tokenizer.bin next to the"):
        rf.encode("a")  # (was "Runtime was built without a tokenizer": no word of what to pass)


def test_sampler(tmp_path, rng):
    logits = torch.randn(300, generator=rng).numpy()
    assert runtime.sample(logits, temperature=0) == int(logits.argmax())
    assert runtime.sample(logits, temperature=1.0, top_k=1, seed=5) == int(logits.argmax())
    draws = [runtime.sample(logits, 1.0, 1.0, 0, seed=7, step=s) for s in range(40)]
    assert draws == [runtime.sample(logits, 1.0, 1.0, 0, seed=7, step=s) for s in range(40)]  # reproducible
    assert len(set(draws)) > 5  # and actually random
    top5 = set(np.argsort(-logits)[:5].tolist())
    assert all(runtime.sample(logits, 1.0, 1.0, 5, seed=3, step=s) in top5 for s in range(40))
    p = torch.softmax(torch.tensor(logits), 0)
    nucleus_top = int(logits.argmax())
    if p[nucleus_top] > 0.05:  # top_p below the largest probability keeps exactly the argmax
        assert runtime.sample(logits, 1.0, float(p[nucleus_top]) * 0.5, 0, seed=1) == nucleus_top
    # min-p: every draw has probability >= min_p * the top one's, and the same draws as pyllm.ops.sample
    from pyllm import ops
    keep = set(torch.nonzero(p >= 0.3 * p.max()).flatten().tolist())
    mdraws = [runtime.sample(logits, 1.0, 1.0, 0, seed=9, step=s, min_p=0.3) for s in range(60)]
    assert set(mdraws) <= keep and (len(set(mdraws)) > 1) == (len(keep) > 1)
    assert mdraws == [int(ops.sample(torch.tensor(logits)[None], 1.0, 0, 1.0, 0.3, seed=9, step=s)[0][0])
                      for s in range(60)]


def test_sampler_rejects_bad_arguments(rng):
    """runtime.sample passed anything to the C sampler: a negative temperature or top_p > 1 sampled, a 2-D array was
    flattened, a negative seed or huge top_k was cffi's OverflowError; all -inf said 'NaN'."""
    logits = torch.randn(50, generator=rng).numpy()
    for kw, want in (({"temperature": -1.0}, "temperature must be a finite number >= 0"),
                     ({"temperature": float("inf")}, "temperature must be"),
                     ({"top_p": 2.0}, r"top_p must be in \(0, 1\]"), ({"top_p": 0.0}, "top_p must be"),
                     ({"top_k": -5}, "top_k must be"), ({"top_k": 2 ** 40}, "top_k must be"),
                     ({"seed": -1}, "seed must be in"), ({"min_p": 1.5}, r"min_p must be in \[0, 1\]"),
                     ({"min_p": -0.1}, "min_p must be")):
        with pytest.raises(ValueError, match=want):
            runtime.sample(logits, **kw)
    with pytest.raises(ValueError, match=r"expected non-empty 1-D logits \(n,\), got shape \(5, 10\)"):
        runtime.sample(logits.reshape(5, 10))
    with pytest.raises(ValueError, match="no finite logit"):
        runtime.sample(np.full(8, -np.inf, np.float32))
    for kw in ({"temperature": "1"}, {"top_p": None}, {"min_p": True}):  # a bare TypeError from a comparison
        with pytest.raises(TypeError, match=f"sample: {next(iter(kw))} must be a number, got "):
            runtime.sample(logits, **kw)


def test_export_fsyncs_model_bin_before_the_rename(tmp_path, rng, monkeypatch):
    """Session 30 audit: model.bin.tmp was closed and renamed without an fsync (tokenizer.bin had one): after a
    crash the rename could have reached the disk before the data, an empty or partial model.bin."""
    import pyllm.export as ex
    c = tiny_config()
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", str(a))) or real_replace(a, b))
    for quant in (None, "q8_0"):
        events.clear()
        ex.write_model_bin(tmp_path / "m.bin", random_state_dict(c, rng), c, quantize=quant, group_size=8)
        tmp = [e for e in events if e[0] == "replace" and e[1].endswith(".tmp")]
        assert len(tmp) == 1, events
        assert ("fsync", tmp[0][1]) in events[:events.index(tmp[0])], events


def test_export_writes_atomically_and_rejects_bad_args(tmp_path, rng):
    c = tiny_config()
    sd = random_state_dict(c, rng)
    paths = export(sd, c, tmp_path / "out", fmt="pyllm")
    assert paths["model"].exists() and not list((tmp_path / "out").glob("*.tmp"))
    with pytest.raises(ValueError, match="group"):
        export(sd, c, tmp_path / "out2", quantize="q8_0", group_size=48)
    with pytest.raises(ValueError, match="llama2.c hard-codes"):
        export(sd, c, tmp_path / "out3", fmt="llama2c")  # eps 1e-6 / theta 5000 cannot be expressed in llama2.c
    assert not (tmp_path / "out3" / "model.bin").exists()
    bad = dict(sd)
    del bad["layers.1.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match="missing"):
        export(bad, c, tmp_path / "out4")


# --- the binary -------------------------------------------------------------------------------------------------

def run_bin(*args, input=None):
    return subprocess.run([str(runtime.BIN_PATH), *map(str, args)], capture_output=True, text=True, input=input,
                          timeout=60, env={"OMP_NUM_THREADS": "1"})


@pytest.mark.skipif(not runtime.BIN_PATH.exists(), reason="pyllm-run not built")
def test_binary_help_and_bad_flags(tmp_path):
    r = run_bin("--help")
    assert r.returncode == 0
    for flag in ["-t", "-p", "-k", "--min-p", "-s", "-n", "-i", "-z", "-m", "-y", "--help"]:
        assert f"  {flag} " in r.stdout or f", {flag} " in r.stdout, flag
    assert "default 1.0" in r.stdout and "generate|chat" in r.stdout
    r = run_bin(tmp_path / "m.bin", "-x", "1")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "unknown option '-x'" in r.stderr
    r = run_bin(tmp_path / "m.bin", "-t")
    assert r.returncode == 2 and "missing value" in r.stderr
    r = run_bin(tmp_path / "m.bin", "-t", "hot")
    assert r.returncode == 2 and "temperature" in r.stderr
    r = run_bin(tmp_path / "missing.bin")
    assert r.returncode == 1 and "missing.bin: cannot open" in r.stderr and r.stderr.count("\n") == 1


@pytest.mark.skipif(not runtime.BIN_PATH.exists(), reason="pyllm-run not built")
def test_binary_flag_ranges_and_tokenizer_dir(tmp_path, rng):
    """Messages that say the real range (was '-n needs an integer >= 0, got 2147483647'); a negative or overflowing
    seed is an error (was silently wrapped to 2^64-1); a directory as -z says so (was 'read error')."""
    for flag, value, want in (("-n", "2147483647", "-n needs an integer in [0, 2^30]"),
                              ("-k", "2147483647", "-k needs an integer in [0, 2^30]"),
                              ("-s", "-1", "-s needs an integer seed in [0, 2^64)"),
                              ("-s", "99999999999999999999", "-s needs an integer seed in [0, 2^64)"),
                              ("-t", "1e40", "-t needs a finite temperature >= 0"),
                              ("-t", "", "-t needs a finite temperature >= 0"),      # was greedy, silently
                              ("-s", " -1", "-s needs an integer seed in [0, 2^64)"),  # was wrapped to 2^64-1
                              ("--min-p", "1.5", "--min-p needs a value in [0, 1]"),
                              ("--min-p", "", "--min-p needs a value in [0, 1]"),
                              ("--min-p", "x", "--min-p needs a value in [0, 1]")):
        r = run_bin(tmp_path / "m.bin", flag, value)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and want in r.stderr, (flag, value, r.stderr)
    c = tiny_config(norm_eps=1e-5)
    model = write_model_bin(tmp_path / "m.bin", random_state_dict(c, rng), c)
    (tmp_path / "tokdir").mkdir()
    r = run_bin(model, "-z", tmp_path / "tokdir", "-n", "2")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "tokdir: not a regular file" in r.stderr, r.stderr
    r = run_bin(model, "-z", tmp_path / "nope.bin", "-n", "2")
    assert r.returncode == 1 and "nope.bin: cannot open tokenizer file: No such file or directory" in r.stderr


CORPUS = ("First Citizen: Before we proceed any further, hear me speak. All: Speak, speak. Café naïve 東京 🙂 "
          "You are all resolved rather to die than to famish?  Resolved. resolved.\n") * 20


@pytest.fixture(scope="module")
def tok_and_model(tmp_path_factory):
    """A trained BPE tokenizer and a peaked random model over its vocab, exported by `export` (pyllm format)."""
    from pyllm.tokenizer import Tokenizer
    tok = Tokenizer.train(iterator=[CORPUS], vocab_size=300)
    gen = torch.Generator().manual_seed(1234)
    c = tiny_config(vocab_size=tok.vocab_size, max_seq_len=96)
    sd = peaked_model(gen, c)
    d = tmp_path_factory.mktemp("export")
    paths = export(sd, c, d, fmt="pyllm", tokenizer=tok)
    return tok, sd, c, paths


def python_greedy(sd, c, ids, n, stop):
    from pyllm.model import GPT
    m = GPT(c, backend="torch")
    m.load_state_dict(sd, strict=False)
    with torch.no_grad():
        out = m.generate(torch.tensor([ids]), n, temperature=0, stop_tokens=stop)[0, len(ids):].tolist()
    return out[:out.index(stop[0])] if stop and stop[0] in out else out


@pytest.mark.skipif(not runtime.BIN_PATH.exists(), reason="pyllm-run not built")
def test_binary_greedy_text_equals_python(tok_and_model):
    tok, sd, c, paths = tok_and_model
    prompt = "Before we proceed, café 東京"
    ids = tok.encode(prompt, add_bos=True)
    n_new = 40
    new = python_greedy(sd, c, ids, n_new, (tok.bos_id,))
    specials = set(tok.special_ids.values())
    want = b"".join(tok.token_bytes(i) for i in ids[1:] + new if i not in specials) + b"\n"
    r = subprocess.run([str(runtime.BIN_PATH), str(paths["model"]), "-t", "0", "-n", str(len(ids) + n_new - 1),
                        "-i", prompt], capture_output=True, timeout=60, env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert r.stdout == want
    assert b"achieved tok/s" in r.stderr
    # the same through the C API
    rt = runtime.Runtime(paths["model"], paths["tokenizer"])
    assert rt.encode(prompt, add_bos=True) == ids
    assert rt.generate_ids(ids, n_new, temperature=0, stop=(tok.bos_id,)) == new


@pytest.mark.skipif(not runtime.BIN_PATH.exists(), reason="pyllm-run not built")
def test_binary_chat_template_multi_turn(tok_and_model, tmp_path):
    """Chat mode feeds <|bos|> <|system|> sys <|end|> <|user|> msg <|end|> <|assistant|>, generates until <|end|>,
    then reads the next user turn from stdin on the same KV cache. The model's permutation walk is rigged so the
    assistant always answers "hi" then <|end|>; Python greedy on the same ids must agree."""
    tok, _, c, _ = tok_and_model
    S = tok.special_ids
    h, i = tok.encode("h")[0], tok.encode("i")[0]
    gen = torch.Generator().manual_seed(99)
    sd = random_state_dict(c, gen, std=0.05)
    perm = torch.randperm(c.vocab_size, generator=gen)
    for src, dst in [(S["<|assistant|>"], h), (h, i), (i, S["<|end|>"])]:
        j = int((perm == dst).nonzero())
        perm[src], perm[j] = perm[j].clone(), perm[src].clone()
    sd["lm_head.weight"] = 0.5 * sd["embed_tokens.weight"][perm.argsort()] * sd["norm.weight"].reciprocal()
    paths = export(sd, c, tmp_path, tokenizer=tok)
    ids = [S["<|bos|>"], S["<|system|>"], *tok.encode("Be brief."), S["<|end|>"], S["<|user|>"], *tok.encode("Speak"),
           S["<|end|>"], S["<|assistant|>"]]
    assert python_greedy(sd, c, ids, 5, (S["<|end|>"],)) == [h, i]
    ids2 = ids + [h, i, S["<|end|>"], S["<|user|>"], *tok.encode("again"), S["<|end|>"], S["<|assistant|>"]]
    assert python_greedy(sd, c, ids2, 5, (S["<|end|>"],)) == [h, i]
    # the ids above are pyllm.chat's template: what SFT trained on is what the binary feeds
    from pyllm.chat import render
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Speak"},
            {"role": "assistant", "content": "hi"}, {"role": "user", "content": "again"}]
    assert render(conv[:2], tok, add_generation_prompt=True)[0] == ids
    assert render(conv, tok, add_generation_prompt=True)[0] == ids2
    r = subprocess.run([str(runtime.BIN_PATH), str(paths["model"]), "-m", "chat", "-t", "0", "-n", "0",
                        "-y", "Be brief.", "-i", "Speak"], capture_output=True, timeout=60, input=b"again\n",
                       env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"Assistant: hi\nUser: Assistant: hi\nUser: ", r.stdout


def test_c_tokenizer_matches_python(tok_and_model):
    tok, _, _, paths = tok_and_model
    ct = runtime.CTokenizer(paths["tokenizer"])
    for text in [CORPUS[:300], "  spaces\t\tand\nnewlines  ", "emoji 🙂🙂 and <|end|> literal", ""]:
        ids = tok.encode(text)
        assert ct.encode(text) == ids
        assert ct.decode_bytes(ids) == tok.decode_bytes(ids)
    assert ct.token_id("<|user|>") == tok.special_ids["<|user|>"]
    with pytest.raises(ValueError, match="vocab_size"):
        runtime.CTokenizer(paths["tokenizer"], vocab_size=tok.vocab_size + 1)


@pytest.mark.skipif(not runtime.BIN_PATH.exists(), reason="pyllm-run not built")
def test_model_bin_names_its_tokenizer(tok_and_model, tmp_path):
    """export renames tokenizer.bin, then model.bin: a kill between the two left a new model beside the old tokenizer
    (same vocab size), which pyllm-run used without a word. model.bin now carries the CRC-32 of the tokenizer.bin
    exported with it; the binary and runtime.Runtime refuse any other, and a model.bin that names none (older
    exports, export without a tokenizer) pairs with any tokenizer of its vocab size as before."""
    import zlib
    from pyllm.tokenizer import Tokenizer
    tok, sd, c, paths = tok_and_model
    crc = struct.unpack_from("<I", paths["model"].read_bytes(), 52)[0]
    assert crc == zlib.crc32(paths["tokenizer"].read_bytes()) != 0
    other = Tokenizer.train(iterator=[CORPUS[::-1]], vocab_size=tok.vocab_size)  # same vocab size, other merges
    assert other.vocab_size == tok.vocab_size
    old = tmp_path / "old"  # what the kill leaves: the earlier export's tokenizer.bin, this export's model.bin
    export(sd, c, old, fmt="pyllm", tokenizer=other)
    shutil.copy(paths["model"], old / "model.bin")
    r = run_bin(str(old / "model.bin"), "-n", "4", "-t", "0", "-i", "Speak")
    assert r.returncode == 1 and r.stdout == "", r
    err = r.stderr
    assert err.count("\n") == 1 and str(old / "tokenizer.bin") in err and "not the tokenizer.bin exported" in err, err
    with pytest.raises(ValueError, match="not the tokenizer.bin exported with this model.bin"):
        runtime.Runtime(old / "model.bin", old / "tokenizer.bin")
    def run_raw(*args):  # bytes out: a byte-level model may print part of a UTF-8 character
        return subprocess.run([str(runtime.BIN_PATH), *map(str, args), "-n", "16", "-t", "0", "-i", "Speak"],
                              capture_output=True, timeout=60, env={"OMP_NUM_THREADS": "1"})
    r = run_raw(paths["model"])  # its own tokenizer: runs
    assert r.returncode == 0, r.stderr
    none = tmp_path / "none"
    export(sd, c, none, fmt="pyllm")  # no tokenizer: no CRC, any tokenizer of the vocab size goes
    assert struct.unpack_from("<I", (none / "model.bin").read_bytes(), 52)[0] == 0
    r = run_raw(none / "model.bin", "-z", old / "tokenizer.bin")
    assert r.returncode == 0, r.stderr
    runtime.Runtime(none / "model.bin", old / "tokenizer.bin")


def test_c_tokenizer_decode_rejects_what_python_rejects(tok_and_model):
    """CTokenizer.decode skipped an out-of-range id (run_decode's NULL) where pyllm.tokenizer raised; both now raise
    the same one-line error."""
    tok, _, _, paths = tok_and_model
    ct = runtime.CTokenizer(paths["tokenizer"])
    assert ct.vocab_size == tok.vocab_size
    for ids, want in (([1, tok.vocab_size], f"outside 0..{tok.vocab_size - 1}"), ([-1], "outside"),
                      ([1, "a"], "token ids must be integers, got 'a'")):
        for decode in (ct.decode, tok.decode):
            with pytest.raises(ValueError, match=want):
                decode(ids)


@pytest.mark.skipif(not runtime.BIN_PATH.exists(), reason="pyllm-run not built")
def test_binary_chat_prompt_longer_than_the_context(tok_and_model):
    """A -y system prompt (or a first message) that leaves no room for a reply printed "User: ", read stdin, then
    "context full" with exit 0."""
    _, _, c, paths = tok_and_model
    for args, want in ((["-y", "Before we proceed any further " * 10], "the system prompt (-y) takes"),
                       (["-i", "Before we proceed any further " * 10], "the first message (-i or stdin) takes")):
        r = subprocess.run([str(runtime.BIN_PATH), str(paths["model"]), "-m", "chat", "-t", "0", "-n", "20", *args],
                           capture_output=True, timeout=60, input=b"hello\n", env={"OMP_NUM_THREADS": "1"})
        assert r.returncode == 1 and r.stdout == b"", (r.returncode, r.stdout)
        err = r.stderr.decode().splitlines()
        assert len(err) == 1 and err[0].startswith("pyllm-run: error: " + want) and "of the 20 context" in err[0], err


@pytest.mark.skipif(not runtime.BIN_PATH.exists(), reason="pyllm-run not built")
def test_binary_prompt_bytes_and_lengths(tok_and_model):
    """Found by a fuzz of the binary against Python (session 15): invalid UTF-8 in -i / -y / a chat line was
    tokenized byte by byte with exit 0 (Python's tokenizer cannot take it); a prompt longer than -n was cut to -n
    tokens, silently; a chat line was cut at its first \\r or NUL. Now one-line errors, and only a trailing \\r\\n
    or \\n is stripped from a chat line."""
    _, _, c, paths = tok_and_model
    model = str(paths["model"])

    def run(*args, input=b""):
        return subprocess.run([str(runtime.BIN_PATH), model, "-t", "0", *args], capture_output=True, timeout=60,
                              input=input, env={"OMP_NUM_THREADS": "1"})
    for args, want in ((["-i", b"ab\xff\xfecd"], "the prompt (-i) is not valid UTF-8"),
                       (["-i", b"\xed\xa0\x80"], "the prompt (-i) is not valid UTF-8"),        # a surrogate
                       (["-i", b"\xc0\xaf"], "the prompt (-i) is not valid UTF-8"),            # overlong '/'
                       (["-m", "chat", "-y", b"sys\xf8"], "the system prompt (-y) is not valid UTF-8")):
        r = run(*args)
        assert r.returncode == 2 and r.stderr.decode().splitlines() == [f"pyllm-run: error: {want}"], r.stderr
    r = run("-n", "5", "-i", "Before we proceed any further, hear me speak.")
    err = r.stderr.decode().splitlines()
    assert r.returncode == 1 and len(err) == 1 and "more than the 5 positions (-n" in err[0] and r.stdout == b"", err
    for line, want in ((b"ab\xff\xfe\n", "the message is not valid UTF-8"),
                       (b"x\0yz\n", "the message contains a NUL byte")):
        r = run("-m", "chat", "-n", "40", input=line)
        assert r.returncode == 1 and r.stderr.decode().splitlines() == [f"pyllm-run: error: {want}"], r.stderr
    crlf = run("-m", "chat", "-n", "40", input=b"Speak, speak.\r\n")
    lf = run("-m", "chat", "-n", "40", input=b"Speak, speak.\n")
    assert crlf.returncode == lf.returncode == 0 and crlf.stdout == lf.stdout
    ok = run("-i", "Café 東京 🙂", "-n", "30")  # valid multi-byte text still runs
    assert ok.returncode == 0 and ok.stdout.startswith("Café 東京 🙂".encode())


@pytest.mark.skipif(not runtime.BIN_PATH.exists(), reason="pyllm-run not built")
def test_binary_chat_stdin_read_error_and_long_paths(tok_and_model, tmp_path):
    """Session 30 audit: an unreadable stdin in chat mode (a directory, a closed descriptor) ended as a clean end of
    input, exit 0; with a path of ~500+ bytes the 512-byte error buffer cut off the problem (tokenizer) or dropped
    the path (model). Now a read error is one line and exit 1, and an error keeps the whole path and the problem."""
    _, _, c, paths = tok_and_model
    env = {"OMP_NUM_THREADS": "1"}
    d = os.open(tmp_path, os.O_RDONLY)  # a directory as stdin: read() fails with EISDIR
    try:
        r = subprocess.run([str(runtime.BIN_PATH), str(paths["model"]), "-m", "chat", "-n", "20"], stdin=d,
                           capture_output=True, timeout=60, env=env)
    finally:
        os.close(d)
    assert r.returncode == 1 and r.stderr.decode().splitlines() == [
        "pyllm-run: error: reading standard input: Is a directory"], r.stderr
    r = subprocess.run([str(runtime.BIN_PATH), str(paths["model"]), "-m", "chat", "-n", "20"], input=b"",
                       capture_output=True, timeout=60, env=env)
    assert r.returncode == 0 and r.stderr == b"", r.stderr  # a plain end of input is still a clean end
    deep = tmp_path.joinpath(*["d" * 200] * 4)
    deep.mkdir(parents=True)
    bad = deep / "bad.bin"
    bad.write_bytes(b"\xff" * 1000)
    for args, want in (([str(bad)], f"pyllm-run: error: {bad}: not a model file"),
                       ([str(paths["model"]), "-z", str(deep / "none.bin")],
                        f"pyllm-run: error: {deep / 'none.bin'}: cannot open tokenizer file: No such file or directory")):
        r = subprocess.run([str(runtime.BIN_PATH), *args, "-n", "2"], capture_output=True, timeout=60, env=env)
        err = r.stderr.decode().splitlines()
        assert r.returncode == 1 and len(err) == 1 and err[0].startswith(want), err
    with pytest.raises(ValueError, match=f"^{bad}: not a model file"):  # the Python binding's buffer too
        runtime.Model(bad)


L2C_TOK = __import__("conftest").SHARED / "data" / "llama2c-tokenizer.bin"


@pytest.mark.skipif(not runtime.BIN_PATH.exists(), reason="pyllm-run not built")
def test_binary_inputs_found_by_the_sanitizer_audit(tok_and_model, tmp_path, rng):
    """Session 18's audit of the binary (ASan/UBSan, a mutation fuzzer): each was an exit 0, a hang, a wrong or
    nameless error."""
    tok, _, c, paths = tok_and_model
    model = str(paths["model"])

    def run(*args, **kw):
        if "stdout" not in kw:
            kw["capture_output"] = True
        return subprocess.run([str(runtime.BIN_PATH), *map(str, args)], timeout=20, env={"OMP_NUM_THREADS": "1"},
                              **kw)
    # -t below ~2.9e-39: 1/T was +inf, every weight NaN -> 0, then a read of logits[-1] (ASan: heap overflow) and a
    # false "the model produced NaN/inf logits". Now the T -> 0 limit: the greedy text.
    greedy = run(model, "-t", "0", "-n", "12", "-i", "Speak")
    for t in ("1e-45", "2.9e-39", "1e-30"):
        r = run(model, "-t", t, "-n", "12", "-i", "Speak", "-s", "3")
        assert r.returncode == 0 and r.stdout == greedy.stdout, (t, r.stderr)
    # "cannot encode the prompt", with no file and no reason: a pyllm tokenizer without <|bos|> ...
    nobos = tmp_path / "nobos.bin"
    nobos.write_bytes(paths["tokenizer"].read_bytes().replace(b"<|bos|>", b"<|bXs|>"))
    r = run(model, "-z", nobos, "-n", "5", "-i", "")
    assert r.returncode == 1 and r.stderr.decode().splitlines() == [
        f"pyllm-run: error: {nobos}: the tokenizer has no <|bos|> token (pyllm's tokenizers always have one)"]
    # ... and a llama2.c tokenizer without byte-fallback tokens, on a character it has no token for
    words = [b"<unk>", b"<s>", b"</s>", b" "] + [bytes([ch]) for ch in b"abcdefghijklm"]
    l2c = tmp_path / "tok17.bin"
    l2c.write_bytes(struct.pack("<I", 8) + b"".join(struct.pack("<fI", 0.0, len(w)) + w for w in words))
    c17 = tiny_config(vocab_size=len(words))
    m17 = write_model_bin(tmp_path / "m17.bin", random_state_dict(c17, rng), c17)
    assert run(m17, "-z", l2c, "-n", "8", "-i", "bad").returncode == 0
    r = run(m17, "-z", l2c, "-n", "8", "-i", "hello")
    assert r.returncode == 1 and r.stderr.decode().splitlines() == [
        f"pyllm-run: error: {l2c}: the tokenizer has no token for a character of the prompt (-i) (and no byte "
        f"fallback tokens)"]
    with pytest.raises(ValueError, match="tok17.bin: the tokenizer has no token for a character of the text"):
        runtime.CTokenizer(l2c, len(words)).encode("hello")
    # a FIFO as the tokenizer (or the model) hung in open(); /dev/zero as the tokenizer was read to 1 GiB first
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for args, name in (((model, "-z", fifo), fifo), ((fifo,), fifo), ((model, "-z", "/dev/zero"), "/dev/zero")):
        r = run(*args, "-n", "2")
        assert r.returncode == 1 and r.stderr.decode().splitlines() == [f"pyllm-run: error: {name}: not a regular "
                                                                        f"file"], r.stderr
    # a full disk on stdout: exit 0, the text lost without a word
    with open("/dev/full", "wb") as full:
        r = run(model, "-t", "0", "-n", "8", "-i", "Speak", stdout=full, stderr=subprocess.PIPE)
    assert r.returncode == 1 and r.stderr.decode().splitlines()[-1] == (
        "pyllm-run: error: writing to standard output: No space left on device")
    # "-h" as an option's value is that value (it printed the help, exit 0); -y outside chat was ignored
    r = run(model, "-t", "0", "-n", "8", "-i", "-h")
    assert r.returncode == 0 and r.stdout.startswith(b"-h") and b"Usage" not in r.stdout
    r = run(model, "-y", "Be brief.", "-i", "Speak")
    assert r.returncode == 2 and r.stderr.decode().splitlines() == [
        "pyllm-run: error: -y (a system prompt) needs -m chat; the mode is 'generate' (see --help)"]


@pytest.mark.skipif(not L2C_TOK.exists(), reason="no shared llama2.c tokenizer.bin")
def test_llama2c_tokenizer_through_runtime():
    ct = runtime.CTokenizer(L2C_TOK, 32000)
    ids = ct.encode("Once upon a time", add_bos=True)
    assert ids[0] == 1 and len(ids) > 2
    assert ct.decode(ids[1:]).strip() == "Once upon a time"


def test_cli_export_end_to_end(tmp_path, tok_and_model):
    """pyllm export on a saved checkpoint -> model.bin + tokenizer.bin that the C runtime loads with equal logits."""
    from pyllm.checkpoint import save_checkpoint
    from pyllm.cli import main as cli_main
    from pyllm.model import GPT
    tok, sd, c, _ = tok_and_model
    m = GPT(c, backend="torch")
    m.load_state_dict(sd, strict=False)
    save_checkpoint(tmp_path / "ckpt", m, tok)
    for fmt, extra in [("pyllm", []), ("pyllm", ["--quantize", "q8_0", "--group-size", "32"]), ("llama2c", [])]:
        out = tmp_path / f"out-{fmt}-{len(extra)}"
        cc = c
        if fmt == "llama2c" and (c.norm_eps != 1e-5 or c.rope_theta != 1e4):
            assert cli_main(["export", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(out), "--format", fmt]) == 2
            continue
        assert cli_main(["export", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(out), "--format", fmt,
                         *extra]) == 0
        rt = runtime.Runtime(out / "model.bin", out / "tokenizer.bin")
        ids = tok.encode("Speak, speak.", add_bos=True)
        got = np.stack([rt.forward(t, p) for p, t in enumerate(ids)])
        want = ref_logits(sd, cc, ids).numpy()
        tol = 1e-4 if not extra else Q8_REL_BOUND * np.abs(want).max()
        assert np.abs(got - want).max() < tol
    assert cli_main(["export", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2


@pytest.mark.skipif(not (L2C_TOK.exists() and runtime.BIN_PATH.exists()), reason="no llama2.c tokenizer or binary")
def test_binary_llama2c_checkpoint_and_tokenizer(tmp_path, rng):
    """A llama2.c v0 checkpoint (vocab 32000) + llama2.c's tokenizer.bin: greedy text == torch greedy decoded."""
    c = tiny_config(vocab_size=32000, dim=32, n_heads=4, n_kv_heads=4, hidden_dim=64, norm_eps=1e-5,
                    rope_theta=10000.0, max_seq_len=40)
    sd = random_state_dict(c, rng, tied=True, std=0.3)
    write_llama2c(tmp_path / "model.bin", sd, c, version=0)
    ct = runtime.CTokenizer(L2C_TOK, 32000)
    ids = ct.encode("Once upon a time", add_bos=True)
    seq = list(ids)
    while len(seq) < 30:
        nxt = int(ref_logits(sd, c, seq)[-1].argmax())
        if nxt == 1:
            break
        seq.append(nxt)
    pieces = [ct.decode_bytes([t], prev=p) for p, t in zip(seq, seq[1:])]
    # as llama2.c's safe_printf: a one-byte piece that is a control character is not printed
    want = b"".join(b for b in pieces if not (len(b) == 1 and (b[0] < 0x20 and b not in b"\n\t\r\v\f" or b[0] == 0x7f)))
    r = subprocess.run([str(runtime.BIN_PATH), str(tmp_path / "model.bin"), "-z", str(L2C_TOK), "-t", "0", "-n", "29",
                        "-i", "Once upon a time"], capture_output=True, timeout=60, env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert r.stdout == want + b"\n"
    # control bytes spelled as <0xHH> tokens (a prompt's ESC sequence, a generated NUL) printed raw (session 30)
    r = subprocess.run([str(runtime.BIN_PATH), str(tmp_path / "model.bin"), "-z", str(L2C_TOK), "-t", "0", "-n", "12",
                        "-i", b"A\x01B\x1b[2JC\x7f\tD"], capture_output=True, timeout=60, env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0 and r.stdout.startswith(b"AB[2JC\tD"), r.stdout
    r = subprocess.run([str(runtime.BIN_PATH), str(tmp_path / "model.bin"), "-z", str(L2C_TOK), "-m", "chat"],
                       capture_output=True, text=True, timeout=60, input="")
    assert r.returncode == 1 and "chat mode needs a pyllm tokenizer" in r.stderr
    # the error names the tokenizer file and what it lacks (session 30: it named neither)
    assert r.stderr.splitlines() == [f"pyllm-run: error: {L2C_TOK}: chat mode needs a pyllm tokenizer with <|bos|> "
                                     "<|system|> <|user|> <|assistant|> <|end|> tokens; missing: <|bos|> <|system|> "
                                     "<|user|> <|assistant|> <|end|>"], r.stderr


@pytest.mark.skipif(not runtime.BIN_PATH.exists(), reason="pyllm-run not built")
def test_binary_sampling_equals_model_generate_same_seed(tok_and_model, tmp_path, rng):
    """The binary samples with the shared kernel's counter RNG: same seed/temperature/top-k/top-p/min-p -> same tokens
    as pyllm's model.generate on the pyllm backend."""
    from pyllm.model import GPT
    tok, _, c, _ = tok_and_model
    sd = random_state_dict(c, rng, std=0.1)  # flat logits: sampling matters
    paths = export(sd, c, tmp_path, tokenizer=tok)
    m = GPT(c, backend="pyllm")
    m.load_state_dict(sd, strict=False)
    ids = tok.encode("Speak", add_bos=True)
    n_new = 30
    sd_ = dict(temperature=1.3, top_k=40, top_p=0.97, min_p=0.02)
    for seed in range(17, 49):  # the random model may sample BOS (a stop) early: take the first seed that runs on
        with torch.no_grad():
            out = m.generate(torch.tensor([ids]), n_new, seed=seed, stop_tokens=(tok.bos_id,),
                             **sd_)[0, len(ids):].tolist()
        new = out[:out.index(tok.bos_id)] if tok.bos_id in out else out
        if len(set(new)) > 3:
            break
    assert len(set(new)) > 3  # actually sampled, not a fixed point
    rt = runtime.Runtime(paths["model"], paths["tokenizer"])
    assert rt.generate_ids(ids, n_new, seed=seed, stop=(tok.bos_id,), **sd_) == new
    specials = set(tok.special_ids.values())
    # generate's text is what the binary prints for the new tokens: control tokens left out
    text = b"".join(tok.token_bytes(i) for i in new if i not in specials).decode(errors="replace")
    assert rt.generate("Speak", n_new, seed=seed, **sd_) == text
    h, end = tok.encode("h")[0], tok.special_ids["<|end|>"]
    assert rt.decode([h, end, h]) == "h<|end|>h" and rt.decode([h, end, h], skip_special=True) == "hh"
    want = b"".join(tok.token_bytes(i) for i in ids[1:] + new if i not in specials) + b"\n"
    r = subprocess.run([str(runtime.BIN_PATH), str(paths["model"]), "-t", "1.3", "-k", "40", "-p", "0.97",
                        "--min-p", "0.02", "-s", str(seed),
                        "-n", str(len(ids) + n_new - 1), "-i", "Speak"], capture_output=True, timeout=60,
                       env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0 and r.stdout == want
    # --min-p reaches the sampler: at 1 only the top token survives, so T=1 sampling is greedy decoding
    common = [str(runtime.BIN_PATH), str(paths["model"]), "-p", "1", "-s", str(seed), "-n", str(len(ids) + n_new - 1),
              "-i", "Speak"]
    greedy, minp1, plain = (subprocess.run(common + extra, capture_output=True, timeout=60,
                                           env={"OMP_NUM_THREADS": "1"}).stdout
                            for extra in (["-t", "0"], ["-t", "1", "--min-p", "1"], ["-t", "1"]))
    assert minp1 == greedy and plain != greedy


@pytest.mark.parametrize("quant", [None, "q8_0"])
def test_every_isa_path_gives_the_same_logits(tmp_path, rng, quant):
    """libpyllm_run picks its path at load time from PYLLM_ISA: each path this CPU runs matches the reference."""
    import os
    import sys
    from conftest import ISAS
    c = tiny_config(norm_eps=1e-5, max_seq_len=12)
    sd = random_state_dict(c, rng)
    write_model_bin(tmp_path / "m.bin", sd, c, quantize=quant, group_size=32)
    tokens = torch.randint(0, c.vocab_size, (12,), generator=rng).tolist()
    want = ref_logits(sd, c, tokens).numpy()
    code = ("import sys, numpy as np; from pyllm import runtime; m = runtime.Model(sys.argv[1]); "
            "np.save(sys.argv[2], np.stack([m.forward(t, p) for p, t in enumerate(map(int, sys.argv[3:]))]))")
    outs = {}
    for isa in ISAS:
        out = tmp_path / f"{isa}.npy"
        env = dict(os.environ, PYLLM_ISA=isa, OMP_NUM_THREADS="1")
        r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m.bin"), str(out), *map(str, tokens)],
                           capture_output=True, text=True, env=env, timeout=60)
        assert r.returncode == 0, r.stderr
        outs[isa] = np.load(out)
    scale = np.abs(want).max()
    for isa, got in outs.items():
        if quant is None:
            assert np.abs(got - want).max() < 1e-4, isa
        else:  # paths differ slightly: an fp32 rounding difference upstream can flip an activation's int8 rounding
            assert np.abs(got - want).max() < 0.06 * scale, isa  # plain random weights: Q8_0 error 2-4%


@pytest.mark.parametrize("quant,G,vocab", [(None, 0, 131), ("q8_0", 16, 131), ("q8_0", 48, 131), (None, 0, 1100),
                                           ("q8_0", 16, 1100)])
def test_logits_do_not_depend_on_the_thread_count(tmp_path, rng, quant, G, vocab):
    """run_forward is one parallel region whose threads split the rows of every product, the heads, and the SwiGLU
    rows (whole Q8_0 groups): 1, 2, 3 and 5 threads (some with no heads or no rows: 2 kv heads, odd sizes) give the
    same logits as each other, bit for bit, and match the reference. G = 48: the non-VNNI Q8_0 path. vocab 1100: the
    classifier in 512-row chunks from a shared counter (run.c CLS_CHUNK), the last one short."""
    import os
    import sys
    c = tiny_config(dim=96, n_heads=6, n_kv_heads=2, hidden_dim=144, vocab_size=vocab, norm_eps=1e-5, max_seq_len=12)
    sd = random_state_dict(c, rng)
    write_model_bin(tmp_path / "m.bin", sd, c, quantize=quant, group_size=G or 64)
    tokens = torch.randint(0, c.vocab_size, (12,), generator=rng).tolist()
    want = ref_logits(sd, c, tokens).numpy()
    code = ("import sys, numpy as np; from pyllm import runtime; m = runtime.Model(sys.argv[1]); "
            "np.save(sys.argv[2], np.stack([m.forward(t, p) for p, t in enumerate(map(int, sys.argv[3:]))]))")
    outs = {}
    for nt in (1, 2, 3, 5):
        out = tmp_path / f"{nt}.npy"
        np.save(out, np.full((len(tokens), c.vocab_size), np.nan, np.float32))  # poisoned: must be overwritten
        env = dict(os.environ, OMP_NUM_THREADS=str(nt))
        r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m.bin"), str(out), *map(str, tokens)],
                           capture_output=True, text=True, env=env, timeout=60)
        assert r.returncode == 0, r.stderr
        outs[nt] = np.load(out)
    for nt in (2, 3, 5):
        assert np.array_equal(outs[nt], outs[1]), nt
    err = np.abs(outs[1] - want).max()
    assert err < (1e-4 if quant is None else 0.06 * np.abs(want).max()), err


def test_c_api_library_is_never_unloaded():
    """libpyllm_run.so is linked -z nodelete. cffi dlcloses it at interpreter exit while libgomp's idle worker
    threads still run libgomp code; unmapping libgomp under them segfaulted the exit of ~5% of 2-thread runs under
    load (a gdb backtrace: dlclose on the main thread, SIGSEGV at an unmapped pc in the worker)."""
    import shutil
    from pathlib import Path
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("no readelf")
    lib = Path(runtime.__file__).resolve().parent / "lib" / "libpyllm_run.so"
    out = subprocess.run([readelf, "-d", str(lib)], capture_output=True, text=True, check=True).stdout
    assert any("FLAGS_1" in line and "NODELETE" in line for line in out.splitlines()), out


def test_cffi_declarations_come_from_run_h():
    """The cffi binding reads csrc/run.h itself (shipped as pyllm/lib/run.h): every function the header declares is
    bound, with no second copy of the declarations to drift."""
    from pathlib import Path
    import re

    import cffi

    hdr = (Path(__file__).resolve().parents[1] / "csrc" / "run.h").read_text()
    assert runtime.HEADER_PATH.read_text() == hdr, "pyllm/lib/run.h is stale: rebuild the extension"
    declared = set(re.findall(r"\b(run_\w+)\s*\(", hdr))
    assert {"run_model_build", "run_forward", "run_sample", "run_encode", "run_decode"} <= declared
    ffi = cffi.FFI()
    ffi.cdef(runtime.cdef_from_header(hdr))
    lib = ffi.dlopen(str(runtime.LIB_PATH))
    for name in declared:
        assert callable(getattr(lib, name)), name


def test_runtime_integer_arguments_and_unrun_positions(tok_and_model):
    """Model.forward took token 3.7 as 3, True as 1 and pos 0.5 as 0 without a word, and ran a position whose
    predecessors had never been run (attention read cache rows of zeros or of an older sequence: wrong logits, no
    error); a closed CTokenizer was cffi's "initializer for ctype 'run_tokenizer *'", encode(5) an AttributeError,
    sample(seed=1.5) cffi's "an integer is required", generate_ids(np.array(...)) numpy's "truth value ... ambiguous"."""
    tok, sd, c, paths = tok_and_model
    m = runtime.Model(paths["model"])
    for token, pos, name in ((3.7, 0, "forward token"), (True, 0, "forward token"), (3, 0.5, "forward pos")):
        with pytest.raises(TypeError, match=f"{name}: expected an integer"):
            m.forward(token, pos)
    with pytest.raises(ValueError, match="forward pos 2: positions 0..1 have not been run"):
        m.forward(5, 2)
    first = [m.forward(t, p) for p, t in enumerate([5, 6, 7])]
    np.testing.assert_array_equal(m.forward(np.int64(7), torch.tensor(2)), first[2])   # integer-likes are fine
    m.forward(9, 1)                      # a new sequence from position 1 on: position 2 is no longer its
    with pytest.raises(ValueError, match="forward pos 3: positions 2..2 have not been run"):
        m.forward(5, 3)
    m.close()
    ct = runtime.CTokenizer(paths["tokenizer"], tok.vocab_size)
    with pytest.raises(TypeError, match="encode expects str, got int"):
        ct.encode(5)
    with pytest.raises(ValueError, match="token ids must be integers, got True"):
        ct.decode([True])
    assert ct.decode_bytes([5], prev=2 ** 40) == ct.decode_bytes([5])   # was cffi's OverflowError
    ct.close()
    for call in (lambda: ct.encode("hi"), lambda: ct.decode([3]), lambda: ct.token_id("a")):
        with pytest.raises(ValueError, match="tokenizer is closed"):
            call()
    logits = np.random.default_rng(0).standard_normal(20).astype(np.float32)
    for kw in ({"seed": 1.5}, {"top_k": 2.5}, {"step": 1.0}):
        with pytest.raises(TypeError, match=f"sample {next(iter(kw))}: expected an integer"):
            runtime.sample(logits, **kw)
    assert runtime.sample(logits, seed=torch.tensor(5)) == runtime.sample(logits, seed=5)  # was an OverflowError
    r = runtime.Runtime(paths["model"], paths["tokenizer"])
    assert r.generate_ids(np.array([1, 2]), 3, temperature=0) == r.generate_ids([1, 2], 3, temperature=0)
    with pytest.raises(TypeError, match="generate_ids ids: expected an integer, got 1.5"):
        r.generate_ids([1.5, 2], 2)
