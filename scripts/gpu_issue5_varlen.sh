#!/usr/bin/env bash
# Device-machine call (one GPU), issue 5, twelfth round: the document-aligned kernels (kernels/varlen.py);
# thirteenth: the same with other VARIANTS / CASES / E2E_SCHEDULES (atomic dQ).
# CUDA tests first, then the document anchor cases with the document-aligned kernels (main), the
# block-sparse ones (block_path) and variants, side by side with torch flex (float64-checked first),
# then the 16k end-to-end step of hf_flex against the free-attention floor under each of the E2E
# schedules (per-kernel GPU time per step in the rows).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
timeout 240 python3 -m pytest -q -n 12 -p no:cacheprovider ${TESTS:-tests/test_varlen.py tests/test_kernels.py \
  tests/test_documents.py tests/gpu tests/test_block_mask.py} > "$OUT/cuda_tests.log" 2>&1; echo "tests rc=$?"
tail -4 "$OUT/cuda_tests.log"; grep -E "^(FAILED|ERROR)" "$OUT/cuda_tests.log" | head -20
timeout ${TUNE_S:-200} python3 scripts/tune_schedule.py --cases ${CASES:-4,5} --rounds ${ROUNDS:-3} --budget-s ${BUDGET:-150} \
  --variants ${VARIANTS:-main,block_path,varlen_part128,varlen_no_flat} \
  --json "$OUT/varlen_schedule.json" 2>&1 | tail -${TAIL:-6}
i=0
for sched in ${E2E_SCHEDULES:-'{}'}; do
  i=$((i+1))
  HF_FLEX_E2E_SCHEDULE=$sched timeout 200 python3 -m hf_flex.bench --e2e-only --e2e-S 16384 --no-recompiles \
    --e2e-variants floor,hf_flex --e2e-timeout 180 --json "$OUT/e2e16k_hf_flex_$i.json" 2>&1 | grep -E "overhead|interleaved \(" | head -3
  echo "  (schedule $sched)"
done
