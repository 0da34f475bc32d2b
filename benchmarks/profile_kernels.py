"""Per-kernel GPU time of the attention forward + backward, for tuning (a GPU is needed).

    python -m benchmarks.profile_kernels [--out DIR] [--providers triton,cuda,sdpa-flash] [--n 8192] [--d 64,128]
                                         [--causal 0,1] [--deadline EPOCH] [--append] [--dry]

The timing sweep (benchmarks.run) says how fast an op is; this says where its time goes. For each head dim,
causal off/on and provider it runs fwd+bwd of one case (bf16, B*N = 16k tokens, H*D = 2048, the FA2/FA3
papers' shape) a few times under torch.profiler and prints every GPU kernel's time per call, with the TFLOP/s
of the matrix work that kernel does (``kernel_flop_multiple``, in units of the forward's 4*B*H*N^2*D, halved
when causal): a forward kernel 1; our dK/dV kernel 2 (S^T, dP^T, dV, dK), or 2.5 when it also accumulates dQ
(no separate dQ kernel ran in the step); our dQ kernel 1.5 (S, dP, dQ); a peer's fused backward (flash-attn,
SDPA flash, cuDNN, FA3) 2.5; preprocess / convert / zero-fill kernels none. Each kernel's rate is also given
in percent of the data-sheet peak and of the measured bf16 matmul rate (ceilings.csv, benchmarks/ceilings.py),
when known. A provider serving the forward only (flashinfer) is profiled forward only.

Providers (default: every attention provider there is): our backends triton and cuda and their variants
(benchmarks/providers.py), the peers sdpa-flash and sdpa-cudnn (torch SDPA pinned to one backend),
flash-attn, flash-attn3, flash-attn4, flashinfer; one that cannot run says why. Writes kernels.txt and
kernels.csv under --out after every case (a run stopped at its time limit keeps what it measured); --append
continues them. --deadline: no case starts after that time.time(). --dry: the same code on the CPU at a tiny
size (the CPU ops are listed), to check this script without a GPU.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time

import torch

from . import cases, formulas, harness, providers

# (name fragments, multiple of the forward's FLOPs); lower-case substrings, first match wins.
NO_MATMUL = ("preprocess", "zero_tail", "convert", "dot_do_o", "clear", "postprocess", "sum_odo", "fill")
KERNEL_FLOPS = (
    (("dkdv",), 2.0),                                                  # ours (Triton _attn_bwd_dkdv, CUDA)
    (("attn_bwd_dq",), 1.5),                                           # ours: dQ kernel
    (("flash_bwd", "bprop", "flashattnbwd", "attentionbackward"), 2.5),  # peers' fused backward
    (("attn_fwd", "flash_fwd", "fprop", "flashattnfwd", "attentionforward"), 1.0),
)
CSV_COLUMNS = ("provider", "shape", "mode", "kernel", "ms_per_step", "calls_per_step", "flop_multiple", "tflops",
               "pct_of_datasheet", "pct_of_measured")
ATTENTION_PROVIDERS = ("triton", "cuda", "sdpa-flash", "sdpa-cudnn", "flash-attn", "flash-attn3", "flash-attn4",
                       "flashinfer")


def kernel_flop_multiple(name: str, fused_dq: bool = False):
    """Matrix work of a kernel in units of the attention forward's FLOPs (module docstring); None for a
    kernel without matrix work or one not recognised. fused_dq: the step ran no separate dQ kernel, so our
    dK/dV kernel also computed dQ (2.5)."""
    low = name.lower()
    if any(f in low for f in NO_MATMUL):
        return None
    for frags, mult in KERNEL_FLOPS:
        if any(f in low for f in frags):
            return 2.5 if mult == 2.0 and fused_dq else mult
    return None


def attention_providers(names=None):
    """Every provider that can serve flash_attention (our backends but the fp32 reference and torch's
    default dispatch, our variants, the attention peers), or those named; ours first, then the peers, then
    our variants."""
    if names:
        chosen = providers.providers(names, peers=True)
    else:
        keep = set(ATTENTION_PROVIDERS)
        chosen = [p for p in providers.providers(None, peers=True) if p.name in keep
                  or (isinstance(p, providers.BackendVariant) and "flash_attention" in p.ops)]
    # our default paths, then the peers, then our variants (a deadline cuts the variants first)
    return sorted(chosen, key=lambda p: 2 if isinstance(p, providers.BackendVariant) else int(p.kind == "peer"))


def profile_case(prov, case, reps=5, device="cuda"):
    """[(kernel name, ms per call, calls per step)] of one step of `case` (its mode: fwd, or fwd+bwd) on
    provider `prov`, or the reason it cannot run. On device "cpu" (a smoke test of this code) the CPU ops are
    listed instead of kernels."""
    inp = cases.make_inputs(case, device, requires_grad=case.mode != "fwd")
    reason = prov.unavailable(case, inp, device)
    if reason:
        return reason
    fn = prov.build(case, inp)
    wrap = getattr(prov, "wrap", lambda f: f)          # a variant's knob set for the backward too
    try:
        if case.mode == "fwd":
            def step():
                with torch.no_grad():
                    fn()
        else:
            dout = torch.randn_like(fn())

            def step():
                torch.autograd.grad(fn(), inp["grad_inputs"], dout)
        step = wrap(step)
        for _ in range(2):   # compile, autotune, warm up
            step()
    except providers.Unavailable as e:
        return str(e)
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


def kernel_rows(rows, fwd_flops, mode, peak, measured):
    """[(name, ms, calls, multiple, TFLOP/s, % of data sheet, % of measured)] of one profiled step."""
    fused_dq = mode != "fwd" and not any(
        kernel_flop_multiple(n) == 1.5 for n, _, _ in rows)
    out = []
    for name, ms, calls in rows:
        mult = kernel_flop_multiple(name, fused_dq)
        tf = mult * fwd_flops / (ms * 1e-3) / 1e12 if mult and ms > 0 else None
        out.append((name, ms, calls, mult, tf,
                    formulas.pct_of_peak(tf, peak.tflops_16) if tf and peak else None,
                    formulas.pct_of_peak(tf, measured.tflops_16) if tf and measured else None))
    return out


def _pct(x):
    return f"{x:6.0f}%" if x is not None else "      -"


def format_rows(krows, total_ms, step_flops, peak, measured, width=70, label="the step"):
    lines = [f"  {'kernel':<{width}} {'ms/step':>9} {'calls':>6} {'xfwd':>5} {'TFLOP/s':>8} {'%sheet':>7} {'%meas':>7}"]
    for name, ms, calls, mult, tf, p_sheet, p_meas in krows:
        lines.append(f"  {name[:width]:<{width}} {ms:9.3f} {calls:6.1f} {mult if mult else '-':>5} "
                     f"{f'{tf:8.1f}' if tf else '       -'} {_pct(p_sheet)} {_pct(p_meas)}")
    tf = step_flops / (total_ms * 1e-3) / 1e12 if total_ms > 0 else 0.0
    lines.append(f"  {'total (' + label + ')':<{width}} "
                 f"{total_ms:9.3f}        {'':>5} {tf:8.1f} "
                 f"{_pct(formulas.pct_of_peak(tf, peak.tflops_16) if peak else None)} "
                 f"{_pct(formulas.pct_of_peak(tf, measured.tflops_16) if measured else None)}")
    return lines


def _ints(text):
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="")
    ap.add_argument("--providers", default="", help="comma-separated (default: every attention provider)")
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--d", default="64,128", help="head dims, comma-separated")
    ap.add_argument("--causal", default="0,1")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--deadline", type=float, default=0.0, help="time.time() after which no case starts")
    ap.add_argument("--append", action="store_true", help="continue kernels.txt / kernels.csv under --out")
    ap.add_argument("--ceilings", default="", help="ceilings.csv (default: OUT/ceilings.csv when it exists)")
    ap.add_argument("--dry", action="store_true", help="the same code on the CPU at a tiny size (a GPU is not used)")
    args = ap.parse_args(argv)
    gpu = None if args.dry else harness.gpu_name()
    if not gpu and not args.dry:
        print("profile_kernels: no CUDA GPU; nothing to profile (--dry runs this code on the CPU)")
        return 0
    device = "cuda" if gpu else "cpu"
    n, dims, dtype = (args.n, _ints(args.d), "bf16") if gpu else (64, [32], "fp32")
    names = [x for x in args.providers.split(",") if x] or None
    provs = attention_providers(names)
    if not gpu and not names:
        provs = [p for p in provs if p.kind == "peer"][:2] + providers.providers(["torch"], peers=False)
    peak = formulas.lookup_peak(gpu) if gpu else None
    ceil_path = args.ceilings or (os.path.join(args.out, formulas.CEILINGS_FILE) if args.out else "")
    measured = formulas.measured_peak(formulas.read_ceilings(ceil_path), gpu) if ceil_path and gpu else None
    txt = os.path.join(args.out, "kernels.txt") if args.out else None
    csv_path = os.path.join(args.out, "kernels.csv") if args.out else None
    lines, rows = [], []
    if args.append and txt and os.path.exists(txt):
        with open(txt) as f:
            lines = f.read().rstrip("\n").splitlines()
        if os.path.exists(csv_path):
            with open(csv_path, newline="") as f:
                rows = list(csv.DictReader(f))

    def emit(*new):
        for line in new:
            print(line, flush=True)
            lines.append(line)

    def save():
        if not args.out:
            return
        os.makedirs(args.out, exist_ok=True)
        with open(txt, "w") as f:
            f.write("\n".join(lines) + "\n")
        with open(csv_path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
            w.writeheader()
            w.writerows(rows)

    emit(f"per-kernel {'GPU' if gpu else 'CPU (dry run)'} time, {dtype}, N={n}, D={','.join(map(str, dims))}, on "
         f"{gpu or 'cpu'}; providers {', '.join(p.name for p in provs)}",
         "  peaks: " + (f"data sheet {peak.tflops_16:g} TFLOP/s ({peak.name})" if peak else "no data-sheet peak")
         + (f", measured bf16 matmul {measured.tflops_16:.4g} TFLOP/s" if measured else ", no measured ceilings"))
    not_run = []
    for d in dims:
        h = max(1, 2048 // d) if gpu else 2
        for causal in (bool(c) for c in _ints(args.causal)):
            for prov in provs:
                mode = "fwd+bwd"
                if getattr(prov, "modes", None) and "fwd+bwd" not in prov.modes:
                    mode = "fwd"                         # a forward-only peer (flashinfer)
                case = cases.attention_case(mode, max(1, 16384 // n) if gpu else 1, n, n, h, h, d, causal, dtype)
                if args.deadline and time.time() > args.deadline:
                    not_run.append(f"{prov.name} {case.shape}")
                    continue
                fwd_flops = formulas.attention_flops(case.p["B"], h, n, n, d, causal)
                emit("", f"{prov.name}  {mode}  {case.shape}")
                try:
                    got = profile_case(prov, case, reps=args.reps, device=device)
                except Exception as e:  # a broken provider must not lose the others' numbers
                    got = f"error: {type(e).__name__}: {str(e)[:300]}"
                if isinstance(got, str):
                    emit(f"  not run: {got}")
                else:
                    krows = kernel_rows(got, fwd_flops, mode, peak, measured)
                    total = sum(ms for _, ms, _ in got)
                    emit(*format_rows(krows, total, (3.5 if mode != "fwd" else 1.0) * fwd_flops, peak, measured,
                                      label="fwd+bwd: 3.5x the forward's FLOPs" if mode != "fwd" else "fwd"))
                    for name, ms, calls, mult, tf, p_sheet, p_meas in krows:
                        rows.append(dict(provider=prov.name, shape=case.shape, mode=mode, kernel=name,
                                         ms_per_step=f"{ms:.6g}", calls_per_step=f"{calls:.3g}",
                                         flop_multiple="" if mult is None else mult,
                                         tflops="" if tf is None else f"{tf:.4g}",
                                         pct_of_datasheet="" if p_sheet is None else f"{p_sheet:.3g}",
                                         pct_of_measured="" if p_meas is None else f"{p_meas:.3g}"))
                save()
                if gpu:
                    torch.cuda.empty_cache()
    if not_run:
        emit("", f"not profiled within the time limit ({len(not_run)}): " + "; ".join(not_run))
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
