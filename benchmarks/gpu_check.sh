#!/usr/bin/env bash
# One call on the GPU machine (device tool): build from source there, CUDA tests, compute-sanitizer memcheck
# on small lora_linear cases, then the GPU benchmarks. Everything lands under $OUT (at most 8 files come back):
#   env.txt, build.log, tests.log, memcheck.log, bench.tar.gz (results.json, report.md, plots)
# Usage there:  bash benchmarks/gpu_check.sh [--only lora,svd] ; budget: under 6 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
ONLY=${1:-}
export PYTHONUNBUFFERED=1 LOWRANK_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
PY=${PYTHON:-python3}
status=0

{ date -u; nvidia-smi; $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"; nvcc --version; } > "$OUT/env.txt" 2>&1

echo "== build" >&2
if ! $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
  echo "build failed: see build.log" >&2; tail -40 "$OUT/build.log" >&2; exit 1
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
$PY -c "import lowrank; assert lowrank.WITH_CUDA; print('lowrank', lowrank.__file__, 'CUDA kernels: yes')" >&2 || exit 1

echo "== CUDA tests" >&2
timeout 240 $PY -m pytest -q -x -p no:cacheprovider -k "cuda or CUDA" tests > "$OUT/tests.log" 2>&1 || status=1
tail -3 "$OUT/tests.log" >&2

echo "== memcheck" >&2
if command -v compute-sanitizer > /dev/null; then
  timeout 120 compute-sanitizer --tool memcheck --error-exitcode 3 $PY benchmarks/memcheck_case.py > "$OUT/memcheck.log" 2>&1 || status=1
  tail -3 "$OUT/memcheck.log" >&2
else
  echo "compute-sanitizer not found" > "$OUT/memcheck.log"
fi

echo "== benchmarks" >&2
timeout 300 $PY -m benchmarks --device cuda --quick ${ONLY:+--only $ONLY} --out "$OUT/bench" > "$OUT/bench.log" 2>&1 || status=1
tail -30 "$OUT/bench.log" >&2
tar -C "$OUT" -czf "$OUT/bench.tar.gz" bench bench.log 2>/dev/null && rm -rf "$OUT/bench" "$OUT/bench.log"
exit $status
