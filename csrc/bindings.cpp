// The only torch-facing C++ of the project: op schemas and implementations, one binding header per op.
// Compiled twice (see common/bindings.h): for the GPU extension transformer._C (torch.ops.tileformer,
// CUDA key) and, through emu_bindings.cpp, for the CPU-emulated transformer._C_emu
// (torch.ops.tileformer_emu, CPU key). Python fakes and autograd: transformer/_cuda/.
#include "common/bindings.h"

#include "attention/attention_bindings.h"
#include "decode/decode_bindings.h"
#include "norms/norms_bindings.h"
#include "selftest/hopper_bindings.h"
#include "selftest/selftest_bindings.h"

TF_LIBRARY(m) {
  tf::selftest_bindings::define(m);
  tf::hopper_bindings::define(m);
  tf::attention_bindings::define(m);
  tf::decode_bindings::define(m);
  tf::norms_bindings::define(m);
}

TF_LIBRARY_IMPL(m) {
  tf::selftest_bindings::impl(m);
  tf::hopper_bindings::impl(m);
  tf::attention_bindings::impl(m);
  tf::decode_bindings::impl(m);
  tf::norms_bindings::impl(m);
}

// A plain Python module: importing it runs the registrations above.
#define TF_STR_(x) #x
#define TF_STR(x) TF_STR_(x)
#define TF_CAT_(a, b) a##b
#define TF_CAT(a, b) TF_CAT_(a, b)

PyMODINIT_FUNC TF_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, TF_STR(TORCH_EXTENSION_NAME),
                            "tileformer CUDA kernels (ops registered in torch.ops." TF_STR(TF_NS) ")", -1, nullptr};
  return PyModule_Create(&def);
}
