"""decode_attention kernels (triton and cuda, one API) vs transformer.reference.decode_attention.

Every case compares out and lse with the fp32 reference by the flash-attn rule (helpers.assert_close, the
same-dtype reference as the baseline) and, when k/v are appended, the cache contents after the call with the
reference's cache bit for bit. Cache slots past each sequence's length hold NaN, so a kernel that reads
beyond a sequence (or a page it does not own) fails. The default run covers a curated subset of the grid;
the full grid is `-m slow`.

    .venv/bin/python -m pytest tests/test_decode.py -q                # default subset + static report
    .venv/bin/python -m pytest tests/test_decode.py -q -m slow        # the full grid
"""
from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

import transformer
from helpers import (DEVICE, HAS_GPU, assert_close, bits, check_decode, kernel_backends, make_case, require_backend,
                     run_decode)

BACKENDS = kernel_backends("triton", "cuda")
DTYPES = (torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# Grid: contiguous / paged (1, 16, 64), ragged lengths incl. 0 and 1, groups, Sq, append, splits
# ---------------------------------------------------------------------------------------------

LAYOUTS = (None, 1, 16, 64)
GROUPS = (1, 4, 7, 8, 16)
SPLITS = (1, 3, 0)


def _grid_case(layout, group, sq, append, splits, dtype, d=64, hkv=2):
    lens = [0, 1, 77] if append else [1, 0, 130]
    return dict(lens=lens, sq=sq, hkv=hkv, group=group, d=d, dtype=dtype, page_size=layout, append=append), splits


# Default subset: every value of every axis at least once, mixed so pairs of axes vary together.
SUBSET = [
    # (layout, group, sq, append, splits, dtype, d)
    (None, 1, 1, False, 1, torch.float16, 64),
    (None, 4, 4, True, 3, torch.bfloat16, 80),
    (None, 7, 1, True, 0, torch.float16, 111),
    (1, 7, 4, True, 3, torch.bfloat16, 64),
    (1, 8, 1, False, 0, torch.float16, 40),
    (16, 8, 4, True, 1, torch.bfloat16, 128),
    (16, 16, 1, False, 3, torch.float16, 64),
    (64, 16, 4, True, 0, torch.bfloat16, 96),
    (64, 4, 1, False, 3, torch.float16, 64),
    (64, 1, 4, True, 3, torch.bfloat16, 256),
    (256, 8, 1, True, 0, torch.bfloat16, 64),
]


def _id(p):
    layout, group, sq, append, splits, dtype, d = p
    return (f"{'contig' if layout is None else f'page{layout}'}-g{group}-sq{sq}-{'append' if append else 'noappend'}"
            f"-splits{splits}-{str(dtype)[6:]}-d{d}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("params", SUBSET, ids=[_id(p) for p in SUBSET])
def test_decode_subset(backend, params):
    require_backend(backend)
    layout, group, sq, append, splits, dtype, d = params
    kw, splits = _grid_case(layout, group, sq, append, splits, dtype, d=d)
    check_decode(backend, make_case(**kw), config=_id(params), num_splits=splits)


FULL = list(itertools.product(LAYOUTS, GROUPS, (1, 4), (False, True), SPLITS, DTYPES, (64,)))


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("params", FULL, ids=[_id(p) for p in FULL])
def test_decode_grid(backend, params):
    require_backend(backend)
    layout, group, sq, append, splits, dtype, d = params
    kw, splits = _grid_case(layout, group, sq, append, splits, dtype, d=d)
    check_decode(backend, make_case(**kw), config=_id(params), num_splits=splits)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("group,sq", [(5, 16), (64, 2)], ids=["g5-sq16", "g64-sq2"])
def test_decode_many_rows(backend, group, sq):
    """group * Sq above the largest M tile: the rows are served by several M-blocks of one KV head."""
    require_backend(backend)
    case = make_case([3, 40], sq, 1, group, 64, torch.bfloat16, page_size=16, append=True, seed=5)
    check_decode(backend, case, config=f"g{group} sq{sq}", num_splits=3)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d", [40, 64, 80, 96, 111, 128, 160, 256])
@pytest.mark.parametrize("page_size", [None, 256])
def test_decode_head_dims_slow(backend, d, page_size):
    require_backend(backend)
    case = make_case([1, 239, 0], 3, 2, 5, d, torch.float16, page_size=page_size, append=True, seed=d)
    check_decode(backend, case, config=f"d{d} page{page_size}", num_splits=3)


# ---------------------------------------------------------------------------------------------
# Features: window, ALiBi, softcap, non-causal, custom scale
# ---------------------------------------------------------------------------------------------

FEATURES = {
    "window-left": dict(window_size=(20, -1)),
    "window-both-noncausal": dict(window_size=(9, 2), causal=False),
    "noncausal": dict(causal=False),
    "alibi-h": dict(alibi_slopes="h"),
    "alibi-bh-window": dict(alibi_slopes="bh", window_size=(33, 0)),
    "softcap": dict(softcap=5.0, softmax_scale=0.3),
    "all": dict(softcap=2.0, alibi_slopes="h", window_size=(40, -1)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
def test_decode_features(backend, feature, dtype):
    require_backend(backend)
    kw = dict(FEATURES[feature])
    case = make_case([0, 1, 113], 4, 2, 4, 64, dtype, page_size=16, append=feature != "noncausal", seed=3)
    hq = case.q.shape[2]
    if kw.get("alibi_slopes") == "h":
        kw["alibi_slopes"] = torch.rand(hq, device=DEVICE) * 0.3
    elif kw.get("alibi_slopes") == "bh":
        kw["alibi_slopes"] = torch.rand(3, hq, device=DEVICE) * 0.3
    check_decode(backend, case, config=feature, num_splits=3, **kw)


def _widen(t, step, off=0):
    """A non-contiguous view equal to t: every `step`-th head of a tensor twice as wide in the last dim,
    starting `off` elements in (off=1: rows not 16-byte aligned)."""
    wide = torch.zeros(*t.shape[:2], t.shape[2] * step, 2 * t.shape[3], dtype=t.dtype, device=t.device)
    wide[:, :, ::step, off: off + t.shape[3]] = t
    return wide[:, :, ::step, off: off + t.shape[3]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("page_size", [None, 16])
def test_decode_strided_inputs(backend, page_size):
    """Non-contiguous q, k/v and caches (views with a contiguous last dim, unaligned rows) give bit for bit
    the results and the appended cache of contiguous copies."""
    require_backend(backend)
    case = make_case([5, 70], 2, 2, 3, 64, torch.float16, page_size=page_size, append=True, seed=9)
    strided = dataclasses.replace(case, q=_widen(case.q, 2), k=_widen(case.k, 3), v=_widen(case.v, 2),
                                  k_cache=_widen(case.k_cache, 2), v_cache=_widen(case.v_cache, 3, off=1))
    assert not any(t.is_contiguous() for t in (strided.q, strided.k, strided.k_cache, strided.v_cache))
    kc_s, vc_s = strided.k_cache, strided.v_cache                     # run_decode() appends into clones: do it here
    out_s, lse_s = transformer.decode_attention(strided.q, kc_s, vc_s, case.cache_seqlens, k=strided.k,
                                                v=strided.v, block_table=case.block_table, num_splits=3,
                                                return_lse=True, backend=backend)
    out_c, lse_c, kc_c, vc_c = run_decode(backend, case, num_splits=3)
    assert torch.equal(out_s, out_c) and torch.equal(lse_s, lse_c)
    assert torch.equal(bits(kc_s), bits(kc_c)) and torch.equal(bits(vc_s), bits(vc_c))


# ---------------------------------------------------------------------------------------------
# Splits: combine vs unsplit, determinism, empty sequences
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("page_size", [None, 16])
def test_decode_split_matches_unsplit(backend, page_size):
    """The log-sum-exp combine of 1, 2, 3 and 7 splits agrees with the unsplit kernel within rounding."""
    require_backend(backend)
    case = make_case([200, 1, 64, 0], 1, 2, 8, 64, torch.bfloat16, page_size=page_size, append=False, seed=4)
    out1, lse1, _, _ = run_decode(backend, case, num_splits=1)
    ref, ref_lse, _, _ = run_decode("reference", case)
    low, _, _, _ = run_decode("reference_lowp", case)
    rounding = float((low.float() - ref).abs().max())                # one rounding step of the output dtype
    for splits in (2, 3, 7):
        out, lse, _, _ = run_decode(backend, case, num_splits=splits)
        assert float((out.float() - out1.float()).abs().max()) <= rounding, f"num_splits={splits}"
        fin = torch.isfinite(lse1)
        assert torch.equal(fin, torch.isfinite(lse))
        assert float((lse - lse1)[fin].abs().max()) <= 1e-5 * (1 + float(ref_lse[fin].abs().max()))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("splits", [1, 3, 0])
def test_decode_deterministic(backend, splits):
    require_backend(backend)
    case = make_case([150, 7, 0], 4, 2, 7, 80, torch.float16, page_size=16, append=True, seed=6)
    a = run_decode(backend, case, num_splits=splits)
    b = run_decode(backend, case, num_splits=splits)
    for x, y in zip(a, b):
        assert torch.equal(bits(x), bits(y))


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_empty_sequences(backend):
    """Length-0 sequences (and queries before the first key) give out 0 and lse -inf, never NaN."""
    require_backend(backend)
    case = make_case([0, 0, 2], 4, 1, 2, 64, torch.float16, append=False, seed=7)
    out, lse = check_decode(backend, case, num_splits=3)
    assert torch.equal(out[:2], torch.zeros_like(out[:2])) and bool(torch.isneginf(lse[:2]).all())
    assert bool(torch.isneginf(lse[2, :, :2]).all()) and not bool(torch.isnan(out).any())


def test_pick_num_splits():
    from triton_kernels.decode import MAX_SPLITS, pick_num_splits
    assert pick_num_splits(64, 8, 1, 4096, 64, 132) == 1                 # enough programs already
    assert pick_num_splits(1, 8, 1, 128, 64, 132) == 1                   # too short to split
    s = pick_num_splits(1, 8, 1, 65536, 64, 132)
    assert 8 <= s <= MAX_SPLITS and (8 * s) / 132 > 0.8 * -(-(8 * s) // 132)   # fills most of the waves
    assert pick_num_splits(1, 8, 1, 65536, 64, 132) == s                 # a function of shapes only


# ---------------------------------------------------------------------------------------------
# Bad input, no-grad, custom op / torch.compile, static report
# ---------------------------------------------------------------------------------------------

def _bad_calls():
    ok = make_case([3, 5], 1, 2, 2, 64, torch.float16, page_size=16, append=True)
    bt64 = ok.block_table.long()
    return {
        "block_table dtype": (TypeError, "block_table", dict(block_table=bt64)),
        "k_cache head dim": (ValueError, "k_cache", dict(k_cache=ok.k_cache[..., :32], v_cache=ok.v_cache[..., :32])),
        "v_cache shape": (ValueError, "v_cache", dict(v_cache=ok.v_cache[:, :8])),
        "Hq % Hkv": (ValueError, "k_cache", dict(q=ok.q[:, :, :3])),
        "Sq > 16": (ValueError, "^q must", dict(q=ok.q.expand(2, 17, 4, 64), k=None, v=None)),
        "k shape": (ValueError, "^k must", dict(k=ok.k[:, :, :1], v=ok.v[:, :, :1])),
        "cache too small": (ValueError, r"too few to append .*\(k\)", dict(q=ok.q.expand(2, 8, 4, 64), k=ok.k.expand(2, 8, 2, 64),
                                                   v=ok.v.expand(2, 8, 2, 64), block_table=ok.block_table[:, :0])),
        "cache_seqlens dtype": (TypeError, "cache_seqlens", dict(cache_seqlens=ok.cache_seqlens.long())),
        "num_splits": (ValueError, "num_splits", dict(num_splits=-1)),
        "num_splits too many": (ValueError, "num_splits", dict(num_splits=129)),
        "float32": (ValueError, "float32", dict(q=ok.q.float(), k_cache=ok.k_cache.float(), v_cache=ok.v_cache.float(),
                                                k=ok.k.float(), v=ok.v.float())),
    }, ok


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("what", list(_bad_calls()[0]))
def test_decode_bad_input(backend, what):
    require_backend(backend)
    calls, ok = _bad_calls()
    err, name, change = calls[what]
    kw = dict(q=ok.q, k_cache=ok.k_cache, v_cache=ok.v_cache, cache_seqlens=ok.cache_seqlens, k=ok.k, v=ok.v,
              block_table=ok.block_table)
    kw.update(change)
    with pytest.raises(err, match=name):
        transformer.decode_attention(kw.pop("q"), kw.pop("k_cache"), kw.pop("v_cache"), kw.pop("cache_seqlens"),
                                     backend=backend, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_rejects_grad(backend):
    require_backend(backend)
    case = make_case([3], 1, 1, 2, 64, torch.float16)
    q = case.q.clone().requires_grad_(True)
    with pytest.raises(ValueError, match="inference-only"):
        transformer.decode_attention(q, case.k_cache, case.v_cache, case.cache_seqlens, backend=backend)
    with torch.no_grad():                                              # fine without grad mode
        transformer.decode_attention(q, case.k_cache, case.v_cache, case.cache_seqlens, backend=backend)
    if backend != "triton":
        return
    from transformer._triton.decode import decode_attention as entry   # the entry function checks too
    with pytest.raises(ValueError, match="requires grad"):
        entry(q, case.k_cache, case.v_cache, case.cache_seqlens, k=None, v=None, block_table=None,
              softmax_scale=0.125, causal=True, window_size=(-1, -1), alibi_slopes=None, softcap=0.0,
              num_splits=1, return_lse=False)


def _op_args(case, append):
    return (case.q, case.k_cache.nan_to_num(), case.v_cache.nan_to_num(), case.cache_seqlens,
            case.k if append else None, case.v if append else None, case.block_table, None, 0.125, -1, 0, 0.0, 2)


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] == "triton"])
@pytest.mark.parametrize("append", [False, True])
def test_triton_opcheck(backend, append):
    require_backend(backend)
    import transformer._triton.decode  # noqa: F401  registers tileformer_triton::decode_attention
    case = make_case([3, 20], 2, 2, 4, 64, torch.float16, page_size=16, append=append)
    torch.library.opcheck(torch.ops.tileformer_triton.decode_attention.default, _op_args(case, append))


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] == "triton"])
def test_triton_torch_compile(backend):
    """torch.compile(fullgraph=True) traces the entry function (custom op + fake impl), same numbers as eager."""
    require_backend(backend)
    from transformer._triton.decode import decode_attention as entry
    case = make_case([3, 20], 2, 2, 4, 64, torch.float16, page_size=16, append=True)

    def step(q, kc, vc, lens, k, v, bt):
        return entry(q, kc, vc, lens, k=k, v=v, block_table=bt, softmax_scale=0.125, causal=True,
                     window_size=(-1, -1), alibi_slopes=None, softcap=0.0, num_splits=2, return_lse=True)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    kc1, vc1, kc2, vc2 = (t.clone() for t in (case.k_cache, case.v_cache) * 2)
    eager = step(case.q, kc1, vc1, case.cache_seqlens, case.k, case.v, case.block_table)
    comp = compiled(case.q, kc2, vc2, case.cache_seqlens, case.k, case.v, case.block_table)
    assert torch.equal(eager[0], comp[0]) and torch.equal(eager[1], comp[1])
    assert torch.equal(bits(kc1), bits(kc2)) and torch.equal(bits(vc1), bits(vc2))   # append kept in the graph

    def public_step(q, kc, vc, lens, k, v, bt):                        # the public op, dispatch included
        return transformer.decode_attention(q, kc, vc, lens, k=k, v=v, block_table=bt, num_splits=2,
                                            return_lse=True, backend=backend)

    torch._dynamo.reset()
    compiled = torch.compile(public_step, fullgraph=True, backend="aot_eager")
    kc3, vc3 = case.k_cache.clone(), case.v_cache.clone()
    comp = compiled(case.q, kc3, vc3, case.cache_seqlens, case.k, case.v, case.block_table)
    assert torch.equal(eager[0], comp[0]) and torch.equal(eager[1], comp[1]) and torch.equal(bits(kc1), bits(kc3))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="CUDA graph capture needs a CUDA GPU")
def test_triton_cuda_graph_capture():
    """A decode step (append + split-KV + combine, num_splits=0) is captured and replayed: no host sync."""
    case = make_case([100, 3000, 0, 17], 1, 8, 8, 128, torch.bfloat16, page_size=16, append=True, spare=64)
    kc, vc = case.k_cache.clone(), case.v_cache.clone()
    run_once = lambda: transformer.decode_attention(case.q, kc, vc, case.cache_seqlens, k=case.k, v=case.v,  # noqa
                                                    block_table=case.block_table, backend="triton")
    run_once()                                                          # compile and cache the SM count
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run_once()
    graph.replay()
    torch.cuda.synchronize()
    ref, _, _, _ = run_decode("reference", case)
    low, _, _, _ = run_decode("reference_lowp", case)
    assert_close(out, ref, low)


_STATIC_SCRIPT = """
import dataclasses, json, sys
from benchmarks.kernel_report import triton_report
from triton_kernels.decode import aot_configs
json.dump([dataclasses.asdict(s) for s in triton_report(configs=aot_configs())], sys.stdout)
"""


@pytest.mark.static
def test_triton_static_report():
    """Every shipped decode config compiles for sm_80 and sm_90 with 0 spills and shared memory within limits.

    Runs in a subprocess without TRITON_INTERPRET (this process has the interpreter's kernel objects)."""
    import json
    import os
    import subprocess
    import sys

    from benchmarks.kernel_report import SMEM_LIMIT, KernelStats, format_table
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _STATIC_SCRIPT], capture_output=True, text=True, env=env, cwd=root)
    assert res.returncode == 0, res.stderr[-3000:]
    stats = [KernelStats(**s) for s in json.loads(res.stdout)]
    table = format_table(stats)
    assert {s.arch for s in stats} == {80, 90}, table
    for s in stats:
        assert not s.error, f"{s.name} sm_{s.arch}: {s.error}\n{table}"
        assert s.spills == 0 and s.local_bytes == 0, f"{s.name} sm_{s.arch} spills\n{table}"
        assert 0 < s.registers <= 255 and s.smem <= SMEM_LIMIT[s.arch], table
    split = [s for s in stats if s.name.startswith("decode_split_kv")]
    assert all(s.instructions.get("mma.sync", 0) + s.instructions.get("wgmma", 0) > 0 for s in split), table
