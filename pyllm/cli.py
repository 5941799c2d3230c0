"""The `pyllm` command: one subcommand per stage (`pyllm <cmd> --help`). Run as `pyllm` or `python -m pyllm`."""
from __future__ import annotations

import argparse
import importlib
import math
import re
import signal
import sys

from . import __version__

# name -> (module, help). Each module defines add_arguments(parser) and main(args). Stages register here.
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("pyllm.info", "print version, compiler, instruction sets found and chosen, threads, CUDA, torch"),
    "tokenizer-train": ("pyllm.tokenizer_train", "train a BPE tokenizer on .txt/.jsonl files"),
    "prepare": ("pyllm.prepare", "tokenize .txt/.jsonl files into train/val token shards (resumable)"),
    "pretrain": ("pyllm.pretrain", "pretrain a base model on prepared token shards (DDP/FSDP via torchrun)"),
    # assistant stages (chat engineer)
    "sft": ("pyllm.sft", "supervised fine-tuning on chat JSONL (loss on assistant tokens, packed rows)"),
    "reward": ("pyllm.reward", "train a reward model on preference JSONL {prompt, chosen, rejected}"),
    "score": ("pyllm.score", "score (prompt, response) JSONL lines with a reward model"),
    "rl": ("pyllm.rl", "RL from a reward model and/or a Python reward function (PPO, GRPO or rejection-sampling fine-tuning)"),
    "dpo": ("pyllm.dpo", "direct preference optimization on preference JSONL (sigmoid loss)"),
    "export": ("pyllm.export", "write model.bin + tokenizer.bin for pyllm-run (or llama2.c), fp32 or Q8_0"),
    "demo": ("pyllm.demo", "the whole recipe on a built-in task: tokenizer, pretrain, SFT, RM, RL, export, C binary"),
}


class _HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to a flag's help unless the text already states it, e.g. "(1e-3)" or "(0 = off; 1.0)"
    (the stages' shared flags named no defaults; pretrain's spell them out by hand)."""

    def _get_help_string(self, action):
        h = action.help or ""
        d = action.default
        if (not action.option_strings or d is None or d is False or d == [] or d is argparse.SUPPRESS
                or "default" in h.lower() or f"({d})" in h):
            return h
        said = re.findall(r"[(:;\s]([-+]?[\d.]+(?:e[-+]?\d+)?)(?:\)| =)", h)  # "(1e-3)", "(0 = off)"
        try:
            if any(float(x) == float(d) for x in said):
                return h
        except (TypeError, ValueError):
            if any(x == str(d) for x in said):
                return h
        return h + " (default: %(default)s)"


FLOAT32_MAX = 3.4028234663852886e38  # the largest finite float32: the weights, losses and kernels are fp32
INT64_MAX = 2 ** 63 - 1


def finite_float(text: str) -> float:
    """argparse type of every float flag: `nan` and `inf` parse as floats but no flag means anything by them (a NaN
    --weight-decay trained to an all-NaN checkpoint and exited 0); nor a magnitude past float32's, which the fp32
    tensors it meets cannot hold (--clip-range 1e308 was torch's "value cannot be converted to type float without
    overflow" traceback, --lr 1e308 an all-inf checkpoint)."""
    v = float(text)
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    if abs(v) > FLOAT32_MAX:
        raise argparse.ArgumentTypeError(f"must be at most {FLOAT32_MAX:.7g} in magnitude (float32's range), "
                                         f"got {text!r}")
    return v


def int64(text: str) -> int:
    """argparse type of every int flag: a 64-bit integer. Past it no flag means anything either, and the value met
    a C int64 / numpy / torch conversion somewhere inside (--workers 2^64 was an OverflowError traceback, --top-k
    2^64 an error naming no flag, after the model had loaded)."""
    v = int(text)
    if abs(v) > INT64_MAX:
        raise argparse.ArgumentTypeError(f"must be an integer within +-(2^63 - 1), got {text!r}")
    return v


# argparse names the type in "invalid <name> value: 'x'": the user typed an int or a float, not an int64
int64.__name__, finite_float.__name__ = "int", "float"


class CLIError(Exception):
    """A user-facing error: printed as one line `pyllm <cmd>: error: ...`, exit status 2."""


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """All subcommands are listed; only `command`'s module is imported (fast start, one broken stage can't
    take down the others)."""
    p = argparse.ArgumentParser(prog="pyllm", description="pyllm: a small, fast, honest GPT runtime.")
    p.add_argument("--version", action="version", version=f"pyllm {__version__}")
    sub = p.add_subparsers(dest="command", metavar="<command>")
    for name, (mod, help_) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_, description=help_, formatter_class=_HelpFormatter)
        if name == command:
            m = importlib.import_module(mod)
            m.add_arguments(sp)
            for a in sp._actions:  # every float and int flag of every stage, in one place
                if a.type is float:
                    a.type = finite_float
                elif a.type is int:
                    a.type = int64
            sp.set_defaults(_module=m, _parser=sp)
    return p


_started_process_group = False  # set by start_process_group: the program then ends the process itself (end_process)


def start_process_group(backend: str) -> None:
    """torch.distributed.init_process_group for a stage that torchrun launched (pretrain, sft and the stages on
    sft.Dist). Once it ran, the program (main() without argv, module_main) ends the process in end_process."""
    global _started_process_group
    import torch.distributed
    torch.distributed.init_process_group(backend)
    _started_process_group = True


def end_process(rc: int) -> None:
    """Exit a process that ran a gloo/NCCL process group without the interpreter's finalization (the `pyllm` program
    does; a script that runs stages under torchrun through main(argv) ends with it too). Why: DDP keeps its
    process group (and gloo's worker threads) alive past destroy_process_group, and a worker still releasing the
    last collective's work (a barrier holds the allreduces before it, whose tensors are Python objects) takes the
    GIL; once finalization began that call ends the thread and, through C++ frames, aborts the process ("terminate
    called without an active exception", SIGABRT, a rank failed after a finished run; ~1 in 20-50 two-rank runs on a
    loaded 2-core machine, core dump 2026-11-26; pytorch/pytorch#179291). Python's own exit work runs first, while
    the interpreter is whole: atexit functions (temporary directories, logging), a collection of cycles (file
    objects closed and flushed), the streams flushed."""
    import atexit
    import gc
    import os
    try:
        atexit._run_exitfuncs()
        gc.collect()
        for f in (sys.stdout, sys.stderr):
            if f is not None:
                f.flush()
    finally:
        os._exit(rc)


def main(argv: list[str] | None = None) -> int:
    """Run one `pyllm <command> ...` -> its exit code. argv None: this is the program (the `pyllm` script, `python -m
    pyllm`), argv from sys.argv; a process that ran a process group then ends here (end_process). A list: a call
    from Python (a script that runs several stages in one torchrun'd process), which returns."""
    if argv is not None:
        return _main(argv)
    return _program(sys.argv[1:])


def _program(argv: list[str]) -> int:
    """main() as the process's program: after a stage that ran a process group, the process ends in end_process
    (an unexpected exception's traceback printed first, exit code 1)."""
    try:
        rc = _main(argv)
    except SystemExit as e:
        if not _started_process_group:
            raise
        rc = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        if not isinstance(e.code, (int, type(None))):  # sys.exit("message") prints it, as Python would
            print(e.code, file=sys.stderr)
    except BaseException:
        if not _started_process_group:
            raise
        import traceback
        traceback.print_exc()
        rc = 1
    if _started_process_group:
        end_process(rc)
    return rc


def _main(argv: list[str]) -> int:
    argv = list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    try:  # Ctrl-C while the stage's module imports torch (1-2 s) was a 40-line traceback from inside torch
        parser = build_parser(command if command in COMMANDS else None)
    except KeyboardInterrupt:
        print(f"pyllm {command if command in COMMANDS else ''}".rstrip() + ": interrupted", file=sys.stderr)
        return 130
    args, extra = parser.parse_known_args(argv)
    if extra:  # from the subcommand's parser: its usage line and `pyllm <cmd>: error:`, not the top-level ones
        getattr(args, "_parser", parser).error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:
        parser.print_help()
        return 0
    args._given = _given_flags(args._parser, argv[argv.index(args.command) + 1:])
    prev = _catch_sigterm()
    try:
        rc = args._module.main(args)
    except (CLIError, ValueError) as e:
        print(f"pyllm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # FileNotFoundError, or a path the user gave: --out is a file, a directory, no permission
        where = f"{e.filename} -> {e.filename2}" if e.filename2 else e.filename
        msg = f"{where}: {e.strerror}" if where and e.strerror else str(e)
        if isinstance(e, FileExistsError):  # mkdir(exist_ok=True) of an --out that is a file
            msg += " and is not a directory"
        print(f"pyllm {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as e:  # a size past the machine (torch: "DefaultCPUAllocator: can't allocate
        # memory: you tried to allocate 274877906944 bytes", "CUDA out of memory") was a traceback from inside torch
        msg = str(e)
        if _lost_a_process(e):  # as was, on the ranks left, another's death (its own output, or torchrun's report,
            # says why): a 30-line traceback from inside torch's collective
            print(f"pyllm {args.command}: error: another process of the run failed or was stopped (the collective "
                  f"with it broke off: {_first_sentence(msg)})", file=sys.stderr)
            return 1
        if not isinstance(e, MemoryError) and "can't allocate memory" not in msg and "out of memory" not in msg:
            raise
        size = re.search(r"allocate (\d+) bytes|allocate ([\d.]+ [KMGTP]iB)", msg)
        what = (f" (tried to allocate {int(size[1]) / 2 ** 30:.3g} GiB)" if size and size[1] else
                f" (tried to allocate {size[2]})" if size else "")
        print(f"pyllm {args.command}: error: out of memory{what}; lower the sizes asked for (--batch-size, ...)",
              file=sys.stderr)
        return 2
    except Terminated:
        print(f"pyllm {args.command}: terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(f"pyllm {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        if prev is not None:
            signal.signal(signal.SIGTERM, prev)
    return int(rc or 0)


def _lost_a_process(e: BaseException) -> bool:
    """A collective that failed because another process of this torchrun'd run is gone: gloo's "Connection closed
    by peer" / "Connection reset by peer" (a plain RuntimeError), torch's DistError family (NCCL, the store)."""
    if not _started_process_group:
        return False
    import torch.distributed as dist
    return isinstance(e, getattr(dist, "DistError", ())) or "gloo/transport/" in str(e)


def _first_sentence(msg: str) -> str:
    """gloo's "[.../pair.cc:553] Connection closed by peer [127.0.0.1]:51595. This is typically caused by ..." ->
    "Connection closed by peer [127.0.0.1]:51595"."""
    line = msg.strip().splitlines()[0] if msg.strip() else msg
    return re.sub(r"^\[[^\]]*\]\s*", "", line).split(". ")[0].rstrip(".")


def _given_flags(sp: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The dests the command line set (not left at their defaults): `--resume` takes the run's saved value for every
    flag left out, and refuses one given with another value. Parsed again with every default suppressed, so an
    abbreviated or `--flag=value` spelling counts as argparse counted it."""
    saved = {a.dest: a.default for a in sp._actions}
    try:
        for a in sp._actions:
            a.default = argparse.SUPPRESS
        ns, _ = sp.parse_known_args(argv)
    finally:
        for a in sp._actions:
            a.default = saved[a.dest]
    return {k for k in vars(ns) if not k.startswith("_")}


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, a batch scheduler, torchrun stopping its workers) raised where the stage is, as a Ctrl-C: the
    same clean-up runs (a checkpoint's or export's temporary files removed). The default action killed the process
    mid-write and left model.bin.tmp or a <run>.tmp-<pid>/ that no later run removes."""


def _on_sigterm(signum, frame):
    raise Terminated


def _catch_sigterm(under_torchrun: bool = False):
    """Install the SIGTERM handler for the stage's run; the handler it replaced, or None where it cannot (not the
    main thread, someone else's handler in place) or should not: under torchrun, whose agent stops the surviving
    ranks with SIGTERM while they wait inside a collective, where a Python handler runs only once the call returns
    (the default action ends them at once). under_torchrun: there too (save_checkpoint: a save holds no
    collective)."""
    import os
    import threading
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) != signal.SIG_DFL or \
            ("TORCHELASTIC_RUN_ID" in os.environ and not under_torchrun):
        return None
    return signal.signal(signal.SIGTERM, _on_sigterm)


def module_main(module: str) -> int:
    """`python -m pyllm.<stage> ...` == `pyllm <stage> ...` (it printed nothing and exited 0 before)."""
    name = next(n for n, (m, _) in COMMANDS.items() if m == module)
    return _program([name, *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
