// Internal to decode/: the split-kernel launchers, one translation unit per padded head dim
// (decode_d<D>.cu), and the block shape they share with the host-side split heuristic (decode.cu).
#pragma once

#include "decode/decode.h"

namespace tf::decode {

struct SplitShape {
  bool tensor_cores;   // group * Sq > 4
  int warps_m;         // tensor-core kernel: 16 * warps_m rows per block
  int m_blocks;        // row blocks per KV head
};

// d_pad: 64, 80, 96, 128 or 256 (partial_dim). At most 2 row warps for d_pad 256 (shared memory).
inline SplitShape split_shape(int group, int sq, int d_pad) {
  const int rows = group * sq;
  if (!uses_tensor_cores(group, sq)) return {false, 1, 1};
  const int max_wm = d_pad <= 128 ? 4 : 2;
  int wm = rows <= 16 ? 1 : (rows <= 32 ? 2 : 4);
  wm = wm < max_wm ? wm : max_wm;
  return {true, wm, (rows + 16 * wm - 1) / (16 * wm)};
}

void launch_split_d64(const Params& p, cudaStream_t stream);
void launch_split_d80(const Params& p, cudaStream_t stream);
void launch_split_d96(const Params& p, cudaStream_t stream);
void launch_split_d128(const Params& p, cudaStream_t stream);
void launch_split_d256(const Params& p, cudaStream_t stream);

}  // namespace tf::decode
