"""The benchmark suite's arithmetic and plumbing: FLOP/byte formulas against hand-computed values, the peak
table and roofline (including the unknown-GPU path), the measured ceilings and their roofline, the timers and
their statistics, the CSV schema, sweeps, the providers (SDPA peers, variants), the per-kernel profile, the
interpreter's work counter and the work section, the plot writer, the kernel report's table, progress bars,
gpu_session.sh's test selection, and benchmarks.run's output folder (--list writes nothing; results are moved
into place only when a run completes)."""
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
    # int8 / fp8 cache: 2 (K, V) * 2 seqs * 10 tokens * 2 heads * (8 one-byte values + a 4-byte scale)
    assert formulas.decode_bytes(2, 1, 4, 2, 8, 10, "fp16", kv_dtype="int8") == 256 + 960 + 8


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


def test_quantized_decode_speedup_over_its_16bit_twin():
    plain, q8 = (cases.decode_case(8, 8192, 32, 4, 128, 0, kv=kv) for kv in (None, "int8"))
    other = cases.decode_case(64, 8192, 32, 4, 128, 0, kv="fp8_e4m3")            # no 16-bit twin measured
    ms = [_measured(plain, "cuda", "backend", 2.0, 1.9, 2.1), _measured(q8, "cuda", "backend", 1.0, 0.9, 1.1),
          _measured(q8, "triton", "backend", 1.0, 0.9, 1.1), _measured(other, "cuda", "backend", 1.0, 0.9, 1.1)]
    bench.add_kv_speedups(ms)
    assert [m.speedup_vs_16bit_cache for m in ms] == [None, 2.0, None, None]
    rows = {r[0]: r for r in bench.metrics(ms[1], formulas.lookup_peak(_info().gpu, env={}))}
    assert rows["speedup_vs_16bit_cache"][2] == 2.0
    assert q8.bytes() < 0.53 * plain.bytes()     # 8-bit values + a 4-byte scale per (token, head) at D 128


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
    dec = [c.p for c in sw if c.op == "decode_attention" and "kv" not in c.p]
    assert len(dec) == 54
    quant = [c.p for c in sw if c.op == "decode_attention" and "kv" in c.p]   # B x L >= 64k tokens, group 8
    assert len(quant) == 16 and {p["kv"] for p in quant} == set(cases.KV_FORMATS)
    assert all(p["B"] * p["L"] >= 65536 and p["Hq"] == 8 * p["Hkv"] and p["D"] == 128 for p in quant)
    assert all({k: v for k, v in p.items() if k != "kv"} in dec for p in quant)   # each has its 16-bit twin
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
    qc = cases.make_inputs(cases.decode_case(2, 40, 4, 2, 8, page=16, dtype="fp16", kv="int8"), "cpu")
    assert qc["k_cache"].dtype == torch.int8 and qc["v_scale"].shape == (6, 16, 2)
    assert (qc["k_cache"].abs().amax(-1) == 127).all()      # every (token, head) row scaled to its amax
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

    def section_timing(args, gpu, peak, out, deadline, measured=None):
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


# ---------------------------------------------------------------------------------------------
# Measured ceilings (ceilings.csv) and the second roofline
# ---------------------------------------------------------------------------------------------

def _ceiling_rows(gpu="NVIDIA H200", bf16=790.0, fp32=50.0, copy=4300.0):
    return [dict(gpu=gpu, metric="matmul_bf16", unit="TFLOP/s", value=bf16, datasheet=989.0, how="x", timestamp="t"),
            dict(gpu=gpu, metric="matmul_fp32", unit="TFLOP/s", value=fp32, datasheet=67.0, how="x", timestamp="t"),
            dict(gpu=gpu, metric="copy", unit="GB/s", value=copy, datasheet=4800.0, how="x", timestamp="t")]


def test_ceilings_csv_round_trip_and_measured_peak(tmp_path):
    path = tmp_path / formulas.CEILINGS_FILE
    assert formulas.read_ceilings(str(path)) == []
    formulas.write_ceilings(str(path), _ceiling_rows() + _ceiling_rows(gpu="other", bf16=1.0, copy=1.0))
    rows = formulas.read_ceilings(str(path))
    assert [r["metric"] for r in rows[:3]] == ["matmul_bf16", "matmul_fp32", "copy"] and rows[0]["value"] == 790.0
    peak = formulas.measured_peak(rows, "NVIDIA H200")
    assert (peak.tflops_16, peak.tflops_32, peak.gbps) == (790.0, 50.0, 4300.0)   # the other GPU's rows ignored
    assert peak.name == "H200 SXM measured"
    # fp32 not measured: the data sheet's; bf16 or copy missing: no measured peak
    assert formulas.measured_peak(_ceiling_rows()[::2], "NVIDIA H200").tflops_32 == 67
    assert formulas.measured_peak(_ceiling_rows()[:2], "NVIDIA H200") is None
    assert formulas.measured_peak(rows, "NVIDIA H100 80GB HBM3") is None
    path.write_text("gpu,metric,value\n")
    with pytest.raises(ValueError, match="columns"):
        formulas.read_ceilings(str(path))
    assert formulas.pct_of_peak(395.0, 790.0) == pytest.approx(50.0) and formulas.pct_of_peak(1.0, None) is None


def test_measured_roofline_metric_and_column():
    """time_over_measured_roofline next to time_over_roofline: same case, the measured rates as the floor."""
    case = cases.attention_case("fwd", 1, 16384, 16384, 16, 16, 128, False)
    m = _measured(case, "triton", "backend", 4.0, 3.9, 4.2)
    sheet = formulas.lookup_peak("NVIDIA H200", env={})
    measured = formulas.measured_peak(_ceiling_rows(), "NVIDIA H200")
    got = {r[0]: r for r in bench.metrics(m, sheet, measured)}
    flops = case.flops()
    assert got["time_over_roofline"][2] == pytest.approx(4e-3 / (flops / 989e12))
    assert got["time_over_measured_roofline"][2] == pytest.approx(4e-3 / (flops / 790e12))
    assert "compute-bound" in got["time_over_measured_roofline"][5] and "790" in got["time_over_measured_roofline"][5]
    assert "time_over_measured_roofline" not in {r[0] for r in bench.metrics(m, sheet)}
    row = bench.format_measurement(m, sheet, measured)
    assert "x meas" in bench.HEADER
    over, over_m = (float(x) for x in row.split()[5:7])
    assert over == pytest.approx(4e-3 / (flops / 989e12), rel=1e-2)
    assert over_m == pytest.approx(4e-3 / (flops / 790e12), rel=1e-2)
    rows = bench.csv_rows([m], _info(), sheet, measured)
    assert {"time_over_roofline", "time_over_measured_roofline"} <= {r["metric"] for r in rows}


def test_ceilings_measure_on_the_cpu_and_rows(tmp_path):
    """The measuring code path at small sizes on the CPU: positive rates; rows carry the data sheet's numbers."""
    from benchmarks import ceilings
    got = ceilings.measure("cpu", matmul_n=64, copy_bytes=1 << 20, rep_ms=5.0)
    assert [g[0] for g in got] == ["matmul_bf16", "matmul_fp32", "copy"] and all(g[2] > 0 for g in got)
    rows = ceilings.rows_for("NVIDIA H200", got)
    assert [r["datasheet"] for r in rows] == [989.0, 67.0, 4800.0]
    assert "of sheet" in ceilings.format_rows(rows)
    formulas.write_ceilings(str(tmp_path / "ceilings.csv"), rows)
    # load_or_measure reads this GPU's ceilings from the folder instead of measuring
    peak = ceilings.load_or_measure(str(tmp_path), "NVIDIA H200", log=lambda s: None)
    assert peak.tflops_16 == pytest.approx(got[0][2], rel=1e-4)
    assert ceilings.main(["--dry", "--out", str(tmp_path / "dry"), "--rep-ms", "5"]) == 0
    assert formulas.read_ceilings(str(tmp_path / "dry" / "ceilings.csv"))[0]["gpu"] == "cpu"


def test_plots_draw_the_measured_roofline(tmp_path, monkeypatch):
    calls = []
    real = plots._roofline
    monkeypatch.setattr(plots, "_roofline", lambda *a: calls.append(a[-1]) or real(*a))
    c = cases.attention_case("fwd", 16, 1024, 1024, 16, 16, 128, True)
    rows = bench.csv_rows([_measured(c, "triton", "backend", 1.0, 0.9, 1.1)], _info(), None)
    harness.write_csv(str(tmp_path / "b.csv"), rows)
    measured = formulas.measured_peak(_ceiling_rows(), "NVIDIA H200")
    plots.plot_csv_rows(harness.read_csv(str(tmp_path / "b.csv")), str(tmp_path), None, "NVIDIA H200", measured)
    assert measured in calls


# ---------------------------------------------------------------------------------------------
# Providers: SDPA peers, variants, "not available" found at the call
# ---------------------------------------------------------------------------------------------

def test_sdpa_peers_pin_one_backend():
    import torch.nn.functional as F
    case = cases.attention_case("fwd", 1, 16, 16, 4, 2, 8, True, "fp32")
    inp = cases.make_inputs(case, "cpu")
    flash, cudnn = (p for p in providers.PEERS if p.name in ("sdpa-flash", "sdpa-cudnn"))
    assert "needs a CUDA GPU" in flash.unavailable(case, inp, "cpu")
    out = flash.build(case, inp)()                    # torch's CPU flash kernel serves it (GQA through enable_gqa)
    ref = F.scaled_dot_product_attention(*(inp[n].transpose(1, 2) for n in "qkv"), is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out, ref)
    with pytest.raises(bench.Unavailable, match="CUDNN_ATTENTION"):
        cudnn.build(case, inp)()                      # no cuDNN kernel on the CPU: not available, not an error

    class Raises:
        name, kind = "late", "peer"

        def unavailable(self, case, inp, device):
            return None

        def build(self, case, inp):
            def run():
                raise bench.Unavailable("found out at the call")
            return run
    m = bench.measure(case, Raises(), inp, "cpu", cpu_budget_s=0.01)
    assert m.note == "not available: found out at the call"


def test_variant_knob_is_set_during_the_backward_too(monkeypatch):
    seen = []

    def fake(*a, **kw):
        x = a[0]
        return x * 1.0
    monkeypatch.setattr(providers.transformer, "rms_norm", fake)
    var = providers.BackendVariant("torch-knob", "torch", {"TILEFORMER_TEST_KNOB": "on"}, ("rms_norm",))
    monkeypatch.setattr(var, "unavailable", lambda *a: None)
    case = cases.norm_case("rms_norm", "bwd", 4, 32, dtype="fp32")
    inp = cases.make_inputs(case, "cpu", requires_grad=True)
    fn = var.wrap(bench.timed_callable(case, var.build(case, inp), inp))
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: seen.append(os.environ.get("TILEFORMER_TEST_KNOB")))
    fn()
    assert seen == ["on"] and "TILEFORMER_TEST_KNOB" not in os.environ


def test_module_variants_from_bench_variants_or_a_path_switch(monkeypatch):
    import types
    declared = types.ModuleType("fake_declared")
    declared.BENCH_VARIANTS = {"triton-x": {"KNOB": "x"}}
    switch = types.ModuleType("fake_switch")
    switch.FWD_PATH_ENV, switch._FWD_PATHS = "PATH_KNOB", ("auto", "portable", "tma")
    monkeypatch.setitem(sys.modules, "fake_declared", declared)
    monkeypatch.setitem(sys.modules, "fake_switch", switch)
    got = providers.module_variants({"fake_declared": ("flash_attention",), "fake_switch": ("flash_attention",),
                                     "no_such_module_here": ("rms_norm",)})
    assert [(v.name, v.backend, v.env) for v in got] == [
        ("triton-x", "triton", {"KNOB": "x"}), ("triton-fwd-portable", "triton", {"PATH_KNOB": "portable"}),
        ("triton-fwd-tma", "triton", {"PATH_KNOB": "tma"})]


def test_backend_reason_accepts_a_selected_line_with_the_kernel_named(monkeypatch):
    text = "flash_attention -> triton\n  call: ...\n  triton: selected (portable forward (pointer loads))\n"
    monkeypatch.setattr(providers.backends, "explain", lambda *a, **k: text)
    assert providers.backend_reason("flash_attention", "triton", (), {}) is None
    monkeypatch.setattr(providers.backends, "explain", lambda *a, **k: text.replace(
        "selected (portable forward (pointer loads))", "rejected -- head dim 300 > 256"))
    assert providers.backend_reason("flash_attention", "triton", (), {}) == "head dim 300 > 256"


def test_timing_providers_leave_out_the_reference_on_a_gpu_and_kernels_on_the_cpu():
    on_gpu = [p.name for p in bench_run.timing_providers(None, "NVIDIA H200")]
    assert "reference" not in on_gpu and {"torch", "triton", "cuda", "sdpa-flash"} <= set(on_gpu)
    assert [p.name for p in bench_run.timing_providers(["reference", "torch"], "NVIDIA H200")] == ["reference", "torch"]
    on_cpu = [p.name for p in bench_run.timing_providers(None, None)]
    assert on_cpu == ["reference", "torch"]


def test_run_default_sections(monkeypatch):
    monkeypatch.setattr(harness, "gpu_name", lambda: None)
    assert bench_run.parse_args([]).sections == "timing,correctness,work,report"
    monkeypatch.setattr(harness, "gpu_name", lambda: "NVIDIA H200")
    assert bench_run.parse_args([]).sections == "timing,correctness,report"
    assert bench_run.parse_args(["--sections", "work"]).sections == "work"


# ---------------------------------------------------------------------------------------------
# Per-kernel profile: FLOP multiples of our kernels and the peers', fused dQ, the dry run
# ---------------------------------------------------------------------------------------------

def test_profile_multiples_of_peer_kernels_and_fused_dq():
    from benchmarks.profile_kernels import kernel_flop_multiple, kernel_rows
    assert kernel_flop_multiple("void flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<...>") == 2.5
    assert kernel_flop_multiple("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<...>>") == 1.0
    assert kernel_flop_multiple("void flash::flash_bwd_dot_do_o_kernel<true, ...>") is None
    assert kernel_flop_multiple("void flash::flash_bwd_convert_dq_kernel<...>") is None
    assert kernel_flop_multiple("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3") == 1.0
    assert kernel_flop_multiple("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_7") == 2.5
    assert kernel_flop_multiple("_attn_bwd_dq_convert") is None and kernel_flop_multiple("_attn_fwd_tma") == 1.0
    assert kernel_flop_multiple("_attn_bwd_dkdv", fused_dq=True) == 2.5
    peak = formulas.lookup_peak("NVIDIA H200", env={})
    measured = formulas.measured_peak(_ceiling_rows(), "NVIDIA H200")
    # no dQ kernel in the step: the dK/dV kernel did dQ too (2.5 x the forward's 1e12 FLOPs in 5 ms = 500 TFLOP/s)
    rows = kernel_rows([("_attn_bwd_dkdv", 5.0, 1), ("_attn_bwd_dq_convert", 0.1, 1), ("_attn_fwd", 2.0, 1)],
                       1e12, "fwd+bwd", peak, measured)
    assert rows[0][3] == 2.5 and rows[0][4] == pytest.approx(500.0)
    assert rows[0][5] == pytest.approx(100 * 500 / 989) and rows[0][6] == pytest.approx(100 * 500 / 790)
    assert rows[1][3] is None and rows[2][4] == pytest.approx(500.0)
    rows = kernel_rows([("_attn_bwd_dkdv", 5.0, 1), ("_attn_bwd_dq", 3.0, 1)], 1e12, "fwd+bwd", None, None)
    assert rows[0][3] == 2.0 and rows[1][3] == 1.5 and rows[0][5] is None


def test_profile_dry_run_writes_its_files(tmp_path, capsys):
    from benchmarks import profile_kernels
    assert profile_kernels.main(["--dry", "--out", str(tmp_path), "--providers", "torch,sdpa-cudnn",
                                 "--causal", "1", "--reps", "1"]) == 0
    text = (tmp_path / "kernels.txt").read_text()
    assert "sdpa-cudnn" in text and "not run: sdpa-cudnn needs a CUDA GPU" in text and "total (fwd+bwd" in text
    import csv as _csv
    rows = list(_csv.DictReader(open(tmp_path / "kernels.csv")))
    assert rows and {r["provider"] for r in rows} == {"torch"} and tuple(rows[0]) == profile_kernels.CSV_COLUMNS
    # --append continues both files
    assert profile_kernels.main(["--dry", "--out", str(tmp_path), "--providers", "torch", "--causal", "0",
                                 "--reps", "1", "--append"]) == 0
    assert (tmp_path / "kernels.txt").read_text().startswith(text.rstrip("\n"))
    assert len(list(_csv.DictReader(open(tmp_path / "kernels.csv")))) > len(rows)
    names = [p.name for p in profile_kernels.attention_providers()]
    assert {"triton", "cuda", "cuda-fwd-w4", "sdpa-flash", "sdpa-cudnn", "flashinfer"} <= set(names)
    assert not {"reference", "torch", "liger", "apex"} & set(names)


# ---------------------------------------------------------------------------------------------
# The interpreter's work counter (benchmarks/interp_count.py)
# ---------------------------------------------------------------------------------------------

interpret_only = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                    reason="counts what Triton's interpreter executes (TRITON_INTERPRET=1)")


@interpret_only
def test_counter_counts_dots_loads_stores_atomics_per_kernel():
    import triton
    import triton.language as tl
    from benchmarks.interp_count import Counter

    @triton.jit
    def kern(A, B, C, Acc, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
        rm, rn, rk = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
        a = tl.load(A + rm[:, None] * K + rk[None, :])
        b = tl.load(B + rk[:, None] * N + rn[None, :], mask=rk[:, None] < 8, other=0.0)   # 8 of 32 rows
        c = tl.dot(a, b)
        c = tl.dot(a, b, c)
        tl.store(C + rm[:, None] * N + rn[None, :], c, mask=rm[:, None] < 4)               # 4 of 16 rows
        tl.atomic_add(Acc + rn, tl.sum(c, 0), mask=rn < 10)

    @triton.jit
    def other(X):
        tl.store(X + tl.arange(0, 8), tl.load(X + tl.arange(0, 8)) + 1)

    a, b, c, acc, x = torch.randn(16, 32), torch.randn(32, 64), torch.zeros(16, 64), torch.zeros(64), torch.zeros(8)
    with Counter() as cnt:
        kern[(3,)](a, b, c, acc, 16, 64, 32)
        other[(2,)](x)
    k = cnt.kernels["kern"]
    assert (k.launches, k.programs, k.dots) == (1, 3, 6)
    assert k.dot_flops == 3 * 2 * (2 * 16 * 64 * 32) and k.dot_shapes == {"16x64x32": 6}
    assert k.load_bytes == 3 * (16 * 32 + 8 * 64) * 4 and k.store_bytes == 3 * 4 * 64 * 4
    assert k.atomic_bytes == 3 * 2 * 10 * 4 and k.constexprs == {"M": 16, "N": 64, "K": 32}
    assert k.tiles() == "" and "16x64x32 x6" == k.shapes()
    o = cnt.kernels["other"]
    assert (o.programs, o.dots, o.load_bytes, o.store_bytes) == (2, 0, 64, 64)
    assert cnt.total().dot_flops == k.dot_flops and torch.equal(x, torch.full((8,), 2.0))


@interpret_only
def test_counter_puts_the_interpreter_back_even_after_an_error():
    from triton.runtime import interpreter as interp

    from benchmarks.interp_count import Counter
    before = (interp.InterpreterBuilder.create_dot, interp.InterpreterBuilder.create_masked_load,
              interp.GridExecutor.__call__)
    with pytest.raises(RuntimeError, match="boom"):
        with Counter():
            assert interp.InterpreterBuilder.create_dot is not before[0]
            raise RuntimeError("boom")
    assert (interp.InterpreterBuilder.create_dot, interp.InterpreterBuilder.create_masked_load,
            interp.GridExecutor.__call__) == before


@interpret_only
def test_counter_agrees_with_the_kernels_own_dot_count():
    """triton_kernels/_count.py (the kernels' own dot counter), where it exists, sees the same multiply-adds."""
    count = pytest.importorskip("triton_kernels._count")
    import transformer
    from benchmarks.interp_count import Counter
    q, k, v = (torch.randn(1, 80, 2, 32, dtype=torch.float16) for _ in range(3))
    with Counter() as mine, count.count_dots() as theirs:
        transformer.flash_attention(q, k, v, causal=True, backend="triton")
    assert mine.total().dot_flops == theirs.flops > 0


# ---------------------------------------------------------------------------------------------
# The work section (benchmarks/work.py)
# ---------------------------------------------------------------------------------------------

@interpret_only
@pytest.mark.parametrize("causal", [False, True])
def test_work_counts_attention_with_the_gpu_tiles(causal):
    """At N = 256 (a multiple of the sm_90 tiles) the non-causal forward executes exactly the ideal FLOPs; the
    causal one computes whole diagonal tiles, so more; the K/V re-reads make the bytes exceed the minimum."""
    from benchmarks import work
    case = cases.attention_case("fwd", 1, 256, 256, 2, 2, 64, causal)
    rec = work.count_one(case, providers.Backend("triton"))
    assert rec["status"] == "ok", rec
    flops, ideal, ratio, moved, mn, bratio = work.summarize(rec)
    assert ideal == formulas.attention_flops(1, 2, 256, 256, 64, causal)
    if causal:
        assert 1.0 < ratio < 1.6
    else:
        assert ratio == pytest.approx(1.0)
    assert bratio > 1.0 and mn == case.bytes()
    assert "sm_90" in rec["tiles_note"]
    fwd = next(k for k in rec["kernels"] if k["dot_flops"])
    from triton_kernels import attention as A
    bm, bn = A._GPU_CONFIGS[90]["fwd"][64][0][:2]
    assert (fwd["constexprs"]["BLOCK_M"], fwd["constexprs"]["BLOCK_N"]) == (bm, bn)
    assert A._INTERPRET_CONFIG["fwd"][:2] != (bm, bn) or bm == 64       # the interpreter's own tiles restored


def _rec(path="triton", kernels=None, status="ok"):
    return dict(path=path, op="flash_attention", mode="fwd", shape="B=1 Nq=8 Nk=8 Hq=1 Hkv=1 D=4 causal=0",
                dtype="bf16", ideal_flops=1000.0, min_bytes=400.0, status=status, note="", tiles_note="t",
                kernels=kernels if kernels is not None else [
                    dict(kernel="_k1", launches=1, programs=2, dots=4, dot_flops=1500, load_bytes=600, store_bytes=100,
                         atomic_bytes=100, constexprs={"BLOCK_M": 16}, dot_shapes={"16x16x16": 4}),
                    dict(kernel="_k2", launches=1, programs=1, dots=0, dot_flops=0, load_bytes=0, store_bytes=0,
                         atomic_bytes=0, constexprs={}, dot_shapes={})])


def test_work_tables_and_csv_from_records(tmp_path):
    from benchmarks import work
    rec = _rec()
    assert work.summarize(rec) == (1500, 1000.0, 1.5, 800, 400.0, 2.0)
    facts = {("_k1", '{"BLOCK_M": 16}'): work.Facts(source="cfg", mma="wgmma", wgmma_n="64,128", tma=2,
                                                    registers=168, smem=4096, occupancy=0.25)}
    case = cases.attention_case("fwd", 1, 8, 8, 1, 1, 4, False)
    cpat = work.cuda_patterns(case)
    cfacts = {cpat[0]: work.Facts(source="ext", mma="HMMA", registers=135, occupancy=0.23)}
    text = work.format_tables([rec, _rec("triton-x", status="n/a")], facts, cfacts, {(case, "cuda"): cpat})
    summary = text.split("Summary")[1]
    line = next(ln for ln in summary.splitlines() if " triton " in ln)
    assert "1.5x" in line and "2x" in line and "wgmma" in line and "64,128" in line and "168" in line
    assert "n/a" in next(ln for ln in summary.splitlines() if "triton-x" in ln)
    assert "HMMA" in next(ln for ln in summary.splitlines() if " cuda " in ln)
    rows = work.build_rows([rec], facts, cfacts, {(case, "cuda"): cpat})
    total = next(r for r in rows if r["kernel"] == "total")
    assert total["flops_over_ideal"] == "1.5" and total["bytes_over_min"] == "2"
    k1 = next(r for r in rows if r["kernel"] == "_k1")
    assert k1["mma"] == "wgmma" and k1["wgmma_n"] == "64,128" and k1["tiles"] == "M16"
    assert any(r["path"] == "cuda" and r["note"] == work.CUDA_NOTE for r in rows)
    assert work.plot([rec], str(tmp_path / "w.png")) and os.path.getsize(tmp_path / "w.png") > 5000


def test_work_main_writes_its_files(tmp_path, monkeypatch):
    from benchmarks import work
    monkeypatch.setattr(work, "run_counts", lambda deadline, log: [_rec()])
    assert work.main(["--out", str(tmp_path), "--no-static"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["work.csv", "work.png", "work.txt"]
    assert "Summary" in (tmp_path / "work.txt").read_text()
    monkeypatch.setattr(work, "run_counts", lambda deadline, log: [_rec(status="error")])
    assert work.main(["--out", str(tmp_path), "--no-static"]) == 1      # a kernel that raised fails the section


def test_work_matches_the_shipped_config():
    import types

    from benchmarks import work

    def fn():
        pass
    fn.__name__ = "_kern"
    cfg = lambda name, **c: types.SimpleNamespace(name=name, kernel=types.SimpleNamespace(fn=fn),  # noqa: E731
                                                  archs=(90,), constexprs=c)
    cfgs = [cfg("a", BLOCK_M=64, BLOCK_N=64, MASK_RIGHT=True, HAS_ALIBI=True),
            cfg("b", BLOCK_M=128, BLOCK_N=64, MASK_RIGHT=True, HAS_ALIBI=True),
            cfg("c", BLOCK_M=128, BLOCK_N=64, MASK_RIGHT=True, HAS_ALIBI=False)]
    best, exact = work.match_config("_kern", dict(BLOCK_M=128, BLOCK_N=64, MASK_RIGHT=True, HAS_ALIBI=False,
                                                  UPCAST=True), cfgs)
    assert best.name == "c" and exact
    best, exact = work.match_config("_kern", dict(BLOCK_M=32, BLOCK_N=32, MASK_RIGHT=True, HAS_ALIBI=True), cfgs)
    assert not exact
    assert work.match_config("_other", {}, cfgs) == (None, False)


def test_work_cuda_kernels_per_case():
    from benchmarks import work
    dec1 = cases.decode_case(2, 64, 8, 8, 64, 0)       # group 1: the CUDA-core kernel
    dec8 = cases.decode_case(2, 64, 8, 1, 64, 16)      # group 8: the mma kernel
    import re as _re
    simt = "void tf::decode::decode_simt_kernel<__nv_bfloat16, 64, 0>(tf::decode::Params)"
    mma = "void tf::decode::decode_mma_kernel<__nv_bfloat16, 64, {}>(tf::decode::Params, int, int)"
    assert _re.search(work.cuda_patterns(dec1)[0], simt) and not _re.search(work.cuda_patterns(dec8)[0], simt)
    assert _re.search(work.cuda_patterns(dec8)[0], mma.format(0))
    dec8q = cases.decode_case(2, 64, 8, 1, 64, 16, kv="int8")
    assert _re.search(work.cuda_patterns(dec8q)[0], mma.format(1)) and not _re.search(work.cuda_patterns(dec8q)[0],
                                                                                       mma.format(0))
    fwd = cases.attention_case("fwd", 1, 8, 8, 1, 1, 128, False)
    name = "void tf::attention::attn_fwd_kernel<__nv_bfloat16, 128, 128, 64, 8, true>(tf::attention::Params)"
    sm90 = ("void tf::attention::attn_fwd_sm90_kernel<__nv_bfloat16, 128, 128, 128, 2>(tf::TmaDesc, tf::TmaDesc, "
            "tf::TmaDesc, tf::attention::Params)")
    assert _re.search(work.cuda_patterns(fwd)[0], sm90) and not _re.search(work.cuda_patterns(fwd)[0], name)
    assert _re.search(work.cuda_patterns(fwd, "cuda-fwd-sm80")[0], name)
    assert not _re.search(work.cuda_patterns(fwd, "cuda-fwd-w4")[0], name)
    assert _re.search(work.cuda_patterns(fwd, "cuda-fwd-w4")[0], name.replace(", 8, true", ", 4, false"))
    assert _re.search(work.cuda_patterns(fwd, "cuda-bwd-sm80")[0], sm90)   # forces the backward only
    bwd = cases.attention_case("bwd", 1, 64, 64, 2, 2, 128, False)
    sm90_bwd = ("void tf::attention::attn_bwd_sm90_kernel<__nv_bfloat16, 128, 64, 128, 2>(tf::TmaDesc, tf::TmaDesc, "
                "tf::TmaDesc, tf::TmaDesc, tf::attention::Params)")
    sm80_bwd = "void tf::attention::attn_bwd_dkdvdq_kernel<__nv_bfloat16, 128, 128, 16, 64, 4, false, false>(tf::attention::Params)"
    assert any(_re.search(x, sm90_bwd) for x in work.cuda_patterns(bwd))
    assert not any(_re.search(x, sm80_bwd) for x in work.cuda_patterns(bwd))
    assert any(_re.search(x, sm80_bwd) for x in work.cuda_patterns(bwd, "cuda-bwd-sm80"))
    few_keys = cases.attention_case("bwd", 1, 64, 16, 2, 2, 128, False)   # <= 16 keys: the sm_80 backward
    assert any(_re.search(x, sm80_bwd) for x in work.cuda_patterns(few_keys))
    assert work.short_shape("B=1 Nq=8 Nk=8 Hq=2 Hkv=2 D=4 causal=1") == "B=1 Nq=8 Hq=2 D=4 causal=1"


def test_kernel_report_warpgroup_mma_widths():
    sass = "HGMMA.64x128x16.F32.BF16 R0, gdesc[UR4], R0 ;\nHGMMA.64x64x16.F32.BF16 R0 ;\nUSETMAXREG.DEALLOC 24 ;"
    got = kernel_report.sass_counts(sass)
    assert got["HGMMA"] == 2 and got["USETMAXREG"] == 1 and got["HGMMA.64x128x16"] == 1
    ins = {"wgmma": 3, "wgmma.m64n256k16": 1, "wgmma.m64n64k16": 2, "HGMMA.64x128x16": 1, "wgmma.m64n32k16": 0}
    assert kernel_report.mma_n_widths(ins) == [64, 128, 256] and kernel_report.mma_n_widths({}) == []


# ---------------------------------------------------------------------------------------------
# gpu_session.sh: the CUDA-test selection holds the emulator's GPU halves; the sm_90a self-tests run before timing
# ---------------------------------------------------------------------------------------------

def test_gpu_session_cuda_tests_select_the_emulator_gpu_halves():
    import re as _re
    import subprocess
    script = open(os.path.join(harness.ROOT, "benchmarks", "gpu_session.sh")).read()
    part = script[script.index("tests_cuda"):]
    expr = _re.search(r'-k "([^"]+)"', part).group(1)
    res = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                          "-m", "not slow and not static", "-k", expr, "tests/test_emulator.py"],
                         cwd=harness.ROOT, capture_output=True, text=True, timeout=300)
    ids = [ln for ln in res.stdout.splitlines() if ln.startswith("tests/test_emulator.py::")]
    assert ids and all(ln.endswith("-gpu]") for ln in ids), res.stdout[-2000:]
    assert any("test_mma_tile_equals_matmul" in ln for ln in ids) and any("test_shuffles" in ln for ln in ids)


def test_gpu_session_runs_the_hopper_selftest_gpu_halves_before_timing():
    import re as _re
    import subprocess
    script = open(os.path.join(harness.ROOT, "benchmarks", "gpu_session.sh")).read()
    assert script.index("selftest_hopper") < script.index("profile_cuda") < script.index("c. timing")
    part = script[script.index("run_for 90 selftest_hopper"):]
    expr = _re.search(r"-k (\S+) tests/test_emulator_hopper.py", part).group(1)
    res = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                          "-m", "not slow and not static", "-k", expr, "tests/test_emulator_hopper.py"],
                         cwd=harness.ROOT, capture_output=True, text=True, timeout=300)
    ids = [ln for ln in res.stdout.splitlines() if ln.startswith("tests/test_emulator_hopper.py::")]
    assert ids and all(ln.endswith("-gpu]") or "test_gpu_" in ln for ln in ids), res.stdout[-2000:]
    for name in ("test_wgmma_equals_matmul", "test_tma_copy_out_of_bounds_and_swizzle", "test_mbarrier_ping_pong"):
        assert any(name in ln for ln in ids), name
    # the named-barrier turns of the sm_90a forward, on the hardware before timing too
    assert "tests/test_emulator.py::test_named_barrier_turns_alternate" in part[:part.index("profile_cuda")]


def test_a_forced_kernel_path_that_cannot_run_is_not_available(monkeypatch):
    text = ("flash_attention -> triton\n  call: ...\n  triton: selected (the call raises: KNOB=tma_ws: the tma_ws "
            "forward cannot run this call: no warp_specialize)\n")
    seen = []

    def explain(*a, **k):
        seen.append(os.environ.get("KNOB"))
        return text
    monkeypatch.setattr(providers.backends, "explain", explain)
    var = providers.BackendVariant("triton-fwd-tma_ws", "triton", {"KNOB": "tma_ws"}, ("flash_attention",))
    case = cases.attention_case("fwd", 1, 8, 8, 1, 1, 8, False, "fp32")
    reason = var.unavailable(case, cases.make_inputs(case, "cpu"), "cpu")
    assert reason.startswith("the call raises: KNOB=tma_ws") and seen == ["tma_ws"]


def test_profile_reports_a_backend_found_unavailable_at_the_call():
    from benchmarks.profile_kernels import profile_case
    cudnn = next(p for p in providers.PEERS if p.name == "sdpa-cudnn")
    case = cases.attention_case("fwd+bwd", 1, 16, 16, 2, 2, 8, False, "fp32")
    cudnn.unavailable = lambda *a: None               # on the CPU: the call itself finds no cuDNN kernel
    try:
        assert "does not serve this call" in profile_case(cudnn, case, reps=1, device="cpu")
    finally:
        del cudnn.unavailable
