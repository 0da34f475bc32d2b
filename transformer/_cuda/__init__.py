"""Python side of the CUDA C++ ops: which extension serves a device, fakes and autograd.

The C++ ops live in two torch library namespaces built from the same sources (csrc/):
``torch.ops.tileformer`` (transformer._C, CUDA tensors) and ``torch.ops.tileformer_emu``
(transformer._C_emu, the kernels compiled for the CPU against the host emulation; CPU tensors, used
when TILEFORMER_EMULATE_CUDA=1). ``ops(device)`` returns the namespace serving ``device`` after
registering, once per namespace, the fake (shape) implementations and autograd formulas of every op
module here (``norms``; attention and decode add theirs the same way: a module with
``register(ns: str)`` listed in ``_OP_MODULES``).

Nothing is imported or registered at import time of this package.
"""
from __future__ import annotations

import importlib

import torch

from .. import backends

__all__ = ["ops", "namespace_name"]

_OP_MODULES = ("selftest", "norms", "decode", "attention")
_registered: set = set()
_missing: dict = {}      # (namespace, module) -> why its ops could not be registered (extension out of date)


def namespace_name(device: torch.device) -> str:
    return "tileformer_emu" if device.type == "cpu" else "tileformer"


def ops(device: torch.device):
    """torch.ops.tileformer (CUDA tensors) or torch.ops.tileformer_emu (CPU tensors, emulated), with the
    fakes and autograd of every op registered."""
    ns_ops = backends.cuda_ops(device)
    ns = namespace_name(device)
    if ns not in _registered:
        mod = "transformer._C_emu" if ns == "tileformer_emu" else "transformer._C"
        try:
            importlib.import_module(mod)
        except Exception as e:  # not built, or built against another torch
            raise RuntimeError(f"the {ns} ops are unavailable: {mod} could not be imported "
                               f"({type(e).__name__}: {e})") from e
        for name in _OP_MODULES:
            try:
                importlib.import_module(f"{__name__}.{name}").register(ns)
            except RuntimeError as e:  # the extension was built before this op existed: calling it fails later
                if "does not exist" not in str(e):
                    raise
                _missing[(ns, name)] = str(e)
        _registered.add(ns)
    return ns_ops
