"""The proposal protocol: ``q_t(v | y_<t)`` for SMC, MH and the baselines.

* ``log_probs(ctx) -> (B, V)``: normalised ``log q(v | y_<t)`` for the rows in ``ctx``;
  a token with ``q = 0`` is never drawn, and engines correct by ``−log q`` in the
  weights, so any ``q`` whose support covers the target's is exact.
* ``sample(log_q, generator) -> (B,)``: one draw per row.
* stateful proposals (another LM, caches) override ``start`` / ``on_extend`` /
  ``on_reorder`` / ``on_finish`` to follow the engine's particles.
* ``vectorised = True`` promises that ``log_probs`` is a row-wise function of
  ``ctx.batch.base_logprobs``, the target and the exponent (no LM state, no Python per
  row): the SMC engine then evaluates it on every row at once without a host sync.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..targets.base import Prefixes

#: ``log q`` below this counts as probability 0 when sampling (see ``Proposal.sample``)
LOG_Q_FLOOR = -80.0


@dataclass
class ProposalContext:
    """Everything a proposal may look at for one batched step."""

    target: Any
    batch: Prefixes
    state: Any = None
    rows: torch.Tensor | None = None
    exponent: float | torch.Tensor = 1.0   # a_t: a float, or a (B, 1) tensor (one per row)
    generator: torch.Generator | None = None


class Proposal:
    """Base class: ``q(v | y_<t)``; stateless unless the hooks are overridden."""

    #: ``log_probs`` is row-wise on ``base_logprobs`` (see module docstring)
    vectorised: bool = False

    @property
    def stateful(self) -> bool:
        """True when the proposal follows the particles through the ``on_*`` hooks."""
        return type(self).on_extend is not Proposal.on_extend

    def log_probs(self, ctx: ProposalContext) -> torch.Tensor:
        raise NotImplementedError

    def start(self, target: Any, prompt_ids: list[int], n: int) -> None:
        """Called once per run, before the first step, with the number of particles."""

    def on_extend(self, tokens: Sequence[Sequence[int]], rows: torch.Tensor) -> None:
        """Rows ``rows`` were extended by ``tokens``."""

    def on_reorder(self, indices: torch.Tensor) -> None:
        """Row j became a copy of row ``indices[j]``."""

    def on_finish(self, rows: torch.Tensor) -> None:
        """Rows will not be extended any more."""

    def sample(self, log_q: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """One draw per row from ``q = exp(log_q)`` by inversion: ``v = min{v : C_v > U · C_V}``
        with ``C`` the float64 cumulative sums and ``U ~ U[0, 1)`` from ``generator``.

        Tokens with ``log q < −80`` (``q < 1.8e−35``, at most ~1e−30 of the mass for any
        vocabulary) count as probability 0: their float32 ``exp`` would be denormal, which is
        an order of magnitude slower on CPUs, and below the resolution of the float64 sums.
        (Inversion is ~6× faster than ``torch.multinomial`` on a CPU for a 49k vocabulary.)
        """
        p = torch.where(log_q >= LOG_Q_FLOOR, log_q, torch.full_like(log_q, -math.inf)).exp()
        c = p.double().cumsum(-1)
        dev = generator.device if generator is not None else log_q.device
        u = torch.rand((log_q.shape[0], 1), generator=generator, dtype=torch.float64, device=dev)
        idx = torch.searchsorted(c, u.to(c.device) * c[:, -1:], right=True)
        return idx.squeeze(1).clamp_(max=log_q.shape[-1] - 1)


def exponent_of(ctx: ProposalContext) -> float | torch.Tensor:
    """``a_t`` as a float or a ``(B, 1)`` tensor on the log-probs' device, checked positive."""
    a = ctx.exponent
    if isinstance(a, torch.Tensor):
        return a.reshape(-1, 1).to(ctx.batch.base_logprobs)
    if not a > 0:
        raise ValueError(f"the proposal needs a positive exponent, got {a}")
    return float(a)
