"""Checkpoint + safetensors tests: interop with the safetensors package and HF transformers in both directions,
atomic writes, and one-line errors for bad input. Run: OMP_NUM_THREADS=1 PYTHONPATH=$PWD python -m pytest -q
tests/test_checkpoint.py
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

from pyllm import checkpoint, safetensors_io
from pyllm.checkpoint import load_checkpoint, read_extra, save_checkpoint
from pyllm.config import ModelConfig
from pyllm.model import GPT

st = pytest.importorskip("safetensors.torch")
transformers = pytest.importorskip("transformers")

VARIANTS = {  # name -> ModelConfig overrides
    "mha": dict(n_heads=4, n_kv_heads=4, tie_embeddings=False),
    "gqa": dict(n_heads=4, n_kv_heads=2, tie_embeddings=False),
    "tied": dict(n_heads=4, n_kv_heads=1, tie_embeddings=True),
}


def tiny(rng, **kw) -> GPT:
    torch.manual_seed(int(torch.randint(0, 2 ** 31 - 1, (1,), generator=rng)))
    cfg = dict(vocab_size=67, dim=32, n_layers=2, hidden_dim=56, max_seq_len=48, init_std=0.15, rope_theta=321.0,
               norm_eps=1e-6)
    cfg.update(kw)
    return GPT(ModelConfig(**cfg))


def hf_logits(path, idx, **kw):
    hf = transformers.LlamaForCausalLM.from_pretrained(path, attn_implementation="eager", **kw).eval()
    with torch.no_grad():
        return hf(idx).logits.float()


def some_tensors(rng):
    return {
        "f32": torch.randn(3, 5, generator=rng), "bf16": torch.randn(7, generator=rng).bfloat16(),
        "f16": torch.randn(2, 3, generator=rng).half(), "i64": torch.randint(-9, 9, (4,), generator=rng),
        "i32": torch.randint(-9, 9, (2, 2), generator=rng).int(), "u8": torch.randint(0, 255, (5,), generator=rng,
                                                                                      dtype=torch.uint8),
        "bool": torch.randint(0, 2, (3,), generator=rng).bool(), "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
    }


def same(a: dict, b: dict):
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k


# --- safetensors_io ---------------------------------------------------------------------------------------------
def test_safetensors_interop_both_directions(rng, tmp_path):
    ts = some_tensors(rng)
    safetensors_io.save_file(ts, tmp_path / "ours.safetensors", metadata={"step": "12", "note": "x"})
    same(st.load_file(str(tmp_path / "ours.safetensors")), ts)
    from safetensors import safe_open
    with safe_open(str(tmp_path / "ours.safetensors"), "pt") as f:
        assert f.metadata() == {"step": "12", "note": "x"}
    st.save_file(ts, str(tmp_path / "theirs.safetensors"), metadata={"a": "b"})
    got, meta = safetensors_io.load_file(tmp_path / "theirs.safetensors", with_metadata=True)
    same(got, ts)
    assert meta == {"a": "b"}
    assert not list(tmp_path.glob("*.tmp-*"))


def test_safetensors_atomic_write_keeps_old_file(rng, tmp_path, monkeypatch):
    path = tmp_path / "w.safetensors"
    old = {"a": torch.randn(4, generator=rng)}
    safetensors_io.save_file(old, path)

    def boom(t):
        raise OSError("disk full")
    monkeypatch.setattr(safetensors_io, "_bytes_view", boom)
    with pytest.raises(OSError, match="disk full"):
        safetensors_io.save_file({"a": torch.zeros(4), "b": torch.zeros(2)}, path)
    monkeypatch.undo()
    same(safetensors_io.load_file(path), old)
    assert not list(tmp_path.glob("*.tmp-*"))


def _write_raw(path, header: dict, data: bytes):
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)


@pytest.mark.parametrize("case, pattern", [
    ("truncated", "truncated"),
    ("out_of_bounds", "'w'.*out of bounds"),
    ("size_mismatch", "'w'.*expected 24"),
    ("overlap", "overlap"),
    ("bad_dtype", "'w'.*unsupported dtype"),
    ("bad_json", "not valid JSON"),
    ("huge_header", "header length"),
    # session 18: a RecursionError, torch.empty's overflow and bool TypeErrors, none naming the file
    ("deep_json", "nested too deeply"),
    ("bool_shape", r"'w': bad shape \[True\]"),
    ("huge_dim", r"'w': bad shape \[0, 9223372036854775808\]"),
    # session 30: a list as dtype was "unhashable type: 'list'" with a traceback; a name given twice (json kept the
    # last entry), gaps and trailing bytes were read, where the safetensors package refuses each
    ("list_dtype", r"'w': unsupported dtype \['F32'\]"),
    ("duplicate", "header names 'w' twice"),
    ("gap", "4 unused bytes between tensors 'w' and 'v'"),
    ("trailing", "the tensors cover bytes 0..16 of the 20-byte data section"),
])
def test_safetensors_bad_files_one_line_errors(tmp_path, case, pattern):
    p = tmp_path / f"{case}.safetensors"
    if case == "truncated":
        safetensors_io.save_file({"w": torch.randn(100)}, p)
        p.write_bytes(p.read_bytes()[:-37])
    elif case == "out_of_bounds":
        _write_raw(p, {"w": {"dtype": "F32", "shape": [6], "data_offsets": [0, 24]}}, b"\0" * 16)
    elif case == "size_mismatch":
        _write_raw(p, {"w": {"dtype": "F32", "shape": [6], "data_offsets": [0, 20]}}, b"\0" * 24)
    elif case == "overlap":
        _write_raw(p, {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                       "v": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, b"\0" * 24)
    elif case == "bad_dtype":
        _write_raw(p, {"w": {"dtype": "F8_E4M3X", "shape": [4], "data_offsets": [0, 4]}}, b"\0" * 4)
    elif case == "bad_json":
        p.write_bytes(struct.pack("<Q", 5) + b"{nope" + b"\0" * 8)
    elif case == "huge_header":
        p.write_bytes(struct.pack("<Q", 2 ** 40) + b"{}")
    elif case == "deep_json":
        h = b"[" * 200000 + b"]" * 200000
        p.write_bytes(struct.pack("<Q", len(h)) + h)
    elif case == "bool_shape":
        _write_raw(p, {"w": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, b"\0" * 4)
    elif case == "huge_dim":
        _write_raw(p, {"w": {"dtype": "F32", "shape": [0, 2 ** 63], "data_offsets": [0, 0]}}, b"")
    elif case == "list_dtype":
        _write_raw(p, {"w": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4)
    elif case == "duplicate":
        e = '{"dtype": "F32", "shape": [1], "data_offsets": [%d, %d]}'
        h = ('{"w": %s, "w": %s}' % (e % (0, 4), e % (4, 8))).encode()
        p.write_bytes(struct.pack("<Q", len(h)) + h + b"\0" * 8)
    elif case == "gap":
        _write_raw(p, {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                       "v": {"dtype": "F32", "shape": [4], "data_offsets": [20, 36]}}, b"\0" * 36)
    elif case == "trailing":
        _write_raw(p, {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 20)
    with pytest.raises(ValueError, match=pattern) as e:
        safetensors_io.load_file(p)
    msg = str(e.value)
    assert str(p) in msg and "\n" not in msg


# --- HF round trips ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_pyllm_to_transformers_same_logits(rng, tmp_path, variant):
    m = tiny(rng, **VARIANTS[variant])
    save_checkpoint(tmp_path / "ck", m)
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["config.json", "generation_config.json",
                                                                    "model.safetensors"]
    idx = torch.randint(0, 67, (2, 40), generator=rng)
    with torch.no_grad():
        ours = m(idx)[0]
    theirs = hf_logits(tmp_path / "ck", idx)
    assert (ours - theirs).abs().max().item() < 1e-4
    assert ours.abs().max() > 0.1  # logits are not trivially ~0
    keys = set(st.load_file(str(tmp_path / "ck" / "model.safetensors")))
    assert "model.embed_tokens.weight" in keys and "model.norm.weight" in keys
    assert ("lm_head.weight" in keys) == (not m.config.tie_embeddings)
    m2, tok = load_checkpoint(tmp_path / "ck")
    assert tok is None and m2.config == m.config
    with torch.no_grad():
        assert torch.equal(m2(idx)[0], ours)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_transformers_to_pyllm_same_logits(rng, tmp_path, variant):
    v = VARIANTS[variant]
    torch.manual_seed(int(torch.randint(0, 2 ** 31 - 1, (1,), generator=rng)))
    cfg = transformers.LlamaConfig(vocab_size=71, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                   num_attention_heads=v["n_heads"] + 2 if variant == "gqa" else v["n_heads"],
                                   num_key_value_heads=v["n_kv_heads"] + 1 if variant == "gqa" else v["n_kv_heads"],
                                   max_position_embeddings=64, rope_theta=777.0, rms_norm_eps=1e-5,
                                   tie_word_embeddings=v["tie_embeddings"], initializer_range=0.2)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    m, _ = load_checkpoint(tmp_path / "hf")
    c = m.config
    assert (c.dim, c.n_heads, c.n_kv_heads, c.hidden_dim, c.rope_theta, c.tie_embeddings) == (
        48, cfg.num_attention_heads, cfg.num_key_value_heads, 80, 777.0, v["tie_embeddings"])
    idx = torch.randint(0, 71, (2, 33), generator=rng)
    with torch.no_grad():
        expect = hf(idx).logits
        got = m(idx)[0]
    assert (got - expect).abs().max().item() < 1e-4
    # and a pyllm re-save of it is still what transformers expects
    save_checkpoint(tmp_path / "again", m)
    assert (hf_logits(tmp_path / "again", idx) - expect).abs().max().item() < 1e-4


def test_bf16_checkpoint_needs_dtype(rng, tmp_path):
    torch.manual_seed(int(torch.randint(0, 2 ** 31 - 1, (1,), generator=rng)))
    cfg = transformers.LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                                   tie_word_embeddings=False)
    hf = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    hf.save_pretrained(tmp_path / "hf")
    with pytest.raises(ValueError, match=r"model\.safetensors.*'.*weight'.*BF16.*dtype=torch.float32"):
        load_checkpoint(tmp_path / "hf")
    m, _ = load_checkpoint(tmp_path / "hf", dtype=torch.float32)
    assert m.embed_tokens.weight.dtype == torch.float32
    idx = torch.randint(0, 40, (1, 12), generator=rng)
    with torch.no_grad():
        expect = hf.float()(idx).logits
        assert (m(idx)[0] - expect).abs().max().item() < 1e-4


# --- atomic directory writes, extras, tokenizer -----------------------------------------------------------------
def test_crash_mid_save_keeps_previous_checkpoint(rng, tmp_path, monkeypatch):
    m1, m2 = tiny(rng), tiny(rng)
    d = tmp_path / "ck"
    save_checkpoint(d, m1, extra={"step": 1})
    real = checkpoint._write_json

    def crash(path, obj):
        if path.name == "generation_config.json":  # weights and config.json already written to the temp dir
            raise KeyboardInterrupt("killed mid-save")
        real(path, obj)
    monkeypatch.setattr(checkpoint, "_write_json", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(d, m2, extra={"step": 2})
    monkeypatch.undo()
    back, _ = load_checkpoint(d)
    for k, v in m1.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    assert read_extra(d) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temp/old directories left behind
    save_checkpoint(d, m2, extra={"step": 2})  # and a later save replaces it
    assert read_extra(d) == {"step": 2}
    assert torch.equal(load_checkpoint(d)[0].embed_tokens.weight, m2.embed_tokens.weight)


def test_ctrl_c_between_the_two_renames_keeps_the_previous_checkpoint(rng, tmp_path, monkeypatch):
    """Ctrl-C after <dir> moved to <dir>.old-<pid> and before the new one moved in left no <dir> at all (the new
    one was deleted as a temp dir, the old one stranded under .old-<pid>): a --resume then started from scratch."""
    m1, m2 = tiny(rng), tiny(rng)
    d = tmp_path / "ck"
    save_checkpoint(d, m1, extra={"step": 1})
    real = checkpoint.os.replace

    def interrupted(src, dst):
        if Path(src).name.startswith("ck.tmp-") and Path(dst) == d:  # <dir> is at ck.old-<pid> by now
            assert not d.exists()
            raise KeyboardInterrupt
        real(src, dst)
    monkeypatch.setattr(checkpoint.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(d, m2, extra={"step": 2})
    monkeypatch.undo()
    assert read_extra(d) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_ctrl_c_while_removing_the_previous_checkpoint_leaves_no_old_dir(rng, tmp_path, monkeypatch):
    """Crash-point fuzzing (SIGTERM to `pyllm dpo`): interrupted in rmtree(<dir>.old-<pid>) after the new checkpoint
    was in place, the clean-up left the half-removed <dir>.old-<pid>/ behind."""
    m1, m2 = tiny(rng), tiny(rng)
    d = tmp_path / "ck"
    save_checkpoint(d, m1, extra={"step": 1})
    real = checkpoint.shutil.rmtree
    calls = []

    def interrupted(path, *a, **kw):
        calls.append(Path(path).name)
        if len(calls) == 1 and Path(path).name.startswith("ck.old-"):
            (Path(path) / "config.json").unlink()  # part of it removed
            raise KeyboardInterrupt
        real(path, *a, **kw)
    monkeypatch.setattr(checkpoint.shutil, "rmtree", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(d, m2, extra={"step": 2})
    monkeypatch.undo()
    assert calls[0].startswith("ck.old-")
    assert read_extra(d) == {"step": 2}  # the new one, complete
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_extra_files_land_inside_the_swap(rng, tmp_path):
    m = tiny(rng)
    state = {"opt.m": torch.randn(3, generator=rng)}
    save_checkpoint(tmp_path / "ck", m, extra_files=lambda tmp: safetensors_io.save_file(
        state, tmp / "trainer_state.safetensors"))
    same(safetensors_io.load_file(tmp_path / "ck" / "trainer_state.safetensors"), state)


class FakeTokenizer:
    """Stands in for pyllm.tokenizer.Tokenizer's save/bos_id/special_ids (the real one is tested if present)."""
    bos_id = 256
    special_ids = {"<|bos|>": 256, "<|end|>": 260, "<|pad|>": 261}

    def save(self, d):
        (d / "tokenizer.json").write_text("{}")


def test_tokenizer_ids_in_configs(rng, tmp_path):
    save_checkpoint(tmp_path / "ck", tiny(rng, vocab_size=300), tokenizer=FakeTokenizer())
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    gen = json.loads((tmp_path / "ck" / "generation_config.json").read_text())
    for d in (cfg, gen):
        assert (d["bos_token_id"], d["eos_token_id"], d["pad_token_id"]) == (256, 260, 261)
    assert (tmp_path / "ck" / "tokenizer.json").is_file()


def test_real_tokenizer_round_trip(rng, tmp_path):
    tk = pytest.importorskip("pyllm.tokenizer")
    tok = tk.Tokenizer.byte_level()
    m = tiny(rng, vocab_size=tok.vocab_size)
    save_checkpoint(tmp_path / "ck", m, tokenizer=tok)
    _, tok2 = load_checkpoint(tmp_path / "ck")
    assert tok2.encode("héllo <|end|>") == tok.encode("héllo <|end|>")


# --- bad checkpoints: one clear line naming the file and the tensor/field ---------------------------------------
def _edit_config(d, **changes):
    p = d / "config.json"
    cfg = json.loads(p.read_text())
    cfg.update(changes)
    p.write_text(json.dumps(cfg))


def _edit_weights(d, fn):
    p = d / "model.safetensors"
    ts = safetensors_io.load_file(p)
    fn(ts)
    safetensors_io.save_file(ts, p)


@pytest.mark.parametrize("case, exc, pattern", [
    ("no_weights", FileNotFoundError, r"model\.safetensors.*missing"),
    ("no_config", FileNotFoundError, r"config\.json.*missing"),
    ("no_dir", FileNotFoundError, r"not found"),
    ("unknown_field", ValueError, r"config\.json.*unknown.*'sliding_window_size'"),
    ("rope_scaling", ValueError, r"config\.json.*rope_scaling"),
    ("attention_bias", ValueError, r"config\.json.*attention_bias"),
    ("rope_llama3", ValueError, r"config\.json.*rope_parameters"),
    ("head_dim", ValueError, r"config\.json.*head_dim 16"),
    ("act", ValueError, r"config\.json.*hidden_act='gelu'"),
    ("bad_json", ValueError, r"config\.json.*invalid JSON"),
    ("wrong_shape", ValueError, r"model\.safetensors.*'model\.layers\.1\.mlp\.up_proj\.weight'.*shape"),
    ("missing_tensor", ValueError, r"model\.safetensors.*missing tensor 'model\.norm\.weight'"),
    ("unexpected_tensor", ValueError,
     r"model\.safetensors.*unexpected tensor 'model\.layers\.0\.self_attn\.q_proj\.bias'"),
    ("dtype", ValueError, r"model\.safetensors.*'model\.embed_tokens\.weight'.*F16"),
    ("truncated", ValueError, r"model\.safetensors.*truncated"),
    # were accepted (a NaN model that pyllm-run then refuses) or a TypeError/AttributeError traceback
    ("negative_eps", ValueError, r"config\.json.*norm_eps must be a number in \(0, 1\), got -1"),
    ("zero_theta", ValueError, r"config\.json.*rope_theta must be a positive finite number"),
    ("string_eps", ValueError, r"config\.json.*rms_norm_eps must be a number, got 'abc'"),
    ("pyllm_not_object", ValueError, r"config\.json.*'pyllm' must be an object"),
    # session 15: 10^7 layers built that model for minutes (a hang) before the tensors were compared with it;
    # 10^9 positions allocated a 32 GB RoPE table; a directory named model.safetensors was "missing"
    ("more_layers", ValueError, r"config\.json: num_hidden_layers is 3 but model\.safetensors holds 2 layers"),
    ("huge_layers", ValueError, r"config\.json.*n_layers must be <= 1024 \(pyllm-run's limit\), got 10000000"),
    ("huge_context", ValueError, r"config\.json.*max_seq_len must be <= 1048576"),
    ("weights_dir", ValueError, r"model\.safetensors: not a regular file"),
    # session 18: bool("false") was True; a deeply nested config.json was a RecursionError; a garbled `latest`
    # pointer of a run directory a bare UnicodeDecodeError
    ("string_tie", ValueError, r"config\.json.*tie_word_embeddings must be true or false, got 'false'"),
    ("deep_config", ValueError, r"config\.json: invalid JSON \(nested too deeply\)"),
    ("bad_latest", ValueError, r"latest: not a checkpoint name"),
])
def test_bad_checkpoints(rng, tmp_path, case, exc, pattern):
    d = tmp_path / "ck"
    save_checkpoint(d, tiny(rng))
    if case == "no_weights":
        (d / "model.safetensors").unlink()
    elif case == "no_config":
        (d / "config.json").unlink()
    elif case == "no_dir":
        d = tmp_path / "elsewhere"
    elif case == "unknown_field":
        _edit_config(d, sliding_window_size=8)
    elif case == "rope_scaling":
        _edit_config(d, rope_scaling={"type": "linear", "factor": 2.0})
    elif case == "attention_bias":
        _edit_config(d, attention_bias=True)
    elif case == "rope_llama3":
        _edit_config(d, rope_parameters={"rope_type": "llama3", "rope_theta": 321.0, "factor": 8.0})
    elif case == "head_dim":
        _edit_config(d, head_dim=16)
    elif case == "act":
        _edit_config(d, hidden_act="gelu")
    elif case == "bad_json":
        (d / "config.json").write_text("{")
    elif case == "negative_eps":
        _edit_config(d, rms_norm_eps=-1.0)
    elif case == "zero_theta":
        _edit_config(d, rope_theta=0)
    elif case == "string_eps":
        _edit_config(d, rms_norm_eps="abc")
    elif case == "pyllm_not_object":
        _edit_config(d, pyllm="v1")
    elif case == "more_layers":
        _edit_config(d, num_hidden_layers=3)
    elif case == "huge_layers":
        _edit_config(d, num_hidden_layers=10 ** 7)
    elif case == "huge_context":
        _edit_config(d, max_position_embeddings=10 ** 9)
    elif case == "weights_dir":
        (d / "model.safetensors").unlink()
        (d / "model.safetensors").mkdir()
    elif case == "string_tie":
        _edit_config(d, tie_word_embeddings="false")
    elif case == "deep_config":
        (d / "config.json").write_text("[" * 200000 + "]" * 200000)
    elif case == "bad_latest":
        d = tmp_path / "run"
        d.mkdir()
        (d / "latest").write_bytes(b"\xff\xfe")
    elif case == "wrong_shape":
        _edit_weights(d, lambda ts: ts.update({"model.layers.1.mlp.up_proj.weight": torch.zeros(56, 31)}))
    elif case == "missing_tensor":
        _edit_weights(d, lambda ts: ts.pop("model.norm.weight"))
    elif case == "unexpected_tensor":
        _edit_weights(d, lambda ts: ts.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(32)}))
    elif case == "dtype":
        _edit_weights(d, lambda ts: ts.update({"model.embed_tokens.weight": ts["model.embed_tokens.weight"].half()}))
    elif case == "truncated":
        p = d / "model.safetensors"
        p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(exc, match=pattern) as e:
        load_checkpoint(d)
    assert "\n" not in str(e.value) and str(d) in str(e.value)


def test_bad_device_is_one_line_before_loading(rng, tmp_path):
    """device="cuda" without a GPU was torch's "Torch not compiled with CUDA enabled" AssertionError traceback,
    raised after the whole checkpoint was read."""
    d = save_checkpoint(tmp_path / "ck", tiny(rng))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"^load_checkpoint: device 'cuda': no CUDA GPU is available to torch$"):
            load_checkpoint(d, device="cuda")
    with pytest.raises(ValueError, match=r"^load_checkpoint: bad device 'gpu' \("):
        load_checkpoint(d, device="gpu")
    assert next(load_checkpoint(d, device=torch.device("cpu"))[0].parameters()).device.type == "cpu"


def test_model_size_limits_are_pyllm_runs(rng, tmp_path):
    """ModelConfig's upper limits are the C loader's (csrc/model_file.c MAX_*): a model pyllm-run would refuse
    must not train, and a config beyond them fails before anything is built from it."""
    import re
    from pyllm.config import MAX_SIZES
    src = (Path(__file__).resolve().parents[1] / "csrc" / "model_file.c").read_text()
    c = {m[0]: eval(m[1]) for m in re.findall(r"#define (MAX_\w+) \(?([\d <]+)\)?", src)}
    assert {"vocab_size": c["MAX_VOCAB"], "dim": c["MAX_DIM"], "n_layers": c["MAX_LAYERS"],
            "hidden_dim": c["MAX_HIDDEN"], "max_seq_len": c["MAX_SEQ"]} == MAX_SIZES
    for name, v in MAX_SIZES.items():
        with pytest.raises(ValueError, match=rf"ModelConfig\.{name} must be <= {v} "):
            ModelConfig(**{"dim": 64, "n_heads": 4, name: v + 1})


def test_load_checkpoint_api_misuse_is_one_line(rng, tmp_path):
    """A non-float dtype was torch's TypeError from Module.to; read_extra on a config.json that is a list or has a
    string 'pyllm' was an AttributeError."""
    d = save_checkpoint(tmp_path / "ck", tiny(rng))
    for bad in (torch.int8, "float32"):
        with pytest.raises(ValueError, match="dtype must be a torch floating-point dtype"):
            load_checkpoint(d, dtype=bad)
    for cfg in ([1, 2], {"pyllm": "x"}, {"pyllm": {"extra": 3}}):
        (d / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(ValueError, match=r"config\.json: expected a JSON object"):
            read_extra(d)
    (d / "config.json").write_text(json.dumps({"pyllm": {"extra": {"stage": "sft"}}}))
    assert read_extra(d) == {"stage": "sft"}


def test_missing_tie_word_embeddings_means_untied_as_in_transformers(rng, tmp_path):
    """transformers' LlamaConfig defaults tie_word_embeddings to False, and loads a config.json without the key as
    untied; pyllm read it as tied and refused the file ("lm_head.weight differs from the embedding but config.json
    says tie_word_embeddings=true", which the file never said)."""
    d = tmp_path / "ck"
    m = tiny(rng)
    save_checkpoint(d, m)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg.pop("tie_word_embeddings") is False
    (d / "config.json").write_text(json.dumps(cfg))
    m2, _ = load_checkpoint(d)
    assert not m2.config.tie_embeddings
    hf = transformers.LlamaForCausalLM.from_pretrained(d).eval()
    assert not hf.config.tie_word_embeddings
    idx = torch.randint(0, m.config.vocab_size, (1, 9), generator=rng)
    with torch.no_grad():
        torch.testing.assert_close(m2(idx)[0], hf(idx).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_a_model_loaded_in_another_dtype_says_what_to_do(rng, tmp_path, dtype):
    """load_checkpoint(dtype=bf16) gave a model whose first forward failed inside the kernels ("rmsnorm x: expected
    dtype torch.float32"); now one line naming the two ways out, and both work."""
    d = tmp_path / "ck"
    save_checkpoint(d, tiny(rng))
    m, _ = load_checkpoint(d, dtype=dtype)
    idx = torch.randint(0, m.config.vocab_size, (1, 5), generator=rng)
    with pytest.raises(TypeError, match=rf"GPT: the pyllm kernels run float32 weights, this model's are {dtype}: "
                                        r"use model\.float\(\).*or model\.set_backend\('torch'\)"):
        m(idx)
    with pytest.raises(TypeError, match="GPT: the pyllm kernels run float32"):
        m.generate(idx, max_new_tokens=2)
    with torch.no_grad():
        assert m.set_backend("torch")(idx)[0].dtype == dtype
        m.set_backend("pyllm").float()
        assert m(idx)[0].dtype == torch.float32


def test_save_checkpoint_of_a_lora_model_writes_the_merged_weights(rng, tmp_path):
    """Session 30 audit: save_checkpoint on a model with adapters wrote its raw parametrization names
    (`...q_proj.parametrizations.weight.original`, `lora_A`, `lora_B`): load_checkpoint refused the result and
    transformers loaded it with q_proj randomly initialised. The stages merged first; the API did not."""
    from pyllm.lora import apply_lora
    m = tiny(rng).eval()
    apply_lora(m, 2, 4.0, ["q_proj", "v_proj"])
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_B" in name:
                p.normal_(generator=rng)  # B starts at zero: make the adapters count
    idx = torch.randint(0, 67, (2, 9), generator=rng)
    with torch.no_grad():
        want = m(idx)[0]
    save_checkpoint(tmp_path / "ck", m)
    names = set(safetensors_io.load_file(tmp_path / "ck" / "model.safetensors"))
    assert not any("parametrizations" in n or "lora" in n for n in names), sorted(names)[:4]
    back, _ = load_checkpoint(tmp_path / "ck")
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(idx)[0], want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hf_logits(tmp_path / "ck", idx), want, rtol=1e-4, atol=1e-4)


def test_save_checkpoint_onto_a_file_leaves_it(rng, tmp_path):
    """The swap moved the user's file aside to <dir>.old-<pid>, wrote the checkpoint, then failed (rmtree of a file)."""
    f = tmp_path / "taken"
    f.write_text("precious")
    with pytest.raises(FileExistsError, match="taken: exists and is not a directory"):
        save_checkpoint(f, tiny(rng))
    assert f.read_text() == "precious" and sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_a_tokenizer_json_that_is_a_directory_is_an_error(tmp_path):
    """Session 31 audit: a directory named tokenizer.json read as "no tokenizer": `pyllm export` then wrote model.bin
    without tokenizer.bin and exited 0."""
    from chat_util import cli, tiny_checkpoint
    ck = tiny_checkpoint(tmp_path / "ck")
    (ck / "tokenizer.json").unlink()
    (ck / "tokenizer.json").mkdir()
    with pytest.raises(ValueError, match="tokenizer.json: exists and is not a regular file"):
        load_checkpoint(str(ck))
    assert load_checkpoint(str(ck), load_tokenizer=False)[1] is None
    assert cli(["export", "--checkpoint", str(ck), "--out", str(tmp_path / "ex")]) == 2
    assert not (tmp_path / "ex" / "model.bin").exists()


def test_sigterm_at_its_default_action_mid_save_leaves_no_temporary_directory(tmp_path):
    """Under torchrun SIGTERM keeps its default action (pyllm.cli._catch_sigterm), and torchrun stops the ranks left
    with it when one fails, as a batch scheduler stops a run: rank 0 killed mid-save left ckpt_<step>.tmp-<pid>/ (2 in
    4 SIGTERMs of a 2-rank pretrain saving every step). During a save it now raises, so the clean-up runs; the
    previous checkpoint stays. A process of its own here: SIGTERM's default action ends it."""
    import os
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[1]
    script = f"""
import os, signal
from pyllm.checkpoint import save_checkpoint
from pyllm.config import ModelConfig
from pyllm.model import GPT
assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
m = GPT(ModelConfig(vocab_size=16, dim=8, n_layers=1, n_heads=2, max_seq_len=8))
save_checkpoint({str(tmp_path / "ck")!r}, m, extra={{"step": 1}})
save_checkpoint({str(tmp_path / "ck")!r}, m, extra={{"step": 2}},
                extra_files=lambda tmp: os.kill(os.getpid(), signal.SIGTERM))
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1"))
    assert r.returncode != 0 and "Terminated" in r.stderr, r.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    assert read_extra(tmp_path / "ck") == {"step": 1}
    import signal  # and put back after a save (here too: pytest leaves it at the default action)
    before = signal.getsignal(signal.SIGTERM)
    save_checkpoint(str(tmp_path / "again"), GPT(ModelConfig(vocab_size=16, dim=8, n_layers=1, n_heads=2,
                                                             max_seq_len=8)))
    assert signal.getsignal(signal.SIGTERM) == before
