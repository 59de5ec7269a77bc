#!/usr/bin/env bash
# Device-machine call (one GPU) for issue 5, fourth round: CUDA tests of what changed (document spans,
# load orders, the kernels' schedules, bf16 parity, softcap approx), then the user-facing benchmark of
# main (anchor cases float64-checked, block tables, end to end at E2E_S, recompiles) as JSON.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -m pytest -q -n 8 -p no:cacheprovider tests/test_documents.py tests/test_mods.py tests/gpu/test_gpu_parity.py \
  "tests/test_kernels.py::test_schedules" "tests/test_kernels.py::test_load_order_and_program_order" 2>&1 | tail -4
python3 -m hf_flex.bench --e2e --e2e-S ${E2E_S:-4096} --e2e-timeout 200 --json "$OUT/bench.json" 2>&1 | tail -${TAIL:-32}
