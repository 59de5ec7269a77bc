#!/usr/bin/env bash
# Device-machine call (one GPU), fifteenth round: Nsight Compute on the backward kernels of one anchor
# case (NCASE, default 0: causal 2k), ours (attn_bwd_kernel) against torch flex's
# (triton_tem_fused_flex_attention_backward): throughput, pipes, stalls, instruction counts. NCU_ARGS
# replaces the sections (e.g. the stall reasons: --metrics regex:smsp__average_warps_issue_stalled_...).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
echo "ncu: ${NCU:-none}"
[ -n "$NCU" ] || exit 0
"$NCU" --clock-control none --kernel-name regex:'attn_bwd_kernel|triton_tem_fused_flex_attention_backward' \
  --launch-skip ${SKIP:-2} --launch-count ${COUNT:-4} \
  ${NCU_ARGS:---section SpeedOfLight --section ComputeWorkloadAnalysis --section Occupancy --section LaunchStats \
  --section WarpStateStats --section SchedulerStats --section InstructionStats --section MemoryWorkloadAnalysis} \
  python3 scripts/profile_kernels.py --cases ${NCASE:-0} --ncu > "$OUT/ncu_bwd_case${NCASE:-0}.txt" 2>&1
echo "ncu rc=$?"
grep -E "attn_bwd_kernel|triton_tem|Duration|Registers Per|Achieved Occupancy|Compute \(SM\) Throughput|Memory Throughput|Executed Ipc A|Issue Slots Busy|No Eligible|Warp Cycles Per Issued|Executed Instructions  |Stall|stalled|L2 Hit|Block Limit Registers|Dynamic Shared|Waves Per SM" "$OUT/ncu_bwd_case${NCASE:-0}.txt" | head -90
