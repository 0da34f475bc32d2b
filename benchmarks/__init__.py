"""tileformer microbenchmarks: `python -m benchmarks.run` (make bench) and the static kernel report
(`python -m benchmarks.kernel_report`).

Layout: formulas.py (FLOPs, bytes, peak table, roofline) -> harness.py (timing: triton.testing.do_bench on
a GPU, torch.utils.benchmark on the CPU; CSV schema, run metadata) -> cases.py (sweeps, random inputs)
-> providers.py (our backends through the public API, optional peers) -> bench.py (the sweep and its table)
-> correctness.py (interpreter/emulator pass/fail table) -> plots.py -> run.py (the CLI); progress.py
(progress bars on stderr) is used by the long sections. ceilings.py measures a GPU's own matmul and copy
rates (a second roofline); profile_kernels.py gives per-kernel GPU time; interp_count.py counts what Triton
kernels execute under the interpreter and work.py turns that, with the kernel report's static facts, into the
work section; gpu_session.sh is the prepared run for a lent GPU machine.
Nothing here touches a GPU at import time.
"""
