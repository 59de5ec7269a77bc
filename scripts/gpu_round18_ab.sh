#!/usr/bin/env bash
# Device-machine call, eighteenth round: the Gluon backwards on token-major inputs against the Triton
# kernels side by side (24-document GQA case, groups of 4 and 2), the recompile count with them on,
# and the CPU suite's device-only cases (helpers.device_only).
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 170 python3 scripts/tune_schedule.py --tokens --cases 5,5 --variants main,gluon_tokens_off --rounds 3 --budget-s 150 --json $OUT/tokens_g4.json 2>&1 | tail -4
timeout 130 python3 scripts/tune_schedule.py --tokens --hkv 16 --cases 5 --variants main,gluon_tokens_off --rounds 3 --budget-s 100 --json $OUT/tokens_g2.json 2>&1 | tail -3
HF_FLEX_E2E_SCHEDULE='{"gluon_token_major": true}' timeout 150 python3 -m hf_flex.bench --e2e-only --e2e-S 4096 --e2e-variants floor --json $OUT/recompiles_tokens.json 2>&1 | grep -i "recompil"
timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels.py tests/test_varlen.py 2>&1 | tail -3
