#!/usr/bin/env bash
# Device-machine call (one GPU), seventeenth round: the Gluon backward within sliding windows and over
# packed documents. A short first test under its own timeout (a barrier-protocol bug hangs the GPU:
# stop there), then the Gluon tests, then the side-by-side schedules (tune_schedule's first case runs
# cold and reads low: CASES starts with a warm-up case whose numbers are not used).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
timeout ${FIRST_S:-150} python3 -m pytest -q -x -p no:cacheprovider ${FIRST_TEST:-tests/gpu/test_gpu_gluon_causal.py} \
  -k "${FIRST_K:-sliding_window and 384-100}" 2>&1 | tail -3 || { echo "FIRST CHECK FAILED"; exit 1; }
timeout ${TESTS_S:-240} python3 -m pytest -q -p no:cacheprovider ${TESTS:-tests/gpu/test_gpu_gluon_causal.py} 2>&1 \
  | tail -${TEST_TAIL:-8}
timeout ${AB_S:-300} python3 scripts/tune_schedule.py --cases ${CASES:-0,6,1} \
  --variants ${VARIANTS:-main,gluon_sliding_off,gluon_bwd_off} --rounds ${ROUNDS:-3} --budget-s ${BUDGET_S:-240} \
  --json "$OUT/schedule.json" 2>&1 | tail -${AB_TAIL:-40}
