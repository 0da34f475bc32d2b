"""Static checks of the shipped Triton attention backward configs (no GPU needed).

The config lists (triton_kernels.attention._GPU_CONFIGS "dkdv", "dkdv_dq", "dq") are checked as data: every call
finds a config (the deterministic lists serve every call, softcap included; the atomic lists may leave a call to
them). Each entry of ``_aot_bwd()`` (the backward part of ``aot_configs()``) is compiled ahead of time for its
arch: 0 spills, shared memory within the arch limit, wgmma on sm_90 (at D=256 too: no mma.sync) and mma.sync on
sm_80, fp32 atomic adds exactly in the ATOMIC_DQ kernels, and every wgmma with N >= 64 in the entries listed in
``WIDE``: the sm_90 lists' first entries at D=64 and D=128 that meet it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# (kind, padded head dim) whose first sm_90 entry runs every product as wgmma with N >= 64
WIDE = [("dkdv", 64), ("dkdv", 128), ("dkdv_dq", 64), ("dq", 64), ("dq", 128)]

_SCRIPT = """
import json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from benchmarks.kernel_report import compile_triton
from triton_kernels.attention import _aot_bwd

WGMMA = re.compile(r"wgmma\\.mma_async\\.sync\\.aligned\\.m64n(\\d+)k16")
rows = []
for cfg in _aot_bwd():
    for arch in cfg.archs:
        st = compile_triton(cfg, arch)
        src = ASTSource(fn=cfg.kernel, signature=cfg.signature, constexprs=cfg.constexprs, attrs=cfg.attrs())
        ptx = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                             options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}).asm["ptx"]
        rows.append(dict(name=cfg.name, arch=arch, error=st.error, spills=st.spills, local=st.local_bytes,
                         smem=st.smem, registers=st.registers,
                         wgmma_n=sorted({int(n) for n in WGMMA.findall(ptx)}),
                         mma_sync=len(re.findall(r"\\bmma\\.sync\\.aligned", ptx)),
                         atomics=len(re.findall(r"\\b(?:atom|red)\\.global[.\\w]*\\.add", ptx))))
json.dump(rows, sys.stdout)
"""


@pytest.fixture(scope="module")
def report():
    pytest.importorskip("triton")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, env=env, cwd=root)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(res.stdout)
    for r in rows:
        print(f"{r['name']:<72} sm_{r['arch']} regs {r['registers']:3d} spills {r['spills']} smem {r['smem']:6d} "
              f"wgmma N {r['wgmma_n']} mma.sync {r['mma_sync']} atomics {r['atomics']}")
    return rows


def _configs():
    from triton_kernels import attention as A
    return A


def test_every_call_finds_a_config():
    """Deterministic lists ("dkdv", "dq"): for each arch and head-dim bucket, at least one entry, and at least one
    allowed with softcap (they serve every call, including those the atomic lists leave to them)."""
    A = _configs()
    for arch, per_kind in A._GPU_CONFIGS.items():
        for kind in ("dkdv", "dq"):
            for d, entries in per_kind[kind].items():
                assert entries, f"sm_{arch} {kind} D={d}: no entry"
                assert any((arch, kind, d, tuple(e)) not in A._BWD_NO_SOFTCAP for e in entries), \
                    f"sm_{arch} {kind} D={d}: no entry for softcap calls"
                assert A._tuned(kind, arch, d, True) is not None and A._tuned(kind, arch, d, False) is not None
        assert set(per_kind["dkdv_dq"]) == set(per_kind["dkdv"])
    for key in A._BWD_NO_SOFTCAP:
        arch, kind, d, entry = key
        assert entry in [tuple(e) for e in A._GPU_CONFIGS[arch][kind][d]], f"{key} is not a shipped entry"


def test_dq_accumulator_padding_covers_every_tile():
    """The unmasked atomic adds of a query tile reach BLOCK_M - 1 rows past a sequence's last row."""
    A = _configs()
    tiles = [e[0] for per in A._GPU_CONFIGS.values() for entries in per["dkdv_dq"].values() for e in entries]
    assert A._DQ_ACC_PAD >= max(tiles + [A._INTERPRET_CONFIG["dkdv_dq"][0]])


@pytest.mark.static
def test_every_backward_config_compiles_spill_free(report):
    from benchmarks.kernel_report import SMEM_LIMIT
    bad = [f"{r['name']} sm_{r['arch']}: {r['error'] or ''} spills {r['spills']} local {r['local']} smem {r['smem']}"
           for r in report if r["error"] or r["spills"] or r["local"] or r["smem"] > SMEM_LIMIT[r["arch"]]]
    assert not bad, "\n".join(bad)
    assert {(r["name"].split()[0], r["arch"]) for r in report} == {
        (k, a) for k in ("attn_dkdv", "attn_dq") for a in (80, 90)}


@pytest.mark.static
def test_tensor_cores_and_atomics(report):
    """sm_90: wgmma only (D=256 included); sm_80: mma.sync. fp32 atomic adds in, and only in, ATOMIC_DQ kernels."""
    bad = []
    for r in report:
        if r["arch"] == 90 and (not r["wgmma_n"] or r["mma_sync"]):
            bad.append(f"{r['name']} sm_90: wgmma N {r['wgmma_n']}, mma.sync {r['mma_sync']}")
        if r["arch"] == 80 and not r["mma_sync"]:
            bad.append(f"{r['name']} sm_80: no mma.sync")
        if bool(r["atomics"]) != ("atomic_dq" in r["name"]):
            bad.append(f"{r['name']} sm_{r['arch']}: {r['atomics']} atomic adds")
    assert not bad, "\n".join(bad)
    assert any(r["arch"] == 90 and " d256 " in r["name"] and "atomic_dq" in r["name"] for r in report)


@pytest.mark.static
@pytest.mark.parametrize("kind,d", WIDE, ids=[f"{k}-d{d}" for k, d in WIDE])
def test_wide_wgmma(report, kind, d):
    """The first sm_90 entry of these lists runs every product (S^T, dP^T, dV, dK and dQ, or the dQ kernel's
    three) as wgmma with N >= 64, in every compiled variant."""
    A = _configs()
    bm, bn, w, s = A._GPU_CONFIGS[90][kind][d][0]
    prefix = "attn_dkdv" if kind.startswith("dkdv") else "attn_dq"
    rows = [r for r in report if r["arch"] == 90 and r["name"].startswith(f"{prefix} d{d} ")
            and r["name"].endswith(f" M{bm}xN{bn} w{w}s{s}") and (("atomic_dq" in r["name"]) == (kind == "dkdv_dq"))]
    assert rows
    for r in rows:
        assert r["wgmma_n"] and min(r["wgmma_n"]) >= 64, f"{r['name']}: wgmma N {r['wgmma_n']}"
