"""Potentials and their algebra: the declarative part of a target."""

from .base import Completion, Potential, Prefixes, Product
from .potentials import Constraint, Power, RewardError, RewardTilt, Tempered, token_mask
from .target import Target

__all__ = [
    "Completion", "Potential", "Prefixes", "Product", "Power", "Tempered", "RewardTilt",
    "RewardError", "Constraint", "token_mask", "Target",
]
