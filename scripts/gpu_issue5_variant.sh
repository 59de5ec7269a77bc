#!/usr/bin/env bash
# Device-machine call (one GPU): schedule knobs incl. one_variant on CUDA (tests), side by side on
# anchor cases, then the e2e step (floor, hf_flex) at 4096 and the recompile count.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pytest -q -x -n 8 -p no:cacheprovider tests/test_kernels.py tests/gpu/test_gpu_parity.py -k "schedules or recompile" 2>&1 | tail -2
python3 scripts/tune_schedule.py --cases ${CASES:-1,2,3,4,7} --budget-s 240 --json "$OUT/schedule.json" 2>&1 | tail -12
python3 -m hf_flex.bench --e2e-only --e2e-S 4096 --e2e-variants floor,hf_flex --e2e-timeout 200 --json "$OUT/e2e.json" 2>&1 | tail -6
