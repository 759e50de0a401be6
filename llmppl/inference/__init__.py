"""Inference engines and their parts (proposals, resampling, schedules)."""

from . import proposals, resampling, schedules, steps
from .result import Result
from .smc import SMC

__all__ = ["proposals", "resampling", "Result", "SMC", "schedules", "steps"]
