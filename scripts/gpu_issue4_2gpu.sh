#!/usr/bin/env bash
# Device-machine call (nvidia-h100-x2) for the recipes (issue 4): DDP and FSDP2 on two GPUs, the
# 0.57B model, the same rows per step as the one-GPU run (2 x 1 row x accum 2 = 1 x 2 rows x accum 2).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
R=/tmp/runs
B="recipes/sft.py --no-progress --model llama-0.5b --seq-len 4096 --batch-size 1 --grad-accum 2 --max-steps ${STEPS:-20} --lr 3e-4 --warmup 3 --eval-every 0"
accelerate launch --config_file recipes/configs/ddp_2gpu.yaml $B --check-parity 1 --output-dir $R/ddp-flex 2>&1 | tail -2
accelerate launch --config_file recipes/configs/ddp_2gpu.yaml $B --attn sdpa --padded --output-dir $R/ddp-sdpa-padded 2>&1 | tail -1
accelerate launch --config_file recipes/configs/fsdp2_2gpu.yaml $B --check-parity 1 --output-dir $R/fsdp2-flex 2>&1 | tail -2
accelerate launch --config_file recipes/configs/fsdp2_2gpu.yaml $B --attn sdpa --padded --output-dir $R/fsdp2-sdpa-padded 2>&1 | tail -1
python3 recipes/compare_logs.py $R/ddp-flex/log.jsonl $R/ddp-sdpa-padded/log.jsonl $R/fsdp2-flex/log.jsonl $R/fsdp2-sdpa-padded/log.jsonl --json $OUT/2gpu_compare.json
for r in ddp-flex fsdp2-flex; do cp $R/$r/log.jsonl $OUT/${r}_log.jsonl; done
