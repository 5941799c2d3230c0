"""RL: a Python reward function drives PPO and GRPO (mean reward rises, KL to the reference stays bounded),
the reward-model path, GAE, and bad prompts."""
from __future__ import annotations

import math

import pytest
import torch

from pyllm.checkpoint import load_checkpoint
from pyllm.rl import gae, grpo_advantages, whiten
from pyllm.sft import read_metrics

from chat_util import assert_clean_exit, cli, ctrl_c_after_save, exit_probe, tiny_checkpoint, write_jsonl

REWARD_FN = '''
def frac_target(prompt, response, target, **extra):
    """The toy reward: the fraction of response characters equal to this line's target."""
    assert isinstance(prompt, str) and prompt.startswith("write"), prompt
    assert "tag" in extra
    return sum(c == target for c in response) / max(1, len(response))
'''


def _setup(tmp_path):
    base = tiny_checkpoint(tmp_path / "base", max_seq_len=48)
    fn = tmp_path / "toy_reward.py"
    fn.write_text(REWARD_FN)
    prompts = write_jsonl(tmp_path / "prompts.jsonl",
                          [{"prompt": f"write {i}", "target": "a", "tag": i} for i in range(16)])
    return base, f"{fn}:frac_target", prompts


@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_custom_reward_fn_drives_rl_and_kl_stays_bounded(tmp_path, algo):
    base, fn, prompts = _setup(tmp_path)
    out = tmp_path / algo
    assert cli(["rl", "--algo", algo, "--policy", str(base), "--reward-fn", fn, "--prompts", str(prompts),
                "--out", str(out), "--steps", "16", "--lr", "1e-2", "--batch-size", "8", "--num-samples", "4",
                "--max-new-tokens", "8", "--kl-coef", "0.005", "--seed", "3"]) == 0
    rows = read_metrics(out / "metrics.jsonl")
    assert len(rows) == 16
    first = sum(r["reward"] for r in rows[:3]) / 3
    last = sum(r["reward"] for r in rows[-3:]) / 3
    assert last > 0.05 and last > 4 * first, (first, last)
    assert abs(rows[0]["kl"]) < 1e-4                              # policy == reference before the first update
    assert all(r["kl"] / r["response_length"] < 3.0 for r in rows)  # nats per token
    for key in ("clip_frac", "entropy", "response_length", "fn_score"):
        assert key in rows[-1]
    assert ("vf_loss" in rows[-1]) == (algo == "ppo")
    assert (out / "model.safetensors").is_file() and (out / "rl_reward.png").is_file()
    assert (out / "value_head.safetensors").is_file() == (algo == "ppo")


def test_rl_with_reward_model_and_lora(tmp_path):
    base, fn, prompts = _setup(tmp_path)
    write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": "q", "chosen": "aa", "rejected": "zz"}] * 4)
    assert cli(["reward", "--model", str(base), "--data", str(tmp_path / "prefs.jsonl"), "--out",
                str(tmp_path / "rm"), "--steps", "2", "--eval-frac", "0"]) == 0
    out = tmp_path / "rl"
    args = ["rl", "--policy", str(base), "--reward-model", str(tmp_path / "rm"), "--reward-fn", fn, "--prompts",
            str(prompts), "--out", str(out), "--batch-size", "2", "--num-samples", "2", "--max-new-tokens", "6",
            "--lora-r", "2"]
    assert cli(args + ["--steps", "2"]) == 0
    assert cli(args + ["--steps", "3", "--resume"]) == 0
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3] and "rm_score" in rows[0] and "fn_score" in rows[0]
    assert (out / "adapter_model.safetensors").is_file()


def test_gae_matches_reward_to_go_and_whitening():
    r = torch.tensor([[0.0, 1.0, 2.0, 3.0, 0.0]])
    m = torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.0]])
    v = torch.zeros_like(r)
    adv, ret = gae(r, v, m, gamma=1.0, lam=1.0)
    torch.testing.assert_close(adv, torch.tensor([[0.0, 6.0, 5.0, 3.0, 0.0]]))
    v = torch.tensor([[9.0, 1.0, 1.0, 1.0, 9.0]])
    adv, ret = gae(r, v, m, gamma=0.5, lam=0.0)  # one-step TD errors; values outside the mask are not used
    torch.testing.assert_close(adv, torch.tensor([[0.0, 0.5, 1.5, 2.0, 0.0]]))
    w = whiten(torch.tensor([[5.0, 1.0, 2.0, 3.0]]), torch.tensor([[0.0, 1.0, 1.0, 1.0]]))
    assert w[0, 0] == 0 and abs(float(w[0, 1:].mean())) < 1e-6


WHITEN_TWO_RANKS = """
import sys, torch, torch.distributed as td, torch.multiprocessing as mp
from pyllm.rl import whiten
def run(rank, path, x, m):
    td.init_process_group("gloo", init_method="file://" + path, rank=rank, world_size=2)
    rows = slice(0, 1) if rank == 0 else slice(1, 4)      # unequal shares: rank 0 holds 1 row, rank 1 three
    torch.save(whiten(x[rows], m[rows], distributed=True), path + f".{rank}")
    td.destroy_process_group()
if __name__ == "__main__":
    g = torch.Generator().manual_seed(0)
    x, m = torch.randn(4, 6, generator=g) * 3 + 1, (torch.rand(4, 6, generator=g) < 0.7).float()
    mp.spawn(run, args=(sys.argv[1], x, m), nprocs=2)
    torch.save((x, m), sys.argv[1] + ".in")
"""


def test_whiten_across_ranks_equals_one_batch(tmp_path):
    """PPO's advantage whitening under torchrun uses every rank's statistics: 2 gloo ranks holding 1 and 3 rows give
    what one process gives for the 4 rows (each rank whitening alone would not)."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    script = tmp_path / "w.py"
    script.write_text(WHITEN_TWO_RANKS)
    path = str(tmp_path / "store")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, str(script), path], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    x, m = torch.load(path + ".in")
    got = torch.cat([torch.load(path + ".0"), torch.load(path + ".1")])
    want = whiten(x, m)
    torch.testing.assert_close(got, want)
    assert not torch.allclose(torch.cat([whiten(x[:1], m[:1]), whiten(x[1:], m[1:])]), want, atol=1e-3)


def test_rl_bad_prompts(tmp_path, capsys):
    base, fn, _ = _setup(tmp_path)
    p = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "write 1", "target": "a", "tag": 1},
                                           {"prompt": "write " + "x" * 60, "target": "a", "tag": 2}])
    args = ["rl", "--policy", str(base), "--reward-fn", fn, "--prompts", str(p), "--out", str(tmp_path / "o"),
            "--steps", "1", "--max-new-tokens", "8", "--batch-size", "1"]
    assert cli(args) == 2
    assert f"{p}:2:" in capsys.readouterr().err
    assert cli(args + ["--skip-bad-lines"]) == 0
    assert cli(args[:3] + args[5:]) == 2  # neither --reward-model nor --reward-fn
    assert "give --reward-model and/or --reward-fn" in capsys.readouterr().err


def test_grpo_advantage_scales():
    s = torch.tensor([1.0, 0.0, 0.0, 0.0, 5.0, 5.0, 5.0, 5.0, 0.0, 2.0, 4.0, 6.0])   # 3 groups of 4
    g = grpo_advantages(s, 4, "group").view(3, 4)
    assert torch.allclose(g.sum(1), torch.zeros(3), atol=1e-5)
    assert torch.allclose(g[0].std(), torch.tensor(1.0), atol=1e-3) and torch.allclose(g[2].std(),
                                                                                      torch.tensor(1.0), atol=1e-3)
    assert torch.equal(g[1], torch.zeros(4))                                    # a uniform group: no advantage
    n = grpo_advantages(s, 4, "none").view(3, 4)
    torch.testing.assert_close(n[2], torch.tensor([-3.0, -1.0, 1.0, 3.0]))
    b = grpo_advantages(s, 4, "batch")
    torch.testing.assert_close(b, n.reshape(-1) / (s.std() + 1e-4))
    with pytest.raises(ValueError):
        grpo_advantages(s, 4, "token")


def _rm(tmp_path, base):
    write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": "q", "chosen": "aa", "rejected": "zz"}] * 4)
    assert cli(["reward", "--model", str(base), "--data", str(tmp_path / "prefs.jsonl"), "--out",
                str(tmp_path / "rm"), "--steps", "2", "--eval-frac", "0", "--lr", "1e-2"]) == 0
    return tmp_path / "rm"


def test_filter_groups_ignores_rm_noise_without_verifier_signal(tmp_path):
    """A reward fn that is the same for every sample carries no signal: with --filter-groups GRPO leaves the policy
    alone although the RM scores differ; without it the group-normalised RM differences move the policy.
    --reward-model-weight 0 leaves the fn score alone in the reward."""
    base, _, prompts = _setup(tmp_path)
    (tmp_path / "const.py").write_text("def const(prompt, response, **kw):\n    return 1.0\n")
    rm = _rm(tmp_path, base)
    moved = {}
    for flt in (False, True):
        out = tmp_path / f"f{int(flt)}"
        assert cli(["rl", "--algo", "grpo", "--policy", str(base), "--reward-model", str(rm), "--reward-fn",
                    f"{tmp_path / 'const.py'}:const", "--prompts", str(prompts), "--out", str(out), "--steps", "2",
                    "--lr", "1e-2", "--batch-size", "4", "--num-samples", "4", "--max-new-tokens", "6",
                    "--kl-coef", "0.1", "--seed", "1"] + (["--filter-groups"] if flt else [])) == 0
        a, _ = load_checkpoint(str(base))
        b, _ = load_checkpoint(str(out))
        moved[flt] = max(float((p - q).detach().abs().max()) for p, q in zip(a.parameters(), b.parameters()))
        rows = read_metrics(out / "metrics.jsonl")
        assert ("kept_groups" in rows[0]) == flt and all(r.get("kept_groups", 0.0) == 0.0 for r in rows)
    assert moved[False] > 1e-4 and moved[True] == 0.0, moved
    out = tmp_path / "w0"
    assert cli(["rl", "--algo", "grpo", "--policy", str(base), "--reward-model", str(rm), "--reward-fn",
                f"{tmp_path / 'const.py'}:const", "--prompts", str(prompts), "--out", str(out), "--steps", "1",
                "--batch-size", "2", "--num-samples", "2", "--max-new-tokens", "4", "--reward-model-weight", "0"]) == 0
    r = read_metrics(out / "metrics.jsonl")[0]
    assert r["reward"] == pytest.approx(1.0) and abs(r["rm_score"]) > 1e-6


def test_batched_rollout_keeps_each_prompts_group_together(tmp_path):
    """rollout() batches prompts of equal length into one generate call; greedy, every sample of a prompt must be
    what generate gives for that prompt alone, the k samples of a prompt consecutive, prompt order kept."""
    import argparse
    from pyllm.chat import render
    from pyllm.rl import rollout
    base, _, _ = _setup(tmp_path)
    model, tok = load_checkpoint(str(base))
    model.eval()
    texts = ["write 1", "write 22", "write 3", "write 4444", "write 55", "w"]   # three distinct lengths, mixed
    prompts = [(10 + i, render([{"role": "user", "content": t}], tok, add_generation_prompt=True)[0])
               for i, t in enumerate(texts)]
    args = argparse.Namespace(max_new_tokens=7, temperature=0.0, top_k=0)
    out = rollout(model, tok, prompts, 3, args, seed=5, device="cpu")
    assert [o[0] for o in out] == [pi for pi, _ in prompts for _ in range(3)]
    end = tok.special_ids["<|end|>"]
    for j, (pi, ids) in enumerate(prompts):
        want = model.generate(torch.tensor([ids]), 7, temperature=0.0, stop_tokens=(end,))[0, len(ids):].tolist()
        if end in want:
            want = want[:want.index(end) + 1]
        for o in out[3 * j:3 * j + 3]:
            assert o[1] == ids and o[2] == want, (texts[j], o[2], want)



@pytest.mark.parametrize("k", [1, 3])
def test_generate_num_samples_prefills_once_and_matches_repeated_prompts(isa, rng, k):
    """generate(idx, num_samples=k) (the rollouts' shared prefill: the prompt's KV cache copied to its k rows) must
    sample exactly what generate gives the prompts repeated k times (same seed: the sampler's RNG is per row), with
    the same log-probs and stop handling, on every ISA path and odd sizes."""
    from pyllm.config import ModelConfig
    from pyllm.model import GPT
    seed = int(torch.randint(0, 2 ** 31 - 1, (1,), generator=rng))
    torch.manual_seed(seed)
    c = ModelConfig(vocab_size=37, dim=24, n_layers=2, n_heads=3, n_kv_heads=1, hidden_dim=40, max_seq_len=32)
    model = GPT(c).eval()
    for p_ in model.parameters():
        p_.data.mul_(8.0)                                   # peaked logits: rows diverge and some hit the stop token
    idx = torch.randint(0, 37, (5, 7), generator=rng)
    a, la = model.generate(idx, 9, temperature=1.0, seed=seed, stop_tokens=(3, 4), return_logprobs=True,
                           num_samples=k)
    b, lb = model.generate(idx.repeat_interleave(k, 0), 9, temperature=1.0, seed=seed, stop_tokens=(3, 4),
                           return_logprobs=True)
    assert a.shape == (5 * k, 7 + la.shape[1]) and torch.equal(a, b)
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-5)
    if k > 1:   # the k samples of a prompt are not copies (a flat distribution, so a tie is ~impossible)
        d = model.generate(idx, 9, temperature=5.0, seed=seed, num_samples=k)
        assert any(len({tuple(r) for r in d[i * k:(i + 1) * k].tolist()}) > 1 for i in range(5))
    with pytest.raises(ValueError, match="num_samples"):
        model.generate(idx, 2, num_samples=0)


PARITY_FN = '''
def parity(prompt, response, tag, **extra):
    """Even tags: a constant (no spread, dropped by --prefilter-samples); odd tags: varies with the response."""
    return 0.5 if tag % 2 == 0 else float(sum(map(ord, response)) % 7)
'''


def test_prefilter_keeps_prompts_with_verifier_spread(tmp_path, capsys):
    base, _, prompts = _setup(tmp_path)
    (tmp_path / "par.py").write_text(PARITY_FN)
    args = ["rl", "--algo", "grpo", "--policy", str(base), "--reward-fn", f"{tmp_path / 'par.py'}:parity",
            "--prompts", str(prompts), "--out", str(tmp_path / "o"), "--steps", "1", "--batch-size", "2",
            "--num-samples", "2", "--max-new-tokens", "8", "--seed", "2"]
    assert cli(args + ["--prefilter-samples", "4"]) == 0
    assert "prefilter kept 8 of 16 prompts" in capsys.readouterr().out
    (tmp_path / "const.py").write_text("def const(prompt, response, **kw):\n    return 1.0\n")
    bad = args[:6] + [f"{tmp_path / 'const.py'}:const"] + args[7:]
    assert cli(bad + ["--prefilter-samples", "4"]) == 2
    assert "no prompt has a spread" in capsys.readouterr().err
    assert cli(bad[:5] + bad[7:] + ["--reward-model", str(_rm(tmp_path, base)), "--prefilter-samples", "4"]) == 2
    assert "--prefilter-samples needs --reward-fn" in capsys.readouterr().err


def test_rft_select_keeps_each_distinct_verified_reply_once_per_prompt():
    from pyllm.rl import rft_select
    # 3 groups of k=4: group 0 two correct copies of one reply + one other correct reply; group 1 none; group 2 all
    resp = [[1, 2], [1, 2], [3], [9], [5], [6], [7], [8], [4], [4], [4, 0], [4]]
    ok = torch.tensor([1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 1, 1], dtype=torch.bool)
    sel, w, frac = rft_select(resp, ok, 4)
    assert sel == [0, 2, 8, 10] and w == [0.5, 0.5, 0.5, 0.5] and frac == pytest.approx(2 / 3)
    sel, w, frac = rft_select(resp, ok, 4, drop_solved=True)     # group 2 is solved by every sample
    assert sel == [0, 2] and w == [0.5, 0.5] and frac == pytest.approx(1 / 3)
    assert rft_select(resp, torch.zeros(12, dtype=torch.bool), 4) == ([], [], 0.0)


FIRST_A = '''
def first_a(prompt, response, **extra):
    """Verified when the reply starts with a lowercase letter (pass/fail, like the demo's arithmetic verifier)."""
    return 1.0 if response[:1].islower() else 0.0
'''


def test_rft_raises_verified_success_and_needs_a_verifier(tmp_path, capsys):
    base, _, prompts = _setup(tmp_path)
    (tmp_path / "fa.py").write_text(FIRST_A)
    out = tmp_path / "rft"
    args = ["rl", "--algo", "rft", "--policy", str(base), "--reward-fn", f"{tmp_path / 'fa.py'}:first_a",
            "--prompts", str(prompts), "--out", str(out), "--lr", "3e-2", "--batch-size", "8",
            "--num-samples", "8", "--max-new-tokens", "4", "--ppo-epochs", "1", "--seed", "3"]
    assert cli(args + ["--steps", "16"]) == 0
    rows = read_metrics(out / "metrics.jsonl")
    first = sum(r["fn_full"] for r in rows[:3]) / 3
    last = sum(r["fn_full"] for r in rows[-3:]) / 3
    assert 0 < first < 0.25 and last > 3 * first, (first, last)   # verified success rises (chance ~26/vocab)
    assert all("kept_groups" in r and "entropy" in r for r in rows)
    # a verifier that accepts nothing leaves the policy exactly where it was (zero-weight steps)
    (tmp_path / "no.py").write_text("def no(prompt, response, **kw):\n    return 0.0\n")
    out2 = tmp_path / "none"
    a2 = [x if x != f"{tmp_path / 'fa.py'}:first_a" else f"{tmp_path / 'no.py'}:no" for x in args]
    a2[a2.index(str(out))] = str(out2)
    assert cli(a2 + ["--steps", "2"]) == 0
    a, _ = load_checkpoint(str(base))
    b, _ = load_checkpoint(str(out2))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert all(r["kept_groups"] == 0.0 for r in read_metrics(out2 / "metrics.jsonl"))
    # rft keeps what a program verified: a reward model alone is refused
    rm = _rm(tmp_path, base)
    # ... beside a verifier, the RM is only logged (scored on one sample per prompt): reward = fn + w * RM mean
    out3 = tmp_path / "withrm"
    a3 = args[:]
    a3[a3.index(str(out))] = str(out3)
    assert cli(a3 + ["--steps", "2", "--reward-model", str(rm), "--reward-model-weight", "0.5"]) == 0
    for r in read_metrics(out3 / "metrics.jsonl"):
        assert r["reward"] == pytest.approx(r["fn_score"] + 0.5 * r["rm_score"], abs=1e-5)
    assert cli(["rl", "--algo", "rft", "--policy", str(base), "--reward-model", str(rm), "--prompts", str(prompts),
                "--out", str(tmp_path / "x"), "--steps", "1"]) == 2
    assert "--algo rft needs --reward-fn" in capsys.readouterr().err


def test_rft_select_mode_wrong_keeps_only_groups_whose_plurality_is_wrong():
    from pyllm.rl import rft_select
    # k=4: g0 mode [1] right (3 of 4) -> dropped; g1 mode [2] wrong, one right [1] -> kept; g2 tie [1]/[2] -> kept;
    # g3 mode [1] right, nothing wrong -> dropped; g4 all wrong -> nothing to keep
    resp = [[1], [1], [1], [2], [2], [2], [2], [1], [1], [2], [1], [2], [1], [1], [1], [1], [3], [3], [4], [3]]
    ok = torch.tensor([r == [1] for r in resp])
    sel, w, frac = rft_select(resp, ok, 4, mode_wrong_only=True)
    assert sel == [7, 8] and w == [1.0, 1.0] and frac == pytest.approx(2 / 5)
    assert rft_select(resp, ok, 4)[0] == [0, 7, 8, 12]


def test_rft_select_hard_weight_counts_mostly_failed_prompts_more():
    from pyllm.rl import rft_select
    # k=4: g0 pass rate 3/4 (one distinct reply), g1 1/4, g2 2/4 with two distinct replies, g3 none
    resp = [[1], [1], [1], [2], [3], [1], [3], [3], [1], [4], [2], [3], [5], [6], [7], [8]]
    ok = torch.tensor([1, 1, 1, 0, 0, 1, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0], dtype=torch.bool)
    sel, w, _ = rft_select(resp, ok, 4)
    assert sel == [0, 5, 8, 9] and w == [1.0, 1.0, 0.5, 0.5]
    sel2, w2, _ = rft_select(resp, ok, 4, hard_weight=1.0)
    assert sel2 == sel
    # group scales (1 - rate) = 1/4, 3/4, 2/4, renormalised to mean 1 over the 3 kept groups: x 2
    assert w2 == pytest.approx([0.5, 1.5, 0.5, 0.5])
    assert sum(w2) == pytest.approx(3.0)                  # kept groups' total weight unchanged
    w3 = rft_select(resp, ok, 4, hard_weight=2.0)[1]      # a stronger exponent: the hard group gains more
    assert w3[1] > w2[1] and w3[0] < w2[0]


SPLIT_FN = '''
def split(prompt, response, tag, **extra):
    """Even tags: always verified (solved); odd tags: never."""
    return 1.0 if tag % 2 == 0 else 0.0
'''


def test_hard_prompts_draws_the_prompts_the_policy_fails(tmp_path, capsys):
    base, _, prompts = _setup(tmp_path)
    (tmp_path / "split.py").write_text(SPLIT_FN)
    runs = {}
    for name, extra in (("uniform", []), ("hard", ["--hard-prompts", "2"])):
        out = tmp_path / name
        assert cli(["rl", "--algo", "rft", "--policy", str(base), "--reward-fn", f"{tmp_path / 'split.py'}:split",
                    "--prompts", str(prompts), "--out", str(out), "--steps", "30", "--lr", "1e-5",
                    "--batch-size", "4", "--num-samples", "2", "--max-new-tokens", "2", "--seed", "5", *extra]) == 0
        runs[name] = [r["fn_full"] for r in read_metrics(out / "metrics.jsonl")]
    # uniform epochs (4 steps of 4 of the 16 prompts) draw solved and failed prompts alike: half verified
    assert sum(runs["uniform"][:28]) / 28 == pytest.approx(0.5)
    # hard sampling learns which prompts are solved and draws them rarely ((1.05 - 1)^2 vs (1.05 - 0)^2 weight)
    late = runs["hard"][15:]
    assert sum(late) / len(late) < 0.15, runs["hard"]
    # the pass rates are part of the checkpoint: 15 steps, then --resume to 30, draws what the 30-step run drew
    args = ["rl", "--algo", "rft", "--policy", str(base), "--reward-fn", f"{tmp_path / 'split.py'}:split",
            "--prompts", str(prompts), "--out", str(tmp_path / "resumed"), "--lr", "1e-5", "--batch-size", "4",
            "--num-samples", "2", "--max-new-tokens", "2", "--seed", "5", "--hard-prompts", "2"]
    assert cli(args + ["--steps", "15"]) == 0
    assert cli(args + ["--steps", "30", "--resume"]) == 0
    resumed = [r["fn_full"] for r in read_metrics(tmp_path / "resumed" / "metrics.jsonl")]
    assert resumed == runs["hard"]  # restarting the estimates at 0.5 would draw ~half solved prompts at step 16+
    assert cli(["rl", "--algo", "grpo", "--policy", str(base), "--reward-model", str(_rm(tmp_path, base)),
                "--prompts", str(prompts), "--out", str(tmp_path / "x"), "--steps", "1", "--max-new-tokens", "8",
                "--hard-prompts", "1"]) == 2
    assert "--hard-prompts needs --reward-fn" in capsys.readouterr().err


HARD_TWO_RANKS = """
import os, sys
import torch
sys.path.insert(0, sys.argv[1])
import pyllm.sft
from chat_util import cli
pyllm.sft.Dist.close = lambda self: torch.distributed.barrier()  # one process group for the three runs
args = sys.argv[3:]
assert cli(args + ["--out", sys.argv[2] + "/full", "--steps", "8"]) == 0
assert cli(args + ["--out", sys.argv[2] + "/resumed", "--steps", "4"]) == 0
assert cli(args + ["--out", sys.argv[2] + "/resumed", "--steps", "8", "--resume"]) == 0
torch.distributed.destroy_process_group()
from pyllm.cli import end_process
end_process(0)  # as the pyllm program ends: no interpreter finalization while DDP's gloo threads live
"""

SEEN_FN = '''
import os
def seen(prompt, response, tag, **extra):
    """SPLIT_FN's score; each rank logs the tags it was given (its draws)."""
    with open(os.environ["SEEN_LOG"] + os.environ["RANK"], "a") as f:
        f.write(f"{tag} ")
    return 1.0 if tag % 2 == 0 else 0.0
'''


def test_hard_prompts_two_ranks_resume_draws_what_the_uninterrupted_run_draws(tmp_path):
    """--hard-prompts under 2 gloo ranks: each rank kept its own pass rates and a checkpoint held rank 0's, from which
    both ranks continued on --resume, so rank 1 then drew other prompts than in the uninterrupted run; the ranks now
    share every rank's visits (one estimate). 8 steps vs 4 + --resume to 8 (the lr is too small to move the draws)."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    base, _, prompts = _setup(tmp_path)
    (tmp_path / "seen.py").write_text(SEEN_FN)
    (tmp_path / "run.py").write_text(HARD_TWO_RANKS)
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1", PYLLM_PROGRESS="0",
               SEEN_LOG=str(tmp_path / "seen"))
    log = exit_probe(tmp_path, env)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
                        str(tmp_path / "run.py"), str(root / "tests"), str(tmp_path), "rl", "--algo", "rft",
                        "--policy", str(base), "--reward-fn", f"{tmp_path / 'seen.py'}:seen", "--prompts",
                        str(prompts), "--lr", "1e-5", "--batch-size", "2", "--num-samples", "1", "--max-new-tokens",
                        "2", "--seed", "5", "--hard-prompts", "2", "--ppo-epochs", "1"],
                       capture_output=True, text=True, env=env, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    for rank in (0, 1):
        seen = (tmp_path / f"seen{rank}").read_text().split()
        assert len(seen) == 16 * 2 and seen[:16] == seen[16:], (rank, seen)  # 8 steps x 2 prompts, run twice
    assert_clean_exit(log)


def test_rft_select_neg_mode_pushes_a_wrong_plurality_down():
    from pyllm.rl import rft_select
    # k=4: g0 plurality [1] right -> no negative; g1 plurality [2] wrong with one right [1] -> [2] pushed down;
    # g2 tie [1]/[2] -> none; g3 all wrong (nothing verified) -> no step at all on it
    resp = [[1], [1], [1], [2], [2], [2], [2], [1], [1], [2], [1], [2], [3], [3], [4], [3]]
    ok = torch.tensor([r == [1] for r in resp])
    assert rft_select(resp, ok, 4) == ([0, 7, 8], [1.0, 1.0, 1.0], 0.75)
    sel, w, _ = rft_select(resp, ok, 4, neg_mode=0.5)
    assert sel == [0, 7, 8, 4] and w == [1.0, 1.0, 1.0, -0.5]
    sel, w, _ = rft_select(resp, ok, 4, hard_weight=1.0, neg_mode=0.5)  # relative to the group's scaled weight
    assert sel == [0, 7, 8, 4] and w[3] == pytest.approx(-0.5 * w[1]) and w[1] > w[0]


@pytest.mark.parametrize("algo, extra", [("ppo", ["--minibatches", "2"]),
                                         ("grpo", ["--minibatches", "2", "--lora-r", "2"]),
                                         ("rft", ["--hard-prompts", "1", "--ppo-epochs", "1"])])
def test_ppo_resume_with_minibatches_matches_uninterrupted_run(tmp_path, algo, extra):
    """--minibatches 2: the minibatch order came from the global RNG, whose state a resumed process does not have, so
    the resumed weights differed (by ~2e-2); it is now a function of (seed, step). The same for GRPO (LoRA) and RFT
    (--hard-prompts: the pass rates are in the checkpoint), metrics rows included."""
    import pyllm.rl as rl
    base, fn, prompts = _setup(tmp_path)
    if algo == "rft":  # a pass/fail verifier that some samples pass
        (tmp_path / "fa.py").write_text(FIRST_A)
        fn = f"{tmp_path / 'fa.py'}:first_a"
    args = ["rl", "--algo", algo, "--policy", str(base), "--reward-fn", fn, "--prompts", str(prompts), "--lr", "1e-2",
            "--batch-size", "4", "--num-samples", "2", "--max-new-tokens", "6", "--seed", "3", "--steps", "4",
            "--warmup-steps", "1", *extra]
    assert cli(args + ["--out", str(tmp_path / "full")]) == 0
    with ctrl_c_after_save(rl, 2):
        assert cli(args + ["--out", str(tmp_path / "resumed"), "--save-every", "2"]) == 130
    assert cli(args + ["--out", str(tmp_path / "resumed"), "--resume"]) == 0
    from pyllm.safetensors_io import load_file
    names = sorted(p.name for p in (tmp_path / "full").glob("*.safetensors"))
    assert ("value_head.safetensors" in names) == (algo == "ppo")
    for name in names:
        a, b = (load_file(str(tmp_path / d / name)) for d in ("full", "resumed"))
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=f"{name} {k}")
    rows_a, rows_b = (read_metrics(tmp_path / d / "metrics.jsonl") for d in ("full", "resumed"))
    assert [r["step"] for r in rows_b] == [1, 2, 3, 4]
    assert rows_b == [pytest.approx(r, rel=1e-5, abs=1e-6) for r in rows_a]


def test_response_batch_scores_only_the_generated_tokens():
    """PPO/GRPO's per-token terms: m is 1 exactly on the positions that predict a response token (not the prompt, not
    the padding), `last` predicts the final one, and token_logps there equals each sequence's own unpadded
    log-softmax at its response tokens (temperature-scaled, as sampled)."""
    from chat_util import tiny_model
    from pyllm.rl import response_batch, token_logps
    model, tok = tiny_model(0)
    S = tok.special_ids
    samples = [(0, [S["<|bos|>"], S["<|user|>"], 70, 71, S["<|end|>"], S["<|assistant|>"]], [80, 81, S["<|end|>"]]),
               (1, [S["<|bos|>"], S["<|user|>"], S["<|end|>"], S["<|assistant|>"]], [90]),
               (2, [S["<|bos|>"], S["<|assistant|>"]], [91, 92, 93, 94, 95, 96, S["<|end|>"]])]
    pad = S["<|pad|>"]
    idx, m, last = response_batch(samples, pad)
    assert idx.shape == (3, 9) and m.shape == (3, 8)
    tau = 0.7
    with torch.no_grad():
        lp = token_logps(model(idx)[0], idx, tau)
    for i, (_, p, r) in enumerate(samples):
        pos = [t for t in range(m.shape[1]) if m[i, t] == 1]
        assert [int(idx[i, t + 1]) for t in pos] == r and pos == list(range(len(p) - 1, len(p) - 1 + len(r)))
        assert int(last[i]) == pos[-1]
        with torch.no_grad():
            own = torch.log_softmax(model(torch.tensor([p + r]))[0][0] / tau, -1)   # (len, V), no padding
        want = torch.stack([own[t, r[j]] for j, t in enumerate(pos)])
        torch.testing.assert_close(lp[i, pos], want, rtol=1e-5, atol=1e-5)


def test_minibatches_is_the_number_of_updates_per_pass(tmp_path):
    """--minibatches 2 over 7 rollouts: 2 optimizer steps per pass (N // 2 = 3 rows each made 3 of them; under DDP a
    rank with another N then ran another number of all-reduces than its peer)."""
    import pyllm.rl as rl
    base, fn, prompts = _setup(tmp_path)
    calls = []
    orig = rl.clip_and_step

    def count(*a, **kw):
        calls.append(1)
        return orig(*a, **kw)
    rl.clip_and_step = count
    try:
        assert cli(["rl", "--algo", "ppo", "--policy", str(base), "--reward-fn", fn, "--prompts", str(prompts),
                    "--out", str(tmp_path / "o"), "--steps", "1", "--batch-size", "7", "--num-samples", "1",
                    "--max-new-tokens", "4", "--minibatches", "2", "--ppo-epochs", "2"]) == 0
    finally:
        rl.clip_and_step = orig
    assert len(calls) == 2 * 2


def test_policy_loss_is_the_clipped_surrogate_with_its_gradient():
    """The clipped surrogate was only exercised through whole runs that improve the reward, which also improved with
    the clipping removed. Hand formula per token: loss -A*r, except -A*(1 +- eps) (and no gradient) where r left
    [1 - eps, 1 + eps] in the direction A favours; masked positions count for nothing."""
    from pyllm.rl import policy_loss
    eps = 0.2
    # ratios 1.5 (A>0: clipped), 1.5 (A<0: not), 0.5 (A<0: clipped), 0.5 (A>0: not), 1.1 (inside), masked
    r = torch.tensor([[1.5, 1.5, 0.5], [0.5, 1.1, 3.0]])
    a = torch.tensor([[2.0, -1.0, -3.0], [0.5, 4.0, 7.0]])
    m = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    old = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -0.25, -1.0]])
    lp = (old + r.log()).requires_grad_()
    loss, pg, ratio = policy_loss(lp, old, a, m, eps)
    want = [-2.0 * 1.2, 1.0 * 1.5, 3.0 * 0.8, -0.5 * 0.5, -4.0 * 1.1]          # the five unmasked tokens
    assert loss.item() == pytest.approx(sum(want) / 5, rel=1e-6) and pg.item() == loss.item()
    torch.testing.assert_close(ratio.detach(), r)
    loss.backward()
    # d(-A r)/d lp = -A r where unclipped, 0 where clipped or masked
    want_grad = torch.tensor([[0.0, 1.0 * 1.5, 0.0], [-0.5 * 0.5, -4.0 * 1.1, 0.0]]) / 5
    torch.testing.assert_close(lp.grad, want_grad)


def test_grpo_k3_kl_term_and_its_gradient():
    """GRPO's KL penalty k3 = exp(ref - lp) - (ref - lp) - 1 (>= 0) enters the loss with +kl_coef: a flipped sign
    (rewarding divergence from the reference) passed every run-level test."""
    from pyllm.rl import k3_kl, policy_loss
    lp = torch.tensor([[-1.0, -2.0, -0.3], [-0.7, -4.0, -2.5]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0, -0.3], [-2.0, -3.0, -9.0]])
    m = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    hand = [math.exp(r_ - l_) - (r_ - l_) - 1 for l_, r_, mm in zip(lp.detach().flatten().tolist(),
                                                                      ref.flatten().tolist(), m.flatten().tolist())
            if mm]
    assert k3_kl(lp, ref, m).item() == pytest.approx(sum(hand) / 5, rel=1e-6)
    assert all(h >= 0 for h in hand) and max(hand) > 0.5
    old = lp.detach()                                                          # on-policy: ratio 1, surrogate -mean(A)
    a = torch.tensor([[1.0, -1.0, 0.5], [0.0, 2.0, 3.0]])
    loss, pg, _ = policy_loss(lp, old, a, m, 0.2, ref_lp=ref, kl_coef=0.3)
    assert pg.item() == pytest.approx(-(1.0 - 1.0 + 0.5 + 0.0 + 2.0) / 5, rel=1e-6)
    assert loss.item() == pytest.approx(pg.item() + 0.3 * sum(hand) / 5, rel=1e-6)
    loss.backward()
    # d/dlp: -A (ratio 1) + kl_coef * (1 - exp(ref - lp)), over the 5 unmasked tokens
    want = (-a + 0.3 * (1 - torch.exp(ref - old))) * m / 5
    torch.testing.assert_close(lp.grad, want)


def test_ppo_token_rewards_penalise_kl_and_add_the_score_at_the_end():
    """PPO's reward shaping: -kl_coef * (log pi - log ref) per token plus the score on the last response token. The
    sign of the KL penalty was not pinned: +kl_coef (a bonus for drifting from the reference) passed."""
    from pyllm.rl import ppo_token_rewards
    kl = torch.tensor([[0.0, 0.5, -0.2, 1.0], [0.3, 0.1, 0.0, 0.0]])
    score = torch.tensor([2.0, -1.0])
    last = torch.tensor([3, 1])
    got = ppo_token_rewards(kl, score, last, 0.1)
    want = torch.tensor([[0.0, -0.05, 0.02, -0.1 + 2.0], [-0.03, -0.01 - 1.0, 0.0, 0.0]])
    torch.testing.assert_close(got, want)


def test_log_probs_are_scored_at_the_rollout_temperature(tmp_path, monkeypatch):
    """PPO/GRPO's log-probs (ratio, KL) must be those of the distribution the rollouts were sampled from,
    softmax(logits / --temperature); token_logps was tested alone, but a run scoring at temperature 1 whatever
    --temperature said passed. The logged KL of step 2 (policy after one update vs the reference, on step 2's
    rollouts) is recomputed by hand at temperature 0.5 (and differs at 1)."""
    import copy
    import pyllm.rl as rl
    from pyllm.rl import response_batch
    base, fn, prompts = _setup(tmp_path)
    seen = []
    rollout = rl.rollout

    def spy(policy, *a, **kw):
        state = copy.deepcopy(policy.state_dict())
        out = rollout(policy, *a, **kw)
        seen.append((state, out))
        return out
    monkeypatch.setattr(rl, "rollout", spy)
    tau = 0.5
    assert cli(["rl", "--algo", "ppo", "--policy", str(base), "--reward-fn", fn, "--prompts", str(prompts),
                "--out", str(tmp_path / "o"), "--steps", "2", "--lr", "3e-2", "--batch-size", "4", "--num-samples",
                "1", "--max-new-tokens", "6", "--temperature", str(tau), "--seed", "3"]) == 0
    rows = read_metrics(tmp_path / "o" / "metrics.jsonl")
    state, samples = seen[1]
    policy, tok = load_checkpoint(str(base))
    ref, _ = load_checkpoint(str(base))
    policy.load_state_dict(state)
    for mdl in (policy, ref):
        mdl.set_backend("torch")
    idx, m, _ = response_batch(samples, tok.special_ids["<|pad|>"])

    def kl_at(t):
        with torch.no_grad():
            lps = [torch.log_softmax(mdl(idx)[0][:, :-1] / t, -1).gather(-1, idx[:, 1:, None])[..., 0]
                   for mdl in (policy, ref)]
        return float(((lps[0] - lps[1]) * m).sum(1).mean())
    want, at_one = kl_at(tau), kl_at(1.0)
    assert abs(want - at_one) > 0.05 * abs(want) + 1e-3, (want, at_one)   # the temperature matters here
    assert rows[1]["kl"] == pytest.approx(want, rel=1e-3, abs=1e-5)


@pytest.mark.parametrize("algo, flags, want", [("rft", [], 1), ("grpo", [], 2), ("rft", ["--ppo-epochs", "3"], 3)])
def test_ppo_epochs_default_follows_the_algorithm(tmp_path, monkeypatch, algo, flags, want):
    """Session 30 audit: rft is documented as one supervised step per rollout, but took --ppo-epochs' PPO default of
    2: a second, clipped-surrogate pass on the samples the first had already moved. Now rft defaults to 1 and the
    others keep 2; a given value is kept."""
    import pyllm.rl as rl
    base, _, prompts = _setup(tmp_path)
    (tmp_path / "fa.py").write_text(FIRST_A)
    steps = []
    real = rl.clip_and_step
    monkeypatch.setattr(rl, "clip_and_step", lambda *a, **k: steps.append(1) or real(*a, **k))
    assert cli(["rl", "--algo", algo, "--policy", str(base), "--reward-fn", f"{tmp_path / 'fa.py'}:first_a",
                "--prompts", str(prompts), "--out", str(tmp_path / "o"), "--batch-size", "2", "--num-samples", "4",
                "--max-new-tokens", "3", "--steps", "1", *flags]) == 0
    assert len(steps) == want


SAME_ROLLOUTS = """
import os, sys
sys.path.insert(0, sys.argv[1])
import pyllm.rl as rl
from chat_util import cli
orig = rl.rollout
def rollout(policy, tok, prompts, k, args, seed, device):  # each prompt's samples from (step, prompt) only
    base = seed - int(os.environ.get("RANK", "0"))
    out = []
    for pi, ids in prompts:
        out += orig(policy, tok, [(pi, ids)], k, args, base * 1000 + pi, device)
    return out
rl.rollout = rollout
from pyllm.cli import end_process
end_process(cli(sys.argv[2:]))  # as the pyllm program ends: no interpreter finalization beside DDP's gloo threads
"""

GRADED = '''
def graded(prompt, response, target, **extra):
    return (len(response) % 5) / 4 + (1.0 if target in response else 0.0)
def passfail(prompt, response, target, **extra):
    return 1.0 if sum(map(ord, response)) % 2 == 0 else 0.0
'''


@pytest.mark.parametrize("algo, fn, extra", [("rft", "passfail", []), ("rft", "passfail", ["--rft-hard-weight", "2"]),
                                             ("grpo", "graded", ["--scale-rewards", "batch", "--ppo-epochs", "1"]),
                                             ("ppo", "graded", ["--num-samples", "1"])])
def test_two_ranks_train_as_one_process(tmp_path, algo, fn, extra):
    """Session 30 audit: each rank's losses were token means over its own tokens (DDP then averaged the ranks, so a
    token on the rank with fewer weighed more: RFT's kept replies and PPO's reply lengths differ per rank), and
    --scale-rewards batch divided by each rank's own std. With rollouts made independent of the rank layout, 2 gloo
    ranks x 2 prompts now train as 1 process x 4 prompts (fp32 noise), as SFT, reward and DPO already did.
    Session 31: --rft-hard-weight renormalised each rank's kept groups to mean scale 1 on its own (a rank of hard
    prompts and a rank of easy ones weighed the same); now over every rank's groups."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    from pyllm.checkpoint import load_checkpoint
    from pyllm.checkpoint import save_checkpoint
    from chat_util import tiny_model
    _, _, prompts = _setup(tmp_path)
    model, tok = tiny_model(0, max_seq_len=48)
    with torch.no_grad():  # <|end|> made likely (its LM-head row along the mean hidden state): replies of
        _, _, hid = model(torch.randint(0, 250, (1, 40), generator=torch.Generator().manual_seed(0)),
                          return_hidden=True)  # different lengths, so the ranks hold different token counts
        d = hid[0].mean(0)
        model.lm_head.weight[tok.special_ids["<|end|>"]] = d / d.norm() * 6
    base = save_checkpoint(tmp_path / "base_end", model, tok)
    (tmp_path / "fns.py").write_text(GRADED)
    (tmp_path / "run.py").write_text(SAME_ROLLOUTS)
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1", PYLLM_PROGRESS="0")
    args = ["rl", "--algo", algo, "--policy", str(base), "--reward-fn", f"{tmp_path / 'fns.py'}:{fn}", "--prompts",
            str(prompts), "--lr", "1e-2", "--max-new-tokens", "10", "--steps", "2", "--seed", "3", "--device", "cpu",
            *(["--num-samples", "4"] if "--num-samples" not in extra else []), *extra]
    one = subprocess.run([sys.executable, str(tmp_path / "run.py"), str(root / "tests"), *args, "--batch-size", "4",
                          "--out", str(tmp_path / "one")], capture_output=True, text=True, env=env, timeout=240)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
                          str(tmp_path / "run.py"), str(root / "tests"), *args, "--batch-size", "2",
                          "--out", str(tmp_path / "two")], capture_output=True, text=True, env=env, timeout=240)
    assert two.returncode == 0, two.stderr[-3000:]
    a, _ = load_checkpoint(str(tmp_path / "one"))
    b, _ = load_checkpoint(str(tmp_path / "two"))
    base_m, _ = load_checkpoint(str(base))
    with torch.no_grad():
        moved = sum(float((p - q).norm()) for p, q in zip(a.parameters(), base_m.parameters()))
        diff = sum(float((p - q).norm()) for p, q in zip(a.parameters(), b.parameters()))
    assert moved > 1e-3 and diff < 1e-3 * moved, (moved, diff)
    ra, rb = read_metrics(tmp_path / "one" / "metrics.jsonl"), read_metrics(tmp_path / "two" / "metrics.jsonl")
    for x, y in zip(ra, rb):
        assert x["response_length"] == pytest.approx(y["response_length"], rel=1e-6)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-3)


def test_reward_fn_module_beside_the_user_imports_without_cwd_on_path(tmp_path, monkeypatch):
    """Session 31: `--reward-fn my_rewards:fn` found no module under the `pyllm` console script (its sys.path has no
    current directory, unlike `python -m pyllm`); now the current directory is looked at last. A missing module is
    still one line naming it."""
    import os
    import sys
    from pyllm.rl import load_reward_fn
    (tmp_path / "pyllm_s31_rewards.py").write_text("def fn(prompt, response, **extra):\n    return 0.5\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", os.getcwd())])
    monkeypatch.delitem(sys.modules, "pyllm_s31_rewards", raising=False)
    assert load_reward_fn("pyllm_s31_rewards:fn")(prompt="a", response="b") == 0.5
    with pytest.raises(ValueError, match="cannot import 'pyllm_s31_missing'"):
        load_reward_fn("pyllm_s31_missing:fn")


def test_resume_of_a_run_saved_with_the_ppo_epochs_default_left_open(tmp_path):
    """Session 31 audit: rl filled in --ppo-epochs' default (None: 1 for rft, 2 otherwise) before --resume restored
    the run's saved value, so a saved null (the flag's own default) was restored after it and range(None) raised a
    TypeError traceback; the default now follows the resume."""
    import json
    base, fn, prompts = _setup(tmp_path)
    args = ["rl", "--algo", "grpo", "--policy", str(base), "--reward-fn", fn, "--prompts", str(prompts),
            "--batch-size", "2", "--num-samples", "2", "--max-new-tokens", "4", "--out", str(tmp_path / "o")]
    assert cli(args + ["--steps", "1"]) == 0
    tj = tmp_path / "o" / "trainer_state.json"
    st = json.loads(tj.read_text())
    assert st["args"]["ppo_epochs"] == 2
    st["args"]["ppo_epochs"] = None
    tj.write_text(json.dumps(st))
    assert cli(args + ["--steps", "2", "--resume"]) == 0
    assert [r["step"] for r in read_metrics(tmp_path / "o" / "metrics.jsonl")] == [1, 2]


def test_prompts_help_and_readme_name_the_weight_field(capsys):
    """A prompts line's 'weight' field is the verifier's full credit (rft keeps the replies scoring at least it) and
    was in neither --help nor the README: a 'weight' meaning something else (2, a sample's importance) made rft keep
    nothing, trained nothing, and exit 0."""
    from pathlib import Path
    with pytest.raises(SystemExit):
        cli(["rl", "--help"])
    assert "'weight' field is the --reward-fn score of a fully right reply" in " ".join(capsys.readouterr().out.split())
    readme = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text().split())
    assert "scored at least the prompt line's `weight` field" in readme
