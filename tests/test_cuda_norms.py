"""LayerNorm / RMSNorm kernels through the public API, compared with the fp32 reference.

Parametrised over kernel backends (helpers.kernel_backends): on this CPU machine "cuda" runs the CUDA
C++ kernels (csrc/norms) through the host emulation (TILEFORMER_EMULATE_CUDA=1). Tolerance: the
flash-attn rule (helpers.assert_close): factor 2 for outputs, 3 for gradients, against PyTorch
computing the same thing in the inputs' precision.
"""
import pytest
import torch

import transformer
from transformer import reference
from tests import helpers

BACKENDS = helpers.kernel_backends("cuda")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

# (leading shape, hidden): odd sizes, each kernel configuration (warp per row <= 1024 (fp16) / 512 (fp32),
# block per row <= 8192 / 4096, big block <= 32768 / 16384, looped beyond), and an empty batch.
SHAPES = [((3,), 1), ((2, 5), 113), ((7,), 239), ((4,), 1023), ((1, 3), 1024), ((3,), 1031), ((2,), 4096),
          ((3,), 5000), ((2,), 8192), ((2,), 20011)]
MODES = ["residual", "prenorm", "prenorm_fp32", "fp32_residual_in", "fp32_params", "no_params"]
SLOW_SHAPES = [((2,), 65536), ((1,), 40000), ((97,), 1536), ((300,), 96)]


def _inputs(lead, n, dtype, *, weight=True, bias=True, residual=False, residual_fp32=False, param_dtype=None,
            seed=0):
    g = torch.Generator().manual_seed(seed + n)
    dev = helpers.DEVICE
    mk = lambda *s, dt=dtype, scale=1.0, off=0.0: (torch.randn(*s, generator=g) * scale + off).to(dt).to(dev)  # noqa
    x = mk(*lead, n, off=0.5, scale=2.0)       # a mean far from 0 tests the variance's cancellation
    pd = param_dtype or dtype
    w = mk(n, dt=pd, off=1.0, scale=0.5) if weight else None
    b = mk(n, dt=pd, scale=0.5) if bias else None
    r = mk(*lead, n, dt=torch.float32 if residual_fp32 else dtype) if residual else None
    return x, w, b, r


def _grad_leaves(*ts):
    return [t.detach().clone().requires_grad_(True) if t is not None else None for t in ts]


def _run(fn, x, w, b, r, dy, dh, **kw):
    """(outputs, grads of x, w, b, r) of fn on fresh leaves; backward with dy (and dh for prenorm)."""
    x, w, b, r = _grad_leaves(x, w, b, r)
    res = fn(x, w, b, r, **kw)
    outs = res if isinstance(res, tuple) else (res,)
    loss = (outs[0].float() * dy).sum()
    if len(outs) > 1 and dh is not None:
        loss = loss + (outs[1].float() * dh).sum()
    loss.backward()
    return outs, [None if t is None else t.grad for t in (x, w, b, r)]


def _check(backend, is_rms, lead, n, dtype, *, weight=True, bias=True, residual=False, residual_fp32=False,
           prenorm=False, residual_in_fp32=False, param_dtype=None, backward=True):
    helpers.require_backend(backend)
    bias = bias and not is_rms
    x, w, b, r = _inputs(lead, n, dtype, weight=weight, bias=bias, residual=residual, residual_fp32=residual_fp32,
                         param_dtype=param_dtype)
    eps = 1e-6 if is_rms else 1e-5
    kw = dict(prenorm=prenorm, residual_in_fp32=residual_in_fp32)
    if is_rms:
        kern = lambda x, w, b, r, **k: transformer.rms_norm(x, w, eps, residual=r, backend=backend, **k)  # noqa
        ref = lambda x, w, b, r, cd, **k: reference.rms_norm(x, w, eps, residual=r, compute_dtype=cd, **k)  # noqa
    else:
        kern = lambda x, w, b, r, **k: transformer.layer_norm(x, w, b, eps, residual=r, backend=backend, **k)  # noqa
        ref = lambda x, w, b, r, cd, **k: reference.layer_norm(x, w, b, eps, residual=r, compute_dtype=cd, **k)  # noqa
    g = torch.Generator().manual_seed(7)
    dy = torch.randn(*lead, n, generator=g).to(helpers.DEVICE)
    dh = torch.randn(*lead, n, generator=g).to(helpers.DEVICE) if prenorm else None
    cfg = f"{'rms' if is_rms else 'ln'} {lead}x{n} {dtype} w={weight} b={bias} res={residual}/{residual_fp32} " \
          f"prenorm={prenorm} res_fp32={residual_in_fp32} pd={param_dtype}"
    if not backward:
        with torch.no_grad():
            outs = kern(x, w, b, r, **kw)
            r32 = ref(x, w, b, r, torch.float32, **kw)
            rlp = ref(x, w, b, r, None, **kw)
        outs, r32, rlp = [t if isinstance(t, tuple) else (t,) for t in (outs, r32, rlp)]
    else:
        outs, grads = _run(kern, x, w, b, r, dy, dh, **kw)
        # fp32 reference on fp32 leaves: its gradients are not rounded to the inputs' dtype
        up = [None if t is None else t.float() for t in (x, w, b, r)]
        r32, g32 = _run(lambda *a, **k: ref(*a, torch.float32, **k), *up, dy, dh, **kw)
        rlp, glp = _run(lambda *a, **k: ref(*a, None, **k), x, w, b, r, dy, dh, **kw)
    assert outs[0].dtype == dtype and outs[0].shape == x.shape, cfg
    helpers.assert_close(outs[0], r32[0], rlp[0], name="out", config=cfg)
    if prenorm:
        h32 = residual_in_fp32 or (r is not None and r.dtype == torch.float32)   # h has the residual's dtype
        assert outs[1].dtype == (torch.float32 if h32 else dtype), cfg
        helpers.assert_close(outs[1], r32[1], rlp[1].to(outs[1].dtype), name="h", config=cfg)
    if backward:
        for name, gk, gr, gl in zip(("dx", "dweight", "dbias", "dresidual"), grads, g32, glp):
            if gr is None:
                continue
            assert gk is not None, f"{name} missing [{cfg}]"
            helpers.assert_close(gk, gr, gl, factor=3.0, atol=1e-4, name=name, config=cfg)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
@pytest.mark.parametrize("lead,n", SHAPES, ids=[f"{l}x{n}" for l, n in SHAPES])
@pytest.mark.parametrize("is_rms", [False, True], ids=["layer_norm", "rms_norm"])
def test_norm_fwd_bwd(backend, is_rms, lead, n, dtype):
    _check(backend, is_rms, lead, n, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=IDS.get)
@pytest.mark.parametrize("n", [239, 1031, pytest.param(20011, marks=pytest.mark.slow)])
@pytest.mark.parametrize("is_rms", [False, True], ids=["layer_norm", "rms_norm"])
@pytest.mark.parametrize("mode", MODES)
def test_norm_fused_residual_and_params(backend, mode, is_rms, n, dtype):
    _fused(backend, mode, is_rms, n, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("is_rms", [False, True], ids=["layer_norm", "rms_norm"])
@pytest.mark.parametrize("mode", MODES)
def test_norm_fused_residual_and_params_looped(backend, mode, is_rms):
    """The looped kernels (hidden beyond what a block keeps in registers), bf16 only (fp16: -m slow)."""
    _fused(backend, mode, is_rms, 20011, torch.bfloat16)


def _fused(backend, mode, is_rms, n, dtype):
    kw = dict(residual=mode != "no_params" and mode != "fp32_params", prenorm=mode.startswith("prenorm"),
              residual_in_fp32=mode in ("prenorm_fp32", "fp32_residual_in"),
              residual_fp32=mode == "fp32_residual_in")
    if mode == "fp32_params":
        kw["param_dtype"] = torch.float32
    if mode == "no_params":
        kw.update(weight=False, bias=False)
    _check(backend, is_rms, (3,), n, dtype, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_norm_mixed_param_dtypes_and_strided_rows(backend):
    """bf16 weight with fp16 x (converted to fp32 inside); rows with a stride that breaks 16-byte alignment."""
    helpers.require_backend(backend)
    _check(backend, False, (2,), 239, torch.float16, param_dtype=torch.bfloat16)
    base = helpers.randn(5, 1030, dtype=torch.float16)
    x = base[:, 3:1027]                                          # row stride 1030: unaligned rows
    w = helpers.randn(1024, dtype=torch.float16)
    out = transformer.layer_norm(x, w, None, backend=backend)
    helpers.assert_close(out, reference.layer_norm(x, w, None), reference.layer_norm(x, w, None, compute_dtype=None))


@pytest.mark.parametrize("backend", BACKENDS)
def test_norm_dweight_is_deterministic(backend):
    helpers.require_backend(backend)
    x, w, b, r = _inputs((37,), 1023, torch.bfloat16)
    dy = helpers.randn(37, 1023, dtype=torch.bfloat16)
    grads = []
    for _ in range(2):
        xx, ww, bb = _grad_leaves(x, w, b)
        transformer.layer_norm(xx, ww, bb, backend=backend).backward(dy)
        grads.append((ww.grad, bb.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_norm_empty_batch_and_compile(backend):
    helpers.require_backend(backend)
    x = helpers.randn(0, 64, requires_grad=True)
    w = helpers.randn(64, requires_grad=True)
    out = transformer.rms_norm(x, w, backend=backend)
    out.sum().backward()
    assert out.shape == (0, 64) and torch.equal(w.grad, torch.zeros_like(w))
    x = helpers.randn(4, 96, dtype=torch.float16)
    w = helpers.randn(96, dtype=torch.float16)
    fn = torch.compile(lambda x, w: transformer.layer_norm(x, w, None, backend=backend) * 2, backend="aot_eager",
                       fullgraph=True)
    helpers.assert_close(fn(x, w), 2 * reference.layer_norm(x, w, None),
                         2 * reference.layer_norm(x, w, None, compute_dtype=None))


@pytest.mark.parametrize("backend", BACKENDS)
def test_norm_ops_pass_opcheck(backend):
    helpers.require_backend(backend)
    from transformer import _cuda
    x, w, b, r = _inputs((3,), 77, torch.float16, residual=True)
    op = _cuda.ops(x.device).norm_fwd.default
    torch.library.opcheck(op, (x, w, b, r, 1e-5, False, True, True),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
@pytest.mark.parametrize("lead,n", SLOW_SHAPES, ids=[f"{l}x{n}" for l, n in SLOW_SHAPES])
@pytest.mark.parametrize("is_rms", [False, True], ids=["layer_norm", "rms_norm"])
def test_norm_fwd_bwd_large(backend, is_rms, lead, n, dtype):
    _check(backend, is_rms, lead, n, dtype, residual=True, prenorm=True)
