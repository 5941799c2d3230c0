"""The extension is built, reports itself honestly, and honours the instruction-set override."""
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from pyllm._ext import C


def test_build_info_fields():
    d = C().build_info()
    for k in ("version", "compiler", "isa_supported", "isa_active", "isa_best", "threads", "cuda_built"):
        assert k in d
    assert "scalar" in d["isa_supported"]
    assert d["isa_best"] == d["isa_supported"][-1]
    import pyllm
    assert d["version"] == pyllm.__version__


@pytest.mark.parametrize("path", ["scalar", "avx2", "avx512"])
def test_env_var_forces_path(path):
    code = "import json; from pyllm._ext import C; print(json.dumps(C().build_info()))"
    env = dict(os.environ, PYLLM_ISA=path)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    d = json.loads(out.stdout)
    if path in d["isa_supported"]:
        assert d["isa_active"] == path and d["isa_env_error"] is None
    else:
        assert d["isa_active"] == d["isa_best"] and d["isa_env_error"]


def test_bad_env_var_reported():
    code = "import json; from pyllm._ext import C; print(json.dumps(C().build_info()))"
    env = dict(os.environ, PYLLM_ISA="sse9")
    d = json.loads(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                  check=True).stdout)
    assert "PYLLM_ISA" in d["isa_env_error"]


def test_isa_set_rejects_unknown():
    with pytest.raises(ValueError):
        C().isa_set("sse9")


def test_cli_info_and_version():
    out = subprocess.run([sys.executable, "-m", "pyllm", "info"], capture_output=True, text=True, check=True).stdout
    assert "isa chosen" in out and C().isa_get() in out
    out = subprocess.run([sys.executable, "-m", "pyllm", "info", "--json"], capture_output=True, text=True,
                         check=True).stdout
    assert json.loads(out)["isa_active"] in C().isa_supported()
    out = subprocess.run([sys.executable, "-m", "pyllm", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("pyllm ")


def test_unknown_flag_is_one_line_error():
    r = subprocess.run([sys.executable, "-m", "pyllm", "info", "--bogus"], capture_output=True, text=True)
    assert r.returncode == 2 and "unrecognized arguments: --bogus" in r.stderr and "Traceback" not in r.stderr


def test_every_subcommand_has_help():
    from pyllm.cli import COMMANDS, build_parser
    for name in COMMANDS:
        sp = build_parser(name)._subparsers._group_actions[0].choices[name]
        text = sp.format_help()
        assert "usage:" in text
        for action in sp._actions:  # every flag documents itself
            if action.option_strings and action.dest != "help":
                assert action.help, f"pyllm {name} {action.option_strings[0]} has no help="


ROOT = Path(__file__).resolve().parents[1]


def _tracked_copy(dst: Path, drop=()) -> list:
    """Copy the files git tracks into dst (sdist writes its egg-info beside setup.py: not into the checkout)."""
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("needs a git checkout")
    files = [f for f in subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                                       check=True).stdout.splitlines() if f not in drop]
    for f in files:
        (dst / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, dst / f)
    return files


def test_sdist_carries_every_source_and_no_build_output(tmp_path):
    # Without MANIFEST.in the sdist lacked run.c and the .cu files, and setup.py skipped what was missing: a wheel
    # built from it (python -m build, a PyPI sdist) had no pyllm-run and no CUDA kernels, and the build said nothing.
    src = tmp_path / "src"
    files = _tracked_copy(src)
    for built in ["pyllm/bin/pyllm-run", "pyllm/lib/libpyllm_run.so", "pyllm/_C.cpython-311-x86_64-linux-gnu.so",
                  "build/temp/cuda/matmul.o"]:  # a developer's tree has these; the sdist must not ship them
        (src / built).parent.mkdir(parents=True, exist_ok=True)
        (src / built).write_bytes(b"built")
    r = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")], cwd=src,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    # pyproject metadata setuptools has deprecated stops building on a date (the license table: 2027-02-18)
    assert "`project." not in r.stderr, r.stderr[-2000:]
    (tgz,) = (tmp_path / "dist").glob("*.tar.gz")
    with tarfile.open(tgz) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    dev_only = {".ci/run", ".gitignore"}  # CI's entry point and git's ignore list are not part of a release
    assert sorted(set(files) - dev_only - names) == []
    assert not [n for n in names if n.startswith(("pyllm/bin", "pyllm/lib", "build/")) or n.endswith((".so", ".o"))]


@pytest.mark.parametrize("drop", ["csrc/run.c", "csrc/cuda/common.cuh"])
def test_incomplete_source_tree_stops_the_build_naming_the_file(tmp_path, drop):
    _tracked_copy(tmp_path, drop={drop})
    env = {**os.environ, "PYLLM_NO_CUDA": ""}
    # build_ext reaches the CUDA check only where nvcc is found: run.c is checked before anything compiles
    if drop.endswith(".cuh") and shutil.which("nvcc") is None and not Path("/usr/local/cuda/bin/nvcc").exists():
        pytest.skip("no nvcc: the CUDA sources are not needed")
    r = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "-b", str(tmp_path / "out"), "-t",
                        str(tmp_path / "tmp")], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode != 0
    assert f"missing source files {drop}" in r.stderr and "incomplete source tree" in r.stderr
    assert not list((tmp_path / "out").rglob("*.so"))


def test_other_architectures_get_one_line_instead_of_a_compiler_error():
    code = ("import platform, runpy, sys; platform.machine = lambda: 'aarch64'; sys.argv = ['setup.py', 'build_ext'];"
            "runpy.run_path('setup.py', run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.strip() == ("pyllm: builds on x86-64 only (its CPU kernels are "
                                                      "SSE2/AVX2/AVX-512 code); this machine is aarch64")


def test_a_failing_nvcc_names_the_file_and_the_way_out(tmp_path):
    # A found nvcc that cannot build (too old for sm_90a, a broken install) ended in a CalledProcessError traceback.
    _tracked_copy(tmp_path / "src")
    fake = tmp_path / "bin" / "nvcc"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho \"nvcc fatal   : Unsupported gpu architecture 'compute_90a'\" >&2\nexit 1\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}", "PYLLM_NO_CUDA": ""}
    r = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "-b", str(tmp_path / "out"), "-t",
                        str(tmp_path / "tmp")], cwd=tmp_path / "src", capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"pyllm: {fake} failed on csrc/cuda/") and "PYLLM_NO_CUDA=1" in last, r.stderr[-1000:]
    assert "Unsupported gpu architecture" in r.stderr
