"""The one vocabulary of what a part of a run needs from the backend and from the engines.

Every part (proposal, step, schedule, move kernel, engine) *declares* a :class:`Needs` in its
``requires`` attribute; potentials declare ``factorises`` (a token-level factor ``log φ^next``,
part of the target's maths).  Engines never read the declarations directly: they ask
:func:`llmppl.inference.native.needs`, which also accounts for the target a part runs on (a
temperature proposal is native only on a target without token-level factors).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Needs:
    """What one part of a run asks of the backend and of the engines.

    * ``full_vocabulary``: ``(rows, V)`` log-probabilities at every token, so it cannot run
      inside a backend's native blocks (``NotNative`` on a backend without them);
    * ``own_state``: a decoding state of its own (another LM's KV cache) that follows the
      particles through the ``on_*`` hooks, in the run state the part's ``start`` returns
      (SMC calls the hooks with a host sync a token; MH and moves refuse such a part);
    * ``row_wise``: a row-wise tensor function of the base log-probabilities, evaluated on
      every row at once without a host sync;
    * ``random``: random when evaluated, so its ``log q`` cannot be evaluated again for an MH
      reverse move.

    ``a | b`` is what a run with both parts needs (row-wise only when both are).
    """

    full_vocabulary: bool = False
    own_state: bool = False
    row_wise: bool = True
    random: bool = False

    def __or__(self, other: "Needs") -> "Needs":
        return Needs(self.full_vocabulary or other.full_vocabulary, self.own_state or other.own_state,
                     self.row_wise and other.row_wise, self.random or other.random)


__all__ = ["Needs"]
