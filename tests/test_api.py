"""Public API: input validation, backend dispatch, and the "torch" backend against the reference."""
import os
import subprocess
import sys

import pytest
import torch

import transformer
from transformer import backends, reference

from helpers import assert_close

HALF = [torch.float16, torch.bfloat16]


# --------------------------------------------------------------------------------------------
# import hygiene
# --------------------------------------------------------------------------------------------

def test_import_needs_no_gpu_triton_or_extension():
    code = ("import sys, transformer; "
            "bad = [m for m in ('triton', 'transformer._C', 'transformer._C_emu') if m in sys.modules]; "
            "assert not bad, bad; print(transformer.backends.available())")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TILEFORMER_EMULATE_CUDA")}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    assert "'torch': 'available'" in res.stdout


def test_available_lists_every_backend_with_a_reason():
    av = backends.available()
    assert set(av) == set(backends.BACKENDS)
    assert av["torch"] == av["reference"] == "available"
    for b, status in av.items():
        assert status == "available" or len(status) > 10, (b, status)


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------

def _qkv(b=2, nq=5, nk=7, hq=4, hkv=2, d=16, dtype=torch.float32):
    return torch.randn(b, nq, hq, d, dtype=dtype), torch.randn(b, nk, hkv, d, dtype=dtype), \
        torch.randn(b, nk, hkv, d, dtype=dtype)


@pytest.mark.parametrize("fn", [transformer.flash_attention, reference.attention])
def test_attention_bad_input(fn):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="q must have layout"):
        fn(q[0], k, v)
    with pytest.raises(ValueError, match="multiple of the number of key/value heads"):
        fn(q[:, :, :3], k, v)
    with pytest.raises(TypeError, match="k must have the same dtype as q"):
        fn(q, k.half(), v)
    with pytest.raises(TypeError, match="q must have dtype"):
        fn(q.int(), k, v)
    with pytest.raises(ValueError, match="head dim"):
        big = torch.randn(1, 2, 1, 257)
        fn(big, big, big)
    with pytest.raises(ValueError, match="window_size left"):
        fn(q, k, v, window_size=(-2, 0))
    with pytest.raises(ValueError, match="softcap"):
        fn(q, k, v, softcap=-1.0)
    with pytest.raises(ValueError, match="alibi_slopes must have shape"):
        fn(q, k, v, alibi_slopes=torch.rand(3))
    with pytest.raises(ValueError, match="k must have the batch size"):
        fn(q, k[:1], v[:1])
    with pytest.raises(ValueError, match="contiguous in its last dimension"):
        fn(q.transpose(-1, -2).contiguous().transpose(-1, -2), k, v)
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        fn(q.numpy(), k, v)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a device mismatch needs a CUDA device")
def test_attention_device_mismatch():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="same device"):
        transformer.flash_attention(q, k.cuda(), v.cuda())


def test_varlen_bad_input():
    q, k, v = torch.randn(10, 4, 16), torch.randn(12, 2, 16), torch.randn(12, 2, 16)
    cq = torch.tensor([0, 4, 10], dtype=torch.int32)
    ck = torch.tensor([0, 5, 12], dtype=torch.int32)
    with pytest.raises(TypeError, match="cu_seqlens_q must have dtype int32"):
        transformer.flash_attention_varlen(q, k, v, cq.long(), ck, 6, 7)
    with pytest.raises(ValueError, match="batch\\+1"):
        transformer.flash_attention_varlen(q, k, v, cq[:2], ck, 6, 7)
    with pytest.raises(ValueError, match="non-decreasing"):
        transformer.flash_attention_varlen(q, k, v, torch.tensor([0, 6, 4], dtype=torch.int32), ck, 6, 7,
                                           validate=True)
    with pytest.raises(ValueError, match="max_seqlen_q"):
        reference.attention_varlen(q, k, v, cq, ck, 2, 7)


@pytest.mark.parametrize("fn", [transformer.layer_norm, reference.layer_norm])
def test_norm_bad_input(fn):
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="weight must have shape \\[8\\]"):
        fn(x, torch.ones(7))
    with pytest.raises(ValueError, match="residual must have the shape"):
        fn(x, residual=torch.randn(3, 7))
    with pytest.raises(TypeError, match="residual must have the dtype"):
        fn(x.half(), residual=torch.randn(3, 8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="eps must be finite and > 0"):
        fn(x, eps=0.0)
    with pytest.raises(ValueError, match="non-empty last dimension"):
        fn(torch.randn(3, 0))


def _cache(b=2, s=16, hkv=2, d=16, paged=False):
    if paged:
        kc = torch.randn(8, 4, hkv, d)
        return kc, torch.randn_like(kc), torch.arange(8, dtype=torch.int32).view(2, 4)
    kc = torch.randn(b, s, hkv, d)
    return kc, torch.randn_like(kc), None


@pytest.mark.parametrize("fn", [transformer.decode_attention, reference.decode_attention])
def test_decode_bad_input(fn):
    kc, vc, _ = _cache()
    q = torch.randn(2, 1, 4, 16)
    lens = torch.tensor([3, 5], dtype=torch.int32)
    with pytest.raises(TypeError, match="block_table must have dtype int32"):
        fn(q, kc, vc, lens, block_table=torch.zeros(2, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="cache_seqlens must have dtype int32"):
        fn(q, kc, vc, lens.long())
    with pytest.raises(ValueError, match="multiple of the number of key/value heads"):
        fn(torch.randn(2, 1, 3, 16), kc, vc, lens)
    with pytest.raises(ValueError, match="1..16 queries"):
        fn(torch.randn(2, 17, 4, 16), kc, vc, lens)
    with pytest.raises(ValueError, match="k_cache must have shape \\[B=3"):
        fn(torch.randn(3, 1, 4, 16), kc, vc, torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="too few to append"):
        fn(torch.randn(2, 4, 4, 16), kc[:, :3], vc[:, :3], lens, k=torch.randn(2, 4, 2, 16), v=torch.randn(2, 4, 2, 16))
    with pytest.raises(ValueError, match="k and v must be given together"):
        fn(q, kc, vc, lens, k=torch.randn(2, 1, 2, 16))


def test_decode_value_checks_in_reference():
    kc, vc, bt = _cache(paged=True)
    q = torch.randn(2, 1, 4, 16)
    with pytest.raises(ValueError, match="outside the cache capacity"):
        reference.decode_attention(q, kc, vc, torch.tensor([3, 17], dtype=torch.int32), block_table=bt)
    bad = bt.clone()
    bad[1, 0] = 99
    with pytest.raises(ValueError, match="block_table\\[1\\] refers to pages"):
        reference.decode_attention(q, kc, vc, torch.tensor([3, 2], dtype=torch.int32), block_table=bad)
    with pytest.raises(ValueError, match="block_table\\[1\\] refers to pages"):
        transformer.decode_attention(q, kc, vc, torch.tensor([3, 2], dtype=torch.int32), block_table=bad,
                                     validate=True)


# --------------------------------------------------------------------------------------------
# dispatch
# --------------------------------------------------------------------------------------------

def test_explicit_backend_that_cannot_serve_raises():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="backend='torch' cannot run flash_attention.*softcap"):
        transformer.flash_attention(q, k, v, softcap=5.0, backend="torch")
    with pytest.raises(ValueError, match="backend must be one of"):
        transformer.flash_attention(q, k, v, backend="cudnn")


def test_auto_falls_back_and_explains():
    q, k, v = _qkv()
    text = backends.explain("flash_attention", q, k, v, softcap=5.0)
    assert "flash_attention -> reference" in text
    assert "torch: rejected -- F.scaled_dot_product_attention has no softcap" in text
    out = transformer.flash_attention(q, k, v, softcap=5.0)            # served by the reference
    assert_close(out, reference.attention(q, k, v, softcap=5.0), reference.attention(q, k, v, softcap=5.0))
    assert "-> torch" in backends.explain("flash_attention", q, k, v, causal=True)
    # On CPU tensors auto never picks the interpreter/emulator, even when they are switched on.
    assert "layer_norm -> torch" in backends.explain("layer_norm", torch.randn(2, 8, dtype=torch.half))


def test_record_dispatches_counts_the_backend_of_each_call():
    q, k, v = _qkv()
    x = torch.randn(3, 16)
    with backends.record_dispatches() as outer:
        transformer.flash_attention(q, k, v, causal=True)                  # auto -> torch
        with backends.record_dispatches() as inner:
            transformer.flash_attention(q, k, v, softcap=5.0)             # auto falls back to the reference
            transformer.rms_norm(x, None, backend="reference")
        transformer.rms_norm(x, None)
        with pytest.raises(ValueError):                                   # not served: not counted
            transformer.flash_attention(q, k, v, softcap=5.0, backend="torch")
    assert inner == {("flash_attention", "reference"): 1, ("rms_norm", "reference"): 1}
    assert outer == {("flash_attention", "torch"): 1, ("flash_attention", "reference"): 1,
                     ("rms_norm", "reference"): 1, ("rms_norm", "torch"): 1}
    transformer.rms_norm(x, None)                                         # after the blocks: nothing counts
    assert sum(outer.values()) == 4 and not backends._recorders


def test_record_dispatches_nested_empty_blocks_unregister_themselves():
    """Counters with equal counts compare equal: leaving an inner block must unregister that block, not an
    outer one that happens to hold the same (here: no) counts."""
    x = torch.randn(3, 16)
    with backends.record_dispatches() as outer:
        with backends.record_dispatches():
            pass
        transformer.rms_norm(x, None, backend="torch")
    assert outer == {("rms_norm", "torch"): 1} and not backends._recorders


def test_env_override(monkeypatch):
    q, k, v = _qkv()
    monkeypatch.setenv("TILEFORMER_BACKEND", "reference")
    assert "flash_attention -> reference" in backends.explain("flash_attention", q, k, v)
    monkeypatch.setenv("TILEFORMER_BACKEND", "bogus")
    with pytest.raises(ValueError, match="TILEFORMER_BACKEND"):
        transformer.flash_attention(q, k, v)


# --------------------------------------------------------------------------------------------
# the torch backend against the reference (tolerance rule)
# --------------------------------------------------------------------------------------------

ATTN_CASES = [
    (1, 239, 6, 2, 40, dict(causal=True)),
    (113, 203, 8, 1, 80, dict()),
    (239, 113, 4, 4, 64, dict(causal=True)),                 # Nq > Nk: empty rows
    (113, 113, 4, 2, 40, dict(window_size=(16, 4))),
    (64, 100, 4, 2, 32, dict(causal=True, window_size=(8, -1))),
    (50, 77, 4, 2, 32, dict(alibi_slopes="h")),
]


@pytest.mark.parametrize("dtype", [torch.float32] + HALF)
@pytest.mark.parametrize("nq,nk,hq,hkv,d,kw", ATTN_CASES)
def test_torch_backend_attention(nq, nk, hq, hkv, d, kw, dtype):
    kw = dict(kw)
    if kw.get("alibi_slopes") == "h":
        kw["alibi_slopes"] = torch.rand(hq)
    q, k, v = (t.requires_grad_() for t in _qkv(2, nq, nk, hq, hkv, d, dtype))
    out = transformer.flash_attention(q, k, v, backend="torch", **kw)
    ref = reference.attention(q, k, v, **kw)
    lowp = reference.attention(q, k, v, compute_dtype=None, **kw)
    assert out.dtype == dtype
    atol = 1e-5 if dtype == torch.float32 else 1e-3
    assert_close(out, ref, lowp, atol=atol, config=f"{kw}")
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(out, (q, k, v), g.to(dtype))
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    low_grads = torch.autograd.grad(lowp, (q, k, v), g.to(dtype))
    for name, a, r, lo in zip("qkv", grads, ref_grads, low_grads):
        assert torch.isfinite(a).all(), f"d{name} has non-finite values"
        assert_close(a, r, lo, factor=3, atol=atol, name=f"d{name}", config=f"{kw}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_backend_varlen(dtype):
    lens_q, lens_k = [5, 1, 9], [7, 0, 9]
    cq = torch.tensor([0, 5, 6, 15], dtype=torch.int32)
    ck = torch.tensor([0, 7, 7, 16], dtype=torch.int32)
    q, k, v = torch.randn(15, 4, 16, dtype=dtype), torch.randn(16, 2, 16, dtype=dtype), torch.randn(16, 2, 16, dtype=dtype)
    out = transformer.flash_attention_varlen(q, k, v, cq, ck, 9, 9, causal=True, backend="torch")
    ref = reference.attention_varlen(q, k, v, cq, ck, 9, 9, causal=True)
    lowp = reference.attention_varlen(q, k, v, cq, ck, 9, 9, causal=True, compute_dtype=None)
    assert_close(out, ref, lowp, atol=1e-5 if dtype == torch.float32 else 1e-3)


@pytest.mark.parametrize("dtype", [torch.float32] + HALF)
@pytest.mark.parametrize("n", [1, 127, 1000])
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_torch_backend_norms(op, n, dtype):
    x = torch.randn(3, 7, n, dtype=dtype, requires_grad=True)
    r = torch.randn(3, 7, n, dtype=dtype, requires_grad=True)
    w = torch.randn(n, requires_grad=True)  # fp32 weight with half x: mixed precision
    args = (x, w) if op == "rms_norm" else (x, w, torch.randn(n))
    out, h = getattr(transformer, op)(*args, residual=r, prenorm=True, residual_in_fp32=True, backend="torch")
    ref, href = getattr(reference, op)(*args, residual=r, prenorm=True)
    lowp, _ = getattr(reference, op)(*args, residual=r, prenorm=True, compute_dtype=None)
    assert out.dtype == dtype and h.dtype == torch.float32
    assert_close(out, ref, lowp, atol=1e-5 if dtype == torch.float32 else 1e-2)
    torch.testing.assert_close(h, href)
    gx, = torch.autograd.grad(out.float().sum(), (x,))
    grx, = torch.autograd.grad(ref.sum(), (x,))
    glx, = torch.autograd.grad(lowp.float().sum(), (x,))
    assert_close(gx, grx, glx, factor=3, atol=1e-4 if dtype == torch.float32 else 1e-2, name="dx")


@pytest.mark.parametrize("page_size", [None, 1, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_torch_backend_decode(page_size, dtype):
    b, s, hq, hkv, d, sq = 3, 48, 8, 2, 32, 2
    lens = torch.tensor([0, 1, 40], dtype=torch.int32)
    if page_size:
        n_pages = b * (s // page_size) + 2
        kc = torch.randn(n_pages, page_size, hkv, d, dtype=dtype)
        bt = torch.randperm(n_pages)[: b * (s // page_size)].view(b, -1).to(torch.int32)
    else:
        kc, bt = torch.randn(b, s, hkv, d, dtype=dtype), None
    vc = torch.randn_like(kc)
    q = torch.randn(b, sq, hq, d, dtype=dtype)
    kn, vn = torch.randn(b, sq, hkv, d, dtype=dtype), torch.randn(b, sq, hkv, d, dtype=dtype)
    slopes = torch.rand(hq)
    caches = [(kc.clone(), vc.clone()) for _ in range(3)]
    out = transformer.decode_attention(q, *caches[0], lens, k=kn, v=vn, block_table=bt, alibi_slopes=slopes,
                                       window_size=(20, -1), backend="torch")
    ref = reference.decode_attention(q, *caches[1], lens, k=kn, v=vn, block_table=bt, alibi_slopes=slopes,
                                     window_size=(20, -1))
    lowp = reference.decode_attention(q, *caches[2], lens, k=kn, v=vn, block_table=bt, alibi_slopes=slopes,
                                      window_size=(20, -1), compute_dtype=None)
    assert_close(out, ref, lowp, atol=1e-5 if dtype == torch.float32 else 1e-3)
    assert torch.equal(caches[0][0], caches[1][0]) and torch.equal(caches[0][1], caches[1][1])


def test_first_call_inside_torch_compile_has_no_graph_break():
    """The dispatcher's lazy imports run eagerly under tracing: fullgraph works on a cold process."""
    code = """
import torch, transformer
q, k = torch.randn(2, 16, 4, 32), torch.randn(2, 16, 2, 32)
x, w = torch.randn(4, 64), torch.randn(64)
kc, lens = torch.randn(2, 32, 2, 32), torch.tensor([5, 9], dtype=torch.int32)
def f(q, k, x, w, kc, lens):
    a = transformer.flash_attention(q, k, k, causal=True)
    b = transformer.rms_norm(x, w)
    c = transformer.decode_attention(q[:, :1], kc, kc, lens)
    return a, b, c
got = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, x, w, kc, lens)
want = f(q, k, x, w, kc, lens)
assert all(torch.allclose(g, w_) for g, w_ in zip(got, want))
print("ok")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


@pytest.mark.parametrize("dtype", HALF)
def test_torch_backend_layer_norm_weight_grad_half(dtype):
    """dweight over many rows: the half-precision CPU kernel of PyTorch alone misses the rule."""
    x = torch.randn(1024, 256, dtype=dtype, requires_grad=True)
    w = torch.randn(256, dtype=dtype, requires_grad=True)
    b = torch.randn(256, dtype=dtype, requires_grad=True)
    g = torch.randn(1024, 256, dtype=dtype)
    out = transformer.layer_norm(x, w, b, backend="torch")
    dw, = torch.autograd.grad(out, (w,), g)
    ref = reference.layer_norm(x, w, b)
    rdw, = torch.autograd.grad(ref, (w,), g.float())
    low = reference.layer_norm(x, w, b, compute_dtype=None)
    ldw, = torch.autograd.grad(low, (w,), g)
    assert_close(dw, rdw, ldw, factor=3, atol=1e-2, name="dweight")
