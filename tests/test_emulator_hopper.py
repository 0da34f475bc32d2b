"""Self-tests of the sm_90a wrappers (csrc/common/ptx_sm90.cuh) and their host emulation (csrc/common/emu_hopper.h):
wgmma.mma_async (SS and RS, every swizzle mode, fp16 / bf16, N 64 / 128 / 256, B K-major and N-major) fed by
TMA loads through an mbarrier, TMA 2-D and 3-D load / store and 4-D loads with out-of-bounds boxes, and an
mbarrier producer / consumer ring with setmaxnreg.

The kernels are in csrc/selftest/hopper.cuh. On this CPU machine they run through transformer._C_emu; on an
H100 / H200 the "gpu" parametrisations run the same kernels on the hardware, which checks the emulated fragment
layouts, descriptor decoding and swizzle against the real ones. Mutation tests show that a wrong descriptor
stride or swizzle mode gives wrong numbers, and that a wait that can never complete is reported, not hung.
"""
import pytest
import torch

from tests.test_emulator import _emu_ops
from transformer._cuda.selftest import tma_box_4d

pytestmark = pytest.mark.emulator

SWIZZLES = [0, 1, 2, 3]
SWIZZLE_IDS = ["none", "sw32", "sw64", "sw128"]
CHUNK = {0: 8, 1: 16, 2: 32, 3: 64}   # elements per tile row (the swizzle span for 16-bit elements)


def _hopper_ops():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU: the hardware side of the sm_90a self-tests runs only on an H100 / H200")
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip(f"GPU {torch.cuda.get_device_name()} is sm_{''.join(map(str, torch.cuda.get_device_capability()))}"
                    ": the sm_90a self-tests need compute capability 9.0 (H100 / H200)")
    from transformer import _cuda
    return _cuda.ops(torch.device("cuda"))


WHERE = [pytest.param("emu", id="emu"), pytest.param("gpu", id="gpu", marks=pytest.mark.gpu)]


def _ops(where):
    return (_emu_ops(), torch.device("cpu")) if where == "emu" else (_hopper_ops(), torch.device("cuda"))


@pytest.fixture
def schedule():
    ops = _emu_ops()
    yield ops.emu_set_schedule
    ops.emu_set_schedule(True, 0)


# ---------------------------------------------------------------------------------------------
# wgmma (+ TMA loads, mbarrier): D[64][N] = A[64][K] B[K][N] (+ C)
# ---------------------------------------------------------------------------------------------

def _wgmma_inputs(dtype, n, k, b_mn_major, a_rows=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(a_rows, k, generator=g).to(dtype)
    b = torch.randn(k, n, generator=g).to(dtype)             # B[k][n]
    c = torch.randn(64, n, generator=g)
    b_in = b.contiguous() if b_mn_major else b.t().contiguous()
    return a, b, b_in, c


def _reference(a, b, c):
    a64 = torch.zeros(64, a.shape[1], dtype=torch.float64)
    a64[: a.shape[0]] = a.double()                            # rows past the tensor: TMA zero fill
    ref = a64 @ b.double()
    return ref + c.double() if c is not None else ref


def _tolerance(ref, k):
    # fp32 accumulation of k exact products: a few ulps of the largest partial sum
    return 1e-5 * (k / 16) * (1 + ref.abs().max().item())


def _k_for(swizzle, n):
    return 64 if n != 64 else {0: 48, 1: 48, 2: 32, 3: 64}[swizzle]


@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("b_mn_major", [False, True], ids=["Bk", "Bn"])
@pytest.mark.parametrize("a_regs", [False, True], ids=["SS", "RS"])
@pytest.mark.parametrize("swizzle", SWIZZLES, ids=SWIZZLE_IDS)
@pytest.mark.parametrize("n", [64, 128, 256])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_wgmma_equals_matmul(where, dtype, n, swizzle, a_regs, b_mn_major):
    ops, dev = _ops(where)
    k = _k_for(swizzle, n)
    use_c = n != 128                                          # N 128: scale-d = 0 on the first k-step
    a, b, b_in, c = _wgmma_inputs(dtype, n, k, b_mn_major, seed=n + 10 * swizzle + 100 * a_regs + 1000 * b_mn_major)
    d = ops.selftest_wgmma(a.to(dev), b_in.to(dev), c.to(dev) if use_c else None, n, swizzle, a_regs, b_mn_major,
                           0).cpu()
    ref = _reference(a, b, c if use_c else None)
    err = (d.double() - ref).abs().max().item()
    assert err <= _tolerance(ref, k), f"max error {err:.3e} (tolerance {_tolerance(ref, k):.3e})"


@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("b_mn_major", [False, True], ids=["Bk", "Bn"])
@pytest.mark.parametrize("swizzle", SWIZZLES, ids=SWIZZLE_IDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_wgmma_a_m_major_equals_matmul(where, dtype, swizzle, b_mn_major):
    """A from shared memory M-major (trans-a = 1: At[K][64], M contiguous), N 64."""
    ops, dev = _ops(where)
    k = 64 if swizzle == 3 else 32
    a, b, b_in, c = _wgmma_inputs(dtype, 64, k, b_mn_major, seed=70 + swizzle + 10 * b_mn_major)
    d = ops.selftest_wgmma(a.t().contiguous().to(dev), b_in.to(dev), c.to(dev), 64, swizzle, False, b_mn_major, 0,
                           True).cpu()
    ref = _reference(a, b, c)
    err = (d.double() - ref).abs().max().item()
    assert err <= _tolerance(ref, k), f"max error {err:.3e}"


def test_wgmma_count():
    """emu_wgmma_count() counts warpgroup-level wgmmas: one per k-step of 16 (work counts in kernel tests)."""
    ops = _emu_ops()
    a, b, b_in, c = _wgmma_inputs(torch.float16, 128, 48, True)
    before = ops.emu_wgmma_count()
    ops.selftest_wgmma(a, b_in, c, 128, 1, True, True, 0)
    assert ops.emu_wgmma_count() - before == 3


@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("a_regs", [False, True], ids=["SS", "RS"])
def test_wgmma_tma_out_of_bounds_rows_read_as_zero(where, a_regs):
    """A has 50 rows: the TMA box of 64 rows reads rows 50..63 as 0, so D's last rows are C exactly (under
    TILEFORMER_EMU_CHECK_BOUNDS=1 the emulated TMA must not touch memory past a)."""
    ops, dev = _ops(where)
    a, b, b_in, c = _wgmma_inputs(torch.bfloat16, 64, 64, False, a_rows=50, seed=7)
    d = ops.selftest_wgmma(a.to(dev), b_in.to(dev), c.to(dev), 64, 3, a_regs, False, 0).cpu()
    assert torch.equal(d[50:], c[50:])
    ref = _reference(a, b, c)
    assert (d.double() - ref).abs().max().item() <= _tolerance(ref, 64)


def test_wgmma_tma_reads_are_bounds_checked(monkeypatch):
    """Leaving a out of the registered tensors makes the emulated TMA's reads of a fail: they are checked."""
    ops = _emu_ops()
    monkeypatch.setenv("TILEFORMER_EMU_CHECK_BOUNDS", "1")
    monkeypatch.setenv("TILEFORMER_EMU_CHECK_BOUNDS_EXCLUDE", "a")
    a, b, b_in, c = _wgmma_inputs(torch.float16, 64, 16, False)
    with pytest.raises(RuntimeError, match=r"out-of-bounds TMA load global read of 2 bytes.*wgmma_kernel"):
        ops.selftest_wgmma(a, b_in, c, 64, 0, False, False, 0)


@pytest.mark.parametrize("mutate", [1, 2], ids=["sbo-16-bytes-short", "other-swizzle-mode"])
@pytest.mark.parametrize("b_mn_major", [False, True], ids=["Bk", "Bn"])
@pytest.mark.parametrize("swizzle", SWIZZLES, ids=SWIZZLE_IDS)
def test_wgmma_wrong_descriptor_gives_wrong_numbers(swizzle, b_mn_major, mutate):
    """The emulator reads shared memory through the descriptor as the hardware does: B's descriptor with a stride
    byte offset 16 bytes short, or with another swizzle mode than the TMA wrote, must not reproduce the matmul
    (or, where the wrong layout reaches past the shared memory of the launch, the emulator says so)."""
    ops = _emu_ops()
    n, k = 128, 64
    a, b, b_in, c = _wgmma_inputs(torch.float16, n, k, b_mn_major, seed=3)
    ref = _reference(a, b, c)
    good = ops.selftest_wgmma(a, b_in, c, n, swizzle, False, b_mn_major, 0)
    assert (good.double() - ref).abs().max().item() <= _tolerance(ref, k)
    try:
        bad = ops.selftest_wgmma(a, b_in, c, n, swizzle, False, b_mn_major, mutate)
    except RuntimeError as e:   # the wrong layout reaches past the tile: caught as such
        assert "past the end of the dynamic shared memory" in str(e)
        return
    wrong = ((bad.double() - ref).abs() > _tolerance(ref, k)) | bad.isnan()
    assert wrong.float().mean().item() > 0.25, f"mutation {mutate} went unnoticed ({wrong.sum().item()} wrong)"


def test_wgmma_without_fence_is_reported():
    ops = _emu_ops()
    a, b, b_in, c = _wgmma_inputs(torch.float16, 64, 16, False)
    with pytest.raises(RuntimeError, match=r"wgmma.mma_async without a wgmma.fence.*wgmma_kernel"):
        ops.selftest_wgmma(a, b_in, c, 64, 0, False, False, 3)


def test_wgmma_accumulators_read_before_the_wait_are_stale():
    """Emulated wgmma results reach the accumulator registers at the wgmma.wait_group that retires their group:
    storing D without the wait stores the registers as they were before the wgmmas (C)."""
    ops = _emu_ops()
    a, b, b_in, c = _wgmma_inputs(torch.float16, 64, 32, False)
    assert torch.equal(ops.selftest_wgmma(a, b_in, c, 64, 2, False, False, 4), c)
    assert not torch.equal(ops.selftest_wgmma(a, b_in, c, 64, 2, False, False, 0), c)


def test_wgmma_before_the_mbarrier_wait_reads_poison():
    """Without the mbarrier wait the emulated TMA loads never land: the wgmmas read the 0xFF poison (NaN)."""
    ops = _emu_ops()
    a, b, b_in, c = _wgmma_inputs(torch.bfloat16, 64, 64, True)
    assert ops.selftest_wgmma(a, b_in, c, 64, 3, False, True, 5).isnan().all()


@pytest.mark.parametrize("a_regs", [False, True], ids=["SS", "RS"])
def test_tma_into_a_tile_an_inflight_wgmma_reads_is_reported(a_regs):
    """A TMA load into A's tile issued before the wgmmas reading it are retired by wgmma.wait_group is a race
    (the hardware may still read the tile): the emulator reports it. RS wgmmas do not read A's tile."""
    ops = _emu_ops()
    a, b, b_in, c = _wgmma_inputs(torch.float16, 64, 32, False)
    if a_regs:
        d = ops.selftest_wgmma(a, b_in, c, 64, 1, True, False, 6)
        ref = _reference(a, b, c)
        assert (d.double() - ref).abs().max().item() <= _tolerance(ref, 32)
    else:
        with pytest.raises(RuntimeError, match=r"cp.async.bulk.tensor load writes shared memory \[\d+, \d+\) that a "
                                               r"wgmma.mma_async \(issued at .*hopper.cuh:\d+\) still reads"):
            ops.selftest_wgmma(a, b_in, c, 64, 1, False, False, 6)


def test_wgmma_rejects_bad_inputs():
    ops = _emu_ops()
    a, b_in = torch.zeros(64, 32, dtype=torch.half), torch.zeros(64, 32, dtype=torch.half)
    with pytest.raises(ValueError, match="swizzle span"):
        ops.selftest_wgmma(a, b_in, None, 64, 3, False, False, 0)    # K 32 < 64-element rows of 128 B
    with pytest.raises(ValueError, match="n must be 64, 128 or 256"):
        ops.selftest_wgmma(a, b_in, None, 96, 0, False, False, 0)
    with pytest.raises(ValueError, match=r"b must have shape \[K, n\]"):
        ops.selftest_wgmma(a, b_in, None, 64, 0, False, True, 0)
    with pytest.raises(TypeError, match="b must have a's dtype"):
        ops.selftest_wgmma(a, b_in.bfloat16(), None, 64, 0, False, False, 0)


# ---------------------------------------------------------------------------------------------
# TMA 2-D load / store: out-of-bounds fill, swizzle, clipping
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("rank3", [False, True], ids=["2d", "3d"])
@pytest.mark.parametrize("swizzle", SWIZZLES, ids=SWIZZLE_IDS)
def test_tma_copy_out_of_bounds_and_swizzle(where, swizzle, rank3):
    """Load a 16-row box at column -8, row 30 of a 40-row source (columns < 0 and rows >= 40 read as 0), read it
    back through tf::swizzle_addr, then store it at row 10 of a 20-row destination (rows >= 20 are not written);
    through 2-D tensor maps, or 3-D ones viewing the rows in pairs ([rows / 2][2][cols])."""
    ops, dev = _ops(where)
    box_rows, box_cols = 16, (24 if swizzle == 0 else CHUNK[swizzle])
    g = torch.Generator().manual_seed(swizzle)
    x = torch.randn(40, 72, generator=g).half()
    y = torch.randn(20, 80, generator=g).half()
    x0, y0, x1, y1 = -8, 30, 8, 10
    expect_tile = torch.zeros(box_rows, box_cols, dtype=torch.half)
    expect_tile[:10, 8:] = x[30:40, 0:box_cols - 8]
    expect_y = y.clone()
    expect_y[10:20, 8:8 + box_cols] = expect_tile[:10]
    y_dev = y.to(dev)
    tile = ops.selftest_tma_copy(x.to(dev), y_dev, x0, y0, x1, y1, box_rows, box_cols, swizzle, False, rank3).cpu()
    assert torch.equal(tile, expect_tile)
    assert torch.equal(y_dev.cpu(), expect_y)


# (x0, y0, h0, b0) of the 4-D loads: inside; columns past D = 96 and rows past N = 40; negative column and row at
# the last head and batch; a head past H (all zero); a batch past B (all zero).
BOXES_4D = [(0, 0, 0, 0), (64, 30, 2, 1), (-8, -4, 3, 2), (0, 8, 4, 0), (32, 16, 1, 3)]


def _strided_4d(seed):
    """x [B 3, N 40, H 4, D 96] as a strided view (heads 1..4 of 6, every other token of 80, the last 96 of 104
    columns): element strides (80 * 6 * 104, 2 * 6 * 104, 104, 1), as the forward's maps over packed qkv."""
    g = torch.Generator().manual_seed(seed)
    big = torch.randn(3, 80, 6, 104, generator=g).half()
    return big[:, ::2, 1:5, 8:]


@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("swizzle", SWIZZLES, ids=SWIZZLE_IDS)
def test_tma_load_4d_out_of_bounds_and_swizzle(where, swizzle):
    """4-D TMA loads (ptx::tma_load_4d, the attention forward's Q / K / V loads) over a strided [B][N][H][D] view:
    boxes of [1][16][1][cols] at several (column, row, head, batch) coordinates, out-of-bounds rows, columns,
    heads and batches read as 0, read back through tf::swizzle_addr."""
    ops, dev = _ops(where)
    x = _strided_4d(swizzle)
    box_cols = 24 if swizzle == 0 else CHUNK[swizzle]
    for x0, y0, h0, b0 in BOXES_4D:
        tile = ops.selftest_tma_load_4d(x.to(dev), x0, y0, h0, b0, 16, box_cols, swizzle).cpu()
        assert torch.equal(tile, tma_box_4d(x, x0, y0, h0, b0, 16, box_cols)), f"box at {(x0, y0, h0, b0)}"


def test_tma_load_4d_reads_are_bounds_checked(monkeypatch):
    """With x left out of the registered tensors the emulated 4-D load fails: its reads are checked."""
    ops = _emu_ops()
    monkeypatch.setenv("TILEFORMER_EMU_CHECK_BOUNDS", "1")
    monkeypatch.setenv("TILEFORMER_EMU_CHECK_BOUNDS_EXCLUDE", "x")
    with pytest.raises(RuntimeError, match=r"out-of-bounds TMA load global read of 2 bytes.*tma_copy_kernel"):
        ops.selftest_tma_load_4d(_strided_4d(0), 0, 0, 1, 1, 8, 64, 3)


@pytest.mark.parametrize("excluded,what", [("x", "TMA load global read"), ("y", "TMA store global write")])
def test_tma_accesses_are_bounds_checked(monkeypatch, excluded, what):
    """Leaving the source (destination) out of the registered tensors makes the emulated TMA load (store) fail:
    both directions are checked, element by element, so the out-of-bounds boxes above touch nothing outside."""
    ops = _emu_ops()
    monkeypatch.setenv("TILEFORMER_EMU_CHECK_BOUNDS", "1")
    monkeypatch.setenv("TILEFORMER_EMU_CHECK_BOUNDS_EXCLUDE", excluded)
    x, y = torch.ones(16, 64).half(), torch.zeros(16, 64).half()
    with pytest.raises(RuntimeError, match=rf"out-of-bounds {what} of 2 bytes.*tma_copy_kernel"):
        ops.selftest_tma_copy(x, y, 0, 0, 0, 0, 8, 64, 3, False, False)


def test_tma_load_read_before_the_mbarrier_wait_sees_poison():
    """Emulated TMA loads land when a thread waits on their mbarrier: reading the box without the wait reads
    the 0xFF poison of shared memory (NaN in fp16)."""
    ops = _emu_ops()
    x, y = torch.ones(16, 64).half(), torch.zeros(16, 64).half()
    tile = ops.selftest_tma_copy(x, y, 0, 0, 0, 0, 8, 64, 3, True, False)
    assert (tile.view(torch.int16) == -1).all()


# ---------------------------------------------------------------------------------------------
# mbarrier phases: producer warp / consumer warpgroup over a 2-stage ring; setmaxnreg
# ---------------------------------------------------------------------------------------------

def _fold(x):
    acc = torch.zeros(128)
    for row in x:
        acc = acc * 0.5 + row
    return acc


@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("iters", [1, 2, 5, 8])
def test_mbarrier_ping_pong(where, iters):
    ops, dev = _ops(where)
    x = torch.randn(iters, 128, generator=torch.Generator().manual_seed(iters))
    torch.testing.assert_close(ops.selftest_mbarrier(x.to(dev), 0).cpu(), _fold(x), rtol=0, atol=0)


def test_mbarrier_ping_pong_under_thread_orders(schedule):
    ops = _emu_ops()
    x = torch.randn(7, 128, generator=torch.Generator().manual_seed(5))
    for seed in range(4):
        schedule(True, seed)
        assert torch.equal(ops.selftest_mbarrier(x, 0), _fold(x)), f"seed {seed}"
    schedule(False, 0)
    assert torch.equal(ops.selftest_mbarrier(x, 0), _fold(x))


def test_mbarrier_wait_that_never_completes_is_reported_not_hung():
    """The full barriers expect 33 arrivals, 32 come: every consumer waits for ever (the producer then waits on
    the empty barrier). The emulator reports the deadlock naming the mbarrier waits instead of hanging."""
    ops = _emu_ops()
    with pytest.raises(RuntimeError, match=r"deadlock in kernel tf::selftest::mbarrier_pingpong_kernel.*wait in "
                                           r"warpgroup collectives, on mbarriers or named barriers; thread \d+ "
                                           r"waits in mbarrier.try_wait.parity 0 \(phase 0: 1 of 33 arrivals "
                                           r"pending, tx-count 0\).*or an mbarrier or named-barrier phase that "
                                           r"never completes"):
        ops.selftest_mbarrier(torch.zeros(4, 128), 1)
    assert torch.equal(ops.selftest_mbarrier(torch.ones(1, 128), 0), torch.ones(128))   # usable afterwards


def test_setmaxnreg_must_be_warpgroup_uniform():
    ops = _emu_ops()
    with pytest.raises(RuntimeError, match=r"setmaxnreg.*warpgroup-uniform.*mbarrier_pingpong_kernel"):
        ops.selftest_mbarrier(torch.zeros(2, 128), 2)


def test_gpu_ops_refuse_a_non_hopper_device():
    """On a GPU that is not compute capability 9.0 the sm_90a self-tests raise a clear error (no silent trap)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    if torch.cuda.get_device_capability() == (9, 0):
        pytest.skip("this GPU is sm_90: the self-tests run on it")
    from transformer import _cuda
    ops = _cuda.ops(torch.device("cuda"))
    with pytest.raises(RuntimeError, match="compute capability 9.0"):
        ops.selftest_mbarrier(torch.zeros(1, 128, device="cuda"), 0)


# ---------------------------------------------------------------------------------------------
# red.global.add.v2.f32 (ptx::red_add_v2, the sm_90a backward's dQ reductions)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("n,pairs", [(1, 1), (300, 7), (5000, 64)])
def test_red_add_v2_sums_pairs(where, n, pairs):
    """Many threads of many blocks reduce pairs into the same 8 bytes: each element receives exactly its sum
    (small integers: exact in fp32 in any order), and the two halves of a pair stay apart."""
    ops, dev = _ops(where)
    x = torch.randint(-50, 50, (n, 2), generator=torch.Generator().manual_seed(n)).float()
    want = torch.zeros(pairs, 2).index_add_(0, torch.arange(n) % pairs, x)
    assert torch.equal(ops.selftest_red_v2(x.to(dev), pairs).cpu(), want)
