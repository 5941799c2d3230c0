"""Ratio table: pyllm GEMM vs torch (same process, interleaved, median of --reps) at transformer shapes.
Run: PYTHONPATH=$PWD python benchmarks/bench_matmul_table.py [--threads 1 2] [--reps 7] [--shapes 1024x1024x1024|small]
Prints GFLOP/s, the speed ratio (torch time / pyllm time; > 1 means pyllm is faster) and pyllm's fraction of the
fp32 FMA peak measured in the same run (benchmarks/machine.py) for fp32 and bf16, forward (x·Wᵀ) and the two
backward layouts (dY·W, dYᵀ·X). `small` = the Tiny-Shakespeare model's shapes (B·T = 768, d 128, hidden 352)."""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from pyllm import ops
from pyllm._ext import C

SHAPES = ["4096x768x3072", "4096x3072x768", "4096x768x768", "1024x1024x1024"]  # M x K x N
SMALL = ["768x128x128", "768x128x352", "768x352x128", "768x128x256"]


def timeit(fn, n):
    """Seconds for n back-to-back calls, as a one-element list."""
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return [time.perf_counter() - t]


def compare(ours, theirs, reps, min_time=0.02):
    """Interleave the two so background load hits both alike; return the median seconds per call of each
    (a repetition batches calls so it lasts >= min_time: small shapes take ~100 us). A baseline slower than
    1 s and 5x ours per call (torch's bf16 matmul without AVX512_BF16 or AMX: 1-27 s) is timed once: its
    ratio is read to far better than the margin, and five runs of it would take minutes per cell."""
    ours(), theirs()
    t_theirs, t_ours = timeit(theirs, 1)[0], timeit(ours, 1)[0]
    n = max(1, int(min_time / max(t_theirs, 1e-7)))
    once = t_theirs > 1.0 and t_theirs > 5 * t_ours
    a, b = [], [t_theirs] if once else []
    for _ in range(reps):
        a += timeit(ours, n)
        if not once:
            b += timeit(theirs, n)
    return statistics.median(a) / n, statistics.median(b) / n


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts to measure")
    ap.add_argument("--reps", type=int, default=7, help="timed repetitions per kernel (median reported)")
    ap.add_argument("--shapes", nargs="+", default=SHAPES, help="MxKxN shapes, or 'big' / 'small'")
    ap.add_argument("--layouts", nargs="+", default=["fwd", "dx", "dw"], help="fwd (x·Wᵀ), dx (dY·W), dw (dYᵀ·X)")
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], help="fp32 and/or bf16")
    args = ap.parse_args()
    shapes = [s for x in args.shapes for s in (SMALL if x == "small" else SHAPES if x == "big" else [x])]
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from machine import fma_peak_gflops
    print(f"isa={C().isa_get()} torch={torch.__version__} load average {os.getloadavg()} medians of {args.reps}")
    print(f"{'thr':>3} {'dtype':>5} {'layout':>6} {'shape MxKxN':>16} {'pyllm GF/s':>10} {'torch GF/s':>10} "
          f"{'ratio':>6} {'of peak':>7}")
    for th in args.threads:
        torch.set_num_threads(th)
        C().set_threads(th)
        peak = fma_peak_gflops(th)
        print(f"threads={th}: fp32 FMA peak {peak:.0f} GFLOP/s", flush=True)
        for dt in args.dtypes:
            tdt = torch.bfloat16 if dt == "bf16" else torch.float32
            for s in shapes:
                M, K, N = map(int, s.split("x"))
                x = torch.randn(M, K).to(tdt)
                w = torch.randn(N, K).to(tdt)
                dy = torch.randn(M, N).to(tdt)
                for lay in args.layouts:
                    if lay == "fwd":
                        ours = lambda: ops.matmul(x, w)
                        theirs = lambda: x @ w.T
                    elif lay == "dx":
                        ours = lambda: ops.matmul(dy, w, trans_b=True)
                        theirs = lambda: dy @ w
                    else:
                        ours = lambda: ops.matmul(dy, x, trans_a=True, trans_b=True)
                        theirs = lambda: dy.T @ x
                    a, b = compare(ours, theirs, args.reps)
                    fl = 2.0 * M * N * K
                    print(f"{th:>3} {dt:>5} {lay:>6} {s:>16} {fl / a / 1e9:>10.1f} {fl / b / 1e9:>10.1f} {b / a:>6.2f}"
                          f" {fl / a / 1e9 / peak:>7.2f}", flush=True)


if __name__ == "__main__":
    main()
