"""transformer.scaled_dot_product_attention (drop-in for F.scaled_dot_product_attention) and padded_attention.

Every output is compared with PyTorch's own function by the tolerance rule: ours vs torch in fp32
(the reference), with torch in the same low precision as the baseline.
"""
import pytest
import torch
import torch.nn.functional as F

import transformer
from transformer import backends, reference
from transformer.sdpa import classify_sdpa_mask, key_run_bounds, padded_attention

from helpers import assert_close, kernel_backends, randn, require_backend

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _torch_ref(query, key, value, **kw):
    """(fp32 reference, same-dtype baseline) from torch's SDPA."""
    f32 = [t.detach().float().requires_grad_(t.requires_grad) for t in (query, key, value)]
    kw32 = dict(kw)
    if kw.get("attn_mask") is not None and kw["attn_mask"].is_floating_point():
        kw32["attn_mask"] = kw["attn_mask"].float()
    ref = F.scaled_dot_product_attention(*f32, **kw32)
    low = F.scaled_dot_product_attention(query, key, value, **kw)
    return ref, low, f32


def _check(query, key, value, backend="auto", grads=True, **kw):
    out = transformer.scaled_dot_product_attention(query, key, value, backend=backend, **kw)
    ref, low, f32 = _torch_ref(query, key, value, **kw)
    cfg = f"{tuple(query.shape)} {tuple(key.shape)} {query.dtype} {kw.keys()} {backend}"
    assert_close(out, ref, low, config=cfg)
    if grads and query.requires_grad:
        g = torch.randn_like(ref)
        got = torch.autograd.grad(out, (query, key, value), g.to(out.dtype))
        want = torch.autograd.grad(ref, f32, g)
        base = torch.autograd.grad(low, (query, key, value), g.to(low.dtype))
        for name, a, r, b in zip("qkv", got, want, base):
            assert_close(a, r, b, factor=3.0, atol=1e-4, name=f"d{name}", config=cfg)
    return out


class _Spy:
    """Records the ops the dispatcher is asked to select (to tell the kernel path from the fallback)."""

    def __init__(self, monkeypatch):
        self.ops = []
        real = backends.select

        def select(op, call, backend="auto"):
            self.ops.append(op)
            return real(op, call, backend)
        monkeypatch.setattr(backends, "select", select)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,h,hkv,l,s,e", [(2, 4, 4, 113, 239, 40), (1, 6, 2, 239, 113, 80), (2, 2, 1, 1, 1, 111),
                                           (1, 3, 3, 64, 64, 64)])
@pytest.mark.parametrize("is_causal", [False, True])
def test_matches_torch(dtype, b, h, hkv, l, s, e, is_causal, monkeypatch):
    spy = _Spy(monkeypatch)
    q = randn(b, h, l, e, dtype=dtype, requires_grad=True)
    k = randn(b, hkv, s, e, dtype=dtype, requires_grad=True)
    v = randn(b, hkv, s, e, dtype=dtype, requires_grad=True)
    _check(q, k, v, is_causal=is_causal, enable_gqa=h != hkv)
    assert spy.ops == ["flash_attention"]


def test_no_copies_for_bhnd(monkeypatch):
    """The kernels get [B, N, H, D] transposed views of the caller's [B, H, N, D] tensors."""
    seen = []
    real = backends.dispatch

    def dispatch(op, call, backend, q, k, v, **kw):
        seen.append((q.data_ptr(), k.data_ptr(), v.data_ptr(), kw["causal_align"]))
        return real(op, call, backend, q, k, v, **kw)
    monkeypatch.setattr(backends, "dispatch", dispatch)
    q, k, v = (randn(2, 3, 17, 16) for _ in range(3))
    transformer.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert seen == [(q.data_ptr(), k.data_ptr(), v.data_ptr(), "top_left")]


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_key_padding_masks(backend, dtype, monkeypatch):
    """Boolean and 0/-inf float key-padding masks (left, right, both-sided, empty rows) use the kernel path."""
    spy = _Spy(monkeypatch)
    b, h, l, s, e = 4, 2, 23, 37, 40
    keep = torch.zeros(b, s, dtype=torch.bool)
    keep[0, :30] = True           # right padding
    keep[1, 5:] = True            # left padding
    keep[2, 3:20] = True          # both
    keep[3] = True                # none
    q = randn(b, h, l, e, dtype=dtype, requires_grad=True)
    k = randn(b, h, s, e, dtype=dtype, requires_grad=True)
    v = randn(b, h, s, e, dtype=dtype, requires_grad=True)
    _check(q, k, v, backend=backend, attn_mask=keep[:, None, None, :])
    fmask = torch.zeros(b, 1, 1, s, dtype=dtype).masked_fill(~keep[:, None, None, :], float("-inf"))
    _check(q, k, v, backend=backend, attn_mask=fmask, grads=False)
    _check(q, k, v, backend=backend, attn_mask=keep[:, None, None, :].expand(b, h, l, s), grads=False)
    assert spy.ops == ["padded_attention"] * 3


def test_empty_key_row_gives_zero():
    q, k, v = (randn(2, 2, 5, 16) for _ in range(3))
    keep = torch.ones(2, 1, 1, 5, dtype=torch.bool)
    keep[1] = False
    out = transformer.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert_close(out, *_torch_ref(q, k, v, attn_mask=keep)[:2])


@pytest.mark.parametrize("dtype", DTYPES)
def test_causal_mask_recognised(dtype, monkeypatch):
    spy = _Spy(monkeypatch)
    q = randn(2, 4, 19, 32, dtype=dtype, requires_grad=True)
    k = randn(2, 4, 31, 32, dtype=dtype, requires_grad=True)
    v = randn(2, 4, 31, 32, dtype=dtype, requires_grad=True)
    tril = torch.ones(19, 31, dtype=torch.bool).tril()
    _check(q, k, v, attn_mask=tril)
    assert spy.ops == ["flash_attention"]


@pytest.mark.parametrize("kind", ["random_bool", "bias", "per_head", "holes", "broadcast_batch",
                                  "value_dim", "strided"])
def test_fallbacks_match_torch(kind, monkeypatch):
    """Calls the kernels cannot serve give exactly torch's result (and never reach the dispatcher)."""
    spy = _Spy(monkeypatch)
    b, h, l, s, e = 2, 3, 9, 13, 16
    q, k, v = randn(b, h, l, e), randn(b, h, s, e), randn(b, h, s, e)
    kw = {}
    if kind == "random_bool":
        kw["attn_mask"] = torch.rand(b, 1, l, s) > 0.3
    elif kind == "bias":
        kw["attn_mask"] = randn(l, s)
    elif kind == "per_head":
        kw["attn_mask"] = torch.rand(b, h, 1, s) > 0.5
    elif kind == "holes":
        keep = torch.ones(b, 1, 1, s, dtype=torch.bool)
        keep[0, ..., 4] = False
        kw["attn_mask"] = keep
    elif kind == "broadcast_batch":
        k, v = k[:1], v[:1]
    elif kind == "value_dim":
        v = randn(b, h, s, 24)
    elif kind == "strided":
        q = randn(b, h, e, l).transpose(-1, -2)
    torch.manual_seed(1)
    out = transformer.scaled_dot_product_attention(q, k, v, **kw)
    torch.manual_seed(1)
    want = F.scaled_dot_product_attention(q, k, v, **kw)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    assert not spy.ops


@pytest.mark.parametrize("shape", [(4, 7, 16), (2, 3, 2, 5, 16)])
def test_other_ranks(shape):
    q, k, v = (randn(*shape) for _ in range(3))
    out = transformer.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert out.shape == q.shape
    assert_close(out, *_torch_ref(q, k, v, is_causal=True)[:2])


def test_scale_argument():
    q, k, v = (randn(2, 2, 7, 16) for _ in range(3))
    _check(q, k, v, scale=0.37)


@pytest.mark.parametrize("backend", kernel_backends("triton", "cuda"))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("is_causal", [False, True])
def test_kernel_backends(backend, dtype, is_causal):
    """The kernels behind the drop-in, by the flash-attn rule: the baseline is PyTorch's *unfused* attention in
    the same dtype (transformer.reference with compute_dtype=None), as in every kernel test of the project.
    (CPU torch SDPA in bf16 keeps the probabilities in fp32 and is about 2x more accurate than that.)"""
    require_backend(backend)
    q = randn(2, 4, 113, 64, dtype=dtype)
    k = randn(2, 2, 127, 64, dtype=dtype)
    v = randn(2, 2, 127, 64, dtype=dtype)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    ok = backends.explain("flash_attention", qt, kt, vt, backend=backend, causal=is_causal, causal_align="top_left")
    if "selected" not in ok:
        pytest.skip(f"{backend} cannot serve flash_attention here yet: {ok.splitlines()[-1].strip()}")
    out = transformer.scaled_dot_product_attention(q, k, v, is_causal=is_causal, enable_gqa=True, backend=backend)
    kw = dict(causal=is_causal, causal_align="top_left")
    ref = reference.attention(qt, kt, vt, **kw).transpose(1, 2)
    low = reference.attention(qt, kt, vt, compute_dtype=None, **kw).transpose(1, 2)
    assert_close(out, ref, low, config=f"{backend} {dtype} causal={is_causal}")


def test_bad_input():
    q, k, v = randn(2, 4, 5, 16), randn(2, 2, 5, 16), randn(2, 2, 5, 16)
    with pytest.raises(ValueError, match="enable_gqa"):
        transformer.scaled_dot_product_attention(q, k, v)
    with pytest.raises(ValueError, match="multiple"):
        transformer.scaled_dot_product_attention(q, randn(2, 3, 5, 16), randn(2, 3, 5, 16), enable_gqa=True)
    with pytest.raises(ValueError, match="attn_mask"):
        transformer.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="is_causal"):
        transformer.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(5, 5, dtype=torch.bool), is_causal=True)
    with pytest.raises(TypeError, match="key"):
        transformer.scaled_dot_product_attention(q, q.half(), q)
    with pytest.raises(ValueError, match="key"):
        transformer.scaled_dot_product_attention(q, randn(2, 4, 5, 8), q)
    with pytest.raises(ValueError, match="dropout_p"):
        transformer.scaled_dot_product_attention(q, q, q, dropout_p=1.5)
    with pytest.raises(TypeError, match="query"):
        transformer.scaled_dot_product_attention(q.long(), q, q)
    with pytest.raises(TypeError, match="attn_mask"):
        transformer.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(5, 5, dtype=torch.int64))


# --- padded_attention ------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("causal,align", [(False, "bottom_right"), (True, "bottom_right"), (True, "top_left")])
@pytest.mark.parametrize("window,alibi", [((-1, -1), False), ((3, 0), False), ((-1, -1), True)])
def test_padded_attention_matches_per_sequence_reference(backend, causal, align, window, alibi):
    """Each batch element equals the fp32 reference run on its run of keys alone."""
    b, nq, nk, hq, hkv, d = 4, 11, 17, 4, 2, 40
    q, k, v = randn(b, nq, hq, d, dtype=torch.bfloat16), randn(b, nk, hkv, d, dtype=torch.bfloat16), \
        randn(b, nk, hkv, d, dtype=torch.bfloat16)
    start, end = torch.tensor([0, 3, 5, 8]), torch.tensor([17, 17, 9, 8])
    slopes = torch.rand(b, hq) if alibi else None
    out = padded_attention(q, k, v, start, end, causal=causal, causal_align=align, window_size=window,
                           alibi_slopes=slopes, backend=backend)
    for i in range(b):
        s, e = int(start[i]), int(end[i])
        if s == e:
            assert torch.equal(out[i], torch.zeros_like(out[i]))
            continue
        kw = dict(causal=causal, causal_align=align, window_size=window,
                  alibi_slopes=None if slopes is None else slopes[i])
        ref = reference.attention(q[i:i + 1], k[i:i + 1, s:e], v[i:i + 1, s:e], **kw)[0]
        low = reference.attention(q[i:i + 1], k[i:i + 1, s:e], v[i:i + 1, s:e], compute_dtype=None, **kw)[0]
        assert_close(out[i], ref, low, config=f"seq {i} {backend} {align} {window} alibi={alibi}")


@pytest.mark.parametrize("backend", kernel_backends("triton", "cuda"))
@pytest.mark.parametrize("causal,align", [(False, "bottom_right"), (True, "bottom_right"), (True, "top_left")])
def test_padded_attention_kernels(backend, causal, align):
    """The 3-sequences-per-row varlen call (with empty sequences) on the kernel backends."""
    require_backend(backend)
    b, nq, nk, hq, hkv, d = 3, 37, 45, 4, 2, 64
    q = randn(b, nq, hq, d, dtype=torch.bfloat16)
    k, v = randn(b, nk, hkv, d, dtype=torch.bfloat16), randn(b, nk, hkv, d, dtype=torch.bfloat16)
    start, end = torch.tensor([0, 7, 10], dtype=torch.int32), torch.tensor([45, 45, 30], dtype=torch.int32)
    ok = backends.explain("flash_attention_varlen", q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1),
                          torch.tensor([0, nq], dtype=torch.int32), torch.tensor([0, nk], dtype=torch.int32),
                          nq, nk, backend=backend, causal=causal, causal_align=align)
    if "selected" not in ok:
        pytest.skip(f"{backend} cannot serve flash_attention_varlen here yet: {ok.splitlines()[-1].strip()}")
    out = padded_attention(q, k, v, start, end, causal=causal, causal_align=align, backend=backend)
    for i in range(b):
        s, e = int(start[i]), int(end[i])
        kw = dict(causal=causal, causal_align=align)
        ref = reference.attention(q[i:i + 1], k[i:i + 1, s:e], v[i:i + 1, s:e], **kw)[0]
        low = reference.attention(q[i:i + 1], k[i:i + 1, s:e], v[i:i + 1, s:e], compute_dtype=None, **kw)[0]
        assert_close(out[i], ref, low, config=f"seq {i} {backend} causal={causal} {align}")


def test_key_run_bounds_and_classify():
    keep = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 1, 0]], dtype=torch.bool)
    start, end, ok = key_run_bounds(keep)
    assert start.tolist() == [1, 0, 0, 0] and end.tolist()[:3] == [3, 4, 0] and not ok
    _, _, ok = key_run_bounds(keep[:3])
    assert ok
    assert classify_sdpa_mask(torch.ones(3, 4, dtype=torch.bool), 1, 1, 3, 4) == ("none",)
    assert classify_sdpa_mask(torch.ones(4, 4, dtype=torch.bool).tril(), 1, 1, 4, 4) == ("causal",)
    assert classify_sdpa_mask(torch.rand(4, 4) > 2, 1, 1, 4, 4)[0] == "keys"   # all masked: one empty run
    assert classify_sdpa_mask(torch.randn(4, 4), 1, 1, 4, 4) == ("other",)


def test_padded_attention_bad_input():
    q, k = randn(2, 3, 2, 16), randn(2, 5, 2, 16)
    with pytest.raises(ValueError, match="key_start"):
        padded_attention(q, k, k, torch.zeros(3, dtype=torch.long), torch.ones(2, dtype=torch.long))
    with pytest.raises(TypeError, match="key_end"):
        padded_attention(q, k, k, torch.zeros(2, dtype=torch.long), torch.ones(2))
    with pytest.raises(ValueError, match="causal_align"):
        padded_attention(q, k, k, torch.zeros(2, dtype=torch.long), torch.ones(2, dtype=torch.long),
                         causal_align="middle")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_float32_mask_with_half_query(dtype):
    """PyTorch takes a float32 attn_mask with an fp16/bf16 query: so does the drop-in, on the kernel path (a 0/-inf
    key-padding mask) and on the fallback (any values, the same call as PyTorch's)."""
    b, h, l, s, e = 2, 3, 9, 11, 16
    q, k, v = randn(b, h, l, e, dtype=dtype), randn(b, h, s, e, dtype=dtype), randn(b, h, s, e, dtype=dtype)
    keep = torch.ones(b, 1, 1, s, dtype=torch.bool, device=q.device)
    keep[1, ..., 7:] = False
    pad = torch.zeros(keep.shape, device=q.device).masked_fill(~keep, float("-inf"))
    with backends.record_dispatches() as counts:
        out = transformer.scaled_dot_product_attention(q, k, v, attn_mask=pad)
    assert sum(counts.values()) == 1, counts                      # served by padded_attention
    ref, low, _ = _torch_ref(q, k, v, attn_mask=pad)
    assert_close(out, ref, low)
    bias = randn(l, s)                                            # float32, arbitrary values: fallback
    assert torch.equal(transformer.scaled_dot_product_attention(q, k, v, attn_mask=bias),
                       F.scaled_dot_product_attention(q, k, v, attn_mask=bias))
    # another floating dtype (PyTorch refuses fp64 or the other half type): cast to float32
    other = bias.to(torch.float64)
    assert torch.equal(transformer.scaled_dot_product_attention(q, k, v, attn_mask=other),
                       F.scaled_dot_product_attention(q, k, v, attn_mask=bias))
