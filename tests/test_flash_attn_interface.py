"""transformer.flash_attn_interface: flash-attn 2.8's functions, called as flash-attn's docs and test suite call
them, against our own public functions (bit for bit: the same op runs) and transformer.reference (the
tolerance rule). The KV-cache expectations are built independently of the module, the way flash-attn's
test_flash_attn_kvcache builds them: the cache rows selected, the appended (rotated) keys written at
cache_seqlens.., every sequence's keys [cache_leftpad, cache_seqlens + seqlen_new) attended with bottom-right
causal / window alignment, rotary positions cache_seqlens + i (q: only when causal or local).
"""
from __future__ import annotations

import inspect
import math

import pytest
import torch

import transformer
from transformer import reference
from transformer.flash_attn_interface import (FlashAttnCompatError, flash_attn_func, flash_attn_kvpacked_func,
                                              flash_attn_qkvpacked_func, flash_attn_varlen_func,
                                              flash_attn_varlen_kvpacked_func, flash_attn_varlen_qkvpacked_func,
                                              flash_attn_with_kvcache)
from transformer.nn import RotaryEmbedding, apply_rotary

from helpers import DEVICE, assert_close, kernel_backends, require_backend

CPU_BACKENDS = ["reference", "torch"]


def has_lse(backend):
    """The torch backend (F.scaled_dot_product_attention) returns no log-sum-exp: it refuses such calls."""
    return backend != "torch"
KERNELS = kernel_backends("triton", "cuda")
DTYPE = torch.float16


def rnd(*shape, gen, dtype=DTYPE):
    return torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)


def _ref_pair(fn, *args, **kw):
    """(fp32 reference, same-precision reference) of a transformer.reference function."""
    return fn(*args, compute_dtype=torch.float32, **kw), fn(*args, compute_dtype=None, **kw)


# ---------------------------------------------------------------------------------------------
# Signatures: flash-attn 2.8's parameters, in order, with its defaults; then keyword-only `backend`
# ---------------------------------------------------------------------------------------------

_COMMON = [("dropout_p", 0.0), ("softmax_scale", None), ("causal", False), ("window_size", (-1, -1)),
           ("softcap", 0.0), ("alibi_slopes", None), ("deterministic", False), ("return_attn_probs", False)]
FLASH_ATTN_28 = {
    flash_attn_func: ["q", "k", "v"] + _COMMON,
    flash_attn_qkvpacked_func: ["qkv"] + _COMMON,
    flash_attn_kvpacked_func: ["q", "kv"] + _COMMON,
    flash_attn_varlen_func: ["q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k"]
    + _COMMON + [("block_table", None)],
    flash_attn_varlen_qkvpacked_func: ["qkv", "cu_seqlens", "max_seqlen"] + _COMMON,
    flash_attn_varlen_kvpacked_func: ["q", "kv", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k"]
    + _COMMON,
    flash_attn_with_kvcache: ["q", "k_cache", "v_cache", ("k", None), ("v", None), ("rotary_cos", None),
                              ("rotary_sin", None), ("cache_seqlens", None), ("cache_batch_idx", None),
                              ("cache_leftpad", None), ("block_table", None), ("softmax_scale", None),
                              ("causal", False), ("window_size", (-1, -1)), ("softcap", 0.0),
                              ("rotary_interleaved", True), ("alibi_slopes", None), ("num_splits", 0),
                              ("return_softmax_lse", False)],
}


@pytest.mark.parametrize("fn", list(FLASH_ATTN_28), ids=lambda f: f.__name__)
def test_signature_is_flash_attn_28(fn):
    params = list(inspect.signature(fn).parameters.values())
    want = FLASH_ATTN_28[fn]
    assert len(params) == len(want) + 1
    for p, w in zip(params, want):
        name, default = (w, inspect.Parameter.empty) if isinstance(w, str) else w
        assert (p.name, p.default, p.kind) == (name, default, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    assert (params[-1].name, params[-1].default, params[-1].kind) == ("backend", "auto", inspect.Parameter.KEYWORD_ONLY)


def test_module_is_exported_without_a_gpu():
    assert transformer.flash_attn_interface.flash_attn_func is flash_attn_func
    assert issubclass(FlashAttnCompatError, ValueError) and issubclass(FlashAttnCompatError, RuntimeError)


# ---------------------------------------------------------------------------------------------
# Dense and packed
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_flash_attn_func(backend):
    gen = torch.Generator().manual_seed(0)
    b, sq, sk, hq, hkv, d = 2, 113, 203, 6, 2, 40
    q, k, v = rnd(b, sq, hq, d, gen=gen), rnd(b, sk, hkv, d, gen=gen), rnd(b, sk, hkv, d, gen=gen)
    slopes = torch.rand(b, hq, generator=gen).to(DEVICE) * 0.3
    # flash-attn's positional form: (q, k, v, dropout_p, softmax_scale, causal)
    out = flash_attn_func(q, k, v, 0.0, None, True, backend=backend)
    assert torch.equal(out, transformer.flash_attention(q, k, v, causal=True, backend=backend))
    assert_close(out, *_ref_pair(reference.attention, q, k, v, causal=True))
    # softcap: not on the torch backend (F.scaled_dot_product_attention has none; it refuses the call)
    kw = dict(softmax_scale=0.3, window_size=(17, 5), softcap=1.5 if backend == "reference" else 0.0,
              alibi_slopes=slopes)
    (r32, l32), (rlow, llow) = _ref_pair(reference.attention, q, k, v, causal=True, return_lse=True, **kw)
    if has_lse(backend):
        out, lse, s_dmask = flash_attn_func(q, k, v, dropout_p=0.0, causal=True, deterministic=True,
                                            return_attn_probs=True, backend=backend, **kw)
        assert s_dmask is None                              # flash-attn returns S_dmask only with dropout
        assert lse.dtype == torch.float32 and lse.shape == (b, hq, sq)
        assert_close(lse, l32, llow, name="lse")
    else:
        out = flash_attn_func(q, k, v, dropout_p=0.0, causal=True, deterministic=True, backend=backend, **kw)
    assert_close(out, r32, rlow)
    # flash-attn's window argument may be a 2-element integer tensor (its kvcache test passes one)
    out_t = flash_attn_func(q, k, v, window_size=torch.tensor([17, 5]), backend=backend)
    assert torch.equal(out_t, flash_attn_func(q, k, v, window_size=(17, 5), backend=backend))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_qkvpacked_and_kvpacked_are_views(backend):
    gen = torch.Generator().manual_seed(1)
    b, s, h, d = 2, 37, 4, 32
    qkv = rnd(b, s, 3, h, d, gen=gen).requires_grad_()
    out = flash_attn_qkvpacked_func(qkv, 0.0, None, True, backend=backend)
    q, k, v = qkv.unbind(2)
    assert q.data_ptr() == qkv.data_ptr() and k.data_ptr() == qkv[:, :, 1].data_ptr()
    assert torch.equal(out, flash_attn_func(q, k, v, causal=True, backend=backend))
    g = torch.randn(out.shape, generator=gen).to(out.dtype)
    (dqkv,) = torch.autograd.grad(out, qkv, g)
    leaf = qkv.detach().float().requires_grad_()
    ref = reference.attention(*leaf.unbind(2), causal=True)
    (want,) = torch.autograd.grad(ref, leaf, g.float())
    low_leaf = qkv.detach().requires_grad_()
    (base,) = torch.autograd.grad(reference.attention(*low_leaf.unbind(2), causal=True, compute_dtype=None),
                                  low_leaf, g)
    assert_close(dqkv, want, base, factor=3.0, name="dqkv")
    # kvpacked, GQA, return_attn_probs
    qx = rnd(b, 21, 2 * h, d, gen=gen)
    kv = rnd(b, s, 2, h, d, gen=gen)
    if has_lse(backend):
        out, lse, s_dmask = flash_attn_kvpacked_func(qx, kv, return_attn_probs=True, backend=backend)
        o2, l2 = transformer.flash_attention(qx, kv[:, :, 0], kv[:, :, 1], return_lse=True, backend=backend)
        assert s_dmask is None and torch.equal(lse, l2)
    else:
        out = flash_attn_kvpacked_func(qx, kv, backend=backend)
        o2 = transformer.flash_attention(qx, kv[:, :, 0], kv[:, :, 1], backend=backend)
    assert torch.equal(out, o2)


def _varlen_inputs(gen, lens_q, lens_k, hq, hkv, d):
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32, device=DEVICE)
    q = rnd(sum(lens_q), hq, d, gen=gen)
    k, v = rnd(sum(lens_k), hkv, d, gen=gen), rnd(sum(lens_k), hkv, d, gen=gen)
    return q, k, v, cu_q, cu_k


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_varlen_functions(backend):
    gen = torch.Generator().manual_seed(2)
    lens_q, lens_k = [5, 0, 17], [9, 3, 17]
    q, k, v, cu_q, cu_k = _varlen_inputs(gen, lens_q, lens_k, 4, 2, 40)
    out = flash_attn_varlen_func(q, k, v, cu_q, cu_k, 17, 17, 0.0, None, True, backend=backend)
    assert torch.equal(out, transformer.flash_attention_varlen(q, k, v, cu_q, cu_k, 17, 17, causal=True,
                                                               backend=backend))
    assert_close(out, *_ref_pair(reference.attention_varlen, q, k, v, cu_q, cu_k, 17, 17, causal=True))
    (r32, l32), (rlow, llow) = _ref_pair(reference.attention_varlen, q, k, v, cu_q, cu_k, 17, 17,
                                         window_size=(3, 2), return_lse=True)
    if has_lse(backend):
        out, lse, s_dmask = flash_attn_varlen_func(q, k, v, cu_q, cu_k, 17, 17, window_size=(3, 2),
                                                   return_attn_probs=True, backend=backend)
        assert s_dmask is None and lse.shape == (4, q.shape[0])
        assert_close(lse, l32, llow, name="lse")
    else:
        out = flash_attn_varlen_func(q, k, v, cu_q, cu_k, 17, 17, window_size=(3, 2), backend=backend)
    assert_close(out, r32, rlow)
    # packed forms: views of the same tensors
    qkv = torch.stack((q, q, q), dim=1)
    out = flash_attn_varlen_qkvpacked_func(qkv, cu_q, 17, causal=True, backend=backend)
    assert torch.equal(out, transformer.flash_attention_varlen(q, q, q, cu_q, cu_q, 17, 17, causal=True,
                                                               backend=backend))
    kv = torch.stack((k, v), dim=1)
    out = flash_attn_varlen_kvpacked_func(q, kv, cu_q, cu_k, 17, 17, 0.0, 0.5, True, backend=backend)
    assert torch.equal(out, transformer.flash_attention_varlen(q, k, v, cu_q, cu_k, 17, 17, causal=True,
                                                               softmax_scale=0.5, backend=backend))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_varlen_paged_block_table(backend):
    """Paged prefill: sequence b's keys are its first len_k[b] tokens of pages block_table[b]."""
    gen = torch.Generator().manual_seed(3)
    lens_q, lens_k, page, hq, hkv, d = [4, 7, 1], [10, 7, 0], 4, 4, 2, 32
    q, k, v, cu_q, cu_k = _varlen_inputs(gen, lens_q, lens_k, hq, hkv, d)
    num_pages = 12
    perm = torch.randperm(num_pages, generator=gen)
    block_table = perm[:9].view(3, 3).to(torch.int32).to(DEVICE)
    k_pages, v_pages = rnd(num_pages, page, hkv, d, gen=gen), rnd(num_pages, page, hkv, d, gen=gen)
    for bi, (a, n) in enumerate(zip(cu_k.tolist(), lens_k)):
        for t in range(n):
            k_pages[block_table[bi, t // page], t % page] = k[a + t]
            v_pages[block_table[bi, t // page], t % page] = v[a + t]
    out = flash_attn_varlen_func(q, k_pages, v_pages, cu_q, cu_k, 7, 10, causal=True, block_table=block_table,
                                 backend=backend)
    assert torch.equal(out, transformer.flash_attention_varlen(q, k, v, cu_q, cu_k, 7, 10, causal=True,
                                                               backend=backend))
    bad = block_table.clone()
    bad[0, 1] = num_pages
    with pytest.raises(FlashAttnCompatError, match="block_table"):
        flash_attn_varlen_func(q, k_pages, v_pages, cu_q, cu_k, 7, 10, block_table=bad, backend=backend)


# ---------------------------------------------------------------------------------------------
# KV cache
# ---------------------------------------------------------------------------------------------

def _rope_ref(x, cos_h, sin_h, pos, interleaved):
    """flash-attn's rotary (apply_rotary_emb_torch) in fp32: x [S, H, D], tables [seqlen_ro, rd/2], pos [S]."""
    rd = 2 * cos_h.shape[1]
    c, s = cos_h.float()[pos][:, None, :], sin_h.float()[pos][:, None, :]
    xf = x.float()
    x1, x2 = (xf[..., 0:rd:2], xf[..., 1:rd:2]) if interleaved else (xf[..., :rd // 2], xf[..., rd // 2:rd])
    o1, o2 = x1 * c - x2 * s, x2 * c + x1 * s
    rot = torch.stack((o1, o2), dim=-1).flatten(-2) if interleaved else torch.cat((o1, o2), dim=-1)
    return torch.cat((rot.to(x.dtype), x[..., rd:]), dim=-1)


def _kvcache_expected(q, k_cache, v_cache, k, v, cos, sin, seqlens, batch_idx, leftpad, block_table, causal,
                      window, alibi, interleaved):
    """(fp32 out, same-precision out, fp32 lse, same-precision lse, k_cache after, v_cache after)."""
    kc, vc = k_cache.clone(), v_cache.clone()
    b, sq = q.shape[:2]
    snew = 0 if k is None else k.shape[1]
    page = k_cache.shape[1]
    local = causal or any(0 <= w < (block_table.shape[1] * page if block_table is not None else page) for w in window)

    def where(bi, t):   # (row or page, slot) of token t of sequence bi
        if block_table is not None:
            return int(block_table[bi, t // page]), t % page
        return (batch_idx[bi] if batch_idx is not None else bi), t

    outs = {torch.float32: [], None: []}
    lses = {torch.float32: [], None: []}
    for bi in range(b):
        n = seqlens[bi]
        qb = q[bi]
        if cos is not None:
            kb = _rope_ref(k[bi], cos, sin, torch.arange(n, n + snew), interleaved)
            qpos = torch.arange(n, n + sq) if local else torch.full((sq,), n)
            qb = _rope_ref(qb, cos, sin, qpos, interleaved)
        elif k is not None:
            kb = k[bi]
        for t in range(snew):
            kc[where(bi, n + t)] = kb[t]
            vc[where(bi, n + t)] = v[bi, t]
        lo, hi = (leftpad[bi] if leftpad is not None else 0), n + snew
        keys = torch.stack([kc[where(bi, t)] for t in range(lo, hi)]) if hi > lo else None
        vals = torch.stack([vc[where(bi, t)] for t in range(lo, hi)]) if hi > lo else None
        for cd in (torch.float32, None):
            if keys is None:
                outs[cd].append(torch.zeros(1, sq, q.shape[2], q.shape[3], dtype=cd or q.dtype))
                lses[cd].append(torch.full((1, q.shape[2], sq), float("-inf"), dtype=cd or torch.float32))
                continue
            o, lse = reference.attention(qb[None], keys[None], vals[None], causal=causal, window_size=window,
                                         alibi_slopes=None if alibi is None else alibi[bi], return_lse=True,
                                         compute_dtype=cd)
            outs[cd].append(o)
            lses[cd].append(lse.float())
    return (torch.cat(outs[torch.float32]), torch.cat(outs[None]), torch.cat(lses[torch.float32]),
            torch.cat(lses[None]), kc, vc)


def _kvcache_case(gen, *, sq, snew, d=64, hkv=2, group=3, s_max=48, b=2, rotary=None, rotary_frac=1.0,
                  batch_idx=False, leftpad=False, page=None, seqlens_kind="int32", causal=True, window=(-1, -1),
                  alibi=False):
    hq = hkv * group
    b_cache = 2 * b if batch_idx else b
    q = rnd(b, sq, hq, d, gen=gen)
    k = rnd(b, snew, hkv, d, gen=gen) if snew else None
    v = rnd(b, snew, hkv, d, gen=gen) if snew else None
    if page is None:
        k_cache, v_cache = rnd(b_cache, s_max, hkv, d, gen=gen), rnd(b_cache, s_max, hkv, d, gen=gen)
        block_table, capacity = None, s_max
    else:
        pages_per_seq = -(-s_max // page)
        num_pages = b * pages_per_seq + 2
        k_cache, v_cache = rnd(num_pages, page, hkv, d, gen=gen), rnd(num_pages, page, hkv, d, gen=gen)
        block_table = torch.randperm(num_pages, generator=gen)[:b * pages_per_seq].view(b, -1).to(torch.int32)
        capacity = pages_per_seq * page
    if seqlens_kind == "none":
        seqlens = [capacity] * b
        cache_seqlens = None
    else:
        hi = capacity - max(snew, sq if causal and rotary else 0)
        seqlens = torch.randint(0 if snew else 1, hi + 1, (b,), generator=gen).tolist()
        if seqlens_kind == "int":
            seqlens = [seqlens[0]] * b
            cache_seqlens = seqlens[0]
        else:
            cache_seqlens = torch.tensor(seqlens, dtype=torch.int32 if seqlens_kind == "int32" else torch.int64)
    idx = torch.randperm(b_cache, generator=gen)[:b].to(torch.int32) if batch_idx else None
    pad = torch.tensor([int(torch.randint(0, n, (1,), generator=gen)) if n else 0 for n in seqlens],
                       dtype=torch.int32) if leftpad else None
    cos = sin = None
    if rotary is not None:
        rd = int(rotary_frac * d) // 2 * 2
        angle = torch.rand(capacity, rd // 2, generator=gen) * 2 * math.pi
        cos, sin = torch.cos(angle).to(DTYPE), torch.sin(angle).to(DTYPE)
    slopes = torch.rand(b, hq, generator=gen) * 0.3 if alibi else None
    call = dict(q=q, k_cache=k_cache, v_cache=v_cache, k=k, v=v, rotary_cos=cos, rotary_sin=sin,
                cache_seqlens=cache_seqlens, cache_batch_idx=idx, cache_leftpad=pad, block_table=block_table,
                causal=causal, window_size=window, rotary_interleaved=rotary == "interleaved", alibi_slopes=slopes)
    expect = _kvcache_expected(q, k_cache, v_cache, k, v, cos, sin, seqlens, None if idx is None else idx.tolist(),
                               None if pad is None else pad.tolist(), block_table, causal, window, slopes,
                               rotary == "interleaved")
    return call, expect


def _run_kvcache(backend, call, expect, config):
    kw = dict(call)
    kc, vc = kw.pop("k_cache").clone(), kw.pop("v_cache").clone()
    q = kw.pop("q")
    r32, rlow, l32, llow, kc_want, vc_want = expect
    if has_lse(backend):
        out, lse = flash_attn_with_kvcache(q, kc, vc, return_softmax_lse=True, backend=backend, **kw)
        assert lse.shape == (q.shape[0], q.shape[2], q.shape[1])
        assert_close(lse, l32, llow, name="lse", config=config)
    else:
        out = flash_attn_with_kvcache(q, kc, vc, backend=backend, **kw)
    assert out.shape == q.shape
    assert_close(out, r32, rlow, config=config)
    # the appended (rotated) keys and values, in the right rows / pages; nothing else changed
    assert torch.equal(kc, kc_want), f"k_cache differs [{config}]"
    assert torch.equal(vc, vc_want), f"v_cache differs [{config}]"
    return out


KV_CASES = {
    # name: _kvcache_case arguments
    "decode-int": dict(sq=1, snew=1, seqlens_kind="int", causal=False),
    "decode-none-nonew": dict(sq=3, snew=0, seqlens_kind="none", causal=False),
    "int64-causal": dict(sq=5, snew=5, seqlens_kind="int64"),
    "snew<sq": dict(sq=6, snew=2),
    "snew>sq": dict(sq=2, snew=7, causal=False),
    "sq40-causal": dict(sq=40, snew=40, s_max=96),
    "sq40-snew9-causal": dict(sq=40, snew=9, s_max=64),
    "sq20-noncausal": dict(sq=20, snew=20, causal=False),
    "sq20-noncausal-window": dict(sq=20, snew=20, causal=False, window=(9, 3)),
    "rotary-interleaved": dict(sq=4, snew=4, rotary="interleaved"),
    "rotary-half-noncausal": dict(sq=4, snew=4, rotary="half", causal=False),
    "rotary-dim<D-local": dict(sq=3, snew=3, rotary="half", rotary_frac=0.5, causal=False, window=(5, 1)),
    "batch-idx-rotary": dict(sq=2, snew=2, batch_idx=True, rotary="interleaved", rotary_frac=0.25),
    "leftpad": dict(sq=3, snew=3, leftpad=True),
    "leftpad-batch-idx-alibi": dict(sq=4, snew=2, leftpad=True, batch_idx=True, alibi=True),
    "paged": dict(sq=4, snew=4, page=8, alibi=True, window=(11, -1)),
    "paged-sq20-rotary": dict(sq=20, snew=20, page=5, rotary="half", s_max=60),
}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", list(KV_CASES))
def test_flash_attn_with_kvcache(backend, name):
    gen = torch.Generator().manual_seed(sorted(KV_CASES).index(name))
    call, expect = _kvcache_case(gen, **KV_CASES[name])
    _run_kvcache(backend, call, expect, f"{name} {backend}")


KERNEL_KV_CASES = ["int64-causal", "snew<sq", "sq20-noncausal", "batch-idx-rotary", "leftpad", "paged"]


@pytest.mark.parametrize("name", KERNEL_KV_CASES)
@pytest.mark.parametrize("backend", KERNELS)
def test_flash_attn_with_kvcache_kernels(backend, name):
    require_backend(backend)
    gen = torch.Generator().manual_seed(sorted(KV_CASES).index(name))
    call, expect = _kvcache_case(gen, **dict(KV_CASES[name], s_max=32, group=2))
    with transformer.backends.record_dispatches() as counts:
        _run_kvcache(backend, call, expect, f"{name} {backend}")
    assert counts and all(b == backend for _, b in counts), counts


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_kvcache_positional_form_equals_decode_attention(backend):
    """flash-attn's positional call (q, k_cache, v_cache, k, v) and causal=False default, against
    decode_attention with the same cache (bit for bit: the same op runs)."""
    gen = torch.Generator().manual_seed(5)
    call, _ = _kvcache_case(gen, sq=4, snew=4, causal=False)
    kc1, vc1, kc2, vc2 = (t.clone() for t in (call["k_cache"], call["v_cache"]) * 2)
    out = flash_attn_with_kvcache(call["q"], kc1, vc1, call["k"], call["v"], None, None, call["cache_seqlens"],
                                  backend=backend)
    want = transformer.decode_attention(call["q"], kc2, vc2, call["cache_seqlens"], k=call["k"], v=call["v"],
                                        causal=False, backend=backend)
    assert torch.equal(out, want) and torch.equal(kc1, kc2) and torch.equal(vc1, vc2)


def test_rotary_is_the_modules_rope_bit_for_bit():
    """Tables from RotaryEmbedding ([S, D] = cos(f) twice) given as flash-attn's [S, D/2] rotate the appended keys
    exactly as the Attention module's RoPE does (transformer.nn.rope.apply_rotary)."""
    gen = torch.Generator().manual_seed(6)
    b, s_max, hkv, d, n = 2, 32, 2, 64, 5
    cos, sin = RotaryEmbedding(d)(torch.arange(s_max))
    k_cache, v_cache = rnd(b, s_max, hkv, d, gen=gen), rnd(b, s_max, hkv, d, gen=gen)
    q, k, v = rnd(b, 3, 2 * hkv, d, gen=gen), rnd(b, 3, hkv, d, gen=gen), rnd(b, 3, hkv, d, gen=gen)
    flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cos[:, :d // 2], sin[:, :d // 2], n, causal=True,
                            rotary_interleaved=False, backend="torch")
    pos = n + torch.arange(3)
    assert torch.equal(k_cache[:, n:n + 3], apply_rotary(k, cos[pos], sin[pos]))


def test_apply_rotary_partial_and_interleaved():
    gen = torch.Generator().manual_seed(7)
    x = rnd(5, 3, 40, gen=gen)
    ang = torch.rand(5, 8, generator=gen)
    c, s = ang.cos(), ang.sin()
    pos = torch.arange(5)
    for inter in (False, True):
        got = apply_rotary(x, torch.cat((c, c), -1), torch.cat((s, s), -1), interleaved=inter)
        assert torch.equal(got, _rope_ref(x, c, s, pos, inter))
    with pytest.raises(ValueError, match="rotary dim"):
        apply_rotary(x, torch.ones(5, 7), torch.ones(5, 7))         # odd rotary_dim
    with pytest.raises(ValueError, match="rotary dim"):
        apply_rotary(x, torch.ones(5, 42), torch.ones(5, 42))       # rotary_dim > head dim


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------

def test_dropout_arguments():
    q = torch.randn(1, 4, 2, 16)
    for p in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="dropout_p"):
            flash_attn_qkvpacked_func(torch.stack((q, q, q), 2), dropout_p=p)
    with pytest.raises(TypeError, match="dropout_p"):
        flash_attn_func(q, q, q, "0.1")


@pytest.mark.parametrize("backend", ["reference"] + KERNELS)
def test_dropout(backend):
    """dropout_p > 0 (positional, as flash-attn's tests call it): the output is the reference attention with the
    call's mask, which S_dmask shows (negative = dropped, relu(S_dmask) @ v = out); the same seed gives the same
    output, the packed and varlen forms too; the torch backend refuses (its dropout is not that mask)."""
    require_backend(backend)
    gen = torch.Generator().manual_seed(4)
    dt = DTYPE
    b, sq, sk, h, d = 2, 37, 45, 2, 16
    q, k, v = rnd(b, sq, h, d, gen=gen, dtype=dt), rnd(b, sk, h, d, gen=gen, dtype=dt), rnd(b, sk, h, d, gen=gen,
                                                                                             dtype=dt)
    try:
        transformer.backends.select("flash_attention", transformer.attention._describe(q, k, v, dropout_p=0.25),
                                    backend)
    except ValueError as e:
        pytest.skip(f"dispatcher: {e}")
    torch.manual_seed(5)
    out, lse, s = flash_attn_func(q, k, v, 0.25, None, True, return_attn_probs=True, backend=backend)
    assert s.shape == (b, h, sq, sk) and bool((s < 0).any()) and bool((s > 0).any())
    keep = s >= 0
    frac = float(keep[s != 0].float().mean())
    assert abs(frac - 0.75) < 0.05, frac
    want = torch.einsum("bhij,bjhd->bihd", s.clamp_min(0), v.float())
    assert_close(out, want, torch.einsum("bhij,bjhd->bihd", s.clamp_min(0).to(dt), v))
    torch.manual_seed(5)
    assert torch.equal(flash_attn_func(q, k, v, 0.25, None, True, backend=backend), out)
    torch.manual_seed(6)
    packed = flash_attn_qkvpacked_func(torch.stack((q, q, q), 2), 0.25, backend=backend)
    torch.manual_seed(6)
    assert torch.equal(packed, flash_attn_func(q, q, q, 0.25, backend=backend))
    # varlen: the packed batch with the same rng gives the dense outputs (sequence i = batch element i)
    cu_q = torch.tensor([0, sq, 2 * sq], dtype=torch.int32, device=q.device)
    cu_k = torch.tensor([0, sk, 2 * sk], dtype=torch.int32, device=q.device)
    torch.manual_seed(5)
    out_v, _, s_v = flash_attn_varlen_func(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu_q, cu_k, sq, sk,
                                           0.25, None, True, return_attn_probs=True, backend=backend)
    torch.testing.assert_close(s_v, s, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out_v.view(out.shape), out, rtol=1e-3, atol=1e-3)
    with pytest.raises(FlashAttnCompatError, match="dropout_p"):
        flash_attn_func(q.float(), k.float(), v.float(), 0.25, backend="torch")


def _bad_kvcache(match, exc=ValueError, **over):
    gen = torch.Generator().manual_seed(8)
    call, _ = _kvcache_case(gen, sq=2, snew=2, rotary="half", s_max=16, d=32)
    call.update(over)
    with pytest.raises(exc, match=match):
        flash_attn_with_kvcache(**call)


def test_kvcache_bad_input():
    half = torch.ones(16, 8, dtype=DTYPE)
    _bad_kvcache("rotary_sin", rotary_sin=torch.ones(16, 4, dtype=DTYPE), rotary_cos=half)
    _bad_kvcache("rotary_cos", rotary_cos=torch.ones(16, 17, dtype=DTYPE), rotary_sin=torch.ones(16, 17, dtype=DTYPE))
    _bad_kvcache("rotary_cos", rotary_cos=torch.ones(8, 8, dtype=DTYPE), rotary_sin=torch.ones(8, 8, dtype=DTYPE))
    _bad_kvcache("rotary_cos", rotary_cos=torch.ones(16 * 8, dtype=DTYPE), rotary_sin=torch.ones(16 * 8, dtype=DTYPE))
    _bad_kvcache("rotary_cos", rotary_sin=None)
    _bad_kvcache("rotary_cos", k=None, v=None)
    _bad_kvcache("cache_seqlens", cache_seqlens=None)
    _bad_kvcache("cache_seqlens", cache_seqlens=15)
    _bad_kvcache("cache_batch_idx", cache_batch_idx=torch.tensor([0, 2], dtype=torch.int32))
    _bad_kvcache("cache_batch_idx", cache_batch_idx=torch.tensor([-1, 0], dtype=torch.int32))
    _bad_kvcache("cache_leftpad", cache_leftpad=torch.tensor([0, 40], dtype=torch.int32))
    _bad_kvcache("k and v", v=None)


def test_kvcache_errors_are_value_and_runtime_errors():
    gen = torch.Generator().manual_seed(9)
    call, _ = _kvcache_case(gen, sq=1, snew=1, page=4, s_max=16)
    call["cache_seqlens"] = torch.tensor([16, 3], dtype=torch.int32)   # 16 + 1 appended > 4 pages x 4
    for exc in (RuntimeError, ValueError):
        with pytest.raises(exc, match="block_table"):
            flash_attn_with_kvcache(**call)
    for over in (dict(cache_batch_idx=torch.zeros(2, dtype=torch.int32)), dict(cache_leftpad=torch.zeros(2, dtype=torch.int32))):
        with pytest.raises(RuntimeError, match="block_table"):
            flash_attn_with_kvcache(**dict(call, cache_seqlens=3, **over))
