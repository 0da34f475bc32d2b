"""Context parallelism over ``torch.distributed``: ring, zigzag and Ulysses attention, forward and backward.

A sequence too long for one device is split along its tokens over the ranks of a process group (NCCL for
CUDA tensors, gloo for CPU tensors); each rank holds q/k/v of its shard, [B, N/P, H, D], and gets the
attention output of its shard, as if ``flash_attention`` had run on the whole sequence::

    import transformer as tf
    q, k, v = (tf.distributed.shard_sequence(t, "zigzag") for t in (q_full, k_full, v_full))
    out = tf.distributed.context_parallel_attention(q, k, v, scheme="zigzag", causal=True)
    out_full = tf.distributed.unshard_sequence(out, "zigzag")

Schemes (P = ranks in the group, N = the whole sequence, n = N / P tokens per rank):

* ``"ring"``: rank r holds tokens [r*n, (r+1)*n). K/V shards travel around the ring (``batch_isend_irecv`` to
  rank r+1, from rank r-1), the next shard's transfer overlapping the attention over the current one; the
  partial outputs are merged by their log-sum-exps. Causal: shards entirely after the queries are skipped, so
  rank r does r+1 of the P block products (unbalanced).
* ``"zigzag"``: the sequence is cut into 2P equal chunks and rank r holds chunks r and 2P-1-r, concatenated in
  that order. Same ring; with a causal mask every rank does the same work at every step (half a shard's
  products per step after the first).
* ``"ulysses"``: tokens as in "ring". ``all_to_all_single`` turns the sequence shards into head shards (each
  rank gets the whole sequence for Hq/P query heads and their K/V heads), one local attention call runs, and
  an all-to-all turns the output back into sequence shards.

Divisibility (checked; ValueError naming the argument): every rank's q/k/v have the same shape, q and k
the same number of tokens n >= 1; zigzag: n even (any chunk length n/2, odd included); ulysses: Hq
divisible by P, and Hkv divisible by P or P divisible by Hkv (then each K/V head is replicated P/Hkv times
before the all-to-all, so that every rank holds the K/V head of its query heads). ``shard_sequence`` needs a
full length divisible by P (ring, ulysses) or 2P (zigzag).

Positions are global: causal, ``window_size`` and ALiBi act on the token positions in the whole sequence
(for self-attention Nq = Nk, so bottom-right and top-left alignment coincide). Each pair of a query segment
and a K/V segment is cut down to the rows and columns that see anything, then runs through
``transformer.attention.attention`` (the dispatcher picks the backend, ``backend=`` as everywhere) as a mask-free
block, or a causal / windowed block with top-left alignment whose window is shifted by the segments'
position difference. ALiBi needs the block's diagonal at the kernels' alignment (a block that the global
diagonal crosses, and every Ulysses call); a ring block that lies entirely off the diagonal with ALiBi runs
through an explicit fp32 path here (scores materialised, in chunks of at most 2^22 scores), so ALiBi at
scale is served best by ``"ulysses"``. The ring schemes merge block results by their log-sum-exp, which the
"torch" backend (SDPA) does not return: with ``backend="torch"`` they raise ValueError; "auto" picks a backend
that returns it.

Backward: ``"ring"`` / ``"zigzag"`` run the ring again: K/V travel as in the forward and the dK/dV
accumulators of each shard travel with it (fp32), arriving back at their owner after P hops; each block's
gradients come from re-running that block with autograd (its forward is recomputed; block results are not
kept, so memory stays O(n)). ``"ulysses"`` differentiates through its all-to-alls.

Communication per rank and call (bytes of the local shards q, k, v, out, lse; dtypes as given):
ring/zigzag forward (P-1) x (k + v), i.e. (P-1)/P of the full K and V; backward (P-1) x (k + v) plus
P x (k + v) in fp32 (the dK/dV accumulators). Ulysses forward (P-1)/P x (q + k + v + out) (+ lse with
return_lse; k + v after any K/V head replication); backward the same volume for the gradients. Every call
also all-gathers 20 float64 values (the ranks' argument summary) to check that the ranks agree; a rank whose
arguments fail the local checks makes every rank raise, before any other communication.

Memory per rank (besides the backend's own per-block memory): ring/zigzag forward holds two K/V shards (the
current one and the one arriving) and fp32 accumulators of the output and lse; the backward adds three fp32
dK/dV buffers (this step's, the one being sent, the one arriving) and fp32 dQ. No rank materialises a K or V of
the whole sequence. Ulysses holds the whole sequence for Hq/P heads: as many elements as a shard.

When the transfer hides behind the compute (ring forward, one step, fp16/bf16, no mask): a step computes
4 * B * Hq * n^2 * D flops and moves 2 * B * n * Hkv * D * 2 bytes, so the transfer is hidden when
n > F * Hkv / (Hq * W), F the kernel's flop rate and W the link's bandwidth; independent of D. With
F = 600 TFLOP/s and W = 450 GB/s (NVLink, one direction) that is n > 1.3k tokens for MHA (2.7k for a
causal zigzag step, which does half the products); with W = 50 GB/s (InfiniBand), n > 12k. This is a model
of the code, not a measurement.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import torch
import torch.distributed as dist

from . import _checks, backends
from .attention import _describe, attention

__all__ = ["SCHEMES", "context_parallel_attention", "shard_sequence", "unshard_sequence", "sequence_positions"]

SCHEMES = ("ring", "zigzag", "ulysses")

# Largest score matrix (elements) the explicit ALiBi path materialises at once.
_EXPLICIT_MAX_SCORES = 1 << 22

# Tags that keep the two ring streams apart: K/V shards and dK/dV accumulators.
_TAG_KV, _TAG_DKV = 0, 1


# ---------------------------------------------------------------------------------------------
# Groups, shards and positions
# ---------------------------------------------------------------------------------------------

def _group(group):
    """(group, rank in it, its size). The default group when None; ValueError when torch.distributed is not
    initialised or this process is not in the group."""
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("group: torch.distributed is not initialised (call torch.distributed.init_process_group "
                         "first; a group of one process is fine)")
    if group is None:
        group = dist.group.WORLD
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("group: this process is not a member of the group")
    return group, rank, dist.get_world_size(group)


def _check_scheme(scheme):
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")


def _segments(scheme, rank, world, n):
    """((global start, length), ...) of the tokens rank `rank` holds, in local order (n tokens per rank)."""
    if scheme == "zigzag":
        c = n // 2
        return ((rank * c, c), ((2 * world - 1 - rank) * c, c))
    return ((rank * n, n),)


def _check_dim(x, dim, name):
    _checks.check_tensor(name, x)
    if not isinstance(dim, int) or isinstance(dim, bool) or not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim must be an int in {-x.dim()}..{x.dim() - 1} for {name} of shape {tuple(x.shape)}, "
                         f"got {dim!r}")
    return dim % x.dim()


def shard_sequence(x, scheme, group=None, dim=1):
    """This rank's shard of the full tensor `x` along `dim` (the sequence dim; 1 for [B, N, H, D]).

    ring / ulysses: tokens [r*n, (r+1)*n) with n = N / P; zigzag: chunks r and 2P-1-r of 2P equal chunks, in that
    order. N must be divisible by P (2P for zigzag). Differentiable (slicing): the gradient of `x` is the
    shard's gradient at the shard's positions and 0 elsewhere."""
    _check_scheme(scheme)
    dim = _check_dim(x, dim, "x")
    group, rank, world = _group(group)
    parts = 2 * world if scheme == "zigzag" else world
    total = x.shape[dim]
    if total % parts or total == 0:
        raise ValueError(f"x has {total} tokens along dim {dim}; scheme {scheme!r} over {world} ranks needs a "
                         f"positive multiple of {parts}")
    n = total // world
    pieces = [x.narrow(dim, start, length) for start, length in _segments(scheme, rank, world, n)]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=dim)


def sequence_positions(shard_len, scheme, group=None, device=None):
    """Global positions (int64 [shard_len]) of the tokens this rank holds, for position embeddings (RoPE)."""
    _check_scheme(scheme)
    if not isinstance(shard_len, int) or isinstance(shard_len, bool) or shard_len < 1:
        raise ValueError(f"shard_len must be an int >= 1, got {shard_len!r}")
    if scheme == "zigzag" and shard_len % 2:
        raise ValueError(f"shard_len must be even for scheme 'zigzag' (two equal chunks), got {shard_len}")
    _, rank, world = _group(group)
    return torch.cat([torch.arange(s, s + c, device=device)
                      for s, c in _segments(scheme, rank, world, shard_len)])


def _all_gather_cat(x, group, world):
    """[rank 0's x, rank 1's x, ...] concatenated along a new leading dim (equal shapes)."""
    x = x.contiguous()
    out = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(out, x, group=group)
    return torch.stack(out)


class _Unshard(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scheme, group, rank, world, dim):
        ctx.args = (scheme, group, rank, world, dim, x.shape[dim])
        shards = _all_gather_cat(x, group, world)             # [P, ...]
        d = dim + 1
        if scheme != "zigzag":
            return torch.cat(shards.unbind(0), dim=dim)
        firsts, seconds = shards.chunk(2, dim=d)
        order = list(firsts.unbind(0)) + list(reversed(seconds.unbind(0)))
        return torch.cat(order, dim=dim)

    @staticmethod
    def backward(ctx, grad):
        scheme, group, rank, world, dim, n = ctx.args
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, group=group)
        pieces = [grad.narrow(dim, s, c) for s, c in _segments(scheme, rank, world, n)]
        g = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=dim)
        return g, None, None, None, None, None


def unshard_sequence(shard, scheme, group=None, dim=1):
    """All-gather the ranks' shards (each `shard_sequence`'s layout, equal shapes) into the full sequence.

    Differentiable: each rank's shard receives the sum over the ranks of the gradients at its positions (the
    gradient of the sum of every rank's loss; with one loss replicated on every rank, divide by P)."""
    _check_scheme(scheme)
    dim = _check_dim(shard, dim, "shard")
    group, rank, world = _group(group)
    if scheme == "zigzag" and shard.shape[dim] % 2:
        raise ValueError(f"shard has {shard.shape[dim]} tokens along dim {dim}; scheme 'zigzag' holds two equal "
                         f"chunks (an even number)")
    return _Unshard.apply(shard, scheme, group, rank, world, dim)


# ---------------------------------------------------------------------------------------------
# Agreement of the ranks
# ---------------------------------------------------------------------------------------------

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_META = ("ok", "B", "n", "Hq", "Hkv", "D", "dtype", "scheme", "causal", "window left", "window right",
         "softmax_scale", "softcap", "alibi", "alibi batch", "return_lse", "requires_grad", "k tokens", "v heads",
         "backend")


def _summary(q, k, v, scheme, causal, window, scale, softcap, alibi_slopes, return_lse, backend):
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    alibi_b = -1 if alibi_slopes is None else (alibi_slopes.shape[0] if alibi_slopes.dim() == 2 else 0)
    be = -1 if backend == "auto" else backends.BACKENDS.index(backend)
    return [1, q.shape[0], q.shape[1], q.shape[2], k.shape[2], q.shape[3], _DTYPES.index(q.dtype),
            SCHEMES.index(scheme), int(causal), window[0], window[1], scale, softcap, int(alibi_slopes is not None),
            alibi_b, int(return_lse), int(grad), k.shape[1], v.shape[2], be]


def _agree(local, error, group, world, device):
    """All-gather the ranks' argument summaries; raise on every rank if one rank's arguments failed its local
    checks (that rank raises its own error) or if the ranks disagree."""
    row = [0.0] * len(_META) if error is not None else [float(x) for x in local]
    mine = torch.tensor(row, dtype=torch.float64, device=device)
    rows = _all_gather_cat(mine, group, world).cpu().tolist() if world > 1 else [row]
    if error is not None:
        raise error
    failed = [r for r, row_r in enumerate(rows) if row_r[0] == 0]
    if failed:
        raise ValueError(f"context_parallel_attention: rank(s) {failed} of the group rejected their arguments "
                         f"(see the error raised there); no rank started the attention")
    for i, name in enumerate(_META):
        values = [row_r[i] for row_r in rows]
        if len(set(values)) > 1:
            shapes = "; ".join(f"rank {r}: q [{int(x[1])}, {int(x[2])}, {int(x[3])}, {int(x[5])}], "
                               f"k/v [{int(x[1])}, {int(x[17])}, {int(x[4])}, {int(x[5])}]"
                               for r, x in enumerate(rows))
            shown = ", ".join(f"rank {r}: {_show(name, val)}" for r, val in enumerate(values))
            raise ValueError(f"context_parallel_attention: the ranks of the group disagree on {name} ({shown}); "
                             f"every rank must pass the same shapes and arguments (shapes: {shapes})")


def _show(name, value):
    if name == "dtype":
        return str(_DTYPES[int(value)]).replace("torch.", "")
    if name == "scheme":
        return SCHEMES[int(value)]
    if name == "backend":
        return "auto" if value < 0 else backends.BACKENDS[int(value)]
    if name in ("causal", "alibi", "return_lse", "requires_grad"):
        return str(bool(value))
    return f"{value:g}"


# ---------------------------------------------------------------------------------------------
# Block planning: which part of each (query segment, key segment) pair runs, and how
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Task:
    """One attention call: local query rows [q0, q1) against local K/V rows [k0, k1) of the block held."""
    q0: int
    q1: int
    k0: int
    k1: int
    full: bool             # no mask, no ALiBi (may be merged with a neighbour)
    causal: bool = False
    window: tuple = (-1, -1)
    align: str = "top_left"
    explicit: bool = False  # ALiBi at a position difference the kernels' alignment cannot express
    delta: int = 0          # global position of query row q0 minus that of key row k0
    left: int = -1          # the global window (explicit path)
    right: int = -1


def _plan_pair(qpos, nq, kpos, nk, qoff, koff, causal, window, alibi):
    """The task for query segment (global start qpos, nq tokens, local offset qoff) against key segment
    (kpos, nk, koff), or None when no query sees a key.

    Query i (global qpos + i) sees key j (global kpos + j) iff j >= i + delta - left and j <= i + delta + right
    (delta = qpos - kpos; causal is right = 0; -1 = unbounded). Rows that see nothing are cut from the top
    (they lie above the upper bound) and bottom (below the lower bound), keys from the left and right, so
    every row of the call sees a key; then top-left alignment expresses the window shifted by delta'."""
    left = window[0] if window[0] >= 0 else None
    right = window[1] if window[1] >= 0 else None
    if causal:
        right = 0
    delta = qpos - kpos
    i_lo = 0 if right is None else max(0, -(delta + right))
    i_hi = nq if left is None else min(nq, nk - delta + left)
    if i_lo >= i_hi:
        return None
    j_lo = 0 if left is None else max(0, i_lo + delta - left)
    j_hi = nk if right is None else min(nk, i_hi + delta + right)
    if j_lo >= j_hi:
        return None
    m, w, d = i_hi - i_lo, j_hi - j_lo, delta + i_lo - j_lo
    if left is not None and m - 1 + d - left <= 0:       # every row's lower bound at or before key 0
        left = None
    if right is not None and d + right >= w - 1:          # every row's upper bound at or after the last key
        right = None
    rows, cols = (qoff + i_lo, qoff + i_hi), (koff + j_lo, koff + j_hi)
    if left is None and right is None and not alibi:
        return _Task(*rows, *cols, full=True)
    if alibi and d not in (0, w - m):
        return _Task(*rows, *cols, full=False, explicit=True, delta=d,
                     left=-1 if left is None else left, right=-1 if right is None else right)
    # Kernel alignment: query i sits at key i + o (o = 0 top-left, w - m bottom-right); the window is shifted
    # by d - o. ALiBi needs o == d exactly; without it top-left always fits after the cuts above.
    align, o = ("top_left", 0) if (d == 0 or not alibi) else ("bottom_right", w - m)
    lk = -1 if left is None else left - (d - o)
    rk = -1 if right is None else right + (d - o)
    assert lk >= -1 and rk >= -1 and (left is None or lk >= 0) and (right is None or rk >= 0)
    return _Task(*rows, *cols, full=False, causal=rk == 0, window=(lk, -1 if rk == 0 else rk), align=align)


def _merge_full(tasks):
    """Merge mask-free tasks that share their key rows and have adjacent query rows, then those that share their
    query rows and have adjacent key rows (zigzag's steps become one call each)."""
    full = [t for t in tasks if t.full]
    rest = [t for t in tasks if not t.full]
    for same, span, make in (
            (lambda t: (t.k0, t.k1), lambda t: (t.q0, t.q1), lambda t, a, b: dataclasses.replace(t, q0=a, q1=b)),
            (lambda t: (t.q0, t.q1), lambda t: (t.k0, t.k1), lambda t, a, b: dataclasses.replace(t, k0=a, k1=b))):
        full.sort(key=lambda t: (same(t), span(t)))
        merged = []
        for t in full:
            if merged and same(merged[-1]) == same(t) and span(merged[-1])[1] == span(t)[0]:
                merged[-1] = make(merged[-1], span(merged[-1])[0], span(t)[1])
            else:
                merged.append(t)
        full = merged
    return rest + full


def _split_rows(task, max_rows):
    if not task.explicit or task.q1 - task.q0 <= max_rows:
        return [task]
    return [dataclasses.replace(task, q0=a, q1=min(a + max_rows, task.q1), delta=task.delta + (a - task.q0))
            for a in range(task.q0, task.q1, max_rows)]


@functools.lru_cache(maxsize=256)
def _plan(scheme, rank, src, world, n, causal, window, alibi, explicit_rows):
    """The tasks of rank `rank` holding the K/V shard of rank `src`."""
    qsegs, ksegs = _segments(scheme, rank, world, n), _segments(scheme, src, world, n)
    if src == rank and causal and window == (-1, -1) and not alibi:
        # The shard against itself: positions increase along the local order, so the global causal mask is
        # the local one (zigzag's two chunks included).
        return (_Task(0, n, 0, n, full=False, causal=True),)
    tasks = []
    qoff = 0
    for qpos, nq in qsegs:
        koff = 0
        for kpos, nk in ksegs:
            t = _plan_pair(qpos, nq, kpos, nk, qoff, koff, causal, window, alibi)
            if t is not None:
                tasks.extend(_split_rows(t, explicit_rows))
            koff += nk
        qoff += nq
    return tuple(_merge_full(tasks))


# ---------------------------------------------------------------------------------------------
# Block computation and merging
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Config:
    scheme: str
    group: object
    rank: int
    world: int
    causal: bool
    window: tuple
    scale: float
    softcap: float
    alibi: Optional[torch.Tensor]
    backend: str

    def peer(self, offset):
        return dist.get_global_rank(self.group, (self.rank + offset) % self.world) \
            if self.group is not dist.group.WORLD else (self.rank + offset) % self.world

    def tasks(self, src, n, batch, hq):
        rows = max(1, _EXPLICIT_MAX_SCORES // max(1, batch * hq * n))
        return _plan(self.scheme, self.rank, src, self.world, n, self.causal, self.window, self.alibi is not None,
                     rows)


def _explicit_attention(q, k, v, delta, left, right, slopes, scale, softcap):
    """fp32 attention of q [B, m, Hq, D] against k/v [B, w, Hkv, D] where query i sits at global position
    delta + i relative to key 0: window (left, right) and ALiBi on that difference. Returns (out, lse) fp32."""
    b, m, hq, d = q.shape
    w, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    qf = q.float().reshape(b, m, hkv, g, d)
    s = torch.einsum("bihgd,bjhd->bhgij", qf, k.float()) * scale                  # [B, Hkv, G, m, w]
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    dist_ = (torch.arange(m, device=q.device) + delta)[:, None] - torch.arange(w, device=q.device)[None, :]
    if slopes is not None:
        sl = slopes.float().reshape(-1, hkv, g)                                      # [1 or B, Hkv, G]
        s = s - sl[..., None, None] * dist_.abs().float()
    visible = torch.ones(m, w, dtype=torch.bool, device=q.device)
    if left >= 0:
        visible &= dist_ <= left
    if right >= 0:
        visible &= -dist_ <= right
    s = s.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse).unsqueeze(-1))
    out = torch.einsum("bhgij,bjhd->bihgd", p, v.float()).reshape(b, m, hq, d)
    return out, lse.reshape(b, hq, m)


def _run(task, q, k, v, cfg):
    """(out, lse) of one task; out in q's dtype (fp32 on the explicit path), lse fp32 [B, Hq, rows]."""
    qs, ks, vs = q[:, task.q0:task.q1], k[:, task.k0:task.k1], v[:, task.k0:task.k1]
    if task.explicit:
        return _explicit_attention(qs, ks, vs, task.delta, task.left, task.right, cfg.alibi, cfg.scale, cfg.softcap)
    return attention(qs, ks, vs, causal=task.causal, causal_align=task.align, softmax_scale=cfg.scale,
                     window_size=task.window, alibi_slopes=None if task.full else cfg.alibi, softcap=cfg.softcap,
                     return_lse=True, backend=cfg.backend)


def _finite(x):
    return torch.where(torch.isneginf(x), torch.zeros_like(x), x)


def _merge(acc, acc_lse, out, lse, q0, q1):
    """acc[:, q0:q1], acc_lse[..., q0:q1] <- the log-sum-exp combination with (out, lse) (in place, fp32)."""
    old = acc_lse[:, :, q0:q1]
    new = torch.logaddexp(old, lse)
    ref = _finite(new)
    a = torch.exp(old - ref).transpose(1, 2).unsqueeze(-1)
    b = torch.exp(lse - ref).transpose(1, 2).unsqueeze(-1)
    acc[:, q0:q1] = acc[:, q0:q1] * a + out.float() * b
    acc_lse[:, :, q0:q1] = new


def _exchange(send, recv, cfg, tag):
    """Post: send `send` to the next rank, receive `recv` from the previous one. Returns the requests."""
    ops = [dist.P2POp(dist.isend, send, cfg.peer(1), cfg.group, tag),
           dist.P2POp(dist.irecv, recv, cfg.peer(-1), cfg.group, tag)]
    return dist.batch_isend_irecv(ops)


def _wait(reqs):
    for r in reqs or ():
        r.wait()


def _ring_forward(q, k, v, cfg):
    b, n, hq, d = q.shape
    acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    acc_lse = torch.full((b, hq, n), float("-inf"), dtype=torch.float32, device=q.device)
    kv = torch.stack([k, v])
    for step in range(cfg.world):
        src = (cfg.rank - step) % cfg.world
        reqs = nxt = None
        if step < cfg.world - 1:
            nxt = torch.empty_like(kv)
            reqs = _exchange(kv, nxt, cfg, _TAG_KV)
        for task in cfg.tasks(src, n, b, hq):
            out, lse = _run(task, q, kv[0], kv[1], cfg)
            _merge(acc, acc_lse, out, lse, task.q0, task.q1)
        _wait(reqs)
        if nxt is not None:
            kv = nxt
    return acc, acc_lse


def _ring_backward(q, k, v, out, lse, dout, dlse, cfg, need_dq):
    """Gradients of the merged attention: each block re-run with autograd, its upstream gradients set so that
    its own backward computes the global softmax's (dS = P (dO.v - <dO, O> + dLSE) with the global P, O, lse)."""
    b, n, hq, d = q.shape
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    if dout is None:
        dout = torch.zeros_like(out)
    row = (dout.float() * out).sum(-1).transpose(1, 2)                 # <dO, O>, [B, Hq, n]
    if dlse is not None:
        row = row - dlse
    lse_ref = _finite(lse)
    kv = torch.stack([k, v])
    dkv_in, dkv_reqs, dkv_keep = None, None, None
    for step in range(cfg.world):
        src = (cfg.rank - step) % cfg.world
        reqs = nxt = None
        if step < cfg.world - 1:
            nxt = torch.empty_like(kv)
            reqs = _exchange(kv, nxt, cfg, _TAG_KV)
        dkv = torch.zeros(kv.shape, dtype=torch.float32, device=q.device)
        for task in cfg.tasks(src, n, b, hq):
            with torch.enable_grad():
                qs = q[:, task.q0:task.q1].detach().requires_grad_(need_dq)
                ks = kv[0, :, task.k0:task.k1].detach().requires_grad_()
                vs = kv[1, :, task.k0:task.k1].detach().requires_grad_()
                t = dataclasses.replace(task, q0=0, q1=task.q1 - task.q0, k0=0, k1=task.k1 - task.k0)
                o_b, lse_b = _run(t, qs, ks, vs, cfg)
            w = torch.exp(lse_b.detach() - lse_ref[:, :, task.q0:task.q1])                 # [B, Hq, rows]
            g_o = (dout[:, task.q0:task.q1].float() * w.transpose(1, 2).unsqueeze(-1)).to(o_b.dtype)
            g_lse = ((g_o.float() * o_b.detach().float()).sum(-1).transpose(1, 2)
                     - w * row[:, :, task.q0:task.q1]).contiguous()
            inputs = (qs, ks, vs) if qs.requires_grad else (ks, vs)
            grads = torch.autograd.grad((o_b, lse_b), inputs, (g_o, g_lse))
            if qs.requires_grad:
                dq[:, task.q0:task.q1] += grads[0]
            dkv[0, :, task.k0:task.k1] += grads[-2]
            dkv[1, :, task.k0:task.k1] += grads[-1]
        if dkv_reqs is not None:
            _wait(dkv_reqs)
            dkv += dkv_in
        if cfg.world > 1:
            dkv_keep, dkv_in = dkv, torch.empty_like(dkv)
            dkv_reqs = _exchange(dkv_keep, dkv_in, cfg, _TAG_DKV)
        else:
            dkv_in = dkv
        _wait(reqs)
        if nxt is not None:
            kv = nxt
    _wait(dkv_reqs)
    return (dq.to(q.dtype) if need_dq else None), dkv_in[0].to(k.dtype), dkv_in[1].to(v.dtype)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cfg):
        out, lse = _ring_forward(q, k, v, cfg)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.cfg = cfg
        ctx.set_materialize_grads(False)
        return out.to(q.dtype), lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None and dlse is None:
            return None, None, None, None
        dq, dk, dv = _ring_backward(q, k, v, out, lse, dout, dlse, ctx.cfg, ctx.needs_input_grad[0])
        need = ctx.needs_input_grad
        return dq, (dk if need[1] else None), (dv if need[2] else None), None


# ---------------------------------------------------------------------------------------------
# Ulysses
# ---------------------------------------------------------------------------------------------

def _all_to_all(x, group, world, scatter_dim, gather_dim):
    """Split x along scatter_dim into `world` parts, send part i to rank i, concatenate the parts received (in
    rank order) along gather_dim."""
    parts = x.unflatten(scatter_dim, (world, x.shape[scatter_dim] // world)).movedim(scatter_dim, 0).contiguous()
    out = torch.empty_like(parts)
    dist.all_to_all_single(out, parts, group=group)
    return out.movedim(0, gather_dim).flatten(gather_dim, gather_dim + 1)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, world, scatter_dim, gather_dim):
        ctx.args = (group, world, scatter_dim, gather_dim)
        return _all_to_all(x, group, world, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad):
        group, world, scatter_dim, gather_dim = ctx.args
        return _all_to_all(grad, group, world, gather_dim, scatter_dim), None, None, None, None


def _ulysses(q, k, v, cfg, return_lse):
    world, rank = cfg.world, cfg.rank
    hkv = k.shape[2]
    if hkv < world:                       # world % hkv == 0 (checked): one replicated K/V head per rank
        k, v = k.repeat_interleave(world // hkv, dim=2), v.repeat_interleave(world // hkv, dim=2)
    if world > 1:
        q, k, v = (_AllToAll.apply(t, cfg.group, world, 2, 1) for t in (q, k, v))
    slopes = cfg.alibi
    if slopes is not None and world > 1:
        h = slopes.shape[-1] // world
        slopes = slopes[..., rank * h:(rank + 1) * h]
    res = attention(q, k, v, causal=cfg.causal, causal_align="top_left", softmax_scale=cfg.scale,
                    window_size=cfg.window, alibi_slopes=slopes, softcap=cfg.softcap, return_lse=return_lse,
                    backend=cfg.backend)
    out, lse = res if return_lse else (res, None)
    if world > 1:
        out = _AllToAll.apply(out, cfg.group, world, 1, 2)
        if lse is not None:
            lse = _AllToAll.apply(lse, cfg.group, world, 2, 1)
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------------------------------------
# Public entry
# ---------------------------------------------------------------------------------------------

def _local_checks(q, k, v, scheme, world, causal, window_size, softmax_scale, alibi_slopes, softcap, return_lse,
                  backend):
    """Everything a rank can check alone. Returns (window, scale, softcap)."""
    _check_scheme(scheme)
    info = _checks.check_attention(q, k, v, window_size=window_size, softcap=softcap, softmax_scale=softmax_scale,
                                   alibi_slopes=alibi_slopes)
    for name, flag in (("causal", causal), ("return_lse", return_lse)):
        _checks.check_bool(name, flag)
    if q.dtype not in _DTYPES:
        raise TypeError(f"q must have a floating dtype in {_DTYPES}, got {q.dtype}")
    n, hq, hkv = q.shape[1], q.shape[2], k.shape[2]
    if k.shape[1] != n:
        raise ValueError(f"k must have the tokens of q (self-attention over one sharded sequence): q has {n}, "
                         f"k {k.shape[1]}")
    if n < 1:
        raise ValueError("q must hold at least one token per rank")
    if scheme == "zigzag" and n % 2:
        raise ValueError(f"q has {n} tokens per rank; scheme 'zigzag' holds two equal chunks per rank (an even "
                         f"number)")
    if scheme == "ulysses":
        if hq % world:
            raise ValueError(f"q has {hq} heads; scheme 'ulysses' over {world} ranks needs a multiple of {world}")
        if hkv % world and world % hkv:
            raise ValueError(f"k has {hkv} heads; scheme 'ulysses' over {world} ranks needs a multiple or a "
                             f"divisor of {world} (K/V heads are replicated up to one per rank)")
    call = _describe(q, k, v, causal=causal, window_size=window_size, alibi_slopes=alibi_slopes, softcap=softcap,
                     softmax_scale=softmax_scale, return_lse=return_lse or scheme != "ulysses",
                     causal_align="top_left")
    try:
        backends.select("flash_attention", call, backend)
    except ValueError as e:
        if scheme != "ulysses":
            raise ValueError(f"backend={backend!r}: scheme {scheme!r} merges the blocks by their log-sum-exp, "
                             f"and {e}") from None
        raise
    return info["window"], info["scale"], info["softcap"]


def context_parallel_attention(q, k, v, group=None, *, scheme="ring", causal=False, softmax_scale=None,
                               window_size=(-1, -1), alibi_slopes=None, softcap=0.0, return_lse=False,
                               backend="auto"):
    """Attention over a sequence sharded along its tokens over the ranks of `group` (see the module doc).

    Args:
        q: [B, n, Hq, D]; k, v: [B, n, Hkv, D]: this rank's shard (``shard_sequence``'s layout for `scheme`).
            Every rank passes the same shapes, dtype and arguments (checked; ValueError naming the argument).
        group: a torch.distributed process group (None: the default group). Every rank of it must call.
        scheme: "ring", "zigzag" or "ulysses".
        causal, softmax_scale, window_size, alibi_slopes, softcap, backend: as ``flash_attention``, on the global
            positions of the whole sequence (N = n * P tokens).
        return_lse: also return this rank's log-sum-exp [B, Hq, n] (fp32, natural log).

    Returns this rank's output shard [B, n, Hq, D] (q's dtype), or (out, lse). Differentiable in q, k, v (and
    through lse).
    """
    group, rank, world = _group(group)
    local, error, scale, cap, win = None, None, None, None, None
    try:
        win, scale, cap = _local_checks(q, k, v, scheme, world, causal, window_size, softmax_scale, alibi_slopes,
                                        softcap, return_lse, backend)
        local = _summary(q, k, v, scheme, causal, win, scale, cap, alibi_slopes, return_lse, backend)
    except Exception as e:       # raised after the ranks have heard of it, so that none waits for this one
        error = e
    device = q.device if isinstance(q, torch.Tensor) and dist.get_backend(group) != "gloo" else torch.device("cpu")
    _agree(local, error, group, world, device)
    cfg = _Config(scheme, group, rank, world, bool(causal), tuple(win), float(scale), float(cap), alibi_slopes,
                  backend)
    if scheme == "ulysses":
        return _ulysses(q, k, v, cfg, return_lse)
    out, lse = _RingAttention.apply(q, k, v, cfg)
    return (out, lse) if return_lse else out
