#!/usr/bin/env bash
# Device-machine call (one GPU), eighteenth round: the Gluon backwards on Transformers' token-major
# q, k, v. A short first test under its own timeout (a barrier-protocol or coordinate bug can hang the
# GPU: stop there), the Gluon tests, which backward the end-to-end model takes (scripts/probe_e2e_paths.py),
# then the end-to-end step with the token-major Gluon paths on and off (HF_FLEX_E2E_SCHEDULE), each
# against the free-attention floor in its own interleaved run.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
if [ -z "${SKIP_TESTS:-}" ]; then
timeout ${FIRST_S:-150} python3 -m pytest -q -x -p no:cacheprovider ${FIRST_TEST:-tests/gpu/test_gpu_gluon_causal.py} \
  -k "${FIRST_K:-token_major and 128-384-None-dtype0}" 2>&1 | tail -3 || { echo "FIRST CHECK FAILED"; exit 1; }
timeout ${TESTS_S:-300} python3 -m pytest -q -p no:cacheprovider ${TESTS:-tests/gpu/test_gpu_gluon_causal.py tests/gpu/test_gpu_gluon_varlen.py} 2>&1 \
  | tail -${TEST_TAIL:-8}
fi
[ -z "${SKIP_PROBE:-}" ] && timeout 180 python3 scripts/probe_e2e_paths.py --S ${PROBE_S:-16384} --layers 2 2>&1 | tail -4
for S in ${E2E_S:-16384}; do for ab in ${E2E_AB:-on off}; do
  knobs='{}'; [ "$ab" = off ] && knobs='{"gluon_token_major": false}'
  HF_FLEX_E2E_SCHEDULE="$knobs" timeout ${E2E_S_LIMIT:-200} python3 -m hf_flex.bench --e2e-only --e2e-S $S \
    --e2e-variants floor,hf_flex --no-recompiles --json "$OUT/e2e_${S}_$ab.json" 2>&1 | grep -E "^ *$S|overhead ms"
done; done
