"""Count what Triton kernels execute under the interpreter (TRITON_INTERPRET=1), per kernel.

    with interp_count.Counter() as c:
        transformer.flash_attention(q, k, v, backend="triton")
    c.kernels["_attn_fwd"].dot_flops        # 2 * M * N * K summed over every tl.dot the kernel executed

The interpreter runs a kernel's programs one after the other, calling methods of one
``triton.runtime.interpreter.InterpreterBuilder`` for every operation. ``Counter`` wraps, for as long as it
is entered (the originals are put back on exit):

* ``GridExecutor.__call__`` (one kernel launch): which kernel the operations belong to, its grid and its
  constexpr arguments (the tile sizes the launcher or the autotuner chose);
* ``InterpreterBuilder.create_dot``: ``tl.dot(a, b, acc)`` with a [..., M, K] and b [..., K, N] adds
  prod(a.shape) * N multiply-adds, i.e. 2 * M * N * K FLOPs per dot (times the batch of a 3-D dot). The
  whole tile counts, also rows or columns that masks later discard: this is the work the tensor cores do;
* ``create_masked_load`` / ``create_masked_store`` (plain, masked and tensor-descriptor loads and stores all
  end there): the elements whose mask is set times the element size (what a GPU reads from or writes to
  global memory, i.e. L2 or HBM, before any cache reuse); ``create_atomic_rmw`` / ``create_atomic_cas``:
  the same for atomics (read and write counted once each).

A Triton whose interpreter lacks one of these names makes ``Counter()`` raise (naming the Triton version),
so a count is never silently zero.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np


@dataclasses.dataclass
class KernelCount:
    kernel: str
    launches: int = 0
    programs: int = 0
    dots: int = 0
    dot_flops: int = 0            # 2 * M * N * K per tl.dot
    load_bytes: int = 0
    store_bytes: int = 0
    atomic_bytes: int = 0
    constexprs: dict = dataclasses.field(default_factory=dict)   # of the last launch
    dot_shapes: dict = dataclasses.field(default_factory=dict)   # {"MxNxK": dots of that shape}

    @property
    def bytes(self):
        return self.load_bytes + self.store_bytes + self.atomic_bytes

    def shapes(self):
        """"128x128x64 x64, 128x64x128 x64": each dot shape (M x N x K) and how many such dots ran."""
        return ", ".join(f"{s} x{n}" for s, n in self.dot_shapes.items())

    def tiles(self):
        """The launch's tile constexprs (BLOCK_*, HEAD_DIM, M_BLOCKS), e.g. "M128 N64 D64"."""
        short = {"BLOCK_M": "M", "BLOCK_N": "N", "BLOCK_D": "D", "BLOCK_H": "H", "BLOCK_S": "S", "BLOCK_G": "G"}
        return " ".join(f"{short[k]}{v}" for k, v in self.constexprs.items() if k in short)


def _elem_bytes(tl_type):
    bits = getattr(tl_type, "primitive_bitwidth", None)
    return max(1, bits // 8) if bits else 1


def _active(mask, ptrs):
    """Elements of `ptrs` whose mask is set (a mask broadcasts to the pointer block)."""
    m = np.asarray(mask.data)
    if m.shape != np.shape(ptrs.data):
        m = np.broadcast_to(m, np.shape(ptrs.data))
    return int(np.count_nonzero(m))


class Counter:
    """Per-kernel counts of the launches made while entered (module docstring). Not re-entrant."""

    def __init__(self):
        self.kernels: dict[str, KernelCount] = {}
        self._current = None
        self._saved = []

    def reset(self):
        self.kernels = {}

    def _cur(self):
        if self._current is None:
            self._current = self.kernels.setdefault("<outside a launch>", KernelCount("<outside a launch>"))
        return self._current

    def __enter__(self):
        import triton
        from triton.runtime import interpreter as interp
        builder, grid_exec = getattr(interp, "InterpreterBuilder", None), getattr(interp, "GridExecutor", None)
        names = ("create_dot", "create_masked_load", "create_masked_store", "create_atomic_rmw",
                 "create_atomic_cas")
        missing = [n for n in names if builder is None or not hasattr(builder, n)]
        if grid_exec is None or not hasattr(grid_exec, "__call__") or missing:
            raise RuntimeError(f"benchmarks/interp_count.py: the interpreter of Triton {triton.__version__} has no "
                               f"{'GridExecutor' if grid_exec is None else ', '.join(missing)}; update the counter "
                               "for this Triton")
        counter = self

        def patch(owner, name, make):
            original = getattr(owner, name)
            self._saved.append((owner, name, original))
            setattr(owner, name, functools.wraps(original)(make(original)))

        def launch(original):
            def __call__(ex, *args, **kwargs):
                name = getattr(ex.fn, "__name__", "?")
                k = counter.kernels.setdefault(name, KernelCount(name))
                bound = dict(zip(ex.arg_names, args))
                bound.update(kwargs)
                k.constexprs = {n: bound[n] for n in ex.constexprs if n in bound
                                and isinstance(bound[n], (int, bool, float, str))}
                k.launches += 1
                before, counter._current = counter._current, k
                try:
                    return original(ex, *args, **kwargs)
                finally:
                    counter._current = before
            return __call__

        def grid_dim(original):
            def set_grid_dim(b, *dims):
                counter._cur().programs += math.prod(int(d) for d in dims)
                return original(b, *dims)
            return set_grid_dim

        def dot(original):
            def create_dot(b, a, bb, d, *rest, **kw):
                k = counter._cur()
                a_shape, b_shape = np.shape(a.data), np.shape(bb.data)
                batch = int(np.prod(a_shape[:-2])) if len(a_shape) > 2 else 1
                k.dots += 1
                k.dot_flops += 2 * int(np.prod(a_shape)) * int(b_shape[-1])
                key = f"{a_shape[-2]}x{b_shape[-1]}x{a_shape[-1]}"
                k.dot_shapes[key] = k.dot_shapes.get(key, 0) + batch
                return original(b, a, bb, d, *rest, **kw)
            return create_dot

        def load(original):
            def create_masked_load(b, ptrs, mask, *rest, **kw):
                counter._cur().load_bytes += _active(mask, ptrs) * _elem_bytes(ptrs.get_element_ty())
                return original(b, ptrs, mask, *rest, **kw)
            return create_masked_load

        def store(original):
            def create_masked_store(b, ptrs, value, mask, *rest, **kw):
                counter._cur().store_bytes += _active(mask, ptrs) * _elem_bytes(ptrs.get_element_ty())
                return original(b, ptrs, value, mask, *rest, **kw)
            return create_masked_store

        def rmw(original):
            def create_atomic_rmw(b, op, ptr, val, mask, *rest, **kw):
                counter._cur().atomic_bytes += 2 * _active(mask, ptr) * _elem_bytes(ptr.get_element_ty())
                return original(b, op, ptr, val, mask, *rest, **kw)
            return create_atomic_rmw

        def cas(original):
            def create_atomic_cas(b, ptr, cmp, val, *rest, **kw):
                counter._cur().atomic_bytes += 2 * int(np.size(ptr.data)) * _elem_bytes(ptr.get_element_ty())
                return original(b, ptr, cmp, val, *rest, **kw)
            return create_atomic_cas

        try:
            patch(grid_exec, "__call__", launch)
            patch(builder, "set_grid_dim", grid_dim)
            patch(builder, "create_dot", dot)
            patch(builder, "create_masked_load", load)
            patch(builder, "create_masked_store", store)
            patch(builder, "create_atomic_rmw", rmw)
            patch(builder, "create_atomic_cas", cas)
        except Exception:
            self._restore()
            raise
        return self

    def _restore(self):
        while self._saved:
            owner, name, original = self._saved.pop()
            setattr(owner, name, original)

    def __exit__(self, *exc):
        self._restore()
        self._current = None
        return False

    def total(self):
        """A KernelCount summed over every kernel."""
        t = KernelCount("total")
        for k in self.kernels.values():
            for f in ("launches", "programs", "dots", "dot_flops", "load_bytes", "store_bytes", "atomic_bytes"):
                setattr(t, f, getattr(t, f) + getattr(k, f))
        return t
