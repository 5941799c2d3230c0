"""Shared fixtures: every instruction-set path the machine supports, fresh seeds, GPU skipping."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from pyllm._ext import C

ISAS = C().isa_supported()
SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(params=ISAS)
def isa(request):
    """Run the test once per CPU path this machine can run (scalar, avx2, avx512), then restore the default."""
    before = C().isa_get()
    C().isa_set(request.param)
    yield request.param
    C().isa_set(before)


@pytest.fixture
def rng():
    """A fresh generator per test: a new seed every run (printed on failure) so inputs are never fixed."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"rng seed {seed}")  # shown by pytest for a failing test
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def asan_cc(tmp_path) -> str:
    """A C compiler whose ASan + UBSan runtime links (the sanitizer tests skip without one)."""
    import shutil
    import subprocess
    cc = shutil.which(os.environ.get("CC", "gcc"))
    if cc is None:
        pytest.skip("no C compiler")
    probe = tmp_path / "probe.c"
    probe.write_text("int main(void){return 0;}\n")
    if subprocess.run([cc, "-fsanitize=address,undefined", str(probe), "-o", str(tmp_path / "probe")],
                      capture_output=True).returncode != 0:
        pytest.skip("the ASan/UBSan runtime is not installed for this compiler")
    return cc


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill an output buffer with NaN so an element the kernel never writes fails the comparison."""
    return t.fill_(float("nan"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
