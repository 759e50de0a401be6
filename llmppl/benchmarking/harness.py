"""``llmppl bench harness``: problems per hour of ``llmppl eval``, before and after batching.

The same evaluation (task, problems, methods, seeds, ``max_new_tokens``) runs under each
harness setting, interleaved (rep → setting) so drifting machine load hits all alike:

* ``per_problem_hf``: one problem per ``run_batch`` call on transformers — the harness
  before this round (``--batch-prompts 1``, ``--backend hf``);
* ``batched_hf``: ``--batch-prompts P`` on transformers;
* ``batched_llamacpp``: ``--batch-prompts P`` on llama.cpp (the GGUF run natively).

Each run writes a fresh results file; the time of a setting is the sum over its
records of the engine's wall time (model loading excluded), and
``problems_per_hour = 3600 · problems / seconds`` per method and over all methods.
``speedup[s] = seconds(per_problem_hf) / seconds(s)`` (medians over reps).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Any

from .engine import emit, machine_info

#: setting -> the ``llmppl eval`` options that define it (besides the shared ones)
SETTINGS: dict[str, dict[str, Any]] = {
    "per_problem_hf": {"backend": "hf", "batch_prompts": 1},
    "batched_hf": {"backend": "hf", "batch_prompts": None},
    "batched_llamacpp": {"backend": "llamacpp", "batch_prompts": None},
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", default="reasoning_gym:chain_sum")
    p.add_argument("--task-config", default="{}")
    p.add_argument("--model", default="qwen2.5-coder-0.5b")
    p.add_argument("--n", type=int, default=8, help="problems per run (default 8)")
    p.add_argument("--methods", default="plain,smc")
    p.add_argument("--particles", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-prompts", type=int, default=8, help="P of the batched settings (default 8)")
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated from {', '.join(SETTINGS)}")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n-ctx", type=int, default=16384, help="llama.cpp KV cells")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="benchmarks/results/eval/harness_speedup_cpu.json")


def _eval_args(args: argparse.Namespace, setting: str, path: Path) -> argparse.Namespace:
    from ..evaluation.cli import add_eval

    opts = SETTINGS[setting]
    argv = ["eval", "--task", args.task, "--task-config", args.task_config, "--model", args.model,
            "--n", str(args.n), "--methods", args.methods, "--particles", str(args.particles),
            "--max-new-tokens", str(args.max_new_tokens), "--threads", str(args.threads),
            "--seed", str(args.seed), "--json", str(path), "--quiet", "--backend", opts["backend"],
            "--batch-prompts", str(opts["batch_prompts"] or args.batch_prompts)]
    if opts["backend"] == "llamacpp":
        argv += ["--n-ctx", str(args.n_ctx)]
    parser = argparse.ArgumentParser()
    add_eval(parser.add_subparsers())
    return parser.parse_args(argv)


def _seconds(path: Path) -> dict[str, float]:
    """method -> Σ over its records of the engine wall time per problem."""
    from ..evaluation.runner import load_records

    out: dict[str, float] = {}
    for r in load_records([path]):
        out[r["method"]] = out.get(r["method"], 0.0) + float(r["wall_time"])
    return out


def run(args: argparse.Namespace) -> int:
    from ..evaluation.cli import evaluate

    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown or not settings:
        raise ValueError(f"unknown harness settings {unknown}; choose from {', '.join(SETTINGS)}")
    if min(args.n, args.reps, args.batch_prompts, args.particles, args.max_new_tokens) < 1:
        raise ValueError("--n, --reps, --batch-prompts, --particles and --max-new-tokens must be >= 1")
    times: dict[str, list[dict[str, float]]] = {s: [] for s in settings}
    with tempfile.TemporaryDirectory(prefix="llmppl-harness-") as tmp:
        for rep in range(args.reps):
            for s in settings:
                path = Path(tmp) / f"{s}_{rep}.jsonl"
                evaluate(_eval_args(args, s, path))
                times[s].append(_seconds(path))
    methods = sorted(times[settings[0]][0])
    median = {s: {m: statistics.median(t[m] for t in times[s]) for m in methods} for s in settings}
    total = {s: statistics.median(sum(t.values()) for t in times[s]) for s in settings}
    base = settings[0]
    result = {
        "benchmark": "harness", "machine": machine_info("cpu"),
        "command": "llmppl bench harness " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("func", "command", "benchmark")),
        "task": args.task, "model": args.model, "problems": args.n, "methods": methods,
        "particles": args.particles, "max_new_tokens": args.max_new_tokens, "batch_prompts": args.batch_prompts,
        "settings": {s: SETTINGS[s] | {"batch_prompts": SETTINGS[s]["batch_prompts"] or args.batch_prompts}
                     for s in settings},
        "seconds": times, "median_seconds": median, "median_seconds_all_methods": total,
        "problems_per_hour": {s: 3600.0 * args.n / total[s] for s in settings},
        "problems_per_hour_by_method": {s: {m: 3600.0 * args.n / median[s][m] for m in methods} for s in settings},
        f"speedup_over_{base}": {s: total[base] / total[s] for s in settings},
    }
    return emit(result, args.json)
