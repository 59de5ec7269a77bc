#!/usr/bin/env bash
# Device-machine call (one GPU) for issue 5, fifth round: the CUDA tests of what changed (TMA loads,
# atomic dQ, schedules and lengths, document spans and tables, the Transformers paths, bf16 parity),
# then what is alive at the peak of a training step with hf_flex and with Transformers' flex_attention
# (scripts/trace_peak.py at each of TRACE_S tokens).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -m pytest -q -n 8 -p no:cacheprovider tests/test_kernels.py tests/gpu/test_gpu_parity.py tests/test_documents.py \
  tests/test_mods.py tests/test_transformers_recognize.py tests/test_transformers_parity.py 2>&1 | tail -6
for S in ${TRACE_S:-4096 16384}; do
  python3 scripts/trace_peak.py --S $S --json "$OUT/trace_peak_$S.json" 2>&1 | tail -14
done
