"""Conversions of the Triton interpreter (TRITON_INTERPRET=1) round as the GPU's do (triton_kernels/_interpreter.py).

(a) A kernel that loads fp32 and stores bf16 / fp16 gives torch's conversion (round to nearest, ties to even)
    bit for bit on exact ties, the fp32 values either side of each tie, every binade, subnormals, overflow,
    +-inf and NaN; bf16 / fp16 -> fp32 is exact for every bit pattern.
(b) With one visible key per query softmax is exactly 1, so the triton backend returns v bit for bit and
    its backward gives dv == dO bit for bit (flash_attention with Nk = 1 or a (0, 0) window,
    decode_attention with one cached token). The backward recomputes p from the stored log-sum-exp, which
    can give p = 1 - 2**-24 (head dims 40 and 111, scale 1/sqrt(D)); rounded to nearest it feeds 1.0 to
    the dv dot, truncated it feeds 1 - 2**-8 and dv misses dO by one bf16 ulp.
"""
from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

import transformer  # noqa: E402
from helpers import bits, require_backend  # noqa: E402

pytestmark = [
    pytest.mark.interpret,
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") != "1",
                       reason="checks the Triton interpreter's conversions; TRITON_INTERPRET=1 is not set "
                              "(on a GPU machine the kernels are compiled)"),
]

BLOCK = 16384


@triton.jit
def _convert(X, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(X + offs, mask=mask)
    tl.store(Y + offs, x.to(Y.dtype.element_ty), mask=mask)


def _kernel_convert(x, dtype):
    y = torch.empty(x.shape, dtype=dtype)
    _convert[(triton.cdiv(x.numel(), BLOCK),)](x, y, x.numel(), BLOCK=BLOCK)
    return y


def test_patch_is_active():
    from triton_kernels import _interpreter
    assert _interpreter.patch() in ("patched", "native")


def test_patch_raises_when_it_cannot_fix_the_interpreter(monkeypatch):
    """A Triton whose interpreter lacks InterpreterBuilder.cast_impl, or no longer sends fp32 -> bf16 through it,
    makes patch() raise instead of leaving the truncation in place; one that already rounds is left alone."""
    from triton.runtime import interpreter as interp

    from triton_kernels import _interpreter
    builder = interp.InterpreterBuilder
    own = getattr(builder.cast_impl, "__wrapped__", builder.cast_impl)     # Triton's own cast_impl
    monkeypatch.setattr(_interpreter, "_state", None)
    assert _interpreter.patch() == "native"                               # already rounds (patched): no change
    monkeypatch.setattr(_interpreter, "_state", None)
    monkeypatch.setattr(builder, "cast_impl", own)
    monkeypatch.setattr(builder, "create_fp_trunc", lambda self, src, dst_type: own(self, src, dst_type))
    with pytest.raises(RuntimeError, match="no longer go through InterpreterBuilder.cast_impl alone"):
        _interpreter.patch()
    assert builder.cast_impl is own and _interpreter._state is None
    monkeypatch.delattr(builder, "cast_impl")
    with pytest.raises(RuntimeError, match="probing the interpreter's cast failed"):
        _interpreter.patch()


def _all_patterns(dtype):
    """Every bit pattern of a 16-bit float dtype."""
    return torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(dtype)


def _fp32_cases(dtype):
    """fp32 inputs for fp32 -> dtype: every finite value of dtype, the midpoints between neighbours (exact ties
    in fp32), the fp32 neighbours of each midpoint, ties past the largest finite value, fp32 values below
    dtype's subnormals, fp32 extremes, +-inf, NaNs (quiet, signalling with low payload, negative)."""
    vals = _all_patterns(dtype).float()
    finite = torch.unique(vals[torch.isfinite(vals)])                 # sorted, -max .. max (one zero)
    fmax = finite[-1].double()
    ulp_max = fmax - finite[-2].double()
    mid = (finite[:-1].double() + finite[1:].double()) / 2            # exact in fp32 for 16-bit dtypes
    edges = torch.tensor([fmax + ulp_max / 2, -(fmax + ulp_max / 2)], dtype=torch.float64)   # tie to inf
    mid = torch.cat([mid, edges]).float()
    assert torch.equal(mid.double(), torch.cat([(finite[:-1].double() + finite[1:].double()) / 2, edges]))
    inf = torch.tensor(float("inf"))
    above, below = torch.nextafter(mid, inf), torch.nextafter(mid, -inf)
    specials = torch.tensor([0x00000001, 0x80000001, 0x00008000, 0x00018000, 0x000116C2, 0x007FFFFF, 0x00800000,
                             0x7F7FFFFF, 0xFF7FFFFF, 0x7F7F8000, 0x7F7F7FFF, 0x477FF000, 0x477FEFFF,
                             0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001, 0x7FBFFFFF],
                            dtype=torch.int64).to(torch.int32).view(torch.float32)
    rnd = torch.randint(-2**31, 2**31 - 1, (1 << 16,), dtype=torch.int32,
                        generator=torch.Generator().manual_seed(0)).view(torch.float32)
    return torch.cat([finite, mid, above, below, specials, rnd])


def _assert_same(got, want, what=""):
    """Bit for bit, except that any NaN matches any NaN."""
    nan = torch.isnan(want)
    bad = ((bits(got) != bits(want)) & ~nan) | (torch.isnan(got) != nan)
    assert not bad.any(), (f"{what}{int(bad.sum())} of {got.numel()} elements differ, e.g. (got, want) "
                           f"{[(hex(int(a)), hex(int(b))) for a, b in zip(bits(got)[bad][:4], bits(want)[bad][:4])]}")


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")   # numpy's fp16 overflow to inf
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=("bf16", "fp16"))
def test_fp32_to_half_rounds_to_nearest_even(dtype):
    x = _fp32_cases(dtype)
    _assert_same(_kernel_convert(x, dtype), x.to(dtype))


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=("bf16", "fp16"))
def test_half_to_fp32_is_exact(dtype):
    x = _all_patterns(dtype)
    _assert_same(_kernel_convert(x, torch.float32), x.float())


# ---------------------------------------------------------------------------------------------
# (b) one visible key: softmax is 1 exactly
# ---------------------------------------------------------------------------------------------

DTYPES = (torch.float16, torch.bfloat16)
HEAD_DIMS = (40, 64, 111)
SEEDS = (0, 1, 2)


def _rand(shape, dtype, gen, scale=1.0):
    return (torch.randn(shape, generator=gen) * scale).to(dtype)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=("fp16", "bf16"))
def test_one_key_attention_is_exact(dtype, d, seed):
    """out == v and dv == dO bit for bit when every query sees one key: Nk = 1 (every query row gets v; dv
    checked with one query), and Nq = Nk with window (0, 0) (query i sees key i only: many rows per call)."""
    require_backend("triton")
    gen = torch.Generator().manual_seed(seed)
    b, h = 2, 3
    for nq, nk, window in ((5, 1, (-1, -1)), (1, 1, (-1, -1)), (64, 64, (0, 0))):
        q = _rand((b, nq, h, d), dtype, gen, scale=3.0).requires_grad_()
        k = _rand((b, nk, h, d), dtype, gen, scale=3.0).requires_grad_()
        v = _rand((b, nk, h, d), dtype, gen).requires_grad_()
        case = f"Nq={nq} Nk={nk} window={window}: "
        out = transformer.flash_attention(q, k, v, window_size=window, backend="triton")
        _assert_same(out, v.detach().expand(b, nq, h, d), case + "out vs v: ")
        if nq == nk:
            do = _rand((b, nq, h, d), dtype, gen)
            out.backward(do)
            _assert_same(v.grad, do, case + "dv vs dO: ")


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=("fp16", "bf16"))
def test_one_cached_token_decode_is_exact(dtype, d, seed):
    """decode_attention over a cache holding one token per sequence returns that token's v bit for bit."""
    require_backend("triton")
    gen = torch.Generator().manual_seed(seed)
    b, hkv, group, s_max = 3, 2, 2, 8
    q = _rand((b, 1, hkv * group, d), dtype, gen, scale=3.0)
    k_cache = torch.full((b, s_max, hkv, d), float("nan"), dtype=dtype)
    v_cache = torch.full((b, s_max, hkv, d), float("nan"), dtype=dtype)
    k_cache[:, :1] = _rand((b, 1, hkv, d), dtype, gen, scale=3.0)
    v_cache[:, :1] = _rand((b, 1, hkv, d), dtype, gen)
    seqlens = torch.ones(b, dtype=torch.int32)
    want = v_cache[:, :1].repeat_interleave(group, dim=2)
    for splits in (0, 1, 3):
        out = transformer.decode_attention(q, k_cache, v_cache, seqlens, num_splits=splits, backend="triton")
        _assert_same(out, want, f"num_splits={splits}: ")
