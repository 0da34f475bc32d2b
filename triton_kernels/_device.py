"""Device-side helpers shared by the Triton kernels (``@triton.jit`` functions and constexpr constants)."""
from __future__ import annotations

import triton
import triton.language as tl

from ._utils import LN2, LOG2E

# Kernels read module globals only when they are constexpr.
K_LOG2E = tl.constexpr(LOG2E)
K_LN2 = tl.constexpr(LN2)


@triton.jit
def tanh(x):
    """tanh from exp2 (libdevice is unavailable under the interpreter); exact limits +-1 at +-inf."""
    return 1.0 - 2.0 / (tl.math.exp2(x * 2.8853900817779268) + 1.0)   # 2.885... = 2 * log2(e)
