"""Ratio table: pyllm GEMM vs torch (same process, interleaved, best of --reps) at transformer shapes.
Run: PYTHONPATH=$PWD python benchmarks/bench_matmul_table.py [--threads 1 2] [--reps 5] [--shapes 1024x1024x1024]
Prints GFLOP/s and speed ratio (torch time / pyllm time; > 1 means pyllm is faster) for fp32 and bf16,
forward (x·Wᵀ) and the two backward layouts (dY·W, dYᵀ·X)."""
import argparse
import time

import torch

from pyllm import ops
from pyllm._ext import C

SHAPES = ["4096x768x3072", "4096x3072x768", "4096x768x768", "1024x1024x1024"]  # M x K x N


def timeit(fn, reps):
    fn()  # warm-up
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return ts


def compare(ours, theirs, reps):
    """Interleave the two so background load hits both alike; return the best (min) seconds of each: on a
    shared machine the minimum is the least-disturbed run."""
    ours(), theirs()
    a, b = [], []
    for _ in range(reps):
        a += timeit(ours, 1)
        b += timeit(theirs, 1)
    return min(a), min(b)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts to measure")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions per kernel (best reported)")
    ap.add_argument("--shapes", nargs="+", default=SHAPES, help="MxKxN shapes")
    ap.add_argument("--layouts", nargs="+", default=["fwd", "dx", "dw"], help="fwd (x·Wᵀ), dx (dY·W), dw (dYᵀ·X)")
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], help="fp32 and/or bf16")
    args = ap.parse_args()
    print(f"isa={C().isa_get()} torch={torch.__version__}")
    print(f"{'thr':>3} {'dtype':>5} {'layout':>6} {'shape MxKxN':>16} {'pyllm GF/s':>10} {'torch GF/s':>10} {'ratio':>6}")
    for th in args.threads:
        torch.set_num_threads(th)
        C().set_threads(th)
        for dt in args.dtypes:
            tdt = torch.bfloat16 if dt == "bf16" else torch.float32
            for s in args.shapes:
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
                    print(f"{th:>3} {dt:>5} {lay:>6} {s:>16} {fl / a / 1e9:>10.1f} {fl / b / 1e9:>10.1f} {b / a:>6.2f}",
                          flush=True)


if __name__ == "__main__":
    main()
