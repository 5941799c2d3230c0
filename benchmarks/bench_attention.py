"""Attention fp32 forward+backward: pyllm's flash-attention kernel vs torch SDPA (is_causal=True), same process.

Table of ratios (interleaved runs, median per side; also the fraction of the FMA peak measured in the same run):
    PYTHONPATH=$PWD python benchmarks/bench_attention.py [--threads 1 2] [--repeats 5] [--quick]
Decode attention (one query per sequence over a (B, T_max, Hkv, D) KV cache) vs torch SDPA on the same cache views,
with the K+V read rate against the copy bandwidth measured in the same run:
    PYTHONPATH=$PWD python benchmarks/bench_attention.py --decode [--threads 1]
pytest-benchmark:
    PYTHONPATH=$PWD python -m pytest benchmarks/bench_attention.py --benchmark-enable --benchmark-only
FLOPs counted as the useful causal work: 4*B*H*T*T*D/2 forward, 2.5x that backward (5 vs 2 matmuls).
"""
from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pyllm import ops  # noqa: E402
from pyllm._ext import C  # noqa: E402

SHAPES = [(8, 12, 256, 64), (4, 12, 1024, 64), (1, 12, 4096, 64)]  # (B, H, T, D)


def make(B, H, T, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v, dy = (torch.randn(B, T, H, D, generator=g) for _ in range(4))
    ours = [t.clone().requires_grad_() for t in (q, k, v)]
    base = [t.transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v)]  # SDPA wants (B, H, T, D)
    return ours, base, dy, dy.transpose(1, 2).contiguous()


def step_ours(ours, dy, doc=None):
    for t in ours:
        t.grad = None
    ops.attention(*ours, doc).backward(dy)


def step_sdpa(base, dyt, mask=None):
    for t in base:
        t.grad = None
    if mask is None:
        F.scaled_dot_product_attention(*base, is_causal=True).backward(dyt)
    else:
        F.scaled_dot_product_attention(*base, attn_mask=mask).backward(dyt)


def set_threads(n):
    torch.set_num_threads(n)
    C().set_threads(n)


def interleaved(fa, fb, repeats):
    """Median seconds of fa and fb, run alternately so both see the same machine load."""
    fa(), fb()  # warm-up
    ta, tb = [], []
    for _ in range(repeats):
        t = time.perf_counter(); fa(); ta.append(time.perf_counter() - t)
        t = time.perf_counter(); fb(); tb.append(time.perf_counter() - t)
    return statistics.median(ta), statistics.median(tb)


# (B, H, Hkv, D, n_ctx): an RL rollout batch, batched decoding at D 64, GQA at D 128, one cache-resident sequence
DECODE_SHAPES = [(512, 4, 4, 32, 30), (512, 8, 4, 64, 200), (64, 12, 12, 64, 500), (1, 32, 8, 128, 2000),
                 (8, 32, 8, 128, 1000), (1, 12, 12, 64, 1000)]


def decode_rows(th, repeats, copy_gbs):
    """One row per DECODE_SHAPES case: pyllm's decode_attention vs SDPA on (B, H, 1, D) against the cache's first
    n_ctx positions (strided views, as a KV cache is read), K+V bytes / time as a fraction of copy bandwidth."""
    rows = []
    for B, H, Hkv, D, n in DECODE_SHAPES:
        g = torch.Generator().manual_seed(0)
        kc, vc = (torch.randn(B, n + 24, Hkv, D, generator=g) for _ in range(2))  # T_max a little past n_ctx
        q = torch.randn(B, H, D, generator=g)
        kt, vt, qt = kc[:, :n].transpose(1, 2), vc[:, :n].transpose(1, 2), q[:, :, None]
        with torch.no_grad():
            to, tb = interleaved(lambda: ops.decode_attention(q, kc, vc, n),
                                 lambda: F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=H != Hkv), repeats)
        gbs = 2 * B * n * Hkv * D * 4 / to / 1e9
        rows.append(f"| {th} | B{B} H{H}/{Hkv} D{D} n{n} | {to * 1e3:.3f} | {tb * 1e3:.3f} | {tb / to:.2f}x | "
                    f"{gbs:.1f} | {100 * gbs / copy_gbs:.0f}% |")
        print(rows[-1], flush=True)
    return rows


def flops_fwd_bwd(B, H, T, D):
    return 3.5 * 4 * B * H * T * T * D / 2


# --- pytest-benchmark ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES[:2], ids=lambda s: "B%dH%dT%dD%d" % s)
@pytest.mark.parametrize("impl", ["pyllm", "sdpa"])
def test_attention_fwd_bwd(benchmark, impl, shape):
    ours, base, dy, dyt = make(*shape)
    if impl == "pyllm":
        benchmark.pedantic(step_ours, args=(ours, dy), rounds=3, warmup_rounds=1)
    else:
        benchmark.pedantic(step_sdpa, args=(base, dyt), rounds=3, warmup_rounds=1)


# --- ratio table --------------------------------------------------------------------------------------------
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts to measure")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved timed runs per side (median reported)")
    ap.add_argument("--quick", action="store_true", help="fewer repeats (3), for an indicative run")
    ap.add_argument("--out", default=None, help="append the table's rows to this markdown file")
    ap.add_argument("--decode", action="store_true",
                    help="time decode attention over a KV cache instead of the training kernels")
    args = ap.parse_args(argv)
    repeats = 3 if args.quick else args.repeats
    if args.decode:
        from machine import copy_bandwidth_gbs
        head = (f"decode attention fp32, pyllm vs torch {torch.__version__} SDPA (one query, cache views), "
                f"{datetime.date.today()}, {platform.processor() or platform.machine()}, median of {repeats * 4} "
                "interleaved")
        cols = ("| threads | case | pyllm ms | SDPA ms | speed-up | K+V GB/s | % copy bandwidth |\n"
                "|---|---|---|---|---|---|---|")
        print(head + "\n" + cols)
        rows = []
        for th in args.threads:
            set_threads(th)
            rows += decode_rows(th, repeats * 4, copy_bandwidth_gbs(th))
        if args.out:
            with open(args.out, "a") as f:
                f.write("\n" + head + "\n\n" + cols + "\n" + "\n".join(rows) + "\n")
        return
    try:
        from machine import measure_peaks
    except Exception:  # the table still works without the peak column
        measure_peaks = None
    rows = []
    head = (f"attention fp32 fwd+bwd, pyllm vs torch {torch.__version__} SDPA(is_causal=True), "
            f"{datetime.date.today()}, {platform.processor() or platform.machine()}, median of {repeats} interleaved")
    print(head)
    print("| threads | shape | pyllm ms | SDPA ms | speed-up | pyllm GFLOP/s | % FMA peak |")
    print("|---|---|---|---|---|---|---|")
    for th in args.threads:
        set_threads(th)
        peak = measure_peaks(th)["fma_gflops"] if measure_peaks else float("nan")
        for B, H, T, D in SHAPES:
            ours, base, dy, dyt = make(B, H, T, D)
            to, tb = interleaved(lambda: step_ours(ours, dy), lambda: step_sdpa(base, dyt), repeats)
            gf = flops_fwd_bwd(B, H, T, D) / to / 1e9
            row = (f"| {th} | B{B} H{H} T{T} D{D} | {to * 1e3:.0f} | {tb * 1e3:.0f} | {tb / to:.2f}x | {gf:.0f} | "
                   f"{100 * gf / peak:.0f}% |")
            print(row, flush=True)
            rows.append(row)
        # packed rows: documents of ~128 tokens in T=1024; SDPA needs an explicit mask (math path) here
        B, H, T, D = 4, 12, 1024, 64
        ours, base, dy, dyt = make(B, H, T, D)
        doc = (torch.arange(T) // 128).repeat(B, 1).to(torch.int32)
        mask = ((doc[:, :, None] == doc[:, None, :]) & torch.ones(T, T, dtype=torch.bool).tril())[:, None]
        to, tb = interleaved(lambda: step_ours(ours, dy, doc), lambda: step_sdpa(base, dyt, mask), repeats)
        row = f"| {th} | B{B} H{H} T{T} D{D}, 8 docs/row | {to * 1e3:.0f} | {tb * 1e3:.0f} | {tb / to:.2f}x | - | - |"
        print(row, flush=True)
        rows.append(row)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n" + head + "\n\n| threads | shape | pyllm ms | SDPA ms | speed-up | pyllm GFLOP/s | % FMA peak |\n"
                    "|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
