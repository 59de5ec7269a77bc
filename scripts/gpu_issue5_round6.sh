#!/usr/bin/env bash
# Device-machine call (one GPU) for issue 5, sixth round: (1) peak memory in the benchmark's own loop
# (each step's output kept through the next step), traced from the first step; (2) forward tile
# variants on the sliding, document and D=64 cases, side by side with torch flex.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
if [ "${TRACE:-1}" = 1 ]; then
  python3 scripts/trace_peak.py --S ${TRACE_S:-4096} --warm 1 --keep-output --json "$OUT/trace_keep_${TRACE_S:-4096}.json" 2>&1 | tail -30
fi
python3 scripts/tune_schedule.py --budget-s ${BUDGET:-300} --cases ${CASES:-6,4,1} \
  --variants ${VARIANTS:-main,fwd_part128,fwd_stages4} --json "$OUT/schedule.json" 2>&1 | tail -24
if [ -n "${CASES64:-}" ]; then
  python3 scripts/tune_schedule.py --budget-s ${BUDGET64:-150} --cases $CASES64 \
    --variants ${VARIANTS64:-main,d64_tma,d64_full128,d64_full128_tma,d64_w4,d64_stages4} --json "$OUT/schedule_d64.json" 2>&1 | tail -12
fi
