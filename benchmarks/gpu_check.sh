#!/usr/bin/env bash
# The GPU check: GPU tests, then each GPU benchmark, within 8 minutes; tables and one log under $OUT.
# Runs on the lent GPU machine's own python3 (torch+triton there); carried wheels in .whl/ are installed first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
LOG="$OUT/gpu-check.log"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
failed=()
step() {  # step NAME SECONDS CMD...: run one part under its own time limit, keep going on failure
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s) $(date +%T)" | tee -a "$LOG"
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || failed+=("$name(rc=$rc)")
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$LOG"
step gpu-tests 130 python3 -m pytest -q -m gpu -p no:cacheprovider tests
step bench-divergence 85 python3 benchmarks/bench_divergence.py --device cuda
step bench-fused-linear 55 python3 benchmarks/bench_fused_linear.py --device cuda
step bench-token-stats 40 python3 benchmarks/bench_token_stats.py --device cuda --budget 34
step bench-memorization 40 python3 benchmarks/bench_memorization.py --device cuda
step bench-distill-step 70 python3 benchmarks/bench_distill_step.py --device cuda
step bench-distill-memory 100 python3 benchmarks/bench_distill_memory.py --device cuda --max-seconds 75
step bench-teacher-cache 120 python3 benchmarks/bench_teacher_cache.py --device cuda
step bench-attacks 50 python3 benchmarks/bench_attacks.py --device cuda
step bench-uld 40 python3 benchmarks/bench_uld.py --device cuda --n 4096
step bench-attacks-calibrated 60 python3 benchmarks/bench_attacks.py --device cuda --calibrated
echo "=== done $(date +%T); failed: ${failed[*]:-none}" | tee -a "$LOG"
[ ${#failed[@]} = 0 ]
