"""Every `pyllm` subcommand on bad input: an --out that is a file, a directory or non-UTF-8 bytes where JSONL goes,
out-of-range numeric flags, a broken --reward-fn. Each must end in ONE line `pyllm <cmd>: error: ...` naming the
file or flag, exit status 2, and no partial output — never a traceback, a ZeroDivisionError mid-run or a run that
silently trains nothing. (Model files: tests/test_run_robust.py; checkpoints: tests/test_checkpoint.py.)

Run: OMP_NUM_THREADS=1 PYTHONPATH=$PWD python -m pytest -q tests/test_cli_robust.py
"""
from __future__ import annotations

import json

import pytest
import torch

from chat_util import cli, tiny_checkpoint, write_jsonl

GOOD_SFT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
GOOD_PREF = {"prompt": "q", "chosen": "good", "rejected": "bad"}


def one_line_error(capsys, cmd: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    err = [ln for ln in err if "existing checkpoint will be overwritten" not in ln and "%|" not in ln]  # bars
    assert len(err) == 1 and err[0].startswith(f"pyllm {cmd}: error: "), err
    return err[0]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "base", max_seq_len=48)


def test_out_that_is_a_file(base, tmp_path, capsys):
    """mkdir(--out) on an existing file raised FileExistsError with a traceback in every stage."""
    f = tmp_path / "taken.txt"
    f.write_text("precious")
    text = tmp_path / "in.txt"
    text.write_text("hello world. " * 20)
    for argv in (["export", "--checkpoint", str(base), "--out", str(f)],
                 ["tokenizer-train", "--input", str(text), "--vocab-size", "270", "--out", str(f)],
                 ["prepare", "--input", str(text), "--byte-level", "--workers", "1", "--out", str(f)],
                 ["sft", "--model", str(base), "--data", str(write_jsonl(tmp_path / "s.jsonl", [GOOD_SFT])),
                  "--eval-frac", "0", "--steps", "1", "--device", "cpu", "--out", str(f)],
                 ["rl", "--policy", str(base), "--reward-fn", "math:fabs", "--prompts",
                  str(write_jsonl(tmp_path / "q.jsonl", [{"prompt": "hi"}])), "--steps", "1", "--device", "cpu",
                  "--out", str(f)]):
        assert cli(argv) == 2, argv
        err = one_line_error(capsys, argv[0])
        assert f"{f}: File exists and is not a directory" in err, err
        assert f.read_text() == "precious"


def test_jsonl_directory_and_non_utf8_line(base, tmp_path, capsys):
    args = ["sft", "--model", str(base), "--eval-frac", "0", "--steps", "1", "--device", "cpu",
            "--out", str(tmp_path / "o")]
    d = tmp_path / "data_dir"
    d.mkdir()
    assert cli(args + ["--data", str(d)]) == 2  # was IsADirectoryError with a traceback
    assert f"{d}: is a directory, expected a JSONL conversation file" in one_line_error(capsys, "sft")
    bad = tmp_path / "latin1.jsonl"  # was "'utf-8' codec can't decode byte 0xe9 ...", no file, no line
    bad.write_bytes(json.dumps(GOOD_SFT).encode() + b"\n" + b'{"prompt": "caf\xe9", "completion": "x"}\n')
    assert cli(args + ["--data", str(bad)]) == 2
    assert f"{bad}:2: not valid UTF-8" in one_line_error(capsys, "sft")
    assert not (tmp_path / "o" / "model.safetensors").exists()
    assert cli(args + ["--data", str(bad), "--skip-bad-lines"]) == 0  # now a bad line like any other
    assert "skipped 1 bad line" in capsys.readouterr().err
    bom = tmp_path / "bom.jsonl"  # a UTF-8 BOM (Windows editors) was "line 1: not valid JSON (Unexpected UTF-8 BOM)"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD_SFT).encode() + b"\n")
    assert cli(args + ["--data", str(bom)]) == 0
    sur = write_jsonl(tmp_path / "sur.jsonl", ['{"prompt": "x \\ud800", "completion": "y"}'])  # valid JSON, not Unicode
    assert cli(args + ["--data", str(sur)]) == 2  # was a TypeError traceback from the tokenizers library
    assert f"{sur}:1: text has a lone surrogate" in one_line_error(capsys, "sft")
    deep = write_jsonl(tmp_path / "deep.jsonl", ['{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}"])
    assert cli(args + ["--data", str(deep)]) == 2  # was a RecursionError traceback from json
    assert f"{deep}:1: not valid JSON (nested too deeply)" in one_line_error(capsys, "sft")
    big = write_jsonl(tmp_path / "big.jsonl", [json.dumps(GOOD_SFT), '{"id": 1' + "0" * 5000 + ', "prompt": "x", '
                                                                      '"completion": "y"}'])
    assert cli(args + ["--data", str(big)]) == 2  # was json's int-limit message: no file, no line, no skipping
    assert f"{big}:2: not valid JSON (Exceeds the limit" in one_line_error(capsys, "sft")
    assert cli(args + ["--data", str(big), "--skip-bad-lines"]) == 0


@pytest.mark.parametrize("stage, flag, value, message", [
    ("sft", "--batch-size", "0", "--batch-size must be >= 1"),        # was "block x: expected a non-empty tensor"
    ("sft", "--batch-size", "-2", "--batch-size must be >= 1"),       # was exit 0 with nothing trained or saved
    ("sft", "--steps", "-3", "--steps must be >= 0"),                 # was exit 0 with nothing trained or saved
    ("sft", "--eval-every", "0", "--eval-every must be >= 1"),        # was ZeroDivisionError mid-run
    ("sft", "--save-every", "0", "--save-every must be >= 1"),        # was ZeroDivisionError mid-run
    ("sft", "--log-every", "0", "--log-every must be >= 1"),          # was ZeroDivisionError mid-run
    ("sft", "--eval-frac", "1", "--eval-frac must be in [0, 1)"),     # was ZeroDivisionError (no training rows)
    ("sft", "--epochs", "-1", "--epochs must be > 0"),
    ("sft", "--seq-len", "-5", "--seq-len must be >= 0"),             # was "longer than the context (-4)"
    ("sft", "--seed", "-1", "--seed must be in [0, 2^63)"),           # was torch's "expected non-negative integer"
    ("reward", "--batch-size", "0", "--batch-size must be >= 1"),     # was "max() arg is an empty sequence"
    ("reward", "--eval-frac", "1", "--eval-frac must be in [0, 1)"),  # was ZeroDivisionError
    ("dpo", "--beta", "0", "--beta must be > 0"),                     # was exit 0: a constant loss, no gradient
    ("dpo", "--beta", "-1", "--beta must be > 0"),
    ("dpo", "--label-smoothing", "0.9", "--label-smoothing must be in [0, 0.5)"),
    ("rl", "--max-new-tokens", "0", "--max-new-tokens must be >= 1"),  # was exit 0
    ("rl", "--ppo-epochs", "0", "--ppo-epochs must be >= 1"),         # was exit 0 with no update
    ("rl", "--minibatches", "-2", "--minibatches must be >= 1"),
    ("score", "--batch-size", "0", "--batch-size must be >= 1"),      # was "range() arg 3 must not be zero"
    # session 15: were exit 0 — a negative clip or weight meant "off", --gamma 2 made returns grow
    ("sft", "--grad-clip", "-1", "--grad-clip must be >= 0"),
    ("sft", "--weight-decay", "-0.1", "--weight-decay must be >= 0"),
    ("reward", "--lr", "0", "--lr must be > 0"),
    ("rl", "--gamma", "2", "--gamma must be in [0, 1]"),
    ("rl", "--lam", "-1", "--lam must be in [0, 1]"),
    ("rl", "--clip-range", "-0.2", "--clip-range must be > 0"),
    ("rl", "--reward-clip", "-1", "--reward-clip must be >= 0"),
    ("rl", "--hard-prompts", "-1", "--hard-prompts must be in [0, 20]"),
    ("rl", "--prefilter-samples", "-1", "--prefilter-samples must be >= 0"),
    ("rl", "--top-k", "-1", "--top-k must be >= 0"),  # session 30: was "generate top_k: ..." after loading
    # audit-flags: sizes past the kernels' int rows. sft/reward/dpo ran forever (an epoch shuffle per 2 rows to fill
    # one step, never a step); rl asked torch for terabytes (a "can't allocate memory" traceback)
    ("sft", "--batch-size", "2147483648", "--batch-size 2147483648: one step would run 2147483648 sequences"),
    ("reward", "--batch-size", "2147483647", "--batch-size 2147483647: one step would run"),
    ("dpo", "--batch-size", "9223372036854775807", "--batch-size 9223372036854775807: one step would run"),
    ("rl", "--batch-size", "2147483647", "--batch-size 2147483647 x --num-samples 1: one step would run"),
    ("rl", "--num-samples", "2147483648", "--batch-size 2 x --num-samples 2147483648: one step would run"),
    ("rl", "--prefilter-samples", "2147483648", "--prefilter-samples 2147483648: one step would run"),
    ("sft", "--lora-r", "2147483648", "--lora-r must be <= 16, the full rank of the smallest target"),  # 256 GiB
    ("rl", "--top-k", "2147483648", "--top-k must be <= 2147483647"),     # was "generate top_k: ..." after loading
    ("rl", "--hard-prompts", "1e9", "--hard-prompts must be in [0, 20]"),  # was torch.multinomial's traceback
    ("sft", "--lr", "3.4e38", "--lr must be <= 3.4e+37"),  # these two were torch's "value cannot be converted to
    ("dpo", "--weight-decay", "1e38", "x --weight-decay 1e+38 must be <= 1"),  # type float without overflow"
])
def test_out_of_range_flags(base, tmp_path, capsys, stage, flag, value, message):
    sft = write_jsonl(tmp_path / "s.jsonl", [GOOD_SFT] * 4)
    prefs = write_jsonl(tmp_path / "p.jsonl", [GOOD_PREF] * 4)
    prompts = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "hi"}] * 4)
    fn = tmp_path / "rf.py"
    fn.write_text("def fn(prompt, response, **kw):\n    return 1.0\n")
    out = ["--out", str(tmp_path / "o"), "--device", "cpu"]
    argv = {"sft": ["--model", str(base), "--data", str(sft), "--steps", "1", *out],
            "reward": ["--model", str(base), "--data", str(prefs), "--steps", "1", *out],
            "dpo": ["--model", str(base), "--data", str(prefs), "--steps", "1", *out],
            "rl": ["--policy", str(base), "--reward-fn", f"{fn}:fn", "--prompts", str(prompts), "--steps", "1",
                   "--batch-size", "2", "--max-new-tokens", "4", *out],
            "score": ["--reward-model", str(base), "--data", str(prefs), "--device", "cpu"]}[stage]
    assert cli([stage, *argv, flag, value]) == 2
    assert message in one_line_error(capsys, stage)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("body, message", [
    ("def fn(:\n", "cannot load"),                                            # was a SyntaxError traceback
    ("def fn(prompt, response, **kw):\n    return 'yes'\n", "returned 'yes', expected a finite number"),
    ("def fn(prompt, response, **kw):\n    return '1'\n", "returned '1', expected a finite number"),  # was 1.0
    ("def fn(prompt, response, **kw):\n    return float('nan')\n", "returned nan"),  # was exit 0, NaN advantages
    # were a traceback through the trainer: the user's function raising, or taking other arguments
    ("def fn(prompt, response, **kw):\n    raise RuntimeError('boom')\n", "fn raised RuntimeError: boom"),
    ("def fn():\n    return 1.0\n", "fn raised TypeError: fn() got an unexpected keyword argument"),
])
def test_broken_reward_fn(base, tmp_path, capsys, body, message):
    fn = tmp_path / "rf.py"
    fn.write_text(body)
    prompts = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "hi"}] * 2)
    assert cli(["rl", "--policy", str(base), "--reward-fn", f"{fn}:fn", "--prompts", str(prompts), "--algo", "grpo",
                "--num-samples", "2", "--steps", "1", "--batch-size", "2", "--max-new-tokens", "2", "--device",
                "cpu", "--out", str(tmp_path / "o")]) == 2
    err = one_line_error(capsys, "rl")
    assert "--reward-fn" in err and message in err, err
    assert not (tmp_path / "o").exists()  # no half-made run: not even an empty --out (metrics made it up front)


def test_reward_fn_may_return_a_bool(base, tmp_path):
    """A verifier returning True/False is a reward (the finite-number check must not reject it)."""
    fn = tmp_path / "rf.py"
    fn.write_text("def fn(prompt, response, **kw):\n    return len(response) % 2 == 0\n")
    prompts = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "hi"}] * 2)
    assert cli(["rl", "--policy", str(base), "--reward-fn", f"{fn}:fn", "--prompts", str(prompts), "--algo", "grpo",
                "--num-samples", "2", "--steps", "1", "--batch-size", "2", "--max-new-tokens", "2", "--device",
                "cpu", "--out", str(tmp_path / "o")]) == 0


def _train_rm(model, tmp_path, capsys, name: str = "rm"):
    """A one-step reward model trained from `model` at tmp_path / name (its output swallowed)."""
    prefs = write_jsonl(tmp_path / "p.jsonl", [GOOD_PREF] * 4)
    rm = tmp_path / name
    assert cli(["reward", "--model", str(model), "--data", str(prefs), "--steps", "1", "--batch-size", "2",
                "--eval-frac", "0", "--device", "cpu", "--out", str(rm)]) == 0
    capsys.readouterr()
    return rm


def test_score_out_is_a_directory_leaves_no_tmp(base, tmp_path, capsys):
    rm = _train_rm(base, tmp_path, capsys)
    prefs = tmp_path / "p.jsonl"
    d = tmp_path / "scores"
    d.mkdir()
    assert cli(["score", "--reward-model", str(rm), "--data", str(prefs), "--device", "cpu", "--out", str(d)]) == 2
    assert "Is a directory" in one_line_error(capsys, "score")  # was IsADirectoryError with a traceback
    assert not (tmp_path / "scores.tmp").exists()
    # a reply longer than the context: the hint was "raise --seq-len", a flag score does not have (session 30)
    long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "q", "response": "word " * 60}])
    assert cli(["score", "--reward-model", str(rm), "--data", str(long), "--device", "cpu"]) == 2
    err = one_line_error(capsys, "score")
    assert "longer than the context (48); the reward model cannot score it" in err and "--seq-len" not in err


def test_export_refuses_a_tokenizer_of_another_vocab(tmp_path, capsys):
    """Was: model.bin + tokenizer.bin written, then every pyllm-run call failed with 'wrong tokenizer?'."""
    ck = tiny_checkpoint(tmp_path / "ck", vocab_size=300)  # byte-level tokenizer: 262 tokens
    assert cli(["export", "--checkpoint", str(ck), "--out", str(tmp_path / "run")]) == 2
    err = one_line_error(capsys, "export")
    assert f"{ck}: tokenizer.json has 262 tokens but config.json's vocab_size is 300" in err, err
    assert not (tmp_path / "run" / "model.bin").exists()


def test_second_model_with_another_tokenizer(base, tmp_path, capsys):
    """DPO's --ref-model / RL's --reward-model read the policy's token ids: with another tokenizer they ran and
    silently scored other tokens."""
    from pyllm.checkpoint import save_checkpoint
    from pyllm.tokenizer import Tokenizer
    from chat_util import tiny_model
    tok = Tokenizer.train(iterator=["the cat sat on the mat. " * 50], vocab_size=280)
    model, _ = tiny_model(vocab_size=tok.vocab_size, max_seq_len=48)
    other = save_checkpoint(tmp_path / "other", model, tok)
    _second_model_refused(base, other, tmp_path, capsys,
                          f"{other}: the reference model's tokenizer differs from the policy's ({tok.vocab_size} vs "
                          f"262 tokens)", "the reward model's tokenizer differs from the policy's")


def _second_model_refused(base, other, tmp_path, capsys, want_dpo: str, want_rl: str) -> None:
    """`other` as DPO's --ref-model, and a reward model trained from it as RL's --reward-model: both one-line
    errors containing want_dpo / want_rl, before any output."""
    prefs = write_jsonl(tmp_path / "p.jsonl", [GOOD_PREF] * 4)
    assert cli(["dpo", "--model", str(base), "--ref-model", str(other), "--data", str(prefs), "--steps", "1",
                "--device", "cpu", "--out", str(tmp_path / "o")]) == 2
    err = one_line_error(capsys, "dpo")
    assert want_dpo in err, err
    _train_rm(other, tmp_path, capsys)
    prompts = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "hi"}] * 2)
    assert cli(["rl", "--policy", str(base), "--reward-model", str(tmp_path / "rm"), "--prompts", str(prompts),
                "--steps", "1", "--batch-size", "2", "--max-new-tokens", "2", "--device", "cpu",
                "--out", str(tmp_path / "o")]) == 2
    assert want_rl in one_line_error(capsys, "rl")
    assert not (tmp_path / "o").exists()


def test_resume_with_a_corrupt_trainer_state(base, tmp_path, capsys):
    """Was a bare JSON message without the file, or a TypeError/KeyError traceback."""
    data = write_jsonl(tmp_path / "s.jsonl", [GOOD_SFT] * 4)
    out = tmp_path / "o"
    args = ["sft", "--model", str(base), "--data", str(data), "--eval-frac", "0", "--steps", "2", "--device", "cpu",
            "--out", str(out)]
    assert cli(args[:-5] + ["1", *args[-4:]]) == 0
    capsys.readouterr()
    tj = out / "trainer_state.json"
    for text, want in (("{bad", "corrupt trainer state (Expecting"), ("[1]", "corrupt trainer state (expected an"),
                       ('{"step": 1}', "corrupt trainer state (expected an")):
        tj.write_text(text)
        assert cli(args + ["--resume"]) == 2
        assert f"{tj}: {want}" in one_line_error(capsys, "sft")


def test_unknown_flag_names_the_subcommand(capsys):
    """Was the top-level `usage: pyllm [-h] [--version] <command> ...` and `pyllm: error:` for a subcommand's flag."""
    with pytest.raises(SystemExit) as e:
        cli(["export", "--checkpoint", "x", "--out", "y", "--frob", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[0].startswith("usage: pyllm export")
    assert err[-1] == "pyllm export: error: unrecognized arguments: --frob 1"


def test_resume_another_stages_run_or_another_lora_setup(base, tmp_path, capsys):
    """`dpo --resume` in an SFT output took over SFT's optimizer and step count silently (exit 0); resuming a LoRA
    run without --lora-r was torch's "parameter group that doesn't match the size of optimizer's group" (it now
    takes the run's own --lora-r), with another --lora-r a silent r = 2."""
    data = write_jsonl(tmp_path / "s.jsonl", [GOOD_SFT] * 4)
    prefs = write_jsonl(tmp_path / "p.jsonl", [GOOD_PREF] * 4)
    out = tmp_path / "o"
    sft = ["sft", "--model", str(base), "--data", str(data), "--eval-frac", "0", "--device", "cpu", "--out", str(out)]
    assert cli(sft + ["--steps", "1", "--lora-r", "2"]) == 0
    capsys.readouterr()
    assert cli(["dpo", "--model", str(base), "--data", str(prefs), "--eval-frac", "0", "--device", "cpu",
                "--out", str(out), "--steps", "2", "--resume"]) == 2
    assert f"{out}: holds a `pyllm sft` run; `pyllm dpo --resume` continues only its own" in \
        one_line_error(capsys, "dpo")
    assert cli(sft + ["--steps", "2", "--resume", "--lora-r", "4"]) == 2  # was exit 0, silently r = 2
    err = one_line_error(capsys, "sft")
    assert f"{out}: --resume continues the run with its own settings, and this command changes --lora-r 2 -> 4" \
        in err, err
    # without --lora-r the run resumes as it was started (was "the saved optimizer state does not fit")
    assert cli(sft + ["--steps", "2", "--resume"]) == 0
    assert f"{out}: resuming with the run's --lora-r 2" in capsys.readouterr().err


def test_export_and_stages_cast_a_bf16_checkpoint(base, tmp_path, capsys):
    """An HF-style bf16 checkpoint: export said "pass dtype=torch.float32 to cast" (no CLI flag does); model.bin is
    fp32 anyway, so it casts."""
    import shutil

    from pyllm import safetensors_io
    ck = tmp_path / "bf16"
    shutil.copytree(base, ck)
    ts = safetensors_io.load_file(ck / "model.safetensors")
    safetensors_io.save_file({k: v.bfloat16() for k, v in ts.items()}, ck / "model.safetensors")
    assert cli(["export", "--checkpoint", str(ck), "--out", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "model.bin").is_file()
    data = write_jsonl(tmp_path / "s.jsonl", [GOOD_SFT] * 2)  # and the stages load it in fp32 (same error before)
    assert cli(["sft", "--model", str(ck), "--data", str(data), "--steps", "1", "--eval-frac", "0", "--device", "cpu",
                "--out", str(tmp_path / "o")]) == 0


def test_prompt_fields_that_clash_with_reward_fn_arguments(base, tmp_path, capsys):
    """A prompts line with a "response" field ran the rollout, then fn(prompt=, response=, **extra) was a TypeError
    traceback ("got multiple values for keyword argument 'response'")."""
    fn = tmp_path / "rf.py"
    fn.write_text("def fn(prompt, response, **kw):\n    return 1.0\n")
    prompts = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "hi", "response": "old"}] * 2)
    assert cli(["rl", "--policy", str(base), "--reward-fn", f"{fn}:fn", "--prompts", str(prompts), "--algo", "grpo",
                "--num-samples", "2", "--steps", "1", "--batch-size", "2", "--max-new-tokens", "2", "--device",
                "cpu", "--out", str(tmp_path / "o")]) == 2
    err = one_line_error(capsys, "rl")
    assert f"{prompts}:1: field(s) ['response'] clash with --reward-fn's prompt=/response= arguments" in err, err


def test_a_pretrain_output_dir_is_its_latest_checkpoint(base, tmp_path):
    """README: `pyllm pretrain --out base/` then `pyllm sft --model base/`; that was "base/config.json: missing"
    (pretrain writes base/ckpt_<step>/ and base/latest)."""
    import shutil
    run = tmp_path / "base"
    shutil.copytree(base, run / "ckpt_0000007")
    (run / "latest").write_text("ckpt_0000007\n")
    data = write_jsonl(tmp_path / "s.jsonl", [GOOD_SFT] * 2)
    assert cli(["sft", "--model", str(run), "--data", str(data), "--steps", "1", "--eval-frac", "0", "--device", "cpu",
                "--out", str(tmp_path / "sft")]) == 0
    assert cli(["export", "--checkpoint", str(run), "--out", str(tmp_path / "bin")]) == 0


@pytest.mark.parametrize("flags, message", [
    (["--format", "pyllm", "--llama2c-version", "1"], "--llama2c-version only applies to --format llama2c"),
    (["--format", "llama2c", "--llama2c-version", "2"], "use --quantize q8_0 exactly when --llama2c-version is 2"),
    (["--format", "llama2c", "--quantize", "q8_0", "--llama2c-version", "1"], "exactly when --llama2c-version is 2"),
    (["--quantize", "q8_0", "--group-size", "48"], "--group-size 48 must divide dim 32"),
    (["--group-size", "16"], "--group-size only applies with --quantize q8_0"),  # was ignored silently
])
def test_export_bad_flag_combinations_create_nothing(base, tmp_path, capsys, flags, message):
    """Were checked after mkdir(--out): the error left an empty output directory behind."""
    out = tmp_path / "run"
    assert cli(["export", "--checkpoint", str(base), "--out", str(out), *flags]) == 2
    assert message in one_line_error(capsys, "export")
    assert not out.exists()


def test_export_failing_tokenizer_keeps_the_old_pair(base, tmp_path, capsys, monkeypatch):
    """model.bin was replaced before tokenizer.bin was written: a failed tokenizer save left a new model.bin beside
    the old tokenizer.bin."""
    from pyllm.tokenizer import Tokenizer
    out = tmp_path / "run"
    assert cli(["export", "--checkpoint", str(base), "--out", str(out)]) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def refuse(self, path):
        raise ValueError("save_bin refused")
    monkeypatch.setattr(Tokenizer, "save_bin", refuse)
    assert cli(["export", "--checkpoint", str(base), "--out", str(out), "--quantize", "q8_0"]) == 2
    assert "save_bin refused" in one_line_error(capsys, "export")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_demo_from_stage_without_an_earlier_run_creates_nothing(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli(["demo", "--quick", "--from-stage", "rl", "--out", str(out)]) == 2
    assert "results.json not found (run the full demo with this --out first)" in one_line_error(capsys, "demo")
    assert not out.exists()  # was an empty directory
    out.mkdir()
    (out / "results.json").write_text("[1, 2]")  # was a TypeError traceback
    assert cli(["demo", "--quick", "--from-stage", "rl", "--out", str(out)]) == 2
    assert f"{out / 'results.json'}: not a demo results.json" in one_line_error(capsys, "demo")


def test_prepare_same_file_as_input_and_val_input(tmp_path, capsys):
    text = tmp_path / "in.txt"
    text.write_text("hello world. " * 20)
    assert cli(["prepare", "--input", str(text), "--val-input", str(tmp_path / "." / "in.txt"), "--byte-level",
                "--workers", "1", "--out", str(tmp_path / "d")]) == 2  # was exit 0: val loss on training text
    assert f"{text}: given in both --input and --val-input" in one_line_error(capsys, "prepare")
    assert not (tmp_path / "d").exists()


def test_prepare_workers_leave_ctrl_c_to_the_main_process(tmp_path):
    """Ctrl-C reaches every process of the group: a pool worker interrupted mid-write printed its traceback and
    could hang pool.terminate(); workers now ignore SIGINT and the main process stops them."""
    import signal
    from pyllm import prepare
    from pyllm.tokenizer import Tokenizer
    Tokenizer.byte_level().save(tmp_path)
    old = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        prepare._pool_init(str(tmp_path / "tokenizer.json"))
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN  # a SIGTERM to the group, likewise
    finally:
        signal.signal(signal.SIGINT, old[0])
        signal.signal(signal.SIGTERM, old[1])


def test_ctrl_c_while_the_stage_imports_is_one_line(capsys, monkeypatch):
    """Ctrl-C in the first 1-2 s (the stage's module importing torch) was a 40-line traceback from inside torch."""
    import importlib

    def interrupted(name):
        raise KeyboardInterrupt
    monkeypatch.setattr(importlib, "import_module", interrupted)
    assert cli(["export", "--checkpoint", "x", "--out", "y"]) == 130
    assert capsys.readouterr().err == "pyllm export: interrupted\n"


def test_every_subcommand_help_states_flags_and_defaults(capsys):
    """Every flag has help text and its default is stated (the assistant stages' shared flags said neither
    "--batch-size ... (default: 8)" nor what --lr is when not given)."""
    import argparse
    import re

    from pyllm import cli as cli_mod
    for name in cli_mod.COMMANDS:
        with pytest.raises(SystemExit) as e:
            cli([name, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        assert e.value.code == 0 and out.startswith(f"usage: pyllm {name}"), name
        sp = [a for a in cli_mod.build_parser(name)._actions
              if isinstance(a, argparse._SubParsersAction)][0].choices[name]
        for a in sp._actions:
            assert a.help, (name, a.option_strings)
            h = " ".join(sp._get_formatter()._get_help_string(a).split())
            if a.default is not None and a.default is not False and a.option_strings[0] != "-h":
                nums = [float(x) for x in re.findall(r"\d+(?:\.\d*)?(?:e-?\d+)?", h)]
                said = str(a.default) in h or (isinstance(a.default, (int, float)) and float(a.default) in nums)
                assert "default" in h.lower() or said or a.default == [], (name, a.option_strings, h)
    with pytest.raises(SystemExit):
        cli(["sft", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "per step per process (default: 8)" in out and "peak learning rate (default: 0.0001; 0.001 with --lora-r)" \
        in out and "(0 = --epochs over the data) --epochs" in out  # "(0 = ...)" states a 0 default already


def test_python_dash_m_stage_module_runs_the_command(tmp_path):
    """`python -m pyllm.export ...` (nanoGPT habit: run the stage's file) printed nothing and exited 0."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "pyllm.export", "--checkpoint", str(tmp_path / "nope"), "--out",
                        str(tmp_path / "o")], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    want = f"pyllm export: error: {tmp_path / 'nope'}: checkpoint directory not found\n"
    assert r.returncode == 2 and r.stderr == want


def test_export_without_a_tokenizer_warns_about_an_old_tokenizer_bin(base, tmp_path, capsys):
    """pyllm-run reads the tokenizer.bin beside model.bin: one left by an earlier export was used silently."""
    ck = tmp_path / "notok"
    import shutil
    shutil.copytree(base, ck)
    (ck / "tokenizer.json").unlink()
    out = tmp_path / "run"
    assert cli(["export", "--checkpoint", str(base), "--out", str(out)]) == 0
    capsys.readouterr()
    assert cli(["export", "--checkpoint", str(ck), "--out", str(out)]) == 0
    assert f"{out / 'tokenizer.bin'}: warning: left from an earlier export" in capsys.readouterr().err


@pytest.mark.parametrize("stage", ["sft", "reward", "dpo", "rl", "pretrain", "prepare"])
def test_nan_and_inf_float_flags(stage, capsys):
    """nan / inf parse as floats: `--weight-decay nan` trained an all-NaN checkpoint and exited 0. Every float flag
    of every stage now rejects them while parsing (cli.finite_float)."""
    from pyllm import cli as cli_mod
    floats = [a for a in cli_mod.build_parser(stage)._subparsers._group_actions[0].choices[stage]._actions
              if a.type is cli_mod.finite_float]
    assert floats and all(a.type is not float for a in floats)
    flag = floats[0].option_strings[0]
    for value in ("nan", "-inf"):
        with pytest.raises(SystemExit) as e:
            cli([stage, f"{flag}={value}"])  # = form: argparse reads a bare -inf as a flag
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"argument {flag}: must be a finite number, got '{value}'" in err, err


@pytest.mark.parametrize("stage", ["sft", "reward", "dpo", "rl", "score", "pretrain", "prepare", "tokenizer-train",
                                   "export", "demo"])
def test_numbers_past_int64_and_float32_are_refused_while_parsing(stage, capsys):
    """Every int flag takes a 64-bit integer and every float flag a float32-sized number (cli.int64, finite_float):
    past them was a traceback (prepare --workers 2^64: OverflowError, with a half-written --out; rl --clip-range
    1e308: "value cannot be converted to type float without overflow"), an error naming no flag after the models
    loaded (rl --top-k 2^64) or a run that never ended."""
    from pyllm import cli as cli_mod
    actions = cli_mod.build_parser(stage)._subparsers._group_actions[0].choices[stage]._actions
    ints = [a for a in actions if a.type is cli_mod.int64 and a.choices is None]
    floats = [a for a in actions if a.type is cli_mod.finite_float]
    assert ints and all(a.type is not int for a in actions)
    cases = [(a, v, "must be an integer within +-(2^63 - 1)") for a in ints for v in (2 ** 63, -2 ** 63 - 1, 2 ** 64)]
    cases += [(a, v, "must be at most 3.402823e+38 in magnitude (float32's range)") for a in floats
              for v in ("1e39", "-3.5e38", "1e308")]
    for a, value, want in cases:
        flag = a.option_strings[0]
        with pytest.raises(SystemExit) as e:
            cli([stage, f"{flag}={value}"])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and err[-1] == f"pyllm {stage}: error: argument {flag}: {want}, got '{value}'", err
    for a in ints:  # the largest int64 still parses (the stage's own range check, if any, names the flag)
        assert cli_mod.int64(str(2 ** 63 - 1)) == 2 ** 63 - 1


def test_sizes_past_the_machine_in_prepare_and_tokenizer_train(tmp_path, capsys):
    """prepare --workers 100000 forked processes until the machine ran out (the pool starts them all at once), 2^31
    was an OverflowError traceback that left a half-written manifest; tokenizer-train --vocab-size 2^31 aborted the
    process (a Rust panic in the tokenizers library: SIGABRT, no message)."""
    text = tmp_path / "in.txt"
    text.write_text("hello world. " * 20)
    for argv, want in ((["prepare", "--byte-level", "--workers", "100000"], "--workers must be <= "),
                       (["prepare", "--vocab-size", "2147483648"], "--vocab-size must be at most 16777216"),
                       (["tokenizer-train", "--vocab-size", "2147483647"], "--vocab-size must be at most 16777216")):
        assert cli([argv[0], "--input", str(text), "--out", str(tmp_path / "o"), *argv[1:]]) == 2, argv
        assert want in one_line_error(capsys, argv[0])
        assert not (tmp_path / "o").exists()


def test_rl_seeds_near_2_63(base, tmp_path, capsys):
    """--seed takes [0, 2^63); rl derives rollout and prompt-draw seeds from it (seed * 1000003 + step, ...), which
    overflowed: torch's "Overflow when unpacking long long", or generate's seed range, after the models loaded."""
    fn = tmp_path / "rf.py"
    fn.write_text("def fn(prompt, response, **kw):\n    return float(len(response) % 2)\n")
    prompts = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "hi"}] * 4)
    assert cli(["rl", "--policy", str(base), "--reward-fn", f"{fn}:fn", "--prompts", str(prompts), "--steps", "1",
                "--batch-size", "2", "--max-new-tokens", "2", "--device", "cpu", "--out", str(tmp_path / "o"),
                "--seed", str(2 ** 63 - 1), "--hard-prompts", "1"]) == 0


def test_out_of_memory_is_one_line(monkeypatch, capsys):
    """A size no check caught but the machine cannot hold: torch's allocator error was a traceback."""
    from pyllm import export

    def oom(args):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 274877906944 bytes. Error code 12 (Cannot allocate memory)")
    monkeypatch.setattr(export, "main", oom)
    assert cli(["export", "--checkpoint", "x", "--out", "y"]) == 2
    assert one_line_error(capsys, "export") == ("pyllm export: error: out of memory (tried to allocate 256 GiB); "
                                                "lower the sizes asked for (--batch-size, ...)")
    monkeypatch.setattr(export, "main", lambda args: (_ for _ in ()).throw(RuntimeError("some other failure")))
    with pytest.raises(RuntimeError, match="some other failure"):  # other RuntimeErrors are not hidden
        cli(["export", "--checkpoint", "x", "--out", "y"])


def test_a_save_refuses_non_finite_weights(base, tmp_path):
    """One huge update from a finite gradient (which the gradient-norm check lets through) made all-inf weights,
    saved with exit 0 (sft --lr 1e308, --weight-decay 1e308 before those were bounded)."""
    from pyllm.checkpoint import load_checkpoint
    from pyllm.sft import save_stage
    model, tok = load_checkpoint(str(base))
    with torch.no_grad():
        model.layers[0].mlp.up_proj.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"step 3: layers\.0\.mlp\.up_proj\.weight holds NaN or inf after the "
                                         r"update .* not saved"):
        save_stage(tmp_path / "o", model, tok, step=3)
    assert not (tmp_path / "o").exists()


def test_resume_past_the_step_count_or_with_a_corrupt_step(base, tmp_path, capsys):
    """A saved step beyond this run's --steps did nothing and exited 0 (progress at 200%); a negative or absurd
    step in trainer_state.json was taken as is ("resuming at step -5")."""
    data = write_jsonl(tmp_path / "s.jsonl", [GOOD_SFT] * 4)
    out = tmp_path / "o"
    args = ["sft", "--model", str(base), "--data", str(data), "--eval-frac", "0", "--batch-size", "2",
            "--device", "cpu", "--out", str(out)]
    assert cli(args + ["--steps", "3"]) == 0
    capsys.readouterr()
    assert cli(args + ["--steps", "2", "--resume"]) == 2
    assert "the saved run is at step 3, past this run's 2 steps" in one_line_error(capsys, "sft")
    assert cli(args + ["--steps", "3", "--resume"]) == 0  # a finished run resumed: nothing to do, no error
    capsys.readouterr()
    st = json.loads((out / "trainer_state.json").read_text())
    (out / "trainer_state.json").write_text(json.dumps({**st, "step": -5}))
    assert cli(args + ["--steps", "4", "--resume"]) == 2
    assert "trainer_state.json: corrupt trainer state" in one_line_error(capsys, "sft")


def test_export_onto_a_directory_named_tokenizer_bin_writes_nothing(base, tmp_path, capsys):
    """The failing rename came after the new model.bin was in place, and left tokenizer.bin.tmp behind."""
    out = tmp_path / "e"
    (out / "tokenizer.bin").mkdir(parents=True)
    assert cli(["export", "--checkpoint", str(base), "--out", str(out)]) == 2
    assert f"{out / 'tokenizer.bin'}: exists and is not a regular file" in one_line_error(capsys, "export")
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer.bin"]
    assert cli(["export", "--checkpoint", str(base), "--out", ""]) == 2  # was: exported into the current directory
    assert "--out is empty" in one_line_error(capsys, "export")


def test_demo_set_values_are_checked_before_any_stage(tmp_path, capsys):
    """--set rl_steps=-5 failed only at the RL stage, after the tokenizer, pretraining, SFT and the RM had run."""
    for argv, message in ((["--set", "rl_steps=-5"], "rl_steps must be a finite number > 0"),
                          (["--set", "pt_lr=nan"], "pt_lr must be a finite number > 0"),
                          (["--set", "dim=0"], "dim must be a finite number > 0"),
                          (["--seed", "-1"], "--seed must be in [0, 2^63)")):
        assert cli(["demo", "--quick", "--device", "cpu", "--out", str(tmp_path / "d"), *argv]) == 2
        assert message in one_line_error(capsys, "demo")
        assert not (tmp_path / "d").exists()


def test_reward_refuses_lora_on_the_lm_head(base, tmp_path, capsys):
    """A reward model never reads the LM head: adapters there were a RuntimeError traceback (freezing a LoRA-
    parametrized weight); now a one-line error before anything is built. Other targets still train."""
    prefs = write_jsonl(tmp_path / "p.jsonl", [GOOD_PREF] * 4)
    args = ["reward", "--model", str(base), "--data", str(prefs), "--lora-r", "2", "--steps", "1", "--eval-frac", "0",
            "--device", "cpu", "--out", str(tmp_path / "o")]
    assert cli(args + ["--lora-targets", "q_proj,lm_head"]) == 2
    assert "--lora-targets lm_head: a reward model never reads the LM head" in one_line_error(capsys, "reward")
    assert not (tmp_path / "o").exists()
    assert cli(args + ["--lora-targets", "q_proj"]) == 0


def _disk_full(*args, **kwargs):
    raise OSError(28, "No space left on device")  # as write()/fsync() raise it: errno and text, no file name


@pytest.mark.parametrize("stage", ["sft", "export", "prepare"])
def test_a_full_disk_names_the_file_and_leaves_no_partial_file(base, tmp_path, capsys, monkeypatch, stage):
    """ENOSPC was "error: [Errno 28] No space left on device": no file named. Now the file that could not be
    written is named, and no .tmp file or directory is left behind (prepare's manifest and tokenizer stay: a rerun
    with space again resumes)."""
    import os
    out = tmp_path / "out"
    if stage == "sft":
        write_jsonl(tmp_path / "d.jsonl", [GOOD_SFT] * 4)
        cmd = ["sft", "--model", str(base), "--data", str(tmp_path / "d.jsonl"), "--steps", "1", "--out", str(out),
               "--eval-frac", "0"]
        monkeypatch.setattr(os, "fsync", _disk_full)
        want = f"pyllm sft: error: {out}/"
    elif stage == "export":
        from pyllm import export
        monkeypatch.setattr(export._Writer, "f32", _disk_full)
        cmd = ["export", "--checkpoint", str(base), "--out", str(out)]
        want = f"pyllm export: error: {out}/model.bin: No space left on device"
    else:
        (tmp_path / "in.txt").write_text("some text to tokenize\n\n" * 50)
        cmd = ["prepare", "--input", str(tmp_path / "in.txt"), "--out", str(out), "--byte-level", "--workers", "1"]
        monkeypatch.setattr(os, "fsync", _disk_full)
        want = f"pyllm prepare: error: {out}/"
    assert cli(cmd) == 2
    err = one_line_error(capsys, stage)
    assert err.startswith(want) and err.endswith(": No space left on device"), err
    assert "Errno" not in err and ".tmp" not in err
    left = [p.name for p in out.rglob("*")] if out.exists() else []
    assert not [n for n in left if ".tmp" in n], left
    if stage == "export":
        assert "model.bin" not in left


def test_sigterm_mid_write_cleans_up_like_ctrl_c(tmp_path, capsys, monkeypatch):
    """SIGTERM (kill, a scheduler, torchrun) killed a stage mid-write: an export left model.bin.tmp and
    tokenizer.bin.tmp, an SFT save a <out>.tmp-<pid>/ that no later run removes. The CLI now raises it where the
    stage is, as Ctrl-C, so the same clean-up runs; exit 143. A real signal, sent from inside the writes."""
    import os
    import signal

    from pyllm import export, safetensors_io
    base = tiny_checkpoint(tmp_path / "base")
    calls = {"n": 0}
    real_f32 = export._Writer.f32

    def f32_then_term(self, t, align=1):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_f32(self, t, align)
    monkeypatch.setattr(export._Writer, "f32", f32_then_term)
    assert cli(["export", "--checkpoint", str(base), "--out", str(tmp_path / "bin")]) == 143
    assert capsys.readouterr().err.endswith("pyllm export: terminated\n")
    left = sorted(p.name for p in tmp_path.glob("bin/*"))
    assert not [n for n in left if ".tmp" in n], left
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handler lives only for the stage's run
    monkeypatch.undo()

    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(8)])
    real_save = safetensors_io.save_file

    def save_then_term(tensors, path, *a, **kw):
        if "trainer_state" in str(path):
            os.kill(os.getpid(), signal.SIGTERM)
        return real_save(tensors, path, *a, **kw)
    monkeypatch.setattr(safetensors_io, "save_file", save_then_term)
    assert cli(["sft", "--model", str(base), "--data", str(data), "--out", str(tmp_path / "sft"), "--steps", "1",
                "--batch-size", "2", "--device", "cpu"]) == 143
    assert not list(tmp_path.glob("sft.tmp-*")) and not list(tmp_path.glob("sft.old-*"))
    assert not (tmp_path / "sft" / "trainer_state.json").exists()


def test_tokenizer_flag_must_match_the_checkpoints_own(tmp_path, capsys):
    """--tokenizer replaced a checkpoint's own tokenizer with no check beyond its size: a model trained on BPE ids
    was fine-tuned and saved with a byte-level tokenizer (exit 0); export failed only later, on the vocab sizes."""
    from pyllm.tokenizer import Tokenizer
    base = tiny_checkpoint(tmp_path / "base", vocab_size=400)
    other = Tokenizer.train(iterator=["a b c d e f g " * 50], vocab_size=300)
    other.save(tmp_path / "other")
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(8)])
    argv = ["sft", "--model", str(base), "--data", str(data), "--steps", "1", "--batch-size", "2", "--device", "cpu"]
    assert cli([*argv, "--tokenizer", str(tmp_path / "other" / "tokenizer.json"), "--out", str(tmp_path / "o1")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "other/tokenizer.json: --tokenizer differs from the checkpoint's own tokenizer.json " \
                              f"({other.vocab_size} vs 262 tokens)" in err[0], err
    assert not (tmp_path / "o1").exists()
    # the same tokenizer given explicitly is fine
    assert cli([*argv, "--tokenizer", str(base / "tokenizer.json"), "--out", str(tmp_path / "o2")]) == 0


def test_flags_that_did_nothing_are_refused(tmp_path, capsys):
    """`sft --lora-alpha 16 --lora-targets q_proj` without --lora-r fine-tuned every weight, saying nothing;
    `pretrain --preset 260K --depth 1` built the preset and ignored --depth; rl ignored --eval-frac/--eval-every."""
    base = tiny_checkpoint(tmp_path / "base")
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "completion": "c"}] * 4)
    for extra in (["--lora-alpha", "16"], ["--lora-targets", "q_proj"]):
        assert cli(["sft", "--model", str(base), "--data", str(data), "--out", str(tmp_path / "o"), "--steps", "1",
                    "--device", "cpu", *extra]) == 2
        err = capsys.readouterr().err.splitlines()
        assert err == ["pyllm sft: error: --lora-alpha/--lora-targets need --lora-r (the LoRA rank; 0 = full "
                       "fine-tuning)"], err
    assert not (tmp_path / "o").exists()
    assert cli(["pretrain", "--data", str(tmp_path), "--preset", "260K", "--depth", "1"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["pyllm pretrain: error: --depth and --preset each give the whole model shape: pass one of them"]
    # rl offered --eval-frac/--eval-every (with defaults in --help) and used neither: every prompt trained
    with pytest.raises(SystemExit) as e:
        cli(["rl", "--policy", str(base), "--prompts", str(data), "--reward-model", str(base), "--out",
             str(tmp_path / "r"), "--eval-frac", "0.5"])
    assert e.value.code == 2 and "unrecognized arguments: --eval-frac 0.5" in capsys.readouterr().err


def test_foreign_state_files_are_one_line_errors(tmp_path, capsys):
    """Found by a CLI audit (session 18): a reward head holding other tensors was KeyError 'weight' (in score, rl
    and reward --resume), a wrong-shaped bias load_state_dict's RuntimeError; a wrong-shaped optimizer moment in an
    SFT run's trainer_state.safetensors a traceback from inside torch's Adam at the first resumed step."""
    import torch

    from pyllm import safetensors_io as S
    head = torch.nn.Linear(8, 1)
    for tensors, want in (({"w": torch.zeros(1, 8)}, r"holds tensors \['w'\], expected \['bias', 'weight'\]"),
                          ({"weight": torch.zeros(1, 8)}, r"holds tensors \['weight'\], expected"),
                          ({"weight": torch.zeros(1, 8), "bias": torch.zeros(3)},
                           r"tensor 'bias' is torch.float32 of shape \(3,\), expected a float tensor of shape \(1,\)"),
                          ({"weight": torch.zeros(1, 8, dtype=torch.int32), "bias": torch.zeros(1)},
                           r"tensor 'weight' is torch.int32")):
        S.save_file(tensors, tmp_path / "h.safetensors")
        with pytest.raises(ValueError, match=want) as e:
            S.load_into(tmp_path / "h.safetensors", head)
        assert str(e.value).startswith(f"{tmp_path / 'h.safetensors'}: ") and "\n" not in str(e.value)
    good = {"weight": torch.randn(1, 8), "bias": torch.randn(1)}
    S.save_file(good, tmp_path / "h.safetensors")
    S.load_into(tmp_path / "h.safetensors", head)
    assert torch.equal(head.weight.data, good["weight"]) and torch.equal(head.bias.data, good["bias"])

    base = tiny_checkpoint(tmp_path / "base")
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(8)])
    argv = ["sft", "--model", str(base), "--data", str(data), "--out", str(tmp_path / "o"), "--batch-size", "2",
            "--device", "cpu"]
    assert cli([*argv, "--steps", "1"]) == 0
    capsys.readouterr()
    st = tmp_path / "o" / "trainer_state.safetensors"
    tens = S.load_file(st)
    key = next(k for k in tens if k.endswith(".exp_avg"))
    for bad, want in (({**tens, key: torch.zeros(3)}, f"tensor '{key}' has shape (3,), the parameter"),
                      ({**tens, "opt.x.exp_avg": torch.zeros(1)}, "tensor 'opt.x.exp_avg' names no parameter")):
        S.save_file(bad, st)
        assert cli([*argv, "--steps", "2", "--resume"]) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and f"{tmp_path / 'o'}/trainer_state.safetensors: {want}" in err[0], err


def test_resume_with_a_corrupt_optimizer_state(tmp_path, capsys):
    """Found by a mutation fuzz of trainer_state.{json,safetensors}: the optimizer's param groups went to torch
    unchecked ("betas": 0 a TypeError, "capturable": true an AssertionError, "eps" deleted a KeyError, each a traceback
    from inside torch's Adam; "maximize": true trained silently), a missing moment was KeyError 'exp_avg', and a NaN
    moment trained on and saved an all-NaN model with exit status 0."""
    import torch

    from pyllm import safetensors_io as S
    argv, out = _sft_one_step(tmp_path, capsys)
    tj, st = out / "trainer_state.json", out / "trainer_state.safetensors"
    good_j, good_t = json.loads(tj.read_text()), S.load_file(st)

    def group0(**kw):
        d = json.loads(json.dumps(good_j))
        d["optimizer"]["param_groups"][0].update(kw)
        return d
    for side, want in ((group0(betas=0), "optimizer param group 0 has betas 0, this run's optimizer (0.9, 0.95)"),
                       (group0(maximize=True), "optimizer param group 0 has maximize True, this run's optimizer False"),
                       (group0(eps=float("nan")), "optimizer param group 0 has eps nan"),
                       (group0(params=[1, 0] + good_j["optimizer"]["param_groups"][0]["params"][2:]),
                        "optimizer param group 0 numbers its parameters [1, 0, 2, 3]..., expected [0, 1, 2, 3]"),
                       (group0(params=None), "optimizer param group 0: 'params' must be a list of parameter numbers"),
                       ({**good_j, "optimizer": {}}, "optimizer param_groups: expected a list of 2 objects")):
        tj.write_text(json.dumps(side))
        assert cli([*argv, "--steps", "2", "--resume"]) == 2
        err = one_line_error(capsys, "sft")
        assert f"{tj}: corrupt trainer state ({want}" in err, err
    tj.write_text(json.dumps(good_j))
    nan = {**good_t, "opt.0.exp_avg": torch.full_like(good_t["opt.0.exp_avg"], float("nan"))}
    for tensors, want in ((nan, "tensor 'opt.0.exp_avg' holds NaN, infinite or"),
                          ({k: v for k, v in good_t.items() if k != "opt.0.exp_avg"},
                           "missing tensor 'opt.0.exp_avg' (corrupt trainer state)"),
                          ({**good_t, "opt.0.exp_avg": good_t["opt.0.exp_avg"].to(torch.int32)},
                           "tensor 'opt.0.exp_avg' has dtype torch.int32, expected a float tensor")):
        S.save_file(tensors, st)
        assert cli([*argv, "--steps", "2", "--resume"]) == 2
        assert f"{st}: {want}" in one_line_error(capsys, "sft")
    assert not S.load_file(out / "model.safetensors")["model.embed_tokens.weight"].isnan().any()


def _sft_one_step(tmp_path, capsys):
    """A 1-step sft run of a tiny checkpoint in tmp_path/o -> (its argv without --steps, the run's directory)."""
    base = tiny_checkpoint(tmp_path / "base")
    data = write_jsonl(tmp_path / "d.jsonl", [GOOD_SFT] * 4)
    out = tmp_path / "o"
    argv = ["sft", "--model", str(base), "--data", str(data), "--out", str(out), "--eval-frac", "0", "--device", "cpu"]
    assert cli([*argv, "--steps", "1"]) == 0
    capsys.readouterr()
    return argv, out


def _pretrain_one_step(tmp_path, capsys):
    """A prepared byte-level corpus and a 1-step tiny pretrain run in tmp_path/o -> (its argv without --max-steps,
    the run's directory)."""
    from pyllm.prepare import prepare
    (tmp_path / "in.txt").write_text("\n\n".join(f"doc {i} " * 30 for i in range(40)))
    prepare([str(tmp_path / "in.txt")], tmp_path / "d", byte_level=True, val_fraction=0.1, doc_sep="\n\n", workers=1)
    out = tmp_path / "o"
    base = ["pretrain", "--data", str(tmp_path / "d"), "--out", str(out), "--dim", "32", "--n-layers", "1",
            "--n-heads", "2", "--seq-len", "32", "--eval-every", "0", "--sample-tokens", "0", "--batch-size", "2"]
    assert cli([*base, "--max-steps", "1"]) == 0
    capsys.readouterr()
    return base, out


def test_pretrain_resume_with_a_corrupt_trainer_state_tensor_file(tmp_path, capsys):
    """The tensors side of a pretrain checkpoint's trainer state: a missing rng.torch was KeyError: 'rng.torch', a
    wrong-sized optimizer moment reshape's RuntimeError ("shape '[262, 64]' is invalid")."""
    import torch

    from pyllm import safetensors_io as S
    base, out = _pretrain_one_step(tmp_path, capsys)
    tf = out / (out / "latest").read_text().strip() / "trainer_state.safetensors"
    good = S.load_file(tf)
    moment = next(k for k in good if k.startswith("optim.") and k.endswith("exp_avg"))
    for bad, want in (({k: v for k, v in good.items() if k != "rng.torch"}, "missing tensor 'rng.torch'"),
                      ({**good, moment: torch.zeros(5)}, f"tensor '{moment}' has 5 elements, trainer_state.json says"),
                      ({**good, "rng.torch": torch.zeros(3)}, "tensor 'rng.torch' is torch.float32"),
                      ({**good, "rng.torch": good["rng.torch"][:1].clone()},  # fuzz: set_rng_state's RuntimeError
                       f"tensor 'rng.torch' has 1 bytes, a torch RNG state {good['rng.torch'].numel()}")):
        S.save_file(bad, tf)
        assert cli([*base, "--max-steps", "2", "--resume"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{tf}: {want}" in err[0], err
    S.save_file(good, tf)
    assert cli([*base, "--max-steps", "2", "--resume"]) == 0


def test_pretrain_resume_checks_each_moment_against_its_parameter(tmp_path, capsys):
    """Session 31 audit: one-process pretrain --resume took a moment of another shape with the same element count
    (the AdamW kernel's error, naming no file) and a parameter whose whole state was gone (fresh moments, silently)."""
    import json

    from pyllm import safetensors_io as S
    base, out = _pretrain_one_step(tmp_path, capsys)
    ck = out / (out / "latest").read_text().strip()
    tf, tj = ck / "trainer_state.safetensors", ck / "trainer_state.json"
    good_t, good_j = S.load_file(tf), json.loads(tj.read_text())
    moment = next(k for k, v in good_j["shapes"].items() if k.endswith(".exp_avg") and len(v) == 2 and v[0] != v[1])
    pid = moment.split(".")[1]
    flipped = {**good_j, "shapes": {**good_j["shapes"], moment: good_j["shapes"][moment][::-1]}}
    gone = {**good_j, "shapes": {k: v for k, v in good_j["shapes"].items() if k.split(".")[1] != pid},
            "scalars": {k: v for k, v in good_j["scalars"].items() if k.split(".")[1] != pid}}
    for meta, tensors, want in (
            (flipped, good_t, f"tensor '{moment}' has shape {tuple(good_j['shapes'][moment][::-1])}, the parameter"),
            (gone, {k: v for k, v in good_t.items() if not k.startswith(f"optim.{pid}.")},
             f"missing tensor 'optim.{pid}.exp_avg'")):
        tj.write_text(json.dumps(meta))
        S.save_file(tensors, tf)
        assert cli([*base, "--max-steps", "2", "--resume"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{tf}: {want}" in err[0], err
    tj.write_text(json.dumps(good_j))
    S.save_file(good_t, tf)
    assert cli([*base, "--max-steps", "2", "--resume"]) == 0


def test_pretrain_resume_with_a_corrupt_trainer_state_json(tmp_path, capsys):
    """Found by a mutation fuzz of a pretrain checkpoint's trainer_state.json: "scalars": "x" was an AttributeError,
    a loader field deleted a KeyError, a loader "pos": Infinity int()'s OverflowError, a shape ["x"] math.prod's
    TypeError, "betas": "x" an IndexError from inside the optimizer, each a traceback."""
    base, out = _pretrain_one_step(tmp_path, capsys)
    tj = out / (out / "latest").read_text().strip() / "trainer_state.json"
    good = json.loads(tj.read_text())
    moment = next(k for k in good["shapes"] if k.endswith("exp_avg"))
    loader = {k: v for k, v in good["loader"].items() if k != "epoch"}
    g0 = {**good["param_groups"][0], "betas": "x"}
    for meta, want in (({**good, "scalars": "x"}, "scalars and shapes must be objects"),
                       ({**good, "loader": loader}, "loader must hold integers epoch, pos"),
                       ({**good, "loader": {**good["loader"], "pos": float("inf")}}, "loader must hold integers"),
                       ({**good, "shapes": {**good["shapes"], moment: ["x"]}}, "scalars and shapes must be objects, each shape"),
                       ({**good, "param_groups": [g0, *good["param_groups"][1:]]},
                        "optimizer param group 0 has betas 'x', this run's optimizer (0.9, 0.95)")):
        tj.write_text(json.dumps(meta))
        assert cli([*base, "--max-steps", "2", "--resume"]) == 2
        assert f"{tj}: corrupt trainer state ({want}" in one_line_error(capsys, "pretrain")
    tj.write_text(json.dumps(good))
    assert cli([*base, "--max-steps", "2", "--resume"]) == 0


def test_resume_checks_the_settings_it_restores(tmp_path, capsys):
    """Found by a mutation fuzz of trainer_state.json's "args": --resume restored a left-out flag's saved value
    without argparse's type or the stage's range checks: "batch_size": "x" or "seed": 1.5 was a TypeError/RuntimeError
    traceback, "save_every": 0 a ZeroDivisionError mid-run, "skip_bad_lines": "x" a switch silently on, pretrain's
    "decay": "nope" a run on no schedule its --decay choices allow."""
    argv, out = _sft_one_step(tmp_path, capsys)
    tj = out / "trainer_state.json"
    good = json.loads(tj.read_text())
    for key, value, want in (("batch_size", "x", "saved --batch-size 'x' is not a value of that flag (invalid"),
                             ("seed", 1.5, "saved --seed 1.5 is not a value of that flag"),
                             ("eval_data", 5, "saved --eval-data 5 is not a value of that flag"),
                             ("epochs", None, "saved --epochs None is null, and the flag takes a value"),
                             ("skip_bad_lines", "x", "saved --skip-bad-lines 'x' is not true or false"),
                             ("save_every", 0, "saved settings: --save-every must be >= 1, got 0")):
        tj.write_text(json.dumps({**good, "args": {**good["args"], key: value}}))
        assert cli([*argv, "--steps", "2", "--resume"]) == 2
        assert f"{tj}: corrupt trainer state (the run's {want}" in one_line_error(capsys, "sft")
    pre, run = _pretrain_one_step(tmp_path, capsys)
    tj = run / (run / "latest").read_text().strip() / "trainer_state.json"
    good = json.loads(tj.read_text())
    for key, value, want in (("decay", "nope", "saved --decay 'nope' is not one of"),
                             ("warmup_steps", -3, "saved settings: --warmup-steps must be >= 0")):
        tj.write_text(json.dumps({**good, "args": {**good["args"], key: value}}))
        assert cli([*pre, "--max-steps", "2", "--resume"]) == 2
        assert f"{tj}: corrupt trainer state (the run's {want}" in one_line_error(capsys, "pretrain")


def test_resume_keeps_the_runs_settings(tmp_path, capsys):
    """`pretrain --resume` (or a stage's) with flags left out ran on the defaults: the warmup restarted at 100 steps,
    the batch went 4 -> 16, the schedule ran to 3398 steps instead of 6, the optimizer kept its old weight decay while
    run.json recorded the new one; an SFT run resumed on other data. Now a flag left out takes the run's value and
    a flag given with another value is an error naming it; operational flags (--eval-every, --max-steps, ...) may
    change. The resumed run with every flag left out equals the uninterrupted one exactly."""
    import json

    from pyllm.prepare import prepare
    (tmp_path / "in.txt").write_text("\n\n".join(f"doc {i} " * 30 for i in range(40)))
    prepare([str(tmp_path / "in.txt")], tmp_path / "d", byte_level=True, val_fraction=0.1, doc_sep="\n\n", workers=1)
    flags = ["--dim", "32", "--n-layers", "1", "--n-heads", "2", "--seq-len", "32", "--eval-every", "0",
             "--sample-tokens", "0", "--batch-size", "4", "--warmup-steps", "2", "--max-steps", "5", "--seed", "7",
             "--weight-decay", "0.2"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli(["pretrain", "--data", str(tmp_path / "d"), "--out", str(a), *flags]) == 0
    assert cli(["pretrain", "--data", str(tmp_path / "d"), "--out", str(b), *flags, "--stop-at", "2"]) == 0
    capsys.readouterr()
    assert cli(["pretrain", "--data", str(tmp_path / "d"), "--out", str(b), "--resume", "--weight-decay", "0.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--resume continues the run with its own settings, and this command changes " \
                             "--weight-decay 0.2 -> 0.5" in err[0], err
    assert cli(["pretrain", "--data", str(tmp_path / "d"), "--out", str(b), "--resume"]) == 0
    assert "resuming with the run's" in capsys.readouterr().err

    def losses(d):
        return [json.loads(line)["loss"] for line in (d / "metrics.jsonl").read_text().splitlines()
                if "loss" in json.loads(line)]
    assert losses(a) == losses(b) and len(losses(a)) == 5

    base = tiny_checkpoint(tmp_path / "base")
    d1 = write_jsonl(tmp_path / "d1.jsonl", [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(8)])
    d2 = write_jsonl(tmp_path / "d2.jsonl", [{"prompt": f"q{i}", "completion": f"r{i}"} for i in range(8)])
    sft = ["sft", "--model", str(base), "--out", str(tmp_path / "s"), "--device", "cpu", "--steps", "2"]
    assert cli([*sft, "--data", str(d1), "--batch-size", "2"]) == 0
    capsys.readouterr()
    assert cli([*sft[:-2], "--steps", "3", "--data", str(d2), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"changes --data {str(d1)!r} -> {str(d2)!r}" in err[0], err
    assert cli([*sft[:-2], "--steps", "3", "--data", str(d1), "--resume"]) == 0  # --steps may grow
    assert "resuming with the run's --batch-size 2" in capsys.readouterr().err


def test_resume_setting_comparison_rules(tmp_path, monkeypatch, capsys):
    """Regressions found in the first version of the resume rules (session 18's second audit): a plain string saved
    setting (--algo grpo) counted as "the same" as any other and was not restored (a GRPO run resumed as PPO); a run
    saved with a relative --data could not be resumed at all; a full fine-tune whose --model had moved could not be
    resumed although its weights come from --out; a --reward-fn file.py:fn from another directory was a "change"."""
    import argparse

    from pyllm.sft import resume_args, run_args
    (tmp_path / "d").mkdir()
    (tmp_path / "fn.py").write_text("def f(**kw):\n    return 0.0\n")
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)

    def ns(given, **kw):
        a = argparse.Namespace(**kw)
        a._given = set(given)
        return a
    saved = run_args(ns([], algo="grpo", data="d", model=str(tmp_path / "gone"), reward_fn="fn.py:f", lr=0.01))
    assert saved["data"] == str(tmp_path / "d") and saved["reward_fn"] == f"{tmp_path / 'fn.py'}:f"
    # a flag left out takes the saved value, strings included
    a = ns(["data"], algo="ppo", data="d", model=str(tmp_path / "gone"), reward_fn="fn.py:f", lr=0.001)
    resume_args(a, saved, "run")
    assert (a.algo, a.lr) == ("grpo", 0.01)
    # the same file from another directory, relative or absolute, is no change; nor is a saved path that went away
    monkeypatch.chdir(tmp_path / "sub")
    a = ns(["data", "reward_fn", "model"], algo="grpo", data="../d", model="../elsewhere", reward_fn="../fn.py:f",
           lr=0.01)
    resume_args(a, saved, "run")
    # a run saved before paths were made absolute (data 'd', relative to where it ran) resumes from there
    monkeypatch.chdir(tmp_path)
    resume_args(ns(["data"], data="d", lr=0.01), {"data": "d", "lr": 0.01}, "run")
    resume_args(ns(["data"], data=str(tmp_path / "d"), lr=0.01), {"data": "d", "lr": 0.01}, "run")
    # and a real change is still an error
    with pytest.raises(ValueError, match=r"changes --algo 'grpo' -> 'ppo'"):
        resume_args(ns(["algo"], algo="ppo", lr=0.01), saved, "run")
    (tmp_path / "d2").mkdir()
    with pytest.raises(ValueError, match=r"changes --data '.*/d' -> '.*/d2'"):
        resume_args(ns(["data"], data="d2", lr=0.01), saved, "run")


def test_resume_restores_lora_rank_before_checking_lora_flags(tmp_path, capsys):
    """`--lora-alpha 4` given on a resume with --lora-r left out was refused ("need --lora-r") before the run's own
    --lora-r 2 was restored."""
    base = tiny_checkpoint(tmp_path / "base")
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(8)])
    sft = ["sft", "--model", str(base), "--data", str(data), "--out", str(tmp_path / "o"), "--device", "cpu"]
    assert cli([*sft, "--steps", "1", "--batch-size", "2", "--lora-r", "2", "--lora-alpha", "4"]) == 0
    assert cli([*sft, "--steps", "2", "--lora-alpha", "4", "--resume"]) == 0
    assert "resuming with the run's --batch-size 2 --lora-r 2" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# session 30 audit: inputs that were destroyed, runs that ended "fine" on nothing, checks that came too late

def _same_tree(a, b) -> bool:
    fa = sorted(p.relative_to(a) for p in a.rglob("*"))
    return fa == sorted(p.relative_to(b) for p in b.rglob("*")) and all(
        (a / f).read_bytes() == (b / f).read_bytes() for f in fa if (a / f).is_file())


def test_prepare_and_tokenizer_train_leave_a_checkpoint_alone(base, tmp_path, capsys):
    """`prepare --out <checkpoint>` replaced the checkpoint's tokenizer.json (a 300-token one beside a 262-token
    config), or, on a bad input line, deleted it with its own partial output; tokenizer-train replaced it too."""
    import shutil
    ck = tmp_path / "ck"
    shutil.copytree(base, ck)
    good = tmp_path / "in.txt"
    good.write_text("hello world. " * 40)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "hello"}\n{bad\n')
    for argv in (["prepare", "--input", str(bad), "--byte-level", "--workers", "1"],
                 ["prepare", "--input", str(good), "--vocab-size", "300", "--workers", "1"],
                 ["tokenizer-train", "--input", str(good), "--vocab-size", "300"]):
        assert cli([*argv, "--out", str(ck)]) == 2, argv
        assert f"--out {ck}: holds a model checkpoint (config.json)" in one_line_error(capsys, argv[0])
        assert _same_tree(base, ck)
    # a tokenizer.json that no prepare run wrote: refused, unless it is the run's own --tokenizer
    tk = tmp_path / "tk"
    assert cli(["tokenizer-train", "--input", str(good), "--vocab-size", "270", "--out", str(tk)]) == 0
    before = (tk / "tokenizer.json").read_bytes()
    assert cli(["prepare", "--input", str(good), "--vocab-size", "300", "--workers", "1", "--out", str(tk)]) == 2
    assert f"--out {tk}: holds a tokenizer.json that no `pyllm prepare` run there wrote; pass --tokenizer {tk}" in \
        one_line_error(capsys, "prepare")
    assert (tk / "tokenizer.json").read_bytes() == before
    assert cli(["prepare", "--input", str(bad), "--tokenizer", str(tk), "--workers", "1", "--out", str(tk)]) == 2
    capsys.readouterr()
    assert (tk / "tokenizer.json").read_bytes() == before  # the failed run kept the user's --tokenizer
    assert cli(["prepare", "--input", str(good), "--tokenizer", str(tk), "--workers", "1", "--out", str(tk)]) == 0
    assert (tk / "tokenizer.json").read_bytes() == before and (tk / "manifest.json").is_file()
    # and tokenizer-train does not replace the tokenizer that prepared shards were encoded with
    assert cli(["tokenizer-train", "--input", str(good), "--vocab-size", "300", "--out", str(tk)]) == 2
    assert "holds prepared token shards (manifest.json)" in one_line_error(capsys, "tokenizer-train")
    assert (tk / "tokenizer.json").read_bytes() == before


def test_tokenizer_out_named_like_a_json_file(tmp_path, capsys):
    """`--out tok.json` made a directory tok.json, trained, then failed "tok.json: Is a directory"."""
    good = tmp_path / "in.txt"
    good.write_text("hello world. " * 40)
    assert cli(["tokenizer-train", "--input", str(good), "--vocab-size", "270", "--out", str(tmp_path / "t.json")]) == 0
    assert (tmp_path / "t.json" / "tokenizer.json").is_file() and (tmp_path / "t.json" / "tokenizer.bin").is_file()
    assert cli(["prepare", "--input", str(good), "--byte-level", "--workers", "1",
                "--out", str(tmp_path / "d.json")]) == 0
    assert (tmp_path / "d.json" / "tokenizer.json").is_file() and (tmp_path / "d.json" / "manifest.json").is_file()


def test_out_that_is_a_symlink_to_a_directory(base, tmp_path):
    """The save renamed the link itself: a real directory took its place, a stray `<out>.old-<pid>` link stayed and
    the run failed "Cannot call rmtree on a symbolic link". The link's target is replaced now, twice over."""
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    data = write_jsonl(tmp_path / "s.jsonl", [GOOD_SFT] * 4)
    args = ["sft", "--model", str(base), "--data", str(data), "--eval-frac", "0", "--device", "cpu", "--out", str(link)]
    assert cli([*args, "--steps", "1", "--save-every", "1"]) == 0
    assert cli([*args, "--steps", "2", "--resume"]) == 0
    assert link.is_symlink() and (real / "model.safetensors").is_file()
    assert json.loads((real / "trainer_state.json").read_text())["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real", "s.jsonl"]  # no stray .old / .tmp


def test_out_that_is_an_input_model_or_another_stages_run(base, tmp_path, capsys):
    """`rl --out <its --reward-model>` replaced the reward model by the policy (and then could not rerun: no reward
    head); `sft --out <a reward run>` replaced the reward run. Both were a warning and exit 0."""
    import shutil
    rm = _train_rm(base, tmp_path, capsys)
    prefs = tmp_path / "p.jsonl"
    keep = tmp_path / "rm_copy"
    shutil.copytree(rm, keep)
    prompts = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "hi"}] * 2)
    assert cli(["rl", "--policy", str(base), "--reward-model", str(rm), "--prompts", str(prompts), "--steps", "1",
                "--batch-size", "2", "--max-new-tokens", "2", "--device", "cpu", "--out", str(rm)]) == 2
    assert f"--out {rm}: is the --reward-model it reads" in one_line_error(capsys, "rl")
    assert cli(["dpo", "--model", str(base), "--ref-model", str(rm), "--data", str(prefs), "--steps", "1",
                "--device", "cpu", "--out", str(rm)]) == 2
    assert f"--out {rm}: is the --ref-model it reads" in one_line_error(capsys, "dpo")
    sft = write_jsonl(tmp_path / "s.jsonl", [GOOD_SFT] * 4)
    assert cli(["sft", "--model", str(base), "--data", str(sft), "--steps", "1", "--eval-frac", "0", "--device", "cpu",
                "--out", str(rm)]) == 2
    assert f"--out {rm}: holds a `pyllm reward` run; `pyllm sft` replaces only its own runs" in \
        one_line_error(capsys, "sft")
    assert _same_tree(keep, rm)


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_a_diverged_loss_stops_before_the_update(base, tmp_path, capsys, stage):
    """SFT at --lr 1000 (DPO at 1e30, no clipping) logged NaN losses, saved an all-NaN model and exited 0; a --resume
    of a good run replaced it with that. Now the step that sees a non-finite gradient norm stops the run and the
    last checkpoint (finite) stays."""
    from pyllm.checkpoint import load_checkpoint
    data = write_jsonl(tmp_path / "d.jsonl", [GOOD_SFT if stage == "sft" else GOOD_PREF] * 8)
    out = tmp_path / "o"
    args = [stage, "--model", str(base), "--data", str(data), "--eval-frac", "0", "--device", "cpu", "--out", str(out),
            "--steps", "8", "--save-every", "1"]
    args += ["--lr", "1000"] if stage == "sft" else ["--lr", "1e30", "--grad-clip", "0"]
    assert cli(args) == 2
    err = one_line_error(capsys, stage)
    assert "gradient norm is nan at step" in err and "lower --lr" in err, err
    step = int(err.split("at step ")[1].split()[0])
    assert step >= 2  # the first update is finite (and huge): the next step's gradients are not
    model, _ = load_checkpoint(str(out))
    assert json.loads((out / "trainer_state.json").read_text())["step"] == step - 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_prompt_and_preference_fields_checked_at_their_line(base, tmp_path, capsys):
    """An RL prompt's `weight` of null / a list / a string was a TypeError traceback (or an unnamed error) after the
    first rollout; DPO pairs whose chosen and rejected had no assistant turn trained on nothing and exited 0."""
    fn = tmp_path / "rf.py"
    fn.write_text("def fn(prompt, response, **kw):\n    return 1.0\n")
    for w in (None, [1], "high", True):
        prompts = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "hi", "weight": 1}, {"prompt": "ho", "weight": w}])
        assert cli(["rl", "--policy", str(base), "--reward-fn", f"{fn}:fn", "--prompts", str(prompts), "--steps", "1",
                    "--batch-size", "2", "--max-new-tokens", "2", "--device", "cpu", "--out", str(tmp_path / "o")]) == 2
        assert f"q.jsonl:2: weight must be a finite number" in one_line_error(capsys, "rl")
    turns = [{"role": "user", "content": "nope"}]
    for stage in ("dpo", "reward"):
        prefs = write_jsonl(tmp_path / "p.jsonl", [GOOD_PREF, {"prompt": "q", "chosen": turns, "rejected": "bad"}])
        assert cli([stage, "--model", str(base), "--data", str(prefs), "--steps", "1", "--eval-frac", "0",
                    "--device", "cpu", "--out", str(tmp_path / "o")]) == 2
        assert "p.jsonl:2: 'chosen' has no assistant turn" in one_line_error(capsys, stage)
    assert not (tmp_path / "o").exists()


def test_second_model_context_and_eval_data_checked_up_front(base, tmp_path, capsys):
    """A --ref-model / --reward-model with a shorter context failed at the first step (or after the first rollout)
    with "sequence of 18 tokens exceeds max_seq_len 16", naming neither; --eval-data = --data measured the eval loss
    on the training data without a word."""
    from pyllm.checkpoint import save_checkpoint
    from chat_util import tiny_model
    from pyllm.tokenizer import Tokenizer
    model, _ = tiny_model(max_seq_len=16)
    short = save_checkpoint(tmp_path / "short", model, Tokenizer.byte_level())
    _second_model_refused(base, short, tmp_path, capsys,
                          f"{short}: the reference model's context (max_seq_len 16) is shorter than the policy's (48)",
                          "the reward model's context (max_seq_len 16) is shorter")
    for stage in ("sft", "reward", "dpo"):
        data = write_jsonl(tmp_path / "d.jsonl", [GOOD_SFT if stage == "sft" else GOOD_PREF] * 4)
        assert cli([stage, "--model", str(base), "--data", str(data), "--eval-data", str(data), "--steps", "1",
                    "--device", "cpu", "--out", str(tmp_path / "o")]) == 2
        assert f"--eval-data {data}: is the --data file" in one_line_error(capsys, stage)
    assert not (tmp_path / "o").exists()


def test_demo_word_and_list_settings_checked_before_any_stage(tmp_path, capsys):
    """rl_scale_rewards=bogus / rl_kinds=mul failed in the RL stage, after every stage before it had run."""
    for argv, message in ((["--set", "rl_scale_rewards=bogus"], "expected group, batch or none"),
                          (["--set", "rl_kinds=mul"], "rl_kinds=mul: expected a comma-separated subset of kinds"),
                          (["--set", "kinds=add,mul"], "kinds=add,mul: expected a comma-separated subset of add,sub"),
                          (["--set", "kinds=add", "--set", "rl_kinds=sub"], "rl_kinds=sub: expected"),
                          # and numbers that passed the range check but failed in their stage
                          (["--set", "sft_steps=0"], "sft_steps must be a finite number > 0"),
                          (["--set", "rl_prefilter=1"], "rl_prefilter=1: expected 0 (off) or >= 2"),
                          (["--set", "rl_algo=grpo", "--set", "rl_k=1"], "rl_k=1: GRPO needs >= 2")):
        assert cli(["demo", "--quick", "--device", "cpu", "--out", str(tmp_path / "d"), *argv]) == 2
        assert message in one_line_error(capsys, "demo")
        assert not (tmp_path / "d").exists()


def _dead_pid() -> int:
    import subprocess
    import sys
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_sigkill_mid_save_leftovers_are_cleaned_and_the_previous_checkpoint_put_back(tmp_path, capsys):
    """Crash-point fuzzing (SIGKILL, no clean-up runs): a save killed while writing left <out>.tmp-<pid>/, one killed
    while removing the previous checkpoint <out>.old-<pid>/, model-sized directories no later run removed; killed
    between the two renames, <out> was gone and `--resume` said "no trainer_state.json there" with the previous
    checkpoint stranded at <out>.old-<pid>. The exact leftovers of a dead process, made by hand here."""
    import os
    import shutil
    argv, out = _sft_one_step(tmp_path, capsys)
    dead = _dead_pid()
    shutil.copytree(out, tmp_path / f"o.tmp-{dead}")  # a partial copy (its files are not checked)
    (tmp_path / f"o.tmp-{dead}" / f"model.safetensors.tmp-{dead}").write_bytes(b"partial")
    os.replace(out, tmp_path / f"o.old-{dead}")  # killed between the renames: no <out>
    live = tmp_path / f"o.tmp-{os.getppid()}"  # a live process's: may be saving right now, left alone
    live.mkdir()
    assert cli([*argv, "--steps", "2", "--resume"]) == 0
    assert f"{out}: put back the previous checkpoint from o.old-{dead}" in capsys.readouterr().err
    assert json.loads((out / "trainer_state.json").read_text())["step"] == 2
    assert sorted(p.name for p in tmp_path.glob("o*")) == ["o", live.name]
    # killed while the previous checkpoint was being removed: <out> is the new one, <out>.old-<pid> partial
    dead = _dead_pid()
    (tmp_path / f"o.old-{dead}").mkdir()
    (tmp_path / f"o.old-{dead}" / "config.json").write_text("{")
    assert cli([*argv, "--steps", "3", "--resume"]) == 0
    assert json.loads((out / "trainer_state.json").read_text())["step"] == 3
    assert sorted(p.name for p in tmp_path.glob("o*")) == ["o", live.name]
