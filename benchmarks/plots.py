"""PNG plots from the benchmark CSV: throughput vs size per op, one line per backend, the roofline dashed.

    python -m benchmarks.plots benchmarks/results/<gpu>/bench.csv     # re-plot a CSV

One PNG per (op, dtype); one panel per (mode, fixed parameters), the swept size on a log2 x axis.
flash_attention is plotted in TFLOP/s, the memory-bound ops in GB/s. The roofline of a point is its
FLOPs (or bytes) divided by its roofline floor for the GPU of the run; without a peak (CPU, unknown GPU)
the panel says so instead. With measured ceilings (ceilings.csv of the run) a second roofline, dashed grey,
is drawn from them.
"""
from __future__ import annotations

import os
import sys

from . import formulas
from .cases import X_AXIS, Case
from .harness import parse_shape, read_csv

METRIC = {"flash_attention": ("throughput", "TFLOP/s"), "decode_attention": ("bandwidth", "GB/s"),
          "layer_norm": ("bandwidth", "GB/s"), "rms_norm": ("bandwidth", "GB/s")}
STYLE = {"reference": ("tab:gray", "x"), "torch": ("tab:blue", "o"), "triton": ("tab:red", "s"),
         "cuda": ("tab:green", "^")}


def _panels(rows, op):
    """{(mode, fixed-params string): {backend: [(x, y, p20, p80)]}} for one op's rows."""
    metric, _ = METRIC[op]
    xkey, varying = X_AXIS[op]
    panels = {}
    for r in rows:
        if r["metric"] != metric or r["median"] is None:
            continue
        params = parse_shape(r["shape"])
        fixed = " ".join(f"{k}={v}" for k, v in params.items() if k not in varying)
        panels.setdefault((r["mode"], fixed), {}).setdefault(r["backend"], []).append(
            (params[xkey], r["median"], r["p20"], r["p80"]))
    return panels


def _roofline(op, mode, dtype, fixed, xs, rows, peak):
    """Roofline throughput at each x of a panel (None without a peak)."""
    if peak is None:
        return None
    metric, _ = METRIC[op]
    shapes = {}
    for r in rows:
        if r["op"] == op and r["mode"] == mode and r["dtype"] == dtype:
            p = parse_shape(r["shape"])
            shapes[p[X_AXIS[op][0]], " ".join(f"{k}={v}" for k, v in p.items() if k not in X_AXIS[op][1])] = p
    ys = []
    for x in xs:
        p = shapes.get((x, fixed))
        if p is None:
            ys.append(float("nan"))
            continue
        c = Case(op, mode, tuple(p.items()), dtype)
        floor = formulas.roofline_floor_s(c.flops(), c.bytes(), peak, dtype)
        amount = c.flops() if metric == "throughput" else c.bytes()
        ys.append(amount / floor / (1e12 if metric == "throughput" else 1e9))
    return ys


def plot_csv_rows(rows, out_dir, peak=None, gpu="cpu", measured=None):
    """Write one PNG per (op, dtype) into out_dir; returns the paths. `peak`: the data-sheet roofline (dotted
    black); `measured`: the roofline of the measured ceilings (dashed grey)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for op in METRIC:
        for dtype in sorted({r["dtype"] for r in rows if r["op"] == op}):
            sel = [r for r in rows if r["op"] == op and r["dtype"] == dtype]
            panels = _panels(sel, op)
            if not panels:
                continue
            order = list(panels)     # the sweep's order within a mode
            keys = sorted(panels, key=lambda k: (("fwd", "bwd", "fwd+bwd").index(k[0]), order.index(k)))
            ncols = min(len(keys), 3)
            nrows = -(-len(keys) // ncols)
            fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.8 * nrows), squeeze=False)
            metric, unit = METRIC[op]
            for ax, (mode, fixed) in zip(axes.flat, keys):
                xs_all = sorted({pt[0] for pts in panels[(mode, fixed)].values() for pt in pts})
                for backend, pts in sorted(panels[(mode, fixed)].items()):
                    pts.sort()
                    color, marker = STYLE.get(backend, (None, "d"))
                    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
                    lo = [max(0.0, y - p[2]) for y, p in zip(ys, pts)]
                    hi = [max(0.0, p[3] - y) for y, p in zip(ys, pts)]
                    ax.errorbar(xs, ys, yerr=[lo, hi], label=backend, color=color, marker=marker,
                                linestyle="--" if backend not in STYLE else "-", capsize=2)
                roof = _roofline(op, mode, dtype, fixed, xs_all, sel, peak)
                mroof = _roofline(op, mode, dtype, fixed, xs_all, sel, measured)
                if mroof is not None:
                    ax.plot(xs_all, mroof, color="gray", linestyle="--", linewidth=1.2,
                            label=f"roofline ({measured.name})")
                if roof is not None:
                    ax.plot(xs_all, roof, color="black", linestyle=":", linewidth=1.5, label=f"roofline ({peak.name})")
                else:
                    ax.text(0.02, 0.97, "no roofline: " + ("CPU run" if gpu == "cpu" else "GPU not in the peak table"),
                            transform=ax.transAxes, fontsize=7, va="top", color="gray")
                ax.set_xscale("log", base=2)
                ax.set_xlabel(X_AXIS[op][0])
                ax.set_ylabel(unit)
                ax.set_title(f"{mode}: {fixed}", fontsize=8)
                ax.grid(True, alpha=0.3)
                ax.legend(fontsize=7)
            for ax in list(axes.flat)[len(keys):]:
                ax.axis("off")
            fig.suptitle(f"{op} {dtype} -- {metric} ({unit}) vs {X_AXIS[op][0]}" + f" -- {gpu}",
                         fontsize=10)
            fig.tight_layout()
            path = os.path.join(out_dir, f"{op}_{dtype}.png")
            fig.savefig(path, dpi=90)
            plt.close(fig)
            paths.append(path)
    return paths


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m benchmarks.plots PATH/bench.csv", file=sys.stderr)
        return 2
    rows = read_csv(argv[0])
    gpu = rows[0]["gpu"] if rows else "cpu"
    folder = os.path.dirname(os.path.abspath(argv[0]))
    measured = formulas.measured_peak(formulas.read_ceilings(os.path.join(folder, formulas.CEILINGS_FILE)), gpu)
    for p in plot_csv_rows(rows, folder, formulas.lookup_peak(gpu), gpu, measured):
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
