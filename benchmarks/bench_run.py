"""Tokens/s of the C runtime (pyllm-run) on llama2.c's 15M and 110M shapes, random weights, with a prompt.

Compared in the same run against (a) pyllm's torch `generate` (KV cache, backend "torch") and (b) the memory-bandwidth
floor: weight bytes read per token / copy bandwidth measured now (benchmarks/machine.py: memcpy, read + write bytes).
Also measured now: what the cores can *read* (a vectorised sum over 256 MiB, `read_bandwidth_gbs`), the rate a
matvec actually needs; where it is below the copy figure, the copy floor is out of reach. fp32 and Q8_0, 1 and 2
threads, medians of --repeats runs, load average recorded. --baseline-bin times a second binary (e.g. main's
pyllm-run) on the same files in the same run, the two interleaved run by run. Appends rows to
benchmarks/results_run.md.

    PYTHONPATH=$PWD python benchmarks/bench_run.py                      # both shapes (a few minutes)
    PYTHONPATH=$PWD python benchmarks/bench_run.py --shapes 15M --threads 1
Needs llama2.c's tokenizer.bin (32000 tokens) at ../shared/data/llama2c-tokenizer.bin, beside the checkout.
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import hashlib
import os
import statistics
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
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


_READ_C = r"""
#include <immintrin.h>
#include <omp.h>
// Sums n floats with `threads` threads (static chunks, 8 independent AVX-512 accumulators); returns the sum.
// Each 512-byte step prefetches 16 KiB ahead into L2 (prefetcht1): on this VM one core then reads 10-15% faster
// than with the hardware prefetchers alone (or prefetcht0, which ties up L1 fill buffers), and the matvecs use the
// same prefetch, so this is the rate they can reach.
double read_sum(const float* x, long n, int threads) {
    double total = 0;
    #pragma omp parallel num_threads(threads) reduction(+:total)
    {
        int t = omp_get_thread_num(), nt = omp_get_num_threads();
        long lo = n * t / nt / 128 * 128, hi = t == nt - 1 ? n : n * (t + 1) / nt / 128 * 128;
        __m512 a[8];
        for (int i = 0; i < 8; i++) a[i] = _mm512_setzero_ps();
        for (long i = lo; i + 128 <= hi; i += 128) {
            for (int j = 0; j < 8; j++) _mm_prefetch((const char*)(x + i + 4096 + 16 * j), _MM_HINT_T1);
            for (int j = 0; j < 8; j++) a[j] = _mm512_add_ps(a[j], _mm512_loadu_ps(x + i + 16 * j));
        }
        for (int i = 1; i < 8; i++) a[0] = _mm512_add_ps(a[0], a[i]);
        total += _mm512_reduce_add_ps(a[0]);
    }
    return total;
}
"""
_read_lib = None


def read_bandwidth_gbs(threads: int, mbytes: int = 256, repeats: int = 7) -> float:
    """What `threads` cores can read from memory: a vectorised, prefetching sum over `mbytes` MiB (bytes read / time,
    median)."""
    global _read_lib
    if _read_lib is None:
        tag = hashlib.sha1(_READ_C.encode()).hexdigest()[:10]
        so = Path(tempfile.gettempdir()) / f"pyllm_read_bw_{tag}.so"
        if not so.exists():
            src = so.with_suffix(".c")
            src.write_text(_READ_C)
            subprocess.check_call(["gcc", "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", str(src), "-o",
                                   str(so.with_suffix(".tmp.so"))])
            so.with_suffix(".tmp.so").replace(so)
        _read_lib = ctypes.CDLL(str(so))
        _read_lib.read_sum.restype = ctypes.c_double
        _read_lib.read_sum.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_int]
    n = mbytes * (1 << 20) // 4
    x = np.ones(n, dtype=np.float32)
    assert _read_lib.read_sum(x.ctypes.data, n, threads) == n  # pages faulted in, and the sum is real
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        _read_lib.read_sum(x.ctypes.data, n, threads)
        rates.append(n * 4 / (time.perf_counter() - t) / 1e9)
    return statistics.median(rates)


def weight_bytes_per_token(path: Path, cfg) -> int:
    """Bytes of weights read for one token: everything in the file except the embedding table when it is not the
    classifier (then only one row is read). Header and one embedding row are negligible."""
    size = path.stat().st_size
    if cfg.tie_embeddings:
        return size
    emb = cfg.vocab_size * cfg.dim
    per = 4 if "f32" in path.name else 1 + 4 / auto_group_size(cfg)
    return int(size - emb * per)


def run_binary(model: Path, threads: int, steps: int, binary: Path = BIN_PATH) -> float:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    r = subprocess.run([str(binary), str(model), "-z", str(TOKENIZER), "-n", str(steps), "-t", "0.8", "-s", "1",
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
    ap.add_argument("--repeats", type=int, default=3, help="runs per measurement; the median is reported")
    ap.add_argument("--weights", nargs="+", default=["fp32", "q8_0"], help="fp32 and/or q8_0")
    ap.add_argument("--no-torch", action="store_true", help="skip the torch generate baseline")
    ap.add_argument("--baseline-bin", default="", help="also time this pyllm-run binary on the same files, its runs "
                    "interleaved with the main binary's")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results_run.md"), help="markdown file to append to")
    ap.add_argument("--note", default="", help="a line written under the table")
    args = ap.parse_args()
    if args.steps and args.steps <= 14:  # the prompt's ~14 tokens (prompt_len below) come first
        ap.error(f"--steps {args.steps}: must exceed the prompt's 14 tokens (or 0 for the defaults)")
    if not BIN_PATH.exists():
        sys.exit(f"{BIN_PATH} not built: python setup.py build_ext --inplace")
    if not TOKENIZER.exists():
        sys.exit(f"{TOKENIZER} not found (llama2.c's tokenizer.bin, 32000 tokens)")
    load0 = os.getloadavg()
    med = lambda f: statistics.median(f() for _ in range(args.repeats))  # noqa: E731
    bw = {t: copy_bandwidth_gbs(t) for t in args.threads}
    rd = {t: read_bandwidth_gbs(t) for t in args.threads}
    print("copy bandwidth GB/s (read+write):", {t: round(b, 1) for t, b in bw.items()},
          "| read bandwidth GB/s (vector sum, 256 MiB):", {t: round(b, 1) for t, b in rd.items()})
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
            paths = {k: v for k, v in paths.items() if k in args.weights}
            if "fp32" in paths:
                write_model_bin(paths["fp32"], sd, cfg)
            if "q8_0" in paths:
                write_model_bin(paths["q8_0"], sd, cfg, quantize="q8_0", group_size=auto_group_size(cfg))
            for th in args.threads:
                tt = None if args.no_torch else med(lambda: torch_generate_tps(model, th, prompt_len, steps))
                for wt, p in paths.items():
                    run_binary(p, th, prompt_len + 8)  # page the file in (-n must exceed the prompt)
                    if args.baseline_bin:  # interleaved, alternating which goes first: drift hits both alike
                        ab = [lambda: run_binary(p, th, steps),
                              lambda: run_binary(p, th, steps, Path(args.baseline_bin))]
                        runs = []
                        for i in range(args.repeats):
                            r = [f() for f in (ab if i % 2 == 0 else ab[::-1])]
                            runs.append(r if i % 2 == 0 else r[::-1])
                        tps, base = (statistics.median(x[j] for x in runs) for j in (0, 1))
                    else:
                        tps, base = med(lambda: run_binary(p, th, steps)), None
                    wb = weight_bytes_per_token(p, cfg)
                    floor, rfloor = bw[th] * 1e9 / wb, rd[th] * 1e9 / wb
                    rows.append((shape, wt, th, steps, tps, tt, floor, rfloor, wb, bw[th], rd[th], base))
                    print(f"{shape} {wt} threads={th}: {tps:.1f} tok/s | torch generate "
                          f"{'-' if tt is None else f'{tt:.1f}'} tok/s | floor {floor:.1f} tok/s "
                          f"({wb / 1e6:.0f} MB/token at {bw[th]:.1f} GB/s) -> {tps / floor:.0%} of floor, "
                          f"{tps / rfloor:.0%} of the read floor ({rd[th]:.1f} GB/s)"
                          + ("" if tt is None else f", {tps / tt:.2f}x torch")
                          + ("" if base is None else f" | baseline binary {base:.1f} tok/s, {tps / base:.2f}x"))
    load1 = os.getloadavg()
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = Path(args.out)
    new = not out.exists()
    with open(out, "a") as f:
        if new:
            f.write("# pyllm-run benchmarks (benchmarks/bench_run.py)\n\nRandom weights, llama2.c tokenizer, prompt "
                    f"{PROMPT!r}, temperature 0.8. tok/s counts positions after the first (llama2.c's way).\n"
                    "Floor = copy bandwidth measured in the same run / weight bytes per token.\n")
        f.write(f"\n## {stamp}, {platform.node()}, {os.cpu_count()} CPUs, run under the CPU lock; load average "
                f"{load0[0]:.2f} at start, {load1[0]:.2f} at end; medians of {args.repeats} runs\n\n"
                "copy = memcpy (read + write bytes) / time; read = vectorised sum over 256 MiB; "
                "floor = bandwidth / weight bytes per token.\n\n"
                "| shape | weights | threads | steps | pyllm-run tok/s | torch generate tok/s | x torch | copy floor "
                "tok/s | % of copy floor | read floor tok/s | % of read floor | MB/token | copy GB/s | read GB/s |"
                + (" baseline bin tok/s | x baseline |" if args.baseline_bin else "") + "\n|"
                + "---|" * (14 + 2 * bool(args.baseline_bin)) + "\n")
        for shape, wt, th, steps, tps, tt, floor, rfloor, wb, b, r, base in rows:
            f.write(f"| {shape} | {wt} | {th} | {steps} | {tps:.1f} | {'-' if tt is None else f'{tt:.1f}'} | "
                    f"{'-' if tt is None else f'{tps / tt:.2f}'} | {floor:.1f} | {tps / floor:.0%} | {rfloor:.1f} | "
                    f"{tps / rfloor:.0%} | {wb / 1e6:.0f} | {b:.1f} | {r:.1f} |"
                    + ("" if base is None else f" {base:.1f} | {tps / base:.2f} |") + "\n")
        if args.note:
            f.write(f"\n{args.note}\n")
    print(f"appended to {out}")


if __name__ == "__main__":
    main()
