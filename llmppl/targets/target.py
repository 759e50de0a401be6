"""``Target``: an unnormalised density over completions, ``γ(y) = p(y|x)^a · Π_k φ_k(y)``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from ..models.base import LanguageModel
from .base import Potential, Prefixes, Product, RowsOfPrompts, scaled
from .potentials import Power, Tempered


class Target:
    """A base LM times potentials: ``log γ(y) = Σ_t [a·log p(y_t|y_<t) + Σ_k log φ_k^next] + Σ_k log φ_k(y)``.

    **Base exponent.** ``a`` (``base_exponent``) is the sum of the ``Power`` factors.
    With no ``Power`` factor it is 1 (the base LM: ``Target(lm, RewardTilt(r, β))`` is
    ``p · exp(r/β)``) — unless a ``Tempered(τ)`` factor is present, in which case it is
    0: ``Tempered`` is itself a whole (locally normalised) token-level distribution and
    *replaces* ``p``, so ``Target(lm, Tempered(τ))`` is the law of low-temperature
    sampling and ``Tempered(τ) * RewardTilt(r, β)`` is ``p_τ · exp(r/β)``.  To keep
    ``p`` as well, say so: ``Power(1) * Tempered(τ)`` is ``p · p_τ`` (``a = 1``).

    **Truncation.** The sequence space is completions ending in EOS within
    ``max_new_tokens`` tokens (EOS counted), plus the *truncated* ones that reach
    ``max_new_tokens`` without EOS.  ``truncation`` says what a truncated completion
    weighs:

    * ``"keep"`` (default): its base factor is the prefix marginal ``p(y_≤T)^a`` (and
      potentials see it with ``truncated=True``), so ``π`` lives on finished and cut
      completions alike — what decoding to a token budget does, but with ``a > 1``
      this favours loops that never end;
    * ``"zero"``: weight 0 — ``π ∝ p^a·Π φ`` restricted to completions that finish
      within ``max_new_tokens``, the honest target when the answer must end.  It is
      implemented as a factor on finished sequences (``log_complete`` is ``−∞`` on
      truncated rows), so every engine and ``llmppl.exact`` honour it unchanged; an
      engine's particles that are all cut die, like any zero-weight particles.
    """

    #: the values of ``truncation``
    TRUNCATION = ("keep", "zero")

    def __init__(self, lm: Any, potential: Potential | None = None, chat: bool = False,
                 truncation: str = "keep") -> None:
        if not isinstance(lm, LanguageModel):
            raise ValueError(f"Target needs a llmppl.models.LanguageModel, got {type(lm).__name__}")
        if potential is not None and not isinstance(potential, Potential):
            raise ValueError(f"potential must be a llmppl Potential, got {type(potential).__name__}")
        if truncation not in self.TRUNCATION:
            raise ValueError(f"truncation must be one of {self.TRUNCATION}, got {truncation!r}")
        self.truncation = truncation
        self.lm = lm
        self.potential = potential if potential is not None else Power(1.0)
        self.chat = chat
        factors = self.potential.factors
        powers = [f for f in factors if isinstance(f, Power)]
        self.others: tuple[Potential, ...] = tuple(f for f in factors if not isinstance(f, Power))
        if powers:
            self.base_exponent = sum(p.alpha for p in powers)
        else:
            self.base_exponent = 0.0 if any(isinstance(f, Tempered) for f in factors) else 1.0
        self._other = Product.of(*self.others) if self.others else None

    # ----------------------------------------------------------------- helpers
    @property
    def alpha(self) -> float:
        return self.base_exponent

    @property
    def has_twist(self) -> bool:
        return self.potential.has_twist

    @property
    def has_complete(self) -> bool:
        """True when ``log_complete`` can be non-zero: a factor defined on finished sequences
        (rewards, predicates; a factor may say so with its own ``has_complete``, as grammar
        constraints do for cut completions), or ``truncation="zero"``."""
        return self.truncation == "zero" or any(getattr(f, "has_complete", not f.factorises) for f in self.others)

    def encode(self, prompt: str | Sequence[int] | Sequence[dict]) -> list[int]:
        return self.lm.encode_prompt(prompt, chat=self.chat)

    def batch(self, prompt: list[int] | list[list[int]], tokens: list[list[int]],
              base_logprobs: torch.Tensor | None = None, finished: list[bool] | None = None,
              truncated: list[bool] | None = None) -> Prefixes:
        """Prefixes for potentials; ``prompt`` is one prompt or one per row."""
        if prompt and not isinstance(prompt[0], int):
            rows = [list(p) for p in prompt]
            return RowsOfPrompts(self.lm, rows[0], tokens, base_logprobs, finished, truncated, row_prompts=rows)
        return Prefixes(self.lm, prompt, tokens, base_logprobs, finished, truncated)

    # ------------------------------------------------------------------ density
    def log_next(self, batch: Prefixes, exponent: float | None = None) -> torch.Tensor:
        """``(B, V)``: ``a_t·log p(v|y_<t) + Σ_k log φ_k^next(v)`` with ``a_t = exponent`` (default ``a``)."""
        a = self.base_exponent if exponent is None else exponent
        out = scaled(a, batch.base_logprobs)          # 0 · log 0 = 0 (a Tempered-only target)
        if self._other is not None:
            extra = self._other.log_next(batch)
            if extra is not None:
                out = out + extra
        return out

    @property
    def masks_only(self) -> bool:
        """Every token-level factor besides ``Power`` is a mask ``log φ^next = log 1[allowed]``
        (it has ``allowed_tokens``): ``p^a · Π masks``, which a backend can draw in its own blocks
        (``q ∝ p^{1/τ} · mask``)."""
        return all(callable(getattr(f, "allowed_tokens", None)) for f in self.others if f.factorises)

    def allowed_tokens(self, batch: Prefixes, vocab_size: int) -> torch.Tensor | None:
        """``(B, V)`` bool: the conjunction of the factors' masks after each prefix of ``batch`` (None
        without a mask).  Only for :attr:`masks_only` targets."""
        out = None
        for f in self.others:
            if f.factorises:
                m = f.allowed_tokens(batch, vocab_size)
                if m is not None:
                    m = torch.as_tensor(m, dtype=torch.bool)
                    out = m if out is None else out & m
        return out

    def static_allowed(self, vocab_size: int) -> torch.Tensor | None:
        """``(V,)`` bool when every mask is fixed (the same after every prefix), else None."""
        masks = [f for f in self.others if f.factorises]
        fixed = [getattr(f, "static_allowed", lambda V: None)(vocab_size) for f in masks]
        if not masks or any(m is None for m in fixed):
            return None
        out = torch.ones(vocab_size, dtype=torch.bool)
        for m in fixed:
            out &= m.to(torch.bool)[:vocab_size]
        return out

    def log_next_other(self, batch: Prefixes) -> torch.Tensor | None:
        """``(B, V)``: ``Σ_k log φ_k^next(v)`` of the non-``Power`` token-level factors (None if none)."""
        return None if self._other is None else self._other.log_next(batch)

    def log_complete(self, batch: Prefixes) -> torch.Tensor:
        """``(B,)`` float64: ``Σ_k log φ_k(y)`` of the non-factorising factors on ended rows,
        and ``−∞`` on the truncated ones (``batch.truncated``) under ``truncation="zero"``."""
        out = torch.zeros(len(batch), dtype=torch.float64)
        if self.truncation == "zero" and batch.truncated is not None:
            cut = torch.tensor([bool(t) for t in batch.truncated], dtype=torch.bool)
            out[cut] = -math.inf
            if bool(cut.all()):
                return out          # no need to score rows that weigh nothing
        if self._other is not None:
            out = out + self._other.log_complete(batch).to(torch.float64)
        return out

    def explain_zero_weight(self, truncated: Sequence[bool], max_new_tokens: int) -> str | None:
        """The reason every row weighs nothing when it is this target's truncation option
        (every row cut under ``truncation="zero"``), else None — for engines' error messages."""
        flags = [bool(t) for t in truncated]
        if self.truncation == "zero" and flags and all(flags):
            return (f"every completion was cut at max_new_tokens={max_new_tokens} and "
                    f"truncation='zero' gives cut completions zero weight: raise max_new_tokens "
                    f"(or use truncation='keep')")
        return None

    def log_twist(self, batch: Prefixes) -> torch.Tensor:
        """``(B,)`` float64: ``log ψ(y_<t)``, the twists of unfinished prefixes (0 when none)."""
        if self._other is None or not self.has_twist:
            return torch.zeros(len(batch), dtype=torch.float64)
        return self._other.log_prefix(batch).to(torch.float64)

    def log_density(self, prompt: str | Sequence[int], sequences: Sequence[Sequence[int]],
                    max_new_tokens: int | None = None) -> torch.Tensor:
        """``log γ(y)`` of whole completions (uncached, for tests and small checks).

        A sequence ending in an EOS id (any of ``lm.eos_token_ids``) is finished; one
        without EOS is truncated and needs ``len == max_new_tokens``.
        """
        ids = self.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        eos = set(getattr(self.lm, "eos_token_ids", (self.lm.eos_token_id,)))
        out = torch.zeros(len(sequences), dtype=torch.float64)
        toks, fin, trunc = [], [], []
        for i, seq in enumerate(sequences):
            seq = [int(t) for t in seq]
            if any(t in eos for t in seq[:-1]):
                raise ValueError(f"sequence {i} has EOS before its end")
            finished = bool(seq) and seq[-1] in eos
            if not finished and max_new_tokens is not None and len(seq) != max_new_tokens:
                raise ValueError(f"sequence {i} has no EOS and is not of length max_new_tokens")
            for t in range(len(seq)):
                lp = self.lm.checked_next_logprobs([ids + seq[:t]])
                inc = self.log_next(self.batch(ids, [seq[:t]], lp))
                out[i] += float(inc[0, seq[t]])
            body = seq[:-1] if finished else seq
            toks.append(body)
            fin.append(finished)
            trunc.append(not finished)
        out += self.log_complete(self.batch(ids, toks, None, fin, trunc))
        return out

    def __repr__(self) -> str:
        extra = ", truncation='zero'" if self.truncation == "zero" else ""
        return f"Target({self.lm.name}, {self.potential!r}{extra})"
