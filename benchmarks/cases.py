"""Benchmark cases: the sweeps and their random inputs.

A `Case` is one (op, mode, shape, dtype); its FLOPs and minimum bytes come from formulas.py. Op names are
the public functions: flash_attention, decode_attention, layer_norm, rms_norm. Sweeps:

    gpu   attention Nq = Nk in 512..16k with B*N = 16k tokens, H*D = 2048, D in {64, 128}, causal on/off,
          GQA 8:1 (D = 128); decode B {1, 8, 64} x L {1k, 8k, 32k} x group {1, 4, 8} (Hq = 32, D = 128),
          contiguous and paged (256-token pages), and group 8 over int8 / fp8 e4m3 caches (kv=..., per-token
          scales) at B {8, 64} x L {8k, 32k} beside the same 16-bit cases; norms hidden 512..65536 at 16k rows
    quick a subset of gpu (3 points per curve)
    cpu   small sizes for the reference and torch backends on the CPU
"""
from __future__ import annotations

import dataclasses

import torch

from . import formulas
from .harness import format_shape

OPS = ("flash_attention", "decode_attention", "layer_norm", "rms_norm")
MODES = {"flash_attention": ("fwd", "bwd", "fwd+bwd"), "decode_attention": ("fwd",),
         "layer_norm": ("fwd", "bwd"), "rms_norm": ("fwd", "bwd")}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Plot axes: the x parameter and the parameters that vary along a curve with it (left out of the panel title).
X_AXIS = {"flash_attention": ("Nq", ("B", "Nq", "Nk")), "decode_attention": ("L", ("L",)),
          "layer_norm": ("N", ("N",)), "rms_norm": ("N", ("N",))}
MEMORY_BOUND = ("decode_attention", "layer_norm", "rms_norm")
NORM_EPS = 1e-5
PAGE_SIZE = 256          # flash-attn's paged KV cache needs a multiple of 256
KV_FORMATS = ("int8", "fp8_e4m3")   # quantized decode caches (decode_case's kv)


@dataclasses.dataclass(frozen=True)
class Case:
    op: str
    mode: str
    params: tuple        # ((name, value), ...) in display order
    dtype: str = "bf16"

    def __post_init__(self):
        if self.op not in OPS:
            raise ValueError(f"op must be one of {OPS}, got {self.op!r}")
        if self.mode not in MODES[self.op]:
            raise ValueError(f"mode must be one of {MODES[self.op]} for {self.op}, got {self.mode!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")

    @property
    def p(self) -> dict:
        return dict(self.params)

    @property
    def shape(self) -> str:
        return format_shape(self.p)

    @property
    def torch_dtype(self):
        return DTYPES[self.dtype]

    @property
    def memory_bound(self):
        return self.op in MEMORY_BOUND

    def flops(self):
        p = self.p
        if self.op == "flash_attention":
            return formulas.attention_flops(p["B"], p["Hq"], p["Nq"], p["Nk"], p["D"], p["causal"], self.mode)
        if self.op == "decode_attention":
            return formulas.decode_flops(p["B"], p["Hq"], p["Sq"], p["L"], p["D"])
        return None

    def bytes(self):
        p = self.p
        if self.op == "flash_attention":
            return formulas.attention_bytes(p["B"], p["Nq"], p["Nk"], p["Hq"], p["Hkv"], p["D"], self.dtype,
                                            self.mode)
        if self.op == "decode_attention":
            return formulas.decode_bytes(p["B"], p["Sq"], p["Hq"], p["Hkv"], p["D"], p["L"], self.dtype,
                                         p["page"], kv_dtype=p.get("kv"))
        return formulas.norm_bytes(p["M"], p["N"], self.dtype, bias=self.op == "layer_norm", mode=self.mode)


def attention_case(mode, B, Nq, Nk, Hq, Hkv, D, causal, dtype="bf16", dropout=0.0):
    """dropout > 0: attention dropout (param "dropout", absent otherwise), timed against the same case without."""
    extra = (("dropout", float(dropout)),) if dropout else ()
    return Case("flash_attention", mode, (("B", B), ("Nq", Nq), ("Nk", Nk), ("Hq", Hq), ("Hkv", Hkv), ("D", D),
                                          ("causal", int(causal))) + extra, dtype)


def decode_case(B, L, Hq, Hkv, D, page, Sq=1, dtype="bf16", kv=None):
    """page = 0: contiguous cache [B, L, Hkv, D]; page > 0: paged cache with page-token pages. kv: None (a cache
    of `dtype`) or a quantized format of KV_FORMATS (8-bit values + fp32 scales per token and kv head)."""
    if kv is not None and kv not in KV_FORMATS:
        raise ValueError(f"kv must be None or one of {KV_FORMATS}, got {kv!r}")
    params = (("B", B), ("L", L), ("Hq", Hq), ("Hkv", Hkv), ("D", D), ("Sq", Sq), ("page", page))
    return Case("decode_attention", "fwd", params + ((("kv", kv),) if kv else ()), dtype)


def norm_case(op, mode, M, N, dtype="bf16"):
    return Case(op, mode, (("M", M), ("N", N)), dtype)


# ---------------------------------------------------------------------------------------------
# Sweeps
# ---------------------------------------------------------------------------------------------

def _attention_sweep(seqlens, variants, tokens, dtype, modes):
    """variants: (D, H, Hkv, causal); B = tokens // N."""
    return [attention_case(m, max(1, tokens // n), n, n, h, hkv, d, c, dtype)
            for m in modes for (d, h, hkv, c) in variants for n in seqlens]


def sweep(kind="gpu", dtype="bf16", ops=OPS):
    """The cases of a sweep: "gpu" (the issue's full sweep), "quick" (a subset) or "cpu" (small sizes)."""
    if kind not in ("gpu", "quick", "cpu"):
        raise ValueError(f"kind must be 'gpu', 'quick' or 'cpu', got {kind!r}")
    cases = []
    if kind == "gpu":
        att = _attention_sweep([512, 1024, 2048, 4096, 8192, 16384],
                               [(64, 32, 32, 0), (64, 32, 32, 1), (128, 16, 16, 0), (128, 16, 16, 1),
                                (128, 16, 2, 0), (128, 16, 2, 1)], 16384, dtype, MODES["flash_attention"])
        dec = [decode_case(b, L, 32, 32 // g, 128, page, dtype=dtype)
               for page in (0, PAGE_SIZE) for g in (1, 4, 8) for b in (1, 8, 64) for L in (1024, 8192, 32768)]
        dec += [decode_case(b, L, 32, 4, 128, page, dtype=dtype, kv=kv)
                for kv in KV_FORMATS for page in (0, PAGE_SIZE) for b in (8, 64) for L in (8192, 32768)]
        hidden, rows = [512, 1024, 2048, 4096, 8192, 16384, 32768, 65536], 16384
        # attention dropout at N 8k, D 128 (its cost over the same call without: the cases above)
        att += [attention_case(m, 2, 8192, 8192, 16, 16, 128, c, dtype, dropout=0.1)
                for m in MODES["flash_attention"] for c in (0, 1)]
    elif kind == "quick":
        att = _attention_sweep([1024, 4096, 16384], [(128, 16, 16, 0), (128, 16, 16, 1), (128, 16, 2, 1)],
                               16384, dtype, MODES["flash_attention"])
        dec = [decode_case(b, L, 32, 32 // g, 128, page, dtype=dtype)
               for page in (0, PAGE_SIZE) for g in (1, 8) for b in (1, 64) for L in (1024, 8192, 32768)]
        dec += [decode_case(64, L, 32, 4, 128, 0, dtype=dtype, kv=kv) for kv in KV_FORMATS for L in (8192, 32768)]
        hidden, rows = [1024, 8192, 65536], 16384
    else:
        att = _attention_sweep([128, 256, 512], [(64, 4, 4, 0), (64, 4, 4, 1), (64, 8, 1, 1)], 1024, dtype,
                               MODES["flash_attention"])
        dec = [decode_case(2, L, 8, 8 // g, 64, page, dtype=dtype)
               for page in (0, PAGE_SIZE) for g in (1, 8) for L in (256, 1024, 4096)]
        dec += [decode_case(2, 4096, 8, 1, 64, 0, dtype=dtype, kv=kv) for kv in KV_FORMATS]
        hidden, rows = [512, 2048, 8192], 256
    norms = [norm_case(op, m, rows, n, dtype) for op in ("layer_norm", "rms_norm") for m in MODES[op]
             for n in hidden]
    for c in att + dec + norms:
        if c.op in ops:
            cases.append(c)
    return cases


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------

def _randn(shape, dtype, device, gen, scale=1.0, requires_grad=False):
    t = torch.randn(shape, dtype=dtype, device=device, generator=gen)   # drawn in dtype: no fp32 copy of a cache
    if scale != 1.0:
        t.mul_(scale)
    return t.requires_grad_(requires_grad)


def _quantize(cache, kv, rows=4096):
    """reference.quantize_kv of cache [N, S, Hkv, D] in slices of `rows` (the fp32 intermediates of a whole
    long-context cache would need several times its size)."""
    from transformer import reference
    vals = torch.empty(cache.shape, dtype=reference.quantize_kv(cache[:1, :1], kv)[0].dtype, device=cache.device)
    scales = torch.empty(cache.shape[:-1], dtype=torch.float32, device=cache.device)
    flat, fv, fs = cache.flatten(0, 1), vals.flatten(0, 1), scales.flatten(0, 1)
    for i in range(0, flat.shape[0], rows):
        fv[i:i + rows], fs[i:i + rows] = reference.quantize_kv(flat[i:i + rows], kv)
    return vals, scales


def make_inputs(case: Case, device, *, requires_grad=False, seed=0):
    """Random inputs (never zeros) for `case` on `device`: a dict of tensors and the grad leaves.

    flash_attention: q, k, v [B, N, H, D]; decode_attention: q [B, Sq, Hq, D], k_cache/v_cache
    (contiguous [B, L, Hkv, D] or paged [B * L / page, page, Hkv, D] with a shuffled block_table; with kv,
    reference.quantize_kv of a random cache: 8-bit values and k_scale/v_scale), cache_seqlens = L for every
    sequence; norms: x [M, N], weight (+ bias) [N] near 1 (resp. 0).
    """
    device = torch.device(device)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    p, dt = case.p, case.torch_dtype
    rg = requires_grad
    if case.op == "flash_attention":
        inp = dict(q=_randn((p["B"], p["Nq"], p["Hq"], p["D"]), dt, device, gen, requires_grad=rg),
                   k=_randn((p["B"], p["Nk"], p["Hkv"], p["D"]), dt, device, gen, requires_grad=rg),
                   v=_randn((p["B"], p["Nk"], p["Hkv"], p["D"]), dt, device, gen, requires_grad=rg))
        inp["grad_inputs"] = (inp["q"], inp["k"], inp["v"])
        return inp
    if case.op == "decode_attention":
        b, L, hkv, d, page = p["B"], p["L"], p["Hkv"], p["D"], p["page"]
        inp = dict(q=_randn((b, p["Sq"], p["Hq"], d), dt, device, gen),
                   cache_seqlens=torch.full((b,), L, dtype=torch.int32, device=device), block_table=None)
        if page:
            per_seq = -(-L // page)
            shape = (b * per_seq, page, hkv, d)
            perm = torch.randperm(b * per_seq, generator=gen, device=device)
            inp["block_table"] = perm.view(b, per_seq).to(torch.int32)
        else:
            shape = (b, L, hkv, d)
        inp["k_scale"] = inp["v_scale"] = None
        for name in ("k", "v"):
            cache = _randn(shape, dt, device, gen)
            if p.get("kv"):
                cache, inp[f"{name}_scale"] = _quantize(cache, p["kv"])
            inp[f"{name}_cache"] = cache
        inp["grad_inputs"] = ()
        return inp
    m, n = p["M"], p["N"]
    inp = dict(x=_randn((m, n), dt, device, gen, requires_grad=rg),
               weight=(1 + _randn((n,), torch.float32, device, gen, scale=0.1)).to(dt).requires_grad_(rg),
               bias=None)
    if case.op == "layer_norm":
        inp["bias"] = _randn((n,), dt, device, gen, scale=0.1, requires_grad=rg)
    inp["grad_inputs"] = tuple(t for t in (inp["x"], inp["weight"], inp["bias"]) if t is not None)
    return inp
