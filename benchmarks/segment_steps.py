"""Segment steps with resampling against no resampling, on the ``"truncating"`` toy at α = 4
(issue 39, item 3).

Setup: ``llmppl.models.toy.EXACTNESS["truncating"]`` (a ForkingLM whose EOS probability grows
with the position: 0, 0, 0.15, 0.45; horizon 4), target ``p^4``, segment steps
``pp.steps.Until(d, max_tokens=3)`` for every generated token id ``d`` in 0..3 (the issue's
0.17–0.38 is the range over these delimiters; ``d = 3`` is its "97 % of the first step's mass
to a prefix whose final mass is 0.33").  For each delimiter and each rule:

* ``none``: no resampling (``ess_threshold=0``; the same runs for every delimiter, since the
  twist cancels and the draws are the same);
* ``all``: resample after every segment among all particles (``Until(..., resample="all")``,
  ``ess_threshold=1``: the rule before this change), also with ``slope=True``;
* ``position``: resample after every segment within position classes (the default rule,
  ``ess_threshold=1``), with systematic and multinomial resampling, and with the default
  ``ess_threshold=0.5`` (``position_half``: a prompt resamples when the ESS of its weights
  relative to their position's mean falls below N/2);
* ``all_oracle``: a reference no LM run can have — resampling among all particles after every
  segment with the *exact* remaining mass of each prefix as its twist (enumerated on the toy):
  what the best possible look-ahead twist would give;

it records the TV distance to the exact target of single runs at N = 2000 (seeds 0..S−1),
the pooled TV of 12 runs × 1000 particles (seeds 100..111), the mean ``Ẑ/Z`` of the single runs,
and the first step's (twisted) weight on the one-token prefix ``(d,)`` and the share of the
particles holding it after the first resampling, against that prefix's exact final mass.  Writes ``benchmarks/results/segment_steps_cpu.json``.

    nice python benchmarks/segment_steps.py            # ~10 min on a loaded 2-core machine
    python benchmarks/segment_steps.py --seeds 4 --delimiters 3 --json /tmp/quick.json
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import llmppl as pp  # noqa: E402
from llmppl.benchmarking.engine import code_version, emit  # noqa: E402
from llmppl.exact import enumerate_target  # noqa: E402
from llmppl.inference.particles import completions  # noqa: E402
from llmppl.inference.terms import WeightTerm  # noqa: E402
from llmppl.models.toy import EXACTNESS  # noqa: E402

ALPHA = 4.0
MAX_TOKENS = 3
#: rule -> (ess_threshold, Until keyword arguments, resampling scheme)
RULES = {
    "none": (0.0, {}, "systematic"),
    "all": (1.0, {"resample": "all"}, "systematic"),
    "all_slope": (1.0, {"resample": "all", "slope": True}, "systematic"),
    "position": (1.0, {}, "systematic"),
    "position_multinomial": (1.0, {}, "multinomial"),
    "position_half": (0.5, {}, "systematic"),
    "all_oracle": (1.0, {"resample": "all", "oracle": True}, "systematic"),
}


class ExactValue(WeightTerm):
    """A reference twist no LM run can have: the exact remaining mass of each live prefix,
    ``log Σ_z p(z | y)^{a_t}`` over its completions to the horizon (enumerated on the toy)."""

    name = "exact_value"

    def __init__(self) -> None:
        self.cache: dict = {}

    def start(self, plan, state) -> None:
        P = state.particles
        P.extra[self.name] = torch.zeros(P.R, dtype=torch.float64, device=P.device)

    def value(self, lm, prompt, y: tuple[int, ...], a: float, T: int) -> float:
        key = (y, a)
        if key not in self.cache:
            self.cache[key] = enumerate_target(pp.Target(lm, pp.Power(a)), list(prompt) + list(y), T - len(y)).log_Z
        return self.cache[key]

    def increment(self, plan, state, drawn) -> torch.Tensor:
        P = state.particles
        prev, new = P.extra[self.name], torch.zeros_like(P.extra[self.name])
        toks = completions(state.decoding, P.unfed)
        a = drawn.a_rows.tolist()
        for r in (~P.done).nonzero().flatten().tolist():
            new[r] = self.value(plan.lm, state.prompts[r // P.N], tuple(toks[r]), a[r], plan.max_new_tokens)
        P.extra[self.name] = new
        return torch.where(drawn.active, new - prev, torch.zeros_like(new))


class ExactValueUntil(pp.steps.Until):
    """``Until`` with the exact-value twist instead of the one-token look-ahead (a reference)."""

    def terms(self):
        return (ExactValue(),)


def smc(rule: str, delimiter: int, n: int) -> pp.SMC:
    kappa, kwargs, scheme = RULES[rule]
    kwargs = dict(kwargs)
    kind = ExactValueUntil if kwargs.pop("oracle", False) else pp.steps.Until
    return pp.SMC(n, step=kind(delimiter, max_tokens=MAX_TOKENS, **kwargs),
                  ess_threshold=kappa, resampling=scheme)


def first_step(target, prompt, T, delimiter: int, rule: str, n: int, seed: int) -> dict[str, float]:
    """After the first segment: the normalised (twisted) weight on the one-token prefix
    ``(delimiter,)`` before resampling (read from a run that does not resample: the same draws
    and twist), and the share of the particles that hold it after ``rule``'s resampling."""
    out = {}
    for name in ("none", rule):
        engine = smc(name, delimiter, n)
        state = engine.init(target, [prompt], T, seed=seed)
        state, info = engine.step(state)
        hold = torch.tensor([tuple(s) == (delimiter,) for s in completions(state.decoding, state.particles.unfed)])
        if name == "none":
            out["weight_before_resampling"] = float(torch.softmax(info.log_weights[0].double(), 0)[hold].sum())
        else:
            out["particles_after_resampling"] = float(hold.double().mean())
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=12, help="single runs per rule (seeds 0..S-1)")
    p.add_argument("--particles", type=int, default=2000)
    p.add_argument("--pooled-runs", type=int, default=12)
    p.add_argument("--pooled-particles", type=int, default=1000)
    p.add_argument("--delimiters", default="0,1,2,3")
    p.add_argument("--rules", default=",".join(RULES))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "segment_steps_cpu.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    setup = EXACTNESS["truncating"]
    lm, prompt, T = setup.lm(), setup.prompt, setup.max_new_tokens
    target = pp.Target(lm, pp.Power(ALPHA))
    exact = enumerate_target(target, prompt, T)
    prefix_mass = {d: sum(v for s, v in exact.as_dict().items() if s[:1] == (d,)) for d in range(4)}
    rules = args.rules.split(",")
    started = time.time()
    out: dict = {
        "what": "TV to the exact p^4 of SMC with Until(d, max_tokens=3) segment steps on the 'truncating' toy",
        "setup": {"exactness": "truncating", "alpha": ALPHA, "max_new_tokens": T, "max_tokens": MAX_TOKENS,
                  "prompt": prompt, "effective_support": exact.effective_support,
                  "rules": {r: {"ess_threshold": RULES[r][0], "until": RULES[r][1], "resampling": RULES[r][2]}
                            for r in rules},
                  "single": {"particles": args.particles, "seeds": list(range(args.seeds))},
                  "pooled": {"runs": args.pooled_runs, "particles": args.pooled_particles,
                             "seeds": list(range(100, 100 + args.pooled_runs))}},
        "host": {"machine": platform.machine(), "processor": platform.processor(), "cpus": os.cpu_count(),
                 "load_average": os.getloadavg(), "torch": torch.__version__, "threads": args.threads,
                 "llmppl": code_version()},
        "delimiters": {},
    }
    cache: dict = {}
    for d in (int(x) for x in args.delimiters.split(",")):
        res: dict = {"final_mass_of_prefix": prefix_mass[d], "rules": {}}
        for rule in rules:
            key = ("none",) if rule == "none" else (rule, d)       # 'none' is the same for every delimiter
            if key not in cache:
                tv, z = [], []
                for seed in range(args.seeds):
                    r = smc(rule, d, args.particles).run(target, prompt, T, seed=seed)
                    tv.append(exact.tv(r.samples, r.weights))
                    z.append(math.exp(r.log_evidence - exact.log_Z))
                samples, weights = [], []
                for seed in range(100, 100 + args.pooled_runs):
                    r = smc(rule, d, args.pooled_particles).run(target, prompt, T, seed=seed)
                    samples += r.samples
                    weights += list(r.weights / args.pooled_runs)
                cache[key] = {"tv": tv, "tv_mean": statistics.fmean(tv), "tv_max": max(tv),
                              "zhat_over_z_mean": statistics.fmean(z),
                              "zhat_over_z_se": statistics.stdev(z) / math.sqrt(len(z)) if len(z) > 1 else None,
                              "pooled_tv": exact.tv(samples, weights)}
            entry = dict(cache[key])
            if rule != "none":
                entry["first_step_prefix"] = first_step(target, prompt, T, d, rule, args.particles, 0)
            res["rules"][rule] = entry
            print(f"d={d} {rule:22s} TV mean {entry['tv_mean']:.4f} max {entry['tv_max']:.3f} "
                  f"pooled {entry['pooled_tv']:.4f} Zhat/Z {entry['zhat_over_z_mean']:.3f}", file=sys.stderr,
                  flush=True)
        if "none" in res["rules"]:
            base = res["rules"]["none"]["tv"]
            for rule, entry in res["rules"].items():
                diff = [a - b for a, b in zip(entry["tv"], base)]
                entry["tv_minus_none_mean"] = statistics.fmean(diff)
                entry["tv_minus_none_se"] = statistics.stdev(diff) / math.sqrt(len(diff)) if len(diff) > 1 else None
        out["delimiters"][str(d)] = res
    out["seconds"] = time.time() - started
    return emit(out, args.json)


if __name__ == "__main__":
    sys.exit(main())
