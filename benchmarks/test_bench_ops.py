"""pytest-benchmark cases: the suite's providers on a small default sweep.

    pytest benchmarks/ --benchmark-only                       # GPU: small GPU sweep; CPU: small CPU sizes
    pytest benchmarks/ --benchmark-only -k "flash_attention and triton" --benchmark-json out.json

Same cases, inputs and timed callables as `python -m benchmarks.run` (benchmarks/cases.py, bench.py); a
provider that cannot run a case is skipped with the reason. On a GPU each call ends with a device sync
so pytest-benchmark's wall clock measures the kernel. TFLOP/s and GB/s of the median go to extra_info.
Not collected by `make test` (pytest.ini: testpaths = tests).
"""
import pytest
import torch

from benchmarks import bench, cases, formulas, providers

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    torch.set_num_threads(1)    # as benchmarks.run: steadier numbers on a shared machine


def _default_cases():
    if DEVICE == "cuda":
        att = [cases.attention_case(m, 16384 // n, n, n, 16, hkv, 128, c) for m in ("fwd", "fwd+bwd")
               for n in (1024, 4096) for (hkv, c) in ((16, 0), (16, 1), (2, 1))]
        dec = [cases.decode_case(8, 8192, 32, 8, 128, page) for page in (0, cases.PAGE_SIZE)]
        norms = [cases.norm_case(op, m, 16384, 4096) for op in ("layer_norm", "rms_norm") for m in ("fwd", "bwd")]
    else:
        att = [cases.attention_case(m, 2, 256, 256, 4, 4, 64, 1) for m in ("fwd", "fwd+bwd")]
        dec = [cases.decode_case(2, 1024, 8, 2, 64, page) for page in (0, cases.PAGE_SIZE)]
        norms = [cases.norm_case(op, m, 256, 2048) for op in ("layer_norm", "rms_norm") for m in ("fwd", "bwd")]
    return att + dec + norms


CASES = _default_cases()
PROVIDERS = {p.name: p for p in providers.providers(peers=DEVICE == "cuda")}


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("case", CASES, ids=[f"{c.op}-{c.mode}-{c.shape.replace(' ', ',')}" for c in CASES])
def test_bench(benchmark, case, provider):
    prov = PROVIDERS[provider]
    if DEVICE == "cpu" and prov.backend in ("triton", "cuda"):
        pytest.skip(f"{provider} on the CPU runs through the interpreter/emulator: not timed")
    inp = cases.make_inputs(case, DEVICE, requires_grad=case.mode != "fwd")
    reason = prov.unavailable(case, inp, DEVICE)
    if reason:
        pytest.skip(f"{provider} not available: {reason}")
    if provider == "reference" and DEVICE == "cuda" and bench.reference_bytes(case) > 8e9:
        pytest.skip("the fp32 reference would need more than 8 GB at this size")
    fn = bench.timed_callable(case, prov.build(case, inp), inp)
    if DEVICE == "cuda":
        run = fn

        def fn():
            run()
            torch.cuda.synchronize()
    benchmark.group = f"{case.op} {case.mode} {case.shape}"
    benchmark.extra_info.update(op=case.op, mode=case.mode, shape=case.shape, dtype=case.dtype, provider=provider)
    benchmark(fn)
    median_ms = benchmark.stats.stats.median * 1e3
    if case.flops():
        benchmark.extra_info["tflops"] = formulas.tflops(case.flops(), median_ms)
    benchmark.extra_info["gbps"] = formulas.gbps(case.bytes(), median_ms)
