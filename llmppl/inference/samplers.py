"""Stand-alone approximate samplers.

``ScalablePower(top_k, rollouts, horizon, n)``: the training-free sampler of Scalable
Power Sampling (arXiv 2601.21590): decode token by token from the
:class:`~llmppl.inference.lookahead.Lookahead` proposal ``q(v) ∝ p(v)^α ζ̂(v)``, with
no weights.  Approximate: ``E[q̂] ≠ π_α(v|y_<t)`` for finitely many rollouts (the
``jackknife`` option removes the ``O(1/M)`` bias) and the horizon truncates the
future; inside ``pp.SMC(proposal=Lookahead(...))`` the weights make it exact.
"""

from __future__ import annotations

from ..targets.target import Target
from .baselines import BatchMixin, _check_n, decode_run
from .lookahead import Lookahead
from .result import Result


class ScalablePower(BatchMixin):
    """``n`` completions drawn from the look-ahead proposal of ``p^α`` (``α`` = the target's exponent)."""

    def __init__(self, top_k: int = 4, rollouts: int = 2, horizon: int = 8, n: int = 1,
                 jackknife: bool = False, floor: float = 0.0) -> None:
        self.lookahead = Lookahead(top_k=top_k, rollouts=rollouts, horizon=horizon, jackknife=jackknife,
                                   floor=floor)
        self.n = _check_n(n)

    def run(self, target: Target, prompt, max_new_tokens: int, seed: int | None = None) -> Result:
        la = self.lookahead
        la.max_new_tokens = max_new_tokens
        la.forward_passes = la.tokens_decoded = 0
        res, _ = decode_run("scalable_power", la, self.n, target, prompt, max_new_tokens, seed,
                            {"top_k": la.top_k, "rollouts": la.rollouts, "horizon": la.horizon,
                             "jackknife": la.jackknife, "floor": la.floor})
        res.stats["forward_passes"] += la.forward_passes
        res.stats["tokens_decoded"] += la.tokens_decoded
        res.stats["rollout_tokens"] = la.tokens_decoded
        return res

    def __repr__(self) -> str:
        return f"ScalablePower({self.lookahead!r}, n={self.n})"
