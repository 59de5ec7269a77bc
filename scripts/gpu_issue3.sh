#!/usr/bin/env bash
# Device-machine call for the Transformers adapter (issue 3): bf16 parity + loss curves + block tables,
# the gpu-marked tests, then the whole suite on CUDA with the machine's Transformers.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
python3 scripts/gpu_transformers_parity.py --json "$OUT/tf_parity.json" 2>&1 | tee "$OUT/tf_parity.log" | tail -8
python3 -m pytest -q -m gpu tests/gpu 2>&1 | tee "$OUT/gpu_tests.log" | tail -5
timeout ${SUITE_TIMEOUT:-300} python3 -m pytest -q -n 8 -p no:cacheprovider tests 2>&1 | tee "$OUT/all_tests.log" | tail -15
