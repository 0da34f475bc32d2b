"""The op contracts: one module per op, shared by every kernel backend (Triton and CUDA C++).

A contract fixes an op's schema (the arguments the kernels take), its fake (shape) implementation so
``torch.compile`` traces it, its autograd formula, and the canonical entry functions that turn the public
arguments into a call of the op. A backend defines the ops in its own torch library namespace
(``tileformer_triton``, ``tileformer``, ``tileformer_emu``) and calls ``register(ns)`` once.
"""
