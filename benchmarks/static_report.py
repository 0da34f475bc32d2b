"""The kernel report of benchmarks.kernel_report, printed row by row as each kernel compiles.

    python -m benchmarks.static_report [--json PATH] [--no-cuda] [--only TEXT] [--deadline EPOCH]

Same numbers and table as `python -m benchmarks.kernel_report` (it calls its compile_triton / nvcc_report /
format_row), but a row appears as soon as its kernel is compiled, so a run cut short by a time budget still
shows what was done. A progress bar with the time left (Triton configs x arch, then CUDA files x arch) goes
to stderr. No GPU needed.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import glob
import hashlib
import importlib
import json
import os
import sys
import tempfile
import time

from . import kernel_report as kr
from . import progress

CACHE_DIR = os.path.join(tempfile.gettempdir(), "tileformer-static", "triton-stats")


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


@functools.lru_cache(maxsize=1)
def _kernel_sources_digest():
    """Hash of every triton_kernels/*.py: kernels call @triton.jit helpers from sibling files."""
    h = hashlib.sha1()
    for path in sorted(glob.glob(os.path.join(kr.ROOT, "triton_kernels", "*.py"))):
        with open(path, "rb") as f:
            h.update(path.encode() + f.read())
    return h.hexdigest()


def _cache_path(cfg, arch):
    """Stats cache file of one config x arch, keyed by the Triton kernel sources, the config and the triton
    version: a second report over unchanged kernels needs no compile."""
    import triton
    h = hashlib.sha1(_kernel_sources_digest().encode())
    h.update(repr((cfg.name, arch, sorted(cfg.signature.items()), sorted(map(repr, cfg.constexprs.items())),
                   cfg.num_warps, cfg.num_stages, triton.__version__, kr.STATS_VERSION)).encode())
    return os.path.join(CACHE_DIR, h.hexdigest() + ".json")


def compile_cached(cfg, arch):
    """kernel_report.compile_triton, with successful results cached on disk."""
    path = _cache_path(cfg, arch)
    if os.path.exists(path):
        with open(path) as f:
            return kr.KernelStats(**json.load(f)), True
    st = kr.compile_triton(cfg, arch)
    if not st.error:
        os.makedirs(CACHE_DIR, exist_ok=True)
        with open(path, "w") as f:
            json.dump(dataclasses.asdict(st), f)
    return st, False


def _round_robin(lists):
    """Interleave lists (one per kernel module), so a report cut short still covers every module."""
    out = []
    for i in range(max((len(x) for x in lists), default=0)):
        out.extend(x[i] for x in lists if i < len(x))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="also write the stats as JSON to this path")
    ap.add_argument("--no-cuda", action="store_true", help="skip the nvcc part")
    ap.add_argument("--only", default="", metavar="TEXT",
                    help="only the Triton configs whose name contains TEXT and the .cu files whose name contains TEXT")
    ap.add_argument("--deadline", type=float, default=0.0,
                    help="time.time() after which nothing more is compiled (55%% of the time left for Triton)")
    args = ap.parse_args(argv)
    header = kr.format_header()
    stats, not_done, n_cached = [], [], 0

    def dump():
        if args.json:
            with open(args.json, "w") as f:
                json.dump([dict(dataclasses.asdict(s), occupancy=s.occupancy()) for s in stats], f, indent=1)

    def out_of_time(until):
        return bool(until) and time.time() > until

    print("Triton kernels (triton.compile for sm_80/sm_90, ptxas -v from the triton wheel):", flush=True)
    per_module = []
    for mod in kr.TRITON_MODULES:   # module by module, so one unfinished module does not hide the others
        try:
            per_module.append([(c, a) for c in _configs_of(mod) if kr.matches(args.only, c.name)
                               for a in kr.ARCHS if a in c.archs])
        except Exception as e:
            print(f"  {mod}: no configs listed ({type(e).__name__}: {str(e)[:200]})", flush=True)
    jobs = _round_robin(per_module)
    jobs.sort(key=lambda job: not os.path.exists(_cache_path(*job)))     # cached first (stable: keeps the mix)
    sources = [] if args.no_cuda else [s_ for s_ in kr.cuda_sources() if kr.matches(args.only, os.path.basename(s_))]
    triton_until = args.deadline
    if args.deadline and sources:
        triton_until = time.time() + 0.55 * max(0.0, args.deadline - time.time())
    print(header if jobs else "  (no Triton config matches --only)" if args.only
          else "  (no Triton kernel module with aot_configs() yet)", flush=True)
    with progress.bar(total=len(jobs), desc="Triton configs x arch", unit="kernel") as bar:
        for cfg, arch in jobs:
            if out_of_time(triton_until):
                not_done.append(f"{cfg.name} sm_{arch}")
                bar.update()
                continue
            bar.set_postfix_str(f"{cfg.name} sm_{arch}")
            st, cached = compile_cached(cfg, arch)
            n_cached += cached
            stats.append(st)
            progress.write(kr.format_row(st))
            dump()
            bar.update()
    skipped = bool(not_done)
    if not_done:
        print(f"\n  Triton: not compiled within the time budget ({len(not_done)}): " + "; ".join(not_done), flush=True)
        not_done = []
    if not args.no_cuda:
        print("\nCUDA C++ kernels (nvcc -Xptxas -v for sm_80 / sm_90a, SASS markers via cuobjdump; "
              "occ: register-limited bound, the block size is not known statically):", flush=True)
        if not os.path.exists(kr._nvcc()):
            print(f"  nvcc not found at {kr._nvcc()}: skipped", flush=True)
        elif not sources:
            print("  (no .cu file matches --only)" if args.only else "  (no .cu file yet)", flush=True)
        else:
            print(header, flush=True)
            cjobs = [(s_, a) for s_ in sources for a in kr.ARCHS]
            with progress.bar(total=len(cjobs), desc="CUDA files x arch", unit="file") as bar:
                for src, arch in cjobs:
                    if out_of_time(args.deadline):
                        not_done.append(f"{os.path.relpath(src, kr.ROOT)} sm_{arch}")
                        bar.update()
                        continue
                    bar.set_postfix_str(f"{os.path.relpath(src, kr.ROOT)} sm_{arch}")
                    try:
                        got = kr.nvcc_report([src], archs=(arch,))
                    except Exception as e:
                        got = [kr.KernelStats(name=os.path.relpath(src, kr.ROOT), arch=arch,
                                              error=f"{type(e).__name__}: {str(e)[-300:]}")]
                    for st in got:
                        stats.append(st)
                        progress.write(kr.format_row(st))
                    dump()
                    bar.update()
    if not_done:
        print(f"\n  CUDA: not compiled within the time budget ({len(not_done)}): " + "; ".join(not_done), flush=True)
    if skipped or not_done:
        print("  (run `python -m benchmarks.static_report` without --deadline once: results are cached by "
              "source hash, so the next report over unchanged kernels is quick)", flush=True)
    bad = [s for s in stats if s.error or s.spills]
    print(f"\n  {len(stats)} kernel x arch entries ({n_cached} Triton entries from the cache); "
          f"{sum(1 for s in stats if s.spills)} with spills, {sum(1 for s in stats if s.error)} errors", flush=True)
    dump()
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
