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


@triton.jit
def dropout_keep(seed, offset, bh, rows, n0, drop_thr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Attention-dropout keep mask [BLOCK_M, BLOCK_N] of query rows `rows` ([BLOCK_M] int32) and key columns
    n0 .. n0 + BLOCK_N - 1 (n0 a multiple of 8) of attention matrix `bh` (= batch * Hq + head).

    The mapping of transformer/reference.py's ``dropout_keep``: Philox4x32-10 keyed by the 64-bit `seed`,
    counter (j >> 3, i, bh, offset mod 2^32); element (i, j) takes the 16-bit half j & 1 (0: low) of output
    word (j & 7) >> 1 and is kept iff that half is >= drop_thr. One Philox call serves 8 keys; the 8 halves
    are interleaved back into key order by a tree of joins."""
    G: tl.constexpr = BLOCK_N // 8
    c0 = tl.broadcast_to(((n0 >> 3) + tl.arange(0, G))[None, :], (BLOCK_M, G)).to(tl.uint32)
    c1 = tl.broadcast_to(rows[:, None], (BLOCK_M, G)).to(tl.uint32)
    c2 = c0 * 0 + bh.to(tl.uint32)
    c3 = c0 * 0 + offset.to(tl.uint32)
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, c2, c3)
    k0 = (r0 & 0xFFFF).to(tl.int32) >= drop_thr
    k1 = (r0 >> 16).to(tl.int32) >= drop_thr
    k2 = (r1 & 0xFFFF).to(tl.int32) >= drop_thr
    k3 = (r1 >> 16).to(tl.int32) >= drop_thr
    k4 = (r2 & 0xFFFF).to(tl.int32) >= drop_thr
    k5 = (r2 >> 16).to(tl.int32) >= drop_thr
    k6 = (r3 & 0xFFFF).to(tl.int32) >= drop_thr
    k7 = (r3 >> 16).to(tl.int32) >= drop_thr
    # join(x, y) adds a minor dim [x, y]: three levels give key offsets 4a + 2b + c for (a, b, c).
    keep = tl.join(tl.join(tl.join(k0, k4), tl.join(k2, k6)), tl.join(tl.join(k1, k5), tl.join(k3, k7)))
    return tl.reshape(keep, (BLOCK_M, BLOCK_N))
