"""``llmppl bench constraints``: per-token cost of a grammar constraint's mask over unconstrained SMC
(issue 41; aim ≤ 1.2×).

    llmppl bench constraints [--particles 16] [--max-new-tokens 48] [--repeats 3]
        [--json benchmarks/results/constraints_overhead_cpu.json]

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
import contextlib
import statistics
import sys
import time
from collections.abc import Iterator
from typing import Any

from .engine import emit, machine_info

PROMPT = "Describe a made-up person: their name, age and a long biography."
REGEX = r"[A-Za-z0-9 ,.'\n-]{1,2000}"
SCHEMA = {"type": "object",
          "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "bio": {"type": "string"}},
          "required": ["name", "age", "bio"], "additionalProperties": False}


@contextlib.contextmanager
def mask_clock() -> Iterator[dict[str, float]]:
    """Wall and thread-CPU seconds spent inside ``GrammarConstraint.allowed_tokens`` (native blocks)
    and ``log_next`` (the token path) while the block runs: the mask's own cost, whatever the LM costs.
    The methods are restored on exit."""
    from ..targets.constraints import GrammarConstraint

    clock = {"s": 0.0, "cpu": 0.0}
    saved = {name: getattr(GrammarConstraint, name) for name in ("allowed_tokens", "log_next")}

    def timed(inner: Any) -> Any:
        def wrapper(self: Any, *a: Any) -> Any:
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                return inner(self, *a)
            finally:
                clock["s"] += time.perf_counter() - t0
                clock["cpu"] += time.thread_time() - c0
        return wrapper

    try:
        for name, method in saved.items():
            setattr(GrammarConstraint, name, timed(method))
        yield clock
    finally:
        for name, method in saved.items():
            setattr(GrammarConstraint, name, method)


def run_constraints(model: str | None, particles: int, max_new_tokens: int, alpha: float, repeats: int,
                    device: str = "cpu") -> dict[str, Any]:
    """The benchmark itself; returns the JSON-ready dict."""
    import llmppl as pp

    if particles < 1 or max_new_tokens < 1 or repeats < 1 or not alpha > 0:
        raise ValueError("--particles, --max-new-tokens and --repeats must be >= 1 and --alpha > 0")
    lm = pp.models.load_model(model, device=device)
    chat = getattr(lm.tokenizer, "chat_template", None) is not None
    power = pp.Power(alpha)
    arms = {
        "unconstrained": (pp.Target(lm, power, chat=chat), None),
        "unconstrained_token_path": (pp.Target(lm, power, chat=chat), pp.proposals.LocallyOptimal()),
        "regex": (pp.Target(lm, power * pp.constraints.Regex(REGEX), chat=chat), None),
        "json": (pp.Target(lm, power * pp.constraints.JSONSchema(SCHEMA), chat=chat), None),
    }
    runs: dict[str, list[dict]] = {k: [] for k in arms}
    with mask_clock() as clock:
        # warm-up: tokenizer tables, llguidance's tokenizer, the model's first calls
        for target, proposal in arms.values():
            pp.SMC(2, proposal=proposal).run_batch(target, [PROMPT], 4, seed=123)   # run_batch: cut rows may die
        for rep in range(repeats):
            for name, (target, proposal) in arms.items():
                clock["s"] = clock["cpu"] = 0.0
                cpu0 = time.process_time()
                # run_batch, not run: a JSON arm whose particles are all cut mid-object has no sample, but
                # its time per token is what is measured here
                (res,) = pp.SMC(particles, proposal=proposal).run_batch(target, [PROMPT], max_new_tokens, seed=rep)
                cpu = time.process_time() - cpu0
                st = res.stats
                runs[name].append({"wall_time_s": st["wall_time"], "tokens_sampled": st["tokens_sampled"],
                                   "n_steps": st["n_steps"], "mask_seconds": clock["s"],
                                   "mask_cpu_seconds": clock["cpu"], "process_cpu_seconds": cpu,
                                   "s_per_token": st["wall_time"] / max(1, st["tokens_sampled"]),
                                   "cpu_s_per_token": cpu / max(1, st["tokens_sampled"]),
                                   "error": res.error, "example": (res.texts or [None])[0]})
                print(f"{name:26s} rep {rep}: {st['wall_time']:.2f} s ({cpu:.1f} s CPU), {st['tokens_sampled']} "
                      f"tokens, mask {clock['s']:.3f} s ({clock['cpu']:.3f} s CPU)", file=sys.stderr)
    med = {k: statistics.median(r["s_per_token"] for r in v) for k, v in runs.items()}
    cpu_med = {k: statistics.median(r["cpu_s_per_token"] for r in v) for k, v in runs.items()}
    mask = {k: statistics.median(r["mask_seconds"] / max(1, r["tokens_sampled"]) for r in v) for k, v in runs.items()}
    return {
        "benchmark": "constraints_overhead", "model": lm.name, "device": device,
        "command": (f"llmppl bench constraints --particles {particles} --max-new-tokens {max_new_tokens} "
                    f"--alpha {alpha:g} --repeats {repeats}"),
        "machine": machine_info(str(lm.device)),
        "particles": particles, "max_new_tokens": max_new_tokens, "alpha": alpha,
        "repeats": repeats, "prompt": PROMPT, "regex": REGEX, "schema": SCHEMA,
        "s_per_token_median": med, "mask_s_per_token_median": mask,
        "cpu_s_per_token_median": cpu_med,
        "cpu_overhead_over_unconstrained": {k: cpu_med[k] / cpu_med["unconstrained"] for k in ("regex", "json")},
        "cpu_overhead_over_token_path": {k: cpu_med[k] / cpu_med["unconstrained_token_path"] for k in ("regex", "json")},
        "overhead_over_unconstrained": {k: med[k] / med["unconstrained"] for k in ("regex", "json")},
        "overhead_over_token_path": {k: med[k] / med["unconstrained_token_path"] for k in ("regex", "json")},
        "runs": runs,
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model spec (default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--particles", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--alpha", type=float, default=2.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--json", default="benchmarks/results/constraints_overhead_cpu.json", help="write the results here")


def run(args: argparse.Namespace) -> int:
    return emit(run_constraints(args.model, args.particles, args.max_new_tokens, args.alpha, args.repeats,
                                args.device), args.json)
