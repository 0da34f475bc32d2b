"""CUDA C++ decode attention (csrc/decode/) beyond the shared grid of tests/test_decode.py.

tests/test_decode.py runs the whole decode grid against backend="cuda" too (through the host emulation on a
CPU machine). This file adds what is specific to the C++ kernels:

* CUDA-emulated vs Triton-interpreted agreement (out, lse, the appended caches bit for bit);
* both kernels (CUDA-core for group * Sq <= 4 rows per KV head, tensor-core above) at every instantiated
  head dim (64, 80, 96, 128, 256) and padded ones, fp16 and bf16, around the kernel switch (4 / 5 rows);
* the element-load path (cache rows not on 16 bytes), long ranges (many pipeline stages), many row blocks;
* the op itself: opcheck (schema with mutated caches, fake), torch.compile(fullgraph=True), binding errors;
* static: every decode kernel compiles for sm_80 and sm_90a with 0 spills and 0 local memory; the tensor-core
  kernels contain HMMA + LDSM, the split kernels LDGSTS (cp.async), in their sm_80 SASS.

    .venv/bin/python -m pytest tests/test_cuda_decode.py -q               # default
    .venv/bin/python -m pytest tests/test_cuda_decode.py -q -m slow       # + the full head-dim x path sweep
    .venv/bin/python -m pytest tests/test_cuda_decode.py -q -m static     # nvcc static checks only
"""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch

import transformer
from helpers import (DEVICE, HAS_GPU, assert_close, bits, check_decode, kernel_backends, make_case, require_backend,
                     run_decode)


CUDA = kernel_backends("cuda")
DTYPES = (torch.float16, torch.bfloat16)


def _ops():
    from transformer._cuda import ops
    return ops(DEVICE)


@pytest.fixture(autouse=True)
def _bounds_checked(monkeypatch):
    """The emulated kernels check that every global-memory access lies inside the call's tensors
    (csrc/common/gmem.h); a no-op on a GPU."""
    monkeypatch.setenv("TILEFORMER_EMU_CHECK_BOUNDS", "1")


# ---------------------------------------------------------------------------------------------
# Both kernels at every head dim, around the kernel switch
# ---------------------------------------------------------------------------------------------

# (group, sq): rows per KV head = group * sq; <= 4 CUDA-core kernel, > 4 tensor cores (16/32/64-row blocks).
PATHS = {"simt-r1": (1, 1), "simt-r4": (2, 2), "mma-r5": (5, 1), "mma-r16": (8, 2), "mma-r28": (7, 4),
         "mma-r48": (16, 3)}
DEFAULT_DIMS = [(64, "simt-r1"), (64, "mma-r48"), (80, "simt-r4"), (80, "mma-r5"), (96, "mma-r28"),
                (96, "simt-r1"), (128, "mma-r16"), (128, "simt-r4"), (256, "mma-r48"), (256, "simt-r1"),
                (40, "mma-r16"), (200, "simt-r4")]


def _dim_case(backend, d, path, dtype, page_size, splits):
    require_backend(backend)
    group, sq = PATHS[path]
    case = make_case([0, 150, 67], sq, 2, group, d, dtype, page_size=page_size, append=True, seed=d + group)
    check_decode(backend, case, config=f"d{d} {path} {dtype} page{page_size} splits{splits}", num_splits=splits)


@pytest.mark.parametrize("backend", CUDA)
@pytest.mark.parametrize("d,path", DEFAULT_DIMS, ids=[f"d{d}-{p}" for d, p in DEFAULT_DIMS])
def test_cuda_decode_head_dims(backend, d, path):
    dtype = DTYPES[d % 3 % 2]
    _dim_case(backend, d, path, dtype, 16 if d % 2 == 0 else None, 2)


@pytest.mark.slow
@pytest.mark.parametrize("backend", CUDA)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("d", [64, 80, 96, 128, 256, 8, 111, 136])
def test_cuda_decode_head_dims_slow(backend, d, path, dtype):
    _dim_case(backend, d, path, dtype, 7, 3)


@pytest.mark.parametrize("backend", CUDA)
@pytest.mark.parametrize("page_size,splits", [(1, 1), (None, 1), (32, 2)], ids=["page1", "contig", "page32-s2"])
def test_cuda_decode_long_range(backend, page_size, splits):
    """Hundreds of keys per split: the cp.async ring wraps around its stages many times."""
    require_backend(backend)
    case = make_case([700, 513], 1, 1, 8, 64, torch.bfloat16, page_size=page_size, append=False, seed=11)
    check_decode(backend, case, config=f"page{page_size}", num_splits=splits)
    case = make_case([640], 2, 1, 1, 128, torch.float16, page_size=page_size, append=True, seed=12)
    check_decode(backend, case, config=f"simt page{page_size}", num_splits=splits)


@pytest.mark.parametrize("backend", CUDA)
@pytest.mark.parametrize("d", [64, 256])
def test_cuda_decode_row_blocks(backend, d):
    """group * Sq above one block's rows (64, or 32 at D=256): several row blocks per KV head."""
    require_backend(backend)
    case = make_case([90, 5], 3, 1, 24, d, torch.float16, page_size=16, append=True, seed=13)
    check_decode(backend, case, config=f"g24 sq3 d{d}", num_splits=2)


# ---------------------------------------------------------------------------------------------
# Element-load path: cache rows that do not start on 16 bytes
# ---------------------------------------------------------------------------------------------

def _misaligned(case, shift=1):
    """The same cache contents in storage shifted by `shift` elements with an odd row pitch."""
    def move(t):
        *lead, d = t.shape
        wide = torch.full((*lead, d + shift), float("nan"), dtype=t.dtype, device=t.device)
        wide[..., shift:] = t
        return wide[..., shift:]
    return dataclasses.replace(case, k_cache=move(case.k_cache), v_cache=move(case.v_cache))


@pytest.mark.parametrize("backend", CUDA)
@pytest.mark.parametrize("group", [2, 8], ids=["simt", "mma"])
def test_cuda_decode_unaligned_cache(backend, group):
    require_backend(backend)
    case = make_case([130, 1, 0], 1, 2, group, 64, torch.bfloat16, page_size=16, append=True, seed=14)
    odd = _misaligned(case)
    assert odd.k_cache.data_ptr() % 16 != 0 and odd.k_cache.stride(2) % 8 != 0
    out_a, lse_a, kc_a, vc_a = run_decode(backend, case, num_splits=2)
    out_u, lse_u, kc_u, vc_u = run_decode(backend, odd, num_splits=2)
    assert torch.equal(out_a, out_u) and torch.equal(lse_a, lse_u)        # same arithmetic, other loads
    assert torch.equal(bits(kc_a), bits(kc_u)) and torch.equal(bits(vc_a), bits(vc_u))
    check_decode(backend, odd, config="unaligned", num_splits=2)


# ---------------------------------------------------------------------------------------------
# CUDA (emulated) vs Triton (interpreted)
# ---------------------------------------------------------------------------------------------

AGREE = [
    # (lens, sq, hkv, group, d, dtype, page_size, append, splits, extra)
    ([0, 1, 150], 1, 2, 8, 128, torch.bfloat16, 16, True, 0, {}),
    ([77, 3], 4, 2, 1, 64, torch.float16, None, True, 3, {}),
    ([200, 0], 2, 1, 7, 80, torch.float16, 1, False, 1, dict(window_size=(30, -1), softcap=4.0)),
    ([90, 45], 1, 2, 4, 96, torch.bfloat16, 64, True, 2, dict(alibi_slopes="bh", causal=False)),
]


@pytest.mark.parametrize("i", range(len(AGREE)))
def test_cuda_agrees_with_triton(i):
    """Both kernels are within the flash-attn tolerance of the fp32 reference; here also of each other (twice the
    same-dtype rounding), with identical appended caches."""
    require_backend("cuda")
    require_backend("triton")
    lens, sq, hkv, group, d, dtype, page_size, append, splits, extra = AGREE[i]
    case = make_case(lens, sq, hkv, group, d, dtype, page_size=page_size, append=append, seed=20 + i)
    kw = dict(extra)
    if kw.get("alibi_slopes") == "bh":
        kw["alibi_slopes"] = torch.rand(len(lens), hkv * group, device=DEVICE) * 0.2
    out_c, lse_c, kc_c, vc_c = run_decode("cuda", case, num_splits=splits, **kw)
    out_t, lse_t, kc_t, vc_t = run_decode("triton", case, num_splits=splits, **kw)
    ref, ref_lse, _, _ = run_decode("reference", case, **kw)
    low, low_lse, _, _ = run_decode("reference_lowp", case, **kw)
    assert_close(out_c, ref, low, name="cuda out")
    assert_close(out_t, ref, low, name="triton out")
    # vs each other: the Triton result plays the fp32 reference; the bound is 2 x the same-dtype error + atol.
    rounding = float((low.float() - ref).abs().max())
    assert float((out_c.float() - out_t.float()).abs().max()) <= 2 * rounding + 1e-5
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse_c), fin) and torch.equal(torch.isfinite(lse_t), fin)
    assert float((lse_c - lse_t)[fin].abs().max()) <= 2 * float((low_lse.float() - ref_lse)[fin].abs().max()) + 1e-4
    assert torch.equal(bits(kc_c), bits(kc_t)) and torch.equal(bits(vc_c), bits(vc_t))


# ---------------------------------------------------------------------------------------------
# The op: opcheck, torch.compile, binding errors
# ---------------------------------------------------------------------------------------------

def _op_args(case, append, splits=2):
    return (case.q, case.k_cache.nan_to_num(), case.v_cache.nan_to_num(), case.cache_seqlens,
            case.k if append else None, case.v if append else None, case.block_table, None, 0.125, -1, 0, 0.0,
            splits)


@pytest.mark.parametrize("backend", CUDA)
@pytest.mark.parametrize("append", [False, True])
def test_cuda_decode_opcheck(backend, append):
    require_backend(backend)
    case = make_case([3, 20], 2, 2, 4, 64, torch.float16, page_size=16, append=append)
    torch.library.opcheck(_ops().decode_attention.default, _op_args(case, append))


@pytest.mark.parametrize("backend", CUDA)
def test_cuda_decode_torch_compile(backend):
    """torch.compile(fullgraph=True) of the public function: same numbers and the same appended caches as eager."""
    require_backend(backend)
    case = make_case([3, 20], 2, 2, 4, 64, torch.float16, page_size=16, append=True)

    def step(q, kc, vc, lens, k, v, bt):
        return transformer.decode_attention(q, kc, vc, lens, k=k, v=v, block_table=bt, num_splits=2,
                                            return_lse=True, backend="cuda")

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    kc1, vc1, kc2, vc2 = (t.clone() for t in (case.k_cache, case.v_cache) * 2)
    eager = step(case.q, kc1, vc1, case.cache_seqlens, case.k, case.v, case.block_table)
    comp = compiled(case.q, kc2, vc2, case.cache_seqlens, case.k, case.v, case.block_table)
    assert torch.equal(eager[0], comp[0]) and torch.equal(eager[1], comp[1])
    assert torch.equal(bits(kc1), bits(kc2)) and torch.equal(bits(vc1), bits(vc2))


def _binding_errors():
    ok = make_case([3, 5], 1, 2, 2, 64, torch.float16, page_size=16, append=True)
    return {
        "q dtype": (TypeError, "^q must be float16", dict(q=ok.q.float())),
        "k_cache dtype": (TypeError, "k_cache must have q's dtype", dict(k_cache=ok.k_cache.bfloat16())),
        "block_table dtype": (TypeError, "block_table must be int32", dict(block_table=ok.block_table.long())),
        "cache_seqlens dtype": (TypeError, "cache_seqlens must be int32", dict(cache_seqlens=ok.cache_seqlens.long())),
        "heads": (ValueError, "multiple of the number of key/value heads", dict(q=ok.q[:, :, :3])),
        "Sq": (ValueError, "1..16 queries", dict(q=ok.q.expand(2, 17, 4, 64).contiguous(), k=None, v=None)),
        "k shape": (ValueError, "^k must have shape", dict(k=ok.k[:, :, :1], v=ok.v[:, :, :1])),
        "k without v": (ValueError, "k and v must be given together", dict(v=None)),
        "alibi": (ValueError, "alibi_slopes must have shape", dict(alibi=torch.zeros(5, device=DEVICE))),
        "num_splits": (ValueError, "num_splits must be in 0..128", dict(num_splits=129)),
        "softcap": (ValueError, "softcap must be >= 0", dict(softcap=-1.0)),
    }, ok


@pytest.mark.parametrize("backend", CUDA)
@pytest.mark.parametrize("what", list(_binding_errors()[0]))
def test_cuda_decode_binding_errors(backend, what):
    """The C++ op checks its inputs itself (ValueError / TypeError naming the argument), for direct callers."""
    require_backend(backend)
    calls, ok = _binding_errors()
    err, msg, change = calls[what]
    kw = dict(q=ok.q, k_cache=ok.k_cache, v_cache=ok.v_cache, cache_seqlens=ok.cache_seqlens, k=ok.k, v=ok.v,
              block_table=ok.block_table, alibi=None, softcap=0.0, num_splits=2)
    kw.update(change)
    with pytest.raises(err, match=msg):
        _ops().decode_attention(kw["q"], kw["k_cache"], kw["v_cache"], kw["cache_seqlens"], kw["k"], kw["v"],
                                kw["block_table"], kw["alibi"], 0.125, -1, 0, kw["softcap"], kw["num_splits"])


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="CUDA graph capture needs a CUDA GPU")
def test_cuda_decode_graph_capture():
    """A decode step (append + split kernel + combine, num_splits=0) is captured and replayed: no host sync."""
    case = make_case([100, 3000, 0, 17], 1, 8, 8, 128, torch.bfloat16, page_size=16, append=True, spare=64)
    kc, vc = case.k_cache.clone(), case.v_cache.clone()
    run_once = lambda: transformer.decode_attention(case.q, kc, vc, case.cache_seqlens, k=case.k, v=case.v,  # noqa
                                                    block_table=case.block_table, backend="cuda")
    run_once()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run_once()
    graph.replay()
    torch.cuda.synchronize()
    ref, _, _, _ = run_decode("reference", case)
    low, _, _, _ = run_decode("reference_lowp", case)
    assert_close(out, ref, low)


# ---------------------------------------------------------------------------------------------
# Static: nvcc for sm_80 / sm_90a
# ---------------------------------------------------------------------------------------------

def _ldgsts_by_kernel(sources):
    """{demangled kernel name: LDGSTS (cp.async) count} in the sm_80 SASS of the decode .cu files."""
    import re
    import subprocess

    from benchmarks import kernel_report
    out = {}
    for src in sources:
        _, cubin = kernel_report._nvcc_compile(src, 80, kernel_report._csrc_digest())   # cached by nvcc_report
        res = subprocess.run([kernel_report._triton_bin("cuobjdump"), "-sass", cubin], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr[-1000:]
        for chunk in re.split(r"^\s*Function : ", res.stdout, flags=re.M)[1:]:
            name, _, body = chunk.partition("\n")
            out[kernel_report._demangle_short(name.strip())] = len(re.findall(r"\bLDGSTS\b", body))
    return out


@pytest.fixture(scope="module")
def decode_report():
    from benchmarks import kernel_report
    if not os.path.exists(kernel_report._nvcc()):
        pytest.skip(f"nvcc not found at {kernel_report._nvcc()} (set CUDA_HOME)")
    sources = [s for s in kernel_report.cuda_sources() if os.sep + "decode" + os.sep in s]
    stats = kernel_report.nvcc_report(sources=sources)
    print("\n" + kernel_report.format_table(stats))
    return stats, _ldgsts_by_kernel(sources)


@pytest.mark.static
def test_cuda_decode_static(decode_report):
    from benchmarks.kernel_report import format_table
    decode_report, ldgsts = decode_report
    table = format_table(decode_report)
    names = {s.name.split(":", 1)[1] for s in decode_report}
    for d in (64, 80, 96, 128, 256):
        for kind in ("mma", "simt"):
            for t in ("__half", "__nv_bfloat16"):
                for kv in (0, 1, 2):     # KvFormat: 16-bit, int8, fp8 e4m3 caches
                    assert any(f"decode_{kind}_kernel<{t}, {d}, {kv}>" in n for n in names), \
                        f"{kind} {t} d{d} kv{kv} missing\n{table}"
    assert {s.arch for s in decode_report} == {80, 90}, table
    for s in decode_report:
        assert not s.error, f"{s.name} sm_{s.arch}: {s.error}"
        assert s.spills == 0 and s.local_bytes == 0, f"{s.name} sm_{s.arch}: spills/local memory\n{table}"
        if s.arch != 80:
            continue
        if "decode_mma_kernel" in s.name:
            assert s.instructions.get("HMMA", 0) > 0 and s.instructions.get("LDSM", 0) > 0, f"{s.name}\n{table}"
        if "decode_mma_kernel" in s.name or "decode_simt_kernel" in s.name:
            assert ldgsts.get(s.name.split(":", 1)[1], 0) > 0, f"{s.name}: no cp.async (LDGSTS)\n{table}"
