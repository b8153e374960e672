#!/usr/bin/env bash
# Regenerate the committed CPU results in bench/results/ (about 10 minutes on 2 cores).
# Each run first waits (up to 5 minutes) for other processes to leave the CPUs idle and measures
# a cell again (up to 3 times) when they did not; check the
# `noisy` flags and the before/after ceilings in the .md files, and rerun a file that has them.
#
#   bash bench/make_results.sh            # everything
#   bash bench/make_results.sh default    # one of: default sweep cold plot memory capability large fisher replay cache
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
R=bench/results
mkdir -p "$R"
what="${1:-all}"
run() { python -m retain bench --wait-quiet 300 --retry-noisy 3 "$@"; }
for op in linear_recurrence gated_delta_rule; do
  if [[ $what == all || $what == default ]]; then
    run --op $op --json $R/${op}_cpu.json --markdown $R/${op}_cpu.md
  fi
  if [[ $what == all || $what == sweep ]]; then
    run --op $op --sweep-T 512,1024,2048,4096,8192 --json $R/${op}_cpu_sweep.json --markdown $R/${op}_cpu_sweep.md
  fi
  if [[ $what == all || $what == sweep || $what == plot ]]; then
    python bench/plot.py $R/${op}_cpu_sweep.json -o $R/${op}_cpu.png
  fi
done
if [[ $what == all || $what == default ]]; then
  run --op tm_loss --json $R/tm_loss_cpu.json --markdown $R/tm_loss_cpu.md
  run --op kl_imitation --json $R/kl_imitation_cpu.json --markdown $R/kl_imitation_cpu.md
  run --op feature_imitation --json $R/feature_imitation_cpu.json --markdown $R/feature_imitation_cpu.md
fi
if [[ $what == all || $what == cold ]]; then
  run --op linear_recurrence --impl retain,numba,eager,assoc-scan --cold-heap \
    --json $R/linear_recurrence_cpu_cold_heap.json --markdown $R/linear_recurrence_cpu_cold_heap.md
fi
if [[ $what == all || $what == memory ]]; then
  python bench/scan/peak_memory.py --T 8192 --out $R/gated_delta_rule_peak_memory.md
fi
# Each build of the CPU kernels side by side (--cpu-capability all), and each of the lower builds
# against numba compiled for the same instruction set (NUMBA_CPU_NAME: haswell = AVX2 + FMA,
# x86-64 = the SSE2 baseline, as LLVM's auto-vectoriser leaves the same loop).
if [[ $what == all || $what == capability ]]; then
  for op in gated_delta_rule linear_recurrence; do
    run --op $op --impl retain,compile,numba --cpu-capability all \
      --json $R/${op}_cpu_capabilities.json --markdown $R/${op}_cpu_capabilities.md
    RETAIN_CPU_CAPABILITY=avx2 NUMBA_CPU_NAME=haswell run --op $op --impl retain,numba \
      --json $R/${op}_cpu_avx2_numba_haswell.json --markdown $R/${op}_cpu_avx2_numba_haswell.md
    RETAIN_CPU_CAPABILITY=default NUMBA_CPU_NAME=x86-64 run --op $op --impl retain,numba \
      --json $R/${op}_cpu_default_numba_x86-64.json --markdown $R/${op}_cpu_default_numba_x86-64.md
  done
  for op in tm_loss kl_imitation feature_imitation; do
    run --op $op --impl retain,retain-packed,compile --cpu-capability all \
      --json $R/${op}_cpu_capabilities.json --markdown $R/${op}_cpu_capabilities.md
  done
fi

# The bandwidth-bound ops past the last-level cache (--size large, 1 GiB+ each), every build.
if [[ $what == all || $what == large ]]; then
  run --op tm_loss --op kl_imitation --op feature_imitation --op linear_recurrence --size large \
    --impl retain,retain-packed --cpu-capability all --reps 10 \
    --json $R/bandwidth_ops_cpu_capabilities_large.json --markdown $R/bandwidth_ops_cpu_capabilities_large.md
fi

# The fisher family's multi-tensor ops on a model-sized parameter list (49.3M float32 in 200
# tensors), every build against the per-parameter loop, torch._foreach and torch.compile.
if [[ $what == all || $what == fisher ]]; then
  run --op fisher_accumulate_ --op ewc_penalty --op ewc_penalty_grad_ --cpu-capability all \
    --json $R/fisher_cpu.json --markdown $R/fisher_cpu.md
fi
if [[ $what == all || $what == fisher ]]; then
  rm -f $R/ewc_consolidation_cpu.md
  for model in mlp cnn; do
    python bench/fisher/consolidation.py --model $model --samples 512 --out $R/ewc_consolidation_cpu.md
  done
fi
# The replay family: row gathers/scatters per CPU build, and the workloads against cpprb, torchrl
# and a Mammoth-style loop (the 1 GB checkpoint files go to a temporary folder under bench/).
if [[ $what == all || $what == replay ]]; then
  run --op gather_rows --op scatter_rows_ --cpu-capability all --json $R/replay_cpu.json --markdown $R/replay_cpu.md
  RETAIN_BENCH_DIR=bench python bench/replay/workloads.py --out $R/replay_workloads_cpu.md
fi
# The cache family: the cached readout's modes against the reference (every CPU build), the sweep
# over the number of cached segments with its plot and peak memory, and the recall task.
if [[ $what == all || $what == cache ]]; then
  run --op cached_readout_gated --op cached_readout_sparse --op cached_readout_residual --cpu-capability all \
    --json $R/cache_cpu.json --markdown $R/cache_cpu.md
  python bench/cache/readout.py --md $R/cache_readout_cpu.md --png $R/cache_readout_cpu.png
  python bench/cache/recall.py --md $R/cache_recall_cpu.md
fi
