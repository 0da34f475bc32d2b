// Plain types shared by the torch bindings (g++) and the launchers (.cu): no torch, no device code.
// Parameter structs hold global memory as tf::gptr<T> (common/gmem.h).
#pragma once

#include <driver_types.h>  // cudaStream_t

#include <cstdint>

#include "common/gmem.h"

namespace tf {

// Storage type of a tensor, passed from the bindings to the launchers (which instantiate templates).
enum class DType : int { f32 = 0, f16 = 1, bf16 = 2 };

inline const char* dtype_name(DType d) { return d == DType::f32 ? "float32" : d == DType::f16 ? "float16" : "bfloat16"; }

}  // namespace tf
