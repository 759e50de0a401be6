"""``llmppl models``: list and fetch offline models into the cache."""

from __future__ import annotations

import argparse

from .registry import MODELS


def add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list or fetch models")
    inner = p.add_subparsers(dest="models_command", required=True)
    q = inner.add_parser("list", help="registered model names")
    q.set_defaults(func=lambda args: print("\n".join(sorted(MODELS))) or 0)
