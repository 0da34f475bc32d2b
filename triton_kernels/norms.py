"""Fused LayerNorm / RMSNorm in Triton: forward and backward, optional residual add, one kernel family.

Every kernel serves both norms through the ``IS_RMS`` constexpr (RMSNorm: no mean, no bias).
Semantics (see transformer/norms.py): h = x (+ residual), summed in fp32;
out = (h - mean) * rstd * w + b (LayerNorm) or h * rstd * w (RMSNorm), in x's dtype;
with prenorm h is also written (fp32 when residual_in_fp32, else x's dtype). Statistics are fp32.

Kernels, chosen by the launcher from the hidden size N:
* N <= MAX_FUSED_N  ``_norm_fwd`` / ``_norm_bwd`` (backward: N <= MAX_FUSED_N_ANY_ALIGN unless every pointer is
  16-byte aligned and N and the row strides are multiples of 16): the row lives in registers, read once. Small rows
  are packed BLOCK_M to a program (a [BLOCK_M, BLOCK_N] tile). ``_norm_bwd`` is persistent: G programs walk
  the row blocks and each writes its fp32 dW/dB partial sums to row pid of a [G, N] buffer.
* N >  MAX_FUSED_N  ``_norm_fwd_looped``: one row per program (on a GPU), a statistics pass over BLOCK_N chunks
  (chunk mean/M2 merged with Chan's formula: no cancellation) then a normalise pass (the row is still in L2).
  Backward: ``_norm_bwd_row_sums`` (per-row c1 = mean(xhat * w * dy), c2 = mean(w * dy)) then
  ``_norm_bwd_looped`` on a 2-D grid (row groups x column chunks): dx, and dW/dB partials per row group.
* ``_reduce_partials`` sums the partials in a fixed order: dW/dB are deterministic, no atomics.

Gradient: with xhat = (h - mean) * rstd, g = w * dy,
  LayerNorm dh = rstd * (g - xhat * mean(xhat * g) - mean(g));  RMSNorm dh = rstd * (g - xhat * mean(xhat * g)),
plus the gradient flowing into the prenorm output h. dx = dresidual = dh (cast to each input's dtype).
Row offsets are int64 (a scalar tile base plus int32 in-tile offsets); any row stride with a contiguous last
dim. All loads upcast to fp32 at once, which also keeps bf16 correct under the Triton interpreter (its bf16
arithmetic is not the GPU's); stores convert fp32 to the output dtype, rounding to nearest even (under the
interpreter too: triton_kernels/_interpreter.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import AotConfig, divisible_args, empty, interpreting, sm_count

__all__ = ["forward", "backward", "aot_configs", "MAX_FUSED_N", "MAX_HIDDEN"]

MAX_FUSED_N = 8192      # largest hidden size kept in registers (spill-free for sm_80/sm_90, see aot_configs)
MAX_FUSED_N_ANY_ALIGN = 4096   # the backward's limit when data or strides are not 16-byte aligned (scalar loads
                               # need more address registers: the 8192 backward would spill)
MAX_HIDDEN = 65536      # largest hidden size tested; the looped kernels have no hard limit below 2**31

# Tile sizes. The GPU ones are the shipped configs (aot_configs). Under the interpreter the kernels are
# the same but each program takes more rows: its cost is per program and per op, not per element.
GPU_TILES = dict(tile=4096,          # elements per program of the single-pass kernels (BLOCK_M * BLOCK_N)
                 max_block_m=64,     # most rows per program of the single-pass kernels
                 loop_block_m=1, loop_block_n=4096,     # looped forward and backward row sums
                 bwd_block_m=2, bwd_block_n=1024,       # looped backward (2-D grid)
                 reduce_block_n=128)                    # dW/dB partial sums reduction
INTERP_TILES = dict(tile=65536, max_block_m=64, loop_block_m=64, loop_block_n=16384, bwd_block_m=64,
                    bwd_block_n=16384, reduce_block_n=16384)
LOOPED_FWD_WARPS, LOOPED_BWD_WARPS = 8, 8
REDUCE_BLOCK_G, REDUCE_WARPS = 32, 4


def _tiles():
    return INTERP_TILES if interpreting() else GPU_TILES


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------

@triton.jit
def _row_shift(X, R, stride_xm, stride_rm, r, row_mask, HAS_RES: tl.constexpr):
    """h[:, 0] of the rows r (fp32; X, R point at the rows' tile). The looped LayerNorm takes its statistics of
    h - h[:, 0]: the shifted values are O(std), so their fp32 mean is accurate to ulps of the std rather than of
    the mean (at mean 1e4, std 1 the unshifted Chan merges lose about one ulp of the mean, 1e-3: more than
    PyTorch's pairwise sum loses). The one-tile kernel uses a corrected two-pass mean instead (no extra load)."""
    shift = tl.load(X + r * stride_xm, mask=row_mask, other=0.0).to(tl.float32)
    if HAS_RES:
        shift += tl.load(R + r * stride_rm, mask=row_mask, other=0.0).to(tl.float32)
    return shift


@triton.jit
def _norm_fwd(X, R, W, B, Out, H, Mean, Rstd,
              stride_xm, stride_rm, stride_om, stride_hm,   # row strides (elements); last dim contiguous
              M, N, eps,
              IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_RES: tl.constexpr,
              STORE_H: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """BLOCK_M whole rows per program (BLOCK_N >= N). Pointers: a 64-bit scalar base for the tile's first row
    plus int32 in-tile offsets (the launcher keeps BLOCK_M * stride < 2**31)."""
    row0 = tl.program_id(0) * BLOCK_M
    r = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_mask = row0 + r < M
    col_mask = cols < N
    mask = row_mask[:, None] & col_mask[None, :]
    base = tl.cast(row0, tl.int64)
    h = tl.load(X + base * stride_xm + (r[:, None] * stride_xm + cols[None, :]), mask=mask, other=0.0)
    h = h.to(tl.float32)
    if HAS_RES:
        res = tl.load(R + base * stride_rm + (r[:, None] * stride_rm + cols[None, :]), mask=mask, other=0.0)
        h += res.to(tl.float32)
    if STORE_H:
        tl.store(H + base * stride_hm + (r[:, None] * stride_hm + cols[None, :]), h.to(H.dtype.element_ty),
                 mask=mask)
    if IS_RMS:
        xc = h
    else:   # corrected two-pass mean: the rough mean's rounding error is recovered from the O(std) residues
        shift = tl.sum(h, axis=1) / N
        h = tl.where(mask, h - shift[:, None], 0.0)
        mean_s = tl.sum(h, axis=1) / N
        xc = tl.where(mask, h - mean_s[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / N + eps)
    if not IS_RMS:
        tl.store(Mean + row0 + r, shift + mean_s, mask=row_mask)
    tl.store(Rstd + row0 + r, rstd, mask=row_mask)
    y = xc * rstd[:, None]
    if HAS_W:
        y = y * tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        y = y + tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(Out + base * stride_om + (r[:, None] * stride_om + cols[None, :]), y.to(Out.dtype.element_ty),
             mask=mask)


@triton.jit
def _norm_fwd_looped(X, R, W, B, Out, H, Mean, Rstd,
                     stride_xm, stride_rm, stride_om, stride_hm,
                     M, N, eps,
                     IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_RES: tl.constexpr,
                     STORE_H: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """BLOCK_M rows per program (1 on a GPU), in BLOCK_N chunks: statistics pass (writes h), normalise pass."""
    row0 = tl.program_id(0) * BLOCK_M
    r = tl.arange(0, BLOCK_M)
    row_mask = row0 + r < M
    base = tl.cast(row0, tl.int64)
    X += base * stride_xm
    Out += base * stride_om
    if HAS_RES:
        R += base * stride_rm
    if STORE_H:
        H += base * stride_hm
    cols = tl.arange(0, BLOCK_N)
    if IS_RMS:
        shift = tl.zeros([BLOCK_M], dtype=tl.float32)
    else:
        shift = _row_shift(X, R, stride_xm, stride_rm, r, row_mask, HAS_RES)
    mean = tl.zeros([BLOCK_M], dtype=tl.float32)   # of h - shift
    m2 = tl.zeros([BLOCK_M], dtype=tl.float32)     # sum of squared deviations (of squares for RMS)
    for start in range(0, N, BLOCK_N):
        c = start + cols
        mask = row_mask[:, None] & (c < N)[None, :]
        h = tl.load(X + (r[:, None] * stride_xm + c[None, :]), mask=mask, other=0.0).to(tl.float32)
        if HAS_RES:
            h += tl.load(R + (r[:, None] * stride_rm + c[None, :]), mask=mask, other=0.0).to(tl.float32)
        if STORE_H:
            tl.store(H + (r[:, None] * stride_hm + c[None, :]), h.to(H.dtype.element_ty), mask=mask)
        if IS_RMS:
            m2 += tl.sum(h * h, axis=1)
        else:   # Chan et al.: merge (start values, mean, m2) with this chunk's (n_b, mean_b, m2_b)
            h = tl.where(mask, h - shift[:, None], 0.0)
            n_a = start * 1.0
            n_b = tl.minimum(N - start, BLOCK_N).to(tl.float32)
            mean_b = tl.sum(h, axis=1) / n_b
            d = tl.where(mask, h - mean_b[:, None], 0.0)
            delta = mean_b - mean
            mean += delta * (n_b / (n_a + n_b))
            m2 += tl.sum(d * d, axis=1) + delta * delta * (n_a * n_b / (n_a + n_b))
    rstd = 1.0 / tl.sqrt(m2 / N + eps)
    if not IS_RMS:
        tl.store(Mean + row0 + r, shift + mean, mask=row_mask)
    tl.store(Rstd + row0 + r, rstd, mask=row_mask)
    for start in range(0, N, BLOCK_N):        # the rows were just read: this pass reads them from L2
        c = start + cols
        col_mask = c < N
        mask = row_mask[:, None] & col_mask[None, :]
        h = tl.load(X + (r[:, None] * stride_xm + c[None, :]), mask=mask, other=0.0).to(tl.float32)
        if HAS_RES:
            h += tl.load(R + (r[:, None] * stride_rm + c[None, :]), mask=mask, other=0.0).to(tl.float32)
        if IS_RMS:
            y = h * rstd[:, None]
        else:
            y = ((h - shift[:, None]) - mean[:, None]) * rstd[:, None]
        if HAS_W:
            y = y * tl.load(W + c, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        if HAS_B:
            y = y + tl.load(B + c, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(Out + (r[:, None] * stride_om + c[None, :]), y.to(Out.dtype.element_ty), mask=mask)


@triton.jit
def _norm_bwd_tile(X, R, W, DY, DH, DX, DRes, Mean, Rstd, C1, C2,
                   stride_xm, stride_rm, stride_dym, stride_dhm, stride_dxm, stride_drm,
                   row0, row_end, cols, N,
                   IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_RES: tl.constexpr, HAS_DH: tl.constexpr,
                   STORE_DRES: tl.constexpr, FUSED: tl.constexpr, BLOCK_M: tl.constexpr):
    """dx of rows row0 .. row0 + BLOCK_M (< row_end) at columns cols; returns (dy, xhat) for dW/dB.

    FUSED: the tile holds whole rows and computes c1 = mean(xhat * g), c2 = mean(g) itself; else they are
    read from C1/C2 (the row-sums kernel)."""
    r = tl.arange(0, BLOCK_M)
    rows = row0 + r
    row_mask = rows < row_end
    col_mask = cols < N
    mask = row_mask[:, None] & col_mask[None, :]
    base = tl.cast(row0, tl.int64)
    h = tl.load(X + base * stride_xm + (r[:, None] * stride_xm + cols[None, :]), mask=mask, other=0.0)
    h = h.to(tl.float32)
    if HAS_RES:
        res = tl.load(R + base * stride_rm + (r[:, None] * stride_rm + cols[None, :]), mask=mask, other=0.0)
        h += res.to(tl.float32)
    rstd = tl.load(Rstd + rows, mask=row_mask, other=0.0)[:, None]
    if IS_RMS:
        xhat = h * rstd
    else:
        mean = tl.load(Mean + rows, mask=row_mask, other=0.0)[:, None]
        xhat = tl.where(mask, (h - mean) * rstd, 0.0)
    dy = tl.load(DY + base * stride_dym + (r[:, None] * stride_dym + cols[None, :]), mask=mask, other=0.0)
    dy = dy.to(tl.float32)
    if HAS_W:   # reloaded per tile (an L1 hit) rather than held in registers across the row loop
        g = dy * tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    else:
        g = dy
    if FUSED:
        c1 = tl.sum(xhat * g, axis=1)[:, None] / N
    else:
        c1 = tl.load(C1 + rows, mask=row_mask, other=0.0)[:, None]
    if IS_RMS:
        dx = (g - xhat * c1) * rstd
    else:
        if FUSED:
            c2 = tl.sum(g, axis=1)[:, None] / N
        else:
            c2 = tl.load(C2 + rows, mask=row_mask, other=0.0)[:, None]
        dx = (g - (xhat * c1 + c2)) * rstd
    if HAS_DH:
        dh = tl.load(DH + base * stride_dhm + (r[:, None] * stride_dhm + cols[None, :]), mask=mask, other=0.0)
        dx += dh.to(tl.float32)
    tl.store(DX + base * stride_dxm + (r[:, None] * stride_dxm + cols[None, :]), dx.to(DX.dtype.element_ty),
             mask=mask)
    if STORE_DRES:
        tl.store(DRes + base * stride_drm + (r[:, None] * stride_drm + cols[None, :]),
                 dx.to(DRes.dtype.element_ty), mask=mask)
    return dy, xhat


@triton.jit
def _norm_bwd(X, R, W, DY, DH, DX, DRes, Mean, Rstd, DW_part, DB_part,
              stride_xm, stride_rm, stride_dym, stride_dhm, stride_dxm, stride_drm,
              M, N,
              IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_RES: tl.constexpr, HAS_DH: tl.constexpr,
              STORE_DRES: tl.constexpr, HAS_DW: tl.constexpr, HAS_DB: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Persistent: program pid handles row blocks pid, pid + G, ...; dW/dB partials to row pid of [G, N].

    X holds h (or x, with R = residual to add back in fp32).
    """
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    dw_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for blk in range(pid, tl.cdiv(M, BLOCK_M), tl.num_programs(0)):
        dy, xhat = _norm_bwd_tile(X, R, W, DY, DH, DX, DRes, Mean, Rstd, None, None,
                                  stride_xm, stride_rm, stride_dym, stride_dhm, stride_dxm, stride_drm,
                                  blk * BLOCK_M, M, cols, N, IS_RMS, HAS_W, HAS_RES, HAS_DH, STORE_DRES, True,
                                  BLOCK_M)
        if HAS_DW:
            dw_acc += dy * xhat
        if HAS_DB:
            db_acc += dy
    part = pid.to(tl.int64) * N + cols
    if HAS_DW:
        tl.store(DW_part + part, tl.sum(dw_acc, axis=0), mask=cols < N)
    if HAS_DB:
        tl.store(DB_part + part, tl.sum(db_acc, axis=0), mask=cols < N)


@triton.jit
def _norm_bwd_row_sums(X, R, W, DY, Mean, Rstd, C1, C2,
                       stride_xm, stride_rm, stride_dym,
                       M, N,
                       IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_RES: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Looped backward, step 1 (BLOCK_M rows per program): c1 = mean(xhat * g), c2 = mean(g), g = w * dy."""
    row0 = tl.program_id(0) * BLOCK_M
    r = tl.arange(0, BLOCK_M)
    rows = row0 + r
    row_mask = rows < M
    base = tl.cast(row0, tl.int64)
    X += base * stride_xm
    DY += base * stride_dym
    if HAS_RES:
        R += base * stride_rm
    cols = tl.arange(0, BLOCK_N)
    rstd = tl.load(Rstd + rows, mask=row_mask, other=0.0)[:, None]
    if not IS_RMS:
        mean = tl.load(Mean + rows, mask=row_mask, other=0.0)[:, None]
    acc1 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        c = start + cols
        col_mask = c < N
        mask = row_mask[:, None] & col_mask[None, :]
        h = tl.load(X + (r[:, None] * stride_xm + c[None, :]), mask=mask, other=0.0).to(tl.float32)
        if HAS_RES:
            h += tl.load(R + (r[:, None] * stride_rm + c[None, :]), mask=mask, other=0.0).to(tl.float32)
        if IS_RMS:
            xhat = h * rstd
        else:
            xhat = tl.where(mask, (h - mean) * rstd, 0.0)
        g = tl.load(DY + (r[:, None] * stride_dym + c[None, :]), mask=mask, other=0.0).to(tl.float32)
        if HAS_W:
            g = g * tl.load(W + c, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        acc1 += xhat * g
        if not IS_RMS:
            acc2 += g
    tl.store(C1 + rows, tl.sum(acc1, axis=1) / N, mask=row_mask)
    if not IS_RMS:
        tl.store(C2 + rows, tl.sum(acc2, axis=1) / N, mask=row_mask)


@triton.jit
def _norm_bwd_looped(X, R, W, DY, DH, DX, DRes, Mean, Rstd, C1, C2, DW_part, DB_part,
                     stride_xm, stride_rm, stride_dym, stride_dhm, stride_dxm, stride_drm,
                     M, N, rows_per_group,          # program (i, j): rows [i*rows_per_group, ...), chunk j
                     IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_RES: tl.constexpr, HAS_DH: tl.constexpr,
                     STORE_DRES: tl.constexpr, HAS_DW: tl.constexpr, HAS_DB: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Looped backward, step 2: dx for a [rows_per_group, BLOCK_N] slab; dW/dB partials to row i of [groups, N]."""
    pid_m = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    dw_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    row_start = pid_m * rows_per_group
    row_end = tl.minimum(row_start + rows_per_group, M)
    for row0 in range(row_start, row_end, BLOCK_M):
        dy, xhat = _norm_bwd_tile(X, R, W, DY, DH, DX, DRes, Mean, Rstd, C1, C2,
                                  stride_xm, stride_rm, stride_dym, stride_dhm, stride_dxm, stride_drm,
                                  row0, row_end, cols, N, IS_RMS, HAS_W, HAS_RES, HAS_DH, STORE_DRES, False,
                                  BLOCK_M)
        if HAS_DW:
            dw_acc += dy * xhat
        if HAS_DB:
            db_acc += dy
    part = pid_m.to(tl.int64) * N + cols
    if HAS_DW:
        tl.store(DW_part + part, tl.sum(dw_acc, axis=0), mask=cols < N)
    if HAS_DB:
        tl.store(DB_part + part, tl.sum(db_acc, axis=0), mask=cols < N)


@triton.jit
def _reduce_partials(PW, PB, DW, DB, G, N,
                     HAS_DW: tl.constexpr, HAS_DB: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr):
    """dW[n] = sum_g PW[g, n] (and dB) in a fixed order: deterministic. PW/PB are [G, N] fp32."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    acc_w = tl.zeros([BLOCK_G, BLOCK_N], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_G, BLOCK_N], dtype=tl.float32)
    for g0 in range(0, G, BLOCK_G):
        g = g0 + tl.arange(0, BLOCK_G)
        mask = (g < G)[:, None] & col_mask[None, :]
        offs = g.to(tl.int64)[:, None] * N + cols[None, :]
        if HAS_DW:
            acc_w += tl.load(PW + offs, mask=mask, other=0.0)
        if HAS_DB:
            acc_b += tl.load(PB + offs, mask=mask, other=0.0)
    if HAS_DW:
        tl.store(DW + cols, tl.sum(acc_w, axis=0).to(DW.dtype.element_ty), mask=col_mask)
    if HAS_DB:
        tl.store(DB + cols, tl.sum(acc_b, axis=0).to(DB.dtype.element_ty), mask=col_mask)


# ---------------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------------

def _fused_config(n, m, tiles=None, backward=False):
    """(BLOCK_M, BLOCK_N, num_warps) of the single-pass kernels for hidden size n (<= MAX_FUSED_N), m rows.
    About 16 elements per thread forward; the backward (more live tiles) takes half the rows and 8 per thread;
    at most 16 warps."""
    t = tiles or _tiles()
    tile, per_thread = (t["tile"] // 2, 8) if backward else (t["tile"], 16)
    block_n = triton.next_power_of_2(n)
    block_m = max(1, min(t["max_block_m"], tile // block_n, triton.next_power_of_2(max(m, 1))))
    num_warps = min(16, max(1, block_m * block_n // (32 * per_thread)))
    return block_m, block_n, num_warps


def _fit_rows(block_m, n, *tensors):
    """block_m, or 1 if the int32 in-tile offsets (row * stride + col) could overflow for these row strides."""
    widest = max([n] + [abs(t.stride(0)) for t in tensors if t is not None and t.dim() == 2])
    return block_m if block_m * widest < 2 ** 31 else 1


def _aligned(n, *tensors):
    """True when Triton will specialise every pointer as 16-byte aligned and n and every row stride as divisible
    by 16 (vector loads: fewer address registers)."""
    return n % 16 == 0 and all(t.data_ptr() % 16 == 0 and (t.dim() < 2 or t.stride(0) % 16 == 0)
                               for t in tensors if t is not None)


def _looped_config(m, kind):
    """(BLOCK_M, BLOCK_N) of the looped kernels: kind "loop" (forward, row sums) or "bwd" (2-D backward)."""
    t = _tiles()
    return min(t[f"{kind}_block_m"], triton.next_power_of_2(max(m, 1))), t[f"{kind}_block_n"]


def _programs(device, per_sm):
    """How many persistent programs to launch: per_sm per SM on a GPU; a few under the interpreter."""
    if device.type != "cuda":
        return 4
    return sm_count(device) * per_sm


def _rows(t, n):
    """t [..., n] as a 2-D [M, n] view with a contiguous last dim (a copy only if no such view exists)."""
    t2 = t.reshape(-1, n)
    if n > 1 and t2.stride(1) != 1:
        t2 = t2.contiguous()
    return t2


def _stride(t):
    return 0 if t is None else t.stride(0)


class _on_device:
    """Launch on the tensor's GPU (Triton launches on the current device)."""

    def __init__(self, device):
        self.ctx = torch.cuda.device(device) if device.type == "cuda" else None

    def __enter__(self):
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)


# ---------------------------------------------------------------------------------------------
# Launchers: check, allocate, pick a config, launch
# ---------------------------------------------------------------------------------------------

def forward(x, weight, bias, residual, eps, is_rms, store_h, residual_in_fp32):
    """Returns out [x.shape], h [x.shape] (or [0]), mean [x.shape[:-1]] (or [0] for RMS), rstd [x.shape[:-1]]."""
    n = x.shape[-1]
    dev = x.device
    x2 = _rows(x, n)
    m = x2.shape[0]
    r2 = None if residual is None else _rows(residual, n)
    out = empty((m, n), x.dtype, dev)
    h = empty((m, n) if store_h else (0,), torch.float32 if residual_in_fp32 else x.dtype, dev)
    mean = empty((0,) if is_rms else (m,), torch.float32, dev)
    rstd = empty((m,), torch.float32, dev)
    if m > 0:
        args = (x2, r2, weight, bias, out, h if store_h else None, None if is_rms else mean, rstd,
                x2.stride(0), _stride(r2), out.stride(0), h.stride(0) if store_h else 0, m, n, eps)
        flags = dict(IS_RMS=is_rms, HAS_W=weight is not None, HAS_B=bias is not None, HAS_RES=r2 is not None,
                     STORE_H=store_h)
        with _on_device(dev):
            if n <= MAX_FUSED_N:
                block_m, block_n, warps = _fused_config(n, m)
                block_m = _fit_rows(block_m, n, x2, r2, h)
                _norm_fwd[(triton.cdiv(m, block_m),)](*args, **flags, BLOCK_M=block_m, BLOCK_N=block_n,
                                                      num_warps=warps)
            else:
                block_m, block_n = _looped_config(m, "loop")
                block_m = _fit_rows(block_m, n, x2, r2, h)
                _norm_fwd_looped[(triton.cdiv(m, block_m),)](*args, **flags, BLOCK_M=block_m, BLOCK_N=block_n,
                                                             num_warps=LOOPED_FWD_WARPS)
    lead = x.shape[:-1]
    return (out.view(x.shape), h.view(x.shape) if store_h else h,
            mean if is_rms else mean.view(lead), rstd.view(lead))


def _reduce(pw, pb, dw_dtype, db_dtype, n, dev):
    """Deterministic column sums of the [G, N] fp32 partials into dW / dB."""
    dw = empty((n,) if pw is not None else (0,), dw_dtype or torch.float32, dev)
    db = empty((n,) if pb is not None else (0,), db_dtype or torch.float32, dev)
    if pw is None and pb is None:
        return dw, db
    g = (pw if pw is not None else pb).shape[0]
    block_n = _tiles()["reduce_block_n"]
    _reduce_partials[(triton.cdiv(n, block_n),)](
        pw, pb, dw if pw is not None else None, db if pb is not None else None, g, n,
        HAS_DW=pw is not None, HAS_DB=pb is not None, BLOCK_G=REDUCE_BLOCK_G, BLOCK_N=block_n,
        num_warps=REDUCE_WARPS)
    return dw, db


def backward(dy, dh, x, residual, weight, mean, rstd, is_rms, dx_dtype, dres_dtype, dw_dtype, db_dtype):
    """Returns dx [x.shape] (dx_dtype), dres (dres_dtype, or [0] when None), dw, db ([0] when not asked).

    x is h, or x with residual to add back; mean/rstd come from the forward. dh: gradient of the prenorm h.
    """
    n = x.shape[-1]
    dev = x.device
    x2 = _rows(x, n)
    m = x2.shape[0]
    r2 = None if residual is None else _rows(residual, n)
    dy2 = _rows(dy, n)
    dh2 = None if dh is None else _rows(dh, n)
    dx = empty((m, n), dx_dtype, dev)
    dres = empty((m, n) if dres_dtype is not None else (0,), dres_dtype or dx_dtype, dev)
    need_dw, need_db = dw_dtype is not None, db_dtype is not None
    if m == 0:
        dw = torch.zeros((n,) if need_dw else (0,), dtype=dw_dtype or torch.float32, device=dev)
        db = torch.zeros((n,) if need_db else (0,), dtype=db_dtype or torch.float32, device=dev)
        return dx.view(x.shape), dres.view(x.shape) if dres_dtype is not None else dres, dw, db
    flags = dict(IS_RMS=is_rms, HAS_W=weight is not None, HAS_RES=r2 is not None, HAS_DH=dh2 is not None,
                 STORE_DRES=dres_dtype is not None, HAS_DW=need_dw, HAS_DB=need_db)
    strides = (x2.stride(0), _stride(r2), dy2.stride(0), _stride(dh2), dx.stride(0),
               dres.stride(0) if dres_dtype is not None else 0)
    mean_arg = None if is_rms else mean
    dres_arg = dres if dres_dtype is not None else None
    with _on_device(dev):
        fused_limit = MAX_FUSED_N if _aligned(n, x2, r2, dy2, dh2, dx, dres_arg, weight) else MAX_FUSED_N_ANY_ALIGN
        if n <= fused_limit:
            block_m, block_n, warps = _fused_config(n, m, backward=True)
            block_m = _fit_rows(block_m, n, x2, r2, dy2, dh2, dres)
            g = min(triton.cdiv(m, block_m), _programs(dev, max(1, 16 // warps)))
            pw = empty((g, n), torch.float32, dev) if need_dw else None
            pb = empty((g, n), torch.float32, dev) if need_db else None
            _norm_bwd[(g,)](x2, r2, weight, dy2, dh2, dx, dres_arg, mean_arg, rstd, pw, pb, *strides, m, n,
                            **flags, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)
        else:
            c = empty((2, m), torch.float32, dev)
            block_m, block_n = _looped_config(m, "loop")
            block_m = _fit_rows(block_m, n, x2, r2, dy2)
            _norm_bwd_row_sums[(triton.cdiv(m, block_m),)](
                x2, r2, weight, dy2, mean_arg, rstd, c[0], c[1], x2.stride(0), _stride(r2), dy2.stride(0), m, n,
                IS_RMS=is_rms, HAS_W=weight is not None, HAS_RES=r2 is not None, BLOCK_M=block_m,
                BLOCK_N=block_n, num_warps=LOOPED_FWD_WARPS)
            # 2-D grid: enough (row group, column chunk) programs to fill the GPU; dW/dB partials per row group
            block_m, block_n = _looped_config(m, "bwd")
            block_m = _fit_rows(block_m, n, x2, r2, dy2, dh2, dres)
            col_blocks = triton.cdiv(n, block_n)
            want = triton.cdiv(_programs(dev, 8), col_blocks) if dev.type == "cuda" else 3
            groups = max(1, min(triton.cdiv(m, block_m), want))
            rows_per_group = triton.cdiv(triton.cdiv(m, groups), block_m) * block_m
            groups = triton.cdiv(m, rows_per_group)
            pw = empty((groups, n), torch.float32, dev) if need_dw else None
            pb = empty((groups, n), torch.float32, dev) if need_db else None
            _norm_bwd_looped[(groups, col_blocks)](
                x2, r2, weight, dy2, dh2, dx, dres_arg, mean_arg, rstd, c[0], None if is_rms else c[1], pw, pb,
                *strides, m, n, rows_per_group, **flags, BLOCK_M=block_m, BLOCK_N=block_n,
                num_warps=LOOPED_BWD_WARPS)
        dw, db = _reduce(pw, pb, dw_dtype, db_dtype, n, dev)
    return dx.view(x.shape), dres.view(x.shape) if dres_dtype is not None else dres, dw, db


# ---------------------------------------------------------------------------------------------
# Shipped configurations, for the static report (benchmarks/kernel_report.py)
# ---------------------------------------------------------------------------------------------

_TYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_ACT_PTRS = ("X", "R", "Out", "DY", "DX", "DRes", "DW", "DB")        # activations (and dW/dB) in the x dtype
_FP32_PTRS = ("Mean", "Rstd", "C1", "C2", "DW_part", "DB_part", "PW", "PB", "H", "DH", "W", "B")


def _signature(kernel, dtype):
    """Triton signature of a kernel: activations in dtype; fp32 weight/bias (mixed), statistics, h, partials."""
    sig = {}
    for name in kernel.arg_names:
        if name in _ACT_PTRS:
            sig[name] = f"*{_TYPE[dtype]}"
        elif name in _FP32_PTRS:
            sig[name] = "*fp32"
        elif name == "eps":
            sig[name] = "fp32"
        elif name.isupper() and name not in ("M", "N", "G"):
            sig[name] = "constexpr"
        else:
            sig[name] = "i32"
    return sig


def aot_configs():
    """The shipped GPU configs, every feature on (the most live registers; weight, bias, h, dh in fp32):
    fused forward/backward (bf16 LayerNorm: every power-of-two BLOCK_N up to MAX_FUSED_N with its many-rows
    tile; RMSNorm, fp16, fp32: several sizes), the looped kernels, the dW/dB reduction. Configs named "[aligned]" run only for 16-byte aligned data and
    strides divisible by 16 (which Triton specialises on); the others run for any alignment."""
    large_m = 1 << 20
    lm, ln_ = GPU_TILES["loop_block_m"], GPU_TILES["loop_block_n"]
    bwd_m, bwd_n, red_n = GPU_TILES["bwd_block_m"], GPU_TILES["bwd_block_n"], GPU_TILES["reduce_block_n"]
    cases = []    # (name, kernel, dtype, constexprs, num_warps)
    for dtype, is_rms in ((torch.bfloat16, False), (torch.bfloat16, True), (torch.float16, False),
                          (torch.float32, False)):
        tag = f"{'rms' if is_rms else 'ln'} {_TYPE[dtype]}"
        fwd = dict(IS_RMS=is_rms, HAS_W=True, HAS_B=not is_rms, HAS_RES=True, STORE_H=True)
        bwd = dict(IS_RMS=is_rms, HAS_W=True, HAS_RES=True, HAS_DH=True, STORE_DRES=True, HAS_DW=True,
                   HAS_DB=not is_rms)
        if dtype == torch.bfloat16 and not is_rms:      # every BLOCK_N the launcher can pick
            sizes = tuple(2 ** i for i in range(MAX_FUSED_N.bit_length()))
        elif is_rms:
            sizes = (1, 128, 1024, MAX_FUSED_N_ANY_ALIGN, MAX_FUSED_N)
        else:
            sizes = (1024, MAX_FUSED_N)
        for n in sizes:
            bm, bn, warps = _fused_config(n, large_m, GPU_TILES)
            cases.append((f"norm_fwd {tag} M{bm}xN{bn} w{warps}", _norm_fwd, dtype,
                          {**fwd, "BLOCK_M": bm, "BLOCK_N": bn}, warps))
            bm, bn, warps = _fused_config(n, large_m, GPU_TILES, backward=True)
            aligned = " [aligned]" if n > MAX_FUSED_N_ANY_ALIGN else ""
            cases.append((f"norm_bwd {tag} M{bm}xN{bn} w{warps}{aligned}", _norm_bwd, dtype,
                          {**bwd, "BLOCK_M": bm, "BLOCK_N": bn}, warps))
        cases.append((f"norm_fwd_looped {tag} M{lm}xN{ln_} w{LOOPED_FWD_WARPS}", _norm_fwd_looped, dtype,
                      {**fwd, "BLOCK_M": lm, "BLOCK_N": ln_}, LOOPED_FWD_WARPS))
        cases.append((f"norm_bwd_row_sums {tag} M{lm}xN{ln_} w{LOOPED_FWD_WARPS}", _norm_bwd_row_sums, dtype,
                      dict(IS_RMS=is_rms, HAS_W=True, HAS_RES=True, BLOCK_M=lm, BLOCK_N=ln_), LOOPED_FWD_WARPS))
        cases.append((f"norm_bwd_looped {tag} M{bwd_m}xN{bwd_n} w{LOOPED_BWD_WARPS}", _norm_bwd_looped, dtype,
                      {**bwd, "BLOCK_M": bwd_m, "BLOCK_N": bwd_n}, LOOPED_BWD_WARPS))
    for dtype in (torch.bfloat16, torch.float32):
        cases.append((f"reduce_partials {_TYPE[dtype]} G{REDUCE_BLOCK_G}xN{red_n} w{REDUCE_WARPS}", _reduce_partials,
                      dtype, dict(HAS_DW=True, HAS_DB=True, BLOCK_G=REDUCE_BLOCK_G, BLOCK_N=red_n),
                      REDUCE_WARPS))
    # "[aligned]" configs only run on 16-byte aligned data with N and strides divisible by 16.
    cfgs = []
    for name, kernel, dtype, consts, warps in cases:
        sig = _signature(kernel, dtype)
        div = divisible_args(sig, include=("N",)) if "[aligned]" in name else ()
        cfgs.append(AotConfig(name=name, kernel=kernel, signature=sig, constexprs=consts, num_warps=warps,
                              num_stages=1, divisible=div))
    return cfgs
