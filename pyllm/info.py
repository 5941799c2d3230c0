"""`pyllm info`: what was built and what this machine runs (version, compiler, ISA found/chosen, threads, CUDA)."""
from __future__ import annotations

import json
import platform


def add_arguments(p):
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def collect() -> dict:
    from . import __version__
    from ._ext import C
    d = {"pyllm": __version__, "python": platform.python_version(), "machine": platform.machine()}
    d.update(C().build_info())
    try:
        import torch
        d["torch"] = torch.__version__
        d["torch_cuda_available"] = torch.cuda.is_available()
    except ImportError:
        d["torch"] = None
    return d


def main(args) -> int:
    d = collect()
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    print(f"pyllm {d['pyllm']}  (python {d['python']}, {d['machine']})")
    print(f"  compiler        {d['compiler']}")
    print(f"  isa supported   {', '.join(d['isa_supported'])}")
    print(f"  isa chosen      {d['isa_active']}" + (f"   (PYLLM_ISA: {d['isa_env_error']})" if d['isa_env_error'] else ""))
    feats = [k for k, v in d["cpu_features"].items() if v]
    print(f"  cpu features    {' '.join(feats) or 'none'}")
    print(f"  openmp threads  {d['threads']}" + ("" if d["openmp"] else " (built without OpenMP)"))
    print(f"  cuda kernels    {'built' if d['cuda_built'] else 'not built'}; devices: {d['cuda_devices']}")
    print(f"  torch           {d['torch']}")
    return 0


if __name__ == "__main__":  # python -m pyllm.info ... == pyllm <command> ...
    from .cli import module_main
    raise SystemExit(module_main(__spec__.name))
