"""Backend dispatch: the one place that knows there is more than one implementation of an op.

Backends, fastest first by default:

* ``"cuda"``      -- hand-written CUDA C++ kernels (``transformer._C``, ops ``torch.ops.tileformer.*``).
                     With ``TILEFORMER_EMULATE_CUDA=1`` the same kernels compiled for the CPU
                     (``transformer._C_emu``) serve CPU tensors -- slowly; for testing.
* ``"triton"``    -- Triton kernels (``triton_kernels``). With ``TRITON_INTERPRET=1`` they run on CPU
                     tensors through Triton's interpreter -- slowly; for testing.
* ``"torch"``     -- PyTorch built-ins (``F.scaled_dot_product_attention``, ``F.layer_norm``...): the fast
                     fallback on any device.
* ``"reference"`` -- ``transformer.reference``: plain fp32 PyTorch, the ground truth.

Each public op registers (1) a ``describe`` function that validates a call and summarises it as a
dict of the facts backends care about (device, dtype, head dim, features) and (2) for each backend,
an implementation (``"module:function"``, imported lazily on first use) with a ``supports(call)``
predicate that returns ``None`` or the reason it cannot serve the call.

``backend="auto"`` (or the ``TILEFORMER_BACKEND`` environment variable) picks the first backend of the
op's order that is usable on this machine and supports the call. Auto never picks the interpreted or
emulated CPU paths: ask for them by name. An explicit backend that cannot serve a call raises
``ValueError`` saying why. Nothing here touches a GPU, Triton or the compiled extension at import time.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import importlib
import os
from typing import Callable, Optional

import torch

BACKENDS = ("cuda", "triton", "torch", "reference")

__all__ = ["BACKENDS", "available", "explain", "select", "dispatch", "record_dispatches", "register_op",
           "interpreting", "emulating_cuda"]


# ---------------------------------------------------------------------------------------------
# What this machine can run
# ---------------------------------------------------------------------------------------------

def _constant_under_compile(fn):
    """torch.compiler.assume_constant_result without importing torch._dynamo (which imports triton).

    Dynamo runs such a function eagerly while tracing and bakes in its (constant) result, so the lazy
    imports below may happen inside a compiled region without a graph break."""
    fn._dynamo_marked_constant = True
    return fn


def _env_flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def interpreting() -> bool:
    """True when Triton kernels run through the interpreter on CPU tensors (TRITON_INTERPRET=1)."""
    return _env_flag("TRITON_INTERPRET")


def emulating_cuda() -> bool:
    """True when the CUDA backend serves CPU tensors through the host-emulated build (TILEFORMER_EMULATE_CUDA=1)."""
    return _env_flag("TILEFORMER_EMULATE_CUDA")


_import_errors: dict = {}


@_constant_under_compile
def _import_error(name: str) -> str:
    """Import a module once; "" if it worked, else why not. Runs eagerly under torch.compile tracing."""
    if name not in _import_errors:
        try:
            importlib.import_module(name)
            _import_errors[name] = ""
        except Exception as e:  # ImportError, or an extension built against another torch
            _import_errors[name] = f"{name} could not be imported ({type(e).__name__}: {e})"
    return _import_errors[name]


def _try_import(name):
    """None if `name` imports, else the reason."""
    return _import_error(name) or None


def _cuda_gpu_reason():
    if not torch.cuda.is_available():
        return "no CUDA GPU visible to torch" + ("" if torch.version.cuda else " (torch is a CPU-only build)")
    return None


def _backend_reason(backend: str, device: Optional[torch.device] = None) -> Optional[str]:
    """Why `backend` cannot run on `device` on this machine (None if it can). device=None: any device."""
    if backend in ("torch", "reference"):
        return None
    on_cpu = device is not None and device.type == "cpu"
    if device is not None and device.type not in ("cpu", "cuda"):
        return f"{backend} runs on CUDA tensors only, got device {device}"
    if backend == "triton":
        err = _try_import("triton")
        if err:
            return err
        if device is None:
            return None if (interpreting() or not _cuda_gpu_reason()) else (
                _cuda_gpu_reason() + "; set TRITON_INTERPRET=1 to run Triton kernels on CPU tensors")
        if on_cpu and not interpreting():
            return "triton needs CUDA tensors (set TRITON_INTERPRET=1 to run on CPU tensors through the interpreter)"
        if not on_cpu and interpreting():
            return "TRITON_INTERPRET=1 is set: the triton backend only runs CPU tensors"
        return None
    if backend == "cuda":
        def _why_not(name):   # the import error, plus why setup.py skipped `name` if the build recorded that
            err = _try_import(name)
            if err and not _try_import("transformer._build_info"):
                from transformer._build_info import SKIPPED
                err = f"{err}; not built: {SKIPPED[name]}" if name in SKIPPED else err
            return err
        if device is None:
            if emulating_cuda():
                return _why_not("transformer._C_emu")
            return _cuda_gpu_reason() or _why_not("transformer._C")
        if on_cpu:
            if not emulating_cuda():
                return ("cuda needs CUDA tensors (set TILEFORMER_EMULATE_CUDA=1 to run the kernels on CPU "
                        "tensors through the host emulation)")
            return _why_not("transformer._C_emu")
        return _why_not("transformer._C")
    raise ValueError(f"backend must be one of {BACKENDS} or 'auto', got {backend!r}")


def available() -> dict:
    """{backend: "available" or the reason it is not} for this machine."""
    return {b: (_backend_reason(b) or "available") for b in BACKENDS}


def cuda_ops(device: torch.device):
    """The op namespace serving `device` for the cuda backend: torch.ops.tileformer or tileformer_emu."""
    if device.type == "cpu":
        _try_import("transformer._C_emu")
        return torch.ops.tileformer_emu
    _try_import("transformer._C")
    return torch.ops.tileformer


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

# Each op's backends, in auto's order, and for each backend its implementation and its `supports(call)`
# predicate ("module:function", imported on first use; None: serves every call the describe accepts). The
# implementations take the op's canonical signature (documented at the top of transformer/<op>.py).
_KERNEL_ORDER = ("triton", "cuda", "torch", "reference")
_DECODE_ORDER = ("cuda", "triton", "torch", "reference")


@dataclasses.dataclass
class _Target:
    """A function named "module:function", imported on first use into `slot`."""
    name: str
    slot: list = dataclasses.field(default_factory=lambda: [None])

    def load(self):
        # Import first, then read the slot: under torch.compile, dynamo must not look into the slot before the
        # (eagerly run) import has filled it.
        _load_target(self.name)
        return self.slot[0]


_TARGETS: dict = {}      # name -> _Target, one per function, shared by the ops that name it


def _target(name):
    return None if name is None else _TARGETS.setdefault(name, _Target(name))


def _impls(module_of, function, supports_of):
    return {b: (_target(f"{module_of[b]}:{function}"), _target(supports_of.get(b))) for b in module_of}


_ATTN = {"reference": "transformer._impl_reference", "torch": "transformer._impl_torch",
         "triton": "transformer._triton.attention", "cuda": "transformer._cuda.attention"}
_ATTN_SUPPORTS = {"torch": "transformer._impl_torch:attention_supports",
                  "triton": "transformer._triton.attention:supports", "cuda": "transformer._cuda.attention:supports"}
_NORMS = {"reference": "transformer._impl_reference", "torch": "transformer._impl_torch",
          "triton": "transformer._triton.norms", "cuda": "transformer._cuda.norms"}
_NORM_SUPPORTS = {"triton": "transformer._triton.norms:supports", "cuda": "transformer._cuda.norms:supports"}
_DECODE = {"reference": "transformer._impl_reference", "torch": "transformer._impl_torch",
           "triton": "transformer._triton.decode", "cuda": "transformer._cuda.decode"}
_DECODE_SUPPORTS = {"torch": "transformer._impl_torch:decode_supports",
                    "triton": "transformer._triton.decode:supports", "cuda": "transformer._cuda.decode:supports"}

_TABLE = {
    "flash_attention": (_KERNEL_ORDER, _impls(_ATTN, "flash_attention", _ATTN_SUPPORTS)),
    "flash_attention_varlen": (_KERNEL_ORDER, _impls(_ATTN, "flash_attention_varlen", _ATTN_SUPPORTS)),
    "padded_attention": (_KERNEL_ORDER, _impls(_ATTN, "padded_attention", _ATTN_SUPPORTS)),
    "layer_norm": (_KERNEL_ORDER, _impls(_NORMS, "layer_norm", _NORM_SUPPORTS)),
    "rms_norm": (_KERNEL_ORDER, _impls(_NORMS, "rms_norm", _NORM_SUPPORTS)),
    "decode_attention": (_DECODE_ORDER, _impls(_DECODE, "decode_attention", _DECODE_SUPPORTS)),
}

# Optional details for explain(): per op and backend, "module:function"(call) -> str or None, e.g. which of the
# backend's kernels serves the call. Imported on first use, like the implementations.
_ATTN_DETAILS = {"triton": _target("transformer._triton.attention:describe_path"),
                 "cuda": _target("transformer._cuda.attention:describe_path")}
_DETAILS = {"flash_attention": _ATTN_DETAILS, "flash_attention_varlen": _ATTN_DETAILS,
            "padded_attention": _ATTN_DETAILS}


@_constant_under_compile
def _load_target(name: str) -> bool:
    """Import the function named "module:function" into its slot (once).

    Marked constant for torch.compile, so dynamo runs it eagerly while tracing a caller and an op's
    first call may happen inside a compiled region (fullgraph=True) without a graph break."""
    slot = _TARGETS[name].slot
    if slot[0] is None:
        mod, fn = name.split(":")
        slot[0] = getattr(importlib.import_module(mod), fn)
    return True


@dataclasses.dataclass
class _Op:
    describe: Callable[..., dict]
    order: tuple
    impls: dict          # backend -> (_Target of the implementation, _Target of its supports or None)


_OPS: dict = {}


def register_op(op: str, describe: Callable[..., dict]):
    """Declare a public op (a key of the backend table). describe(*args, **kwargs) validates a call and
    returns its summary dict, which must contain at least "device" (torch.device)."""
    order, impls = _TABLE[op]
    _OPS[op] = _Op(describe=describe, order=order, impls=impls)


def _reject_reason(op: _Op, backend: str, call: dict, auto: bool) -> Optional[str]:
    impl = op.impls.get(backend)
    if impl is None:
        return f"{backend} has no implementation of this op"
    device = call["device"]
    reason = _backend_reason(backend, device)
    if reason:
        return reason
    if auto and device.type == "cpu" and backend in ("triton", "cuda"):
        return f"{backend} on CPU tensors is a testing path (interpreter/emulator); auto does not pick it"
    return impl[1].load()(call) if impl[1] is not None else None


def _requested(backend: str) -> tuple:
    if backend is None:
        backend = "auto"
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    if backend == "auto":
        env = os.environ.get("TILEFORMER_BACKEND", "auto")
        if env != "auto":
            if env not in BACKENDS:
                raise ValueError(f"TILEFORMER_BACKEND must be one of {BACKENDS} or 'auto', got {env!r}")
            return env, False
        return None, True
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or 'auto', got {backend!r}")
    return backend, False


def select(op_name: str, call: dict, backend: str = "auto") -> tuple:
    """(backend name, implementation) for a described call; raises ValueError if none can serve it."""
    op = _OPS[op_name]
    name, auto = _requested(backend)
    if not auto:
        reason = _reject_reason(op, name, call, auto=False)
        if reason:
            raise ValueError(f"backend={name!r} cannot run {op_name} for this call: {reason}")
        return name, op.impls[name][0].load()
    reasons = []
    for b in op.order:
        reason = _reject_reason(op, b, call, auto=True)
        if reason is None:
            return b, op.impls[b][0].load()
        reasons.append(f"{b}: {reason}")
    raise ValueError(f"no backend can run {op_name} for this call: " + "; ".join(reasons))


_recorders: list = []


@contextlib.contextmanager
def record_dispatches():
    """Count which backend served each public op call inside the block::

        with transformer.backends.record_dispatches() as counts:
            model(x)
        counts  # Counter({("flash_attention", "cuda"): 12, ("rms_norm", "cuda"): 25, ...})

    A ``collections.Counter`` of (op, backend) -> calls. It counts Python-level dispatches: under
    ``torch.compile`` the calls that were traced (a compiled graph replays without dispatching again).
    Blocks may nest; each counts every call made while it is open."""
    counts = collections.Counter()
    _recorders.append(counts)
    try:
        yield counts
    finally:   # by identity: two Counters with equal counts compare equal, so list.remove could drop the other
        _recorders[:] = [c for c in _recorders if c is not counts]


def dispatch(op_name: str, call: dict, backend: str, *args, **kwargs):
    """Select a backend for `call` and run it on args/kwargs (the op's canonical signature)."""
    name, fn = select(op_name, call, backend)
    for counts in _recorders:
        counts[(op_name, name)] += 1
    return fn(*args, **kwargs)


def explain(op_name: str, *args, backend: str = "auto", **kwargs) -> str:
    """Which backend would run `op_name(*args, **kwargs)` and why each other one was rejected."""
    if op_name not in _OPS:
        _load_public_ops()
    if op_name not in _OPS:
        raise ValueError(f"op_name must be one of {sorted(_OPS)}, got {op_name!r}")
    op = _OPS[op_name]
    call = op.describe(*args, **kwargs)
    name, auto = _requested(backend)
    lines, chosen = [], None
    for b in (op.order if auto else (name,)):
        reason = _reject_reason(op, b, call, auto=auto)
        if reason is None and chosen is None:
            chosen = b
            lines.append(f"  {b}: selected{_detail(op_name, b, call)}")
        elif reason is None:
            lines.append(f"  {b}: would also work (lower priority){_detail(op_name, b, call)}")
        else:
            lines.append(f"  {b}: rejected -- {reason}")
    head = f"{op_name} -> {chosen}" if chosen else f"{op_name} -> no backend can serve this call"
    facts = ", ".join(f"{k}={v}" for k, v in call.items())
    return "\n".join([head, f"  call: {facts}"] + lines)


def _detail(op_name, backend, call):
    """The backend's explain detail for the op (_DETAILS) as " (detail)"; an empty string if it has none."""
    target = _DETAILS.get(op_name, {}).get(backend)
    text = target.load()(call) if target is not None else None
    return f" ({text})" if text else ""


def _load_public_ops():
    importlib.import_module("transformer")
