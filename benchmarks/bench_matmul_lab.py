"""GEMM tuning lab: in-process A/B of GEMM variants (a header + -D flags) against torch, same shapes, interleaved.
Run: PYTHONPATH=$PWD python benchmarks/bench_matmul_lab.py --variant base=csrc/cpu/impl_matmul.h \
         --variant kc256=csrc/cpu/impl_matmul.h:-DMM_KC_MAX=256 --shapes 1024x1024x1024 --threads 1 [--dtype bf16]
Each variant is compiled (the avx512 or avx2 path, --isa; default: the best this CPU has; gcc -O3) into its own
.so with just the matmul kernels and loaded with ctypes, so block-size overrides (-DMM_KC_MAX=..., -DMM_NC_MAX=...)
never touch csrc/. Prints the median time of each variant and torch per (threads, layout, shape) and the ratio
torch/variant (> 1: faster). --dtype bf16 times the bf16 GEMM (matmul_bf16_forward: the vdpbf16ps k-pair kernel where
this CPU has AVX512_BF16, else the widening path) against torch's bf16 matmul.
"""
import argparse
import ctypes
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc" / "cpu"
LAB_C = """
#pragma GCC target(TARGET)
#include <stdlib.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <omp.h>
#include "kernels.h"
#include "simd.h"
#include "isa.h"
const cpu_features* cpu_features_get(void) { static cpu_features f = {.avx512bf16 = LAB_BF16DP}; return &f; }
void kernels_oom_note(void) {}
#define KFN(name) name##_lab
#include "impl_matvec.h"
#include IMPL
void lab_threads(int n) { omp_set_num_threads(n); }
// Micro-kernel alone: ni A micro-panels x nj B micro-panels (kc deep, packed, 64-byte aligned), i outer, j inner
// (order 0) or j outer, i inner (order 1), reps times; returns GFLOP/s (1 thread).
double lab_kernel(int kc, int ni, int nj, int reps, int order, int ldc) {
    if (ldc < nj * MM_NR) ldc = nj * MM_NR;
    float* a = aligned_alloc(64, (size_t)ni * MM_MR * kc * 4 + 64);
    float* b = aligned_alloc(64, (size_t)nj * MM_NR * kc * 4 + 64);
    float* c = aligned_alloc(64, (size_t)ni * MM_MR * ldc * 4 + 64);
    for (size_t x = 0; x < (size_t)ni * MM_MR * kc; x++) a[x] = (float)(x % 7) * 0.01f;
    for (size_t x = 0; x < (size_t)nj * MM_NR * kc; x++) b[x] = (float)(x % 5) * 0.01f;
    for (size_t x = 0; x < (size_t)ni * MM_MR * ldc; x++) c[x] = 0.f;
    double t = omp_get_wtime();
    for (int r = 0; r < reps; r++)
        for (int u = 0; u < (order ? nj : ni); u++)
            for (int v = 0; v < (order ? ni : nj); v++) {
                const int i = order ? v : u, j = order ? u : v;
                mm_kernel_f32(kc, a + (size_t)i * MM_MR * kc, b + (size_t)j * MM_NR * kc,
                              c + (size_t)i * MM_MR * ldc + j * MM_NR, ldc, MM_MR, MM_NR, NULL, 1);
            }
    t = omp_get_wtime() - t;
    free(a); free(b); free(c);
    return 2.0 * MM_MR * MM_NR * kc * ni * nj * (double)reps / t / 1e9;
}
"""
SMALL = ["768x128x128", "768x128x352", "768x352x128", "768x128x262"]      # d128 Shakespeare model, B*T = 768
BIG = ["4096x768x3072", "4096x3072x768", "4096x768x768", "1024x1024x1024"]


class Params(ctypes.Structure):
    _fields_ = [("C", ctypes.c_void_p), ("A", ctypes.c_void_p), ("B", ctypes.c_void_p), ("bias", ctypes.c_void_p),
                ("M", ctypes.c_int), ("N", ctypes.c_int), ("K", ctypes.c_int), ("lda", ctypes.c_int),
                ("ldb", ctypes.c_int), ("ldc", ctypes.c_int), ("trans_a", ctypes.c_int), ("trans_b", ctypes.c_int),
                ("accumulate", ctypes.c_int)]


TARGETS = {"avx512": "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2", "avx2": "avx2,fma,f16c,bmi,bmi2"}


def _cpu_flags() -> str:
    """The first CPU's /proc/cpuinfo entry ("" where there is none)."""
    return Path("/proc/cpuinfo").read_text().split("\n\nprocessor")[0] if Path("/proc/cpuinfo").exists() else ""


def has_bf16dp() -> bool:
    return " avx512_bf16" in _cpu_flags()


def best_isa() -> str:
    flags = _cpu_flags()
    return "avx512" if " avx512bw" in flags and " avx512vl" in flags else "avx2"


def build(spec: str, isa: str = "avx512"):
    """spec = name=header[:flags...] -> (name, ctypes lib). Cached in the temp dir by content hash."""
    name, rest = spec.split("=", 1)
    header, *flags = rest.split(":")
    flags = " ".join(flags).split()
    hp = Path(header).resolve()
    src = LAB_C.replace("IMPL", f'"{hp}"').replace("TARGET", f'"{TARGETS[isa]}"').replace(
        "LAB_BF16DP", "1" if isa == "avx512" and has_bf16dp() else "0")
    tag = hashlib.sha1((src + hp.read_text() + " ".join(flags) + (CSRC / "simd.h").read_text()
                        + (CSRC / "impl_matvec.h").read_text()).encode()).hexdigest()[:12]
    so = Path(tempfile.gettempdir()) / f"pyllm_gemm_lab_{tag}.so"
    if not so.exists():
        cf = so.with_suffix(".c")
        cf.write_text(src)
        tmp = so.with_suffix(".tmp.so")
        subprocess.check_call(["gcc", "-std=c11", "-O3", "-fopenmp", "-fno-math-errno", "-shared", "-fPIC",
                               "-I", str(CSRC), *flags, str(cf), "-o", str(tmp)])
        tmp.replace(so)
    lib = ctypes.CDLL(str(so))
    lib.matmul_forward_lab.argtypes = [ctypes.POINTER(Params)]
    lib.matmul_bf16_forward_lab.argtypes = [ctypes.POINTER(Params)]
    lib.lab_threads.argtypes = [ctypes.c_int]
    lib.lab_kernel.restype = ctypes.c_double
    lib.lab_kernel.argtypes = [ctypes.c_int] * 6
    return name, lib


def call_for(lib, a, b, out, trans_a, trans_b, M, N, K):
    p = Params(out.data_ptr(), a.data_ptr(), b.data_ptr(), None, M, N, K, a.shape[1], b.shape[1], N,
               int(trans_a), int(trans_b), 0)
    pp = ctypes.byref(p)
    f = lib.matmul_bf16_forward_lab if a.dtype == torch.bfloat16 else lib.matmul_forward_lab
    return lambda: (f(pp), a, b, out)  # the closure keeps the tensors behind the raw pointers alive


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variant", action="append", required=True, help="name=header[:-DFLAG=..] (repeatable)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1], help="thread counts")
    ap.add_argument("--shapes", nargs="+", default=BIG, help="MxKxN shapes, or 'small' / 'big'")
    ap.add_argument("--layouts", nargs="+", default=["fwd", "dx", "dw"], help="fwd, dx, dw")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions (median reported)")
    ap.add_argument("--min-time", type=float, default=0.02, help="seconds per timed repetition (calls batched)")
    ap.add_argument("--kernel", nargs="*", metavar="KC,NI,NJ,ORDER[,LDC]",
                    help="time the micro-kernel alone on packed panels (kc deep, NI A x NJ B micro-panels, order "
                         "0: A panel outer, 1: B panel outer) beside the FMA peak, instead of GEMM shapes")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                    help="operands: fp32, or bf16 (fp32 accumulate and output; torch's bf16 matmul the baseline)")
    ap.add_argument("--isa", choices=sorted(TARGETS), default=best_isa(),
                    help="instruction-set path to compile the variants for (default: the best this CPU has)")
    ap.add_argument("--cold", action="store_true", help="evict the caches (write 64 MiB) before every timed call; "
                                                          "the flush is not timed")
    ap.add_argument("--no-check", action="store_true", help="skip the correctness check (diagnostic variants that "
                                                                "skip work on purpose)")
    args = ap.parse_args()
    if args.kernel is not None:
        return kernel_mode(args)
    shapes = [s for x in args.shapes for s in (SMALL if x == "small" else BIG if x == "big" else [x])]
    libs = [build(s, args.isa) for s in args.variant]
    print(f"load average {os.getloadavg()}, torch {torch.__version__}, medians of {args.reps} interleaved reps")
    names = [n for n, _ in libs] + ["torch"]
    print("thr layout        shape " + " ".join(f"{n:>10}" for n in names) + "   ratios torch/variant")
    for th in args.threads:
        torch.set_num_threads(th)
        for _, lib in libs:
            lib.lab_threads(th)
        for s in shapes:
            M, K, N = map(int, s.split("x"))
            dt = torch.bfloat16 if args.dtype == "bf16" else torch.float32
            x, w, dy = torch.randn(M, K).to(dt), torch.randn(N, K).to(dt), torch.randn(M, N).to(dt)
            for lay in args.layouts:
                if lay == "fwd":
                    a, b, ta, tb, ref = x, w, 0, 0, lambda: x @ w.T
                elif lay == "dx":
                    a, b, ta, tb, ref = dy, w, 0, 1, lambda: dy @ w
                else:
                    a, b, ta, tb, ref = dy, x, 1, 1, lambda: dy.T @ x
                m, n, k = (M, K, N) if lay == "dx" else (N, K, M) if lay == "dw" else (M, N, K)
                fns = []
                for _, lib in libs:
                    out = torch.full((m, n), float("nan"))
                    fn = call_for(lib, a, b, out, ta, tb, m, n, k)
                    fn()
                    r = ref().float() if dt == torch.float32 else {  # fp32 sums of the exact bf16 products
                        "fwd": lambda: x.float() @ w.float().T, "dx": lambda: dy.float() @ w.float(),
                        "dw": lambda: dy.float().T @ x.float()}[lay]()
                    err = (out - r).abs().max().item() / (r.abs().max().item() + 1e-30)
                    if not err < 1e-4 and not args.no_check:
                        raise SystemExit(f"variant wrong at {lay} {s}: rel err {err}")
                    fns.append(fn)
                fns.append(ref)
                # calls per repetition so one repetition takes ~min_time
                t = time.perf_counter(); ref(); dt = time.perf_counter() - t
                n_calls = max(1, int(args.min_time / max(dt, 1e-6)))
                ts = [[] for _ in fns]
                flush = torch.empty(16 << 20) if args.cold else None  # 64 MiB: twice this host's L3
                for _ in range(args.reps):
                    for i, fn in enumerate(fns):
                        tot = 0.0
                        for _ in range(n_calls):
                            if flush is not None:
                                flush.add_(1.0)  # operands and packing buffers out of cache, as in a training step
                            t = time.perf_counter()
                            fn()
                            tot += time.perf_counter() - t
                        ts[i].append(tot / n_calls)
                med = [statistics.median(t) for t in ts]
                fl = 2.0 * M * N * K
                print(f"{th:>3} {lay:>6} {s:>14} " + " ".join(f"{fl / t / 1e9:>8.1f}GF" for t in med)
                      + "   " + " ".join(f"{med[-1] / t:.2f}" for t in med[:-1]), flush=True)


def kernel_mode(args):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from machine import fma_peak_gflops
    libs = [build(s, args.isa) for s in args.variant]
    cfgs = args.kernel or ["128,1,1,0", "384,1,16,0", "384,16,1,1", "256,8,8,0", "256,8,8,1", "384,4,16,0"]
    print(f"load average {os.getloadavg()}; micro-kernel GFLOP/s (median of {args.reps}) and fraction of FMA peak")
    for cfg in cfgs:
        kc, ni, nj, order, *ldc = map(int, cfg.split(","))
        ldc = ldc[0] if ldc else 0
        tile = 14 * 32 if args.isa == "avx512" else 6 * 16  # MR x NR of the path
        reps = max(1, int(2e8 / (2 * tile * kc * ni * nj)))
        res = [[] for _ in libs]
        peaks = []
        for _ in range(args.reps):
            peaks.append(fma_peak_gflops(1, repeats=1))
            for i, (_, lib) in enumerate(libs):
                res[i].append(lib.lab_kernel(kc, ni, nj, reps, order, ldc))
        pk = statistics.median(peaks)
        print(f"kc={kc} ni={ni} nj={nj} order={order} ldc={ldc} peak {pk:.0f} GF: " + "  ".join(
            f"{n} {statistics.median(r):.0f} GF ({statistics.median(r) / pk:.2f})" for (n, _), r in zip(libs, res)),
            flush=True)


if __name__ == "__main__":
    main()
