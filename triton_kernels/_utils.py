"""Helpers shared by the Triton launchers: output allocation (NaN-poisoned under test), interpreter flag."""
from __future__ import annotations

import dataclasses
import os

import torch


def interpreting() -> bool:
    """True when TRITON_INTERPRET=1: kernels run on CPU tensors (bf16 needs an in-kernel upcast there)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def poisoning() -> bool:
    return os.environ.get("TILEFORMER_POISON", "0") == "1"


def empty(shape, dtype, device):
    """torch.empty, but filled with NaN when TILEFORMER_POISON=1 (tests), so unwritten outputs show up."""
    t = torch.empty(shape, dtype=dtype, device=device)
    if poisoning() and t.is_floating_point():
        t.fill_(float("nan"))
    return t


def empty_like(t, dtype=None):
    return empty(t.shape, dtype or t.dtype, t.device)


@dataclasses.dataclass(frozen=True)
class AotConfig:
    """One shipped kernel configuration, compiled ahead of time by the static report (no GPU needed).

    signature: {arg name: triton type string ("*fp16", "*bf16", "*fp32", "i32", "i64", "fp32") or
    "constexpr"}; constexprs: {name: value} for every constexpr argument. expect: instruction markers
    the compiled code must contain, per arch, e.g. {90: ("wgmma",), 80: ("mma.sync",)}.
    divisible: names of the arguments the launcher guarantees divisible by 16 (16-byte aligned pointers,
    strides and sizes that are multiples of 16) -- the specialisation Triton applies at launch for such
    values; without it the AOT compile sees scalar, unpipelined loads the GPU never runs.
    """
    name: str
    kernel: object
    signature: dict
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 3
    archs: tuple = (80, 90)
    expect: dict = dataclasses.field(default_factory=dict)
    divisible: tuple = ()

    def attrs(self):
        """Triton's ASTSource attrs for `divisible`."""
        return {(i,): [["tt.divisibility", 16]] for i, name in enumerate(self.signature) if name in self.divisible}


def divisible_args(signature, include=(), exclude=()):
    """Pointers and stride_* arguments of `signature` (plus `include`, minus `exclude`): the usual
    launch-time divisibility of torch allocations with 16-byte-multiple strides."""
    return tuple(n for n, ty in signature.items()
                 if (ty.startswith("*") or n.startswith("stride_") or n in include) and n not in exclude)
