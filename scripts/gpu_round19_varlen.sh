#!/usr/bin/env bash
# Device-machine call (one GPU), nineteenth round: the document-aligned Gluon forward's GPU tests, then
# side by side with the Triton document forward (variant gluon_varlen_fwd_on) on the document anchor cases.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -m pytest -q -n 8 -p no:cacheprovider -m gpu tests/gpu/test_gpu_gluon_varlen.py -k forward 2>&1 | tail -6
python3 scripts/tune_schedule.py --cases 4,5 --variants main,gluon_varlen_fwd_on --rounds ${ROUNDS:-3} \
  --json "$OUT/schedule_gluon_varlen_fwd.json" 2>&1 | grep -v '^{"case"' | tail -6
python3 scripts/tune_schedule.py --cases 5 --variants main,gluon_varlen_fwd_on --rounds ${ROUNDS:-3} --tokens \
  --json "$OUT/schedule_gluon_varlen_fwd_tokens.json" 2>&1 | grep -v '^{"case"' | tail -4
