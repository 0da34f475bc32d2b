"""The two backward paths of the Triton flash attention, against the fp32 reference (the padded-batch, varlen
and fully-masked-row tests run the CUDA backend's two paths too; its own dense cases, emulator schedules and
matrix-product counts are in test_cuda_attention_bwd_paths.py).

* ``deterministic=False`` (the default): one dK/dV kernel per key tile that also adds dQ with fp32 atomic adds
  (S, P, dP, dS once per tile pair: 5 matrix products), then a kernel converting the accumulator;
* ``deterministic=True``: the dK/dV kernel and a separate dQ kernel (7 products), no atomics: bit-identical
  gradients from run to run.

Both are checked by the flash-attn rule (helpers.assert_close: the kernel's max error against the fp32 reference
at most 3x that of the reference computed in the inputs' dtype) over odd sizes, every feature and both dtypes;
outputs are NaN-poisoned (conftest), so an element a path forgets to write fails. The executed tensor-core work
is counted under the interpreter (triton_kernels._count): the default backward runs at most 1.1x the ideal
FLOPs (2.5x the forward's 4 * B * H * Nq * Nk * D, halved for causal). Larger grids are under ``-m slow``.
"""
from __future__ import annotations

import itertools
import os

import pytest
import torch

import transformer
from transformer import reference

import helpers

BACKENDS = helpers.kernel_backends("triton")
BOTH = helpers.kernel_backends("triton", "cuda")   # the tests below that run on both kernel backends
FP16, BF16 = torch.float16, torch.bfloat16
HEADS = {"mha": (2, 2), "gqa": (6, 2), "mqa": (4, 1)}
MODES = [pytest.param(False, id="atomic"), pytest.param(True, id="deterministic")]


_inputs, _alibi, _grads, _compare = helpers.attn_inputs, helpers.alibi_slopes, helpers.grads, helpers.compare_grads


def _check_dense(q, k, v, **kw):
    return helpers.check_attention_grads("triton", q, k, v, **kw)


# ---------------------------------------------------------------------------------------------
# Dense: odd sizes x features x dtypes, both paths
# ---------------------------------------------------------------------------------------------

# (b, nq, nk, heads, d, dtype, causal, align, window, softcap, alibi, lse_grad)
CASES = [
    (1, 1, 239, "gqa", 64, FP16, True, "bottom_right", (-1, -1), 0.0, None, False),
    (1, 113, 239, "mqa", 40, BF16, False, "bottom_right", (-1, -1), 0.0, None, True),
    (2, 239, 113, "gqa", 80, FP16, True, "bottom_right", (-1, -1), 0.0, "h", False),   # rows that see no key
    (1, 113, 113, "mha", 111, BF16, False, "bottom_right", (30, 7), 0.0, None, False),
    (1, 97, 130, "gqa", 128, FP16, False, "bottom_right", (-1, -1), 5.0, "h", True),
    (1, 65, 70, "mha", 256, BF16, True, "bottom_right", (-1, -1), 0.0, "bh", False),
    (1, 113, 80, "mqa", 64, BF16, True, "top_left", (-1, -1), 0.0, "h", False),       # SDPA's is_causal
    (1, 70, 113, "gqa", 40, FP16, True, "top_left", (20, -1), 3.0, None, True),
    (1, 1, 1, "mha", 128, FP16, False, "bottom_right", (-1, -1), 0.0, None, False),
    (2, 64, 128, "gqa", 64, FP16, False, "bottom_right", (0, 40), 0.0, "bh", False),  # window right of diagonal
]


def _case_id(c):
    b, nq, nk, heads, d, dtype, causal, align, window, softcap, alibi, lse_grad = c
    parts = [f"b{b}", f"{nq}x{nk}", heads, f"d{d}", str(dtype)[6:]]
    parts += [f"causal_{align}"] if causal else []
    parts += [f"win{window[0]}_{window[1]}"] if window != (-1, -1) else []
    parts += [f"cap{softcap:g}"] if softcap else []
    parts += [f"alibi_{alibi}"] if alibi else []
    parts += ["dlse"] if lse_grad else []
    return "-".join(parts)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("deterministic", MODES)
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_dense(backend, case, deterministic):
    b, nq, nk, heads, d, dtype, causal, align, window, softcap, alibi, lse_grad = case
    hq, hkv = HEADS[heads]
    q, k, v = _inputs(b, nq, nk, hq, hkv, d, dtype, seed=nq + d)
    _check_dense(q, k, v, deterministic=deterministic, lse_grad=lse_grad, causal=causal, causal_align=align,
                 window_size=window, softcap=softcap, alibi_slopes=_alibi(alibi, b, hq),
                 config=_case_id(case) + f" deterministic={deterministic}")


@pytest.mark.parametrize("backend", BOTH)
@pytest.mark.parametrize("deterministic", MODES)
def test_padded_batch(backend, deterministic):
    """Per-batch key bounds (padded_attention: three varlen sequences per batch element, two of them without
    queries; the last batch element sees no key) through both paths."""
    helpers.require_backend(backend)
    q, k, v = _inputs(3, 40, 57, 4, 2, 64, BF16, seed=2)
    start = torch.tensor([0, 5, 57], device=helpers.DEVICE)
    end = torch.tensor([57, 30, 57], device=helpers.DEVICE)
    out = transformer.attention.attention(q, k, v, key_start=start, key_end=end, deterministic=deterministic,
                                          backend=backend)
    mask = torch.zeros(3, 57, dtype=torch.bool, device=helpers.DEVICE)
    for i, (s, e) in enumerate(zip(start.tolist(), end.tolist())):
        mask[i, s:e] = True
    ref = reference.attention(q, k, v, key_padding_mask=mask)
    low = reference.attention(q, k, v, key_padding_mask=mask, compute_dtype=None)
    helpers.assert_close(out, ref, low, name="out")
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(4)).to(out.dtype)
    _compare(torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(ref, (q, k, v), dout.float()),
             torch.autograd.grad(low, (q, k, v), dout), f"padded deterministic={deterministic}")


# ---------------------------------------------------------------------------------------------
# Varlen: empty sequences, tokens in no sequence, both paths
# ---------------------------------------------------------------------------------------------

def _varlen(lens_q, lens_k, hq, hkv, d, dtype, *, head_q=0, tail_q=0, tail_k=0, seed=0):
    """Packed q/k/v with head_q tokens before cu_seqlens_q[0] and tail_* tokens after the last sequence."""
    g = torch.Generator().manual_seed(seed)
    cu_q = torch.tensor([head_q] + [head_q + x for x in itertools.accumulate(lens_q)], dtype=torch.int32)
    cu_k = torch.tensor([0] + list(itertools.accumulate(lens_k)), dtype=torch.int32)

    def make(n, h):
        return torch.randn(n, h, d, generator=g).to(helpers.DEVICE, dtype).requires_grad_(True)

    q = make(head_q + sum(lens_q) + tail_q, hq)
    k, v = make(sum(lens_k) + tail_k, hkv), make(sum(lens_k) + tail_k, hkv)
    return q, k, v, cu_q.to(helpers.DEVICE), cu_k.to(helpers.DEVICE), max(lens_q), max(lens_k)


VARLEN_CASES = [
    # (lens_q, lens_k, heads, d, dtype, causal, window, softcap, alibi, (head_q, tail_q, tail_k), lse_grad)
    ([1, 113, 0, 239], [239, 113, 5, 1], "gqa", 64, FP16, True, (-1, -1), 0.0, "bh", (0, 3, 2), True),
    ([113, 0, 1], [0, 40, 113], "mqa", 111, BF16, False, (16, 16), 2.0, None, (2, 5, 0), False),
    ([70, 33], [90, 0], "mha", 128, BF16, True, (-1, -1), 0.0, "h", (0, 0, 7), False),
    ([70, 33], [90, 0], "mha", 256, BF16, True, (-1, -1), 0.0, "h", (0, 0, 7), False),
]


@pytest.mark.parametrize("backend", BOTH)
@pytest.mark.parametrize("deterministic", MODES)
@pytest.mark.parametrize("case", VARLEN_CASES, ids=["gqa-causal-alibi-tails-dlse", "mqa-window-softcap-head",
                                                    "mha-empty-keys", "mha-d256-empty-keys"])
def test_varlen(backend, case, deterministic):
    helpers.require_backend(backend)
    lens_q, lens_k, heads, d, dtype, causal, window, softcap, alibi, (head_q, tail_q, tail_k), lse_grad = case
    hq, hkv = HEADS[heads]
    q, k, v, cu_q, cu_k, mq, mk = _varlen(lens_q, lens_k, hq, hkv, d, dtype, head_q=head_q, tail_q=tail_q,
                                          tail_k=tail_k, seed=d)
    kw = dict(causal=causal, window_size=window, softcap=softcap, alibi_slopes=_alibi(alibi, len(lens_q), hq),
              validate=head_q == 0)   # cu_seqlens_q[0] > 0 (tokens before the first sequence) is not "valid"
    out, lse = transformer.flash_attention_varlen(q, k, v, cu_q, cu_k, mq, mk, return_lse=True,
                                                  deterministic=deterministic, backend=backend, **kw)
    ref, ref_lse = reference.attention_varlen(q, k, v, cu_q, cu_k, mq, mk, return_lse=True, **kw)
    low, low_lse = reference.attention_varlen(q, k, v, cu_q, cu_k, mq, mk, return_lse=True, compute_dtype=None,
                                              **kw)
    config = f"{case} deterministic={deterministic}"
    helpers.assert_close(out, ref, low, config=config)
    g = torch.Generator().manual_seed(3)
    dout = torch.randn(out.shape, generator=g).to(out.dtype)
    dlse = torch.randn(lse.shape, generator=g) if lse_grad else None
    got = _grads((out, lse), (q, k, v), (dout, dlse))
    _compare(got, _grads((ref, ref_lse), (q, k, v), (dout.float(), dlse)),
             _grads((low, low_lse), (q, k, v), (dout, None if dlse is None else dlse.to(low_lse.dtype))), config)
    dq, dk, dv = got
    # tokens in no sequence: exactly zero gradients
    assert not dq[:head_q].any() and not dq[q.shape[0] - tail_q:].any(), config
    assert not dk[k.shape[0] - tail_k:].any() and not dv[k.shape[0] - tail_k:].any(), config


# ---------------------------------------------------------------------------------------------
# Exact zeros, determinism, the op schema
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BOTH)
@pytest.mark.parametrize("deterministic", MODES)
def test_fully_masked_rows_have_zero_gradients(backend, deterministic):
    """Causal, bottom-right, Nq > Nk: the first Nq - Nk queries see no key, their dq is exactly 0. Causal,
    top-left, Nk > Nq: keys past the last query are seen by none, their dk and dv are exactly 0."""
    helpers.require_backend(backend)
    q, k, v = _inputs(1, 150, 61, 4, 2, 64, BF16, seed=9)
    out = transformer.flash_attention(q, k, v, causal=True, deterministic=deterministic, backend=backend)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert torch.equal(dq[:, :89], torch.zeros_like(dq[:, :89])) and dq[:, 89:].abs().sum() > 0
    q, k, v = _inputs(1, 30, 90, 2, 2, 40, FP16, seed=11)
    out = transformer.attention.attention(q, k, v, causal=True, causal_align="top_left",
                                          deterministic=deterministic, backend=backend)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert not dk[:, 30:].any() and not dv[:, 30:].any() and dk[:, :30].abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_is_bit_identical(backend):
    """deterministic=True: two backward runs give the same bits (GQA, window, ALiBi, dlse, varlen)."""
    helpers.require_backend(backend)
    q, k, v = _inputs(2, 113, 150, 6, 2, 80, BF16, seed=13)
    alibi = _alibi("h", 2, 6)
    g = torch.Generator().manual_seed(1)
    dout = torch.randn(q.shape, generator=g).to(q.device, q.dtype)
    dlse = torch.randn(2, 6, 113, generator=g).to(q.device)
    runs = []
    for _ in range(2):
        out, lse = transformer.flash_attention(q, k, v, causal=True, window_size=(50, -1), alibi_slopes=alibi,
                                               deterministic=True, return_lse=True, backend=backend)
        runs.append(torch.autograd.grad((out, lse), (q, k, v), (dout, dlse)))
    vq, vk, vv, cu_q, cu_k, mq, mk = _varlen([1, 113, 0], [70, 239, 3], 4, 2, 64, FP16, tail_q=2)
    for _ in range(2):
        out = transformer.flash_attention_varlen(vq, vk, vv, cu_q, cu_k, mq, mk, causal=True, deterministic=True,
                                                 backend=backend)
        runs.append(torch.autograd.grad(out, (vq, vk, vv), torch.ones_like(out)))
    for a, b in ((runs[0], runs[1]), (runs[2], runs[3])):
        for name, x, y in zip(("dq", "dk", "dv"), a, b):
            assert torch.equal(x.view(torch.int16), y.view(torch.int16)), f"{name} differs between two runs"


def test_triton_ops_take_deterministic():
    """The Triton ops end in `deterministic` (schema default False) and pass opcheck with either value; so do the
    CUDA backend's (tileformer, tileformer_emu: the shared schema with the same trailing argument)."""
    helpers.require_backend("triton")
    from transformer._triton import attention as tka
    from transformer.ops import attention as contract
    assert contract._declares_deterministic(torch.ops.tileformer_triton.attn_fwd)
    assert contract._declares_deterministic(torch.ops.tileformer_triton.attn_bwd)
    for ns in ("tileformer", "tileformer_emu"):
        ops = getattr(torch.ops, ns, None)
        if ops is not None and hasattr(ops, "attn_bwd"):
            assert contract._declares_deterministic(ops.attn_fwd) and contract._declares_deterministic(ops.attn_bwd)
    q, k, v = (t.detach() for t in _inputs(1, 20, 33, 2, 1, 32, FP16, seed=23))
    args = (q, k, v, None, None, None, 20, 33, 32 ** -0.5, -1, 0, 0.0, True)
    out, lse = tka.attn_fwd(*args)
    dout = torch.randn_like(out)
    for det in (False, True):
        torch.library.opcheck(tka.attn_fwd, args + (det,))
        torch.library.opcheck(tka.attn_bwd, (dout, q, k, v, out, lse, None) + args[3:] + (det,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_graph_passes_the_flag(backend):
    """Under torch.compile(fullgraph=True) the flag still reaches the backward: deterministic=True gives the
    eager deterministic gradients bit for bit."""
    helpers.require_backend(backend)
    q, k, v = _inputs(1, 40, 50, 2, 1, 32, FP16, seed=21)

    def f(q, k, v):
        out = transformer.flash_attention(q, k, v, causal=True, deterministic=True, backend=backend)
        return out.float().square().sum()

    compiled = torch.autograd.grad(torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, v), (q, k, v))
    eager = torch.autograd.grad(f(q, k, v), (q, k, v))
    for a, b in zip(compiled, eager):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# Executed tensor-core work (interpreter)
# ---------------------------------------------------------------------------------------------

def _count_backward(n, d, causal, deterministic):
    """FLOPs of every tl.dot the backward launcher executes (B = H = 1), from out / lse of the reference."""
    from triton_kernels import attention as kernels
    from triton_kernels._count import count_dots
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, n, 1, d, generator=g).half() for _ in range(3))
    out, lse = reference.attention(q, k, v, causal=causal, return_lse=True)
    dout = torch.randn(q.shape, generator=g).half()
    with count_dots() as dots:
        dq, dk, dv = kernels.backward(dout, q, k, v, out.half(), lse, None, None, None, None, n, n, d ** -0.5,
                                      -1, 0 if causal else -1, 0.0, True, deterministic=deterministic)
    assert all(torch.isfinite(t).all() for t in (dq, dk, dv))
    ideal = 2.5 * 4 * n * n * d / (2 if causal else 1)
    return dots.flops / ideal


interpret_only = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                    reason="counts the dots Triton's interpreter executes (TRITON_INTERPRET=1)")


@interpret_only
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_default_backward_flops_within_10_percent_of_ideal(causal):
    """N = 2048, D = 32: S, P, dP, dS once per tile pair (5 products); causal adds the diagonal tiles'
    masked halves."""
    ratio = _count_backward(2048, 32, causal, deterministic=False)
    assert ratio <= 1.1, f"backward executes {ratio:.4f}x the ideal FLOPs"


@interpret_only
def test_deterministic_backward_recomputes_in_the_dq_kernel():
    """The deterministic path runs 7 products per tile pair (the dQ kernel recomputes S and dP): 1.4x the
    ideal, exactly, where the tiles divide N and nothing is masked."""
    assert _count_backward(256, 32, False, deterministic=True) == pytest.approx(1.4)
    assert _count_backward(256, 32, False, deterministic=False) == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------
# Larger grid (-m slow)
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("deterministic", MODES)
@pytest.mark.parametrize("dtype", [FP16, BF16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("d", [40, 64, 80, 111, 128, 256])
@pytest.mark.parametrize("nq,nk", [(1, 239), (113, 239), (239, 113), (256, 512), (1023, 1024)])
def test_grid_slow(backend, nq, nk, d, heads, causal, dtype, deterministic):
    hq, hkv = HEADS[heads]
    q, k, v = _inputs(2, nq, nk, hq, hkv, d, dtype, seed=nq * 7 + d)
    _check_dense(q, k, v, deterministic=deterministic, causal=causal,
                 config=f"{nq}x{nk} d{d} {heads} causal={causal} {dtype} deterministic={deterministic}")


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("deterministic", MODES)
@pytest.mark.parametrize("feature", ["window", "alibi", "softcap", "top_left", "dlse", "all"])
@pytest.mark.parametrize("d", [64, 111, 128, 256])
def test_features_slow(backend, d, feature, deterministic):
    q, k, v = _inputs(2, 300, 517, 6, 2, d, BF16, seed=d)
    kw = dict(causal=feature in ("alibi", "top_left", "all"))
    if feature in ("window", "all"):
        kw["window_size"] = (100, 37)
    if feature in ("alibi", "all"):
        kw["alibi_slopes"] = _alibi("bh", 2, 6)
    if feature in ("softcap", "all"):
        kw["softcap"] = 10.0
    if feature in ("top_left", "all"):
        kw["causal_align"] = "top_left"
    _check_dense(q, k, v, deterministic=deterministic, lse_grad=feature in ("dlse", "all"),
                 config=f"d{d} {feature} deterministic={deterministic}", **kw)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("deterministic", MODES)
@pytest.mark.parametrize("d", [64, 111, 128, 256])
def test_varlen_slow(backend, d, deterministic):
    helpers.require_backend(backend)
    q, k, v, cu_q, cu_k, mq, mk = _varlen([1, 300, 0, 517, 1023], [239, 300, 5, 0, 1024], 6, 2, d, FP16,
                                          tail_q=9, tail_k=4, seed=d)
    out, lse = transformer.flash_attention_varlen(q, k, v, cu_q, cu_k, mq, mk, causal=True, return_lse=True,
                                                  deterministic=deterministic, backend=backend)
    ref, ref_lse = reference.attention_varlen(q, k, v, cu_q, cu_k, mq, mk, causal=True, return_lse=True)
    low, low_lse = reference.attention_varlen(q, k, v, cu_q, cu_k, mq, mk, causal=True, return_lse=True,
                                              compute_dtype=None)
    helpers.assert_close(out, ref, low)
    g = torch.Generator().manual_seed(5)
    dout, dlse = torch.randn(out.shape, generator=g).to(out.dtype), torch.randn(lse.shape, generator=g)
    _compare(_grads((out, lse), (q, k, v), (dout, dlse)), _grads((ref, ref_lse), (q, k, v), (dout.float(), dlse)),
             _grads((low, low_lse), (q, k, v), (dout, dlse.to(low_lse.dtype))), f"varlen d{d}")


@pytest.mark.slow
@interpret_only
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_default_backward_flops_at_4096(causal):
    ratio = _count_backward(4096, 16, causal, deterministic=False)
    assert ratio <= 1.1, f"backward executes {ratio:.4f}x the ideal FLOPs"
