"""Counting the tensor-core work of Triton kernels under the interpreter (TRITON_INTERPRET=1).

``count_dots()`` wraps the interpreter's implementation of ``tl.dot`` (``InterpreterBuilder.create_dot``,
Triton 3.6 and 3.8) for the duration of a ``with`` block: every dot a kernel executes adds its
multiply-adds, M x N x K (times the batch of a 3-d dot), to the counter it yields. Masked-out rows and
columns of a tile count too: that is the work a GPU does for the tile. ``flops`` is 2 x the multiply-adds,
the convention of the attention FLOP formulas (forward 4 * B * H * Nq * Nk * D).

    with count_dots() as dots:
        out = kernel_launcher(...)
    dots.flops, dots.by_shape   # {(M, N, K): calls}

Only dots executed by the interpreter are seen (a compiled kernel on a GPU is not counted); outside
TRITON_INTERPRET=1, entering the block raises.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses

from ._utils import interpreting

__all__ = ["DotCount", "count_dots"]


@dataclasses.dataclass
class DotCount:
    macs: int = 0                                   # multiply-adds of every executed dot
    calls: int = 0
    by_shape: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    @property
    def flops(self) -> int:
        return 2 * self.macs

    def add(self, a_shape, b_shape):
        *batch, m, k = a_shape
        n = b_shape[-1]
        reps = 1
        for x in batch:
            reps *= x
        self.macs += reps * m * n * k
        self.calls += 1
        self.by_shape[(m, n, k)] += reps


@contextlib.contextmanager
def count_dots():
    """Count the multiply-adds of every tl.dot the interpreter executes inside the block (see module doc)."""
    if not interpreting():
        raise RuntimeError("count_dots() counts dots run by Triton's interpreter: set TRITON_INTERPRET=1 "
                           "before importing triton")
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    original = builder.__dict__["create_dot"]
    counter = DotCount()

    def create_dot(self, a, b, *args, **kwargs):
        counter.add(a.data.shape, b.data.shape)
        return original(self, a, b, *args, **kwargs)

    builder.create_dot = create_dot
    try:
        yield counter
    finally:
        builder.create_dot = original
