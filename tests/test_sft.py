"""SFT: assistant-only loss mask, packing without attention leaks, loss falls, resume, bad input."""
from __future__ import annotations

import json

import pytest
import torch

from pyllm.sft import pack_rows, parse_conversation, read_metrics, render_checked

from chat_util import assert_clean_exit, cli, ctrl_c_after_save, exit_probe, tiny_checkpoint, tiny_model, write_jsonl

MULTI = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hi there"},
         {"role": "assistant", "content": "hello"}, {"role": "user", "content": "2+2?"},
         {"role": "assistant", "content": "4, of course"}, {"role": "user", "content": "thanks"},
         {"role": "assistant", "content": "ok"}]


def _role_of_positions(ids, tok):
    """Walk the ids independently of chat.render's mask: the role whose turn each position belongs to."""
    role_tok = {tok.special_ids[f"<|{r}|>"]: r for r in ("system", "user", "assistant")}
    roles, cur = [], None
    for t in ids:
        if t in role_tok:
            cur = role_tok[t]
            roles.append("header")
        else:
            roles.append(cur)
    return roles


def test_mask_covers_only_assistant_tokens_multi_turn():
    _, tok = tiny_model()
    ids, mask = render_checked(parse_conversation({"messages": MULTI}, "x:1"), tok, "x:1", 1000)
    X, Y, D = pack_rows([(ids, mask)], len(ids) - 1, 0)
    roles = _role_of_positions(ids, tok)
    trained = [t + 1 for t in range(len(ids) - 1) if Y[0, t] >= 0]  # positions whose token carries loss
    assert trained, "nothing trained"
    for p in trained:
        assert roles[p] == "assistant", f"loss on a {roles[p]} token at {p}"
        assert Y[0, p - 1] == ids[p]
    # every assistant content token and its end-of-turn are trained
    n_assist = sum(len(tok.encode(m["content"])) + 1 for m in MULTI if m["role"] == "assistant")
    assert len(trained) == n_assist
    # --train-on-prompt trains everything
    _, Y2, _ = pack_rows([(ids, mask)], len(ids) - 1, 0, train_on_prompt=True)
    assert int((Y2 >= 0).sum()) == len(ids) - 1


def test_prompt_completion_format_matches_messages():
    a = parse_conversation({"prompt": "hi", "completion": "yo"}, "x:1")
    b = parse_conversation({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
                           "x:1")
    assert a == b


def test_no_attention_leak_between_packed_conversations(rng):
    model, tok = tiny_model(seed=1)
    model.eval()
    conv = lambda u, a: render_checked([{"role": "user", "content": u}, {"role": "assistant", "content": a}],  # noqa
                                       tok, "x", 1000)
    A1, A2, B = conv("first question", "alpha"), conv("other  words!!", "gamma"), conv("second one?", "beta beta")
    assert len(A1[0]) == len(A2[0])
    T = len(A1[0]) + len(B[0])
    X1, _, D1 = pack_rows([A1, B], T, 0, packing=True)
    X2, _, D2 = pack_rows([A2, B], T, 0, packing=True)
    assert X1.shape[0] == 1 and not torch.equal(X1, X2)
    with torch.no_grad():
        l1, l2 = model(X1, doc_ids=D1)[0], model(X2, doc_ids=D2)[0]
        Xb, _, Db = pack_rows([B], T, 0)
        lb = model(Xb, doc_ids=Db)[0]
    nB = len(B[0]) - 1
    # B is packed first (longest first), so its positions are the same in both rows
    posB = (D1[0] == D1[0, 0]).nonzero().flatten() if len(B[0]) >= len(A1[0]) else (D1[0] == 1).nonzero().flatten()
    assert len(posB) == nB
    torch.testing.assert_close(l1[0, posB], l2[0, posB], rtol=0, atol=1e-5)
    torch.testing.assert_close(l1[0, posB], lb[0, :nB], rtol=1e-4, atol=1e-4)
    # without doc_ids the same rows do leak: the check above can fail
    with torch.no_grad():
        m1, m2 = model(X1)[0], model(X2)[0]
    posA_after = torch.arange(X1.shape[1])[(D1[0] >= 0)]
    assert not torch.allclose(m1[0, posA_after], m2[0, posA_after], atol=1e-5)


def _sft_data(path, n=48):
    rows = [{"messages": [{"role": "system", "content": "count"}, {"role": "user", "content": f"n={i}"},
                          {"role": "assistant", "content": f"{i} {i + 1} {i + 2}"}]} for i in range(n)]
    rows += [{"prompt": f"echo {w}", "completion": w} for w in ("apple", "banana", "cherry", "date")]
    return write_jsonl(path, rows)


def test_sft_loss_falls_and_saves_checkpoint(tmp_path):
    base = tiny_checkpoint(tmp_path / "base")
    data = _sft_data(tmp_path / "sft.jsonl")
    out = tmp_path / "sft"
    assert cli(["sft", "--model", str(base), "--data", str(data), "--out", str(out), "--steps", "30",
                "--lr", "3e-3", "--batch-size", "4", "--eval-frac", "0.1", "--eval-every", "10",
                "--device", "cpu"]) == 0
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 31))
    first = sum(r["loss"] for r in rows[:3]) / 3
    last = sum(r["loss"] for r in rows[-3:]) / 3
    assert last < 0.75 * first, (first, last)
    ev = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert len(ev) == 3 and ev[-1] < ev[0]
    for f in ("model.safetensors", "config.json", "tokenizer.json", "trainer_state.json"):
        assert (out / f).is_file(), f
    assert not list(tmp_path.glob("*.tmp*"))



def test_sft_cli_trains_only_on_assistant_tokens(tmp_path):
    """The assistant-only mask was tested on pack_rows alone: `pyllm sft` passing train_on_prompt=True (loss on the
    system and user turns too) passed every CLI test. One step over the one packed row at the base weights: the logged target
    count and loss must be those of the assistant tokens alone, found by walking the ids (not chat.render's mask),
    the loss recomputed per conversation with the plain-torch backend."""
    from pyllm.checkpoint import load_checkpoint
    base = tiny_checkpoint(tmp_path / "base")
    convs = [MULTI, [{"role": "user", "content": "say yes"}, {"role": "assistant", "content": "yes"}],
             [{"role": "system", "content": "s"}, {"role": "user", "content": "q?"},
              {"role": "assistant", "content": "a."}]]                        # 90 tokens: one packed row of 96
    data = write_jsonl(tmp_path / "sft.jsonl", [{"messages": c} for c in convs])
    out = tmp_path / "sft"
    assert cli(["sft", "--model", str(base), "--data", str(data), "--out", str(out), "--steps", "1",
                "--batch-size", "1", "--eval-frac", "0", "--device", "cpu"]) == 0
    row = read_metrics(out / "metrics.jsonl")[0]
    model, tok = load_checkpoint(str(base))
    model.set_backend("torch")
    nll, n = 0.0, 0
    for c in convs:
        ids, _ = render_checked(parse_conversation({"messages": c}, "x:1"), tok, "x:1", 1000)
        roles = _role_of_positions(ids, tok)
        pos = [p for p in range(1, len(ids)) if roles[p] == "assistant"]   # tokens predicted in assistant turns
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0][0].double(), -1)
        nll -= sum(float(lp[p - 1, ids[p]]) for p in pos)
        n += len(pos)
    assert row["tokens"] == n
    assert row["loss"] == pytest.approx(nll / n, rel=1e-5)

@pytest.mark.parametrize("lora_r", ["0", "2"])
def test_sft_resume_matches_uninterrupted_run(tmp_path, lora_r):
    base = tiny_checkpoint(tmp_path / "base")
    data = _sft_data(tmp_path / "sft.jsonl", n=24)
    args = ["sft", "--model", str(base), "--data", str(data), "--lr", "2e-3", "--batch-size", "3",
            "--eval-frac", "0", "--warmup-steps", "2", "--lora-r", lora_r]
    assert cli(args + ["--out", str(tmp_path / "full"), "--steps", "8"]) == 0
    from pyllm.checkpoint import load_checkpoint
    # interrupted: 5 steps of an 8-step schedule, then --resume
    import pyllm.sft as sft
    with ctrl_c_after_save(sft, 5):
        assert cli(args + ["--out", str(tmp_path / "resumed"), "--steps", "8", "--save-every", "5"]) == 130
    assert json.loads((tmp_path / "resumed" / "trainer_state.json").read_text())["step"] == 5
    assert cli(args + ["--out", str(tmp_path / "resumed"), "--steps", "8", "--resume"]) == 0
    a, _ = load_checkpoint(tmp_path / "full")
    b, _ = load_checkpoint(tmp_path / "resumed")
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(va, vb, rtol=1e-5, atol=1e-6, msg=k)
    assert [r["step"] for r in read_metrics(tmp_path / "resumed" / "metrics.jsonl")] == list(range(1, 9))


@pytest.mark.parametrize("line, problem", [
    ({"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]}, "unknown role"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "  "}]}, "empty assistant"),
    ({"prompt": "x" * 500, "completion": "y"}, "longer than the context"),
    ({"text": "no chat here"}, "expected 'messages'"),
    ("{not json", "not valid JSON"),
])
def test_bad_lines_name_file_and_line(tmp_path, capsys, line, problem):
    base = tiny_checkpoint(tmp_path / "base")
    good = {"prompt": "a", "completion": "b"}
    data = write_jsonl(tmp_path / "d.jsonl", [good, line, good, good])
    args = ["sft", "--model", str(base), "--data", str(data), "--out", str(tmp_path / "o"), "--steps", "1",
            "--eval-frac", "0"]
    assert cli(args) == 2
    err = capsys.readouterr().err.strip()
    assert f"{data}:2:" in err and problem in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o" / "model.safetensors").exists()
    assert cli(args + ["--skip-bad-lines"]) == 0
    assert "skipped 1 bad line" in capsys.readouterr().err


def test_two_ranks_match_one_process(tmp_path):
    """torchrun, 2 gloo ranks x 2 rows == 1 process x 4 rows. The rows hold different numbers of assistant tokens;
    DDP averaged the ranks' per-rank token means, which weighted a token of the rank with fewer of them more (the
    weights differed by ~4e-2 after 3 steps): each rank's loss is now scaled by its share of the step's tokens."""
    import os
    import random
    import subprocess
    import sys
    from pathlib import Path
    base = tiny_checkpoint(tmp_path / "base")
    r = random.Random(0)
    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": [
        {"role": "user", "content": "q" * r.randint(1, 20)},
        {"role": "assistant", "content": "a" * r.randint(1, 30)}]} for _ in range(16)])
    args = ["sft", "--model", str(base), "--data", str(data), "--lr", "1e-2", "--eval-frac", "0", "--steps", "3",
            "--lora-r", "0", "--no-packing", "--seq-len", "64"]
    assert cli(args + ["--out", str(tmp_path / "one"), "--batch-size", "4"]) == 0
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1", PYLLM_PROGRESS="0")
    log = exit_probe(tmp_path, env)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
                        "-m", "pyllm", *args, "--out", str(tmp_path / "two"), "--batch-size", "2"],
                       capture_output=True, text=True, env=env, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    assert_clean_exit(log)
    a, b = (read_metrics(tmp_path / d / "metrics.jsonl") for d in ("one", "two"))
    assert [x["tokens"] for x in a] == [x["tokens"] for x in b]
    assert max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b)) < 1e-5
    from pyllm.checkpoint import load_checkpoint
    ma, _ = load_checkpoint(tmp_path / "one")
    mb, _ = load_checkpoint(tmp_path / "two")
    for (k, va), vb in zip(ma.state_dict().items(), mb.state_dict().values()):
        torch.testing.assert_close(va, vb, rtol=1e-5, atol=1e-5, msg=k)



def test_resume_on_another_number_of_processes_is_refused(tmp_path, capsys):
    """2 ranks x 2 rows a step, resumed as one process: it went on with 2 rows a step, twice the steps, from row
    2 x 2 of the epoch's shuffle (rows the 2 ranks had trained on already) and another lr schedule, without a word. A
    step is --batch-size rows per process, so it is now a one-line error naming --out and how to resume."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    base = tiny_checkpoint(tmp_path / "base")
    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "q" * (i + 1)},
                                                            {"role": "assistant", "content": "a" * (i + 2)}]}
                                              for i in range(16)])
    out = tmp_path / "o"
    args = ["sft", "--model", str(base), "--data", str(data), "--eval-frac", "0", "--lora-r", "0", "--no-packing",
            "--seq-len", "64", "--batch-size", "2", "--out", str(out)]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), OMP_NUM_THREADS="1",
               PYLLM_PROGRESS="0")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
                        "-m", "pyllm", *args, "--steps", "2"], capture_output=True, text=True, env=env, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    capsys.readouterr()
    assert cli(args + ["--steps", "4", "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"pyllm sft: error: {out}: the run was saved by 2 process(es), this resume runs 1 (each takes "
                   f"--batch-size a step: the steps and data order would change); resume it with torchrun "
                   f"--nproc-per-node 2"]
    assert json.loads((out / "trainer_state.json").read_text())["step"] == 2

@pytest.mark.parametrize("n, per_step, world", [(5, 2, 1), (7, 3, 1), (6, 4, 2), (3, 8, 1)])
def test_step_items_shows_every_item_once_per_epoch(n, per_step, world):
    """The steps' items, read in order, are epoch after epoch of a full shuffle: a step that straddles two epochs
    wrapped into the old shuffle (its first items twice, the new shuffle's first items never)."""
    from pyllm.sft import step_items

    class D:
        rank, world = 0, 1
    epochs = 4
    stream = []
    for step in range(epochs * n // per_step):
        shares = []
        for rank in range(world):
            D.rank, D.world = rank, world
            shares.append(step_items(list(range(n)), step, per_step, seed=5, dist=D))
        assert sum(map(len, shares)) == per_step
        stream += [shares[i % world][i // world] for i in range(per_step)]  # rank::world -> the step's order
    for e in range(len(stream) // n):
        assert sorted(stream[e * n:(e + 1) * n]) == list(range(n)), (e, stream)
    assert stream[:n] != stream[n:2 * n]  # each epoch its own shuffle


def test_resume_rewrites_the_metrics_rows_past_the_checkpoint(tmp_path):
    """Killed at step 3 with a checkpoint at step 2: the resumed run logs step 3 again, so the killed run's row 3
    (and a line cut short by the kill) must go; they were kept (steps 1, 2, 3, 3, 4 in metrics.jsonl)."""
    import pyllm.sft as sft
    base = tiny_checkpoint(tmp_path / "base")
    data = _sft_data(tmp_path / "sft.jsonl", n=12)
    out = tmp_path / "o"
    args = ["sft", "--model", str(base), "--data", str(data), "--out", str(out), "--batch-size", "2", "--eval-frac",
            "0", "--lora-r", "0", "--steps", "4", "--save-every", "2"]
    orig = sft.Metrics.log

    def log_then_die(self, **row):
        orig(self, **row)
        if row["step"] == 3:
            with open(self.path, "a") as f:
                f.write('{"step": 3, "lo')
            raise KeyboardInterrupt
    sft.Metrics.log = log_then_die
    try:
        assert cli(args) == 130
    finally:
        sft.Metrics.log = orig
    assert json.loads((out / "trainer_state.json").read_text())["step"] == 2
    assert cli(args + ["--resume"]) == 0
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4]


def test_resume_drops_metrics_rows_that_are_not_rows(tmp_path):
    """Found by a mutation fuzz of metrics.jsonl: a row {"step": "x"} was a TypeError traceback on every --resume of
    the run (sft's Metrics; pretrain's [1] an AttributeError too); such a line is dropped like one cut short."""
    from pyllm.prepare import prepare
    base = tiny_checkpoint(tmp_path / "base")
    data = _sft_data(tmp_path / "sft.jsonl", n=4)
    out = tmp_path / "o"
    args = ["sft", "--model", str(base), "--data", str(data), "--out", str(out), "--batch-size", "2", "--eval-frac",
            "0", "--steps", "1"]
    assert cli(args) == 0
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": "x"}\n[1]\n')
    assert cli([*args[:-1], "2", "--resume"]) == 0
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2]
    (tmp_path / "in.txt").write_text("\n\n".join(f"doc {i} " * 30 for i in range(40)))
    prepare([str(tmp_path / "in.txt")], tmp_path / "d", byte_level=True, val_fraction=0.1, doc_sep="\n\n", workers=1)
    run = tmp_path / "run"
    pre = ["pretrain", "--data", str(tmp_path / "d"), "--out", str(run), "--dim", "32", "--n-layers", "1", "--n-heads",
           "2", "--seq-len", "32", "--eval-every", "0", "--sample-tokens", "0", "--batch-size", "2"]
    assert cli([*pre, "--max-steps", "1"]) == 0
    with open(run / "metrics.jsonl", "a") as f:
        f.write('[1]\n{"step": "x"}\n')
    assert cli([*pre, "--max-steps", "2", "--resume"]) == 0
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r] == [1, 2]


def test_openai_weight_zero_turn_is_not_trained_on():
    """OpenAI's fine-tuning format marks assistant turns to leave out of the loss with "weight": 0: the key was
    ignored and every such turn trained on."""
    from pyllm.chat import render
    from pyllm.sft import BadLine
    _, tok = tiny_model()
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "bad reply", "weight": 0},
             {"role": "user", "content": "again"}, {"role": "assistant", "content": "good", "weight": 1}]
    msgs = parse_conversation({"messages": turns}, "x:1")
    ids, mask = render(msgs, tok)
    want_ids, want = render([{k: v for k, v in m.items() if k != "weight"} for m in turns], tok)
    assert ids == want_ids
    trained = [i for i, (a, b) in enumerate(zip(mask, want)) if b]
    first = len(tok.encode("bad reply")) + 1                  # the weight-0 turn's content and its <|end|>
    assert sum(want) - sum(mask) == first and mask[trained[0]] == 0 and mask[trained[-1]] == 1
    with pytest.raises(BadLine, match="no assistant turn to train on"):
        parse_conversation({"messages": turns[:2]}, "x:1")
    # preference pairs, prompts, scoring: ignored, as before (a DPO pair's chosen reply of weight 0 trained on an
    # empty completion)
    from pyllm.sft import check_messages
    assert check_messages(turns, "x:1") == [{k: v for k, v in m.items() if k != "weight"} for m in turns]
    for bad, role in ((2, "assistant"), ("0", "assistant"), (0, "user")):
        with pytest.raises(BadLine, match=f"x:1: messages\\[[0-9]\\] weight must be 0 or 1 on an assistant turn, "
                                          f"got {bad!r} on a {role} turn"):
            parse_conversation({"messages": [{"role": "user", "content": "q", **({"weight": bad} if role == "user"
                                                                                 else {})},
                                             {"role": "assistant", "content": "a", **({"weight": bad} if
                                                                                      role == "assistant" else {})}]},
                               "x:1")


@pytest.mark.parametrize("stage", ["sft", "dpo", "reward", "rl"])
def test_out_that_is_not_a_stage_checkpoint_is_refused_before_any_work(tmp_path, capsys, monkeypatch, stage):
    """Each save replaces --out as a whole (keeping only the run's .jsonl/.png/.txt), so a project directory given as
    --out lost its notes and code, a pretraining run's directory its ckpt_* and `latest`, and `--out .` trained the
    whole run and then failed ("'.' has an empty name"). Now refused up front, naming what --out holds."""
    base = tiny_checkpoint(tmp_path / "base")
    data = _sft_data(tmp_path / "d.jsonl")
    proj = tmp_path / "proj"
    (proj / "notes").mkdir(parents=True)
    (proj / "train.py").write_text("code")
    (proj / "notes" / "todo.md").write_text("keep")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    for out, want in ((proj, f"--out {proj}: exists and is not a stage checkpoint (it holds notes, train.py)"),
                      (base, f"--out {base}: is the {'--policy' if stage == 'rl' else '--model'} it starts from"),
                      (".", "--out .: is the current directory or holds it"),
                      (str(tmp_path), f"--out {tmp_path}: is the current directory or holds it")):
        src = ["--policy", str(base), "--prompts", str(data), "--reward-model", str(base)] if stage == "rl" else \
            ["--model", str(base), "--data", str(data)]
        assert cli([stage, *src, "--out", str(out), "--steps", "1", "--device", "cpu"]) == 2, out
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith(f"pyllm {stage}: error: {want}"), err
    assert (proj / "train.py").read_text() == "code" and (proj / "notes" / "todo.md").read_text() == "keep"
    corpus = tmp_path / "corpus"  # a folder of data files: was taken for a run's logs (.jsonl/.txt)
    corpus.mkdir()
    (corpus / "train.jsonl").write_text("{}\n")
    (corpus / "notes.txt").write_text("keep")
    src = ["--policy", str(base), "--prompts", str(data), "--reward-model", str(base)] if stage == "rl" else \
        ["--model", str(base), "--data", str(data)]
    assert cli([stage, *src, "--out", str(corpus), "--steps", "1", "--device", "cpu"]) == 2
    assert capsys.readouterr().err.startswith(f"pyllm {stage}: error: --out {corpus}: exists and is not a stage "
                                              f"checkpoint (it holds notes.txt, train.jsonl)")
    runlog = tmp_path / "killed"  # a run stopped before its first save leaves only its logs: still usable
    runlog.mkdir()
    (runlog / "metrics.jsonl").write_text("")
    if stage == "sft":
        assert cli([stage, "--model", str(base), "--data", str(data), "--out", str(runlog), "--steps", "1",
                    "--batch-size", "2", "--device", "cpu"]) == 0
        assert (runlog / "trainer_state.json").is_file()
