"""Potentials and their algebra: the declarative part of a target."""

from .base import Completion, Potential, Prefixes, Product
from . import rewards
from .potentials import (Constraint, Power, RewardError, RewardTilt, Tempered, digits_mask, regex_mask,
                         token_mask, token_texts)
from .target import Target

__all__ = [
    "Completion", "Potential", "Prefixes", "Product", "Power", "Tempered", "RewardTilt",
    "RewardError", "Constraint", "token_mask", "Target",
    "regex_mask", "digits_mask", "token_texts", "rewards",
]
