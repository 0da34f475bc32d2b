"""Testing utilities shared by the test suite and the benchmarks' correctness table.

``assert_close`` is the one implementation of flash-attn's tolerance rule: the kernel's max error against
the fp32 (or fp64) reference may be at most ``factor`` x the max error of PyTorch computing the same thing in
the same low precision, plus a small atol (factor 2 for outputs, 3 for gradients), with NaN and infinities
matching the reference exactly.
"""
from __future__ import annotations

import torch

__all__ = ["assert_close"]


def _fmt_idx(idx, shape):
    out = []
    for s in reversed(shape):
        out.append(idx % s)
        idx //= s
    return tuple(reversed(out))


def assert_close(out, ref, ref_lowp, *, factor=2.0, atol=1e-5, name="out", config=""):
    """max|out - ref| <= factor * max|ref_lowp - ref| + atol, with -inf/NaN positions matching exactly.

    out: the kernel's result; ref: the fp32 (or fp64) reference; ref_lowp: PyTorch in out's precision.
    """
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)} [{config}]"
    o, r, rl = out.detach().double(), ref.detach().double(), ref_lowp.detach().double()
    nan_out = torch.isnan(o) & ~torch.isnan(r)
    if nan_out.any():
        i = int(nan_out.flatten().nonzero()[0])
        raise AssertionError(f"{name}: {int(nan_out.sum())} NaN where the reference is finite, first at "
                             f"{_fmt_idx(i, out.shape)} of {tuple(out.shape)} (unwritten/poisoned?) [{config}]")
    inf_r, inf_o = torch.isinf(r), torch.isinf(o)
    if not torch.equal(inf_r, inf_o) or not torch.equal(torch.sign(r[inf_r]), torch.sign(o[inf_o])):
        bad = (inf_r != inf_o).flatten().nonzero()
        where = _fmt_idx(int(bad[0]), out.shape) if len(bad) else "(sign)"
        raise AssertionError(f"{name}: infinities differ from the reference, first at {where} [{config}]")
    fin = torch.isfinite(r)
    err = (o - r).abs().masked_fill(~fin, 0)
    base = (rl - r).abs().masked_fill(~fin | torch.isnan(rl), 0)
    max_err = float(err.max()) if err.numel() else 0.0
    bound = factor * (float(base.max()) if base.numel() else 0.0) + atol
    if not max_err <= bound:
        i = int(err.flatten().argmax())
        at = _fmt_idx(i, out.shape)
        raise AssertionError(
            f"{name}: max error {max_err:.3e} at {at} exceeds {factor} x {float(base.max()):.3e} (PyTorch in "
            f"{out.dtype}) + {atol:g} = {bound:.3e}; out={float(o.flatten()[i]):.6g} ref={float(r.flatten()[i]):.6g}; "
            f"shape {tuple(out.shape)} [{config}]")
    return max_err, bound
