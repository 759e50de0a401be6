"""``llmppl`` command line: ``sample``, ``bench``, ``eval``, ``serve``, ``models``.

Each sub-command is an entry of ``COMMANDS`` (name -> function adding its parser);
sampling methods are entries of ``METHODS`` (name -> builder of a run function from
the parsed arguments), so a new engine is one registry line, not another ``elif``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from .inference import methods as _methods

#: method name -> builder of a runner (``run`` / ``run_batch``) from the parsed arguments; the
#: library's registry (``llmppl.inference.methods``), shared with ``eval`` and ``serve``
METHODS = _methods.METHODS


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """The options every ``METHODS`` builder reads (shared by ``sample`` and ``eval``)."""
    p.add_argument("--resampling", default="systematic")
    p.add_argument("--ess-threshold", type=float, default=0.5)
    p.add_argument("--block-size", type=int, default=None, help="MH block size (default max_new_tokens/4)")
    p.add_argument("--n-mcmc", type=int, default=2, help="MH steps per block")
    p.add_argument("--top-k", type=int, default=4, help="look-ahead candidates")
    p.add_argument("--rollouts", type=int, default=2, help="look-ahead rollouts per candidate")
    p.add_argument("--horizon", type=int, default=8, help="look-ahead rollout length")
    p.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None)
    p.add_argument("--backend", choices=["hf", "llamacpp"], default="hf",
                   help="inference backend: transformers (hf) or llama.cpp for GGUF files")


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
    p.add_argument("--json", default=None, help="write the full Result as JSON here")
    p.add_argument("--report", default=None, help="write a self-contained HTML report here")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_sample)


def run_sample(args: argparse.Namespace) -> int:
    import llmppl as pp

    if args.particles < 1:
        raise ValueError(f"--particles must be >= 1, got {args.particles}")
    potential = pp.Power(args.alpha)  # bad input fails before the model loads
    lm = pp.models.load_model(args.model, device=args.device, dtype=args.dtype, backend=args.backend)
    chat = not args.no_chat and getattr(lm.tokenizer, "chat_template", None) is not None
    target = pp.Target(lm, potential, chat=chat)
    run = METHODS[args.method](args)
    result = run(target, prompt=args.prompt, max_new_tokens=args.max_new_tokens, seed=args.seed)
    best = result.best
    print(best if isinstance(best, str) else json.dumps(best))
    print(result.summary(), file=sys.stderr)
    if args.json:
        result.to_json(args.json)
    if args.report:
        from .diagnostics.report import write_report

        write_report(result, args.report)
    return 0


def _lazy(module: str, name: str) -> Callable[[argparse._SubParsersAction], None]:
    def add(sub: argparse._SubParsersAction) -> None:
        import importlib

        getattr(importlib.import_module(module), name)(sub)

    return add


#: sub-command name -> function that adds its parser (each sets ``func``)
COMMANDS: dict[str, Callable[[argparse._SubParsersAction], None]] = {
    "sample": add_sample,
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


if __name__ == "__main__":
    sys.exit(main())
