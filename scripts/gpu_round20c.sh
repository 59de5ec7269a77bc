#!/usr/bin/env bash
# Device-machine call (one GPU), twentieth round, second part: the document-aligned Gluon backward's new
# default programs (SCHEDULE["gluon_varlen_bwd_tiles"] (64, 64, 4)) through the GPU tests (parity and
# the Gluon document kernels); side by side with (64, 32, 4) and (128, 64, 8) on the 24-document GQA
# case, token-major (the layout of the models); the 16k end-to-end step with (64, 32, 4) and the default
# (floor and hf_flex interleaved in each).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
timeout 200 python3 -m pytest -q -n 8 -p no:cacheprovider -m gpu tests/gpu/test_gpu_gluon_varlen.py \
  tests/gpu/test_gpu_parity.py 2>&1 | tail -4
timeout 130 python3 scripts/tune_schedule.py --tokens --cases 5 \
  --variants main,gluon_varlen_w4_32,gluon_varlen_w8_128 --rounds 5 --budget-s 100 \
  --json "$OUT/schedule_varlen_tiles_tokens.json" 2>&1 | grep -v '^{"case"' | tail -3
for p in 64,32,4 64,64,4; do
  HF_FLEX_E2E_SCHEDULE="{\"gluon_varlen_bwd_tiles\": [$p]}" timeout 120 python3 -m hf_flex.bench --e2e-only --e2e-S 16384 \
    --e2e-variants floor,hf_flex --no-recompiles --json "$OUT/e2e_16384_varlen_bwd_${p//,/_}.json" 2>&1 | grep -E "^ *16384|overhead ms"
done
