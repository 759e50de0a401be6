#!/usr/bin/env bash
# The reasoning table in the chain-of-thought regime (issue 24): a GSM-style task
# (reasoning-gym gsm_symbolic, offline) with the Qwen2.5-Math CoT prompt ("Please reason step
# by step, and put your final answer within \boxed{}."), graded by math-verify on the last
# \boxed{}, at most 256 new tokens, the must-finish target p^4 (--truncation zero), N = 8:
# plain, reweight (plain's own samples weighted by p^(alpha-1)), best-of-N, low temperature
# (tau = 1/4), Power-SMC, MH and greedy, on llama.cpp with problems batched.
#
#   bash benchmarks/eval/cot_table.sh                    # N=200 problems, the default model
#   MODEL=qwen2.5-coder-0.5b bash benchmarks/eval/cot_table.sh   # after: llmppl models fetch qwen2.5-coder-0.5b
#   N=4 OUT=/tmp/cot bash benchmarks/eval/cot_table.sh   # a smoke run
#   SHARD=1/2 MODEL=... bash benchmarks/eval/cot_table.sh     # with SHARD=0/2 beside it: 2 processes
#
# Resumable: the same command continues where a killed run stopped (records are written per
# batch of problems, fsync'd).  All methods run in one phase, batch after batch, so a partial
# run has every method paired on the same problems.  One job, one thread, niced (NICE=15):
# the machine is shared.  Ends by writing table.md and the figures next to the records.
set -euo pipefail
cd "$(dirname "$0")/../.."
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
OUT=${OUT:-benchmarks/results/eval/cot}
N=${N:-200}
MODEL=${MODEL:-smollm2-135m-instruct}
TASK=${TASK:-reasoning_gym_cot:gsm_symbolic}
TASK_CONFIG=${TASK_CONFIG:-"{}"}
METHODS=${METHODS:-plain,reweight,bestofn,lowtemp,smc,mh,greedy}
BATCH=${BATCH:-4}
NICE=${NICE:-15}
PY=${PYTHON:-python3}
NAME=${NAME:-${MODEL%%-*}_${TASK##*:}}
# shard K/N runs batches b = K mod N into its own file (shard 0 keeps the plain name); a shard skips
# only what its own file holds: to shard a run with records, start each shard file as a copy of them
SHARD=${SHARD:-0/1}
if [[ ${SHARD%%/*} != 0 ]]; then NAME=${NAME}.shard${SHARD%%/*}; fi
# alpha = 4 (lowtemp tau = 1/4), 8 samples / particles / chains, at most 256 new tokens, a
# must-finish target for the sharpened methods (smc, mh, reweight), MH block 64 (T/4), 2 steps
COMMON=(--seed 0 --particles 8 --alpha 4 --max-new-tokens 256 --truncation zero
        --batch-prompts "$BATCH" --backend llamacpp --n-ctx 16384 --threads 1 --quiet)
mkdir -p "$OUT"
if [[ $MODEL == qwen* ]]; then $PY -m llmppl.cli models fetch "$MODEL" >/dev/null; fi
nice -n "$NICE" $PY -m llmppl.cli eval --task "$TASK" --task-config "$TASK_CONFIG" --n "$N" --model "$MODEL" --methods "$METHODS" \
  "${COMMON[@]}" --shard "$SHARD" --json "$OUT/$NAME.jsonl" ${TIME_LIMIT:+--time-limit "$TIME_LIMIT"}
nice -n "$NICE" $PY -m llmppl.cli eval --plot "$OUT"/*.jsonl --out "$OUT" \
  --note "Made by \`N=$N MODEL=$MODEL TASK=$TASK TASK_CONFIG='$TASK_CONFIG' bash benchmarks/eval/cot_table.sh\` (chain of thought, \\boxed{} answers graded by math-verify); the machine of each row is under Settings."
