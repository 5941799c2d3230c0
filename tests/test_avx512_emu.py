"""The avx512 path of every CPU kernel (16-lane tiles, masked tails, in-register transposes, the VNNI Q8_0 matvec,
the AMX bf16 driver and the vdpbf16ps k-pair GEMM) on a CPU without AVX-512: pyllm._C is rebuilt with the avx512 build on a C model of the
instructions (tests/avx512_emu.h; isa.c and impl_matvec.h under -DPYLLM_EMULATE_AVX512), pyllm-run likewise, and
the kernel, model and pyllm-run tests run on that avx512 path in subprocesses. Where the CPU has AVX-512 the real
path runs in the other tests instead.
Run: python -m pytest -q tests/test_avx512_emu.py   (about 2-3 minutes on 2 cores: a build, then the tests)"""
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pyllm._ext import C

ROOT = Path(__file__).resolve().parents[1]
SHIM = """// the avx512 build of every kernel in kernels_impl.h, on tests/avx512_emu.h's model of the instructions
#pragma GCC target("avx2,fma,f16c,bmi,bmi2")
#include <immintrin.h>
#include "avx512_emu.h"
#define PYLLM_AMX_EMULATE 1
#include <stdlib.h>
#define KFN(name) name##_avx512
#include "kernels_impl.h"
"""
# the kernel tests; run with -k avx512: the isa fixture's avx512 cases, and the tests that name the path
# (the bf16 matmul cases go through impl_amx.h's driver on its tile model, as the build reports AMX; with
# PYLLM_NO_AMX=1 through the k-pair GEMM on the vdpbf16ps model, and the widening path)
KERNEL_TESTS = ["test_kernels_matmul.py", "test_kernels_attention.py", "test_kernels_sample.py",
                "test_kernels_norm.py", "test_kernels_fused.py"]

pytestmark = pytest.mark.skipif(
    platform.machine() not in ("x86_64", "AMD64") or not shutil.which("gcc") or not shutil.which("g++")
    or C().build_info()["cpu_features"]["avx512f"] or not C().build_info()["cpu_features"]["avx2"],
    reason="needs x86-64 with AVX2 but not AVX-512 (with AVX-512 the real path is tested), gcc and g++")


def _build(d: Path) -> None:
    """pyllm._C with the emulated avx512 path into d/pyllm (a copy of the package's Python files)."""
    import pybind11
    shutil.copytree(ROOT / "pyllm", d / "pyllm", ignore=shutil.ignore_patterns("*.so", "bin", "lib", "__pycache__"))
    shutil.copytree(ROOT / "tests", d / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "csrc", d / "csrc")   # tests read run.h and model_file.c's limits
    shutil.copy(ROOT / "pyproject.toml", d)   # pytest's settings and markers
    (d / "isa_avx512_emu.c").write_text(SHIM)
    inc = ["-I", str(ROOT / "csrc"), "-I", str(ROOT / "csrc" / "cpu"), "-I", str(ROOT / "tests")]
    emu = ["-DPYLLM_EMULATE_AVX512"]
    c = ["gcc", "-std=c11", "-O2", "-fopenmp", "-fPIC", "-fno-math-errno", "-Wno-psabi", *inc]
    jobs = [c + emu + ["-c", str(ROOT / "csrc/cpu/isa.c"), "-o", str(d / "isa.o")],
            c + emu + ["-c", str(d / "isa_avx512_emu.c"), "-o", str(d / "avx512.o")]]
    jobs += [c + ["-c", str(ROOT / f"csrc/cpu/{n}.c"), "-o", str(d / f"{n}.o")]
             for n in ("kernels", "isa_scalar", "isa_avx2")]
    jobs += [c + ["-c", str(ROOT / f"csrc/{n}.c"), "-o", str(d / f"{n}.o")] for n in ("run", "tokenizer", "model_file")]
    jobs.append(c + ["-DPYLLM_RUN_LIBRARY", "-c", str(ROOT / "csrc/run.c"), "-o", str(d / "run_lib.o")])
    version = next(ln.split('"')[1] for ln in (ROOT / "pyllm/__init__.py").read_text().splitlines()
                   if ln.startswith("__version__"))
    jobs.append(["g++", "-std=c++17", "-O1", "-fopenmp", "-fPIC", *inc, "-I", pybind11.get_include(), "-I",
                 sysconfig.get_paths()["include"], f'-DPYLLM_VERSION="{version}"', "-c",
                 str(ROOT / "csrc/bindings.cpp"), "-o", str(d / "bindings.o")])

    def run(cmd):
        return subprocess.run(cmd, capture_output=True, text=True)
    with ThreadPoolExecutor(os.cpu_count() or 1) as ex:
        for r in ex.map(run, jobs):
            assert r.returncode == 0, f"{' '.join(r.args)}\n{r.stderr[-3000:]}"
    kernels = [str(d / f"{n}.o") for n in ("isa", "avx512", "kernels", "isa_scalar", "isa_avx2")]
    so = d / "pyllm" / f"_C{sysconfig.get_config_var('EXT_SUFFIX')}"
    (d / "pyllm" / "bin").mkdir()
    (d / "pyllm" / "lib").mkdir()
    shutil.copy(ROOT / "csrc" / "run.h", d / "pyllm" / "lib" / "run.h")
    run_c = [str(d / f"{n}.o") for n in ("tokenizer", "model_file")] + kernels + ["-lm"]
    for cmd in (["g++", "-shared", "-fopenmp", *kernels, str(d / "bindings.o"), "-o", str(so)],   # pyllm._C
                ["gcc", "-fopenmp", str(d / "run.o"), *run_c, "-o", str(d / "pyllm/bin/pyllm-run")],
                ["gcc", "-shared", "-fopenmp", "-Wl,-z,nodelete", str(d / "run_lib.o"), *run_c, "-o",
                 str(d / "pyllm/lib/libpyllm_run.so")]):
        r = run(cmd)
        assert r.returncode == 0, r.stderr[-3000:]


@pytest.fixture(scope="module")
def emu_tree(tmp_path_factory):
    d = tmp_path_factory.mktemp("avx512emu")
    _build(d)
    return d


def _pytest(d: Path, *args, env_extra=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYLLM_")}   # only the switches asked for
    env.update(PYTHONPATH=str(d), **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=d, env=env,
                          capture_output=True, text=True)


def test_the_emulated_build_reports_the_avx512_path(emu_tree):
    code = ("import pyllm._C as c, json; i = c.build_info(); "
            "print(c.__file__); print(json.dumps([c.isa_supported(), i['cpu_features']]))")
    r = subprocess.run([sys.executable, "-c", code], cwd=emu_tree, env={**os.environ, "PYTHONPATH": str(emu_tree)},
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    path, info = r.stdout.splitlines()
    assert Path(path).parent == emu_tree / "pyllm"   # the emulated build, not the installed one
    assert '"avx512"' in info and '"avx512vnni": 1' in info and '"amx_tile": 1' in info, info
    assert '"avx512bf16": 1' in info, info


@pytest.mark.parametrize("switches", [{}, {"PYLLM_NO_AMX": "1", "PYLLM_NO_VNNI": "1"}],
                         ids=["vnni+amx", "no-vnni-no-amx"])
def test_kernels_on_the_emulated_avx512_path(emu_tree, switches):
    """Every avx512 case of the kernel tests against pyllm.ref, with the VNNI and AMX drivers and without them."""
    r = _pytest(emu_tree, *[f"tests/{t}" for t in KERNEL_TESTS], "-k", "avx512", env_extra=switches)
    tail = r.stdout[-4000:] + r.stderr[-2000:]
    assert r.returncode == 0, tail
    m = re.search(r"(\d+) passed", r.stdout)
    assert m and int(m.group(1)) >= 50, tail   # the avx512 cases ran, not a selection that matched nothing


def test_model_forward_backward_on_the_emulated_avx512_path(emu_tree):
    """The decoder layer and the model (forward, backward, generate) with every kernel on the avx512 path."""
    r = _pytest(emu_tree, "tests/test_ops_block.py", "tests/test_model.py", env_extra={"PYLLM_ISA": "avx512"})
    tail = r.stdout[-4000:] + r.stderr[-2000:]
    assert r.returncode == 0, tail
    m = re.search(r"(\d+) passed", r.stdout)
    assert m and int(m.group(1)) >= 20, tail


def test_pyllm_run_on_the_emulated_avx512_path(emu_tree):
    """pyllm-run and its C API (the binary's own threading around the same kernels) against Python, avx512 path."""
    r = _pytest(emu_tree, "tests/test_run.py", env_extra={"PYLLM_ISA": "avx512"})
    tail = r.stdout[-4000:] + r.stderr[-2000:]
    assert r.returncode == 0, tail
    m = re.search(r"(\d+) passed", r.stdout)
    assert m and int(m.group(1)) >= 20, tail
