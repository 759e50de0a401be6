"""What Power-SMC in blocks makes vLLM compute, against plain decoding of the same rows (writes JSON).

The rows and engine of ``llmppl bench latency --backend vllm`` (the first ``--prompts`` chat prompts
× ``--particles``, ``--max-new-tokens`` tokens, EOS masked, ``q ∝ p^4``, ESS-triggered systematic
resampling), driven through ``SMC.init`` / ``SMC.step`` so that the decoding state's counters can be
read: for each SMC step of ``K`` tokens, the prompt positions vLLM prefilled (``tokens_prefilled``:
the prompts once, plus every forked row's prefix beyond the KV blocks its prefix cache holds) and
the resampling events, against plain decoding (one block of all the tokens).  Counts, not times:
the same on a loaded machine.  The position ratio ``(decoded + prefilled) / (decoded + plain's
prefilled)`` bounds what SMC can cost over plain on a backend whose step time grows with the
positions it computes.

    VLLM_CPU_KVCACHE_SPACE=2 LD_PRELOAD=$VENV/lib/libiomp5.so \\
        python benchmarks/vllm_recompute.py --out benchmarks/results/vllm_recompute_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import torch

import llmppl as pp
from llmppl.benchmarking.engine import machine_info
from llmppl.benchmarking.latency import ALPHA, PROMPTS, engines
from llmppl.models.block import BlockSpec


def smc_counts(lm, target, texts: list[str], N: int, T: int, K: int, seed: int) -> dict:
    smc = engines(lm, N, block=K)["smc"]
    state = smc.init(target, texts, T, seed=seed)
    while not state.done:
        state, _ = smc.step(state)
    res = smc.results(state)
    return {"tokens_prefilled": state.decoding.tokens_prefilled, "tokens_decoded": state.decoding.tokens_decoded,
            "resampling_events": sum(r.stats["resampling_count"] for r in res),
            "engine_calls": state.t}


def plain_counts(lm, target, texts: list[str], N: int, T: int) -> dict:
    state = lm.start([target.encode(t) for t in texts], N, max_new_tokens=T)
    spec = BlockSpec.make(state.n, T, 1.0, lm.eos_token_ids, allow_stop=False)
    state.sample_block(torch.arange(state.n), spec, torch.Generator().manual_seed(0))
    return {"tokens_prefilled": state.tokens_prefilled, "tokens_decoded": state.tokens_decoded}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--particles", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--blocks", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/vllm_recompute_cpu.json"))
    args = ap.parse_args()
    lm = pp.models.default_lm(backend="vllm")
    target = pp.Target(lm, pp.Power(ALPHA), chat=True)
    texts, N, T = PROMPTS[:args.prompts], args.particles, args.max_new_tokens
    plain_counts(lm, target, texts, N, T)          # warm-up: every count below has the prompts' full blocks cached
    plain = plain_counts(lm, target, texts, N, T)
    base = plain["tokens_decoded"] + plain["tokens_prefilled"]
    out: dict = {"config": vars(args) | {"out": str(args.out)}, "machine": machine_info("cpu"),
                 "vllm_block_size": lm.block_size, "plain": plain, "smc": {}}
    for K in args.blocks:
        runs = [smc_counts(lm, target, texts, N, T, K, seed) for seed in range(args.seeds)]
        positions = [r["tokens_decoded"] + r["tokens_prefilled"] for r in runs]
        out["smc"][f"block_{K}"] = {"runs": runs, "positions_over_plain": [p / base for p in positions]}
        print(f"block {K:3d}: prefilled {[r['tokens_prefilled'] for r in runs]} (plain {plain['tokens_prefilled']}), "
              f"positions / plain {[round(p / base, 2) for p in positions]}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
