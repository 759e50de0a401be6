"""What each engine holds in memory at its peak, checked before it starts.

``lm.start`` alone sizes a state of ``rows × (prompt + T)``; an engine holds more at once:

* SMC: its ``G·N`` particles; resample-move (``rejuvenate``) copies each moved particle twice
  (the current suffix replayed beside the proposed one: up to ``3·G·N`` rows, cut and re-grown);
* MH: its ``G·chains`` chains and, during a move, one proposal copy of each (``2·G·chains``
  rows, cut at the move's position and re-grown);
* the decoding baselines (``Plain``, ``LowTemperature``, ``Greedy``, ``BestOfN``) and
  ``ScalablePower``: their ``G·n`` rows;
* a :class:`~llmppl.inference.lookahead.Lookahead` proposal forks the rows it draws for into
  ``top_k × rollouts`` rows each, up to ``horizon`` tokens longer (beside the main state);
* a :class:`~llmppl.proposals.FromLM` proposal keeps its own decoding state of the engine's
  rows on its own LM (checked with the target LM when both share a device);
* a full-vocabulary proposal (masks, look-ahead, another LM, top-k/p) evaluates ``q`` and the
  target's increments as float64 ``(rows, V)`` tensors: two logit rows per row.

Each engine's function returns the ``(lm, Footprint)`` pairs of a run; :func:`check_fits` hands
them to :func:`llmppl.models.memory.check_footprints`, which refuses a run that cannot fit before
anything is allocated.  Engines call it once, in ``init``, before ``lm.start``::

    check_fits(mh_footprint(self, target, prompt_ids, max_new_tokens, chains))

Proposals size their part through :func:`proposal_footprint` (a registry keyed by the
proposal's type: ``proposal_footprint.register(MyProposal)`` for a new one that holds
memory).  The engines' own functions are plain functions rather than a registry keyed by the
engine's type because the engines import this module (``tests/test_import_graph.py``: no
import cycle), so it cannot import them.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from ..models.memory import Footprint, check_footprints
from .lookahead import Lookahead
from .native import needs
from .proposal import Proposal
from .proposals import FromLM, default_proposal

#: a (lm, footprint) pair: what one LM holds at a run's peak
Need = tuple[Any, Footprint]


def _tokens(prompts: Sequence[Sequence[int]], max_new_tokens: int) -> int:
    """Tokens per row: the longest prompt (rows are left-padded to it) plus ``max_new_tokens``."""
    return max(len(p) for p in prompts) + int(max_new_tokens)


def _count(n: int, what: str) -> str:
    return f"{n} {what}" + ("" if n == 1 else "s")


def _merge(needs_: list[Need]) -> list[Need]:
    """One footprint per LM (those on the same LM are held at once: summed)."""
    out: dict[int, Need] = {}
    for lm, fp in needs_:
        out[id(lm)] = (lm, out[id(lm)][1] + fp) if id(lm) in out else (lm, fp)
    return list(out.values())


def _full_vocabulary(proposal: Any, target: Any, rows: int) -> list[Need]:
    """Two float64 ``(rows, V)`` logit rows per row (``q`` and the target's increments) for a
    proposal that needs the full vocabulary; nothing for a native (temperature) one."""
    if needs(proposal, target).full_vocabulary:
        return [(target.lm, Footprint(0, 0, logit_rows=2 * rows))]
    return []


@functools.singledispatch
def proposal_footprint(proposal: Any, target: Any, rows: int, tokens: int) -> list[Need]:
    """What ``proposal`` holds beside the engine's ``rows`` rows of ``tokens`` tokens: extra rows
    on the target LM (forks, float64 logit rows) or a state on an LM of its own.  The default
    (any ``Proposal``): its full-vocabulary logit rows, and its ``inner`` proposal's part
    (``TopK`` / ``TopP`` restrict another proposal)."""
    inner = getattr(proposal, "inner", None)
    extra = proposal_footprint(inner, target, rows, tokens) if isinstance(inner, Proposal) else []
    return extra + _full_vocabulary(proposal, target, rows)


@proposal_footprint.register
def _(proposal: Lookahead, target: Any, rows: int, tokens: int) -> list[Need]:
    """The fork: ``top_k × rollouts`` rows per drawn row, each fed a candidate and up to
    ``horizon`` tokens, the last never fed (a row forked near the end, where the engine does not
    cap the rollouts at the budget, reaches ``tokens + horizon``)."""
    fork = rows * proposal.top_k * proposal.rollouts
    return [(target.lm, Footprint(fork, tokens + proposal.horizon,
                                  what=f"look-ahead fork: {proposal.top_k} x {proposal.rollouts} per row"))
            ] + _full_vocabulary(proposal, target, rows)


@proposal_footprint.register
def _(proposal: FromLM, target: Any, rows: int, tokens: int) -> list[Need]:
    """The proposal LM's own decoding state of the engine's rows."""
    return [(proposal.lm, Footprint(rows, tokens, what="FromLM proposal state"))
            ] + _full_vocabulary(proposal, target, rows)


def smc_footprint(engine: Any, target: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[Need]:
    """SMC (``pp.SMC``, and ``Reweight`` through it): ``G·N`` rows of ``prompt + T`` tokens;
    with ``rejuvenate``, the move's two copies of every particle (cut and re-grown); plus the
    proposal's part (:func:`proposal_footprint`)."""
    rows, tokens = len(prompts) * engine.n_particles, _tokens(prompts, max_new_tokens)
    what = f"SMC: {_count(len(prompts), 'prompt')} x {_count(engine.n_particles, 'particle')}"
    if getattr(engine, "rejuvenate", None) is not None:
        main = Footprint(3 * rows, tokens, regrow=int(max_new_tokens),
                         what=what + " x 3 (resample-move copies)")
    else:
        main = Footprint(rows, tokens, what=what)
    proposal = engine.proposal if engine.proposal is not None else default_proposal(target)
    return _merge([(target.lm, main)] + proposal_footprint(proposal, target, rows, tokens))


def mh_footprint(engine: Any, target: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 chains: int) -> list[Need]:
    """Block MH: ``G·chains`` chains and, while ``n_mcmc > 0``, a proposal copy of each (the
    decoding state is doubled, the copies cut at the move's position and re-grown)."""
    rows, tokens = len(prompts) * chains, _tokens(prompts, max_new_tokens)
    what = f"MH: {_count(len(prompts), 'prompt')} x {_count(chains, 'chain')}"
    if engine.n_mcmc > 0:
        main = Footprint(2 * rows, tokens, regrow=min(engine.block_size, int(max_new_tokens)),
                         what=what + " x 2 (proposals)")
    else:
        main = Footprint(rows, tokens, what=what)
    proposal = engine.proposal if engine.proposal is not None else default_proposal(target)
    return _merge([(target.lm, main)] + proposal_footprint(proposal, target, rows, tokens))


def decoder_footprint(engine: Any, target: Any, prompts: Sequence[Sequence[int]],
                      max_new_tokens: int) -> list[Need]:
    """A decoding baseline (``Decoder``: ``Plain``, ``LowTemperature``, ``Greedy``, ``BestOfN``,
    ``ScalablePower``): ``G·n`` rows, plus its proposal's part (``ScalablePower``'s look-ahead fork)."""
    rows, tokens = len(prompts) * engine.n, _tokens(prompts, max_new_tokens)
    main = Footprint(rows, tokens, what=f"{engine.method}: {_count(len(prompts), 'prompt')} x "
                                        f"{_count(engine.n, 'sample')}")
    return _merge([(target.lm, main)] + proposal_footprint(engine.proposal, target, rows, tokens))


def check_fits(needs_: list[Need], available: int | None = None) -> dict[str, int]:
    """Refuse (:class:`~llmppl.models.memory.NotEnoughMemory`, a ``ValueError``) a run whose
    footprints do not fit the free memory of their devices; the summed estimate otherwise."""
    return check_footprints(needs_, available)


__all__ = ["Need", "proposal_footprint", "smc_footprint", "mh_footprint", "decoder_footprint", "check_fits"]
