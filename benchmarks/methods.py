"""MH vs Power-SMC vs plain decoding on one prompt: wall time and tokens generated.

    python benchmarks/methods.py [--max-new-tokens 64] [--out benchmarks/results/methods.json]

Same target (``p^α``), prompt and ``max_new_tokens`` for every method: block MH
(Karan & Du Algorithm 1 scaled down: ``B = T/4``, ``n_mcmc``), Power-SMC with N
particles and ``q ∝ p^α``, and plain sampling (one completion).  Writes one JSON
record per method plus the paper's cost estimate for MH, ``T + n_mcmc·T²/(4B)``
generated tokens per chain, and prints the ratios to plain decoding.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPT = "Explain in a few sentences why the sky is blue."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model spec (default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--alpha", type=float, default=4.0)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--block-size", type=int, default=None, help="MH block size (default T/4)")
    p.add_argument("--n-mcmc", type=int, default=4)
    p.add_argument("--chains", type=int, default=1, help="MH chains (batched)")
    p.add_argument("--particles", type=int, default=8, help="Power-SMC particles")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="benchmarks/results/methods.json")


def run(args: argparse.Namespace) -> int:
    import torch

    import llmppl as pp

    lm = pp.models.load_model(args.model, device=args.device)
    chat = getattr(lm.tokenizer, "chat_template", None) is not None
    target = pp.Target(lm, pp.Power(args.alpha), chat=chat)
    T = args.max_new_tokens
    B = args.block_size or max(1, T // 4)
    engines = {
        "plain": (pp.baselines.Plain(n=1), {}),
        f"power_smc_N{args.particles}": (pp.SMC(n_particles=args.particles), {}),
        f"mh_B{B}_nmcmc{args.n_mcmc}": (pp.MH(block_size=B, n_mcmc=args.n_mcmc), {"chains": args.chains}),
    }
    records = {}
    for name, (engine, extra) in engines.items():
        res = engine.run(target, args.prompt, T, seed=args.seed, **extra)
        records[name] = {
            "wall_time_s": res.stats["wall_time"],
            "tokens_decoded": res.stats["tokens_decoded"],
            "forward_passes": res.stats["forward_passes"],
            "peak_memory_bytes": res.stats["peak_memory"],
            "completion_tokens": [len(s) for s in res.samples],
            "mean_log_p": sum(res.log_p) / len(res.log_p),
            "best": res.best,
            "config": res.config,
        }
        if name.startswith("mh"):
            records[name]["acceptance_per_stage"] = res.steps["acceptance"]
            records[name]["paper_cost_tokens_per_chain"] = T + args.n_mcmc * T * T / (4 * B)
        print(f"{name:>24}: {res.stats['wall_time']:7.2f} s  {res.stats['tokens_decoded']:6d} tokens  "
              f"{res.stats['forward_passes']:5d} forwards", file=sys.stderr)
    base = records["plain"]
    for name, r in records.items():
        r["time_vs_plain"] = r["wall_time_s"] / base["wall_time_s"]
        r["tokens_vs_plain"] = r["tokens_decoded"] / max(base["tokens_decoded"], 1)
        print(f"{name:>24}: x{r['time_vs_plain']:6.1f} time, x{r['tokens_vs_plain']:6.1f} tokens vs plain")
    out = {"model": lm.name, "prompt": args.prompt, "alpha": args.alpha, "max_new_tokens": T,
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                       "torch_threads": torch.get_num_threads(), "device": args.device},
           "methods": records}
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
