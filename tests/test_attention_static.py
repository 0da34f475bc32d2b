"""Static checks of the shipped Triton flash-attention configs (no GPU needed).

Every entry of ``triton_kernels.attention.aot_configs()`` is compiled ahead of time for its arch
(sm_80 / sm_90) by ``benchmarks.kernel_report.triton_report``: it must compile, spill no register, fit the
arch's shared memory, and use the expected tensor-core instructions (wgmma on sm_90, mma.sync on sm_80).

Runtime specialisation: on a GPU, Triton compiles each kernel for 16-byte aligned pointers and strides
divisible by 16 (torch allocations, head dims that are multiples of 8). Without those hints the compiler
cannot vectorise the loads, so it does not software-pipeline them (no cp.async) and the kernel is not the
one that runs. ``AotConfig`` has no field for them yet, so ``_runtime_specialised`` adds them while the
report compiles (the same ``tt.divisibility = 16`` Triton infers at launch for such shapes).
"""
from __future__ import annotations

import contextlib

import pytest

pytestmark = pytest.mark.static

# Strides that may legitimately be 0 or 1 at run time (broadcast ALiBi slopes, contiguous lse rows).
_NOT_DIVISIBLE = ("stride_ab", "stride_ah", "stride_lm", "stride_glm", "stride_glb", "stride_glh")


def _divisibility_attrs(signature):
    return {(i,): [["tt.divisibility", 16]] for i, (name, ty) in enumerate(signature.items())
            if ty.startswith("*") or (name.startswith("stride_") and name not in _NOT_DIVISIBLE)}


@contextlib.contextmanager
def _runtime_specialised():
    import triton.compiler

    original = triton.compiler.ASTSource

    class Specialised(original):
        def __init__(self, fn, signature, constexprs=None, attrs=None):
            super().__init__(fn, signature, constexprs, attrs or _divisibility_attrs(signature))

    triton.compiler.ASTSource = Specialised
    try:
        yield
    finally:
        triton.compiler.ASTSource = original


@pytest.fixture(scope="module")
def report():
    pytest.importorskip("triton")
    from benchmarks import kernel_report
    from triton_kernels import attention

    configs = attention.aot_configs()
    with _runtime_specialised():
        stats = kernel_report.triton_report(configs=configs)
    by_name = {c.name: c for c in configs}
    print("\n" + kernel_report.format_table(stats))
    return [(by_name[s.name], s) for s in stats]


def test_every_config_is_reported(report):
    from triton_kernels import attention

    expected = {(c.name, a) for c in attention.aot_configs() for a in c.archs}
    assert {(c.name, s.arch) for c, s in report} == expected
    archs = {s.arch for _, s in report}
    assert archs == {80, 90}
    kinds = {c.name.split()[0] for c, _ in report}
    assert kinds == {"attn_fwd", "attn_dkdv", "attn_dq"}


def test_compiles(report):
    bad = [f"{s.name} sm_{s.arch}: {s.error}" for _, s in report if s.error]
    assert not bad, "\n".join(bad)


def test_no_register_spills(report):
    from benchmarks.kernel_report import format_table

    bad = [s for _, s in report if not s.error and (s.spills or s.local_bytes)]
    assert not bad, "register spills / local memory:\n" + format_table(bad)


def test_shared_memory_within_limit(report):
    from benchmarks.kernel_report import SMEM_LIMIT

    bad = [f"{s.name} sm_{s.arch}: {s.smem} B > {SMEM_LIMIT[s.arch]} B" for _, s in report
           if not s.error and s.smem > SMEM_LIMIT[s.arch]]
    assert not bad, "\n".join(bad)


def test_tensor_core_instructions(report):
    bad = []
    for cfg, s in report:
        for marker in cfg.expect.get(s.arch, ()):
            if not s.error and not s.instructions.get(marker):
                bad.append(f"{s.name} sm_{s.arch}: no {marker} ({s.instructions})")
    assert not bad, "\n".join(bad)
    assert any(cfg.expect.get(90) == ("wgmma",) for cfg, s in report if s.arch == 90)


def test_pipelined(report):
    """The K/V (forward, dQ) and Q/dO (dK/dV) tiles stream through cp.async: the loops are pipelined."""
    bad = [f"{s.name} sm_{s.arch}" for cfg, s in report
           if not s.error and cfg.num_stages > 1 and not s.instructions.get("cp.async")]
    assert not bad, "not software-pipelined (no cp.async):\n" + "\n".join(bad)
