#!/usr/bin/env bash
# Device-machine call (one GPU) for issue 5, fifth round: the backward's pipelining depth re-measured
# (the fourth round's kernels compile without spills at 3 stages), side by side with torch flex on the
# D=128 anchor cases (VARIANTS, CASES, BUDGET from the env).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 scripts/tune_schedule.py --budget-s ${BUDGET:-420} --cases ${CASES:-1,0,3,4,6,5} \
  --variants ${VARIANTS:-main,bwd_stages3,bwd_dkdv_stages3,bwd_dq_stages3,bwd_stages3_ahead} --json "$OUT/schedule.json" 2>&1 | tail -20
