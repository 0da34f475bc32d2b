"""Flash attention in Triton: configs and launchers (forward, backward), and the shipped configs.

Kernels live in attention_fwd.py (forward + shared helpers), attention_fwd_tma.py (the sm_90 forward through
tensor descriptors) and attention_bwd.py (backward). This file:

* picks the forward's kernel (``forward_path``: tensor descriptors on sm_90 when q/k/v are 16-byte aligned, else
  the portable one; TILEFORMER_TRITON_ATTN_FWD forces one, also under the interpreter);
* picks a config: ``triton.autotune`` over the statically verified entries of ``_GPU_CONFIGS`` for the
  GPU's arch and head-dim bucket (``_kernel``), one fixed config under ``TRITON_INTERPRET=1``, where bf16
  also gets the in-kernel upcast (``UPCAST``);
* launches (``forward``, ``backward``), allocating outputs with ``_utils.empty`` (NaN-poisoned in tests);
* lists the shipped configs for the static report (``aot_configs``).

Limits: fp16/bf16 q/k/v, head dim 1..256 (a head dim that is not a multiple of 8 is zero-padded to one on
the host; the tile is the next power of two >= 16, masked), Hq a multiple of Hkv, last dim contiguous, any
Nq/Nk >= 0.
"""
from __future__ import annotations

import functools
import inspect
import os

import torch
import triton
import triton.language as tl

from . import _utils
from ._utils import LOG2E
from .attention_bwd import _attn_bwd_dkdv, _attn_bwd_dq, _attn_bwd_dq_convert, _attn_bwd_preprocess, _zero_tail
from .attention_fwd import _attn_fwd
from .attention_fwd_tma import _attn_fwd_tma

__all__ = ["forward", "backward", "aot_configs"]

# ---------------------------------------------------------------------------------------------
# Configs: (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel, GPU arch and padded head dim.
# BLOCK_M is the query tile, BLOCK_N the key tile in every kernel. Every entry is compiled by the
# static report (tests/test_attention_static.py) in its most register-hungry variant (causal + ALiBi):
# 0 spills, smem within the arch limit, wgmma on sm_90. Entries were chosen by that
# AOT sweep (triton 3.8); larger tiles (e.g. dK/dV with 64+ keys at D=256) spill and are left out. Triton 3.6
# (also supported) spills in some first entries (fwd d128 on sm_90); each such list also holds an entry that is
# spill-free with both versions, for the autotuner to fall back on. The backward's lists are described below.
# ---------------------------------------------------------------------------------------------

_GPU_CONFIGS = {
    90: {  # H100/H200: 227 KB smem per block
        "fwd": {64: [(128, 128, 8, 3)],
                128: [(128, 128, 8, 3), (128, 64, 8, 3)],
                256: [(64, 32, 8, 2)]},
        "dkdv": {64: [(64, 128, 8, 2), (64, 64, 4, 2), (64, 128, 8, 1)],
                 128: [(64, 128, 8, 2), (32, 128, 8, 2), (32, 64, 8, 2)],
                 256: [(16, 64, 8, 2), (32, 64, 8, 2)]},
        "dkdv_dq": {64: [(64, 64, 4, 2), (64, 128, 8, 2), (32, 128, 8, 2), (32, 64, 4, 2)],
                    128: [(32, 128, 8, 2), (32, 64, 8, 2), (16, 64, 8, 2)],
                    256: [(16, 64, 8, 2), (16, 64, 8, 3)]},
        "dq": {64: [(128, 64, 8, 3)],
               128: [(128, 64, 8, 2)],
               256: [(64, 32, 8, 2), (64, 16, 8, 2)]},
    },
    80: {  # A100 and any other arch (163 KB smem; the autotuner drops a config a smaller GPU cannot hold)
        "fwd": {64: [(128, 64, 8, 3), (64, 64, 8, 3)],
                128: [(64, 64, 8, 2)],
                256: [(64, 64, 8, 2)]},
        "dkdv": {64: [(32, 128, 8, 2), (32, 64, 8, 2), (32, 32, 4, 2)],
                 128: [(32, 64, 8, 2), (16, 32, 4, 2)],
                 256: [(16, 64, 8, 2), (16, 32, 8, 2)]},
        "dkdv_dq": {64: [(32, 32, 4, 2), (16, 64, 8, 2)],
                    128: [(16, 64, 8, 2), (16, 32, 4, 2)],
                    256: []},
        "dq": {64: [(128, 64, 8, 2)],
               128: [(64, 64, 8, 2)],
               256: [(32, 32, 8, 1)]},
    },
}
# Backward kernels: "dkdv" is the dK/dV kernel of the deterministic backward, "dkdv_dq" the same kernel with
# ATOMIC_DQ (the default backward), "dq" the deterministic backward's dQ kernel. The static report compiles
# each entry causal + ALiBi (fp16) and, unless listed in _BWD_NO_SOFTCAP, bf16 varlen + two-sided window +
# softcap (_aot_bwd): all spill-free with triton 3.8. Entries in _BWD_NO_SOFTCAP spill with softcap and are not
# autotuned for softcap calls; a list left empty for a call sends it to the deterministic backward. Triton 3.6
# spills (4-72 B) in the softcap variant of some entries; every list holds an entry spill-free in each variant
# with both versions (the last one where the others are not). Chosen by an AOT sweep. On sm_90 the dK/dV
# kernel's products are wgmma with N = BLOCK_M (S^T, dP^T), N = D (dV, dK) and, with ATOMIC_DQ, N = BLOCK_M or
# BLOCK_M / 2 (dQ^T has D rows: 64-row products on 8 warps split N over two warpgroups). Every N is >= 64 in
# the first "dkdv" D=64 and D=128 entries and the first "dkdv_dq" D=64 entry; wider "dkdv_dq" tiles at D=128
# (64 x 128) spill 44-180 B, and at D=256 only 16-query tiles are spill-free (S^T wgmma N=8). On sm_80 the fp32
# atomic adds are scalar: "dkdv_dq" has no D=128 softcap entry and no D=256 entry (every tile spills 500+ B).
_BWD_KINDS = ("dkdv", "dkdv_dq", "dq")
_BWD_NO_SOFTCAP = {
    (90, "dkdv", 128, (64, 128, 8, 2)), (90, "dkdv", 256, (32, 64, 8, 2)),
    (90, "dkdv_dq", 64, (64, 64, 4, 2)), (90, "dkdv_dq", 64, (64, 128, 8, 2)),
    (90, "dkdv_dq", 128, (32, 128, 8, 2)), (90, "dkdv_dq", 256, (16, 64, 8, 2)), (90, "dkdv_dq", 256, (16, 64, 8, 3)),
    (90, "dq", 256, (64, 32, 8, 2)), (80, "dkdv_dq", 128, (16, 64, 8, 2)), (80, "dkdv_dq", 128, (16, 32, 4, 2)),
}

# Dropout calls (HAS_DROPOUT) autotune over lists of their own: the in-kernel Philox mask (8 keys per call,
# interleaved back into key order by joins) adds registers and a layout conversion, and many entries above spill
# with it (e.g. fwd D=128 128x128 on sm_90: 592 B and 240 KB of shared memory; the backward's 64-query tiles at
# D >= 64). Chosen by an AOT sweep with dropout on (triton 3.8; causal + ALiBi fp16, and bf16 varlen + two-sided
# window + softcap unless listed in _DROPOUT_NO_SOFTCAP): every entry is spill-free and within the arch's shared
# memory; each list holds an entry for softcap calls. An empty "dkdv_dq" list (sm_80, D >= 128: every tile spills
# thousands of bytes) sends dropout calls to the deterministic backward. sm_90 entries with fewer than 64 product
# rows (dK/dV: BLOCK_N 32; dQ: BLOCK_M 32) run mma.sync, not wgmma: they are the spill-free tiles for softcap calls
# (dK/dV D=128, dQ D=256) and for every dK/dV call at D=256, where each wgmma-sized tile spills (40-4764 B).
_DROPOUT_CONFIGS = {
    90: {"fwd": {64: [(128, 128, 8, 3), (128, 64, 8, 3)], 128: [(128, 64, 8, 3), (64, 64, 8, 2)],
                 256: [(64, 32, 8, 2)]},
         "dkdv": {64: [(32, 64, 8, 2), (32, 64, 4, 2)], 128: [(32, 64, 8, 2), (16, 64, 4, 2), (32, 32, 4, 2)],
                  256: [(16, 32, 8, 2), (16, 32, 8, 1)]},
         "dkdv_dq": {64: [(32, 128, 8, 2), (16, 64, 4, 2)], 128: [(32, 64, 8, 2), (16, 64, 8, 2)],
                     256: [(16, 32, 8, 2)]},
         "dq": {64: [(128, 64, 8, 3), (64, 64, 8, 2)], 128: [(64, 64, 8, 2), (64, 32, 8, 2)],
                256: [(64, 32, 8, 2), (64, 16, 8, 2), (32, 32, 4, 2)]}},
    80: {"fwd": {64: [(128, 64, 8, 3), (64, 64, 8, 3)], 128: [(64, 64, 8, 2), (64, 64, 4, 2)],
                 256: [(64, 64, 8, 2), (64, 32, 8, 2)]},
         "dkdv": {64: [(32, 32, 4, 2), (16, 64, 4, 2)], 128: [(32, 64, 8, 2), (16, 32, 4, 2)],
                  256: [(16, 32, 8, 2)]},
         "dkdv_dq": {64: [(16, 64, 8, 2), (16, 32, 4, 2)], 128: [], 256: []},
         "dq": {64: [(64, 64, 8, 2), (64, 32, 8, 2)], 128: [(64, 64, 8, 2), (64, 32, 8, 2)],
                256: [(32, 32, 8, 1), (32, 16, 8, 1)]}},
}
_DROPOUT_NO_SOFTCAP = {
    (90, "dkdv", 128, (32, 64, 8, 2)), (90, "dkdv", 128, (16, 64, 4, 2)), (90, "dkdv_dq", 64, (32, 128, 8, 2)),
    (90, "dkdv_dq", 128, (32, 64, 8, 2)), (90, "dq", 128, (64, 64, 8, 2)), (90, "dq", 256, (64, 32, 8, 2)),
    (90, "dq", 256, (64, 16, 8, 2)), (80, "dq", 64, (64, 64, 8, 2)), (80, "dq", 256, (32, 32, 8, 1)),
}

# Under the interpreter: one config; BLOCK_M != BLOCK_N so tests exercise both tile sizes.
_INTERPRET_CONFIG = {"fwd": (64, 32, 4, 1), "dkdv": (32, 64, 4, 1), "dkdv_dq": (32, 64, 4, 1), "dq": (64, 32, 4, 1)}
_KERNELS = {"fwd": _attn_fwd, "dkdv": _attn_bwd_dkdv, "dkdv_dq": _attn_bwd_dkdv, "dq": _attn_bwd_dq}
# Calls whose sequences all have at most LOCAL_KEYS keys run the deterministic pair (dK/dV kernel without atomics,
# dQ kernel) with LOCAL_DELTA: delta and rowsum(P) from their one key tile (see attention_bwd.py), whatever
# `deterministic` says. One (BLOCK_M, BLOCK_N = LOCAL_KEYS, num_warps, num_stages) per kernel and head-dim bucket,
# under the interpreter too; spill-free on sm_80 and sm_90 with every feature, dropout included (_aot_local).
LOCAL_KEYS = 16
_LOCAL_CONFIGS = {"dkdv": {64: (32, LOCAL_KEYS, 4, 2), 128: (32, LOCAL_KEYS, 4, 1), 256: (16, LOCAL_KEYS, 4, 1)},
                  "dq": {64: (64, LOCAL_KEYS, 4, 2), 128: (32, LOCAL_KEYS, 4, 2), 256: (16, LOCAL_KEYS, 4, 2)}}
# Rows of padding after each batch element's (varlen: after the last) rows of the dQ accumulator: a query tile
# that starts inside a sequence adds its (zero) rows past the end there, unmasked.
_DQ_ACC_PAD = max([_INTERPRET_CONFIG["dkdv_dq"][0]] + [e[0] for per_arch in _GPU_CONFIGS.values()
                                                       for entries in per_arch["dkdv_dq"].values() for e in entries])
_TUNE_KEYS = ["tune_key", "GROUP", "HEAD_DIM", "IS_VARLEN", "BOTTOM_RIGHT", "MASK_LEFT", "MASK_RIGHT",
              "HAS_SOFTCAP", "HAS_ALIBI", "HAS_DROPOUT"]


def _block_d(head_dim):
    return max(16, triton.next_power_of_2(head_dim))


def _d_bucket(block_d):
    return 64 if block_d <= 64 else block_d


def _arch(device):
    major, _ = torch.cuda.get_device_capability(device)
    return 90 if major == 9 else 80


@functools.lru_cache(maxsize=None)
def _tuned(which, arch, d_bucket, softcap=False, dropout=False):
    """The autotuned kernel for one (kernel, arch, head-dim bucket); a single config when interpreting. Backward
    kernels with `softcap`: the entries not in _BWD_NO_SOFTCAP; None if there is none (or none at all). With
    `dropout`: the entries of _DROPOUT_CONFIGS (with softcap those not in _DROPOUT_NO_SOFTCAP). The
    ATOMIC_DQ kernel's autotuner zeroes the dQ accumulator before each timed run and before the real one."""
    if arch is None:
        entries = [_INTERPRET_CONFIG[which][:4]]
    elif dropout:
        entries = [tuple(e) for e in _DROPOUT_CONFIGS[arch][which][d_bucket]
                   if not (softcap and (arch, which, d_bucket, tuple(e)) in _DROPOUT_NO_SOFTCAP)]
        if not entries:
            return None
    else:
        entries = [tuple(e) for e in _GPU_CONFIGS[arch][which][d_bucket]]
        if which in _BWD_KINDS:
            entries = [e for e in entries if not (softcap and (arch, which, d_bucket, e) in _BWD_NO_SOFTCAP)]
            if not entries:
                return None
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in entries]
    reset = ["DQAcc"] if which == "dkdv_dq" else None
    return triton.autotune(configs=configs, key=_TUNE_KEYS, reset_to_zero=reset)(_KERNELS[which])


def _kernel(which, device, block_d, softcap=False, dropout=False):
    arch = None if _utils.interpreting() else _arch(device)
    return _tuned(which, arch, _d_bucket(block_d), softcap, dropout)


@functools.lru_cache(maxsize=None)
def _tuned_local(which, d_bucket):
    bm, bn, warps, stages = _LOCAL_CONFIGS[which][d_bucket]
    config = triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)
    return triton.autotune(configs=[config], key=_TUNE_KEYS)(_KERNELS[which])


def _tune_key(max_q, max_k):
    """Length bucket for the autotune cache: log2 of each max length (retune per power of two, not per length)."""
    return max(max_q, 1).bit_length() * 64 + max(max_k, 1).bit_length()


# ---------------------------------------------------------------------------------------------
# Forward paths: portable (attention_fwd.py, pointer loads: cp.async on sm_80/sm_90) and, on sm_90, tensor
# descriptors (attention_fwd_tma.py: TMA loads/stores, optionally a warp-specialized key loop).
# ---------------------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, num_warps, num_stages, WARP_SPEC) per padded head dim and causal (any right-bounded band:
# MASK_RIGHT; those lists add a 64-row tile, which wastes less work on the diagonal). Chosen by an AOT sweep
# (BLOCK_M 64/128 x BLOCK_N 64/128 x 2-4 stages x {8 warps, 4 warps, 4 warps + WARP_SPEC}, every feature on):
# kept where 0 spills, smem <= 227 KB and every wgmma has N >= 64 -- 64-row tiles on 8 warps split N over two
# warpgroups (N 32) and 128-row tiles on 4 plain warps spill. WARP_SPEC entries run num_warps=4: the sm_90
# warp-specialization pass adds a producer warpgroup issuing the TMA loads and splits BLOCK_M over two consumer
# warpgroups (12 warps, setmaxnreg). Every entry is spill-free with triton 3.6 too; the D=256 ones use 255
# registers. BLOCK_N = 176 does not compile (block shapes must be powers of two). The static report compiles
# each entry (_aot_fwd_tma).
_TMA_D64 = [(128, 64, 8, 3, False), (128, 128, 8, 3, False), (64, 64, 4, 4, False),
            (128, 128, 4, 2, True), (128, 128, 4, 3, True), (128, 64, 4, 3, True)]
_TMA_D128 = [(128, 64, 8, 3, False), (128, 64, 8, 4, False), (128, 128, 8, 2, False),
             (128, 128, 4, 2, True), (128, 64, 4, 3, True), (128, 64, 4, 4, True)]
_TMA_D256 = [(64, 64, 4, 2, False), (64, 64, 4, 3, False), (128, 64, 8, 2, False), (64, 64, 4, 2, True)]
_TMA_FWD_CONFIGS = {
    64: {False: _TMA_D64, True: _TMA_D64 + [(64, 128, 4, 3, False)]},
    128: {False: _TMA_D128, True: _TMA_D128 + [(64, 64, 4, 3, False)]},
    256: {False: _TMA_D256, True: _TMA_D256},
}
# Dropout calls: the entries of _TMA_FWD_CONFIGS that stay spill-free with the Philox mask (every feature on, as
# _aot_fwd_tma compiles them); an empty list sends dropout calls of that head-dim bucket to the portable forward.
_TMA_DROPOUT_CONFIGS = {
    64: [(128, 64, 8, 3, False), (128, 128, 8, 3, False), (128, 128, 4, 2, True), (128, 64, 4, 3, True)],
    128: [(128, 64, 8, 3, False), (64, 64, 4, 3, False), (128, 128, 4, 2, True), (128, 64, 4, 3, True)],
    256: [],
}
# Under the interpreter (TILEFORMER_TRITON_ATTN_FWD=tma / tma_ws): one config, as _INTERPRET_CONFIG["fwd"].
_INTERPRET_TMA_CONFIG = (64, 32, 4, 1)

FWD_PATH_ENV = "TILEFORMER_TRITON_ATTN_FWD"
_FWD_PATHS = ("auto", "portable", "tma", "tma_ws")
# Feature detection on the installed Triton: device-side tensor descriptors, and tl.range(warp_specialize=...).
HAS_TENSOR_DESCRIPTORS = hasattr(tl, "make_tensor_descriptor")
HAS_WARP_SPECIALIZE = "warp_specialize" in inspect.signature(tl.range).parameters

_PATH_TEXT = {
    "portable": "portable forward (pointer loads)",
    "tma": "sm_90 TMA forward (tensor descriptors, pipelined key loops)",
    "tma_ws": "sm_90 TMA + warp-specialized forward (tensor descriptors; autotuned with pipelined key loops too)",
}


def _requested_fwd_path():
    value = os.environ.get(FWD_PATH_ENV, "") or "auto"
    if value not in _FWD_PATHS:
        raise ValueError(f"{FWD_PATH_ENV} must be one of {', '.join(_FWD_PATHS)} (or unset), got {value!r}")
    return value


def _tma_blocker(tensors):
    """None if every (name, tensor) can be addressed by tensor descriptors: 16-byte aligned base, and every
    stride but the last (of a dimension longer than 1) a multiple of 16 bytes; else why not."""
    for name, t in tensors:
        if t.data_ptr() % 16:
            return f"{name} is not 16-byte aligned"
        for size, stride in zip(t.shape[:-1], t.stride()[:-1]):
            if size > 1 and (stride * t.element_size()) % 16:
                return f"{name} has a stride of {stride} elements, not a multiple of 16 bytes"
    return None


def forward_path(device, tensors=()):
    """(path, reason) of the forward kernel serving tensors on `device`: path "portable", "tma" or "tma_ws"
    (_PATH_TEXT), reason why it is not a faster one ("" if none). `tensors` ((name, tensor) pairs) are checked
    for the descriptors' alignment; without them the answer holds for aligned tensors.

    TILEFORMER_TRITON_ATTN_FWD: auto (default: tma_ws on sm_90 GPUs whose Triton has tensor descriptors and
    warp specialization, tma without the latter, else portable; the interpreter runs portable), portable,
    tma or tma_ws (forced; also under the interpreter; ValueError where that path cannot run)."""
    want = _requested_fwd_path()
    if want == "portable":
        return "portable", f"{FWD_PATH_ENV}=portable"
    interp = _utils.interpreting()
    why = None
    if not HAS_TENSOR_DESCRIPTORS:
        why = f"triton {triton.__version__} has no tl.make_tensor_descriptor"
    elif not interp and device.type == "cuda" and _arch(device) != 90:
        why = "tensor descriptors are used on sm_90 only"
    elif want == "auto" and (interp or device.type != "cuda"):
        why = f"the interpreter runs it unless {FWD_PATH_ENV}=tma or tma_ws"
    else:
        why = _tma_blocker(tensors)
    if why is None and want == "tma_ws" and not HAS_WARP_SPECIALIZE:
        why = f"triton {triton.__version__}'s tl.range has no warp_specialize"
    if why is not None:
        if want != "auto":
            raise ValueError(f"{FWD_PATH_ENV}={want}: the {want} forward cannot run this call: {why}")
        return "portable", why
    if want == "auto":
        if HAS_WARP_SPECIALIZE:
            return "tma_ws", ""
        return "tma", f"triton {triton.__version__}'s tl.range has no warp_specialize"
    return want, f"{FWD_PATH_ENV}={want}"


def describe_forward_path(device):
    """One line naming the forward kernel for aligned tensors on `device` (for backends.explain); a forced path
    that cannot run there gives the error the call would raise."""
    try:
        path, why = forward_path(device)
    except ValueError as e:
        return f"the call raises: {e}"
    notes = [why] if why else []
    if path != "portable" and _requested_fwd_path() == "auto":
        notes.append("q/k/v not 16-byte aligned take the portable forward")
    return _PATH_TEXT[path] + (": " + "; ".join(notes) if notes else "")


@functools.lru_cache(maxsize=None)
def _tuned_fwd_tma(arch, d_bucket, causal, path, dropout=False):
    """The autotuned descriptor forward: the entries of one list (dropout: _TMA_DROPOUT_CONFIGS), the WARP_SPEC
    ones only for tma_ws; None if there is none."""
    if arch is None:
        entries = [_INTERPRET_TMA_CONFIG + (path == "tma_ws",)]
    else:
        pool = _TMA_DROPOUT_CONFIGS[d_bucket] if dropout else _TMA_FWD_CONFIGS[d_bucket][causal]
        entries = [e for e in pool if path == "tma_ws" or not e[4]]
        if not entries:
            return None
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "WARP_SPEC": ws}, num_warps=w, num_stages=s)
               for bm, bn, w, s, ws in entries]
    return triton.autotune(configs=configs, key=_TUNE_KEYS)(_attn_fwd_tma)


def _descriptor_workspace(size, alignment, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_allocator():
    """Device-side tensor descriptors need a global workspace at launch: give Triton an allocator taking it from
    PyTorch's caching allocator (as Triton's fused-attention tutorial does), unless one is set already in this
    context."""
    try:
        from triton.runtime import _allocation
        if not isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
            return
    except (ImportError, AttributeError):
        pass
    triton.set_allocator(_descriptor_workspace)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

def _seq_strides(t, varlen):
    """(batch, token, head) element strides; batch stride 0 for packed varlen tensors."""
    return (0, t.stride(0), t.stride(1)) if varlen else (t.stride(0), t.stride(1), t.stride(2))


def _lse_strides(lse, varlen):
    """(batch, head, token) strides of an lse-shaped tensor: [B, H, N] or varlen [H, T]."""
    return (0, lse.stride(0), lse.stride(1)) if varlen else (lse.stride(0), lse.stride(1), lse.stride(2))


def _alibi_strides(alibi):
    if alibi is None:
        return 0, 0
    return (0, alibi.stride(0)) if alibi.dim() == 1 else (alibi.stride(0), alibi.stride(1))


def dropout_threshold(dropout_p):
    """The 16-bit draws below which an element is dropped: round(p * 2^16), at most 2^16 - 1 (the mapping is
    documented with the mask, _device.dropout_keep)."""
    return min(int(round(float(dropout_p) * 65536.0)), 65535)


def _common(q, k, alibi, cu_q, cu_k, max_q, max_k, scale, left, right, softcap, bottom_right, dropout_p=0.0,
            rng_state=None):
    """(Alibi, CuQ, CuK, RngState), keyword arguments and constexprs shared by the forward, dK/dV and dQ kernels."""
    varlen = cu_q is not None
    head_dim = q.shape[-1]
    dummy = q  # stands in for absent optional pointers (never dereferenced)
    dropout = dropout_p > 0
    if dropout and (rng_state is None or rng_state.dtype != torch.int64 or rng_state.numel() != 2
                    or rng_state.device != q.device):
        raise ValueError(f"dropout_p > 0 needs rng_state, an int64 [2] tensor on {q.device}")
    ptrs = (alibi if alibi is not None else dummy, cu_q if varlen else dummy, cu_k if varlen else dummy,
            rng_state if dropout else dummy)
    sa = _alibi_strides(alibi)
    args = dict(stride_ab=sa[0], stride_ah=sa[1], Nq=max_q, Nk=max_k)
    if softcap > 0:
        args.update(qk_scale=scale / softcap, softcap2=softcap * LOG2E)
    else:
        args.update(qk_scale=scale * LOG2E, softcap2=0.0)
    args.update(win_left=max(left, 0), win_right=max(right, 0), tune_key=_tune_key(max_q, max_k),
                drop_thr=dropout_threshold(dropout_p) if dropout else 0,
                drop_scale=1.0 / (1.0 - dropout_p) if dropout else 1.0)
    consts = dict(GROUP=q.shape[-2] // k.shape[-2], HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim),
                  IS_VARLEN=varlen, BOTTOM_RIGHT=bool(bottom_right), MASK_LEFT=left >= 0, MASK_RIGHT=right >= 0,
                  HAS_SOFTCAP=softcap > 0, HAS_ALIBI=alibi is not None, HAS_DROPOUT=dropout,
                  UPCAST=_utils.interpreting() and q.dtype == torch.bfloat16)
    return ptrs, args, consts


def _grid_dims(q, k, cu_q, max_q, max_k):
    varlen = cu_q is not None
    batch = cu_q.shape[0] - 1 if varlen else q.shape[0]
    return batch, q.shape[-2], k.shape[-2]


def _zero_varlen_tail(x, y, lse, cu, total):
    """Outputs of packed tokens in no sequence (before cu[0] or from cu[-1] on): 0 (lse -inf)."""
    if total == 0:
        return
    block_t = 64
    yy = y if y is not None else x
    sl = (lse.stride(0), lse.stride(1)) if lse is not None else (0, 0)
    _zero_tail[(triton.cdiv(total, block_t),)](
        x, yy, lse if lse is not None else x, cu, cu.shape[0] - 1, total, x.shape[1],
        x.stride(0), x.stride(1), yy.stride(0), yy.stride(1), sl[0], sl[1],
        HEAD_DIM=x.shape[-1], BLOCK_T=block_t, BLOCK_D=_block_d(x.shape[-1]),
        HAS_Y=y is not None, HAS_LSE=lse is not None)


def _safe_cu(cu, total):
    """cu_seqlens the kernels can take whatever its values, without a device-to-host copy: clamped into
    0..total and made non-decreasing (a running max). Valid cu_seqlens come back unchanged."""
    return torch.cummax(cu.clamp(0, total), dim=0).values.to(torch.int32)


def _padded_head_dim(head_dim):
    """Head dims that are not a multiple of 8 run zero-padded to one (as flash-attn does): rows then start on
    16-byte boundaries, so tiles load as vectors and stream through cp.async (unaligned rows do neither)."""
    return -(-head_dim // 8) * 8


def _pad(t, d):
    return t if t is None or t.shape[-1] == d else torch.nn.functional.pad(t, (0, d - t.shape[-1]))


def forward(q, k, v, alibi, cu_q, cu_k, max_q, max_k, scale, left, right, softcap, bottom_right, dropout_p=0.0,
            rng_state=None):
    """(out like q, contiguous; lse fp32 [B, Hq, Nq] or [Hq, total_q], natural log).

    q [B, Nq, Hq, D] (varlen: [Tq, Hq, D] with int32 cu_q / cu_k [B + 1]), k / v [B, Nk, Hkv, D]; fp16/bf16
    with a contiguous last dim; left / right: window sizes (-1 unbounded; causal is right = 0); scale: the
    softmax scale; softcap 0 = off; bottom_right: the alignment of windows and ALiBi distances; dropout_p > 0:
    attention dropout with the mask of rng_state (int64 [2] seed, offset on q's device). The kernel:
    forward_path (portable, or tensor descriptors on sm_90; TILEFORMER_TRITON_ATTN_FWD)."""
    _requested_fwd_path()   # a bad TILEFORMER_TRITON_ATTN_FWD fails every call, even one with nothing to compute
    head_dim, padded = q.shape[-1], _padded_head_dim(q.shape[-1])
    if padded != head_dim:   # zero columns change no score and give zero output columns
        out, lse = forward(_pad(q, padded), _pad(k, padded), _pad(v, padded), alibi, cu_q, cu_k, max_q, max_k,
                            scale, left, right, softcap, bottom_right, dropout_p, rng_state)
        return out[..., :head_dim].contiguous(), lse
    varlen = cu_q is not None
    if varlen:
        cu_q, cu_k = _safe_cu(cu_q, q.shape[0]), _safe_cu(cu_k, k.shape[0])
    batch, hq, _ = _grid_dims(q, k, cu_q, max_q, max_k)
    out = _utils.empty(q.shape, q.dtype, q.device)
    lse_shape = (hq, q.shape[0]) if varlen else (batch, hq, q.shape[1])
    lse = _utils.empty(lse_shape, torch.float32, q.device)
    if varlen:
        _zero_varlen_tail(out, None, lse, cu_q, q.shape[0])
    if out.numel() == 0 or max_q == 0 or batch == 0:
        return out, lse
    ptrs, args, consts = _common(q, k, alibi, cu_q, cu_k, max_q, max_k, scale, left, right, softcap, bottom_right,
                                 dropout_p, rng_state)
    sq, sk, sv, so = (_seq_strides(t, varlen) for t in (q, k, v, out))
    path, _ = forward_path(q.device, (("q", q), ("k", k), ("v", v)))
    dropout = consts["HAS_DROPOUT"]
    kernel = None
    if path != "portable":   # the descriptor kernel takes the same arguments (+ WARP_SPEC from its config)
        arch = None if _utils.interpreting() else _arch(q.device)
        if arch is not None:
            _ensure_allocator()
        kernel = _tuned_fwd_tma(arch, _d_bucket(consts["BLOCK_D"]), consts["MASK_RIGHT"], path, dropout)
    if kernel is None:       # portable, or a dropout call whose head-dim bucket has no descriptor entry
        kernel = _kernel("fwd", q.device, consts["BLOCK_D"], False, dropout)
    grid = lambda meta: (triton.cdiv(max_q, meta["BLOCK_M"]), hq, batch)  # noqa: E731
    kernel[grid](q, k, v, out, lse, *ptrs, *sq, *sk, *sv, *so, *_lse_strides(lse, varlen), **args, **consts)
    return out, lse


def backward(dout, q, k, v, out, lse, dlse, alibi, cu_q, cu_k, max_q, max_k, scale, left, right, softcap,
              bottom_right, deterministic=False, dropout_p=0.0, rng_state=None):
    """(dq, dk, dv), contiguous, shaped like q, k, v, from dout (and dlse, the gradient of lse, or None).

    deterministic=False: one dK/dV kernel per key tile also adds dS K into a zeroed fp32 dQ accumulator with
    atomic adds (S, P, dP, dS once per tile pair: 5 products), which a last kernel scales and converts; the
    order of the adds, so dq's rounding, can change from run to run. deterministic=True, and calls whose arch
    and head dim have no such config (_GPU_CONFIGS "dkdv_dq"): dQ by a kernel of its own that recomputes S, P,
    dP, dS per query tile (7 products), no atomics: bit-identical gradients. Calls with at most LOCAL_KEYS keys
    per sequence always take the latter, with delta from the one key tile (_LOCAL_CONFIGS). dropout_p /
    rng_state: those of the forward; every kernel regenerates the keep mask from them."""
    head_dim, padded = q.shape[-1], _padded_head_dim(q.shape[-1])
    if padded != head_dim:   # see _forward
        grads = backward(_pad(dout, padded), _pad(q, padded), _pad(k, padded), _pad(v, padded), _pad(out, padded),
                          lse, dlse, alibi, cu_q, cu_k, max_q, max_k, scale, left, right, softcap, bottom_right,
                          deterministic, dropout_p, rng_state)
        return tuple(g[..., :head_dim].contiguous() for g in grads)
    varlen = cu_q is not None
    if varlen:
        cu_q, cu_k = _safe_cu(cu_q, q.shape[0]), _safe_cu(cu_k, k.shape[0])
    batch, hq, hkv = _grid_dims(q, k, cu_q, max_q, max_k)
    dq = _utils.empty(q.shape, q.dtype, q.device)
    dk = _utils.empty(k.shape, k.dtype, k.device)
    dv = _utils.empty(v.shape, v.dtype, v.device)
    if batch == 0 or q.numel() == 0 or k.numel() == 0:   # nothing to attend: every gradient is 0
        for t in (dq, dk, dv):
            t.zero_()
        return dq, dk, dv
    head_dim = q.shape[-1]
    block_d = _block_d(head_dim)
    # The default backward: dK/dV kernel with ATOMIC_DQ (where the arch and head dim have a config for the call)
    dropout = dropout_p > 0
    local = 0 < max_k <= LOCAL_KEYS   # see _LOCAL_CONFIGS
    atomic_kernel = (None if deterministic or local or max_k == 0
                     else _kernel("dkdv_dq", q.device, block_d, softcap > 0, dropout))
    atomic = atomic_kernel is not None
    if varlen:
        if not atomic:   # the atomic path converts every row of its zeroed accumulator
            _zero_varlen_tail(dq, None, None, cu_q, q.shape[0])
        _zero_varlen_tail(dk, dv, None, cu_k, k.shape[0])
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    if dlse is not None and dlse.dtype != torch.float32:
        dlse = dlse.float()
    delta = _utils.empty(lse.shape, torch.float32, q.device)
    sl, sdo = _lse_strides(lse, varlen), _seq_strides(dout, varlen)
    if max_q > 0:
        block_pre = 64
        _attn_bwd_preprocess[(triton.cdiv(max_q, block_pre), hq, batch)](
            out, dout, dlse if dlse is not None else lse, delta, cu_q if varlen else lse,
            *_seq_strides(out, varlen), *sdo, *sl,
            *(_lse_strides(dlse, varlen) if dlse is not None else (0, 0, 0)), max_q,
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=block_pre, IS_VARLEN=varlen, HAS_DLSE=dlse is not None,
            LOCAL_DELTA=local)
    ptrs, args, consts = _common(q, k, alibi, cu_q, cu_k, max_q, max_k, scale, left, right, softcap, bottom_right,
                                 dropout_p, rng_state)
    args["sm_scale"] = scale
    sq, sk, sv = (_seq_strides(t, varlen) for t in (q, k, v))
    dkdv_args = (*ptrs, *sq, *sk, *sv, *sdo, *_seq_strides(dk, varlen), *_seq_strides(dv, varlen))
    grid = lambda meta: (triton.cdiv(max_k, meta["BLOCK_N"]), hkv, batch)  # noqa: E731
    if atomic:
        # fp32 [B, Nq + pad, Hq, BLOCK_D] (varlen [Tq + pad, Hq, BLOCK_D]): whole tiles add without masks
        shape = (q.shape[0] + _DQ_ACC_PAD, hq, block_d) if varlen else (batch, q.shape[1] + _DQ_ACC_PAD, hq, block_d)
        dq_acc = torch.zeros(shape, dtype=torch.float32, device=q.device)
        atomic_kernel[grid](q, k, v, dout, lse, delta, dk, dv, dq_acc, *dkdv_args, *_seq_strides(dq_acc, varlen),
                            *sl, **args, **consts, ATOMIC_DQ=True, LOCAL_DELTA=False)
        n_rows, acc_b, out_b = (q.shape[0], 1, 1) if varlen else (q.shape[1], batch, batch)
        sa = _seq_strides(dq_acc, varlen)
        block_t = 32
        _attn_bwd_dq_convert[(triton.cdiv(n_rows, block_t), hq, acc_b)](
            dq_acc, dq, n_rows, scale, sa[0], sa[1], sa[2], *_seq_strides(dq, varlen),
            HEAD_DIM=head_dim, BLOCK_T=block_t, BLOCK_D=block_d)
        return dq, dk, dv
    if max_k > 0:
        kernel = (_tuned_local("dkdv", _d_bucket(block_d)) if local
                  else _kernel("dkdv", q.device, block_d, softcap > 0, dropout))
        kernel[grid](q, k, v, dout, lse, delta, dk, dv, dq, *dkdv_args, 0, 0, 0, *sl, **args, **consts,
                     ATOMIC_DQ=False, LOCAL_DELTA=local)
    if max_q > 0:
        kernel = _tuned_local("dq", _d_bucket(block_d)) if local else _kernel("dq", q.device, block_d, softcap > 0,
                                                                                dropout)
        grid = lambda meta: (triton.cdiv(max_q, meta["BLOCK_M"]), hq, batch)  # noqa: E731
        kernel[grid](q, k, v, dout, lse, delta, dq, *ptrs, *sq, *sk, *sv, *sdo, *_seq_strides(dq, varlen), *sl,
                     **args, **consts, LOCAL_DELTA=local)
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------
# Shipped configs for the static report (AOT compile for sm_80 / sm_90, no GPU needed)
# ---------------------------------------------------------------------------------------------

_PTR_ARGS = {"Q", "K", "V", "Out", "DO", "DQ", "DK", "DV"}
_FP32_PTR_ARGS = {"Lse", "Delta", "Alibi", "DQAcc"}
_FLOAT_ARGS = {"qk_scale", "softcap2", "sm_scale", "drop_scale"}


def _signature(kernel, dtype):
    t = {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    sig = {}
    for name in kernel.arg_names:
        if name in _PTR_ARGS:
            sig[name] = f"*{t}"
        elif name in _FP32_PTR_ARGS:
            sig[name] = "*fp32"
        elif name in ("CuQ", "CuK"):
            sig[name] = "*i32"
        elif name == "RngState":
            sig[name] = "*i64"
        elif name in _FLOAT_ARGS:
            sig[name] = "fp32"
        elif name.isupper() or name == "UPCAST":
            sig[name] = "constexpr"
        else:
            sig[name] = "i32"
    return sig


# Strides the launcher does not guarantee to be multiples of 16 (ALiBi slopes rows, lse rows).
_NOT_DIVISIBLE = ("stride_ab", "stride_ah", "stride_lm", "stride_glm", "stride_glb", "stride_glh")


def _aot_consts(kernel, head_dim, bm, bn, feats, **extra):
    """Constexprs of one AOT entry: every feature off (LOCAL_DELTA too, in the backward kernels), then `extra`,
    then `feats`."""
    consts = dict(GROUP=2, HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), BLOCK_M=bm, BLOCK_N=bn, IS_VARLEN=False,
                  BOTTOM_RIGHT=True, MASK_LEFT=False, MASK_RIGHT=False, HAS_SOFTCAP=False, HAS_ALIBI=False,
                  HAS_DROPOUT=False, UPCAST=False)
    if kernel in (_attn_bwd_dkdv, _attn_bwd_dq):
        consts["LOCAL_DELTA"] = False
    consts.update(extra)
    consts.update(feats)
    return consts


def aot_configs():
    """Every entry of _GPU_CONFIGS for its arch, compiled causal with ALiBi (masked and unmasked loops, the
    most registers); plus, for the first D=128 entry of each kernel and arch, a bf16 varlen variant with a
    two-sided window and softcap, and the variant D=111 runs as (112: tile padded to 128 and masked). Then the
    descriptor forward's entries (_aot_fwd_tma)."""
    cases = []   # (arch, kernel, config, head_dim, dtype, features)
    heavy = dict(MASK_RIGHT=True, HAS_ALIBI=True)
    for arch, per_kernel in _GPU_CONFIGS.items():
        for which, per_d in per_kernel.items():
            if which in _BWD_KINDS:   # _aot_bwd
                continue
            for d_bucket, entries in per_d.items():
                cases += [(arch, which, entry, d_bucket, torch.float16, heavy) for entry in entries]
            first = per_d[128][0]
            cases.append((arch, which, first, 128, torch.bfloat16,
                          dict(MASK_LEFT=True, MASK_RIGHT=True, HAS_SOFTCAP=True, IS_VARLEN=True)))
            cases.append((arch, which, first, _padded_head_dim(111), torch.float16, dict(MASK_RIGHT=True)))
    cfgs = []
    for arch, which, (bm, bn, warps, stages), head_dim, dtype, feats in cases:
        kernel = _KERNELS[which]
        consts = _aot_consts(kernel, head_dim, bm, bn, feats)
        tag = "+".join(k.lower().replace("has_", "").replace("mask_", "") for k, v in sorted(feats.items()) if v)
        name = f"attn_{which} d{head_dim} {str(dtype)[6:]} {tag} M{bm}xN{bn} w{warps}s{stages}"
        if arch == 80:
            expect = {arch: ("mma.sync",)}
        else:
            expect = {90: ("wgmma",)}
        sig = _signature(kernel, dtype)
        cfgs.append(_utils.AotConfig(name=name, kernel=kernel, signature=sig,
                                     constexprs=consts, num_warps=warps, num_stages=stages, archs=(arch,),
                                     expect=expect, divisible=_utils.divisible_args(sig, exclude=_NOT_DIVISIBLE)))
    return cfgs + _aot_fwd_tma() + _aot_bwd() + _aot_dropout() + _aot_local()


def _aot_local():
    """Every _LOCAL_CONFIGS entry (the dK/dV kernel without atomics and the dQ kernel, with LOCAL_DELTA) for sm_80 and
    sm_90: fp16 causal + ALiBi, and bf16 with every feature and dropout."""
    every = dict(IS_VARLEN=True, MASK_LEFT=True, MASK_RIGHT=True, HAS_SOFTCAP=True, HAS_ALIBI=True, HAS_DROPOUT=True)
    cfgs = []
    for arch in (80, 90):
        for which, per_d in _LOCAL_CONFIGS.items():
            kernel = _KERNELS[which]
            for d, (bm, bn, warps, stages) in per_d.items():
                for dtype, feats in ((torch.float16, dict(MASK_RIGHT=True, HAS_ALIBI=True)), (torch.bfloat16, every)):
                    atomic = dict(ATOMIC_DQ=False) if kernel is _attn_bwd_dkdv else {}
                    consts = _aot_consts(kernel, d, bm, bn, feats, LOCAL_DELTA=True, **atomic)
                    tag = "+".join(k.lower().replace("has_", "").replace("mask_", "").replace("is_", "")
                                   for k, v in sorted(feats.items()) if v)
                    name = f"attn_{which} d{d} {str(dtype)[6:]} local_delta+{tag} M{bm}xN{bn} w{warps}s{stages}"
                    sig = _signature(kernel, dtype)
                    rows = bn if kernel is _attn_bwd_dkdv else bm   # >= 64 product rows: wgmma on sm_90
                    cfgs.append(_utils.AotConfig(name=name, kernel=kernel, signature=sig, constexprs=consts,
                                                 num_warps=warps, num_stages=stages, archs=(arch,),
                                                 expect={arch: ("mma.sync",) if arch == 80 or rows < 64
                                                         else ("wgmma",)},
                                                 divisible=_utils.divisible_args(sig, exclude=_NOT_DIVISIBLE)))
    return cfgs


def _aot_dropout():
    """Every entry of _DROPOUT_CONFIGS with dropout on, fp16 causal + ALiBi and, unless in _DROPOUT_NO_SOFTCAP,
    bf16 varlen + two-sided window + softcap (the dK/dV kernel with ATOMIC_DQ for "dkdv_dq"); every entry of
    _TMA_DROPOUT_CONFIGS with every feature on. Names carry "dropout"."""
    heavy = dict(MASK_RIGHT=True, HAS_ALIBI=True)
    capped = dict(MASK_LEFT=True, MASK_RIGHT=True, HAS_SOFTCAP=True, IS_VARLEN=True)
    cases = []   # (arch, kernel name, (BLOCK_M, BLOCK_N, warps, stages[, WARP_SPEC]), head_dim, dtype, features)
    for arch, per_kernel in _DROPOUT_CONFIGS.items():
        for which, per_d in per_kernel.items():
            for d, entries in per_d.items():
                for e in entries:
                    cases.append((arch, which, tuple(e), d, torch.float16, heavy))
                    if (arch, which, d, tuple(e)) not in _DROPOUT_NO_SOFTCAP:
                        cases.append((arch, which, tuple(e), d, torch.bfloat16, capped))
    every = dict(IS_VARLEN=True, MASK_LEFT=True, MASK_RIGHT=True, HAS_SOFTCAP=True, HAS_ALIBI=True)
    cases += [(90, "fwd_tma", e, d, torch.float16, every) for d, entries in _TMA_DROPOUT_CONFIGS.items()
              for e in entries]
    cfgs = []
    for arch, which, entry, d, dtype, feats in cases:
        bm, bn, warps, stages = entry[:4]
        kernel = _attn_fwd_tma if which == "fwd_tma" else _KERNELS[which]
        consts = _aot_consts(kernel, d, bm, bn, feats, HAS_DROPOUT=True)
        # sm_90 runs a product as wgmma when its tile has >= 64 rows (dK/dV kernel: BLOCK_N, the others: BLOCK_M)
        rows = bn if kernel is _attn_bwd_dkdv else bm
        expect = {arch: ("mma.sync",) if arch == 80 or rows < 64 else ("wgmma",)}
        if kernel is _attn_bwd_dkdv:
            consts["ATOMIC_DQ"] = which == "dkdv_dq"
        ws = entry[4] if which == "fwd_tma" else False
        if which == "fwd_tma":
            consts["WARP_SPEC"] = ws
            expect = {90: ("wgmma", "tma") + (("setmaxnreg",) if ws else ())}
        on = dict(feats, HAS_DROPOUT=True, ATOMIC_DQ=consts.get("ATOMIC_DQ", False))
        tag = "+".join(k.lower().replace("has_", "").replace("mask_", "").replace("is_", "")
                       for k, v in sorted(on.items()) if v)
        kname = "fwd_tma" if which == "fwd_tma" else which.split("_")[0]
        name = f"attn_{kname} d{d} {str(dtype)[6:]} {tag} M{bm}xN{bn} w{warps}s{stages}{' ws' if ws else ''}"
        sig = _signature(kernel, dtype)
        cfgs.append(_utils.AotConfig(name=name, kernel=kernel, signature=sig, constexprs=consts, num_warps=warps,
                                     num_stages=stages, archs=(arch,), expect=expect,
                                     divisible=_utils.divisible_args(sig, exclude=_NOT_DIVISIBLE)))
    return cfgs


def _aot_fwd_tma():
    """Every entry of _TMA_FWD_CONFIGS for sm_90 with every feature on (varlen, both window sides, softcap,
    ALiBi; the right side only in the causal lists), fp16, plus bf16 for the first entry of each list and, for
    the first D=128 entries, the variant D=111 runs as (HEAD_DIM 112 in a 128 tile: boxes wider than the view).
    Each must show TMA and wgmma (the static test also reads the wgmma shapes), and setmaxnreg with WARP_SPEC."""
    cases = []   # (config, head_dim, dtype, features)
    for d_bucket, per_causal in _TMA_FWD_CONFIGS.items():
        for causal, entries in per_causal.items():
            feats = dict(IS_VARLEN=True, MASK_LEFT=True, MASK_RIGHT=causal, HAS_SOFTCAP=True, HAS_ALIBI=True)
            cases += [(entry, d_bucket, torch.float16, feats) for entry in entries]
            cases.append((entries[0], d_bucket, torch.bfloat16, feats))
            if d_bucket == 128:
                cases.append((entries[0], _padded_head_dim(111), torch.float16, dict(MASK_RIGHT=causal)))
    cfgs = []
    sig = {dtype: _signature(_attn_fwd_tma, dtype) for dtype in (torch.float16, torch.bfloat16)}
    for (bm, bn, warps, stages, ws), head_dim, dtype, feats in cases:
        consts = _aot_consts(_attn_fwd_tma, head_dim, bm, bn, feats, WARP_SPEC=ws)
        tag = "+".join(k.lower().replace("has_", "").replace("mask_", "").replace("is_", "")
                       for k, v in sorted(feats.items()) if v)
        name = f"attn_fwd_tma d{head_dim} {str(dtype)[6:]} {tag} M{bm}xN{bn} w{warps}s{stages}{' ws' if ws else ''}"
        expect = {90: ("wgmma", "tma") + (("setmaxnreg",) if ws else ())}
        cfgs.append(_utils.AotConfig(name=name, kernel=_attn_fwd_tma, signature=sig[dtype], constexprs=consts,
                                     num_warps=warps, num_stages=stages, archs=(90,), expect=expect,
                                     divisible=_utils.divisible_args(sig[dtype], exclude=_NOT_DIVISIBLE)))
    return cfgs


def _aot_bwd():
    """Every backward entry of _GPU_CONFIGS for its arch: fp16 causal + ALiBi and, unless in _BWD_NO_SOFTCAP,
    bf16 varlen + two-sided window + softcap (the dK/dV kernel with ATOMIC_DQ for "dkdv_dq" entries, named
    "attn_dkdv ... atomic_dq"); plus, for the first D=128 entry of each list, the variant D=111 runs as (112).
    sm_90 expects wgmma, sm_80 mma.sync."""
    heavy = dict(MASK_RIGHT=True, HAS_ALIBI=True)
    capped = dict(MASK_LEFT=True, MASK_RIGHT=True, HAS_SOFTCAP=True, IS_VARLEN=True)
    cases = []   # (arch, kind, entry, head_dim, dtype, features)
    for arch, per_kernel in _GPU_CONFIGS.items():
        for which in _BWD_KINDS:
            for d_bucket, entries in per_kernel[which].items():
                for entry in entries:
                    cases.append((arch, which, entry, d_bucket, torch.float16, heavy))
                    if (arch, which, d_bucket, tuple(entry)) not in _BWD_NO_SOFTCAP:
                        cases.append((arch, which, entry, d_bucket, torch.bfloat16, capped))
            if per_kernel[which][128]:
                cases.append((arch, which, per_kernel[which][128][0], _padded_head_dim(111), torch.float16,
                              dict(MASK_RIGHT=True)))
    cfgs = []
    for arch, which, (bm, bn, warps, stages), head_dim, dtype, feats in cases:
        kernel = _KERNELS[which]
        atomic = dict(ATOMIC_DQ=which == "dkdv_dq") if kernel is _attn_bwd_dkdv else {}
        consts = _aot_consts(kernel, head_dim, bm, bn, feats, **atomic)
        on = dict(feats, ATOMIC_DQ=consts.get("ATOMIC_DQ", False))
        tag = "+".join(k.lower().replace("has_", "").replace("mask_", "") for k, v in sorted(on.items()) if v)
        name = f"attn_{which.split('_')[0]} d{head_dim} {str(dtype)[6:]} {tag} M{bm}xN{bn} w{warps}s{stages}"
        sig = _signature(kernel, dtype)
        cfgs.append(_utils.AotConfig(name=name, kernel=kernel, signature=sig, constexprs=consts, num_warps=warps,
                                     num_stages=stages, archs=(arch,), expect={arch: ("mma.sync",) if arch == 80
                                                                               else ("wgmma",)},
                                     divisible=_utils.divisible_args(sig, exclude=_NOT_DIVISIBLE)))
    return cfgs
