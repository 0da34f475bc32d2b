"""Triton kernels of tileformer, one file per op: kernels, launcher, autograd, AOT configs.

Importing a submodule imports triton. Under TRITON_INTERPRET=1 (set before import) the kernels
run on CPU tensors, and importing the package first makes the interpreter's fp32 <-> bf16
conversions round as the GPU's do (``_interpreter.patch()``). Each kernel module lists the configs
it ships in ``aot_configs()`` so the static report (benchmarks/kernel_report.py) can compile them
ahead of time for sm_80 and sm_90.
"""
from ._utils import interpreting as _interpreting

if _interpreting():
    from . import _interpreter

    _interpreter.patch()
