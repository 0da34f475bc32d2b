"""Host-side helpers shared by the Triton launchers (importable without triton): flags, constants,
output allocation (NaN-poisoned under test), the SM count and the static report's config record."""
from __future__ import annotations

import dataclasses
import functools
import os

import torch

LOG2E = 1.4426950408889634          # log2(e): scores are scaled by it so kernels use exp2
LN2 = 0.6931471805599453            # ln(2): log2-domain log-sum-exps times LN2 are natural logs
HALF_DTYPES = (torch.float16, torch.bfloat16)


def _env_flag(name) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def interpreting() -> bool:
    """True when TRITON_INTERPRET=1: kernels run on CPU tensors through Triton's interpreter."""
    return _env_flag("TRITON_INTERPRET")


def poisoning() -> bool:
    """True when TILEFORMER_POISON=1: outputs are allocated filled with NaN, so unwritten elements show up."""
    return os.environ.get("TILEFORMER_POISON", "0") == "1"


def empty(shape, dtype, device):
    """torch.empty, but filled with NaN when TILEFORMER_POISON=1 (tests), so unwritten outputs show up."""
    t = torch.empty(shape, dtype=dtype, device=device)
    if poisoning() and t.is_floating_point():
        t.fill_(float("nan"))
    return t


def empty_like(t, dtype=None):
    return empty(t.shape, dtype or t.dtype, t.device)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index):
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device, *, cpu=132) -> int:
    """SM count of a CUDA device (queried on first use, cached); `cpu` for CPU tensors (the interpreter)."""
    if device.type != "cuda":
        return cpu
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@dataclasses.dataclass(frozen=True)
class AotConfig:
    """One shipped kernel configuration, compiled ahead of time by the static report (no GPU needed).

    signature: {arg name: triton type string ("*fp16", "*bf16", "*fp32", "i32", "i64", "fp32") or
    "constexpr"}; constexprs: {name: value} for every constexpr argument. expect: instruction markers
    the compiled code must contain, per arch, e.g. {90: ("wgmma",), 80: ("mma.sync",)}.
    divisible: names of the arguments the launcher guarantees divisible by 16 (16-byte aligned pointers,
    strides and sizes that are multiples of 16) -- the specialisation Triton applies at launch for such
    values; without it the AOT compile sees scalar, unpipelined loads the GPU never runs.
    options: further compile options the launcher passes, e.g. {"enable_fp_fusion": False}.
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
    options: dict = dataclasses.field(default_factory=dict)

    def attrs(self):
        """Triton's ASTSource attrs for `divisible`."""
        return {(i,): [["tt.divisibility", 16]] for i, name in enumerate(self.signature) if name in self.divisible}


def divisible_args(signature, include=(), exclude=()):
    """Pointers and stride_* arguments of `signature` (plus `include`, minus `exclude`): the usual
    launch-time divisibility of torch allocations with 16-byte-multiple strides."""
    return tuple(n for n, ty in signature.items()
                 if (ty.startswith("*") or n.startswith("stride_") or n in include) and n not in exclude)
