"""Tokens/s of the C runtime (pyllm-run) on llama2.c's 15M and 110M shapes, random weights, with a prompt.

Compared in the same run against (a) pyllm's torch `generate` (KV cache, backend "torch") and (b) the memory-bandwidth
floor: weight bytes read per token / copy bandwidth measured now (benchmarks/machine.py). fp32 and Q8_0, 1 and 2
threads. Appends rows to benchmarks/results_run.md.

    PYTHONPATH=$PWD python benchmarks/bench_run.py                      # both shapes (a few minutes)
    PYTHONPATH=$PWD python benchmarks/bench_run.py --shapes 15M --threads 1
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from machine import copy_bandwidth_gbs  # noqa: E402

from pyllm.config import preset  # noqa: E402
from pyllm.export import auto_group_size, write_model_bin  # noqa: E402
from pyllm.model import GPT  # noqa: E402
from pyllm.runtime import BIN_PATH  # noqa: E402

PROMPT = "Once upon a time, there was a little girl named Lily who"
TOKENIZER = ROOT.parent / "shared" / "data" / "llama2c-tokenizer.bin"


def weight_bytes_per_token(path: Path, cfg) -> int:
    """Bytes of weights read for one token: everything in the file except the embedding table when it is not the
    classifier (then only one row is read). Header and one embedding row are negligible."""
    size = path.stat().st_size
    if cfg.tie_embeddings:
        return size
    emb = cfg.vocab_size * cfg.dim
    per = 4 if "f32" in path.name else 1 + 4 / auto_group_size(cfg)
    return int(size - emb * per)


def run_binary(model: Path, threads: int, steps: int) -> float:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    r = subprocess.run([str(BIN_PATH), str(model), "-z", str(TOKENIZER), "-n", str(steps), "-t", "0.8", "-s", "1",
                        "-i", PROMPT], capture_output=True, text=True, env=env, timeout=900)
    if r.returncode != 0:
        raise RuntimeError(r.stderr)
    return float(re.search(r"achieved tok/s: ([0-9.]+)", r.stderr).group(1))


def torch_generate_tps(model: GPT, threads: int, prompt_len: int, steps: int) -> float:
    torch.set_num_threads(threads)
    idx = torch.randint(0, model.config.vocab_size, (1, prompt_len))
    with torch.no_grad():
        model.generate(idx, 4, temperature=0.8, seed=1)  # warm-up
        t = time.perf_counter()
        model.generate(idx, steps - prompt_len, temperature=0.8, seed=1)
        dt = time.perf_counter() - t
    return (steps - 1) / dt  # same count as the binary: positions after the first, prompt included


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["15M", "110M"], help="llama2.c presets (default: 15M 110M)")
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2], help="thread counts (default: 1 2)")
    ap.add_argument("--steps", type=int, default=0, help="positions per run; 0 = 128 for 15M, 64 for 110M")
    ap.add_argument("--no-torch", action="store_true", help="skip the torch generate baseline")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results_run.md"), help="markdown file to append to")
    args = ap.parse_args()
    if not BIN_PATH.exists():
        sys.exit(f"{BIN_PATH} not built: python setup.py build_ext --inplace")
    if not TOKENIZER.exists():
        sys.exit(f"{TOKENIZER} not found (llama2.c's tokenizer.bin, 32000 tokens)")
    bw = {t: copy_bandwidth_gbs(t) for t in args.threads}
    print("copy bandwidth GB/s:", {t: round(b, 1) for t, b in bw.items()})
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for shape in args.shapes:
            cfg = preset(shape)
            steps = args.steps or (128 if shape == "15M" else 64)
            torch.manual_seed(0)
            model = GPT(cfg, backend="torch").eval()
            sd = model.state_dict()
            prompt_len = 14  # tokens of PROMPT with llama2.c's tokenizer, about
            paths = {"fp32": Path(d) / f"{shape}_f32.bin", "q8_0": Path(d) / f"{shape}_q8.bin"}
            write_model_bin(paths["fp32"], sd, cfg)
            write_model_bin(paths["q8_0"], sd, cfg, quantize="q8_0", group_size=auto_group_size(cfg))
            for th in args.threads:
                tt = None if args.no_torch else torch_generate_tps(model, th, prompt_len, steps)
                for wt, p in paths.items():
                    tps = run_binary(p, th, steps)
                    wb = weight_bytes_per_token(p, cfg)
                    floor = bw[th] * 1e9 / wb
                    rows.append((shape, wt, th, steps, tps, tt, floor, wb, bw[th]))
                    print(f"{shape} {wt} threads={th}: {tps:.1f} tok/s | torch generate "
                          f"{'-' if tt is None else f'{tt:.1f}'} tok/s | floor {floor:.1f} tok/s "
                          f"({wb / 1e6:.0f} MB/token at {bw[th]:.1f} GB/s) -> {tps / floor:.0%} of floor"
                          + ("" if tt is None else f", {tps / tt:.2f}x torch"))
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    out = Path(args.out)
    new = not out.exists()
    with open(out, "a") as f:
        if new:
            f.write("# pyllm-run benchmarks (benchmarks/bench_run.py)\n\nRandom weights, llama2.c tokenizer, prompt "
                    f"{PROMPT!r}, temperature 0.8. tok/s counts positions after the first (llama2.c's way).\n"
                    "Floor = copy bandwidth measured in the same run / weight bytes per token.\n")
        f.write(f"\n## {stamp}, {platform.node()}, {os.cpu_count()} CPUs — INDICATIVE: machine shared with ~8 "
                "engineers\n\n| shape | weights | threads | steps | pyllm-run tok/s | torch generate tok/s | "
                "floor tok/s | % of floor | x torch | MB/token | copy GB/s |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
        for shape, wt, th, steps, tps, tt, floor, wb, b in rows:
            f.write(f"| {shape} | {wt} | {th} | {steps} | {tps:.1f} | {'-' if tt is None else f'{tt:.1f}'} | "
                    f"{floor:.1f} | {tps / floor:.0%} | {'-' if tt is None else f'{tps / tt:.2f}'} | {wb / 1e6:.0f} | "
                    f"{b:.1f} |\n")
    print(f"appended to {out}")


if __name__ == "__main__":
    main()
