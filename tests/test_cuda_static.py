"""Static checks of the GPU build of the CUDA C++ kernels (no GPU needed).

benchmarks.kernel_report.cuda_report reads every kernel of the built extension transformer._C (sm_80 and
sm_90a, cuobjdump -res-usage) when it is newer than csrc/, else compiles every csrc/**/*.cu with nvcc
-Xptxas -v (cached by a hash of csrc/). Every kernel must have 0 spills and 0 local memory (stack
frame included); the tensor-core kernels listed in TENSOR_CORE_KERNELS must contain HMMA and LDSM in
their sm_80 SASS (the attention and decode kernels are checked the same way by their own static tests in
test_cuda_attention.py and test_cuda_decode.py); the sm_90a self-test kernels listed in HOPPER_KERNELS must
contain the Hopper instructions their wrappers stand for (HGMMA: wgmma.mma_async, UTMALDG / UTMASTG: TMA,
SYNCS: mbarrier, USETMAXREG: setmaxnreg) in their sm_90a SASS; so must the sm_90a attention forward
(ATTENTION_SM90_KERNELS: wgmma, TMA loads, mbarriers, setmaxnreg, and no mma.sync).
"""
import os
import re

import pytest

from benchmarks import kernel_report

pytestmark = pytest.mark.static

# (source file, substring of the demangled kernel name) of kernels that must use tensor cores.
TENSOR_CORE_KERNELS = [
    ("selftest.cu", "mma_tile_kernel<__half>"),
    ("selftest.cu", "mma_tile_kernel<__nv_bfloat16>"),
]


# (source file, substring of the demangled kernel name, SASS instructions its sm_90a code must contain).
HOPPER_KERNELS = [
    ("hopper.cu", f"wgmma_kernel<{t}, {n}, {rs}, {mn}, false>", ("HGMMA", "UTMALDG", "SYNCS"))
    for t in ("__half", "__nv_bfloat16") for n in (64, 128, 256) for rs in ("false", "true") for mn in ("false", "true")
] + [
    ("hopper.cu", f"wgmma_kernel<{t}, 64, false, {mn}, true>", ("HGMMA", "UTMALDG", "SYNCS"))
    for t in ("__half", "__nv_bfloat16") for mn in ("false", "true")
] + [
    ("hopper.cu", "tma_copy_kernel", ("UTMALDG", "UTMASTG", "SYNCS")),
    ("hopper.cu", "mbarrier_pingpong_kernel", ("SYNCS", "USETMAXREG")),
]


# The sm_90a attention forward (csrc/attention/fwd_sm90.cuh), per dtype and head dim: besides wgmma, TMA, mbarriers
# and setmaxnreg, the consumers' turns (bar.arrive on a named barrier) and the softmax overlapped with P V
# (wgmma.wait_group 1).
ATTENTION_SM90_KERNELS = [
    (f"fwd_sm90_d{d}.cu", f"attn_fwd_sm90_kernel<{t}, {d}, 128, {128 if d <= 128 else 64}, 2>",
     ("HGMMA", "UTMALDG", "SYNCS", "USETMAXREG", "BAR.ARV", "GSB.WAIT1"))
    for t in ("__half", "__nv_bfloat16") for d in (64, 128, 256)
]
# The sm_90a attention backward (csrc/attention/bwd_sm90.cuh): two warpgroups, no setmaxnreg.
ATTENTION_SM90_BWD_KERNELS = [
    (f"bwd_sm90_d{d}.cu", f"attn_bwd_sm90_kernel<{t}, {d}, 64, 128, 2>", ("HGMMA", "UTMALDG", "SYNCS"))
    for t in ("__half", "__nv_bfloat16") for d in (64, 128)
]


@pytest.fixture(scope="module")
def report():
    if not os.path.exists(kernel_report._nvcc()):
        pytest.skip(f"nvcc not found at {kernel_report._nvcc()} (set CUDA_HOME)")
    stats = kernel_report.cuda_report(sass_kernels=tuple(k for _, k in TENSOR_CORE_KERNELS) +
                                      tuple(k for _, k, _ in HOPPER_KERNELS) +
                                      tuple(k for _, k, _ in ATTENTION_SM90_KERNELS) +
                                      tuple(k for _, k, _ in ATTENTION_SM90_BWD_KERNELS))
    print("\n" + kernel_report.format_table(stats))
    return stats


def test_every_cu_file_compiles_with_kernels(report):
    sources = {os.path.basename(s) for s in kernel_report.cuda_sources()}
    seen = {s.name.split(":", 1)[0] for s in report}
    assert sources <= seen, f"no kernel reported for {sorted(sources - seen)}"
    for arch in kernel_report.ARCHS:
        assert any(s.arch == arch for s in report), f"nothing compiled for sm_{arch}"


def test_no_spills_no_local_memory(report):
    bad = [f"{s.name} sm_{s.arch}: {s.registers} regs, spills {s.spill_stores}/{s.spill_loads} B, "
           f"local {s.local_bytes} B" for s in report if s.spills or s.local_bytes]
    assert not bad, "kernels with spills or local memory:\n" + "\n".join(bad)


@pytest.mark.parametrize("source,kernel", TENSOR_CORE_KERNELS, ids=[k for _, k in TENSOR_CORE_KERNELS])
def test_tensor_core_kernels_use_hmma(report, source, kernel):
    hits = [s for s in report if s.arch == 80 and s.name.startswith(source + ":") and kernel in s.name]
    assert hits, f"{kernel} not found in {source} (kernels: {[s.name for s in report if s.arch == 80]})"
    for s in hits:
        assert s.instructions.get("HMMA", 0) > 0, f"{s.name}: no HMMA in the sm_80 SASS ({s.instructions})"
        assert s.instructions.get("LDSM", 0) > 0, f"{s.name}: no LDSM (ldmatrix) in the sm_80 SASS"


def _sm90_hits(report, source, kernel, markers, what):
    """The sm_90a SASS entries of `kernel` in `source`, each checked for every marker instruction and no HMMA."""
    hits = [s for s in report if s.arch == 90 and s.name.startswith(source + ":") and kernel in s.name]
    assert hits, f"{kernel} not found in {source} (kernels: {[s.name for s in report if s.arch == 90]})"
    for s in hits:
        missing = [m for m in markers if s.instructions.get(m, 0) == 0]
        assert not missing, f"{s.name}: no {missing} in the sm_90a SASS ({s.instructions})"
        assert s.instructions.get("HMMA", 0) == 0, f"{s.name}: HMMA (mma.sync) in {what}"
    return hits


@pytest.mark.parametrize("source,kernel,markers", HOPPER_KERNELS, ids=[k for _, k, _ in HOPPER_KERNELS])
def test_hopper_selftest_kernels_use_hopper_instructions(report, source, kernel, markers):
    _sm90_hits(report, source, kernel, markers, "a wgmma kernel")


@pytest.mark.parametrize("source,kernel,markers", ATTENTION_SM90_KERNELS, ids=[k for _, k, _ in ATTENTION_SM90_KERNELS])
def test_sm90_attention_forward_uses_wgmma_and_tma(report, source, kernel, markers):
    for s in _sm90_hits(report, source, kernel, markers, "the wgmma forward"):
        assert not s.spills and not s.local_bytes, f"{s.name}: spills / local memory"
        print(f"{s.name} sm_90a: {s.registers} registers, instructions {s.instructions}")


@pytest.mark.parametrize("source,kernel,markers", ATTENTION_SM90_BWD_KERNELS,
                         ids=[k for _, k, _ in ATTENTION_SM90_BWD_KERNELS])
def test_sm90_attention_backward_uses_wgmma_and_tma(report, source, kernel, markers):
    """Every product of the sm_90a backward is a wgmma (HGMMA with N = 64 for S^T, dP^T and dQ, N = head dim for dV
    and dK), Q / dO / K / V arrive by TMA, no HMMA, 0 spills."""
    for s in _sm90_hits(report, source, kernel, markers, "the wgmma backward"):
        assert not s.spills and not s.local_bytes, f"{s.name}: spills / local memory"
        d = int(kernel.split(", ")[1])
        widths = {k for k in s.instructions if k.startswith("HGMMA.64x")}
        assert widths == {"HGMMA.64x64x16", f"HGMMA.64x{d}x16"}, f"{s.name}: {widths}"
        print(f"{s.name} sm_90a: {s.registers} registers, instructions {s.instructions}")


# ptxas notes that undo the overlap of the sm_90a forward: wgmma serialised (C7514, C7515, ...), a
# warpgroup.wait injected to read wgmma registers (C7517), setmaxnreg ignored (C7508).
PTXAS_SERIALISATION = re.compile(r"\(C75(08|1[0-9])\)[^\n]*")


@pytest.mark.parametrize("unit", [f"fwd_sm90_d{d}" for d in (64, 128, 256)] + [f"bwd_sm90_d{d}" for d in (64, 128)])
def test_sm90_attention_wgmma_not_serialised(unit):
    """ptxas keeps the wgmma pipeline of the sm_90a forward (S of the next tile and P V of the previous one in
    flight together, no wait injected before the softmax reads S, setmaxnreg honoured) and of the backward (no
    serialisation note either)."""
    if not os.path.exists(kernel_report._nvcc()):
        pytest.skip(f"nvcc not found at {kernel_report._nvcc()} (set CUDA_HOME)")
    src = os.path.join(kernel_report.ROOT, "csrc", "attention", "inst", f"{unit}.cu")
    log, _ = kernel_report._nvcc_compile(src, 90, kernel_report._csrc_digest())
    notes = [m.group(0)[:200] for m in PTXAS_SERIALISATION.finditer(log)]
    assert not notes, "ptxas serialises or ignores:\n" + "\n".join(notes)
