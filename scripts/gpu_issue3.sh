#!/usr/bin/env bash
# Device-machine call for the Transformers adapter (issue 3): the new packed-documents path's tests,
# bf16 parity + loss curves + block-table timings, the gpu-marked tests, then the whole suite on CUDA.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
python3 -m pytest -q -p no:cacheprovider tests/test_documents.py tests/test_compile.py "tests/test_transformers_parity.py::test_generate_greedy" 2>&1 | tee "$OUT/targeted_tests.log" | tail -4
python3 scripts/gpu_transformers_parity.py --json "$OUT/tf_parity.json" 2>&1 | tee "$OUT/tf_parity.log" | tail -9
python3 -m pytest -q -p no:cacheprovider -m gpu tests/gpu 2>&1 | tee "$OUT/gpu_tests.log" | tail -3
timeout ${SUITE_TIMEOUT:-270} python3 -m pytest -q -n 8 -p no:cacheprovider tests 2>&1 | tee "$OUT/all_tests.log" | tail -8
