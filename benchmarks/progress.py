"""Progress bars with an estimate of the time left (tqdm), on stderr; the tables stay on stdout.

    with progress.bar(total=len(jobs), desc="timing", unit="case") as bar:
        for job in jobs:
            bar.set_postfix_str(str(job))
            progress.write(result_line(job))     # a table line: printed above the bar
            bar.update()

On a terminal the bar redraws in place. When stderr is not a terminal (``make bench > log 2>&1``) each
redraw is one line, at most one every ``NOT_A_TTY_INTERVAL_S`` seconds, plus the first and the last.

A section that benchmarks.run starts as a subprocess (correctness, kernel report) gets
``TILEFORMER_PROGRESS=parent``: its ``bar`` then writes its state as ``MARKER`` lines on stdout, and the
parent, which reads that stdout anyway, draws the bar (``Mirror``), so bar and table lines never interleave.
Without tqdm installed there is no bar (the tables are unchanged).
"""
from __future__ import annotations

import json
import os
import sys

try:
    from tqdm import tqdm
except ImportError:       # a machine with torch + triton but no tqdm: tables without a bar
    tqdm = None
else:
    class _Bar(tqdm):
        """tqdm whose new postfix (the item now running) is drawn at once on a terminal only: elsewhere
        each redraw is a line, and the interval between them applies."""

        def set_postfix_str(self, s="", refresh=True):
            super().set_postfix_str(s, refresh=refresh and getattr(self, "on_tty", False))

ENV = "TILEFORMER_PROGRESS"
MARKER = "@@tileformer-progress "
NOT_A_TTY_INTERVAL_S = 20.0
TTY_INTERVAL_S = 0.5


def _is_tty(stream):
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _columns(stream):
    try:
        size = os.get_terminal_size(stream.fileno())
        return size.columns if size.lines > 0 else 0
    except (AttributeError, OSError, ValueError):
        return 0


class _Lines:
    """A stream for tqdm that writes each redraw as one line (tqdm starts a redraw with a carriage return)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, s):
        s = s.replace("\r", "").strip()
        if s:
            self.stream.write(s + "\n")

    def flush(self):
        self.stream.flush()


class _Reporter:
    """The bar of a subprocess whose parent draws it: the state as one MARKER line on stdout per change."""

    def __init__(self, total, desc, unit):
        self.total, self.desc, self.unit, self.n, self.postfix = total, desc, unit, 0, ""
        self._emit()

    def _emit(self, closed=False):
        state = dict(desc=self.desc, total=self.total, unit=self.unit, n=self.n, postfix=self.postfix, closed=closed)
        sys.stdout.write(MARKER + json.dumps(state) + "\n")
        sys.stdout.flush()

    def update(self, n=1):
        self.n += n
        self._emit()

    def set_postfix_str(self, s="", refresh=True):
        self.postfix = s
        self._emit()

    def close(self):
        self._emit(closed=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _NoBar(_Reporter):
    def _emit(self, closed=False):
        pass


def bar(total, desc, unit="it", *, stream=None):
    """A progress bar for `total` items on `stream` (default sys.stderr); see the module docstring."""
    if os.environ.get(ENV) == "parent":
        return _Reporter(total, desc, unit)
    if tqdm is None or not total:
        return _NoBar(total, desc, unit)
    stream = stream if stream is not None else sys.stderr
    tty = _is_tty(stream)
    interval = TTY_INTERVAL_S if tty else NOT_A_TTY_INTERVAL_S
    sized = tty and _columns(stream) > 0      # a terminal that reports no size gets a fixed width
    b = _Bar(total=total, desc=desc, unit=unit, file=stream if tty else _Lines(stream), dynamic_ncols=sized,
             ncols=None if sized or not tty else 100, nrows=None if sized or not tty else 24,
             mininterval=interval, maxinterval=max(10.0, interval), leave=True)
    b.on_tty = tty
    return b


def write(line, file=None):
    """Print a line of a table (stdout by default) without breaking a bar being drawn on the terminal."""
    file = file if file is not None else sys.stdout
    if tqdm is None:
        file.write(line + "\n")
    else:
        tqdm.write(line, file=file)
    file.flush()


def parse(line):
    """The state in a MARKER line of a subprocess (a dict), or None for any other line."""
    if not line.startswith(MARKER):
        return None
    try:
        return json.loads(line[len(MARKER):])
    except ValueError:
        return None


class Mirror:
    """Draws, in the parent, the bars a subprocess reports with MARKER lines (one bar per `desc`)."""

    def __init__(self):
        self.bar, self.desc = None, None

    def apply(self, state):
        if state["desc"] != self.desc:
            self.close()
            self.bar, self.desc = bar(state["total"], state["desc"], state.get("unit", "it")), state["desc"]
        if state.get("postfix"):
            self.bar.set_postfix_str(state["postfix"], refresh=False)
        if state["n"] != self.bar.n:
            self.bar.update(state["n"] - self.bar.n)
        if state.get("closed"):
            self.close()

    def close(self):
        if self.bar is not None:
            self.bar.close()
        self.bar, self.desc = None, None
