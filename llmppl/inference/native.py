"""Which parts of a run the backend can decode natively, in blocks.

A proposal is *native* when ``q(v | y_<t) ∝ p(v | y_<t)^{1/τ}`` (or greedy) for a τ the
engine knows per row: the backend then draws whole blocks itself
(:meth:`~llmppl.models.base.LMState.sample_block`) and returns ``log p`` and ``log q`` of
each drawn token, which is all the weights need.  That holds for ``Base`` (τ = 1),
``Temperature(τ)`` (τ = 1/a_t when unset) and ``LocallyOptimal`` on a target with no
token-level factor (``q ∝ p^{a_t}``).  Everything else — full-vocabulary proposals
(``LocallyOptimal`` over masks, ``Lookahead``, ``FromLM``, ``TopK``/``TopP``), token-level
factors of the target (``Constraint`` masks, ``Tempered``), segment steps, rejuvenation
moves and the ``AdaptiveESS`` schedule — needs ``(rows, V)`` log-probabilities at each token,
and runs on the token path of backends that have it (``state.full_vocabulary``).
"""

from __future__ import annotations

import torch

from ..models.block import NotNative
from ..targets.target import Target
from .proposal import Proposal


def token_level_factors(target: Target) -> list[str]:
    """Names of the target's factors that act on every next token (``log φ^next``)."""
    return [repr(f) for f in target.others if getattr(f, "factorises", False)]


def block_temperature(proposal: Proposal, target: Target, a_rows: torch.Tensor) -> torch.Tensor | None:
    """``(R,)`` float64 ``τ`` per row when ``proposal`` is native for ``target`` at exponents
    ``a_rows`` (``0`` for greedy), else ``None``."""
    if token_level_factors(target):
        return None
    return proposal.block_temperature(a_rows.double())


def require_full_vocabulary(state, what: str, instead: str) -> None:
    """Raise :class:`NotNative` when ``state`` has no full-vocabulary log-probabilities."""
    if not getattr(state, "full_vocabulary", True):
        raise NotNative(f"{what} needs full-vocabulary log-probabilities at every token, which "
                        f"{state.lm.name} does not give (it decodes natively in blocks): {instead}")


NATIVE_HINT = ("use a native proposal (pp.proposals.Temperature() or Base()) on a target without "
               "token-level factors, or a backend with full-vocabulary log-probabilities (HFLM, LlamaCppLM)")

__all__ = ["block_temperature", "require_full_vocabulary", "token_level_factors", "NATIVE_HINT"]
