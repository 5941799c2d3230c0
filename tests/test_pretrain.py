"""`pyllm pretrain`: loss goes down, exact resume, DDP/FSDP == one process, checkpoints, CLI.
Run: pytest -q tests/test_pretrain.py"""
from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pyllm import data as D
from pyllm.checkpoint import load_checkpoint
from pyllm.cli import main as cli
from pyllm.prepare import prepare
from pyllm.pretrain import lr_at

from chat_util import assert_clean_exit, exit_probe

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--dim", "32", "--n-layers", "2", "--n-heads", "2", "--seq-len", "32", "--eval-every", "0",
        "--sample-tokens", "0", "--warmup-steps", "2"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Byte-level shards of a little English-like text: ~80 paragraphs, 10% held out."""
    t = tmp_path_factory.mktemp("pt")
    lines = ["First Citizen:\nBefore we proceed any further, hear me speak.",
             "All:\nSpeak, speak.", "First Citizen:\nYou are all resolved rather to die than to famish?",
             "All:\nResolved. resolved.", "First Citizen:\nFirst, you know Caius Marcius is chief enemy to the people."]
    (t / "in.txt").write_text("\n\n".join(lines[i % 5] for i in range(80)))
    prepare([str(t / "in.txt")], t / "d", byte_level=True, val_fraction=0.1, doc_sep="\n\n", workers=1)
    return t / "d"


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_lr_schedule():
    assert lr_at(0, 1.0, 4, 20, "cosine", 0.1) == pytest.approx(0.25)
    assert lr_at(3, 1.0, 4, 20, "cosine", 0.1) == pytest.approx(1.0)
    assert lr_at(12, 1.0, 4, 20, "cosine", 0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(20, 1.0, 4, 20, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_at(12, 1.0, 4, 20, "linear", 0.0) == pytest.approx(0.5)
    assert lr_at(19, 1.0, 4, 20, "constant", 0.0) == 1.0


def test_loss_decreases_and_outputs(data_dir, tmp_path, capsys):
    out = tmp_path / "o"
    rc = cli(["pretrain", "--data", str(data_dir), "--out", str(out), *TINY, "--batch-size", "8", "--max-steps",
              "40", "--lr", "1e-2", "--eval-every", "20", "--sample-tokens", "8", "--checkpoint-every", "20"])
    assert rc == 0
    losses = _losses(out)
    assert len(losses) == 40 and all(math.isfinite(x) for x in losses)
    assert losses[0] > math.log(262) - 0.3  # starts near uniform over the byte vocabulary
    assert sum(losses[-5:]) / 5 < losses[0] - 2.0  # this repetitive text is quickly learnt
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    vals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in vals] == [20, 40] and vals[-1]["val_loss"] < losses[0] - 2.0
    assert all(0 < r["mfu"] < 1 and r["tok_per_s"] > 0 for r in rows if "loss" in r)
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG" and "train loss n=40" in (out / "loss.png.txt").read_text()
    assert (out / "samples.txt").read_text().count("--- step") == 2
    assert (out / "latest").read_text().strip() == "ckpt_0000040"
    # the checkpoint is a normal pyllm/HF checkpoint
    from pyllm.checkpoint import load_checkpoint
    model, tok = load_checkpoint(str(out / "ckpt_0000040"))
    assert tok is not None and model.config.dim == 32
    assert "val loss" in capsys.readouterr().err


def test_resume_is_exact(data_dir, tmp_path):
    args = ["pretrain", "--data", str(data_dir), *TINY, "--batch-size", "4", "--max-steps", "6",
            "--total-batch-tokens", "256"]  # 2 micro-steps of accumulation per step
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli([*args, "--out", str(a)]) == 0
    assert cli([*args, "--out", str(b), "--stop-at", "3"]) == 0
    assert len(_losses(b)) == 3
    assert cli([*args, "--out", str(b), "--resume"]) == 0
    assert _losses(a) == _losses(b) and len(_losses(a)) == 6  # bit-identical, not just close
    from pyllm.safetensors_io import load_file
    wa, wb = (load_file(str(d / "ckpt_0000006" / "model.safetensors")) for d in (a, b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_after_a_kill_between_a_sample_and_the_next_checkpoint(data_dir, tmp_path, monkeypatch):
    """Crash-point fuzzing: killed after step 2's sample and before the step-3 checkpoint, --resume (from step 2)
    wrote "--- step 2" to samples.txt a second time; a run started over appended to the earlier run's samples."""
    from pyllm import pretrain
    args = ["pretrain", "--data", str(data_dir), *TINY, "--batch-size", "4", "--max-steps", "3", "--eval-every", "1",
            "--sample-tokens", "2", "--checkpoint-every", "1"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli([*args, "--out", str(a)]) == 0
    real = pretrain.save

    def killed_at_3(out, step, *rest):
        if step == 3:
            raise KeyboardInterrupt
        real(out, step, *rest)
    monkeypatch.setattr(pretrain, "save", killed_at_3)
    assert cli([*args, "--out", str(b)]) == 130
    monkeypatch.undo()
    assert (b / "samples.txt").read_text().count("--- step") == 2
    assert cli([*args, "--out", str(b), "--resume"]) == 0
    assert (b / "samples.txt").read_text() == (a / "samples.txt").read_text()  # "--- step 1", 2, 3; 2 was twice
    assert _losses(a) == _losses(b)
    assert cli([*args, "--out", str(b)]) == 0  # started over: its own samples only
    assert (b / "samples.txt").read_text() == (a / "samples.txt").read_text()


def test_bf16_on_cpu_with_pyllm_kernels(data_dir, tmp_path):
    """--dtype bf16 on CPU: pyllm's GEMMs take bf16 operands (fp32 master weights); the run finishes, the loss is
    finite and the checkpoint is fp32."""
    out = tmp_path / "bf16"
    assert cli(["pretrain", "--data", str(data_dir), "--out", str(out), *TINY, "--batch-size", "4", "--max-steps", "3",
                "--dtype", "bf16", "--backend", "pyllm"]) == 0
    losses = _losses(out)
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    from pyllm.checkpoint import load_checkpoint
    model, _ = load_checkpoint(str(out / (out / "latest").read_text().strip()))
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_bf16_torch_backend_samples(data_dir, tmp_path):
    """--backend torch --dtype bf16 trained, then died at its first sample (generate under autocast wrote a bf16 v
    into the fp32 KV cache: index_copy_ refused); CUDA pretraining runs that backend under autocast by default."""
    out = tmp_path / "tb"
    assert cli(["pretrain", "--data", str(data_dir), "--out", str(out), *TINY, "--batch-size", "4", "--max-steps", "2",
                "--dtype", "bf16", "--backend", "torch", "--eval-every", "1", "--sample-tokens", "4"]) == 0
    assert (out / "samples.txt").read_text().count("--- step") >= 1


def test_resume_errors(data_dir, tmp_path, capsys):
    out = tmp_path / "o"
    base = ["pretrain", "--data", str(data_dir), "--out", str(out), *TINY, "--batch-size", "4"]
    assert cli([*base, "--max-steps", "2", "--resume"]) == 2
    assert "--resume: no checkpoint" in capsys.readouterr().err
    assert cli([*base, "--max-steps", "2"]) == 0
    capsys.readouterr()
    # past its --max-steps: was exit 0 with nothing trained (the progress bar at 200%)
    assert cli([*base, "--max-steps", "1", "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checkpoint is at step 2, past --max-steps 1; raise --max-steps" in err[0], err
    # --stop-at at or before the checkpoint's step: the same, was exit 0 with nothing trained
    for stop in (1, 2):
        assert cli([*base, "--max-steps", "4", "--stop-at", str(stop), "--resume"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"checkpoint is at step 2, already at or past --stop-at {stop}" in err[0], err
    # beta 1 passed the range check and reached the optimizer ("Invalid beta parameter at index 1", no flag)
    for flag in ("--beta1", "--beta2"):
        assert cli([*base, "--max-steps", "4", flag, "1"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{flag} must be in [0, 1), got 1" in err[0], err
    good = (out / (out / "latest").read_text().strip() / "trainer_state.json").read_text()
    tj = out / (out / "latest").read_text().strip() / "trainer_state.json"
    for step in (-5, "2", True):
        tj.write_text(json.dumps({**json.loads(good), "step": step}))
        assert cli([*base, "--max-steps", "4", "--resume"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"trainer_state.json: corrupt trainer state (step {step!r})" in err[0], err
    tj.write_text(json.dumps({"stage": "sft", "step": 2, "optimizer": {}}))  # an SFT run's: was "corrupt"
    assert cli([*base, "--max-steps", "4", "--resume"]) == 2
    assert "a `pyllm sft` checkpoint, not a pretrain one" in capsys.readouterr().err
    tj.write_text(good)
    assert cli([*base[:-6], "--dim", "64", *TINY[2:], "--batch-size", "4", "--max-steps", "4", "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--resume continues the run with its own settings, and this command changes --dim 32 " \
                             "-> 64" in err[0], err
    # a corrupt trainer_state.json: was a bare JSON message (no file) or a KeyError/TypeError traceback
    tj = out / (out / "latest").read_text().strip() / "trainer_state.json"
    for text, want in (("{bad", "corrupt trainer state (Expecting"), ("[1]", "corrupt trainer state (expected an"),
                       ('{"step": 2}', "corrupt trainer state (expected an")):
        tj.write_text(text)
        assert cli([*base, "--max-steps", "4", "--resume"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{tj}: {want}" in err[0], err


def test_cli_help_and_bad_flags(data_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli(["pretrain", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--total-batch-tokens" in out and "--resume" in out and "--depth" in out
    with pytest.raises(SystemExit) as e:
        cli(["pretrain", "--data", str(data_dir), "--decay", "exp"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err
    assert cli(["pretrain", "--data", str(data_dir), "--batch-size", "0"]) == 2
    assert "--batch-size must be positive" in capsys.readouterr().err
    assert cli(["pretrain", "--data", str(data_dir), *TINY, "--batch-size", "4",
                "--total-batch-tokens", "100"]) == 2
    assert "not a multiple" in capsys.readouterr().err
    assert cli(["pretrain", "--data", str(data_dir.parent)]) == 2
    assert "not a prepared data directory" in capsys.readouterr().err
    # were accepted: a negative period evaluated / checkpointed every step, --depth 0 became depth 4
    for flag, value, want in (("--eval-every", "-1", "--eval-every must be >= 0"),
                              ("--checkpoint-every", "-1", "--checkpoint-every must be >= 0"),
                              ("--sample-tokens", "-3", "--sample-tokens must be >= 0"),
                              ("--depth", "0", "--depth must be positive"),
                              ("--min-lr-frac", "5", "--min-lr-frac must be in [0, 1]"),
                              ("--tokens-per-param", "-1", "--tokens-per-param must be > 0"),
                              ("--total-batch-tokens", "-128", "--total-batch-tokens must be >= 0"),  # was exit 0
                              ("--seed", "-1", "--seed must be in [0, 2^63)"),  # was "expected non-negative integer"
                              ("--lr", "-1", "--lr > 0"),
                              ("--grad-clip", "-1", "--grad-clip must be >= 0"),  # was "off"
                              ("--beta2", "1.5", "--beta2 must be in [0, 1]"),
                              ("--peak-flops", "-5.0", "--peak-flops must be a finite number >= 0"),  # was MFU < 0
                              # audit-flags: 33 million micro-batches a step on this data (never ended); torch's
                              # "value cannot be converted to type float without overflow" traceback
                              ("--total-batch-tokens", "2147483648", "--total-batch-tokens 2147483648: one optimizer "
                               "step needs 67108864 windows of 32+1 tokens, but the training data makes"),
                              ("--weight-decay", "3e38", "--lr 0.001 x --weight-decay 3e+38 must be <= 1"),
                              ("--lr", "3.4e38", "--lr must be <= 3.4e+37")):
        assert cli(["pretrain", "--data", str(data_dir), *TINY, "--batch-size", "4", "--out",
                    str(tmp_path / "o"), flag, value]) == 2, flag
        assert not (tmp_path / "o").exists(), flag
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and want in err[0], err
    for flag in ("--lr", "--weight-decay"):  # nan / inf are floats to argparse: a NaN weight decay trained to NaN
        for value in ("nan", "inf"):
            with pytest.raises(SystemExit) as e:
                cli(["pretrain", "--data", str(data_dir), flag, value])
            err = capsys.readouterr().err
            assert e.value.code == 2 and f"argument {flag}: must be a finite number, got '{value}'" in err, err


@pytest.mark.parametrize("version,ok", [("2.6.0", False), ("2.8.0+cu128", False), ("2.8.1", False), ("2.9.0", True),
                                        ("2.13.0+cpu", True), ("2.10.0a0+git1234", True), ("10.0", True)])
def test_fsdp_needs_a_torch_that_runs_it_exactly(data_dir, capsys, monkeypatch, version, ok):
    """Older torch crashed deep inside FSDP2 on CPU (2.6) or resumed inexactly (2.7, 2.8): a one-line error instead.
    Versions are compared as versions (as text, "2.10" < "2.9")."""
    from pyllm.pretrain import check_fsdp_torch
    check_fsdp_torch(False, version)  # without --fsdp any torch will do
    if ok:
        check_fsdp_torch(True, version)
        return
    monkeypatch.setattr(torch, "__version__", version)
    assert cli(["pretrain", "--data", str(data_dir), "--fsdp"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--fsdp needs torch >= 2.9 (this is {version}" in err[0] and "drop --fsdp" in err[0]


DIST = ["--n-layers", "2", "--n-heads", "2", "--seq-len", "32", "--eval-every", "0", "--sample-tokens", "0",
        "--warmup-steps", "2", "--batch-size", "2", "--total-batch-tokens", "128", "--max-steps", "4",
        "--checkpoint-every", "0"]


@pytest.fixture(scope="module")
def one_process(data_dir, tmp_path_factory):
    """Losses of 1 process x 2 rows x 2 accumulation steps (the reference for the 2-rank runs)."""
    out = tmp_path_factory.mktemp("one")
    assert cli(["pretrain", "--data", str(data_dir), "--dim", "32", *DIST, "--out", str(out)]) == 0
    return _losses(out)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_match_one_process(data_dir, tmp_path, one_process, mode):
    """torchrun, 2 gloo ranks x 2 rows == 1 process x 2 rows x 2 accumulation steps (the same 4 windows per step),
    with DDP and with FSDP2 sharding (its checkpoint, gathered to rank 0, loads as a normal checkpoint).
    FSDP: each Block is its own group, every parameter a DTensor sharded across both ranks, and the run is
    stopped after 2 steps and resumed from the sharded checkpoint (optimizer state included)."""
    from packaging.version import Version
    from pyllm.pretrain import FSDP_MIN_TORCH
    if mode == "fsdp" and Version(torch.__version__).release < Version(FSDP_MIN_TORCH).release:
        pytest.skip(f"--fsdp needs torch >= {FSDP_MIN_TORCH}")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYLLM_PROGRESS="0")
    log = exit_probe(tmp_path, env)
    out = tmp_path / mode
    # --standalone: torchrun binds its own free port (a port picked here and released raced other jobs' runs)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "pyllm", "pretrain", "--data", str(data_dir), "--dim", "32", *DIST, "--out", str(out)]
    runs = [cmd] if mode == "ddp" else [cmd + ["--fsdp", "--stop-at", "2"], cmd + ["--fsdp", "--resume"]]
    for i, c in enumerate(runs):
        if i == 1:  # first a resume from a NaN optimizer moment: was trained on, and the step it poisoned saved as an
            # all-NaN checkpoint with exit 0 (the sharded state went to torch unchecked)
            from pyllm import safetensors_io as S
            tf = out / "ckpt_0000002" / "trainer_state.safetensors"
            good = S.load_file(str(tf))
            key = next(k for k in good if k.endswith(".exp_avg"))
            S.save_file({**good, key: torch.full_like(good[key], float("nan"))}, str(tf))
            c2 = c[:-1] + ["--stop-at", "3", "--resume"]
            r = subprocess.run(c2, capture_output=True, text=True, env=env, timeout=240)
            assert r.returncode != 0 and f"pyllm pretrain: error: {tf}: tensor '{key}' holds NaN" in r.stderr, \
                r.stderr[-3000:]
            assert not (out / "ckpt_0000003").exists()
            S.save_file(good, str(tf))
        r = subprocess.run(c, capture_output=True, text=True, env=env, timeout=240)
        # the whole tail: a rank killed by SIGABRT (seen twice in ~30 runs, 2026-11-26, not reproduced) prints its
        # cause (a glibc heap message, a C++ what()) on lines that a filter for "error" dropped
        assert r.returncode == 0, r.stderr[-8000:]
        assert_clean_exit(log)
    run = json.loads((out / "run.json").read_text())
    assert run["world_size"] == 2 and run["accum"] == 1
    if mode == "fsdp":
        assert run["fsdp"]["groups"] == ["layers.0", "layers.1", "<root>"]
        assert all(run["fsdp"]["sharded"].values())
    l2 = _losses(out)
    assert len(one_process) == len(l2) == 4
    assert max(abs(a - b) for a, b in zip(one_process, l2)) < 1e-5
    assert one_process[-1] != one_process[0]  # it trained
    from pyllm.checkpoint import load_checkpoint
    model, _ = load_checkpoint(str(out / "ckpt_0000004"))
    assert model.config.dim == 32


def test_resume_on_another_number_of_ranks_keeps_the_tokens_per_step(data_dir, tmp_path, one_process, capsys):
    """2 ranks x 2 rows (no --total-batch-tokens: one micro-batch per rank), stopped at step 2 and resumed as one
    process: the resumed run took 2 rows a step (half the tokens, another data order and loss curve) without a word.
    It now accumulates 2 micro-batches, so the losses are the one-process 2 x 2 reference's. The other way, 1 x 2 rows
    resumed on 2 ranks of 2 rows cannot keep its 64 tokens a step: a one-line error naming the checkpoint."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYLLM_PROGRESS="0")
    flags = [f for i, f in enumerate(DIST) if "--total-batch-tokens" not in DIST[max(0, i - 1):i + 1]]
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "pyllm",
           "pretrain", "--data", str(data_dir), "--dim", "32", *flags]
    out = tmp_path / "two"
    r = subprocess.run(run + ["--out", str(out), "--stop-at", "2"], capture_output=True, text=True, env=env,
                       timeout=240)
    assert r.returncode == 0, r.stderr[-8000:]
    assert cli(["pretrain", "--data", str(data_dir), "--out", str(out), "--resume"]) == 0
    assert "128 tokens/step = 1 rank(s) x 2 micro x 2x32" in capsys.readouterr().out
    l2 = _losses(out)
    assert len(l2) == 4 and max(abs(a - b) for a, b in zip(one_process, l2)) < 1e-5
    one = tmp_path / "one"
    assert cli(["pretrain", "--data", str(data_dir), "--dim", "32", *flags, "--out", str(one), "--stop-at", "1"]) == 0
    r = subprocess.run(run + ["--out", str(one), "--resume"], capture_output=True, text=True, env=env, timeout=240)
    err = [line for line in r.stderr.splitlines() if "pyllm pretrain: error:" in line]
    assert r.returncode != 0 and err, r.stderr[-8000:]
    assert err[0] == (f"pyllm pretrain: error: {one / 'ckpt_0000001'}: the run takes 64 tokens per step, which 2 "
                      f"rank(s) x --batch-size 2 x --seq-len 32 = 128 do not divide; resume it on as many ranks as it "
                      f"was saved with (or fewer)")
    assert not (one / "ckpt_0000002").exists()


def test_resume_switches_between_fsdp_and_one_process(data_dir, tmp_path, one_process):
    """One process to step 2, 2 --fsdp ranks to step 3, 2 DDP ranks (--no-fsdp) to step 4: the losses are the
    one-process run's.
    The two save the optimizer state keyed differently (by parameter number; by name, gathered from the shards), and
    each refused the other's: --fsdp on a one-process or DDP checkpoint said "corrupt trainer state (optimizer param
    group 0 lists parameters [0, 1, ...]", one process on an --fsdp checkpoint "resume it with --fsdp under torchrun".
    """
    from packaging.version import Version
    from pyllm.pretrain import FSDP_MIN_TORCH
    if Version(torch.__version__).release < Version(FSDP_MIN_TORCH).release:
        pytest.skip(f"--fsdp needs torch >= {FSDP_MIN_TORCH}")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYLLM_PROGRESS="0")
    out = tmp_path / "o"
    flags = ["pretrain", "--data", str(data_dir), "--dim", "32", *DIST, "--out", str(out)]
    assert cli(flags + ["--stop-at", "2"]) == 0
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
                        "pyllm", *flags, "--fsdp", "--resume", "--stop-at", "3"], capture_output=True, text=True,
                       env=env, timeout=240)
    assert r.returncode == 0, r.stderr[-8000:]
    assert json.loads((out / "ckpt_0000003" / "trainer_state.json").read_text())["fsdp"]
    # and on to 2 DDP ranks: --fsdp was restored from the run's flags with no way to turn it off
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
                        "pyllm", *flags, "--no-fsdp", "--resume"], capture_output=True, text=True, env=env, timeout=240)
    assert r.returncode == 0, r.stderr[-8000:]
    assert not json.loads((out / "ckpt_0000004" / "trainer_state.json").read_text()).get("fsdp")
    losses = _losses(out)
    assert len(losses) == 4 and max(abs(a - b) for a, b in zip(one_process, losses)) < 1e-5


_KILL_RANK_1 = """
import os, signal, sys
if os.environ.get("RANK") == "1":  # SIGKILL at the 3rd batch this rank loads (mid-run, the other rank in a collective)
    import builtins
    _import = builtins.__import__

    def _hook(name, *a, **k):
        m = _import(name, *a, **k)
        data = sys.modules.get("pyllm.data")
        if hasattr(data, "PackedLoader") and not hasattr(data, "_kill_hook"):
            data._kill_hook, next_batch, n = True, data.PackedLoader.next_batch, [0]

            def killed(self, *a, **k):
                n[0] += 1
                if n[0] == 3:
                    os.kill(os.getpid(), signal.SIGKILL)
                return next_batch(self, *a, **k)
            data.PackedLoader.next_batch = killed
        return m
    builtins.__import__ = _hook
"""


def test_a_rank_killed_mid_run_ends_the_other_with_one_line(data_dir, tmp_path):
    """Rank 1 SIGKILLed mid-run: rank 0, inside a collective with it, printed a 30-line traceback from inside torch
    (DDP's broadcast: "RuntimeError: [.../gloo/transport/tcp/pair.cc:537] Read error ...: Connection reset by peer.
    ... GLHF!"). Now one line saying another process of the run is gone. (--monitor-interval 3: torchrun stops the
    ranks left only after rank 0 has seen the loss itself.)"""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_KILL_RANK_1)
    env = dict(os.environ, PYTHONPATH=f"{hook}:{ROOT}", OMP_NUM_THREADS="1", PYLLM_PROGRESS="0")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "--monitor-interval", "3", "-m", "pyllm", "pretrain", "--data", str(data_dir), "--dim", "32",
                        *DIST, "--out", str(tmp_path / "o")], capture_output=True, text=True, env=env, timeout=240)
    assert r.returncode != 0
    assert "exitcode  : -9" in r.stderr, r.stderr[-8000:]
    err = [line for line in r.stderr.splitlines() if line.startswith("pyllm pretrain")]
    assert len(err) == 1 and err[0].startswith("pyllm pretrain: error: another process of the run failed or was "
                                               "stopped (the collective with it broke off: "), r.stderr[-8000:]
    assert "pyllm/pretrain.py" not in r.stderr and "GLHF" not in r.stderr, r.stderr[-8000:]


def test_small_validation_split_skips_eval(data_dir, tmp_path, capsys):
    out = tmp_path / "o"
    assert cli(["pretrain", "--data", str(data_dir), "--out", str(out), *TINY, "--batch-size", "64",
                "--max-steps", "1"]) == 0
    assert "no evaluation: validation split too small" in capsys.readouterr().out
    assert len(_losses(out)) == 1


def test_leftover_of_a_killed_save_is_not_kept_as_a_checkpoint(data_dir, tmp_path):
    """A run killed mid-save leaves ckpt_<step>.tmp-<pid>/; --keep-checkpoints counted it as a checkpoint, so a real
    one was deleted in its place (and the leftover stayed)."""
    out = tmp_path / "o"
    (out / "ckpt_0000009.tmp-999999").mkdir(parents=True)
    assert cli(["pretrain", "--data", str(data_dir), "--out", str(out), *TINY, "--batch-size", "4", "--max-steps",
                "3", "--checkpoint-every", "1", "--keep-checkpoints", "2"]) == 0
    assert sorted(p.name for p in out.glob("ckpt_*")) == ["ckpt_0000002", "ckpt_0000003"]


def test_starting_over_in_a_used_out_dir_warns_and_rotates_its_own_checkpoints(data_dir, tmp_path, capsys):
    """A second run without --resume in the same --out: no word about the earlier run, and --keep-checkpoints deleted
    the new run's checkpoints while it kept the earlier run's later-numbered ones."""
    out = tmp_path / "o"
    args = ["pretrain", "--data", str(data_dir), "--out", str(out), *TINY, "--batch-size", "4", "--checkpoint-every",
            "1", "--keep-checkpoints", "2"]
    assert cli(args + ["--max-steps", "5"]) == 0
    capsys.readouterr()
    assert cli(args + ["--max-steps", "3"]) == 0
    assert f"{out}: holds an earlier run (latest ckpt_0000005); starting over from step 0" in capsys.readouterr().err
    assert sorted(p.name for p in out.glob("ckpt_*")) == ["ckpt_0000002", "ckpt_0000003", "ckpt_0000004",
                                                          "ckpt_0000005"]
    assert (out / "latest").read_text().strip() == "ckpt_0000003"


def test_starting_over_killed_before_its_first_checkpoint_does_not_resume_the_earlier_run(data_dir, tmp_path, capsys,
                                                                                          monkeypatch):
    """A run started over in a used --out and stopped before its first checkpoint: --resume continued the earlier
    run from its latest checkpoint, under the new run's metrics rows (the earlier rows dropped). Now nothing is left
    to resume and --resume says so."""
    from pyllm import pretrain as P
    out = tmp_path / "o"
    args = ["pretrain", "--data", str(data_dir), "--out", str(out), *TINY, "--batch-size", "4", "--max-steps", "4"]
    assert cli(args + ["--checkpoint-every", "2"]) == 0
    assert (out / "latest").read_text().strip() == "ckpt_0000004"

    def killed(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(P, "save", killed)
    assert cli(args + ["--checkpoint-every", "3"]) == 130                  # killed at its first save, step 3
    monkeypatch.undo()
    assert [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())] == [1, 2, 3]
    capsys.readouterr()
    assert cli(args + ["--checkpoint-every", "3", "--resume"]) == 2
    assert f"--resume: no checkpoint at {out / 'latest'}" in capsys.readouterr().err
    assert [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())] == [1, 2, 3]


def test_training_loss_masks_attention_at_document_boundaries(tmp_path, monkeypatch):
    """The step passes the loader's document ids to the model: a training step that called model(x, y) (attention
    across the documents packed into a row) passed every test here. Rows of ~5 short documents; each step's logged
    loss must equal the previous checkpoint's loss on that step's batch WITH the mask (torch backend, independent of
    the kernels) and not the unmasked one."""
    r = random.Random(0)
    (tmp_path / "in.txt").write_text("\n\n".join("".join(r.choice("abcdefgh") for _ in range(r.randint(3, 9)))
                                                 for _ in range(300)))
    prepare([str(tmp_path / "in.txt")], tmp_path / "d", byte_level=True, val_fraction=0.0, doc_sep="\n\n", workers=1)
    batches = []
    next_batch = D.PackedLoader.next_batch

    def spy(self, device="cpu"):
        b = next_batch(self, device)
        batches.append([t.clone() for t in b])
        return b
    monkeypatch.setattr(D.PackedLoader, "next_batch", spy)
    out = tmp_path / "o"
    assert cli(["pretrain", "--data", str(tmp_path / "d"), "--out", str(out), *TINY, "--batch-size", "4",
                "--max-steps", "4", "--lr", "1e-2", "--checkpoint-every", "1", "--keep-checkpoints", "4"]) == 0
    losses = _losses(out)
    assert len(batches) == len(losses) == 4
    gaps = []
    for s in (1, 2, 3):  # logged loss of step s+1 = weights after step s on batch s
        model, _ = load_checkpoint(str(out / f"ckpt_{s:07d}"))
        model.set_backend("torch")
        x, y, d = batches[s]
        assert int(d[:, -1].min()) >= 3  # several documents in every row
        with torch.no_grad():
            masked, unmasked = float(model(x, y, d)[1]), float(model(x, y)[1])
        assert losses[s] == pytest.approx(masked, abs=1e-5)
        gaps.append(abs(losses[s] - unmasked))
    assert max(gaps) > 1e-3  # the mask matters for these weights (about 2e-3 .. 7e-3)


def test_manifest_bos_id_must_be_its_tokenizers(data_dir, tmp_path, capsys):
    """Found by a mutation fuzz of manifest.json: the loader marks document starts by the manifest's bos_id, which
    nothing compared with the tokenizer's; another id trained with attention across documents, exit 0."""
    import shutil
    d = tmp_path / "d"
    shutil.copytree(data_dir, d)
    man = json.loads((d / "manifest.json").read_text())
    (d / "manifest.json").write_text(json.dumps({**man, "bos_id": 3}))
    assert cli(["pretrain", "--data", str(d), "--out", str(tmp_path / "o"), *TINY, "--batch-size", "2",
                "--max-steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{d / 'manifest.json'}: corrupt manifest (bos_id 3, but its tokenizer.json's bos token " \
                             f"is {man['bos_id']})" in err[0], err
    assert not (tmp_path / "o").exists()


def test_fsdp_optimizer_state_is_checked_before_torch_takes_it(tmp_path):
    """Found by a mutation fuzz of a 2-rank --fsdp checkpoint's trainer state: its optimizer state (keyed by parameter
    name) went to set_optimizer_state_dict unchecked, where the one-process resume checks it. A NaN or negative moment
    trained on ("loss is nan ...; lower --lr", or with --stop-at the next step an all-NaN checkpoint and exit 0), an
    int32 one was truncated in, "betas": "x", a parameter's state missing or a moment of another shape were
    tracebacks from inside torch, "maximize": true or shuffled "params" trained on silently. The check reads names
    and shapes only, so a plain model stands in for the sharded one here (tests/test_pretrain.py's 2-rank run covers
    the resume itself)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_optimizer_state_dict)

    from pyllm.config import ModelConfig
    from pyllm.model import GPT
    from pyllm.pretrain import _flatten_fsdp, _unflatten_fsdp, make_optimizer
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=40, dim=16, n_layers=1, n_heads=2, max_seq_len=8))
    opt = make_optimizer(model, 1e-3, 0.1, (0.9, 0.95), "torch", torch.device("cpu"))
    x = torch.randint(0, 40, (2, 8))
    model(x, x)[1].backward()
    opt.step()
    o = StateDictOptions(full_state_dict=True, cpu_offload=True)
    tensors, meta = _flatten_fsdp(get_optimizer_state_dict(model, opt, options=o))
    tensors, meta = {k: v.clone() for k, v in tensors.items()}, json.loads(json.dumps(meta))
    m = "optim.layers.0.mlp.up_proj.weight"
    tf, tj = tmp_path / "trainer_state.safetensors", tmp_path / "trainer_state.json"

    def nan(t):
        t = t.clone()
        t[3] = float("nan")
        return t
    without = lambda d, *ks: {k: v for k, v in d.items() if k not in ks}  # noqa: E731
    g0 = meta["param_groups"][0]
    for t, mt, want in (
            ({**tensors, m + ".exp_avg": nan(tensors[m + ".exp_avg"])}, meta,
             f"{tf}: tensor '{m}.exp_avg' holds NaN, infinite or"),
            ({**tensors, m + ".exp_avg_sq": -tensors[m + ".exp_avg_sq"] - 1}, meta,
             f"{tf}: tensor '{m}.exp_avg_sq' holds NaN, infinite or"),
            ({**tensors, m + ".exp_avg": tensors[m + ".exp_avg"].to(torch.int32)}, meta,
             f"{tf}: tensor '{m}.exp_avg' has dtype torch.int32, expected a float tensor"),
            (tensors, {**meta, "shapes": without(meta["shapes"], *(f"{m}.{k}" for k in ("step", "exp_avg",
                                                                                     "exp_avg_sq")))},
             f"{tf}: missing tensor '{m}.exp_avg'"),
            (tensors, {**meta, "shapes": without(meta["shapes"], m + ".step")}, f"{tf}: missing tensor '{m}.step'"),
            (tensors, {**meta, "shapes": {**meta["shapes"], m + ".exp_avg": meta["shapes"][m + ".exp_avg"][::-1]}},
             f"{tf}: tensor '{m}.exp_avg' has shape"),
            (tensors, {**meta, "shapes": {**meta["shapes"], "optim.nope.exp_avg": [1]}},
             "'optim.nope.exp_avg' names no parameter being trained"),
            (tensors, {**meta, "param_groups": [{**g0, "betas": "x"}, *meta["param_groups"][1:]]},
             f"{tj}: corrupt trainer state (optimizer param group 0 has betas 'x'"),
            (tensors, {**meta, "param_groups": [{**g0, "maximize": True}, *meta["param_groups"][1:]]},
             f"{tj}: corrupt trainer state (optimizer param group 0 has maximize True"),
            (tensors, {**meta, "param_groups": [{**g0, "params": g0["params"][::-1]}, *meta["param_groups"][1:]]},
             f"{tj}: corrupt trainer state (optimizer param group 0 lists parameters"),
            (tensors, {**meta, "param_groups": meta["param_groups"][:1]},
             f"{tj}: corrupt trainer state (optimizer param_groups: expected a list of 2 objects)")):
        if "optim.nope.exp_avg" in mt["shapes"]:
            t = {**t, "optim.nope.exp_avg": torch.zeros(1)}
        with pytest.raises(ValueError) as e:
            _unflatten_fsdp(model, opt, t, mt, tmp_path)
        assert want in str(e.value), (want, str(e.value))
    before = {k: v.clone() for k, v in opt.state_dict()["state"][0].items()}
    set_optimizer_state_dict(model, opt, _unflatten_fsdp(model, opt, tensors, meta, tmp_path),
                             options=StateDictOptions(full_state_dict=True))
    assert all(torch.equal(before[k], v) for k, v in opt.state_dict()["state"][0].items())
