"""What N, alpha, the schedule and the step do to a Power-SMC run on the bundled model (docs/choosing.md).

One axis at a time around the CLI's defaults (N = 8, alpha = 4, constant schedule, token steps),
each setting run with ``run_batch`` on the same prompts and seeds.  Per setting, averaged over
prompts and seeds: the final ESS as a share of N, the number of resampling events, the distinct
completions among the N particles, the weight on the heaviest one, ``log p(y|x)`` per token of the
returned completion, the weight on completions cut at ``--max-new-tokens``, tokens decoded and
seconds; and the spread (standard deviation over seeds) of ``log Ẑ`` per prompt, the noise of the
evidence estimate.

    python benchmarks/choosing.py --out benchmarks/results/choosing_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

PROMPTS = ["Name three primary colors.", "What is the capital of France?", "Give one word that rhymes with cat.",
           "What is 12 + 7?", "Name a planet of the solar system.", "Say hello in Spanish.",
           "What colour is the sky on a clear day?", "Name an animal that lives in the sea."]

#: the CLI's defaults; every other setting changes one of them
BASE = {"particles": 8, "alpha": 4.0, "schedule": "constant", "step": "tokens:1"}
#: axis -> the settings that differ from BASE (each a dict of llmppl.methods.MethodOptions fields)
AXES = {
    "particles": [{"particles": 4}, {"particles": 16}],
    "alpha": [{"alpha": 2.0}, {"alpha": 8.0}],
    "schedule": [{"schedule": "linear", "bridge_steps": 16}, {"schedule": "geometric", "bridge_steps": 16},
                 {"schedule": "adaptive"}],
    "step": [{"step": "tokens:4"}, {"step": "tokens:8"}],
}


def measure(lm, options: dict, max_new_tokens: int, seeds: list[int]) -> dict:
    import numpy as np

    import llmppl as pp
    from llmppl.diagnostics.completions import distinct_completions
    from llmppl.methods import build_method

    method = build_method("smc", **options)
    target = pp.Target(lm, pp.Power(options["alpha"]), chat=True)
    rows, logz, seconds, tokens = [], [[] for _ in PROMPTS], 0.0, 0
    for seed in seeds:
        t0 = time.perf_counter()
        results = method.run_batch(target, PROMPTS, max_new_tokens, seed=seed)
        seconds += time.perf_counter() - t0
        for p, r in enumerate(results):
            tokens += int(r.stats.get("tokens_decoded", 0))
            comps = distinct_completions(r)
            i = r.best_index()
            n_tok = max(1, len(r.samples[i]))
            resampled = r.steps.get("resampled", [])
            rows.append({"ess_share": r.final_ess / r.n, "resamplings": int(sum(bool(x) for x in resampled)),
                         "distinct": len(comps), "top_mass": comps[0].mass,
                         "log_p_per_token": r.log_p[i] / n_tok if r.log_p else None,
                         "truncated_share": r.truncated_share})
            logz[p].append(r.log_evidence)
    mean = lambda k: round(statistics.fmean(x[k] for x in rows if x[k] is not None), 4)
    return {"options": options, "ess_share": mean("ess_share"), "resamplings": mean("resamplings"),
            "distinct_completions": mean("distinct"), "top_mass": mean("top_mass"),
            "log_p_per_token": mean("log_p_per_token"), "truncated_share": mean("truncated_share"),
            "log_evidence_sd_over_seeds": round(float(np.mean([np.std(z, ddof=1) for z in logz])), 4),
            "tokens_per_prompt": round(tokens / (len(PROMPTS) * len(seeds)), 1),
            "seconds_per_batch": round(seconds / len(seeds), 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import torch

    import llmppl as pp

    torch.set_num_threads(args.threads)
    lm = pp.models.default_lm()
    seeds = list(range(args.seeds))
    load0 = os.getloadavg()
    base = measure(lm, dict(BASE), args.max_new_tokens, seeds)
    print("base", json.dumps(base), file=sys.stderr)
    axes = {}
    for axis, settings in AXES.items():
        axes[axis] = []
        for s in settings:
            row = measure(lm, {**BASE, **s}, args.max_new_tokens, seeds)
            print(axis, json.dumps(row), file=sys.stderr)
            axes[axis].append(row)
    cpu = None
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
    except OSError:
        pass
    from llmppl.benchmarking.engine import code_version

    out = {"benchmark": "choosing", "model": "smollm2-135m-instruct", "prompts": PROMPTS,
           "max_new_tokens": args.max_new_tokens, "seeds": seeds, "base": base, "axes": axes,
           "command": "python benchmarks/choosing.py " + " ".join(sys.argv[1:]),
           "host": {"cpu_model": cpu, "cpu_count": os.cpu_count(), "torch_threads": args.threads,
                    "torch": torch.__version__, "python": sys.version.split()[0], "platform": platform.platform(),
                    "load_average_start": load0, "load_average_end": os.getloadavg(), "llmppl": code_version()}}
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
