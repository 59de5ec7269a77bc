#!/usr/bin/env bash
# One device-machine call: versions, a smoke check, the GPU tests, then the benchmark (table last).
# Usage (device machine, repo root): bash scripts/gpu_check.sh [--quick]
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1 || export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
python3 -m pytest -q -x -m gpu tests/gpu -s 2>&1 | tee "$OUT/gpu_tests.log" | tail -40
python3 -m hf_flex.bench ${1:-} --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"
