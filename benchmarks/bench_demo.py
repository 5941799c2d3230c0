"""benchmarks/bench_demo.py: the full `pyllm demo` over 3 seeds; mean and spread of every report-card number.

    PYTHONPATH=$PWD python benchmarks/bench_demo.py [--seeds 0 1 2] [--out /tmp/bench-demo] [--quick]
    PYTHONPATH=$PWD python benchmarks/bench_demo.py --wrap /work/wt/cpu   # each seed's run under a lock command
Writes a markdown table to stdout and to benchmarks/results_demo.md (date + machine), each run's report under --out.
"Beyond the seed spread" is decided on the paired gap: for each seed, the later stage minus the earlier one on
that seed's own run and the same held-out prompts (e.g. RL - SFT of seed s); the verdict is yes when the mean of
these per-seed gaps exceeds their standard deviation over seeds (sample std, n-1) and every per-seed gap is > 0.
The unpaired view is printed beside it: every seed's value above every seed's value of the earlier stage
(min > max), and the mean gap against the sum of the two stages' standard deviations; seeds differ in their
whole pipeline (data, pretraining, SFT), so the unpaired spread mostly measures how good each seed's SFT model is.
Per seed, RL vs SFT is also tested per problem: the greedy answers that flipped wrong->right vs right->wrong on the
same held-out prompts, with a one-sided exact sign test (a gain is real on a seed when p < 0.05).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROWS = [("base few-shot accuracy", ("base", "few_shot_accuracy")),
        ("SFT accuracy (greedy)", ("sft", "accuracy")),
        ("RL accuracy (greedy)", ("rl", "accuracy")),
        ("SFT accuracy (sampled)", ("sft", "sampled_accuracy")),
        ("RL accuracy (sampled)", ("rl", "sampled_accuracy")),
        ("SFT format-valid", ("sft", "format_valid")),
        ("RL format-valid", ("rl", "format_valid")),
        ("RM pairwise accuracy", ("rm", "accuracy")),
        ("RM length-only baseline", ("rm", "length_baseline")),
        ("RL KL to SFT (nats/response)", ("rl", "kl_to_sft")),
        ("RM score, SFT samples", ("sft", "rm_score_sampled")),
        ("RM score, RL samples", ("rl", "rm_score_sampled")),
        ("base val loss (nats/token)", ("base", "val_loss")),
        ("base bits per byte", ("base", "bits_per_byte")),
        ("total wall time (s)", ("total_seconds",)),
        ("load average at start (1 min)", ("load_avg", 0))]


def get(r: dict, path):
    for k in path:
        try:
            r = r[k]
        except (KeyError, IndexError):
            return float("nan")  # a run from before this quantity was recorded
    return float(r)


def stage_seconds(r: dict) -> dict:
    """Wall seconds per stage name (training + its evaluation) from a run's timing table."""
    out: dict = {}
    for row in r.get("timing", []):
        name = row["stage"].replace("eval ", "").replace("reward model", "rm").replace(" (reused)", "")
        name = {"base": "pretrain", "data + tokenizer + prepare": "data"}.get(name, name)
        out[name] = out.get(name, 0.0) + row["seconds"]
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds to run (0 1 2)")
    p.add_argument("--out", default="/tmp/bench-demo", help="parent directory of the runs (/tmp/bench-demo)")
    p.add_argument("--quick", action="store_true", help="run --quick demos (plumbing check of this script)")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results_demo.md"), help="markdown output file")
    p.add_argument("--wrap", default="", help="command prefix for each seed's run, e.g. a lock: /work/wt/cpu")
    p.add_argument("--demo-args", default="", help="extra `pyllm demo` arguments for every seed, e.g. "
                                                    "'--from-stage rl' to rerun RL on the runs already in --out")
    p.add_argument("--reuse", action="store_true", help="take a seed's finished run from --out instead of rerunning")
    a = p.parse_args()
    runs = []
    for s in a.seeds:
        out = Path(a.out) / f"seed{s}"
        cmd = [sys.executable, "-m", "pyllm", "demo", "--out", str(out), "--seed", str(s)] + (["--quick"] if a.quick
                                                                                             else [])
        cmd = a.wrap.split() + cmd + a.demo_args.split()
        t0 = time.perf_counter()
        if a.reuse and (out / "results.json").is_file() and not json.loads(
                (out / "results.json").read_text()).get("reused"):
            print(f"seed {s}: reusing {out / 'results.json'}", flush=True)
        else:
            print("+", " ".join(cmd), flush=True)
            env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
            subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
        r = json.loads((out / "results.json").read_text())
        print(f"seed {s}: {time.perf_counter() - t0:.0f} s, base {r['base']['few_shot_accuracy']:.3f} "
              f"sft {r['sft']['accuracy']:.3f} rl {r['rl']['accuracy']:.3f} rm {r['rm']['accuracy']:.3f}", flush=True)
        runs.append(r)
    lines = [f"## pyllm demo over seeds {a.seeds} ({datetime.date.today()}, {platform.node()}, "
             f"{os.cpu_count()} CPUs, {runs[0]['threads']} torch threads{', --quick' if a.quick else ''})", "",
             "| quantity | " + " | ".join(f"seed {s}" for s in a.seeds) + " | mean | std |",
             "|---|" + "---|" * (len(a.seeds) + 2)]
    stats = {}
    for name, path in ROWS:
        v = [get(r, path) for r in runs]
        sd = statistics.stdev(v) if len(v) > 1 else 0.0
        stats[name] = (v, statistics.mean(v), sd)
        lines.append(f"| {name} | " + " | ".join(f"{x:.3f}" for x in v) + f" | {statistics.mean(v):.3f} | {sd:.3f} |")
    secs = [stage_seconds(r) for r in runs]
    for name in secs[0]:
        v = [sc.get(name, float("nan")) for sc in secs]
        lines.append(f"| wall s: {name} (+ eval) | " + " | ".join(f"{x:.1f}" for x in v) +
                     f" | {statistics.mean(v):.1f} | {statistics.stdev(v) if len(v) > 1 else 0.0:.1f} |")
    lines.append("")
    for lo, hi in (("base few-shot accuracy", "SFT accuracy (greedy)"), ("SFT accuracy (greedy)", "RL accuracy (greedy)"),
                   ("SFT accuracy (sampled)", "RL accuracy (sampled)"),
                   ("RM length-only baseline", "RM pairwise accuracy")):
        (vl, ml, sl), (vh, mh, sh) = stats[lo], stats[hi]
        d = [x - y for x, y in zip(vh, vl)]
        sd = statistics.stdev(d) if len(d) > 1 else 0.0
        ok = statistics.mean(d) > sd and min(d) > 0
        unpaired = f"min {min(vh):.3f} vs max {max(vl):.3f}: {'yes' if min(vh) > max(vl) else 'no'}; mean gap " \
                   f"{mh - ml:+.3f} vs std sum {sl:.3f} + {sh:.3f}: {'yes' if mh - ml > sl + sh else 'no'}"
        lines.append(f"- {hi} > {lo}: paired per-seed gaps {', '.join(f'{x:+.3f}' for x in d)}, mean "
                     f"{statistics.mean(d):+.3f} vs std {sd:.3f} -> {'yes' if ok else 'NO'} (unpaired view: "
                     f"{unpaired})")
    fl = [r["rl"].get("flips") for r in runs]
    if all(fl):  # per problem, the same held-out prompts: SFT vs RL greedy answers (pyllm.demo.flips)
        lines.append("- RL vs SFT greedy, per problem (wrong->right / right->wrong, one-sided sign test p): "
                     + ", ".join(f"seed {s_} {f['wrong_to_right']}/{f['right_to_wrong']} p {f['sign_test_p']:.2g}"
                                 for s_, f in zip(a.seeds, fl))
                     + f" -> every seed p < 0.05: {'yes' if all(f['sign_test_p'] < 0.05 for f in fl) else 'NO'}")
    text = "\n".join(lines) + "\n"
    print(text)
    with open(a.results, "a") as f:
        f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
