"""``llmppl`` command line: ``sample``, ``run``, ``bench``, ``eval``, ``serve``, ``models``.

Each sub-command is an entry of ``COMMANDS`` (name -> function adding its parser);
sampling methods are entries of ``llmppl.methods.METHODS`` (name -> builder of a
``Method`` from the parsed arguments), so a new engine is one registry line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from .methods import (  # noqa: E402,F401  (re-exported)
    METHODS, add_engine_arguments, build_method, check_backend, check_sampler_options, check_truncation,
)

TRUNCATION_HELP = ("keep (default): a completion cut at --max-new-tokens weighs p(prefix)^alpha; "
                   "zero: it weighs 0 (p^alpha conditioned on finishing)")


def add_sample(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="sample a completion from p^alpha (and friends)")
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--model", default=None, help="model name, local dir, .gguf file or hub id "
                   "(default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--alpha", type=float, default=4.0, help="power of the base LM (default 4)")
    p.add_argument("--method", choices=sorted(METHODS), default="smc")
    p.add_argument("--particles", type=int, default=8, help="particles / samples (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    add_engine_arguments(p)
    p.add_argument("--truncation", default=None, help=TRUNCATION_HELP)
    p.add_argument("--json", default=None, help="write the full Result as JSON here")
    p.add_argument("--report", default=None, help="write a self-contained HTML report here")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_sample)


def run_sample(args: argparse.Namespace) -> int:
    import llmppl as pp

    if args.particles < 1:
        raise ValueError(f"--particles must be >= 1, got {args.particles}")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    pp.Power(args.alpha)  # bad input fails before the model loads
    method = build_method(args.method, args)
    check_backend(method, args.backend)
    truncation = check_truncation(args.truncation, method.sharpened)
    lm = pp.models.load_model(args.model, device=args.device, dtype=args.dtype, backend=args.backend)
    chat = not args.no_chat and getattr(lm.tokenizer, "chat_template", None) is not None
    target = pp.Target(lm, pp.Power(method.target_alpha(args.alpha)), chat=chat, truncation=truncation)
    result = method.run(target, args.prompt, args.max_new_tokens, seed=args.seed)
    best = result.best
    print(best if isinstance(best, str) else json.dumps(best))
    print(result.summary(), file=sys.stderr)
    if args.json:
        result.to_json(args.json)
    if args.report:
        from .diagnostics.report import write_report

        write_report(result, args.report)
    return 0


def add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run", help="run a JSONL dataset of prompts through a method (batched, resumable)",
        description="Each input line is {\"id\": ..., \"prompt\": text | token ids | messages, ...}; "
        "each output line is that id's record (text, tokens, log evidence, ESS, cost, config). "
        "Rerunning with the same --output skips the ids already written.")
    p.add_argument("--input", required=True, help="input JSONL, one {id, prompt, ...} object a line")
    p.add_argument("--output", required=True, help="output JSONL (appended batch by batch; resumes)")
    p.add_argument("--method", choices=sorted(METHODS), default="smc")
    p.add_argument("--model", default=None, help="model name, local dir, .gguf file or hub id "
                   "(default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--alpha", type=float, default=4.0, help="power of the base LM (default 4)")
    p.add_argument("--tau", type=float, default=None, help="lowtemp temperature (default 1/alpha)")
    p.add_argument("--particles", type=int, default=8, help="particles / samples / chains (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-prompts", type=int, default=8, help="prompts per run_batch call (default 8)")
    p.add_argument("--seed", type=int, default=0, help="run seed; batch b uses SeedSequence([seed, b])")
    add_engine_arguments(p)
    p.add_argument("--truncation", default=None, help=TRUNCATION_HELP)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (per worker with --workers)")
    p.add_argument("--force", action="store_true",
                   help="overwrite an --output written with a different config")
    p.add_argument("--time-limit", type=float, default=None, help="stop cleanly after this many seconds")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--workers", type=int, default=None,
                   help="run on K Ray actors, one model replica each (needs llmppl[ray])")
    p.add_argument("--ray-address", default=None,
                   help="an existing Ray cluster: auto, HOST:PORT or ray://HOST:PORT (default: start a local one)")
    p.add_argument("--gpus-per-worker", type=float, default=None,
                   help="GPUs per actor (default: 1 when the cluster has a GPU per worker, else 0)")
    p.set_defaults(func=run_dataset_command)


def _check_run_args(args: argparse.Namespace) -> None:
    import math

    for name in ("particles", "max_new_tokens", "batch_prompts"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not (math.isfinite(args.alpha) and args.alpha > 0):
        raise ValueError(f"--alpha must be finite and > 0, got {args.alpha}")
    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    if args.workers is None and (args.ray_address or args.gpus_per_worker is not None):
        raise ValueError("--ray-address and --gpus-per-worker need --workers")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    check_sampler_options(args, args.method)
    check_backend(build_method(args.method, args), args.backend)
    check_truncation(args.truncation, METHODS[args.method].sharpened)


def run_dataset_command(args: argparse.Namespace) -> int:
    from .runner import read_items

    _check_run_args(args)
    items = read_items(args.input)  # bad input fails before the model loads
    if args.workers is not None:
        from .distributed.cli import run_distributed

        summary = run_distributed(args, items)
    else:
        import torch

        from . import runner
        from .methods import MethodRecipe, TargetRecipe

        if args.threads:
            torch.set_num_threads(args.threads)
        recipe = MethodRecipe.from_args(args)
        target_recipe = TargetRecipe.from_args(args, sharpened=recipe.sharpened)
        method = recipe()
        target = target_recipe()
        summary = runner.run_dataset(method, target, items, args.output, max_new_tokens=args.max_new_tokens,
                                     batch_prompts=args.batch_prompts, seed=args.seed,
                                     config=target_recipe.config(target), force=args.force,
                                     progress=not args.quiet, time_limit=args.time_limit)
    print(f"{summary.written} records written ({summary.errors} with errors), {summary.done}/{summary.total} "
          f"prompts done in {args.output}", file=sys.stderr)
    return 0


def _lazy(module: str, name: str) -> Callable[[argparse._SubParsersAction], None]:
    def add(sub: argparse._SubParsersAction) -> None:
        import importlib

        getattr(importlib.import_module(module), name)(sub)

    return add


#: sub-command name -> function that adds its parser (each sets ``func``)
COMMANDS: dict[str, Callable[[argparse._SubParsersAction], None]] = {
    "sample": add_sample,
    "run": add_run,
    "bench": _lazy("llmppl.benchmarking.cli", "add_bench"),
    "eval": _lazy("llmppl.evaluation.cli", "add_eval"),
    "serve": _lazy("llmppl.server.cli", "add_serve"),
    "models": _lazy("llmppl.models.fetch", "add_models"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmppl", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS.values():
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as exc:
        print(f"llmppl: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llmppl: interrupted (every record written so far is complete: rerun to resume)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
