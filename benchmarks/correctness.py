"""Pass/fail table: every backend once on small inputs against transformer.reference.

    python -m benchmarks.correctness [--jsonl PATH] [--deadline EPOCH] [--backends triton,cuda]

Without a GPU this runs the kernel backends on CPU tensors, so it must be started with TRITON_INTERPRET=1
and TILEFORMER_EMULATE_CUDA=1 already in the environment (benchmarks.run does so in a subprocess): the
interpreter is chosen when triton is imported. Outputs are NaN-poisoned (TILEFORMER_POISON=1) so an
element a kernel forgets to write fails.

Rule: transformer.testing.assert_close, the one implementation of flash-attn's rule (the test suite uses it
too): max|out - ref_fp32| <= factor * max|ref_same_dtype - ref_fp32| + atol, factor 2 for outputs, 3 for
gradients; ref_same_dtype is transformer.reference computed in the inputs' own dtype (compute_dtype=None).
Odd sizes on purpose (113, 239, head dims 40 and 80, hidden 1000, page 16, uneven cache lengths).
The table goes to stdout, a progress bar with the time left to stderr (benchmarks/progress.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import torch

from transformer.testing import assert_close

from . import progress

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
OUTPUT_FACTOR, GRAD_FACTOR = 2.0, 3.0


@dataclasses.dataclass(frozen=True)
class Check:
    op: str
    mode: str                 # "fwd" (outputs) or "bwd" (gradients of a forward + backward)
    params: tuple
    dtypes: tuple = ("fp16", "bf16")

    @property
    def p(self):
        return dict(self.params)

    @property
    def shape(self):
        return " ".join(f"{k}={v}" for k, v in self.params)


_ATT1 = (("B", 2), ("Nq", 113), ("Nk", 113), ("Hq", 4), ("Hkv", 4), ("D", 64), ("causal", 0))
_ATT2 = (("B", 1), ("Nq", 113), ("Nk", 239), ("Hq", 8), ("Hkv", 2), ("D", 80), ("causal", 1))
_ATT3 = (("B", 2), ("Nq", 1), ("Nk", 239), ("Hq", 4), ("Hkv", 1), ("D", 40), ("causal", 1))
_NORM = (("M", 67), ("N", 1000))
CHECKS = (
    Check("layer_norm", "fwd", _NORM, ("fp32", "fp16", "bf16")),
    Check("rms_norm", "fwd", _NORM, ("fp32", "fp16", "bf16")),
    Check("layer_norm", "bwd", _NORM, ("fp32", "fp16", "bf16")),
    Check("rms_norm", "bwd", _NORM, ("fp32", "fp16", "bf16")),
    Check("decode_attention", "fwd", (("B", 3), ("Hq", 8), ("Hkv", 2), ("D", 64), ("lens", "1,113,203"),
                                      ("page", 0)), ("fp16",)),
    Check("decode_attention", "fwd", (("B", 3), ("Hq", 8), ("Hkv", 2), ("D", 64), ("lens", "1,113,203"),
                                      ("page", 16)), ("bf16",)),
    Check("decode_attention", "fwd", (("B", 3), ("Hq", 8), ("Hkv", 1), ("D", 64), ("lens", "1,113,203"),
                                      ("page", 16), ("kv", "int8")), ("fp16",)),
    Check("flash_attention", "fwd", _ATT1, ("fp16",)),
    Check("flash_attention", "fwd", _ATT2, ("bf16",)),
    Check("flash_attention", "fwd", _ATT3, ("bf16",)),
    Check("flash_attention", "bwd", _ATT1, ("bf16",)),
    Check("flash_attention", "bwd", _ATT2, ("fp16",)),
)
# Attention and decode run each configuration in one half dtype (both dtypes are covered across them): the
# interpreter takes 5-30 s per attention check on this machine, and make bench must end within 10 minutes.
# The test suite (tests/) crosses every configuration with every dtype.


# ---------------------------------------------------------------------------------------------
# Inputs and the three computations (backend, fp32 reference, same-dtype reference)
# ---------------------------------------------------------------------------------------------

def _inputs(check: Check, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    p = check.p
    if check.op == "flash_attention":
        return dict(q=rnd(p["B"], p["Nq"], p["Hq"], p["D"]), k=rnd(p["B"], p["Nk"], p["Hkv"], p["D"]),
                    v=rnd(p["B"], p["Nk"], p["Hkv"], p["D"]))
    if check.op == "decode_attention":
        lens = [int(x) for x in p["lens"].split(",")]
        b, hkv, d, page = p["B"], p["Hkv"], p["D"], p["page"]
        cap = max(lens) + 5
        inp = dict(q=rnd(b, 1, p["Hq"], d), cache_seqlens=torch.tensor(lens, dtype=torch.int32, device=device))
        if page:
            per_seq = -(-cap // page)
            perm = torch.randperm(b * per_seq + 3, generator=g)[: b * per_seq]   # scattered, some pages unused
            inp["block_table"] = perm.view(b, per_seq).to(device=device, dtype=torch.int32)
            shape = (b * per_seq + 3, page, hkv, d)
        else:
            inp["block_table"] = None
            shape = (b, cap, hkv, d)
        inp["k_cache"], inp["v_cache"] = rnd(*shape), rnd(*shape)
        inp["scales"] = {}
        if p.get("kv"):   # a quantized cache: 8-bit values + per-(token, head) scales, dequantized by every side
            from transformer import reference
            (inp["k_cache"], ks), (inp["v_cache"], vs) = (reference.quantize_kv(inp[n], p["kv"])
                                                          for n in ("k_cache", "v_cache"))
            inp["scales"] = dict(k_scale=ks, v_scale=vs)
        return inp
    n = p["N"]
    inp = dict(x=rnd(p["M"], n), weight=(1 + rnd(n, scale=0.1).float()).to(dtype))
    if check.op == "layer_norm":
        inp["bias"] = rnd(n, scale=0.1)
    return inp


def _leaves(check):
    names = {"flash_attention": ("q", "k", "v"), "layer_norm": ("x", "weight", "bias"), "rms_norm": ("x", "weight")}
    return names.get(check.op, ()) if check.mode == "bwd" else ()


def _public_args(check, inp):
    """(args, kwargs) of the public call without `backend`."""
    p = check.p
    if check.op == "flash_attention":
        return (inp["q"], inp["k"], inp["v"]), dict(causal=bool(p["causal"]))
    if check.op == "decode_attention":
        return ((inp["q"], inp["k_cache"], inp["v_cache"], inp["cache_seqlens"]),
                dict(block_table=inp["block_table"], **inp["scales"]))
    if check.op == "layer_norm":
        return (inp["x"], inp["weight"], inp["bias"], 1e-5), {}
    return (inp["x"], inp["weight"], 1e-6), {}


def _run_public(check, inp, backend):
    import transformer
    p = check.p
    if check.op == "flash_attention":
        return transformer.flash_attention(inp["q"], inp["k"], inp["v"], causal=bool(p["causal"]), backend=backend)
    if check.op == "decode_attention":
        return transformer.decode_attention(inp["q"], inp["k_cache"], inp["v_cache"], inp["cache_seqlens"],
                                            block_table=inp["block_table"], backend=backend, **inp["scales"])
    if check.op == "layer_norm":
        return transformer.layer_norm(inp["x"], inp["weight"], inp["bias"], 1e-5, backend=backend)
    return transformer.rms_norm(inp["x"], inp["weight"], 1e-6, backend=backend)


def _run_reference(check, inp, compute_dtype):
    from transformer import reference
    p = check.p
    kw = dict(compute_dtype=compute_dtype)
    if check.op == "flash_attention":
        return reference.attention(inp["q"], inp["k"], inp["v"], causal=bool(p["causal"]), **kw)
    if check.op == "decode_attention":
        return reference.decode_attention(inp["q"], inp["k_cache"], inp["v_cache"], inp["cache_seqlens"],
                                          block_table=inp["block_table"], **inp["scales"], **kw)
    if check.op == "layer_norm":
        return reference.layer_norm(inp["x"], inp["weight"], inp["bias"], 1e-5, **kw)
    return reference.rms_norm(inp["x"], inp["weight"], 1e-6, **kw)


def _with_leaves(check, inp, dtype=None):
    """A copy of inp (cast to dtype when given) whose gradient leaves are fresh tensors requiring grad."""
    out = {}
    for n, t in inp.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and dtype is not None:
            t = t.to(dtype)
        out[n] = t
    for n in _leaves(check):
        out[n] = out[n].detach().clone().requires_grad_(True)
    return out


def _compute(run, check, inp, dout):
    """(output, {leaf: grad} or None)."""
    out = run(inp)
    if not _leaves(check):
        return out.detach(), None
    names = _leaves(check)
    grads = torch.autograd.grad(out, [inp[n] for n in names], dout.to(out.dtype))
    return out.detach(), dict(zip(names, grads))


def run_check(check: Check, dtype_name: str, backend: str, device, seed=0):
    """dict(status "PASS" | "FAIL" | "N/A" | "ERROR", max_err, bound, detail, seconds) for one backend."""
    from benchmarks.providers import EXPLAIN_RAISED, backend_reason
    dtype = DTYPES[dtype_name]
    base = _inputs(check, dtype, device, seed)
    mine = _with_leaves(check, base)
    args, kwargs = _public_args(check, mine)
    reason = backend_reason(check.op, backend, args, kwargs)
    if reason:   # N/A: the dispatcher declines the call; ERROR: asking it raised
        return dict(status="ERROR" if reason.startswith(EXPLAIN_RAISED) else "N/A", detail=reason)
    t0 = time.time()
    try:
        out, grads = _compute(lambda i: _run_public(check, i, backend), check, mine,
                              _dout(check, base, device, seed))
    except Exception as e:
        first_line = (str(e).strip().splitlines() or [""])[0][:240]
        return dict(status="ERROR", detail=f"{type(e).__name__}: {first_line}", seconds=time.time() - t0)
    seconds = time.time() - t0
    dout = _dout(check, base, device, seed)      # drawn in the inputs' dtype; exact in fp32 for the reference
    # The reference: fp32 inputs computed in fp32 for half inputs, in fp64 for fp32 inputs (more precise).
    high = torch.float64 if dtype == torch.float32 else torch.float32
    ref, ref_grads = _compute(lambda i: _run_reference(check, i, high), check,
                              _with_leaves(check, base, torch.float32), dout)
    low, low_grads = _compute(lambda i: _run_reference(check, i, None), check, _with_leaves(check, base), dout)
    worst = None
    try:
        pairs = [("out", out, ref, low, OUTPUT_FACTOR)]
        pairs += [(f"d{n}", grads[n], ref_grads[n], low_grads[n], GRAD_FACTOR) for n in (grads or {})]
        for name, o, r, l, factor in pairs:
            e, b = assert_close(o, r, l, factor=factor, name=name, config=check.shape)
            if worst is None or e / max(b, 1e-30) > worst[0] / max(worst[1], 1e-30):
                worst = (e, b, name)
    except AssertionError as err:
        return dict(status="FAIL", detail=str(err).splitlines()[0][:300], seconds=seconds)
    return dict(status="PASS", max_err=worst[0], bound=worst[1], seconds=seconds,
                detail="checked " + ", ".join(p[0] for p in pairs) + f"; worst {worst[2]}")


def _dout(check, base, device, seed):
    """The random output gradient in the inputs' dtype, the same values for the backend and both references."""
    if not _leaves(check):
        return None
    p = check.p
    shape = (p["B"], p["Nq"], p["Hq"], p["D"]) if check.op == "flash_attention" else (p["M"], p["N"])
    dtype = base["q" if check.op == "flash_attention" else "x"].dtype
    return torch.randn(shape, generator=torch.Generator(device="cpu").manual_seed(seed + 1)).to(device, dtype)


# ---------------------------------------------------------------------------------------------
# Table
# ---------------------------------------------------------------------------------------------

HEADER = (f"  {'op':<17} {'mode':<4} {'dtype':<5} {'backend':<9} {'result':<6} {'max err':>9} {'bound':>9} "
          f"{'sec':>6}  shape / detail")


def format_row(r):
    if r["status"] in ("PASS",):
        nums = f"{r['max_err']:9.2e} {r['bound']:9.2e} {r['seconds']:6.1f}"
    elif "seconds" in r:
        nums = f"{'':9} {'':9} {r['seconds']:6.1f}"
    else:
        nums = f"{'':9} {'':9} {'':6}"
    detail = r["shape"] + ("" if r["status"] == "PASS" else f"  -- {r['detail']}")
    return f"  {r['op']:<17} {r['mode']:<4} {r['dtype']:<5} {r['backend']:<9} {r['status']:<6} {nums}  {detail}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", default="torch,triton,cuda", help="comma-separated backends to check")
    ap.add_argument("--ops", default="", help="comma-separated ops (default: all)")
    ap.add_argument("--jsonl", help="append one JSON object per result to this file")
    ap.add_argument("--deadline", type=float, default=0.0, help="time.time() after which checks are not started")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backends = [b for b in args.backends.split(",") if b]
    ops = set(filter(None, args.ops.split(",")))
    print(f"device {device}; TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')} "
          f"TILEFORMER_EMULATE_CUDA={os.environ.get('TILEFORMER_EMULATE_CUDA', '0')} "
          f"TILEFORMER_POISON={os.environ.get('TILEFORMER_POISON', '0')}")
    print(HEADER, flush=True)
    sink = open(args.jsonl, "a") if args.jsonl else None
    jobs = [(check, dt, backend) for check in CHECKS if not ops or check.op in ops
            for dt in check.dtypes for backend in backends]
    counts = {}
    with progress.bar(total=len(jobs), desc="correctness", unit="check") as bar:
        for check, dt, backend in jobs:
            row = dict(op=check.op, mode=check.mode, shape=check.shape, dtype=dt, backend=backend)
            if args.deadline and time.time() > args.deadline:
                row.update(status="SKIP", detail="not run: time budget exhausted")
            else:
                bar.set_postfix_str(f"{backend} {check.op} {check.mode} {dt}")
                try:
                    row.update(run_check(check, dt, backend, device))
                except Exception as e:  # a broken harness piece: report it, go on
                    row.update(status="ERROR", detail=f"{type(e).__name__}: {str(e)[:240]}")
            counts[row["status"]] = counts.get(row["status"], 0) + 1
            progress.write(format_row(row))
            if sink:
                sink.write(json.dumps(row) + "\n")
                sink.flush()
            bar.update()
    print("  totals: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())), flush=True)
    return 1 if counts.get("FAIL") or counts.get("ERROR") else 0


if __name__ == "__main__":
    sys.exit(main())
