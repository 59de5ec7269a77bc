#!/usr/bin/env bash
# Device-machine call (one GPU): A/B of two code trees on the same machine through scripts/ab_trees.py
# (each side in its own process, its tree first on sys.path, the sides alternating round by round):
# CUDA tests of the working tree first (TESTS, TESTS_K as in gpu_issue5_atomic.sh; TESTS_K=none skips
# them), then tune_schedule's "main" schedule on CASES for both trees (torch flex timed in the same
# process, every run float64-checked first), then, unless E2E=0, the end-to-end step at E2E_S tokens
# (floor and hf_flex interleaved in one process) for both. OLD_TREE: a copy of the older hf_flex (and
# patches), e.g. `git archive REV hf_flex patches | tar -x -C out/ab_old`, carried. Env: OLD_TREE
# (required), CASES, ROUNDS (ab_trees rounds), TUNE_ROUNDS, BUDGET, TESTS_S, E2E, E2E_S.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OLD=${OLD_TREE:?set OLD_TREE to the root of the old tree}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
k="${TESTS_K-}"
if [ "$k" != none ]; then
  sel=(); [ -n "$k" ] && sel=(-k "$k")
  timeout ${TESTS_S:-200} python3 -m pytest -q -n 12 -p no:cacheprovider \
    ${TESTS:-tests/test_varlen.py tests/test_kernels.py} "${sel[@]}" > "$OUT/cuda_tests.log" 2>&1
  echo "tests rc=$?"; tail -2 "$OUT/cuda_tests.log"; grep -E "^(FAILED|ERROR)" "$OUT/cuda_tests.log" | head -10
fi
python3 scripts/ab_trees.py --old "$OLD" --rounds ${ROUNDS:-2} --out "$OUT" -- "$PWD/scripts/tune_schedule.py" \
  --cases "${CASES:-0,1,2,3,4,5,6,7}" --rounds ${TUNE_ROUNDS:-1} --budget-s ${BUDGET:-120} --variants main \
  --json '{out}/tune_{side}_{round}.json' 2>&1 | grep -v '^{"case"'
if [ "${E2E:-1}" != 0 ]; then
  python3 scripts/ab_trees.py --old "$OLD" --rounds 1 --out "$OUT" -- -m hf_flex.bench --e2e-only \
    --e2e-S ${E2E_S:-16384} --no-recompiles --e2e-variants floor,hf_flex --e2e-timeout 105 \
    --json '{out}/e2e_{side}_{round}.json' 2>&1 | grep -E "^(old|new|==)|overhead|interleaved \("
fi
