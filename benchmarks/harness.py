"""Timing, the CSV schema and run metadata, shared by every op.

Timing on a GPU (`time_gpu`): ``triton.testing.do_bench``: one call (compilation, autotuning), an estimate
from 5 calls, ~25 ms of warm-up, then ~100 ms of repetitions, each bracketed by CUDA events, with triton's
256 MB L2-clearing write before every repetition (outside the events), so no op finds its inputs in L2.
Timing on the CPU (`time_cpu`): one untimed call, then ``torch.utils.benchmark.Timer.blocked_autorange``
(blocks of calls sized so the timer's overhead is negligible, for a minimum run time) with the caller's
torch thread count. Both give the median and the 20th/80th percentiles in milliseconds (`QUANTILES`).

CSV: one row per (op, backend, mode, shape, dtype, metric) with the columns of `CSV_COLUMNS`; a backend
that cannot run a case gets one `time` row with empty numbers and the reason in `note`.
"""
from __future__ import annotations

import csv
import dataclasses
import datetime
import importlib
import os
import platform
import subprocess
from typing import Callable, Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSV_COLUMNS = ("op", "backend", "mode", "shape", "dtype", "metric", "unit", "median", "p20", "p80",
               "gpu", "versions", "git_commit", "timestamp", "note")
QUANTILES = (0.5, 0.2, 0.8)              # median, p20, p80: the order of Timing's fields


@dataclasses.dataclass
class Timing:
    """Milliseconds per call: median, 20th and 80th percentile over `reps` repetitions (0: the timer does not
    say how many; triton's do_bench returns the quantiles only)."""
    median: float
    p20: float
    p80: float
    reps: int

    @classmethod
    def from_samples(cls, samples_ms):
        """Quantiles of per-call times (ms), linearly interpolated (torch.quantile, numpy's default)."""
        if not len(samples_ms):
            raise ValueError("no timing samples")
        xs = torch.tensor(list(samples_ms), dtype=torch.float64)
        median, p20, p80 = xs.quantile(torch.tensor(QUANTILES, dtype=torch.float64)).tolist()
        return cls(median, p20, p80, len(xs))


# ---------------------------------------------------------------------------------------------
# Timers
# ---------------------------------------------------------------------------------------------

def time_cpu(fn: Callable, *, budget_s=0.4, min_reps=3) -> Timing:
    """Time fn() on the CPU with torch.utils.benchmark: one untimed call, then blocked_autorange for
    budget_s seconds. A sample is the mean time of one block of calls; when a call outlasts the budget
    (one block of one call), more blocks are timed until there are min_reps samples for p20/p80."""
    from torch.utils import benchmark
    fn()
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=budget_s)
    times = list(m.times)
    while len(times) < min_reps:
        times.extend(timer.timeit(m.number_per_run).times)
    return Timing.from_samples([t * 1e3 for t in times])


def time_gpu(fn: Callable, *, warmup_ms=25.0, rep_ms=100.0) -> Timing:
    """Time fn() on the current CUDA device with triton.testing.do_bench (CUDA events, L2 cleared before
    every repetition). Its keywords warmup, rep (ms), quantiles and return_mode exist throughout triton 3.x;
    given `quantiles` it returns them in the order asked (return_mode then does not apply)."""
    from triton.testing import do_bench
    median, p20, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=list(QUANTILES), return_mode="median")
    return Timing(float(median), float(p20), float(p80), 0)


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
        mod = importlib.import_module(name)
        return getattr(mod, "__version__", "?")
    except Exception:
        return None


def versions() -> str:
    """"python=3.11.7 torch=2.14.1 cuda=13.0 triton=3.8.0 tileformer=0.1.0 [peers...]" (only what imports)."""
    parts = [f"python={platform.python_version()}", f"torch={torch.__version__}", f"cuda={torch.version.cuda}"]
    for name, label in (("triton", "triton"), ("transformer", "tileformer"), ("flash_attn", "flash_attn"),
                        ("flash_attn_interface", "flash_attn3"), ("flash_attn.cute", "flash_attn4"),
                        ("flashinfer", "flashinfer"),
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
        # --no-optional-locks: git status would otherwise refresh (write) the index
        dirty = subprocess.run(["git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
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
