#!/usr/bin/env bash
# Device-machine call (one GPU), fifteenth round: the block-sparse full-block loops at 3 stages
# (SCHEDULE bwd_full_stages / bwd_dq_full_stages): their CUDA test, then tune_schedule's A/B in one
# process (every variant float64-checked first; torch flex timed alongside).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
timeout 120 python3 -m pytest -q -n 4 -p no:cacheprovider tests/test_kernels.py -k "full_loop_stages" > "$OUT/cuda_tests.log" 2>&1
echo "tests rc=$?"; tail -1 "$OUT/cuda_tests.log"
python3 scripts/tune_schedule.py --cases ${CASES:-0,1,2,3,6,7} --variants ${VARIANTS:-main,full_s3,full_s3_dq,dq_full_s3} \
  --rounds ${ROUNDS:-2} --budget-s ${BUDGET:-400} --json "$OUT/full_stages.json" 2>&1 | grep -v '^{"case"' | tail -30
python3 - "$OUT/full_stages.json" <<'P'
import json, sys
d = json.load(open(sys.argv[1]))
names = list(d["rows"][0]["variants"]) if d["rows"] else []
print("f+b TFLOP/s (fwd) | torch flex:", ", ".join(names))
for r in d["rows"]:
    v = r.get("variants", {})
    cells = [f"{v[n].get('fwdbwd_tflops', float('nan')):.0f} ({v[n].get('fwd_tflops', float('nan')):.0f})" if "error" not in v[n] else "ERR" for n in names]
    print(f"{r['case'][:24]:24s} " + " | ".join(cells) + f" | {r.get('torch_fwdbwd_tflops', float('nan')):.0f}")
P
