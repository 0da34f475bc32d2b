"""Fused LayerNorm / RMSNorm kernels (forward, backward, residual add, prenorm) against the reference (computed in fp64).

Kernel tests go through the public functions ``transformer.layer_norm`` / ``rms_norm`` with an explicit
``backend`` from ``helpers.kernel_backends("triton")``; a backend with the same API (CUDA) is added there.
On a CPU machine "triton" runs through the Triton interpreter. Tolerance: the flash-attn rule
(``helpers.assert_close``): error vs the fp64 reference at most 2x (outputs) / 3x
(gradients) PyTorch's own error computing the same thing in the inputs' precision, plus a small atol.

Default: a subset of the full grid (hidden {1, 7, 127, 768, 1000, 4096, 8193, 65536} x rows {1, 3, 257} x
features x dtypes) that fits the CPU budget; ``-m slow`` runs the full cross-product.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import transformer
from transformer import reference
from tests import helpers

BACKENDS = helpers.kernel_backends("triton", "cuda")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
EPS = {"layer_norm": 1e-5, "rms_norm": 1e-6}
HIDDEN = [1, 7, 127, 768, 1000, 4096, 8193, 65536]
ROWS = [1, 3, 257]

# Feature sets: (weight, bias, residual, residual dtype ("x" or "fp32"), prenorm, residual_in_fp32, param dtype)
FULL = dict(weight=True, bias=True, residual=True, prenorm=True)
VARIANTS = {
    "plain": dict(weight=False, bias=False),
    "weight": dict(weight=True, bias=False),
    "affine": dict(weight=True, bias=True),
    "residual": dict(residual=True),
    "full": FULL,
    "prenorm_no_residual": dict(prenorm=True),
    "res_fp32_in_fp32": dict(FULL, res_fp32=True, residual_in_fp32=True),
    "res_fp32": dict(FULL, res_fp32=True),   # h then has the residual's dtype, fp32
    "fp32_params": dict(FULL, param_fp32=True),
}


def _inputs(lead, n, dtype, *, weight=True, bias=True, residual=False, res_fp32=False, param_fp32=False, seed=0):
    g = torch.Generator().manual_seed(seed * 1000 + n)

    def mk(*shape, dt=dtype, scale=1.0, off=0.0):
        return (torch.randn(*shape, generator=g) * scale + off).to(dt).to(helpers.DEVICE)

    pdt = torch.float32 if param_fp32 else dtype
    x = mk(*lead, n, scale=2.0, off=0.5)           # an offset mean exercises the variance's cancellation
    w = mk(n, dt=pdt, scale=0.5, off=1.0) if weight else None
    b = mk(n, dt=pdt, scale=0.5) if bias else None
    r = mk(*lead, n, dt=torch.float32 if res_fp32 else dtype) if residual else None
    return x, w, b, r


def _leaves(ts, dtype=None):
    return [None if t is None else t.detach().to(dtype or t.dtype).clone().requires_grad_(True) for t in ts]


def _call(op, backend, x, w, b, r, *, prenorm, residual_in_fp32, compute_dtype="kernel"):
    eps = EPS[op]
    if compute_dtype == "kernel":
        fn = getattr(transformer, op)
        args = (x, w, b) if op == "layer_norm" else (x, w)
        return fn(*args, eps, residual=r, prenorm=prenorm, residual_in_fp32=residual_in_fp32, backend=backend)
    fn = getattr(reference, op)
    args = (x, w, b) if op == "layer_norm" else (x, w)
    return fn(*args, eps, residual=r, prenorm=prenorm, compute_dtype=compute_dtype)


def _run(op, backend, inputs, dy, dh, *, prenorm, residual_in_fp32, backward, compute_dtype="kernel",
         leaf_dtype=None):
    """(out, h or None, [dx, dw, db, dr] or None) on fresh leaves."""
    leaves = _leaves(inputs, leaf_dtype)
    ctx = torch.enable_grad() if backward else torch.no_grad()
    with ctx:
        res = _call(op, backend, *leaves, prenorm=prenorm, residual_in_fp32=residual_in_fp32,
                    compute_dtype=compute_dtype)
        out, h = res if prenorm else (res, None)
        if not backward:
            return out, h, None
        loss = (out.double() * dy).sum()
        if h is not None:
            loss = loss + (h.double() * dh).sum()
        loss.backward()
    return out, h, [None if t is None else t.grad for t in leaves]


def check_norm(backend, op, lead, n, dtype, *, weight=True, bias=True, residual=False, res_fp32=False,
               prenorm=False, residual_in_fp32=False, param_fp32=False, backward=True, seed=0):
    """Kernel vs reference (computed in fp64) with the tolerance rule, outputs and gradients."""
    helpers.require_backend(backend)
    bias = bias and op == "layer_norm"
    inputs = _inputs(lead, n, dtype, weight=weight, bias=bias, residual=residual, res_fp32=res_fp32,
                     param_fp32=param_fp32, seed=seed)
    # The incoming gradients are drawn in the dtype of the output they flow into (as flash-attn's tests draw
    # dout), so the kernel, the reference and the baseline all receive exactly the same values: an fp64 dy
    # would reach the kernel rounded to out's dtype but the reference (and a baseline whose out is
    # promoted to fp32) unrounded, and that rounding, not the kernel, would be measured.
    h_dtype = torch.float32 if residual_in_fp32 or (residual and res_fp32) else dtype
    g = torch.Generator().manual_seed(seed + 7)
    dy = torch.randn(*lead, n, generator=g, dtype=torch.float64).to(dtype).double().to(helpers.DEVICE)
    dh = torch.randn(*lead, n, generator=g, dtype=torch.float64).to(h_dtype).double().to(helpers.DEVICE)
    kw = dict(prenorm=prenorm, residual_in_fp32=residual_in_fp32, backward=backward)
    out, h, grads = _run(op, backend, inputs, dy, dh, **kw)
    # The reference computes in fp64 for every dtype. It must be more precise than the baseline (which
    # computes in fp32 for fp32 inputs, or half inputs promoted by an fp32 residual / fp32 parameters) and
    # than the kernels' fp32 arithmetic: at hidden 1 (rstd = 316 at var 0) an fp32 reference's own autograd
    # accumulates dx = dh + g - g with |g| ~ 500, and its rounding (1.5e-5) exceeded an exact fp16 baseline.
    ref_dtype = torch.float64
    r_out, r_h, r_grads = _run(op, backend, inputs, dy, dh, **kw, compute_dtype=ref_dtype, leaf_dtype=torch.float32)
    l_out, l_h, l_grads = _run(op, backend, inputs, dy, dh, **kw, compute_dtype=None)
    config = (f"{backend} {op} x{list(lead) + [n]} {DT[dtype]} w={weight} b={bias} res={residual}"
              f"{'(fp32)' if res_fp32 else ''} prenorm={prenorm} in_fp32={residual_in_fp32} fp32_params={param_fp32}")
    assert out.dtype == dtype and out.shape == inputs[0].shape, config
    helpers.assert_close(out, r_out, l_out, name="out", config=config)
    if prenorm:
        assert h.dtype == h_dtype, config   # h has the residual's dtype (flash-attn's rule)
        helpers.assert_close(h, r_h, l_h, name="h", config=config)
    if backward:
        for name, t, gr, rg, lg in zip(("dx", "dweight", "dbias", "dresidual"), inputs, grads, r_grads, l_grads):
            if t is None:
                continue
            assert gr is not None and gr.dtype == t.dtype and gr.shape == t.shape, f"{name} [{config}]"
            helpers.assert_close(gr, rg, _finite_baseline(lg, rg), factor=3.0, name=name, config=config)


def _finite_baseline(lowp, ref):
    """PyTorch's low-precision gradient, except where it is NaN (fp16 LayerNorm at hidden 1: var = 0 makes
    rsqrt's derivative overflow to inf, times 0): there, the reference rounded to the same dtype."""
    return torch.where(torch.isnan(lowp), ref.to(lowp.dtype), lowp)


# ---------------------------------------------------------------------------------------------
# The grid
# ---------------------------------------------------------------------------------------------

# Default: every hidden size and every rows count, all dtypes, every feature on (the most code paths), with
# 257 rows for the small sizes and 1-3 rows for the large ones (the interpreter is slow per element).
DEFAULT_SHAPES = [((257,), 1), ((257,), 7), ((257,), 127), ((3, 86), 768), ((1,), 1000), ((3,), 1000),
                  ((3,), 4096), ((2,), 5000), ((3,), 8193), ((1,), 65536)]   # 5000: fused fwd, looped bwd


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT.get)
@pytest.mark.parametrize("lead,n", DEFAULT_SHAPES, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_norm_full_features(backend, op, lead, n, dtype):
    check_norm(backend, op, lead, n, dtype, **FULL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=DT.get)
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_norm_variants(backend, op, dtype, variant):
    for lead, n in (((3, 5), 127), ((3,), 8193)):   # single-pass and looped
        check_norm(backend, op, lead, n, dtype, **VARIANTS[variant])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_norm_fp32_variants(backend, op):
    for variant in ("plain", "residual", "full"):
        check_norm(backend, op, (67,), 768, torch.float32, **VARIANTS[variant])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_norm_forward_only_and_partial_grads(backend, op):
    """No grad mode; and only some inputs requiring grad (the kernels skip dW/dB partials then)."""
    check_norm(backend, op, (3,), 1000, torch.bfloat16, backward=False, **FULL)
    helpers.require_backend(backend)
    x, w, b, r = _inputs((5,), 300, torch.bfloat16, residual=True)
    xl = x.clone().requires_grad_(True)
    fn = getattr(transformer, op)
    args = (xl, w, b) if op == "layer_norm" else (xl, w)
    out = fn(*args, EPS[op], residual=r, backend=backend)
    out.float().sum().backward()
    xr = x.float().clone().requires_grad_(True)
    args = (xr, w.float(), b.float()) if op == "layer_norm" else (xr, w.float())
    getattr(reference, op)(*args, EPS[op], residual=r.float()).sum().backward()
    xlow = x.clone().requires_grad_(True)
    args = (xlow, w, b) if op == "layer_norm" else (xlow, w)
    getattr(reference, op)(*args, EPS[op], residual=r, compute_dtype=None).float().sum().backward()
    helpers.assert_close(xl.grad, xr.grad, xlow.grad, factor=3.0, name="dx")


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=DT.get)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("n", HIDDEN)
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_norm_grid_slow(backend, op, n, rows, dtype, variant):
    check_norm(backend, op, (rows,), n, dtype, **VARIANTS[variant])


# ---------------------------------------------------------------------------------------------
# Kernel paths: looped variant on small sizes, the shipped GPU tiles, strides, numerics
# ---------------------------------------------------------------------------------------------

def _kernels(backend):
    if backend != "triton":
        pytest.skip(f"kernel-path switches exist for the triton backend only, not {backend!r}")
    from triton_kernels import norms
    return norms


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_looped_path_many_chunks(backend, op, monkeypatch):
    """Force the looped kernels with 64-wide chunks: multi-chunk Chan merge, partial last chunk, 2-D backward
    grid with several row groups and column chunks."""
    k = _kernels(backend)
    monkeypatch.setattr(k, "MAX_FUSED_N", 32)
    monkeypatch.setattr(k, "MAX_FUSED_N_ANY_ALIGN", 32)
    for key in ("loop_block_n", "bwd_block_n"):
        monkeypatch.setitem(k.INTERP_TILES, key, 64)
    monkeypatch.setitem(k.INTERP_TILES, "bwd_block_m", 8)
    for lead, n, dtype in (((67,), 300, torch.bfloat16), ((3,), 33, torch.float32), ((2, 7), 127, torch.float16),
                           ((1,), 64, torch.bfloat16)):
        check_norm(backend, op, lead, n, dtype, **FULL)
    check_norm(backend, op, (5,), 200, torch.bfloat16, **VARIANTS["res_fp32_in_fp32"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_gpu_tiles_under_interpreter(backend, op, monkeypatch):
    """The shipped GPU tile shapes (BLOCK_M rows per program, 1-row looped programs) run the same kernels."""
    k = _kernels(backend)
    for key, val in k.GPU_TILES.items():
        monkeypatch.setitem(k.INTERP_TILES, key, val)
    for lead, n in (((33,), 127), ((5,), 1000), ((2,), 8193)):
        check_norm(backend, op, lead, n, torch.bfloat16, **FULL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("n", [239, 8193])
def test_row_strides_and_layouts(backend, op, n):
    """x and residual with row strides != n (slices of wider buffers), a 3-D input that has no 2-D view,
    and a non-contiguous incoming gradient (expanded)."""
    helpers.require_backend(backend)
    fn = getattr(transformer, op)
    base = torch.randn(7, n + 40, dtype=torch.bfloat16)
    x = base[:, 8:8 + n]
    r = torch.randn(7, 2 * n + 1, dtype=torch.float32)[:, :n]
    w = torch.randn(n)
    b = torch.randn(n)

    def run(x, r, w, b, kernel):
        args = (x, w, b) if op == "layer_norm" else (x, w)
        if kernel:
            return fn(*args, EPS[op], residual=r, prenorm=True, backend=backend)
        return getattr(reference, op)(*args, EPS[op], residual=r, prenorm=True)

    (out, h), (ro, rh) = run(x, r, w, b, True), run(x, r, w, b, False)
    (lo, lh) = getattr(reference, op)(*((x, w.bfloat16(), b.bfloat16()) if op == "layer_norm" else
                                        (x, w.bfloat16())), EPS[op], residual=r, prenorm=True, compute_dtype=None)
    helpers.assert_close(out, ro, lo, name="out (strided)")
    helpers.assert_close(h, rh, lh, name="h (strided)")
    # 3-D input with no [M, n] view: every other row of a [2, 6, n] tensor
    x3 = torch.randn(2, 6, n, dtype=torch.float16)[:, ::2]
    args = (x3, w, b) if op == "layer_norm" else (x3, w)
    out3 = fn(*args, EPS[op], backend=backend)
    ref3 = getattr(reference, op)(*args, EPS[op])
    low3 = getattr(reference, op)(*((x3, w.half(), b.half()) if op == "layer_norm" else (x3, w.half())), EPS[op],
                                  compute_dtype=None)
    helpers.assert_close(out3, ref3, low3, name="out (3-D, no view)")
    # expanded incoming gradient (stride 0): out.sum().backward()
    xl = x.detach().clone().requires_grad_(True)
    wl = w.clone().requires_grad_(True)
    args = (xl, wl, b) if op == "layer_norm" else (xl, wl)
    fn(*args, EPS[op], backend=backend).sum().backward()
    xr, wr = x.detach().float().requires_grad_(True), w.clone().requires_grad_(True)
    args = (xr, wr, b) if op == "layer_norm" else (xr, wr)
    getattr(reference, op)(*args, EPS[op]).sum().backward()
    xo, wo = x.detach().clone().requires_grad_(True), w.bfloat16().requires_grad_(True)
    args = (xo, wo, b.bfloat16()) if op == "layer_norm" else (xo, wo)
    getattr(reference, op)(*args, EPS[op], compute_dtype=None).float().sum().backward()
    helpers.assert_close(xl.grad, xr.grad, xo.grad, factor=3.0, name="dx (expanded dy)")
    helpers.assert_close(wl.grad, wr.grad, wo.grad, factor=3.0, name="dweight (expanded dy)")


def _many_rows_case(backend, op):
    """dW / dB sum over every row: 4097 fp32 rows of 4200 with a residual (the looped backward; under the
    emulator's 3 SMs the CUDA grid has 5 row groups of ~820 rows). A plain fp32 running sum per column erred 4.3x
    PyTorch's pairwise sum here (the rule allows 3x; the CUDA kernels also failed 5 fp32 cases of 257 x 65536 in
    the slow grid); the CUDA sums are compensated (csrc/norms KahanSum), Triton's are two-level."""
    check_norm(backend, op, (4097,), 4200, torch.float32, residual=True, weight=True, bias=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_rows_weight_grad_accuracy(backend):
    _many_rows_case(backend, "rms_norm")


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_many_rows_weight_grad_accuracy_layer_norm(backend):
    _many_rows_case(backend, "layer_norm")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [1000, 8193])
@pytest.mark.parametrize("residual", [False, True])
def test_large_mean_no_cancellation(backend, n, residual):
    """Rows with mean 1e4 and std 1 in fp32: neither the variance nor the mean may lose accuracy to the
    offset. 24 rows, each checked on its own (the old unshifted fp32 mean failed about 1 row in 20 at
    n=8193, so three rows passed by luck); the residual variant checks the shift includes the residual."""
    helpers.require_backend(backend)
    g = torch.Generator().manual_seed(n + residual)
    x = torch.randn(24, n, dtype=torch.float64, generator=g) + 1e4
    r = None
    if residual:
        r = (torch.randn(24, n, dtype=torch.float64, generator=g) - 5e3).float()   # h = x + r: mean 5e3
    out = transformer.layer_norm(x.float(), None, None, 1e-5, residual=r, backend=backend)
    ref = reference.layer_norm(x.float(), residual=r, compute_dtype=torch.float64)
    low = reference.layer_norm(x.float(), residual=r, compute_dtype=None)
    for i in range(out.shape[0]):   # row by row: a max over all rows would let a bad row hide
        helpers.assert_close(out[i], ref[i], low[i], name=f"out row {i} (mean 1e4)")
    assert float((out.double() - ref).abs().max()) < 2e-2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rows,n", [(67, 768), (5, 8193)])
def test_dweight_deterministic(backend, rows, n):
    """dW/dB (two-stage reduction, no atomics) and dx are bit-identical across runs."""
    helpers.require_backend(backend)
    x, w, b, r = _inputs((rows,), n, torch.bfloat16, residual=True, param_fp32=True)
    results = []
    for _ in range(2):
        xl, wl, bl = (t.clone().requires_grad_(True) for t in (x, w, b))
        out, h = transformer.layer_norm(xl, wl, bl, 1e-5, residual=r, prenorm=True, backend=backend)
        (out.float().square().sum() + h.float().sum()).backward()
        results.append((xl.grad, wl.grad, bl.grad))
    for name, a, c in zip(("dx", "dweight", "dbias"), *results):
        assert torch.equal(a, c), f"{name} differs between two identical runs"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_empty_batch(backend, op):
    helpers.require_backend(backend)
    x = torch.randn(0, 64, requires_grad=True)
    w = torch.randn(64, requires_grad=True)
    fn = getattr(transformer, op)
    out = fn(x, w, EPS[op], backend=backend) if op == "rms_norm" else fn(x, w, None, EPS[op], backend=backend)
    assert out.shape == (0, 64)
    out.sum().backward()
    assert x.grad.shape == (0, 64) and torch.equal(w.grad, torch.zeros(64))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_int64_row_offsets(backend):
    """More than 2^31 elements: the last rows must be addressed with 64-bit offsets."""
    if not helpers.HAS_GPU:
        pytest.skip("needs a CUDA GPU: a tensor of more than 2^31 elements is too large for the interpreter")
    helpers.require_backend(backend)
    n = 4096
    rows = (2 ** 31) // n + 3
    x = torch.randn(rows, n, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, device="cuda")
    out = transformer.rms_norm(x, w, 1e-6, backend=backend)
    tail = x[-5:]
    helpers.assert_close(out[-5:], reference.rms_norm(tail, w, 1e-6),
                         reference.rms_norm(tail, w.bfloat16(), 1e-6, compute_dtype=None), name="out (tail rows)")


# ---------------------------------------------------------------------------------------------
# Errors, dispatch, custom ops, torch.compile
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_bad_input(backend, op):
    helpers.require_backend(backend)
    fn = getattr(transformer, op)
    x = torch.randn(4, 16)

    def call(x=x, w=None, b=None, eps=1e-5, r=None):
        if op == "layer_norm":
            return fn(x, w, b, eps, residual=r, backend=backend)
        return fn(x, w, eps, residual=r, backend=backend)

    with pytest.raises(ValueError, match="weight"):
        call(w=torch.randn(15))
    with pytest.raises(ValueError, match="residual"):
        call(r=torch.randn(4, 15))
    with pytest.raises(TypeError, match="residual"):
        call(x=x.bfloat16(), r=torch.randn(4, 16, dtype=torch.float16))
    for eps in (0.0, -1e-5):
        with pytest.raises(ValueError, match="eps"):
            call(eps=eps)
    with pytest.raises(TypeError, match="eps"):
        call(eps="1e-5")
    with pytest.raises(ValueError, match="x"):
        call(x=torch.randn(4, 0))
    with pytest.raises(TypeError, match="x"):
        call(x=torch.randn(4, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="x"):
        call(x=torch.randn(16, 4).t())            # last dim not contiguous
    if op == "layer_norm":
        with pytest.raises(ValueError, match="bias"):
            call(b=torch.randn(17))


@pytest.mark.parametrize("backend", BACKENDS)
def test_dispatch_limits(backend):
    helpers.require_backend(backend)
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    assert f"layer_norm -> {backend}" in transformer.backends.explain("layer_norm", x, backend=backend)
    big = torch.randn(1, 65537)
    with pytest.raises(ValueError, match="65536"):
        transformer.rms_norm(big, None, 1e-6, backend=backend)


def _op_args(requires_grad):
    x = torch.randn(3, 40, dtype=torch.bfloat16, requires_grad=requires_grad)
    w = torch.randn(40, requires_grad=requires_grad)
    b = torch.randn(40, dtype=torch.bfloat16, requires_grad=requires_grad)
    r = torch.randn(3, 40, requires_grad=requires_grad)
    return x, w, b, r


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch of the custom ops."""
    helpers.require_backend(backend)
    _kernels(backend)
    import transformer._triton.norms  # noqa: F401  (registers the tileformer_triton norm ops)
    ops = torch.ops.tileformer_triton
    x, w, b, r = _op_args(True)
    torch.library.opcheck(ops.norm_fwd.default, (x, w, b, r, 1e-5, False, True, True))
    torch.library.opcheck(ops.norm_fwd.default, (x, w, None, None, 1e-6, True, False, False))
    with torch.no_grad():
        _, h, mean, rstd = ops.norm_fwd(x, w, b, r, 1e-5, False, True, True)
    dy = torch.randn(3, 40, dtype=torch.bfloat16)
    torch.library.opcheck(ops.norm_bwd.default, (dy, torch.randn(3, 40), h, None, w.detach(), mean, rstd, False,
                                                 torch.bfloat16, torch.float32, torch.float32, torch.bfloat16))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_torch_compile_fullgraph(backend, op):
    """torch.compile(fullgraph=True) traces the public function (custom op + fake impl), forward and backward."""
    helpers.require_backend(backend)
    fn = getattr(transformer, op)

    def block(x, w, b, r):
        args = (x, w, b) if op == "layer_norm" else (x, w)
        out, h = fn(*args, EPS[op], residual=r, prenorm=True, residual_in_fp32=True, backend=backend)
        return out.float().sum() + (h * h).sum()

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    x, w, b, r = _op_args(False)
    grads = []
    for f in (block, compiled):
        leaves = [t.clone().requires_grad_(True) for t in (x, w, b, r)]
        f(*leaves).backward()
        grads.append([t.grad for t in leaves])
    for name, a, c in zip(("dx", "dw", "db", "dr"), *grads):
        if op == "rms_norm" and name == "db":
            continue
        assert torch.equal(a, c), f"{name}: compiled != eager"


# ---------------------------------------------------------------------------------------------
# Drop-in modules
# ---------------------------------------------------------------------------------------------

def _module_pair(kind, shape, backend, **kw):
    torch.manual_seed(0)
    tcls, ocls = (torch.nn.LayerNorm, transformer.LayerNorm) if kind == "layer" else (torch.nn.RMSNorm,
                                                                                        transformer.RMSNorm)
    ref = tcls(shape, **kw)
    with torch.no_grad():             # non-trivial parameters
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * 0.5 + 1.0)
    ours = ocls(shape, backend=backend, **kw)
    assert isinstance(ours, tcls)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    ours.load_state_dict(ref.state_dict())
    return ref, ours


MODULE_CASES = [("layer", 96, {}), ("layer", (4, 24), {}), ("layer", 96, dict(bias=False)),
                ("layer", 96, dict(elementwise_affine=False)), ("rms", 96, {}), ("rms", (4, 24), dict(eps=1e-5)),
                ("rms", 96, dict(elementwise_affine=False))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DT.get)
@pytest.mark.parametrize("kind,shape,kw", MODULE_CASES, ids=[f"{k}-{s}-{'-'.join(kw) or 'default'}"
                                                            for k, s, kw in MODULE_CASES])
def test_modules_match_torch(backend, kind, shape, kw, dtype):
    helpers.require_backend(backend)
    ref, ours = _module_pair(kind, shape, backend, **kw)
    shape_t = (shape,) if isinstance(shape, int) else shape
    x = torch.randn(5, 3, *shape_t).to(dtype)
    xr = x.clone().requires_grad_(True)
    xo = x.clone().requires_grad_(True)
    ref64 = _module_pair(kind, shape, "reference", **kw)[0].double()
    if kind == "rms" and ref64.eps is None:     # torch's eps=None is finfo(x.dtype).eps: that of the input
        ref64.eps = torch.finfo(dtype).eps
    x64 = x.double().requires_grad_(True)
    out_ref = ref.to(dtype)(xr)           # torch's module in the input precision: the low-precision baseline
    out = ours.to(dtype)(xo)
    out64 = ref64(x64)
    helpers.assert_close(out, out64, out_ref, name="module out")
    dy = torch.randn_like(out64)
    for o, t in ((out_ref, xr), (out, xo), (out64, x64)):
        (o.double() * dy).sum().backward()
    helpers.assert_close(xo.grad, x64.grad, xr.grad, factor=3.0, name="module dx")
    for (name, p), p_ref, p64 in zip(ours.named_parameters(), ref.parameters(), ref64.parameters()):
        helpers.assert_close(p.grad, p64.grad, p_ref.grad, factor=3.0, name=f"module d{name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_modules_residual_prenorm(backend, kind):
    helpers.require_backend(backend)
    _, ours = _module_pair(kind, (2, 48), backend)
    x = torch.randn(3, 2, 48, dtype=torch.bfloat16)
    r = torch.randn(3, 2, 48, dtype=torch.bfloat16)
    out, h = ours(x, residual=r, prenorm=True)
    assert out.shape == x.shape and h.shape == x.shape and h.dtype == torch.bfloat16
    w = ours.weight.reshape(-1)
    flat = (x.reshape(3, 96), w) + ((ours.bias.reshape(-1),) if kind == "layer" else ())
    fn = reference.layer_norm if kind == "layer" else reference.rms_norm
    eps = ours.eps if ours.eps is not None else torch.finfo(torch.bfloat16).eps
    ro, rh = fn(*flat, eps, residual=r.reshape(3, 96), prenorm=True)
    lo, lh = fn(flat[0], *(p.bfloat16() for p in flat[1:]), eps, residual=r.reshape(3, 96), prenorm=True,
                compute_dtype=None)
    helpers.assert_close(out.reshape(3, 96), ro, lo, name="module out (residual)")
    helpers.assert_close(h.reshape(3, 96), rh, lh, name="module h")
    with pytest.raises(ValueError, match="normalized_shape"):
        ours(torch.randn(3, 96))


def test_modules_exported():
    assert transformer.nn.LayerNorm is transformer.LayerNorm
    assert transformer.nn.RMSNorm is transformer.RMSNorm
    m = transformer.RMSNorm(8)
    assert m.backend == "auto" and m.eps is None
    x = torch.randn(2, 8)
    torch.testing.assert_close(m(x), torch.nn.functional.rms_norm(x, (8,), m.weight))   # auto -> torch on CPU


# ---------------------------------------------------------------------------------------------
# Static: every shipped config compiles for sm_80 / sm_90 with no spills, within shared memory
# ---------------------------------------------------------------------------------------------

# Runs in a subprocess without TRITON_INTERPRET (this process holds the interpreter's kernel objects, which
# cannot be compiled). Configs named "[aligned]" only run on 16-byte aligned data with n and strides divisible
# by 16: they carry those divisibility hints (AotConfig.divisible, as Triton infers at launch); the others
# compile without (scalar loads, the most address registers).
_STATIC_SCRIPT = """
import dataclasses, json, sys
import triton.compiler
from benchmarks.kernel_report import triton_report
from triton_kernels.norms import aot_configs

stats = triton_report(configs=aot_configs())
json.dump([dataclasses.asdict(s) for s in stats], sys.stdout)
"""


@pytest.fixture(scope="module")
def static_report():
    pytest.importorskip("triton")
    from benchmarks.kernel_report import KernelStats, format_table

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _STATIC_SCRIPT], capture_output=True, text=True, env=env, cwd=root)
    assert res.returncode == 0, res.stderr[-3000:]
    stats = [KernelStats(**s) for s in json.loads(res.stdout)]
    print("\n" + format_table(stats))
    return stats


@pytest.mark.static
def test_static_no_spills(static_report):
    """Every shipped config compiles for sm_80 and sm_90 with no spill and no local memory, within the
    arch's shared memory. Configs for any alignment compile without divisibility hints (scalar loads: the
    most address registers); "[aligned]" ones with them."""
    from benchmarks import kernel_report

    assert static_report, "no config compiled"
    archs = {s.arch for s in static_report}
    assert archs == {80, 90}, f"compiled for {archs}"
    bad = [f"{s.name} sm_{s.arch}: {s.error or f'{s.spills} bytes spilled, {s.local_bytes} local'}"
           for s in static_report if s.error or s.spills or s.local_bytes]
    assert not bad, "\n".join(bad)
    over = [f"{s.name} sm_{s.arch}: {s.smem} B" for s in static_report if s.smem > kernel_report.SMEM_LIMIT[s.arch]]
    assert not over, "\n".join(over)
