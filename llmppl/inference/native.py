"""Which parts of a run the backend can decode natively, in blocks.

A proposal is *native* when ``q(v | y_<t) ∝ p(v | y_<t)^{1/τ}`` (or greedy) for a τ the
engine knows per row: the backend then draws whole blocks itself
(:meth:`~llmppl.models.base.LMState.sample_block`) and returns ``log p`` and ``log q`` of
each drawn token, which is all the weights need.  That holds for ``Base`` (τ = 1),
``Temperature(τ)`` (τ = 1/a_t when unset) and ``LocallyOptimal`` on a target with no
token-level factor (``q ∝ p^{a_t}``).  Proposals that draw their blocks themselves (``drafts``:
``FromLM``'s draft LM, ``Lookahead``'s native top-k / rollouts / choice) are native too on a target
without token-level factors but masks.  Everything else — full-vocabulary proposals
(``LocallyOptimal`` over masks, ``Lookahead`` with the jackknife, ``TopK``/``TopP``), token-level
factors of the target (``Constraint`` masks, ``Tempered``), segment steps, rejuvenation
moves and the ``AdaptiveESS`` schedule — needs ``(rows, V)`` log-probabilities at each token,
and runs on the token path of backends that have it (``state.full_vocabulary``).

What a part of a run needs is asked in one way: :func:`needs` (a registry keyed by the part's
type: proposals, potentials, targets, schedules, steps, and the engines, which register in their
own modules) returns a :class:`~llmppl.inference.capabilities.Needs`.
The parts *declare* it in one attribute, ``requires`` (a ``Needs``: proposals, steps, schedules),
plus ``Proposal.block_temperature`` (when it is native) and ``Potential.factorises`` (a
token-level factor, part of the target's maths); engines only ever read :func:`needs`.  A new
kind of part registers itself with ``needs.register(MyType)``.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from ..models.block import NotNative
from ..targets.base import Potential, Power, Product
from ..targets.target import Target
from .capabilities import Needs
from .proposal import Proposal
from .schedules import Schedule
from .steps import Step


@functools.singledispatch
def needs(part: Any, target: Target | None = None) -> Needs:
    """What ``part`` needs (see :class:`Needs`); ``target``: the target it runs on, when that
    matters (a proposal is native only on a target without token-level factors).  A part of
    an unregistered type (a custom move kernel, say) is assumed to need the full vocabulary."""
    return Needs(full_vocabulary=True, row_wise=False)


@needs.register
def _(part: Proposal, target: Target | None = None) -> Needs:
    a = torch.ones(1, dtype=torch.float64) * (target.base_exponent if target is not None else 1.0)
    tau = block_temperature(part, target, a) if target is not None else part.block_temperature(a)
    native = tau is not None and bool(torch.isfinite(tau).all() and (tau >= 0).all())
    drafts = part.drafts and (target is None or not needs(target).full_vocabulary)   # its own LM's blocks
    return part.requires | Needs(full_vocabulary=not (native or drafts))


@needs.register
def _(part: Potential, target: Target | None = None) -> Needs:
    """A factor that acts on every next token (``log φ^next``: ``Tempered``) needs the full
    vocabulary, unless it is a mask (``allowed_tokens``: ``log φ^next = log 1[allowed]``), which a
    backend applies inside its own blocks; one defined on finished sequences or prefixes
    (rewards, twists) needs nothing."""
    mask = callable(getattr(part, "allowed_tokens", None))
    return Needs(full_vocabulary=bool(part.factorises) and not mask)


def all_of(parts: Any) -> Needs:
    """What a run with every one of ``parts`` needs (``Needs()`` for none)."""
    return functools.reduce(lambda acc, part: acc | needs(part), parts, Needs())


@needs.register
def _(part: Product, target: Target | None = None) -> Needs:
    return all_of(part.factors)


@needs.register
def _(part: Power, target: Target | None = None) -> Needs:
    return Needs()       # p^a is the base exponent: native blocks weigh it exactly


@needs.register
def _(part: Target, target: Target | None = None) -> Needs:
    return all_of(part.others)


@needs.register
def _(part: Schedule, target: Target | None = None) -> Needs:
    return part.requires


@needs.register
def _(part: Step, target: Target | None = None) -> Needs:
    """Token and block steps are native; a segment step reads each drawn token on the host."""
    return part.requires


def block_temperature(proposal: Proposal, target: Target, a_rows: torch.Tensor) -> torch.Tensor | None:
    """``(R,)`` float64 ``τ`` per row when ``proposal`` is native for ``target`` at exponents
    ``a_rows`` (``0`` for greedy), else ``None``."""
    if needs(target).full_vocabulary:     # a token-level factor (mask, Tempered): not p^{1/τ}
        return None
    return proposal.block_temperature(a_rows.double())


def block_masks(target: Target, state: Any, rows: torch.Tensor | None) -> dict[str, Any]:
    """The ``BlockSpec`` fields that apply the target's masks inside a native block over ``rows``
    of ``state`` (all rows when None): ``allowed`` ``(V,)`` when every mask is fixed, else
    ``mask_fn(k, tokens)``, the conjunction of the masks after each row's completion so far
    (``target.allowed_tokens`` on a batch of the rows' prompts and tokens).  Empty without masks."""
    if not any(f.factorises for f in target.others):
        return {}
    V = target.lm.vocab_size
    fixed = target.static_allowed(V)
    if fixed is not None:
        return {"allowed": fixed.to(target.lm.device)}
    row_ids = list(range(state.n_rows)) if rows is None else rows.tolist()

    def mask_fn(k: torch.Tensor, tokens: list[list[int]]) -> torch.Tensor:
        prompts = [state.prompt_of(row_ids[i]) for i in k.tolist()]
        # the prefixes' next-token log-probabilities are not known inside a native block: the batch
        # carries their shape only (a meta tensor), so a mask that reads their values fails loudly
        shape_only = torch.empty((len(tokens), V), device="meta")
        batch = target.batch(prompts, [list(t) for t in tokens], shape_only)
        try:
            return target.allowed_tokens(batch, V)
        except (NotImplementedError, RuntimeError) as exc:
            if "meta" not in str(exc):
                raise
            raise ValueError(f"a mask of {target!r} reads the base LM's log-probabilities, which a native "
                             "block does not have (only the prefixes): make the mask a function of the "
                             "tokens, or use a full-vocabulary proposal such as pp.proposals.TopK on HFLM") from None

    return {"mask_fn": mask_fn}


def require_full_vocabulary(state, what: str, instead: str) -> None:
    """Raise :class:`NotNative` when ``state`` has no full-vocabulary log-probabilities."""
    if not getattr(state, "full_vocabulary", True):
        raise NotNative(f"{what} needs full-vocabulary log-probabilities at every token, which "
                        f"{state.lm.name} does not give (it decodes natively in blocks): {instead}")


NATIVE_HINT = ("use a native proposal (pp.proposals.Temperature() or Base()) on a target without "
               "token-level factors, or a backend with full-vocabulary log-probabilities (HFLM, LlamaCppLM)")

__all__ = ["Needs", "needs", "all_of", "block_temperature", "block_masks", "require_full_vocabulary", "NATIVE_HINT"]
