"""`make bench`: benchmarks on a GPU; CPU timings, a correctness table and the kernel report without one.

    python -m benchmarks.run                      # everything this machine can do
    python -m benchmarks.run --quick              # a short GPU sweep (3 points per curve)
    python -m benchmarks.run --sections timing --ops flash_attention --providers torch,triton
    python -m benchmarks.run --budget 540         # stop starting new work after 540 s
    python -m benchmarks.run --sweep gpu --list --sections timing   # show the full GPU sweep; run and write nothing
    python -m benchmarks.run --sweep cpu          # on a GPU: a smoke test at the small CPU sizes

Sections (--sections, comma-separated; default all):
  timing       every op x mode x backend (+ peers on a GPU) over the sweep of benchmarks/cases.py:
               the full sweep on a GPU (--quick: a subset), small sizes on the CPU (reference and torch
               only: interpreted/emulated kernels are not timed). A live table, then CSV + PNGs.
  correctness  every backend once on small inputs vs transformer.reference (transformer.testing.assert_close);
               without a GPU in a subprocess with TRITON_INTERPRET=1 and TILEFORMER_EMULATE_CUDA=1.
  work         the counted work of our kernels (benchmarks/work.py): each Triton path run once under the
               interpreter at one size per op and mode, its tensor-core FLOPs executed / ideal and bytes
               moved / minimum per kernel, with each kernel's sm_90 static facts (instruction, wgmma N, TMA,
               setmaxnreg, registers, spills, occupancy); the CUDA kernels' static facts. Default without a
               GPU (the counts do not depend on one); on a GPU only when named.
  report       the static kernel report (registers, spills, smem, occupancy, tensor-core instructions
               per Triton config and CUDA kernel for sm_80/sm_90), no GPU needed.
Output under benchmarks/results/<gpu or "cpu">/ (or --out): bench.csv, <op>_<dtype>.png,
correctness.csv, work.txt/.csv/.png, kernel_report.txt/.json, ceilings.csv (GPU: the measured matmul and copy
rates, benchmarks/ceilings.py, a second roofline), run.log (the output on stdout). The run writes into a fresh folder
next to it (.<name>.partial-<pid>) and moves its files into place only when it completes: an interrupted or
failed run leaves the folder as it was and says where its partial output is. Files the run does not write
(e.g. correctness.csv of a --sections timing run) are kept. Tables go to stdout, progress bars with the time
left to stderr. --list writes nothing.
Exit status 1 when a kernel backend (triton, cuda) fails or errors in the correctness table.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import torch

from . import bench, cases, formulas, harness, plots, progress, providers

ROOT = harness.ROOT
SECTIONS = ("timing", "correctness", "work", "report")
KERNEL_BACKENDS = ("triton", "cuda")
CPU_BUDGET_S = 500            # make bench on a CPU machine must finish within 10 minutes (startup included)
SECTION_CAP_S = {"correctness": 900, "work": 600, "report": 1800}   # without a budget: a hung kernel cannot hang
WORK_S = 170                  # the work section's share under a budget (about 100 s with a warm static cache)
REPORT_RESERVE_S = 120        # left for the kernel report under a budget


class Tee:
    """Write to `stream` (the terminal) and to run.log."""

    def __init__(self, path, mode="w", stream=None):
        self.f = open(path, mode)
        self.stream = stream or sys.stdout

    def write(self, s):
        self.stream.write(s)
        self.f.write(s)

    def flush(self):
        self.stream.flush()
        self.f.flush()

    def close(self):
        self.f.close()


@dataclasses.dataclass
class Output:
    """Where a run writes (`tmp`, a fresh folder next to `dest`) and where its files end up (`dest`)."""
    dest: str
    tmp: str

    @classmethod
    def fresh(cls, dest):
        dest = os.path.abspath(dest)
        tmp = os.path.join(os.path.dirname(dest), f".{os.path.basename(dest)}.partial-{os.getpid()}")
        if os.path.exists(tmp):            # left by an earlier run with the same pid
            shutil.rmtree(tmp)
        os.makedirs(tmp)
        return cls(dest, tmp)

    def path(self, name):
        """Where to write `name` during the run."""
        return os.path.join(self.tmp, name)

    def shown(self, name=""):
        """`name` at its final place, relative to the repository when inside it (for messages)."""
        return shown_path(os.path.join(self.dest, name))

    def carry_over(self, *names):
        """Copy these files of dest into the fresh folder (--append continues bench.csv and run.log)."""
        for name in names:
            if os.path.exists(os.path.join(self.dest, name)):
                shutil.copy2(os.path.join(self.dest, name), self.path(name))

    def publish(self):
        """Move every file of the fresh folder into dest (replacing files of the same name), remove it."""
        os.makedirs(self.dest, exist_ok=True)
        for name in sorted(os.listdir(self.tmp)):
            os.replace(os.path.join(self.tmp, name), os.path.join(self.dest, name))
        os.rmdir(self.tmp)


def shown_path(path):
    path = os.path.abspath(path)
    return os.path.relpath(path, ROOT) if path.startswith(ROOT + os.sep) else path


def say(*a):
    progress.write(" ".join(map(str, a)))


def _remaining(deadline):
    return None if deadline is None else max(0.0, deadline - time.time())


def run_streaming(cmd, *, env, timeout, log=None):
    """Run cmd, echoing its output line by line and drawing the progress bars it reports (benchmarks/progress.py);
    kill it after `timeout` s, or when this process is interrupted. Returns (rc, lines, timed_out)."""
    env = dict(env, **{progress.ENV: "parent"})
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1)
    lines = []
    bars = progress.Mirror()

    def pump():
        for line in proc.stdout:
            state = progress.parse(line)
            if state is not None:
                bars.apply(state)
                continue
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
    except BaseException:              # interrupted: the subprocess must not go on writing
        proc.kill()
        proc.wait()
        raise
    finally:
        t.join(timeout=5)
        bars.close()
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


def timing_providers(names, gpu):
    """The providers the timing section runs: every one (`names` empty) or those named. Without a GPU the kernel
    backends are left out (interpreted / emulated kernels are for correctness only); on a GPU the fp32
    reference is left out unless named (it only spends device time)."""
    provs = providers.providers(names or None, peers=bool(gpu))
    if not gpu:
        return [p for p in provs if p.backend not in KERNEL_BACKENDS]
    if not names:
        provs = [p for p in provs if p.name != "reference"]
    return provs


def section_timing(args, gpu, peak, out, deadline, measured=None):
    device = "cuda" if gpu else "cpu"
    kind = args.sweep if args.sweep != "auto" else ("quick" if args.quick else "gpu") if gpu else "cpu"
    ops = args.ops.split(",") if args.ops else cases.OPS
    sweep = cases.sweep(kind, dtype=args.dtype, ops=ops)
    provs = timing_providers(args.providers.split(",") if args.providers else None, gpu)
    if out is None:                  # --list
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
        + (" -- triton.testing.do_bench: CUDA events, L2 cleared before each repetition; median and p20/p80"
           if gpu else " -- torch.utils.benchmark.Timer.blocked_autorange; median and p20/p80"))
    results = bench.run_sweep(sweep, provs, device, peak, deadline=deadline, cpu_budget_s=args.cpu_budget,
                              measured=measured)
    say("\nSummary (cases measured, geometric mean speed-up vs torch):")
    say(bench.summary(results))
    info = harness.RunInfo.collect()
    rows = bench.csv_rows(results, info, peak, measured)
    csv_path = out.path("bench.csv")        # with --append: a copy of the earlier bench.csv (main)
    kept = []
    if args.append and os.path.exists(csv_path):   # keep the earlier rows of the (op, mode)s not re-measured
        now = {(r["op"], r["mode"]) for r in rows}
        kept = [r for r in harness.read_csv(csv_path) if (r["op"], r["mode"]) not in now]
    harness.write_csv(csv_path, kept + rows)
    say(f"\nwrote {out.shown('bench.csv')} ({len(rows)} rows" + (f", {len(kept)} kept from before)" if kept else ")"))
    if not args.no_plots:
        try:
            for p in plots.plot_csv_rows(harness.read_csv(csv_path), out.tmp, peak, info.gpu, measured):
                say(f"wrote {out.shown(os.path.basename(p))}")
        except Exception as e:  # plotting must not lose the measurements
            say(f"plotting failed: {type(e).__name__}: {e}")
    return results


def section_correctness(args, gpu, out, deadline, reserve_s):
    env = dict(os.environ, TILEFORMER_POISON="1")
    if not gpu:
        env.update(TRITON_INTERPRET="1", TILEFORMER_EMULATE_CUDA="1")
    jsonl = out.path("correctness.jsonl")
    if os.path.exists(jsonl):
        os.remove(jsonl)
    timeout = SECTION_CAP_S["correctness"] if deadline is None else max(30.0, _remaining(deadline) - reserve_s)
    say("\n== Correctness: each backend once on small inputs vs transformer.reference (flash-attn rule: "
        "out <= 2x, grads <= 3x the error of PyTorch in the same dtype + atol)"
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
    with open(out.path("correctness.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    say(f"wrote {out.shown('correctness.csv')}")
    bad = [r for r in rows if r["status"] in ("FAIL", "ERROR")]
    for r in bad:
        say(f"  {r['status']}: {r['backend']} {r['op']} {r['mode']} {r['dtype']} {r['shape']}: {r['detail']}")
    if rc not in (0, 1) and not timed_out:
        say(f"  the correctness subprocess exited with status {rc}")
        return False
    return not any(r["backend"] in KERNEL_BACKENDS for r in bad)


def section_work(out, deadline, reserve_s=0):
    """benchmarks.work in a subprocess (it starts the interpreter's own subprocess), under its time share."""
    timeout = SECTION_CAP_S["work"] if deadline is None else max(30.0, min(WORK_S, _remaining(deadline) - reserve_s))
    say("\n== Work: the Triton kernels counted under the interpreter (tensor-core FLOPs executed / ideal, bytes "
        "moved / minimum) with their sm_90 static facts; the CUDA kernels' static facts"
        + f"; budget {timeout:.0f} s")
    cmd = [sys.executable, "-m", "benchmarks.work", "--out", out.tmp, "--deadline", str(time.time() + timeout - 15)]
    earlier = os.path.join(out.dest, "kernel_report.json")      # the CUDA facts when the extension is stale
    if os.path.exists(earlier):
        cmd += ["--report-json", earlier]
    rc, _, timed_out = run_streaming(cmd, env=dict(os.environ), timeout=timeout)
    if timed_out:
        say("  work section stopped at its time budget (work.csv / work.png not written)")
    elif rc:
        say(f"  a Triton kernel raised under the interpreter (status {rc}; see above)")
    for name in ("work.txt", "work.csv", "work.png"):
        if os.path.exists(out.path(name)):
            say(f"wrote {out.shown(name)}")


def section_report(out, deadline):
    timeout = SECTION_CAP_S["report"] if deadline is None else _remaining(deadline)
    say("\n== Kernel report: Triton configs and CUDA kernels compiled for sm_80/sm_90 (no GPU needed)"
        + f"; budget {timeout:.0f} s")
    cmd = [sys.executable, "-m", "benchmarks.static_report", "--json", out.path("kernel_report.json")]
    cmd += ["--deadline", str(time.time() + max(0.0, timeout - 10))]   # it stops itself; the kill is the backstop
    rc, _, timed_out = run_streaming(cmd, env=dict(os.environ), timeout=timeout,
                                     log=out.path("kernel_report.txt"))
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
    ap.add_argument("--sections", default="", help=f"comma-separated subset of {SECTIONS} (default: all; on a "
                                                   "GPU all but work)")
    ap.add_argument("--quick", action="store_true", help="GPU: a short sweep (3 sizes per curve)")
    ap.add_argument("--sweep", default="auto", choices=("auto", "gpu", "quick", "cpu"),
                    help="which sweep to time (auto: gpu, or quick with --quick, on a GPU; cpu without one). "
                         "--sweep cpu on a GPU is a fast smoke test at small sizes")
    ap.add_argument("--list", action="store_true",
                    help="list the timing cases (with FLOPs and bytes); run no section and write nothing")
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
                    help="merge into an existing bench.csv (rows of the op/modes measured now are replaced) and "
                         "append to run.log")
    ap.add_argument("--no-plots", action="store_true")
    args = ap.parse_args(argv)
    if not args.sections:
        args.sections = ",".join(s for s in SECTIONS if s != "work" or not harness.gpu_name())
    bad = set(args.sections.split(",")) - set(SECTIONS)
    if bad:
        ap.error(f"--sections: unknown {sorted(bad)}; choose from {SECTIONS}")
    if args.ops:
        bad = set(args.ops.split(",")) - set(cases.OPS)
        if bad:
            ap.error(f"--ops: unknown {sorted(bad)}; choose from {cases.OPS}")
    return args


def run_sections(args, gpu, peak, out, started, deadline, measured=None):
    """The sections asked for, writing into out.tmp; returns False when a kernel backend failed correctness."""
    sections = args.sections.split(",")
    ok = True
    report_reserve = REPORT_RESERVE_S if "report" in sections else 0
    work_reserve = WORK_S if "work" in sections else 0
    if "timing" in sections:
        # Under a budget the timing sweep gets at most 25% (CPU) / 60% (GPU) of it; the rest is for the others.
        t_deadline = None if deadline is None else time.time() + (0.6 if gpu else 0.25) * _remaining(deadline)
        later = {"correctness", "work"} & set(sections)
        section_timing(args, gpu, peak, out, t_deadline if later else deadline, measured)
    if "correctness" in sections:
        ok = section_correctness(args, gpu, out, deadline, reserve_s=report_reserve + work_reserve)
    if "work" in sections:
        section_work(out, deadline, reserve_s=report_reserve)
    if "report" in sections:
        section_report(out, deadline)
    say(f"\nbenchmarks.run finished in {time.time() - started:.0f} s; results in {out.shown()}/"
        + ("" if ok else "  -- a kernel backend FAILED the correctness table"))
    return ok


def _terminate(signum, frame):
    sys.exit(128 + signum)     # unwinds like Ctrl-C: the finished-run move does not happen


def main(argv=None):
    args = parse_args(argv)
    os.environ["TILEFORMER_POISON"] = "0"          # timings never pay for NaN-filling outputs
    started = time.time()
    gpu = harness.gpu_name()
    peak = formulas.lookup_peak(gpu) if gpu else None
    if args.list:                                  # read-only: no output folder, no run.log
        describe_machine(gpu, peak)
        sections = args.sections.split(",")
        if "timing" in sections:
            section_timing(args, gpu, peak, None, None)
        for name in sections:
            if name != "timing":
                say(f"\n== {name}: not run with --list")
        return 0
    budget = args.budget if args.budget is not None else (None if gpu else CPU_BUDGET_S)
    deadline = started + budget if budget else None
    out = Output.fresh(args.out or os.path.join(ROOT, "benchmarks", "results", harness.results_dirname(gpu)))
    if args.append:
        out.carry_over("bench.csv", "run.log")
    tee = Tee(out.path("run.log"), "a" if args.append else "w")
    previous_term = signal.signal(signal.SIGTERM, _terminate)
    sys.stdout = tee
    try:
        describe_machine(gpu, peak)
        measured = None
        if gpu and "timing" in args.sections.split(","):
            from . import ceilings
            measured = ceilings.load_or_measure(out.dest, gpu, write_to=out.path(formulas.CEILINGS_FILE), log=say)
        ok = run_sections(args, gpu, peak, out, started, deadline, measured)
    except BaseException as e:
        sys.stdout = tee.stream
        tee.close()
        why = "interrupted" if isinstance(e, (KeyboardInterrupt, SystemExit)) else f"failed ({type(e).__name__}: {e})"
        print(f"\nbenchmarks.run {why}: {out.shown()}/ is left as it was; this run's partial output is in "
              f"{shown_path(out.tmp)}/", file=sys.stderr, flush=True)
        if isinstance(e, KeyboardInterrupt):
            return 130
        raise
    finally:
        signal.signal(signal.SIGTERM, previous_term)
    sys.stdout = tee.stream
    tee.close()
    out.publish()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
