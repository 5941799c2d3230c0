"""Paired GEMM ratios at the issue-3 training step's shapes: pyllm (auto path, forced direct, forced packed) vs torch.
Run: PYTHONPATH=$PWD python benchmarks/bench_matmul_step.py [--threads 1] [--reps 21] [--shapes M,N,K,ta,tb ...]
Each repetition runs every variant ~40 ms back to back into a preallocated output (torch via out=); the ratio
torch/variant is taken per repetition, so slow drift of this shared VM cancels within a pair, and the median
over repetitions is printed. Shapes are (M, N, K, trans_a, trans_b) of C (M, N) = op(A) op(B)^T as ops._gemm
takes them (the 6L d384 T256 B8 V8192 step: qkv, gate|up, down, lm head; forward, dX, dW)."""
import argparse
import os
import statistics
import time

import torch

from pyllm import ops
from pyllm._ext import C

STEP = ["2048,384,2048,0,1", "2048,384,2048,1,1", "2048,2048,384,0,0", "2048,8192,384,0,0", "8192,384,2048,1,1",
        "2048,384,8192,0,1", "1152,384,2048,1,1", "2048,384,1152,0,1", "2048,1152,384,0,0", "384,384,2048,1,1",
        "384,1024,2048,1,1", "2048,384,384,0,1", "2048,384,1024,0,0"]


def set_path(v):
    if v:
        os.environ["PYLLM_GEMM"] = v
    else:
        os.environ.pop("PYLLM_GEMM", None)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="threads for both sides")
    ap.add_argument("--reps", type=int, default=21, help="interleaved repetitions (median of per-rep ratios)")
    ap.add_argument("--shapes", nargs="+", default=STEP, help="M,N,K,trans_a,trans_b of each GEMM")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    C().set_threads(args.threads)
    print(f"threads {args.threads}, load average {os.getloadavg()}, torch {torch.__version__}")
    tot = dict(auto=0.0, torch=0.0)
    for spec in args.shapes:
        M, N, K, ta, tb = map(int, spec.split(","))
        a = torch.randn(K, M) if ta else torch.randn(M, K)
        b = torch.randn(K, N) if tb else torch.randn(N, K)
        out, out2 = torch.empty(M, N), torch.empty(M, N)
        A, Bm = (a.T if ta else a), (b if tb else b.T)

        def ours(path):
            def f():
                set_path(path)
                ops._gemm(a, b, M, N, K, bool(ta), bool(tb), out=out)
            return f
        fns = [ours(None), ours("direct"), ours("packed"), lambda: torch.matmul(A, Bm, out=out2)]
        t = time.perf_counter()
        fns[3]()
        n = max(1, int(0.04 / (time.perf_counter() - t)))
        ts = [[] for _ in fns]
        for _ in range(args.reps):
            for j, fn in enumerate(fns):
                fn()
                t = time.perf_counter()
                for _ in range(n):
                    fn()
                ts[j].append((time.perf_counter() - t) / n)
        set_path(None)
        rat = [statistics.median(x / y for x, y in zip(ts[3], ts[j])) for j in range(3)]
        md = [statistics.median(x) for x in ts]
        tot["auto"] += md[0]
        tot["torch"] += md[3]
        print(f"{M}x{N}x{K} ta{ta} tb{tb}: torch/pyllm auto {rat[0]:.2f}  direct {rat[1]:.2f}  packed {rat[2]:.2f}"
              f"  | torch {2 * M * N * K / md[3] / 1e9:.0f} GFLOP/s", flush=True)
    print(f"sum of medians: pyllm {tot['auto'] * 1e3:.1f} ms, torch {tot['torch'] * 1e3:.1f} ms "
          f"(torch/pyllm {tot['torch'] / tot['auto']:.2f})")


if __name__ == "__main__":
    main()
