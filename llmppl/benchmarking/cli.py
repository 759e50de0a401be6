"""``llmppl bench`` sub-commands (a registry: name -> (add_arguments, run))."""

from __future__ import annotations

import argparse
from collections.abc import Callable

#: benchmark name -> (function adding its arguments, function running it)
BENCHMARKS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}

from . import gpu as _gpu  # noqa: E402

BENCHMARKS["gpu"] = (_gpu.add_arguments, _gpu.run)


def _register_builtin() -> None:
    from . import backends, constraints, harness, latency

    BENCHMARKS["latency"] = (latency.add_arguments, latency.run)
    BENCHMARKS["overhead"] = (latency.add_overhead_arguments, latency.run_overhead_cli)
    BENCHMARKS["backends"] = (backends.add_arguments, backends.run)
    BENCHMARKS["harness"] = (harness.add_arguments, harness.run)
    BENCHMARKS["constraints"] = (constraints.add_arguments, constraints.run)


_register_builtin()


def add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks (latency, overhead, backends, harness, constraints, gpu)")
    inner = p.add_subparsers(dest="benchmark", required=True)
    for name, (add_args, run) in BENCHMARKS.items():
        q = inner.add_parser(name)
        add_args(q)
        if not any("--threads" in a.option_strings for a in q._actions):   # (backends, harness: their own)
            q.add_argument("--threads", default="auto",
                           help="torch CPU threads: an integer, or auto (the cores not already busy, at least 1)")
            run = _with_threads(run)
        q.set_defaults(func=run)


def _with_threads(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """``run`` after setting torch's CPU threads from ``--threads`` (:func:`llmppl.options.apply_threads`)."""
    from ..options import apply_threads

    def wrapped(args: argparse.Namespace) -> int:
        apply_threads(args.threads)
        return run(args)

    return wrapped
