"""The proposal protocol: ``q_t(v | y_<t)`` for SMC, MH and the baselines.

* ``log_probs(ctx) -> (B, V)``: normalised ``log q(v | y_<t)`` for the rows in ``ctx``;
  a token with ``q = 0`` is never drawn, and engines correct by ``−log q`` in the
  weights, so any ``q`` whose support covers the target's is exact.
* ``sample(log_q, generator) -> (B,)``: one draw per row.
* A proposal holds configuration only.  What one run of it owns (another LM's decoding
  state, rollout counters) is the value ``start`` returns; the engine keeps that value in
  the run's state and hands it back in ``ctx.run`` and to the hooks ``on_extend`` /
  ``on_reorder`` / ``on_finish`` / ``work``, so two runs through one proposal never meet.
* ``requires`` (a :class:`~llmppl.inference.capabilities.Needs`) declares what the proposal
  needs: ``row_wise`` (``log_probs`` is a row-wise function of ``ctx.batch.base_logprobs``,
  the target and the exponent: SMC evaluates it on every row at once without a host sync),
  ``own_state`` (it follows the particles through the hooks), ``random`` (``log q`` cannot
  be evaluated again).  ``block_temperature`` declares when it is native.  Engines ask
  :func:`llmppl.inference.native.needs`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..models.block import LOG_Q_FLOOR, sample_inverse_cdf  # noqa: F401  (LOG_Q_FLOOR: public here too)
from ..targets.base import Prefixes
from .capabilities import Needs


@dataclass
class ProposalContext:
    """Everything a proposal may look at for one batched step."""

    target: Any
    batch: Prefixes
    state: Any = None
    rows: torch.Tensor | None = None
    exponent: float | torch.Tensor = 1.0   # a_t: a float, or a (B, 1) tensor (one per row)
    generator: torch.Generator | None = None
    #: the run's token budget (completions have at most this many tokens, EOS included), so
    #: that proposals which decode ahead (``Lookahead``) never look past it; None: unknown
    max_new_tokens: int | None = None
    #: this run's own state of the proposal: what its ``start`` returned
    run: Any = None


class Proposal:
    """Base class: ``q(v | y_<t)``, configuration only (see the module docstring)."""

    #: what the proposal needs (default: not row-wise; native exactly when ``block_temperature`` says so)
    requires: Needs = Needs(row_wise=False)
    #: ``sample`` returns the mode (greedy decoding): ``block_temperature`` 0 means greedy
    greedy: bool = False
    #: false: ``q`` is renormalised without the stop ids (native blocks never draw them)
    allow_stop: bool = True
    #: the proposal draws whole blocks itself (:meth:`draft_block`: another LM's native blocks, or
    #: ``Lookahead``'s native draws from the engine's own state); SMC then has the target score each
    #: block with one ``extend``
    drafts: bool = False
    #: with ``drafts``: :meth:`draft_block` draws from the engine's own decoding state (given as
    #: ``decoding``), feeds it as a native block would and records ``log p`` itself (``Lookahead``);
    #: false: another LM draws and the engine scores the block under the target
    draws_from_engine: bool = False
    #: the prefix of this proposal's own LM work in ``Result.stats``
    #: (``<name>_tokens_decoded``, ``<name>_forward_passes``); None: it does none
    work_name: str | None = None

    def start(self, target: Any, prompts: list[list[int]], n: int, max_new_tokens: int) -> Any:
        """A new run on ``prompts`` × ``n`` rows (row ``g·n + i``: prompt ``g``): the run's own
        state of this proposal (None for a stateless one), kept by the engine in its state."""
        return None

    def work(self, run: Any) -> tuple[int, dict[int, int]]:
        """The LM work of the run ``run`` on top of the engine's own decoding state:
        ``(forward passes, {prompt index: tokens decoded})``.  Engines add it to
        ``Result.stats`` (``forward_passes``, ``tokens_decoded``) so stats count all LM work."""
        return 0, {}

    def log_probs(self, ctx: ProposalContext) -> torch.Tensor:
        raise NotImplementedError

    def block_temperature(self, exponent: torch.Tensor) -> torch.Tensor | None:
        """``τ`` per row (``exponent`` ``(R,)`` = ``a_t`` per row) when ``q ∝ p^{1/τ}`` on a target
        without token-level factors, so a backend can draw blocks natively; ``None`` otherwise."""
        return None

    def draft_block(self, run: Any, rows: torch.Tensor, spec: Any, generator: Any, *, decoding: Any = None,
                    exponent: torch.Tensor | None = None, max_new_tokens: int | None = None) -> Any:
        """For ``drafts``: a :class:`~llmppl.models.block.Block` for the engine's ``rows`` drawn from
        this proposal by its own decoding state (which feeds itself), ``spec`` giving budgets, stop
        ids and masks; its ``log_q`` is the proposal's.  The engine scores it under the target.
        ``decoding``, ``exponent`` ``(n,)`` and ``max_new_tokens``: the engine's own decoding state,
        the rows' ``a_t`` and the run's budget, for a proposal that draws from the engine's LM
        (``draws_from_engine``: it feeds ``decoding`` and fills ``log_p`` itself)."""
        raise NotImplementedError

    def on_extend(self, run: Any, tokens: Any, rows: torch.Tensor) -> None:
        """Rows ``rows`` of the run were extended by ``tokens``."""

    def on_reorder(self, run: Any, indices: torch.Tensor) -> None:
        """Row j of the run became a copy of row ``indices[j]``."""

    def on_finish(self, run: Any, rows: torch.Tensor) -> None:
        """Rows of the run will not be extended any more."""

    def sample(self, log_q: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """One draw per row from ``q = exp(log_q)`` (:func:`~llmppl.models.block.sample_inverse_cdf`)."""
        return sample_inverse_cdf(log_q, generator)


class Wrapping(Proposal):
    """A proposal built on an ``inner`` one (a restriction, a mask of the stop ids): the run state,
    the hooks and the LM work are the inner proposal's."""

    inner: Proposal

    def start(self, target: Any, prompts: list[list[int]], n: int, max_new_tokens: int) -> Any:
        return self.inner.start(target, prompts, n, max_new_tokens)

    def on_extend(self, run: Any, tokens: Any, rows: torch.Tensor) -> None:
        self.inner.on_extend(run, tokens, rows)

    def on_reorder(self, run: Any, indices: torch.Tensor) -> None:
        self.inner.on_reorder(run, indices)

    def on_finish(self, run: Any, rows: torch.Tensor) -> None:
        self.inner.on_finish(run, rows)

    @property
    def work_name(self) -> str | None:  # type: ignore[override]
        return self.inner.work_name

    def work(self, run: Any) -> tuple[int, dict[int, int]]:
        return self.inner.work(run)


def own_sampler(proposal: Proposal):
    """``proposal.sample`` when the proposal overrides it, else None: the block then draws by
    inversion with each row's own uniforms (:class:`~llmppl.models.streams.RowStreams`)."""
    return None if type(proposal).sample is Proposal.sample else proposal.sample


def exponent_of(ctx: ProposalContext) -> float | torch.Tensor:
    """``a_t`` as a float or a ``(B, 1)`` tensor on the log-probs' device.

    The rule every engine follows: ``a_t ≥ 0`` and finite.  ``a_t = 0`` is the exponent of a
    target without a ``Power`` factor that replaces ``p`` (``Target(lm, Tempered(τ))``); a
    float is checked here, a per-row tensor (SMC's, built from the schedule) is not, to
    avoid a host sync per token.
    """
    a = ctx.exponent
    if isinstance(a, torch.Tensor):
        return a.reshape(-1, 1).to(ctx.batch.base_logprobs)
    if not (a >= 0 and math.isfinite(a)):
        raise ValueError(f"the proposal needs a finite exponent a_t >= 0, got {a}")
    return float(a)
