"""Stand-alone approximate samplers.

``ScalablePower(top_k, rollouts, horizon, n)``: the training-free sampler of Scalable
Power Sampling (arXiv 2601.21590): decode token by token from the
:class:`~llmppl.inference.lookahead.Lookahead` proposal ``q(v) ∝ p(v)^α ζ̂(v)``, with
no weights.  Approximate: ``E[q̂] ≠ π_α(v|y_<t)`` for finitely many rollouts (the
``jackknife`` option removes the ``O(1/M)`` bias) and the horizon truncates the
future; inside ``pp.SMC(proposal=Lookahead(...))`` the weights make it exact.
"""

from __future__ import annotations

from .decoder import BatchMixin, Decoder, DecoderState, _check_n
from .lookahead import Lookahead
from .result import Result


class ScalablePower(BatchMixin):
    """``n`` completions drawn from the look-ahead proposal of ``p^α`` (``α`` = the target's exponent).

    Every prompt's rows decode together; the rollouts of all rows share one forked state and
    never look past the run's ``max_new_tokens`` (given to the proposal in its context)."""

    method = "scalable_power"

    def __init__(self, top_k: int = 4, rollouts: int = 2, horizon: int = 8, n: int = 1,
                 jackknife: bool = False, floor: float = 0.0) -> None:
        self.lookahead = Lookahead(top_k=top_k, rollouts=rollouts, horizon=horizon, jackknife=jackknife,
                                   floor=floor)
        self.n = _check_n(n)

    def _decoder(self) -> Decoder:
        la = self.lookahead
        return Decoder("scalable_power", la, self.n,
                       {"top_k": la.top_k, "rollouts": la.rollouts, "horizon": la.horizon,
                        "jackknife": la.jackknife, "floor": la.floor})

    def results(self, state: DecoderState, raise_on_failure: bool = False) -> list[Result]:
        """``Result.stats`` counts the rollouts (``tokens_decoded`` includes them; the engine adds
        the proposal's work): ``lookahead_tokens_decoded`` (alias ``rollout_tokens``) are the
        rollout tokens of the prompt's own rows, ``lookahead_forward_passes`` the batch's."""
        out = super().results(state)
        for res in out:
            res.stats["rollout_tokens"] = res.stats.get("lookahead_tokens_decoded", 0)
        return out

    def __repr__(self) -> str:
        return f"ScalablePower({self.lookahead!r}, n={self.n})"
