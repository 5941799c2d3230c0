# setup.py — builds pyllm._C (plain pybind11, no torch headers), the CUDA kernels when nvcc is found, and the
# standalone binary `pyllm-run` + its C API library. `pip install .` or `pip install -e . --no-build-isolation`.
# Env: PYLLM_NO_CUDA=1 skips CUDA; PYLLM_CUDA_ARCHS="80;90a" picks GPU targets; PYLLM_DEBUG=1 builds -O0 -g;
# PYLLM_BUILD_JOBS=N compiles the extension's C sources N at a time (default: every core).
import concurrent.futures
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension, build_ext
from setuptools import setup

ROOT = Path(__file__).parent.resolve()
# The CPU kernels are x86 SIMD (SSE2 baseline, AVX2, AVX-512, AMX; csrc/cpu/simd.h): elsewhere the compiler stopped at
# a missing immintrin.h. Say why in one line instead (an sdist can still be made anywhere).
if platform.machine().lower() not in ("x86_64", "amd64") and "sdist" not in sys.argv:
    sys.exit(f"pyllm: builds on x86-64 only (its CPU kernels are SSE2/AVX2/AVX-512 code); this machine is "
             f"{platform.machine() or 'unknown'}")
VERSION = re.search(r'__version__ = "([^"]+)"', (ROOT / "pyllm" / "__init__.py").read_text()).group(1)
DEBUG = os.environ.get("PYLLM_DEBUG") == "1"
OPT = ["-O0", "-g"] if DEBUG else ["-O3"]

# The CPU kernels: one body (kernels_impl.h) compiled once per ISA path, plus dispatch; shared with csrc/run.c.
CPU_SOURCES = ["csrc/cpu/isa.c", "csrc/cpu/kernels.c", "csrc/cpu/isa_scalar.c", "csrc/cpu/isa_avx2.c",
               "csrc/cpu/isa_avx512.c"]
C_FLAGS = ["-std=c11", *OPT, "-fopenmp", "-Wall", "-fno-math-errno"]
CXX_FLAGS = [*OPT, "-fopenmp", "-Wall"]


def find_nvcc():
    if os.environ.get("PYLLM_NO_CUDA", "") not in ("", "0"):
        return None
    nvcc = shutil.which("nvcc")
    if nvcc is None and Path("/usr/local/cuda/bin/nvcc").exists():
        nvcc = "/usr/local/cuda/bin/nvcc"
    return nvcc


def cuda_archs():
    """PYLLM_CUDA_ARCHS ("80;90a" by default) as a list. A plain "90" becomes "90a": the Hopper matmul's wgmma and
    setmaxnreg exist only in the 90a target, and in a plain sm_90 build that kernel is an empty stub that traps, while
    the dispatch (which sees sm_90 machine code from sm_90 PTX either way) would still pick it."""
    archs = [a.strip() for a in os.environ.get("PYLLM_CUDA_ARCHS", "80;90a").split(";") if a.strip()]
    if "90" in archs:
        print("pyllm: PYLLM_CUDA_ARCHS: building 90 as 90a (the Hopper matmul needs the 90a target)")
        archs = ["90a" if a == "90" else a for a in archs]
    return archs


def cuda_sources():
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cu"))


def require_sources(paths):
    """Stop the build, naming the files, when sources are missing (an incomplete sdist or checkout): building
    on would make a wheel without the C binary or the CUDA kernels and say nothing."""
    missing = [p for p in paths if not (ROOT / p).exists()]
    if missing:
        sys.exit(f"pyllm: missing source files {', '.join(missing)} under {ROOT}: incomplete source tree "
                 "(an sdist built without MANIFEST.in?); use a full checkout")


class BuildExt(build_ext):
    """C sources get C flags, .cu sources go through nvcc, then the standalone binary is linked."""

    def run(self):
        self._want_inplace = self.inplace  # setuptools clears self.inplace while build_extensions() runs
        super().run()

    def build_extensions(self):
        compiler = self.compiler
        original_compile = compiler._compile

        def _compile(obj, src, ext, cc_args, extra_postargs, pp_opts):
            if src.endswith(".c"):
                extra_postargs = [a for a in extra_postargs if not a.startswith("-std=c++")]
                extra_postargs = [a for a in extra_postargs if a not in CXX_FLAGS] + C_FLAGS
            original_compile(obj, src, ext, cc_args, extra_postargs, pp_opts)

        compiler._compile = _compile
        for ext in self.extensions:
            self._add_cuda(ext)
        try:
            super().build_extensions()
        finally:
            compiler._compile = original_compile
        self._build_run_binary()

    def _add_cuda(self, ext):
        nvcc = find_nvcc()
        srcs = cuda_sources()
        if nvcc is None:
            print("pyllm: building without CUDA (" + ("PYLLM_NO_CUDA set" if os.environ.get("PYLLM_NO_CUDA")
                                                       else "no nvcc") + ")")
            return
        require_sources(["csrc/cuda/common.cuh"] + ([] if srcs else ["csrc/cuda/*.cu"]))
        archs = cuda_archs()
        gencode = []
        for a in archs:
            num = a.rstrip("a")
            gencode += [f"-gencode=arch=compute_{a},code=sm_{a}"]
        gencode += [f"-gencode=arch=compute_{archs[0]},code=compute_{archs[0]}"]  # PTX for newer GPUs
        # one object directory per target list: a build for other GPUs (PYLLM_CUDA_ARCHS=90a, then the default)
        # reused the other targets' objects ("no kernel image" on an A100)
        objdir = Path(self.build_temp) / ("cuda-" + "_".join(archs))
        objdir.mkdir(parents=True, exist_ok=True)
        # every header a .cu sees: kernels_cuda.h and the CPU kernels.h declare the parameter structs it takes by
        # value (a changed layout beside a stale object was a silent mismatch)
        headers = [*(ROOT / "csrc" / "cuda").glob("*.cuh"), *(ROOT / "csrc" / "cuda").glob("*.h"),
                   ROOT / "csrc" / "cpu" / "kernels.h"]
        newest_header = max(p.stat().st_mtime for p in headers if p.exists())
        objs, todo = [], []
        for src in srcs:
            obj = objdir / (Path(src).stem + ".o")
            if not obj.exists() or obj.stat().st_mtime < max(newest_header, (ROOT / src).stat().st_mtime):
                todo.append([nvcc, "-c", src, "-o", str(obj), "-O3", "-std=c++17", "-Xcompiler", "-fPIC",
                             "--expt-relaxed-constexpr", "-lineinfo", *gencode])
            objs.append(str(obj))
        def run(cmd):
            print(" ".join(cmd))
            return subprocess.call(cmd, cwd=ROOT)
        # nvcc runs one file per process and each takes tens of seconds for two targets: run them side by side
        with concurrent.futures.ThreadPoolExecutor(max(1, min(len(todo), os.cpu_count() or 1))) as pool:
            for cmd, rc in zip(todo, pool.map(run, todo)):
                if rc != 0:  # nvcc printed why; say what to do instead of a traceback
                    sys.exit(f"pyllm: {nvcc} failed on {cmd[2]} (its message is above). PYLLM_NO_CUDA=1 builds "
                             f"without CUDA; an older nvcc may need PYLLM_CUDA_ARCHS (now {';'.join(archs)}), e.g. "
                             "\"80\"")
        # nvcc may be a wrapper script (/usr/local/bin/nvcc -> exec /usr/local/cuda-X/bin/nvcc): look for
        # libcudart_static.a next to it, then under CUDA_HOME and /usr/local/cuda.
        homes = [Path(nvcc).resolve().parent.parent, Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")),
                 Path("/usr/local/cuda")]
        libdirs = [h / d for h in homes for d in ("lib64", "lib", "targets/x86_64-linux/lib")
                   if (h / d / "libcudart_static.a").exists()]
        ext.extra_objects += objs
        ext.define_macros += [("PYLLM_WITH_CUDA", "1")]
        ext.library_dirs += [str(d) for d in libdirs[:1]] or [str(homes[0] / "lib64"), str(homes[0] / "lib")]
        ext.libraries += ["cudart_static", "rt", "dl", "pthread"]

    def _build_run_binary(self):
        """Link csrc/run.c with the same CPU kernel sources into pyllm/bin/pyllm-run and pyllm/lib/libpyllm_run.so."""
        if getattr(self, "_want_inplace", self.inplace):
            pkg = ROOT / "pyllm"
        else:
            pkg = Path(self.build_lib) / "pyllm"
        (pkg / "bin").mkdir(parents=True, exist_ok=True)
        (pkg / "lib").mkdir(parents=True, exist_ok=True)
        cc = os.environ.get("CC", "gcc")
        srcs = [str(ROOT / s) for s in ["csrc/run.c", *RUN_EXTRA_SOURCES, *CPU_SOURCES]]
        flags = [*C_FLAGS, "-I", str(ROOT / "csrc")]
        exe = pkg / "bin" / "pyllm-run"
        so = pkg / "lib" / "libpyllm_run.so"
        # -z nodelete: the library (and so libgomp, which only it loads into a cffi process) is never unmapped. cffi
        # dlcloses it at interpreter exit while libgomp's idle worker threads still spin in libgomp's code: without
        # the flag that exit segfaulted now and then (8 of 160 two-thread runs under load).
        jobs = []  # the binary and the library compile the same sources: side by side
        for out, extra in ((exe, []), (so, ["-shared", "-fPIC", "-DPYLLM_RUN_LIBRARY", "-Wl,-z,nodelete"])):
            tmp = out.with_name(out.name + ".tmp")
            cmd = [cc, *flags, *extra, *srcs, "-o", str(tmp), "-lm"]
            print(" ".join(cmd))
            jobs.append((subprocess.Popen(cmd), cmd, tmp, out))
        failed = [(proc.returncode, cmd) for proc, cmd, _, _ in jobs if proc.wait() != 0]
        for _, _, tmp, out in jobs:
            if failed:
                tmp.unlink(missing_ok=True)
            else:
                os.replace(tmp, out)  # atomic: a failed link never leaves a half-written binary
        if failed:
            raise subprocess.CalledProcessError(*failed[0])
        # The C API's one declaration: pyllm/runtime.py hands this header to cffi, so it ships beside the library.
        hdr = pkg / "lib" / "run.h"
        shutil.copyfile(ROOT / "csrc" / "run.h", hdr.with_name("run.h.tmp"))
        os.replace(hdr.with_name("run.h.tmp"), hdr)


# The extension's C/C++ sources compile in parallel (PYLLM_BUILD_JOBS, default: every core).
ParallelCompile("PYLLM_BUILD_JOBS", default=0).install()

# Sources that csrc/run.c needs besides the CPU kernels (its tokenizer, model loader).
RUN_EXTRA_SOURCES = ["csrc/tokenizer.c", "csrc/model_file.c"]
require_sources(["csrc/bindings.cpp", "csrc/run.c", "csrc/run.h", *RUN_EXTRA_SOURCES, *CPU_SOURCES])

ext = Pybind11Extension(
    "pyllm._C",
    sources=["csrc/bindings.cpp", *CPU_SOURCES],
    include_dirs=["csrc"],
    define_macros=[("PYLLM_VERSION", f'"{VERSION}"')],
    extra_compile_args=CXX_FLAGS,
    extra_link_args=["-fopenmp"],
    cxx_std=17,
    # headers too, so editing a kernel header (csrc/cpu/impl_*.h) rebuilds instead of keeping a stale _C
    depends=sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*.h")),
)

setup(
    version=VERSION,
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExt},
    package_data={"pyllm": ["bin/pyllm-run", "lib/libpyllm_run.so", "lib/run.h"]},
)
