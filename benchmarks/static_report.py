"""The kernel report of benchmarks.kernel_report, printed row by row as each kernel compiles.

    python -m benchmarks.static_report [--json PATH] [--no-cuda]

Same numbers as `python -m benchmarks.kernel_report` (it calls its compile_triton / nvcc_report), but a
row appears as soon as its kernel is compiled, so a run cut short by a time budget still shows what was
done. No GPU needed.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import sys

from . import kernel_report as kr


def _configs_of(mod):
    """AotConfigs of one Triton kernel module ([] when the module does not exist yet)."""
    try:
        m = importlib.import_module(mod)
    except ModuleNotFoundError as e:
        if e.name == mod:
            return []
        raise
    if not hasattr(m, "aot_configs"):
        raise AttributeError(f"{mod} has no aot_configs() yet")
    return list(m.aot_configs())


def _row(stat):
    return kr.format_table([stat]).splitlines()[-1]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="also write the stats as JSON to this path")
    ap.add_argument("--no-cuda", action="store_true", help="skip the nvcc part")
    args = ap.parse_args(argv)
    header = "\n".join(kr.format_table([]).splitlines()[:2])
    stats = []

    def dump():
        if args.json:
            with open(args.json, "w") as f:
                json.dump([dict(dataclasses.asdict(s), occupancy=s.occupancy()) for s in stats], f, indent=1)

    print("Triton kernels (triton.compile for sm_80/sm_90, ptxas -v from the triton wheel):", flush=True)
    cfgs = []
    for mod in kr.TRITON_MODULES:   # module by module, so one unfinished module does not hide the others
        try:
            cfgs.extend(_configs_of(mod))
        except Exception as e:
            print(f"  {mod}: no configs listed ({type(e).__name__}: {str(e)[:200]})", flush=True)
    if cfgs:
        print(header, flush=True)
    else:
        print("  (no Triton kernel module with aot_configs() yet)", flush=True)
    for cfg in cfgs:
        for arch in kr.ARCHS:
            if arch in cfg.archs:
                st = kr.compile_triton(cfg, arch)
                stats.append(st)
                print(_row(st), flush=True)
                dump()
    if not args.no_cuda:
        print("\nCUDA C++ kernels (nvcc -Xptxas -v for sm_80 / sm_90a, SASS markers via cuobjdump):", flush=True)
        sources = kr.cuda_sources()
        if not os.path.exists(kr._nvcc()):
            print(f"  nvcc not found at {kr._nvcc()}: skipped", flush=True)
        elif not sources:
            print("  (no .cu file yet)", flush=True)
        else:
            print(header, flush=True)
            for src in sources:
                for arch in kr.ARCHS:
                    try:
                        got = kr.nvcc_report([src], archs=(arch,))
                    except Exception as e:
                        got = [kr.KernelStats(name=os.path.relpath(src, kr.ROOT), arch=arch,
                                              error=f"{type(e).__name__}: {str(e)[-300:]}")]
                    for st in got:
                        stats.append(st)
                        print(_row(st), flush=True)
                    dump()
    bad = [s for s in stats if s.error or s.spills]
    print(f"\n  {len(stats)} kernel x arch entries; {sum(1 for s in stats if s.spills)} with spills, "
          f"{sum(1 for s in stats if s.error)} errors", flush=True)
    dump()
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
