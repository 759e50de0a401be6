#!/usr/bin/env bash
# The whole GPU suite in ONE call on a CUDA machine (issue 16): CUDA tests, then ms/step of the plain
# decoder and pp.SMC itself (bf16, static cache, CUDA graphs; prompt 256, 256 new tokens) on
# Qwen2-0.5B / 1.5B / 7B shapes with random weights (nothing downloaded), run_batch 16 prompts x N
# vs sequential runs, transformers' compiled static-cache generate as the anchor; then plot and table.  Results: benchmarks/results/ (and $OUT when set, for the device tool).
#   bash benchmarks/gpu_suite.sh            # ~5 min on an H100
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
RES=${RESULTS:-benchmarks/results}
STEPS=${STEPS:-256}
mkdir -p "$RES"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
} 2>&1 | tee "$RES/gpu_env.txt"
python3 -m pytest -q -m cuda -p no:cacheprovider tests/test_static_cache.py 2>&1 | tee "$RES/gpu_tests.log"
status=0
for cfg in qwen2-0.5b qwen2-1.5b qwen2-7b; do
  python3 -m llmppl.cli bench gpu --random-weights "$cfg" --device cuda --particles 1,16,64 \
    --prompt-len 256 --steps "$STEPS" --force-resample --batch-prompts 16 --hf-generate \
    --json "$RES/gpu_${cfg}.json" > /dev/null || status=1
done
# the usual setting (resample when ESS < N/2) next to the worst case above
python3 -m llmppl.cli bench gpu --random-weights qwen2-7b --device cuda --particles 16 \
  --prompt-len 256 --steps "$STEPS" --no-dynamic --json "$RES/gpu_qwen2-7b_ess.json" > /dev/null || status=1
python3 benchmarks/plot_gpu.py "$RES" || status=1
if [ -n "${OUT:-}" ]; then cp "$RES"/gpu_* "$OUT"/ 2>/dev/null; fi
exit $status
