#!/usr/bin/env bash
# Device-machine call (one GPU) for issue 5, fourth round: where document-mask time goes (registers of
# both libraries' kernels, mask and partial-loop diagnostics), then forward variants side by side with
# torch flex (VARIANTS, CASES, BUDGET from the env).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 scripts/diagnose_docs.py --cases ${DIAG_CASES:-4,1} --out "$OUT" 2>&1 | tail -30
python3 scripts/tune_schedule.py --budget-s ${BUDGET:-240} ${CASES:+--cases $CASES} \
  --variants ${VARIANTS:-main,index_ahead,fwd_full64,fwd_full64_ahead,fwd_stages2} --json "$OUT/schedule.json" 2>&1 | tail -16
