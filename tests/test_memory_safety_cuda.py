"""Memory safety of the CUDA C++ kernels for any values in their index tensors (csrc/decode, csrc/attention).

The raw ops (torch.ops.tileformer[_emu].decode_attention / attn_fwd / attn_bwd: no value validation) get page
ids outside the cache, cache lengths past the capacity or negative or huge, cu_seqlens past the packed tokens,
negative, huge or non-monotone, and too small max_seqlen values. Each case checks the documented semantics
(csrc/decode/decode.h, csrc/attention/attention.h, transformer/_checks.py): bit for bit against the same call
with the invalid entries replaced by their meaning where one exists, else against the reference with
validate=False by the tolerance rule; caches untouched outside the valid positions.

The cases run in a subprocess (one for the module), so a crash fails the tests instead of killing pytest. On
a CPU machine that subprocess runs the emulated kernels with TILEFORMER_EMU_CHECK_BOUNDS=1: every global
load, store and cp.async of the kernels must fall inside one of the call's tensors, else the call raises
(common/gmem.h). The *_checks_live cases prove the check covers each op (a tensor left out of the registered
ones makes the op fail). On a GPU the same cases run on the hardware.

    .venv/bin/python -m pytest tests/test_memory_safety_cuda.py -q -n 0
    .venv/bin/python tests/test_memory_safety_cuda.py [case ...]     # the cases in this process
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import traceback

import pytest
import torch

HAS_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_GPU else "cpu")
INT_MAX, INT_MIN = 2**31 - 1, -2**31
RESULT = "@@memory-safety@@ "
CASES = {}


def case(fn):
    CASES[fn.__name__[len("case_"):]] = fn
    return fn


def _ops():
    from transformer import _cuda
    return _cuda.ops(DEVICE)


def _bits(t):
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


def _same(a, b, what):
    """Bit-identical (NaN == NaN)."""
    assert a.shape == b.shape and a.dtype == b.dtype, f"{what}: {a.shape}/{a.dtype} vs {b.shape}/{b.dtype}"
    assert torch.equal(_bits(a), _bits(b)), f"{what}: differs (max |diff| {float((a.float() - b.float()).abs().max())})"


def _finite(t, what):
    assert torch.isfinite(t).all(), f"{what}: {int((~torch.isfinite(t)).sum())} non-finite values"


def _emulated():
    return not HAS_GPU


# ---------------------------------------------------------------------------------------------
# Decode
# ---------------------------------------------------------------------------------------------

PAGE = 16


def _decode_case(lens, sq, group, *, paged, append, seed, spare=3, dtype=torch.float16):
    """A case (tests/helpers.make_case) whose empty cache slots hold random finite values, so a length past
    the written tokens reads numbers, not NaN."""
    import helpers
    c = helpers.make_case(lens, sq, 2, group, 64, dtype, page_size=PAGE if paged else None, append=append,
                          seed=seed, spare=spare)
    g = torch.Generator().manual_seed(seed + 100)
    for t in (c.k_cache, c.v_cache):
        fill = torch.randn(t.shape, generator=g).to(t.device, t.dtype)
        t.copy_(torch.where(torch.isnan(t), fill, t))
    return c


def _decode(c, lens=None, bt="same", append=True, splits=2, kv=None):
    """(out, lse, k_cache, v_cache) of the raw op on fresh cache copies (causal, scale 1/8)."""
    kc, vc = c.k_cache.clone(), c.v_cache.clone()
    k, v = kv if kv is not None else ((c.k, c.v) if append else (None, None))
    out, lse = _ops().decode_attention(c.q, kc, vc, c.cache_seqlens if lens is None else lens, k, v,
                                       c.block_table if isinstance(bt, str) else bt, None, 0.125, -1, 0, 0.0, splits)
    return out, lse, kc, vc


def _decode_ref(c, lens, bt, append, compute_dtype=torch.float32):
    from transformer import reference
    kc, vc = c.k_cache.clone(), c.v_cache.clone()
    out, lse = reference.decode_attention(c.q, kc, vc, lens, k=c.k if append else None, v=c.v if append else None,
                                          block_table=bt, softmax_scale=0.125, causal=True, return_lse=True,
                                          compute_dtype=compute_dtype, validate=False)
    return out, lse, kc, vc


def _check_vs_reference(got, c, lens, bt, append, config):
    """out / lse by the tolerance rule against the fp32 reference with validate=False; caches bit for bit."""
    from transformer.testing import assert_close
    out, lse, kc, vc = got
    ref, ref_lse, ref_kc, ref_vc = _decode_ref(c, lens, bt, append)
    low, low_lse, _, _ = _decode_ref(c, lens, bt, append, compute_dtype=None)
    assert_close(out, ref, low, name="out", config=config)
    assert_close(lse, ref_lse, low_lse.float(), name="lse", config=config)
    _same(kc, ref_kc, f"k_cache [{config}]")
    _same(vc, ref_vc, f"v_cache [{config}]")


# (group, sq): the CUDA-core kernel (group * sq <= 4) and the tensor-core kernel
DECODE_PATHS = {"simt": (1, 2), "mma": (4, 2)}


def _invalid_pages_case(path, append):
    group, sq = DECODE_PATHS[path]
    c = _decode_case([40, 70, 5], sq, group, paged=True, append=append, seed=3 + group)
    num_pages, used = c.k_cache.shape[0], c.block_table.shape[1]
    bt = c.block_table.clone()
    bt[0, 1] = num_pages             # tokens 16..31 of sequence 0
    bt[1, 0] = num_pages + 1000      # tokens 0..15 of sequence 1
    bt[1, 3] = -1                    # tokens 48..63
    bt[1, 4] = INT_MAX               # tokens 64..69 (+ the appended ones at 70, 71)
    bt[2, 0] = -1                    # every token of sequence 2 (and its appends)
    assert used >= 6
    lens = c.cache_seqlens
    got = _decode(c, bt=bt, append=append)
    _check_vs_reference(got, c, lens, bt, append, f"invalid pages {path} append={append}")
    _finite(got[0], "out")
    # Columns past what a sequence needs are never read: garbage there changes nothing.
    need = [(n + (sq if append else 0) + PAGE - 1) // PAGE for n in lens.tolist()]
    garbage, zeros = bt.clone(), bt.clone()
    for b, n in enumerate(need):
        garbage[b, n:] = torch.tensor([INT_MAX, -7, num_pages + 5, INT_MIN] * used, dtype=torch.int32)[: used - n]
        zeros[b, n:] = 0
    a, b_ = _decode(c, bt=garbage, append=append), _decode(c, bt=zeros, append=append)
    for x, y, what in zip(a, b_, ("out", "lse", "k_cache", "v_cache")):
        _same(x, y, f"{what}: garbage vs zero block_table columns past the sequence ({path})")


@case
def case_decode_invalid_pages_simt():
    _invalid_pages_case("simt", append=False)


@case
def case_decode_invalid_pages_mma_append():
    _invalid_pages_case("mma", append=True)


@case
def case_decode_invalid_pages_simt_append_one_split():
    group, sq = DECODE_PATHS["simt"]
    c = _decode_case([33, 1], sq, group, paged=True, append=True, seed=9)
    bt = c.block_table.clone()
    bt[0, 2] = c.k_cache.shape[0]    # the appended tokens 33, 34 of sequence 0 (page 2) are dropped
    bt[1, 0] = -1
    got = _decode(c, bt=bt, append=True, splits=1)
    _check_vs_reference(got, c, c.cache_seqlens, bt, True, "invalid pages simt append splits=1")


@case
def case_decode_empty_page_pool():
    """num_pages = 0: every page id is invalid; nothing is visible (out 0, lse -inf) and appends are dropped."""
    c = _decode_case([5, 40], 2, 4, paged=True, append=True, seed=12)
    empty = c.k_cache[:0]
    bt = torch.tensor([[0, 1, 2, 3], [-1, INT_MAX, 7, 0]], dtype=torch.int32, device=DEVICE)
    out, lse = _ops().decode_attention(c.q, empty, empty.clone(), c.cache_seqlens, c.k, c.v, bt, None, 0.125, -1, 0,
                                       0.0, 2)
    assert not out.any() and torch.isneginf(lse).all(), "an empty page pool must leave every query with no key"


def _seqlens_case(paged, append, path):
    group, sq = DECODE_PATHS[path]
    c = _decode_case([10, 10, 10, 10, 10], sq, group, paged=paged, append=append, seed=21 + paged)
    cap = c.block_table.shape[1] * PAGE if paged else c.k_cache.shape[1]
    lens = torch.tensor([cap + 5, -3, INT_MAX, INT_MIN, cap - 1], dtype=torch.int32, device=DEVICE)
    got = _decode(c, lens=lens, append=append)
    config = f"cache_seqlens {lens.tolist()} cap {cap} paged={paged} append={append} {path}"
    _check_vs_reference(got, c, lens, c.block_table, append, config)
    # Bit for bit: the same attention as the call without append and with the visible lengths, on the caches
    # the call left (appends at positions outside [0, capacity) dropped).
    sq_app = sq if append else 0
    visible = torch.tensor([min(max(n + sq_app, 0), cap) for n in lens.tolist()], dtype=torch.int32, device=DEVICE)
    eq = _decode(dataclasses.replace(c, k_cache=got[2], v_cache=got[3]), lens=visible, append=False)
    _same(got[0], eq[0], f"out vs clamped lengths [{config}]")
    _same(got[1], eq[1], f"lse vs clamped lengths [{config}]")


@case
def case_decode_seqlens_contiguous():
    _seqlens_case(paged=False, append=False, path="simt")


@case
def case_decode_seqlens_contiguous_append():
    _seqlens_case(paged=False, append=True, path="mma")


@case
def case_decode_seqlens_paged_append():
    _seqlens_case(paged=True, append=True, path="simt")


@case
def case_decode_seqlens_paged():
    _seqlens_case(paged=True, append=False, path="mma")


@case
def case_decode_strided_index_tensors():
    """cache_seqlens as x[::2], block_table column-major or a column slice: read through their strides."""
    c = _decode_case([21, 50, 3], 1, 4, paged=True, append=True, seed=31)
    base = _decode(c)
    wide = torch.full((2 * len(c.cache_seqlens),), 999, dtype=torch.int32, device=DEVICE)
    wide[::2] = c.cache_seqlens
    colmajor = c.block_table.t().contiguous().t()
    assert colmajor.stride(1) != 1
    sliced = torch.cat([c.block_table, torch.full_like(c.block_table, INT_MAX)], dim=1)[:, : c.block_table.shape[1]]
    for lens, bt, what in ((wide[::2], c.block_table, "cache_seqlens[::2]"), (c.cache_seqlens, colmajor, "column-major"),
                           (c.cache_seqlens, sliced, "block_table column slice")):
        got = _decode(c, lens=lens, bt=bt)
        for x, y, name in zip(got, base, ("out", "lse", "k_cache", "v_cache")):
            _same(x, y, f"{name} with {what}")


@case
def case_decode_checks_live():
    """Leaving k_cache out of the registered tensors makes the emulated decode kernels fail on its first
    read: the bounds check covers this op."""
    if not _emulated():
        pytest.skip("the bounds check is the emulator's (on a GPU run compute-sanitizer)")
    c = _decode_case([20], 1, 1, paged=True, append=False, seed=41)
    os.environ["TILEFORMER_EMU_CHECK_BOUNDS_EXCLUDE"] = "k_cache"
    try:
        _decode(c, append=False)
    except RuntimeError as e:
        msg = str(e)
        assert "out-of-bounds" in msg and "decode_simt_kernel" in msg and "nearest: " in msg, msg
    else:
        raise AssertionError("decode read k_cache without it being registered, and the check said nothing")
    finally:
        del os.environ["TILEFORMER_EMU_CHECK_BOUNDS_EXCLUDE"]


# ---------------------------------------------------------------------------------------------
# Varlen attention
# ---------------------------------------------------------------------------------------------

def _varlen_inputs(total_q, total_k, seed, hq=2, hkv=1, d=64, dtype=torch.float16):
    g = torch.Generator().manual_seed(seed)

    def mk(n, h):
        return torch.randn(n, h, d, generator=g).to(DEVICE, dtype)

    q, k, v = mk(total_q, hq), mk(total_k, hkv), mk(total_k, hkv)
    dout = mk(total_q, hq)
    return q, k, v, dout


def _cu(values):
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


def _attn(q, k, v, dout, cu_q, cu_k, max_q, max_k, causal=True, out_for_bwd=None, dropout=()):
    """(out, lse, dq, dk, dv) of the raw ops (bottom-right causal or full, scale 1/8); dropout: () or
    (deterministic, dropout_p, rng_state), the ops' trailing arguments."""
    ops = _ops()
    args = (None, _cu(cu_q), _cu(cu_k), max_q, max_k, 0.125, -1, 0 if causal else -1, 0.0, True, *dropout)
    out, lse = ops.attn_fwd(q, k, v, *args)
    o = out if out_for_bwd is None else out_for_bwd
    lse_b = lse if out_for_bwd is None else out_for_bwd.new_zeros(lse.shape, dtype=torch.float32)
    dq, dk, dv = ops.attn_bwd(dout, q, k, v, o, lse_b, None, *args)
    return out, lse, dq, dk, dv


NAMES = ("out", "lse", "dq", "dk", "dv")


def _same_all(got, want, config):
    for x, y, name in zip(got, want, NAMES):
        _same(x, y, f"{name} [{config}]")


@case
def case_varlen_cu_past_total():
    """The last cu_seqlens_k / cu_seqlens_q entry past the packed tokens reads as the end of the tokens."""
    q, k, v, dout = _varlen_inputs(50, 70, seed=1)
    got = _attn(q, k, v, dout, [0, 20, 50 + 9], [0, 30, 70 + 100], 40, 80)
    want = _attn(q, k, v, dout, [0, 20, 50], [0, 30, 70], 40, 80)
    _same_all(got, want, "cu past total")
    for t, name in zip(got, NAMES):
        _finite(t.exp() if name == "lse" else t, name)


@case
def case_varlen_strided_cu():
    """cu_seqlens as x[::2] views: read through their strides (as their contiguous values)."""
    q, k, v, dout = _varlen_inputs(30, 33, seed=8)
    ops = _ops()
    wide_q = torch.tensor([0, -9, 12, INT_MAX, 30, 7], dtype=torch.int32, device=DEVICE)
    wide_k = torch.tensor([0, 99, 20, -1, 33, 5], dtype=torch.int32, device=DEVICE)
    args = (None, wide_q[::2], wide_k[::2], 18, 20, 0.125, -1, 0, 0.0, True)
    out, lse = ops.attn_fwd(q, k, v, *args)
    got = (out, lse) + tuple(ops.attn_bwd(dout, q, k, v, out, lse, None, *args))
    _same_all(got, _attn(q, k, v, dout, [0, 12, 30], [0, 20, 33], 18, 20), "strided cu_seqlens")


@case
def case_varlen_cu_negative_and_huge():
    q, k, v, dout = _varlen_inputs(45, 60, seed=2)
    got = _attn(q, k, v, dout, [-50, 20, INT_MAX], [-7, 25, INT_MAX], 45, 60)
    want = _attn(q, k, v, dout, [0, 20, 45], [0, 25, 60], 45, 60)
    _same_all(got, want, "negative / huge cu")
    got = _attn(q, k, v, dout, [INT_MIN, 10, 10], [0, INT_MIN, 30], 45, 60, causal=False)
    want = _attn(q, k, v, dout, [0, 10, 10], [0, 0, 30], 45, 60, causal=False)
    _same_all(got, want, "INT_MIN cu")


@case
def case_varlen_no_sequence_at_all():
    """Every token outside every sequence (cu all huge, or all negative): out 0, lse -inf, gradients 0."""
    q, k, v, dout = _varlen_inputs(37, 41, seed=3)
    for cu_q, cu_k in (([INT_MAX, INT_MAX], [INT_MAX, INT_MAX]), ([-5, -1], [-9, -2]), ([10, 3], [0, 41])):
        out, lse, dq, dk, dv = _attn(q, k, v, dout, cu_q, cu_k, 64, 64)
        assert not out.any() and torch.isneginf(lse).all(), f"out / lse for {cu_q} {cu_k}"
        assert not dq.any() and not dk.any() and not dv.any(), f"gradients for {cu_q} {cu_k}"


@case
def case_varlen_non_monotone_no_overlap():
    """cu_seqlens_q = [0, 30, 10, 10]: sequence 1 is [30, 30), sequence 2 is [10, 10) (both empty), tokens
    30..39 are in no sequence; the same as [0, 30, 30, 30]."""
    q, k, v, dout = _varlen_inputs(40, 50, seed=4)
    got = _attn(q, k, v, dout, [0, 30, 10, 10], [0, 20, 40, 50], 30, 20)
    want = _attn(q, k, v, dout, [0, 30, 30, 30], [0, 20, 40, 50], 30, 20)
    _same_all(got, want, "non-monotone cu_seqlens_q")
    assert not got[0][30:].any() and torch.isneginf(got[1][:, 30:]).all() and not got[2][30:].any()
    assert not got[3][20:].any() and not got[4][20:].any()   # keys of the empty query sequences: gradient 0


@case
def case_varlen_overlapping_sequences():
    """cu_seqlens_q = [0, 30, 10, 40]: sequences 0 = [0, 30) and 2 = [10, 40) overlap on 10..29 (values there
    unspecified). Every value stays finite; the rows of one sequence only match the reference."""
    from transformer import reference
    from transformer.testing import assert_close
    q, k, v, dout = _varlen_inputs(40, 60, seed=5)
    cu_q, cu_k = [0, 30, 10, 40], [0, 20, 40, 60]
    got = _attn(q, k, v, dout, cu_q, cu_k, 30, 20)
    for t, name in zip(got, NAMES):
        _finite(t.exp() if name == "lse" else t, name)
    kw = {"causal": True, "return_lse": True, "validate": False}
    ref, ref_lse = reference.attention_varlen(q, k, v, _cu(cu_q), _cu(cu_k), **kw)
    low, low_lse = reference.attention_varlen(q, k, v, _cu(cu_q), _cu(cu_k), compute_dtype=None, **kw)
    alone = torch.cat([torch.arange(0, 10), torch.arange(30, 40)]).to(DEVICE)
    assert_close(got[0][alone], ref[alone], low[alone], config="overlap: rows of one sequence")
    assert_close(got[1][:, alone], ref_lse[:, alone], low_lse[:, alone], name="lse", config="overlap")


@case
def case_varlen_max_seqlen_too_small():
    """max_seqlen_q = 20 < 50, 70 and max_seqlen_k = 40 < 60, 90: queries 0..19 of each sequence are computed
    (as with the right max_seqlen), the others not (their rows of out / lse / dq unspecified; they contribute
    nothing to dk / dv); keys 0..39 get dk / dv; no access leaves the tensors."""
    lens_q, lens_k = [50, 70], [60, 90]
    cu_q, cu_k = [0, 50, 120], [0, 60, 150]
    q, k, v, dout = _varlen_inputs(120, 150, seed=6)
    got = _attn(q, k, v, dout, cu_q, cu_k, 20, 40)
    full = _attn(q, k, v, dout, cu_q, cu_k, max(lens_q), max(lens_k))
    dout_cut = dout.clone()
    for b in range(2):
        dout_cut[cu_q[b] + 20: cu_q[b + 1]] = 0
    cut = _attn(q, k, v, dout_cut, cu_q, cu_k, max(lens_q), max(lens_k))
    rows = torch.cat([torch.arange(cu_q[b], cu_q[b] + 20) for b in range(2)]).to(DEVICE)
    keys = torch.cat([torch.arange(cu_k[b], cu_k[b] + 40) for b in range(2)]).to(DEVICE)
    _same(got[0][rows], full[0][rows], "out of the computed queries")
    _same(got[1][:, rows], full[1][:, rows], "lse of the computed queries")
    _same(got[2][rows], full[2][rows], "dq of the computed queries")
    assert torch.equal(got[3][keys], cut[3][keys]), "dk: the gradient of the computed queries only"
    assert torch.equal(got[4][keys], cut[4][keys]), "dv: the gradient of the computed queries only"
    # max_seqlen_q = 0: no query computed; dk = dv = 0 for the keys the grid covers.
    _, _, _, dk, dv = _attn(q, k, v, dout, cu_q, cu_k, 0, 40, out_for_bwd=full[0])
    assert not dk[keys].any() and not dv[keys].any(), "max_seqlen_q = 0: dk, dv must be 0"


@case
def case_varlen_dropout_cu_past_total():
    """With dropout (either backward) too, cu_seqlens entries past the packed tokens read as the end of the tokens,
    and the rng_state read by every dropout kernel is a registered (checked) tensor."""
    q, k, v, dout = _varlen_inputs(50, 70, seed=2)
    rng = torch.tensor([0x1234_5678_9ABC, 77], dtype=torch.int64, device=DEVICE)
    for det in (False, True):
        drop = (det, 0.3, rng)
        got = _attn(q, k, v, dout, [0, 20, 50 + 9], [0, 30, 70 + 100], 40, 80, dropout=drop)
        want = _attn(q, k, v, dout, [0, 20, 50], [0, 30, 70], 40, 80, dropout=drop)
        for x, y, name in zip(got, want, NAMES):
            if det or name != "dq":   # the atomic dq may differ in its last bits from run to run
                _same(x, y, f"{name} [dropout cu past total, deterministic={det}]")
        for t, name in zip(got, NAMES):
            _finite(t.exp() if name == "lse" else t, name)
    if not _emulated():
        return
    os.environ["TILEFORMER_EMU_CHECK_BOUNDS_EXCLUDE"] = "rng_state"
    try:
        _attn(q, k, v, dout, [0, 20, 50], [0, 30, 70], 40, 80, dropout=(False, 0.3, rng))
    except RuntimeError as e:
        assert "out-of-bounds" in str(e) and "attn_fwd_kernel" in str(e), str(e)
    else:
        raise AssertionError("rng_state was read without being registered, and the check said nothing")
    finally:
        del os.environ["TILEFORMER_EMU_CHECK_BOUNDS_EXCLUDE"]


@case
def case_attn_checks_live():
    """Leaving k (forward) or dout (backward) out of the registered tensors makes the emulated kernels fail:
    the bounds check covers both ops."""
    if not _emulated():
        pytest.skip("the bounds check is the emulator's (on a GPU run compute-sanitizer)")
    q, k, v, dout = _varlen_inputs(20, 20, seed=7)
    for name, kernel in (("k", "attn_fwd_kernel"), ("dout", "attn_bwd_preprocess_kernel")):
        os.environ["TILEFORMER_EMU_CHECK_BOUNDS_EXCLUDE"] = name
        try:
            _attn(q, k, v, dout, [0, 20], [0, 20], 20, 20)
        except RuntimeError as e:
            assert "out-of-bounds" in str(e) and kernel in str(e), str(e)
        else:
            raise AssertionError(f"{name} was read without being registered, and the check said nothing")
        finally:
            del os.environ["TILEFORMER_EMU_CHECK_BOUNDS_EXCLUDE"]


# ---------------------------------------------------------------------------------------------
# The subprocess and the tests
# ---------------------------------------------------------------------------------------------

def _main(names):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    torch.set_num_threads(1)
    for name in names or list(CASES):
        try:
            CASES[name]()
            res = {"case": name, "status": "ok", "detail": ""}
        except pytest.skip.Exception as e:
            res = {"case": name, "status": "skip", "detail": str(e)}
        except BaseException:   # noqa: BLE001 -- any failure is the case's result
            res = {"case": name, "status": "fail", "detail": traceback.format_exc()}
        print(RESULT + json.dumps(res), flush=True)


@pytest.fixture(scope="module")
def results():
    env = dict(os.environ)
    env.update(TILEFORMER_EMU_CHECK_BOUNDS="1", TILEFORMER_POISON="1", PYTHONUNBUFFERED="1")
    env.pop("TILEFORMER_EMU_CHECK_BOUNDS_EXCLUDE", None)
    if not HAS_GPU:
        env["TILEFORMER_EMULATE_CUDA"] = "1"
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), *CASES], env=env, capture_output=True,
                          text=True, timeout=1800, check=False)
    found = {}
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT):
            r = json.loads(line[len(RESULT):])
            found[r["case"]] = r
    return found, proc


@pytest.mark.emulator
@pytest.mark.parametrize("name", list(CASES))
def test_memory_safety(results, name):
    import helpers
    helpers.require_backend("cuda")
    found, proc = results
    if name not in found:
        pytest.fail(f"the case subprocess exited with {proc.returncode} before reporting {name!r} (a crash?)\n"
                    f"stderr (tail):\n{proc.stderr[-4000:]}")
    r = found[name]
    if r["status"] == "skip":
        pytest.skip(r["detail"])
    assert r["status"] == "ok", r["detail"]


def test_case_subprocess_exits_cleanly(results):
    import helpers
    helpers.require_backend("cuda")
    found, proc = results
    assert proc.returncode == 0, f"exit code {proc.returncode}\nstderr (tail):\n{proc.stderr[-4000:]}"
    assert set(found) == set(CASES), f"cases without a result: {sorted(set(CASES) - set(found))}"


if __name__ == "__main__":
    _main(sys.argv[1:])
