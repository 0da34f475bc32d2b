"""The benchmark suite's arithmetic and plumbing: FLOP/byte formulas against hand-computed values, the peak
table and roofline (including the unknown-GPU path), the timers and their statistics, the CSV schema, sweeps,
the plot writer, the kernel report's table, progress bars, and benchmarks.run's output folder (--list writes
nothing; results are moved into place only when a run completes)."""
import io
import os
import random
import sys

import pytest
import torch

from benchmarks import bench, cases, correctness, formulas, harness, kernel_report, plots, progress, providers
from benchmarks import run as bench_run


# ---------------------------------------------------------------------------------------------
# FLOPs (flash-attn convention) and minimum bytes, by hand
# ---------------------------------------------------------------------------------------------

def test_attention_flops_by_hand():
    # 4 * B * H * Nq * Nk * D = 4 * 2 * 3 * 5 * 7 * 11 = 9240
    assert formulas.attention_flops(2, 3, 5, 7, 11, causal=False) == 9240
    assert formulas.attention_flops(2, 3, 5, 7, 11, causal=True) == 4620
    assert formulas.attention_flops(2, 3, 5, 7, 11, causal=False, mode="bwd") == 23100      # x 2.5
    assert formulas.attention_flops(2, 3, 5, 7, 11, causal=True, mode="fwd+bwd") == 16170   # 4620 x 3.5
    with pytest.raises(ValueError, match="mode"):
        formulas.attention_flops(1, 1, 1, 1, 1, False, mode="backward")


def test_attention_flops_issue_sweep_point():
    # B*N = 16k tokens, N = 16384, H = 16, D = 128: 4 * 1 * 16 * 16384^2 * 128 = 2.199e12
    assert formulas.attention_flops(1, 16, 16384, 16384, 128, False) == pytest.approx(2.1990232555520e12)


def test_decode_flops_by_hand():
    assert formulas.decode_flops(2, 4, 1, 10, 8) == 2560      # 4 * 2 * 4 * 1 * 10 * 8


def test_attention_bytes_by_hand():
    # B=1 Nq=3 Nk=5 Hq=2 Hkv=1 D=4 bf16: q = out = 3*2*4*2 = 48 B, k + v = 2*5*1*4*2 = 80 B, lse = 2*3*4 = 24 B
    assert formulas.attention_bytes(1, 3, 5, 2, 1, 4, "bf16", "fwd") == 48 + 48 + 80
    assert formulas.attention_bytes(1, 3, 5, 2, 1, 4, "bf16", "bwd") == 4 * 48 + 2 * 80 + 24
    assert formulas.attention_bytes(1, 3, 5, 2, 1, 4, "bf16", "fwd+bwd") == 176 + 24 + 376
    assert formulas.attention_bytes(1, 3, 5, 2, 1, 4, torch.float32, "fwd") == 2 * 176


def test_decode_bytes_by_hand():
    # B=2 Sq=1 Hq=4 Hkv=2 D=8 L=10 fp16: q + out = 2*2*1*4*8*2 = 256, K + V = 2*2*10*2*8*2 = 1280, seqlens 8
    assert formulas.decode_bytes(2, 1, 4, 2, 8, 10, "fp16") == 1544
    # paged, 4-token pages: + block_table 2 sequences x ceil(10/4) = 3 pages x 4 B
    assert formulas.decode_bytes(2, 1, 4, 2, 8, 10, "fp16", page_size=4) == 1544 + 24


def test_norm_bytes_by_hand():
    # M=3 N=5 bf16: x and out 3*5*2 = 30 B each; weight 10 B, bias 10 B
    assert formulas.norm_bytes(3, 5, "bf16", bias=True, mode="fwd") == 80
    assert formulas.norm_bytes(3, 5, "bf16", bias=False, mode="fwd") == 70
    assert formulas.norm_bytes(3, 5, "bf16", bias=True, mode="bwd") == 90 + 40     # x, dout, dx; w, dw, db (+w)
    assert formulas.norm_bytes(3, 5, "bf16", bias=False, mode="bwd") == 90 + 20
    assert formulas.norm_bytes(3, 5, "bf16", bias=True, mode="fwd", weight_dtype="fp32") == 60 + 40
    with pytest.raises(ValueError, match="mode"):
        formulas.norm_bytes(3, 5, "bf16", bias=True, mode="fwd+bwd")
    with pytest.raises(ValueError, match="dtype"):
        formulas.dtype_bytes("fp8")


def test_case_uses_the_formulas():
    c = cases.attention_case("bwd", 2, 64, 96, 8, 2, 128, True, "fp16")
    assert c.flops() == formulas.attention_flops(2, 8, 64, 96, 128, True, "bwd")
    assert c.bytes() == formulas.attention_bytes(2, 64, 96, 8, 2, 128, "fp16", "bwd")
    d = cases.decode_case(4, 1000, 32, 8, 128, page=256)
    assert d.flops() == formulas.decode_flops(4, 32, 1, 1000, 128)
    assert d.bytes() == formulas.decode_bytes(4, 1, 32, 8, 128, 1000, "bf16", 256)
    n = cases.norm_case("rms_norm", "fwd", 16, 512)
    assert n.flops() is None and n.bytes() == formulas.norm_bytes(16, 512, "bf16", bias=False)
    assert c.shape == "B=2 Nq=64 Nk=96 Hq=8 Hkv=2 D=128 causal=1"
    with pytest.raises(ValueError, match="mode"):
        cases.Case("decode_attention", "bwd", ())
    with pytest.raises(ValueError, match="op"):
        cases.Case("softmax", "fwd", ())


# ---------------------------------------------------------------------------------------------
# Peak table, roofline, unknown GPU
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,expected,gbps", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM", 3350), ("NVIDIA H100 PCIe", "H100 PCIe", 2000),
    ("NVIDIA H100 NVL", "H100 NVL", 3900), ("NVIDIA H200", "H200 SXM", 4800),
    ("NVIDIA A100-SXM4-80GB", "A100 SXM 80GB", 2039), ("NVIDIA A100-SXM4-40GB", "A100 40GB", 1555),
    ("NVIDIA A100 80GB PCIe", "A100 80GB PCIe", 1935), ("NVIDIA L40S", "L40S", 864),
    ("NVIDIA GeForce RTX 4090", "RTX 4090", 1008)])
def test_peak_lookup(name, expected, gbps):
    peak = formulas.lookup_peak(name, env={})
    assert peak.name == expected and peak.gbps == gbps


@pytest.mark.parametrize("name", ["NVIDIA GeForce GTX 1080", "Tesla V100-SXM2-16GB", "cpu", "", None])
def test_unknown_gpu_has_no_roofline(name):
    assert formulas.lookup_peak(name, env={}) is None
    assert formulas.roofline_floor_s(1e12, 1e9, None, "bf16") is None
    assert formulas.bound_by(1e12, 1e9, None, "bf16") is None
    msg = formulas.unknown_gpu_message("NVIDIA GeForce GTX 1080")
    assert "TILEFORMER_PEAK_TFLOPS" in msg and "GTX 1080" in msg


def test_peak_override_from_environment():
    peak = formulas.lookup_peak("Some Future GPU", env={"TILEFORMER_PEAK_TFLOPS": "100", "TILEFORMER_PEAK_GBPS": "500"})
    assert peak.flops_per_s("bf16") == 100e12 and peak.bytes_per_s() == 500e9


def test_roofline_math():
    h100 = formulas.lookup_peak("NVIDIA H100 80GB HBM3", env={})
    # 989e12 FLOPs take 1 s at the peak; 3.35e9 bytes take 1 ms: compute-bound, floor 1 s
    assert formulas.roofline_floor_s(989e12, 3.35e9, h100, "bf16") == pytest.approx(1.0)
    assert formulas.bound_by(989e12, 3.35e9, h100, "bf16") == "compute"
    # memory-bound: 3.35e12 bytes = 1 s, 1e12 FLOPs ~ 1 ms
    assert formulas.roofline_floor_s(1e12, 3.35e12, h100, "bf16") == pytest.approx(1.0)
    assert formulas.bound_by(None, 3.35e12, h100, "bf16") == "memory"
    # fp32 uses the non-tensor peak (67 TFLOP/s)
    assert formulas.roofline_floor_s(67e12, 0, h100, "fp32") == pytest.approx(1.0)
    assert formulas.time_over_floor(2000.0, 1.0) == pytest.approx(2.0)
    assert formulas.tflops(1e12, 1000.0) == pytest.approx(1.0)
    assert formulas.gbps(1e9, 1.0) == pytest.approx(1000.0)


# ---------------------------------------------------------------------------------------------
# Statistics and timing
# ---------------------------------------------------------------------------------------------

def test_timing_quantiles_match_numpy():
    np = pytest.importorskip("numpy")
    rng = random.Random(0)
    for n in (1, 2, 7, 100):
        xs = [rng.random() for _ in range(n)]
        t = harness.Timing.from_samples(xs)
        assert (t.median, t.p20, t.p80) == pytest.approx(tuple(float(np.quantile(xs, q)) for q in (0.5, 0.2, 0.8)))
        assert t.reps == n
    t = harness.Timing.from_samples([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (t.median, t.p20, t.p80, t.reps) == pytest.approx((3.0, 1.8, 4.2, 5))
    with pytest.raises(ValueError):
        harness.Timing.from_samples([])


def test_time_cpu_reps_and_order():
    t = harness.time_cpu(lambda: sum(range(100)), budget_s=0.01, min_reps=4)
    assert t.reps >= 4 and 0 < t.p20 <= t.median <= t.p80 < 1.0     # ms per call of a ~1 us function


def test_time_cpu_slow_call_gets_min_reps_and_real_milliseconds():
    """A call longer than the budget: one sample per call, topped up to min_reps; the numbers are ms."""
    import time as _time
    durations = iter([0.0] + [0.01, 0.03, 0.02] * 10)    # the first (untimed) call, then 10, 30, 20 ms

    def fn():
        _time.sleep(next(durations))
    t = harness.time_cpu(fn, budget_s=0.001, min_reps=3)
    assert t.reps == 3
    assert 9 <= t.p20 < t.median < t.p80 < 60 and 19 <= t.median < 45


def test_time_cpu_keeps_the_callers_thread_count():
    """torch.utils.benchmark.Timer sets its own thread count (default 1) while it measures."""
    seen = []
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        harness.time_cpu(lambda: seen.append(torch.get_num_threads()), budget_s=0.001, min_reps=1)
    finally:
        torch.set_num_threads(before)
    assert seen and set(seen) == {2}


def test_time_gpu_through_triton_do_bench_with_a_fake_device(monkeypatch):
    """time_gpu calls the installed triton.testing.do_bench (its signature, the order of the quantiles it
    returns, the L2 clear before each repetition), here on a fake device whose events read perf_counter."""
    pytest.importorskip("triton")
    import inspect
    import time as _time

    import triton.testing
    assert {"warmup", "rep", "quantiles", "return_mode"} <= set(inspect.signature(triton.testing.do_bench).parameters)
    config = triton.runtime.driver
    if not hasattr(config, "_active"):
        pytest.skip("this triton selects its driver differently")
    clears, calls = [], []

    class FakeEvent:
        def __init__(self, enable_timing=False):
            self.t = None

        def record(self):
            self.t = _time.perf_counter()

        def elapsed_time(self, end):
            return (end.t - self.t) * 1e3

    class Interface:
        Event = FakeEvent

        @staticmethod
        def synchronize():
            pass

    class Driver:
        def get_device_interface(self):
            return Interface

        def get_empty_cache_for_benchmark(self):
            return "cache"

        def clear_cache(self, cache):
            clears.append(len(calls))

    monkeypatch.setattr(config, "_active", Driver())
    sleeps = [0.001, 0.002, 0.003, 0.004, 0.005]

    def fn():
        calls.append(1)
        _time.sleep(sleeps[len(calls) % 5])
    t = harness.time_gpu(fn, warmup_ms=5, rep_ms=60)
    assert t.p20 < t.median < t.p80 and t.p80 - t.p20 > 1.0      # 1..5 ms calls: a spread, in ms, in order
    assert 1.0 < t.median < 10.0
    assert len(clears) >= 5 + 10                                  # the estimate's 5 calls and every repetition
# ---------------------------------------------------------------------------------------------
# CSV schema and metrics
# ---------------------------------------------------------------------------------------------

def test_git_commit_outside_a_checkout(tmp_path, monkeypatch):
    """A lent GPU machine gets a copy of the working tree without .git: the commit comes from the environment."""
    monkeypatch.setattr(harness, "ROOT", str(tmp_path))
    monkeypatch.delenv("TILEFORMER_GIT_COMMIT", raising=False)
    assert harness.git_commit() == "unknown"
    monkeypatch.setenv("TILEFORMER_GIT_COMMIT", "1a2b3c4")
    assert harness.git_commit() == "1a2b3c4"


def _info():
    return harness.RunInfo(gpu="NVIDIA H100 80GB HBM3", versions="torch=x", git_commit="abc", timestamp="t")


def _measured(case, provider, kind, median, p20, p80):
    return bench.Measurement(case, provider, kind, harness.Timing(median, p20, p80, 10))


def test_csv_schema_and_metrics(tmp_path):
    assert harness.CSV_COLUMNS[:10] == ("op", "backend", "mode", "shape", "dtype", "metric", "unit", "median",
                                        "p20", "p80")
    assert {"gpu", "versions", "git_commit", "timestamp"} <= set(harness.CSV_COLUMNS)
    case = cases.attention_case("fwd", 1, 16384, 16384, 16, 16, 128, False)
    ms = [_measured(case, "torch", "backend", 4.0, 3.9, 4.2), _measured(case, "triton", "backend", 2.0, 1.9, 2.1),
          _measured(case, "flash-attn", "peer", 2.5, 2.4, 2.6),
          bench.Measurement(case, "cuda", "backend", note="not available: no kernel")]
    bench.add_speedups(ms)
    peak = formulas.lookup_peak(_info().gpu, env={})
    rows = bench.csv_rows(ms, _info(), peak)
    path = tmp_path / "bench.csv"
    harness.write_csv(str(path), rows)
    back = harness.read_csv(str(path))
    assert [tuple(r.keys()) for r in back] == [harness.CSV_COLUMNS] * len(rows)
    tri = {r["metric"]: r for r in back if r["backend"] == "triton"}
    assert set(tri) == {"time", "throughput", "bandwidth", "time_over_roofline", "speedup_vs_torch",
                        "speedup_vs_best_peer"}
    assert tri["time"]["unit"] == "ms" and tri["time"]["median"] == 2.0
    flops = formulas.attention_flops(1, 16, 16384, 16384, 128, False)
    assert tri["throughput"]["median"] == pytest.approx(flops / 2e-3 / 1e12, rel=1e-5)
    assert tri["throughput"]["p20"] <= tri["throughput"]["median"] <= tri["throughput"]["p80"]
    assert tri["time_over_roofline"]["median"] == pytest.approx(2e-3 / (flops / 989e12), rel=1e-5)
    assert tri["speedup_vs_torch"]["median"] == pytest.approx(2.0)
    assert tri["speedup_vs_best_peer"]["median"] == pytest.approx(1.25)
    assert tri["speedup_vs_best_peer"]["note"] == "flash-attn"
    cuda = [r for r in back if r["backend"] == "cuda"]
    assert len(cuda) == 1 and cuda[0]["median"] is None and cuda[0]["note"] == "not available: no kernel"
    assert all(r["gpu"] == _info().gpu and r["git_commit"] == "abc" for r in back)
    # without a peak (CPU / unknown GPU): no roofline row
    assert "time_over_roofline" not in {m[0] for m in bench.metrics(ms[1], None)}


def test_read_csv_rejects_another_schema(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("op,backend,median\nflash_attention,torch,1.0\n")
    with pytest.raises(ValueError, match="schema"):
        harness.read_csv(str(path))


def test_shape_strings_round_trip():
    p = {"B": 2, "L": 8192, "causal": True, "layout": "paged"}
    s = harness.format_shape(p)
    assert s == "B=2 L=8192 causal=1 layout=paged"
    assert harness.parse_shape(s) == {"B": 2, "L": 8192, "causal": 1, "layout": "paged"}
    assert harness.results_dirname("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert harness.results_dirname(None) == "cpu"


# ---------------------------------------------------------------------------------------------
# Sweeps, inputs, providers
# ---------------------------------------------------------------------------------------------

def test_gpu_sweep_is_the_issue_sweep():
    sw = cases.sweep("gpu")
    att = [c.p for c in sw if c.op == "flash_attention" and c.mode == "fwd"]
    assert {p["Nq"] for p in att} == {512, 1024, 2048, 4096, 8192, 16384}
    assert all(p["B"] * p["Nq"] == 16384 and p["Hq"] * p["D"] == 2048 for p in att)
    assert {p["D"] for p in att} == {64, 128} and {p["causal"] for p in att} == {0, 1}
    assert any(p["Hq"] == 8 * p["Hkv"] for p in att)
    assert {c.mode for c in sw if c.op == "flash_attention"} == {"fwd", "bwd", "fwd+bwd"}
    dec = [c.p for c in sw if c.op == "decode_attention"]
    assert len(dec) == 54
    assert {p["B"] for p in dec} == {1, 8, 64} and {p["L"] for p in dec} == {1024, 8192, 32768}
    assert {p["Hq"] // p["Hkv"] for p in dec} == {1, 4, 8} and {p["page"] for p in dec} == {0, 256}
    norms = [c for c in sw if c.op in ("layer_norm", "rms_norm")]
    assert {c.p["N"] for c in norms} == {512, 1024, 2048, 4096, 8192, 16384, 32768, 65536}
    assert {c.p["M"] for c in norms} == {16384} and len(norms) == 8 * 2 * 2
    only = cases.sweep("cpu", ops=("rms_norm",))
    assert only and all(c.op == "rms_norm" for c in only)
    with pytest.raises(ValueError, match="kind"):
        cases.sweep("huge")


def test_inputs_are_random_and_shaped():
    c = cases.decode_case(2, 40, 4, 2, 8, page=16, dtype="fp16")
    inp = cases.make_inputs(c, "cpu")
    assert inp["k_cache"].shape == (2 * 3, 16, 2, 8) and inp["k_cache"].dtype == torch.float16
    assert sorted(inp["block_table"].flatten().tolist()) == list(range(6))
    assert inp["cache_seqlens"].tolist() == [40, 40]
    a = cases.make_inputs(cases.attention_case("bwd", 1, 5, 7, 2, 1, 8, True), "cpu", requires_grad=True)
    assert a["q"].requires_grad and a["k"].shape == (1, 7, 1, 8)
    assert (a["q"] != 0).float().mean() > 0.9 and a["q"].float().std() > 0.5
    n = cases.make_inputs(cases.norm_case("layer_norm", "bwd", 3, 5), "cpu", requires_grad=True)
    assert len(n["grad_inputs"]) == 3


def test_backend_variant_sets_its_knob_only_during_the_call(monkeypatch):
    seen = []
    monkeypatch.setattr(providers.transformer, "rms_norm",
                        lambda *a, **kw: seen.append((os.environ.get("TILEFORMER_TEST_KNOB"), kw["backend"])))
    monkeypatch.setenv("TILEFORMER_TEST_KNOB", "before")
    var = providers.BackendVariant("torch-knob", "torch", {"TILEFORMER_TEST_KNOB": "on"}, ("rms_norm",))
    case = cases.norm_case("rms_norm", "fwd", 4, 32, dtype="fp32")
    inp = cases.make_inputs(case, "cpu")
    var.build(case, inp)()
    assert seen == [("on", "torch")] and os.environ["TILEFORMER_TEST_KNOB"] == "before"
    other = cases.norm_case("layer_norm", "fwd", 4, 32, dtype="fp32")
    assert "variant of torch for rms_norm only" in var.unavailable(other, cases.make_inputs(other, "cpu"), "cpu")
    assert [p.name for p in providers.providers(["cuda-fwd-w4"], peers=False)] == ["cuda-fwd-w4"]


def test_profile_kernel_flop_multiples():
    from benchmarks.profile_kernels import kernel_flop_multiple
    assert kernel_flop_multiple("_attn_fwd") == kernel_flop_multiple(
        "void tf::attention::attn_fwd_kernel<__half, 128, 128, 64, 8, true>(tf::attention::Params)") == 1.0
    assert kernel_flop_multiple("_attn_bwd_dkdv") == kernel_flop_multiple("attn_bwd_dkdv_kernel<...>") == 2.0
    assert kernel_flop_multiple("_attn_bwd_dq") == kernel_flop_multiple("attn_bwd_dq_kernel<...>") == 1.5
    assert kernel_flop_multiple("_attn_bwd_preprocess") is None and kernel_flop_multiple("elementwise") is None


def test_profile_case_smoke_on_cpu():
    """The profiling code path (run on a GPU by benchmarks/gpu_session.sh) on the CPU with the torch backend."""
    from benchmarks.profile_kernels import profile_case
    case = cases.attention_case("fwd+bwd", 1, 64, 64, 2, 2, 32, True, dtype="fp32")
    rows = profile_case(providers.Backend("torch"), case, reps=2, device="cpu")
    assert rows and all(ms >= 0 and calls > 0 for _, ms, calls in rows), rows
    assert "needs" in profile_case(providers.PEERS[0], case, device="cpu")   # a peer without a GPU: its reason


def test_backend_reasons_and_errors_do_not_crash():
    case = cases.norm_case("rms_norm", "fwd", 4, 32, dtype="fp32")
    inp = cases.make_inputs(case, "cpu")
    assert providers.Backend("torch").unavailable(case, inp, "cpu") is None
    bad_args = (torch.zeros(4, 32, dtype=torch.int32), None, 1e-6)
    assert providers.backend_reason("rms_norm", "torch", bad_args, {}).startswith("explain() raised TypeError")
    assert providers.Peer.unavailable(providers.PEERS[0], case, inp, "cpu")   # peers need a GPU

    class Broken:
        name, kind = "broken", "backend"

        def unavailable(self, case, inp, device):
            return None

        def build(self, case, inp):
            def run():
                raise RuntimeError("kernel exploded")
            return run
    ms = bench.run_case(case, [providers.Backend("torch"), Broken()], "cpu", cpu_budget_s=0.01)
    assert ms[0].ok and not ms[1].ok and "kernel exploded" in ms[1].note
    assert bench.format_measurement(ms[1], None).strip().startswith("broken")


def test_correctness_uses_the_one_tolerance_rule():
    import transformer.testing
    assert correctness.assert_close is transformer.testing.assert_close


def test_plots_written(tmp_path):
    case_rows = []
    info = _info()
    for n in (1024, 4096):
        for prov, ms_ in (("torch", 2.0), ("triton", 1.0)):
            c = cases.attention_case("fwd", 16384 // n, n, n, 16, 16, 128, True)
            m = _measured(c, prov, "backend", ms_ * n / 1024, ms_, ms_ * 1.1 * n / 1024)
            case_rows += bench.csv_rows([m], info, None)
        c = cases.norm_case("rms_norm", "bwd", 64, n)
        case_rows += bench.csv_rows([_measured(c, "torch", "backend", 0.5, 0.4, 0.6)], info, None)
    path = tmp_path / "bench.csv"
    harness.write_csv(str(path), case_rows)
    rows = harness.read_csv(str(path))
    peak = formulas.lookup_peak(info.gpu, env={})
    out = plots.plot_csv_rows(rows, str(tmp_path), peak, info.gpu)
    assert sorted(os.path.basename(p) for p in out) == ["flash_attention_bf16.png", "rms_norm_bf16.png"]
    assert all(os.path.getsize(p) > 10_000 for p in out)
    # roofline in TFLOP/s: at N=4096 compute-bound (= the peak); at N=1024 causal the 268 MB of q, k, v, out
    # take longer at 3.35 TB/s than the 68.7 GFLOPs at 989 TFLOP/s: memory-bound, below the peak
    roof = plots._roofline("flash_attention", "fwd", "bf16", "Hq=16 Hkv=16 D=128 causal=1", [1024, 4096], rows, peak)
    c = cases.attention_case("fwd", 16, 1024, 1024, 16, 16, 128, True)
    assert c.bytes() == 4 * 16 * 1024 * 16 * 128 * 2
    assert roof[0] == pytest.approx(c.flops() / (c.bytes() / 3.35e12) / 1e12) and roof[0] < 989
    assert roof[1] == pytest.approx(989.0)


# ---------------------------------------------------------------------------------------------
# Kernel report table, progress bars
# ---------------------------------------------------------------------------------------------

def test_kernel_report_prints_names_in_full():
    long = "norms.cu:void tf::norms::norm_fwd_kernel<__nv_bfloat16, float, 1024, 4>(tf::norms::FwdParams, bool)"
    stats = [kernel_report.KernelStats(name="short", arch=80, registers=40),
             kernel_report.KernelStats(name=long, arch=90, registers=128, spill_stores=4),
             kernel_report.KernelStats(name=long[:-6] + "(int)", arch=90, error="ptxas: boom")]
    text = kernel_report.format_table(stats)
    lines = text.splitlines()
    assert long in lines and long[:-6] + "(int)" in lines            # a line of its own, not cut
    rows = [ln for ln in lines[2:] if "sm_" in ln]
    assert len(rows) == 3 and {ln.index("sm_") for ln in rows} == {kernel_report.NAME_WIDTH + 1}  # in columns
    assert lines[0].index("arch") + len("arch") == kernel_report.NAME_WIDTH + 6
    assert lines[lines.index(long) + 1].split()[:4] == ["sm_90", "128", "4", "0"]
    assert lines[2].startswith("short ") and "ERROR ptxas: boom" in text


def test_progress_without_a_terminal_writes_few_lines():
    stream = io.StringIO()
    with progress.bar(total=500, desc="timing", unit="case", stream=stream) as bar:
        for i in range(500):
            bar.set_postfix_str(f"case {i}")
            bar.update()
    lines = stream.getvalue().splitlines()
    assert 2 <= len(lines) <= 4, lines                      # the first, the last (and at most one per 20 s)
    assert "\r" not in stream.getvalue() and "500/500" in lines[-1] and "case 499" in lines[-1]


def test_progress_of_a_subprocess_is_drawn_by_the_parent(monkeypatch, capsys):
    monkeypatch.setenv(progress.ENV, "parent")
    with progress.bar(total=3, desc="correctness", unit="check") as bar:
        bar.set_postfix_str("torch layer_norm")
        bar.update()
        bar.update()
    markers = capsys.readouterr().out.splitlines()
    states = [progress.parse(line + "\n") for line in markers]
    assert all(states) and progress.parse("  layer_norm fwd PASS\n") is None
    assert states[-1]["closed"] and states[-1]["n"] == 2 and states[-1]["total"] == 3
    monkeypatch.delenv(progress.ENV)
    drawn = io.StringIO()
    monkeypatch.setattr(sys, "stderr", drawn)
    mirror = progress.Mirror()
    for st in states[:-1]:
        mirror.apply(st)
    assert mirror.bar.n == 2 and mirror.bar.total == 3
    mirror.apply(states[-1])
    assert mirror.bar is None and "2/3" in drawn.getvalue() and "torch layer_norm" in drawn.getvalue()


# ---------------------------------------------------------------------------------------------
# benchmarks.run: --list writes nothing; output moved into place only when a run completes
# ---------------------------------------------------------------------------------------------

def _tree(path):
    return sorted((os.path.relpath(os.path.join(d, f), path), open(os.path.join(d, f)).read())
                  for d, _, files in os.walk(path) for f in files)


@pytest.fixture(autouse=True)
def _restore_poison(monkeypatch):
    """benchmarks.run.main sets TILEFORMER_POISON=0 for its process: undone after each test."""
    monkeypatch.setenv("TILEFORMER_POISON", os.environ.get("TILEFORMER_POISON", "0"))


def test_run_list_writes_nothing(tmp_path, capsys):
    dest = tmp_path / "dest"
    assert bench_run.main(["--list", "--sections", "timing,correctness", "--ops", "rms_norm",
                           "--out", str(dest)]) == 0
    out = capsys.readouterr().out
    assert "rms_norm" in out and "correctness: not run with --list" in out
    assert os.listdir(tmp_path) == []


@pytest.fixture
def fake_timing(monkeypatch):
    """benchmarks.run with a timing section that writes bench.csv (+1 row each call) and can fail."""
    calls = []

    def section_timing(args, gpu, peak, out, deadline):
        path = out.path("bench.csv")
        rows = harness.read_csv(path) if args.append and os.path.exists(path) else []
        for r in rows:
            for k in ("median", "p20", "p80"):
                r[k] = "" if r[k] is None else r[k]
        rows.append(harness.csv_row(_info(), op="rms_norm", backend="torch", mode="fwd", shape=f"call={len(calls)}",
                                    dtype="bf16", metric="time", unit="ms", median=1.0))
        harness.write_csv(path, rows)
        calls.append(out)
        bench_run.say("timing done")
        if getattr(section_timing, "fail", None):
            raise section_timing.fail
    monkeypatch.setattr(bench_run, "section_timing", section_timing)
    monkeypatch.setattr(bench_run, "describe_machine", lambda gpu, peak: bench_run.say("machine"))
    return section_timing


def test_run_moves_results_into_place_when_complete(tmp_path, fake_timing, capsys):
    dest = tmp_path / "cpu"
    dest.mkdir()
    (dest / "correctness.csv").write_text("kept\n")
    (dest / "run.log").write_text("old log\n")
    assert bench_run.main(["--sections", "timing", "--out", str(dest)]) == 0
    assert sorted(os.listdir(tmp_path)) == ["cpu"]                           # no partial folder left
    assert sorted(os.listdir(dest)) == ["bench.csv", "correctness.csv", "run.log"]
    assert (dest / "correctness.csv").read_text() == "kept\n"                 # not written by this run: kept
    assert "old log" not in (dest / "run.log").read_text() and "timing done" in (dest / "run.log").read_text()
    assert [r["shape"] for r in harness.read_csv(str(dest / "bench.csv"))] == ["call=0"]
    # --append continues bench.csv and run.log
    assert bench_run.main(["--sections", "timing", "--append", "--out", str(dest)]) == 0
    assert [r["shape"] for r in harness.read_csv(str(dest / "bench.csv"))] == ["call=0", "call=1"]
    assert (dest / "run.log").read_text().count("timing done") == 2


@pytest.mark.parametrize("failure", [KeyboardInterrupt(), RuntimeError("kernel exploded")])
def test_run_interrupted_or_failed_leaves_the_destination_untouched(tmp_path, fake_timing, capsys, failure):
    dest = tmp_path / "cpu"
    dest.mkdir()
    (dest / "bench.csv").write_text("committed\n")
    before = _tree(str(dest))
    fake_timing.fail = failure
    if isinstance(failure, KeyboardInterrupt):
        assert bench_run.main(["--sections", "timing", "--out", str(dest)]) == 130
    else:
        with pytest.raises(RuntimeError, match="kernel exploded"):
            bench_run.main(["--sections", "timing", "--out", str(dest)])
    assert _tree(str(dest)) == before
    partial = [p for p in os.listdir(tmp_path) if p != "cpu"]
    assert len(partial) == 1 and partial[0].startswith(".cpu.partial-")
    assert sorted(os.listdir(tmp_path / partial[0])) == ["bench.csv", "run.log"]
    err = capsys.readouterr().err
    assert "left as it was" in err and partial[0] in err
