#!/usr/bin/env bash
# Device-machine call (one GPU), nineteenth round: the Gluon forward's GPU tests (and the Gluon backward's,
# which now read its LSE), then the forward side by side with the Triton forward (variant gluon_fwd_off)
# on the causal and sliding anchor cases, contiguous and token-major.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -m pytest -q -n ${TESTS_N:-8} -p no:cacheprovider -m gpu ${TESTS:-tests/gpu/test_gpu_gluon_forward.py tests/gpu/test_gpu_gluon_causal.py} 2>&1 | tail -${TEST_TAIL:-8}
python3 scripts/tune_schedule.py --cases ${CASES:-0,1,2,3,6} --variants main,gluon_fwd_off --rounds ${ROUNDS:-3} \
  --json "$OUT/schedule_gluon_fwd.json" 2>&1 | tail -12
if [ -n "${TOKENS:-}" ]; then
  python3 scripts/tune_schedule.py --cases ${TOKENS} --variants main,gluon_fwd_off --rounds ${ROUNDS:-3} --tokens \
    --json "$OUT/schedule_gluon_fwd_tokens.json" 2>&1 | tail -8
fi
