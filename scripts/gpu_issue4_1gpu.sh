#!/usr/bin/env bash
# Device-machine call (one GPU) for the recipes (issue 4): the 0.57B model and the embedded default,
# flex vs sdpa (the whole suite on CUDA: scripts/gpu_all_tests.sh).
# Needs .whl (datasets and the two packages it needs that the machine lacks): carry it.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, triton, transformers, accelerate, datasets; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'datasets', datasets.__version__)"
L="accelerate launch --config_file recipes/configs/one_gpu.yaml recipes/sft.py --no-progress"
R=/tmp/runs
# the 0.57B Llama-shaped model, 4096-token rows: flex (parity first) vs sdpa on the padded documents
B="--model llama-0.5b --seq-len 4096 --batch-size 2 --grad-accum 2 --max-steps ${STEPS:-20} --lr 3e-4 --warmup 3 --eval-every 0"
$L $B --check-parity 1 --output-dir $R/05b-flex 2>&1 | tail -2
$L $B --attn sdpa --padded --output-dir $R/05b-sdpa-padded 2>&1 | tail -1
python3 recipes/compare_logs.py $R/05b-flex/log.jsonl $R/05b-sdpa-padded/log.jsonl --json $OUT/05b_compare.json
# the embedded default: flex (with the parity check), sdpa on the packed rows
$L --check-parity --output-dir $R/default-flex 2>&1 | tail -1
$L --attn sdpa --output-dir $R/default-sdpa-packed 2>&1 | tail -1
python3 recipes/compare_logs.py $R/default-flex/log.jsonl $R/default-sdpa-packed/log.jsonl --json $OUT/default_compare.json
cp $R/default-flex/log.jsonl $OUT/default_flex_log.jsonl; cp $R/05b-flex/log.jsonl $OUT/05b_flex_log.jsonl
