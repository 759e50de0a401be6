"""llmppl: probabilistic-programming-style inference for language models.

Declare a target ``γ(y) = p(y|x)^α · Π_k φ_k(y)`` and hand it to an engine::

    import llmppl as pp
    target = pp.Target(pp.models.default_lm(), pp.Power(4.0))
    res = pp.SMC(n_particles=8).run(target, prompt="...", max_new_tokens=64, seed=0)
"""

from . import exact, models, targets
from .inference import proposals, resampling
from .inference import SMC, schedules, steps
from .inference import MH, baselines, samplers
from .inference.result import Result
from .targets import Constraint, Power, RewardTilt, Target, Tempered
from .targets import rewards
from . import distributed, methods, runner

__version__ = "0.1.0"

__all__ = [
    "exact", "models", "targets", "proposals", "resampling", "Result",
    "Target", "Power", "Tempered", "RewardTilt", "Constraint",
    "SMC", "schedules", "steps",
]
__all__ += ["MH", "baselines", "samplers", "distributed", "methods", "runner"]
