"""Attention dropout: every backend applies the same counter-based mask (transformer/reference.py, dropout_keep).

The reference computes attention with the identical mask, so kernels are compared with the ordinary tolerance rule
(fp32 reference, same-precision baseline; helpers.assert_close), forward and backward, not statistically. The mask
itself is checked bit for bit (recovered from the outputs of a call whose probabilities are uniform), its kept
fraction statistically (4 standard deviations), and the autograd saves the 16-byte rng_state, never a mask.
"""
from __future__ import annotations

import math

import pytest
import torch

import transformer
from transformer import reference
from transformer.attention import attention, dropout_rng_state
from transformer.models import DecoderOnly, DecoderOnlyConfig

import helpers
from helpers import DEVICE, assert_close, compare_grads, grads, kernel_backends, require_backend

BACKENDS = ["reference"] + kernel_backends("triton", "cuda")
KERNELS = kernel_backends("triton", "cuda")
FP16, BF16 = torch.float16, torch.bfloat16


def _rng(seed=11):
    return dropout_rng_state(DEVICE, torch.Generator(DEVICE).manual_seed(seed))


def _skip_if_rejected(backend, op, call):
    try:
        transformer.backends.select(op, call, backend)
    except ValueError as e:
        pytest.skip(f"dispatcher: {e}")


def _check(backend, q, k, v, *, dropout_p, deterministic=False, config="", **kw):
    """out, lse, dq, dk, dv of `backend` with dropout vs the reference with the same rng_state."""
    require_backend(backend)
    _skip_if_rejected(backend, "flash_attention", transformer.attention._describe(q, k, v, dropout_p=dropout_p, **kw))
    rng = _rng()
    out, lse = attention(q, k, v, dropout_p=dropout_p, rng_state=rng, return_lse=True, deterministic=deterministic,
                         backend=backend, **kw)
    ref, ref_lse = reference.attention(q, k, v, dropout_p=dropout_p, rng_state=rng, return_lse=True, **kw)
    low, low_lse = reference.attention(q, k, v, dropout_p=dropout_p, rng_state=rng, return_lse=True,
                                       compute_dtype=None, **kw)
    assert_close(out, ref, low, name="out", config=config)
    assert_close(lse, ref_lse, low_lse.float(), name="lse", config=config)   # lse of the undropped softmax
    g = torch.Generator().manual_seed(7)
    dout = torch.randn(out.shape, generator=g).to(out.device, out.dtype)
    got = grads((out,), (q, k, v), (dout,))
    want, base = grads((ref,), (q, k, v), (dout.float(),)), grads((low,), (q, k, v), (dout,))
    compare_grads(got, want, base, config)
    return out, got


CASES = {   # b, nq, nk, hq, hkv, d, dtype, features
    "plain-d40": (2, 113, 113, 2, 2, 40, FP16, dict()),
    "causal-gqa-d80": (1, 57, 113, 4, 2, 80, FP16, dict(causal=True)),
    "window": (1, 113, 57, 2, 1, 40, FP16, dict(window_size=(16, 8))),
    "q1": (2, 1, 113, 2, 2, 64, BF16, dict(causal=True)),
    "alibi-softcap-topleft": (1, 45, 70, 2, 2, 32, BF16, dict(causal=True, causal_align="top_left", softcap=3.0)),
    "d200-gqa": (1, 37, 70, 4, 2, 200, BF16, dict(causal=True)),       # D 256 kernels (column-split dK/dV)
    "d200-gqa-det": (1, 37, 70, 4, 2, 200, FP16, dict(window_size=(20, 3))),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(backend, case, p):
    b, nq, nk, hq, hkv, d, dtype, kw = CASES[case]
    if case == "alibi-softcap-topleft":
        kw = dict(kw, alibi_slopes=helpers.alibi_slopes("h", b, hq))
    q, k, v = helpers.attn_inputs(b, nq, nk, hq, hkv, d, dtype, seed=len(case))
    _check(backend, q, k, v, dropout_p=p, deterministic=case in ("window", "q1", "d200-gqa-det"), config=f"{case} p={p}", **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_one_key(backend, p):
    """Nk = 1: P = 1, so dS = P (Z r dP - delta) is 0 in exact arithmetic and in the reference, exactly. With
    delta = rowsum(dO o O) from the stored output (rounded to fp16 after the 1 / (1 - p) scaling, as flash-attn 2
    has it) dq would be of the size of that rounding, 2^-11 x |dO . v| x r; the kernels take delta from their one
    key tile (rowsum(P o Z r o dP)) instead, so the ordinary tolerance holds."""
    q, k, v = helpers.attn_inputs(1, 37, 1, 2, 2, 40, FP16, seed=2)
    _check(backend, q, k, v, dropout_p=p, config=f"one key p={p}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("lq, lk", [([1, 113, 0, 40], [50, 113, 9, 1]), ([37, 5, 0, 70], [1, 16, 3, 0])],
                         ids=["mixed", "few-keys"])
def test_varlen_matches_reference(backend, p, lq, lk):
    """Sequence i takes the mask of batch index i. "few-keys": every sequence has at most 16 keys (the backward
    then takes delta from its one key tile), one of them exactly 16, one none."""
    require_backend(backend)
    hq, hkv, d = 4, 2, 40
    g = torch.Generator().manual_seed(3)
    q = torch.randn(sum(lq), hq, d, generator=g).to(DEVICE, FP16).requires_grad_(True)
    k = torch.randn(sum(lk), hkv, d, generator=g).to(DEVICE, FP16).requires_grad_(True)
    v = torch.randn(sum(lk), hkv, d, generator=g).to(DEVICE, FP16).requires_grad_(True)
    cu = lambda lens: torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=DEVICE)  # noqa
    args = (q, k, v, cu(lq), cu(lk), max(lq), max(lk))
    kw = dict(causal=True, dropout_p=p)
    _skip_if_rejected(backend, "flash_attention_varlen", transformer.attention._describe_varlen(*args, **kw))
    rng = _rng(5)
    out = transformer.flash_attention_varlen(*args, rng_state=rng, backend=backend, **kw)
    ref = reference.attention_varlen(*args, rng_state=rng, **kw)
    low = reference.attention_varlen(*args, rng_state=rng, compute_dtype=None, **kw)
    assert_close(out, ref, low, config=f"varlen p={p}")
    dout = torch.randn(out.shape, generator=g).to(DEVICE, FP16)
    compare_grads(grads((out,), (q, k, v), (dout,)), grads((ref,), (q, k, v), (dout.float(),)),
                  grads((low,), (q, k, v), (dout,)), f"varlen p={p}")


@pytest.mark.parametrize("backend", KERNELS)
def test_padded_matches_reference_backend(backend):
    """padded_attention (the modules' key_lengths path): every backend packs it as varlen, so the masks agree."""
    require_backend(backend)
    q, k, v = helpers.attn_inputs(2, 33, 33, 2, 2, 32, FP16, seed=4)
    start, end = torch.tensor([0, 3], device=DEVICE), torch.tensor([33, 20], device=DEVICE)
    call = transformer.attention._describe_padded(q, k, v, start, end, dropout_p=0.3)
    _skip_if_rejected(backend, "padded_attention", call)
    outs = []
    for be in (backend, "reference"):
        torch.manual_seed(9)
        outs.append(transformer.attention.padded_attention(q, k, v, start, end, causal=True, causal_align="top_left",
                                                           dropout_p=0.3, backend=be))
    low = outs[1]   # the reference backend computes in fp32 and rounds once: within the rule of its fp16 twin
    torch.manual_seed(9)
    ref = transformer.attention.padded_attention(q.float(), k.float(), v.float(), start, end, causal=True,
                                                 causal_align="top_left", dropout_p=0.3, backend="reference")
    assert_close(outs[0], ref, low, factor=2.0, atol=2e-3)


# ---------------------------------------------------------------------------------------------
# The mask itself
# ---------------------------------------------------------------------------------------------

def _mask_case(b=2, h=3, n=64):
    """q = k = 0 (uniform probabilities 1/n) and v = identity per head: out[b, i, h, j] = keep[j] / ((1 - p) n)."""
    q = torch.zeros(b, n, h, n, dtype=FP16, device=DEVICE, requires_grad=True)
    k = torch.zeros(b, n, h, n, dtype=FP16, device=DEVICE, requires_grad=True)
    v = torch.eye(n, dtype=FP16, device=DEVICE)[None, :, None, :].expand(b, n, h, n).contiguous().requires_grad_(True)
    return q, k, v


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_kernel_mask_is_the_reference_mask_bit_for_bit(backend, p):
    """The forward's mask (from out) and the dK/dV kernel's (dV = P_dropped^T dO with dO = identity) equal
    reference.dropout_keep element for element; bh = b * Hq + h."""
    require_backend(backend)
    b, h, n = 2, 3, 64
    q, k, v = _mask_case(b, h, n)
    _skip_if_rejected(backend, "flash_attention", transformer.attention._describe(q, k, v, dropout_p=p))
    rng = _rng(21)
    want = reference.dropout_keep(rng, p, torch.arange(b * h, device=DEVICE), n, n).view(b, h, n, n)
    out = transformer.flash_attention(q, k, v, dropout_p=p, rng_state=rng, backend=backend)
    assert torch.equal(out.permute(0, 2, 1, 3) != 0, want)
    dout = torch.eye(n, dtype=FP16, device=DEVICE)[None, :, None, :].expand(b, n, h, n)
    for det in (False, True):
        out = transformer.flash_attention(q, k, v, dropout_p=p, rng_state=rng, deterministic=det, backend=backend)
        dv = torch.autograd.grad(out, v, dout)[0]              # dv[b, j, h, i] = P_dropped[b, h, i, j]
        assert torch.equal(dv.permute(0, 2, 3, 1) != 0, want)


def test_cuda_and_triton_apply_the_same_mask():
    """The same generator state gives the same mask in the CUDA and the Triton kernels: with uniform probabilities
    the kept elements are the non-zeros of out (forward) and of dv (either backward), element for element; on
    random inputs the two outputs agree within the tolerance rule (the reference with that mask as baseline)."""
    for be in ("triton", "cuda"):
        require_backend(be)
    b, h, n = 2, 3, 64
    q, k, v = _mask_case(b, h, n)
    dout = torch.eye(n, dtype=FP16, device=DEVICE)[None, :, None, :].expand(b, n, h, n)
    kept = {}
    for be in ("triton", "cuda"):
        outs = [transformer.flash_attention(q, k, v, dropout_p=0.3, deterministic=det, backend=be,
                                            generator=torch.Generator(DEVICE).manual_seed(17)) for det in (False, True)]
        kept[be] = [outs[0] != 0] + [torch.autograd.grad(o, v, dout)[0] != 0 for o in outs]
    for a, c in zip(kept["triton"], kept["cuda"]):
        assert torch.equal(a, c)
    assert 0.5 < float(kept["cuda"][0].float().mean()) < 0.9   # a mask with both values in it
    q, k, v = helpers.attn_inputs(2, 50, 61, 4, 2, 40, BF16, seed=12)
    kw = dict(causal=True, dropout_p=0.3)
    got = {be: transformer.flash_attention(q, k, v, generator=torch.Generator(DEVICE).manual_seed(3), backend=be,
                                           **kw) for be in ("triton", "cuda")}
    rng = dropout_rng_state(DEVICE, torch.Generator(DEVICE).manual_seed(3))   # what both calls drew
    low = reference.attention(q, k, v, rng_state=rng, compute_dtype=None, **kw)
    assert_close(got["cuda"], got["triton"].float(), low, name="cuda vs triton")


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_kept_fraction(p):
    """Over 2M elements of the reference Philox mask: the kept fraction is within 4 standard deviations of 1 - p,
    and the 16-bit draws are uniform over each of the 8 key positions a Philox call serves."""
    rng = _rng(99)
    keep = reference.dropout_keep(rng, p, torch.arange(32, device=DEVICE), 256, 256)
    n = keep.numel()
    sd = math.sqrt(p * (1 - p) / n)
    assert abs(float(keep.float().mean()) - (1 - p)) < 4 * sd
    per_slot = keep.view(32, 256, 32, 8).float().mean(dim=(0, 1, 2))
    assert float((per_slot - (1 - p)).abs().max()) < 4 * math.sqrt(p * (1 - p) / (n / 8))


def test_philox_known_answers():
    """Random123's known-answer vectors for Philox4x32-10 (the generator of curand and tl.philox)."""
    m = 0xFFFFFFFF
    assert [int(x) for x in reference.philox4x32(0, 0, 0, 0, 0, 0)] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C,
                                                                        0x9B00DBD8]
    assert [int(x) for x in reference.philox4x32(m, m, m, m, m, m)] == [0x408F276D, 0x41C83B0E, 0xA20BC7C6,
                                                                        0x6D5451FD]
    pi = (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344, 0xA4093822, 0x299F31D0)
    assert [int(x) for x in reference.philox4x32(*pi)] == [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


# ---------------------------------------------------------------------------------------------
# Seeds, determinism, memory, p = 0
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_generator_state_decides_the_mask(backend):
    require_backend(backend)
    q, k, v = helpers.attn_inputs(1, 40, 40, 2, 2, 32, FP16, seed=2)
    _skip_if_rejected(backend, "flash_attention", transformer.attention._describe(q, k, v, dropout_p=0.5))

    def run(seed):
        return transformer.flash_attention(q, k, v, dropout_p=0.5, generator=torch.Generator(DEVICE).manual_seed(seed),
                                           backend=backend)

    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # the default generator of the device when generator is None
    torch.manual_seed(4)
    d = transformer.flash_attention(q, k, v, dropout_p=0.5, backend=backend)
    torch.manual_seed(4)
    assert torch.equal(d, transformer.flash_attention(q, k, v, dropout_p=0.5, backend=backend))


@pytest.mark.parametrize("backend", KERNELS)
def test_deterministic_backward_is_bit_identical(backend):
    require_backend(backend)
    q, k, v = helpers.attn_inputs(1, 70, 90, 4, 2, 40, BF16, seed=6)
    _skip_if_rejected(backend, "flash_attention", transformer.attention._describe(q, k, v, dropout_p=0.3))
    rng = _rng(8)
    dout = torch.randn(1, 70, 4, 40, generator=torch.Generator().manual_seed(1)).to(DEVICE, BF16)
    runs = [grads((transformer.flash_attention(q, k, v, causal=True, dropout_p=0.3, rng_state=rng,
                                               deterministic=True, backend=backend),), (q, k, v), (dout,))
            for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", KERNELS)
def test_backward_saves_no_mask(backend):
    """The autograd saves q, k, v, out, lse and the int64 [2] rng_state: no tensor of Nq x Nk elements."""
    require_backend(backend)
    nq = nk = 128
    q, k, v = helpers.attn_inputs(1, nq, nk, 1, 1, 16, FP16, seed=1)
    _skip_if_rejected(backend, "flash_attention", transformer.attention._describe(q, k, v, dropout_p=0.2))
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = transformer.flash_attention(q, k, v, dropout_p=0.2, generator=torch.Generator(DEVICE).manual_seed(0),
                                          backend=backend)
    assert saved, "nothing saved?"
    assert max(t.numel() for t in saved) < nq * nk, [tuple(t.shape) for t in saved]
    rng = [t for t in saved if t.dtype == torch.int64]
    assert len(rng) == 1 and rng[0].shape == (2,) and rng[0].numel() * rng[0].element_size() == 16
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad.float()).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_dropout_is_no_dropout(backend):
    require_backend(backend)
    q, k, v = helpers.attn_inputs(1, 33, 47, 2, 2, 40, FP16, seed=3)
    a = transformer.flash_attention(q, k, v, causal=True, backend=backend)
    b = transformer.flash_attention(q, k, v, causal=True, dropout_p=0.0, generator=torch.Generator(DEVICE),
                                    backend=backend)
    assert torch.equal(a, b)
    dout = torch.ones_like(a)
    for x, y in zip(grads((a,), (q, k, v), (dout,)), grads((b,), (q, k, v), (dout,))):
        assert torch.equal(x, y)


@pytest.mark.parametrize("backend", KERNELS)
def test_rows_that_see_nothing_stay_zero(backend):
    """A window that hides every key from some rows: those rows are 0 (lse -inf) with dropout too, and so are
    their gradients."""
    require_backend(backend)
    q, k, v = helpers.attn_inputs(1, 20, 40, 2, 2, 16, FP16, seed=5)
    kw = dict(window_size=(0, 0), causal_align="top_left")
    for be in ("reference", backend):
        out, lse = attention(q, k, v, dropout_p=0.5, rng_state=_rng(), return_lse=True, backend=be, **kw)
        assert torch.isfinite(out.float()).all()
    q2, k2, v2 = helpers.attn_inputs(1, 8, 3, 2, 2, 16, FP16, seed=5)
    for det in (False, True):
        out, lse = attention(q2, k2, v2, causal=True, dropout_p=0.5, rng_state=_rng(), return_lse=True,
                             deterministic=det, backend=backend)
        assert bool((out[:, :5] == 0).all()) and bool(torch.isinf(lse[..., :5]).all())
        dq = torch.autograd.grad(out, q2, torch.ones_like(out))[0]
        assert torch.isfinite(dq.float()).all() and bool((dq[:, :5] == 0).all())


# ---------------------------------------------------------------------------------------------
# Arguments, SDPA, modules
# ---------------------------------------------------------------------------------------------

def test_bad_dropout_p():
    q = torch.randn(1, 4, 2, 16)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    calls = [lambda p: transformer.flash_attention(q, q, q, dropout_p=p),
             lambda p: transformer.flash_attention_varlen(q[0], q[0], q[0], cu, cu, 4, 4, dropout_p=p),
             lambda p: transformer.scaled_dot_product_attention(q, q, q, dropout_p=p),
             lambda p: reference.attention(q, q, q, dropout_p=p, rng_state=_rng())]
    for call in calls:
        for p in (-0.1, 1.0, 2, float("nan")):
            with pytest.raises(ValueError, match="dropout_p"):
                call(p)
        for p in ("0.1", None, True, torch.tensor(0.1)):
            with pytest.raises(TypeError, match="dropout_p"):
                call(p)
    with pytest.raises(ValueError, match="dropout"):
        transformer.Attention(32, 4, dropout=1.0)
    with pytest.raises(TypeError, match="generator"):
        transformer.flash_attention(q, q, q, dropout_p=0.1, generator=3)
    with pytest.raises(ValueError, match="rng_state"):
        transformer.flash_attention(q, q, q, dropout_p=0.1, rng_state=torch.zeros(3, dtype=torch.int64))


def test_torch_declines_dropout():
    q = torch.randn(1, 4, 2, 16)
    with pytest.raises(ValueError, match="dropout_p"):
        transformer.flash_attention(q, q, q, dropout_p=0.1, backend="torch")
    why = transformer.backends.explain("flash_attention", q, q, q, dropout_p=0.1)
    assert "torch: rejected -- dropout_p > 0" in why and "reference: selected" in why


def test_cuda_serves_dropout():
    """The CUDA backend's predicate accepts dropout_p > 0 (fp16 / bf16 with a compiled head dim)."""
    require_backend("cuda")
    q = torch.randn(1, 4, 2, 16, dtype=FP16, device=DEVICE)
    call = transformer.attention._describe(q, q, q, dropout_p=0.1)
    assert transformer.backends.select("flash_attention", call, "cuda") is not None
    why = transformer.backends.explain("flash_attention", q, q, q, dropout_p=0.1, backend="cuda")
    assert "cuda: selected" in why and "rejected" not in why, why


@pytest.mark.parametrize("backend", ["reference"] + KERNELS)
def test_sdpa_dropout_runs_the_kernels(backend):
    """The SDPA drop-in serves dropout_p > 0 with the kernels' mask (seed from the default generator)."""
    require_backend(backend)
    q, k, v = (t.transpose(1, 2) for t in helpers.attn_inputs(2, 21, 21, 2, 2, 16, FP16, seed=8))
    _skip_if_rejected(backend, "flash_attention",
                      transformer.attention._describe(*(t.transpose(1, 2) for t in (q, k, v)), dropout_p=0.4))
    with transformer.backends.record_dispatches() as counts:
        torch.manual_seed(12)
        out = transformer.scaled_dot_product_attention(q, k, v, dropout_p=0.4, is_causal=True, backend=backend)
    assert counts == {("flash_attention", backend): 1}
    torch.manual_seed(12)
    rng = dropout_rng_state(DEVICE)
    args = [t.transpose(1, 2) for t in (q, k, v)]
    ref = reference.attention(*args, causal=True, causal_align="top_left", dropout_p=0.4, rng_state=rng)
    low = reference.attention(*args, causal=True, causal_align="top_left", dropout_p=0.4, rng_state=rng,
                              compute_dtype=None)
    assert_close(out.transpose(1, 2), ref, low)


def test_modules_drop_in_training_only():
    torch.manual_seed(0)
    attn = transformer.Attention(32, 4, causal=True, dropout=0.5)
    x = torch.randn(2, 9, 32)
    attn.eval()
    base = attn(x)
    attn.train()
    torch.manual_seed(1)
    a = attn(x)
    torch.manual_seed(1)
    assert torch.equal(a, attn(x))
    assert not torch.allclose(a, base)
    attn.eval()
    assert torch.equal(attn(x), base)
    cfg = DecoderOnlyConfig.preset("tiny", attn_dropout=0.1)
    model = DecoderOnly(cfg)
    assert all(layer.attn.dropout == 0.1 for layer in model.layers)
    with pytest.raises(ValueError, match="attn_dropout"):
        DecoderOnlyConfig.preset("tiny", attn_dropout=1.0)


@pytest.mark.parametrize("path", ["tma", "tma_ws"])
def test_descriptor_forward_applies_the_same_mask(path, monkeypatch):
    """The sm_90 descriptor forward (forced, TILEFORMER_TRITON_ATTN_FWD) gives the portable forward's bits with
    dropout too (same tiles, same arithmetic, same mask)."""
    require_backend("triton")
    if helpers.HAS_GPU:
        pytest.skip("forcing the descriptor forward is checked under the interpreter")
    from triton_kernels import attention as kernels
    if not kernels.HAS_TENSOR_DESCRIPTORS or (path == "tma_ws" and not kernels.HAS_WARP_SPECIALIZE):
        pytest.skip(f"this Triton cannot run the {path} forward")
    q, k, v = helpers.attn_inputs(2, 70, 50, 4, 2, 32, FP16, seed=9)
    kw = dict(causal=True, dropout_p=0.3, rng_state=_rng(3), backend="triton")
    want = transformer.flash_attention(q, k, v, **kw)
    monkeypatch.setenv(kernels.FWD_PATH_ENV, path)
    assert torch.equal(transformer.flash_attention(q, k, v, **kw), want)


@pytest.mark.parametrize("backend", KERNELS)
def test_op_schema_with_dropout(backend):
    """The Triton and CUDA ops end in (deterministic, dropout_p, rng_state) and pass opcheck (fake, autograd
    registration)."""
    require_backend(backend)
    from transformer.ops import attention as contract
    if backend == "triton":
        import transformer._triton.attention  # noqa: F401  (registers the ops)
        ops = torch.ops.tileformer_triton
    else:
        from transformer import _cuda
        ops = _cuda.ops(DEVICE)
    assert contract._declares_dropout(ops.attn_fwd) and contract._declares_dropout(ops.attn_bwd)
    assert contract._declares_deterministic(ops.attn_fwd)
    q, k, v = helpers.attn_inputs(1, 20, 24, 2, 1, 16, FP16, seed=1)
    args = (q, k, v, None, None, None, 20, 24, 0.25, -1, 0, 0.0, True, False, 0.3, _rng())
    torch.library.opcheck(ops.attn_fwd, args)
