"""Decoding baselines with the engines' ``Result`` and cost stats, so comparisons are one line.

* ``Plain(n)``: ``y ~ p`` (ancestral sampling from the base LM);
* ``LowTemperature(tau, n)``: ``y_t ~ softmax(logits_t / τ)`` (token-level, not ``p^{1/τ}``);
* ``Greedy()``: ``y_t = argmax_v p(v | y_<t)``;
* ``BestOfN(n, by)``: ``n`` plain samples, keep ``argmax_i score(y_i)`` with
  ``score = log p(y|x)`` (``"logp"``), ``log γ(y)`` (``"target"``) or a reward callable.

They decode through :class:`Decoder` (one :func:`~llmppl.inference.decode.advance` over
``G`` prompts × ``n`` rows of one state: a single native block call for their temperature
proposals, the same ``state.sample_block`` SMC and MH decode through), so "plain decoding"
in every benchmark is the backend's own block decoding.  Weights are uniform (BestOfN: all
mass on the winner); ``stats["log_target"]`` holds ``log γ(y)`` of each sample.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from ..targets.base import Completion
from ..targets.target import Target
from .capabilities import Needs
from .decoder import BatchMixin, Decoder, DecodeInfo, DecoderState, _check_n  # noqa: F401  (public here too)
from .proposal import Proposal, ProposalContext
from .proposals import Base, Temperature
from .result import Result


class ArgMax(Proposal):
    """``q = p``, but ``sample`` returns the mode (greedy decoding)."""

    requires = Needs()
    greedy = True

    def block_temperature(self, exponent: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(exponent)

    def log_probs(self, ctx: ProposalContext) -> torch.Tensor:
        return ctx.batch.base_logprobs

    def sample(self, log_q: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return log_q.argmax(dim=-1)


class Plain(BatchMixin):
    """``n`` samples from the base LM, ``y ~ p(·|x)``."""

    def __init__(self, n: int = 1) -> None:
        self.n = _check_n(n)

    def _decoder(self) -> Decoder:
        return Decoder("plain", Base(), self.n, {})

    def __repr__(self) -> str:
        return f"Plain(n={self.n})"


class LowTemperature(BatchMixin):
    """``n`` samples with ``y_t ~ softmax(logits_t / τ)`` (locally normalised; not ``p^{1/τ}``)."""

    def __init__(self, tau: float, n: int = 1) -> None:
        self.proposal = Temperature(tau)
        self.tau = self.proposal.tau
        self.n = _check_n(n)

    def _decoder(self) -> Decoder:
        return Decoder("lowtemp", self.proposal, self.n, {"tau": self.tau})

    def __repr__(self) -> str:
        return f"LowTemperature(tau={self.tau:g}, n={self.n})"


class Greedy(BatchMixin):
    """``y_t = argmax_v p(v | y_<t)`` (one deterministic completion)."""

    def _decoder(self) -> Decoder:
        return Decoder("greedy", ArgMax(), 1, {})

    def __repr__(self) -> str:
        return "Greedy()"


def _score_logp(target: Target, res: Result) -> list[float]:
    return list(res.log_p)


def _score_target(target: Target, res: Result) -> list[float]:
    return list(res.stats["log_target"])


#: built-in BestOfN scores: name -> score(target, result) -> list of floats
SCORES: dict[str, Callable[[Target, Result], list[float]]] = {
    "logp": _score_logp,
    "target": _score_target,
}


class BestOfN(BatchMixin):
    """``n`` samples from ``p`` (temperature ``tau``); the one maximising ``by`` gets all the weight.

    ``by``: ``"logp"`` (``log p(y|x)``), ``"target"`` (``log γ(y)``) or a reward
    ``f(completions: list[Completion]) -> list[float]``.
    """

    def __init__(self, n: int, by: str | Callable[[Sequence[Completion]], Sequence[float]] = "logp",
                 tau: float = 1.0) -> None:
        self.n = _check_n(n)
        if not callable(by) and by not in SCORES:
            raise ValueError(f"by must be one of {sorted(SCORES)} or a callable, got {by!r}")
        self.by = by
        self.proposal = Base() if tau == 1.0 else Temperature(tau)
        self.tau = float(tau)

    def _scores(self, target: Target, res: Result) -> list[float]:
        if not callable(self.by):
            return SCORES[self.by](target, res)
        comps = [Completion(list(s), t, f, c) for s, t, f, c in zip(
            res.samples, res.texts or [None] * res.n, res.finished, res.truncated)]
        values = [float(v) for v in self.by(comps)]
        if len(values) != res.n:
            raise ValueError(f"BestOfN reward returned {len(values)} scores for {res.n} completions")
        return values

    def _decoder(self) -> Decoder:
        return Decoder("bestofn", self.proposal, self.n,
                       {"by": getattr(self.by, "__name__", str(self.by)), "tau": self.tau})

    def _finish(self, target: Target, res: Result) -> Result:
        scores = self._scores(target, res)
        finite = [s if not math.isnan(s) else -math.inf for s in scores]
        best = max(range(res.n), key=lambda i: finite[i])
        res.log_weights = [0.0 if i == best else -math.inf for i in range(res.n)]
        res.stats["scores"] = scores
        res.select = "max"
        return res

    def __repr__(self) -> str:
        return f"BestOfN(n={self.n}, by={getattr(self.by, '__name__', self.by)!r})"


from .reweight import Reweight  # noqa: E402,F401  (pp.baselines.Reweight: plain samples, weighted; built on SMC)
from .constrained import Constrained  # noqa: E402,F401  (pp.baselines.Constrained: greedy constrained decoding)
