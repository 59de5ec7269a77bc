#!/usr/bin/env bash
# Device-machine call (one GPU) for issue 5, sixth round. STAGES (comma list, in this order):
#   trace   peak memory in the benchmark's own loop (each step's output kept through the next step),
#           recorded from the first step (scripts/trace_peak.py --keep-output), S=$TRACE_S
#   profile where the time goes, hf_flex against torch flex: kernels per forward+backward, host
#           enqueue time, the old accumulating timing (scripts/profile_kernels.py, cases $PCASES)
#   tune    longest-first grids (heads_first), one loop per program (bwd_one_loop, fwd_one_loop) and
#           forward tile variants, side by side with torch
#           flex (scripts/tune_schedule.py)
#   ncu     Nsight Compute on both libraries' attention kernels (torch's: its triton_tem templates) of
#           case $NCASE, forward and backward (clocks left alone)
# Calls of at most 10 minutes: e.g. STAGES=trace,profile PCASES=4,1 (about 5 min: two fresh processes
# for the trace, torch flex compiles per case), then STAGES=tune BUDGET=420, then STAGES=ncu NCASE=4
# together with the CUDA tests or the bench (python -m hf_flex.bench --e2e --json ...).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
STAGES=${STAGES:-trace,profile,tune}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
has() { [[ ",$STAGES," == *",$1,"* ]]; }
if has trace; then
  python3 scripts/trace_peak.py --S ${TRACE_S:-4096} --warm 1 --keep-output --json "$OUT/trace_keep_${TRACE_S:-4096}.json" 2>&1 | tail -30
fi
if has profile; then
  python3 scripts/profile_kernels.py --cases ${PCASES:-4,1,5} --json "$OUT/profile.json" 2>&1 | tail -60
fi
if has tune; then
  python3 scripts/tune_schedule.py --budget-s ${BUDGET:-240} --cases ${CASES:-0,4,1,5,6} \
    --variants ${VARIANTS:-main,heads_first,bwd_one_loop,fwd_one_loop,fwd_one_loop128,fwd_part128} --json "$OUT/schedule.json" 2>&1 | tail -24
  if [ -n "${CASES64:-}" ]; then
    python3 scripts/tune_schedule.py --budget-s ${BUDGET64:-150} --cases $CASES64 \
      --variants ${VARIANTS64:-main,fwd_one_loop,d64_tma,d64_full128,d64_full128_tma,d64_w4,d64_stages4} --json "$OUT/schedule_d64.json" 2>&1 | tail -12
  fi
fi
if has ncu; then
  ncu --clock-control none --kernel-name regex:'attn_fwd_kernel|attn_bwd_kernel|triton_tem' --launch-count 16 \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats --section SchedulerStats \
    python3 scripts/profile_kernels.py --cases ${NCASE:-4} --ncu > "$OUT/ncu_bwd.txt" 2>&1
  grep -E "attn_fwd_kernel|attn_bwd_kernel|triton_tem|Duration|Registers|Achieved Occupancy|Theoretical Occupancy|Compute \(SM\) Throughput|Memory Throughput|Stall|Warp Cycles Per Issued|Issued Warp|No Eligible" "$OUT/ncu_bwd.txt" | head -80
fi
