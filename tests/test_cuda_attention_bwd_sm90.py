"""The sm_90a attention backward (csrc/attention/bwd_sm90.cuh: wgmma + TMA + mbarrier, warp-specialised) and the
choice between it and the sm_80 backward (TILEFORMER_CUDA_ATTN_BWD, csrc/attention/attention.cu).

On a CPU machine the kernel runs through the host emulation (TILEFORMER_CUDA_ATTN_BWD=sm90 forces it there, as
the forward's variable does the forward): wgmma reads shared memory through its descriptors and swizzle, TMA
loads land at the mbarrier wait, outputs are NaN-poisoned, global accesses bounds-checked, threads and blocks run
in a random order. It serves the default (atomic-dQ) backward without dropout, with more than 16 keys per
sequence, at padded head dims 64 and 128; every other call runs the sm_80 backward. Each test checks which one
ran by the emulator's warpgroup-level wgmma count (the forward runs the sm_80 kernel here: no wgmma), and the
gradients by the flash-attn rule (3x the same-precision error of PyTorch, helpers.compare_grads) through the
grids of tests/test_cuda_attention_bwd_paths.py and tests/test_attention_bwd_paths.py.
"""
from __future__ import annotations

import itertools

import pytest
import torch

import transformer
from transformer import reference

import helpers
import test_attention_bwd_paths as shared
import test_cuda_attention_bwd_paths as cuda_paths

CUDA = helpers.kernel_backends("cuda")
pytestmark = pytest.mark.parametrize("backend", CUDA)
FP16, BF16 = torch.float16, torch.bfloat16
BM, BN = 64, 128   # Sm90BwdTiles: queries per Q / dO tile, keys per block (64 per consumer warpgroup)


@pytest.fixture(autouse=True)
def _sm90(monkeypatch):
    monkeypatch.setenv("TILEFORMER_CUDA_ATTN_BWD", "sm90")
    monkeypatch.setenv("TILEFORMER_EMU_CHECK_BOUNDS", "1")


def _ops():
    from transformer import _cuda
    return _cuda.ops(helpers.DEVICE)


def _count():
    """wgmma executed so far (emulator), or None on a GPU."""
    return None if helpers.HAS_GPU else _ops().emu_wgmma_count()


class _Ran:
    """Asserts on exit whether the sm_90a backward ran (wgmma executed) inside the block."""

    def __init__(self, sm90):
        self.sm90 = sm90

    def __enter__(self):
        self.before = _count()
        return self

    def __exit__(self, *exc):
        if exc[0] is None and self.before is not None:
            ran = _count() - self.before
            want = "sm90" if self.sm90 else "sm80"
            assert (ran > 0) == self.sm90, f"wgmma executed: {ran} (expected the {want} backward)"


def helpers_padded(d):
    """The padded head dim the CUDA kernels run d as (this build's default head dims 64, 128, 256)."""
    return 64 if d <= 64 else 128 if d <= 128 else 256


# ---------------------------------------------------------------------------------------------
# Dense: the CUDA backward grid (odd sizes, GQA, causal both alignments, windows, ALiBi, softcap, dlse, fp16/bf16)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("deterministic", cuda_paths.MODES)
@pytest.mark.parametrize("case", cuda_paths.CASES, ids=[cuda_paths._case_id(c) for c in cuda_paths.CASES])
def test_dense(backend, case, deterministic):
    """Head dims 40, 64, 111, 128 run sm90 on the default path; 256 and deterministic=True run sm80."""
    helpers.require_backend(backend)
    b, nq, nk, heads, d, *_ = case
    with _Ran(not deterministic and helpers_padded(d) <= 128 and nk > 16):
        cuda_paths._run_case(case, deterministic)


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in cuda_paths.SLOW_CASES if c[4] <= 128],
                         ids=[cuda_paths._case_id(c) for c in cuda_paths.SLOW_CASES if c[4] <= 128])
def test_dense_grid(backend, case):
    helpers.require_backend(backend)
    with _Ran(case[2] > 16):
        cuda_paths._run_case(case, False)


# ---------------------------------------------------------------------------------------------
# Varlen, padded batches, fully masked rows (tests/test_attention_bwd_paths.py's checks, sm90 forced)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", shared.VARLEN_CASES[:3], ids=["gqa-causal-alibi-tails-dlse", "mqa-window-softcap-head",
                                                              "mha-empty-keys"])
def test_varlen(backend, case):
    with _Ran(True):
        shared.test_varlen(backend, case, False)


def test_padded_batch(backend):
    with _Ran(True):
        shared.test_padded_batch(backend, False)


def test_fully_masked_rows_have_zero_gradients(backend):
    with _Ran(True):
        shared.test_fully_masked_rows_have_zero_gradients(backend, False)


@pytest.mark.parametrize("poison", [float("inf"), float("nan")], ids=["inf", "nan"])
def test_varlen_neighbour_tokens_do_not_leak(backend, poison):
    """Packed sequences whose tiles reach into tokens of no sequence holding inf / NaN (q, k, v and dout): the
    kernel zeroes those rows of its shared-memory tiles, so the sequences' gradients equal those of the clean
    sequences alone, and the poisoned tokens' own gradients are exactly 0."""
    helpers.require_backend(backend)
    lens_q, lens_k, tail = [70, 33], [90, 40], 20
    q, k, v, cu_q, cu_k, mq, mk = shared._varlen(lens_q, lens_k, 4, 2, 128, BF16, tail_q=tail, tail_k=tail, seed=5)
    with torch.no_grad():
        for t in (q, k, v):
            t[-tail:] = poison
    out = transformer.flash_attention_varlen(q, k, v, cu_q, cu_k, mq, mk, causal=True, backend=backend)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(out.dtype)
    dout[-tail:] = poison
    with _Ran(True):
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    n_q, n_k = sum(lens_q), sum(lens_k)
    clean = [t.detach()[:n].clone().requires_grad_(True) for t, n in ((q, n_q), (k, n_k), (v, n_k))]
    kw = dict(causal=True)
    ref = reference.attention_varlen(*clean, cu_q, cu_k, mq, mk, **kw)
    low = reference.attention_varlen(*clean, cu_q, cu_k, mq, mk, compute_dtype=None, **kw)
    g = dout[:n_q]
    helpers.compare_grads((dq[:n_q], dk[:n_k], dv[:n_k]), torch.autograd.grad(ref, clean, g.float()),
                          torch.autograd.grad(low, clean, g), f"poison={poison}")
    assert not dq[n_q:].any() and not dk[n_k:].any() and not dv[n_k:].any()


# ---------------------------------------------------------------------------------------------
# Work: 5 products per (query tile, key block) pair, counted in wgmma instructions
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("d", [64, 128])
def test_work_count_is_five_products_per_tile_pair(backend, d):
    """Non-causal dense call: every key block visits every query tile of every head of its group. Per tile pair
    and consumer warpgroup (64 keys): S^T and dP^T d/16 wgmma m64n64k16 each, dV and dK 64/16 wgmma m64n{d}k16
    each, dQ (64 keys) 4 x d/64 wgmma m64n64k16: the five products, none recomputed."""
    helpers.require_backend(backend)
    if helpers.HAS_GPU:
        pytest.skip("the wgmma count is the emulator's")
    b, nq, nk, hq, hkv = 2, 200, 300, 6, 2
    q, k, v = helpers.attn_inputs(b, nq, nk, hq, hkv, d, FP16, seed=d)
    out = transformer.flash_attention(q, k, v, backend=backend)
    before = _count()
    torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    pairs = b * hkv * (-(-nk // BN)) * (hq // hkv) * (-(-nq // BM))
    per_pair_per_wg = 2 * (d // 16) + 2 * (BM // 16) + 4 * (d // 64)
    assert _count() - before == pairs * 2 * per_pair_per_wg


# ---------------------------------------------------------------------------------------------
# The choice: calls sm90 does not serve, forced sm80, bad values
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("why", ["deterministic", "dropout", "d256", "16 keys"])
def test_calls_sm90_does_not_serve_run_sm80(backend, why):
    helpers.require_backend(backend)
    d = 256 if why == "d256" else 64
    nk = 16 if why == "16 keys" else 100
    q, k, v = helpers.attn_inputs(1, 70, nk, 4, 2, d, FP16, seed=3)
    kw = dict(deterministic=why == "deterministic", dropout_p=0.2 if why == "dropout" else 0.0)
    reason = _ops().attn_bwd_sm90_reason(d, False, nk, kw["dropout_p"] > 0, kw["deterministic"])
    assert reason, why
    out = transformer.flash_attention(q, k, v, causal=True, backend=backend, **kw)
    with _Ran(False):
        grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    assert all(torch.isfinite(g).all() for g in grads)


def test_sm80_forced_gives_the_same_gradients_within_the_rule(backend, monkeypatch):
    helpers.require_backend(backend)
    q, k, v = helpers.attn_inputs(1, 113, 239, 4, 2, 64, BF16, seed=14)
    monkeypatch.setenv("TILEFORMER_CUDA_ATTN_BWD", "sm80")
    with _Ran(False):
        helpers.check_attention_grads(backend, q, k, v, deterministic=False, causal=True, config="sm80")
    monkeypatch.setenv("TILEFORMER_CUDA_ATTN_BWD", "auto")
    with _Ran(helpers.HAS_GPU and _count() is not None):   # auto keeps the emulator on the sm_80 backward
        helpers.check_attention_grads(backend, q, k, v, deterministic=False, causal=True, config="auto")


def test_bad_value_raises(backend, monkeypatch):
    helpers.require_backend(backend)
    q, k, v = helpers.attn_inputs(1, 40, 50, 2, 2, 64, FP16, seed=1)
    out = transformer.flash_attention(q, k, v, backend=backend)
    monkeypatch.setenv("TILEFORMER_CUDA_ATTN_BWD", "hopper")
    with pytest.raises(ValueError, match="TILEFORMER_CUDA_ATTN_BWD must be"):
        torch.autograd.grad(out, (q, k, v), torch.ones_like(out))


def test_explain_names_the_backward_kernel(backend, monkeypatch):
    """For a call that requires grad, explain() names the backward kernel after the forward one, and why."""
    helpers.require_backend(backend)
    q, k, v = helpers.attn_inputs(1, 40, 50, 2, 2, 64, FP16, seed=1)
    text = transformer.backends.explain("flash_attention", q, k, v, backend=backend)
    assert ("backward sm90 (wgmma + TMA) (sm80 where a sequence has at most 16 keys): TILEFORMER_CUDA_ATTN_BWD=sm90"
            in text)
    text = transformer.backends.explain("flash_attention", q, k, v, deterministic=True, backend=backend)
    assert "backward sm80 (mma.sync, two kernels, no atomics): sm90 does not serve this call (deterministic" in text
    q256, k256, v256 = helpers.attn_inputs(1, 40, 50, 2, 2, 256, FP16, seed=1)
    assert "built for padded head dims 64 and 128" in transformer.backends.explain(
        "flash_attention", q256, k256, v256, backend=backend)
    monkeypatch.setenv("TILEFORMER_CUDA_ATTN_BWD", "sm80")
    assert "backward sm80 (mma.sync, dQ by atomics): TILEFORMER_CUDA_ATTN_BWD=sm80" in transformer.backends.explain(
        "flash_attention", q, k, v, backend=backend)
    if not helpers.HAS_GPU:
        monkeypatch.setenv("TILEFORMER_CUDA_ATTN_BWD", "auto")
        assert "the emulator runs sm90 only with TILEFORMER_CUDA_ATTN_BWD=sm90" in transformer.backends.explain(
            "flash_attention", q, k, v, backend=backend)
    with torch.no_grad():
        assert "backward" not in transformer.backends.explain("flash_attention", q.detach(), k.detach(), v.detach(),
                                                              backend=backend)


@pytest.fixture
def lagging_warpgroup():
    """The emulator's random schedule with one lagging warpgroup per block (common/emu.h set_schedule_lag)."""
    ops = _ops()
    ops.emu_set_schedule_lag(True)
    yield ops
    ops.emu_set_schedule_lag(False)
    ops.emu_set_schedule(True, 0)


@pytest.mark.parametrize("d", [64, 128])
def test_under_a_lagging_warpgroup(backend, d, lagging_warpgroup):
    """One warpgroup of each block runs only when the other cannot: the warpgroups' exchanges (the D = 128 dQ
    reads both warpgroups' dS^T; both fill and drain the shared Q / dO ring) hold only through their
    mbarriers, whichever warpgroup lags."""
    helpers.require_backend(backend)
    if helpers.HAS_GPU:
        pytest.skip("emulator schedules: CPU tensors through transformer._C_emu only")
    q, k, v = helpers.attn_inputs(1, 200, 300, 4, 2, d, BF16, seed=d)
    for seed in range(3):
        lagging_warpgroup.emu_set_schedule(True, seed)
        with _Ran(True):
            helpers.check_attention_grads(backend, q, k, v, deterministic=False, causal=True,
                                          config=f"lagging warpgroup, seed {seed}")
