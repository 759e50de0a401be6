"""Inference engines and their parts (proposals, resampling, schedules)."""

from . import proposals, resampling, schedules, steps, terms
from . import baselines, samplers
from .kernel import Engine, StepInfo
from .mh import MH
from .result import Result
from .smc import SMC

__all__ = ["proposals", "resampling", "Result", "SMC", "schedules", "steps", "terms", "Engine", "StepInfo"]
__all__ += ["MH", "baselines", "samplers"]
