"""The potential interface and its algebra.

A potential ``φ`` is a non-negative factor of the target density, seen in log space
through three methods, each on a batch of prefixes (:class:`Prefixes`):

* ``log_next(batch) -> (B, V) | None``: ``log φ(y_<t, v) − log φ(y_<t)`` for every
  next token ``v``, when ``φ`` factorises over tokens;
* ``log_prefix(batch) -> (B,)``: a twist ``log ψ(y_<t)`` of an unfinished prefix; twists
  only guide engines and cancel, they never change the target;
* ``log_complete(batch) -> (B,)``: ``log φ(y)`` of finished sequences, for potentials
  that do not factorise (0 for those that do).

Products of potentials are sums of these logs; ``*`` composes, flattening nested
products and merging ``Power`` factors, so composition is associative and commutative.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


def scaled(a: float | torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """``a · log p`` with ``0 · log 0 = 0``: the log of ``p^a``, where ``p^0 = 1`` even for ``p = 0``.

    Plain ``a * log_p`` gives ``0 · (−inf) = NaN`` when the exponent is 0 (a ``Tempered``-only
    target, a schedule starting at 0) and the LM gives a token probability exactly 0 (a
    forced EOS, a mask, a padded vocabulary row).  ``a`` is a float or a tensor that
    broadcasts against ``log_p``; a NaN in ``log_p`` itself stays NaN.
    """
    out = a * log_p
    if isinstance(a, torch.Tensor):
        return torch.where((a == 0) & torch.isneginf(log_p), torch.zeros((), dtype=out.dtype, device=out.device), out)
    if a == 0:
        return torch.where(torch.isneginf(log_p), torch.zeros((), dtype=out.dtype, device=out.device), out)
    return out


@dataclass
class Completion:
    """A (possibly unfinished) completion as reward functions see it."""

    token_ids: list[int]
    text: str | None
    finished: bool = True
    truncated: bool = False


@dataclass
class Prefixes:
    """A batch of completions-so-far handed to potentials.

    ``tokens[i]`` excludes the prompt and any EOS; ``finished[i]`` says whether row i
    ended with EOS.  ``base_logprobs`` holds ``log p(· | x, y_<t)`` (B, V) when the
    engine asks for next-token increments.
    """

    lm: Any
    prompt: list[int]
    tokens: list[list[int]]
    base_logprobs: torch.Tensor | None = None
    finished: list[bool] | None = None
    truncated: list[bool] | None = None
    _texts: list[str | None] | None = field(default=None, repr=False)
    #: each row's prompt when the rows continue different prompts (``run_batch``)
    row_prompts: list[list[int]] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def prompts(self) -> list[list[int]]:
        """The prompt of every row (rows of a batch may continue different prompts)."""
        return self.row_prompts if self.row_prompts is not None else [self.prompt] * len(self)

    @property
    def texts(self) -> list[str | None]:
        """Decoded completions (None for LMs without a tokenizer)."""
        if self._texts is None:
            self._texts = [self.lm.decode(t) for t in self.tokens]
        return self._texts

    def completions(self) -> list[Completion]:
        fin = self.finished or [True] * len(self)
        trunc = self.truncated or [False] * len(self)
        return [
            Completion(list(t), x, f, c) for t, x, f, c in zip(self.tokens, self.texts, fin, trunc)
        ]


class RowsOfPrompts(Prefixes):
    """Prefixes whose rows continue several prompts (``row_prompts``): ``prompt`` is refused when
    they differ (a potential must read ``prompts[i]``, the prompt of row ``i``)."""

    def __getattribute__(self, name: str) -> Any:
        if name == "prompt":
            rows = object.__getattribute__(self, "row_prompts")
            if rows is not None and any(p != rows[0] for p in rows):
                raise ValueError("this batch holds rows of several prompts (run_batch): use batch.prompts[i], "
                                 "the prompt of row i")
        return object.__getattribute__(self, name)


class Potential:
    """A factor ``φ(y)`` of the target; see the module docstring for the three methods."""

    #: True when ``log_next`` defines the potential (token-level factorisation)
    factorises: bool = False

    def log_next(self, batch: Prefixes) -> torch.Tensor | None:
        return None

    def log_prefix(self, batch: Prefixes) -> torch.Tensor:
        return torch.zeros(len(batch), dtype=torch.float64)

    def log_complete(self, batch: Prefixes) -> torch.Tensor:
        return torch.zeros(len(batch), dtype=torch.float64)

    @property
    def has_twist(self) -> bool:
        return False

    @property
    def factors(self) -> tuple["Potential", ...]:
        return (self,)

    def __mul__(self, other: "Potential") -> "Potential":
        if not isinstance(other, Potential):
            return NotImplemented
        return Product.of(*self.factors, *other.factors)

    __rmul__ = __mul__


class Product(Potential):
    """``Π_k φ_k``: logs add; built by ``*`` and always kept flat with ``Power`` merged."""

    def __init__(self, factors: Sequence[Potential]) -> None:
        self._factors = tuple(factors)

    @staticmethod
    def of(*factors: Potential) -> Potential:
        flat: list[Potential] = []
        alpha = None
        for f in factors:
            for g in f.factors:
                if isinstance(g, Power):
                    alpha = g.alpha if alpha is None else alpha + g.alpha
                else:
                    flat.append(g)
        if alpha is not None:
            flat.insert(0, Power(alpha))
        return flat[0] if len(flat) == 1 else Product(flat)

    @property
    def factors(self) -> tuple[Potential, ...]:
        return self._factors

    @property
    def factorises(self) -> bool:  # type: ignore[override]
        return all(f.factorises for f in self._factors)

    @property
    def has_twist(self) -> bool:
        return any(f.has_twist for f in self._factors)

    def log_next(self, batch: Prefixes) -> torch.Tensor | None:
        parts = [p for p in (f.log_next(batch) for f in self._factors) if p is not None]
        return sum(parts[1:], parts[0]) if parts else None

    def log_prefix(self, batch: Prefixes) -> torch.Tensor:
        return sum((f.log_prefix(batch) for f in self._factors),
                   torch.zeros(len(batch), dtype=torch.float64))

    def log_complete(self, batch: Prefixes) -> torch.Tensor:
        return sum((f.log_complete(batch) for f in self._factors),
                   torch.zeros(len(batch), dtype=torch.float64))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Product):
            return NotImplemented
        rest = list(other.factors)
        for f in self._factors:
            if f not in rest:
                return False
            rest.remove(f)
        return not rest

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return " * ".join(repr(f) for f in self._factors)


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
