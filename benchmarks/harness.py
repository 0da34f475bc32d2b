"""Timing, the CSV schema and run metadata, shared by every op.

Timing on a GPU (`time_gpu`): one call to compile/warm caches, a short estimate, warm-up for ~25 ms, then
each repetition is bracketed by CUDA events (no host sync inside the loop); for memory-bound ops a 256 MB
buffer is zeroed before every repetition so the op's inputs do not sit in L2 (that write lies outside the
events). Timing on the CPU (`time_cpu`): perf_counter around each call, repeated until a time budget.
Both report the median and the 20th/80th percentiles in milliseconds.

CSV: one row per (op, backend, mode, shape, dtype, metric) with the columns of `CSV_COLUMNS`; a backend
that cannot run a case gets one `time` row with empty numbers and the reason in `note`.
"""
from __future__ import annotations

import csv
import dataclasses
import datetime
import functools
import os
import platform
import statistics
import subprocess
import time
from typing import Callable, Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSV_COLUMNS = ("op", "backend", "mode", "shape", "dtype", "metric", "unit", "median", "p20", "p80",
               "gpu", "versions", "git_commit", "timestamp", "note")
L2_FLUSH_BYTES = 256 * 1024 * 1024       # > the L2 of every GPU in the peak table (H200: 60 MB)


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------

def quantile(sorted_xs, q):
    """Linear-interpolated quantile (numpy's default) of an already sorted non-empty list."""
    if not sorted_xs:
        raise ValueError("quantile of an empty list")
    pos = q * (len(sorted_xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


@dataclasses.dataclass
class Timing:
    """Milliseconds per call: median, 20th and 80th percentile over `reps` repetitions."""
    median: float
    p20: float
    p80: float
    reps: int

    @classmethod
    def from_samples(cls, samples_ms):
        xs = sorted(samples_ms)
        return cls(statistics.median(xs), quantile(xs, 0.2), quantile(xs, 0.8), len(xs))


# ---------------------------------------------------------------------------------------------
# Timers
# ---------------------------------------------------------------------------------------------

def time_cpu(fn: Callable, *, budget_s=0.4, min_reps=5, max_reps=100, warmup=1) -> Timing:
    """Time fn() on the CPU: `warmup` untimed calls, then repeat until budget_s (at least min_reps)."""
    for _ in range(warmup):
        fn()
    samples = []
    start = time.perf_counter()
    while len(samples) < max_reps and (len(samples) < min_reps or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return Timing.from_samples(samples)


@functools.lru_cache(maxsize=None)
def _flush_buffer(device_index):
    return torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=f"cuda:{device_index}")


def time_gpu(fn: Callable, *, flush_l2=False, warmup_ms=25.0, rep_ms=100.0, min_reps=10, max_reps=1000) -> Timing:
    """Time fn() on the current CUDA device with CUDA events (like triton.testing.do_bench).

    flush_l2: zero a 256 MB buffer before each repetition (outside the timed events), for memory-bound ops.
    """
    flush = _flush_buffer(torch.cuda.current_device()) if flush_l2 else None
    fn()
    torch.cuda.synchronize()
    # Estimate the time of one call to size warm-up and repetitions.
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(3):
        if flush is not None:
            flush.zero_()
        fn()
    e1.record()
    torch.cuda.synchronize()
    est = max(e0.elapsed_time(e1) / 3, 1e-3)
    n_warmup = max(1, int(warmup_ms / est))
    n_rep = max(min_reps, min(max_reps, int(rep_ms / est)))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    for _ in range(n_warmup):
        fn()
    for i in range(n_rep):
        if flush is not None:
            flush.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return Timing.from_samples([s.elapsed_time(e) for s, e in zip(starts, ends)])


# ---------------------------------------------------------------------------------------------
# Run metadata
# ---------------------------------------------------------------------------------------------

def gpu_name() -> Optional[str]:
    """torch.cuda.get_device_name() of the current device, or None without a usable GPU."""
    try:
        if torch.cuda.is_available():
            return torch.cuda.get_device_name()
    except Exception:  # a broken driver counts as no GPU
        return None
    return None


def results_dirname(gpu: Optional[str]) -> str:
    """"cpu" or a file-name-safe GPU name, e.g. "nvidia-h100-80gb-hbm3"."""
    if not gpu:
        return "cpu"
    return "".join(c if c.isalnum() else "-" for c in gpu.lower()).strip("-").replace("--", "-")


def _module_version(name):
    try:
        mod = __import__(name)
        return getattr(mod, "__version__", "?")
    except Exception:
        return None


def versions() -> str:
    """"python=3.11.7 torch=2.14.1 cuda=13.0 triton=3.8.0 tileformer=0.1.0 [peers...]" (only what imports)."""
    parts = [f"python={platform.python_version()}", f"torch={torch.__version__}", f"cuda={torch.version.cuda}"]
    for name, label in (("triton", "triton"), ("transformer", "tileformer"), ("flash_attn", "flash_attn"),
                        ("flash_attn_interface", "flash_attn3"), ("flashinfer", "flashinfer"),
                        ("liger_kernel", "liger_kernel"), ("apex", "apex")):
        v = _module_version(name)
        if v is not None:
            parts.append(f"{label}={v}")
    return " ".join(parts)


def git_commit() -> str:
    """Short HEAD hash, "+dirty" when tracked files differ from it. Outside a git checkout (the copy of the
    working tree on a lent GPU machine) TILEFORMER_GIT_COMMIT, else "unknown"."""
    if not os.path.exists(os.path.join(ROOT, ".git")) and os.environ.get("TILEFORMER_GIT_COMMIT"):
        return os.environ["TILEFORMER_GIT_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (head + ("+dirty" if dirty else "")) or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@dataclasses.dataclass
class RunInfo:
    gpu: str              # device name, or "cpu"
    versions: str
    git_commit: str
    timestamp: str

    @classmethod
    def collect(cls):
        now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        return cls(gpu=gpu_name() or "cpu", versions=versions(), git_commit=git_commit(), timestamp=now)


# ---------------------------------------------------------------------------------------------
# CSV
# ---------------------------------------------------------------------------------------------

def csv_row(info: RunInfo, *, op, backend, mode, shape, dtype, metric, unit, median=None, p20=None, p80=None,
            note=""):
    def num(x):
        return "" if x is None else f"{x:.6g}"
    return dict(op=op, backend=backend, mode=mode, shape=shape, dtype=dtype, metric=metric, unit=unit,
                median=num(median), p20=num(p20), p80=num(p80), gpu=info.gpu, versions=info.versions,
                git_commit=info.git_commit, timestamp=info.timestamp, note=note)


def write_csv(path, rows):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow(r)


def read_csv(path):
    """Rows as dicts; median/p20/p80 converted to float (None when empty). Checks the header."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != CSV_COLUMNS:
            raise ValueError(f"{path}: columns {reader.fieldnames} differ from the schema {CSV_COLUMNS}")
        rows = []
        for r in reader:
            for k in ("median", "p20", "p80"):
                r[k] = float(r[k]) if r[k] != "" else None
            rows.append(r)
    return rows


def parse_shape(shape: str) -> dict:
    """"B=2 N=512 causal=1" -> {"B": 2, "N": 512, "causal": 1} (ints where they parse)."""
    out = {}
    for tok in shape.split():
        k, _, v = tok.partition("=")
        try:
            out[k] = int(v)
        except ValueError:
            out[k] = v
    return out


def format_shape(params: dict) -> str:
    return " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in params.items())
