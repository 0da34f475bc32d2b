"""FLOP and byte counts per op, the GPU peak table and the roofline.

FLOPs follow flash-attn's benchmark convention so our TFLOP/s compare with the numbers peers publish:

    attention forward    4 * B * Hq * Nq * Nk * D          (two matmuls, 2 FLOPs per multiply-add)
                         halved when causal (whatever Nq, Nk: the convention, not the exact count)
    attention backward   2.5 x forward                     fwd+bwd: 3.5 x forward
    decode               4 * B * Hq * Sq * L * D            (L = tokens in the cache; never halved)
    layer_norm/rms_norm  not counted (memory-bound: judged by GB/s only)

Bytes are the minimum an op must move between HBM and the chip, each tensor read or written once:

    attention fwd        read q, k, v; write out
    attention bwd        read q, k, v, out, dout, lse (fp32); write dq, dk, dv
    attention fwd+bwd    fwd + lse written by the training forward + bwd
    decode               read q, the L cached keys and values per sequence, cache_seqlens (int32),
                         block_table (int32, paged only); write out
    norm fwd             read x, weight (+ bias); write out
    norm bwd             read x, dout, weight; write dx, dweight (+ dbias)   (statistics recomputed)

Roofline floor of a measurement: max(FLOPs / peak FLOP/s, bytes / peak bandwidth), from the table below
(dense tensor-core peak for fp16/bf16, non-tensor peak for fp32). An unknown GPU has no entry: roofline
metrics are then left out, unless peaks are given (TILEFORMER_PEAK_TFLOPS, TILEFORMER_PEAK_GBPS).

Measured ceilings (``ceilings.csv``, written by benchmarks/ceilings.py on the GPU of the run): the rate of a
large torch.matmul (bf16 and fp32) and of a device-to-device copy (bytes read + written). ``measured_peak``
turns them into a Peak, used next to the data-sheet one: a second roofline (``time_over_measured_roofline``)
that says how far a kernel is from what this card, as found, delivers to a library matmul or a copy.
"""
from __future__ import annotations

import csv
import dataclasses
import math
import os
import re
from typing import Optional

MODE_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


# ---------------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------------

def _mode_factor(mode):
    if mode not in MODE_FACTOR:
        raise ValueError(f"mode must be one of {tuple(MODE_FACTOR)}, got {mode!r}")
    return MODE_FACTOR[mode]


def attention_flops(B, Hq, Nq, Nk, D, causal, mode="fwd"):
    """flash-attn convention: 4*B*Hq*Nq*Nk*D forward, halved when causal; x2.5 backward, x3.5 fwd+bwd."""
    f = 4.0 * B * Hq * Nq * Nk * D
    if causal:
        f /= 2
    return f * _mode_factor(mode)


def decode_flops(B, Hq, Sq, L, D):
    """QK^T and PV over the L cached tokens: 4*B*Hq*Sq*L*D."""
    return 4.0 * B * Hq * Sq * L * D


# ---------------------------------------------------------------------------------------------
# Bytes
# ---------------------------------------------------------------------------------------------

def dtype_bytes(dtype):
    """Element size of a dtype given as "bf16"/"fp16"/"fp32" or a torch.dtype."""
    if isinstance(dtype, str):
        if dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype must be one of {tuple(DTYPE_BYTES)}, got {dtype!r}")
        return DTYPE_BYTES[dtype]
    return dtype.itemsize


def attention_bytes(B, Nq, Nk, Hq, Hkv, D, dtype, mode="fwd"):
    e = dtype_bytes(dtype)
    q = B * Nq * Hq * D * e             # also out, dout, dq
    kv = 2 * B * Nk * Hkv * D * e       # k and v (also dk and dv)
    lse = B * Hq * Nq * 4
    fwd = 2 * q + kv
    bwd = 4 * q + 2 * kv + lse          # read q, out, dout, k, v, lse; write dq, dk, dv
    if mode == "fwd":
        return float(fwd)
    if mode == "bwd":
        return float(bwd)
    if mode == "fwd+bwd":
        return float(fwd + lse + bwd)
    raise ValueError(f"mode must be one of {tuple(MODE_FACTOR)}, got {mode!r}")


def decode_bytes(B, Sq, Hq, Hkv, D, L, dtype, page_size=0, kv_dtype=None):
    """q and out, the L cached keys and values of each of the B sequences, cache_seqlens, block_table. kv_dtype
    "int8" / "fp8_e4m3": the cache holds 1 byte per element plus an fp32 scale per (token, kv head) for K and V."""
    e = dtype_bytes(dtype)
    cache = 2 * B * L * Hkv * (D * e if kv_dtype is None else D + 4)
    total = 2 * B * Sq * Hq * D * e + cache + 4 * B
    if page_size:
        total += 4 * B * math.ceil(L / page_size)
    return float(total)


def norm_bytes(M, N, dtype, *, bias, mode="fwd", weight_dtype=None):
    """M rows of N; bias=True for layer_norm (weight and bias), False for rms_norm (weight only)."""
    e = dtype_bytes(dtype)
    we = dtype_bytes(weight_dtype if weight_dtype is not None else dtype)
    params = (2 if bias else 1) * N * we
    if mode == "fwd":
        return float(2 * M * N * e + params)
    if mode == "bwd":
        return float(3 * M * N * e + 2 * params)     # read x, dout, weight; write dx, dweight (+ dbias)
    raise ValueError(f"mode must be 'fwd' or 'bwd' for norms, got {mode!r}")


# ---------------------------------------------------------------------------------------------
# Peak table
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Peak:
    name: str
    tflops_16: float      # dense fp16/bf16 tensor-core TFLOP/s (fp32 accumulate)
    tflops_32: float      # fp32 (non-tensor) TFLOP/s
    gbps: float           # HBM / GDDR bandwidth, GB/s (1e9 bytes/s)
    source: str = ""

    def flops_per_s(self, dtype):
        return (self.tflops_32 if dtype in ("fp32", "float32") else self.tflops_16) * 1e12

    def bytes_per_s(self):
        return self.gbps * 1e9


# First match wins: specific variants before the generic name. Numbers from NVIDIA's data sheets (dense
# tensor-core peaks, no sparsity).
PEAKS = (
    (r"H200 NVL", Peak("H200 NVL", 835, 60, 4800, "NVIDIA H200 data sheet")),
    (r"H200", Peak("H200 SXM", 989, 67, 4800, "NVIDIA H200 data sheet")),
    (r"H100 PCIe", Peak("H100 PCIe", 756, 51, 2000, "NVIDIA H100 data sheet")),
    (r"H100 NVL", Peak("H100 NVL", 835, 60, 3900, "NVIDIA H100 data sheet")),
    (r"H100", Peak("H100 SXM", 989, 67, 3350, "NVIDIA H100 data sheet")),
    (r"A100.*80GB.*PCIe", Peak("A100 80GB PCIe", 312, 19.5, 1935, "NVIDIA A100 data sheet")),
    (r"A100.*80GB", Peak("A100 SXM 80GB", 312, 19.5, 2039, "NVIDIA A100 data sheet")),
    (r"A100", Peak("A100 40GB", 312, 19.5, 1555, "NVIDIA A100 data sheet")),
    (r"L40S", Peak("L40S", 362, 91.6, 864, "NVIDIA L40S data sheet")),
    (r"RTX 4090", Peak("RTX 4090", 165.2, 82.6, 1008, "Ada whitepaper (fp16 with fp32 accumulate)")),
)


def lookup_peak(gpu_name, env=None) -> Optional[Peak]:
    """Peak of a GPU by its torch.cuda.get_device_name(); None for an unknown GPU (or "cpu").

    TILEFORMER_PEAK_TFLOPS and TILEFORMER_PEAK_GBPS (both) override the table, e.g. for an unlisted GPU.
    """
    env = os.environ if env is None else env
    tf, bw = env.get("TILEFORMER_PEAK_TFLOPS"), env.get("TILEFORMER_PEAK_GBPS")
    if tf and bw:
        return Peak(f"{gpu_name} (user peaks)", float(tf), float(tf), float(bw), "environment")
    if not gpu_name or gpu_name == "cpu":
        return None
    for pattern, peak in PEAKS:
        if re.search(pattern, gpu_name, re.IGNORECASE):
            return peak
    return None


# ---------------------------------------------------------------------------------------------
# Measured ceilings (ceilings.csv)
# ---------------------------------------------------------------------------------------------

CEILINGS_FILE = "ceilings.csv"
CEILING_COLUMNS = ("gpu", "metric", "unit", "value", "datasheet", "how", "timestamp")
# metric -> (unit, the Peak field it supplies)
CEILING_METRICS = {"matmul_bf16": ("TFLOP/s", "tflops_16"), "matmul_fp32": ("TFLOP/s", "tflops_32"),
                   "copy": ("GB/s", "gbps")}


def write_ceilings(path, rows):
    """rows: dicts with CEILING_COLUMNS (numbers as floats or None)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CEILING_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else f"{r[k]:.6g}" if isinstance(r.get(k), float) else r[k])
                        for k in CEILING_COLUMNS})


def read_ceilings(path):
    """Rows of a ceilings.csv ("value"/"datasheet" as floats or None); [] when the file does not exist.
    Raises ValueError for another header."""
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != CEILING_COLUMNS:
            raise ValueError(f"{path}: columns {reader.fieldnames} differ from {CEILING_COLUMNS}")
        rows = []
        for r in reader:
            for k in ("value", "datasheet"):
                r[k] = float(r[k]) if r[k] not in ("", None) else None
            rows.append(r)
    return rows


def measured_peak(rows, gpu_name) -> Optional[Peak]:
    """A Peak from the measured ceilings of `gpu_name` (rows of another GPU are ignored); None unless both
    the bf16 matmul rate and the copy bandwidth were measured. A missing fp32 rate falls back to the
    data-sheet one (or the bf16 rate / 16 for a GPU not in the table)."""
    got = {r["metric"]: r["value"] for r in rows if r.get("gpu") == gpu_name and r.get("value")}
    if not got.get("matmul_bf16") or not got.get("copy"):
        return None
    sheet = lookup_peak(gpu_name, env={})
    fp32 = got.get("matmul_fp32") or (sheet.tflops_32 if sheet else got["matmul_bf16"] / 16)
    return Peak(f"{sheet.name if sheet else gpu_name} measured", got["matmul_bf16"], fp32, got["copy"],
                "ceilings.csv: torch.matmul and a device-to-device copy on this GPU")


def pct_of_peak(rate, peak_rate):
    """Percent of a peak rate (None without one)."""
    return None if not peak_rate else 100.0 * rate / peak_rate


def unknown_gpu_message(gpu_name):
    return (f"unknown GPU {gpu_name!r}: no entry in the peak table (benchmarks/formulas.py PEAKS), so the "
            f"roofline columns are left out; set TILEFORMER_PEAK_TFLOPS and TILEFORMER_PEAK_GBPS to supply them")


# ---------------------------------------------------------------------------------------------
# Roofline and derived metrics
# ---------------------------------------------------------------------------------------------

def roofline_floor_s(flops, nbytes, peak: Optional[Peak], dtype):
    """max(FLOPs / peak FLOP/s, bytes / bandwidth) in seconds; None without a peak."""
    if peak is None:
        return None
    t_compute = (flops or 0.0) / peak.flops_per_s(dtype)
    t_memory = (nbytes or 0.0) / peak.bytes_per_s()
    return max(t_compute, t_memory)


def bound_by(flops, nbytes, peak: Optional[Peak], dtype):
    """"compute" or "memory": which term sets the roofline floor (None without a peak)."""
    if peak is None:
        return None
    return "compute" if (flops or 0.0) / peak.flops_per_s(dtype) >= (nbytes or 0.0) / peak.bytes_per_s() else "memory"


def tflops(flops, ms):
    return flops / (ms * 1e-3) / 1e12


def gbps(nbytes, ms):
    return nbytes / (ms * 1e-3) / 1e9


def time_over_floor(ms, floor_s):
    """Measured time / roofline floor: 1.0 = at the roofline, 2.0 = twice as slow as the floor."""
    return (ms * 1e-3) / floor_s
