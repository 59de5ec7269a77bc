#!/usr/bin/env bash
# Device-machine call (one GPU), twentieth round: the document-aligned Gluon backward in one-warpgroup
# programs (SCHEDULE["gluon_varlen_bwd_tiles"]: halves of the listed tiles): its GPU tests; side by side
# with the 8-warp programs on the 24-document GQA case (head- and token-major); the causal GQA case with
# the causal backward's new default (64, 64, 4) against (128, 64, 8); the 16k end-to-end step with the
# document backward's programs of 128 and of 64 positions (floor and hf_flex interleaved).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
timeout 180 python3 -m pytest -q -n 8 -p no:cacheprovider -m gpu tests/gpu/test_gpu_gluon_varlen.py 2>&1 | tail -6
timeout 170 python3 scripts/tune_schedule.py --cases 5 --variants main,gluon_varlen_w4_64,gluon_varlen_w4_32 \
  --rounds 3 --budget-s 120 --json "$OUT/schedule_varlen_tiles.json" 2>&1 | grep -v '^{"case"' | tail -4
timeout 100 python3 scripts/tune_schedule.py --tokens --cases 5 --variants main,gluon_varlen_w4_64 \
  --rounds 3 --budget-s 60 --json "$OUT/schedule_varlen_tiles_tokens.json" 2>&1 | grep -v '^{"case"' | tail -3
timeout 100 python3 scripts/tune_schedule.py --cases 3 --variants main,gluon_bwd_w8_128 \
  --rounds 3 --budget-s 60 --json "$OUT/schedule_gqa_tiles.json" 2>&1 | grep -v '^{"case"' | tail -3
timeout 100 python3 scripts/tune_schedule.py --cases 4 --variants main,gluon_varlen_mha,gluon_varlen_mha_w4_64 \
  --rounds 3 --budget-s 60 --json "$OUT/schedule_12docs_tiles.json" 2>&1 | grep -v '^{"case"' | tail -3
for p in 128,64,8 64,64,4; do
  HF_FLEX_E2E_SCHEDULE="{\"gluon_varlen_bwd_tiles\": [$p]}" timeout 120 python3 -m hf_flex.bench --e2e-only --e2e-S 16384 \
    --e2e-variants floor,hf_flex --no-recompiles --json "$OUT/e2e_16384_varlen_bwd_${p//,/_}.json" 2>&1 | grep -E "^ *16384|overhead ms"
done
