#!/usr/bin/env bash
# The GPU suite in ONE command (issue 42): everything it measures lands in "$OUT" as JSON, partial
# results included, and it fits in ~8 minutes of an H100 (every part has its own time limit).
#
#   OUT=/some/folder bash benchmarks/gpu_suite.sh        # CUDA: bf16 random-weight models
#   GPU_SUITE_DRY=1 OUT=/tmp/x bash benchmarks/gpu_suite.sh   # the same on the CPU, tiny shapes (CI)
#
# Needs only python3 with torch and transformers (llmppl is imported from this checkout through
# PYTHONPATH; nothing is installed or downloaded).  Steps:
#   1. gpu_env.txt: the date, the commit and nvidia-smi (the suite prints the python/torch versions);
#   2. python3 -m llmppl.benchmarking.gpu_suite: the exactness smoke (SMC and MH vs exact
#      enumeration on CUDA, with impostors that must fail), `llmppl bench overhead`, and
#      `llmppl bench latency` (Power-SMC vs plain decoding of the same rows, 8x8 and 32x16, static
#      cache + CUDA graphs on and off) on SmolLM2-135M, Qwen2.5-1.5B and Llama-2-7B shapes with
#      random weights, logits scaled to ~2 nats of next-token entropy; gpu_suite.json has each
#      part's status; the whole process runs under `timeout` as the last guard;
#   3. benchmarks/plot_gpu.py: gpu_table.md (and gpu_latency.png when matplotlib is there).
# Knobs: PYTHON (default python3), GPU_SUITE_TOTAL_S (the process's hard limit, default 450; 240
# dry), GPU_SUITE_LIMIT_SCALE (multiplies every part's limit), GPU_SUITE_ARGS (more arguments for
# the suite, e.g. "--parts exact,latency-llama2-7b" or "--tokens 128").  Exit status 0 iff every
# part is ok.
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
DRY=()
TOTAL=${GPU_SUITE_TOTAL_S:-450}
if [ "${GPU_SUITE_DRY:-0}" != "0" ]; then
  DRY=(--dry)
  TOTAL=${GPU_SUITE_TOTAL_S:-240}
fi
t0=$(date +%s)
{ echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)  dry: ${GPU_SUITE_DRY:-0}  commit: $(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)"
  if [ ${#DRY[@]} -eq 0 ]; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 || echo "nvidia-smi: not available"
  fi
} > "$OUT/gpu_env.txt" 2>&1
cat "$OUT/gpu_env.txt"
# shellcheck disable=SC2086  # GPU_SUITE_ARGS is a list of words on purpose
timeout -k 10 "$TOTAL" "$PY" -m llmppl.benchmarking.gpu_suite --out "$OUT" ${DRY[@]+"${DRY[@]}"} ${GPU_SUITE_ARGS:-} \
  2>&1 | tee "$OUT/gpu_suite.log"
status=${PIPESTATUS[0]}
if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
  echo "gpu_suite.sh: the suite process ran past ${TOTAL} s and was stopped; the part marked 'running' in gpu_suite.json is the one cut" \
    | tee -a "$OUT/gpu_suite.log"
fi
"$PY" benchmarks/plot_gpu.py "$OUT" || status=1
echo "gpu_suite.sh: exit $status after $(( $(date +%s) - t0 )) s; results in $OUT" | tee -a "$OUT/gpu_suite.log"
exit "$status"
