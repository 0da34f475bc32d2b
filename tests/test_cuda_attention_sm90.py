"""The sm_90a attention forward (csrc/attention/fwd_sm90.cuh: wgmma + TMA + mbarrier, warp-specialised) and the
choice between it and the sm_80 forward (TILEFORMER_CUDA_ATTN_FWD, transformer/_cuda/attention.py).

On a CPU machine the kernel runs through the host emulation (TILEFORMER_CUDA_ATTN_FWD=sm90 forces it there):
wgmma reads shared memory through its descriptors and swizzle as the hardware does, TMA loads land (zero fill,
swizzle) at the mbarrier wait, outputs are NaN-poisoned, global accesses bounds-checked, threads run in a random
order. Every forced call checks that the kernel ran by its warpgroup-level wgmma count (emu_wgmma_count) and
compares out and lse with the fp32 reference by the flash-attn rule (helpers.assert_close). Varlen calls (packed
sequences) run it too: ragged lengths with empty sequences, inf / NaN in the neighbouring sequence, invalid
cu_seqlens values. A representative
rotation of the grid runs by default, the full grid under ``-m slow``. On an H100 / H200 the same tests run the
hardware kernel (no count).
"""
from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch

import transformer
from transformer import reference

import helpers

FP16, BF16 = torch.float16, torch.bfloat16
CUDA = helpers.kernel_backends("cuda")
pytestmark = pytest.mark.parametrize("backend", CUDA)
BM = 128                   # Sm90FwdTiles: query rows per block; keys per tile: 128 (D <= 128), 64 (D = 256)


def _bn(d):
    return 128 if d <= 128 else 64


@pytest.fixture(autouse=True)
def _sm90(monkeypatch):
    monkeypatch.setenv("TILEFORMER_CUDA_ATTN_FWD", "sm90")
    monkeypatch.setenv("TILEFORMER_EMU_CHECK_BOUNDS", "1")


def _ca():
    from transformer._cuda import attention as ca
    return ca


def _ops():
    from transformer import _cuda
    return _cuda.ops(helpers.DEVICE)


def _count():
    """wgmma executed so far (emulator), or None on a GPU."""
    return None if helpers.HAS_GPU else _ops().emu_wgmma_count()


def _require(backend, d=64):
    helpers.require_backend(backend)
    if d not in _ca().head_dims(helpers.DEVICE.type):
        pytest.skip(f"head dim {d} is not compiled into this build: {_ca().head_dims(helpers.DEVICE.type)}")
    if helpers.HAS_GPU and torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the sm_90a forward runs on compute capability 9.0 GPUs only")


def _inputs(b, nq, nk, hq, hkv, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda n, h: torch.randn(b, n, h, d, generator=g).to(helpers.DEVICE, dtype)  # noqa: E731
    return mk(nq, hq), mk(nk, hkv), mk(nk, hkv)


def _alibi(b, hq, per_batch=False, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(*((b, hq) if per_batch else (hq,)), generator=g) * 0.5 + 0.05).to(helpers.DEVICE)


def _tiles(nq, nk, d, b, hq):
    """wgmma the kernel issues: per (batch, head, query block) and consumer warpgroup, D / 16 (S = Q K^T) +
    BN / 16 (O += P V) per key tile in the block's key range; without a mask every block sees every tile."""
    return b * hq * math.ceil(nq / BM) * 2 * math.ceil(nk / _bn(d)) * (d // 16 + _bn(d) // 16)


def _compared(entry, args, *, config, wgmma, sm90, **kw):
    """(out, lse) of the cuda backend's `entry` (flash_attention or flash_attention_varlen) on args vs the fp32
    reference and PyTorch in q's dtype; the sm_90a kernel ran (wgmma > 0, or exactly `wgmma`) or, with sm90=False,
    the sm_80 kernel did (no wgmma)."""
    before = _count()
    if "causal_align" in kw:   # the SDPA drop-in's top-left causal: the backend's entry function takes it
        full = dict(causal=False, softmax_scale=args[0].shape[-1] ** -0.5, window_size=(-1, -1), alibi_slopes=None,
                    softcap=0.0)
        full.update(kw)
        out, lse = getattr(_ca(), entry)(*args, deterministic=False, return_lse=True, **full)
    else:
        out, lse = getattr(transformer, entry)(*args, return_lse=True, backend="cuda", **kw)
    after = _count()
    if before is not None:
        ran = after - before
        if not sm90:
            assert ran == 0, f"{config}: the sm_80 forward should have run, got {ran} wgmma"
        elif wgmma is not None:
            assert ran == wgmma, f"{config}: {ran} wgmma, expected {wgmma}"
        else:
            assert ran > 0, f"{config}: the sm_90a forward did not run (no wgmma)"
    ref_fn = reference.attention if entry == "flash_attention" else reference.attention_varlen
    ref, ref_lse = ref_fn(*args, return_lse=True, **kw)
    low, low_lse = ref_fn(*args, return_lse=True, compute_dtype=None, **kw)
    assert not out.isnan().any(), f"{config}: NaN in out (an element left unwritten shows the poison)"
    helpers.assert_close(out, ref, low, config=config)
    helpers.assert_close(lse, ref_lse, low_lse.float(), name="lse", config=config)
    return out, lse


def _fwd_check(q, k, v, *, config, wgmma=None, sm90=True, **kw):
    """Dense forward (out, lse) vs the references (_compared)."""
    return _compared("flash_attention", (q, k, v), config=config, wgmma=wgmma, sm90=sm90, **kw)


# ---------------------------------------------------------------------------------------------
# The grid: dtype x head dim x (Nq, Nk) x GQA group x causal
# ---------------------------------------------------------------------------------------------

PAIRS = [(1, 1), (1, 130), (113, 239), (239, 113), (128, 128), (257, 300)]
GROUPS = {1: (2, 2), 2: (4, 2), 4: (4, 1), 5: (5, 1)}   # group -> (Hq, Hkv)


def _grid():
    return list(itertools.product((FP16, BF16), (64, 128, 256), PAIRS, GROUPS, (False, True)))


def _rotation():
    """Every pair with both dtypes and causal values at head dims 64 and 128, every group at least twice; head dim
    256 on three pairs."""
    cases = []
    for i, pair in enumerate(PAIRS):
        for j, d in enumerate((64, 128)):
            cases.append(((FP16, BF16)[(i + j) % 2], d, pair, list(GROUPS)[(2 * i + j) % 4], bool((i + j + 1) % 2)))
    cases += [(BF16, 256, (113, 239), 2, True), (FP16, 256, (257, 300), 5, False), (FP16, 256, (1, 130), 1, True)]
    return cases


def _id(c):
    dtype, d, (nq, nk), group, causal = c
    return f"{'fp16' if dtype == FP16 else 'bf16'}-d{d}-{nq}x{nk}-g{group}" + ("-causal" if causal else "")


def _run_case(backend, case):
    dtype, d, (nq, nk), group, causal = case
    _require(backend, d)
    hq, hkv = GROUPS[group]
    q, k, v = _inputs(1, nq, nk, hq, hkv, d, dtype, seed=nq + 3 * nk + d + group)
    _fwd_check(q, k, v, causal=causal, config=_id(case),
               wgmma=None if causal else _tiles(nq, nk, d, 1, hq))


@pytest.mark.parametrize("case", _rotation(), ids=[_id(c) for c in _rotation()])
def test_grid(backend, case):
    _run_case(backend, case)


@pytest.mark.slow
@pytest.mark.parametrize("case", _grid(), ids=[_id(c) for c in _grid()])
def test_grid_full(backend, case):
    _run_case(backend, case)


# ---------------------------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------------------------

FEATURES = [
    # (name, b, nq, nk, group, d, dtype, kwargs)
    ("window", 1, 113, 239, 2, 64, BF16, dict(window_size=(37, 11))),
    ("window-left-causal", 1, 257, 300, 1, 128, FP16, dict(causal=True, window_size=(70, -1))),
    ("window-right-only", 1, 239, 113, 4, 64, FP16, dict(window_size=(-1, 5))),
    ("alibi", 2, 200, 64, 4, 64, FP16, dict(alibi="h")),
    ("alibi-batch-causal", 2, 113, 239, 1, 128, BF16, dict(causal=True, alibi="bh")),
    ("softcap", 1, 128, 128, 1, 64, BF16, dict(softcap=4.0)),
    ("softcap-alibi-window", 1, 1, 130, 5, 128, FP16, dict(softcap=10.0, alibi="h", window_size=(50, 50))),
    ("causal-top-left", 2, 239, 113, 2, 64, BF16, dict(causal=True, causal_align="top_left")),
    ("scale", 1, 65, 77, 1, 128, FP16, dict(softmax_scale=0.3)),
    ("d256-window-alibi-softcap", 2, 150, 203, 2, 256, BF16, dict(window_size=(90, 3), alibi="bh", softcap=8.0)),
]


@pytest.mark.parametrize("feat", FEATURES, ids=[f[0] for f in FEATURES])
def test_features(backend, feat):
    name, b, nq, nk, group, d, dtype, kw = feat
    _require(backend, d)
    hq, hkv = GROUPS[group]
    q, k, v = _inputs(b, nq, nk, hq, hkv, d, dtype, seed=len(name))
    kw = dict(kw)
    if "alibi" in kw:
        kw["alibi_slopes"] = _alibi(b, hq, per_batch=kw.pop("alibi") == "bh")
    _fwd_check(q, k, v, config=name, **kw)


def test_fully_masked_rows(backend):
    """Bottom-right causal with Nq > Nk: the first Nq - Nk query rows see no key (out 0, lse -inf, as the sm_80
    kernel); the first two 128-row blocks have no key tile at all."""
    _require(backend)
    q, k, v = _inputs(1, 300, 40, 2, 1, 64, FP16, seed=3)
    out, lse = _fwd_check(q, k, v, causal=True, config="causal 300x40")
    assert torch.equal(out[:, :260].float().cpu(), torch.zeros(1, 260, 2, 64))
    assert torch.isneginf(lse[:, :, :260]).all()


def test_strided_inputs(backend):
    """q, k, v as views (heads sliced out of larger tensors, [B, H, N, D] transposed): the tensor maps take the
    element strides."""
    _require(backend, 128)
    g = torch.Generator().manual_seed(5)
    big = torch.randn(2, 150, 6, 128, generator=g).to(helpers.DEVICE, BF16)
    q = big[:, :, 1:5]                                                               # Hq 4, strided heads
    kv = torch.randn(2, 3, 170, 128, generator=g).to(helpers.DEVICE, BF16)          # [B, H, N, D]
    k, v = kv[:, :2].transpose(1, 2), kv[:, 1:].transpose(1, 2)
    _fwd_check(q, k, v, causal=True, config="strided")


def test_padded_head_dims(backend):
    """Head dims below a built one (64, 128, 256) run with it: TMA reads columns past head_dim as 0, stores skip
    them."""
    _require(backend, 128)
    for d, dtype in ((8, FP16), (40, BF16), (72, FP16), (120, BF16), (200, FP16)):
        if (d + 7) // 8 * 8 > max(_ca().head_dims(helpers.DEVICE.type)):
            continue
        q, k, v = _inputs(1, 70, 90, 4, 1, d, dtype, seed=d)
        _fwd_check(q, k, v, causal=True, config=f"d{d}")


def test_backward_after_the_sm90_forward(backend):
    """The backward (sm_80 kernels) consumes the sm_90a forward's out and lse."""
    _require(backend)
    q, k, v = (t.requires_grad_(True) for t in _inputs(1, 113, 239, 4, 2, 64, FP16, seed=9))
    out = transformer.flash_attention(q, k, v, causal=True, backend="cuda")
    ref = reference.attention(q, k, v, causal=True)
    low = reference.attention(q, k, v, causal=True, compute_dtype=None)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out.device, out.dtype)
    got = torch.autograd.grad(out, (q, k, v), dout)
    want = torch.autograd.grad(ref, (q, k, v), dout.float())
    base = torch.autograd.grad(low, (q, k, v), dout)
    for name, a, r, rl in zip(("dq", "dk", "dv"), got, want, base):
        helpers.assert_close(a, r, rl, factor=3.0, name=name, config="bwd after sm90")


def test_work_count_is_the_tile_count(backend):
    """Exactly the wgmma of the tiles: 3 query blocks x 3 key tiles x 2 warpgroups x (4 + 8) per head; a causal
    call skips the tiles above the diagonal (block 0 sees key tile 0 only, ...)."""
    _require(backend)
    if helpers.HAS_GPU:
        pytest.skip("counts wgmma in the emulator")
    q, k, v = _inputs(1, 300, 300, 2, 1, 64, FP16, seed=11)
    _fwd_check(q, k, v, config="count", wgmma=_tiles(300, 300, 64, 1, 2))
    _fwd_check(q, k, v, causal=True, config="count causal", wgmma=2 * (1 + 2 + 3) * 2 * (64 // 16 + 128 // 16))


@pytest.mark.parametrize("d", (64, 256))
def test_thread_order_does_not_change_the_result(backend, d):
    """The consumers' turns (named barriers) and the overlap of softmax and P V order only the issue of the
    products: out and lse are bit-identical under several random thread orders and in thread order, over enough key
    tiles (at least 7 per block at D = 64, 13 at D = 256) that both K / V rings and both turn barriers go through
    many phases."""
    _require(backend, d)
    if helpers.HAS_GPU:
        pytest.skip("sets the emulator's thread schedule")
    q, k, v = _inputs(1, 200, 1100, 4, 2, d, BF16, seed=13)
    runs = []
    try:
        for random, seed in ((True, 1), (True, 2), (True, 3), (False, 0)):
            _ops().emu_set_schedule(random, seed)
            runs.append(_fwd_check(q, k, v, window_size=(700, 50), softcap=20.0, config=f"schedule {seed}"))
    finally:
        _ops().emu_set_schedule(True, 0)
    for out, lse in runs[1:]:
        assert torch.equal(out, runs[0][0]) and torch.equal(lse, runs[0][1])


# ---------------------------------------------------------------------------------------------
# Varlen: packed [total, H, D] sequences
# ---------------------------------------------------------------------------------------------

def _cu(lens):
    return torch.tensor([0] + list(itertools.accumulate(lens)), dtype=torch.int32, device=helpers.DEVICE)


def _packed(lens_q, lens_k, hq, hkv, d, dtype, seed, extra=0):
    """Packed q [sum(lens_q) + extra, Hq, D], k, v [sum(lens_k) + extra, Hkv, D] (extra tokens past cu[-1])."""
    g = torch.Generator().manual_seed(seed)
    mk = lambda n, h: torch.randn(n + extra, h, d, generator=g).to(helpers.DEVICE, dtype)  # noqa: E731
    return mk(sum(lens_q), hq), mk(sum(lens_k), hkv), mk(sum(lens_k), hkv)


def _varlen_tiles(lens_q, lens_k, d, hq):
    """wgmma of a varlen call without a mask: per sequence as a dense call of its lengths (0 for an empty one)."""
    return sum(_tiles(nq, nk, d, 1, hq) for nq, nk in zip(lens_q, lens_k) if nq and nk)


def _varlen_check(q, k, v, lens_q, lens_k, *, config, wgmma=None, sm90=True, **kw):
    """flash_attention_varlen (out, lse) of sequences of lens_q / lens_k vs the references (_compared)."""
    args = (q, k, v, _cu(lens_q), _cu(lens_k), max(lens_q), max(lens_k))
    return _compared("flash_attention_varlen", args, config=config, wgmma=wgmma, sm90=sm90, **kw)


# (lens_q, lens_k): empty sequences on either side, 1, 113, 239, a sequence longer than one 128-row block
VARLEN_LENS = [
    ([113, 0, 1, 239], [239, 5, 0, 113]),
    ([1, 130, 7], [130, 1, 64]),
    ([239, 113], [113, 239]),
]


def _varlen_grid():
    return list(itertools.product((FP16, BF16), (64, 128, 256), range(len(VARLEN_LENS)), (1, 2, 5),
                                  (False, True)))


def _varlen_rotation():
    """Every lens set, both dtypes, causal and not, groups 1 / 2 / 5 at head dims 64 and 128; two at 256."""
    cases = []
    for i in range(len(VARLEN_LENS)):
        for j, d in enumerate((64, 128)):
            cases.append(((FP16, BF16)[(i + j) % 2], d, i, (1, 2, 5)[(i + 2 * j) % 3], bool((i + j) % 2)))
    cases += [(BF16, 256, 0, 2, True), (FP16, 256, 1, 5, False)]
    return cases


def _varlen_id(c):
    dtype, d, i, group, causal = c
    return f"{'fp16' if dtype == FP16 else 'bf16'}-d{d}-lens{i}-g{group}" + ("-causal" if causal else "")


def _run_varlen_case(backend, case):
    dtype, d, i, group, causal = case
    _require(backend, d)
    lens_q, lens_k = VARLEN_LENS[i]
    hkv = 1 if group == 5 else 2
    hq = group * hkv
    q, k, v = _packed(lens_q, lens_k, hq, hkv, d, dtype, seed=7 * i + d + group, extra=3)
    _varlen_check(q, k, v, lens_q, lens_k, causal=causal, config=_varlen_id(case),
                  wgmma=None if causal else _varlen_tiles(lens_q, lens_k, d, hq))


@pytest.mark.parametrize("case", _varlen_rotation(), ids=[_varlen_id(c) for c in _varlen_rotation()])
def test_varlen_grid(backend, case):
    _run_varlen_case(backend, case)


@pytest.mark.slow
@pytest.mark.parametrize("case", _varlen_grid(), ids=[_varlen_id(c) for c in _varlen_grid()])
def test_varlen_grid_full(backend, case):
    _run_varlen_case(backend, case)


VARLEN_FEATURES = [
    # (name, lens_q, lens_k, group, d, dtype, kwargs)
    ("window", [113, 40], [239, 90], 2, 64, BF16, dict(window_size=(37, 11))),
    ("window-left-causal", [239, 1], [200, 130], 1, 128, FP16, dict(causal=True, window_size=(70, -1))),
    ("alibi-per-sequence-causal", [113, 0, 60], [100, 9, 239], 5, 64, FP16, dict(causal=True, alibi="bh")),
    ("softcap-alibi", [1, 129], [130, 64], 2, 128, BF16, dict(softcap=10.0, alibi="h")),
    ("causal-top-left", [113, 239], [239, 113], 2, 64, BF16, dict(causal=True, causal_align="top_left")),
    ("d256-window-softcap", [70, 150], [203, 64], 2, 256, FP16, dict(window_size=(90, 3), softcap=8.0)),
]


@pytest.mark.parametrize("feat", VARLEN_FEATURES, ids=[f[0] for f in VARLEN_FEATURES])
def test_varlen_features(backend, feat):
    name, lens_q, lens_k, group, d, dtype, kw = feat
    _require(backend, d)
    hkv = 1 if group == 5 else 2
    q, k, v = _packed(lens_q, lens_k, group * hkv, hkv, d, dtype, seed=len(name))
    kw = dict(kw)
    if "alibi" in kw:
        kw["alibi_slopes"] = _alibi(len(lens_q), group * hkv, per_batch=kw.pop("alibi") == "bh")
    _varlen_check(q, k, v, lens_q, lens_k, config=name, **kw)


@pytest.mark.parametrize("fwd", ["sm90", "sm80"])
def test_varlen_neighbouring_sequence_does_not_leak(backend, fwd, monkeypatch):
    """Sequence 1's tokens (and the tokens past cu[-1]) hold inf and NaN in q, k and v. The last tile of sequence 0
    and of sequence 2 reads them (TMA zero-fills only past the tensor's end): their scores are masked, and V's rows
    there must not reach P V (0 * inf = NaN). Sequences 0 and 2 must equal the reference on clean inputs, on
    both forwards."""
    _require(backend, 128)
    monkeypatch.setenv("TILEFORMER_CUDA_ATTN_FWD", fwd)
    lens_q, lens_k = [113, 50, 70], [113, 60, 39]
    for causal in (False, True):
        q, k, v = _packed(lens_q, lens_k, 4, 2, 128, FP16, seed=21, extra=20)
        cu_q, cu_k = _cu(lens_q), _cu(lens_k)
        for t, cu in ((q, cu_q), (k, cu_k), (v, cu_k)):
            t[cu[1]:cu[2], 0] = float("inf")
            t[cu[1]:cu[2], 1:] = float("nan")
            t[cu[3]:] = float("inf")
        before = _count()
        out, lse = transformer.flash_attention_varlen(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal,
                                                      return_lse=True, backend="cuda", validate=False)
        if before is not None:
            assert (_count() > before) == (fwd == "sm90"), f"{fwd}: the wrong forward ran"
        for i in (0, 2):
            qs, qe, ks, ke = cu_q[i].item(), cu_q[i + 1].item(), cu_k[i].item(), cu_k[i + 1].item()
            one = (q[None, qs:qe], k[None, ks:ke], v[None, ks:ke])
            ref, ref_lse = reference.attention(*one, causal=causal, return_lse=True)
            low, low_lse = reference.attention(*one, causal=causal, return_lse=True, compute_dtype=None)
            config = f"{fwd} sequence {i} causal={causal}"
            helpers.assert_close(out[None, qs:qe], ref, low, config=config)
            helpers.assert_close(lse[None, :, qs:qe], ref_lse, low_lse.float(), name="lse", config=config)


def test_varlen_equals_dense_sm90_bit_for_bit(backend):
    """Each sequence of a varlen call gives bit for bit the dense sm_90a forward of that sequence alone (same
    tiles from the sequence start; rows past the sequence: masked scores, zeroed V rows), and equal-length
    sequences give the dense batch."""
    _require(backend)
    lens_q, lens_k = [113, 1, 239], [239, 130, 0]
    q, k, v = _packed(lens_q, lens_k, 4, 2, 64, BF16, seed=23)
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    for causal in (False, True):
        out, lse = transformer.flash_attention_varlen(q, k, v, cu_q, cu_k, 239, 239, causal=causal, return_lse=True,
                                                      backend="cuda")
        for i in range(3):
            qs, qe, ks, ke = cu_q[i].item(), cu_q[i + 1].item(), cu_k[i].item(), cu_k[i + 1].item()
            if ke == ks:   # no key: out 0, lse -inf (the dense forward needs max_seqlen_k >= 1 for sm90)
                assert not out[qs:qe].any() and torch.isneginf(lse[:, qs:qe]).all()
                continue
            o1, l1 = transformer.flash_attention(q[None, qs:qe], k[None, ks:ke], v[None, ks:ke], causal=causal,
                                                 return_lse=True, backend="cuda")
            assert torch.equal(out[qs:qe], o1[0]), f"out of sequence {i}, causal={causal}"
            assert torch.equal(lse[:, qs:qe], l1[0]), f"lse of sequence {i}, causal={causal}"
    qd, kd, vd = _inputs(3, 70, 90, 4, 2, 64, FP16, seed=24)
    dense = transformer.flash_attention(qd, kd, vd, causal=True, backend="cuda")
    flat = transformer.flash_attention_varlen(qd.flatten(0, 1), kd.flatten(0, 1), vd.flatten(0, 1), _cu([70] * 3),
                                              _cu([90] * 3), 70, 90, causal=True, backend="cuda")
    assert torch.equal(flat, dense.flatten(0, 1))


def _raw_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal=True):
    """The raw forward op (no Python-side cleaning of cu_seqlens): bottom-right causal or full, scale 1/8."""
    cu = lambda c: torch.tensor(c, dtype=torch.int32, device=helpers.DEVICE)  # noqa: E731
    return _ops().attn_fwd(q, k, v, None, cu(cu_q), cu(cu_k), max_q, max_k, 0.125, -1, 0 if causal else -1, 0.0,
                           True)


INT_MAX, INT_MIN = 2 ** 31 - 1, -2 ** 31


def test_varlen_invalid_cu_seqlens(backend):
    """Invalid cu_seqlens values under the emulator's bounds checks (the autouse fixture): as documented in
    attention.h, sequence b spans [clamp(cu[b], 0, total), clamp(cu[b + 1], start, total)); tokens in no sequence
    get out 0, lse -inf. The sm_90a forward gives bit for bit its result on the clamped values."""
    _require(backend)
    q, k, v = _packed([50], [70], 2, 1, 64, FP16, seed=25)
    cases = [
        ([0, 20, 59], [0, 30, 170], [0, 20, 50], [0, 30, 70], 40, 80),                  # past total
        ([-50, 20, INT_MAX], [-7, 25, INT_MAX], [0, 20, 50], [0, 25, 70], 50, 70),      # negative / huge
        ([INT_MIN, 10, 10], [0, INT_MIN, 30], [0, 10, 10], [0, 0, 30], 50, 70),         # INT_MIN
        ([0, 30, 10, 10], [0, 20, 40, 70], [0, 30, 30, 30], [0, 20, 40, 70], 30, 30),    # non-monotone
    ]
    for bad_q, bad_k, good_q, good_k, max_q, max_k in cases:
        for causal in (False, True):
            before = _count()
            got = _raw_varlen(q, k, v, bad_q, bad_k, max_q, max_k, causal)
            pairs = zip(good_q, good_q[1:], good_k, good_k[1:])
            if before is not None and any(qe > qs and ke > ks for qs, qe, ks, ke in pairs):
                assert _count() > before, f"{bad_q} {bad_k}: the sm_90a forward did not run"
            want = _raw_varlen(q, k, v, good_q, good_k, max_q, max_k, causal)
            for a, b, name in zip(got, want, ("out", "lse")):
                assert torch.equal(a, b), f"{name} for cu_q {bad_q}, cu_k {bad_k}, causal={causal}"
    for cu_q, cu_k in (([INT_MAX, INT_MAX], [INT_MAX, INT_MAX]), ([-5, -1], [-9, -2]), ([0, 50], [70, 70])):
        out, lse = _raw_varlen(q, k, v, cu_q, cu_k, 64, 64)
        assert not out.any() and torch.isneginf(lse).all(), f"no key or no query: {cu_q} {cu_k}"


def test_varlen_empty_and_max_seqlen_k_zero(backend):
    """No key token at all (k, v with 0 rows): out 0, lse -inf from the sm_90a forward. max_seqlen_k = 0 runs the
    sm_80 forward (attn_fwd_sm90_reason), which still sees every key of the sequences."""
    _require(backend)
    q, _, _ = _packed([5, 9], [1], 2, 1, 64, BF16, seed=26)
    k = v = torch.empty(0, 1, 64, dtype=BF16, device=helpers.DEVICE)
    before = _count()
    out, lse = _raw_varlen(q, k, v, [0, 5, 14], [0, 0, 0], 9, 4)
    if before is not None:
        assert _count() == before, "no key tile: no wgmma"
    assert not out.any() and torch.isneginf(lse).all()
    q, k, v = _packed([5, 9], [7, 3], 2, 1, 64, BF16, seed=27)
    assert "max_seqlen_k = 0" in _ops().attn_fwd_sm90_reason(64, True, 0)
    before = _count()
    got = _raw_varlen(q, k, v, [0, 5, 14], [0, 7, 10], 9, 0)
    if before is not None:
        assert _count() == before, "max_seqlen_k = 0 ran the sm_90a forward"
    cu_q, cu_k = _cu([5, 9]), _cu([7, 3])
    kw = dict(causal=True, softmax_scale=0.125, return_lse=True, validate=False)
    ref, ref_lse = reference.attention_varlen(q, k, v, cu_q, cu_k, **kw)
    low, low_lse = reference.attention_varlen(q, k, v, cu_q, cu_k, compute_dtype=None, **kw)
    helpers.assert_close(got[0], ref, low, config="max_seqlen_k 0 (sm80)")
    helpers.assert_close(got[1], ref_lse, low_lse.float(), name="lse", config="max_seqlen_k 0 (sm80)")


# ---------------------------------------------------------------------------------------------
# The choice of the forward kernel
# ---------------------------------------------------------------------------------------------

def test_calls_sm90_does_not_serve_run_sm80(backend):
    """Head dims that run as 32, 96 or 192 (in builds with those kernels) fall back to the sm_80 forward, correct
    and without wgmma; varlen calls run the sm_90a forward."""
    _require(backend)
    if 192 in _ca().head_dims(helpers.DEVICE.type):
        q, k, v = _inputs(1, 70, 90, 2, 1, 192, FP16, seed=12)
        _fwd_check(q, k, v, causal=True, config="d192", sm90=False)
    assert _ops().attn_fwd_sm90_reason(64, True, -1) == ""
    assert "max_seqlen_k = 0" in _ops().attn_fwd_sm90_reason(64, False, 0)
    assert "exceeds every compiled head dim" in _ops().attn_fwd_sm90_reason(264, False, -1)
    if 192 in _ca().head_dims(helpers.DEVICE.type):
        assert "head dims 64, 128 and 256" in _ops().attn_fwd_sm90_reason(192, False, -1)
    for d in _ca().head_dims(helpers.DEVICE.type):
        for varlen in (False, True):
            assert (_ops().attn_fwd_sm90_reason(d, varlen, -1) == "") == (d in (64, 128, 256))


def test_dropout_runs_sm80(backend, monkeypatch):
    """The sm_90a forward has no dropout mask: with TILEFORMER_CUDA_ATTN_FWD=sm90 a dropout call runs the sm_80
    forward (no wgmma) and equals the cuda forward forced to sm80 with the same generator state bit for bit."""
    _require(backend)
    q, k, v = _inputs(1, 70, 90, 2, 1, 64, FP16, seed=14)
    before = _count()
    out = transformer.flash_attention(q, k, v, dropout_p=0.3, generator=torch.Generator().manual_seed(5),
                                      backend="cuda")
    if before is not None:
        assert _count() == before, "a dropout call ran the sm_90a forward"
    call = dict(device=q.device, head_dim=64, varlen=False, dropout=0.3)
    assert "dropout" in _ca().describe_path(call)
    monkeypatch.setenv("TILEFORMER_CUDA_ATTN_FWD", "sm80")
    sm80 = transformer.flash_attention(q, k, v, dropout_p=0.3, generator=torch.Generator().manual_seed(5),
                                       backend="cuda")
    assert torch.equal(out, sm80)


def test_sm80_forced_and_bad_value(backend, monkeypatch):
    _require(backend)
    q, k, v = _inputs(1, 113, 239, 2, 2, 64, BF16, seed=14)
    monkeypatch.setenv("TILEFORMER_CUDA_ATTN_FWD", "sm80")
    _fwd_check(q, k, v, causal=True, config="sm80", sm90=False)
    monkeypatch.setenv("TILEFORMER_CUDA_ATTN_FWD", "auto")
    if not helpers.HAS_GPU:   # auto keeps the emulator on the sm_80 kernel
        _fwd_check(q, k, v, causal=True, config="auto", sm90=False)
    monkeypatch.setenv("TILEFORMER_CUDA_ATTN_FWD", "hopper")
    with pytest.raises(ValueError, match="TILEFORMER_CUDA_ATTN_FWD must be"):
        transformer.flash_attention(q, k, v, backend="cuda")


def test_explain_names_the_forward_kernel(backend, monkeypatch):
    _require(backend)
    q, k, v = _inputs(1, 8, 8, 2, 2, 64, FP16)
    text = transformer.backends.explain("flash_attention", q, k, v, backend="cuda")
    assert "cuda: selected (forward sm90 (wgmma + TMA)" in text, text
    cu = torch.tensor([0, 3, 8], dtype=torch.int32, device=helpers.DEVICE)
    text = transformer.backends.explain("flash_attention_varlen", q[0], k[0], v[0], cu, cu, 5, 5, backend="cuda")
    assert "cuda: selected (forward sm90 (wgmma + TMA)" in text, text
    monkeypatch.setenv("TILEFORMER_CUDA_ATTN_FWD", "sm80")
    assert "forward sm80 (mma.sync, w8 tiles): TILEFORMER_CUDA_ATTN_FWD=sm80" in transformer.backends.explain(
        "flash_attention", q, k, v, backend="cuda")
    if not helpers.HAS_GPU:
        monkeypatch.setenv("TILEFORMER_CUDA_ATTN_FWD", "auto")
        assert "the emulator runs sm90 only with TILEFORMER_CUDA_ATTN_FWD=sm90" in transformer.backends.explain(
            "flash_attention", q, k, v, backend="cuda")


def test_auto_guard_self_test(backend, monkeypatch):
    """The check "auto" runs before the first sm90 use on a 9.0 GPU: the sm_90a self-tests pass here (emulator)
    and a namespace whose wgmma gives wrong numbers (the self-test's SBO mutation) fails them: the state records
    0 and one warning names the failure; later calls neither rerun nor warn."""
    _require(backend)
    ca = _ca()
    from transformer._cuda.selftest import hopper_check
    assert hopper_check(_ops(), helpers.DEVICE) == ""
    real = _ops()

    class Broken:
        state = -1

        def __getattr__(self, name):
            return getattr(real, name)

        def selftest_wgmma(self, a, b, c, n, swizzle, a_regs, b_mn, mutate):
            return real.selftest_wgmma(a, b, c, n, swizzle, a_regs, b_mn, 1)   # B's SBO 16 bytes short

        def attn_fwd_sm90_verified(self, state):
            if state in (0, 1):
                Broken.state = state
            return Broken.state

    monkeypatch.setattr(ca, "ops", lambda device: Broken())
    with pytest.warns(RuntimeWarning, match="sm_90a attention forward is not used: its wgmma / TMA self-tests "
                                            "failed .*max error"):
        assert ca._sm90_verified(helpers.DEVICE) is False
    assert Broken.state == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ca._sm90_verified(helpers.DEVICE) is False


@pytest.mark.parametrize("excluded", ["q", "k", "v", "out", "lse"])
def test_accesses_are_bounds_checked(backend, excluded, monkeypatch):
    """The emulated TMA loads and the epilogue's stores are checked against the call's tensors: with one tensor
    left out of the checked set, the kernel's first access to it fails."""
    _require(backend)
    if helpers.HAS_GPU:
        pytest.skip("emulator bounds checks")
    monkeypatch.setenv("TILEFORMER_EMU_CHECK_BOUNDS_EXCLUDE", excluded)
    q, k, v = _inputs(1, 40, 50, 2, 1, 64, FP16, seed=15)
    what = "TMA load global read" if excluded in ("q", "k", "v") else "global memory access"
    with pytest.raises(RuntimeError, match=f"{what}.*attn_fwd_sm90_kernel|attn_fwd_sm90_kernel.*{what}"):
        transformer.flash_attention(q, k, v, backend="cuda", return_lse=True)
