"""DPO: the sigmoid loss raises the chosen-over-rejected log-ratio against the frozen reference."""
from __future__ import annotations

import pytest
import torch

from pyllm.checkpoint import load_checkpoint
from pyllm.dpo import load_dpo_pairs, sequence_logps
from pyllm.sft import read_metrics

from chat_util import cli, tiny_checkpoint, tiny_model, write_jsonl


def _pairs(n):
    return [{"prompt": f"say something {i}", "chosen": "yes " * (1 + i % 3), "rejected": "no " * (1 + i % 2)}
            for i in range(n)]


def _log_ratio(model, pairs, pad):
    with torch.no_grad():
        c = sequence_logps(model, [p[0] for p in pairs], [p[1] for p in pairs], pad, "cpu")
        r = sequence_logps(model, [p[2] for p in pairs], [p[3] for p in pairs], pad, "cpu")
    return (c - r).mean().item()


def test_completion_mask_excludes_prompt(tmp_path):
    _, tok = tiny_model()
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "abc", "chosen": "xy", "rejected": "z"}])
    (ic, mc, ir, mr), = load_dpo_pairs(data, tok, 100, False)
    assert sum(mc) == 3 and sum(mr) == 2  # the answer's tokens + its end-of-turn, nothing of the prompt
    assert tok.decode([t for t, m in zip(ic, mc) if m][:-1]) == "xy"


@pytest.mark.parametrize("lora", [False, True])
def test_dpo_raises_chosen_over_rejected(tmp_path, lora):
    base = tiny_checkpoint(tmp_path / "base", seed=4)
    data = write_jsonl(tmp_path / "p.jsonl", _pairs(24))
    out = tmp_path / "dpo"
    extra = ["--lora-r", "4", "--lr", "2e-2"] if lora else ["--lr", "3e-3"]
    assert cli(["dpo", "--model", str(base), "--data", str(data), "--out", str(out), "--steps", "12",
                "--batch-size", "6", "--beta", "0.1", "--eval-frac", "0.25", "--eval-every", "6", *extra]) == 0
    rows = read_metrics(out / "metrics.jsonl")
    assert rows[-1]["rewards/margins"] > rows[0]["rewards/margins"] and rows[-1]["eval_margin"] > 0
    assert abs(rows[0]["rewards/margins"]) < 1e-4  # policy == reference at step 1
    ref, tok = load_checkpoint(base)
    pol, _ = load_checkpoint(out)
    pairs = load_dpo_pairs(data, tok, 256, False)
    pad = tok.special_ids["<|pad|>"]
    assert _log_ratio(pol, pairs, pad) - _log_ratio(ref, pairs, pad) > 1.0
    assert (out / "adapter_model.safetensors").is_file() == lora


def test_dpo_rejects_identical_pair(tmp_path, capsys):
    base = tiny_checkpoint(tmp_path / "base")
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "a"}])
    assert cli(["dpo", "--model", str(base), "--data", str(data), "--out", str(tmp_path / "o")]) == 2
    assert f"{data}:1: chosen and rejected are identical" in capsys.readouterr().err


def test_diverged_by_beta_names_beta(tmp_path, capsys):
    """--beta scales every DPO gradient: --beta 1e30 made the gradient norm inf at step 1, and the error told the
    user to lower --lr alone."""
    base = tiny_checkpoint(tmp_path / "base")
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "aa", "rejected": "zz"}] * 4)
    assert cli(["dpo", "--model", str(base), "--data", str(data), "--out", str(tmp_path / "o"), "--steps", "2",
                "--beta", "1e30"]) == 2
    assert "(the loss diverged); lower --lr or --beta or check the data" in capsys.readouterr().err
    assert not (tmp_path / "o" / "model.safetensors").exists()


def test_dpo_loss_matches_the_formula_by_hand(tmp_path):
    """dpo_batch == -logsigmoid(beta * ((pi(c) - ref(c)) - (pi(r) - ref(r)))) with each log-prob summed by hand
    over the reply's tokens and its <|end|> (one unpadded forward per sequence): a multi-turn prompt's earlier
    assistant turn counts for nothing, and neither does the right padding of the shorter sequences."""
    import torch.nn.functional as F

    from pyllm.chat import render
    from pyllm.dpo import dpo_batch
    pol, tok = tiny_model(0)
    ref, _ = tiny_model(1)
    multi = [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"},
             {"role": "assistant", "content": "yo"}, {"role": "user", "content": "more?"}]
    rows = [(multi, "sure thing", "no"), ([{"role": "user", "content": "q"}], "a", "bbbbbbbbbb")]
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in rows])
    pairs = load_dpo_pairs(data, tok, 64, False)
    beta = 0.3
    loss, rc, rr = dpo_batch(pol, ref, pairs, tok.special_ids["<|pad|>"], "cpu", beta)

    def logp(model, msgs, reply):
        full = render(msgs + [{"role": "assistant", "content": reply}], tok)[0]
        n = len(render(msgs, tok, add_generation_prompt=True)[0])  # the prompt and the reply's <|assistant|>
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([full]))[0][0].double(), -1)
        return sum(lp[t - 1, full[t]] for t in range(n, len(full)))
    # the implicit rewards (logged as rewards/chosen, rewards/rejected): a prompt token counted in them would cancel
    # in the loss (chosen and rejected share the prompt) but not here
    want_c = torch.stack([beta * (logp(pol, p, c) - logp(ref, p, c)) for p, c, _ in rows])
    want_r = torch.stack([beta * (logp(pol, p, r) - logp(ref, p, r)) for p, _, r in rows])
    torch.testing.assert_close(rc.double(), want_c, rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(rr.double(), want_r, rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(loss.detach().double(), -F.logsigmoid(want_c - want_r).mean(), rtol=1e-4, atol=2e-5)
