// Split-kernel instances for head dims padded to 128 (fp16 and bf16, tensor-core and CUDA-core kernels).
#include "decode/launch_split.cuh"

namespace tf::decode {
void launch_split_d128(const Params& p, cudaStream_t stream) { launch_split<128>(p, stream); }
}  // namespace tf::decode
