#!/usr/bin/env bash
# Device-machine call (one GPU): A/B of two code trees on the same machine. The working tree (B, the
# change) against OLD_TREE (A: a copy of the hf_flex package before it, e.g. made with
# `git worktree add` and carried under out/), each run in its own process with PYTHONPATH pointing
# at it (then at the working tree, for what is not in the copy: patches/), in the order B A B (A A B B would put the machine's drift into the ratio): tune_schedule's
# "main" schedule on CASES (torch flex timed in the same process, every run float64-checked first),
# then, unless E2E=0, the end-to-end step at E2E_S tokens (floor and hf_flex interleaved in one
# process) for A and B. CUDA tests of the working tree first (TESTS, TESTS_K as in
# gpu_issue5_atomic.sh; TESTS_K=none skips them). Env: OLD_TREE (required), CASES, ROUNDS, BUDGET,
# TUNE_S, TESTS_S, E2E, E2E_S.
set -uo pipefail
export PYTHONUNBUFFERED=1
NEW=$PWD
OLD=$(cd "${OLD_TREE:?set OLD_TREE to the root of the old tree}" && pwd)
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
k="${TESTS_K-}"
if [ "$k" != none ]; then
  sel=(); [ -n "$k" ] && sel=(-k "$k")
  PYTHONPATH=$NEW timeout ${TESTS_S:-200} python3 -m pytest -q -n 12 -p no:cacheprovider \
    ${TESTS:-tests/test_varlen.py tests/test_kernels.py} "${sel[@]}" > "$OUT/cuda_tests.log" 2>&1
  echo "tests rc=$?"; tail -2 "$OUT/cuda_tests.log"; grep -E "^(FAILED|ERROR)" "$OUT/cuda_tests.log" | head -10
fi
tune() {  # label tree
  PYTHONPATH=$2:$NEW python3 -c "import hf_flex; print('hf_flex from', hf_flex.__file__)"
  PYTHONPATH=$2:$NEW timeout ${TUNE_S:-150} python3 "$NEW/scripts/tune_schedule.py" --cases "${CASES:-0,1,2,3,4,5,6,7}" \
    --rounds ${ROUNDS:-1} --budget-s ${BUDGET:-120} --variants main --json "$OUT/tune_$1.json" 2>&1 | tail -${TAIL:-10}
  echo "  ($1: $2)"
}
tune B1 "$NEW"; tune A "$OLD"; tune B2 "$NEW"
if [ "${E2E:-1}" != 0 ]; then
  for side in A:$OLD B:$NEW; do
    # run from the tree's root: `python -m` puts the current folder first on sys.path
    (cd "${side#*:}" && PYTHONPATH=${side#*:}:$NEW timeout 115 python3 -m hf_flex.bench --e2e-only --e2e-S ${E2E_S:-16384} --no-recompiles \
      --e2e-variants floor,hf_flex --e2e-timeout 105 --json "$OUT/e2e_${side%%:*}.json" 2>&1 | grep -E "overhead|interleaved \(" | head -3)
    echo "  (${side%%:*})"
  done
fi
