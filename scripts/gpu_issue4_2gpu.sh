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
run() {  # name, config, flags...: full output kept in $OUT/<name>.out, its tail printed
  local name=$1 cfg=$2; shift 2
  accelerate launch --config_file recipes/configs/$cfg.yaml $B "$@" --output-dir $R/$name > "$OUT/$name.out" 2>&1
  echo "== $name rc=$?"; grep -v "it/s\]\|examples/s\]" "$OUT/$name.out" | tail -${TAIL:-4}
}
RUNS=${RUNS:-ddp-flex ddp-sdpa-padded fsdp2-flex fsdp2-sdpa-padded}  # a subset reruns only those
for r in $RUNS; do
  case $r in
    *-flex) flags="--check-parity 1";;
    *-sdpa-padded) flags="--attn sdpa --padded";;
  esac
  run $r ${r%%-*}_2gpu $flags
done
logs=(); for r in $RUNS; do
  [ -f $R/$r/log.jsonl ] && logs+=($R/$r/log.jsonl) && cp $R/$r/log.jsonl $OUT/${r}_log.jsonl; done
python3 recipes/compare_logs.py "${logs[@]}" --json $OUT/2gpu_compare.json
