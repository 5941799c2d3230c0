"""The extension is built, reports itself honestly, and honours the instruction-set override."""
import json
import os
import subprocess
import sys

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
