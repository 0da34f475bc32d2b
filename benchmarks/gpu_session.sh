#!/usr/bin/env bash
# One prepared run for a lent GPU machine (the device tool): build, GPU tests and benchmarks inside one
# command of TOTAL_S seconds (default 540): a 15-minute lease (900 s, the machine's start of a minute or two
# included) holds it with about 4 minutes left to rerun one part on the warm machine. From the repository root:
#
#   TILEFORMER_GIT_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_session.sh      # device: timeout_s 590
#
# It uses the machine's own python3 (its torch/triton; no venv, nothing is installed) and does, each part
# under its own time limit (a part that runs out is stopped, reported and the next one starts):
#   1. build transformer._C for the GPU found (nvcc, that arch only, no emulated build), into a separate
#      folder, WHILE the Triton-backend GPU tests run (they do not need the extension);
#   2. the benchmark correctness table (every backend, on the GPU, vs transformer.reference);
#   3. the timing sweep (--quick: attention fwd/bwd/fwd+bwd, decode, norms; peers when installed), then the
#      per-kernel time of the attention fwd+bwd (benchmarks.profile_kernels);
#   4. the CUDA-backend GPU tests (the emulator's GPU halves, i.e. mma/ldmatrix layouts on real hardware),
#      then the module/model tests with the time left.
# Everything lands in $OUT (the device tool's folder; /tmp/tileformer_gpu_out elsewhere): session.log (all
# output), results.tgz (bench/ = benchmarks.run's output folder, logs/ = build and pytest logs + junit xml;
# .bench.partial-<pid>/ = the output of a benchmarks.run part stopped at its time limit, if any).
# Unpack with `tar xzf results.tgz` and copy bench/ to benchmarks/results/<gpu>/.
#
# Knobs: TOTAL_S, BUILD_S, PYTHON, TILEFORMER_CUDA_ARCHS (default: the GPU's own), TEST_WORKERS;
# GPU_SESSION_DRY=1 walks through the parts on a machine without a GPU (to check this script).
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)
T0=$(date +%s)
TOTAL_S=${TOTAL_S:-540}
BUILD_S=${BUILD_S:-220}
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/tileformer_gpu_out}
WORK=$(mktemp -d /tmp/tileformer_gpu.XXXX)
LOGS=$WORK/logs
BENCH=$WORK/bench
mkdir -p "$OUT" "$LOGS" "$BENCH"
exec > >(tee "$OUT/session.log") 2>&1
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
[ -x "$CUDA_HOME/bin/nvcc" ] || CUDA_HOME=$(dirname "$(dirname "$(command -v nvcc 2>/dev/null || echo /x/x/nvcc)")")

elapsed() { echo $(( $(date +%s) - T0 )); }
left() { echo $(( TOTAL_S - $(elapsed) )); }
say() { echo "[gpu_session $(elapsed)s] $*"; }
# run_for SECONDS NAME CMD...: run CMD with a time limit (SIGINT first so pytest prints its summary)
run_for() {
  local limit=$1 name=$2; shift 2
  if [ "$limit" -lt 20 ]; then say "SKIP $name: only ${limit}s left"; echo "$name: skipped (no time)" >> "$LOGS/parts.txt"; return 0; fi
  say "START $name (limit ${limit}s): $*"
  local t=$(date +%s)
  timeout -s INT -k 20 "$limit" "$@"
  local rc=$?
  say "END $name: rc=$rc in $(( $(date +%s) - t ))s$([ $rc -eq 124 ] && echo ' (stopped at its time limit)')"
  echo "$name: rc=$rc $(( $(date +%s) - t ))s" >> "$LOGS/parts.txt"
  return $rc
}
pack() {
  cp "$OUT/session.log" "$LOGS/" 2>/dev/null
  # .bench.partial-<pid>: the output of a benchmarks.run stopped before it finished (bench/ keeps the last complete one)
  tar czf "$OUT/results.tgz" -C "$WORK" bench logs $(cd "$WORK" && ls -d .bench.partial-* 2>/dev/null) \
    && say "packed $OUT/results.tgz ($(du -h "$OUT/results.tgz" | cut -f1))"
}
trap pack EXIT

# ---- 0. the machine ----------------------------------------------------------------------------------
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
EOF
echo "  cpus $(nproc), nvcc $($CUDA_HOME/bin/nvcc --version 2>/dev/null | tail -1)"
CC=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null || echo none)
case "$CC" in
  9.*) ARCH=9.0a ;;
  8.*) ARCH=8.0 ;;
  none) if [ "${GPU_SESSION_DRY:-0}" = 1 ]; then ARCH=9.0a; say "DRY RUN without a GPU (GPU_SESSION_DRY=1)";
        else say "no GPU: nothing to do"; exit 1; fi ;;
  *) ARCH="8.0+PTX" ;;
esac
export TILEFORMER_CUDA_ARCHS=${TILEFORMER_CUDA_ARCHS:-$ARCH}
NPROC=$(nproc)
WORKERS=${TEST_WORKERS:-$(( NPROC >= 12 ? 6 : 2 ))}
PYTEST=($PY -m pytest -q -rfEs -p no:cacheprovider -n "$WORKERS" -m "not slow and not static")
$PY -c "import pytest_timeout" 2>/dev/null && PYTEST+=(--timeout=180)
$PY -c "import xdist" 2>/dev/null || PYTEST=($PY -m pytest -q -rfEs -p no:cacheprovider -m "not slow and not static")

# ---- 1. build (background) || Triton GPU tests ---------------------------------------------------------
# Built into $WORK/ext (not in place): the tests running meanwhile must never import a half-written .so.
say "1. build transformer._C for arch $TILEFORMER_CUDA_ARCHS (MAX_JOBS $(( NPROC / 2 ))) || Triton GPU tests"
( run_for "$BUILD_S" build env TILEFORMER_SKIP_EMU_BUILD=1 MAX_JOBS=$(( NPROC / 2 )) \
    $PY setup.py build_ext -b "$WORK/ext" -t "$WORK/ext_tmp" > "$LOGS/build.log" 2>&1
  echo $? > "$WORK/build.rc" ) &
BUILD_PID=$!
run_for $(( BUILD_S - 40 )) tests_triton "${PYTEST[@]}" -k "not cuda or triton" \
  tests/test_attention.py tests/test_norms.py tests/test_decode.py tests/test_sdpa.py \
  --junitxml="$LOGS/tests_triton.xml" > "$LOGS/tests_triton.log" 2>&1
tail -n 30 "$LOGS/tests_triton.log"
wait $BUILD_PID
BUILD_RC=$(cat "$WORK/build.rc" 2>/dev/null || echo 1)
grep -E "spill|error|Error" "$LOGS/build.log" | grep -v " 0 bytes spill" | head -20
if [ "$BUILD_RC" = 0 ] && cp "$WORK"/ext/transformer/_C*.so transformer/ 2>/dev/null; then
  say "build OK: $(ls transformer/_C*.so)"
else
  say "BUILD FAILED (rc $BUILD_RC): the cuda backend is unavailable below; last lines of the build log:"
  tail -n 40 "$LOGS/build.log"
fi
$PY -c "import transformer; [print('  backend', k, v) for k, v in transformer.backends.available().items()]"

# ---- 2. correctness table, 3. timing ------------------------------------------------------------------
say "2. correctness table (every backend on the GPU vs transformer.reference)"
CORR_S=$(( $(left) < 80 ? $(left) - 10 : 70 ))
run_for "$CORR_S" correctness $PY -m benchmarks.run --sections correctness --out "$BENCH" --budget $(( CORR_S - 15 ))
say "3. timing, quick sweep"
TIMING_S=$(( $(left) - 130 ))   # leaves 40 s for the kernel profile, 60 s for the CUDA tests, 20 s for the rest
run_for "$TIMING_S" timing env TRITON_PRINT_AUTOTUNING=1 $PY -m benchmarks.run --quick --sections timing --append --out "$BENCH" \
  --budget $(( TIMING_S > 40 ? TIMING_S - 30 : 10 ))

say "3b. per-kernel time of the attention fwd+bwd (N 8k, D 128)"
run_for $(( $(left) < 130 ? $(left) - 90 : 40 )) profile $PY -m benchmarks.profile_kernels --out "$BENCH"

# ---- 4. CUDA-backend GPU tests, then the rest ------------------------------------------------------------
say "4. CUDA-backend GPU tests"
run_for $(( $(left) - 30 )) tests_cuda "${PYTEST[@]}" -k "cuda and not test_triton_cuda_graph_capture" \
  tests/test_emulator.py tests/test_cuda_attention.py tests/test_cuda_decode.py tests/test_cuda_norms.py \
  tests/test_attention.py tests/test_norms.py tests/test_decode.py \
  --junitxml="$LOGS/tests_cuda.xml" > "$LOGS/tests_cuda.log" 2>&1
tail -n 30 "$LOGS/tests_cuda.log"
run_for $(( $(left) - 10 )) tests_rest "${PYTEST[@]}" tests/test_api.py tests/test_modules.py tests/test_models.py \
  tests/test_generate.py --junitxml="$LOGS/tests_rest.xml" > "$LOGS/tests_rest.log" 2>&1
tail -n 15 "$LOGS/tests_rest.log"

# ---- summary (the end of the output is what the device tool shows) ------------------------------------------
say "summary"
cat "$LOGS/parts.txt"
for f in tests_triton tests_cuda tests_rest; do
  [ -f "$LOGS/$f.log" ] && echo "  $f: $(grep -E '(passed|failed|error)' "$LOGS/$f.log" | tail -1)"
done
[ -f "$BENCH/correctness.csv" ] && $PY - "$BENCH/correctness.csv" <<'EOF'
import collections, csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
print("  correctness:", dict(collections.Counter(r["status"] for r in rows)))
for r in rows:
    if r["status"] in ("FAIL", "ERROR"):
        print(f"    {r['status']} {r['backend']} {r['op']} {r['mode']} {r['dtype']} {r['shape']}: {r['detail'][:200]}")
EOF
[ -f "$BENCH/run.log" ] && sed -n '/^Summary/,/^wrote/p' "$BENCH/run.log" | head -40
