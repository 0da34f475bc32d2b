"""Run a sweep: every case x every provider, timed, with derived metrics, a live table and CSV rows.

For each case the inputs are drawn once and shared by all providers. Modes:
    fwd      the inference forward (inputs do not require grad)
    bwd      torch.autograd.grad of a saved forward output with a random dout (retain_graph)
    fwd+bwd  forward then backward, both inside the timed region
A provider that cannot run a case is reported with its reason; one that raises (or runs out of memory)
is reported as an error and the sweep goes on.
"""
from __future__ import annotations

import dataclasses
import math
import sys
import time
from typing import Optional

import torch

from . import formulas, progress
from .cases import Case, make_inputs
from .harness import Timing, csv_row, time_cpu, time_gpu

REFERENCE_MEMORY_FRACTION = 0.25     # skip the fp32 reference when its intermediates exceed this of free memory


class Unavailable(RuntimeError):
    """Raised by a provider's callable when it finds out only at the call that it cannot serve the case
    (reported as "not available: <reason>", not as an error)."""


@dataclasses.dataclass
class Measurement:
    case: Case
    provider: str
    kind: str                        # "backend" or "peer"
    timing: Optional[Timing] = None
    note: str = ""                   # why there is no timing ("not available: ...", "error: ...", "skipped: ...")
    speedup_vs_torch: Optional[float] = None
    speedup_vs_peer: Optional[float] = None
    best_peer: str = ""
    speedup_vs_16bit_cache: Optional[float] = None   # decode over a quantized cache: time of the 16-bit twin / this

    @property
    def ok(self):
        return self.timing is not None


# ---------------------------------------------------------------------------------------------
# Timing one provider on one case
# ---------------------------------------------------------------------------------------------

def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def timed_callable(case: Case, fn, inp):
    """The callable whose time is the case's: fwd, bwd or fwd+bwd of `fn` (see the module docstring)."""
    if case.mode == "fwd":
        def fwd():
            with torch.no_grad():
                return fn()
        return fwd
    leaves = inp["grad_inputs"]
    out = _first(fn())
    dout = torch.randn_like(out)
    if case.mode == "bwd":
        return lambda: torch.autograd.grad(out, leaves, dout, retain_graph=True)
    return lambda: torch.autograd.grad(_first(fn()), leaves, dout)


def reference_bytes(case: Case) -> float:
    """Rough fp32 memory the reference backend needs for its intermediates (bytes)."""
    p = case.p
    if case.op == "flash_attention":
        return p["B"] * p["Hq"] * p["Nq"] * p["Nk"] * 4.0 * (4 if case.mode == "fwd" else 10)
    if case.op == "decode_attention":
        return 2 * p["L"] * p["Hq"] * p["D"] * 4.0 * 3
    return p["M"] * p["N"] * 4.0 * 8


def _guard(provider, case, device) -> Optional[str]:
    if provider.name != "reference" or torch.device(device).type != "cuda":
        return None
    need = reference_bytes(case)
    free, _ = torch.cuda.mem_get_info()
    if need > REFERENCE_MEMORY_FRACTION * free:
        return f"skipped: the fp32 reference would hold ~{need / 1e9:.0f} GB of intermediates"
    return None


def measure(case: Case, provider, inp, device, *, cpu_budget_s=0.4) -> Measurement:
    m = Measurement(case, provider.name, provider.kind)
    try:
        reason = provider.unavailable(case, inp, device)
        if reason:
            m.note = f"not available: {reason}"
            return m
        skip = _guard(provider, case, device)
        if skip:
            m.note = skip
            return m
        fn = timed_callable(case, provider.build(case, inp), inp)
        if hasattr(provider, "wrap"):        # a variant: its knob set for the backward too
            fn = provider.wrap(fn)
        if torch.device(device).type == "cuda":
            m.timing = time_gpu(fn)
        else:
            m.timing = time_cpu(fn, budget_s=cpu_budget_s, min_reps=3)
    except Unavailable as e:         # found out only by calling it (e.g. SDPA: "No available kernel")
        m.note = f"not available: {e}"
    except torch.cuda.OutOfMemoryError:
        m.note = "skipped: out of GPU memory"
    except Exception as e:  # a kernel failing must not stop the sweep
        m.note = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    if torch.device(device).type == "cuda" and m.timing is None:
        try:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        except Exception as e:  # a sticky CUDA error (illegal address...): later cases will say so too
            m.note += f" (CUDA context: {type(e).__name__})"
    return m


def add_speedups(ms):
    """Fill speed-up vs torch and vs the fastest peer among the measurements of one case."""
    by = {m.provider: m for m in ms if m.ok}
    torch_m = by.get("torch")
    peers = [m for m in ms if m.ok and m.kind == "peer"]
    best = min(peers, key=lambda m: m.timing.median) if peers else None
    for m in ms:
        if not m.ok:
            continue
        if torch_m is not None:
            m.speedup_vs_torch = torch_m.timing.median / m.timing.median
        if best is not None and m.kind == "backend":
            m.speedup_vs_peer = best.timing.median / m.timing.median
            m.best_peer = best.provider


def add_kv_speedups(results):
    """Decode over an int8 / fp8 cache (a case with "kv"): speed-up over the same provider on the same case with
    a 16-bit cache, where both were measured in this run."""
    plain = {(m.provider, m.case.params, m.case.dtype): m for m in results
             if m.ok and m.case.op == "decode_attention" and "kv" not in m.case.p}
    for m in results:
        if m.ok and m.case.op == "decode_attention" and "kv" in m.case.p:
            twin = plain.get((m.provider, tuple(kv for kv in m.case.params if kv[0] != "kv"), m.case.dtype))
            if twin is not None:
                m.speedup_vs_16bit_cache = twin.timing.median / m.timing.median


def run_case(case: Case, provs, device, *, seed=0, cpu_budget_s=0.4):
    """All providers on one case (inputs drawn once); returns the measurements with speed-ups."""
    try:
        inp = make_inputs(case, device, requires_grad=case.mode != "fwd", seed=seed)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return [Measurement(case, p.name, p.kind, note="skipped: inputs do not fit in GPU memory") for p in provs]
    ms = [measure(case, p, inp, device, cpu_budget_s=cpu_budget_s) for p in provs]
    del inp
    add_speedups(ms)
    return ms


# ---------------------------------------------------------------------------------------------
# Metrics and CSV rows
# ---------------------------------------------------------------------------------------------

def _roofline_row(metric, c, t, peak, what):
    flops, nbytes = c.flops(), c.bytes()
    floor = formulas.roofline_floor_s(flops, nbytes, peak, c.dtype)
    if not floor:
        return None
    return (metric, "x", formulas.time_over_floor(t.median, floor), formulas.time_over_floor(t.p20, floor),
            formulas.time_over_floor(t.p80, floor),
            f"floor {floor * 1e3:.4g} ms, {formulas.bound_by(flops, nbytes, peak, c.dtype)}-bound on {what}")


def metrics(m: Measurement, peak, measured=None):
    """[(metric, unit, median, p20, p80, note)] of one measurement; p20/p80 of a throughput come from
    the p80/p20 times (a slower time is a lower throughput). `peak`: the data-sheet peaks
    (time_over_roofline); `measured`: the ceilings measured on this GPU (time_over_measured_roofline)."""
    c, t = m.case, m.timing
    if t is None:
        return [("time", "ms", None, None, None, m.note)]
    rows = [("time", "ms", t.median, t.p20, t.p80, "")]
    flops, nbytes = c.flops(), c.bytes()
    if flops:
        rows.append(("throughput", "TFLOP/s", formulas.tflops(flops, t.median), formulas.tflops(flops, t.p80),
                     formulas.tflops(flops, t.p20), ""))
    rows.append(("bandwidth", "GB/s", formulas.gbps(nbytes, t.median), formulas.gbps(nbytes, t.p80),
                 formulas.gbps(nbytes, t.p20), ""))
    for metric, pk, what in (("time_over_roofline", peak, peak and peak.name),
                             ("time_over_measured_roofline", measured,
                              measured and f"{measured.name} ({measured.tflops_16:.4g} TFLOP/s, "
                                           f"{measured.gbps:.4g} GB/s)")):
        row = _roofline_row(metric, c, t, pk, what) if pk is not None else None
        if row:
            rows.append(row)
    if m.speedup_vs_torch is not None and m.provider != "torch":
        rows.append(("speedup_vs_torch", "x", m.speedup_vs_torch, None, None, ""))
    if m.speedup_vs_peer is not None:
        rows.append(("speedup_vs_best_peer", "x", m.speedup_vs_peer, None, None, m.best_peer))
    if m.speedup_vs_16bit_cache is not None:
        rows.append(("speedup_vs_16bit_cache", "x", m.speedup_vs_16bit_cache, None, None,
                     f"the same case with a {c.dtype} cache"))
    return rows


def csv_rows(measurements, info, peak, measured=None):
    out = []
    for m in measurements:
        for metric, unit, med, p20, p80, note in metrics(m, peak, measured):
            out.append(csv_row(info, op=m.case.op, backend=m.provider, mode=m.case.mode, shape=m.case.shape,
                               dtype=m.case.dtype, metric=metric, unit=unit, median=med, p20=p20, p80=p80,
                               note=note))
    return out


# ---------------------------------------------------------------------------------------------
# Terminal table
# ---------------------------------------------------------------------------------------------

HEADER = (f"    {'provider':<12} {'median ms':>10} {'p20-p80 ms':>19} {'TFLOP/s':>8} {'GB/s':>8} "
          f"{'x floor':>8} {'x meas':>7} {'vs torch':>9} {'vs peer':>8}")


def _fmt(x, spec, width):
    return f"{x:{width}{spec}}" if x is not None else " " * (width - 1) + "-"


def format_measurement(m: Measurement, peak, measured=None) -> str:
    """One table row; `x floor` over the data-sheet roofline, `x meas` over the measured one."""
    if not m.ok:
        return f"    {m.provider:<12} {m.note[:150]}"
    c, t = m.case, m.timing
    flops, nbytes = c.flops(), c.bytes()
    tf = formulas.tflops(flops, t.median) if flops else None
    floor = formulas.roofline_floor_s(flops, nbytes, peak, c.dtype)
    over = formulas.time_over_floor(t.median, floor) if floor else None
    mfloor = formulas.roofline_floor_s(flops, nbytes, measured, c.dtype)
    over_m = formulas.time_over_floor(t.median, mfloor) if mfloor else None
    vs_t = f"{m.speedup_vs_torch:8.2f}x" if m.speedup_vs_torch is not None else "        -"
    vs_p = f"{m.speedup_vs_peer:7.2f}x" if m.speedup_vs_peer is not None else "       -"
    spread = f"{t.p20:.4g}-{t.p80:.4g}"
    return (f"    {m.provider:<12} {t.median:>10.4g} {spread:>19} {_fmt(tf, '.3g', 8)} "
            f"{formulas.gbps(nbytes, t.median):>8.3g} {_fmt(over, '.3g', 8)} {_fmt(over_m, '.3g', 7)} {vs_t} {vs_p}")


def run_sweep(cases, provs, device, peak, *, out=None, deadline=None, cpu_budget_s=0.4, measured=None):
    """Measure every case, printing the case and one row per provider as it goes (stdout), with a progress
    bar and the time left (stderr).

    Stops early (cases left are reported as not run) when `deadline` (time.time()) passes.
    """
    out = out or sys.stdout          # looked up now: benchmarks.run replaces sys.stdout by a tee to run.log
    results = []
    progress.write(HEADER, file=out)
    with progress.bar(total=len(cases), desc="timing", unit="case") as bar:
        for i, case in enumerate(cases):
            if deadline is not None and time.time() > deadline:
                progress.write(f"time budget reached: {len(cases) - i} case(s) not run", file=out)
                break
            name = f"{case.op} {case.mode} {case.shape} {case.dtype}"
            bar.set_postfix_str(name)
            progress.write(f"[{i + 1}/{len(cases)}] {name}", file=out)
            ms = run_case(case, provs, device, seed=i, cpu_budget_s=cpu_budget_s)
            for m in ms:
                progress.write(format_measurement(m, peak, measured), file=out)
            results.extend(ms)
            bar.update()
    add_kv_speedups(results)
    return results


def summary(results) -> str:
    """Per (op, mode, provider): cases measured and the geometric mean speed-up vs torch."""
    groups = {}
    for m in results:
        key = (m.case.op, m.case.mode, m.provider)
        g = groups.setdefault(key, [0, 0, []])
        g[0] += 1
        if m.ok:
            g[1] += 1
            if m.speedup_vs_torch is not None:
                g[2].append(m.speedup_vs_torch)
    lines = [f"  {'op':<17} {'mode':<8} {'provider':<12} {'measured':>9}  {'geomean vs torch':>16}"]
    for (op, mode, prov), (n, ok, sp) in groups.items():
        gm = f"{math.exp(sum(map(math.log, sp)) / len(sp)):.2f}x" if sp else "-"
        lines.append(f"  {op:<17} {mode:<8} {prov:<12} {ok:>4}/{n:<4}  {gm:>16}")
    return "\n".join(lines)
