"""Inference engines and their parts (proposals, resampling, schedules)."""

from . import proposals, resampling
from . import baselines, samplers
from .mh import MH
from .result import Result

__all__ = ["proposals", "resampling", "Result"]
__all__ += ["MH", "baselines", "samplers"]
