"""Sampling benchmark: pyllm's kernel vs torch's sort-based top-p recipe (softmax, sort, cumsum, mask,
multinomial), same run, same inputs. Run: PYTHONPATH=. python benchmarks/bench_sample.py [--threads 1] [--reps 20]
Prints a markdown table of ms per call and the speed-up ratio. Short indicative runs on a shared machine."""
import argparse
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


def bench(fn, reps):
    fn()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - t0) / reps)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="threads for torch and the kernels")
    ap.add_argument("--reps", type=int, default=10, help="calls per timing (best of 3)")
    ap.add_argument("--scale", type=float, default=3.0, help="logits = randn * scale (LM-like peakiness)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    C().set_threads(a.threads)
    gen = torch.Generator().manual_seed(0)
    print(f"threads {a.threads}, isa {C().isa_get()}, logits randn*{a.scale}, top_p 0.9, T 1.0 (indicative)")
    print("| vocab | batch | torch sort top-p ms | pyllm top-p ms | ratio | pyllm top-k 50 ms | pyllm greedy ms |")
    print("|---|---|---|---|---|---|---|")
    for V in (32000, 50257):
        for B in (1, 64):
            x = torch.randn(B, V, generator=gen) * a.scale
            t_torch = bench(lambda: torch_top_p(x, 1.0, 0.9, gen), a.reps)
            t_ours = bench(lambda: ops.sample(x, 1.0, top_p=0.9, seed=1), a.reps)
            t_k = bench(lambda: ops.sample(x, 1.0, top_k=50, seed=1), a.reps)
            t_g = bench(lambda: ops.sample(x, 0.0), a.reps)
            print(f"| {V} | {B} | {t_torch*1e3:.3f} | {t_ours*1e3:.3f} | {t_torch/t_ours:.1f}x | {t_k*1e3:.3f} | "
                  f"{t_g*1e3:.3f} |")


if __name__ == "__main__":
    main()
