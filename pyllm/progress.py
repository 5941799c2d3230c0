"""A tiny dependency-free progress bar (tqdm-like): `from pyllm.progress import Progress`; PYLLM_PROGRESS=0: off.

On a terminal it redraws one line (at most 10x/s); otherwise (logs, CI) it prints a plain line every
PYLLM_PROGRESS_INTERVAL seconds (default 10) and once at the end, so long jobs stay visible without flooding logs.
"""
from __future__ import annotations

import os
import sys
import time


def _fmt_time(s: float) -> str:
    if s != s or s == float("inf"):
        return "?"
    s = int(s)
    h, m = divmod(s, 3600)
    m, s = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def _fmt_num(x: float) -> str:
    for unit in ("", "k", "M", "G", "T"):
        if abs(x) < 1000:
            return f"{x:.3g}{unit}"
        x /= 1000
    return f"{x:.3g}P"


def _fmt_val(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


class Progress:
    """Progress(total=None, desc="", unit="it"): .update(n), .set_postfix(dict or **kw), .close(); wraps iterables."""

    def __init__(self, iterable=None, total: int | None = None, desc: str = "", unit: str = "it",
                 disable: bool | None = None, file=None, interval: float | None = None, initial: int = 0):
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.desc, self.unit = total, desc, unit
        self.file = file or sys.stderr
        env = os.environ.get("PYLLM_PROGRESS", "1").strip().lower()
        self.disable = disable if disable is not None else env in ("0", "false", "no", "off")
        self.tty = bool(getattr(self.file, "isatty", lambda: False)())
        self.interval = 0.1 if self.tty else (interval if interval is not None
                                              else float(os.environ.get("PYLLM_PROGRESS_INTERVAL", "10")))
        self.n = self.initial = initial
        self.postfix: dict = {}
        self.start = self.last_print = time.perf_counter()
        self.closed = False
        self._width = 0

    def __iter__(self):
        try:
            for x in self.iterable:
                yield x
                self.update(1)
        finally:
            self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def set_postfix(self, d: dict | None = None, **kw):
        self.postfix.update(d or {}, **kw)

    def update(self, n: int = 1):
        self.n += n
        now = time.perf_counter()
        if not self.disable and now - self.last_print >= self.interval:
            self.last_print = now
            self._print(now)

    def line(self, now: float | None = None) -> str:
        """The status line: desc, count/total (percent), rate, elapsed<ETA, postfix."""
        now = now or time.perf_counter()
        el = now - self.start
        rate = (self.n - self.initial) / el if el > 0 else 0.0
        parts = [self.desc + ":"] if self.desc else []
        if self.total:
            pct = 100.0 * self.n / self.total
            bar_w = 20
            fill = int(bar_w * min(1.0, self.n / self.total))
            eta = (self.total - self.n) / rate if rate > 0 else float("inf")
            parts.append(f"{pct:3.0f}%|{'#' * fill}{'.' * (bar_w - fill)}| {_fmt_num(self.n)}/{_fmt_num(self.total)}"
                         f" [{_fmt_time(el)}<{_fmt_time(eta)}, {_fmt_num(rate)}{self.unit}/s]")
        else:
            parts.append(f"{_fmt_num(self.n)}{self.unit} [{_fmt_time(el)}, {_fmt_num(rate)}{self.unit}/s]")
        if self.postfix:
            parts.append(", ".join(f"{k}={_fmt_val(v)}" for k, v in self.postfix.items()))
        return " ".join(parts)

    def _print(self, now: float | None = None, final: bool = False):
        s = self.line(now)
        if self.tty:
            pad = " " * max(0, self._width - len(s))
            self._width = len(s)
            self.file.write("\r" + s + pad + ("\n" if final else ""))
        else:
            self.file.write(s + "\n")
        self.file.flush()

    def write(self, msg: str):
        """Print a message without garbling the bar (on a terminal the bar is redrawn on the next update)."""
        if self.tty and not self.disable and self._width:
            self.file.write("\r" + " " * self._width + "\r")
            self._width = 0
        print(msg, file=self.file, flush=True)

    def close(self):
        if self.closed:
            return
        self.closed = True
        if not self.disable:
            self._print(final=True)
