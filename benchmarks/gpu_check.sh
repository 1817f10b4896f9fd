#!/usr/bin/env bash
# One call on the GPU machine (device tool) that proves every CUDA path: build from source against the torch
# found there, the CUDA tests (kernel tests first), the GPU benchmarks, then compute-sanitizer (memcheck,
# initcheck, racecheck) on small cases that reach every kernel path. Every step has its own time bound and
# writes its output under $OUT as soon as it ends, so a step that hangs or a call cut short still returns
# what ran before it. Worst case, all bounds added: 420 s (under the 10-minute limit of one device command).
#
#   bash benchmarks/gpu_check.sh                 the whole check (needs a CUDA GPU; says so and exits 2 if none)
#   GPU_CHECK_DRY=1 bash benchmarks/gpu_check.sh print the steps, their commands and time bounds; run nothing
#
# Files under $OUT (the device tool returns at most 8): env.txt, build.log, tests.log, bench.log,
# bench_report.md, bench_results.json, sanitizer.log, summary.txt. Exit status: 0 when every step passed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 LOWRANK_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
DRY=${GPU_CHECK_DRY:-0}

# The kernel test files run first, without -x and with --maxfail, so one failure elsewhere cannot hide the
# kernels' results; device-mismatch and registration tests are named explicitly (no "cuda" in their names).
KERNEL_TESTS="tests/test_cuda_paths.py tests/test_lora_linear.py tests/test_lora_multi.py tests/test_lora_linear_quantized.py tests/test_registry.py"
KERNEL_FILTER="cuda or CUDA or device or registered or extension"
PYTEST="$PY -m pytest -q -p no:cacheprovider -rfE"

# name | time bound (s) | command
STEPS=(
  "env|10|nvidia-smi; $PY -c 'import torch; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.get_device_name())'; nvcc --version; command -v compute-sanitizer"
  "build|135|$PY setup.py build_ext --inplace"
  "tests: kernels|65|$PYTEST --maxfail=25 $KERNEL_TESTS -k '$KERNEL_FILTER'"
  "tests: the rest on CUDA|35|$PYTEST --maxfail=25 tests -k 'cuda or CUDA' $(for f in $KERNEL_TESTS; do printf -- '--ignore=%s ' "$f"; done)"
  "benchmarks (lora, multi, svd; GPU shapes)|80|$PY -m benchmarks --device cuda --quick --only lora,multi,svd --out \$BENCH_DIR"
  "memcheck (no caching allocator)|45|PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 3 $PY benchmarks/memcheck_case.py"
  "initcheck|25|PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool initcheck --error-exitcode 3 $PY benchmarks/memcheck_case.py --small"
  "racecheck|25|compute-sanitizer --tool racecheck --error-exitcode 3 $PY benchmarks/memcheck_case.py --small"
)

total=0
for step in "${STEPS[@]}"; do total=$((total + $(cut -d'|' -f2 <<< "$step"))); done

if [ "$DRY" = "1" ]; then
  echo "gpu_check dry run: ${#STEPS[@]} steps, time bounds add up to ${total} s"
  for step in "${STEPS[@]}"; do
    IFS='|' read -r name bound cmd <<< "$step"
    printf '  %-45s <= %4s s   %s\n' "$name" "$bound" "$cmd"
  done
  exit 0
fi

if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2> /dev/null; then
  echo "gpu_check: no CUDA GPU here (torch.cuda.is_available() is False): nothing to check. Run it on the GPU" \
    "machine (device tool), or GPU_CHECK_DRY=1 to see the steps." >&2
  exit 2
fi

mkdir -p "$OUT"
BENCH_DIR=$(mktemp -d)
export BENCH_DIR
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
status=0

log_for() {
  case "$1" in
    env) echo "$OUT/env.txt" ;;
    build) echo "$OUT/build.log" ;;
    tests*) echo "$OUT/tests.log" ;;
    bench*) echo "$OUT/bench.log" ;;
    *) echo "$OUT/sanitizer.log" ;;
  esac
}

run_step() {
  local name=$1 bound=$2 cmd=$3 log rc start
  log=$(log_for "$name")
  start=$(date +%s)
  {
    echo "===== $name (bound ${bound} s): $cmd"
    timeout -k 5 "$bound" bash -c "$cmd"
    rc=$?
    echo "===== $name: exit $rc after $(($(date +%s) - start)) s"
    exit $rc
  } >> "$log" 2>&1
  rc=$?
  local verdict=ok
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then verdict="TIMED OUT"; elif [ $rc -ne 0 ]; then verdict="FAILED ($rc)"; fi
  printf '%-45s %-12s %4s s  -> %s\n' "$name" "$verdict" "$(($(date +%s) - start))" "$(basename "$log")" | tee -a "$SUMMARY"
  return $rc
}

echo "gpu_check: ${#STEPS[@]} steps, bounds add up to ${total} s; logs under $OUT" | tee -a "$SUMMARY"
for step in "${STEPS[@]}"; do
  IFS='|' read -r name bound cmd <<< "$step"
  case "$name" in
    tests*)
      if ! $PY -c "import pytest, hypothesis" 2> /dev/null; then
        echo "$name: SKIPPED: pytest or hypothesis is missing on this machine (carry them as wheels)" | tee -a "$SUMMARY"
        status=1
        continue
      fi
      ;;
    memcheck* | initcheck | racecheck)
      if ! command -v compute-sanitizer > /dev/null; then
        echo "$name: SKIPPED: compute-sanitizer not found" | tee -a "$SUMMARY"
        continue
      fi
      ;;
  esac
  run_step "$name" "$bound" "$cmd"
  rc=$?
  [ $rc -ne 0 ] && status=1
  case "$name" in
    build)
      if [ $rc -ne 0 ]; then
        tail -40 "$OUT/build.log" >&2
        echo "gpu_check: the build failed; nothing else can run" | tee -a "$SUMMARY"
        exit 1
      fi
      export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
      $PY -c "import lowrank; assert lowrank.WITH_CUDA; print('lowrank', lowrank.__file__, 'with CUDA kernels')" \
        >> "$OUT/build.log" 2>&1 || {
        echo "gpu_check: lowrank does not import with its CUDA kernels (build.log)" | tee -a "$SUMMARY"
        exit 1
      }
      ;;
    tests*)
      # pytest's exit 5: nothing collected -- say it rather than pass silently
      [ $rc -eq 5 ] && echo "$name: NO TESTS COLLECTED (check the -k filter and the test dependencies)" | tee -a "$SUMMARY"
      grep -E "^(FAILED|ERROR) |[0-9]+ (passed|failed)" "$OUT/tests.log" | tail -30 >> "$SUMMARY"
      ;;
    bench*)
      cp "$BENCH_DIR/report.md" "$OUT/bench_report.md" 2> /dev/null
      cp "$BENCH_DIR/results.json" "$OUT/bench_results.json" 2> /dev/null
      ;;
  esac
done
echo "gpu_check: done, exit $status" | tee -a "$SUMMARY"
cat "$SUMMARY"
exit $status
