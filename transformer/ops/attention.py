"""The flash-attention op contract shared by the Triton and CUDA backends: fake impls, autograd, entry functions.

Every kernel backend defines the same two ops in its namespace (torch.ops.<ns>.attn_fwd / attn_bwd):

    attn_fwd(q, k, v, alibi_slopes, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
        window_left, window_right, softcap, bottom_right) -> (out, lse)
    attn_bwd(dout, q, k, v, out, lse, dlse, alibi_slopes, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        softmax_scale, window_left, window_right, softcap, bottom_right) -> (dq, dk, dv)

q [B, Nq, Hq, D] (varlen [Tq, Hq, D] with int32 cu_seqlens), k / v [B, Nk, Hkv, D]; window_* = -1 means
unbounded (causal is window_right = 0); lse is fp32 [B, Hq, Nq] (varlen [Hq, Tq]), natural log; dlse (the
gradient of lse) may be None. A namespace whose backward also has a non-deterministic variant declares a
last argument `bool deterministic=False` on both ops (`register(ns, deterministic_arg=True)`): attn_fwd
ignores it but the autograd hands it to attn_bwd, and the entry functions pass the caller's flag
(`deterministic_arg=True`); the other namespaces' backward is always deterministic and never sees the flag.
A namespace whose kernels implement attention dropout declares two more trailing arguments on both ops,
`float dropout_p=0., Tensor? rng_state=None` (`register(ns, dropout_arg=True)`): rng_state is the int64 [2]
(seed, offset) device tensor of the counter-based mask (transformer/reference.py, `dropout_keep`), read by the
kernels from device memory; the autograd saves it (16 bytes, never a mask) and the backward regenerates the
mask from it. The entry functions pass dropout only to such namespaces (`dropout_arg=True`).
`register` gives a namespace's ops their fakes and autograd;
`flash_attention` / `flash_attention_varlen` are the canonical entry functions over a forward op and
`padded_attention` the padded-batch entry over a backend's varlen entry.
"""
from __future__ import annotations

import torch


def _fwd_fake(q, k, v, alibi_slopes, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
              window_left, window_right, softcap, bottom_right, deterministic=False, dropout_p=0.0, rng_state=None):
    if cu_seqlens_q is not None:
        lse_shape = (q.shape[1], q.shape[0])
    else:
        lse_shape = (q.shape[0], q.shape[2], q.shape[1])
    return q.new_empty(q.shape), q.new_empty(lse_shape, dtype=torch.float32)


def _bwd_fake(dout, q, k, v, out, lse, dlse, alibi_slopes, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
              softmax_scale, window_left, window_right, softcap, bottom_right, deterministic=False, dropout_p=0.0,
              rng_state=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _make_setup_context(dropout_arg):
    def setup_context(ctx, inputs, output):
        q, k, v, alibi, cu_q, cu_k, *params = inputs
        rng = params.pop() if dropout_arg else None     # rng_state: saved as a tensor (16 bytes)
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, alibi, cu_q, cu_k, rng)
        ctx.params = params      # max lengths ... bottom_right (and deterministic, dropout_p, where declared)
        ctx.dropout_arg = dropout_arg
        ctx.set_materialize_grads(False)
    return setup_context


def _make_backward(ns):
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, alibi, cu_q, cu_k, rng = ctx.saved_tensors
        if dout is None:  # only lse was used
            dout = torch.zeros_like(out)
        extra = (rng,) if ctx.dropout_arg else ()
        dq, dk, dv = getattr(torch.ops, ns).attn_bwd(dout, q, k, v, out, lse, dlse, alibi, cu_q, cu_k, *ctx.params,
                                                     *extra)
        return (dq, dk, dv) + (None,) * (3 + len(ctx.params) + len(extra))   # alibi, cu_q, cu_k, params, rng
    return backward


def _arg_names(op):
    return [a.name for a in op.default._schema.arguments]


def _declares_deterministic(op) -> bool:
    """The op's arguments end in `deterministic` (or in `deterministic, dropout_p, rng_state`)."""
    names = _arg_names(op)
    if _declares_dropout(op):
        names = names[:-2]
    return bool(names) and names[-1] == "deterministic"


def _declares_dropout(op) -> bool:
    return _arg_names(op)[-2:] == ["dropout_p", "rng_state"]


def register(ns: str, deterministic_arg: bool = False, dropout_arg: bool = False):
    """Fakes and autograd of torch.ops.<ns>.attn_fwd / attn_bwd (call once per namespace). deterministic_arg:
    both ops end in `bool deterministic`; dropout_arg: then in `float dropout_p, Tensor? rng_state` (checked
    against their schemas)."""
    ops = getattr(torch.ops, ns)
    for name in ("attn_fwd", "attn_bwd"):
        op = getattr(ops, name)
        if _declares_deterministic(op) != deterministic_arg or _declares_dropout(op) != dropout_arg:
            raise RuntimeError(f"{ns}::{name}: register(deterministic_arg={deterministic_arg}, "
                               f"dropout_arg={dropout_arg}) but the schema is {op.default._schema}")
    torch.library.register_fake(f"{ns}::attn_fwd")(_fwd_fake)
    torch.library.register_fake(f"{ns}::attn_bwd")(_bwd_fake)
    torch.library.register_autograd(f"{ns}::attn_fwd", _make_backward(ns),
                                    setup_context=_make_setup_context(dropout_arg))


def _extra(deterministic, dropout_p, rng_state, deterministic_arg, dropout_arg):
    """The trailing op arguments a namespace declares; dropout_p > 0 needs a namespace with dropout_arg."""
    extra = (bool(deterministic),) if deterministic_arg else ()
    if dropout_arg:
        extra += (float(dropout_p), rng_state if dropout_p > 0 else None)
    elif dropout_p > 0:
        raise ValueError(f"dropout_p={dropout_p}: this backend's attention kernels have no dropout")
    return extra


def window(causal, window_size, max_q, max_k):
    """(left, right) for the kernels: causal folded into right = 0; windows wider than any sequence -> -1."""
    left, right = window_size
    if causal:
        right = 0
    wide = max_q + max_k
    return (-1 if left >= wide else left), (-1 if right >= wide else right)


def flash_attention(fwd, q, k, v, *, causal, softmax_scale, window_size, alibi_slopes, softcap, deterministic,
                    return_lse, causal_align, dropout_p=0.0, rng_state=None, deterministic_arg=False,
                    dropout_arg=False):
    """Dense flash attention through the forward op `fwd`. deterministic reaches the backward only where the op
    declares it (deterministic_arg=True, see the module doc); other backwards always are deterministic.
    dropout_p / rng_state reach ops that declare them (dropout_arg=True)."""
    nq, nk = q.shape[1], k.shape[1]
    left, right = window(causal, window_size, nq, nk)
    extra = _extra(deterministic, dropout_p, rng_state, deterministic_arg, dropout_arg)
    out, lse = fwd(q, k, v, alibi_slopes, None, None, nq, nk, float(softmax_scale), left, right, float(softcap),
                   causal_align == "bottom_right", *extra)
    return (out, lse) if return_lse else out


def monotone_cu_seqlens(cu, total):
    """cu_seqlens as every backend takes them (transformer/_checks.py), without a device-to-host copy: each entry
    clamped into 0..total, then the running max, so sequences lie inside the tokens and never overlap. Valid
    cu_seqlens come back unchanged (int32, contiguous)."""
    return torch.cummax(cu.clamp(0, total), dim=0).values.to(torch.int32)


def flash_attention_varlen(fwd, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, causal,
                           softmax_scale, window_size, alibi_slopes, softcap, deterministic, return_lse,
                           causal_align, dropout_p=0.0, rng_state=None, deterministic_arg=False, dropout_arg=False):
    """Packed variable-length flash attention through the forward op `fwd`; lse is [Hq, total_q]."""
    left, right = window(causal, window_size, max_seqlen_q, max_seqlen_k)
    extra = _extra(deterministic, dropout_p, rng_state, deterministic_arg, dropout_arg)
    cu_q, cu_k = monotone_cu_seqlens(cu_seqlens_q, q.shape[0]), monotone_cu_seqlens(cu_seqlens_k, k.shape[0])
    out, lse = fwd(q, k, v, alibi_slopes, cu_q, cu_k, int(max_seqlen_q),
                   int(max_seqlen_k), float(softmax_scale), left, right, float(softcap), causal_align == "bottom_right",
                   *extra)
    return (out, lse) if return_lse else out


def padded_cu_seqlens(key_start, key_end, batch, nq, nk):
    """(cu_seqlens_q, cu_seqlens_k) that pack a padded batch into 3 varlen sequences per batch element.

    Sequence 3b holds keys [0, start) and no queries, 3b + 1 keys [start, end) with all Nq queries of b,
    3b + 2 keys [end, Nk) and no queries; int32 [3B + 1], computed on the device (no host copy). Bounds are
    clamped to 0 <= start <= end <= Nk, so no value of key_start / key_end reaches outside b's keys."""
    dev = key_start.device
    ar = torch.arange(batch, device=dev, dtype=torch.int32)
    s = key_start.clamp(0, nk)
    e = torch.maximum(key_end.clamp(max=nk), s)
    s, e = s.to(torch.int32), e.to(torch.int32)
    cu_k = torch.stack([ar * nk, ar * nk + s, ar * nk + e], dim=1).flatten()
    cu_q = torch.stack([ar * nq, ar * nq, ar * nq + nq], dim=1).flatten()
    tail = torch.full((1,), batch * nq, dtype=torch.int32, device=dev)
    return torch.cat([cu_q, tail]), torch.cat([cu_k, tail * 0 + batch * nk])


def _flat(t):
    """[B, N, H, D] -> [B*N, H, D]; a view when the batch stride is N x the token stride."""
    return t.reshape(t.shape[0] * t.shape[1], t.shape[2], t.shape[3])


def padded_attention(varlen, q, k, v, key_start, key_end, *, causal, softmax_scale, window_size, alibi_slopes,
                     softcap, deterministic, return_lse, causal_align, dropout_p=0.0, rng_state=None):
    """Padded-batch attention (batch element b sees keys key_start[b] <= j < key_end[b]) through `varlen`, a
    canonical flash_attention_varlen entry: [B, N] is flattened into the packed token dim (a view for
    contiguous or fused-QKV inputs) and each batch element becomes three sequences (`padded_cu_seqlens`), so
    batch element b takes the dropout mask of varlen sequence 3b + 1 (keys counted from key_start[b]).
    Returns out [B, Nq, Hq, D] (and lse [B, Hq, Nq])."""
    b, nq, hq, d = q.shape
    nk = k.shape[1]
    cu_q, cu_k = padded_cu_seqlens(key_start, key_end, b, nq, nk)
    slopes = alibi_slopes
    if alibi_slopes is not None and alibi_slopes.dim() == 2:
        slopes = alibi_slopes.repeat_interleave(3, dim=0)
    res = varlen(_flat(q), _flat(k), _flat(v), cu_q, cu_k, nq, nk, causal=causal, softmax_scale=softmax_scale,
                 window_size=window_size, alibi_slopes=slopes, softcap=softcap, deterministic=deterministic,
                 return_lse=return_lse, causal_align=causal_align, dropout_p=dropout_p, rng_state=rng_state)
    if return_lse:
        out, lse = res
        return out.view(b, nq, hq, d), lse.view(hq, b, nq).transpose(0, 1)
    return res.view(b, nq, hq, d)
