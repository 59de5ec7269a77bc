#!/usr/bin/env bash
# Device-machine call (one GPU) for issue 5, third round: ragged tail blocks listed partial (full-block
# loops unchecked), softcap's tanh.approx, tile variants. CUDA tests first, then
# scripts/tune_schedule.py side by side with torch flex (VARIANTS, CASES, SHRINK, BUDGET from the env).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
if [ -n "${TESTS:-}" ]; then
  python3 -m pytest -q -n 8 -p no:cacheprovider $TESTS 2>&1 | tail -15
fi
python3 -m pytest -q -s -p no:cacheprovider tests/gpu/test_gpu_parity.py -k "softcap_approx" 2>&1 | grep -E "errors vs|passed|failed" | tail -5
python3 scripts/tune_schedule.py --budget-s ${BUDGET:-330} ${CASES:+--cases $CASES} ${SHRINK:+--shrink $SHRINK} \
  --variants ${VARIANTS:-main,divisible_variant} --json "$OUT/schedule${SHRINK:+_shrink$SHRINK}.json" 2>&1 | tail -30
