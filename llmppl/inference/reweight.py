"""Re-weighting plain samples: self-normalised importance sampling of ``p^α`` from ``p``.

Draw ``y_1..y_N ~ p(·|x)`` (plain ancestral sampling) and weight them

    W_i ∝ γ(y_i) / p(y_i) = p(y_i)^(α−1)        (times 0 for a completion cut at
                                                   max_new_tokens when truncation="zero"),

so that ``Σ_i W_i δ_{y_i}`` estimates ``π ∝ p^α`` (consistent as ``N → ∞``, bias O(1/N)) and
``(1/N) Σ_i p(y_i)^(α−1)`` is an unbiased estimate of ``Z = Σ_y p(y)^α``.  This is the SMC
engine with the proposal ``q = p`` and resampling off (``ess_threshold = 0``): the
incremental weight of a token is ``α log p − log p``, so nothing new is sampled — with
the same seed it draws exactly the samples :class:`~llmppl.inference.baselines.Plain`
draws (same rows, same generator stream), i.e. it is compute-matched to plain sampling
and differs from it only by the weights (and the answer it returns: a draw from them).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..targets.target import Target
from .capabilities import Needs
from .kernel import Engine, Prompt
from .native import needs
from .proposals import Base
from .result import Result
from .smc import SMC, SMCInfo, SMCState


class Reweight(Engine[SMCState]):
    """``n`` samples from ``p``, self-normalised weights ``∝ p(y)^(α−1)`` for the target ``p^α``:
    ``init`` / ``step`` / ``results`` of ``smc = SMC(n, proposal=Base(), ess_threshold=0)``,
    whose Results it names ``"reweight"``."""

    method = "reweight"

    def __init__(self, n: int, progress: bool = False) -> None:
        self.smc = SMC(n, proposal=Base(), ess_threshold=0.0)
        self.n_particles = self.smc.n_particles
        self.progress = progress

    def init(self, target: Target, prompts: Sequence[Prompt], max_new_tokens: int,
             seed: int | None = None) -> SMCState:
        return self.smc.init(target, prompts, max_new_tokens, seed)

    def step(self, state: SMCState) -> tuple[SMCState, SMCInfo]:
        return self.smc.step(state)

    def results(self, state: SMCState, raise_on_failure: bool = False) -> list[Result]:
        out = self.smc.results(state, raise_on_failure)
        for res in out:
            res.method = "reweight"
        return out

    def __repr__(self) -> str:
        return f"Reweight(n={self.n_particles})"


@needs.register
def _(engine: Reweight, target: Target | None = None) -> Needs:
    return needs(engine.smc, target)
