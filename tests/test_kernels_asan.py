"""Every CPU kernel on every ISA path at odd sizes under ASan + UBSan (tests/asan_kernels.c): exact-size buffers, so
a vector load past a tail, a row past M or a scratch overrun hits a redzone, and NaN-filled fresh memory, so a read of
something never written shows in the results. The torch comparisons of the other kernel tests see neither (a read
past the end returns whatever lies there; unwritten scratch was fresh zero pages). A seeded sample of the size grid
(`asan_kernels full` runs all of it, ~1 min). Run: PYTHONPATH=$PWD python -m pytest -q tests/test_kernels_asan.py"""
import os
import platform
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CPU = ROOT / "csrc" / "cpu"
# -DMM_SCRATCH_EXACT=1: the kernels' reused scratch becomes a fresh exact-size malloc per call (impl_matmul.h);
# -DPYLLM_AMX_EMULATE: the AMX bf16 driver runs on impl_amx.h's tile model (the harness turns it on per case)
FLAGS = ["-std=c11", "-O1", "-g", "-fopenmp", "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
         "-fno-omit-frame-pointer", "-DMM_SCRATCH_EXACT=1", "-DPYLLM_AMX_EMULATE", "-I", str(CPU)]


def test_kernels_asan_ubsan(tmp_path, asan_cc):
    cc = asan_cc
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("needs x86-64")
    # one object per source, side by side: the three ISA builds of every kernel are most of the ~20 s
    srcs = [ROOT / "tests" / "asan_kernels.c", *sorted(CPU.glob("*.c"))]
    jobs = [(subprocess.Popen([cc, "-c", *FLAGS, str(s), "-o", str(tmp_path / (s.stem + ".o"))],
                              stderr=subprocess.PIPE, text=True), s) for s in srcs]
    for proc, s in jobs:
        err = proc.communicate()[1]
        assert proc.returncode == 0, f"{s.name}: {err[-3000:]}"
    exe = tmp_path / "asan_kernels"
    r = subprocess.run([cc, "-fopenmp", "-fsanitize=address,undefined", *(str(tmp_path / (s.stem + ".o")) for s in srcs),
                        "-o", str(exe), "-lm"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"asan_kernels seed {seed}")  # shown by pytest for a failing run: `asan_kernels quick SEED` repeats it
    # malloc_fill_byte=255 up to any size: fresh heap memory reads as NaN (ASan fills only the first 4 KiB by default)
    env = dict(os.environ, OMP_NUM_THREADS="2",
               ASAN_OPTIONS="detect_leaks=0:malloc_fill_byte=255:max_malloc_fill_size=2000000000",
               UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1")
    for k in ("PYLLM_ISA", "PYLLM_GEMM", "PYLLM_NO_BF16DP", "PYLLM_NO_VNNI", "PYLLM_NO_AMX"):
        env.pop(k, None)   # the harness picks paths and variants itself
    r = subprocess.run([str(exe), "quick", str(seed)], capture_output=True, text=True, timeout=300, env=env)
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "ERROR: AddressSanitizer" not in out and "runtime error" not in out, \
        f"seed {seed}\n{out[-4000:]}"
