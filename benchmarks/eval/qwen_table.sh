#!/usr/bin/env bash
# The results table of issue 8: Qwen2.5-Coder-0.5B on basic_arithmetic and chain_sum, plus
# the default SmolLM2-135M on basic_arithmetic (first CONTRAST_N problems) for contrast.
# Resumable: re-running the same command continues where a killed run stopped.
# Problems grow in chunks (10, 20, ... up to N) alternating between the two tasks, so a
# partial run has both tasks and every method on the same problems.
#   METHODS=plain,lowtemp,smc,mh N=200 STEP=10 bash benchmarks/eval/qwen_table.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
export HF_HUB_OFFLINE=1
METHODS=${METHODS:-plain,lowtemp,smc,mh}
N=${N:-200}
STEP=${STEP:-10}
CONTRAST_N=${CONTRAST_N:-30}
OUT=${OUT:-benchmarks/results/eval}
COMMON=(--seed 0 --particles 8 --alpha 4 --max-new-tokens 160
        --methods "$METHODS" --threads 1)
BA_CONFIG='{"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2, "operators": ["+", "-", "*"], "allow_parentheses": false}'
python3 -m llmppl.cli models fetch qwen2.5-coder-0.5b >/dev/null
for ((n = STEP; n <= N; n += STEP)); do
  python3 -m llmppl.cli eval --task reasoning_gym:basic_arithmetic --task-config "$BA_CONFIG" --n "$n" \
    --model qwen2.5-coder-0.5b "${COMMON[@]}" --json "$OUT/qwen_basic_arithmetic.jsonl"
  python3 -m llmppl.cli eval --task reasoning_gym:chain_sum --n "$n" \
    --model qwen2.5-coder-0.5b "${COMMON[@]}" --json "$OUT/qwen_chain_sum.jsonl"
  if ((n <= CONTRAST_N)); then
    python3 -m llmppl.cli eval --task reasoning_gym:basic_arithmetic --task-config "$BA_CONFIG" --n "$n" \
      --model smollm2-135m-instruct "${COMMON[@]}" --json "$OUT/smollm2_basic_arithmetic.jsonl"
  fi
done
python3 -m llmppl.cli eval --plot "$OUT"/*.jsonl --out "$OUT"
