"""The machine's own ceilings: a large library matmul (TFLOP/s) and a device-to-device copy (GB/s).

    python -m benchmarks.ceilings --out DIR        # GPU: measure, print, write DIR/ceilings.csv
    python -m benchmarks.ceilings --dry --out DIR  # no GPU: the same code path on the CPU at small sizes

What is timed (``triton.testing.do_bench`` on a GPU: CUDA events, L2 cleared before every repetition; the
median over ~``rep_ms`` of repetitions after ~25 ms of warm-up):

    matmul_bf16   torch.matmul of two random N x N bf16 matrices (N = 8192): 2 N^3 FLOPs per call
    matmul_fp32   the same in fp32 with TF32 off (the non-tensor fp32 rate): 2 N^3 FLOPs
    copy          dst.copy_(src) of a 2 GiB tensor: bytes read + bytes written = 4 GiB per call

Inputs are random (never zeros: a matmul of zeros runs faster than one of data). The rows carry the
data-sheet number next to the measured one (benchmarks/formulas.py PEAKS); benchmarks.run and
benchmarks.profile_kernels turn them into a second roofline (formulas.measured_peak).
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch

from . import formulas, harness

MATMUL_N = 8192
COPY_BYTES = 2 << 30
DRY_MATMUL_N = 256
DRY_COPY_BYTES = 16 << 20


def _time_ms(fn, device, rep_ms):
    if torch.device(device).type == "cuda":
        return harness.time_gpu(fn, warmup_ms=25.0, rep_ms=rep_ms).median
    return harness.time_cpu(fn, budget_s=rep_ms / 1e3, min_reps=3).median


def _matmul_ms(n, dt, device, gen, rep_ms):
    a = torch.randn(n, n, device=device, dtype=dt, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dt, generator=gen)
    c = torch.empty(n, n, device=device, dtype=dt)
    return _time_ms(lambda: torch.matmul(a, b, out=c), device, rep_ms)


def _copy_ms(elems, device, gen, rep_ms):
    src = torch.randn(elems, device=device, dtype=torch.bfloat16, generator=gen)
    dst = torch.empty_like(src)
    return _time_ms(lambda: dst.copy_(src), device, rep_ms)


def measure(device="cuda", *, matmul_n=MATMUL_N, copy_bytes=COPY_BYTES, rep_ms=100.0, fp32=True):
    """[(metric, unit, value, how)] measured on `device` (see the module docstring)."""
    out = []
    gen = torch.Generator(device=device).manual_seed(0)
    n = matmul_n
    dtypes = [("matmul_bf16", torch.bfloat16)] + ([("matmul_fp32", torch.float32)] if fp32 else [])
    tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        for metric, dt in dtypes:
            ms = _matmul_ms(n, dt, device, gen, rep_ms)
            out.append((metric, "TFLOP/s", formulas.tflops(2.0 * n ** 3, ms),
                        f"torch.matmul {n}x{n}x{n} {str(dt)[6:]} random, median {ms:.4g} ms"))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    elems = copy_bytes // 2
    ms = _copy_ms(elems, device, gen, rep_ms)
    out.append(("copy", "GB/s", formulas.gbps(2.0 * elems * 2, ms),
                f"dst.copy_(src) of {elems * 2 / 2**30:.3g} GiB (read + write counted), median {ms:.4g} ms"))
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return out


def rows_for(gpu_name, measured):
    """ceilings.csv rows (formulas.CEILING_COLUMNS) with the data-sheet numbers of `gpu_name` next to them."""
    sheet = formulas.lookup_peak(gpu_name, env={})
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    rows = []
    for metric, unit, value, how in measured:
        field = formulas.CEILING_METRICS[metric][1]
        rows.append(dict(gpu=gpu_name, metric=metric, unit=unit, value=float(value),
                         datasheet=float(getattr(sheet, field)) if sheet else None, how=how, timestamp=now))
    return rows


def format_rows(rows):
    lines = [f"  {'ceiling':<12} {'measured':>10} {'data sheet':>11} {'of sheet':>9}  how"]
    for r in rows:
        pct = formulas.pct_of_peak(r["value"], r["datasheet"])
        sheet = f"{r['datasheet']:>11.4g}" if r["datasheet"] else f"{'-':>11}"
        lines.append(f"  {r['metric']:<12} {r['value']:>10.4g} {sheet} {f'{pct:.0f}%' if pct else '-':>9}  "
                     f"{r['unit']}; {r['how']}")
    return "\n".join(lines)


def load_or_measure(dest_dir, gpu_name, *, write_to=None, log=print):
    """The measured Peak of this GPU: from dest_dir/ceilings.csv when it holds this GPU's ceilings, else
    measured now (about 2 s) and written to `write_to` (a path). None when measuring fails."""
    path = os.path.join(dest_dir, formulas.CEILINGS_FILE)
    try:
        rows = formulas.read_ceilings(path)
    except ValueError as e:
        log(f"  ceilings: {e}; measuring again")
        rows = []
    peak = formulas.measured_peak(rows, gpu_name)
    if peak is not None:
        log(f"  measured ceilings ({path}): {peak.tflops_16:.4g} TFLOP/s bf16 matmul, "
            f"{peak.tflops_32:.4g} TFLOP/s fp32, {peak.gbps:.4g} GB/s copy")
        return peak
    try:
        rows = rows_for(gpu_name, measure("cuda"))
    except Exception as e:  # no ceilings is no reason to lose the run
        log(f"  ceilings: measuring failed ({type(e).__name__}: {str(e)[:200]}); no measured roofline")
        return None
    if write_to:
        formulas.write_ceilings(write_to, rows)
    log("  measured ceilings (benchmarks/ceilings.py):\n" + format_rows(rows))
    return formulas.measured_peak(rows, gpu_name)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="", help="write OUT/ceilings.csv")
    ap.add_argument("--dry", action="store_true",
                    help="run the same code on the CPU at small sizes, GPU or not (checks this script)")
    ap.add_argument("--rep-ms", type=float, default=100.0)
    args = ap.parse_args(argv)
    gpu = None if args.dry else harness.gpu_name()
    if gpu:
        rows = rows_for(gpu, measure("cuda", rep_ms=args.rep_ms))
    elif args.dry:
        rows = rows_for("cpu", measure("cpu", matmul_n=DRY_MATMUL_N, copy_bytes=DRY_COPY_BYTES,
                                       rep_ms=min(50.0, args.rep_ms)))
    else:
        print("ceilings: no CUDA GPU (use --dry to run this code on the CPU)")
        return 0
    print(f"ceilings of {gpu or 'cpu (dry run, small sizes)'}:\n" + format_rows(rows), flush=True)
    if args.out:
        formulas.write_ceilings(os.path.join(args.out, formulas.CEILINGS_FILE), rows)
        print(f"wrote {os.path.join(args.out, formulas.CEILINGS_FILE)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
