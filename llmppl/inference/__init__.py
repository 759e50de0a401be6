"""Inference engines and their parts (proposals, resampling, schedules)."""

from . import proposals, resampling, schedules, steps
from . import baselines, samplers
from .mh import MH
from .result import Result
from .smc import SMC

__all__ = ["proposals", "resampling", "Result", "SMC", "schedules", "steps"]
__all__ += ["MH", "baselines", "samplers"]
