"""Issue 3's training-step benchmark: a full step (forward, backward, AdamW) of a 6-layer, d=384, 6-head model at
B=8, T=256, vocab 8192, in tokens/s — pyllm kernels (fp32, and under bf16 autocast: bf16 GEMM operands, fp32 master
weights) vs torch eager fp32 and torch bf16 autocast, same process, steps interleaved, median per side.   Run: python benchmarks/bench_train_step.py [--threads 1 2] [--steps 5]
  --shape shakespeare: issue 4's nanoGPT recipe model (4 layers, d=128, 4 heads, T=64, B=12, vocab 262) instead.
  --kernels: also time every pyllm._C call inside the pyllm steps: ms/step per kernel, the GEMM share, and the
             rest (Python, autograd, torch glue) — the per-op profile behind the ratios; and GFLOP/s per GEMM shape.
  --separate R: instead, each variant in its own process (as a user runs it), R rounds alternating the order, and the
             median of the per-round ratios. In one process the four models share the allocator and caches: on
             2026-11-24 that slowed torch eager by up to 25% and overstated pyllm's ratio (RESULTS.md, session 8).
"""
from __future__ import annotations

import argparse
import collections
import statistics
import subprocess
import sys
import time

import torch

import pyllm._ext as ext
from pyllm._ext import C
from pyllm.config import ModelConfig
from pyllm.model import GPT
from pyllm import ops


SHAPES = {  # name: (config, B, T)
    "issue3": (dict(vocab_size=8192, dim=384, n_layers=6, n_heads=6, max_seq_len=256), 8, 256),
    "shakespeare": (dict(vocab_size=262, dim=128, n_layers=4, n_heads=4, max_seq_len=64), 12, 64),
}


class KernelTimer:
    """Stands in for pyllm._C and times each kernel call (wall time, GIL released inside)."""

    def __init__(self, real):
        self.real, self.t, self.n = real, collections.defaultdict(float), collections.Counter()

    def __getattr__(self, name):
        f = getattr(self.real, name)
        if not callable(f):
            return f

        def timed(*a):
            t0 = time.perf_counter()
            r = f(*a)
            dt = time.perf_counter() - t0
            self.t[name] += dt
            self.n[name] += 1
            if name == "matmul_forward":  # also per GEMM (M, N, K, trans_a, trans_b): which shape is slow in a step
                key = tuple(a[4:7]) + tuple(a[10:12])
                self.t[key] += dt
                self.n[key] += 1
            return r
        return timed


def make(backend: str, shape: str = "issue3", seed: int = 0):
    torch.manual_seed(seed)
    cfg = ModelConfig(**SHAPES[shape][0])
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
    ap.add_argument("--shape", choices=sorted(SHAPES), default="issue3", help="model and batch (issue3)")
    ap.add_argument("--kernels", action="store_true", help="also print the per-kernel time of a pyllm step")
    ap.add_argument("--separate", type=int, default=0, metavar="R",
                    help="run each variant in its own process, R rounds in alternating order (0: one process)")
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=VARIANTS,
                    help="the variants to run (torch_bf16 takes ~1 min per step on a CPU without bf16 arithmetic); "
                         "--kernels always times pyllm")
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    cfg, B, T = SHAPES[args.shape]
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg["vocab_size"], (B, T), generator=g)
    y = torch.randint(0, cfg["vocab_size"], (B, T), generator=g)
    if args.child:   # one variant alone: warm-up, then the median tok/s of --steps steps
        torch.set_num_threads(args.threads[0])
        C().set_threads(args.threads[0])
        m, opt = make(args.child.split("_")[0], args.shape)
        ac = args.child.endswith("_bf16")
        step(m, opt, x, y, ac)
        print(B * T / statistics.median(step(m, opt, x, y, ac) for _ in range(args.steps)))
        return
    if args.separate:
        separate(args)
        return
    print("one process, the --variants models (torch eager runs slower beside the others than alone: --separate R "
          "gives the per-process figure)")
    print("| threads | pyllm fp32 tok/s | pyllm bf16 GEMMs tok/s | torch eager fp32 tok/s | torch bf16 autocast tok/s"
          " | pyllm / torch fp32 | pyllm / torch bf16 | pyllm bf16 / torch fp32 | pyllm bf16 / torch bf16 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for th in args.threads:
        torch.set_num_threads(th)
        C().set_threads(th)
        names = list(dict.fromkeys(args.variants + (["pyllm"] if args.kernels else [])))
        variants = {k: (*make(k.split("_")[0], args.shape), k.endswith("_bf16")) for k in names}
        times = {k: [] for k in variants}
        for k, (m, opt, ac) in variants.items():
            step(m, opt, x, y, ac)  # warm-up
        for _ in range(args.steps):
            for k, (m, opt, ac) in variants.items():
                times[k].append(step(m, opt, x, y, ac))
        tps = {k: B * T / statistics.median(v) for k, v in times.items()}
        cell = lambda k: f"{tps[k]:.0f}" if k in tps else "-"                         # noqa: E731
        ratio = lambda a, b: f"{tps[a] / tps[b]:.2f}x" if a in tps and b in tps else "-"  # noqa: E731
        print(f"| {th} | {cell('pyllm')} | {cell('pyllm_bf16')} | {cell('torch')} | {cell('torch_bf16')} | "
              f"{ratio('pyllm', 'torch')} | {ratio('pyllm', 'torch_bf16')} | "
              f"{ratio('pyllm_bf16', 'torch')} | {ratio('pyllm_bf16', 'torch_bf16')} |", flush=True)
        if args.kernels:
            kt = KernelTimer(ext._C)
            ext._C, real = kt, ext._C
            try:
                wall = [step(*variants["pyllm"][:2], x, y) for _ in range(args.steps)]
            finally:
                ext._C = real
            n, tot = args.steps, sum(wall)
            kern = sum(v for k, v in kt.t.items() if isinstance(k, str))  # per-shape GEMM keys repeat matmul_forward
            print(f"\n{th} thread(s), pyllm step {1e3 * tot / n:.1f} ms: kernels {1e3 * kern / n:.1f} ms, the rest "
                  f"(Python, autograd, torch glue) {1e3 * (tot - kern) / n:.1f} ms; GEMM (matmul_forward) "
                  f"{100 * kt.t['matmul_forward'] / tot:.0f}% of the step\n\n| kernel | ms/step | calls/step |\n|---|---|---|")
            for k, v in sorted(kt.t.items(), key=lambda kv: -kv[1]):
                if isinstance(k, str):
                    print(f"| {k} | {1e3 * v / n:.2f} | {kt.n[k] / n:.0f} |")
            print("\n| GEMM M x N x K (trans_a, trans_b) | ms/step | calls/step | GFLOP/s in the step |\n|---|---|---|---|")
            for k, v in sorted(kt.t.items(), key=lambda kv: -kv[1]):
                if isinstance(k, tuple):
                    print(f"| {k[0]}x{k[1]}x{k[2]} ({k[3]:d}, {k[4]:d}) | {1e3 * v / n:.2f} | {kt.n[k] / n:.0f} | "
                          f"{2.0 * k[0] * k[1] * k[2] * kt.n[k] / v / 1e9:.1f} |")
            print(flush=True)


VARIANTS = ["pyllm", "pyllm_bf16", "torch", "torch_bf16"]


def run_separate(threads: int, rounds: int, steps: int, shape: str = "issue3",
                 variants: list[str] = VARIANTS) -> dict[str, list[float]]:
    """tok/s of each variant, each run in a fresh process, `rounds` times with the order reversed every other round."""
    tps = {k: [] for k in variants}
    for r in range(rounds):
        for k in (variants if r % 2 == 0 else variants[::-1]):
            out = subprocess.run([sys.executable, __file__, "--child", k, "--threads", str(threads), "--steps",
                                  str(steps), "--shape", shape], capture_output=True, text=True, check=True).stdout
            tps[k].append(float(out.split()[-1]))
    return tps


def paired_ratio(tps: dict[str, list[float]], a: str, b: str) -> float:
    """Median over rounds of variant a's tok/s over variant b's in the same round."""
    return statistics.median(x / y for x, y in zip(tps[a], tps[b]))


def separate(args):
    """Each variant in a fresh process, R rounds, the order reversed every other round; medians and paired ratios."""
    vs = args.variants
    pairs = [(a, b) for a in ("pyllm", "pyllm_bf16") for b in ("torch", "torch_bf16") if a in vs and b in vs]
    print(f"separate processes, {args.separate} rounds: tok/s medians; ratios the median of the per-round ratios")
    print("| threads | " + " | ".join(f"{v} tok/s" for v in vs) + "".join(f" | {a} / {b}" for a, b in pairs)
          + " |\n|---|" + "---|" * (len(vs) + len(pairs)))
    for th in args.threads:
        tps = run_separate(th, args.separate, args.steps, args.shape, vs)
        cells = [f"{statistics.median(tps[v]):.0f}" for v in vs] + [f"{paired_ratio(tps, a, b):.2f}x" for a, b in pairs]
        rounds = (f"   per round pyllm / torch: {' '.join(f'{a / b:.2f}' for a, b in zip(tps['pyllm'], tps['torch']))}"
                  if "pyllm" in vs and "torch" in vs else "")
        print(f"| {th} | " + " | ".join(cells) + " |" + rounds, flush=True)


if __name__ == "__main__":
    main()
