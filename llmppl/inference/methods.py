"""Sampling methods by name: one registry shared by the CLI, ``llmppl eval`` and ``llmppl serve``.

``METHODS[name]`` is a :class:`Method`; calling it with a *settings* object (anything with
attributes: an ``argparse.Namespace``, a ``types.SimpleNamespace``) builds a :class:`Runner`,
the engine bound to its per-call options, with ``run(target, prompt, max_new_tokens, seed)``
and ``run_batch(target, prompts, max_new_tokens, seed)``.  A ``Runner`` is also callable as
``run``, so ``METHODS[name](settings)(target, prompt, max_new_tokens, seed=0)`` is one sample.

Settings read (each method reads the subset in its ``options``): ``particles`` (SMC particles,
MH chains, samples of the baselines and of look-ahead), ``alpha`` (the exponent of ``p^α``: the
proposal temperature ``1/α`` of SMC and MH, ``τ = 1/α`` of low-temperature decoding),
``resampling``, ``ess_threshold``, ``block_size`` (MH; ``None``: ``max_new_tokens // 4``),
``n_mcmc``, ``top_k``, ``rollouts``, ``horizon`` (look-ahead), ``max_new_tokens`` (MH's default
block) and ``quiet`` (no progress bar).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..targets.target import Target
from .result import Result


class Runner:
    """An engine with its per-call keyword options bound (``chains=`` for MH)."""

    def __init__(self, engine: Any, **kwargs: Any) -> None:
        self.engine = engine
        self.kwargs = kwargs

    def run(self, target: Target, prompt: Any, max_new_tokens: int, seed: int | None = None) -> Result:
        """One prompt: ``engine.run(target, prompt, max_new_tokens, seed=seed, **kwargs)``."""
        return self.engine.run(target, prompt, max_new_tokens, seed=seed, **self.kwargs)

    def run_batch(self, target: Target, prompts: Sequence[Any], max_new_tokens: int,
                  seed: int | None = None) -> list[Result]:
        """One ``Result`` per prompt, in order (``engine.run_batch``)."""
        return self.engine.run_batch(target, prompts, max_new_tokens, seed=seed, **self.kwargs)

    __call__ = run

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in self.kwargs.items())
        return f"Runner({self.engine!r}{extra})"


@dataclass(frozen=True)
class Method:
    """A named sampling method.

    ``build(settings) -> Runner``; ``options``: the settings it reads (besides ``quiet`` and
    ``max_new_tokens``); ``sharpened``: whether it targets ``p^α`` (True) or samples the base
    LM whatever ``α`` is (False).
    """

    name: str
    build: Callable[[Any], Runner] = field(repr=False)
    options: tuple[str, ...]
    sharpened: bool
    description: str = ""

    def __call__(self, settings: Any) -> Runner:
        return self.build(settings)


def _quiet(s: Any) -> bool:
    return bool(getattr(s, "quiet", True))


def _temperature(tau: float) -> Any:
    """The proposal ``q ∝ p^{1/τ}`` (``proposals.Temperature``; ``Tempered`` before its rename)."""
    from . import proposals

    return getattr(proposals, "Temperature", proposals.Tempered)(tau)


def _smc(s: Any) -> Runner:
    from .smc import SMC

    return Runner(SMC(n_particles=s.particles, proposal=_temperature(1.0 / s.alpha), resampling=s.resampling,
                      ess_threshold=s.ess_threshold, progress=not _quiet(s)))


def _mh(s: Any) -> Runner:
    from .mh import MH

    block = getattr(s, "block_size", None) or max(1, s.max_new_tokens // 4)
    return Runner(MH(block_size=block, n_mcmc=s.n_mcmc, proposal=_temperature(1.0 / s.alpha)),
                  chains=s.particles)


def _plain(s: Any) -> Runner:
    from .baselines import Plain

    return Runner(Plain(n=s.particles))


def _lowtemp(s: Any) -> Runner:
    from .baselines import LowTemperature

    return Runner(LowTemperature(tau=1.0 / s.alpha, n=s.particles))


def _greedy(s: Any) -> Runner:
    from .baselines import Greedy

    return Runner(Greedy())


def _bestofn(s: Any) -> Runner:
    from .baselines import BestOfN

    return Runner(BestOfN(n=s.particles))


def _lookahead(s: Any) -> Runner:
    from .samplers import ScalablePower

    return Runner(ScalablePower(top_k=s.top_k, rollouts=s.rollouts, horizon=s.horizon, n=s.particles))


#: method name -> :class:`Method` (build a ``Runner`` with ``METHODS[name](settings)``)
METHODS: dict[str, Method] = {m.name: m for m in [
    Method("smc", _smc, ("particles", "alpha", "resampling", "ess_threshold"), True,
           "Power-SMC: particles from q ∝ p^α, reweighted and resampled towards p^α"),
    Method("mh", _mh, ("particles", "alpha", "block_size", "n_mcmc"), True,
           "block Metropolis-Hastings on p^α, one chain per particle"),
    Method("plain", _plain, ("particles",), False, "samples of the base LM p"),
    Method("lowtemp", _lowtemp, ("particles", "alpha"), False,
           "token-level temperature 1/α (locally normalised, not p^α)"),
    Method("greedy", _greedy, (), False, "argmax decoding (one completion)"),
    Method("bestofn", _bestofn, ("particles",), False, "samples of p, the most likely one kept"),
    Method("lookahead", _lookahead, ("particles", "alpha", "top_k", "rollouts", "horizon"), True,
           "scalable power sampling: look-ahead estimate of the p^α token conditionals"),
]}


def get_method(name: str) -> Method:
    """``METHODS[name]`` with an error naming the known methods."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(sorted(METHODS))}") from None


__all__ = ["METHODS", "Method", "Runner", "get_method"]
