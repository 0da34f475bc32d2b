"""The Triton forward's paths: the portable kernel (attention_fwd.py) and the sm_90 tensor-descriptor kernel
(attention_fwd_tma.py: TMA loads/stores, with a warp-specialized key loop or pipelined ones).

On a CPU machine the descriptor kernel runs through the interpreter when TILEFORMER_TRITON_ATTN_FWD forces it
("tma": three key loops, masked only at band edges; "tma_ws": the single masked loop the warp-specialized
variant compiles), and is checked exactly like the portable one (tests/test_attention.py): the flash-attn
tolerance rule against the fp32 reference, outputs poisoned with NaN before the kernel writes them, odd sizes,
every feature, fp16 and bf16, forward and (through the backward kernels) gradients. On a GPU the same tests run
the compiled kernel, and test_every_shipped_config runs each sm_90 config of the autotune lists on its own.
"""
from __future__ import annotations

import itertools

import pytest
import torch

import transformer
from transformer import reference

import helpers

triton = pytest.importorskip("triton")
from triton_kernels import attention as kernels  # noqa: E402

BACKENDS = helpers.kernel_backends("triton")
FP16, BF16 = torch.float16, torch.bfloat16
HEADS = {"mha": (2, 2), "gqa": (6, 2), "mqa": (4, 1)}
TMA_PATHS = ["tma", "tma_ws"]
ENV = kernels.FWD_PATH_ENV
# Where a forced descriptor path can run: the interpreter, or an sm_90 GPU; with a Triton that has descriptors.
TMA_HERE = kernels.HAS_TENSOR_DESCRIPTORS and (not helpers.HAS_GPU or kernels._arch(helpers.DEVICE) == 90)


@pytest.fixture
def path(request, monkeypatch):
    """Force the forward path named by the test's parameter."""
    monkeypatch.setenv(ENV, request.param)
    if request.param == "tma_ws" and not kernels.HAS_WARP_SPECIALIZE:
        pytest.skip(f"triton {triton.__version__}'s tl.range has no warp_specialize")
    if not TMA_HERE:
        pytest.skip("the descriptor forward needs tensor descriptors and, on a GPU, sm_90")
    return request.param


@pytest.fixture
def launches(monkeypatch):
    """Counts the forward launches of each path (the descriptor kernel's autotuner is built per call)."""
    counts = {"tma": 0, "portable": 0}
    tuned_tma, tuned = kernels._tuned_fwd_tma, kernels._kernel

    def spy_tma(*args):
        counts["tma"] += 1
        return tuned_tma(*args)

    def spy(which, *args):
        counts["portable"] += which == "fwd"
        return tuned(which, *args)

    monkeypatch.setattr(kernels, "_tuned_fwd_tma", spy_tma)
    monkeypatch.setattr(kernels, "_kernel", spy)
    return counts


def _inputs(b, nq, nk, hq, hkv, d, dtype, *, seed=0, layout="bshd"):
    g = torch.Generator().manual_seed(seed)

    def make(n, h):
        if layout == "bhsd":
            t = torch.randn(b, h, n, d, generator=g).to(helpers.DEVICE, dtype).transpose(1, 2)
        else:
            t = torch.randn(b, n, h, d, generator=g).to(helpers.DEVICE, dtype)
        return t.requires_grad_(True)

    return make(nq, hq), make(nk, hkv), make(nk, hkv)


def _alibi(kind, b, hq):
    if kind is None:
        return None
    g = torch.Generator().manual_seed(1)
    return (torch.rand(*((hq,) if kind == "h" else (b, hq)), generator=g) * 0.5 + 0.05).to(helpers.DEVICE)


def _grads_close(out, ref, low, inputs, config, lse=None, ref_lse=None, low_lse=None):
    """Gradients of (out, and lse when given) against the fp32 and same-dtype references (factor 3)."""
    g = torch.Generator().manual_seed(7)
    dout = torch.randn(out.shape, generator=g).to(out.device, out.dtype)
    outs, refs, lows, gouts = [out], [ref], [low], [dout]
    if lse is not None:
        dlse = torch.randn(lse.shape, generator=g).to(lse.device)
        outs, refs, lows, gouts = outs + [lse], refs + [ref_lse], lows + [low_lse], gouts + [dlse]
    got = torch.autograd.grad(outs, inputs, gouts)
    want = torch.autograd.grad(refs, inputs, [t.float() for t in gouts])
    base = torch.autograd.grad(lows, inputs, [t.to(r.dtype) for t, r in zip(gouts, lows)])
    for name, a, r, rl in zip(("dq", "dk", "dv"), got, want, base):
        assert torch.isfinite(a).all(), f"{name} has non-finite values [{config}]"
        helpers.assert_close(a, r, rl, factor=3.0, name=name, config=config)


def _check(q, k, v, *, grads=True, lse_grad=False, config="", **kw):
    """Forward (out, lse) vs the references, then the gradients through the backward kernels."""
    helpers.require_backend("triton")
    out, lse = transformer.flash_attention(q, k, v, return_lse=True, backend="triton", **kw)
    ref, ref_lse = reference.attention(q, k, v, return_lse=True, **kw)
    low, low_lse = reference.attention(q, k, v, return_lse=True, compute_dtype=None, **kw)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == (q.shape[0], q.shape[2], q.shape[1])
    helpers.assert_close(out, ref, low, name="out", config=config)
    helpers.assert_close(lse, ref_lse, low_lse.float(), name="lse", config=config)
    if grads:
        extra = (lse, ref_lse, low_lse) if lse_grad else ()
        _grads_close(out, ref, low, (q, k, v), config, *extra)
    return out, lse


# ---------------------------------------------------------------------------------------------
# Every feature, odd sizes, both dtypes: forward and gradients
# ---------------------------------------------------------------------------------------------

# (b, nq, nk, heads, d, dtype, causal, window, softcap, alibi)
CASES = [
    (1, 1, 239, "mha", 64, FP16, True, (-1, -1), 0.0, None),
    (1, 113, 239, "mqa", 40, BF16, False, (-1, -1), 0.0, None),
    (1, 128, 217, "gqa", 80, FP16, True, (-1, -1), 0.0, None),
    (1, 108, 256, "mha", 111, BF16, False, (40, 13), 0.0, None),
    (2, 203, 77, "mha", 64, FP16, True, (-1, -1), 0.0, None),        # Nq > Nk: rows that see no key
    (1, 97, 65, "mha", 256, BF16, True, (-1, -1), 0.0, None),
    (1, 130, 141, "mha", 128, FP16, False, (-1, -1), 3.0, "h"),
    (2, 70, 90, "mqa", 64, BF16, True, (17, -1), 0.0, "bh"),
    (1, 150, 111, "gqa", 32, FP16, False, (0, 30), 5.0, "h"),        # window with right < left, softcap + ALiBi
    (1, 239, 113, "gqa", 16, BF16, False, (5, 5), 0.0, None),
    (1, 59, 71, "mqa", 59, FP16, True, (9, -1), 2.0, "h"),           # head dim not a multiple of 8: padded
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
@pytest.mark.parametrize("path", TMA_PATHS, indirect=True)
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_forward_backward(backend, path, case, launches):
    b, nq, nk, heads, d, dtype, causal, window, softcap, alibi = case
    hq, hkv = HEADS[heads]
    q, k, v = _inputs(b, nq, nk, hq, hkv, d, dtype, seed=nq + d)
    _check(q, k, v, causal=causal, window_size=window, softcap=softcap, alibi_slopes=_alibi(alibi, b, hq),
           config=f"{path} {_case_id(case)}")
    assert launches == {"tma": 1, "portable": 0}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", TMA_PATHS, indirect=True)
def test_lse_gradient_strided_bhsd(backend, path, launches):
    """[B, H, N, D] tensors transposed to [B, N, H, D] (strides multiples of 16 bytes) take the descriptor
    path in place; a loss on the returned lse differentiates through the backward."""
    q, k, v = _inputs(2, 67, 85, 4, 2, 64, BF16, layout="bhsd", seed=11)
    assert not q.is_contiguous()
    _check(q, k, v, causal=True, lse_grad=True, config=f"{path} bhsd lse-grad")
    assert launches == {"tma": 1, "portable": 0}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", TMA_PATHS, indirect=True)
def test_top_left_alignment(backend, path):
    """The SDPA drop-in's is_causal (top-left) with ALiBi, through the descriptor forward."""
    helpers.require_backend(backend)
    impl = transformer.backends.select("flash_attention", transformer.attention._describe(
        *(t.detach() for t in _inputs(1, 2, 2, 1, 1, 16, FP16))), backend)[1]
    q, k, v = _inputs(1, 90, 60, 2, 2, 64, FP16, seed=17)
    kw = dict(causal=True, softmax_scale=64 ** -0.5, window_size=(-1, -1), alibi_slopes=_alibi("h", 1, 2),
              softcap=0.0, causal_align="top_left")
    out, lse = impl(q, k, v, deterministic=False, return_lse=True, **kw)
    ref, ref_lse = reference.attention(q, k, v, return_lse=True, **kw)
    low, low_lse = reference.attention(q, k, v, return_lse=True, compute_dtype=None, **kw)
    helpers.assert_close(out, ref, low, config="top_left")
    helpers.assert_close(lse, ref_lse, low_lse.float(), name="lse", config="top_left")
    _grads_close(out, ref, low, (q, k, v), "top_left")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", TMA_PATHS, indirect=True)
def test_empty_rows_and_no_keys(backend, path):
    """Causal with Nq > Nk: the first Nq - Nk queries see no key -> out 0, lse -inf; Nk = 0: all of them."""
    helpers.require_backend(backend)
    q, k, v = _inputs(1, 70, 20, 2, 1, 64, FP16, seed=3)
    out, lse = transformer.flash_attention(q, k, v, causal=True, return_lse=True, backend=backend)
    assert torch.equal(out[:, :50], torch.zeros_like(out[:, :50]))
    assert torch.isneginf(lse[:, :, :50]).all() and torch.isfinite(lse[:, :, 50:]).all()
    q, k, v = _inputs(2, 5, 0, 2, 2, 64, BF16)
    out, lse = transformer.flash_attention(q, k, v, return_lse=True, backend=backend)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_bits_as_portable(backend, monkeypatch):
    """Under the interpreter the three kernels visit the same tiles in the same order with the same arithmetic:
    the descriptor forward (either loop structure) gives the portable forward's bits."""
    helpers.require_backend(backend)
    if helpers.HAS_GPU:
        pytest.skip("compiled kernels tune their own tiles")
    q, k, v = (t.detach() for t in _inputs(1, 100, 130, 4, 2, 80, BF16, seed=29))
    kw = dict(causal=True, window_size=(50, -1), alibi_slopes=_alibi("h", 1, 4), softcap=4.0, return_lse=True)
    paths = [p for p in TMA_PATHS if p == "tma" or kernels.HAS_WARP_SPECIALIZE]
    runs = {}
    for p in ["portable"] + paths:
        monkeypatch.setenv(ENV, p)
        runs[p] = transformer.flash_attention(q, k, v, backend=backend, **kw)
    for p in paths:
        assert torch.equal(runs[p][0], runs["portable"][0]) and torch.equal(runs[p][1], runs["portable"][1]), p


# ---------------------------------------------------------------------------------------------
# Varlen: one descriptor per sequence (boxes past its end read zeros, stores are clipped to it)
# ---------------------------------------------------------------------------------------------

def _varlen_inputs(lens_q, lens_k, hq, hkv, d, dtype, *, tail_q=0, tail_k=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    cu_q = torch.tensor([0] + list(itertools.accumulate(lens_q)), dtype=torch.int32, device=helpers.DEVICE)
    cu_k = torch.tensor([0] + list(itertools.accumulate(lens_k)), dtype=torch.int32, device=helpers.DEVICE)

    def make(n, h):
        return torch.randn(n, h, d, generator=g).to(helpers.DEVICE, dtype).requires_grad_(True)

    tq, tk = sum(lens_q) + tail_q, sum(lens_k) + tail_k
    return make(tq, hq), make(tk, hkv), make(tk, hkv), cu_q, cu_k, max(lens_q), max(lens_k)


VARLEN_CASES = [
    # (lens_q, lens_k, heads, d, dtype, causal, window, alibi, tails)
    ([1, 67, 130, 9], [1, 90, 130, 40], "gqa", 64, FP16, True, (-1, -1), None, (0, 0)),
    ([33, 1, 100], [80, 17, 1], "mqa", 80, BF16, False, (20, 5), "bh", (3, 2)),   # tokens past cu[-1]
    ([50, 0, 70], [64, 5, 0], "mha", 40, FP16, True, (-1, -1), "h", (0, 0)),      # empty sequences
    ([113, 239], [239, 113], "mha", 111, BF16, False, (-1, -1), None, (0, 0)),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", TMA_PATHS, indirect=True)
@pytest.mark.parametrize("case", VARLEN_CASES, ids=["gqa-causal", "mqa-window-alibi-tail", "empty-seqs", "d111"])
def test_varlen(backend, path, case, launches):
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
    config = f"{path} {case}"
    helpers.assert_close(out, ref, low, config=config)
    helpers.assert_close(lse, ref_lse, low_lse, name="lse", config=config)
    _grads_close(out, ref, low, (q, k, v), config)
    assert launches == {"tma": 1, "portable": 0}


# ---------------------------------------------------------------------------------------------
# Path selection: alignment, the environment variable, explain()
# ---------------------------------------------------------------------------------------------

def _misaligned(kind):
    """q, k, v fp16 [1, 20, 2, 64]: 'base' has q start 2 bytes past a 16-byte boundary, 'stride' has q rows
    65 elements apart (130 bytes); both keep a contiguous last dim and need no head-dim padding."""
    g = torch.Generator().manual_seed(5)
    k, v = (torch.randn(1, 20, 2, 64, generator=g).to(helpers.DEVICE, FP16) for _ in range(2))
    if kind == "base":
        q = torch.randn(1 * 20 * 2 * 64 + 1, generator=g).to(helpers.DEVICE, FP16)[1:].view(1, 20, 2, 64)
    else:
        q = torch.randn(1, 20, 2, 65, generator=g).to(helpers.DEVICE, FP16)[..., :64]
    return q, k, v


@pytest.mark.parametrize("kind", ["base", "stride"])
def test_misaligned_inputs_take_the_portable_path(kind, monkeypatch, launches):
    """Descriptors need 16-byte aligned bases and strides: forced, the descriptor path refuses such inputs
    (ValueError saying why); under auto they run the portable kernel (on a GPU too), with the same results."""
    helpers.require_backend("triton")
    q, k, v = _misaligned(kind)
    assert q.stride(-1) == 1
    why = "not 16-byte aligned" if kind == "base" else "not a multiple of 16 bytes"
    for p in TMA_PATHS:
        monkeypatch.setenv(ENV, p)
        if not TMA_HERE or (p == "tma_ws" and not kernels.HAS_WARP_SPECIALIZE):
            continue
        with pytest.raises(ValueError, match=f"{ENV}={p}.*q .*{why}"):
            transformer.flash_attention(q, k, v, causal=True, backend="triton")
    monkeypatch.delenv(ENV)
    out = transformer.flash_attention(q, k, v, causal=True, backend="triton")
    ref = reference.attention(q, k, v, causal=True)
    helpers.assert_close(out, ref, reference.attention(q, k, v, causal=True, compute_dtype=None))
    assert launches["portable"] == 1 and launches["tma"] == 0
    assert kernels.forward_path(q.device, (("q", q),))[0] == "portable"


def test_bad_env_value(monkeypatch):
    helpers.require_backend("triton")
    monkeypatch.setenv(ENV, "fast")
    q, k, v = (t.detach() for t in _inputs(1, 9, 9, 2, 2, 32, FP16))
    with pytest.raises(ValueError, match=f"{ENV} must be one of .*'fast'"):
        transformer.flash_attention(q, k, v, backend="triton")
    with pytest.raises(ValueError, match=ENV):   # also a call with nothing to compute
        transformer.flash_attention(q[:, :0], k, v, backend="triton")


@pytest.mark.parametrize("env,expect", [("", None), ("portable", "portable forward"),
                                        ("tma", "sm_90 TMA forward"), ("tma_ws", "sm_90 TMA + warp-specialized")])
def test_explain_names_the_path(env, expect, monkeypatch):
    """backends.explain's triton line says which forward kernel serves the call."""
    helpers.require_backend("triton")
    monkeypatch.setenv(ENV, env)
    if env.startswith("tma") and (not TMA_HERE or (env == "tma_ws" and not kernels.HAS_WARP_SPECIALIZE)):
        expect = "the call raises"
    if expect is None:   # auto: sm_90 GPUs take the descriptor kernel, the interpreter and other GPUs not
        expect = "sm_90 TMA" if helpers.HAS_GPU and TMA_HERE else "portable forward"
    q, k, v = (t.detach() for t in _inputs(1, 9, 9, 2, 2, 32, FP16))
    text = transformer.backends.explain("flash_attention", q, k, v, causal=True, backend="triton")
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("triton:"))
    assert "selected (" in line and expect in line, text


def test_feature_detection_matches_triton():
    import inspect
    import triton.language as tl
    assert kernels.HAS_TENSOR_DESCRIPTORS == hasattr(tl, "make_tensor_descriptor")
    assert kernels.HAS_WARP_SPECIALIZE == ("warp_specialize" in inspect.signature(tl.range).parameters)


def test_config_lists():
    """Each (head-dim bucket, causal) list of the descriptor forward holds pipelined and warp-specialized entries
    (either forced path has configs), warp-specialized ones with 4 warps (the pass needs them), all distinct."""
    for d_bucket, per_causal in kernels._TMA_FWD_CONFIGS.items():
        for causal, entries in per_causal.items():
            assert entries and len(set(entries)) == len(entries), (d_bucket, causal)
            assert any(not e[4] for e in entries) and any(e[4] for e in entries), (d_bucket, causal)
            assert all(e[2] == 4 for e in entries if e[4]), (d_bucket, causal)


# ---------------------------------------------------------------------------------------------
# GPU: every shipped descriptor config on its own (the autotuner would run only the fastest)
# ---------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_every_shipped_config(d, causal, monkeypatch):
    if not helpers.HAS_GPU:
        pytest.skip("needs a CUDA GPU: compiled configs")
    if kernels._arch(helpers.DEVICE) != 90 or not kernels.HAS_TENSOR_DESCRIPTORS:
        pytest.skip("the descriptor forward runs on sm_90 with tensor descriptors")
    helpers.require_backend("triton")
    entries = [e for e in kernels._TMA_FWD_CONFIGS[d][causal] if kernels.HAS_WARP_SPECIALIZE or not e[4]]
    for bm, bn, w, s, ws in entries:
        cfg = triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "WARP_SPEC": ws}, num_warps=w, num_stages=s)
        one = triton.autotune(configs=[cfg], key=kernels._TUNE_KEYS)(kernels._attn_fwd_tma)
        monkeypatch.setattr(kernels, "_tuned_fwd_tma", lambda *args, one=one: one)
        monkeypatch.setenv(ENV, "tma_ws" if ws else "tma")
        name = f"d{d} causal={causal} M{bm} N{bn} w{w} s{s} ws={ws}"
        for nq, nk, dtype, extra in [(1023, 1024, BF16, {}), (113, 239, FP16, dict(window_size=(60, 7),
                                                                                  softcap=5.0))]:
            q, k, v = _inputs(2, nq, nk, 6, 2, d, dtype, seed=nq)
            kw = dict(causal=causal, alibi_slopes=_alibi("h", 2, 6), **extra)
            _check(q, k, v, grads=False, config=f"{name} {nq}x{nk}", **kw)
        lens = [1, 300, 517, 64]
        q, k, v, cu_q, cu_k, mq, mk = _varlen_inputs(lens, lens[::-1], 6, 2, d, FP16, tail_q=5, seed=d)
        out = transformer.flash_attention_varlen(q, k, v, cu_q, cu_k, mq, mk, causal=causal, backend="triton")
        ref = reference.attention_varlen(q, k, v, cu_q, cu_k, mq, mk, causal=causal)
        low = reference.attention_varlen(q, k, v, cu_q, cu_k, mq, mk, causal=causal, compute_dtype=None)
        helpers.assert_close(out, ref, low, config=f"{name} varlen")
