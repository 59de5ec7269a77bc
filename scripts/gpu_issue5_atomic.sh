#!/usr/bin/env bash
# Device-machine call (one GPU) for issue 5's A/Bs of launch schedules: CUDA tests, then two
# tune_schedule runs side by side with torch flex (every variant float64-checked first), then the 16k
# end-to-end step (floor and hf_flex interleaved in one process) under each E2E schedule
# (HF_FLEX_E2E_SCHEDULE; per-kernel GPU time per step in the rows). Defaults: the thirteenth round's
# atomic-dQ A/B (causal and sliding cases on the block-sparse kernels, the document cases on the
# document-aligned ones). Env: TESTS (test paths), TESTS_K (-k selection; "none": no tests), CASES_A/B
# ("none": skip that run), VARIANTS_A/B, ROUNDS, BUDGET_A/B, TUNE_A_S/TUNE_B_S, E2E_SCHEDULES. The
# twelfth round's document-kernel call: TESTS_K= TESTS="tests/test_varlen.py tests/test_kernels.py
# tests/test_documents.py tests/gpu tests/test_block_mask.py" CASES_A=none VARIANTS_B=main,block_path,...
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
k="${TESTS_K-atomic}"  # unset: the atomic tests; set empty: every test in TESTS
if [ "$k" != none ]; then
  sel=(); [ -n "$k" ] && sel=(-k "$k")
  timeout ${TESTS_S:-240} python3 -m pytest -q -n 12 -p no:cacheprovider ${TESTS:-tests/test_varlen.py tests/test_kernels.py} \
    "${sel[@]}" > "$OUT/cuda_tests.log" 2>&1; echo "tests rc=$?"
  tail -2 "$OUT/cuda_tests.log"; grep -E "^(FAILED|ERROR)" "$OUT/cuda_tests.log" | head -10
fi
tune() {  # name cases variants budget timeout
  [ "$2" = none ] && return
  timeout "$5" python3 scripts/tune_schedule.py --cases "$2" --rounds ${ROUNDS:-2} --budget-s "$4" \
    --variants "$3" --json "$OUT/$1.json" 2>&1 | tail -6
}
tune atomic_causal ${CASES_A:-0,1,6} ${VARIANTS_A:-main,atomic_dq,atomic_dq_ptr} ${BUDGET_A:-110} ${TUNE_A_S:-150}
tune atomic_docs ${CASES_B:-4,5} ${VARIANTS_B:-main,varlen_atomic,varlen_atomic_ptr,block_atomic} ${BUDGET_B:-110} ${TUNE_B_S:-160}
i=0
for sched in ${E2E_SCHEDULES:-'{"varlen_atomic_dq":true}' '{}'}; do
  i=$((i+1))
  HF_FLEX_E2E_SCHEDULE=$sched timeout 110 python3 -m hf_flex.bench --e2e-only --e2e-S 16384 --no-recompiles \
    --e2e-variants floor,hf_flex --e2e-timeout 100 --json "$OUT/e2e16k_$i.json" 2>&1 | grep -E "overhead|interleaved \(" | head -3
  echo "  (schedule $sched)"
done
