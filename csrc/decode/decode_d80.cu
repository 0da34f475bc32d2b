// Split-kernel instances for head dims padded to 80 (fp16 and bf16, tensor-core and CUDA-core kernels).
#include "decode/launch_split.cuh"

namespace tf::decode {
void launch_split_d80(const Params& p, cudaStream_t stream) { launch_split<80>(p, stream); }
}  // namespace tf::decode
