"""Shared test helpers: the tolerance rule, backend parametrisation, random inputs.

Tolerance rule (flash-attn's): the kernel's max error against the fp32 reference may be at most
``factor`` x the max error of PyTorch computing the same thing in the same low precision, plus a
small atol. factor = 2 for outputs, 3 for gradients.
"""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch

import transformer
from transformer import reference
from transformer.testing import assert_close  # noqa: F401  (the tolerance rule)

HAS_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_GPU else "cpu")


def _required_backends():
    return {b for b in os.environ.get("TILEFORMER_REQUIRE_BACKENDS", "").split(",") if b}


def require_backend(name):
    """Skip (with the reason) when `name` cannot run here -- or fail, when make test requires it."""
    status = transformer.backends.available()[name]
    if status != "available":
        if name in _required_backends():
            pytest.fail(f"backend {name!r} is required here (TILEFORMER_REQUIRE_BACKENDS) but: {status}")
        pytest.skip(f"backend {name!r} unavailable: {status}")


def kernel_backends(*names):
    """pytest params for kernel backends, marked interpret/emulator when they run on the CPU."""
    params = []
    for n in names or ("triton", "cuda"):
        marks = []
        if not HAS_GPU:
            marks.append(pytest.mark.interpret if n == "triton" else pytest.mark.emulator)
        else:
            marks.append(pytest.mark.gpu)
        params.append(pytest.param(n, marks=marks, id=n))
    return params


def randn(*shape, dtype=torch.float32, device=None, requires_grad=False, scale=1.0, generator=None):
    t = torch.randn(*shape, dtype=torch.float32, device=device or DEVICE, generator=generator) * scale
    return t.to(dtype).requires_grad_(requires_grad)


# ---------------------------------------------------------------------------------------------
# Decode cases (tests/test_decode.py, tests/test_cuda_decode.py)
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Case:
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    cache_seqlens: torch.Tensor
    k: torch.Tensor | None
    v: torch.Tensor | None
    block_table: torch.Tensor | None


def make_case(lens, sq, hkv, group, d, dtype, *, page_size=None, append=False, seed=0, spare=3):
    """Random q/k/v and a cache holding lens[b] random tokens per sequence; every other slot is NaN.

    page_size=None: contiguous cache [B, S_max, Hkv, D]; else a paged cache whose pages are shuffled and
    shared out through block_table, with `spare` pages no sequence owns."""
    gen = torch.Generator().manual_seed(seed)
    batch, hq = len(lens), hkv * group
    need = max(lens) + (sq if append else 0)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)

    if page_size is None:
        shape, block_table = (batch, need + spare, hkv, d), None
    else:
        max_pages = -(-max(need, 1) // page_size) + 1
        num_pages = batch * max_pages + spare
        perm = torch.randperm(num_pages, generator=gen)[: batch * max_pages]
        block_table = perm.view(batch, max_pages).to(torch.int32).to(DEVICE)
        shape = (num_pages, page_size, hkv, d)
    k_cache = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    v_cache = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    for b, n in enumerate(lens):
        bt = block_table[b] if block_table is not None else None
        page, slot = reference.cache_positions(torch.tensor(n), n, bt, page_size)
        kb, vb = rnd(n, hkv, d), rnd(n, hkv, d)
        if page is None:
            k_cache[b, :n], v_cache[b, :n] = kb, vb
        else:
            k_cache[page, slot], v_cache[page, slot] = kb, vb
    k = rnd(batch, sq, hkv, d) if append else None
    v = rnd(batch, sq, hkv, d) if append else None
    seqlens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    return Case(rnd(batch, sq, hq, d), k_cache, v_cache, seqlens, k, v, block_table)


def bits(t):
    """The raw bits of a tensor (NaN == NaN), for exact comparisons."""
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


def run_decode(backend, case, **kw):
    """(out, lse, k_cache, v_cache) of one backend (or the reference with compute_dtype) on fresh cache copies."""
    kc, vc = case.k_cache.clone(), case.v_cache.clone()
    args = (case.q, kc, vc, case.cache_seqlens)
    kwargs = dict(k=case.k, v=case.v, block_table=case.block_table, return_lse=True, **kw)
    if backend.startswith("reference"):
        kwargs.pop("num_splits", None)
        dtype = torch.float32 if backend == "reference" else None
        out, lse = reference.decode_attention(*args, compute_dtype=dtype, **kwargs)
    else:
        out, lse = transformer.decode_attention(*args, backend=backend, **kwargs)
    return out, lse, kc, vc


def check_decode(backend, case, config="", **kw):
    """The kernel vs the fp32 reference (flash-attn rule) for out and lse, and the appended cache bit for bit."""
    out, lse, kc, vc = run_decode(backend, case, **kw)
    ref, ref_lse, ref_kc, ref_vc = run_decode("reference", case, **kw)
    low, low_lse, _, _ = run_decode("reference_lowp", case, **kw)
    assert out.dtype == case.q.dtype and lse.dtype == torch.float32
    assert_close(out, ref, low, name="out", config=config)
    assert_close(lse, ref_lse, low_lse.float(), name="lse", config=config)
    assert torch.equal(bits(kc), bits(ref_kc)), f"k_cache after the call differs from the reference's [{config}]"
    assert torch.equal(bits(vc), bits(ref_vc)), f"v_cache after the call differs from the reference's [{config}]"
    return out, lse


# ---------------------------------------------------------------------------------------------
# Attention forward + backward against the references (the backward-path tests of both kernel backends)
# ---------------------------------------------------------------------------------------------

def attn_inputs(b, nq, nk, hq, hkv, d, dtype, seed=0):
    """q [b, nq, hq, d], k and v [b, nk, hkv, d] on DEVICE, requiring grad."""
    g = torch.Generator().manual_seed(seed)

    def make(n, h):
        return torch.randn(b, n, h, d, generator=g).to(DEVICE, dtype).requires_grad_(True)

    return make(nq, hq), make(nk, hkv), make(nk, hkv)


def alibi_slopes(kind, b, hq, seed=1):
    """None, per-head ("h": [hq]) or per-batch-and-head ("bh": [b, hq]) ALiBi slopes."""
    if kind is None:
        return None
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(*((hq,) if kind == "h" else (b, hq)), generator=g) * 0.5 + 0.05).to(DEVICE)


def grads(outs, inputs, gouts):
    """Gradients of inputs through the outputs whose output gradient is not None."""
    keep = [(o, g) for o, g in zip(outs, gouts) if g is not None]
    return torch.autograd.grad([o for o, _ in keep], inputs, [g for _, g in keep])


def compare_grads(got, want, base, config):
    """dq, dk, dv by the tolerance rule (factor 3), none NaN (an element a kernel left unwritten)."""
    for name, a, r, rl in zip(("dq", "dk", "dv"), got, want, base):
        assert not torch.isnan(a).any(), f"{name} has NaN (an unwritten element?) [{config}]"
        assert_close(a, r, rl, factor=3.0, name=name, config=config)


def check_attention_grads(backend, q, k, v, *, deterministic, lse_grad=False, config="", **kw):
    """Forward + backward on `backend` through transformer.attention.attention (the one dense entry, which also
    takes causal_align) vs the fp32 and same-dtype references (out, then dq/dk/dv with a random dout and, with
    lse_grad, a random dlse); returns the gradients."""
    require_backend(backend)
    out, lse = transformer.attention.attention(q, k, v, return_lse=True, deterministic=deterministic,
                                               backend=backend, **kw)
    ref, ref_lse = reference.attention(q, k, v, return_lse=True, **kw)
    low, low_lse = reference.attention(q, k, v, return_lse=True, compute_dtype=None, **kw)
    assert_close(out, ref, low, name="out", config=config)
    g = torch.Generator().manual_seed(7)
    dout = torch.randn(out.shape, generator=g).to(out.device, out.dtype)
    dlse = torch.randn(lse.shape, generator=g).to(lse.device) if lse_grad else None
    got = grads((out, lse), (q, k, v), (dout, dlse))
    want = grads((ref, ref_lse), (q, k, v), (dout.float(), dlse))
    base = grads((low, low_lse), (q, k, v), (dout, None if dlse is None else dlse.to(low_lse.dtype)))
    compare_grads(got, want, base, config)
    return got
