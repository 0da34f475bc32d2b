// Split-kernel instances for head dims padded to 96 (fp16 and bf16, tensor-core and CUDA-core kernels).
#include "decode/launch_split.cuh"

namespace tf::decode {
void launch_split_d96(const Params& p, cudaStream_t stream) { launch_split<96>(p, stream); }
}  // namespace tf::decode
