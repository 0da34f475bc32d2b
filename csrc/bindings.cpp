// Torch side of the GPU extension transformer._C: input checks, allocation, dtype dispatch and op
// registration under the torch library namespace `tileformer` (torch.ops.tileformer.*).
// Kernels and their launchers live in .cu/.cuh files that include no torch header.
#include <torch/extension.h>

// Op schemas are declared here, implementations for the CUDA dispatch key below. Each op's Python
// fake (meta) implementation is registered in transformer/_cuda_ops.py so torch.compile can trace it.
TORCH_LIBRARY(tileformer, m) {
}

TORCH_LIBRARY_IMPL(tileformer, CUDA, m) {
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "tileformer CUDA kernels (ops registered under torch.ops.tileformer)";
}
