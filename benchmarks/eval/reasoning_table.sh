#!/usr/bin/env bash
# The reasoning table (issue 17): Qwen2.5-Coder-0.5B-Instruct (its GGUF run natively by
# llama.cpp) on reasoning-gym basic_arithmetic and chain_sum, N problems each, and the
# default SmolLM2-135M-Instruct on basic_arithmetic (CONTRAST_N problems) for contrast.
#
#   bash benchmarks/eval/reasoning_table.sh            # everything, both tasks in parallel
#   JOBS="qwen_chain_sum" bash benchmarks/eval/reasoning_table.sh   # one job
#
# Resumable: the same command continues where a killed run stopped (records are written
# per batch of problems, fsync'd; a torn last line is cut off).  Each job runs in phases on
# all its problems: the methods at N = 8 but MH, then MH (about 5x their cost), then the
# second compute point (N = 16 for SMC and best-of-N), so a partial run still has every
# method of a finished phase paired on common problems.  Each job uses one CPU thread; two
# jobs run at a time (one per core).
set -euo pipefail
cd "$(dirname "$0")/../.."
export HF_HUB_OFFLINE=1
OUT=${OUT:-benchmarks/results/eval}
N=${N:-200}
CONTRAST_N=${CONTRAST_N:-64}
JOBS=${JOBS:-"qwen_basic_arithmetic qwen_chain_sum smollm2_basic_arithmetic"}
PHASES=${PHASES:-"plain,lowtemp,smc,bestofn mh smc:particles=16,bestofn:particles=16"}
PY=${PYTHON:-python3}
BA_CONFIG='{"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2, "operators": ["+", "-", "*"], "allow_parentheses": false}'
CS_CONFIG='{"min_terms": 2, "max_terms": 4, "min_digits": 1, "max_digits": 3}'
# one setting for every cell: alpha = 4 (lowtemp tau = 1/4), 8 samples / particles / chains,
# at most 96 new tokens, a must-finish target (truncation zero) for the sharpened methods
COMMON=(--seed 0 --particles 8 --alpha 4 --max-new-tokens 96 --truncation zero
        --batch-prompts 8 --backend llamacpp --n-ctx 16384 --threads 1 --quiet)
mkdir -p "$OUT"
$PY -m llmppl.cli models fetch qwen2.5-coder-0.5b >/dev/null

job() {  # job NAME: each phase's methods on every problem, phase after phase
  local name=$1 model task config n
  case $name in
    qwen_basic_arithmetic) model=qwen2.5-coder-0.5b; task=basic_arithmetic; config=$BA_CONFIG; n=$N ;;
    qwen_chain_sum) model=qwen2.5-coder-0.5b; task=chain_sum; config=$CS_CONFIG; n=$N ;;
    smollm2_basic_arithmetic) model=smollm2-135m-instruct; task=basic_arithmetic; config=$BA_CONFIG; n=$CONTRAST_N ;;
    *) echo "unknown job $name" >&2; return 2 ;;
  esac
  for methods in $PHASES; do
    $PY -m llmppl.cli eval --task "reasoning_gym:$task" --task-config "$config" --n "$n" --model "$model" \
      --methods "$methods" "${COMMON[@]}" --json "$OUT/$name.jsonl"
  done
}

pids=()
for name in $JOBS; do
  # the contrast job starts once a Qwen job is done (two jobs at a time on two cores)
  if [[ $name == smollm2_* && ${#pids[@]} -ge 2 ]]; then wait -n; fi
  job "$name" & pids+=($!)
done
wait
$PY -m llmppl.cli eval --plot "$OUT"/qwen_*.jsonl "$OUT"/smollm2_*.jsonl --out "$OUT" \
  --note "Made by \`bash benchmarks/eval/reasoning_table.sh\` (N=$N, CONTRAST_N=$CONTRAST_N); the machine of each row is under Settings."
