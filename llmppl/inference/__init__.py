"""Inference engines and their parts (proposals, resampling, schedules)."""

from . import proposals, resampling
from .result import Result

__all__ = ["proposals", "resampling", "Result"]
