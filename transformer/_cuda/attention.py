"""CUDA flash attention (csrc/attention/): the build's head dims, head-dim padding and the entry functions.

Ops (both namespaces, see transformer/_cuda/__init__.py); their fakes and autograd are those of the op
contract shared with the Triton backend (transformer/ops/attention.py):

    attn_fwd(q, k, v, alibi_slopes, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
             window_left, window_right, softcap, bottom_right, deterministic=False, dropout_p=0.,
             rng_state=None) -> (out, lse)
    attn_bwd(dout, q, k, v, out, lse, dlse, alibi_slopes, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
             max_seqlen_k, softmax_scale, window_left, window_right, softcap, bottom_right,
             deterministic=False, dropout_p=0., rng_state=None) -> (dq, dk, dv)
    attn_head_dims() -> list[int]      # head dims compiled into this build (TILEFORMER_CUDA_HEADDIMS)

window_* = -1 means unbounded (causal is window_right = 0); lse is fp32 [B, Hq, Nq] (varlen [Hq, Tq]), natural
log. The kernels take head dims that are multiples of 8 up to a compiled one and round the tile up to it;
other head dims are zero-padded here (F.pad, differentiable), which changes neither scores nor outputs.
Both ops end in ``deterministic=False`` (the contract's deterministic_arg): False (the default) runs the
backward that adds dQ with fp32 atomics inside the dK/dV kernel (5 matrix products per tile pair), True the
bit-reproducible two-kernel backward (7); calls with at most 16 keys per sequence run the first, which is
bit-reproducible there (one atomic add per dQ element; csrc/attention/bwd.cuh); attn_fwd only carries it to the
backward. Both then end in
``dropout_p=0., rng_state=None`` (the contract's dropout_arg): attention dropout with the counter-based mask of
rng_state (int64 [2] seed, offset on q's device; transformer/reference.py, ``dropout_keep``), read by the
kernels from device memory and regenerated in the backward (the same mask as the Triton kernels').

Forward kernels: the sm_80 one (mma.sync, any compute capability >= 8.0) and the sm_90a one (wgmma + TMA +
mbarrier, csrc/attention/fwd_sm90.cuh: dense and varlen inputs, padded head dims 64, 128, 256).
``TILEFORMER_CUDA_ATTN_FWD`` picks, read at every call: ``auto`` (default) runs sm90 on a compute capability 9.0 GPU for the calls it serves once
the sm_90a self-tests (wgmma fragment layouts, descriptors, swizzle, TMA; csrc/selftest/hopper) have passed on
that GPU -- they run once, at the first such call; a failure keeps sm80 with a one-time warning --, sm80
elsewhere and always in the emulator; ``sm90`` forces it wherever it serves the call (the emulator included),
``sm80`` forces the sm_80 kernel. Calls sm90 does not serve (other head dims, dropout, max_seqlen_k = 0) run sm80.
Backward kernels: the sm_80 ones (csrc/attention/bwd.cuh) and, for the default backward (``deterministic=False``)
without dropout, with more than 16 keys per sequence, at padded head dims 64 and 128, the sm_90a one (wgmma + TMA +
mbarrier, csrc/attention/bwd_sm90.cuh). ``TILEFORMER_CUDA_ATTN_BWD`` picks it with the values and rules of
``TILEFORMER_CUDA_ATTN_FWD`` (``auto`` trusts the same sm_90a self-tests, run at the first forward the sm_90a forward
serves; a call the sm_90a backward does not serve runs sm80). ``transformer.backends.explain`` names the forward
kernel and, for calls that require grad, the backward kernel (describe_path).
"""
from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F

from .. import _checks, backends
from ..ops import attention as contract
from . import namespace_name, ops
from .selftest import hopper_check

__all__ = ["flash_attention", "flash_attention_varlen", "padded_attention", "head_dims", "head_dim_reason",
           "register", "supports", "describe_path", "fwd_mode", "FWD_ENV", "bwd_mode", "BWD_ENV"]

def register(ns):
    """Fakes + autograd of the namespace's attention ops (called once per namespace by ops())."""
    contract.register(ns, deterministic_arg=True, dropout_arg=True)


# ---------------------------------------------------------------------------------------------
# Which head dims this build serves (asked by transformer.attention's supports predicate)
# ---------------------------------------------------------------------------------------------

_HEAD_DIMS: dict = {}


@backends._constant_under_compile
def head_dims(device_type: str) -> tuple:
    """Head dims compiled into the extension serving `device_type` ("cuda" or "cpu" = emulated)."""
    if device_type not in _HEAD_DIMS:
        dev = torch.device(device_type)
        _HEAD_DIMS[device_type] = tuple(int(d) for d in ops(dev).attn_head_dims())
    return _HEAD_DIMS[device_type]


def _round8(d):
    return (d + 7) // 8 * 8


def head_dim_reason(device: torch.device, head_dim: int):
    """None if some compiled head dim can hold `head_dim` (padded to a multiple of 8), else the reason."""
    try:
        dims = head_dims(device.type)
    except (RuntimeError, AttributeError) as e:   # an extension built before the attention ops existed
        return f"the CUDA attention ops are unavailable in this build ({type(e).__name__}: {e})"
    if not dims or _round8(head_dim) > max(dims):
        built = ", ".join(map(str, dims)) or "none"
        return (f"the CUDA attention kernels of this build ({namespace_name(device)}) are compiled for head dims "
                f"{built} (TILEFORMER_CUDA_HEADDIMS); head dim {head_dim} needs one >= {_round8(head_dim)}")
    return None


def supports(call):
    """Limits of csrc/attention beyond what the public describe checks: fp16/bf16 only; the head dim is
    zero-padded to a multiple of 8 and runs with the smallest compiled head dim that holds it
    (TILEFORMER_CUDA_HEADDIMS at build time; default 64, 128 and 256, so any head dim up to 256); on a GPU,
    compute capability >= 8.0 (mma.sync bf16, cp.async, ldmatrix). Every other feature (GQA/MQA, causal either
    alignment, windows, ALiBi, softcap, lse, varlen, strided inputs, either backward, attention dropout with the
    mask of the Triton kernels and the reference) is served."""
    if call["dtype"] not in _checks.HALF_DTYPES:
        return f"the CUDA kernel takes fp16/bf16 inputs, got {call['dtype']}"
    if call["device"].type == "cuda" and torch.cuda.get_device_capability(call["device"]) < (8, 0):
        return "the CUDA kernel needs a GPU of compute capability >= 8.0"
    return head_dim_reason(call["device"], call["head_dim"])


# ---------------------------------------------------------------------------------------------
# Forward kernel choice: sm80 (mma.sync) or sm90 (wgmma + TMA)
# ---------------------------------------------------------------------------------------------

FWD_ENV = "TILEFORMER_CUDA_ATTN_FWD"
_FWD_MODES = ("auto", "sm80", "sm90")


BWD_ENV = "TILEFORMER_CUDA_ATTN_BWD"


def _mode(var) -> str:
    v = os.environ.get(var, "") or "auto"
    if v not in _FWD_MODES:
        raise ValueError(f"{var} must be 'auto', 'sm80' or 'sm90', got {v!r}")
    return v


def fwd_mode() -> str:
    """TILEFORMER_CUDA_ATTN_FWD: "auto" (also unset or empty), "sm80" or "sm90"; ValueError otherwise."""
    return _mode(FWD_ENV)


def bwd_mode() -> str:
    """TILEFORMER_CUDA_ATTN_BWD: "auto" (also unset or empty), "sm80" or "sm90"; ValueError otherwise."""
    return _mode(BWD_ENV)


def _sm90_reason(device, head_dim, varlen, max_seqlen_k=-1, dropout=False) -> str:
    """"" when the sm_90a forward serves such a call on this build and device (the C++ side decides), else why
    not."""
    try:
        return ops(device).attn_fwd_sm90_reason(_round8(head_dim), varlen, max_seqlen_k, dropout)
    except (RuntimeError, AttributeError) as e:   # an extension built before the sm_90a forward existed
        return f"this build has no sm_90a forward ({type(e).__name__}: {e})"


@backends._constant_under_compile
def _sm90_verified(device) -> bool:
    """Under "auto" on a compute capability 9.0 GPU: run selftest.hopper_check once (the C++ side keeps the result: -1
    not run, 0 failed, 1 passed) and report it there; True if it passed. A failure warns once."""
    ns = ops(device)
    state = ns.attn_fwd_sm90_verified(-1)
    if state == -1:
        try:
            why = hopper_check(ns, device)
        except Exception as e:   # e.g. a build with 9.0 instead of 9.0a: the kernels trap
            why = f"{type(e).__name__}: {e}"
        state = ns.attn_fwd_sm90_verified(0 if why else 1)
        if why:
            name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
            warnings.warn(f"the sm_90a attention forward is not used: its wgmma / TMA self-tests failed on "
                          f"{name} ({why}); the sm_80 forward runs instead",
                          RuntimeWarning, stacklevel=3)
    return state == 1


_fwd_settled: set = set()   # GPUs whose sm90 question is settled: not compute capability 9.0, or the check ran


@backends._constant_under_compile
def _prepare_fwd(device, head_dim, varlen, max_seqlen_k, dropout):
    """Before a forward on a GPU under "auto": the hardware check of the sm_90a kernel, at the first call it
    would serve (a no-op once settled, on other GPUs and on the CPU). Runs eagerly under torch.compile."""
    if device.type != "cuda":
        return
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key in _fwd_settled or fwd_mode() != "auto":
        return
    if torch.cuda.get_device_capability(device) != (9, 0):
        _fwd_settled.add(key)
    elif not _sm90_reason(device, head_dim, varlen, max_seqlen_k, dropout):
        _sm90_verified(device)
        _fwd_settled.add(key)


def describe_path(call):
    """Which CUDA forward kernel serves the call (shown by transformer.backends.explain): sm90 (wgmma + TMA) or
    sm80 (mma.sync, TILEFORMER_CUDA_ATTN_FWD_TILES w8 / w4 tiles), and why; for a call that requires grad, then
    the backward kernel (_describe_bwd)."""
    fwd = _describe_fwd(call)
    return f"{fwd}; {_describe_bwd(call)}" if call.get("requires_grad") else fwd


def _describe_bwd(call):
    device = call["device"]
    deterministic = bool(call.get("deterministic", False))
    sm80 = "backward sm80 (mma.sync, " + ("two kernels, no atomics)" if deterministic else "dQ by atomics)")
    mode = bwd_mode()
    reason = ""
    if mode != "sm80":
        try:
            reason = ops(device).attn_bwd_sm90_reason(_round8(call["head_dim"]), call["varlen"], -1,
                                                      call.get("dropout", 0.0) > 0, deterministic)
        except (RuntimeError, AttributeError) as e:   # an extension built before the sm_90a backward existed
            reason = f"this build has no sm_90a backward ({type(e).__name__}: {e})"
    return _describe_choice(device, BWD_ENV, mode, reason, sm80,
                            "backward sm90 (wgmma + TMA) (sm80 where a sequence has at most 16 keys)",
                            "at the first forward")


def _describe_fwd(call):
    device = call["device"]
    dropout = call.get("dropout", 0.0) > 0
    # dropout runs the w8 tiles whatever TILEFORMER_CUDA_ATTN_FWD_TILES says (csrc/attention/launch.cuh)
    tiles = "w8" if dropout else os.environ.get("TILEFORMER_CUDA_ATTN_FWD_TILES", "") or "w8"
    mode = fwd_mode()
    reason = _sm90_reason(device, call["head_dim"], call["varlen"], dropout=dropout) if mode != "sm80" else ""
    return _describe_choice(device, FWD_ENV, mode, reason, f"forward sm80 (mma.sync, {tiles} tiles)",
                            "forward sm90 (wgmma + TMA)", "at the first call")


def _describe_choice(device, env, mode, reason, sm80, sm90, first):
    """The kernel `env` (mode) picks and why, given sm90's reason for not serving the call ("" if it does)."""
    if mode == "sm80":
        return f"{sm80}: {env}=sm80"
    if reason:
        return f"{sm80}: sm90 does not serve this call ({reason})"
    if mode == "sm90":
        return f"{sm90}: {env}=sm90"
    if device.type != "cuda":
        return f"{sm80}: the emulator runs sm90 only with {env}=sm90"
    state = ops(device).attn_fwd_sm90_verified(-1)
    if state == 1:
        return f"{sm90}: the sm_90a self-tests passed on this GPU"
    if state == 0:
        return f"{sm80}: the sm_90a self-tests failed on this GPU"
    return f"{sm90} once the sm_90a self-tests pass {first}, else sm80"


# ---------------------------------------------------------------------------------------------
# Canonical entry functions (called by transformer.attention through the dispatcher)
# ---------------------------------------------------------------------------------------------

def _check(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype not in _checks.HALF_DTYPES:
            raise TypeError(f"{name} must be float16 or bfloat16 for the CUDA kernels (fp16/bf16), got {t.dtype}")
    reason = head_dim_reason(q.device, q.shape[-1])
    if reason:
        raise ValueError(reason)


def _pad(t, d8):
    """Zero-pad the head dim to d8 (a multiple of 8): the 16-byte copies of the kernels need it."""
    return t if t.shape[-1] == d8 else F.pad(t, (0, d8 - t.shape[-1]))


def _fwd(q, k, v, *args):
    """The attention forward op of q's device, head dims zero-padded to a multiple of 8 (the kernels' 16-byte
    copies need it; F.pad is differentiable, so the backward sees the padded op)."""
    d = q.shape[-1]
    d8 = _round8(d)
    out, lse = ops(q.device).attn_fwd(_pad(q, d8), _pad(k, d8), _pad(v, d8), *args)
    return (out if d8 == d else out[..., :d]), lse


def flash_attention(q, k, v, **kw):
    _check(q, k, v)
    _prepare_fwd(q.device, q.shape[-1], False, -1, kw.get("dropout_p", 0.0) > 0)
    return contract.flash_attention(_fwd, q, k, v, deterministic_arg=True, dropout_arg=True, **kw)


def flash_attention_varlen(q, k, v, *args, **kw):
    _check(q, k, v)
    return contract.flash_attention_varlen(_fwd, q, k, v, *args, deterministic_arg=True, dropout_arg=True, **kw)


def padded_attention(q, k, v, key_start, key_end, **kw):
    return contract.padded_attention(flash_attention_varlen, q, k, v, key_start, key_end, **kw)
