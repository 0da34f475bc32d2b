// Split-kernel instances for head dims padded to 64 (fp16 and bf16, tensor-core and CUDA-core kernels).
#include "decode/launch_split.cuh"

namespace tf::decode {
void launch_split_d64(const Params& p, cudaStream_t stream) { launch_split<64>(p, stream); }
}  // namespace tf::decode
