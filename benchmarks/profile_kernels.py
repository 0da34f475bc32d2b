"""Per-kernel GPU time of the attention forward + backward, for tuning (a GPU is needed).

    python -m benchmarks.profile_kernels [--out DIR] [--providers triton,cuda,cuda-fwd-w4] [--n 8192] [--d 128]

The timing sweep (benchmarks.run) says how fast an op is; this says where its time goes. For each provider
and causal off/on it runs fwd+bwd of one case (bf16, B*N = 16k tokens, H*D = 2048, the FA2/FA3 papers' shape)
a few times under torch.profiler and prints every GPU kernel's time per call, with the TFLOP/s of the
matrix work that kernel does: attention forward 4*B*H*N^2*D (halved when causal); our backward kernels:
dK/dV 4 products (S^T, dP^T, dV, dK: 2x the forward's), dQ 3 (S, dP, dQ: 1.5x), the preprocess none. Kernels
are matched by name (attn_fwd, dkdv, dq); any other kernel is listed with its time only. Writes
kernels.txt under --out.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from . import cases, providers

# (name fragment, multiple of the forward's FLOPs) -- first match wins
KERNEL_FLOPS = (("dkdv", 2.0), ("attn_bwd_dq", 1.5), ("attn_fwd", 1.0))   # Triton _attn_*, CUDA attn_*_kernel


def kernel_flop_multiple(name: str):
    low = name.lower()
    if "preprocess" in low or "zero_tail" in low:
        return None
    for frag, mult in KERNEL_FLOPS:
        if frag in low:
            return mult
    return None


def profile_case(prov, case, reps=5, device="cuda"):
    """[(kernel name, ms per call, calls per step)] of fwd+bwd of `case` on provider `prov`, or the reason it
    cannot run. On device "cpu" (a smoke test of this code) the CPU ops are listed instead of kernels."""
    inp = cases.make_inputs(case, device, requires_grad=True)
    reason = prov.unavailable(case, inp, device)
    if reason:
        return reason
    fn = prov.build(case, inp)
    dout = torch.randn_like(fn())

    def step():
        torch.autograd.grad(fn(), inp["grad_inputs"], dout)
    for _ in range(2):   # compile, autotune, warm up
        step()
    from torch.profiler import ProfilerActivity, profile
    gpu = torch.device(device).type == "cuda"
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    sync()
    with profile(activities=[ProfilerActivity.CUDA if gpu else ProfilerActivity.CPU]) as prof:
        for _ in range(reps):
            step()
        sync()
    rows = []
    for ev in prof.key_averages():
        if gpu:
            dev_us = getattr(ev, "device_time_total", None)
            if dev_us is None:
                dev_us = getattr(ev, "cuda_time_total", 0.0)
        else:
            dev_us = ev.self_cpu_time_total
        if dev_us <= 0 or ev.key.startswith("ProfilerStep"):
            continue
        rows.append((ev.key, dev_us / 1e3 / reps, ev.count / reps))
    return sorted(rows, key=lambda r: -r[1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="")
    ap.add_argument("--providers", default="triton,cuda,cuda-fwd-w4")
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--d", type=int, default=128)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_kernels: no CUDA GPU; nothing to profile")
        return 0
    provs = providers.providers(args.providers.split(","), peers=True)
    lines = [f"per-kernel GPU time, fwd+bwd, bf16, N={args.n}, D={args.d}, on {torch.cuda.get_device_name()}"]
    for causal in (False, True):
        h = 2048 // args.d
        case = cases.attention_case("fwd+bwd", max(1, 16384 // args.n), args.n, args.n, h, h, args.d, causal)
        fwd_flops = 4.0 * case.p["B"] * h * args.n * args.n * args.d / (2 if causal else 1)
        for prov in provs:
            lines.append(f"\n{prov.name}  {case.shape}")
            try:
                rows = profile_case(prov, case)
            except Exception as e:  # a broken provider must not lose the others' numbers
                rows = f"error: {type(e).__name__}: {str(e)[:300]}"
            if isinstance(rows, str):
                lines.append(f"  not run: {rows}")
                continue
            total = sum(ms for _, ms, _ in rows)
            lines.append(f"  {'kernel':<70} {'ms/step':>9} {'calls':>6} {'TFLOP/s':>8}")
            for name, ms, calls in rows:
                mult = kernel_flop_multiple(name)
                tf = f"{mult * fwd_flops / (ms * 1e-3) / 1e12:8.1f}" if mult else "       -"
                lines.append(f"  {name[:70]:<70} {ms:9.3f} {calls:6.1f} {tf}")
            lines.append(f"  {'total':<70} {total:9.3f}        {3.5 * fwd_flops / (total * 1e-3) / 1e12:8.1f}"
                         "  (fwd+bwd, 3.5x forward FLOPs)")
            torch.cuda.empty_cache()
    text = "\n".join(lines)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "kernels.txt"), "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
