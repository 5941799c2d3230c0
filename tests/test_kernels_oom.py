"""Kernels that cannot get their heap scratch raise MemoryError instead of returning unwritten outputs or crashing.

Run: python -m pytest tests/test_kernels_oom.py. Each case runs in a subprocess whose address space is capped
(RLIMIT_AS) just above what it already uses, so the kernel's scratch allocation is the one that fails.
"""
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import resource, sys
    import numpy as np
    from pyllm._ext import C
    c = C()
    c.set_threads(1)  # no thread stacks to create under the cap
    which = sys.argv[1]
    if which == "attention":
        B, T, H, D = 1, 16384, 1, 64  # forward scratch: K, V packed (2 T D floats = 8 MiB)
        q, k, v, out = (np.zeros((B, T, H, D), np.float32) for _ in range(4))
        lse = np.zeros((B, H, T), np.float32)
        call = lambda: c.attention_forward(out.ctypes.data, lse.ctypes.data, q.ctypes.data, k.ctypes.data,
                                           v.ctypes.data, 0, B, T, H, H, D)
    else:
        M, N, K = 2048, 1024, 1024  # the packed path: ~10 MiB of packing scratch on the first call
        a, b, cc = np.zeros((M, K), np.float32), np.zeros((N, K), np.float32), np.zeros((M, N), np.float32)
        call = lambda: c.matmul_forward(cc.ctypes.data, a.ctypes.data, b.ctypes.data, 0, M, N, K, K, K, N)
    vm = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
    cap = vm + (2 << 20)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    try:
        call()
    except MemoryError as e:
        print("MemoryError:", e)
        sys.exit(0)
    print("no error")
    sys.exit(1)
""")


@pytest.mark.parametrize("which,kernel", [("attention", "attention_forward"), ("matmul", "matmul_forward")])
def test_kernel_out_of_memory_raises(which, kernel):
    r = subprocess.run([sys.executable, "-c", SCRIPT, which], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"MemoryError: {kernel}: out of memory for its scratch buffers" in r.stdout
