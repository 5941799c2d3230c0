"""Sampling benchmark: pyllm's kernel vs torch's sort-based top-p recipe (softmax, sort, cumsum, mask,
multinomial), same run, same inputs. Run: PYTHONPATH=. python benchmarks/bench_sample.py [--threads 1] [--reps 20]
Prints a markdown table of ms per call and the speed-up ratio: medians of --repeats timings, each a block of --reps
calls, the two recipes interleaved block by block so machine noise hits both alike."""
import argparse
import statistics
import time

import torch

from pyllm import ops
from pyllm._ext import C


def torch_top_p(logits, temperature, top_p, gen):
    """The usual torch recipe (nanoGPT/HF style): a full softmax and a full sort of the vocabulary per row."""
    probs = torch.softmax(logits / temperature, -1)
    sp, si = torch.sort(probs, dim=-1, descending=True)
    cum = torch.cumsum(sp, -1)
    sp[(cum - sp) > top_p] = 0.0
    sp.div_(sp.sum(-1, keepdim=True))
    pick = torch.multinomial(sp, 1, generator=gen)
    return si.gather(-1, pick).squeeze(-1)


def block(fn, reps):
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def bench(fns, reps, repeats):
    """Median seconds per call of each fn, timed in interleaved blocks of `reps` calls."""
    for fn in fns:
        fn()  # warm-up
    times = [[] for _ in fns]
    for _ in range(repeats):
        for t, fn in zip(times, fns):
            t.append(block(fn, reps))
    return [statistics.median(t) for t in times]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="threads for torch and the kernels")
    ap.add_argument("--reps", type=int, default=10, help="calls per timed block")
    ap.add_argument("--repeats", type=int, default=7, help="timed blocks per recipe; the median is reported")
    ap.add_argument("--scale", type=float, default=3.0, help="logits = randn * scale (LM-like peakiness)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    C().set_threads(a.threads)
    gen = torch.Generator().manual_seed(0)
    print(f"threads {a.threads}, isa {C().isa_get()}, logits randn*{a.scale}, top_p 0.9, T 1.0, medians of "
          f"{a.repeats} interleaved blocks of {a.reps} calls")
    print("| vocab | batch | torch sort top-p ms | pyllm top-p ms | ratio | pyllm top-k 50 ms | pyllm greedy ms |")
    print("|---|---|---|---|---|---|---|")
    for V in (32000, 50257):
        for B in (1, 64):
            x = torch.randn(B, V, generator=gen) * a.scale
            t_torch, t_ours, t_k, t_g = bench([lambda: torch_top_p(x, 1.0, 0.9, gen),
                                               lambda: ops.sample(x, 1.0, top_p=0.9, seed=1),
                                               lambda: ops.sample(x, 1.0, top_k=50, seed=1),
                                               lambda: ops.sample(x, 0.0)], a.reps, a.repeats)
            print(f"| {V} | {B} | {t_torch*1e3:.3f} | {t_ours*1e3:.3f} | {t_torch/t_ours:.1f}x | {t_k*1e3:.3f} | "
                  f"{t_g*1e3:.3f} |")


if __name__ == "__main__":
    main()
