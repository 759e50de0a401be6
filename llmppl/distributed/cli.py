"""``llmppl run --workers K``: the CLI options turned into recipes for the Ray driver."""

from __future__ import annotations

import argparse
from typing import Any

from .. import runner
from ..methods import MethodRecipe, TargetRecipe
from .driver import run_dataset


def run_distributed(args: argparse.Namespace, items: list[runner.Item]) -> runner.RunSummary:
    """Run ``items`` on ``args.workers`` Ray actors with the method and model of ``args``."""
    try:
        import ray  # noqa: F401
    except ModuleNotFoundError:
        raise ModuleNotFoundError("--workers needs Ray: pip install 'llmppl[ray]'") from None
    recipe = MethodRecipe.from_args(args)
    target = TargetRecipe.from_args(args, sharpened=recipe.sharpened)
    kw: dict[str, Any] = dict(workers=args.workers, max_new_tokens=args.max_new_tokens,
                              batch_prompts=args.batch_prompts, seed=args.seed, force=args.force,
                              progress=not args.quiet, ray_address=args.ray_address,
                              gpus_per_worker=args.gpus_per_worker, threads_per_worker=args.threads,
                              time_limit=args.time_limit)
    return run_dataset(recipe, target, items, args.output, **kw)
