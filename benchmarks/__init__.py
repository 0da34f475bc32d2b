"""tileformer microbenchmarks: `python -m benchmarks.run` (make bench), the static kernel report
(`python -m benchmarks.kernel_report`) and pytest-benchmark cases (`pytest benchmarks/ --benchmark-only`).

Layout: formulas.py (FLOPs, bytes, peak table, roofline) -> harness.py (timing, CSV schema, run metadata)
-> cases.py (sweeps, random inputs) -> providers.py (our backends through the public API, optional peers)
-> correctness.py (interpreter/emulator pass/fail table) -> plots.py -> run.py (the CLI).
Nothing here touches a GPU at import time.
"""
