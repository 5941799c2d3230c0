"""Issue 3's training-step benchmark: a full step (forward, backward, AdamW) of a 6-layer, d=384, 6-head model at
B=8, T=256, vocab 8192, in tokens/s — pyllm kernels vs torch eager fp32 (and torch bf16 autocast), same process,
steps interleaved, median per side.   Run: python benchmarks/bench_train_step.py [--threads 1 2] [--steps 5]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from pyllm._ext import C
from pyllm.config import ModelConfig
from pyllm.model import GPT
from pyllm import ops


def make(backend: str, seed: int = 0):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=8192, dim=384, n_layers=6, n_heads=6, max_seq_len=256)
    m = GPT(cfg, backend=backend)
    decay = [p for p in m.parameters() if p.dim() >= 2]
    no_decay = [p for p in m.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    opt = (ops.AdamW if backend == "pyllm" else torch.optim.AdamW)(groups, lr=3e-4, betas=(0.9, 0.95))
    return m, opt


def step(m, opt, x, y, autocast: bool = False):
    t = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        _, loss = m(x, targets=y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts to measure")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per variant (after 1 warm-up step)")
    args = ap.parse_args()
    B, T = 8, 256
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 8192, (B, T), generator=g)
    y = torch.randint(0, 8192, (B, T), generator=g)
    print(f"| threads | pyllm fp32 tok/s | torch eager fp32 tok/s | torch bf16 autocast tok/s | pyllm / torch fp32 |"
          f" pyllm / torch bf16 |")
    print("|---|---|---|---|---|---|")
    for th in args.threads:
        torch.set_num_threads(th)
        C().set_threads(th)
        variants = {"pyllm": (*make("pyllm"), False), "torch": (*make("torch"), False),
                    "torch_bf16": (*make("torch"), True)}
        times = {k: [] for k in variants}
        for k, (m, opt, ac) in variants.items():
            step(m, opt, x, y, ac)  # warm-up
        for _ in range(args.steps):
            for k, (m, opt, ac) in variants.items():
                times[k].append(step(m, opt, x, y, ac))
        tps = {k: B * T / statistics.median(v) for k, v in times.items()}
        print(f"| {th} | {tps['pyllm']:.0f} | {tps['torch']:.0f} | {tps['torch_bf16']:.0f} | "
              f"{tps['pyllm'] / tps['torch']:.2f}x | {tps['pyllm'] / tps['torch_bf16']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
