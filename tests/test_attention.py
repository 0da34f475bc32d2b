"""Flash attention kernels (backend "triton"; "cuda" serves the same API) against the fp32 reference.

Every comparison uses the flash-attn rule (tests/helpers.assert_close): the kernel's max error against
reference.attention in fp32 may be at most 2x (outputs) / 3x (gradients) the error of the same reference
computed in the inputs' dtype. On a CPU machine the Triton kernels run through the interpreter (slow), so
the default run holds a representative subset; the full grid is under ``-m slow``.
"""
from __future__ import annotations

import itertools

import pytest
import torch

import transformer
from transformer import reference

import helpers

BACKENDS = helpers.kernel_backends("triton", "cuda")
FP16, BF16 = torch.float16, torch.bfloat16
HEADS = {"mha": (2, 2), "gqa": (6, 2), "mqa": (8, 1)}


def _inputs(b, nq, nk, hq, hkv, d, dtype, *, seed=0, layout="bshd"):
    """Leaf q [B, Nq, Hq, D], k/v [B, Nk, Hkv, D]; layout "bhsd" gives [B, H, N, D]-transposed views (strided)."""
    g = torch.Generator().manual_seed(seed)
    dev = helpers.DEVICE

    def make(n, h):
        if layout == "bhsd":
            t = torch.randn(b, h, n, d, generator=g).to(dev, dtype).transpose(1, 2)
        else:
            t = torch.randn(b, n, h, d, generator=g).to(dev, dtype)
        return t.requires_grad_(True)

    return make(nq, hq), make(nk, hkv), make(nk, hkv)


def _alibi(kind, b, hq, seed=1):
    if kind is None:
        return None
    g = torch.Generator().manual_seed(seed)
    shape = (hq,) if kind == "h" else (b, hq)
    return (torch.rand(*shape, generator=g) * 0.5 + 0.05).to(helpers.DEVICE)


def _grads(out, inputs, dout, lse=None, dlse=None):
    outs, gouts = [out], [dout]
    if dlse is not None:
        outs.append(lse)
        gouts.append(dlse)
    return torch.autograd.grad(outs, inputs, gouts)


def _skip_if_rejected(backend, op, call):
    """A backend may decline a call only through its dispatcher predicate, which states why: skip with that reason
    (e.g. a head dim the CUDA build did not compile)."""
    try:
        transformer.backends.select(op, call, backend)
    except ValueError as e:
        pytest.skip(f"dispatcher: {e}")


def _check(backend, q, k, v, *, check_grad=True, lse_grad=False, config="", **kw):
    """Forward (out, lse) and backward (dq, dk, dv) of the backend vs the fp32 and same-dtype references."""
    helpers.require_backend(backend)
    _skip_if_rejected(backend, "flash_attention", transformer.attention._describe(q, k, v, **kw))
    out, lse = transformer.flash_attention(q, k, v, return_lse=True, backend=backend, **kw)
    ref, ref_lse = reference.attention(q, k, v, return_lse=True, **kw)
    low, low_lse = reference.attention(q, k, v, return_lse=True, compute_dtype=None, **kw)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == (q.shape[0], q.shape[2], q.shape[1])
    helpers.assert_close(out, ref, low, name="out", config=config)
    helpers.assert_close(lse, ref_lse, low_lse.float(), name="lse", config=config)
    if not check_grad:
        return out
    g = torch.Generator().manual_seed(7)
    dout = torch.randn(out.shape, generator=g).to(out.device, out.dtype)
    dlse = torch.randn(lse.shape, generator=g).to(lse.device) if lse_grad else None
    got = _grads(out, (q, k, v), dout, lse, dlse)
    want = _grads(ref, (q, k, v), dout.float(), ref_lse, dlse)
    base = _grads(low, (q, k, v), dout, low_lse, None if dlse is None else dlse.to(low_lse.dtype))
    for name, a, r, rl in zip(("dq", "dk", "dv"), got, want, base):
        assert torch.isfinite(a).all(), f"{name} has non-finite values [{config}]"
        helpers.assert_close(a, r, rl, factor=3.0, name=name, config=config)
    return out


# ---------------------------------------------------------------------------------------------
# Representative subset (default run)
# ---------------------------------------------------------------------------------------------

# (b, nq, nk, heads, d, dtype, causal, window, softcap, alibi)
CASES = [
    (1, 1, 239, "mha", 64, FP16, True, (-1, -1), 0.0, None),
    (1, 113, 203, "mqa", 40, BF16, False, (-1, -1), 0.0, None),
    (1, 128, 217, "gqa", 80, FP16, True, (-1, -1), 0.0, None),
    (1, 108, 256, "mha", 111, BF16, False, (40, 13), 0.0, None),
    (2, 203, 77, "mha", 64, FP16, True, (-1, -1), 0.0, None),       # Nq > Nk: rows that see no key
    (1, 97, 65, "mha", 256, BF16, True, (-1, -1), 0.0, None),
    (1, 130, 141, "mha", 128, FP16, False, (-1, -1), 3.0, "h"),
    (2, 70, 90, "mqa", 64, BF16, True, (17, -1), 0.0, "bh"),
    (1, 150, 111, "gqa", 32, FP16, False, (0, 30), 5.0, "h"),       # window with right < left, softcap + ALiBi
    (1, 65, 47, "mha", 192, FP16, True, (-1, -1), 0.0, None),       # non-power-of-two head dim, padded to 256
    (1, 33, 80, "gqa", 16, BF16, False, (5, 5), 0.0, None),
    (1, 59, 71, "mqa", 59, FP16, True, (9, -1), 0.0, "h"),         # head dims not a multiple of 8: padded
    (1, 17, 30, "mha", 5, BF16, False, (-1, -1), 2.0, None),
]


def _case_id(c):
    b, nq, nk, heads, d, dtype, causal, window, softcap, alibi = c
    parts = [f"b{b}", f"{nq}x{nk}", heads, f"d{d}", str(dtype)[6:]]
    parts += ["causal"] if causal else []
    parts += [f"win{window[0]}_{window[1]}"] if window != (-1, -1) else []
    parts += [f"cap{softcap:g}"] if softcap else []
    parts += [f"alibi_{alibi}"] if alibi else []
    return "-".join(parts)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_forward_backward(backend, case):
    b, nq, nk, heads, d, dtype, causal, window, softcap, alibi = case
    hq, hkv = HEADS[heads]
    q, k, v = _inputs(b, nq, nk, hq, hkv, d, dtype)
    _check(backend, q, k, v, causal=causal, window_size=window, softcap=softcap,
           alibi_slopes=_alibi(alibi, b, hq), config=_case_id(case))


@pytest.mark.parametrize("backend", ["torch"] + BACKENDS)
@pytest.mark.parametrize("alibi", [None, "bh"])
def test_single_key_rows_backward(backend, alibi):
    """Window (0, 0): every query sees one key, so P = 1 and dV is a sum of a query group's dO (GQA 6:2), which
    in bf16 often lies on a rounding tie; PyTorch's low-precision result is then exact and the backend must be too
    (the torch backend's CPU SDPA recomputed P within ~1e-6 of 1 in its fused backward and lost such ties)."""
    helpers.require_backend(backend)
    b, nq, nk, (hq, hkv), d = 2, 64, 80, HEADS["gqa"], 32
    q, k, v = _inputs(b, nq, nk, hq, hkv, d, BF16, seed=3)
    kw = dict(causal=True, window_size=(0, 0), alibi_slopes=_alibi(alibi, b, hq))
    _skip_if_rejected(backend, "flash_attention", transformer.attention._describe(q, k, v, **kw))
    out = transformer.flash_attention(q, k, v, backend=backend, **kw)
    ref = reference.attention(q, k, v, **kw)
    low = reference.attention(q, k, v, compute_dtype=None, **kw)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out.device, out.dtype)
    got = torch.autograd.grad(out, (q, k, v), dout)
    want = torch.autograd.grad(ref, (q, k, v), dout.float())
    base = torch.autograd.grad(low, (q, k, v), dout)
    for name, a, r, rl in zip(("dq", "dk", "dv"), got, want, base):
        helpers.assert_close(a, r, rl, factor=3.0, name=name, config=f"{backend} alibi={alibi}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("nk, d, causal, deterministic, with_lse", [
    (1, 256, False, True, False), (1, 256, False, False, False), (1, 111, True, False, True),
    (1, 64, False, True, True), (5, 80, False, False, True), (13, 40, True, True, False)])
def test_keys_in_one_tile_backward(backend, nk, d, causal, deterministic, with_lse):
    """Every key in one key tile. With one key P = 1, so the true dS, dK and dQ are exactly 0 and PyTorch's
    low-precision gradients are exact: the tolerance is the atol alone. A backward that takes delta =
    rowsum(dO o O) from its own pass leaves the rounding of two summation orders of dO . V in every dS and sums
    it into dK over all query rows (1.8e-5 with 78 rows x 3 heads at D 256); delta from the tile does not.
    Several keys in one tile check the tile's row sums (rowsum(P), rowsum(P o dP)) against the reference."""
    helpers.require_backend(backend)
    b, nq, hq, hkv = 1, 78, 3, 1
    q, k, v = _inputs(b, nq, nk, hq, hkv, d, FP16, seed=nk)
    kw = dict(causal=causal, softmax_scale=0.87, deterministic=deterministic)
    _skip_if_rejected(backend, "flash_attention", transformer.attention._describe(q, k, v, **kw))
    out, lse = transformer.flash_attention(q, k, v, backend=backend, return_lse=True, **kw)
    kw.pop("deterministic")
    ref, ref_lse = reference.attention(q, k, v, return_lse=True, **kw)
    low, low_lse = reference.attention(q, k, v, compute_dtype=None, return_lse=True, **kw)
    g = torch.Generator().manual_seed(7)
    dout = torch.randn(out.shape, generator=g).to(out.device, out.dtype)
    dlse = torch.randn(lse.shape, generator=g).to(lse.device) if with_lse else None
    got = _grads(out, (q, k, v), dout, lse, dlse)
    want = _grads(ref, (q, k, v), dout.float(), ref_lse, dlse)
    base = _grads(low, (q, k, v), dout, low_lse, dlse)
    for name, a, r, rl in zip(("dq", "dk", "dv"), got, want, base):
        helpers.assert_close(a, r, rl, factor=3.0, name=name, config=f"{backend} nk={nk} d={d} causal={causal}")
    if deterministic:   # bit-identical from run to run
        out2, lse2 = transformer.flash_attention(q, k, v, backend=backend, return_lse=True, deterministic=True, **kw)
        again = _grads(out2, (q, k, v), dout, lse2, dlse)
        assert all(torch.equal(x, y) for x, y in zip(got, again)), f"{backend}: deterministic gradients differ"


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_rows_are_zero_not_nan(backend):
    """Causal with Nq > Nk: the first Nq - Nk queries see no key -> out 0, lse -inf, their dq 0."""
    helpers.require_backend(backend)
    q, k, v = _inputs(1, 70, 20, 2, 1, 64, FP16, seed=3)
    out, lse = transformer.flash_attention(q, k, v, causal=True, return_lse=True, backend=backend)
    assert torch.equal(out[:, :50], torch.zeros_like(out[:, :50]))
    assert torch.isneginf(lse[:, :, :50]).all() and torch.isfinite(lse[:, :, 50:]).all()
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    assert torch.equal(dq[:, :50], torch.zeros_like(dq[:, :50]))
    assert all(torch.isfinite(t).all() for t in (dq, dk, dv))


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_keys(backend):
    """Nk = 0: every output 0, lse -inf, gradients 0."""
    helpers.require_backend(backend)
    q, k, v = _inputs(2, 5, 0, 2, 2, 64, BF16)
    out, lse = transformer.flash_attention(q, k, v, return_lse=True, backend=backend)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
    dq, = torch.autograd.grad(out, (q,), torch.ones_like(out))
    assert torch.equal(dq, torch.zeros_like(dq))


@pytest.mark.parametrize("backend", BACKENDS)
def test_lse_gradient(backend):
    """A loss that uses the returned lse: its gradient flows into dq/dk (delta - dlse in the preprocess)."""
    q, k, v = _inputs(1, 77, 93, 2, 1, 64, FP16, seed=5)
    _check(backend, q, k, v, causal=True, lse_grad=True, config="lse-grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_bhsd_inputs(backend):
    """[B, H, N, D] tensors transposed to [B, N, H, D] (the SDPA layout) are read in place."""
    q, k, v = _inputs(2, 67, 85, 4, 2, 64, BF16, layout="bhsd", seed=11)
    assert not q.is_contiguous() and q.stride(-1) == 1
    _check(backend, q, k, v, causal=True, config="bhsd")


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_bit_identical(backend):
    helpers.require_backend(backend)
    q, k, v = _inputs(1, 96, 150, 4, 2, 80, FP16, seed=13)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(q.device, q.dtype)
    runs = []
    for _ in range(2):
        out = transformer.flash_attention(q, k, v, causal=True, deterministic=True, backend=backend)
        runs.append((out,) + tuple(torch.autograd.grad(out, (q, k, v), dout)))
    for name, a, b in zip(("out", "dq", "dk", "dv"), *runs):
        assert torch.equal(a, b), f"{name} differs between two deterministic runs"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_int64_offsets(backend):
    """q, k, v, out, dq, dk, dv of more than 2^31 elements (8200 sequences of 128 tokens, 16 heads, D 128):
    the last sequences are addressed with 64-bit offsets. Forward and backward vs the reference on the first
    and the last two sequences (dout is zero elsewhere, so their gradients are zero)."""
    if not helpers.HAS_GPU:
        pytest.skip("needs a CUDA GPU: tensors of more than 2^31 elements are too large for the interpreter")
    helpers.require_backend(backend)
    b, n, h, d = 8200, 128, 16, 128
    assert b * n * h * d > 2 ** 31
    if torch.cuda.mem_get_info()[0] < 48 * 2 ** 30:
        pytest.skip("needs 48 GiB of free GPU memory (8 tensors of 4.3 GB)")
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=BF16, generator=g).requires_grad_(True) for _ in range(3))
    out = transformer.flash_attention(q, k, v, causal=True, backend=backend)
    sel = [0, b - 2, b - 1]
    dout = torch.zeros_like(out)
    dout[sel] = torch.randn(len(sel), n, h, d, device="cuda", dtype=BF16, generator=g)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    qs, ks, vs = (t.detach()[sel].requires_grad_(True) for t in (q, k, v))
    ref = reference.attention(qs, ks, vs, causal=True)
    low = reference.attention(qs, ks, vs, causal=True, compute_dtype=None)
    helpers.assert_close(out[sel], ref, low, name="out (first and last sequences)")
    want = torch.autograd.grad(ref, (qs, ks, vs), dout[sel].float())
    base = torch.autograd.grad(low, (qs, ks, vs), dout[sel])
    for name, a, r, rl in zip(("dq", "dk", "dv"), (dq, dk, dv), want, base):
        helpers.assert_close(a[sel], r, rl, factor=3.0, name=name)
    assert not dq[1:-2].any() and not dk[1:-2].any() and not dv[1:-2].any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_top_left_alignment(backend):
    """The SDPA drop-in's is_causal (top-left) goes through the same kernel via causal_align."""
    helpers.require_backend(backend)
    impl = transformer.backends.select("flash_attention", _call_for(backend), backend)[1]
    q, k, v = _inputs(1, 90, 60, 2, 2, 64, FP16, seed=17)
    kw = dict(causal=True, softmax_scale=64 ** -0.5, window_size=(-1, -1), alibi_slopes=_alibi("h", 1, 2),
              softcap=0.0)
    out, lse = impl(q, k, v, deterministic=False, return_lse=True, causal_align="top_left", **kw)
    ref, ref_lse = reference.attention(q, k, v, return_lse=True, causal_align="top_left", **kw)
    low, low_lse = reference.attention(q, k, v, return_lse=True, causal_align="top_left", compute_dtype=None, **kw)
    helpers.assert_close(out, ref, low, config="top_left")
    helpers.assert_close(lse, ref_lse, low_lse.float(), name="lse", config="top_left")
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(out.dtype)
    for name, a, r, rl in zip(("dq", "dk", "dv"), torch.autograd.grad(out, (q, k, v), dout),
                              torch.autograd.grad(ref, (q, k, v), dout.float()),
                              torch.autograd.grad(low, (q, k, v), dout)):
        helpers.assert_close(a, r, rl, factor=3.0, name=name, config="top_left")


def _call_for(backend):
    q, k, v = _inputs(1, 2, 2, 1, 1, 16, FP16)
    return transformer.attention._describe(q, k, v)


# ---------------------------------------------------------------------------------------------
# Varlen
# ---------------------------------------------------------------------------------------------

def _varlen_inputs(lens_q, lens_k, hq, hkv, d, dtype, *, tail_q=0, tail_k=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    cu_q = torch.tensor([0] + list(itertools.accumulate(lens_q)), dtype=torch.int32, device=helpers.DEVICE)
    cu_k = torch.tensor([0] + list(itertools.accumulate(lens_k)), dtype=torch.int32, device=helpers.DEVICE)
    tq, tk = sum(lens_q) + tail_q, sum(lens_k) + tail_k

    def make(n, h):
        return torch.randn(n, h, d, generator=g).to(helpers.DEVICE, dtype).requires_grad_(True)

    return make(tq, hq), make(tk, hkv), make(tk, hkv), cu_q, cu_k, max(lens_q), max(lens_k)


VARLEN_CASES = [
    # (lens_q, lens_k, heads, d, dtype, causal, window, alibi, tails)
    ([1, 67, 130, 9], [1, 90, 130, 40], "gqa", 64, FP16, True, (-1, -1), None, (0, 0)),
    ([33, 1, 100], [80, 17, 1], "mqa", 80, BF16, False, (20, 5), "bh", (3, 2)),   # tokens past cu[-1]
    ([50, 0, 70], [64, 5, 0], "mha", 40, FP16, True, (-1, -1), "h", (0, 0)),      # empty sequences
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", VARLEN_CASES, ids=["gqa-causal", "mqa-window-alibi-tail", "empty-seqs"])
def test_varlen(backend, case):
    helpers.require_backend(backend)
    lens_q, lens_k, heads, d, dtype, causal, window, alibi, (tail_q, tail_k) = case
    hq, hkv = HEADS[heads]
    q, k, v, cu_q, cu_k, mq, mk = _varlen_inputs(lens_q, lens_k, hq, hkv, d, dtype, tail_q=tail_q, tail_k=tail_k)
    kw = dict(causal=causal, window_size=window, alibi_slopes=_alibi(alibi, len(lens_q), hq))
    out, lse = transformer.flash_attention_varlen(q, k, v, cu_q, cu_k, mq, mk, return_lse=True, backend=backend,
                                                  **kw)
    ref, ref_lse = reference.attention_varlen(q, k, v, cu_q, cu_k, mq, mk, return_lse=True, **kw)
    low, low_lse = reference.attention_varlen(q, k, v, cu_q, cu_k, mq, mk, return_lse=True, compute_dtype=None,
                                              **kw)
    assert lse.shape == (hq, q.shape[0])
    helpers.assert_close(out, ref, low, config=str(case))
    helpers.assert_close(lse, ref_lse, low_lse, name="lse", config=str(case))
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out.dtype)
    for name, a, r, rl in zip(("dq", "dk", "dv"), torch.autograd.grad(out, (q, k, v), dout),
                              torch.autograd.grad(ref, (q, k, v), dout.float()),
                              torch.autograd.grad(low, (q, k, v), dout)):
        helpers.assert_close(a, r, rl, factor=3.0, name=name, config=str(case))


# ---------------------------------------------------------------------------------------------
# torch.compile / custom-op registration
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    helpers.require_backend(backend)
    q, k, v = _inputs(1, 40, 50, 2, 1, 32, FP16, seed=21)

    def f(q, k, v):   # deterministic: the gradients are compared bit for bit (the default may use atomics)
        out, lse = transformer.flash_attention(q, k, v, causal=True, return_lse=True, deterministic=True,
                                               backend=backend)
        return (out.float().sum(-1) + lse.transpose(1, 2)).sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    loss = compiled(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    loss_eager = f(q, k, v)
    grads_eager = torch.autograd.grad(loss_eager, (q, k, v))
    assert torch.equal(loss, loss_eager)
    for a, b in zip(grads, grads_eager):
        assert torch.equal(a, b)


def test_opcheck_triton_ops():
    helpers.require_backend("triton")
    from transformer._triton import attention as tka
    q, k, v = _inputs(1, 20, 33, 2, 1, 32, FP16, seed=23)
    alibi = _alibi("h", 1, 2)
    args = (q, k, v, alibi, None, None, 20, 33, 32 ** -0.5, -1, 0, 0.0, True)
    torch.library.opcheck(tka.attn_fwd, args)
    out, lse = tka.attn_fwd(*(t.detach() if isinstance(t, torch.Tensor) else t for t in args))
    dout = torch.randn_like(out)
    torch.library.opcheck(tka.attn_bwd, (dout, q.detach(), k.detach(), v.detach(), out, lse, None) + args[3:])
    lq, lk = [1, 19], [20, 13]
    vq, vk, vv, cu_q, cu_k, mq, mk = _varlen_inputs(lq, lk, 2, 2, 16, BF16, tail_q=2)
    torch.library.opcheck(tka.attn_fwd, (vq, vk, vv, None, cu_q, cu_k, mq, mk, 0.25, 4, -1, 2.0, False))


# ---------------------------------------------------------------------------------------------
# Bad input: ValueError/TypeError naming the argument
# ---------------------------------------------------------------------------------------------

def _fa(q, k, v, **kw):
    return transformer.flash_attention(q, k, v, backend="triton", **kw)


def _bad_cases():
    q, k, v = (t.detach() for t in _inputs(1, 8, 8, 4, 2, 32, FP16))
    d300 = torch.zeros(1, 8, 2, 300, dtype=FP16)
    yield "rank", lambda: _fa(q[0], k[0], v[0]), ValueError, "q"
    yield "dtype-mismatch", lambda: _fa(q, k.to(BF16), v), TypeError, "k"
    yield "device-mismatch", lambda: _fa(q, k.to("meta"), v), ValueError, "k"
    yield "heads", lambda: _fa(q[:, :, :3], k, v), ValueError, "query heads"
    yield "head-dim", lambda: _fa(d300, d300, d300), ValueError, "head dim"
    yield "window", lambda: _fa(q, k, v, window_size=(-2, 0)), ValueError, "window_size"
    yield "softcap", lambda: _fa(q, k, v, softcap=-1.0), ValueError, "softcap"
    yield "alibi-shape", lambda: _fa(q, k, v, alibi_slopes=torch.ones(3)), ValueError, "alibi_slopes"
    yield "alibi-dtype", lambda: _fa(q, k, v, alibi_slopes=torch.ones(4, dtype=FP16)), TypeError, "alibi_slopes"
    yield "last-dim", lambda: _fa(q.transpose(-1, -2), k, v), ValueError, "q"
    cu3 = torch.tensor([0, 4, 8], dtype=torch.int32)
    cu2 = torch.tensor([0, 8], dtype=torch.int32)
    flat = q.reshape(8, 4, 32), k.reshape(8, 2, 32), v.reshape(8, 2, 32)
    yield "cu_seqlens-length", lambda: transformer.flash_attention_varlen(
        *flat, cu3, cu2, 4, 8, backend="triton"), ValueError, "cu_seqlens"
    yield "cu_seqlens-dtype", lambda: transformer.flash_attention_varlen(
        *flat, cu3.long(), cu3, 4, 4, backend="triton"), TypeError, "cu_seqlens_q"
    yield "alibi-batch", lambda: transformer.flash_attention_varlen(
        *flat, cu3, cu3, 4, 4, alibi_slopes=torch.ones(3, 4), backend="triton"), ValueError, "alibi_slopes"
    yield "fp32", lambda: _fa(q.float(), k.float(), v.float()), ValueError, "fp16/bf16"


BAD = list(_bad_cases())


@pytest.mark.parametrize("name,fn,exc,match", BAD, ids=[b[0] for b in BAD])
def test_bad_input(name, fn, exc, match):
    helpers.require_backend("triton")
    with pytest.raises(exc, match=match):
        fn()


def test_fp32_falls_back_under_auto():
    """The triton predicate rejects fp32 (so auto moves on to another backend) and accepts fp16/bf16."""
    from transformer._triton.attention import supports
    q, k, v = (t.detach() for t in _inputs(1, 9, 9, 2, 2, 32, torch.float32))
    assert "fp16/bf16" in supports(transformer.attention._describe(q, k, v))
    assert supports(transformer.attention._describe(q.half(), k.half(), v.half())) is None
    out = transformer.flash_attention(q, k, v, causal=True)          # auto: served by another backend
    torch.testing.assert_close(out, reference.attention(q, k, v, causal=True), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Full grid (-m slow; seconds on a GPU, hours under the interpreter)
# ---------------------------------------------------------------------------------------------

SLOW_PAIRS = [(1, 239), (113, 203), (128, 217), (108, 256), (256, 512), (512, 256), (1023, 1024)]
SLOW_DIMS = [40, 64, 80, 111, 128, 256]


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [FP16, BF16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("d", SLOW_DIMS)
@pytest.mark.parametrize("nq,nk", SLOW_PAIRS)
def test_grid_slow(backend, nq, nk, d, heads, causal, dtype):
    hq, hkv = HEADS[heads]
    q, k, v = _inputs(2, nq, nk, hq, hkv, d, dtype, seed=nq * 7 + d)
    _check(backend, q, k, v, causal=causal, config=f"{nq}x{nk} d{d} {heads} causal={causal} {dtype}")


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("feature", ["window", "alibi_h", "alibi_bh", "softcap", "all"])
@pytest.mark.parametrize("nq,nk", [(113, 203), (512, 256), (1023, 1024)])
@pytest.mark.parametrize("d", [64, 111, 128])
def test_features_slow(backend, nq, nk, d, feature):
    q, k, v = _inputs(2, nq, nk, 6, 2, d, BF16, seed=d + nq)
    kw = dict(causal=feature in ("alibi_h", "all"))
    if feature in ("window", "all"):
        kw["window_size"] = (100, 37)
    if feature.startswith("alibi") or feature == "all":
        kw["alibi_slopes"] = _alibi("bh" if feature == "alibi_bh" else "h", 2, 6)
    if feature in ("softcap", "all"):
        kw["softcap"] = 10.0
    _check(backend, q, k, v, config=f"{nq}x{nk} d{d} {feature}", **kw)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", [64, 111, 128, 256])
def test_varlen_slow(backend, d, causal):
    helpers.require_backend(backend)
    lens_q, lens_k = [1, 300, 517, 64, 1023], [239, 300, 256, 1, 1024]
    q, k, v, cu_q, cu_k, mq, mk = _varlen_inputs(lens_q, lens_k, 6, 2, d, FP16, seed=d)
    _skip_if_rejected(backend, "flash_attention_varlen",
                      transformer.attention._describe_varlen(q, k, v, cu_q, cu_k, mq, mk, causal=causal))
    out, lse = transformer.flash_attention_varlen(q, k, v, cu_q, cu_k, mq, mk, causal=causal, return_lse=True,
                                                  backend=backend)
    ref, ref_lse = reference.attention_varlen(q, k, v, cu_q, cu_k, mq, mk, causal=causal, return_lse=True)
    low, _ = reference.attention_varlen(q, k, v, cu_q, cu_k, mq, mk, causal=causal, return_lse=True,
                                        compute_dtype=None)
    helpers.assert_close(out, ref, low)
    dout = torch.randn_like(out)
    for name, a, r, rl in zip(("dq", "dk", "dv"), torch.autograd.grad(out, (q, k, v), dout),
                              torch.autograd.grad(ref, (q, k, v), dout.float()),
                              torch.autograd.grad(low, (q, k, v), dout)):
        helpers.assert_close(a, r, rl, factor=3.0, name=name)
