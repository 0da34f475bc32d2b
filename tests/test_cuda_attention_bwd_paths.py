"""The two backward paths of the CUDA C++ flash attention (csrc/attention/bwd.cuh), against the fp32 reference.

* ``deterministic=False`` (the default): attn_bwd_dkdvdq_kernel, one block per key tile (and column slice)
  computing S^T, P^T, dP^T, dS^T once per (query tile, key tile) pair, dK and dV in registers and dQ with fp32
  atomicAdd into a zeroed fp32 accumulator, then a convert kernel: 5 matrix products per tile pair;
* ``deterministic=True``: the dK/dV kernel and a separate dQ kernel (7 products), no atomics: bit-identical
  gradients from run to run and across the emulator's schedules.

Both are checked by the flash-attn rule (helpers.assert_close: the kernel's max error against the fp32 reference
at most 3x that of the reference computed in the inputs' dtype) over odd sizes (1, 113, 239), GQA groups 1, 4
and 5, head dims 40, 64, 111, 128, 256, causal either alignment, windows, ALiBi, softcap, dlse and varlen, both
dtypes; outputs are NaN-poisoned and every global access is bounds-checked (conftest), so an element a path
forgets to write, or an access outside the call's tensors, fails. Under the emulator the blocks of a launch run
in a random order per seed (csrc/common/emu.h), so the atomic adds of different blocks land in different orders;
the tests run both paths under several schedules. The executed tensor-core work is counted by the emulator's
mma counter: 5 products per tile pair on the default path, 7 on the deterministic one. Larger grids run under
``-m slow``.
"""
from __future__ import annotations

import itertools

import pytest
import torch

import transformer
from transformer import reference

import helpers

CUDA = helpers.kernel_backends("cuda")
FP16, BF16 = torch.float16, torch.bfloat16
MODES = [pytest.param(False, id="atomic"), pytest.param(True, id="deterministic")]


@pytest.fixture(autouse=True)
def _bounds_checked(monkeypatch):
    monkeypatch.setenv("TILEFORMER_EMU_CHECK_BOUNDS", "1")


def _emu_ops():
    """The emulated extension's ops (schedule control, mma counter); skips on a GPU machine."""
    if helpers.HAS_GPU:
        pytest.skip("emulator schedules and counters: CPU tensors through transformer._C_emu only")
    from transformer import _cuda
    return _cuda.ops(torch.device("cpu"))


_inputs, _alibi, _compare = helpers.attn_inputs, helpers.alibi_slopes, helpers.compare_grads


def _check_dense(q, k, v, **kw):
    return helpers.check_attention_grads("cuda", q, k, v, **kw)


# ---------------------------------------------------------------------------------------------
# Dense: odd sizes x features x dtypes, both paths (the padded-batch, varlen and fully-masked-row tests of both
# paths are test_attention_bwd_paths.py's, run on both kernel backends)
# ---------------------------------------------------------------------------------------------

# (b, nq, nk, (hq, hkv), d, dtype, causal, align, window, softcap, alibi, lse_grad)
CASES = [
    (1, 1, 239, (4, 1), 64, FP16, True, "bottom_right", (-1, -1), 0.0, None, False),
    (1, 113, 239, (5, 1), 40, BF16, False, "bottom_right", (-1, -1), 0.0, None, True),
    (2, 239, 113, (8, 2), 111, FP16, True, "bottom_right", (-1, -1), 0.0, "h", False),   # rows that see no key
    (1, 113, 113, (2, 2), 111, BF16, False, "bottom_right", (30, 7), 0.0, None, False),
    (1, 97, 130, (10, 2), 128, FP16, False, "bottom_right", (-1, -1), 5.0, "h", True),
    (1, 65, 70, (2, 2), 256, BF16, True, "bottom_right", (-1, -1), 0.0, "bh", False),
    (1, 113, 239, (5, 1), 256, FP16, False, "bottom_right", (50, 20), 2.0, None, False),
    (1, 113, 80, (4, 1), 64, BF16, True, "top_left", (-1, -1), 0.0, "h", False),       # SDPA's is_causal
    (1, 70, 113, (8, 2), 40, FP16, True, "top_left", (20, -1), 3.0, None, True),
    (1, 1, 1, (2, 2), 128, FP16, False, "bottom_right", (-1, -1), 0.0, None, False),
    (2, 64, 128, (4, 1), 64, FP16, False, "bottom_right", (0, 40), 0.0, "bh", False),  # window right of diagonal
    (1, 239, 239, (5, 1), 128, BF16, True, "bottom_right", (-1, -1), 0.0, None, False),
]


def _case_id(c):
    b, nq, nk, (hq, hkv), d, dtype, causal, align, window, softcap, alibi, lse_grad = c
    parts = [f"b{b}", f"{nq}x{nk}", f"h{hq}_{hkv}", f"d{d}", str(dtype)[6:]]
    parts += [f"causal_{align}"] if causal else []
    parts += [f"win{window[0]}_{window[1]}"] if window != (-1, -1) else []
    parts += [f"cap{softcap:g}"] if softcap else []
    parts += [f"alibi_{alibi}"] if alibi else []
    parts += ["dlse"] if lse_grad else []
    return "-".join(parts)


def _run_case(case, deterministic):
    b, nq, nk, (hq, hkv), d, dtype, causal, align, window, softcap, alibi, lse_grad = case
    q, k, v = _inputs(b, nq, nk, hq, hkv, d, dtype, seed=nq + d)
    return _check_dense(q, k, v, deterministic=deterministic, lse_grad=lse_grad, causal=causal, causal_align=align,
                        window_size=window, softcap=softcap, alibi_slopes=_alibi(alibi, b, hq),
                        config=_case_id(case) + f" deterministic={deterministic}")


@pytest.mark.parametrize("backend", CUDA)
@pytest.mark.parametrize("deterministic", MODES)
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_dense(backend, case, deterministic):
    _run_case(case, deterministic)


# The larger grid: head dims x GQA groups x causal x sizes, both paths.
SLOW_CASES = [
    (1, nq, nk, (g * 2, 2), d, dtype, causal, "bottom_right", (-1, -1), 0.0, None, False)
    for (d, dtype), g, causal, (nq, nk) in itertools.product(
        [(40, FP16), (64, BF16), (111, FP16), (128, BF16), (256, FP16)], (1, 4, 5), (False, True),
        [(1, 113), (113, 239), (239, 113), (239, 239)])
]


@pytest.mark.slow
@pytest.mark.parametrize("backend", CUDA)
@pytest.mark.parametrize("deterministic", MODES)
@pytest.mark.parametrize("case", SLOW_CASES, ids=[_case_id(c) for c in SLOW_CASES])
def test_dense_grid(backend, case, deterministic):
    _run_case(case, deterministic)


# ---------------------------------------------------------------------------------------------
# Schedules: bit-identical deterministic gradients, real interleavings of the atomic adds
# ---------------------------------------------------------------------------------------------

SCHEDULES = [(True, 0), (True, 1), (True, 12345), (False, 0)]   # (random, seed); False = in order


def _grads_under(ops, schedule, q, k, v, dout, deterministic, **kw):
    ops.emu_set_schedule(*schedule)
    try:
        out = transformer.flash_attention(q, k, v, deterministic=deterministic, backend="cuda", **kw)
        return torch.autograd.grad(out, (q, k, v), dout)
    finally:
        ops.emu_set_schedule(True, 0)


@pytest.mark.parametrize("backend", CUDA)
def test_schedules(backend):
    """deterministic=True: dq, dk, dv bit-identical over repeated runs and every emulator schedule (blocks and
    threads in random orders of several seeds, and in order). deterministic=False: dk, dv (no atomics) are
    bit-identical too; dq, added by the key-tile blocks with atomics, differs in its last bits between block
    orders (4 key tiles per query row here; fp16, whose rounding keeps more of the fp32 sum's order than bf16)
    and passes the tolerance rule under each of them."""
    helpers.require_backend(backend)
    ops = _emu_ops()
    q, k, v = _inputs(1, 113, 239, 8, 2, 64, FP16, seed=5)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(6)).to(FP16)
    kw = dict(alibi_slopes=_alibi("h", 1, 8), softcap=4.0)
    det = [_grads_under(ops, s, q, k, v, dout, True, **kw) for s in SCHEDULES + SCHEDULES[:1]]
    for s, g in zip(SCHEDULES[1:] + SCHEDULES[:1], det[1:]):
        for name, a, b in zip(("dq", "dk", "dv"), det[0], g):
            assert torch.equal(a, b), f"deterministic {name} differs between schedules {SCHEDULES[0]} and {s}"
    ref = reference.attention(q, k, v, **kw)
    want = torch.autograd.grad(ref, (q, k, v), dout.float())
    low = reference.attention(q, k, v, compute_dtype=None, **kw)
    base = torch.autograd.grad(low, (q, k, v), dout)
    atomic = [_grads_under(ops, s, q, k, v, dout, False, **kw) for s in SCHEDULES]
    for s, g in zip(SCHEDULES, atomic):
        _compare(g, want, base, f"atomic, schedule {s}")
        assert torch.equal(g[1], det[0][1]) and torch.equal(g[2], det[0][2]), f"dk/dv differ, schedule {s}"
    assert any(not torch.equal(atomic[0][0], g[0]) for g in atomic[1:]), \
        "dq is bit-identical under every block order: the emulator did not reorder the atomic adds"


# ---------------------------------------------------------------------------------------------
# Counted work (the emulator's mma counter)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", CUDA)
@pytest.mark.parametrize("d", [64, 128, 256])
def test_matrix_products_per_tile_pair(backend, d):
    """Warp-level mma.m16n8k16 executed by the backward (no mask: every tile pair is computed) over one matrix
    product's worth, Nq * Nk * D / (16 * 8 * 16): 5 on the default path (S^T, dP^T, dV, dK, dQ once per tile
    pair) and 7 on the deterministic one (its dQ kernel computes S and dP again). At D = 256 the dK/dV blocks
    split the columns in two halves, each computing S^T and dP^T: 7 and 9."""
    helpers.require_backend(backend)
    ops = _emu_ops()
    n = 128
    q, k, v = _inputs(1, n, n, 1, 1, d, FP16, seed=d)
    out = transformer.flash_attention(q, k, v, backend="cuda")
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(FP16)
    per_product = n * n * d // (16 * 8 * 16)
    counts = {}
    for deterministic in (False, True):
        out = transformer.flash_attention(q, k, v, deterministic=deterministic, backend="cuda")
        before = ops.emu_mma_count()
        torch.autograd.grad(out, (q, k, v), dout)
        counts[deterministic] = (ops.emu_mma_count() - before) / per_product
    split = 2 if d == 256 else 0
    assert counts == {False: 5 + split, True: 7 + split}, counts


# dK/dV tiles of Config<D> (csrc/attention/launch.cuh): (query tile BM, columns per block DC); 4 warps, 64 keys.
DKDV_TILES = {64: (64, 64), 128: (64, 128), 256: (32, 128)}


def _dkdvdq_loads_and_mmas(d, n):
    """ldmatrix.x4 and mma.m16n8k16 of attn_bwd_dkdvdq_kernel over an unmasked n x n call (one head), as its
    header (csrc/attention/bwd.cuh) counts them per warp and query tile: phase 1 (S^T, dP^T) d / 16 k-steps of
    4 + 2 QB / 16 loads and 8 QB / 16 mma (QB = BM / 2); phase 2 (dV, dK) BM / 16 k-steps of 4 + 2 CW / 16 loads
    and 8 CW / 16 mma (CW = DC / 2); dQ in chunks of at most 4 column tiles, (1 + chunk) loads and 2 chunk mma per
    key step."""
    bm, dc = DKDV_TILES[d]
    qb, cw = bm // 2, dc // 2
    loads = d // 16 * (4 + 2 * qb // 16) + bm // 16 * (4 + 2 * cw // 16)
    mmas = d // 16 * 8 * qb // 16 + bm // 16 * 8 * cw // 16
    rt = bm // 16
    ncw = dc // 16 // (4 // rt)
    nch = min(ncw, 4)
    loads += ncw // nch * 4 * (1 + nch)
    mmas += ncw * 4 * 2
    warp_items = 4 * (n // bm) * (n // 64) * (d // dc)
    return loads * warp_items, mmas * warp_items


@pytest.mark.parametrize("backend", CUDA)
@pytest.mark.parametrize("d", [64, 128, 256])
def test_ldmatrix_per_mma(backend, d):
    """ldmatrix.x4 and mma executed by the default backward (the dK/dV + dQ kernel is the only one that uses
    them) equal the counts of its header; at D = 128 at most 0.5 ldmatrix.x4 per mma."""
    helpers.require_backend(backend)
    ops = _emu_ops()
    n = 128
    q, k, v = _inputs(1, n, n, 1, 1, d, FP16, seed=d)
    out = transformer.flash_attention(q, k, v, backend="cuda")
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(FP16)
    loads, mmas = ops.emu_ldmatrix_x4_count(), ops.emu_mma_count()
    torch.autograd.grad(out, (q, k, v), dout)
    counted = (ops.emu_ldmatrix_x4_count() - loads, ops.emu_mma_count() - mmas)
    assert counted == _dkdvdq_loads_and_mmas(d, n), counted
    if d == 128:
        assert counted[0] <= 0.5 * counted[1], counted
