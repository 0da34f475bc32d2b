"""The Triton backend's glue: the kernels of ``triton_kernels`` registered as torch custom ops in the
``tileformer_triton`` namespace (with the fakes and autograd of the op contracts, ``transformer.ops``), and
the canonical entry functions the dispatcher calls. Importing a submodule imports triton."""
