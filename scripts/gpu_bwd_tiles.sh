#!/usr/bin/env bash
# Device-machine call (one GPU): the Gluon causal backward in one-warpgroup programs, two an SM
# (SCHEDULE["gluon_bwd_tiles"], variants gluon_bwd_w4_64 / gluon_bwd_w4_32): its GPU tests, then side by
# side with the default tiles on the causal and sliding anchor cases; then (E2E=1) the 16k end-to-end
# step with the document-aligned Gluon forward on and off (floor and hf_flex interleaved).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
timeout 200 python3 -m pytest -q -n 8 -p no:cacheprovider -m gpu tests/gpu/test_gpu_gluon_causal.py -k other_tiles 2>&1 | tail -4
timeout 200 python3 scripts/tune_schedule.py --cases ${CASES:-0,1,2,6} --variants main,gluon_bwd_w4_64,gluon_bwd_w4_32 \
  --rounds ${ROUNDS:-3} --budget-s 150 --json "$OUT/schedule_gluon_bwd_tiles.json" 2>&1 | grep -v '^{"case"' | tail -8
if [ -n "${E2E:-}" ]; then
  for ab in on off; do
    v=true; [ $ab = off ] && v=false
    HF_FLEX_E2E_SCHEDULE="{\"gluon_varlen_fwd\": $v}" timeout 150 python3 -m hf_flex.bench --e2e-only --e2e-S 16384 \
      --e2e-variants floor,hf_flex --no-recompiles --json "$OUT/e2e_16384_varlen_fwd_$ab.json" 2>&1 | grep -E "^ *16384|overhead ms"
  done
fi
