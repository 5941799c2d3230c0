"""Fused ops vs their torch compositions (pyllm.ref), forward+backward, same run, at the issue's small-model shapes
(B8 T256 d384 6 heads, hidden 1024, vocab 8192). Run: PYTHONPATH=. python benchmarks/bench_fused.py [--threads 1]
Prints a markdown table of ms per call (medians of alternating rounds) and the ratio. Short indicative runs on a
shared machine. Only the inputs that get a gradient in the model require one (rope's cos/sin tables do not)."""
import argparse
import statistics
import time

import torch

from pyllm import ops, ref
from pyllm._ext import C


def bench_pair(theirs, ours, reps, rounds=5):
    """(torch s, pyllm s) per call: medians over rounds that alternate the two sides (a busy spell hits both)."""
    theirs(), ours()
    t, o = [], []
    for _ in range(rounds):
        for fn, out in ((theirs, t), (ours, o)):
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            out.append((time.perf_counter() - t0) / reps)
    return statistics.median(t), statistics.median(o)


def fwd_bwd(f, *xs, grad=(0,)):
    """f(*xs) forward + backward, with gradients for the inputs at positions `grad` only. Every floating input with
    dim > 1 once required grad: the torch side then also differentiated rope's (T, D/2) tables, work the model never
    asks for (and ops.rope refuses tables that require grad, so the script stopped at its first row)."""
    def run():
        ins = [x.detach().requires_grad_() if i in grad else x for i, x in enumerate(xs)]
        y = f(*ins)
        y.backward(torch.ones_like(y) if y.dim() else None)
    return run


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="threads for torch and the kernels")
    ap.add_argument("--reps", type=int, default=5, help="calls per timing (5 alternating rounds, medians)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    C().set_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    B, T, H, D, Hd, V = 8, 256, 6, 64, 1024, 8192
    x = torch.randn(B, T, H, D, generator=g)
    ang = torch.rand(T, D // 2, generator=g)
    cos, sin = ang.cos().contiguous(), ang.sin().contiguous()
    gate, up = torch.randn(B * T, Hd, generator=g), torch.randn(B * T, Hd, generator=g)
    logits, tg = torch.randn(B * T, V, generator=g), torch.randint(0, V, (B * T,), generator=g)
    n = 11_000_000  # about the small model's parameter count
    ps = [torch.randn(n, generator=g)]
    gs, ms, vs = [torch.randn(n, generator=g)], [torch.zeros(n)], [torch.zeros(n)]
    topt = torch.optim.AdamW([torch.nn.Parameter(ps[0].clone())], lr=1e-3)
    topt.param_groups[0]["params"][0].grad = gs[0].clone()
    rows = [
        ("rope fwd+bwd (8,256,6,64)", fwd_bwd(ops.rope, x, cos, sin), fwd_bwd(ref.rope, x, cos, sin)),
        ("swiglu fwd+bwd (2048,1024)", fwd_bwd(ops.swiglu, gate, up, grad=(0, 1)),
         fwd_bwd(ref.swiglu, gate, up, grad=(0, 1))),
        ("cross-entropy fwd+bwd (2048,8192)", fwd_bwd(ops.cross_entropy, logits, tg),
         fwd_bwd(ref.cross_entropy, logits, tg)),
        ("adamw step 11M params (torch.optim.AdamW, its CPU default: the single-tensor loop)",
         lambda: ops.adamw_step(ps, gs, ms, vs, 1e-3, 0.9, 0.95, 1e-8, 0.1, 3), topt.step),
    ]
    print(f"threads {a.threads}, isa {C().isa_get()} (indicative; shared machine)")
    print("| op | torch ms | pyllm ms | ratio |")
    print("|---|---|---|---|")
    for name, ours, theirs in rows:
        t_t, t_o = bench_pair(theirs, ours, a.reps)
        print(f"| {name} | {t_t*1e3:.2f} | {t_o*1e3:.2f} | {t_t/t_o:.2f}x |")


if __name__ == "__main__":
    main()
