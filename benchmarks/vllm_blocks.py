"""Plain ``state.sample_block`` throughput: ``VLLMLM`` (native, one ``llm.generate`` per block) against
``HFLM`` (the generic token loop, ``sample_tokenwise``) on the same rows (writes JSON).

The default model, the first ``--prompts`` chat prompts of ``llmppl bench latency`` × ``--rows`` rows,
``--tokens`` tokens per row drawn at temperature 1 with EOS excluded (``allow_stop=False``, so every
row does the same work), in blocks of each of ``--blocks`` tokens.  For each (backend, block):
wall time of the whole run (median of ``--reps``), ms per token step, and the state's counters
(engine steps, tokens decoded, prefix tokens recomputed).  vLLM's prefix cache reuses only full
KV blocks (``block_size``, 32 on CPU), so short blocks re-prefill up to ``block_size − 1`` tokens
per row per call.

    OMP_NUM_THREADS=1 VLLM_CPU_KVCACHE_SPACE=1 LD_PRELOAD=$VENV/lib/libiomp5.so \\
        python benchmarks/vllm_blocks.py --out benchmarks/results/vllm_blocks_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")

import torch

import llmppl as pp
from llmppl.benchmarking.engine import machine_info
from llmppl.benchmarking.latency import PROMPTS
from llmppl.models.block import BlockSpec


def run(lm, prompts: list[list[int]], rows: int, tokens: int, block: int, seed: int) -> dict:
    state = lm.start(prompts, n=rows, max_new_tokens=tokens)
    R = state.n
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    done = 0
    lp = torch.zeros(R, dtype=torch.float64)
    while done < tokens:
        b = min(block, tokens - done)
        out = state.sample_block(torch.arange(R), BlockSpec.make(R, b, 1.0, lm.eos_token_ids, allow_stop=False), g)
        lp += out.total("log_p")
        done += b
    wall = time.perf_counter() - t0
    assert all(len(t) == tokens for t in state.tokens)
    return {"wall_s": wall, "ms_per_step": 1e3 * wall / tokens, "forward_passes": state.forward_passes,
            "tokens_decoded": state.tokens_decoded, "tokens_prefilled": getattr(state, "tokens_prefilled", None),
            "mean_log_p_per_token": float(lp.mean()) / tokens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--blocks", type=int, nargs="+", default=[1, 4, 8, 32])
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--backends", nargs="+", default=["vllm", "hf"])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/vllm_blocks_cpu.json"))
    args = ap.parse_args()
    results: dict = {"config": vars(args) | {"out": str(args.out)}, "machine": machine_info("cpu"),
                     "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "VLLM_CPU_KVCACHE_SPACE")},
                     "runs": {}}
    for backend in args.backends:
        t0 = time.perf_counter()
        lm = pp.models.default_lm(backend=backend)
        start = time.perf_counter() - t0
        prompts = [lm.encode_prompt(p, chat=True) for p in PROMPTS[:args.prompts]]
        run(lm, prompts[:1], 1, 2, 1, 0)  # warm-up
        entry: dict = {"start_s": start, "prompt_tokens": [len(p) for p in prompts]}
        if backend == "vllm":
            import vllm

            entry["vllm"] = vllm.__version__
            entry["block_size"] = lm.block_size
        for block in args.blocks:
            reps = [run(lm, prompts, args.rows, args.tokens, block, seed) for seed in range(args.reps)]
            best = sorted(reps, key=lambda r: r["wall_s"])[len(reps) // 2]
            best["wall_s_all"] = [r["wall_s"] for r in reps]
            entry[f"block_{block}"] = best
            print(f"{backend:5s} block {block:3d}: {best['ms_per_step']:7.1f} ms/step "
                  f"(median of {len(reps)}: {statistics.median(best['wall_s_all']):.1f} s)", flush=True)
        results["runs"][backend] = entry
        del lm
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
