"""The built-in potentials: ``Power``, ``Tempered``, ``RewardTilt``, ``Constraint``."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .base import Completion, Potential, Prefixes


def _positive_finite(name: str, value: float) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {value!r}")
    return v


class Power(Potential):
    """``p(y|x)^α``: per token ``α · log p(v | y_<t)``.  ``Power(a) * Power(b) == Power(a + b)``."""

    factorises = True

    def __init__(self, alpha: float) -> None:
        self.alpha = _positive_finite("alpha", alpha)

    def log_next(self, batch: Prefixes) -> torch.Tensor:
        return self.alpha * batch.base_logprobs

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Power) and math.isclose(self.alpha, other.alpha, rel_tol=1e-12)

    def __hash__(self) -> int:
        return hash(("Power", round(self.alpha, 12)))

    def __repr__(self) -> str:
        return f"Power({self.alpha:g})"


class Tempered(Potential):
    """``Π_t softmax(logits_t / τ)[y_t]``: locally normalised low temperature (not ``Power(1/τ)``)."""

    factorises = True

    def __init__(self, tau: float) -> None:
        self.tau = _positive_finite("tau", tau)

    def log_next(self, batch: Prefixes) -> torch.Tensor:
        return torch.log_softmax(batch.base_logprobs.double() / self.tau, dim=-1).to(
            batch.base_logprobs.dtype
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tempered) and math.isclose(self.tau, other.tau, rel_tol=1e-12)

    def __hash__(self) -> int:
        return hash(("Tempered", round(self.tau, 12)))

    def __repr__(self) -> str:
        return f"Tempered({self.tau:g})"


class RewardError(ValueError):
    """A reward or process reward returned something unusable."""


def _call_scores(fn: Callable, completions: list[Completion], what: str) -> torch.Tensor:
    try:
        values = fn(completions)
    except Exception as exc:  # the user's function failed: say which one
        raise RewardError(f"{what} raised {type(exc).__name__}: {exc}") from exc
    try:
        out = torch.as_tensor([float(v) for v in values], dtype=torch.float64)
    except (TypeError, ValueError) as exc:
        raise RewardError(f"{what} must return a list of floats, got {values!r:.200}") from exc
    if out.shape != (len(completions),):
        raise RewardError(
            f"{what} returned {out.numel()} values for {len(completions)} completions"
        )
    bad = (~torch.isfinite(out)).nonzero().flatten()
    if len(bad):
        i = int(bad[0])
        c = completions[i]
        shown = c.text if c.text is not None else c.token_ids
        raise RewardError(f"{what} returned {float(out[i])} for completion {i} ({shown!r:.120})")
    return out


class RewardTilt(Potential):
    """``exp(r(y)/β)`` on finished completions; ``process_reward`` gives twists ``exp(V(y_≤t)/β)``.

    ``reward(completions) -> list[float]`` is called in batches; each completion has
    ``.token_ids`` (without EOS) and ``.text``.  The process reward only guides
    engines (it cancels): the target is defined by ``reward`` alone.
    """

    def __init__(
        self,
        reward: Callable[[list[Completion]], Sequence[float]],
        beta: float,
        process_reward: Callable[[list[Completion]], Sequence[float]] | None = None,
    ) -> None:
        if not callable(reward):
            raise ValueError(f"reward must be callable, got {reward!r}")
        if process_reward is not None and not callable(process_reward):
            raise ValueError(f"process_reward must be callable, got {process_reward!r}")
        self.reward = reward
        self.beta = _positive_finite("beta", beta)
        self.process_reward = process_reward

    @property
    def has_twist(self) -> bool:
        return self.process_reward is not None

    def log_complete(self, batch: Prefixes) -> torch.Tensor:
        return _call_scores(self.reward, batch.completions(), "reward") / self.beta

    def log_prefix(self, batch: Prefixes) -> torch.Tensor:
        if self.process_reward is None:
            return torch.zeros(len(batch), dtype=torch.float64)
        comps = [Completion(c.token_ids, c.text, False, False) for c in batch.completions()]
        return _call_scores(self.process_reward, comps, "process_reward") / self.beta

    def __repr__(self) -> str:
        name = getattr(self.reward, "__name__", type(self.reward).__name__)
        return f"RewardTilt({name}, beta={self.beta:g})"


class Constraint(Potential):
    """``1[y ∈ A]``: a hard constraint, given by a predicate on finished completions or a token mask.

    * ``Constraint(predicate)`` / ``Constraint(predicate=f)``: ``f(completion) -> bool``
      on finished completions; optional ``prefix=g(completion) -> bool`` prunes prefixes
      that can no longer satisfy it (g must be true on every prefix of an accepted y).
    * ``Constraint(mask=m)``: ``m(batch) -> (B, V) bool`` allowed next tokens (or a
      fixed ``(V,)`` bool tensor / a set of allowed ids); factorises over tokens.  EOS
      must be allowed where completions may end.
    """

    def __init__(
        self,
        predicate: Callable[[Completion], bool] | None = None,
        *,
        mask: Callable[[Prefixes], torch.Tensor] | torch.Tensor | Sequence[int] | None = None,
        prefix: Callable[[Completion], bool] | None = None,
        name: str | None = None,
    ) -> None:
        if (predicate is None) == (mask is None):
            raise ValueError("Constraint needs exactly one of predicate=... or mask=...")
        if predicate is not None and not callable(predicate):
            raise ValueError(f"predicate must be callable, got {predicate!r}")
        self.predicate = predicate
        self.mask = mask
        self.prefix = prefix
        self.name = name or getattr(predicate or mask, "__name__", "constraint")
        self.factorises = mask is not None

    @property
    def has_twist(self) -> bool:
        return self.prefix is not None

    def _mask(self, batch: Prefixes) -> torch.Tensor:
        V = batch.base_logprobs.shape[-1]
        m = self.mask
        if callable(m):
            out = torch.as_tensor(m(batch), dtype=torch.bool)
        elif isinstance(m, torch.Tensor):
            out = m.to(torch.bool)
        else:
            out = torch.zeros(V, dtype=torch.bool)
            out[list(m)] = True
        if out.dim() == 1:
            out = out.expand(len(batch), V)
        if out.shape != (len(batch), V):
            raise ValueError(f"constraint mask has shape {tuple(out.shape)}, expected ({len(batch)}, {V})")
        return out

    def log_next(self, batch: Prefixes) -> torch.Tensor | None:
        if self.mask is None:
            return None
        allowed = self._mask(batch).to(batch.base_logprobs.device)
        zero = torch.zeros((), dtype=batch.base_logprobs.dtype, device=allowed.device)
        return torch.where(allowed, zero, torch.full_like(zero, -math.inf))

    def log_complete(self, batch: Prefixes) -> torch.Tensor:
        if self.predicate is None:
            return torch.zeros(len(batch), dtype=torch.float64)
        ok = [bool(self.predicate(c)) for c in batch.completions()]
        return torch.tensor([0.0 if k else -math.inf for k in ok], dtype=torch.float64)

    def log_prefix(self, batch: Prefixes) -> torch.Tensor:
        if self.prefix is None:
            return torch.zeros(len(batch), dtype=torch.float64)
        comps = [Completion(c.token_ids, c.text, False, False) for c in batch.completions()]
        return torch.tensor([0.0 if self.prefix(c) else -math.inf for c in comps], dtype=torch.float64)

    def __repr__(self) -> str:
        return f"Constraint({self.name})"


def token_mask(lm: Any, allowed: Callable[[str], bool], allow_eos: bool = True) -> torch.Tensor:
    """A ``(V,)`` bool mask of tokens whose decoded text satisfies ``allowed`` (e.g. digits)."""
    if lm.tokenizer is None:
        raise ValueError("token_mask needs an LM with a tokenizer")
    keep = torch.zeros(lm.vocab_size, dtype=torch.bool)
    for tok in range(lm.vocab_size):
        keep[tok] = bool(allowed(lm.tokenizer.decode([tok])))
    if allow_eos:
        keep[lm.eos_token_id] = True
    return keep
