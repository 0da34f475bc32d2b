"""CUDA C++ flash attention (csrc/attention/) beyond the shared tests of tests/test_attention.py.

On a CPU machine the kernels run through the host emulation (TILEFORMER_EMULATE_CUDA=1): every ldmatrix,
mma.sync and cp.async is emulated lane by lane, shared memory and outputs are NaN-poisoned, threads run in
a random order. Comparisons use the flash-attn rule (helpers.assert_close: 2x / 3x the error of PyTorch in
the inputs' dtype). The grid of shapes runs in a representative rotation by default and in full
under ``-m slow``; the static checks (``-m static``) compile the kernels with nvcc for sm_80 and sm_90a.
"""
from __future__ import annotations

import glob
import itertools
import os

import pytest
import torch

import transformer
from transformer import reference

import helpers

FP16, BF16 = torch.float16, torch.bfloat16
CUDA = helpers.kernel_backends("cuda")
HEADS = {"mha": (2, 2), "gqa": (4, 1)}          # GQA 4:1
PAIRS = [(1, 130), (113, 203), (128, 128), (200, 64), (257, 300)]


def _ops():
    from transformer import _cuda
    return _cuda.ops(helpers.DEVICE)


@pytest.fixture(autouse=True)
def _bounds_checked(monkeypatch):
    """The emulated kernels check that every global-memory access lies inside the call's tensors
    (csrc/common/gmem.h); a no-op on a GPU."""
    monkeypatch.setenv("TILEFORMER_EMU_CHECK_BOUNDS", "1")


def _dims():
    from transformer._cuda import attention as ca
    return ca.head_dims(helpers.DEVICE.type)


def _inputs(b, nq, nk, hq, hkv, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda n, h: torch.randn(b, n, h, d, generator=g).to(helpers.DEVICE, dtype).requires_grad_(True)  # noqa
    return mk(nq, hq), mk(nk, hkv), mk(nk, hkv)


def _alibi(b, hq, per_batch=False, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(*((b, hq) if per_batch else (hq,)), generator=g) * 0.5 + 0.05).to(helpers.DEVICE)


def _check(q, k, v, *, config, backend="cuda", **kw):
    """Forward (out, lse) and backward (dq, dk, dv) vs the fp32 reference and PyTorch in q's dtype."""
    out, lse = transformer.flash_attention(q, k, v, return_lse=True, backend=backend, **kw)
    ref, ref_lse = reference.attention(q, k, v, return_lse=True, **kw)
    low, low_lse = reference.attention(q, k, v, return_lse=True, compute_dtype=None, **kw)
    helpers.assert_close(out, ref, low, config=config)
    helpers.assert_close(lse, ref_lse, low_lse.float(), name="lse", config=config)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out.device, out.dtype)
    got = torch.autograd.grad(out, (q, k, v), dout)
    want = torch.autograd.grad(ref, (q, k, v), dout.float())
    base = torch.autograd.grad(low, (q, k, v), dout)
    for name, a, r, rl in zip(("dq", "dk", "dv"), got, want, base):
        helpers.assert_close(a, r, rl, factor=3.0, name=name, config=config)
    return out, lse, got


# ---------------------------------------------------------------------------------------------
# The grid: (Nq, Nk) x head dim x MHA/GQA 4:1 x causal, plus window / ALiBi / softcap
# ---------------------------------------------------------------------------------------------

def _grid():
    return list(itertools.product(PAIRS, (64, 128), ("mha", "gqa"), (False, True)))


def _rotation():
    """Every pair, head dim, head layout and causal value at least once (and every pair with both dims)."""
    cases = []
    for i, pair in enumerate(PAIRS):
        for j, d in enumerate((64, 128)):
            cases.append((pair, d, ("mha", "gqa")[(i + j) % 2], bool((i + j + 1) % 2)))
    return cases


def _id(c):
    (nq, nk), d, heads, causal = c
    return f"{nq}x{nk}-d{d}-{heads}" + ("-causal" if causal else "")


def _run_grid_case(case):
    (nq, nk), d, heads, causal = case
    if d not in _dims():
        pytest.skip(f"head dim {d} is not compiled into this build (TILEFORMER_CUDA_HEADDIMS): {_dims()}")
    hq, hkv = HEADS[heads]
    dtype = BF16 if (nq + d) % 2 else FP16
    q, k, v = _inputs(1, nq, nk, hq, hkv, d, dtype, seed=nq + nk + d)
    _check(q, k, v, causal=causal, config=f"{_id(case)} {dtype}")


@pytest.mark.parametrize("backend", CUDA)
@pytest.mark.parametrize("case", _rotation(), ids=[_id(c) for c in _rotation()])
def test_grid(backend, case):
    helpers.require_backend(backend)
    _run_grid_case(case)


@pytest.mark.slow
@pytest.mark.parametrize("backend", CUDA)
@pytest.mark.parametrize("case", _grid(), ids=[_id(c) for c in _grid()])
def test_grid_full(backend, case):
    helpers.require_backend(backend)
    _run_grid_case(case)


FEATURES = [
    # (name, nq, nk, heads, d, dtype, kwargs)
    ("window", 113, 203, "gqa", 64, BF16, dict(window_size=(37, 11))),
    ("window-causal", 257, 300, "mha", 128, FP16, dict(causal=True, window_size=(70, -1))),
    ("alibi", 200, 64, "gqa", 64, FP16, dict(alibi=True)),
    ("alibi-batch-causal", 113, 203, "mha", 128, BF16, dict(causal=True, alibi="bh")),
    ("softcap", 128, 128, "mha", 64, BF16, dict(softcap=4.0)),
    ("softcap-alibi-window", 1, 130, "gqa", 128, FP16, dict(softcap=10.0, alibi=True, window_size=(50, 50))),
]


@pytest.mark.parametrize("backend", CUDA)
@pytest.mark.parametrize("feat", FEATURES, ids=[f[0] for f in FEATURES])
def test_features(backend, feat):
    helpers.require_backend(backend)
    name, nq, nk, heads, d, dtype, kw = feat
    hq, hkv = HEADS[heads]
    b = 2 if kw.get("alibi") == "bh" else 1
    q, k, v = _inputs(b, nq, nk, hq, hkv, d, dtype, seed=len(name))
    kw = dict(kw)
    if "alibi" in kw:
        kw["alibi_slopes"] = _alibi(b, hq, per_batch=kw.pop("alibi") == "bh")
    _check(q, k, v, config=name, **kw)


@pytest.mark.parametrize("backend", CUDA)
@pytest.mark.parametrize("d", [32, 96, 192, 256], ids=lambda d: f"d{d}")
def test_other_head_dims(backend, d):
    """Head dims beyond 64 / 128. 256 is in the default build (dK/dV accumulated in two 128-column slices, see
    csrc/attention/bwd.cuh); 32, 96 and 192 have kernels only in builds that ask for them
    (TILEFORMER_CUDA_HEADDIMS=all or a list naming them), else they run padded (test_padded_head_dims)."""
    helpers.require_backend(backend)
    if d not in _dims():
        pytest.skip(f"head dim {d} not instantiated in this build (TILEFORMER_CUDA_HEADDIMS): {_dims()}")
    for (nq, nk), heads, causal in (((113, 203), "gqa", True), ((200, 64), "mha", False)):
        q, k, v = _inputs(1, nq, nk, *HEADS[heads], d, BF16 if causal else FP16, seed=d + nq)
        _check(q, k, v, causal=causal, window_size=(-1, -1) if causal else (50, 20), config=f"d{d} {nq}x{nk}")


@pytest.mark.parametrize("backend", CUDA)
@pytest.mark.parametrize("tiles", ["w4", "w8"])
def test_forward_tile_variants(backend, tiles, monkeypatch):
    """Both forward tile variants (csrc/attention/launch.cuh FwdTiles, chosen per call by
    TILEFORMER_CUDA_ATTN_FWD_TILES so a GPU benchmark can time them side by side) at every default head dim,
    with a partial last block, causal GQA and a window; the default (w8) is also what every other test runs."""
    helpers.require_backend(backend)
    monkeypatch.setenv("TILEFORMER_CUDA_ATTN_FWD_TILES", tiles)
    for d in (64, 128, 256):
        if d not in _dims():
            continue
        q, k, v = _inputs(1, 150, 203, 4, 1, d, BF16 if d == 128 else FP16, seed=d + len(tiles))
        _check(q, k, v, causal=True, config=f"{tiles} d{d} causal")
        q, k, v = _inputs(2, 33, 140, 2, 2, d, FP16, seed=d)
        _check(q, k, v, window_size=(40, 10), config=f"{tiles} d{d} window")


@pytest.mark.parametrize("backend", CUDA)
def test_forward_tile_variant_bad_value(backend, monkeypatch):
    helpers.require_backend(backend)
    monkeypatch.setenv("TILEFORMER_CUDA_ATTN_FWD_TILES", "w16")
    q, k, v = _inputs(1, 8, 8, 2, 2, 64, FP16)
    with pytest.raises(ValueError, match="TILEFORMER_CUDA_ATTN_FWD_TILES must be"):
        transformer.flash_attention(q, k, v, backend=backend)


@pytest.mark.parametrize("backend", CUDA)
@pytest.mark.parametrize("d", [8, 40, 80, 111, 136, 200], ids=lambda d: f"d{d}")
def test_padded_head_dims(backend, d):
    """Head dims that are not compiled: zero-padded to a multiple of 8, run with the next compiled one (136 and
    200 with the 256 kernel: its second dK/dV column slice then holds 8 / 72 real columns)."""
    helpers.require_backend(backend)
    if (d + 7) // 8 * 8 > max(_dims()):
        pytest.skip(f"head dim {d} exceeds every head dim compiled into this build: {_dims()}")
    q, k, v = _inputs(1, 70, 90, 4, 1, d, FP16 if d % 16 else BF16, seed=d)
    _check(q, k, v, causal=True, config=f"d{d}")


@pytest.mark.parametrize("backend", CUDA)
def test_varlen(backend):
    helpers.require_backend(backend)
    lens_q, lens_k = [1, 113, 0, 130, 64], [130, 203, 5, 128, 1]
    cu_q = torch.tensor([0] + list(itertools.accumulate(lens_q)), dtype=torch.int32, device=helpers.DEVICE)
    cu_k = torch.tensor([0] + list(itertools.accumulate(lens_k)), dtype=torch.int32, device=helpers.DEVICE)
    g = torch.Generator().manual_seed(5)
    mk = lambda n, h: torch.randn(n, h, 64, generator=g).to(helpers.DEVICE, BF16).requires_grad_(True)  # noqa
    q, k, v = mk(sum(lens_q) + 3, 8), mk(sum(lens_k) + 2, 2), mk(sum(lens_k) + 2, 2)   # + tokens past cu[-1]
    kw = dict(causal=True, alibi_slopes=_alibi(len(lens_q), 8, per_batch=True), window_size=(90, -1))
    args = (q, k, v, cu_q, cu_k, max(lens_q), max(lens_k))
    out, lse = transformer.flash_attention_varlen(*args, return_lse=True, backend="cuda", **kw)
    ref, ref_lse = reference.attention_varlen(*args, return_lse=True, **kw)
    low, low_lse = reference.attention_varlen(*args, return_lse=True, compute_dtype=None, **kw)
    helpers.assert_close(out, ref, low, config="varlen")
    helpers.assert_close(lse, ref_lse, low_lse, name="lse", config="varlen")
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out.dtype)
    for name, a, r, rl in zip(("dq", "dk", "dv"), torch.autograd.grad(out, (q, k, v), dout),
                              torch.autograd.grad(ref, (q, k, v), dout.float()),
                              torch.autograd.grad(low, (q, k, v), dout)):
        helpers.assert_close(a, r, rl, factor=3.0, name=name, config="varlen")


# ---------------------------------------------------------------------------------------------
# Cross-check: the CUDA kernels (emulated) and the Triton kernels (interpreted) on the same inputs
# ---------------------------------------------------------------------------------------------

CROSS = [(113, 203, "gqa", 64, BF16, dict(causal=True)),
         (130, 141, "mha", 128, FP16, dict(softcap=3.0, window_size=(60, 20)))]


@pytest.mark.parametrize("backend", CUDA)
@pytest.mark.parametrize("case", CROSS, ids=["gqa-causal-d64-bf16", "mha-softcap-window-d128-fp16"])
def test_cross_check_with_triton(backend, case):
    """The two kernel backends agree within 2x (outputs) / 3x (gradients) PyTorch's own low-precision error."""
    helpers.require_backend(backend)
    helpers.require_backend("triton")
    nq, nk, heads, d, dtype, kw = case
    q, k, v = _inputs(1, nq, nk, *HEADS[heads], d, dtype, seed=nq)
    low = reference.attention(q, k, v, compute_dtype=None, **kw)
    dout = torch.randn(low.shape, generator=torch.Generator().manual_seed(9)).to(dtype)
    res = {}
    for b in ("cuda", "triton"):
        out = transformer.flash_attention(q, k, v, backend=b, **kw)
        res[b] = (out,) + tuple(torch.autograd.grad(out, (q, k, v), dout))
    lows = (low,) + tuple(torch.autograd.grad(low, (q, k, v), dout))
    for i, name in enumerate(("out", "dq", "dk", "dv")):
        helpers.assert_close(res["cuda"][i], res["triton"][i], lows[i], factor=2.0 if i == 0 else 3.0, name=name,
                             config=f"cuda vs triton {case}")


# ---------------------------------------------------------------------------------------------
# Layouts, alignment, determinism, dispatch limits, op registration, bad input
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", CUDA)
def test_misaligned_views_are_copied(backend):
    """A view whose base is not 16-byte aligned (storage offset 1) is read through an aligned copy."""
    helpers.require_backend(backend)
    g = torch.Generator().manual_seed(4)
    flat = torch.randn(1 + 2 * 50 * 2 * 64, generator=g).to(FP16)
    q = flat[1:].view(2, 50, 2, 64).requires_grad_(True)
    k, v = (torch.randn(2, 61, 1, 64, generator=g).to(FP16).requires_grad_(True) for _ in range(2))
    assert q.data_ptr() % 16 != 0
    _check(q, k, v, causal=True, config="misaligned")


@pytest.mark.parametrize("backend", CUDA)
def test_deterministic_gqa_bit_identical(backend):
    helpers.require_backend(backend)
    q, k, v = _inputs(1, 75, 140, 8, 2, 64, BF16, seed=3)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(BF16)
    runs = []
    for _ in range(2):
        out = transformer.flash_attention(q, k, v, window_size=(40, 3), deterministic=True, backend="cuda")
        runs.append((out,) + torch.autograd.grad(out, (q, k, v), dout))
    for name, a, b in zip(("out", "dq", "dk", "dv"), *runs):
        assert torch.equal(a, b), f"{name} differs between two deterministic runs"


@pytest.mark.parametrize("backend", CUDA)
def test_dispatch_limits(backend, monkeypatch):
    """The supports predicate states every limit; an explicit backend="cuda" raises it, auto moves on."""
    helpers.require_backend(backend)
    dims = _dims()
    assert dims and all(d % 16 == 0 for d in dims), dims
    from transformer._cuda import attention as ca
    q, k, v = (t.detach() for t in _inputs(1, 4, 4, 2, 2, 32, torch.float32))
    assert "fp16/bf16" in ca.supports(transformer.attention._describe(q, k, v))
    fits = torch.zeros(1, 4, 2, max(dims), dtype=FP16, device=helpers.DEVICE)
    assert ca.supports(transformer.attention._describe(fits, fits, fits)) is None
    small = [d for d in dims if d < max(dims)] or [16]   # a build whose largest head dim is max(small)
    big = max(small) + 8
    qb = torch.zeros(1, 4, 2, big, dtype=FP16, device=helpers.DEVICE)
    monkeypatch.setattr(ca, "head_dims", lambda device_type: tuple(small))
    reason = ca.supports(transformer.attention._describe(qb, qb, qb))
    assert reason and "TILEFORMER_CUDA_HEADDIMS" in reason and str(big) in reason, reason
    with pytest.raises(ValueError, match="TILEFORMER_CUDA_HEADDIMS"):
        transformer.flash_attention(qb, qb, qb, backend="cuda")
    assert transformer.flash_attention(qb, qb, qb, backend="auto").shape == qb.shape   # falls back


def test_opcheck_cuda_ops():
    helpers.require_backend("cuda")
    ops = _ops()
    q, k, v = (t.detach() for t in _inputs(1, 20, 33, 4, 2, 64, FP16, seed=23))
    alibi = _alibi(1, 4)
    args = (q, k, v, alibi, None, None, 20, 33, 0.125, -1, 0, 0.0, True)
    torch.library.opcheck(ops.attn_fwd, args)
    out, lse = ops.attn_fwd(*args)
    dout = torch.randn_like(out)
    torch.library.opcheck(ops.attn_bwd, (dout, q, k, v, out, lse, None) + args[3:])
    cu_q = torch.tensor([0, 1, 20], dtype=torch.int32)
    cu_k = torch.tensor([0, 20, 33], dtype=torch.int32)
    torch.library.opcheck(ops.attn_fwd, (q[0].requires_grad_(), k[0], v[0], None, cu_q, cu_k, 19, 20, 0.25, 4, -1,
                                         2.0, False))


def _bad_calls():
    ops = _ops()
    q, k, v = (t.detach() for t in _inputs(1, 8, 8, 4, 2, 64, FP16))
    base = (None, None, None, 8, 8, 0.125, -1, -1, 0.0, True)
    d12 = torch.zeros(1, 8, 4, 12, dtype=FP16)
    yield "head-dim-not-8", lambda: ops.attn_fwd(d12, d12[:, :, :2], d12[:, :, :2], *base), ValueError, "multiple of 8"
    yield "dtype", lambda: ops.attn_fwd(q.float(), k.float(), v.float(), *base), TypeError, "q must be float16"
    yield "k-dtype", lambda: ops.attn_fwd(q, k.to(BF16), v, *base), TypeError, "k and v"
    yield "heads", lambda: ops.attn_fwd(q[:, :, :3], k, v, *base), ValueError, "multiple of the number of KV heads"
    yield "alibi-shape", lambda: ops.attn_fwd(q, k, v, torch.ones(3), *base[1:]), ValueError, "alibi_slopes"
    yield "max-seqlen", lambda: ops.attn_fwd(q, k, v, None, None, None, 9, 8, 0.1, -1, -1, 0.0, True), ValueError, \
        "max_seqlen"
    cu = torch.tensor([0, 8], dtype=torch.int64)
    yield "cu-dtype", lambda: ops.attn_fwd(q[0], k[0], v[0], None, cu, cu, 8, 8, 0.1, -1, -1, 0.0, True), TypeError, \
        "cu_seqlens_q"
    yield "window", lambda: ops.attn_fwd(q, k, v, None, None, None, 8, 8, 0.1, -2, 0, 0.0, True), ValueError, "window"


@pytest.mark.parametrize("which", ["head-dim-not-8", "dtype", "k-dtype", "heads", "alibi-shape", "max-seqlen",
                                   "cu-dtype", "window"])
def test_op_bad_input(which):
    helpers.require_backend("cuda")
    calls = {name: (fn, exc, match) for name, fn, exc, match in _bad_calls()}
    fn, exc, match = calls[which]
    with pytest.raises(exc, match=match):
        fn()


# ---------------------------------------------------------------------------------------------
# Static checks of the GPU build (nvcc, no GPU needed)
# ---------------------------------------------------------------------------------------------

# attention.cu and every generated instantiation unit (inst/*.cu: one per direction and head-dim pair)
_ATTN_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc", "attention")
ATTN_SOURCES = ["attention.cu"] + sorted(os.path.relpath(f, _ATTN_DIR)
                                         for f in glob.glob(os.path.join(_ATTN_DIR, "inst", "*.cu")))


@pytest.fixture(scope="module")
def attn_report():
    from benchmarks import kernel_report
    if not os.path.exists(kernel_report._nvcc()):
        pytest.skip(f"nvcc not found at {kernel_report._nvcc()} (set CUDA_HOME)")
    srcs = [os.path.join(kernel_report.ROOT, "csrc", "attention", s) for s in ATTN_SOURCES]
    stats = kernel_report.nvcc_report(sources=srcs)
    print("\n" + kernel_report.format_table(stats))
    return stats


@pytest.mark.static
def test_static_no_spills(attn_report):
    names = {s.name for s in attn_report}
    for kind in ("attn_fwd_kernel", "attn_bwd_dkdv_kernel", "attn_bwd_dq_kernel", "attn_bwd_dkdvdq_kernel"):
        for arch in (80, 90):
            assert any(kind in s.name and s.arch == arch for s in attn_report), f"{kind} sm_{arch} missing: {names}"
            # the DROPOUT instantiation (the last template argument) is checked too
            assert any(kind in s.name and s.arch == arch and s.name.split("(")[0].endswith(", true>")
                       for s in attn_report), f"{kind} sm_{arch} with dropout missing: {names}"
    bad = [f"{s.name} sm_{s.arch}: {s.registers} regs, spills {s.spill_stores}/{s.spill_loads} B, local "
           f"{s.local_bytes} B" for s in attn_report if s.spills or s.local_bytes]
    assert not bad, "attention kernels with spills or local memory:\n" + "\n".join(bad)


@pytest.mark.static
def test_static_tensor_cores(attn_report):
    mma_kernels = [s for s in attn_report if s.arch == 80 and any(
        k in s.name for k in ("attn_fwd_kernel", "attn_bwd_dkdv_kernel", "attn_bwd_dq_kernel",
                              "attn_bwd_dkdvdq_kernel"))]
    # 4 kernels x 2 dtypes x (64, 128, 256) x (without, with dropout)
    assert len(mma_kernels) >= 48, [s.name for s in mma_kernels]
    for s in mma_kernels:
        assert s.instructions.get("HMMA", 0) > 0, f"{s.name}: no HMMA in the sm_80 SASS ({s.instructions})"
        assert s.instructions.get("LDSM", 0) > 0, f"{s.name}: no LDSM (ldmatrix) in the sm_80 SASS"
