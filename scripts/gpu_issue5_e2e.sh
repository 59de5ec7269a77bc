#!/usr/bin/env bash
# Device-machine call (one GPU) for issue 5: block-table timings (GPU and host time apart), the GQA
# schedule cases against float64, then the end-to-end step at the given lengths and the recompile count.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
if [ -z "${SKIP_TABLES:-}" ]; then
python3 -c "import json, hf_flex.bench as b; r=b.block_mask_timings(); print(json.dumps(r)); json.dump(r, open('$OUT/block_tables.json','w'), indent=1)"
fi
[ -n "${CASES:-}" ] && python3 scripts/tune_schedule.py --cases $CASES --json "$OUT/schedule.json" 2>&1 | tail -8
python3 -m hf_flex.bench --e2e-only --e2e-S ${E2E_S:-4096} --e2e-timeout ${E2E_TIMEOUT:-280} ${E2E_FLAGS:-} --json "$OUT/e2e.json" 2>&1 | tail -25
