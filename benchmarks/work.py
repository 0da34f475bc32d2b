"""Counted work of our kernels without a GPU: tensor-core FLOPs and bytes per kernel, with its static facts.

    python -m benchmarks.work [--out DIR] [--deadline EPOCH] [--no-static] [--report-json PATH]

For one representative size per op and mode (attention fwd and bwd at B=1, H=2, N=1024, D=64, causal off and
on; decode over 4096 cached tokens, group 1 contiguous and group 8 paged; layer_norm and rms_norm fwd and bwd
at 256 x 2048; bf16), every Triton path (the triton backend and its variants, benchmarks/providers.py) runs
once under the Triton interpreter in a subprocess (TRITON_INTERPRET=1), counted by benchmarks/interp_count.py:

* FLOPs executed: 2 * M * N * K of every tl.dot, per kernel, over the op's ideal FLOPs (formulas.py, the
  flash-attn convention: attention fwd 4*B*H*N^2*D halved when causal, bwd 2.5x; decode 4*B*Hq*L*D). Above
  1: recomputation (the backward's S = QK^T once more, dQ by a separate kernel) and whole tiles on a causal
  diagonal or past a sequence end (a 16-row tile for a 1-row GQA group);
* bytes moved: elements loaded, stored and updated atomically (masked-off ones excluded) times their size,
  over the op's minimum bytes (each tensor once, formulas.py): above 1, re-reads of K/V per query tile,
  the fp32 dQ accumulator, partial results of split kernels. These are requests to global memory (L2 or
  HBM), before any cache reuse.

The attention and norm kernels run with their first sm_90 config (tile sizes) instead of the interpreter's
own, so the counts are those of the GPU's tiles (the GPU autotunes among the listed entries). Each Triton
kernel's static facts for sm_90 come from the kernel report (benchmarks/kernel_report.py, compiled ahead of
time, cached by source hash): the shipped config with the same kernel and tiles, its tensor-core instruction
(wgmma or mma.sync) and wgmma N widths, TMA, setmaxnreg, registers, spills, shared memory and occupancy. The
shipped configs are compiled with their heaviest features on (e.g. causal + ALiBi), so registers and spills
are upper bounds for a plainer call.

The CUDA kernels get their static facts only (from the built extension when it is newer than csrc/, else
from --report-json, an earlier kernel_report.json). Their executed matrix work is counted by the emulator's
mma counter in tests/test_cuda_attention_bwd_paths.py (backward: 5 products per tile pair by default, 7 with
deterministic=True; 7 / 9 at D = 256, whose dK/dV blocks split the columns).

Writes work.txt (this output), work.csv (one row per path x kernel, plus a "total" row per path) and
work.png (FLOPs executed / ideal and bytes moved / minimum per op and path) under --out. --deadline: no
new case starts and no new compile after that time.time().
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time

CSV_COLUMNS = ("path", "op", "mode", "shape", "dtype", "kernel", "launches", "programs", "tiles", "dot_shapes",
               "dot_flops", "ideal_flops", "flops_over_ideal", "load_bytes", "store_bytes", "atomic_bytes",
               "min_bytes", "bytes_over_min", "static_from", "mma", "wgmma_n", "tma", "setmaxnreg", "registers",
               "spills", "smem_bytes", "occupancy", "note")
ARCH = 90
CUDA_NOTE = "static facts only (mma counts: tests/test_cuda_attention_bwd_paths.py)"
# CUDA kernels serving each op for the work cases (demangled-name regexes; {T} the element type, {D} the head
# dim): the default tiles (8-warp forward) or, with cuda-fwd-w4, the 4-warp forward.
CUDA_KERNELS = {
    ("flash_attention", "fwd"): (r"attn_fwd_kernel<{T}, {D}, \d+, \d+, 8, ",),
    ("flash_attention", "bwd"): (r"attn_bwd_preprocess_kernel<{T}>", r"attn_bwd_dkdvdq_kernel<{T}, {D}, ",
                                 r"attn_bwd_dq_convert_kernel<{T}>"),   # the default (deterministic=False)
    ("layer_norm", "fwd"): (r"norm_fwd_kernel<{T}, ",),
    ("layer_norm", "bwd"): (r"norm_bwd_kernel<{T}, ", r"norm_reduce_kernel"),
    ("rms_norm", "fwd"): (r"norm_fwd_kernel<{T}, ",),
    ("rms_norm", "bwd"): (r"norm_bwd_kernel<{T}, ", r"norm_reduce_kernel"),
}
# On sm_90 the dense forward of head dims 64 / 128 / 256 runs the sm_90a kernel (TILEFORMER_CUDA_ATTN_FWD=auto);
# cuda-fwd-sm80 and cuda-fwd-w4 force the sm_80 one. The default backward of head dims 64 / 128 runs the sm_90a
# dK/dV + dQ kernel (TILEFORMER_CUDA_ATTN_BWD=auto); cuda-bwd-sm80 forces the sm_80 one.
CUDA_SM90_FWD = r"attn_fwd_sm90_kernel<{T}, {D}, 128, \d+, 2>"
CUDA_SM90_BWD = (r"attn_bwd_preprocess_kernel<{T}>", r"attn_bwd_sm90_kernel<{T}, {D}, 64, 128, 2>",
                 r"attn_bwd_dq_convert_kernel<{T}>")
CUDA_TYPES = {"bf16": "__nv_bfloat16", "fp16": "__half"}
CUDA_KV_FORMATS = {None: 0, "int8": 1, "fp8_e4m3": 2}     # the decode kernels' KV template argument (KvFormat)


def work_cases():
    from . import cases
    att = [cases.attention_case(m, 1, 1024, 1024, 2, 2, 64, c) for c in (0, 1) for m in ("fwd", "bwd")]
    dec = [cases.decode_case(2, 4096, 8, 8, 64, 0), cases.decode_case(2, 4096, 8, 1, 64, cases.PAGE_SIZE),
           cases.decode_case(2, 4096, 8, 1, 64, cases.PAGE_SIZE, kv="int8")]
    norms = [cases.norm_case(op, m, 256, 2048) for op in ("layer_norm", "rms_norm") for m in ("fwd", "bwd")]
    return att + dec + norms


def cuda_patterns(case, path="cuda"):
    """Demangled-name regexes of the CUDA kernels that serve `case` on `path` (cuda, cuda-fwd-sm80, cuda-fwd-w4 or
    cuda-bwd-sm80) on ARCH."""
    p = case.p
    if case.op == "decode_attention":
        rows = (p["Hq"] // p["Hkv"]) * p["Sq"]
        kv = CUDA_KV_FORMATS[p.get("kv")]
        pats = (rf"decode_simt_kernel<{{T}}, {{D}}, {kv}>" if rows <= 4 else rf"decode_mma_kernel<{{T}}, {{D}}, {kv}>",
                r"decode_combine_kernel<{T}>")
    elif (case.op, case.mode) == ("flash_attention", "fwd") and path in ("cuda", "cuda-bwd-sm80") and ARCH == 90 \
            and p.get("D") in (64, 128, 256) and not p.get("dropout"):
        pats = (CUDA_SM90_FWD,)
    elif (case.op, case.mode) == ("flash_attention", "bwd") and path != "cuda-bwd-sm80" and ARCH == 90 \
            and p.get("D") in (64, 128) and p.get("Nk", 17) > 16 and not p.get("dropout"):
        pats = CUDA_SM90_BWD
    else:
        pats = CUDA_KERNELS[(case.op, case.mode)]
    if path == "cuda-fwd-w4":
        pats = tuple(x.replace(", 8, ", ", 4, ") for x in pats)
    d = p.get("D", 0)
    return [x.format(T=re.escape(CUDA_TYPES.get(case.dtype, "float")), D=d) for x in pats]


# ---------------------------------------------------------------------------------------------
# Counting (the subprocess under TRITON_INTERPRET=1)
# ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def gpu_tiles(case, arch=ARCH):
    """Run the attention / norm kernels with their first sm_`arch` config entry instead of the interpreter's
    own tiles; yields a line saying which tiles ran. Module internals that are missing leave the interpreter's
    tiles (and say so)."""
    undo = []
    note = "interpreter tiles"
    try:
        if case.op == "flash_attention":
            from triton_kernels import attention as A
            block_d = A._block_d(case.p["D"])
            bucket = A._d_bucket(block_d)
            saved = dict(A._INTERPRET_CONFIG)
            A._INTERPRET_CONFIG.update({w: A._GPU_CONFIGS[arch][w][bucket][0] for w in saved})
            undo.append(lambda: (A._INTERPRET_CONFIG.clear(), A._INTERPRET_CONFIG.update(saved)))
            caches = [f for f in (getattr(A, "_tuned", None), getattr(A, "_tuned_fwd_tma", None)) if f]
            tma = getattr(A, "_TMA_FWD_CONFIGS", {}).get(bucket, {}).get(bool(case.p["causal"]), [])
            if tma and hasattr(A, "_INTERPRET_TMA_CONFIG"):
                saved_tma = A._INTERPRET_TMA_CONFIG
                A._INTERPRET_TMA_CONFIG = tuple(tma[0][:4])
                undo.append(lambda: setattr(A, "_INTERPRET_TMA_CONFIG", saved_tma))
            for f in caches:
                f.cache_clear()
                undo.append(f.cache_clear)
            note = f"first sm_{arch} config entry of each kernel" + (
                "" if tma else f"; the TMA forward has no sm_{arch} entry for D={bucket}: interpreter tiles")
        elif case.op in ("layer_norm", "rms_norm"):
            from triton_kernels import norms as Nm
            saved = Nm.INTERP_TILES
            Nm.INTERP_TILES = Nm.GPU_TILES
            undo.append(lambda: setattr(Nm, "INTERP_TILES", saved))
            note = "GPU tiles"
        else:
            note = "the GPU's tiles (one config per shape)"
    except (AttributeError, KeyError, IndexError, TypeError) as e:
        note = f"interpreter tiles ({type(e).__name__}: {e})"
    try:
        yield note
    finally:
        for f in reversed(undo):
            f()


def count_one(case, prov):
    """One record (a dict) of `case` run on provider `prov` under the interpreter, counted."""
    import torch

    from . import cases
    from .interp_count import Counter
    rec = dict(path=prov.name, op=case.op, mode=case.mode, shape=case.shape, dtype=case.dtype,
               ideal_flops=case.flops() or 0.0, min_bytes=case.bytes(), status="ok", note="", kernels=[])
    t0 = time.time()
    inp = cases.make_inputs(case, "cpu", requires_grad=case.mode != "fwd", seed=0)
    reason = prov.unavailable(case, inp, "cpu")
    if reason:
        rec.update(status="n/a", note=reason)
        return rec
    fn = prov.build(case, inp)
    wrap = getattr(prov, "wrap", lambda f: f)
    try:
        with gpu_tiles(case) as tiles:
            rec["tiles_note"] = tiles
            if case.mode == "fwd":
                with Counter() as c, torch.no_grad():
                    fn()
            else:
                out = fn()
                out = out[0] if isinstance(out, (tuple, list)) else out
                dout = torch.randn_like(out)
                grad = wrap(lambda: torch.autograd.grad(out, inp["grad_inputs"], dout))
                with Counter() as c:
                    grad()
    except Exception as e:  # a kernel failing is reported, the others still run
        rec.update(status="error", note=f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
        return rec
    rec["kernels"] = [dataclasses.asdict(k) for k in c.kernels.values()]
    rec["seconds"] = round(time.time() - t0, 2)
    return rec


def triton_paths(case):
    """The triton backend and its variants for `case` (a forward-path variant only for fwd)."""
    from . import providers
    provs = providers.providers(None, peers=False)
    out = []
    for p in provs:
        if p.backend != "triton":
            continue
        if isinstance(p, providers.BackendVariant):
            if case.op not in p.ops or (case.mode != "fwd" and "-fwd-" in p.name):
                continue
        out.append(p)
    return out


def count_main(path, deadline):
    """The subprocess: count every (case, Triton path), one JSON record per line into `path`."""
    from . import progress
    jobs = [(c, p) for c in work_cases() for p in triton_paths(c)]
    with open(path, "w") as f, progress.bar(total=len(jobs), desc="work (interpreter)", unit="run") as bar:
        for case, prov in jobs:
            if deadline and time.time() > deadline:
                rec = dict(path=prov.name, op=case.op, mode=case.mode, shape=case.shape, dtype=case.dtype,
                           ideal_flops=case.flops() or 0.0, min_bytes=case.bytes(), status="skip",
                           note="not run within the time budget", kernels=[])
            else:
                bar.set_postfix_str(f"{prov.name} {case.op} {case.mode} {case.shape}")
                rec = count_one(case, prov)
            f.write(json.dumps(rec) + "\n")
            f.flush()
            progress.write(f"  counted {rec['path']:<20} {case.op} {case.mode} {case.shape}: {rec['status']}"
                           + (f" ({rec.get('seconds', 0):.1f} s)" if rec["status"] == "ok" else f" -- {rec['note']}"))
            bar.update()


# ---------------------------------------------------------------------------------------------
# Static facts (the parent, without the interpreter: kernels compile ahead of time)
# ---------------------------------------------------------------------------------------------

def _cfg_kernel_name(cfg):
    k = cfg.kernel
    return getattr(getattr(k, "fn", None), "__name__", None) or getattr(k, "__name__", "?")


def match_config(kernel, constexprs, configs, arch=ARCH):
    """(AotConfig, exact) of the shipped config closest to a launch of `kernel` with `constexprs`: same kernel
    and arch, the same tiles (BLOCK_*, HEAD_DIM, M_BLOCKS) if any has them, then the most other constexprs
    equal (UPCAST, the interpreter's bf16 workaround, ignored). (None, False) when no config has the kernel."""
    cands = [c for c in configs if _cfg_kernel_name(c) == kernel and arch in c.archs]
    if not cands:
        return None, False
    tile_keys = [k for k in constexprs if k.startswith("BLOCK_") or k in ("HEAD_DIM", "M_BLOCKS")]

    def score(c):
        same = all(c.constexprs.get(k) == constexprs[k] for k in tile_keys if k in c.constexprs)
        agree = sum(1 for k, v in constexprs.items() if k != "UPCAST" and c.constexprs.get(k) == v)
        return same, agree, -len(c.name)
    best = max(cands, key=score)
    return best, score(best)[0]


@dataclasses.dataclass
class Facts:
    """Static facts of one kernel for sm_90 (what the work table prints)."""
    source: str = ""              # the report entry they come from ("" = none)
    mma: str = "-"                # wgmma / mma.sync / HGMMA / HMMA / "-"
    wgmma_n: str = ""
    tma: int = 0
    setmaxnreg: int = 0
    registers: int = 0
    spills: int = 0
    smem: int = 0
    occupancy: float = 0.0
    note: str = ""

    def line(self):
        if not self.source:
            return self.note or "no static facts"
        n = f" N {self.wgmma_n}" if self.wgmma_n else ""
        return (f"{self.mma}{n}, TMA {'yes' if self.tma else 'no'}, setmaxnreg {'yes' if self.setmaxnreg else 'no'}, "
                f"{self.registers} regs, {self.spills} spill B, {self.smem / 1024:.1f} KB smem, "
                f"occ {self.occupancy:.0%}"
                + (f" ({self.note})" if self.note else ""))


def facts_from_stats(st, source, note=""):
    from . import kernel_report as kr
    ins = st.instructions or {}
    if st.error:
        return Facts(source="", note=f"{source}: {st.error[:120]}")
    if ins.get("wgmma") or ins.get("HGMMA"):
        mma = "wgmma" if ins.get("wgmma") else "HGMMA"
    elif ins.get("mma.sync") or ins.get("HMMA"):
        mma = "mma.sync" if ins.get("mma.sync") else "HMMA"
    else:
        mma = "-" if ins else "?"
    occ = st.occupancy() if st.num_warps else kr._register_bound(st)
    return Facts(source=source, mma=mma, wgmma_n=",".join(map(str, kr.mma_n_widths(ins))),
                 tma=ins.get("tma", 0) or ins.get("UTMALDG", 0), setmaxnreg=ins.get("setmaxnreg", 0) or
                 ins.get("USETMAXREG", 0), registers=st.registers, spills=st.spills or st.local_bytes,
                 smem=st.smem, occupancy=occ, note=note)


def triton_facts(records, deadline, log):
    """{(kernel, frozen constexprs): Facts} for every Triton kernel the records launched."""
    from . import static_report
    from . import kernel_report as kr
    configs, failed = [], []
    for mod in kr.TRITON_MODULES:
        try:
            configs += static_report._configs_of(mod)
        except Exception as e:  # a module without configs: its kernels get no facts
            failed.append(f"{mod}.aot_configs() raised {type(e).__name__}: {str(e)[:100]}")
            log(f"  {failed[-1]}")
    out = {}
    for rec in records:
        for k in rec["kernels"]:
            key = (k["kernel"], json.dumps(k["constexprs"], sort_keys=True))
            if key in out:
                continue
            cfg, exact = match_config(k["kernel"], k["constexprs"], configs)
            if cfg is None:
                out[key] = Facts(note=f"no shipped sm_{ARCH} config of {k['kernel']} in the kernel report"
                                 + (f" ({'; '.join(failed)})" if failed else ""))
                continue
            if os.path.exists(static_report._cache_path(cfg, ARCH)) or not (deadline and time.time() > deadline):
                st, _ = static_report.compile_cached(cfg, ARCH)
                out[key] = facts_from_stats(st, cfg.name, "" if exact else "nearest config: other tiles")
            else:
                out[key] = Facts(note=f"{cfg.name}: not compiled within the time budget")
    return out


CACHE_DIR = os.path.join(tempfile.gettempdir(), "tileformer-static", "cuda-facts")


def _extension_stats(so, names):
    """kernel_report.extension_report of the built extension for sm_90 (SASS of the kernels whose names start
    with one of `names`), cached on disk by the extension's path, size and mtime."""
    from . import kernel_report as kr
    st = os.stat(so)
    key = hashlib.sha1(repr((so, st.st_size, st.st_mtime_ns, sorted(names), kr.STATS_VERSION)).encode()).hexdigest()
    path = os.path.join(CACHE_DIR, key + ".json")
    if os.path.exists(path):
        with open(path) as f:
            return [kr.KernelStats(**r) for r in json.load(f)]
    stats = [s for s in kr.extension_report(so, sass_kernels=names, archs=(ARCH,)) if s.arch == ARCH]
    os.makedirs(CACHE_DIR, exist_ok=True)
    with open(path, "w") as f:
        json.dump([dataclasses.asdict(s) for s in stats], f)
    return stats


def cuda_facts(patterns_by_key, report_json, log):
    """{pattern: Facts} for the CUDA kernels: from the built extension when it is newer than csrc/, else from
    an earlier kernel_report.json; several matching instances are merged (the worst registers / spills).
    Shared memory is the static part only (the dynamic part is set at launch)."""
    from . import kernel_report as kr
    stats, source = [], ""
    so = kr.built_extension()
    try:
        if so is not None:
            names = sorted({re.split(r"\\|\(", p)[0] for p in patterns_by_key})   # literal prefixes
            stats = _extension_stats(so, names)
            source = "built extension"
        elif report_json and os.path.exists(report_json):
            with open(report_json) as f:
                raw = json.load(f)
            fields = {f.name for f in dataclasses.fields(kr.KernelStats)}
            stats = [kr.KernelStats(**{k: v for k, v in r.items() if k in fields}) for r in raw]
            source = f"{os.path.relpath(report_json)} (an earlier kernel report)"
    except Exception as e:  # no facts is no reason to lose the counts
        log(f"  CUDA static facts unavailable: {type(e).__name__}: {str(e)[:200]}")
    out = {}
    for pat in patterns_by_key:
        hits = [s for s in stats if s.arch == ARCH and re.search(pat, s.name)]
        if not hits:
            why = ("the built extension is older than csrc/ and no kernel_report.json was given" if not source
                   else f"no kernel matches /{pat}/ in the {source}")
            out[pat] = Facts(note=why)
            continue
        worst = max(hits, key=lambda s: (s.spills or s.local_bytes, s.registers))
        f = facts_from_stats(worst, f"{source}: {worst.name.split(':', 1)[-1][:90]}",
                             f"{len(hits)} instances, the most registers shown" if len(hits) > 1 else "")
        out[pat] = f
    return out


# ---------------------------------------------------------------------------------------------
# Tables, CSV, PNG
# ---------------------------------------------------------------------------------------------

def _mb(x):
    return x / 1e6


def summarize(rec):
    """(FLOPs executed, ideal, ratio, bytes moved, minimum, ratio) of one record (ratios None when undefined)."""
    flops = sum(k["dot_flops"] for k in rec["kernels"])
    moved = sum(k["load_bytes"] + k["store_bytes"] + k["atomic_bytes"] for k in rec["kernels"])
    ideal, mn = rec["ideal_flops"], rec["min_bytes"]
    return (flops, ideal, flops / ideal if ideal else None, moved, mn, moved / mn if mn else None)


def build_rows(records, tfacts, cfacts, cuda_paths):
    """CSV rows (CSV_COLUMNS) for the Triton records (kernels + total) and the CUDA static rows."""
    rows = []
    base = lambda rec: dict(path=rec["path"], op=rec["op"], mode=rec["mode"], shape=rec["shape"],  # noqa: E731
                            dtype=rec["dtype"])
    for rec in records:
        if rec["status"] != "ok":
            rows.append(dict(base(rec), kernel="", note=f"{rec['status']}: {rec['note']}"))
            continue
        for k in rec["kernels"]:
            f = tfacts.get((k["kernel"], json.dumps(k["constexprs"], sort_keys=True)), Facts())
            rows.append(dict(base(rec), kernel=k["kernel"], launches=k["launches"], programs=k["programs"],
                             tiles=_tiles(k), dot_shapes=_shapes(k), dot_flops=k["dot_flops"],
                             load_bytes=k["load_bytes"], store_bytes=k["store_bytes"], atomic_bytes=k["atomic_bytes"],
                             **_facts_cols(f)))
        flops, ideal, fr, moved, mn, br = summarize(rec)
        rows.append(dict(base(rec), kernel="total", dot_flops=flops, ideal_flops=ideal,
                         flops_over_ideal=_num(fr), load_bytes=sum(k["load_bytes"] for k in rec["kernels"]),
                         store_bytes=sum(k["store_bytes"] for k in rec["kernels"]),
                         atomic_bytes=sum(k["atomic_bytes"] for k in rec["kernels"]), min_bytes=mn,
                         bytes_over_min=_num(br), note=rec.get("tiles_note", "")))
    for (case, path), pats in cuda_paths.items():
        for pat in pats:
            f = cfacts.get(pat, Facts())
            rows.append(dict(path=path, op=case.op, mode=case.mode, shape=case.shape, dtype=case.dtype,
                             kernel=pat.replace("\\", ""), ideal_flops=case.flops() or 0.0, min_bytes=case.bytes(),
                             note=CUDA_NOTE, **_facts_cols(f)))
    return rows


def _num(x):
    return "" if x is None else f"{x:.4g}"


def _tiles(k):
    from .interp_count import KernelCount
    return KernelCount(k["kernel"], constexprs=k["constexprs"]).tiles()


def _shapes(k):
    return ", ".join(f"{s} x{n}" for s, n in k["dot_shapes"].items())


def _facts_cols(f):
    return dict(static_from=f.source or f.note, mma=f.mma if f.source else "", wgmma_n=f.wgmma_n,
                tma=f.tma if f.source else "", setmaxnreg=f.setmaxnreg if f.source else "",
                registers=f.registers or "", spills=f.spills if f.source else "", smem_bytes=f.smem or "",
                occupancy=f"{f.occupancy:.3g}" if f.source else "")


def format_tables(records, tfacts, cfacts, cuda_paths):
    """The detail per case and path, then the summary table (one line per case x path)."""
    lines = []
    by_case = {}
    for rec in records:
        by_case.setdefault((rec["op"], rec["mode"], rec["shape"], rec["dtype"]), []).append(rec)
    cuda_by_case = {}
    for (case, path), pats in cuda_paths.items():
        cuda_by_case.setdefault((case.op, case.mode, case.shape, case.dtype), []).append((path, pats))
    for key in list(dict.fromkeys(list(by_case) + list(cuda_by_case))):
        op, mode, shape, dtype = key
        recs = by_case.get(key, [])
        ideal = recs[0]["ideal_flops"] if recs else 0
        mn = recs[0]["min_bytes"] if recs else 0
        lines.append(f"\n{op} {mode} {shape} {dtype}: ideal {ideal / 1e9:.4g} GFLOP, minimum {_mb(mn):.4g} MB")
        for rec in recs:
            if rec["status"] != "ok":
                lines.append(f"  {rec['path']:<20} {rec['status']}: {rec['note']}")
                continue
            flops, ideal, fr, moved, mn, br = summarize(rec)
            lines.append(f"  {rec['path']:<20} {flops / 1e9:.4g} GFLOP = {_x(fr)} ideal; {_mb(moved):.4g} MB moved = "
                         f"{_x(br)} minimum  [{rec.get('tiles_note', '')}]")
            for k in rec["kernels"]:
                f = tfacts.get((k["kernel"], json.dumps(k["constexprs"], sort_keys=True)), Facts())
                lines.append(f"    {k['kernel']:<24} {k['programs']:>6} programs  {_tiles(k):<16} "
                             f"{k['dot_flops'] / 1e9:>8.4g} GFLOP  ld {_mb(k['load_bytes']):.4g} MB  "
                             f"st {_mb(k['store_bytes']):.4g} MB" + (f"  atomic {_mb(k['atomic_bytes']):.4g} MB"
                                                                    if k["atomic_bytes"] else ""))
                if k["dot_shapes"]:
                    lines.append(f"      dots (MxNxK): {_shapes(k)}")
                lines.append(f"      sm_{ARCH}: {f.line()}" + (f"  [{f.source}]" if f.source else ""))
        for path, pats in cuda_by_case.get(key, []):
            lines.append(f"  {path:<20} {CUDA_NOTE}")
            for pat in pats:
                f = cfacts.get(pat, Facts())
                lines.append(f"    /{pat.replace(chr(92), '')}/  sm_{ARCH}: {f.line()}")
    lines.append("\n" + format_summary(records, tfacts, cfacts, cuda_paths))
    return "\n".join(lines)


def _x(r):
    return "-" if r is None else f"{r:.3g}x"


def _worst(facts):
    """One summary of several kernels' facts: their instructions, the most registers / spills, the lowest
    occupancy."""
    fs = [f for f in facts if f.source]
    if not fs:
        return None
    mmas = sorted({f.mma for f in fs if f.mma not in ("-", "?")}) or ["-"]
    ns = sorted({int(n) for f in fs for n in f.wgmma_n.split(",") if n})
    return dict(mma="+".join(mmas), n=",".join(map(str, ns)) or "-", tma="yes" if any(f.tma for f in fs) else "no",
                smr="yes" if any(f.setmaxnreg for f in fs) else "no", regs=max(f.registers for f in fs),
                spills=max(f.spills for f in fs), occ=min(f.occupancy for f in fs))


SHAPE_W = 36
SUMMARY_HEADER = (f"  {'op':<16} {'mode':<4} {'shape':<{SHAPE_W}} {'path':<20} {'xFLOP':>6} {'xbytes':>7}  "
                  f"{'sm_90 mma':<14} {'wgmma N':<10} {'TMA':<4} {'smnreg':<6} {'regs':>5} {'spill':>6} {'occ':>5}")


def format_summary(records, tfacts, cfacts, cuda_paths):
    """One line per case x path: FLOPs executed / ideal, bytes moved / minimum, and the static facts of its
    kernels (for several kernels: every instruction kind, the most registers and spills, the lowest occupancy)."""
    lines = [f"Summary: counted work (xFLOP = tensor-core FLOPs executed / ideal, xbytes = bytes moved / minimum) "
             f"and sm_{ARCH} static facts", SUMMARY_HEADER]

    def line(op, mode, shape, path, fr, br, w):
        s = (f"  {op:<16} {mode:<4} {short_shape(shape)[:SHAPE_W]:<{SHAPE_W}} {path:<20} "
             f"{_x(fr) if fr is not None else '-':>6} {_x(br) if br is not None else '-':>7}  ")
        if w is None:
            return s + "(no static facts)"
        return s + (f"{w['mma']:<14} {w['n']:<10} {w['tma']:<4} {w['smr']:<6} {w['regs']:>5} {w['spills']:>6} "
                    f"{w['occ']:>5.0%}")
    cuda_by_shape = {}
    for (case, path), pats in cuda_paths.items():
        cuda_by_shape.setdefault((case.op, case.mode, case.shape), []).append((path, pats))
    keys = list(dict.fromkeys([(r["op"], r["mode"], r["shape"]) for r in records] + list(cuda_by_shape)))
    for key in keys:
        op, mode, shape = key
        for rec in (r for r in records if (r["op"], r["mode"], r["shape"]) == key):
            if rec["status"] != "ok":
                lines.append(f"  {op:<16} {mode:<4} {short_shape(shape)[:SHAPE_W]:<{SHAPE_W}} {rec['path']:<20} "
                             f"{rec['status']}: {rec['note'][:80]}")
                continue
            _, _, fr, _, _, br = summarize(rec)
            ks = [k for k in rec["kernels"] if k["dot_flops"]] or rec["kernels"]
            facts = [tfacts.get((k["kernel"], json.dumps(k["constexprs"], sort_keys=True)), Facts()) for k in ks]
            lines.append(line(op, mode, shape, rec["path"], fr, br, _worst(facts)))
        for path, pats in cuda_by_shape.get(key, []):
            lines.append(line(op, mode, shape, path, None, None, _worst([cfacts.get(p, Facts()) for p in pats])))
    lines.append(f"  (tensor-core instructions and wgmma N of the kernels doing matrix work; the most registers and "
                 f"spills, the lowest occupancy of the op's kernels. cuda rows: {CUDA_NOTE})")
    return "\n".join(lines)


def plot(records, path):
    """work.png: FLOPs executed / ideal and bytes moved / minimum per (op, mode, shape) x Triton path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ok = [r for r in records if r["status"] == "ok"]
    if not ok:
        return None
    labels = [f"{r['op']} {r['mode']} {short_shape(r['shape'])} | {r['path']}" for r in ok]
    sums = [summarize(r) for r in ok]
    fig, axes = plt.subplots(1, 2, figsize=(15, 0.32 * len(ok) + 1.6), sharey=True)
    for ax, idx, title in ((axes[0], 2, "tensor-core FLOPs executed / ideal"),
                           (axes[1], 5, "bytes moved (loads + stores) / minimum")):
        vals = [s[idx] or 0.0 for s in sums]
        colors = ["tab:red" if r["path"] == "triton" else "tab:orange" for r in ok]
        ax.barh(range(len(ok)), vals, color=colors)
        ax.axvline(1.0, color="black", linestyle=":", linewidth=1)
        for i, v in enumerate(vals):
            ax.text(v, i, f" {v:.2f}" if v else " no tl.dot", va="center", fontsize=6)
        ax.set_xlim(0, 1.15 * max(vals + [1.0]))
        ax.set_title(title, fontsize=9)
        ax.grid(True, axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(ok)))
    axes[0].set_yticklabels(labels, fontsize=6)
    axes[0].invert_yaxis()
    fig.suptitle("Counted work of the Triton kernels under the interpreter (sm_90 tiles); 1 = ideal / minimum",
                 fontsize=9)
    fig.tight_layout()
    fig.subplots_adjust(left=0.27)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def short_shape(shape):
    """A shape without what repeats: Nk when equal to Nq, Hkv when equal to Hq, decode's Sq=1."""
    from .harness import parse_shape
    p = parse_shape(shape)
    drop = {k for k, same in (("Nk", "Nq"), ("Hkv", "Hq")) if k in p and p.get(k) == p.get(same)}
    if p.get("Sq") == 1:
        drop.add("Sq")
    return " ".join(f"{k}={v}" for k, v in p.items() if k not in drop)


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------

def run_counts(deadline, log):
    """Run the counting subprocess (TRITON_INTERPRET=1); returns its records."""
    from .harness import ROOT
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "counts.jsonl")
        env = dict(os.environ, TRITON_INTERPRET="1", TILEFORMER_EMULATE_CUDA="1", TILEFORMER_POISON="0")
        cmd = [sys.executable, "-m", "benchmarks.work", "--count-jsonl", path]
        if deadline:
            cmd += ["--deadline", str(deadline)]
        timeout = None if not deadline else max(30.0, deadline - time.time() + 60)
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        if rc:
            log(f"  the counting subprocess ended with {rc}")
        if not os.path.exists(path):
            return []
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="", help="write work.txt, work.csv, work.png here")
    ap.add_argument("--deadline", type=float, default=0.0, help="time.time() after which nothing new starts")
    ap.add_argument("--no-static", action="store_true", help="counts only (no kernel-report compile)")
    ap.add_argument("--report-json", default="", help="an earlier kernel_report.json for the CUDA static facts")
    ap.add_argument("--count-jsonl", default="", help=argparse.SUPPRESS)   # the counting subprocess
    args = ap.parse_args(argv)
    if args.count_jsonl:
        count_main(args.count_jsonl, args.deadline)
        return 0

    logged = []

    def log(s):
        print(s, flush=True)
        logged.append(s)
    t0 = time.time()
    count_deadline = t0 + 0.8 * (args.deadline - t0) if args.deadline else 0.0
    log("Counted work of the Triton kernels under the interpreter, static facts for sm_90 (benchmarks/work.py)")
    records = run_counts(count_deadline, log)
    log(f"  counted {sum(r['status'] == 'ok' for r in records)} of {len(records)} runs in {time.time() - t0:.0f} s")
    t1 = time.time()
    cases_ = work_cases()
    cuda_paths = {}
    from . import providers
    cuda_provs = [p for p in providers.providers(None, peers=False) if p.backend == "cuda"]
    for case in cases_:
        for p in cuda_provs:
            if isinstance(p, providers.BackendVariant) and (case.op not in p.ops or case.mode != "fwd"):
                continue
            cuda_paths[(case, p.name)] = cuda_patterns(case, p.name)
    if args.no_static:
        tfacts, cfacts = {}, {}
    else:
        tfacts = triton_facts(records, args.deadline, log)
        log(f"  Triton static facts in {time.time() - t1:.0f} s")
        t1 = time.time()
        cfacts = cuda_facts({pat for pats in cuda_paths.values() for pat in pats}, args.report_json, log)
        log(f"  CUDA static facts in {time.time() - t1:.0f} s")
    text = format_tables(records, tfacts, cfacts, cuda_paths)
    log(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "work.txt"), "w") as f:
            f.write("\n".join(logged[1:] + [text]) + "\n")
        rows = build_rows(records, tfacts, cfacts, cuda_paths)
        with open(os.path.join(args.out, "work.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
        try:
            png = plot(records, os.path.join(args.out, "work.png"))
        except Exception as e:  # plotting must not lose the counts
            png = None
            log(f"  plotting failed: {type(e).__name__}: {e}")
        log(f"wrote work.txt, work.csv{', work.png' if png else ''} ({time.time() - t0:.0f} s)")
    bad = [r for r in records if r["status"] == "error"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
