"""Self-tests of the CUDA host emulation (csrc/common/emu.h) and the PTX wrappers (csrc/common/ptx.cuh).

The kernels are in csrc/selftest/. On this CPU machine they run through transformer._C_emu
(torch.ops.tileformer_emu, CPU tensors); on a GPU machine the mma and warp tests also run the same
kernels on the hardware (torch.ops.tileformer), which checks the emulated fragment layouts against
the real ones.
"""
import importlib

import numpy as np
import pytest
import torch

from tests import helpers

pytestmark = pytest.mark.emulator


def _emu_ops():
    try:
        importlib.import_module("transformer._C_emu")
    except Exception as e:  # not built
        if "cuda" in helpers._required_backends():
            pytest.fail(f"transformer._C_emu is required (TILEFORMER_REQUIRE_BACKENDS has cuda) but: {e}")
        pytest.skip(f"transformer._C_emu is not built: {e}")
    from transformer import _cuda
    return _cuda.ops(torch.device("cpu"))


def _gpu_ops():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU: the hardware side of this check runs only on GPU machines")
    from transformer import _cuda
    return _cuda.ops(torch.device("cuda"))


WHERE = [pytest.param("emu", id="emu"), pytest.param("gpu", id="gpu", marks=pytest.mark.gpu)]


def _ops(where):
    return (_emu_ops(), torch.device("cpu")) if where == "emu" else (_gpu_ops(), torch.device("cuda"))


@pytest.fixture
def schedule():
    """Set the emulator's thread schedule for a test; restores random order (seed 0) afterwards."""
    ops = _emu_ops()
    yield ops.emu_set_schedule
    ops.emu_set_schedule(True, 0)


# ---------------------------------------------------------------------------------------------
# ldmatrix (+ .trans, x1/x2/x4) + mma.m16n8k16 over a 16x16x8 tile, through cp.async
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("variant", [0, 1, 2], ids=["x4x2", "x1x1", "x2x1"])
@pytest.mark.parametrize("b_trans", [False, True], ids=["Bcol", "Btrans"])
@pytest.mark.parametrize("a_trans", [False, True], ids=["Arow", "Atrans"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_mma_tile_equals_matmul(where, dtype, a_trans, b_trans, variant):
    ops, dev = _ops(where)
    g = torch.Generator().manual_seed(1000 * variant + 10 * a_trans + b_trans + (dtype == torch.bfloat16))
    a = torch.randn(16, 16, generator=g).to(dtype)
    b = torch.randn(16, 8, generator=g).to(dtype)          # B[k][n]
    c = torch.randn(16, 8, generator=g)
    a_in = (a.t() if a_trans else a).contiguous().to(dev)
    b_in = (b if b_trans else b.t()).contiguous().to(dev)   # B (row-major) for .trans, else Bt[n][k]
    d = ops.selftest_mma(a_in, b_in, c.to(dev), a_trans, b_trans, variant, False).cpu()
    ref = a.double() @ b.double() + c.double()              # products of 16-bit inputs are exact
    err = (d.double() - ref).abs().max().item()
    assert err <= 1e-5 * (1 + ref.abs().max().item()), f"max error {err:.3e}\nout={d}\nref={ref}"


def test_mma_tile_rejects_bad_inputs():
    ops = _emu_ops()
    a, bt, c = torch.zeros(16, 16, dtype=torch.half), torch.zeros(8, 16, dtype=torch.half), torch.zeros(16, 8)
    with pytest.raises(ValueError, match="b must have shape"):
        ops.selftest_mma(a, bt.t().contiguous(), c, False, False, 0, False)
    with pytest.raises(TypeError, match="c must be float32"):
        ops.selftest_mma(a, bt, c.half(), False, False, 0, False)
    with pytest.raises(ValueError, match="variant"):
        ops.selftest_mma(a, bt, c, False, False, 7, False)


def test_cp_async_without_wait_reads_poisoned_shared_memory():
    """Emulated cp.async copies land at the wait that retires them; skipping it reads the 0xFF poison."""
    ops = _emu_ops()
    a, bt, c = torch.ones(16, 16, dtype=torch.half), torch.ones(8, 16, dtype=torch.half), torch.zeros(16, 8)
    assert torch.equal(ops.selftest_mma(a, bt, c, False, False, 0, False), torch.full((16, 8), 16.0))
    assert torch.isnan(ops.selftest_mma(a, bt, c, False, False, 0, True)).all()


def test_mma_op_traces_and_passes_opcheck():
    ops = _emu_ops()
    a, bt, c = torch.randn(16, 16).half(), torch.randn(8, 16).half(), torch.randn(16, 8)
    torch.library.opcheck(ops.selftest_mma.default, (a, bt, c, False, False, 0, False),
                          test_utils=("test_schema", "test_faketensor"))
    fn = torch.compile(lambda x, y, z: ops.selftest_mma(x, y, z, False, False, 0, False) * 2,
                       backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(fn(a, bt, c), 2 * (a.float() @ bt.float().t() + c))


# ---------------------------------------------------------------------------------------------
# Shuffles and votes
# ---------------------------------------------------------------------------------------------

def _expected_warp_ops(x, width):
    """The documented semantics, lane by lane (see warp_ops_kernel in csrc/selftest/selftest.cuh)."""
    n = len(x)
    out = np.zeros((n, 10), dtype=np.int64)
    for tid in range(n):
        lane, base = tid % 32, tid - tid % 32
        seg, pos = lane & ~(width - 1), lane & (width - 1)
        get = lambda l: int(x[base + l])  # noqa: E731
        out[tid, 0] = get(seg + (((lane * 7 + 3) % width) & (width - 1)))
        out[tid, 1] = get(lane - 3) if pos >= 3 else get(lane)
        out[tid, 2] = get(lane + 5) if pos + 5 < width else get(lane)
        out[tid, 3] = get(seg + ((pos ^ (6 % width)) & (width - 1)))
        ballot = sum(1 << l for l in range(32) if get(l) > 0)
        out[tid, 4] = ballot - (1 << 32) if ballot >= 1 << 31 else ballot
        out[tid, 5] = int(any(get(l) > 100 for l in range(32)))
        out[tid, 6] = int(all(get(l) > -100 for l in range(32)))
        out[tid, 7] = sum(get(l) for l in range(32))
        out[tid, 8] = get(lane ^ 1) if lane < 16 else -1
        out[tid, 9] = int((x > 0).sum())
    return out


@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("n", [32, 96])
@pytest.mark.parametrize("width", [32, 16, 8, 1])
def test_shuffles_and_votes(where, n, width):
    ops, dev = _ops(where)
    g = torch.Generator().manual_seed(n * 100 + width)
    x = torch.randint(-99, 100, (n,), generator=g, dtype=torch.int32)
    if n > 32:
        x[32:64] = torch.randint(1, 100, (32,), generator=g, dtype=torch.int32)   # a warp with all x > 0
        x[64 + 7] = 117                                                             # a warp with any x > 100
        x[64 + 9] = -104                                                            # ... and not all x > -100
    out = ops.selftest_warp_ops(x.to(dev), width).cpu().numpy()
    exp = _expected_warp_ops(x.numpy(), width)
    bad = np.argwhere(out != exp)
    assert len(bad) == 0, (f"{len(bad)} mismatches, first thread {bad[0][0]} column {bad[0][1]}: "
                           f"got {out[bad[0][0]]}, expected {exp[bad[0][0]]}")


# ---------------------------------------------------------------------------------------------
# Races and divergent barriers
# ---------------------------------------------------------------------------------------------

def _neighbour_expected(blocks, threads, base):
    b = torch.arange(blocks, dtype=torch.float32)[:, None]
    t = torch.arange(threads)
    src = torch.where(t > 0, t - 1, t).float()[None, :]
    return base + 1000 * b + src


def test_missing_syncthreads_is_caught_in_random_order(schedule):
    """neighbour_kernel reads the value thread t-1 wrote to shared memory. In thread order the missing
    __syncthreads goes unnoticed; the random schedule exposes it; with the barrier both are right."""
    ops = _emu_ops()
    exp = _neighbour_expected(3, 128, 0.5)
    schedule(False, 0)
    assert torch.equal(ops.selftest_neighbour(3, 128, True, 0.5), exp)
    assert torch.equal(ops.selftest_neighbour(3, 128, False, 0.5), exp), "in order hides this race"
    for seed in (1, 2, 3):
        schedule(True, seed)
        assert torch.equal(ops.selftest_neighbour(3, 128, True, 0.5), exp)
        racy = ops.selftest_neighbour(3, 128, False, 0.5 + seed)
        wrong = (racy != exp + seed).sum().item()
        assert wrong > 0, f"seed {seed}: the missing __syncthreads was not caught"


@pytest.mark.parametrize("mode,pattern", [
    (0, r"deadlock in kernel tf::selftest::divergent_kernel.*__syncthreads at .*selftest.cuh:\d+ reached by 16 "
        r"of 64 threads; 48 threads exited"),
    (1, r"divergent __syncthreads: this thread is at .*selftest.cuh:\d+ while \d+ threads wait at "
        r".*selftest.cuh:\d+ \[kernel tf::selftest::divergent_kernel"),
    (2, r"deadlock in kernel tf::selftest::divergent_kernel.*2 threads exited.*waits in __shfl_sync"),
], ids=["exited-before-barrier", "two-barriers", "lane-skips-shuffle"])
def test_divergent_barrier_is_reported_not_hung(mode, pattern):
    ops = _emu_ops()
    with pytest.raises(RuntimeError, match=pattern):
        ops.selftest_divergent(64, mode)
    # the emulator is usable after a failed launch
    x = torch.arange(32, dtype=torch.int32)
    assert torch.equal(ops.selftest_warp_ops(x, 32)[:, 8], torch.where(x < 16, x ^ 1, -1))


# ---------------------------------------------------------------------------------------------
# Named barriers (bar.sync / bar.arrive id, count): two warpgroups taking turns
# ---------------------------------------------------------------------------------------------

def _turns(x):
    return torch.stack([2 * x, 2 * x + 1], 1).flatten()


@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("iters", [1, 2, 7])
def test_named_barrier_turns_alternate(where, iters):
    ops, dev = _ops(where)
    x = torch.randint(0, 1000, (iters,), dtype=torch.int32, generator=torch.Generator().manual_seed(iters))
    assert torch.equal(ops.selftest_named_barrier(x.to(dev), 0).cpu(), _turns(x))


def test_named_barrier_turns_under_thread_orders(schedule):
    ops = _emu_ops()
    x = torch.arange(5, dtype=torch.int32)
    for seed in range(6):
        schedule(True, seed)
        assert torch.equal(ops.selftest_named_barrier(x, 0), _turns(x)), f"seed {seed}"
    schedule(False, 0)
    assert torch.equal(ops.selftest_named_barrier(x, 0), _turns(x))


@pytest.mark.parametrize("mode,pattern", [
    (1, r"deadlock in kernel tf::selftest::named_barrier_kernel.*waits in bar.sync [12], 256 \(phase 0: 128 of 256 "
        r"threads arrived\).*or an mbarrier or named-barrier phase that never completes"),
    (2, r"named barrier 1 has arrivals no phase completed when the block exited \(phase 3: 128 of 256 threads "
        r"arrived.*a bar.arrive without the matching bar.sync \[kernel tf::selftest::named_barrier_kernel"),
    (3, r"named barrier 2 has arrivals no phase completed when the block exited|deadlock in kernel "
        r"tf::selftest::named_barrier_kernel|the phase completed with \d+ arrivals from warp \d+ \(bar.sync / "
        r"bar.arrive are .aligned"),
], ids=["missing-first-arrive", "extra-last-arrive", "ids-swapped"])
def test_named_barrier_misuse_is_reported_not_hung(mode, pattern):
    """Turns that never come are a deadlock naming the barrier's arrivals; arrivals no bar.sync consumes are
    an error at block exit (both would hang or race on a GPU)."""
    ops = _emu_ops()
    with pytest.raises(RuntimeError, match=pattern):
        ops.selftest_named_barrier(torch.arange(3, dtype=torch.int32), mode)
    assert torch.equal(ops.selftest_named_barrier(torch.arange(2, dtype=torch.int32), 0), _turns(torch.arange(2)))



# ---------------------------------------------------------------------------------------------
# Bounds checking of global memory (TILEFORMER_EMU_CHECK_BOUNDS=1, common/gmem.h)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("offset,mode,what,tensor,at", [
    (8, 0, "global memory access of 4 bytes", "x", 32),       # load one past the end
    (-1, 0, "global memory access of 4 bytes", "x", -4),      # load one before the start
    (4, 1, "global memory access of 4 bytes", "out", 16),     # store one past the end of out
    (6, 2, "cp.async global read of 16 bytes", "x", 24),      # 16-byte copy straddling the end
    (1 << 40, 0, "global memory access of 4 bytes", "", 0),   # far away (not even mapped)
], ids=["load-past-end", "load-before-start", "store-past-end", "cp-async-straddles-end", "load-far"])
def test_bounds_check_catches_bad_access(monkeypatch, offset, mode, what, tensor, at):
    """selftest_bounds_kernel makes one access at an element offset of x (or out): with the check on, one
    outside the view (x is the first 8 floats of a 16-float tensor: the storage past the view counts as
    outside) fails the launch with a RuntimeError naming the kernel, the access and the nearest tensor."""
    ops = _emu_ops()
    monkeypatch.setenv("TILEFORMER_EMU_CHECK_BOUNDS", "1")
    x = torch.arange(16, dtype=torch.float32)[:8]
    pattern = rf"out-of-bounds {what} at 0x[0-9a-f]+: inside no tensor of this call \(nearest: "
    if tensor:
        pattern += rf"{tensor} = \[0x[0-9a-f]+, \+(32|16) bytes\), the access is at byte offset {at}\)"
    pattern += r".*\[kernel tf::selftest::bounds_kernel"
    with pytest.raises(RuntimeError, match=pattern):
        ops.selftest_bounds(x, offset, mode)
    # inside: fine, and the emulator is usable after a failed launch
    assert torch.equal(ops.selftest_bounds(x, 7, 0), torch.tensor([7.0, 0, 0, 0]))
    assert torch.equal(ops.selftest_bounds(x, 4, 2), torch.tensor([4.0, 5, 6, 7]))
    assert torch.equal(ops.selftest_bounds(x, 3, 1), torch.tensor([0.0, 0, 0, 0]))


def test_bounds_check_off_and_strided_views(monkeypatch):
    """Without the variable nothing is checked (x[8] of the storage is read); a strided view's extent runs
    from its lowest to its highest element."""
    ops = _emu_ops()
    base = torch.arange(16, dtype=torch.float32)
    monkeypatch.delenv("TILEFORMER_EMU_CHECK_BOUNDS", raising=False)
    assert ops.selftest_bounds(base[:8], 8, 0)[0] == 8.0
    monkeypatch.setenv("TILEFORMER_EMU_CHECK_BOUNDS", "1")
    strided = base[1::3]                       # elements 1, 4, 7, 10, 13: extent [1, 14)
    assert ops.selftest_bounds(strided, 12, 0)[0] == 13.0
    assert ops.selftest_bounds(strided, 1, 0)[0] == 2.0   # between elements: inside the extent
    with pytest.raises(RuntimeError, match="out-of-bounds"):
        ops.selftest_bounds(strided, 13, 0)
    with pytest.raises(RuntimeError, match="out-of-bounds"):
        ops.selftest_bounds(strided, -1, 0)
