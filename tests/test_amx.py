"""The AMX bf16 GEMM driver (csrc/cpu/impl_amx.h) vs pyllm.ref: on a model of the tile registers on any x86-64
with AVX2 (-DPYLLM_AMX_EMULATE, built here with gcc; without AVX-512 the avx512 code around it runs on
tests/avx512_emu.h's model of the instructions), and through ops.matmul_bf16 where the CPU really has AMX.
Run: PYTHONPATH=$PWD python -m pytest -q tests/test_amx.py"""
import ctypes
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pyllm import ops, ref
from pyllm._ext import C

CSRC = Path(__file__).resolve().parents[1] / "csrc"
TESTS = Path(__file__).resolve().parent
TARGET = {True: '#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2")\n',
          False: '#pragma GCC target("avx2,fma,f16c,bmi,bmi2")\n#include <immintrin.h>\n#include "avx512_emu.h"\n'}
SHIM = r"""
#define PYLLM_AMX_EMULATE 1
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include "kernels.h"
#include "simd.h"
#include "isa.h"
const cpu_features* cpu_features_get(void) { static cpu_features f; return &f; }  // no AMX: the shim calls the driver
void kernels_oom_note(void) {}
#define KFN(name) name##_emu
#include "impl_matvec.h"
#include "impl_matmul.h"
int emu_gemm(const uint16_t* A, int lda, int ta, const uint16_t* B, int ldb, int tb, float* C, int ldc,
             const float* bias, int M, int N, int K, int acc, int T) {
    return mm_amx_bf16(A, lda, ta, B, ldb, tb, C, ldc, bias, M, N, K, acc, T);
}
"""


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    if platform.machine() not in ("x86_64", "AMD64") or not shutil.which("gcc"):
        pytest.skip("needs x86-64 and gcc")
    feats = C().build_info()["cpu_features"]
    if not (feats["avx512f"] or feats["avx2"]):
        pytest.skip("the driver is built for the avx512 path: needs AVX-512, or AVX2 to run tests/avx512_emu.h")
    # Without AVX-512 (e.g. AMD Zen 3) this skipped, and a driver that computed only the first MM_AMX_NC columns
    # passed every test; the emulated build of tests/test_avx512_emu.py only multiplies N <= 127.
    d = tmp_path_factory.mktemp("amx")
    (d / "shim.c").write_text(TARGET[bool(feats["avx512f"])] + SHIM)
    so = d / "amx_emu.so"
    emu_flags = [] if feats["avx512f"] else ["-DPYLLM_EMULATE_AVX512", "-Wno-psabi", "-I", str(TESTS)]
    r = subprocess.run(["gcc", "-std=c11", "-O2", "-fopenmp", "-shared", "-fPIC", *emu_flags, "-I", str(CSRC / "cpu"),
                        str(d / "shim.c"), "-o", str(so)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    lib = ctypes.CDLL(str(so))
    lib.emu_gemm.restype = ctypes.c_int
    lib.emu_gemm.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
                             ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p] + [ctypes.c_int] * 5
    return lib


def _tol(K):
    return dict(rtol=1e-5, atol=2e-6 * K ** 0.5 * 4)   # exact bf16 products, fp32 sums: only the order differs


@pytest.mark.parametrize("M,N,K", [(1, 1, 1), (3, 17, 33), (17, 31, 32), (33, 65, 100), (64, 48, 300),
                                   (100, 257, 64), (37, 290, 45)])
@pytest.mark.parametrize("ta,tb", [(0, 0), (0, 1), (1, 0), (1, 1)])
def test_amx_driver_emulated(emu, rng, M, N, K, ta, tb):
    a = torch.randn(*((K, M) if ta else (M, K)), generator=rng).bfloat16()
    b = torch.randn(*((K, N) if tb else (N, K)), generator=rng).bfloat16()
    bias = torch.randn(N, generator=rng) if (M + N + ta) % 2 else None
    threads = 1 + (M * N) % 2
    for acc in (0, 1):
        # C in a wider buffer (ldc = N + 5), poisoned: an unwritten element or a write past a row shows
        c = torch.full((M, N + 5), float("nan"))
        if acc:
            c[:, :N] = torch.randn(M, N, generator=rng)
        before = c.clone()
        rc = emu.emu_gemm(a.data_ptr(), a.shape[1], ta, b.data_ptr(), b.shape[1], tb, c.data_ptr(), N + 5,
                          bias.data_ptr() if bias is not None else None, M, N, K, acc, threads)
        assert rc == 0
        want = ref.matmul(a, b, bias=bias, trans_a=bool(ta), trans_b=bool(tb))
        if acc:
            want = want + before[:, :N]
        torch.testing.assert_close(c[:, :N], want, **_tol(K))
        assert torch.isnan(c[:, N:]).all(), "wrote past the last column"


def test_amx_real_path_when_present(rng):
    """Where the CPU and the OS give AMX, ops.matmul_bf16 runs on tiles; compare with PYLLM_NO_AMX=1's path."""
    if not C().build_info()["cpu_features"]["amx_bf16"]:
        pytest.skip("this CPU (or OS) does not expose AMX; the driver is covered by the emulated test")
    for M, N, K in [(1, 1, 1), (17, 127, 3), (300, 257, 1000)]:
        a = torch.randn(M, K, generator=rng).bfloat16()
        b = torch.randn(N, K, generator=rng).bfloat16()
        torch.testing.assert_close(ops.matmul_bf16(a, b), ref.matmul_bf16(a, b), **_tol(K))
    code = "from pyllm._ext import C; print(C().build_info()['cpu_features']['amx_bf16'])"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYLLM_NO_AMX": "1"},
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() in ("0", "False")
