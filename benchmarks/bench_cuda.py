"""benchmarks/bench_cuda.py — build, check and time pyllm's CUDA kernels in one call on a lent H100/H200.

    python benchmarks/bench_cuda.py            # build in place, run the gpu tests, time, print the table
    python benchmarks/bench_cuda.py --no-build --no-test --quick

Every speed is a ratio to a baseline measured in the same run (cuBLAS via torch.matmul, SDPA's flash backend,
torch's sort-based top-p, torch eager training, the memory-bandwidth floor measured with a device copy). Timings:
CUDA events, warm-up first, median of repeats, inputs rotated so L2 does not serve repeats. Writes the table and
logs under $OUT (or --out) and prints the table last. Without a GPU it exits 2 with a one-line message.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-build", action="store_true", help="skip `setup.py build_ext --inplace` (use the built _C)")
    ap.add_argument("--no-test", action="store_true", help="skip the gpu-marked correctness tests")
    ap.add_argument("--sanitizer", action="store_true", help="also run the compute-sanitizer tests (slow)")
    ap.add_argument("--quick", action="store_true", help="fewer repeats and smaller training run")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_cuda_out"), help="folder for the table and logs")
    return ap.parse_args(argv)


def sh(cmd, log: Path, **kw) -> int:
    print("+", " ".join(map(str, cmd)), flush=True)
    with open(log, "a") as f:
        f.write("+ " + " ".join(map(str, cmd)) + "\n")
        f.flush()
        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, **kw).returncode


def bench(fn, reps=20, warmup=3, rotate=None):
    """Median milliseconds of fn(i) over reps (CUDA events around each call)."""
    import torch
    for i in range(warmup):
        fn(i)
    torch.cuda.synchronize()
    times = []
    for i in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn(i)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def main(argv=None):
    args = parse_args(argv)
    try:
        import torch
    except ImportError:
        print("bench_cuda: torch is not installed", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("bench_cuda: needs a CUDA GPU (torch.cuda.is_available() is False); run it on a lent H100/H200",
              file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "bench_cuda.log"
    notes: list[str] = []

    class Rows(list):  # each row is printed as it is measured, so a later failure keeps the earlier numbers
        def append(self, r):
            print("  ".join(r), flush=True)
            super().append(r)
    rows = Rows()  # (what, pyllm, baseline, ratio)

    if not args.no_build:
        import time
        t0 = time.time()
        rc = sh([sys.executable, "setup.py", "-q", "build_ext", "--inplace", "-t", "/tmp/build-bench-cuda"], log)
        notes.append(f"build: rc={rc}, {time.time() - t0:.0f} s")
        if rc:
            print(f"bench_cuda: build failed, see {log}", file=sys.stderr)
            return 1
    sys.path.insert(0, str(ROOT))
    from pyllm import ops, ops_cuda, ref
    from pyllm._ext import C
    if not ops_cuda.available():
        print("bench_cuda: pyllm._C was built without CUDA (no nvcc?)", file=sys.stderr)
        return 1
    if not args.no_test:
        sel = [] if args.sanitizer else ["-k", "not sanitizer"]
        rc = sh([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/test_cuda.py", *sel], log,
                env=dict(os.environ, PYTHONPATH=str(ROOT)))
        notes.append(f"gpu tests: {'PASS' if rc == 0 else 'FAIL rc=%d (see log)' % rc}")

    # SASS: which matrix instructions the kernels use
    so = glob.glob(str(ROOT / "pyllm" / "_C*.so"))
    cuobjdump = shutil.which("cuobjdump") or "/usr/local/cuda/bin/cuobjdump"
    if so and Path(cuobjdump).exists():
        sass = subprocess.run([cuobjdump, "-sass", so[0]], capture_output=True, text=True).stdout
        blocks = re.split(r"\n\s*Function : ", sass)
        kernels = ("matmul_sm90_kernel", "matmul_sm90_pp_kernel", "matmul_tc_kernel", "matmul_gemv_kernel",
                   "fa_fwd_kernel", "fa_dq_kernel", "fa_dkdv_kernel", "attn_fwd_kernel", "sample_kernel")
        # the whole dump is tens of MB (every kernel, two targets): keep the blocks of the kernels counted below
        (out / "sass.txt").write_text("\n".join("Function : " + b for b in blocks
                                                if any(k in b.split("\n", 1)[0] for k in kernels)))
        for kern in kernels:
            ins = {"HMMA": 0, "HGMMA": 0, "FFMA": 0, "LDSM": 0, "LDGSTS": 0, "UTMALDG": 0}
            for b in blocks:
                if kern in b.split("\n", 1)[0]:
                    for k in ins:
                        ins[k] += len(re.findall(r"\b" + k + r"\b", b))
            notes.append(f"SASS {kern}: " + ", ".join(f"{k} {v}" for k, v in ins.items()))
    else:
        notes.append("SASS: cuobjdump or _C*.so not found")

    dev = torch.device("cuda")
    stream = lambda: torch.cuda.current_stream().cuda_stream  # noqa: E731
    reps = 10 if args.quick else 30

    # memory bandwidth ceiling: device-to-device copy (bytes read + written)
    src = torch.empty(1 << 28, dtype=torch.uint8, device=dev).random_()
    dst = torch.empty_like(src)
    ms = bench(lambda i: dst.copy_(src), reps)
    bw = 2 * src.numel() / (ms * 1e-3)
    rows.append(("copy bandwidth (GB/s)", f"{bw / 1e9:.0f}", "-", "-"))
    del src, dst

    # --- matmul: bf16, C = A . B^T, vs torch.matmul (cuBLAS) ---------------------------------------------------
    for M, N, K in [(4096, 4096, 4096), (8192, 768, 768), (8192, 3072, 768), (8192, 768, 3072), (8192, 50304, 768)]:
        As = [torch.randn(M, K, device=dev, dtype=torch.bfloat16) for _ in range(3)]
        Bs = [torch.randn(N, K, device=dev, dtype=torch.bfloat16) for _ in range(3)]
        c = torch.empty(M, N, device=dev, dtype=torch.bfloat16)
        ok = (ops_cuda._mm(As[0], Bs[0]).float() - (As[0] @ Bs[0].T).float()).norm() / (As[0] @ Bs[0].T).float().norm()
        t_ours = bench(lambda i: C().cuda_matmul(c.data_ptr(), As[i % 3].data_ptr(), Bs[i % 3].data_ptr(), M, N, K, 1,
                                                 0, stream()), reps)
        t_ref = bench(lambda i: torch.matmul(As[i % 3], Bs[i % 3].T), reps)
        tf = 2 * M * N * K / (t_ours * 1e-3) / 1e12
        rows.append((f"matmul bf16 {M}x{N}x{K} (TFLOP/s {tf:.0f}, relerr {ok:.1e})", f"{t_ours:.3f} ms",
                     f"{t_ref:.3f} ms", f"{t_ref / t_ours:.2f}"))
        del As, Bs, c

    # --- attention: ours vs SDPA flash, both bf16 (D 64 / 128 take pyllm's bf16 tensor-core kernels) -------------
    from torch.nn.attention import SDPBackend, sdpa_kernel
    for B, T, H, D in [(8, 1024, 12, 64), (4, 2048, 16, 128)]:
        q, k, v = (torch.randn(B, T, H, D, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        qb, kb, vb = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))  # (B, H, T, D)
        g = torch.randn(B, T, H, D, device=dev, dtype=torch.bfloat16)
        gb = g.transpose(1, 2)
        def sdpa():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(qb, kb, vb, is_causal=True)
        t_f = bench(lambda i: ops.attention(q, k, v), reps)
        t_fr = bench(lambda i: sdpa(), reps)
        t_fb = bench(lambda i: ops.attention(q, k, v).backward(g), max(3, reps // 3))
        t_fbr = bench(lambda i: sdpa().backward(gb), max(3, reps // 3))
        rows.append((f"attention fwd B{B} T{T} H{H} D{D} (bf16, vs SDPA flash)", f"{t_f:.3f} ms",
                     f"{t_fr:.3f} ms", f"{t_fr / t_f:.2f}"))
        rows.append((f"attention fwd+bwd B{B} T{T} H{H} D{D}", f"{t_fb:.3f} ms", f"{t_fbr:.3f} ms",
                     f"{t_fbr / t_fb:.2f}"))
        del q, k, v, qb, kb, vb

    # --- sampling: top-p over V = 50257 vs torch's sort-based recipe ---------------------------------------------
    def torch_top_p(logits, p=0.9):
        probs = torch.softmax(logits, -1)
        sp, si = probs.sort(-1, descending=True)
        cum = sp.cumsum(-1)
        sp = sp.masked_fill(cum - sp > p, 0)
        return si.gather(1, torch.multinomial(sp, 1))
    for Bs_ in (1, 256):
        x = torch.randn(Bs_, 50257, device=dev) * 3
        t_o = bench(lambda i: ops.sample(x, temperature=1.0, top_p=0.9, seed=1, step=i), reps)
        t_r = bench(lambda i: torch_top_p(x), reps)
        rows.append((f"sample top-p 0.9 B{Bs_} V50257", f"{t_o:.3f} ms", f"{t_r:.3f} ms", f"{t_r / t_o:.2f}"))

    def model_rows():  # training and decode; a failure here is noted, the kernel rows above are kept
        # --- training: GPT-2-small shape (12 x 768, T 1024), bf16 autocast, pyllm vs torch backend ----------------
        from pyllm.config import preset
        from pyllm.model import GPT
        cfg = preset("110M", vocab_size=50304, max_seq_len=1024)
        Bt, T = (4, 1024) if args.quick else (8, 1024)
        n_params = sum(p.numel() for p in GPT(cfg).parameters())
        flops_per_token = 6 * n_params + 12 * cfg.n_layers * cfg.dim * T  # PaLM-style estimate incl. attention
        peak = 989e12  # H100 SXM dense bf16; H200 the same
        for backend in ("pyllm", "torch"):
            torch.manual_seed(0)
            model = GPT(cfg, backend=backend).to(dev)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
            idx = torch.randint(0, cfg.vocab_size, (Bt, T), device=dev)
            def step(i):
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    _, loss = model(idx, idx)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            t = bench(step, 3 if args.quick else 10, warmup=2)
            tok_s = Bt * T / (t * 1e-3)
            rows.append((f"train 110M-shape B{Bt} T{T} backend={backend} (MFU {tok_s * flops_per_token / peak:.1%})",
                         f"{tok_s:.0f} tok/s", "-", "-"))
            del model, opt

        # --- decode: batch 1, 110M shape, fp32 weights; floor = parameter bytes / copy bandwidth -------------------
        model = GPT(cfg, backend="pyllm").to(dev).eval()
        idx = torch.randint(0, cfg.vocab_size, (1, 16), device=dev)
        new = 32 if args.quick else 128
        with torch.no_grad():
            t = bench(lambda i: model.generate(idx, new, temperature=0), 2, warmup=1)
        tok_s = new / (t * 1e-3)
        floor = bw / (4 * n_params)
        rows.append((f"decode 110M fp32 B1 (floor {floor:.0f} tok/s from copy bw)", f"{tok_s:.0f} tok/s",
                     f"{floor:.0f} tok/s", f"{tok_s / floor:.2f}"))

    try:
        model_rows()
    except Exception as e:  # noqa: BLE001
        notes.append(f"model rows failed: {type(e).__name__}: {e}"[:300])

    name = torch.cuda.get_device_name()
    head = f"bench_cuda {datetime.date.today()} {name} torch {torch.__version__}"
    w = max(len(r[0]) for r in rows)
    table = [head, f"{'what':<{w}}  {'pyllm':>14}  {'baseline':>14}  ratio(base/pyllm)"]
    table += [f"{a:<{w}}  {b:>14}  {c:>14}  {d}" for a, b, c, d in rows]
    table += ["notes: " + n for n in notes]
    text = "\n".join(table)
    (out / "bench_cuda.txt").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
