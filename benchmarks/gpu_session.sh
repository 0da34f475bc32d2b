#!/usr/bin/env bash
# One prepared run for a lent GPU machine (the device tool): performance first, then the tests, inside one
# command of TOTAL_S seconds (default 540; device tool timeout_s 590). From the repository root:
#
#   TILEFORMER_GIT_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_session.sh
#
# It uses the machine's own python3 (its torch/triton; no venv, nothing is installed). Every part runs under its
# own time limit (a part that runs out is stopped, reported, and the next one starts); whatever happens,
# $OUT/results.tgz is packed at the end with what exists:
#   a. the machine's ceilings: torch.matmul 8192^3 bf16 (and fp32) in TFLOP/s and a 2 GiB device-to-device copy in
#      GB/s (benchmarks/ceilings.py -> bench/ceilings.csv; every roofline below uses them next to the data sheet);
#   b. the per-kernel profile (benchmarks/profile_kernels.py: forward, dK/dV, dQ kernels at N 8k, D 128 and 64,
#      causal off/on): the Triton paths and the peers (torch SDPA pinned to FLASH_ATTENTION and CUDNN_ATTENTION,
#      flash-attn 2/3/4 and flashinfer when importable) WHILE transformer._C builds for this GPU (nvcc, that arch
#      only, into a separate folder), then (on sm_90) the GPU halves of the sm_90a self-tests
#      (tests/test_emulator_hopper.py: wgmma descriptors / swizzles / fragments, TMA, mbarrier on the hardware)
#      and the CUDA paths once it is built;
#   c. the timing sweep (benchmarks.run --quick --sections timing; every backend and variant but the fp32
#      reference, the peers that import);
#   d. the tests: the correctness table, the CUDA-backend GPU tests (with the emulator self-tests' GPU halves:
#      the mma/ldmatrix fragment layouts and warp collectives on the hardware), the Triton-backend GPU tests,
#      then the module/model tests with the time left.
# Everything lands in $OUT (the device tool's folder; /tmp/tileformer_gpu_out elsewhere): session.log (all
# output), results.tgz (bench/ = benchmarks.run's output folder with ceilings.csv, kernels.txt/.csv, bench.csv,
# correctness.csv, PNGs; logs/ = build and pytest logs + junit xml, parts.txt = the time each part took;
# .bench.partial-<pid>/ = the output of a benchmarks.run part stopped at its time limit, if any).
# Unpack with `tar xzf results.tgz` and copy bench/ to benchmarks/results/<gpu>/.
#
# Knobs: TOTAL_S, BUILD_S, PYTHON, TILEFORMER_CUDA_ARCHS (default: the GPU's own), TEST_WORKERS.
# GPU_SESSION_DRY=1: on a machine without a GPU, walk through every part with the same plumbing at CPU sizes
# (ceilings and profile --dry, a one-op CPU timing sweep, the test selections collected but not run, no build
# unless GPU_SESSION_DRY_BUILD=1) to check this script; about a minute.
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)
T0=$(date +%s)
DRY=${GPU_SESSION_DRY:-0}
TOTAL_S=${TOTAL_S:-540}
BUILD_S=${BUILD_S:-220}
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/tileformer_gpu_out}
WORK=$(mktemp -d /tmp/tileformer_gpu.XXXX)
LOGS=$WORK/logs
BENCH=$WORK/bench
mkdir -p "$OUT" "$LOGS" "$BENCH"
: > "$LOGS/parts.txt"
exec > >(tee "$OUT/session.log") 2>&1
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
[ -x "$CUDA_HOME/bin/nvcc" ] || CUDA_HOME=$(dirname "$(dirname "$(command -v nvcc 2>/dev/null || echo /x/x/nvcc)")")

elapsed() { echo $(( $(date +%s) - T0 )); }
left() { echo $(( TOTAL_S - $(elapsed) )); }
say() { echo "[gpu_session $(elapsed)s] $*"; }
min() { [ "$1" -lt "$2" ] && echo "$1" || echo "$2"; }
# run_for SECONDS NAME CMD...: run CMD with a time limit (SIGINT first so pytest prints its summary), never past
# the session's end (10 s kept for packing)
run_for() {
  local limit=$1 name=$2; shift 2
  limit=$(min "$limit" $(( $(left) - 10 )))
  if [ "$limit" -lt 15 ]; then say "SKIP $name: only ${limit}s left"; echo "$name: skipped (no time)" >> "$LOGS/parts.txt"; return 0; fi
  say "START $name (limit ${limit}s): $*"
  local t=$(date +%s)
  timeout -s INT -k 15 "$limit" "$@"
  local rc=$?
  say "END $name: rc=$rc in $(( $(date +%s) - t ))s$([ $rc -eq 124 ] && echo ' (stopped at its time limit)')"
  echo "$name: rc=$rc $(( $(date +%s) - t ))s" >> "$LOGS/parts.txt"
  return $rc
}
pack() {
  cp "$OUT/session.log" "$LOGS/" 2>/dev/null
  # .bench.partial-<pid>: the output of a benchmarks.run stopped before it finished (bench/ keeps the last complete one)
  tar czf "$OUT/results.tgz" -C "$WORK" bench logs $(cd "$WORK" && ls -d .bench.partial-* 2>/dev/null) \
    && say "packed $OUT/results.tgz ($(du -h "$OUT/results.tgz" | cut -f1)) in $(elapsed)s"
}
trap pack EXIT

# ---- 0. the machine --------------------------------------------------------------------------------------
say "tileformer GPU session, commit ${TILEFORMER_GIT_COMMIT:-unknown}, budget ${TOTAL_S}s, out $OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1 | sed 's/^/  gpu: /'
$PY - <<'EOF' 2>&1 | sed 's/^/  /'
import sys, torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)
try:
    import triton; print("triton", triton.__version__)
except Exception as e: print("triton: not importable:", e)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device {p.name}: cc {p.major}.{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB")
else:
    print("NO CUDA DEVICE VISIBLE TO TORCH")
try:
    from benchmarks import providers
    for name, status in providers.peer_status().items():
        print(f"peer {name:<12} {status}")
except Exception as e: print("peers: not listed:", type(e).__name__, e)
EOF
echo "  cpus $(nproc), nvcc $($CUDA_HOME/bin/nvcc --version 2>/dev/null | tail -1)"
CC=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null || echo none)
case "$CC" in
  9.*) ARCH=9.0a ;;
  8.*) ARCH=8.0 ;;
  none) if [ "$DRY" = 1 ]; then ARCH=9.0a; say "DRY RUN without a GPU (GPU_SESSION_DRY=1): CPU sizes, tests collected only";
        else say "no GPU: nothing to do"; exit 1; fi ;;
  *) ARCH="8.0+PTX" ;;
esac
export TILEFORMER_CUDA_ARCHS=${TILEFORMER_CUDA_ARCHS:-$ARCH}
NPROC=$(nproc)
WORKERS=${TEST_WORKERS:-$(( NPROC >= 12 ? 6 : 2 ))}
PYTEST=($PY -m pytest -q -rfEs -p no:cacheprovider -n "$WORKERS" -m "not slow and not static")
$PY -c "import pytest_timeout" 2>/dev/null && PYTEST+=(--timeout=180)
$PY -c "import xdist" 2>/dev/null || PYTEST=($PY -m pytest -q -rfEs -p no:cacheprovider -m "not slow and not static")
DRYARG=()
if [ "$DRY" = 1 ]; then PYTEST+=(--collect-only -q); DRYARG=(--dry); fi
# Every attention provider but ours in CUDA (those need the extension built below)
PROF_FIRST=triton,sdpa-flash,sdpa-cudnn,flash-attn,flash-attn3,flash-attn4,flashinfer
PROF_FIRST=$PROF_FIRST$($PY -c "from benchmarks import providers as p; print(''.join(','+v.name for v in p.module_variants() if 'flash_attention' in v.ops))" 2>/dev/null)
[ "$DRY" = 1 ] && PROF_FIRST=torch,sdpa-flash

# ---- a. ceilings ---------------------------------------------------------------------------------------
say "a. ceilings: bf16/fp32 matmul 8192^3 and a 2 GiB device copy (triton.testing.do_bench)"
run_for 60 ceilings $PY -m benchmarks.ceilings --out "$BENCH" "${DRYARG[@]}"

# ---- b. build (background) || per-kernel profile of the Triton paths and the peers, then the CUDA paths -----
# Built into $WORK/ext (not in place): nothing running meanwhile may import a half-written .so.
if [ "$DRY" = 1 ] && [ "${GPU_SESSION_DRY_BUILD:-0}" != 1 ]; then
  say "b. DRY: build skipped (GPU_SESSION_DRY_BUILD=1 runs it); the in-place extension, if any, serves"
  echo 0 > "$WORK/build.rc"; BUILD_PID=
else
  say "b. build transformer._C for arch $TILEFORMER_CUDA_ARCHS (MAX_JOBS $(( NPROC / 2 ))) || profile (Triton, peers)"
  ( run_for "$BUILD_S" build env TILEFORMER_SKIP_EMU_BUILD=1 MAX_JOBS=$(( NPROC / 2 )) \
      $PY setup.py build_ext -b "$WORK/ext" -t "$WORK/ext_tmp" > "$LOGS/build.log" 2>&1
    echo $? > "$WORK/build.rc" ) &
  BUILD_PID=$!
fi
PROF1_S=$(( BUILD_S - $(elapsed) ))    # until the build is done, at least 120 s
[ "$PROF1_S" -lt 120 ] && PROF1_S=120
run_for "$PROF1_S" profile_triton_peers $PY -m benchmarks.profile_kernels --out "$BENCH" --d 128,64 \
  --providers "$PROF_FIRST" --deadline $(( $(date +%s) + PROF1_S - 25 )) "${DRYARG[@]}"
if [ -n "$BUILD_PID" ]; then
  say "waiting for the build"
  wait "$BUILD_PID"
fi
BUILD_RC=$(cat "$WORK/build.rc" 2>/dev/null || echo 1)
if [ -n "$BUILD_PID" ]; then
  grep -E "spill|error|Error" "$LOGS/build.log" | grep -v " 0 bytes spill" | head -20
  if [ "$BUILD_RC" = 0 ] && cp "$WORK"/ext/transformer/_C*.so transformer/ 2>/dev/null; then
    say "build OK: $(ls transformer/_C*.so)"
  else
    say "BUILD FAILED (rc $BUILD_RC): the cuda backend is unavailable below; last lines of the build log:"
    tail -n 40 "$LOGS/build.log"
  fi
fi
$PY -c "import transformer; [print('  backend', k, v) for k, v in transformer.backends.available().items()]"
say "b. the sm_90a self-tests' GPU halves (wgmma / TMA / mbarrier against torch; skipped unless sm_90) and the named-barrier turns the sm_90a forward uses, before timing"
run_for 90 selftest_hopper "${PYTEST[@]}" -k gpu tests/test_emulator_hopper.py \
  tests/test_emulator.py::test_named_barrier_turns_alternate \
  --junitxml="$LOGS/selftest_hopper.xml" > "$LOGS/selftest_hopper.log" 2>&1
tail -n 15 "$LOGS/selftest_hopper.log"
run_for 60 profile_cuda $PY -m benchmarks.profile_kernels --out "$BENCH" --append --d 128,64 \
  --providers cuda,cuda-fwd-sm80,cuda-bwd-sm80 --deadline $(( $(date +%s) + 45 )) "${DRYARG[@]}"

# ---- c. timing sweep -------------------------------------------------------------------------------------
say "c. timing, quick sweep (every backend and variant but the fp32 reference; the peers that import)"
TIMING_S=$(( $(left) - 150 ))   # leaves 45 s for the correctness table, 105 s for the tests
if [ "$DRY" = 1 ]; then
  run_for 90 timing $PY -m benchmarks.run --sweep cpu --ops rms_norm --providers torch --cpu-budget 0.02 \
    --sections timing --append --out "$BENCH" --budget 60
else
  run_for "$TIMING_S" timing env TRITON_PRINT_AUTOTUNING=1 $PY -m benchmarks.run --quick --sections timing --append \
    --out "$BENCH" --budget $(( TIMING_S > 40 ? TIMING_S - 30 : 10 ))
fi

# ---- d. tests ----------------------------------------------------------------------------------------------
say "d. correctness table (every backend on the GPU vs transformer.reference)"
CORR_OPS=()
[ "$DRY" = 1 ] && CORR_OPS=(--ops rms_norm)
run_for 45 correctness $PY -m benchmarks.run --sections correctness --out "$BENCH" --budget 35 "${CORR_OPS[@]}"
say "d. CUDA-backend GPU tests (+ the emulator self-tests' GPU halves: fragment layouts on the hardware)"
# test_emulator.py names its hardware halves "...-gpu]" (marked gpu); the other files name the backend "cuda".
run_for $(( $(left) - 60 )) tests_cuda "${PYTEST[@]}" \
  -k "(cuda and not test_triton_cuda_graph_capture) or (test_emulator and gpu)" \
  tests/test_emulator.py tests/test_cuda_attention.py tests/test_cuda_decode.py tests/test_cuda_norms.py \
  tests/test_cuda_attention_sm90.py tests/test_cuda_attention_bwd_sm90.py \
  tests/test_attention.py tests/test_norms.py tests/test_decode.py \
  --junitxml="$LOGS/tests_cuda.xml" > "$LOGS/tests_cuda.log" 2>&1
tail -n 30 "$LOGS/tests_cuda.log"
say "d. Triton-backend GPU tests"
run_for $(( $(left) - 30 )) tests_triton "${PYTEST[@]}" -k "not cuda or triton" \
  tests/test_attention.py tests/test_norms.py tests/test_decode.py tests/test_sdpa.py \
  --junitxml="$LOGS/tests_triton.xml" > "$LOGS/tests_triton.log" 2>&1
tail -n 30 "$LOGS/tests_triton.log"
run_for $(( $(left) - 12 )) tests_rest "${PYTEST[@]}" tests/test_api.py tests/test_modules.py tests/test_models.py \
  tests/test_generate.py --junitxml="$LOGS/tests_rest.xml" > "$LOGS/tests_rest.log" 2>&1
tail -n 15 "$LOGS/tests_rest.log"

# ---- summary (the end of the output is what the device tool shows) ------------------------------------------
say "summary"
cat "$LOGS/parts.txt"
for f in tests_cuda tests_triton tests_rest; do
  [ -f "$LOGS/$f.log" ] || continue
  res=$(grep -E '(passed|failed|error|collected)' "$LOGS/$f.log" | tail -1)
  # collected only (dry run): "tests/test_x.py: N" per file
  [ -z "$res" ] && res=$(awk -F': ' '/^tests\/[^ ]+: [0-9]+$/ {n += $2; f = f " " $1 "=" $2} END {if (n) print n " selected (collected only):" f}' "$LOGS/$f.log")
  echo "  $f: $res"
done
$PY - "$BENCH" <<'EOF'
import collections, csv, os, sys
bench = sys.argv[1]
def rows(name):
    path = os.path.join(bench, name)
    return list(csv.DictReader(open(path))) if os.path.exists(path) else None
ceil = rows("ceilings.csv")
for r in ceil or []:
    print(f"  ceiling {r['metric']:<12} {float(r['value']):.4g} {r['unit']}"
          + (f" ({100 * float(r['value']) / float(r['datasheet']):.0f}% of the data sheet's {r['datasheet']})" if r["datasheet"] else ""))
try:
    from benchmarks import providers
    status = providers.peer_status()
except Exception as e:
    status = {}
    print("  peers: not listed:", type(e).__name__, e)
timed = collections.Counter(r["backend"] for r in rows("bench.csv") or [] if r["metric"] == "time" and r["median"])
profiled = {r["provider"] for r in rows("kernels.csv") or []}
ran = [f"{p} ({timed[p]} timed cases{', profiled' if p in profiled else ''})" for p in status if timed[p] or p in profiled]
missing = [f"{p} ({s})" for p, s in status.items() if s != "importable"]
idle = [p for p, s in status.items() if s == "importable" and not timed[p] and p not in profiled]
print("  peers that ran: " + (", ".join(ran) or "none"))
print("  peers missing: " + (", ".join(missing) or "none"))
if idle:
    print("  peers importable but not run (out of time, or not available for these cases): " + ", ".join(idle))
corr = rows("correctness.csv")
if corr is not None:
    print("  correctness:", dict(collections.Counter(r["status"] for r in corr)))
    for r in corr:
        if r["status"] in ("FAIL", "ERROR"):
            print(f"    {r['status']} {r['backend']} {r['op']} {r['mode']} {r['dtype']} {r['shape']}: {r['detail'][:200]}")
EOF
[ -f "$BENCH/kernels.txt" ] && grep -E "^(\S|  total)" "$BENCH/kernels.txt" | head -60
[ -f "$BENCH/run.log" ] && sed -n '/^Summary/,/^wrote/p' "$BENCH/run.log" | head -40
