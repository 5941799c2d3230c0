"""The graded verifier reward (partial credit for near misses) and its plumbing: values, a group's spread under
--filter-groups / --prefilter-samples, the demo's rl_prompts.jsonl field, and rl's exact-match `fn_full` metric."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from pyllm import demo, tasks
from pyllm.sft import read_metrics

from chat_util import cli, tiny_checkpoint, write_jsonl


def test_graded_verifier_values():
    v = tasks.verifier_reward
    assert v(response=" 57", answer="57", partial=0.5) == 1.0                 # exact: full weight
    assert v(response="57", answer="57", weight=2.0, partial=0.5) == 2.0
    assert v(response="58", answer="57", partial=0.5) == pytest.approx(0.45)  # 0.5 x (1 - 1/10)
    assert v(response="53", answer="57", partial=0.5) == pytest.approx(0.30)  # off by 4
    assert v(response="61", answer="57", weight=2.0, partial=0.5) == pytest.approx(0.6)
    assert v(response="-2", answer="3", partial=1.0) == pytest.approx(0.5)    # signed answers
    for far in ("67", "47", "570", "0"):                                       # off by >= 10: nothing
        assert v(response=far, answer="57", partial=0.5) == 0.0
    for bad in ("57 57", "5x", "", "The answer 57", "57?"):                    # not an integer: nothing
        assert v(response=bad, answer="57", partial=0.5) == 0.0
    assert v(response="58", answer="57") == 0.0                                # default: pass/fail as before
    assert v(response="58", answer="57", partial=0.0) == 0.0
    assert v(response="abd", answer="abc", partial=0.5) == 0.0                # word answers: exact only
    # a near miss never reaches an exact reply, and closer is better
    sc = [v(response=str(57 + d), answer="57", partial=0.9) for d in range(0, 11)]
    assert sc[0] == 1.0 and all(a > b for a, b in zip(sc, sc[1:])) and sc[-1] == 0.0


def test_graded_reward_gives_all_wrong_groups_a_spread():
    """A group whose replies are all wrong carries no pass/fail signal (filtered), but a graded one ranks them."""
    group = ["58", "61", "50", "93"]
    pf = torch.tensor([tasks.verifier_reward(response=r, answer="57") for r in group])
    gr = torch.tensor([tasks.verifier_reward(response=r, answer="57", partial=0.5) for r in group])
    assert float(pf.max() - pf.min()) == 0.0
    assert float(gr.max() - gr.min()) > 1e-6 and gr.argmax().item() == 0 and gr[3] == 0.0


def test_demo_writes_partial_into_rl_prompts(tmp_path):
    cfg = dataclasses.replace(demo.QUICK, rl_partial=0.5, n_docs=5, n_val_docs=2)
    demo.write_data(tmp_path, cfg, 0)
    rows = [json.loads(x) for x in (tmp_path / "rl_prompts.jsonl").read_text().splitlines()]
    assert rows and all(r["partial"] == 0.5 and r["weight"] == cfg.rl_verifier_weight for r in rows)
    r = rows[0]
    near = str(int(r["answer"]) + 1)
    assert tasks.verifier_reward(prompt=r["prompt"], response=near, **{k: r[k] for k in ("answer", "weight",
                                                                                            "partial")}) \
        == pytest.approx(0.45 * r["weight"])


HALF_FN = "def half(prompt, response, weight=1.0, full=False, **kw):\n    return weight if full else 0.5 * weight\n"


@pytest.mark.parametrize("full", [False, True])
def test_rl_logs_full_credit_rate_apart_from_graded_score(tmp_path, full):
    base = tiny_checkpoint(tmp_path / "base", max_seq_len=48)
    (tmp_path / "half.py").write_text(HALF_FN)
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"write {i}", "weight": 2.0, "full": full}
                                                 for i in range(4)])
    out = tmp_path / "o"
    assert cli(["rl", "--algo", "grpo", "--policy", str(base), "--reward-fn", f"{tmp_path / 'half.py'}:half",
                "--prompts", str(prompts), "--out", str(out), "--steps", "2", "--batch-size", "2",
                "--num-samples", "2", "--max-new-tokens", "4", "--seed", "1"]) == 0
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["fn_full"] for r in rows] == [1.0 if full else 0.0] * 2
    assert [r["fn_score"] for r in rows] == [2.0 if full else 1.0] * 2
