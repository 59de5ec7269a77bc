#!/usr/bin/env bash
# Device-machine call (one GPU) for issue 5: the kernels on CUDA (tests first), then the user-facing
# benchmark: the anchor cases (float64-checked), block tables, the end-to-end step at 4096 tokens and
# the recompile count, written as JSON.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
# TESTS: the test files; TESTS_K: the -k selection ("" for all of TESTS)
k="${TESTS_K-schedules or layout or lengths or gqa or non_contiguous or recompile or bf16_parity}"
sel=(); [ -n "$k" ] && sel=(-k "$k")
python3 -m pytest -q -x -n ${TESTS_N:-8} -p no:cacheprovider ${TESTS:-tests/test_kernels.py tests/gpu/test_gpu_parity.py} \
  "${sel[@]}" 2>&1 | tail -3
python3 -m hf_flex.bench --e2e --e2e-S ${E2E_S:-4096} --e2e-timeout 240 --json "$OUT/bench.json" 2>&1 | tail -${TAIL:-30}
