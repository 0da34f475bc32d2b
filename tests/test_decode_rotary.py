"""decode_attention with rotary_cos / rotary_sin: the rotation inside the decode call on every backend.

* Bit for bit: the keys each backend appends (16-bit caches; int8 / fp8 values and scales) equal the reference's,
  which rotates with transformer.nn.rope.apply_rotary (`reference.rotary_decode`); and a backend's output with the
  tables equals, bit for bit, its output on q and k rotated beforehand by `reference.rotary_decode`, so the
  rotated q the kernels attend with is apply_rotary's too. `test_reference_rotary_is_the_modules_rope` ties
  rotary_decode to the Attention module's RoPE (RotaryEmbedding tables at the token positions).
* Outputs (and lse) against the fp32 reference by the flash-attn rule (helpers.assert_close).
* Positions: keys at cache_seqlens + i, queries at cache_seqlens + i when causal or windowed, else at
  cache_seqlens; unchecked cache_seqlens outside the cache read the table's nearest row (clamped).
* Bad input: ValueError / TypeError naming the argument.

The default run covers a curated grid (every axis value at least once); `-m slow` adds the full cross product.
"""
from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

import transformer
from helpers import DEVICE, HAS_GPU, assert_close, bits, check_decode, kernel_backends, make_case, require_backend, run_decode
from test_kv_quant import check_qdecode, make_qcase, raw, run_qdecode
from transformer import reference
from transformer.nn.rope import RotaryEmbedding, apply_rotary

KERNELS = kernel_backends("triton", "cuda")
ALL = KERNELS + [pytest.param("torch", id="torch"), pytest.param("reference", id="reference")]


def tables(rotary_dim, rows, dtype=torch.float32, theta=10000.0):
    """RotaryEmbedding's cos / sin for positions 0..rows-1 as flash-attn's tables [rows, rotary_dim / 2]."""
    cos, sin = RotaryEmbedding(rotary_dim, theta, device=DEVICE)(torch.arange(rows, device=DEVICE))
    return cos[:, :rotary_dim // 2].to(dtype), sin[:, :rotary_dim // 2].to(dtype)


def capacity_of(case):
    return case.k_cache.shape[1] * (case.block_table.shape[1] if case.block_table is not None else 1)


@dataclasses.dataclass(frozen=True)
class RCase:
    d: int = 64
    rotary_dim: int = 64
    interleaved: bool = False
    group: int = 1
    hkv: int = 2
    sq: int = 1
    page_size: int | None = None
    causal: bool = True
    window: tuple = (-1, -1)
    dtype: torch.dtype = torch.float16
    table_dtype: torch.dtype = torch.float32
    lens: tuple = (0, 5, 13)

    def make(self, seed=0):
        case = make_case(list(self.lens), self.sq, self.hkv, self.group, self.d, self.dtype, page_size=self.page_size,
                         append=True, seed=seed)
        cos, sin = tables(self.rotary_dim, capacity_of(case) + 3, self.table_dtype)
        kw = dict(rotary_cos=cos, rotary_sin=sin, rotary_interleaved=self.interleaved, causal=self.causal,
                  window_size=self.window)
        return case, kw

    def __str__(self):
        return (f"d{self.d} rd{self.rotary_dim}{' inter' if self.interleaved else ''} g{self.group} sq{self.sq} "
                f"{'paged' + str(self.page_size) if self.page_size else 'contig'} "
                f"{'causal' if self.causal else 'noncausal'}{self.window if self.window != (-1, -1) else ''} "
                f"{str(self.dtype)[6:]} tables {str(self.table_dtype)[6:]}")


CASES = [
    RCase(),
    RCase(d=64, rotary_dim=32, interleaved=True, group=5, sq=3, page_size=4, dtype=torch.bfloat16),
    RCase(d=80, rotary_dim=80, group=5, sq=4, causal=False, table_dtype=torch.float16),
    RCase(d=96, rotary_dim=48, interleaved=True, group=8, sq=2, page_size=3, causal=False, window=(4, 0)),
    RCase(d=96, rotary_dim=96, group=1, sq=5, page_size=16, dtype=torch.bfloat16, table_dtype=torch.bfloat16),
    RCase(d=64, rotary_dim=16, group=4, sq=16, causal=False, lens=(0, 1, 2), dtype=torch.bfloat16),
    RCase(d=80, rotary_dim=40, interleaved=True, group=2, sq=1, page_size=5, causal=False, lens=(9, 0, 3)),
]

SLOW_CASES = [RCase(d=d, rotary_dim=rd, interleaved=inter, group=g, sq=sq, page_size=ps, causal=causal, dtype=dt)
              for d, rd, inter, g, sq, ps, causal, dt in itertools.product(
                  (64, 96), ("half", "full"), (False, True), (1, 5), (1, 4), (None, 4), (False, True),
                  (torch.float16, torch.bfloat16))
              for rd in [d // 2 if rd == "half" else d]]


def _rotated_beforehand(case, kw):
    """The case with q and k rotated by reference.rotary_decode (the call's rule), and the call's kwargs without
    the tables."""
    capacity = capacity_of(case)
    per_token = reference.rotary_q_per_token(kw["causal"], kw["window_size"], capacity)
    q, k = reference.rotary_decode(case.q, case.k, case.cache_seqlens, kw["rotary_cos"], kw["rotary_sin"],
                                   interleaved=kw["rotary_interleaved"], q_per_token=per_token)
    rest = {n: x for n, x in kw.items() if not n.startswith("rotary")}
    return dataclasses.replace(case, q=q, k=k), rest


def _run_plain(backend, case, **kw):
    """(out, k_cache, v_cache) of one backend on fresh cache copies (torch: no lse)."""
    kc, vc = case.k_cache.clone(), case.v_cache.clone()
    out = transformer.decode_attention(case.q, kc, vc, case.cache_seqlens, k=case.k, v=case.v,
                                       block_table=case.block_table, backend=backend, **kw)
    return out, kc, vc


def check_rotary(backend, rc, seed=0):
    case, kw = rc.make(seed)
    config = f"{backend} {rc}"
    if backend in ("triton", "cuda"):
        require_backend(backend)
        check_decode(backend, case, config=config, **kw)       # out / lse vs the reference, caches bit for bit
    elif backend == "torch":
        out, kc, vc = _run_plain("torch", case, **kw)
        ref, _, ref_kc, ref_vc = run_decode("reference", case, **kw)
        low, _, _, _ = run_decode("reference_lowp", case, **kw)
        assert_close(out, ref, low, name="out", config=config)
        assert torch.equal(bits(kc), bits(ref_kc)) and torch.equal(bits(vc), bits(ref_vc)), config
    # the rotation the backend applied in the call is reference.rotary_decode's, bit for bit (q included)
    pre, rest = _rotated_beforehand(case, kw)
    out, kc, vc = _run_plain(backend, case, **kw)
    out2, kc2, vc2 = _run_plain(backend, pre, **rest)
    assert torch.equal(bits(out), bits(out2)), f"out with the tables != out on pre-rotated q / k [{config}]"
    assert torch.equal(bits(kc), bits(kc2)) and torch.equal(bits(vc), bits(vc2)), config


@pytest.mark.parametrize("rc", CASES, ids=str)
@pytest.mark.parametrize("backend", ALL)
def test_rotary_decode(backend, rc):
    check_rotary(backend, rc)


@pytest.mark.slow
@pytest.mark.parametrize("rc", SLOW_CASES, ids=str)
@pytest.mark.parametrize("backend", KERNELS)
def test_rotary_decode_grid(backend, rc):
    check_rotary(backend, rc, seed=1)


def test_reference_rotary_is_the_modules_rope():
    """rotary_decode with RotaryEmbedding's tables = apply_rotary with RotaryEmbedding at the token positions (the
    Attention module's decode path), bit for bit; q at cache_seqlens when not per token."""
    gen = torch.Generator().manual_seed(3)
    rope = RotaryEmbedding(32)
    q = torch.randn(3, 4, 6, 48, generator=gen).to(torch.bfloat16)
    k = torch.randn(3, 4, 2, 48, generator=gen).to(torch.bfloat16)
    lens = torch.tensor([0, 7, 30], dtype=torch.int32)
    cos, sin = rope(torch.arange(40))
    pos = lens.long()[:, None] + torch.arange(4)
    for inter in (False, True):
        cq, sq_ = rope(pos)
        got_q, got_k = reference.rotary_decode(q, k, lens, cos[:, :16], sin[:, :16], interleaved=inter)
        assert torch.equal(bits(got_q), bits(apply_rotary(q, cq, sq_, interleaved=inter)))
        assert torch.equal(bits(got_k), bits(apply_rotary(k, cq, sq_, interleaved=inter)))
        got_q, _ = reference.rotary_decode(q, k, lens, cos[:, :16], sin[:, :16], interleaved=inter, q_per_token=False)
        c0, s0 = rope(lens.long()[:, None].expand(-1, 4))
        assert torch.equal(bits(got_q), bits(apply_rotary(q, c0, s0, interleaved=inter)))


# ---------------------------------------------------------------------------------------------
# Quantized caches: the rotated key is rounded to k's dtype, then quantized (values and scales bit for bit)
# ---------------------------------------------------------------------------------------------

QUANT_PARAMS = [pytest.param(p.values[0], kv, conv, marks=p.marks, id=f"{p.id}-{kv}{'-' + conv if conv else ''}")
                for p in KERNELS + [pytest.param("torch", id="torch")] for kv in ("int8", "fp8_e4m3")
                for conv in (("hw", "sw") if p.values[0] == "triton" and kv == "fp8_e4m3" and not HAS_GPU else (None,))]


@pytest.mark.parametrize("backend, kv_dtype, fp8_conversion", QUANT_PARAMS)
def test_rotary_quantized(backend, kv_dtype, fp8_conversion, monkeypatch):
    """fp8_conversion: the Triton interpreter's fp8 path, the cvt casts of sm_90 ("hw") or the integer conversion
    of sm_80 ("sw")."""
    if backend != "torch":
        require_backend(backend)
    if fp8_conversion:
        import triton_kernels.decode as tkd
        monkeypatch.setattr(tkd, "FP8_CONVERSION", fp8_conversion)
    for rc in (RCase(d=64, rotary_dim=64, group=5, sq=2, page_size=4, lens=(0, 6, 11)),
               RCase(d=96, rotary_dim=32, interleaved=True, group=1, sq=3, causal=False, dtype=torch.bfloat16,
                     table_dtype=torch.bfloat16, lens=(4, 0, 2))):
        c = make_qcase(list(rc.lens), rc.sq, rc.hkv, rc.group, rc.d, rc.dtype, kv_dtype, page_size=rc.page_size,
                       append=True)
        cap = c.k_cache.shape[1] * (c.block_table.shape[1] if c.block_table is not None else 1)
        cos, sin = tables(rc.rotary_dim, cap, rc.table_dtype)
        kw = dict(rotary_cos=cos, rotary_sin=sin, rotary_interleaved=rc.interleaved, causal=rc.causal)
        check_qdecode(backend, c, config=f"{backend} {kv_dtype} {rc}", **kw)
        # the appended values and scales are those of the keys rotated beforehand
        per_token = reference.rotary_q_per_token(rc.causal, (-1, -1), cap)
        q, k = reference.rotary_decode(c.q, c.k, c.cache_seqlens, cos, sin, interleaved=rc.interleaved,
                                       q_per_token=per_token)
        got = run_qdecode(backend, c, **kw)
        want = run_qdecode(backend, dataclasses.replace(c, q=q, k=k), causal=rc.causal)
        assert torch.equal(raw(got[0]), raw(want[0])), f"out [{backend} {kv_dtype} {rc}]"
        for a, b in zip(got[2:], want[2:]):
            assert torch.equal(raw(a), raw(b)), f"caches / scales [{backend} {kv_dtype} {rc}]"


# ---------------------------------------------------------------------------------------------
# Index values the host does not check: table rows clamped
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", KERNELS + [pytest.param("torch", id="torch")])
def test_rotary_unchecked_lengths(backend):
    """cache_seqlens outside the cache (validate=False): appends outside it are dropped, table rows clamped to
    0..seqlen_ro-1, as the reference computes them."""
    if backend != "torch":
        require_backend(backend)
    case = make_case([3, 0, 4], 2, 2, 3, 64, torch.float16, append=True)
    cap = capacity_of(case)
    case.cache_seqlens.copy_(torch.tensor([-5, cap + 7, cap - 1], dtype=torch.int32))
    cos, sin = tables(64, cap)
    kw = dict(rotary_cos=cos, rotary_sin=sin, validate=False)
    out, kc, vc = _run_plain(backend, case, **kw)
    ref, _, ref_kc, ref_vc = run_decode("reference", case, **kw)
    low, _, _, _ = run_decode("reference_lowp", case, **kw)
    assert_close(out, ref, low, name="out", config=backend)
    assert torch.equal(bits(kc), bits(ref_kc)) and torch.equal(bits(vc), bits(ref_vc))


# ---------------------------------------------------------------------------------------------
# Dispatch and bad input
# ---------------------------------------------------------------------------------------------

def test_rotary_dispatch():
    case, kw = RCase().make()
    explained = transformer.backends.explain("decode_attention", case.q, case.k_cache, case.v_cache,
                                             case.cache_seqlens, k=case.k, v=case.v, **kw)
    assert "rotary_dim=64" in explained
    for backend in ("torch", "reference"):
        assert not transformer.backends.explain("decode_attention", case.q, case.k_cache, case.v_cache,
                                                case.cache_seqlens, k=case.k, v=case.v, backend=backend,
                                                **kw).endswith("no backend can serve this call")


def _bad(match, exc=ValueError, **over):
    case, kw = RCase(d=32, rotary_dim=16, lens=(3, 1, 0)).make()
    args = dict(k=case.k, v=case.v, **kw)
    args.update(over)
    with pytest.raises(exc, match=match):
        transformer.decode_attention(case.q, case.k_cache, case.v_cache, case.cache_seqlens, backend="reference",
                                     **args)


def test_rotary_bad_input():
    case, kw = RCase(d=32, rotary_dim=16, lens=(3, 1, 0)).make()
    cos, sin = kw["rotary_cos"], kw["rotary_sin"]
    rows = cos.shape[0]
    _bad("rotary_sin", rotary_sin=None)                                    # one table only
    _bad("rotary_cos", rotary_cos=None)
    _bad("pass k and v", k=None, v=None)                                   # nothing appended to rotate
    _bad("rotary_sin", rotary_sin=sin[:, :4])                              # shapes differ
    _bad("rotary_cos", rotary_cos=torch.ones(rows, 0), rotary_sin=torch.ones(rows, 0))      # rotary_dim 0
    _bad("rotary_cos", rotary_cos=torch.ones(rows, 17), rotary_sin=torch.ones(rows, 17))    # rotary_dim > D
    _bad("rotary_cos", rotary_cos=cos[:4], rotary_sin=sin[:4])             # fewer rows than the cache capacity
    _bad("rotary_cos", rotary_cos=cos.flatten(), rotary_sin=sin.flatten())                  # not 2-D
    _bad("rotary_cos", TypeError, rotary_cos=cos.to(torch.int32), rotary_sin=sin.to(torch.int32))  # dtype
    _bad("rotary_cos", rotary_cos=cos.to("meta"), rotary_sin=sin.to("meta"))                # device
    _bad("rotary_interleaved", TypeError, rotary_interleaved=1)


@pytest.mark.parametrize("backend", KERNELS)
def test_rotary_kernel_entry_checks(backend):
    """The backends' own entry (the registered op, past the public checks) refuses malformed tables too."""
    require_backend(backend)
    case, kw = RCase(d=32, rotary_dim=16, lens=(3, 1, 0)).make()
    if backend == "triton":
        op = torch.ops.tileformer_triton.decode_attention
    else:
        from transformer._cuda import ops
        op = ops(case.q.device).decode_attention
    args = (case.q, case.k_cache.clone(), case.v_cache.clone(), case.cache_seqlens, case.k, case.v, None, None,
            0.5, -1, 0, 0.0, 1, None, None)
    cos = kw["rotary_cos"]
    with pytest.raises(ValueError, match="rotary_cos"):
        op(*args, cos[:2], cos[:2], False)                                  # fewer rows than the capacity
    with pytest.raises(ValueError, match="rotary"):
        op(*args[:4], None, None, *args[6:], cos, cos, False)               # no k / v


# ---------------------------------------------------------------------------------------------
# The Attention module's decode step: RoPE tables passed to decode_attention
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", [pytest.param("torch", id="torch")] + kernel_backends("triton"))
@pytest.mark.parametrize("page_size", [None, 4])
def test_module_decode_step_rotates_in_the_call(backend, page_size):
    """A causal Attention module's decode step (tables from RotaryEmbedding.tables) equals, bit for bit, the same
    step with q and k rotated by apply_rotary at positions seqlens + i before a decode_attention without tables."""
    if backend != "torch":
        require_backend(backend)
    from transformer.nn import Attention
    torch.manual_seed(0)
    dtype = torch.float32 if backend == "torch" else torch.float16
    attn = Attention(64, 4, 2, backend=backend, device=DEVICE).to(dtype).eval()
    prompt, step = torch.randn(2, 5, 64, device=DEVICE, dtype=dtype), torch.randn(2, 3, 64, device=DEVICE, dtype=dtype)
    caches = [transformer.KVCache(1, 2, 12, 2, 16, dtype=dtype, device=DEVICE, page_size=page_size) for _ in range(2)]
    with torch.no_grad():
        for cache in caches:
            attn(prompt, cache=cache)
            cache.advance(5)
        got = attn(step, cache=caches[0])
        q, k, v = attn._qkv(step)
        q, k = attn._rotate(q, k, caches[1].seqlens.long()[:, None] + torch.arange(3, device=DEVICE))
        out = transformer.decode_attention(q, caches[1].k[0], caches[1].v[0], caches[1].seqlens, k=k, v=v,
                                           block_table=caches[1].block_table, backend=backend)
        want = attn.wo(out.flatten(-2))
    assert torch.equal(bits(got), bits(want))
    assert torch.equal(bits(caches[0].k[0]), bits(caches[1].k[0]))
    cos, sin = attn.rope.tables(12)
    full_cos, full_sin = attn.rope(torch.arange(12, device=DEVICE))
    assert torch.equal(cos, full_cos[:, :8]) and torch.equal(sin, full_sin[:, :8])


# ---------------------------------------------------------------------------------------------
# Custom ops: schema / fake (opcheck) and torch.compile with the tables
# ---------------------------------------------------------------------------------------------

def _kernel_op(backend, device):
    if backend == "triton":
        import transformer._triton.decode  # noqa: F401  registers tileformer_triton::decode_attention
        return torch.ops.tileformer_triton.decode_attention.default
    from transformer._cuda import ops
    return ops(device).decode_attention.default


@pytest.mark.parametrize("backend", KERNELS)
def test_rotary_opcheck(backend):
    require_backend(backend)
    case, kw = RCase(d=64, rotary_dim=32, group=2, sq=2, page_size=16, lens=(3, 20)).make()
    args = (case.q, case.k_cache.nan_to_num(), case.v_cache.nan_to_num(), case.cache_seqlens, case.k, case.v,
            case.block_table, None, 0.125, -1, 0, 0.0, 2, None, None, kw["rotary_cos"], kw["rotary_sin"], True)
    torch.library.opcheck(_kernel_op(backend, case.q.device), args)


@pytest.mark.parametrize("backend", KERNELS)
def test_rotary_torch_compile(backend):
    """torch.compile(fullgraph=True) of the public op with the tables: the eager results, bit for bit."""
    require_backend(backend)
    case, kw = RCase(d=64, rotary_dim=64, interleaved=True, group=2, sq=2, page_size=4).make()

    def step(q, kc, vc, lens, k, v, bt, cos, sin):
        return transformer.decode_attention(q, kc, vc, lens, k=k, v=v, block_table=bt, rotary_cos=cos,
                                            rotary_sin=sin, rotary_interleaved=True, return_lse=True,
                                            backend=backend)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    kc1, vc1, kc2, vc2 = (t.clone() for t in (case.k_cache, case.v_cache) * 2)
    tabs = (kw["rotary_cos"], kw["rotary_sin"])
    eager = step(case.q, kc1, vc1, case.cache_seqlens, case.k, case.v, case.block_table, *tabs)
    comp = compiled(case.q, kc2, vc2, case.cache_seqlens, case.k, case.v, case.block_table, *tabs)
    assert torch.equal(bits(eager[0]), bits(comp[0])) and torch.equal(eager[1], comp[1])
    assert torch.equal(bits(kc1), bits(kc2)) and torch.equal(bits(vc1), bits(vc2))
