"""Helpers shared by the examples: a progress bar and a count of which backend ran each op."""
from __future__ import annotations

import collections
import sys
import time

from transformer import backends


class BackendCounter:
    """Counts (op, backend) for every call the dispatcher serves (transformer.backends.record_dispatches).

    Used as a context manager; the count is printed by report()."""

    def __init__(self):
        self.counts = collections.Counter()
        self._ctx = None

    def __enter__(self):
        self._ctx = backends.record_dispatches()
        self.counts = self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)

    def report(self, title="backend that ran each op", counts=None):
        counts = self.counts if counts is None else counts
        lines = [f"{title}:"]
        for (op, be), n in sorted(counts.items()):
            lines.append(f"  {op:<24} {be:<10} {n:>7} calls")
        if not counts:
            lines.append("  (no dispatched calls)")
        return "\n".join(lines)


class Progress:
    """A one-line progress bar: step, loss, tokens/s, elapsed time."""

    def __init__(self, total, width=28):
        self.total, self.width, self.t0 = total, width, time.time()

    def update(self, step, loss, tokens, extra=""):
        el = time.time() - self.t0
        frac = step / self.total
        bar = "#" * int(frac * self.width) + "." * (self.width - int(frac * self.width))
        sys.stdout.write(f"\r[{bar}] {step}/{self.total} loss {loss:.4f} {tokens / max(el, 1e-9):,.0f} tok/s "
                         f"{el:.0f}s {extra}   ")
        sys.stdout.flush()

    def close(self):
        sys.stdout.write("\n")
        sys.stdout.flush()
