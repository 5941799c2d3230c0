"""Helpers for the assistant-stage tests: a tiny byte-level model checkpoint and JSONL writers."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from pyllm.checkpoint import save_checkpoint
from pyllm.config import ModelConfig
from pyllm.model import GPT
from pyllm.tokenizer import Tokenizer


def tiny_model(seed: int = 0, dim: int = 32, n_layers: int = 2, max_seq_len: int = 96, vocab_size: int | None = None):
    tok = Tokenizer.byte_level()
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab_size or tok.vocab_size, dim=dim, n_layers=n_layers, n_heads=4, n_kv_heads=2,
                      hidden_dim=64, max_seq_len=max_seq_len)
    return GPT(cfg), tok


def tiny_checkpoint(path, seed: int = 0, **kw) -> Path:
    model, tok = tiny_model(seed, **kw)
    save_checkpoint(str(path), model, tok)
    return Path(path)


def write_jsonl(path, rows) -> Path:
    path = Path(path)
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def cli(argv: list[str]) -> int:
    """pyllm.cli.main with only the one subcommand registered (a teammate's half-landed stage cannot break these
    tests); same parsing, same one-line errors and exit codes as the real CLI."""
    from unittest import mock

    from pyllm import cli as cli_mod
    with mock.patch.dict(cli_mod.COMMANDS, {argv[0]: cli_mod.COMMANDS[argv[0]]}, clear=True):
        return cli_mod.main(argv)


@contextlib.contextmanager
def ctrl_c_after_save(stage_module, step: int):
    """Inside the block, the stage's save_stage raises KeyboardInterrupt (a Ctrl-C) right after saving `step`:
    a run interrupted there, for the --resume tests."""
    orig = stage_module.save_stage

    def save_then_die(out, model, tok, **kw):
        orig(out, model, tok, **kw)
        if kw["step"] == step:
            raise KeyboardInterrupt
    stage_module.save_stage = save_then_die
    try:
        yield
    finally:
        stage_module.save_stage = orig


# A sitecustomize for torchrun'd ranks: after the stage destroys its process group it leaves a reference cycle whose
# __del__ logs whether the interpreter is finalizing, and an atexit function logs that it ran.
_EXIT_PROBE = '''
import atexit, os, sys
import torch.distributed as dist
_log_path = os.environ["PYLLM_TEST_EXIT_LOG"] + "." + os.environ["RANK"]
def _log(s):
    with open(_log_path, "a") as f:
        f.write(s + "\\n")
atexit.register(_log, "atexit ran")
class _Cycle:
    def __del__(self):
        _log(f"python ran while finalizing: {sys.is_finalizing()}")
_destroy = dist.destroy_process_group
def destroy_process_group(*a, **k):
    _destroy(*a, **k)
    c = _Cycle()
    c.me = c
dist.destroy_process_group = destroy_process_group
'''


def exit_probe(tmp_path: Path, env: dict) -> Path:
    """Puts _EXIT_PROBE on the ranks' PYTHONPATH (env is changed) -> the log's path prefix (one file per rank).
    assert_clean_exit reads it. Why: DDP keeps gloo's worker threads alive past destroy_process_group, and one still
    releasing the last collective's tensors (which takes the GIL) aborted its rank (SIGABRT, "terminate called
    without an active exception") when the interpreter was finalizing: 2 of ~47 two-rank pretrain runs on a loaded
    machine (2026-11-26). No Python may run in a finalizing interpreter of a rank that had a process group."""
    d = tmp_path / "exit_probe"
    d.mkdir()
    (d / "sitecustomize.py").write_text(_EXIT_PROBE)
    env["PYTHONPATH"] = str(d) + (":" + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYLLM_TEST_EXIT_LOG"] = str(d / "log")
    return d / "log"


def assert_clean_exit(log: Path, ranks: int = 2) -> None:
    for r in range(ranks):
        lines = Path(f"{log}.{r}").read_text().splitlines()
        assert "atexit ran" in lines, (r, lines)                                   # Python's exit work still done
        assert "python ran while finalizing: False" in lines, (r, lines)          # the cycle collected before exit
        assert "python ran while finalizing: True" not in lines, (r, lines)
