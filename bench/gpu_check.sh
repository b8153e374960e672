#!/usr/bin/env bash
# GPU check in one call, for a machine with an NVIDIA GPU and no network:
#   build retain with CUDA kernels, `retain info`, the test suite (CUDA tests run there), then
#   `retain bench --device cuda`. Run from anywhere inside the repository:
#
#     bash bench/gpu_check.sh                 # writes $OUT/bench_cuda.{json,md} (OUT=bench/results)
#     OUT=/tmp/out SKIP_BUILD=1 bash bench/gpu_check.sh
#     BENCH_ARGS="--impl retain,eager,compile" bash bench/gpu_check.sh
#
# Environment: OUT (results folder), RETAIN_CUDA_ARCHS (default 90), SKIP_BUILD=1 (already
# installed), SKIP_TESTS=1, PYTEST_ARGS (default: -q -m "not slow" -p no:cacheprovider),
# BENCH_ARGS (extra `retain bench` arguments), BENCH_DEVICE (default cuda; cpu for a dry run).
# Logs of every step go to $OUT/gpu_*.log.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/bench/results}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
T_ALL=$SECONDS

step() {  # step NAME LOG CMD...: run CMD, tee its output to LOG, report the time it took
  local name="$1" log="$2" t0=$SECONDS rc=0
  shift 2
  echo
  echo "=== $name"
  if [ "${QUIET:-0}" = "1" ]; then
    "$@" >"$log" 2>&1 || { rc=$?; tail -n 40 "$log"; }
  else
    "$@" 2>&1 | tee "$log" || rc=$?
  fi
  echo "=== $name: $([ $rc -eq 0 ] && echo ok || echo "FAILED (exit $rc)") in $((SECONDS - t0)) s (log: $log)"
  return $rc
}

echo "=== GPU"
nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader
command -v nvcc >/dev/null && nvcc --version | tail -n 2 || echo "nvcc not on PATH (CMake may still find CUDA)"
"$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'available:', torch.cuda.is_available())"
# peers of the scan cases (fla's fused-recurrent and chunk delta rules) run only when fla imports
"$PY" -c "import fla; print('flash-linear-attention', fla.__version__)" 2>/dev/null \
  || echo "flash-linear-attention not installed: its peers are reported as not installed"

if [ "${SKIP_BUILD:-0}" != "1" ]; then
  export RETAIN_CUDA=ON RETAIN_CUDA_ARCHS="${RETAIN_CUDA_ARCHS:-90}"
  export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
  # the verbose build log goes to the file only; its tail is printed when it fails
  QUIET=1 step "build (RETAIN_CUDA=ON, archs $RETAIN_CUDA_ARCHS)" "$OUT/gpu_build.log" \
    "$PY" -m pip install --no-build-isolation --no-deps --no-index -v .
  grep -E "CUDA|nvcc|sm_|Successfully" "$OUT/gpu_build.log" | grep -v "^ *$" | tail -n 8 || true
fi

# (the repository root has no retain/ folder: `import retain` is the installed package with its _C)
step "retain info" "$OUT/gpu_info.log" "$PY" -m retain info

rc_tests=0
if [ "${SKIP_TESTS:-0}" != "1" ]; then
  # CUDA tests skip themselves without a GPU; here they run. Failures are reported, the bench still runs.
  # shellcheck disable=SC2086
  step "tests" "$OUT/gpu_tests.log" "$PY" -m pytest tests ${PYTEST_ARGS:--q -m "not slow" -p no:cacheprovider} \
    || rc_tests=$?
fi

# shellcheck disable=SC2086
step "retain bench --device ${BENCH_DEVICE:-cuda}" "$OUT/gpu_bench.log" "$PY" -m retain bench --device "${BENCH_DEVICE:-cuda}" \
  --json "$OUT/bench_cuda.json" --markdown "$OUT/bench_cuda.md" ${BENCH_ARGS:-}

echo
echo "=== summary ($(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)), total $((SECONDS - T_ALL)) s"
"$PY" - "$OUT/bench_cuda.json" <<'PYEOF'
import json, sys
rep = json.load(open(sys.argv[1]))
c = rep["ceilings"]
print(f"ceilings: copy {c['copy_gbps']:.0f} GB/s, float32 matmul {c['matmul_gflops'] / 1e3:.1f} TFLOP/s")
print(f"{'op':18s} {'dir':8s} {'impl':17s} {'ms':>10s} {'/retain':>8s} {'GB/s':>7s} {'%copy':>6s}")
for r in rep["results"]:
    if r["status"] != "ok":
        print(f"{r['op']:18s} {r['direction']:8s} {r['impl']:17s} {r['status']}")
        continue
    print(f"{r['op']:18s} {r['direction']:8s} {r['impl']:17s} {r['median_ms']:10.3f} "
          f"{r.get('time_vs_retain', float('nan')):8.2f} {r.get('gbps', float('nan')):7.0f} "
          f"{r.get('pct_copy', float('nan')):6.0f}")
PYEOF
[ $rc_tests -eq 0 ] || echo "NOTE: tests FAILED (exit $rc_tests), see $OUT/gpu_tests.log"
exit $rc_tests
