"""Triton kernels of tileformer, one file per op: kernels, launcher, autograd, AOT configs.

Importing a submodule imports triton. Under TRITON_INTERPRET=1 (set before import) the kernels
run on CPU tensors. Each kernel module lists the configs it ships in ``aot_configs()`` so the
static report (benchmarks/kernel_report.py) can compile them ahead of time for sm_80 and sm_90.
"""
