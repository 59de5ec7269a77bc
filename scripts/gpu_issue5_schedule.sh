#!/usr/bin/env bash
# Device-machine call (one GPU) for issue 5: the schedule variants on CUDA (tests first), the
# block-table timings (BLOCK_TABLES=0 skips them), then scripts/tune_schedule.py side by side with torch
# flex (env: CASES, VARIANTS, ROUNDS, BUDGET).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -m pytest -q -x -n 8 -p no:cacheprovider tests/test_kernels.py -k "${TESTS:-schedules or gqa or lengths}" 2>&1 | tail -3
if [ "${BLOCK_TABLES:-1}" != 0 ]; then
  python3 -c "import json, hf_flex.bench as b; r=b.block_mask_timings(); print(json.dumps(r)); json.dump(r, open('$OUT/block_tables.json','w'), indent=1)"
fi
python3 scripts/tune_schedule.py --budget-s ${BUDGET:-330} ${CASES:+--cases $CASES} ${VARIANTS:+--variants $VARIANTS} \
  ${ROUNDS:+--rounds $ROUNDS} --json "$OUT/schedule.json" 2>&1 | grep -v '^{"case"' | tail -30
