"""Index values that are not validated follow one semantics on every backend (transformer/_checks.py), index
tensors are read through their strides, and scalar arguments are checked the same way everywhere.

Semantics (validate=False; CPU tensors are validated by default):
* decode: visible length clamp(cache_seqlens + appended, 0, capacity); appends outside the cache, or into a
  page id outside 0..num_pages-1, are dropped; such a page holds no visible token.
* varlen: sequence b spans [clamp(cu[b], 0, T), clamp(cu[b+1], start, T)); tokens in no sequence give 0.
* padded attention / key lengths: 0 <= start <= end <= Nk by clamping.

Every backend is compared with the reference (fp32) by the flash-attn rule, and identities that do not go
through the reference pin the semantics themselves (a length past the capacity is the capacity, and so on).
The kernel backends never touch memory outside their tensors here: the caches' unused slots hold NaN, so any
read of them would show up in the outputs, and the caches are compared bit for bit after appends.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

import transformer
from helpers import DEVICE, assert_close, bits, kernel_backends, make_case, randn, require_backend, run_decode
from transformer import reference

BACKENDS = [pytest.param("reference", id="reference"), pytest.param("torch", id="torch")] + \
    kernel_backends("triton", "cuda")
KERNELS = kernel_backends("triton", "cuda")
H = torch.float16


def _require(backend):
    if backend in ("triton", "cuda"):
        require_backend(backend)


def _decode(backend, case, **kw):
    """(out, lse or None, k_cache, v_cache) through the public function (fresh cache copies)."""
    kc, vc = case.k_cache.clone(), case.v_cache.clone()
    lse = backend != "torch"     # SDPA does not return the log-sum-exp
    res = transformer.decode_attention(case.q, kc, vc, case.cache_seqlens, k=case.k, v=case.v,
                                       block_table=case.block_table, return_lse=lse, backend=backend, **kw)
    out, lse = res if lse else (res, None)
    return out, lse, kc, vc


def check_decode(backend, case, config="", **kw):
    """One backend vs the fp32 reference (flash-attn rule; validate=False on both) and the caches bit for bit."""
    out, lse, kc, vc = _decode(backend, case, validate=False, **kw)
    kw.pop("num_splits", None)
    ref, ref_lse, ref_kc, ref_vc = run_decode("reference", case, validate=False, **kw)
    low, low_lse, _, _ = run_decode("reference_lowp", case, validate=False, **kw)
    assert_close(out, ref, low, name="out", config=config)
    assert not torch.isnan(out).any(), config
    if lse is not None:
        assert_close(lse, ref_lse, low_lse.float(), name="lse", config=config)
    assert torch.equal(bits(kc), bits(ref_kc)), f"k_cache after the call differs from the reference's [{config}]"
    assert torch.equal(bits(vc), bits(ref_vc)), f"v_cache after the call differs from the reference's [{config}]"


# ---------------------------------------------------------------------------------------------
# Decode: invalid page ids, lengths outside the cache, strided index tensors
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("append", [False, True])
def test_decode_invalid_page_ids_hold_no_token(backend, append):
    _require(backend)
    case = make_case([40, 23, 9], 2, 2, 3, 64, H, page_size=8, append=append, seed=3)
    num_pages = case.k_cache.shape[0]
    bt = case.block_table.clone()
    bt[0, 1] = num_pages          # just past the end
    bt[1, 0] = -1                 # negative
    bt[1, 2] = 2 ** 31 - 1        # huge
    bt[2, 1] = num_pages + 1000   # the page the appended tokens of sequence 2 fall into (9, 10 -> page 1)
    case.block_table = bt
    check_decode(backend, case, config="invalid pages", num_splits=2)
    # The reference itself: appends into an invalid page are dropped, every other append lands where the
    # block table says (the expected cache built by hand), and no NaN of an unused slot reaches the output.
    out, _, kc, _ = run_decode("reference", case, validate=False)
    assert torch.isfinite(out).all()
    expected = case.k_cache.clone()
    if append:
        for i, n in enumerate(case.cache_seqlens.tolist()):
            for s_ in range(case.q.shape[1]):
                page = int(bt[i, (n + s_) // 8])
                if 0 <= page < num_pages:
                    expected[page, (n + s_) % 8] = case.k[i, s_]
    assert torch.equal(bits(kc), bits(expected))


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_lengths_outside_the_cache_are_clamped(backend):
    _require(backend)
    for page_size in (None, 16):
        case = make_case([5, 30, 12], 1, 2, 2, 64, H, page_size=page_size, seed=5)
        capacity = case.k_cache.shape[1] if page_size is None else case.block_table.shape[1] * page_size
        # NaN-free cache so that "all slots visible" is a finite, comparable result
        case.k_cache = torch.nan_to_num(case.k_cache, nan=0.25)
        case.v_cache = torch.nan_to_num(case.v_cache, nan=-0.5)
        odd = case.cache_seqlens.clone()
        odd[0], odd[1], odd[2] = capacity + 7, -4, 2 ** 31 - 1
        same = torch.tensor([capacity, 0, capacity], dtype=torch.int32, device=DEVICE)
        got = transformer.decode_attention(case.q, case.k_cache, case.v_cache, odd, block_table=case.block_table,
                                           validate=False, backend=backend)
        want = transformer.decode_attention(case.q, case.k_cache, case.v_cache, same, block_table=case.block_table,
                                            backend=backend)
        assert torch.equal(got, want), f"page_size={page_size}"
        case.cache_seqlens = odd
        check_decode(backend, case, config=f"clamped lengths page_size={page_size}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("page_size", [None, 4])
def test_decode_appends_past_the_capacity_are_dropped(backend, page_size):
    _require(backend)
    case = make_case([3, 9], 4, 1, 2, 64, H, page_size=page_size, append=True, seed=7)
    capacity = case.k_cache.shape[1] if page_size is None else case.block_table.shape[1] * page_size
    case.cache_seqlens = torch.tensor([capacity - 2, -3], dtype=torch.int32, device=DEVICE)
    case.k_cache = torch.nan_to_num(case.k_cache, nan=0.25)      # every slot below the capacity is now a token
    case.v_cache = torch.nan_to_num(case.v_cache, nan=-0.5)
    check_decode(backend, case, config="appends outside")


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_strided_index_tensors(backend):
    """A strided cache_seqlens (x[::2]) and a column-major block_table give the contiguous copies' results."""
    _require(backend)
    case = make_case([17, 4, 29], 2, 2, 2, 64, H, page_size=8, append=True, seed=11)
    lens = torch.zeros(6, dtype=torch.int32, device=DEVICE)
    lens[::2] = case.cache_seqlens
    bt = case.block_table.t().contiguous().t()
    assert not lens[::2].is_contiguous() and not bt.is_contiguous()
    want = _decode(backend, case, num_splits=2)
    case.cache_seqlens, case.block_table = lens[::2], bt
    got = _decode(backend, case, num_splits=2)
    for a, b in zip(got, want):
        assert (a is None and b is None) or torch.equal(bits(a), bits(b))


@pytest.mark.parametrize("backend", [pytest.param("torch", id="torch")] + KERNELS)
def test_decode_nan_in_unused_slots_is_not_read(backend):
    """Slots past each length and pages no sequence owns hold NaN (make_case): outputs stay finite."""
    _require(backend)
    for page_size in (None, 16):
        case = make_case([1, 50, 0], 1, 2, 4, 64, H, page_size=page_size, seed=2)
        out = _decode(backend, case)[0]
        assert torch.isfinite(out).all(), f"page_size={page_size}"


def test_decode_values_are_checked_by_default_on_cpu():
    case = make_case([5, 9], 1, 1, 2, 64, H, page_size=4, seed=1)
    if case.q.device.type != "cpu":
        pytest.skip("the default check (validate=None) runs for CPU tensors only")
    bad = case.block_table.clone()
    bad[1, 1] = case.k_cache.shape[0]
    with pytest.raises(ValueError, match=r"block_table\[1\]"):
        transformer.decode_attention(case.q, case.k_cache, case.v_cache, case.cache_seqlens, block_table=bad,
                                     backend="torch")
    lens = case.cache_seqlens.clone()
    lens[0] = -1
    with pytest.raises(ValueError, match=r"cache_seqlens\[0\]"):
        transformer.decode_attention(case.q, case.k_cache, case.v_cache, lens, block_table=case.block_table,
                                     backend="torch")


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_batch_zero(backend):
    _require(backend)
    q = torch.zeros(0, 1, 4, 64, dtype=H, device=DEVICE)
    kc = torch.zeros(0, 8, 2, 64, dtype=H, device=DEVICE)
    out = transformer.decode_attention(q, kc, kc, torch.zeros(0, dtype=torch.int32, device=DEVICE), backend=backend)
    assert out.shape == q.shape


# ---------------------------------------------------------------------------------------------
# Varlen and padded attention
# ---------------------------------------------------------------------------------------------

def _varlen(lens_q, lens_k, hq=4, hkv=2, d=64, seed=0, tail=(0, 0)):
    g = torch.Generator().manual_seed(seed)
    tq, tk = sum(lens_q) + tail[0], sum(lens_k) + tail[1]
    q = torch.randn(tq, hq, d, generator=g).to(DEVICE, H)
    k = torch.randn(tk, hkv, d, generator=g).to(DEVICE, H)
    v = torch.randn(tk, hkv, d, generator=g).to(DEVICE, H)
    cu = [torch.tensor([0] + [sum(x[:i + 1]) for i in range(len(x))], dtype=torch.int32, device=DEVICE)
          for x in (lens_q, lens_k)]
    return q, k, v, cu[0], cu[1]


def _varlen_check(backend, q, k, v, cu_q, cu_k, mq, mk, **kw):
    got = transformer.flash_attention_varlen(q, k, v, cu_q, cu_k, mq, mk, validate=False, backend=backend,
                                             return_lse=backend != "torch", **kw)
    ref = reference.attention_varlen(q, k, v, cu_q, cu_k, mq, mk, validate=False, return_lse=True, **kw)
    low = reference.attention_varlen(q, k, v, cu_q, cu_k, mq, mk, validate=False, return_lse=True,
                                     compute_dtype=None, **kw)
    out = got[0] if isinstance(got, tuple) else got
    assert_close(out, ref[0], low[0], name="out", config=f"{backend} {cu_q.tolist()} {cu_k.tolist()}")
    if isinstance(got, tuple):
        assert_close(got[1], ref[1], low[1].float(), name="lse", config=backend)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_bounds_past_the_tokens_are_clamped(backend):
    _require(backend)
    q, k, v, cu_q, cu_k = _varlen([7, 20, 5], [9, 30, 4], seed=1)
    odd_k = cu_k.clone()
    odd_k[-1] = k.shape[0] + 50          # last entry past the keys
    odd_q = cu_q.clone()
    odd_q[0] = -3                        # a negative first entry: clamped to 0
    out = _varlen_check(backend, q, k, v, odd_q, odd_k, 20, 30 + 50, causal=True)
    same = transformer.flash_attention_varlen(q, k, v, cu_q, cu_k, 20, 30, causal=True, backend=backend)
    assert_close(out, same, same, atol=0, factor=0, name="clamped == valid")


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_non_monotone_and_gaps(backend):
    """cu_seqlens_q = [2, 12, 6, 20] over 24 tokens is taken as [2, 12, 12, 20] (running max): tokens 0-1 and
    20-23 are in no sequence (0), sequence 1 is empty, sequence 2 spans [12, 20)."""
    _require(backend)
    q, k, v, _, cu_k = _varlen([10, 4, 10], [8, 8, 8], seed=4, tail=(0, 0))
    q = torch.cat([q, q[:0]])
    cu_q = torch.tensor([2, 12, 6, 20], dtype=torch.int32, device=DEVICE)
    got = transformer.flash_attention_varlen(q, k, v, cu_q, cu_k, 16, 8, validate=False, backend=backend)
    assert got.shape == q.shape and not torch.isnan(got).any()
    assert torch.equal(got[:2], torch.zeros_like(got[:2])) and torch.equal(got[20:], torch.zeros_like(got[20:]))
    ref = reference.attention_varlen(q, k, v, cu_q, cu_k, validate=False)
    low = reference.attention_varlen(q, k, v, cu_q, cu_k, validate=False, compute_dtype=None)
    assert_close(got, ref, low, name="out", config=backend)
    same = transformer.flash_attention_varlen(q, k, v, torch.tensor([2, 12, 12, 20], dtype=torch.int32,
                                                                    device=DEVICE), cu_k, 16, 8, backend=backend,
                                              validate=False)
    assert torch.equal(got, same)


@pytest.mark.parametrize("backend", BACKENDS)
def test_padded_bounds_are_clamped(backend):
    _require(backend)
    b, n = 3, 37
    q, k, v = randn(b, n, 4, 64, dtype=H), randn(b, n, 2, 64, dtype=H), randn(b, n, 2, 64, dtype=H)
    start = torch.tensor([-5, 3, 40], device=DEVICE)
    end = torch.tensor([n + 9, 2, 2 ** 40], device=DEVICE)
    got = transformer.attention.padded_attention(q, k, v, start, end, causal=True, validate=False, backend=backend)
    want = transformer.attention.padded_attention(q, k, v, torch.tensor([0, 3, n], device=DEVICE),
                                                  torch.tensor([n, 3, n], device=DEVICE), causal=True,
                                                  backend=backend)
    assert torch.equal(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_key_lengths(backend):
    """Attention(...)(x, key_lengths): errors name key_lengths; on a GPU (no check) larger lengths clamp."""
    _require(backend)
    torch.manual_seed(0)
    attn = transformer.Attention(64, 4, 2, causal=False, rope_theta=None, backend=backend).to(DEVICE, H)
    x = randn(2, 11, 64, dtype=H)
    with pytest.raises(ValueError, match=r"key_lengths\[1\] = 12"):
        if DEVICE.type == "cpu":
            attn(x, key_lengths=torch.tensor([11, 12], device=DEVICE))
        else:
            raise ValueError("key_lengths[1] = 12 (the check runs for CPU tensors only)")
    with pytest.raises(ValueError, match=r"key_lengths must have shape \[B\]"):
        attn(x, key_lengths=torch.tensor([3], device=DEVICE))
    with pytest.raises(TypeError, match="key_lengths must have dtype"):
        attn(x, key_lengths=torch.tensor([3.0, 4.0], device=DEVICE))


# ---------------------------------------------------------------------------------------------
# Scalars: the same rules on every backend and entry
# ---------------------------------------------------------------------------------------------

BAD_SCALARS = [
    (dict(softmax_scale=math.nan), ValueError, "softmax_scale"),
    (dict(softmax_scale=math.inf), ValueError, "softmax_scale"),
    (dict(softmax_scale=0.0), ValueError, "softmax_scale"),
    (dict(softmax_scale=-0.1), ValueError, "softmax_scale"),
    (dict(softmax_scale=True), TypeError, "softmax_scale"),
    (dict(softcap=math.inf), ValueError, "softcap"),
    (dict(softcap=math.nan), ValueError, "softcap"),
    (dict(window_size=(True, 0)), TypeError, "window_size"),
    (dict(window_size=(2 ** 40, -2)), ValueError, "window_size"),
    (dict(causal="no"), TypeError, "causal"),
    (dict(causal=1), TypeError, "causal"),
    (dict(return_lse=None), TypeError, "return_lse"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kw,err,name", BAD_SCALARS, ids=[f"{list(c[0])[0]}={list(c[0].values())[0]}"
                                                          for c in BAD_SCALARS])
def test_bad_scalars_raise_everywhere(backend, kw, err, name):
    q, k = randn(1, 5, 4, 64, dtype=H), randn(1, 5, 2, 64, dtype=H)
    case = make_case([3], 1, 2, 2, 64, H)
    cu = torch.tensor([0, 5], dtype=torch.int32, device=DEVICE)
    calls = [lambda: transformer.flash_attention(q, k, k, backend=backend, **kw),
             lambda: transformer.flash_attention_varlen(q[0], k[0], k[0], cu, cu, 5, 5, backend=backend, **kw),
             lambda: transformer.decode_attention(case.q, case.k_cache, case.v_cache, case.cache_seqlens,
                                                  backend=backend, **kw)]
    if "return_lse" not in kw:
        calls.append(lambda: transformer.attention.padded_attention(q, k, k, cu[:1], cu[1:], backend=backend, **kw))
    for call in calls:
        with pytest.raises(err, match=name):
            call()


def test_huge_windows_are_unbounded():
    """A window wider than every sequence is no window, on every backend, however large (64-bit safe)."""
    q, k = randn(2, 9, 4, 64, dtype=H), randn(2, 13, 2, 64, dtype=H)
    for backend in ("reference", "torch"):
        a = transformer.flash_attention(q, k, k, window_size=(2 ** 40, 2 ** 33), backend=backend)
        b = transformer.flash_attention(q, k, k, backend=backend)
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_index_and_parameter_tensors(backend):
    """Sliced cu_seqlens, a transposed [B, Hq] ALiBi view and sliced key bounds give the contiguous results."""
    _require(backend)
    q, k, v, cu_q, cu_k = _varlen([7, 20, 5], [9, 30, 4], seed=6)
    wide = torch.zeros(2 * cu_q.numel(), dtype=torch.int32, device=DEVICE)
    wide[::2] = cu_q
    want = transformer.flash_attention_varlen(q, k, v, cu_q, cu_k, 20, 30, causal=True, backend=backend)
    got = transformer.flash_attention_varlen(q, k, v, wide[::2], cu_k, 20, 30, causal=True, backend=backend)
    assert torch.equal(got, want)
    qd, kd = randn(3, 9, 4, 64, dtype=H), randn(3, 12, 2, 64, dtype=H)
    slopes = (torch.rand(4, 3, device=DEVICE) * 0.3 + 0.05).t()            # [B, Hq] view, strides (1, 3)
    assert not slopes.is_contiguous()
    want = transformer.flash_attention(qd, kd, kd, alibi_slopes=slopes.contiguous(), backend=backend)
    got = transformer.flash_attention(qd, kd, kd, alibi_slopes=slopes, backend=backend)
    assert torch.equal(got, want)
    bounds = torch.tensor([[0, 2, 1], [99, 12, 99], [5, 9, 99]], device=DEVICE)
    want = transformer.attention.padded_attention(qd, kd, kd, bounds[:, 0].contiguous(), bounds[:, 2].contiguous(),
                                                  validate=False, backend=backend)
    got = transformer.attention.padded_attention(qd, kd, kd, bounds[:, 0], bounds[:, 2], validate=False,
                                                 backend=backend)
    assert torch.equal(got, want)


def test_sdpa_scale_is_checked():
    q = randn(1, 2, 5, 16)
    for bad in (math.nan, math.inf, 0.0, -1.0):
        with pytest.raises(ValueError, match="scale"):
            transformer.scaled_dot_product_attention(q, q, q, scale=bad)


_OUT_OF_RANGE_SCRIPT = r"""
import sys, torch, transformer
backend = sys.argv[1]
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
torch.manual_seed(0)
H = torch.float16
# decode: page ids past the pool, negative and huge; lengths past the capacity, negative and huge
q = torch.randn(3, 2, 4, 64, dtype=H, device=dev)
kc = torch.randn(6, 16, 2, 64, dtype=H, device=dev)
vc = torch.randn(6, 16, 2, 64, dtype=H, device=dev)
bt = torch.tensor([[0, 6, 2**31 - 1], [-1, 1, 7], [3, 4, -2**31]], dtype=torch.int32, device=dev)
lens = torch.tensor([40, 2**31 - 1, -7], dtype=torch.int32, device=dev)
k = torch.randn(3, 2, 2, 64, dtype=H, device=dev)
with torch.no_grad():
    out = transformer.decode_attention(q, kc, vc, lens, k=k, v=k, block_table=bt, validate=False, backend=backend)
    assert torch.isfinite(out).all()
# varlen: cu_seqlens past the tokens, non-monotone, negative
qv = torch.randn(30, 4, 64, dtype=H, device=dev, requires_grad=True)
kv = torch.randn(20, 2, 64, dtype=H, device=dev, requires_grad=True)
for cu_q, cu_k in (([0, 10, 30], [0, 15, 2**30]), ([5, 2, 40], [-9, 20, 3]), ([0, -2**31, 2**31 - 1], [0, 7, 20])):
    cq = torch.tensor(cu_q, dtype=torch.int32, device=dev)
    ck = torch.tensor(cu_k, dtype=torch.int32, device=dev)
    o = transformer.flash_attention_varlen(qv, kv, kv, cq, ck, 30, 20, causal=True, validate=False, backend=backend)
    o.float().sum().backward()
    assert torch.isfinite(o).all() and torch.isfinite(qv.grad).all() and torch.isfinite(kv.grad).all()
# padded attention / module key lengths past the sequence, negative
x = torch.randn(2, 9, 4, 64, dtype=H, device=dev)
o = transformer.attention.padded_attention(x, x, x, torch.tensor([-3, 5], device=dev),
                                           torch.tensor([2**40, -1], device=dev), validate=False, backend=backend)
assert torch.isfinite(o).all()
print("ok")
"""


@pytest.mark.parametrize("backend", KERNELS)
def test_out_of_range_indices_do_not_crash(backend):
    """In a fresh process (a crash fails the test instead of killing the run): every kind of out-of-range index
    value through the public functions with validate=False; the process must finish and print ok."""
    require_backend(backend)
    import subprocess
    import sys
    res = subprocess.run([sys.executable, "-c", _OUT_OF_RANGE_SCRIPT, backend], capture_output=True, text=True,
                         timeout=600, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), \
        f"exit {res.returncode}\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
