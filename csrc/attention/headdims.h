// Which head dims have compiled attention kernels: the build-time list TILEFORMER_HEADDIMS (setup.py passes
// the environment variable TILEFORMER_CUDA_HEADDIMS, e.g. "64,128" or "all"), default "64,128,256". Kernel
// sources exist for kSourceHeadDims (attention/inst/*.cu: per direction, a unit for 32 + 64, one for
// 96 + 128 and one for 192 + 256, so the default build compiles one head dim per unit); a head dim that is
// not enabled compiles to a launcher stub that throws. Head dims run padded to the next enabled one.
#pragma once

namespace tf::attention {

inline constexpr int kSourceHeadDims[] = {32, 64, 96, 128, 192, 256};

#ifdef TILEFORMER_HEADDIMS
inline constexpr const char* kHeadDimsSpec = TILEFORMER_HEADDIMS;
#else
inline constexpr const char* kHeadDimsSpec = "64,128,256";
#endif

// Is head dim d named in the spec (numbers separated by anything else; "all" enables every source dim)?
constexpr bool headdim_enabled(int d) {
  const char* s = kHeadDimsSpec;
  if (s[0] == 'a' && s[1] == 'l' && s[2] == 'l' && s[3] == 0) return true;
  int cur = 0;
  bool any = false;
  for (;; ++s) {
    const char c = *s;
    if (c >= '0' && c <= '9') {
      cur = cur * 10 + (c - '0');
      any = true;
    } else {
      if (any && cur == d) return true;
      cur = 0;
      any = false;
      if (c == 0) return false;
    }
  }
}

}  // namespace tf::attention
