"""Quantized KV cache (int8 / fp8 e4m3 keys and values with one fp32 scale per (token, kv head)).

* the reference quantizer (transformer.reference.quantize_kv / dequantize_kv): ties, saturation, zero rows,
  subnormal fp8, any leading dims;
* appends: the bytes and scales every backend stores (triton through the interpreter with the sm_90 fp8 casts
  and with the integer conversion of sm_80, cuda through the emulator, torch) equal the reference quantizer's bit
  for bit, on crafted values (ties, fp8 subnormals, zero rows) and random ones;
* dequantization: a sequence with one visible token returns that token's value, x * scale rounded to q's dtype,
  bit for bit, for every int8 value and every finite fp8 code;
* outputs: decode over a quantized cache vs transformer.reference.decode_attention on the dequantized cache by the
  tolerance rule (helpers.assert_close), over the decode grid (groups 1-8 incl. 5 and 7, contiguous and page
  sizes 1 / 16 / 64, ragged lengths incl. 0, append, splits), the caches after appends bit for bit; the index
  rules of transformer/_checks.py (invalid pages, lengths outside the cache, appends past it);
* the accuracy budget (error against the unquantized fp16 decode, random and outlier-heavy keys) and greedy
  generation on the examples' decoder (weights committed in tests/data) against the fp16 cache; the bytes the Triton split kernel loads (interpreter count); bad input; opcheck / torch.compile; the
  static compile of the fp8 paths.

    .venv/bin/python -m pytest tests/test_kv_quant.py -q -n 1
    .venv/bin/python -m pytest tests/test_kv_quant.py -q -m slow        # + the full grid
"""
from __future__ import annotations

import dataclasses
import itertools
import os

import pytest
import torch

import transformer
from helpers import DEVICE, HAS_GPU, assert_close, kernel_backends, make_case, require_backend
from transformer import reference
from transformer._checks import KV_DTYPES

KERNELS = kernel_backends("triton", "cuda")
ALL = [pytest.param("reference", id="reference"), pytest.param("torch", id="torch")] + KERNELS
FORMATS = ("int8", "fp8_e4m3")
DTYPES = (torch.float16, torch.bfloat16)


@pytest.fixture(autouse=True)
def _bounds_checked(monkeypatch):
    """Emulated CUDA kernels check every global access against the call's tensors (scales included)."""
    monkeypatch.setenv("TILEFORMER_EMU_CHECK_BOUNDS", "1")


@pytest.fixture(params=["hw", "sw"])
def fp8_path(request, monkeypatch):
    """Triton under the interpreter: the sm_90 fp8 casts ("hw") or the integer conversion of sm_80 ("sw")."""
    import triton_kernels.decode as tkd
    if HAS_GPU and request.param == "sw":
        pytest.skip("on a GPU the device's capability picks the fp8 path")
    monkeypatch.setattr(tkd, "FP8_CONVERSION", request.param)
    return request.param


def _require(backend):
    if backend in ("triton", "cuda"):
        require_backend(backend)


def raw(t):
    """The bits of a tensor (NaN == NaN) for exact comparisons: 8-bit as uint8, fp32 as int32, 16-bit as int16."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


# ---------------------------------------------------------------------------------------------
# Quantized decode cases
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class QCase:
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    k_scale: torch.Tensor
    v_scale: torch.Tensor
    cache_seqlens: torch.Tensor
    k: torch.Tensor | None
    v: torch.Tensor | None
    block_table: torch.Tensor | None


def quantize_case(case, kv_dtype, seed=0, poison=True):
    """helpers.make_case with its caches quantized: cached tokens as reference.quantize_kv, every slot no sequence
    holds (NaN in make_case) with random bytes and a NaN scale, so a kernel that reads one fails (poison=False:
    zeros there, scale 1)."""
    unused = torch.isnan(case.k_cache).any(-1) & poison
    gen = torch.Generator().manual_seed(seed)
    caches = []
    for c in (case.k_cache, case.v_cache):
        cq, sc = reference.quantize_kv(torch.nan_to_num(c), kv_dtype)
        noise = torch.randint(0, 256, cq.shape, generator=gen, dtype=torch.int32).to(torch.uint8).to(cq.device)
        noise[(noise & 0x7F) == 0x7F] = 0        # no fp8 NaN codes: the NaN scale marks the slot
        raw(cq)[unused] = noise[unused]
        sc[unused] = float("nan")
        caches += [cq, sc]
    return QCase(case.q, caches[0], caches[2], caches[1], caches[3], case.cache_seqlens, case.k, case.v,
                 case.block_table)


def make_qcase(lens, sq, hkv, group, d, dtype, kv_dtype, *, page_size=None, append=False, seed=0, spare=3):
    return quantize_case(make_case(lens, sq, hkv, group, d, dtype, page_size=page_size, append=append, seed=seed,
                                   spare=spare), kv_dtype, seed)


def run_qdecode(backend, c, **kw):
    """(out, lse or None, k_cache, v_cache, k_scale, v_scale) of one backend (the public function) on fresh copies
    of the cache, or of transformer.reference.decode_attention itself ("ref32": fp32, "ref16": in q's dtype)."""
    kc, vc, ks, vs = (t.clone() for t in (c.k_cache, c.v_cache, c.k_scale, c.v_scale))
    args = (c.q, kc, vc, c.cache_seqlens)
    kwargs = dict(k=c.k, v=c.v, block_table=c.block_table, k_scale=ks, v_scale=vs, **kw)
    if backend in ("ref32", "ref16"):
        kwargs.pop("num_splits", None)
        dtype = torch.float32 if backend == "ref32" else None
        out, lse = reference.decode_attention(*args, compute_dtype=dtype, return_lse=True, **kwargs)
    elif backend == "torch":
        out, lse = transformer.decode_attention(*args, backend=backend, **kwargs), None
    else:
        out, lse = transformer.decode_attention(*args, return_lse=True, backend=backend, **kwargs)
    return out, lse, kc, vc, ks, vs


def check_qdecode(backend, c, config="", **kw):
    """out (and lse) vs the fp32 reference on the dequantized cache (flash-attn rule), the caches (values and
    scales) after the call bit for bit against the reference's."""
    out, lse, *caches = run_qdecode(backend, c, **kw)
    ref, ref_lse, *ref_caches = run_qdecode("ref32", c, **kw)
    low, low_lse, *_ = run_qdecode("ref16", c, **kw)
    assert out.dtype == c.q.dtype
    assert_close(out, ref, low, name="out", config=config)
    assert not torch.isnan(out).any(), config
    if lse is not None:
        assert_close(lse, ref_lse, low_lse.float(), name="lse", config=config)
    for name, got, want in zip(("k_cache", "v_cache", "k_scale", "v_scale"), caches, ref_caches):
        assert torch.equal(raw(got), raw(want)), f"{name} after the call differs from the reference's [{config}]"
    return out, lse


# ---------------------------------------------------------------------------------------------
# The reference quantizer
# ---------------------------------------------------------------------------------------------

def test_quantize_kv_int8_rules():
    # row 0: amax 127 -> scale 1, ties go to even; row 1: zeros -> scale 1; row 2: amax 2.54 -> scale 0.02
    x = torch.tensor([[[127.0, 2.5, 3.5, -2.5, -3.5, 0.5, 1.5, -126.5],
                       [0.0] * 8,
                       [2.54, -2.54, 1.27, 0.01, -0.01, 0.0, 0.03, 2.53]]])
    xq, sc = reference.quantize_kv(x, "int8")
    assert xq.dtype == torch.int8 and sc.dtype == torch.float32 and sc.shape == (1, 3)
    assert xq[0, 0].tolist() == [127, 2, 4, -2, -4, 0, 2, -126]
    assert sc[0, 1] == 1.0 and xq[0, 1].tolist() == [0] * 8
    assert sc[0, 2] == torch.tensor(2.54) / 127
    want = torch.round(x[0, 2] / (torch.tensor(2.54) / 127)).clamp(-127, 127)
    assert xq[0, 2].tolist() == want.tolist() and xq[0, 2, 0] == 127 and xq[0, 2, 1] == -127
    deq = reference.dequantize_kv(xq, sc)
    assert deq.dtype == torch.float32 and bool(((deq - x).abs() <= sc[..., None] / 2 + 1e-7).all())


def test_quantize_kv_fp8_rules():
    # amax 448 -> scale 1: exact e4m3 values stay, ties go to the even mantissa, subnormals round to 2^-9 steps
    vals = [448.0, 17.0, 19.0, -17.0, 31.675, 0.0029296875, 0.0048828125, 0.00146484375, -0.0, 2.0 ** -9, 240.0,
            232.0, 0.0, 1.0, -448.0, 0.75]
    x = torch.tensor(vals).view(1, 1, 16)
    xq, sc = reference.quantize_kv(x, "fp8_e4m3")
    assert xq.dtype == torch.float8_e4m3fn and sc.item() == 1.0
    got = xq.float().flatten().tolist()
    assert got == [448.0, 16.0, 20.0, -16.0, 32.0, 2 * 2.0 ** -9, 2 * 2.0 ** -9, 2.0 ** -9, -0.0, 2.0 ** -9, 240.0,
                   224.0, 0.0, 1.0, -448.0, 0.75]
    # any leading dims: [B, S, H, D], [pages, page_size, H, D], [T, H, D]; fp16 / bf16 / fp32 inputs
    for shape in ((2, 5, 3, 40), (7, 1, 2, 64), (9, 4, 16)):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            x = torch.randn(shape).to(dtype) * 3
            for kd in FORMATS:
                xq, sc = reference.quantize_kv(x, kd)
                assert xq.shape == x.shape and sc.shape == x.shape[:-1]
                amax = x.float().abs().amax(-1)
                assert torch.equal(sc, amax / reference.KV_QMAX[kd])
                rel = 0.5 / 127 if kd == "int8" else 16 / 448      # half the largest step: scale / 2, 16 * scale
                err = (reference.dequantize_kv(xq, sc) - x.float()).abs().amax(-1)
                assert bool((err <= amax * rel * (1 + 1e-5)).all())


# ---------------------------------------------------------------------------------------------
# Appends: bit for bit as the reference quantizer
# ---------------------------------------------------------------------------------------------

def _crafted_tokens(kv_dtype, b, sq, hkv, d, dtype):
    """New keys whose quantization hits the rules: ties (x / scale = n + 1/2 for int8, midpoints of the e4m3 grid
    for fp8), e4m3 subnormals, zero rows, and random rows; exactly representable in fp16 and bf16."""
    gen = torch.Generator().manual_seed(d + sq)
    x = torch.randn(b, sq, hkv, d, generator=gen)
    if kv_dtype == "int8":     # amax 127 * 2^-3: scale 2^-3, values (n + 0.5) * 2^-3
        ties = (torch.randint(-120, 120, (d,), generator=gen) + 0.5) * 0.125
        ties[0] = 127 * 0.125
    else:                      # amax 448 * 2^-4: scale 2^-4; grid midpoints (17, 19, 36, 1.5 * 2^-9, ...) * 2^-4
        grid = torch.tensor([17.0, 19.0, -17.0, 36.0, 44.0, 0.0029296875, 0.0048828125, 0.00146484375, 232.0,
                             -0.0029296875, 200.0, 3.75, 0.013671875, 0.0126953125, 104.0, 0.0])
        ties = grid.repeat(d // 16 + 1)[:d] * 0.0625
        ties[0] = 448 * 0.0625
    x[:, 0, 0] = ties
    x[:, -1, -1] = 0.0
    if d > 1:
        x[0, 0, -1, 1:] = 0.0      # a row with one nonzero value
    return x.to(dtype)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("kv_dtype", FORMATS)
@pytest.mark.parametrize("page_size", [None, 16], ids=["contig", "page16"])
def test_append_is_the_reference_quantizer(backend, kv_dtype, page_size, fp8_path):
    """Stored bytes and scales of appended tokens == reference.quantize_kv(k) of those tokens, bit for bit."""
    _require(backend)
    if fp8_path == "sw" and (backend != "triton" or kv_dtype != "fp8_e4m3"):
        pytest.skip("the fp8 conversion choice is the Triton kernels'")
    for dtype, d in ((torch.float16, 64), (torch.bfloat16, 40)):
        c = make_qcase([5, 0, 37], 3, 2, 2, d, dtype, kv_dtype, page_size=page_size, append=True, seed=d)
        c = dataclasses.replace(c, k=_crafted_tokens(kv_dtype, 3, 3, 2, d, dtype), v=c.v)
        _, _, kc, vc, ks, vs = run_qdecode(backend, c, num_splits=1)
        kq, kscale = reference.quantize_kv(c.k, kv_dtype)
        vq, vscale = reference.quantize_kv(c.v, kv_dtype)
        for b, n in enumerate(c.cache_seqlens.tolist()):
            pos = torch.arange(n, n + 3)
            if c.block_table is None:
                rows = (b, pos)
            else:
                rows = (c.block_table[b].long()[pos // page_size], pos % page_size)
            for name, got, want in (("k_cache", kc[rows], kq[b]), ("v_cache", vc[rows], vq[b]),
                                    ("k_scale", ks[rows], kscale[b]), ("v_scale", vs[rows], vscale[b])):
                assert torch.equal(raw(got), raw(want)), f"{name} of sequence {b} ({dtype}, d{d})"
        untouched = torch.ones(kc.shape[:3], dtype=torch.bool)        # nothing else written
        for b, n in enumerate(c.cache_seqlens.tolist()):
            pos = torch.arange(n, n + 3)
            if c.block_table is None:
                untouched[b, pos] = False
            else:
                untouched[c.block_table[b].long()[pos // page_size], pos % page_size] = False
        assert torch.equal(raw(kc)[untouched], raw(c.k_cache)[untouched])
        assert torch.equal(raw(ks)[untouched], raw(c.k_scale)[untouched])


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("kv_dtype", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
def test_one_token_returns_its_dequantized_value(backend, kv_dtype, dtype, fp8_path):
    """With one visible token, p = 1 and out = round(x * scale) in q's dtype exactly: every int8 value and every
    finite e4m3 code of V through the kernels' dequantization, equal values (the accumulator turns -0 into +0);
    both kernels (1 and 8 rows)."""
    _require(backend)
    if fp8_path == "sw" and (backend != "triton" or kv_dtype != "fp8_e4m3"):
        pytest.skip("the fp8 conversion choice is the Triton kernels'")
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    if kv_dtype == "fp8_e4m3":
        codes[(codes & 0x7F) == 0x7F] = 0
    vq = codes.view(KV_DTYPES[kv_dtype]).view(1, 1, 1, 256).expand(2, 3, 1, 256).contiguous()
    kq = torch.zeros_like(vq)
    scale = torch.tensor([[[0.0371]], [[37.0]]]).expand(2, 3, 1).contiguous()      # arbitrary fp32 scales
    for group in (1, 8):
        q = torch.randn(2, 1, group, 256).to(dtype)
        out = transformer.decode_attention(q, kq.clone(), vq.clone(), torch.tensor([1, 1], dtype=torch.int32),
                                           k_scale=scale.clone(), v_scale=scale.clone(), num_splits=1,
                                           backend=backend)
        want = (vq.float()[:, 0] * scale[:, 0, :, None]).to(dtype)          # [2, 1, 256]
        assert torch.equal(out[:, 0], want.expand(2, group, 256)), f"group {group}"    # -0 (code 0x80) gives +0


# ---------------------------------------------------------------------------------------------
# Outputs over the decode grid
# ---------------------------------------------------------------------------------------------

# (layout, group, sq, append, splits, dtype, d, kv_dtype): every axis value at least once
SUBSET = [
    (None, 1, 1, False, 1, torch.float16, 64, "int8"),
    (None, 5, 1, True, 3, torch.bfloat16, 80, "fp8_e4m3"),
    (1, 7, 2, True, 3, torch.bfloat16, 64, "int8"),
    (1, 2, 1, False, 0, torch.float16, 40, "fp8_e4m3"),
    (16, 8, 1, True, 1, torch.bfloat16, 128, "fp8_e4m3"),
    (16, 4, 4, True, 3, torch.float16, 64, "int8"),
    (64, 8, 2, False, 3, torch.float16, 96, "int8"),
    (64, 1, 4, True, 0, torch.bfloat16, 256, "fp8_e4m3"),
]


def _id(p):
    layout, group, sq, append, splits, dtype, d, kd = p
    return (f"{'contig' if layout is None else f'page{layout}'}-g{group}-sq{sq}-{'append' if append else 'noappend'}"
            f"-splits{splits}-{str(dtype)[6:]}-d{d}-{kd}")


def _grid(backend, p):
    layout, group, sq, append, splits, dtype, d, kd = p
    lens = [0, 1, 77] if append else [1, 0, 130]
    c = make_qcase(lens, sq, 2, group, d, dtype, kd, page_size=layout, append=append, seed=d + group)
    check_qdecode(backend, c, config=_id(p), num_splits=splits)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("params", SUBSET, ids=[_id(p) for p in SUBSET])
def test_quantized_decode_subset(backend, params):
    _require(backend)
    _grid(backend, params)


FULL = [(lay, g, sq, app, sp, dt, 64, kd) for lay, g, sq, app, sp, dt, kd in itertools.product(
    (None, 1, 16, 64), (1, 4, 5, 7, 8), (1, 4), (False, True), (1, 3, 0), DTYPES, FORMATS)]


@pytest.mark.slow
@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("params", FULL, ids=[_id(p) for p in FULL])
def test_quantized_decode_grid(backend, params):
    _require(backend)
    _grid(backend, params)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("kv_dtype", FORMATS)
def test_quantized_decode_features(backend, kv_dtype, fp8_path):
    """Window, ALiBi, softcap and a non-causal call over a quantized paged cache; fp8 also through the integer
    conversion (Triton's sm_80 path)."""
    _require(backend)
    if fp8_path == "sw" and (backend != "triton" or kv_dtype != "fp8_e4m3"):
        pytest.skip("the fp8 conversion choice is the Triton kernels'")
    c = make_qcase([0, 1, 113], 4, 2, 4, 64, torch.bfloat16, kv_dtype, page_size=16, append=True, seed=3)
    slopes = torch.rand(3, 8) * 0.3
    check_qdecode(backend, c, config="all", num_splits=3, softcap=2.0, alibi_slopes=slopes, window_size=(40, -1))
    check_qdecode(backend, dataclasses.replace(c, k=None, v=None), config="noncausal", num_splits=2, causal=False)


@pytest.mark.parametrize("backend", KERNELS)
def test_quantized_decode_long_and_unaligned(backend):
    """Hundreds of keys per split (the pipeline wraps many times), and a cache whose rows do not start on 16 bytes
    (element loads) giving the aligned results bit for bit."""
    _require(backend)
    c = make_qcase([700, 513], 1, 1, 8, 64, torch.float16, "int8", page_size=32, seed=11)
    check_qdecode(backend, c, config="long", num_splits=2)

    def move(t, shift):
        wide = torch.zeros(*t.shape[:-1], t.shape[-1] + shift, dtype=t.dtype)
        wide[..., shift:] = t
        return wide[..., shift:]

    c = make_qcase([130, 1, 0], 1, 2, 2, 64, torch.bfloat16, "fp8_e4m3", page_size=16, append=True, seed=14)
    results = []
    for shift in (0, 3):      # views: the kernels append into them in place
        kc, vc = move(c.k_cache, shift), move(c.v_cache, shift)
        ks, vs = c.k_scale.clone(), c.v_scale.clone()
        assert (kc.data_ptr() % 16 != 0) == (shift != 0)
        out, lse = transformer.decode_attention(c.q, kc, vc, c.cache_seqlens, k=c.k, v=c.v, block_table=c.block_table,
                                                k_scale=ks, v_scale=vs, num_splits=2, return_lse=True,
                                                backend=backend)
        results.append((out, lse, kc, vc, ks, vs))
    for x, y in zip(*results):
        assert torch.equal(raw(x), raw(y))


@pytest.mark.parametrize("i", range(3))
def test_cuda_agrees_with_triton_quantized(i):
    """Both kernels read the same dequantized values: their outputs agree within twice the same-dtype rounding,
    the appended caches are identical."""
    require_backend("cuda")
    require_backend("triton")
    lens, sq, hkv, group, d, dtype, page_size, kd = [([0, 1, 150], 1, 2, 8, 128, torch.bfloat16, 16, "int8"),
                                                     ([77, 3], 4, 2, 1, 64, torch.float16, None, "fp8_e4m3"),
                                                     ([90, 45], 2, 2, 4, 96, torch.bfloat16, 1, "fp8_e4m3")][i]
    c = make_qcase(lens, sq, hkv, group, d, dtype, kd, page_size=page_size, append=True, seed=20 + i)
    out_c, _, *caches_c = run_qdecode("cuda", c, num_splits=2)
    out_t, _, *caches_t = run_qdecode("triton", c, num_splits=2)
    ref, *_ = run_qdecode("ref32", c)
    low, *_ = run_qdecode("ref16", c)
    rounding = float((low.float() - ref).abs().max())
    assert float((out_c.float() - out_t.float()).abs().max()) <= 2 * rounding + 1e-5
    for x, y in zip(caches_c, caches_t):
        assert torch.equal(raw(x), raw(y))


# ---------------------------------------------------------------------------------------------
# Index rules (transformer/_checks.py) for quantized caches
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("append", [False, True])
def test_quantized_invalid_pages_and_lengths(backend, append):
    """Invalid page ids hold no visible token and take no append (values nor scales); lengths are clamped to
    0..capacity and appends past the capacity dropped; the kernels never read the NaN-scaled unused slots."""
    _require(backend)
    c = make_qcase([40, 23, 9], 2, 2, 3, 64, torch.float16, "int8", page_size=8, append=append, seed=3)
    num_pages = c.k_cache.shape[0]
    bt = c.block_table.clone()
    bt[0, 1] = num_pages
    bt[1, 0] = -1
    bt[1, 2] = 2 ** 31 - 1
    bt[2, 1] = num_pages + 1000      # the page the appended tokens of sequence 2 fall into
    c = dataclasses.replace(c, block_table=bt)
    check_qdecode(backend, c, config="invalid pages", num_splits=2, validate=False)
    cap = bt.shape[1] * 8
    lens = torch.tensor([cap + 5, -7, cap - 1], dtype=torch.int32)     # clamped; sequence 2 appends 1 of 2
    c = make_case([40, 23, 9], 2, 2, 3, 64, torch.float16, page_size=8, append=append, seed=4)
    c = dataclasses.replace(quantize_case(c, "fp8_e4m3", poison=False), cache_seqlens=lens)   # every slot readable
    check_qdecode(backend, c, config="lengths", num_splits=2, validate=False)


# ---------------------------------------------------------------------------------------------
# Accuracy budget: quantized decode vs the unquantized fp16 decode
# ---------------------------------------------------------------------------------------------

# Budget (max, mean) absolute error of the output against the fp16 cache's, per (keys, format); measured
# figures in the docstring of test_accuracy_budget.
BUDGET = {("random", "int8"): (0.006, 0.0011), ("random", "fp8_e4m3"): (0.023, 0.0043),
          ("outlier", "int8"): (0.32, 0.04), ("outlier", "fp8_e4m3"): (0.39, 0.034)}


def _budget_inputs(keys, b=2, s=512, hkv=2, group=8, d=128):
    gen = torch.Generator().manual_seed(1)
    k = torch.randn(b, s, hkv, d, generator=gen)
    if keys == "outlier":     # 4 channels 20x larger, as the keys of trained LLMs
        k[..., torch.randperm(d, generator=gen)[:4]] *= 20.0
    v = torch.randn(b, s, hkv, d, generator=gen)
    q = torch.randn(b, 1, hkv * group, d, generator=gen)
    return q.half(), k.half(), v.half(), torch.full((b,), s, dtype=torch.int32)


@pytest.mark.parametrize("backend", kernel_backends("cuda") + [pytest.param("reference", id="reference")])
def test_accuracy_budget(backend):
    """Max / mean |out(int8 or fp8 cache) - out(fp16 cache)| at B 2, 512 tokens, group 8, D 128, on random keys
    and on keys with 4 outlier channels (x20), the same backend computing both. Measured (cuda emulated and
    reference alike): random int8 max 0.0029 mean 0.00055, fp8 max 0.0114 mean 0.0021; outlier int8 max 0.158 mean
    0.0195, fp8 max 0.193 mean 0.0166 (|out| mean 0.056 random, 0.31 outlier). BUDGET is about twice that.
    Per-channel K scales (one per channel per 128 tokens: the same bytes) cut the outlier int8 error 4x
    (test_per_channel_k_measurement)."""
    _require(backend)
    for keys in ("random", "outlier"):
        q, k, v, lens = _budget_inputs(keys)

        def run(kc, vc, **kw):
            if backend == "reference":
                return reference.decode_attention(q, kc, vc, lens, **kw)
            return transformer.decode_attention(q, kc, vc, lens, backend=backend, num_splits=2, **kw).float()

        base = run(k, v)
        for kd in FORMATS:
            (kq, ks), (vq, vs) = reference.quantize_kv(k, kd), reference.quantize_kv(v, kd)
            err = (run(kq, vq, k_scale=ks, v_scale=vs) - base).abs()
            mx, mean = float(err.max()), float(err.mean())
            print(f"\n{backend} {keys} keys {kd}: max {mx:.5f} mean {mean:.6f} (|out| mean {float(base.abs().mean()):.4f})")
            assert mx <= BUDGET[keys, kd][0] and mean <= BUDGET[keys, kd][1], (keys, kd, mx, mean)


def test_per_channel_k_measurement():
    """The measurement behind the per-token K layout: int8 K with one scale per channel per 128 tokens (KIVI's
    layout, the same scale bytes at D 128) against one per token, reference math. Per-channel is as accurate on
    random keys (mean 0.00053 vs 0.00055) and 4.2x more accurate on outlier-channel keys (0.0047 vs 0.0195); it
    needs a token group to be complete before it is quantized (a 16-bit residual window), so kv_dtype="int8"
    keeps the per-token layout."""
    def per_channel(x, group=128):
        b, s, h, d = x.shape
        xg = x.float().view(b, s // group, group, h, d)
        sc = xg.abs().amax(2, keepdim=True) / 127
        sc = torch.where(sc == 0, torch.ones_like(sc), sc)
        return ((xg / sc).round().clamp(-127, 127) * sc).view(b, s, h, d)

    errs = {}
    for keys in ("random", "outlier"):
        q, k, v, lens = _budget_inputs(keys)
        base = reference.decode_attention(q, k, v, lens)
        (kq, ks), (vq, vs) = reference.quantize_kv(k, "int8"), reference.quantize_kv(v, "int8")
        vd = reference.dequantize_kv(vq, vs).half()
        token = (reference.decode_attention(q, reference.dequantize_kv(kq, ks).half(), vd, lens) - base).abs()
        channel = (reference.decode_attention(q, per_channel(k).half(), vd, lens) - base).abs()
        errs[keys] = (float(token.mean()), float(channel.mean()))
        print(f"\n{keys} keys: mean error per-token K {errs[keys][0]:.6f}, per-channel K {errs[keys][1]:.6f}")
    assert errs["outlier"][1] < errs["outlier"][0] / 2 and errs["random"][1] < 1.2 * errs["random"][0]


# ---------------------------------------------------------------------------------------------
# Greedy generation on the examples' decoder: quantized cache vs the fp16 cache
# ---------------------------------------------------------------------------------------------

_DECODER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "kv_quant_decoder.pt")


@pytest.fixture(scope="module")
def trained_decoder():
    """examples/train_decoder_only.py's model (dim 128, 3 layers, GQA 4/2, RoPE, SwiGLU) trained on its text
    (loss 0.25), fp16, from tests/data/kv_quant_decoder.pt (written by tests/data/make_kv_quant_decoder.py). The
    weights are committed: CPU matmul sums depend on the thread count and the instruction set, so training in the
    test gave other weights, and other near-ties in the greedy decisions, on each machine."""
    from transformer.models import DecoderOnly, DecoderOnlyConfig
    saved = torch.load(_DECODER, weights_only=True)
    chars = saved["vocab"]
    cfg = DecoderOnlyConfig.preset("small", vocab_size=len(chars), **saved["config"])
    text = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "data",
                             "attention.txt"), encoding="utf-8").read()
    data = torch.tensor([chars.index(ch) for ch in text])
    state = saved["state"]
    DecoderOnly(cfg).load_state_dict(state)  # the stored state fits the config exactly
    prompts = [data[o:o + n] for o, n in zip(range(0, 3200, 400), (8, 12, 16, 20, 24, 10, 14, 18))]
    return cfg, state, prompts


def _greedy(model, prompts, n, kv_dtype, cache="paged"):
    return transformer.generate(model, prompts, n, temperature=0, cache=cache, page_size=16, kv_dtype=kv_dtype)


def _agreement(out, base, prompts):
    """Fraction of the generated tokens equal position by position (a fork counts every later token)."""
    same = sum(int((a[len(p):] == b[len(p):]).sum()) for a, b, p in zip(out, base, prompts))
    return same / sum(len(a) - len(p) for a, p in zip(out, prompts))


@torch.no_grad()
def _forced_logits(model, seqs, prompts, kv_dtype, cache="paged"):
    """The model's fp32 logits for every generated position of `seqs`, fed the tokens of `seqs` one at a time after
    the prompt through a cache of kv_dtype: the per-token decisions of a quantized cache without the fork
    amplification of free-running greedy generation. [steps, vocab]."""
    rows = []
    for seq, p in zip(seqs, prompts):
        kv = model.make_cache(1, len(seq), page_size=16 if cache == "paged" else None, kv_dtype=kv_dtype)
        rows.append(model(seq[None, :len(p)], cache=kv)[0, -1].float())
        for t in range(len(p), len(seq) - 1):
            rows.append(model(seq[None, t:t + 1], cache=kv)[0, -1].float())
    return torch.stack(rows)


def _targets(seqs, prompts):
    return torch.cat([seq[len(p):] for seq, p in zip(seqs, prompts)])


def _teacher_forced(model, seqs, prompts, kv_dtype, cache="paged"):
    """Fraction of the steps at which the model, fed `seqs` (see _forced_logits), predicts the next token of `seqs`."""
    return float((_forced_logits(model, seqs, prompts, kv_dtype, cache).argmax(-1) == _targets(seqs, prompts))
                 .float().mean())


def test_generate_agreement(trained_decoder):
    """Greedy generation (8 fixed prompts from the text, 48 tokens each) over an int8 / fp8 e4m3 cache against the
    fp16 cache, paged and contiguous, on the committed model. Printed: free-running greedy agreement (position by
    position; one flipped near-tie forks the rest of that sequence), teacher-forced agreement (each step fed the
    fp16 cache's tokens: the share of per-token argmax decisions a quantized cache keeps), the logit error of the
    quantized cache against the fp16 cache on those steps, and the top-2 logit gap of the fp16 decisions it flips.
    Measured: greedy int8 81.0%, fp8 56.2%; teacher-forced 98.4% for both (6 of 384 decisions flipped; fp16 top-2
    gaps 0.008-0.355 for int8, 0.0-0.78 for fp8; 5% of this model's steps have a gap under 0.2); logit error int8
    max 0.35 / mean 0.052, fp8 max 1.47 / mean 0.24; the fp32 model agrees with the fp16 one on 100%. Asserted:
    paged and contiguous caches give the same tokens (same quantized values, same kernels); teacher-forced
    agreement >= 98%; no decision with an fp16 top-2 gap of 1 logit or more flips; mean logit error <= 0.1 (int8)
    and <= 0.5 (fp8). Free-running agreement over 64 prompts: test_generate_greedy_agreement (and its >= 95%
    target, xfail)."""
    from transformer.models import DecoderOnly
    cfg, state, prompts = trained_decoder
    model = DecoderOnly(cfg).to(torch.float16).eval()
    model.load_state_dict(state)
    tokens, lines = {}, []
    for cache in ("paged", "contiguous"):
        base = _greedy(model, prompts, 48, None, cache)
        ref = _forced_logits(model, base, prompts, None, cache)
        top2 = ref.topk(2).values
        gap = top2[:, 0] - top2[:, 1]
        assert bool((ref.argmax(-1) == _targets(base, prompts)).all())  # the fp16 cache replays its own tokens
        for kd in FORMATS:
            out = _greedy(model, prompts, 48, kd, cache)
            if cache == "contiguous":
                assert all(torch.equal(a, b) for a, b in zip(out, tokens[kd])), kd
            tokens[kd] = out
            logits = _forced_logits(model, base, prompts, kd, cache)
            flipped = logits.argmax(-1) != ref.argmax(-1)
            err = (logits - ref).abs().amax(-1)
            forced = 1 - float(flipped.float().mean())
            lines.append(f"{cache} {kd}: greedy {_agreement(out, base, prompts):.1%}, teacher-forced {forced:.1%}, "
                         f"logit error max {float(err.max()):.3f} mean {float(err.mean()):.4f}, fp16 top-2 gaps of "
                         f"the flipped decisions {[round(float(g), 3) for g in gap[flipped]]}")
            assert forced >= 0.98, lines[-1]
            assert not bool((flipped & (gap >= 1.0)).any()), lines[-1]
            assert float(err.mean()) <= (0.1 if kd == "int8" else 0.5), lines[-1]
    print("\nagreement with the fp16 cache:\n" + "\n".join(lines))


@pytest.fixture(scope="module")
def greedy_figures(trained_decoder):
    """Free-running greedy agreement with the fp16 cache over 64 prompts from the text (seeded offsets, 8-24
    tokens, 48 generated tokens each, paged): one near-tie flip forks the rest of its sequence, so a small prompt
    set measures mostly luck (on the 8 prompts of test_generate_agreement a bf16 copy of the cache scores 92.4%,
    on these 64, 97.3%). Measured for int8, fp8 e4m3, and, as the floor of the measurement, the fp16 cache with
    every key and value rounded through bf16 on its way in (a 16-bit storage nobody calls lossy). Returns
    {name: (agreement, forked sequences)}."""
    from transformer.models import DecoderOnly
    from transformer.kv_cache import KVCache
    import transformer.nn.attention as attention_module
    cfg, state, _ = trained_decoder
    model = DecoderOnly(cfg).to(torch.float16).eval()
    model.load_state_dict(state)
    text = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "data",
                             "attention.txt"), encoding="utf-8").read()
    chars = sorted(set(text))
    data = torch.tensor([chars.index(ch) for ch in text])
    gen = torch.Generator().manual_seed(1)
    offsets = torch.randint(0, len(data) - 64, (64,), generator=gen).tolist()
    lengths = torch.randint(8, 25, (64,), generator=gen).tolist()
    prompts = [data[o:o + n] for o, n in zip(offsets, lengths)]
    base = _greedy(model, prompts, 48, None)

    def measure(out):
        return _agreement(out, base, prompts), sum(int(not torch.equal(a, b)) for a, b in zip(out, base))

    figures = {kd: measure(_greedy(model, prompts, 48, kd)) for kd in FORMATS}
    with pytest.MonkeyPatch.context() as mp:   # keys and values reach the cache by write (prefill) and by the
        bf16 = lambda x: x.to(torch.bfloat16).to(x.dtype)   # noqa: E731   decode call's append (k=, v=)
        write, decode = KVCache.write, attention_module.decode_attention
        mp.setattr(KVCache, "write", lambda self, layer, k, v, *a: write(self, layer, bf16(k), bf16(v), *a))
        mp.setattr(attention_module, "decode_attention", lambda q, kc, vc, sl, *, k=None, v=None, **kw: decode(
            q, kc, vc, sl, k=None if k is None else bf16(k), v=None if v is None else bf16(v), **kw))
        figures["bf16 storage"] = measure(_greedy(model, prompts, 48, None))
    print("\nfree-running greedy agreement with the fp16 cache, 64 prompts x 48 tokens: " + ", ".join(
        f"{name} {agree:.1%} ({forks} of 64 sequences fork)" for name, (agree, forks) in figures.items()))
    return figures


def test_generate_greedy_agreement(greedy_figures):
    """What the 64-prompt measurement asserts: the floor (bf16 storage) meets the 95% target, so the measurement
    can tell a 16-bit cache from an 8-bit one (measured 97.3%); int8 keeps >= 85% (measured 90.3%, 9 forked
    sequences) and fp8 e4m3 >= 75% (measured 81.3%, 21 forked): the figures of the current quantizer, kept from
    regressing. Fake-quantized variants measured the same way (keys / values quantized in fp32 and stored in
    fp16): int8 keys only 92.4%, int8 values only 94.2%, per-32-channel-group scales 90.3%, keys divided by a
    per-channel sqrt(amax) of the first write (a smoothing that needs no kernel change) with fp16 values 95.5% and
    with int8 values 91.2%, a Hadamard rotation of both 91.5%, 10-bit per-token codes 99.1%."""
    assert greedy_figures["bf16 storage"][0] >= 0.95, greedy_figures
    assert greedy_figures["int8"][0] >= 0.85, greedy_figures
    assert greedy_figures["fp8_e4m3"][0] >= 0.75, greedy_figures


@pytest.mark.xfail(strict=True, reason="finding: greedy generation over an int8 cache keeps 90.3% of the fp16 "
                   "cache's tokens over 64 prompts and fp8 e4m3 81.3% (target >= 95%); a bf16 copy of the fp16 "
                   "cache keeps 97.3%. Every per-token flip is a near-tie (test_generate_agreement), but a fork "
                   "changes every later token, and no 8-bit per-token, per-group, smoothed or rotated variant "
                   "measured reaches 95% on this model (test_generate_greedy_agreement)")
def test_generate_greedy_agreement_target(greedy_figures):
    """The accuracy target for free-running generation: greedy generate over an int8 or fp8 e4m3 cache agrees
    with the fp16 cache on >= 95% of the tokens (64 prompts x 48 tokens, paged)."""
    assert min(greedy_figures[kd][0] for kd in FORMATS) >= 0.95, greedy_figures


def test_generate_agreement_on_the_cuda_kernels(trained_decoder):
    """The same through the CUDA decode kernels (emulated on a CPU machine), 4 prompts x 24 tokens, int8: the
    tokens the cuda kernels generate over an int8 cache, fed back teacher-forced through the default backend's
    int8 path, are predicted on >= 99% of the steps (both read the same quantized cache; they differ only in
    summation order; measured 100%), and the cuda int8 path keeps >= 98% of the fp16 cache's per-token decisions
    (the bar of test_generate_agreement; measured 99.0%, 1 of 96)."""
    require_backend("cuda")
    from transformer.models import DecoderOnly
    cfg, state, prompts = trained_decoder
    prompts = prompts[:4]
    model = DecoderOnly(cfg, backend="cuda").to(torch.float16).eval()
    model.load_state_dict(state)
    default = DecoderOnly(cfg).to(torch.float16).eval()
    default.load_state_dict(state)
    with transformer.backends.record_dispatches() as counts:
        out = _greedy(model, prompts, 24, "int8")
        forced = _teacher_forced(model, _greedy(default, prompts, 24, None), prompts, "int8")
    assert counts[("decode_attention", "cuda")] > 0
    cross = _teacher_forced(default, out, prompts, "int8")
    print(f"\ncuda kernels, int8: default backend predicts the cuda tokens {cross:.1%}, "
          f"teacher-forced agreement with the fp16 cache {forced:.1%}")
    assert cross >= 0.99 and forced >= 0.98, (cross, forced)


def test_chunked_prefill_over_a_quantized_cache():
    """A non-empty quantized cache extended by 40 tokens at once (causal chunks of 16 through decode_attention)
    equals extending it token by token."""
    from transformer.models import DecoderOnly, DecoderOnlyConfig
    torch.manual_seed(0)
    model = DecoderOnly(DecoderOnlyConfig.preset("tiny"), backend="reference").eval()
    ids = torch.randint(0, 256, (2, 50))
    with torch.no_grad():
        a, b = model.make_cache(2, 64, kv_dtype="int8"), model.make_cache(2, 64, kv_dtype="int8", page_size=7)
        model.hidden_states(ids[:, :10], cache=a)
        model.hidden_states(ids[:, :10], cache=b)
        chunked = model.hidden_states(ids[:, 10:], cache=a)
        steps = torch.cat([model.hidden_states(ids[:, i:i + 1], cache=b) for i in range(10, 50)], dim=1)
    assert torch.allclose(chunked, steps, atol=1e-5, rtol=1e-5)
    assert a.lengths == b.lengths == [50, 50]


# ---------------------------------------------------------------------------------------------
# Bytes loaded by the Triton split kernel (interpreter count)
# ---------------------------------------------------------------------------------------------

def test_split_kernel_reads_8_bits_per_element():
    """bytes loaded by _decode_split_kv over an int8 / fp8 cache / over the fp16 cache, group 8, D 128, 4096
    tokens, contiguous and paged (page 16): <= 0.55 (8 bits per element + a 4-byte scale per token and head;
    measured 0.516 contiguous, 0.520 paged, int8 and fp8 alike)."""
    require_backend("triton")
    from benchmarks.interp_count import Counter
    ratios = {}
    for page_size in (None, 16):
        base = make_case([4096], 1, 2, 8, 128, torch.float16, page_size=page_size, spare=0)
        counts = {}
        for kd in (None,) + FORMATS:
            c = base if kd is None else quantize_case(base, kd)
            kw = {} if kd is None else dict(k_scale=c.k_scale, v_scale=c.v_scale)
            with Counter() as cnt:
                transformer.decode_attention(c.q, c.k_cache, c.v_cache, c.cache_seqlens, block_table=c.block_table,
                                             num_splits=1, backend="triton", **kw)
            counts[kd] = cnt.kernels["_decode_split_kv"].load_bytes
        for kd in FORMATS:
            ratios[page_size, kd] = counts[kd] / counts[None]
    print("\nbytes loaded (quantized / fp16): " + ", ".join(f"page {p} {k} {r:.3f}" for (p, k), r in ratios.items()))
    assert all(r <= 0.55 for r in ratios.values()), ratios


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------

def _bad_decode_calls():
    c = make_qcase([3, 5], 1, 2, 2, 64, torch.float16, "int8", page_size=16, append=True)
    f = make_qcase([3, 5], 1, 2, 2, 64, torch.float16, "fp8_e4m3", page_size=16, append=True)
    plain = make_case([3, 5], 1, 2, 2, 64, torch.float16, page_size=16, append=True)
    return {
        "k_scale missing": (ValueError, "k_scale", dict(k_scale=None)),
        "v_scale missing": (ValueError, "v_scale", dict(v_scale=None)),
        "k_scale shape": (ValueError, "k_scale", dict(k_scale=c.k_scale[:, :8])),
        "v_scale with D": (ValueError, "v_scale", dict(v_scale=c.v_scale[..., None].expand(*c.v_scale.shape, 64))),
        "k_scale dtype": (TypeError, "k_scale", dict(k_scale=c.k_scale.half())),
        "v_scale device": (ValueError, "v_scale", dict(v_scale=torch.empty(c.v_scale.shape, device="meta"))),
        "scales of a 16-bit cache": (ValueError, "k_scale", dict(k_cache=plain.k_cache, v_cache=plain.v_cache)),
        "mixed formats": (TypeError, "v_cache", dict(v_cache=f.v_cache)),
        "int8 append": (TypeError, r"^k must", dict(k=c.k.to(torch.int8))),
        "fp8 append": (TypeError, r"^v must", dict(v=c.v.to(torch.float8_e4m3fn))),
        "append dtype": (TypeError, r"^k must", dict(k=c.k.bfloat16())),
        "uint8 cache": (TypeError, "k_cache", dict(k_cache=c.k_cache.view(torch.uint8),
                                                   v_cache=c.v_cache.view(torch.uint8))),
    }, c


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("what", list(_bad_decode_calls()[0]))
def test_decode_bad_quantized_input(backend, what):
    """ValueError / TypeError naming the argument, from the public function on every backend and from the
    reference itself."""
    _require(backend)
    calls, c = _bad_decode_calls()
    err, name, change = calls[what]
    kw = dict(k=c.k, v=c.v, block_table=c.block_table, k_scale=c.k_scale, v_scale=c.v_scale)
    kw.update({k: v for k, v in change.items() if k in kw})
    kc, vc = change.get("k_cache", c.k_cache), change.get("v_cache", c.v_cache)
    with pytest.raises(err, match=name):
        transformer.decode_attention(c.q, kc, vc, c.cache_seqlens, backend=backend, **kw)
    if backend == "reference":
        with pytest.raises(err, match=name):
            reference.decode_attention(c.q, kc, vc, c.cache_seqlens, **kw)


def test_kernels_decline_float32_q_with_a_quantized_cache():
    c = make_qcase([3], 1, 1, 2, 64, torch.float16, "int8")
    for backend in ("triton", "cuda"):
        text = transformer.backends.explain("decode_attention", c.q.float(), c.k_cache, c.v_cache, c.cache_seqlens,
                                            k_scale=c.k_scale, v_scale=c.v_scale, backend=backend)
        assert "float16/bfloat16" in text and "int8" in text, text
    out = transformer.decode_attention(c.q.float(), c.k_cache, c.v_cache, c.cache_seqlens, k_scale=c.k_scale,
                                       v_scale=c.v_scale, backend="torch")
    assert out.dtype == torch.float32


def test_quantizer_and_cache_bad_input():
    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match="kv_dtype"):
        reference.quantize_kv(x, "int4")
    with pytest.raises(ValueError, match="kv_dtype"):
        reference.quantize_kv(x, None)
    with pytest.raises(TypeError, match="^x must"):
        reference.quantize_kv(x.to(torch.int8), "int8")
    with pytest.raises(ValueError, match="^x must"):
        reference.quantize_kv(x[0, 0], "int8")
    xq, sc = reference.quantize_kv(x, "int8")
    with pytest.raises(ValueError, match="^scale must"):
        reference.dequantize_kv(xq, sc[:, :2])
    with pytest.raises(TypeError, match="^xq must"):
        reference.dequantize_kv(x, sc)
    with pytest.raises(TypeError, match="^scale must"):
        reference.dequantize_kv(xq, sc.double())
    with pytest.raises(ValueError, match="kv_dtype"):
        transformer.KVCache(1, 2, 8, 2, 16, kv_dtype="fp8_e5m2")
    with pytest.raises(ValueError, match="kv_dtype"):
        transformer.KVCache(1, 2, 8, 2, 16, kv_dtype=torch.int8)
    cache = transformer.KVCache(1, 2, 8, 2, 16, kv_dtype="int8", dtype=torch.float16)
    with pytest.raises(TypeError, match="^k must"):
        cache.write(0, torch.zeros(3, 2, 16, dtype=torch.int8), torch.zeros(3, 2, 16), torch.zeros(3).long(),
                    torch.arange(3))
    from transformer.models import DecoderOnly, DecoderOnlyConfig
    model = DecoderOnly(DecoderOnlyConfig.preset("tiny")).eval()
    with pytest.raises(ValueError, match="kv_dtype"):
        model.make_cache(1, 8, kv_dtype="int4")
    with pytest.raises(ValueError, match="kv_dtype"):
        transformer.generate(model, [[1, 2]], 2, kv_dtype="int4")
    with pytest.raises(ValueError, match="kv_dtype"):
        transformer.generate(model, [[1, 2]], 2, kv_dtype="int8", cache=None)


def test_kv_cache_layout_and_bytes():
    c16 = transformer.KVCache(2, 3, 40, 2, 128, dtype=torch.float16, page_size=16)
    c8 = transformer.KVCache(2, 3, 40, 2, 128, dtype=torch.float16, page_size=16, kv_dtype="fp8_e4m3")
    assert c8.k[0].dtype == torch.float8_e4m3fn and c8.k_scale[0].shape == c8.k[0].shape[:3]
    assert c8.scales(1).keys() == {"k_scale", "v_scale"} and c16.scales(1) == {}
    assert abs(c8.nbytes / c16.nbytes - (128 + 4) / 256) < 1e-9
    assert "kv_dtype='fp8_e4m3'" in repr(c8)


# ---------------------------------------------------------------------------------------------
# The op: opcheck, torch.compile (both backends, one contract)
# ---------------------------------------------------------------------------------------------

def _op(backend):
    if backend == "triton":
        import transformer._triton.decode  # noqa: F401
        return torch.ops.tileformer_triton.decode_attention
    from transformer._cuda import ops
    return ops(DEVICE).decode_attention


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("kv_dtype", FORMATS)
def test_quantized_opcheck(backend, kv_dtype):
    _require(backend)
    c = make_qcase([3, 20], 2, 2, 4, 64, torch.float16, kv_dtype, page_size=16, append=True)
    ks, vs = (torch.nan_to_num(s, nan=1.0) for s in (c.k_scale, c.v_scale))
    args = (c.q, c.k_cache, c.v_cache, c.cache_seqlens, c.k, c.v, c.block_table, None, 0.125, -1, 0, 0.0, 2, ks, vs)
    # test_schema multiplies the inputs, which torch does not implement for Float8_e4m3fn on CPU: the fp8 call
    # runs the other checks (the schema is the one the int8 call checks)
    utils = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(_op(backend).default, args, **({} if kv_dtype == "int8" else dict(test_utils=utils)))
    schema = str(_op(backend).default._schema)
    assert "k_scale=None" in schema and "v_scale=None" in schema and "!)? k_scale" in schema


@pytest.mark.parametrize("backend", KERNELS)
def test_quantized_torch_compile(backend):
    _require(backend)
    c = make_qcase([3, 20], 2, 2, 4, 64, torch.float16, "int8", page_size=16, append=True)

    def step(q, kc, vc, lens, k, v, bt, ks, vs):
        return transformer.decode_attention(q, kc, vc, lens, k=k, v=v, block_table=bt, k_scale=ks, v_scale=vs,
                                            num_splits=2, return_lse=True, backend=backend)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    e = [t.clone() for t in (c.k_cache, c.v_cache, c.k_scale, c.v_scale)]
    g = [t.clone() for t in (c.k_cache, c.v_cache, c.k_scale, c.v_scale)]
    eager = step(c.q, e[0], e[1], c.cache_seqlens, c.k, c.v, c.block_table, e[2], e[3])
    comp = compiled(c.q, g[0], g[1], c.cache_seqlens, c.k, c.v, c.block_table, g[2], g[3])
    assert torch.equal(eager[0], comp[0]) and torch.equal(eager[1], comp[1])
    for x, y in zip(e, g):                    # the appends (values and scales) are kept in the graph
        assert torch.equal(raw(x), raw(y))


# ---------------------------------------------------------------------------------------------
# Static: the fp8 paths of the Triton kernels compile to cvt on sm_90, to integer code on sm_80
# ---------------------------------------------------------------------------------------------

_FP8_SCRIPT = """
import json, sys, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton_kernels.decode import aot_configs
out = {}
for c in aot_configs():
    if "fp8" not in c.name or not ("d128 g8 sq1" in c.name or "append" in c.name):
        continue
    for arch in c.archs:
        k = triton.compile(ASTSource(fn=c.kernel, signature=c.signature, constexprs=c.constexprs),
                           target=GPUTarget("cuda", arch, 32), options={"num_warps": c.num_warps,
                                                                        "num_stages": c.num_stages})
        out[f"{c.name} sm_{arch}"] = k.asm["ptx"].count("e4m3")
json.dump(out, sys.stdout)
"""


@pytest.mark.static
def test_fp8_paths_compile():
    import json
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _FP8_SCRIPT], capture_output=True, text=True, env=env, cwd=root)
    assert res.returncode == 0, res.stderr[-3000:]
    counts = json.loads(res.stdout)
    assert len(counts) == 6, counts    # split d128 g8 sq1, append, append with rotary: each sw (sm_80) and hw (sm_90)
    for name, n in counts.items():
        assert (n > 0) == name.endswith("sm_90"), counts      # cvt ... e4m3x2 on sm_90 only
