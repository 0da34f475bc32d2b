"""Static kernel report: compile every shipped kernel ahead of time for sm_80 and sm_90, no GPU needed.

For Triton kernels: each module in ``TRITON_MODULES`` lists its shipped configs in ``aot_configs()``
(``triton_kernels._utils.AotConfig``). Each is compiled with ``triton.compile`` for a GPUTarget; the PTX
is then run through ptxas -v (the one shipped in the triton wheel) for registers, spills and local
memory; shared memory comes from Triton's metadata; the instruction mix is counted in the PTX.

For CUDA kernels: ``cuda_report()`` reads the per-kernel resource usage and SASS of the built
extension transformer._C (``extension_report``, cuobjdump from the triton wheel) when it is newer than
csrc/, else ``nvcc_report(sources)`` compiles each .cu (no torch headers) with ``-Xptxas -v`` for
sm_80/sm_90a and parses ptxas' report.

    python -m benchmarks.kernel_report                 # the whole table
    python -m benchmarks.kernel_report --only norm     # a subset (Triton config / .cu file names with "norm")
Kernel names are printed in full: one longer than the kernel column has a line of its own, its numbers
on the next. A progress bar with the time left goes to stderr, the table to stdout.
Tests (``-m static``) call ``triton_report`` / ``nvcc_report`` and assert 0 spills and smem limits.
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile

from . import progress

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRITON_MODULES = ("triton_kernels.attention", "triton_kernels.norms", "triton_kernels.decode")
ARCHS = (80, 90)
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}       # bytes of shared memory per block
REGS_PER_SM = 65536
MAX_THREADS_PER_SM = {80: 2048, 90: 2048}
SMEM_PER_SM = {80: 164 * 1024, 90: 228 * 1024}
MARKERS = {  # name -> regex over PTX (Triton) text
    "mma.sync": r"\bmma\.sync\.aligned",
    "wgmma": r"\bwgmma\.mma_async",
    "tma": r"\bcp\.async\.bulk\.tensor",
    "cp.async": r"\bcp\.async\.(ca|cg)\.shared",
    "ldmatrix": r"\bldmatrix\.sync",
    "setmaxnreg": r"\bsetmaxnreg\.",      # warp specialization moving registers between warpgroups
}
# wgmma instruction shapes in PTX: each adds an "wgmma.m64nNk16"-style entry (count) to a Triton kernel's
# instructions, so the table shows the N of every product.
WGMMA_SHAPE = re.compile(r"\bwgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)")


def wgmma_shapes(ptx):
    """{"wgmma.m64nNkK": count} of the wgmma shapes in PTX text."""
    out = {}
    for shape in WGMMA_SHAPE.findall(ptx):
        out[f"wgmma.{shape}"] = out.get(f"wgmma.{shape}", 0) + 1
    return out


SASS_MARKERS = {"HMMA": r"\bHMMA\.", "HGMMA": r"\bHGMMA\.", "UTMALDG": r"\bUTMALDG", "LDSM": r"\bLDSM\b",
                "USETMAXREG": r"\bUSETMAXREG\b", "UTMASTG": r"\bUTMASTG", "SYNCS": r"\bSYNCS\.",
                # named-barrier arrive (bar.arrive); a wgmma.wait_group 1 (one commit group left in flight)
                "BAR.ARV": r"\bBAR\.ARV\b", "GSB.WAIT1": r"\bWARPGROUP\.DEPBAR\.LE\s+gsb0,\s*0x1\b"}
# HGMMA shapes in SASS ("HGMMA.64x128x16.F32.BF16"): an "HGMMA.64xNx16" entry (count) per shape, as wgmma_shapes.
HGMMA_SHAPE = re.compile(r"\bHGMMA\.(\d+x\d+x\d+)")
STATS_VERSION = 4       # part of the static report's cache key: bump when what KernelStats holds changes


def hgmma_shapes(sass):
    """{"HGMMA.64xNxK": count} of the warpgroup MMA shapes in SASS text."""
    out = {}
    for shape in HGMMA_SHAPE.findall(sass):
        out[f"HGMMA.{shape}"] = out.get(f"HGMMA.{shape}", 0) + 1
    return out


def sass_counts(body):
    """SASS_MARKERS counts and HGMMA shapes of one kernel's SASS."""
    out = {k: len(re.findall(p, body)) for k, p in SASS_MARKERS.items()}
    out.update(hgmma_shapes(body))
    return out


def mma_n_widths(instructions):
    """Sorted N widths of the warpgroup MMAs named in a KernelStats.instructions dict ("wgmma.m64nNk16" from
    PTX, "HGMMA.64xNx16" from SASS); [] when there are none."""
    widths = set()
    for key, count in instructions.items():
        m = re.match(r"wgmma\.m\d+n(\d+)k\d+$|HGMMA\.\d+x(\d+)x\d+$", key)
        if m and count:
            widths.add(int(m.group(1) or m.group(2)))
    return sorted(widths)


@dataclasses.dataclass
class KernelStats:
    name: str
    arch: int
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    local_bytes: int = 0          # stack frame / lmem
    smem: int = 0
    num_warps: int = 0
    instructions: dict = dataclasses.field(default_factory=dict)
    error: str = ""

    @property
    def spills(self):
        return self.spill_stores + self.spill_loads

    def occupancy(self):
        """Upper bound on resident warps per SM from registers, shared memory and threads (fraction of 64)."""
        if not self.num_warps or self.error:
            return 0.0
        threads = self.num_warps * 32
        by_regs = REGS_PER_SM // max(1, self.registers * threads) if self.registers else 32
        by_smem = SMEM_PER_SM[self.arch] // self.smem if self.smem else 32
        by_threads = MAX_THREADS_PER_SM[self.arch] // threads
        blocks = max(0, min(by_regs, by_smem, by_threads, 32))
        return min(1.0, blocks * self.num_warps / 64)


# ---------------------------------------------------------------------------------------------
# ptxas output parsing (shared by Triton and nvcc)
# ---------------------------------------------------------------------------------------------

_FN_RE = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'|Function properties for (\S+)")
_USED_RE = re.compile(r"Used (\d+) registers")
_SPILL_RE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_SMEM_RE = re.compile(r"(\d+) bytes smem")
_LMEM_RE = re.compile(r"(\d+) bytes lmem")


def parse_ptxas_log(text):
    """{kernel name: dict(registers, spill_stores, spill_loads, stack, smem, lmem)} from ptxas -v output."""
    out, cur = {}, None
    for line in text.splitlines():
        m = _FN_RE.search(line)
        if m:
            cur = m.group(1) or m.group(3)
            out.setdefault(cur, dict(registers=0, spill_stores=0, spill_loads=0, stack=0, smem=0, lmem=0))
            continue
        if cur is None:
            continue
        s = _SPILL_RE.search(line)
        if s:
            out[cur].update(stack=int(s.group(1)), spill_stores=int(s.group(2)), spill_loads=int(s.group(3)))
        u = _USED_RE.search(line)
        if u:
            out[cur]["registers"] = int(u.group(1))
            sm = _SMEM_RE.search(line)
            if sm:
                out[cur]["smem"] = int(sm.group(1))
            lm = _LMEM_RE.search(line)
            if lm:
                out[cur]["lmem"] = int(lm.group(1))
    return out


def _triton_bin(name):
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def sass_markers(binary_path):
    """Counts of tensor-core / TMA instructions in the SASS of a cubin or .so (cuobjdump from the triton wheel)."""
    res = subprocess.run([_triton_bin("cuobjdump"), "-sass", binary_path], capture_output=True, text=True)
    text = res.stdout
    return {k: len(re.findall(p, text)) for k, p in SASS_MARKERS.items()}


def sass_markers_by_kernel(binary_path):
    """{mangled kernel name: {marker: count}} from the SASS of a cubin (cuobjdump from the triton wheel)."""
    res = subprocess.run([_triton_bin("cuobjdump"), "-sass", binary_path], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"cuobjdump -sass {binary_path} failed: {res.stderr[-1000:]}")
    out = {}
    for chunk in re.split(r"^\s*Function : ", res.stdout, flags=re.M)[1:]:
        name, _, body = chunk.partition("\n")
        out[name.strip()] = sass_counts(body)
    return out


# ---------------------------------------------------------------------------------------------
# Triton
# ---------------------------------------------------------------------------------------------

def triton_configs():
    """All AotConfigs of the Triton kernel modules that exist so far."""
    cfgs = []
    for mod in TRITON_MODULES:
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name == mod:
                continue
            raise
        cfgs.extend(m.aot_configs())
    return cfgs


def compile_triton(cfg, arch):
    """KernelStats of one AotConfig for one arch (sm_80 or sm_90)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    st = KernelStats(name=cfg.name, arch=arch, num_warps=cfg.num_warps)
    try:
        attrs = cfg.attrs() if getattr(cfg, "divisible", ()) else None
        src = ASTSource(fn=cfg.kernel, signature=cfg.signature, constexprs=cfg.constexprs, attrs=attrs)
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                           options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
                                    **getattr(cfg, "options", {})})
    except Exception as e:  # report, the test turns it into a failure
        st.error = f"{type(e).__name__}: {str(e)[:400]}"
        return st
    ptx = k.asm["ptx"]
    st.smem = int(k.metadata.shared)
    st.num_warps = getattr(k.metadata, "num_warps", cfg.num_warps)   # warp specialization adds warps
    st.instructions = {name: len(re.findall(p, ptx)) for name, p in MARKERS.items()}
    st.instructions.update(wgmma_shapes(ptx))
    sm = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        res = subprocess.run([_triton_bin("ptxas"), "-v", f"-arch={sm}", path, "-o", os.path.join(d, "k.cubin")],
                             capture_output=True, text=True)
    if res.returncode != 0:
        st.error = "ptxas: " + res.stderr[-400:]
        return st
    stats = parse_ptxas_log(res.stderr + res.stdout)
    if stats:
        s = next(iter(stats.values()))
        st.registers, st.spill_stores, st.spill_loads = s["registers"], s["spill_stores"], s["spill_loads"]
        st.local_bytes = s["stack"] + s["lmem"]
    return st


def triton_report(archs=ARCHS, configs=None):
    return [compile_triton(c, a) for c in (configs if configs is not None else triton_configs())
            for a in archs if a in c.archs]


# ---------------------------------------------------------------------------------------------
# CUDA C++ (nvcc)
# ---------------------------------------------------------------------------------------------

def cuda_sources():
    return sorted(glob.glob(os.path.join(ROOT, "csrc", "**", "*.cu"), recursive=True))


def _nvcc():
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    return os.path.join(home, "bin", "nvcc")


@functools.lru_cache(maxsize=None)
def _nvcc_compile(source, arch, digest):
    """(ptxas log, cubin path) of one .cu for one arch; cached on disk by the hash of csrc/."""
    cache = os.path.join(tempfile.gettempdir(), "tileformer-static", digest)
    os.makedirs(cache, exist_ok=True)
    stem = os.path.relpath(source, ROOT).replace("/", "_")
    cubin, log = os.path.join(cache, f"{stem}.sm{arch}.cubin"), os.path.join(cache, f"{stem}.sm{arch}.log")
    if not (os.path.exists(cubin) and os.path.exists(log)):
        gencode = "arch=compute_90a,code=sm_90a" if arch == 90 else f"arch=compute_{arch},code=sm_{arch}"
        cmd = [_nvcc(), "-cubin", "-O3", "-std=c++20", "--use_fast_math", "--expt-relaxed-constexpr",
               f"-gencode={gencode}", "-Xptxas=-v,-warn-spills,-warn-lmem-usage",
               "-I", os.path.join(ROOT, "csrc"), source, "-o", cubin]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"nvcc failed for {source} sm_{arch}:\n{res.stderr[-3000:]}")
        with open(log, "w") as f:
            f.write(res.stdout + res.stderr)
    with open(log) as f:
        return f.read(), cubin


def _csrc_digest():
    h = hashlib.sha1()
    for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "**", "*"), recursive=True)):
        if os.path.isfile(p):
            h.update(p.encode())
            with open(p, "rb") as f:
                h.update(f.read())
    return h.hexdigest()[:16]


def nvcc_report(sources=None, archs=ARCHS):
    """KernelStats for every kernel of every .cu in csrc/, per arch, with SASS tensor-core markers."""
    digest = _csrc_digest()
    out = []
    for src in sources if sources is not None else cuda_sources():
        for arch in archs:
            log, cubin = _nvcc_compile(src, arch, digest)
            markers = sass_markers_by_kernel(cubin)
            for name, s in parse_ptxas_log(log).items():
                out.append(KernelStats(name=f"{os.path.basename(src)}:{_demangle_short(name)}", arch=arch,
                                       registers=s["registers"], spill_stores=s["spill_stores"],
                                       spill_loads=s["spill_loads"], local_bytes=s["stack"] + s["lmem"],
                                       smem=s["smem"], instructions=markers.get(name, {})))
    return out


_RES_FN_RE = re.compile(r"^\s*Function (\S+):\s*$")
_RES_VAL_RE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def _cuobjdump_sections(text):
    """Split cuobjdump output into (arch, source identifier, section text) per embedded ELF."""
    parts = re.split(r"^Fatbin elf code:\s*\n=+\s*$", text, flags=re.M)[1:]
    out = []
    for part in parts:
        arch = re.search(r"^arch = sm_(\d+)", part, flags=re.M)
        ident = re.search(r"^identifier = (.+)$", part, flags=re.M)
        out.append((int(arch.group(1)) if arch else 0, ident.group(1).strip() if ident else "?", part))
    return out


def extension_report(binary_path, sass_kernels=(), archs=None):
    """KernelStats of every kernel embedded in a built extension (.so) or object, per arch, without
    recompiling: registers / stack / shared / local from ``cuobjdump -res-usage`` (triton wheel's
    cuobjdump); spills show up as stack or local memory (local_bytes). SASS markers (HMMA, LDSM, ...)
    are read only for kernels whose demangled name contains one of ``sass_kernels`` (disassembling a
    whole extension takes minutes), and only for `archs` (all when None)."""
    res = subprocess.run([_triton_bin("cuobjdump"), "-res-usage", binary_path], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"cuobjdump -res-usage {binary_path} failed: {res.stderr[-1000:]}")
    rows = []
    for arch, ident, part in _cuobjdump_sections(res.stdout):
        name = None
        for line in part.splitlines():
            m = _RES_FN_RE.match(line)
            if m:
                name = m.group(1)
                continue
            v = _RES_VAL_RE.search(line)
            if v and name:
                rows.append((arch, ident, name, [int(g) for g in v.groups()]))
                name = None
    names = _demangle_many([r[2] for r in rows])
    markers = {}
    for arch in sorted({r[0] for r in rows}):
        if archs is not None and arch not in archs:
            continue
        wanted = sorted({r[2] for r, short in zip(rows, names) if r[0] == arch
                         and any(k in short for k in sass_kernels)})
        if not wanted:
            continue
        sm = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
        sass = subprocess.run([_triton_bin("cuobjdump"), "-sass", "-arch", sm, "-fun", ",".join(wanted), binary_path],
                              capture_output=True, text=True).stdout
        for chunk in re.split(r"^\s*Function : ", sass, flags=re.M)[1:]:
            fname, _, body = chunk.partition("\n")
            markers[(arch, fname.strip())] = sass_counts(body)
    out = []
    for (arch, ident, name, (regs, stack, shared, local)), short in zip(rows, names):
        out.append(KernelStats(name=f"{os.path.basename(ident)}:{short}", arch=arch, registers=regs,
                               local_bytes=stack + local, smem=shared, instructions=markers.get((arch, name), {})))
    return out


def _demangle_many(names):
    try:
        res = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True)
        full = res.stdout.splitlines()
        if len(full) != len(names):
            raise OSError("c++filt output does not match")
    except OSError:
        full = names
    return full


def built_extension():
    """Path of the built GPU extension transformer._C if it is newer than every file of csrc/, else None."""
    so = sorted(glob.glob(os.path.join(ROOT, "transformer", "_C.*.so")))
    if not so:
        return None
    newest_src = max((os.path.getmtime(p) for p in glob.glob(os.path.join(ROOT, "csrc", "**", "*"), recursive=True)
                      if os.path.isfile(p) and p.endswith((".cu", ".cuh", ".h", ".cpp"))), default=0)
    return so[0] if os.path.getmtime(so[0]) >= newest_src else None


def cuda_report(archs=ARCHS, sass_kernels=()):
    """Stats of every CUDA C++ kernel: read from the built extension when it is up to date (no compile;
    SASS markers only for ``sass_kernels``), else compiled with nvcc (nvcc_report, all markers)."""
    so = built_extension()
    if so is not None:
        return [s for s in extension_report(so, sass_kernels) if s.arch in archs]
    return nvcc_report(archs=archs)


def _demangle_short(name):
    """The demangled name (c++filt), in full; the mangled one without c++filt."""
    try:
        res = subprocess.run(["c++filt", name], capture_output=True, text=True)
        return res.stdout.strip() or name
    except OSError:
        return name


# ---------------------------------------------------------------------------------------------
# Printing
# ---------------------------------------------------------------------------------------------

def _register_bound(s):
    """Occupancy bound from registers alone (warps per SM / 64), for kernels whose block size is unknown here."""
    if not s.registers:
        return 1.0
    return min(1.0, REGS_PER_SM // (s.registers * 32) / 64)


NAME_WIDTH = 58


def format_header():
    head = (f"{'kernel':<{NAME_WIDTH}} {'arch':>5} {'regs':>5} {'spill':>6} {'lmem':>5} {'smem KB':>8} {'occ':>5}"
            "  instructions")
    return head + "\n" + "-" * len(head)


def format_row(s):
    """One kernel x arch as table text. A name longer than the kernel column is printed in full on a line of
    its own, and the numbers follow on the next line under the columns: names are never cut."""
    if s.error:
        cols = f"sm_{s.arch:<2} ERROR {s.error[:120]}"
    else:
        instr = ", ".join(f"{k}={v}" for k, v in s.instructions.items() if v)
        occ = f"{s.occupancy():>5.0%}" if s.num_warps else f"{_register_bound(s):>5.0%}"
        cols = (f"sm_{s.arch:<2} {s.registers:>5} {s.spills:>6} {s.local_bytes:>5} {s.smem / 1024:>8.1f} {occ}  "
                f"{instr}").rstrip()
    if len(s.name) <= NAME_WIDTH:
        return f"{s.name:<{NAME_WIDTH}} {cols}"
    return f"{s.name}\n{'':<{NAME_WIDTH}} {cols}"


def format_table(stats):
    return "\n".join([format_header()] + [format_row(s) for s in stats])


def matches(only, name):
    """--only: no filter when empty, else a substring of `name` (a Triton config name or a .cu file name)."""
    return not only or only in name


def main(argv=None):
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="also write the stats as JSON to this path")
    ap.add_argument("--no-cuda", action="store_true", help="skip the CUDA C++ part")
    ap.add_argument("--only", default="", metavar="TEXT",
                    help="only the Triton configs whose name contains TEXT and the CUDA kernels of the .cu files "
                         "whose name contains TEXT")
    args = ap.parse_args(argv)
    jobs = [(c, a) for c in triton_configs() if matches(args.only, c.name) for a in ARCHS if a in c.archs]
    stats = []
    with progress.bar(total=len(jobs), desc="Triton configs x arch", unit="kernel") as bar:
        for cfg, arch in jobs:
            bar.set_postfix_str(f"{cfg.name} sm_{arch}")
            stats.append(compile_triton(cfg, arch))
            bar.update()
    print("Triton kernels (triton.compile for sm_80/sm_90, ptxas -v):")
    print(format_table(stats) if stats else f"  (no Triton config{' matches --only' if args.only else ''})")
    if not args.no_cuda:
        print("\nCUDA C++ kernels (nvcc -Xptxas -v, SASS via cuobjdump):")
        if not os.path.exists(_nvcc()):
            print(f"  nvcc not found at {_nvcc()}: skipped")
        else:
            so = built_extension()
            if so is not None:   # one cuobjdump over the built extension: no compile, no progress to show
                cstats = [s for s in extension_report(so) if matches(args.only, s.name.split(":", 1)[0])]
            else:
                cjobs = [(src, a) for src in cuda_sources() if matches(args.only, os.path.basename(src))
                         for a in ARCHS]
                cstats = []
                with progress.bar(total=len(cjobs), desc="CUDA files x arch", unit="file") as bar:
                    for src, arch in cjobs:
                        bar.set_postfix_str(f"{os.path.relpath(src, ROOT)} sm_{arch}")
                        cstats += nvcc_report([src], archs=(arch,))
                        bar.update()
            stats += cstats
            print(format_table(cstats) if cstats else f"  (no CUDA kernel{' matches --only' if args.only else ''})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(s) for s in stats], f, indent=1)
    bad = [s for s in stats if s.error or s.spills]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
