// Split-kernel instances for head dims padded to 256 (fp16 and bf16, tensor-core and CUDA-core kernels).
#include "decode/launch_split.cuh"

namespace tf::decode {
void launch_split_d256(const Params& p, cudaStream_t stream) { launch_split<256>(p, stream); }
}  // namespace tf::decode
