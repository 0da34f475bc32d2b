"""`make bench`: benchmarks on a GPU; CPU timings, a correctness table and the kernel report without one.

    python -m benchmarks.run                      # everything this machine can do
    python -m benchmarks.run --quick              # a short GPU sweep (3 points per curve)
    python -m benchmarks.run --sections timing --ops flash_attention --providers torch,triton
    python -m benchmarks.run --budget 540         # stop starting new work after 540 s
    python -m benchmarks.run --sweep gpu --list --sections timing   # show the full GPU sweep, time nothing
    python -m benchmarks.run --sweep cpu          # on a GPU: a smoke test at the small CPU sizes

Sections (--sections, comma-separated; default all):
  timing       every op x mode x backend (+ peers on a GPU) over the sweep of benchmarks/cases.py:
               the full sweep on a GPU (--quick: a subset), small sizes on the CPU (reference and torch
               only: interpreted/emulated kernels are not timed). A live table, then CSV + PNGs.
  correctness  every backend once on small inputs vs transformer.reference (tests/helpers.assert_close);
               without a GPU in a subprocess with TRITON_INTERPRET=1 and TILEFORMER_EMULATE_CUDA=1.
  report       the static kernel report (registers, spills, smem, occupancy, tensor-core instructions
               per Triton config and CUDA kernel for sm_80/sm_90), no GPU needed.
Output under benchmarks/results/<gpu or "cpu">/ (or --out): bench.csv, <op>_<dtype>.png,
correctness.csv, kernel_report.txt/.json, run.log (this terminal output).
Exit status 1 when a kernel backend (triton, cuda) fails or errors in the correctness table.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import threading
import time

import torch

from . import bench, cases, formulas, harness, plots, providers

ROOT = harness.ROOT
SECTIONS = ("timing", "correctness", "report")
KERNEL_BACKENDS = ("triton", "cuda")
CPU_BUDGET_S = 500            # make bench on a CPU machine must finish within 10 minutes (startup included)
SECTION_CAP_S = {"correctness": 900, "report": 1800}   # without a budget: a hung kernel cannot hang make bench


class Tee:
    """Write to the terminal and to run.log."""

    def __init__(self, path, mode="w"):
        self.f = open(path, mode)

    def write(self, s):
        sys.__stdout__.write(s)
        self.f.write(s)

    def flush(self):
        sys.__stdout__.flush()
        self.f.flush()


def say(*a):
    print(*a, flush=True)


def _remaining(deadline):
    return None if deadline is None else max(0.0, deadline - time.time())


def run_streaming(cmd, *, env, timeout, log=None):
    """Run cmd, echoing its output line by line; kill it after `timeout` s. Returns (rc, lines, timed_out)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1)
    lines = []

    def pump():
        for line in proc.stdout:
            lines.append(line)
            say(line.rstrip("\n"))
    t = threading.Thread(target=pump, daemon=True)
    t.start()
    try:
        rc = proc.wait(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = proc.wait()
        timed_out = True
    t.join(timeout=5)
    if log:
        with open(log, "w") as f:
            f.writelines(lines)
    return rc, lines, timed_out


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------

def describe_machine(gpu, peak):
    say(f"tileformer benchmarks -- {harness.RunInfo.collect().timestamp}, commit {harness.git_commit()}")
    say(f"versions: {harness.versions()}")
    if gpu:
        say(f"GPU: {gpu}")
        say(f"  peak: {peak.tflops_16:g} TFLOP/s fp16/bf16 dense, {peak.gbps:g} GB/s ({peak.name}, {peak.source})"
            if peak else "  " + formulas.unknown_gpu_message(gpu))
    else:
        why = "torch is a CPU-only build" if not torch.version.cuda else "torch.cuda.is_available() is False"
        say(f"No GPU found ({why}). Running the CPU path: reference/torch timings at small sizes, the kernel "
            "backends once through the Triton interpreter and the CUDA host emulation (correctness only), "
            "and the static kernel report.")
    for b, status in __import__("transformer").backends.available().items():
        say(f"  backend {b:<10} {status}")
    for name, status in providers.peer_status().items():
        say(f"  peer    {name:<10} {status}")


def section_timing(args, gpu, peak, out_dir, deadline):
    device = "cuda" if gpu else "cpu"
    kind = args.sweep if args.sweep != "auto" else ("quick" if args.quick else "gpu") if gpu else "cpu"
    ops = args.ops.split(",") if args.ops else cases.OPS
    sweep = cases.sweep(kind, dtype=args.dtype, ops=ops)
    provs = providers.providers(args.providers.split(",") if args.providers else None, peers=bool(gpu))
    if not gpu:   # interpreted / emulated kernels are for correctness only: their timings would mean nothing
        provs = [p for p in provs if p.backend not in KERNEL_BACKENDS]
    if args.list:
        say(f"\n== Timing ({kind} sweep, {len(sweep)} cases; providers {', '.join(p.name for p in provs)}):")
        for c in sweep:
            say(f"  {c.op:<17} {c.mode:<8} {c.shape:<52} {c.dtype}  flops={c.flops() or 0:.3g} bytes={c.bytes():.3g}")
        return []
    if kind != "cpu" and not gpu:
        say(f"\n== Timing: the {kind} sweep needs a GPU (none found); use --sweep cpu or --list")
        return []
    if not gpu:
        torch.set_num_threads(args.threads)
    say(f"\n== Timing: {kind} sweep, {len(sweep)} cases x {len(provs)} providers on {device}"
        + ("" if gpu else f" ({args.threads} thread(s); triton and cuda are not timed on the CPU: their "
                          "interpreter/emulator runs are checked in the correctness section)")
        + (" -- CUDA events, median and p20/p80; L2 flushed for memory-bound ops" if gpu else
           " -- perf_counter, median and p20/p80"))
    results = bench.run_sweep(sweep, provs, device, peak, deadline=deadline, cpu_budget_s=args.cpu_budget)
    say("\nSummary (cases measured, geometric mean speed-up vs torch):")
    say(bench.summary(results))
    info = harness.RunInfo.collect()
    rows = bench.csv_rows(results, info, peak)
    csv_path = os.path.join(out_dir, "bench.csv")
    kept = []
    if args.append and os.path.exists(csv_path):   # keep the earlier rows of the (op, mode)s not re-measured
        now = {(r["op"], r["mode"]) for r in rows}
        kept = [r for r in harness.read_csv(csv_path) if (r["op"], r["mode"]) not in now]
    harness.write_csv(csv_path, kept + rows)
    say(f"\nwrote {os.path.relpath(csv_path, ROOT)} ({len(rows)} rows" + (f", {len(kept)} kept from before)" if kept else ")"))
    if not args.no_plots:
        try:
            for p in plots.plot_csv_rows(harness.read_csv(csv_path), out_dir, peak, info.gpu):
                say(f"wrote {os.path.relpath(p, ROOT)}")
        except Exception as e:  # plotting must not lose the measurements
            say(f"plotting failed: {type(e).__name__}: {e}")
    return results


def section_correctness(args, gpu, out_dir, deadline, reserve_s):
    env = dict(os.environ, TILEFORMER_POISON="1")
    if not gpu:
        env.update(TRITON_INTERPRET="1", TILEFORMER_EMULATE_CUDA="1")
    jsonl = os.path.join(out_dir, "correctness.jsonl")
    if os.path.exists(jsonl):
        os.remove(jsonl)
    timeout = SECTION_CAP_S["correctness"] if deadline is None else max(30.0, _remaining(deadline) - reserve_s)
    say(f"\n== Correctness: each backend once on small inputs vs transformer.reference (flash-attn rule: "
        f"out <= 2x, grads <= 3x the error of PyTorch in the same dtype + atol)"
        + ("" if gpu else "; kernel backends through the Triton interpreter / CUDA host emulation")
        + f"; budget {timeout:.0f} s")
    cmd = [sys.executable, "-m", "benchmarks.correctness", "--jsonl", jsonl,
           "--backends", ",".join(["torch", *KERNEL_BACKENDS])]
    if args.ops:
        cmd += ["--ops", args.ops]
    cmd += ["--deadline", str(time.time() + timeout - 15)]
    rc, _, timed_out = run_streaming(cmd, env=env, timeout=timeout)
    rows = []
    if os.path.exists(jsonl):
        with open(jsonl) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        os.remove(jsonl)
    if timed_out:
        say("  correctness run stopped at its time budget: checks not listed above were not run")
    cols = ("op", "mode", "shape", "dtype", "backend", "status", "max_err", "bound", "seconds", "detail")
    path = os.path.join(out_dir, "correctness.csv")
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    say(f"wrote {os.path.relpath(path, ROOT)}")
    bad = [r for r in rows if r["status"] in ("FAIL", "ERROR")]
    for r in bad:
        say(f"  {r['status']}: {r['backend']} {r['op']} {r['mode']} {r['dtype']} {r['shape']}: {r['detail']}")
    if rc not in (0, 1) and not timed_out:
        say(f"  the correctness subprocess exited with status {rc}")
        return False
    return not any(r["backend"] in KERNEL_BACKENDS for r in bad)


def section_report(out_dir, deadline):
    timeout = SECTION_CAP_S["report"] if deadline is None else _remaining(deadline)
    say("\n== Kernel report: Triton configs and CUDA kernels compiled for sm_80/sm_90 (no GPU needed)"
        + f"; budget {timeout:.0f} s")
    cmd = [sys.executable, "-m", "benchmarks.static_report", "--json", os.path.join(out_dir, "kernel_report.json")]
    cmd += ["--deadline", str(time.time() + max(0.0, timeout - 10))]   # it stops itself; the kill is the backstop
    rc, _, timed_out = run_streaming(cmd, env=dict(os.environ), timeout=timeout,
                                     log=os.path.join(out_dir, "kernel_report.txt"))
    if timed_out:
        say("  kernel report stopped at the time budget: kernels not listed were not compiled")
    elif rc:
        say("  the kernel report found spills or compile errors (see above)")


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    ap.add_argument("--quick", action="store_true", help="GPU: a short sweep (3 sizes per curve)")
    ap.add_argument("--sweep", default="auto", choices=("auto", "gpu", "quick", "cpu"),
                    help="which sweep to time (auto: gpu, or quick with --quick, on a GPU; cpu without one). "
                         "--sweep cpu on a GPU is a fast smoke test at small sizes")
    ap.add_argument("--list", action="store_true", help="list the timing cases (with FLOPs and bytes) and time nothing")
    ap.add_argument("--ops", default="", help=f"comma-separated subset of {cases.OPS}")
    ap.add_argument("--providers", default="", help="comma-separated backends/peers to time (default all)")
    ap.add_argument("--dtype", default="bf16", choices=sorted(cases.DTYPES))
    ap.add_argument("--out", default="", help="output folder (default benchmarks/results/<gpu or cpu>)")
    ap.add_argument("--budget", type=float, default=None,
                    help=f"seconds after which no new work starts (default {CPU_BUDGET_S} without a GPU, "
                         "unlimited with one)")
    ap.add_argument("--threads", type=int, default=1, help="CPU timing: torch threads (default 1)")
    ap.add_argument("--cpu-budget", type=float, default=0.15, help="CPU timing: seconds per measurement")
    ap.add_argument("--append", action="store_true",
                    help="merge into an existing bench.csv (rows of the op/modes measured now are replaced)")
    ap.add_argument("--no-plots", action="store_true")
    args = ap.parse_args(argv)
    bad = set(args.sections.split(",")) - set(SECTIONS)
    if bad:
        ap.error(f"--sections: unknown {sorted(bad)}; choose from {SECTIONS}")
    if args.ops:
        bad = set(args.ops.split(",")) - set(cases.OPS)
        if bad:
            ap.error(f"--ops: unknown {sorted(bad)}; choose from {cases.OPS}")
    return args


def main(argv=None):
    args = parse_args(argv)
    os.environ["TILEFORMER_POISON"] = "0"          # timings never pay for NaN-filling outputs
    started = time.time()
    gpu = harness.gpu_name()
    peak = formulas.lookup_peak(gpu) if gpu else None
    budget = args.budget if args.budget is not None else (None if gpu else CPU_BUDGET_S)
    deadline = started + budget if budget else None
    out_dir = args.out or os.path.join(ROOT, "benchmarks", "results", harness.results_dirname(gpu))
    os.makedirs(out_dir, exist_ok=True)
    sys.stdout = Tee(os.path.join(out_dir, "run.log"), "a" if args.append else "w")
    sections = args.sections.split(",")
    describe_machine(gpu, peak)
    ok = True
    if "timing" in sections:
        # Under a budget the timing sweep gets at most 25% (CPU) / 60% (GPU) of it; the rest is for the others.
        t_deadline = None if deadline is None else time.time() + (0.6 if gpu else 0.25) * _remaining(deadline)
        section_timing(args, gpu, peak, out_dir, t_deadline if "correctness" in sections else deadline)
    if "correctness" in sections:
        ok = section_correctness(args, gpu, out_dir, deadline, reserve_s=120 if "report" in sections else 0)
    if "report" in sections:
        section_report(out_dir, deadline)
    say(f"\nbenchmarks.run finished in {time.time() - started:.0f} s; results in {os.path.relpath(out_dir, ROOT)}/"
        + ("" if ok else "  -- a kernel backend FAILED the correctness table"))
    sys.stdout.flush()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
