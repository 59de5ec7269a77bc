#!/usr/bin/env bash
# Device-machine call (one GPU), fifteenth round's final code: the CUDA tests of the kernels
# (test_kernels, test_varlen, tests/gpu) with the new backward defaults, then the user-facing bench
# with the 4k end-to-end row.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout ${TESTS_S:-220} python3 -m pytest -q -n 12 -p no:cacheprovider tests/test_kernels.py tests/test_varlen.py tests/gpu \
  > "$OUT/cuda_tests.log" 2>&1
echo "tests rc=$?"; tail -1 "$OUT/cuda_tests.log"; grep -E "^(FAILED|ERROR)" "$OUT/cuda_tests.log" | head -10
python3 -m hf_flex.bench --e2e --e2e-S 4096 --e2e-timeout 200 --json "$OUT/bench.json" 2>&1 | tail -${TAIL:-16}
