"""``llmppl eval``."""

from __future__ import annotations

import argparse


def add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="reasoning evaluation (not built yet)")
    p.set_defaults(func=lambda args: (_ for _ in ()).throw(ValueError("llmppl eval is not built yet")))
