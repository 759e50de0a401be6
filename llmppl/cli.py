"""``llmppl`` command line: ``sample``, ``run``, ``bench``, ``eval``, ``serve``, ``models``.

Each sub-command is an entry of ``COMMANDS`` (name -> (one-line help, function adding its
parser)); sampling methods are entries of ``llmppl.methods.METHODS``, so a new engine is one
registry line.  Only the sub-command being run has its parser (and its module) built, and no
parser imports torch: ``llmppl --help`` and ``llmppl sample --help`` answer at once.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from .options import (  # noqa: E402
    METHOD_NAMES, SELECT, TRUNCATION, TRUNCATION_HELP, HelpFormatter, add_engine_arguments, apply_threads,
    parse_threads, resolve_device, resolve_dtype,
)

__all__ = ["main", "build_parser", "COMMANDS"]


def __getattr__(name: str):  # ``from llmppl.cli import METHODS`` still works (it imports the engines)
    if name in ("METHODS", "build_method", "check_backend", "check_sampler_options", "check_truncation"):
        from . import methods

        return getattr(methods, name)
    raise AttributeError(f"module 'llmppl.cli' has no attribute {name!r}")


def _common(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    p.add_argument("--model", default=None, help="model name, local dir, .gguf file or hub id "
                   "(default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--method", choices=METHOD_NAMES, default="smc",
                   help="smc: Power-SMC; mh: block MH; lookahead: scalable power sampling; plain / lowtemp / "
                   "greedy / bestofn: baselines; reweight: importance-reweighted plain samples")
    p.add_argument("--alpha", type=float, default=4.0, help="power of the base LM: the target is p^alpha")
    p.add_argument("--particles", type=int, default=8, help="SMC particles / MH chains / baseline samples")
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                   help="token budget of each completion (a completion cut here is 'truncated')")
    add_engine_arguments(p)
    p.add_argument("--truncation", choices=TRUNCATION, default="keep", help=TRUNCATION_HELP)
    p.add_argument("--regex", default=None, metavar="PATTERN",
                   help="structured output: the completion must match PATTERN (the target is p^alpha * 1[y matches]; "
                   "needs llmppl[constraints])")
    p.add_argument("--json-schema", default=None, metavar="FILE",
                   help="structured output: the completion must be JSON valid under the schema in FILE")


def add_sample(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help=COMMANDS["sample"][0], formatter_class=HelpFormatter,
                       description="Sample one completion from p^alpha (or a baseline) and print it; the "
                       "one-line summary goes to stderr.")
    p.add_argument("--prompt", required=True, help="the prompt text")
    _common(p, 64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--select", choices=SELECT, default="sample",
                   help="which completion to print: sample (a draw from the particles' weights, i.e. from "
                   "the SMC approximation of p^alpha) or max (the completion with the largest summed weight)")
    p.add_argument("--json", default=None, help="write the full Result (with the prompt and the distinct "
                   "completions) as JSON here")
    p.add_argument("--report", default=None, help="write a self-contained HTML report here")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_sample)


def _check_common(args: argparse.Namespace) -> None:
    """Bad numbers fail with one line before anything heavy is imported or loaded."""
    for name in ("particles", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not (math.isfinite(args.alpha) and args.alpha > 0):
        raise ValueError(f"--alpha must be finite and > 0, got {args.alpha}")
    if args.tau is not None and not (math.isfinite(args.tau) and args.tau > 0):
        raise ValueError(f"--tau must be finite and > 0, got {args.tau}")
    parse_threads(args.threads)
    from .methods import constraint_args

    constraint_args(args)      # a bad --regex / --json-schema fails here, in one line


def human_bytes(n: float | int | None) -> str:
    """``1288490188`` -> ``"1.2 GiB"``."""
    if n is None:
        return "?"
    x = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(x) < 1024 or unit == "GiB":
            return f"{x:.0f} {unit}" if unit == "B" else f"{x:.1f} {unit}"
        x /= 1024
    return f"{x:.1f} TiB"


def summary_line(result, max_new_tokens: int) -> str:
    """One line for a person: method, particles, ESS, log Z, cost, and what truncation means."""
    parts = [f"{result.method}: n={result.n}", f"ESS={result.final_ess:.2f} of {result.n}"]
    if result.log_evidence is not None:
        parts.append(f"logZ={result.log_evidence:.3f}")
    parts.append(f"tokens={result.stats.get('tokens_decoded', '?')}")
    if "wall_time" in result.stats:
        parts.append(f"seconds={result.stats['wall_time']:.2f}")
    if result.stats.get("peak_memory"):
        parts.append(f"peak memory {human_bytes(result.stats['peak_memory'])}")
    cut = sum(bool(t) for t in result.truncated)
    if cut:
        parts.append(f"{cut} of {result.n} particles cut at --max-new-tokens {max_new_tokens} "
                     f"(holding {result.truncated_share:.1%} of the weight)")
    return "  ".join(parts)


def run_sample(args: argparse.Namespace) -> int:
    _check_common(args)
    from .methods import build_method, check_backend, check_truncation
    from .diagnostics.completions import distinct_completions, select_index

    method = build_method(args.method, args)      # bad options fail before the model loads
    check_backend(method, args.backend)
    truncation = check_truncation(args.truncation, method.sharpened)
    from . import models
    from .targets import Power, Target

    apply_threads(args.threads)
    device = resolve_device(args.device)
    lm = models.load_model(args.model, device=device, dtype=resolve_dtype(args.dtype, device, args.backend),
                           backend=args.backend)
    chat = not args.no_chat and getattr(getattr(lm, "tokenizer", None), "chat_template", None) is not None
    from .methods import constraint_args, make_constraint

    spec = constraint_args(args)
    potential = Power(method.target_alpha(args.alpha))
    target = Target(lm, potential if spec is None else potential * make_constraint(spec), chat=chat,
                    truncation=truncation)
    result = method.run(target, args.prompt, args.max_new_tokens, seed=args.seed)
    i = select_index(result, args.select)
    text = result.texts[i] if result.texts is not None and result.texts[i] is not None else result.samples[i]
    print(text if isinstance(text, str) else json.dumps(text))
    print(summary_line(result, args.max_new_tokens), file=sys.stderr)
    if args.json:
        d = result.to_dict()
        d.update(prompt=args.prompt, selected=i, select_mode=args.select,
                 completions=[c.as_dict() for c in distinct_completions(result)])
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(d, f)
    if args.report:
        from .diagnostics.report import write_report

        write_report(result, args.report, prompt=args.prompt, selected=i)
    return 0


def add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run", help=COMMANDS["run"][0], formatter_class=HelpFormatter,
        description="Each input line is {\"id\": ..., \"prompt\": text | token ids | messages, ...}; "
        "each output line is that id's record (text, tokens, log evidence, ESS, cost, config). "
        "Rerunning with the same --output skips the ids already written.")
    p.add_argument("--input", required=True, help="input JSONL, one {id, prompt, ...} object a line")
    p.add_argument("--output", required=True, help="output JSONL (appended batch by batch; resumes)")
    _common(p, 64)
    p.add_argument("--batch-prompts", type=int, default=8, help="prompts per run_batch call")
    p.add_argument("--seed", type=int, default=0, help="run seed; batch b uses SeedSequence([seed, b])")
    p.add_argument("--force", action="store_true",
                   help="overwrite an --output written with a different config")
    p.add_argument("--time-limit", type=float, default=None, help="stop cleanly after this many seconds")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--workers", type=int, default=None,
                   help="run on K Ray actors, one model replica each (needs llmppl[ray]; --threads is then per "
                   "worker)")
    p.add_argument("--ray-address", default=None,
                   help="an existing Ray cluster: auto, HOST:PORT or ray://HOST:PORT (default: start a local one)")
    p.add_argument("--gpus-per-worker", type=float, default=None,
                   help="GPUs per actor (default: 1 when the cluster has a GPU per worker, else 0)")
    p.set_defaults(func=run_dataset_command)


def _check_run_args(args: argparse.Namespace) -> None:
    _check_common(args)
    if args.batch_prompts < 1:
        raise ValueError(f"--batch-prompts must be >= 1, got {args.batch_prompts}")
    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    if args.workers is None and (args.ray_address or args.gpus_per_worker is not None):
        raise ValueError("--ray-address and --gpus-per-worker need --workers")
    from .methods import METHODS, build_method, check_backend, check_truncation

    check_backend(build_method(args.method, args), args.backend)
    check_truncation(args.truncation, METHODS[args.method].sharpened)


def run_dataset_command(args: argparse.Namespace) -> int:
    from .runner import read_items

    _check_run_args(args)
    items = read_items(args.input)  # bad input fails before the model loads
    if args.workers is not None:
        from .distributed.cli import run_distributed

        args.threads = parse_threads(args.threads)
        summary = run_distributed(args, items)
    else:
        from . import runner
        from .methods import MethodRecipe, TargetRecipe

        recipe = MethodRecipe.from_args(args)
        target_recipe = TargetRecipe.from_args(args, sharpened=recipe.sharpened)
        method = recipe()
        config = dict(target_recipe.config())
        # an --output written with another config is refused before the model loads (the chat
        # flag, known only once the model's tokenizer is read, is checked again after)
        runner.check_output_config(args.output, runner.run_config(
            method.config, args.max_new_tokens, args.batch_prompts, args.seed, config),
            force=args.force, unknown=("chat",))
        apply_threads(args.threads)
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


#: sub-command name -> (one-line help, function that adds its parser and sets ``func``)
COMMANDS: dict[str, tuple[str, Callable[[argparse._SubParsersAction], None]]] = {
    "sample": ("sample a completion from p^alpha (and friends)", add_sample),
    "run": ("run a JSONL dataset of prompts through a method (batched, resumable)", add_run),
    "bench": ("benchmarks: latency, engine overhead, backends, constraints, GPU", _lazy("llmppl.benchmarking.cli", "add_bench")),
    "eval": ("reasoning evaluation (accuracy, pass@k, cost) or --plot a results file",
             _lazy("llmppl.evaluation.cli", "add_eval")),
    "serve": ("OpenAI-compatible HTTP server sampling from p^alpha (needs llmppl[serve])",
              _lazy("llmppl.server.cli", "add_serve")),
    "models": ("list, fetch or convert models", _lazy("llmppl.models.fetch", "add_models")),
}


def _selected(argv: list[str]) -> str | None:
    """The sub-command ``argv`` runs (the first argument naming one), or None."""
    for a in argv:
        if a in COMMANDS:
            return a
        if not a.startswith("-"):
            return None
    return None


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; with ``argv``, only the sub-command it runs gets its full parser (the others
    are listed with their one-line help), so parsing imports only that sub-command's module."""
    parser = argparse.ArgumentParser(prog="llmppl", description="Power-SMC, MH and look-ahead sampling from "
                                     "p^alpha and other targets over a language model.",
                                     epilog="llmppl COMMAND --help lists a command's options and defaults.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = _selected(argv) if argv is not None else None
    for name, (help_, add) in COMMANDS.items():
        if argv is None or name == chosen:
            add(sub)
        else:
            sub.add_parser(name, help=help_, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, ImportError) as exc:  # ImportError: a missing or broken extra
        print(f"llmppl: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.command == "serve":   # Ctrl-C is how a server is stopped
            print("llmppl serve: stopped", file=sys.stderr)
            return 0
        done = " (every record written so far is complete: rerun to resume)" if args.command in ("run", "eval") else ""
        print(f"llmppl: interrupted{done}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
