"""Static checks of the shipped Triton flash-attention configs (no GPU needed).

Every entry of ``triton_kernels.attention.aot_configs()`` is compiled ahead of time for its arch
(sm_80 / sm_90) by ``benchmarks.kernel_report.triton_report``: it must compile, spill no register, fit the
arch's shared memory, and use the expected tensor-core instructions (wgmma on sm_90, mma.sync on sm_80).
The sm_90 descriptor forward (attn_fwd_tma) must also load through TMA, run wgmma with N >= 64 only, and
use setmaxnreg where its key loop is warp-specialized.

Runtime specialisation: on a GPU, Triton compiles each kernel for 16-byte aligned pointers and strides
divisible by 16 (torch allocations, head dims that are multiples of 8). Without those hints the compiler
cannot vectorise the loads, so it does not software-pipeline them (no cp.async) and the kernel is not the
one that runs. Each config therefore lists those arguments in ``AotConfig.divisible`` (the same
``tt.divisibility = 16`` Triton infers at launch for such shapes); strides that may legitimately be 0 or 1
at run time (broadcast ALiBi slopes, contiguous lse rows) are left out.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.static

# Runs in a subprocess without TRITON_INTERPRET: this process holds the interpreter's kernel objects, which
# cannot be compiled.
_SCRIPT = """
import dataclasses, json, sys
import triton.compiler
from benchmarks.kernel_report import triton_report
from triton_kernels.attention import aot_configs

configs = aot_configs()
stats = triton_report(configs=configs)
# keyed by name@arch: the same tile can be shipped for both archs (with a different expected instruction)
meta = {f"{c.name}@{a}": dict(num_stages=c.num_stages, archs=[a], expect={str(a): list(m) for a, m in c.expect.items()},
                              block_n=c.constexprs["BLOCK_N"], block_d=c.constexprs["BLOCK_D"])
        for c in configs for a in c.archs}
json.dump(dict(stats=[dataclasses.asdict(s) for s in stats], configs=meta), sys.stdout)
"""


@pytest.fixture(scope="module")
def report():
    pytest.importorskip("triton")
    from benchmarks.kernel_report import KernelStats, format_table

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, env=env, cwd=root)
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads(res.stdout)
    stats = [KernelStats(**s) for s in data["stats"]]
    print("\n" + format_table(stats))
    return [(data["configs"][f"{s.name}@{s.arch}"], s) for s in stats], data["configs"]


def test_every_config_is_reported(report):
    pairs, configs = report
    expected = {(key.rsplit("@", 1)[0], a) for key, c in configs.items() for a in c["archs"]}
    assert {(s.name, s.arch) for _, s in pairs} == expected
    assert {s.arch for _, s in pairs} == {80, 90}
    assert {name.split()[0] for name in configs} == {"attn_fwd", "attn_dkdv", "attn_dq", "attn_fwd_tma"}


def test_compiles(report):
    bad = [f"{s.name} sm_{s.arch}: {s.error}" for _, s in report[0] if s.error]
    assert not bad, "\n".join(bad)


def test_no_register_spills(report):
    from benchmarks.kernel_report import format_table

    bad = [s for _, s in report[0] if not s.error and (s.spills or s.local_bytes)]
    assert not bad, "register spills / local memory:\n" + format_table(bad)


def test_shared_memory_within_limit(report):
    from benchmarks.kernel_report import SMEM_LIMIT

    bad = [f"{s.name} sm_{s.arch}: {s.smem} B > {SMEM_LIMIT[s.arch]} B" for _, s in report[0]
           if not s.error and s.smem > SMEM_LIMIT[s.arch]]
    assert not bad, "\n".join(bad)


def test_tensor_core_instructions(report):
    bad = []
    for cfg, s in report[0]:
        for marker in cfg["expect"].get(str(s.arch), ()):
            if not s.error and not s.instructions.get(marker):
                bad.append(f"{s.name} sm_{s.arch}: no {marker} ({s.instructions})")
    assert not bad, "\n".join(bad)
    for kind in ("attn_fwd", "attn_dkdv", "attn_dq"):   # every kernel has wgmma configs on sm_90
        assert any(s.instructions.get("wgmma") for _, s in report[0] if s.arch == 90 and s.name.startswith(kind))


def test_pipelined(report):
    """The K/V (forward, dQ) and Q/dO (dK/dV) tiles stream through cp.async: the loops are pipelined. The
    descriptor forward streams K/V through TMA instead (test_descriptor_forward)."""
    bad = [f"{s.name} sm_{s.arch}" for cfg, s in report[0] if not s.error and cfg["num_stages"] > 1
           and not s.name.startswith("attn_fwd_tma ") and not s.instructions.get("cp.async")]
    assert not bad, "not software-pipelined (no cp.async):\n" + "\n".join(bad)


def _wgmma_n(instructions):
    """N of every wgmma shape in a kernel's instructions ({"wgmma.m64nNk16": count, ...})."""
    return [int(re.fullmatch(r"wgmma\.m\d+n(\d+)k\d+", k).group(1)) for k, v in instructions.items()
            if k.startswith("wgmma.m") and v]


def test_descriptor_forward(report):
    """Every shipped config of the sm_90 descriptor forward (triton_kernels.attention._TMA_FWD_CONFIGS) is
    compiled, loads/stores through TMA (cp.async.bulk.tensor), keeps num_stages K and V tiles in shared memory
    (the key loop is multi-buffered), runs every product as wgmma with N >= 64, and, warp-specialized, moves
    registers with setmaxnreg (the expected markers, test_tensor_core_instructions)."""
    from triton_kernels.attention import _TMA_FWD_CONFIGS

    tma = [(cfg, s) for cfg, s in report[0] if s.name.startswith("attn_fwd_tma ")]
    assert tma and all(s.arch == 90 for _, s in tma)
    shipped = {f"M{bm}xN{bn} w{w}s{st}{' ws' if ws else ''}" for per_causal in _TMA_FWD_CONFIGS.values()
               for entries in per_causal.values() for bm, bn, w, st, ws in entries}
    assert shipped <= {s.name.split(" ", 4)[4] for _, s in tma}
    bad = []
    for cfg, s in tma:
        if s.error:
            continue
        ns = _wgmma_n(s.instructions)
        if not ns or min(ns) < 64:
            bad.append(f"{s.name}: wgmma N {sorted(set(ns))} (need >= 64)")
        if not s.instructions.get("tma"):
            bad.append(f"{s.name}: no cp.async.bulk.tensor")
        if ("setmaxnreg" in cfg["expect"]["90"]) != bool(s.instructions.get("setmaxnreg")):
            bad.append(f"{s.name}: setmaxnreg {s.instructions.get('setmaxnreg', 0)}, expected "
                       f"{'some' if 'setmaxnreg' in cfg['expect']['90'] else 'none'}")
        kv_stages = cfg["num_stages"] * 2 * cfg["block_n"] * cfg["block_d"] * 2
        if s.smem < kv_stages:
            bad.append(f"{s.name}: {s.smem} B of shared memory < {cfg['num_stages']} stages of K and V tiles")
    assert not bad, "\n".join(bad)
