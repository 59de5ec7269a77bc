#!/usr/bin/env bash
# Device-machine call (one GPU), issue 5, thirteenth round: dQ added by the dK/dV programs (atomic_dq,
# varlen_atomic_dq) through the tensor-memory accelerator's bulk reduction or per-thread atomics, against
# the deterministic dQ programs. CUDA tests of the atomic paths first, then causal / sliding cases
# (block-sparse kernels) and the document cases (document-aligned kernels) side by side with torch flex
# (float64-checked first), then the 16k end-to-end step (floor and hf_flex) under each E2E schedule.
# Other A/Bs of the round through the same env: TESTS_K (none), CASES_A/B, VARIANTS_A/B, E2E_SCHEDULES.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
if [ "${TESTS_K:-atomic}" != none ]; then
  timeout 120 python3 -m pytest -q -n 8 -p no:cacheprovider tests/test_varlen.py tests/test_kernels.py -k "${TESTS_K:-atomic}" \
    > "$OUT/cuda_tests_atomic.log" 2>&1; echo "tests rc=$?"
  tail -2 "$OUT/cuda_tests_atomic.log"; grep -E "^(FAILED|ERROR)" "$OUT/cuda_tests_atomic.log" | head -10
fi
timeout ${TUNE_A_S:-150} python3 scripts/tune_schedule.py --cases ${CASES_A:-0,1,6} --rounds ${ROUNDS:-2} --budget-s ${BUDGET_A:-110} \
  --variants ${VARIANTS_A:-main,atomic_dq,atomic_dq_ptr} --json "$OUT/atomic_causal.json" 2>&1 | tail -5
timeout ${TUNE_B_S:-160} python3 scripts/tune_schedule.py --cases ${CASES_B:-4,5} --rounds ${ROUNDS:-2} --budget-s ${BUDGET_B:-110} \
  --variants ${VARIANTS_B:-main,varlen_atomic,varlen_atomic_ptr,block_atomic} --json "$OUT/atomic_docs.json" 2>&1 | tail -4
i=0
for sched in ${E2E_SCHEDULES:-'{"varlen_atomic_dq":true}' '{}'}; do
  i=$((i+1))
  HF_FLEX_E2E_SCHEDULE=$sched timeout 110 python3 -m hf_flex.bench --e2e-only --e2e-S 16384 --no-recompiles \
    --e2e-variants floor,hf_flex --e2e-timeout 100 --json "$OUT/e2e16k_$i.json" 2>&1 | grep -E "overhead|interleaved \(" | head -3
  echo "  (schedule $sched)"
done
