"""The built-in potentials: ``Tempered``, ``RewardTilt``, ``Constraint`` (and ``Power``, which lives in
:mod:`~llmppl.targets.base` because ``Product`` merges its exponents)."""

from __future__ import annotations

import math
import re
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .base import Completion, Potential, Power, Prefixes, _positive_finite  # noqa: F401 (Power re-exported)


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
        if prefix is not None and not callable(prefix):
            raise ValueError(f"prefix must be callable, got {prefix!r}")
        if mask is not None and not callable(mask):
            mask = _static_mask(mask)
        self.predicate = predicate
        self.mask = mask
        self.prefix = prefix
        self.name = name or getattr(predicate or mask, "__name__", "constraint")
        self.factorises = mask is not None

    @property
    def has_twist(self) -> bool:
        return self.prefix is not None

    def allowed_tokens(self, batch: Prefixes, vocab_size: int) -> torch.Tensor | None:
        """``(B, V)`` bool: the next tokens the mask allows after each prefix of ``batch``
        (``log φ^next = log 1[allowed]``), so a backend can apply it inside its own blocks; None
        for a constraint on finished completions.  ``batch.base_logprobs`` may be None there."""
        return None if self.mask is None else self._mask(batch, vocab_size)

    def static_allowed(self, vocab_size: int) -> torch.Tensor | None:
        """The fixed mask as ``(V,)`` bool (None when it is a callable or there is none)."""
        m = self.mask
        if m is None or callable(m):
            return None
        if m.dtype == torch.bool:
            return m
        out = torch.zeros(vocab_size, dtype=torch.bool)
        out[m[(m >= 0) & (m < vocab_size)]] = True
        return out

    def _mask(self, batch: Prefixes, vocab_size: int | None = None) -> torch.Tensor:
        V = batch.base_logprobs.shape[-1] if vocab_size is None else vocab_size
        m = self.mask
        if callable(m):
            out = torch.as_tensor(m(batch), dtype=torch.bool)
        elif m.dtype == torch.bool:
            out = m
        else:  # allowed token ids
            if len(m) and (int(m.min()) < 0 or int(m.max()) >= V):
                raise ValueError(f"constraint {self.name}: allowed token ids must lie in [0, {V})")
            out = torch.zeros(V, dtype=torch.bool)
            out[m] = True
        if out.dim() == 1 and out.shape[0] == V:
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
        ok = [_check(self.predicate, c, i, f"constraint {self.name}")
              for i, c in enumerate(batch.completions())]
        return torch.tensor([0.0 if k else -math.inf for k in ok], dtype=torch.float64)

    def log_prefix(self, batch: Prefixes) -> torch.Tensor:
        if self.prefix is None:
            return torch.zeros(len(batch), dtype=torch.float64)
        comps = [Completion(c.token_ids, c.text, False, False) for c in batch.completions()]
        ok = [_check(self.prefix, c, i, f"constraint {self.name} (prefix)") for i, c in enumerate(comps)]
        return torch.tensor([0.0 if k else -math.inf for k in ok], dtype=torch.float64)

    def __repr__(self) -> str:
        return f"Constraint({self.name})"


def _static_mask(mask: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """A fixed mask as a (V,) bool tensor or a 1-D tensor of allowed ids; refuses one that allows nothing."""
    t = torch.as_tensor(sorted(mask) if isinstance(mask, (set, frozenset)) else mask)
    if t.numel() == 0:
        raise ValueError("the constraint mask allows no token: nothing can satisfy it")
    if t.dtype != torch.bool:
        if t.is_floating_point() or t.dim() != 1:
            raise ValueError("a fixed constraint mask is a (V,) bool tensor or a list of allowed token ids")
        t = t.long()
    if t.dtype == torch.bool and not bool(t.any()):
        raise ValueError("the constraint mask allows no token: nothing can satisfy it")
    return t


def _check(fn: Callable[[Completion], Any], c: Completion, i: int, what: str) -> bool:
    try:
        return bool(fn(c))
    except Exception as exc:
        shown = c.text if c.text is not None else c.token_ids
        raise RewardError(f"{what} raised {type(exc).__name__}: {exc} on completion {i} "
                          f"({shown!r:.120})") from exc


_TOKEN_TEXTS: "weakref.WeakKeyDictionary[Any, list[str]]" = weakref.WeakKeyDictionary()


def token_texts(lm: Any) -> list[str]:
    """The decoded text of every token id of ``lm`` (cached per LM)."""
    if getattr(lm, "tokenizer", None) is None:
        raise ValueError("token masks from text need an LM with a tokenizer")
    if lm not in _TOKEN_TEXTS:
        _TOKEN_TEXTS[lm] = lm.tokenizer.batch_decode([[t] for t in range(lm.vocab_size)])
    return _TOKEN_TEXTS[lm]


def token_mask(lm: Any, allowed: Callable[[str], bool], allow_eos: bool = True) -> torch.Tensor:
    """A ``(V,)`` bool mask of tokens whose decoded text satisfies ``allowed`` (e.g. digits)."""
    keep = torch.tensor([bool(allowed(text)) for text in token_texts(lm)], dtype=torch.bool)
    if allow_eos:
        keep[list(getattr(lm, "eos_token_ids", None) or (lm.eos_token_id,))] = True
    return keep


def regex_mask(lm: Any, pattern: str | re.Pattern, allow_eos: bool = True) -> torch.Tensor:
    """A ``(V,)`` bool mask of tokens whose decoded text fully matches ``pattern``.

    Per token, so ``Constraint(mask=regex_mask(lm, r"\\s?\\d+"))`` gives completions made
    only of digit tokens (and EOS); a prefix-dependent regex needs a callable mask.
    """
    rx = re.compile(pattern)
    return token_mask(lm, lambda text: rx.fullmatch(text) is not None, allow_eos)


def digits_mask(lm: Any, allow_space: bool = True, allow_eos: bool = True) -> torch.Tensor:
    """Tokens made of digits only (optionally after one leading space), plus EOS."""
    return regex_mask(lm, r" ?\d+" if allow_space else r"\d+", allow_eos)
