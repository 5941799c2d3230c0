"""Reward model: last-real-token head (left == right padding), Bradley-Terry learns a separable set, score CLI."""
from __future__ import annotations

import json
import random

import pytest
import torch

from pyllm.reward import RewardModel, load_reward_model, pad_batch
from pyllm.sft import read_metrics

from chat_util import cli, tiny_checkpoint, tiny_model, write_jsonl


def test_left_and_right_padding_give_the_same_reward(rng):
    model, tok = tiny_model(seed=2)
    rm = RewardModel(model).eval()
    seqs = [torch.randint(0, 256, (n,), generator=rng).tolist() for n in (3, 11, 7, 1, 16)]
    pad = tok.special_ids["<|pad|>"]
    with torch.no_grad():
        r_right = rm(*pad_batch(seqs, pad, "right"))
        r_left = rm(*pad_batch(seqs, pad, "left"))
        r_alone = torch.stack([rm(*pad_batch([s], pad)) for s in seqs]).flatten()
    torch.testing.assert_close(r_left, r_right, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(r_right, r_alone, rtol=1e-4, atol=1e-5)
    # the pad token's identity must not matter either (it is masked out, not merely "usually ignored")
    with torch.no_grad():
        r_other_pad = rm(*pad_batch(seqs, 65, "left"))
    torch.testing.assert_close(r_other_pad, r_right, rtol=1e-4, atol=1e-5)
    # and the reward does depend on the last real token (the head is not reading a pad position)
    s2 = [s[:-1] + [(s[-1] + 1) % 256] for s in seqs]
    with torch.no_grad():
        assert not torch.allclose(rm(*pad_batch(s2, pad, "left")), r_left)


def _prefs(n, seed):
    R = random.Random(seed)
    word = lambda alpha: "".join(R.choice(alpha) for _ in range(R.randint(3, 10)))  # noqa: E731
    rows = []
    for i in range(n):
        good, bad = word("aeiou"), word("xzqkw")
        row = {"prompt": f"pick {word('0123456789')}", "chosen": good, "rejected": bad}
        if i % 3 == 0:  # message-list form and a margin on some lines
            row = {"prompt": [{"role": "user", "content": row["prompt"]}],
                   "chosen": [{"role": "assistant", "content": good}],
                   "rejected": [{"role": "assistant", "content": bad}], "margin": 0.5}
        rows.append(row)
    return rows


def test_reward_model_learns_separable_preferences(tmp_path, capsys):
    base = tiny_checkpoint(tmp_path / "base")
    write_jsonl(tmp_path / "train.jsonl", _prefs(160, 0))
    write_jsonl(tmp_path / "eval.jsonl", _prefs(60, 1))
    out = tmp_path / "rm"
    assert cli(["reward", "--model", str(base), "--data", str(tmp_path / "train.jsonl"), "--eval-data",
                str(tmp_path / "eval.jsonl"), "--out", str(out), "--steps", "30", "--lr", "3e-3",
                "--batch-size", "8", "--eval-every", "15"]) == 0
    rows = read_metrics(out / "metrics.jsonl")
    assert rows[-1]["eval_accuracy"] > 0.9 and rows[-1]["eval_margin"] > 0
    assert (out / "reward_head.safetensors").is_file()
    # the reloaded RM scores the held-out pairs the same way, and its loss is Bradley-Terry
    rm, tok = load_reward_model(out, torch.device("cpu"))
    pair = [{"role": "user", "content": "pick 12"}]
    from pyllm.chat import render
    ic = render(pair + [{"role": "assistant", "content": "aeiea"}], tok)[0]
    ir = render(pair + [{"role": "assistant", "content": "xqzkw"}], tok)[0]
    with torch.no_grad():
        r = rm(*pad_batch([ic, ir], 0))
    assert r[0] > r[1]
    # pyllm score writes a reward per line, passing other fields through
    write_jsonl(tmp_path / "s.jsonl", [{"prompt": "pick 3", "response": "aaoe", "id": 7},
                                       {"prompt": "pick 3", "response": "zzxk", "id": 8}])
    assert cli(["score", "--reward-model", str(out), "--data", str(tmp_path / "s.jsonl"), "--out",
                str(tmp_path / "scored.jsonl")]) == 0
    scored = [json.loads(l) for l in (tmp_path / "scored.jsonl").read_text().splitlines()]
    assert [s["id"] for s in scored] == [7, 8] and scored[0]["reward"] > scored[1]["reward"]
    # preference lines: both replies scored, as response lines score them (only "chosen" was, as "reward")
    assert cli(["score", "--reward-model", str(out), "--data", str(tmp_path / "eval.jsonl"), "--out",
                str(tmp_path / "pairs.jsonl")]) == 0
    pairs = [json.loads(l) for l in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    src = _prefs(60, 1)
    assert len(pairs) == 60 and all("reward" not in p for p in pairs)
    assert [{k: p[k] for k in src[0] if k in p} for p in pairs[:2]] == [src[0], {**src[1]}]
    right = sum(p["reward_chosen"] > p["reward_rejected"] for p in pairs)
    assert right > 0.9 * 60 and f"chosen > rejected in {right} of 60 pairs" in capsys.readouterr().err
    write_jsonl(tmp_path / "as_responses.jsonl", [{"prompt": r["prompt"], "response": r[k]} for r in src[:3]
                                                  for k in ("chosen", "rejected")])
    assert cli(["score", "--reward-model", str(out), "--data", str(tmp_path / "as_responses.jsonl"), "--out",
                str(tmp_path / "as_responses_scored.jsonl")]) == 0
    single = [json.loads(l)["reward"] for l in (tmp_path / "as_responses_scored.jsonl").read_text().splitlines()]
    got = [p[k] for p in pairs[:3] for k in ("reward_chosen", "reward_rejected")]
    assert max(abs(a - b) for a, b in zip(single, got)) < 1e-5


def test_head_bias_is_not_trained(tmp_path):
    """Bradley-Terry sees only r_chosen - r_rejected, so the head's bias has no gradient but rounding noise, which
    AdamW turned into steps of ~lr: every reward's offset wandered and came out another with 2 ranks than with 1
    process (by 1e-2 after 3 steps at --lr 1e-2). The bias stays at its initial 0."""
    from pyllm.safetensors_io import load_file
    base = tiny_checkpoint(tmp_path / "base")
    write_jsonl(tmp_path / "p.jsonl", _prefs(12, 0))
    out = tmp_path / "rm"
    assert cli(["reward", "--model", str(base), "--data", str(tmp_path / "p.jsonl"), "--out", str(out), "--steps", "3",
                "--lr", "1e-2", "--batch-size", "4", "--eval-frac", "0", "--lora-r", "2"]) == 0
    assert load_file(str(out / "reward_head.safetensors"))["bias"].item() == 0.0


@pytest.mark.parametrize("stage", ["reward", "dpo"])
def test_pair_stage_resume_on_another_number_of_processes_is_refused(tmp_path, stage, capsys):
    """A run saved by 2 processes (--batch-size pairs each a step) resumed by one went on with half the pairs a step,
    twice the steps and another data order, without a word; now a one-line error naming --out. (The checkpoint's
    world_size is set by hand: tests/test_sft.py saves one with 2 real ranks.)"""
    base = tiny_checkpoint(tmp_path / "base")
    data = write_jsonl(tmp_path / "p.jsonl", _prefs(12, 0))
    out = tmp_path / "o"
    args = [stage, "--model", str(base), "--data", str(data), "--out", str(out), "--batch-size", "2", "--eval-frac",
            "0", "--lora-r", "0"]
    assert cli(args + ["--steps", "1"]) == 0
    tj = out / "trainer_state.json"
    st = json.loads(tj.read_text())
    assert st["world_size"] == 1
    tj.write_text(json.dumps({**st, "world_size": 2}))
    capsys.readouterr()
    assert cli(args + ["--steps", "2", "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"pyllm {stage}: error: {out}: the run was saved by 2 process(es), this resume runs 1 (each takes "
                   f"--batch-size a step: the steps and data order would change); resume it with torchrun "
                   f"--nproc-per-node 2"]
    tj.write_text(json.dumps({**st, "world_size": "2"}))
    assert cli(args + ["--steps", "2", "--resume"]) == 2
    assert f"{tj}: corrupt trainer state (world_size '2')" in capsys.readouterr().err

@pytest.mark.parametrize("stage, lora_r", [("reward", "0"), ("reward", "2"), ("dpo", "0"), ("dpo", "2")])
def test_pair_stage_resume_matches_uninterrupted_run(tmp_path, stage, lora_r):
    """reward / dpo, interrupted after the step-3 checkpoint and resumed: the same weights (reward head, adapters,
    optimizer state) and metrics rows (eval rows, lr through warmup and decay) as the uninterrupted 5 steps."""
    import importlib

    from chat_util import ctrl_c_after_save
    from pyllm.safetensors_io import load_file
    base = tiny_checkpoint(tmp_path / "base")
    data = write_jsonl(tmp_path / "p.jsonl", _prefs(16, 0))
    args = [stage, "--model", str(base), "--data", str(data), "--lr", "1e-2", "--batch-size", "3", "--steps", "5",
            "--warmup-steps", "2", "--eval-frac", "0.2", "--eval-every", "2", "--lora-r", lora_r]
    assert cli(args + ["--out", str(tmp_path / "full")]) == 0
    with ctrl_c_after_save(importlib.import_module(f"pyllm.{stage}"), 3):
        assert cli(args + ["--out", str(tmp_path / "resumed"), "--save-every", "3"]) == 130
    assert cli(args + ["--out", str(tmp_path / "resumed"), "--resume"]) == 0
    names = sorted(p.name for p in (tmp_path / "full").glob("*.safetensors"))
    assert ("adapter_model.safetensors" in names) == (lora_r != "0")
    for name in names:
        a, b = (load_file(str(tmp_path / d / name)) for d in ("full", "resumed"))
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=f"{name} {k}")
    rows_a, rows_b = (read_metrics(tmp_path / d / "metrics.jsonl") for d in ("full", "resumed"))
    assert [r["step"] for r in rows_b] == [1, 2, 3, 4, 5] and "eval_accuracy" in rows_b[3]
    assert rows_b == [pytest.approx(r, rel=1e-5, abs=1e-6) for r in rows_a]


def test_bradley_terry_margin_matches_formula(rng):
    """The reward loss is mean(log(1 + exp(-(r_chosen - r_rejected - margin)))). This test compared torch's
    logsigmoid with log1p(exp) and never called pyllm, so a margin added instead of subtracted passed."""
    from pyllm.reward import bradley_terry_loss
    rc, rr = torch.randn(5, generator=rng), torch.randn(5, generator=rng)
    m = 0.5 + torch.rand(5, generator=rng)
    want = torch.log1p(torch.exp(-(rc - rr - m))).mean()
    torch.testing.assert_close(bradley_terry_loss(rc, rr, m), want)
    torch.testing.assert_close(bradley_terry_loss(rc, rr, torch.zeros(5)), torch.log1p(torch.exp(rr - rc)).mean())


@pytest.mark.parametrize("line, problem", [
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "identical"),
    ({"prompt": "q", "chosen": "a"}, "missing 'rejected'"),
    ({"prompt": [{"role": "robot", "content": "q"}], "chosen": "a", "rejected": "b"}, "unknown role"),
    ({"prompt": "q" * 400, "chosen": "a", "rejected": "b"}, "longer than the context"),
    ({"prompt": "q", "chosen": "", "rejected": "b"}, "empty assistant"),
])
def test_bad_preference_lines(tmp_path, capsys, line, problem):
    base = tiny_checkpoint(tmp_path / "base")
    good = {"prompt": "q", "chosen": "a", "rejected": "b"}
    data = write_jsonl(tmp_path / "p.jsonl", [good, good, line])
    args = ["reward", "--model", str(base), "--data", str(data), "--out", str(tmp_path / "o"), "--steps", "1"]
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert f"{data}:3:" in err and problem in err
    assert cli(args + ["--skip-bad-lines"]) == 0


def test_attention_mask_shape_is_checked(rng):
    """Session 30 audit: a 1-D mask was an IndexError; a mask of another shape an error about 'doc_ids'."""
    from chat_util import tiny_model
    from pyllm.reward import RewardModel
    model, _ = tiny_model()
    rm = RewardModel(model)
    idx = torch.randint(0, 50, (2, 6), generator=rng)
    for bad in (torch.ones(6), torch.ones(2, 5), [1] * 6):
        with pytest.raises(ValueError, match=r"reward model attention_mask: expected shape \(2, 6\)"):
            rm(idx, bad)
