"""pytest-benchmark: pyllm GEMM / matvec vs torch at transformer shapes (same run, so compare the two groups).
Run: PYTHONPATH=$PWD python -m pytest -q benchmarks/bench_matmul.py --benchmark-enable --benchmark-columns=min,median
(1 thread by default; PYLLM_BENCH_THREADS=2 for two.) The ratio table is benchmarks/bench_matmul_table.py."""
import os

import pytest
import torch

from pyllm import ops
from pyllm._ext import C

THREADS = int(os.environ.get("PYLLM_BENCH_THREADS", "1"))
SHAPES = [(4096, 768, 3072), (4096, 3072, 768), (4096, 768, 768), (1024, 1024, 1024)]  # M, K, N


@pytest.fixture(autouse=True)
def threads():
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    C().set_threads(THREADS)
    yield
    torch.set_num_threads(before)


def _inputs(M, K, N, dtype):
    g = torch.Generator().manual_seed(0)
    return torch.randn(M, K, generator=g).to(dtype), torch.randn(N, K, generator=g).to(dtype)


@pytest.mark.parametrize("impl", ["pyllm", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("M,K,N", SHAPES, ids=[f"{m}x{k}x{n}" for m, k, n in SHAPES])
def test_matmul(benchmark, impl, dtype, M, K, N):
    x, w = _inputs(M, K, N, dtype)
    benchmark.group = f"matmul {dtype} {M}x{K}x{N}"
    benchmark.extra_info["gflop"] = 2 * M * N * K / 1e9
    fn = (lambda: ops.matmul(x, w)) if impl == "pyllm" else (lambda: x @ w.T)
    benchmark.pedantic(fn, rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("impl", ["pyllm", "pyllm_q8", "torch"])
@pytest.mark.parametrize("n,k", [(4096, 4096), (32000, 768)])
def test_matvec(benchmark, impl, n, k):
    g = torch.Generator().manual_seed(0)
    W, x = torch.randn(n, k, generator=g), torch.randn(k, generator=g)
    benchmark.group = f"matvec {n}x{k}"
    if impl == "pyllm_q8":
        q, s = ops.quantize_q8(W, 64)
        fn = lambda: ops.matvec_q8(q, s, x)
    else:
        fn = (lambda: ops.matvec(W, x)) if impl == "pyllm" else (lambda: W @ x)
    benchmark.pedantic(fn, rounds=20, warmup_rounds=2)
