#!/usr/bin/env bash
# Device-machine call: the whole test suite on CUDA (CPU tests take the device fixture's "cuda"; the
# recipe's subprocess tests hide the GPU). -v names every result as it lands, so a call cut by its
# time limit still says which tests failed. Carry .whl (datasets for the packing/recipe tests).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
python3 -c "import torch, triton, transformers; print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
timeout ${SUITE_TIMEOUT:-540} python3 -m pytest -v -rfE --durations=25 -n 14 -p no:cacheprovider tests 2>&1 | tee "$OUT/all_tests.log" | grep -E "FAILED|ERROR|passed|failed|^[0-9.]+s (call|setup)" | tail -60
