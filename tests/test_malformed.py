"""Malformed input: a table of bad calls across the public functions and modules, each expecting its exception
type (ValueError or TypeError) and a message that names the public argument (a regex), run on every backend
where the callable takes ``backend=`` (reference, torch, triton, cuda; the kernel backends serve CPU tensors
through the conftest's interpreter/emulator switches). Then a few edge-but-valid calls (batch 0, Nk = 0, hidden
1, no tokens) that must not raise and must match the reference on every backend.

The rules of the table:
* softmax_scale: a real number (bool: TypeError), finite and > 0 (nan, inf, 0, -1: ValueError).
* softcap: a real number, finite and >= 0 (inf, nan, -1: ValueError).
* window_size: a pair of ints (bools: TypeError), each >= -1 (ValueError).
* causal, deterministic, return_lse, validate, is_causal (sdpa), prenorm / residual_in_fp32 (norms): bools only
  (TypeError), so "no", 1 and None are rejected.
* num_splits: an int in 0..128 (ValueError); max_seqlen_q / max_seqlen_k: non-negative ints (TypeError).
* dtype / device / shape / rank / stride errors name the argument.
* value checks run by default on CPU tensors: cu_seqlens (start at 0, non-decreasing, within the packed tokens)
  name cu_seqlens_q/k and the position; cache_seqlens (0 <= len, len + appended <= capacity) name
  cache_seqlens[i]; the pages a sequence uses name block_table[i]; padded-attention bounds name key_start[i] /
  key_end[i]; the modules' key_lengths name key_lengths[i].
* MultiheadAttention: a wrong-shaped key_padding_mask names key_padding_mask; generate: token ids outside
  0..vocab-1 name input_ids; backend: not a str (TypeError), unknown (ValueError).
"""
from __future__ import annotations

import math

import pytest
import torch

import transformer
from transformer import reference
from transformer.attention import padded_attention
from transformer.models import DecoderOnly, DecoderOnlyConfig
from transformer.models.encoder_decoder import EncoderDecoder, EncoderDecoderConfig
from transformer.models.encoder_only import EncoderOnly, EncoderOnlyConfig

import helpers

ALL_BACKENDS = ("reference", "torch", "triton", "cuda")
FP16 = torch.float16
NAN, INF = float("nan"), float("inf")


def _backend_params():
    params = []
    for b in ALL_BACKENDS:
        marks = []
        if b in ("triton", "cuda") and not helpers.HAS_GPU:
            marks.append(pytest.mark.interpret if b == "triton" else pytest.mark.emulator)
        params.append(pytest.param(b, marks=marks, id=b))
    return params


def _require(backend):
    if backend in ("triton", "cuda"):
        helpers.require_backend(backend)


def _t(*shape, dtype=FP16, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(helpers.DEVICE, dtype)


def _i32(values):
    return torch.tensor(values, dtype=torch.int32, device=helpers.DEVICE)


# ---------------------------------------------------------------------------------------------
# Call builders (each returns a function of the backend that makes one call)
# ---------------------------------------------------------------------------------------------

B, N, HQ, HKV, D = 2, 8, 4, 2, 32


def _qkv():
    return _t(B, N, HQ, D, seed=1), _t(B, N, HKV, D, seed=2), _t(B, N, HKV, D, seed=3)


def fa(q=None, k=None, v=None, **kw):
    """transformer.flash_attention on valid inputs, with the given arguments replaced."""
    def call(backend):
        q0, k0, v0 = _qkv()
        return transformer.flash_attention(q0 if q is None else q(), k0 if k is None else k(),
                                           v0 if v is None else v(), backend=backend, **kw)
    return call


TQ, TK = 8, 8     # packed tokens of the varlen calls: two sequences of 4 queries and 4 keys


def varlen(q=None, k=None, v=None, cu_q=None, cu_k=None, max_q=4, max_k=4, **kw):
    """transformer.flash_attention_varlen on valid inputs, with the given arguments replaced."""
    def call(backend):
        q0, k0, v0 = _t(TQ, HQ, D, seed=1), _t(TK, HKV, D, seed=2), _t(TK, HKV, D, seed=3)
        cq = _i32([0, 4, 8]) if cu_q is None else cu_q()
        ck = _i32([0, 4, 8]) if cu_k is None else cu_k()
        return transformer.flash_attention_varlen(q0 if q is None else q(), k0 if k is None else k(),
                                                  v0 if v is None else v(), cq, ck, max_q, max_k,
                                                  backend=backend, **kw)
    return call


S_MAX, PAGE = 16, 4


def decode(q=None, k_cache=None, v_cache=None, cache_seqlens=None, paged=False, **kw):
    """transformer.decode_attention on a valid cache (contiguous [2, 16, 2, 32], or paged: 8 pages of 4 tokens,
    block_table [[0, 1, 2, 3], [4, 5, 6, 7]]) holding 3 and 5 tokens, with the given arguments replaced.
    kw values that are callables are called (fresh tensors per call)."""
    def call(backend):
        shape = (8, PAGE, HKV, D) if paged else (B, S_MAX, HKV, D)
        kc = _t(*shape, seed=2) if k_cache is None else k_cache()
        vc = _t(*shape, seed=3) if v_cache is None else v_cache()
        lens = _i32([3, 5]) if cache_seqlens is None else cache_seqlens()
        args = {name: (val() if callable(val) else val) for name, val in kw.items()}
        if paged:
            args.setdefault("block_table", _i32([[0, 1, 2, 3], [4, 5, 6, 7]]))
        q0 = _t(B, 1, HQ, D, seed=1) if q is None else q()
        return transformer.decode_attention(q0, kc, vc, lens, backend=backend, **args)
    return call


def _new_kv(sq=1):
    return dict(k=lambda: _t(B, sq, HKV, D, seed=4), v=lambda: _t(B, sq, HKV, D, seed=5))


def norm(fn_name, x=None, weight=None, bias=None, eps=None, **kw):
    """transformer.layer_norm / rms_norm on x [4, 8] fp16 with weight [8] (and bias [8]), arguments replaced."""
    def call(backend):
        fn = getattr(transformer, fn_name)
        x0 = _t(4, 8, seed=1) if x is None else x()
        w0 = _t(8, seed=2) if weight is None else weight()
        args = {name: (val() if callable(val) else val) for name, val in kw.items()}
        if fn_name == "layer_norm":
            b0 = _t(8, seed=3) if bias is None else bias()
            return fn(x0, w0, b0, 1e-5 if eps is None else eps, backend=backend, **args)
        return fn(x0, w0, 1e-6 if eps is None else eps, backend=backend, **args)
    return call


def sdpa(query=None, key=None, value=None, **kw):
    """transformer.scaled_dot_product_attention on [1, 4, 8, 16] fp16 tensors, arguments replaced."""
    def call(backend):
        q0 = _t(1, 4, 8, 16, seed=1) if query is None else query()
        k0 = _t(1, 4, 8, 16, seed=2) if key is None else key()
        v0 = _t(1, 4, 8, 16, seed=3) if value is None else value()
        args = {name: (val() if callable(val) else val) for name, val in kw.items()}
        return transformer.scaled_dot_product_attention(q0, k0, v0, backend=backend, **args)
    return call


def padded(key_start=None, key_end=None, **kw):
    """transformer.attention.padded_attention with key runs [0, 8) and [2, 6) unless replaced."""
    def call(backend):
        q0, k0, v0 = _qkv()
        ks = _i32([0, 2]) if key_start is None else key_start()
        ke = _i32([8, 6]) if key_end is None else key_end()
        return padded_attention(q0, k0, v0, ks, ke, backend=backend, **kw)
    return call


def norm_module(cls_name, x=None, ctor=None, **kw):
    """transformer.LayerNorm / RMSNorm (8) on x [4, 8] fp16; ctor: extra constructor arguments."""
    def call(backend):
        m = getattr(transformer, cls_name)(8, **dict(dict(backend=backend or "auto"), **(ctor or {}))).to(FP16)
        args = {name: (val() if callable(val) else val) for name, val in kw.items()}
        return m(_t(4, 8, seed=1) if x is None else x(), **args)
    return call


def attn_module(x=None, ctor=None, **kw):
    """transformer.Attention(32, 4, n_kv_heads=2) in fp16 on x [2, 8, 32]."""
    def call(backend):
        torch.manual_seed(0)
        m = transformer.Attention(32, 4, 2, **dict(dict(backend=backend or "auto"), **(ctor or {})))
        m = m.to(helpers.DEVICE, FP16)
        args = {name: (val() if callable(val) else val) for name, val in kw.items()}
        return m(_t(2, 8, 32, seed=1) if x is None else x(), **args)
    return call


def mha(key_padding_mask, need_weights=False, batch_first=True):
    """transformer.MultiheadAttention(32, 4) in fp16, query = key = value [2, 8, 32] (batch first) or [8, 2, 32]."""
    def call(backend):
        torch.manual_seed(0)
        m = transformer.MultiheadAttention(32, 4, batch_first=batch_first).to(helpers.DEVICE, FP16).eval()
        m.backend = backend
        x = _t(2, 8, 32, seed=1) if batch_first else _t(8, 2, 32, seed=1)
        return m(x, x, x, key_padding_mask=key_padding_mask(), need_weights=need_weights)
    return call


def _decoder_only(backend):
    torch.manual_seed(0)
    return DecoderOnly(DecoderOnlyConfig.preset("tiny"), backend=backend or "auto").to(helpers.DEVICE, FP16).eval()


def model_forward(kind, **kw):
    """forward of a tiny model in fp16: DecoderOnly(ids [2, 8]), EncoderOnly(ids [2, 8]) or
    EncoderDecoder(src [2, 8], tgt_in [2, 5])."""
    def call(backend):
        args = {name: (val() if callable(val) else val) for name, val in kw.items()}
        torch.manual_seed(0)
        if kind == "decoder_only":
            m = _decoder_only(backend)
            ids = args.pop("input_ids", torch.randint(0, 256, (2, 8)))
            return m(ids.to(helpers.DEVICE), **args)
        if kind == "encoder_only":
            m = EncoderOnly(EncoderOnlyConfig.preset("tiny"), backend=backend).to(helpers.DEVICE, FP16).eval()
            ids = args.pop("input_ids", torch.randint(0, 64, (2, 8)))
            return m(ids.to(helpers.DEVICE), **args)
        m = EncoderDecoder(EncoderDecoderConfig.preset("tiny"), backend=backend).to(helpers.DEVICE, FP16).eval()
        src = args.pop("src", torch.randint(1, 32, (2, 8)))
        tgt = args.pop("tgt_in", torch.randint(1, 32, (2, 5)))
        return m(src.to(helpers.DEVICE), tgt.to(helpers.DEVICE), **args)
    return call


def gen(input_ids, **kw):
    """transformer.generate(tiny DecoderOnly (vocab 256, max_seq_len 256), input_ids, 2 new tokens)."""
    def call(backend):
        m = _decoder_only(backend)
        args = dict(dict(max_new_tokens=2, temperature=0), **kw)
        return transformer.generate(m, input_ids() if callable(input_ids) else input_ids, **args)
    return call


def kv_cache(*args, **kw):
    def call(backend):
        return transformer.KVCache(*args, **kw)
    return call


def kv_advance(n):
    def call(backend):
        c = transformer.KVCache(1, 2, 8, 2, 16)
        c.advance(n)
    return call


def _wide(*shape):
    """A tensor of `shape` whose last dim has stride 2."""
    return _t(*shape[:-1], 2 * shape[-1])[..., ::2]


# ---------------------------------------------------------------------------------------------
# The table: (id, call, exception, regex naming the argument, takes backend=)
# ---------------------------------------------------------------------------------------------

TE, VE = TypeError, ValueError

ROWS = [
    # --- flash_attention: scalars -------------------------------------------------------------
    ("fa-scale-bool", fa(softmax_scale=True), TE, r"\bsoftmax_scale\b"),
    ("fa-scale-str", fa(softmax_scale="0.1"), TE, r"\bsoftmax_scale\b"),
    ("fa-scale-nan", fa(softmax_scale=NAN), VE, r"\bsoftmax_scale\b"),
    ("fa-scale-inf", fa(softmax_scale=INF), VE, r"\bsoftmax_scale\b"),
    ("fa-scale-zero", fa(softmax_scale=0.0), VE, r"\bsoftmax_scale\b"),
    ("fa-scale-negative", fa(softmax_scale=-1.0), VE, r"\bsoftmax_scale\b"),
    ("fa-softcap-inf", fa(softcap=INF), VE, r"\bsoftcap\b"),
    ("fa-softcap-nan", fa(softcap=NAN), VE, r"\bsoftcap\b"),
    ("fa-softcap-negative", fa(softcap=-1.0), VE, r"\bsoftcap\b"),
    ("fa-softcap-none", fa(softcap=None), TE, r"\bsoftcap\b"),
    ("fa-window-bool", fa(window_size=(True, -1)), TE, r"\bwindow_size\b"),
    ("fa-window-float", fa(window_size=(4.0, 0)), TE, r"\bwindow_size\b"),
    ("fa-window-int", fa(window_size=4), TE, r"\bwindow_size\b"),
    ("fa-window-triple", fa(window_size=(1, 2, 3)), TE, r"\bwindow_size\b"),
    ("fa-window-left-below", fa(window_size=(-2, 0)), VE, r"\bwindow_size\b"),
    ("fa-window-right-below", fa(window_size=(3, -5)), VE, r"\bwindow_size\b"),
    ("fa-causal-str", fa(causal="no"), TE, r"\bcausal\b"),
    ("fa-causal-int", fa(causal=1), TE, r"\bcausal\b"),
    ("fa-causal-none", fa(causal=None), TE, r"\bcausal\b"),
    ("fa-deterministic-str", fa(deterministic="yes"), TE, r"\bdeterministic\b"),
    ("fa-return_lse-int", fa(return_lse=1), TE, r"\breturn_lse\b"),
    ("fa-return_lse-none", fa(return_lse=None), TE, r"\breturn_lse\b"),
    # --- flash_attention: tensors ---------------------------------------------------------------
    ("fa-q-rank3", fa(q=lambda: _t(N, HQ, D)), VE, r"\bq\b"),
    ("fa-q-not-tensor", fa(q=lambda: [[0.0]]), TE, r"\bq\b"),
    ("fa-q-int", fa(q=lambda: torch.ones(B, N, HQ, D, dtype=torch.int32)), TE, r"\bq\b"),
    ("fa-q-float64", fa(q=lambda: _t(B, N, HQ, D, dtype=torch.float64)), TE, r"\bq\b"),
    ("fa-q-last-stride", fa(q=lambda: _wide(B, N, HQ, D)), VE, r"\bq\b"),
    ("fa-q-head-dim-300", fa(q=lambda: _t(B, N, HQ, 300), k=lambda: _t(B, N, HKV, 300),
                             v=lambda: _t(B, N, HKV, 300)), VE, r"\bq\b"),
    ("fa-k-dtype", fa(k=lambda: _t(B, N, HKV, D, dtype=torch.bfloat16)), TE, r"\bk\b"),
    ("fa-k-heads", fa(k=lambda: _t(B, N, 3, D), v=lambda: _t(B, N, 3, D)), VE, r"\bk\b"),
    ("fa-k-batch", fa(k=lambda: _t(3, N, HKV, D), v=lambda: _t(3, N, HKV, D)), VE, r"\bk\b"),
    ("fa-k-head-dim", fa(k=lambda: _t(B, N, HKV, 16)), VE, r"\bk\b"),
    ("fa-k-device", fa(k=lambda: torch.empty(B, N, HKV, D, dtype=FP16, device="meta")), VE, r"\bk\b"),
    ("fa-v-shape", fa(v=lambda: _t(B, N + 1, HKV, D)), VE, r"\bv\b"),
    ("fa-alibi-shape", fa(alibi_slopes=torch.ones(3)), VE, r"\balibi_slopes\b"),
    ("fa-alibi-batch", fa(alibi_slopes=torch.ones(B + 1, HQ)), VE, r"\balibi_slopes\b"),
    ("fa-alibi-dtype", fa(alibi_slopes=torch.ones(HQ, dtype=FP16)), TE, r"\balibi_slopes\b"),
    ("fa-backend-int", lambda b: transformer.flash_attention(*_qkv(), backend=3), TE, r"\bbackend\b"),
    ("fa-backend-unknown", lambda b: transformer.flash_attention(*_qkv(), backend="tpu"), VE, r"\bbackend\b"),
    # --- flash_attention_varlen -----------------------------------------------------------------
    ("varlen-cu_q-int64", varlen(cu_q=lambda: torch.tensor([0, 4, 8])), TE, r"\bcu_seqlens_q\b"),
    ("varlen-cu_k-rank2", varlen(cu_k=lambda: _i32([[0, 4, 8]])), VE, r"\bcu_seqlens_k\b"),
    ("varlen-cu-lengths", varlen(cu_k=lambda: _i32([0, 8])), VE, r"\bcu_seqlens_k\b"),
    ("varlen-cu_q-device", varlen(cu_q=lambda: torch.zeros(3, dtype=torch.int32, device="meta")), VE,
     r"\bcu_seqlens_q\b"),
    ("varlen-cu_q-start", varlen(cu_q=lambda: _i32([1, 4, 8])), VE, r"cu_seqlens_q\[0\]"),
    ("varlen-cu_k-decreasing", varlen(cu_k=lambda: _i32([0, 6, 4])), VE, r"cu_seqlens_k\[2\]"),
    ("varlen-cu_q-past-total", varlen(cu_q=lambda: _i32([0, 4, 9]), max_q=5), VE, r"cu_seqlens_q\[2\]"),
    ("varlen-cu_k-validate-true", varlen(cu_k=lambda: _i32([0, 6, 4]), validate=True), VE, r"cu_seqlens_k\[2\]"),
    ("varlen-validate-str", varlen(validate="yes"), TE, r"\bvalidate\b"),
    ("varlen-max_q-negative", varlen(max_q=-1), TE, r"\bmax_seqlen_q\b"),
    ("varlen-max_k-float", varlen(max_k=4.0), TE, r"\bmax_seqlen_k\b"),
    ("varlen-max_q-bool", varlen(max_q=True), TE, r"\bmax_seqlen_q\b"),
    ("varlen-max_q-short", varlen(max_q=3), VE, r"\bmax_seqlen_q\b"),
    ("varlen-q-rank4", varlen(q=lambda: _t(1, TQ, HQ, D)), VE, r"\bq\b"),
    ("varlen-alibi-batch", varlen(alibi_slopes=torch.ones(3, HQ)), VE, r"\balibi_slopes\b"),
    ("varlen-causal-int", varlen(causal=0), TE, r"\bcausal\b"),
    ("varlen-scale-nan", varlen(softmax_scale=NAN), VE, r"\bsoftmax_scale\b"),
    # --- decode_attention -------------------------------------------------------------------------
    ("decode-splits-negative", decode(num_splits=-1), VE, r"\bnum_splits\b"),
    ("decode-splits-129", decode(num_splits=129), VE, r"\bnum_splits\b"),
    ("decode-splits-float", decode(num_splits=2.0), VE, r"\bnum_splits\b"),
    ("decode-splits-bool", decode(num_splits=True), VE, r"\bnum_splits\b"),
    ("decode-causal-str", decode(causal="yes"), TE, r"\bcausal\b"),
    ("decode-return_lse-none", decode(return_lse=None), TE, r"\breturn_lse\b"),
    ("decode-scale-zero", decode(softmax_scale=0), VE, r"\bsoftmax_scale\b"),
    ("decode-scale-bool", decode(softmax_scale=False), TE, r"\bsoftmax_scale\b"),
    ("decode-softcap-inf", decode(softcap=INF), VE, r"\bsoftcap\b"),
    ("decode-window-right-below", decode(window_size=(-1, -3)), VE, r"\bwindow_size\b"),
    ("decode-window-bool", decode(window_size=(-1, False)), TE, r"\bwindow_size\b"),
    ("decode-alibi-shape", decode(alibi_slopes=lambda: torch.ones(B, HQ + 1)), VE, r"\balibi_slopes\b"),
    ("decode-q-sq17", decode(q=lambda: _t(B, 17, HQ, D)), VE, r"\bq\b"),
    ("decode-q-rank3", decode(q=lambda: _t(B, HQ, D)), VE, r"\bq\b"),
    ("decode-k_cache-dtype", decode(k_cache=lambda: _t(B, S_MAX, HKV, D, dtype=torch.bfloat16)), TE, r"\bk_cache\b"),
    ("decode-k_cache-rank3", decode(k_cache=lambda: _t(B, S_MAX, HKV * D)), VE, r"\bk_cache\b"),
    ("decode-k_cache-batch", decode(k_cache=lambda: _t(3, S_MAX, HKV, D), v_cache=lambda: _t(3, S_MAX, HKV, D)),
     VE, r"\bk_cache\b"),
    ("decode-v_cache-shape", decode(v_cache=lambda: _t(B, S_MAX + 1, HKV, D)), VE, r"\bv_cache\b"),
    ("decode-v_cache-last-stride", decode(v_cache=lambda: _wide(B, S_MAX, HKV, D)), VE, r"\bv_cache\b"),
    ("decode-cache_seqlens-int64", decode(cache_seqlens=lambda: torch.tensor([3, 5])), TE, r"\bcache_seqlens\b"),
    ("decode-cache_seqlens-shape", decode(cache_seqlens=lambda: _i32([3, 5, 1])), VE, r"\bcache_seqlens\b"),
    ("decode-cache_seqlens-negative", decode(cache_seqlens=lambda: _i32([-1, 5])), VE, r"cache_seqlens\[0\]"),
    ("decode-cache_seqlens-past-capacity", decode(cache_seqlens=lambda: _i32([3, 17])), VE, r"cache_seqlens\[1\]"),
    ("decode-cache_seqlens-append-overflow", decode(cache_seqlens=lambda: _i32([3, 16]), **_new_kv()), VE,
     r"cache_seqlens\[1\]"),
    ("decode-cache_seqlens-paged-overflow", decode(cache_seqlens=lambda: _i32([3, 17]), paged=True), VE,
     r"cache_seqlens\[1\]"),
    ("decode-k-without-v", decode(k=lambda: _t(B, 1, HKV, D)), VE, r"\bv\b"),
    ("decode-k-shape", decode(k=lambda: _t(B, 2, HKV, D), v=lambda: _t(B, 1, HKV, D)), VE, r"\bk\b"),
    ("decode-block_table-int64", decode(paged=True, block_table=lambda: torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])),
     TE, r"\bblock_table\b"),
    ("decode-block_table-batch", decode(paged=True, block_table=lambda: _i32([[0, 1, 2, 3]])), VE,
     r"\bblock_table\b"),
    ("decode-block_table-page-past-pool", decode(paged=True, block_table=lambda: _i32([[0, 1, 2, 3], [4, 99, 6, 7]])),
     VE, r"block_table\[1\]"),
    ("decode-block_table-page-negative", decode(paged=True, block_table=lambda: _i32([[-1, 1, 2, 3], [4, 5, 6, 7]])),
     VE, r"block_table\[0\]"),
    ("decode-cache_seqlens-validate-true", decode(cache_seqlens=lambda: _i32([3, 17]), validate=True), VE,
     r"cache_seqlens\[1\]"),
    ("decode-validate-int", decode(validate=1), TE, r"\bvalidate\b"),
    ("decode-backend-unknown", lambda b: decode()("gpu"), VE, r"\bbackend\b"),
    # --- layer_norm / rms_norm --------------------------------------------------------------------
    ("ln-x-int", norm("layer_norm", x=lambda: torch.ones(4, 8, dtype=torch.int64)), TE, r"\bx\b"),
    ("ln-x-not-tensor", norm("layer_norm", x=lambda: 1.0), TE, r"\bx\b"),
    ("ln-x-empty-hidden", norm("layer_norm", x=lambda: _t(4, 0), weight=lambda: _t(0), bias=lambda: _t(0)), VE,
     r"\bx\b"),
    ("ln-x-last-stride", norm("layer_norm", x=lambda: _wide(4, 8)), VE, r"\bx\b"),
    ("ln-weight-shape", norm("layer_norm", weight=lambda: _t(7)), VE, r"\bweight\b"),
    ("ln-weight-rank2", norm("layer_norm", weight=lambda: _t(1, 8)), VE, r"\bweight\b"),
    ("ln-weight-int", norm("layer_norm", weight=lambda: torch.ones(8, dtype=torch.int32)), TE, r"\bweight\b"),
    ("ln-weight-device", norm("layer_norm", weight=lambda: torch.empty(8, dtype=FP16, device="meta")), VE,
     r"\bweight\b"),
    ("ln-bias-shape", norm("layer_norm", bias=lambda: _t(9)), VE, r"\bbias\b"),
    ("ln-residual-shape", norm("layer_norm", residual=lambda: _t(4, 9)), VE, r"\bresidual\b"),
    ("ln-residual-dtype", norm("layer_norm", residual=lambda: _t(4, 8, dtype=torch.bfloat16)), TE,
     r"\bresidual\b"),
    ("ln-eps-zero", norm("layer_norm", eps=0.0), VE, r"\beps\b"),
    ("ln-eps-nan", norm("layer_norm", eps=NAN), VE, r"\beps\b"),
    ("ln-eps-str", norm("layer_norm", eps="1e-5"), TE, r"\beps\b"),
    ("ln-prenorm-str", norm("layer_norm", prenorm="yes"), TE, r"\bprenorm\b"),
    ("ln-prenorm-int", norm("layer_norm", prenorm=1), TE, r"\bprenorm\b"),
    ("ln-residual_in_fp32-none", norm("layer_norm", residual_in_fp32=None), TE, r"\bresidual_in_fp32\b"),
    ("rms-weight-shape", norm("rms_norm", weight=lambda: _t(16)), VE, r"\bweight\b"),
    ("rms-eps-negative", norm("rms_norm", eps=-1e-6), VE, r"\beps\b"),
    ("rms-eps-inf", norm("rms_norm", eps=INF), VE, r"\beps\b"),
    ("rms-residual-rank", norm("rms_norm", residual=lambda: _t(32)), VE, r"\bresidual\b"),
    ("rms-prenorm-none", norm("rms_norm", prenorm=None), TE, r"\bprenorm\b"),
    ("rms-residual_in_fp32-int", norm("rms_norm", residual_in_fp32=1), TE, r"\bresidual_in_fp32\b"),
    ("rms-backend-int", lambda b: transformer.rms_norm(_t(4, 8), backend=1), TE, r"\bbackend\b"),
    # --- scaled_dot_product_attention ---------------------------------------------------------------
    ("sdpa-is_causal-str", sdpa(is_causal="yes"), TE, r"\bis_causal\b"),
    ("sdpa-is_causal-int", sdpa(is_causal=1), TE, r"\bis_causal\b"),
    ("sdpa-is_causal-none", sdpa(is_causal=None), TE, r"\bis_causal\b"),
    ("sdpa-scale-bool", sdpa(scale=True), TE, r"\bscale\b"),
    ("sdpa-scale-nan", sdpa(scale=NAN), VE, r"\bscale\b"),
    ("sdpa-query-int", sdpa(query=lambda: torch.ones(1, 4, 8, 16, dtype=torch.int32)), TE, r"\bquery\b"),
    ("sdpa-query-rank1", sdpa(query=lambda: _t(16)), VE, r"\bquery\b"),
    ("sdpa-key-dtype", sdpa(key=lambda: _t(1, 4, 8, 16, dtype=torch.bfloat16)), TE, r"\bkey\b"),
    ("sdpa-value-length", sdpa(value=lambda: _t(1, 4, 9, 16)), VE, r"\bvalue\b"),
    ("sdpa-mask-dtype", sdpa(attn_mask=lambda: torch.zeros(8, 8, dtype=torch.int64)), TE, r"\battn_mask\b"),
    ("sdpa-mask-shape", sdpa(attn_mask=lambda: torch.ones(8, 7, dtype=torch.bool)), VE, r"\battn_mask\b"),
    ("sdpa-mask-and-causal", sdpa(attn_mask=lambda: torch.ones(8, 8, dtype=torch.bool), is_causal=True), VE,
     r"\battn_mask\b"),
    ("sdpa-dropout", sdpa(dropout_p=1.5), VE, r"\bdropout_p\b"),
    ("sdpa-gqa-heads", sdpa(key=lambda: _t(1, 2, 8, 16), value=lambda: _t(1, 2, 8, 16)), VE, r"\benable_gqa\b"),
    ("sdpa-backend-unknown", lambda b: sdpa()("gpu"), VE, r"\bbackend\b"),
    # --- padded_attention ---------------------------------------------------------------------------
    ("padded-key_start-float", padded(key_start=lambda: torch.zeros(B)), TE, r"\bkey_start\b"),
    ("padded-key_start-rank2", padded(key_start=lambda: _i32([[0, 2]])), VE, r"\bkey_start\b"),
    ("padded-key_end-shape", padded(key_end=lambda: _i32([8, 6, 4])), VE, r"\bkey_end\b"),
    ("padded-key_end-past-nk", padded(key_end=lambda: _i32([9, 6])), VE, r"key_end\[0\]"),
    ("padded-key_start-negative", padded(key_start=lambda: _i32([-1, 2])), VE, r"key_start\[0\]"),
    ("padded-key_start-after-end", padded(key_start=lambda: _i32([0, 7])), VE, r"key_end\[1\]"),
    ("padded-key_end-validate-true", padded(key_end=lambda: _i32([8, 9]), validate=True), VE, r"key_end\[1\]"),
    ("padded-causal_align", padded(causal_align="middle"), VE, r"\bcausal_align\b"),
    ("padded-causal-str", padded(causal="no"), TE, r"\bcausal\b"),
    # --- LayerNorm / RMSNorm modules ------------------------------------------------------------------
    ("LayerNorm-x-shape", norm_module("LayerNorm", x=lambda: _t(4, 9)), VE, r"\bx\b"),
    ("LayerNorm-residual-shape", norm_module("LayerNorm", residual=lambda: _t(4, 9)), VE, r"\bresidual\b"),
    ("LayerNorm-prenorm-str", norm_module("LayerNorm", prenorm="yes"), TE, r"\bprenorm\b"),
    ("LayerNorm-backend-unknown", norm_module("LayerNorm", ctor=dict(backend="fast")), VE, r"\bbackend\b"),
    ("RMSNorm-residual-dtype", norm_module("RMSNorm", residual=lambda: _t(4, 8, dtype=torch.bfloat16)), TE,
     r"\bresidual\b"),
    ("RMSNorm-eps-nan", norm_module("RMSNorm", ctor=dict(eps=NAN)), VE, r"\beps\b"),
    ("RMSNorm-prenorm-int", norm_module("RMSNorm", prenorm=1), TE, r"\bprenorm\b"),
    # --- Attention ------------------------------------------------------------------------------------
    ("Attention-causal-str", attn_module(ctor=dict(causal="yes")), TE, r"\bcausal\b"),
    ("Attention-window-below", attn_module(ctor=dict(window_size=(-2, 0))), VE, r"\bwindow_size\b"),
    ("Attention-softcap-negative", attn_module(ctor=dict(softcap=-1.0)), VE, r"\bsoftcap\b"),
    ("Attention-x-shape", attn_module(x=lambda: _t(2, 8, 31)), VE, r"\bx\b"),
    ("Attention-key_lengths-shape", attn_module(key_lengths=lambda: torch.tensor([8, 8, 8])), VE,
     r"\bkey_lengths\b"),
    ("Attention-key_lengths-dtype", attn_module(key_lengths=lambda: torch.tensor([8.0, 8.0])), TE,
     r"\bkey_lengths\b"),
    ("Attention-key_lengths-past-n", attn_module(key_lengths=lambda: torch.tensor([8, 9])), VE,
     r"key_lengths\[1\]"),
    ("Attention-key_lengths-negative", attn_module(key_lengths=lambda: torch.tensor([-1, 8])), VE,
     r"key_lengths\[0\]"),
    ("Attention-backend-unknown", attn_module(ctor=dict(backend="xla")), VE, r"\bbackend\b"),
    # --- MultiheadAttention ---------------------------------------------------------------------------
    ("MHA-key_padding_mask-shape", mha(lambda: torch.zeros(2, 9, dtype=torch.bool)), VE, r"\bkey_padding_mask\b"),
    ("MHA-key_padding_mask-shape-need_weights",
     mha(lambda: torch.zeros(2, 9, dtype=torch.bool), need_weights=True), VE, r"\bkey_padding_mask\b"),
    ("MHA-key_padding_mask-rank1", mha(lambda: torch.zeros(8, dtype=torch.bool)), VE, r"\bkey_padding_mask\b"),
    ("MHA-key_padding_mask-seq-first", mha(lambda: torch.zeros(8, 2, dtype=torch.bool), batch_first=False), VE,
     r"\bkey_padding_mask\b"),
    ("MHA-num_heads", lambda b: transformer.MultiheadAttention(32, 5), VE, r"\bnum_heads\b"),
    ("MHA-dropout", lambda b: transformer.MultiheadAttention(32, 4, dropout=1.5), VE, r"\bdropout\b"),
    # --- KVCache --------------------------------------------------------------------------------------
    ("KVCache-n_layers", kv_cache(0, 1, 8, 2, 16), VE, r"\bn_layers\b"),
    ("KVCache-batch_size-bool", kv_cache(1, True, 8, 2, 16), VE, r"\bbatch_size\b"),
    ("KVCache-dtype", kv_cache(1, 1, 8, 2, 16, dtype=torch.int32), TE, r"\bdtype\b"),
    ("KVCache-page_size", kv_cache(1, 1, 8, 2, 16, page_size=0), VE, r"\bpage_size\b"),
    ("KVCache-num_pages-few", kv_cache(1, 2, 8, 2, 16, page_size=4, num_pages=3), VE, r"\bnum_pages\b"),
    ("KVCache-num_pages-contiguous", kv_cache(1, 2, 8, 2, 16, num_pages=4), VE, r"\bnum_pages\b"),
    ("KVCache-advance-count", kv_advance([1]), VE, r"\bn\b"),
    ("KVCache-advance-overflow", kv_advance(9), VE, r"\bn\b"),
    # --- generate -------------------------------------------------------------------------------------
    ("generate-token-past-vocab", gen(torch.tensor([[1, 2, 256]])), VE, r"\binput_ids\b"),
    ("generate-token-negative", gen(torch.tensor([[1, -1, 3]])), VE, r"\binput_ids\b"),
    ("generate-list-token-past-vocab", gen([[1, 2], [300]]), VE, r"\binput_ids\b"),
    ("generate-float-ids", gen(torch.ones(1, 3)), VE, r"\binput_ids\b"),
    ("generate-empty-prompt", gen(torch.zeros(1, 0, dtype=torch.long)), VE, r"\binput_ids\b"),
    ("generate-too-long", gen(torch.ones(1, 250, dtype=torch.long), max_new_tokens=10), VE, r"\binput_ids\b"),
    ("generate-max_new_tokens", gen(torch.ones(1, 3, dtype=torch.long), max_new_tokens=-1), VE,
     r"\bmax_new_tokens\b"),
    ("generate-top_p", gen(torch.ones(1, 3, dtype=torch.long), top_p=0.0, temperature=1.0), VE, r"\btop_p\b"),
    ("generate-cache", gen(torch.ones(1, 3, dtype=torch.long), cache="ring"), VE, r"\bcache\b"),
    # --- the models' forward --------------------------------------------------------------------------
    ("DecoderOnly-ids-float", model_forward("decoder_only", input_ids=lambda: torch.ones(2, 8)), TE,
     r"\binput_ids\b"),
    ("DecoderOnly-ids-rank3", model_forward("decoder_only", input_ids=lambda: torch.ones(1, 2, 8, dtype=torch.long)),
     VE, r"\binput_ids\b"),
    ("DecoderOnly-key_lengths-past-n", model_forward("decoder_only", key_lengths=lambda: torch.tensor([8, 12])), VE,
     r"key_lengths\[1\]"),
    ("EncoderOnly-attention_mask-shape",
     model_forward("encoder_only", attention_mask=lambda: torch.ones(2, 7, dtype=torch.long)), VE,
     r"\battention_mask\b"),
    ("EncoderDecoder-src-float", model_forward("encoder_decoder", src=lambda: torch.ones(2, 8)), VE, r"\bsrc\b"),
    ("EncoderDecoder-src_lengths-past-s",
     model_forward("encoder_decoder", src_lengths=lambda: torch.tensor([8, 9])), VE, r"\bsrc_lengths\b"),
]

# Rows that take no backend (constructors, KVCache, generate) or pass a bad one themselves: run once, backend None.
_NO_BACKEND = ("fa-backend-", "rms-backend-", "decode-backend-", "sdpa-backend-", "LayerNorm-backend-",
               "Attention-backend-", "MHA-num_heads", "MHA-dropout", "KVCache-", "generate-")


def _table_params():
    params = []
    for name, fn, exc, match in ROWS:
        if name.startswith(_NO_BACKEND):
            params.append(pytest.param(fn, exc, match, None, id=name))
            continue
        for bp in _backend_params():
            b = bp.values[0]
            params.append(pytest.param(fn, exc, match, b, marks=bp.marks, id=f"{name}-{b}"))
    return params


def test_table_size():
    """At least 60 distinct bad calls, ids unique."""
    names = [r[0] for r in ROWS]
    assert len(names) == len(set(names)) and len(names) >= 60


@pytest.mark.parametrize("fn,exc,match,backend", _table_params())
def test_malformed(fn, exc, match, backend):
    _require(backend)
    with torch.no_grad(), pytest.raises((TypeError, ValueError)) as info:
        fn(backend)
    assert isinstance(info.value, exc), f"raised {type(info.value).__name__}, want {exc.__name__}: {info.value}"
    assert info.match(match)


# ---------------------------------------------------------------------------------------------
# Edge but valid: must not raise, must match the reference
# ---------------------------------------------------------------------------------------------

BACKENDS = _backend_params()


@pytest.mark.parametrize("backend", BACKENDS)
def test_flash_attention_batch_zero(backend):
    _require(backend)
    q, k, v = _t(0, N, HQ, D), _t(0, N, HKV, D), _t(0, N, HKV, D)
    with_lse = backend != "torch"     # the torch backend returns no lse
    res = transformer.flash_attention(q, k, v, causal=True, return_lse=with_lse, backend=backend)
    out, lse = res if with_lse else (res, None)
    ref, ref_lse = reference.attention(q, k, v, causal=True, return_lse=True)
    low = reference.attention(q, k, v, causal=True, compute_dtype=None)
    assert out.dtype == q.dtype
    helpers.assert_close(out, ref, low, config=f"B=0 {backend}")
    assert lse is None or (lse.shape == ref_lse.shape == (0, HQ, N) and lse.dtype == torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_flash_attention_no_keys(backend):
    """Nk = 0: out 0 (lse -inf) like the reference, with and without causal."""
    _require(backend)
    q, k, v = _t(B, N, HQ, D), _t(B, 0, HKV, D), _t(B, 0, HKV, D)
    for causal in (False, True):
        out = transformer.flash_attention(q, k, v, causal=causal, backend=backend)
        ref = reference.attention(q, k, v, causal=causal)
        low = reference.attention(q, k, v, causal=causal, compute_dtype=None)
        helpers.assert_close(out, ref, low, config=f"Nk=0 causal={causal} {backend}")
        assert torch.equal(out, torch.zeros_like(out))
        if backend != "torch":
            _, lse = transformer.flash_attention(q, k, v, causal=causal, return_lse=True, backend=backend)
            assert torch.isneginf(lse).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_no_tokens(backend):
    """Two empty sequences (no packed tokens at all): empty out."""
    _require(backend)
    q, k, v = _t(0, HQ, D), _t(0, HKV, D), _t(0, HKV, D)
    cu = _i32([0, 0, 0])
    out = transformer.flash_attention_varlen(q, k, v, cu, cu, 0, 0, backend=backend)
    assert out.shape == q.shape and out.dtype == q.dtype


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_batch_zero(backend, paged):
    """B = 0 (contiguous [0, 16, Hkv, D], or a paged pool with an empty block_table): empty out, and the
    reference agrees."""
    _require(backend)
    q = _t(0, 1, HQ, D)
    kc = _t(8, PAGE, HKV, D) if paged else _t(0, S_MAX, HKV, D)
    vc = kc.clone()
    bt = torch.zeros(0, 4, dtype=torch.int32) if paged else None
    lens = _i32([])
    with torch.no_grad():
        out = transformer.decode_attention(q, kc, vc, lens, block_table=bt, backend=backend)
        ref = reference.decode_attention(q, kc, vc, lens, block_table=bt)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert ref.shape == q.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_invalid_page_in_unused_slot(backend):
    """A page id outside the pool in block_table columns no sequence reaches is not an error (validated values
    are the pages a sequence uses)."""
    _require(backend)
    q = _t(B, 1, HQ, D)
    kc, vc = _t(8, PAGE, HKV, D, seed=2), _t(8, PAGE, HKV, D, seed=3)
    lens = _i32([3, 5])
    bt = _i32([[0, 99, -1, 99], [4, 5, 99, 99]])
    with torch.no_grad():
        out = transformer.decode_attention(q, kc, vc, lens, block_table=bt, backend=backend)
        ref = reference.decode_attention(q, kc, vc, lens, block_table=bt, validate=False)
        low = reference.decode_attention(q, kc, vc, lens, block_table=bt, validate=False, compute_dtype=None)
    helpers.assert_close(out, ref, low, config=f"unused invalid pages {backend}")


@pytest.mark.parametrize("fn_name", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_norm_hidden_one(backend, fn_name):
    """hidden = 1 (LayerNorm gives the bias exactly; RMSNorm x / sqrt(x^2 + eps) * w), with a residual and
    prenorm, matching the reference."""
    _require(backend)
    x, r = _t(5, 1, seed=1), _t(5, 1, seed=2)
    w = _t(1, seed=3)
    args = (x, w, _t(1, seed=4), 1e-5) if fn_name == "layer_norm" else (x, w, 1e-6)
    fn, ref_fn = getattr(transformer, fn_name), getattr(reference, fn_name)
    out, h = fn(*args, residual=r, prenorm=True, backend=backend)
    ref, ref_h = ref_fn(*args, residual=r, prenorm=True)
    low, low_h = ref_fn(*args, residual=r, prenorm=True, compute_dtype=None)
    helpers.assert_close(out, ref, low, config=f"{fn_name} hidden 1 {backend}")
    helpers.assert_close(h, ref_h, low_h, name="h", config=f"{fn_name} hidden 1 {backend}")
    assert math.isfinite(float(out.float().abs().max()))
