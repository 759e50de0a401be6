"""llmppl: probabilistic-programming-style inference for language models.

Declare a target ``γ(y) = p(y|x)^α · Π_k φ_k(y)`` and hand it to an engine::

    import llmppl as pp
    target = pp.Target(pp.models.default_lm(), pp.Power(4.0))
    res = pp.SMC(n_particles=8).run(target, prompt="...", max_new_tokens=64, seed=0)

``import llmppl`` is cheap: every public name below is imported on first use (module
``__getattr__``), so ``llmppl --help`` and scripts that need one corner of the library do not
pay for torch, transformers and the engines until they touch them.  The app layer
(``pp.runner``, ``pp.methods``, ``pp.distributed``, ``pp.server``) is never imported by the
core.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> (module, attribute or None for the module itself)
_LAZY: dict[str, tuple[str, str | None]] = {
    # the core: targets, engines, models, exact enumeration
    "exact": ("llmppl.exact", None),
    "models": ("llmppl.models", None),
    "targets": ("llmppl.targets", None),
    "inference": ("llmppl.inference", None),
    "diagnostics": ("llmppl.diagnostics", None),
    "proposals": ("llmppl.inference.proposals", None),
    "resampling": ("llmppl.inference.resampling", None),
    "schedules": ("llmppl.inference.schedules", None),
    "steps": ("llmppl.inference.steps", None),
    "baselines": ("llmppl.inference.baselines", None),
    "samplers": ("llmppl.inference.samplers", None),
    "rewards": ("llmppl.targets.rewards", None),
    "constraints": ("llmppl.targets.constraints", None),
    "Result": ("llmppl.inference.result", "Result"),
    "SMC": ("llmppl.inference", "SMC"),
    "MH": ("llmppl.inference", "MH"),
    "Target": ("llmppl.targets", "Target"),
    "Power": ("llmppl.targets", "Power"),
    "Tempered": ("llmppl.targets", "Tempered"),
    "RewardTilt": ("llmppl.targets", "RewardTilt"),
    "Constraint": ("llmppl.targets", "Constraint"),
    # the app layer: named methods, datasets, Ray, the server
    "methods": ("llmppl.methods", None),
    "runner": ("llmppl.runner", None),
    "distributed": ("llmppl.distributed", None),
    "server": ("llmppl.server", None),
}

__all__ = [
    "exact", "models", "targets", "proposals", "resampling", "Result",
    "Target", "Power", "Tempered", "RewardTilt", "Constraint",
    "SMC", "schedules", "steps",
    "MH", "baselines", "samplers", "distributed", "methods", "runner", "constraints",
]


def __getattr__(name: str) -> Any:
    try:
        module, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'llmppl' has no attribute {name!r}") from None
    mod = importlib.import_module(module)
    value = mod if attr is None else getattr(mod, attr)
    globals()[name] = value   # the next access is a plain attribute lookup
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


if TYPE_CHECKING:  # what type checkers and IDEs see
    from . import diagnostics, distributed, exact, inference, methods, models, runner, targets  # noqa: F401
    from .inference import MH, SMC, baselines, proposals, resampling, samplers, schedules, steps  # noqa: F401
    from .inference.result import Result  # noqa: F401
    from .targets import Constraint, Power, RewardTilt, Target, Tempered, rewards  # noqa: F401
