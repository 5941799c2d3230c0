"""The README's test command is the one .ci/run runs, and the README names the main-job command."""
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _ci_command() -> str:
    lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    return [ln for ln in lines if "pytest" in ln and not ln.startswith("#")][-1]


def test_ci_runs_readme_test_command():
    assert _ci_command() in (ROOT / "README.md").read_text()


def test_readme_has_main_job_command():
    assert "pip install torch==2.13.0 && pip install . && pyllm demo" in (ROOT / "README.md").read_text()



FLAG = r"(?<![\w-])(--[a-z][\w-]*)"


def _readme_commands():
    """(program, subcommand, flags) of every command line in the README's bash blocks (comments after "  #" left
    out); a line that starts with whitespace and "[" continues the previous command."""
    import re
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    cmds = []
    for block in blocks:
        for line in block.splitlines():
            code = line.split("  #")[0]
            if code.lstrip().startswith("[") and cmds:
                cmds[-1][2].extend(re.findall(FLAG if cmds[-1][0] == "pyllm" else r"(?<![\w-])(-{1,2}[a-z][\w-]*)",
                                              code))
                continue
            for part in code.split("&&"):
                toks = part.split()
                if "pyllm" in toks and "pip" not in toks:
                    rest = toks[toks.index("pyllm") + 1:]
                    sub = next((t for t in rest if not t.startswith("-")), None)
                    cmds.append(("pyllm", sub, re.findall(FLAG, " ".join(rest))))
                elif toks and toks[0] == "pyllm-run":
                    cmds.append(("pyllm-run", None, re.findall(r"(?<![\w-])(-{1,2}[a-z][\w-]*)", " ".join(toks[1:]))))
    return cmds


def test_every_flag_in_the_readme_exists():
    """The README's example commands name only subcommands and flags their programs accept, and every --flag the
    README mentions anywhere is one of pyllm's (or torchrun's --nproc-per-node): doc drift fails here, not for users."""
    import re
    import subprocess
    from pyllm.cli import COMMANDS, build_parser
    from pyllm.runtime import BIN_PATH
    run_help = subprocess.run([str(BIN_PATH), "--help"], capture_output=True, text=True)
    run_help = run_help.stdout + run_help.stderr
    assert "usage: pyllm-run" in run_help
    run_flags = set(re.findall(r"^\s+(-{1,2}[a-z][\w-]*)", run_help, re.M)) | {"--help"}
    parsers = {sub: build_parser(sub)._subparsers._group_actions[0].choices[sub] for sub in COMMANDS}
    known = {sub: {o for a in sp._actions for o in a.option_strings} for sub, sp in parsers.items()}
    cmds = _readme_commands()
    assert len(cmds) >= 12 and sum(len(f) for _, _, f in cmds) >= 40, cmds  # the extraction still finds them
    for prog, sub, flags in cmds:
        if prog == "pyllm-run":
            assert set(flags) <= run_flags, f"README: pyllm-run {sorted(set(flags) - run_flags)} not in its --help"
            continue
        assert sub in COMMANDS, f"README: pyllm {sub} is not a command"
        assert set(flags) <= known[sub], f"README: pyllm {sub} has no {sorted(set(flags) - known[sub])}"
    text = (ROOT / "README.md").read_text()
    bench_flags = set()   # `python benchmarks/x.py --flag` in the text: each flag is one of that script's
    for script, args in re.findall(r"python (benchmarks/\w+\.py)([^`\n]*)", text):
        flags = set(re.findall(FLAG, args))
        if flags:
            h = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True,
                               cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout
            have = set(re.findall(FLAG, h))
            assert flags <= have, f"README: {script} has no {sorted(flags - have)}"
            bench_flags |= flags
    anywhere = set(re.findall(FLAG, text))
    unknown = anywhere - set().union(*known.values()) - run_flags - bench_flags - {"--nproc-per-node"}
    assert not unknown, f"README mentions flags no command has: {sorted(unknown)}"


def test_quick_api_snippet_runs():
    """The README's Quick API block, run verbatim: logits (B, T, V), a scalar loss, the prompt + 16 new tokens."""
    import re
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert len(blocks) == 1, "README: expected one python block (Quick API)"
    ns: dict = {}
    exec(compile(blocks[0], "README.md:Quick API", "exec"), ns)
    assert tuple(ns["logits"].shape) == (2, 64, 512) and ns["loss"].ndim == 0
    assert tuple(ns["out"].shape) == (2, 8 + 16)
