"""tileformer microbenchmarks: `python -m benchmarks.run` (make bench) and the static kernel report
(`python -m benchmarks.kernel_report`).

Layout: formulas.py (FLOPs, bytes, peak table, roofline) -> harness.py (timing: triton.testing.do_bench on
a GPU, torch.utils.benchmark on the CPU; CSV schema, run metadata) -> cases.py (sweeps, random inputs)
-> providers.py (our backends through the public API, optional peers) -> bench.py (the sweep and its table)
-> correctness.py (interpreter/emulator pass/fail table) -> plots.py -> run.py (the CLI); progress.py
(progress bars on stderr) is used by the long sections.
Nothing here touches a GPU at import time.
"""
