"""Flash attention in Triton: configs and launchers (forward, backward), and the shipped configs.

Kernels live in attention_fwd.py (forward + shared helpers) and attention_bwd.py (backward). This file:

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
import torch
import triton

from . import _utils
from ._utils import LOG2E
from .attention_bwd import _attn_bwd_dkdv, _attn_bwd_dq, _attn_bwd_preprocess, _zero_tail
from .attention_fwd import _attn_fwd

__all__ = ["forward", "backward", "aot_configs"]

# ---------------------------------------------------------------------------------------------
# Configs: (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel, GPU arch and padded head dim.
# BLOCK_M is the query tile, BLOCK_N the key tile in every kernel. Every entry is compiled by the
# static report (tests/test_attention_static.py) in its most register-hungry variant (causal + ALiBi):
# 0 spills, smem within the arch limit, wgmma on sm_90 (except _NO_WGMMA). Entries were chosen by that
# AOT sweep (triton 3.8); larger tiles (e.g. dK/dV with 64+ keys at D=256) spill and are left out. Triton 3.6
# (also supported) spills in some first entries (fwd d128 and dK/dV d64 on sm_90, dK/dV d64 on sm_80); each such
# list also holds an entry that is spill-free with both versions, for the autotuner to fall back on.
# ---------------------------------------------------------------------------------------------

_GPU_CONFIGS = {
    90: {  # H100/H200: 227 KB smem per block
        "fwd": {64: [(128, 128, 8, 3)],
                128: [(128, 128, 8, 3), (128, 64, 8, 3)],
                256: [(64, 32, 8, 2)]},
        "dkdv": {64: [(32, 128, 8, 2), (32, 64, 8, 2)],   # the first spills 88 B with triton 3.6, the second not
                 128: [(16, 64, 8, 2), (32, 64, 8, 1)],   # (32, 64, 8, 2+) spills
                 256: [(32, 32, 8, 2)]},
        "dq": {64: [(128, 64, 8, 3)],
               128: [(128, 64, 8, 2)],
               256: [(64, 32, 8, 2)]},
    },
    80: {  # A100 and any other arch (163 KB smem; the autotuner drops a config a smaller GPU cannot hold)
        "fwd": {64: [(128, 64, 8, 3), (64, 64, 8, 3)],
                128: [(64, 64, 8, 2)],
                256: [(64, 64, 8, 2)]},
        "dkdv": {64: [(32, 64, 8, 2), (32, 32, 4, 2)],   # the first spills 208 B with triton 3.6, the second not
                 128: [(16, 32, 4, 2)],    # (32, 64, 8, 2) spills 88 B with softcap + window + varlen
                 256: [(16, 64, 8, 1)]},
        "dq": {64: [(128, 64, 8, 2)],
               128: [(64, 64, 8, 2)],
               256: [(32, 32, 8, 1)]},
    },
}
# dK/dV at D=256 on sm_90: a 32-key tile is below wgmma's 64-row minimum (mma.sync), but every wgmma-sized
# tile spills (64 keys: 240+ bytes).
_NO_WGMMA = {(90, "dkdv", 256)}
# Under the interpreter: one config; BLOCK_M != BLOCK_N so tests exercise both tile sizes.
_INTERPRET_CONFIG = {"fwd": (64, 32, 4, 1), "dkdv": (32, 64, 4, 1), "dq": (64, 32, 4, 1)}
_KERNELS = {"fwd": _attn_fwd, "dkdv": _attn_bwd_dkdv, "dq": _attn_bwd_dq}
_TUNE_KEYS = ["tune_key", "GROUP", "HEAD_DIM", "IS_VARLEN", "BOTTOM_RIGHT", "MASK_LEFT", "MASK_RIGHT",
              "HAS_SOFTCAP", "HAS_ALIBI"]


def _block_d(head_dim):
    return max(16, triton.next_power_of_2(head_dim))


def _d_bucket(block_d):
    return 64 if block_d <= 64 else block_d


def _arch(device):
    major, _ = torch.cuda.get_device_capability(device)
    return 90 if major == 9 else 80


@functools.lru_cache(maxsize=None)
def _tuned(which, arch, d_bucket):
    """The autotuned kernel for one (kernel, arch, head-dim bucket); a single config when interpreting."""
    if arch is None:
        entries = [_INTERPRET_CONFIG[which]]
    else:
        entries = _GPU_CONFIGS[arch][which][d_bucket]
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in entries]
    return triton.autotune(configs=configs, key=_TUNE_KEYS)(_KERNELS[which])


def _kernel(which, device, block_d):
    arch = None if _utils.interpreting() else _arch(device)
    return _tuned(which, arch, _d_bucket(block_d))


def _tune_key(max_q, max_k):
    """Length bucket for the autotune cache: log2 of each max length (retune per power of two, not per length)."""
    return max(max_q, 1).bit_length() * 64 + max(max_k, 1).bit_length()


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


def _common(q, k, alibi, cu_q, cu_k, max_q, max_k, scale, left, right, softcap, bottom_right):
    """(Alibi, CuQ, CuK), keyword arguments and constexprs shared by the forward, dK/dV and dQ kernels."""
    varlen = cu_q is not None
    head_dim = q.shape[-1]
    dummy = q  # stands in for absent optional pointers (never dereferenced)
    ptrs = (alibi if alibi is not None else dummy, cu_q if varlen else dummy, cu_k if varlen else dummy)
    sa = _alibi_strides(alibi)
    args = dict(stride_ab=sa[0], stride_ah=sa[1], Nq=max_q, Nk=max_k)
    if softcap > 0:
        args.update(qk_scale=scale / softcap, softcap2=softcap * LOG2E)
    else:
        args.update(qk_scale=scale * LOG2E, softcap2=0.0)
    args.update(win_left=max(left, 0), win_right=max(right, 0), tune_key=_tune_key(max_q, max_k))
    consts = dict(GROUP=q.shape[-2] // k.shape[-2], HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim),
                  IS_VARLEN=varlen, BOTTOM_RIGHT=bool(bottom_right), MASK_LEFT=left >= 0, MASK_RIGHT=right >= 0,
                  HAS_SOFTCAP=softcap > 0, HAS_ALIBI=alibi is not None,
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


def forward(q, k, v, alibi, cu_q, cu_k, max_q, max_k, scale, left, right, softcap, bottom_right):
    """(out like q, contiguous; lse fp32 [B, Hq, Nq] or [Hq, total_q], natural log).

    q [B, Nq, Hq, D] (varlen: [Tq, Hq, D] with int32 cu_q / cu_k [B + 1]), k / v [B, Nk, Hkv, D]; fp16/bf16
    with a contiguous last dim; left / right: window sizes (-1 unbounded; causal is right = 0); scale: the
    softmax scale; softcap 0 = off; bottom_right: the alignment of windows and ALiBi distances."""
    head_dim, padded = q.shape[-1], _padded_head_dim(q.shape[-1])
    if padded != head_dim:   # zero columns change no score and give zero output columns
        out, lse = forward(_pad(q, padded), _pad(k, padded), _pad(v, padded), alibi, cu_q, cu_k, max_q, max_k,
                            scale, left, right, softcap, bottom_right)
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
    ptrs, args, consts = _common(q, k, alibi, cu_q, cu_k, max_q, max_k, scale, left, right, softcap, bottom_right)
    sq, sk, sv, so = (_seq_strides(t, varlen) for t in (q, k, v, out))
    kernel = _kernel("fwd", q.device, consts["BLOCK_D"])
    grid = lambda meta: (triton.cdiv(max_q, meta["BLOCK_M"]), hq, batch)  # noqa: E731
    kernel[grid](q, k, v, out, lse, *ptrs, *sq, *sk, *sv, *so, *_lse_strides(lse, varlen), **args, **consts)
    return out, lse


def backward(dout, q, k, v, out, lse, dlse, alibi, cu_q, cu_k, max_q, max_k, scale, left, right, softcap,
              bottom_right):
    """(dq, dk, dv), contiguous, shaped like q, k, v, from dout (and dlse, the gradient of lse, or None)."""
    head_dim, padded = q.shape[-1], _padded_head_dim(q.shape[-1])
    if padded != head_dim:   # see _forward
        grads = backward(_pad(dout, padded), _pad(q, padded), _pad(k, padded), _pad(v, padded), _pad(out, padded),
                          lse, dlse, alibi, cu_q, cu_k, max_q, max_k, scale, left, right, softcap, bottom_right)
        return tuple(g[..., :head_dim].contiguous() for g in grads)
    varlen = cu_q is not None
    if varlen:
        cu_q, cu_k = _safe_cu(cu_q, q.shape[0]), _safe_cu(cu_k, k.shape[0])
    batch, hq, hkv = _grid_dims(q, k, cu_q, max_q, max_k)
    dq = _utils.empty(q.shape, q.dtype, q.device)
    dk = _utils.empty(k.shape, k.dtype, k.device)
    dv = _utils.empty(v.shape, v.dtype, v.device)
    if varlen:
        _zero_varlen_tail(dq, None, None, cu_q, q.shape[0])
        _zero_varlen_tail(dk, dv, None, cu_k, k.shape[0])
    if batch == 0 or q.numel() == 0 or k.numel() == 0:   # nothing to attend: every gradient is 0
        for t in (dq, dk, dv):
            t.zero_()
        return dq, dk, dv
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    if dlse is not None and dlse.dtype != torch.float32:
        dlse = dlse.float()
    head_dim = q.shape[-1]
    block_d = _block_d(head_dim)
    delta = _utils.empty(lse.shape, torch.float32, q.device)
    sl, sdo = _lse_strides(lse, varlen), _seq_strides(dout, varlen)
    if max_q > 0:
        block_pre = 64
        _attn_bwd_preprocess[(triton.cdiv(max_q, block_pre), hq, batch)](
            out, dout, dlse if dlse is not None else lse, delta, cu_q if varlen else lse,
            *_seq_strides(out, varlen), *sdo, *sl,
            *(_lse_strides(dlse, varlen) if dlse is not None else (0, 0, 0)), max_q,
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=block_pre, IS_VARLEN=varlen, HAS_DLSE=dlse is not None)
    ptrs, args, consts = _common(q, k, alibi, cu_q, cu_k, max_q, max_k, scale, left, right, softcap, bottom_right)
    args["sm_scale"] = scale
    sq, sk, sv = (_seq_strides(t, varlen) for t in (q, k, v))
    if max_k > 0:
        kernel = _kernel("dkdv", q.device, block_d)
        grid = lambda meta: (triton.cdiv(max_k, meta["BLOCK_N"]), hkv, batch)  # noqa: E731
        kernel[grid](q, k, v, dout, lse, delta, dk, dv, *ptrs, *sq, *sk, *sv, *sdo, *_seq_strides(dk, varlen),
                     *_seq_strides(dv, varlen), *sl, **args, **consts)
    if max_q > 0:
        kernel = _kernel("dq", q.device, block_d)
        grid = lambda meta: (triton.cdiv(max_q, meta["BLOCK_M"]), hq, batch)  # noqa: E731
        kernel[grid](q, k, v, dout, lse, delta, dq, *ptrs, *sq, *sk, *sv, *sdo, *_seq_strides(dq, varlen), *sl,
                     **args, **consts)
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------
# Shipped configs for the static report (AOT compile for sm_80 / sm_90, no GPU needed)
# ---------------------------------------------------------------------------------------------

_PTR_ARGS = {"Q", "K", "V", "Out", "DO", "DQ", "DK", "DV"}
_FP32_PTR_ARGS = {"Lse", "Delta", "Alibi"}
_FLOAT_ARGS = {"qk_scale", "softcap2", "sm_scale"}


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
        elif name in _FLOAT_ARGS:
            sig[name] = "fp32"
        elif name.isupper() or name == "UPCAST":
            sig[name] = "constexpr"
        else:
            sig[name] = "i32"
    return sig


# Strides the launcher does not guarantee to be multiples of 16 (ALiBi slopes rows, lse rows).
_NOT_DIVISIBLE = ("stride_ab", "stride_ah", "stride_lm", "stride_glm", "stride_glb", "stride_glh")


def aot_configs():
    """Every entry of _GPU_CONFIGS for its arch, compiled causal with ALiBi (masked and unmasked loops, the
    most registers); plus, for the first D=128 entry of each kernel and arch, a bf16 varlen variant with a
    two-sided window and softcap, and the variant D=111 runs as (112: tile padded to 128 and masked)."""
    cases = []   # (arch, kernel, config, head_dim, dtype, features)
    heavy = dict(MASK_RIGHT=True, HAS_ALIBI=True)
    for arch, per_kernel in _GPU_CONFIGS.items():
        for which, per_d in per_kernel.items():
            for d_bucket, entries in per_d.items():
                cases += [(arch, which, entry, d_bucket, torch.float16, heavy) for entry in entries]
            first = per_d[128][0]
            cases.append((arch, which, first, 128, torch.bfloat16,
                          dict(MASK_LEFT=True, MASK_RIGHT=True, HAS_SOFTCAP=True, IS_VARLEN=True)))
            cases.append((arch, which, first, _padded_head_dim(111), torch.float16, dict(MASK_RIGHT=True)))
    cfgs = []
    for arch, which, (bm, bn, warps, stages), head_dim, dtype, feats in cases:
        consts = dict(GROUP=2, HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), BLOCK_M=bm, BLOCK_N=bn,
                      IS_VARLEN=False, BOTTOM_RIGHT=True, MASK_LEFT=False, MASK_RIGHT=False, HAS_SOFTCAP=False,
                      HAS_ALIBI=False, UPCAST=False)
        consts.update(feats)
        tag = "+".join(k.lower().replace("has_", "").replace("mask_", "") for k, v in sorted(feats.items()) if v)
        name = f"attn_{which} d{head_dim} {str(dtype)[6:]} {tag} M{bm}xN{bn} w{warps}s{stages}"
        kernel = _KERNELS[which]
        if arch == 80 or (arch, which, _d_bucket(_block_d(head_dim))) in _NO_WGMMA:
            expect = {arch: ("mma.sync",)}
        else:
            expect = {90: ("wgmma",)}
        sig = _signature(kernel, dtype)
        cfgs.append(_utils.AotConfig(name=name, kernel=kernel, signature=sig,
                                     constexprs=consts, num_warps=warps, num_stages=stages, archs=(arch,),
                                     expect=expect, divisible=_utils.divisible_args(sig, exclude=_NOT_DIVISIBLE)))
    return cfgs
