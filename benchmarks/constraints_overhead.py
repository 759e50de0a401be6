"""Per-token cost of a grammar constraint's mask over unconstrained SMC (issue 41; aim ≤ 1.2×).

    python benchmarks/constraints_overhead.py [--particles 16] [--max-new-tokens 48] [--repeats 3]
        [--out benchmarks/results/constraints_overhead_cpu.json]

Same model, prompt, particles, budget and α for every arm; seconds per sampled token
(``wall_time / tokens_sampled``), median over ``--repeats`` runs interleaved arm by arm (so a
busy machine slows every arm alike):

* ``unconstrained``: ``Power(α)``, the default proposal ``q ∝ p^α`` (the native block path);
* ``unconstrained_token_path``: the same target with ``LocallyOptimal`` (the full-vocabulary token
  path every masked target takes; equal to ``q ∝ p^α`` here);
* ``regex`` / ``json``: ``Power(α) * Regex(...)`` (a permissive prose pattern) and
  ``Power(α) * JSONSchema(...)`` (an object with a long free-text field), default proposal
  (``LocallyOptimal``: ``q ∝ p^α · mask``).

``mask_seconds`` / ``mask_cpu_seconds`` are the wall / thread-CPU time spent inside the constraint's
``allowed_tokens`` and ``log_next`` (llguidance's matchers and masks, the memo, unpacking the bitmask):
the mask's own cost, whatever the LM costs.  On a shared machine the process CPU time per token
(``cpu_s_per_token``, all threads) is the steadier measure; both are recorded.  The ratios
``regex / unconstrained`` and ``json / unconstrained`` are the overhead a user sees; the ratios over
``unconstrained_token_path`` isolate the mask from the choice of decoding path.
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

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPT = "Describe a made-up person: their name, age and a long biography."
REGEX = r"[A-Za-z0-9 ,.'\n-]{1,2000}"
SCHEMA = {"type": "object",
          "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "bio": {"type": "string"}},
          "required": ["name", "age", "bio"], "additionalProperties": False}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model spec (default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--particles", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--alpha", type=float, default=2.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="benchmarks/results/constraints_overhead_cpu.json")
    args = p.parse_args(argv)

    import torch

    import llmppl as pp
    from llmppl.targets.constraints import GrammarConstraint

    lm = pp.models.load_model(args.model, device=args.device)
    chat = getattr(lm.tokenizer, "chat_template", None) is not None
    power = pp.Power(args.alpha)
    arms = {
        "unconstrained": (pp.Target(lm, power, chat=chat), None),
        "unconstrained_token_path": (pp.Target(lm, power, chat=chat), pp.proposals.LocallyOptimal()),
        "regex": (pp.Target(lm, power * pp.constraints.Regex(REGEX), chat=chat), None),
        "json": (pp.Target(lm, power * pp.constraints.JSONSchema(SCHEMA), chat=chat), None),
    }
    mask_clock = {"s": 0.0, "cpu": 0.0}

    def timed(inner):
        def wrapper(self, *a):
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                return inner(self, *a)
            finally:
                mask_clock["s"] += time.perf_counter() - t0
                mask_clock["cpu"] += time.thread_time() - c0
        return wrapper

    # the mask's own cost: allowed_tokens (native blocks) and log_next (the token path)
    GrammarConstraint.allowed_tokens = timed(GrammarConstraint.allowed_tokens)   # type: ignore[method-assign]
    GrammarConstraint.log_next = timed(GrammarConstraint.log_next)               # type: ignore[method-assign]
    # warm-up: tokenizer tables, llguidance's tokenizer, the model's first calls
    for name, (target, proposal) in arms.items():
        pp.SMC(2, proposal=proposal).run_batch(target, [PROMPT], 4, seed=123)   # run_batch: cut rows may die
    runs: dict[str, list[dict]] = {k: [] for k in arms}
    for rep in range(args.repeats):
        for name, (target, proposal) in arms.items():
            mask_clock["s"] = mask_clock["cpu"] = 0.0
            cpu0 = time.process_time()
            # run_batch, not run: a JSON arm whose particles are all cut mid-object has no sample, but its
            # time per token is what is measured here
            (res,) = pp.SMC(args.particles, proposal=proposal).run_batch(target, [PROMPT], args.max_new_tokens,
                                                                         seed=rep)
            cpu = time.process_time() - cpu0
            st = res.stats
            runs[name].append({"wall_time_s": st["wall_time"], "tokens_sampled": st["tokens_sampled"],
                               "n_steps": st["n_steps"], "mask_seconds": mask_clock["s"],
                               "mask_cpu_seconds": mask_clock["cpu"], "process_cpu_seconds": cpu,
                               "s_per_token": st["wall_time"] / max(1, st["tokens_sampled"]),
                               "cpu_s_per_token": cpu / max(1, st["tokens_sampled"]),
                               "error": res.error, "example": (res.texts or [None])[0]})
            print(f"{name:26s} rep {rep}: {st['wall_time']:.2f} s ({cpu:.1f} s CPU), {st['tokens_sampled']} tokens, "
                  f"mask {mask_clock['s']:.3f} s ({mask_clock['cpu']:.3f} s CPU)", file=sys.stderr)
    med = {k: statistics.median(r["s_per_token"] for r in v) for k, v in runs.items()}
    cpu_med = {k: statistics.median(r["cpu_s_per_token"] for r in v) for k, v in runs.items()}
    mask = {k: statistics.median(r["mask_seconds"] / max(1, r["tokens_sampled"]) for r in v) for k, v in runs.items()}
    out = {
        "benchmark": "constraints_overhead", "model": lm.name, "device": args.device,
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "loadavg_at_end": os.getloadavg()},
        "particles": args.particles, "max_new_tokens": args.max_new_tokens, "alpha": args.alpha,
        "repeats": args.repeats, "prompt": PROMPT, "regex": REGEX, "schema": SCHEMA,
        "s_per_token_median": med, "mask_s_per_token_median": mask,
        "cpu_s_per_token_median": cpu_med,
        "cpu_overhead_over_unconstrained": {k: cpu_med[k] / cpu_med["unconstrained"] for k in ("regex", "json")},
        "cpu_overhead_over_token_path": {k: cpu_med[k] / cpu_med["unconstrained_token_path"] for k in ("regex", "json")},
        "overhead_over_unconstrained": {k: med[k] / med["unconstrained"] for k in ("regex", "json")},
        "overhead_over_token_path": {k: med[k] / med["unconstrained_token_path"] for k in ("regex", "json")},
        "runs": runs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: out[k] for k in ("s_per_token_median", "mask_s_per_token_median", "cpu_s_per_token_median",
                                          "cpu_overhead_over_unconstrained", "overhead_over_unconstrained",
                                          "overhead_over_token_path")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
